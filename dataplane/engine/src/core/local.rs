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
//! * inside a prefix this node explicitly routes for every peer ([`LocalNets::routed`]:
//!   `up`'s configuration; empty for `join`); or
//! * inside a prefix this node routes for *that sending peer* ([`LocalNets::with_grants`]:
//!   a subnet router or exit node of `join`, where the coordinator's `may_use` says which
//!   peer may use which of its routes). A member the policy does not allow cannot reach
//!   the LAN behind the router even with a valid session and a crafted packet: its packet
//!   is dropped under [`crate::core::counters::DropReason::DestinationNotGranted`].
//!
//! Anything else is dropped and counted ([`crate::core::counters::DropReason::DestinationNotLocal`]).
//! An empty set accepts nothing: a table nobody told its addresses fails closed.
//!
//! Grants and longest-prefix match: a peer granted `10.1.0.0/16` must not lose
//! `10.1.5.0/24` because another peer was granted that narrower prefix. So every granted
//! prefix stores the set of peers granted it *or any prefix containing it*; the longest
//! match then answers for every peer at once.
//!
//! A concentrator (issue 15) also knows the addresses of the stock WireGuard clients it
//! serves ([`LocalNets::with_served`]). Traffic it forwards between such a client and
//! another peer (one end a served client, the other end not this node) is checked here by
//! address — the client's grants say which members it may send to, each member's
//! grants which clients it may reach —, and [`LocalNets::forwarded_for_client`] tells the
//! pipeline to skip the concentrator's own port rules for it: those rules are between the
//! concentrator and each peer, not between the client and the member. The member end
//! applies the client's own rules in both directions (`core::behind`).
//!
//! The member end is not trusted for its own direction, though: a member with a valid
//! session that bypasses its own filter (a patched joiner, a raw socket) would reach any
//! port of a client it may open only some port on, and the stock client filters nothing.
//! So a granted member also has the rules between it and each client it may reach
//! ([`LocalNets::with_client_rules`]: one [`PortFilter`] per (member, client address),
//! inbound = the ports on the client the member may open, outbound = everything, since
//! what the client may send is its own grant's business and the member filters it). The
//! concentrator checks the member's packets to the client against that filter and tracks
//! the flows in the member's flow table, and tracks the client's packets to the member
//! under the same filter, so a flow opened either way carries its replies
//! ([`LocalNets::forward_filter_in`], [`LocalNets::forward_filter_out`]). A forwarded
//! packet between a member and a client for which the pair has no rules gets the reply
//! filter below (fail closed: a grant without rules opens nothing). The pair is found by a
//! binary search over the sorted (member key, client address) pairs, only for packets
//! with a served client at one end.
//!
//! A member the client may reach but which the policy does not let reach the client gets
//! only a *reply grant* ([`LocalNets::with_reply_grants`]): its packets to the client pass
//! only inside a flow the client opened. The concentrator tracks the client's flows towards
//! a peer in that peer's flow table under [`LocalNets::reply_filter`] (everything may be
//! opened from the client's side, nothing from the peer's), so a member with a valid
//! session cannot open a connection to a stock client (which has no filter of its own).
//!
//! Routed traffic (a subnet router or exit node, issue 15): routes carry all traffic, and
//! the grant decides who may use them, so a packet admitted *by a grant* (its destination
//! inside a granted prefix, not one of this node's addresses) is not checked against this
//! node's port rules for the sending peer. It is tracked in that peer's flow table under
//! [`LocalNets::route_filter`] (the peer may open anything there, we open nothing), and on
//! the send side a packet whose source is inside a granted prefix (a LAN host's answer,
//! [`LocalNets::route_filter_out`]) passes only as a reply of such a flow: the LAN cannot
//! open a connection to a member through this node.
//!
//! A grant may be port-limited ([`LocalNets::with_route_grants`], a policy destination
//! `10.1.0.0/16:443`): that peer's route filter then lets it open only those destination
//! ports inside the prefix (the union over its grants holding the destination; all
//! traffic if one of them is). This is where a member that bypasses its own filter is
//! stopped: its packet to another port is dropped here and counted (`filtered_in`).
//!
//! Cost on the hot path: one binary search over a sorted array of a few integers; the
//! routed-prefix tries are consulted only when they are not empty, and a grant's peer set
//! is a binary search over a few sorted keys.

use std::net::IpAddr;
use std::sync::Arc;

