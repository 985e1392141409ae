//! UDP GRO for the receive path: consecutive datagrams of one UDP flow become one USO
//! super-datagram (`virtio_net_hdr` with `GSO_UDP_L4`) for one TUN write.
//!
//! Why: a TUN write runs the kernel's whole receive path for its packet in the writer's
//! thread (IP, UDP, socket queueing, waking the reader). Writing 40 datagrams as one
//! super-datagram pays for the write, the skb and the IP layer once; the kernel splits it
//! back into the original datagrams when it queues them on the receiving socket (or hands
//! it over whole to a socket with `UDP_GRO` on). Only for a TUN whose `TUNSETOFFLOAD`
//! accepted USO4|USO6: those kernels (≥ 6.2) take `GSO_UDP_L4` on writes.
//!
//! A datagram joins the latest open head of its flow when it has the same IP version,
//! addresses and ports, IPv4 TOS/TTL/DF or IPv6 traffic class/flow label/hop limit, at most
//! the head's payload size (a shorter one closes the head, as USO segments all but the last
//! at one size), and the head stays within 64 segments and 65535 bytes. Candidates are
//! IPv4 without options or fragmentation and with a valid header checksum, or IPv6 whose
//! next header is UDP, with a non-empty payload and a UDP length field that matches the IP
//! length. Anything else is refused with [`UdpPush::NotCandidate`] and the caller writes
//! it on its own. The payload bytes and the UDP checksum are not checked: only decrypted
//! packets come here, whose bytes the AEAD tag vouches for, and a multi-datagram head is
//! written with `NEEDS_CSUM`, so the kernel computes each datagram's checksum as it splits.
//! A lone datagram is written unchanged.
//!
//! Buffer ownership: as for [`crate::core::offload::Coalescer`]: the arena is allocated once;
//! the slices [`UdpCoalescer::finish`] yields stay valid until the next `&mut` call, and
//! [`UdpCoalescer::clear`] comes only after every write of them completed.
//!
//! Nothing here allocates after construction, and no input can make it panic.

use super::landing::{place, Landing, Src, Stash};
use super::vnet::{flags, gso_type, VirtioNetHdr, BUF_LEN, MAX_PACKET, VNET_HDR_LEN};
use super::{super_headers, CoalesceError, Flow, IpFields};
use crate::core::wire::{ipv4, protocol, udp, IpPacket, UdpPacket};

/// The most datagrams one head carries (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;

/// What [`UdpCoalescer::push`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpPush {
    /// Appended to an open head of its flow.
    Coalesced,
    /// Started a new head.
    Head,
    /// Not a UDP datagram this coalescer takes (see the module docs); nothing was copied.
    NotCandidate,
}

/// One head: the first datagram's headers followed by every datagram's payload.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// Bytes used in the slot, vnet header included.
    len: usize,
    flow: Flow,
    /// IP fields every datagram must share.
    ip: IpFields,
    /// IP header length (20 or 40).
    l3: usize,
    /// Payload bytes of the first datagram: every datagram but the last has this size.
    gso_size: usize,
    segs: usize,
    open: bool,
    finished: bool,
}

impl Head {
    /// An unused slot.
    const UNUSED: Self = Self {
        len: 0,
        flow: Flow::UNSPECIFIED,
        ip: IpFields::UNSPECIFIED,
        l3: 0,
        gso_size: 0,
        segs: 0,
        open: false,
        finished: false,
    };
}

/// Coalesces UDP datagrams into USO super-datagrams; see the module docs.
///
/// Call order per batch: [`push`](Self::push) each decrypted inner packet (on
/// [`CoalesceError::Full`], flush and push again), then [`finish`](Self::finish) and write
/// every yielded buffer, then [`clear`](Self::clear) once those writes completed.
pub struct UdpCoalescer {
    arena: Box<[u8]>,
    heads: Box<[Head]>,
    used: usize,
    /// The head the latest datagram started or joined: where the next one most likely goes.
    last: Option<usize>,
    /// The room [`UdpCoalescer::land`] handed out, until [`UdpCoalescer::commit`] or
    /// [`UdpCoalescer::abandon`].
    stash: Stash,
}

impl std::fmt::Debug for UdpCoalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpCoalescer")
            .field("capacity", &self.heads.len())
            .field("used", &self.used)
            .finish()
    }
}

