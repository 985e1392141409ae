//! The simulation: engine cores on a simulated network, driven event by event on the
//! mock clock.
//!
//! Each [`Sim`] node is the engine as the io_uring driver runs it, minus the kernel: a
//! [`Table`] (our key and the peers, each a `Tunn` in `core::peer`), one [`Pipeline`]
//! (`on_tun` for application packets, `on_udp` for datagrams) with the driver's
//! [`TX_SLOTS`] GSO send slots, and the driver's [`Timers`] ticking every [`TICK`] at its
//! own phase. What the pipeline queues in its `TxBatch` goes to the [`Network`], cut into
//! datagrams as the kernel cuts a GSO send; what it delivers goes to the [`Ledger`]. A
//! receive that runs out of send slots is counted as `NoBuffer`, as the driver counts it
//! (what boringtun still holds stays in its queue).
//!
//! Event order: [`Sim::advance`] repeatedly takes the earliest of the next datagram due
//! and the next timer tick (datagrams first at a tie, lower node first among ticks), moves
//! the clock there and runs it. Application sends happen at the current time, between
//! advances. Every decision comes from the mock clock and the seeded RNG; the only real
//! randomness is boringtun's (ephemeral keys, session indexes) and the table's index base,
//! whose values never change the course of a run: one seed, one history.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use boringtun::x25519::{PublicKey, StaticSecret};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tabbify_engine::core::counters::{DropCounters, DropReason};
use tabbify_engine::core::local::LocalNets;
use tabbify_engine::core::net::IpNet;
use tabbify_engine::core::peer::{Peer, PeerConfig};
use tabbify_engine::core::pipeline::{Pipeline, TunSink};
use tabbify_engine::core::table::Table;
use tabbify_engine::driver::timers::{Timers, TICK};
use tabbify_engine::driver::uring::TX_SLOTS;

use crate::clock::Clock;
use crate::ledger::{carries_packet, Ledger, Report, KEEPALIVE_LEN, MAGIC};
use crate::net::{Datagram, Impairments, NetDrop, Network};

/// The environment variable that replays a seed.
pub const SEED_ENV: &str = "TABBIFY_SIM_SEED";

/// The seed for the simulation `name`: [`SEED_ENV`] if set (decimal or `0x` hex), a
/// random one otherwise. Printed either way, so a failure replays.
pub fn seed(name: &str) -> u64 {
    let from_env = std::env::var(SEED_ENV).ok().and_then(|s| {
        let s = s.trim();
        match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    });
    let seed = from_env.unwrap_or_else(rand::random);
    eprintln!(
        "{name}: seed {seed} (replay: {SEED_ENV}={seed} cargo nextest run \
         --manifest-path dataplane/sim/Cargo.toml -E 'test(={name})')"
    );
    seed
}

/// What a datagram is, from its WireGuard message type and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Handshake initiation.
    Init,
    /// Handshake response.
    Response,
    /// Cookie reply.
    Cookie,
    /// Data message without payload.
    Keepalive,
    /// Data message carrying a packet.
    Data,
    /// Anything else.
    Other,
}

impl Kind {
    /// Classifies a datagram.
    pub fn of(datagram: &[u8]) -> Self {
        match datagram.first() {
            Some(1) => Self::Init,
            Some(2) => Self::Response,
            Some(3) => Self::Cookie,
            Some(4) if datagram.len() == KEEPALIVE_LEN => Self::Keepalive,
            Some(4) => Self::Data,
            _ => Self::Other,
        }
    }
}

/// Which engine call produced a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `Pipeline::on_tun`: an application packet.
    App,
    /// `Pipeline::on_udp`: an answer to a received datagram, or a queue flush.
    Net,
    /// `Timers::tick`.
    Timer,
}

/// One datagram a node sent.
#[derive(Clone, Debug)]
pub struct Sent {
    /// When.
    pub at: Duration,
    /// The sending node.
    pub node: usize,
    /// Destination address.
    pub to: SocketAddr,
    /// Message kind.
    pub kind: Kind,
    /// The engine call it came from.
    pub origin: Origin,
    /// What the network did: copies on their way, or the drop.
    pub fate: Result<u32, NetDrop>,
    /// The datagram.
    pub bytes: Vec<u8>,
}

