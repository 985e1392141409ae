//! The ledger: where every inner packet an application sent ended up.
//!
//! The simulation sees both sides of every engine call, so it can account for each packet
//! without trusting the engine: an application packet handed to `Pipeline::on_tun` is
//! either encrypted into a data datagram at once, dropped with a counted [`DropReason`],
//! or taken into boringtun's handshake queue (neither of the first two). Data datagrams
//! that carry a packet (longer than a 32-byte keepalive) and come out of any other engine
//! call are packets leaving that queue. Each such datagram is then delivered, dropped by
//! the network with a [`NetDrop`] reason, or refused by the receiving engine with a
//! counted reason; the receiver must never drop one silently.
//!
//! Invariants checked by [`Report::check`]:
//! * every delivered packet is byte-identical to one that was sent, to that node, once;
//! * `sent = delivered + Σ losses by reason`, where the reasons are sender drops, packets
//!   left in (or discarded from) boringtun's queue, network drops and receiver drops;
//! * no engine call dropped a data packet without counting it.

use std::collections::BTreeMap;
use std::fmt;

use tabbify_engine::core::counters::DropReason;

use crate::net::NetDrop;

/// Bytes that mark a simulated application packet's payload.
pub const MAGIC: &[u8; 4] = b"TSIM";

/// A WireGuard data message with no payload (header 16 + tag 16): a keepalive.
pub const KEEPALIVE_LEN: usize = 32;

