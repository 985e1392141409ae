//! Where a peer's datagrams go: straight to its *direct* endpoint, or through a relay
//! (relay protocol: `relay/PROTOCOL.md`), the 4-byte header rewrite that makes a
//! WireGuard message a relay frame and back, and the direct-path probe that proves our
//! direct sends reach the peer.
//!
//! One concept, owned here:
//! * [`PathKind`]: the path a peer's sends take, chosen by the control side (the joiner's
//!   path manager) with [`set_path`], and changed by the data plane in exactly one case: a
//!   relayed peer is upgraded `Relay` → `Direct` when an authenticated datagram received
//!   straight from the peer *answers one of our own direct probes* ([`DirectProbes`]),
//!   unless the peer is pinned to its relay
//!   ([`crate::core::peer::PeerState::relay_only`]). Plain direct receipt (data, a
//!   keepalive, the peer's initiation) proves only that the peer → us direction works: if
//!   we upgraded on it while our direction is dropped (a firewall on the peer's side, an
//!   asymmetric NAT) our sends would be lost while the peer's probes kept our direct
//!   receipt fresh: a black hole. So it refreshes `last_direct_rx_ns` and no more.
//! * The probe ([`probe_datagram`], sent by `Handshaker::probe_direct`): with a session, an
//!   encrypted WireGuard data message carrying a [`Probe::Ping`] with a fresh random 64-bit
//!   id as its inner packet; the peer answers a ping that arrived *directly* with a
//!   [`Probe::Pong`] of the same id straight back to the address it came from (whatever
//!   its own path; a peer pinned to the relay does not answer: `--force-relay` gives a
//!   relayed peer no direct answer to switch on, as before), and a direct pong whose id is one of our last [`PROBE_IDS`] pings
//!   upgrades us: the round trip us → peer → us went direct. Without a session the probe is
//!   a handshake initiation; a handshake response received directly whose receiver index
//!   is that initiation's sender index (and which boringtun accepts) proves the same round
//!   trip. A ping or a handshake initiation received directly does not stamp
//!   `last_direct_rx_ns` (it is the peer probing or starting a handshake, and says nothing
//!   about our direction; the joiner's direct attempts and silence fallback read that
//!   stamp); a pong, a handshake response, data and keepalives do. Probe packets never
//!   reach the TUN. Why not a handshake per probe: boringtun keeps one handshake in
//!   flight (plus the previous), a responder stores every handshake's session in its
//!   8-slot ring (overwriting, within 8 probes, the slot its current session sends with,
//!   before the initiator confirmed the new one) and an initiator whose handshakes are
//!   never answered for 90 s (REKEY_ATTEMPT_TIME) drops all its sessions: a forced
//!   initiation every 500 ms while one direction is blocked would break the relayed
//!   session too. A ping inside the session changes no session state.
//! * [`RelayRoute`]: the relay address and the peer's 24-bit handle there. The control side
//!   sets it (after a `LOOKUP`); an authenticated relay frame from the peer moves it to the
//!   frame's relay address and handle (relay roaming). It is never set by anything that
//!   failed authentication.
//! * [`Target`]: what a send resolves to ([`target`]): `path == Relay` with a route sends
//!   to the relay with the header rewritten ([`rewrite`]); `Relay` without a route falls
//!   back to the direct endpoint; `Direct` sends to the endpoint.
//!
//! Wire format (zero bytes of overhead): every WireGuard message starts
//! `[type (1..=4), 0, 0, 0]`; its relay frame starts `[0xE0 | type, h2, h1, h0]` where `h`
//! is the 24-bit handle (big endian): the destination's on the way to the relay, the
//! source's on the way back. [`rewrite`] turns a message into a frame in place (the TxBatch
//! slot: no copy); [`restore`] copies a received frame into a caller's scratch buffer with
//! the header restored (shared receive memory is never written).
//!
//! Clock: the receive times in `PeerStats` (`last_direct_rx_ns`, `last_relay_rx_ns`) are
//! [`mono_ns`] values, which the drivers read once per batch and hand to the sans-IO
//! pipeline ([`crate::core::pipeline::Pipeline::set_now_ns`]); 0 means never.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use crate::core::peer::{Peer, PeerState};

/// The largest relay handle (handles are 24 bits).
pub const HANDLE_MAX: u32 = 0x00FF_FFFF;

