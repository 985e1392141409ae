//! IPv4 header view (RFC 791 §3.1).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |Version|  IHL  |Type of Service|          Total Length         |
//! |         Identification        |Flags|      Fragment Offset    |
//! |  Time to Live |    Protocol   |         Header Checksum       |
//! |                       Source Address                          |
//! |                    Destination Address                        |
//! |                    Options                    |    Padding    |
//! ```
//!
//! Invariant of [`Ipv4Packet`] once [`Ipv4Packet::new_checked`] succeeded: the buffer holds
//! at least 20 bytes, version is 4, `20 <= IHL*4 <= total length <= buffer length`. Every
//! accessor relies on it and cannot panic; the only length setter,
//! [`Ipv4Packet::set_total_len`], clamps its argument to keep the invariant.

use std::net::Ipv4Addr;

use super::{checksum, WireError};

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;
/// The "don't fragment" flag bit in the flags/fragment-offset word.
pub const FLAG_DF: u16 = 0x4000;
/// The "more fragments" flag bit.
pub const FLAG_MF: u16 = 0x2000;
/// Mask of the 13-bit fragment offset (in 8-byte units).
pub const FRAG_OFFSET_MASK: u16 = 0x1fff;

mod field {
    pub const VER_IHL: usize = 0;
    pub const TOS: usize = 1;
    pub const LENGTH: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLG_OFF: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
}

/// A checked view of an IPv4 packet over a byte buffer.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Packet<T> {
    buf: T,
    header_len: usize,
    total_len: usize,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Validates version, header length and total length against the buffer.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(WireError::BadVersion);
        }
        let header_len = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        if header_len < HEADER_LEN || header_len > b.len() {
            return Err(WireError::BadHeaderLen);
        }
        let total_len = usize::from(u16::from_be_bytes([b[field::LENGTH], b[field::LENGTH + 1]]));
        if total_len < header_len {
            return Err(WireError::BadLength);
        }
        if total_len > b.len() {
            return Err(WireError::Truncated);
        }
        Ok(Self {
            buf,
            header_len,
            total_len,
        })
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

    /// Header length in bytes (IHL × 4), options included.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The total length field: header plus payload, at most the buffer length.
    pub fn total_len(&self) -> usize {
        self.total_len
    }

    /// The DSCP/ECN byte.
    pub fn tos(&self) -> u8 {
        self.b()[field::TOS]
    }

    /// The identification field.
    pub fn ident(&self) -> u16 {
        self.u16_at(field::IDENT)
    }

    /// The flags and fragment offset word (see [`FLAG_DF`], [`FLAG_MF`], [`FRAG_OFFSET_MASK`]).
    pub fn flags_frag(&self) -> u16 {
        self.u16_at(field::FLG_OFF)
    }

    /// Whether the don't-fragment bit is set.
    pub fn dont_frag(&self) -> bool {
        self.flags_frag() & FLAG_DF != 0
    }

    /// Whether the more-fragments bit is set.
    pub fn more_frags(&self) -> bool {
        self.flags_frag() & FLAG_MF != 0
    }

    /// The fragment offset in bytes.
    pub fn frag_offset(&self) -> usize {
        usize::from(self.flags_frag() & FRAG_OFFSET_MASK) * 8
    }

    /// Whether this packet is a fragment (more fragments follow, or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.flags_frag() & (FLAG_MF | FRAG_OFFSET_MASK) != 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.b()[field::TTL]
    }

    /// The protocol number of the payload (see [`super::protocol`]).
    pub fn protocol(&self) -> u8 {
        self.b()[field::PROTOCOL]
    }

    /// The stored header checksum.
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    /// Whether the header checksum is valid.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(0, self.header())) == 0xffff
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        let b = self.b();
        Ipv4Addr::new(
            b[field::SRC],
            b[field::SRC + 1],
            b[field::SRC + 2],
            b[field::SRC + 3],
        )
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        let b = self.b();
        Ipv4Addr::new(
            b[field::DST],
            b[field::DST + 1],
            b[field::DST + 2],
            b[field::DST + 3],
        )
    }

    /// The header bytes, options included.
    pub fn header(&self) -> &[u8] {
        &self.b()[..self.header_len]
    }

    /// The options bytes (empty when IHL is 5).
    pub fn options(&self) -> &[u8] {
        &self.b()[HEADER_LEN..self.header_len]
    }

    /// The payload: from the end of the header to the total length (trailing buffer bytes
    /// beyond the total length are excluded).
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len..self.total_len]
    }

    /// The whole packet as declared by the total length.
    pub fn packet(&self) -> &[u8] {
        &self.b()[..self.total_len]
    }

    /// The partial pseudo-header sum for a TCP/UDP payload of `l4_len` bytes.
    pub fn pseudo_header_sum(&self, l4_len: u32) -> u64 {
        checksum::pseudo_header_v4(self.src(), self.dst(), self.protocol(), l4_len)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    fn bm(&mut self) -> &mut [u8] {
        self.buf.as_mut()
    }

    /// Sets the identification field (checksum not updated).
    pub fn set_ident(&mut self, id: u16) {
        self.bm()[field::IDENT..field::IDENT + 2].copy_from_slice(&id.to_be_bytes());
    }

    /// Sets the TTL (checksum not updated).
    pub fn set_ttl(&mut self, ttl: u8) {
        self.bm()[field::TTL] = ttl;
    }

    /// Sets the total length, clamped to keep the view's invariant (`header_len <= len <=
    /// buffer length`). Returns the length actually stored. Checksum not updated.
    pub fn set_total_len(&mut self, len: usize) -> usize {
        let max = self.b().len().min(usize::from(u16::MAX));
        let len = len.clamp(self.header_len, max);
        self.total_len = len;
        // `len <= u16::MAX` by the clamp above.
        let v = u16::try_from(len).unwrap_or(u16::MAX);
        self.bm()[field::LENGTH..field::LENGTH + 2].copy_from_slice(&v.to_be_bytes());
        len
    }

    /// Recomputes and stores the header checksum.
    pub fn fill_checksum(&mut self) {
        let hl = self.header_len;
        let b = self.bm();
        b[field::CHECKSUM] = 0;
        b[field::CHECKSUM + 1] = 0;
        let c = checksum::checksum(&b[..hl]);
        b[field::CHECKSUM..field::CHECKSUM + 2].copy_from_slice(&c.to_be_bytes());
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (h, t) = (self.header_len, self.total_len);
        &mut self.bm()[h..t]
    }
}

