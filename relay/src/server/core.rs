//! The relay's sans-IO core: the live sessions (handle, WireGuard public key, identity,
//! bind cookie, bound UDP address, rate bucket, stream sink), handle allocation, the
//! limits, and the forwarding decision for every frame. Every decision that needs a clock
//! takes `now`.
//!
//! Invariants:
//! * a handle names at most one live session; handles are allocated by a monotonic
//!   counter mod 2^24 skipping 0 and live handles, so a handle is not reused until the
//!   counter wraps (16.7 M sessions later);
//! * a public key has at most one live session (a newer proven session replaces the older);
//! * a UDP address is bound to at most one session, and only by a BIND carrying that
//!   session's cookie; an address another session used within [`ADDR_HOLD`] is not taken
//!   from it (so a member that can spoof source addresses cannot steal a live member's
//!   binding with its own cookie);
//! * a frame is forwarded only if its source is a live session (by bound address over UDP,
//!   by its own stream otherwise), its destination handle is live, and the source's bucket
//!   has room; the forwarded frame carries the *source's* handle. Everything else is a
//!   [`Drop`] with its reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::proto::{self, COOKIE_LEN, MAX_HANDLE};

/// How long a session keeps its bound address against another session's BIND after it
/// last sent from there (three missed 10-second BIND keepalives).
pub const ADDR_HOLD: Duration = Duration::from_secs(30);

/// Limits of one relay.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most live sessions.
    pub max_sessions: usize,
    /// Most live sessions per identity (certificate CN).
    pub max_sessions_per_identity: usize,
    /// Per-session forwarding rate, bytes per second.
    pub rate_bytes_per_sec: u64,
    /// Per-session burst, bytes.
    pub burst_bytes: u64,
    /// A session with no traffic, BIND or keepalive for this long ends.
    pub idle_timeout: Duration,
    /// Most connections at once that have not finished TLS, the upgrade and the proof;
    /// more are closed at accept (a client without a certificate can open connections).
    pub max_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 10_000,
            max_sessions_per_identity: 4,
            // 2.5 Gbit/s per session, 4 MiB burst.
            rate_bytes_per_sec: 312_500_000,
            burst_bytes: 4 << 20,
            idle_timeout: Duration::from_secs(60),
            max_handshakes: 1024,
        }
    }
}

/// A token bucket in bytes; `now` is an argument.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` bytes if there is room at `now`.
    pub fn take(&mut self, n: u64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last);
        if !dt.is_zero() {
            let add = (u128::from(self.rate) * dt.as_nanos() / 1_000_000_000) as u64;
            if add > 0 {
                self.tokens = self.tokens.saturating_add(add).min(self.burst);
                self.last = now;
            }
        }
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Why a datagram or frame was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Drop {
    /// A frame over UDP from an address no session bound.
    UnboundSource,
    /// A frame to a handle that is not live.
    UnknownHandle,
    /// Unparseable (short, bad type, bad control datagram).
    Malformed,
    /// The source session is over its rate.
    OverRate,
    /// A BIND with a wrong cookie or unknown handle.
    BadBind,
    /// A BIND for an address another session used within [`ADDR_HOLD`].
    AddrInUse,
    /// The destination's stream queue is full (or closed).
    QueueFull,
    /// A datagram none of our kinds (or a plain WireGuard message sent to the relay).
    Junk,
    /// A STUN request not answered: its source (IPv4 address or IPv6 /64) was over its
    /// answer rate ([`tabbify_api::stun_limit`]).
    StunRateLimited,
    /// Sending on the UDP socket failed.
    SendError,
}

impl Drop {
    /// Every reason, for metrics.
    pub const ALL: [Drop; 10] = [
        Drop::UnboundSource,
        Drop::UnknownHandle,
        Drop::Malformed,
        Drop::OverRate,
        Drop::BadBind,
        Drop::AddrInUse,
        Drop::QueueFull,
        Drop::Junk,
        Drop::StunRateLimited,
        Drop::SendError,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Drop::UnboundSource => "unbound_source",
            Drop::UnknownHandle => "unknown_handle",
            Drop::Malformed => "malformed",
            Drop::OverRate => "over_rate",
            Drop::BadBind => "bad_bind",
            Drop::AddrInUse => "addr_in_use",
            Drop::QueueFull => "queue_full",
            Drop::Junk => "junk",
            Drop::StunRateLimited => "stun_rate_limited",
            Drop::SendError => "send_error",
        }
    }

    /// Index into [`Drop::ALL`].
    pub fn index(self) -> usize {
        Drop::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }
}

