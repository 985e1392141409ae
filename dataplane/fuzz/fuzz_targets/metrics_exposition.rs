//! Fuzz the joiner's metrics (`join::metrics`) as a hostile member would drive them: its
//! display name and peer id are arbitrary bytes (as a string), and the drop counters'
//! names whatever `status` carries. Checks:
//! * `parse_bind` never panics on the input as a `--metrics-bind` value;
//! * the exposition has exactly as many lines as with a plain name (no label value can
//!   start a line or add a series), and no line other than comments carries a raw `"`
//!   outside a properly closed label value (each sample ends in ` <number>`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_dataplane::join::control::Status;
use tabbify_dataplane::join::metrics::{parse_bind, render};

fn status(name: &str, peer_id: &str, reason: &str) -> Status {
    serde_json::from_value(serde_json::json!({
        "interface": "tabbify0", "name": name, "peer_id": "p-self",
        "ula": "fd5a:1f00::1", "public_key": "k", "tags": [], "listen_port": 51820,
        "driver": "epoll", "registered": true,
        "coordinator": {"url": "https://c:1", "connected": true, "last_event_id": 1},
        "reflexive_endpoint": null, "may_host_apps": false, "hosted_apps": [],
        "peers": [{
            "peer_id": peer_id, "name": name, "ula": "fd5a:1f00::2", "tags": [],
            "public_key": "k2", "endpoint": null, "path": "direct",
            "latest_handshake": 5, "rx_bytes": 1, "tx_bytes": 2, "direct": true,
            "app_ulas": [], "ports": {"outbound": [], "inbound": []}
        }],
        "drops": {reason: 3},
    }))
    .expect("a valid status")
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_bind(&text);
    let mut parts = text.splitn(3, '\u{0}');
    let name = parts.next().unwrap_or("");
    let peer_id = parts.next().unwrap_or("p");
    let reason = parts.next().unwrap_or("r");
    // A reason equal to an engine reason merges with it; keep the line count comparable.
    let reason = format!("x{reason}");
    let plain = render(&status("n", "p", "xr"), 10);
    let out = render(&status(name, peer_id, &reason), 10);
    assert_eq!(out.lines().count(), plain.lines().count(), "{out}");
    for line in out.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').expect("name value");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
});
