//! STUN (RFC 8489) as the mesh uses it: Binding requests and their answers, shared by the
//! coordinator's STUN server, the relay (which answers Binding requests on its UDP port) and
//! the joiner (which sends them from its WireGuard socket to learn its mapped endpoint).
//!
//! This module owns the wire format only: no sockets, no clock, no retransmission (the
//! joiner's probe does that). What it guarantees:
//!
//! * [`parse`] never panics and never allocates, whatever the input; it accepts only a
//!   well-formed STUN message (top two bits zero, magic cookie, length a multiple of four
//!   and equal to the datagram's, every attribute inside the message) and checks
//!   FINGERPRINT when present (RFC 8489 §14.7: a wrong one means "not STUN", the message
//!   is dropped).
//! * Attributes after MESSAGE-INTEGRITY(-SHA256) other than FINGERPRINT are ignored
//!   (§14.5, §14.6); we hold no credentials, so integrity itself is not checked.
//! * Unknown comprehension-optional attributes (type `0x8000..=0xFFFF`) are skipped;
//!   unknown comprehension-required ones are collected so a server answers 420 with
//!   UNKNOWN-ATTRIBUTES (§6.3.1.1) and a client fails the transaction (§6.3.3).
//! * A mapped address comes from XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS when only that is
//!   present (old servers), IPv4 or IPv6.
//!
//! Wire layout (§5), all big endian:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |0 0|     STUN Message Type     |         Message Length        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                         Magic Cookie                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     Transaction ID (96 bits)                  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! then attributes: type (16) | length (16) | value, padded to 4 bytes
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie, bytes 4..8 of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 20;
/// The Binding method.
pub const METHOD_BINDING: u16 = 0x001;
/// Length of the Binding request [`binding_request`] builds: header + FINGERPRINT.
pub const BINDING_REQUEST_LEN: usize = HEADER_LEN + 8;
/// The largest message this module builds or that a server should answer (a Binding
/// request needs far less; §6.1 keeps messages under the path MTU).
pub const MAX_MESSAGE_LEN: usize = 548;
/// How many unknown comprehension-required attribute types a parse records (the rest
/// still make the message fail, they are just not listed in the 420 answer).
pub const MAX_UNKNOWN_ATTRIBUTES: usize = 8;

/// Attribute types (§18.3, and RFC 8445 §16.1 for the ICE ones a Binding may carry).
pub mod attr {
    /// MAPPED-ADDRESS.
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY.
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// MESSAGE-INTEGRITY-SHA256.
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// PASSWORD-ALGORITHM.
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    /// USERHASH.
    pub const USERHASH: u16 = 0x001E;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// PRIORITY (ICE).
    pub const PRIORITY: u16 = 0x0024;
    /// USE-CANDIDATE (ICE).
    pub const USE_CANDIDATE: u16 = 0x0025;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;

    /// Whether a comprehension-required type is one this module understands (or knowingly
    /// ignores); comprehension-optional types (`0x8000..`) never need to be.
    pub(super) fn known_required(t: u16) -> bool {
        matches!(
            t,
            MAPPED_ADDRESS
                | USERNAME
                | MESSAGE_INTEGRITY
                | ERROR_CODE
                | UNKNOWN_ATTRIBUTES
                | REALM
                | NONCE
                | MESSAGE_INTEGRITY_SHA256
                | PASSWORD_ALGORITHM
                | USERHASH
                | XOR_MAPPED_ADDRESS
                | PRIORITY
                | USE_CANDIDATE
        )
    }
}

/// FINGERPRINT is the CRC-32 of the message before it, XORed with this (§14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// A 96-bit transaction id.
pub type TransactionId = [u8; 12];

/// The class of a message (§5: bits C1 and C0 of the type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A request.
    Request,
    /// An indication (no answer).
    Indication,
    /// A success response.
    SuccessResponse,
    /// An error response.
    ErrorResponse,
}

