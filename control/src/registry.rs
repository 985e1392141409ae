//! The live roster: registered peers, their visibility classes under the policy in force,
//! and the events their changes produce.
//!
//! Sans-IO: every method takes the time (`now_ms`) as an argument and nothing here
//! touches a socket, a file or the clock. Each change produces exactly one [`Dispatch`]
//! with the next event id, sent on the broadcast channel and kept in a bounded ring for
//! `Last-Event-ID` resumption. Payloads are serialized once per distinct
//! (viewer class → port rules) answer, never once per subscriber.
//!
//! Liveness: a peer that misses its heartbeats is marked stale (one upsert) and stays in
//! every roster, with its apps, until it is revoked, replaced, or stale for the
//! `stale_after` given to [`Registry::expire`]; a heartbeat makes it fresh again.
//!
//! Apps: an app ULA is held by at most one peer. A heartbeat claiming an app another peer
//! holds is refused whole ([`HeartbeatError::AppTaken`]; it still refreshes the caller's
//! liveness). The holder releases an app by leaving it out of a heartbeat, by being removed,
//! or by losing the right to host apps; [`Registry::move_app`] hands one over in one event.
//!
//! Coalescing: heartbeat-driven upserts of one peer go out at most once per
//! [`EVENT_WINDOW_MS`]; a change inside the window is applied at once (reads see it) and
//! announced once when the window ends, by [`Registry::flush`] driven by the caller's clock.
//!
//! Route-only visibility: two members no ordinary rule connects hold each other when one
//! may use an approved route of the other (`Registry::route_peers`): the user gets the
//! router with empty port rules and `routes`, the router the user with empty port rules
//! and `may_use`. Class rosters (snapshots, `policy` frames, upserts by class) carry the
//! user's side per viewer class; the router's side goes out as the routers' personal
//! entries. A change that ends such a pair sends `peer_remove` to the side that loses the
//! other and no longer sees it in any other way.
//!
//! Invariants: `by_identity`, `by_ula`, `members` and `apps` always agree with `peers` (an
//! app is in `apps` exactly when one peer's `hosted_app_ulas` lists it, under that peer's
//! id); every peer's `class` is a class of the current `vis` table; event ids strictly
//! increase.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use tokio::sync::broadcast;

use crate::api::{
    ClientPorts, HolePunch, PeerRemove, PortRules, RosterEntry, RosterSnapshot, SseEvent,
};
use crate::clients::ClientRow;
use crate::members::MemberRow;
use crate::policy::Policy;
use crate::sse::{Dispatch, Payload, SubjectAction};
use crate::visibility::{ClassId, RulesId, Visibility};

/// A registered peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    /// Id derived from the identity.
    pub id: String,
    /// WireGuard public key.
    pub key: [u8; 32],
    /// The key, standard base64.
    pub key_b64: String,
    /// ULA derived from the identity (stable across key rotations).
    pub ula: Ipv6Addr,
    /// Identity (certificate CN).
    pub identity: String,
    /// Display name.
    pub display_name: String,
    /// Tags (from the join token).
    pub tags: Vec<String>,
    /// Reported local endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Registered WireGuard listen port.
    pub wg_listen_port: u16,
    /// Observed source IP + `wg_listen_port`.
    pub reflexive: SocketAddr,
    /// Announced app ULAs.
    pub hosted_app_ulas: Vec<Ipv6Addr>,
    /// Mapped endpoints from the peer's STUN probe (its last heartbeat).
    pub mapped: Vec<SocketAddr>,
    /// NAT class from the peer's STUN probe (its last heartbeat).
    pub nat: crate::api::NatClass,
    /// The peer's home relay URL (its last heartbeat; one the coordinator advertised).
    pub home_relay: Option<String>,
    /// How many peers it reaches directly and by relay (its last heartbeat).
    pub paths: crate::api::PathCounts,
    /// Last register or heartbeat, ms since the epoch.
    pub last_seen_ms: u64,
    /// Missed its heartbeats; kept in rosters (with its apps) until `stale_after`.
    pub stale: bool,
    /// Registered with `ephemeral`: removed as soon as it misses its heartbeats.
    pub ephemeral: bool,
    /// Visibility class under the current policy.
    pub class: ClassId,
    /// The mesh IPv4 address ([`crate::routes`]), kept for the identity's peer id.
    pub ipv4: Option<Ipv4Addr>,
    /// Advertised routes and their admin approvals ([`crate::routes::Advertisement`]).
    pub ads: crate::routes::Advertisement,
    /// Registered (or heartbeated) with `concentrator: true`: serves its clients.
    pub concentrator: bool,
}

impl PeerRecord {
    /// Whether the peer looks NATed: its reflexive IP is none of its local endpoints' IPs.
    pub fn looks_nated(&self) -> bool {
        !self.endpoints.iter().any(|e| e.ip() == self.reflexive.ip())
    }

    /// Where another peer should punch to: the first mapped endpoint the peer's STUN probe
    /// learned, else its reflexive endpoint (source IP + listen port, right only when the
    /// NAT keeps ports).
    pub fn punch_endpoint(&self) -> SocketAddr {
        self.mapped.first().copied().unwrap_or(self.reflexive)
    }
}

/// What the caller supplies to add or replace a peer.
#[derive(Debug, Clone)]
pub struct NewPeer {
    /// WireGuard public key.
    pub key: [u8; 32],
    /// Identity (certificate CN).
    pub identity: String,
    /// Display name.
    pub display_name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Local endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// WireGuard listen port.
    pub wg_listen_port: u16,
    /// Observed reflexive endpoint.
    pub reflexive: SocketAddr,
    /// An ephemeral member (`RegisterRequest::ephemeral`): no stale window.
    pub ephemeral: bool,
    /// Serves stock WireGuard clients (`RegisterRequest::concentrator`).
    pub concentrator: bool,
}

/// Bounded history of dispatches plus the broadcast channel they go out on.
#[derive(Debug)]
struct EventLog {
    next_id: u64,
    ring: VecDeque<Arc<Dispatch>>,
    ring_cap: usize,
    /// Id of the last policy dispatch: resuming from before it needs a snapshot.
    epoch_start: u64,
    /// Resuming after an id below this needs a snapshot (the ring no longer holds, or
    /// this process never saw, what came after it).
    horizon: u64,
    /// An entry being collected ([`Registry::begin_entry`]): its payloads, sent as one
    /// dispatch by [`Registry::end_entry`], and whether it consumes its id even when empty
    /// (a change-log id).
    entry: Option<(Vec<Payload>, bool)>,
    tx: broadcast::Sender<Arc<Dispatch>>,
}

/// Sizes of the event buffers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Dispatches kept for `Last-Event-ID` resumption.
    pub ring: usize,
    /// Dispatches a subscriber may fall behind before it is resynced with a snapshot.
    pub broadcast: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ring: 4096,
            broadcast: 1024,
        }
    }
}

/// Shortest time between two heartbeat-driven upserts of one peer, in ms.
pub const EVENT_WINDOW_MS: u64 = 1000;

/// Why a heartbeat was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatError {
    /// No such peer.
    NotRegistered,
    /// Another peer holds this app; nothing changed but the caller's liveness.
    AppTaken {
        /// The contested app ULA.
        app: Ipv6Addr,
        /// Its holder's peer id.
        holder_id: String,
        /// Its holder's display name.
        holder_name: String,
    },
}

/// Why an app handover was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveError {
    /// No such target peer.
    NoPeer,
    /// The policy does not let the target host apps.
    MayNotHost,
    /// The target announces its maximum of apps already.
    TooManyApps,
}

/// What one expiry sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Peers that just went stale.
    pub stale: Vec<String>,
    /// Peers removed after being stale for too long.
    pub removed: Vec<String>,
}

/// Per-peer coalescing state.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    /// When the peer's last upsert went out.
    last_emit_ms: u64,
    /// A change waits for the end of the window.
    pending: bool,
    /// The pending change includes a new reflexive endpoint (send `hole_punch` too).
    punch: bool,
}

/// The live roster.
#[derive(Debug)]
pub struct Registry {
    vis: Visibility,
    revision: u64,
    peers: HashMap<String, PeerRecord>,
    by_identity: HashMap<String, String>,
    by_ula: HashMap<Ipv6Addr, String>,
    members: Vec<BTreeSet<String>>,
    apps: HashMap<Ipv6Addr, String>,
    windows: HashMap<String, Window>,
    due: BTreeSet<(u64, String)>,
    log: EventLog,
    /// Heartbeat-driven upserts wait for their window ([`EVENT_WINDOW_MS`]); off when
    /// every change is a database commit (its event goes out with the commit's id).
    coalesce: bool,
    /// Mesh IPv4 → the peer that was given it. May hold addresses of peers since removed
    /// or changed: an entry counts only while that peer still holds the address.
    ipv4s: HashMap<Ipv4Addr, String>,
    /// Peers that advertised routes at some point (checked against `ads` on use).
    routers: BTreeSet<String>,
    /// Stock WireGuard clients by peer id, with their class under the policy in force.
    clients: std::collections::BTreeMap<String, (ClientRow, ClassId)>,
}

impl Registry {
    /// An empty roster under `policy` (at `revision`).
    pub fn new(policy: Arc<Policy>, revision: u64, limits: Limits) -> Self {
        let (tx, _) = broadcast::channel(limits.broadcast.max(1));
        Self {
            vis: Visibility::new(policy),
            revision,
            peers: HashMap::new(),
            by_identity: HashMap::new(),
            by_ula: HashMap::new(),
            members: Vec::new(),
            apps: HashMap::new(),
            windows: HashMap::new(),
            due: BTreeSet::new(),
            log: EventLog {
                next_id: 1,
                ring: VecDeque::new(),
                ring_cap: limits.ring.max(1),
                epoch_start: 0,
                horizon: 0,
                entry: None,
                tx,
            },
            coalesce: true,
            ipv4s: HashMap::new(),
            routers: BTreeSet::new(),
            clients: std::collections::BTreeMap::new(),
        }
    }

    /// Turns the per-peer event window off: each change is announced at once.
    pub fn set_coalescing(&mut self, on: bool) {
        self.coalesce = on;
    }

    /// Continues an event sequence: the next event gets an id above `last` (a change-log
    /// id, or a start time for a database without a change log), and resuming from before
    /// it needs a snapshot.
    pub fn start_at(&mut self, last: u64) {
        self.log.next_id = self.log.next_id.max(last + 1);
        self.log.horizon = self.log.horizon.max(last);
    }

    /// Moves the event sequence past `last` (change-log entries of this process read
    /// back, which produce no events).
    pub fn advance_to(&mut self, last: u64) {
        self.log.next_id = self.log.next_id.max(last + 1);
    }

