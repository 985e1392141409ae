//! `Behind`: addresses reached *through* a peer that carry their own port rules (issue 15,
//! stock WireGuard clients behind a concentrator).
//!
//! A stock WireGuard client K talks only to its concentrator C; every other member V reaches
//! K through C, so K's ULA /128 and mesh IPv4 /32 are in C's AllowedIPs on V. The policy
//! between V and K is not the policy between V and C, so C's peer entry on V carries, beside
//! its own [`PortFilter`], one filter per address behind it. The pipeline picks the filter by
//! the packet's *remote* address — the destination on send, the source on receive — with
//! [`crate::core::table::PeerEntry::filter_for`]: a packet to or from K is checked against
//! K's rules, in both directions; anything else against C's.
//!
//! Invariants: addresses are hosts, matched exactly (a client has a /128 and a /32, never a
//! prefix); each appears once (a later duplicate is ignored, so nobody can shadow an earlier
//! entry); a peer without addresses behind it has no `Behind` at all (`Option::None` on the
//! entry), so its cost on the hot path is one branch. The flows of a client's traffic live
//! in the carrying peer's flow table (the 5-tuple keys hold the client's address, so they
//! never mix with the carrier's own flows).
//!
//! Routed prefixes (issue 15, subnet routers and exit nodes): a router P's entry on a
//! member V also lists the prefixes P carries for V ([`Behind::with_routed`]: what the
//! joiner adds to P's AllowedIPs from the roster's `routes`, beyond P's own addresses).
//! Routes carry all traffic (who may use a route is the router's `may_use` grant check,
//! `core::local`), so the member↔router port rules do not apply to an address inside them:
//! such a packet gets the *routed filter* instead — V may open anything towards the LAN
//! (outbound all, tracked) and nothing from the LAN may open a flow into V (inbound
//! nothing: only replies of V's tracked flows and ICMP errors related to them pass). An
//! address behind the peer (a client, exact) and the peer's own host addresses (an exact
//! /32 or /128 in its AllowedIPs that is not itself a routed prefix, e.g. P's ULA inside
//! an exit node's `::/0`) keep their rules; see
//! [`crate::core::table::PeerEntry::filter_for`]. A routed prefix the policy opens only on
//! some ports ([`Behind::with_routed_ports`], `10.1.0.0/16:443`) gets a filter opening
//! just those (outbound), nothing inbound; the router enforces the same ports on its side
//! (`core::local`), so a member bypassing this filter is still stopped there.

use std::net::IpAddr;
use std::sync::Arc;

use crate::core::filter::{PortFilter, ProtoRanges};
use crate::core::net::IpNet;

/// The addresses behind one peer, each with its filter. Immutable once built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Behind {
    /// IPv4 hosts, sorted, unique, with the index of their filter.
    v4: Vec<(u32, u32)>,
    /// IPv6 hosts, sorted, unique, with the index of their filter.
    v6: Vec<(u128, u32)>,
    filters: Vec<Arc<PortFilter>>,
    /// Prefixes routed through the peer (normalized, sorted, unique): a handful, scanned.
    routed: Vec<IpNet>,
    /// The routed filter (outbound all, inbound nothing); set iff `routed` is not empty.
    routed_filter: Option<Arc<PortFilter>>,
    /// Port-limited routed prefixes (normalized, sorted, unique), each with its filter:
    /// outbound the union of its ports and those of every limited prefix holding it,
    /// inbound nothing. Consulted only outside `routed`. Usually empty.
    limited: Vec<(IpNet, Arc<PortFilter>)>,
}

impl Behind {
    /// From `(addresses, filter)` groups: every address of a group gets that group's
    /// filter. An address listed twice keeps its first group's filter.
    pub fn new(groups: impl IntoIterator<Item = (Vec<IpAddr>, PortFilter)>) -> Self {
        let mut b = Behind::default();
        for (addrs, filter) in groups {
            let Ok(i) = u32::try_from(b.filters.len()) else {
                break;
            };
            let mut used = false;
            for a in addrs {
                let fresh = match a {
                    IpAddr::V4(a) => {
                        let a = u32::from(a);
                        !b.v4.iter().any(|(x, _)| *x == a) && {
                            b.v4.push((a, i));
                            true
                        }
                    }
                    IpAddr::V6(a) => {
                        let a = u128::from(a);
                        !b.v6.iter().any(|(x, _)| *x == a) && {
                            b.v6.push((a, i));
                            true
                        }
                    }
                };
                used |= fresh;
            }
            if used {
                b.filters.push(Arc::new(filter));
            }
        }
        b.v4.sort_unstable();
        b.v6.sort_unstable();
        b
    }

