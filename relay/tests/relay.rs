//! The relay end to end on loopback, with real TLS (certificates from the mesh CA helper's
//! library), real UDP sockets, and real WireGuard (boringtun `Tunn`s): frames both ways
//! over UDP, over the stream, mixed, and through an HTTP CONNECT proxy; and the attacker's
//! view: no or foreign certificate, a claimed key without its private key, unbound sources,
//! forged handles, stolen binds, a session flooding past its rate.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::OsRng;
use tabbify_control::ca::{Ca, Issued, Validity};
use tabbify_relay::client::{self, Event, RelayClient};
use tabbify_relay::proto::{self, Msg};
use tabbify_relay::server::core::{Drop, Limits};
use tabbify_relay::server::{self, Relay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const WAIT: Duration = Duration::from_secs(10);

struct Pki {
    ca: Ca,
    relay: Issued,
}

fn pki() -> Pki {
    let ca = Ca::generate("relay-test-ca", Validity::days_from_now(1)).unwrap();
    let relay = ca
        .issue_coordinator(
            "relay.mesh.test",
            &["127.0.0.1".to_owned()],
            Validity::days_from_now(1),
        )
        .unwrap();
    Pki { ca, relay }
}

async fn start(pki: &Pki, limits: Limits) -> Relay {
    let tls =
        server::server_config(&pki.relay.cert_pem, &pki.relay.key_pem, pki.ca.cert_pem()).unwrap();
    Relay::start(server::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        tls,
        limits,
    })
    .await
    .unwrap()
}

fn cfg_with(
    relay: &Relay,
    ca_pem: &str,
    cert: Option<&Issued>,
    stream_only: bool,
) -> client::Config {
    let tls = tabbify_api::tls::client_config(
        ca_pem,
        cert.map(|c| (c.cert_pem.as_str(), c.key_pem.as_str())),
    )
    .unwrap();
    client::Config {
        server: relay.addr.to_string(),
        server_name: "127.0.0.1".into(),
        tls,
        proxy: None,
        stream_only,
        fwmark: None,
    }
}

fn member_cfg(pki: &Pki, relay: &Relay, name: &str, stream_only: bool) -> client::Config {
    let cert = pki.ca.issue_peer(name, Validity::days_from_now(1)).unwrap();
    cfg_with(relay, pki.ca.cert_pem(), Some(&cert), stream_only)
}

fn wg_key() -> ([u8; 32], [u8; 32]) {
    let s = StaticSecret::random_from_rng(OsRng);
    let p = PublicKey::from(&s);
    (s.to_bytes(), p.to_bytes())
}

struct Member {
    client: RelayClient,
    public: [u8; 32],
    secret: [u8; 32],
    udp: Option<UdpSocket>,
}

async fn member(pki: &Pki, relay: &Relay, name: &str, stream_only: bool) -> Member {
    let (secret, public) = wg_key();
    let client = RelayClient::connect(&member_cfg(pki, relay, name, stream_only), &secret)
        .await
        .unwrap();
    Member {
        client,
        public,
        secret,
        udp: None,
    }
}

/// Binds a fresh UDP socket to the member's session (BIND until BIND_ACK).
async fn bind_udp(m: &mut Member, relay: &Relay) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bind = m.client.bind_datagram();
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 64];
    loop {
        assert!(Instant::now() < deadline, "no BIND_ACK from the relay");
        s.send_to(&bind, relay.addr).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await
        {
            let ack = proto::Control::parse(&buf[..n]).unwrap();
            assert_eq!(
                ack,
                proto::Control::BindAck {
                    handle: m.client.handle
                }
            );
            break;
        }
    }
    m.udp = Some(s);
}

fn frame(dst: u32, ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![ty, 0, 0, 0];
    f.extend_from_slice(payload);
    proto::wg_to_frame(&mut f, dst).unwrap();
    f
}

/// The next relay frame on a UDP socket (BIND_ACKs skipped).
async fn recv_udp(s: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
            .await
            .expect("no frame arrived over UDP")
            .unwrap();
        if proto::classify(&buf[..n]) == proto::Kind::RelayFrame {
            return buf[..n].to_vec();
        }
    }
}

async fn recv_stream(c: &mut RelayClient) -> Event {
    tokio::time::timeout(WAIT, c.recv())
        .await
        .expect("nothing arrived over the stream")
        .expect("session closed")
}

