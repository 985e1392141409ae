//! Issue 13, Deliver 5: every pair of NAT lab router kinds connects, directly where both
//! sides allow it and through the relay otherwise.
//!
//! One lab, one coordinator on [`HUB`], one `tabbify-mesh-relay` on [`RELAY`] (TCP and
//! UDP 443; the UDP-blocking routers let TCP 443 to it through) and two members of every
//! [`RouterKind`] (`none-a`, `none-b`, `eim-a`, …), ten joiners in one mesh, each given
//! `--relay https://RELAY:443`. For every unordered pair of kinds (the same kind on both
//! sides included: `K-a` with `K-b`; different kinds: `K1-a` with `K2-b`) the test pings
//! both ways over the peers' ULAs and reads both sides' `peers --json` `path`: `direct`
//! when neither side is endpoint-dependent or UDP-blocked, and also for an
//! endpoint-dependent member with a public one (nothing filters the public side, so the
//! direct path works; [`RouterKind::pair_is_direct`] says why), `relay` otherwise. It prints the matrix (kinds ×
//! kinds: path and the first-packet time, from the moment every joiner listed all its
//! peers to the first ping reply). Then it lifts the UDP block of a relayed pair and
//! prints how long until both sides say `direct`.
//!
//! Needs the joiner's relay support (`--relay`, `peers --json` `path`) and the relay
//! binary (`cargo build -p tabbify-relay --bin tabbify-mesh-relay`).

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tabbify_tests::labmesh::{relay_url, LabMesh};
use tabbify_tests::natlab::{Member, HUB, RELAY};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::{ping, wait_ping};
use tabbify_tests::{Joiner, NatLab, RouterKind};

/// Heartbeats every 2 s, so NAT classes reach the roster quickly.
const HEARTBEAT_SECS: u64 = 2;
/// How long a pair may take to pass its first packet (the bound is 3 s; the test
/// waits longer so that a slow pair is reported with its time rather than as a failure).
const FIRST_PACKET_WAIT: Duration = Duration::from_secs(30);
/// How long a pair's path may take to settle on what its kinds call for.
const PATH_WAIT: Duration = Duration::from_secs(30);
/// How long a relayed pair may take to turn direct once its block is lifted (the next
/// STUN round, up to 60 s, is the slowest thing that could be waited for).
const LIFT_WAIT: Duration = Duration::from_secs(75);

struct Node {
    kind: RouterKind,
    name: String,
    member: Member,
    joiner: Joiner,
}

/// What one pair did.
struct Outcome {
    first_packet: Result<Duration>,
    back: Result<()>,
    path: Result<String>,
}

fn path_of(joiner: &Joiner, peer: &str) -> Result<(String, serde_json::Value)> {
    let peers = joiner.peers_json()?;
    let entry = peers
        .iter()
        .find(|p| p["name"] == peer)
        .with_context(|| format!("{} does not list {peer}", joiner.name()))?;
    let path = entry["path"].as_str().with_context(|| {
        format!(
            "`peers --json` of {} has no `path` for {peer} (the joiner's relay support, \
             issue 13, is not built in): {entry}",
            joiner.name()
        )
    })?;
    Ok((path.to_owned(), entry.clone()))
}

