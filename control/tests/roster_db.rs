//! Members and the event log in the database (issue 14, slice 2): two coordinators in one
//! process on one PostgreSQL (started by the test; Debian `postgresql`), and one
//! coordinator restarted on its SQLite database.
//!
//! What is checked: a member registered on one coordinator is in the other's rosters and
//! streams; a heartbeat that changes it on the other reaches the first's streams; a
//! `Last-Event-ID` from one resumes on the other without a snapshot; an unchanged
//! heartbeat writes nothing; expiry with two coordinators is one event; a database outage
//! refuses writes (503) and serves reads, and the streams catch up with events when it
//! returns; an SQLite coordinator restarts with its members. The attacker: a member with a
//! valid certificate racing a coordinator that has not caught up cannot take an app or a
//! key bound through the other coordinator — the database refuses.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../tests/src/postgres.rs"]
mod postgres;

use std::time::{Duration, Instant};

use common::{key_for, register_body, EventStream, Harness, Pki};
use serde_json::json;
use tabbify_control::api::SseEvent;
use tabbify_control::storage::Database;

fn pg() -> postgres::Postgres {
    postgres::Postgres::start().unwrap_or_else(|e| panic!("{e}"))
}

/// Two coordinators on one database, each following the other.
struct Pair {
    a: Harness,
    b: Harness,
    _follow: Vec<tokio::task::JoinHandle<()>>,
}

async fn pair(db: &Database, tweak: fn(&mut tabbify_control::server::Config)) -> Pair {
    let pki = Pki::new();
    let a = Harness::start_with_pki(pki.clone(), |c| {
        c.database = Some(db.clone());
        tweak(c);
    })
    .await;
    let b = Harness::start_with_pki(pki, |c| {
        c.database = Some(db.clone());
        tweak(c);
    })
    .await;
    let follow = vec![
        tabbify_control::follow::spawn(&a.coord).unwrap().unwrap(),
        tabbify_control::follow::spawn(&b.coord).unwrap().unwrap(),
    ];
    Pair {
        a,
        b,
        _follow: follow,
    }
}

/// The next event on `s` that `pick` accepts (others are skipped), within 1 s.
async fn within_1s<T>(s: &mut EventStream, pick: impl Fn(u64, &SseEvent) -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        let left = Duration::from_secs(1).saturating_sub(started.elapsed());
        let frame = s
            .try_next(left)
            .await
            .unwrap_or_else(|| panic!("no matching event within 1 s"))
            .expect("stream ended");
        let id: u64 = frame.id.as_deref().unwrap().parse().unwrap();
        let ev = SseEvent::parse(&frame.event, &frame.data).unwrap();
        if let Some(v) = pick(id, &ev) {
            return v;
        }
    }
}