async fn recv_stream_frame(c: &mut RelayClient) -> Vec<u8> {
    loop {
        if let Event::Frame(f) = recv_stream(c).await {
            return f;
        }
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics_text(relay: &Relay) -> String {
    let mut c = TcpStream::connect(relay.metrics_addr.unwrap())
        .await
        .unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).await.unwrap();
    s
}

#[tokio::test]
async fn udp_frames_both_ways_with_handles_rewritten() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let mut a = member(&pki, &relay, "alice", false).await;
    let mut b = member(&pki, &relay, "bob", false).await;
    bind_udp(&mut a, &relay).await;
    bind_udp(&mut b, &relay).await;
    let hb = a.client.lookup(&b.public).await.unwrap().unwrap();
    let ha = b.client.lookup(&a.public).await.unwrap().unwrap();
    assert_eq!((ha, hb), (a.client.handle, b.client.handle));
    assert_eq!(a.client.lookup(&[9; 32]).await.unwrap(), None);

    let (ua, ub) = (a.udp.as_ref().unwrap(), b.udp.as_ref().unwrap());
    ua.send_to(&frame(hb, 4, b"a to b"), relay.addr)
        .await
        .unwrap();
    let mut got = recv_udp(ub).await;
    assert_eq!(proto::frame_to_wg(&mut got).unwrap(), ha, "source handle");
    assert_eq!(got, [&[4, 0, 0, 0][..], b"a to b"].concat());
    ub.send_to(&frame(ha, 4, b"b to a"), relay.addr)
        .await
        .unwrap();
    let mut got = recv_udp(ua).await;
    assert_eq!(proto::frame_to_wg(&mut got).unwrap(), hb);
    assert_eq!(&got[4..], b"b to a");

    // A burst (the relay batches it: GRO in, GSO out grouped per destination), in order.
    for i in 0..40u8 {
        let len = if i % 10 == 9 { 200 } else { 1400 };
        ua.send_to(&frame(hb, 4, &vec![i; len]), relay.addr)
            .await
            .unwrap();
    }
    for i in 0..40u8 {
        let got = recv_udp(ub).await;
        assert_eq!(proto::frame_header(&got).unwrap(), (4, ha));
        assert_eq!(got[4], i, "frames arrive in order");
    }
    let (udp, _) = relay.shared.metrics.forwarded_frames();
    assert!(udp >= 42, "counted {udp} UDP frames");
}

#[tokio::test]
async fn stream_frames_both_ways_and_mixed_transports() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let mut a = member(&pki, &relay, "alice", true).await;
    let mut b = member(&pki, &relay, "bob", true).await;
    let (ha, hb) = (a.client.handle, b.client.handle);
    assert_eq!(a.client.lookup(&b.public).await.unwrap(), Some(hb));
    a.client
        .send_frame(&frame(hb, 1, b"hello b"))
        .await
        .unwrap();
    let mut f = recv_stream_frame(&mut b.client).await;
    assert_eq!(proto::frame_to_wg(&mut f).unwrap(), ha);
    assert_eq!(&f[4..], b"hello b");
    b.client
        .send_frame(&frame(ha, 2, b"hello a"))
        .await
        .unwrap();
    let mut f = recv_stream_frame(&mut a.client).await;
    assert_eq!(proto::frame_to_wg(&mut f).unwrap(), hb);
    assert_eq!(f[0], 2);

    // c over UDP, a stream-only: UDP in, stream out, and back.
    let mut c = member(&pki, &relay, "carol", false).await;
    bind_udp(&mut c, &relay).await;
    let hc = c.client.handle;
    let uc = c.udp.as_ref().unwrap();
    uc.send_to(&frame(ha, 3, b"udp to stream"), relay.addr)
        .await
        .unwrap();
    let mut f = recv_stream_frame(&mut a.client).await;
    assert_eq!(proto::frame_to_wg(&mut f).unwrap(), hc);
    assert_eq!(&f[4..], b"udp to stream");
    a.client
        .send_frame(&frame(hc, 3, b"stream to udp"))
        .await
        .unwrap();
    let mut f = recv_udp(uc).await;
    assert_eq!(proto::frame_to_wg(&mut f).unwrap(), ha);
    assert_eq!(&f[4..], b"stream to udp");
    // A UDP-bound session may still send over its stream.
    c.client
        .send_frame(&frame(hb, 3, b"c via stream"))
        .await
        .unwrap();
    let mut f = recv_stream_frame(&mut b.client).await;
    assert_eq!(proto::frame_to_wg(&mut f).unwrap(), hc);
}

