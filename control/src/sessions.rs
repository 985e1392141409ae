//! Browser sessions of the dashboard: one-time login links an admin mints
//! (`POST /v1/admin/login-links`, `tabbify-mesh-coordinator admin-login`) and the
//! server-side sessions a redeemed link opens.
//!
//! Sans-IO: every method takes the time (`now_ms`) and the caller draws randomness from
//! [`secret`]; nothing here touches a socket or the clock.
//!
//! Invariants:
//! * Link and session secrets are 256 random bits, shown once; only their SHA-256 is kept
//!   (a leaked memory dump or log names no usable secret), so lookups need no
//!   constant-time comparison.
//! * A link opens at most one session: redeeming removes it first, so a replayed link is
//!   refused even when the first redemption is still in flight. An expired link is refused
//!   and forgotten.
//! * A session has a fixed expiry (no sliding renewal) and a CSRF token of its own, bound to
//!   it; a logged-out session is forgotten, so its cookie is refused.
//! * At most [`MAX_LINKS`] unredeemed links and [`MAX_SESSIONS`] sessions are held;
//!   expired ones are swept first, then the oldest are dropped, so memory is bounded.
//!
//! Where they are kept is a [`Backend`]: the coordinator's database when it has one
//! (`crate::store::Store`, tables `dashboard_links` and `dashboard_sessions`), so every
//! coordinator on one PostgreSQL database accepts a session any of them opened, a restart
//! logs nobody out, and a link is spent once across all of them (the delete is the
//! compare-and-set); [`Memory`] (this process only) for a coordinator without a database.
//! Expired links and sessions are purged whenever a link is minted or redeemed.

use std::collections::HashMap;

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::store::StoreError;

/// Prefix of a login link's secret.
pub const LINK_PREFIX: &str = "tml_";
/// Name of the session cookie.
pub const COOKIE: &str = "tabbify_session";
/// Header carrying the session's CSRF token on every state-changing request.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Default lifetime of a login link.
pub const DEFAULT_LINK_TTL_SECS: u64 = 600;
/// Longest lifetime of a login link.
pub const MAX_LINK_TTL_SECS: u64 = 3600;
/// Lifetime of a session opened by a link.
pub const SESSION_TTL_SECS: u64 = 8 * 3600;
/// Most unredeemed login links held.
pub const MAX_LINKS: usize = 1024;
/// Most sessions held.
pub const MAX_SESSIONS: usize = 1024;

/// A fresh 256-bit secret, base64url without padding.
pub fn secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The SHA-256 of a secret, lowercase hex: the only form in which a secret is kept.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// An open session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The admin identity (certificate CN) that minted the link.
    pub admin: String,
    /// The CSRF token bound to this session.
    pub csrf: String,
    /// When the session ends, ms since the epoch.
    pub expires_ms: u64,
}

/// Why a login link was refused, or a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Unknown: never minted, already used, or forgotten.
    #[error("this login link is not valid or was used already; mint a new one")]
    Unknown,
    /// Minted but expired.
    #[error("this login link has expired; mint a new one")]
    Expired,
    /// The database holding sessions failed; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PartialEq for LinkError {
    fn eq(&self, other: &Self) -> bool {
        matches!(
            (self, other),
            (Self::Unknown, Self::Unknown) | (Self::Expired, Self::Expired)
        )
    }
}

/// Where links and sessions are kept. Keys are [`hash`]es of the secrets.
pub trait Backend {
    /// Records a link.
    fn put_link(&mut self, hash: &str, admin: &str, expires_ms: u64) -> Result<(), StoreError>;
    /// Removes a link and returns `(admin, expires_ms)`; `None` if absent or taken by
    /// someone else first.
    fn take_link(&mut self, hash: &str) -> Result<Option<(String, u64)>, StoreError>;
    /// Records a session.
    fn put_session(&mut self, hash: &str, session: &Session) -> Result<(), StoreError>;
    /// The session with this hash, expired or not.
    fn session(&mut self, hash: &str) -> Result<Option<Session>, StoreError>;
    /// Removes a session; `true` if it existed.
    fn delete_session(&mut self, hash: &str) -> Result<bool, StoreError>;
    /// Forgets expired links and sessions, then the soonest-expiring beyond
    /// [`MAX_LINKS`] and [`MAX_SESSIONS`].
    fn sweep(&mut self, now_ms: u64) -> Result<(), StoreError>;
    /// `(unredeemed links, sessions)` held.
    fn counts(&mut self) -> Result<(usize, usize), StoreError>;
}

