//! Join tokens minted by the coordinator: 32 random bytes shown once as
//! `tmj_<base64url>`, stored only as their SHA-256 (hex). A token carries the tags (and
//! optionally the name) a joiner gets, an expiry, and a use count; single-use by default,
//! unlimited (`max_uses` 0) only when minted with an explicit `unlimited` flag, and
//! optionally bound to one identity (checked at registration).
//!
//! The secret has 256 bits of entropy, so a plain hash is enough: there is nothing to
//! brute-force, and lookup by hash needs no constant-time comparison.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::store::TokenRecord;

/// Prefix of every minted token.
pub const TOKEN_PREFIX: &str = "tmj_";
/// Longest token lifetime one may ask for.
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;

/// A fresh token secret and its hash.
pub fn generate() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hash(&token);
    (token, hash)
}

/// SHA-256 of the token string, lowercase hex.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A short, non-secret id for logs and responses.
pub fn id_of(hash: &str) -> String {
    hash.chars().take(12).collect()
}

/// Whether `rec` admits one more registration at `now_secs`.
pub fn check(rec: &TokenRecord, now_secs: u64) -> Result<(), ApiError> {
    if now_secs >= rec.expires_at {
        return Err(ApiError::TokenExpired);
    }
    if rec.max_uses != 0 && rec.uses >= rec.max_uses {
        return Err(ApiError::TokenUsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let (a, ha) = generate();
        let (b, hb) = generate();
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(hash(&a), ha);
        assert_eq!(ha.len(), 64);
        assert!(!ha.contains(&a[TOKEN_PREFIX.len()..]));
    }

    #[test]
    fn expiry_and_uses() {
        let mut r = TokenRecord {
            tags: vec![],
            name: None,
            expires_at: 10,
            max_uses: 2,
            uses: 0,
            identity: None,
            created_at: 0,
        };
        assert!(check(&r, 9).is_ok());
        assert_eq!(check(&r, 10), Err(ApiError::TokenExpired));
        r.uses = 2;
        assert_eq!(check(&r, 1), Err(ApiError::TokenUsed));
        r.max_uses = 0;
        assert!(check(&r, 1).is_ok());
    }
}
