//! The joiner's view of the mesh, sans IO: the coordinator's roster as SSE events build it,
//! checked against what the design lets a coordinator say, and what it means for the data
//! plane (which WireGuard peers, where to send, which inner addresses each may use, which
//! ports the filter opens).
//!
//! The coordinator is trusted to say *who* is in the mesh and *what* the policy allows, not
//! to point arbitrary addresses into the tunnel. An entry is refused when
//! * its peer id or ULA is not the one derived from its identity
//!   ([`tabbify_api::ula::identity_peer_id`], [`tabbify_api::ula::identity_ula`]),
//! * its public key is not 32 bytes of standard base64,
//! * a hosted app ULA lies outside `fd5a:1f02::/32`,
//! * an endpoint or its reflexive endpoint is not a usable unicast address
//!   ([`usable_endpoint`]: unspecified, multicast, broadcast, port 0 and the mesh's own
//!   prefixes are refused; loopback and private addresses are allowed) — except on a
//!   stock WireGuard client's entry (`client`/`via`, issue 15), whose endpoints are never
//!   used ([`super::clients`] checks those entries).
//!
//! A refused upsert is not applied (the peer keeps its last good entry); a refused entry of a
//! snapshot is left out. Hole punches towards an unusable address are dropped.
//!
//! **Conflicts** are resolved by first claim, never by key order: every peer and every
//! (app, peer) claim gets a sequence number when the joiner first sees it (in event order,
//! then in the order of a snapshot's list), and
//! * of two peers with one ULA or one public key, the one seen first keeps it and the other
//!   is refused whole;
//! * of two peers claiming one app ULA, the claim seen first keeps it; the other peer is
//!   accepted without that app, and gets it if the holder releases it.
//!
//! A peer keeps its sequence number across upserts and key rotations (same peer id), so an
//! incumbent keeps what it holds while it still claims it.
//!
//! Every refusal is counted ([`RosterRefusals`], shown by `status --json`) and logged at
//! `warn` once when it appears, at most [`MAX_REFUSAL_LOGS`] lines per event (then one
//! summary line), so a coordinator that repeats a forgery in every snapshot neither floods
//! the log nor inflates the counters.
//!
//! Invariants:
//! * the roster never contains ourselves (an entry with our peer id is ignored);
//! * every accepted entry passed the checks above, and no two accepted entries share a ULA,
//!   a public key or an app ULA: every address [`Roster::desired`] routes lies in
//!   `fd5a:1f00::/32` or `fd5a:1f02::/32` and belongs to exactly one peer;
//! * `snapshot` and `policy` events replace the whole roster; `peer_upsert` replaces one
//!   entry; `peer_remove` removes one; `hole_punch` changes nothing here (the caller acts);
//! * [`Roster::desired`] is a pure function of the roster and [`SelfView`], keyed by
//!   public key, so the caller diffs two results to touch only the peers that changed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use base64::Engine as _;
use tabbify_api::local::RosterRefusals;
use tabbify_api::ula;
use tabbify_api::{PortRange, PortRules, RosterEntry, SseEvent};

use crate::core::filter::Proto;
use crate::core::net::IpNet;

/// Keepalive for every mesh peer: holds NAT mappings open (WireGuard's usual 25 s).
pub const KEEPALIVE_SECS: u16 = 25;

/// Most refusal lines one event logs; the rest are summed up in one line.
pub const MAX_REFUSAL_LOGS: usize = 8;

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
    /// Stock WireGuard clients behind this peer (a concentrator), with their own rules
    /// (`super::clients`; filled in by the machine, empty here).
    pub behind: Vec<super::clients::Carried>,
    /// Prefixes routed through this peer (a subnet router's or exit node's, beyond its own
    /// addresses; filled in by the machine from `super::routes`, empty here): they get the
    /// engine's routed filter, not the port rules above (`core::behind`).
    pub routed: Vec<IpNet>,
    /// Port-limited prefixes routed through this peer (`route_ports`, filled in by the
    /// machine): the engine's routed filter opens only these destination ports.
    pub routed_ports: Vec<(IpNet, crate::core::filter::ProtoRanges)>,
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

