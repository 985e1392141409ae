//! One WireGuard peer: its `boringtun::noise::Tunn` session state behind a per-peer lock,
//! its endpoint, and its counters.
//!
//! Locking: `Tunn` takes `&mut self` for every call, so each peer has one [`Mutex`] around
//! its [`PeerState`]. Workers take it once per run of consecutive packets for the same peer
//! (a whole TSO super-packet or GRO batch), not per packet. Peers are *not* sharded to
//! cores: the kernel spreads TUN queues and `SO_REUSEPORT` sockets by flow hash, so a
//! peer's packets arrive on any core, and sharding would need cross-core hand-off queues
//! on the hot path. A per-peer lock costs one uncontended atomic per batch; it is contended
//! only when two cores move the same peer's traffic at the same instant, and never blocks
//! other peers. There is no global lock on the hot path.
//!
//! The endpoint and the peer's connection-tracking table live under the same lock (the
//! filter reads and updates the table on every filtered packet, in both directions, while
//! the lock is held anyway).
//!
//! The endpoint lives under the same lock (it is read on every send, which already holds
//! the lock, and updated on roaming, i.e. an authenticated packet from a new address), and
//! so do the path and relay route (`core::path`), read on the same sends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::core::conntrack::{self, FlowTable};
use crate::core::net::IpNet;
use crate::core::path::{DirectProbes, PathKind, RelayRoute};

/// The mutable per-peer state, guarded by [`Peer::lock`].
pub struct PeerState {
    /// The WireGuard session state machine.
    pub tunn: Tunn,
    /// The peer's *direct* endpoint: learned from configuration or from the last
    /// authenticated datagram received straight from the peer (never from a relay frame).
    pub endpoint: Option<SocketAddr>,
    /// The peer's route through a relay, if known: set by the control side, moved by an
    /// authenticated relay frame from the peer (see `core::path`).
    pub relay: Option<RelayRoute>,
    /// Which path sends take (see `core::path::target`).
    pub path: PathKind,
    /// Pinned to the relay (`--force-relay`): an answered direct probe does not upgrade
    /// `path`.
    pub relay_only: bool,
    /// Our outstanding direct probes: only an answer to one of them upgrades `path`
    /// (see `core::path`).
    pub probes: DirectProbes,
    /// Connection tracking for this peer's filtered traffic, both directions (allocated on
    /// its first flow; unused while the peer has no filter).
    pub flows: FlowTable,
}

/// Static description of a peer, as configured (file, UAPI or coordinator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's public key.
    pub public_key: [u8; 32],
    /// Optional pre-shared key.
    pub preshared_key: Option<[u8; 32]>,
    /// Initial endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Inner prefixes routed to this peer and accepted from it.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// A peer as the hot path sees it: immutable identity plus locked session state.
pub struct Peer {
    /// The peer's public key.
    pub public_key: [u8; 32],
    /// Our 24-bit session index for this peer (`receiver_index >> 8` of its packets).
    pub index: u32,
    /// The configuration it was made from (allowed IPs, keepalive, psk).
    pub config: PeerConfig,
    state: Mutex<PeerState>,
    /// Counters for `wg show` and metrics.
    pub stats: PeerStats,
}

/// Per-peer counters (relaxed atomics: written under the peer lock or by one worker).
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Ciphertext bytes received from this peer (authenticated).
    pub rx_bytes: AtomicU64,
    /// Ciphertext bytes sent to this peer.
    pub tx_bytes: AtomicU64,
    /// Unix time (ns) of the last completed handshake, 0 if none.
    pub last_handshake_ns: AtomicU64,
    /// When an authenticated datagram last arrived straight from the peer
    /// ([`crate::core::path::mono_ns`] clock), 0 if never. The peer's direct probes
    /// (pings) and handshake initiations do not count: they say nothing about whether our
    /// sends reach it (its data, keepalives and handshake responses do, in practice: it
    /// sends them direct only once a direct handshake completed).
    pub last_direct_rx_ns: AtomicU64,
    /// When an authenticated relay frame last arrived from the peer
    /// ([`crate::core::path::mono_ns`] clock), 0 if never.
    pub last_relay_rx_ns: AtomicU64,
}

impl PeerStats {
    /// Adds received bytes.
    pub fn add_rx(&self, n: usize) {
        self.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    /// Adds sent bytes.
    pub fn add_tx(&self, n: usize) {
        self.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Peer {
    /// Makes a peer with a fresh session state.
    pub fn new(
        private: &StaticSecret,
        config: PeerConfig,
        index: u32,
        limiter: Arc<RateLimiter>,
    ) -> Arc<Self> {
        let tunn = Tunn::new(
            private.clone(),
            PublicKey::from(config.public_key),
            config.preshared_key,
            config.persistent_keepalive.filter(|k| *k > 0),
            index,
            Some(limiter),
        );
        Arc::new(Self {
            public_key: config.public_key,
            index,
            state: Mutex::new(PeerState {
                tunn,
                endpoint: config.endpoint,
                relay: None,
                path: PathKind::Direct,
                relay_only: false,
                probes: DirectProbes::default(),
                flows: FlowTable::new(
                    conntrack::DEFAULT_CAPACITY,
                    rand_core::RngCore::next_u64(&mut rand_core::OsRng),
                ),
            }),
            config,
            stats: PeerStats::default(),
        })
    }

    /// Locks the session state. A poisoned lock (a panic elsewhere while holding it) is
    /// recovered: the state machine itself stays consistent between calls.
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("index", &self.index)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
