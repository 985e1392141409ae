//! Issue 13 in the NAT lab with real joiners and our coordinator on the lab's hub:
//!
//! * `joiners_classify_the_lab_routers`: behind the endpoint-dependent router a joiner's
//!   STUN probe says `endpoint_dependent`; behind the lab's double NAT (two
//!   endpoint-independent routers in a row) `endpoint_independent` at the outer router's
//!   address; behind the UDP-blocking router `udp_blocked` (every Binding request lost),
//!   while it stays registered over TCP.
//! * `hole_punching_through_two_eim_routers_is_direct`: two members each behind an
//!   endpoint-independent router reach each other directly, at the other's mapped
//!   endpoint (its router's public address), and ping both ways over their ULAs.
//! * `a_junk_flood_is_counted_and_harms_nothing`: the attacker floods a live joiner's
//!   WireGuard port from the internet namespace with tens of thousands of datagrams
//!   (random bytes, WireGuard-shaped garbage, bad STUN, bad relay frames and relay control);
//!   the engine counts them by reason in `status --json` drops, the joiner keeps passing
//!   traffic to its peer, and its memory stays bounded (RSS printed before and after).
//! * `members_at_different_home_relays_reach_each_other`: two relays in the lab's internet
//!   ([`RELAY`] and [`RELAY2`]), both advertised by the coordinator (`--relay-url`); two
//!   members behind endpoint-dependent ("symmetric") NATs, each made to measure one relay
//!   slower (its first TCP SYN there dropped: one retransmission, about 1 s more), so the
//!   left one is homed at the first relay and the right one at the second. Each reaches the
//!   other through the *other's* home relay (`peers --json`: path `relay`, `relay` = the
//!   peer's home relay URL), the coordinator's roster carries both home relays, and pings
//!   pass both ways.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tabbify_api::NatClass;
use tabbify_tests::admin::Admin;
use tabbify_tests::joiner::Joiner;
use tabbify_tests::labmesh::{junk_flood, relay2_url, relay_url, rss_kib, LabMesh};
use tabbify_tests::natlab::{RELAY, RELAY2, RELAY_TCP_PORT};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::{ping, wait_ping};
use tabbify_tests::{NatLab, RouterKind};

/// The joiners' WireGuard port.
const PORT: u16 = 51820;
/// Heartbeats every 2 s: new STUN results and roster changes spread fast.
const HEARTBEAT_SECS: u64 = 2;
/// A full STUN round with no answer takes 7 requests (RTO 0.5 s doubling) and 16 RTOs of
/// final wait, 39.5 s: the `udp_blocked` verdict comes only after it.
const BLOCKED_VERDICT: Duration = Duration::from_secs(60);

fn prerequisites() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Nft, Tool::Ping, Tool::Curl])?;
    tabbify_tests::bins::tabbify_mesh().map(drop)
}

fn wait_class(joiner: &mut Joiner, class: NatClass, timeout: Duration) -> Result<Vec<SocketAddr>> {
    let status = joiner.wait_status(&format!("to classify as {class:?}"), timeout, |s| {
        s.nat == class
    })?;
    Ok(status.mapped_endpoints)
}

