#!/usr/bin/env bash
# kiln vs buildah vs docker's built-in BuildKit, side by side on this machine.
#
#   bash bench/run.sh [RUNS]        (default 5 runs per scenario and builder)
#   BIG_MB=500 (size of the large files of the big-context scenario, in 5 files)
#   EXPORT_MB=1024 (size of the image exported in scenario 7)
#   ONLY="6 8" (run only these scenarios, print their table, leave BENCHMARKS.md alone)
#
# Installs buildah and docker.io with apt, starts a loopback registry serving
# busybox (scripts/testenv.sh), a private dockerd pointed at it as docker.io
# mirror, runs every scenario interleaved (kiln, buildah, docker, kiln, ...),
# prints medians and kiln / best-other, and writes BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RUNS=${1:-5}

bash scripts/deps.sh
export DEBIAN_FRONTEND=noninteractive
for p in buildah docker.io; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || apt-get install -y -qq "$p" >/dev/null
done
cargo build --release -p kiln-engine --quiet
KILN=$REPO/target/release/kiln
KILN_COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!BENCHMARKS.md' || echo "+changes")
# Scenario 7 times only the export of a built 1 GB image to an OCI archive (see below);
# bench/export.sh measures kiln's layer compression alone (bench/EXPORT.md).

WORK=$(mktemp -d /tmp/kiln-bench.XXXXXX)
DOCKER_PID=""
cleanup() {
  [ -n "$DOCKER_PID" ] && kill "$DOCKER_PID" 2>/dev/null && wait "$DOCKER_PID" 2>/dev/null || true
  kiln_testenv_stop || true
  umount -R "$WORK"/docker 2>/dev/null || true
  rm -rf "$WORK" 2>/dev/null || true
}
# shellcheck source=../scripts/testenv.sh
source scripts/testenv.sh            # sets its own EXIT trap; ours below replaces it and calls it
trap cleanup EXIT
REG=$KILN_TEST_REGISTRY

# --- dockerd with a private data root, its docker.io mirror on the local registry.
# No bridge network (no traffic may leave this machine), so docker builds use
# --network host for RUN steps.
mkdir -p "$WORK/docker"
/usr/sbin/dockerd --data-root "$WORK/docker/data" --exec-root "$WORK/docker/exec" \
  --pidfile "$WORK/docker/pid" -H "unix://$WORK/docker/sock" \
  --registry-mirror "http://$REG" --insecure-registry "$REG" \
  --iptables=false --ip-masq=false --bridge=none >"$WORK/docker/log" 2>&1 &
DOCKER_PID=$!
export DOCKER_HOST="unix://$WORK/docker/sock"
for _ in $(seq 100); do /usr/bin/docker version >/dev/null 2>&1 && break; sleep 0.2; done
/usr/bin/docker version >/dev/null

# --- buildah with its own storage and the same mirror
cat >"$WORK/registries.conf" <<CONF
unqualified-search-registries = ["docker.io"]
[[registry]]
prefix = "docker.io"
location = "docker.io"
[[registry.mirror]]
location = "$REG"
insecure = true
CONF
export CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf
BUILDAH=(buildah --root "$WORK/buildah/root" --runroot "$WORK/buildah/run" --storage-driver overlay)