/// Records a login link for `admin` valid for `ttl_secs`; returns its secret (`tml_…`)
/// and its expiry (ms).
pub fn mint_link(
    b: &mut dyn Backend,
    admin: &str,
    ttl_secs: u64,
    now_ms: u64,
) -> Result<(String, u64), StoreError> {
    let token = format!("{LINK_PREFIX}{}", secret());
    let expires_ms = now_ms + ttl_secs * 1000;
    b.put_link(&hash(&token), admin, expires_ms)?;
    // Expired ones go, then over the cap the soonest-expiring.
    b.sweep(now_ms)?;
    Ok((token, expires_ms))
}

/// Spends a login link: opens a session and returns its id (the cookie value) and the
/// session. The link is removed first, whatever the outcome.
pub fn redeem(
    b: &mut dyn Backend,
    token: &str,
    now_ms: u64,
) -> Result<(String, Session), LinkError> {
    let (admin, expires_ms) = b.take_link(&hash(token))?.ok_or(LinkError::Unknown)?;
    if now_ms >= expires_ms {
        return Err(LinkError::Expired);
    }
    let id = secret();
    let session = Session {
        admin,
        csrf: secret(),
        expires_ms: now_ms + SESSION_TTL_SECS * 1000,
    };
    b.put_session(&hash(&id), &session)?;
    b.sweep(now_ms)?;
    Ok((id, session))
}

/// The live session with this id, if any.
pub fn get(b: &mut dyn Backend, id: &str, now_ms: u64) -> Result<Option<Session>, StoreError> {
    Ok(b.session(&hash(id))?.filter(|s| now_ms < s.expires_ms))
}

/// Ends a session; `true` if it existed.
pub fn logout(b: &mut dyn Backend, id: &str) -> Result<bool, StoreError> {
    b.delete_session(&hash(id))
}

#[derive(Debug, Clone)]
struct Link {
    admin: String,
    expires_ms: u64,
}

/// Links and sessions in this process's memory (a coordinator without a database).
#[derive(Debug, Default)]
pub struct Memory {
    links: HashMap<String, Link>,
    sessions: HashMap<String, Session>,
}

impl Backend for Memory {
    fn put_link(&mut self, hash: &str, admin: &str, expires_ms: u64) -> Result<(), StoreError> {
        self.links.insert(
            hash.to_owned(),
            Link {
                admin: admin.to_owned(),
                expires_ms,
            },
        );
        Ok(())
    }

    fn take_link(&mut self, hash: &str) -> Result<Option<(String, u64)>, StoreError> {
        Ok(self.links.remove(hash).map(|l| (l.admin, l.expires_ms)))
    }

    fn put_session(&mut self, hash: &str, session: &Session) -> Result<(), StoreError> {
        self.sessions.insert(hash.to_owned(), session.clone());
        Ok(())
    }

    fn session(&mut self, hash: &str) -> Result<Option<Session>, StoreError> {
        Ok(self.sessions.get(hash).cloned())
    }

    fn delete_session(&mut self, hash: &str) -> Result<bool, StoreError> {
        Ok(self.sessions.remove(hash).is_some())
    }

    fn sweep(&mut self, now_ms: u64) -> Result<(), StoreError> {
        self.links.retain(|_, l| now_ms < l.expires_ms);
        self.sessions.retain(|_, s| now_ms < s.expires_ms);
        while self.links.len() > MAX_LINKS {
            evict_oldest(&mut self.links, |l| l.expires_ms);
        }
        while self.sessions.len() > MAX_SESSIONS {
            evict_oldest(&mut self.sessions, |s| s.expires_ms);
        }
        Ok(())
    }

    fn counts(&mut self) -> Result<(usize, usize), StoreError> {
        Ok((self.links.len(), self.sessions.len()))
    }
}

fn evict_oldest<V>(map: &mut HashMap<String, V>, expiry: impl Fn(&V) -> u64) {
    if let Some(k) = map
        .iter()
        .min_by_key(|(k, v)| (expiry(v), (*k).clone()))
        .map(|(k, _)| k.clone())
    {
        map.remove(&k);
    }
}

