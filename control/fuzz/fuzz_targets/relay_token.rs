//! Fuzz the relay-token parser (`tabbify_api::relay_token`): no input panics `verify` or
//! `parse_payload`; a payload that parses has an identity of 1..=64 bytes; a token signed
//! with a key verifies only under that key, and any bit flip of it is refused.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tabbify_api::relay_token::{self, Claims, SigningKey};

fn key() -> &'static SigningKey {
    static K: OnceLock<SigningKey> = OnceLock::new();
    K.get_or_init(|| SigningKey::generate().expect("key").0)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = relay_token::parse_payload(data) {
        assert!(!c.identity.is_empty() && c.identity.len() <= relay_token::MAX_IDENTITY_LEN);
    }
    let k = key();
    if let Ok(s) = std::str::from_utf8(data) {
        // `k` is made at run time: no input can carry its signature.
        assert!(relay_token::verify(s, &k.public(), 1_000).is_err());
    }
    // Mint from the input's bytes and check the round trip and a flipped bit.
    if data.len() >= 33 {
        let mut wg = [0u8; 32];
        wg.copy_from_slice(&data[..32]);
        let identity = String::from_utf8_lossy(&data[32..data.len().min(96)]).into_owned();
        let claims = Claims {
            identity,
            key: wg,
            issued_at: 1_000,
            expires_at: 1_300,
        };
        if let Ok(t) = k.mint(&claims) {
            assert_eq!(relay_token::verify(&t, &k.public(), 1_000), Ok(claims));
            let mut b = t.into_bytes();
            let i = usize::from(data[0]) % b.len();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let flipped = String::from_utf8(b).expect("ascii");
            assert!(relay_token::verify(&flipped, &k.public(), 1_000).is_err());
        }
    }
});
