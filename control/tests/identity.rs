//! One identity, one key, and the identity lifecycle, played as an attacker with a valid
//! member certificate would (issue 11, Deliver 1 and 5): key takeover refused with the owner
//! undisturbed, a second key without rotation refused, rotation keeping the address, a
//! revoked identity kept out whatever key or token it brings, the admin role carried by the
//! certificate and not its name, token listing/revocation/binding, and the audit log.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tabbify_control::api::SseEvent;
use tabbify_control::ula;

/// Registers `name`'s certificate with `key` and a fresh token for `tags`.
async fn register(h: &Harness, name: &str, key: &[u8; 32], tags: &[&str]) -> (u16, Value) {
    let token = h.token(tags).await;
    h.client(name)
        .post("/v1/mesh/register", register_body(name, key, tags, &token))
        .await
}

#[tokio::test]
async fn key_takeover_is_refused_and_the_owner_is_undisturbed() {
    let h = Harness::start().await;
    let owner = h.join("s1", &["supervisor"]).await;
    let viewer = h.join("o1", &["ops"]).await;
    let mut stream = viewer.client.stream(None).await;
    stream.next_event().await;
    let before = viewer.client.get("/v1/mesh/peers").await.1["peers"].clone();
    let mut owner_stream = owner.client.stream(None).await;
    owner_stream.next_event().await;

    // mallory has a valid certificate and an unspent token, and presents s1's key.
    let token = h.token(&["worker"]).await;
    let mallory = h.client("mallory");
    let (st, v) = mallory
        .post(
            "/v1/mesh/register",
            register_body("mallory", &owner.key, &["worker"], &token),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (409, Some("key_taken")), "{v}");
    // Nothing changed: mallory is not registered, its token is unspent, s1 is intact.
    let (st, _) = mallory.get("/v1/mesh/peers").await;
    assert_eq!(st, 404);
    let (st, v) = mallory
        .post(
            "/v1/mesh/register",
            register_body("mallory", &key_for("mallory"), &["worker"], &token),
        )
        .await;
    assert_eq!(st, 200, "the refused attempt spent the token: {v}");
    // Heartbeating or streaming as s1 from mallory's certificate is refused too.
    let (st, _) = mallory
        .post(
            "/v1/mesh/heartbeat",
            json!({"peer_id": owner.id, "endpoints": ["10.9.9.9:1"]}),
        )
        .await;
    assert_eq!(st, 403);
    let resp = mallory
        .send(
            "GET",
            &format!("/v1/mesh/peers/stream?peer_id={}", owner.id),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // The owner keeps working: heartbeat, stream, the same roster entry everywhere.
    let (st, v) = owner
        .heartbeat(json!({"endpoints": ["127.0.0.1:51820"]}))
        .await;
    assert_eq!(st, 200, "{v}");
    let after = viewer.client.get("/v1/mesh/peers").await.1["peers"].clone();
    let pick = |roster: &Value| {
        roster
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["peer_id"] == json!(owner.id))
            .cloned()
            .unwrap()
    };
    assert_eq!(pick(&before), pick(&after));
    assert_eq!(pick(&after)["public_key"], json!(b64(&owner.key)));
    assert_eq!(pick(&after)["identity"], "s1");
    // The viewer saw mallory arrive, never s1 leave or change key.
    let (_, ev) = stream.next_event().await;
    match ev {
        SseEvent::PeerUpsert(e) => assert_eq!(e.identity, "mallory"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(stream.try_next(Duration::from_millis(200)).await.is_none());
    // The owner's own stream is still open and sees mallory (a worker) arrive.
    let (_, ev) = owner_stream.next_event().await;
    assert!(
        matches!(ev, SseEvent::PeerUpsert(ref e) if e.identity == "mallory"),
        "{ev:?}"
    );
    let metrics = h.admin().get("/metrics").await.1;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("tabbify_coordinator_key_refusals_total 1"),
        "{metrics}"
    );
    h.coord.check_identity_invariants().unwrap();
}

#[tokio::test]
async fn a_second_key_without_rotation_is_refused_until_an_admin_clears_the_lost_key() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    let fresh = key_for("s1-new");
    let (st, v) = register(&h, "s1", &fresh, &["supervisor"]).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("key_mismatch")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("rotate"), "{v}");
    // The node lost its key: the admin clears it and the node joins with a new token.
    let (st, v) = h.admin().delete("/v1/identities/s1/key").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["public_key"], Value::Null);
    let (st, v) = s.heartbeat(json!({})).await;
    assert_eq!(st, 404, "the cleared key's peer left the roster: {v}");
    let (st, v) = register(&h, "s1", &fresh, &["supervisor"]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ula"], json!(ula::identity_ula("s1").to_string()));
    assert_eq!(v["peer_id"], json!(s.id));
    // The cleared key stays bound to s1: nobody else can ever register it.
    let (st, v) = register(&h, "mallory", &s.key, &["node"]).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("key_taken")), "{v}");
}

