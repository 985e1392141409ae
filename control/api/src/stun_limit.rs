//! The per-source rate limit on STUN answers, shared by the coordinator's STUN server and
//! the relay's UDP port.
//!
//! Why: a Binding answer is about 1.5 times the size of the request that asked for it and
//! goes to the request's *source address*, which UDP does not authenticate. Without a limit
//! a server is a (small) amplifier towards any spoofed victim. Each source gets a token
//! bucket of answers; a request over its bucket is dropped (and counted by the caller).
//!
//! Invariants:
//! * sources are keyed by IPv4 address, or by IPv6 /64 (one host's or one site's prefix:
//!   an attacker inside a /64 gets one bucket, and a victim's whole /64 is protected by one
//!   bucket), never by port (a spoofer picks ports freely);
//! * the table holds at most `max_sources` buckets; buckets that have refilled completely
//!   carry no information and are pruned when the table is full; if it is still full, a
//!   *new* source is refused (never an existing bucket evicted, which would hand a victim's
//!   spent bucket back to the attacker);
//! * every decision takes `now` (sans-IO); memory never grows past the cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Answers one source may get at once (bucket size).
pub const DEFAULT_BURST: u32 = 32;
/// Answers per second one source may sustain.
pub const DEFAULT_PER_SEC: u32 = 16;
/// Most sources tracked at once.
pub const DEFAULT_MAX_SOURCES: usize = 65_536;

/// A token bucket per source; see the module docs.
#[derive(Debug)]
pub struct SourceLimiter {
    burst: u32,
    per_sec: u32,
    max_sources: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens in thousandths of an answer.
    milli: u64,
    last: Instant,
}

impl Default for SourceLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_PER_SEC, DEFAULT_MAX_SOURCES)
    }
}

impl SourceLimiter {
    /// A limiter giving each source `burst` answers at once and `per_sec` a second after
    /// that, tracking at most `max_sources` sources (each at least 1).
    pub fn new(burst: u32, per_sec: u32, max_sources: usize) -> Self {
        Self {
            burst: burst.max(1),
            per_sec: per_sec.max(1),
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Whether an answer to `source` may be sent at `now` (takes one token if so).
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        let key = key(source);
        let full = u64::from(self.burst) * 1000;
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_sources {
            self.prune(now);
            if self.buckets.len() >= self.max_sources {
                return false;
            }
        }
        let per_sec = u64::from(self.per_sec);
        let b = self.buckets.entry(key).or_insert(Bucket {
            milli: full,
            last: now,
        });
        let dt = now.saturating_duration_since(b.last);
        let add = (dt.as_micros() as u64).saturating_mul(per_sec) / 1000;
        if add > 0 {
            b.milli = b.milli.saturating_add(add).min(full);
            b.last = now;
        }
        if b.milli >= 1000 {
            b.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Drops the buckets that are full again at `now` (they hold no state worth keeping).
    fn prune(&mut self, now: Instant) {
        let refill = Duration::from_millis(u64::from(self.burst) * 1000 / u64::from(self.per_sec));
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < refill);
    }
}

/// The bucket key of a source: the IPv4 address (also for an IPv4-mapped IPv6 one), or the
/// IPv6 /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_flooding_source_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(4, 2, 100);
        let victim = ip("192.0.2.1");
        let answered = (0..1000).filter(|_| l.allow(victim, t0)).count();
        assert_eq!(answered, 4, "the burst, then nothing at the same instant");
        // Another source is answered while the victim is over its limit.
        assert!(l.allow(ip("192.0.2.2"), t0));
        // One second later: `per_sec` more, not more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..1000).filter(|_| l.allow(victim, t1)).count(), 2);
        // Refill never exceeds the burst.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..1000).filter(|_| l.allow(victim, t2)).count(), 4);
    }

    #[test]
    fn ports_and_ipv6_interface_ids_share_a_bucket() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(2, 1, 100);
        assert!(l.allow(ip("2001:db8:1:2::1"), t0));
        assert!(l.allow(ip("2001:db8:1:2:ffff::9"), t0));
        assert!(!l.allow(ip("2001:db8:1:2:aaaa::3"), t0), "same /64");
        assert!(l.allow(ip("2001:db8:1:3::1"), t0), "another /64");
        assert!(l.allow(ip("::ffff:192.0.2.7"), t0));
        assert!(l.allow(ip("192.0.2.7"), t0));
        assert!(!l.allow(ip("192.0.2.7"), t0), "mapped and plain IPv4 share");
    }

    #[test]
    fn a_full_table_prunes_refilled_buckets_and_never_evicts_a_spent_one() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(2, 1, 3);
        let victim = ip("198.51.100.1");
        assert!(l.allow(victim, t0));
        assert!(l.allow(victim, t0));
        assert!(l.allow(ip("198.51.100.2"), t0));
        assert!(l.allow(ip("198.51.100.3"), t0));
        // Full: a spoofed flood of new sources is refused, the victim's bucket stays spent.
        for i in 10..200u8 {
            assert!(!l.allow(IpAddr::from([203, 0, 113, i]), t0));
        }
        assert_eq!(l.len(), 3);
        assert!(!l.allow(victim, t0));
        // Later, refilled buckets are pruned and new sources fit again.
        let t1 = t0 + Duration::from_secs(5);
        assert!(l.allow(ip("203.0.113.50"), t1));
        assert!(l.len() <= 3);
    }
}
