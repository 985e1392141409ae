//! Checked views over packet bytes: IPv4, IPv6, TCP, UDP and the four WireGuard messages,
//! plus the Internet checksum.
//!
//! Each view follows one rule (smoltcp's `src/wire/` model): `new_checked` validates the
//! lengths once and every accessor after it indexes only inside what was validated, so no
//! accessor can panic on any input. Views borrow or own any `T: AsRef<[u8]>`; setters exist
//! where `T: AsMut<[u8]>` and keep the invariant. Nothing here allocates. Errors are the
//! small `Copy` enum [`WireError`], cheap to count per reason on the hot path.
//!
//! The engine uses [`peek_dst`] to route a TUN read, [`peek_src`] to check the inner source
//! after decryption, [`wireguard::peek_receiver_index`] to demultiplex a datagram, and
//! [`IpPacket`] when it needs more than the addresses.

pub mod checksum;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;
pub mod wireguard;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use ipv4::{Ipv4Packet, Ipv4Repr};
pub use ipv6::{Ipv6Packet, Ipv6Repr};
pub use tcp::TcpPacket;
pub use udp::UdpPacket;
pub use wireguard::{MessageType, WgMessage};

/// IP protocol / IPv6 next-header numbers the data plane looks at.
pub mod protocol {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Why bytes were rejected by a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the header or a length field says.
    #[error("truncated")]
    Truncated,
    /// The IP version nibble is neither 4 nor 6 (or not the one expected).
    #[error("bad IP version")]
    BadVersion,
    /// A header-length field (IHL, TCP data offset) is too small or past the buffer.
    #[error("bad header length")]
    BadHeaderLen,
    /// A length field is inconsistent (shorter than its own header, or a message of the
    /// wrong size for its type).
    #[error("bad length")]
    BadLength,
    /// A checksum does not verify.
    #[error("bad checksum")]
    BadChecksum,
    /// The protocol is not the one this operation handles.
    #[error("unexpected protocol")]
    BadProtocol,
    /// The WireGuard message type is not 1–4.
    #[error("unknown WireGuard message type")]
    BadMessageType,
    /// The WireGuard reserved bytes are not zero.
    #[error("non-zero reserved bytes")]
    BadReserved,
}

/// A checked IPv4 or IPv6 packet, chosen by the version nibble.
#[derive(Debug, Clone, Copy)]
pub enum IpPacket<T> {
    /// An IPv4 packet.
    V4(Ipv4Packet<T>),
    /// An IPv6 packet.
    V6(Ipv6Packet<T>),
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// Dispatches on the version nibble and validates the header of that version.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        match buf.as_ref().first().map(|b| b >> 4) {
            Some(4) => Ipv4Packet::new_checked(buf).map(Self::V4),
            Some(6) => Ipv6Packet::new_checked(buf).map(Self::V6),
            Some(_) => Err(WireError::BadVersion),
            None => Err(WireError::Truncated),
        }
    }

    /// Source address.
    pub fn src(&self) -> IpAddr {
        match self {
            Self::V4(p) => IpAddr::V4(p.src()),
            Self::V6(p) => IpAddr::V6(p.src()),
        }
    }

    /// Destination address.
    pub fn dst(&self) -> IpAddr {
        match self {
            Self::V4(p) => IpAddr::V4(p.dst()),
            Self::V6(p) => IpAddr::V6(p.dst()),
        }
    }

    /// IPv4 protocol or IPv6 next header.
    pub fn protocol(&self) -> u8 {
        match self {
            Self::V4(p) => p.protocol(),
            Self::V6(p) => p.next_header(),
        }
    }

    /// Header length (IPv4 with options; 40 for IPv6).
    pub fn header_len(&self) -> usize {
        match self {
            Self::V4(p) => p.header_len(),
            Self::V6(_) => ipv6::HEADER_LEN,
        }
    }

    /// Total length as declared by the header (at most the buffer length).
    pub fn total_len(&self) -> usize {
        match self {
            Self::V4(p) => p.total_len(),
            Self::V6(p) => p.total_len(),
        }
    }

    /// The payload after the (fixed, for IPv6) header.
    pub fn payload(&self) -> &[u8] {
        match self {
            Self::V4(p) => p.payload(),
            Self::V6(p) => p.payload(),
        }
    }

    /// The packet as declared by its length field (trailing buffer bytes excluded).
    pub fn packet(&self) -> &[u8] {
        match self {
            Self::V4(p) => p.packet(),
            Self::V6(p) => p.packet(),
        }
    }

    /// The TCP/UDP pseudo-header partial sum for an L4 length of `l4_len`.
    pub fn pseudo_header_sum(&self, l4_len: u32) -> u64 {
        match self {
            Self::V4(p) => p.pseudo_header_sum(l4_len),
            Self::V6(p) => p.pseudo_header_sum(l4_len),
        }
    }
}

