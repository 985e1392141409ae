//! First-byte demultiplexing of the WireGuard UDP socket, and the queue that hands the
//! datagrams that are not WireGuard to the control side (the joiner).
//!
//! The socket carries, besides WireGuard (relay protocol, decided for the whole project):
//!
//! | first bytes | kind |
//! |---|---|
//! | `0x01..=0x04`, bytes 1..4 zero | WireGuard (the pipeline proper) |
//! | top two bits `00`, bytes 4..8 = `0x2112A442` | STUN (RFC 8489 magic cookie) |
//! | `0xE1..=0xE4` | relay frame (a WireGuard message with a relay handle) |
//! | `0xF0..=0xFF` | relay control datagram (`BIND_ACK`, …) |
//! | anything else | junk: dropped and counted |
//!
//! The pipeline calls [`classify`] only for a datagram that failed the WireGuard check, so
//! WireGuard packets pay one branch. Relay frames stay in the pipeline: restored to their
//! WireGuard message (`core::path::restore`) and decrypted like direct ones. STUN and relay-control datagrams are copied into a
//! fixed-size slot of the [`ControlQueue`], which is bounded and preallocated: a push never
//! allocates, holds the lock for one copy of at most [`CONTROL_MAX`] bytes, and fails (the
//! datagram is dropped and counted) when the queue is full, so a flood cannot grow memory
//! or stall a worker. The control side blocks in [`ControlQueue::pop_wait`] (a condition
//! variable: its wake-up) or polls [`ControlQueue::try_pop`]. Datagrams may arrive on any
//! worker's socket (`SO_REUSEPORT` spreads flows), so all workers share one queue.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// STUN's magic cookie (RFC 8489 §5), bytes 4..8 of a STUN message.
const STUN_MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// The largest control datagram the queue carries (a STUN answer of any standard server
/// fits; larger ones are dropped as junk).
pub const CONTROL_MAX: usize = 576;

/// How many control datagrams may wait for the control side.
pub const CONTROL_QUEUE_LEN: usize = 256;

/// What a datagram on the WireGuard socket is, by its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A WireGuard message type with zero reserved bytes (its length is checked later).
    WireGuard,
    /// A STUN message (top bits `00` and the magic cookie).
    Stun,
    /// A relay frame (`0xE0 | wg_type`, then a 24-bit handle).
    RelayFrame,
    /// A relay control datagram (`0xF0..=0xFF`).
    RelayControl,
    /// None of these.
    Junk,
}

/// Classifies a datagram by its first bytes (see the module table). Never panics.
#[inline]
pub fn classify(d: &[u8]) -> Kind {
    match d.first() {
        None => Kind::Junk,
        Some(1..=4) if d.len() >= 4 && d[1..4] == [0, 0, 0] => Kind::WireGuard,
        Some(b) if b & 0xC0 == 0 && d.len() >= 20 && d[4..8] == STUN_MAGIC => Kind::Stun,
        Some(0xE1..=0xE4) if d.len() >= 4 => Kind::RelayFrame,
        Some(0xF0..=0xFF) => Kind::RelayControl,
        Some(_) => Kind::Junk,
    }
}

/// A datagram for the control side: who sent it, what it is, and its bytes (a copy).
#[derive(Clone)]
pub struct ControlDatagram {
    /// The sender.
    pub src: SocketAddr,
    /// [`Kind::Stun`] or [`Kind::RelayControl`].
    pub kind: Kind,
    len: u16,
    buf: [u8; CONTROL_MAX],
}

impl ControlDatagram {
    /// The datagram's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for ControlDatagram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlDatagram")
            .field("src", &self.src)
            .field("kind", &self.kind)
            .field("len", &self.len)
            .finish()
    }
}

/// Why [`ControlQueue::push`] refused a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// Longer than [`CONTROL_MAX`].
    TooLarge,
    /// The queue holds [`CONTROL_QUEUE_LEN`] datagrams already.
    Full,
}

/// The bounded queue from the workers to the control side (see the module docs).
pub struct ControlQueue {
    q: Mutex<VecDeque<ControlDatagram>>,
    ready: Condvar,
    cap: usize,
}

impl std::fmt::Debug for ControlQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlQueue")
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl Default for ControlQueue {
    fn default() -> Self {
        Self::with_capacity(CONTROL_QUEUE_LEN)
    }
}

