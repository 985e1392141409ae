//! The roster stream in-process over mTLS: first event, order and ACL filtering,
//! `Last-Event-ID` resume and its fallback to a snapshot, resync of every stream on a
//! policy change, keepalives, and a client that stops reading.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tabbify_control::api::SseEvent;

#[tokio::test]
async fn events_arrive_in_order_and_only_what_the_acl_shows() {
    let h = Harness::start().await;
    let n = h.join("n1", &["node"]).await;
    let mut st = n.client.stream(None).await;
    let (id0, first) = st.next_event().await;
    assert!(
        matches!(first, SseEvent::Snapshot(ref s) if s.peers.is_empty() && s.policy_revision == 1)
    );

    let s1 = h.join("s1", &["supervisor"]).await;
    let _w = h.join("w1", &["worker"]).await; // invisible to a node
    let _i = h.join("i1", &["isolated"]).await; // invisible to everyone
                                                // Past the per-peer event window, so the heartbeat's change goes out at once.
    h.clock.advance_ms(1_000);
    assert_eq!(
        s1.heartbeat(json!({"endpoints": ["127.0.0.1:4000"]}))
            .await
            .0,
        200
    );
    let s2 = h.join("s2", &["supervisor"]).await;

    let mut ids = vec![id0];
    let (id, e) = st.next_event().await;
    ids.push(id);
    assert!(
        matches!(e, SseEvent::PeerUpsert(ref p) if p.peer_id == s1.id && p.endpoints.len() == 1 && p.endpoints[0].port() == 51820)
    );
    let (id, e) = st.next_event().await;
    ids.push(id);
    assert!(
        matches!(e, SseEvent::PeerUpsert(ref p) if p.peer_id == s1.id && p.endpoints[0].port() == 4000)
    );
    let (id, e) = st.next_event().await;
    ids.push(id);
    assert!(matches!(e, SseEvent::PeerUpsert(ref p) if p.peer_id == s2.id));
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // The worker and isolated joins produced events with ids this stream skipped.
    assert!(ids[2] - ids[1] > 1, "{ids:?}");
}

