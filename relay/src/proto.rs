//! The relay's wire formats, sans-IO: first-byte demultiplexing, relay frames (a WireGuard
//! message whose 4-byte header carries a 24-bit peer handle), the UDP control datagrams
//! (BIND, BIND_ACK), the messages of the TLS stream and its `u16` length prefix, and the
//! key-possession proof. See `relay/PROTOCOL.md`.
//!
//! Invariants: nothing here panics on any input (the `relay_proto` fuzz target checks
//! it); parsers borrow and never allocate more than the input; every encoder's output parses
//! back to the same value.

use std::fmt;

/// Protocol version carried in HELLO.
pub const VERSION: u8 = 1;
/// BIND (client → relay over UDP): `[0xF0][handle:3][cookie:16]`.
pub const BIND: u8 = 0xF0;
/// BIND_ACK (relay → client over UDP): `[0xF1][handle:3]`.
pub const BIND_ACK: u8 = 0xF1;
/// Stream: HELLO `[0xF2][version][flags]`.
pub const HELLO: u8 = 0xF2;
/// Stream: CHALLENGE `[0xF3][ephemeral public:32][nonce:16]`.
pub const CHALLENGE: u8 = 0xF3;
/// Stream: PROOF `[0xF4][static public:32][mac:32]`.
pub const PROOF: u8 = 0xF4;
/// Stream: ASSIGNED `[0xF5][handle:3][cookie:16]`.
pub const ASSIGNED: u8 = 0xF5;
/// Stream: REFUSED `[0xF6][code][utf-8 reason]`.
pub const REFUSED: u8 = 0xF6;
/// Stream: LOOKUP `[0xF7][public key:32]`.
pub const LOOKUP: u8 = 0xF7;
/// Stream: ANSWER `[0xF8][public key:32][present][handle:3]`.
pub const ANSWER: u8 = 0xF8;
/// Stream: GONE `[0xF9][handle:3]`.
pub const GONE: u8 = 0xF9;
/// Stream: KEEPALIVE `[0xFA]` (either direction; keeps the session from idling out).
pub const KEEPALIVE: u8 = 0xFA;
/// HELLO flag: deliver to this session over the stream even when it has a bound UDP address.
pub const FLAG_STREAM_ONLY: u8 = 0x01;
/// The largest handle (24 bits). Handle 0 is never assigned.
pub const MAX_HANDLE: u32 = 0x00FF_FFFF;
/// Bind cookie length.
pub const COOKIE_LEN: usize = 16;
/// Challenge nonce length.
pub const NONCE_LEN: usize = 16;
/// Length of a BIND datagram.
pub const BIND_LEN: usize = 1 + 3 + COOKIE_LEN;
/// Smallest relay frame: the 4-byte header (WireGuard's smallest message is larger, but the
/// relay forwards opaquely and only needs the header).
pub const FRAME_HEADER: usize = 4;
/// STUN magic cookie (RFC 8489).
pub const STUN_MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// The HTTP `Upgrade` token of the stream transport.
pub const UPGRADE_TOKEN: &str = "tabbify-relay";
/// Label of the TLS exporter the proof binds to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tabbify-relay-proof";

/// The first-byte demultiplexing of the protocol: one implementation for the whole
/// workspace, the engine's (the joiner's WireGuard socket and the relay's UDP socket apply
/// the same rule).
pub use tabbify_engine::core::demux::{classify, Kind};

/// Why bytes could not be read as what was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Too short for its type.
    #[error("truncated")]
    Truncated,
    /// Longer than its type allows.
    #[error("trailing bytes")]
    Trailing,
    /// Unknown type byte.
    #[error("unknown type {0:#04x}")]
    UnknownType(u8),
    /// Not a WireGuard message (for [`wg_to_frame`]).
    #[error("not a WireGuard message")]
    NotWireGuard,
    /// A handle outside 1..=2^24-1.
    #[error("handle out of range")]
    BadHandle,
    /// A field that must be one of a few values was not.
    #[error("bad field")]
    BadField,
}