use crate::core::filter::{PortFilter, Proto, ProtoRanges};
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
    /// Prefixes routed through this node on purpose for every peer (`up`); usually empty.
    routed: RouteTable<()>,
    /// Prefixes routed through this node for some peers (subnet router, exit node): the
    /// value indexes `granted`.
    grants: RouteTable<u32>,
    /// For each granted prefix, the public keys (sorted, unique) of the peers granted it
    /// or a prefix containing it.
    granted: Arc<[Box<[[u8; 32]]>]>,
    /// Addresses of the stock WireGuard clients this node serves as a concentrator,
    /// IPv4 (host order) and IPv6, sorted, unique; usually empty.
    served_v4: Vec<u32>,
    served_v6: Vec<u128>,
    /// Served-client addresses some peers may send to only as replies (the client opened
    /// the flow): like `grants`, indexing `reply_granted`.
    reply_grants: RouteTable<u32>,
    reply_granted: Arc<[Box<[[u8; 32]]>]>,
    /// The filter of forwarded client traffic towards reply-only peers: everything may be
    /// opened from the client's side, nothing from the peer's (set with the served set).
    reply_filter: Option<Arc<PortFilter>>,
    /// The filters of forwarded traffic between a granted member and a served client, by
    /// (member public key, client address), sorted, unique (module docs); usually empty.
    client_rules: Arc<[(ClientPair, Arc<PortFilter>)]>,
    /// The filter of routed traffic with a granted peer: the peer may open anything
    /// towards a granted prefix, nothing may be opened from it (set with the grants).
    route_filter: Option<Arc<PortFilter>>,
    /// For each granted prefix (same index as `granted`), the peers whose grants holding
    /// it are all port-limited, sorted by key, each with its route filter: the union of
    /// those grants' ports may be opened, nothing from the prefix. A granted peer not
    /// listed here has `route_filter`. Empty when no grant has ports.
    granted_ports: Arc<[PeerFilters]>,
}

/// A (member public key, served client address) pair: the key of the client rules.
type ClientPair = ([u8; 32], IpAddr);

/// Peers (sorted by public key), each with its own filter.
type PeerFilters = Box<[([u8; 32], Arc<PortFilter>)]>;