#[tokio::test]
async fn gone_is_pushed_when_a_session_ends() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let mut a = member(&pki, &relay, "alice", false).await;
    let b = member(&pki, &relay, "bob", false).await;
    let hb = b.client.handle;
    drop(b);
    loop {
        if recv_stream(&mut a.client).await == Event::Gone(hb) {
            break;
        }
    }
    assert_eq!(relay.shared.sessions(), 1);
}

/// Runs packets between two tunnels through the relay until `done`.
fn wg_out(r: TunnResult<'_>, dst: u32) -> Option<Vec<u8>> {
    match r {
        TunnResult::WriteToNetwork(p) => {
            let mut v = p.to_vec();
            proto::wg_to_frame(&mut v, dst).unwrap();
            Some(v)
        }
        TunnResult::Err(e) => panic!("boringtun: {e:?}"),
        _ => None,
    }
}

fn ipv4_packet(payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p.extend_from_slice(payload);
    p
}

/// Receives one frame, restores the WireGuard message, decapsulates it; returns what
/// to send back (frames) and any packet for the tunnel.
async fn wg_in(
    t: &mut Tunn,
    s: &UdpSocket,
    from: u32,
    back: u32,
) -> (Vec<Vec<u8>>, Option<Vec<u8>>) {
    let mut f = recv_udp(s).await;
    assert_eq!(proto::frame_to_wg(&mut f).unwrap(), from);
    let mut out = vec![0u8; 2048];
    let mut sends = Vec::new();
    let mut inner = None;
    match t.decapsulate(None, &f, &mut out) {
        TunnResult::WriteToNetwork(p) => {
            let mut v = p.to_vec();
            proto::wg_to_frame(&mut v, back).unwrap();
            sends.push(v);
            while let r @ TunnResult::WriteToNetwork(_) = t.decapsulate(None, &[], &mut out) {
                sends.extend(wg_out(r, back));
            }
        }
        TunnResult::WriteToTunnelV4(p, _) => inner = Some(p.to_vec()),
        TunnResult::Err(e) => panic!("boringtun: {e:?}"),
        _ => {}
    }
    (sends, inner)
}

#[tokio::test]
async fn wireguard_handshake_and_data_through_the_relay() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let mut a = member(&pki, &relay, "alice", false).await;
    let mut b = member(&pki, &relay, "bob", false).await;
    bind_udp(&mut a, &relay).await;
    bind_udp(&mut b, &relay).await;
    let (ha, hb) = (a.client.handle, b.client.handle);
    let mut ta = Tunn::new(
        StaticSecret::from(a.secret),
        PublicKey::from(b.public),
        None,
        None,
        1,
        None,
    );
    let mut tb = Tunn::new(
        StaticSecret::from(b.secret),
        PublicKey::from(a.public),
        None,
        None,
        2,
        None,
    );
    let (ua, ub) = (a.udp.as_ref().unwrap(), b.udp.as_ref().unwrap());
    let mut buf = vec![0u8; 2048];
    // Initiation a → b, response b → a.
    let init = wg_out(ta.format_handshake_initiation(&mut buf, false), hb).unwrap();
    assert_eq!(init.len(), 148, "zero bytes added to the initiation");
    ua.send_to(&init, relay.addr).await.unwrap();
    let (resp, _) = wg_in(&mut tb, ub, ha, ha).await;
    assert_eq!(resp.len(), 1);
    for r in &resp {
        ub.send_to(r, relay.addr).await.unwrap();
    }
    let (after, _) = wg_in(&mut ta, ua, hb, hb).await;
    for r in &after {
        ua.send_to(r, relay.addr).await.unwrap();
    }
    // Data a → b.
    let pkt = ipv4_packet(b"through the relay");
    let data = wg_out(ta.encapsulate(&pkt, &mut buf), hb).unwrap();
    ua.send_to(&data, relay.addr).await.unwrap();
    let mut inner = None;
    while inner.is_none() {
        inner = wg_in(&mut tb, ub, ha, ha).await.1;
    }
    assert_eq!(inner.unwrap(), pkt);
    // Data b → a.
    let pkt = ipv4_packet(b"and back");
    let data = wg_out(tb.encapsulate(&pkt, &mut buf), ha).unwrap();
    ub.send_to(&data, relay.addr).await.unwrap();
    let mut inner = None;
    while inner.is_none() {
        inner = wg_in(&mut ta, ua, hb, hb).await.1;
    }
    assert_eq!(inner.unwrap(), pkt);
}