fn handle_at(b: &[u8]) -> u32 {
    (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2])
}

fn put_handle(h: u32) -> [u8; 3] {
    [(h >> 16) as u8, (h >> 8) as u8, h as u8]
}

/// The (WireGuard type, handle) of a relay frame.
pub fn frame_header(frame: &[u8]) -> Result<(u8, u32), ProtoError> {
    if frame.len() < FRAME_HEADER {
        return Err(ProtoError::Truncated);
    }
    match frame[0] {
        0xE1..=0xE4 => Ok((frame[0] & 0x0F, handle_at(&frame[1..4]))),
        t => Err(ProtoError::UnknownType(t)),
    }
}

/// Rewrites the handle of a relay frame in place (the relay's forwarding step).
pub fn set_frame_handle(frame: &mut [u8], handle: u32) -> Result<(), ProtoError> {
    frame_header(frame)?;
    if handle == 0 || handle > MAX_HANDLE {
        return Err(ProtoError::BadHandle);
    }
    frame[1..4].copy_from_slice(&put_handle(handle));
    Ok(())
}

/// Turns a WireGuard message into a relay frame to `handle`, in place: zero extra bytes.
pub fn wg_to_frame(msg: &mut [u8], handle: u32) -> Result<(), ProtoError> {
    if classify(msg) != Kind::WireGuard {
        return Err(ProtoError::NotWireGuard);
    }
    if handle == 0 || handle > MAX_HANDLE {
        return Err(ProtoError::BadHandle);
    }
    msg[0] |= 0xE0;
    msg[1..4].copy_from_slice(&put_handle(handle));
    Ok(())
}

/// Turns a received relay frame back into the WireGuard message, in place; returns the
/// source's handle the relay wrote.
pub fn frame_to_wg(frame: &mut [u8]) -> Result<u32, ProtoError> {
    let (ty, h) = frame_header(frame)?;
    frame[0] = ty;
    frame[1..4].copy_from_slice(&[0, 0, 0]);
    Ok(h)
}

/// A UDP control datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Client → relay: bind this source address to the session `handle`.
    Bind {
        /// The session's handle.
        handle: u32,
        /// The bind cookie the relay assigned over TLS.
        cookie: [u8; COOKIE_LEN],
    },
    /// Relay → client: the bind took.
    BindAck {
        /// The session's handle.
        handle: u32,
    },
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cookie is a credential: never logged.
        match self {
            Control::Bind { handle, .. } => write!(f, "Bind {{ handle: {handle}, .. }}"),
            Control::BindAck { handle } => write!(f, "BindAck {{ handle: {handle} }}"),
        }
    }
}

impl Control {
    /// Parses a control datagram (exact length).
    pub fn parse(d: &[u8]) -> Result<Control, ProtoError> {
        let t = *d.first().ok_or(ProtoError::Truncated)?;
        let want = match t {
            BIND => BIND_LEN,
            BIND_ACK => 4,
            t => return Err(ProtoError::UnknownType(t)),
        };
        if d.len() < want {
            return Err(ProtoError::Truncated);
        }
        if d.len() > want {
            return Err(ProtoError::Trailing);
        }
        let handle = handle_at(&d[1..4]);
        if handle == 0 {
            return Err(ProtoError::BadHandle);
        }
        Ok(match t {
            BIND => {
                let mut cookie = [0; COOKIE_LEN];
                cookie.copy_from_slice(&d[4..BIND_LEN]);
                Control::Bind { handle, cookie }
            }
            _ => Control::BindAck { handle },
        })
    }

    /// Encodes into a fresh buffer.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Control::Bind { handle, cookie } => {
                let mut v = Vec::with_capacity(BIND_LEN);
                v.push(BIND);
                v.extend_from_slice(&put_handle(*handle));
                v.extend_from_slice(cookie);
                v
            }
            Control::BindAck { handle } => {
                let mut v = vec![BIND_ACK];
                v.extend_from_slice(&put_handle(*handle));
                v
            }
        }
    }
}

