//! The receive-side sink: where decrypted inner packets wait for their TUN write.
//!
//! With a virtio header on the TUN, TCP data segments (payload, flags ACK/PSH only) go to
//! the GRO [`Coalescer`], which merges a flow's consecutive segments into one super-packet;
//! everything else (bare ACKs, UDP, ICMP, and segments that find the coalescer full) is
//! packed into a compact [`TunBatch`] behind a zero virtio header. Writing order is the
//! coalescer's buffers first, then the batch: a flow's data therefore precedes its later
//! FIN or overflow segments, and nothing is written out of order within what TCP cares about.
//! With USO accepted too, UDP datagrams go to the [`UdpCoalescer`], which merges a flow's
//! consecutive datagrams into one `GSO_UDP_L4` super-datagram; its buffers are written after
//! the TCP coalescer's and before the batch.
//! Without a virtio header, every packet goes to the batch as is. Only decrypted packets
//! come here, so the coalescer does not re-check TCP checksums the AEAD tag already covers
//! ([`Coalescer::authenticated`]).
//!
//! Decrypting in place: the pipeline asks for room first ([`TunSink::land`]) and boringtun
//! decrypts into it. The room is in the coalescer the previous packet went to (the UDP one
//! after a UDP datagram, else the TCP one): at the tail of the latest head, so a
//! continuing segment or datagram joins without a copy, or at the start of a free slot. A
//! packet that belongs elsewhere (another head, the compact batch) is copied there from the
//! room, and the room is given back (see `core::offload::landing`).
//!
//! Ownership: [`RxSink::for_each`] yields every buffer for writing; [`RxSink::clear`] only
//! after all those writes completed.

use crate::core::offload::{CoalesceError, Coalescer, UdpCoalescer, UdpPush};
use crate::core::pipeline::TunSink;
use crate::core::tunbatch::TunBatch;
use crate::core::wire::{protocol, tcp};

/// TCP coalescer heads per sink: the TCP flows one batch of decrypted packets may coalesce
/// before the rest pass through uncoalesced. Each head is a 64 KiB buffer
/// ([`crate::core::offload::BUF_LEN`]), so this is 2 MiB per sink.
pub const TCP_HEADS: usize = 32;
/// UDP coalescer heads per sink (with USO on the TUN): the UDP flows one batch may coalesce;
/// 64 KiB each, 1 MiB per sink.
pub const UDP_HEADS: usize = 16;
/// Bytes of the arena for packets written one by one (bare ACKs, ICMP, what the coalescers
/// refuse or cannot fit), each behind its virtio header: 2 MiB per sink.
pub const PLAIN_BYTES: usize = 2 << 20;

/// TCP flags that may be coalesced (ACK, PSH).
const COALESCABLE_FLAGS: u8 = tcp::ACK | tcp::PSH;

/// Decrypted packets waiting for TUN writes.
pub struct RxSink {
    gro: Option<Coalescer>,
    udp: Option<UdpCoalescer>,
    plain: TunBatch,
    /// Whether the latest packet went to the UDP coalescer: the next one lands there too.
    udp_last: bool,
    /// Which coalescer the room [`TunSink::land`] handed out is in (`Some(true)`: UDP).
    landed_udp: Option<bool>,
}

impl RxSink {
    /// A sink for a TUN with (`vnet`) or without a virtio header, which takes USO
    /// super-datagrams on writes (`uso`) or not; `heads` TCP coalescer heads and
    /// `udp_heads` UDP ones (64 KiB each), and a `bytes` arena for everything else.
    pub fn new(vnet: bool, uso: bool, heads: usize, udp_heads: usize, bytes: usize) -> Self {
        Self {
            // Only decrypted packets arrive here: the AEAD tag vouches for their bytes.
            gro: (vnet && heads > 0).then(|| Coalescer::authenticated(heads)),
            udp: (vnet && uso && udp_heads > 0).then(|| UdpCoalescer::new(udp_heads)),
            plain: TunBatch::new(bytes, vnet),
            udp_last: false,
            landed_udp: None,
        }
    }

