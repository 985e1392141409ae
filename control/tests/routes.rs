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
//! Route-only visibility: a prefix rule alone shows the router to its users (empty ports,
//! `routes`) and them to the router (empty ports, `may_use`); withdrawals, rule removals,
//! tag changes and revocations take the entries away with `peer_remove`; a member no rule
//! names gets no router and no router gets it.
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
    let e = upsert_of(&mut user_stream, &router.id, common::WAIT).await;
    assert_eq!(e.routes, strs(&["10.1.0.0/16", "192.168.7.0/24"]));
    let e = upsert_of(&mut router_stream, &user.id, common::WAIT).await;
    assert_eq!(e.may_use, strs(&["10.1.0.0/16", "192.168.7.0/24"]));

    // Withdrawn: pending again, the user loses the route.
    let (st, v) = h.admin().delete(&path).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["routes"][0]["state"], "pending");
    let e = upsert_of(&mut user_stream, &router.id, common::WAIT).await;
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
        let e = upsert_of(&mut exit_stream, &user.id, common::WAIT).await;
        if e.may_use.is_empty() {
            break;
        }
        assert!(started.elapsed() < common::WAIT, "may_use kept: {e:?}");
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
    // B follows A's policy through the change log.
    let (_, want) = a.admin().get("/v1/policy").await;
    let started = Instant::now();
    loop {
        let (_, got) = b.admin().get("/v1/policy").await;
        if got["revision"] == want["revision"] {
            break;
        }
        assert!(
            started.elapsed() < common::WAIT,
            "B never got the policy: {got}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    // (An earlier upsert of the router, from its registration, may come first.)
    let started = Instant::now();
    loop {
        let e = upsert_of(&mut on_b, &router.id, common::WAIT).await;
        if e.routes == strs(&["192.168.7.0/24"]) {
            break;
        }
        assert!(started.elapsed() < common::WAIT, "no approved route: {e:?}");
    }
    // B lists it approved too.
    let (_, v) = b.admin().get("/v1/routes").await;
    assert_eq!(v["routes"][0]["approved_by"], "admin", "{v}");
}

/// Reads `s` until an event satisfies `pred` (within `common::WAIT`), and returns it.
async fn event_until(
    s: &mut EventStream,
    what: &str,
    pred: impl Fn(&SseEvent) -> bool,
) -> SseEvent {
    let started = Instant::now();
    loop {
        let left = common::WAIT.saturating_sub(started.elapsed());
        let frame = s
            .try_next(left)
            .await
            .unwrap_or_else(|| panic!("no {what} in time"))
            .expect("stream ended");
        let ev = SseEvent::parse(&frame.event, &frame.data).unwrap();
        if pred(&ev) {
            return ev;
        }
    }
}

fn holds(ev: &SseEvent, id: &str) -> Option<bool> {
    match ev {
        SseEvent::Snapshot(s) | SseEvent::Policy(s) => {
            Some(s.peers.iter().any(|p| p.peer_id == id))
        }
        _ => None,
    }
}

fn removes(ev: &SseEvent, id: &str) -> bool {
    matches!(ev, SseEvent::PeerRemove(r) if r.peer_id == id)
}

fn no_ports(e: &RosterEntry) -> bool {
    e.ports == Default::default()
}

/// Route-only visibility: a policy whose only rule for laptops is a prefix destination
/// shows them the approved router (empty ports: nothing to the router itself, only the
/// route), and the router them (with `may_use`); withdrawing the approval or the rule
/// takes both away again. The attacker: a member no rule names sees no router, no router
/// sees it, and its own pending advertisement shows it to nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_rule_alone_shows_the_router_with_empty_ports() {
    let h = Harness::start().await;
    let doc = json!({
        "tags": ["router", "laptop", "other"],
        "allow": [{"src": ["tag:laptop"], "dst": ["10.1.0.0/16", "192.168.7.0/24"]}],
        "routes": {"10.0.0.0/8": ["tag:router"]}
    });
    put_policy(&h, doc.clone()).await;
    let router = join_with(
        &h,
        "router1",
        &["router"],
        json!({"advertise_routes": ["10.1.0.0/16"]}),
    )
    .await;
    let router2 = join_with(
        &h,
        "router2",
        &["router"],
        json!({"advertise_routes": ["192.168.7.0/24"]}),
    )
    .await;
    let laptop = join_with(&h, "laptop1", &["laptop"], json!({})).await;
    let mallory = join_with(
        &h,
        "mallory",
        &["other"],
        json!({"advertise_routes": ["10.9.0.0/16"]}),
    )
    .await;

    // The laptop gets router1 with its route and no ports; router2's route is pending.
    let e = entry_for(&laptop, &router.id).await;
    assert_eq!(e.routes, strs(&["10.1.0.0/16"]));
    assert!(no_ports(&e), "{e:?}");
    assert!(e.may_use.is_empty());
    let ids = |r: Vec<RosterEntry>| r.into_iter().map(|e| e.peer_id).collect::<Vec<_>>();
    assert_eq!(ids(roster(&laptop).await), vec![router.id.clone()]);
    // The router gets the laptop with what it may send through it, and nothing else.
    let e = entry_for(&router, &laptop.id).await;
    assert_eq!(e.may_use, strs(&["10.1.0.0/16"]));
    assert!(no_ports(&e) && e.routes.is_empty(), "{e:?}");
    assert_eq!(ids(roster(&router).await), vec![laptop.id.clone()]);
    // The attacker: nobody, and nobody sees her.
    assert!(roster(&mallory).await.is_empty());
    assert!(roster(&router2).await.is_empty());
    for p in [&router, &laptop, &router2] {
        assert!(!ids(roster(p).await).contains(&mallory.id));
    }

    // An admin approval of router2's route shows it to the laptop (an upsert) and the
    // laptop to router2 (its stream is resynced).
    let mut laptop_stream = laptop.client.stream(None).await;
    let mut r2_stream = router2.client.stream(None).await;
    let mut r1_stream = router.client.stream(None).await;
    for s in [&mut laptop_stream, &mut r2_stream, &mut r1_stream] {
        assert!(matches!(s.next_event().await.1, SseEvent::Snapshot(_)));
    }
    let (_, v) = h.admin().get("/v1/routes").await;
    let rid = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["peer_id"] == router2.id.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/routes/{rid}/approve");
    let (st, v) = h.admin().post(&path, json!({})).await;
    assert_eq!(st, 200, "{v}");
    let e = upsert_of(&mut laptop_stream, &router2.id, common::WAIT).await;
    assert_eq!(e.routes, strs(&["192.168.7.0/24"]));
    assert!(no_ports(&e), "{e:?}");
    let e = upsert_of(&mut r2_stream, &laptop.id, common::WAIT).await;
    assert_eq!(e.may_use, strs(&["192.168.7.0/24"]));
    assert!(no_ports(&e), "{e:?}");
    // Still nothing for the attacker.
    assert!(roster(&mallory).await.is_empty());

    // Withdrawn: the laptop gets router2's removal, router2 a roster without the laptop.
    let (st, v) = h.admin().delete(&path).await;
    assert_eq!(st, 200, "{v}");
    event_until(&mut laptop_stream, "removal of router2", |ev| {
        removes(ev, &router2.id)
    })
    .await;
    event_until(&mut r2_stream, "snapshot without the laptop", |ev| {
        holds(ev, &laptop.id) == Some(false) || removes(ev, &laptop.id)
    })
    .await;
    assert!(!ids(roster(&laptop).await).contains(&router2.id));
    assert!(roster(&router2).await.is_empty());

    // The rule goes: the laptop's roster loses router1, and router1's the laptop.
    let mut doc2 = doc.clone();
    doc2["allow"][0]["dst"] = json!(["192.168.7.0/24"]);
    put_policy(&h, doc2).await;
    event_until(&mut laptop_stream, "roster without router1", |ev| {
        holds(ev, &router.id) == Some(false) || removes(ev, &router.id)
    })
    .await;
    event_until(&mut r1_stream, "roster without the laptop", |ev| {
        holds(ev, &laptop.id) == Some(false) || removes(ev, &laptop.id)
    })
    .await;
    assert!(roster(&laptop).await.is_empty());
    assert!(roster(&router).await.is_empty());

    // The rule comes back, then the router stops advertising: a peer_remove each way.
    put_policy(&h, doc).await;
    event_until(&mut laptop_stream, "roster with router1", |ev| {
        holds(ev, &router.id) == Some(true)
    })
    .await;
    assert_eq!(
        entry_for(&router, &laptop.id).await.may_use,
        strs(&["10.1.0.0/16"])
    );
    let (st, v) = router.heartbeat(json!({})).await;
    assert_eq!(st, 200, "{v}");
    event_until(&mut laptop_stream, "removal of router1", |ev| {
        removes(ev, &router.id)
    })
    .await;
    assert!(roster(&laptop).await.is_empty());
    assert!(roster(&router).await.is_empty());
}

