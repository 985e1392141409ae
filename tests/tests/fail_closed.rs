//! Issue 12, delivers 2 and 3: the data plane fails closed. Played as attackers would, through
//! real tunnels in namespaces:
//!
//! | test | attacker | must hold |
//! |---|---|---|
//! | `a_peer_cannot_route_through_a_forwarding_node_to_its_lan` | a peer with a valid key (`up`) sends, through the tunnel, packets whose inner destination is a LAN host behind a node with forwarding on (IPv4 and IPv6) | nothing arrives on the LAN veth (nftables counter at the LAN host's ingress); the node counts `destination_not_local`; the node's own addresses still answer both ways; after `wg set … remove` of the peer, pings to its addresses (IPv4 and IPv6) fail at once with unreachable and nothing for them leaves by the node's default routes |
//! | `removed_peers_and_unknown_apps_get_unreachable_not_cleartext` | a joiner's application sends to an unknown app ULA and, after revocation, to a removed peer's ULA, on a host whose default IPv6 route leads to the LAN | nothing for the mesh prefixes leaves by the LAN interface (nftables counter on the host's postrouting for any interface but the TUN); ping fails at once with "Destination unreachable", not a timeout; `status --json` counts the answers |
//!
//! Each test builds its own namespaces (unique names from the harness) and removes them on
//! drop, also when it fails.

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tabbify_tests::netns::Netns;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::{ping, wait_ping};
use tabbify_tests::veth::VethOptions;
use tabbify_tests::wg::{Driver, Implementation, InterfaceConfig, Keypair, WgPeer, WgPeerConfig};
use tabbify_tests::{JoinSpec, Testbed, VethPair};

/// Deadline for rosters, handshakes and routes to settle (liveness only).
const SETTLE: Duration = Duration::from_secs(30);

/// An ICMP unreachable answer comes from the engine on the same host: far below any
/// timeout. This bounds "at once" generously for a loaded 2-core machine.
const PROMPT: Duration = Duration::from_secs(2);

/// An nftables table `fc_capture` with one base chain (`chain` is its type/hook line) and
/// one counting rule per selector in `rules`.
fn count_packets(netns: &Netns, family: &str, chain: &str, rules: &[String]) -> Result<()> {
    let mut script = format!("table {family} fc_capture {{\n  chain c {{\n    {chain}\n");
    for r in rules {
        script.push_str(&format!("    {r} counter\n"));
    }
    script.push_str("  }\n}\n");
    let path = netns.workdir().join("fc_capture.nft");
    std::fs::write(&path, &script).context("writing the nftables script")?;
    let p = path.to_str().context("a UTF-8 path")?;
    netns.run("nft", &["-f", p]).map(drop)
}

/// Sum of every counter of the capture table.
fn counted(netns: &Netns, family: &str) -> Result<u64> {
    let text = netns.run("nft", &["list", "table", family, "fc_capture"])?;
    let mut total = 0u64;
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            let n: u64 = words
                .next()
                .context("a count after `packets`")?
                .parse()
                .context("a packet count")?;
            total += n;
        }
    }
    Ok(total)
}

