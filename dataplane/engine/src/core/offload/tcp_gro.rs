//! TCP GRO on the receive path: the [`Coalescer`] appends consecutive in-order TCP segments
//! of a flow to one head and yields each head as one super-packet (`GSO_TCPV4`/`GSO_TCPV6`
//! behind a vnet header) for one TUN write; every other packet passes through in its own
//! slot.
//!
//! Invariants: the arena is allocated once in [`Coalescer::new`]; the slices
//! [`Coalescer::finish`] yields stay valid until the next `&mut` call, and
//! [`Coalescer::clear`] comes only after every write of them completed; a flow's packets
//! keep their order; nothing allocates after construction and no input can make it panic.

use super::landing::{place, Landing, Src, Stash};
use super::vnet::{flags, gso_type, VirtioNetHdr, BUF_LEN, MAX_PACKET, VNET_HDR_LEN};
use super::{super_headers, CoalesceError, Flow, IpFields};
use crate::core::wire::{ipv4, protocol, tcp, IpPacket, TcpPacket};

/// What [`Coalescer::push`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Appended to an existing head of the same flow.
    Coalesced,
    /// Started a new head that later segments may join.
    Head,
    /// Copied into its own slot as is (not a coalescable TCP segment).
    Passthrough,
}

/// One slot of the arena: a passthrough packet or a (possibly growing) head.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Bytes used in the slot's buffer, vnet header included.
    len: usize,
    kind: SlotKind,
}

#[derive(Debug, Clone, Copy)]
enum SlotKind {
    Passthrough,
    Head(Head),
}

/// A TCP head: the first segment's headers, followed by the payload of every segment.
#[derive(Debug, Clone, Copy)]
struct Head {
    flow: Flow,
    /// IP fields every segment must share.
    ip: IpFields,
    /// TCP fields every segment must share.
    tcp: TcpFields,
    /// IP header length.
    l3: usize,
    /// TCP header length.
    l4: usize,
    /// Payload bytes of the first segment: every segment but the last has this size.
    gso_size: usize,
    segs: usize,
    next_seq: u32,
    /// Whether another segment may still be appended.
    open: bool,
    /// Whether the headers were rewritten for the TUN write.
    finished: bool,
}

/// The TCP header fields every segment of a head shares with its first one, besides the
/// header length and the options bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpFields {
    ack: u32,
    reserved: u8,
    window: u16,
}

/// A TCP segment that may start or join a head, as read through the views.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    flow: Flow,
    ip: IpFields,
    tcp: TcpFields,
    l3: usize,
    l4: usize,
    seq: u32,
    payload_len: usize,
    psh: bool,
}

/// GRO for the receive path: coalesces in-order TCP segments of a flow into super-packets
/// for one TUN write each. See the module docs for buffer ownership.
///
/// Call order per batch: [`push`](Self::push) each decrypted inner packet (on
/// [`CoalesceError::Full`], flush and push again), then [`finish`](Self::finish) and write
/// every yielded buffer, then [`clear`](Self::clear) once those writes completed.
///
/// A segment joins the latest open head of its flow when it has the same addresses, ports,
/// IPv4 TOS/TTL/DF or IPv6 traffic class/flow label/hop limit, TCP header length, ACK
/// number, window and options bytes (so equal timestamps); flags ACK or ACK|PSH only; a
/// sequence number equal to the head's next; at most the head's segment size of payload;
/// and the result stays within 65535 bytes. A shorter segment or PSH closes the head. Any
/// other TCP packet of the flow closes the flow's open head, so a flow's packets keep their
/// order. IPv4 with options or fragments, bad IP or TCP checksums, flags other than
/// ACK/PSH, empty payloads and non-TCP packets pass through unchanged.
pub struct Coalescer {
    arena: Box<[u8]>,
    slots: Box<[Slot]>,
    used: usize,
    verify_l4: bool,
    /// The head the latest packet started or joined: where the next one most likely goes.
    last: Option<usize>,
    /// The room [`Coalescer::land`] handed out, until [`Coalescer::commit`] or
    /// [`Coalescer::abandon`].
    stash: Stash,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("capacity", &self.slots.len())
            .field("used", &self.used)
            .finish()
    }
}

impl Coalescer {
    /// A coalescer with `capacity` slots (heads or passthrough packets per batch), each
    /// [`BUF_LEN`] bytes, allocated now. A capacity of 0 is raised to 1.
    pub fn new(capacity: usize) -> Self {
        Self::build(capacity, true)
    }

    /// A coalescer for packets whose integrity a cipher's authentication tag already
    /// proved (decrypted WireGuard data): it skips the pass over each segment that checks
    /// its TCP checksum, as kernel WireGuard marks decrypted packets checksum-verified.
    /// Everything else is as [`Coalescer::new`].
    pub fn authenticated(capacity: usize) -> Self {
        Self::build(capacity, false)
    }

