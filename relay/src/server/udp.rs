//! The relay's UDP forwarding path: one socket on the relay's port, one thread. It
//! receives with UDP GRO (one `recvmsg` can carry up to 64 coalesced datagrams), decides
//! every datagram under one registry lock per receive, queues the frames to send, then
//! sends them grouped per destination as UDP GSO super-datagrams (`UDP_SEGMENT`), falling
//! back to one `sendmsg` per datagram where the kernel lacks GSO. Syscall helpers are the
//! engine's (`tabbify_engine::sys::udp`). STUN Binding requests on the same port are
//! answered with [`tabbify_api::stun`] (the demux is the engine's
//! [`classify`](tabbify_engine::core::demux::classify)), at most the per-source rate of a
//! [`SourceLimiter`] owned by this thread (an answer is larger than its request and UDP
//! sources can be spoofed).
//!
//! Invariants: a GSO send carries datagrams to one destination, all of one size except a
//! shorter last one, at most [`GSO_MAX_SEGMENTS`] of them and at most [`GSO_MAX_BYTES`];
//! order per destination is kept; every datagram received ends forwarded or counted as a
//! drop.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tabbify_api::stun_limit::SourceLimiter;
use tabbify_engine::sys::udp as sys;
pub use tabbify_engine::sys::udp::GSO_MAX_SEGMENTS;

use super::core::Drop;
use super::{deliver, Shared};
use crate::proto::{self, Control, Kind};

/// The most payload bytes in one GSO send (an IPv6 UDP datagram's payload limit, rounded).
pub const GSO_MAX_BYTES: usize = 65_000;

/// The relay's UDP socket and what the kernel offered on it.
pub struct Socket {
    sock: UdpSocket,
    ipv6: bool,
    gso: bool,
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: the option value is an int that lives across the call; the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

impl Socket {
    /// Binds `addr`, non-blocking, large buffers, GRO on, GSO probed.
    pub fn bind(addr: SocketAddr) -> io::Result<Socket> {
        let sock = UdpSocket::bind(addr)?;
        sock.set_nonblocking(true)?;
        let fd = sock.as_raw_fd();
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            let size = sys::SOCKET_BUFFER as libc::c_int;
            if !setsockopt_int(fd, libc::SOL_SOCKET, force, size) {
                setsockopt_int(fd, libc::SOL_SOCKET, plain, size);
            }
        }
        setsockopt_int(fd, libc::SOL_UDP, sys::UDP_GRO, 1);
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let gso = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_UDP,
                sys::UDP_SEGMENT,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        } == 0;
        Ok(Socket {
            ipv6: addr.is_ipv6(),
            sock,
            gso,
        })
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one datagram (waiting briefly for room if the buffer is full).
    pub fn send_one(&self, d: &[u8], to: SocketAddr) -> io::Result<()> {
        self.send(d, to, None)
    }

