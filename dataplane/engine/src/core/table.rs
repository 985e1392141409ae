//! The peer/route table: what the hot path looks up, published as immutable snapshots.
//!
//! Readers (workers) load the current [`Snapshot`] with one atomic pointer load
//! (`arc-swap`) and never take a lock. Writers (the control side: config at start, UAPI
//! `wg set`, the coordinator roster) serialize among themselves on a writer mutex, build a
//! new snapshot from the old one and publish it (RCU style); workers pick it up at their
//! next batch. Peers are `Arc`s shared between snapshots, so a change to one peer never
//! resets another peer's session.
//!
//! Publication cost: a writer copies the current snapshot's flat parts (a pointer per
//! peer entry — entries are `Arc<PeerEntry>`, shared until changed —, the route trie's node
//! arrays, the key map and the index list) and applies only the change: the changed
//! peer's prefixes are removed from and inserted into the copied trie, and only entries
//! whose AllowedIPs change are copied. Nothing is rebuilt from every peer, so one change
//! costs a few flat copies at any table size (`benches/benches/peers.rs`, issue 17).
//!
//! Prefix ownership (WireGuard's "last claimer wins", made deterministic): a prefix
//! claimed by several peers belongs to the one latest in the peer order (the order peers
//! were added), and is dropped from every earlier claimer's AllowedIPs. Each entry's
//! `allowed_ips` is exactly the prefixes routed to it. The incremental writers keep this
//! as a whole-table rebuild would; the tests check them against one.
//!
//! Lookups a snapshot answers:
//! * inner destination → peer (longest-prefix match over every peer's AllowedIPs),
//! * WireGuard receiver index → peer (`receiver_index >> 8` is the peer's 24-bit index),
//! * public key → peer (handshake initiations, after `parse_handshake_anon`),
//! * allowed-source check after decrypt: the source must route back to the same peer;
//! * local-destination check after decrypt: the destination must be one of this node's
//!   addresses or a prefix it routes ([`LocalNets`]; empty, and so refusing everything,
//!   until a writer sets it with [`Table::set_local`]).
//!
//! A peer's packet filter ([`PortFilter`]) lives in its snapshot entry, not in the shared
//! [`Peer`]: a route lookup hands the pipeline the peer and its filter together, and a
//! writer can change a peer's AllowedIPs and port rules in one published snapshot, so no
//! snapshot ever shows a coordinator peer without its rules.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::core::behind::Behind;
use crate::core::filter::PortFilter;
use crate::core::local::LocalNets;
use crate::core::net::IpNet;
use crate::core::peer::{Peer, PeerConfig};
use crate::core::route::RouteTable;

/// Handshake messages per second before the device answers with cookies (WireGuard §5.3).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// The MAC1 checker every peer's `Tunn` gets: a boringtun [`RateLimiter`] for our key that
/// never reports load. `Tunn::decapsulate` runs its limiter's `verify_packet` on every
/// handshake message, and boringtun offers no public way to hand it a packet already
/// verified (`handle_verified_packet` is `pub(crate)`), so if the `Tunn`s shared the
/// device limiter each message would count twice and cookies would start at half
/// [`HANDSHAKE_RATE_LIMIT`]. Instead the pipeline counts each handshake message once
/// against [`Snapshot::limiter`] (before the Diffie-Hellman), and the `Tunn` checks MAC1
/// again with this one, whose count never reaches its limit (`u64::MAX`: 2^64 messages).
fn mac_checker(public_key: &PublicKey) -> Arc<RateLimiter> {
    Arc::new(RateLimiter::new(public_key, u64::MAX))
}

/// A peer in a snapshot, with the prefixes routed to it.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    /// The shared peer (its session survives snapshots).
    pub peer: Arc<Peer>,
    /// The peer's AllowedIPs, normalized, in configuration order.
    pub allowed_ips: Vec<IpNet>,
    /// The port rules enforced on traffic to and from the peer; `None` passes everything.
    pub filter: Option<Arc<PortFilter>>,
    /// Addresses behind the peer with their own rules and prefixes routed through it
    /// (`core::behind`: clients of a concentrator, a subnet router's or exit node's
    /// routes); `None` for an ordinary peer.
    pub behind: Option<Arc<Behind>>,
    /// The peer's own host addresses, derived from `allowed_ips` and `behind` by
    /// [`PeerEntry::sync_own_hosts`] whenever either changes: the exact /32 and /128
    /// entries of `allowed_ips` that are not routed prefixes, sorted; empty when nothing is
    /// routed through the peer (then [`PeerEntry::filter_for`] never asks).
    own_hosts: Box<[IpNet]>,
}

