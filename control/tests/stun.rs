//! The coordinator's STUN server in-process: Binding requests on each STUN socket are
//! answered with the sender's address; register and heartbeat responses list the servers
//! (an unspecified bind address shown as the IP the client connected to); junk and a flood
//! of it are dropped and counted without disturbing the answers; a request with an unknown
//! comprehension-required attribute gets 420.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use tabbify_control::api::stun;
use tabbify_control::stun::StunBind;
use tokio::net::UdpSocket;

async fn metric(h: &Harness, name: &str) -> u64 {
    let (_, v) = h.admin().get("/metrics").await;
    let text = v.as_str().unwrap().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("tabbify_coordinator_{name} ")))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// Sends `req` to `server` and waits for the answer with `txid`, retrying (loopback UDP).
async fn ask(client: &UdpSocket, server: SocketAddr, req: &[u8]) -> stun::Message {
    let want = stun::parse(req).unwrap().transaction_id;
    let mut buf = [0u8; 1500];
    for _ in 0..20 {
        client.send_to(req, server).await.unwrap();
        let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await
        else {
            continue;
        };
        assert_eq!(from, server);
        let m = stun::parse(&buf[..n]).unwrap();
        if m.transaction_id == want {
            return m;
        }
    }
    panic!("no STUN answer from {server}");
}

async fn start() -> (Harness, Vec<SocketAddr>) {
    let sockets = StunBind::Addrs(vec![
        "127.0.0.1:0".parse().unwrap(),
        "0.0.0.0:0".parse().unwrap(),
    ])
    .bind("127.0.0.1:1".parse().unwrap())
    .unwrap();
    let bound = tabbify_control::stun::local_addrs(&sockets).unwrap();
    let addrs = bound.clone();
    let h = Harness::start_with(move |c| c.stun_addrs = addrs).await;
    tabbify_control::stun::spawn(&h.coord, sockets).unwrap();
    (h, bound)
}

#[tokio::test]
async fn binding_requests_are_answered_and_the_servers_listed() {
    let (h, bound) = start().await;
    // The wildcard socket is listed with the IP the client connected to.
    let listed: Vec<SocketAddr> = vec![
        bound[0],
        SocketAddr::new("127.0.0.1".parse().unwrap(), bound[1].port()),
    ];
    let n = h.join("n1", &["node"]).await;
    assert_eq!(
        n.registration["stun_servers"],
        json!(listed),
        "{}",
        n.registration
    );
    let (st, v) = n.heartbeat(json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["stun_servers"], json!(listed), "{v}");

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = client.local_addr().unwrap();
    for (i, server) in listed.iter().enumerate() {
        let txid = [i as u8 + 1; 12];
        let m = ask(&client, *server, &stun::binding_request(&txid)).await;
        assert!(m.fingerprint);
        assert_eq!(m.binding_success_for(&txid), Some(me), "{server}");
    }
    assert!(metric(&h, "stun_answered_total").await >= 2);
}

#[tokio::test]
async fn unknown_required_attribute_gets_420() {
    let (h, bound) = start().await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A Binding request carrying attribute 0x7777 (comprehension-required, unknown).
    let mut req = stun::binding_request(&[9; 12])[..20].to_vec();
    req[3] = 4;
    req.extend_from_slice(&[0x77, 0x77, 0x00, 0x00]);
    let m = ask(&client, bound[0], &req).await;
    assert_eq!(m.class, stun::Class::ErrorResponse);
    assert_eq!(m.error_code, Some(420));
    drop(h);
}

