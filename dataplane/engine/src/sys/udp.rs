//! The WireGuard UDP sockets: one per worker on the shared listen port (`SO_REUSEPORT`),
//! dual-stack IPv6 (IPv4 peers appear as v4-mapped addresses), non-blocking, with large
//! forced buffers, UDP GSO (`UDP_SEGMENT` per send) and UDP GRO (`UDP_GRO`) where the kernel
//! has them.
//!
//! Addresses cross the syscall boundary as [`RawAddr`], a `sockaddr_in6` (or `sockaddr_in` on
//! an IPv4-only host) that drivers can keep at a stable address for the life of an
//! in-flight io_uring operation.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `SOL_UDP` option: segment size for GSO sends (per-socket or per-message cmsg).
pub const UDP_SEGMENT: libc::c_int = 103;
/// `SOL_UDP` option: deliver coalesced datagrams with a cmsg giving the segment size.
pub const UDP_GRO: libc::c_int = 104;
/// The most segments one GSO send may carry (`UDP_MAX_SEGMENTS`).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Socket buffer size asked for (forced past `rmem_max` when running as root).
pub const SOCKET_BUFFER: usize = 8 << 20;

/// What the kernel offered on these sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFeatures {
    /// Sockets are dual-stack IPv6 (else IPv4 only).
    pub ipv6: bool,
    /// `UDP_SEGMENT` accepted.
    pub gso: bool,
    /// `UDP_GRO` accepted.
    pub gro: bool,
}

/// A socket address in kernel form, kept at a stable place while an operation uses it.
#[derive(Clone, Copy)]
#[repr(C)]
pub union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl Default for RawAddr {
    fn default() -> Self {
        // SAFETY: both union members are plain C structs for which all-zero bytes are valid.
        unsafe { mem::zeroed() }
    }
}

impl RawAddr {
    /// Encodes `addr` for a socket of the given family (`ipv6` = dual-stack socket).
    pub fn new(addr: SocketAddr, ipv6: bool) -> Option<(Self, libc::socklen_t)> {
        let mut raw = Self::default();
        if ipv6 {
            let v6 = match addr {
                SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
                SocketAddr::V6(a) => a,
            };
            let s = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            raw.v6 = s;
            Some((raw, mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t))
        } else {
            let SocketAddr::V4(a) = addr else {
                return None;
            };
            raw.v4 = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            Some((raw, mem::size_of::<libc::sockaddr_in>() as libc::socklen_t))
        }
    }

    /// Decodes an address the kernel wrote; v4-mapped IPv6 becomes IPv4.
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        // SAFETY: every member starts with `sa_family`, and the kernel (or `new`) wrote a
        // complete struct of the family it names; zeroed memory reads as family 0 → None.
        unsafe {
            match i32::from(self.v4.sin_family) {
                libc::AF_INET => Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(self.v4.sin_addr.s_addr)),
                    u16::from_be(self.v4.sin_port),
                ))),
                libc::AF_INET6 => {
                    let ip = Ipv6Addr::from(self.v6.sin6_addr.s6_addr);
                    let port = u16::from_be(self.v6.sin6_port);
                    Some(match ip.to_ipv4_mapped() {
                        Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
                        None => {
                            SocketAddr::V6(SocketAddrV6::new(ip, port, 0, self.v6.sin6_scope_id))
                        }
                    })
                }
                _ => None,
            }
        }
    }

    /// Copies an address the kernel wrote into a receive buffer (a multishot receive puts
    /// it there); bytes past the storage are ignored, missing ones read as zero.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut raw = Self::default();
        let n = bytes.len().min(mem::size_of::<Self>());
        // SAFETY: `raw` is plain old data of at least `n` bytes, and every byte pattern is a
        // valid value of it; the source and destination do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut raw as *mut Self).cast::<u8>(), n);
        }
        raw
    }

    /// Size of the storage, for `msg_namelen` on receive.
    pub const fn capacity() -> libc::socklen_t {
        mem::size_of::<Self>() as libc::socklen_t
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is an int that lives across the call; the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens one socket bound to `port` with `SO_REUSEPORT`. `ipv6` picks a dual-stack socket.
fn open_one(port: u16, ipv6: bool, fwmark: Option<u32>) -> io::Result<OwnedFd> {
    let domain = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    if ipv6 {
        setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    if let Some(mark) = fwmark {
        // The mark is a u32 the kernel reads as an int of the same size.
        setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("SO_MARK {mark:#x} (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
    }
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(raw, libc::SOL_SOCKET, force, SOCKET_BUFFER as libc::c_int).is_err() {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCKET_BUFFER as libc::c_int);
        }
    }
    let any = if ipv6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
    };
    let (addr, len) = RawAddr::new(any, ipv6).ok_or_else(|| io::Error::other("address family"))?;
    // SAFETY: `addr` is a valid sockaddr of `len` bytes for this socket's family.
    let rc = unsafe { libc::bind(raw, &addr as *const RawAddr as *const libc::sockaddr, len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The local port a socket is bound to.
pub fn local_port(fd: RawFd) -> io::Result<u16> {
    let mut addr = RawAddr::default();
    let mut len = RawAddr::capacity();
    // SAFETY: `addr` has room for `len` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockname(
            fd,
            &mut addr as *mut RawAddr as *mut libc::sockaddr,
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    addr.to_socket_addr()
        .map(|a| a.port())
        .ok_or_else(|| io::Error::other("unknown address family"))
}

/// Opens `n` sockets sharing `port` (0 picks one), marks them with `fwmark` (`SO_MARK`,
/// before they are bound, so no datagram leaves unmarked) and enables the offloads asked
/// for.
pub fn open_reuseport(
    port: u16,
    n: usize,
    offloads: bool,
    fwmark: Option<u32>,
) -> io::Result<(Vec<OwnedFd>, u16, UdpFeatures)> {
    let (first, ipv6) = match open_one(port, true, fwmark) {
        Ok(fd) => (fd, true),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            (open_one(port, false, fwmark)?, false)
        }
        Err(e) => return Err(e),
    };
    let port = local_port(first.as_raw_fd())?;
    let mut fds = vec![first];
    for _ in 1..n.max(1) {
        fds.push(open_one(port, ipv6, fwmark)?);
    }
    let mut features = UdpFeatures {
        ipv6,
        gso: false,
        gro: false,
    };
    if offloads {
        // GSO is per message (a cmsg); probe that the option exists with a harmless get.
        features.gso = probe_gso(fds[0].as_raw_fd());
        features.gro = fds
            .iter()
            .all(|fd| setsockopt_int(fd.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 1).is_ok());
        if !features.gro {
            for fd in &fds {
                let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 0);
            }
        }
    }
    Ok((fds, port, features))
}

/// Turns `UDP_GRO` on for a socket opened elsewhere (the joiner's loopback relay bridge):
/// coalesced datagrams then arrive with the segment size ([`recv`] returns it).
pub fn enable_gro(fd: RawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_UDP, UDP_GRO, 1)
}