impl PeerEntry {
    /// The filter for a packet whose remote address (destination on send, source on
    /// receive) is `remote`: that address's own if it is behind the peer, the routed
    /// filter if it is inside a prefix routed through the peer (and not one of the peer's
    /// own host addresses), else the peer's. One branch for a peer with nothing behind it
    /// and no routes.
    #[inline]
    pub fn filter_for(&self, remote: IpAddr) -> Option<&PortFilter> {
        match &self.behind {
            None => self.filter.as_deref(),
            Some(b) => match b.get(remote) {
                Some(f) => Some(f),
                None => match b.routed(remote) {
                    Some(f) if !self.is_own_host(remote) => Some(f),
                    _ => self.filter.as_deref(),
                },
            },
        }
    }

    /// Whether `remote` is one of the peer's own host addresses: an exact /32 or /128 in
    /// its AllowedIPs that is not itself a routed prefix (`core::behind`). A binary search
    /// over the few addresses [`PeerEntry::sync_own_hosts`] derived.
    #[inline]
    fn is_own_host(&self, remote: IpAddr) -> bool {
        !self.own_hosts.is_empty() && self.own_hosts.binary_search(&IpNet::host(remote)).is_ok()
    }

    /// A new entry, its own host addresses derived.
    fn new(
        peer: Arc<Peer>,
        allowed_ips: Vec<IpNet>,
        filter: Option<Arc<PortFilter>>,
        behind: Option<Arc<Behind>>,
    ) -> Self {
        let mut e = PeerEntry {
            peer,
            allowed_ips,
            filter,
            behind,
            own_hosts: Box::default(),
        };
        e.sync_own_hosts();
        e
    }

    /// Derives `own_hosts` again from `allowed_ips` and `behind` (call after changing
    /// either).
    fn sync_own_hosts(&mut self) {
        let hosts: Box<[IpNet]> = match &self.behind {
            Some(b) if b.routes_something() => {
                let mut v: Vec<IpNet> = self
                    .allowed_ips
                    .iter()
                    .filter(|n| {
                        n.prefix_len() == if n.addr().is_ipv4() { 32 } else { 128 }
                            && !b.is_routed_prefix(n)
                    })
                    .copied()
                    .collect();
                v.sort_unstable();
                v.dedup();
                v.into()
            }
            _ => Box::default(),
        };
        if hosts != self.own_hosts {
            self.own_hosts = hosts;
        }
    }
}

/// One immutable view of the device: keys, peers and routes.
pub struct Snapshot {
    /// Our static private key.
    pub private_key: StaticSecret,
    /// Its public key.
    pub public_key: PublicKey,
    /// Device-wide handshake rate limiter (reset about once a second by the timer thread):
    /// the pipeline counts every handshake initiation and response against it exactly
    /// once, before any Diffie-Hellman.
    pub limiter: Arc<RateLimiter>,
    /// The MAC1 checker given to every peer's `Tunn` (never under load; see
    /// `mac_checker`).
    tunn_limiter: Arc<RateLimiter>,
    /// The UDP listen port.
    pub listen_port: u16,
    /// Peers; positions are what `routes` maps to. Entries are shared between snapshots
    /// until a writer changes one.
    pub peers: Vec<Arc<PeerEntry>>,
    /// The destinations decrypted packets may have (this node's addresses, routed prefixes).
    pub local: Arc<LocalNets>,
    routes: RouteTable<u32>,
    by_index: Vec<(u32, u32)>,
    by_key: HashMap<[u8; 32], u32>,
}

impl Snapshot {
    /// The peer that `dst` routes to.
    #[inline]
    pub fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.route_entry(dst).map(|e| &e.peer)
    }

    /// The entry (peer and filter) that `dst` routes to: one lookup for the hot path.
    #[inline]
    pub fn route_entry(&self, dst: IpAddr) -> Option<&PeerEntry> {
        let pos = self.routes.lookup(dst)?;
        self.peers.get(pos as usize).map(|e| &**e)
    }

    /// The peer whose session index matches a received `receiver_index`.
    #[inline]
    pub fn by_receiver(&self, receiver_index: u32) -> Option<&Arc<Peer>> {
        let idx = receiver_index >> 8;
        let i = self.by_index.binary_search_by_key(&idx, |(k, _)| *k).ok()?;
        self.peers.get(self.by_index[i].1 as usize).map(|e| &e.peer)
    }

    /// The peer with this public key.
    pub fn by_key(&self, key: &[u8; 32]) -> Option<&Arc<Peer>> {
        let pos = *self.by_key.get(key)?;
        self.peers.get(pos as usize).map(|e| &e.peer)
    }

    /// Cryptokey routing's source check: does `src` route back to `peer`?
    #[inline]
    pub fn allows_source(&self, peer: &Peer, src: IpAddr) -> bool {
        self.source_entry(peer, src).is_some()
    }

    /// The source check that also hands back `peer`'s entry (for its filter): the entry
    /// `src` routes to, if that is `peer`'s.
    #[inline]
    pub fn source_entry(&self, peer: &Peer, src: IpAddr) -> Option<&PeerEntry> {
        self.route_entry(src).filter(|e| e.peer.index == peer.index)
    }

    /// The receive side's destination check: may a decrypted packet for `dst` be written
    /// to the TUN?
    #[inline]
    pub fn is_local(&self, dst: IpAddr) -> bool {
        self.local.contains(dst)
    }

    /// The receive side's destination check for a packet from `peer`: one of our addresses,
    /// a prefix routed for everyone, or a prefix routed for that peer (`core::local`).
    #[inline]
    pub fn admits_destination(
        &self,
        peer: &Peer,
        dst: IpAddr,
    ) -> Result<(), crate::core::local::Refused> {
        self.local.admits(&peer.public_key, dst)
    }

    /// Every (prefix, peer position) route, for `wg show` and tests.
    pub fn routes(&self) -> &RouteTable<u32> {
        &self.routes
    }
}