/// Why [`LocalNets::admits`] refused a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Neither an address of this node nor inside any prefix it routes.
    NotLocal,
    /// Inside a prefix this node routes, but not for the sending peer.
    NotGranted,
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
        Self {
            v4,
            v6,
            routed,
            grants: RouteTable::new(),
            granted: Arc::from(Vec::new()),
            served_v4: Vec::new(),
            served_v6: Vec::new(),
            reply_grants: RouteTable::new(),
            reply_granted: Arc::from(Vec::new()),
            reply_filter: None,
            route_filter: None,
            granted_ports: Arc::from(Vec::new()),
            client_rules: Arc::from(Vec::new()),
        }
    }

    /// This set plus the rules between granted members and served clients: `(member
    /// public key, client address, rules)`, the rules being `(protocol, first, last)` port
    /// ranges on the client the member may open. The concentrator holds the member to them
    /// on what it forwards to the client (module docs); a pair listed twice keeps its
    /// first rules.
    pub fn with_client_rules<R: AsRef<[(Proto, u16, u16)]>>(
        mut self,
        rules: impl IntoIterator<Item = ([u8; 32], IpAddr, R)>,
    ) -> Self {
        let mut v: Vec<(ClientPair, Arc<PortFilter>)> = Vec::new();
        for (peer, client, r) in rules {
            let f = PortFilter::from_rules(&[(Proto::Both, 0, 65535)], r.as_ref());
            v.push(((peer, client), Arc::new(f)));
        }
        // Stable: the first of a duplicated pair stays first and is kept.
        v.sort_by_key(|a| a.0);
        v.dedup_by(|a, b| a.0 == b.0);
        self.client_rules = Arc::from(v);
        self
    }

    /// The filter of forwarded traffic between `peer` and the served client at `client`:
    /// the pair's rules, else the reply filter (fail closed, module docs).
    #[inline]
    pub fn client_filter(&self, peer: &[u8; 32], client: IpAddr) -> Option<&PortFilter> {
        if !self.client_rules.is_empty() {
            if let Ok(i) = self
                .client_rules
                .binary_search_by(|((k, a), _)| (k, a).cmp(&(peer, &client)))
            {
                return self.client_rules.get(i).map(|(_, f)| &**f);
            }
        }
        self.reply_filter()
    }

    /// On receive from `peer`, after the destination was admitted: `None` when the packet
    /// is not forwarded client traffic (the peer's own rules apply), else `Some(f)`: a
    /// peer's packet towards a served client gets the pair's filter
    /// ([`LocalNets::client_filter`]), a client's packet towards a peer none (its grant
    /// decided; the member filters it). One branch when this node serves nobody.
    #[inline]
    pub fn forward_filter_in(
        &self,
        peer: &[u8; 32],
        src: IpAddr,
        dst: IpAddr,
    ) -> Option<Option<&PortFilter>> {
        if self.served_v4.is_empty() && self.served_v6.is_empty() {
            return None;
        }
        if self.is_served(dst) && !self.is_own(src) {
            Some(self.client_filter(peer, dst))
        } else if self.is_served(src) && !self.is_own(dst) {
            Some(None)
        } else {
            None
        }
    }

    /// This set plus the addresses of the clients this node serves as a concentrator (see
    /// the module docs). They are not local: a packet reaches a client only through a grant.
    pub fn with_served(mut self, clients: impl IntoIterator<Item = IpAddr>) -> Self {
        for a in clients {
            match a {
                IpAddr::V4(a) => self.served_v4.push(u32::from(a)),
                IpAddr::V6(a) => self.served_v6.push(u128::from(a)),
            }
        }
        self.served_v4.sort_unstable();
        self.served_v4.dedup();
        self.served_v6.sort_unstable();
        self.served_v6.dedup();
        self.reply_filter = Some(Arc::new(PortFilter::from_ranges(&[(0, 65535)], &[])));
        self
    }

    /// This set plus reply-only grants: `(peer, served client address)` pairs, each letting
    /// that peer send to the client only inside a flow the client opened (a member the
    /// client may reach, which the policy does not let reach the client).
    pub fn with_reply_grants(
        mut self,
        grants: impl IntoIterator<Item = ([u8; 32], IpNet)>,
    ) -> Self {
        let (table, sets) = build_grants(grants);
        self.reply_grants = table;
        self.reply_granted = sets;
        self
    }

    /// Whether `peer` may send to `dst` as a reply inside a flow a served client opened.
    #[inline]
    pub fn admits_reply(&self, peer: &[u8; 32], dst: IpAddr) -> bool {
        !self.reply_grants.is_empty()
            && self.reply_grants.lookup(dst).is_some_and(|i| {
                self.reply_granted
                    .get(i as usize)
                    .is_some_and(|keys| keys.binary_search(peer).is_ok())
            })
    }

    /// The filter for forwarded client traffic with reply-only peers (module docs).
    #[inline]
    pub fn reply_filter(&self) -> Option<&PortFilter> {
        self.reply_filter.as_deref()
    }

    /// On the send side (to `peer`), the filter for a packet this concentrator forwards
    /// for a client: `None` when the packet is not forwarded client traffic (use the
    /// peer's own), else `Some(f)`: a client's packet towards a peer is tracked under the
    /// pair's filter ([`LocalNets::client_filter`]: the member's rules, else the reply
    /// filter), so the peer's answers pass; a peer's packet towards a client was admitted
    /// on receive (`Some(None)`).
    #[inline]
    pub fn forward_filter_out(
        &self,
        peer: &[u8; 32],
        src: IpAddr,
        dst: IpAddr,
    ) -> Option<Option<&PortFilter>> {
        // The receive-side choice with the ends swapped: the client is the remote end.
        self.forward_filter_in(peer, dst, src)
    }

    /// Whether `a` is one of this node's own addresses (exactly; not a routed prefix).
    #[inline]
    pub fn is_own(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => self.v4.binary_search(&u32::from(a)).is_ok(),
            IpAddr::V6(a) => self.v6.binary_search(&u128::from(a)).is_ok(),
        }
    }

    /// Whether `a` is a client this node serves.
    #[inline]
    pub fn is_served(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => self.served_v4.binary_search(&u32::from(a)).is_ok(),
            IpAddr::V6(a) => self.served_v6.binary_search(&u128::from(a)).is_ok(),
        }
    }

    /// Whether a packet from `src` to `dst` is traffic this concentrator forwards for a
    /// client it serves: one end a served client, the other not this node. Such a packet
    /// is not checked against this node's own port rules (module docs). One branch when
    /// this node serves nobody.
    #[inline]
    pub fn forwarded_for_client(&self, src: IpAddr, dst: IpAddr) -> bool {
        if self.served_v4.is_empty() && self.served_v6.is_empty() {
            return false;
        }
        (self.is_served(src) && !self.is_own(dst)) || (self.is_served(dst) && !self.is_own(src))
    }

    /// The clients this node serves, IPv4 first.
    pub fn served(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.served_v4
            .iter()
            .map(|&a| IpAddr::from(std::net::Ipv4Addr::from(a)))
            .chain(
                self.served_v6
                    .iter()
                    .map(|&a| IpAddr::from(std::net::Ipv6Addr::from(a))),
            )
    }

    /// This set plus per-peer grants: `(peer public key, prefix)` pairs, each letting that
    /// peer send to the prefix through us. A prefix granted to nobody is not routed.
    pub fn with_grants(self, grants: impl IntoIterator<Item = ([u8; 32], IpNet)>) -> Self {
        self.with_route_grants(grants, [])
    }

    /// This set plus per-peer grants, all traffic (`all`, as [`LocalNets::with_grants`])
    /// and port-limited (`limited`: `(peer, prefix, rules)`, the `(protocol, first, last)`
    /// destination ports the peer may open inside the prefix). A peer's grants add up:
    /// for a destination, the peer may open the union of the ports of its grants holding
    /// it (all traffic if one of them is).
    pub fn with_route_grants(
        mut self,
        all: impl IntoIterator<Item = ([u8; 32], IpNet)>,
        limited: impl IntoIterator<Item = ([u8; 32], IpNet, ProtoRanges)>,
    ) -> Self {
        let all: Vec<([u8; 32], IpNet)> = all.into_iter().collect();
        let limited: Vec<([u8; 32], IpNet, ProtoRanges)> = limited
            .into_iter()
            .map(|(k, n, r)| (k, n.network(), r))
            .collect();
        let (table, sets) = build_grants(
            all.iter()
                .copied()
                .chain(limited.iter().map(|(k, n, _)| (*k, *n))),
        );
        let mut ports: Vec<PeerFilters> = Vec::new();
        if !limited.is_empty() {
            ports = vec![Box::default(); sets.len()];
            for (p, i) in table.iter() {
                let Some(keys) = sets.get(i as usize) else {
                    continue;
                };
                let holds = |g: &IpNet| {
                    g.addr().is_ipv4() == p.addr().is_ipv4()
                        && g.prefix_len() <= p.prefix_len()
                        && g.contains(p.addr())
                };
                let mut out = Vec::new();
                for k in keys.iter() {
                    if all.iter().any(|(ak, g)| ak == k && holds(&g.network())) {
                        continue;
                    }
                    let rules: ProtoRanges = limited
                        .iter()
                        .filter(|(lk, g, _)| lk == k && holds(g))
                        .flat_map(|(_, _, r)| r.iter().copied())
                        .collect();
                    out.push((*k, Arc::new(PortFilter::from_rules(&[], &rules))));
                }
                if let Some(slot) = ports.get_mut(i as usize) {
                    *slot = out.into_boxed_slice();
                }
            }
        }
        self.grants = table;
        self.granted = sets;
        self.granted_ports = Arc::from(ports);
        self.route_filter = (!self.grants.is_empty())
            .then(|| Arc::new(PortFilter::from_ranges(&[], &[(0, 65535)])));
        self
    }

    /// The route filter of `peer` for the granted prefix with index `i` (module docs).
    #[inline]
    fn route_filter_of(&self, peer: &[u8; 32], i: u32) -> Option<&PortFilter> {
        if let Some(set) = self.granted_ports.get(i as usize) {
            if let Ok(j) = set.binary_search_by(|(k, _)| k.cmp(peer)) {
                return set.get(j).map(|(_, f)| &**f);
            }
        }
        self.route_filter.as_deref()
    }

    /// On receive from `peer`, after [`LocalNets::admits`] accepted `dst`: the peer's
    /// route filter if `dst` was admitted by a grant (inside a granted prefix, not one of
    /// our addresses nor a prefix routed for everyone nor a served client), else `None`
    /// (the peer's own rules apply). One branch when nothing is granted.
    #[inline]
    pub fn route_filter_in(&self, peer: &[u8; 32], dst: IpAddr) -> Option<&PortFilter> {
        if self.grants.is_empty() || self.contains(dst) || self.is_served(dst) {
            return None;
        }
        let i = self.grants.lookup(dst)?;
        self.route_filter_of(peer, i)
    }

    /// On send to `peer`: its route filter if `src` is inside a granted prefix and not one
    /// of our addresses nor a served client (a LAN host's packet going back to a member),
    /// else `None`. One branch when nothing is granted.
    #[inline]
    pub fn route_filter_out(&self, peer: &[u8; 32], src: IpAddr) -> Option<&PortFilter> {
        if self.grants.is_empty() || self.contains(src) || self.is_served(src) {
            return None;
        }
        let i = self.grants.lookup(src)?;
        self.route_filter_of(peer, i)
    }

    /// Whether a decrypted packet for `dst` from the peer with public key `peer` may be
    /// delivered here, and if not, why.
    #[inline]
    pub fn admits(&self, peer: &[u8; 32], dst: IpAddr) -> Result<(), Refused> {
        if self.contains(dst) {
            return Ok(());
        }
        if self.grants.is_empty() {
            return Err(Refused::NotLocal);
        }
        match self.grants.lookup(dst) {
            None => Err(Refused::NotLocal),
            Some(i) => match self.granted.get(i as usize) {
                Some(keys) if keys.binary_search(peer).is_ok() => Ok(()),
                _ => Err(Refused::NotGranted),
            },
        }
    }

    /// The prefixes routed for some peers, each with the peers granted it (directly or
    /// through a containing prefix).
    pub fn grants(&self) -> impl Iterator<Item = (IpNet, &[[u8; 32]])> + '_ {
        self.grants.iter().map(|(n, i)| {
            (
                n,
                self.granted
                    .get(i as usize)
                    .map(|k| &k[..])
                    .unwrap_or_default(),
            )
        })
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
        self.v4.is_empty()
            && self.v6.is_empty()
            && self.routed.is_empty()
            && self.grants.is_empty()
            && self.reply_grants.is_empty()
    }
}

