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

if ! have boringtun-cli || ! boringtun-cli --version 2>/dev/null | grep -q '0\.7\.1'; then
  echo "setup: installing boringtun-cli 0.7.1 from crates.io"
  cargo install boringtun-cli --version 0.7.1 --locked
fi

if [ "${TABBIFY_SETUP_FUZZ:-0}" = 1 ] && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

if [ "${TABBIFY_SETUP_SCHEMATHESIS:-0}" = 1 ] && ! have st; then
  echo "setup: installing schemathesis"
  pip install --quiet schemathesis
fi
