#!/usr/bin/env bash
# The whole test suite: unit tests of the pure core, integration tests against real
# redis-server processes, and the redis-cli smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --quiet
cargo test --workspace --all-targets
scripts/smoke.sh
