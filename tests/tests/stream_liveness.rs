//! Issue 13, the SSE liveness bug: a joiner whose roster stream goes silent without a FIN or
//! RST (its underlay moved, a middlebox forgot the connection) must notice, reconnect and
//! see roster changes again, although its heartbeats (fresh connections to the same
//! coordinator) keep succeeding all along.
//!
//! `a_blackholed_roster_stream_is_reopened_and_sees_the_next_policy_change`: node-01 and
//! supervisor-01 join under a policy that hides them from each other; nftables in node-01's
//! namespace then drops every packet of its established stream connection, both ways, by
//! its local port (and nothing else: heartbeats use new ports). The admin changes the
//! policy so that node-01 may see supervisor-01. supervisor-01, whose stream is intact,
//! sees node-01 at once; node-01 must see supervisor-01 within [`BOUND`] of the blackhole,
//! over a new stream connection, and report itself connected.
//!
//! The bound: the joiner's TCP keepalive (5 s idle, 3 probes 3 s apart) fails the dead
//! connection 14 s after its last received byte; failing that, the machine's idle deadline
//! (`STREAM_IDLE_TIMEOUT`, 35 s: two missed 15 s keepalive comments plus 5 s) does. Then a
//! 0.5 s backoff, a registration (whose roster already has the change) and a stream
//! reopened with `Last-Event-ID`. [`BOUND`] is the idle deadline plus 5 s for that. Before
//! the fix the stream stayed dead indefinitely (the idle timeout restarted on every
//! heartbeat tick, and there was no TCP keepalive).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{JoinSpec, Netns, Testbed};

/// Heartbeat interval the coordinator hands out (frequent, so heartbeats clearly keep
/// going while the stream is dead).
const HEARTBEAT_SECS: u64 = 2;

/// How long after the blackhole node-01 must see the policy change (see the module docs).
const BOUND: Duration = Duration::from_secs(40);

/// Deadline for the first rosters to settle.
const SETTLE: Duration = Duration::from_secs(30);

/// Supervisors see each other; with `node_to_supervisor` nodes and supervisors also see
/// each other.
fn policy(node_to_supervisor: bool) -> Value {
    let mut allow = vec![json!({"src": ["tag:supervisor"], "dst": ["tag:supervisor"]})];
    if node_to_supervisor {
        allow.push(json!({"src": ["tag:node"], "dst": ["tag:supervisor"]}));
    }
    json!({
        "tags": ["supervisor", "node"],
        "app_hosts": ["tag:supervisor"],
        "allow": allow,
    })
}

/// Local ports of `netns`'s established TCP connections to `peer` (`ip:port`).
fn connections_to(netns: &Netns, peer: &str) -> Result<BTreeSet<u16>> {
    let listing = netns.run("ss", &["-Htn", "state", "established", "dst", peer])?;
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .map(|local| {
            local
                .rsplit(':')
                .next()
                .and_then(|port| port.parse().ok())
                .with_context(|| format!("a local address without a port: {local:?}"))
        })
        .collect()
}

/// The local port of the long-lived stream connection: the one connection to the
/// coordinator present in two listings half a second apart (a heartbeat's connection
/// lives for milliseconds).
fn stream_port(netns: &Netns, coordinator: &str) -> Result<u16> {
    tabbify_tests::wait::until(
        "exactly one long-lived connection to the coordinator",
        Duration::from_secs(10),
        || {
            let first = connections_to(netns, coordinator)?;
            std::thread::sleep(Duration::from_millis(500));
            let second = connections_to(netns, coordinator)?;
            let both: Vec<u16> = first.intersection(&second).copied().collect();
            match both[..] {
                [port] => Ok(Some(port)),
                _ => Err(anyhow::anyhow!("connections seen twice: {both:?}")),
            }
        },
    )
}

/// Drops every packet of the TCP connection with local port `port` in `netns`, both
/// ways, without telling either end. Returns a closure reading the drop counters.
fn blackhole(netns: &Netns, port: u16) -> Result<()> {
    let rules = format!(
        "table inet tbt_blackhole {{\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter - 10; policy accept;\n\
         \x20   tcp dport {port} counter drop\n\
         \x20 }}\n\
         \x20 chain output {{\n\
         \x20   type filter hook output priority filter - 10; policy accept;\n\
         \x20   tcp sport {port} counter drop\n\
         \x20 }}\n\
         }}\n"
    );
    let path = netns.workdir().join("blackhole.nft");
    std::fs::write(&path, rules)?;
    netns.run("nft", &["-f", path.to_str().context("non-UTF-8 path")?])?;
    Ok(())
}

/// Packets the blackhole dropped so far (both chains).
fn blackholed_packets(netns: &Netns) -> Result<u64> {
    let listing = netns.run("nft", &["list", "table", "inet", "tbt_blackhole"])?;
    let mut total = 0;
    for line in listing.lines().filter(|line| line.contains("drop")) {
        let mut words = line.split_whitespace();
        if words.any(|word| word == "packets") {
            total += words
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

#[test]
fn a_blackholed_roster_stream_is_reopened_and_sees_the_next_policy_change() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl, Tool::Nft])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let bed = Testbed::start(policy(false), HEARTBEAT_SECS)?;
    let (sup_ns, _) = bed.host()?;
    let (node_ns, _) = bed.host()?;
    let mut sup = bed.join(
        &sup_ns,
        JoinSpec::new("supervisor-01", &["supervisor"], None),
    )?;
    let mut node = bed.join(&node_ns, JoinSpec::new("node-01", &["node"], None))?;
    sup.wait_peer_names(&[], SETTLE)?;
    node.wait_status("to stream the roster", SETTLE, |status| {
        status.registered && status.coordinator.connected && status.peer_names().is_empty()
    })?;

    let coordinator = bed.coordinator.addr().to_string();
    let port = stream_port(&node_ns, &coordinator)?;
    blackhole(&node_ns, port)?;
    let cut = Instant::now();
    bed.admin.put_policy(&policy(true))?;

    // The intact stream carries the change at once.
    sup.wait_peer_names(&["node-01"], Duration::from_secs(5))?;
    // The blackholed one is noticed, reopened, and the change arrives within the bound.
    let status = node.wait_peer_names(&["supervisor-01"], BOUND.saturating_sub(cut.elapsed()))?;
    let took = cut.elapsed();
    ensure!(
        status.registered && status.coordinator.connected,
        "node-01 sees the change but is not connected: {}",
        status.summary()
    );
    ensure!(
        blackholed_packets(&node_ns)? > 0,
        "the blackhole dropped nothing: the test did not cut the stream"
    );
    let reopened = stream_port(&node_ns, &coordinator)?;
    ensure!(
        reopened != port,
        "the stream runs on the blackholed connection {port}"
    );
    println!(
        "node-01 saw the policy change {:.1} s after its stream was blackholed (bound {} s)",
        took.as_secs_f64(),
        BOUND.as_secs()
    );
    Ok(())
}
