#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: the system packages and cargo tools that the
# mesh, its tests and its benchmarks need. Safe to run again; skips what is present.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip            || need_apt+=(iproute2)
have iperf3        || need_apt+=(iperf3)
have ping          || need_apt+=(iputils-ping)
have wireguard-go  || need_apt+=(wireguard-go)
have wg            || need_apt+=(wireguard-tools)
have nft           || need_apt+=(nftables)
have iptables      || need_apt+=(iptables)
have nginx         || need_apt+=(nginx-light)
have wrk           || need_apt+=(wrk)
have ethtool       || need_apt+=(ethtool)
have curl          || need_apt+=(curl)
have turnserver    || need_apt+=(coturn)   # a standard STUN server for the joiner's --stun test
have dig           || need_apt+=(bind9-dnsutils)  # mesh DNS test (issue 15)
have dnsmasq       || need_apt+=(dnsmasq-base)    # the mesh DNS test's upstream resolver
have dbus-daemon   || need_apt+=(dbus-daemon)     # a private system bus for the confined systemd-resolved
{ have unshare && have nsenter; } || need_apt+=(util-linux)  # private mount namespaces (host DNS tests)
# PostgreSQL server binaries (initdb, pg_ctl): the coordinator's PostgreSQL engine tests start
# a throwaway cluster from /usr/lib/postgresql/*/bin (tests/src/postgres.rs).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_apt+=(postgresql)
python3 -c 'import matplotlib' 2>/dev/null || need_apt+=(python3-matplotlib)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [[ " ${need_apt[*]} " == *" postgresql "* ]]; then
    # Only the binaries are wanted: no system cluster started on port 5432.
    mkdir -p /etc/postgresql-common
    grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf ||
      echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

# The host DNS tests (tests/tests/host_dns.rs) run Debian's systemd-resolved and openresolv
# confined to a test namespace. Installing either package would take over this machine's
# /etc/resolv.conf, so they are only downloaded and unpacked under target/host-dns/ (merged-/usr
# layout; the tests lay <package>/usr over /usr in a private mount namespace). systemd-resolved
# comes with the libsystemd-shared of its own version.
host_dns="$(cd "$(dirname "$0")/.." && pwd)/target/host-dns"
unpack_deb() { # unpack_deb DIR PACKAGE...: apt-get download + dpkg-deb -x into DIR/usr
  local dir="$host_dns/$1"; shift
  [ -d "$dir/usr" ] && return 0
  echo "setup: unpacking $* into $dir (downloaded, not installed)"
  rm -rf "$dir.tmp"
  local dl; dl="$(mktemp -d)"
  chown _apt "$dl" 2>/dev/null || true # apt downloads as _apt when it can write there
  (cd "$dl" && apt-get download -q "$@" 2>/dev/null) ||
    { apt-get update -q && (cd "$dl" && apt-get download -q "$@"); }
  mkdir -p "$dir.tmp"
  for deb in "$dl"/*.deb; do dpkg-deb -x "$deb" "$dir.tmp"; done
  for d in bin sbin lib lib64; do
    if [ -d "$dir.tmp/$d" ] && [ ! -L "$dir.tmp/$d" ]; then
      mkdir -p "$dir.tmp/usr/$d"
      cp -a "$dir.tmp/$d/." "$dir.tmp/usr/$d/"
      rm -rf "${dir:?}.tmp/$d"
    fi
  done
  rm -rf "$dl" "$dir"
  mv "$dir.tmp" "$dir"
}
unpack_deb systemd-resolved systemd-resolved libsystemd-shared
unpack_deb openresolv openresolv

if ! have boringtun-cli || ! boringtun-cli --version 2>/dev/null | grep -q '0\.7\.1'; then
  echo "setup: installing boringtun-cli 0.7.1 from crates.io"
  cargo install boringtun-cli --version 0.7.1 --locked
fi

# Perf-only tools (perf/README.md): gotatun-cli compiles for minutes and no test needs it,
# so only a machine that runs the perf suite installs it; without it the suite reports
# gotatun as "not available". wireguard-go v0.0.20250522 (wireguard-go-offload) comes from
# the Go module proxy where it is reachable; elsewhere it is given by path, see perf/README.md.
if [ "${TABBIFY_SETUP_PERF:-0}" = 1 ]; then
  # `tabbify-perf profile` records both daemons with perf (Debian's linux-perf).
  if ! have perf; then
    echo "setup: installing linux-perf (tabbify-perf profile)"
    apt-get install -y --no-install-recommends linux-perf
  fi
  if ! have gotatun || ! gotatun --version 2>/dev/null | grep -q '0\.10\.2'; then
    echo "setup: installing gotatun-cli 0.10.2 from crates.io"
    cargo install gotatun-cli --version 0.10.2 --locked
  fi
  if ! have wireguard-go-offload && have go; then
    echo "setup: building wireguard-go v0.0.20250522 as wireguard-go-offload"
    GOBIN=/tmp/tabbify-wggo go install golang.zx2c4.com/wireguard@v0.0.20250522 &&
      install -m 0755 /tmp/tabbify-wggo/wireguard /usr/local/bin/wireguard-go-offload ||
      echo "setup: wireguard-go v0.0.20250522 not built (no Go module proxy?); perf reports it as not available"
  fi
fi

# The .deb packages (scripts/test-packages.sh, packaging/README.md): cargo-deb, pinned.
if [ "${TABBIFY_SETUP_PACKAGES:-0}" = 1 ] &&
  ! cargo deb --version 2>/dev/null | grep -q '3\.8\.0'; then
  echo "setup: installing cargo-deb 3.8.0 from crates.io"
  cargo install cargo-deb --locked --version 3.8.0
fi

if [ "${TABBIFY_SETUP_FUZZ:-0}" = 1 ] && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# The dashboard's browser test (scripts/test-ui.sh): Debian's chromium, and Playwright plus
# axe-core (pinned) in a venv under target/ (Playwright drives /usr/bin/chromium; it never
# downloads a browser).
if [ "${TABBIFY_SETUP_UI:-0}" = 1 ]; then
  if ! have chromium; then
    echo "setup: installing chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium || {
      apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }
  fi
  ui_venv="$(dirname "$0")/../target/ui-venv"
  if ! "$ui_venv/bin/python" -c 'import playwright, axe_playwright_python' 2>/dev/null; then
    echo "setup: installing playwright 1.65.2 and axe-playwright-python 0.1.8 into target/ui-venv"
    python3 -m venv "$ui_venv"
    "$ui_venv/bin/pip" install --quiet playwright==1.65.2 axe-playwright-python==0.1.8
  fi
fi

if [ "${TABBIFY_SETUP_SCHEMATHESIS:-0}" = 1 ] && ! have st; then
  echo "setup: installing schemathesis"
  pip install --quiet schemathesis
fi
