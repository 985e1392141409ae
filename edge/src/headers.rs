//! Hop-by-hop headers (RFC 9110 §7.6.1) and the forwarding headers the edge sets.
//!
//! A proxy must not forward headers that describe one connection: `Connection` and every
//! header it names, plus `Keep-Alive`, `Proxy-Authenticate`, `Proxy-Authorization`, `TE`,
//! `Trailer`, `Transfer-Encoding` and `Upgrade`. The one exception is a protocol upgrade
//! (WebSocket): its `Upgrade` token must reach the other side, so [`strip_hop_by_hop`] reports
//! it and the proxy re-adds exactly `Connection: upgrade` and `Upgrade: <token>`.

use http::header::{HeaderName, HeaderValue, CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::HeaderMap;

/// `Keep-Alive` has no constant in `http`.
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection`: non-standard, sent by old clients, hop-by-hop in practice.
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The headers that are always hop-by-hop.
fn fixed_hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &CONNECTION,
        &KEEP_ALIVE,
        &http::header::PROXY_AUTHENTICATE,
        &http::header::PROXY_AUTHORIZATION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &PROXY_CONNECTION,
    ]
}

/// Whether the `Connection` headers carry the `upgrade` token and an `Upgrade` header is
/// present: the message asks for (or, on a 101, agrees to) a protocol switch.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// Whether `name` is hop-by-hop whatever `Connection` says.
pub fn is_fixed_hop_by_hop(name: &HeaderName) -> bool {
    fixed_hop_by_hop().into_iter().any(|h| h == name)
}

/// Removes every hop-by-hop header. Returns the `Upgrade` value when the message was an
/// upgrade (see [`is_upgrade`]), so the caller can restore it with [`restore_upgrade`].
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Most messages carry none: one pass over the names instead of a lookup per name.
    // (Headers named by `Connection` matter only when `Connection` itself is present.)
    if !headers.keys().any(is_fixed_hop_by_hop) {
        return None;
    }
    let upgrade = if is_upgrade(headers) {
        headers.get(UPGRADE).cloned()
    } else {
        None
    };
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    for name in fixed_hop_by_hop() {
        headers.remove(name);
    }
    upgrade
}

/// Puts back the two headers of a protocol switch after [`strip_hop_by_hop`].
pub fn restore_upgrade(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, upgrade);
}

/// The comma-separated tokens of every `Connection` header line, trimmed, empty ones skipped.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "close, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic Zm9v"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("content-type", "text/plain"),
            ("x-keep", "yes"),
        ]);
        assert_eq!(strip_hop_by_hop(&mut h), None);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["content-type", "x-keep"]);
    }

    #[test]
    fn reports_an_upgrade_and_restores_only_its_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let up = strip_hop_by_hop(&mut h).unwrap();
        assert_eq!(up, "websocket");
        assert!(!h.contains_key(UPGRADE));
        restore_upgrade(&mut h, up);
        assert_eq!(h.get(CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(UPGRADE).unwrap(), "websocket");
        assert!(h.contains_key("sec-websocket-key"));
        assert!(!h.contains_key("keep-alive"));
    }

    #[test]
    fn upgrade_header_without_connection_token_is_not_an_upgrade() {
        let mut h = map(&[("upgrade", "websocket"), ("connection", "keep-alive")]);
        assert!(!is_upgrade(&h));
        assert_eq!(strip_hop_by_hop(&mut h), None);
        assert!(h.is_empty());
    }

    #[test]
    fn invalid_names_in_connection_are_ignored() {
        let mut h = map(&[("connection", "bad name, ,x-a"), ("x-a", "1"), ("x-b", "2")]);
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-a"));
        assert!(h.contains_key("x-b"));
    }
}