    /// Starts collecting one entry's events: everything emitted until
    /// [`Registry::end_entry`] goes out as one dispatch, with id `id` (a change-log id;
    /// `None`: the next local id). Ids never go backwards: an `id` at or below the last
    /// one is given the next id instead.
    pub fn begin_entry(&mut self, id: Option<u64>) {
        if let Some(id) = id {
            self.log.next_id = self.log.next_id.max(id);
        }
        self.log.entry = Some((Vec::new(), id.is_some()));
    }

    /// Sends the collected entry as one dispatch (nothing if it produced no event; a
    /// change-log id is consumed either way, so `last_event_id` is the log position).
    pub fn end_entry(&mut self) {
        let Some((mut parts, consume)) = self.log.entry.take() else {
            return;
        };
        match parts.len() {
            0 => {
                if consume {
                    self.log.next_id += 1;
                }
            }
            1 => self.push(parts.remove(0)),
            _ => self.push(Payload::Batch(parts)),
        }
    }

    /// Collects events without sending them (a preview of a change that is not committed
    /// yet); [`Registry::discard`] drops them.
    pub fn hold(&mut self) {
        self.log.entry = Some((Vec::new(), false));
    }

    /// Drops the events collected since [`Registry::hold`].
    pub fn discard(&mut self) {
        self.log.entry = None;
    }

    /// Puts `record` (or nothing) in place of peer `id` without any event, keeping the
    /// indexes in step (undoing a preview; loading members at start).
    pub fn set_silent(&mut self, id: &str, record: Option<PeerRecord>) {
        if let Some(cur) = self.peers.remove(id) {
            if self.by_identity.get(&cur.identity).map(String::as_str) == Some(id) {
                self.by_identity.remove(&cur.identity);
            }
            if self.by_ula.get(&cur.ula).map(String::as_str) == Some(id) {
                self.by_ula.remove(&cur.ula);
            }
            if let Some(m) = self.members.get_mut(cur.class as usize) {
                m.remove(id);
            }
            for a in &cur.hosted_app_ulas {
                self.release_app(a, id);
            }
        }
        if let Some(r) = record {
            self.note_routes(&r);
            self.by_identity.insert(r.identity.clone(), id.to_owned());
            self.by_ula.insert(r.ula, id.to_owned());
            self.member_set(r.class).insert(id.to_owned());
            for a in &r.hosted_app_ulas {
                self.apps.insert(*a, id.to_owned());
            }
            self.peers.insert(id.to_owned(), r);
        }
    }

    /// Loads a stored member without any event (at start). `false` for a row no
    /// coordinator writes (see [`MemberRow::to_peer`]).
    pub fn load_member(&mut self, row: &MemberRow) -> bool {
        let class = self.vis.class_of(&row.identity, &row.tags);
        let Some(mut rec) = row.to_peer(class) else {
            return false;
        };
        if !self.vis.may_host_apps(class) {
            rec.hosted_app_ulas.clear();
        }
        let id = rec.id.clone();
        self.set_silent(&id, Some(rec));
        true
    }

    /// Puts a committed member row in force (this coordinator's own change, or another's
    /// from the change log) and announces what changed, as [`Registry::upsert`] and
    /// [`Registry::heartbeat`] do: an upsert (a class change first removes the peer from
    /// the viewers that lose it and resyncs its own streams), and hole punches when its
    /// reflexive or mapped endpoints changed. The peer's path counts and a newer local
    /// `last_seen` are kept. `false` for a row no coordinator writes.
    pub fn apply_member(&mut self, row: &MemberRow) -> bool {
        let class = self.vis.class_of(&row.identity, &row.tags);
        let Some(mut rec) = row.to_peer(class) else {
            return false;
        };
        if !self.vis.may_host_apps(class) {
            rec.hosted_app_ulas.clear();
        }
        let id = rec.id.clone();
        let old = self.peers.get(&id).cloned();
        if let Some(o) = &old {
            rec.paths = o.paths;
            rec.last_seen_ms = rec.last_seen_ms.max(o.last_seen_ms);
            for a in o
                .hosted_app_ulas
                .iter()
                .filter(|a| !rec.hosted_app_ulas.contains(a))
            {
                self.release_app(a, &id);
            }
        }
        // The database holds one holder per app; memory follows the log's order.
        for a in &rec.hosted_app_ulas {
            if let Some(h) = self.apps.insert(*a, id.clone()) {
                if h != id {
                    if let Some(p) = self.peers.get_mut(&h) {
                        p.hosted_app_ulas.retain(|x| x != a);
                    }
                }
            }
        }
        let audience = self.client_audience_if(old.as_ref(), &rec);
        let route_before = self.route_holders(&id);
        let class_changed = self.index(&rec, old.as_ref());
        // Its own routes changed: its streams get a snapshot (their `may_use` lists).
        let routes_changed = old.as_ref().is_some_and(|o| o.ads != rec.ads);
        let punch = old
            .as_ref()
            .is_none_or(|o| o.reflexive != rec.reflexive || o.mapped != rec.mapped);
        let unchanged = old.as_ref().is_some_and(|o| {
            *o == PeerRecord {
                last_seen_ms: o.last_seen_ms,
                paths: o.paths,
                ..rec.clone()
            }
        });
        self.peers.insert(id.clone(), rec);
        if !unchanged {
            let action = if class_changed || routes_changed {
                SubjectAction::Resync
            } else {
                SubjectAction::Skip
            };
            self.emit_upsert(&id, action);
        }
        self.drop_route_holders(&id, route_before, "policy");
        if punch {
            self.hole_punch(&id);
        }
        if let Some(before) = audience {
            self.resync_client_audience(before);
        }
        true
    }

    /// Marks `id` stale (the expiry runner's committed decision) with one upsert.
    pub fn mark_stale(&mut self, id: &str) {
        let Some(p) = self.peers.get_mut(id) else {
            return;
        };
        if !p.stale {
            p.stale = true;
            self.emit_upsert(id, SubjectAction::Skip);
        }
    }

    /// Sets `id`'s liveness and path counts (not announced).
    pub fn set_liveness(&mut self, id: &str, last_seen_ms: u64, paths: crate::api::PathCounts) {
        if let Some(p) = self.peers.get_mut(id) {
            p.last_seen_ms = p.last_seen_ms.max(last_seen_ms);
            p.paths = paths;
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        self.vis.policy()
    }

    /// The policy revision in force.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The visibility table.
    pub fn visibility(&self) -> &Visibility {
        &self.vis
    }

    /// Number of registered peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is registered.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Every peer, in no particular order.
    pub fn peers(&self) -> impl Iterator<Item = &PeerRecord> {
        self.peers.values()
    }

    /// A peer by id.
    pub fn peer(&self, id: &str) -> Option<&PeerRecord> {
        self.peers.get(id)
    }

    /// The peer registered under `identity`.
    pub fn peer_by_identity(&self, identity: &str) -> Option<&PeerRecord> {
        self.by_identity
            .get(identity)
            .and_then(|id| self.peers.get(id))
    }

    /// The peer whose ULA is `ula`.
    pub fn peer_by_ula(&self, ula: &Ipv6Addr) -> Option<&PeerRecord> {
        self.by_ula.get(ula).and_then(|id| self.peers.get(id))
    }

    /// The peer holding app `app`.
    pub fn app_holder(&self, app: &Ipv6Addr) -> Option<&PeerRecord> {
        self.apps.get(app).and_then(|id| self.peers.get(id))
    }

    /// Number of stale peers.
    pub fn stale_count(&self) -> usize {
        self.peers.values().filter(|p| p.stale).count()
    }

    /// A receiver of every future dispatch.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Dispatch>> {
        self.log.tx.subscribe()
    }

    /// Number of live receivers.
    pub fn subscribers(&self) -> usize {
        self.log.tx.receiver_count()
    }

    /// Id of the newest event (0 before the first).
    pub fn last_event_id(&self) -> u64 {
        self.log.next_id - 1
    }

    /// Every dispatch after `last`, if the ring still holds all of them and no policy
    /// change happened since; `None` means the client needs a snapshot.
    pub fn replay_since(&self, last: u64) -> Option<Vec<Arc<Dispatch>>> {
        if last >= self.log.next_id || last < self.log.epoch_start || last < self.log.horizon {
            return None;
        }
        Some(
            self.log
                .ring
                .iter()
                .filter(|d| d.id > last)
                .cloned()
                .collect(),
        )
    }

    /// The roster `viewer` sees, sorted by peer id.
    pub fn roster(&self, viewer: &str) -> Vec<RosterEntry> {
        let Some(v) = self.peers.get(viewer) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for target in self.vis.visible_from(v.class) {
            let Some(rules) = self.vis.port_rules(v.class, target) else {
                continue;
            };
            let Some(ids) = self.members.get(target as usize) else {
                continue;
            };
            for id in ids {
                if id == viewer {
                    continue;
                }
                if let Some(p) = self.peers.get(id) {
                    let mut e = entry(p, rules.clone());
                    self.decorate(&mut e, v, p, true);
                    out.push(e);
                }
            }
        }
        // Peers held through a route only: empty ports, the routes and `may_use`.
        for p in self.route_peers(v) {
            let mut e = entry(p, PortRules::default());
            self.decorate(&mut e, v, p, true);
            out.push(e);
        }
        self.add_client_entries(v, &mut out);
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }

    /// `viewer`'s snapshot as a whole SSE frame with the newest event id.
    pub fn snapshot_frame(&self, viewer: &str) -> Bytes {
        let snap = SseEvent::Snapshot(RosterSnapshot {
            policy_revision: self.revision,
            peers: self.roster(viewer),
        });
        Bytes::from(snap.to_frame(self.last_event_id()))
    }