/// The high nibble of a relay frame's first byte (`0xE0 | wg_type`).
pub const FRAME_TAG: u8 = 0xE0;

/// A peer's route through a relay: where the relay listens (or the joiner's loopback
/// bridge to it) and the peer's handle there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayRoute {
    /// The relay's UDP address (or the loopback bridge's, when UDP to the relay is blocked).
    pub addr: SocketAddr,
    /// The peer's 24-bit handle at that relay (only the low 24 bits are sent).
    pub handle: u32,
}

/// Which path a peer's sends take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PathKind {
    /// Straight to the peer's endpoint.
    #[default]
    Direct,
    /// Through the peer's relay route (falls back to the endpoint while there is none).
    Relay,
}

impl PathKind {
    /// `"direct"` or `"relay"` (for logs and `peers --json`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
        }
    }
}

/// Where one send goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// To this address, the message as is.
    Direct(SocketAddr),
    /// To the relay, the header rewritten with the handle.
    Relay(RelayRoute),
}

impl Target {
    /// The destination address.
    #[inline]
    pub fn addr(self) -> SocketAddr {
        match self {
            Self::Direct(a) => a,
            Self::Relay(r) => r.addr,
        }
    }

    /// The relay handle to write into the header, if any.
    #[inline]
    pub fn handle(self) -> Option<u32> {
        match self {
            Self::Direct(_) => None,
            Self::Relay(r) => Some(r.handle),
        }
    }
}

/// Where a peer's sends go (see the module docs); `None` when there is nowhere to send.
#[inline]
pub fn target(
    endpoint: Option<SocketAddr>,
    path: PathKind,
    relay: Option<RelayRoute>,
) -> Option<Target> {
    match (path, relay) {
        (PathKind::Relay, Some(r)) => Some(Target::Relay(r)),
        _ => endpoint.map(Target::Direct),
    }
}

/// Turns the WireGuard message at the start of `msg` into a relay frame for `handle`, in
/// place: `[type,0,0,0]` becomes `[0xE0|type, h2, h1, h0]`. A buffer shorter than 4 bytes
/// is left alone (no WireGuard message is that short).
#[inline]
pub fn rewrite(msg: &mut [u8], handle: u32) {
    if let Some(h) = msg.get_mut(..4) {
        let b = (handle & HANDLE_MAX).to_be_bytes();
        h[0] = FRAME_TAG | (h[0] & 0x0F);
        h[1] = b[1];
        h[2] = b[2];
        h[3] = b[3];
    }
}

/// Why a relay frame was refused by [`restore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Not `0xE1..=0xE4` followed by at least 3 bytes.
    NotAFrame,
    /// Larger than the scratch buffer.
    TooLarge,
}

/// Copies the relay frame `frame` into `out` as the WireGuard message it carries
/// (`[type, 0, 0, 0]` restored) and returns the handle and the message length.
#[inline]
pub fn restore(frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), FrameError> {
    let Some((&[b0, h2, h1, h0], rest)) = frame.split_first_chunk::<4>() else {
        return Err(FrameError::NotAFrame);
    };
    if !(0xE1..=0xE4).contains(&b0) {
        return Err(FrameError::NotAFrame);
    }
    let n = frame.len();
    let dst = out.get_mut(..n).ok_or(FrameError::TooLarge)?;
    dst[0] = b0 & 0x0F;
    dst[1..4].fill(0);
    dst[4..].copy_from_slice(rest);
    Ok((u32::from_be_bytes([0, h2, h1, h0]), n))
}

/// Monotonic nanoseconds for `last_direct_rx_ns` / `last_relay_rx_ns`: time since an
/// arbitrary process-wide origin (the first call), plus one so that a real reading is never
/// the 0 that means "never". Only differences between readings mean anything. (The core
/// forbids `unsafe`, so this is `Instant`-based rather than a raw `clock_gettime`; both are
/// CLOCK_MONOTONIC on Linux.)
pub fn mono_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// Sets a peer's path and relay route together, under its lock (the control side's
/// setter; plain writes to the `PeerState` fields under [`Peer::lock`] are equivalent).
/// A `relay` handle above 24 bits is masked when sent.
pub fn set_path(peer: &Peer, path: PathKind, relay: Option<RelayRoute>) {
    let mut st = peer.lock();
    st.path = path;
    st.relay = relay;
}

