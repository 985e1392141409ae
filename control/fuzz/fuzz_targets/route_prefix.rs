//! Fuzz the route prefix parser and the policy's prefix destinations: a prefix text parses
//! only in its canonical form (it prints back as the same text, host bits zero), the
//! advertisement check and CIDR subtraction never panic, and `a - b` is inside `a`,
//! disjoint from `b` and covers exactly `a` minus `b`; a rule destination is a prefix, a
//! selector, or refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_api::route::{check_advertised, Prefix};
use tabbify_control::policy::route_destination;

fn size(p: &Prefix) -> u128 {
    let width: u32 = if p.is_ipv4() { 32 } else { 128 };
    let host = width - u32::from(p.prefix_len());
    if host >= 128 {
        u128::MAX
    } else {
        1u128 << host
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = route_destination(text);
    let (a_text, b_text) = text.split_once(' ').unwrap_or((text, ""));
    let Ok(a) = a_text.parse::<Prefix>() else {
        return;
    };
    assert_eq!(a.to_string(), a_text, "non-canonical text accepted");
    let _ = check_advertised(&a);
    let Ok(b) = b_text.parse::<Prefix>() else {
        return;
    };
    let rest = a.subtract(&b);
    for r in &rest {
        assert!(a.contains(r), "{r} outside {a}");
        assert!(!r.overlaps(&b), "{r} overlaps {b}");
    }
    for w in rest.windows(2) {
        assert!(!w[0].overlaps(&w[1]), "{} overlaps {}", w[0], w[1]);
    }
    if a.prefix_len() > 0 && a.is_ipv4() == b.is_ipv4() {
        let covered: u128 = rest.iter().map(size).sum();
        let removed = a.intersect(&b).map_or(0, |i| size(&i));
        assert_eq!(covered + removed, size(&a));
    }
});