/// Why an entry (or part of one) was refused.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// The peer id is not the one derived from the identity.
    PeerId {
        /// The derived one.
        derived: String,
    },
    /// The ULA is not the one derived from the identity.
    Ula {
        /// The ULA claimed.
        claimed: Ipv6Addr,
        /// The derived one.
        derived: Ipv6Addr,
    },
    /// The public key is not 32 bytes of standard base64.
    PublicKey,
    /// A hosted app ULA outside `fd5a:1f02::/32`.
    AppUla(Ipv6Addr),
    /// An endpoint (reported or reflexive) that is not a usable unicast address.
    Endpoint(SocketAddr),
    /// The ULA (or peer id) is held by the peer seen first.
    DuplicateUla {
        /// The ULA.
        ula: Ipv6Addr,
        /// The holder's peer id.
        holder: String,
    },
    /// The public key is held by the peer seen first.
    DuplicatePublicKey {
        /// The holder's peer id.
        holder: String,
    },
    /// The app ULA is held by the claim seen first; only this app is refused.
    DuplicateApp {
        /// The app ULA.
        app: Ipv6Addr,
        /// The holder's peer id.
        holder: String,
    },
}

impl Refusal {
    fn count(&self, c: &mut RosterRefusals) {
        let n = match self {
            Refusal::PeerId { .. } => &mut c.bad_peer_id,
            Refusal::Ula { .. } => &mut c.bad_ula,
            Refusal::PublicKey => &mut c.bad_public_key,
            Refusal::AppUla(_) => &mut c.bad_app_ula,
            Refusal::Endpoint(_) => &mut c.bad_endpoint,
            Refusal::DuplicateUla { .. } => &mut c.duplicate_ula,
            Refusal::DuplicatePublicKey { .. } => &mut c.duplicate_public_key,
            Refusal::DuplicateApp { .. } => &mut c.duplicate_app,
        };
        *n += 1;
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::PeerId { derived } => {
                write!(
                    f,
                    "peer id is not the one derived from its identity ({derived})"
                )
            }
            Refusal::Ula { claimed, derived } => write!(
                f,
                "ULA {claimed} is not the one derived from its identity ({derived})"
            ),
            Refusal::PublicKey => write!(f, "public key is not 32 bytes of base64"),
            Refusal::AppUla(a) => write!(f, "app ULA {a} lies outside fd5a:1f02::/32"),
            Refusal::Endpoint(e) => write!(f, "endpoint {e} is not a usable unicast address"),
            Refusal::DuplicateUla { ula, holder } => {
                write!(f, "ULA {ula} is held by peer {holder}")
            }
            Refusal::DuplicatePublicKey { holder } => {
                write!(f, "public key is held by peer {holder}")
            }
            Refusal::DuplicateApp { app, holder } => {
                write!(f, "app ULA {app} is held by peer {holder}")
            }
        }
    }
}

/// An entry that passed the per-entry checks, and when its peer was first seen.
#[derive(Clone, Debug)]
struct Claim {
    entry: RosterEntry,
    key: [u8; 32],
    seen: u64,
}

/// The visible roster.
#[derive(Debug, Default)]
pub struct Roster {
    /// Entries that passed [`check_entry`], by peer id.
    claims: BTreeMap<String, Claim>,
    /// When each (app ULA, peer id) claim was first seen.
    app_claims: BTreeMap<(Ipv6Addr, String), u64>,
    /// The next sequence number.
    seq: u64,
    /// Refusals of the per-entry checks that stand, by peer id (the last refused version).
    invalid: BTreeMap<String, Refusal>,
    /// The resolved roster (conflicts removed): what the data plane gets.
    accepted: BTreeMap<String, RosterEntry>,
    /// Every refusal standing after the last event, to count and log only new ones.
    standing: BTreeSet<(String, Refusal)>,
    refused: RosterRefusals,
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

