//! Relay tokens: short-lived admissions to a relay that the coordinator mints for a member
//! (`POST /v1/relay/token`), for clients that cannot present their mesh certificate to the
//! relay (a TLS-terminating proxy in the way, a client library without client
//! certificates). A relay that is a separate process verifies a token offline with the
//! coordinator's Ed25519 public key (`tabbify-mesh-relay --token-key PATH`); it never calls
//! the coordinator.
//!
//! Decision: Ed25519 (RFC 8032, `ring`, already linked for TLS) over a fixed binary
//! layout, not JWT or PASETO: one algorithm, no header to negotiate, a parser small enough
//! to fuzz (`control/fuzz` target `relay_token`).
//!
//! Wire layout (all big endian), the token being `base64url-nopad(payload ‖ signature)`:
//!
//! ```text
//! payload = [version = 1] [issued_at: u64 unix s] [expires_at: u64 unix s]
//!           [WireGuard public key: 32] [identity length: u8 (1..=64)] [identity: utf-8]
//! signature = Ed25519(key, "tabbify relay token v1\0" ‖ payload)   (64 bytes)
//! ```
//!
//! Invariants of [`verify`]: the signature is checked before any claim is believed;
//! a token is refused when `now ≥ expires_at`, when it claims to live longer than
//! [`MAX_TTL_SECS`], or when it was issued more than [`MAX_SKEW_SECS`] in the future.
//! The token binds the member's identity **and** WireGuard key: a relay admitting by
//! token still requires the proof of possession of that same key, so a token copied by
//! another member (or stolen) opens no session for any other key.

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// The longest a token may live, seconds.
pub const MAX_TTL_SECS: u64 = 600;
/// Clock difference tolerated between the coordinator and a relay, seconds.
pub const MAX_SKEW_SECS: u64 = 60;
/// The longest identity a token carries (a certificate CN's limit in this mesh).
pub const MAX_IDENTITY_LEN: usize = 64;
/// The longest token string accepted (base64 of the largest payload and signature).
pub const MAX_TOKEN_LEN: usize = 256;
/// Header of an HTTP request carrying a token: `authorization: Bearer <token>`.
pub const AUTH_SCHEME: &str = "Bearer";

const VERSION: u8 = 1;
const CONTEXT: &[u8] = b"tabbify relay token v1\0";
const SIG_LEN: usize = 64;
const FIXED: usize = 1 + 8 + 8 + 32 + 1;

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The member's identity (certificate CN).
    pub identity: String,
    /// The member's WireGuard public key: the only key a session may prove.
    pub key: [u8; 32],
    /// Minted at, unix seconds.
    pub issued_at: u64,
    /// Invalid from, unix seconds.
    pub expires_at: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not base64url, wrong length, bad version or identity.
    #[error("malformed relay token")]
    Malformed,
    /// The signature does not verify under the relay's token key.
    #[error("relay token signature invalid")]
    BadSignature,
    /// Past its expiry.
    #[error("relay token expired")]
    Expired,
    /// Lifetime over the maximum, or issued in the future.
    #[error("relay token validity out of bounds")]
    BadValidity,
    /// The signing key could not be used (minting only).
    #[error("relay token key unusable")]
    Key,
}

/// The coordinator's signing key.
pub struct SigningKey(Ed25519KeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &hex32(&self.public()))
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key and its PKCS#8 document (to store).
    pub fn generate() -> Result<(Self, Vec<u8>), TokenError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| TokenError::Key)?;
        let pkcs8 = doc.as_ref().to_vec();
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// From a stored PKCS#8 document.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, TokenError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(Self)
            .map_err(|_| TokenError::Key)
    }

    /// The public key (what relays are given).
    pub fn public(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        k
    }

    /// Mints a token for `claims` (the caller chose `expires_at - issued_at ≤
    /// MAX_TTL_SECS`; longer ones would be refused by every relay).
    pub fn mint(&self, claims: &Claims) -> Result<String, TokenError> {
        let id = claims.identity.as_bytes();
        if id.is_empty() || id.len() > MAX_IDENTITY_LEN {
            return Err(TokenError::Malformed);
        }
        let mut payload = Vec::with_capacity(FIXED + id.len() + SIG_LEN);
        payload.push(VERSION);
        payload.extend_from_slice(&claims.issued_at.to_be_bytes());
        payload.extend_from_slice(&claims.expires_at.to_be_bytes());
        payload.extend_from_slice(&claims.key);
        payload.push(id.len() as u8);
        payload.extend_from_slice(id);
        let sig = self.0.sign(&signed(&payload));
        payload.extend_from_slice(sig.as_ref());
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload))
    }
}

