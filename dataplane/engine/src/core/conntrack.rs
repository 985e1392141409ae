//! Connection tracking: one peer's table of flows, so the packet filter lets a packet
//! through either because the port rules allow it to open a *new* flow, or because it
//! belongs to a flow already open (a reply), and nothing else.
//!
//! This module owns the flow table ([`FlowTable`]), the flow key ([`FlowKey`]), the TCP
//! state machine and the timeouts. Which packets may *open* a flow is the filter's business
//! (`core/filter.rs`); it calls [`FlowTable::lookup`], [`FlowTable::insert`] and
//! [`FlowTable::step`] once per packet.
//!
//! # Flows
//!
//! A table belongs to one peer and lives under that peer's lock ([`crate::core::peer`]),
//! so it is shared by both directions: *outbound* (TUN → peer, [`Dir::Out`]) and *inbound*
//! (peer → TUN, [`Dir::In`]). A flow is keyed from our side: (local address, local port,
//! remote address, remote port, protocol); a packet maps to the same key in either
//! direction, so one hash lookup per packet finds its flow whether it is a request or a
//! reply. The entry remembers which side opened the flow ([`Flow::opened`]).
//!
//! * TCP and UDP: by 5-tuple.
//! * ICMP/ICMPv6 echo: the echo identifier stands for both ports, and the key also says
//!   which side sends the requests, so a ping each way with the same identifier are two
//!   flows and an echo *request* never matches a flow opened by the other side.
//!
//! # TCP states (no window tracking)
//!
//! The states that matter for a firewall, after Linux `nf_conntrack_proto_tcp`:
//! `SynSent` (the opener's SYN) → `SynRecv` (the answer's SYN+ACK) → `Established` (the
//! opener's ACK) → `FinWait` (one side's FIN; Linux's FIN_WAIT and CLOSE_WAIT) →
//! `LastAck` (both FINs) → `TimeWait` (an ACK after both FINs); an RST from either side
//! moves any state to `Close`. A SYN (without ACK) from the opener in `TimeWait` or
//! `Close` reopens the flow (port reuse). Any other SYN, a SYN+ACK from the opener, a
//! segment without ACK after the handshake, or a non-SYN segment in `SynSent` is
//! *invalid* and dropped. Sequence numbers and windows are **not** tracked: a segment is
//! judged by its flags alone. That is enough here because a table holds only one peer's
//! flows and the source check has already tied the packet to that peer, so the only one
//! who could forge an in-window-looking RST or ACK into a flow is the peer itself, which
//! owns its end of the connection anyway.
//!
//! # Timeouts (seconds, as Linux's defaults)
//!
//! TCP: `SynSent` 120, `SynRecv` 60, `Established` 432 000 (5 days), `FinWait` 120,
//! `LastAck` 30, `TimeWait` 120, `Close` 10. UDP: 30 until a reply is seen, then 120
//! ("stream"). ICMP echo: 30. Every packet of a flow restarts its state's timeout.
//!
//! # Storage and invariants
//!
//! Open addressing with linear probing and backward-shift deletion (no tombstones) over a
//! power-of-two array of slots that is never more than half full. The array is allocated
//! when the peer's first flow is inserted (peers without a filter never track), starting
//! at [`INITIAL_FLOWS`] and doubling up to the table's fixed capacity: growth is a rare,
//! amortized event, never a per-packet allocation in steady state. At capacity the table
//! first evicts expired flows (a full sweep at most once per second, so a peer flooding
//! new flows cannot make every packet scan the table); if none expired, the new flow is
//! refused ([`Full`]) and the filter counts it (`ct_full`). Existing flows are never
//! evicted to make room. Expiry is lazy: a lookup that finds an expired flow removes it
//! and reports no flow.
//!
//! The hash is keyed with a per-table random seed (a folded 64×64→128-bit multiply over
//! the key's five words, as foldhash does), so a peer cannot pick 5-tuples that collide.
//!
//! Time is an argument: `now` is whole seconds on a monotonic clock (the driver's engine
//! clock; tests pass any value). Nothing here reads a clock, allocates per packet or
//! panics on any input.