/// Why a datagram is not a STUN message we accept. Small and `Copy`: parsing runs per
/// datagram and a failure is only counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Shorter than the 20-byte header.
    #[error("shorter than a STUN header")]
    TooShort,
    /// The top two bits are not zero or the magic cookie is missing.
    #[error("not a STUN message (first bits or magic cookie)")]
    NotStun,
    /// The header's length is not a multiple of 4 or does not match the datagram.
    #[error("STUN length does not match the datagram")]
    BadLength,
    /// An attribute runs past the end of the message.
    #[error("STUN attribute runs past the message")]
    AttributeOverrun,
    /// FINGERPRINT is present but wrong, malformed or not the last attribute.
    #[error("bad STUN FINGERPRINT")]
    BadFingerprint,
    /// An address attribute has a bad family or length.
    #[error("bad STUN address attribute")]
    BadAddress,
    /// ERROR-CODE is malformed.
    #[error("bad STUN ERROR-CODE")]
    BadErrorCode,
}

/// A parsed STUN message: the fields the mesh uses. Borrows nothing; building one never
/// allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// The class.
    pub class: Class,
    /// The method (12 bits); [`METHOD_BINDING`] is the one we use.
    pub method: u16,
    /// The transaction id.
    pub transaction_id: TransactionId,
    /// The mapped address: XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS when only that came.
    pub mapped: Option<SocketAddr>,
    /// ERROR-CODE's number (300..=699) in an error response.
    pub error_code: Option<u16>,
    /// Whether a (correct) FINGERPRINT was present.
    pub fingerprint: bool,
    unknown: [u16; MAX_UNKNOWN_ATTRIBUTES],
    unknown_len: u8,
    unknown_more: bool,
}

impl Message {
    /// The unknown comprehension-required attribute types (at most
    /// [`MAX_UNKNOWN_ATTRIBUTES`] of them are listed).
    pub fn unknown_required(&self) -> &[u16] {
        &self.unknown[..usize::from(self.unknown_len)]
    }

    /// Whether the message carried any unknown comprehension-required attribute.
    pub fn has_unknown_required(&self) -> bool {
        self.unknown_len > 0 || self.unknown_more
    }

    /// The mapped endpoint of a Binding success response that answers `txid`, if this is
    /// one (a client's whole check: class, method, transaction, no unknown required
    /// attribute, an address present).
    pub fn binding_success_for(&self, txid: &TransactionId) -> Option<SocketAddr> {
        if self.class == Class::SuccessResponse
            && self.method == METHOD_BINDING
            && &self.transaction_id == txid
            && !self.has_unknown_required()
        {
            self.mapped
        } else {
            None
        }
    }
}

