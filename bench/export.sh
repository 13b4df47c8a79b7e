#!/usr/bin/env bash
# Layer export throughput: kiln's exporter (tar + compress + two sha256,
# one pass) against `zstd -T0` and `pigz` compressing the same layer tar
# that already exists (so the tools do strictly less work than kiln).
#
# usage: bench/export.sh [SIZE_MB]   (default 1024)
# env:   BENCH_DIR (scratch, default: a temp dir), KEEP=1 keeps it,
#        RUNS (default 3; the best run of each is reported)
set -euo pipefail

size_mb=${1:-1024}
runs=${RUNS:-3}
repo=$(cd "$(dirname "$0")/.." && pwd)

need=()
command -v pigz >/dev/null || need+=(pigz)
command -v zstd >/dev/null || need+=(zstd)
if ((${#need[@]})); then
    apt-get install -y "${need[@]}" >/dev/null
fi

work=${BENCH_DIR:-$(mktemp -d /var/tmp/kiln-export-bench.XXXXXX)}
mkdir -p "$work"
[[ ${KEEP:-0} == 1 ]] || trap 'rm -rf "$work"' EXIT

# ~size_mb of mixed data in files of 4 KiB .. 8 MiB: 40% text-like logs
# (very compressible), 30% base64 (moderately), 20% random (not at all),
# 10% sparse-ish binary (mostly zeros).
layer=$work/layer
if [[ ! -d $layer ]]; then
    echo "making ~${size_mb} MB of layer data in $layer" >&2
    mkdir -p "$layer"
    python3 - "$layer" "$size_mb" <<'PY'
import os, random, sys, base64
root, size_mb = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
target = size_mb * 1024 * 1024
words = [w.encode() for w in "error warn info debug request response user session cache layer build kiln export value key timeout retry ok failed".split()]
written = 0
n = 0
while written < target:
    d = os.path.join(root, f"d{n % 37:02d}", f"s{n % 11}")
    os.makedirs(d, exist_ok=True)
    size = min(rnd.choice([4 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20]), target - written)
    kind = rnd.random()
    if kind < 0.4:
        lines, total = [], 0
        while total < size:
            line = b"2026-11-23T20:%02d:%02d %s %s id=%d latency=%dms\n" % (
                rnd.randrange(60), rnd.randrange(60), rnd.choice(words), b" ".join(rnd.choice(words) for _ in range(6)),
                rnd.randrange(1 << 20), rnd.randrange(5000))
            lines.append(line); total += len(line)
        data = b"".join(lines)[:size]
    elif kind < 0.7:
        data = base64.b64encode(os.urandom(size * 3 // 4 + 3))[:size]
    elif kind < 0.9:
        data = os.urandom(size)
    else:
        data = bytearray(size)
        for _ in range(size // 512):
            i = rnd.randrange(size)
            data[i:i + 64] = os.urandom(min(64, size - i))
        data = bytes(data)
    with open(os.path.join(d, f"f{n:06d}.bin"), "wb") as f:
        f.write(data)
    written += size
    n += 1
print(f"{n} files, {written} bytes", file=sys.stderr)
PY
fi

(cd "$repo" && cargo build --release -p kiln-exporter --example export_bench >&2)
bench=$repo/target/release/examples/export_bench

"$bench" "$layer" tar "$work/layer.tar"
tar_bytes=$(stat -c %s "$work/layer.tar")
echo "layer tar: $tar_bytes bytes; $(nproc) cores; best of $runs runs" >&2

# best wall time (s) of a command over $runs runs
best() {
    local best=
    for _ in $(seq "$runs"); do
        local t0 t1 t
        t0=$(date +%s.%N)
        "$@" >/dev/null
        t1=$(date +%s.%N)
        t=$(echo "$t1 - $t0" | bc -l)
        if [[ -z $best ]] || (($(echo "$t < $best" | bc -l))); then best=$t; fi
    done
    echo "$best"
}
mbps() { echo "scale=1; $tar_bytes / 1000000 / $1" | bc -l; }

sync
# Warm the page cache so every contender reads from memory.
cat "$work/layer.tar" >/dev/null
find "$layer" -type f -exec cat {} + >/dev/null

zstd_level=3
gzip_level=6
rm -rf "$work/store-zstd" "$work/store-gzip"
t_kiln_zstd=$(best "$bench" "$layer" zstd $zstd_level "$work/store-zstd")
t_ref_zstd=$(best sh -c "zstd -q -T0 -$zstd_level -c '$work/layer.tar' > '$work/ref.zst'")
t_kiln_gzip=$(best "$bench" "$layer" gzip $gzip_level "$work/store-gzip")
t_ref_gzip=$(best sh -c "pigz -$gzip_level -c '$work/layer.tar' > '$work/ref.gz'")

# kiln's blobs (the only blob in each store) decompress to the very same tar.
ln -sf "$(find "$work/store-zstd/blobs/sha256" -type f | head -1)" "$work/kiln.zst"
ln -sf "$(find "$work/store-gzip/blobs/sha256" -type f | head -1)" "$work/kiln.gz"
cmp <(zstd -dc < "$work/kiln.zst") "$work/layer.tar"
cmp <(gzip -dc < "$work/kiln.gz") "$work/layer.tar"

size() { stat -L -c %s "$1"; }
printf '%-28s %8s %10s %8s\n' "contender" "secs" "MB/s" "ratio"
row() { printf '%-28s %8.2f %10s %8.3f\n' "$1" "$2" "$(mbps "$2")" "$(echo "$(size "$3") / $tar_bytes" | bc -l)"; }
row "kiln zstd -$zstd_level (tar+hash)" "$t_kiln_zstd" "$work/kiln.zst"
row "zstd -T0 -$zstd_level (tar given)" "$t_ref_zstd" "$work/ref.zst"
row "kiln gzip -$gzip_level (tar+hash)" "$t_kiln_gzip" "$work/kiln.gz"
row "pigz -$gzip_level (tar given)" "$t_ref_gzip" "$work/ref.gz"
echo "zstd: kiln/zstd-T0 throughput = $(echo "scale=2; $t_ref_zstd / $t_kiln_zstd" | bc -l)x (target >= 0.8)"
echo "gzip: kiln/pigz throughput    = $(echo "scale=2; $t_ref_gzip / $t_kiln_gzip" | bc -l)x (target >= 1.0)"
