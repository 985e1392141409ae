//! Issue 13, the joiner's relayed paths end to end: a real `tabbify-mesh-relay` (certificate
//! from the test PKI) on the NAT lab's `RELAY` address and a coordinator on its `HUB`, both
//! started by [`LabMesh`], and two joiners told `--relay https://198.18.0.2:443`.
//!
//! * `blocked_direct_udp_goes_through_the_relay_then_direct_once_lifted`: UDP between the two
//!   members is dropped by an nft table in the left member's namespace (UDP to the relay and
//!   the coordinator passes). Ping passes over the relay and `peers --json` says `relay`,
//!   the relay URL and the reason; lifting the table turns the pair direct (the time it
//!   took is printed, not asserted).
//! * `a_direct_path_that_goes_silent_falls_back_to_the_relay`: a direct pair whose direct
//!   UDP is then blocked moves to the relay (after one keepalive plus a handshake timeout,
//!   30 s; printed) and ping passes again.
//! * `forced_relay_stays_relayed`: `--force-relay` on one side keeps the pair relayed
//!   although direct UDP works.
//! * `a_restarted_peer_is_reached_through_its_new_relay_session`: with direct UDP blocked,
//!   the right member restarts (same key, new relay session and handle; the relay tells
//!   the left one GONE): the left one looks it up again and ping passes over the relay.
//! * `a_one_way_direct_path_stays_on_the_relay`: a relayed pair where then only the left
//!   member's direct UDP to the right one is dropped (the right one's probes keep arriving
//!   directly): both stay relayed and pings pass both ways for 10 s; lifting the drop
//!   turns both direct.
//! * `a_one_way_direct_path_from_the_start_goes_to_the_relay`: the same drop installed
//!   before the members join: both direct attempts fail (the right one's initiations
//!   arriving directly do not answer the left one's attempt), both go to the relay and
//!   stay, pings pass both ways.
//! * `udp_blocked_member_uses_the_tls_stream`: the left member's UDP is blocked entirely
//!   (only TCP to the relay's port 443 and the coordinator pass): its relay session's UDP
//!   side never binds, and the loopback bridge over the TLS stream carries the traffic.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tabbify_api::local::PeerStatus;
use tabbify_tests::labmesh::{relay_url, LabMesh, TAG};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{traffic, JoinSpec, Joiner, NatLab, Process, RouterKind, Side};

/// How long a path may take to settle in these tests (generous: the machine is shared).
const SETTLE: Duration = Duration::from_secs(30);

/// The lab with a coordinator and a relay in its internet ([`LabMesh`]: the policy lets
/// every `node` member reach every other; heartbeats every 5 s).
struct Bed {
    lab: NatLab,
    mesh: LabMesh,
    _relay: Process,
}

impl Bed {
    fn start(name: &str, left: RouterKind, right: RouterKind) -> Result<Bed> {
        require(&[Tool::Iproute2, Tool::Ping, Tool::Curl, Tool::Nft])?;
        tabbify_tests::bins::tabbify_mesh()?;
        let lab = NatLab::new(name, left, right)?;
        let mesh = LabMesh::start(&lab, 5)?;
        let relay = mesh.start_relay(&lab)?;
        Ok(Bed {
            lab,
            mesh,
            _relay: relay,
        })
    }

    fn join(&self, side: Side, name: &str, force_relay: bool) -> Result<Joiner> {
        let token = self.mesh.admin.create_token(&[TAG], None, 1)?;
        self.join_as(
            side,
            name,
            force_relay,
            Some(token),
            &self.mesh.pki.issue_peer(name)?,
        )
    }

    fn join_as(
        &self,
        side: Side,
        name: &str,
        force_relay: bool,
        token: Option<String>,
        cert: &tabbify_tests::pki::Issued,
    ) -> Result<Joiner> {
        let mut spec = JoinSpec::new(name, &[TAG], token);
        spec.relays = vec![relay_url()];
        spec.force_relay = force_relay;
        Joiner::start(
            &self.lab.member(side).netns,
            &self.mesh.coordinator.url(),
            cert,
            spec,
        )
    }
}

