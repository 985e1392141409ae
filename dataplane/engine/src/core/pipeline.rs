//! The per-worker packet pipeline: what happens to one batch of TUN reads and UDP receives.
//!
//! ```text
//! outbound: TUN read ─▶ [virtio hdr: split TSO/USO super-packet, complete checksums]
//!           ─▶ route lookup (inner dst → peer + filter, once per super-packet;
//!              no peer: dropped, ICMP unreachable queued for the TUN, rate limited)
//!           ─▶ lock peer once ─▶ packet filter (port rules + the peer's flow table,
//!              first segment's headers)
//!           ─▶ Tunn::encapsulate each segment straight into the TxBatch slot of its endpoint
//!           ─▶ driver: one GSO sendmsg per slot
//! inbound:  UDP receive (GRO: n datagrams of one segment size) ─▶ demux by message type and
//!           receiver index (lock peer once per run of datagrams; a datagram that is not
//!           WireGuard: STUN and relay control to the control queue, see `core::demux`,
//!           junk dropped) ─▶ Tunn::decapsulate
//!           ─▶ allowed-source check ─▶ local-destination check ─▶ packet filter
//!              (per decrypted packet, with the peer's flow table under the lock already held)
//!           ─▶ TUN sink (GRO coalescer or plain batch)
//!           ─▶ driver: one TUN write per (coalesced) packet
//! ```
//!
//! The TUN→peer path answers what it cannot route: a packet for an address no peer covers
//! (a removed peer, an unknown app) is dropped and a destination-unreachable answer goes
//! into the pipeline's reply batch, which the driver writes back to the TUN after the batch
//! ([`Pipeline::drain_replies`]); the answers are rate limited by a token bucket the driver
//! refills with [`Pipeline::tick`] (see `core::icmp`). The peer→TUN path writes a decrypted
//! packet only if its destination is this node's (see `core::local`).
//!
//! Ownership: a `Pipeline` belongs to one worker thread; its scratch buffers are
//! preallocated. Time is an argument: the driver sets the engine clock ([`Pipeline::set_now`],
//! whole seconds) once per batch, and connection tracking reads only that. It reads the table through a snapshot the driver loads once per batch.
//! Nothing here allocates per packet except boringtun's own queue of packets waiting for a
//! handshake.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};

use crate::core::batch::{Full, TxBatch};
use crate::core::conntrack::{Dir, FlowTable};
use crate::core::counters::{DropCounters, DropReason};
use crate::core::demux::{self, ControlQueue};
use crate::core::filter::Deny;
use crate::core::icmp::{self, IcmpLimiter};
use crate::core::peer::{Peer, PeerState};
use crate::core::table::Snapshot;
use crate::core::tunbatch::TunBatch;
use crate::core::{offload, wire};

/// Where decrypted inner packets go (the GRO coalescer or a plain batch).
pub trait TunSink {
    /// Takes one decrypted IP packet; false if there is no room (the packet is dropped).
    fn push(&mut self, pkt: &[u8]) -> bool;
}

/// The largest tunnel MTU the engine accepts (jumbo frames): bounds the size of any inner
/// packet boringtun can have queued, and so the room a queue flush needs.
pub const MAX_MTU: usize = 9000;

/// Room every encapsulation gets: the packet plus WireGuard's 32 bytes, at least a
/// handshake initiation (boringtun panics on less).
#[inline]
fn need(len: usize) -> usize {
    (len + 32).max(148)
}

/// One worker's pipeline state.
pub struct Pipeline {
    counters: Arc<DropCounters>,
    /// Encrypted datagrams waiting to be sent.
    pub tx: TxBatch,
    vnet: bool,
    seg: Box<[u8]>,
    dec: Box<[u8]>,
    /// ICMP unreachable answers waiting to be written back to the TUN (no virtio header:
    /// the driver's sink adds it).
    replies: TunBatch,
    icmp: IcmpLimiter,
    icmp_buf: Box<[u8]>,
    /// The engine clock in whole seconds (connection-tracking timeouts).
    now: u32,
    /// The receive clock ([`crate::core::path::mono_ns`]) for `last_*_rx_ns`.
    now_ns: u64,
    /// Where STUN and relay-control datagrams go (shared by every worker).
    control: Option<Arc<ControlQueue>>,
}