/// Per-node options.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeOptions {
    /// Behind a NAT (its public address differs from its socket's and can rebind).
    pub nat: bool,
}

struct Inbox(Vec<Vec<u8>>);

impl TunSink for Inbox {
    fn push(&mut self, pkt: &[u8]) -> bool {
        self.0.push(pkt.to_vec());
        true
    }
}

struct Node {
    public: [u8; 32],
    ula: Ipv6Addr,
    table: Arc<Table>,
    pipe: Pipeline,
    timers: Timers,
    next_tick: Duration,
    counters: Arc<DropCounters>,
    inbox: Inbox,
    next_seq: u64,
}

/// A simulation: nodes, the network, the clock, the ledger and the trace of every send.
pub struct Sim {
    /// The seed this run was made from.
    pub seed: u64,
    /// The network (its impairments may change mid-run).
    pub net: Network,
    clock: Clock,
    rng: StdRng,
    nodes: Vec<Node>,
    ledger: Ledger,
    trace: Vec<Sent>,
}

impl Sim {
    /// An empty simulation from `seed` over a network with `impairments`.
    pub fn new(seed: u64, impairments: Impairments) -> Self {
        Self {
            seed,
            net: Network::new(impairments),
            clock: Clock::new(),
            rng: StdRng::seed_from_u64(seed),
            nodes: Vec::new(),
            ledger: Ledger::default(),
            trace: Vec::new(),
        }
    }

    /// Adds a node (a fresh key, a ULA, one engine core). Returns its number.
    pub fn add_node(&mut self, opts: NodeOptions) -> usize {
        let id = self.net.add_host(opts.nat);
        let key = StaticSecret::from(self.rng.gen::<[u8; 32]>());
        let public = PublicKey::from(&key).to_bytes();
        let table = Arc::new(Table::new(key, self.net.local(id).port()));
        let counters = Arc::new(DropCounters::default());
        let ula = Ipv6Addr::new(
            0xfd5a,
            0x1f00,
            0,
            0,
            0,
            0,
            0,
            u16::try_from(id + 1).unwrap_or(0),
        );
        // The node's ULA is its own address: decrypted packets for it are delivered.
        table.set_local(LocalNets::new([IpAddr::V6(ula)], []));
        // Timer phases differ per node, as real timer threads started at different times.
        let phase = TICK.mul_f64(self.rng.gen::<f64>());
        self.nodes.push(Node {
            public,
            ula,
            table,
            pipe: Pipeline::new(counters.clone(), false, true, TX_SLOTS),
            timers: Timers::new(self.clock.instant()),
            next_tick: self.clock.now() + phase,
            counters,
            inbox: Inbox(Vec::new()),
            next_seq: 0,
        });
        id
    }

    /// Makes `a` and `b` peers of each other, each with the other's public address as
    /// endpoint and the given persistent keepalives (seconds).
    pub fn connect(
        &mut self,
        a: usize,
        b: usize,
        keepalive_a: Option<u16>,
        keepalive_b: Option<u16>,
    ) {
        self.add_peer(a, b, keepalive_a);
        self.add_peer(b, a, keepalive_b);
    }

    fn add_peer(&mut self, at: usize, peer: usize, keepalive: Option<u16>) {
        let cfg = PeerConfig {
            public_key: self.nodes[peer].public,
            preshared_key: None,
            endpoint: Some(self.net.public(peer)),
            allowed_ips: vec![IpNet::host(IpAddr::V6(self.nodes[peer].ula))],
            persistent_keepalive: keepalive,
        };
        if let Err(e) = self.nodes[at].table.upsert_peer(cfg) {
            panic!("node {at}: adding peer {peer}: {e}");
        }
    }

    /// Simulated time since the start.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// Sends one application packet of `payload` bytes (at least 14) from `from` to `to`
    /// through `from`'s engine, now. Returns its sequence number.
    pub fn send(&mut self, from: usize, to: usize, payload: usize) -> u64 {
        let seq = self.nodes[from].next_seq;
        self.nodes[from].next_seq += 1;
        let pkt = self.packet(from, to, seq, payload);
        self.ledger.sent(from, seq, to, &pkt);
        let node = &mut self.nodes[from];
        let before = counts(&node.counters);
        let snap = node.table.load_full();
        let mut buf = pkt.clone();
        node.pipe.set_now(secs(self.clock.now()));
        if node.pipe.on_tun(&snap, &mut buf).is_err() {
            self.ledger
                .violation(format!("node {from}: send batch full"));
        }
        let out = take_tx(&mut self.nodes[from].pipe);
        let drops = delta(&before, &counts(&self.nodes[from].counters));
        let n = self.emit(from, Origin::App, out);
        self.ledger.on_tun_outcome(&drops, n);
        seq
    }