#[tokio::test]
async fn rotation_keeps_identity_address_tags_and_apps() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let app = ula::app_ula(&uuid::Uuid::from_u128(42));
    let (st, _) = s.heartbeat(json!({"hosted_app_ulas": [app]})).await;
    assert_eq!(st, 200);
    let mut stream = n.client.stream(None).await;
    stream.next_event().await;

    let new = key_for("s1-rotated");
    let rotate = |old: &[u8; 32], new: &[u8; 32]| json!({"peer_id": s.id, "old_public_key": b64(old), "new_public_key": b64(new)});
    // Another member cannot rotate s1's key, nor can a wrong old key.
    let (st, _) = n
        .client
        .post("/v1/mesh/rotate-key", rotate(&s.key, &new))
        .await;
    assert_eq!(st, 403);
    let (st, v) = s
        .client
        .post("/v1/mesh/rotate-key", rotate(&key_for("x"), &new))
        .await;
    assert_eq!(st, 409, "{v}");
    // Nor rotate onto a key bound to another identity.
    let (st, v) = s
        .client
        .post("/v1/mesh/rotate-key", rotate(&s.key, &n.key))
        .await;
    assert_eq!((st, v["code"].as_str()), (409, Some("key_taken")), "{v}");

    let (st, v) = s
        .client
        .post("/v1/mesh/rotate-key", rotate(&s.key, &new))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["peer_id"], json!(s.id));
    assert_eq!(v["ula"], s.registration["ula"]);
    assert_eq!(v["public_key"], json!(b64(&new)));
    // A retry (the joiner lost the answer) gets the same answer and changes nothing.
    let (st, again) = s
        .client
        .post("/v1/mesh/rotate-key", rotate(&s.key, &new))
        .await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(again, v);

    // Exactly one upsert with the new key; everything else as before.
    let (_, ev) = stream.next_event().await;
    let SseEvent::PeerUpsert(e) = ev else {
        panic!("expected an upsert, got {ev:?}")
    };
    assert_eq!(e.peer_id, s.id);
    assert_eq!(e.identity, "s1");
    assert_eq!(e.ula, ula::identity_ula("s1"));
    assert_eq!(e.public_key, b64(&new));
    assert_eq!(e.tags, vec!["supervisor"]);
    assert_eq!(e.hosted_app_ulas, vec![app]);
    assert!(stream.try_next(Duration::from_millis(200)).await.is_none());

    // The old key is retired: s1 cannot come back with it, nobody else can take it, and
    // s1 re-registers with the new one without a token.
    let body = |key: &[u8; 32]| {
        let mut b = register_body("s1", key, &[], "");
        b.as_object_mut().unwrap().remove("join_token");
        b
    };
    let (st, v) = s.client.post("/v1/mesh/register", body(&s.key)).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("key_mismatch")), "{v}");
    let (st, v) = register(&h, "mallory", &s.key, &["node"]).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("key_taken")), "{v}");
    let (st, v) = s.client.post("/v1/mesh/register", body(&new)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ula"], s.registration["ula"]);
    assert_eq!(v["tags"], json!(["supervisor"]));
    h.coord.check_identity_invariants().unwrap();
}

#[tokio::test]
async fn a_revoked_identity_cannot_come_back_with_a_new_key_and_a_valid_token() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let mut stream = n.client.stream(None).await;
    stream.next_event().await;

    let (st, v) = h.admin().delete("/v1/identities/s1").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["revoked"], true);
    let (_, ev) = stream.next_event().await;
    assert!(
        matches!(ev, SseEvent::PeerRemove(ref r) if r.peer_id == s.id && r.reason == "revoked")
    );
    for key in [s.key, key_for("s1-other")] {
        let (st, v) = register(&h, "s1", &key, &["supervisor"]).await;
        assert_eq!((st, v["code"].as_str()), (403, Some("revoked")), "{v}");
    }
    // A token bound to s1 does not help either.
    let (_, t) = h
        .admin()
        .post("/v1/tokens", json!({"tags": ["node"], "identity": "s1"}))
        .await;
    let (st, _) = h
        .client("s1")
        .post(
            "/v1/mesh/register",
            register_body("s1", &key_for("s1-3"), &[], t["token"].as_str().unwrap()),
        )
        .await;
    assert_eq!(st, 403);
    let (_, list) = h.admin().get("/v1/revocations").await;
    assert_eq!(list[0]["identity"], "s1");
    assert_eq!(list[0]["peer_id"], json!(s.id));

    // An identity can be revoked before it ever joined.
    let (st, _) = h.admin().delete("/v1/identities/future-1").await;
    assert_eq!(st, 200);
    let (st, _) = register(&h, "future-1", &key_for("future-1"), &["node"]).await;
    assert_eq!(st, 403);
    let (st, v) = h.admin().delete("/v1/identities/bad%20name").await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")));

    // Re-admitted, s1 needs a new token (its key was cleared) and keeps its address.
    let (st, v) = h.admin().post("/v1/identities/s1/readmit", json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["revoked"], false);
    let fresh = key_for("s1-fresh");
    let (st, v) = register(&h, "s1", &fresh, &["supervisor"]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["peer_id"], json!(s.id));
    let (st, _) = h.admin().post("/v1/identities/s1/readmit", json!({})).await;
    assert_eq!(st, 404, "not revoked any more");
    h.coord.check_identity_invariants().unwrap();
}