/// The published table plus what writers need to build the next snapshot.
pub struct Table {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
    next_index: AtomicU32,
}

/// What a writer asks of the table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    /// The 24-bit session index space is exhausted.
    #[error("no free peer index")]
    NoIndex,
}

impl Table {
    /// A table with our key, listen port and no peers.
    pub fn new(private_key: StaticSecret, listen_port: u16) -> Self {
        let public_key = PublicKey::from(&private_key);
        let limiter = Arc::new(RateLimiter::new(&public_key, HANDSHAKE_RATE_LIMIT));
        let snap = Snapshot {
            private_key,
            public_key,
            limiter,
            tunn_limiter: mac_checker(&public_key),
            listen_port,
            peers: Vec::new(),
            local: Arc::new(LocalNets::default()),
            routes: RouteTable::new(),
            by_index: Vec::new(),
            by_key: HashMap::new(),
        };
        Self {
            current: ArcSwap::from_pointee(snap),
            writer: Mutex::new(()),
            // Random start so indexes differ across restarts (stale packets miss).
            next_index: AtomicU32::new(rand_start()),
        }
    }

    /// The current snapshot (lock-free).
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot as an owned `Arc` (for longer holds off the hot path).
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn write<R>(&self, f: impl FnOnce(&Snapshot) -> (Option<Snapshot>, R)) -> R {
        let _w = match self.writer.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let cur = self.current.load_full();
        let (next, r) = f(&cur);
        if let Some(next) = next {
            self.current.store(Arc::new(next));
        }
        r
    }

    fn alloc_index(&self, taken: &[(u32, u32)]) -> Result<u32, TableError> {
        for _ in 0..(1 << 24) {
            let i = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
            if taken.binary_search_by_key(&i, |(k, _)| *k).is_err() {
                return Ok(i);
            }
        }
        Err(TableError::NoIndex)
    }

    /// Adds a peer or updates the one with the same public key. An existing peer keeps
    /// its session when only its endpoint or AllowedIPs change; a new pre-shared key or
    /// keepalive makes a fresh session. An existing peer keeps its packet filter; a new
    /// peer has none.
    pub fn upsert_peer(&self, cfg: PeerConfig) -> Result<Arc<Peer>, TableError> {
        self.upsert(cfg, None)
    }

    /// [`Table::upsert_peer`] that also sets the peer's packet filter (`None` removes it),
    /// in the same published snapshot: readers see the old peer or the new peer with its
    /// rules, never the new peer without them. The session is kept exactly as
    /// `upsert_peer` keeps it.
    pub fn upsert_peer_with_filter(
        &self,
        cfg: PeerConfig,
        filter: Option<PortFilter>,
    ) -> Result<Arc<Peer>, TableError> {
        self.upsert(cfg, Some((filter.map(Arc::new), None)))
    }

    /// [`Table::upsert_peer_with_filter`] that also sets the addresses behind the peer with
    /// their own filters (`core::behind`; `None` or an empty set: nothing behind), in the
    /// same published snapshot as the AllowedIPs that route those addresses to the peer:
    /// no snapshot routes a client's address to its concentrator without the client's rules.
    pub fn upsert_peer_with_filters(
        &self,
        cfg: PeerConfig,
        filter: Option<PortFilter>,
        behind: Option<Behind>,
    ) -> Result<Arc<Peer>, TableError> {
        let behind = behind.filter(|b| !b.is_empty()).map(Arc::new);
        self.upsert(cfg, Some((filter.map(Arc::new), behind)))
    }

