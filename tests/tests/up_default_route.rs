//! `tabbify-mesh up` with a default route in AllowedIPs does what wg-quick does: the
//! engine's sockets carry fwmark M, table M routes everything into the TUN, and the rules
//! `not fwmark M lookup M` + `lookup main suppress_prefixlength 0` (IPv4 and IPv6) keep the
//! encrypted datagrams and the main table's specific routes outside the tunnel.
//!
//! `default_route_goes_through_the_tunnel_and_the_rules_go_with_the_daemon`, in two
//! namespaces the harness makes and removes (the client's main table has its own default
//! routes, IPv4 and IPv6, via the underlay veth):
//!
//! | step | checked |
//! |---|---|
//! | client `up` (strict `rp_filter`) with a peer `AllowedIPs = 0.0.0.0/0, ::/0`, whose endpoint (on the server's loopback, also the source of its datagrams) only the default route reaches | two rules of ours per family; `ip route get` an outside address or the endpoint: the TUN; the endpoint with mark M: the veth |
//! | ping addresses outside the tunnel's peers (`203.0.113.77`, `2001:db8:77::1`, on the server's TUN) | they answer; the server's veth saw none of them in cleartext, but WireGuard datagrams (nftables counters) |
//! | ping the server's underlay address | still answers (the connected route wins) |
//! | the client is killed (SIGKILL), then started again | the stale rules are still there after the kill; after the restart exactly two per family (cleaned, not doubled) and the tunnel works |
//! | the client exits on SIGTERM | no rule of ours and no nftables table of ours is left; the main default routes are untouched |

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tabbify_tests::netns::Netns;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::wait_ping;
use tabbify_tests::veth::VethOptions;
use tabbify_tests::wait;
use tabbify_tests::wg::{Driver, Implementation, InterfaceConfig, Keypair, WgPeer, WgPeerConfig};
use tabbify_tests::VethPair;

const SETTLE: Duration = Duration::from_secs(30);
/// wg-quick's default table and mark, `up`'s default without `FwMark`.
const MARK: &str = "51820";
/// The routing protocol `up` tags its rules with (`tabbify_dataplane::policy::RULE_PROTO`).
const OUR_RULES: &str = "proto 201";
const OUTSIDE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);
const OUTSIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
/// The server's endpoint, on its loopback: the client reaches it only by its default route,
/// so only the mark keeps the encrypted datagrams out of the tunnel (no routing loop).
const ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// Lines of our rules per family.
fn our_rules(ns: &Netns) -> Result<(usize, usize)> {
    let count = |fam: &str| -> Result<usize> {
        Ok(ns
            .ip(&[fam, "rule", "show"])?
            .lines()
            .filter(|l| l.contains(OUR_RULES))
            .count())
    };
    Ok((count("-4")?, count("-6")?))
}

/// Sum of the counters of one rule family in table `inet up_dr` (`name` is in the comment).
fn counted(ns: &Netns, name: &str) -> Result<u64> {
    let text = ns.run("nft", &["list", "table", "netdev", "up_dr"])?;
    let mut total = 0;
    for line in text.lines().filter(|l| l.contains(name)) {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == "packets" {
                total += words
                    .next()
                    .context("a count after `packets`")?
                    .parse::<u64>()?;
            }
        }
    }
    Ok(total)
}

fn client(
    ns: &Netns,
    key: &Keypair,
    server: &Keypair,
    endpoint: SocketAddr,
    v6: Ipv6Addr,
) -> Result<WgPeer> {
    WgPeer::start(
        ns,
        &Implementation::ours(Driver::Uring, true),
        &InterfaceConfig {
            keypair: key.clone(),
            listen_port: 51820,
            addresses: vec!["10.99.0.1/32".into(), format!("{v6}/128")],
            mtu: 1420,
        },
        &[WgPeerConfig {
            public_key: server.public.clone(),
            allowed_ips: vec!["0.0.0.0/0".into(), "::/0".into()],
            endpoint: Some(endpoint),
            ..WgPeerConfig::default()
        }],
    )
}

/// The tunnel carries both outside addresses, nothing of it shows in cleartext on the
/// server's veth, and the underlay address is still reached directly.
fn check_traffic(client_ns: &Netns, server_ns: &Netns, underlay: &VethPair) -> Result<()> {
    for addr in [IpAddr::V4(OUTSIDE_V4), IpAddr::V6(OUTSIDE_V6)] {
        wait_ping(client_ns, addr, SETTLE)
            .with_context(|| format!("client → {addr} through the tunnel"))?;
    }
    wait_ping(client_ns, IpAddr::V4(underlay.b.v4), SETTLE).context("client → underlay")?;
    ensure!(
        counted(server_ns, "cleartext")? == 0,
        "packets for the outside addresses reached the server's veth in cleartext"
    );
    ensure!(
        counted(server_ns, "wireguard")? > 0,
        "no WireGuard datagram reached the server's veth"
    );
    Ok(())
}

