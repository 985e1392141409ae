//! The edge's limits, played by an attacking client on loopback: a trickled request body, a
//! request head and a body that outlast the request deadline, more connections than the
//! per-address and overall caps, an idle WebSocket, bare-LF request lines, and `/metrics`
//! asked on the public listener. Each refusal's counter is checked. Short flag values keep
//! the tests quick; they check behaviour (what is answered, what is counted), not timing.
#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a test failure.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tabbify_edge::auth::NodeKey;
use tabbify_edge::metrics::Refusal;
use tabbify_edge::testkit::{raw_request, start_edge, start_edge_with, TestApp, TEST_KEY};
use tabbify_edge::{Limits, RunningEdge, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const APP: &str = "5b6d0f2e-4c1a-4e8b-9f3d-2a7c6e1b0d94";
/// Upper bound for anything the tests wait for (never reached when the edge behaves).
const PATIENCE: Duration = Duration::from_secs(20);

async fn edge(limits: Limits) -> (TestApp, RunningEdge) {
    let app = TestApp::start_local("a").await.unwrap();
    let edge = start_edge(Upstream::Fixed(app.addr()), None, limits)
        .await
        .unwrap();
    (app, edge)
}

/// Status and JSON body of everything the server sends until it closes.
fn parse(raw: &[u8]) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// Writes `head`, then `body` one byte every `every` until the server answers or closes;
/// returns what it sent back.
async fn trickle(addr: SocketAddr, head: &[u8], body: &[u8], every: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = {
        let body = body.to_vec();
        tokio::spawn(async move {
            for b in body {
                tokio::time::sleep(every).await;
                if wr.write_all(&[b]).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, rd.read_to_end(&mut got)).await;
    writer.abort();
    got
}

fn app_post(len: usize) -> Vec<u8> {
    format!(
        "POST /app/{APP}/sha256 HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {TEST_KEY}\r\nContent-Length: {len}\r\n\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_with_408_and_counted() {
    let (_app, edge) = edge(Limits {
        min_body_rate: 100,
        body_rate_window: Duration::from_millis(500),
        body_rate_grace: Duration::from_millis(500),
        request_timeout: None,
        ..Limits::default()
    })
    .await;
    // One byte every 300 ms, the 1 byte every 3 s scaled down.
    let got = trickle(
        edge.local_addr(),
        &app_post(1000),
        &[b'x'; 1000],
        Duration::from_millis(300),
    )
    .await;
    let (status, body) = parse(&got);
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&got));
    assert_eq!(body["error"], "request_timeout");
    let m = edge.metrics();
    assert_eq!(m.refused_count(Refusal::BodyTooSlow), 1);
    assert_eq!(m.refused_count(Refusal::RequestDeadline), 0);

    // A body at a good rate through the same limits passes.
    let c = tabbify_edge::testkit::client();
    let req = http::Request::post(format!("http://{}/app/{APP}/sha256", edge.local_addr()))
        .header("authorization", format!("Bearer {TEST_KEY}"))
        .body(http_body_util::Either::Left(
            tabbify_edge::testkit::PatternBody::new(3 << 20),
        ))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(m.refused_count(Refusal::BodyTooSlow), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_deadline_cuts_a_slow_head_and_a_slow_body() {
    let (_app, edge) = edge(Limits {
        request_timeout: Some(Duration::from_secs(1)),
        min_body_rate: 0,
        ..Limits::default()
    })
    .await;
    // A head trickled a header line at a time: answered 408 (the head was never handed on).
    let lines: Vec<u8> = (0..100)
        .flat_map(|i| format!("X-H{i}: v\r\n").into_bytes())
        .collect();
    let got = trickle(
        edge.local_addr(),
        b"GET /health HTTP/1.1\r\nHost: e\r\n",
        &lines,
        Duration::from_millis(20),
    )
    .await;
    let (status, body) = parse(&got);
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&got));
    assert_eq!(body["error"], "request_timeout");
    assert_eq!(edge.metrics().refused_count(Refusal::RequestDeadline), 1);

    // A body that keeps coming (fast enough for any rate) but not all within the deadline.
    let got = trickle(
        edge.local_addr(),
        &app_post(100_000),
        &[b'y'; 100_000],
        Duration::from_millis(5),
    )
    .await;
    let (status, body) = parse(&got);
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&got));
    assert_eq!(body["error"], "request_timeout");
    assert_eq!(edge.metrics().refused_count(Refusal::RequestDeadline), 2);
    assert_eq!(edge.metrics().refused_count(Refusal::BodyTooSlow), 0);

    // The clock runs per request, not per connection: keep-alive requests each get it anew.
    let mut s = TcpStream::connect(edge.local_addr()).await.unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: e\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

async fn get_on(s: &mut TcpStream) -> u16 {
    s.write_all(b"GET /health HTTP/1.1\r\nHost: e\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    parse(&buf[..n]).0
}

async fn refused_with(addr: SocketAddr) -> (u16, serde_json::Value) {
    let resp = raw_request(
        addr,
        "GET /health HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        b"",
    )
    .await
    .unwrap();
    let body = serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null);
    (resp.status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_past_the_per_ip_cap_is_refused_while_the_others_work() {
    let (_app, edge) = edge(Limits {
        max_connections_per_ip: 3,
        ..Limits::default()
    })
    .await;
    let addr = edge.local_addr();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_on(&mut s).await, 200);
        held.push(s);
    }
    let (status, body) = refused_with(addr).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    assert_eq!(edge.metrics().refused_count(Refusal::PerIpCap), 1);
    for s in &mut held {
        assert_eq!(get_on(s).await, 200, "held connections keep working");
    }
    // One closes: its slot is free again.
    drop(held.pop());
    let freed = tokio::time::timeout(PATIENCE, async {
        loop {
            if refused_with(addr).await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(freed.is_ok(), "a closed connection's slot was not released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_past_the_overall_cap_is_refused_with_503() {
    let (_app, edge) = edge(Limits {
        max_connections: 2,
        ..Limits::default()
    })
    .await;
    let addr = edge.local_addr();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get_on(&mut s).await, 200);
        held.push(s);
    }
    let (status, body) = refused_with(addr).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("overloaded")));
    assert_eq!(edge.metrics().refused_count(Refusal::ConnectionCap), 1);
    assert_eq!(edge.metrics().refused_count(Refusal::PerIpCap), 0);
    assert_eq!(get_on(&mut held[0]).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_is_closed_and_an_active_one_is_not() {
    let (_app, edge) = edge(Limits {
        ws_idle_timeout: Duration::from_millis(600),
        ..Limits::default()
    })
    .await;
    let connect = || async {
        let mut req = format!("ws://{}/app/{APP}/ws", edge.local_addr())
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {TEST_KEY}").parse().unwrap(),
        );
        tokio_tungstenite::connect_async(req).await.unwrap().0
    };
    // Active: a message every 150 ms for well past the idle timeout.
    let mut ws = connect().await;
    for i in 0..12 {
        let text = format!("ping {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(edge.metrics().upgrades_idle_closed_count(), 0);
    // Idle: the edge closes it.
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(m)) if m.is_close() => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "idle WebSocket was kept open");
    assert_eq!(edge.metrics().upgrades_idle_closed_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_request_and_header_lines_are_refused_with_400() {
    let (_app, edge) = edge(Limits::default()).await;
    let addr = edge.local_addr();
    for head in [
        format!("GET /app/{APP}/echo HTTP/1.1\nHost: e\r\nAuthorization: Bearer {TEST_KEY}\r\nConnection: close\r\n\r\n"),
        format!("GET /app/{APP}/echo HTTP/1.1\r\nHost: e\nAuthorization: Bearer {TEST_KEY}\r\nConnection: close\r\n\r\n"),
        "GET /health HTTP/1.1\r\nHost: e\r\nConnection: close\n\n".to_owned(),
    ] {
        let resp = raw_request(addr, &head, b"").await.unwrap();
        assert_eq!(resp.status, 400, "{head:?}");
        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(v["error"], "bad_request");
        assert_eq!(resp.header("connection"), vec!["close"]);
    }
    assert_eq!(edge.metrics().refused_count(Refusal::BareLf), 3);
    // Pipelined: the good request before the bad one is answered, then the 400, then close.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: e\r\n\r\nGET /health HTTP/1.1\nHost: e\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    let first = text.find("HTTP/1.1 200").unwrap();
    let second = text.find("HTTP/1.1 400").unwrap();
    assert!(first < second, "{text}");
    assert_eq!(edge.metrics().refused_count(Refusal::BareLf), 4);
    // CRLF requests on the same edge are fine.
    let ok = raw_request(
        addr,
        "GET /health HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unframeable_heads_and_bad_chunk_lines_are_refused() {
    let (_app, edge) = edge(Limits::default()).await;
    let addr = edge.local_addr();
    // Disagreeing lengths (a smuggling attempt): 400 with a JSON body, never forwarded.
    let resp = raw_request(
        addr,
        &format!("POST /app/{APP}/sha256 HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {TEST_KEY}\r\nContent-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"),
        b"abcd",
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 400);
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(v["error"], "bad_request");
    assert_eq!(edge.metrics().refused_count(Refusal::BadFraming), 1);
    // A chunk-size line ending in a bare LF mid-body: the request never completes (the app
    // does not get a body the edge did not check), and it is counted.
    let resp = raw_request(
        addr,
        &format!("POST /app/{APP}/sha256 HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {TEST_KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"),
        b"3\r\nabc\r\n3\ndef\r\n0\r\n\r\n",
    )
    .await;
    if let Ok(resp) = resp {
        assert_ne!(
            resp.status, 200,
            "a body with a bare LF was forwarded whole"
        );
    }
    assert_eq!(edge.metrics().refused_count(Refusal::BareLf), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_closes_the_connection() {
    let (_app, edge) = edge(Limits::default()).await;
    // An upgrade request to an endpoint that does not switch, then a bare-LF request the
    // edge would not inspect after an upgrade: the connection is closed after the first.
    let mut s = TcpStream::connect(edge.local_addr()).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: e\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\nGET /health HTTP/1.1\nHost: e\n\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_on_the_metrics_listener_not_the_public_one() {
    let (_app, edge) = edge(Limits::default()).await;
    let get = "GET /metrics HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n";
    let public = raw_request(edge.local_addr(), get, b"").await.unwrap();
    assert_eq!(public.status, 404);
    let v: serde_json::Value = serde_json::from_slice(&public.body).unwrap();
    assert_eq!(v["error"], "not_found");
    // The edge's key does not open it either.
    let with_node_key = format!(
        "GET /metrics HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {TEST_KEY}\r\nConnection: close\r\n\r\n"
    );
    let public = raw_request(edge.local_addr(), &with_node_key, b"")
        .await
        .unwrap();
    assert_eq!(public.status, 404);
    let private = raw_request(edge.metrics_addr().unwrap(), get, b"")
        .await
        .unwrap();
    assert_eq!(private.status, 200);
    let text = String::from_utf8(private.body).unwrap();
    assert!(
        text.contains("tabbify_edge_refused_total{reason=\"metrics_public\"} 2\n"),
        "{text}"
    );
    // The metrics listener serves nothing else.
    let other = raw_request(
        edge.metrics_addr().unwrap(),
        &format!("GET /app/{APP}/echo HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {TEST_KEY}\r\nConnection: close\r\n\r\n"),
        b"",
    )
    .await
    .unwrap();
    assert_eq!(other.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_the_public_listener_need_the_metrics_key() {
    const METRICS_KEY: &str = "metrics-key-0123456789";
    let app = TestApp::start_local("a").await.unwrap();
    let edge = start_edge_with(Upstream::Fixed(app.addr()), None, Limits::default(), |c| {
        c.metrics_key = Some(NodeKey::new(METRICS_KEY).unwrap());
        c.metrics_bind = None;
    })
    .await
    .unwrap();
    assert_eq!(edge.metrics_addr(), None);
    let ask = |key: &str| {
        format!("GET /metrics HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n")
    };
    for wrong in [TEST_KEY, "metrics-key-0123456789x"] {
        let resp = raw_request(edge.local_addr(), &ask(wrong), b"")
            .await
            .unwrap();
        assert_eq!(resp.status, 404, "{wrong}");
    }
    let none = raw_request(
        edge.local_addr(),
        "GET /metrics HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(none.status, 404);
    let resp = raw_request(edge.local_addr(), &ask(METRICS_KEY), b"")
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let text = String::from_utf8(resp.body).unwrap();
    assert!(
        text.contains("tabbify_edge_refused_total{reason=\"metrics_unauthorized\"} 3\n"),
        "{text}"
    );
    assert!(text.contains("tabbify_edge_refused_total{reason=\"metrics_public\"} 0\n"));
}