/// A minimal HTTP CONNECT proxy; sets `used` when it tunnels a connection.
async fn proxy(used: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let used = used.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if c.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let mut parts = text.split_whitespace();
                if parts.next() != Some("CONNECT") {
                    let _ = c
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                }
                let target = parts.next().unwrap_or_default().to_owned();
                let Ok(mut up) = TcpStream::connect(&target).await else {
                    let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                used.store(true, Ordering::SeqCst);
                c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn frames_through_an_http_connect_proxy() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let used = Arc::new(AtomicBool::new(false));
    let p = proxy(used.clone()).await;
    let mut cfg = member_cfg(&pki, &relay, "proxied", true);
    cfg.proxy = Some(format!("http://{p}"));
    let (secret, _) = wg_key();
    let mut a = RelayClient::connect(&cfg, &secret).await.unwrap();
    assert!(
        used.load(Ordering::SeqCst),
        "the proxy tunnelled the session"
    );
    let mut b = member(&pki, &relay, "direct", false).await;
    bind_udp(&mut b, &relay).await;
    let hb = b.client.handle;
    a.send_frame(&frame(hb, 4, b"via proxy")).await.unwrap();
    let mut f = recv_udp(b.udp.as_ref().unwrap()).await;
    assert_eq!(proto::frame_to_wg(&mut f).unwrap(), a.handle);
    b.udp
        .as_ref()
        .unwrap()
        .send_to(&frame(a.handle, 4, b"to the proxied"), relay.addr)
        .await
        .unwrap();
    let mut f = recv_stream_frame(&mut a).await;
    assert_eq!(proto::frame_to_wg(&mut f).unwrap(), hb);
    assert_eq!(&f[4..], b"to the proxied");
}

#[tokio::test]
async fn no_certificate_or_a_foreign_ca_is_refused() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let (secret, _) = wg_key();
    // No client certificate: /health answers, the upgrade is refused with a JSON 401.
    let anon = cfg_with(&relay, pki.ca.cert_pem(), None, false);
    match RelayClient::connect(&anon, &secret).await {
        Err(client::ClientError::Upgrade(m)) => {
            assert!(
                m.contains("401") && m.contains("\"code\":\"unauthenticated\""),
                "{m}"
            )
        }
        Err(e) => panic!("wrong refusal: {e}"),
        Ok(_) => panic!("a client without a certificate got a session"),
    }
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(anon.tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut s = Vec::new();
    let _ = tls.read_to_end(&mut s).await;
    let s = String::from_utf8_lossy(&s);
    assert!(s.starts_with("HTTP/1.1 200"), "{s}");

    // A certificate from another CA: the TLS handshake fails.
    let other = Ca::generate("other-ca", Validity::days_from_now(1)).unwrap();
    let foreign = other
        .issue_peer("mallory", Validity::days_from_now(1))
        .unwrap();
    let cfg = cfg_with(&relay, pki.ca.cert_pem(), Some(&foreign), false);
    assert!(
        RelayClient::connect(&cfg, &secret).await.is_err(),
        "a foreign-CA certificate got a session"
    );
    assert_eq!(relay.shared.sessions(), 0);
}

#[tokio::test]
async fn claiming_another_members_key_is_refused() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let victim = member(&pki, &relay, "victim", false).await;
    let cfg = member_cfg(&pki, &relay, "mallory", false);
    let (mallory_secret, _) = wg_key();
    // Mallory has a valid certificate and runs the handshake by hand, claiming the
    // victim's public key with a MAC she can compute (from her own private key).
    let mut tls = client::open_stream(&cfg).await.unwrap();
    let exp = client::exporter(&tls).unwrap();
    let mut v = Vec::new();
    Msg::Hello {
        version: proto::VERSION,
        flags: 0,
    }
    .encode_record(&mut v)
    .unwrap();
    tls.write_all(&v).await.unwrap();
    let rec = read_rec(&mut tls).await;
    let Ok(Msg::Challenge { ephemeral, nonce }) = Msg::parse(&rec) else {
        panic!("no challenge")
    };
    let shared = StaticSecret::from(mallory_secret).diffie_hellman(&PublicKey::from(ephemeral));
    let mac = proto::proof_mac(shared.as_bytes(), &exp, &ephemeral, &nonce, &victim.public);
    v.clear();
    Msg::Proof {
        key: victim.public,
        mac,
    }
    .encode_record(&mut v)
    .unwrap();
    tls.write_all(&v).await.unwrap();
    let rec = read_rec(&mut tls).await;
    match Msg::parse(&rec) {
        Ok(Msg::Refused { code, .. }) => assert_eq!(code, proto::RefuseCode::BadProof as u8),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The victim's session is untouched.
    assert_eq!(
        victim.client.lookup(&victim.public).await.unwrap(),
        Some(victim.client.handle)
    );
    assert_eq!(relay.shared.sessions(), 1);
    assert!(metrics_text(&relay)
        .await
        .contains("tabbify_relay_sessions_refused_total{reason=\"bad_proof\"} 1"));
}

async fn read_rec(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut len = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut v = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut v).await.unwrap();
    v
}