/// `count` from the `dropped packets` shutdown line for `reason` in our daemon's log.
fn logged_drops(logs: &str, reason: &str) -> u64 {
    logs.lines()
        .filter(|l| l.contains("dropped packets") && l.contains(reason))
        .filter_map(|l| {
            let rest = &l[l.find("count=")? + 6..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[test]
fn a_peer_cannot_route_through_a_forwarding_node_to_its_lan() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Wg, Tool::Ping, Tool::Nft])?;
    tabbify_tests::bins::tabbify_mesh()?;
    let (attacker_ns, node_ns, lan_ns) = (Netns::new()?, Netns::new()?, Netns::new()?);
    let underlay = VethPair::connect(&attacker_ns, &node_ns, &VethOptions::default())?;
    let lan = VethPair::connect(&node_ns, &lan_ns, &VethOptions::default())?;
    // The node routes between its interfaces, as a home router or a VM host would.
    node_ns.write_sysfs("/proc/sys/net/ipv4/ip_forward", "1")?;
    node_ns.write_sysfs("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
    // The LAN host answers whatever reaches it, and routes the tunnel's addresses back.
    lan_ns.ip(&["route", "add", "10.99.0.0/24", "via", &lan.a.v4.to_string()])?;
    lan_ns.ip(&[
        "-6",
        "route",
        "add",
        "fd5a:1f00::/32",
        "via",
        &lan.a.v6.to_string(),
    ])?;
    let (lan_v4, lan_v6) = (lan.b.v4, lan.b.v6);
    count_packets(
        &lan_ns,
        "netdev",
        &format!(
            "type filter hook ingress device {} priority 0;",
            lan.b.ifname
        ),
        &[
            "ip saddr 10.99.0.0/24".into(),
            "ip6 saddr fd5a:1f00::/32".into(),
        ],
    )?;

    let (ka, kn) = (Keypair::generate()?, Keypair::generate()?);
    let attacker_ula = Ipv6Addr::new(0xfd5a, 0x1f00, 0xa, 0xb, 0xc, 0, 0, 1);
    let node_ula = Ipv6Addr::new(0xfd5a, 0x1f00, 0xd, 0xe, 0xf, 0, 0, 1);
    let ours = Implementation::ours(Driver::Uring, true);
    let node = WgPeer::start(
        &node_ns,
        &Implementation::ours(Driver::Epoll, false),
        &InterfaceConfig {
            keypair: kn.clone(),
            listen_port: 51820,
            addresses: vec!["10.99.0.2/32".into(), format!("{node_ula}/128")],
            mtu: 1420,
        },
        &[WgPeerConfig {
            public_key: ka.public.clone(),
            allowed_ips: vec!["10.99.0.1/32".into(), format!("{attacker_ula}/128")],
            ..WgPeerConfig::default()
        }],
    )?;
    // The attacker's own configuration is its own: it routes the LAN into the tunnel.
    let attacker = WgPeer::start(
        &attacker_ns,
        &ours,
        &InterfaceConfig {
            keypair: ka.clone(),
            listen_port: 51820,
            addresses: vec!["10.99.0.1/32".into(), format!("{attacker_ula}/128")],
            mtu: 1420,
        },
        &[WgPeerConfig {
            public_key: kn.public.clone(),
            allowed_ips: vec![
                "10.99.0.2/32".into(),
                format!("{node_ula}/128"),
                format!("{lan_v4}/32"),
                format!("{lan_v6}/128"),
            ],
            endpoint: Some(std::net::SocketAddr::new(underlay.b.v4.into(), 51820)),
            ..WgPeerConfig::default()
        }],
    )?;

    // Allowed traffic passes, both families, both ways.
    for addr in [IpAddr::from([10, 99, 0, 2]), IpAddr::V6(node_ula)] {
        wait_ping(&attacker_ns, addr, SETTLE).context("attacker → node's own address")?;
    }
    for addr in [IpAddr::from([10, 99, 0, 1]), IpAddr::V6(attacker_ula)] {
        wait_ping(&node_ns, addr, SETTLE).context("node → attacker")?;
    }

    // Through the tunnel to the LAN behind the node: nothing arrives.
    let mut sent = 0u64;
    for addr in [IpAddr::V4(lan_v4), IpAddr::V6(lan_v6)] {
        let stats = ping(&attacker_ns, addr, 5, "0.2")?;
        ensure!(
            stats.received == 0,
            "the LAN host {addr} answered through the node: {stats:?}"
        );
        sent += 5;
    }
    let arrived = counted(&lan_ns, "netdev")?;
    ensure!(
        arrived == 0,
        "{arrived} packets from the tunnel arrived on the LAN veth"
    );
    // The node's own addresses still answer after the attempt.
    wait_ping(&attacker_ns, IpAddr::from([10, 99, 0, 2]), SETTLE)?;

    // `up` reconfigured at run time: once the node removes the peer, the peer's addresses
    // still route into the engine, which answers "unreachable" at once; nothing for them
    // leaves by the node's default routes (to the LAN).
    node_ns.ip(&["route", "add", "default", "via", &lan.b.v4.to_string()])?;
    node_ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &lan.b.v6.to_string(),
    ])?;
    count_packets(
        &node_ns,
        "inet",
        "type filter hook postrouting priority 0;",
        &[
            format!("oifname != \"{}\" ip daddr 10.99.0.1", node.ifname()),
            format!("oifname != \"{}\" ip6 daddr {attacker_ula}", node.ifname()),
        ],
    )?;
    node.set(&["peer", &ka.public, "remove"])?;
    expect_unreachable(&node_ns, IpAddr::from([10, 99, 0, 1]))?;
    expect_unreachable(&node_ns, IpAddr::V6(attacker_ula))?;
    let leaked = counted(&node_ns, "inet")?;
    ensure!(
        leaked == 0,
        "{leaked} packets for the removed peer left by another interface than the TUN"
    );

    let (_, logs) = node.stop_with_logs()?;
    let refused = logged_drops(&logs, "destination_not_local");
    ensure!(
        refused >= sent,
        "the node counted {refused} destination_not_local drops for {sent} packets sent; log:\n{logs}"
    );
    attacker.stop()?;
    Ok(())
}

