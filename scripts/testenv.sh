# Test environment for kiln: a local registry serving busybox:latest.
# Source it (it installs nothing; scripts/deps.sh does):
#
#   source scripts/testenv.sh      # starts the registry, exports KILN_TEST_REGISTRY
#   ...run tests...                # the EXIT trap stops the registry
#
# What it does: starts `docker-registry` on a free loopback port with a
# temporary storage directory and a generated config, waits until /v2/
# answers, builds busybox:latest with scripts/make-busybox-image.sh (no kiln
# involved) and pushes it with skopeo to 127.0.0.1:PORT/library/busybox:latest.
# `kiln_testenv_stop` stops the registry and removes its files; it is
# registered as the EXIT trap and safe to call twice.

_kiln_testenv_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

kiln_testenv_stop() {
  if [[ -n "${KILN_TESTENV_PID:-}" ]]; then
    kill "$KILN_TESTENV_PID" 2>/dev/null || true
    wait "$KILN_TESTENV_PID" 2>/dev/null || true
    unset KILN_TESTENV_PID
  fi
  if [[ -n "${KILN_TESTENV_TMP:-}" ]]; then
    rm -rf "$KILN_TESTENV_TMP"
    unset KILN_TESTENV_TMP
  fi
  unset KILN_TEST_REGISTRY
}

# True when something listens on 127.0.0.1:$1.
_kiln_port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

kiln_testenv_start() {
  command -v docker-registry >/dev/null || { echo "testenv: docker-registry missing (run scripts/deps.sh)" >&2; return 1; }
  command -v skopeo >/dev/null || { echo "testenv: skopeo missing (run scripts/deps.sh)" >&2; return 1; }
  KILN_TESTENV_TMP=$(mktemp -d)
  export KILN_TESTENV_TMP
  trap kiln_testenv_stop EXIT
  local port attempt
  for attempt in $(seq 1 50); do
    port=$((20000 + RANDOM % 20000))
    _kiln_port_busy "$port" || break
  done
  mkdir -p "$KILN_TESTENV_TMP/storage"
  cat >"$KILN_TESTENV_TMP/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $KILN_TESTENV_TMP/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YAML
  docker-registry serve "$KILN_TESTENV_TMP/config.yml" >"$KILN_TESTENV_TMP/registry.log" 2>&1 &
  KILN_TESTENV_PID=$!
  export KILN_TESTENV_PID
  for attempt in $(seq 1 100); do
    if _kiln_port_busy "$port"; then break; fi
    if ! kill -0 "$KILN_TESTENV_PID" 2>/dev/null; then
      echo "testenv: docker-registry exited:" >&2
      cat "$KILN_TESTENV_TMP/registry.log" >&2
      kiln_testenv_stop
      return 1
    fi
    sleep 0.1
  done
  _kiln_port_busy "$port" || { echo "testenv: registry did not come up on port $port" >&2; kiln_testenv_stop; return 1; }
  export KILN_TEST_REGISTRY="127.0.0.1:$port"
  bash "$_kiln_testenv_dir/make-busybox-image.sh" "$KILN_TESTENV_TMP/busybox-oci" latest >/dev/null || { kiln_testenv_stop; return 1; }
  skopeo copy --quiet --dest-tls-verify=false \
    "oci:$KILN_TESTENV_TMP/busybox-oci:latest" "docker://$KILN_TEST_REGISTRY/library/busybox:latest" \
    || { echo "testenv: pushing busybox failed" >&2; kiln_testenv_stop; return 1; }
  echo "testenv: registry at $KILN_TEST_REGISTRY serves library/busybox:latest" >&2
}

kiln_testenv_start
