//! Fuzz the dashboard's credential parsing: the `Cookie` header (session ids), the
//! `x-csrf-token` header and the login link's query string, through
//! `Coordinator::handle` of an in-process coordinator with mTLS semantics (no client
//! certificate on the connection) that holds one live session.
//!
//! Invariants: every answer is a status (never a panic); an error carries the JSON error
//! body; without the live session's id in the cookie no admin route answers 2xx; a
//! change (POST) answers 2xx only when the cookie names the live session *and* the header
//! is its CSRF token; no fuzzed login link opens a session.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use tabbify_api::{ErrorBody, PolicyDocument};
use tabbify_control::clock::ManualClock;
use tabbify_control::server::{Config, ConnInfo, Coordinator};

struct World {
    rt: tokio::runtime::Runtime,
    coord: Arc<Coordinator>,
    session: String,
    csrf: String,
}

fn conn(identity: Option<&str>, admin: bool) -> ConnInfo {
    ConnInfo {
        remote: SocketAddr::from(([127, 0, 0, 1], 40000)),
        local: None,
        identity: identity.map(str::to_owned),
        admin_role: admin,
    }
}

async fn call(
    coord: &Arc<Coordinator>,
    conn: &ConnInfo,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> (u16, http::HeaderMap, Bytes) {
    let mut req = http::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        // A header value hyper would not accept never reaches the coordinator.
        if let Ok(v) = http::HeaderValue::from_bytes(v) {
            req = req.header(*k, v);
        }
    }
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let resp = coord.handle(conn, req).await;
    let status = resp.status().as_u16();
    let head = resp.headers().clone();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (status, head, bytes)
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let policy: PolicyDocument =
            serde_json::from_str(r#"{"tags":["node"],"allow":[{"src":["*"],"dst":["*"]}]}"#)
                .expect("policy");
        let coord = Coordinator::new(
            Config::new(policy, "fuzz".into()),
            Arc::new(ManualClock::new(1_700_000_000_000)),
        )
        .expect("coordinator");
        let admin = conn(Some("fuzz-admin"), true);
        let (st, _, link) = rt.block_on(call(&coord, &admin, "POST", "/v1/admin/login-links", &[], b"{}"));
        assert_eq!(st, 200);
        let link: serde_json::Value = serde_json::from_slice(&link).expect("link");
        let path = link["path"].as_str().expect("path").to_owned();
        let (st, head, _) = rt.block_on(call(&coord, &conn(None, false), "GET", &path, &[], b""));
        assert_eq!(st, 303);
        let cookie = head["set-cookie"].to_str().expect("cookie");
        let session = cookie
            .split(';')
            .next()
            .and_then(|kv| kv.split_once('='))
            .expect("session")
            .1
            .to_owned();
        let (_, _, s) = rt.block_on(call(
            &coord,
            &conn(None, false),
            "GET",
            "/v1/admin/session",
            &[("cookie", format!("tabbify_session={session}").as_bytes())],
            b"",
        ));
        let s: serde_json::Value = serde_json::from_slice(&s).expect("session");
        let csrf = s["csrf_token"].as_str().expect("csrf").to_owned();
        World {
            rt,
            coord,
            session,
            csrf,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    // Split the input: cookie header | csrf header | login query.
    let mut parts = data.splitn(3, |b| *b == 0xff);
    let cookie = parts.next().unwrap_or_default();
    let csrf = parts.next().unwrap_or_default();
    let query = parts.next().unwrap_or_default();
    let anon = conn(None, false);
    let cookie_text = String::from_utf8_lossy(cookie);
    let names_session = cookie_text.contains(w.session.as_str());
    for (method, path, body) in [
        ("GET", "/v1/admin/members", &b""[..]),
        ("POST", "/v1/tokens", &br#"{"tags":["node"]}"#[..]),
    ] {
        let (status, _, bytes) = w.rt.block_on(call(
            &w.coord,
            &anon,
            method,
            path,
            &[("cookie", cookie), ("x-csrf-token", csrf)],
            body,
        ));
        if (200..300).contains(&status) {
            assert!(names_session, "{method} {path} answered {status} without the session");
            if method != "GET" {
                assert_eq!(csrf, w.csrf.as_bytes(), "a change without the CSRF token");
            }
        } else {
            let e: ErrorBody = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("{path}: {status} without a JSON error body"));
            assert!(!e.code.is_empty());
        }
    }
    // A fuzzed login link never opens a session.
    let path = format!("/ui/login?{}", String::from_utf8_lossy(query));
    if let Ok(uri) = path.parse::<http::Uri>() {
        let (status, head, _) = w
            .rt
            .block_on(call(&w.coord, &anon, "GET", &uri.to_string(), &[], b""));
        assert_ne!(status, 303);
        assert!(head.get("set-cookie").is_none());
    }
});
