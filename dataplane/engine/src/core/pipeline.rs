//! The per-worker packet pipeline: what happens to one batch of TUN reads and UDP receives.
//!
//! ```text
//! outbound: TUN read ─▶ [virtio hdr: split TSO/USO super-packet, complete checksums]
//!           ─▶ route lookup (inner dst → peer + filter, once per super-packet;
//!              no peer: dropped, ICMP unreachable queued for the TUN, rate limited)
//!           ─▶ lock peer once ─▶ packet filter (port rules + the peer's flow table,
//!              first segment's headers; the destination's own rules when it is a client
//!              behind the peer, the routed filter when it is inside a prefix routed
//!              through the peer, `core::behind`; replies only for a LAN host's packet
//!              leaving a subnet router, `core::local`)
//!           ─▶ Tunn::encapsulate each segment straight into the TxBatch slot of its
//!              destination (the direct endpoint, or the relay with the 4-byte header
//!              rewritten in the slot: `core::path`, resolved once per super-packet)
//!           ─▶ driver: one GSO sendmsg per slot
//! inbound:  UDP receive (GRO: n datagrams of one segment size) ─▶ demux by message type and
//!           receiver index (lock peer once per run of datagrams; a datagram that is not
//!           WireGuard: a relay frame restored into a scratch buffer and taken on like
//!           WireGuard, STUN and relay control to the control queue, see `core::demux`,
//!           junk dropped) ─▶ Tunn::decapsulate (into room the TUN sink offers, where
//!           the packet is written from: no copy when it joins a head) ─▶ an
//!           authenticated datagram moves the direct endpoint or the relay route, by how
//!           it came; a direct-path probe
//!           (`core::path::Probe`) is answered or matched here and never reaches the TUN,
//!           and only a direct answer to our own probe upgrades a relayed path
//!           ─▶ allowed-source check ─▶ local-destination check ─▶ packet filter
//!              (per decrypted packet, with the peer's flow table under the lock already held;
//!              the source's own rules when it is a client behind the peer; the routed
//!              filter, replies only, when it is inside a prefix routed through the peer;
//!              the route filter, not our rules for the peer, for a destination admitted by
//!              a route grant)
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
use std::sync::atomic::Ordering;
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
use crate::core::local::Refused;
use crate::core::path::{self, PathKind, RelayRoute, Target};
use crate::core::peer::{Peer, PeerState};
use crate::core::table::Snapshot;
use crate::core::tunbatch::TunBatch;
use crate::core::{offload, wire};

/// Where decrypted inner packets go (the GRO coalescer or a plain batch).
///
/// A sink may offer room to decrypt into ([`TunSink::land`]), where the packet will most
/// likely be written from, saving the copy [`TunSink::push`] makes. Every `land` that
/// returned room is followed by exactly one [`TunSink::commit`] or [`TunSink::abandon`]
/// before any other call.
pub trait TunSink {
    /// Takes one decrypted IP packet; false if there is no room (the packet is dropped).
    fn push(&mut self, pkt: &[u8]) -> bool;

    /// Room of at least `need` bytes for the next decrypted packet, written from the
    /// slice's start, or `None` (then decrypt elsewhere and [`TunSink::push`]).
    fn land(&mut self, need: usize) -> Option<&mut [u8]> {
        let _ = need;
        None
    }

    /// Takes the `len`-byte packet written at the start of the room [`TunSink::land`] gave,
    /// as [`TunSink::push`] would; false if there is no room for it (dropped).
    fn commit(&mut self, len: usize) -> bool {
        let _ = len;
        false
    }