/// Drops UDP between the two members (both directions) in the left member's namespace;
/// UDP to anything else (the relay, the coordinator's STUN) passes.
fn block_direct(lab: &NatLab) -> Result<()> {
    let other = lab.right.public.to_string();
    let ns = &lab.left.netns;
    ns.run("nft", &["add", "table", "ip", "tbt_p2p"])?;
    for (chain, hook, dir) in [("out", "output", "daddr"), ("in", "input", "saddr")] {
        ns.run(
            "nft",
            &[
                "add",
                "chain",
                "ip",
                "tbt_p2p",
                chain,
                &format!("{{ type filter hook {hook} priority 0; }}"),
            ],
        )?;
        ns.run(
            "nft",
            &[
                "add", "rule", "ip", "tbt_p2p", chain, "ip", dir, &other, "meta", "l4proto", "udp",
                "drop",
            ],
        )?;
    }
    Ok(())
}

fn lift_direct_block(lab: &NatLab) -> Result<()> {
    lab.left
        .netns
        .run("nft", &["delete", "table", "ip", "tbt_p2p"])
        .map(drop)
}

fn show(who: &str, p: &PeerStatus) {
    println!(
        "{who}: peer {} path={} relay={:?} endpoint={:?} reason={:?} direct_endpoint={:?}",
        p.name, p.path, p.relay, p.endpoint, p.reason, p.direct_endpoint
    );
}

fn relayed(p: &PeerStatus) -> bool {
    p.path == "relay" && p.relay.as_deref() == Some(relay_url().as_str())
}

#[test]
fn blocked_direct_udp_goes_through_the_relay_then_direct_once_lifted() -> Result<()> {
    let bed = Bed::start("rj-lift", RouterKind::None, RouterKind::None)?;
    block_direct(&bed.lab)?;
    let mut a = bed.join(Side::Left, "rj-a", false)?;
    let mut b = bed.join(Side::Right, "rj-b", false)?;
    let b_ula = b.status()?.ula;
    let a_ula = a.status()?.ula;
    let pa = a.wait_peer("rj-b", "to be relayed", SETTLE, relayed)?;
    show("a", &pa);
    ensure!(
        pa.reason.is_some(),
        "a relayed peer without a reason: {pa:?}"
    );
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE)
        .context("ping a → b over the relay")?;
    traffic::wait_ping(&b.lab_ns(), IpAddr::V6(a_ula), SETTLE)
        .context("ping b → a over the relay")?;
    let pb = b.wait_peer("rj-a", "to be relayed", SETTLE, relayed)?;
    show("b", &pb);
    let st = a.status()?;
    ensure!(
        st.home_relay.as_deref() == Some(relay_url().as_str()),
        "home relay {:?}",
        st.home_relay
    );
    // `status` and `peers` say the same in words.
    let text = a.local_command(&["status"])?;
    println!("{text}");
    let words = format!(
        "relayed via {} ({})",
        relay_url(),
        pa.reason.as_deref().unwrap_or_default()
    );
    ensure!(text.contains(&words), "`status` lacks {words:?}:\n{text}");
    ensure!(
        text.contains(&format!("home relay:  {}", relay_url()))
            && text.contains("session up, UDP bound"),
        "`status` lacks the home relay:\n{text}"
    );
    let text = a.local_command(&["peers"])?;
    ensure!(text.contains(&words), "`peers` lacks {words:?}:\n{text}");

    let lifted = Instant::now();
    lift_direct_block(&bed.lab)?;
    let pa = a.wait_peer("rj-b", "to turn direct", SETTLE, |p| p.path == "direct")?;
    let took_a = lifted.elapsed();
    let pb = b.wait_peer("rj-a", "to turn direct", SETTLE, |p| p.path == "direct")?;
    let took_b = lifted.elapsed();
    show("a", &pa);
    show("b", &pb);
    ensure!(pa.reason.is_none() && pa.relay.is_none(), "{pa:?}");
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE).context("ping a → b direct")?;
    println!(
        "direct again after the block was lifted: a in {:.2} s, b in {:.2} s",
        took_a.as_secs_f64(),
        took_b.as_secs_f64()
    );
    Ok(())
}

