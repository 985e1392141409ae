#!/usr/bin/env bash
# Edge benchmark: tabbify-node vs Debian's nginx (proxy_pass + keepalive upstream) in front
# of the same loopback app, driven by wrk. Reports requests/s and p50/p99 per scenario,
# their ratio, and the edge's RSS while 1 GiB streams each way. Reports; never fails on
# the figures.
#
#   perf/edge/run.sh [--runs 3] [--duration 10] [--connections 50] [--out FILE]
#
# Needs: nginx, wrk, curl (scripts/setup.sh installs them). Builds the release binaries.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
for tool in nginx wrk curl python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "perf/edge: '$tool' is missing; run scripts/setup.sh (Debian packages nginx-light, wrk, curl)" >&2
    exit 2
  fi
done
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
echo "perf/edge: building release tabbify-node and edge-upstream" >&2
(cd "$ROOT" && cargo build --release -q -p tabbify-edge --features testkit \
  --bin tabbify-node --example edge-upstream)
exec python3 "$ROOT/perf/edge/bench.py" \
  --node "$TARGET/release/tabbify-node" \
  --upstream "$TARGET/release/examples/edge-upstream" "$@"