/// Whether a datagram looks like STUN by its first 8 bytes (the demux test of the relay
/// protocol: top two bits `00` and the magic cookie). Cheap; [`parse`] does the rest.
pub fn looks_like_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN
        && datagram[0] & 0xC0 == 0
        && datagram[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// Parses a STUN message (see the module docs for what is checked).
pub fn parse(datagram: &[u8]) -> Result<Message, StunError> {
    if datagram.len() < HEADER_LEN {
        return Err(StunError::TooShort);
    }
    if !looks_like_stun(datagram) {
        return Err(StunError::NotStun);
    }
    let msg_type = be16(datagram, 0);
    let length = usize::from(be16(datagram, 2));
    if length % 4 != 0 || HEADER_LEN + length != datagram.len() {
        return Err(StunError::BadLength);
    }
    let (class, method) = split_type(msg_type);
    let mut transaction_id = [0u8; 12];
    transaction_id.copy_from_slice(&datagram[8..20]);
    let mut msg = Message {
        class,
        method,
        transaction_id,
        mapped: None,
        error_code: None,
        fingerprint: false,
        unknown: [0; MAX_UNKNOWN_ATTRIBUTES],
        unknown_len: 0,
        unknown_more: false,
    };
    let mut xor_mapped = None;
    let mut plain_mapped = None;
    let mut after_integrity = false;
    let mut at = HEADER_LEN;
    while at < datagram.len() {
        if datagram.len() - at < 4 {
            return Err(StunError::AttributeOverrun);
        }
        let t = be16(datagram, at);
        let len = usize::from(be16(datagram, at + 2));
        let value_at = at + 4;
        let padded = len.div_ceil(4) * 4;
        if datagram.len() - value_at < padded {
            return Err(StunError::AttributeOverrun);
        }
        let value = &datagram[value_at..value_at + len];
        let next = value_at + padded;
        if t == attr::FINGERPRINT {
            // §14.7: the last attribute; CRC-32 over everything before it, the header's
            // length already counting the FINGERPRINT.
            if len != 4 || next != datagram.len() {
                return Err(StunError::BadFingerprint);
            }
            let want = crc32(&datagram[..at]) ^ FINGERPRINT_XOR;
            if be32(value, 0) != want {
                return Err(StunError::BadFingerprint);
            }
            msg.fingerprint = true;
        } else if !after_integrity {
            match t {
                attr::XOR_MAPPED_ADDRESS => {
                    xor_mapped.get_or_insert(parse_address(value, Some(&transaction_id))?);
                }
                attr::MAPPED_ADDRESS => {
                    plain_mapped.get_or_insert(parse_address(value, None)?);
                }
                attr::ERROR_CODE => {
                    if value.len() < 4 || value[2] & 0xF8 != 0 {
                        return Err(StunError::BadErrorCode);
                    }
                    let code = u16::from(value[2]) * 100 + u16::from(value[3]);
                    if !(300..=699).contains(&code) || value[3] > 99 {
                        return Err(StunError::BadErrorCode);
                    }
                    msg.error_code.get_or_insert(code);
                }
                attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 => {
                    after_integrity = true;
                }
                t if t < 0x8000 && !attr::known_required(t) => {
                    let n = usize::from(msg.unknown_len);
                    if msg.unknown_required().contains(&t) {
                    } else if n < MAX_UNKNOWN_ATTRIBUTES {
                        msg.unknown[n] = t;
                        msg.unknown_len += 1;
                    } else {
                        msg.unknown_more = true;
                    }
                }
                _ => {}
            }
        }
        at = next;
    }
    msg.mapped = xor_mapped.or(plain_mapped);
    Ok(msg)
}

/// A Binding request with transaction id `txid` and a FINGERPRINT (no other attribute):
/// what the joiner sends to a STUN server.
pub fn binding_request(txid: &TransactionId) -> [u8; BINDING_REQUEST_LEN] {
    let mut out = [0u8; BINDING_REQUEST_LEN];
    let len = write_header(&mut out, Class::Request, METHOD_BINDING, txid);
    debug_assert_eq!(len, HEADER_LEN);
    let n = append_fingerprint(&mut out, HEADER_LEN);
    debug_assert_eq!(n, BINDING_REQUEST_LEN);
    out
}

/// A Binding success response to `txid` telling the client it came from `mapped`:
/// XOR-MAPPED-ADDRESS then FINGERPRINT.
pub fn binding_success(txid: &TransactionId, mapped: SocketAddr) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN + 4 + 20 + 8];
    let mut at = write_header(&mut out, Class::SuccessResponse, METHOD_BINDING, txid);
    at = put_address(&mut out, at, attr::XOR_MAPPED_ADDRESS, mapped, Some(txid));
    out.truncate(at + 8);
    set_length(&mut out, at + 8);
    let n = append_fingerprint(&mut out, at);
    out.truncate(n);
    out
}

/// A Binding success response carrying only MAPPED-ADDRESS, as an RFC 3489 server would
/// send (tests and fuzz seeds use it; our server sends [`binding_success`]).
pub fn binding_success_plain(txid: &TransactionId, mapped: SocketAddr) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN + 4 + 20];
    let mut at = write_header(&mut out, Class::SuccessResponse, METHOD_BINDING, txid);
    at = put_address(&mut out, at, attr::MAPPED_ADDRESS, mapped, None);
    out.truncate(at);
    set_length(&mut out, at);
    out
}

/// An error response to a request (`method`, `txid`) with ERROR-CODE `code` (300..=699)
/// and `reason`, listing `unknown` in UNKNOWN-ATTRIBUTES when not empty (420, §14.9),
/// then FINGERPRINT.
pub fn error_response(
    method: u16,
    txid: &TransactionId,
    code: u16,
    reason: &str,
    unknown: &[u16],
) -> Vec<u8> {
    let reason = truncate_utf8(reason, 128);
    let unknown = &unknown[..unknown.len().min(MAX_UNKNOWN_ATTRIBUTES)];
    let mut out = vec![0u8; HEADER_LEN];
    write_header(&mut out, Class::ErrorResponse, method & 0x0FFF, txid);
    let mut value = vec![0, 0, (code / 100) as u8 & 0x07, (code % 100) as u8];
    value.extend_from_slice(reason.as_bytes());
    push_attr(&mut out, attr::ERROR_CODE, &value);
    if !unknown.is_empty() {
        let list: Vec<u8> = unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
        push_attr(&mut out, attr::UNKNOWN_ATTRIBUTES, &list);
    }
    let at = out.len();
    out.resize(at + 8, 0);
    set_length(&mut out, at + 8);
    append_fingerprint(&mut out, at);
    out
}