/// Parsed IPv4 header fields, for building headers in tests and tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Payload protocol.
    pub protocol: u8,
    /// Payload length in bytes.
    pub payload_len: usize,
    /// Time to live.
    pub ttl: u8,
    /// DSCP/ECN byte.
    pub tos: u8,
    /// Identification.
    pub ident: u16,
    /// Don't-fragment bit.
    pub dont_frag: bool,
}

impl Ipv4Repr {
    /// Reads the fields of a checked packet (options are not represented).
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv4Packet<T>) -> Self {
        Self {
            src: p.src(),
            dst: p.dst(),
            protocol: p.protocol(),
            payload_len: p.total_len() - p.header_len(),
            ttl: p.ttl(),
            tos: p.tos(),
            ident: p.ident(),
            dont_frag: p.dont_frag(),
        }
    }

    /// Writes a 20-byte header with a valid checksum into `buf[..20]`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let hdr = buf.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        let total =
            u16::try_from(HEADER_LEN + self.payload_len).map_err(|_| WireError::BadLength)?;
        hdr[0] = 0x45;
        hdr[1] = self.tos;
        hdr[2..4].copy_from_slice(&total.to_be_bytes());
        hdr[4..6].copy_from_slice(&self.ident.to_be_bytes());
        let ff: u16 = if self.dont_frag { FLAG_DF } else { 0 };
        hdr[6..8].copy_from_slice(&ff.to_be_bytes());
        hdr[8] = self.ttl;
        hdr[9] = self.protocol;
        hdr[10..12].copy_from_slice(&[0, 0]);
        hdr[12..16].copy_from_slice(&self.src.octets());
        hdr[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum::checksum(hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real ICMP echo request 10.0.0.1 -> 10.0.0.2 (ping -c1), 84 bytes.
    fn ping() -> Vec<u8> {
        let mut p = vec![
            0x45, 0x00, 0x00, 0x54, 0x3c, 0x1e, 0x40, 0x00, 0x40, 0x01, 0xea, 0x88, 0x0a, 0x00,
            0x00, 0x01, 0x0a, 0x00, 0x00, 0x02,
        ];
        p.extend_from_slice(&[0x08, 0x00, 0, 0, 0x12, 0x34, 0, 1]);
        p.resize(84, 0xab);
        p
    }

    #[test]
    fn parses_real_header() {
        let buf = ping();
        let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 84);
        assert_eq!(p.src(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(p.dst(), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(p.protocol(), 1);
        assert_eq!(p.ttl(), 64);
        assert!(p.dont_frag());
        assert!(!p.is_fragment());
        assert_eq!(p.ident(), 0x3c1e);
        assert_eq!(p.payload().len(), 64);
        assert!(p.verify_checksum());
        let r = Ipv4Repr::parse(&p);
        let mut out = [0u8; 20];
        r.emit(&mut out).unwrap();
        assert_eq!(&out[..], &buf[..20]);
    }

    #[test]
    fn rejects_bad_headers() {
        let buf = ping();
        assert_eq!(
            Ipv4Packet::new_checked(&buf[..19]).unwrap_err(),
            WireError::Truncated
        );
        let mut b = buf.clone();
        b[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).unwrap_err(),
            WireError::BadVersion
        );
        b[0] = 0x44;
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).unwrap_err(),
            WireError::BadHeaderLen
        );
        b[0] = 0x4f;
        assert_eq!(
            Ipv4Packet::new_checked(&b[..40]).unwrap_err(),
            WireError::BadHeaderLen
        );
        let mut b = buf.clone();
        b[3] = 19;
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).unwrap_err(),
            WireError::BadLength
        );
        assert_eq!(
            Ipv4Packet::new_checked(&buf[..83]).unwrap_err(),
            WireError::Truncated
        );
        let mut b = buf.clone();
        b[11] ^= 1;
        assert!(!Ipv4Packet::new_checked(&b[..]).unwrap().verify_checksum());
    }

    #[test]
    fn trailing_bytes_excluded_and_setters() {
        let mut buf = ping();
        buf.extend_from_slice(&[0; 6]);
        let mut p = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        assert_eq!(p.payload().len(), 64);
        p.set_ident(7);
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.set_total_len(10_000), 90);
        assert_eq!(p.set_total_len(3), 20);
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.payload_mut().len(), 0);
    }
}
