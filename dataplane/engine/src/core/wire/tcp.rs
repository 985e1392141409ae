//! TCP header view (RFC 9293 §3.1).
//!
//! ```text
//! |          Source Port          |       Destination Port        |
//! |                        Sequence Number                        |
//! |                    Acknowledgment Number                      |
//! |  Data |       |C|E|U|A|P|R|S|F|                               |
//! | Offset| Rsrvd |W|C|R|C|S|S|Y|I|            Window             |
//! |           Checksum            |         Urgent Pointer        |
//! |                           [Options]                           |
//! ```
//!
//! Invariant of [`TcpPacket`] once [`TcpPacket::new_checked`] succeeded: the buffer holds at
//! least 20 bytes and `20 <= data offset × 4 <= buffer length`. The buffer is the whole
//! segment (the IP payload), so the payload is everything after the header.

use super::{checksum, WireError};

/// Length of a TCP header without options.
pub const HEADER_LEN: usize = 20;
/// Offset of the checksum field inside the TCP header.
pub const CHECKSUM_OFFSET: usize = 16;

/// FIN flag.
pub const FIN: u8 = 0x01;
/// SYN flag.
pub const SYN: u8 = 0x02;
/// RST flag.
pub const RST: u8 = 0x04;
/// PSH flag.
pub const PSH: u8 = 0x08;
/// ACK flag.
pub const ACK: u8 = 0x10;
/// URG flag.
pub const URG: u8 = 0x20;
/// ECE flag.
pub const ECE: u8 = 0x40;
/// CWR flag.
pub const CWR: u8 = 0x80;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const SEQ: usize = 4;
    pub const ACK: usize = 8;
    pub const OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: usize = 14;
    pub const CHECKSUM: usize = 16;
    pub const URGENT: usize = 18;
}

/// A checked view of a TCP segment over a byte buffer.
#[derive(Debug, Clone, Copy)]
pub struct TcpPacket<T> {
    buf: T,
    header_len: usize,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Validates the data offset against the buffer.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let header_len = usize::from(b[field::OFFSET] >> 4) * 4;
        if header_len < HEADER_LEN || header_len > b.len() {
            return Err(WireError::BadHeaderLen);
        }
        Ok(Self { buf, header_len })
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buf
    }

    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }

    fn u16_at(&self, at: usize) -> u16 {
        let b = self.b();
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    fn u32_at(&self, at: usize) -> u32 {
        let b = self.b();
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        self.u16_at(field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        self.u16_at(field::DST_PORT)
    }

    /// Sequence number.
    pub fn seq(&self) -> u32 {
        self.u32_at(field::SEQ)
    }

    /// Acknowledgment number.
    pub fn ack(&self) -> u32 {
        self.u32_at(field::ACK)
    }

    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The flag byte (CWR..FIN; see the constants in this module).
    pub fn flags(&self) -> u8 {
        self.b()[field::FLAGS]
    }

    /// Receive window.
    pub fn window(&self) -> u16 {
        self.u16_at(field::WINDOW)
    }

    /// Stored checksum.
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    /// Urgent pointer.
    pub fn urgent(&self) -> u16 {
        self.u16_at(field::URGENT)
    }

    /// The header bytes, options included.
    pub fn header(&self) -> &[u8] {
        &self.b()[..self.header_len]
    }

    /// The options bytes (empty with a 20-byte header).
    pub fn options(&self) -> &[u8] {
        &self.b()[HEADER_LEN..self.header_len]
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len..]
    }

    /// Whether the checksum is valid given the pseudo-header partial sum for this segment's
    /// length (see [`super::Ipv4Packet::pseudo_header_sum`]).
    pub fn verify_checksum(&self, pseudo: u64) -> bool {
        checksum::fold(checksum::sum(pseudo, self.b())) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    fn bm(&mut self) -> &mut [u8] {
        self.buf.as_mut()
    }

    /// Sets the sequence number (checksum not updated).
    pub fn set_seq(&mut self, seq: u32) {
        self.bm()[field::SEQ..field::SEQ + 4].copy_from_slice(&seq.to_be_bytes());
    }

    /// Sets the flag byte (checksum not updated).
    pub fn set_flags(&mut self, flags: u8) {
        self.bm()[field::FLAGS] = flags;
    }

    /// Stores a checksum value.
    pub fn set_checksum(&mut self, csum: u16) {
        self.bm()[field::CHECKSUM..field::CHECKSUM + 2].copy_from_slice(&csum.to_be_bytes());
    }

    /// Computes and stores the checksum given the pseudo-header partial sum.
    pub fn fill_checksum(&mut self, pseudo: u64) {
        self.set_checksum(0);
        let c = checksum::finish(checksum::sum(pseudo, self.b()));
        self.set_checksum(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::wire::Ipv4Packet;

    // A SYN from 10.0.0.1:45678 to 10.0.0.2:5201 laid out as Linux sends it: MSS 1420,
    // SACK-permitted, timestamps, NOP, window scale 7; TCP checksum left zero.
    pub(crate) fn syn() -> Vec<u8> {
        vec![
            0x45, 0x00, 0x00, 0x3c, 0x8a, 0x2f, 0x40, 0x00, 0x40, 0x06, 0x9c, 0x8a, 0x0a, 0x00,
            0x00, 0x01, 0x0a, 0x00, 0x00, 0x02, 0xb2, 0x6e, 0x14, 0x51, 0x5d, 0x3e, 0x7a, 0x01,
            0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00, 0x02, 0x04,
            0x05, 0x8c, 0x04, 0x02, 0x08, 0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x00, 0x00, 0x00, 0x00,
            0x01, 0x03, 0x03, 0x07,
        ]
    }

    #[test]
    fn parses_and_checksums_syn() {
        let mut buf = syn();
        let mut ip = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        let pseudo = ip.pseudo_header_sum(40);
        let mut t = TcpPacket::new_checked(ip.payload_mut()).unwrap();
        assert_eq!(t.src_port(), 45678);
        assert_eq!(t.dst_port(), 5201);
        assert_eq!(t.seq(), 0x5d3e_7a01);
        assert_eq!(t.ack(), 0);
        assert_eq!(t.header_len(), 40);
        assert_eq!(t.flags(), SYN);
        assert_eq!(t.window(), 0xfaf0);
        assert_eq!(t.options().len(), 20);
        assert_eq!(t.options()[..4], [0x02, 0x04, 0x05, 0x8c]);
        assert!(t.payload().is_empty());
        assert!(!t.verify_checksum(pseudo));
        t.fill_checksum(pseudo);
        assert!(t.verify_checksum(pseudo));
        t.set_seq(1);
        assert!(!t.verify_checksum(pseudo));
    }

    #[test]
    fn rejects_bad_offsets() {
        let buf = syn();
        let seg = &buf[20..];
        assert_eq!(
            TcpPacket::new_checked(&seg[..19]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            TcpPacket::new_checked(&seg[..39]).unwrap_err(),
            WireError::BadHeaderLen
        );
        let mut b = seg.to_vec();
        b[12] = 0x40;
        assert_eq!(
            TcpPacket::new_checked(&b[..]).unwrap_err(),
            WireError::BadHeaderLen
        );
    }
}