#[tokio::test]
async fn unbound_sources_forged_handles_and_stolen_binds_deliver_nothing() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let mut a = member(&pki, &relay, "alice", false).await;
    let mut b = member(&pki, &relay, "bob", false).await;
    let mut m = member(&pki, &relay, "mallory", false).await;
    bind_udp(&mut a, &relay).await;
    bind_udp(&mut b, &relay).await;
    bind_udp(&mut m, &relay).await;
    let (ha, hb) = (a.client.handle, b.client.handle);
    let (ua, ub, um) = (
        a.udp.as_ref().unwrap(),
        b.udp.as_ref().unwrap(),
        m.udp.as_ref().unwrap(),
    );
    let metrics = &relay.shared.metrics;

    // From an address no session bound, even claiming to be a's handle in the header.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger
        .send_to(&frame(hb, 4, b"unbound"), relay.addr)
        .await
        .unwrap();
    // To a handle that is not live.
    um.send_to(&frame(0xAB_CDEF, 4, b"forged"), relay.addr)
        .await
        .unwrap();
    // Stealing b's binding: b's handle with mallory's cookie, and with a guessed one.
    for cookie in [m.client.cookie, [0; 16]] {
        let bind = proto::Control::Bind { handle: hb, cookie }.encode();
        um.send_to(&bind, relay.addr).await.unwrap();
    }
    // Junk and a truncated BIND.
    um.send_to(&[0x45, 0, 0, 0, 1], relay.addr).await.unwrap();
    um.send_to(&[proto::BIND, 0, 0], relay.addr).await.unwrap();
    // The marker: b's first frame is a's, nothing of the above got through.
    ua.send_to(&frame(hb, 4, b"marker"), relay.addr)
        .await
        .unwrap();
    let mut f = recv_udp(ub).await;
    assert_eq!(proto::frame_to_wg(&mut f).unwrap(), ha);
    assert_eq!(&f[4..], b"marker");
    assert_eq!(metrics.drops(Drop::UnboundSource), 1);
    assert_eq!(metrics.drops(Drop::UnknownHandle), 1);
    assert_eq!(metrics.drops(Drop::BadBind), 2);
    assert_eq!(metrics.drops(Drop::Junk), 1);
    assert_eq!(metrics.drops(Drop::Malformed), 1);
    // Mallory sees none of b's traffic: her first frame is one addressed to her.
    ua.send_to(&frame(m.client.handle, 4, b"for mallory"), relay.addr)
        .await
        .unwrap();
    let f = recv_udp(um).await;
    assert_eq!(&f[4..], b"for mallory");
    // Nor b's stream traffic.
    a.client
        .send_frame(&frame(hb, 4, b"stream to b"))
        .await
        .unwrap();
    let f = recv_udp(ub).await;
    assert_eq!(&f[4..], b"stream to b");
    a.client
        .send_frame(&frame(m.client.handle, 4, b"stream to m"))
        .await
        .unwrap();
    let f = recv_udp(um).await;
    assert_eq!(&f[4..], b"stream to m");
    let text = metrics_text(&relay).await;
    assert!(text.contains("tabbify_relay_drops_total{reason=\"unbound_source\"} 1"));
    assert!(text.contains("tabbify_relay_sessions 3"));
}

