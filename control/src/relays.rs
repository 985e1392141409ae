//! The relays the coordinator advertises: its own in-process relay (`--relay`) first, then
//! each `--relay-url`, in register and heartbeat answers; and the check that a heartbeat's
//! `home_relay` is one of them.
//!
//! A relay URL is `https://HOST:PORT` (TLS over TCP and UDP on one port; HOST is the TLS
//! server name of the relay's certificate). The URL string is the relay's identity
//! everywhere (heartbeat `home_relay`, roster `home_relay`), so URLs are normalised once
//! here (lower-case host, no path, explicit port) and compared as strings.
//!
//! The own relay's URL is `--relay-public-url` when given; otherwise it is derived per
//! request from the HTTP `Host` the client used to reach the coordinator (its host part)
//! and the relay's port, when that host is one of the names of the coordinator's
//! certificate (which the in-process relay also serves). Invariants: a derived URL is built
//! only from a host among those names, so a member cannot make the coordinator advertise,
//! or accept as its `home_relay`, a host of its choosing by sending a forged `Host` header
//! (other members would then be told to connect there); a request without a usable `Host`
//! gets no own relay in its answer (and cannot name it as `home_relay`).

use std::net::IpAddr;

use http::HeaderMap;

use crate::api::RelayInfo;

/// The relays to advertise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relays {
    /// The in-process relay, if `--relay`.
    pub own: Option<OwnRelay>,
    /// `--relay-url` values, normalised, in order.
    pub others: Vec<String>,
}

/// How the own relay's URL is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnRelay {
    /// `--relay-public-url`, normalised.
    Public(String),
    /// The request's `Host` name with this port (the port the relay is bound to), if the
    /// name is one of `names`.
    FromHost {
        /// The relay's TCP/UDP port.
        port: u16,
        /// The names the relay's certificate carries (normalised: lower-case DNS names, IP
        /// addresses as Rust prints them); [`cert_names`].
        names: Vec<String>,
    },
}

impl Relays {
    /// The relays for a request with these headers: own first, then the others, without
    /// duplicates.
    pub fn advertised(&self, headers: &HeaderMap) -> Vec<RelayInfo> {
        let own = match &self.own {
            None => None,
            Some(OwnRelay::Public(u)) => Some(u.clone()),
            Some(OwnRelay::FromHost { port, names }) => host_of(headers)
                .filter(|h| names.contains(h))
                .map(|h| url(&h, *port)),
        };
        let mut out: Vec<RelayInfo> = Vec::new();
        for u in own.into_iter().chain(self.others.iter().cloned()) {
            if !out.iter().any(|r| r.url == u) {
                out.push(RelayInfo { url: u });
            }
        }
        out
    }

    /// Whether nothing is advertised.
    pub fn is_empty(&self) -> bool {
        self.own.is_none() && self.others.is_empty()
    }
}

/// Parses and normalises a relay URL given to `flag` (`https://HOST:PORT`, nothing after
/// the port but an optional `/`); the error names the flag and what is wrong.
pub fn parse_url(flag: &str, s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("{flag} {s:?}: {why} (want https://HOST:PORT)"));
    let Some(rest) = s.strip_prefix("https://") else {
        return bad("the scheme must be https");
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return bad("no path, query or user part");
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((h, p)) = v6.split_once("]:") else {
            return bad("an IPv6 host needs brackets and a port");
        };
        (h, p)
    } else {
        match rest.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => return bad("an IPv6 host needs brackets"),
            Some(hp) => hp,
            None => return bad("the port is missing"),
        }
    };
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => return bad("the port must be 1-65535"),
    };
    match valid_host(host) {
        Some(h) => Ok(url(&h, port)),
        None => bad("the host must be a DNS name or an IP address"),
    }
}

/// The DNS and IP subject alternative names of the first certificate in `cert_pem`,
/// normalised as [`OwnRelay::FromHost::names`] wants them (empty if it does not parse).
pub fn cert_names(cert_pem: &str) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Some(Ok(der)) = rustls_pemfile::certs(&mut cert_pem.as_bytes()).next() else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => valid_host(d),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// `https://HOST:PORT` with an IPv6 host in brackets.
fn url(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// The host part of the request's `Host` header, validated and lower-cased.
fn host_of(headers: &HeaderMap) -> Option<String> {
    let h = headers.get(http::header::HOST)?.to_str().ok()?;
    let auth: http::uri::Authority = h.parse().ok()?;
    let host = auth.host();
    let host = host
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(host);
    valid_host(host)
}

/// A DNS name (letters, digits, `-`, `.`; labels of 1-63, at most 253) or an IP literal,
/// normalised; `None` otherwise.
fn valid_host(h: &str) -> Option<String> {
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    ok.then_some(h)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_validated_and_normalised() {
        let p = |s| parse_url("--relay-url", s);
        assert_eq!(
            p("https://Relay.Example.com:443/").unwrap(),
            "https://relay.example.com:443"
        );
        assert_eq!(p("https://10.0.0.1:8445").unwrap(), "https://10.0.0.1:8445");
        assert_eq!(
            p("https://[2001:DB8::1]:443").unwrap(),
            "https://[2001:db8::1]:443"
        );
        for bad in [
            "http://relay:443",
            "relay:443",
            "https://relay",
            "https://relay:0",
            "https://relay:99999",
            "https://:443",
            "https://relay:443/path",
            "https://user@relay:443",
            "https://rel ay:443",
            "https://2001:db8::1:443",
            "https://-bad-.example:443",
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.starts_with("--relay-url"), "{bad}: {e}");
        }
    }

    #[test]
    fn own_relay_first_from_the_host_header_then_the_others() {
        let r = Relays {
            own: Some(OwnRelay::FromHost {
                port: 8445,
                names: vec!["coord.example".into(), "::1".into()],
            }),
            others: vec![
                "https://b.example:443".into(),
                "https://b.example:443".into(),
            ],
        };
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, "Coord.Example:8443".parse().unwrap());
        let urls: Vec<String> = r.advertised(&h).into_iter().map(|i| i.url).collect();
        assert_eq!(
            urls,
            ["https://coord.example:8445", "https://b.example:443"]
        );
        h.insert(http::header::HOST, "[::1]:8443".parse().unwrap());
        assert_eq!(r.advertised(&h)[0].url, "https://[::1]:8445");
        // No, a malformed or a foreign Host: the own relay is left out, the others stay.
        for forged in ["evil/x:1", "evil.example:8443", "127.0.0.1:8443"] {
            h.insert(http::header::HOST, forged.parse().unwrap());
            assert_eq!(r.advertised(&h).len(), 1, "{forged}");
        }
        assert_eq!(r.advertised(&HeaderMap::new()).len(), 1);
    }

    #[test]
    fn certificate_names_are_read_and_normalised() {
        let ca = crate::ca::Ca::generate("t", crate::ca::Validity::days_from_now(1)).unwrap();
        let c = ca
            .issue_coordinator(
                "Coord.Example",
                &["10.0.0.1".into(), "2001:db8::1".into()],
                crate::ca::Validity::days_from_now(1),
            )
            .unwrap();
        let names = cert_names(&c.cert_pem);
        assert_eq!(names, ["coord.example", "10.0.0.1", "2001:db8::1"]);
        assert!(cert_names("not a pem").is_empty());
    }
}
