//! Where a request for an app goes: the app's socket address.
//!
//! Production derives `[app_ula]:8730` from the app UUID with the shared function in
//! `tabbify_control::ula`, so the edge and the supervisor agree with no lookup. Tests and the
//! benchmark replace it with loopback addresses; nothing else in the edge knows the difference.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use http::HeaderValue;
use tabbify_control::ula::{app_ula, APP_PORT};
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

/// The `Host` value (and URI authority) for `addr`: `a.b.c.d:port` or `[h:h:h:h:h:h:h:h]:port`,
/// written digit by digit (every request renders one; no formatter). IPv6 groups are not
/// compressed, which RFC 4291 §2.2 allows.
pub fn host_header(addr: SocketAddr) -> HeaderValue {
    let mut s = BytesMut::with_capacity(48);
    match addr.ip() {
        IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    s.put_u8(b'.');
                }
                put_decimal(&mut s, u32::from(octet));
            }
        }
        IpAddr::V6(ip) => {
            s.put_u8(b'[');
            for (i, group) in ip.segments().into_iter().enumerate() {
                if i > 0 {
                    s.put_u8(b':');
                }
                put_hex(&mut s, group);
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
        assert!(tabbify_control::ula::is_app_ula(&app_ula(&app)));
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
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            let host = host_header(addr);
            let back: SocketAddr = host.to_str().unwrap().parse().unwrap();
            assert_eq!(back, addr, "{host:?}");
            http::uri::Authority::try_from(host.as_bytes()).unwrap();
        }
        let v4 = host_header("10.0.0.1:8730".parse().unwrap());
        assert_eq!(v4, "10.0.0.1:8730");
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
