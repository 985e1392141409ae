#!/usr/bin/env bash
# Measures one relay process forwarding UDP relay frames between two client processes on
# loopback (relay/README.md): throughput at the receiver (Gbit/s of frames) and the relay's
# CPU per Gbit/s (utime+stime from /proc/PID/stat over the run). Three runs; prints each and
# the medians. Holds /work/perf.lock (or $PERF_LOCK) around every run.
#
#   relay/measure.sh [SECONDS=10] [SIZE=1400] [udp|stream]
#
# Builds the release relay and the load example first (cargo build --release -p tabbify-relay).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
size="${2:-1400}"
transport="${3:-udp}"
flag=""; [ "$transport" = stream ] && flag="--stream"
lock="${PERF_LOCK:-/work/perf.lock}"
# RELAY_PROFILE=dev: a quick check of this script with the debug build (not a measurement).
profile="${RELAY_PROFILE:-release}"
dir=release; [ "$profile" = dev ] && dir=debug
nice cargo build --profile "$profile" -p tabbify-relay --bin tabbify-mesh-relay --example relay_load
relay_bin=target/$dir/tabbify-mesh-relay
load_bin=target/$dir/examples/relay_load
ca_bin=target/debug/tabbify-mesh-ca
[ -x "$ca_bin" ] || { echo "measure: build tabbify-mesh-ca first: cargo build -p tabbify-control" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
"$ca_bin" init --out "$work/ca" >/dev/null
"$ca_bin" issue-coordinator --name relay.mesh.test --san 127.0.0.1 --ca-dir "$work/ca" --out "$work/relay" >/dev/null
for n in sender receiver; do
  "$ca_bin" issue-peer --name "$n" --ca-dir "$work/ca" --out "$work/$n" >/dev/null
done
cp "$work/ca/ca.pem" "$work/ca.pem"
port=$((20000 + RANDOM % 20000))
hz=$(getconf CLK_TCK)
results=()
for run in 1 2 3; do
  flock "$lock" bash -c '
    set -euo pipefail
    work='"$work"'; port='"$port"'; run='"$run"'
    '"$relay_bin"' --listen 127.0.0.1:$port --tls-cert $work/relay/cert.pem --tls-key $work/relay/key.pem \
      --tls-ca $work/ca.pem --metrics-bind 127.0.0.1:0 --rate-mbit 1000000 >$work/relay.log 2>&1 &
    rp=$!
    trap "kill $rp 2>/dev/null || true" EXIT
    for i in $(seq 50); do grep -q "^listening" $work/relay.log && break; sleep 0.1; done
    '"$load_bin"' recv --relay 127.0.0.1:$port --certs $work --name receiver --seconds '"$seconds"' '"$flag"' >$work/recv.out &
    rcv=$!
    for i in $(seq 50); do grep -q "^key" $work/recv.out && break; sleep 0.1; done
    key=$(awk "/^key/ {print \$2}" $work/recv.out)
    read -r u0 s0 < <(awk "{print \$14, \$15}" /proc/$rp/stat)
    t0=$(date +%s.%N)
    '"$load_bin"' send --relay 127.0.0.1:$port --certs $work --name sender --peer $key --seconds '"$seconds"' --size '"$size"' '"$flag"' >/dev/null
    read -r u1 s1 < <(awk "{print \$14, \$15}" /proc/$rp/stat)
    t1=$(date +%s.%N)
    wait $rcv
    gbps=$(awk "/^bytes/ {print \$6}" $work/recv.out)
    cpu=$(echo "($u1 + $s1 - $u0 - $s0) / '"$hz"' / ($t1 - $t0)" | bc -l)
    per=$(echo "$cpu / $gbps" | bc -l)
    printf "run %s: %.2f Gbit/s, relay CPU %.2f cores, %.3f cores per Gbit/s\n" $run $gbps $cpu $per
    echo "$gbps $cpu $per" > $work/run$run
  '
  port=$((port + 1))
done
cat "$work"/run[123] | sort -n -k1 | sed -n 2p | awk '{printf "median throughput: %.2f Gbit/s\n", $1}'
cat "$work"/run[123] | sort -n -k3 | sed -n 2p | awk '{printf "median relay CPU per Gbit/s: %.3f cores\n", $3}'
