#!/usr/bin/env bash
# Deterministic simulation tests (dataplane/sim): engine cores against each other over a
# simulated network with loss, duplication, reordering, delay and NAT rebinding, on
# boringtun's mock clock. Every test prints its seed; TABBIFY_SIM_SEED=<seed> replays it.
# Extra arguments go to nextest (e.g. -E 'test(=sim_rekey_at_rekey_after_time)').
#
# The crate is outside the root workspace so that boringtun's `mock-instant` feature never
# reaches the workspace build (Cargo unifies features per build: the tabbify-mesh binary
# would run on a frozen clock). It shares target/ with the workspace; this script checks
# that the workspace graph has no mock-instant and that target/debug/tabbify-mesh is
# byte-identical before and after.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "test-sim: FAIL: $*" >&2
  exit 1
}

cargo nextest --version >/dev/null 2>&1 ||
  fail "cargo-nextest is missing (install it with: cargo install cargo-nextest --locked)"

manifest=dataplane/sim/Cargo.toml
target="${CARGO_TARGET_DIR:-$PWD/target}"
bin="$target/debug/tabbify-mesh"

if cargo tree --workspace -e features -i boringtun 2>/dev/null | grep -q 'mock-instant'; then
  fail "a workspace member enables boringtun/mock-instant: the workspace binaries would run on a mock clock"
fi

before=""
if [ -e "$bin" ]; then
  before=$(sha256sum "$bin" | cut -d' ' -f1)
fi

echo "== sim: cargo fmt --check"
cargo fmt --manifest-path "$manifest" -- --check
echo "== sim: cargo clippy"
CARGO_TARGET_DIR="$target" cargo clippy --manifest-path "$manifest" --all-targets -- -D warnings
echo "== sim: tests"
CARGO_TARGET_DIR="$target" cargo nextest run --manifest-path "$manifest" --no-fail-fast "$@"

if [ -n "$before" ]; then
  after=$(sha256sum "$bin" | cut -d' ' -f1)
  [ "$before" = "$after" ] || fail "the simulation build changed $bin"
fi
echo "test-sim: ok"
