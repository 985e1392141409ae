//! Issue 13: a member whose underlay address changes tells the coordinator at once.
//!
//! `a_moved_member_reaches_the_roster_within_5_s`: a coordinator with 10 s heartbeats in
//! the NAT lab's internet; `mover` and `watcher` with public addresses
//! ([`RouterKind::None`]). [`NatLab::move_member`] gives `mover` a new address (added, then
//! the old one deleted). `mover` notices through netlink, heartbeats from the new address
//! and reopens its stream; `watcher`'s table must point at the new endpoint within 5 s,
//! half a heartbeat interval (so the regular heartbeat alone would usually be too late),
//! and `mover` must log the netlink trigger, be connected again and report the STUN
//! mapping of its new address (never the old one: the coordinator refuses that).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tabbify_tests::admin::Admin;
use tabbify_tests::coordinator::{Coordinator, CoordinatorSpec};
use tabbify_tests::natlab::HUB;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::testbed::{ADMIN, COORDINATOR_PORT};
use tabbify_tests::{JoinSpec, Joiner, NatLab, Pki, RouterKind, Side};

/// The issue's bound for a moved member to recover.
const BOUND: Duration = Duration::from_secs(5);

/// Heartbeat interval: twice the bound, so that the regular heartbeat is not what passes.
const HEARTBEAT_SECS: u64 = 10;

// After a move the joiner drops its STUN mapping (the coordinator refuses a heartbeat
// carrying the old address's mapping with a 400), re-probes at once, and heartbeats once
// the address set has been quiet for 300 ms (the move is an add, then a delete: a
// heartbeat at the first could leave from the address about to vanish).
#[test]
fn a_moved_member_reaches_the_roster_within_5_s() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl, Tool::Nft])?;
    tabbify_tests::bins::tabbify_mesh()?;
    let mut lab = NatLab::new("underlay", RouterKind::None, RouterKind::None)?;
    let pki = Pki::new(&[IpAddr::V4(HUB)])?;
    let coordinator = Coordinator::start(
        &lab.internet,
        &pki,
        CoordinatorSpec {
            bind: SocketAddr::new(HUB.into(), COORDINATOR_PORT),
            policy: json!({
                "tags": ["supervisor"],
                "allow": [{"src": ["tag:supervisor"], "dst": ["tag:supervisor"]}],
            }),
            admin: ADMIN.to_owned(),
            heartbeat_secs: HEARTBEAT_SECS,
            relay: false,
            relay_urls: Vec::new(),
        },
    )?;
    let admin = Admin::new(&lab.internet, &coordinator.url(), pki.issue_admin(ADMIN)?);
    let join = |netns: &tabbify_tests::Netns, name: &str| -> Result<Joiner> {
        let token = admin.create_token(&["supervisor"], None, 1)?;
        let spec = JoinSpec::new(name, &["supervisor"], Some(token));
        Joiner::start(netns, &coordinator.url(), &pki.issue_peer(name)?, spec)
    };
    let mut mover = join(&lab.left.netns, "mover")?;
    let mut watcher = join(&lab.right.netns, "watcher")?;
    let old = SocketAddr::new(lab.left.addr.into(), 51820);
    watcher.wait_peer(
        "mover",
        "at its first address",
        Duration::from_secs(30),
        |peer| peer.endpoint == Some(old),
    )?;
    mover.wait_status("to stream the roster", Duration::from_secs(30), |status| {
        status.coordinator.connected && status.peer_names() == ["watcher"]
    })?;

    let moved_at = Instant::now();
    let (addr, _) = lab.move_member(Side::Left)?;
    let new = SocketAddr::new(addr.into(), 51820);
    watcher.wait_peer(
        "mover",
        &format!("at its new address {new}"),
        BOUND.saturating_sub(moved_at.elapsed()),
        |peer| peer.endpoint == Some(new),
    )?;
    let took = moved_at.elapsed();
    // The watcher may learn the new endpoint from the data plane first (an authenticated
    // datagram from the new address roams the peer), before the settled heartbeat.
    mover
        .process()
        .wait_for_log("underlay address changed: heartbeat", BOUND)
        .context("mover did not react to the address change through netlink")?;
    mover.wait_status("to stream again", BOUND, |status| {
        status.coordinator.connected
    })?;
    let log = mover.logs();
    let status = mover.wait_status(
        "to report the mapping of its new address",
        BOUND,
        |status| status.mapped_endpoints == [new],
    )?;
    ensure!(
        !log.contains("heartbeat refused"),
        "a heartbeat after the move was refused:\n{log}"
    );
    watcher.wait_peer(
        "mover",
        "with its new mapping in the roster",
        BOUND,
        |peer| peer.mapped_endpoints == [new],
    )?;
    let roster_took = moved_at.elapsed();
    println!(
        "watcher saw mover's new endpoint {new} {:.2} s after the move and its new STUN \
         mapping in the roster after {:.2} s (bound {} s, heartbeat {} s); mover's NAT class {:?}",
        took.as_secs_f64(),
        roster_took.as_secs_f64(),
        BOUND.as_secs(),
        HEARTBEAT_SECS,
        status.nat
    );
    Ok(())
}
