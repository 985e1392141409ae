//! The proxy against local apps on loopback: streaming with checksums, path and query
//! forwarding, forwarding headers, hop-by-hop stripping both ways, WebSocket, SSE, limits and
//! the error statuses. The mesh end-to-end tests reuse the same `testkit` helpers.
#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a test failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use tabbify_edge::testkit::{
    body_sha256, client, pattern_sha256, raw_request, refused_addr, start_edge, PatternBody,
    TestApp, TEST_KEY,
};
use tabbify_edge::{Limits, Upstream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const APP: &str = "5b6d0f2e-4c1a-4e8b-9f3d-2a7c6e1b0d94";

fn app() -> Uuid {
    Uuid::parse_str(APP).unwrap()
}

fn bearer() -> String {
    format!("Bearer {TEST_KEY}")
}

async fn edge_for(app_addr: std::net::SocketAddr) -> tabbify_edge::RunningEdge {
    start_edge(Upstream::Fixed(app_addr), None, Limits::default())
        .await
        .unwrap()
}

async fn get_json(
    edge: std::net::SocketAddr,
    path: &str,
    key: bool,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().uri(format!("http://{edge}{path}"));
    if key {
        req = req.header("authorization", bearer());
    }
    let resp = client()
        .request(req.body(Either::Right(Full::new(Bytes::new()))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_get_and_post_keep_their_checksums() {
    let upstream = TestApp::start_local("a").await.unwrap();
    let edge = edge_for(upstream.addr()).await;
    let c = client();
    for len in [0u64, 1, 65_537, 9 * 1024 * 1024 + 7] {
        let req = Request::get(format!(
            "http://{}/app/{APP}/bytes/{len}",
            edge.local_addr()
        ))
        .header("authorization", bearer())
        .body(Either::Right(Full::new(Bytes::new())))
        .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let (n, sha) = body_sha256(resp.into_body()).await.unwrap();
        assert_eq!((n, sha), (len, pattern_sha256(len)), "GET {len}");

        let req = Request::post(format!("http://{}/app/{APP}/sha256", edge.local_addr()))
            .header("authorization", bearer())
            .body(Either::Left(PatternBody::new(len)))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["bytes"], len, "POST {len}");
        assert_eq!(v["sha256"], pattern_sha256(len), "POST {len}");
    }
}

/// A few hundred MB each way through one process (client, edge and app): if any hop
/// collected a body, resident memory would grow by about the body size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_with_flat_memory() {
    const LEN: u64 = 384 * 1024 * 1024;
    let upstream = TestApp::start_local("a").await.unwrap();
    let edge = edge_for(upstream.addr()).await;
    let c = client();
    // Warm up allocator and pools so the baseline includes steady-state buffers.
    let warm = Request::get(format!(
        "http://{}/app/{APP}/bytes/{}",
        edge.local_addr(),
        8 << 20
    ))
    .header("authorization", bearer())
    .body(Either::Right(Full::new(Bytes::new())))
    .unwrap();
    body_sha256(c.request(warm).await.unwrap().into_body())
        .await
        .unwrap();
    let before = tabbify_edge::testkit::rss_bytes().expect("/proc/self/status readable");

    let req = Request::get(format!(
        "http://{}/app/{APP}/bytes/{LEN}",
        edge.local_addr()
    ))
    .header("authorization", bearer())
    .body(Either::Right(Full::new(Bytes::new())))
    .unwrap();
    let (n, sha) = body_sha256(c.request(req).await.unwrap().into_body())
        .await
        .unwrap();
    assert_eq!((n, sha), (LEN, pattern_sha256(LEN)));

    let req = Request::put(format!("http://{}/app/{APP}/sha256", edge.local_addr()))
        .header("authorization", bearer())
        .body(Either::Left(PatternBody::new(LEN)))
        .unwrap();
    let body = c
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["bytes"], LEN);

    let after = tabbify_edge::testkit::rss_bytes().unwrap();
    let growth = after.saturating_sub(before);
    assert!(
        growth < 48 * 1024 * 1024,
        "RSS grew by {} MiB while streaming {} MiB each way",
        growth >> 20,
        LEN >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_query_method_and_forwarding_headers_reach_the_app() {
    let upstream = TestApp::start_local("a").await.unwrap();
    let edge = edge_for(upstream.addr()).await;
    let addr = edge.local_addr();

    let (status, v) = get_json(addr, &format!("/app/{APP}/echo/a%20b/c?x=1&y=two"), true).await;
    assert_eq!(status, 200);
    assert_eq!(v["path"], "/echo/a%20b/c?x=1&y=two");
    assert_eq!(v["headers"]["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(v["headers"]["x-forwarded-proto"][0], "http");
    assert_eq!(v["headers"]["x-forwarded-host"][0], addr.to_string());
    assert_eq!(v["headers"]["host"][0], upstream.addr().to_string());
    assert!(
        v["headers"]["authorization"].is_null(),
        "the edge key must not reach apps"
    );

    let (_, v) = get_json(addr, &format!("/app/{APP}"), true).await;
    assert_eq!(v["path"], "/");
    let (_, v) = get_json(addr, &format!("/app/{APP}?q=1"), true).await;
    assert_eq!(v["path"], "/?q=1");
    let (_, v) = get_json(addr, &format!("/app/{}/", app().simple()), true).await;
    assert_eq!(v["path"], "/");

    for method in [Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS] {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{addr}/app/{APP}/m"))
            .header("authorization", bearer())
            .body(Either::Right(Full::new(Bytes::from_static(b"12345"))))
            .unwrap();
        let body = client()
            .request(req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["method"], method.as_str());
        assert_eq!(v["body_bytes"], 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_guards_app_and_v1_but_not_the_open_endpoints() {
    let upstream = TestApp::start_local("a").await.unwrap();
    let edge = edge_for(upstream.addr()).await;
    let addr = edge.local_addr();

    let (s, v) = get_json(addr, &format!("/app/{APP}/echo"), false).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (s, _) = get_json(addr, "/v1/routes", false).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = get_json(addr, "/app/not-a-uuid/x", false).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "auth is checked before the id");

    let wrong = raw_request(
        addr,
        &format!("GET /app/{APP}/echo HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {TEST_KEY}x\r\nConnection: close\r\n\r\n"),
        b"",
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.header("www-authenticate"), vec!["Bearer"]);

    let (s, v) = get_json(addr, "/v1/routes", true).await;
    assert_eq!(s, 200);
    assert_eq!(v["routes"], serde_json::json!([]));
    let (s, _) = get_json(addr, "/v1/nothing", true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v) = get_json(addr, "/health", false).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, v) = get_json(addr, "/openapi.json", false).await;
    assert_eq!(s, 200);
    assert_eq!(v["openapi"], "3.0.3");
    let ui = raw_request(
        addr,
        "GET /swagger-ui HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(ui.status, 200);
    assert!(String::from_utf8_lossy(&ui.body).contains("/swagger-ui/swagger-ui-bundle.js"));
    let js = raw_request(
        addr,
        "GET /swagger-ui/swagger-ui-bundle.js HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(js.status, 200);
    assert!(js.body.len() > 100_000);
    let metrics = raw_request(
        edge.metrics_addr().unwrap(),
        "GET /metrics HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        b"",
    )
    .await
    .unwrap();
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains("tabbify_edge_requests_total{route=\"app\",code=\"4xx\"} 3\n"),
        "{text}"
    );
    let (s, _) = get_json(addr, "/nowhere", false).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ids_unreachable_and_silent_apps_get_json_errors() {
    let hanging = TestApp::start_local("slow").await.unwrap();
    let refused = refused_addr().await.unwrap();
    let slow_app = Uuid::from_u128(7);
    let gone_app = Uuid::from_u128(8);
    let table = HashMap::from([(slow_app, hanging.addr()), (gone_app, refused)]);
    let limits = Limits {
        upstream_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let edge = start_edge(Upstream::Table(Arc::new(table)), None, limits)
        .await
        .unwrap();
    let addr = edge.local_addr();

    for bad in [
        "/app/zzz",
        "/app/5b6d0f2e-4c1a-4e8b-9f3d-2a7c6e1b0d9",
        "/app/%35b6d0f2e-4c1a-4e8b-9f3d-2a7c6e1b0d94/x",
        "/app/",
    ] {
        let (s, v) = get_json(addr, bad, true).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_app_id")),
            "{bad}"
        );
    }
    let cases = [
        (
            format!("/app/{gone_app}/x"),
            StatusCode::BAD_GATEWAY,
            "app_unreachable",
        ),
        (
            format!("/app/{}/x", Uuid::from_u128(9)),
            StatusCode::BAD_GATEWAY,
            "app_unreachable",
        ),
        (
            format!("/app/{slow_app}/hang"),
            StatusCode::GATEWAY_TIMEOUT,
            "app_timeout",
        ),
    ];
    for (path, status, code) in cases {
        let raw = raw_request(
            addr,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: e\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
                bearer()
            ),
            b"",
        )
        .await
        .unwrap();
        assert_eq!(raw.status, status.as_u16(), "{path}");
        assert_eq!(raw.header("content-type"), vec!["application/json"]);
        let text = String::from_utf8(raw.body).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], code);
        assert!(
            !text.contains("127.0.0.1") && !text.contains(&refused.port().to_string()),
            "{text}"
        );
    }
    let metrics = edge.metrics().render();
    assert!(
        metrics.contains("tabbify_edge_upstream_errors_total{kind=\"app_timeout\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tabbify_edge_upstream_errors_total{kind=\"app_unreachable\"} 2\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let upstream = TestApp::start_local("a").await.unwrap();
    let edge = edge_for(upstream.addr()).await;
    let addr = edge.local_addr();

    let head = format!(
        "POST /app/{APP}/echo HTTP/1.1\r\nHost: site.test\r\nAuthorization: {}\r\n\
         Connection: close, X-Client-Secret\r\nX-Client-Secret: s\r\nKeep-Alive: timeout=9\r\n\
         TE: trailers\r\nTrailer: X-Sum\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         Upgrade: h2c\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 203.0.113.9\r\n\
         X-End-To-End: kept\r\nTransfer-Encoding: chunked\r\n\r\n",
        bearer()
    );
    let resp = raw_request(addr, &head, b"5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let h = v["headers"].as_object().unwrap();
    for gone in [
        "x-client-secret",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
        "proxy-connection",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the app: {h:?}");
    }
    assert_eq!(h["x-end-to-end"][0], "kept");
    assert_eq!(h["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(h["x-forwarded-host"][0], "site.test");
    assert_eq!(v["body_bytes"], 5, "chunked body still arrives");

    let resp = raw_request(
        addr,
        &format!("GET /app/{APP}/hop-response HTTP/1.1\r\nHost: e\r\nAuthorization: {}\r\nConnection: close\r\n\r\n", bearer()),
        b"",
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"hop");
    assert_eq!(resp.header("x-app-visible"), vec!["yes"]);
    for gone in [
        "x-app-secret",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "upgrade",
    ] {
        assert!(
            resp.header(gone).is_empty(),
            "{gone} reached the client: {:?}",
            resp.headers
        );
    }
    assert!(resp
        .header("connection")
        .iter()
        .all(|v| v.eq_ignore_ascii_case("close")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_spliced_to_the_app() {
    let upstream = TestApp::start_local("a").await.unwrap();
    let edge = edge_for(upstream.addr()).await;
    let mut req = format!("ws://{}/app/{APP}/ws", edge.local_addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", bearer().parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..20 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    let big = vec![0xa5u8; 300_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    ws.close(None).await.unwrap();

    let mut unauth = format!("ws://{}/app/{APP}/ws", edge.local_addr())
        .into_client_request()
        .unwrap();
    unauth.headers_mut().insert(
        "authorization",
        "Bearer nope-nope-nope-nope".parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(unauth).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    assert!(edge
        .metrics()
        .render()
        .contains("tabbify_edge_upgrades_total 1\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_before_the_app_closes() {
    let upstream = TestApp::start_local("a").await.unwrap();
    let edge = edge_for(upstream.addr()).await;
    let req = Request::get(format!("http://{}/app/{APP}/sse?n=3", edge.local_addr()))
        .header("authorization", bearer())
        .header("accept", "text/event-stream")
        .body(Either::Right(Full::new(Bytes::new())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut seen = String::new();
    // The app holds the stream open after three events until released: they can only be
    // read here if the edge forwarded them without waiting for the end.
    let guard = tokio::time::timeout(Duration::from_secs(20), async {
        while !seen.contains("data: event 2\n\n") {
            let frame = body.frame().await.expect("stream ended early").unwrap();
            seen.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
        }
    })
    .await;
    assert!(
        guard.is_ok(),
        "events were held back by the edge: got {seen:?}"
    );
    assert!(!seen.contains("event: end"));
    upstream.release_sse();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("event: end"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_refused() {
    let upstream = TestApp::start_local("a").await.unwrap();
    let edge = edge_for(upstream.addr()).await;
    let big = "x".repeat(40 * 1024);
    let resp = raw_request(
        edge.local_addr(),
        &format!("GET /health HTTP/1.1\r\nHost: e\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"),
        b"",
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 431);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let resp = raw_request(
        edge.local_addr(),
        &format!("GET /health HTTP/1.1\r\nHost: e\r\n{many}Connection: close\r\n\r\n"),
        b"",
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_are_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = TestApp::start_local("a").await.unwrap();
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let edge = start_edge(Upstream::Fixed(upstream.addr()), None, limits)
        .await
        .unwrap();
    // Idle after one keep-alive request.
    let mut s = tokio::net::TcpStream::connect(edge.local_addr())
        .await
        .unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: e\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection was kept open"
    );
    // A request head that never completes.
    let mut s = tokio::net::TcpStream::connect(edge.local_addr())
        .await
        .unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: e\r\nX-Slow: ")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "slow request head was kept open");
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodyless_requests_strip_hop_by_hop_and_replace_forwarding_headers() {
    let upstream = TestApp::start_local("a").await.unwrap();
    let edge = edge_for(upstream.addr()).await;
    let addr = edge.local_addr();

    let head = format!(
        "GET /app/{APP}/echo?x=1 HTTP/1.1\r\nHost: site.test\r\nAuthorization: {}\r\n\
         Connection: close, X-Client-Secret\r\nX-Client-Secret: s\r\nKeep-Alive: timeout=9\r\n\
         TE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nUpgrade: h2c\r\n\
         Proxy-Connection: keep-alive\r\nX-Forwarded-For: 203.0.113.9\r\n\
         X-Forwarded-Proto: https\r\nX-Forwarded-Host: spoof\r\nX-End-To-End: kept\r\n\
         X-End-To-End: twice\r\n\r\n",
        bearer()
    );
    let resp = raw_request(addr, &head, b"").await.unwrap();
    assert_eq!(resp.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/echo?x=1");
    let h = v["headers"].as_object().unwrap();
    for gone in [
        "x-client-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "upgrade",
        "proxy-connection",
        "authorization",
        "connection",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the app: {h:?}");
    }
    assert_eq!(h["x-end-to-end"], serde_json::json!(["kept", "twice"]));
    assert_eq!(h["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(h["x-forwarded-host"], serde_json::json!(["site.test"]));
    assert_eq!(h["host"], serde_json::json!([upstream.addr().to_string()]));
}

/// A hand-written app on loopback: `/chunked` answers chunked, `/close` without a length
/// (read until close), `/once` with a length and then closes the connection without saying
/// so (as an app whose keep-alive timer fired would). Counts accepted connections.
async fn raw_app() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let reply: &[u8] = match path.as_str() {
                        "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                        "/close" => b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil close",
                        "/once" => b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nonce",
                        _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
                    };
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                    if path == "/close" || path == "/once" {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_are_reused_and_stale_ones_retried() {
    use std::sync::atomic::Ordering::SeqCst;
    let (app_addr, accepted) = raw_app().await;
    let edge = edge_for(app_addr).await;
    let addr = edge.local_addr();
    let get = |path: &str| {
        format!(
            "GET /app/{APP}{path} HTTP/1.1\r\nHost: e\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            bearer()
        )
    };

    for _ in 0..3 {
        let resp = raw_request(addr, &get("/chunked"), b"").await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"hello world");
    }
    assert_eq!(
        accepted.load(SeqCst),
        1,
        "one keep-alive connection serves all"
    );

    let resp = raw_request(addr, &get("/close"), b"").await.unwrap();
    assert_eq!((resp.status, &resp.body[..]), (200, &b"until close"[..]));

    // `/once` leaves a pooled connection the app then closes; the next request must not fail.
    for _ in 0..3 {
        let resp = raw_request(addr, &get("/once"), b"").await.unwrap();
        assert_eq!((resp.status, &resp.body[..]), (200, &b"once"[..]));
        let resp = raw_request(addr, &get("/chunked"), b"").await.unwrap();
        assert_eq!((resp.status, &resp.body[..]), (200, &b"hello world"[..]));
    }
    let metrics = edge.metrics().render();
    assert!(
        metrics.contains("tabbify_edge_requests_total{route=\"app\",code=\"2xx\"} 10\n"),
        "{metrics}"
    );
}