/// One record of the TLS stream (after the length prefix).
#[derive(Clone, PartialEq, Eq)]
pub enum Msg<'a> {
    /// Client → relay, first: protocol version and flags ([`FLAG_STREAM_ONLY`]).
    Hello {
        /// [`VERSION`].
        version: u8,
        /// Flags.
        flags: u8,
    },
    /// Relay → client: a fresh ephemeral X25519 public key and nonce.
    Challenge {
        /// The relay's ephemeral public key.
        ephemeral: [u8; 32],
        /// A fresh nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// Client → relay: its WireGuard public key and the MAC of [`proof_mac`].
    Proof {
        /// The client's static (WireGuard) public key.
        key: [u8; 32],
        /// The MAC.
        mac: [u8; 32],
    },
    /// Relay → client: the session's handle and UDP bind cookie.
    Assigned {
        /// The handle.
        handle: u32,
        /// The cookie for BIND.
        cookie: [u8; COOKIE_LEN],
    },
    /// Relay → client: the session was refused; the connection closes.
    Refused {
        /// Machine-readable code ([`RefuseCode`] as u8).
        code: u8,
        /// Human-readable reason.
        reason: &'a str,
    },
    /// Client → relay: which handle has this public key?
    Lookup {
        /// The key looked up.
        key: [u8; 32],
    },
    /// Relay → client: the answer to a LOOKUP.
    Answer {
        /// The key looked up.
        key: [u8; 32],
        /// Its live handle, if any.
        handle: Option<u32>,
    },
    /// Relay → client: the session with this handle ended.
    Gone {
        /// The handle.
        handle: u32,
    },
    /// Either direction: liveness.
    Keepalive,
    /// A relay frame (same format as over UDP).
    Frame(&'a [u8]),
}

impl fmt::Debug for Msg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::Hello { version, flags } => write!(f, "Hello(v{version}, {flags:#x})"),
            Msg::Challenge { .. } => write!(f, "Challenge"),
            Msg::Proof { key, .. } => write!(f, "Proof({})", hex::encode(&key[..4])),
            Msg::Assigned { handle, .. } => write!(f, "Assigned({handle})"),
            Msg::Refused { code, reason } => write!(f, "Refused({code}, {reason})"),
            Msg::Lookup { key } => write!(f, "Lookup({})", hex::encode(&key[..4])),
            Msg::Answer { key, handle } => {
                write!(f, "Answer({}, {handle:?})", hex::encode(&key[..4]))
            }
            Msg::Gone { handle } => write!(f, "Gone({handle})"),
            Msg::Keepalive => write!(f, "Keepalive"),
            Msg::Frame(b) => write!(f, "Frame({} bytes)", b.len()),
        }
    }
}

/// Why the relay refused a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseCode {
    /// Unsupported version or malformed handshake.
    Protocol = 1,
    /// The key-possession proof did not verify.
    BadProof = 2,
    /// The relay is at its session limit.
    Full = 3,
    /// This identity is at its per-identity session limit.
    IdentityLimit = 4,
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&b[..N]);
    a
}