    /// Replaces everything (registration answer, snapshot, policy change). Entries that fail
    /// the checks are left out; of two entries with one peer id the first is kept.
    pub fn replace(&mut self, peers: Vec<RosterEntry>) {
        let mut claims = BTreeMap::new();
        let mut invalid = BTreeMap::new();
        let mut dup_ids = Vec::new();
        for p in peers {
            if p.peer_id == self.me {
                continue;
            }
            if claims.contains_key(&p.peer_id) || invalid.contains_key(&p.peer_id) {
                dup_ids.push(p.peer_id);
                continue;
            }
            match check_entry(&p) {
                Ok(key) => {
                    let seen = self.claims.get(&p.peer_id).map(|c| c.seen);
                    let seen = seen.unwrap_or_else(|| self.next_seq());
                    claims.insert(
                        p.peer_id.clone(),
                        Claim {
                            entry: p,
                            key,
                            seen,
                        },
                    );
                }
                Err(r) => {
                    invalid.insert(p.peer_id, r);
                }
            }
        }
        self.claims = claims;
        self.invalid = invalid;
        self.note_app_claims(None);
        self.resolve(&dup_ids);
    }

    /// Applies one SSE event.
    pub fn apply(&mut self, id: Option<u64>, ev: SseEvent) -> Applied {
        if id.is_some() {
            self.last_event_id = id;
        }
        match ev {
            SseEvent::Snapshot(s) | SseEvent::Policy(s) => {
                self.replace(s.peers);
                // Always: a policy change ends a grace period even when the roster is
                // the same.
                Applied::Changed
            }
            SseEvent::PeerUpsert(e) => {
                if e.peer_id == self.me {
                    return Applied::Unchanged;
                }
                match check_entry(&e) {
                    Ok(key) => {
                        if self.claims.get(&e.peer_id).map(|c| &c.entry) == Some(&e)
                            && !self.invalid.contains_key(&e.peer_id)
                        {
                            return Applied::Unchanged;
                        }
                        self.invalid.remove(&e.peer_id);
                        let seen = self.claims.get(&e.peer_id).map(|c| c.seen);
                        let seen = seen.unwrap_or_else(|| self.next_seq());
                        let id = e.peer_id.clone();
                        self.claims.insert(
                            id.clone(),
                            Claim {
                                entry: e,
                                key,
                                seen,
                            },
                        );
                        self.note_app_claims(Some(&id));
                    }
                    // Not applied: the peer keeps its last good entry.
                    Err(r) => {
                        self.invalid.insert(e.peer_id, r);
                    }
                }
                self.resolve(&[])
            }
            SseEvent::PeerRemove(r) => {
                self.invalid.remove(&r.peer_id);
                if self.claims.remove(&r.peer_id).is_some() {
                    self.note_app_claims(Some(&r.peer_id));
                }
                self.resolve(&[])
            }
            SseEvent::HolePunch(h) => {
                if !usable_endpoint(&h.endpoint) {
                    self.refused.bad_hole_punch += 1;
                    tracing::warn!(peer = %h.peer_id, endpoint = %h.endpoint, "hole punch towards an unusable address refused");
                    return Applied::Unchanged;
                }
                Applied::HolePunch {
                    public_key: h.public_key,
                    endpoint: h.endpoint,
                }
            }
        }
    }

    /// The accepted entries, by peer id (refused apps left out).
    pub fn entries(&self) -> impl Iterator<Item = &RosterEntry> {
        self.accepted.values()
    }

    /// What was refused since start, by reason.
    pub fn refused(&self) -> RosterRefusals {
        self.refused
    }

    /// Counts a registration answer refused by the caller.
    pub fn count_bad_registration(&mut self) {
        self.refused.bad_registration += 1;
    }

    /// The data plane's peers, by public key.
    pub fn desired(&self, me: &SelfView) -> BTreeMap<[u8; 32], Desired> {
        let mut out = BTreeMap::new();
        for e in self.accepted.values() {
            let Some(public_key) = decode_key(&e.public_key) else {
                // check_entry decoded it; unreachable, but a coordinator bug must not
                // take the joiner down.
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
                    behind: Vec::new(),
                    routed: Vec::new(),
                    routed_ports: Vec::new(),
                },
            );
        }
        out
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Brings the (app, peer) claims in step with the claims: new ones get a sequence
    /// number (in the entry's order), withdrawn ones are forgotten. `only`: just this peer.
    fn note_app_claims(&mut self, only: Option<&str>) {
        let claims = &self.claims;
        self.app_claims.retain(|(app, peer), _| {
            if only.is_some_and(|o| o != peer) {
                return true;
            }
            claims
                .get(peer)
                .is_some_and(|c| c.entry.hosted_app_ulas.contains(app))
        });
        let mut by_seen: Vec<&Claim> = match only {
            Some(o) => self.claims.get(o).into_iter().collect(),
            None => self.claims.values().collect(),
        };
        by_seen.sort_by_key(|c| c.seen);
        let mut new = Vec::new();
        for c in by_seen {
            for app in &c.entry.hosted_app_ulas {
                let k = (*app, c.entry.peer_id.clone());
                if !self.app_claims.contains_key(&k) && !new.contains(&k) {
                    new.push(k);
                }
            }
        }
        for k in new {
            let seq = self.next_seq();
            self.app_claims.insert(k, seq);
        }
    }