/// What a STUN server does with a datagram from `source`: the answer to send back, or
/// `None` when nothing is sent (indications, responses). `Err` means the datagram is not a
/// STUN message and is dropped (and counted) — RFC 8489 §6.3: a server never answers
/// garbage.
///
/// * a Binding request → success with XOR-MAPPED-ADDRESS = `source`;
/// * a request with unknown comprehension-required attributes → 420 with
///   UNKNOWN-ATTRIBUTES (§6.3.1.1);
/// * a request for another method → 400 (we implement only Binding).
pub fn answer(datagram: &[u8], source: SocketAddr) -> Result<Option<Vec<u8>>, StunError> {
    let msg = parse(datagram)?;
    if msg.class != Class::Request {
        return Ok(None);
    }
    if msg.has_unknown_required() {
        return Ok(Some(error_response(
            msg.method,
            &msg.transaction_id,
            420,
            "Unknown Attribute",
            msg.unknown_required(),
        )));
    }
    if msg.method != METHOD_BINDING {
        return Ok(Some(error_response(
            msg.method,
            &msg.transaction_id,
            400,
            "Bad Request: only Binding is served",
            &[],
        )));
    }
    Ok(Some(binding_success(&msg.transaction_id, source)))
}

// ---- helpers, in call order ----

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Splits the 14-bit message type into class and method (§5, figure 3: class bits at 4
/// and 8, method in the other twelve).
fn split_type(t: u16) -> (Class, u16) {
    let class = match ((t >> 7) & 0b10) | ((t >> 4) & 0b1) {
        0b00 => Class::Request,
        0b01 => Class::Indication,
        0b10 => Class::SuccessResponse,
        _ => Class::ErrorResponse,
    };
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    (class, method)
}

fn join_type(class: Class, method: u16) -> u16 {
    let c = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::SuccessResponse => 0b10,
        Class::ErrorResponse => 0b11,
    };
    let m = method & 0x0FFF;
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

/// The address of (XOR-)MAPPED-ADDRESS (§14.1, §14.2); `xor` holds the transaction id for
/// the XOR form.
fn parse_address(v: &[u8], xor: Option<&TransactionId>) -> Result<SocketAddr, StunError> {
    if v.len() < 4 {
        return Err(StunError::BadAddress);
    }
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = be16(v, 2);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match (v[1], v.len()) {
        (0x01, 8) => {
            let mut o = [v[4], v[5], v[6], v[7]];
            if xor.is_some() {
                for (b, k) in o.iter_mut().zip(cookie) {
                    *b ^= k;
                }
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (0x02, 20) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&v[4..20]);
            if let Some(txid) = xor {
                let key = cookie.iter().chain(txid.iter());
                for (b, k) in o.iter_mut().zip(key) {
                    *b ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return Err(StunError::BadAddress),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Writes the header with length 0; returns where the attributes start.
fn write_header(out: &mut [u8], class: Class, method: u16, txid: &TransactionId) -> usize {
    out[0..2].copy_from_slice(&join_type(class, method).to_be_bytes());
    out[2..4].copy_from_slice(&[0, 0]);
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..20].copy_from_slice(txid);
    HEADER_LEN
}

/// Sets the header's length for a message of `total` bytes.
fn set_length(out: &mut [u8], total: usize) {
    let len = (total - HEADER_LEN) as u16;
    out[2..4].copy_from_slice(&len.to_be_bytes());
}

/// Writes an address attribute at `at`; returns the end.
fn put_address(
    out: &mut [u8],
    at: usize,
    t: u16,
    addr: SocketAddr,
    xor: Option<&TransactionId>,
) -> usize {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = addr.port();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let (family, ip): (u8, Vec<u8>) = match addr.ip() {
        IpAddr::V4(ip) => (0x01, ip.octets().to_vec()),
        IpAddr::V6(ip) => (0x02, ip.octets().to_vec()),
    };
    let mut ip = ip;
    if let Some(txid) = xor {
        let key = cookie.iter().chain(txid.iter());
        for (b, k) in ip.iter_mut().zip(key) {
            *b ^= k;
        }
    }
    let len = 4 + ip.len();
    out[at..at + 2].copy_from_slice(&t.to_be_bytes());
    out[at + 2..at + 4].copy_from_slice(&(len as u16).to_be_bytes());
    out[at + 4] = 0;
    out[at + 5] = family;
    out[at + 6..at + 8].copy_from_slice(&port.to_be_bytes());
    out[at + 8..at + 8 + ip.len()].copy_from_slice(&ip);
    at + 4 + len
}

/// Appends an attribute (padded) to a growable message and updates the header length.
fn push_attr(out: &mut Vec<u8>, t: u16, value: &[u8]) {
    out.extend_from_slice(&t.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().div_ceil(4) * 4, 0);
    let total = out.len();
    set_length(out, total);
}

/// Writes FINGERPRINT at `at` (the buffer holds `at + 8` bytes and the header's length
/// already counts them); returns the end.
fn append_fingerprint(out: &mut [u8], at: usize) -> usize {
    set_length(out, at + 8);
    let crc = crc32(&out[..at]) ^ FINGERPRINT_XOR;
    out[at..at + 2].copy_from_slice(&attr::FINGERPRINT.to_be_bytes());
    out[at + 2..at + 4].copy_from_slice(&4u16.to_be_bytes());
    out[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
    at + 8
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// CRC-32 (ISO-HDLC, the one of zlib and ITU-T V.42 that §14.7 names).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC_TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    !crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const TXID: TransactionId = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// RFC 5769 §2.1, sample request (SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
    /// MESSAGE-INTEGRITY, FINGERPRINT).
    fn rfc5769_request() -> Vec<u8> {
        hex("00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
             00 24 00 04 6e 00 01 ff 80 29 00 08 93 2f f9 b1 51 26 3b 36
             00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
             00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
             80 28 00 04 e5 7a 3b cf")
    }

    /// RFC 5769 §2.2, sample IPv4 response: 192.0.2.1:32853.
    fn rfc5769_response_v4() -> Vec<u8> {
        hex("01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
             00 20 00 08 00 01 a1 47 e1 12 a6 43
             00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
             80 28 00 04 c0 7d 4c 96")
    }

    /// RFC 5769 §2.3, sample IPv6 response: [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    fn rfc5769_response_v6() -> Vec<u8> {
        hex("01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
             00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
             00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
             80 28 00 04 c8 fb 0b 4c")
    }

    #[test]
    fn rfc5769_request_parses_with_its_fingerprint() {
        let m = parse(&rfc5769_request()).unwrap();
        assert_eq!(m.class, Class::Request);
        assert_eq!(m.method, METHOD_BINDING);
        assert_eq!(m.transaction_id, TXID);
        assert!(m.fingerprint);
        assert!(
            !m.has_unknown_required(),
            "PRIORITY is a known ICE attribute"
        );
        assert_eq!(m.mapped, None);
    }

    #[test]
    fn rfc5769_responses_give_the_mapped_address() {
        let m = parse(&rfc5769_response_v4()).unwrap();
        assert!(m.fingerprint);
        assert_eq!(
            m.binding_success_for(&TXID),
            Some("192.0.2.1:32853".parse().unwrap())
        );
        let m = parse(&rfc5769_response_v6()).unwrap();
        assert!(m.fingerprint);
        assert_eq!(
            m.binding_success_for(&TXID),
            Some(
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                    .parse()
                    .unwrap()
            )
        );
        // Another transaction's answer is not ours.
        assert_eq!(m.binding_success_for(&[0; 12]), None);
    }

    /// A real coturn 4.6.1 (`turnserver --stun-only`) answer to our request with txid
    /// `[7; 12]` from 127.0.0.1:50611: XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, RESPONSE-ORIGIN
    /// (0x802b, optional, skipped), SOFTWARE, FINGERPRINT.
    #[test]
    fn coturn_response_parses() {
        let res = hex(
            "010100442112a442070707070707070707070707002000080001e4a15e12a443\
            000100080001c5b37f000001802b0008000187dc7f00000180220014436f7475726e2d342e362e31\
            2027476f7273742780280004e1db2de4",
        );
        let m = parse(&res).unwrap();
        assert!(m.fingerprint);
        assert_eq!(
            m.binding_success_for(&[7; 12]),
            Some("127.0.0.1:50611".parse().unwrap())
        );
    }

    #[test]
    fn a_flipped_bit_fails_the_fingerprint() {
        for vector in [
            rfc5769_request(),
            rfc5769_response_v4(),
            rfc5769_response_v6(),
        ] {
            for i in 20..vector.len() - 8 {
                let mut v = vector.clone();
                v[i] ^= 0x01;
                assert!(parse(&v).is_err(), "bit flip at {i} accepted");
            }
        }
    }

    #[test]
    fn our_binding_request_round_trips_with_a_fingerprint() {
        let txid = [7u8; 12];
        let req = binding_request(&txid);
        assert!(looks_like_stun(&req));
        let m = parse(&req).unwrap();
        assert_eq!(
            (m.class, m.method, m.transaction_id),
            (Class::Request, METHOD_BINDING, txid)
        );
        assert!(m.fingerprint);
        // The exact bytes: type 0x0001, length 8, cookie, txid, FINGERPRINT.
        assert_eq!(&req[..8], &[0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(&req[20..24], &[0x80, 0x28, 0x00, 0x04]);
    }

    #[test]
    fn server_answers_with_xor_mapped_address_v4_and_v6() {
        for src in [
            "198.51.100.7:40000",
            "[2001:db8::5]:51820",
            "[::ffff:1.2.3.4]:9",
        ] {
            let src: SocketAddr = src.parse().unwrap();
            let txid = [0x5a; 12];
            let ans = answer(&binding_request(&txid), src).unwrap().unwrap();
            let m = parse(&ans).unwrap();
            assert!(m.fingerprint);
            assert_eq!(m.binding_success_for(&txid), Some(src));
        }
    }

    #[test]
    fn mapped_address_is_the_fallback() {
        let src: SocketAddr = "203.0.113.9:1234".parse().unwrap();
        let m = parse(&binding_success_plain(&TXID, src)).unwrap();
        assert_eq!(m.binding_success_for(&TXID), Some(src));
        let src: SocketAddr = "[2001:db8::9]:1234".parse().unwrap();
        let m = parse(&binding_success_plain(&TXID, src)).unwrap();
        assert_eq!(m.binding_success_for(&TXID), Some(src));
    }

    #[test]
    fn unknown_required_attribute_gets_420_with_the_list() {
        // A Binding request with an unknown comprehension-required attribute 0x7777 and an
        // unknown comprehension-optional one 0xC001 (skipped).
        let mut req = vec![0u8; HEADER_LEN];
        write_header(&mut req, Class::Request, METHOD_BINDING, &TXID);
        push_attr(&mut req, 0xC001, b"opt");
        push_attr(&mut req, 0x7777, b"required");
        let src: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let ans = answer(&req, src).unwrap().unwrap();
        let m = parse(&ans).unwrap();
        assert_eq!(m.class, Class::ErrorResponse);
        assert_eq!(m.error_code, Some(420));
        assert_eq!(m.transaction_id, TXID);
        let ua = ans
            .windows(6)
            .position(|w| w == [0x00, 0x0A, 0x00, 0x02, 0x77, 0x77])
            .is_some();
        assert!(ua, "UNKNOWN-ATTRIBUTES lists 0x7777: {ans:02x?}");

        // Only the optional one: a normal answer.
        let mut req = vec![0u8; HEADER_LEN];
        write_header(&mut req, Class::Request, METHOD_BINDING, &TXID);
        push_attr(&mut req, 0xC001, b"opt");
        let m = parse(&answer(&req, src).unwrap().unwrap()).unwrap();
        assert_eq!(m.binding_success_for(&TXID), Some(src));
    }

    #[test]
    fn a_response_with_an_unknown_required_attribute_is_no_success() {
        let mut res = vec![0u8; HEADER_LEN];
        write_header(&mut res, Class::SuccessResponse, METHOD_BINDING, &TXID);
        let mut a = vec![0u8; 12];
        put_address(
            &mut a,
            0,
            attr::XOR_MAPPED_ADDRESS,
            "1.2.3.4:5".parse().unwrap(),
            Some(&TXID),
        );
        res.extend_from_slice(&a);
        push_attr(&mut res, 0x4444, &[]);
        let m = parse(&res).unwrap();
        assert!(m.has_unknown_required());
        assert_eq!(m.binding_success_for(&TXID), None);
    }

    #[test]
    fn other_methods_and_classes() {
        let src: SocketAddr = "192.0.2.1:1".parse().unwrap();
        // Allocate (TURN, method 3): 400.
        let mut req = vec![0u8; HEADER_LEN];
        write_header(&mut req, Class::Request, 0x003, &TXID);
        let m = parse(&answer(&req, src).unwrap().unwrap()).unwrap();
        assert_eq!(
            (m.class, m.method, m.error_code),
            (Class::ErrorResponse, 0x003, Some(400))
        );
        // Indications and responses get no answer.
        let mut ind = vec![0u8; HEADER_LEN];
        write_header(&mut ind, Class::Indication, METHOD_BINDING, &TXID);
        assert_eq!(answer(&ind, src), Ok(None));
        assert_eq!(answer(&rfc5769_response_v4(), src), Ok(None));
    }

    #[test]
    fn type_bits_round_trip() {
        for class in [
            Class::Request,
            Class::Indication,
            Class::SuccessResponse,
            Class::ErrorResponse,
        ] {
            for method in [0x001, 0x003, 0x0ABC, 0x0FFF] {
                assert_eq!(split_type(join_type(class, method)), (class, method));
            }
        }
        assert_eq!(join_type(Class::SuccessResponse, METHOD_BINDING), 0x0101);
        assert_eq!(join_type(Class::ErrorResponse, METHOD_BINDING), 0x0111);
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        assert_eq!(parse(&[]), Err(StunError::TooShort));
        assert_eq!(parse(&[0u8; 19]), Err(StunError::TooShort));
        // WireGuard handshake initiation: type 1, zeros.
        let mut wg = [0u8; 148];
        wg[0] = 1;
        assert_eq!(parse(&wg), Err(StunError::NotStun));
        assert!(!looks_like_stun(&wg));
        // A relay frame's first byte.
        let mut relay = binding_request(&TXID);
        relay[0] = 0xE1;
        assert_eq!(parse(&relay), Err(StunError::NotStun));
        // Length mismatch, odd length, truncated attribute, bad address family.
        let mut v = binding_request(&TXID).to_vec();
        v.push(0);
        assert_eq!(parse(&v), Err(StunError::BadLength));
        let mut v = rfc5769_response_v4();
        v.truncate(v.len() - 4);
        v[3] -= 4;
        assert_eq!(parse(&v), Err(StunError::AttributeOverrun));
        let mut v = rfc5769_response_v4();
        let n = v.len();
        v[n - 1] ^= 1;
        assert_eq!(parse(&v), Err(StunError::BadFingerprint));
        let mut bad = vec![0u8; HEADER_LEN];
        write_header(&mut bad, Class::SuccessResponse, METHOD_BINDING, &TXID);
        push_attr(
            &mut bad,
            attr::XOR_MAPPED_ADDRESS,
            &[0, 3, 0, 0, 1, 2, 3, 4],
        );
        assert_eq!(parse(&bad), Err(StunError::BadAddress));
        let mut over = vec![0u8; HEADER_LEN];
        write_header(&mut over, Class::Request, METHOD_BINDING, &TXID);
        over.extend_from_slice(&[0x80, 0x22, 0x00, 0x40]);
        set_length(&mut over, HEADER_LEN + 4);
        assert_eq!(parse(&over), Err(StunError::AttributeOverrun));
        // Every prefix and every single-byte corruption of real messages: no panic.
        for v in [
            rfc5769_request(),
            rfc5769_response_v6(),
            binding_request(&TXID).to_vec(),
        ] {
            for n in 0..v.len() {
                let _ = parse(&v[..n]);
            }
            for i in 0..v.len() {
                for x in [0x00, 0xFF, 0x80] {
                    let mut c = v.clone();
                    c[i] = x;
                    let _ = parse(&c);
                    let _ = answer(&c, "1.2.3.4:5".parse().unwrap());
                }
            }
        }
    }

    #[test]
    fn error_response_reason_is_bounded_utf8() {
        let long = "é".repeat(200);
        let e = error_response(METHOD_BINDING, &TXID, 420, &long, &[0x7777; 20]);
        let m = parse(&e).unwrap();
        assert_eq!(m.error_code, Some(420));
        assert!(e.len() <= MAX_MESSAGE_LEN);
    }
}
