//! Issue 11 replayed in-process over mTLS, as a member with a valid certificate would: app
//! capture (a second claim on another supervisor's app), SSE stream and connection
//! exhaustion, heartbeat floods, and slow TLS handshakes. Each attack must fail with a JSON
//! refusal, a counted metric, and no change to what the other members see.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tabbify_control::api::{RosterEntry, SseEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn app(n: u128) -> (uuid::Uuid, std::net::Ipv6Addr) {
    let u = uuid::Uuid::from_u128(n);
    (u, tabbify_control::ula::app_ula(&u))
}

async fn apps_of(viewer: &Peer, id: &str) -> Vec<std::net::Ipv6Addr> {
    let (s, v) = viewer.client.get("/v1/mesh/peers").await;
    assert_eq!(s, 200, "{v}");
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["peer_id"] == id)
        .map(|e| serde_json::from_value::<RosterEntry>(e.clone()).unwrap())
        .map(|e| e.hosted_app_ulas)
        .unwrap_or_default()
}

async fn metric(h: &Harness, name: &str) -> u64 {
    let (_, v) = h.admin().get("/metrics").await;
    let text = v.as_str().unwrap().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("tabbify_coordinator_{name} ")))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// Issue 11, attack 2 (app capture): a second supervisor advertising another's app ULA is