/// Reads (sender node, sequence) from an application packet (IPv6 + UDP + payload).
pub fn packet_id(pkt: &[u8]) -> Option<(usize, u64)> {
    let p = pkt.get(48..62)?;
    if &p[..4] != MAGIC {
        return None;
    }
    let src = u16::from_be_bytes([p[4], p[5]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&p[6..14]);
    Some((usize::from(src), u64::from_be_bytes(seq)))
}

/// Whether a datagram is a WireGuard data message carrying a packet.
pub fn carries_packet(datagram: &[u8]) -> bool {
    datagram.first() == Some(&4) && datagram.len() > KEEPALIVE_LEN
}

struct Sent {
    to: usize,
    bytes: Vec<u8>,
    delivered: u32,
}

#[derive(Default)]
struct DatagramFate {
    pending: u32,
    delivered: bool,
    refused: Option<DropReason>,
    lost: Option<NetDrop>,
}

/// The running account of one simulation.
#[derive(Default)]
pub struct Ledger {
    packets: BTreeMap<(usize, u64), Sent>,
    sender_drops: BTreeMap<&'static str, u64>,
    queued: u64,
    released: u64,
    datagrams: BTreeMap<u64, DatagramFate>,
    violations: Vec<String>,
}

impl Ledger {
    /// An application packet `bytes` (id `(src, seq)`) was handed to `src`'s engine for `to`.
    pub fn sent(&mut self, src: usize, seq: u64, to: usize, bytes: &[u8]) {
        self.packets.insert(
            (src, seq),
            Sent {
                to,
                bytes: bytes.to_vec(),
                delivered: 0,
            },
        );
    }

    /// What `on_tun` did with one application packet: the drops it counted and how many
    /// packet-carrying datagrams it produced.
    pub fn on_tun_outcome(&mut self, drops: &[(DropReason, u64)], datagrams: usize) {
        let dropped: u64 = drops.iter().map(|(_, n)| n).sum();
        match (dropped, datagrams) {
            (0, 0) => self.queued += 1,
            (0, 1) => {}
            (1, 0) => {
                for (r, n) in drops {
                    *self.sender_drops.entry(r.name()).or_default() += n;
                }
            }
            _ => self.violations.push(format!(
                "on_tun of one packet: {datagrams} datagrams and drops {drops:?}"
            )),
        }
    }

    /// Packet-carrying datagrams that came out of an engine call other than the packet's
    /// own `on_tun`: packets leaving boringtun's queue.
    pub fn released(&mut self, n: usize) {
        self.released += n as u64;
    }

    /// A packet-carrying datagram went to the network (`copies` on their way, or dropped).
    pub fn datagram_sent(&mut self, id: u64, copies: Result<u32, NetDrop>) {
        let f = self.datagrams.entry(id).or_default();
        match copies {
            Ok(n) => f.pending += n,
            Err(r) => f.lost = Some(r),
        }
    }

    /// One copy of a packet-carrying datagram was dropped when it fell due.
    pub fn copy_lost(&mut self, id: u64, reason: NetDrop) {
        if let Some(f) = self.datagrams.get_mut(&id) {
            f.pending = f.pending.saturating_sub(1);
            f.lost.get_or_insert(reason);
        }
    }

    /// One copy of a packet-carrying datagram reached its engine, which delivered
    /// `delivered` packets and counted `drops`.
    pub fn copy_received(&mut self, id: u64, delivered: usize, drops: &[(DropReason, u64)]) {
        let Some(f) = self.datagrams.get_mut(&id) else {
            return;
        };
        f.pending = f.pending.saturating_sub(1);
        let dropped: u64 = drops.iter().map(|(_, n)| n).sum();
        match (delivered, dropped) {
            (1, 0) => f.delivered = true,
            (0, 1) => {
                if let Some((r, _)) = drops.iter().find(|(_, n)| *n > 0) {
                    f.refused.get_or_insert(*r);
                }
            }
            (0, 0) => self.violations.push(format!(
                "datagram {id}: the receiving engine dropped a data packet without counting it"
            )),
            _ => self.violations.push(format!(
                "datagram {id}: {delivered} packets delivered and drops {drops:?}"
            )),
        }
    }

    /// An inner packet came out of node `at`'s engine.
    pub fn delivered(&mut self, at: usize, pkt: &[u8]) {
        let Some(id) = packet_id(pkt) else {
            self.violations
                .push(format!("node {at} delivered a packet nobody sent"));
            return;
        };
        let Some(s) = self.packets.get_mut(&id) else {
            self.violations
                .push(format!("node {at} delivered unknown packet {id:?}"));
            return;
        };
        s.delivered += 1;
        if s.bytes != pkt {
            self.violations
                .push(format!("packet {id:?} arrived altered at node {at}"));
        }
        if s.to != at {
            self.violations.push(format!(
                "packet {id:?} for node {} arrived at node {at}",
                s.to
            ));
        }
        if s.delivered > 1 {
            self.violations
                .push(format!("packet {id:?} delivered {} times", s.delivered));
        }
    }

    /// Records a broken invariant found outside the ledger (a harness fault).
    pub fn violation(&mut self, v: String) {
        self.violations.push(v);
    }

    /// Packets sent so far.
    pub fn sent_count(&self) -> u64 {
        self.packets.len() as u64
    }

    /// Distinct packets delivered so far.
    pub fn delivered_count(&self) -> u64 {
        self.packets.values().filter(|s| s.delivered > 0).count() as u64
    }

    /// Whether packet `(src, seq)` was delivered.
    pub fn was_delivered(&self, src: usize, seq: u64) -> bool {
        self.packets
            .get(&(src, seq))
            .is_some_and(|s| s.delivered > 0)
    }

    /// The account as it stands.
    pub fn report(&self) -> Report {
        let mut losses: BTreeMap<String, u64> = BTreeMap::new();
        for (r, n) in &self.sender_drops {
            *losses.entry(format!("tx_{r}")).or_default() += n;
        }
        let residue = self.queued.saturating_sub(self.released);
        if residue > 0 {
            losses.insert("wg_queue".into(), residue);
        }
        let mut delivered_datagrams = 0u64;
        for f in self.datagrams.values() {
            let reason = if f.delivered {
                delivered_datagrams += 1;
                continue;
            } else if let Some(r) = f.refused {
                format!("rx_{}", r.name())
            } else if let Some(r) = f.lost {
                r.name().to_string()
            } else {
                NetDrop::InFlight.name().to_string()
            };
            *losses.entry(reason).or_default() += 1;
        }
        let mut violations = self.violations.clone();
        if self.released > self.queued {
            violations.push(format!(
                "{} packets left boringtun's queue but only {} entered it",
                self.released, self.queued
            ));
        }
        if delivered_datagrams != self.delivered_count() {
            violations.push(format!(
                "{delivered_datagrams} data datagrams delivered but {} distinct packets",
                self.delivered_count()
            ));
        }
        Report {
            sent: self.sent_count(),
            delivered: self.delivered_count(),
            losses,
            violations,
        }
    }
}

/// A summary of the ledger.
#[derive(Clone, Debug)]
pub struct Report {
    /// Application packets sent.
    pub sent: u64,
    /// Distinct packets delivered.
    pub delivered: u64,
    /// Packets not delivered, by reason (`tx_*` sender drops, `wg_queue`, `net_*`, `rx_*`).
    pub losses: BTreeMap<String, u64>,
    /// Broken invariants.
    pub violations: Vec<String>,
}

impl Report {
    /// Packets not delivered, over every reason.
    pub fn lost(&self) -> u64 {
        self.losses.values().sum()
    }

    /// Losses for one reason.
    pub fn loss(&self, reason: &str) -> u64 {
        self.losses.get(reason).copied().unwrap_or(0)
    }

    /// Panics unless every invariant of the module holds.
    pub fn check(&self) {
        assert!(
            self.violations.is_empty(),
            "ledger violations: {:#?}\n{self}",
            self.violations
        );
        assert_eq!(
            self.sent,
            self.delivered + self.lost(),
            "sent != delivered + losses\n{self}"
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {} = delivered {} + lost {}",
            self.sent,
            self.delivered,
            self.lost()
        )?;
        for (r, n) in &self.losses {
            write!(f, " [{r} {n}]")?;
        }
        if !self.violations.is_empty() {
            write!(f, " ({} violations)", self.violations.len())?;
        }
        Ok(())
    }
}
