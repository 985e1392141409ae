//! Issue 14: members leave (`POST /v1/mesh/leave`) and ephemeral members
//! (`"ephemeral": true` at registration) go at staleness. In-process over mTLS.
//!
//! The attacker is a member with a valid certificate: it can make only itself leave (the
//! route acts on the caller's certificate identity, and a body naming anyone is refused).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;
use tabbify_control::api::SseEvent;

#[tokio::test]
async fn a_member_that_leaves_is_removed_from_every_roster_at_once_with_reason_left() {
    let h = Harness::start().await;
    let s1 = h.join("s1", &["supervisor"]).await;
    // Nodes see supervisors.
    let s2 = h.join("n1", &["node"]).await;
    let mut stream = s2.client.stream(None).await;
    assert!(matches!(stream.next_event().await.1, SseEvent::Snapshot(_)));
    assert_eq!(s2.roster_ids().await, vec![s1.id.clone()]);

    let (st, v) = s1.client.post("/v1/mesh/leave", json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, json!({"peer_id": s1.id, "left": true}));
    match stream.next_event().await.1 {
        SseEvent::PeerRemove(r) => {
            assert_eq!((r.peer_id, r.reason.as_str()), (s1.id.clone(), "left"))
        }
        other => panic!("expected peer_remove, got {other:?}"),
    }
    assert!(s2.roster_ids().await.is_empty());
    let (st, v) = s1.heartbeat(json!({})).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_registered")));
    // Leaving twice: nothing to remove.
    let (st, v) = s1.client.post("/v1/mesh/leave", json!({})).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (404, Some("not_registered")),
        "{v}"
    );

    // Its key stays admitted: it comes back without a token.
    let (st, v) = s1
        .client
        .post(
            "/v1/mesh/register",
            json!({"name": "s1", "public_key": b64(&s1.key), "wg_listen_port": 51820}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(s2.roster_ids().await, vec![s1.id.clone()]);
}

/// Attacker: a member names another in the body, or a stranger with a valid certificate
/// but no membership asks, or a caller without a certificate: refused, nobody leaves.
#[tokio::test]
async fn a_member_cannot_make_another_member_leave() {
    let h = Harness::start().await;
    let s1 = h.join("s1", &["supervisor"]).await;
    let s2 = h.join("n1", &["node"]).await;

    let (st, v) = s1
        .client
        .post("/v1/mesh/leave", json!({"peer_id": s2.id}))
        .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_json")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("peer_id"), "{v}");

    let mallory = h.client("mallory");
    let (st, v) = mallory.post("/v1/mesh/leave", json!({})).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (404, Some("not_registered")),
        "{v}"
    );

    let anonymous = h.pki.client_with(None).at(h.addr);
    match anonymous
        .call(
            "POST",
            "/v1/mesh/leave",
            Some(bytes::Bytes::from_static(b"{}")),
        )
        .await
    {
        Ok((st, v)) => assert_eq!(st, 401, "{v}"),
        Err(e) => assert!(e.contains("tls") || e.contains("connection"), "{e}"),
    }

    let (st, v) = s1.client.get("/v1/mesh/leave").await;
    assert_eq!(st, 405, "{v}");

    assert_eq!(s2.roster_ids().await, vec![s1.id.clone()]);
    let (st, v) = s2.heartbeat(json!({})).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s1.heartbeat(json!({})).await;
    assert_eq!(st, 200, "{v}");
}

/// An ephemeral member has no stale window: the sweep that would mark it stale removes
/// it (reason `expired`), while an ordinary member is only marked stale.
#[tokio::test]
async fn an_ephemeral_member_is_removed_as_soon_as_it_goes_stale() {
    let h = Harness::start().await;
    let n = h.join("n1", &["node"]).await;
    let s = h.join("s1", &["supervisor"]).await;
    let token = h.token(&["supervisor"]).await;
    let key = key_for("e1");
    let e = h.client("e1");
    let mut body = register_body("e1", &key, &["supervisor"], &token);
    body["ephemeral"] = json!(true);
    let (st, v) = e.post("/v1/mesh/register", body).await;
    assert_eq!(st, 200, "{v}");
    let e_id = v["peer_id"].as_str().unwrap().to_owned();
    let mut stream = n.client.stream(None).await;
    assert!(
        matches!(stream.next_event().await.1, SseEvent::Snapshot(snap) if snap.peers.len() == 2)
    );

    // Three heartbeat intervals and a bit without a word from either.
    h.clock.advance_ms(31_000);
    assert_eq!(n.heartbeat(json!({})).await.0, 200);
    let out = h.coord.sweep();
    assert_eq!(
        (out.stale, out.removed),
        (vec![s.id.clone()], vec![e_id.clone()])
    );
    let mut removed = None;
    for _ in 0..2 {
        match stream.next_event().await.1 {
            SseEvent::PeerRemove(r) => removed = Some((r.peer_id, r.reason)),
            SseEvent::PeerUpsert(u) => assert!(u.peer_id == s.id && u.stale, "{u:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(removed, Some((e_id, "expired".to_owned())));
    assert_eq!(n.roster_ids().await, vec![s.id.clone()]);
}