/// Drops UDP from the left member to the right one only (output hook in the left
/// member's namespace), counting what it drops; counts (and passes) UDP from the right
/// one. Table `tbt_1way`.
fn block_left_to_right(lab: &NatLab) -> Result<()> {
    let other = lab.right.public.to_string();
    let ns = &lab.left.netns;
    ns.run("nft", &["add", "table", "ip", "tbt_1way"])?;
    for (chain, hook, dir, verdict) in [
        ("out", "output", "daddr", "drop"),
        ("in", "input", "saddr", "accept"),
    ] {
        ns.run(
            "nft",
            &[
                "add",
                "chain",
                "ip",
                "tbt_1way",
                chain,
                &format!("{{ type filter hook {hook} priority 0; }}"),
            ],
        )?;
        ns.run(
            "nft",
            &[
                "add", "rule", "ip", "tbt_1way", chain, "ip", dir, &other, "meta", "l4proto",
                "udp", "counter", verdict,
            ],
        )?;
    }
    Ok(())
}

/// The packet counters of `tbt_1way`: (dropped left → right, passed right → left).
fn one_way_counters(lab: &NatLab) -> Result<(u64, u64)> {
    let text = lab
        .left
        .netns
        .run("nft", &["list", "table", "ip", "tbt_1way"])?;
    let packets = |verdict: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.contains("counter") && l.trim_end().ends_with(verdict))
            .with_context(|| format!("no {verdict} counter in:\n{text}"))?;
        let n = line
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .with_context(|| format!("no packet count in {line:?}"))?;
        n.parse().with_context(|| format!("packet count {n:?}"))
    };
    Ok((packets("drop")?, packets("accept")?))
}

