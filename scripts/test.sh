#!/usr/bin/env bash
# The test command: set-up, then formatting, lints, and every test (unit, property,
# in-memory, network-namespace end-to-end, bounded fuzz runs). Needs root for namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
TABBIFY_SETUP_FUZZ=1 TABBIFY_SETUP_SCHEMATHESIS=1 TABBIFY_SETUP_PACKAGES=1 TABBIFY_SETUP_UI=1 scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== tests"
# The end-to-end tests run the workspace's binaries from target/debug: build them all first
# (a test build makes a package's bins only when that package has integration tests).
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast
for extra in scripts/test-*.sh; do
  [ -e "$extra" ] || continue
  echo "== $extra"
  bash "$extra"
done