/// Where a forwarded frame goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deliver<S> {
    /// To this UDP address.
    Udp(SocketAddr),
    /// Into this session's stream.
    Stream(S),
}

/// Why a session was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refuse {
    /// At `max_sessions`.
    Full,
    /// The identity is at `max_sessions_per_identity`.
    IdentityLimit,
}

struct Session<S> {
    key: [u8; 32],
    identity: String,
    cookie: [u8; COOKIE_LEN],
    udp: Option<SocketAddr>,
    /// Last BIND or frame from `udp`.
    udp_seen: Instant,
    stream_only: bool,
    bucket: TokenBucket,
    last_active: Instant,
    sink: S,
}

/// A newly opened session.
#[derive(Debug)]
pub struct Opened<S> {
    /// Its handle.
    pub handle: u32,
    /// Its bind cookie.
    pub cookie: [u8; COOKIE_LEN],
    /// The older session of the same key it replaced (handle, sink), now gone.
    pub replaced: Option<(u32, S)>,
}

/// The live sessions. `S` is a session's stream sink (a channel sender in the server).
pub struct Registry<S> {
    limits: Limits,
    sessions: HashMap<u32, Session<S>>,
    by_key: HashMap<[u8; 32], u32>,
    by_addr: HashMap<SocketAddr, u32>,
    per_identity: HashMap<String, usize>,
    next: u32,
}

