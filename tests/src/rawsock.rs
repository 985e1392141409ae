//! Raw sockets for tests that play an attacker inside a tunnel: forged TCP segments and
//! ICMP errors sent from a peer's inner address, and captures of what reaches the victim's
//! stack (IPv4 and IPv6; root needed for `CAP_NET_RAW`).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// `addr:port` as a `sockaddr_storage` and its length, for the raw syscalls.
pub fn sockaddr(addr: IpAddr, port: u16) -> (libc::sockaddr_storage, libc::socklen_t) {
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
pub fn raw(proto: i32, local: IpAddr) -> Result<OwnedFd> {
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

/// Sends `payload` (the transport header on; the kernel adds the IP header) to `dst`.
pub fn send_raw(fd: &OwnedFd, dst: IpAddr, payload: &[u8]) -> Result<()> {
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
pub fn capture(fd: &OwnedFd, d: Duration, v4: bool) -> Vec<Vec<u8>> {
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

/// Source and destination port of a TCP/UDP header.
pub fn ports(seg: &[u8]) -> Option<(u16, u16)> {
    Some((
        u16::from_be_bytes([*seg.first()?, *seg.get(1)?]),
        u16::from_be_bytes([*seg.get(2)?, *seg.get(3)?]),
    ))
}

/// Whether `b` contains `mark` anywhere.
pub fn carries_mark(b: &[u8], mark: &[u8]) -> bool {
    b.windows(mark.len()).any(|w| w == mark)
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
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
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
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

/// A TCP ACK|PSH segment `src:sport → dst:dport` with `mark` as data, checksummed.
pub fn tcp_ack(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, mark: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    t[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x18; // ACK | PSH
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(mark);
    let sum = checksum(&[&pseudo(src, dst, 6, t.len()), &t]);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    t
}

/// An ICMP (v4: type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable for the victim,
/// quoting a UDP datagram `victim:sport → attacker:dport` carrying `mark` that was never
/// sent. ICMPv6 checksums are filled by the kernel; ICMPv4 ones here.
pub fn forged_unreachable(
    victim: IpAddr,
    attacker: IpAddr,
    (sport, dport): (u16, u16),
    mark: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + mark.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(mark);
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
