//! Subnet routes, exit nodes and the mesh IPv4 (issue 15, Deliver 2, coordinator side).
//!
//! What is checked: registration hands out a unique mesh IPv4 the member cannot choose;
//! an advertisement is approved by the policy's `routes` or stays pending until an admin
//! approves it (`POST /v1/routes/{id}/approve`, admin only: a member certificate gets
//! 403); a viewer gets a router's routes only as far as its allow rules reach, and the
//! router's `may_use` for a member the policy does not allow stays empty; an approval
//! reaches a viewer's stream as an upsert, survives a restart (SQLite), and reaches a
//! stream on another coordinator (PostgreSQL). The attacker: a member with a valid
//! certificate advertising mesh space (`fd5a:1f00::/32`, another member's ULA /128),
//! `100.64.0.0/10`, or `0.0.0.0/0` in `advertise_routes` gets a 400 naming the field.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../tests/src/postgres.rs"]
mod postgres;

use std::time::{Duration, Instant};

use common::{key_for, register_body, EventStream, Harness, Peer, Pki};
use serde_json::{json, Value};
use tabbify_control::api::{RosterEntry, SseEvent};
use tabbify_control::storage::Database;

fn routes_policy() -> Value {
    json!({
        "tags": ["router", "exit", "user", "guest"],
        "allow": [
            {"src": ["tag:user"], "dst": ["tag:router:22", "tag:exit:22", "10.1.0.0/16",
                                        "192.168.0.0/16", "autogroup:internet"]},
            {"src": ["tag:guest"], "dst": ["tag:router:22"]}
        ],
        "routes": {
            "10.0.0.0/8": ["tag:router"],
            "0.0.0.0/0": ["tag:exit"],
            "::/0": ["tag:exit"]
        }
    })
}

async fn put_policy(h: &Harness, doc: Value) {
    let (st, v) = h.admin().put("/v1/policy", doc).await;
    assert_eq!(st, 200, "{v}");
}

async fn join_with(h: &Harness, name: &str, tags: &[&str], extra: Value) -> Peer {
    let token = h.token(tags).await;
    let key = key_for(name);
    let client = h.client(name);
    let mut body = register_body(name, &key, tags, &token);
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (s, v) = client.post("/v1/mesh/register", body).await;
    assert_eq!(s, 200, "{v}");
    Peer {
        name: name.to_owned(),
        id: v["peer_id"].as_str().unwrap().to_owned(),
        key,
        client,
        registration: v,
    }
}

async fn roster(p: &Peer) -> Vec<RosterEntry> {
    let (st, v) = p.client.get("/v1/mesh/peers").await;
    assert_eq!(st, 200, "{v}");
    serde_json::from_value(v["peers"].clone()).unwrap()
}