    /// Gives back the room [`TunSink::land`] gave, taking nothing.
    fn abandon(&mut self) {}
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

/// The message type of a WireGuard cookie reply.
const COOKIE_REPLY: u8 = 3;

/// One worker's pipeline state.
pub struct Pipeline {
    counters: Arc<DropCounters>,
    /// Encrypted datagrams waiting to be sent.
    pub tx: TxBatch,
    vnet: bool,
    seg: Box<[u8]>,
    dec: Box<[u8]>,
    /// Scratch for a received relay frame restored to its WireGuard message (the receive
    /// buffer itself is never written).
    frame: Box<[u8]>,
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
            frame: vec![0u8; 65_536].into_boxed_slice(),
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
        // The filter of the destination: a client's behind its concentrator (`core::behind`),
        // else the peer's; for traffic a concentrator forwards for its client (`core::local`)
        // the rules between the member and the client (a client's packet to a member), none
        // (a member's packet to a client, checked on receive). Both extra checks are one
        // branch when unused.
        // A LAN host's packet leaving a subnet router towards a member passes only as a
        // reply of the member's routed flow (`core::local`); a member's packet into a route
        // gets the routed filter from the router's entry (`core::behind`).
        let src = wire::peek_src(pkt);
        let forwarded = src.and_then(|src| {
            snap.local
                .forward_filter_out(&entry.peer.public_key, src, dst)
        });
        let filter = match forwarded {
            Some(f) => f,
            None => match src.and_then(|src| snap.local.route_filter_out(&peer.public_key, src)) {
                Some(f) => Some(f),
                None => entry.filter_for(dst),
            },
        };
        let mut st = peer.lock();
        // Once per super-packet: every segment shares the first one's ports.
        if let Some(f) = filter {
            if let Err(d) = f.check(Dir::Out, pkt, &mut st.flows, self.now) {
                drop(st);
                self.drop(deny_reason(d, Dir::Out));
                return Ok(());
            }
        }
        // Direct or through the relay (`core::path`): resolved once per super-packet.
        let Some(to) = path::target(st.endpoint, st.path, st.relay) else {
            drop(st);
            self.drop(DropReason::NoEndpoint);
            return Ok(());
        };
        let (endpoint, handle) = (to.addr(), to.handle());
        let mut sent = 0usize;
        let counters = &self.counters;
        let tx = &mut self.tx;
        let result = match hdr {
            Some(h) if h.is_gso() => {
                let mut full = false;
                let r = offload::split(&h, pkt, &mut self.seg, |seg| {
                    match encapsulate(&mut st.tunn, seg, endpoint, handle, tx, counters) {
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
                encapsulate(&mut st.tunn, pkt, endpoint, handle, tx, counters).map(|n| sent += n)
            }
            None => {
                encapsulate(&mut st.tunn, pkt, endpoint, handle, tx, counters).map(|n| sent += n)
            }
        };
        drop(st);
        peer.stats.add_tx(sent);
        result
    }

    /// Handles one UDP receive: `buf` holds one datagram, or with GRO several datagrams of
    /// `segment` bytes each (the last may be shorter). WireGuard messages and relay frames
    /// (restored first, see `core::path`) take the same path; what arrived through a relay
    /// is answered through it, and an authenticated datagram updates the peer's direct
    /// endpoint or its relay route depending on how it came ([`authenticated`]). A probe
    /// (`core::path::Probe`) is handled by [`on_probe`] instead of reaching the TUN.
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
        let mut run = Run::default();
        let mut result = Ok(());
        let now = self.now;
        // Taken for the call (a pointer swap, no allocation) so that a restored frame can
        // be borrowed while `self` is used mutably; put back below.
        let mut frame = std::mem::take(&mut self.frame);
        for raw in buf.chunks(seg) {
            let (msg, via) = match wire::WgMessage::new_checked(raw) {
                Ok(m) => (m, None),
                Err(_) => match self.relay_frame(src, raw, &mut frame) {
                    Some((m, h)) => (m, Some(h)),
                    None => continue,
                },
            };
            let d = msg.as_bytes();
            if msg.message_type() != wire::MessageType::Data {
                if let Some((p, g)) = cur.take() {
                    drop(g);
                    run.end(p, self.now_ns);
                }
                if let Err(e) = self.on_handshake(snap, src, via, d, msg.message_type()) {
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
                    run.end(p, self.now_ns);
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
            let mut probe = None;
            // Decrypted straight into the sink's room when it offers some (the coalescer's
            // head, where the segment is written from: no copy), else into the scratch.
            let room = sink.land(d.len());
            let landed = room.is_some();
            let (authed, write) = {
                let dst: &mut [u8] = match room {
                    Some(r) => r,
                    None => &mut self.dec,
                };
                let start = dst.as_ptr();
                match st.tunn.decapsulate(Some(src.ip()), d, dst) {
                    TunnResult::WriteToTunnelV4(p, a) => admit(
                        snap,
                        peer,
                        IpAddr::V4(a),
                        p,
                        start,
                        (&mut st.flows, now),
                        &self.counters,
                    ),
                    TunnResult::WriteToTunnelV6(p, a) => match path::Probe::parse(p) {
                        None => admit(
                            snap,
                            peer,
                            IpAddr::V6(a),
                            p,
                            start,
                            (&mut st.flows, now),
                            &self.counters,
                        ),
                        Some(pr) => {
                            probe = Some(pr);
                            (true, None)
                        }
                    },
                    // A keepalive: authenticated, so it also updates the endpoint.
                    TunnResult::Done => (true, None),
                    TunnResult::WriteToNetwork(p) => {
                        if push_reply(&mut self.tx, src, via, p).is_err() {
                            result = Err(Full);
                        }
                        (false, None)
                    }
                    TunnResult::Err(e) => {
                        self.counters.add(DropReason::from_wg(&e));
                        (false, None)
                    }
                }
            };
            let taken = match (write, landed) {
                (Some(n), true) => sink.commit(n),
                (Some(n), false) => sink.push(&self.dec[..n]),
                (None, true) => {
                    sink.abandon();
                    true
                }
                (None, false) => true,
            };
            if !taken {
                self.counters.add(DropReason::NoBuffer);
            }
            if authed {
                run.rx += d.len();
                if via.is_none() {
                    // The direct fast path: as before the relay, plus one predictable test.
                    if st.endpoint != Some(src) {
                        st.endpoint = Some(src);
                    }
                    match probe {
                        None => run.direct = true,
                        Some(pr) => {
                            // A ping is the peer probing: no evidence about our direction.
                            run.direct |= matches!(pr, path::Probe::Pong(_));
                            match on_probe(st, src, pr, &mut self.tx, &self.counters) {
                                Ok(n) => peer.stats.add_tx(n),
                                Err(Full) => result = Err(Full),
                            }
                        }
                    }
                } else {
                    // Probes through a relay prove nothing about a direct path: ignored.
                    run.relay = true;
                    authenticated(st, src, via);
                }
            }
        }
        if let Some((p, g)) = cur.take() {
            drop(g);
            run.end(p, self.now_ns);
        }
        self.frame = frame;
        result
    }

    /// A datagram that failed the WireGuard check: a relay frame is restored into `out`
    /// and returned with its handle when it carries a well-formed WireGuard message
    /// (otherwise dropped and counted); anything else goes to [`Pipeline::not_wireguard`].
    /// Off the direct fast path.
    #[cold]
    fn relay_frame<'a>(
        &self,
        src: SocketAddr,
        raw: &[u8],
        out: &'a mut [u8],
    ) -> Option<(wire::WgMessage<&'a [u8]>, u32)> {
        if demux::classify(raw) != demux::Kind::RelayFrame {
            self.not_wireguard(src, raw);
            return None;
        }
        let Ok((handle, n)) = path::restore(raw, out) else {
            self.drop(DropReason::RelayMalformed);
            return None;
        };
        let out: &'a [u8] = out;
        match wire::WgMessage::new_checked(&out[..n]) {
            Ok(m) => Some((m, handle)),
            Err(_) => {
                self.drop(DropReason::RelayMalformed);
                None
            }
        }
    }

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
            // Relay frames are taken before this (`relay_frame`); one here is malformed.
            demux::Kind::RelayFrame => self.drop(DropReason::RelayMalformed),
            demux::Kind::Junk => self.drop(DropReason::Junk),
        }
    }

