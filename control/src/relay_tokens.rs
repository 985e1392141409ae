//! The coordinator's relay-token signing key and minting (`POST /v1/relay/token`).
//!
//! The key is an Ed25519 key in the state directory (`relay-token.key`, PKCS#8, mode 0600,
//! created on first start) with its public half beside it (`relay-token.pub`, base64 on
//! one line): give that file to separate relays (`tabbify-mesh-relay --token-key`). Without
//! a state directory the key is made at start and lives as long as the process (tokens
//! then verify only at the in-process relay, which is given the key directly).
//!
//! Invariants: a token names the caller's identity and the WireGuard key registered for
//! it (never a key from the request); it lives [`TOKEN_TTL_SECS`] (within
//! [`MAX_TTL_SECS`](tabbify_api::relay_token::MAX_TTL_SECS)).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use tabbify_api::relay_token::{encode_public, Claims, SigningKey};

use crate::api::RelayTokenResponse;
use crate::registry::PeerRecord;

/// How long a minted token lives, seconds (5 minutes: a joiner fetches a new one before
/// each relay connection; a leaked one is soon useless, and useless to any other key).
pub const TOKEN_TTL_SECS: u64 = 300;
/// The private key file in the state directory.
pub const KEY_FILE: &str = "relay-token.key";
/// The public key file in the state directory.
pub const PUBLIC_FILE: &str = "relay-token.pub";

/// Loads the signing key from `dir`, creating it (and the public file) on first use.
pub fn load_or_create(dir: &Path) -> anyhow::Result<Arc<SigningKey>> {
    use anyhow::Context;
    let path = dir.join(KEY_FILE);
    let key = match std::fs::read(&path) {
        Ok(der) => SigningKey::from_pkcs8(&der)
            .with_context(|| format!("{}: not an Ed25519 PKCS#8 key", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let (key, der) = SigningKey::generate().map_err(anyhow::Error::msg)?;
            let tmp = dir.join(format!("{KEY_FILE}.tmp"));
            {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                f.write_all(&der)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)?;
            key
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // The public file is derived: rewrite it whenever it is missing or different.
    let public = encode_public(&key.public());
    let pub_path = dir.join(PUBLIC_FILE);
    if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(public.as_str()) {
        std::fs::write(&pub_path, &public)
            .with_context(|| format!("writing {}", pub_path.display()))?;
    }
    Ok(Arc::new(key))
}

/// Mints a token for `peer` at `now` (unix seconds).
pub fn mint(
    key: &SigningKey,
    peer: &PeerRecord,
    now: u64,
) -> Result<RelayTokenResponse, tabbify_api::relay_token::TokenError> {
    let claims = Claims {
        identity: peer.identity.clone(),
        key: peer.key,
        issued_at: now,
        expires_at: now + TOKEN_TTL_SECS,
    };
    Ok(RelayTokenResponse {
        token: key.mint(&claims)?,
        expires_at: claims.expires_at,
        public_key: peer.key_b64.clone(),
        signing_key: encode_public(&key.public()).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_key_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
        let text = std::fs::read_to_string(dir.path().join(PUBLIC_FILE)).unwrap();
        assert_eq!(
            tabbify_api::relay_token::decode_public(&text).unwrap(),
            a.public()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the private key is not readable by others");
    }
}
