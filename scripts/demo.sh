#!/usr/bin/env bash
# The main job: a working WireGuard mesh on this one machine.
#
#   scripts/demo.sh up     build, then bring up two hosts (network namespaces tabbify-demo-a
#                          and tabbify-demo-b over a veth) each running `tabbify-mesh up`,
#                          with peer ULAs derived from their keys; ping across; print what
#                          to try next.
#   scripts/demo.sh down   stop the joiners (by their recorded PIDs) and remove the namespaces.
#
# Needs root (namespaces, TUN). Traffic stays inside the two namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=/run/tabbify-demo
NS_A=tabbify-demo-a
NS_B=tabbify-demo-b

down() {
  for f in "$STATE"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$f"
  done
  ip netns del "$NS_A" 2>/dev/null || true
  ip netns del "$NS_B" 2>/dev/null || true
  echo "demo: down"
}

up() {
  [ "$(id -u)" = 0 ] || { echo "demo: run as root (namespaces and TUN need it)"; exit 1; }
  scripts/setup.sh
  cargo build --release -p tabbify-dataplane --bin tabbify-mesh
  BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/tabbify-mesh
  down >/dev/null 2>&1 || true
  mkdir -p "$STATE"; chmod 700 "$STATE"
  ip netns add "$NS_A"; ip netns add "$NS_B"
  ip link add tdemo-a type veth peer name tdemo-b
  ip link set tdemo-a netns "$NS_A"; ip link set tdemo-b netns "$NS_B"
  ip -n "$NS_A" addr add 192.168.240.1/30 dev tdemo-a
  ip -n "$NS_B" addr add 192.168.240.2/30 dev tdemo-b
  for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
  ip -n "$NS_A" link set tdemo-a up; ip -n "$NS_B" link set tdemo-b up
  KA=$("$BIN" genkey); KB=$("$BIN" genkey)
  PA=$(echo "$KA" | "$BIN" pubkey); PB=$(echo "$KB" | "$BIN" pubkey)
  UA=$(echo "$PA" | "$BIN" ula); UB=$(echo "$PB" | "$BIN" ula)
  umask 077
  cat > "$STATE/mesh-a.conf" <<CONF
[Interface]
PrivateKey = $KA
ListenPort = 51820
Address = $UA/128
MTU = 1420

[Peer]
PublicKey = $PB
AllowedIPs = $UB/128
Endpoint = 192.168.240.2:51820
PersistentKeepalive = 25
CONF
  cat > "$STATE/mesh-b.conf" <<CONF
[Interface]
PrivateKey = $KB
ListenPort = 51820
Address = $UB/128
MTU = 1420

[Peer]
PublicKey = $PA
AllowedIPs = $UA/128
Endpoint = 192.168.240.1:51820
PersistentKeepalive = 25
CONF
  ip netns exec "$NS_A" nohup "$BIN" up --config "$STATE/mesh-a.conf" >"$STATE/mesh-a.log" 2>&1 &
  echo $! > "$STATE/mesh-a.pid"
  ip netns exec "$NS_B" nohup "$BIN" up --config "$STATE/mesh-b.conf" >"$STATE/mesh-b.log" 2>&1 &
  echo $! > "$STATE/mesh-b.pid"
  for _ in $(seq 50); do
    [ -S /var/run/wireguard/mesh-a.sock ] && [ -S /var/run/wireguard/mesh-b.sock ] && break
    sleep 0.1
  done
  ip netns exec "$NS_A" ping -c 3 -i 0.2 -W 2 "$UB"
  cat <<TXT

demo: up. Two hosts, each with a tabbify-mesh joiner:
  $NS_A  interface mesh-a  ULA $UA   (underlay 192.168.240.1)
  $NS_B  interface mesh-b  ULA $UB   (underlay 192.168.240.2)
Try:
  ip netns exec $NS_A ping $UB
  ip netns exec $NS_A wg show mesh-a
  ip netns exec $NS_B iperf3 -s -D && ip netns exec $NS_A iperf3 -c $UB
  tail $STATE/mesh-a.log
Stop everything with: scripts/demo.sh down
TXT
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 [up|down]"; exit 2 ;;
esac