    /// [`RxSink::new`] with the drivers' sizes: [`TCP_HEADS`], [`UDP_HEADS`] and
    /// [`PLAIN_BYTES`].
    pub fn with_default_sizes(vnet: bool, uso: bool) -> Self {
        Self::new(vnet, uso, TCP_HEADS, UDP_HEADS, PLAIN_BYTES)
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.plain.is_empty()
            && self.gro.as_ref().is_none_or(|g| g.is_empty())
            && self.udp.as_ref().is_none_or(|u| u.is_empty())
    }

    /// Yields every buffer to write, coalesced super-packets first.
    pub fn for_each(&mut self, mut write: impl FnMut(&[u8])) {
        self.abandon();
        if let Some(g) = self.gro.as_mut() {
            for b in g.finish() {
                write(b);
            }
        }
        if let Some(u) = self.udp.as_mut() {
            for b in u.finish() {
                write(b);
            }
        }
        for i in 0..self.plain.len() {
            write(self.plain.get(i));
        }
    }

    /// Forgets every buffer (after their writes completed).
    pub fn clear(&mut self) {
        self.landed_udp = None;
        self.udp_last = false;
        if let Some(g) = self.gro.as_mut() {
            g.clear();
        }
        if let Some(u) = self.udp.as_mut() {
            u.clear();
        }
        self.plain.clear();
    }
}

/// Whether `pkt` is a TCP segment with payload and only ACK/PSH set: the only packets worth
/// a coalescer slot. A cheap byte peek; the coalescer validates fully.
fn is_tcp_data(pkt: &[u8]) -> bool {
    let (l3, proto, total) = match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => (
            usize::from(pkt[0] & 0x0f) * 4,
            pkt[9],
            usize::from(u16::from_be_bytes([pkt[2], pkt[3]])),
        ),
        Some(6) if pkt.len() >= 40 => (
            40,
            pkt[6],
            40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]])),
        ),
        _ => return false,
    };
    if proto != protocol::TCP || pkt.len() < l3 + 20 {
        return false;
    }
    let doff = usize::from(pkt[l3 + 12] >> 4) * 4;
    let flags = pkt[l3 + 13];
    flags & !COALESCABLE_FLAGS == 0 && flags & tcp::ACK != 0 && total > l3 + doff
}

/// Whether `pkt` claims to be UDP (IPv4 protocol or IPv6 next header): a cheap byte peek;
/// the UDP coalescer validates fully.
fn is_udp(pkt: &[u8]) -> bool {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => pkt.get(9) == Some(&protocol::UDP),
        Some(6) => pkt.get(6) == Some(&protocol::UDP),
        _ => false,
    }
}

/// [`RxSink`]'s path for a packet the TCP coalescer did not take: the UDP coalescer, else
/// the compact batch.
fn push_rest(udp: &mut Option<UdpCoalescer>, plain: &mut TunBatch, pkt: &[u8]) -> bool {
    if let Some(u) = udp.as_mut() {
        if is_udp(pkt) {
            match u.push(pkt) {
                Ok(UdpPush::Coalesced | UdpPush::Head) => return true,
                Ok(UdpPush::NotCandidate) | Err(_) => {}
            }
        }
    }
    plain.push(pkt)
}

impl TunSink for RxSink {
    fn push(&mut self, pkt: &[u8]) -> bool {
        self.abandon();
        if let Some(g) = self.gro.as_mut() {
            if is_tcp_data(pkt) {
                match g.push(pkt) {
                    Ok(_) => {
                        self.udp_last = false;
                        return true;
                    }
                    Err(
                        CoalesceError::Full | CoalesceError::TooLarge | CoalesceError::NoLanding,
                    ) => {}
                }
            }
        }
        self.udp_last = self.udp.is_some() && is_udp(pkt);
        push_rest(&mut self.udp, &mut self.plain, pkt)
    }

