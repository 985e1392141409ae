//! Fuzz the policy parser: a JSON policy document compiles or is refused with an error,
//! never a panic; a port selector (`:PORTS` suffix) parses to a normalized set (sorted,
//! disjoint, non-adjacent ranges) that holds exactly the ports the text names, or is refused;
//! with `tcp:`/`udp:` items, each protocol's set holds its ports and the roster's split
//! (both / TCP only / UDP only) is disjoint and converts back to the same sets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_api::PolicyDocument;
use tabbify_control::policy::Policy;
use tabbify_control::ports::{PortSet, ProtoPorts};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(doc) = serde_json::from_str::<PolicyDocument>(text) {
        if let Ok(policy) = Policy::compile(doc.clone()) {
            assert_eq!(policy.document(), &doc);
        }
    }
    if let Ok(set) = PortSet::parse(text) {
        let ranges = set.ranges();
        for r in ranges {
            assert!(r.first <= r.last, "backwards range {r:?}");
        }
        for w in ranges.windows(2) {
            assert!(
                u32::from(w[0].last) + 1 < u32::from(w[1].first),
                "not normalized: {ranges:?}"
            );
        }
        // Every port a part of the text names is in the set.
        for part in text.split(',') {
            let part = part.trim();
            if part == "*" {
                assert_eq!(set, PortSet::all());
            } else if let Ok(p) = part.parse::<u16>() {
                assert!(set.contains(p), "{p} missing from {ranges:?}");
            }
        }
    }
    if let Ok(pp) = ProtoPorts::parse(text) {
        for part in text.split(',') {
            let part = part.trim();
            let (tcp, udp, rest) = match (part.strip_prefix("tcp:"), part.strip_prefix("udp:")) {
                (Some(r), _) => (true, false, r),
                (_, Some(r)) => (false, true, r),
                _ => (true, true, part),
            };
            if let Ok(p) = rest.parse::<u16>() {
                assert!(!tcp || pp.tcp.contains(p), "tcp {p} missing");
                assert!(!udp || pp.udp.contains(p), "udp {p} missing");
            }
        }
        let (both, t, u) = pp.split();
        for (a, b) in [(&both, &t), (&both, &u), (&t, &u)] {
            let mut x = a.clone();
            x.subtract(b);
            assert_eq!(&x, a, "split lists overlap");
        }
        assert_eq!(ProtoPorts::from_lists(both.ranges(), t.ranges(), u.ranges()), pp);
    }
});
