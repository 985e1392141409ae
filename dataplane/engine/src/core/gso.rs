//! TUN segmentation offload: the `virtio_net_hdr` that prefixes every TUN read and write
//! when the device has `IFF_VNET_HDR`, TSO/USO [`split`] of super-packets read from the TUN,
//! and the GRO [`Coalescer`] that rebuilds super-packets from decrypted segments.
//!
//! Send side: a TUN read is `VirtioNetHdr` + one IP packet. With TSO/USO on, that packet
//! may be a super-packet of up to 64 KiB whose TCP/UDP checksum field holds only the
//! pseudo-header sum (`NEEDS_CSUM`, the kernel's `CHECKSUM_PARTIAL`). [`split`] builds each
//! MTU-sized segment in a caller-owned scratch buffer, completes its IP and L4 checksums
//! from scratch, and hands it to a callback before building the next one; the slice is
//! only valid inside the callback.
//!
//! Receive side: the engine decrypts a batch of datagrams and [`Coalescer::push`]es each
//! inner packet. Consecutive in-order TCP segments of one flow are appended to one head;
//! [`Coalescer::finish`] then yields one buffer per head or passthrough packet, each
//! `VirtioNetHdr` + IP packet, ready for one TUN write.
//!
//! Buffer ownership: the coalescer owns its arena (`capacity` × [`BUF_LEN`] bytes,
//! allocated once in [`Coalescer::new`]). The slices [`Coalescer::finish`] yields stay
//! valid and unchanged until the next `&mut` call; the driver writes them to the TUN and
//! calls [`Coalescer::clear`] (or pushes again) only after every one of those writes
//! completed — with io_uring, after their completions were reaped.
//!
//! Nothing here allocates after construction, and no input can make it panic.

use std::ops::ControlFlow;

use super::wire::{
    checksum, ipv4, ipv6, protocol, tcp, udp, Ipv4Packet, Ipv6Packet, TcpPacket, WireError,
};

/// Size of `struct virtio_net_hdr` (without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
/// The largest IP packet a TUN read or a coalesced head holds.
pub const MAX_PACKET: usize = 65535;
/// A buffer for one TUN read or write: header plus the largest packet.
pub const BUF_LEN: usize = VNET_HDR_LEN + MAX_PACKET;

/// `virtio_net_hdr.flags` bits.
pub mod flags {
    /// The L4 checksum at `csum_start + csum_offset` must be completed
    /// (it holds the pseudo-header sum).
    pub const NEEDS_CSUM: u8 = 1;
    /// The checksum was already verified.
    pub const DATA_VALID: u8 = 2;
}

/// `virtio_net_hdr.gso_type` values.
pub mod gso_type {
    /// Not a super-packet.
    pub const NONE: u8 = 0;
    /// TCP over IPv4 (TSO4).
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation offload (UFO; obsolete, not supported).
    pub const UDP: u8 = 3;
    /// TCP over IPv6 (TSO6).
    pub const TCPV6: u8 = 4;
    /// UDP segmentation offload (USO), IPv4 or IPv6.
    pub const UDP_L4: u8 = 5;
    /// Flag: the TCP super-packet has CWR set (TSO_ECN).
    pub const ECN: u8 = 0x80;
}

/// The Linux `struct virtio_net_hdr` (little-endian fields, as TUN uses on this platform).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    /// [`flags`] bits.
    pub flags: u8,
    /// One of [`gso_type`], possibly with [`gso_type::ECN`].
    pub gso_type: u8,
    /// Length of the L3 + L4 headers (a hint from the kernel; recomputed here).
    pub hdr_len: u16,
    /// Payload bytes per segment (TCP MSS, or UDP payload per datagram).
    pub gso_size: u16,
    /// Offset where checksumming starts (the L4 header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Reads the header from the first 10 bytes of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, GsoError> {
        let b: &[u8; VNET_HDR_LEN] = buf
            .get(..VNET_HDR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(GsoError::Truncated)?;
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_le_bytes([b[2], b[3]]),
            gso_size: u16::from_le_bytes([b[4], b[5]]),
            csum_start: u16::from_le_bytes([b[6], b[7]]),
            csum_offset: u16::from_le_bytes([b[8], b[9]]),
        })
    }

    /// The 10 header bytes.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// Writes the header into the first 10 bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), GsoError> {
        buf.get_mut(..VNET_HDR_LEN)
            .ok_or(GsoError::Truncated)?
            .copy_from_slice(&self.to_bytes());
        Ok(())
    }

    /// Whether this describes a super-packet to segment.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !gso_type::ECN != gso_type::NONE
    }
}

/// Why a TUN read could not be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// The buffer is shorter than the vnet header or than the offsets it declares.
    #[error("truncated")]
    Truncated,
    /// The IP or L4 header is malformed.
    #[error("bad header: {0}")]
    Header(WireError),
    /// A `gso_type` this code does not segment (UFO or an unknown value).
    #[error("unsupported gso_type {0}")]
    UnsupportedGsoType(u8),
    /// The packet's IP version or L4 protocol does not match the `gso_type`.
    #[error("packet protocol does not match gso_type")]
    WrongProtocol,
    /// `gso_size` is zero for a super-packet.
    #[error("gso_size is zero")]
    ZeroGsoSize,
    /// `hdr_len` points past the packet.
    #[error("hdr_len inconsistent with the packet")]
    BadHdrLen,
    /// `csum_start`/`csum_offset` do not point at the L4 checksum field.
    #[error("csum_start/csum_offset inconsistent with the packet")]
    BadCsumOffset,
    /// An IPv4 fragment cannot be segmented.
    #[error("IPv4 fragment")]
    Fragment,
    /// The scratch buffer cannot hold one segment.
    #[error("scratch buffer too small")]
    ScratchTooSmall,
}