/// Bytes of answers one batch can hold: the rate limiter's whole burst of full-size
/// IPv6 answers.
const REPLY_BYTES: usize = icmp::DEFAULT_BURST as usize * icmp::V6_MAX;

impl Pipeline {
    /// A pipeline whose TUN reads carry a virtio header iff `vnet`, sending with GSO iff `gso`.
    pub fn new(counters: Arc<DropCounters>, vnet: bool, gso: bool, tx_slots: usize) -> Self {
        Self {
            counters,
            tx: TxBatch::new(tx_slots, gso),
            vnet,
            seg: vec![0u8; 65_536].into_boxed_slice(),
            dec: vec![0u8; 65_536].into_boxed_slice(),
            replies: TunBatch::new(REPLY_BYTES, false),
            icmp: IcmpLimiter::default(),
            icmp_buf: vec![0u8; icmp::V6_MAX].into_boxed_slice(),
            now: 0,
            now_ns: 0,
            control: None,
        }
    }

    /// Hands STUN and relay-control datagrams to `queue` (without one they are dropped
    /// and counted as [`DropReason::ControlDropped`]).
    pub fn set_control(&mut self, queue: Arc<ControlQueue>) {
        self.control = Some(queue);
    }

    /// Refills the ICMP answer rate limiter; the driver calls it once per loop turn.
    pub fn tick(&mut self, now: Instant) {
        self.icmp.refill(now);
    }

    /// Whether answers are waiting for [`Pipeline::drain_replies`].
    pub fn has_replies(&self) -> bool {
        !self.replies.is_empty()
    }

    /// Moves every waiting ICMP answer into `sink` (the driver's TUN write batch); an
    /// answer the sink has no room for is dropped and counted.
    pub fn drain_replies(&mut self, sink: &mut impl TunSink) {
        for i in 0..self.replies.len() {
            if !sink.push(self.replies.get(i)) {
                self.counters.add(DropReason::NoBuffer);
            }
        }
        self.replies.clear();
    }

    /// Drops a TUN read no peer covers and queues the ICMP answer to its sender.
    #[cold]
    fn no_route(&mut self, pkt: &[u8]) {
        self.drop(DropReason::NoRoute);
        let Some(n) = icmp::unreachable(pkt, &mut self.icmp_buf) else {
            return;
        };
        if !self.icmp.take() {
            self.drop(DropReason::UnreachableLimited);
            return;
        }
        if self.replies.push(&self.icmp_buf[..n]) {
            self.counters.add_unreachable_sent();
        } else {
            self.drop(DropReason::NoBuffer);
        }
    }

    /// Sets the clock for the packets that follow: whole seconds on a monotonic clock
    /// (any epoch, the same for every worker of the device).
    #[inline]
    pub fn set_now(&mut self, now: u32) {
        self.now = now;
    }

    /// Sets the receive clock for the datagrams that follow: a [`crate::core::path::mono_ns`]
    /// reading, stored as a peer's `last_direct_rx_ns` / `last_relay_rx_ns` when an
    /// authenticated datagram arrives. The drivers read it once per batch.
    #[inline]
    pub fn set_now_ns(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
    }

    /// The shared drop counters.
    pub fn counters(&self) -> &DropCounters {
        &self.counters
    }

    #[inline]
    fn drop(&self, r: DropReason) {
        self.counters.add(r);
    }

