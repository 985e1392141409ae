//! UDP header view (RFC 768).
//!
//! ```text
//! |          Source Port          |       Destination Port        |
//! |             Length            |           Checksum            |
//! ```
//!
//! Invariant of [`UdpPacket`] once [`UdpPacket::new_checked`] succeeded: `8 <= length field
//! <= buffer length`; the payload ends at the length field.

use super::{checksum, WireError};

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;
/// Offset of the checksum field inside the UDP header.
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// A checked view of a UDP datagram over a byte buffer.
#[derive(Debug, Clone, Copy)]
pub struct UdpPacket<T> {
    buf: T,
    len: usize,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Validates the length field against the buffer.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let len = usize::from(u16::from_be_bytes([b[field::LENGTH], b[field::LENGTH + 1]]));
        if len < HEADER_LEN {
            return Err(WireError::BadLength);
        }
        if len > b.len() {
            return Err(WireError::Truncated);
        }
        Ok(Self { buf, len })
    }

    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }

    fn u16_at(&self, at: usize) -> u16 {
        let b = self.b();
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        self.u16_at(field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        self.u16_at(field::DST_PORT)
    }

    /// The length field: header plus payload.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the datagram carries no payload.
    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// Stored checksum (0 means none was computed, allowed over IPv4 only).
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    /// The payload up to the length field.
    pub fn payload(&self) -> &[u8] {
        &self.b()[HEADER_LEN..self.len]
    }

    /// The datagram up to the length field.
    pub fn datagram(&self) -> &[u8] {
        &self.b()[..self.len]
    }

    /// Whether the checksum is valid given the pseudo-header partial sum for this datagram
    /// (a zero checksum counts as valid: the sender did not compute one).
    pub fn verify_checksum(&self, pseudo: u64) -> bool {
        self.checksum() == 0 || checksum::fold(checksum::sum(pseudo, self.datagram())) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Stores the buffer length in the length field instead of checking it (at least the
    /// header, at most 65535 bytes, else [`WireError::Truncated`] or
    /// [`WireError::BadLength`]): for a datagram built in place behind a copied header (a
    /// datagram of a USO super-packet, a coalesced head). Checksum not updated.
    pub fn new_resized(mut buf: T) -> Result<Self, WireError> {
        let len = buf.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let v = u16::try_from(len).map_err(|_| WireError::BadLength)?;
        buf.as_mut()[field::LENGTH..field::LENGTH + 2].copy_from_slice(&v.to_be_bytes());
        Ok(Self { buf, len })
    }

    /// Stores a checksum value (or, with `NEEDS_CSUM`, a partial sum for the kernel).
    pub fn set_checksum(&mut self, csum: u16) {
        self.buf.as_mut()[field::CHECKSUM..field::CHECKSUM + 2]
            .copy_from_slice(&csum.to_be_bytes());
    }

    /// Computes and stores the checksum given the pseudo-header partial sum (a computed zero
    /// is sent as `0xffff`, RFC 768).
    pub fn fill_checksum(&mut self, pseudo: u64) {
        self.set_checksum(0);
        let c = match checksum::finish(checksum::sum(pseudo, self.datagram())) {
            0 => 0xffff,
            c => c,
        };
        self.set_checksum(c);
    }
}

/// UDP header fields, for building datagrams (tests, tools): [`UdpRepr::emit`] lays out the
/// header with a zero checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// The length field: header plus payload.
    pub len: usize,
}

impl UdpRepr {
    /// Reads the fields of a checked datagram.
    pub fn parse<T: AsRef<[u8]>>(p: &UdpPacket<T>) -> Self {
        Self {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            len: p.len(),
        }
    }

    /// Writes the 8-byte header into `buf[..8]`, checksum zero.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let hdr = buf.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        if self.len < HEADER_LEN {
            return Err(WireError::BadLength);
        }
        let len = u16::try_from(self.len).map_err(|_| WireError::BadLength)?;
        hdr[field::SRC_PORT..field::SRC_PORT + 2].copy_from_slice(&self.src_port.to_be_bytes());
        hdr[field::DST_PORT..field::DST_PORT + 2].copy_from_slice(&self.dst_port.to_be_bytes());
        hdr[field::LENGTH..field::LENGTH + 2].copy_from_slice(&len.to_be_bytes());
        hdr[field::CHECKSUM..field::CHECKSUM + 2].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checksums() {
        // 10.0.0.1:51820 -> 10.0.0.2:51820, 4-byte payload.
        let mut d = vec![
            0xca, 0x6c, 0xca, 0x6c, 0x00, 0x0c, 0x00, 0x00, 1, 2, 3, 4, 0xee,
        ];
        let pseudo = checksum::pseudo_header_v4([10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 17, 12);
        let mut u = UdpPacket::new_checked(&mut d[..]).unwrap();
        assert_eq!(u.src_port(), 51820);
        assert_eq!(u.len(), 12);
        assert_eq!(u.payload(), &[1, 2, 3, 4]);
        assert!(u.verify_checksum(pseudo));
        u.fill_checksum(pseudo);
        assert_ne!(u.checksum(), 0);
        assert!(u.verify_checksum(pseudo));
        assert_eq!(
            UdpPacket::new_checked(&d[..7]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            UdpPacket::new_checked(&d[..11]).unwrap_err(),
            WireError::Truncated
        );
        d[5] = 7;
        assert_eq!(
            UdpPacket::new_checked(&d[..]).unwrap_err(),
            WireError::BadLength
        );
    }

    #[test]
    fn resized_sets_the_length_and_repr_round_trips() {
        // A datagram of a USO super-packet: the header still carries the whole length.
        let mut d = vec![
            0xca, 0x6c, 0xca, 0x6c, 0x05, 0xdc, 0xab, 0xcd, 1, 2, 3, 4, 5, 6,
        ];
        let mut u = UdpPacket::new_resized(&mut d[..]).unwrap();
        assert_eq!(u.len(), 14);
        assert_eq!(u.payload(), &[1, 2, 3, 4, 5, 6]);
        u.set_checksum(0x1234);
        assert_eq!(u.checksum(), 0x1234);
        assert_eq!(d[4..8], [0, 14, 0x12, 0x34]);
        assert_eq!(
            UdpPacket::new_resized(&mut d[..7]).unwrap_err(),
            WireError::Truncated
        );
        let mut big = vec![0u8; 65536];
        assert_eq!(
            UdpPacket::new_resized(&mut big[..]).unwrap_err(),
            WireError::BadLength
        );
        let u = UdpPacket::new_checked(&d[..]).unwrap();
        let r = UdpRepr::parse(&u);
        assert_eq!(
            r,
            UdpRepr {
                src_port: 51820,
                dst_port: 51820,
                len: 14
            }
        );
        let mut out = [0xffu8; 8];
        r.emit(&mut out).unwrap();
        assert_eq!(out, [0xca, 0x6c, 0xca, 0x6c, 0, 14, 0, 0]);
        assert_eq!(r.emit(&mut out[..7]).unwrap_err(), WireError::Truncated);
        let short = UdpRepr { len: 7, ..r };
        assert_eq!(short.emit(&mut out).unwrap_err(), WireError::BadLength);
        let long = UdpRepr { len: 65536, ..r };
        assert_eq!(long.emit(&mut out).unwrap_err(), WireError::BadLength);
    }
}