    /// The filter of `addr` if it is behind this peer.
    #[inline]
    pub fn get(&self, addr: IpAddr) -> Option<&Arc<PortFilter>> {
        let i = match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                let p = self.v4.binary_search_by_key(&a, |(x, _)| *x).ok()?;
                self.v4[p].1
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                let p = self.v6.binary_search_by_key(&a, |(x, _)| *x).ok()?;
                self.v6[p].1
            }
        };
        self.filters.get(i as usize)
    }

    /// This set plus the prefixes routed through the peer (module docs): an address inside
    /// one of them that is neither behind the peer nor one of its own host addresses gets
    /// the routed filter. An empty list changes nothing.
    pub fn with_routed(mut self, prefixes: impl IntoIterator<Item = IpNet>) -> Self {
        self.routed
            .extend(prefixes.into_iter().map(|n| n.network()));
        self.routed.sort_unstable();
        self.routed.dedup();
        if !self.routed.is_empty() {
            self.routed_filter = Some(Arc::new(PortFilter::from_ranges(&[(0, 65535)], &[])));
        }
        self
    }

    /// This set plus port-limited routed prefixes: `(prefix, rules)`, the
    /// `(protocol, first, last)` destination ports this node may open inside the prefix
    /// through the peer (a policy destination `10.1.0.0/16:443`). An address inside one of
    /// them (and inside no all-traffic routed prefix) gets a filter opening the union of
    /// the ports of the limited prefixes holding it, nothing inbound. A prefix listed
    /// twice gets the union.
    pub fn with_routed_ports(
        mut self,
        prefixes: impl IntoIterator<Item = (IpNet, ProtoRanges)>,
    ) -> Self {
        let mut given: Vec<(IpNet, ProtoRanges)> = prefixes
            .into_iter()
            .map(|(n, r)| (n.network(), r))
            .collect();
        given.sort_by_key(|a| a.0);
        let mut nets: Vec<IpNet> = given.iter().map(|(n, _)| *n).collect();
        nets.dedup();
        self.limited = nets
            .into_iter()
            .map(|n| {
                let rules: ProtoRanges = given
                    .iter()
                    .filter(|(g, _)| {
                        g.addr().is_ipv4() == n.addr().is_ipv4()
                            && g.prefix_len() <= n.prefix_len()
                            && g.contains(n.addr())
                    })
                    .flat_map(|(_, r)| r.iter().copied())
                    .collect();
                (n, Arc::new(PortFilter::from_rules(&rules, &[])))
            })
            .collect();
        self
    }

    /// The routed filter if `addr` is inside a prefix routed through the peer: the
    /// all-traffic one, else the filter of the longest port-limited prefix holding it.
    #[inline]
    pub fn routed(&self, addr: IpAddr) -> Option<&Arc<PortFilter>> {
        if self.routed.iter().any(|n| n.contains(addr)) {
            self.routed_filter.as_ref()
        } else if self.limited.is_empty() {
            None
        } else {
            self.limited_for(addr)
        }
    }

    #[cold]
    fn limited_for(&self, addr: IpAddr) -> Option<&Arc<PortFilter>> {
        self.limited
            .iter()
            .filter(|(n, _)| n.contains(addr))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, f)| f)
    }

    /// Whether `net` is exactly one of the routed prefixes (all traffic or port-limited).
    #[inline]
    pub fn is_routed_prefix(&self, net: &IpNet) -> bool {
        self.routed.binary_search(net).is_ok()
            || self.limited.binary_search_by(|(n, _)| n.cmp(net)).is_ok()
    }

    /// The all-traffic prefixes routed through the peer.
    pub fn routed_prefixes(&self) -> &[IpNet] {
        &self.routed
    }

    /// The port-limited prefixes routed through the peer.
    pub fn limited_prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.limited.iter().map(|(n, _)| *n)
    }

    /// Whether some prefix (all traffic or port-limited) is routed through the peer.
    pub fn routes_something(&self) -> bool {
        !self.routed.is_empty() || !self.limited.is_empty()
    }

    /// Whether no address is behind the peer and no prefix is routed through it.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty() && !self.routes_something()
    }

    /// The addresses behind the peer, IPv4 first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4
            .iter()
            .map(|(a, _)| IpAddr::from(std::net::Ipv4Addr::from(*a)))
            .chain(
                self.v6
                    .iter()
                    .map(|(a, _)| IpAddr::from(std::net::Ipv6Addr::from(*a))),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_address_gets_its_group_filter_and_the_first_claim_wins() {
        let web = PortFilter::from_ranges(&[(8730, 8730)], &[]);
        let none = PortFilter::from_ranges(&[], &[]);
        let b = Behind::new([
            (vec![ip("fd5a:1f00:1::1"), ip("100.64.0.9")], web.clone()),
            // Tries to take the first client's /128 with an open filter: ignored.
            (
                vec![ip("fd5a:1f00:2::1"), ip("fd5a:1f00:1::1")],
                none.clone(),
            ),
        ]);
        assert_eq!(b.get(ip("fd5a:1f00:1::1")).map(|f| &**f), Some(&web));
        assert_eq!(b.get(ip("100.64.0.9")).map(|f| &**f), Some(&web));
        assert_eq!(b.get(ip("fd5a:1f00:2::1")).map(|f| &**f), Some(&none));
        assert!(b.get(ip("fd5a:1f00:1::2")).is_none());
        assert!(b.get(ip("100.64.0.10")).is_none());
        assert_eq!(b.addresses().count(), 3);
        assert!(!b.is_empty());
        assert!(Behind::new([(vec![], web)]).is_empty());
    }

    /// Port-limited routed prefixes: the longest holding one decides, its filter holds the
    /// ports of the limited prefixes around it; an all-traffic prefix wins over them.
    #[test]
    fn port_limited_routed_prefixes_open_only_their_ports() {
        use crate::core::conntrack::Dir;
        use crate::core::filter::Proto;
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let b = Behind::new([])
            .with_routed([net("10.1.7.0/24")])
            .with_routed_ports([
                (net("10.1.0.0/16"), vec![(Proto::Tcp, 443, 443)]),
                (net("10.1.5.0/24"), vec![(Proto::Udp, 53, 53)]),
                (net("fd00:1::/64"), vec![(Proto::Both, 22, 22)]),
            ]);
        let lan = b.routed(ip("10.1.200.1")).unwrap();
        assert_eq!(lan.outbound(Proto::Tcp), vec![(443, 443)]);
        assert!(lan.outbound(Proto::Udp).is_empty());
        assert!(lan.inbound(Proto::Tcp).is_empty() && lan.inbound(Proto::Udp).is_empty());
        let inner = b.routed(ip("10.1.5.1")).unwrap();
        assert_eq!(inner.outbound(Proto::Tcp), vec![(443, 443)]);
        assert_eq!(inner.outbound(Proto::Udp), vec![(53, 53)]);
        assert!(b.routed(ip("10.1.7.1")).unwrap().all_traffic(Dir::Out));
        assert_eq!(
            b.routed(ip("fd00:1::9")).unwrap().outbound(Proto::Tcp),
            vec![(22, 22)]
        );
        assert!(b.routed(ip("10.2.0.1")).is_none());
        assert!(b.is_routed_prefix(&net("10.1.0.0/16")) && b.is_routed_prefix(&net("10.1.7.0/24")));
        assert!(!b.is_empty() && b.routes_something());
        assert!(!Behind::new([])
            .with_routed_ports([(net("10.1.0.0/16"), vec![])])
            .is_empty());
    }

    #[test]
    fn routed_prefixes_get_the_routed_filter_and_clients_keep_theirs() {
        let web = PortFilter::from_ranges(&[(8730, 8730)], &[]);
        let lan: IpNet = "10.1.0.0/16".parse().unwrap();
        let b = Behind::new([(vec![ip("10.1.0.9")], web.clone())])
            .with_routed(["10.1.2.3/16".parse().unwrap(), lan]);
        assert_eq!(b.routed_prefixes(), &[lan], "normalized and deduplicated");
        let routed = b.routed(ip("10.1.200.1")).unwrap();
        assert!(routed.all_traffic(crate::core::conntrack::Dir::Out));
        assert!(!routed.allows_in(&[]));
        assert!(b.routed(ip("10.2.0.1")).is_none());
        // A client inside the prefix keeps its own rules (the table checks `get` first).
        assert_eq!(b.get(ip("10.1.0.9")).map(|f| &**f), Some(&web));
        assert!(b.is_routed_prefix(&lan));
        assert!(!Behind::new([]).with_routed([lan]).is_empty());
        assert!(Behind::new([]).with_routed([]).is_empty());
    }
}