    /// Adds or replaces the peer of `new.identity` (its id and ULA derive from the
    /// identity, so a new key replaces the peer in place, one upsert event) and announces
    /// it. Returns the new record. The caller checked that the key is the identity's.
    pub fn upsert(&mut self, new: NewPeer, now_ms: u64) -> &PeerRecord {
        let id = crate::ula::identity_peer_id(&new.identity);
        let class = self.vis.class_of(&new.identity, &new.tags);
        let old = self.peers.get(&id).cloned();
        let kept_apps: Vec<Ipv6Addr> = old
            .as_ref()
            .filter(|o| o.class == class)
            .map(|o| o.hosted_app_ulas.clone())
            .unwrap_or_default();
        if let Some(o) = &old {
            for a in o.hosted_app_ulas.iter().filter(|a| !kept_apps.contains(a)) {
                self.release_app(a, &id);
            }
        }
        let rec = PeerRecord {
            id: id.clone(),
            key: new.key,
            key_b64: base64::engine::general_purpose::STANDARD.encode(new.key),
            ula: crate::ula::identity_ula(&new.identity),
            identity: new.identity,
            display_name: new.display_name,
            tags: new.tags,
            endpoints: new.endpoints,
            wg_listen_port: new.wg_listen_port,
            reflexive: new.reflexive,
            hosted_app_ulas: kept_apps,
            mapped: Vec::new(),
            nat: crate::api::NatClass::Unknown,
            home_relay: None,
            paths: crate::api::PathCounts::default(),
            last_seen_ms: now_ms,
            stale: false,
            ephemeral: new.ephemeral,
            class,
            ipv4: old
                .as_ref()
                .and_then(|o| o.ipv4)
                .or_else(|| self.allocate_ipv4(&id)),
            ads: old.as_ref().map(|o| o.ads.clone()).unwrap_or_default(),
            concentrator: new.concentrator,
        };
        let audience = self.client_audience_if(old.as_ref(), &rec);
        let route_before = self.route_holders(&id);
        let class_changed = self.index(&rec, old.as_ref());
        let reflexive_changed = old.as_ref().is_none_or(|o| o.reflexive != rec.reflexive);
        let unchanged = old.as_ref()
            == Some(&PeerRecord {
                last_seen_ms: old.as_ref().map_or(0, |o| o.last_seen_ms),
                ..rec.clone()
            });
        self.peers.insert(id.clone(), rec);
        if !unchanged {
            let action = if class_changed {
                SubjectAction::Resync
            } else {
                SubjectAction::Skip
            };
            self.emit_upsert(&id, action);
            self.emitted(&id, now_ms);
        }
        self.drop_route_holders(&id, route_before, "policy");
        if reflexive_changed {
            self.hole_punch(&id);
        }
        if let Some(before) = audience {
            self.resync_client_audience(before);
        }
        &self.peers[&id]
    }

    /// Replaces the WireGuard key of peer `id` (a rotation), keeping everything else, and
    /// announces it with one upsert event. `None` if `id` is not registered.
    pub fn rotate_key(&mut self, id: &str, key: [u8; 32], now_ms: u64) -> Option<&PeerRecord> {
        let p = self.peers.get_mut(id)?;
        p.key = key;
        p.key_b64 = base64::engine::general_purpose::STANDARD.encode(key);
        p.last_seen_ms = now_ms;
        // The caller is alive: a rotation makes a stale peer fresh, like a heartbeat.
        p.stale = false;
        self.emit_upsert(id, SubjectAction::Skip);
        self.emitted(id, now_ms);
        self.peers.get(id)
    }

    /// Records a heartbeat: the peer is alive (fresh again if it was stale) and its
    /// endpoints and hosted apps are replaced; a change is announced subject to the
    /// per-peer event window. A claim on an app another peer holds refuses the whole
    /// heartbeat except the liveness refresh. The caller validated the inputs
    /// (`hosted_app_ulas` sorted and deduplicated, `relay.0` one of the advertised relays).
    /// A new home relay is a roster change like new endpoints; path counts are stored and
    /// announced to nobody (they feed `/metrics`).
    #[allow(clippy::too_many_arguments)]
    pub fn heartbeat(
        &mut self,
        id: &str,
        endpoints: Vec<SocketAddr>,
        hosted_app_ulas: Vec<Ipv6Addr>,
        stun: (Vec<SocketAddr>, crate::api::NatClass),
        relay: (Option<String>, crate::api::PathCounts),
        reflexive_ip: std::net::IpAddr,
        now_ms: u64,
    ) -> Result<SocketAddr, HeartbeatError> {
        let (mapped, nat) = stun;
        let p = self
            .peers
            .get_mut(id)
            .ok_or(HeartbeatError::NotRegistered)?;
        p.last_seen_ms = now_ms;
        let was_stale = std::mem::take(&mut p.stale);
        let taken = hosted_app_ulas.iter().find_map(|a| {
            let holder = self.apps.get(a).filter(|h| h.as_str() != id)?;
            let h = self.peers.get(holder)?;
            Some(HeartbeatError::AppTaken {
                app: *a,
                holder_id: h.id.clone(),
                holder_name: h.display_name.clone(),
            })
        });
        if let Some(e) = taken {
            if was_stale {
                self.announce(id, false, now_ms);
            }
            return Err(e);
        }
        let Some(p) = self.peers.get_mut(id) else {
            return Err(HeartbeatError::NotRegistered);
        };
        let reflexive = SocketAddr::new(reflexive_ip, p.wg_listen_port);
        // A new mapped endpoint is a new place to punch to, like a new reflexive one.
        let reflexive_changed = p.reflexive != reflexive || p.mapped != mapped;
        let changed = was_stale
            || p.endpoints != endpoints
            || p.hosted_app_ulas != hosted_app_ulas
            || p.nat != nat
            || p.home_relay != relay.0
            || reflexive_changed;
        (p.home_relay, p.paths) = relay;
        p.mapped = mapped;
        p.nat = nat;
        let old_apps = std::mem::replace(&mut p.hosted_app_ulas, hosted_app_ulas.clone());
        p.endpoints = endpoints;
        p.reflexive = reflexive;
        for a in old_apps.iter().filter(|a| !hosted_app_ulas.contains(a)) {
            self.release_app(a, id);
        }
        for a in hosted_app_ulas {
            self.apps.insert(a, id.to_owned());
        }
        if changed {
            self.announce(id, reflexive_changed, now_ms);
        }
        Ok(reflexive)
    }

    /// Hands app `app` to peer `to` (releasing it from its holder, if any) in one
    /// dispatch: the old holder's upsert, then the new holder's. Returns the old holder.
    pub fn move_app(
        &mut self,
        app: Ipv6Addr,
        to: &str,
        max_apps: usize,
        now_ms: u64,
    ) -> Result<Option<String>, MoveError> {
        let target = self.peers.get(to).ok_or(MoveError::NoPeer)?;
        if !self.vis.may_host_apps(target.class) {
            return Err(MoveError::MayNotHost);
        }
        let from = self.apps.get(&app).cloned();
        if from.as_deref() == Some(to) {
            return Ok(from);
        }
        if target.hosted_app_ulas.len() >= max_apps {
            return Err(MoveError::TooManyApps);
        }
        let mut parts = Vec::new();
        if let Some(f) = &from {
            if let Some(p) = self.peers.get_mut(f) {
                p.hosted_app_ulas.retain(|a| *a != app);
            }
            if let Some(part) = self.upsert_payload(f, SubjectAction::Skip) {
                parts.push(part);
            }
        }
        if let Some(p) = self.peers.get_mut(to) {
            if let Err(i) = p.hosted_app_ulas.binary_search(&app) {
                p.hosted_app_ulas.insert(i, app);
            }
        }
        self.apps.insert(app, to.to_owned());
        if let Some(part) = self.upsert_payload(to, SubjectAction::Skip) {
            parts.push(part);
        }
        self.push(Payload::Batch(parts));
        for id in from.iter().map(String::as_str).chain([to]) {
            self.emitted(id, now_ms);
        }
        Ok(from)
    }

    /// Whether a coalesced change waits for its window to end.
    pub fn has_pending(&self) -> bool {
        !self.due.is_empty()
    }

    /// Announces every coalesced change whose window has ended by `now_ms`.
    pub fn flush(&mut self, now_ms: u64) {
        while let Some((due, id)) = self.due.first().cloned() {
            if due > now_ms {
                break;
            }
            self.due.pop_first();
            let Some(w) = self.windows.get(&id).copied() else {
                continue;
            };
            if !w.pending || !self.peers.contains_key(&id) {
                continue;
            }
            self.emit_upsert(&id, SubjectAction::Skip);
            self.emitted(&id, now_ms);
            if w.punch {
                self.hole_punch(&id);
            }
        }
    }

    /// A heartbeat-driven change of `id`: announced now if its window allows, else once
    /// when the window ends.
    fn announce(&mut self, id: &str, punch: bool, now_ms: u64) {
        let coalesce = self.coalesce;
        let w = self.windows.entry(id.to_owned()).or_default();
        let open = !coalesce || w.last_emit_ms == 0 || now_ms >= w.last_emit_ms + EVENT_WINDOW_MS;
        if open && !w.pending {
            self.emit_upsert(id, SubjectAction::Skip);
            self.emitted(id, now_ms);
            if punch {
                self.hole_punch(id);
            }
        } else {
            w.punch |= punch;
            if !w.pending {
                w.pending = true;
                self.due
                    .insert((w.last_emit_ms + EVENT_WINDOW_MS, id.to_owned()));
            }
        }
    }

    /// Records that `id`'s current state went out at `now_ms` (nothing waits any more).
    fn emitted(&mut self, id: &str, now_ms: u64) {
        let w = self.windows.entry(id.to_owned()).or_default();
        if w.pending {
            self.due
                .remove(&(w.last_emit_ms + EVENT_WINDOW_MS, id.to_owned()));
        }
        *w = Window {
            last_emit_ms: now_ms.max(1),
            pending: false,
            punch: false,
        };
    }

    fn release_app(&mut self, app: &Ipv6Addr, holder: &str) {
        if self.apps.get(app).map(String::as_str) == Some(holder) {
            self.apps.remove(app);
        }
    }

    /// Removes a peer and tells everyone who saw it (its own streams close).
    pub fn remove(&mut self, id: &str, reason: &str) -> Option<PeerRecord> {
        if !self.peers.contains_key(id) {
            return None;
        }
        let client_removals = self.client_removals(id, reason);
        let route_holders = self.route_holders(id);
        let audience = self
            .peers
            .get(id)
            .filter(|p| p.concentrator)
            .map(|_| self.client_audience());
        let rec = self.peers.remove(id)?;
        if self.by_identity.get(&rec.identity).map(String::as_str) == Some(id) {
            self.by_identity.remove(&rec.identity);
        }
        if self.by_ula.get(&rec.ula).map(String::as_str) == Some(id) {
            self.by_ula.remove(&rec.ula);
        }
        if let Some(m) = self.members.get_mut(rec.class as usize) {
            m.remove(id);
        }
        for a in &rec.hosted_app_ulas {
            self.release_app(a, id);
        }
        if let Some(w) = self.windows.remove(id) {
            self.due
                .remove(&(w.last_emit_ms + EVENT_WINDOW_MS, id.to_owned()));
        }
        let viewers: Vec<ClassId> = self.vis.viewers_of(rec.class).collect();
        self.emit_remove(id, reason, &viewers, SubjectAction::Close);
        if !client_removals.is_empty() {
            self.push(Payload::Targeted(client_removals));
        }
        self.drop_route_holders(id, route_holders, reason);
        if let Some(mut before) = audience {
            before.remove(id);
            self.resync_client_audience(before);
        }
        Some(rec)
    }

