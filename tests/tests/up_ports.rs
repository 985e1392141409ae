//! Port rules for `tabbify-mesh up` (`AllowedPortsOut` / `AllowedPortsIn`, issue 12's
//! bypasses) through a real tunnel carrying IPv4 **and** IPv6 inner addresses: two `up`
//! ends in namespaces the harness makes and removes.
//!
//! The victim (left) has `AllowedPortsOut = tcp:8730, udp:8730` and `AllowedPortsIn = none`
//! for the attacker: it may open the attacker's port 8730, the attacker may open nothing on
//! it. The attacker (right) is a peer with a valid key whose own configuration has **no**
//! port rules, so everything it sends is encrypted and delivered: only the victim's
//! engine stands between it and the victim's sockets. For each inner family:
//!
//! | step | what | checked |
//! |---|---|---|
//! | allowed UDP | victim `:40000` → attacker `:8730`, the attacker answers | the answer arrives (reply of a tracked flow) |
//! | allowed TCP | victim connects to the attacker's `:8730`, sends, the attacker echoes | the echo arrives; the victim's raw capture saw segments from `:8730` |
//! | new flow from the attacker | the attacker connects to the victim's listening `:2222` | never accepted |
//! | source-port UDP | the attacker's socket bound to 8730 sends to the victim's `:5353` | nothing arrives |
//! | non-SYN TCP | a raw ACK|PSH segment with data from attacker `:8730` to the victim's `:2222` | the victim's raw TCP capture never sees it |
//! | forged ICMP error | an ICMP / ICMPv6 port unreachable quoting a UDP flow the victim never had | the victim's raw ICMP capture never sees it |
//!
//! At exit the victim logs its drops by reason: `filtered_in` (the new flows),
//! `ct_invalid_state` (the non-SYN segment) and `icmp_unrelated` (the forged errors).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tabbify_tests::inside::block_on;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::rawsock::{
    capture, carries_mark, forged_unreachable, ports, raw, send_raw, tcp_ack,
};
use tabbify_tests::wg::{Driver, Implementation, PortRules};
use tabbify_tests::{Inner, Tunnel, TunnelSpec};

const SERVICE: u16 = 8730;
const CLIENT_PORT: u16 = 40_000;
const VICTIM_UDP: u16 = 5353;
const VICTIM_TCP: u16 = 2222;
const MARK: &[u8] = b"tabbify-up-ports-bypass";
/// The untracked flow the forged ICMP error quotes: victim port → attacker port.
const FORGED_SPORT: u16 = 41_000;
const FORGED_DPORT: u16 = 9_999;
/// Liveness bound for the first exchange (handshake included) and each step.
const STEP: Duration = Duration::from_secs(10);
/// How long the victim watches for injected packets.
const WATCH: Duration = Duration::from_secs(2);

/// `count` from the `dropped packets` shutdown line for `reason` in the daemon's log.
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

