//! Fuzz the UAPI parsers: never panic; a parsed `get` response formats and parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_engine::uapi::{format_get, parse_get, SetParser};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut set = SetParser::new();
    for line in text.split('\n') {
        if set.line(line).is_err() {
            break;
        }
    }
    let _ = set.finish();
    if let Ok(status) = parse_get(&text) {
        let again = parse_get(&format_get(&status)).expect("formatted response parses");
        assert_eq!(again, status);
    }
});