impl<S: Clone> Registry<S> {
    /// An empty registry.
    pub fn new(limits: Limits) -> Self {
        Registry {
            limits,
            sessions: HashMap::new(),
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
            per_identity: HashMap::new(),
            next: 1,
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether there is no live session.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn allocate(&mut self) -> Option<u32> {
        for _ in 0..=MAX_HANDLE {
            let h = self.next;
            self.next = if self.next >= MAX_HANDLE {
                1
            } else {
                self.next + 1
            };
            if !self.sessions.contains_key(&h) {
                return Some(h);
            }
        }
        None
    }

    /// Opens a session for a proven `key` of `identity`. A live session of the same key is
    /// replaced (it is the same member, reconnected) and reported in [`Opened::replaced`].
    pub fn open(
        &mut self,
        key: [u8; 32],
        identity: &str,
        cookie: [u8; COOKIE_LEN],
        stream_only: bool,
        sink: S,
        now: Instant,
    ) -> Result<Opened<S>, Refuse> {
        let old = self.by_key.get(&key).copied();
        let freed = usize::from(old.is_some());
        let old_same_identity = old
            .and_then(|h| self.sessions.get(&h))
            .is_some_and(|s| s.identity == identity);
        if self.sessions.len() - freed >= self.limits.max_sessions {
            return Err(Refuse::Full);
        }
        let mine =
            self.per_identity.get(identity).copied().unwrap_or(0) - usize::from(old_same_identity);
        if mine >= self.limits.max_sessions_per_identity {
            return Err(Refuse::IdentityLimit);
        }
        let replaced = old.and_then(|h| self.close(h).map(|s| (h, s)));
        let handle = self.allocate().ok_or(Refuse::Full)?;
        self.sessions.insert(
            handle,
            Session {
                key,
                identity: identity.to_owned(),
                cookie,
                udp: None,
                udp_seen: now,
                stream_only,
                bucket: TokenBucket::new(
                    self.limits.rate_bytes_per_sec,
                    self.limits.burst_bytes,
                    now,
                ),
                last_active: now,
                sink,
            },
        );
        self.by_key.insert(key, handle);
        *self.per_identity.entry(identity.to_owned()).or_default() += 1;
        Ok(Opened {
            handle,
            cookie,
            replaced,
        })
    }

    /// Ends a session; its sink, or `None` if it was not live.
    pub fn close(&mut self, handle: u32) -> Option<S> {
        let s = self.sessions.remove(&handle)?;
        if self.by_key.get(&s.key) == Some(&handle) {
            self.by_key.remove(&s.key);
        }
        if let Some(a) = s.udp {
            if self.by_addr.get(&a) == Some(&handle) {
                self.by_addr.remove(&a);
            }
        }
        if let Some(n) = self.per_identity.get_mut(&s.identity) {
            *n -= 1;
            if *n == 0 {
                self.per_identity.remove(&s.identity);
            }
        }
        Some(s.sink)
    }

    /// Whether `handle` is live.
    pub fn is_live(&self, handle: u32) -> bool {
        self.sessions.contains_key(&handle)
    }

    /// The live handle of `key`.
    pub fn lookup(&self, key: &[u8; 32]) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The sinks of every live session (for GONE broadcasts).
    pub fn sinks(&self) -> Vec<(u32, S)> {
        self.sessions
            .iter()
            .map(|(h, s)| (*h, s.sink.clone()))
            .collect()
    }

    /// Marks a session active (keepalive, lookup).
    pub fn touch(&mut self, handle: u32, now: Instant) {
        if let Some(s) = self.sessions.get_mut(&handle) {
            s.last_active = now;
        }
    }

    /// A BIND from `from`: binds the address if the cookie matches (constant time).
    /// Rebinding moves the session to the new address (network change).
    pub fn bind(
        &mut self,
        from: SocketAddr,
        handle: u32,
        cookie: &[u8; COOKIE_LEN],
        now: Instant,
    ) -> Result<(), Drop> {
        let s = self.sessions.get(&handle).ok_or(Drop::BadBind)?;
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a[..COOKIE_LEN].copy_from_slice(&s.cookie);
        b[..COOKIE_LEN].copy_from_slice(cookie);
        if !proto::mac_eq(&a, &b) {
            return Err(Drop::BadBind);
        }
        if let Some(prev) = self.by_addr.get(&from).filter(|p| **p != handle) {
            let held = self.sessions.get(prev).is_some_and(|p| {
                p.udp == Some(from) && now.saturating_duration_since(p.udp_seen) < ADDR_HOLD
            });
            if held {
                return Err(Drop::AddrInUse);
            }
        }
        let s = self.sessions.get_mut(&handle).ok_or(Drop::BadBind)?;
        s.last_active = now;
        s.udp_seen = now;
        let old = s.udp.replace(from);
        if let Some(o) = old.filter(|o| *o != from) {
            if self.by_addr.get(&o) == Some(&handle) {
                self.by_addr.remove(&o);
            }
        }
        if let Some(prev) = self.by_addr.insert(from, handle) {
            if prev != handle {
                if let Some(p) = self.sessions.get_mut(&prev) {
                    p.udp = None;
                }
            }
        }
        Ok(())
    }

    fn route(&mut self, src: u32, frame: &mut [u8], now: Instant) -> Result<Deliver<S>, Drop> {
        let (_, dst) = proto::frame_header(frame).map_err(|_| Drop::Malformed)?;
        let s = self.sessions.get_mut(&src).ok_or(Drop::UnboundSource)?;
        s.last_active = now;
        if !s.bucket.take(frame.len() as u64, now) {
            return Err(Drop::OverRate);
        }
        let d = self.sessions.get(&dst).ok_or(Drop::UnknownHandle)?;
        let out = match d.udp {
            Some(a) if !d.stream_only => Deliver::Udp(a),
            _ => Deliver::Stream(d.sink.clone()),
        };
        proto::set_frame_handle(frame, src).map_err(|_| Drop::Malformed)?;
        Ok(out)
    }

    /// A frame received over UDP from `from`: rewrites its handle to the source's and says
    /// where it goes.
    pub fn forward_udp(
        &mut self,
        from: SocketAddr,
        frame: &mut [u8],
        now: Instant,
    ) -> Result<Deliver<S>, Drop> {
        let src = *self.by_addr.get(&from).ok_or(Drop::UnboundSource)?;
        if let Some(s) = self.sessions.get_mut(&src) {
            s.udp_seen = now;
        }
        self.route(src, frame, now)
    }

    /// A frame received on session `src`'s stream.
    pub fn forward_stream(
        &mut self,
        src: u32,
        frame: &mut [u8],
        now: Instant,
    ) -> Result<Deliver<S>, Drop> {
        self.route(src, frame, now)
    }

    /// Sessions idle past the timeout at `now`: closed and returned with their sinks.
    pub fn expire(&mut self, now: Instant) -> Vec<(u32, S)> {
        let idle = self.limits.idle_timeout;
        let dead: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_active) >= idle)
            .map(|(h, _)| *h)
            .collect();
        dead.into_iter()
            .filter_map(|h| self.close(h).map(|s| (h, s)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry<u32> {
        Registry::new(Limits {
            max_sessions: 3,
            max_sessions_per_identity: 2,
            rate_bytes_per_sec: 1000,
            burst_bytes: 100,
            idle_timeout: Duration::from_secs(30),
            max_handshakes: 1,
        })
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn forward_rewrites_to_source_handle() {
        let now = Instant::now();
        let mut r = reg();
        let a = r.open([1; 32], "a", [1; 16], false, 10, now).unwrap();
        let b = r.open([2; 32], "b", [2; 16], false, 20, now).unwrap();
        r.bind(addr(1), a.handle, &[1; 16], now).unwrap();
        let mut f = [0xE4, 0, 0, b.handle as u8, 9];
        // b has no UDP yet: over its stream.
        assert_eq!(r.forward_udp(addr(1), &mut f, now), Ok(Deliver::Stream(20)));
        assert_eq!(proto::frame_header(&f).unwrap(), (4, a.handle));
        r.bind(addr(2), b.handle, &[2; 16], now).unwrap();
        let mut f = [0xE4, 0, 0, b.handle as u8, 9];
        assert_eq!(
            r.forward_udp(addr(1), &mut f, now),
            Ok(Deliver::Udp(addr(2)))
        );
        let mut f = [0xE4, 0, 0, a.handle as u8, 9];
        assert_eq!(
            r.forward_stream(b.handle, &mut f, now),
            Ok(Deliver::Udp(addr(1)))
        );
        assert_eq!(proto::frame_header(&f).unwrap().1, b.handle);
    }

    #[test]
    fn attacker_drops() {
        let now = Instant::now();
        let mut r = reg();
        let a = r.open([1; 32], "a", [1; 16], false, 10, now).unwrap();
        // Wrong cookie, unknown handle.
        assert_eq!(r.bind(addr(9), a.handle, &[0; 16], now), Err(Drop::BadBind));
        assert_eq!(r.bind(addr(9), 999, &[1; 16], now), Err(Drop::BadBind));
        let mut f = [0xE1, 0, 0, a.handle as u8];
        assert_eq!(
            r.forward_udp(addr(9), &mut f, now),
            Err(Drop::UnboundSource)
        );
        r.bind(addr(1), a.handle, &[1; 16], now).unwrap();
        let mut f = [0xE1, 0, 0x10, 0];
        assert_eq!(
            r.forward_udp(addr(1), &mut f, now),
            Err(Drop::UnknownHandle)
        );
        let mut f = [0xE1, 0, 0];
        assert_eq!(r.forward_udp(addr(1), &mut f, now), Err(Drop::Malformed));
    }

    #[test]
    fn rate_limit_is_per_session() {
        let now = Instant::now();
        let mut r = reg();
        let a = r.open([1; 32], "a", [1; 16], false, 10, now).unwrap();
        let b = r.open([2; 32], "b", [2; 16], false, 20, now).unwrap();
        let mut f = vec![0xE1, 0, 0, b.handle as u8];
        f.resize(60, 0);
        assert!(r.forward_stream(a.handle, &mut f.clone(), now).is_ok());
        assert_eq!(
            r.forward_stream(a.handle, &mut f.clone(), now),
            Err(Drop::OverRate)
        );
        let mut g = f.clone();
        g[3] = a.handle as u8;
        assert!(r.forward_stream(b.handle, &mut g, now).is_ok());
        // 1000 B/s: 60 bytes back after 60 ms.
        let later = now + Duration::from_millis(60);
        assert!(r.forward_stream(a.handle, &mut f, later).is_ok());
    }

    #[test]
    fn limits_replacement_and_expiry() {
        let now = Instant::now();
        let mut r = reg();
        let a = r.open([1; 32], "x", [1; 16], false, 1, now).unwrap();
        r.open([2; 32], "x", [2; 16], false, 2, now).unwrap();
        assert_eq!(
            r.open([3; 32], "x", [3; 16], false, 3, now).unwrap_err(),
            Refuse::IdentityLimit
        );
        // Same key again: replaces, within the identity limit.
        let a2 = r.open([1; 32], "x", [4; 16], false, 4, now).unwrap();
        assert_eq!(a2.replaced.map(|r| r.0), Some(a.handle));
        assert_ne!(a2.handle, a.handle);
        assert!(!r.is_live(a.handle));
        assert_eq!(r.lookup(&[1; 32]), Some(a2.handle));
        r.open([5; 32], "y", [5; 16], false, 5, now).unwrap();
        assert_eq!(
            r.open([6; 32], "z", [6; 16], false, 6, now).unwrap_err(),
            Refuse::Full
        );
        r.touch(a2.handle, now + Duration::from_secs(20));
        let gone = r.expire(now + Duration::from_secs(31));
        assert_eq!(gone.len(), 2);
        assert!(r.is_live(a2.handle));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn handles_skip_live_and_zero_and_wrap() {
        let now = Instant::now();
        let mut r: Registry<u32> = Registry::new(Limits {
            max_sessions: 10,
            max_sessions_per_identity: 10,
            ..Limits::default()
        });
        r.next = MAX_HANDLE;
        let a = r.open([1; 32], "a", [0; 16], false, 0, now).unwrap();
        assert_eq!(a.handle, MAX_HANDLE);
        let b = r.open([2; 32], "a", [0; 16], false, 0, now).unwrap();
        assert_eq!(b.handle, 1);
        r.next = MAX_HANDLE;
        let c = r.open([3; 32], "a", [0; 16], false, 0, now).unwrap();
        assert_eq!(c.handle, 2);
    }

    #[test]
    fn rebind_moves_address() {
        let now = Instant::now();
        let mut r = reg();
        let a = r.open([1; 32], "a", [1; 16], false, 1, now).unwrap();
        let b = r.open([2; 32], "b", [2; 16], false, 2, now).unwrap();
        r.bind(addr(1), a.handle, &[1; 16], now).unwrap();
        r.bind(addr(2), a.handle, &[1; 16], now).unwrap();
        let mut f = [0xE1, 0, 0, b.handle as u8];
        assert_eq!(
            r.forward_udp(addr(1), &mut f, now),
            Err(Drop::UnboundSource)
        );
        assert!(r.forward_udp(addr(2), &mut f, now).is_ok());
        // b (with its own valid cookie) cannot take addr 2 while a uses it: a member that
        // spoofs a's source address cannot steal its binding.
        assert_eq!(
            r.bind(addr(2), b.handle, &[2; 16], now),
            Err(Drop::AddrInUse)
        );
        let later = now + ADDR_HOLD - Duration::from_secs(1);
        assert!(r.forward_udp(addr(2), &mut f, later).is_ok());
        assert_eq!(
            r.bind(addr(2), b.handle, &[2; 16], later + Duration::from_secs(2)),
            Err(Drop::AddrInUse)
        );
        // a went silent there for ADDR_HOLD (it moved; the NAT reused the mapping): b
        // takes addr 2 and a loses it.
        let much_later = later + ADDR_HOLD;
        r.bind(addr(2), b.handle, &[2; 16], much_later).unwrap();
        let mut f = [0xE1, 0, 0, a.handle as u8];
        assert_eq!(
            r.forward_udp(addr(2), &mut f, much_later),
            Ok(Deliver::Stream(1))
        );
    }
}