    /// An IPv6/UDP packet from `from`'s ULA to `to`'s whose payload names it.
    fn packet(&mut self, from: usize, to: usize, seq: u64, payload: usize) -> Vec<u8> {
        let payload = payload.max(14);
        let udp_len = 8 + payload;
        let mut p = vec![0u8; 40 + udp_len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&u16::try_from(udp_len).unwrap_or(u16::MAX).to_be_bytes());
        p[6] = 17;
        p[7] = 64;
        p[8..24].copy_from_slice(&self.nodes[from].ula.octets());
        p[24..40].copy_from_slice(&self.nodes[to].ula.octets());
        p[40..42].copy_from_slice(&40_000u16.to_be_bytes());
        p[42..44].copy_from_slice(&9u16.to_be_bytes());
        p[44..46].copy_from_slice(&u16::try_from(udp_len).unwrap_or(u16::MAX).to_be_bytes());
        p[48..52].copy_from_slice(MAGIC);
        p[52..54].copy_from_slice(&u16::try_from(from).unwrap_or(u16::MAX).to_be_bytes());
        p[54..62].copy_from_slice(&seq.to_be_bytes());
        self.rng.fill(&mut p[62..]);
        p
    }

    /// Hands a node's datagrams to the network and the trace; returns how many carried a
    /// packet.
    fn emit(&mut self, node: usize, origin: Origin, out: Vec<(SocketAddr, Vec<u8>)>) -> usize {
        let now = self.clock.now();
        let mut packets = 0;
        for (to, bytes) in out {
            let (id, fate) = self.net.send(&mut self.rng, now, node, to, &bytes);
            if carries_packet(&bytes) {
                packets += 1;
                self.ledger.datagram_sent(id, fate);
            }
            self.trace.push(Sent {
                at: now,
                node,
                to,
                kind: Kind::of(&bytes),
                origin,
                fate,
                bytes,
            });
        }
        packets
    }

    /// Runs the network and the timers for `d` of simulated time.
    pub fn advance(&mut self, d: Duration) {
        let end = self.clock.now() + d;
        loop {
            let tick = self
                .nodes
                .iter()
                .enumerate()
                .min_by_key(|(_, n)| n.next_tick)
                .map(|(i, n)| (i, n.next_tick));
            let due = self.net.next_due();
            let next = match (due, tick) {
                (Some(d), Some((_, t))) => d.min(t),
                (Some(d), None) => d,
                (None, Some((_, t))) => t,
                (None, None) => break,
            };
            if next > end {
                break;
            }
            self.clock.advance_to(next);
            if due == Some(next) {
                if let Some(d) = self.net.pop_due(next) {
                    self.deliver(d);
                }
            } else if let Some((i, _)) = tick {
                self.tick(i);
            }
        }
        self.clock.advance_to(end);
    }

    /// Advances in `step`s until `done` holds or `limit` has passed; returns the time it
    /// first held.
    pub fn advance_until(
        &mut self,
        limit: Duration,
        step: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let end = self.now() + limit;
        while self.now() < end {
            if done(self) {
                return Some(self.now());
            }
            self.advance(step);
        }
        done(self).then(|| self.now())
    }

    fn tick(&mut self, i: usize) {
        let now = self.clock.instant();
        let node = &mut self.nodes[i];
        node.next_tick += TICK;
        let snap = node.table.load_full();
        let mut out = Vec::new();
        node.timers.tick(now, &snap, &node.counters, |ep, d| {
            out.push((ep, d.to_vec()));
            true
        });
        let n = self.emit(i, Origin::Timer, out);
        self.ledger.released(n);
    }

