//! Where a request for an app goes: the app's socket address.
//!
//! Production derives `[app_ula]:8730` from the app UUID with the shared function in
//! `tabbify_api::ula`, so the edge and the supervisor agree with no lookup. Tests and the
//! benchmark replace it with loopback addresses; nothing else in the edge knows the difference.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use http::HeaderValue;
use tabbify_api::ula::{app_ula, APP_PORT};
use uuid::Uuid;

/// Resolves an app UUID to the address of its runner.
#[derive(Clone, Debug, Default)]
pub enum Upstream {
    /// `[app_ula(uuid)]:8730`, reached through the mesh (production).
    #[default]
    AppUla,
    /// Every app at one address (the hidden `--upstream-override`, for benchmarks and tests).
    Fixed(SocketAddr),
    /// A fixed table of apps; an app missing from it is unreachable (tests with several apps).
    Table(Arc<HashMap<Uuid, SocketAddr>>),
}

impl Upstream {
    /// The address of `app`'s runner, or `None` when this resolver knows no such app.
    pub fn resolve(&self, app: &Uuid) -> Option<SocketAddr> {
        match self {
            Upstream::AppUla => Some(SocketAddr::V6(SocketAddrV6::new(
                app_ula(app),
                APP_PORT,
                0,
                0,
            ))),
            Upstream::Fixed(addr) => Some(*addr),
            Upstream::Table(table) => table.get(app).copied(),
        }
    }
}

/// The `Host` value (and URI authority) for `addr`, exactly as `addr.to_string()` writes it
/// (`a.b.c.d:port`, `[v6]:port` in RFC 5952 form), but digit by digit: every request renders
/// one, and the formatter machinery costs more than the request's own work.
pub fn host_header(addr: SocketAddr) -> HeaderValue {
    let mut s = BytesMut::with_capacity(48);
    let scoped = matches!(addr, SocketAddr::V6(v6) if v6.scope_id() != 0);
    match addr.ip() {
        IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    s.put_u8(b'.');
                }
                put_decimal(&mut s, u32::from(octet));
            }
        }
        IpAddr::V6(ip) if scoped || ip.to_ipv4_mapped().is_some() => {
            // `::ffff:a.b.c.d` and scoped forms: rare, left to the formatter.
            let text = addr.to_string();
            return HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""));
        }
        IpAddr::V6(ip) => {
            let groups = ip.segments();
            // RFC 5952 §4.2: the longest run of two or more zero groups (the first on a tie)
            // becomes `::`.
            let (mut best, mut best_len, mut run, mut run_len) = (0, 0, 0, 0);
            for (i, g) in groups.iter().enumerate() {
                if *g == 0 {
                    if run_len == 0 {
                        run = i;
                    }
                    run_len += 1;
                    if run_len > best_len {
                        (best, best_len) = (run, run_len);
                    }
                } else {
                    run_len = 0;
                }
            }
            s.put_u8(b'[');
            let mut i = 0;
            while i < groups.len() {
                if best_len >= 2 && i == best {
                    s.put_slice(b"::");
                    i += best_len;
                    continue;
                }
                if i > 0 && !(best_len >= 2 && i == best + best_len) {
                    s.put_u8(b':');
                }
                put_hex(&mut s, groups[i]);
                i += 1;
            }
            s.put_u8(b']');
        }
    }
    s.put_u8(b':');
    put_decimal(&mut s, u32::from(addr.port()));
    // Only digits, hex letters, dots, colons and brackets: always a valid header value.
    HeaderValue::from_maybe_shared(s.freeze()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn put_decimal(s: &mut BytesMut, n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    s.put_slice(&digits[i..]);
}

fn put_hex(s: &mut BytesMut, n: u16) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut started = false;
    for shift in [12u32, 8, 4, 0] {
        let nibble = usize::from((n >> shift) & 0xf);
        if nibble != 0 || started || shift == 0 {
            s.put_u8(HEX[nibble]);
            started = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_form_is_the_shared_app_ula_on_port_8730() {
        let app = Uuid::parse_str("7c9e6679-7425-40de-944b-e07fc1f90ae7").unwrap();
        let addr = Upstream::AppUla.resolve(&app).unwrap();
        assert_eq!(addr.port(), 8730);
        assert_eq!(addr.ip(), std::net::IpAddr::V6(app_ula(&app)));
        assert!(tabbify_api::ula::is_app_ula(&app_ula(&app)));
    }

    #[test]
    fn host_header_round_trips_every_address_form() {
        for text in [
            "127.0.0.1:8080",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:80",
            "[fd12:3456:789a:1::ffff]:8730",
            "[::ffff:192.0.2.7]:1",
            "[1:2:3:4:5:6:7:8]:9",
            "[1:0:0:2:0:0:0:3]:9",
            "[1:0:0:2:0:0:3:4]:9",
            "[::]:1",
            "[fe80::1%2]:80",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            let host = host_header(addr);
            assert_eq!(host, addr.to_string().as_str());
            http::uri::Authority::try_from(host.as_bytes()).unwrap();
        }
        // Every placement of zero runs, and the production form.
        for bits in 0u32..256 {
            let mut groups = [0u16; 8];
            for (i, g) in groups.iter_mut().enumerate() {
                if bits & (1 << i) != 0 {
                    *g = 0x1a0 + i as u16;
                }
            }
            let addr = SocketAddr::from((std::net::Ipv6Addr::from(groups), 8730));
            assert_eq!(host_header(addr), addr.to_string().as_str(), "{groups:x?}");
        }
        let app = Uuid::from_u128(0x1234_5678);
        let addr = Upstream::AppUla.resolve(&app).unwrap();
        assert_eq!(host_header(addr), addr.to_string().as_str());
    }

    #[test]
    fn table_form_misses_unknown_apps() {
        let known = Uuid::from_u128(1);
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let up = Upstream::Table(Arc::new(HashMap::from([(known, addr)])));
        assert_eq!(up.resolve(&known), Some(addr));
        assert_eq!(up.resolve(&Uuid::from_u128(2)), None);
    }
}
