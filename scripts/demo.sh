#!/usr/bin/env bash
# The main job: a whole working mesh on this one machine.
#
#   scripts/demo.sh up     set up (scripts/setup.sh), build, then start in network namespaces:
#                            tabbify-demo-pub   a "public" LAN (bridge 10.99.0.0/24) and the
#                                               coordinator with mTLS on 10.99.0.1:8443, its
#                                               STUN server (UDP 8443, 8444) and its relay
#                                               (`--relay`, TCP+UDP 10.99.0.1:8445)
#                            tabbify-demo-sup1  joiner tagged supervisor, hosting the demo app
#                                               on its app ULA port 8730
#                            tabbify-demo-sup2  joiner tagged supervisor
#                            tabbify-demo-node  joiner tagged node + the edge (tabbify-node) on
#                                               10.99.0.21:8090
#                            tabbify-demo-nat   a symmetric NAT router (nftables masquerade
#                                               random,fully-random) on 10.99.0.31, with
#                            tabbify-demo-sup3  behind it (10.99.1.2): a supervisor that
#                                               reaches the others through the relay
#                          The LAN hosts run a stateful firewall on their WireGuard port (UDP
#                          in only on flows they started, like a cloud security group), so they
#                          punch holes to each other (direct) but cannot learn sup3's
#                          per-destination NAT port: sup3's paths are relayed, and
#                          `tabbify-mesh peers` says why.
#                          The host reaches the LAN through veth tdemo-host (10.99.0.254), so
#                          `curl http://10.99.0.21:8090/...` works from here. Certificates come
#                          from tabbify-mesh-ca, join tokens from the coordinator's API.
#                          Prints what to try next.
#   scripts/demo.sh down   stop everything it started (by recorded PIDs) and remove the
#                          namespaces, the host veth and the state in /run/tabbify-demo.
#
# Needs root (namespaces, TUN). Traffic stays inside these namespaces and the host veth.
# DEMO_PROFILE=release builds optimized binaries (slower to build; default: dev).
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=/run/tabbify-demo
PREFIX=tabbify-demo
HOSTS=(sup1 sup2 node)
declare -A ADDR=([sup1]=10.99.0.11 [sup2]=10.99.0.12 [node]=10.99.0.21 [sup3]=10.99.1.2 [phone]=10.99.0.41)
declare -A TAG=([sup1]=supervisor [sup2]=supervisor [node]=node [sup3]=supervisor)
# Every joiner: the LAN hosts, then sup3 behind the symmetric NAT.
MEMBERS=(sup1 sup2 node sup3)
# sup2 is also the concentrator of stock WireGuard clients (the demo's "phone") and the
# subnet router of a LAN (10.98.0.0/24, namespace "lan", a web server on 10.98.0.2:80).
declare -A EXTRA=([sup2]="--concentrator --advertise-routes 10.98.0.0/24")
COORD=10.99.0.1
NAT_WAN=10.99.0.31
WG_PORT=51820
APP_UUID=7d3f6a52-1c4e-4b8a-9e21-5a0c3f9d8b17