/// Pins the peer to its relay (`--force-relay`): direct receipt no longer upgrades its path.
pub fn set_relay_only(peer: &Peer, relay_only: bool) {
    peer.lock().relay_only = relay_only;
}

/// How many of our last ping ids a pong may answer (probes go every 500 ms; four cover a
/// round trip of up to about 2 s).
pub const PROBE_IDS: usize = 4;

/// Length of a probe's inner packet: an IPv6 header and 16 bytes of payload.
pub const PROBE_LEN: usize = 56;

/// The IPv6 next-header value of a probe (253: RFC 3692 experimentation).
const PROBE_NEXT_HEADER: u8 = 253;
/// The start of a probe's payload.
const PROBE_MAGIC: [u8; 4] = *b"TBFY";
const PING: u8 = 1;
const PONG: u8 = 2;

/// A direct-path probe, the inner packet of a WireGuard data message (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// "Does my direct send reach you?" — answered with a [`Probe::Pong`] of the same id.
    Ping(u64),
    /// The answer to a [`Probe::Ping`] that arrived directly, sent straight back.
    Pong(u64),
}

impl Probe {
    /// The inner packet: an IPv6 header from `::` to `::` (no real traffic uses that pair;
    /// boringtun checks only the version and length), next header 253, hop limit 0, then
    /// `TBFY`, the kind (1 ping, 2 pong), 3 zero bytes and the id (big endian).
    pub fn packet(self) -> [u8; PROBE_LEN] {
        let (kind, id) = match self {
            Self::Ping(id) => (PING, id),
            Self::Pong(id) => (PONG, id),
        };
        let mut p = [0u8; PROBE_LEN];
        p[0] = 0x60;
        p[5] = 16;
        p[6] = PROBE_NEXT_HEADER;
        p[40..44].copy_from_slice(&PROBE_MAGIC);
        p[44] = kind;
        p[48..56].copy_from_slice(&id.to_be_bytes());
        p
    }

    /// The probe a decrypted inner packet is, if it is exactly one (anything else is
    /// traffic and goes on as before). Total: never panics.
    #[inline]
    pub fn parse(pkt: &[u8]) -> Option<Self> {
        if pkt.len() != PROBE_LEN {
            return None;
        }
        Self::parse_slow(pkt)
    }

    #[cold]
    fn parse_slow(pkt: &[u8]) -> Option<Self> {
        let header_ok = pkt[..8] == [0x60, 0, 0, 0, 0, 16, PROBE_NEXT_HEADER, 0]
            && pkt[8..40].iter().all(|b| *b == 0)
            && pkt[40..44] == PROBE_MAGIC
            && pkt[45..48] == [0, 0, 0];
        if !header_ok {
            return None;
        }
        let id = u64::from_be_bytes(pkt[48..56].try_into().ok()?);
        match pkt[44] {
            PING => Some(Self::Ping(id)),
            PONG => Some(Self::Pong(id)),
            _ => None,
        }
    }
}

/// Our outstanding direct probes to one peer (in its `PeerState`): the ids of the last
/// [`PROBE_IDS`] pings and the sender index of the last probe initiation. Only answers to
/// these upgrade the peer's path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectProbes {
    pings: [u64; PROBE_IDS],
    next: usize,
    init: Option<u32>,
}

impl DirectProbes {
    /// Remembers a ping id we sent (0 is never an id: it marks an empty slot).
    pub fn sent_ping(&mut self, id: u64) {
        if let Some(slot) = self.pings.get_mut(self.next % PROBE_IDS) {
            *slot = id;
        }
        self.next = (self.next + 1) % PROBE_IDS;
    }

    /// Remembers the sender index of a probe initiation we sent.
    pub fn sent_init(&mut self, sender_index: u32) {
        self.init = Some(sender_index);
    }

    /// Whether a pong with `id` answers one of our pings.
    pub fn answers_ping(&self, id: u64) -> bool {
        id != 0 && self.pings.contains(&id)
    }

    /// Whether a handshake response with `receiver_index` answers our probe initiation.
    pub fn answers_init(&self, receiver_index: u32) -> bool {
        self.init == Some(receiver_index)
    }
}