/// The one-way direct path (issue 13): the pair is relayed, then only the left member's
/// direct sends to the right one are dropped (a firewall on one side; the right member's
/// direct datagrams, its 500 ms probes included, still arrive). Neither side may switch
/// to direct: the left one would black-hole its sends. Both stay relayed for 10 s while
/// the right one keeps probing (the nft counters show its probes arriving and the left
/// side's answers dropped), pings pass both ways throughout; lifting the drop turns both
/// direct.
#[test]
fn a_one_way_direct_path_stays_on_the_relay() -> Result<()> {
    let bed = Bed::start("rj-1way", RouterKind::None, RouterKind::None)?;
    block_direct(&bed.lab)?;
    let mut a = bed.join(Side::Left, "rj-oa", false)?;
    let mut b = bed.join(Side::Right, "rj-ob", false)?;
    let a_ula = a.status()?.ula;
    let b_ula = b.status()?.ula;
    a.wait_peer("rj-ob", "to be relayed", SETTLE, relayed)?;
    b.wait_peer("rj-oa", "to be relayed", SETTLE, relayed)?;
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE).context("ping a → b")?;
    traffic::wait_ping(&b.lab_ns(), IpAddr::V6(a_ula), SETTLE).context("ping b → a")?;

    // Only b → a direct passes from now on.
    block_left_to_right(&bed.lab)?;
    lift_direct_block(&bed.lab)?;
    let before = one_way_counters(&bed.lab)?;
    let held = Instant::now();
    let mut rounds = 0;
    while held.elapsed() < Duration::from_secs(10) || rounds < 10 {
        rounds += 1;
        for (who, j, other) in [("a", &a, "rj-ob"), ("b", &b, "rj-oa")] {
            let p = j
                .peers()?
                .into_iter()
                .find(|p| p.name == other)
                .with_context(|| format!("{who} lost its peer"))?;
            ensure!(
                relayed(&p),
                "{who} left the relay with only b → a open (round {rounds}, {:.1} s): {p:?}",
                held.elapsed().as_secs_f64()
            );
        }
        for (who, ns, to) in [("a → b", a.lab_ns(), b_ula), ("b → a", b.lab_ns(), a_ula)] {
            let stats = traffic::ping(&ns, IpAddr::V6(to), 2, "0.2")?;
            ensure!(
                stats.received == stats.transmitted,
                "ping {who} lost packets in round {rounds}: {stats:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = one_way_counters(&bed.lab)?;
    println!(
        "one-way for {:.1} s ({rounds} rounds): a's direct sends dropped {}, b's direct datagrams arrived {}",
        held.elapsed().as_secs_f64(),
        after.0 - before.0,
        after.1 - before.1
    );
    ensure!(
        after.1 - before.1 >= 10,
        "b's direct probes did not keep arriving at a: {before:?} → {after:?}"
    );
    ensure!(
        after.0 > before.0,
        "a sent nothing direct (no answers to b's probes, no probes): {before:?} → {after:?}"
    );

    let lifted = Instant::now();
    bed.lab
        .left
        .netns
        .run("nft", &["delete", "table", "ip", "tbt_1way"])?;
    let pa = a.wait_peer("rj-ob", "to turn direct", SETTLE, |p| p.path == "direct")?;
    let pb = b.wait_peer("rj-oa", "to turn direct", SETTLE, |p| p.path == "direct")?;
    show("a", &pa);
    show("b", &pb);
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE).context("ping a → b direct")?;
    traffic::wait_ping(&b.lab_ns(), IpAddr::V6(a_ula), SETTLE).context("ping b → a direct")?;
    println!(
        "both direct {:.2} s after the one-way drop was lifted",
        lifted.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The one-way direct path from the start: before the members join, only the left one's
/// direct UDP to the right one is dropped. Neither direct attempt may count as answered
/// (the right one's initiations reach the left one directly, but prove nothing about the
/// left one's sends): both go to the relay ("no direct handshake after 1.5 s") and stay
/// there while the right one keeps probing, and pings pass both ways.
#[test]
fn a_one_way_direct_path_from_the_start_goes_to_the_relay() -> Result<()> {
    let bed = Bed::start("rj-1start", RouterKind::None, RouterKind::None)?;
    block_left_to_right(&bed.lab)?;
    let started = Instant::now();
    let mut a = bed.join(Side::Left, "rj-sa", false)?;
    let mut b = bed.join(Side::Right, "rj-sb", false)?;
    let a_ula = a.status()?.ula;
    let b_ula = b.status()?.ula;
    let pa = a.wait_peer("rj-sb", "to be relayed", SETTLE, relayed)?;
    let pb = b.wait_peer("rj-sa", "to be relayed", SETTLE, relayed)?;
    println!(
        "both relayed {:.2} s after joining",
        started.elapsed().as_secs_f64()
    );
    show("a", &pa);
    show("b", &pb);
    // a's attempt failed as an attempt (not after 30 s of silence on a dead direct path).
    ensure!(
        pa.reason.as_deref() == Some("no direct handshake after 1.5 s"),
        "a's direct attempt counted as answered: {pa:?}"
    );
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE).context("ping a → b")?;
    traffic::wait_ping(&b.lab_ns(), IpAddr::V6(a_ula), SETTLE).context("ping b → a")?;
    let before = one_way_counters(&bed.lab)?;
    for round in 1..=5 {
        for (who, j, other) in [("a", &a, "rj-sb"), ("b", &b, "rj-sa")] {
            let p = j
                .peers()?
                .into_iter()
                .find(|p| p.name == other)
                .with_context(|| format!("{who} lost its peer"))?;
            ensure!(
                relayed(&p),
                "{who} left the relay with only b → a open (round {round}): {p:?}"
            );
        }
        for (who, ns, to) in [("a → b", a.lab_ns(), b_ula), ("b → a", b.lab_ns(), a_ula)] {
            let stats = traffic::ping(&ns, IpAddr::V6(to), 2, "0.2")?;
            ensure!(
                stats.received == stats.transmitted,
                "ping {who} lost packets in round {round}: {stats:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = one_way_counters(&bed.lab)?;
    ensure!(
        after.1 > before.1,
        "b's direct probes did not arrive at a: {before:?} → {after:?}"
    );
    Ok(())
}

#[test]
fn a_restarted_peer_is_reached_through_its_new_relay_session() -> Result<()> {
    let bed = Bed::start("rj-gone", RouterKind::None, RouterKind::None)?;
    block_direct(&bed.lab)?;
    let mut a = bed.join(Side::Left, "rj-ga", false)?;
    let b_cert = bed.mesh.pki.issue_peer("rj-gb")?;
    let token = bed.mesh.admin.create_token(&[TAG], None, 1)?;
    let b = bed.join_as(Side::Right, "rj-gb", false, Some(token), &b_cert)?;
    let b_ula = b.status()?.ula;
    a.wait_peer("rj-gb", "to be relayed", SETTLE, relayed)?;
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE).context("ping before")?;
    b.stop()?;
    // The same name in the same namespace finds its node key: admitted before, no token.
    let restarted = Instant::now();
    let b = bed.join_as(Side::Right, "rj-gb", false, None, &b_cert)?;
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE)
        .context("ping a → b after b's restart")?;
    println!(
        "a reached the restarted b over the relay {:.2} s after the restart began",
        restarted.elapsed().as_secs_f64()
    );
    let p = a.wait_peer("rj-gb", "to be relayed", SETTLE, relayed)?;
    show("a", &p);
    drop(b);
    Ok(())
}

#[test]
fn a_direct_path_that_goes_silent_falls_back_to_the_relay() -> Result<()> {
    let bed = Bed::start("rj-silent", RouterKind::None, RouterKind::None)?;
    let mut a = bed.join(Side::Left, "rj-sa", false)?;
    let mut b = bed.join(Side::Right, "rj-sb", false)?;
    let b_ula = b.status()?.ula;
    a.wait_peer("rj-sb", "to be direct", SETTLE, |p| p.direct)?;
    b.wait_peer("rj-sa", "to be direct", SETTLE, |p| p.direct)?;
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE).context("ping direct")?;
    // Past the 1.5 s direct window: a working direct pair stays direct, without a reason
    // (its first handshake may complete before the path manager first sees the peer).
    std::thread::sleep(Duration::from_secs(2));
    for (j, other) in [(&a, "rj-sb"), (&b, "rj-sa")] {
        let p = j
            .peers()?
            .into_iter()
            .find(|p| p.name == other)
            .context("peer gone")?;
        ensure!(
            p.path == "direct" && p.reason.is_none(),
            "not plainly direct: {p:?}"
        );
    }
    block_direct(&bed.lab)?;
    let blocked = Instant::now();
    let p = a.wait_peer(
        "rj-sb",
        "to fall back to the relay",
        Duration::from_secs(60),
        relayed,
    )?;
    let took = blocked.elapsed();
    show("a", &p);
    ensure!(
        p.reason.as_deref() == Some("direct path silent for 30 s"),
        "{p:?}"
    );
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE)
        .context("ping over the relay after the fallback")?;
    println!(
        "a fell back to the relay {:.1} s after direct UDP was blocked",
        took.as_secs_f64()
    );
    Ok(())
}

#[test]
fn forced_relay_stays_relayed() -> Result<()> {
    let bed = Bed::start("rj-force", RouterKind::None, RouterKind::None)?;
    let mut a = bed.join(Side::Left, "rj-fa", true)?;
    let b = bed.join(Side::Right, "rj-fb", false)?;
    let b_ula = b.status()?.ula;
    let p = a.wait_peer("rj-fb", "to be relayed (forced)", SETTLE, relayed)?;
    show("a", &p);
    ensure!(
        p.reason.as_deref() == Some("relay forced (--force-relay)"),
        "{p:?}"
    );
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE)
        .context("ping a → b over the forced relay")?;
    // Direct works both ways, and probes from b arrive: still relayed.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        let p = a
            .peers()?
            .into_iter()
            .find(|p| p.name == "rj-fb")
            .context("peer rj-fb gone")?;
        ensure!(relayed(&p), "a forced relay turned direct: {p:?}");
    }
    traffic::ping(&a.lab_ns(), IpAddr::V6(b_ula), 3, "0.2")?;
    Ok(())
}

