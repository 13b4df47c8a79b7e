#!/usr/bin/env bash
# Container start-to-exit of /bin/true: `kiln run --rootfs` vs `runc run` of
# the same busybox rootfs. Both are timed as whole CLI invocations (process
# start, container setup, run, teardown). kiln additionally mounts an overlay
# (rootfs as lowerdir + throw-away upper) and brings up lo in a fresh netns,
# as it does for every RUN step.
#
# Usage: sudo bench/runtime.sh [N]   (default N=50; needs runc and busybox-static)
# KILN=path/to/kiln overrides the binary (default: target/release/kiln, built if missing).
set -euo pipefail

N=${1:-50}
here=$(cd "$(dirname "$0")/.." && pwd)
KILN=${KILN:-$here/target/release/kiln}
RUNC=${RUNC:-$(command -v runc || echo /usr/sbin/runc)}

[ "$(id -u)" = 0 ] || { echo "skipped: needs root"; exit 0; }
[ -x "$RUNC" ] || { echo "skipped: runc is not installed"; exit 0; }
[ -x /bin/busybox ] || { echo "skipped: busybox-static is not installed"; exit 0; }
if [ ! -x "$KILN" ]; then
    (cd "$here" && cargo build --release -p kiln-engine --bin kiln)
fi

work=$(mktemp -d /tmp/kiln-bench-runtime.XXXXXX)
cleanup() {
    "$RUNC" --root "$work/runc-state" list -q 2>/dev/null | while read -r id; do
        "$RUNC" --root "$work/runc-state" delete -f "$id" || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# The rootfs: busybox and its applets.
rootfs=$work/bundle/rootfs
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/proc" "$rootfs/dev" "$rootfs/sys"
cp /bin/busybox "$rootfs/bin/busybox"
for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] || ln -s busybox "$rootfs/bin/$a"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
echo 'root:x:0:' > "$rootfs/etc/group"
touch "$rootfs/etc/hosts" "$rootfs/etc/resolv.conf"

# runc's default spec, running /bin/true without a terminal.
(cd "$work/bundle" && "$RUNC" spec)
sed -i -e 's/"terminal": true/"terminal": false/' -e 's/"sh"$/"\/bin\/true"/' "$work/bundle/config.json"
grep -q '"/bin/true"' "$work/bundle/config.json" || { echo "could not rewrite runc's config.json" >&2; exit 1; }

now_us() { echo $(( $(date +%s%N) / 1000 )); }

# median < numbers, one a line
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2] + a[NR/2+1]) / 2)}'; }

# time_one CMD... : runs CMD once, prints its wall time in microseconds.
time_one() {
    local t0 t1
    t0=$(now_us)
    "$@" >/dev/null
    t1=$(now_us)
    echo $((t1 - t0))
}

run_runc() { "$RUNC" --root "$work/runc-state" run -b "$work/bundle" "bench-$1"; }
run_kiln() { "$KILN" --root "$work/kiln" run --rm --network none --name "bench-$1" --rootfs "$rootfs" /bin/true; }

# 3 warm-ups each, then N rounds; runc and kiln alternate within a round,
# so both see the same background load (this host is shared).
for i in 1 2 3; do run_runc "warm$i" >/dev/null; run_kiln "warm$i" >/dev/null; done
runc_samples=() kiln_samples=()
for i in $(seq 1 "$N"); do
    runc_samples+=("$(time_one run_runc "run$i")")
    kiln_samples+=("$(time_one run_kiln "run$i")")
done
runc_us=$(printf '%s\n' "${runc_samples[@]}" | median)
kiln_us=$(printf '%s\n' "${kiln_samples[@]}" | median)
ratio=$(awk -v k="$kiln_us" -v r="$runc_us" 'BEGIN {printf "%.2f", k / r}')
# The fastest run of each: the least disturbed by other processes.
runc_min=$(printf '%s\n' "${runc_samples[@]}" | sort -n | head -1)
kiln_min=$(printf '%s\n' "${kiln_samples[@]}" | sort -n | head -1)

echo "N=$N, /bin/true start-to-exit, median (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
echo "runc run:              $((runc_us / 1000)).$(printf '%03d' $((runc_us % 1000))) ms"
echo "kiln run --rootfs:     $((kiln_us / 1000)).$(printf '%03d' $((kiln_us % 1000))) ms"
echo "ratio kiln/runc:       ${ratio}x (target <= 0.60x)"
echo "fastest run:           runc $((runc_min / 1000)).$(printf '%03d' $((runc_min % 1000))) ms, kiln $((kiln_min / 1000)).$(printf '%03d' $((kiln_min % 1000))) ms ($(awk -v k="$kiln_min" -v r="$runc_min" 'BEGIN {printf "%.2f", k / r}')x)"