#[tokio::test]
async fn a_session_over_its_rate_is_limited_without_hurting_another() {
    let pki = pki();
    let relay = start(
        &pki,
        Limits {
            rate_bytes_per_sec: 10_000,
            burst_bytes: 20_000,
            ..Limits::default()
        },
    )
    .await;
    let mut a = member(&pki, &relay, "flooder", false).await;
    let mut b = member(&pki, &relay, "bob", false).await;
    let mut c = member(&pki, &relay, "carol", false).await;
    bind_udp(&mut a, &relay).await;
    bind_udp(&mut b, &relay).await;
    bind_udp(&mut c, &relay).await;
    let hb = b.client.handle;
    let ua = a.udp.as_ref().unwrap();
    let metrics = &relay.shared.metrics;
    let before = metrics.forwarded_frames().0;
    for _ in 0..100 {
        ua.send_to(&frame(hb, 4, &[1; 996]), relay.addr)
            .await
            .unwrap();
    }
    wait_until("the flood to be processed", || {
        metrics.forwarded_frames().0 - before + metrics.drops(Drop::OverRate) >= 100
    })
    .await;
    let limited = metrics.drops(Drop::OverRate);
    assert!(
        limited >= 50,
        "only {limited} of 100 KB over a 20 KB burst were limited"
    );
    // Carol's 10 frames all arrive; bob's socket sees the flooder's first ones too.
    let uc = c.udp.as_ref().unwrap();
    for i in 0..10u8 {
        uc.send_to(&frame(hb, 4, &[i + 100; 996]), relay.addr)
            .await
            .unwrap();
    }
    let ub = b.udp.as_ref().unwrap();
    let mut from_c = 0;
    while from_c < 10 {
        let f = recv_udp(ub).await;
        if proto::frame_header(&f).unwrap().1 == c.client.handle {
            assert_eq!(f[4], 100 + from_c);
            from_c += 1;
        }
    }
    assert_eq!(
        metrics.drops(Drop::OverRate),
        limited,
        "carol was not limited"
    );
}

#[tokio::test]
async fn an_idle_session_expires_and_the_others_learn_gone() {
    let pki = pki();
    let relay = start(
        &pki,
        Limits {
            idle_timeout: Duration::from_secs(1),
            ..Limits::default()
        },
    )
    .await;
    let mut a = member(&pki, &relay, "alice", true).await;
    let mut b = member(&pki, &relay, "bob", true).await;
    let hb = b.client.handle;
    // a stays active; b says nothing and is ended by the relay.
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no GONE for the idle session");
        a.client.keepalive().await.unwrap();
        match tokio::time::timeout(Duration::from_millis(200), a.client.recv()).await {
            Ok(Some(Event::Gone(h))) if h == hb => break,
            _ => {}
        }
    }
    assert_eq!(a.client.lookup(&b.public).await.unwrap(), None);
    // b's connection was closed: its event stream ends.
    loop {
        match tokio::time::timeout(WAIT, b.client.recv()).await {
            Ok(None) => break,
            Ok(Some(_)) => continue,
            Err(_) => panic!("the idle session's connection stayed open"),
        }
    }
    assert_eq!(relay.shared.sessions(), 1);
}

#[tokio::test]
async fn per_identity_limit_refuses_and_a_reconnect_replaces() {
    let pki = pki();
    let relay = start(
        &pki,
        Limits {
            max_sessions_per_identity: 1,
            ..Limits::default()
        },
    )
    .await;
    let mut watcher = member(&pki, &relay, "watcher", true).await;
    let cfg = member_cfg(&pki, &relay, "greedy", true);
    let (k1, _) = wg_key();
    let (k2, _) = wg_key();
    let mut first = RelayClient::connect(&cfg, &k1).await.unwrap();
    // A second key under the same identity: over the per-identity limit.
    match RelayClient::connect(&cfg, &k2).await {
        Err(client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, proto::RefuseCode::IdentityLimit as u8)
        }
        Err(e) => panic!("wrong refusal: {e}"),
        Ok(_) => panic!("a second session over the per-identity limit"),
    }
    // The same key again (a reconnect): replaces the first session.
    let old = first.handle;
    let second = RelayClient::connect(&cfg, &k1).await.unwrap();
    assert_ne!(second.handle, old);
    loop {
        if recv_stream(&mut watcher.client).await == Event::Gone(old) {
            break;
        }
    }
    loop {
        match tokio::time::timeout(WAIT, first.recv()).await {
            Ok(None) => break,
            Ok(Some(_)) => continue,
            Err(_) => panic!("the replaced session's connection stayed open"),
        }
    }
    assert_eq!(relay.shared.sessions(), 2);
    assert!(metrics_text(&relay)
        .await
        .contains("tabbify_relay_sessions_refused_total{reason=\"identity_limit\"} 1"));
}

