//! The harness itself, and stock WireGuard implementations against each other: these
//! prove the tooling works before any test of ours relies on it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::{ping, tcp_transfer, wait_ping};
use tabbify_tests::wg::Implementation;
use tabbify_tests::{Inner, Netns, Tunnel, TunnelSpec, VethOptions, VethPair};

const MB: u64 = 1024 * 1024;

fn namespace_exists(name: &str) -> Result<bool> {
    let list = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name)))
}

fn process_alive(pid: u32) -> bool {
    // A killed child is reaped by its handle, so its /proc entry disappears.
    Path::new(&format!("/proc/{pid}")).exists()
}

fn xfer() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_tabbify-xfer").into()
}

#[test]
fn namespace_and_its_processes_go_away_on_drop() -> Result<()> {
    require(&[Tool::Iproute2])?;
    let ns = Netns::new()?;
    let name = ns.name().to_owned();
    assert!(namespace_exists(&name)?);
    assert!(
        ns.ip(&["-o", "link", "show", "lo"])?.contains("UP"),
        "loopback is up"
    );
    let sleeper = ns.spawn("sleeper", "sleep", &["600"])?;
    let pid = sleeper.pid();
    assert!(process_alive(pid));
    drop(sleeper);
    assert!(!process_alive(pid), "dropping the handle kills the process");

    // A process that escaped its parent (double fork) still dies with the namespace.
    let orphan: u32 = ns
        .run("sh", &["-c", "sleep 600 >/dev/null 2>&1 & echo $!"])?
        .trim()
        .parse()?;
    assert!(process_alive(orphan));
    drop(ns);
    assert!(!namespace_exists(&name)?, "namespace {name} deleted");
    tabbify_tests::wait::until_true("the orphan to be reaped", Duration::from_secs(10), || {
        !process_alive(orphan)
    })?;
    Ok(())
}

#[test]
fn namespace_is_removed_when_a_test_panics() -> Result<()> {
    require(&[Tool::Iproute2])?;
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(move || {
        let ns = Netns::new().unwrap();
        tx.send(ns.name().to_owned()).unwrap();
        panic!("deliberate panic with a namespace alive");
    });
    assert!(outcome.is_err());
    let name = rx.recv()?;
    assert!(
        !namespace_exists(&name)?,
        "namespace {name} deleted while unwinding"
    );
    Ok(())
}

