//! The JSON API in-process over mTLS: registration, the ACL matrix with deny and ports,
//! heartbeats and hosted apps, expiry on a manual clock, tokens, revocation, admin
//! rights, and bad input (4xx JSON error, no state change).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::{json, Value};
use tabbify_control::api::{PortRange, PortRules, RosterEntry, SseEvent};

fn entry(roster: &Value, id: &str) -> Option<RosterEntry> {
    roster
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["peer_id"] == id)
        .map(|e| serde_json::from_value(e.clone()).unwrap())
}

fn r(first: u16, last: u16) -> PortRange {
    PortRange { first, last }
}

#[tokio::test]
async fn acl_matrix_with_deny_and_ports() {
    let h = Harness::start().await;
    let n = h.join("n1", &["node"]).await;
    let s = h.join("s1", &["supervisor"]).await;
    let w = h.join("w1", &["worker"]).await;
    let o = h.join("o1", &["ops"]).await;
    let i = h.join("i1", &["isolated"]).await;

    let want = |p: &Peer, see: &[&Peer]| {
        let mut ids: Vec<String> = see.iter().map(|x| x.id.clone()).collect();
        ids.sort();
        (p.id.clone(), ids)
    };
    let expected = [
        want(&n, &[&s]),
        want(&s, &[&n, &w, &o]),
        want(&w, &[&s, &o]),
        want(&o, &[&s, &w]),
        want(&i, &[]),
    ];
    for (p, (id, ids)) in [&n, &s, &w, &o, &i].iter().zip(expected) {
        assert_eq!(p.id, id);
        assert_eq!(p.roster_ids().await, ids, "roster of {}", p.name);
    }

    let (_, roster) = n.client.get("/v1/mesh/peers").await;
    let e = entry(&roster["peers"], &s.id).unwrap();
    assert_eq!(
        e.ports,
        PortRules {
            outbound: vec![r(8730, 8730)],
            inbound: vec![],
            ..Default::default()
        }
    );
    assert_eq!(e.display_name, "s1");
    assert_eq!(e.tags, vec!["supervisor"]);
    assert_eq!(e.ula, tabbify_control::ula::identity_ula("s1"));
    assert_eq!(e.identity, "s1");
    assert_eq!(e.public_key, b64(&s.key));

    // ops → worker: every port but the explicitly denied 22.
    let (_, roster) = o.client.get("/v1/mesh/peers").await;
    let e = entry(&roster["peers"], &w.id).unwrap();
    assert_eq!(e.ports.outbound, vec![r(0, 21), r(23, 65535)]);
    assert!(e.ports.inbound.is_empty());
    let e = entry(&roster["peers"], &s.id).unwrap();
    assert_eq!(e.ports.outbound, vec![PortRange::ALL]);

    // The worker sees the supervisor only because of supervisor → worker:9000-9100.
    let (_, roster) = w.client.get("/v1/mesh/peers").await;
    let e = entry(&roster["peers"], &s.id).unwrap();
    assert!(e.ports.outbound.is_empty());
    assert_eq!(e.ports.inbound, vec![r(9000, 9100)]);
}

#[tokio::test]
async fn register_returns_identity_roster_and_reflexive_endpoint() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let v = &n.registration;
    assert_eq!(
        v["peer_id"],
        json!(tabbify_control::ula::identity_peer_id("n1"))
    );
    assert_eq!(
        v["ula"],
        json!(tabbify_control::ula::identity_ula("n1").to_string())
    );
    assert_eq!(v["display_name"], "n1");
    assert_eq!(v["tags"], json!(["node"]));
    assert_eq!(v["may_host_apps"], false);
    assert_eq!(v["heartbeat_interval_secs"], 10);
    // Source IP of the request + the reported WireGuard port (not the TCP port).
    assert_eq!(v["reflexive_endpoint"], "127.0.0.1:51820");
    assert_eq!(ids(&v["roster"]), vec![s.id.clone()]);
    assert_eq!(s.registration["may_host_apps"], true);
}