    fn deliver(&mut self, d: Datagram) {
        let packet = carries_packet(&d.bytes);
        let at = match self.net.resolve(d.to) {
            Ok(h) => h,
            Err(r) => {
                if packet {
                    self.ledger.copy_lost(d.id, r);
                }
                return;
            }
        };
        let (delivered, drops) = self.receive(at, d.from, &d.bytes);
        if packet {
            self.ledger.copy_received(d.id, delivered, &drops);
        }
    }

    /// Runs one datagram through node `at`'s engine; returns the packets it delivered and
    /// the drops it counted.
    fn receive(
        &mut self,
        at: usize,
        from: SocketAddr,
        bytes: &[u8],
    ) -> (usize, Vec<(DropReason, u64)>) {
        let node = &mut self.nodes[at];
        let before = counts(&node.counters);
        let snap = node.table.load_full();
        node.pipe.set_now(secs(self.clock.now()));
        if node
            .pipe
            .on_udp(&snap, from, bytes, None, &mut node.inbox)
            .is_err()
        {
            node.counters.add(DropReason::NoBuffer);
        }
        let out = take_tx(&mut node.pipe);
        let drops = delta(&before, &counts(&node.counters));
        let inbox = std::mem::take(&mut node.inbox.0);
        for p in &inbox {
            self.ledger.delivered(at, p);
        }
        let n = self.emit(at, Origin::Net, out);
        self.ledger.released(n);
        (inbox.len(), drops)
    }

    /// Hands `bytes` to node `at` as if from `from`, outside the network (a replayed or
    /// long-delayed datagram). Returns the drops it counted.
    pub fn inject(&mut self, at: usize, from: SocketAddr, bytes: &[u8]) -> Vec<(DropReason, u64)> {
        self.receive(at, from, bytes).1
    }

    /// Every datagram sent so far, in order.
    pub fn trace(&self) -> &[Sent] {
        &self.trace
    }

    /// The age of `a`'s current session with `b` (`None`: no usable session).
    pub fn session_age(&self, a: usize, b: usize) -> Option<Duration> {
        self.peer(a, b)?.lock().tunn.time_since_last_handshake()
    }

    /// Where `a` sends to `b`.
    pub fn endpoint(&self, a: usize, b: usize) -> Option<SocketAddr> {
        self.peer(a, b)?.lock().endpoint
    }

    fn peer(&self, a: usize, b: usize) -> Option<Arc<Peer>> {
        let snap = self.nodes[a].table.load_full();
        snap.by_key(&self.nodes[b].public).cloned()
    }

    /// Node `a`'s drop counters (non-zero ones).
    pub fn drops(&self, a: usize) -> Vec<(DropReason, u64)> {
        self.nodes[a].counters.nonzero()
    }

    /// Node `a`'s count for one drop reason.
    pub fn drop_count(&self, a: usize, r: DropReason) -> u64 {
        self.nodes[a].counters.get(r)
    }

    /// Whether packet `seq` from node `src` was delivered.
    pub fn delivered(&self, src: usize, seq: u64) -> bool {
        self.ledger.was_delivered(src, seq)
    }

    /// The ledger as it stands (datagrams still in flight count as such).
    pub fn report(&self) -> Report {
        self.ledger.report()
    }

    /// Ends the run: datagrams still in flight are dropped as [`NetDrop::InFlight`]. Prints
    /// and returns the ledger.
    pub fn finish(&mut self) -> Report {
        for d in self.net.drain() {
            if carries_packet(&d.bytes) {
                self.ledger.copy_lost(d.id, NetDrop::InFlight);
            }
        }
        let r = self.ledger.report();
        eprintln!("seed {} at {:?}: {r}", self.seed, self.now());
        r
    }
}

fn take_tx(pipe: &mut Pipeline) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    pipe.tx.send_all(|slot| {
        // What the kernel does with a GSO send: cut it into `segment`-byte datagrams.
        for d in slot.buf[..slot.len].chunks(slot.segment.max(1)) {
            out.push((slot.dst, d.to_vec()));
        }
    });
    out
}

fn counts(c: &DropCounters) -> Vec<u64> {
    DropReason::ALL.iter().map(|r| c.get(*r)).collect()
}

fn delta(before: &[u64], after: &[u64]) -> Vec<(DropReason, u64)> {
    DropReason::ALL
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a > b)
        .map(|(r, (b, a))| (*r, a - b))
        .collect()
}

/// The engine clock the pipeline takes: whole seconds of the mock clock.
fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}
