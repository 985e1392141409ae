//! Fuzz the speedtest responder's request parser (`join::speedtest::TestRequest::parse`),
//! the first 12 bytes any member the policy admits sends to `[ULA]:8731`: it never panics,
//! what it accepts encodes back to the same bytes, and the duration it grants never exceeds
//! the maximum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_dataplane::join::speedtest::{TestRequest, MAX_DURATION, MAX_PINGS};

fuzz_target!(|data: &[u8]| {
    let Ok(b) = <[u8; 12]>::try_from(data.get(..12).unwrap_or(&[])) else {
        return;
    };
    if let Ok(r) = TestRequest::parse(&b) {
        assert_eq!(r.encode(), b);
        assert!(r.pings <= MAX_PINGS);
        assert!(r.granted(MAX_DURATION) <= MAX_DURATION);
    }
});
