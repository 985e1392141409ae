#!/usr/bin/env bash
# The perf suite in one command: builds our data plane (release) and the runner, then runs
# iperf3 TCP 1/4 streams, UDP (its own GSO sender, and iperf3) and ping between two network namespaces through
# ours (io_uring and epoll drivers), boringtun-cli 0.7.1 (--threads 1 and default),
# wireguard-go (Debian's, and v0.0.20250522 with offloads), gotatun-cli 0.10.2 and the bare
# veth, with each one's Gbit/s per daemon core against the crypto bound. Needs root and
# scripts/setup.sh's packages (TABBIFY_SETUP_PERF=1 for gotatun; missing ones are reported
# as not available).
#
#   perf/run.sh [--rounds N] [--duration S] [--only a,b] [--ours-threads N] [--offloads on|off]
#               [--wireguard-go-offload-bin PATH] [--udp-offer-gbps G]
#
# Writes perf/results/<timestamp>.json and .png and refreshes the results in perf/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

if cargo build --release -p tabbify-dataplane --bin tabbify-mesh; then
  export TABBIFY_MESH_BIN="${TABBIFY_MESH_BIN:-$target/release/tabbify-mesh}"
else
  echo "perf/run.sh: building tabbify-mesh failed; ours will be reported as FAILED" >&2
  export TABBIFY_MESH_BIN="${TABBIFY_MESH_BIN:-$target/release/tabbify-mesh-not-built}"
fi
cargo build -p tabbify-perf
exec "$target/debug/tabbify-perf" --out perf/results --update-readme perf/README.md "$@"
