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

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tabbify_tests::inside::block_on;
use tabbify_tests::prereq::{require, Tool};
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

fn sockaddr(addr: IpAddr, port: u16) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sa = unsafe { &mut *std::ptr::from_mut(&mut ss).cast::<libc::sockaddr_in>() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = port.to_be();
            sa.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        IpAddr::V6(a) => {
            // SAFETY: as above.
            let sa = unsafe { &mut *std::ptr::from_mut(&mut ss).cast::<libc::sockaddr_in6>() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = port.to_be();
            sa.sin6_addr.s6_addr = a.octets();
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// A raw socket of `proto` in `local`'s family, bound to `local` (the source of what it
/// sends; unspecified to capture everything), with a 100 ms receive timeout.
fn raw(proto: i32, local: IpAddr) -> Result<OwnedFd> {
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments; returns a new descriptor or -1.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        bail!(
            "raw socket (proto {proto}): {} (the test needs CAP_NET_RAW: run as root)",
            io::Error::last_os_error()
        );
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (sa, len) = sockaddr(local, 0);
    // SAFETY: `sa` is a valid sockaddr of `len` bytes for the duration of the call.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&sa).cast(), len) };
    if rc != 0 {
        bail!("bind raw socket to {local}: {}", io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval, passed with its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

fn send_raw(fd: &OwnedFd, dst: IpAddr, payload: &[u8]) -> Result<()> {
    let (sa, len) = sockaddr(dst, 0);
    // SAFETY: `payload` and `sa` are valid for the call; sizes passed.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            std::ptr::from_ref(&sa).cast(),
            len,
        )
    };
    if n < 0 {
        bail!("raw send to {dst}: {}", io::Error::last_os_error());
    }
    Ok(())
}

/// Every packet a raw socket receives within `d`, from the transport header on (an IPv4
/// raw socket also returns the IP header: it is cut off).
fn capture(fd: &OwnedFd, d: Duration, v4: bool) -> Vec<Vec<u8>> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < end {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        let start = if v4 {
            usize::from(buf[0] & 0x0f) * 4
        } else {
            0
        };
        if n >= start {
            out.push(buf[start..n].to_vec());
        }
    }
    out
}

fn ports(seg: &[u8]) -> Option<(u16, u16)> {
    Some((
        u16::from_be_bytes([*seg.first()?, *seg.get(1)?]),
        u16::from_be_bytes([*seg.get(2)?, *seg.get(3)?]),
    ))
}

fn carries_mark(b: &[u8]) -> bool {
    b.windows(MARK.len()).any(|w| w == MARK)
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP/UDP pseudo-header of `src → dst` for `len` bytes of protocol `proto`.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [
            &s.octets()[..],
            &d.octets(),
            &[0, proto],
            &(len as u16).to_be_bytes(),
        ]
        .concat(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [
            &s.octets()[..],
            &d.octets(),
            &(len as u32).to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat(),
        _ => Vec::new(),
    }
}

/// A TCP ACK|PSH segment `src:sport → dst:dport` with `MARK` as data, checksummed.
fn tcp_ack(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    t[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x18; // ACK | PSH
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(MARK);
    let sum = checksum(&[&pseudo(src, dst, 6, t.len()), &t]);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    t
}

/// An ICMP (v4: type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable for the victim,
/// quoting a UDP datagram `victim:FORGED_SPORT → attacker:FORGED_DPORT` that was never
/// sent. ICMPv6 checksums are filled by the kernel; ICMPv4 ones here.
fn forged_unreachable(victim: IpAddr, attacker: IpAddr) -> Vec<u8> {
    let udp_len = 8 + MARK.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&FORGED_SPORT.to_be_bytes());
    udp.extend_from_slice(&FORGED_DPORT.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(MARK);
    match (victim, attacker) {
        (IpAddr::V4(v), IpAddr::V4(a)) => {
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
            ip.extend_from_slice(&v.octets());
            ip.extend_from_slice(&a.octets());
            let sum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut m = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(&ip);
            m.extend_from_slice(&udp);
            let sum = checksum(&[&m]);
            m[2..4].copy_from_slice(&sum.to_be_bytes());
            m
        }
        (IpAddr::V6(v), IpAddr::V6(a)) => {
            let mut m = vec![1u8, 4, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(&[0x60, 0, 0, 0]);
            m.extend_from_slice(&(udp_len as u16).to_be_bytes());
            m.extend_from_slice(&[17, 64]);
            m.extend_from_slice(&v.octets());
            m.extend_from_slice(&a.octets());
            m.extend_from_slice(&udp);
            m
        }
        _ => Vec::new(),
    }
}

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
            &tcp_ack(attacker, victim, SERVICE, VICTIM_TCP),
        )?;
        send_raw(&a_raw_icmp, victim, &forged_unreachable(victim, attacker))?;
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
        .filter(|s| ports(s) == Some((SERVICE, VICTIM_TCP)) && carries_mark(s))
        .collect();
    ensure!(
        injected.is_empty(),
        "{victim}: a non-SYN TCP segment from :8730 reached :{VICTIM_TCP}: {injected:?}"
    );
    let error_type = if v4 { 3 } else { 1 };
    let forged: Vec<_> = icmp_seen
        .iter()
        .filter(|m| m.first() == Some(&error_type) && carries_mark(m))
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