# --- scenarios: each a context dir with a Dockerfile
mk() { mkdir -p "$WORK/ctx/$1"; cat >"$WORK/ctx/$1/Dockerfile"; }
mk three-stage <<'DF'
FROM busybox AS deps
RUN mkdir -p /out && echo deps > /out/deps.txt
FROM busybox AS build
COPY src/ /src/
RUN cat /src/*.c > /app.txt && wc -c /app.txt
FROM busybox
COPY --from=deps /out/deps.txt /deps.txt
COPY --from=build /app.txt /app.txt
CMD ["cat", "/app.txt"]
DF
mkdir -p "$WORK/ctx/three-stage/src"
for i in $(seq 20); do echo "int f$i(void){return $i;}" >"$WORK/ctx/three-stage/src/f$i.c"; done

mk parallel <<'DF'
FROM busybox AS a
RUN i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; echo a > /a
FROM busybox AS b
RUN i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; echo b > /b
FROM busybox AS c
RUN i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; echo c > /c
FROM busybox AS d
RUN i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; echo d > /d
FROM busybox
COPY --from=a /a /a
COPY --from=b /b /b
COPY --from=c /c /c
COPY --from=d /d /d
DF

{ echo "FROM busybox"; for i in $(seq 50); do echo "RUN echo step $i > /step$i"; done; } | mk many-layers
{ echo "FROM busybox"; for i in $(seq 20); do echo "RUN true # $i"; done; } | mk run-overhead

mk big-context <<'DF'
FROM busybox
COPY . /data/
DF
mkdir -p "$WORK/ctx/big-context/small"
( cd "$WORK/ctx/big-context/small" && for d in $(seq 0 99); do mkdir -p d$d; for f in $(seq 0 199); do echo "file $d/$f" > d$d/f$f.txt; done; done )
BIG_MB=${BIG_MB:-500}
for i in 1 2 3 4 5; do head -c "$((BIG_MB / 5))M" /dev/urandom >"$WORK/ctx/big-context/large$i.bin"; done

# Scenario 7: a 1 GB image (EXPORT_MB) in one layer: half random data (does
# not compress), a quarter log-like text (compresses ~10x), a quarter a tar of
# real binaries and libraries from /usr (compresses ~3x).
mk export <<'DF'
FROM busybox
COPY . /data/
DF
EXPORT_MB=${EXPORT_MB:-1024}
for i in 1 2 3 4; do head -c "$((EXPORT_MB / 8))M" /dev/urandom >"$WORK/ctx/export/random$i.bin"; done
seq 1 100000000 | awk '{printf "2026-11-24T01:%02d:%02d INFO request id=%d path=/api/v1/items/%d status=%d ms=%d\n", $1%60, $1%59, $1, ($1*7919)%100003, ($1%17?200:404), $1%997}' \
  | head -c "$((EXPORT_MB / 4))M" >"$WORK/ctx/export/requests.log" || true
tar -C / -cf - usr/bin usr/lib usr/libexec usr/share 2>/dev/null | head -c "$((EXPORT_MB / 4))M" >"$WORK/ctx/export/usr.tar" || true

# --- one build with each tool; prints seconds
now() { date +%s.%N; }
build_kiln()    { "$KILN" --root "$WORK/kiln-root" --registry-mirror "docker.io=http://$REG" build --progress plain -t "bench-$1" "$WORK/ctx/$1" >"$WORK/last.log" 2>&1; }
build_buildah() { "${BUILDAH[@]}" build --runtime runc --layers -t "bench-$1" "$WORK/ctx/$1" >"$WORK/last.log" 2>&1; }
build_docker()  { DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -t "bench-$1" "$WORK/ctx/$1" >"$WORK/last.log" 2>&1; }
reset_kiln()    { rm -rf "$WORK/kiln-root"; }
reset_buildah() { "${BUILDAH[@]}" rmi -af >/dev/null 2>&1 || true; "${BUILDAH[@]}" rm -a >/dev/null 2>&1 || true; }
reset_docker()  { /usr/bin/docker builder prune -af >/dev/null 2>&1 || true; /usr/bin/docker image prune -af >/dev/null 2>&1 || true; /usr/bin/docker rmi -f $(/usr/bin/docker images -q) >/dev/null 2>&1 || true; }

timed() { # tool scenario
  local t0 t1; t0=$(now)
  if ! "build_$1" "$2"; then echo "FAILED: $1 $2" >&2; tail -20 "$WORK/last.log" >&2; echo NaN; return; fi
  t1=$(now); echo "$t1 - $t0" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "NaN"; else if (NR%2) printf "%.3f", a[(NR+1)/2]; else printf "%.3f", (a[NR/2]+a[NR/2+1])/2}'; }

declare -A RES
record() { RES["$1|$2"]+="$3 "; }

# scenario kinds: cold (reset before every run), warm (build once, then measure rebuilds),
# change (build once, then change one file before every measured run)
# Whether scenario `label` (its number is the first word) is to run.
wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" ${1%% *} "* ]]; }

run_scenario() { # label ctx kind
  local label=$1 ctx=$2 kind=$3
  wanted "$label" || return 0
  for tool in kiln buildah docker; do
    if [ "$kind" != cold ]; then "reset_$tool"; "build_$tool" "$ctx" || true; fi
  done
  for i in $(seq "$RUNS"); do
    for tool in kiln buildah docker; do
      case $kind in
        cold) "reset_$tool" ;;
        change) echo "int changed_${i}_${tool}(void){return $RANDOM;}" >"$WORK/ctx/$ctx/src/f1.c" ;;
      esac
      record "$label" "$tool" "$(timed "$tool" "$ctx")"
    done
  done
}

# Scenario 7: each tool builds the export image untimed; the TIMED part is
# writing it as an OCI archive with gzip or zstd layers. kiln: a cached
# `build -o type=oci` (its store is rebuilt untimed before every run, with
# a type=tar output that makes no layer blob, so every timed run compresses);
# buildah: `push --format oci --compression-format X IMG oci-archive:F`;
# docker 20.10's builder has no OCI exporter (`-o type=oci` fails), so
# `docker save IMG | gzip` or `| zstd -T0` (a docker-archive, compressed whole).
EXPORT_ROOT=$WORK/kiln-root-export
prepare7_kiln()    { rm -rf "$EXPORT_ROOT"; "$KILN" --root "$EXPORT_ROOT" --registry-mirror "docker.io=http://$REG" build --progress plain -o "type=tar,dest=$WORK/export-prep.tar" "$WORK/ctx/export" >"$WORK/last.log" 2>&1; rm -f "$WORK/export-prep.tar"; }
prepare7_buildah() { "${BUILDAH[@]}" build --runtime runc --layers -t bench-export "$WORK/ctx/export" >"$WORK/last.log" 2>&1; }
prepare7_docker()  { DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -t bench-export "$WORK/ctx/export" >"$WORK/last.log" 2>&1; }
export7_kiln()     { "$KILN" --root "$EXPORT_ROOT" --registry-mirror "docker.io=http://$REG" build --progress plain -o "type=oci,dest=$WORK/export.tar,compression=$1" "$WORK/ctx/export" >"$WORK/last.log" 2>&1; }
export7_buildah()  { "${BUILDAH[@]}" push --quiet --format oci --compression-format "$1" bench-export "oci-archive:$WORK/export.tar" >"$WORK/last.log" 2>&1; }
export7_docker()   { local c; case $1 in gzip) c=(gzip);; zstd) c=(zstd -q -T0);; esac; /usr/bin/docker save bench-export 2>"$WORK/last.log" | "${c[@]}" >"$WORK/export.tar"; }
run_export_scenario() { # label compression
  local label=$1 comp=$2
  wanted "$label" || return 0
  for tool in buildah docker; do "prepare7_$tool" || { echo "FAILED: prepare $tool" >&2; tail -20 "$WORK/last.log" >&2; }; done
  for i in $(seq "$RUNS"); do
    for tool in kiln buildah docker; do
      if [ "$tool" = kiln ]; then prepare7_kiln || { echo "FAILED: prepare kiln" >&2; tail -20 "$WORK/last.log" >&2; }; fi
      rm -f "$WORK/export.tar"; sync
      local t0 t1; t0=$(now)
      if "export7_$tool" "$comp"; then t1=$(now); record "$label" "$tool" "$(echo "$t1 - $t0" | bc -l)"
      else echo "FAILED: export $tool $comp" >&2; tail -20 "$WORK/last.log" >&2; record "$label" "$tool" NaN; fi
    done
  done
  rm -f "$WORK/export.tar"
}

apt-get install -y -qq bc >/dev/null 2>&1 || true
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
run_scenario "1 cold three-stage"             three-stage  cold
run_scenario "2 rebuild, nothing changed"     three-stage  warm
run_scenario "3 rebuild, one file changed"    three-stage  change
run_scenario "4 four parallel stages (cold)"  parallel     cold
run_scenario "5a big context, first build"    big-context  cold
run_scenario "5b big context, unchanged"      big-context  warm
run_scenario "6 50 RUN steps (cold)"          many-layers  cold
run_scenario "8 20 RUN true steps (cold)"     run-overhead cold
run_export_scenario "7a export 1 GB image to OCI tar, gzip (docker: save|gzip)" gzip
run_export_scenario "7b export 1 GB image to OCI tar, zstd (docker: save|zstd -T0)" zstd

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
OUT=$WORK/table.md
{
  echo "| scenario | kiln (s) | buildah (s) | docker BuildKit (s) | kiln / best other |"
  echo "|---|---:|---:|---:|---:|"
  for label in "1 cold three-stage" "2 rebuild, nothing changed" "3 rebuild, one file changed" \
      "4 four parallel stages (cold)" "5a big context, first build" "5b big context, unchanged" \
      "6 50 RUN steps (cold)" "8 20 RUN true steps (cold)" \
      "7a export 1 GB image to OCI tar, gzip (docker: save|gzip)" "7b export 1 GB image to OCI tar, zstd (docker: save|zstd -T0)"; do
    wanted "$label" || continue
    k=$(echo ${RES["$label|kiln"]} | tr ' ' '\n' | median)
    b=$(echo ${RES["$label|buildah"]} | tr ' ' '\n' | median)
    d=$(echo ${RES["$label|docker"]} | tr ' ' '\n' | median)
    ratio=$(python3 -c "import math,sys; k,b,d=map(float,sys.argv[1:]); o=[x for x in (b,d) if not math.isnan(x)]; print('n/a' if math.isnan(k) or not o else '%.2f'%(k/min(o)))" "$k" "$b" "$d")
    echo "| $label | $k | $b | $d | $ratio |"
  done
} >"$OUT"
cat "$OUT"
if [ -n "${ONLY:-}" ]; then
  echo "ONLY=$ONLY: BENCHMARKS.md left as it was (kiln $KILN_COMMIT, load before $LOAD_BEFORE, after $LOAD_AFTER)"
  exit 0
fi

{
  echo "# Benchmarks"
  echo
  echo "Produced by \`BIG_MB=$BIG_MB bash bench/run.sh $RUNS\` on $(date -u +%Y-%m-%d): medians of $RUNS interleaved runs each."
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)."
  echo "Load average (1/5/15 min) before the runs: $LOAD_BEFORE; after: $LOAD_AFTER (other work shared the machine when these differ from 0)."
  echo "buildah $(buildah --version | awk '{print $3}'), docker $(/usr/bin/docker version --format '{{.Server.Version}}' 2>/dev/null) (built-in BuildKit), kiln $KILN_COMMIT."
  echo
  cat "$OUT"
  echo
  for f in bench/TARGETS.md frontend/BENCH.md bench/RUNTIME.md bench/BUILD.md bench/EXPORT.md bench/DAEMON.md; do [ -f "$f" ] && { echo; sed 's/^# /## /' "$f"; }; done
} >BENCHMARKS.md
echo "wrote BENCHMARKS.md"
