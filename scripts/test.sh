#!/usr/bin/env bash
# The README's test command (CI runs exactly this through .ci/run).
# Installs what the tests need with apt, builds everything, prints the
# BuildKit conformance counts, then runs the whole test suite. Tests that
# need a registry start their own docker-registry on a loopback port (see
# engine/tests/common/) and stop it afterwards; containers run for real.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --workspace --all-targets --quiet
echo "== BuildKit conformance (counts per corpus)"
cargo test -q -p kiln-frontend --test conformance -- --nocapture --test-threads 1 2>&1 | grep -E '^(parser|shell|cases|skipped|  FAIL)' || true
echo "== whole test suite"
cargo test --workspace --no-fail-fast 2>&1