use std::fmt;

/// Flows a table holds when first allocated (it doubles from here up to its capacity).
pub const INITIAL_FLOWS: usize = 64;

/// The default per-peer capacity: flows beyond this many (not yet expired) are refused.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// The largest capacity a table accepts (slot indexes and hash tags are `u32`).
pub const MAX_CAPACITY: usize = 1 << 24;

/// Timeouts in seconds.
pub mod timeout {
    /// TCP: the opener's SYN, no answer yet.
    pub const TCP_SYN_SENT: u32 = 120;
    /// TCP: SYN+ACK seen, waiting for the opener's ACK.
    pub const TCP_SYN_RECV: u32 = 60;
    /// TCP: established (Linux's default, 5 days).
    pub const TCP_ESTABLISHED: u32 = 5 * 24 * 3600;
    /// TCP: one side sent FIN (Linux's FIN_WAIT; its CLOSE_WAIT is 60).
    pub const TCP_FIN_WAIT: u32 = 120;
    /// TCP: both sides sent FIN.
    pub const TCP_LAST_ACK: u32 = 30;
    /// TCP: the last ACK after both FINs.
    pub const TCP_TIME_WAIT: u32 = 120;
    /// TCP: reset.
    pub const TCP_CLOSE: u32 = 10;
    /// UDP: no reply seen yet.
    pub const UDP: u32 = 30;
    /// UDP: replies seen ("stream").
    pub const UDP_STREAM: u32 = 120;
    /// ICMP/ICMPv6 echo.
    pub const ICMP: u32 = 30;
}

/// The direction of a packet relative to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From us to the peer (read from the TUN, about to be encrypted).
    Out,
    /// From the peer to us (decrypted, about to be written to the TUN).
    In,
}

impl Dir {
    /// The other direction.
    #[inline]
    pub fn rev(self) -> Dir {
        match self {
            Dir::Out => Dir::In,
            Dir::In => Dir::Out,
        }
    }
}

/// TCP flag bits the state machine reads.
pub mod tcpflags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Key flag: the addresses are IPv4 (mapped into the IPv6 space).
pub const KEY_V4: u8 = 1;
/// Key flag (echo flows): the remote side sends the echo requests.
pub const KEY_ECHO_BY_REMOTE: u8 = 2;

/// A flow's identity, seen from our side. IPv4 addresses are stored IPv4-mapped with
/// [`KEY_V4`] set, so v4 and v6 flows never compare equal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Our address.
    pub local: [u8; 16],
    /// The peer-side address.
    pub remote: [u8; 16],
    /// Our port (the echo identifier for echo flows).
    pub local_port: u16,
    /// The peer-side port (the echo identifier for echo flows).
    pub remote_port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    pub proto: u8,
    /// [`KEY_V4`] | [`KEY_ECHO_BY_REMOTE`].
    pub flags: u8,
}

/// Where a flow is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    /// TCP: the opener's SYN seen.
    SynSent = 1,
    /// TCP: the answer's SYN+ACK seen.
    SynRecv,
    /// TCP: handshake complete.
    Established,
    /// TCP: one side's FIN seen.
    FinWait,
    /// TCP: both FINs seen.
    LastAck,
    /// TCP: an ACK after both FINs.
    TimeWait,
    /// TCP: reset.
    Close,
    /// UDP: only the opener has sent.
    UdpNew,
    /// UDP: the other side has answered.
    UdpStream,
    /// ICMP echo.
    Echo,
}

impl State {
    /// This state's timeout in seconds.
    pub fn timeout(self) -> u32 {
        use timeout as t;
        match self {
            State::SynSent => t::TCP_SYN_SENT,
            State::SynRecv => t::TCP_SYN_RECV,
            State::Established => t::TCP_ESTABLISHED,
            State::FinWait => t::TCP_FIN_WAIT,
            State::LastAck => t::TCP_LAST_ACK,
            State::TimeWait => t::TCP_TIME_WAIT,
            State::Close => t::TCP_CLOSE,
            State::UdpNew => t::UDP,
            State::UdpStream => t::UDP_STREAM,
            State::Echo => t::ICMP,
        }
    }
}

