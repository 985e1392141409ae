//! Fuzz the coordinator's identity routes as members and admins would drive them: each input
//! line picks a caller (one of four member identities, or an admin-role certificate), a
//! route (register, rotate-key, heartbeat, token mint, identity revoke/readmit/clear-key) and
//! a JSON body from the rest of the line. Invariants after every request: no panic, no 5xx,
//! every error a JSON `{error, code}`; at the end, no WireGuard key is held by two
//! identities and every registered peer's key is the one its identity has admitted.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tabbify_api::PolicyDocument;
use tabbify_control::clock::ManualClock;
use tabbify_control::server::{Config, ConnInfo, Coordinator};

const CALLERS: [&str; 5] = ["m0", "m1", "m2", "m3", "root"];
const ROUTES: [(&str, &str); 7] = [
    ("POST", "/v1/mesh/register"),
    ("POST", "/v1/mesh/rotate-key"),
    ("POST", "/v1/mesh/heartbeat"),
    ("POST", "/v1/tokens"),
    ("DELETE", "/v1/identities/m1"),
    ("POST", "/v1/identities/m1/readmit"),
    ("DELETE", "/v1/identities/m2/key"),
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy: PolicyDocument =
        serde_json::from_str(r#"{"tags":["node"],"allow":[{"src":["*"],"dst":["*"]}]}"#)
            .expect("policy");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let coord = Coordinator::new(
            Config::new(policy, "fuzz".into()),
            Arc::new(ManualClock::new(1_700_000_000_000)),
        )
        .expect("coordinator");
        for line in text.lines().take(64) {
            let mut bytes = line.bytes();
            let (Some(c), Some(r)) = (bytes.next(), bytes.next()) else {
                continue;
            };
            let caller = CALLERS[c as usize % CALLERS.len()];
            let (method, path) = ROUTES[r as usize % ROUTES.len()];
            let body = line.get(2..).unwrap_or_default().to_owned();
            let conn = ConnInfo {
                remote: SocketAddr::from(([127, 0, 0, 1], 40000)),
                local: None,
                identity: Some(caller.to_owned()),
                admin_role: caller == "root",
            };
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .expect("request");
            let resp = coord.handle(&conn, req).await;
            let status = resp.status();
            assert!(!status.is_server_error(), "{method} {path}: {status}");
            if !status.is_success() {
                use http_body_util::BodyExt;
                let b = resp.into_body().collect().await.expect("body").to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&b).expect("JSON error body");
                assert!(v["error"].is_string() && v["code"].is_string(), "{v}");
            }
        }
        coord.check_identity_invariants().expect("identity invariants");
    });
});