#[test]
fn udp_blocked_member_uses_the_tls_stream() -> Result<()> {
    let bed = Bed::start("rj-tls", RouterKind::UdpBlocked, RouterKind::None)?;
    let mut a = bed.join(Side::Left, "rj-ta", false)?;
    let mut b = bed.join(Side::Right, "rj-tb", false)?;
    let a_ula = a.status()?.ula;
    let b_ula = b.status()?.ula;
    let pa = a.wait_peer("rj-tb", "to be relayed", SETTLE, relayed)?;
    show("a", &pa);
    let st = a.wait_status("to hold a relay session without UDP", SETTLE, |s| {
        s.relays.iter().any(|r| r.session && !r.udp_bound)
    })?;
    println!("a's relays: {:?}", st.relays);
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE)
        .context("ping a → b over the TLS stream")?;
    traffic::wait_ping(&b.lab_ns(), IpAddr::V6(a_ula), SETTLE)
        .context("ping b → a over the TLS stream")?;
    let pb = b.wait_peer("rj-ta", "to be relayed", SETTLE, relayed)?;
    show("b", &pb);
    let st = a.status()?;
    ensure!(
        st.relays.iter().all(|r| !r.udp_bound),
        "UDP bound through the block: {:?}",
        st.relays
    );
    Ok(())
}