/// Whether `id` has the shape of a session id (43 base64url characters): anything else
/// is refused without a lookup.
pub fn plausible_id(id: &str) -> bool {
    id.len() == 43
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The value of cookie `name` in a `Cookie` header's value (`a=1; b=2`).
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The `Set-Cookie` value that stores session `id` in the browser: `Secure`, `HttpOnly`,
/// `SameSite=Strict`, for the whole origin, for the session's lifetime.
pub fn set_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={SESSION_TTL_SECS}")
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each backend the coordinator uses: memory, and the SQLite database (PostgreSQL
    /// runs the same statements; `control/tests/dashboard.rs` drives it with two
    /// coordinators).
    fn backends(dir: &std::path::Path) -> Vec<(&'static str, Box<dyn Backend>)> {
        vec![
            ("memory", Box::new(Memory::default())),
            (
                "sqlite",
                Box::new(crate::store::Store::open(dir, 1).expect("sqlite store")),
            ),
        ]
    }

    #[test]
    fn a_link_opens_one_session_once_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        for (name, mut b) in backends(dir.path()) {
            let s = b.as_mut();
            let (link, exp) = mint_link(s, "admin", 60, 1_000).unwrap();
            assert_eq!(exp, 61_000);
            assert!(link.starts_with(LINK_PREFIX));
            let (id, sess) = redeem(s, &link, 2_000).unwrap();
            assert_eq!(sess.admin, "admin");
            assert_eq!(get(s, &id, 3_000).unwrap(), Some(sess.clone()), "{name}");
            assert_eq!(redeem(s, &link, 2_001).unwrap_err(), LinkError::Unknown);
            let (late, _) = mint_link(s, "admin", 60, 1_000).unwrap();
            assert_eq!(redeem(s, &late, 61_000).unwrap_err(), LinkError::Expired);
            assert_eq!(redeem(s, &late, 1_001).unwrap_err(), LinkError::Unknown);
            assert!(get(s, &id, 2_000 + SESSION_TTL_SECS * 1000)
                .unwrap()
                .is_none());
            assert!(logout(s, &id).unwrap());
            assert!(!logout(s, &id).unwrap());
            assert!(get(s, &id, 3_000).unwrap().is_none(), "{name}");
            assert!(get(s, "guess", 3_000).unwrap().is_none());
            // Expired sessions are purged, not just refused.
            let (l, _) = mint_link(s, "admin", 60, 10_000).unwrap();
            redeem(s, &l, 10_000).unwrap();
            assert_eq!(s.counts().unwrap(), (0, 1), "{name}");
            mint_link(s, "admin", 60, 10_000 + SESSION_TTL_SECS * 1000).unwrap();
            assert_eq!(s.counts().unwrap(), (1, 0), "{name}");
        }
    }

    #[test]
    fn sessions_have_distinct_secrets_and_bounded_counts() {
        // Memory only: on SQLite 1,000 fsynced logins take most of a minute; the database's
        // cap is the same statement at a smaller scale below.
        {
            let mut m = Memory::default();
            let (name, s) = ("memory", &mut m as &mut dyn Backend);
            let mut ids = std::collections::HashSet::new();
            for i in 0..(MAX_SESSIONS + 10) {
                let (l, _) = mint_link(s, "a", 60, i as u64).unwrap();
                let (id, sess) = redeem(s, &l, i as u64).unwrap();
                assert_ne!(id, sess.csrf);
                assert_eq!(id.len(), 43);
                assert!(ids.insert(id));
            }
            assert_eq!(s.counts().unwrap().1, MAX_SESSIONS, "{name}");
            for i in 0..(MAX_LINKS + 10) {
                mint_link(s, "a", 60, i as u64).unwrap();
            }
            assert_eq!(s.counts().unwrap().0, MAX_LINKS, "{name}");
        }
    }

    #[test]
    fn the_database_keeps_the_latest_expiring_rows_up_to_the_cap() {
        use crate::storage::{dashboard, Database};
        let dir = tempfile::tempdir().unwrap();
        let mut e = Database::Sqlite(dir.path().to_owned()).open(1).unwrap();
        let e = e.as_mut();
        for i in 0..6u64 {
            let h = hash(&i.to_string());
            dashboard::put_link(e, &h, "a", 1_000 + i).unwrap();
            dashboard::put_session(e, &h, "a", "c", 2_000 + i).unwrap();
        }
        dashboard::sweep(e, 1_001, 3, 2).unwrap();
        assert_eq!(dashboard::counts(e).unwrap(), (3, 2));
        assert!(dashboard::take_link(e, &hash("5")).unwrap().is_some());
        assert!(
            dashboard::take_link(e, &hash("1")).unwrap().is_none(),
            "expired"
        );
        assert!(
            dashboard::take_link(e, &hash("2")).unwrap().is_none(),
            "over the cap"
        );
        assert!(dashboard::session(e, &hash("5")).unwrap().is_some());
        assert!(dashboard::session(e, &hash("3")).unwrap().is_none());
        // A hash that is not one is refused before any SQL sees it.
        assert!(dashboard::session(e, "x' OR '1'='1").is_err());
    }

    #[test]
    fn cookies_parse_and_carry_the_flags() {
        assert_eq!(
            cookie_value("a=1; tabbify_session=xyz; b=2", COOKIE),
            Some("xyz")
        );
        assert_eq!(cookie_value("tabbify_sessionx=1", COOKIE), None);
        let c = set_cookie("abc");
        for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(flag), "{c}");
        }
    }
}