/// Builds one direct probe for the peer whose state is `st` into `buf` (at least 148
/// bytes) and remembers it in `st.probes`: a ping inside the current session when there is
/// one, else a handshake initiation (which starts a handshake in the session state
/// machine, as any initiation does). Returns the datagram's length, or `None` when the
/// session had nothing to send. The caller sends it straight to a direct candidate; the
/// peer's answer is handled by the pipeline (see the module docs).
pub fn probe_datagram(st: &mut PeerState, buf: &mut [u8]) -> Option<usize> {
    use boringtun::noise::TunnResult;
    if st.tunn.time_since_last_handshake().is_some() {
        let id = loop {
            let id = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
            if id != 0 {
                break id;
            }
        };
        if let TunnResult::WriteToNetwork(p) = st.tunn.encapsulate(&Probe::Ping(id).packet(), buf) {
            if p.first() == Some(&4) {
                let n = p.len();
                st.probes.sent_ping(id);
                return Some(n);
            }
        }
    }
    match st.tunn.format_handshake_initiation(buf, true) {
        TunnResult::WriteToNetwork(p) => {
            let n = p.len();
            let idx = p.get(4..8)?;
            st.probes
                .sent_init(u32::from_le_bytes([idx[0], idx[1], idx[2], idx[3]]));
            Some(n)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rewrite_and_restore_round_trip() {
        for ty in 1..=4u8 {
            let mut msg = vec![ty, 0, 0, 0, 9, 8, 7, 6, 5];
            let orig = msg.clone();
            rewrite(&mut msg, 0x12_3456);
            assert_eq!(&msg[..4], &[0xE0 | ty, 0x12, 0x34, 0x56]);
            assert_eq!(&msg[4..], &orig[4..], "only the header changes");
            assert_eq!(
                crate::core::demux::classify(&msg),
                crate::core::demux::Kind::RelayFrame
            );
            let mut out = [0xAAu8; 64];
            let (h, n) = restore(&msg, &mut out).unwrap();
            assert_eq!((h, &out[..n]), (0x12_3456, &orig[..]));
        }
        // Handles are 24 bits: the top byte never leaks into the type byte.
        let mut msg = [4u8, 0, 0, 0];
        rewrite(&mut msg, 0xFF00_0001);
        assert_eq!(msg, [0xE4, 0, 0, 1]);
        let mut short = [4u8, 0];
        rewrite(&mut short, 7);
        assert_eq!(short, [4, 0]);
    }

    #[test]
    fn restore_refuses_what_is_not_a_frame() {
        let mut out = [0u8; 8];
        for bad in [
            &[][..],
            &[0xE1, 0, 0],
            &[0xE0, 0, 0, 1],
            &[0xE5, 0, 0, 1],
            &[0x04, 0, 0, 0],
            &[0xF1, 0, 0, 1],
        ] {
            assert_eq!(
                restore(bad, &mut out),
                Err(FrameError::NotAFrame),
                "{bad:02x?}"
            );
        }
        assert_eq!(
            restore(&[0xE4, 0, 0, 1, 0, 0, 0, 0, 0], &mut out),
            Err(FrameError::TooLarge)
        );
        assert_eq!(restore(&[0xE4, 0, 0, 1], &mut out), Ok((1, 4)));
        // Every input: no panic.
        for b in 0..=255u8 {
            for len in 0..12 {
                let _ = restore(&vec![b; len], &mut out);
            }
        }
    }

    #[test]
    fn target_follows_path_and_falls_back() {
        let ep: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let r = RelayRoute {
            addr: "198.51.100.1:443".parse().unwrap(),
            handle: 7,
        };
        assert_eq!(
            target(Some(ep), PathKind::Direct, Some(r)),
            Some(Target::Direct(ep))
        );
        assert_eq!(
            target(Some(ep), PathKind::Relay, Some(r)),
            Some(Target::Relay(r))
        );
        assert_eq!(
            target(Some(ep), PathKind::Relay, None),
            Some(Target::Direct(ep))
        );
        assert_eq!(
            target(None, PathKind::Relay, Some(r)),
            Some(Target::Relay(r))
        );
        assert_eq!(target(None, PathKind::Relay, None), None);
        assert_eq!(target(None, PathKind::Direct, Some(r)), None);
    }

    #[test]
    fn mono_ns_is_never_zero_and_never_goes_back() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(a > 0 && b >= a);
    }
}
