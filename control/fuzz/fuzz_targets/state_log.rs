//! Fuzz the coordinator's state-log replay (`Store::replay`): any text replays or is refused
//! with the number of a line inside it, never a panic; when a log replays, so does the log
//! without its last line, and with a torn (half-written) record appended to that, as after a
//! crash mid-append.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_control::store::Store;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines: Vec<&str> = text.lines().collect();
    match Store::replay(&lines) {
        Ok(_) => {
            lines.pop();
            assert!(
                Store::replay(&lines).is_ok(),
                "a prefix of a good log was refused"
            );
            lines.push("{\"t\":\"tok");
            assert!(
                Store::replay(&lines).is_ok(),
                "a torn final record refused the log"
            );
        }
        Err((line, _)) => assert!(line >= 1 && line <= lines.len(), "line {line} out of range"),
    }
});
