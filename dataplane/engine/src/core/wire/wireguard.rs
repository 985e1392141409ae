//! WireGuard message views (whitepaper §5.4; all integers little-endian).
//!
//! ```text
//! type 1 handshake initiation, 148 B: type(1) reserved(3) sender(4) ephemeral(32)
//!                                     static(32+16) timestamp(12+16) mac1(16) mac2(16)
//! type 2 handshake response,    92 B: type(1) reserved(3) sender(4) receiver(4)
//!                                     ephemeral(32) empty(0+16) mac1(16) mac2(16)
//! type 3 cookie reply,          64 B: type(1) reserved(3) receiver(4) nonce(24) cookie(16+16)
//! type 4 transport data,      ≥ 32 B: type(1) reserved(3) receiver(4) counter(8)
//!                                     packet(n+16)
//! ```
//!
//! Invariant of [`WgMessage`] once [`WgMessage::new_checked`] succeeded: the type is 1–4,
//! the three reserved bytes are zero and the length is exactly the size of types 1–3 or at
//! least 32 for type 4. No cryptographic check happens here; `boringtun::noise` does that.

use super::WireError;

/// Size of a handshake initiation.
pub const HANDSHAKE_INIT_LEN: usize = 148;
/// Size of a handshake response.
pub const HANDSHAKE_RESP_LEN: usize = 92;
/// Size of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Transport data header: type, reserved, receiver index, counter.
pub const DATA_HEADER_LEN: usize = 16;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Smallest transport data message (header and the tag of an empty keepalive).
pub const DATA_MIN_LEN: usize = DATA_HEADER_LEN + TAG_LEN;
/// Bytes a transport data message adds to its (padded) plaintext.
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;

/// The four WireGuard message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Type 1: handshake initiation.
    HandshakeInit = 1,
    /// Type 2: handshake response.
    HandshakeResp = 2,
    /// Type 3: cookie reply.
    CookieReply = 3,
    /// Type 4: transport data.
    Data = 4,
}

/// A checked view of a WireGuard message.
#[derive(Debug, Clone, Copy)]
pub struct WgMessage<T> {
    buf: T,
    ty: MessageType,
}

impl<T: AsRef<[u8]>> WgMessage<T> {
    /// Validates the type, the reserved bytes and the size for that type.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < 4 {
            return Err(WireError::Truncated);
        }
        let (ty, ok) = match b[0] {
            1 => (MessageType::HandshakeInit, b.len() == HANDSHAKE_INIT_LEN),
            2 => (MessageType::HandshakeResp, b.len() == HANDSHAKE_RESP_LEN),
            3 => (MessageType::CookieReply, b.len() == COOKIE_REPLY_LEN),
            4 => (MessageType::Data, b.len() >= DATA_MIN_LEN),
            _ => return Err(WireError::BadMessageType),
        };
        if b[1..4] != [0, 0, 0] {
            return Err(WireError::BadReserved);
        }
        if !ok {
            return Err(WireError::BadLength);
        }
        Ok(Self { buf, ty })
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buf
    }

    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }

    fn u32_at(&self, at: usize) -> u32 {
        let b = self.b();
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// The message type.
    pub fn message_type(&self) -> MessageType {
        self.ty
    }

    /// The whole message.
    pub fn as_bytes(&self) -> &[u8] {
        self.b()
    }

    /// The sender's index (types 1 and 2).
    pub fn sender_index(&self) -> Option<u32> {
        match self.ty {
            MessageType::HandshakeInit | MessageType::HandshakeResp => Some(self.u32_at(4)),
            MessageType::CookieReply | MessageType::Data => None,
        }
    }

    /// Our index chosen at handshake time, which the sender echoes (types 2, 3 and 4): the
    /// key for demultiplexing a datagram to a session.
    pub fn receiver_index(&self) -> Option<u32> {
        match self.ty {
            MessageType::HandshakeInit => None,
            MessageType::HandshakeResp => Some(self.u32_at(8)),
            MessageType::CookieReply | MessageType::Data => Some(self.u32_at(4)),
        }
    }

    /// The nonce counter of a transport data message.
    pub fn counter(&self) -> Option<u64> {
        if self.ty != MessageType::Data {
            return None;
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&self.b()[8..16]);
        Some(u64::from_le_bytes(c))
    }

    /// The encrypted packet and tag of a transport data message.
    pub fn encrypted_payload(&self) -> Option<&[u8]> {
        (self.ty == MessageType::Data).then(|| &self.b()[DATA_HEADER_LEN..])
    }

    /// The plaintext length a transport data message decrypts to (padding included).
    pub fn plaintext_len(&self) -> Option<usize> {
        (self.ty == MessageType::Data).then(|| self.b().len() - DATA_MIN_LEN)
    }

    /// `mac1` and `mac2` of a handshake message (types 1 and 2), the last 32 bytes.
    pub fn macs(&self) -> Option<(&[u8], &[u8])> {
        match self.ty {
            MessageType::HandshakeInit | MessageType::HandshakeResp => {
                let b = self.b();
                let n = b.len();
                Some((&b[n - 32..n - 16], &b[n - 16..]))
            }
            MessageType::CookieReply | MessageType::Data => None,
        }
    }
}