fn exact(b: &[u8], n: usize) -> Result<(), ProtoError> {
    match b.len().cmp(&n) {
        std::cmp::Ordering::Less => Err(ProtoError::Truncated),
        std::cmp::Ordering::Greater => Err(ProtoError::Trailing),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

fn nonzero_handle(b: &[u8]) -> Result<u32, ProtoError> {
    match handle_at(b) {
        0 => Err(ProtoError::BadHandle),
        h => Ok(h),
    }
}

impl<'a> Msg<'a> {
    /// Parses one stream record.
    pub fn parse(r: &'a [u8]) -> Result<Msg<'a>, ProtoError> {
        let t = *r.first().ok_or(ProtoError::Truncated)?;
        let body = &r[1..];
        Ok(match t {
            0xE1..=0xE4 => {
                if r.len() < FRAME_HEADER {
                    return Err(ProtoError::Truncated);
                }
                Msg::Frame(r)
            }
            HELLO => {
                exact(body, 2)?;
                Msg::Hello {
                    version: body[0],
                    flags: body[1],
                }
            }
            CHALLENGE => {
                exact(body, 32 + NONCE_LEN)?;
                Msg::Challenge {
                    ephemeral: arr(body),
                    nonce: arr(&body[32..]),
                }
            }
            PROOF => {
                exact(body, 64)?;
                Msg::Proof {
                    key: arr(body),
                    mac: arr(&body[32..]),
                }
            }
            ASSIGNED => {
                exact(body, 3 + COOKIE_LEN)?;
                Msg::Assigned {
                    handle: nonzero_handle(body)?,
                    cookie: arr(&body[3..]),
                }
            }
            REFUSED => {
                let (&code, rest) = body.split_first().ok_or(ProtoError::Truncated)?;
                let reason = std::str::from_utf8(rest).map_err(|_| ProtoError::BadField)?;
                Msg::Refused { code, reason }
            }
            LOOKUP => {
                exact(body, 32)?;
                Msg::Lookup { key: arr(body) }
            }
            ANSWER => {
                exact(body, 36)?;
                let handle = match body[32] {
                    0 if body[33..36] == [0, 0, 0] => None,
                    1 => Some(nonzero_handle(&body[33..])?),
                    _ => return Err(ProtoError::BadField),
                };
                Msg::Answer {
                    key: arr(body),
                    handle,
                }
            }
            GONE => {
                exact(body, 3)?;
                Msg::Gone {
                    handle: nonzero_handle(body)?,
                }
            }
            KEEPALIVE => {
                exact(body, 0)?;
                Msg::Keepalive
            }
            t => return Err(ProtoError::UnknownType(t)),
        })
    }

    /// Appends the record with its `u16` length prefix to `out`. Frames longer than
    /// `u16::MAX` cannot be encoded (the stream's framing limit): they yield `Err`.
    pub fn encode_record(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let start = out.len();
        out.extend_from_slice(&[0, 0]);
        match self {
            Msg::Hello { version, flags } => out.extend_from_slice(&[HELLO, *version, *flags]),
            Msg::Challenge { ephemeral, nonce } => {
                out.push(CHALLENGE);
                out.extend_from_slice(ephemeral);
                out.extend_from_slice(nonce);
            }
            Msg::Proof { key, mac } => {
                out.push(PROOF);
                out.extend_from_slice(key);
                out.extend_from_slice(mac);
            }
            Msg::Assigned { handle, cookie } => {
                out.push(ASSIGNED);
                out.extend_from_slice(&put_handle(*handle));
                out.extend_from_slice(cookie);
            }
            Msg::Refused { code, reason } => {
                out.push(REFUSED);
                out.push(*code);
                out.extend_from_slice(reason.as_bytes());
            }
            Msg::Lookup { key } => {
                out.push(LOOKUP);
                out.extend_from_slice(key);
            }
            Msg::Answer { key, handle } => {
                out.push(ANSWER);
                out.extend_from_slice(key);
                match handle {
                    Some(h) => {
                        out.push(1);
                        out.extend_from_slice(&put_handle(*h));
                    }
                    None => out.extend_from_slice(&[0, 0, 0, 0]),
                }
            }
            Msg::Gone { handle } => {
                out.push(GONE);
                out.extend_from_slice(&put_handle(*handle));
            }
            Msg::Keepalive => out.push(KEEPALIVE),
            Msg::Frame(b) => out.extend_from_slice(b),
        }
        let len = out.len() - start - 2;
        let Ok(len16) = u16::try_from(len) else {
            out.truncate(start);
            return Err(ProtoError::Trailing);
        };
        out[start..start + 2].copy_from_slice(&len16.to_be_bytes());
        Ok(())
    }
}

/// Splits the first complete length-prefixed record off `buf`: (record, bytes consumed),
/// or `None` when more bytes are needed.
pub fn split_record(buf: &[u8]) -> Option<(&[u8], usize)> {
    if buf.len() < 2 {
        return None;
    }
    let n = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    let rec = buf.get(2..2 + n)?;
    Some((rec, 2 + n))
}

/// Bytes a stream reader asks the transport for per read by default (many records per
/// read).
pub const READ_CHUNK: usize = 64 * 1024;

/// A sans-IO reader of the stream's length-prefixed records: the transport reads large
/// chunks into [`RecordBuf::spare`], [`RecordBuf::filled`] commits them, and
/// [`RecordBuf::next_record`] hands out every complete record in turn (in place, mutable so
/// the relay can rewrite a frame's handle without copying). A record split across reads
/// waits for the rest; the buffer never holds more than one partial record plus one chunk
/// (at most `2 + 65535 + chunk` bytes), whatever the peer sends, and shrinks back to one
/// chunk whenever it is empty (an idle session keeps one chunk, not the largest record
/// it ever saw).
///
/// The framing has no invalid length (any `u16` is a record); a record whose *content*
/// does not parse (empty, a frame shorter than its header, an unknown type) is the
/// caller's to drop and count, and the records after it are read normally.
#[derive(Debug)]
pub struct RecordBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    chunk: usize,
}

impl Default for RecordBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordBuf {
    /// An empty reader with [`READ_CHUNK`]-byte reads.
    pub fn new() -> Self {
        Self::with_chunk(READ_CHUNK)
    }

    /// An empty reader offering `chunk` bytes (at least 1) per read. Nothing is allocated
    /// before the first [`RecordBuf::spare`].
    pub fn with_chunk(chunk: usize) -> Self {
        RecordBuf {
            buf: Vec::new(),
            start: 0,
            end: 0,
            chunk: chunk.max(1),
        }
    }

    /// Where the next read goes: at least the chunk size (complete records should have been
    /// taken with [`RecordBuf::next_record`] first; the partial rest moves to the front).
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == 0 && self.buf.len() > self.chunk {
            self.buf.truncate(self.chunk);
            self.buf.shrink_to_fit();
        }
        let want = self.end + self.chunk;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`RecordBuf::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next complete record, if one is buffered.
    pub fn next_record(&mut self) -> Option<&mut [u8]> {
        let (_, used) = split_record(&self.buf[self.start..self.end])?;
        let rec = self.start + 2..self.start + used;
        self.start += used;
        Some(&mut self.buf[rec])
    }

    /// Bytes of a partial record waiting for more input.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }
}

/// The key-possession MAC: blake3 keyed by `derive_key("tabbify-relay v1 proof key",
/// X25519(static, ephemeral))` over `"tabbify-relay v1 proof" ‖ exporter ‖ ephemeral ‖
/// nonce ‖ static public`, where `exporter` is 32 bytes of the TLS exporter
/// [`EXPORTER_LABEL`] of this connection (so a proof is bound to one TLS session).
pub fn proof_mac(
    shared: &[u8; 32],
    exporter: &[u8; 32],
    ephemeral: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    static_public: &[u8; 32],
) -> [u8; 32] {
    let key = blake3::derive_key("tabbify-relay v1 proof key", shared);
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(b"tabbify-relay v1 proof");
    h.update(exporter);
    h.update(ephemeral);
    h.update(nonce);
    h.update(static_public);
    *h.finalize().as_bytes()
}

/// Constant-time MAC comparison.
pub fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from(*a) == blake3::Hash::from(*b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demux_by_first_byte() {
        assert_eq!(classify(&[1, 0, 0, 0, 9]), Kind::WireGuard);
        assert_eq!(classify(&[4, 0, 0, 0]), Kind::WireGuard);
        assert_eq!(classify(&[1, 0, 1, 0]), Kind::Junk);
        let mut stun = [0u8; 20];
        stun[1] = 1;
        stun[4..8].copy_from_slice(&STUN_MAGIC);
        assert_eq!(classify(&stun), Kind::Stun);
        assert_eq!(classify(&[0xE1, 0, 0, 1]), Kind::RelayFrame);
        assert_eq!(classify(&[0xE5, 0, 0, 1]), Kind::Junk);
        assert_eq!(classify(&[0xE1, 0, 0]), Kind::Junk);
        assert_eq!(classify(&[0xF0]), Kind::RelayControl);
        assert_eq!(classify(&[]), Kind::Junk);
        assert_eq!(classify(&[0x45, 0, 0, 0]), Kind::Junk);
    }

    #[test]
    fn wg_frame_round_trip_is_zero_overhead() {
        for ty in 1..=4u8 {
            let mut m = vec![ty, 0, 0, 0, 7, 8, 9];
            let orig = m.clone();
            wg_to_frame(&mut m, 0x12_3456).unwrap();
            assert_eq!(m.len(), orig.len());
            assert_eq!(&m[..4], &[0xE0 | ty, 0x12, 0x34, 0x56]);
            assert_eq!(frame_header(&m).unwrap(), (ty, 0x12_3456));
            set_frame_handle(&mut m, 5).unwrap();
            assert_eq!(frame_to_wg(&mut m).unwrap(), 5);
            assert_eq!(m, orig);
        }
        assert_eq!(
            wg_to_frame(&mut [5, 0, 0, 0], 1),
            Err(ProtoError::NotWireGuard)
        );
        assert_eq!(
            wg_to_frame(&mut [1, 0, 0, 0], 0),
            Err(ProtoError::BadHandle)
        );
        assert_eq!(
            wg_to_frame(&mut [1, 0, 0, 0], 1 << 24),
            Err(ProtoError::BadHandle)
        );
    }

    #[test]
    fn control_round_trip_and_rejects() {
        let b = Control::Bind {
            handle: 77,
            cookie: [3; 16],
        };
        assert_eq!(Control::parse(&b.encode()).unwrap(), b);
        let a = Control::BindAck { handle: 0xFF_FFFF };
        assert_eq!(Control::parse(&a.encode()).unwrap(), a);
        let mut long = b.encode();
        long.push(0);
        assert_eq!(Control::parse(&long), Err(ProtoError::Trailing));
        assert_eq!(Control::parse(&[BIND, 0, 0]), Err(ProtoError::Truncated));
        assert_eq!(
            Control::parse(&[BIND_ACK, 0, 0, 0]),
            Err(ProtoError::BadHandle)
        );
        assert_eq!(Control::parse(&[0xF9]), Err(ProtoError::UnknownType(0xF9)));
        assert!(!format!("{b:?}").contains("3, 3"));
    }

    #[test]
    fn stream_messages_round_trip() {
        let frame = [0xE2, 0, 0, 9, 1, 2, 3];
        let msgs = [
            Msg::Hello {
                version: VERSION,
                flags: FLAG_STREAM_ONLY,
            },
            Msg::Challenge {
                ephemeral: [1; 32],
                nonce: [2; 16],
            },
            Msg::Proof {
                key: [3; 32],
                mac: [4; 32],
            },
            Msg::Assigned {
                handle: 9,
                cookie: [5; 16],
            },
            Msg::Refused {
                code: 2,
                reason: "bad proof",
            },
            Msg::Lookup { key: [6; 32] },
            Msg::Answer {
                key: [7; 32],
                handle: Some(12),
            },
            Msg::Answer {
                key: [7; 32],
                handle: None,
            },
            Msg::Gone { handle: 1 },
            Msg::Keepalive,
            Msg::Frame(&frame),
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            m.encode_record(&mut buf).unwrap();
        }
        let mut rest = &buf[..];
        for m in &msgs {
            let (rec, used) = split_record(rest).unwrap();
            assert_eq!(&Msg::parse(rec).unwrap(), m);
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        assert_eq!(split_record(&[0, 5, 1]), None);
        let big = vec![0xE1; 70_000];
        let mut out = vec![9];
        assert!(Msg::Frame(&big).encode_record(&mut out).is_err());
        assert_eq!(out, vec![9]);
        assert_eq!(Msg::parse(&[GONE, 0, 0, 0]), Err(ProtoError::BadHandle));
        assert_eq!(
            Msg::parse(&[ANSWER; 37]).map(|_| ()),
            Err(ProtoError::BadField)
        );
        assert_eq!(Msg::parse(&[0x10]), Err(ProtoError::UnknownType(0x10)));
    }

    #[test]
    fn proof_binds_every_input() {
        let base = proof_mac(&[1; 32], &[2; 32], &[3; 32], &[4; 16], &[5; 32]);
        assert!(mac_eq(&base, &base));
        for i in 0..5 {
            let mut ins = [[1u8; 32], [2; 32], [3; 32], [4; 32], [5; 32]];
            ins[i][0] ^= 1;
            let nonce: [u8; 16] = arr(&ins[3]);
            let m = proof_mac(&ins[0], &ins[1], &ins[2], &nonce, &ins[4]);
            assert!(!mac_eq(&base, &m), "input {i} not bound");
        }
    }

    fn feed(rb: &mut RecordBuf, bytes: &[u8]) {
        let sp = rb.spare();
        sp[..bytes.len()].copy_from_slice(bytes);
        rb.filled(bytes.len());
    }

    fn drain(rb: &mut RecordBuf) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| rb.next_record().map(|r| r.to_vec())).collect()
    }

    /// Many records in one read come out one by one, in order.
    #[test]
    fn record_buf_many_records_per_read() {
        let mut wire = Vec::new();
        let frames: Vec<Vec<u8>> = (0..100u8).map(|i| vec![0xE4, 0, 0, 1, i, i]).collect();
        for f in &frames {
            Msg::Frame(f).encode_record(&mut wire).unwrap();
        }
        Msg::Keepalive.encode_record(&mut wire).unwrap();
        let mut rb = RecordBuf::new();
        feed(&mut rb, &wire);
        let got = drain(&mut rb);
        assert_eq!(got.len(), 101);
        assert_eq!(&got[..100], &frames[..]);
        assert_eq!(got[100], [KEEPALIVE]);
        assert_eq!(rb.pending(), 0);
    }

    /// Records split at every possible point across reads (length prefix split too, and a
    /// maximum-size record spanning several chunks) are reassembled exactly.
    #[test]
    fn record_buf_records_split_across_reads() {
        let mut big = vec![0xE1, 0, 0, 2];
        big.resize(usize::from(u16::MAX), 0x5A);
        let small = [0xE2, 0, 0, 3, 9];
        let mut wire = Vec::new();
        Msg::Frame(&small).encode_record(&mut wire).unwrap();
        Msg::Frame(&big).encode_record(&mut wire).unwrap();
        Msg::Frame(&small).encode_record(&mut wire).unwrap();
        for step in [1usize, 2, 3, 7, 1000, 16 * 1024, READ_CHUNK] {
            let mut rb = RecordBuf::with_chunk(step);
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                feed(&mut rb, chunk);
                got.extend(drain(&mut rb));
            }
            assert_eq!(
                got,
                vec![small.to_vec(), big.clone(), small.to_vec()],
                "step {step}"
            );
            assert_eq!(rb.pending(), 0);
        }
    }

    /// The attacker: a malformed record (empty, a frame shorter than its header, an unknown
    /// type) in the middle of a batch. It is handed out like any record, fails to parse (the
    /// caller drops and counts it), and the records after it still arrive intact.
    #[test]
    fn record_buf_malformed_record_in_the_middle() {
        let mut wire = Vec::new();
        Msg::Frame(&[0xE4, 0, 0, 1, 1])
            .encode_record(&mut wire)
            .unwrap();
        wire.extend_from_slice(&[0, 0]); // empty record
        wire.extend_from_slice(&[0, 2, 0xE4, 0]); // truncated frame
        wire.extend_from_slice(&[0, 3, 0x10, 1, 2]); // unknown type
        Msg::Frame(&[0xE4, 0, 0, 1, 2])
            .encode_record(&mut wire)
            .unwrap();
        let mut rb = RecordBuf::new();
        feed(&mut rb, &wire);
        let got = drain(&mut rb);
        let parsed: Vec<bool> = got.iter().map(|r| Msg::parse(r).is_ok()).collect();
        assert_eq!(parsed, [true, false, false, false, true]);
        assert_eq!(got[4], [0xE4, 0, 0, 1, 2]);
    }
}