/// Issue 15: the register answer names the mesh DNS domain (default `mesh`).
#[tokio::test]
async fn register_answer_carries_the_dns_domain() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    assert_eq!(s.registration["dns_domain"], "mesh");
    let h = Harness::start_with(|c| c.dns_domain = "corp.internal".into()).await;
    let s = h.join("s1", &["supervisor"]).await;
    assert_eq!(s.registration["dns_domain"], "corp.internal");
    // An older coordinator's answer has no field: it reads as `mesh`.
    let mut old = s.registration.clone();
    old.as_object_mut().unwrap().remove("dns_domain");
    let r: tabbify_api::RegisterResponse = serde_json::from_value(old).unwrap();
    assert_eq!(r.dns_domain, "mesh");
}

#[tokio::test]
async fn heartbeat_updates_endpoints_and_hosted_apps() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let app = tabbify_control::ula::app_ula(&uuid::Uuid::from_u128(7));
    let (st, v) = s
        .heartbeat(json!({"endpoints": ["127.0.0.1:51821"], "hosted_app_ulas": [app]}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["reflexive_endpoint"], "127.0.0.1:51820");
    let (_, roster) = n.client.get("/v1/mesh/peers").await;
    let e = entry(&roster["peers"], &s.id).unwrap();
    assert_eq!(e.hosted_app_ulas, vec![app]);
    assert_eq!(e.endpoints, vec!["127.0.0.1:51821".parse().unwrap()]);

    // A node may not host apps.
    let (st, v) = n.heartbeat(json!({"hosted_app_ulas": [app]})).await;
    assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    // A peer cannot heartbeat for another.
    let (st, _) = n
        .client
        .post("/v1/mesh/heartbeat", json!({"peer_id": s.id}))
        .await;
    assert_eq!(st, 403);
}

fn stale_of(roster: &Value, id: &str) -> Option<bool> {
    entry(roster, id).map(|e| e.stale)
}