fn probe_gso(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            UDP_SEGMENT,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0
}

/// Control-message space for one `UDP_SEGMENT`/`UDP_GRO` cmsg (a u16 or an int).
pub const CMSG_SPACE: usize = 32;

/// Writes a `UDP_SEGMENT` cmsg carrying `segment` into `buf`; returns the control length.
pub fn write_gso_cmsg(buf: &mut [u8; CMSG_SPACE], segment: u16) -> usize {
    let hdr = libc::cmsghdr {
        cmsg_len: (mem::size_of::<libc::cmsghdr>() + mem::size_of::<u16>()) as _,
        cmsg_level: libc::SOL_UDP,
        cmsg_type: UDP_SEGMENT,
    };
    let hlen = mem::size_of::<libc::cmsghdr>();
    // SAFETY: `cmsghdr` is plain old data; we copy its bytes into a buffer that is large
    // enough (CMSG_SPACE ≥ 16 + 8).
    let bytes =
        unsafe { std::slice::from_raw_parts(&hdr as *const libc::cmsghdr as *const u8, hlen) };
    buf[..hlen].copy_from_slice(bytes);
    buf[hlen..hlen + 2].copy_from_slice(&segment.to_ne_bytes());
    // CMSG_SPACE(sizeof(u16)) rounds to the header alignment (8 on 64-bit).
    hlen + 8
}

/// Reads the GRO segment size from a received control buffer, if present.
pub fn read_gro_cmsg(control: &[u8]) -> Option<u16> {
    let hlen = mem::size_of::<libc::cmsghdr>();
    let mut off = 0;
    while off + hlen <= control.len() {
        let len = usize::from_ne_bytes(control[off..off + 8].try_into().ok()?);
        let level = i32::from_ne_bytes(control[off + 8..off + 12].try_into().ok()?);
        let ty = i32::from_ne_bytes(control[off + 12..off + 16].try_into().ok()?);
        if len < hlen || off + len > control.len() {
            return None;
        }
        if level == libc::SOL_UDP && ty == UDP_GRO && len >= hlen + 2 {
            let data = &control[off + hlen..off + len];
            return Some(if data.len() >= 4 {
                i32::from_ne_bytes(data[..4].try_into().ok()?) as u16
            } else {
                u16::from_ne_bytes(data[..2].try_into().ok()?)
            });
        }
        off += (len + 7) & !7;
    }
    None
}