/// The public key file format: the 32-byte key in standard base64 on one line.
pub fn encode_public(key: &[u8; 32]) -> String {
    format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// Parses [`encode_public`]'s format.
pub fn decode_public(text: &str) -> Result<[u8; 32], TokenError> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| TokenError::Malformed)?;
    v.try_into().map_err(|_| TokenError::Malformed)
}

/// Checks `token` against `public` at `now` (unix seconds); see the module invariants.
pub fn verify(token: &str, public: &[u8; 32], now: u64) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| TokenError::Malformed)?;
    if raw.len() < FIXED + 1 + SIG_LEN {
        return Err(TokenError::Malformed);
    }
    let (payload, sig) = raw.split_at(raw.len() - SIG_LEN);
    UnparsedPublicKey::new(&ED25519, public)
        .verify(&signed(payload), sig)
        .map_err(|_| TokenError::BadSignature)?;
    let claims = parse_payload(payload)?;
    if claims.expires_at <= claims.issued_at
        || claims.expires_at - claims.issued_at > MAX_TTL_SECS
        || claims.issued_at > now.saturating_add(MAX_SKEW_SECS)
    {
        return Err(TokenError::BadValidity);
    }
    if now >= claims.expires_at {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// Parses a payload (no signature check: [`verify`] does that first). Never panics.
pub fn parse_payload(p: &[u8]) -> Result<Claims, TokenError> {
    if p.len() < FIXED || p[0] != VERSION {
        return Err(TokenError::Malformed);
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[i..i + 8]);
        u64::from_be_bytes(b)
    };
    let issued_at = u64_at(1);
    let expires_at = u64_at(9);
    let mut key = [0u8; 32];
    key.copy_from_slice(&p[17..49]);
    let n = usize::from(p[49]);
    if n == 0 || n > MAX_IDENTITY_LEN || p.len() != FIXED + n {
        return Err(TokenError::Malformed);
    }
    let identity = std::str::from_utf8(&p[FIXED..])
        .map_err(|_| TokenError::Malformed)?
        .to_owned();
    Ok(Claims {
        identity,
        key,
        issued_at,
        expires_at,
    })
}

fn signed(payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + payload.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(payload);
    m
}

fn hex32(k: &[u8; 32]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn claims(now: u64) -> Claims {
        Claims {
            identity: "n1".into(),
            key: [7; 32],
            issued_at: now,
            expires_at: now + 300,
        }
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let (k, pkcs8) = SigningKey::generate().unwrap();
        let again = SigningKey::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(k.public(), again.public());
        let t = k.mint(&claims(1000)).unwrap();
        assert!(t.len() <= MAX_TOKEN_LEN);
        assert_eq!(verify(&t, &k.public(), 1000).unwrap(), claims(1000));
        assert_eq!(verify(&t, &k.public(), 1299).unwrap().identity, "n1");
        assert_eq!(verify(&t, &k.public(), 1300), Err(TokenError::Expired));
        assert_eq!(
            decode_public(&encode_public(&k.public())).unwrap(),
            k.public()
        );
    }

    #[test]
    fn forged_tampered_overlong_and_future_tokens_are_refused() {
        let (k, _) = SigningKey::generate().unwrap();
        let (other, _) = SigningKey::generate().unwrap();
        let t = other.mint(&claims(1000)).unwrap();
        assert_eq!(
            verify(&t, &k.public(), 1000),
            Err(TokenError::BadSignature),
            "signed by another key"
        );
        // Flip a bit of the key claim: the signature no longer covers it.
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k.mint(&claims(1000)).unwrap())
            .unwrap();
        raw[20] ^= 1;
        let tampered = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(
            verify(&tampered, &k.public(), 1000),
            Err(TokenError::BadSignature)
        );
        let long = Claims {
            expires_at: 1000 + MAX_TTL_SECS + 1,
            ..claims(1000)
        };
        assert_eq!(
            verify(&k.mint(&long).unwrap(), &k.public(), 1000),
            Err(TokenError::BadValidity)
        );
        let future = claims(5000);
        assert_eq!(
            verify(&k.mint(&future).unwrap(), &k.public(), 1000),
            Err(TokenError::BadValidity)
        );
        for junk in ["", "!!!", "AAAA", &"A".repeat(MAX_TOKEN_LEN + 1)] {
            assert_eq!(
                verify(junk, &k.public(), 1000),
                Err(TokenError::Malformed),
                "{junk}"
            );
        }
        assert!(parse_payload(&[1; 10]).is_err());
        assert!(k
            .mint(&Claims {
                identity: String::new(),
                ..claims(1)
            })
            .is_err());
    }
}
