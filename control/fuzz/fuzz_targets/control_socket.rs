//! Fuzz the joiner's control-socket requests (`tabbify_api::local::Request`, one JSON line
//! per connection): any line parses or is refused, never a panic, and a request that parses
//! serializes back to a line that parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_api::local::Request;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    let line = serde_json::to_string(&req).expect("a request serializes");
    assert!(!line.contains('\n'), "one line per request");
    let back: Request = serde_json::from_str(&line).expect("a serialized request parses");
    assert_eq!(back, req);
});
