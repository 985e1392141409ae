//! Fuzz the policy parser: a JSON policy document compiles or is refused with an error,
//! never a panic; a port selector (`:PORTS` suffix) parses to a normalized set (sorted,
//! disjoint, non-adjacent ranges) that holds exactly the ports the text names, or is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_api::PolicyDocument;
use tabbify_control::policy::Policy;
use tabbify_control::ports::PortSet;

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
});