#[tokio::test]
async fn stalled_handshakes_are_capped_and_the_slot_comes_back() {
    let pki = pki();
    let relay = start(
        &pki,
        Limits {
            max_handshakes: 1,
            ..Limits::default()
        },
    )
    .await;
    // An unauthenticated client opens TCP and says nothing: it holds the only slot.
    let stall = TcpStream::connect(relay.addr).await.unwrap();
    let cfg = member_cfg(&pki, &relay, "alice", true);
    let (k, _) = wg_key();
    assert!(
        RelayClient::connect(&cfg, &k).await.is_err(),
        "a handshake past the cap was served"
    );
    assert!(metrics_text(&relay)
        .await
        .contains("tabbify_relay_connections_refused_total{reason=\"handshakes_pending\"} 1"));
    // Once the staller leaves, members get in again; a live session does not hold a slot.
    drop(stall);
    let deadline = Instant::now() + WAIT;
    let a = loop {
        if let Ok(c) = RelayClient::connect(&cfg, &k).await {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the handshake slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let b = member(&pki, &relay, "bob", true).await;
    assert_eq!(a.lookup(&b.public).await.unwrap(), Some(b.client.handle));
}

/// Runs the session handshake by hand (a member with a valid certificate who then writes
/// raw records): returns the stream and the assigned handle.
async fn raw_session(
    pki: &Pki,
    relay: &Relay,
    name: &str,
) -> (tokio_rustls::client::TlsStream<TcpStream>, u32) {
    let cfg = member_cfg(pki, relay, name, true);
    let (secret, public) = wg_key();
    let mut tls = client::open_stream(&cfg).await.unwrap();
    let exp = client::exporter(&tls).unwrap();
    let mut v = Vec::new();
    Msg::Hello {
        version: proto::VERSION,
        flags: proto::FLAG_STREAM_ONLY,
    }
    .encode_record(&mut v)
    .unwrap();
    tls.write_all(&v).await.unwrap();
    let rec = read_rec(&mut tls).await;
    let Ok(Msg::Challenge { ephemeral, nonce }) = Msg::parse(&rec) else {
        panic!("no challenge")
    };
    let shared = StaticSecret::from(secret).diffie_hellman(&PublicKey::from(ephemeral));
    let mac = proto::proof_mac(shared.as_bytes(), &exp, &ephemeral, &nonce, &public);
    v.clear();
    Msg::Proof { key: public, mac }
        .encode_record(&mut v)
        .unwrap();
    tls.write_all(&v).await.unwrap();
    let rec = read_rec(&mut tls).await;
    let Ok(Msg::Assigned { handle, .. }) = Msg::parse(&rec) else {
        panic!("not assigned: {rec:?}")
    };
    (tls, handle)
}

/// Collects `n` frames from a session with `recv_batch`.
async fn recv_frames(c: &mut RelayClient, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(WAIT, c.recv_batch())
            .await
            .expect("frames missing on the stream")
            .expect("session closed")
        {
            client::Batch::Frames(b) => got.extend(b.iter().map(<[u8]>::to_vec)),
            client::Batch::Gone(_) => {}
        }
    }
    got
}

/// The attacker: a member with a valid certificate writes one burst of many records with
/// malformed ones in the middle (an empty record, a frame shorter than its header, an
/// unknown type, a frame to a handle nobody has), and a last frame split across two
/// writes inside its length prefix. The relay reads the burst in large chunks: every good
/// frame arrives, in order, with the sender's handle; each bad record is dropped and
/// counted; the sender's session carries on (KEEPALIVE and LOOKUP answered after).
#[tokio::test]
async fn a_stream_burst_with_malformed_records_forwards_the_rest_in_order() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let mut b = member(&pki, &relay, "bob", true).await;
    let hb = b.client.handle;
    let (mut m, hm) = raw_session(&pki, &relay, "mallory").await;
    let mut wire = Vec::new();
    for i in 0..50u8 {
        Msg::Frame(&frame(hb, 4, &vec![i; 1400]))
            .encode_record(&mut wire)
            .unwrap();
    }
    wire.extend_from_slice(&[0, 0]); // empty record
    wire.extend_from_slice(&[0, 2, 0xE4, 0]); // truncated frame
    wire.extend_from_slice(&[0, 3, 0x10, 1, 2]); // unknown type
    Msg::Frame(&frame(0x00AB_CDEF, 4, b"nobody"))
        .encode_record(&mut wire)
        .unwrap();
    for i in 50..100u8 {
        Msg::Frame(&frame(hb, 4, &vec![i; 1400]))
            .encode_record(&mut wire)
            .unwrap();
    }
    m.write_all(&wire).await.unwrap();
    m.flush().await.unwrap();
    let mut last = Vec::new();
    Msg::Frame(&frame(hb, 4, &[100; 300]))
        .encode_record(&mut last)
        .unwrap();
    m.write_all(&last[..1]).await.unwrap();
    m.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    m.write_all(&last[1..]).await.unwrap();
    m.flush().await.unwrap();

    let got = recv_frames(&mut b.client, 101).await;
    for (i, f) in got.iter().enumerate() {
        assert_eq!(proto::frame_header(f).unwrap(), (4, hm), "frame {i}");
        assert_eq!(f[4], i as u8, "frames arrive in order");
    }
    let metrics = &relay.shared.metrics;
    assert_eq!(metrics.drops(Drop::Malformed), 3);
    assert_eq!(metrics.drops(Drop::UnknownHandle), 1);

    // The session survives the bad records.
    let mut v = Vec::new();
    Msg::Keepalive.encode_record(&mut v).unwrap();
    Msg::Lookup { key: [7; 32] }.encode_record(&mut v).unwrap();
    m.write_all(&v).await.unwrap();
    m.flush().await.unwrap();
    assert_eq!(Msg::parse(&read_rec(&mut m).await), Ok(Msg::Keepalive));
    assert_eq!(
        Msg::parse(&read_rec(&mut m).await),
        Ok(Msg::Answer {
            key: [7; 32],
            handle: None
        })
    );
    assert_eq!(relay.shared.sessions(), 2);
}

