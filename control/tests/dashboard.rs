//! The dashboard's access rules, played by attackers: a client without a certificate, a
//! member with a valid certificate, a browser holding a replayed, expired or logged-out
//! login, and a cross-site request without the CSRF token. Also the policy tester and the
//! admin stream.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tabbify_control::api::{SseDecoder, SseFrame};

/// Every route but the open ones, with a body where it takes one.
const CLOSED: &[(&str, &str)] = &[
    ("GET", "/metrics"),
    ("POST", "/v1/mesh/register"),
    ("POST", "/v1/mesh/heartbeat"),
    ("GET", "/v1/mesh/peers"),
    ("GET", "/v1/mesh/peers/stream"),
    ("POST", "/v1/mesh/rotate-key"),
    ("POST", "/v1/mesh/leave"),
    ("POST", "/v1/relay/token"),
    ("GET", "/v1/policy"),
    ("PUT", "/v1/policy"),
    ("POST", "/v1/policy/test"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens"),
    ("DELETE", "/v1/tokens/abc"),
    ("GET", "/v1/revocations"),
    ("DELETE", "/v1/revocations/abc"),
    ("DELETE", "/v1/mesh/peers/abc"),
    ("DELETE", "/v1/identities/n1"),
    ("POST", "/v1/identities/n1/readmit"),
    ("DELETE", "/v1/identities/n1/key"),
    ("POST", "/v1/apps/00000000-0000-0000-0000-000000000001/move"),
    ("POST", "/v1/admin/login-links"),
    ("GET", "/v1/admin/session"),
    ("GET", "/v1/admin/members"),
    ("GET", "/v1/admin/reach"),
    ("GET", "/v1/admin/stream"),
];

fn body_for(method: &str) -> Option<Bytes> {
    (method == "POST" || method == "PUT").then(|| Bytes::from("{}"))
}

/// Sends a request with extra headers and returns status, headers and JSON body.
async fn call_with(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, Value) {
    let resp = c
        .send(
            method,
            path,
            body.map(|b| Bytes::from(b.to_string())),
            headers,
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let head = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, head, v)
}

/// Mints a login link as the admin and spends it; returns the cookie header value and
/// the CSRF token.
async fn login(h: &Harness) -> (String, String) {
    let (st, v) = h.admin().post("/v1/admin/login-links", json!({})).await;
    assert_eq!(st, 200, "{v}");
    let path = v["path"].as_str().unwrap().to_owned();
    let anon = h.pki.client_with(None).at(h.addr);
    let (st, head, _) = call_with(&anon, "GET", &path, None, &[]).await;
    assert_eq!(st, 303);
    assert_eq!(head["location"], "/ui/");
    let set = head["set-cookie"].to_str().unwrap().to_owned();
    for flag in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(set.contains(flag), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();
    let (st, _, s) = call_with(
        &anon,
        "GET",
        "/v1/admin/session",
        None,
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(s["admin"], "admin");
    (cookie, s["csrf_token"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn without_a_client_certificate_only_the_open_routes_answer() {
    let h = Harness::start().await;
    let anon = h.pki.client_with(None).at(h.addr);
    // Open: a load balancer's health check, the API description, Swagger UI, the
    // dashboard's assets.
    let (st, v) = anon.get("/health").await;
    assert_eq!((st, v["status"].as_str()), (200, Some("ok")), "{v}");
    let (st, v) = anon.get("/openapi.json").await;
    assert_eq!(st, 200);
    assert!(v["paths"]["/v1/policy/test"].is_object());
    for path in [
        "/swagger-ui",
        "/swagger-ui/swagger-ui-bundle.js",
        "/ui/",
        "/ui/app.js",
    ] {
        let resp = anon.send("GET", path, None, &[]).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let resp = anon.send("GET", "/ui/", None, &[]).await.unwrap();
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    // Closed: 401 JSON, whatever the route.
    for (method, path) in CLOSED {
        let (st, v) = anon.call(method, path, body_for(method)).await.unwrap();
        assert_eq!(
            (st, v["code"].as_str()),
            (401, Some("unauthorized")),
            "{method} {path}: {v}"
        );
    }
    // A certificate from another CA is still refused at the handshake.
    let other = tabbify_control::ca::Ca::generate(
        "other-ca",
        tabbify_control::ca::Validity::days_from_now(10),
    )
    .unwrap();
    let foreign = other
        .issue_peer("n1", tabbify_control::ca::Validity::days_from_now(1))
        .unwrap();
    let c = h.pki.client_with(Some(&foreign)).at(h.addr);
    assert!(c.call("GET", "/health", None).await.is_err());
}

#[tokio::test]
async fn a_member_certificate_reaches_no_admin_route_and_mints_no_login_link() {
    let h = Harness::start().await;
    let member = h.join("n1", &["node"]).await;
    for (method, path) in [
        ("POST", "/v1/admin/login-links"),
        ("GET", "/v1/admin/members"),
        ("GET", "/v1/admin/reach"),
        ("GET", "/v1/admin/stream"),
        ("POST", "/v1/policy/test"),
    ] {
        let body = (method == "POST").then(|| {
            Bytes::from(json!({"src": "n1", "dst": "n1", "proto": "tcp", "port": 1}).to_string())
        });
        let body = if path == "/v1/admin/login-links" {
            Some(Bytes::from("{}"))
        } else {
            body
        };
        let (st, v) = member.client.call(method, path, body).await.unwrap();
        assert_eq!(
            (st, v["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}: {v}"
        );
    }
    // A member's certificate carrying a cookie it stole is still a member: the certificate
    // decides, the cookie is ignored.
    let (cookie, csrf) = login(&h).await;
    let (st, _, v) = call_with(
        &member.client,
        "GET",
        "/v1/admin/members",
        None,
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
    )
    .await;
    assert_eq!(st, 403, "{v}");
}

#[tokio::test]
async fn login_links_are_single_use_and_short_lived() {
    let h = Harness::start().await;
    let anon = h.pki.client_with(None).at(h.addr);
    let (_, v) = h
        .admin()
        .post("/v1/admin/login-links", json!({"ttl_secs": 60}))
        .await;
    let path = v["path"].as_str().unwrap().to_owned();
    let (st, _, _) = call_with(&anon, "GET", &path, None, &[]).await;
    assert_eq!(st, 303);
    // Replayed.
    let (st, head, v) = call_with(&anon, "GET", &path, None, &[]).await;
    assert_eq!((st, v["code"].as_str()), (401, Some("unauthorized")), "{v}");
    assert!(head.get("set-cookie").is_none());
    // Expired.
    let (_, v) = h
        .admin()
        .post("/v1/admin/login-links", json!({"ttl_secs": 60}))
        .await;
    let late = v["path"].as_str().unwrap().to_owned();
    h.clock.advance_ms(61_000);
    let (st, head, v) = call_with(&anon, "GET", &late, None, &[]).await;
    assert_eq!(st, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("expired"), "{v}");
    assert!(head.get("set-cookie").is_none());
    // Guessed, missing, and out-of-range lifetimes.
    let (st, _, _) = call_with(&anon, "GET", "/ui/login?link=tml_guess", None, &[]).await;
    assert_eq!(st, 401);
    let (st, _, _) = call_with(&anon, "GET", "/ui/login", None, &[]).await;
    assert_eq!(st, 400);
    for ttl in [0, 3601] {
        let (st, v) = h
            .admin()
            .post("/v1/admin/login-links", json!({"ttl_secs": ttl}))
            .await;
        assert_eq!(st, 400, "{v}");
    }
    let (_, m) = h.admin().get("/metrics").await;
    let m = m.as_str().unwrap();
    assert!(
        m.contains("tabbify_coordinator_dashboard_logins_total 1"),
        "{m}"
    );
    assert!(
        m.contains("tabbify_coordinator_dashboard_login_refusals_total 3"),
        "{m}"
    );
}

#[tokio::test]
async fn a_session_needs_its_csrf_token_to_change_anything() {
    let h = Harness::start().await;
    let anon = h.pki.client_with(None).at(h.addr);
    let (cookie, csrf) = login(&h).await;
    let mint = json!({"tags": ["node"]});
    // Reads need no token.
    let (st, _, v) = call_with(&anon, "GET", "/v1/tokens", None, &[("cookie", &cookie)]).await;
    assert_eq!(st, 200, "{v}");
    // Missing and wrong tokens: 403 csrf, nothing minted.
    for headers in [
        vec![("cookie", cookie.as_str())],
        vec![("cookie", cookie.as_str()), ("x-csrf-token", "wrong")],
        vec![("cookie", cookie.as_str()), ("x-csrf-token", "")],
    ] {
        let (st, _, v) = call_with(&anon, "POST", "/v1/tokens", Some(mint.clone()), &headers).await;
        assert_eq!((st, v["code"].as_str()), (403, Some("csrf")), "{v}");
    }
    let (_, _, list) = call_with(&anon, "GET", "/v1/tokens", None, &[("cookie", &cookie)]).await;
    assert_eq!(list.as_array().unwrap().len(), 0);
    // Another session's token is wrong for this one.
    let (_, other_csrf) = login(&h).await;
    let (st, _, _) = call_with(
        &anon,
        "POST",
        "/v1/tokens",
        Some(mint.clone()),
        &[("cookie", &cookie), ("x-csrf-token", &other_csrf)],
    )
    .await;
    assert_eq!(st, 403);
    // With it: minted, and revocable.
    let auth = [("cookie", cookie.as_str()), ("x-csrf-token", csrf.as_str())];
    let (st, _, v) = call_with(&anon, "POST", "/v1/tokens", Some(mint), &auth).await;
    assert_eq!(st, 200, "{v}");
    let id = v["token_id"].as_str().unwrap().to_owned();
    let (st, _, _) = call_with(&anon, "DELETE", &format!("/v1/tokens/{id}"), None, &auth).await;
    assert_eq!(st, 200);
    // A session cannot mint login links (it would extend itself forever).
    let (st, _, v) = call_with(
        &anon,
        "POST",
        "/v1/admin/login-links",
        Some(json!({})),
        &auth,
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    // Nor use the member routes.
    let (st, _, _) = call_with(&anon, "GET", "/v1/mesh/peers", None, &auth).await;
    assert_eq!(st, 403);
    let (_, m) = h.admin().get("/metrics").await;
    assert!(m
        .as_str()
        .unwrap()
        .contains("tabbify_coordinator_dashboard_csrf_refusals_total 4"));
}

#[tokio::test]
async fn a_logged_out_or_expired_session_cookie_is_refused() {
    let h = Harness::start().await;
    let anon = h.pki.client_with(None).at(h.addr);
    let (cookie, csrf) = login(&h).await;
    // Logging out needs the CSRF token too (a cross-site request cannot log you out).
    let (st, _, _) = call_with(
        &anon,
        "DELETE",
        "/v1/admin/session",
        None,
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(st, 403);
    let (st, head, _) = call_with(
        &anon,
        "DELETE",
        "/v1/admin/session",
        None,
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
    )
    .await;
    assert_eq!(st, 200);
    assert!(head["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    for (method, path) in [("GET", "/v1/admin/members"), ("GET", "/v1/admin/session")] {
        let (st, _, v) = call_with(&anon, method, path, None, &[("cookie", &cookie)]).await;
        assert_eq!((st, v["code"].as_str()), (401, Some("unauthorized")), "{v}");
    }
    // A session ends on its own after its lifetime.
    let (cookie, _) = login(&h).await;
    h.clock
        .advance_ms(tabbify_control::sessions::SESSION_TTL_SECS * 1000);
    let (st, _, _) = call_with(
        &anon,
        "GET",
        "/v1/admin/members",
        None,
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(st, 401);
    // A made-up cookie is no session.
    let (st, _, _) = call_with(
        &anon,
        "GET",
        "/v1/admin/members",
        None,
        &[(
            "cookie",
            "tabbify_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )],
    )
    .await;
    assert_eq!(st, 401);
}

#[tokio::test]
async fn the_policy_tester_answers_with_the_deciding_rule() {
    let h = Harness::start().await;
    let node = h.join("n1", &["node"]).await;
    let sup = h.join("s1", &["supervisor"]).await;
    h.join("o1", &["ops"]).await;
    h.join("w1", &["worker"]).await;
    let ula = sup.registration["ula"].as_str().unwrap().to_owned();
    let test = |src: &str, dst: &str, proto: &str, port: u16| json!({"src": src, "dst": dst, "proto": proto, "port": port});
    let a = h.admin();
    // By name, by ULA, by peer id.
    let (st, v) = a
        .post("/v1/policy/test", test("n1", &ula, "tcp", 8730))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["allowed"], true);
    assert_eq!(v["rule"]["kind"], "allow");
    assert_eq!(v["rule"]["index"], 0);
    assert_eq!(v["dst_peer_id"], sup.id.as_str());
    let (_, v) = a
        .post("/v1/policy/test", test(&node.id, "s1", "tcp", 8731))
        .await;
    assert_eq!(
        (v["allowed"].as_bool(), v["rule"].is_null()),
        (Some(false), true),
        "{v}"
    );
    assert!(v["reason"].as_str().unwrap().contains("default deny"));
    // The deny rule wins and is named.
    let (_, v) = a.post("/v1/policy/test", test("o1", "w1", "tcp", 22)).await;
    assert_eq!(v["allowed"], false, "{v}");
    assert_eq!(
        (v["rule"]["kind"].as_str(), v["rule"]["index"].as_u64()),
        (Some("deny"), Some(0))
    );
    let (_, v) = a.post("/v1/policy/test", test("o1", "w1", "udp", 23)).await;
    assert_eq!(v["allowed"], true, "{v}");
    // Bad input: 4xx JSON.
    let (st, v) = a
        .post("/v1/policy/test", test("nobody", "s1", "tcp", 1))
        .await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
    let (st, v) = a.post("/v1/policy/test", test("n1", "s1", "icmp", 1)).await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")));
    let (st, _) = a
        .post(
            "/v1/policy/test",
            json!({"src": "n1", "dst": "s1", "proto": "tcp", "port": 70000}),
        )
        .await;
    assert_eq!(st, 400);
    // Who may reach whom agrees: node -> supervisor on 8730.
    let (_, r) = a.get("/v1/admin/reach").await;
    let class_of = |id: &str| {
        r["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["members"].as_array().unwrap().iter().any(|m| m == id))
            .unwrap()["id"]
            .clone()
    };
    let (cn, cs) = (class_of(&node.id), class_of(&sup.id));
    assert!(
        r["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["from"] == cn && e["to"] == cs && e["ports"] == "8730"),
        "{r}"
    );
    assert!(!r["edges"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["from"] == cs && e["to"] == cn));
}

async fn next_admin_frame(
    body: &mut hyper::body::Incoming,
    dec: &mut SseDecoder,
    pending: &mut std::collections::VecDeque<SseFrame>,
) -> SseFrame {
    loop {
        if let Some(f) = pending.pop_front() {
            return f;
        }
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("admin stream frame in time")
            .expect("stream open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            pending.extend(dec.feed(&data).unwrap());
        }
    }
}

#[tokio::test]
async fn the_admin_stream_shows_members_arrive_and_leave_live() {
    let h = Harness::start().await;
    let anon = h.pki.client_with(None).at(h.addr);
    let (cookie, csrf) = login(&h).await;
    let resp = anon
        .send("GET", "/v1/admin/stream", None, &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut dec = SseDecoder::new();
    let mut pending = Default::default();
    let n1 = h.join("n1", &["node"]).await;
    let f = next_admin_frame(&mut body, &mut dec, &mut pending).await;
    assert_eq!(f.event, "member");
    let m: Value = serde_json::from_str(&f.data).unwrap();
    assert_eq!(m["peer_id"], n1.id.as_str());
    assert_eq!(m["tags"], json!(["node"]));
    // Revoked through the session: the stream says so.
    let (st, _, _) = call_with(
        &anon,
        "DELETE",
        &format!("/v1/mesh/peers/{}", n1.id),
        None,
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
    )
    .await;
    assert_eq!(st, 200);
    let f = next_admin_frame(&mut body, &mut dec, &mut pending).await;
    assert_eq!(f.event, "member_remove");
    assert!(f.data.contains(&n1.id));
    let (_, _, v) = call_with(
        &anon,
        "GET",
        "/v1/admin/members",
        None,
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(v["members"].as_array().unwrap().len(), 0);
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// Traffic reports, played by a member with a valid certificate: an oversized report is
/// refused naming the field; peers outside its roster (and itself) are dropped before the
/// dashboard sees them; a member heartbeating in a loop gets at most one dashboard update
/// per heartbeat interval, while the members list always has its latest report.
#[tokio::test]
async fn traffic_reports_reach_the_dashboard_filtered_and_throttled() {
    let h = Harness::start().await;
    let anon = h.pki.client_with(None).at(h.addr);
    let (cookie, _csrf) = login(&h).await;
    let resp = anon
        .send("GET", "/v1/admin/stream", None, &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut dec = SseDecoder::new();
    let mut pending = Default::default();
    let sup = h.join("sup", &["supervisor"]).await;
    let iso = h.join("iso", &["isolated"]).await;
    let n1 = h.join("n1", &["node"]).await;
    for _ in 0..3 {
        let f = next_admin_frame(&mut body, &mut dec, &mut pending).await;
        assert_eq!(f.event, "member", "{}", f.data);
    }
    let peer = |id: &str, rx: u64| {
        json!({"peer_id": id, "rx_bytes": rx, "tx_bytes": rx + 1,
               "last_handshake_secs": 4, "path": "direct"})
    };
    // More than MAX_TRAFFIC_PEERS entries: 400 naming the field, nothing kept.
    let many: Vec<Value> = (0..=tabbify_control::api::MAX_TRAFFIC_PEERS)
        .map(|i| peer(&format!("p{i}"), 1))
        .collect();
    let (st, v) = n1
        .heartbeat(json!({"traffic": {"rx_bytes": 1, "tx_bytes": 1, "peers": many}}))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("traffic.peers"),
        "{v}"
    );
    // A report naming a visible peer, an invisible one, itself and an unknown id (with
    // the registered endpoint: the member itself does not change).
    let report = |rx: u64| {
        json!({"endpoints": ["127.0.0.1:51820"],
               "traffic": {"rx_bytes": rx, "tx_bytes": 2 * rx, "peers": [
            peer(&iso.id, 666), peer(&n1.id, 777), peer("not-a-member", 888), peer(&sup.id, rx)
        ]}})
    };
    assert_eq!(n1.heartbeat(report(100)).await.0, 200);
    let f = next_admin_frame(&mut body, &mut dec, &mut pending).await;
    assert_eq!(f.event, "traffic", "{}", f.data);
    let ev: tabbify_control::api::TrafficEvent = serde_json::from_str(&f.data).unwrap();
    assert_eq!(ev.peer_id, n1.id);
    assert_eq!(ev.traffic.report.rx_bytes, 100);
    let kept: Vec<&str> = ev
        .traffic
        .report
        .peers
        .iter()
        .map(|p| p.peer_id.as_str())
        .collect();
    assert_eq!(kept, [sup.id.as_str()], "only peers in n1's roster");
    assert_eq!(ev.traffic.report.peers[0].last_handshake_secs, Some(4));
    // Heartbeats in a loop within one interval (under the rate limit): the latest
    // report is held…
    for rx in 101..106 {
        assert_eq!(n1.heartbeat(report(rx)).await.0, 200);
    }
    let (_, _, v) = call_with(
        &anon,
        "GET",
        "/v1/admin/members",
        None,
        &[("cookie", &cookie)],
    )
    .await;
    let m = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["peer_id"] == n1.id.as_str())
        .unwrap();
    assert_eq!(m["traffic"]["rx_bytes"], 105, "{m}");
    assert_eq!(m["traffic"]["peers"].as_array().unwrap().len(), 1, "{m}");
    let others = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["peer_id"] != n1.id.as_str());
    for o in others {
        assert!(o.get("traffic").is_none(), "no report, no traffic: {o}");
    }
    // …and the next frame after the interval carries it; a member change that follows
    // comes next (the storm queued no further traffic frames).
    h.clock.advance_ms(10_000);
    assert_eq!(n1.heartbeat(report(120)).await.0, 200);
    let f = next_admin_frame(&mut body, &mut dec, &mut pending).await;
    assert_eq!(f.event, "traffic", "{}", f.data);
    let ev: tabbify_control::api::TrafficEvent = serde_json::from_str(&f.data).unwrap();
    assert_eq!(ev.traffic.report.rx_bytes, 120);
    let n2 = h.join("n2", &["node"]).await;
    let f = next_admin_frame(&mut body, &mut dec, &mut pending).await;
    assert_eq!(f.event, "member", "{}", f.data);
    assert!(f.data.contains(&n2.id));
    // The member frame of a reporting member carries its report.
    let (st, _) = n1
        .heartbeat(json!({"endpoints": ["127.0.0.1:41000"]}))
        .await;
    assert_eq!(st, 200);
    let f = next_admin_frame(&mut body, &mut dec, &mut pending).await;
    assert_eq!(f.event, "member", "{}", f.data);
    let m: Value = serde_json::from_str(&f.data).unwrap();
    assert_eq!(m["traffic"]["rx_bytes"], 120, "{m}");
}