/// One inner family's steps (see the module table).
fn replay(tunnel: &Tunnel, victim: IpAddr, attacker: IpAddr) -> Result<()> {
    let (vns, ans) = (tunnel.left.netns(), tunnel.right.netns());
    let v4 = victim.is_ipv4();
    let (icmp_proto, unspecified) = if v4 {
        (libc::IPPROTO_ICMP, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    } else {
        (libc::IPPROTO_ICMPV6, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    };
    // Sockets belong to the namespace they are made in; made there, used from here.
    let (a_udp, a_tcp, a_raw_tcp, a_raw_icmp) = block_on(ans, || async move {
        Ok((
            UdpSocket::bind((attacker, SERVICE))?,
            TcpListener::bind((attacker, SERVICE))?,
            raw(libc::IPPROTO_TCP, attacker)?,
            raw(icmp_proto, attacker)?,
        ))
    })?;
    let (v_client, v_victim_udp, v_listener, v_raw_tcp, v_raw_icmp) =
        block_on(vns, || async move {
            Ok((
                UdpSocket::bind((victim, CLIENT_PORT))?,
                UdpSocket::bind((victim, VICTIM_UDP))?,
                TcpListener::bind((victim, VICTIM_TCP))?,
                raw(libc::IPPROTO_TCP, unspecified)?,
                raw(icmp_proto, unspecified)?,
            ))
        })?;
    for s in [&a_udp, &v_client, &v_victim_udp] {
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
    }

    // Allowed UDP both ways (retried while the handshake completes).
    let service = SocketAddr::new(attacker, SERVICE);
    let mut buf = [0u8; 2048];
    let end = Instant::now() + STEP;
    let answered = loop {
        ensure!(
            Instant::now() < end,
            "{victim}: the allowed UDP flow to {service} never got an answer"
        );
        v_client.send_to(b"hello", service)?;
        let Ok((n, from)) = a_udp.recv_from(&mut buf) else {
            continue;
        };
        ensure!(
            &buf[..n] == b"hello" && from == SocketAddr::new(victim, CLIENT_PORT),
            "odd datagram from {from}"
        );
        a_udp.send_to(b"reply", from)?;
        if let Ok((n, from)) = v_client.recv_from(&mut buf) {
            break (from, buf[..n].to_vec());
        }
    };
    ensure!(
        answered == (service, b"reply".to_vec()),
        "odd answer {answered:?}"
    );

    // Allowed TCP both ways.
    let mut conn = block_on(vns, || async move {
        TcpStream::connect_timeout(&service, STEP).context("victim → attacker :8730")
    })?;
    let (mut a_conn, _) = a_tcp.accept()?;
    a_conn.set_read_timeout(Some(STEP))?;
    conn.set_read_timeout(Some(STEP))?;
    conn.write_all(b"echo me")?;
    let n = a_conn.read(&mut buf)?;
    a_conn.write_all(&buf[..n])?;
    let n = conn.read(&mut buf)?;
    ensure!(
        &buf[..n] == b"echo me",
        "{victim}: the echo over the allowed TCP connection"
    );
    let seen = capture(&v_raw_tcp, Duration::from_millis(300), v4);
    ensure!(
        seen.iter()
            .any(|s| ports(s).is_some_and(|(sp, _)| sp == SERVICE)),
        "{victim}: the victim's raw capture saw no segment from :8730 (the capture does not work)"
    );

    // A new flow from the attacker: never accepted.
    let target = SocketAddr::new(victim, VICTIM_TCP);
    let opened = block_on(ans, || async move {
        Ok(TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok())
    })?;
    ensure!(
        !opened,
        "{victim}: the attacker opened a TCP connection to {target}"
    );
    v_listener.set_nonblocking(true)?;
    ensure!(
        v_listener.accept().is_err(),
        "{victim}: a connection from the attacker was accepted"
    );

    // The bypasses, each a few times.
    for _ in 0..3 {
        a_udp.send_to(MARK, SocketAddr::new(victim, VICTIM_UDP))?;
        send_raw(
            &a_raw_tcp,
            victim,
            &tcp_ack(attacker, victim, SERVICE, VICTIM_TCP, MARK),
        )?;
        send_raw(
            &a_raw_icmp,
            victim,
            &forged_unreachable(victim, attacker, (FORGED_SPORT, FORGED_DPORT), MARK),
        )?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let tcp_seen = capture(&v_raw_tcp, WATCH, v4);
    let icmp_seen = capture(&v_raw_icmp, Duration::from_millis(300), v4);
    let mut udp_got = Vec::new();
    while let Ok((n, from)) = v_victim_udp.recv_from(&mut buf) {
        udp_got.push((from, buf[..n].to_vec()));
    }
    ensure!(
        udp_got.is_empty(),
        "{victim}: UDP from the attacker's port 8730 reached :{VICTIM_UDP}: {udp_got:?}"
    );
    let injected: Vec<_> = tcp_seen
        .iter()
        .filter(|s| ports(s) == Some((SERVICE, VICTIM_TCP)) && carries_mark(s, MARK))
        .collect();
    ensure!(
        injected.is_empty(),
        "{victim}: a non-SYN TCP segment from :8730 reached :{VICTIM_TCP}: {injected:?}"
    );
    let error_type = if v4 { 3 } else { 1 };
    let forged: Vec<_> = icmp_seen
        .iter()
        .filter(|m| m.first() == Some(&error_type) && carries_mark(m, MARK))
        .collect();
    ensure!(
        forged.is_empty(),
        "{victim}: a forged ICMP error quoting an untracked flow reached the victim: {forged:?}"
    );
    // The allowed flow still works after the attempts.
    conn.write_all(b"still")?;
    let n = a_conn.read(&mut buf)?;
    ensure!(
        &buf[..n] == b"still",
        "{victim}: the allowed connection after the bypasses"
    );
    Ok(())
}

#[test]
fn up_port_rules_stop_the_bypasses_over_ipv4_and_ipv6_inner() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Wg])?;
    tabbify_tests::bins::tabbify_mesh()?;
    let mut spec = TunnelSpec::new(
        Implementation::ours(Driver::Uring, true),
        Implementation::ours(Driver::Epoll, false),
    );
    spec.inner = Inner::Dual;
    spec.left_ports = PortRules {
        outbound: Some(format!("tcp:{SERVICE}, udp:{SERVICE}")),
        inbound: Some("none".into()),
    };
    let tunnel = Tunnel::start(&spec)?;
    ensure!(
        tunnel
            .left
            .logs()
            .contains("port rules and connection tracking on"),
        "the victim did not turn its port rules on:\n{}",
        tunnel.left.logs()
    );
    for (victim, attacker) in tunnel.left_inner.iter().zip(&tunnel.right_inner) {
        replay(&tunnel, *victim, *attacker)
            .with_context(|| format!("victim log:\n{}", tunnel.left.logs()))?;
    }
    let Tunnel { left, right, .. } = tunnel;
    let (status, logs) = left.stop_with_logs()?;
    ensure!(status.success(), "victim exited with {status}:\n{logs}");
    right.stop()?;
    for reason in ["filtered_in", "ct_invalid_state", "icmp_unrelated"] {
        ensure!(
            logged_drops(&logs, reason) >= 2,
            "the victim's log does not count {reason} drops for both families:\n{logs}"
        );
    }
    Ok(())
}
