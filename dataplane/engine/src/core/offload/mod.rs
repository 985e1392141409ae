//! TUN segmentation offload: the `virtio_net_hdr` that prefixes every TUN read and write
//! when the device has `IFF_VNET_HDR`, TSO/USO [`split`] of super-packets read from the TUN,
//! and the GRO coalescers that rebuild super-packets from decrypted segments ([`Coalescer`]
//! for TCP, [`UdpCoalescer`] for UDP).
//!
//! One concept per file: [`vnet`] (the header and the TUN buffer sizes), [`split`] (TSO/USO
//! segmentation on the send side), [`tcp_gro`] and [`udp_gro`] (coalescing on the receive
//! side); `testkit` (feature `testkit`) builds super-packets for tests and benches. This
//! file holds what the others share: the error types, the header rewrite of a coalesced
//! super-packet, and the flow and IP fields both coalescers match segments on.
//!
//! IP, TCP and UDP header fields are read and written through the [`crate::core::wire`]
//! views: each packet is validated once (`new_checked`, or `new_resized` for one built in
//! place behind a copied, validated header), then accessed through accessors and setters
//! that cannot panic.
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

mod landing;
pub mod split;
pub mod tcp_gro;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
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
    /// [`Coalescer::commit`] without room handed out by [`Coalescer::land`], or for more
    /// bytes than it had.
    #[error("no landing for the packet")]
    NoLanding,
}
