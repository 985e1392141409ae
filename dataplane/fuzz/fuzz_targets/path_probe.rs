//! Fuzz the direct-path probe parser (`core::path::Probe::parse`), which sees every
//! decrypted IPv6 packet of 56 bytes: it never panics, and what it accepts is exactly the
//! packet `Probe::packet` builds for it (nothing else is taken away from the TUN).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::path::{Probe, PROBE_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(p) = Probe::parse(data) {
        assert_eq!(data.len(), PROBE_LEN);
        assert_eq!(&p.packet()[..], data);
    }
});