    /// Marks stale every peer not seen for `timeout_ms` (one upsert each, at once) and
    /// removes (reason `expired`) every peer not seen for `timeout_ms + stale_after_ms`,
    /// and every ephemeral peer not seen for `timeout_ms` (it has no stale window).
    pub fn expire(&mut self, now_ms: u64, timeout_ms: u64, stale_after_ms: u64) -> Expiry {
        let mut out = Expiry::default();
        for p in self.peers.values() {
            let age = now_ms.saturating_sub(p.last_seen_ms);
            let window = if p.ephemeral { 0 } else { stale_after_ms };
            if age > timeout_ms.saturating_add(window) {
                out.removed.push(p.id.clone());
            } else if age > timeout_ms && !p.stale {
                out.stale.push(p.id.clone());
            }
        }
        out.stale.sort();
        out.removed.sort();
        for id in &out.removed {
            self.remove(id, "expired");
        }
        for id in &out.stale {
            if let Some(p) = self.peers.get_mut(id) {
                p.stale = true;
            }
            self.emit_upsert(id, SubjectAction::Skip);
            self.emitted(id, now_ms);
        }
        out
    }

    /// Puts a new policy in force: reclassifies every peer and resyncs every stream with
    /// one `policy` event carrying each class's new roster.
    pub fn set_policy(&mut self, policy: Arc<Policy>, revision: u64) {
        let audience = self.client_audience();
        self.vis = Visibility::new(policy);
        let ids: Vec<String> = self.clients.keys().cloned().collect();
        for id in ids {
            if let Some((row, _)) = self.clients.get(&id) {
                let (identity, tags) = (row.identity.clone(), row.tags.clone());
                let class = self.vis.class_of(&identity, &tags);
                if let Some(c) = self.clients.get_mut(&id) {
                    c.1 = class;
                }
            }
        }
        self.revision = revision;
        self.members.clear();
        let mut classes = HashMap::with_capacity(self.peers.len());
        let ids: Vec<String> = self.peers.keys().cloned().collect();
        for id in ids {
            let Some(p) = self.peers.get(&id) else {
                continue;
            };
            let class = self.vis.class_of(&p.identity, &p.tags);
            let may_host = self.vis.may_host_apps(class);
            if let Some(p) = self.peers.get_mut(&id) {
                p.class = class;
                if !may_host {
                    for a in std::mem::take(&mut p.hosted_app_ulas) {
                        if self.apps.get(&a) == Some(&id) {
                            self.apps.remove(&a);
                        }
                    }
                }
            }
            self.member_set(class).insert(id.clone());
            classes.insert(id, class);
        }
        let id = self.log.next_id;
        let frames = self.policy_frames(id, revision);
        self.log.epoch_start = id;
        self.push(Payload::Policy {
            frames,
            classes: Arc::new(classes),
        });
        self.resync_routers();
        self.resync_client_audience(audience);
    }

    /// Every class's roster for a `policy` event (see [`PolicyFrame`]). An entry's JSON
    /// depends only on the peer and the pair's port rules, so the entries are serialized
    /// into one table in groups of (target class, rules): a group is built the first time
    /// a viewer class needs it and shared by every class that sees that target with those
    /// rules. A class's roster is then a list of table indices, put in peer-id order by
    /// each peer's rank in the sorted id list: no string hashing or comparing per entry.
    fn policy_frames(&self, id: u64, revision: u64) -> Vec<Option<Arc<PolicyFrame>>> {
        let mut sorted: Vec<&str> = self.peers.keys().map(String::as_str).collect();
        sorted.sort_unstable();
        let rank: HashMap<&str, u32> = sorted
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, i as u32))
            .collect();
        let mut table: Vec<SharedEntry> = Vec::new();
        let mut table_rank: Vec<u32> = Vec::new();
        // Per target class: (rules id, first table index, count) of its groups.
        let mut groups: Vec<Vec<(RulesId, u32, u32)>> = vec![Vec::new(); self.vis.len()];
        let mut rosters: Vec<Option<Vec<u32>>> = vec![None; self.vis.len()];
        // Peers advertising routes, by class (few): their entries differ per viewer class.
        let mut routers: HashMap<ClassId, Vec<&PeerRecord>> = HashMap::new();
        for p in self.peers.values().filter(|p| !p.ads.is_empty()) {
            routers.entry(p.class).or_default().push(p);
        }
        for (c, slot) in rosters.iter_mut().enumerate() {
            let c = c as ClassId;
            if self.members.get(c as usize).is_none_or(|m| m.is_empty()) {
                continue;
            }
            // The class's members see the same roster, each minus itself (dropped when
            // the frame is written for a stream).
            let mut keyed: Vec<u64> = Vec::new();
            for (target, rid) in self.vis.row(c) {
                let Some(ids) = self.members.get(*target as usize).filter(|m| !m.is_empty()) else {
                    continue;
                };
                let group = &mut groups[*target as usize];
                let (first, count) = match group.iter().find(|(r, _, _)| r == rid) {
                    Some(&(_, first, count)) => (first, count),
                    None => {
                        let rules = self.vis.port_rules(c, *target).cloned().unwrap_or_default();
                        let first = table.len() as u32;
                        for pid in ids {
                            // A peer with routes is written per viewer class below.
                            let Some(p) = self.peers.get(pid).filter(|p| p.ads.is_empty()) else {
                                continue;
                            };
                            let text =
                                serde_json::to_string(&entry(p, rules.clone())).unwrap_or_default();
                            table.push((Arc::from(pid.as_str()), Arc::from(text)));
                            table_rank.push(rank.get(pid.as_str()).copied().unwrap_or(u32::MAX));
                        }
                        let count = table.len() as u32 - first;
                        group.push((*rid, first, count));
                        (first, count)
                    }
                };
                keyed.extend(
                    (first..first + count)
                        .map(|i| (u64::from(table_rank[i as usize]) << 32) | u64::from(i)),
                );
                // Its routes depend on the viewer class: not shared.
                for p in routers.get(target).into_iter().flatten() {
                    let rules = self.vis.port_rules(c, *target).cloned().unwrap_or_default();
                    let mut e = entry(p, rules);
                    if let Some(v) = self.representative(c) {
                        self.decorate(&mut e, v, p, false);
                    }
                    let text = serde_json::to_string(&e).unwrap_or_default();
                    let i = table.len() as u32;
                    table.push((Arc::from(p.id.as_str()), Arc::from(text)));
                    table_rank.push(rank.get(p.id.as_str()).copied().unwrap_or(u32::MAX));
                    keyed.push((u64::from(table_rank[i as usize]) << 32) | u64::from(i));
                }
            }
            // Routers the class does not see by an ordinary rule but whose routes it may
            // use: empty ports, the routes (per viewer class, like routers above).
            if let Some(v) = self.representative(c) {
                for p in routers.values().flatten() {
                    if self.vis.visible(c, p.class) || !self.uses_routes_of(v, p) {
                        continue;
                    }
                    let mut e = entry(p, PortRules::default());
                    self.decorate(&mut e, v, p, false);
                    let text = serde_json::to_string(&e).unwrap_or_default();
                    let i = table.len() as u32;
                    table.push((Arc::from(p.id.as_str()), Arc::from(text)));
                    table_rank.push(rank.get(p.id.as_str()).copied().unwrap_or(u32::MAX));
                    keyed.push((u64::from(table_rank[i as usize]) << 32) | u64::from(i));
                }
            }
            keyed.sort_unstable();
            *slot = Some(keyed.into_iter().map(|k| k as u32).collect());
        }
        let table: Arc<[SharedEntry]> = table.into();
        rosters
            .into_iter()
            .map(|r| {
                r.map(|entries| {
                    Arc::new(PolicyFrame {
                        id,
                        revision,
                        table: table.clone(),
                        entries,
                    })
                })
            })
            .collect()
    }

    /// Files `rec` in the lookup maps and its class's member set; when `old` was in another
    /// class, the viewers that saw it there but cannot see it now get its removal (reason
    /// `policy`). Returns whether the class changed.
    fn index(&mut self, rec: &PeerRecord, old: Option<&PeerRecord>) -> bool {
        let (id, class) = (&rec.id, rec.class);
        let class_changed = old.is_some_and(|o| o.class != class);
        if let Some(o) = old {
            if o.identity != rec.identity {
                self.by_identity.remove(&o.identity);
            }
            if class_changed {
                // Peers that saw it under the old class but not the new one must drop it.
                let leaving: Vec<ClassId> = self
                    .vis
                    .viewers_of(o.class)
                    .filter(|v| !self.vis.visible(*v, class))
                    .collect();
                if let Some(m) = self.members.get_mut(o.class as usize) {
                    m.remove(id);
                }
                self.emit_remove(id, "policy", &leaving, SubjectAction::Skip);
            }
        }
        self.by_identity.insert(rec.identity.clone(), id.clone());
        self.by_ula.insert(rec.ula, id.clone());
        self.member_set(class).insert(id.clone());
        self.note_routes(rec);
        class_changed
    }

    fn member_set(&mut self, class: ClassId) -> &mut BTreeSet<String> {
        let i = class as usize;
        if self.members.len() <= i {
            self.members.resize_with(i + 1, BTreeSet::new);
        }
        &mut self.members[i]
    }

    fn emit_upsert(&mut self, id: &str, action: SubjectAction) {
        if let Some(payload) = self.upsert_payload(id, action) {
            self.push(payload);
        }
    }

    fn upsert_payload(&self, id: &str, action: SubjectAction) -> Option<Payload> {
        let p = self.peers.get(id)?;
        let event_id = self.log.next_id;
        let mut frames: Vec<Option<Bytes>> = vec![None; self.vis.len()];
        let mut by_rules: HashMap<RulesId, Bytes> = HashMap::new();
        for viewer in self.vis.viewers_of(p.class) {
            if !p.ads.is_empty() {
                // Its routes depend on the viewer class: one frame per class.
                let rules = self
                    .vis
                    .port_rules(viewer, p.class)
                    .cloned()
                    .unwrap_or_default();
                let mut e = entry(p, rules);
                if let Some(v) = self.representative(viewer) {
                    self.decorate(&mut e, v, p, false);
                }
                frames[viewer as usize] =
                    Some(Bytes::from(SseEvent::PeerUpsert(e).to_frame(event_id)));
                continue;
            }
            let rid = self.vis.rules_id(viewer, p.class);
            let frame = by_rules.entry(rid).or_insert_with(|| {
                let rules = self
                    .vis
                    .port_rules(viewer, p.class)
                    .cloned()
                    .unwrap_or_default();
                Bytes::from(SseEvent::PeerUpsert(entry(p, rules)).to_frame(event_id))
            });
            frames[viewer as usize] = Some(frame.clone());
        }
        // Classes that see it through its routes only: empty ports, the routes.
        if !p.ads.is_empty() {
            for c in 0..self.vis.len() as ClassId {
                if self.vis.visible(c, p.class) {
                    continue;
                }
                let Some(v) = self.representative(c) else {
                    continue;
                };
                if !self.uses_routes_of(v, p) {
                    continue;
                }
                let mut e = entry(p, PortRules::default());
                self.decorate(&mut e, v, p, false);
                frames[c as usize] = Some(Bytes::from(SseEvent::PeerUpsert(e).to_frame(event_id)));
            }
        }
        let by_class = Payload::ByClass {
            subject: id.to_owned(),
            frames,
            action,
        };
        // Routers that see it get their own entry after the class one (its `may_use`), and
        // so do concentrators and the viewers of a concentrator's clients.
        let mut personal = self.router_frames(p, event_id);
        personal.extend(self.client_frames(p, event_id));
        if personal.is_empty() {
            Some(by_class)
        } else {
            Some(Payload::Batch(vec![by_class, Payload::Targeted(personal)]))
        }
    }

    fn emit_remove(&mut self, id: &str, reason: &str, viewers: &[ClassId], action: SubjectAction) {
        let frame = Bytes::from(
            SseEvent::PeerRemove(PeerRemove {
                peer_id: id.to_owned(),
                reason: reason.to_owned(),
            })
            .to_frame(self.log.next_id),
        );
        let mut frames: Vec<Option<Bytes>> = vec![None; self.vis.len()];
        for v in viewers {
            if let Some(slot) = frames.get_mut(*v as usize) {
                *slot = Some(frame.clone());
            }
        }
        self.push(Payload::ByClass {
            subject: id.to_owned(),
            frames,
            action,
        });
    }

    /// When `id` looks NATed, sends it and every NATed peer it sees a `hole_punch` with
    /// the other's reflexive endpoint, all in one dispatch (so at the same moment).
    fn hole_punch(&mut self, id: &str) {
        let Some(p) = self.peers.get(id) else {
            return;
        };
        if !p.looks_nated() {
            return;
        }
        let event_id = self.log.next_id;
        let mut targets = Vec::new();
        let frame = |to: &PeerRecord| {
            Bytes::from(
                SseEvent::HolePunch(HolePunch {
                    peer_id: to.id.clone(),
                    public_key: to.key_b64.clone(),
                    endpoint: to.punch_endpoint(),
                })
                .to_frame(event_id),
            )
        };
        for class in self.vis.visible_from(p.class) {
            let Some(ids) = self.members.get(class as usize) else {
                continue;
            };
            for qid in ids {
                if qid == id {
                    continue;
                }
                let Some(q) = self.peers.get(qid) else {
                    continue;
                };
                if q.looks_nated() {
                    targets.push((p.id.clone(), frame(q)));
                    targets.push((q.id.clone(), frame(p)));
                }
            }
        }
        // Peers held through a route only talk to it directly too.
        for q in self.route_peers(p) {
            if q.looks_nated() {
                targets.push((p.id.clone(), frame(q)));
                targets.push((q.id.clone(), frame(p)));
            }
        }
        if !targets.is_empty() {
            self.push(Payload::Targeted(targets));
        }
    }

    fn push(&mut self, payload: Payload) {
        if let Some((parts, _)) = self.log.entry.as_mut() {
            parts.push(payload);
            return;
        }
        let d = Arc::new(Dispatch {
            id: self.log.next_id,
            revision: self.revision,
            payload,
        });
        self.log.next_id += 1;
        if self.log.ring.len() == self.log.ring_cap {
            if let Some(old) = self.log.ring.pop_front() {
                self.log.horizon = self.log.horizon.max(old.id);
            }
        }
        self.log.ring.push_back(d.clone());
        // No receivers is fine: nobody is streaming.
        let _ = self.log.tx.send(d);
    }
}

