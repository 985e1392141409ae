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
//! `a_frozen_roster_stream_is_dropped_by_the_idle_deadline`: the same with node-01 talking
//! to the coordinator through a TCP proxy in the test that, on command, stops forwarding
//! on the connections it holds while keeping them open: the kernel still ACKs node-01's
//! TCP keepalive probes, so only the joiner's own idle deadline can notice. node-01 must
//! log that deadline as the reason and see the change within [`BOUND`]; supervisor-01,
//! whose stream is healthy but carries nothing but keepalive comments for longer than the
//! deadline, must never have dropped it (it registered once).
//!
//! The bound: the joiner's TCP keepalive (5 s idle, 3 probes 3 s apart) fails the dead
//! connection 14 s after its last received byte; failing that, the machine's idle deadline
//! (`STREAM_IDLE_TIMEOUT`, 35 s: two missed 15 s keepalive comments plus 5 s) does. Then a
//! 0.5 s backoff, a registration (whose roster already has the change) and a stream
//! reopened with `Last-Event-ID`. [`BOUND`] is the idle deadline plus 5 s for that. Before
//! the fix the stream stayed dead indefinitely (the idle timeout restarted on every
//! heartbeat tick, and there was no TCP keepalive).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{JoinSpec, Joiner, Netns, Testbed};
use tokio::sync::watch;

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
/// ways, without telling either end.
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
    // The change can arrive with the registration, before the stream is open again.
    if !(status.registered && status.coordinator.connected) {
        node.wait_status("to stream again", Duration::from_secs(5), |status| {
            status.registered && status.coordinator.connected
        })?;
    }
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

/// What the proxy is told: connections accepted before generation `freeze` was set stop
/// forwarding; `stop` ends the proxy.
#[derive(Clone, Copy, Default)]
struct ProxyControl {
    freeze: u32,
    stop: bool,
}

/// A TCP proxy on `listen` to `upstream`, run by a thread inside `netns`.
struct FreezingProxy {
    control: watch::Sender<ProxyControl>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl FreezingProxy {
    fn start(netns: &Netns, listen: SocketAddr, upstream: SocketAddr) -> Result<FreezingProxy> {
        let (control, rx) = watch::channel(ProxyControl::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = netns.clone();
        let thread = std::thread::spawn(move || {
            tabbify_tests::inside::block_on(&netns, || proxy(listen, upstream, rx, ready_tx))
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the proxy did not start listening")?;
        Ok(FreezingProxy {
            control,
            thread: Some(thread),
        })
    }

    /// Every connection open now stops forwarding (and stays open); later ones work.
    fn freeze_open_connections(&self) {
        self.control.send_modify(|c| c.freeze += 1);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.control.send_modify(|c| c.stop = true);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Err(error)) => eprintln!("proxy: {error:#}"),
                Err(_) => eprintln!("proxy thread panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

async fn proxy(
    listen: SocketAddr,
    upstream: SocketAddr,
    mut control: watch::Receiver<ProxyControl>,
    ready: std::sync::mpsc::Sender<()>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("proxy bind {listen}"))?;
    let _ = ready.send(());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (mut down, _) = accepted.context("proxy accept")?;
                let mut watch = control.clone();
                let generation = watch.borrow_and_update().freeze;
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let frozen = async {
                        while watch.changed().await.is_ok() {
                            if watch.borrow().freeze > generation {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        () = frozen => {
                            // Hold both sockets open and never read them again: the peers'
                            // kernels keep ACKing, nothing is delivered.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
            changed = control.changed() => {
                if changed.is_err() || control.borrow().stop {
                    return Ok(());
                }
            }
        }
    }
}

#[test]
fn a_frozen_roster_stream_is_dropped_by_the_idle_deadline() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let bed = Testbed::start(policy(false), HEARTBEAT_SECS)?;
    let listen = SocketAddr::new(bed.lan.addr().into(), 9443);
    let proxy = FreezingProxy::start(bed.lan.netns(), listen, bed.coordinator.addr())?;
    let (sup_ns, _) = bed.host()?;
    let (node_ns, _) = bed.host()?;
    let mut sup = bed.join(
        &sup_ns,
        JoinSpec::new("supervisor-01", &["supervisor"], None),
    )?;
    let mut node_spec = JoinSpec::new("node-01", &["node"], None);
    node_spec.join_token = Some(bed.token_for(&node_spec)?);
    let cert = bed.pki.issue_peer("node-01")?;
    let mut node = Joiner::start(&node_ns, &format!("https://{listen}"), &cert, node_spec)?;
    sup.wait_peer_names(&[], SETTLE)?;
    node.wait_status("to stream the roster", SETTLE, |status| {
        status.registered && status.coordinator.connected && status.peer_names().is_empty()
    })?;

    proxy.freeze_open_connections();
    let cut = Instant::now();
    bed.admin.put_policy(&policy(true))?;
    sup.wait_peer_names(&["node-01"], Duration::from_secs(5))?;
    let status = node.wait_peer_names(&["supervisor-01"], BOUND.saturating_sub(cut.elapsed()))?;
    let took = cut.elapsed();
    // The change can arrive with the registration, before the stream is open again.
    if !(status.registered && status.coordinator.connected) {
        node.wait_status("to stream again", Duration::from_secs(5), |status| {
            status.registered && status.coordinator.connected
        })?;
    }
    let node_log = node.logs();
    ensure!(
        node_log.contains("the roster stream delivered nothing for 35 s"),
        "node-01 did not drop its stream by the idle deadline:\n{node_log}"
    );
    // supervisor-01's stream carried the policy event at the cut and only keepalive
    // comments since: watch it stay connected until the idle deadline plus 7 s has passed
    // since then, so a deadline fed only by events (not by comments) would have fired.
    let watch_until = Duration::from_secs(42);
    while cut.elapsed() < watch_until {
        ensure!(
            sup.status()?.coordinator.connected,
            "supervisor-01 lost its healthy stream after {:?}:\n{}",
            cut.elapsed(),
            sup.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let quiet = cut.elapsed();
    let sup_log = sup.logs();
    let registrations = sup_log
        .lines()
        .filter(|line| line.contains("registered name="))
        .count();
    ensure!(
        registrations == 1 && sup.status()?.coordinator.connected,
        "supervisor-01's healthy stream was dropped ({registrations} registrations):\n{sup_log}"
    );
    println!(
        "node-01 saw the policy change {:.1} s after its stream froze (bound {} s); \
         supervisor-01's quiet stream stayed up for {:.1} s",
        took.as_secs_f64(),
        BOUND.as_secs(),
        quiet.as_secs_f64()
    );
    drop(proxy);
    Ok(())
}
