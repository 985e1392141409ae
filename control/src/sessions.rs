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
//! Sessions live in this coordinator's memory: a coordinator of an active-active pair on
//! one PostgreSQL database does not accept a session another opened, and a restart logs
//! every browser out (see `control/README.md`, "Dashboard").

use std::collections::HashMap;

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

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

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
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

#[derive(Debug, Clone)]
struct Link {
    admin: String,
    expires_ms: u64,
}

/// Why a login link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Unknown: never minted, already used, or forgotten.
    #[error("this login link is not valid or was used already; mint a new one")]
    Unknown,
    /// Minted but expired.
    #[error("this login link has expired; mint a new one")]
    Expired,
}

/// Login links and sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    links: HashMap<[u8; 32], Link>,
    sessions: HashMap<[u8; 32], Session>,
}

impl Sessions {
    /// Records a login link for `admin` valid for `ttl_secs`; returns its secret
    /// (`tml_…`) and its expiry (ms).
    pub fn mint_link(&mut self, admin: &str, ttl_secs: u64, now_ms: u64) -> (String, u64) {
        self.sweep(now_ms);
        if self.links.len() >= MAX_LINKS {
            evict_oldest(&mut self.links, |l| l.expires_ms);
        }
        let token = format!("{LINK_PREFIX}{}", secret());
        let expires_ms = now_ms + ttl_secs * 1000;
        self.links.insert(
            hash(&token),
            Link {
                admin: admin.to_owned(),
                expires_ms,
            },
        );
        (token, expires_ms)
    }

    /// Spends a login link: opens a session and returns its id (the cookie value) and the
    /// session. The link is removed whatever the outcome.
    pub fn redeem(&mut self, token: &str, now_ms: u64) -> Result<(String, Session), LinkError> {
        let link = self.links.remove(&hash(token)).ok_or(LinkError::Unknown)?;
        if now_ms >= link.expires_ms {
            return Err(LinkError::Expired);
        }
        self.sweep(now_ms);
        if self.sessions.len() >= MAX_SESSIONS {
            evict_oldest(&mut self.sessions, |s| s.expires_ms);
        }
        let id = secret();
        let session = Session {
            admin: link.admin,
            csrf: secret(),
            expires_ms: now_ms + SESSION_TTL_SECS * 1000,
        };
        self.sessions.insert(hash(&id), session.clone());
        Ok((id, session))
    }

    /// The live session with this id, if any.
    pub fn get(&self, id: &str, now_ms: u64) -> Option<&Session> {
        self.sessions
            .get(&hash(id))
            .filter(|s| now_ms < s.expires_ms)
    }

    /// Ends a session; `true` if it existed.
    pub fn logout(&mut self, id: &str) -> bool {
        self.sessions.remove(&hash(id)).is_some()
    }

    /// Forgets expired links and sessions.
    pub fn sweep(&mut self, now_ms: u64) {
        self.links.retain(|_, l| now_ms < l.expires_ms);
        self.sessions.retain(|_, s| now_ms < s.expires_ms);
    }

    /// (unredeemed links, sessions) held.
    pub fn counts(&self) -> (usize, usize) {
        (self.links.len(), self.sessions.len())
    }
}

fn evict_oldest<V>(map: &mut HashMap<[u8; 32], V>, expiry: impl Fn(&V) -> u64) {
    if let Some(k) = map.iter().min_by_key(|(_, v)| expiry(v)).map(|(k, _)| *k) {
        map.remove(&k);
    }
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

    #[test]
    fn a_link_opens_one_session_once_and_expires() {
        let mut s = Sessions::default();
        let (link, exp) = s.mint_link("admin", 60, 1_000);
        assert_eq!(exp, 61_000);
        assert!(link.starts_with(LINK_PREFIX));
        let (id, sess) = s.redeem(&link, 2_000).unwrap();
        assert_eq!(sess.admin, "admin");
        assert_eq!(s.get(&id, 3_000), Some(&sess));
        assert_eq!(s.redeem(&link, 2_001), Err(LinkError::Unknown));
        let (late, _) = s.mint_link("admin", 60, 1_000);
        assert_eq!(s.redeem(&late, 61_000), Err(LinkError::Expired));
        assert_eq!(s.redeem(&late, 1_001), Err(LinkError::Unknown));
        assert!(s.get(&id, 2_000 + SESSION_TTL_SECS * 1000).is_none());
        assert!(s.logout(&id));
        assert!(s.get(&id, 3_000).is_none());
        assert!(s.get("guess", 3_000).is_none());
    }

    #[test]
    fn sessions_have_distinct_secrets_and_bounded_counts() {
        let mut s = Sessions::default();
        let mut ids = std::collections::HashSet::new();
        for i in 0..(MAX_SESSIONS + 10) {
            let (l, _) = s.mint_link("a", 60, i as u64);
            let (id, sess) = s.redeem(&l, i as u64).unwrap();
            assert_ne!(id, sess.csrf);
            assert_eq!(id.len(), 43);
            assert!(ids.insert(id));
        }
        assert_eq!(s.counts().1, MAX_SESSIONS);
        for i in 0..(MAX_LINKS + 10) {
            s.mint_link("a", 60, i as u64);
        }
        assert_eq!(s.counts().0, MAX_LINKS);
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
