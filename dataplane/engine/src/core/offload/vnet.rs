//! The Linux `struct virtio_net_hdr` that prefixes every TUN read and write when the device
//! has `IFF_VNET_HDR`, its `flags` and `gso_type` values, and the sizes of the TUN buffers
//! it frames.
//!
//! Invariant: [`VirtioNetHdr::parse`] and [`VirtioNetHdr::emit`] touch only the first
//! [`VNET_HDR_LEN`] bytes and fail rather than panic on a shorter buffer; the header's
//! fields are taken as they are (they are checked against the packet by the code that
//! acts on them, e.g. [`super::split()`]).

use super::GsoError;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