    fn build(capacity: usize, verify_l4: bool) -> Self {
        let capacity = capacity.max(1);
        Self {
            verify_l4,
            arena: vec![0u8; capacity * BUF_LEN].into_boxed_slice(),
            slots: vec![
                Slot {
                    len: 0,
                    kind: SlotKind::Passthrough
                };
                capacity
            ]
            .into_boxed_slice(),
            used: 0,
            last: None,
            stash: Stash::new(),
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Number of slots in use (buffers [`finish`](Self::finish) would yield).
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether no packet was pushed since the last [`clear`](Self::clear).
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Takes one inner IP packet (copied). See the type docs for when it coalesces.
    pub fn push(&mut self, pkt: &[u8]) -> Result<Pushed, CoalesceError> {
        self.abandon();
        if pkt.len() > MAX_PACKET {
            return Err(CoalesceError::TooLarge);
        }
        self.push_from(Src::Outside(pkt))
    }

    /// Room in the arena for the next packet, of at least `need` bytes, where it will most
    /// likely stay: the decrypting caller writes the packet there (its first byte at the
    /// slice's start) and then calls [`commit`](Self::commit) with its length, or
    /// [`abandon`](Self::abandon) when there is nothing to take. A segment that continues
    /// the latest head lands with its headers over the head's last bytes (saved, and
    /// restored by `commit` or `abandon`) and its payload right where it belongs, so joining
    /// copies nothing; otherwise it lands at the start of a free slot, where a new head or a
    /// passthrough packet stays. A packet that ends up elsewhere is copied there, as by
    /// [`push`](Self::push). `None` when no slot is free (or `need` exceeds a slot).
    ///
    /// Until `commit` or `abandon`, the yielded buffers must not be read: any other `&mut`
    /// call abandons the landing first.
    pub fn land(&mut self, need: usize) -> Option<&mut [u8]> {
        self.abandon();
        let l = self.tail_landing(need).or_else(|| {
            (self.used < self.slots.len()).then(|| Landing::fresh(self.used, need))?
        })?;
        self.stash.open(&mut self.arena, l)
    }

    /// The first `len` bytes of the room [`land`](Self::land) handed out, if it is
    /// still out and that large.
    pub fn landed(&self, len: usize) -> Option<&[u8]> {
        self.stash.landed(&self.arena, len)
    }

    /// Takes the `len`-byte packet written into the room [`land`](Self::land) handed out,
    /// as [`push`](Self::push) would take it. On [`CoalesceError::Full`] (and
    /// [`CoalesceError::TooLarge`]) the landing stays out: the caller may still read it with
    /// [`landed`](Self::landed) (to put it elsewhere) and then [`abandon`](Self::abandon)s
    /// it. [`CoalesceError::NoLanding`] when no room is out or `len` exceeds it.
    pub fn commit(&mut self, len: usize) -> Result<Pushed, CoalesceError> {
        let Some(l) = self.stash.out().filter(|l| len <= l.room) else {
            return Err(CoalesceError::NoLanding);
        };
        if len > MAX_PACKET {
            return Err(CoalesceError::TooLarge);
        }
        let r = self.push_from(Src::Landed(l.at, len));
        if r.is_ok() {
            self.abandon();
        }
        r
    }

    /// Ends the landing [`land`](Self::land) handed out, if any, without taking a packet:
    /// the head bytes it covered are restored.
    pub fn abandon(&mut self) {
        self.stash.abandon(&mut self.arena);
    }

    /// A landing in the tail of the latest head, if it is open (see [`Landing::tail`]).
    fn tail_landing(&self, need: usize) -> Option<Landing> {
        let i = self.last?;
        let slot = self.slots.get(i)?;
        match slot.kind {
            SlotKind::Head(h) if h.open && !h.finished => {
                Landing::tail(i, slot.len, h.l3 + h.l4, need)
            }
            _ => None,
        }
    }

    /// [`push`](Self::push) from wherever the packet is (at most [`MAX_PACKET`] bytes).
    fn push_from(&mut self, src: Src<'_>) -> Result<Pushed, CoalesceError> {
        let found = candidate(src.bytes(&self.arena), self.verify_l4);
        let Some((cand, key_ok)) = found else {
            return self.new_slot(src, None);
        };
        if let Some(i) = self.find_open_head(&cand.flow) {
            if key_ok && self.try_append(i, src, &cand) {
                self.last = Some(i);
                return Ok(Pushed::Coalesced);
            }
            if let SlotKind::Head(h) = &mut self.slots[i].kind {
                h.open = false;
            }
        }
        let r = self.new_slot(src, key_ok.then_some(cand));
        if r == Ok(Pushed::Head) {
            self.last = Some(self.used - 1);
        }
        r
    }

    /// Rewrites each head's headers for the TUN write (once) and yields every buffer,
    /// `VirtioNetHdr` + IP packet, in the order their first packet arrived. Pushing after
    /// `finish` starts new slots; finished heads take no more segments.
    pub fn finish(&mut self) -> impl Iterator<Item = &[u8]> + '_ {
        self.abandon();
        self.last = None;
        for i in 0..self.used {
            self.finish_slot(i);
        }
        let arena = &self.arena;
        self.slots[..self.used]
            .iter()
            .enumerate()
            .map(move |(i, s)| &arena[i * BUF_LEN..i * BUF_LEN + s.len])
    }

    /// Forgets every slot. Call only after the buffers from [`finish`](Self::finish) were
    /// written out.
    pub fn clear(&mut self) {
        self.used = 0;
        self.last = None;
        self.stash.forget();
    }

    /// [`finish`](Self::finish), hand every buffer to `write`, then [`clear`](Self::clear):
    /// for drivers whose writes complete before `write` returns.
    pub fn drain(&mut self, mut write: impl FnMut(&[u8])) {
        for b in self.finish() {
            write(b);
        }
        self.clear();
    }

    fn buf(&self, i: usize) -> &[u8] {
        &self.arena[i * BUF_LEN..(i + 1) * BUF_LEN]
    }

    fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.arena[i * BUF_LEN..(i + 1) * BUF_LEN]
    }