fn count(pg: &postgres::Postgres, db: &str, sql: &str) -> u64 {
    pg.psql(db, sql).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_shared_through_postgres_and_streams_resume_on_any_coordinator() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("roster").unwrap());
    let Pair { a, b, .. } = pair(&db, |_| {}).await;

    // Supervisors see nodes; one streams from each coordinator.
    let s1 = a.join("s1", &["supervisor"]).await;
    let s2 = b.join("s2", &["supervisor"]).await;
    let mut on_a = s1.client.stream(None).await;
    let mut on_b = s2.client.stream(None).await;
    assert!(matches!(on_a.next_event().await.1, SseEvent::Snapshot(_)));
    assert!(matches!(on_b.next_event().await.1, SseEvent::Snapshot(_)));

    // Registered on A: in B's stream and B's roster.
    let n1 = a.join("n1", &["node"]).await;
    let id_b = within_1s(&mut on_b, |id, e| match e {
        SseEvent::PeerUpsert(p) if p.peer_id == n1.id => Some(id),
        _ => None,
    })
    .await;
    let (st, v) = s2.client.get("/v1/mesh/peers").await;
    assert_eq!(st, 200, "{v}");
    assert!(common::ids(&v["peers"]).contains(&n1.id), "{v}");
    // The same event has the same id on A (the change-log id).
    let id_a = within_1s(&mut on_a, |id, e| match e {
        SseEvent::PeerUpsert(p) if p.peer_id == n1.id => Some(id),
        _ => None,
    })
    .await;
    assert_eq!(id_a, id_b, "event ids come from the database");

    // n1's heartbeat on B (it was never registered there) changes its endpoints: A's
    // stream gets the upsert.
    let n1_on_b = b.client("n1");
    let (st, v) = n1_on_b
        .post(
            "/v1/mesh/heartbeat",
            json!({"peer_id": n1.id, "endpoints": ["127.0.0.1:40000"]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let last_on_a = within_1s(&mut on_a, |id, e| match e {
        SseEvent::PeerUpsert(p) if p.peer_id == n1.id => {
            assert_eq!(p.endpoints[0].port(), 40000);
            Some(id)
        }
        _ => None,
    })
    .await;

    // An unchanged heartbeat writes no row: the change log does not grow and the stored
    // member (including last_seen) stays as it was. Its traffic report (new figures each
    // time) is held in memory only: no row either.
    let log_before = count(&pg, "roster", "SELECT count(*) FROM change_log");
    let member_before = pg
        .psql(
            "roster",
            "SELECT body || last_seen || stale FROM members ORDER BY peer_id",
        )
        .unwrap();
    for i in 0..3u64 {
        let (st, v) = n1_on_b
            .post(
                "/v1/mesh/heartbeat",
                json!({"peer_id": n1.id, "endpoints": ["127.0.0.1:40000"],
                       "traffic": {"rx_bytes": 1000 * i, "tx_bytes": 2000 * i, "peers": []}}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        b.clock.advance_ms(1_000);
    }
    b.coord.sweep();
    assert_eq!(
        count(&pg, "roster", "SELECT count(*) FROM change_log"),
        log_before
    );
    assert_eq!(
        pg.psql(
            "roster",
            "SELECT body || last_seen || stale FROM members ORDER BY peer_id"
        )
        .unwrap(),
        member_before
    );

    // More happens while s1 is away: n2 joins on B.
    drop(on_a);
    let n2 = b.join("n2", &["node"]).await;
    // s1 resumes on B with the id it last saw on A: the missed events, no snapshot.
    // With the event log A named (the database's, so B's too).
    let (head_a, _) = s1.client.stream_with(&[]).await;
    let log = head_a[tabbify_control::api::EVENT_LOG_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    let last = last_on_a.to_string();
    let (head_b, mut resumed) = b
        .client("s1")
        .stream_with(&[
            ("last-event-id", &last),
            (tabbify_control::api::EVENT_LOG_HEADER, &log),
        ])
        .await;
    assert_eq!(
        head_b[tabbify_control::api::EVENT_LOG_HEADER]
            .to_str()
            .unwrap(),
        log,
        "one event log per database"
    );
    let (id, ev) = resumed.next_event().await;
    match ev {
        SseEvent::PeerUpsert(p) => assert_eq!(p.peer_id, n2.id),
        other => panic!("expected the missed upsert, got {other:?}"),
    }
    assert!(id > last_on_a);
    assert_eq!(resumed.comments, 1, "the `: resumed` comment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_with_two_coordinators_is_one_event_on_every_stream() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("expiry").unwrap());
    let Pair { a, b, .. } = pair(&db, |c| {
        c.heartbeat_interval = Duration::from_secs(1);
        c.stale_after = Duration::from_secs(10);
    })
    .await;
    let s1 = a.join("s1", &["supervisor"]).await;
    let s2 = b.join("s2", &["supervisor"]).await;
    let n1 = a.join("n1", &["node"]).await;
    let mut on_a = s1.client.stream(None).await;
    let mut on_b = s2.client.stream(None).await;
    on_a.next_event().await;
    on_b.next_event().await;
    let (mut stale, mut removed) = (0, 0);
    // 30 s in 2 s steps: the supervisors keep heartbeating (unchanged), n1 does not.
    for _ in 0..15 {
        a.clock.advance_ms(2_000);
        b.clock.advance_ms(2_000);
        assert_eq!(
            s1.heartbeat(json!({"endpoints": ["127.0.0.1:51820"]}))
                .await
                .0,
            200
        );
        assert_eq!(
            s2.heartbeat(json!({"endpoints": ["127.0.0.1:51820"]}))
                .await
                .0,
            200
        );
        for c in [&a.coord, &b.coord] {
            let out = c.sweep();
            assert!(!out.stale.contains(&s1.id) && !out.stale.contains(&s2.id));
            stale += out.stale.len();
            removed += out.removed.len();
        }
    }
    assert_eq!((stale, removed), (1, 1), "one coordinator ran each expiry");
    for s in [&mut on_a, &mut on_b] {
        let mut events = Vec::new();
        while let Some(Some(f)) = s.try_next(Duration::from_millis(1500)).await {
            events.push(SseEvent::parse(&f.event, &f.data).unwrap());
        }
        let marks = events
            .iter()
            .filter(|e| matches!(e, SseEvent::PeerUpsert(p) if p.peer_id == n1.id && p.stale))
            .count();
        let removals = events
            .iter()
            .filter(|e| matches!(e, SseEvent::PeerRemove(r) if r.peer_id == n1.id && r.reason == "expired"))
            .count();
        assert_eq!((marks, removals), (1, 1), "{events:?}");
    }
    assert_eq!(count(&pg, "expiry", "SELECT count(*) FROM members"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_database_a_coordinator_serves_reads_and_catches_up_with_events() {
    let mut pg = pg();
    let db = Database::Postgres(pg.create_database("outage2").unwrap());
    let Pair { a, b, .. } = pair(&db, |_| {}).await;
    let s1 = a.join("s1", &["supervisor"]).await;
    let n1 = a.join("n1", &["node"]).await;
    let token = b.token(&["node"]).await;
    let mut on_a = s1.client.stream(None).await;
    assert!(matches!(on_a.next_event().await.1, SseEvent::Snapshot(_)));
    let stop = tokio::task::spawn_blocking(move || {
        pg.stop().unwrap();
        pg
    });
    let mut pg = stop.await.unwrap();
    // Reads and unchanged heartbeats are answered from memory; writes are refused.
    assert_eq!(s1.roster_ids().await, vec![n1.id.clone()]);
    let (st, v) = n1
        .heartbeat(json!({"endpoints": ["127.0.0.1:51820"]}))
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = n1
        .heartbeat(json!({"endpoints": ["127.0.0.1:41000"]}))
        .await;
    assert_eq!((st, v["code"].as_str()), (503, Some("unavailable")), "{v}");
    let (st, v) = a
        .admin()
        .post("/v1/tokens", json!({"tags": ["node"]}))
        .await;
    assert_eq!((st, v["code"].as_str()), (503, Some("unavailable")), "{v}");
    // The refused heartbeat changed nothing anyone sees.
    let (_, v) = s1.client.get("/v1/mesh/peers").await;
    assert_eq!(v["peers"][0]["endpoints"], json!(["127.0.0.1:51820"]));
    let start = tokio::task::spawn_blocking(move || {
        pg.start_server().unwrap();
        pg
    });
    let _pg = start.await.unwrap();
    // Once it is back, a member joins on B; A's stream gets it as an event (a catch-up,
    // not a resync).
    let n2 = b.client("n2");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, v) = n2
            .post(
                "/v1/mesh/register",
                register_body("n2", &key_for("n2"), &["node"], &token),
            )
            .await;
        if st == 200 {
            break;
        }
        assert_eq!(st, 503, "{v}");
        assert!(Instant::now() < deadline, "writes not back: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    loop {
        let f = on_a
            .try_next(Duration::from_secs(5))
            .await
            .expect("no event after the outage")
            .expect("stream ended");
        match SseEvent::parse(&f.event, &f.data).unwrap() {
            SseEvent::PeerUpsert(p) if p.identity == "n2" => break,
            SseEvent::Snapshot(_) | SseEvent::Policy(_) => panic!("a resync after the outage"),
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqlite_coordinator_restarts_with_its_members() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let state = dir.path().to_owned();
    let (n1_id, n2_id) = {
        let h = Harness::start_with_pki(pki.clone(), |c| c.state_dir = Some(state.clone())).await;
        let n1 = h.join("n1", &["supervisor"]).await;
        let n2 = h.join("n2", &["node"]).await;
        let (st, _) = n2
            .heartbeat(json!({"endpoints": ["127.0.0.1:42000"]}))
            .await;
        assert_eq!(st, 200);
        // A revoked member and one whose key was cleared leave the stored roster too.
        h.join("n3", &["node"]).await;
        h.join("n4", &["node"]).await;
        assert_eq!(h.admin().delete("/v1/identities/n3").await.0, 200);
        assert_eq!(h.admin().delete("/v1/identities/n4/key").await.0, 200);
        (n1.id, n2.id)
    };
    let h = Harness::start_with_pki(pki, |c| c.state_dir = Some(state.clone())).await;
    // Nobody registered again: the roster came from the database.
    let n1 = h.client("n1");
    let (st, v) = n1.get("/v1/mesh/peers").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(common::ids(&v["peers"]), vec![n2_id.clone()]);
    assert_eq!(v["peers"][0]["endpoints"], json!(["127.0.0.1:42000"]));
    let (st, v) = n1
        .post(
            "/v1/mesh/heartbeat",
            json!({"peer_id": n1_id, "endpoints": ["127.0.0.1:51820"]}),
        )
        .await;
    assert_eq!(st, 200, "a known member's heartbeat after the restart: {v}");
    // A Last-Event-ID from before the restart gets a snapshot, never a wrong replay.
    let mut s = n1.stream(Some(3)).await;
    assert!(matches!(s.next_event().await.1, SseEvent::Snapshot(_)));
}

/// The attacker: a member with a valid certificate uses a coordinator that has not
/// caught up (no follower, no commit since) to claim an app, or register a key, that the
/// other coordinator bound. The database refuses both; nothing changes anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_coordinator_cannot_hand_over_an_app_or_key_bound_on_the_other() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("steal").unwrap());
    let pki = Pki::new();
    let a = Harness::start_with_pki(pki.clone(), |c| c.database = Some(db.clone())).await;
    let b = Harness::start_with_pki(pki, |c| c.database = Some(db.clone())).await;
    // B does not follow the change log. Mallory joins on B, and gets a token there, before
    // the victim does anything.
    let mallory = b.join("mallory", &["supervisor"]).await;
    let token = b.token(&["node"]).await;
    // The victim, on A, hosts an app.
    let victim = a.join("victim", &["supervisor"]).await;
    let app = tabbify_control::ula::app_ula(&uuid::Uuid::from_u128(7));
    let (st, v) = victim
        .heartbeat(json!({"endpoints": ["127.0.0.1:51820"], "hosted_app_ulas": [app]}))
        .await;
    assert_eq!(st, 200, "{v}");
    // Mallory claims the app through B, which believes it free.
    let (st, v) = mallory
        .heartbeat(json!({"endpoints": ["127.0.0.1:51820"], "hosted_app_ulas": [app]}))
        .await;
    assert_eq!((st, v["code"].as_str()), (409, Some("conflict")), "{v}");
    // And registers the victim's key under another identity through B.
    let (st, v) = b
        .client("mallory2")
        .post(
            "/v1/mesh/register",
            register_body("mallory2", &victim.key, &["node"], &token),
        )
        .await;
    assert_eq!(st, 409, "{v}");
    let holder = pg.psql("steal", "SELECT peer_id FROM member_apps").unwrap();
    assert_eq!(holder.trim(), victim.id);
    let owner = pg
        .psql(
            "steal",
            &format!(
                "SELECT identity FROM identity_keys WHERE key = '{}'",
                common::b64(&victim.key)
            ),
        )
        .unwrap();
    assert_eq!(owner.trim(), "victim");
    assert_eq!(count(&pg, "steal", "SELECT count(*) FROM members"), 2);
    // A fresh coordinator reads the truth: the app is the victim's.
    let c = Harness::start_with_pki(a.pki.clone(), |c| c.database = Some(db.clone())).await;
    let ops = c.join("ops1", &["ops"]).await;
    let (_, v) = ops.client.get("/v1/mesh/peers").await;
    let entry = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == victim.id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(entry["hosted_app_ulas"], json!([app]));
}

/// The change log is pruned by the expiry-lock holder (here: to the newest 3 entries),
/// the newest entry always stays, and a `Last-Event-ID` from before the pruned horizon on
/// a coordinator that never saw those events gets a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_log_is_pruned_and_an_old_event_id_gets_a_snapshot() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("prune").unwrap());
    let Pair { a, .. } = pair(&db, |c| c.change_log_keep = (Duration::from_secs(3600), 3)).await;
    let s1 = a.join("s1", &["supervisor"]).await;
    let mut stream = s1.client.stream(None).await;
    let (first, _) = stream.next_event().await;
    for i in 0..4 {
        a.join(&format!("n{i}"), &["node"]).await;
    }
    assert!(count(&pg, "prune", "SELECT count(*) FROM change_log") > 3);
    let newest = count(&pg, "prune", "SELECT max(id) FROM change_log");
    a.coord.sweep();
    assert_eq!(count(&pg, "prune", "SELECT count(*) FROM change_log"), 3);
    assert_eq!(
        count(&pg, "prune", "SELECT max(id) FROM change_log"),
        newest
    );
    // A coordinator started now continues the ids and cannot replay what was pruned.
    let c = Harness::start_with_pki(a.pki.clone(), |c| c.database = Some(db.clone())).await;
    let mut s = c.client("s1").stream(Some(first)).await;
    match s.next_event().await {
        (id, SseEvent::Snapshot(p)) => {
            assert_eq!(id, newest);
            assert_eq!(p.peers.len(), 4);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

/// The `change_log` fuzz target's member logic on its seeds (the fuzz crate is built by
/// scripts/test-fuzz.sh with nightly; this runs the same steps on stable): hostile rows
/// (a forged peer id, a claim on an app, removals of unknown members) go into a roster
/// without a panic, and a valid row is served.
#[test]
fn member_rows_from_the_change_log_seed_go_into_a_roster_without_a_panic() {
    use tabbify_control::members::MemberRow;
    use tabbify_control::policy::Policy;
    use tabbify_control::registry::{Limits, Registry};
    use tabbify_control::storage::Change;
    let seed = include_str!("../fuzz/corpus/change_log/member.json");
    let mut changes: Vec<Change> = serde_json::from_str(seed).unwrap();
    let Change::Member(forged) = changes[0].clone() else {
        panic!("the seed starts with a member row")
    };
    let valid = MemberRow {
        peer_id: tabbify_control::ula::identity_peer_id("n1"),
        ..forged
    };
    changes.push(Change::Member(valid.clone()));
    let body = valid.body();
    assert_eq!(MemberRow::from_body(&body, 1, false).unwrap().body(), body);
    assert!(MemberRow::from_body("{\"peer_id\":1}", 1, false).is_err());
    let policy = Policy::compile(common::policy()).unwrap();
    let mut roster = Registry::new(std::sync::Arc::new(policy), 1, Limits::default());
    roster.set_coalescing(false);
    for c in &changes {
        match c {
            Change::Member(row) => {
                roster.apply_member(row);
            }
            Change::RemoveMember(id, reason) => {
                roster.remove(id, reason);
            }
            Change::StaleMember(id, _) => roster.mark_stale(id),
            _ => {}
        }
    }
    assert_eq!(roster.len(), 1);
    assert!(roster.peer("forged").is_none());
    // A node may not host apps under the test policy: the claim is dropped.
    assert!(roster
        .peer(&valid.peer_id)
        .unwrap()
        .hosted_app_ulas
        .is_empty());
}

/// An unlimited (fleet) token spent through two coordinators at once is counted twice,
/// never a conflict; a single-use one still cannot be spent twice.
#[test]
fn an_unlimited_token_spent_through_two_coordinators_does_not_conflict() {
    use tabbify_control::store::{IdentityRecord, Store, TokenRecord};
    let pg = pg();
    let db = Database::Postgres(pg.create_database("fleet").unwrap());
    let token = |max_uses| TokenRecord {
        tags: vec!["node".into()],
        name: None,
        expires_at: u64::from(u32::MAX),
        max_uses,
        uses: 0,
        identity: None,
        created_at: 1,
    };
    let ident = |key: &str| IdentityRecord {
        key: Some(key.into()),
        display_name: key.into(),
        ..IdentityRecord::default()
    };
    let mut a = Store::open_database(&db, None, 1).unwrap();
    a.put_token("fleet".into(), token(0)).unwrap();
    a.put_token("once".into(), token(1)).unwrap();
    let mut b = Store::open_database(&db, None, 1).unwrap();
    a.admit("m1", ident("K1"), Some("fleet")).unwrap();
    // B has not caught up: its view of the fleet token is one use behind.
    b.admit("m2", ident("K2"), Some("fleet")).unwrap();
    assert_eq!(
        count(&pg, "fleet", "SELECT uses FROM tokens WHERE hash = 'fleet'"),
        2
    );
    a.admit("m3", ident("K3"), Some("once")).unwrap();
    assert!(b.admit("m4", ident("K4"), Some("once")).is_err());
}

/// A coordinator that was behind by more entries than the stream broadcast holds (1,024)
/// catches up in chunks: its streams get every missed event, no snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backlog_reaches_the_streams_as_events_not_snapshots() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("backlog").unwrap());
    let pki = Pki::new();
    let a = Harness::start_with_pki(pki.clone(), |c| c.database = Some(db.clone())).await;
    let b = Harness::start_with_pki(pki, |c| c.database = Some(db.clone())).await;
    let n1 = a.join("n1", &["node"]).await;
    let s1 = b.join("s1", &["supervisor"]).await;
    let mut stream = s1.client.stream(None).await;
    assert!(matches!(stream.next_event().await.1, SseEvent::Snapshot(_)));
    // B does not follow the log: A's 1,300 changes pile up.
    let n = 1300u16;
    for i in 0..n {
        a.clock.advance_ms(1_000);
        let (st, v) = n1
            .heartbeat(json!({"endpoints": [format!("127.0.0.1:{}", 20_000 + i)]}))
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let coord = b.coord.clone();
    let applied = tokio::task::spawn_blocking(move || coord.catch_up().unwrap())
        .await
        .unwrap();
    assert!(applied >= usize::from(n), "{applied}");
    let mut last_port = 0;
    while last_port != 20_000 + n - 1 {
        match stream.next_event().await.1 {
            SseEvent::PeerUpsert(p) if p.peer_id == n1.id => last_port = p.endpoints[0].port(),
            SseEvent::Snapshot(_) | SseEvent::Policy(_) => panic!("resynced instead of caught up"),
            _ => {}
        }
    }
}

/// n1's `stale` flag as `viewer` sees it in its roster (`None`: not in the roster).
async fn stale_in_roster(viewer: &common::Peer, n1: &str) -> Option<bool> {
    let (st, v) = viewer.client.get("/v1/mesh/peers").await;
    assert_eq!(st, 200, "{v}");
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == n1)
        .map(|p| p["stale"].as_bool().unwrap_or(false))
}

/// A coordinator alone on its SQLite database judges liveness from the exact last
/// heartbeat in its memory: stale at three missed intervals (30 s at 10 s heartbeats), not
/// at the coarsened 66 s a shared database needs. A member loaded at a restart and not
/// heard from since has only the coarsened stored `last_seen`, so it gets the slack until
/// its first heartbeat, and is exact again from then on. The attacker: a member with a
/// valid certificate heartbeating another member's peer id is refused (403) and does not
/// keep it fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_sqlite_coordinator_judges_staleness_from_the_exact_last_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let state = dir.path().to_owned();
    let t0 = 1_700_000_000_000u64;
    let tweak = |c: &mut tabbify_control::server::Config| {
        c.state_dir = Some(state.clone());
        c.heartbeat_interval = Duration::from_secs(10);
    };
    let hb = json!({"endpoints": ["127.0.0.1:51820"]});
    let n1_id = {
        let h = Harness::start_at(pki.clone(), t0, tweak).await;
        let s1 = h.join("s1", &["supervisor"]).await;
        let n1 = h.join("n1", &["node"]).await;
        let mallory = h.join("mallory", &["node"]).await;
        for _ in 0..3 {
            h.clock.advance_ms(9_500);
            assert_eq!(s1.heartbeat(hb.clone()).await.0, 200);
            assert_eq!(mallory.heartbeat(hb.clone()).await.0, 200);
            let (st, v) = mallory
                .client
                .post(
                    "/v1/mesh/heartbeat",
                    json!({"peer_id": n1.id, "endpoints": ["127.0.0.1:51820"]}),
                )
                .await;
            assert_eq!(st, 403, "another member's peer id: {v}");
            let out = h.coord.sweep();
            assert!(out.stale.is_empty(), "28.5 s at most: {out:?}");
        }
        // 30.5 s since n1's registration: three intervals missed.
        h.clock.advance_ms(2_000);
        let out = h.coord.sweep();
        assert_eq!(out.stale, vec![n1.id.clone()], "exact, not 66 s");
        assert_eq!(stale_in_roster(&s1, &n1.id).await, Some(true));
        n1.id
    };
    // Restarted 40 s after t0. s1 heartbeated at 28.5 s, but the database holds t0 (the
    // coarsened write is due only every 30 s): judged by that alone it would be stale at
    // once. Loaded and not heard from since: the coarsened slack applies.
    let h = Harness::start_at(pki, t0 + 40_000, tweak).await;
    let s1 = common::Peer {
        name: "s1".into(),
        id: tabbify_control::ula::identity_peer_id("s1"),
        key: key_for("s1"),
        client: h.client("s1"),
        registration: json!({}),
    };
    let out = h.coord.sweep();
    assert!(!out.stale.contains(&s1.id), "{out:?}");
    assert_eq!(
        stale_in_roster(&s1, &n1_id).await,
        Some(true),
        "n1 stayed stale"
    );
    // Heard from at 45 s: exact from then on (stale after 75 s, not at the loaded 66 s).
    h.clock.advance_ms(5_000);
    assert_eq!(s1.heartbeat(hb.clone()).await.0, 200);
    h.clock.advance_ms(25_000);
    assert!(!h.coord.sweep().stale.contains(&s1.id), "70 s");
    h.clock.advance_ms(5_500);
    assert!(h.coord.sweep().stale.contains(&s1.id), "75.5 s");
}

/// Several coordinators on PostgreSQL keep the coarsened rule: a member is stale once
/// the database has not seen it for three intervals plus 3.5 intervals plus a second (66 s
/// at 10 s heartbeats), whichever coordinator judges, and not at 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_sharing_postgres_judge_staleness_from_the_coarsened_last_seen() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("coarse").unwrap());
    let Pair { a, b, .. } = pair(&db, |c| c.heartbeat_interval = Duration::from_secs(10)).await;
    let s1 = a.join("s1", &["supervisor"]).await;
    let n1 = b.join("n1", &["node"]).await;
    let hb = json!({"endpoints": ["127.0.0.1:51820"]});
    let mut stale = Vec::new();
    // 66.5 s in 0.5 s .. 9.5 s steps; s1 heartbeats, n1 does not.
    let mut at = 0u64;
    for step in [9_500u64, 9_500, 9_500, 2_000, 9_500, 9_500, 9_500, 7_500] {
        at += step;
        a.clock.advance_ms(step);
        b.clock.advance_ms(step);
        assert_eq!(s1.heartbeat(hb.clone()).await.0, 200);
        for c in [&a.coord, &b.coord] {
            stale.extend(c.sweep().stale);
        }
        assert!(stale.is_empty(), "at {at} ms: {stale:?}");
    }
    assert_eq!(at, 66_500);
    a.clock.advance_ms(1_000);
    b.clock.advance_ms(1_000);
    for c in [&a.coord, &b.coord] {
        stale.extend(c.sweep().stale);
    }
    assert_eq!(stale, vec![n1.id.clone()], "stale at 67.5 s, once");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for c in [&a, &b] {
        c.coord.catch_up().unwrap();
    }
    assert_eq!(stale_in_roster(&s1, &n1.id).await, Some(true));
}

/// `(status, set-cookie, body)` of a request without a client certificate to `h`.
async fn browser(
    h: &Harness,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, serde_json::Value) {
    use http_body_util::BodyExt;
    let anon = h.pki.client_with(None).at(h.addr);
    let body = (method != "GET" && method != "DELETE").then(|| bytes::Bytes::from("{}"));
    let resp = anon.send(method, path, body, headers).await.unwrap();
    let status = resp.status().as_u16();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, cookie, v)
}

/// Dashboard sessions live in the database: a link minted on A opens a session on B
/// (behind a load balancer), which A accepts; the link is spent for both; a logout on A
/// ends the session on B; a restarted coordinator keeps its sessions. The attacker: a
/// browser replaying a spent link on the other coordinator, and one sending another
/// session's CSRF token there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sessions_are_shared_by_coordinators_on_one_postgres_and_survive_restarts() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("sessions").unwrap());
    let Pair { a, b, .. } = pair(&db, |_| {}).await;
    let link = |h: &Harness| {
        let admin = h.admin();
        async move {
            let (st, v) = admin.post("/v1/admin/login-links", json!({})).await;
            assert_eq!(st, 200, "{v}");
            v["path"].as_str().unwrap().to_owned()
        }
    };
    let path = link(&a).await;
    let (st, cookie, _) = browser(&b, "GET", &path, &[]).await;
    assert_eq!(st, 303, "a link minted on A is redeemed on B");
    let cookie = cookie.unwrap();
    // Spent once for every coordinator.
    assert_eq!(browser(&a, "GET", &path, &[]).await.0, 401);
    assert_eq!(browser(&b, "GET", &path, &[]).await.0, 401);
    let (st, _, on_b) = browser(&b, "GET", "/v1/admin/session", &[("cookie", &cookie)]).await;
    assert_eq!(st, 200, "{on_b}");
    let (st, _, on_a) = browser(&a, "GET", "/v1/admin/session", &[("cookie", &cookie)]).await;
    assert_eq!(st, 200, "A accepts B's session: {on_a}");
    assert_eq!(on_a["csrf_token"], on_b["csrf_token"]);
    let csrf = on_a["csrf_token"].as_str().unwrap().to_owned();
    // A change through A with the session's token works; another session's token is
    // refused on either.
    let (st, other, _) = browser(&a, "GET", &link(&b).await, &[]).await;
    assert_eq!(st, 303);
    let other = other.unwrap();
    let (_, _, o) = browser(&a, "GET", "/v1/admin/session", &[("cookie", &other)]).await;
    let other_csrf = o["csrf_token"].as_str().unwrap().to_owned();
    assert_ne!(other_csrf, csrf);
    for h in [&a, &b] {
        let (st, _, v) = browser(
            h,
            "POST",
            "/v1/tokens",
            &[("cookie", &cookie), ("x-csrf-token", &other_csrf)],
        )
        .await;
        assert_eq!((st, v["code"].as_str()), (403, Some("csrf")), "{v}");
    }
    let (st, _, v) = browser(
        &b,
        "POST",
        "/v1/tokens",
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // Only hashes are stored.
    let stored = pg
        .psql("sessions", "SELECT hash || admin FROM dashboard_sessions")
        .unwrap();
    let id = cookie.split_once('=').unwrap().1;
    assert!(
        !stored.contains(id),
        "the session id itself is never stored"
    );
    assert_eq!(
        count(&pg, "sessions", "SELECT count(*) FROM dashboard_sessions"),
        2
    );
    // A restart of B keeps the sessions.
    drop(b);
    let b2 = Harness::start_with_pki(a.pki.clone(), |c| c.database = Some(db.clone())).await;
    let (st, _, _) = browser(&b2, "GET", "/v1/admin/session", &[("cookie", &cookie)]).await;
    assert_eq!(st, 200, "still logged in after a restart");
    // A logout on A ends the session on B too.
    let (st, _, _) = browser(
        &a,
        "DELETE",
        "/v1/admin/session",
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
    )
    .await;
    assert_eq!(st, 200);
    let (st, _, v) = browser(&b2, "GET", "/v1/admin/members", &[("cookie", &cookie)]).await;
    assert_eq!((st, v["code"].as_str()), (401, Some("unauthorized")), "{v}");
    // Expired sessions are purged: 8 h later, the next login removes the other one.
    a.clock
        .advance_ms(tabbify_control::sessions::SESSION_TTL_SECS * 1000);
    let (st, _, _) = browser(&a, "GET", "/v1/admin/session", &[("cookie", &other)]).await;
    assert_eq!(st, 401, "expired");
    let (st, fresh, _) = browser(&a, "GET", &link(&a).await, &[]).await;
    assert_eq!(st, 303);
    assert!(fresh.is_some());
    assert_eq!(
        count(&pg, "sessions", "SELECT count(*) FROM dashboard_sessions"),
        1,
        "the expired session was purged"
    );
}
