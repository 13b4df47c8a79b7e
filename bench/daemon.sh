#!/usr/bin/env bash
# Daemon benchmarks: (1) an unchanged rebuild through `kiln serve` vs
# embedded, (2) eight concurrent builds of different Dockerfiles on one
# daemon vs the same eight one after another, (3) 100 MB through
# `kiln run -i` stdin, through the daemon vs embedded.
#
#   bench/daemon.sh [path/to/kiln]     (default: target/release/kiln)
#
# Needs root (real containers). Uses a busybox image made by
# scripts/make-busybox-image.sh, so no registry is involved.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
kiln=${1:-$repo/target/release/kiln}
work=$(mktemp -d)
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

bash "$repo/scripts/make-busybox-image.sh" "$work/oci" >/dev/null
now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc; }

# A context with some weight: 2000 small files and a 20 MB one.
ctx=$work/ctx
mkdir -p "$ctx/files"
for i in $(seq 1 2000); do echo "file $i" > "$ctx/files/$i.txt"; done
head -c 20000000 /dev/urandom > "$ctx/big.bin"
printf 'FROM busybox\nRUN echo step > /step\nCOPY files /files\nCOPY big.bin /big.bin\nRUN ls /files | wc -l > /count\n' > "$ctx/Dockerfile"

start_daemon() {
    "$kiln" --root "$1" serve -H "unix://$work/kiln.sock" 2>"$work/daemon.log" &
    daemon_pid=$!
    for _ in $(seq 1 100); do [ -S "$work/kiln.sock" ] && break; sleep 0.05; done
}
stop_daemon() { kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=; }

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Runs alternate (embedded, daemon, embedded, ...) so that load from
# elsewhere on the machine falls on both alike; median and fastest of 11.
echo "== unchanged rebuild (11 alternating runs each, after one warm-up build)"
emb=$work/root-embedded
"$kiln" --root "$emb" load -i "$work/oci" -t busybox:latest >/dev/null
"$kiln" --root "$emb" build --progress plain -t b "$ctx" 2>/dev/null
dmn=$work/root-daemon
"$kiln" --root "$dmn" load -i "$work/oci" -t busybox:latest >/dev/null
start_daemon "$dmn"
"$kiln" --host "unix://$work/kiln.sock" build --progress plain -t b "$ctx" 2>/dev/null
: > "$work/emb"; : > "$work/dmn"
for _ in $(seq 1 11); do
    s=$(now); "$kiln" --root "$emb" build --progress plain -t b "$ctx" 2>/dev/null; elapsed "$s" "$(now)" >> "$work/emb"
    s=$(now); "$kiln" --host "unix://$work/kiln.sock" build --progress plain -t b "$ctx" 2>/dev/null; elapsed "$s" "$(now)" >> "$work/dmn"
done
fastest() { sort -n | head -1; }
e_med=$(median < "$work/emb"); d_med=$(median < "$work/dmn"); e_min=$(fastest < "$work/emb"); d_min=$(fastest < "$work/dmn")
echo "median: embedded $e_med s   daemon $d_med s   ratio $(echo "scale=2; $d_med / $e_med" | bc)"
echo "fastest: embedded $e_min s   daemon $d_min s   ratio $(echo "scale=2; $d_min / $e_min" | bc)"

echo "== eight different builds: one after another vs all at once (one daemon)"
for i in $(seq 1 8); do
    mkdir -p "$work/c$i"
    printf 'FROM busybox\nRUN i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo %s > /n\nRUN sleep 1\n' "$i" > "$work/c$i/Dockerfile"
done
s=$(now)
for i in $(seq 1 8); do "$kiln" --host "unix://$work/kiln.sock" build --progress plain --no-cache "$work/c$i" 2>/dev/null; done
seq_t=$(elapsed "$s" "$(now)")
s=$(now)
pids=()
for i in $(seq 1 8); do "$kiln" --host "unix://$work/kiln.sock" build --progress plain --no-cache "$work/c$i" 2>/dev/null & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
par_t=$(elapsed "$s" "$(now)")
echo "sequential: $seq_t s   concurrent: $par_t s"

echo "== 100 MB of stdin through kiln run -i (median of 3)"
stdin_run() { head -c 100000000 /dev/zero | "$kiln" "$@" run -i --rm busybox wc -c | cat >/dev/null; }
for _ in 1 2 3; do s=$(now); stdin_run --root "$emb"; elapsed "$s" "$(now)"; done | median > "$work/emb_in"
for _ in 1 2 3; do s=$(now); stdin_run --host "unix://$work/kiln.sock"; elapsed "$s" "$(now)"; done | median > "$work/dmn_in"
echo "embedded: $(cat "$work/emb_in") s   daemon: $(cat "$work/dmn_in") s   ratio: $(echo "scale=2; $(cat "$work/dmn_in") / $(cat "$work/emb_in")" | bc)"
stop_daemon