/// Issue 11 (cascade teardown): a peer that loses its control connection is marked stale
/// and stays in every roster with its apps; it is removed only after `stale_after`.
#[tokio::test]
async fn missed_heartbeats_mark_a_peer_stale_then_expire_it() {
    let h = Harness::start_with(|c| c.stale_after = Duration::from_secs(60)).await;
    let s = h.join("s1", &["supervisor"]).await;
    let s2 = h.join("s2", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let app = tabbify_control::ula::app_ula(&uuid::Uuid::from_u128(11));
    let same = json!({"endpoints": ["127.0.0.1:51820"]});
    assert_eq!(s.heartbeat(json!({"hosted_app_ulas": [app]})).await.0, 200);
    let mut stream = n.client.stream(None).await;
    let (_, first) = stream.next_event().await;
    assert!(matches!(first, SseEvent::Snapshot(ref snap) if snap.peers.len() == 2));

    // Two intervals and a bit: still alive.
    h.clock.advance_ms(25_000);
    assert_eq!(n.heartbeat(same.clone()).await.0, 200);
    assert_eq!(s2.heartbeat(same.clone()).await.0, 200);
    assert_eq!(h.coord.sweep(), Default::default());
    // s1 has now missed three heartbeats: stale, one upsert, still in the roster.
    h.clock.advance_ms(6_000);
    let out = h.coord.sweep();
    assert_eq!((out.stale, out.removed), (vec![s.id.clone()], vec![]));
    let (_, roster) = n.client.get("/v1/mesh/peers").await;
    assert_eq!(stale_of(&roster["peers"], &s.id), Some(true));
    assert_eq!(
        entry(&roster["peers"], &s.id).unwrap().hosted_app_ulas,
        vec![app]
    );
    match stream.next_event().await.1 {
        SseEvent::PeerUpsert(e) => assert!(e.peer_id == s.id && e.stale, "{e:?}"),
        other => panic!("expected peer_upsert, got {other:?}"),
    }
    assert_eq!(h.coord.sweep(), Default::default(), "marked once");
    // Its app stays held while it is stale.
    let (st, v) = s2.heartbeat(json!({"hosted_app_ulas": [app]})).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("app_taken")), "{v}");

    // A heartbeat makes it fresh again: one upsert, once its event window has passed.
    assert_eq!(s.heartbeat(json!({"hosted_app_ulas": [app]})).await.0, 200);
    let (_, roster) = n.client.get("/v1/mesh/peers").await;
    assert_eq!(stale_of(&roster["peers"], &s.id), Some(false));
    h.clock.advance_ms(1_000);
    h.coord.flush();
    match stream.next_event().await.1 {
        SseEvent::PeerUpsert(e) => assert!(e.peer_id == s.id && !e.stale, "{e:?}"),
        other => panic!("expected peer_upsert, got {other:?}"),
    }

    // Silent again, past the expiry and then `stale_after`: removed, its app released.
    h.clock.advance_ms(31_000);
    assert_eq!(n.heartbeat(json!({})).await.0, 200);
    let mut both = vec![s.id.clone(), s2.id.clone()];
    both.sort();
    assert_eq!(h.coord.sweep().stale, both);
    for _ in 0..2 {
        assert!(matches!(stream.next_event().await.1, SseEvent::PeerUpsert(e) if e.stale));
    }
    h.clock.advance_ms(61_000);
    assert_eq!(n.heartbeat(json!({})).await.0, 200);
    assert_eq!(h.coord.sweep().removed, both);
    assert!(n.roster_ids().await.is_empty());
    let mut reasons = Vec::new();
    for _ in 0..2 {
        match stream.next_event().await.1 {
            SseEvent::PeerRemove(r) => reasons.push(r.reason),
            other => panic!("expected peer_remove, got {other:?}"),
        }
    }
    assert_eq!(reasons, vec!["expired", "expired"]);
    let (st, v) = s.heartbeat(json!({})).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_registered")));

    // It comes back without a token: its key was admitted before.
    let (st, v) = s
        .client
        .post(
            "/v1/mesh/register",
            json!({"name": "s1", "public_key": b64(&s.key), "wg_listen_port": 51820}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tags"], json!(["supervisor"]));
    assert_eq!(n.roster_ids().await, vec![s.id.clone()]);
}

#[tokio::test]
async fn tokens_are_single_use_expire_and_decide_tags() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_owned();
    let h = Harness::start_with(|c| c.state_dir = Some(state)).await;
    let token = h.token(&["node"]).await;

    // The token's tags win over the requested ones.
    let a = h.client("a");
    let (st, v) = a
        .post(
            "/v1/mesh/register",
            register_body("a", &key_for("a"), &["ops"], &token),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tags"], json!(["node"]));

    // Used up.
    let b = h.client("b");
    let (st, v) = b
        .post(
            "/v1/mesh/register",
            register_body("b", &key_for("b"), &[], &token),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("token_used")), "{v}");

    // Wrong.
    let (st, v) = b
        .post(
            "/v1/mesh/register",
            register_body("b", &key_for("b"), &[], "tmj_nope"),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (401, Some("token_invalid")),
        "{v}"
    );

    // Expired.
    let (_, t) = h
        .admin()
        .post(
            "/v1/tokens",
            json!({"tags": ["node"], "ttl_secs": 60, "max_uses": 2}),
        )
        .await;
    let expiring = t["token"].as_str().unwrap().to_owned();
    h.clock.advance_ms(61_000);
    let (st, v) = b
        .post(
            "/v1/mesh/register",
            register_body("b", &key_for("b"), &[], &expiring),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (401, Some("token_expired")),
        "{v}"
    );

    // No token and never admitted.
    let (st, v) = b
        .post(
            "/v1/mesh/register",
            json!({"name": "b", "public_key": b64(&key_for("b")), "wg_listen_port": 1}),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (401, Some("unauthorized")), "{v}");
    assert_eq!(h.coord.peer_count(), 1);

    // Only hashes at rest.
    let text = state_text(dir.path());
    for secret in [&token, &expiring] {
        assert!(!text.contains(secret.as_str()), "token secret stored");
        let body = &secret["tmj_".len()..];
        assert!(!text.contains(body), "token secret stored");
        assert!(text.contains(&tabbify_control::tokens::hash(secret)));
    }
}