    /// `rules`: `None` keeps an existing peer's filters, `Some((filter, behind))` sets them.
    #[allow(clippy::type_complexity)]
    fn upsert(
        &self,
        cfg: PeerConfig,
        rules: Option<(Option<Arc<PortFilter>>, Option<Arc<Behind>>)>,
    ) -> Result<Arc<Peer>, TableError> {
        self.write(|cur| {
            let allowed: Vec<IpNet> = cfg.allowed_ips.iter().map(|n| n.network()).collect();
            let existing = cur.by_key.get(&cfg.public_key).map(|p| *p as usize);
            let keeps_session = existing.is_some_and(|pos| {
                let c = &cur.peers[pos].peer.config;
                c.preshared_key == cfg.preshared_key
                    && c.persistent_keepalive == cfg.persistent_keepalive
            });
            let mut next = derive(cur);
            let (pos, peer) = match existing {
                Some(pos) if keeps_session => {
                    let p = cur.peers[pos].peer.clone();
                    if let Some(ep) = cfg.endpoint {
                        p.lock().endpoint = Some(ep);
                    }
                    if let Some((f, b)) = rules {
                        let e = Arc::make_mut(&mut next.peers[pos]);
                        e.filter = f;
                        e.behind = b;
                        e.sync_own_hosts();
                    }
                    (pos, p)
                }
                _ => {
                    let index = match self.alloc_index(&cur.by_index) {
                        Ok(i) => i,
                        Err(e) => return (None, Err(e)),
                    };
                    let key = cfg.public_key;
                    let p = Peer::new(&cur.private_key, cfg, index, cur.tunn_limiter.clone());
                    let (filter, behind) = match rules {
                        Some(r) => r,
                        None => existing
                            .map(|pos| {
                                (cur.peers[pos].filter.clone(), cur.peers[pos].behind.clone())
                            })
                            .unwrap_or_default(),
                    };
                    let pos = match existing {
                        // A fresh session in the same place: same prefixes, new index.
                        Some(pos) => {
                            let old = &cur.peers[pos];
                            next.by_index.retain(|(i, _)| *i != old.peer.index);
                            next.peers[pos] = Arc::new(PeerEntry::new(
                                p.clone(),
                                old.allowed_ips.clone(),
                                filter,
                                behind,
                            ));
                            pos
                        }
                        None => {
                            next.peers.push(Arc::new(PeerEntry::new(
                                p.clone(),
                                Vec::new(),
                                filter,
                                behind,
                            )));
                            let pos = next.peers.len() - 1;
                            next.by_key.insert(key, pos as u32);
                            pos
                        }
                    };
                    let at = next.by_index.partition_point(|(i, _)| *i < index);
                    next.by_index.insert(at, (index, pos as u32));
                    (pos, p)
                }
            };
            assign(&mut next, pos, &allowed);
            (Some(next), Ok(peer))
        })
    }

    /// Replaces a peer's AllowedIPs (`replace`) or adds to them.
    pub fn set_allowed_ips(&self, key: &[u8; 32], ips: &[IpNet], replace: bool) -> bool {
        self.write(|cur| {
            let Some(&pos) = cur.by_key.get(key) else {
                return (None, false);
            };
            let pos = pos as usize;
            let mut wanted = if replace {
                Vec::new()
            } else {
                cur.peers[pos].allowed_ips.clone()
            };
            for n in ips {
                let n = n.network();
                if !wanted.contains(&n) {
                    wanted.push(n);
                }
            }
            let mut next = derive(cur);
            assign(&mut next, pos, &wanted);
            (Some(next), true)
        })
    }

    /// Removes a peer; returns whether it existed.
    pub fn remove_peer(&self, key: &[u8; 32]) -> bool {
        self.write(|cur| {
            let Some(&pos) = cur.by_key.get(key) else {
                return (None, false);
            };
            let mut next = derive(cur);
            remove_at(&mut next, pos as usize);
            (Some(next), true)
        })
    }

    /// Removes every peer.
    pub fn clear_peers(&self) {
        self.write(|cur| (Some(rebuild(cur, Vec::new())), ()))
    }

    /// Sets the destinations decrypted packets may have (this node's addresses and the
    /// prefixes it routes), replacing the previous set.
    pub fn set_local(&self, local: LocalNets) {
        let local = Arc::new(local);
        self.write(|cur| {
            let mut next = derive(cur);
            next.local = local;
            (Some(next), ())
        })
    }

    /// Sets the listen port recorded in snapshots (the sockets are the driver's business).
    pub fn set_listen_port(&self, port: u16) {
        self.write(|cur| {
            let mut next = derive(cur);
            next.listen_port = port;
            (Some(next), ())
        })
    }