    fn new_slot(&mut self, src: Src<'_>, cand: Option<Candidate>) -> Result<Pushed, CoalesceError> {
        if self.used == self.slots.len() {
            return Err(CoalesceError::Full);
        }
        let i = self.used;
        let len = src.bytes(&self.arena).len();
        self.used += 1;
        self.buf_mut(i)[..VNET_HDR_LEN].fill(0);
        place(&mut self.arena, src, 0..len, i * BUF_LEN + VNET_HDR_LEN);
        let (kind, pushed) = match cand {
            Some(c) => (
                SlotKind::Head(Head {
                    flow: c.flow,
                    ip: c.ip,
                    tcp: c.tcp,
                    l3: c.l3,
                    l4: c.l4,
                    gso_size: c.payload_len,
                    segs: 1,
                    next_seq: c.seq.wrapping_add(c.payload_len as u32),
                    open: !c.psh,
                    finished: false,
                }),
                Pushed::Head,
            ),
            None => (SlotKind::Passthrough, Pushed::Passthrough),
        };
        self.slots[i] = Slot {
            len: VNET_HDR_LEN + len,
            kind,
        };
        Ok(pushed)
    }

    /// The latest open head of `flow` (same IP version, addresses and ports).
    fn find_open_head(&self, flow: &Flow) -> Option<usize> {
        (0..self.used)
            .rev()
            .find(|&i| matches!(self.slots[i].kind, SlotKind::Head(h) if h.open && h.flow == *flow))
    }

    /// Appends `pkt`'s payload to head `i` when every GRO condition holds.
    fn try_append(&mut self, i: usize, src: Src<'_>, c: &Candidate) -> bool {
        let slot = self.slots[i];
        let SlotKind::Head(mut h) = slot.kind else {
            return false;
        };
        let head = &self.buf(i)[VNET_HDR_LEN..slot.len];
        let pkt = src.bytes(&self.arena);
        if !(h.ip == c.ip
            && h.l4 == c.l4
            && h.tcp == c.tcp
            && tcp_options(head, h.l3, h.l4) == tcp_options(pkt, c.l3, c.l4)
            && c.seq == h.next_seq
            && c.payload_len <= h.gso_size
            && slot.len - VNET_HDR_LEN + c.payload_len <= MAX_PACKET)
        {
            return false;
        }
        let payload = c.l3 + c.l4..c.l3 + c.l4 + c.payload_len;
        if payload.end > pkt.len() {
            return false;
        }
        let at = slot.len;
        place(&mut self.arena, src, payload, i * BUF_LEN + at);
        h.segs += 1;
        h.next_seq = h.next_seq.wrapping_add(c.payload_len as u32);
        if c.payload_len < h.gso_size || c.psh {
            h.open = false;
        }
        if c.psh {
            // The super-packet carries PSH like the last segment did.
            let th = VNET_HDR_LEN + h.l3..VNET_HDR_LEN + h.l3 + h.l4;
            if let Ok(mut t) = TcpPacket::new_checked(&mut self.buf_mut(i)[th]) {
                let f = t.flags();
                t.set_flags(f | tcp::PSH);
            }
        }
        self.slots[i] = Slot {
            len: at + c.payload_len,
            kind: SlotKind::Head(h),
        };
        true
    }