#[tokio::test]
async fn multi_use_and_named_tokens() {
    let h = Harness::start().await;
    let (st, t) = h
        .admin()
        .post(
            "/v1/tokens",
            json!({"tags": ["worker"], "max_uses": 2, "name": "builder"}),
        )
        .await;
    assert_eq!(st, 200, "{t}");
    let token = t["token"].as_str().unwrap();
    for (i, who) in ["x", "y", "z"].iter().enumerate() {
        let (st, v) = h
            .client(who)
            .post(
                "/v1/mesh/register",
                register_body(who, &key_for(who), &[], token),
            )
            .await;
        if i < 2 {
            assert_eq!(st, 200, "{v}");
            assert_eq!(v["display_name"], "builder");
        } else {
            assert_eq!(st, 403, "{v}");
        }
    }
    // Minting with an unknown tag is refused.
    let (st, v) = h
        .admin()
        .post("/v1/tokens", json!({"tags": ["nope"]}))
        .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")));
}

#[tokio::test]
async fn revocation_removes_at_once_and_refuses_the_key_until_readmitted() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let mut n_stream = n.client.stream(None).await;
    n_stream.next_event().await;
    let mut s_stream = s.client.stream(None).await;
    s_stream.next_event().await;

    let (st, v) = h.admin().delete(&format!("/v1/mesh/peers/{}", s.id)).await;
    assert_eq!(st, 200, "{v}");
    let (_, ev) = n_stream.next_event().await;
    assert!(
        matches!(ev, SseEvent::PeerRemove(ref r) if r.peer_id == s.id && r.reason == "revoked")
    );
    // The revoked peer's own stream ends.
    assert!(s_stream.next_frame().await.is_none());
    assert!(n.roster_ids().await.is_empty());

    let token = h.token(&["supervisor"]).await;
    let (st, v) = s
        .client
        .post(
            "/v1/mesh/register",
            register_body("s1", &s.key, &[], &token),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("revoked")), "{v}");
    let (_, list) = h.admin().get("/v1/revocations").await;
    assert_eq!(list[0]["peer_id"], json!(s.id));

    let (st, _) = h.admin().delete(&format!("/v1/revocations/{}", s.id)).await;
    assert_eq!(st, 200);
    let (st, v) = s
        .client
        .post(
            "/v1/mesh/register",
            register_body("s1", &s.key, &[], &token),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        h.admin().delete("/v1/mesh/peers/0000000000000000").await.0,
        404
    );
}

