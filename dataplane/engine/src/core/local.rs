//! `LocalNets`: the destinations a decrypted packet may have — this node's own addresses and
//! the prefixes it explicitly routes for others.
//!
//! Cryptokey routing checks only where a packet comes *from*. Without a check on where it
//! goes, a peer with a valid session could hand this node a packet for any address, and a
//! host with IP forwarding on would forward it: into its LAN, or to another peer through the
//! mesh. The receive path therefore writes a decrypted packet to the TUN only if its inner
//! destination is
//! * one of this node's addresses: its peer ULA and hosted app ULAs (`join`), or the
//!   interface `Address` entries (`up`), each matched exactly; or
//! * inside a prefix this node explicitly routes ([`LocalNets::routed`]: empty unless a
//!   subnet-router feature fills it).
//!
//! Anything else is dropped and counted ([`crate::core::counters::DropReason::DestinationNotLocal`]).
//! An empty set accepts nothing: a table nobody told its addresses fails closed.
//!
//! Cost on the hot path: one binary search over a sorted array of a few integers; the
//! routed-prefix trie is consulted only when it is not empty.

use std::net::IpAddr;

use crate::core::net::IpNet;
use crate::core::route::RouteTable;

/// The destinations this node accepts from peers. Immutable once built; published in the
/// table's snapshot.
#[derive(Clone, Debug, Default)]
pub struct LocalNets {
    /// Own IPv4 addresses, host-order, sorted, unique.
    v4: Vec<u32>,
    /// Own IPv6 addresses, host-order, sorted, unique.
    v6: Vec<u128>,
    /// Prefixes routed through this node on purpose (subnet router); usually empty.
    routed: RouteTable<()>,
}

impl LocalNets {
    /// The set of `addresses` (matched exactly; a prefix length is ignored, so an interface
    /// address `10.0.0.1/24` means 10.0.0.1) plus the prefixes in `routed`.
    pub fn new(
        addresses: impl IntoIterator<Item = IpAddr>,
        routed: impl IntoIterator<Item = IpNet>,
    ) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for a in addresses {
            match a {
                IpAddr::V4(a) => v4.push(u32::from(a)),
                IpAddr::V6(a) => v6.push(u128::from(a)),
            }
        }
        v4.sort_unstable();
        v4.dedup();
        v6.sort_unstable();
        v6.dedup();
        let routed = routed.into_iter().map(|n| (n.network(), ())).collect();
        Self { v4, v6, routed }
    }

    /// Whether a decrypted packet for `dst` may be delivered here.
    #[inline]
    pub fn contains(&self, dst: IpAddr) -> bool {
        match dst {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.binary_search(&a).is_ok()
                    || (!self.routed.is_empty() && self.routed.lookup_v4(a).is_some())
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.binary_search(&a).is_ok()
                    || (!self.routed.is_empty() && self.routed.lookup_v6(a).is_some())
            }
        }
    }

    /// This node's own addresses, IPv4 first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4
            .iter()
            .map(|&a| IpAddr::from(std::net::Ipv4Addr::from(a)))
            .chain(
                self.v6
                    .iter()
                    .map(|&a| IpAddr::from(std::net::Ipv6Addr::from(a))),
            )
    }

    /// The prefixes routed through this node on purpose.
    pub fn routed(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.routed.iter().map(|(n, _)| n)
    }

    /// Whether nothing is accepted.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty() && self.routed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_accepts_nothing() {
        let l = LocalNets::default();
        assert!(l.is_empty());
        assert!(!l.contains(ip("10.0.0.1")));
        assert!(!l.contains(ip("fd5a:1f00::1")));
        assert!(!l.contains(ip("::")));
    }

    #[test]
    fn own_addresses_match_exactly() {
        let l = LocalNets::new(
            [
                ip("fd5a:1f00:1:2:3::1"),
                ip("fd5a:1f02:aa:bb:cc::1"),
                ip("10.0.0.1"),
                ip("10.0.0.1"),
            ],
            [],
        );
        assert!(l.contains(ip("fd5a:1f00:1:2:3::1")));
        assert!(l.contains(ip("fd5a:1f02:aa:bb:cc::1")));
        assert!(l.contains(ip("10.0.0.1")));
        // Neighbours of our addresses, another peer's ULA, a LAN address: not ours.
        assert!(!l.contains(ip("fd5a:1f00:1:2:3::2")));
        assert!(!l.contains(ip("fd5a:1f00:9:9:9::1")));
        assert!(!l.contains(ip("10.0.0.2")));
        assert!(!l.contains(ip("192.168.1.10")));
        assert!(!l.contains(ip("ff02::1")));
        assert_eq!(l.addresses().count(), 3);
    }

    #[test]
    fn routed_prefixes_are_accepted_when_configured() {
        let l = LocalNets::new(
            [ip("fd5a:1f00::1")],
            [
                "192.168.7.0/24".parse().unwrap(),
                "fd00:7::/64".parse().unwrap(),
            ],
        );
        assert!(l.contains(ip("192.168.7.200")));
        assert!(l.contains(ip("fd00:7::99")));
        assert!(!l.contains(ip("192.168.8.1")));
        assert!(!l.contains(ip("fd00:8::1")));
        assert_eq!(l.routed().count(), 2);
    }
}