/// Sends `buf` to `dst`, as one GSO send of `segment`-byte datagrams when `segment` is set.
/// Used by the epoll driver and the timer thread (the io_uring driver builds its own msghdr).
pub fn send(
    fd: RawFd,
    buf: &[u8],
    dst: SocketAddr,
    segment: Option<u16>,
    ipv6: bool,
) -> io::Result<usize> {
    let (mut addr, alen) = RawAddr::new(dst, ipv6).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "IPv6 endpoint on an IPv4-only socket",
        )
    })?;
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u8; CMSG_SPACE];
    // SAFETY: msghdr is plain old data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = &mut addr as *mut RawAddr as *mut libc::c_void;
    msg.msg_namelen = alen;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(seg) = segment {
        let clen = write_gso_cmsg(&mut control, seg);
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = clen as _;
    }
    // SAFETY: every pointer in `msg` refers to locals that outlive the call.
    let rc = unsafe { libc::sendmsg(fd, &msg, 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Receives one (possibly GRO-coalesced) datagram: (bytes, source, segment size).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<SocketAddr>, Option<u16>)> {
    let mut addr = RawAddr::default();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u8; 64];
    // SAFETY: msghdr is plain old data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = &mut addr as *mut RawAddr as *mut libc::c_void;
    msg.msg_namelen = RawAddr::capacity();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = control.len() as _;
    // SAFETY: every pointer in `msg` refers to locals/`buf` that outlive the call.
    let rc = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let clen = (msg.msg_controllen as usize).min(control.len());
    Ok((
        rc as usize,
        addr.to_socket_addr(),
        read_gro_cmsg(&control[..clen]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_addr_round_trip() {
        for a in ["10.1.2.3:51820", "[fd00::1]:7", "[::ffff:1.2.3.4]:9"] {
            let sa: SocketAddr = a.parse().unwrap();
            let (raw, _) = RawAddr::new(sa, true).unwrap();
            let back = raw.to_socket_addr().unwrap();
            let want = match sa {
                SocketAddr::V6(v) if v.ip().to_ipv4_mapped().is_some() => {
                    SocketAddr::new(IpAddr::V4(v.ip().to_ipv4_mapped().unwrap()), v.port())
                }
                s => s,
            };
            assert_eq!(back, want);
        }
        assert!(RawAddr::new("[fd00::1]:7".parse().unwrap(), false).is_none());
    }

    #[test]
    fn raw_addr_from_received_bytes() {
        let sa: SocketAddr = "[fd00::9]:4242".parse().unwrap();
        let (raw, len) = RawAddr::new(sa, true).unwrap();
        // SAFETY (test): viewing plain old data as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw as *const RawAddr).cast::<u8>(), len as usize)
        };
        assert_eq!(RawAddr::from_bytes(bytes).to_socket_addr(), Some(sa));
        assert_eq!(RawAddr::from_bytes(&[]).to_socket_addr(), None);
        let mut long = bytes.to_vec();
        long.extend_from_slice(&[0xff; 64]);
        assert_eq!(RawAddr::from_bytes(&long).to_socket_addr(), Some(sa));
    }

    #[test]
    fn gso_cmsg_reads_back() {
        let mut buf = [0u8; CMSG_SPACE];
        let n = write_gso_cmsg(&mut buf, 1452);
        // A UDP_GRO cmsg has the same layout with a different type; patch it and read.
        buf[12..16].copy_from_slice(&UDP_GRO.to_ne_bytes());
        assert_eq!(read_gro_cmsg(&buf[..n]), Some(1452));
        assert_eq!(read_gro_cmsg(&[0u8; 3]), None);
        assert_eq!(read_gro_cmsg(&[0xffu8; 40]), None);
    }

    #[test]
    fn every_socket_carries_the_fwmark() {
        let (fds, _, _) = match open_reuseport(0, 3, false, Some(0xca6c)) {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                panic!("SO_MARK needs CAP_NET_ADMIN: run the tests as root ({e})")
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(fds.len(), 3);
        for fd in &fds {
            let mut v: libc::c_int = 0;
            let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY (test): getsockopt writes at most `len` bytes into `v`.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            assert_eq!(v, 0xca6c);
        }
        let (plain, _, _) = open_reuseport(0, 1, false, None).unwrap();
        let mut v: libc::c_int = -1;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY (test): as above.
        let rc = unsafe {
            libc::getsockopt(
                plain[0].as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!((rc, v), (0, 0), "no mark unless asked");
    }

    #[test]
    fn loopback_gso_gro() {
        let (rx, port, feat) = open_reuseport(0, 1, true, None).unwrap();
        let (tx, _, _) = open_reuseport(0, 1, true, None).unwrap();
        let payload = vec![7u8; 3 * 100 + 40];
        let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let seg = feat.gso.then_some(100);
        if feat.gso {
            send(tx[0].as_raw_fd(), &payload, dst, seg, feat.ipv6).unwrap();
        } else {
            for chunk in payload.chunks(100) {
                send(tx[0].as_raw_fd(), chunk, dst, None, feat.ipv6).unwrap();
            }
        }
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got < payload.len() && std::time::Instant::now() < deadline {
            match recv(rx[0].as_raw_fd(), &mut buf) {
                Ok((n, src, _)) => {
                    assert!(src.is_some());
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, payload.len());
    }
}
