//! The joiner's view of the mesh, sans IO: the coordinator's roster as SSE events build it,
//! and what it means for the data plane (which WireGuard peers, where to send, which inner
//! addresses each may use, which ports the filter opens).
//!
//! Invariants:
//! * the roster never contains ourselves (an entry with our peer id is ignored);
//! * `snapshot` and `policy` events replace the whole roster; `peer_upsert` replaces one
//!   entry; `peer_remove` removes one; `hole_punch` changes nothing here (the caller acts);
//! * [`Roster::desired`] is a pure function of the roster and [`SelfView`], keyed by
//!   public key, so the caller diffs two results to touch only the peers that changed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use base64::Engine as _;
use tabbify_api::{PortRange, RosterEntry, SseEvent};

use crate::core::filter::Proto;
use crate::core::net::IpNet;

/// Keepalive for every mesh peer: holds NAT mappings open (WireGuard's usual 25 s).
pub const KEEPALIVE_SECS: u16 = 25;

/// What we know about ourselves that decides how to reach others.
#[derive(Clone, Debug, Default)]
pub struct SelfView {
    /// Our peer id (to skip ourselves).
    pub peer_id: String,
    /// Our endpoint as the coordinator saw it.
    pub reflexive: Option<SocketAddr>,
}

/// One peer as the data plane should have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// The coordinator's peer id.
    pub peer_id: String,
    /// Display name.
    pub name: String,
    /// Decoded public key.
    pub public_key: [u8; 32],
    /// The peer's ULA.
    pub ula: Ipv6Addr,
    /// App ULAs it hosts.
    pub app_ulas: Vec<Ipv6Addr>,
    /// Where to send first.
    pub endpoint: Option<SocketAddr>,
    /// AllowedIPs: its ULA/128 and every hosted app ULA/128.
    pub allowed_ips: Vec<IpNet>,
    /// Ports on the peer we may open, as (protocol, first, last).
    pub outbound: Vec<(Proto, u16, u16)>,
    /// Ports on us the peer may open.
    pub inbound: Vec<(Proto, u16, u16)>,
}

/// What an event did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The roster changed: recompute and apply [`Roster::desired`].
    Changed,
    /// Nothing to do.
    Unchanged,
    /// Punch towards this peer (by public key, base64) at this endpoint.
    HolePunch {
        /// Base64 public key.
        public_key: String,
        /// The other side's reflexive endpoint.
        endpoint: SocketAddr,
    },
}

/// The visible roster.
#[derive(Debug, Default)]
pub struct Roster {
    peers: BTreeMap<String, RosterEntry>,
    /// The id of the last event applied.
    pub last_event_id: Option<u64>,
    me: String,
}

impl Roster {
    /// An empty roster for the peer `me`.
    pub fn new(me: &str) -> Self {
        Self {
            me: me.to_owned(),
            ..Self::default()
        }
    }

    /// Replaces everything (registration answer, snapshot, policy change).
    pub fn replace(&mut self, peers: Vec<RosterEntry>) {
        self.peers = peers
            .into_iter()
            .filter(|p| p.peer_id != self.me)
            .map(|p| (p.peer_id.clone(), p))
            .collect();
    }

    /// Applies one SSE event.
    pub fn apply(&mut self, id: Option<u64>, ev: SseEvent) -> Applied {
        if id.is_some() {
            self.last_event_id = id;
        }
        match ev {
            SseEvent::Snapshot(s) | SseEvent::Policy(s) => {
                self.replace(s.peers);
                Applied::Changed
            }
            SseEvent::PeerUpsert(e) => {
                if e.peer_id == self.me || self.peers.get(&e.peer_id) == Some(&e) {
                    return Applied::Unchanged;
                }
                self.peers.insert(e.peer_id.clone(), e);
                Applied::Changed
            }
            SseEvent::PeerRemove(r) => {
                if self.peers.remove(&r.peer_id).is_some() {
                    Applied::Changed
                } else {
                    Applied::Unchanged
                }
            }
            SseEvent::HolePunch(h) => Applied::HolePunch {
                public_key: h.public_key,
                endpoint: h.endpoint,
            },
        }
    }

    /// The entries, by peer id.
    pub fn entries(&self) -> impl Iterator<Item = &RosterEntry> {
        self.peers.values()
    }