/// Frames queued as one buffer ([`client::push_frame`] + `send_frames`) arrive whole and
/// in order, however the stream splits them into reads; `recv` and `recv_batch` can be
/// mixed without losing frames; a buffer that is not a sequence of whole relay frames is
/// refused and sends nothing.
#[tokio::test]
async fn batched_frames_arrive_whole_and_junk_batches_are_refused() {
    let pki = pki();
    let relay = start(&pki, Limits::default()).await;
    let a = member(&pki, &relay, "alice", true).await;
    let mut b = member(&pki, &relay, "bob", true).await;
    let (ha, hb) = (a.client.handle, b.client.handle);
    let mut records = Vec::new();
    for i in 0..200u8 {
        client::push_frame(&mut records, &frame(hb, 4, &vec![i; 1400])).unwrap();
    }
    assert!(client::push_frame(&mut records, &[4, 0, 0, 0, 1]).is_err());
    assert!(client::push_frame(&mut records, &[0xE4, 0]).is_err());
    a.client.send_frames(records).await.unwrap();

    let first = recv_stream_frame(&mut b.client).await;
    assert_eq!(first[4], 0);
    let rest = recv_frames(&mut b.client, 199).await;
    for (i, f) in rest.iter().enumerate() {
        assert_eq!(proto::frame_header(f).unwrap(), (4, ha));
        assert_eq!(usize::from(f[4]), i + 1, "frames arrive in order");
        assert_eq!(f.len(), 1404);
    }

    let mut bad = Vec::new();
    client::push_frame(&mut bad, &frame(hb, 4, b"x")).unwrap();
    let mut truncated = bad.clone();
    truncated.pop();
    assert!(a.client.send_frames(truncated).await.is_err());
    let mut not_frame = bad.clone();
    Msg::Keepalive.encode_record(&mut not_frame).unwrap();
    assert!(a.client.send_frames(not_frame).await.is_err());
    a.client
        .send_frames([bad.clone(), bad].concat())
        .await
        .unwrap();
    let got = recv_frames(&mut b.client, 2).await;
    assert_eq!(got.len(), 2, "only the good batch arrived");
    assert!(got.iter().all(|f| &f[4..] == b"x"));
}