/// A packet that does not fit its flow's state (dropped, counted as invalid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalid;

/// The table is at capacity and no flow has expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

/// One tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Its key.
    pub key: FlowKey,
    /// Which side opened it (sent the SYN, the first datagram, the echo requests).
    pub opened: Dir,
    /// Its state.
    pub state: State,
    /// TCP: FIN seen from the opener.
    fin_opener: bool,
    /// TCP: FIN seen from the other side.
    fin_answer: bool,
    /// Expires when `now >= expires`.
    pub expires: u32,
}

#[derive(Clone, Copy)]
struct Slot {
    /// Low 32 bits of the key's hash (its home slot is `hash & mask`); meaningless when
    /// `flow` is `None`.
    hash: u32,
    flow: Option<Flow>,
}

const EMPTY: Slot = Slot {
    hash: 0,
    flow: None,
};

/// One peer's flows. See the module documentation for the invariants.
pub struct FlowTable {
    slots: Box<[Slot]>,
    len: usize,
    capacity: usize,
    seeds: [u64; 6],
    /// `now + 1` of the last full expiry sweep (0: never).
    last_sweep: u32,
}

impl fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowTable")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl FlowTable {
    /// An empty table for at most `capacity` live flows (clamped to
    /// 1..=[`MAX_CAPACITY`]), hashing with `seed` (pass a random value). Allocates nothing
    /// until the first insert.
    pub fn new(capacity: usize, seed: u64) -> Self {
        let mut s = seed;
        let mut seeds = [0u64; 6];
        for v in &mut seeds {
            *v = splitmix(&mut s);
        }
        Self {
            slots: Box::new([]),
            len: 0,
            capacity: capacity.clamp(1, MAX_CAPACITY),
            seeds,
            last_sweep: 0,
        }
    }

    /// Live flows stored (some may have expired but not yet been removed).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no flow is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most flows this table holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Allocates the table for its full capacity now (benches; a table otherwise grows on
    /// demand).
    pub fn reserve_all(&mut self) {
        let want = slots_for(self.capacity);
        if self.slots.len() < want {
            self.rehash(want, None);
        }
    }

    /// Removes every flow (keeps the allocation).
    pub fn clear(&mut self) {
        self.slots.fill(EMPTY);
        self.len = 0;
    }

    #[inline]
    fn hash(&self, k: &FlowKey) -> u64 {
        let w = |b: &[u8; 16], i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let tail = u64::from(k.local_port)
            | u64::from(k.remote_port) << 16
            | u64::from(k.proto) << 32
            | u64::from(k.flags) << 40;
        let s = &self.seeds;
        let a = fold_mul(w(&k.local, 0) ^ s[0], w(&k.local, 8) ^ s[1]);
        let b = fold_mul(w(&k.remote, 0) ^ s[2], w(&k.remote, 8) ^ s[3]);
        fold_mul(a ^ tail ^ s[4], b ^ s[5])
    }

    /// The slot holding `key`'s live flow. An expired flow found on the way is removed,
    /// and counts as absent.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now: u32) -> Option<FlowRef> {
        if self.len == 0 {
            return None;
        }
        let h = self.hash(key) as u32;
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        loop {
            let slot = self.slots.get(i)?;
            match &slot.flow {
                None => return None,
                Some(f) if slot.hash == h && f.key == *key => {
                    if now >= f.expires {
                        self.remove_at(i);
                        return None;
                    }
                    return Some(FlowRef(i));
                }
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    /// The flow at a slot [`FlowTable::lookup`] returned.
    #[inline]
    pub fn get(&self, r: FlowRef) -> Option<&Flow> {
        self.slots.get(r.0)?.flow.as_ref()
    }

    /// Removes the flow at a slot [`FlowTable::lookup`] returned.
    pub fn remove(&mut self, r: FlowRef) {
        if matches!(self.slots.get(r.0), Some(Slot { flow: Some(_), .. })) {
            self.remove_at(r.0);
        }
    }

    /// Inserts a new flow for `key` (which [`FlowTable::lookup`] just reported absent),
    /// opened by a packet going `opened`, in `state`. Refused when the table is at capacity
    /// and nothing has expired.
    pub fn insert(
        &mut self,
        key: FlowKey,
        opened: Dir,
        state: State,
        now: u32,
    ) -> Result<FlowRef, Full> {
        if self.len >= self.capacity || self.slots.is_empty() || self.len * 2 >= self.slots.len() {
            self.make_room(now)?;
        }
        let h = self.hash(&key) as u32;
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        // The array is at most half full, so an empty slot exists.
        for _ in 0..self.slots.len() {
            let Some(slot) = self.slots.get_mut(i) else {
                break;
            };
            if slot.flow.is_none() {
                *slot = Slot {
                    hash: h,
                    flow: Some(Flow {
                        key,
                        opened,
                        state,
                        fin_opener: false,
                        fin_answer: false,
                        expires: now.saturating_add(state.timeout()),
                    }),
                };
                self.len += 1;
                return Ok(FlowRef(i));
            }
            i = (i + 1) & mask;
        }
        Err(Full)
    }

    /// Applies a packet going `dir` to the flow at `r`: moves its state and restarts its
    /// timeout, or reports the packet invalid for the state (the flow is left as it was).
    /// `tcp_flags` is the segment's flags for TCP flows and ignored otherwise.
    #[inline]
    pub fn step(&mut self, r: FlowRef, dir: Dir, tcp_flags: u8, now: u32) -> Result<(), Invalid> {
        let Some(Slot { flow: Some(f), .. }) = self.slots.get_mut(r.0) else {
            return Err(Invalid);
        };
        let from_opener = dir == f.opened;
        let next = match f.state {
            State::UdpNew | State::UdpStream => {
                if from_opener {
                    f.state
                } else {
                    State::UdpStream
                }
            }
            State::Echo => State::Echo,
            _ => tcp_next(f, from_opener, tcp_flags)?,
        };
        f.state = next;
        f.expires = now.saturating_add(next.timeout());
        Ok(())
    }

    /// Every live flow (for tests and diagnostics).
    pub fn flows(&self, now: u32) -> impl Iterator<Item = &Flow> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.flow.as_ref())
            .filter(move |f| now < f.expires)
    }

    /// Makes room for one more flow: sweeps expired flows (at most once per second when
    /// at capacity), grows the array, or refuses.
    fn make_room(&mut self, now: u32) -> Result<(), Full> {
        if self.slots.is_empty() {
            self.rehash(slots_for(INITIAL_FLOWS.min(self.capacity)), None);
            return Ok(());
        }
        if self.len < self.capacity {
            // Below capacity but the array is half full: grow (expired flows are dropped
            // in the same pass).
            let want = (self.slots.len() * 2).min(slots_for(self.capacity));
            if want > self.slots.len() {
                self.rehash(want, Some(now));
                return Ok(());
            }
        }
        if self.len >= self.capacity && self.last_sweep != now.wrapping_add(1) {
            self.last_sweep = now.wrapping_add(1);
            let n = self.slots.len();
            self.rehash(n, Some(now));
        }
        if self.len < self.capacity && self.len * 2 < self.slots.len() {
            Ok(())
        } else {
            Err(Full)
        }
    }

    /// Rebuilds the array with `n` slots (a power of two), dropping flows expired at
    /// `now` when given.
    fn rehash(&mut self, n: usize, now: Option<u32>) {
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; n].into_boxed_slice());
        self.len = 0;
        let mask = n - 1;
        for s in old.iter() {
            let Some(f) = s.flow else { continue };
            if matches!(now, Some(t) if t >= f.expires) {
                continue;
            }
            let mut i = s.hash as usize & mask;
            while let Some(slot) = self.slots.get_mut(i) {
                if slot.flow.is_none() {
                    *slot = *s;
                    self.len += 1;
                    break;
                }
                i = (i + 1) & mask;
            }
        }
    }

    /// Backward-shift deletion: later entries of the probe run move up so every entry
    /// stays reachable from its home slot without tombstones.
    fn remove_at(&mut self, mut hole: usize) {
        let mask = self.slots.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let Some(s) = self.slots.get(j).copied() else {
                break;
            };
            if s.flow.is_none() {
                break;
            }
            let home = s.hash as usize & mask;
            // The entry at j may fill the hole iff its home is not cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                if let Some(h) = self.slots.get_mut(hole) {
                    *h = s;
                }
                hole = j;
            }
        }
        if let Some(h) = self.slots.get_mut(hole) {
            *h = EMPTY;
        }
        self.len = self.len.saturating_sub(1);
    }
}