async fn entry_for(viewer: &Peer, id: &str) -> RosterEntry {
    roster(viewer)
        .await
        .into_iter()
        .find(|e| e.peer_id == id)
        .unwrap_or_else(|| panic!("{} does not see {id}", viewer.name))
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The next upsert of `id` on `s` within `d` (other events skipped; a snapshot counts
/// with its entry for `id`).
async fn upsert_of(s: &mut EventStream, id: &str, d: Duration) -> RosterEntry {
    let started = Instant::now();
    loop {
        let left = d.saturating_sub(started.elapsed());
        let frame = s
            .try_next(left)
            .await
            .unwrap_or_else(|| panic!("no upsert of {id} in time"))
            .expect("stream ended");
        match SseEvent::parse(&frame.event, &frame.data).unwrap() {
            SseEvent::PeerUpsert(p) if p.peer_id == id => return p,
            SseEvent::Snapshot(snap) | SseEvent::Policy(snap) => {
                if let Some(p) = snap.peers.into_iter().find(|p| p.peer_id == id) {
                    return p;
                }
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_approved_by_policy_or_admin_and_used_as_the_policy_allows() {
    let h = Harness::start().await;
    put_policy(&h, routes_policy()).await;

    let router = join_with(
        &h,
        "router1",
        &["router"],
        json!({"advertise_routes": ["10.1.0.0/16", "192.168.7.0/24"],
               // A member cannot choose its IPv4: the field is not part of the request.
               "ipv4": "100.64.0.1"}),
    )
    .await;
    let user = join_with(&h, "user1", &["user"], json!({})).await;
    let guest = join_with(&h, "guest1", &["guest"], json!({})).await;

    // Mesh IPv4s: in 100.64.0.0/10, distinct, not the one asked for.
    let v4 = |p: &Peer| -> std::net::Ipv4Addr {
        p.registration["ipv4"].as_str().unwrap().parse().unwrap()
    };
    let addrs = [v4(&router), v4(&user), v4(&guest)];
    for a in addrs {
        assert_eq!(a.octets()[0], 100);
        assert!((64..128).contains(&a.octets()[1]), "{a}");
    }
    assert_ne!(
        addrs[0],
        "100.64.0.1".parse::<std::net::Ipv4Addr>().unwrap()
    );
    assert!(addrs[0] != addrs[1] && addrs[1] != addrs[2] && addrs[0] != addrs[2]);
    // Re-registering keeps it.
    let again = join_with(&h, "user1", &["user"], json!({})).await;
    assert_eq!(v4(&again), addrs[1]);

    // The router's own view: 10.1.0.0/16 approved by the policy, 192.168.7.0/24 pending.
    assert_eq!(
        router.registration["routes"],
        json!([
            {"prefix": "10.1.0.0/16", "exit_node": false, "state": "approved"},
            {"prefix": "192.168.7.0/24", "exit_node": false, "state": "pending"}
        ])
    );

    // The user may use the approved route; the guest sees the router but gets no route.
    let e = entry_for(&user, &router.id).await;
    assert_eq!(e.routes, strs(&["10.1.0.0/16"]));
    assert_eq!(e.ipv4, Some(addrs[0]));
    assert!(!e.exit_node);
    let e = entry_for(&guest, &router.id).await;
    assert!(e.routes.is_empty(), "{e:?}");
    // The router admits the user to the route and not the guest.
    assert_eq!(
        entry_for(&router, &user.id).await.may_use,
        strs(&["10.1.0.0/16"])
    );
    assert!(entry_for(&router, &guest.id).await.may_use.is_empty());

    // Only admins list and approve.
    let (st, v) = user.client.get("/v1/routes").await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["code"], "forbidden");
    let (st, v) = h.admin().get("/v1/routes").await;
    assert_eq!(st, 200, "{v}");
    let routes = v["routes"].as_array().unwrap().clone();
    assert_eq!(routes.len(), 2, "{v}");
    assert_eq!(routes[0]["approved_by"], "policy");
    assert_eq!(routes[1]["state"], "pending");
    assert_eq!(routes[1]["approved_by"], Value::Null);
    let pending_id = routes[1]["id"].as_str().unwrap().to_owned();
    assert_eq!(pending_id.len(), 16);
    let path = format!("/v1/routes/{pending_id}/approve");
    let (st, v) = user.client.post(&path, json!({})).await;
    assert_eq!(st, 403, "a member certificate cannot approve: {v}");
    let (st, v) = h
        .admin()
        .post("/v1/routes/00000000deadbeef/approve", json!({}))
        .await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["code"], "not_found");

    // An admin approval reaches the user's stream as an upsert, and the router's own
    // stream gets its new may_use.
    let mut user_stream = user.client.stream(None).await;
    let mut router_stream = router.client.stream(None).await;
    assert!(matches!(
        user_stream.next_event().await.1,
        SseEvent::Snapshot(_)
    ));
    assert!(matches!(
        router_stream.next_event().await.1,
        SseEvent::Snapshot(_)
    ));
    let (st, v) = h.admin().post(&path, json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["routes"][0]["state"], "approved");
    assert_eq!(v["routes"][0]["approved_by"], "admin");
    let e = upsert_of(&mut user_stream, &router.id, Duration::from_secs(2)).await;
    assert_eq!(e.routes, strs(&["10.1.0.0/16", "192.168.7.0/24"]));
    let e = upsert_of(&mut router_stream, &user.id, Duration::from_secs(2)).await;
    assert_eq!(e.may_use, strs(&["10.1.0.0/16", "192.168.7.0/24"]));

    // Withdrawn: pending again, the user loses the route.
    let (st, v) = h.admin().delete(&path).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["routes"][0]["state"], "pending");
    let e = upsert_of(&mut user_stream, &router.id, Duration::from_secs(2)).await;
    assert_eq!(e.routes, strs(&["10.1.0.0/16"]));

    // The approval is forgotten with the advertisement: approve, stop advertising, come back.
    assert_eq!(h.admin().post(&path, json!({})).await.0, 200);
    let (st, v) = router
        .heartbeat(json!({"advertise_routes": ["10.1.0.0/16"]}))
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = router
        .heartbeat(json!({"advertise_routes": ["10.1.0.0/16", "192.168.7.0/24"]}))
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = h.admin().get("/v1/routes").await;
    assert_eq!(v["routes"][1]["state"], "pending", "{v}");

    // A heartbeat without the list withdraws every advertisement.
    let (st, v) = router.heartbeat(json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert!(entry_for(&user, &router.id).await.routes.is_empty());
    let (_, v) = h.admin().get("/v1/routes").await;
    assert_eq!(v["routes"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_node_is_offered_only_to_members_allowed_the_internet() {
    let h = Harness::start().await;
    put_policy(&h, routes_policy()).await;
    let exit = join_with(&h, "exit1", &["exit"], json!({"advertise_exit_node": true})).await;
    // An exit offer by a member the policy does not approve stays pending.
    let rogue = join_with(
        &h,
        "rogue1",
        &["router"],
        json!({"advertise_exit_node": true}),
    )
    .await;
    let user = join_with(&h, "user1", &["user"], json!({})).await;
    assert_eq!(
        exit.registration["routes"],
        json!([
            {"prefix": "0.0.0.0/0", "exit_node": true, "state": "approved"},
            {"prefix": "::/0", "exit_node": true, "state": "approved"}
        ])
    );
    assert_eq!(rogue.registration["routes"][0]["state"], "pending");
    let e = entry_for(&user, &exit.id).await;
    assert!(e.exit_node);
    assert_eq!(e.routes, strs(&["0.0.0.0/0", "::/0"]));
    let e = entry_for(&user, &rogue.id).await;
    assert!(!e.exit_node && e.routes.is_empty(), "{e:?}");
    assert_eq!(
        entry_for(&exit, &user.id).await.may_use,
        strs(&["0.0.0.0/0", "::/0"])
    );
    // A policy change that drops the user's internet rule takes the exit away, and the
    // exit node's stream is resynced without it in may_use.
    let mut exit_stream = exit.client.stream(None).await;
    assert!(matches!(
        exit_stream.next_event().await.1,
        SseEvent::Snapshot(_)
    ));
    let mut doc = routes_policy();
    doc["allow"][0]["dst"] = json!(["tag:router:22", "tag:exit:22", "10.1.0.0/16"]);
    put_policy(&h, doc).await;
    assert!(!entry_for(&user, &exit.id).await.exit_node);
    let started = Instant::now();
    loop {
        let e = upsert_of(&mut exit_stream, &user.id, Duration::from_secs(2)).await;
        if e.may_use.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "may_use kept: {e:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_advertise_mesh_space_or_default_routes() {
    let h = Harness::start().await;
    put_policy(&h, routes_policy()).await;
    let user = join_with(&h, "user1", &["user"], json!({})).await;
    let attacker = join_with(&h, "mallory", &["router"], json!({})).await;
    let victim_ula = user.registration["ula"].as_str().unwrap().to_owned();
    for bad in [
        "fd5a:1f00::/32".to_string(),
        "fd5a:1f02::/32".to_string(),
        format!("{victim_ula}/128"),
        "100.64.0.0/10".to_string(),
        "100.64.0.0/24".to_string(),
        "0.0.0.0/0".to_string(),
        "::/0".to_string(),
        "127.0.0.0/8".to_string(),
        "10.1.0.1/16".to_string(),
    ] {
        let (st, v) = attacker
            .heartbeat(json!({"advertise_routes": [bad.clone()]}))
            .await;
        assert_eq!(st, 400, "{bad}: {v}");
        assert_eq!(v["code"], "bad_request");
        assert!(
            v["error"].as_str().unwrap().contains("advertise_routes"),
            "{bad}: {v}"
        );
        // Registration refuses it the same way.
        let token = h.token(&["router"]).await;
        let mut body = register_body("mallory", &key_for("mallory"), &["router"], &token);
        body["advertise_routes"] = json!([bad]);
        let (st, v) = attacker.client.post("/v1/mesh/register", body).await;
        assert_eq!(st, 400, "{v}");
        // Refill the per-identity request budget (this is not a rate-limit test).
        h.clock.advance_ms(60_000);
    }
    let too_many: Vec<String> = (0..65).map(|i| format!("10.{i}.0.0/16")).collect();
    let (st, _) = attacker
        .heartbeat(json!({"advertise_routes": too_many}))
        .await;
    assert_eq!(st, 400);
    // Nothing was stored: no advertisement, the user's view unchanged.
    let (_, v) = h.admin().get("/v1/routes").await;
    assert_eq!(v["routes"], json!([]));
    // A policy with a bad prefix is refused, naming it.
    let mut doc = routes_policy();
    doc["routes"] = json!({"10.1.0.1/16": ["tag:router"]});
    let (st, v) = h.admin().put("/v1/policy", doc).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("10.1.0.1/16"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_approval_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let state = dir.path().to_owned();
    let (router_id, ipv4) = {
        let h = Harness::start_with_pki(pki.clone(), |c| c.state_dir = Some(state.clone())).await;
        put_policy(&h, routes_policy()).await;
        let router = join_with(
            &h,
            "router1",
            &["router"],
            json!({"advertise_routes": ["192.168.7.0/24"]}),
        )
        .await;
        let (_, v) = h.admin().get("/v1/routes").await;
        let id = v["routes"][0]["id"].as_str().unwrap().to_owned();
        let (st, v) = h
            .admin()
            .post(&format!("/v1/routes/{id}/approve"), json!({}))
            .await;
        assert_eq!(st, 200, "{v}");
        (router.id, router.registration["ipv4"].clone())
    };
    let h = Harness::start_with_pki(pki, |c| c.state_dir = Some(state.clone())).await;
    let (st, v) = h.admin().get("/v1/routes").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["routes"][0]["peer_id"], json!(router_id));
    assert_eq!(v["routes"][0]["approved_by"], "admin", "{v}");
    let user = join_with(&h, "user1", &["user"], json!({})).await;
    let e = entry_for(&user, &router_id).await;
    assert_eq!(e.routes, strs(&["192.168.7.0/24"]));
    assert_eq!(
        serde_json::to_value(e.ipv4).unwrap(),
        ipv4,
        "the IPv4 is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_on_one_coordinator_reaches_a_stream_on_another() {
    let pg = postgres::Postgres::start().unwrap_or_else(|e| panic!("{e}"));
    let db = Database::Postgres(pg.create_database("routes").unwrap());
    let pki = Pki::new();
    let a = Harness::start_with_pki(pki.clone(), |c| c.database = Some(db.clone())).await;
    let b = Harness::start_with_pki(pki, |c| c.database = Some(db.clone())).await;
    let _follow = [
        tabbify_control::follow::spawn(&a.coord).unwrap().unwrap(),
        tabbify_control::follow::spawn(&b.coord).unwrap().unwrap(),
    ];
    put_policy(&a, routes_policy()).await;
    let router = join_with(
        &a,
        "router1",
        &["router"],
        json!({"advertise_routes": ["192.168.7.0/24"]}),
    )
    .await;
    let user = join_with(&b, "user1", &["user"], json!({})).await;
    let mut on_b = user.client.stream(None).await;
    assert!(matches!(on_b.next_event().await.1, SseEvent::Snapshot(_)));
    // Two coordinators cannot hand out one IPv4: the database refuses a duplicate.
    let (ra, ub) = (
        router.registration["ipv4"].as_str().unwrap().to_owned(),
        user.registration["ipv4"].as_str().unwrap().to_owned(),
    );
    assert_ne!(ra, ub);
    assert_eq!(
        pg.psql("routes", "SELECT count(*) FROM member_ipv4")
            .unwrap()
            .trim(),
        "2"
    );
    let (_, v) = a.admin().get("/v1/routes").await;
    let id = v["routes"][0]["id"].as_str().unwrap().to_owned();
    let (st, v) = a
        .admin()
        .post(&format!("/v1/routes/{id}/approve"), json!({}))
        .await;
    assert_eq!(st, 200, "{v}");
    let e = upsert_of(&mut on_b, &router.id, Duration::from_secs(2)).await;
    assert_eq!(e.routes, strs(&["192.168.7.0/24"]));
    // B lists it approved too.
    let (_, v) = b.admin().get("/v1/routes").await;
    assert_eq!(v["routes"][0]["approved_by"], "admin", "{v}");
}