#[test]
fn veth_carries_ipv4_and_ipv6_with_rps_and_loss() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Nft])?;
    let (a, b) = (Netns::new()?, Netns::new()?);
    let veth = VethPair::connect(&a, &b, &VethOptions::default())?;
    for ipv6 in [false, true] {
        let stats = ping(&a, veth.b.addr(ipv6), 3, "0.05")?;
        assert_eq!(
            stats.received,
            3,
            "ping {} over the veth: {stats:?}",
            veth.b.addr(ipv6)
        );
        assert!(stats.avg_ms.is_some());
    }
    let rps = b.run(
        "cat",
        &[&format!(
            "/sys/class/net/{}/queues/rx-0/rps_cpus",
            veth.b.ifname
        )],
    )?;
    assert!(
        u64::from_str_radix(rps.trim().replace(',', "").trim_start_matches('0'), 16).unwrap_or(0)
            != 0,
        "RPS mask set: {rps}"
    );
    veth.set_loss(100)?;
    let stats = ping(&a, veth.b.addr(false), 2, "0.05")?;
    assert_eq!(stats.received, 0, "100% loss drops everything: {stats:?}");
    assert!(veth.loss_drops()? >= 2, "the drops are counted");
    veth.clear_loss()?;
    wait_ping(&a, veth.b.addr(true), Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn tcp_transfer_is_verified_end_to_end_over_plain_veth() -> Result<()> {
    require(&[Tool::Iproute2])?;
    let (a, b) = (Netns::new()?, Netns::new()?);
    let veth = VethPair::connect(&a, &b, &VethOptions::default())?;
    let transfer = tcp_transfer(
        &xfer(),
        &a,
        &b,
        veth.b.addr(true),
        16 * MB,
        Duration::from_secs(60),
    )?;
    assert_eq!(transfer.bytes, 16 * MB);
    assert_eq!(transfer.sha256.len(), 64);
    // Nobody listens on the other side's address in the wrong namespace: must fail.
    let wrong = tcp_transfer(
        &xfer(),
        &a,
        &a,
        veth.b.addr(false),
        MB,
        Duration::from_secs(20),
    );
    assert!(
        wrong.is_err(),
        "a transfer to a namespace without the receiver fails"
    );
    Ok(())
}

#[test]
fn wireguard_go_and_boringtun_ipv6_inner_ipv4_outer() -> Result<()> {
    require(&[
        Tool::Iproute2,
        Tool::Wg,
        Tool::WireguardGo,
        Tool::BoringtunCli,
        Tool::Ping,
    ])?;
    let mut spec = TunnelSpec::new(
        Implementation::WireguardGo,
        Implementation::Boringtun { threads: Some(1) },
    );
    spec.inner = Inner::V6;
    spec.psk = true;
    let tunnel = Tunnel::start(&spec)?;
    tunnel.exercise(&xfer(), 32 * MB, Duration::from_secs(120))?;
    tunnel.stop()
}

#[test]
fn boringtun_and_wireguard_go_dual_inner_ipv6_outer() -> Result<()> {
    require(&[
        Tool::Iproute2,
        Tool::Wg,
        Tool::WireguardGo,
        Tool::BoringtunCli,
        Tool::Ping,
    ])?;
    let mut spec = TunnelSpec::new(
        Implementation::Boringtun { threads: None },
        Implementation::WireguardGo,
    );
    spec.inner = Inner::Dual;
    spec.outer_v6 = true;
    spec.keepalive = Some(1);
    let tunnel = Tunnel::start(&spec)?;
    tunnel.exercise(&xfer(), 16 * MB, Duration::from_secs(120))?;
    tunnel.stop()
}

#[test]
fn wireguard_go_pair_ipv4_inner_ipv6_outer_under_10pct_loss() -> Result<()> {
    require(&[
        Tool::Iproute2,
        Tool::Wg,
        Tool::WireguardGo,
        Tool::Ping,
        Tool::Nft,
    ])?;
    let mut spec = TunnelSpec::new(Implementation::WireguardGo, Implementation::WireguardGo);
    spec.inner = Inner::V4;
    spec.outer_v6 = true;
    spec.loss_percent = Some(10);
    let tunnel = Tunnel::start(&spec)?;
    tunnel.exercise(&xfer(), 8 * MB, Duration::from_secs(120))?;
    let drops = tunnel.veth.loss_drops()?;
    assert!(
        drops > 100,
        "the transfers went through a lossy link ({drops} packets dropped)"
    );
    tunnel.stop()
}

/// A UDP socket bound to `port` on every address, created inside `netns`.
fn udp_in(netns: &Netns, port: u16) -> Result<std::net::UdpSocket> {
    tabbify_tests::inside::block_on(netns, || async move {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", port))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(socket)
    })
}

/// Waits for one datagram on `socket`; returns its payload and source.
fn recv_from(socket: &std::net::UdpSocket) -> Option<(Vec<u8>, std::net::SocketAddr)> {
    let mut buf = [0u8; 64];
    socket
        .recv_from(&mut buf)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

#[test]
fn code_inside_runs_in_the_namespace_and_sockets_stay_there() -> Result<()> {
    require(&[Tool::Iproute2])?;
    let ns = Netns::new()?;
    let here = tabbify_tests::inside::current_netns_id()?;
    let there = tabbify_tests::inside::block_on(&ns, || async {
        tabbify_tests::inside::current_netns_id()
    })?;
    assert_ne!(here, there, "the closure ran in another namespace");
    assert_eq!(
        tabbify_tests::inside::current_netns_id()?,
        here,
        "the calling thread stays where it was"
    );
    // A socket made inside belongs to the namespace for good, even when used from here.
    let listener = tabbify_tests::inside::block_on(&ns, || async {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?)
    })?;
    let port = listener.local_addr()?.port();
    let listening = ns.run("ss", &["-Hltn"])?;
    assert!(
        listening.contains(&format!("127.0.0.1:{port}")),
        "port {port} listens inside: {listening}"
    );
    let connected = tabbify_tests::inside::block_on(&ns, || async move {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await?
            .peer_addr()?)
    })?;
    assert_eq!(connected.port(), port);
    let (_, from) = listener.accept()?;
    assert!(from.ip().is_loopback());
    let panicked = std::panic::catch_unwind(|| {
        let _ = tabbify_tests::inside::block_on::<(), _>(&ns, || async {
            panic!("deliberate panic inside");
        });
    });
    assert!(panicked.is_err(), "a panic inside reaches the caller");
    Ok(())
}