    /// Changes our private key; every session restarts under the new key.
    pub fn set_private_key(&self, private_key: StaticSecret) {
        self.write(|cur| {
            let public_key = PublicKey::from(&private_key);
            let limiter = Arc::new(RateLimiter::new(&public_key, HANDSHAKE_RATE_LIMIT));
            let tunn_limiter = mac_checker(&public_key);
            for e in &cur.peers {
                e.peer.lock().tunn.set_static_private(
                    private_key.clone(),
                    public_key,
                    Some(tunn_limiter.clone()),
                );
            }
            let mut next = derive(cur);
            next.private_key = private_key;
            next.public_key = public_key;
            next.limiter = limiter;
            next.tunn_limiter = tunn_limiter;
            (Some(next), ())
        })
    }
}

/// The next snapshot's starting point: `cur`'s parts copied flat (entry pointers, trie
/// node arrays, key map, index list); no peer entry is copied.
fn derive(cur: &Snapshot) -> Snapshot {
    Snapshot {
        private_key: cur.private_key.clone(),
        public_key: cur.public_key,
        limiter: cur.limiter.clone(),
        tunn_limiter: cur.tunn_limiter.clone(),
        listen_port: cur.listen_port,
        peers: cur.peers.clone(),
        local: cur.local.clone(),
        routes: cur.routes.clone(),
        by_index: cur.by_index.clone(),
        by_key: cur.by_key.clone(),
    }
}