    /// Room in the coalescer the latest packet went to (the UDP one after a UDP datagram,
    /// else the TCP one; see [`Coalescer::land`]): a packet decrypted there joins its head
    /// (or starts one) without a copy; anything else is copied on as by [`RxSink::push`].
    fn land(&mut self, need: usize) -> Option<&mut [u8]> {
        self.abandon();
        let udp = self.udp_last && self.udp.is_some() || self.gro.is_none();
        let room = if udp {
            self.udp.as_mut()?.land(need)
        } else {
            self.gro.as_mut()?.land(need)
        };
        self.landed_udp = room.is_some().then_some(udp);
        room
    }

    fn commit(&mut self, len: usize) -> bool {
        let Self {
            gro,
            udp,
            plain,
            udp_last,
            landed_udp,
        } = self;
        match (landed_udp.take(), gro.as_mut(), udp.as_mut()) {
            (Some(false), Some(g), _) => {
                let Some(pkt) = g.landed(len) else {
                    g.abandon();
                    return false;
                };
                if is_tcp_data(pkt) && g.commit(len).is_ok() {
                    *udp_last = false;
                    return true;
                }
                let pkt = g.landed(len).unwrap_or(&[]);
                *udp_last = udp.is_some() && is_udp(pkt);
                let ok = push_rest(udp, plain, pkt);
                g.abandon();
                ok
            }
            (Some(true), g, Some(u)) => {
                let Some(pkt) = u.landed(len) else {
                    u.abandon();
                    return false;
                };
                if is_udp(pkt) && matches!(u.commit(len), Ok(UdpPush::Coalesced | UdpPush::Head)) {
                    *udp_last = true;
                    return true;
                }
                let pkt = u.landed(len).unwrap_or(&[]);
                *udp_last = false;
                let taken = match g {
                    Some(g) if is_tcp_data(pkt) => g.push(pkt).is_ok(),
                    _ => false,
                };
                let ok = taken || plain.push(pkt);
                u.abandon();
                ok
            }
            _ => false,
        }
    }

