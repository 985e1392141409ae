//! Connection tracking through real tunnels: the live mesh (`tabbify-mesh join`) in
//! namespaces this test makes and removes, under the README's demo policy (node →
//! supervisor:8730 only), replaying the bypasses of issue 12 as the supervisor would.
//!
//! `source_port_tricks_and_forged_icmp_errors_are_dropped_allowed_flows_pass`:
//!
//! | step | what | checked |
//! |---|---|---|
//! | allowed UDP | node-01 `[ula]:40000` → supervisor `:8730`, the supervisor answers | the answer arrives (reply of a tracked flow) |
//! | allowed TCP | node-01 connects to the supervisor's `:8730`, sends, the supervisor echoes | the echo arrives; node's raw capture saw segments from `:8730` |
//! | source-port UDP | the supervisor's socket bound to 8730 sends to node-01 `:5353` | nothing arrives on node-01's `:5353` |
//! | non-SYN TCP | a raw ACK segment with data from supervisor `:8730` to node-01 `:22` | node-01's raw TCP capture never sees it |
//! | forged ICMP error | an ICMPv6 port-unreachable to node-01 quoting a UDP flow node-01 never had | node-01's raw ICMPv6 capture never sees it |
//!
//! The mesh carries IPv6 inside only (peer ULAs); the same bypasses over IPv4 **and** IPv6
//! inner, through two `tabbify-mesh up` ends whose attacker does not filter at all, are in
//! `tests/up_ports.rs` (port rules from `AllowedPortsOut`/`AllowedPortsIn`).

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tabbify_tests::inside::block_on;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::rawsock::{
    capture, carries_mark, forged_unreachable, ports, raw, send_raw, tcp_ack,
};
use tabbify_tests::{JoinSpec, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::timeout;

const SETTLE: Duration = Duration::from_secs(30);
const STEP: Duration = Duration::from_secs(10);
/// How long node-01 watches for an injected packet after the supervisor sent it.
const WATCH: Duration = Duration::from_secs(2);
const SERVICE: u16 = 8730;
const VICTIM_UDP: u16 = 5353;
const VICTIM_TCP: u16 = 22;
const MARK: &[u8] = b"tabbify-conntrack-bypass";
/// The untracked flow the forged ICMP error quotes: node-01 port → supervisor port.
const FORGED_SPORT: u16 = 41_000;
const FORGED_DPORT: u16 = 9_999;

#[test]
fn source_port_tricks_and_forged_icmp_errors_are_dropped_allowed_flows_pass() -> Result<()> {
    require(&[Tool::Iproute2])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let policy = json!({
        "tags": ["supervisor", "node"],
        "allow": [{"src": ["tag:node"], "dst": [format!("tag:supervisor:{SERVICE}")]}],
    });
    let bed = Testbed::start(policy, 3)?;
    let (sup_ns, _) = bed.host()?;
    let (node_ns, _) = bed.host()?;
    let mut sup = bed.join(
        &sup_ns,
        JoinSpec::new("supervisor-01", &["supervisor"], None),
    )?;
    let mut node = bed.join(&node_ns, JoinSpec::new("node-01", &["node"], None))?;
    let s = sup.wait_peer_names(&["node-01"], SETTLE)?;
    let n = node.wait_peer_names(&["supervisor-01"], SETTLE)?;
    let (sup_ula, node_ula) = (s.ula, n.ula);

    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (inject_tx, inject_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();

    let (sup_result, node_result) = std::thread::scope(|scope| {
        let sup_side = scope.spawn(|| {
            block_on(&sup_ns, || async move {
                let udp = UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, SERVICE, 0, 0))
                    .await?;
                let tcp =
                    TcpListener::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, SERVICE, 0, 0))
                        .await?;
                let raw_tcp = raw(libc::IPPROTO_TCP, sup_ula.into())?;
                let raw_icmp = raw(libc::IPPROTO_ICMPV6, sup_ula.into())?;
                ready_tx.send(()).ok();
                // The allowed UDP flow: answer node-01.
                let mut buf = [0u8; 1500];
                let (_, from) = timeout(STEP, udp.recv_from(&mut buf))
                    .await
                    .context("supervisor: no datagram from node-01 on :8730")??;
                udp.send_to(b"reply", from).await?;
                // The allowed TCP connection: echo once.
                let (mut conn, _) = timeout(STEP, tcp.accept())
                    .await
                    .context("supervisor: node-01 did not connect to :8730")??;
                let n = timeout(STEP, conn.read(&mut buf)).await??;
                conn.write_all(&buf[..n]).await?;
                // The bypasses, each a few times.
                inject_rx
                    .recv_timeout(STEP * 3)
                    .context("supervisor: never told to inject")?;
                let victim = SocketAddr::from(SocketAddrV6::new(node_ula, VICTIM_UDP, 0, 0));
                for _ in 0..3 {
                    udp.send_to(MARK, victim).await?;
                    let (node, sup) = (node_ula.into(), sup_ula.into());
                    send_raw(
                        &raw_tcp,
                        node,
                        &tcp_ack(sup, node, SERVICE, VICTIM_TCP, MARK),
                    )?;
                    let forged = (FORGED_SPORT, FORGED_DPORT);
                    send_raw(
                        &raw_icmp,
                        node,
                        &forged_unreachable(node, sup, forged, MARK),
                    )?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                done_tx.send(()).ok();
                drop(conn);
                anyhow::Ok(())
            })
        });
        let node_side = scope.spawn(|| {
            block_on(&node_ns, || async move {
                ready_rx
                    .recv_timeout(STEP)
                    .context("node: the supervisor side never got ready")?;
                let victim =
                    UdpSocket::bind(SocketAddrV6::new(node_ula, VICTIM_UDP, 0, 0)).await?;
                let raw_tcp = raw(libc::IPPROTO_TCP, Ipv6Addr::UNSPECIFIED.into())?;
                let raw_icmp = raw(libc::IPPROTO_ICMPV6, Ipv6Addr::UNSPECIFIED.into())?;
                // Allowed UDP both ways (retried while the handshake completes).
                let client = UdpSocket::bind(SocketAddrV6::new(node_ula, 40_000, 0, 0)).await?;
                let service = SocketAddr::from(SocketAddrV6::new(sup_ula, SERVICE, 0, 0));
                let mut buf = [0u8; 1500];
                let mut answered = false;
                for _ in 0..10 {
                    client.send_to(b"hello", service).await?;
                    if let Ok(Ok((n, from))) =
                        timeout(Duration::from_secs(1), client.recv_from(&mut buf)).await
                    {
                        ensure!(from == service && &buf[..n] == b"reply", "odd answer from {from}");
                        answered = true;
                        break;
                    }
                }
                ensure!(answered, "node-01 never got the reply of its allowed UDP flow to :8730");
                // Allowed TCP both ways.
                let mut conn = timeout(STEP, TcpStream::connect(service))
                    .await
                    .context("node-01 could not connect to the supervisor's :8730")??;
                conn.write_all(b"echo me").await?;
                let n = timeout(STEP, conn.read(&mut buf)).await??;
                ensure!(&buf[..n] == b"echo me", "the echo over the allowed TCP connection");
                let seen = capture(&raw_tcp, Duration::from_millis(300), false);
                ensure!(
                    seen.iter().any(|s| ports(s).is_some_and(|(sp, _)| sp == SERVICE)),
                    "node-01's raw capture saw no segment from :8730 (the capture does not work)"
                );
                // The bypasses.
                inject_tx.send(()).ok();
                done_rx
                    .recv_timeout(STEP * 2)
                    .context("node: the supervisor never finished injecting")?;
                let tcp_seen = capture(&raw_tcp, WATCH, false);
                let icmp_seen = capture(&raw_icmp, Duration::from_millis(200), false);
                let mut udp_got = Vec::new();
                while let Ok(Ok((n, from))) =
                    timeout(Duration::from_millis(100), victim.recv_from(&mut buf)).await
                {
                    udp_got.push((from, buf[..n].to_vec()));
                }
                ensure!(
                    udp_got.is_empty(),
                    "UDP from the supervisor's port 8730 reached node-01's :{VICTIM_UDP}: {udp_got:?}"
                );
                let injected: Vec<_> = tcp_seen
                    .iter()
                    .filter(|s| ports(s) == Some((SERVICE, VICTIM_TCP)))
                    .collect();
                ensure!(
                    injected.is_empty(),
                    "a non-SYN TCP segment from :8730 reached node-01's :{VICTIM_TCP}: {injected:?}"
                );
                let forged: Vec<_> = icmp_seen
                    .iter()
                    .filter(|m| m.first() == Some(&1) && carries_mark(m, MARK))
                    .collect();
                ensure!(
                    forged.is_empty(),
                    "a forged ICMPv6 error quoting an untracked flow reached node-01: {forged:?}"
                );
                drop(conn);
                anyhow::Ok(())
            })
        });
        (sup_side.join(), node_side.join())
    });
    let sup_result = sup_result.map_err(|_| anyhow::anyhow!("supervisor thread panicked"))?;
    let node_result = node_result.map_err(|_| anyhow::anyhow!("node thread panicked"))?;
    node_result.with_context(|| format!("supervisor log:\n{}", sup.logs()))?;
    sup_result?;
    node.stop()?;
    // The supervisor's own engine refused the bypasses before encrypting them, each counted
    // by reason (logged at exit); node-01's engine would refuse them too (engine tests).
    let status = sup.process().stop(Duration::from_secs(10))?;
    ensure!(status.success(), "supervisor exited with {status}");
    let log = sup.logs();
    for reason in ["filtered_out", "ct_invalid_state", "icmp_unrelated"] {
        ensure!(
            log.contains(reason),
            "supervisor log does not count {reason} drops:\n{log}"
        );
    }
    Ok(())
}