    /// Handles one TUN read (with its virtio header when the TUN has one). The buffer is
    /// mutable because checksums are completed in place.
    pub fn on_tun(&mut self, snap: &Snapshot, buf: &mut [u8]) -> Result<(), Full> {
        let (hdr, pkt) = if self.vnet {
            if buf.len() < offload::VNET_HDR_LEN {
                self.drop(DropReason::MalformedInner);
                return Ok(());
            }
            let (h, p) = buf.split_at_mut(offload::VNET_HDR_LEN);
            match offload::VirtioNetHdr::parse(h) {
                Ok(h) => (Some(h), p),
                Err(_) => {
                    self.drop(DropReason::MalformedInner);
                    return Ok(());
                }
            }
        } else {
            (None, buf)
        };
        let Some(dst) = wire::peek_dst(pkt) else {
            self.drop(DropReason::MalformedInner);
            return Ok(());
        };
        let Some(entry) = snap.route_entry(dst) else {
            self.no_route(pkt);
            return Ok(());
        };
        let peer = &entry.peer;
        let mut st = peer.lock();
        // Once per super-packet: every segment shares the first one's ports.
        if let Some(f) = &entry.filter {
            if let Err(d) = f.check(Dir::Out, pkt, &mut st.flows, self.now) {
                drop(st);
                self.drop(deny_reason(d, Dir::Out));
                return Ok(());
            }
        }
        let Some(endpoint) = st.endpoint else {
            drop(st);
            self.drop(DropReason::NoEndpoint);
            return Ok(());
        };
        let mut sent = 0usize;
        let counters = &self.counters;
        let tx = &mut self.tx;
        let result = match hdr {
            Some(h) if h.is_gso() => {
                let mut full = false;
                let r = offload::split(&h, pkt, &mut self.seg, |seg| {
                    match encapsulate(&mut st.tunn, seg, endpoint, tx, counters) {
                        Ok(n) => {
                            sent += n;
                            std::ops::ControlFlow::Continue(())
                        }
                        Err(Full) => {
                            full = true;
                            std::ops::ControlFlow::Break(())
                        }
                    }
                });
                if r.is_err() {
                    counters.add(DropReason::MalformedInner);
                }
                if full {
                    Err(Full)
                } else {
                    Ok(())
                }
            }
            Some(h) => {
                if h.flags & offload::flags::NEEDS_CSUM != 0
                    && offload::complete_checksum(&h, pkt).is_err()
                {
                    counters.add(DropReason::MalformedInner);
                    return Ok(());
                }
                encapsulate(&mut st.tunn, pkt, endpoint, tx, counters).map(|n| sent += n)
            }
            None => encapsulate(&mut st.tunn, pkt, endpoint, tx, counters).map(|n| sent += n),
        };
        drop(st);
        peer.stats.add_tx(sent);
        result
    }

