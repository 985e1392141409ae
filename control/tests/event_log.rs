//! Issue 14: a joiner that moves between coordinators resumes its roster stream with
//! `Last-Event-ID` and the event log (`x-tabbify-event-log`) the id came from. The
//! coordinator replays only ids of its own log; an id of another log (another coordinator
//! with its own roster, or this one before a restart) gets a snapshot, never a replay of
//! unrelated events.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use tabbify_control::api::{SseEvent, EVENT_LOG_HEADER};

#[tokio::test]
async fn an_event_id_of_another_event_log_gets_a_snapshot_not_a_replay() {
    let h = Harness::start().await;
    let n = h.join("n1", &["node"]).await;
    let s1 = h.join("s1", &["supervisor"]).await;
    let (head, mut st) = n.client.stream_with(&[]).await;
    let log = head[EVENT_LOG_HEADER].to_str().unwrap().to_owned();
    assert_eq!(log.len(), 32, "{log}");
    let (last, _) = st.next_event().await;
    drop(st);
    let s2 = h.join("s2", &["supervisor"]).await;
    let last = last.to_string();

    // The same log: the missed upsert is replayed.
    let (head, mut st) = n
        .client
        .stream_with(&[("last-event-id", &last), (EVENT_LOG_HEADER, &log)])
        .await;
    assert_eq!(head[EVENT_LOG_HEADER].to_str().unwrap(), log);
    let e = st.next_event().await.1;
    assert!(
        matches!(e, SseEvent::PeerUpsert(ref p) if p.peer_id == s2.id),
        "{e:?}"
    );
    drop(st);

    // Another log (the id is in range here, but it numbers other events): a snapshot.
    let (_, mut st) = n
        .client
        .stream_with(&[("last-event-id", &last), (EVENT_LOG_HEADER, "another-log")])
        .await;
    match st.next_event().await.1 {
        SseEvent::Snapshot(snap) => {
            let mut ids: Vec<String> = snap.peers.iter().map(|p| p.peer_id.clone()).collect();
            ids.sort();
            let mut want = vec![s1.id.clone(), s2.id.clone()];
            want.sort();
            assert_eq!(ids, want);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    // Without the header (an older joiner) the id alone decides, as before.
    let (_, mut st) = n.client.stream_with(&[("last-event-id", &last)]).await;
    assert!(matches!(st.next_event().await.1, SseEvent::PeerUpsert(_)));
}