#[test]
fn default_route_goes_through_the_tunnel_and_the_rules_go_with_the_daemon() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Wg, Tool::Ping, Tool::Nft])?;
    tabbify_tests::bins::tabbify_mesh()?;
    let (client_ns, server_ns) = (Netns::new()?, Netns::new()?);
    let underlay = VethPair::connect(&client_ns, &server_ns, &VethOptions::default())?;
    // A strict reverse-path filter on the client, as hardened hosts have: the server's
    // datagrams come from its endpoint address, which only the default route reaches.
    client_ns.write_sysfs("/proc/sys/net/ipv4/conf/all/rp_filter", "1")?;
    client_ns.write_sysfs(
        &format!("/proc/sys/net/ipv4/conf/{}/rp_filter", underlay.a.ifname),
        "1",
    )?;
    // The client's own default routes lead to the underlay, as on any host.
    client_ns.ip(&[
        "-4",
        "route",
        "add",
        "default",
        "via",
        &underlay.b.v4.to_string(),
    ])?;
    client_ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &underlay.b.v6.to_string(),
    ])?;
    let script = format!(
        "table netdev up_dr {{\n  chain c {{\n    type filter hook ingress device {} priority 0;\n    \
         ip daddr {OUTSIDE_V4} counter comment \"cleartext\"\n    \
         ip6 daddr {OUTSIDE_V6} counter comment \"cleartext\"\n    \
         udp dport 51820 counter comment \"wireguard\"\n  }}\n}}\n",
        underlay.b.ifname
    );
    server_ns.ip(&["addr", "add", &format!("{ENDPOINT}/32"), "dev", "lo"])?;
    // The server answers from its endpoint address, as a server on the internet does.
    let connected = server_ns.ip(&["-4", "route", "show", "dev", &underlay.b.ifname])?;
    let subnet = connected
        .split_whitespace()
        .next()
        .context("the server's connected route")?
        .to_owned();
    server_ns.ip(&[
        "-4",
        "route",
        "change",
        &subnet,
        "dev",
        &underlay.b.ifname,
        "src",
        &ENDPOINT.to_string(),
    ])?;
    let path = server_ns.workdir().join("up_dr.nft");
    std::fs::write(&path, script)?;
    server_ns.run("nft", &["-f", path.to_str().context("a UTF-8 path")?])?;

    let (kc, ks) = (Keypair::generate()?, Keypair::generate()?);
    let client_v6 = Ipv6Addr::new(0xfd5a, 0x1f00, 0xc, 0xd, 0xe, 0, 0, 1);
    let server = WgPeer::start(
        &server_ns,
        &Implementation::ours(Driver::Epoll, false),
        &InterfaceConfig {
            keypair: ks.clone(),
            listen_port: 51820,
            addresses: vec![
                "10.99.0.2/32".into(),
                format!("{OUTSIDE_V4}/32"),
                format!("{OUTSIDE_V6}/128"),
            ],
            mtu: 1420,
        },
        &[WgPeerConfig {
            public_key: kc.public.clone(),
            allowed_ips: vec!["10.99.0.1/32".into(), format!("{client_v6}/128")],
            ..WgPeerConfig::default()
        }],
    )?;
    let endpoint = SocketAddr::new(ENDPOINT.into(), 51820);
    let first = client(&client_ns, &kc, &ks, endpoint, client_v6)?;
    ensure!(
        our_rules(&client_ns)? == (2, 2),
        "expected two rules of ours per family:\n{}\n{}",
        client_ns.ip(&["-4", "rule", "show"])?,
        client_ns.ip(&["-6", "rule", "show"])?
    );
    let via = client_ns.ip(&["-4", "route", "get", &OUTSIDE_V4.to_string()])?;
    ensure!(via.contains(first.ifname()), "not into the TUN: {via}");
    let unmarked = client_ns.ip(&["-4", "route", "get", &ENDPOINT.to_string()])?;
    ensure!(
        unmarked.contains(first.ifname()),
        "the endpoint should be reached by the default route only: {unmarked}"
    );
    let marked = client_ns.ip(&["-4", "route", "get", &ENDPOINT.to_string(), "mark", MARK])?;
    ensure!(
        marked.contains(&underlay.a.ifname),
        "marked datagrams do not leave by the underlay: {marked}"
    );
    let marked6 = client_ns.ip(&["-6", "route", "get", &OUTSIDE_V6.to_string(), "mark", MARK])?;
    ensure!(
        !marked6.contains(first.ifname()),
        "marked IPv6 datagrams enter the tunnel: {marked6}"
    );
    check_traffic(&client_ns, &server_ns, &underlay)
        .with_context(|| format!("client log:\n{}", first.logs()))?;

    // A crash leaves the rules behind; the next start removes them before adding its own.
    let (pid, ifname) = (first.process().pid(), first.ifname().to_owned());
    // SAFETY: kill(2) on the PID of the daemon this test started; no memory is involved.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
    wait::until_true("the killed client's TUN to go", SETTLE, || {
        !client_ns.has_link(&ifname)
    })?;
    drop(first);
    ensure!(
        our_rules(&client_ns)? == (2, 2),
        "the killed daemon's rules should still be there (the stale case this test replays)"
    );
    let second = client(&client_ns, &kc, &ks, endpoint, client_v6)?;
    ensure!(
        our_rules(&client_ns)? == (2, 2),
        "after a restart over stale rules, expected exactly two per family:\n{}\n{}",
        client_ns.ip(&["-4", "rule", "show"])?,
        client_ns.ip(&["-6", "rule", "show"])?
    );
    check_traffic(&client_ns, &server_ns, &underlay)
        .with_context(|| format!("client log after restart:\n{}", second.logs()))?;

    second.stop()?;
    ensure!(
        our_rules(&client_ns)? == (0, 0),
        "rules left after exit:\n{}\n{}",
        client_ns.ip(&["-4", "rule", "show"])?,
        client_ns.ip(&["-6", "rule", "show"])?
    );
    let tables = client_ns.run("nft", &["list", "tables"])?;
    ensure!(
        !tables.contains("tabbify-"),
        "the connmark table is left after exit: {tables}"
    );
    for fam in ["-4", "-6"] {
        let routes = client_ns.ip(&[fam, "route", "show", "default"])?;
        ensure!(
            routes.contains("via"),
            "the client's own default route ({fam}) is gone: {routes:?}"
        );
    }
    server.stop()?;
    Ok(())
}