#[test]
fn removed_peers_and_unknown_apps_get_unreachable_not_cleartext() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl, Tool::Nft])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let policy = json!({
        "tags": ["supervisor"],
        "app_hosts": ["tag:supervisor"],
        "allow": [{"src": ["tag:supervisor"], "dst": ["tag:supervisor"]}],
    });
    let bed = Testbed::start(policy, 3)?;
    let (ns1, lan1) = bed.host()?;
    let (ns2, _) = bed.host()?;
    // Without the mesh prefixes on the TUN, anything for the mesh would leave here: the
    // host's default IPv6 route leads to the LAN.
    bed.lan
        .netns()
        .ip(&["-6", "addr", "add", "fd99::1/64", "dev", "br0", "nodad"])?;
    ns1.ip(&[
        "-6",
        "addr",
        "add",
        "fd99::2/64",
        "dev",
        &lan1.ifname,
        "nodad",
    ])?;
    ns1.ip(&["-6", "route", "add", "default", "via", "fd99::1"])?;

    let mut sup1 = bed.join(&ns1, JoinSpec::new("supervisor-01", &["supervisor"], None))?;
    let mut sup2 = bed.join(&ns2, JoinSpec::new("supervisor-02", &["supervisor"], None))?;
    let s1 = sup1.wait_peer_names(&["supervisor-02"], SETTLE)?;
    let s2 = sup2.wait_peer_names(&["supervisor-01"], SETTLE)?;
    count_packets(
        &ns1,
        "inet",
        "type filter hook postrouting priority 0;",
        &[
            format!("oifname != \"{}\" ip6 daddr fd5a:1f00::/32", sup1.ifname()),
            format!("oifname != \"{}\" ip6 daddr fd5a:1f02::/32", sup1.ifname()),
        ],
    )?;
    // Allowed traffic passes.
    wait_ping(&ns1, IpAddr::V6(s2.ula), SETTLE).context("supervisor-01 → supervisor-02")?;

    // An app nobody hosts.
    let unknown_app = tabbify_api::ula::app_ula(&uuid::Uuid::from_u128(0x1212_3434));
    expect_unreachable(&ns1, unknown_app)?;

    // A revoked peer: its /128 route goes, the mesh prefix still covers its ULA.
    bed.admin.revoke(&s2.peer_id)?;
    sup1.wait_status("to drop supervisor-02", SETTLE, |s| {
        s.peer("supervisor-02").is_none()
    })?;
    wait_no_host_route(&ns1, s2.ula)?;
    expect_unreachable(&ns1, s2.ula)?;

    let leaked = counted(&ns1, "inet")?;
    ensure!(
        leaked == 0,
        "{leaked} packets for the mesh prefixes left by another interface than the TUN"
    );
    let status = sup1.status()?;
    ensure!(
        status.unreachable_sent >= 2,
        "status counts {} unreachable answers: {}",
        status.unreachable_sent,
        status.summary()
    );
    ensure!(
        status.drops.get("no_route").copied().unwrap_or(0) >= 2,
        "status drops: {:?}",
        status.drops
    );
    ensure!(s1.ula != s2.ula, "distinct ULAs");
    sup2.expect_refused_exit("revoked", SETTLE)?;
    sup1.stop()
}

/// Waits until the joiner has withdrawn its /128 route to `addr`.
fn wait_no_host_route(netns: &Netns, addr: Ipv6Addr) -> Result<()> {
    tabbify_tests::wait::until_true(&format!("the /128 route to {addr} to go"), SETTLE, || {
        netns
            .ip(&["-6", "route", "show", &format!("{addr}/128")])
            .is_ok_and(|r| r.trim().is_empty())
    })
}

/// One ping to `addr` from `netns` fails at once with "Destination unreachable" (IPv6) or
/// "Destination Host Unreachable" (IPv4).
fn expect_unreachable(netns: &Netns, addr: impl Into<IpAddr>) -> Result<()> {
    let addr: IpAddr = addr.into();
    let started = Instant::now();
    let out = netns
        .command("ping")
        .args(["-n", "-c", "1", "-W", "5", &addr.to_string()])
        .output()
        .context("running ping")?;
    let took = started.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!out.status.success(), "ping {addr} succeeded: {text}");
    ensure!(
        text.to_lowercase().contains("destination") && text.to_lowercase().contains("unreachable"),
        "ping {addr} did not report Destination unreachable: {text}"
    );
    ensure!(
        took < PROMPT,
        "the unreachable answer for {addr} took {took:?}: {text}"
    );
    Ok(())
}
