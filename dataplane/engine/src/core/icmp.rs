//! ICMP "destination unreachable" answers for packets the engine cannot route: a packet read
//! from the TUN whose destination no peer's AllowedIPs cover (a removed peer, an unknown
//! app ULA, a mesh address nobody holds).
//!
//! The joiner routes the whole mesh prefixes into the TUN and `up` keeps every AllowedIPs
//! route on the TUN for the tunnel's life, so such a packet reaches the engine instead of
//! leaving in cleartext by another interface. The engine drops it and answers the local
//! sender at once, written back to the TUN, so the application sees "unreachable" instead of
//! waiting for a timeout:
//! * IPv6: ICMPv6 type 1 (destination unreachable) code 0 (no route to destination),
//!   RFC 4443 §3.1; the invoking packet quoted up to the IPv6 minimum MTU of 1280 bytes.
//! * IPv4: ICMP type 3 (destination unreachable) code 1 (host unreachable), RFC 792; the
//!   invoking packet quoted up to a 576-byte answer (RFC 1812 §4.3.2.3).
//!
//! The answer's source is the unreachable destination itself: that address routes into the
//! TUN (that is how the packet got here), so reverse-path filtering accepts the answer, and
//! no other host's address is claimed.
//!
//! No answer (RFC 4443 §2.4 (e), RFC 1122 §3.2.2): to an ICMP error message, to a packet for
//! a multicast or broadcast destination, from an unspecified, multicast or loopback source,
//! or to an IPv4 fragment other than the first. Answers are rate limited per worker by a
//! token bucket ([`IcmpLimiter`], Linux's `icmp_msgs_per_sec`/`icmp_msgs_burst` defaults).
//!
//! [`unreachable`] parses arbitrary bytes: it never panics and never writes past `out`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::core::wire::{checksum, ipv4, ipv6, protocol};

/// Largest IPv6 answer: the IPv6 minimum MTU (RFC 4443 §2.4 (c)).
pub const V6_MAX: usize = 1280;
/// Largest IPv4 answer (RFC 1812 §4.3.2.3).
pub const V4_MAX: usize = 576;
/// ICMPv6 destination unreachable.
const ICMPV6_DST_UNREACH: u8 = 1;
/// ICMPv6 code: no route to destination.
const ICMPV6_NO_ROUTE: u8 = 0;
/// ICMP destination unreachable.
const ICMP_DST_UNREACH: u8 = 3;
/// ICMP code: host unreachable.
const ICMP_HOST_UNREACH: u8 = 1;
/// Hop limit / TTL of the answer.
const HOP_LIMIT: u8 = 64;

/// Writes into `out` the destination-unreachable answer to `pkt` (an IP packet read from the
/// TUN); returns its length, or `None` when `pkt` must not be answered (see the module docs)
/// or is not a valid IP packet. `out` must hold [`V6_MAX`] bytes for a full quote; a shorter
/// `out` quotes less (and `None` if not even the headers fit).
pub fn unreachable(pkt: &[u8], out: &mut [u8]) -> Option<usize> {
    match pkt.first()? >> 4 {
        4 => unreachable_v4(pkt, out),
        6 => unreachable_v6(pkt, out),
        _ => None,
    }
}