/// A route-only pair ends with the member: a laptop re-joining with a tag no rule names
/// leaves the router's roster (`peer_remove`) and gets no router; back as a laptop it is
/// an upsert again (empty ports, `may_use`); a revoked laptop leaves it too (`revoked`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_only_pair_ends_when_the_member_changes_or_is_revoked() {
    let h = Harness::start().await;
    put_policy(
        &h,
        json!({
            "tags": ["router", "laptop", "other"],
            "allow": [{"src": ["tag:laptop"], "dst": ["10.1.0.0/16"]}],
            "routes": {"10.0.0.0/8": ["tag:router"]}
        }),
    )
    .await;
    let router = join_with(
        &h,
        "router1",
        &["router"],
        json!({"advertise_routes": ["10.1.0.0/16"]}),
    )
    .await;
    let laptop = join_with(&h, "laptop1", &["laptop"], json!({})).await;
    let laptop2 = join_with(&h, "laptop2", &["laptop"], json!({})).await;
    let mut r_stream = router.client.stream(None).await;
    let (_, first) = r_stream.next_event().await;
    assert_eq!(holds(&first, &laptop.id), Some(true));

    // laptop1 comes back as "other": the router loses it, it loses the router.
    let mut l_stream = laptop.client.stream(None).await;
    l_stream.next_event().await;
    let again = join_with(&h, "laptop1", &["other"], json!({})).await;
    event_until(&mut r_stream, "removal of laptop1", |ev| {
        removes(ev, &laptop.id)
    })
    .await;
    assert!(roster(&again).await.is_empty());
    assert_eq!(
        roster(&router)
            .await
            .into_iter()
            .map(|e| e.peer_id)
            .collect::<Vec<_>>(),
        vec![laptop2.id.clone()]
    );
    // And as a laptop again: an upsert with the route it may use, no ports.
    join_with(&h, "laptop1", &["laptop"], json!({})).await;
    let e = upsert_of(&mut r_stream, &laptop.id, common::WAIT).await;
    assert_eq!(e.may_use, strs(&["10.1.0.0/16"]));
    assert!(no_ports(&e), "{e:?}");

    // Revoked: the router gets its removal at once.
    let (st, v) = h
        .admin()
        .delete(&format!("/v1/mesh/peers/{}", laptop2.id))
        .await;
    assert_eq!(st, 200, "{v}");
    event_until(&mut r_stream, "revocation of laptop2", |ev| {
        matches!(ev, SseEvent::PeerRemove(r) if r.peer_id == laptop2.id && r.reason == "revoked")
    })
    .await;
    assert!(!roster(&router)
        .await
        .iter()
        .any(|e| e.peer_id == laptop2.id));
}