impl ControlQueue {
    /// A queue of `cap` datagrams (at least one), allocated once here.
    pub fn with_capacity(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            q: Mutex::new(VecDeque::with_capacity(cap)),
            ready: Condvar::new(),
            cap,
        }
    }

    /// Queues a copy of `bytes` from `src`. Never allocates (the deque's room was reserved
    /// up front and never exceeded).
    pub fn push(&self, src: SocketAddr, kind: Kind, bytes: &[u8]) -> Result<(), PushError> {
        let Ok(len) = u16::try_from(bytes.len()) else {
            return Err(PushError::TooLarge);
        };
        if bytes.len() > CONTROL_MAX {
            return Err(PushError::TooLarge);
        }
        let mut q = self.q.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= self.cap {
            return Err(PushError::Full);
        }
        let mut d = ControlDatagram {
            src,
            kind,
            len,
            buf: [0; CONTROL_MAX],
        };
        d.buf[..bytes.len()].copy_from_slice(bytes);
        q.push_back(d);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// The oldest datagram, if any.
    pub fn try_pop(&self) -> Option<ControlDatagram> {
        self.q.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }

    /// The oldest datagram, waiting up to `timeout` for one (the control side's wake-up).
    pub fn pop_wait(&self, timeout: Duration) -> Option<ControlDatagram> {
        let q = self.q.lock().unwrap_or_else(|p| p.into_inner());
        let (mut q, _) = self
            .ready
            .wait_timeout_while(q, timeout, |q| q.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        q.pop_front()
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.q.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stun_request() -> Vec<u8> {
        let mut d = vec![0u8; 20];
        d[1] = 1;
        d[4..8].copy_from_slice(&STUN_MAGIC);
        d
    }

    #[test]
    fn first_bytes_decide() {
        let mut wg = [0u8; 148];
        wg[0] = 1;
        assert_eq!(classify(&wg), Kind::WireGuard);
        wg[0] = 4;
        assert_eq!(classify(&wg[..32]), Kind::WireGuard);
        assert_eq!(classify(&stun_request()), Kind::Stun);
        // A Binding success response starts 0x01 0x01: STUN, not WireGuard.
        let mut resp = stun_request();
        resp[0] = 1;
        assert_eq!(classify(&resp), Kind::Stun);
        assert_eq!(classify(&[0xE4, 0, 0, 7, 1, 2]), Kind::RelayFrame);
        assert_eq!(classify(&[0xF1, 0, 0, 7]), Kind::RelayControl);
        for junk in [
            &[][..],
            &[0x00],
            &[0x05, 0, 0, 0],
            &[0xE0, 0, 0, 1],
            &[0xE5, 0, 0, 1],
            &[0x45, 0, 0, 20],
            &stun_request()[..19],
        ] {
            assert_eq!(classify(junk), Kind::Junk, "{junk:02x?}");
        }
        // Every input: no panic.
        for b in 0..=255u8 {
            for len in 0..24 {
                let mut d = vec![b; len];
                if len >= 8 {
                    d[4..8].copy_from_slice(&STUN_MAGIC);
                }
                let _ = classify(&d);
            }
        }
    }

    #[test]
    fn the_queue_is_bounded_and_keeps_order() {
        let q = ControlQueue::with_capacity(3);
        let src: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        for i in 0..3u8 {
            q.push(src, Kind::Stun, &[i; 20]).unwrap();
        }
        assert_eq!(q.push(src, Kind::Stun, &[9; 20]), Err(PushError::Full));
        assert_eq!(
            q.push(src, Kind::Stun, &[0; CONTROL_MAX + 1]),
            Err(PushError::TooLarge)
        );
        assert_eq!(q.len(), 3);
        for i in 0..3u8 {
            let d = q.try_pop().unwrap();
            assert_eq!((d.src, d.kind, d.bytes()), (src, Kind::Stun, &[i; 20][..]));
        }
        assert!(q.try_pop().is_none());
        assert!(q.pop_wait(Duration::from_millis(1)).is_none());
    }

    #[test]
    fn pop_wait_wakes_on_push() {
        let q = std::sync::Arc::new(ControlQueue::default());
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.pop_wait(Duration::from_secs(30)));
        q.push(
            "[::1]:1".parse().unwrap(),
            Kind::RelayControl,
            &[0xF1, 0, 0, 1],
        )
        .unwrap();
        let d = t.join().unwrap().unwrap();
        assert_eq!(d.bytes(), &[0xF1, 0, 0, 1]);
    }
}
