//! Stock WireGuard clients through a concentrator (issue 15, Deliver 3, coordinator side).
//!
//! What is checked, over the real API: an admin mints a client (`POST /v1/clients`) and
//! gets a wg-quick file naming the concentrator and a QR PNG; the concentrator's roster
//! gets the client (`client: true`, `may_use` = what the client may reach through it) and
//! the members the client sees (their `may_use` = the client's addresses); a member the
//! policy lets see the client gets it `via` the concentrator (and the concentrator with
//! empty ports); a member the policy does not allow gets neither. A policy change, the
//! concentrator leaving and coming back, and a revocation (a `peer_remove` on the stream)
//! move the rosters; clients survive a restart (SQLite) and reach a stream on another
//! coordinator (PostgreSQL). The attacker: a member with a valid certificate cannot call
//! the client routes (403), a member that claims `concentrator` without being named gets
//! no clients, a request cannot choose the client's peer id or ULA, a CN shaped like a
//! client identity cannot register, and a bad request gets a 400 naming the field.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../tests/src/postgres.rs"]
mod postgres;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{key_for, register_body, Client, EventStream, Harness, Peer, Pki};
use serde_json::{json, Value};
use tabbify_control::api::{ClientCreateResponse, PortRules, RosterEntry, SseEvent};
use tabbify_control::storage::Database;