    /// Handles one UDP receive: `buf` holds one datagram, or with GRO several datagrams of
    /// `segment` bytes each (the last may be shorter).
    pub fn on_udp(
        &mut self,
        snap: &Snapshot,
        src: SocketAddr,
        buf: &[u8],
        segment: Option<u16>,
        sink: &mut impl TunSink,
    ) -> Result<(), Full> {
        let seg = match segment {
            Some(s) if s > 0 => usize::from(s),
            _ => buf.len().max(1),
        };
        // Consecutive data datagrams for one peer share one lock acquisition.
        let mut cur: Option<(&Peer, MutexGuard<'_, PeerState>)> = None;
        let mut rx = 0usize;
        let mut result = Ok(());
        let now = self.now;
        for d in buf.chunks(seg) {
            let Some(msg) = wire::WgMessage::new_checked(d).ok() else {
                self.not_wireguard(src, d);
                continue;
            };
            if msg.message_type() != wire::MessageType::Data {
                if let Some((p, g)) = cur.take() {
                    drop(g);
                    p.stats.add_rx(std::mem::take(&mut rx));
                }
                if let Err(e) = self.on_handshake(snap, src, d, msg.message_type()) {
                    result = Err(e);
                }
                continue;
            }
            let Some(ridx) = msg.receiver_index() else {
                self.drop(DropReason::MalformedOuter);
                continue;
            };
            let same = matches!(&cur, Some((p, _)) if p.index == ridx >> 8);
            if !same {
                if let Some((p, g)) = cur.take() {
                    drop(g);
                    p.stats.add_rx(std::mem::take(&mut rx));
                }
                let Some(p) = snap.by_receiver(ridx) else {
                    self.drop(DropReason::UnknownIndex);
                    continue;
                };
                cur = Some((p, p.lock()));
            }
            let Some((peer, st)) = cur.as_mut() else {
                continue;
            };
            match st.tunn.decapsulate(Some(src.ip()), d, &mut self.dec) {
                TunnResult::WriteToTunnelV4(p, a) => {
                    let ok = deliver(
                        snap,
                        peer,
                        IpAddr::V4(a),
                        p,
                        (&mut st.flows, now),
                        sink,
                        &self.counters,
                    );
                    if ok {
                        rx += d.len();
                        if st.endpoint != Some(src) {
                            st.endpoint = Some(src);
                        }
                    }
                }
                TunnResult::WriteToTunnelV6(p, a) => {
                    let ok = deliver(
                        snap,
                        peer,
                        IpAddr::V6(a),
                        p,
                        (&mut st.flows, now),
                        sink,
                        &self.counters,
                    );
                    if ok {
                        rx += d.len();
                        if st.endpoint != Some(src) {
                            st.endpoint = Some(src);
                        }
                    }
                }
                TunnResult::Done => {
                    // A keepalive: authenticated, so it also updates the endpoint.
                    rx += d.len();
                    st.endpoint = Some(src);
                }
                TunnResult::WriteToNetwork(p) => {
                    if push_copy(&mut self.tx, src, p).is_err() {
                        result = Err(Full);
                    }
                }
                TunnResult::Err(e) => self.counters.add(DropReason::from_wg(&e)),
            }
        }
        if let Some((p, g)) = cur.take() {
            drop(g);
            p.stats.add_rx(rx);
        }
        result
    }

    /// Handshake initiation, response or cookie reply.
    /// A datagram that failed the WireGuard check: to the control queue if it is STUN or
    /// relay control, otherwise counted (see `core::demux`). Off the WireGuard fast path.
    #[cold]
    fn not_wireguard(&self, src: SocketAddr, d: &[u8]) {
        match demux::classify(d) {
            demux::Kind::WireGuard => self.drop(DropReason::MalformedOuter),
            k @ (demux::Kind::Stun | demux::Kind::RelayControl) => {
                let queued = self.control.as_ref().map(|q| q.push(src, k, d).is_ok());
                if queued != Some(true) {
                    self.drop(DropReason::ControlDropped);
                }
            }
            // No relay client in the pipeline yet: a relay frame has no session to go to.
            demux::Kind::RelayFrame | demux::Kind::Junk => self.drop(DropReason::Junk),
        }
    }

    fn on_handshake(
        &mut self,
        snap: &Snapshot,
        src: SocketAddr,
        d: &[u8],
        ty: wire::MessageType,
    ) -> Result<(), Full> {
        use wire::MessageType as T;
        let peer = match ty {
            T::HandshakeInit => {
                // MAC1 and load check before the expensive Diffie-Hellman (whitepaper §5.3).
                let mut cookie = [0u8; 64];
                let packet = match snap.limiter.verify_packet(Some(src.ip()), d, &mut cookie) {
                    Ok(p) => p,
                    Err(TunnResult::WriteToNetwork(c)) => {
                        self.drop(DropReason::RateLimited);
                        return push_copy(&mut self.tx, src, c);
                    }
                    Err(TunnResult::Err(e)) => {
                        self.drop(DropReason::from_wg(&e));
                        return Ok(());
                    }
                    Err(_) => {
                        self.drop(DropReason::Protocol);
                        return Ok(());
                    }
                };
                let Packet::HandshakeInit(init) = packet else {
                    self.drop(DropReason::MalformedOuter);
                    return Ok(());
                };
                let half = match parse_handshake_anon(&snap.private_key, &snap.public_key, &init) {
                    Ok(h) => h,
                    Err(e) => {
                        self.drop(DropReason::from_wg(&e));
                        return Ok(());
                    }
                };
                match snap.by_key(&half.peer_static_public) {
                    Some(p) => p,
                    None => {
                        self.drop(DropReason::UnknownKey);
                        return Ok(());
                    }
                }
            }
            T::HandshakeResp | T::CookieReply => {
                let idx = match wire::WgMessage::new_checked(d) {
                    Ok(m) => m.receiver_index().unwrap_or(0),
                    Err(_) => {
                        self.drop(DropReason::MalformedOuter);
                        return Ok(());
                    }
                };
                match snap.by_receiver(idx) {
                    Some(p) => p,
                    None => {
                        self.drop(DropReason::UnknownIndex);
                        return Ok(());
                    }
                }
            }
            T::Data => return Ok(()),
        };
        let mut st = peer.lock();
        let mut result = Ok(());
        match st.tunn.decapsulate(Some(src.ip()), d, &mut self.dec) {
            TunnResult::WriteToNetwork(p) => {
                st.endpoint = Some(src);
                result = push_copy(&mut self.tx, src, p);
            }
            TunnResult::Done if ty != T::CookieReply => st.endpoint = Some(src),
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                self.drop(DropReason::from_wg(&e));
                return Ok(());
            }
            _ => {}
        }
        peer.stats.add_rx(d.len());
        // A completed handshake releases packets boringtun queued while it had no session.
        let endpoint = st.endpoint.unwrap_or(src);
        loop {
            let tx = &mut self.tx;
            let counters = &self.counters;
            let mut again = false;
            let r = tx.push(endpoint, need(MAX_MTU), |buf| {
                match st.tunn.decapsulate(None, &[], buf) {
                    TunnResult::WriteToNetwork(p) => {
                        again = true;
                        p.len()
                    }
                    TunnResult::Err(e) => {
                        counters.add(DropReason::from_wg(&e));
                        0
                    }
                    _ => 0,
                }
            });
            if r.is_err() {
                result = Err(Full);
                break;
            }
            if !again {
                break;
            }
        }
        result
    }
}