#[test]
fn lan_hosts_reach_each_other_and_the_bridge() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping])?;
    let lan = tabbify_tests::Lan::new()?;
    let (a, b) = (Netns::new()?, Netns::new()?);
    let port_a = lan.attach(&a)?;
    let port_b = lan.attach(&b)?;
    assert_ne!(port_a.addr, port_b.addr);
    // Plugging hosts in does not change the bridge's MAC address (ARP caches stay valid).
    let bridge = lan.netns().ip(&["-br", "link", "show", "dev", "br0"])?;
    assert!(bridge.contains("02:00:0a:c8:00:01"), "{bridge}");
    let stats = ping(&a, port_b.addr.into(), 3, "0.05")?;
    assert_eq!(stats.received, 3, "{stats:?}");
    let stats = ping(lan.netns(), port_a.addr.into(), 2, "0.05")?;
    assert_eq!(stats.received, 2, "{stats:?}");
    let name = lan.netns().name().to_owned();
    drop(lan);
    drop((a, b));
    assert!(!namespace_exists(&name)?, "LAN namespace {name} deleted");
    Ok(())
}

/// The NAT topology the hole-punching test relies on, checked with plain UDP sockets: the
/// host's port is kept behind the NAT, unsolicited traffic does not get in, and two hosts
/// behind two NATs reach each other once both have sent (the first packet, which arrives
/// before the other side's mapping exists, is dropped without spoiling that mapping).
#[test]
fn two_nats_masquerade_and_let_a_udp_hole_punch_through() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Nft])?;
    let lan = tabbify_tests::Lan::new()?;
    let (a, b, outside) = (Netns::new()?, Netns::new()?, Netns::new()?);
    let nat_a = tabbify_tests::NatRouter::new(&lan, &a)?;
    let nat_b = tabbify_tests::NatRouter::new(&lan, &b)?;
    let outside_port = lan.attach(&outside)?;
    assert_ne!(nat_a.host_addr, nat_b.host_addr);
    const PORT: u16 = 51820;
    let (sock_a, sock_b) = (udp_in(&a, PORT)?, udp_in(&b, PORT)?);
    let sock_out = udp_in(&outside, PORT)?;

    // Masquerade: the outside host sees the NAT's public address and the host's own port.
    sock_a.send_to(b"hello", (outside_port.addr, PORT))?;
    let (payload, from) = recv_from(&sock_out).expect("datagram from behind the NAT");
    assert_eq!(payload, b"hello");
    assert_eq!(
        from,
        (nat_a.public_addr(), PORT).into(),
        "port-preserving masquerade"
    );
    // Replies come back through the mapping.
    sock_out.send_to(b"reply", from)?;
    assert_eq!(recv_from(&sock_a).map(|(p, _)| p), Some(b"reply".to_vec()));
    // Unsolicited traffic to B's NAT does not reach B.
    sock_out.send_to(b"intruder", (nat_b.public_addr(), PORT))?;
    assert!(
        recv_from(&sock_b).is_none(),
        "unsolicited datagram got through"
    );

    // Hole punch: A first (dropped at B's NAT), then B (passes A's NAT, which has A's
    // mapping), then A again (passes B's NAT, which now has B's mapping).
    sock_a.send_to(b"punch-a1", (nat_b.public_addr(), PORT))?;
    assert!(recv_from(&sock_b).is_none());
    sock_b.send_to(b"punch-b", (nat_a.public_addr(), PORT))?;
    let (payload, from) = recv_from(&sock_a).with_context(|| {
        format!(
            "B's punch did not reach A\n{}\n{}",
            nat_a.describe(),
            nat_b.describe()
        )
    })?;
    assert_eq!(payload, b"punch-b");
    assert_eq!(
        from,
        (nat_b.public_addr(), PORT).into(),
        "B's mapping kept its port"
    );
    sock_a.send_to(b"punch-a2", from)?;
    let (payload, from) = recv_from(&sock_b).context("A's second punch did not reach B")?;
    assert_eq!(payload, b"punch-a2");
    assert_eq!(from, (nat_a.public_addr(), PORT).into());
    Ok(())
}

