#!/usr/bin/env bash
# Daemon benchmarks: (1) an unchanged rebuild through `kiln serve` vs
# embedded, (2) eight concurrent builds of different Dockerfiles on one
# daemon vs the same eight one after another.
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

echo "== unchanged rebuild (median of 5, after one warm-up build)"
emb=$work/root-embedded
"$kiln" --root "$emb" load -i "$work/oci" -t busybox:latest >/dev/null
"$kiln" --root "$emb" build --progress plain -t b "$ctx" 2>/dev/null
for _ in 1 2 3 4 5; do s=$(now); "$kiln" --root "$emb" build --progress plain -t b "$ctx" 2>/dev/null; elapsed "$s" "$(now)"; done | median > "$work/emb"
dmn=$work/root-daemon
"$kiln" --root "$dmn" load -i "$work/oci" -t busybox:latest >/dev/null
start_daemon "$dmn"
"$kiln" --host "unix://$work/kiln.sock" build --progress plain -t b "$ctx" 2>/dev/null
for _ in 1 2 3 4 5; do s=$(now); "$kiln" --host "unix://$work/kiln.sock" build --progress plain -t b "$ctx" 2>/dev/null; elapsed "$s" "$(now)"; done | median > "$work/dmn"
echo "embedded: $(cat "$work/emb") s   daemon: $(cat "$work/dmn") s   ratio: $(echo "scale=2; $(cat "$work/dmn") / $(cat "$work/emb")" | bc)"

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
stop_daemon