    fn send(&self, d: &[u8], to: SocketAddr, segment: Option<u16>) -> io::Result<()> {
        for attempt in 0..2 {
            match sys::send(self.fd(), d, to, segment, self.ipv6) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && attempt == 0 => {
                    poll(self.fd(), libc::POLLOUT, 10);
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
}

fn poll(fd: RawFd, events: libc::c_short, ms: libc::c_int) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// Splits `sizes` (datagrams to one destination, in order) into GSO sends: (first index,
/// count, segment size). Each send has datagrams of one size, except possibly a shorter
/// last one, at most `max_segs` datagrams and `max_bytes` bytes.
pub fn plan_gso(sizes: &[usize], max_segs: usize, max_bytes: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sizes.len() {
        let seg = sizes[i];
        let mut n = 1;
        let mut bytes = seg;
        while i + n < sizes.len() && n < max_segs {
            let next = sizes[i + n];
            if next > seg || bytes + next > max_bytes || seg == 0 {
                break;
            }
            n += 1;
            bytes += next;
            if next < seg {
                break;
            }
        }
        out.push((i, n, seg));
        i += n;
    }
    out
}

/// Datagrams to send, in order of decision.
#[derive(Default)]
struct Outbox {
    data: Vec<u8>,
    items: Vec<(SocketAddr, usize, usize)>,
    order: Vec<usize>,
    scratch: Vec<u8>,
    sizes: Vec<usize>,
}

impl Outbox {
    fn push(&mut self, to: SocketAddr, d: &[u8]) {
        self.items.push((to, self.data.len(), d.len()));
        self.data.extend_from_slice(d);
    }

    fn flush(&mut self, shared: &Shared) {
        if self.items.is_empty() {
            return;
        }
        let sock = &shared.udp;
        self.order.clear();
        self.order.extend(0..self.items.len());
        // Stable: per-destination order is kept.
        let items = &self.items;
        self.order.sort_by_key(|&i| items[i].0);
        let mut g = 0;
        while g < self.order.len() {
            let dst = self.items[self.order[g]].0;
            let mut end = g;
            while end < self.order.len() && self.items[self.order[end]].0 == dst {
                end += 1;
            }
            let group = &self.order[g..end];
            self.sizes.clear();
            self.sizes.extend(group.iter().map(|&i| self.items[i].2));
            let plan = if sock.gso {
                plan_gso(&self.sizes, GSO_MAX_SEGMENTS, GSO_MAX_BYTES)
            } else {
                (0..group.len()).map(|i| (i, 1, self.sizes[i])).collect()
            };
            for (first, n, seg) in plan {
                self.scratch.clear();
                for &i in &group[first..first + n] {
                    let (_, off, len) = self.items[i];
                    self.scratch.extend_from_slice(&self.data[off..off + len]);
                }
                let segment = (n > 1).then_some(seg as u16);
                match sock.send(&self.scratch, dst, segment) {
                    Ok(()) => shared
                        .metrics
                        .forwarded_n(false, n as u64, self.scratch.len()),
                    Err(_) => shared.metrics.drop(Drop::SendError, n as u64),
                }
            }
            g = end;
        }
        self.items.clear();
        self.data.clear();
    }
}

/// The forwarding loop; returns when `stop` is set.
pub fn run(shared: &Shared, stop: &AtomicBool) {
    let fd = shared.udp.fd();
    let mut buf = vec![0u8; 65_536];
    let mut out = Outbox::default();
    let mut stun = SourceLimiter::default();
    while !stop.load(Ordering::Relaxed) {
        poll(fd, libc::POLLIN, 200);
        for _ in 0..64 {
            match sys::recv(fd, &mut buf) {
                Ok((n, Some(src), seg)) => {
                    handle(shared, &mut buf[..n], src, seg, &mut out, &mut stun)
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ICMP errors (ECONNREFUSED) from earlier sends surface here.
                    tracing::trace!("relay UDP receive: {e}");
                }
            }
            if out.data.len() > 1 << 20 {
                out.flush(shared);
            }
        }
        out.flush(shared);
    }
}

fn handle(
    shared: &Shared,
    d: &mut [u8],
    src: SocketAddr,
    seg: Option<u16>,
    out: &mut Outbox,
    stun: &mut SourceLimiter,
) {
    let now = Instant::now();
    let seg = match seg {
        Some(s) if s > 0 => usize::from(s),
        _ => d.len().max(1),
    };
    let mut reg = shared.reg();
    for dg in d.chunks_mut(seg) {
        match proto::classify(dg) {
            Kind::RelayFrame => match reg.forward_udp(src, dg, now) {
                Ok(super::core::Deliver::Udp(a)) => out.push(a, dg),
                other => deliver(shared, other, dg, false),
            },
            Kind::RelayControl => match Control::parse(dg) {
                Ok(Control::Bind { handle, cookie }) => match reg.bind(src, handle, &cookie, now) {
                    Ok(()) => out.push(src, &Control::BindAck { handle }.encode()),
                    Err(e) => shared.metrics.drop(e, 1),
                },
                _ => shared.metrics.drop(Drop::Malformed, 1),
            },
            Kind::Stun => match tabbify_api::stun::answer(dg, src) {
                Ok(Some(_)) if !stun.allow(src.ip(), now) => {
                    shared.metrics.drop(Drop::StunRateLimited, 1)
                }
                Ok(Some(reply)) => {
                    shared.metrics.stun_answered();
                    out.push(src, &reply);
                }
                // Indications and responses get no answer.
                Ok(None) => shared.metrics.drop(Drop::Junk, 1),
                Err(_) => shared.metrics.drop(Drop::Malformed, 1),
            },
            Kind::WireGuard | Kind::Junk => shared.metrics.drop(Drop::Junk, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_plan_groups_equal_sizes_with_a_short_tail() {
        assert_eq!(plan_gso(&[], 64, 65_000), vec![]);
        assert_eq!(
            plan_gso(&[100, 100, 100, 40], 64, 65_000),
            vec![(0, 4, 100)]
        );
        assert_eq!(
            plan_gso(&[100, 40, 100, 100], 64, 65_000),
            vec![(0, 2, 100), (2, 2, 100)]
        );
        assert_eq!(
            plan_gso(&[40, 100], 64, 65_000),
            vec![(0, 1, 40), (1, 1, 100)]
        );
        assert_eq!(
            plan_gso(&[10; 5], 2, 65_000),
            vec![(0, 2, 10), (2, 2, 10), (4, 1, 10)]
        );
        assert_eq!(plan_gso(&[30; 3], 64, 60), vec![(0, 2, 30), (2, 1, 30)]);
        assert_eq!(plan_gso(&[0, 0], 64, 60), vec![(0, 1, 0), (1, 1, 0)]);
    }
}