fn unreachable_v6(pkt: &[u8], out: &mut [u8]) -> Option<usize> {
    let p = ipv6::Ipv6Packet::new_checked(pkt).ok()?;
    let src = p.src();
    let dst = p.dst();
    if src.is_unspecified() || src.is_multicast() || src.is_loopback() || dst.is_multicast() {
        return None;
    }
    if is_icmpv6_error(pkt) {
        return None;
    }
    let head = ipv6::HEADER_LEN + 8;
    let total = (head + pkt.len()).min(V6_MAX).min(out.len());
    if total < head + ipv6::HEADER_LEN {
        return None;
    }
    let quote = total - head;
    let icmp_len = total - ipv6::HEADER_LEN;
    let o = &mut out[..total];
    o[..ipv6::HEADER_LEN].fill(0);
    o[0] = 0x60;
    o[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    o[6] = protocol::ICMPV6;
    o[7] = HOP_LIMIT;
    // The answer comes from the unreachable address and goes back to the sender.
    o[8..24].copy_from_slice(&dst.octets());
    o[24..40].copy_from_slice(&src.octets());
    let icmp = &mut o[ipv6::HEADER_LEN..];
    icmp[0] = ICMPV6_DST_UNREACH;
    icmp[1] = ICMPV6_NO_ROUTE;
    icmp[2..8].fill(0);
    icmp[8..8 + quote].copy_from_slice(&pkt[..quote]);
    let sum = checksum::pseudo_header_v6(dst, src, protocol::ICMPV6, icmp_len as u32);
    let c = checksum::finish(checksum::sum(sum, icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

/// Whether an IPv6 packet is an ICMPv6 error message (type below 128). Only a directly
/// following ICMPv6 header is recognised; behind extension headers it is answered like any
/// other packet (the answer is still rate limited).
fn is_icmpv6_error(pkt: &[u8]) -> bool {
    pkt.get(6) == Some(&protocol::ICMPV6) && pkt.get(ipv6::HEADER_LEN).is_none_or(|t| *t < 128)
}

fn unreachable_v4(pkt: &[u8], out: &mut [u8]) -> Option<usize> {
    let p = ipv4::Ipv4Packet::new_checked(pkt).ok()?;
    let src = p.src();
    let dst = p.dst();
    if bad_v4_source(src) || dst.is_multicast() || dst.is_broadcast() || p.frag_offset() != 0 {
        return None;
    }
    if p.protocol() == protocol::ICMP {
        // Errors are types 3, 4, 5, 11 and 12; an unreadable type is not answered either.
        match p.payload().first() {
            Some(0 | 8 | 13 | 14 | 15 | 16 | 17 | 18) => {}
            _ => return None,
        }
    }
    let head = ipv4::HEADER_LEN + 8;
    let ihl = p.header_len();
    let total = (head + pkt.len()).min(V4_MAX).min(out.len());
    // At least the invoking header and the first 8 bytes of its data (RFC 792).
    if total < head + (ihl + 8).min(pkt.len()) {
        return None;
    }
    let quote = total - head;
    let o = &mut out[..total];
    o[..ipv4::HEADER_LEN].fill(0);
    o[0] = 0x45;
    o[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    o[6..8].copy_from_slice(&ipv4::FLAG_DF.to_be_bytes());
    o[8] = HOP_LIMIT;
    o[9] = protocol::ICMP;
    o[12..16].copy_from_slice(&dst.octets());
    o[16..20].copy_from_slice(&src.octets());
    let c = checksum::checksum(&o[..ipv4::HEADER_LEN]);
    o[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut o[ipv4::HEADER_LEN..];
    icmp[0] = ICMP_DST_UNREACH;
    icmp[1] = ICMP_HOST_UNREACH;
    icmp[2..8].fill(0);
    icmp[8..8 + quote].copy_from_slice(&pkt[..quote]);
    let c = checksum::checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

fn bad_v4_source(a: Ipv4Addr) -> bool {
    a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback()
}

/// A token bucket over answers: up to `burst` at once, refilled at `per_sec`. Sans-IO: the
/// caller passes the time.
#[derive(Clone, Debug)]
pub struct IcmpLimiter {
    per_sec: u32,
    burst: u32,
    tokens: u32,
    /// When the bucket was last refilled; `None` until the first [`IcmpLimiter::refill`].
    last: Option<Instant>,
    /// Time carried over between refills that did not yet make a whole token.
    carry: Duration,
}

/// Linux's `net.ipv4.icmp_msgs_per_sec` default.
pub const DEFAULT_PER_SEC: u32 = 1000;
/// Linux's `net.ipv4.icmp_msgs_burst` default.
pub const DEFAULT_BURST: u32 = 50;

impl Default for IcmpLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_PER_SEC, DEFAULT_BURST)
    }
}

impl IcmpLimiter {
    /// A full bucket of `burst` tokens refilled at `per_sec`.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            per_sec: per_sec.max(1),
            burst,
            tokens: burst,
            last: None,
            carry: Duration::ZERO,
        }
    }

    /// Adds the tokens earned since the last refill (the driver calls it once per batch).
    pub fn refill(&mut self, now: Instant) {
        let Some(last) = self.last else {
            self.last = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(last) + self.carry;
        self.last = Some(now);
        let per_token = Duration::from_secs(1) / self.per_sec;
        let earned = elapsed.as_nanos() / per_token.as_nanos().max(1);
        if earned == 0 {
            self.carry = elapsed;
            return;
        }
        self.carry = Duration::ZERO;
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        self.tokens = self.tokens.saturating_add(earned).min(self.burst);
    }

    /// Takes one token; false when the bucket is empty (the answer is not sent).
    pub fn take(&mut self) -> bool {
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    use crate::core::wire::{Ipv4Repr, Ipv6Packet};

    fn v6_udp(src: &str, dst: &str, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 48 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        p[6] = protocol::UDP;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p[40..42].copy_from_slice(&4000u16.to_be_bytes());
        p[42..44].copy_from_slice(&8730u16.to_be_bytes());
        p[44..46].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        p
    }

    fn v4(proto: u8, src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + payload.len()];
        Ipv4Repr {
            src: src.into(),
            dst: dst.into(),
            protocol: proto,
            payload_len: payload.len(),
            ttl: 64,
            tos: 0,
            ident: 1,
            dont_frag: true,
        }
        .emit(&mut p)
        .unwrap();
        p[20..].copy_from_slice(payload);
        p
    }

    #[test]
    fn ipv6_answer_is_a_valid_icmpv6_unreachable_back_to_the_sender() {
        let pkt = v6_udp("fd5a:1f00:1::1", "fd5a:1f02:dead::1", 100);
        let mut out = [0u8; V6_MAX];
        let n = unreachable(&pkt, &mut out).unwrap();
        assert_eq!(n, 40 + 8 + pkt.len());
        let a = Ipv6Packet::new_checked(&out[..n]).unwrap();
        assert_eq!(a.src(), "fd5a:1f02:dead::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(a.dst(), "fd5a:1f00:1::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(out[6], protocol::ICMPV6);
        assert_eq!((out[40], out[41]), (1, 0));
        assert_eq!(&out[48..n], &pkt[..]);
        // The checksum verifies over the pseudo-header.
        let sum = checksum::pseudo_header_v6(a.src(), a.dst(), protocol::ICMPV6, (n - 40) as u32);
        assert_eq!(checksum::finish(checksum::sum(sum, &out[40..n])), 0);
    }

    #[test]
    fn ipv6_quote_is_cut_at_the_minimum_mtu() {
        let pkt = v6_udp("fd5a:1f00:1::1", "fd5a:1f00:2::1", 8000);
        let mut out = [0u8; V6_MAX];
        let n = unreachable(&pkt, &mut out).unwrap();
        assert_eq!(n, V6_MAX);
        assert_eq!(u16::from_be_bytes([out[4], out[5]]) as usize, V6_MAX - 40);
        let mut small = [0u8; 100];
        assert_eq!(unreachable(&pkt, &mut small), Some(100));
        assert_eq!(unreachable(&pkt, &mut [0u8; 60]), None);
    }

    #[test]
    fn no_answer_to_errors_multicast_or_bad_sources() {
        let mut out = [0u8; V6_MAX];
        // An ICMPv6 error (type 1) is never answered; an echo request (128) is.
        let mut err = v6_udp("fd5a:1f00:1::1", "fd5a:1f00:2::1", 8);
        err[6] = protocol::ICMPV6;
        err[40] = 1;
        assert_eq!(unreachable(&err, &mut out), None);
        err[40] = 128;
        assert!(unreachable(&err, &mut out).is_some());
        for (s, d) in [
            ("fd5a:1f00:1::1", "ff02::2"),
            ("::", "fd5a:1f00:2::1"),
            ("ff02::1", "fd5a:1f00:2::1"),
            ("::1", "fd5a:1f00:2::1"),
        ] {
            assert_eq!(unreachable(&v6_udp(s, d, 8), &mut out), None, "{s} → {d}");
        }
        assert_eq!(unreachable(&[], &mut out), None);
        assert_eq!(unreachable(&[0x60; 10], &mut out), None);
        assert_eq!(unreachable(&[0x10; 60], &mut out), None);
    }

    #[test]
    fn ipv4_answer_is_host_unreachable_with_valid_checksums() {
        let pkt = v4(protocol::UDP, [10, 0, 0, 1], [10, 0, 0, 9], &[7u8; 30]);
        let mut out = [0u8; V6_MAX];
        let n = unreachable(&pkt, &mut out).unwrap();
        assert_eq!(n, 28 + pkt.len());
        let a = ipv4::Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert!(a.verify_checksum());
        assert_eq!(a.src(), Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(a.dst(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!((out[20], out[21]), (3, 1));
        assert_eq!(checksum::checksum(&out[20..n]), 0);
        assert_eq!(&out[28..n], &pkt[..]);
        // Long packets are cut at 576 bytes.
        let big = v4(protocol::UDP, [10, 0, 0, 1], [10, 0, 0, 9], &[7u8; 1400]);
        assert_eq!(unreachable(&big, &mut out), Some(V4_MAX));
    }

    #[test]
    fn ipv4_no_answer_to_errors_broadcast_or_later_fragments() {
        let mut out = [0u8; V6_MAX];
        let echo = v4(
            protocol::ICMP,
            [10, 0, 0, 1],
            [10, 0, 0, 9],
            &[8, 0, 0, 0, 0, 1, 0, 1],
        );
        assert!(unreachable(&echo, &mut out).is_some());
        let err = v4(
            protocol::ICMP,
            [10, 0, 0, 1],
            [10, 0, 0, 9],
            &[3, 1, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(unreachable(&err, &mut out), None);
        let bcast = v4(protocol::UDP, [10, 0, 0, 1], [255, 255, 255, 255], &[0; 8]);
        assert_eq!(unreachable(&bcast, &mut out), None);
        let mcast = v4(protocol::UDP, [10, 0, 0, 1], [224, 0, 0, 1], &[0; 8]);
        assert_eq!(unreachable(&mcast, &mut out), None);
        let zero = v4(protocol::UDP, [0, 0, 0, 0], [10, 0, 0, 9], &[0; 8]);
        assert_eq!(unreachable(&zero, &mut out), None);
        let mut frag = v4(protocol::UDP, [10, 0, 0, 1], [10, 0, 0, 9], &[0; 8]);
        frag[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        assert_eq!(unreachable(&frag, &mut out), None);
    }

    #[test]
    fn limiter_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = IcmpLimiter::new(10, 3);
        l.refill(t0);
        assert!(l.take() && l.take() && l.take());
        assert!(!l.take());
        // 50 ms at 10/s earns nothing yet, but the time is carried over.
        l.refill(t0 + Duration::from_millis(50));
        assert!(!l.take());
        l.refill(t0 + Duration::from_millis(100));
        assert!(l.take());
        assert!(!l.take());
        // A long pause refills no more than the burst.
        l.refill(t0 + Duration::from_secs(60));
        assert!(l.take() && l.take() && l.take());
        assert!(!l.take());
    }
}
