//! Fuzz the wg-quick parser (AllowedPortsOut/In included): never panic; whatever parses
//! must print and parse back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_engine::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = Config::parse(&text) {
        let again = Config::parse(&c.to_string()).expect("printed config parses");
        assert_eq!(again.interface, c.interface);
        assert_eq!(again.peers, c.peers);
        for p in &c.peers {
            // The port rules always make a filter (or none): total over any parsed input.
            let _ = p.port_filter();
        }
    }
});