    /// Recomputes the accepted roster from the claims (first claim wins), then counts and
    /// logs the refusals that are new. Returns whether the accepted roster changed.
    fn resolve(&mut self, dup_ids: &[String]) -> Applied {
        let mut standing: BTreeSet<(String, Refusal)> = self
            .invalid
            .iter()
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        let mut order: Vec<&Claim> = self.claims.values().collect();
        order.sort_by_key(|c| c.seen);
        let mut by_ula: BTreeMap<Ipv6Addr, &str> = BTreeMap::new();
        let mut by_key: BTreeMap<[u8; 32], &str> = BTreeMap::new();
        let mut accepted: BTreeMap<String, RosterEntry> = BTreeMap::new();
        for id in dup_ids {
            if let Some(c) = self.claims.get(id) {
                let r = Refusal::DuplicateUla {
                    ula: c.entry.ula,
                    holder: id.clone(),
                };
                standing.insert((id.clone(), r));
            }
        }
        for c in order {
            let id = c.entry.peer_id.as_str();
            if let Some(holder) = by_ula.get(&c.entry.ula) {
                let r = Refusal::DuplicateUla {
                    ula: c.entry.ula,
                    holder: (*holder).to_owned(),
                };
                standing.insert((id.to_owned(), r));
                continue;
            }
            if let Some(holder) = by_key.get(&c.key) {
                let r = Refusal::DuplicatePublicKey {
                    holder: (*holder).to_owned(),
                };
                standing.insert((id.to_owned(), r));
                continue;
            }
            by_ula.insert(c.entry.ula, id);
            by_key.insert(c.key, id);
            accepted.insert(id.to_owned(), c.entry.clone());
        }
        let mut app_order: Vec<(u64, Ipv6Addr, &str)> = self
            .app_claims
            .iter()
            .filter(|((_, peer), _)| accepted.contains_key(peer))
            .map(|((app, peer), seen)| (*seen, *app, peer.as_str()))
            .collect();
        app_order.sort();
        let mut holders: BTreeMap<Ipv6Addr, &str> = BTreeMap::new();
        for (_, app, peer) in app_order {
            match holders.get(&app) {
                Some(holder) => {
                    let r = Refusal::DuplicateApp {
                        app,
                        holder: (*holder).to_owned(),
                    };
                    standing.insert((peer.to_owned(), r));
                }
                None => {
                    holders.insert(app, peer);
                }
            }
        }
        for (id, e) in accepted.iter_mut() {
            let mut apps = Vec::new();
            for a in &e.hosted_app_ulas {
                if holders.get(a) == Some(&id.as_str()) && !apps.contains(a) {
                    apps.push(*a);
                }
            }
            e.hosted_app_ulas = apps;
        }
        let fresh: Vec<&(String, Refusal)> = standing.difference(&self.standing).collect();
        for (_, r) in &fresh {
            r.count(&mut self.refused);
        }
        for (peer, r) in fresh.iter().take(MAX_REFUSAL_LOGS) {
            tracing::warn!(peer = %peer, reason = %r, "roster entry refused");
        }
        if fresh.len() > MAX_REFUSAL_LOGS {
            tracing::warn!(
                more = fresh.len() - MAX_REFUSAL_LOGS,
                total = ?self.refused,
                "more roster entries refused"
            );
        }
        self.standing = standing;
        if accepted == self.accepted {
            Applied::Unchanged
        } else {
            self.accepted = accepted;
            Applied::Changed
        }
    }
}

