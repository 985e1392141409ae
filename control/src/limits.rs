//! Admission limits: what one member (or one source address) may hold of the coordinator
//! at a time, so that no single certificate holder can exhaust it.
//!
//! * [`RateLimiter`]: a token bucket per identity for heartbeats and registrations
//!   (sans-IO: every call takes `now_ms`).
//! * [`ConnLimits`]: open connections overall and per source IP; a [`ConnPermit`] is held
//!   for the life of a connection and gives its slot back when dropped.
//! * [`StreamLimits`]: open SSE streams per identity; a [`StreamPermit`] is held by the
//!   stream task.
//!
//! Invariants: a counter equals the number of live permits of its key (permits are the
//! only way to take or give back a slot); a key whose count falls to zero is forgotten, so
//! the maps hold only keys with something open.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Token-bucket parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
    /// Tokens added per second.
    pub per_sec: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_ms: u64,
}

/// A token bucket per key (an identity).
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateConfig,
    buckets: HashMap<String, Bucket>,
}

impl RateLimiter {
    /// Empty buckets are created full.
    pub fn new(cfg: RateConfig) -> Self {
        Self {
            cfg,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token from `key`'s bucket if it has one.
    pub fn allow(&mut self, key: &str, now_ms: u64) -> bool {
        let burst = f64::from(self.cfg.burst.max(1));
        let per_ms = self.cfg.per_sec.max(0.0) / 1000.0;
        let b = self.buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            last_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.last_ms) as f64;
        b.tokens = (b.tokens + elapsed * per_ms).min(burst);
        b.last_ms = b.last_ms.max(now_ms);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets buckets that have refilled completely (they would be created full anyway).
    pub fn prune(&mut self, now_ms: u64) {
        let burst = f64::from(self.cfg.burst.max(1));
        let per_ms = self.cfg.per_sec.max(0.0) / 1000.0;
        self.buckets
            .retain(|_, b| b.tokens + now_ms.saturating_sub(b.last_ms) as f64 * per_ms < burst);
    }

    /// Number of buckets kept.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is kept.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// The coordinator holds its overall maximum of connections.
    Overall,
    /// This source IP holds its maximum of connections.
    PerIp,
}

#[derive(Debug, Default)]
struct ConnCounts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Connection caps, overall and per source IP.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    counts: Arc<Mutex<ConnCounts>>,
}

/// A connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnPermit {
    ip: IpAddr,
    counts: Arc<Mutex<ConnCounts>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The counters are updated in one step each, so a poisoned lock still holds sane data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConnLimits {
    /// Caps of `max_total` connections and `max_per_ip` from one source address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            max_total,
            max_per_ip,
            counts: Arc::default(),
        }
    }

    /// A slot for a connection from `ip`, or why there is none.
    pub fn acquire(&self, ip: IpAddr) -> Result<ConnPermit, ConnRefusal> {
        let mut c = lock(&self.counts);
        if c.total >= self.max_total {
            return Err(ConnRefusal::Overall);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(ConnRefusal::PerIp);
        }
        *n += 1;
        c.total += 1;
        Ok(ConnPermit {
            ip,
            counts: self.counts.clone(),
        })
    }

    /// Open connections overall.
    pub fn open(&self) -> usize {
        lock(&self.counts).total
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Open SSE streams per identity.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    max: usize,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// A stream's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamPermit {
    identity: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamLimits {
    /// At most `max` streams per identity.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            counts: Arc::default(),
        }
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for a stream of `identity`, or `None` when it holds `max` already.
    pub fn acquire(&self, identity: &str) -> Option<StreamPermit> {
        let mut c = lock(&self.counts);
        let n = c.entry(identity.to_owned()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(StreamPermit {
            identity: identity.to_owned(),
            counts: self.counts.clone(),
        })
    }

    /// Streams `identity` holds open.
    pub fn open(&self, identity: &str) -> usize {
        lock(&self.counts).get(identity).copied().unwrap_or(0)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        if let Some(n) = c.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_refill_rate() {
        let mut r = RateLimiter::new(RateConfig {
            burst: 3,
            per_sec: 1.0,
        });
        let t = 1_000_000;
        assert!((0..3).all(|_| r.allow("a", t)));
        assert!(!r.allow("a", t));
        assert!(r.allow("b", t), "buckets are per key");
        assert!(!r.allow("a", t + 999));
        assert!(r.allow("a", t + 1000));
        assert!(!r.allow("a", t + 1000));
        // A long quiet period refills to the burst, not beyond.
        assert!((0..3).all(|_| r.allow("a", t + 100_000)));
        assert!(!r.allow("a", t + 100_000));
        r.prune(t + 100_000);
        assert_eq!(r.len(), 1, "b refilled, a did not");
        r.prune(t + 200_000);
        assert!(r.is_empty());
    }

    #[test]
    fn conn_permits_count_and_give_back() {
        let l = ConnLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.acquire(a).unwrap();
        let _p2 = l.acquire(a).unwrap();
        assert_eq!(l.acquire(a).unwrap_err(), ConnRefusal::PerIp);
        let _p3 = l.acquire(b).unwrap();
        assert_eq!(l.acquire(b).unwrap_err(), ConnRefusal::Overall);
        drop(p1);
        assert_eq!(l.open(), 2);
        let _p4 = l.acquire(b).unwrap();
    }

    #[test]
    fn stream_permits_per_identity() {
        let l = StreamLimits::new(2);
        let a = l.acquire("x").unwrap();
        let _b = l.acquire("x").unwrap();
        assert!(l.acquire("x").is_none());
        assert!(l.acquire("y").is_some());
        drop(a);
        assert_eq!(l.open("x"), 1);
        assert!(l.acquire("x").is_some());
    }
}