#[test]
fn joiners_classify_the_lab_routers() -> Result<()> {
    prerequisites()?;
    let lab = NatLab::new("class", RouterKind::EndpointDependent, RouterKind::Double)?;
    let mesh = LabMesh::start(&lab, HEARTBEAT_SECS)?;
    let mut edm = mesh.join(&lab.left.netns, mesh.spec("edm")?)?;
    let mut double = mesh.join(&lab.right.netns, mesh.spec("double")?)?;
    let edm_mapped = wait_class(
        &mut edm,
        NatClass::EndpointDependent,
        Duration::from_secs(20),
    )
    .with_context(|| lab.left.describe())?;
    ensure!(
        edm_mapped.len() >= 2
            && edm_mapped
                .iter()
                .all(|m| m.ip() == IpAddr::from(lab.left.public)),
        "an endpoint-dependent mapping shows two ports at the router's address {}: {edm_mapped:?}",
        lab.left.public
    );
    let double_mapped = wait_class(
        &mut double,
        NatClass::EndpointIndependent,
        Duration::from_secs(20),
    )
    .with_context(|| lab.right.describe())?;
    ensure!(
        double_mapped == [SocketAddr::new(lab.right.public.into(), PORT)],
        "the double NAT maps to the outer router's address, port kept: {double_mapped:?}"
    );
    // The other member sees the class through the roster.
    edm.wait_peer(
        "double",
        "with its NAT class",
        Duration::from_secs(10),
        |p| p.nat == NatClass::EndpointIndependent,
    )?;
    double.wait_peer("edm", "with its NAT class", Duration::from_secs(10), |p| {
        p.nat == NatClass::EndpointDependent
    })?;
    println!(
        "edm: endpoint_dependent {edm_mapped:?}; double: endpoint_independent {double_mapped:?}"
    );

    let lab = NatLab::new("blocked", RouterKind::UdpBlocked, RouterKind::None)?;
    let mesh = LabMesh::start(&lab, HEARTBEAT_SECS)?;
    let started = Instant::now();
    let mut blocked = mesh.join(&lab.left.netns, mesh.spec("blocked")?)?;
    let mut public = mesh.join(&lab.right.netns, mesh.spec("public")?)?;
    wait_class(&mut public, NatClass::None, Duration::from_secs(20))?;
    let mapped = wait_class(&mut blocked, NatClass::UdpBlocked, BLOCKED_VERDICT)
        .with_context(|| lab.left.describe())?;
    ensure!(mapped.is_empty(), "no mapping without UDP: {mapped:?}");
    blocked.wait_status(
        "to stay registered over TCP",
        Duration::from_secs(10),
        |s| s.registered && s.coordinator.connected,
    )?;
    public.wait_peer(
        "blocked",
        "with its NAT class",
        Duration::from_secs(10),
        |p| p.nat == NatClass::UdpBlocked,
    )?;
    println!(
        "udp-blocked: udp_blocked after {:.1} s (a STUN round without answers)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn hole_punching_through_two_eim_routers_is_direct() -> Result<()> {
    prerequisites()?;
    let lab = NatLab::new(
        "punch",
        RouterKind::EndpointIndependent,
        RouterKind::EndpointIndependent,
    )?;
    let mesh = LabMesh::start(&lab, HEARTBEAT_SECS)?;
    let mut left = mesh.join(&lab.left.netns, mesh.spec("left")?)?;
    let mut right = mesh.join(&lab.right.netns, mesh.spec("right")?)?;
    let started = Instant::now();
    let left_public = SocketAddr::new(lab.left.public.into(), PORT);
    let right_public = SocketAddr::new(lab.right.public.into(), PORT);
    wait_class(
        &mut left,
        NatClass::EndpointIndependent,
        Duration::from_secs(20),
    )?;
    wait_class(
        &mut right,
        NatClass::EndpointIndependent,
        Duration::from_secs(20),
    )?;
    let timeout = Duration::from_secs(20);
    let to_right = left
        .wait_peer(
            "right",
            "handshaken at right's mapped endpoint",
            timeout,
            |p| p.endpoint == Some(right_public) && p.latest_handshake.is_some(),
        )
        .with_context(|| format!("{}\n{}", lab.left.describe(), lab.right.describe()))?;
    let to_left = right.wait_peer(
        "left",
        "handshaken at left's mapped endpoint",
        timeout,
        |p| p.endpoint == Some(left_public) && p.latest_handshake.is_some(),
    )?;
    let handshaken = started.elapsed();
    wait_ping(
        &lab.left.netns,
        to_right.ula.into(),
        Duration::from_secs(10),
    )?;
    wait_ping(
        &lab.right.netns,
        to_left.ula.into(),
        Duration::from_secs(10),
    )?;
    for (netns, ula) in [
        (&lab.left.netns, to_right.ula),
        (&lab.right.netns, to_left.ula),
    ] {
        let stats = ping(netns, ula.into(), 5, "0.2")?;
        ensure!(
            stats.received == 5,
            "ping {ula} from {}: {stats:?}",
            netns.name()
        );
    }
    // Both routers translated the tunnel: the path is through them, not around.
    for member in [&lab.left, &lab.right] {
        let translated = member.translated_packets()?;
        ensure!(translated.iter().all(|n| *n > 0), "{translated:?}");
    }
    println!(
        "eim <-> eim: direct at {right_public} / {left_public}, handshaken {:.2} s after both joined",
        handshaken.as_secs_f64()
    );
    Ok(())
}

#[test]
fn a_junk_flood_is_counted_and_harms_nothing() -> Result<()> {
    prerequisites()?;
    let lab = NatLab::new("flood", RouterKind::None, RouterKind::Double)?;
    let mesh = LabMesh::start(&lab, HEARTBEAT_SECS)?;
    let mut target = mesh.join(&lab.left.netns, mesh.spec("target")?)?;
    let mut peer = mesh.join(&lab.right.netns, mesh.spec("peer")?)?;
    let timeout = Duration::from_secs(20);
    let peer_ula = target
        .wait_peer("peer", "handshaken", timeout, |p| {
            p.latest_handshake.is_some()
        })?
        .ula;
    wait_ping(&lab.left.netns, peer_ula.into(), Duration::from_secs(10))?;
    let target_ula = peer
        .wait_peer("target", "handshaken", timeout, |p| {
            p.latest_handshake.is_some()
        })?
        .ula;

    let pid = target.process().pid();
    let status = target.wait_status("to classify", timeout, |s| s.nat == NatClass::None)?;
    let (before, mapped_before) = (status.drops, status.mapped_endpoints);
    let rcvbuf_before = udp_rcvbuf_errors(&lab.left.netns)?;
    let rss_before = rss_kib(pid)?;
    let victim = SocketAddr::new(lab.left.addr.into(), PORT);
    // Traffic goes on while the flood runs: 40 pings, 50 ms apart.
    let (flood, pings) = std::thread::scope(|scope| {
        let pinger = scope.spawn(|| ping(&lab.right.netns, target_ula.into(), 40, "0.05"));
        let flood = junk_flood(&lab.internet, victim, 8_000, 13);
        let pings = pinger.join().expect("the ping thread panicked");
        (flood, pings)
    });
    let (flood, pings) = (flood?, pings?);
    // What was sent is in the socket or counted; wait for the counters to settle.
    std::thread::sleep(Duration::from_millis(500));
    let status = target.status()?;
    let rss_after = rss_kib(pid)?;
    let delta: Vec<(String, u64)> = status
        .drops
        .iter()
        .map(|(reason, n)| (reason.clone(), n - before.get(reason).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let counted: u64 = delta.iter().map(|(_, n)| n).sum();
    let rcvbuf = udp_rcvbuf_errors(&lab.left.netns)? - rcvbuf_before;
    println!(
        "junk flood: sent {} datagrams {flood:?}; counted drops by reason {delta:?} (total {counted}); \
         lost in the socket buffer {rcvbuf}; joiner RSS {rss_before} KiB before, {rss_after} KiB after; \
         pings during the flood {}/{}",
        flood.total(),
        pings.received,
        pings.transmitted
    );
    let of = |reason: &str| {
        delta
            .iter()
            .find(|(r, _)| r == reason)
            .map_or(0, |(_, n)| *n)
    };
    ensure!(
        of("junk") > 0,
        "random bytes and relay frames are counted as junk: {delta:?}"
    );
    let wireguard_reasons = [
        "malformed_outer",
        "unknown_index",
        "unknown_key",
        "auth",
        "rate_limited",
        "protocol",
    ];
    ensure!(
        wireguard_reasons.iter().map(|r| of(r)).sum::<u64>() > 0,
        "WireGuard-shaped garbage is counted: {delta:?}"
    );
    // Everything but STUN and relay control is the data plane's to drop: each one that
    // reached the socket is counted under some reason.
    let data_plane = counted - of("control_dropped");
    let expected = flood.random + flood.wireguard + flood.relay_frames;
    ensure!(
        data_plane + rcvbuf >= expected,
        "{data_plane} data-plane drops counted and {rcvbuf} lost in the socket buffer, \
         for {expected} junk datagrams sent: {delta:?}"
    );
    ensure!(
        counted <= flood.total(),
        "more drops ({counted}) than datagrams sent ({})",
        flood.total()
    );
    ensure!(
        pings.received > 0,
        "no ping passed during the flood: {pings:?}"
    );
    // After the flood, the tunnel works both ways as before.
    let stats = ping(&lab.right.netns, target_ula.into(), 5, "0.2")?;
    ensure!(stats.received == 5, "after the flood: {stats:?}");
    let stats = ping(&lab.left.netns, peer_ula.into(), 5, "0.2")?;
    ensure!(stats.received == 5, "after the flood: {stats:?}");
    let status = target.wait_status("to stay registered", Duration::from_secs(10), |s| {
        s.registered && s.coordinator.connected
    })?;
    // 8,000 STUN-shaped datagrams from a stranger changed nothing the probe believes.
    ensure!(
        status.nat == NatClass::None && status.mapped_endpoints == mapped_before,
        "the flood changed the STUN result: {:?} {:?}",
        status.nat,
        status.mapped_endpoints
    );
    // Bounded memory: the control queue is preallocated and nothing grows per datagram.
    // 40,000 datagrams of up to 1.4 kB would be 56 MB if kept; allow 16 MiB of noise.
    ensure!(
        rss_after <= rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    Ok(())
}

/// `RcvbufErrors` of the `Udp:` line of `/proc/net/snmp` in `netns`: datagrams the kernel
/// dropped because a socket's receive buffer was full.
fn udp_rcvbuf_errors(netns: &tabbify_tests::Netns) -> Result<u64> {
    let snmp = netns.run("cat", &["/proc/net/snmp"])?;
    let mut lines = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let (names, values) = (lines.next(), lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        anyhow::bail!("no Udp lines in /proc/net/snmp: {snmp}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .context("no RcvbufErrors in /proc/net/snmp")
}

/// Makes `relay` measure about 1 s slower from `netns`: the first TCP SYN from there to
/// `relay`:443 is dropped (nft `quota`: the rule matches until 100 bytes have passed it,
/// i.e. the first 60-byte SYN; the kernel retransmits it after 1 s and that one passes).
/// Later connections (a session there to reach a peer) are not slowed. Table `tbt_home`.
fn slow_first_connect(netns: &tabbify_tests::Netns, relay: std::net::Ipv4Addr) -> Result<()> {
    netns.run("nft", &["add", "table", "ip", "tbt_home"])?;
    netns.run(
        "nft",
        &[
            "add",
            "chain",
            "ip",
            "tbt_home",
            "out",
            "{ type filter hook output priority 0; }",
        ],
    )?;
    let relay = relay.to_string();
    let port = RELAY_TCP_PORT.to_string();
    netns.run(
        "nft",
        &[
            "add",
            "rule",
            "ip",
            "tbt_home",
            "out",
            "ip",
            "daddr",
            &relay,
            "tcp",
            "dport",
            &port,
            "tcp",
            "flags",
            "&",
            "(syn|ack)",
            "==",
            "syn",
            "quota",
            "until",
            "100",
            "bytes",
            "counter",
            "drop",
        ],
    )?;
    Ok(())
}

/// A member's view of the roster from the coordinator (`GET /v1/mesh/peers` with its own
/// certificate): the `home_relay` of the peer whose identity is `peer`.
fn roster_home_relay(client: &Admin, peer: &str) -> Result<Option<String>> {
    let roster = client.expect_ok("GET", "/v1/mesh/peers", None)?;
    let entry = roster["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["identity"] == peer))
        .with_context(|| format!("{peer} is not in the roster: {roster}"))?;
    Ok(entry["home_relay"].as_str().map(str::to_owned))
}

#[test]
fn members_at_different_home_relays_reach_each_other() -> Result<()> {
    prerequisites()?;
    let lab = NatLab::new(
        "homes",
        RouterKind::EndpointDependent,
        RouterKind::EndpointDependent,
    )?;
    let mesh = LabMesh::start_advertising(&lab, HEARTBEAT_SECS, vec![relay_url(), relay2_url()])?;
    let _relay1 = mesh.start_relay(&lab)?;
    let _relay2 = mesh.start_relay2(&lab)?;
    slow_first_connect(&lab.left.netns, RELAY2)?;
    slow_first_connect(&lab.right.netns, RELAY)?;
    let url = mesh.coordinator.url();
    let mut members = Vec::new();
    for (name, netns) in [("home-a", &lab.left.netns), ("home-b", &lab.right.netns)] {
        let cert = mesh.pki.issue_peer(name)?;
        let joiner = Joiner::start(netns, &url, &cert, mesh.spec(name)?)?;
        // The member's own view of the coordinator (mTLS with its certificate).
        members.push((joiner, Admin::new(&lab.internet, &url, cert)));
    }
    let [(mut a, a_client), (mut b, b_client)]: [(Joiner, Admin); 2] = members
        .try_into()
        .map_err(|_| anyhow::anyhow!("two members"))?;
    let timeout = Duration::from_secs(30);
    let home = |j: &mut Joiner, want: String| {
        j.wait_status(&format!("to be homed at {want}"), timeout, |s| {
            s.home_relay.as_deref() == Some(want.as_str())
        })
        .map(drop)
    };
    home(&mut a, relay_url()).with_context(|| format!("{:?}", a.status().map(|s| s.relays)))?;
    home(&mut b, relay2_url()).with_context(|| format!("{:?}", b.status().map(|s| s.relays)))?;
    // The steering did it: each side's first SYN to the other relay was dropped.
    for (who, netns) in [("a", &lab.left.netns), ("b", &lab.right.netns)] {
        let table = netns.run("nft", &["list", "table", "ip", "tbt_home"])?;
        ensure!(
            !table.contains("counter packets 0 "),
            "{who}: no SYN was slowed:\n{table}"
        );
    }

    // Each reaches the other through the other's home relay.
    let pa = a.wait_peer("home-b", "relayed through b's home relay", timeout, |p| {
        p.path == "relay" && p.relay.as_deref() == Some(relay2_url().as_str())
    })?;
    let pb = b.wait_peer("home-a", "relayed through a's home relay", timeout, |p| {
        p.path == "relay" && p.relay.as_deref() == Some(relay_url().as_str())
    })?;
    println!(
        "a → b: path={} relay={:?} reason={:?}; b → a: path={} relay={:?} reason={:?}",
        pa.path, pa.relay, pa.reason, pb.path, pb.relay, pb.reason
    );
    wait_ping(&lab.left.netns, pa.ula.into(), timeout).context("ping a → b")?;
    wait_ping(&lab.right.netns, pb.ula.into(), timeout).context("ping b → a")?;
    for (from, netns, ula) in [
        ("a", &lab.left.netns, pa.ula),
        ("b", &lab.right.netns, pb.ula),
    ] {
        let stats = ping(netns, ula.into(), 5, "0.2")?;
        ensure!(stats.received == 5, "ping from {from}: {stats:?}");
    }
    // Still through the other's home relay after the traffic.
    for (who, j, peer, want) in [
        ("a", &a, "home-b", relay2_url()),
        ("b", &b, "home-a", relay_url()),
    ] {
        let p = j
            .peers()?
            .into_iter()
            .find(|p| p.name == peer)
            .with_context(|| format!("{who} lost {peer}"))?;
        ensure!(
            p.path == "relay" && p.relay.as_deref() == Some(want.as_str()),
            "{who}: {p:?}"
        );
    }

    // The coordinator's roster carries each member's home relay (from its heartbeats).
    let deadline = Instant::now() + timeout;
    loop {
        let b_home = roster_home_relay(&a_client, "home-b")?;
        let a_home = roster_home_relay(&b_client, "home-a")?;
        if b_home.as_deref() == Some(relay2_url().as_str())
            && a_home.as_deref() == Some(relay_url().as_str())
        {
            println!("roster: home-a at {a_home:?}, home-b at {b_home:?}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the roster's home relays: home-a {a_home:?}, home-b {b_home:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}