    /// The data plane's peers, by public key. Entries with an undecodable key are skipped
    /// with a log line (a coordinator bug must not take the joiner down).
    pub fn desired(&self, me: &SelfView) -> BTreeMap<[u8; 32], Desired> {
        let mut out = BTreeMap::new();
        for e in self.peers.values() {
            let Some(public_key) = decode_key(&e.public_key) else {
                tracing::warn!(peer = %e.peer_id, "roster entry with a bad public key skipped");
                continue;
            };
            let mut allowed_ips = vec![IpNet::host(IpAddr::V6(e.ula))];
            for a in &e.hosted_app_ulas {
                let n = IpNet::host(IpAddr::V6(*a));
                if !allowed_ips.contains(&n) {
                    allowed_ips.push(n);
                }
            }
            out.insert(
                public_key,
                Desired {
                    peer_id: e.peer_id.clone(),
                    name: e.display_name.clone(),
                    public_key,
                    ula: e.ula,
                    app_ulas: e.hosted_app_ulas.clone(),
                    endpoint: choose_endpoint(e, me),
                    allowed_ips,
                    outbound: rules(
                        &e.ports.outbound,
                        &e.ports.outbound_tcp,
                        &e.ports.outbound_udp,
                    ),
                    inbound: rules(&e.ports.inbound, &e.ports.inbound_tcp, &e.ports.inbound_udp),
                },
            );
        }
        out
    }
}

/// The filter's rules from a roster direction: ports for both protocols, TCP only, UDP only.
fn rules(both: &[PortRange], tcp: &[PortRange], udp: &[PortRange]) -> Vec<(Proto, u16, u16)> {
    let tag = |p: Proto, v: &[PortRange]| {
        v.iter()
            .map(move |r| (p, r.first, r.last))
            .collect::<Vec<_>>()
    };
    let mut out = tag(Proto::Both, both);
    out.extend(tag(Proto::Tcp, tcp));
    out.extend(tag(Proto::Udp, udp));
    out
}

/// A base64 WireGuard key.
pub fn decode_key(b64: &str) -> Option<[u8; 32]> {
    let v = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    v.try_into().ok()
}

