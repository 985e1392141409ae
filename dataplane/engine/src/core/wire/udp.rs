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
pub const CHECKSUM_OFFSET: usize = 6;

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
        let len = usize::from(u16::from_be_bytes([b[4], b[5]]));
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

    /// Source port.
    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.b()[0], self.b()[1]])
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.b()[2], self.b()[3]])
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
        u16::from_be_bytes([self.b()[6], self.b()[7]])
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
    /// Computes and stores the checksum given the pseudo-header partial sum (a computed zero
    /// is sent as `0xffff`, RFC 768).
    pub fn fill_checksum(&mut self, pseudo: u64) {
        let n = self.len;
        let b = self.buf.as_mut();
        b[6] = 0;
        b[7] = 0;
        let c = match checksum::finish(checksum::sum(pseudo, &b[..n])) {
            0 => 0xffff,
            c => c,
        };
        b[6..8].copy_from_slice(&c.to_be_bytes());
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
}