#[tokio::test]
async fn admin_routes_need_the_admin_role() {
    let h = Harness::start().await;
    // A peer certificate named "admin" is still a peer: the role is in the certificate.
    let n = h.client("admin");
    for (method, path) in [
        ("GET", "/v1/policy"),
        ("PUT", "/v1/policy"),
        ("POST", "/v1/tokens"),
        ("GET", "/v1/tokens"),
        ("DELETE", "/v1/tokens/abc"),
        ("GET", "/v1/revocations"),
        ("DELETE", "/v1/mesh/peers/abc"),
        ("DELETE", "/v1/identities/n1"),
        ("POST", "/v1/identities/n1/readmit"),
        ("DELETE", "/v1/identities/n1/key"),
    ] {
        let body = (method != "GET" && method != "DELETE").then(|| Bytes::from("{}"));
        let (st, v) = n.call(method, path, body).await.unwrap();
        assert_eq!(
            (st, v["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}"
        );
    }
    let (st, v) = h.admin().get("/v1/policy").await;
    assert_eq!(st, 200);
    assert_eq!(v["revision"], 1);
    assert_eq!(h.client("x").get("/v1/nope").await.0, 404);
    assert_eq!(
        h.client("x")
            .call("PATCH", "/v1/policy", None)
            .await
            .unwrap()
            .0,
        405
    );
}

#[tokio::test]
async fn bad_input_is_a_4xx_json_error_and_changes_nothing() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    let token = h.token(&["node"]).await;
    let c = h.client("n1");
    let key = b64(&key_for("n1"));
    let before = h.admin().get("/metrics").await.1;
    let cases: Vec<(Bytes, u16, &str)> = vec![
        (Bytes::from("{not json"), 400, "invalid_json"),
        (Bytes::from("[]"), 400, "invalid_json"),
        (
            Bytes::from(json!({"name": "n1", "public_key": b64(&[1u8; 31]), "wg_listen_port": 1, "join_token": token}).to_string()),
            400,
            "bad_request",
        ),
        (
            Bytes::from(json!({"name": "n1", "public_key": "%%%", "wg_listen_port": 1, "join_token": token}).to_string()),
            400,
            "bad_request",
        ),
        (
            Bytes::from(json!({"name": "n1", "public_key": key, "tags": ["bogus"], "wg_listen_port": 1, "join_token": token}).to_string()),
            400,
            "bad_request",
        ),
        (
            Bytes::from(json!({"name": "n 1", "public_key": key, "wg_listen_port": 1, "join_token": token}).to_string()),
            400,
            "bad_request",
        ),
        (
            Bytes::from(json!({"name": "n1", "public_key": key, "wg_listen_port": 70000, "join_token": token}).to_string()),
            400,
            "invalid_json",
        ),
        (
            Bytes::from(json!({"name": "n1", "public_key": key, "wg_listen_port": 1, "endpoints": ["nope"], "join_token": token}).to_string()),
            400,
            "invalid_json",
        ),
        (
            Bytes::from(format!("{{\"name\":\"{}\"}}", "x".repeat(300 * 1024))),
            413,
            "payload_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let (st, v) = c
            .call("POST", "/v1/mesh/register", Some(body))
            .await
            .unwrap();
        assert_eq!((st, v["code"].as_str()), (status, Some(code)), "{v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // Heartbeat with an address outside the app range.
    let (st, v) = s
        .heartbeat(json!({"hosted_app_ulas": ["fd5a:1f00::1"]}))
        .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("not an app ULA"));
    let (st, _) = s.heartbeat(json!({"endpoints": ["0.0.0.0:1"]})).await;
    assert_eq!(st, 400);

    // Nothing changed: one peer, no apps, the token still unused.
    assert_eq!(h.coord.peer_count(), 1);
    let (_, roster) = h
        .join("n2", &["node"])
        .await
        .client
        .get("/v1/mesh/peers")
        .await;
    assert!(entry(&roster["peers"], &s.id)
        .unwrap()
        .hosted_app_ulas
        .is_empty());
    let (st, v) = c
        .post(
            "/v1/mesh/register",
            register_body("n1", &key_for("n1"), &["node"], &token),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let after = h.admin().get("/metrics").await.1;
    assert_ne!(before, after);

    // A bad policy is refused with the reason and the revision stays.
    let (st, v) = h
        .admin()
        .put(
            "/v1/policy",
            json!({"tags": ["a"], "allow": [{"src": ["tag:b"], "dst": ["*"]}]}),
        )
        .await;
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("unknown tag"), "{v}");
    let (st, v) = h.admin().put("/v1/policy", json!({"tagz": []})).await;
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_json")));
    assert_eq!(h.admin().get("/v1/policy").await.1["revision"], 1);
}

#[tokio::test]
async fn slow_request_bodies_time_out_with_408() {
    let h = Harness::start_with(|c| c.request_timeout = Duration::from_millis(500)).await;
    let c = h.client("n1");
    // Declare 100 bytes, send 10, then stall.
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >(1);
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(
        b"{\"name\":\"x",
    ))))
    .await
    .unwrap();
    let body = http_body_util::StreamBody::new(ReceiverStream(rx));
    let resp = send_streaming(&c, body).await;
    assert_eq!(resp.0, 408, "{}", resp.1);
    assert_eq!(resp.1["code"], "timeout");
    drop(tx);
    assert_eq!(h.coord.peer_count(), 0);
}

struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_util::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

async fn send_streaming<B>(c: &Client, body: B) -> (u16, Value)
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let addr = c.addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(c.tls.clone().unwrap());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/v1/mesh/register")
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("content-length", "100")
        .body(body)
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let st = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (st, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn non_json_content_type_is_415() {
    let h = Harness::start().await;
    assert_eq!(raw_post(&h.client("n1"), "text/plain").await, 415);
    assert_eq!(h.coord.peer_count(), 0);
}

async fn raw_post(c: &Client, content_type: &str) -> u16 {
    let addr = c.addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(c.tls.clone().unwrap());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/v1/mesh/register")
        .header("host", addr.to_string())
        .header("content-type", content_type)
        .body(http_body_util::Full::new(Bytes::from("{}")))
        .unwrap();
    sender.send_request(req).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn nated_peers_get_hole_punch_events_at_the_same_moment() {
    let h = Harness::start().await;
    let token_a = h.token(&["supervisor"]).await;
    let token_b = h.token(&["node"]).await;
    let nat = |name: &str, token: &str| {
        let mut b = register_body(name, &key_for(name), &[], token);
        // Local endpoints on a private LAN: the observed 127.0.0.1 is not among them.
        b["endpoints"] = json!(["10.0.0.5:51820"]);
        b
    };
    let a = h.client("a");
    let b = h.client("b");
    assert_eq!(a.post("/v1/mesh/register", nat("a", &token_a)).await.0, 200);
    assert_eq!(b.post("/v1/mesh/register", nat("b", &token_b)).await.0, 200);
    let (id_a, id_b) = (
        tabbify_control::ula::identity_peer_id("a"),
        tabbify_control::ula::identity_peer_id("b"),
    );
    let mut sa = a.stream(None).await;
    let mut sb = b.stream(None).await;
    sa.next_event().await;
    sb.next_event().await;

    // b's mapping changes (it now appears from 127.0.0.2), past b's event window.
    h.clock.advance_ms(1_000);
    let b2 = b.clone().with_source_ip("127.0.0.2");
    let (st, v) = b2
        .post(
            "/v1/mesh/heartbeat",
            json!({"peer_id": id_b, "endpoints": ["10.0.0.5:51820"]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["reflexive_endpoint"], "127.0.0.2:51820");

    let punch = |events: Vec<(u64, SseEvent)>| {
        events
            .into_iter()
            .find_map(|(id, e)| match e {
                SseEvent::HolePunch(p) => Some((id, p)),
                _ => None,
            })
            .unwrap()
    };
    let ea = vec![sa.next_event().await, sa.next_event().await];
    let eb = vec![sb.next_event().await];
    let (ida, pa) = punch(ea);
    let (idb, pb) = punch(eb);
    assert_eq!(ida, idb, "both punches belong to one event");
    assert_eq!(pa.peer_id, id_b);
    assert_eq!(pa.endpoint, "127.0.0.2:51820".parse().unwrap());
    assert_eq!(pb.peer_id, id_a);
    assert_eq!(pb.endpoint, "127.0.0.1:51820".parse().unwrap());
}