/// The per-entry checks: the peer id and ULA derived from the identity, a 32-byte key, app
/// ULAs in the app prefix, usable endpoints. Returns the decoded key.
pub fn check_entry(e: &RosterEntry) -> Result<[u8; 32], Refusal> {
    let derived = ula::identity_peer_id(&e.identity);
    if e.peer_id != derived {
        return Err(Refusal::PeerId { derived });
    }
    let derived = ula::identity_ula(&e.identity);
    if e.ula != derived {
        return Err(Refusal::Ula {
            claimed: e.ula,
            derived,
        });
    }
    let key = decode_key(&e.public_key).ok_or(Refusal::PublicKey)?;
    if let Some(a) = e.hosted_app_ulas.iter().find(|a| !ula::is_app_ula(a)) {
        return Err(Refusal::AppUla(*a));
    }
    if let Some(extra) = e.mapped_endpoints.get(tabbify_api::MAX_MAPPED_ENDPOINTS) {
        return Err(Refusal::Endpoint(*extra));
    }
    // A client (issue 15) is never sent to at an address from the roster (one we serve
    // dials in; one behind a concentrator is no peer): its endpoints are not used, so
    // `reflexive_endpoint` may be unspecified (`0.0.0.0:0`). `super::clients` refuses the
    // flags on a member's identity, so a member cannot dodge this check with them.
    if (e.client || e.via.is_some()) && super::clients::is_client_identity(&e.identity) {
        return Ok(key);
    }
    let eps = e
        .endpoints
        .iter()
        .chain(std::iter::once(&e.reflexive_endpoint))
        .chain(e.mapped_endpoints.iter());
    if let Some(bad) = eps.into_iter().find(|ep| !usable_endpoint(ep)) {
        return Err(Refusal::Endpoint(*bad));
    }
    Ok(key)
}

/// Whether WireGuard may send to `ep`: a unicast address with a port. Unspecified,
/// multicast, broadcast, port 0 and the mesh's own prefixes (a tunnel inside the tunnel)
/// are not; loopback and private addresses are (tests run on one machine, LANs are real).
/// IPv4-mapped IPv6 addresses are judged as IPv4.
pub fn usable_endpoint(ep: &SocketAddr) -> bool {
    if ep.port() == 0 {
        return false;
    }
    let ip = match ep.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_multicast()
                || ula::is_peer_ula(&v6)
                || ula::is_app_ula(&v6))
        }
    }
}