/// The value of the coordinator's counter `name` on `/metrics`.
async fn metric(h: &Harness, name: &str) -> u64 {
    let (_, v) = h.admin().get("/metrics").await;
    let text = v.as_str().unwrap().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("tabbify_coordinator_{name} ")))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn last_event_id_resumes_or_falls_back_to_a_snapshot() {
    let h = Harness::start_with(|c| c.limits.ring = 8).await;
    let n = h.join("n1", &["node"]).await;
    let s1 = h.join("s1", &["supervisor"]).await;
    let mut st = n.client.stream(None).await;
    let (last, _) = st.next_event().await;
    drop(st);

    let s2 = h.join("s2", &["supervisor"]).await;
    let mut st = n.client.stream(Some(last)).await;
    let (id, e) = st.next_event().await;
    assert!(id > last);
    assert!(
        matches!(e, SseEvent::PeerUpsert(ref p) if p.peer_id == s2.id),
        "{e:?}"
    );
    drop(st);
    // The outcome is counted: one stream resumed, the first one started with a snapshot.
    assert_eq!(metric(&h, "streams_resumed_total").await, 1);
    assert_eq!(metric(&h, "stream_snapshots_total").await, 1);

    // Far more events than the ring holds: the resume falls back to a snapshot.
    for i in 0..20 {
        // One second apart: within the rate limit, each change its own event.
        h.clock.advance_ms(1_000);
        s1.heartbeat(json!({"endpoints": [format!("127.0.0.1:{}", 1000 + i)]}))
            .await;
    }
    let mut st = n.client.stream(Some(id)).await;
    let (_, e) = st.next_event().await;
    match e {
        SseEvent::Snapshot(s) => {
            assert_eq!(s.peers.len(), 2);
            let p = s.peers.iter().find(|p| p.peer_id == s1.id).unwrap();
            assert_eq!(p.endpoints[0].port(), 1019);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    // An id from the future is also answered with a snapshot.
    let mut st = n.client.stream(Some(1_000_000)).await;
    assert!(matches!(st.next_event().await.1, SseEvent::Snapshot(_)));
    // A client cannot pass a fallback off as a resume.
    assert_eq!(metric(&h, "streams_resumed_total").await, 1);
    assert_eq!(metric(&h, "stream_snapshots_total").await, 3);
}

#[tokio::test]
async fn a_policy_change_resyncs_every_stream_at_once() {
    let h = Harness::start().await;
    let n = h.join("n1", &["node"]).await;
    let w = h.join("w1", &["worker"]).await;
    let s = h.join("s1", &["supervisor"]).await;
    let mut sn = n.client.stream(None).await;
    let mut sw = w.client.stream(None).await;
    let (before, _) = sn.next_event().await;
    sw.next_event().await;

    let (status, v) = h
        .admin()
        .put(
            "/v1/policy",
            json!({
                "tags": ["node", "supervisor", "worker", "ops", "isolated"],
                "allow": [{"src": ["tag:node"], "dst": ["tag:worker:22"]}]
            }),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["revision"], 2);

    let (idn, en) = sn.next_event().await;
    let (idw, ew) = sw.next_event().await;
    assert_eq!(idn, idw, "one policy event for every stream");
    match (en, ew) {
        (SseEvent::Policy(a), SseEvent::Policy(b)) => {
            assert_eq!(a.policy_revision, 2);
            assert_eq!(a.peers.len(), 1);
            assert_eq!(a.peers[0].peer_id, w.id);
            assert_eq!(a.peers[0].ports.outbound[0].first, 22);
            assert_eq!(b.peers.len(), 1);
            assert_eq!(b.peers[0].peer_id, n.id);
            assert_eq!(b.peers[0].ports.inbound[0].first, 22);
        }
        other => panic!("expected policy events, got {other:?}"),
    }
    assert!(n.roster_ids().await == vec![w.id.clone()]);
    assert!(s.roster_ids().await.is_empty());
    // Resuming from before the change needs a fresh snapshot under the new policy.
    let mut again = n.client.stream(Some(before)).await;
    match again.next_event().await.1 {
        SseEvent::Snapshot(snap) => assert_eq!(snap.policy_revision, 2),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    // Later changes follow the new policy.
    h.clock.advance_ms(1_000);
    assert_eq!(
        w.heartbeat(json!({"endpoints": ["127.0.0.1:7"]})).await.0,
        200
    );
    assert!(matches!(sn.next_event().await.1, SseEvent::PeerUpsert(ref p) if p.peer_id == w.id));
}

#[tokio::test]
async fn keepalive_comments_flow_on_an_idle_stream() {
    let h = Harness::start_with(|c| c.stream.keepalive = Duration::from_millis(100)).await;
    let n = h.join("n1", &["node"]).await;
    let mut st = n.client.stream(None).await;
    st.next_event().await;
    // No event comes, but comments do.
    let deadline = tokio::time::Instant::now() + WAIT;
    while st.comments < 2 && tokio::time::Instant::now() < deadline {
        assert!(
            st.try_next(Duration::from_millis(100)).await.is_none(),
            "unexpected event"
        );
    }
    assert!(st.comments >= 2, "{} keepalives", st.comments);
}

#[tokio::test]
async fn a_stalled_client_does_not_hold_up_the_others() {
    let h = Harness::start_with(|c| {
        c.stream.write_timeout = Duration::from_millis(300);
        c.limits.broadcast = 4;
    })
    .await;
    let n = h.join("n1", &["node"]).await;
    let stalled = h.join("n2", &["node"]).await;
    let s = h.join("s1", &["supervisor"]).await;
    let mut live = n.client.stream(None).await;
    live.next_event().await;
    // Opened and never read again.
    let _stalled_stream = stalled.client.stream(None).await;
    let big: Vec<String> = (0..64)
        .map(|i| format!("127.0.0.1:{}", 10_000 + i))
        .collect();
    for round in 0..200u16 {
        let mut eps = big.clone();
        eps[0] = format!("127.0.0.1:{}", 20_000 + round);
        h.clock.advance_ms(1_000);
        assert_eq!(s.heartbeat(json!({"endpoints": eps})).await.0, 200);
        // The reader keeps up with every change.
        let (_, e) = live.next_event().await;
        assert!(
            matches!(e, SseEvent::PeerUpsert(ref p) if p.endpoints[0].port() == 20_000 + round)
        );
    }
}