#[test]
fn pki_coordinator_and_admin_client_work_together() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl])?;
    let policy = serde_json::json!({
        "tags": ["node", "supervisor"],
        "app_hosts": ["tag:supervisor"],
        "allow": [{"src": ["tag:node"], "dst": ["tag:supervisor:8730"]}]
    });
    let mut bed = tabbify_tests::Testbed::start(policy.clone(), 5)?;
    let token = bed.admin.create_token(&["node"], None, 1)?;
    assert!(token.starts_with("tmj_"), "{token}");
    let current = bed.admin.expect_ok("GET", "/v1/policy", None)?;
    assert_eq!(current["policy"]["tags"], policy["tags"], "{current}");
    let mut changed = policy.clone();
    changed["allow"] = serde_json::json!([]);
    bed.admin.put_policy(&changed)?;
    let bad = bed
        .admin
        .request("PUT", "/v1/policy", Some(&serde_json::json!({"tags": 5})))?;
    assert_eq!(bad.status, 400, "{:?}", bad.body);

    // A peer certificate is refused the admin routes, even one named like the admin: the
    // role is in the certificate, not its name.
    for name in ["node-x", tabbify_tests::testbed::ADMIN] {
        let peer = bed.pki.issue_peer(name)?;
        let stranger = tabbify_tests::Admin::new(bed.lan.netns(), &bed.coordinator.url(), peer);
        assert_eq!(
            stranger.request("GET", "/v1/policy", None)?.status,
            403,
            "{name}"
        );
    }

    // Killed and restarted on the same state: the changed policy is still in force.
    let pid = bed.coordinator.pid().expect("running");
    bed.coordinator.kill()?;
    assert!(!process_alive(pid));
    assert!(
        bed.admin.request("GET", "/health", None).is_err(),
        "nothing listens"
    );
    bed.coordinator.restart()?;
    let current = bed.admin.expect_ok("GET", "/v1/policy", None)?;
    assert_eq!(
        current["policy"]["allow"],
        serde_json::json!([]),
        "{current}"
    );
    Ok(())
}

#[test]
fn test_app_and_edge_processes_serve_inside_a_namespace() -> Result<()> {
    require(&[Tool::Iproute2])?;
    let ns = Netns::new()?;
    let app_addr: std::net::SocketAddr = "127.0.0.1:8730".parse()?;
    let _app = tabbify_tests::AppProcess::start(
        &ns,
        Path::new(env!("CARGO_BIN_EXE_tabbify-testapp")),
        app_addr,
        "harness-app",
    )?;
    let key = "harness-edge-key-0123456789";
    let edge = tabbify_tests::EdgeNode::start(
        &ns,
        "127.0.0.1:8090".parse()?,
        key,
        &["--upstream-override", "127.0.0.1:8730"],
    )?;
    let bearer = edge.bearer();
    let addr = edge.addr();
    let body = tabbify_tests::inside::block_on(&ns, || async move {
        let head = format!(
            "GET /app/5b6d0f2e-4c1a-4e8b-9f3d-2a7c6e1b0d94/echo HTTP/1.1\r\nHost: e\r\n\
             Authorization: {bearer}\r\nConnection: close\r\n\r\n"
        );
        let resp = tabbify_edge::testkit::raw_request(addr, &head, b"").await?;
        anyhow::ensure!(resp.status == 200, "status {}", resp.status);
        Ok(resp.body)
    })?;
    let echo: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(echo["name"], "harness-app");
    Ok(())
}

/// The background pinger's checks can fail: a cut that never happens is reported, a real
/// one is timed by the requests' send times, and lost requests break "uninterrupted".
#[test]
fn pinger_tells_whether_and_when_traffic_stopped() -> Result<()> {
    use tabbify_tests::pinger::unix_now;
    require(&[Tool::Iproute2, Tool::Ping])?;
    let lan = tabbify_tests::Lan::new()?;
    let (a, b) = (Netns::new()?, Netns::new()?);
    lan.attach(&a)?;
    let port_b = lan.attach(&b)?;
    let mut pinger = tabbify_tests::Pinger::start(&a, port_b.addr.into(), "0.05")?;
    pinger.wait_reply_after(unix_now(), Duration::from_secs(10))?;

    let since = unix_now();
    let never_cut = pinger.check_cut(
        since,
        Duration::from_millis(300),
        Duration::from_millis(500),
    );
    assert!(never_cut.is_err(), "traffic that goes on is not a cut");
    pinger.check_uninterrupted(since, Duration::from_secs(1))?;

    let since = unix_now();
    b.ip(&["link", "set", "dev", &port_b.ifname, "down"])?;
    let last = pinger.check_cut(
        since,
        Duration::from_millis(300),
        Duration::from_millis(500),
    )?;
    assert!(
        last <= 0.3,
        "last answered request sent {last} s after the cut"
    );
    let lost = pinger.check_uninterrupted(since, Duration::from_secs(1));
    assert!(lost.is_err(), "requests into a dead link are lost");
    Ok(())
}