/// A datagram that may start or join a head, as read through the views.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    flow: Flow,
    ip: IpFields,
    l3: usize,
    payload_len: usize,
}

impl UdpCoalescer {
    /// A coalescer with `capacity` heads of [`BUF_LEN`] bytes each, allocated now
    /// (a capacity of 0 is raised to 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            arena: vec![0u8; capacity * BUF_LEN].into_boxed_slice(),
            heads: vec![Head::UNUSED; capacity].into_boxed_slice(),
            used: 0,
            last: None,
            stash: Stash::new(),
        }
    }

    /// Number of heads in use (buffers [`finish`](Self::finish) would yield).
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether nothing was pushed since the last [`clear`](Self::clear).
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Takes one inner IP packet (copied) when it is a candidate; see the module docs.
    pub fn push(&mut self, pkt: &[u8]) -> Result<UdpPush, CoalesceError> {
        self.abandon();
        if pkt.len() > MAX_PACKET {
            return Err(CoalesceError::TooLarge);
        }
        self.push_from(Src::Outside(pkt))
    }

    /// Room for the next datagram, of at least `need` bytes, where it most likely stays
    /// (decrypt in place, as [`crate::core::offload::Coalescer::land`]): in the tail of the
    /// latest head when it is open, its headers over the head's last bytes (saved and
    /// restored), else at the start of a free slot. `None` when neither has room.
    pub fn land(&mut self, need: usize) -> Option<&mut [u8]> {
        self.abandon();
        let tail = self.last.and_then(|i| {
            let h = self.heads.get(i)?;
            (h.open && !h.finished)
                .then(|| Landing::tail(i, h.len, h.l3 + udp::HEADER_LEN, need))?
        });
        let l = tail.or_else(|| {
            (self.used < self.heads.len()).then(|| Landing::fresh(self.used, need))?
        })?;
        self.stash.open(&mut self.arena, l)
    }

    /// The first `len` bytes of the room [`land`](Self::land) handed out, if it is still
    /// out and that large.
    pub fn landed(&self, len: usize) -> Option<&[u8]> {
        self.stash.landed(&self.arena, len)
    }

    /// Takes the `len`-byte datagram written into the room [`land`](Self::land) handed out,
    /// as [`push`](Self::push) would. On anything but `Ok(Coalesced | Head)` the landing
    /// stays out: the caller may read it with [`landed`](Self::landed) to write it
    /// elsewhere, then [`abandon`](Self::abandon)s it. [`CoalesceError::NoLanding`] when no
    /// room is out or `len` exceeds it.
    pub fn commit(&mut self, len: usize) -> Result<UdpPush, CoalesceError> {
        let Some(l) = self.stash.out().filter(|l| len <= l.room) else {
            return Err(CoalesceError::NoLanding);
        };
        if len > MAX_PACKET {
            return Err(CoalesceError::TooLarge);
        }
        let r = self.push_from(Src::Landed(l.at, len));
        if matches!(r, Ok(UdpPush::Coalesced | UdpPush::Head)) {
            self.abandon();
        }
        r
    }

    /// Ends the landing [`land`](Self::land) handed out, if any, without taking a datagram:
    /// the head bytes it covered are restored.
    pub fn abandon(&mut self) {
        self.stash.abandon(&mut self.arena);
    }

    /// [`push`](Self::push) from wherever the datagram is (at most [`MAX_PACKET`] bytes).
    fn push_from(&mut self, src: Src<'_>) -> Result<UdpPush, CoalesceError> {
        let Some(c) = candidate(src.bytes(&self.arena)) else {
            return Ok(UdpPush::NotCandidate);
        };
        if let Some(i) = self.find_open_head(&c.flow) {
            if self.try_append(i, src, &c) {
                self.last = Some(i);
                return Ok(UdpPush::Coalesced);
            }
            self.heads[i].open = false;
        }
        if self.used == self.heads.len() {
            return Err(CoalesceError::Full);
        }
        let i = self.used;
        let len = src.bytes(&self.arena).len();
        self.used += 1;
        self.arena[i * BUF_LEN..i * BUF_LEN + VNET_HDR_LEN].fill(0);
        place(&mut self.arena, src, 0..len, i * BUF_LEN + VNET_HDR_LEN);
        self.heads[i] = Head {
            len: VNET_HDR_LEN + len,
            flow: c.flow,
            ip: c.ip,
            l3: c.l3,
            gso_size: c.payload_len,
            segs: 1,
            open: true,
            finished: false,
        };
        self.last = Some(i);
        Ok(UdpPush::Head)
    }

    /// Rewrites each multi-datagram head's headers for the TUN write (once) and yields
    /// every buffer, `VirtioNetHdr` + IP packet, in the order their first datagram came.
    pub fn finish(&mut self) -> impl Iterator<Item = &[u8]> + '_ {
        self.abandon();
        self.last = None;
        for i in 0..self.used {
            self.finish_head(i);
        }
        let arena = &self.arena;
        self.heads[..self.used]
            .iter()
            .enumerate()
            .map(move |(i, h)| &arena[i * BUF_LEN..i * BUF_LEN + h.len])
    }

    /// Forgets every head. Call only after the buffers from [`finish`](Self::finish) were
    /// written out.
    pub fn clear(&mut self) {
        self.used = 0;
        self.last = None;
        self.stash.forget();
    }

    /// The latest open head of `flow` (same version, addresses and ports).
    fn find_open_head(&self, flow: &Flow) -> Option<usize> {
        (0..self.used).rev().find(|&i| {
            let h = &self.heads[i];
            h.open && h.flow == *flow
        })
    }

    /// Appends `pkt`'s payload to head `i` when every GRO condition holds.
    fn try_append(&mut self, i: usize, src: Src<'_>, c: &Candidate) -> bool {
        let h = self.heads[i];
        if !(h.ip == c.ip
            && h.segs < MAX_SEGMENTS
            && c.payload_len <= h.gso_size
            && h.len - VNET_HDR_LEN + c.payload_len <= MAX_PACKET)
        {
            return false;
        }
        let start = c.l3 + udp::HEADER_LEN;
        if start + c.payload_len > src.bytes(&self.arena).len() {
            return false;
        }
        let at = i * BUF_LEN + h.len;
        place(&mut self.arena, src, start..start + c.payload_len, at);
        let head = &mut self.heads[i];
        head.len += c.payload_len;
        head.segs += 1;
        if c.payload_len < h.gso_size || head.segs == MAX_SEGMENTS {
            head.open = false;
        }
        true
    }

    /// Writes the vnet header and fixes the lengths and checksums of a multi-datagram head.
    fn finish_head(&mut self, i: usize) {
        let h = self.heads[i];
        if h.finished {
            return;
        }
        let head = &mut self.heads[i];
        head.open = false;
        head.finished = true;
        if h.segs < 2 {
            // A lone datagram goes out unchanged with a zero vnet header.
            return;
        }
        let b = &mut self.arena[i * BUF_LEN..i * BUF_LEN + h.len];
        let hdr = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: gso_type::UDP_L4,
            hdr_len: (h.l3 + udp::HEADER_LEN) as u16,
            gso_size: h.gso_size as u16,
            csum_start: h.l3 as u16,
            csum_offset: udp::CHECKSUM_OFFSET as u16,
        };
        let (vnet, ip) = b.split_at_mut(VNET_HDR_LEN);
        let done = super_headers(ip, h.flow.is_v6()).and_then(|(l4, partial)| {
            UdpPacket::new_resized(l4)?.set_checksum(partial);
            Ok(())
        });
        debug_assert!(
            done.is_ok(),
            "a head's headers were validated when it was pushed"
        );
        if done.is_ok() {
            vnet.copy_from_slice(&hdr.to_bytes());
        }
    }
}