    /// Handshake initiation, response or cookie reply, from `src` directly or (`via` = the
    /// handle in the frame) through the relay at `src`. Answers go back the way the message
    /// came; packets a completed handshake releases follow the peer's path.
    fn on_handshake(
        &mut self,
        snap: &Snapshot,
        src: SocketAddr,
        via: Option<u32>,
        d: &[u8],
        ty: wire::MessageType,
    ) -> Result<(), Full> {
        use wire::MessageType as T;
        let mut resp_index = None;
        // MAC1 and the device's load check, once per initiation or response and before any
        // Diffie-Hellman (whitepaper §5.3): over the limit, a message without a valid MAC2
        // gets a cookie reply. The peer's `Tunn` checks MAC1 again but never counts it
        // (`core::table`'s MAC1 checker), so the limit is exactly `HANDSHAKE_RATE_LIMIT`.
        let packet = match ty {
            T::HandshakeInit | T::HandshakeResp => {
                let mut cookie = [0u8; 64];
                match snap.limiter.verify_packet(Some(src.ip()), d, &mut cookie) {
                    Ok(p) => Some(p),
                    Err(TunnResult::WriteToNetwork(c)) => {
                        self.drop(DropReason::RateLimited);
                        return push_reply(&mut self.tx, src, via, c);
                    }
                    Err(TunnResult::Err(e)) => {
                        self.drop(DropReason::from_wg(&e));
                        return Ok(());
                    }
                    Err(_) => {
                        self.drop(DropReason::Protocol);
                        return Ok(());
                    }
                }
            }
            T::CookieReply | T::Data => None,
        };
        let peer = match ty {
            T::HandshakeInit => {
                let Some(Packet::HandshakeInit(init)) = packet else {
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
                if ty == T::HandshakeResp {
                    resp_index = Some(idx);
                }
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
        let authed = match st.tunn.decapsulate(Some(src.ip()), d, &mut self.dec) {
            TunnResult::WriteToNetwork(p) => {
                // A cookie reply (ours, under load, or one received) proves nothing about
                // who sent the message.
                let cookie = p.first() == Some(&COOKIE_REPLY);
                result = push_reply(&mut self.tx, src, via, p);
                ty != T::CookieReply && !cookie
            }
            TunnResult::Done => ty != T::CookieReply,
            TunnResult::Err(e) => {
                self.drop(DropReason::from_wg(&e));
                return Ok(());
            }
            _ => false,
        };
        if authed {
            // The peer's initiation arriving directly proves only its direction: it does
            // not count as direct receipt (a response does: it answers our initiation, and
            // so does the keepalive that confirms a handshake we answered). Otherwise a
            // member whose direct sends are dropped would see its direct handshake
            // attempt "answered" by the peer's initiations and stay on a dead direct path.
            match via {
                None if ty == T::HandshakeInit => {}
                None => peer
                    .stats
                    .last_direct_rx_ns
                    .store(self.now_ns, Ordering::Relaxed),
                Some(_) => peer
                    .stats
                    .last_relay_rx_ns
                    .store(self.now_ns, Ordering::Relaxed),
            }
            authenticated(&mut st, src, via);
            // A response straight from the peer to our direct probe's initiation: the
            // round trip went direct both ways (responders answer the way the initiation
            // came). Through a relay, or to another initiation, it proves nothing.
            if via.is_none() && resp_index.is_some_and(|i| st.probes.answers_init(i)) {
                upgrade(&mut st);
            }
        }
        peer.stats.add_rx(d.len());
        // A completed handshake releases packets boringtun queued while it had no session:
        // along the peer's path, or back the way the handshake came if it has none.
        let to = path::target(st.endpoint, st.path, st.relay).unwrap_or(match via {
            None => Target::Direct(src),
            Some(handle) => Target::Relay(RelayRoute { addr: src, handle }),
        });
        let (endpoint, handle) = (to.addr(), to.handle());
        loop {
            let tx = &mut self.tx;
            let counters = &self.counters;
            let mut again = false;
            let r = tx.push(endpoint, need(MAX_MTU), |buf| {
                match st.tunn.decapsulate(None, &[], buf) {
                    TunnResult::WriteToNetwork(p) => {
                        again = true;
                        let n = p.len();
                        if let Some(h) = handle {
                            path::rewrite(&mut buf[..n], h);
                        }
                        n
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

/// What one run of datagrams for one peer brought: ciphertext bytes and whether any
/// authenticated datagram came directly or through a relay. Flushed into the peer's
/// counters once per run ([`Run::end`]), not per datagram.
#[derive(Default)]
struct Run {
    rx: usize,
    direct: bool,
    relay: bool,
}

impl Run {
    #[inline]
    fn end(&mut self, peer: &Peer, now_ns: u64) {
        let r = std::mem::take(self);
        peer.stats.add_rx(r.rx);
        if r.direct {
            peer.stats
                .last_direct_rx_ns
                .store(now_ns, Ordering::Relaxed);
        }
        if r.relay {
            peer.stats.last_relay_rx_ns.store(now_ns, Ordering::Relaxed);
        }
    }
}

/// State changes on an *authenticated* datagram from `src` (the contract of `core::path`):
/// directly (`via` = `None`) it moves the direct endpoint (roaming); through a relay
/// (`via` = the handle in the frame) it moves the relay route to that relay and handle
/// (relay roaming). Neither changes the path: only an answered probe upgrades it
/// ([`on_probe`], and the probe initiation's response in `Pipeline::on_handshake`).
#[inline]
fn authenticated(st: &mut PeerState, src: SocketAddr, via: Option<u32>) {
    match via {
        None => {
            if st.endpoint != Some(src) {
                st.endpoint = Some(src);
            }
        }
        Some(handle) => {
            let route = Some(RelayRoute { addr: src, handle });
            if st.relay != route {
                st.relay = route;
            }
        }
    }
}

/// An authenticated probe that arrived straight from `src` (`core::path`): a ping is
/// answered with a pong of the same id straight back to `src`, whatever our path (that is
/// the point: the peer learns whether *its* direct sends reach us), unless we are pinned to
/// the relay; a pong that answers one of our pings upgrades a relayed path. Off the fast
/// path.
#[cold]
fn on_probe(
    st: &mut PeerState,
    src: SocketAddr,
    probe: path::Probe,
    tx: &mut TxBatch,
    counters: &DropCounters,
) -> Result<usize, Full> {
    match probe {
        // A peer pinned to its relay (`--force-relay`) does not answer: a relayed peer
        // gets no direct answer from it to switch on (as before probes were answered).
        path::Probe::Ping(_) if st.relay_only => Ok(0),
        path::Probe::Ping(id) => {
            let pong = path::Probe::Pong(id).packet();
            encapsulate(&mut st.tunn, &pong, src, None, tx, counters)
        }
        path::Probe::Pong(id) => {
            if st.probes.answers_ping(id) {
                upgrade(st);
            }
            Ok(0)
        }
    }
}

/// Relay → Direct on an answered direct probe, unless the peer is pinned.
#[cold]
fn upgrade(st: &mut PeerState) {
    if st.path == PathKind::Relay && !st.relay_only {
        st.path = PathKind::Direct;
    }
}

/// Encrypts one inner packet for `endpoint` into the batch, as a relay frame for `handle`
/// when there is one (the header rewritten in the slot: no copy, no extra bytes); returns
/// ciphertext bytes queued.
#[inline]
fn encapsulate(
    tunn: &mut Tunn,
    pkt: &[u8],
    endpoint: SocketAddr,
    handle: Option<u32>,
    tx: &mut TxBatch,
    counters: &DropCounters,
) -> Result<usize, Full> {
    // Two copies of the loop body: the direct one is exactly the pre-relay code, so the
    // direct path pays only this branch.
    match handle {
        None => encapsulate_with(tunn, pkt, endpoint, tx, counters, |_| {}),
        Some(h) => encapsulate_with(tunn, pkt, endpoint, tx, counters, |m| path::rewrite(m, h)),
    }
}

#[inline(always)]
fn encapsulate_with(
    tunn: &mut Tunn,
    pkt: &[u8],
    endpoint: SocketAddr,
    tx: &mut TxBatch,
    counters: &DropCounters,
    header: impl FnOnce(&mut [u8]),
) -> Result<usize, Full> {
    let mut n = 0;
    tx.push(endpoint, need(pkt.len()), |buf| {
        match tunn.encapsulate(pkt, buf) {
            TunnResult::WriteToNetwork(p) => {
                n = p.len();
                header(&mut buf[..n]);
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

/// Queues a copy of the answer `p` to `dst`, as a relay frame for `via` when the message
/// it answers came through a relay.
fn push_reply(tx: &mut TxBatch, dst: SocketAddr, via: Option<u32>, p: &[u8]) -> Result<(), Full> {
    let n = p.len();
    tx.push(dst, need(n), |buf| {
        buf[..n].copy_from_slice(p);
        if let Some(h) = via {
            path::rewrite(&mut buf[..n], h);
        }
        n
    })
}

/// Cryptokey routing on receive: the inner source must be one of the sending peer's
/// AllowedIPs (boringtun does not check this); the inner destination must be this node's
/// (`core::local`: a peer may not route through us); then the peer's packet filter with its
/// flow table (`flows`, and the clock). Returns whether the packet came from the peer's
/// allowed sources (a packet refused for its destination or by the filter did: it still
/// counts as received and may move the endpoint), and the length of the packet to write
/// to the TUN if it passed: `pkt` as decrypted at `start`, the start of the buffer given
/// to boringtun (which writes packets there; one elsewhere is dropped as malformed).
#[inline]
fn admit(
    snap: &Snapshot,
    peer: &Peer,
    src: IpAddr,
    pkt: &[u8],
    start: *const u8,
    flows: (&mut FlowTable, u32),
    counters: &DropCounters,
) -> (bool, Option<usize>) {
    let Some(entry) = snap.source_entry(peer, src) else {
        counters.add(DropReason::SourceNotAllowed);
        return (false, None);
    };
    let dst = wire::peek_dst(pkt);
    let mut reply_only = false;
    match dst.map(|dst| snap.admits_destination(peer, dst)) {
        Some(Ok(())) => {}
        // A concentrator's client answered by a member it may reach (`core::local`): only
        // inside a flow the client opened, checked below with the reply filter.
        Some(Err(_)) if dst.is_some_and(|d| snap.local.admits_reply(&peer.public_key, d)) => {
            reply_only = true;
        }
        Some(Err(Refused::NotLocal)) => {
            counters.add(DropReason::DestinationNotLocal);
            return (true, None);
        }
        Some(Err(Refused::NotGranted)) => {
            counters.add(DropReason::DestinationNotGranted);
            return (true, None);
        }
        None => {
            counters.add(DropReason::MalformedDecrypted);
            return (true, None);
        }
    }
    // The source's filter (a client's behind its concentrator, `core::behind`); for
    // traffic a concentrator forwards for its client (`core::local`), the rules between
    // the sending member and the client, none from the client.
    let routed = if reply_only {
        None
    } else {
        dst.and_then(|dst| snap.local.route_filter_in(&peer.public_key, dst))
    };
    let filter = if reply_only {
        snap.local.reply_filter()
    } else if routed.is_some() {
        // Admitted by a route grant: the route filter, not the router's rules for the
        // peer (`core::local`).
        routed
    } else {
        match dst.and_then(|dst| snap.local.forward_filter_in(&peer.public_key, src, dst)) {
            Some(f) => f,
            None => entry.filter_for(src),
        }
    };
    if let Some(f) = filter {
        if let Err(d) = f.check(Dir::In, pkt, flows.0, flows.1) {
            counters.add(deny_reason(d, Dir::In));
            return (true, None);
        }
    }
    if !std::ptr::eq(pkt.as_ptr(), start) {
        counters.add(DropReason::MalformedDecrypted);
        return (true, None);
    }
    (true, Some(pkt.len()))
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