/// refused with 409 naming the holder; the roster keeps routing the app to its holder; the
/// refused heartbeat changed nothing but the caller's liveness.
#[tokio::test]
async fn second_app_claim_is_refused_naming_the_holder() {
    let h = Harness::start().await;
    let s1 = h.join("s1", &["supervisor"]).await;
    let s2 = h.join("s2", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let (_, a) = app(1);
    let (_, b) = app(2);
    assert_eq!(s1.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 200);

    h.clock.advance_ms(25_000);
    let (st, v) = s2
        .heartbeat(json!({"endpoints": ["127.0.0.1:6000"], "hosted_app_ulas": [b, a]}))
        .await;
    assert_eq!((st, v["code"].as_str()), (409, Some("app_taken")), "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains(&s1.id) && msg.contains("s1"), "{msg}");
    // Nothing of the refused heartbeat was applied: not the other app, not the endpoints.
    assert_eq!(apps_of(&n, &s1.id).await, vec![a]);
    assert!(apps_of(&n, &s2.id).await.is_empty());
    let (_, roster) = n.client.get("/v1/mesh/peers").await;
    let e2 = roster["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["peer_id"] == s2.id)
        .unwrap()
        .clone();
    assert_eq!(e2["endpoints"], json!(["127.0.0.1:51820"]));
    assert_eq!(metric(&h, "app_claims_refused_total").await, 1);
    // ...but its liveness was: s1 goes stale after its silence, s2 does not.
    h.clock.advance_ms(6_000);
    assert_eq!(n.heartbeat(json!({})).await.0, 200);
    assert_eq!(h.coord.sweep().stale, vec![s1.id.clone()]);
    // The holder's own claim keeps working; without the contested app s2 is fine.
    assert_eq!(s1.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 200);
    assert_eq!(s2.heartbeat(json!({"hosted_app_ulas": [b]})).await.0, 200);
    assert_eq!(apps_of(&n, &s2.id).await, vec![b]);
}

/// An app is released by its holder leaving it out of a heartbeat, and by revocation.
#[tokio::test]
async fn released_apps_can_be_claimed() {
    let h = Harness::start().await;
    let s1 = h.join("s1", &["supervisor"]).await;
    let s2 = h.join("s2", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let (_, a) = app(3);
    assert_eq!(s1.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 200);
    assert_eq!(s2.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 409);
    // s1 drops it.
    assert_eq!(s1.heartbeat(json!({})).await.0, 200);
    assert_eq!(s2.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 200);
    assert_eq!(apps_of(&n, &s2.id).await, vec![a]);
    assert_eq!(s1.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 409);
    // s2 is revoked: the app is free again.
    let (st, v) = h.admin().delete(&format!("/v1/mesh/peers/{}", s2.id)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(s1.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 200);
    assert_eq!(apps_of(&n, &s1.id).await, vec![a]);
}

/// `POST /v1/apps/{uuid}/move` hands an app over in one event (one id: the old holder's
/// upsert without it, then the new holder's with it); the old holder's claim is then
/// refused and the new holder's accepted.
#[tokio::test]
async fn admin_moves_an_app_in_one_event() {
    let h = Harness::start().await;
    let s1 = h.join("s1", &["supervisor"]).await;
    let s2 = h.join("s2", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let (u, a) = app(4);
    assert_eq!(s1.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 200);
    let mut st = n.client.stream(None).await;
    st.next_event().await;

    let path = format!("/v1/apps/{u}/move");
    // Not an admin, a bad uuid, a peer that may not host apps, an unknown peer: refused.
    let (code, v) = s2.client.post(&path, json!({"to": s2.id})).await;
    assert_eq!((code, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (code, v) = h
        .admin()
        .post("/v1/apps/not-a-uuid/move", json!({"to": s2.id}))
        .await;
    assert_eq!(
        (code, v["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    let (code, _) = h.admin().post(&path, json!({"to": n.id})).await;
    assert_eq!(code, 403);
    let (code, _) = h.admin().post(&path, json!({"to": "0000"})).await;
    assert_eq!(code, 404);
    let (code, v) = h.admin().post(&path, json!({"to": s2.id, "x": 1})).await;
    assert_eq!(
        (code, v["code"].as_str()),
        (400, Some("invalid_json")),
        "{v}"
    );
    assert_eq!(apps_of(&n, &s1.id).await, vec![a]);

    let (code, v) = h.admin().post(&path, json!({"to": s2.id})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v, json!({"app_ula": a, "from": s1.id, "to": s2.id}));
    let (id1, e1) = st.next_event().await;
    let (id2, e2) = st.next_event().await;
    assert_eq!(id1, id2, "one event moves the app");
    match (e1, e2) {
        (SseEvent::PeerUpsert(p1), SseEvent::PeerUpsert(p2)) => {
            assert_eq!((p1.peer_id, p1.hosted_app_ulas), (s1.id.clone(), vec![]));
            assert_eq!((p2.peer_id, p2.hosted_app_ulas), (s2.id.clone(), vec![a]));
        }
        other => panic!("expected two upserts, got {other:?}"),
    }
    assert_eq!(s1.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 409);
    assert_eq!(s2.heartbeat(json!({"hosted_app_ulas": [a]})).await.0, 200);
    assert_eq!(apps_of(&n, &s2.id).await, vec![a]);
    assert!(apps_of(&n, &s1.id).await.is_empty());
}

async fn open_stream(c: &Client) -> Result<hyper::Response<hyper::body::Incoming>, Value> {
    let resp = c
        .send("GET", "/v1/mesh/peers/stream", None, &[])
        .await
        .unwrap();
    if resp.status() == 200 {
        return Ok(resp);
    }
    use http_body_util::BodyExt;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    v["status"] = json!(status);
    Err(v)
}

/// Issue 11, attack 4: 10 streams from one identity → the 5th and later are refused with
/// 429 JSON; another identity is unaffected; closing one frees a slot.
#[tokio::test]
async fn ten_streams_from_one_identity_the_fifth_is_refused() {
    let h = Harness::start().await;
    let n = h.join("n1", &["node"]).await;
    let other = h.join("n2", &["node"]).await;
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..10 {
        match open_stream(&n.client).await {
            Ok(r) => open.push(r),
            Err(v) => refused.push(v),
        }
    }
    assert_eq!((open.len(), refused.len()), (4, 6));
    for v in &refused {
        assert_eq!(v["status"], 429);
        assert_eq!(v["code"], "too_many_streams");
        assert!(v["error"].as_str().unwrap().contains("n1"), "{v}");
    }
    assert_eq!(metric(&h, "streams_refused_total").await, 6);
    assert!(open_stream(&other.client).await.is_ok());
    // Closing a stream gives its slot back (once the server notices the closed connection).
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match open_stream(&n.client).await {
            Ok(r) => {
                open.push(r);
                break;
            }
            Err(v) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "slot not freed: {v}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Issue 11, attack 4: a heartbeat flood from one member gets 429 after its burst, and the
/// changes it did get through reach the other members as one roster event at the end of
/// the one-second window, not one event per heartbeat.
#[tokio::test]
async fn heartbeat_flood_is_rate_limited_and_coalesced() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let mut st = n.client.stream(None).await;
    st.next_event().await;
    h.clock.advance_ms(1_000);

    let mut codes = Vec::new();
    for i in 0..40u16 {
        let (code, v) = s
            .heartbeat(json!({"endpoints": [format!("127.0.0.1:{}", 30_000 + i)]}))
            .await;
        if code == 429 {
            assert_eq!(v["code"], "rate_limited", "{v}");
        }
        codes.push(code);
    }
    assert!(codes[..10].iter().all(|c| *c == 200), "{codes:?}");
    assert!(codes[10..].iter().all(|c| *c == 429), "{codes:?}");
    assert_eq!(metric(&h, "rate_limited_total").await, 30);

    // The first change went out at once; the other nine wait for the window's end.
    match st.next_event().await.1 {
        SseEvent::PeerUpsert(p) => assert_eq!(p.endpoints[0].port(), 30_000),
        other => panic!("expected peer_upsert, got {other:?}"),
    }
    h.coord.flush();
    assert!(
        st.try_next(Duration::from_millis(300)).await.is_none(),
        "nothing more inside the window"
    );
    h.clock.advance_ms(1_000);
    h.coord.flush();
    match st.next_event().await.1 {
        SseEvent::PeerUpsert(p) => assert_eq!(p.endpoints[0].port(), 30_009),
        other => panic!("expected peer_upsert, got {other:?}"),
    }
    h.coord.flush();
    assert!(st.try_next(Duration::from_millis(300)).await.is_none());
    // The bucket refills: one more heartbeat a second later is accepted.
    assert_eq!(s.heartbeat(json!({})).await.0, 200);
}

/// Issue 11, attack 4: a client that opens TCP and never finishes the TLS handshake is
/// cut (after the 3 s default) and counted.
#[tokio::test]
async fn a_slow_tls_client_is_cut() {
    let h = Harness::start().await;
    let mut tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    // The start of a TLS record header, then nothing.
    tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("the coordinator did not cut a stalled handshake")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert_eq!(metric(&h, "tls_handshake_timeouts_total").await, 1);
    // Other clients are served meanwhile and after.
    assert_eq!(h.admin().get("/health").await.0, 200);
}

/// Issue 11, attack 4: connections per source IP and overall are capped; a connection over
/// a cap gets its first request answered with a JSON refusal, then is closed.
#[tokio::test]
async fn connection_caps_per_ip_and_overall() {
    let h = Harness::start_with(|c| {
        c.max_connections_per_ip = 3;
        c.max_connections = 5;
        // The held connections below never handshake; keep them for the whole test.
        c.tls_handshake_timeout = Duration::from_secs(120);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        held.push(sock.connect(h.addr).await.unwrap());
    }
    settle(&h, 3).await;
    let from2 = h.client("admin").with_source_ip("127.0.0.2");
    let (st, v) = from2.get("/health").await;
    assert_eq!(
        (st, v["code"].as_str()),
        (429, Some("too_many_connections")),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("127.0.0.2"), "{v}");
    assert_eq!(metric(&h, "connections_refused_per_ip_total").await, 1);
    // Another source is still served...
    let from3 = h.client("admin").with_source_ip("127.0.0.3");
    assert_eq!(from3.get("/health").await.0, 200);
    // ...until the overall cap: 3 held + 2 more held from elsewhere.
    settle(&h, 3).await;
    for _ in 0..2 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.4:0".parse().unwrap()).unwrap();
        held.push(sock.connect(h.addr).await.unwrap());
    }
    settle(&h, 5).await;
    let (st, v) = from3.get("/health").await;
    assert_eq!((st, v["code"].as_str()), (503, Some("overloaded")), "{v}");
    // Freeing connections lets clients in again.
    held.clear();
    let deadline = tokio::time::Instant::now() + WAIT;
    while from2.get("/health").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "slots not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the coordinator counts `n` open connections (closed ones are noticed
/// asynchronously).
async fn settle(h: &Harness, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.coord.connections_open() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} connections open, expected {n}",
            h.coord.connections_open()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