/// The destination address of an IP packet, reading only the version nibble and the address
/// bytes: the routing fast path. `None` when the buffer is too short for the fixed header of
/// its version or the version is neither 4 nor 6. Lengths are not validated: use
/// [`IpPacket::new_checked`] where the rest of the header matters.
#[inline]
pub fn peek_dst(pkt: &[u8]) -> Option<IpAddr> {
    peek_addr(pkt, 16, 24)
}

/// The source address of an IP packet; same rules as [`peek_dst`].
#[inline]
pub fn peek_src(pkt: &[u8]) -> Option<IpAddr> {
    peek_addr(pkt, 12, 8)
}

#[inline]
fn peek_addr(pkt: &[u8], v4_at: usize, v6_at: usize) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= ipv4::HEADER_LEN => {
            let a: [u8; 4] = pkt.get(v4_at..v4_at + 4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(a)))
        }
        6 if pkt.len() >= ipv6::HEADER_LEN => {
            let a: [u8; 16] = pkt.get(v6_at..v6_at + 16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> Vec<u8> {
        let mut p = vec![0u8; 28];
        Ipv4Repr {
            src: Ipv4Addr::new(10, 1, 2, 3),
            dst: Ipv4Addr::new(10, 4, 5, 6),
            protocol: protocol::UDP,
            payload_len: 8,
            ttl: 64,
            tos: 0,
            ident: 1,
            dont_frag: true,
        }
        .emit(&mut p)
        .unwrap();
        p
    }

    fn v6() -> Vec<u8> {
        let mut p = vec![0u8; 48];
        Ipv6Repr {
            src: "fd5a:1f00:1::1".parse().unwrap(),
            dst: "fd5a:1f02:2::1".parse().unwrap(),
            next_header: protocol::TCP,
            payload_len: 8,
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0x12345,
        }
        .emit(&mut p)
        .unwrap();
        p
    }

    #[test]
    fn ip_packet_dispatch_and_peek() {
        let a = v4();
        let p = IpPacket::new_checked(&a[..]).unwrap();
        assert_eq!(p.src(), "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(p.dst(), "10.4.5.6".parse::<IpAddr>().unwrap());
        assert_eq!(p.protocol(), protocol::UDP);
        assert_eq!(p.payload().len(), 8);
        assert_eq!(peek_src(&a), Some(p.src()));
        assert_eq!(peek_dst(&a), Some(p.dst()));

        let b = v6();
        let p = IpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.src(), "fd5a:1f00:1::1".parse::<IpAddr>().unwrap());
        assert_eq!(p.dst(), "fd5a:1f02:2::1".parse::<IpAddr>().unwrap());
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.total_len(), 48);
        assert_eq!(peek_src(&b), Some(p.src()));
        assert_eq!(peek_dst(&b), Some(p.dst()));
    }

    #[test]
    fn peek_and_dispatch_reject_garbage() {
        assert_eq!(peek_dst(&[]), None);
        assert_eq!(peek_dst(&v4()[..19]), None);
        assert_eq!(peek_src(&v6()[..39]), None);
        assert_eq!(peek_dst(&[0x50; 64]), None);
        assert_eq!(
            IpPacket::new_checked(&[][..]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            IpPacket::new_checked(&[0x50; 64][..]).unwrap_err(),
            WireError::BadVersion
        );
        assert_eq!(
            IpPacket::new_checked(&v6()[..47]).unwrap_err(),
            WireError::Truncated
        );
    }
}