/// The candidate view of `pkt`, or `None` when it is not a UDP datagram this coalescer
/// takes.
fn candidate(pkt: &[u8]) -> Option<Candidate> {
    let ip = IpPacket::new_checked(pkt).ok()?;
    if ip.protocol() != protocol::UDP || ip.total_len() != pkt.len() {
        return None;
    }
    let fields = match &ip {
        IpPacket::V4(p) => {
            if p.is_fragment() || p.header_len() != ipv4::HEADER_LEN || !p.verify_checksum() {
                return None;
            }
            IpFields::v4(p)
        }
        IpPacket::V6(p) => IpFields::v6(p),
    };
    let l3 = ip.header_len();
    let l4 = ip.payload();
    let u = UdpPacket::new_checked(l4).ok()?;
    if u.len() != l4.len() || u.is_empty() {
        return None;
    }
    Some(Candidate {
        flow: Flow {
            src: ip.src(),
            dst: ip.dst(),
            src_port: u.src_port(),
            dst_port: u.dst_port(),
        },
        ip: fields,
        l3,
        payload_len: u.payload().len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::offload::{split, VirtioNetHdr};
    use crate::core::wire::checksum;

    const SRC4: [u8; 4] = [10, 7, 0, 1];
    const DST4: [u8; 4] = [10, 7, 0, 2];
    const SRC6: [u8; 16] = [0xfd, 0x5a, 0x1f, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0xfd, 0x5a, 0x1f, 0, 9, 8, 7, 6, 5, 4, 0, 0, 0, 0, 0, 1];

    /// A UDP/IPv4 datagram with valid checksums.
    fn udp4(sport: u16, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&7u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = protocol::UDP;
        p[12..16].copy_from_slice(&SRC4);
        p[16..20].copy_from_slice(&DST4);
        let c = checksum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        let pseudo = checksum::pseudo_header_v4(
            SRC4.into(),
            DST4.into(),
            protocol::UDP,
            (8 + payload.len()) as u32,
        );
        UdpPacket::new_checked(&mut p[20..])
            .unwrap()
            .fill_checksum(pseudo);
        p
    }

    /// A UDP/IPv6 datagram with a valid checksum.
    fn udp6(sport: u16, payload: &[u8]) -> Vec<u8> {
        let l4 = 8 + payload.len();
        let mut p = vec![0u8; 40 + l4];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(l4 as u16).to_be_bytes());
        p[6] = protocol::UDP;
        p[7] = 64;
        p[8..24].copy_from_slice(&SRC6);
        p[24..40].copy_from_slice(&DST6);
        p[40..42].copy_from_slice(&sport.to_be_bytes());
        p[42..44].copy_from_slice(&5201u16.to_be_bytes());
        p[44..46].copy_from_slice(&(l4 as u16).to_be_bytes());
        p[48..].copy_from_slice(payload);
        let pseudo = checksum::pseudo_header_v6(SRC6.into(), DST6.into(), protocol::UDP, l4 as u32);
        UdpPacket::new_checked(&mut p[40..])
            .unwrap()
            .fill_checksum(pseudo);
        p
    }

    fn payload(seed: u8, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
            .collect()
    }

    /// Splits a finished buffer the way the kernel would (our own USO split, which
    /// completes every checksum) and returns the datagrams.
    fn resegment(buf: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VirtioNetHdr::parse(buf).unwrap();
        if !hdr.is_gso() {
            return vec![buf[VNET_HDR_LEN..].to_vec()];
        }
        let mut out = Vec::new();
        let mut scratch = vec![0u8; 65536];
        split(&hdr, &buf[VNET_HDR_LEN..], &mut scratch, |seg| {
            out.push(seg.to_vec());
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        out
    }

    fn roundtrip(pkts: &[Vec<u8>], capacity: usize) -> (Vec<Vec<u8>>, usize) {
        let mut c = UdpCoalescer::new(capacity);
        for p in pkts {
            assert_ne!(c.push(p).unwrap(), UdpPush::NotCandidate);
        }
        let bufs: Vec<Vec<u8>> = c.finish().map(<[u8]>::to_vec).collect();
        let n = bufs.len();
        (bufs.iter().flat_map(|b| resegment(b)).collect(), n)
    }

    /// Compares datagrams ignoring the IPv4 identification and header checksum, which a
    /// split regenerates.
    fn same_datagram(a: &[u8], b: &[u8]) -> bool {
        if a.len() != b.len() {
            return false;
        }
        if a[0] >> 4 == 4 {
            a[..4] == b[..4] && a[6..10] == b[6..10] && a[12..] == b[12..]
        } else {
            a == b
        }
    }

    #[test]
    fn one_flow_becomes_one_write_and_splits_back_exactly() {
        for v6 in [false, true] {
            let mk = |s: u8, n: usize| {
                if v6 {
                    udp6(4000, &payload(s, n))
                } else {
                    udp4(4000, &payload(s, n))
                }
            };
            let mut pkts: Vec<Vec<u8>> = (0..10).map(|i| mk(i, 1364)).collect();
            pkts.push(mk(99, 200));
            let (out, writes) = roundtrip(&pkts, 4);
            assert_eq!(writes, 1, "v6={v6}");
            assert_eq!(out.len(), pkts.len());
            for (a, b) in pkts.iter().zip(&out) {
                assert!(same_datagram(a, b), "v6={v6}");
            }
        }
    }

    /// Ones-complement 16-bit addition, as the kernel's `csum16_add`.
    fn csum16_add(a: u16, b: u16) -> u16 {
        let s = u32::from(a) + u32::from(b);
        ((s & 0xffff) + (s >> 16)) as u16
    }

    #[test]
    fn the_partial_checksum_adjusts_to_each_datagram_as_the_kernel_does() {
        // __udp_gso_segment: check' = csum16_add(csum16_sub(check, uh->len), htons(len')),
        // which must equal each datagram's own folded pseudo-header sum.
        for v6 in [false, true] {
            let mk = |s: u8, n: usize| {
                if v6 {
                    udp6(4000, &payload(s, n))
                } else {
                    udp4(4000, &payload(s, n))
                }
            };
            let mut c = UdpCoalescer::new(1);
            for i in 0..5 {
                c.push(&mk(i, 1000)).unwrap();
            }
            c.push(&mk(9, 333)).unwrap();
            let buf = c.finish().next().unwrap().to_vec();
            let l3 = if v6 { 40 } else { 20 };
            let ip = &buf[VNET_HDR_LEN..];
            let full = u16::from_be_bytes([ip[l3 + 4], ip[l3 + 5]]);
            let check = u16::from_be_bytes([ip[l3 + 6], ip[l3 + 7]]);
            assert_eq!(usize::from(full), ip.len() - l3);
            for len in [1008u16, 341] {
                let kernel = csum16_add(csum16_add(check, !full), len);
                let own = if v6 {
                    checksum::pseudo_header_v6(SRC6.into(), DST6.into(), protocol::UDP, len.into())
                } else {
                    checksum::pseudo_header_v4(SRC4.into(), DST4.into(), protocol::UDP, len.into())
                };
                assert_eq!(kernel, checksum::fold(own), "v6={v6} len={len}");
            }
        }
    }

    #[test]
    fn heads_close_on_a_short_datagram_and_at_64_segments() {
        let mut pkts: Vec<Vec<u8>> = (0..70).map(|i| udp4(1, &payload(i, 100))).collect();
        pkts.insert(3, udp4(1, &payload(200, 50)));
        let (out, writes) = roundtrip(&pkts, 8);
        // 4 (closed by the short one), then 64, then the last 3.
        assert_eq!(writes, 3);
        assert_eq!(out.len(), pkts.len());
        for (a, b) in pkts.iter().zip(&out) {
            assert!(same_datagram(a, b));
        }
    }

    #[test]
    fn flows_and_header_changes_keep_their_own_heads() {
        let a = udp4(1, &payload(1, 300));
        let b = udp4(2, &payload(2, 300));
        let mut ttl = udp4(1, &payload(3, 300));
        ttl[8] = 3;
        let c = checksum::checksum(&{
            let mut h = ttl[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        ttl[10..12].copy_from_slice(&c.to_be_bytes());
        let a2 = udp4(1, &payload(4, 300));
        let pkts = vec![a.clone(), b.clone(), a2.clone(), ttl.clone()];
        let (out, writes) = roundtrip(&pkts, 8);
        assert_eq!(writes, 3);
        assert!(same_datagram(&out[0], &a));
        assert!(same_datagram(&out[1], &a2));
        assert!(same_datagram(&out[2], &b));
        assert!(same_datagram(&out[3], &ttl));
    }

    #[test]
    fn refuses_what_it_must_not_touch() {
        let mut c = UdpCoalescer::new(2);
        let good = udp4(1, &payload(1, 100));
        let mut opts = good.clone();
        opts[0] = 0x46;
        let mut frag = good.clone();
        frag[6] = 0x20;
        let mut badsum = good.clone();
        badsum[10] ^= 1;
        let mut longer = good.clone();
        longer.push(0);
        let empty = udp4(1, &[]);
        let mut tcp = good.clone();
        tcp[9] = protocol::TCP;
        for p in [
            &opts,
            &frag,
            &badsum,
            &longer,
            &empty,
            &tcp,
            &vec![0x45u8; 3],
            &vec![],
        ] {
            assert_eq!(c.push(p).unwrap(), UdpPush::NotCandidate);
        }
        assert!(c.is_empty());
        assert_eq!(c.push(&good).unwrap(), UdpPush::Head);
        assert_eq!(c.push(&udp4(9, &[1])).unwrap(), UdpPush::Head);
        assert_eq!(c.push(&udp4(10, &[1])), Err(CoalesceError::Full));
        assert_eq!(c.push(&udp4(9, &[2])).unwrap(), UdpPush::Coalesced);
    }

    #[test]
    fn a_lone_datagram_is_written_unchanged() {
        let p = udp6(7, &payload(5, 77));
        let mut c = UdpCoalescer::new(1);
        c.push(&p).unwrap();
        let bufs: Vec<Vec<u8>> = c.finish().map(<[u8]>::to_vec).collect();
        assert_eq!(bufs.len(), 1);
        assert_eq!(&bufs[0][..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
        assert_eq!(&bufs[0][VNET_HDR_LEN..], &p[..]);
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use proptest::prelude::*;
        proptest!(|(pkts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..40))| {
            let mut c = UdpCoalescer::new(3);
            for p in &pkts {
                let _ = c.push(p);
            }
            let _ = c.finish().count();
        });
    }

    /// `pkt` written into the room `land` gives (followed by a tag's worth of junk); the
    /// room's start.
    fn land_in(c: &mut UdpCoalescer, pkt: &[u8]) -> usize {
        let room = c.land(pkt.len() + 16).expect("room");
        room[..pkt.len() + 16].fill(0x5a);
        room[..pkt.len()].copy_from_slice(pkt);
        room.as_ptr() as usize
    }

    #[test]
    fn landing_joins_in_place_and_gives_back_what_it_does_not_take() {
        let (a, b) = (udp4(1000, &payload(1, 1200)), udp4(1000, &payload(2, 1200)));
        let other = udp4(2000, &payload(3, 1200));
        let short = udp4(1000, &payload(4, 100));
        let mut c = UdpCoalescer::new(1);
        let head = land_in(&mut c, &a);
        assert_eq!(c.commit(a.len()), Ok(UdpPush::Head));
        assert_eq!(
            head,
            c.arena.as_ptr() as usize + VNET_HDR_LEN,
            "a head starts where it landed"
        );
        // The next datagram lands with its headers over the head's last 28 bytes.
        let at = land_in(&mut c, &b);
        assert_eq!(at, head + a.len() - 28);
        assert_eq!(c.commit(b.len()), Ok(UdpPush::Coalesced));
        // Another flow finds no free slot: refused, still readable, given back whole.
        land_in(&mut c, &other);
        assert_eq!(c.commit(other.len()), Err(CoalesceError::Full));
        assert_eq!(c.landed(other.len()), Some(&other[..]));
        c.abandon();
        // Not UDP: not taken, given back.
        let mut tcp = other.clone();
        tcp[9] = protocol::TCP;
        land_in(&mut c, &tcp);
        assert_eq!(c.commit(tcp.len()), Ok(UdpPush::NotCandidate));
        c.abandon();
        // Filtered after decryption: given back.
        land_in(&mut c, &other);
        c.abandon();
        // The last short datagram joins and closes the head: no tail to land in any more.
        land_in(&mut c, &short);
        assert_eq!(c.commit(short.len()), Ok(UdpPush::Coalesced));
        assert!(
            c.land(100).is_none(),
            "a closed head and no free slot: no room"
        );
        let got: Vec<Vec<u8>> = c.finish().map(<[u8]>::to_vec).collect();
        let mut want = UdpCoalescer::new(1);
        for p in [&a, &b, &short] {
            assert_ne!(want.push(p), Err(CoalesceError::Full));
        }
        let want: Vec<Vec<u8>> = want.finish().map(<[u8]>::to_vec).collect();
        assert_eq!(got, want);
        assert_eq!(got.len(), 1);
    }
}
