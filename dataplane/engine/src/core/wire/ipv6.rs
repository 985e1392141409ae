//! IPv6 fixed header view (RFC 8200 §3).
//!
//! ```text
//! |Version| Traffic Class |           Flow Label                  |
//! |         Payload Length        |  Next Header  |   Hop Limit   |
//! |                     Source Address (16 bytes)                 |
//! |                  Destination Address (16 bytes)               |
//! ```
//!
//! Extension headers are not walked: a next header other than TCP, UDP or ICMPv6 is opaque
//! payload to the data plane. Invariant of [`Ipv6Packet`] once
//! [`Ipv6Packet::new_checked`] succeeded: version is 6 and `40 + payload length <= buffer
//! length`; no accessor can panic.

use std::net::Ipv6Addr;

use super::{checksum, WireError};

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;

mod field {
    pub const LENGTH: usize = 4;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
}

/// A checked view of an IPv6 packet over a byte buffer.
#[derive(Debug, Clone, Copy)]
pub struct Ipv6Packet<T> {
    buf: T,
    payload_len: usize,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Validates version and payload length against the buffer.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(WireError::BadVersion);
        }
        let payload_len = usize::from(u16::from_be_bytes([b[field::LENGTH], b[field::LENGTH + 1]]));
        if HEADER_LEN + payload_len > b.len() {
            return Err(WireError::Truncated);
        }
        Ok(Self { buf, payload_len })
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buf
    }

    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// The first 32 bits: version, traffic class and flow label.
    pub fn ver_tc_flow(&self) -> u32 {
        let b = self.b();
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Traffic class (DSCP/ECN).
    pub fn traffic_class(&self) -> u8 {
        ((self.ver_tc_flow() >> 20) & 0xff) as u8
    }

    /// The 20-bit flow label.
    pub fn flow_label(&self) -> u32 {
        self.ver_tc_flow() & 0x000f_ffff
    }

    /// The payload length field (extension headers included).
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// The fixed header plus payload length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }

    /// The next header (protocol) number.
    pub fn next_header(&self) -> u8 {
        self.b()[field::NXT_HDR]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.b()[field::HOP_LIMIT]
    }

    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        addr_at(self.b(), field::SRC)
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        addr_at(self.b(), field::DST)
    }

    /// The 40-byte fixed header.
    pub fn header(&self) -> &[u8] {
        &self.b()[..HEADER_LEN]
    }

    /// The payload as declared by the payload length.
    pub fn payload(&self) -> &[u8] {
        &self.b()[HEADER_LEN..HEADER_LEN + self.payload_len]
    }

    /// The whole packet as declared by the payload length.
    pub fn packet(&self) -> &[u8] {
        &self.b()[..HEADER_LEN + self.payload_len]
    }

    /// The partial pseudo-header sum for an upper-layer payload of `l4_len` bytes.
    pub fn pseudo_header_sum(&self, l4_len: u32) -> u64 {
        checksum::pseudo_header_v6(self.src(), self.dst(), self.next_header(), l4_len)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Sets the payload length, clamped to what the buffer holds. Returns the stored value.
    pub fn set_payload_len(&mut self, len: usize) -> usize {
        let max = (self.b().len() - HEADER_LEN).min(usize::from(u16::MAX));
        let len = len.min(max);
        self.payload_len = len;
        let v = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf.as_mut()[field::LENGTH..field::LENGTH + 2].copy_from_slice(&v.to_be_bytes());
        len
    }

    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, hops: u8) {
        self.buf.as_mut()[field::HOP_LIMIT] = hops;
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let n = self.payload_len;
        &mut self.buf.as_mut()[HEADER_LEN..HEADER_LEN + n]
    }
}

fn addr_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

/// Parsed IPv6 fixed-header fields, for building headers in tests and tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Repr {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Next header.
    pub next_header: u8,
    /// Payload length in bytes.
    pub payload_len: usize,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
}

impl Ipv6Repr {
    /// Reads the fields of a checked packet.
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv6Packet<T>) -> Self {
        Self {
            src: p.src(),
            dst: p.dst(),
            next_header: p.next_header(),
            payload_len: p.payload_len(),
            hop_limit: p.hop_limit(),
            traffic_class: p.traffic_class(),
            flow_label: p.flow_label(),
        }
    }

    /// Writes the 40-byte header into `buf[..40]`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let hdr = buf.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        let len = u16::try_from(self.payload_len).map_err(|_| WireError::BadLength)?;
        let first =
            (6u32 << 28) | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0xf_ffff);
        hdr[0..4].copy_from_slice(&first.to_be_bytes());
        hdr[4..6].copy_from_slice(&len.to_be_bytes());
        hdr[6] = self.next_header;
        hdr[7] = self.hop_limit;
        hdr[8..24].copy_from_slice(&self.src.octets());
        hdr[24..40].copy_from_slice(&self.dst.octets());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An ICMPv6 router solicitation (without the source link-layer option) as a TUN emits it.
    fn rs() -> Vec<u8> {
        let mut p = vec![0x60, 0x00, 0x00, 0x00, 0x00, 0x08, 0x3a, 0xff];
        p.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[0x85, 0x00, 0x7d, 0x37, 0, 0, 0, 0]);
        p
    }

    #[test]
    fn parses_real_header() {
        let buf = rs();
        let p = Ipv6Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.payload_len(), 8);
        assert_eq!(p.next_header(), 58);
        assert_eq!(p.hop_limit(), 255);
        assert_eq!(p.src(), "fe80::1234:0:0:1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst(), "ff02::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload(), &buf[40..]);
        let mut out = [0u8; 40];
        Ipv6Repr::parse(&p).emit(&mut out).unwrap();
        assert_eq!(&out[..], &buf[..40]);
    }

    #[test]
    fn rejects_bad_headers() {
        let buf = rs();
        assert_eq!(
            Ipv6Packet::new_checked(&buf[..39]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            Ipv6Packet::new_checked(&buf[..47]).unwrap_err(),
            WireError::Truncated
        );
        let mut b = buf.clone();
        b[0] = 0x40;
        assert_eq!(
            Ipv6Packet::new_checked(&b[..]).unwrap_err(),
            WireError::BadVersion
        );
    }

    #[test]
    fn flow_label_and_setters() {
        let mut buf = rs();
        buf[1] = 0xa5;
        buf[2] = 0x43;
        buf[3] = 0x21;
        let mut p = Ipv6Packet::new_checked(&mut buf[..]).unwrap();
        assert_eq!(p.traffic_class(), 0x0a);
        assert_eq!(p.flow_label(), 0x5_4321);
        assert_eq!(p.set_payload_len(100), 8);
        assert_eq!(p.set_payload_len(4), 4);
        assert_eq!(p.payload_mut().len(), 4);
    }
}
