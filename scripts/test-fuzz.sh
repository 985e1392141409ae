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

# Build every project first, then run the targets FUZZ_JOBS at a time (default: one per
# core): each run is one single-threaded libFuzzer process, started directly from the build
# directory so the runs do not queue on cargo's build-directory lock.
runs=()
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
    runs+=("$project $t")
  done
done

bin_dir="$CARGO_TARGET_DIR/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
jobs="${FUZZ_JOBS:-$(nproc)}"

# One target: its committed seeds plus a fresh directory for new inputs. Exit status 0 = no
# crash; the log is kept in $work for the report.
run_one() {
  local project=$1 t=$2
  local seeds="$root/$project/corpus/$t"
  mkdir -p "$work/$t"
  local args=("$work/$t")
  [ -d "$seeds" ] && args+=("$seeds")
  # -max_len: room for a 64 KiB super-packet plus its vnet header.
  (cd "$root/$project" &&
    "$bin_dir/$t" "${args[@]}" -artifact_prefix="$root/$project/artifacts/$t/" \
      -max_total_time="$seconds" -max_len=65600 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1) >"$work/$t.log" 2>&1
}

total=0
failed=()
declare -A running=()
# report PID STATUS: count a finished run, or print its log when it crashed.
report() {
  local pid=$1 status=$2 project t
  read -r project t <<<"${running[$pid]}"
  unset "running[$pid]"
  if [ "$status" = 0 ]; then
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$work/$t.log" | sed "s/^/test-fuzz: $t /" || true
    total=$((total + 1))
  else
    tail -n 60 "$work/$t.log" >&2
    echo "test-fuzz: FAIL: target $t crashed; reproducer under $project/artifacts/$t/" >&2
    failed+=("$t")
  fi
}
for run in "${runs[@]}"; do
  read -r project t <<<"$run"
  while [ "${#running[@]}" -ge "$jobs" ]; do
    status=0
    wait -n -p done_pid "${!running[@]}" || status=$?
    report "$done_pid" "$status"
  done
  mkdir -p "$root/$project/artifacts/$t"
  echo "test-fuzz: $project $t for ${seconds}s"
  run_one "$project" "$t" &
  running[$!]="$project $t"
done
for pid in "${!running[@]}"; do
  status=0
  wait "$pid" || status=$?
  report "$pid" "$status"
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "test-fuzz: FAIL: ${#failed[@]} target(s) crashed: ${failed[*]}" >&2
  exit 1
fi
echo "test-fuzz: all $total targets ran ${seconds}s without a crash ($jobs at a time)"