/// The attacker floods the STUN port with junk (WireGuard-looking datagrams, relay frames,
/// truncated and corrupted STUN, zero-length): every one is dropped and counted, none is
/// answered, and Binding requests keep being answered during and after.
#[tokio::test]
async fn junk_is_dropped_and_counted() {
    let (h, bound) = start().await;
    let server = bound[0];
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let good = stun::binding_request(&[1; 12]);
    let mut corrupt = good;
    corrupt[25] ^= 0xFF; // FINGERPRINT no longer matches
    let mut wg = [0u8; 148];
    wg[0] = 1;
    let junk: Vec<Vec<u8>> = vec![
        wg.to_vec(),
        vec![0xE1, 0, 0, 1, 0, 0, 0, 0],
        good[..19].to_vec(),
        good[..24].to_vec(),
        corrupt.to_vec(),
        vec![],
        vec![0xFF; 1400],
    ];
    const ROUNDS: u64 = 200;
    for _ in 0..ROUNDS {
        for j in &junk {
            attacker.send_to(j, server).await.unwrap();
        }
    }
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let m = ask(&client, server, &stun::binding_request(&[2; 12])).await;
    assert_eq!(
        m.binding_success_for(&[2; 12]),
        Some(client.local_addr().unwrap())
    );
    // Every junk datagram is counted once it has been read (loopback UDP may drop some
    // under load; what arrives is counted, and nothing is answered).
    let sent = ROUNDS * junk.len() as u64;
    let counted = metric(&h, "stun_malformed_total").await;
    assert!(counted > 0 && counted <= sent, "{counted} of {sent}");
    let mut buf = [0u8; 1500];
    let answered =
        tokio::time::timeout(Duration::from_millis(300), attacker.recv_from(&mut buf)).await;
    assert!(answered.is_err(), "junk was answered: {answered:?}");
}