/// The receiver index of a type 2/3/4 message without building a view: the demux fast path.
/// `None` for a type 1 message or anything [`WgMessage::new_checked`] would reject.
pub fn peek_receiver_index(datagram: &[u8]) -> Option<u32> {
    WgMessage::new_checked(datagram).ok()?.receiver_index()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u8, len: usize) -> Vec<u8> {
        let mut m = vec![0u8; len];
        m[0] = ty;
        for (i, b) in m.iter_mut().enumerate().skip(4) {
            *b = i as u8;
        }
        m
    }

    #[test]
    fn sizes_and_fields() {
        let init = msg(1, 148);
        let v = WgMessage::new_checked(&init[..]).unwrap();
        assert_eq!(v.message_type(), MessageType::HandshakeInit);
        assert_eq!(v.sender_index(), Some(0x0706_0504));
        assert_eq!(v.receiver_index(), None);
        let (m1, m2) = v.macs().unwrap();
        assert_eq!(m1[0], 116);
        assert_eq!(m2[15], 147);

        let resp = msg(2, 92);
        let v = WgMessage::new_checked(&resp[..]).unwrap();
        assert_eq!(v.sender_index(), Some(0x0706_0504));
        assert_eq!(v.receiver_index(), Some(0x0b0a_0908));
        assert_eq!(v.counter(), None);

        let cookie = msg(3, 64);
        assert_eq!(peek_receiver_index(&cookie), Some(0x0706_0504));

        let data = msg(4, 32 + 1400);
        let v = WgMessage::new_checked(&data[..]).unwrap();
        assert_eq!(v.receiver_index(), Some(0x0706_0504));
        assert_eq!(v.counter(), Some(0x0f0e_0d0c_0b0a_0908));
        assert_eq!(v.plaintext_len(), Some(1400));
        assert_eq!(v.encrypted_payload().unwrap().len(), 1416);
        assert_eq!(peek_receiver_index(&init), None);
    }

    #[test]
    fn rejects_wrong_sizes_types_and_reserved() {
        for (ty, len) in [(1u8, 148usize), (2, 92), (3, 64)] {
            assert_eq!(
                WgMessage::new_checked(&msg(ty, len - 1)[..]).unwrap_err(),
                WireError::BadLength
            );
            assert_eq!(
                WgMessage::new_checked(&msg(ty, len + 1)[..]).unwrap_err(),
                WireError::BadLength
            );
        }
        assert_eq!(
            WgMessage::new_checked(&msg(4, 31)[..]).unwrap_err(),
            WireError::BadLength
        );
        assert!(WgMessage::new_checked(&msg(4, 32)[..]).is_ok());
        assert_eq!(
            WgMessage::new_checked(&msg(5, 32)[..]).unwrap_err(),
            WireError::BadMessageType
        );
        assert_eq!(
            WgMessage::new_checked(&msg(0, 32)[..]).unwrap_err(),
            WireError::BadMessageType
        );
        assert_eq!(
            WgMessage::new_checked(&[4u8, 0, 0][..]).unwrap_err(),
            WireError::Truncated
        );
        for i in 1..4 {
            let mut m = msg(4, 64);
            m[i] = 1;
            assert_eq!(
                WgMessage::new_checked(&m[..]).unwrap_err(),
                WireError::BadReserved
            );
        }
    }
}
