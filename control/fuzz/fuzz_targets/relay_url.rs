//! Fuzz the relay URL parsers (`tabbify_control::relays`): `parse_url` never panics and its
//! output is a fixed point (normalising twice changes nothing) of the form
//! `https://HOST:PORT`; a `Host` header of any bytes yields advertised URLs that parse.
#![no_main]

use http::{header, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tabbify_control::relays::{parse_url, OwnRelay, Relays};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(u) = parse_url("--relay-url", s) {
            assert!(u.starts_with("https://"));
            assert_eq!(parse_url("--relay-url", &u).as_deref(), Ok(u.as_str()));
        }
    }
    if let Ok(v) = HeaderValue::from_bytes(data) {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, v);
        let r = Relays {
            own: Some(OwnRelay::FromHost {
                port: 8445,
                names: vec!["coord.example".into(), "10.0.0.1".into(), "::1".into()],
            }),
            others: Vec::new(),
        };
        for info in r.advertised(&h) {
            assert_eq!(parse_url("x", &info.url).as_deref(), Ok(info.url.as_str()));
        }
    }
});