#[tokio::test]
async fn the_admin_role_is_in_the_certificate_and_admin_narrows_it() {
    let h = Harness::start_with(|c| c.admins = ["ops-1".to_string()].into()).await;
    // A peer certificate called ops-1 is not an admin; an admin certificate not listed in
    // --admin is not either; an admin certificate that is listed is.
    let (st, v) = h.client("ops-1").get("/v1/tokens").await;
    assert_eq!(st, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("admin role"), "{v}");
    let (st, _) = h.admin().get("/v1/tokens").await;
    assert_eq!(st, 403);
    let ops = h.pki.admin_client("ops-1").at(h.addr);
    let (st, v) = ops.get("/v1/tokens").await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn tokens_are_listed_without_secrets_revocable_bindable_and_never_silently_unlimited() {
    let h = Harness::start().await;
    let admin = h.admin();
    let (st, v) = admin
        .post("/v1/tokens", json!({"tags": ["node"], "max_uses": 0}))
        .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("unlimited"));
    let (st, v) = admin
        .post("/v1/tokens", json!({"tags": ["node"], "unlimited": true}))
        .await;
    assert_eq!(st, 400, "unlimited needs max_uses 0: {v}");
    let (st, unlimited) = admin
        .post(
            "/v1/tokens",
            json!({"tags": ["node"], "max_uses": 0, "unlimited": true}),
        )
        .await;
    assert_eq!(st, 200, "{unlimited}");
    let (_, bound) = admin
        .post("/v1/tokens", json!({"tags": ["node"], "identity": "n1"}))
        .await;
    let (_, doomed) = admin.post("/v1/tokens", json!({"tags": ["node"]})).await;

    let (st, list) = admin.get("/v1/tokens").await;
    assert_eq!(st, 200);
    assert_eq!(list.as_array().unwrap().len(), 3);
    let text = list.to_string();
    for t in [&unlimited, &bound, &doomed] {
        let secret = t["token"].as_str().unwrap();
        assert!(
            !text.contains(&secret[4..]),
            "a secret leaked into the list"
        );
        assert!(text.contains(t["token_id"].as_str().unwrap()));
    }
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["identity"] == "n1" && t["uses"] == 0));

    // A bound token serves only its identity.
    let use_token = |name: &str, token: &Value| {
        let body = register_body(name, &key_for(name), &[], token["token"].as_str().unwrap());
        let c = h.client(name);
        async move { c.post("/v1/mesh/register", body).await }
    };
    let (st, v) = use_token("mallory", &bound).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (403, Some("token_identity")),
        "{v}"
    );
    let (st, v) = use_token("n1", &bound).await;
    assert_eq!(st, 200, "{v}");

    // A deleted token is gone: not listed, not usable.
    let id = doomed["token_id"].as_str().unwrap();
    let (st, v) = admin.delete(&format!("/v1/tokens/{id}")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(admin.delete(&format!("/v1/tokens/{id}")).await.0, 404);
    let (st, v) = use_token("n2", &doomed).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (401, Some("token_invalid")),
        "{v}"
    );
    assert_eq!(admin.get("/v1/tokens").await.1.as_array().unwrap().len(), 2);
    // The unlimited token keeps working.
    for name in ["u1", "u2", "u3"] {
        assert_eq!(use_token(name, &unlimited).await.0, 200);
    }
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// One thread: the coordinator's tasks run where the test's subscriber is the default.
#[tokio::test(flavor = "current_thread")]
async fn every_admin_action_writes_an_audit_line_naming_the_admin() {
    let out = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(out.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let h = Harness::start().await;
    let root = h.pki.admin_client("root-7").at(h.addr);
    let (st, t) = root.post("/v1/tokens", json!({"tags": ["node"]})).await;
    assert_eq!(st, 200);
    let id = t["token_id"].as_str().unwrap();
    assert_eq!(root.delete(&format!("/v1/tokens/{id}")).await.0, 200);
    assert_eq!(root.delete("/v1/identities/n9").await.0, 200);
    assert_eq!(
        root.post("/v1/identities/n9/readmit", json!({})).await.0,
        200
    );
    let policy = h.admin().get("/v1/policy").await.1["policy"].clone();
    assert_eq!(root.put("/v1/policy", policy).await.0, 200);
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let audit: Vec<&str> = text.lines().filter(|l| l.contains(" audit:")).collect();
    for (action, object) in [
        ("token.mint", format!("token {id}")),
        ("token.delete", format!("token {id}")),
        ("identity.revoke", "n9".into()),
        ("identity.readmit", "n9".into()),
        ("policy.replace", "revision 2".into()),
    ] {
        assert!(
            audit.iter().any(|l| l.contains("admin=\"root-7\"")
                && l.contains(&format!("action=\"{action}\""))
                && l.contains(&format!("object=\"{object}\""))),
            "no audit line for {action} {object} in:\n{text}"
        );
    }
}