/// Routes and the mesh IPv4 ([`crate::routes`]): the registry's part.
impl Registry {
    /// Files `rec`'s IPv4 and, if it advertises routes, its id among the routers.
    fn note_routes(&mut self, rec: &PeerRecord) {
        if let Some(a) = rec.ipv4 {
            self.ipv4s.insert(a, rec.id.clone());
        }
        if !rec.ads.is_empty() {
            self.routers.insert(rec.id.clone());
        }
    }

    /// Whether a peer other than `id` holds `a`.
    fn ipv4_taken(&self, a: Ipv4Addr, id: &str) -> bool {
        self.ipv4s.get(&a).is_some_and(|h| {
            h != id
                && (self.peers.get(h).is_some_and(|p| p.ipv4 == Some(a))
                    || self.clients.get(h).is_some_and(|(c, _)| c.ipv4 == a))
        })
    }

    /// The first of `id`'s IPv4 candidates no other peer holds.
    fn allocate_ipv4(&self, id: &str) -> Option<Ipv4Addr> {
        crate::routes::allocate_ipv4(id, |a| self.ipv4_taken(a, id))
    }

    /// The peer holding mesh IPv4 `a`, if any.
    pub fn peer_by_ipv4(&self, a: Ipv4Addr) -> Option<&PeerRecord> {
        let id = self.ipv4s.get(&a)?;
        self.peers.get(id).filter(|p| p.ipv4 == Some(a))
    }

    /// One member of class `c` (every member of a class matches the same selectors).
    fn representative(&self, c: ClassId) -> Option<&PeerRecord> {
        self.members
            .get(c as usize)?
            .iter()
            .find_map(|id| self.peers.get(id))
    }

    /// `p`'s approved routes under the policy in force.
    pub fn approved_routes(&self, p: &PeerRecord) -> Vec<(crate::api::route::Prefix, bool)> {
        if p.ads.is_empty() {
            return Vec::new();
        }
        let policy = self.vis.policy();
        let tags = policy.known_tag_ids(&p.tags);
        let who = crate::policy::Principal {
            identity: &p.identity,
            tags: &tags,
        };
        crate::routes::approved(policy, who, &p.ads)
    }

    /// Fills `e` (`viewer`'s entry for `target`): `routes`/`exit_node` always, `may_use`
    /// only for a `personal` entry (it depends on the viewer's own routes).
    fn decorate(
        &self,
        e: &mut RosterEntry,
        viewer: &PeerRecord,
        target: &PeerRecord,
        personal: bool,
    ) {
        let target_routes = self.approved_routes(target);
        let viewer_routes = if personal {
            self.approved_routes(viewer)
        } else {
            Vec::new()
        };
        if target_routes.is_empty() && viewer_routes.is_empty() {
            return;
        }
        let policy = self.vis.policy();
        let (vt, tt) = (
            policy.known_tag_ids(&viewer.tags),
            policy.known_tag_ids(&target.tags),
        );
        crate::routes::decorate(
            policy,
            e,
            crate::policy::Principal {
                identity: &viewer.identity,
                tags: &vt,
            },
            crate::policy::Principal {
                identity: &target.identity,
                tags: &tt,
            },
            &target_routes,
            &viewer_routes,
        );
    }

    /// The routers with approved routes that see `p`.
    fn live_routers(&self) -> Vec<&PeerRecord> {
        self.routers
            .iter()
            .filter_map(|id| self.peers.get(id))
            .filter(|r| !r.ads.is_empty())
            .collect()
    }

    /// Whether `v` may use some approved route of `p` (by the allow rules naming it).
    fn uses_routes_of(&self, v: &PeerRecord, p: &PeerRecord) -> bool {
        let routes = self.approved_routes(p);
        if routes.is_empty() {
            return false;
        }
        let policy = self.vis.policy();
        let tags = policy.known_tag_ids(&v.tags);
        let who = crate::policy::Principal {
            identity: &v.identity,
            tags: &tags,
        };
        routes
            .iter()
            .any(|(r, exit)| !crate::routes::usable(policy, who, r, *exit).is_empty())
    }

    /// Whether `a` and `b` hold each other through a route only: no ordinary rule shows
    /// one to the other, but one may use an approved route of the other. Symmetric.
    fn route_linked(&self, a: &PeerRecord, b: &PeerRecord) -> bool {
        a.id != b.id
            && !self.vis.visible(a.class, b.class)
            && (self.uses_routes_of(a, b) || self.uses_routes_of(b, a))
    }

    /// Every peer `p` holds (and that holds `p`) through a route only, by peer id: the
    /// routers whose routes `p` may use and, when `p` has approved routes, the members
    /// that may use them (decided once per class).
    fn route_peers(&self, p: &PeerRecord) -> Vec<&PeerRecord> {
        let mut out: std::collections::BTreeMap<&str, &PeerRecord> = Default::default();
        for r in self.live_routers() {
            if self.route_linked(p, r) {
                out.insert(r.id.as_str(), r);
            }
        }
        if !self.approved_routes(p).is_empty() {
            for c in 0..self.vis.len() as ClassId {
                if self.vis.visible(c, p.class) {
                    continue;
                }
                let Some(v) = self.representative(c) else {
                    continue;
                };
                if !self.uses_routes_of(v, p) {
                    continue;
                }
                for id in self.members.get(c as usize).into_iter().flatten() {
                    if let Some(q) = self.peers.get(id).filter(|q| q.id != p.id) {
                        out.insert(q.id.as_str(), q);
                    }
                }
            }
        }
        out.into_values().collect()
    }

