//! TUN segmentation offload: the `virtio_net_hdr` that prefixes every TUN read and write
//! when the device has `IFF_VNET_HDR`, TSO/USO [`split`] of super-packets read from the TUN,
//! and the GRO coalescers that rebuild super-packets from decrypted segments ([`Coalescer`]
//! for TCP, [`UdpCoalescer`] for UDP).
//!
//! One concept per file: [`vnet`] (the header and the TUN buffer sizes), [`split`] (TSO/USO
//! segmentation on the send side), [`tcp_gro`] and [`udp_gro`] (coalescing on the receive
//! side). This file holds what they share: the error types and the header rewrite of a
//! coalesced super-packet.
//!
//! Send side: a TUN read is `VirtioNetHdr` + one IP packet. With TSO/USO on, that packet
//! may be a super-packet of up to 64 KiB whose TCP/UDP checksum field holds only the
//! pseudo-header sum (`NEEDS_CSUM`, the kernel's `CHECKSUM_PARTIAL`). [`split()`] builds each
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

pub mod split;
pub mod tcp_gro;
pub mod udp_gro;
pub mod vnet;

pub use split::{complete_checksum, split};
pub use tcp_gro::{Coalescer, Pushed};
pub use udp_gro::{UdpCoalescer, UdpPush};
pub use vnet::{flags, gso_type, VirtioNetHdr, BUF_LEN, MAX_PACKET, VNET_HDR_LEN};

use std::net::IpAddr;

use super::wire::{checksum, ipv6, Ipv4Packet, Ipv6Packet, WireError};

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

/// Rewrites the IP header of a coalesced super-packet `ip` for a TUN write with
/// `NEEDS_CSUM`: the IP length field for the whole buffer and, for IPv4, a fresh header
/// checksum. Returns the L4 bytes and the folded pseudo-header sum over their length,
/// uncomplemented (`CHECKSUM_PARTIAL`), for the caller to store in the L4 checksum field
/// (after fixing any L4 length field, UDP's): the kernel adjusts the length in it per
/// segment and adds each segment's bytes as it segments or delivers.
///
/// `ip` is a head whose first packet the coalescer validated, grown only by payload, so this
/// does not fail in practice; an error leaves the L4 header untouched.
pub(crate) fn super_headers(ip: &mut [u8], v6: bool) -> Result<(&mut [u8], u16), WireError> {
    let (l3, pseudo) = if v6 {
        let p = Ipv6Packet::new_resized(&mut *ip)?;
        (
            ipv6::HEADER_LEN,
            p.pseudo_header_sum(p.payload_len() as u32),
        )
    } else {
        let mut p = Ipv4Packet::new_resized(&mut *ip)?;
        p.fill_checksum();
        let l4_len = p.total_len() - p.header_len();
        (p.header_len(), p.pseudo_header_sum(l4_len as u32))
    };
    Ok((&mut ip[l3..], checksum::fold(pseudo)))
}

/// The addresses and ports of a TCP or UDP packet (so also its IP version): segments join
/// only a head of their own flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flow {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
}

impl Flow {
    /// The placeholder of an unused slot.
    pub(crate) const UNSPECIFIED: Self = Self {
        src: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        dst: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        src_port: 0,
        dst_port: 0,
    };

    /// Whether the flow is over IPv6.
    pub(crate) fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }
}

/// The IP header fields every segment of a head must share with its first one: IPv4 TOS,
/// TTL and DF; IPv6 traffic class, flow label and hop limit (as the kernel's GRO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IpFields {
    /// IPv4.
    V4 { tos: u8, ttl: u8, dont_frag: bool },
    /// IPv6.
    V6 {
        traffic_class: u8,
        flow_label: u32,
        hop_limit: u8,
    },
}

impl IpFields {
    /// The placeholder of an unused slot.
    pub(crate) const UNSPECIFIED: Self = Self::V4 {
        tos: 0,
        ttl: 0,
        dont_frag: false,
    };

    pub(crate) fn v4<T: AsRef<[u8]>>(ip: &Ipv4Packet<T>) -> Self {
        Self::V4 {
            tos: ip.tos(),
            ttl: ip.ttl(),
            dont_frag: ip.dont_frag(),
        }
    }

    pub(crate) fn v6<T: AsRef<[u8]>>(ip: &Ipv6Packet<T>) -> Self {
        Self::V6 {
            traffic_class: ip.traffic_class(),
            flow_label: ip.flow_label(),
            hop_limit: ip.hop_limit(),
        }
    }
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

/// Test packets and reference checksums shared by the unit tests of this module's files.
#[cfg(test)]
mod tests_common {
    use super::*;
    use crate::core::wire::protocol;
    use std::ops::ControlFlow;

    pub(super) const SRC4: [u8; 4] = [10, 7, 0, 1];
    pub(super) const DST4: [u8; 4] = [10, 7, 0, 2];
    pub(super) const SRC6: [u8; 16] = [0xfd, 0x5a, 0x1f, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 1];
    pub(super) const DST6: [u8; 16] = [0xfd, 0x5a, 0x1f, 0, 9, 8, 7, 6, 5, 4, 0, 0, 0, 0, 0, 1];
    /// NOP, NOP, timestamps (TSval 0x01020304, TSecr 0x0a0b0c0d), as Linux sends on data.
    pub(super) const TS_OPTS: [u8; 12] = [1, 1, 8, 10, 1, 2, 3, 4, 10, 11, 12, 13];

    /// RFC 1071 the slow way, over a list of byte slices concatenated (independent of
    /// `checksum`): returns the folded, uncomplemented sum.
    pub(super) fn ref_sum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut s: u32 = 0;
        for pair in bytes.chunks(2) {
            let w = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            s += u32::from(w);
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    pub(super) fn ref_pseudo(v6: bool, pkt: &[u8], proto: u8, l4_len: usize) -> Vec<u8> {
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
    pub(super) fn assert_segment_checksums(seg: &[u8]) {
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

    pub(super) fn payload_bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A TSO super-packet the way the kernel hands it to a TUN reader: full lengths in the
    /// IP header, the TCP checksum field holding the folded pseudo-header sum, NEEDS_CSUM.
    pub(super) fn tcp_super(
        v6: bool,
        payload: &[u8],
        mss: u16,
        tcp_flags: u8,
    ) -> (VirtioNetHdr, Vec<u8>) {
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

    pub(super) fn udp_super(v6: bool, payload: &[u8], seg: u16) -> (VirtioNetHdr, Vec<u8>) {
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

    pub(super) fn split_all(hdr: &VirtioNetHdr, pkt: &[u8]) -> Result<Vec<Vec<u8>>, GsoError> {
        let mut scratch = vec![0u8; MAX_PACKET];
        let mut out = Vec::new();
        let n = split(hdr, pkt, &mut scratch, |s| {
            out.push(s.to_vec());
            ControlFlow::Continue(())
        })?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    pub(super) fn coalesce_all(c: &mut Coalescer, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        for p in pkts {
            c.push(p).unwrap();
        }
        let mut out = Vec::new();
        c.drain(|b| out.push(b.to_vec()));
        out
    }

    use crate::core::wire::{Ipv4Repr, Ipv6Repr};
}
