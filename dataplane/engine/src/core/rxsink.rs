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
        if let Some(g) = self.gro.as_mut() {
            if is_tcp_data(pkt) {
                match g.push(pkt) {
                    Ok(_) => return true,
                    Err(
                        CoalesceError::Full | CoalesceError::TooLarge | CoalesceError::NoLanding,
                    ) => {}
                }
            }
        }
        push_rest(&mut self.udp, &mut self.plain, pkt)
    }

    /// Room in the TCP coalescer ([`Coalescer::land`]): a TCP data segment decrypted there
    /// joins its head (or starts one) without a copy; anything else is copied on as by
    /// [`RxSink::push`].
    fn land(&mut self, need: usize) -> Option<&mut [u8]> {
        self.gro.as_mut()?.land(need)
    }

    fn commit(&mut self, len: usize) -> bool {
        let Self { gro, udp, plain } = self;
        let Some(g) = gro.as_mut() else {
            return false;
        };
        let tcp_data = match g.landed(len) {
            Some(pkt) => is_tcp_data(pkt),
            None => {
                g.abandon();
                return false;
            }
        };
        if tcp_data && g.commit(len).is_ok() {
            return true;
        }
        let ok = g.landed(len).is_some_and(|pkt| push_rest(udp, plain, pkt));
        g.abandon();
        ok
    }

    fn abandon(&mut self) {
        if let Some(g) = self.gro.as_mut() {
            g.abandon();
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
}