/// Polls both sides until each says `want` for the other; returns the elapsed time.
fn wait_path(a: &Node, b: &Node, want: &str, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let ab = path_of(&a.joiner, &b.name)?;
        let ba = path_of(&b.joiner, &a.name)?;
        if ab.0 == want && ba.0 == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "after {:.1} s: {} says {} for {} ({}), {} says {} ({})",
                start.elapsed().as_secs_f64(),
                a.name,
                ab.0,
                b.name,
                ab.1,
                b.name,
                ba.0,
                ba.1
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ula_of(from: &Joiner, peer: &str) -> Result<Ipv6Addr> {
    from.peers()?
        .into_iter()
        .find(|p| p.name == peer)
        .map(|p| p.ula)
        .with_context(|| format!("{} does not list {peer}", from.name()))
}

#[test]
fn every_pair_of_router_kinds_connects_on_the_expected_path() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Nft, Tool::Ping, Tool::Curl])?;
    tabbify_tests::bins::tabbify_mesh()?;
    let begun = Instant::now();
    let lab = NatLab::new("matrix", RouterKind::None, RouterKind::None)?;
    let mesh = LabMesh::start(&lab, HEARTBEAT_SECS)?;
    let _relay = mesh.start_relay(&lab)?;

    let mut members: Vec<(RouterKind, String, Member)> = vec![
        (RouterKind::None, "none-a".to_owned(), lab.left.clone()),
        (RouterKind::None, "none-b".to_owned(), lab.right.clone()),
    ];
    for kind in RouterKind::ALL
        .into_iter()
        .filter(|k| *k != RouterKind::None)
    {
        for suffix in ["a", "b"] {
            let short = match kind {
                RouterKind::EndpointIndependent => "ei",
                RouterKind::EndpointDependent => "ed",
                RouterKind::Double => "db",
                _ => "ub",
            };
            let label = format!("{short}{suffix}");
            members.push((
                kind,
                format!("{}-{suffix}", kind.short()),
                lab.add_member(&label, kind)?,
            ));
        }
    }
    let mut nodes = Vec::new();
    for (kind, name, member) in members {
        let mut spec = mesh.spec(&name)?;
        spec.relays = vec![relay_url()];
        let joiner = mesh.join(&member.netns, spec)?;
        nodes.push(Node {
            kind,
            name,
            member,
            joiner,
        });
    }
    let everyone: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    for node in &mut nodes {
        let others: Vec<&str> = everyone
            .iter()
            .filter(|n| **n != node.name)
            .map(String::as_str)
            .collect();
        node.joiner
            .wait_peer_names(&others, Duration::from_secs(20))?;
    }
    let node = |kind: RouterKind, suffix: &str| -> &Node {
        let name = format!("{}-{suffix}", kind.short());
        nodes
            .iter()
            .find(|n| n.name == name)
            .expect("every kind has an a and a b member")
    };
    let mut pairs: Vec<(&Node, &Node)> = Vec::new();
    for (i, ka) in RouterKind::ALL.iter().enumerate() {
        for kb in &RouterKind::ALL[i..] {
            pairs.push((node(*ka, "a"), node(*kb, "b")));
        }
    }
    let mut ulas = Vec::new();
    for (a, b) in &pairs {
        ulas.push((ula_of(&a.joiner, &b.name)?, ula_of(&b.joiner, &a.name)?));
    }
    let setup = begun.elapsed();

    // Every pair at once: the first packet a → b, then b → a.
    let t0 = Instant::now();
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .iter()
            .zip(&ulas)
            .map(|((a, b), (b_ula, a_ula))| {
                scope.spawn(move || {
                    let first_packet =
                        wait_ping(&a.member.netns, (*b_ula).into(), FIRST_PACKET_WAIT)
                            .map(|()| t0.elapsed());
                    let back = wait_ping(&b.member.netns, (*a_ula).into(), FIRST_PACKET_WAIT);
                    let want = if a.kind.pair_is_direct(b.kind) {
                        "direct"
                    } else {
                        "relay"
                    };
                    let path = wait_path(a, b, want, PATH_WAIT).map(|_| want.to_owned());
                    Outcome {
                        first_packet,
                        back,
                        path,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a pair's thread panicked"))
            .collect()
    });

    let mut cells: BTreeMap<(usize, usize), String> = BTreeMap::new();
    let mut failures = Vec::new();
    for (((a, b), outcome), (b_ula, a_ula)) in pairs.iter().zip(&outcomes).zip(&ulas) {
        let ia = RouterKind::ALL
            .iter()
            .position(|k| *k == a.kind)
            .unwrap_or(0);
        let ib = RouterKind::ALL
            .iter()
            .position(|k| *k == b.kind)
            .unwrap_or(0);
        // A wrong path shows what both sides say now and what the kinds call for.
        let path = match &outcome.path {
            Ok(path) => path.clone(),
            Err(_) => {
                let seen = |x: &Node, y: &Node| {
                    path_of(&x.joiner, &y.name).map_or_else(|_| "?".to_owned(), |p| p.0)
                };
                let want = if a.kind.pair_is_direct(b.kind) {
                    "direct"
                } else {
                    "relay"
                };
                format!("{}/{}!={want}", seen(a, b), seen(b, a))
            }
        };
        let cell = match &outcome.first_packet {
            Ok(t) => format!("{path} {:.2}s", t.as_secs_f64()),
            Err(_) => format!("{path} no ping"),
        };
        cells.insert((ia, ib), cell.clone());
        cells.insert((ib, ia), cell);
        let pair = format!("{} ({}) <-> {} ({})", a.name, a.kind, b.name, b.kind);
        if let Err(e) = &outcome.first_packet {
            failures.push(format!("{pair}: no ping {} -> {b_ula}: {e:#}", a.name));
        }
        if let Err(e) = &outcome.back {
            failures.push(format!("{pair}: no ping {} -> {a_ula}: {e:#}", b.name));
        }
        if let Err(e) = &outcome.path {
            failures.push(format!("{pair}: path: {e:#}"));
        }
    }
    let width = 24;
    let mut table = format!("{:<12}", "");
    for kind in RouterKind::ALL {
        table.push_str(&format!("{:<width$} ", kind.short()));
    }
    table.push('\n');
    for (i, kind) in RouterKind::ALL.iter().enumerate() {
        table.push_str(&format!("{:<12}", kind.short()));
        for j in 0..RouterKind::ALL.len() {
            let cell = cells.get(&(i, j)).map_or("-", String::as_str);
            table.push_str(&format!("{cell:<width$} "));
        }
        table.push('\n');
    }
    println!(
        "NAT lab matrix (coordinator {HUB}, relay {RELAY}; cell: path of both sides and the \
         time from all joiners up to the first ping reply):\n{table}\
         setup {:.1} s (10 joiners, 21 namespaces), pairs {:.1} s",
        setup.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    // A relayed pair whose blocking rule is lifted turns direct.
    let (open, blocked) = (
        node(RouterKind::None, "a"),
        node(RouterKind::UdpBlocked, "b"),
    );
    match wait_path(open, blocked, "relay", PATH_WAIT) {
        Ok(_) => {
            blocked.member.lift_udp_block()?;
            match wait_path(open, blocked, "direct", LIFT_WAIT) {
                Ok(took) => {
                    let ula = ula_of(&open.joiner, &blocked.name)?;
                    let stats = ping(&open.member.netns, ula.into(), 5, "0.2")?;
                    if stats.received != 5 {
                        failures.push(format!("after the lift: {stats:?}"));
                    }
                    println!(
                        "{} <-> {}: direct {:.2} s after the UDP block was lifted",
                        open.name,
                        blocked.name,
                        took.as_secs_f64()
                    );
                }
                Err(e) => failures.push(format!("after the lift: {e:#}")),
            }
        }
        Err(e) => failures.push(format!("before the lift: {e:#}")),
    }
    println!("whole test {:.1} s", begun.elapsed().as_secs_f64());
    if !failures.is_empty() {
        bail!("{} failures:\n{}", failures.len(), failures.join("\n"));
    }
    Ok(())
}
