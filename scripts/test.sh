#!/usr/bin/env bash
# The README's test command: installs what the tests need, starts a local
# registry serving a busybox image, runs the whole test suite, stops the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --workspace --all-targets --quiet
cargo test --workspace --no-fail-fast 2>&1