stop_pid() {
  local f=$1 pid
  [ -e "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

down() {
  # The phone's stock WireGuard (wg-quick's wireguard-go exits with its interface), the
  # edge and the app, then joiners (they remove their interfaces), then the coordinator.
  if [ -e "$STATE/phone/phone.conf" ]; then
    ip netns exec "$PREFIX-phone" wg-quick down "$STATE/phone/phone.conf" >/dev/null 2>&1 || true
  fi
  for f in "$STATE"/edge.pid "$STATE"/app.pid "$STATE"/lanweb.pid; do stop_pid "$f"; done
  for h in "${MEMBERS[@]}"; do stop_pid "$STATE/$h.pid"; done
  stop_pid "$STATE/coordinator.pid"
  for ns in pub nat phone lan "${MEMBERS[@]}"; do ip netns del "$PREFIX-$ns" 2>/dev/null || true; done
  for ns in "${MEMBERS[@]}"; do rm -rf "/etc/netns/$PREFIX-$ns"; done
  ip link del tdemo-host 2>/dev/null || true
  rm -rf "$STATE"
  echo "demo: down"
}

wait_for() { # what, tries, command...
  local what=$1 tries=$2; shift 2
  for _ in $(seq "$tries"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "demo: timed out waiting for $what" >&2
  return 1
}

up() {
  [ "$(id -u)" = 0 ] || { echo "demo: run as root (namespaces and TUN need it)"; exit 1; }
  scripts/setup.sh
  local profile=${DEMO_PROFILE:-dev} dir
  if [ "$profile" = release ]; then
    cargo build --release -p tabbify-dataplane -p tabbify-control -p tabbify-edge -p tabbify-tests --bins
    dir=release
  else
    cargo build -p tabbify-dataplane -p tabbify-control -p tabbify-edge -p tabbify-tests --bins
    dir=debug
  fi
  local target
  target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  BIN=$target/$dir
  down >/dev/null 2>&1 || true
  mkdir -p "$STATE"; chmod 700 "$STATE"
  umask 077

  # The LAN: a bridge in the public namespace, one veth per host, one for this machine.
  ip netns add "$PREFIX-pub"
  ip -n "$PREFIX-pub" link set lo up
  # A fixed MAC: a bridge otherwise takes its lowest port MAC, which changes as ports join
  # and leaves stale entries in the hosts' ARP caches.
  ip -n "$PREFIX-pub" link add tdemo-br address 02:74:64:00:00:01 type bridge
  ip -n "$PREFIX-pub" addr add "$COORD/24" dev tdemo-br
  ip -n "$PREFIX-pub" link set tdemo-br up
  for h in "${HOSTS[@]}"; do
    ip netns add "$PREFIX-$h"
    ip -n "$PREFIX-$h" link set lo up
    ip link add "tdemo-$h" type veth peer name "tdemo-$h-br"
    ip link set "tdemo-$h" netns "$PREFIX-$h"
    ip link set "tdemo-$h-br" netns "$PREFIX-pub"
    ip -n "$PREFIX-pub" link set "tdemo-$h-br" master tdemo-br up
    ip -n "$PREFIX-$h" addr add "${ADDR[$h]}/24" dev "tdemo-$h"
    ip -n "$PREFIX-$h" link set "tdemo-$h" up
    # A stateful firewall on the WireGuard port: UDP in only on flows this host started.
    ip netns exec "$PREFIX-$h" nft -f - <<NFT
table inet tdemo_fw {
  chain input {
    type filter hook input priority filter; policy accept;
    ip saddr ${ADDR[phone]} udp dport $WG_PORT accept  # the phone dials in to its concentrator
    udp dport $WG_PORT ct state new drop
  }
}
NFT
  done
  # sup3 behind a symmetric NAT: a router on the LAN that gives every destination its own
  # random source port (what STUN classifies as endpoint-dependent).
  ip netns add "$PREFIX-nat"
  ip -n "$PREFIX-nat" link set lo up
  ip link add tdemo-nat type veth peer name tdemo-nat-br
  ip link set tdemo-nat netns "$PREFIX-nat"
  ip link set tdemo-nat-br netns "$PREFIX-pub"
  ip -n "$PREFIX-pub" link set tdemo-nat-br master tdemo-br up
  ip -n "$PREFIX-nat" addr add "$NAT_WAN/24" dev tdemo-nat
  ip -n "$PREFIX-nat" link set tdemo-nat up
  ip netns add "$PREFIX-sup3"
  ip -n "$PREFIX-sup3" link set lo up
  ip link add tdemo-sup3 type veth peer name tdemo-sup3-gw
  ip link set tdemo-sup3 netns "$PREFIX-sup3"
  ip link set tdemo-sup3-gw netns "$PREFIX-nat"
  ip -n "$PREFIX-nat" addr add 10.99.1.1/24 dev tdemo-sup3-gw
  ip -n "$PREFIX-nat" link set tdemo-sup3-gw up
  ip -n "$PREFIX-sup3" addr add "${ADDR[sup3]}/24" dev tdemo-sup3
  ip -n "$PREFIX-sup3" link set tdemo-sup3 up
  ip -n "$PREFIX-sup3" route add default via 10.99.1.1
  ip netns exec "$PREFIX-nat" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$PREFIX-nat" nft -f - <<'NFT'
table ip tdemo_nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "tdemo-nat" masquerade random,fully-random
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "tdemo-nat" ct state new drop
  }
}
NFT
  # A LAN behind sup2 (its subnet router): one host with a web server. sup2 masquerades
  # (--snat, the default), so the LAN host needs no route back into the mesh.
  ip netns add "$PREFIX-lan"
  ip -n "$PREFIX-lan" link set lo up
  ip link add tdemo-lan type veth peer name tdemo-lan-gw
  ip link set tdemo-lan netns "$PREFIX-lan"
  ip link set tdemo-lan-gw netns "$PREFIX-sup2"
  ip -n "$PREFIX-sup2" addr add 10.98.0.1/24 dev tdemo-lan-gw
  ip -n "$PREFIX-sup2" link set tdemo-lan-gw up
  ip -n "$PREFIX-lan" addr add 10.98.0.2/24 dev tdemo-lan
  ip -n "$PREFIX-lan" link set tdemo-lan up
  mkdir -p "$STATE/lanweb"
  echo "hello from 10.98.0.2, a LAN host behind sup2" >"$STATE/lanweb/index.html"
  ip netns exec "$PREFIX-lan" python3 -m http.server 80 --bind 10.98.0.2 \
    --directory "$STATE/lanweb" >"$STATE/lanweb.log" 2>&1 &
  echo $! > "$STATE/lanweb.pid"
  ip link add tdemo-host type veth peer name tdemo-host-br
  ip link set tdemo-host-br netns "$PREFIX-pub"
  ip -n "$PREFIX-pub" link set tdemo-host-br master tdemo-br up
  ip addr add 10.99.0.254/24 dev tdemo-host
  ip link set tdemo-host up

  # PKI: the mesh CA, the coordinator's server certificate, a client certificate per host.
  "$BIN/tabbify-mesh-ca" init --out "$STATE/ca" >/dev/null
  "$BIN/tabbify-mesh-ca" issue-coordinator --name coordinator --san "$COORD" --ca-dir "$STATE/ca" --out "$STATE/coordinator" >/dev/null
  # The admin's certificate carries the admin role (a peer certificate never does).
  "$BIN/tabbify-mesh-ca" issue-admin --name admin --ca-dir "$STATE/ca" --out "$STATE/admin" >/dev/null
  for n in "${MEMBERS[@]}"; do
    "$BIN/tabbify-mesh-ca" issue-peer --name "$n" --ca-dir "$STATE/ca" --out "$STATE/$n" >/dev/null
  done
  cat > "$STATE/policy.json" <<'JSON'
{
  "tags": ["supervisor", "node", "phone"],
  "app_hosts": ["tag:supervisor"],
  "routes": {"10.98.0.0/24": ["tag:supervisor"]},
  "allow": [
    {"src": ["tag:supervisor"], "dst": ["tag:supervisor", "10.98.0.0/24"]},
    {"src": ["tag:node"], "dst": ["10.98.0.0/24:tcp:80"]},
    {"src": ["tag:node"], "dst": ["tag:supervisor:8730"]},
    {"src": ["tag:phone"], "dst": ["tag:supervisor:8730"]}
  ]
}
JSON
  ip netns exec "$PREFIX-pub" "$BIN/tabbify-mesh-coordinator" --bind "$COORD:8443" \
    --tls-cert "$STATE/coordinator/cert.pem" --tls-key "$STATE/coordinator/key.pem" \
    --tls-ca "$STATE/ca/ca.pem" --policy-file "$STATE/policy.json" \
    --state-dir "$STATE/coordinator-state" \
    --relay --relay-bind "$COORD:8445" --relay-public-url "https://$COORD:8445" \
    >"$STATE/coordinator.log" 2>&1 &
  echo $! > "$STATE/coordinator.pid"
  wait_for "the coordinator" 50 grep -q "listening on" "$STATE/coordinator.log"

  admin() {
    curl -sS --fail-with-body --cert "$STATE/admin/cert.pem" --key "$STATE/admin/key.pem" \
      --cacert "$STATE/ca/ca.pem" "$@"
  }
  for h in "${MEMBERS[@]}"; do
    local token
    token=$(admin -X POST "https://$COORD:8443/v1/tokens" -H 'content-type: application/json' \
      -d "{\"tags\": [\"${TAG[$h]}\"], \"name\": \"$h\", \"ttl_secs\": 600, \"max_uses\": 1}" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    (umask 077 && printf '%s\n' "$token" >"$STATE/$h/token")
    # Mesh DNS (--dns file) edits the namespace's own resolv.conf, never this machine's:
    # `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf.
    mkdir -p "/etc/netns/$PREFIX-$h"
    grep -v '^#' /etc/resolv.conf >"/etc/netns/$PREFIX-$h/resolv.conf" || true
    ip netns exec "$PREFIX-$h" "$BIN/tabbify-mesh" join \
      --name "$h" --tag "${TAG[$h]}" --coordinator "https://$COORD:8443" \
      --join-token-file "$STATE/$h/token" \
      --tls-cert "$STATE/$h/cert.pem" --tls-key "$STATE/$h/key.pem" --tls-ca "$STATE/ca/ca.pem" \
      --interface "tmd-$h" --state-dir "$STATE/$h/state" --threads 1 --dns file \
      ${EXTRA[$h]:-} >"$STATE/$h.log" 2>&1 &
    echo $! > "$STATE/$h.pid"
  done
  for h in "${MEMBERS[@]}"; do
    wait_for "$h to register" 100 sh -c \
      "ip netns exec $PREFIX-$h $BIN/tabbify-mesh status -i tmd-$h --json | grep -q '\"registered\": true'"
  done

  # The demo app on supervisor 1's app ULA, and the edge on the node.
  local app_ula
  app_ula=$(ip netns exec "$PREFIX-sup1" "$BIN/tabbify-mesh" app add "$APP_UUID" -i tmd-sup1)
  ip netns exec "$PREFIX-sup1" "$BIN/tabbify-testapp" "[$app_ula]:8730" demo-app >"$STATE/app.log" 2>&1 &
  echo $! > "$STATE/app.pid"
  wait_for "the demo app" 50 grep -q listening "$STATE/app.log"
  local key
  key=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
  echo "$key" > "$STATE/edge.key"
  TABBIFY_NODE_KEY=$key ip netns exec "$PREFIX-node" "$BIN/tabbify-node" --bind "${ADDR[node]}:8090" \
    >"$STATE/edge.log" 2>&1 &
  echo $! > "$STATE/edge.pid"
  wait_for "the edge" 50 curl -sf "http://${ADDR[node]}:8090/health"
  wait_for "the app route on the node" 50 sh -c "ip -n $PREFIX-node -6 route show dev tmd-node | grep -q '^$app_ula'"

  # sup3's paths: relayed (its NAT is endpoint-dependent; the LAN hosts' firewalls refuse
  # what it sends from ports they never sent to).
  wait_for "sup3's relayed path to sup1" 150 sh -c \
    "ip netns exec $PREFIX-sup3 $BIN/tabbify-mesh peers -i tmd-sup3 --json | python3 -c 'import json,sys; sys.exit(0 if any(p[\"name\"] == \"sup1\" and p[\"path\"] == \"relay\" for p in json.load(sys.stdin)) else 1)'"
  # A phone: the stock WireGuard app, played by wg-quick (wireguard-go without the kernel
  # module) in its own namespace on the LAN, from a file the coordinator mints.
  local certs="--coordinator https://$COORD:8443 --tls-cert $STATE/admin/cert.pem --tls-key $STATE/admin/key.pem --tls-ca $STATE/ca/ca.pem"
  ip netns add "$PREFIX-phone"
  ip -n "$PREFIX-phone" link set lo up
  ip link add tdemo-phone type veth peer name tdemo-phone-br
  ip link set tdemo-phone netns "$PREFIX-phone"
  ip link set tdemo-phone-br netns "$PREFIX-pub"
  ip -n "$PREFIX-pub" link set tdemo-phone-br master tdemo-br up
  ip -n "$PREFIX-phone" addr add "${ADDR[phone]}/24" dev tdemo-phone
  ip -n "$PREFIX-phone" link set tdemo-phone up
  mkdir -p "$STATE/phone"
  # shellcheck disable=SC2086
  "$BIN/tabbify-mesh-coordinator" client add phone --tag phone --concentrator sup2 \
    --endpoint "${ADDR[sup2]}:$WG_PORT" --no-dns --out "$STATE/phone" $certs >"$STATE/phone/qr.txt"
  ip netns exec "$PREFIX-phone" wg-quick up "$STATE/phone/phone.conf" >"$STATE/phone.log" 2>&1
  local ula1 ula2 ula3
  ula3=$(ip netns exec "$PREFIX-sup3" "$BIN/tabbify-mesh" status -i tmd-sup3 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ula"])')
  ula1=$(ip netns exec "$PREFIX-sup1" "$BIN/tabbify-mesh" status -i tmd-sup1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ula"])')
  ula2=$(ip netns exec "$PREFIX-sup2" "$BIN/tabbify-mesh" status -i tmd-sup2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ula"])')
  echo
  echo "demo: up. A coordinator with a relay, three supervisors (sup3 behind a symmetric NAT) and a node,"
  echo "an app on $app_ula, the edge on ${ADDR[node]}:8090."
  echo
  echo "Through the edge to the app (from this machine):"
  echo "  curl -H 'Authorization: Bearer $key' http://${ADDR[node]}:8090/app/$APP_UUID/echo"
  echo "  curl -H 'Authorization: Bearer $key' http://${ADDR[node]}:8090/app/$APP_UUID/bytes/1000000 | wc -c"
  echo "The mesh (supervisors may reach each other on every port; the node only supervisors' port 8730):"
  echo "  ip netns exec $PREFIX-sup1 ping -c3 $ula2"
  echo "  ip netns exec $PREFIX-node ping -c1 -W1 $ula1        # refused by the data-plane filter"
  echo "  ip netns exec $PREFIX-node curl http://[$app_ula]:8730/echo"
  echo "  ip netns exec $PREFIX-sup1 dig AAAA sup2.mesh @fd5a:1f00::53 +short   # mesh DNS"
  echo "  ip netns exec $PREFIX-sup1 getent ahosts $APP_UUID.app.mesh"
  echo "  ip netns exec $PREFIX-sup1 $BIN/tabbify-mesh status -i tmd-sup1"
  echo "  ip netns exec $PREFIX-sup1 curl -s http://127.0.0.1:9587/metrics | grep peer_rx   # joiner metrics"
  echo "  ip netns exec $PREFIX-sup1 wg show tmd-sup1"
  echo "  ip netns exec $PREFIX-sup1 $BIN/tabbify-mesh speedtest sup2 -i tmd-sup1 --duration 2s   # over the mesh, no iperf3"
  echo "The coordinator, as the admin:"
  echo "  $BIN/tabbify-mesh-coordinator policy test node sup1 tcp:22 $certs   # which rule decides"
  echo "  $BIN/tabbify-mesh-coordinator admin-login $certs   # a one-time dashboard link (the CA is the demo's own: accept it in the browser)"
  echo "  curl -s --cacert $STATE/ca/ca.pem https://$COORD:8443/health   # no client certificate needed"
  echo "A phone with the stock WireGuard app (wg-quick here), minted by the coordinator, through concentrator sup2:"
  echo "  cat $STATE/phone/qr.txt; cat $STATE/phone/phone.conf   # scan it, or use the file"
  echo "  ip netns exec $PREFIX-phone curl http://[$app_ula]:8730/echo   # its tag may reach supervisors' 8730"
  echo "  ip netns exec $PREFIX-phone ping -c1 -W1 $ula1        # and nothing else"
  echo "  $BIN/tabbify-mesh-coordinator client list $certs"
  echo "  $BIN/tabbify-mesh-coordinator client revoke phone $certs   # cut within a second"
  echo "A subnet router: sup2 advertises 10.98.0.0/24 (approved by the policy's routes); supervisors may use all"
  echo "of it, the node only tcp:80 (a prefix rule with ports):"
  echo "  ip netns exec $PREFIX-node curl -s http://10.98.0.2/"
  echo "  ip netns exec $PREFIX-node ping -c1 -W1 10.98.0.2    # refused: its rule opens tcp:80 only"
  echo "  ip netns exec $PREFIX-sup1 ping -c2 10.98.0.2"
  echo "Paths (direct between the LAN hosts; sup3, behind the symmetric NAT, through the relay, with the reason):"
  echo "  ip netns exec $PREFIX-sup3 ping -c3 $ula1"
  echo "  ip netns exec $PREFIX-sup3 $BIN/tabbify-mesh peers -i tmd-sup3"
  echo "  ip netns exec $PREFIX-sup1 $BIN/tabbify-mesh peers -i tmd-sup1 --json"
  echo "Logs: $STATE/*.log.  Tear down: scripts/demo.sh down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
