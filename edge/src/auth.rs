//! The bearer key that guards `/v1/*` and `/app/*`.
//!
//! The key is kept only as a blake3 digest, and a presented token is digested the same way
//! and compared with `subtle` in constant time, so neither the bytes nor the length of the
//! key leak through response timing.

use subtle::ConstantTimeEq;
use thiserror::Error;

/// Shortest accepted key, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// Why a key was refused at start-up.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    /// The key is shorter than [`MIN_KEY_LEN`] bytes.
    #[error("the node key must be at least {MIN_KEY_LEN} bytes long")]
    TooShort,
    /// The key contains whitespace or control characters, which cannot travel in a header.
    #[error("the node key must be printable ASCII without spaces")]
    NotPrintable,
}

/// The edge's bearer key.
#[derive(Clone)]
pub struct NodeKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(<redacted>)")
    }
}

impl NodeKey {
    /// Accepts `key` if it is long enough and can be sent in an `Authorization` header.
    pub fn new(key: &str) -> Result<Self, KeyError> {
        if key.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort);
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError::NotPrintable);
        }
        Ok(NodeKey {
            digest: *blake3::hash(key.as_bytes()).as_bytes(),
        })
    }

    /// Whether `token` is the key, in time independent of both.
    pub fn matches(&self, token: &[u8]) -> bool {
        let presented = blake3::hash(token);
        bool::from(presented.as_bytes().ct_eq(&self.digest))
    }

    /// Whether an `Authorization` header value is `Bearer <key>` (scheme case-insensitive).
    pub fn authorizes(&self, header: Option<&http::HeaderValue>) -> bool {
        let Some(value) = header else {
            return false;
        };
        let bytes = value.as_bytes();
        const SCHEME: &[u8] = b"bearer ";
        if bytes.len() <= SCHEME.len() || !bytes[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
            return false;
        }
        let token = bytes[SCHEME.len()..].trim_ascii();
        self.matches(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const KEY: &str = "0123456789abcdef-key";

    #[test]
    fn refuses_short_and_unprintable_keys() {
        assert_eq!(NodeKey::new("short").unwrap_err(), KeyError::TooShort);
        assert_eq!(
            NodeKey::new("0123456789abcdef 0").unwrap_err(),
            KeyError::NotPrintable
        );
        assert!(NodeKey::new(KEY).is_ok());
    }

    #[test]
    fn bearer_header_matches_only_the_key() {
        let key = NodeKey::new(KEY).unwrap();
        let ok = HeaderValue::from_str(&format!("Bearer {KEY}")).unwrap();
        let lower = HeaderValue::from_str(&format!("bearer {KEY}")).unwrap();
        let wrong = HeaderValue::from_static("Bearer 0123456789abcdef-kex");
        let prefix = HeaderValue::from_static("Bearer 0123456789abcdef");
        let basic = HeaderValue::from_str(&format!("Basic {KEY}")).unwrap();
        assert!(key.authorizes(Some(&ok)));
        assert!(key.authorizes(Some(&lower)));
        assert!(!key.authorizes(Some(&wrong)));
        assert!(!key.authorizes(Some(&prefix)));
        assert!(!key.authorizes(Some(&basic)));
        assert!(!key.authorizes(Some(&HeaderValue::from_static("Bearer "))));
        assert!(!key.authorizes(None));
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let key = NodeKey::new(KEY).unwrap();
        assert!(!format!("{key:?}").contains("0123"));
    }
}
