#!/usr/bin/env bash
# The .deb packages and their systemd units (issue 16, "Packages and services"):
# 1. builds the five packages with cargo-deb from the debug binaries (`cargo build` first;
#    a release package is `cargo deb -p CRATE` alone, see packaging/README.md);
# 2. checks each with `dpkg-deb --info` (name, Depends, conffiles, maintainer scripts) and
#    `dpkg-deb --contents` (the binary, the unit, the example configuration);
# 3. checks every unit with `systemd-analyze verify` and prints its
#    `systemd-analyze security` exposure score (failing above MAX_EXPOSURE);
# 4. unpacks all five into a fresh dpkg root (`dpkg --root DIR --unpack`) and checks that
#    the files land with their modes and that the units carry the hardening they promise;
# 5. runs the unpacked tabbify-mesh against the unpacked /etc/tabbify/join.toml (a key
#    map that parses) and the unpacked coordinator's --help.
# Needs cargo-deb (`TABBIFY_SETUP_PACKAGES=1 scripts/setup.sh`), dpkg-deb and systemd-analyze.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
MAX_EXPOSURE="${MAX_EXPOSURE:-5.0}"

fail() { echo "test-packages: FAIL: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || fail "dpkg-deb is missing; install it with: apt-get install dpkg"
command -v systemd-analyze >/dev/null || fail "systemd-analyze is missing; install it with: apt-get install systemd"
cargo deb --version >/dev/null 2>&1 ||
  fail "cargo-deb is missing; install it with: TABBIFY_SETUP_PACKAGES=1 scripts/setup.sh (cargo install cargo-deb --locked --version 3.8.0)"

work=$(mktemp -d /tmp/tabbify-test-packages.XXXXXX)
trap 'rm -rf "$work"' EXIT
out="$work/debs"
mkdir -p "$out"

echo "== build (debug)"
# The whole workspace, as scripts/test.sh builds it: the same feature set, so nothing rebuilds.
nice cargo build --workspace --bins

# crate [variant] -> package
specs=("tabbify-dataplane::tabbify-mesh" "tabbify-control::tabbify-mesh-coordinator"
  "tabbify-control:ca:tabbify-mesh-ca" "tabbify-edge::tabbify-node" "tabbify-relay::tabbify-mesh-relay")
for spec in "${specs[@]}"; do
  IFS=: read -r crate variant pkg <<<"$spec"
  echo "== cargo deb $pkg"
  args=(-p "$crate" --no-build --profile dev --no-strip --fast --output "$out/$pkg.deb")
  [ -n "$variant" ] && args+=(--variant "$variant")
  cargo deb "${args[@]}" >/dev/null
done

check_info() { # pkg pattern...
  local pkg=$1; shift
  local info
  info=$(dpkg-deb --info "$out/$pkg.deb")
  for pat in "$@"; do
    grep -qE "$pat" <<<"$info" || fail "$pkg: dpkg-deb --info has no /$pat/:
$info"
  done
}
check_contents() { # pkg path...
  local pkg=$1; shift
  local list
  list=$(dpkg-deb --contents "$out/$pkg.deb")
  for p in "$@"; do
    grep -qE " \./$p\$" <<<"$list" || fail "$pkg: no $p in dpkg-deb --contents:
$list"
  done
}

echo "== dpkg-deb --info / --contents"
check_info tabbify-mesh "Package: tabbify-mesh$" "Depends:.*iproute2" "Depends:.*nftables" "conffiles" "postinst" "prerm"
check_contents tabbify-mesh usr/bin/tabbify-mesh etc/tabbify/join.toml "(lib|usr/lib)/systemd/system/tabbify-mesh.service"
check_info tabbify-mesh-coordinator "Package: tabbify-mesh-coordinator$" "conffiles" "postinst"
check_contents tabbify-mesh-coordinator usr/bin/tabbify-mesh-coordinator etc/tabbify/coordinator.env \
  etc/tabbify/policy.json usr/lib/sysusers.d/tabbify-mesh-coordinator.conf \
  "(lib|usr/lib)/systemd/system/tabbify-mesh-coordinator.service"
check_info tabbify-mesh-ca "Package: tabbify-mesh-ca$"
check_contents tabbify-mesh-ca usr/bin/tabbify-mesh-ca
if dpkg-deb --contents "$out/tabbify-mesh-ca.deb" | grep -q '\.service$'; then
  fail "tabbify-mesh-ca ships a unit (it is a command)"
fi
check_info tabbify-node "Package: tabbify-node$" "conffiles"
check_contents tabbify-node usr/bin/tabbify-node etc/tabbify/node.env etc/tabbify/routes \
  "(lib|usr/lib)/systemd/system/tabbify-node.service"
check_info tabbify-mesh-relay "Package: tabbify-mesh-relay$" "conffiles"
check_contents tabbify-mesh-relay usr/bin/tabbify-mesh-relay etc/tabbify/relay.env \
  usr/lib/sysusers.d/tabbify-mesh-relay.conf "(lib|usr/lib)/systemd/system/tabbify-mesh-relay.service"
for pkg in tabbify-mesh tabbify-mesh-coordinator tabbify-node tabbify-mesh-relay; do
  conf=$(dpkg-deb --ctrl-tarfile "$out/$pkg.deb" | tar -xO ./conffiles)
  grep -q '^/etc/tabbify/' <<<"$conf" || fail "$pkg: /etc/tabbify files are not conffiles: $conf"
done
dpkg-deb --info "$out/tabbify-mesh.deb" | sed -n '/Package:/,/Description:/p'

echo "== unpack into a fresh dpkg root"
inst="$work/root"
mkdir -p "$inst/var/lib/dpkg/info" "$inst/var/lib/dpkg/updates"
touch "$inst/var/lib/dpkg/status"
# --unpack places the files and runs no postinst (which would run chrooted, with no shell
# in an empty root); the configure step's user creation is checked by reading its script.
dpkg --root="$inst" --force-not-root --force-depends --log=/dev/null --unpack "$out"/*.deb >/dev/null
for pkg in tabbify-mesh tabbify-mesh-coordinator tabbify-mesh-ca tabbify-node tabbify-mesh-relay; do
  dpkg --root="$inst" -s "$pkg" | grep -q '^Status: install ok unpacked' || fail "$pkg not unpacked"
done
# A conffile waits as FILE.dpkg-new until the configure step.
at() { if [ -e "$inst/$1" ]; then echo "$inst/$1"; else echo "$inst/$1.dpkg-new"; fi; }
mode() { stat -c %a "$(at "$1")"; }
[ "$(mode usr/bin/tabbify-mesh)" = 755 ] || fail "usr/bin/tabbify-mesh mode $(mode usr/bin/tabbify-mesh)"
for f in etc/tabbify/join.toml etc/tabbify/coordinator.env etc/tabbify/node.env etc/tabbify/relay.env; do
  [ "$(mode "$f")" = 600 ] || fail "$f is $(mode "$f"), expected 600 (it holds secrets' paths or a key)"
done
unitdir=$(dirname "$(find "$inst" -name tabbify-mesh.service | head -1)")
[ -n "$unitdir" ] || fail "no unit unpacked"
grep -q 'systemd-sysusers' "$inst/var/lib/dpkg/info/tabbify-mesh-coordinator.postinst" ||
  fail "the coordinator's postinst creates no user"

echo "== the unpacked programs run"
"$inst/usr/bin/tabbify-mesh" --version
"$inst/usr/bin/tabbify-mesh-coordinator" --help >/dev/null
"$inst/usr/bin/tabbify-mesh-ca" --help >/dev/null
# The shipped join.toml is all comments: it parses, and join stops only for the missing name.
msg=$("$inst/usr/bin/tabbify-mesh" join --config "$(at etc/tabbify/join.toml)" 2>&1 || true)
grep -q -- "--name" <<<"$msg" || fail "the shipped join.toml: $msg"
# The shipped policy parses as the coordinator's policy (it stops later, at the TLS files).
msg=$("$inst/usr/bin/tabbify-mesh-coordinator" --bind 127.0.0.1:0 --policy-file "$(at etc/tabbify/policy.json)" \
  --tls-cert /nonexistent/c --tls-key /nonexistent/k --tls-ca /nonexistent/ca 2>&1 || true)
grep -q "reading /nonexistent/c" <<<"$msg" || fail "the shipped policy.json: $msg"

echo "== systemd-analyze verify / security"
for unit in tabbify-mesh tabbify-mesh-coordinator tabbify-node tabbify-mesh-relay; do
  f="$unitdir/$unit.service"
  # verify resolves ExecStart= against the real file system: point it at the unpacked
  # binary (same unit otherwise).
  v="$work/verify/$unit.service"
  mkdir -p "$work/verify"
  sed "s#/usr/bin/#$inst/usr/bin/#" "$f" >"$v"
  if ! vout=$(systemd-analyze verify --man=no "$v" 2>&1); then
    fail "systemd-analyze verify $unit.service:
$vout"
  fi
  # Warnings about the host (no such user yet, ConditionPath…) are not the unit's fault;
  # anything naming the unit file's own lines is.
  if grep -E "$unit\.service:[0-9]+:" <<<"$vout"; then
    fail "systemd-analyze verify $unit.service warns about its own lines"
  fi
  score=$(systemd-analyze security --offline=true "$v" 2>/dev/null | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  [ -n "$score" ] || fail "systemd-analyze security gave no score for $unit"
  echo "$unit.service: systemd-analyze security exposure $score"
  awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }' ||
    fail "$unit.service: exposure $score above $MAX_EXPOSURE"
  for key in NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes CapabilityBoundingSet= ; do
    grep -q "^$key" "$f" || fail "$unit.service has no $key"
  done
done
grep -q '^CapabilityBoundingSet=CAP_NET_ADMIN' "$unitdir/tabbify-mesh.service" || fail "joiner: bounding set"
grep -q '^AmbientCapabilities=CAP_NET_ADMIN' "$unitdir/tabbify-mesh.service" || fail "joiner: ambient caps"
grep -q '^DynamicUser=yes' "$unitdir/tabbify-node.service" || fail "edge: DynamicUser"
grep -q '^User=tabbify-coordinator' "$unitdir/tabbify-mesh-coordinator.service" || fail "coordinator: user"
grep -q '^User=tabbify-relay' "$unitdir/tabbify-mesh-relay.service" || fail "relay: user"
# Reload only where SIGHUP is handled (elsewhere it would kill the service).
for unit in tabbify-mesh-coordinator tabbify-mesh; do
  grep -q '^ExecReload=/bin/kill -HUP $MAINPID' "$unitdir/$unit.service" ||
    fail "$unit: ExecReload"
done
for unit in tabbify-node tabbify-mesh-relay; do
  if grep -q '^ExecReload=' "$unitdir/$unit.service"; then
    fail "$unit: ExecReload, but the program does not handle SIGHUP"
  fi
done
echo "test-packages: 5 packages built, checked, unpacked; 4 units verified"