/// Gives the peer at `pos` the AllowedIPs `wanted` (normalized), under the ownership rule
/// of the module docs: a prefix a later peer holds is not taken (and not listed); a prefix
/// an earlier peer holds moves here and leaves that peer's list; prefixes no longer wanted
/// leave the trie. Touches only the trie paths of those prefixes and the entries whose
/// lists change.
fn assign(next: &mut Snapshot, pos: usize, wanted: &[IpNet]) {
    let me = pos as u32;
    let mut sorted: Vec<IpNet> = wanted.iter().map(|n| n.network()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    for n in &next.peers[pos].allowed_ips {
        if sorted.binary_search(n).is_err() && next.routes.lookup_exact(n) == Some(me) {
            next.routes.remove(*n);
        }
    }
    let mut kept: Vec<IpNet> = Vec::with_capacity(sorted.len());
    let mut seen = vec![false; sorted.len()];
    for n in wanted {
        let n = n.network();
        match sorted.binary_search(&n) {
            Ok(i) if !seen[i] => seen[i] = true,
            _ => continue,
        }
        match next.routes.lookup_exact(&n) {
            Some(q) if q == me => {}
            Some(q) if q > me => continue,
            Some(q) => {
                next.routes.insert(n, me);
                if let Some(e) = next.peers.get_mut(q as usize) {
                    let e = Arc::make_mut(e);
                    e.allowed_ips.retain(|x| *x != n);
                    e.sync_own_hosts();
                }
            }
            None => {
                next.routes.insert(n, me);
            }
        }
        kept.push(n);
    }
    if next.peers[pos].allowed_ips != kept {
        let e = Arc::make_mut(&mut next.peers[pos]);
        e.allowed_ips = kept;
        e.sync_own_hosts();
    }
}

/// Removes the peer at `pos` with its prefixes; later peers move down one place (their
/// positions in the trie, the key map and the index list with them).
fn remove_at(next: &mut Snapshot, pos: usize) {
    let me = pos as u32;
    let e = next.peers.remove(pos);
    for n in &e.allowed_ips {
        if next.routes.lookup_exact(n) == Some(me) {
            next.routes.remove(*n);
        }
    }
    next.by_key.remove(&e.peer.public_key);
    next.by_index.retain(|(_, p)| *p != me);
    if pos < next.peers.len() {
        let down = |v: u32| if v > me { v - 1 } else { v };
        next.routes.map_values(down);
        for v in next.by_key.values_mut() {
            *v = down(*v);
        }
        for (_, v) in &mut next.by_index {
            *v = down(*v);
        }
    }
}

/// A snapshot built from scratch from `peers` (their lists in order, the ownership rule
/// applied): for clearing the table, and the reference the incremental writers are
/// tested against.
fn rebuild(cur: &Snapshot, peers: Vec<Arc<PeerEntry>>) -> Snapshot {
    let mut routes = RouteTable::new();
    let mut by_index = Vec::with_capacity(peers.len());
    let mut by_key = HashMap::with_capacity(peers.len());
    for (pos, e) in peers.iter().enumerate() {
        let pos = pos as u32;
        for n in &e.allowed_ips {
            // WireGuard semantics: a prefix belongs to the last peer that claimed it.
            routes.insert(*n, pos);
        }
        by_index.push((e.peer.index, pos));
        by_key.insert(e.peer.public_key, pos);
    }
    // A prefix moved to a later peer must leave the earlier one's list too.
    let mut peers = peers;
    for (pos, e) in peers.iter_mut().enumerate() {
        if e.allowed_ips
            .iter()
            .any(|n| routes.lookup_exact(n) != Some(pos as u32))
        {
            let e = Arc::make_mut(e);
            e.allowed_ips
                .retain(|n| routes.lookup_exact(n) == Some(pos as u32));
            e.sync_own_hosts();
        }
    }
    by_index.sort_unstable();
    Snapshot {
        private_key: cur.private_key.clone(),
        public_key: cur.public_key,
        limiter: cur.limiter.clone(),
        tunn_limiter: cur.tunn_limiter.clone(),
        listen_port: cur.listen_port,
        peers,
        local: cur.local.clone(),
        routes,
        by_index,
        by_key,
    }
}

fn rand_start() -> u32 {
    let mut b = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn cfg(key: u8, net: &str) -> PeerConfig {
        PeerConfig {
            public_key: [key; 32],
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec![net.parse().unwrap()],
            persistent_keepalive: None,
        }
    }

    fn web() -> PortFilter {
        PortFilter::from_ranges(&[(443, 443)], &[(8730, 8730)])
    }

    fn filter_of(t: &Table, dst: &str) -> Option<Arc<PortFilter>> {
        t.load()
            .route_entry(dst.parse().unwrap())
            .unwrap()
            .filter
            .clone()
    }

    /// The own host addresses `filter_for` keeps out of the routed filter follow every
    /// writer: the upsert that sets the routes, another peer taking a host, AllowedIPs
    /// replaced.
    #[test]
    fn own_hosts_follow_allowed_ips_and_routes() {
        let t = Table::new(StaticSecret::from([9u8; 32]), 1);
        let lan: IpNet = "10.1.0.0/16".parse().unwrap();
        let mut c = cfg(1, "10.1.0.1/32");
        c.allowed_ips.push(lan);
        c.allowed_ips.push("10.1.0.2/32".parse().unwrap());
        let behind = Behind::new([]).with_routed([lan]);
        t.upsert_peer_with_filters(c, Some(web()), Some(behind))
            .unwrap();
        let routed = |dst: &str| {
            let snap = t.load();
            let e = snap.route_entry(dst.parse().unwrap()).unwrap();
            e.filter_for(dst.parse().unwrap()) != e.filter.as_deref()
        };
        assert!(!routed("10.1.0.1"), "an own host keeps the peer's rules");
        assert!(!routed("10.1.0.2"));
        assert!(routed("10.1.0.3"), "the LAN gets the routed filter");
        // Another peer takes 10.1.0.2/32: no longer an own host of the router.
        t.upsert_peer(cfg(2, "10.1.0.2/32")).unwrap();
        let snap = t.load();
        let router = snap.by_key(&[1; 32]).unwrap();
        let e = snap
            .peers
            .iter()
            .find(|e| Arc::ptr_eq(&e.peer, router))
            .unwrap();
        assert!(e.filter_for("10.1.0.2".parse().unwrap()) != e.filter.as_deref());
        drop(snap);
        // Replaced AllowedIPs without the host: 10.1.0.1 is routed now.
        assert!(t.set_allowed_ips(&[1; 32], &[lan], true));
        assert!(routed("10.1.0.1"));
    }

    #[test]
    fn filter_is_set_kept_and_cleared() {
        let t = Table::new(StaticSecret::from([9u8; 32]), 1);
        // A new peer through upsert_peer has none.
        t.upsert_peer(cfg(1, "10.0.0.1/32")).unwrap();
        assert!(filter_of(&t, "10.0.0.1").is_none());

        let p = t
            .upsert_peer_with_filter(cfg(2, "10.0.0.2/32"), Some(web()))
            .unwrap();
        assert_eq!(filter_of(&t, "10.0.0.2").as_deref(), Some(&web()));
        let snap = t.load();
        let e = snap.route_entry("10.0.0.2".parse().unwrap()).unwrap();
        assert!(Arc::ptr_eq(&e.peer, &p));
        assert!(Arc::ptr_eq(
            snap.route("10.0.0.2".parse().unwrap()).unwrap(),
            &p
        ));
        drop(snap);

        // Plain upsert (new AllowedIPs) keeps both the session and the filter.
        let same = t.upsert_peer(cfg(2, "10.0.1.0/24")).unwrap();
        assert!(Arc::ptr_eq(&same, &p), "session kept");
        assert_eq!(filter_of(&t, "10.0.1.7").as_deref(), Some(&web()));
        assert!(t.load().route_entry("10.0.0.2".parse().unwrap()).is_none());

        // New rules on the same session.
        let other = PortFilter::from_ranges(&[(0, 65535)], &[]);
        let same = t
            .upsert_peer_with_filter(cfg(2, "10.0.1.0/24"), Some(other.clone()))
            .unwrap();
        assert!(Arc::ptr_eq(&same, &p), "session kept");
        assert_eq!(filter_of(&t, "10.0.1.7").as_deref(), Some(&other));

        // A new pre-shared key makes a fresh session; upsert_peer still keeps the filter.
        let mut psk = cfg(2, "10.0.1.0/24");
        psk.preshared_key = Some([7u8; 32]);
        let fresh = t.upsert_peer(psk.clone()).unwrap();
        assert!(!Arc::ptr_eq(&fresh, &p));
        assert_eq!(filter_of(&t, "10.0.1.7").as_deref(), Some(&other));

        // Other writers keep it too.
        assert!(t.set_allowed_ips(&[2; 32], &["10.0.2.0/24".parse().unwrap()], false));
        assert_eq!(filter_of(&t, "10.0.2.1").as_deref(), Some(&other));
        t.set_listen_port(2);
        assert_eq!(filter_of(&t, "10.0.2.1").as_deref(), Some(&other));

        // `None` removes it, and the untouched peer never had one.
        let same = t.upsert_peer_with_filter(psk, None).unwrap();
        assert!(Arc::ptr_eq(&same, &fresh));
        assert!(filter_of(&t, "10.0.1.7").is_none());
        assert!(filter_of(&t, "10.0.0.1").is_none());
    }

    #[test]
    fn source_entry_is_the_senders_own() {
        let t = Table::new(StaticSecret::from([9u8; 32]), 1);
        let a = t
            .upsert_peer_with_filter(cfg(1, "10.0.0.1/32"), Some(web()))
            .unwrap();
        let b = t.upsert_peer(cfg(2, "10.0.0.2/32")).unwrap();
        let snap = t.load();
        let e = snap.source_entry(&a, "10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(e.filter.as_deref(), Some(&web()));
        assert!(snap.source_entry(&b, "10.0.0.1".parse().unwrap()).is_none());
        assert!(snap.source_entry(&a, "10.9.9.9".parse().unwrap()).is_none());
        assert!(snap.allows_source(&b, "10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn local_set_fails_closed_and_survives_peer_changes() {
        let t = Table::new(StaticSecret::from([9u8; 32]), 1);
        let me: IpAddr = "fd5a:1f00:1:2:3::1".parse().unwrap();
        assert!(!t.load().is_local(me), "empty until set");
        t.set_local(LocalNets::new([me], []));
        t.upsert_peer(cfg(1, "fd5a:1f00:9:9:9::1/128")).unwrap();
        t.set_listen_port(7);
        assert!(t.remove_peer(&[1; 32]));
        let snap = t.load();
        assert!(snap.is_local(me));
        assert!(!snap.is_local("fd5a:1f00:9:9:9::1".parse().unwrap()));
    }

    /// Everything a snapshot answers, in comparable form: per position the peer's key,
    /// index, AllowedIPs and filter pointer; every route; both maps.
    #[allow(clippy::type_complexity)]
    fn view(
        s: &Snapshot,
    ) -> (
        Vec<([u8; 32], u32, Vec<IpNet>, Option<usize>)>,
        Vec<(IpNet, u32)>,
        Vec<(u32, u32)>,
        Vec<([u8; 32], u32)>,
    ) {
        let peers = s
            .peers
            .iter()
            .map(|e| {
                (
                    e.peer.public_key,
                    e.peer.index,
                    e.allowed_ips.clone(),
                    e.filter.as_ref().map(|f| Arc::as_ptr(f) as usize),
                )
            })
            .collect();
        let mut keys: Vec<([u8; 32], u32)> = s.by_key.iter().map(|(k, v)| (*k, *v)).collect();
        keys.sort_unstable();
        (peers, s.routes.iter().collect(), s.by_index.clone(), keys)
    }

    /// Issue 17 (table publication at 10,000 peers): the incremental writers publish
    /// exactly what a whole-table rebuild from the same peer lists would, under random
    /// upserts (new peers, endpoint-only changes, fresh sessions), AllowedIPs changes
    /// (replace and add) and removals, with prefixes that overlap between peers so that
    /// claims move prefixes both ways — the case where a member claims another's address
    /// (the ownership rule must not depend on which writer ran).
    #[test]
    fn incremental_writers_match_a_full_rebuild() {
        // A deterministic xorshift: no dependency, the same sequence every run.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        // A small pool, so that claims collide often.
        let pool: Vec<IpNet> = [
            "10.0.0.1/32",
            "10.0.0.2/32",
            "10.0.0.0/24",
            "10.0.0.0/8",
            "10.0.1.0/24",
            "0.0.0.0/0",
            "fd5a:1f00:1::1/128",
            "fd5a:1f00:2::1/128",
            "fd5a:1f00::/32",
            "::/0",
            "10.0.0.1/32",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let t = Table::new(StaticSecret::from([9u8; 32]), 1);
        let nets = |rnd: &mut dyn FnMut(u64) -> u64| -> Vec<IpNet> {
            (0..rnd(4))
                .map(|_| pool[rnd(pool.len() as u64) as usize])
                .collect()
        };
        for step in 0..3000 {
            let key = rnd(12) as u8 + 1;
            match rnd(6) {
                0 | 1 => {
                    let mut c = cfg(key, "10.9.9.9/32");
                    c.allowed_ips = nets(&mut rnd);
                    c.endpoint = Some(SocketAddr::from(([192, 0, 2, 1], step as u16)));
                    if rnd(4) == 0 {
                        c.persistent_keepalive = Some(rnd(3) as u16);
                    }
                    if rnd(3) == 0 {
                        t.upsert_peer_with_filter(c, Some(web())).unwrap();
                    } else {
                        t.upsert_peer(c).unwrap();
                    }
                }
                2 | 3 => {
                    let n = nets(&mut rnd);
                    t.set_allowed_ips(&[key; 32], &n, rnd(2) == 0);
                }
                4 => {
                    t.remove_peer(&[key; 32]);
                }
                _ => {
                    if rnd(20) == 0 {
                        t.clear_peers();
                    } else {
                        t.set_listen_port(step as u16);
                    }
                }
            }
            let snap = t.load_full();
            let reference = rebuild(&snap, snap.peers.clone());
            assert_eq!(view(&snap), view(&reference), "step {step}");
            for (pos, e) in snap.peers.iter().enumerate() {
                for n in &e.allowed_ips {
                    assert_eq!(snap.routes.lookup_exact(n), Some(pos as u32), "step {step}");
                }
            }
            assert_eq!(
                snap.routes.len(),
                snap.peers
                    .iter()
                    .map(|e| e.allowed_ips.len())
                    .sum::<usize>(),
                "step {step}: every route is some peer's, once"
            );
        }
    }

    /// A publication shares every entry it does not change with the previous snapshot:
    /// one peer's change copies pointers, not peers.
    #[test]
    fn a_change_copies_only_the_changed_entry() {
        let t = Table::new(StaticSecret::from([9u8; 32]), 1);
        for i in 1..=50u8 {
            t.upsert_peer(cfg(i, &format!("10.0.0.{i}/32"))).unwrap();
        }
        let before = t.load_full();
        assert!(t.set_allowed_ips(&[7; 32], &["10.7.0.0/16".parse().unwrap()], false));
        let after = t.load_full();
        let shared = before
            .peers
            .iter()
            .zip(after.peers.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(shared, 49, "only peer 7's entry is new");
        assert!(Arc::ptr_eq(&before.peers[6].peer, &after.peers[6].peer));
        assert!(t.remove_peer(&[3; 32]));
        let removed = t.load_full();
        assert_eq!(removed.peers.len(), 49);
        assert!(Arc::ptr_eq(&removed.peers[2], &after.peers[3]));
        assert_eq!(
            removed
                .route("10.0.0.50".parse().unwrap())
                .map(|p| p.public_key),
            Some([50; 32]),
            "positions renumbered after a removal"
        );
        assert_eq!(
            removed.by_key(&[50; 32]).map(|p| p.public_key),
            Some([50; 32])
        );
    }

    #[test]
    fn readers_never_see_a_filtered_peer_without_its_filter() {
        let t = Arc::new(Table::new(StaticSecret::from([9u8; 32]), 1));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU32::new(0));
        let reader = {
            let (t, stop, seen) = (t.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let dst: IpAddr = "10.0.0.2".parse().unwrap();
                let mut bad = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(e) = t.load().route_entry(dst) {
                        seen.fetch_add(1, Ordering::Relaxed);
                        bad += u32::from(e.filter.is_none());
                    }
                }
                bad
            })
        };
        for _ in 0..2000 {
            t.upsert_peer_with_filter(cfg(2, "10.0.0.2/32"), Some(web()))
                .unwrap();
            assert!(t.remove_peer(&[2; 32]));
        }
        // End with the peer present until the reader has looked at it at least once.
        t.upsert_peer_with_filter(cfg(2, "10.0.0.2/32"), Some(web()))
            .unwrap();
        while seen.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        let bad = reader.join().unwrap();
        assert_eq!(bad, 0, "snapshots with the peer but without its filter");
    }
}