/// The filter's rules from a roster direction: ports for both protocols, TCP only, UDP only.
/// An entry's port rules as (outbound, inbound), each as (protocol, first, last).
#[allow(clippy::type_complexity)]
pub fn port_rules(p: &PortRules) -> (Vec<(Proto, u16, u16)>, Vec<(Proto, u16, u16)>) {
    (
        rules(&p.outbound, &p.outbound_tcp, &p.outbound_udp),
        rules(&p.inbound, &p.inbound_tcp, &p.inbound_udp),
    )
}

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
/// * otherwise its first mapped endpoint (where its NAT maps its WireGuard socket, as a
///   STUN server saw it), else its reflexive endpoint (right only when the NAT keeps the
///   port); the coordinator's `hole_punch` makes both sides open it at the same time.
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
    if let Some(mapped) = e.mapped_endpoints.first() {
        return Some(*mapped);
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

    fn pid(name: &str) -> String {
        ula::identity_peer_id(name)
    }

    /// An entry with the peer id and ULA derived from the identity `id`.
    fn entry(id: &str, key: u8, refl: &str, eps: &[&str]) -> RosterEntry {
        RosterEntry {
            peer_id: pid(id),
            identity: id.into(),
            ula: ula::identity_ula(id),
            display_name: id.into(),
            tags: vec!["t".into()],
            public_key: base64::engine::general_purpose::STANDARD.encode([key; 32]),
            endpoints: eps.iter().map(|s| s.parse().unwrap()).collect(),
            reflexive_endpoint: refl.parse().unwrap(),
            mapped_endpoints: vec![],
            nat: Default::default(),
            home_relay: None,
            hosted_app_ulas: vec![],
            ports: PortRules {
                outbound: vec![PortRange {
                    first: 8730,
                    last: 8730,
                }],
                inbound: vec![PortRange::ALL],
                ..Default::default()
            },
            stale: false,
            ipv4: None,
            routes: vec![],
            exit_node: false,
            may_use: vec![],
            route_ports: vec![],
            may_use_ports: vec![],
            via: None,
            client: false,
            client_ports: vec![],
        }
    }

    #[test]
    fn events_build_the_roster() {
        let mut r = Roster::new(&pid("me"));
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
            peer_id: pid("a"),
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
        let mut r = Roster::new(&pid("me"));
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
    fn bad_keys_are_refused_and_counted() {
        let mut r = Roster::new(&pid("me"));
        let mut a = entry("a", 1, "10.0.0.1:1", &[]);
        a.public_key = "not base64!".into();
        let mut c = entry("c", 3, "10.0.0.3:1", &[]);
        c.public_key = base64::engine::general_purpose::STANDARD.encode([3u8; 31]);
        r.replace(vec![a, entry("b", 2, "10.0.0.2:1", &[]), c]);
        assert_eq!(r.desired(&SelfView::default()).len(), 1);
        assert_eq!(r.refused().bad_public_key, 2);
    }

    /// A coordinator repeating 100 forgeries in every snapshot: each counts once while it
    /// stands (and the log says so in at most MAX_REFUSAL_LOGS + 1 lines); once gone and
    /// back, it counts again.
    #[test]
    fn standing_refusals_count_once() {
        let mut r = Roster::new(&pid("me"));
        let forged: Vec<RosterEntry> = (0..100)
            .map(|n| {
                let mut e = entry(&format!("p{n}"), 1, "10.0.0.1:1", &[]);
                e.ula = "fd5a:1f00::dead".parse().unwrap();
                e
            })
            .collect();
        let snap = |peers: Vec<RosterEntry>| {
            SseEvent::Snapshot(RosterSnapshot {
                policy_revision: 1,
                peers,
            })
        };
        r.apply(None, snap(forged.clone()));
        r.apply(None, snap(forged.clone()));
        assert_eq!(r.refused().bad_ula, 100);
        assert_eq!(r.entries().count(), 0);
        r.apply(None, snap(vec![]));
        r.apply(None, snap(forged[..1].to_vec()));
        assert_eq!(r.refused().bad_ula, 101);
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
        // NATed peer elsewhere with a STUN-mapped endpoint: the mapping, not the listen
        // port on the reflexive IP.
        let mut e = entry("a", 1, "198.51.100.7:51820", &["192.168.1.2:51820"]);
        e.mapped_endpoints = vec!["198.51.100.7:40123".parse().unwrap()];
        assert_eq!(
            choose_endpoint(&e, &me),
            Some("198.51.100.7:40123".parse().unwrap())
        );
        // Behind our own NAT the LAN address still wins.
        let mut e = entry("a", 1, "203.0.113.1:51821", &["192.168.1.3:51821"]);
        e.mapped_endpoints = vec!["203.0.113.1:40000".parse().unwrap()];
        assert_eq!(
            choose_endpoint(&e, &me),
            Some("192.168.1.3:51821".parse().unwrap())
        );
    }

    /// A malicious coordinator's roster entry with a mapped endpoint that is no usable
    /// unicast address (or too many of them) is refused, like a bad reported endpoint.
    #[test]
    fn bad_mapped_endpoints_are_refused() {
        let mut e = entry("a", 1, "198.51.100.7:51820", &["192.168.1.2:51820"]);
        e.mapped_endpoints = vec!["198.51.100.7:40123".parse().unwrap()];
        assert!(check_entry(&e).is_ok());
        let mesh = format!("[{}]:51820", ula::identity_ula("b"));
        for bad in [
            "0.0.0.0:1",
            "198.51.100.7:0",
            "224.0.0.5:9",
            "255.255.255.255:9",
            &mesh,
        ] {
            let mut e = e.clone();
            e.mapped_endpoints = vec![bad.parse().unwrap()];
            assert_eq!(
                check_entry(&e),
                Err(Refusal::Endpoint(bad.parse().unwrap())),
                "{bad}"
            );
        }
        let mut e = e.clone();
        e.mapped_endpoints = (1..=5)
            .map(|p| format!("198.51.100.7:{}", 40000 + p).parse().unwrap())
            .collect();
        assert!(matches!(check_entry(&e), Err(Refusal::Endpoint(_))));
    }
}