    /// The ids of the peers that hold peer `id` through a route only.
    fn route_holders(&self, id: &str) -> BTreeSet<String> {
        self.peers
            .get(id)
            .map(|p| {
                self.route_peers(p)
                    .into_iter()
                    .map(|q| q.id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// After a change of peer `id` (or its removal): every peer in `before` (its route
    /// holders before the change) that no longer holds it in any way gets its
    /// `peer_remove` (reason `reason`).
    fn drop_route_holders(&mut self, id: &str, before: BTreeSet<String>, reason: &str) {
        if before.is_empty() {
            return;
        }
        let after = self.route_holders(id);
        let target = self.peers.get(id);
        let losing: Vec<String> = before
            .into_iter()
            .filter(|q| !after.contains(q))
            .filter(|q| {
                let Some(v) = self.peers.get(q) else {
                    return false;
                };
                let Some(t) = target else {
                    return true;
                };
                // Still seen by an ordinary rule, or (rarely) as a concentrator entry.
                !self.vis.visible(v.class, t.class)
                    && (self.clients.is_empty() || !self.roster(q).iter().any(|e| e.peer_id == id))
            })
            .collect();
        if losing.is_empty() {
            return;
        }
        let frame = Bytes::from(
            SseEvent::PeerRemove(PeerRemove {
                peer_id: id.to_owned(),
                reason: reason.to_owned(),
            })
            .to_frame(self.log.next_id),
        );
        self.push(Payload::Targeted(
            losing.into_iter().map(|q| (q, frame.clone())).collect(),
        ));
    }

    /// Each router that sees `p` (and has approved routes): its own upsert of `p`, with
    /// the `may_use` list only it gets.
    fn router_frames(&self, p: &PeerRecord, event_id: u64) -> Vec<(String, Bytes)> {
        let mut out = Vec::new();
        for r in self.live_routers() {
            if r.id == p.id || self.approved_routes(r).is_empty() {
                continue;
            }
            let rules = match self.vis.port_rules(r.class, p.class) {
                Some(rules) => rules.clone(),
                None if self.route_linked(r, p) => PortRules::default(),
                None => continue,
            };
            let mut e = entry(p, rules);
            self.decorate(&mut e, r, p, true);
            out.push((
                r.id.clone(),
                Bytes::from(SseEvent::PeerUpsert(e).to_frame(event_id)),
            ));
        }
        out
    }

    /// After a policy change: every router with approved routes gets a fresh snapshot
    /// (its `may_use` lists), since class rosters carry none.
    fn resync_routers(&mut self) {
        let ids: Vec<String> = self
            .live_routers()
            .into_iter()
            .filter(|r| !self.approved_routes(r).is_empty())
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            let frames = vec![None; self.vis.len()];
            self.push(Payload::ByClass {
                subject: id,
                frames,
                action: SubjectAction::Resync,
            });
        }
    }

    /// Replaces what peer `id` advertises (validated by the caller), forgetting admin
    /// approvals of prefixes it no longer advertises; announces a change (the peer's own
    /// streams get a snapshot). Returns whether anything changed; `false` for an unknown
    /// peer.
    pub fn set_advertisement(
        &mut self,
        id: &str,
        routes: Vec<crate::api::route::Prefix>,
        exit_node: bool,
        now_ms: u64,
    ) -> bool {
        let before = self.route_holders(id);
        let Some(p) = self.peers.get_mut(id) else {
            return false;
        };
        let mut ads = p.ads.clone();
        ads.replace(routes, exit_node);
        if ads == p.ads {
            return false;
        }
        p.ads = ads;
        if !p.ads.is_empty() {
            self.routers.insert(id.to_owned());
        }
        self.emit_upsert(id, SubjectAction::Resync);
        self.emitted(id, now_ms);
        self.drop_route_holders(id, before, "policy");
        true
    }

    /// Gives peer `id` a mesh IPv4 if it has none (a member stored before IPv4s existed,
    /// seen again at its heartbeat) and announces it. Returns whether it changed.
    pub fn ensure_ipv4(&mut self, id: &str, now_ms: u64) -> bool {
        if self.peers.get(id).is_none_or(|p| p.ipv4.is_some()) {
            return false;
        }
        let Some(a) = self.allocate_ipv4(id) else {
            return false;
        };
        if let Some(p) = self.peers.get_mut(id) {
            p.ipv4 = Some(a);
        }
        self.ipv4s.insert(a, id.to_owned());
        self.emit_upsert(id, SubjectAction::Skip);
        self.emitted(id, now_ms);
        true
    }

    /// Records (`approve`) or withdraws an admin approval of `prefix` of peer `id`.
    /// `None` when the peer does not advertise it; otherwise whether anything changed.
    pub fn set_route_approval(
        &mut self,
        id: &str,
        prefix: crate::api::route::Prefix,
        approve: bool,
        now_ms: u64,
    ) -> Option<bool> {
        let before = self.route_holders(id);
        let p = self.peers.get_mut(id)?;
        if !p.ads.advertises(&prefix) {
            return None;
        }
        let had = p.ads.admin_approved.contains(&prefix);
        if had == approve {
            return Some(false);
        }
        if approve {
            p.ads.admin_approved.push(prefix);
            p.ads.admin_approved.sort();
        } else {
            p.ads.admin_approved.retain(|x| *x != prefix);
        }
        self.emit_upsert(id, SubjectAction::Resync);
        self.emitted(id, now_ms);
        self.drop_route_holders(id, before, "policy");
        Some(true)
    }

    /// Every advertisement, sorted by peer id then prefix (`GET /v1/routes`).
    pub fn route_infos(&self) -> Vec<crate::api::RouteInfo> {
        let policy = self.vis.policy();
        let mut out = Vec::new();
        for p in self.live_routers() {
            let tags = policy.known_tag_ids(&p.tags);
            let who = crate::policy::Principal {
                identity: &p.identity,
                tags: &tags,
            };
            out.extend(crate::routes::infos(
                policy,
                &p.id,
                &p.display_name,
                who,
                &p.ads,
            ));
        }
        out
    }

    /// The advertisement with route id `route_id`: (peer id, prefix).
    pub fn find_route(&self, route_id: &str) -> Option<(String, crate::api::route::Prefix)> {
        self.live_routers().into_iter().find_map(|p| {
            p.ads
                .prefixes()
                .into_iter()
                .find(|(prefix, _)| crate::routes::route_id(&p.id, prefix) == route_id)
                .map(|(prefix, _)| (p.id.clone(), prefix))
        })
    }

    /// Peer `id`'s own advertisements and their state (`RegisterResponse::routes`).
    pub fn own_route_states(&self, id: &str) -> Vec<crate::api::RouteState> {
        let Some(p) = self.peers.get(id) else {
            return Vec::new();
        };
        let policy = self.vis.policy();
        let tags = policy.known_tag_ids(&p.tags);
        let who = crate::policy::Principal {
            identity: &p.identity,
            tags: &tags,
        };
        crate::routes::own_states(policy, who, &p.ads)
    }
}

/// Stock WireGuard clients ([`crate::clients`]): the registry's part.
///
/// A client K served by concentrator C is in rosters only while C is registered with
/// `concentrator: true`. A member V ≠ C the policy lets see K gets K's entry with `via = C`
/// (and C's entry, with empty ports when the policy alone would not show C to V); C gets
/// K with `client: true` and `may_use` (the member addresses K may send to through C),
/// plus every member K sees, each with the /128 and /32 of the clients that member may
/// reach in its `may_use` and the port rules between it and each of them in its
/// `client_ports`. Changes that move these (a mint, a revocation, C coming,
/// going or changing class, a policy change) resync the streams of every member whose
/// roster holds client entries before or after; upserts of members reach concentrators
/// and the viewers of a concentrator's clients as personal entries, like routers'.
impl Registry {
    /// Loads a stored client without any event (at start). `false` for a row no
    /// coordinator writes.
    pub fn load_client(&mut self, row: ClientRow) -> bool {
        if !row.is_sound() {
            return false;
        }
        let class = self.vis.class_of(&row.identity, &row.tags);
        self.ipv4s.insert(row.ipv4, row.peer_id.clone());
        self.clients.insert(row.peer_id.clone(), (row, class));
        true
    }

    /// Puts a committed client in force and resyncs the rosters it changes.
    pub fn add_client(&mut self, row: ClientRow) -> bool {
        let before = self.client_audience();
        if !self.load_client(row) {
            return false;
        }
        self.resync_client_audience(before);
        true
    }

    /// Removes client `id` (revoked): every roster that held it gets its `peer_remove`
    /// (reason `revoked`), and a viewer that held the concentrator only for this client
    /// loses it too; the concentrator's own streams are resynced (its members' `may_use`).
    pub fn remove_client(&mut self, id: &str) -> Option<ClientRow> {
        let (row, class) = self.clients.get(id).cloned()?;
        let conc = self
            .live_concentrator(&row.concentrator)
            .map(|c| c.id.clone());
        let mut holders = BTreeSet::new();
        if let Some(c) = &conc {
            for v in self.vis.viewers_of(class) {
                for m in self.members.get(v as usize).into_iter().flatten() {
                    if m != c {
                        holders.insert(m.clone());
                    }
                }
            }
        }
        self.clients.remove(id);
        if self.ipv4s.get(&row.ipv4).map(String::as_str) == Some(id) {
            self.ipv4s.remove(&row.ipv4);
        }
        let Some(c) = conc else {
            return Some(row);
        };
        let frame = |pid: &str, why: &str| {
            Bytes::from(
                SseEvent::PeerRemove(PeerRemove {
                    peer_id: pid.to_owned(),
                    reason: why.to_owned(),
                })
                .to_frame(self.log.next_id),
            )
        };
        let mut targets = vec![(c.clone(), frame(id, "revoked"))];
        for v in holders {
            targets.push((v.clone(), frame(id, "revoked")));
            if !self.roster(&v).iter().any(|e| e.peer_id == c) {
                targets.push((v, frame(&c, "policy")));
            }
        }
        self.push(Payload::Targeted(targets));
        self.push(Payload::ByClass {
            subject: c,
            frames: vec![None; self.vis.len()],
            action: SubjectAction::Resync,
        });
        Some(row)
    }

    /// A client by peer id.
    pub fn client(&self, id: &str) -> Option<&ClientRow> {
        self.clients.get(id).map(|(c, _)| c)
    }

    /// Every client, by peer id.
    pub fn clients(&self) -> impl Iterator<Item = &ClientRow> {
        self.clients.values().map(|(c, _)| c)
    }

    /// The peer or client holding mesh IPv4 `a`, by id.
    pub fn ipv4_holder(&self, a: Ipv4Addr) -> Option<&str> {
        self.ipv4s
            .get(&a)
            .filter(|h| {
                self.peers.get(*h).is_some_and(|p| p.ipv4 == Some(a))
                    || self.clients.get(*h).is_some_and(|(c, _)| c.ipv4 == a)
            })
            .map(String::as_str)
    }

    /// A free mesh IPv4 for client `id` (the members' allocator and uniqueness).
    pub fn allocate_client_ipv4(&self, id: &str) -> Option<Ipv4Addr> {
        self.allocate_ipv4(id)
    }

    /// Sets whether member `id` serves clients (its heartbeat's `concentrator`); a change
    /// is announced like other member changes. Returns whether it changed.
    pub fn set_concentrator(&mut self, id: &str, on: bool, now_ms: u64) -> bool {
        let Some(old) = self.peers.get(id).cloned() else {
            return false;
        };
        if old.concentrator == on {
            return false;
        }
        let rec = PeerRecord {
            concentrator: on,
            ..old.clone()
        };
        let audience = self.client_audience_if(Some(&old), &rec);
        self.peers.insert(id.to_owned(), rec);
        self.emit_upsert(id, SubjectAction::Resync);
        self.emitted(id, now_ms);
        if let Some(before) = audience {
            self.resync_client_audience(before);
        }
        true
    }

    /// Member `id` if it is registered as a concentrator.
    fn live_concentrator(&self, id: &str) -> Option<&PeerRecord> {
        self.peers.get(id).filter(|p| p.concentrator)
    }

    /// The clients of concentrator `c` (present or not).
    fn served<'a>(&'a self, c: &'a str) -> impl Iterator<Item = &'a (ClientRow, ClassId)> + 'a {
        self.clients
            .values()
            .filter(move |(k, _)| k.concentrator == c)
    }

    /// Every member whose roster holds client entries: each live concentrator with
    /// clients, and each member that sees a client of one.
    fn client_audience(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut classes = BTreeSet::new();
        for (k, kc) in self.clients.values() {
            if self.live_concentrator(&k.concentrator).is_some() {
                out.insert(k.concentrator.clone());
                classes.insert(*kc);
            }
        }
        for kc in classes {
            for v in self.vis.viewers_of(kc) {
                out.extend(self.members.get(v as usize).into_iter().flatten().cloned());
            }
        }
        out
    }

    /// Before `rec` replaces `old`: the client audience, when the change can move client
    /// entries (a concentrator appearing, leaving the role or changing class; any member
    /// changing class while some concentrator serves clients).
    fn client_audience_if(
        &self,
        old: Option<&PeerRecord>,
        rec: &PeerRecord,
    ) -> Option<BTreeSet<String>> {
        if self.clients.is_empty() {
            return None;
        }
        let class_changed = old.is_some_and(|o| o.class != rec.class);
        let role_changed = old.map_or(rec.concentrator, |o| o.concentrator != rec.concentrator);
        let serves = self.served(&rec.id).next().is_some();
        let any_active = self
            .clients
            .values()
            .any(|(k, _)| self.live_concentrator(&k.concentrator).is_some());
        ((serves && (role_changed || class_changed)) || (class_changed && any_active))
            .then(|| self.client_audience())
    }

    /// Resyncs the streams of every member in `before` or in the audience now.
    fn resync_client_audience(&mut self, mut before: BTreeSet<String>) {
        before.extend(self.client_audience());
        let parts: Vec<Payload> = before
            .into_iter()
            .filter(|id| self.peers.contains_key(id))
            .map(|id| Payload::ByClass {
                subject: id,
                frames: vec![None; self.vis.len()],
                action: SubjectAction::Resync,
            })
            .collect();
        match parts.len() {
            0 => {}
            1 => self.push(parts.into_iter().next().unwrap_or(Payload::Batch(vec![]))),
            _ => self.push(Payload::Batch(parts)),
        }
    }

    /// `/128` and `/32` of a client, for `may_use`.
    fn client_prefixes(k: &ClientRow) -> [String; 2] {
        [format!("{}/128", k.ula()), format!("{}/32", k.ipv4)]
    }

    /// Concentrator `c`'s entry for member `p`: the class entry if its class sees `p`,
    /// else an empty-ports one if a client of `c` sees `p`; `may_use` gains the addresses
    /// of `c`'s clients that `p` may open a connection or flow to.
    fn concentrator_entry(&self, c: &PeerRecord, p: &PeerRecord) -> Option<RosterEntry> {
        if c.id == p.id {
            return None;
        }
        let rules = self.vis.port_rules(c.class, p.class);
        let seen = self
            .served(&c.id)
            .any(|(_, kc)| self.vis.visible(p.class, *kc));
        if rules.is_none() && !seen {
            return None;
        }
        // Only clients `p` may open something on: the concentrator admits p → K by
        // address (the stock client filters nothing), replies to K's own flows aside.
        // Each with the rules between `p` and the client (`client_ports`), which the
        // concentrator enforces on what it forwards from `p` to the client.
        let reach: Vec<(&ClientRow, &PortRules)> = self
            .served(&c.id)
            .filter_map(|(k, kc)| {
                let r = self.vis.port_rules(p.class, *kc)?;
                let opens = !(r.outbound.is_empty()
                    && r.outbound_tcp.is_empty()
                    && r.outbound_udp.is_empty());
                opens.then_some((k, r))
            })
            .collect();
        let mut e = entry(p, rules.cloned().unwrap_or_default());
        // Routes and `may_use` also when `c` holds `p` through a route only.
        self.decorate(&mut e, c, p, true);
        for (k, r) in reach {
            e.may_use.extend(Self::client_prefixes(k));
            e.client_ports.push(ClientPorts {
                client: k.peer_id.clone(),
                ports: r.clone(),
            });
        }
        Some(e)
    }

    /// Adds to `out` (viewer `v`'s roster so far) what clients put there.
    fn add_client_entries(&self, v: &PeerRecord, out: &mut Vec<RosterEntry>) {
        if self.clients.is_empty() {
            return;
        }
        let mut at: HashMap<String, usize> = out
            .iter()
            .enumerate()
            .map(|(i, e)| (e.peer_id.clone(), i))
            .collect();
        if v.concentrator && self.served(&v.id).next().is_some() {
            // Its clients, each with what it may send to through v.
            for (k, kc) in self.served(&v.id) {
                let rules = self
                    .vis
                    .port_rules(v.class, *kc)
                    .cloned()
                    .unwrap_or_default();
                let mut e = client_entry(k, rules, true);
                for class in self.vis.visible_from(*kc) {
                    for pid in self.members.get(class as usize).into_iter().flatten() {
                        let Some(p) = self.peers.get(pid).filter(|p| p.id != v.id) else {
                            continue;
                        };
                        e.may_use.push(format!("{}/128", p.ula));
                        if let Some(a) = p.ipv4 {
                            e.may_use.push(format!("{a}/32"));
                        }
                        e.may_use
                            .extend(p.hosted_app_ulas.iter().map(|a| format!("{a}/128")));
                    }
                }
                e.may_use.sort();
                e.may_use.dedup();
                out.push(e);
            }
            // Every member its clients see, with their client addresses in `may_use`.
            let mut seen = BTreeSet::new();
            for (_, kc) in self.served(&v.id) {
                for class in self.vis.visible_from(*kc) {
                    seen.extend(self.members.get(class as usize).into_iter().flatten());
                }
            }
            for pid in seen {
                let Some(p) = self.peers.get(pid).filter(|p| p.id != v.id) else {
                    continue;
                };
                let Some(e) = self.concentrator_entry(v, p) else {
                    continue;
                };
                match at.get(pid) {
                    Some(i) => out[*i] = e,
                    None => {
                        at.insert(pid.clone(), out.len());
                        out.push(e);
                    }
                }
            }
        }
        // Clients of other concentrators that v may see, and their concentrators.
        for (k, kc) in self.clients.values() {
            if k.concentrator == v.id {
                continue;
            }
            let Some(c) = self.live_concentrator(&k.concentrator) else {
                continue;
            };
            let Some(rules) = self.vis.port_rules(v.class, *kc) else {
                continue;
            };
            out.push(client_entry(k, rules.clone(), false));
            if !at.contains_key(&c.id) {
                at.insert(c.id.clone(), out.len());
                out.push(entry(c, PortRules::default()));
            }
        }
    }

    /// Personal upserts of `p` for client rosters: each live concentrator with clients
    /// gets its own entry for `p` (its `may_use`); when `p` is a concentrator, each viewer
    /// of its clients that does not see `p` by class gets `p` with empty ports.
    fn client_frames(&self, p: &PeerRecord, event_id: u64) -> Vec<(String, Bytes)> {
        let mut out = Vec::new();
        if self.clients.is_empty() {
            return out;
        }
        let concentrators: BTreeSet<&str> = self
            .clients
            .values()
            .map(|(k, _)| k.concentrator.as_str())
            .filter(|c| *c != p.id)
            .collect();
        for cid in concentrators {
            let Some(c) = self.live_concentrator(cid) else {
                continue;
            };
            if let Some(e) = self.concentrator_entry(c, p) {
                out.push((
                    c.id.clone(),
                    Bytes::from(SseEvent::PeerUpsert(e).to_frame(event_id)),
                ));
            }
        }
        if p.concentrator {
            let mut viewers = BTreeSet::new();
            for (_, kc) in self.served(&p.id) {
                for v in self.vis.viewers_of(*kc) {
                    if !self.vis.visible(v, p.class) {
                        viewers.extend(self.members.get(v as usize).into_iter().flatten());
                    }
                }
            }
            if !viewers.is_empty() {
                let frame = Bytes::from(
                    SseEvent::PeerUpsert(entry(p, PortRules::default())).to_frame(event_id),
                );
                for v in viewers {
                    if *v != p.id {
                        out.push((v.clone(), frame.clone()));
                    }
                }
            }
        }
        out
    }

    /// Before member `id` is removed: the `peer_remove`s only client rosters need (the
    /// class viewers get theirs from the removal itself), with the id the next dispatch
    /// gets. For a concentrator: each viewer of its clients loses those clients and the
    /// concentrator; for another member: each concentrator whose clients alone made it
    /// see `id` loses it.
    fn client_removals(&self, id: &str, reason: &str) -> Vec<(String, Bytes)> {
        let Some(p) = self.peers.get(id) else {
            return Vec::new();
        };
        if self.clients.is_empty() {
            return Vec::new();
        }
        // The class removal goes out first, so these frames carry the id after it unless
        // both are part of one entry.
        let next = if self.log.entry.is_some() {
            self.log.next_id
        } else {
            self.log.next_id + 1
        };
        let frame = |pid: &str, why: &str| {
            Bytes::from(
                SseEvent::PeerRemove(PeerRemove {
                    peer_id: pid.to_owned(),
                    reason: why.to_owned(),
                })
                .to_frame(next),
            )
        };
        let mut out = Vec::new();
        if p.concentrator {
            for (k, kc) in self.served(id) {
                for v in self.vis.viewers_of(*kc) {
                    for m in self.members.get(v as usize).into_iter().flatten() {
                        if m != id {
                            out.push((m.clone(), frame(&k.peer_id, reason)));
                            if !self.vis.visible(v, p.class) {
                                out.push((m.clone(), frame(id, reason)));
                            }
                        }
                    }
                }
            }
        }
        for (k, _) in self.clients.values() {
            let Some(c) = self.live_concentrator(&k.concentrator) else {
                continue;
            };
            if c.id != id
                && !self.vis.visible(c.class, p.class)
                && self.concentrator_entry(c, p).is_some()
                && !out.iter().any(|(t, _)| *t == c.id)
            {
                out.push((c.id.clone(), frame(id, reason)));
            }
        }
        out
    }
}

/// (peer id, serialized roster entry), shared between class rosters.
pub type SharedEntry = (Arc<str>, Arc<str>);

/// A class's roster after a policy change, including the members of the class itself,
/// with each entry serialized once (in a table shared by every class's frame); each stream
/// leaves out its own entry.
#[derive(Debug)]
pub struct PolicyFrame {
    /// Event id.
    pub id: u64,
    /// Policy revision.
    pub revision: u64,
    /// Every serialized (peer id, entry JSON) of the policy event, for all classes.
    pub table: Arc<[SharedEntry]>,
    /// This class's roster: indices into `table`, sorted by peer id.
    pub entries: Vec<u32>,
}

impl PolicyFrame {
    /// The `policy` frame for the stream of peer `me`.
    pub fn frame_for(&self, me: &str) -> Bytes {
        let entries = || {
            self.entries
                .iter()
                .filter_map(|i| self.table.get(*i as usize))
        };
        let len: usize = entries().map(|(_, j)| j.len() + 1).sum();
        let mut out = String::with_capacity(len + 96);
        out.push_str(&format!(
            "id: {}\nevent: {}\ndata: {{\"policy_revision\":{},\"peers\":[",
            self.id,
            SseEvent::POLICY,
            self.revision
        ));
        let mut first = true;
        for (pid, json) in entries() {
            if &**pid == me {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(json);
        }
        out.push_str("]}\n\n");
        Bytes::from(out)
    }
}

/// The roster entry for `p` with the viewer-relative `rules`.
pub fn entry(p: &PeerRecord, rules: PortRules) -> RosterEntry {
    RosterEntry {
        peer_id: p.id.clone(),
        identity: p.identity.clone(),
        ula: p.ula,
        display_name: p.display_name.clone(),
        tags: p.tags.clone(),
        public_key: p.key_b64.clone(),
        endpoints: p.endpoints.clone(),
        reflexive_endpoint: p.reflexive,
        mapped_endpoints: p.mapped.clone(),
        nat: p.nat,
        home_relay: p.home_relay.clone(),
        hosted_app_ulas: p.hosted_app_ulas.clone(),
        ports: rules,
        stale: p.stale,
        ipv4: p.ipv4,
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

/// The roster entry of client `c` with the viewer-relative `rules`: no endpoints (the
/// unspecified `0.0.0.0:0` as reflexive endpoint), `via` its concentrator unless `served`
/// (then `client: true`, the concentrator's own roster).
pub fn client_entry(c: &ClientRow, rules: PortRules, served: bool) -> RosterEntry {
    RosterEntry {
        peer_id: c.peer_id.clone(),
        identity: c.identity.clone(),
        ula: c.ula(),
        display_name: c.display_name.clone(),
        tags: c.tags.clone(),
        public_key: c.public_key.clone(),
        endpoints: vec![],
        reflexive_endpoint: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        mapped_endpoints: vec![],
        nat: crate::api::NatClass::Unknown,
        home_relay: None,
        hosted_app_ulas: vec![],
        ports: rules,
        stale: false,
        ipv4: Some(c.ipv4),
        routes: vec![],
        exit_node: false,
        may_use: vec![],
        route_ports: vec![],
        may_use_ports: vec![],
        via: (!served).then(|| c.concentrator.clone()),
        client: served,
        client_ports: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let doc: crate::api::PolicyDocument = serde_json::from_value(serde_json::json!({
            "tags": ["node"],
            "allow": [{"src": ["tag:node"], "dst": ["tag:node"]}]
        }))
        .unwrap();
        Registry::new(
            Arc::new(Policy::compile(doc).unwrap()),
            1,
            Limits::default(),
        )
    }

    fn peer(name: &str, port: u16) -> NewPeer {
        NewPeer {
            key: *blake3::hash(name.as_bytes()).as_bytes(),
            identity: name.into(),
            display_name: name.into(),
            tags: vec!["node".into()],
            endpoints: vec![SocketAddr::from(([10, 0, 0, 1], port))],
            wg_listen_port: port,
            reflexive: SocketAddr::from(([10, 0, 0, 1], port)),
            ephemeral: false,
            concentrator: false,
        }
    }

    /// Change-log entries: each is one dispatch with the entry's id, an entry without
    /// events still moves the position, a held preview sends nothing, and resuming from
    /// before the start position needs a snapshot.
    #[test]
    fn entries_take_their_log_ids_and_previews_send_nothing() {
        let mut r = registry();
        r.set_coalescing(false);
        r.start_at(100);
        let mut rx = r.subscribe();
        assert!(r.replay_since(99).is_none(), "before the start position");
        r.begin_entry(Some(105));
        r.upsert(peer("a", 1), 1);
        r.upsert(peer("b", 2), 1);
        r.end_entry();
        let d = rx.try_recv().unwrap();
        assert_eq!(d.id, 105);
        assert!(matches!(d.payload, Payload::Batch(_)));
        assert!(rx.try_recv().is_err(), "one dispatch per entry");
        // A token change: no event, the position moves.
        r.begin_entry(Some(107));
        r.end_entry();
        assert_eq!(r.last_event_id(), 107);
        // A preview: applied, then undone; nothing sent.
        let before = r.peer(&crate::ula::identity_peer_id("a")).cloned();
        r.hold();
        r.upsert(peer("a", 9), 2);
        r.discard();
        r.set_silent(&crate::ula::identity_peer_id("a"), before.clone());
        assert!(rx.try_recv().is_err());
        assert_eq!(r.peer(&crate::ula::identity_peer_id("a")), before.as_ref());
        // Resumption within what this process saw.
        assert_eq!(r.replay_since(100).unwrap().len(), 1);
        assert_eq!(r.replay_since(105).unwrap().len(), 0);
        // An id that went backwards gets the next one instead.
        r.begin_entry(Some(50));
        r.remove(&crate::ula::identity_peer_id("b"), "left");
        r.end_entry();
        assert_eq!(rx.try_recv().unwrap().id, 108);
    }
    /// After a policy change, every stream's `policy` frame holds exactly the roster a
    /// direct evaluation of the policy gives for its peer, pair by pair (random policies
    /// with ports, protocols, denies, groups of `*`, named peers; random tag sets, tags
    /// the new policy dropped): the class-based recompute changes no answer and no order.
    #[test]
    fn policy_frames_agree_with_a_naive_roster_on_random_policies() {
        use crate::policy::Principal;
        use crate::ports::port_rules;
        use crate::sse::{Step, Subscriber};
        let seed = std::cell::Cell::new(0x0dd1_5ca1_ab1e_f00du64);
        let rnd = |n: u64| {
            let mut x = seed.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            seed.set(x);
            x % n
        };
        let names = ["a", "b", "c", "d", "e", "f", "gone"];
        for _ in 0..60 {
            let sel = |with_ports: bool| -> String {
                let base = match rnd(9) {
                    0 => "*".to_string(),
                    1 => format!("peer:n{}", rnd(16)),
                    2 => "group:g".to_string(),
                    _ => format!("tag:{}", names[rnd(6) as usize]),
                };
                if !with_ports || rnd(2) == 0 {
                    return base;
                }
                let p = rnd(40);
                let item = match rnd(3) {
                    0 => format!("tcp:{p}-{}", p + rnd(20)),
                    1 => format!("udp:{p}"),
                    _ => format!("{p}-{}", p + rnd(20)),
                };
                format!("{base}:{item}")
            };
            let rules = |n: u64| -> Vec<crate::api::PolicyRule> {
                (0..n)
                    .map(|_| crate::api::PolicyRule {
                        src: (0..rnd(2) + 1).map(|_| sel(false)).collect(),
                        dst: (0..rnd(3) + 1).map(|_| sel(true)).collect(),
                    })
                    .collect()
            };
            let doc = crate::api::PolicyDocument {
                tags: names[..6].iter().map(|t| t.to_string()).collect(),
                groups: [(
                    "g".to_string(),
                    vec![format!("tag:{}", names[rnd(6) as usize]), "peer:n1".into()],
                )]
                .into(),
                app_hosts: vec![sel(false)],
                allow: rules(rnd(8) + 1),
                deny: rules(rnd(4)),
                routes: Default::default(),
            };
            let new = Arc::new(Policy::compile(doc).unwrap());
            // Peers join under a policy that knows one more tag (dropped by the new one).
            let old: crate::api::PolicyDocument = serde_json::from_value(serde_json::json!({
                "tags": names,
                "allow": [{"src": ["*"], "dst": ["*"]}]
            }))
            .unwrap();
            let mut r = Registry::new(
                Arc::new(Policy::compile(old).unwrap()),
                1,
                Limits::default(),
            );
            r.set_coalescing(false);
            let n = rnd(16) + 2;
            for i in 0..n {
                let mut p = peer(&format!("n{i}"), 1000 + i as u16);
                p.tags = names
                    .iter()
                    .filter(|_| rnd(3) == 0)
                    .map(|t| t.to_string())
                    .collect();
                r.upsert(p, 1);
            }
            let mut rx = r.subscribe();
            r.set_policy(new.clone(), 2);
            let d = rx.try_recv().unwrap();
            let all: Vec<PeerRecord> = r.peers().cloned().collect();
            for me in &all {
                let mut want = Vec::new();
                let km = new.known_tag_ids(&me.tags);
                let pm = Principal {
                    identity: &me.identity,
                    tags: &km,
                };
                for q in all.iter().filter(|q| q.id != me.id) {
                    let kq = new.known_tag_ids(&q.tags);
                    let pq = Principal {
                        identity: &q.identity,
                        tags: &kq,
                    };
                    let (out, inb) = (new.allowed_ports(pm, pq), new.allowed_ports(pq, pm));
                    if !out.is_empty() || !inb.is_empty() {
                        want.push(entry(q, port_rules(&out, &inb)));
                    }
                }
                want.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
                let mut sub = Subscriber {
                    peer_id: me.id.clone(),
                    class: 0,
                    last_id: 0,
                };
                let Step::Send(frame) = sub.step(&d) else {
                    panic!("no policy frame for {}", me.id);
                };
                let text = std::str::from_utf8(&frame).unwrap();
                let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                let got: RosterSnapshot = serde_json::from_str(data).unwrap();
                assert_eq!(got.policy_revision, 2);
                assert_eq!(got.peers, want, "roster of {}", me.identity);
                // The snapshot route agrees with the policy frame.
                assert_eq!(r.roster(&me.id), want);
                let host = new.may_host_apps(pm);
                assert_eq!(r.visibility().may_host_apps(me.class), host);
            }
        }
    }
}