fn clients_policy() -> Value {
    json!({
        "tags": ["conc", "phone", "sup", "other"],
        "app_hosts": ["tag:sup"],
        "allow": [
            {"src": ["tag:phone"], "dst": ["tag:sup:8730"]},
            {"src": ["tag:sup"], "dst": ["tag:phone:22"]},
            {"src": ["tag:other"], "dst": ["tag:other:1"]}
        ]
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

fn find<'a>(r: &'a [RosterEntry], id: &str) -> Option<&'a RosterEntry> {
    r.iter().find(|e| e.peer_id == id)
}

async fn mint(h: &Harness, body: Value) -> ClientCreateResponse {
    let (st, v) = h.admin().post("/v1/clients", body).await;
    assert_eq!(st, 201, "{v}");
    serde_json::from_value(v).unwrap()
}

fn addrs(p: &Peer) -> Vec<String> {
    vec![
        format!("{}/128", p.registration["ula"].as_str().unwrap()),
        format!("{}/32", p.registration["ipv4"].as_str().unwrap()),
    ]
}

fn client_addrs(c: &ClientCreateResponse) -> Vec<String> {
    vec![
        format!("{}/128", c.client.ula),
        format!("{}/32", c.client.ipv4),
    ]
}

/// Waits for a `peer_remove` of `id` on `s`.
async fn removal_of(s: &mut EventStream, id: &str) -> String {
    let started = Instant::now();
    loop {
        let left = common::WAIT.saturating_sub(started.elapsed());
        let frame = s
            .try_next(left)
            .await
            .unwrap_or_else(|| panic!("no peer_remove of {id} in time"))
            .expect("stream ended");
        if let SseEvent::PeerRemove(r) = SseEvent::parse(&frame.event, &frame.data).unwrap() {
            if r.peer_id == id {
                return r.reason;
            }
        }
    }
}

/// Waits until a snapshot, policy roster or upsert on `s` carries `id` (returns it).
async fn appearance_of(s: &mut EventStream, id: &str) -> RosterEntry {
    let started = Instant::now();
    loop {
        let left = common::WAIT.saturating_sub(started.elapsed());
        let frame = s
            .try_next(left)
            .await
            .unwrap_or_else(|| panic!("{id} never appeared"))
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
async fn a_minted_client_is_in_the_rosters_the_policy_gives_it_and_leaves_them_when_revoked() {
    let h = Harness::start().await;
    put_policy(&h, clients_policy()).await;
    let conc = join_with(&h, "conc1", &["conc"], json!({"concentrator": true})).await;
    let sup = join_with(&h, "sup1", &["sup"], json!({})).await;
    let other = join_with(&h, "other1", &["other"], json!({})).await;

    let c = mint(&h, json!({"name": "phone1", "tags": ["phone"]})).await;
    let k = &c.client;
    assert!(k.identity.starts_with("client/"), "{k:?}");
    assert_eq!(k.id, tabbify_control::ula::identity_peer_id(&k.identity));
    assert_eq!(k.ula, tabbify_control::ula::identity_ula(&k.identity));
    assert_eq!(k.concentrator, conc.id);
    // The file: the client's addresses, the concentrator's key and reflexive endpoint.
    let conc_key = common::b64(&conc.key);
    assert!(
        c.config.contains(&format!("PublicKey = {conc_key}")),
        "{}",
        c.config
    );
    assert!(
        c.config
            .contains(&format!("Address = {}/128, {}/32", k.ula, k.ipv4)),
        "{}",
        c.config
    );
    assert!(c.config.contains(&format!(
        "Endpoint = {}",
        conc.registration["reflexive_endpoint"].as_str().unwrap()
    )));
    assert!(c
        .config
        .contains("AllowedIPs = fd5a:1f00::/32, fd5a:1f02::/32, 100.64.0.0/10"));
    assert!(c.config.contains("DNS = fd5a:1f00::53, mesh"));
    let png = base64::engine::general_purpose::STANDARD
        .decode(&c.qr_png)
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // The private key is in the file only: the list has the public key and no secret.
    let private = c
        .config
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .unwrap()
        .to_owned();
    let (st, list) = h.admin().get("/v1/clients").await;
    assert_eq!(st, 200, "{list}");
    assert_eq!(list["clients"][0]["id"], json!(k.id));
    assert!(!list.to_string().contains(&private));
    // Its IPv4 is nobody else's.
    for p in [&conc, &sup, &other] {
        assert_ne!(p.registration["ipv4"], json!(k.ipv4.to_string()));
    }

    // The concentrator: the client, with what it may reach through it (sup, which the
    // concentrator itself does not see by policy), and sup with the client's addresses.
    let r = roster(&conc).await;
    let ke = find(&r, &k.id).expect("the concentrator serves its client");
    assert!(ke.client && ke.via.is_none(), "{ke:?}");
    assert_eq!(ke.public_key, k.public_key);
    assert!(ke.endpoints.is_empty());
    let mut want = addrs(&sup);
    want.sort();
    assert_eq!(ke.may_use, want, "{ke:?}");
    let se = find(&r, &sup.id).expect("the concentrator gets the members its clients see");
    assert!(se.ports.is_empty(), "{se:?}");
    assert_eq!(se.may_use, client_addrs(&c));
    assert!(find(&r, &other.id).is_none(), "{r:?}");

    // sup: the client via the concentrator with the client's own rules, and the
    // concentrator with none.
    let r = roster(&sup).await;
    let ke = find(&r, &k.id).expect("sup sees the client");
    assert_eq!(ke.via.as_deref(), Some(conc.id.as_str()));
    assert!(!ke.client);
    assert!(ke.ports.allows_inbound(8730) && !ke.ports.allows_inbound(22));
    assert!(ke.ports.allows_outbound(22) && !ke.ports.allows_outbound(8730));
    assert_eq!(ke.ipv4, Some(k.ipv4));
    let ce = find(&r, &conc.id).expect("sup needs the concentrator's tunnel");
    assert!(ce.ports.is_empty(), "{ce:?}");

    // other: the policy gives it nothing with phones.
    let r = roster(&other).await;
    assert!(
        find(&r, &k.id).is_none() && find(&r, &conc.id).is_none(),
        "{r:?}"
    );

    // The concentrator leaves: its client is gone from every roster; it comes back.
    let mut on_sup = sup.client.stream(None).await;
    assert!(matches!(on_sup.next_event().await.1, SseEvent::Snapshot(_)));
    let (st, v) = conc.client.post("/v1/mesh/leave", json!({})).await;
    assert_eq!(st, 200, "{v}");
    removal_of(&mut on_sup, &k.id).await;
    let r = roster(&sup).await;
    assert!(
        find(&r, &k.id).is_none() && find(&r, &conc.id).is_none(),
        "{r:?}"
    );
    let conc = join_with(&h, "conc1", &["conc"], json!({"concentrator": true})).await;
    let e = appearance_of(&mut on_sup, &k.id).await;
    assert_eq!(e.via.as_deref(), Some(conc.id.as_str()));
    // A heartbeat without the flag: the member no longer serves; its clients vanish.
    let (st, v) = conc
        .heartbeat(json!({"peer_id": conc.id, "concentrator": false}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(find(&roster(&sup).await, &k.id).is_none());
    assert!(roster(&conc).await.iter().all(|e| !e.client));
    let (st, v) = conc
        .heartbeat(json!({"peer_id": conc.id, "concentrator": true}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(find(&roster(&sup).await, &k.id).is_some());

    // A policy change that drops phone → sup takes the client out of sup's roster and sup
    // out of the concentrator's.
    let mut doc = clients_policy();
    doc["allow"][0]["dst"] = json!(["tag:other:1"]);
    doc["allow"][1]["dst"] = json!(["tag:other:1"]);
    put_policy(&h, doc).await;
    assert!(find(&roster(&sup).await, &k.id).is_none());
    let r = roster(&conc).await;
    assert!(find(&r, &sup.id).is_none(), "{r:?}");
    // phone → other:1 now: the client may reach `other` through the concentrator.
    let mut want = addrs(&other);
    want.sort();
    assert_eq!(find(&r, &k.id).unwrap().may_use, want);
    assert!(find(&roster(&other).await, &k.id).is_some());
    // `other` may not open anything on the client: the concentrator admits nothing from
    // it to the client (its entry there has no client address in `may_use`).
    let oe = find(&r, &other.id).expect("the client sees other");
    assert!(oe.may_use.is_empty(), "{oe:?}");
    put_policy(&h, clients_policy()).await;
    assert!(find(&roster(&sup).await, &k.id).is_some());

    // Revocation: a peer_remove on sup's stream, the client gone everywhere.
    let mut on_sup = sup.client.stream(None).await;
    let mut on_conc = conc.client.stream(None).await;
    let (st, v) = h.admin().delete(&format!("/v1/clients/{}", k.id)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(removal_of(&mut on_sup, &k.id).await, "revoked");
    assert_eq!(removal_of(&mut on_conc, &k.id).await, "revoked");
    let r = roster(&conc).await;
    assert!(
        find(&r, &k.id).is_none() && find(&r, &sup.id).is_none(),
        "{r:?}"
    );
    let r = roster(&sup).await;
    assert!(
        find(&r, &k.id).is_none() && find(&r, &conc.id).is_none(),
        "{r:?}"
    );
    let (_, list) = h.admin().get("/v1/clients").await;
    assert_eq!(list["clients"], json!([]));
    let (st, v) = h.admin().delete(&format!("/v1/clients/{}", k.id)).await;
    assert_eq!(st, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_cannot_mint_claim_or_impersonate_clients() {
    let h = Harness::start().await;
    put_policy(&h, clients_policy()).await;
    let sup = join_with(&h, "sup1", &["sup"], json!({})).await;
    // No concentrator yet: the request names none and there is none.
    let (st, v) = h
        .admin()
        .post("/v1/clients", json!({"name": "phone1", "tags": ["phone"]}))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("concentrator"), "{v}");
    let conc = join_with(&h, "conc1", &["conc"], json!({"concentrator": true})).await;

    // A member with a valid certificate cannot use the client routes.
    let body = json!({"name": "phone1", "tags": ["phone"], "concentrator": conc.id});
    let (st, v) = sup.client.post("/v1/clients", body.clone()).await;
    assert_eq!(st, 403, "{v}");
    assert!(v["code"].is_string(), "{v}");
    let (st, v) = sup.client.get("/v1/clients").await;
    assert_eq!(st, 403, "{v}");
    let c = mint(&h, body).await;
    let (st, v) = sup
        .client
        .delete(&format!("/v1/clients/{}", c.client.id))
        .await;
    assert_eq!(st, 403, "{v}");

    // Bad requests: 400 naming the field, 409 for a taken name.
    for (body, field, code) in [
        (
            json!({"name": "x", "tags": ["phone"], "concentrator": "nobody"}),
            "concentrator",
            400,
        ),
        (
            json!({"name": "x", "tags": ["phone"], "concentrator": sup.id}),
            "concentrator",
            400,
        ),
        (
            json!({"name": "x", "tags": ["phone"], "concentrator": "sup1"}),
            "concentrator",
            400,
        ),
        (json!({"name": "bad name", "tags": ["phone"]}), "name", 400),
        (json!({"name": "client/x", "tags": ["phone"]}), "name", 400),
        (json!({"name": "x", "tags": ["nosuchtag"]}), "tags", 400),
        (json!({"name": "x", "tags": vec!["phone"; 17]}), "tags", 400),
        (
            json!({"name": "x", "tags": ["phone"], "endpoint": "h:1\nPostUp = sh"}),
            "endpoint",
            400,
        ),
        (
            json!({"name": "x", "tags": ["phone"], "endpoint": "h"}),
            "endpoint",
            400,
        ),
        (json!({"name": "sup1", "tags": ["phone"]}), "name", 409),
        (json!({"name": "phone1", "tags": ["phone"]}), "name", 409),
    ] {
        let (st, v) = h.admin().post("/v1/clients", body.clone()).await;
        assert_eq!(st, code, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{body}: {v}");
        assert!(v["code"].is_string(), "{v}");
    }
    // Another member's peer id or ULA cannot be passed as the client's: no such field.
    for extra in [
        json!({"id": sup.id}),
        json!({"peer_id": sup.id}),
        json!({"ula": sup.registration["ula"]}),
        json!({"identity": "sup1"}),
        json!({"public_key": common::b64(&sup.key)}),
    ] {
        let mut body = json!({"name": "phone9", "tags": ["phone"]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (st, v) = h.admin().post("/v1/clients", body.clone()).await;
        assert_eq!(st, 400, "{body}: {v}");
    }
    let ids: Vec<String> = roster(&sup).await.into_iter().map(|e| e.peer_id).collect();
    assert!(!ids.contains(&"phone9".to_string()));

    // A member that claims to be a concentrator but was not named serves nothing, and
    // now that there are two, a request must name one.
    let evil = join_with(&h, "evil1", &["phone"], json!({"concentrator": true})).await;
    let r = roster(&evil).await;
    assert!(r.iter().all(|e| !e.client), "{r:?}");
    // (It sees the client like any phone-tagged member would: phone→phone is not allowed.)
    assert!(find(&r, &c.client.id).is_none(), "{r:?}");
    let (st, v) = h
        .admin()
        .post("/v1/clients", json!({"name": "phone2", "tags": ["phone"]}))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("concentrator"), "{v}");
    // The client's entries still point at the real concentrator.
    let r = roster(&sup).await;
    assert_eq!(
        find(&r, &c.client.id).unwrap().via.as_deref(),
        Some(conc.id.as_str())
    );
}

/// A coordinator without mTLS (identity header) and with `admin` as its admin.
async fn insecure() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut config = tabbify_control::server::Config::new(common::policy(), "test".into());
    config.insecure = true;
    config.admins = ["admin".to_string()].into_iter().collect();
    let clock = tabbify_control::clock::ManualClock::new(1_700_000_000_000);
    let coord = tabbify_control::server::Coordinator::new(config, Arc::new(clock)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(tabbify_control::server::serve(coord, listener, None));
    (addr, task)
}
use std::net::SocketAddr;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_shaped_like_a_client_cannot_register() {
    let (addr, task) = insecure().await;
    let admin = Client::plain(addr, Some("admin"));
    let (st, v) = admin.post("/v1/tokens", json!({"tags": ["node"]})).await;
    assert_eq!(st, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    let cn = format!("client/{}", uuid::Uuid::new_v4());
    let forged = Client::plain(addr, Some(&cn));
    let key = key_for("forged");
    let (st, v) = forged
        .post(
            "/v1/mesh/register",
            register_body("forged", &key, &["node"], &token),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains('/'), "{v}");
    // Any '/' at all.
    let (st, v) = Client::plain(addr, Some("a/b"))
        .post(
            "/v1/mesh/register",
            register_body("ab", &key_for("ab"), &["node"], &token),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let state = dir.path().to_owned();
    let (c, conc_id) = {
        let h = Harness::start_with_pki(pki.clone(), |c| c.state_dir = Some(state.clone())).await;
        put_policy(&h, clients_policy()).await;
        let conc = join_with(&h, "conc1", &["conc"], json!({"concentrator": true})).await;
        (
            mint(&h, json!({"name": "phone1", "tags": ["phone"]})).await,
            conc.id,
        )
    };
    let h = Harness::start_with_pki(pki, |c| c.state_dir = Some(state.clone())).await;
    let (st, v) = h.admin().get("/v1/clients").await;
    assert_eq!(st, 200, "{v}");
    let listed: tabbify_control::api::ClientsResponse = serde_json::from_value(v).unwrap();
    assert_eq!(listed.clients, vec![c.client.clone()]);
    // The stored concentrator still serves it; a new member cannot get its IPv4.
    let sup = join_with(&h, "sup1", &["sup"], json!({})).await;
    assert_ne!(sup.registration["ipv4"], json!(c.client.ipv4.to_string()));
    let e = roster(&sup).await;
    let e = find(&e, &c.client.id).expect("the client after a restart");
    assert_eq!(e.via.as_deref(), Some(conc_id.as_str()));
    // Revoked, it stays revoked.
    let (st, v) = h.admin().delete("/v1/clients/phone1").await;
    assert_eq!(st, 200, "{v}");
    drop(h);
    let h = Harness::start_with_pki(Pki::new(), |c| c.state_dir = Some(state.clone())).await;
    let (_, v) = h.admin().get("/v1/clients").await;
    assert_eq!(v["clients"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_minted_on_one_coordinator_reaches_a_stream_on_another() {
    let pg = postgres::Postgres::start().unwrap_or_else(|e| panic!("{e}"));
    let db = Database::Postgres(pg.create_database("clients").unwrap());
    let pki = Pki::new();
    let a = Harness::start_with_pki(pki.clone(), |c| c.database = Some(db.clone())).await;
    let b = Harness::start_with_pki(pki, |c| c.database = Some(db.clone())).await;
    let _follow = [
        tabbify_control::follow::spawn(&a.coord).unwrap().unwrap(),
        tabbify_control::follow::spawn(&b.coord).unwrap().unwrap(),
    ];
    put_policy(&a, clients_policy()).await;
    let (_, want) = a.admin().get("/v1/policy").await;
    let started = Instant::now();
    loop {
        let (_, got) = b.admin().get("/v1/policy").await;
        if got["revision"] == want["revision"] {
            break;
        }
        assert!(started.elapsed() < common::WAIT, "B never got the policy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conc = join_with(&a, "conc1", &["conc"], json!({"concentrator": true})).await;
    let sup = join_with(&b, "sup1", &["sup"], json!({})).await;
    let mut on_b = sup.client.stream(None).await;
    assert!(matches!(on_b.next_event().await.1, SseEvent::Snapshot(_)));
    let c = mint(&a, json!({"name": "phone1", "tags": ["phone"]})).await;
    let e = appearance_of(&mut on_b, &c.client.id).await;
    assert_eq!(e.via.as_deref(), Some(conc.id.as_str()));
    // Its IPv4 is in the same uniqueness table as the members'.
    assert_eq!(
        pg.psql("clients", "SELECT count(*) FROM member_ipv4")
            .unwrap()
            .trim(),
        "3"
    );
    let (st, v) = a
        .admin()
        .delete(&format!("/v1/clients/{}", c.client.id))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(removal_of(&mut on_b, &c.client.id).await, "revoked");
    let (_, v) = b.admin().get("/v1/clients").await;
    assert_eq!(v["clients"], json!([]));
}

/// The rules a member entry carries for client `k` (`client_ports`).
fn client_ports_of<'a>(e: &'a RosterEntry, k: &str) -> Option<&'a PortRules> {
    e.client_ports
        .iter()
        .find(|c| c.client == k)
        .map(|c| &c.ports)
}

/// Issue 15, the concentrator enforces member → client ports: its roster's member entries
/// carry, per client the member may reach, the rules between them (`client_ports`), from
/// the policy's evaluation between the member's and the client's tags; a member that may
/// open nothing on a client gets no rules (and no grant) for it; a policy change moves
/// them; a member's own roster never carries rules for another concentrator's clients.
async fn the_concentrator_gets_member_client_port_rules(h: &Harness) {
    put_policy(
        h,
        json!({
            "tags": ["conc", "phone", "tablet", "sup", "other"],
            "app_hosts": ["tag:sup"],
            "allow": [
                {"src": ["tag:phone", "tag:tablet"], "dst": ["tag:sup:8730"]},
                {"src": ["tag:sup"], "dst": ["tag:phone:22", "tag:tablet:tcp:443,udp:53"]},
                {"src": ["tag:phone"], "dst": ["tag:other:1"]}
            ]
        }),
    )
    .await;
    let conc = join_with(h, "conc1", &["conc"], json!({"concentrator": true})).await;
    let sup = join_with(h, "sup1", &["sup"], json!({})).await;
    let other = join_with(h, "other1", &["other"], json!({})).await;
    let phone = mint(h, json!({"name": "phone1", "tags": ["phone"]})).await;
    let tablet = mint(h, json!({"name": "tablet1", "tags": ["tablet"]})).await;
    let (pk, tk) = (&phone.client.id, &tablet.client.id);

    let r = roster(&conc).await;
    let se = find(&r, &sup.id).expect("the clients see sup");
    assert_eq!(se.client_ports.len(), 2, "{se:?}");
    let p = client_ports_of(se, pk).expect("sup may open 22 on the phone");
    assert!(p.allows_outbound(22) && !p.allows_outbound(8730) && !p.allows_outbound(23));
    assert!(p.allows_inbound(8730) && !p.allows_inbound(22));
    let t = client_ports_of(se, tk).expect("sup may open tcp:443, udp:53 on the tablet");
    assert!(t.outbound.is_empty() && t.allows_outbound(443) && t.allows_outbound(53));
    assert!(!t.allows_outbound(22), "{t:?}");
    assert_eq!(t.outbound_tcp.len(), 1, "{t:?}");
    assert_eq!(t.outbound_udp.len(), 1, "{t:?}");
    // Same rules as the client's entry in sup's own roster.
    let own = roster(&sup).await;
    assert_eq!(&find(&own, pk).unwrap().ports, p);
    assert_eq!(&find(&own, tk).unwrap().ports, t);
    // `other` may reach nothing on a client: neither grant nor rules (reply grants only).
    let oe = find(&r, &other.id).expect("the phone sees other");
    assert!(
        oe.may_use.is_empty() && oe.client_ports.is_empty(),
        "{oe:?}"
    );
    // Nobody else's roster carries client rules: they are the concentrator's.
    for v in [&sup, &other] {
        assert!(roster(v).await.iter().all(|e| e.client_ports.is_empty()));
    }

    // The policy moves the rules: sup may open 2222 on the phone instead of 22, and
    // nothing on the tablet any more.
    put_policy(
        h,
        json!({
            "tags": ["conc", "phone", "tablet", "sup", "other"],
            "app_hosts": ["tag:sup"],
            "allow": [
                {"src": ["tag:phone", "tag:tablet"], "dst": ["tag:sup:8730"]},
                {"src": ["tag:sup"], "dst": ["tag:phone:2222"]}
            ]
        }),
    )
    .await;
    let r = roster(&conc).await;
    let se = find(&r, &sup.id).unwrap();
    let p = client_ports_of(se, pk).expect("still the phone");
    assert!(p.allows_outbound(2222) && !p.allows_outbound(22), "{p:?}");
    assert!(client_ports_of(se, tk).is_none(), "{se:?}");
    assert_eq!(se.may_use, client_addrs(&phone));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concentrator_gets_member_client_port_rules_in_memory() {
    the_concentrator_gets_member_client_port_rules(&Harness::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concentrator_gets_member_client_port_rules_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_owned();
    let h = Harness::start_with(|c| c.state_dir = Some(state)).await;
    the_concentrator_gets_member_client_port_rules(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concentrator_gets_member_client_port_rules_on_postgres() {
    let pg = postgres::Postgres::start().unwrap_or_else(|e| panic!("{e}"));
    let db = Database::Postgres(pg.create_database("client_ports").unwrap());
    let h = Harness::start_with(|c| c.database = Some(db)).await;
    the_concentrator_gets_member_client_port_rules(&h).await;
}
