//! The coordinator's relays: `--relay` runs `tabbify_relay` in the coordinator process and
//! advertises it (first) with every `--relay-url`; a heartbeat's `home_relay` must be one
//! of them (a forged one is a 400 that changes nothing) and reaches the others' rosters
//! and streams; `/metrics` counts members per path; `POST /v1/relay/token` mints a token
//! the relay admits for the caller's key and no other.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boringtun::x25519::{PublicKey, StaticSecret};
use common::*;
use serde_json::{json, Value};
use tabbify_control::api::SseEvent;
use tabbify_control::relays::{OwnRelay, Relays};
use tabbify_relay::client::{self, ClientError, RelayClient};

const COORD_BIN: &str = env!("CARGO_BIN_EXE_tabbify-mesh-coordinator");

fn wg_key(seed: u8) -> ([u8; 32], [u8; 32]) {
    let s = StaticSecret::from([seed; 32]);
    (s.to_bytes(), PublicKey::from(&s).to_bytes())
}

/// Registers `name` with the WireGuard public key of `secret`.
async fn join_with_key(h: &Harness, name: &str, tags: &[&str], public: &[u8; 32]) -> Peer {
    let token = h.token(tags).await;
    let client = h.client(name);
    let (s, v) = client
        .post(
            "/v1/mesh/register",
            register_body(name, public, tags, &token),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    Peer {
        name: name.to_owned(),
        id: v["peer_id"].as_str().unwrap().to_owned(),
        key: *public,
        client,
        registration: v,
    }
}

fn urls(v: &Value) -> Vec<String> {
    v["relays"]
        .as_array()
        .unwrap_or_else(|| panic!("no relays in {v}"))
        .iter()
        .map(|r| r["url"].as_str().unwrap().to_owned())
        .collect()
}

fn relays() -> Relays {
    Relays {
        own: Some(OwnRelay::FromHost {
            port: 8445,
            names: vec!["127.0.0.1".into()],
        }),
        others: vec!["https://relay2.example:443".into()],
    }
}

fn entry(roster: &Value, id: &str) -> Value {
    roster["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["peer_id"] == id)
        .unwrap()
        .clone()
}

async fn metrics(h: &Harness) -> String {
    let (_, v) = h.admin().get("/metrics").await;
    v.as_str().unwrap().to_owned()
}

#[tokio::test]
async fn home_relay_must_be_advertised_and_reaches_rosters_and_streams() {
    let h = Harness::start_with(|c| c.relays = relays()).await;
    let n = h.join("n1", &["node"]).await;
    let s = h.join("s1", &["supervisor"]).await;
    let own = "https://127.0.0.1:8445";
    assert_eq!(urls(&s.registration), [own, "https://relay2.example:443"]);
    let mut st = n.client.stream(None).await;
    let _snapshot = st.next_event().await;
    h.clock.advance_ms(1_000);

    // Forged or not advertised: 400 with a JSON error, nothing changed (not even the
    // endpoints the same heartbeat carries).
    let before = n.client.get("/v1/mesh/peers").await.1;
    for bad in [
        "https://evil.example:443",
        "https://127.0.0.1:8446",
        "https://relay2.example:444",
        "http://relay2.example:443",
        "",
    ] {
        let (st, v) = s
            .heartbeat(json!({"home_relay": bad, "endpoints": ["127.0.0.1:9999"]}))
            .await;
        assert_eq!(
            (st, v["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {v}"
        );
    }
    let after = n.client.get("/v1/mesh/peers").await.1;
    assert_eq!(entry(&before, &s.id), entry(&after, &s.id));
    assert!(entry(&after, &s.id).get("home_relay").is_none());

    // An advertised one is stored, carried in the roster and streamed as an upsert.
    let (st2, v) = s
        .heartbeat(json!({"home_relay": "https://relay2.example:443",
                           "paths": {"direct": 2, "relay": 1}}))
        .await;
    assert_eq!(st2, 200, "{v}");
    assert_eq!(urls(&v), [own, "https://relay2.example:443"]);
    let (_, e) = tokio::time::timeout(WAIT, st.next_event()).await.unwrap();
    assert!(
        matches!(e, SseEvent::PeerUpsert(ref p) if p.peer_id == s.id
            && p.home_relay.as_deref() == Some("https://relay2.example:443")),
        "{e:?}"
    );
    let roster = n.client.get("/v1/mesh/peers").await.1;
    assert_eq!(
        entry(&roster, &s.id)["home_relay"],
        "https://relay2.example:443"
    );
    // The own relay's URL is accepted too; leaving home_relay out clears it.
    h.clock.advance_ms(1_000);
    assert_eq!(s.heartbeat(json!({"home_relay": own})).await.0, 200);
    let (_, e) = tokio::time::timeout(WAIT, st.next_event()).await.unwrap();
    assert!(matches!(e, SseEvent::PeerUpsert(ref p) if p.home_relay.as_deref() == Some(own)));
    h.clock.advance_ms(1_000);
    assert_eq!(s.heartbeat(json!({})).await.0, 200);
    let (_, e) = tokio::time::timeout(WAIT, st.next_event()).await.unwrap();
    assert!(matches!(e, SseEvent::PeerUpsert(ref p) if p.home_relay.is_none()));
}

#[tokio::test]
async fn a_coordinator_without_relays_refuses_any_home_relay() {
    let h = Harness::start().await;
    let s = h.join("s1", &["supervisor"]).await;
    assert_eq!(urls(&s.registration), Vec::<String>::new());
    let (st, v) = s
        .heartbeat(json!({"home_relay": "https://127.0.0.1:8445"}))
        .await;
    assert_eq!(st, 400, "{v}");
}

#[tokio::test]
async fn metrics_count_members_by_path() {
    let h = Harness::start().await;
    let a = h.join("n1", &["node"]).await;
    let b = h.join("s1", &["supervisor"]).await;
    let c = h.join("s2", &["supervisor"]).await;
    let _d = h.join("w1", &["worker"]).await;
    for (p, direct, relay) in [(&a, 3, 0), (&b, 1, 2), (&c, 0, 4)] {
        let (st, v) = p
            .heartbeat(json!({"paths": {"direct": direct, "relay": relay}}))
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let m = metrics(&h).await;
    for line in [
        "tabbify_coordinator_members_by_path{path=\"direct\"} 1",
        "tabbify_coordinator_members_by_path{path=\"relay\"} 1",
        "tabbify_coordinator_members_by_path{path=\"mixed\"} 1",
        "tabbify_coordinator_members_by_path{path=\"none\"} 1",
        "tabbify_coordinator_peer_paths{path=\"direct\"} 4",
        "tabbify_coordinator_peer_paths{path=\"relay\"} 6",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing in\n{m}");
    }
    // Garbage counts are a 400.
    let (st, _) = a
        .heartbeat(json!({"paths": {"direct": -1, "relay": 0}}))
        .await;
    assert_eq!(st, 400);
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn relay_tokens_admit_the_callers_key_only() {
    let h = Harness::start().await;
    // The relay checks expiry against the wall clock: bring the manual clock there.
    h.clock.advance_ms(unix_ms() - 1_700_000_000_000);
    let key = h.coord.config().relay_token_key.clone().unwrap();
    let tls = tabbify_relay::server::server_config(
        &h.pki.server.cert_pem,
        &h.pki.server.key_pem,
        h.pki.ca.cert_pem(),
    )
    .unwrap();
    let relay = tabbify_relay::server::Relay::start_with_token_key(
        tabbify_relay::server::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics: None,
            tls,
            limits: Default::default(),
        },
        Some(key.public()),
    )
    .await
    .unwrap();
    let (n_secret, n_public) = wg_key(1);
    let (m_secret, m_public) = wg_key(2);
    let n = join_with_key(&h, "n1", &["node"], &n_public).await;
    let m = join_with_key(&h, "s1", &["supervisor"], &m_public).await;
    let (st, t) = n
        .client
        .post("/v1/relay/token", json!({"peer_id": n.id}))
        .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["public_key"], b64(&n_public));
    let exp = t["expires_at"].as_u64().unwrap();
    let now = unix_ms() / 1000;
    assert!(exp > now && exp <= now + 600, "{t}");
    let token = t["token"].as_str().unwrap();
    let anon = client::Config {
        server: relay.addr.to_string(),
        server_name: "127.0.0.1".into(),
        tls: tabbify_api::tls::client_config(h.pki.ca.cert_pem(), None).unwrap(),
        proxy: None,
        stream_only: true,
        fwmark: None,
    };
    let c = RelayClient::connect_with_token(&anon, &n_secret, Some(token))
        .await
        .unwrap();
    assert_eq!(c.lookup(&n_public).await.unwrap(), Some(c.handle));
    // Another member replays n1's token with its own key: refused.
    assert!(matches!(
        RelayClient::connect_with_token(&anon, &m_secret, Some(token)).await,
        Err(ClientError::Refused { .. })
    ));
    // A member asks for a token for another member's peer id: 403, no token.
    let (st, v) = m
        .client
        .post("/v1/relay/token", json!({"peer_id": n.id}))
        .await;
    assert_eq!(st, 403, "{v}");
    // An expired token (minted an hour ago by the coordinator's clock) is refused.
    let h_old = h.coord.config().relay_token_key.clone().unwrap();
    let old = h_old
        .mint(&tabbify_api::relay_token::Claims {
            identity: "n1".into(),
            key: n_public,
            issued_at: now - 3600,
            expires_at: now - 3300,
        })
        .unwrap();
    assert!(matches!(
        RelayClient::connect_with_token(&anon, &n_secret, Some(&old)).await,
        Err(ClientError::Upgrade(ref m)) if m.contains("bad_token")
    ));
    assert!(metrics(&h)
        .await
        .contains("tabbify_coordinator_relay_tokens_total 1"));
    // Without a client certificate there is no token at the coordinator either.
    let body = serde_json::to_vec(&json!({"peer_id": n.id})).unwrap();
    let r = h
        .pki
        .client_with(None)
        .at(h.addr)
        .call("POST", "/v1/relay/token", Some(body.into()))
        .await;
    assert!(r.as_ref().map_or(true, |(st, _)| *st != 200), "{r:?}");
}

/// A coordinator child process, killed (by its PID) when dropped.
struct Child_(Child);

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_runs_the_relay_in_process_and_advertises_it() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let w = |n: &str, s: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, s).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let cert = w("cert.pem", &pki.server.cert_pem);
    let key = w("key.pem", &pki.server.key_pem);
    let ca = w("ca.pem", pki.ca.cert_pem());
    let policy = w("policy.json", &serde_json::to_string(&policy()).unwrap());
    let state = dir.path().join("state");
    let base: Vec<String> = [
        "--bind",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--policy-file",
        &policy,
        "--stun-bind",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // A bad --relay-url is refused at start, naming the flag.
    let out = Command::new(COORD_BIN)
        .args(&base)
        .args(["--relay-url", "http://relay.example:443"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--relay-url") && err.contains("https"),
        "{err}"
    );

    let mut child = Command::new(COORD_BIN)
        .args(&base)
        .args(["--relay", "--relay-bind", "127.0.0.1:0"])
        .args(["--relay-url", "https://Relay2.Example:443/"])
        .args(["--state-dir", state.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let child = Child_(child);
    let relay_line = lines.next().unwrap().unwrap();
    let relay_addr: SocketAddr = relay_line
        .strip_prefix("relay on ")
        .unwrap_or_else(|| panic!("{relay_line}"))
        .parse()
        .unwrap();
    let listen_line = lines.next().unwrap().unwrap();
    let addr: SocketAddr = listen_line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{listen_line}"))
        .parse()
        .unwrap();

    let admin = pki.admin_client("admin").at(addr);
    let (st, t) = admin.post("/v1/tokens", json!({"tags": ["node"]})).await;
    assert_eq!(st, 200, "{t}");
    let (secret, public) = wg_key(3);
    let member = pki.peer("n1");
    let c = pki.client_with(Some(&member)).at(addr);
    let (st, v) = c
        .post(
            "/v1/mesh/register",
            register_body("n1", &public, &["node"], t["token"].as_str().unwrap()),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let own = format!("https://127.0.0.1:{}", relay_addr.port());
    assert_eq!(urls(&v), [own.clone(), "https://relay2.example:443".into()]);
    let peer_id = v["peer_id"].as_str().unwrap().to_owned();

    // A relay session with the member's mesh certificate, at the advertised URL.
    let url = own.strip_prefix("https://").unwrap();
    let cfg = client::Config {
        server: url.to_owned(),
        server_name: "127.0.0.1".into(),
        tls: tabbify_api::tls::client_config(
            pki.ca.cert_pem(),
            Some((&member.cert_pem, &member.key_pem)),
        )
        .unwrap(),
        proxy: None,
        stream_only: false,
        fwmark: None,
    };
    let session = RelayClient::connect(&cfg, &secret).await.unwrap();
    assert_eq!(session.lookup(&public).await.unwrap(), Some(session.handle));
    // The relay answers STUN on its UDP port.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let req = tabbify_api::stun::binding_request(&[4; 12]);
    let mut buf = [0u8; 600];
    let mut mapped = None;
    for _ in 0..20 {
        udp.send_to(&req, relay_addr).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(300), udp.recv_from(&mut buf)).await
        {
            mapped = tabbify_api::stun::parse(&buf[..n])
                .unwrap()
                .binding_success_for(&[4; 12]);
            break;
        }
    }
    assert_eq!(mapped, Some(udp.local_addr().unwrap()));

    // A token from the coordinator admits the member without its certificate; the
    // signing key is the one in the state directory.
    let (st, tok) = c.post("/v1/relay/token", json!({"peer_id": peer_id})).await;
    assert_eq!(st, 200, "{tok}");
    let pub_file = std::fs::read_to_string(state.join("relay-token.pub")).unwrap();
    assert_eq!(tok["signing_key"].as_str().unwrap(), pub_file.trim());
    let anon = client::Config {
        tls: tabbify_api::tls::client_config(pki.ca.cert_pem(), None).unwrap(),
        ..cfg.clone()
    };
    drop(session);
    let by_token =
        RelayClient::connect_with_token(&anon, &secret, Some(tok["token"].as_str().unwrap()))
            .await
            .unwrap();
    assert_eq!(
        by_token.lookup(&public).await.unwrap(),
        Some(by_token.handle)
    );

    // home_relay: the advertised own URL is accepted, a forged one is not.
    let hb = |home: &str| json!({"peer_id": peer_id, "home_relay": home});
    assert_eq!(c.post("/v1/mesh/heartbeat", hb(&own)).await.0, 200);
    assert_eq!(
        c.post("/v1/mesh/heartbeat", hb("https://127.0.0.1:1"))
            .await
            .0,
        400
    );
    drop(child);
}