/// The grant table of `(peer, prefix)` pairs: every granted prefix with the peers granted it
/// or a prefix containing it (module docs).
#[allow(clippy::type_complexity)]
fn build_grants(
    grants: impl IntoIterator<Item = ([u8; 32], IpNet)>,
) -> (RouteTable<u32>, Arc<[Box<[[u8; 32]]>]>) {
    let mut pairs: Vec<([u8; 32], IpNet)> =
        grants.into_iter().map(|(k, n)| (k, n.network())).collect();

    pairs.sort_unstable_by(|a, b| {
        (a.1.addr(), a.1.prefix_len(), a.0).cmp(&(b.1.addr(), b.1.prefix_len(), b.0))
    });
    pairs.dedup();
    let mut prefixes: Vec<IpNet> = pairs.iter().map(|(_, n)| *n).collect();
    prefixes.dedup();
    let mut table = RouteTable::new();
    let mut sets: Vec<Box<[[u8; 32]]>> = Vec::with_capacity(prefixes.len());
    for p in prefixes {
        // Peers granted `p` or anything containing it (same family, shorter or equal
        // length, covering p's network address).
        let mut keys: Vec<[u8; 32]> = pairs
            .iter()
            .filter(|(_, g)| {
                g.addr().is_ipv4() == p.addr().is_ipv4()
                    && g.prefix_len() <= p.prefix_len()
                    && g.contains(p.addr())
            })
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let Ok(i) = u32::try_from(sets.len()) else {
            break;
        };
        sets.push(keys.into_boxed_slice());
        table.insert(p, i);
    }
    (table, Arc::from(sets))
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

    /// Issue 15, the attacker at the router: a member with a valid session but no grant
    /// for the LAN crafts packets to it (and to a sub-prefix someone else was granted, and
    /// through the exit route); only the granted peers' packets pass.
    #[test]
    fn a_routed_prefix_admits_only_the_peers_granted_it() {
        let (alice, bob, mallory) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let me = ip("fd5a:1f00::1");
        let l = LocalNets::new([me], []).with_grants([
            (alice, net("10.1.0.0/16")),
            (bob, net("10.1.5.0/24")),
            (bob, net("fd00:1::/64")),
            (alice, net("0.0.0.0/0")),
        ]);
        // Own addresses: every peer.
        assert_eq!(l.admits(&mallory, me), Ok(()));
        // alice's /16 includes the /24 bob was granted: longest match must not lose her.
        assert_eq!(l.admits(&alice, ip("10.1.5.9")), Ok(()));
        assert_eq!(l.admits(&alice, ip("10.1.200.1")), Ok(()));
        assert_eq!(l.admits(&bob, ip("10.1.5.9")), Ok(()));
        // bob has only the /24 of that LAN.
        assert_eq!(l.admits(&bob, ip("10.1.6.1")), Err(Refused::NotGranted));
        assert_eq!(l.admits(&bob, ip("fd00:1::7")), Ok(()));
        assert_eq!(l.admits(&alice, ip("fd00:1::7")), Err(Refused::NotGranted));
        // The exit route: alice anywhere on IPv4, nobody else.
        assert_eq!(l.admits(&alice, ip("198.51.100.1")), Ok(()));
        assert_eq!(l.admits(&bob, ip("198.51.100.1")), Err(Refused::NotGranted));
        // mallory: nothing routed, whatever she crafts.
        for d in ["10.1.5.9", "10.1.0.1", "fd00:1::7", "198.51.100.1"] {
            assert_eq!(l.admits(&mallory, ip(d)), Err(Refused::NotGranted), "{d}");
        }
        // No IPv6 exit granted: an IPv6 destination outside every prefix is not local.
        assert_eq!(l.admits(&alice, ip("2001:db8::1")), Err(Refused::NotLocal));
        // Grants do not widen `contains` (the per-peer question is `admits`).
        assert!(!l.contains(ip("10.1.5.9")));
        let g: Vec<(String, usize)> = l.grants().map(|(n, k)| (n.to_string(), k.len())).collect();
        assert!(g.contains(&("10.1.5.0/24".to_owned(), 2)), "{g:?}");
        assert!(g.contains(&("10.1.0.0/16".to_owned(), 1)), "{g:?}");
        assert!(!LocalNets::default()
            .with_grants([(alice, net("10.0.0.0/8"))])
            .is_empty());
    }

    /// Port-limited grants: a peer's grants holding a destination add up (the longest
    /// match answers with the union of the ports of its grants around it), an all-traffic
    /// grant of the peer wins, and another peer's grant never widens it.
    #[test]
    fn port_limited_grants_add_up_per_peer() {
        use crate::core::filter::Proto;
        let (alice, bob, carol) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let ssh = vec![(Proto::Tcp, 22, 22)];
        let web = vec![(Proto::Tcp, 443, 443)];
        let l = LocalNets::new([ip("fd5a:1f00::1")], []).with_route_grants(
            [(bob, net("10.1.0.0/16")), (carol, net("10.1.7.0/24"))],
            [
                (alice, net("10.1.0.0/16"), ssh.clone()),
                (alice, net("10.1.5.0/24"), web.clone()),
                (carol, net("10.1.0.0/16"), web.clone()),
            ],
        );
        let inbound = |k: &[u8; 32], d: &str| {
            let f = l.route_filter_in(k, ip(d)).unwrap();
            (
                f.inbound(Proto::Tcp),
                f.inbound(Proto::Udp),
                f.outbound(Proto::Tcp),
            )
        };
        assert_eq!(l.admits(&alice, ip("10.1.5.9")), Ok(()));
        assert_eq!(
            inbound(&alice, "10.1.5.9"),
            (vec![(22, 22), (443, 443)], vec![], vec![])
        );
        assert_eq!(
            inbound(&alice, "10.1.6.9"),
            (vec![(22, 22)], vec![], vec![])
        );
        // bob's all-traffic grant is not narrowed by alice's ports on the same LAN.
        assert_eq!(inbound(&bob, "10.1.5.9").0, vec![(0, 65535)]);
        // carol: 443 on the LAN, all traffic on her /24.
        assert_eq!(inbound(&carol, "10.1.6.9").0, vec![(443, 443)]);
        assert_eq!(inbound(&carol, "10.1.7.9").1, vec![(0, 65535)]);
        // The way back: the same per-peer filter, nothing may be opened towards the peer.
        let back = l.route_filter_out(&alice, ip("10.1.6.9")).unwrap();
        assert!(back.outbound(Proto::Tcp).is_empty() && back.outbound(Proto::Udp).is_empty());
        assert!(
            l.route_filter_in(&alice, ip("fd5a:1f00::1")).is_none(),
            "ours"
        );
        // Without port-limited grants: the shared route filter, as before.
        let plain = LocalNets::new([], []).with_grants([(alice, net("10.1.0.0/16"))]);
        let f = plain.route_filter_in(&alice, ip("10.1.0.9")).unwrap();
        assert_eq!(f.inbound(Proto::Tcp), vec![(0, 65535)]);
    }

    /// Issue 15: what a concentrator forwards for its clients, told apart from its own
    /// traffic; a node serving nobody forwards nothing for anyone.
    #[test]
    fn forwarded_for_client_needs_one_end_served_and_the_other_not_ours() {
        let (me, k, p) = (ip("fd5a:1f00::1"), ip("fd5a:1f00::9"), ip("fd5a:1f00::5"));
        let l = LocalNets::new([me, ip("100.64.0.1")], []).with_served([k, ip("100.64.0.9"), k]);
        assert!(l.forwarded_for_client(k, p));
        assert!(l.forwarded_for_client(p, k));
        assert!(l.forwarded_for_client(ip("100.64.0.9"), ip("100.64.0.5")));
        assert!(!l.forwarded_for_client(k, me), "to us: our rules");
        assert!(!l.forwarded_for_client(me, k), "from us: our rules");
        assert!(!l.forwarded_for_client(p, me));
        assert!(!l.forwarded_for_client(p, ip("fd5a:1f00::6")));
        assert!(!l.contains(k), "a served client is not local");
        assert!(l.is_served(k) && !l.is_served(p) && l.is_own(me) && !l.is_own(k));
        assert_eq!(l.served().count(), 2);
        let plain = LocalNets::new([me], []);
        assert!(!plain.forwarded_for_client(k, p));
    }

    /// Issue 15: each (member, client address) pair gets its own rules; a pair without
    /// rules (another member, another client, a family the rules do not name) gets the
    /// reply filter; a duplicated pair keeps its first rules; the client's side of a pair
    /// may open anything (the member filters it).
    #[test]
    fn client_rules_are_chosen_per_member_and_client_and_fail_closed() {
        use crate::core::conntrack::Dir;
        let (alice, bob) = ([1u8; 32], [2u8; 32]);
        let (me, k, k4, k2) = (
            ip("fd5a:1f00::1"),
            ip("fd5a:1f00::9"),
            ip("100.64.0.9"),
            ip("fd5a:1f00::8"),
        );
        let l = LocalNets::new([me], [])
            .with_served([k, k4, k2])
            .with_client_rules([
                (alice, k, vec![(Proto::Tcp, 22, 22)]),
                (alice, k, vec![(Proto::Both, 0, 65535)]),
                (bob, k2, vec![(Proto::Udp, 53, 53)]),
            ]);
        let a = l.client_filter(&alice, k).unwrap();
        assert_eq!(
            a.inbound(Proto::Tcp),
            vec![(22, 22)],
            "the first claim wins"
        );
        assert!(a.inbound(Proto::Udp).is_empty());
        assert!(a.all_traffic(Dir::Out));
        let b = l.client_filter(&bob, k2).unwrap();
        assert_eq!(b.inbound(Proto::Udp), vec![(53, 53)]);
        let reply = l.reply_filter().unwrap();
        for (peer, c) in [(&bob, k), (&alice, k2), (&alice, k4), (&[3u8; 32], k)] {
            assert_eq!(l.client_filter(peer, c), Some(reply), "{c}");
        }
        assert!(!reply.all_traffic(Dir::In) && reply.inbound(Proto::Tcp).is_empty());
        // On receive: towards a client the pair's filter, from a client none; to or from
        // us, and with nobody served, the peer's own rules (`None`).
        let p = ip("fd5a:1f00::5");
        assert_eq!(l.forward_filter_in(&alice, p, k), Some(Some(a)));
        assert_eq!(l.forward_filter_in(&alice, k, p), Some(None));
        assert_eq!(l.forward_filter_in(&alice, me, k), None);
        assert_eq!(l.forward_filter_in(&alice, k, me), None);
        assert_eq!(l.forward_filter_out(&alice, k, p), Some(Some(a)));
        assert_eq!(l.forward_filter_out(&bob, k, p), Some(Some(reply)));
        assert_eq!(l.forward_filter_out(&alice, p, k), Some(None));
        let plain = LocalNets::new([me], []);
        assert_eq!(plain.forward_filter_in(&alice, p, k), None);
        assert_eq!(plain.forward_filter_out(&alice, k, p), None);
    }
}