impl From<WireError> for GsoError {
    fn from(e: WireError) -> Self {
        Self::Header(e)
    }
}

/// Completes the partial checksum of a non-GSO packet in place: sums from `csum_start` to
/// the end, stores the complement at `csum_start + csum_offset` (a zero result is stored as
/// `0xffff`, which TCP and UDP both accept). Does nothing without [`flags::NEEDS_CSUM`].
pub fn complete_checksum(hdr: &VirtioNetHdr, pkt: &mut [u8]) -> Result<(), GsoError> {
    if hdr.flags & flags::NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > pkt.len() {
        return Err(GsoError::BadCsumOffset);
    }
    let c = match checksum::finish(checksum::sum(0, &pkt[start..])) {
        0 => 0xffff,
        c => c,
    };
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// What [`split`] learned from the headers of a super-packet.
#[derive(Debug, Clone, Copy)]
struct Plan {
    v6: bool,
    tcp: bool,
    /// IP header length (the L4 offset).
    l3: usize,
    /// L3 + L4 header length.
    hlen: usize,
    /// End of the IP packet as declared by its length field.
    end: usize,
    /// Pseudo-header sum without the length.
    pseudo: u64,
}

/// Splits one TUN read (`hdr` + `pkt`, the IP packet after the vnet header) into the
/// packets to encrypt, calling `emit` with each in order; stops early when `emit` breaks.
/// Returns the number of packets emitted.
///
/// * `gso_type` NONE: `pkt` is emitted as is, after completing its checksum in `scratch`
///   when `NEEDS_CSUM` is set.
/// * TCPV4/TCPV6: each segment carries at most `gso_size` payload bytes, its own IPv4 total
///   length, identification (+1 per segment) and header checksum, or IPv6 payload length;
///   the TCP sequence number advances per segment, FIN and PSH stay only on the last
///   segment and CWR only on the first; the TCP checksum is computed from scratch.
/// * UDP_L4: each datagram carries at most `gso_size` payload bytes with its own UDP length
///   and checksum.
///
/// Every header is validated before the first `emit`, so an error means nothing was
/// emitted. `scratch` must hold the largest segment (headers + `gso_size`); a
/// [`MAX_PACKET`]-sized scratch always does.
pub fn split(
    hdr: &VirtioNetHdr,
    pkt: &[u8],
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<usize, GsoError> {
    if !hdr.is_gso() {
        if hdr.flags & flags::NEEDS_CSUM == 0 {
            let _ = emit(pkt);
            return Ok(1);
        }
        let out = scratch
            .get_mut(..pkt.len())
            .ok_or(GsoError::ScratchTooSmall)?;
        out.copy_from_slice(pkt);
        complete_checksum(hdr, out)?;
        let _ = emit(out);
        return Ok(1);
    }
    let plan = plan(hdr, pkt)?;
    let gso = usize::from(hdr.gso_size);
    let payload = &pkt[plan.hlen..plan.end];
    let largest = plan.hlen + gso.min(payload.len());
    if scratch.len() < largest {
        return Err(GsoError::ScratchTooSmall);
    }
    let nseg = payload.len().div_ceil(gso).max(1);
    let (ident0, seq0, flags0) = (
        u16::from_be_bytes([pkt[4], pkt[5]]),
        tcp_seq(pkt, plan),
        pkt.get(plan.l3 + 13).copied().unwrap_or(0),
    );
    for i in 0..nseg {
        let chunk = payload.get(i * gso..).unwrap_or(&[]);
        let chunk = &chunk[..chunk.len().min(gso)];
        let n = plan.hlen + chunk.len();
        let out = &mut scratch[..n];
        out[..plan.hlen].copy_from_slice(&pkt[..plan.hlen]);
        out[plan.hlen..].copy_from_slice(chunk);
        let l4_len = n - plan.l3;
        if plan.v6 {
            put16(out, 4, (l4_len) as u16);
        } else {
            put16(out, 2, n as u16);
            // Per RFC 6864 the kernel's TSO increments the ID per segment unless the
            // sender asked for a fixed ID; ours never does.
            put16(out, 4, ident0.wrapping_add(i as u16));
            put16(out, 10, 0);
            let c = checksum::checksum(&out[..plan.l3]);
            put16(out, 10, c);
        }
        let pseudo = checksum::add(plan.pseudo, u64::from(l4_len as u32));
        let l4 = &mut out[plan.l3..];
        if plan.tcp {
            let seq = seq0.wrapping_add((i * gso) as u32);
            l4[4..8].copy_from_slice(&seq.to_be_bytes());
            let mut f = flags0;
            if i + 1 < nseg {
                f &= !(tcp::FIN | tcp::PSH);
            }
            if i > 0 {
                f &= !tcp::CWR;
            }
            l4[13] = f;
            put16(l4, tcp::CHECKSUM_OFFSET, 0);
            let c = checksum::finish(checksum::sum(pseudo, l4));
            put16(l4, tcp::CHECKSUM_OFFSET, c);
        } else {
            put16(l4, 4, l4_len as u16);
            put16(l4, udp::CHECKSUM_OFFSET, 0);
            let c = match checksum::finish(checksum::sum(pseudo, l4)) {
                0 => 0xffff,
                c => c,
            };
            put16(l4, udp::CHECKSUM_OFFSET, c);
        }
        if emit(out).is_break() {
            return Ok(i + 1);
        }
    }
    Ok(nseg)
}

/// Validates a super-packet's headers against its vnet header.
fn plan(hdr: &VirtioNetHdr, pkt: &[u8]) -> Result<Plan, GsoError> {
    let ty = hdr.gso_type & !gso_type::ECN;
    let (want_v6, tcp) = match ty {
        gso_type::TCPV4 => (Some(false), true),
        gso_type::TCPV6 => (Some(true), true),
        gso_type::UDP_L4 => (None, false),
        other => return Err(GsoError::UnsupportedGsoType(other)),
    };
    if hdr.gso_size == 0 {
        return Err(GsoError::ZeroGsoSize);
    }
    if usize::from(hdr.hdr_len) > pkt.len() {
        return Err(GsoError::BadHdrLen);
    }
    let proto = if tcp { protocol::TCP } else { protocol::UDP };
    let (v6, l3, end, pseudo) = match pkt.first().map(|b| b >> 4) {
        Some(4) if want_v6 != Some(true) => {
            let ip = Ipv4Packet::new_checked(pkt)?;
            if ip.is_fragment() {
                return Err(GsoError::Fragment);
            }
            if ip.protocol() != proto {
                return Err(GsoError::WrongProtocol);
            }
            (
                false,
                ip.header_len(),
                ip.total_len(),
                ip.pseudo_header_sum(0),
            )
        }
        Some(6) if want_v6 != Some(false) => {
            let ip = Ipv6Packet::new_checked(pkt)?;
            if ip.next_header() != proto {
                return Err(GsoError::WrongProtocol);
            }
            (
                true,
                ipv6::HEADER_LEN,
                ip.total_len(),
                ip.pseudo_header_sum(0),
            )
        }
        Some(4 | 6) => return Err(GsoError::WrongProtocol),
        Some(_) => return Err(GsoError::Header(WireError::BadVersion)),
        None => return Err(GsoError::Truncated),
    };
    let l4 = &pkt[l3..end];
    let l4h = if tcp {
        TcpPacket::new_checked(l4)?.header_len()
    } else if l4.len() < udp::HEADER_LEN {
        return Err(GsoError::Header(WireError::Truncated));
    } else {
        udp::HEADER_LEN
    };
    if hdr.flags & flags::NEEDS_CSUM != 0 {
        let off = if tcp {
            tcp::CHECKSUM_OFFSET
        } else {
            udp::CHECKSUM_OFFSET
        };
        if usize::from(hdr.csum_start) != l3 || usize::from(hdr.csum_offset) != off {
            return Err(GsoError::BadCsumOffset);
        }
    }
    Ok(Plan {
        v6,
        tcp,
        l3,
        hlen: l3 + l4h,
        end,
        pseudo,
    })
}

fn tcp_seq(pkt: &[u8], plan: Plan) -> u32 {
    match pkt.get(plan.l3 + 4..plan.l3 + 8) {
        Some(&[a, b, c, d]) if plan.tcp => u32::from_be_bytes([a, b, c, d]),
        _ => 0,
    }
}

pub(crate) fn put16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Rewrites the headers of a coalesced super-packet `ip` (IP header of `l3` bytes, then the
/// L4 header of protocol `proto` with its checksum at `csum_offset`) for a TUN write with
/// `NEEDS_CSUM`: the IP length field(s) for the whole packet, a fresh IPv4 header checksum,
/// and in the L4 checksum field the folded pseudo-header sum over the whole L4 length,
/// uncomplemented (`CHECKSUM_PARTIAL`): the kernel adjusts the length in it per segment and
/// adds each segment's bytes as it segments or delivers. Callers fix any L4 length field
/// themselves (UDP's) and pass a packet whose header bytes they validated.
pub(crate) fn super_headers(ip: &mut [u8], v6: bool, l3: usize, proto: u8, csum_offset: usize) {
    let len = ip.len();
    let l4_len = len - l3;
    let pseudo = if v6 {
        put16(ip, 4, l4_len as u16);
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&ip[8..24]);
        dst.copy_from_slice(&ip[24..40]);
        checksum::pseudo_header_v6(src.into(), dst.into(), proto, l4_len as u32)
    } else {
        put16(ip, 2, len as u16);
        put16(ip, 10, 0);
        let c = checksum::checksum(&ip[..l3]);
        put16(ip, 10, c);
        let src = [ip[12], ip[13], ip[14], ip[15]];
        let dst = [ip[16], ip[17], ip[18], ip[19]];
        checksum::pseudo_header_v4(src.into(), dst.into(), proto, l4_len as u32)
    };
    put16(ip, l3 + csum_offset, checksum::fold(pseudo));
}

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

/// Why [`Coalescer::push`] did not take a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CoalesceError {
    /// Every slot is in use: write out [`Coalescer::finish`]'s buffers, [`Coalescer::clear`],
    /// and push the packet again. Nothing was dropped.
    #[error("coalescer full")]
    Full,
    /// The packet is larger than [`MAX_PACKET`].
    #[error("packet larger than 65535 bytes")]
    TooLarge,
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
    v6: bool,
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

/// A TCP segment that may start or join a head.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    v6: bool,
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
        if pkt.len() > MAX_PACKET {
            return Err(CoalesceError::TooLarge);
        }
        let Some((cand, key_ok)) = candidate(pkt, self.verify_l4) else {
            return self.new_slot(pkt, None);
        };
        if let Some(i) = self.find_open_head(pkt, cand.v6) {
            if key_ok && self.try_append(i, pkt, &cand) {
                return Ok(Pushed::Coalesced);
            }
            if let SlotKind::Head(h) = &mut self.slots[i].kind {
                h.open = false;
            }
        }
        self.new_slot(pkt, key_ok.then_some(cand))
    }

    /// Rewrites each head's headers for the TUN write (once) and yields every buffer,
    /// `VirtioNetHdr` + IP packet, in the order their first packet arrived. Pushing after
    /// `finish` starts new slots; finished heads take no more segments.
    pub fn finish(&mut self) -> impl Iterator<Item = &[u8]> + '_ {
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

    fn new_slot(&mut self, pkt: &[u8], cand: Option<Candidate>) -> Result<Pushed, CoalesceError> {
        if self.used == self.slots.len() {
            return Err(CoalesceError::Full);
        }
        let i = self.used;
        self.used += 1;
        let b = self.buf_mut(i);
        b[..VNET_HDR_LEN].fill(0);
        b[VNET_HDR_LEN..VNET_HDR_LEN + pkt.len()].copy_from_slice(pkt);
        let (kind, pushed) = match cand {
            Some(c) => (
                SlotKind::Head(Head {
                    v6: c.v6,
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
            len: VNET_HDR_LEN + pkt.len(),
            kind,
        };
        Ok(pushed)
    }

    /// The latest open head with the same IP version, addresses and ports as `pkt`.
    fn find_open_head(&self, pkt: &[u8], v6: bool) -> Option<usize> {
        let (addr, ports) = flow_key_ranges(v6, pkt)?;
        (0..self.used).rev().find(|&i| match self.slots[i].kind {
            SlotKind::Head(h) if h.open && h.v6 == v6 => {
                let b = &self.buf(i)[VNET_HDR_LEN..];
                let hp = h.l3..h.l3 + 4;
                b.get(hp) == pkt.get(ports.clone()) && b.get(addr.clone()) == pkt.get(addr.clone())
            }
            _ => false,
        })
    }

    /// Appends `pkt`'s payload to head `i` when every GRO condition holds.
    fn try_append(&mut self, i: usize, pkt: &[u8], c: &Candidate) -> bool {
        let slot = self.slots[i];
        let SlotKind::Head(mut h) = slot.kind else {
            return false;
        };
        let head = &self.buf(i)[VNET_HDR_LEN..slot.len];
        let ip_ok = if h.v6 {
            // Version, traffic class, flow label; hop limit.
            head.get(..4) == pkt.get(..4) && head.get(7) == pkt.get(7)
        } else {
            // TOS, TTL, DF (IHL is 5 for every candidate).
            head.get(1) == pkt.get(1)
                && head.get(8) == pkt.get(8)
                && head.get(6).map(|b| b & 0x40) == pkt.get(6).map(|b| b & 0x40)
        };
        let (ht, pt) = (h.l3, c.l3);
        let tcp_ok = h.l4 == c.l4
            // ACK number, data offset, window; then the options.
            && head.get(ht + 8..ht + 13) == pkt.get(pt + 8..pt + 13)
            && head.get(ht + 14..ht + 16) == pkt.get(pt + 14..pt + 16)
            && head.get(ht + tcp::HEADER_LEN..ht + h.l4) == pkt.get(pt + tcp::HEADER_LEN..pt + c.l4);
        if !(ip_ok
            && tcp_ok
            && c.seq == h.next_seq
            && c.payload_len <= h.gso_size
            && slot.len - VNET_HDR_LEN + c.payload_len <= MAX_PACKET)
        {
            return false;
        }
        let Some(payload) = pkt.get(c.l3 + c.l4..c.l3 + c.l4 + c.payload_len) else {
            return false;
        };
        let at = slot.len;
        self.buf_mut(i)[at..at + payload.len()].copy_from_slice(payload);
        h.segs += 1;
        h.next_seq = h.next_seq.wrapping_add(c.payload_len as u32);
        if c.payload_len < h.gso_size || c.psh {
            h.open = false;
        }
        if c.psh {
            // The super-packet carries PSH like the last segment did.
            let b = self.buf_mut(i);
            b[VNET_HDR_LEN + h.l3 + 13] |= tcp::PSH;
        }
        self.slots[i] = Slot {
            len: at + payload.len(),
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
        let b = &mut self.buf_mut(i)[..slot.len];
        let hdr = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: if h.v6 {
                gso_type::TCPV6
            } else {
                gso_type::TCPV4
            },
            hdr_len: (h.l3 + h.l4) as u16,
            gso_size: h.gso_size as u16,
            csum_start: h.l3 as u16,
            csum_offset: tcp::CHECKSUM_OFFSET as u16,
        };
        b[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
        super_headers(
            &mut b[VNET_HDR_LEN..],
            h.v6,
            h.l3,
            protocol::TCP,
            tcp::CHECKSUM_OFFSET,
        );
    }
}

/// Classifies a packet: `None` for anything that is not a TCP/IP packet (passthrough);
/// otherwise the candidate and whether it may start or join a head. `verify_l4` checks
/// the TCP checksum too.
fn candidate(pkt: &[u8], verify_l4: bool) -> Option<(Candidate, bool)> {
    let (v6, l3, l4_bytes, pseudo, ip_ok) = match pkt.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(pkt).ok()?;
            if ip.protocol() != protocol::TCP || ip.is_fragment() {
                return None;
            }
            let ok = ip.header_len() == ipv4::HEADER_LEN
                && ip.total_len() == pkt.len()
                && ip.verify_checksum();
            let l4 = &pkt[ip.header_len()..ip.total_len()];
            (
                false,
                ip.header_len(),
                l4,
                ip.pseudo_header_sum(l4.len() as u32),
                ok,
            )
        }
        6 => {
            let ip = Ipv6Packet::new_checked(pkt).ok()?;
            if ip.next_header() != protocol::TCP {
                return None;
            }
            let l4 = &pkt[ipv6::HEADER_LEN..ip.total_len()];
            let ok = ip.total_len() == pkt.len();
            (
                true,
                ipv6::HEADER_LEN,
                l4,
                ip.pseudo_header_sum(l4.len() as u32),
                ok,
            )
        }
        _ => return None,
    };
    let t = TcpPacket::new_checked(l4_bytes).ok()?;
    let f = t.flags();
    let psh = f & tcp::PSH != 0;
    let ok = ip_ok
        && f & !(tcp::ACK | tcp::PSH) == 0
        && f & tcp::ACK != 0
        && !t.payload().is_empty()
        && (!verify_l4 || t.verify_checksum(pseudo));
    Some((
        Candidate {
            v6,
            l3,
            l4: t.header_len(),
            seq: t.seq(),
            payload_len: t.payload().len(),
            psh,
        },
        ok,
    ))
}

/// Byte ranges of the addresses and of the ports (L4 start..+4) in a TCP/IP packet.
fn flow_key_ranges(
    v6: bool,
    pkt: &[u8],
) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    if v6 {
        Some((8..40, 40..44))
    } else {
        let l3 = usize::from(pkt.first()? & 0x0f) * 4;
        Some((12..20, l3..l3 + 4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC4: [u8; 4] = [10, 7, 0, 1];
    const DST4: [u8; 4] = [10, 7, 0, 2];
    const SRC6: [u8; 16] = [0xfd, 0x5a, 0x1f, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0xfd, 0x5a, 0x1f, 0, 9, 8, 7, 6, 5, 4, 0, 0, 0, 0, 0, 1];
    /// NOP, NOP, timestamps (TSval 0x01020304, TSecr 0x0a0b0c0d), as Linux sends on data.
    const TS_OPTS: [u8; 12] = [1, 1, 8, 10, 1, 2, 3, 4, 10, 11, 12, 13];

    /// RFC 1071 the slow way, over a list of byte slices concatenated (independent of
    /// `checksum`): returns the folded, uncomplemented sum.
    fn ref_sum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut s: u32 = 0;
        for pair in bytes.chunks(2) {
            let w = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            s += u32::from(w);
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn ref_pseudo(v6: bool, pkt: &[u8], proto: u8, l4_len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        if v6 {
            p.extend_from_slice(&pkt[8..40]);
            p.extend_from_slice(&(l4_len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        } else {
            p.extend_from_slice(&pkt[12..20]);
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        }
        p
    }

    /// Checks a segment's IP header checksum (IPv4) and L4 checksum with `ref_sum`.
    fn assert_segment_checksums(seg: &[u8]) {
        let v6 = seg[0] >> 4 == 6;
        let l3 = if v6 { 40 } else { usize::from(seg[0] & 15) * 4 };
        let proto = if v6 { seg[6] } else { seg[9] };
        if !v6 {
            assert_eq!(ref_sum(&[&seg[..l3]]), 0xffff, "IPv4 header checksum");
            assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), seg.len());
        } else {
            assert_eq!(
                usize::from(u16::from_be_bytes([seg[4], seg[5]])),
                seg.len() - 40
            );
        }
        let l4 = &seg[l3..];
        let pseudo = ref_pseudo(v6, seg, proto, l4.len());
        assert_eq!(ref_sum(&[&pseudo, l4]), 0xffff, "L4 checksum");
    }

    fn payload_bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A TSO super-packet the way the kernel hands it to a TUN reader: full lengths in the
    /// IP header, the TCP checksum field holding the folded pseudo-header sum, NEEDS_CSUM.
    fn tcp_super(v6: bool, payload: &[u8], mss: u16, tcp_flags: u8) -> (VirtioNetHdr, Vec<u8>) {
        let l3 = if v6 { 40 } else { 20 };
        let l4h = 20 + TS_OPTS.len();
        let total = l3 + l4h + payload.len();
        let mut p = vec![0u8; total];
        if v6 {
            Ipv6Repr {
                src: SRC6.into(),
                dst: DST6.into(),
                next_header: protocol::TCP,
                payload_len: total - 40,
                hop_limit: 64,
                traffic_class: 0,
                flow_label: 0xbeef,
            }
            .emit(&mut p)
            .unwrap();
        } else {
            Ipv4Repr {
                src: SRC4.into(),
                dst: DST4.into(),
                protocol: protocol::TCP,
                payload_len: total - 20,
                ttl: 64,
                tos: 0,
                ident: 0xfff0,
                dont_frag: true,
            }
            .emit(&mut p)
            .unwrap();
        }
        let t = &mut p[l3..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&0xffff_f000u32.to_be_bytes());
        t[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        t[12] = ((l4h / 4) as u8) << 4;
        t[13] = tcp_flags;
        t[14..16].copy_from_slice(&502u16.to_be_bytes());
        t[20..l4h].copy_from_slice(&TS_OPTS);
        t[l4h..].copy_from_slice(payload);
        let l4_len = total - l3;
        let pseudo = ref_pseudo(v6, &p, protocol::TCP, l4_len);
        let partial = ref_sum(&[&pseudo]);
        p[l3 + 16..l3 + 18].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: if v6 { gso_type::TCPV6 } else { gso_type::TCPV4 },
            hdr_len: (l3 + l4h) as u16,
            gso_size: mss,
            csum_start: l3 as u16,
            csum_offset: 16,
        };
        (hdr, p)
    }

    fn udp_super(v6: bool, payload: &[u8], seg: u16) -> (VirtioNetHdr, Vec<u8>) {
        let l3 = if v6 { 40 } else { 20 };
        let total = l3 + 8 + payload.len();
        let mut p = vec![0u8; total];
        if v6 {
            Ipv6Repr {
                src: SRC6.into(),
                dst: DST6.into(),
                next_header: protocol::UDP,
                payload_len: total - 40,
                hop_limit: 64,
                traffic_class: 0,
                flow_label: 0,
            }
            .emit(&mut p)
            .unwrap();
        } else {
            Ipv4Repr {
                src: SRC4.into(),
                dst: DST4.into(),
                protocol: protocol::UDP,
                payload_len: total - 20,
                ttl: 64,
                tos: 0,
                ident: 7,
                dont_frag: false,
            }
            .emit(&mut p)
            .unwrap();
        }
        let u = &mut p[l3..];
        u[0..2].copy_from_slice(&5000u16.to_be_bytes());
        u[2..4].copy_from_slice(&5001u16.to_be_bytes());
        u[4..6].copy_from_slice(&((total - l3) as u16).to_be_bytes());
        u[8..].copy_from_slice(payload);
        let pseudo = ref_pseudo(v6, &p, protocol::UDP, total - l3);
        let partial = ref_sum(&[&pseudo]);
        p[l3 + 6..l3 + 8].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: gso_type::UDP_L4,
            hdr_len: (l3 + 8) as u16,
            gso_size: seg,
            csum_start: l3 as u16,
            csum_offset: 6,
        };
        (hdr, p)
    }

    fn split_all(hdr: &VirtioNetHdr, pkt: &[u8]) -> Result<Vec<Vec<u8>>, GsoError> {
        let mut scratch = vec![0u8; MAX_PACKET];
        let mut out = Vec::new();
        let n = split(hdr, pkt, &mut scratch, |s| {
            out.push(s.to_vec());
            ControlFlow::Continue(())
        })?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    fn coalesce_all(c: &mut Coalescer, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        for p in pkts {
            c.push(p).unwrap();
        }
        let mut out = Vec::new();
        c.drain(|b| out.push(b.to_vec()));
        out
    }

    use crate::core::wire::{Ipv4Repr, Ipv6Repr};

    #[test]
    fn vnet_hdr_round_trip() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x5a,
            gso_size: 1368,
            csum_start: 40,
            csum_offset: 16,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 4, 0x5a, 0, 0x58, 0x05, 40, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::parse(&b).unwrap(), h);
        assert_eq!(
            VirtioNetHdr::parse(&b[..9]).unwrap_err(),
            GsoError::Truncated
        );
        let mut out = [0u8; 12];
        h.emit(&mut out).unwrap();
        assert_eq!(out[..10], b);
        assert!(h.is_gso());
        assert!(!VirtioNetHdr::default().is_gso());
    }

    fn check_tcp_split(v6: bool) {
        let payload = payload_bytes(44 * 1368 + 500, 3);
        let (hdr, sup) = tcp_super(
            v6,
            &payload,
            1368,
            tcp::ACK | tcp::PSH | tcp::FIN | tcp::CWR,
        );
        let segs = split_all(&hdr, &sup).unwrap();
        assert_eq!(segs.len(), 45);
        let l3 = if v6 { 40 } else { 20 };
        let hl = l3 + 32;
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_segment_checksums(s);
            let want = if i < 44 { 1368 } else { 500 };
            assert_eq!(s.len(), hl + want);
            let t = &s[l3..];
            let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
            assert_eq!(seq, 0xffff_f000u32.wrapping_add(i as u32 * 1368));
            let f = t[13];
            assert_eq!(
                f & (tcp::PSH | tcp::FIN) != 0,
                i == 44,
                "segment {i} flags {f:#x}"
            );
            assert_eq!(f & tcp::CWR != 0, i == 0);
            assert_eq!(t[20..32], TS_OPTS);
            if !v6 {
                assert_eq!(
                    u16::from_be_bytes([s[4], s[5]]),
                    0xfff0u16.wrapping_add(i as u16)
                );
            }
            joined.extend_from_slice(&s[hl..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn splits_tcp_v4_super_packet() {
        check_tcp_split(false);
    }

    #[test]
    fn splits_tcp_v6_super_packet() {
        check_tcp_split(true);
    }

    #[test]
    fn splits_udp_super_packets() {
        for v6 in [false, true] {
            let payload = payload_bytes(10 * 1392 + 1, 9);
            let (hdr, sup) = udp_super(v6, &payload, 1392);
            let segs = split_all(&hdr, &sup).unwrap();
            assert_eq!(segs.len(), 11);
            let l3 = if v6 { 40 } else { 20 };
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert_segment_checksums(s);
                let u = &s[l3..];
                assert_eq!(usize::from(u16::from_be_bytes([u[4], u[5]])), u.len());
                assert_eq!(u.len(), 8 + if i < 10 { 1392 } else { 1 });
                if !v6 {
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), 7 + i as u16);
                }
                joined.extend_from_slice(&u[8..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn completes_checksum_of_single_packet() {
        let payload = payload_bytes(300, 1);
        let (mut hdr, sup) = tcp_super(false, &payload, 1368, tcp::ACK);
        hdr.gso_type = gso_type::NONE;
        let segs = split_all(&hdr, &sup).unwrap();
        assert_eq!(segs.len(), 1);
        assert_segment_checksums(&segs[0]);
        assert_eq!(segs[0][..36], sup[..36]);
        // Without NEEDS_CSUM the packet goes through untouched.
        hdr.flags = 0;
        assert_eq!(split_all(&hdr, &sup).unwrap(), vec![sup.clone()]);
        // UDP whose checksum computes to zero is sent as 0xffff.
        let mut p = sup.clone();
        complete_checksum(
            &VirtioNetHdr {
                flags: flags::NEEDS_CSUM,
                csum_start: 20,
                csum_offset: 16,
                ..Default::default()
            },
            &mut p,
        )
        .unwrap();
        assert_eq!(p, segs[0]);
        let mut zeros = [0u8; 8];
        let h = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            csum_start: 0,
            csum_offset: 6,
            ..Default::default()
        };
        zeros[0] = 0xff;
        zeros[1] = 0xff;
        complete_checksum(&h, &mut zeros).unwrap();
        assert_eq!(zeros[6..8], [0xff, 0xff]);
        let mut short = [0u8; 7];
        assert_eq!(
            complete_checksum(&h, &mut short).unwrap_err(),
            GsoError::BadCsumOffset
        );
    }

    #[test]
    fn rejects_inconsistent_super_packets() {
        let payload = payload_bytes(5000, 2);
        let (hdr, sup) = tcp_super(false, &payload, 1368, tcp::ACK);
        let (hdr6, sup6) = tcp_super(true, &payload, 1368, tcp::ACK);
        let (uhdr, usup) = udp_super(false, &payload, 1000);
        let mut scratch = vec![0u8; MAX_PACKET];
        let run = |h: &VirtioNetHdr, p: &[u8], scratch: &mut [u8]| {
            let mut n = 0;
            let r = split(h, p, scratch, |_| {
                n += 1;
                ControlFlow::Continue(())
            });
            assert!(r.is_ok() || n == 0);
            r
        };
        let mut h = hdr;
        h.gso_size = 0;
        assert_eq!(run(&h, &sup, &mut scratch), Err(GsoError::ZeroGsoSize));
        let mut h = hdr;
        h.hdr_len = sup.len() as u16 + 1;
        assert_eq!(run(&h, &sup, &mut scratch), Err(GsoError::BadHdrLen));
        assert_eq!(run(&hdr, &sup6, &mut scratch), Err(GsoError::WrongProtocol));
        assert_eq!(run(&hdr6, &sup, &mut scratch), Err(GsoError::WrongProtocol));
        let mut h = uhdr;
        h.gso_type = gso_type::TCPV4;
        h.csum_offset = 16;
        assert_eq!(run(&h, &usup, &mut scratch), Err(GsoError::WrongProtocol));
        let mut h = hdr;
        h.gso_type = gso_type::UDP;
        assert_eq!(
            run(&h, &sup, &mut scratch),
            Err(GsoError::UnsupportedGsoType(3))
        );
        h.gso_type = 9;
        assert_eq!(
            run(&h, &sup, &mut scratch),
            Err(GsoError::UnsupportedGsoType(9))
        );
        let mut h = hdr;
        h.csum_offset = 6;
        assert_eq!(run(&h, &sup, &mut scratch), Err(GsoError::BadCsumOffset));
        let mut h = hdr;
        h.csum_start = 0;
        assert_eq!(run(&h, &sup, &mut scratch), Err(GsoError::BadCsumOffset));
        assert_eq!(
            run(&hdr, &sup[..sup.len() - 1], &mut scratch),
            Err(GsoError::Header(WireError::Truncated))
        );
        assert_eq!(
            run(&hdr, &sup[..30], &mut scratch),
            Err(GsoError::BadHdrLen)
        );
        let mut h = hdr;
        h.hdr_len = 0;
        assert_eq!(
            run(&h, &sup[..30], &mut scratch),
            Err(GsoError::Header(WireError::Truncated))
        );
        assert_eq!(run(&h, &[], &mut scratch), Err(GsoError::Truncated));
        let mut frag = sup.clone();
        frag[6] |= 0x20;
        assert_eq!(run(&hdr, &frag, &mut scratch), Err(GsoError::Fragment));
        let mut bad_off = sup.clone();
        bad_off[32] = 0x40;
        assert_eq!(
            run(&hdr, &bad_off, &mut scratch),
            Err(GsoError::Header(WireError::BadHeaderLen))
        );
        assert_eq!(
            run(&hdr, &sup, &mut scratch[..1000]),
            Err(GsoError::ScratchTooSmall)
        );
        assert_eq!(run(&hdr, &sup, &mut scratch[..52 + 1368]), Ok(4));
        // The callback may stop the split early.
        let mut seen = 0;
        let n = split(&hdr, &sup, &mut scratch, |_| {
            seen += 1;
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(n, Ok(2));
    }

    #[test]
    fn coalesce_rebuilds_the_super_packet() {
        for v6 in [false, true] {
            let payload = payload_bytes(44 * 1368 + 100, 5);
            let (hdr, sup) = tcp_super(v6, &payload, 1368, tcp::ACK | tcp::PSH);
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
        let (hdr, sup) = tcp_super(false, &payload, 1000, tcp::ACK);
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
        let (h1, a) = tcp_super(false, &payload_bytes(3000, 1), 1000, tcp::ACK);
        let (_, mut b) = tcp_super(false, &payload_bytes(3000, 2), 1000, tcp::ACK);
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
        let (hdr, sup) = tcp_super(false, &payload_bytes(2000, 4), 1000, tcp::ACK);
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
    }

    #[test]
    fn authenticated_coalescer_skips_only_the_tcp_checksum_check() {
        let (hdr, sup) = tcp_super(false, &payload_bytes(5000, 6), 1000, tcp::ACK);
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
        let (hdr, sup) = tcp_super(false, &payload_bytes(5000, 6), 1000, tcp::ACK);
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
        let (_, udp) = udp_super(false, &payload_bytes(100, 1), 100);
        assert_eq!(c.push(&udp).unwrap(), Pushed::Passthrough);
        let (_, syn) = tcp_super(false, &[], 1000, tcp::SYN);
        assert_eq!(c.push(&syn).unwrap(), Pushed::Passthrough);
        assert_eq!(c.push(&[0x00, 1, 2]).unwrap(), Pushed::Passthrough);
        assert_eq!(c.push(&[]).unwrap(), Pushed::Passthrough);
        let (_, mut ack) = tcp_super(false, &[], 1000, tcp::ACK);
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
        let (h2, sup2) = tcp_super(false, &payload_bytes(2500, 6), 1000, tcp::ACK);
        let t = split_all(&h2, &sup2).unwrap(); // 1000, 1000, 500
        let (_, sup3) = tcp_super(false, &payload_bytes(1000, 6), 1000, tcp::ACK);
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
        let (h3, sup4) = tcp_super(false, &payload_bytes(3000, 6), 1000, tcp::ACK | tcp::PSH);
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
        let (_, udp) = udp_super(false, &payload_bytes(10, 1), 100);
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
        let (hdr, sup) = tcp_super(false, &payload_bytes(3000, 1), 1000, tcp::ACK);
        let s = split_all(&hdr, &sup).unwrap();
        c.push(&s[0]).unwrap();
        assert_eq!(c.push(&s[1]).unwrap(), Pushed::Coalesced);
        assert_eq!(c.push(&s[2]).unwrap(), Pushed::Coalesced);
    }

    #[test]
    fn head_stops_at_64k() {
        let (hdr, sup) = tcp_super(true, &payload_bytes(7 * 9000, 1), 9000, tcp::ACK);
        let mut pkts = split_all(&hdr, &sup).unwrap();
        assert_eq!(pkts.len(), 7);
        // An eighth in-order segment would take the packet past 65535 bytes.
        let mut eighth = pkts[6].clone();
        let seq = 0xffff_f000u32.wrapping_add(7 * 9000);
        eighth[44..48].copy_from_slice(&seq.to_be_bytes());
        let pseudo = Ipv6Packet::new_checked(&eighth[..])
            .unwrap()
            .pseudo_header_sum((eighth.len() - 40) as u32);
        TcpPacket::new_checked(&mut eighth[40..])
            .unwrap()
            .fill_checksum(pseudo);
        pkts.push(eighth.clone());
        let mut c = Coalescer::new(4);
        let out = coalesce_all(&mut c, &pkts);
        assert_eq!(out.len(), 2);
        assert_eq!(&out[0][VNET_HDR_LEN..], &sup[..]);
        assert_eq!(&out[1][VNET_HDR_LEN..], &eighth[..]);
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
            let (hdr, sup) = tcp_super(v6, &payload, mss, flags);
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

        #[test]
        fn uso_split_preserves_payload(v6 in any::<bool>(), seg in 1u16..=2000, len in 0usize..=30_000) {
            let payload = payload_bytes(len, 1);
            let (hdr, sup) = udp_super(v6, &payload, seg);
            let segs = split_all(&hdr, &sup).unwrap();
            prop_assert_eq!(segs.len(), len.div_ceil(usize::from(seg)).max(1));
            let hl = if v6 { 48 } else { 28 };
            let mut joined = Vec::new();
            for s in &segs {
                assert_segment_checksums(s);
                joined.extend_from_slice(&s[hl..]);
            }
            prop_assert_eq!(joined, payload);
        }
    }
}
