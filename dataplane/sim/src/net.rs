//! The simulated network: hosts with addresses (some behind a NAT), datagrams in flight
//! ordered by delivery time, and the faults a real path has — loss, duplication, delay
//! with jitter, reordering, blocked message types, NAT rebinding.
//!
//! Invariants: every datagram handed to [`Network::send`] either gets a delivery time or
//! is dropped with a [`NetDrop`] reason, and every scheduled copy is either delivered to a
//! host or dropped with a reason when it falls due ([`Network::resolve`]); nothing vanishes
//! uncounted. All randomness comes from the caller's seeded RNG, and ties in delivery time
//! break by send order, so one seed gives one history.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

/// Which messages the network refuses to carry (a middlebox, a partition).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Block {
    /// Carry everything.
    #[default]
    Nothing,
    /// Drop WireGuard handshake messages (initiation, response, cookie reply).
    Handshakes,
    /// Drop handshake responses sent by this host (its answers are lost, its own
    /// initiations get through).
    ResponsesFrom(usize),
    /// Drop everything (a partition).
    Everything,
}

/// Path faults, applied independently to every datagram.
#[derive(Clone, Copy, Debug)]
pub struct Impairments {
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability a datagram is delivered twice (each copy with its own delay).
    pub duplicate: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Uniform extra delay in `[0, jitter)`: datagrams sent closer together than this
    /// can overtake each other.
    pub jitter: Duration,
    /// Probability a datagram is held back by an extra [`Impairments::reorder_delay`].
    pub reorder: f64,
    /// The hold-back of a reordered datagram.
    pub reorder_delay: Duration,
    /// Messages the network refuses.
    pub block: Block,
}

impl Impairments {
    /// A perfect path with a 10 ms delay.
    pub const CLEAN: Self = Self {
        loss: 0.0,
        duplicate: 0.0,
        delay: Duration::from_millis(10),
        jitter: Duration::ZERO,
        reorder: 0.0,
        reorder_delay: Duration::ZERO,
        block: Block::Nothing,
    };

    /// A clean path with only `loss`.
    pub fn lossy(loss: f64) -> Self {
        Self {
            loss,
            ..Self::CLEAN
        }
    }
}

impl Default for Impairments {
    fn default() -> Self {
        Self::CLEAN
    }
}

/// Why the network did not deliver a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NetDrop {
    /// Random loss.
    Loss,
    /// Refused by [`Impairments::block`].
    Blocked,
    /// Addressed to a NAT mapping that no longer exists (the host rebound).
    NatStale,
    /// Addressed to no host.
    NoHost,
    /// Still in flight when the run ended.
    InFlight,
}

impl NetDrop {
    /// Every reason.
    pub const ALL: [NetDrop; 5] = [
        Self::Loss,
        Self::Blocked,
        Self::NatStale,
        Self::NoHost,
        Self::InFlight,
    ];

    /// A stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Loss => "net_loss",
            Self::Blocked => "net_blocked",
            Self::NatStale => "net_nat_stale",
            Self::NoHost => "net_no_host",
            Self::InFlight => "net_in_flight",
        }
    }
}

/// A datagram on the wire.
#[derive(Clone, Debug)]
pub struct Datagram {
    /// The send it is a copy of (duplicates share it).
    pub id: u64,
    /// The sending host (simulation bookkeeping; the receiver sees only `from`).
    pub src_host: usize,
    /// Source address after the sender's NAT.
    pub from: SocketAddr,
    /// Destination address.
    pub to: SocketAddr,
    /// The UDP payload.
    pub bytes: Vec<u8>,
}

struct Host {
    /// The address its socket is bound to.
    local: SocketAddr,
    /// The address others see: `local`, or its NAT mapping.
    public: SocketAddr,
    /// Mappings it had before rebinding.
    stale: Vec<SocketAddr>,
}

/// The network: hosts and datagrams in flight.
pub struct Network {
    /// Faults applied to every send.
    pub impairments: Impairments,
    hosts: Vec<Host>,
    in_flight: BTreeMap<(Duration, u64), Datagram>,
    next_id: u64,
    next_seq: u64,
    next_nat_port: u16,
}

impl Network {
    /// An empty network with these faults.
    pub fn new(impairments: Impairments) -> Self {
        Self {
            impairments,
            hosts: Vec::new(),
            in_flight: BTreeMap::new(),
            next_id: 0,
            next_seq: 0,
            next_nat_port: 40_000,
        }
    }

