#!/usr/bin/env bash
# Bounded fuzz runs of every cargo-fuzz target of every crate that owns parsers
# (dataplane/fuzz: packets, offloads, filter, configs, the joiner's roster and path selection;
# control/fuzz: SSE, policy, state log, change-log entries, control-socket requests, dashboard
# session cookies, CSRF tokens and login links, STUN
# messages, relay tokens and URLs, the coordinator's JSON request
# bodies and identity routes; edge/fuzz: response codec, routes file; relay/fuzz: the relay
# protocol): build each project once, then run
# each target for FUZZ_SECONDS (default 10) starting from its committed seed corpus.
# Fails on the first panic, crash or timeout (libFuzzer exits non-zero and leaves the input
# under <crate>/fuzz/artifacts/<target>/). New inputs go to a temporary directory, so the
# committed corpora stay as they are. The projects share one target directory
# (target/fuzz), so the dependencies they have in common build once.
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz --locked`; scripts/setup.sh does it with TABBIFY_SETUP_FUZZ=1).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
projects=(dataplane/fuzz control/fuzz edge/fuzz relay/fuzz)
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$root/target/fuzz}"

seconds="${FUZZ_SECONDS:-10}"
# The fuzzed parsers are safe Rust (core/ forbids unsafe), so AddressSanitizer adds compile
# and run time without finding more; FUZZ_SANITIZER=address brings it back.
sanitizer="${FUZZ_SANITIZER:-none}"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "test-fuzz: FAIL: no nightly Rust toolchain; install it with: rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "test-fuzz: FAIL: cargo-fuzz is missing; install it with: cargo install cargo-fuzz --locked" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

total=0
for project in "${projects[@]}"; do
  cd "$root/$project"
  targets=$(cargo +nightly fuzz list)
  if [ -z "$targets" ]; then
    echo "test-fuzz: FAIL: cargo fuzz list found no targets in $project" >&2
    exit 1
  fi
  echo "test-fuzz: building $(echo "$targets" | wc -w) targets of $project"
  cargo +nightly fuzz build -s "$sanitizer"
  for t in $targets; do
    seeds="corpus/$t"
    mkdir -p "$work/$t"
    args=("$work/$t")
    [ -d "$seeds" ] && args+=("$seeds")
    echo "test-fuzz: $project $t for ${seconds}s"
    # -max_len: room for a 64 KiB super-packet plus its vnet header.
    if ! cargo +nightly fuzz run -s "$sanitizer" "$t" "${args[@]}" -- \
        -max_total_time="$seconds" -max_len=65600 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$work/$t.log" 2>&1; then
      tail -n 60 "$work/$t.log" >&2
      echo "test-fuzz: FAIL: target $t crashed; reproducer under $project/artifacts/$t/" >&2
      exit 1
    fi
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$work/$t.log" | sed "s/^/test-fuzz: $t /" || true
    total=$((total + 1))
  done
done
echo "test-fuzz: all $total targets ran ${seconds}s without a crash"