fn entry_of(roster: &serde_json::Value, id: &str) -> tabbify_control::api::RosterEntry {
    let e = roster["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["peer_id"] == id)
        .unwrap();
    serde_json::from_value(e.clone()).unwrap()
}

/// A heartbeat's mapped endpoints and NAT class reach the others' rosters; an attacker
/// (a member with a valid certificate) reporting another member's mapped endpoint, an
/// address that is not its own, or garbage gets a 400 and changes nothing.
#[tokio::test]
async fn mapped_endpoints_and_nat_class_in_the_roster_and_attacks_refused() {
    use tabbify_control::api::NatClass;
    let (h, _) = start().await;
    let s = h.join("s1", &["supervisor"]).await;
    let n = h.join("n1", &["node"]).await;
    let mapped = "127.0.0.1:40001";
    let (st, v) = s
        .heartbeat(json!({"mapped_endpoints": [mapped], "nat": "endpoint_independent"}))
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, roster) = n.client.get("/v1/mesh/peers").await;
    let e = entry_of(&roster, &s.id);
    assert_eq!(
        e.mapped_endpoints,
        vec![mapped.parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(e.nat, NatClass::EndpointIndependent);
    // An old joiner's heartbeat (no fields) means: none known, class unknown.
    let (st, v) = n.heartbeat(json!({})).await;
    assert_eq!(st, 200, "{v}");
    let (_, roster) = s.client.get("/v1/mesh/peers").await;
    let e = entry_of(&roster, &n.id);
    assert!(e.mapped_endpoints.is_empty());
    assert_eq!(e.nat, NatClass::Unknown);

    let before = s.client.get("/v1/mesh/peers").await.1;
    let too_many: Vec<String> = (1..=5)
        .map(|p| format!("127.0.0.1:{}", 41000 + p))
        .collect();
    let mesh_ula = tabbify_control::ula::identity_ula("s1");
    for (body, what) in [
        (
            json!({"mapped_endpoints": [mapped]}),
            "another member's mapped endpoint",
        ),
        (
            json!({"mapped_endpoints": ["203.0.113.7:40000"]}),
            "an address not its own",
        ),
        (
            json!({"mapped_endpoints": ["0.0.0.0:40000"]}),
            "unspecified",
        ),
        (json!({"mapped_endpoints": ["127.0.0.1:0"]}), "port 0"),
        (
            json!({"mapped_endpoints": ["224.0.0.1:40000"]}),
            "multicast",
        ),
        (
            json!({"mapped_endpoints": [format!("[{mesh_ula}]:51820")]}),
            "a mesh ULA",
        ),
        (json!({"mapped_endpoints": too_many}), "too many"),
    ] {
        let (st, v) = n.heartbeat(body).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (400, Some("bad_request")),
            "{what}: {v}"
        );
    }
    let (st, v) = n.heartbeat(json!({"nat": "wide_open"})).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = n.heartbeat(json!({"mapped_endpoints": "nonsense"})).await;
    assert_eq!(st, 400, "{v}");
    let after = s.client.get("/v1/mesh/peers").await.1;
    assert_eq!(entry_of(&before, &n.id), entry_of(&after, &n.id));
    let (_, roster) = n.client.get("/v1/mesh/peers").await;
    assert_eq!(
        entry_of(&roster, &s.id).mapped_endpoints,
        vec![mapped.parse::<SocketAddr>().unwrap()],
        "the victim's mapped endpoint is untouched"
    );
}

/// `hole_punch` names the peer's mapped endpoint (where its NAT really maps the WireGuard
/// socket), not its reflexive IP with the listen port.
#[tokio::test]
async fn hole_punch_uses_the_mapped_endpoint() {
    use tabbify_control::api::SseEvent;
    let (h, _) = start().await;
    let token_a = h.token(&["supervisor"]).await;
    let token_b = h.token(&["node"]).await;
    let nat = |name: &str, token: &str| {
        let mut b = register_body(name, &key_for(name), &[], token);
        b["endpoints"] = json!(["10.0.0.5:51820"]);
        b
    };
    let a = h.client("a");
    let b = h.client("b");
    assert_eq!(a.post("/v1/mesh/register", nat("a", &token_a)).await.0, 200);
    assert_eq!(b.post("/v1/mesh/register", nat("b", &token_b)).await.0, 200);
    let id_b = tabbify_control::ula::identity_peer_id("b");
    let mut sa = a.stream(None).await;
    sa.next_event().await;
    h.clock.advance_ms(1_000);
    let (st, v) = b
        .post(
            "/v1/mesh/heartbeat",
            json!({"peer_id": id_b, "endpoints": ["10.0.0.5:51820"],
                   "mapped_endpoints": ["127.0.0.1:61001"], "nat": "endpoint_independent"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let mut punch = None;
    for _ in 0..3 {
        if let (_, SseEvent::HolePunch(p)) = sa.next_event().await {
            punch = Some(p);
            break;
        }
    }
    let p = punch.expect("a hole_punch for a");
    assert_eq!(p.peer_id, id_b);
    assert_eq!(p.endpoint, "127.0.0.1:61001".parse().unwrap());
}

/// The attacker floods Binding requests carrying a victim's source address (here the
/// victim's own socket sends them, which is what spoofed packets look like to the server):
/// the victim gets at most the per-source answer rate, the rest is dropped and counted,
/// and another source is still answered.
#[tokio::test]
async fn a_spoofed_flood_gets_at_most_the_per_source_rate() {
    use tabbify_control::api::stun_limit::{DEFAULT_BURST, DEFAULT_PER_SEC};
    let (h, bound) = start().await;
    let victim = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    const FLOOD: u64 = 2000;
    let t0 = std::time::Instant::now();
    for i in 0..FLOOD {
        let mut txid = [3u8; 12];
        txid[..8].copy_from_slice(&i.to_be_bytes());
        victim
            .send_to(&stun::binding_request(&txid), bound[0])
            .await
            .unwrap();
    }
    let m = h.coord.metrics();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Loopback may drop some under the flood: wait until the counts settle.
    let mut last = (u64::MAX, 0);
    loop {
        let now = (load(&m.stun_answered), load(&m.stun_rate_limited));
        if now == last && now.0 + now.1 > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "counts never settled");
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (answered, limited) = last;
    let elapsed = t0.elapsed().as_secs() + 1;
    let bound_answers = u64::from(DEFAULT_BURST) + u64::from(DEFAULT_PER_SEC) * elapsed;
    assert!(
        answered <= bound_answers,
        "{answered} answers to one source in {elapsed} s (limit {bound_answers})"
    );
    assert!(limited > 0 && answered + limited <= FLOOD);
    assert_eq!(metric(&h, "stun_rate_limited_total").await, limited);
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let m = ask(&other, bound[0], &stun::binding_request(&[5; 12])).await;
    assert_eq!(
        m.binding_success_for(&[5; 12]),
        Some(other.local_addr().unwrap())
    );
}