/// The joiner's namespace (a shorthand).
trait LabNs {
    fn lab_ns(&self) -> tabbify_tests::Netns;
}

impl LabNs for Joiner {
    fn lab_ns(&self) -> tabbify_tests::Netns {
        self.netns().clone()
    }
}

/// Both sides behind endpoint-dependent NATs: no direct path can open (each side's mapping
/// towards the other is unknown), so the pair is relayed, and the reason names the NAT
/// once the STUN probe has classified it.
#[test]
fn endpoint_dependent_nats_on_both_sides_stay_relayed_and_say_why() -> Result<()> {
    let bed = Bed::start(
        "rj-edm",
        RouterKind::EndpointDependent,
        RouterKind::EndpointDependent,
    )?;
    let mut a = bed.join(Side::Left, "rj-ea", false)?;
    let mut b = bed.join(Side::Right, "rj-eb", false)?;
    let a_ula = a.status()?.ula;
    let b_ula = b.status()?.ula;
    traffic::wait_ping(&a.lab_ns(), IpAddr::V6(b_ula), SETTLE).context("ping a → b")?;
    traffic::wait_ping(&b.lab_ns(), IpAddr::V6(a_ula), SETTLE).context("ping b → a")?;
    let p = a.wait_peer("rj-eb", "to be relayed naming the NAT", SETTLE, |p| {
        relayed(p)
            && p.reason.as_deref().is_some_and(|r| {
                r == "endpoint-dependent NAT here" || r == "peer behind an endpoint-dependent NAT"
            })
    });
    match &p {
        Ok(p) => show("a", p),
        Err(e) => println!("{e:#}"),
    }
    p?;
    let q = b.wait_peer("rj-ea", "to be relayed", SETTLE, relayed)?;
    show("b", &q);
    Ok(())
}
