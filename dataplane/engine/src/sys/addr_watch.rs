//! Address-change notifications from the kernel: a `NETLINK_ROUTE` socket subscribed to
//! `RTMGRP_IPV4_IFADDR` and `RTMGRP_IPV6_IFADDR`, and a parser of what it delivers.
//!
//! The joiner uses it to notice that its underlay moved (an address added to or removed
//! from an interface) at once, instead of at its next heartbeat or when its roster stream
//! is found dead.
//!
//! Wire layout (netlink(7), rtnetlink(7)); every integer in host byte order:
//! ```text
//! nlmsghdr (16): len u32 | type u16 | flags u16 | seq u32 | pid u32
//! ifaddrmsg (8): family u8 | prefixlen u8 | flags u8 | scope u8 | index u32
//! then attributes; messages are padded to 4 bytes (NLMSG_ALIGN)
//! ```
//! Invariants: [`parse`] never panics and never reads past its input; a truncated or
//! malformed message ends the parse (what came before it is returned) and is counted in
//! [`Parsed::malformed`]. The socket is non-blocking and close-on-exec.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `RTM_NEWADDR`.
pub const RTM_NEWADDR: u16 = 20;
/// `RTM_DELADDR`.
pub const RTM_DELADDR: u16 = 21;
const NLMSG_HDRLEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;

/// One address change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrChange {
    /// An address appeared (`true`) or went.
    pub added: bool,
    /// The interface's index.
    pub ifindex: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
}

/// What one datagram from the socket held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The address changes, in order.
    pub changes: Vec<AddrChange>,
    /// 1 when the datagram ended in a malformed message (the rest was skipped).
    pub malformed: u32,
}

/// Parses one datagram read from the socket; messages of other types are skipped.
pub fn parse(mut buf: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            out.malformed = 1;
            return out;
        }
        if kind == RTM_NEWADDR || kind == RTM_DELADDR {
            let Some(body) = buf
                .get(NLMSG_HDRLEN..len)
                .filter(|b| b.len() >= IFADDRMSG_LEN)
            else {
                out.malformed = 1;
                return out;
            };
            out.changes.push(AddrChange {
                added: kind == RTM_NEWADDR,
                family: body[0],
                ifindex: u32::from_ne_bytes([body[4], body[5], body[6], body[7]]),
            });
        }
        let aligned = len.saturating_add(3) & !3;
        buf = buf.get(aligned..).unwrap_or(&[]);
    }
    if !buf.is_empty() {
        out.malformed = 1;
    }
    out
}

/// A netlink socket that receives every address change of this network namespace.
#[derive(Debug)]
pub struct AddrWatch {
    fd: OwnedFd,
}

impl AddrWatch {
    /// Opens and subscribes the socket.
    pub fn open() -> io::Result<AddrWatch> {
        // SAFETY: socket(2) with constant arguments; it returns a new fd or -1.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        // SAFETY: `addr` is a valid sockaddr_nl for the duration of the call and the length
        // passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AddrWatch { fd })
    }

    /// Reads one datagram into `buf`; `WouldBlock` when none is queued. A datagram larger
    /// than `buf` is truncated (the parser then reports it malformed).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                0,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for AddrWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, family: u8, ifindex: u32, attrs: usize) -> Vec<u8> {
        let len = NLMSG_HDRLEN + IFADDRMSG_LEN + attrs;
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&[family, 24, 0, 0]);
        m.extend_from_slice(&ifindex.to_ne_bytes());
        m.resize(len, 0xaa);
        m.resize((len + 3) & !3, 0);
        m
    }

    #[test]
    fn parses_new_and_deleted_addresses_and_skips_other_messages() {
        let mut buf = message(RTM_NEWADDR, 2, 7, 9);
        buf.extend(message(16, 0, 3, 0)); // RTM_NEWLINK: skipped
        buf.extend(message(RTM_DELADDR, 10, 8, 20));
        let parsed = parse(&buf);
        assert_eq!(parsed.malformed, 0);
        assert_eq!(
            parsed.changes,
            [
                AddrChange {
                    added: true,
                    ifindex: 7,
                    family: 2
                },
                AddrChange {
                    added: false,
                    ifindex: 8,
                    family: 10
                }
            ]
        );
    }

    #[test]
    fn malformed_input_ends_the_parse_and_is_counted() {
        let good = message(RTM_NEWADDR, 2, 7, 0);
        for cut in 1..good.len() {
            let mut buf = good.clone();
            buf.extend_from_slice(&good[..cut]);
            let parsed = parse(&buf);
            assert_eq!(parsed.changes.len(), 1, "cut {cut}");
            assert_eq!(parsed.malformed, 1, "cut {cut}");
        }
        // A length field below the header size, or a body too short for an ifaddrmsg.
        let mut tiny = good.clone();
        tiny[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(parse(&tiny).malformed, 1);
        let mut short = good[..NLMSG_HDRLEN + 4].to_vec();
        short[..4].copy_from_slice(&((NLMSG_HDRLEN + 4) as u32).to_ne_bytes());
        assert_eq!(
            parse(&short),
            Parsed {
                changes: vec![],
                malformed: 1
            }
        );
        assert_eq!(parse(&[]), Parsed::default());
    }

    #[test]
    fn opens_and_reads_nothing_while_idle() {
        // Opening needs no privilege; whether a change can be made here depends on the
        // environment, so this only checks that the socket opens and reads nothing yet.
        let watch = AddrWatch::open().expect("netlink socket");
        let mut buf = [0u8; 4096];
        assert_eq!(
            watch.recv(&mut buf).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );
    }
}