/// Encrypts one inner packet for `endpoint` into the batch; returns ciphertext bytes queued.
#[inline]
fn encapsulate(
    tunn: &mut Tunn,
    pkt: &[u8],
    endpoint: SocketAddr,
    tx: &mut TxBatch,
    counters: &DropCounters,
) -> Result<usize, Full> {
    let mut n = 0;
    tx.push(endpoint, need(pkt.len()), |buf| {
        match tunn.encapsulate(pkt, buf) {
            TunnResult::WriteToNetwork(p) => {
                n = p.len();
                n
            }
            TunnResult::Err(e) => {
                counters.add(DropReason::from_wg(&e));
                0
            }
            _ => 0,
        }
    })?;
    Ok(n)
}

fn push_copy(tx: &mut TxBatch, dst: SocketAddr, p: &[u8]) -> Result<(), Full> {
    let n = p.len();
    tx.push(dst, need(n), |buf| {
        buf[..n].copy_from_slice(p);
        n
    })
}

/// Cryptokey routing on receive: the inner source must be one of the sending peer's
/// AllowedIPs (boringtun does not check this); the inner destination must be this node's
/// (`core::local`: a peer may not route through us); then the peer's packet filter with its
/// flow table (`flows`, and the clock). Returns whether the packet came from the peer's
/// allowed sources (a packet refused for its destination or by the filter did: it still
/// counts as received and may move the endpoint).
#[inline]
fn deliver(
    snap: &Snapshot,
    peer: &Peer,
    src: IpAddr,
    pkt: &[u8],
    flows: (&mut FlowTable, u32),
    sink: &mut impl TunSink,
    counters: &DropCounters,
) -> bool {
    let Some(entry) = snap.source_entry(peer, src) else {
        counters.add(DropReason::SourceNotAllowed);
        return false;
    };
    match wire::peek_dst(pkt) {
        Some(dst) if snap.is_local(dst) => {}
        Some(_) => {
            counters.add(DropReason::DestinationNotLocal);
            return true;
        }
        None => {
            counters.add(DropReason::MalformedDecrypted);
            return true;
        }
    }
    if let Some(f) = &entry.filter {
        if let Err(d) = f.check(Dir::In, pkt, flows.0, flows.1) {
            counters.add(deny_reason(d, Dir::In));
            return true;
        }
    }
    if !sink.push(pkt) {
        counters.add(DropReason::NoBuffer);
    }
    true
}

/// The drop counter for a filter refusal.
#[inline]
fn deny_reason(d: Deny, dir: Dir) -> DropReason {
    match (d, dir) {
        (Deny::Malformed, Dir::Out) => DropReason::MalformedInner,
        (Deny::Malformed, Dir::In) => DropReason::MalformedDecrypted,
        (Deny::NotAllowed, Dir::Out) => DropReason::FilteredOut,
        (Deny::NotAllowed, Dir::In) => DropReason::FilteredIn,
        (Deny::CtFull, _) => DropReason::CtFull,
        (Deny::InvalidState, _) => DropReason::CtInvalid,
        (Deny::IcmpUnrelated, _) => DropReason::IcmpUnrelated,
    }
}