    fn abandon(&mut self) {
        match self.landed_udp.take() {
            Some(false) => {
                if let Some(g) = self.gro.as_mut() {
                    g.abandon();
                }
            }
            Some(true) => {
                if let Some(u) = self.udp.as_mut() {
                    u.abandon();
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4(flags: u8, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload];
        p[0] = 0x45;
        let total = (40 + payload) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[8] = 64;
        p[9] = protocol::TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[32] = 5 << 4;
        p[33] = flags;
        p
    }

    #[test]
    fn classifies_tcp_data() {
        assert!(is_tcp_data(&tcp4(0x10, 100)));
        assert!(is_tcp_data(&tcp4(0x18, 100)));
        assert!(!is_tcp_data(&tcp4(0x10, 0)));
        assert!(!is_tcp_data(&tcp4(0x11, 100)));
        assert!(!is_tcp_data(&tcp4(0x02, 100)));
        assert!(!is_tcp_data(&[0x45]));
        assert!(!is_tcp_data(&[]));
    }

    fn udp4(payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 28 + payload];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((28 + payload) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = protocol::UDP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let c = crate::core::wire::checksum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        p
    }

    #[test]
    fn udp_datagrams_coalesce_only_when_the_tun_takes_uso() {
        for (uso, writes) in [(true, 1), (false, 6)] {
            let mut s = RxSink::new(true, uso, 2, 2, 1 << 16);
            for _ in 0..6 {
                assert!(s.push(&udp4(500)));
            }
            let mut n = 0;
            s.for_each(|_| n += 1);
            assert_eq!(n, writes, "uso={uso}");
            s.clear();
            assert!(s.is_empty());
        }
    }

    #[test]
    fn bare_packets_go_to_the_compact_batch() {
        let mut s = RxSink::new(true, false, 2, 0, 4096);
        for _ in 0..10 {
            assert!(s.push(&tcp4(0x10, 0)));
        }
        let mut n = 0;
        s.for_each(|b| {
            assert_eq!(b.len(), 10 + 40);
            n += 1
        });
        assert_eq!(n, 10);
        s.clear();
        assert!(s.is_empty());
    }

    use crate::core::offload::testkit::{payload_bytes, split_all, SuperPacket};
    use crate::core::wire::tcp as tcpw;
    use proptest::prelude::*;

    /// A mix of what a receiver sees, v4 or v6: TCP segments of two flows (the last one
    /// short), UDP datagrams of one flow (the last short), bare ACKs.
    fn traffic(v6: bool) -> Vec<Vec<u8>> {
        let (h, t) =
            SuperPacket::tcp(v6, &payload_bytes(5 * 1000 + 300, 1), 1000, tcpw::ACK).build();
        let a = split_all(&h, &t).unwrap();
        let (h2, t2) = SuperPacket {
            ident: 9,
            seq: 77,
            ..SuperPacket::tcp(v6, &payload_bytes(3 * 500, 2), 500, tcpw::ACK | tcpw::PSH)
        }
        .build();
        let b = split_all(&h2, &t2).unwrap();
        let (hu, u) = SuperPacket::udp(v6, &payload_bytes(6 * 1200 + 10, 3), 1200).build();
        let u = split_all(&hu, &u).unwrap();
        let (_, ack) = SuperPacket::tcp(v6, &[], 1000, tcpw::ACK).build();
        let mut out = Vec::new();
        out.extend(a);
        out.extend(b);
        out.extend(u);
        out.push(ack);
        out
    }

    /// What the sink writes for `pkts` (indices into `all`; a negative index: a packet
    /// decrypted but then filtered out, so the landing is abandoned), pushing or landing.
    fn writes(all: &[Vec<u8>], order: &[(usize, bool)], land: bool, heads: usize) -> Vec<Vec<u8>> {
        let mut s = RxSink::new(true, true, heads, heads, 1 << 16);
        for &(i, keep) in order {
            let p = &all[i % all.len()];
            if !land {
                if keep {
                    assert!(s.push(p));
                }
                continue;
            }
            match s.land(p.len() + 32) {
                Some(room) => {
                    room[..p.len() + 32].fill(0x5a);
                    room[..p.len()].copy_from_slice(p);
                    if keep {
                        assert!(s.commit(p.len()));
                    } else {
                        s.abandon();
                    }
                }
                None if keep => assert!(s.push(p)),
                None => {}
            }
        }
        let mut out = Vec::new();
        s.for_each(|b| out.push(b.to_vec()));
        s.clear();
        assert!(s.is_empty());
        out
    }

    #[test]
    fn landing_writes_what_pushing_writes() {
        for v6 in [false, true] {
            let all = traffic(v6);
            let n = all.len();
            let in_order: Vec<(usize, bool)> = (0..n).map(|i| (i, true)).collect();
            let interleaved: Vec<(usize, bool)> =
                (0..n).map(|i| ((i * 7) % n, i % 5 != 3)).collect();
            for heads in [1, 2, 4] {
                for order in [&in_order, &interleaved] {
                    let want = writes(&all, order, false, heads);
                    assert_eq!(
                        writes(&all, order, true, heads),
                        want,
                        "v6={v6} heads={heads}"
                    );
                }
            }
            // One TCP and one UDP super-packet, a short UDP datagram's own write... all in
            // order with room: the two TCP flows, the UDP flow and the ACK.
            assert_eq!(writes(&all, &in_order, true, 4).len(), 4);
        }
    }

    proptest! {
        #[test]
        fn landing_matches_pushing(
            v6 in any::<bool>(),
            order in proptest::collection::vec((0usize..20, any::<bool>()), 0..60),
            heads in 1usize..4,
        ) {
            let all = traffic(v6);
            prop_assert_eq!(writes(&all, &order, true, heads), writes(&all, &order, false, heads));
        }
    }
}