/// Ports on a prefix destination (`10.1.0.0/16:tcp:443`): the policy is accepted, the
/// member gets the router with the prefix in `route_ports` (never in `routes`, so a joiner
/// from before the field installs nothing) and no ports on the router itself; the router
/// gets the member with the prefix in `may_use_ports` (never in `may_use`: a router from
/// before the field refuses the traffic rather than opening every port). A prefix the
/// member may use for all traffic stays in `routes`/`may_use`. Bad ports are a 400 naming
/// the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_on_a_prefix_reach_both_ends_outside_the_all_traffic_fields() {
    let h = Harness::start().await;
    let doc = json!({
        "tags": ["router", "laptop"],
        "allow": [{"src": ["tag:laptop"],
                   "dst": ["10.1.0.0/16:tcp:443,udp:53", "fd00:1::/64:22", "192.168.7.0/24"]}],
        "routes": {"10.0.0.0/8": ["tag:router"], "192.168.0.0/16": ["tag:router"],
                   "fd00::/16": ["tag:router"]}
    });
    put_policy(&h, doc).await;
    let router = join_with(
        &h,
        "router1",
        &["router"],
        json!({"advertise_routes": ["10.1.0.0/16", "192.168.7.0/24", "fd00:1::/64"]}),
    )
    .await;
    let laptop = join_with(&h, "laptop1", &["laptop"], json!({})).await;
    let range = |p: u16| tabbify_control::api::PortRange { first: p, last: p };

    let e = entry_for(&laptop, &router.id).await;
    assert!(no_ports(&e), "{e:?}");
    assert_eq!(e.routes, strs(&["192.168.7.0/24"]));
    let by_prefix = |v: &[tabbify_control::api::RoutePorts], p: &str| {
        v.iter()
            .find(|r| r.prefix == p)
            .cloned()
            .unwrap_or_else(|| panic!("{p} not in {v:?}"))
    };
    assert_eq!(e.route_ports.len(), 2, "{:?}", e.route_ports);
    let lan = by_prefix(&e.route_ports, "10.1.0.0/16");
    assert_eq!(
        (lan.ports, lan.tcp, lan.udp),
        (vec![], vec![range(443)], vec![range(53)])
    );
    let v6 = by_prefix(&e.route_ports, "fd00:1::/64");
    assert_eq!(
        (v6.ports, v6.tcp, v6.udp),
        (vec![range(22)], vec![], vec![])
    );
    // The wire form: additive fields, absent when empty.
    let (_, raw) = laptop.client.get("/v1/mesh/peers").await;
    let raw = raw["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == router.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(raw["route_ports"][0]["prefix"], "10.1.0.0/16");
    assert!(raw.get("may_use_ports").is_none(), "{raw}");

    let e = entry_for(&router, &laptop.id).await;
    assert!(no_ports(&e) && e.routes.is_empty(), "{e:?}");
    assert_eq!(e.may_use, strs(&["192.168.7.0/24"]));
    assert_eq!(e.may_use_ports, {
        let mut v = e.may_use_ports.clone();
        v.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        v
    });
    let lan = by_prefix(&e.may_use_ports, "10.1.0.0/16");
    assert_eq!((lan.tcp, lan.udp), (vec![range(443)], vec![range(53)]));
    by_prefix(&e.may_use_ports, "fd00:1::/64");

    // Bad input: 400 naming the destination; the policy in force stays.
    for dst in [
        "10.1.0.0/16:99999",
        "10.1.0.0/16:",
        "0.0.0.0/0:443",
        "10.1.0.0/16x",
    ] {
        let (st, v) = h
            .admin()
            .put(
                "/v1/policy",
                json!({"tags": ["laptop"], "allow": [{"src": ["tag:laptop"], "dst": [dst]}]}),
            )
            .await;
        assert_eq!(st, 400, "{dst}: {v}");
        assert!(v.to_string().contains(dst), "{dst}: {v}");
    }
    let e = entry_for(&laptop, &router.id).await;
    assert_eq!(e.route_ports.len(), 2);
}
