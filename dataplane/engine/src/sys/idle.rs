//! Where an idle io_uring worker sleeps: an epoll set (through `mio`) over its TUN queue and
//! UDP socket, readable interest only.
//!
//! It owns nothing but the epoll instance and its event buffer; the fds stay the worker's.
//! It reports only that something may be readable: the caller takes the data through its
//! ring (`driver::uring`), never through this set. `mio` registers edge-triggered, so a
//! wake-up is a packet queued since the fd was last reported; a report whose packet the
//! ring already took is a spurious return, which costs the caller one empty turn and
//! nothing else. Why a worker sleeps here rather than in `io_uring_enter`: see the
//! `driver::uring` module docs (synchronous wake-ups).

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

/// An epoll set over one worker's receive fds.
pub struct IdleWait {
    poll: Poll,
    events: Events,
}

impl IdleWait {
    /// A set watching `tun` and `udp` for readability. Both must stay open while it lives
    /// (they are the worker's, which drops them after this).
    pub fn new(tun: RawFd, udp: RawFd) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut SourceFd(&tun), Token(0), Interest::READABLE)?;
        poll.registry()
            .register(&mut SourceFd(&udp), Token(1), Interest::READABLE)?;
        Ok(Self {
            poll,
            events: Events::with_capacity(4),
        })
    }

    /// Sleeps until either fd becomes readable or `timeout` passes. A signal ends the
    /// wait early without an error.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    #[test]
    fn wakes_on_a_datagram_and_times_out_without_one() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut idle = IdleWait::new(other.as_raw_fd(), rx.as_raw_fd()).unwrap();
        // Nothing queued: the wait ends by its timeout, with no event.
        idle.wait(Duration::from_millis(20)).unwrap();
        assert!(idle.events.is_empty());
        // A datagram queued before the wait is reported (no wake-up is lost in between).
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"x", rx.local_addr().unwrap()).unwrap();
        let start = Instant::now();
        idle.wait(Duration::from_secs(30)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(30));
        assert_eq!(
            idle.events.iter().map(|e| e.token()).collect::<Vec<_>>(),
            [Token(1)]
        );
    }
}