/// A handle to a stored flow, valid until the table is next modified by another call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRef(usize);

/// Slots for `flows` flows: a power of two at least twice as many.
fn slots_for(flows: usize) -> usize {
    (flows.max(1) * 2).next_power_of_two()
}

/// The TCP transition table of the module documentation.
#[inline]
fn tcp_next(f: &mut Flow, from_opener: bool, flags: u8) -> Result<State, Invalid> {
    use tcpflags::{ACK, FIN, RST, SYN};
    if flags & RST != 0 {
        return Ok(State::Close);
    }
    let s = f.state;
    if flags & SYN != 0 {
        return match (s, from_opener, flags & ACK != 0) {
            // The opener's SYN (retransmitted), or a reopen of a finished flow.
            (State::SynSent, true, false) => Ok(State::SynSent),
            (State::TimeWait | State::Close, true, false) => {
                f.fin_opener = false;
                f.fin_answer = false;
                Ok(State::SynSent)
            }
            // The answer's SYN+ACK (retransmitted).
            (State::SynSent | State::SynRecv, false, true) => Ok(State::SynRecv),
            _ => Err(Invalid),
        };
    }
    if flags & ACK == 0 {
        return Err(Invalid);
    }
    match s {
        State::SynSent => Err(Invalid),
        State::SynRecv if !from_opener => Ok(State::SynRecv),
        State::TimeWait | State::Close => Ok(s),
        _ => {
            let both_before = f.fin_opener && f.fin_answer;
            if flags & FIN != 0 {
                if from_opener {
                    f.fin_opener = true;
                } else {
                    f.fin_answer = true;
                }
            }
            Ok(match (f.fin_opener, f.fin_answer) {
                (false, false) => State::Established,
                (true, true) if both_before && flags & FIN == 0 => State::TimeWait,
                (true, true) => State::LastAck,
                _ => State::FinWait,
            })
        }
    }
}

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::tcpflags::*;
    use super::*;

    fn key(n: u16) -> FlowKey {
        let mut k = FlowKey {
            local: [0xfd; 16],
            remote: [0xfd; 16],
            local_port: 40000 + n,
            remote_port: 8730,
            proto: 6,
            flags: 0,
        };
        k.remote[15] = 2;
        k
    }

    fn open_tcp(t: &mut FlowTable, k: FlowKey, now: u32) -> FlowRef {
        assert!(t.lookup(&k, now).is_none());
        t.insert(k, Dir::Out, State::SynSent, now).unwrap()
    }

    #[test]
    fn tcp_handshake_data_and_close() {
        let mut t = FlowTable::new(16, 1);
        let k = key(1);
        open_tcp(&mut t, k, 0);
        let step = |t: &mut FlowTable, d: Dir, fl: u8, now: u32| {
            let r = t.lookup(&k, now).expect("tracked");
            t.step(r, d, fl, now).map(|()| t.get(r).unwrap().state)
        };
        // SYN retransmit, then the answer's SYN+ACK, the opener's ACK.
        assert_eq!(step(&mut t, Dir::Out, SYN, 1), Ok(State::SynSent));
        // Non-SYN before the handshake answer is invalid.
        assert_eq!(step(&mut t, Dir::In, ACK, 1), Err(Invalid));
        assert_eq!(step(&mut t, Dir::Out, ACK, 1), Err(Invalid));
        // A SYN+ACK from the opener is invalid.
        assert_eq!(step(&mut t, Dir::Out, SYN | ACK, 1), Err(Invalid));
        assert_eq!(step(&mut t, Dir::In, SYN | ACK, 2), Ok(State::SynRecv));
        assert_eq!(step(&mut t, Dir::Out, ACK, 2), Ok(State::Established));
        assert_eq!(step(&mut t, Dir::In, ACK, 3), Ok(State::Established));
        // A new SYN inside an established flow is invalid, from either side.
        assert_eq!(step(&mut t, Dir::In, SYN, 3), Err(Invalid));
        assert_eq!(step(&mut t, Dir::Out, SYN, 3), Err(Invalid));
        // Segments without ACK after the handshake are invalid (a FIN or NULL scan).
        assert_eq!(step(&mut t, Dir::In, FIN, 3), Err(Invalid));
        assert_eq!(step(&mut t, Dir::In, 0, 3), Err(Invalid));
        // Close: FIN one way, FIN the other, last ACK.
        assert_eq!(step(&mut t, Dir::In, FIN | ACK, 4), Ok(State::FinWait));
        assert_eq!(step(&mut t, Dir::Out, ACK, 4), Ok(State::FinWait));
        assert_eq!(step(&mut t, Dir::Out, FIN | ACK, 5), Ok(State::LastAck));
        assert_eq!(step(&mut t, Dir::In, ACK, 5), Ok(State::TimeWait));
        // TIME_WAIT lasts 120 s, then the flow is gone.
        assert!(t.lookup(&k, 5 + 119).is_some());
        assert!(t.lookup(&k, 5 + 120).is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn rst_closes_and_syn_reopens() {
        let mut t = FlowTable::new(16, 2);
        let k = key(2);
        let r = open_tcp(&mut t, k, 0);
        t.step(r, Dir::In, RST | ACK, 0).unwrap();
        assert_eq!(t.get(r).unwrap().state, State::Close);
        // Late segments of the closed flow still match it.
        t.step(r, Dir::In, ACK, 1).unwrap();
        assert_eq!(t.get(r).unwrap().expires, 1 + timeout::TCP_CLOSE);
        // The answering side cannot reopen it; the opener can.
        assert_eq!(t.step(r, Dir::In, SYN, 1), Err(Invalid));
        t.step(r, Dir::Out, SYN, 2).unwrap();
        assert_eq!(t.get(r).unwrap().state, State::SynSent);
        assert!(t.lookup(&k, 2 + 10).is_some());
        assert!(t.lookup(&k, 2 + 120).is_none());
    }

    #[test]
    fn udp_becomes_a_stream_once_answered() {
        let mut t = FlowTable::new(16, 3);
        let mut k = key(3);
        k.proto = 17;
        let r = t.insert(k, Dir::In, State::UdpNew, 100).unwrap();
        assert_eq!(t.get(r).unwrap().expires, 130);
        t.step(r, Dir::In, 0, 110).unwrap();
        assert_eq!(t.get(r).unwrap().state, State::UdpNew);
        t.step(r, Dir::Out, 0, 111).unwrap();
        assert_eq!(t.get(r).unwrap().state, State::UdpStream);
        assert_eq!(t.get(r).unwrap().expires, 231);
        assert!(t.lookup(&k, 230).is_some());
        assert!(t.lookup(&k, 231).is_none());
    }

    #[test]
    fn capacity_is_enforced_and_expired_flows_make_room() {
        let mut t = FlowTable::new(100, 4);
        for n in 0..100 {
            t.insert(key(n), Dir::Out, State::UdpNew, 0).unwrap();
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.insert(key(100), Dir::Out, State::UdpNew, 1), Err(Full));
        // Within the same second no second sweep runs; once the UDP flows have expired,
        // the sweep frees them.
        assert_eq!(t.insert(key(100), Dir::Out, State::UdpNew, 1), Err(Full));
        t.insert(key(100), Dir::Out, State::UdpNew, 30).unwrap();
        assert_eq!(t.len(), 1);
        // Live flows are never evicted.
        let mut t = FlowTable::new(3, 5);
        for n in 0..3 {
            t.insert(key(n), Dir::Out, State::Established, 0).unwrap();
        }
        for now in 1..5 {
            assert_eq!(t.insert(key(9), Dir::Out, State::UdpNew, now), Err(Full));
        }
        for n in 0..3 {
            assert!(t.lookup(&key(n), 5).is_some());
        }
    }

    #[test]
    fn keys_differ_by_every_field() {
        let mut t = FlowTable::new(64, 6);
        let base = key(7);
        t.insert(base, Dir::Out, State::UdpNew, 0).unwrap();
        let mut variants = Vec::new();
        for i in 0..16 {
            let mut k = base;
            k.local[i] ^= 1;
            variants.push(k);
            let mut k = base;
            k.remote[i] ^= 1;
            variants.push(k);
        }
        for f in [
            |k: &mut FlowKey| k.local_port ^= 1,
            |k: &mut FlowKey| k.remote_port ^= 1,
            |k: &mut FlowKey| k.proto = 17,
            |k: &mut FlowKey| k.flags ^= KEY_V4,
            |k: &mut FlowKey| k.flags ^= KEY_ECHO_BY_REMOTE,
        ] {
            let mut k = base;
            f(&mut k);
            variants.push(k);
        }
        for k in &variants {
            assert!(t.lookup(k, 0).is_none(), "{k:?}");
        }
        assert!(t.lookup(&base, 0).is_some());
    }

    #[test]
    fn grows_from_small_and_allocates_lazily() {
        let mut t = FlowTable::new(10_000, 7);
        assert_eq!(t.slots.len(), 0);
        t.insert(key(0), Dir::Out, State::UdpNew, 0).unwrap();
        assert_eq!(t.slots.len(), slots_for(INITIAL_FLOWS));
        for n in 1..5000 {
            t.insert(key(n), Dir::Out, State::UdpNew, 0).unwrap();
        }
        assert!(t.slots.len() >= 10_000 && t.slots.len() <= slots_for(10_000));
        for n in 0..5000 {
            assert!(t.lookup(&key(n), 1).is_some());
        }
    }

    // ---- The tracker against a reference model ----

    /// The reference: a HashMap of key → (opened, state, fins, expires), with the same
    /// explicit timeouts and transitions written out without the probing table.
    #[derive(Default)]
    struct Model {
        map: HashMap<FlowKey, (Dir, State, bool, bool, u32)>,
        cap: usize,
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, bool, u8),
        Step(u8, bool, u8),
        Remove(u8),
        Tick(u32),
    }

    fn model_step(e: &mut (Dir, State, bool, bool, u32), dir: Dir, fl: u8, now: u32) -> bool {
        let from_opener = dir == e.0;
        let s = e.1;
        let next = match s {
            State::UdpNew | State::UdpStream => {
                if from_opener {
                    s
                } else {
                    State::UdpStream
                }
            }
            State::Echo => s,
            _ if fl & RST != 0 => State::Close,
            _ if fl & SYN != 0 => {
                let ack = fl & ACK != 0;
                if s == State::SynSent && from_opener && !ack {
                    State::SynSent
                } else if matches!(s, State::TimeWait | State::Close) && from_opener && !ack {
                    e.2 = false;
                    e.3 = false;
                    State::SynSent
                } else if matches!(s, State::SynSent | State::SynRecv) && !from_opener && ack {
                    State::SynRecv
                } else {
                    return false;
                }
            }
            _ if fl & ACK == 0 => return false,
            State::SynSent => return false,
            State::SynRecv if !from_opener => State::SynRecv,
            State::TimeWait | State::Close => s,
            _ => {
                let before = e.2 && e.3;
                if fl & FIN != 0 {
                    if from_opener {
                        e.2 = true
                    } else {
                        e.3 = true
                    }
                }
                match (e.2, e.3) {
                    (false, false) => State::Established,
                    (true, true) if before && fl & FIN == 0 => State::TimeWait,
                    (true, true) => State::LastAck,
                    _ => State::FinWait,
                }
            }
        };
        e.1 = next;
        e.4 = now + next.timeout();
        true
    }

    const STATES: [State; 10] = [
        State::SynSent,
        State::SynRecv,
        State::Established,
        State::FinWait,
        State::LastAck,
        State::TimeWait,
        State::Close,
        State::UdpNew,
        State::UdpStream,
        State::Echo,
    ];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..24, any::<bool>(), 0u8..10).prop_map(|(k, d, s)| Op::Insert(k, d, s)),
            (0u8..24, any::<bool>(), any::<u8>()).prop_map(|(k, d, f)| Op::Step(k, d, f)),
            (0u8..24).prop_map(Op::Remove),
            prop_oneof![0u32..3, 0u32..200, Just(timeout::TCP_ESTABLISHED)].prop_map(Op::Tick),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_a_reference_model(
            ops in prop::collection::vec(op(), 1..300),
            cap in 1usize..20,
            seed in any::<u64>(),
        ) {
            let mut t = FlowTable::new(cap, seed);
            let mut m = Model { cap, ..Model::default() };
            let mut now = 0u32;
            let k = |n: u8| { let mut k = key(u16::from(n % 12)); k.proto = if n < 12 { 6 } else { 17 }; k };
            let dir = |b: bool| if b { Dir::Out } else { Dir::In };
            for o in ops {
                // Lazy expiry in the model: gone once now >= expires.
                m.map.retain(|_, e| now < e.4);
                match o {
                    Op::Tick(d) => now += d,
                    Op::Insert(n, d, s) => {
                        let key = k(n);
                        let st = STATES[usize::from(s)];
                        let found = t.lookup(&key, now).is_some();
                        prop_assert_eq!(found, m.map.contains_key(&key));
                        if found { continue; }
                        let r = t.insert(key, dir(d), st, now);
                        if m.map.len() < m.cap {
                            prop_assert!(r.is_ok(), "refused below capacity");
                            m.map.insert(key, (dir(d), st, false, false, now + st.timeout()));
                        } else {
                            prop_assert_eq!(r, Err(Full));
                        }
                    }
                    Op::Step(n, d, f) => {
                        let key = k(n);
                        let r = t.lookup(&key, now);
                        prop_assert_eq!(r.is_some(), m.map.contains_key(&key));
                        if let (Some(r), Some(e)) = (r, m.map.get_mut(&key)) {
                            let ok = model_step(e, dir(d), f, now);
                            prop_assert_eq!(t.step(r, dir(d), f, now).is_ok(), ok);
                            let fl = t.get(r).unwrap();
                            prop_assert_eq!((fl.opened, fl.state, fl.expires), (e.0, e.1, e.4));
                        }
                    }
                    Op::Remove(n) => {
                        let key = k(n);
                        if let Some(r) = t.lookup(&key, now) { t.remove(r); }
                        m.map.remove(&key);
                    }
                }
                // Every model flow is found, and the table holds no live extra.
                m.map.retain(|_, e| now < e.4);
                for (key, e) in &m.map {
                    let r = t.lookup(key, now);
                    prop_assert!(r.is_some(), "lost {:?}", key);
                    prop_assert_eq!(t.get(r.unwrap()).unwrap().state, e.1);
                }
                prop_assert_eq!(t.flows(now).count(), m.map.len());
            }
        }
    }
}