    /// Writes the vnet header and fixes lengths and checksums of a multi-segment head.
    fn finish_slot(&mut self, i: usize) {
        let slot = self.slots[i];
        let SlotKind::Head(mut h) = slot.kind else {
            return;
        };
        if h.finished {
            return;
        }
        h.open = false;
        h.finished = true;
        self.slots[i].kind = SlotKind::Head(h);
        if h.segs < 2 {
            // A lone segment goes out unchanged with a zero vnet header.
            return;
        }
        let v6 = h.flow.is_v6();
        let b = &mut self.buf_mut(i)[..slot.len];
        let hdr = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: if v6 { gso_type::TCPV6 } else { gso_type::TCPV4 },
            hdr_len: (h.l3 + h.l4) as u16,
            gso_size: h.gso_size as u16,
            csum_start: h.l3 as u16,
            csum_offset: tcp::CHECKSUM_OFFSET as u16,
        };
        let (vnet, ip) = b.split_at_mut(VNET_HDR_LEN);
        let done = super_headers(ip, v6).and_then(|(l4, partial)| {
            TcpPacket::new_checked(l4)?.set_checksum(partial);
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

/// Classifies a packet: `None` for anything that is not a TCP/IP packet (passthrough);
/// otherwise the candidate and whether it may start or join a head. `verify_l4` checks
/// the TCP checksum too.
fn candidate(pkt: &[u8], verify_l4: bool) -> Option<(Candidate, bool)> {
    let ip = IpPacket::new_checked(pkt).ok()?;
    if ip.protocol() != protocol::TCP {
        return None;
    }
    let (ip_ok, fields) = match &ip {
        IpPacket::V4(p) => {
            if p.is_fragment() {
                return None;
            }
            let ok = p.header_len() == ipv4::HEADER_LEN
                && p.total_len() == pkt.len()
                && p.verify_checksum();
            (ok, IpFields::v4(p))
        }
        IpPacket::V6(p) => (p.total_len() == pkt.len(), IpFields::v6(p)),
    };
    let l3 = ip.header_len();
    let l4_bytes = ip.payload();
    let t = TcpPacket::new_checked(l4_bytes).ok()?;
    let f = t.flags();
    let psh = f & tcp::PSH != 0;
    let ok = ip_ok
        && f & !(tcp::ACK | tcp::PSH) == 0
        && f & tcp::ACK != 0
        && !t.payload().is_empty()
        // The pseudo-header sum only when asked: the receive path trusts what the AEAD covers.
        && (!verify_l4 || t.verify_checksum(ip.pseudo_header_sum(l4_bytes.len() as u32)));
    Some((
        Candidate {
            flow: Flow {
                src: ip.src(),
                dst: ip.dst(),
                src_port: t.src_port(),
                dst_port: t.dst_port(),
            },
            ip: fields,
            tcp: TcpFields {
                ack: t.ack(),
                reserved: t.reserved(),
                window: t.window(),
            },
            l3,
            l4: t.header_len(),
            seq: t.seq(),
            payload_len: t.payload().len(),
            psh,
        },
        ok,
    ))
}

/// The TCP options bytes of an IP packet whose IP header is `l3` bytes and TCP header `l4`
/// bytes (as its views measured them): they follow the fixed TCP header. Equal options mean
/// equal timestamps.
fn tcp_options(pkt: &[u8], l3: usize, l4: usize) -> Option<&[u8]> {
    pkt.get(l3 + tcp::HEADER_LEN..l3 + l4)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;
    use crate::core::wire::{Ipv4Packet, Ipv6Packet};

    fn coalesce_all(c: &mut Coalescer, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        for p in pkts {
            c.push(p).unwrap();
        }
        let mut out = Vec::new();
        c.drain(|b| out.push(b.to_vec()));
        out
    }
    use proptest::prelude::*;

    #[test]
    fn coalesce_rebuilds_the_super_packet() {
        for v6 in [false, true] {
            let payload = payload_bytes(44 * 1368 + 100, 5);
            let (hdr, sup) = SuperPacket::tcp(v6, &payload, 1368, tcp::ACK | tcp::PSH).build();
            let segs = split_all(&hdr, &sup).unwrap();
            let mut c = Coalescer::new(8);
            assert_eq!(c.push(&segs[0]).unwrap(), Pushed::Head);
            assert_eq!(c.push(&segs[1]).unwrap(), Pushed::Coalesced);
            for s in &segs[2..] {
                c.push(s).unwrap();
            }
            let out: Vec<Vec<u8>> = c.finish().map(<[u8]>::to_vec).collect();
            assert_eq!(out.len(), 1);
            let got = VirtioNetHdr::parse(&out[0]).unwrap();
            assert_eq!(got, hdr, "vnet header as the kernel would write it");
            assert_eq!(
                &out[0][VNET_HDR_LEN..],
                &sup[..],
                "byte-identical super-packet"
            );
            // finish() is idempotent until clear().
            assert_eq!(c.finish().next().unwrap(), &out[0][..]);
            c.clear();
            assert!(c.is_empty());
            let again = split_all(&got, &out[0][VNET_HDR_LEN..]).unwrap();
            assert_eq!(again, segs);
        }
    }

    #[test]
    fn reordered_and_missing_segments_do_not_coalesce() {
        let payload = payload_bytes(4 * 1000, 8);
        let (hdr, sup) = SuperPacket::tcp(false, &payload, 1000, tcp::ACK).build();
        let s = split_all(&hdr, &sup).unwrap();
        let mut c = Coalescer::new(8);
        // 0, 2, 1: every segment alone, in arrival order, unchanged.
        let out = coalesce_all(&mut c, &[s[0].clone(), s[2].clone(), s[1].clone()]);
        assert_eq!(out.len(), 3);
        for (o, want) in out.iter().zip([&s[0], &s[2], &s[1]]) {
            assert_eq!(o[..VNET_HDR_LEN], [0u8; VNET_HDR_LEN]);
            assert_eq!(&o[VNET_HDR_LEN..], &want[..]);
        }
        // 0, 2, 3 (1 lost): 0 alone, then 2+3 coalesced.
        let out = coalesce_all(&mut c, &[s[0].clone(), s[2].clone(), s[3].clone()]);
        assert_eq!(out.len(), 2);
        assert_eq!(&out[0][VNET_HDR_LEN..], &s[0][..]);
        let h = VirtioNetHdr::parse(&out[1]).unwrap();
        assert_eq!(h.gso_size, 1000);
        assert_eq!(
            split_all(&h, &out[1][VNET_HDR_LEN..]).unwrap(),
            vec![s[2].clone(), s[3].clone()]
        );
        // A duplicate does not join either.
        let out = coalesce_all(&mut c, &[s[0].clone(), s[0].clone()]);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn interleaved_flows_get_their_own_heads() {
        let (h1, a) = SuperPacket::tcp(false, &payload_bytes(3000, 1), 1000, tcp::ACK).build();
        let (_, mut b) = SuperPacket::tcp(false, &payload_bytes(3000, 2), 1000, tcp::ACK).build();
        b[15] = 99; // another source address
        let b_ip = Ipv4Packet::new_checked(&mut b[..]).map(|mut p| p.fill_checksum());
        assert!(b_ip.is_ok());
        let sa = split_all(&h1, &a).unwrap();
        let sb = split_all(&h1, &b).unwrap();
        let mixed: Vec<Vec<u8>> = (0..3)
            .flat_map(|i| [sa[i].clone(), sb[i].clone()])
            .collect();
        let mut c = Coalescer::new(8);
        let out = coalesce_all(&mut c, &mixed);
        assert_eq!(out.len(), 2);
        assert_eq!(
            split_all(&VirtioNetHdr::parse(&out[0]).unwrap(), &out[0][10..]).unwrap(),
            sa
        );
        assert_eq!(
            split_all(&VirtioNetHdr::parse(&out[1]).unwrap(), &out[1][10..]).unwrap(),
            sb
        );
    }

    /// Pushes `first`, then `second` (a mutated next segment), expecting two buffers.
    fn assert_no_join(mutate: impl Fn(&mut Vec<u8>)) {
        let (hdr, sup) = SuperPacket::tcp(false, &payload_bytes(2000, 4), 1000, tcp::ACK).build();
        let s = split_all(&hdr, &sup).unwrap();
        let mut second = s[1].clone();
        mutate(&mut second);
        // Keep the checksums right so only the mutated field differs.
        Ipv4Packet::new_checked(&mut second[..])
            .unwrap()
            .fill_checksum();
        let pseudo = Ipv4Packet::new_checked(&second[..])
            .unwrap()
            .pseudo_header_sum((second.len() - 20) as u32);
        TcpPacket::new_checked(&mut second[20..])
            .unwrap()
            .fill_checksum(pseudo);
        let mut c = Coalescer::new(4);
        let out = coalesce_all(&mut c, &[s[0].clone(), second.clone()]);
        assert_eq!(out.len(), 2);
        assert_eq!(&out[1][VNET_HDR_LEN..], &second[..]);
    }

    #[test]
    fn differing_headers_do_not_coalesce() {
        assert_no_join(|p| p[8] = 63); // TTL
        assert_no_join(|p| p[1] = 2); // TOS (ECN)
        assert_no_join(|p| p[6] = 0); // DF cleared
        assert_no_join(|p| p[20 + 11] ^= 1); // ACK number
        assert_no_join(|p| p[20 + 15] ^= 1); // window
        assert_no_join(|p| p[20 + 27] ^= 1); // timestamp option
        assert_no_join(|p| p[20 + 13] |= tcp::URG); // flags beyond ACK/PSH
        assert_no_join(|p| p[20 + 7] ^= 1); // sequence number
        assert_no_join(|p| p[20 + 12] |= 1); // reserved bits next to the data offset
    }

    #[test]
    fn authenticated_coalescer_skips_only_the_tcp_checksum_check() {
        let (hdr, sup) = SuperPacket::tcp(false, &payload_bytes(5000, 6), 1000, tcp::ACK).build();
        let s = split_all(&hdr, &sup).unwrap();
        let mut c = Coalescer::authenticated(16);
        let mut bad_tcp = s[1].clone();
        bad_tcp[60] ^= 0xff;
        assert_eq!(c.push(&s[0]).unwrap(), Pushed::Head);
        assert_eq!(c.push(&bad_tcp).unwrap(), Pushed::Coalesced);
        // A bad IPv4 header checksum still passes through and closes the head.
        let mut bad_ip = s[2].clone();
        bad_ip[10] ^= 0xff;
        assert_eq!(c.push(&bad_ip).unwrap(), Pushed::Passthrough);
        assert_eq!(c.push(&s[3]).unwrap(), Pushed::Head);
    }

    #[test]
    fn passthrough_and_head_closing_rules() {
        let (hdr, sup) = SuperPacket::tcp(false, &payload_bytes(5000, 6), 1000, tcp::ACK).build();
        let s = split_all(&hdr, &sup).unwrap();
        let mut c = Coalescer::new(16);
        // A bad TCP checksum passes through and closes the flow's head.
        let mut bad = s[1].clone();
        bad[60] ^= 0xff;
        assert_eq!(c.push(&s[0]).unwrap(), Pushed::Head);
        assert_eq!(c.push(&bad).unwrap(), Pushed::Passthrough);
        assert_eq!(c.push(&s[2]).unwrap(), Pushed::Head);
        c.clear();
        // UDP, a SYN, a pure ACK and a non-IP packet pass through.
        let (_, udp) = SuperPacket::udp(false, &payload_bytes(100, 1), 100).build();
        assert_eq!(c.push(&udp).unwrap(), Pushed::Passthrough);
        let (_, syn) = SuperPacket::tcp(false, &[], 1000, tcp::SYN).build();
        assert_eq!(c.push(&syn).unwrap(), Pushed::Passthrough);
        assert_eq!(c.push(&[0x00, 1, 2]).unwrap(), Pushed::Passthrough);
        assert_eq!(c.push(&[]).unwrap(), Pushed::Passthrough);
        let (_, mut ack) = SuperPacket::tcp(false, &[], 1000, tcp::ACK).build();
        let pseudo = Ipv4Packet::new_checked(&ack[..])
            .unwrap()
            .pseudo_header_sum(32);
        TcpPacket::new_checked(&mut ack[20..])
            .unwrap()
            .fill_checksum(pseudo);
        assert_eq!(c.push(&ack).unwrap(), Pushed::Passthrough);
        let mut out = Vec::new();
        c.drain(|b| out.push(b.to_vec()));
        assert_eq!(out.len(), 5);
        assert!(out.iter().all(|b| b[..VNET_HDR_LEN] == [0u8; VNET_HDR_LEN]));
        assert_eq!(&out[0][10..], &udp[..]);
        // A short segment ends the run: the next full one starts a new head.
        let (h2, sup2) = SuperPacket::tcp(false, &payload_bytes(2500, 6), 1000, tcp::ACK).build();
        let t = split_all(&h2, &sup2).unwrap(); // 1000, 1000, 500
        let (_, sup3) = SuperPacket::tcp(false, &payload_bytes(1000, 6), 1000, tcp::ACK).build();
        let mut next = sup3.clone();
        let seq = 0xffff_f000u32.wrapping_add(2500);
        next[24..28].copy_from_slice(&seq.to_be_bytes());
        let pseudo = Ipv4Packet::new_checked(&next[..])
            .unwrap()
            .pseudo_header_sum((next.len() - 20) as u32);
        TcpPacket::new_checked(&mut next[20..])
            .unwrap()
            .fill_checksum(pseudo);
        assert_eq!(c.push(&t[0]).unwrap(), Pushed::Head);
        assert_eq!(c.push(&t[1]).unwrap(), Pushed::Coalesced);
        assert_eq!(c.push(&t[2]).unwrap(), Pushed::Coalesced);
        assert_eq!(c.push(&next).unwrap(), Pushed::Head);
        c.clear();
        // PSH ends the run too.
        let (h3, sup4) =
            SuperPacket::tcp(false, &payload_bytes(3000, 6), 1000, tcp::ACK | tcp::PSH).build();
        let u = split_all(&h3, &sup4).unwrap();
        let mut psh_mid = u[1].clone();
        psh_mid[33] |= tcp::PSH;
        let pseudo = Ipv4Packet::new_checked(&psh_mid[..])
            .unwrap()
            .pseudo_header_sum((psh_mid.len() - 20) as u32);
        TcpPacket::new_checked(&mut psh_mid[20..])
            .unwrap()
            .fill_checksum(pseudo);
        assert_eq!(c.push(&u[0]).unwrap(), Pushed::Head);
        assert_eq!(c.push(&psh_mid).unwrap(), Pushed::Coalesced);
        assert_eq!(c.push(&u[2]).unwrap(), Pushed::Head);
        c.clear();
        // IPv4 options pass through.
        let mut opts = Vec::from(&s[0][..20]);
        opts[0] = 0x46;
        opts.extend_from_slice(&[1, 1, 1, 0]);
        opts.extend_from_slice(&s[0][20..]);
        let n = opts.len() as u16;
        opts[2..4].copy_from_slice(&n.to_be_bytes());
        Ipv4Packet::new_checked(&mut opts[..])
            .unwrap()
            .fill_checksum();
        assert_eq!(c.push(&opts).unwrap(), Pushed::Passthrough);
    }

    #[test]
    fn full_table_reports_instead_of_dropping() {
        let mut c = Coalescer::new(2);
        assert_eq!(c.capacity(), 2);
        let (_, udp) = SuperPacket::udp(false, &payload_bytes(10, 1), 100).build();
        c.push(&udp).unwrap();
        c.push(&udp).unwrap();
        assert_eq!(c.push(&udp), Err(CoalesceError::Full));
        assert_eq!(c.len(), 2);
        assert_eq!(c.finish().count(), 2);
        c.clear();
        c.push(&udp).unwrap();
        assert_eq!(
            c.push(&vec![0x45; MAX_PACKET + 1]),
            Err(CoalesceError::TooLarge)
        );
        // Appending to a head needs no free slot.
        let (hdr, sup) = SuperPacket::tcp(false, &payload_bytes(3000, 1), 1000, tcp::ACK).build();
        let s = split_all(&hdr, &sup).unwrap();
        c.push(&s[0]).unwrap();
        assert_eq!(c.push(&s[1]).unwrap(), Pushed::Coalesced);
        assert_eq!(c.push(&s[2]).unwrap(), Pushed::Coalesced);
    }

    #[test]
    fn head_stops_at_64k() {
        let (pkts, sup) = past_64k();
        let mut c = Coalescer::new(4);
        let out = coalesce_all(&mut c, &pkts);
        assert_eq!(out.len(), 2);
        assert_eq!(&out[0][VNET_HDR_LEN..], &sup[..]);
        assert_eq!(&out[1][VNET_HDR_LEN..], &pkts[7][..]);
    }

    /// Eight in-order 9000-byte IPv6 segments: the eighth would take the packet past 65535
    /// bytes. Also the super-packet of the first seven.
    fn past_64k() -> (Vec<Vec<u8>>, Vec<u8>) {
        let (hdr, sup) =
            SuperPacket::tcp(true, &payload_bytes(7 * 9000, 1), 9000, tcp::ACK).build();
        let mut pkts = split_all(&hdr, &sup).unwrap();
        assert_eq!(pkts.len(), 7);
        let mut eighth = pkts[6].clone();
        let seq = 0xffff_f000u32.wrapping_add(7 * 9000);
        eighth[44..48].copy_from_slice(&seq.to_be_bytes());
        let pseudo = Ipv6Packet::new_checked(&eighth[..])
            .unwrap()
            .pseudo_header_sum((eighth.len() - 40) as u32);
        TcpPacket::new_checked(&mut eighth[40..])
            .unwrap()
            .fill_checksum(pseudo);
        pkts.push(eighth);
        (pkts, sup)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn split_coalesce_round_trip(
            v6 in any::<bool>(),
            mss in 1u16..=9000,
            len in 0usize..=65_000,
            psh in any::<bool>(),
            seed in any::<u8>(),
        ) {
            let len = len.min(MAX_PACKET - 40 - 32);
            let payload = payload_bytes(len, seed);
            let flags = if psh { tcp::ACK | tcp::PSH } else { tcp::ACK };
            let (hdr, sup) = SuperPacket::tcp(v6, &payload, mss, flags).build();
            let segs = split_all(&hdr, &sup).unwrap();
            let mut joined = Vec::new();
            let hl = if v6 { 72 } else { 52 };
            for s in &segs {
                assert_segment_checksums(s);
                joined.extend_from_slice(&s[hl..]);
            }
            prop_assert_eq!(&joined, &payload);
            let mut c = Coalescer::new(segs.len().max(1));
            let out = coalesce_all(&mut c, &segs);
            if payload.is_empty() {
                // A pure ACK passes through.
                prop_assert_eq!(out.len(), 1);
                prop_assert_eq!(&out[0][VNET_HDR_LEN..], &segs[0][..]);
            } else if segs.len() == 1 {
                prop_assert_eq!(out.len(), 1);
                prop_assert_eq!(&out[0][..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN][..]);
                prop_assert_eq!(&out[0][VNET_HDR_LEN..], &segs[0][..]);
            } else {
                prop_assert_eq!(out.len(), 1);
                prop_assert_eq!(VirtioNetHdr::parse(&out[0]).unwrap(), hdr);
                prop_assert_eq!(&out[0][VNET_HDR_LEN..], &sup[..]);
                let again = split_all(&hdr, &out[0][VNET_HDR_LEN..]).unwrap();
                prop_assert_eq!(again, segs);
            }
        }
    }

    /// Every buffer [`Coalescer::push`] gives for `pkts` (flushing when full). `None`
    /// entries are packets a decrypting caller would drop: skipped.
    fn via_push(cap: usize, pkts: &[Option<Vec<u8>>]) -> Vec<Vec<u8>> {
        let mut c = Coalescer::new(cap);
        let mut out = Vec::new();
        for p in pkts.iter().flatten() {
            while c.push(p) == Err(CoalesceError::Full) {
                c.drain(|b| out.push(b.to_vec()));
            }
        }
        c.drain(|b| out.push(b.to_vec()));
        out
    }

    /// The same through [`Coalescer::land`] / [`Coalescer::commit`], as the pipeline
    /// decrypts: the packet written at the room's start followed by junk (boringtun's
    /// padding and tag); a `None` lands junk and is abandoned. Also returns how many packets
    /// joined a head without moving (decrypted where they stay).
    fn via_land(cap: usize, pkts: &[Option<Vec<u8>>]) -> (Vec<Vec<u8>>, usize) {
        let mut c = Coalescer::new(cap);
        let mut out = Vec::new();
        let mut in_place = 0;
        for p in pkts {
            let len = p.as_ref().map_or(100, Vec::len);
            loop {
                let Some(room) = c.land(len + 32) else {
                    // No room: the pipeline decrypts into its scratch and pushes.
                    assert_eq!(c.len(), c.capacity(), "no room only when full");
                    if let Some(p) = p {
                        while c.push(p) == Err(CoalesceError::Full) {
                            c.drain(|b| out.push(b.to_vec()));
                        }
                    }
                    break;
                };
                assert!(room.len() >= len + 32);
                let at = room.as_ptr() as usize;
                room[..len + 32].fill(0xa5);
                let Some(p) = p else {
                    c.abandon();
                    break;
                };
                room[..len].copy_from_slice(p);
                let before = c.slots[..c.len()].iter().map(|s| s.len).collect::<Vec<_>>();
                match c.commit(len) {
                    Ok(Pushed::Coalesced) => {
                        let hl = len - c_payload(p);
                        // Joined in place iff the landing's payload is where it was put.
                        let i = (0..c.len())
                            .find(|&i| c.slots[i].len != before[i])
                            .expect("a head grew");
                        let head_end = c.arena.as_ptr() as usize + i * BUF_LEN + before[i];
                        in_place += usize::from(at + hl == head_end);
                        break;
                    }
                    Ok(_) => break,
                    Err(CoalesceError::Full) => {
                        assert_eq!(
                            c.landed(len),
                            Some(&p[..]),
                            "a refused landing stays readable"
                        );
                        c.abandon();
                        c.drain(|b| out.push(b.to_vec()));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        c.drain(|b| out.push(b.to_vec()));
        (out, in_place)
    }

    /// TCP payload bytes of a candidate segment.
    fn c_payload(p: &[u8]) -> usize {
        candidate(p, false).map_or(0, |(c, _)| c.payload_len)
    }

    /// Segments of two flows (the second from another source address).
    fn two_flows(v6: bool, len: usize, mss: u16, flags: u8) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (h, a) = SuperPacket::tcp(v6, &payload_bytes(len, 1), mss, flags).build();
        let (_, mut b) = SuperPacket::tcp(v6, &payload_bytes(len, 2), mss, flags).build();
        if v6 {
            b[23] ^= 1;
        } else {
            b[15] = 99;
            Ipv4Packet::new_checked(&mut b[..]).unwrap().fill_checksum();
        }
        let sa = split_all(&h, &a).unwrap();
        // The TCP checksum is not checked by `Coalescer::new` after the address change: redo.
        let sb = split_all(&h, &b)
            .unwrap_or_default()
            .into_iter()
            .map(|mut s| {
                let ip = IpPacket::new_checked(&s[..]).unwrap();
                let (l3, pseudo) = (
                    ip.header_len(),
                    ip.pseudo_header_sum((s.len() - ip.header_len()) as u32),
                );
                TcpPacket::new_checked(&mut s[l3..])
                    .unwrap()
                    .fill_checksum(pseudo);
                s
            })
            .collect();
        (sa, sb)
    }

    fn some(v: &[Vec<u8>]) -> Vec<Option<Vec<u8>>> {
        v.iter().cloned().map(Some).collect()
    }

    #[test]
    fn landing_coalesces_in_place_like_push() {
        for v6 in [false, true] {
            // 44 segments, the last one short: all but the first join where they landed.
            let (a, _) = two_flows(v6, 43 * 1000 + 300, 1000, tcp::ACK | tcp::PSH);
            assert_eq!(a.len(), 44);
            let pkts = some(&a);
            let (out, in_place) = via_land(4, &pkts);
            assert_eq!(out, via_push(4, &pkts), "v6={v6}");
            assert_eq!(out.len(), 1);
            assert_eq!(in_place, 43, "every continuation decrypted where it stays");
        }
    }

    #[test]
    fn landing_handles_what_does_not_join() {
        for v6 in [false, true] {
            let (a, b) = two_flows(v6, 6 * 1000, 1000, tcp::ACK);
            let short_b1 = two_flows(v6, 1500, 1000, tcp::ACK).1[1].clone();
            let (_, udp) = SuperPacket::udp(v6, &payload_bytes(300, 3), 300).build();
            let cases: Vec<Vec<Option<Vec<u8>>>> = vec![
                // Interleaved flows: each lands in the other's tail first.
                (0..6)
                    .flat_map(|i| [Some(a[i].clone()), Some(b[i].clone())])
                    .collect(),
                // A gap, a reorder and a duplicate.
                [0, 1, 3, 2, 4, 4, 5]
                    .iter()
                    .map(|&i| Some(a[i].clone()))
                    .collect(),
                // Not TCP, in the middle of a run.
                vec![
                    Some(a[0].clone()),
                    Some(a[1].clone()),
                    Some(udp.clone()),
                    Some(a[2].clone()),
                ],
                // Full, the latest head closed by a short segment, another head open: the
                // next segment of that one still joins it.
                vec![
                    Some(a[0].clone()),
                    Some(b[0].clone()),
                    Some(short_b1.clone()),
                    Some(a[1].clone()),
                ],
                // Dropped after decryption (filtered): the head's tail is restored.
                vec![
                    Some(a[0].clone()),
                    Some(a[1].clone()),
                    None,
                    Some(a[2].clone()),
                    None,
                ],
            ];
            for (n, pkts) in cases.iter().enumerate() {
                for cap in [1, 2, 3, 8] {
                    assert_eq!(
                        via_land(cap, pkts).0,
                        via_push(cap, pkts),
                        "v6={v6} case {n} cap {cap}"
                    );
                }
            }
        }
    }

    #[test]
    fn landing_in_a_full_coalescer() {
        let (a, b) = two_flows(false, 3 * 1000, 1000, tcp::ACK);
        let mut c = Coalescer::new(1);
        c.push(&a[0]).unwrap();
        // The head's tail is offered; the other flow's segment finds no free slot.
        let room = c.land(b[0].len() + 32).unwrap();
        room[..b[0].len()].copy_from_slice(&b[0]);
        assert_eq!(c.commit(b[0].len()), Err(CoalesceError::Full));
        assert_eq!(c.landed(b[0].len()), Some(&b[0][..]));
        c.abandon();
        assert_eq!(c.commit(1), Err(CoalesceError::NoLanding));
        assert_eq!(c.landed(1), None);
        // Nothing of the landing is left in the head.
        assert_eq!(c.push(&a[1]).unwrap(), Pushed::Coalesced);
        let out: Vec<Vec<u8>> = c.finish().map(<[u8]>::to_vec).collect();
        assert_eq!(out, via_push(1, &some(&a[..2])));
        // Finished heads offer no tail, and a full coalescer no room.
        assert!(c.land(100).is_none());
        c.clear();
        assert!(c.land(BUF_LEN).is_none(), "more than a slot holds");
        // A landing left out is given back by the next push.
        c.push(&a[0]).unwrap();
        let room = c.land(1100).unwrap();
        room.fill(0xee);
        c.push(&a[1]).unwrap();
        let out: Vec<Vec<u8>> = c.finish().map(<[u8]>::to_vec).collect();
        assert_eq!(out, via_push(1, &some(&a[..2])));
    }

    #[test]
    fn landing_stops_at_64k() {
        let pkts = some(&past_64k().0);
        assert_eq!(via_land(2, &pkts).0, via_push(2, &pkts));
        assert_eq!(via_land(2, &pkts).0.len(), 2);
    }

    proptest! {
        #[test]
        fn landing_matches_push(
            v6 in any::<bool>(),
            order in proptest::collection::vec((0usize..12, any::<bool>(), 0u8..8), 0..40),
            cap in 1usize..4,
        ) {
            let (a, b) = two_flows(v6, 6 * 700 + 100, 700, tcp::ACK);
            let pkts: Vec<Option<Vec<u8>>> = order
                .iter()
                .map(|&(i, flow, drop)| {
                    let s = if flow { &a } else { &b };
                    (drop != 0).then(|| s[i % s.len()].clone())
                })
                .collect();
            prop_assert_eq!(via_land(cap, &pkts).0, via_push(cap, &pkts));
        }
    }
}