    /// Adds a host; behind a NAT it gets a public mapping distinct from its local address.
    /// Returns its number.
    pub fn add_host(&mut self, nat: bool) -> usize {
        let n = self.hosts.len();
        let octet = u8::try_from(n + 1).unwrap_or(u8::MAX);
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, octet, 1)), 51_820);
        let public = if nat { self.nat_mapping(n) } else { local };
        self.hosts.push(Host {
            local,
            public,
            stale: Vec::new(),
        });
        n
    }

    fn nat_mapping(&mut self, host: usize) -> SocketAddr {
        let octet = u8::try_from(host + 1).unwrap_or(u8::MAX);
        let port = self.next_nat_port;
        self.next_nat_port = self.next_nat_port.wrapping_add(1);
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, octet)), port)
    }

    /// The address a host's socket is bound to.
    pub fn local(&self, host: usize) -> SocketAddr {
        self.hosts[host].local
    }

    /// The address others see for a host.
    pub fn public(&self, host: usize) -> SocketAddr {
        self.hosts[host].public
    }

    /// NAT rebinding: the host's mapping moves to a new public port; datagrams to the old
    /// one are dropped from now on (including those already in flight). A host without a
    /// NAT gets one.
    pub fn rebind(&mut self, host: usize) -> SocketAddr {
        let new = self.nat_mapping(host);
        let h = &mut self.hosts[host];
        h.stale.push(h.public);
        h.public = new;
        new
    }

    /// Sends `bytes` from `src_host` to `to` at `now`. Returns the send's id and how many
    /// copies are on their way, or why none is.
    pub fn send(
        &mut self,
        rng: &mut StdRng,
        now: Duration,
        src_host: usize,
        to: SocketAddr,
        bytes: &[u8],
    ) -> (u64, Result<u32, NetDrop>) {
        let id = self.next_id;
        self.next_id += 1;
        let imp = self.impairments;
        let handshake = matches!(bytes.first(), Some(1..=3));
        let blocked = match imp.block {
            Block::Nothing => false,
            Block::Handshakes => handshake,
            Block::ResponsesFrom(h) => h == src_host && bytes.first() == Some(&2),
            Block::Everything => true,
        };
        if blocked {
            return (id, Err(NetDrop::Blocked));
        }
        if rng.gen_bool(imp.loss.clamp(0.0, 1.0)) {
            return (id, Err(NetDrop::Loss));
        }
        let copies = if rng.gen_bool(imp.duplicate.clamp(0.0, 1.0)) {
            2
        } else {
            1
        };
        let from = self.hosts[src_host].public;
        for _ in 0..copies {
            let mut delay = imp.delay;
            if !imp.jitter.is_zero() {
                delay += imp.jitter.mul_f64(rng.gen::<f64>());
            }
            if rng.gen_bool(imp.reorder.clamp(0.0, 1.0)) {
                delay += imp.reorder_delay;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.in_flight.insert(
                (now + delay, seq),
                Datagram {
                    id,
                    src_host,
                    from,
                    to,
                    bytes: bytes.to_vec(),
                },
            );
        }
        (id, Ok(copies))
    }

    /// When the next datagram falls due.
    pub fn next_due(&self) -> Option<Duration> {
        self.in_flight.first_key_value().map(|((t, _), _)| *t)
    }

    /// Takes the next datagram due at or before `now`.
    pub fn pop_due(&mut self, now: Duration) -> Option<Datagram> {
        let due = self.next_due()?;
        if due > now {
            return None;
        }
        self.in_flight.pop_first().map(|(_, d)| d)
    }

    /// Takes every datagram still in flight (the end of a run).
    pub fn drain(&mut self) -> Vec<Datagram> {
        std::mem::take(&mut self.in_flight).into_values().collect()
    }

    /// The host a datagram reaches, by its destination address at delivery time.
    pub fn resolve(&self, to: SocketAddr) -> Result<usize, NetDrop> {
        if let Some(i) = self.hosts.iter().position(|h| h.public == to) {
            return Ok(i);
        }
        if self.hosts.iter().any(|h| h.stale.contains(&to)) {
            return Err(NetDrop::NatStale);
        }
        Err(NetDrop::NoHost)
    }
}
