#!/usr/bin/env bash
# kiln's main job, end to end on a fresh machine: install what is needed,
# serve a locally made busybox image from a loopback registry, build
# testdata/demo with kiln (FROM busybox resolves through the mirror), and run
# the built image in a container.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build -p kiln-engine --bin kiln --quiet
KILN=$PWD/target/debug/kiln
# shellcheck source=testenv.sh
source scripts/testenv.sh           # starts the registry; exports KILN_TEST_REGISTRY; stops it on exit
ROOT=${KILN_ROOT:-$(mktemp -d /tmp/kiln-demo.XXXXXX)}
kiln() { "$KILN" --root "$ROOT" --registry-mirror "docker.io=http://$KILN_TEST_REGISTRY" "$@"; }
echo "== kiln build -t kiln-demo testdata/demo"
kiln build --progress plain -t kiln-demo testdata/demo
echo "== kiln images"
kiln images
echo "== kiln run --rm kiln-demo"
kiln run --rm kiln-demo