/// Where to send to a peer first (WireGuard roaming corrects it once the peer talks):
/// * not behind NAT (its reflexive IP is one of its own addresses): the reflexive endpoint;
/// * behind the same NAT as us (same reflexive IP): its first reported local endpoint;
/// * otherwise its reflexive endpoint (the NAT mapping; the coordinator's `hole_punch`
///   makes both sides open it at the same time).
pub fn choose_endpoint(e: &RosterEntry, me: &SelfView) -> Option<SocketAddr> {
    let refl = e.reflexive_endpoint;
    let unspecified = refl.ip().is_unspecified() || refl.port() == 0;
    if !unspecified && e.endpoints.iter().any(|x| x.ip() == refl.ip()) {
        return Some(refl);
    }
    if let Some(mine) = me.reflexive {
        if !unspecified && mine.ip() == refl.ip() {
            if let Some(local) = e.endpoints.first() {
                return Some(*local);
            }
        }
    }
    if unspecified {
        e.endpoints.first().copied()
    } else {
        Some(refl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tabbify_api::{HolePunch, PeerRemove, PortRules, RosterSnapshot};

    fn entry(id: &str, key: u8, refl: &str, eps: &[&str]) -> RosterEntry {
        RosterEntry {
            peer_id: id.into(),
            identity: id.into(),
            ula: format!("fd5a:1f00::{key}").parse().unwrap(),
            display_name: id.into(),
            tags: vec!["t".into()],
            public_key: base64::engine::general_purpose::STANDARD.encode([key; 32]),
            endpoints: eps.iter().map(|s| s.parse().unwrap()).collect(),
            reflexive_endpoint: refl.parse().unwrap(),
            hosted_app_ulas: vec![],
            ports: PortRules {
                outbound: vec![PortRange {
                    first: 8730,
                    last: 8730,
                }],
                inbound: vec![PortRange::ALL],
                ..Default::default()
            },
        }
    }

    #[test]
    fn events_build_the_roster() {
        let mut r = Roster::new("me");
        let a = entry("a", 1, "10.0.0.1:51820", &["10.0.0.1:51820"]);
        let me = entry("me", 9, "10.0.0.9:51820", &[]);
        let snap = RosterSnapshot {
            policy_revision: 1,
            peers: vec![a.clone(), me],
        };
        assert_eq!(r.apply(Some(1), SseEvent::Snapshot(snap)), Applied::Changed);
        assert_eq!(r.entries().count(), 1, "ourselves is never a peer");
        assert_eq!(
            r.apply(Some(2), SseEvent::PeerUpsert(a.clone())),
            Applied::Unchanged
        );
        let mut a2 = a.clone();
        a2.hosted_app_ulas.push("fd5a:1f02::7".parse().unwrap());
        assert_eq!(r.apply(Some(3), SseEvent::PeerUpsert(a2)), Applied::Changed);
        let d = r.desired(&SelfView::default());
        let got = &d[&[1u8; 32]];
        assert_eq!(got.allowed_ips.len(), 2);
        assert_eq!(got.outbound, vec![(Proto::Both, 8730, 8730)]);
        assert_eq!(got.inbound, vec![(Proto::Both, 0, 65535)]);
        let rm = PeerRemove {
            peer_id: "a".into(),
            reason: "revoked".into(),
        };
        assert_eq!(
            r.apply(Some(4), SseEvent::PeerRemove(rm.clone())),
            Applied::Changed
        );
        assert_eq!(
            r.apply(Some(5), SseEvent::PeerRemove(rm)),
            Applied::Unchanged
        );
        assert!(r.desired(&SelfView::default()).is_empty());
        assert_eq!(r.last_event_id, Some(5));
        let hp = HolePunch {
            peer_id: "b".into(),
            public_key: "k".into(),
            endpoint: "1.2.3.4:5".parse().unwrap(),
        };
        assert!(matches!(
            r.apply(Some(6), SseEvent::HolePunch(hp)),
            Applied::HolePunch { .. }
        ));
    }

    #[test]
    fn protocol_lists_reach_the_filter_rules() {
        let mut r = Roster::new("me");
        let mut a = entry("a", 1, "10.0.0.1:1", &[]);
        a.ports = PortRules {
            outbound_tcp: vec![PortRange {
                first: 8730,
                last: 8730,
            }],
            inbound_udp: vec![PortRange {
                first: 53,
                last: 53,
            }],
            ..Default::default()
        };
        r.replace(vec![a]);
        let d = r.desired(&SelfView::default());
        let got = &d[&[1u8; 32]];
        assert_eq!(got.outbound, vec![(Proto::Tcp, 8730, 8730)]);
        assert_eq!(got.inbound, vec![(Proto::Udp, 53, 53)]);
        let f = crate::core::filter::PortFilter::from_rules(&got.outbound, &got.inbound);
        assert_eq!(f.outbound(Proto::Tcp), vec![(8730, 8730)]);
        assert!(f.outbound(Proto::Udp).is_empty());
    }

    #[test]
    fn bad_keys_are_skipped() {
        let mut r = Roster::new("me");
        let mut a = entry("a", 1, "10.0.0.1:1", &[]);
        a.public_key = "not base64!".into();
        r.replace(vec![a, entry("b", 2, "10.0.0.2:1", &[])]);
        assert_eq!(r.desired(&SelfView::default()).len(), 1);
    }

    #[test]
    fn endpoint_choice() {
        let me = SelfView {
            peer_id: "me".into(),
            reflexive: Some("203.0.113.1:51820".parse().unwrap()),
        };
        // Public peer: its reflexive endpoint is its own address.
        let e = entry("a", 1, "198.51.100.2:51820", &["198.51.100.2:51820"]);
        assert_eq!(
            choose_endpoint(&e, &me),
            Some("198.51.100.2:51820".parse().unwrap())
        );
        // NATed peer elsewhere: its NAT's address.
        let e = entry("a", 1, "198.51.100.7:51820", &["192.168.1.2:51820"]);
        assert_eq!(
            choose_endpoint(&e, &me),
            Some("198.51.100.7:51820".parse().unwrap())
        );
        // Behind our own NAT: its LAN address.
        let e = entry("a", 1, "203.0.113.1:51821", &["192.168.1.3:51821"]);
        assert_eq!(
            choose_endpoint(&e, &me),
            Some("192.168.1.3:51821".parse().unwrap())
        );
        // No reflexive endpoint known: the first reported one.
        let e = entry("a", 1, "0.0.0.0:0", &["192.168.1.3:51821"]);
        assert_eq!(
            choose_endpoint(&e, &me),
            Some("192.168.1.3:51821".parse().unwrap())
        );
    }
}
