//! Fuzz the netlink address-change parser (`sys::addr_watch::parse`): arbitrary bytes as
//! one datagram from the socket. Whatever the bytes, it returns without panicking, reports
//! at most one change per 24 bytes (a header and an ifaddrmsg each), and a datagram that
//! is exactly the messages it reported, re-encoded, parses to the same changes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_engine::sys::addr_watch::{parse, RTM_DELADDR, RTM_NEWADDR};

fuzz_target!(|data: &[u8]| {
    let parsed = parse(data);
    assert!(parsed.changes.len() <= data.len() / 24);
    assert!(parsed.malformed <= 1);
    let mut again = Vec::new();
    for change in &parsed.changes {
        let kind = if change.added {
            RTM_NEWADDR
        } else {
            RTM_DELADDR
        };
        again.extend_from_slice(&24u32.to_ne_bytes());
        again.extend_from_slice(&kind.to_ne_bytes());
        again.extend_from_slice(&[0; 10]);
        again.extend_from_slice(&[change.family, 0, 0, 0]);
        again.extend_from_slice(&change.ifindex.to_ne_bytes());
    }
    let reparsed = parse(&again);
    assert_eq!(reparsed.changes, parsed.changes);
    assert_eq!(reparsed.malformed, 0);
});
