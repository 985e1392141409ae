//! The edge (`tabbify-node`) reaching an app through a real mesh, in namespaces this test
//! makes and removes.
//!
//! ```text
//!  LAN namespace: coordinator (mTLS)
//!   ├── edge namespace: tabbify-mesh join (node-01, tag node) + tabbify-node on :8090
//!   │                   + the test client (127.0.0.1:8090)
//!   └── supervisor namespace: tabbify-mesh join (supervisor-01, tag supervisor),
//!                             `app add APP`, tabbify-testapp on [app_ula]:8730
//! ```
//!
//! The policy lets nodes open supervisors on TCP 8730 only, as in production. Through the
//! edge, from the edge's namespace: forwarding headers; a 64 MiB streamed GET and POST with
//! SHA-256 on both ends; 400 (malformed uuid), 401 (no key, wrong key), 502 (an app ULA
//! nobody hosts: no route), 504 (`/hang` with `--upstream-timeout 2s`); hop-by-hop headers
//! stripped both ways; a WebSocket echo; server-sent events delivered while the app still
//! holds the stream open. And the port rule itself: ping and TCP to another port of the
//! app ULA get no answer (the filter drops them; an unfiltered SYN would be refused).
//!
//! The clients are the edge crate's `testkit` helpers run inside the edge's namespace on a
//! thread that entered it ([`tabbify_tests::inside`]): they speak WebSocket, stream and hash
//! bodies on the fly, and read event streams frame by frame, which `curl` cannot all do.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use serde_json::{json, Value};
use tabbify_api::ula;
use tabbify_edge::testkit::{body_sha256, client, pattern_sha256, raw_request, PatternBody};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::ping;
use tabbify_tests::{AppProcess, EdgeNode, JoinSpec, Testbed};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// The app the supervisor hosts.
const APP: &str = "9b1c2d3e-4f50-4a6b-8c7d-8e9f0a1b2c3d";
/// An app nobody hosts.
const NOBODY: &str = "0e4c2b6a-8d1f-4a3e-b5c7-9f2d1e0a3b4c";
/// The edge's bearer key.
const KEY: &str = "edge-mesh-test-key-0123456789";
/// Body size of the streamed GET and POST.
const BIG: u64 = 64 << 20;
/// Deadline for one request (the big ones included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for rosters to settle (liveness only).
const SETTLE: Duration = Duration::from_secs(30);

fn testapp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tabbify-testapp"))
}

fn bearer() -> String {
    format!("Bearer {KEY}")
}

type ClientBody = Either<PatternBody, Full<Bytes>>;

fn empty() -> ClientBody {
    Either::Right(Full::new(Bytes::new()))
}

/// Sends `request` with a deadline; returns status, headers and the body as JSON (Null
/// when it is not JSON).
async fn exchange(request: Request<ClientBody>) -> Result<(StatusCode, http::HeaderMap, Value)> {
    let what = format!("{} {}", request.method(), request.uri());
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let response = client().request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        anyhow::Ok((
            parts.status,
            parts.headers,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        ))
    })
    .await
    .with_context(|| format!("{what}: no answer within {REQUEST_TIMEOUT:?}"))?
    .with_context(|| what.clone())
}

/// A raw request with the key and `Connection: close`; returns the parsed response.
async fn raw(
    edge: SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
    body: &[u8],
) -> Result<tabbify_edge::testkit::RawResponse> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: edge.test\r\nAuthorization: {}\r\n{extra}Connection: close\r\n\r\n",
        bearer()
    );
    tokio::time::timeout(REQUEST_TIMEOUT, raw_request(edge, &head, body))
        .await
        .with_context(|| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
}

/// An error answer: the status, JSON `{"error": code}`, and nothing internal in the body.
async fn expect_error(edge: SocketAddr, path: &str, status: u16, code: &str) -> Result<()> {
    let response = raw(edge, "GET", path, "", b"").await?;
    let text = String::from_utf8_lossy(&response.body).into_owned();
    ensure!(
        response.status == status,
        "{path}: {} {text}",
        response.status
    );
    ensure!(
        response.header("content-type") == ["application/json"],
        "{path}: content-type {:?}",
        response.header("content-type")
    );
    let body: Value = serde_json::from_str(&text).with_context(|| format!("{path}: {text}"))?;
    ensure!(body["error"] == code, "{path}: {text}");
    ensure!(
        !text.contains("fd5a") && !text.contains("8730"),
        "{path}: the error leaks an address: {text}"
    );
    Ok(())
}

async fn forwarding_and_streams(edge: SocketAddr) -> Result<()> {
    // Forwarding: path and query, X-Forwarded-*, the edge's key not passed on.
    let request = Request::get(format!("http://{edge}/app/{APP}/echo/a?x=1"))
        .header("authorization", bearer())
        .body(empty())?;
    let (status, _, body) = exchange(request).await?;
    ensure!(status == 200, "echo: {status} {body}");
    ensure!(
        body["name"] == "app-01" && body["path"] == "/echo/a?x=1",
        "{body}"
    );
    let headers = &body["headers"];
    ensure!(
        headers["x-forwarded-for"] == json!(["127.0.0.1"]),
        "{headers}"
    );
    ensure!(headers["x-forwarded-proto"] == json!(["http"]), "{headers}");
    ensure!(
        headers["x-forwarded-host"] == json!([edge.to_string()]),
        "{headers}"
    );
    ensure!(
        headers.get("authorization").is_none(),
        "the key reached the app: {headers}"
    );

    // 64 MiB down, streamed and hashed as it arrives.
    let request = Request::get(format!("http://{edge}/app/{APP}/bytes/{BIG}"))
        .header("authorization", bearer())
        .body(empty())?;
    let (got, sha) = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let response = client().request(request).await?;
        ensure!(response.status() == 200, "GET bytes: {}", response.status());
        body_sha256(response.into_body()).await
    })
    .await
    .context("GET 64 MiB timed out")??;
    ensure!(
        (got, sha.as_str()) == (BIG, pattern_sha256(BIG).as_str()),
        "GET {BIG} bytes arrived as {got} bytes sha256 {sha}"
    );

    // 64 MiB up, generated as it is sent; the app hashes what it receives.
    let request = Request::post(format!("http://{edge}/app/{APP}/sha256"))
        .header("authorization", bearer())
        .body(Either::Left(PatternBody::new(BIG)))?;
    let (status, _, body) = exchange(request).await?;
    ensure!(status == 200, "POST: {status} {body}");
    ensure!(
        body["bytes"] == BIG && body["sha256"] == pattern_sha256(BIG),
        "POST {BIG} bytes: the app received {body}"
    );
    Ok(())
}

async fn errors(edge: SocketAddr) -> Result<()> {
    expect_error(edge, "/app/not-a-uuid/x", 400, "bad_app_id").await?;
    expect_error(edge, &format!("/app/{NOBODY}/x"), 502, "app_unreachable").await?;
    expect_error(edge, &format!("/app/{APP}/hang"), 504, "app_timeout").await?;
    for key in [None, Some("Bearer wrong-key-wrong-key-000")] {
        let mut request = Request::get(format!("http://{edge}/app/{APP}/echo"));
        if let Some(key) = key {
            request = request.header("authorization", key);
        }
        let (status, headers, body) = exchange(request.body(empty())?).await?;
        ensure!(
            status == 401 && body["error"] == "unauthorized",
            "key {key:?}: {status} {body}"
        );
        ensure!(headers["www-authenticate"] == "Bearer", "{headers:?}");
    }
    Ok(())
}

async fn hop_by_hop(edge: SocketAddr) -> Result<()> {
    let extra = "Connection: X-Client-Secret\r\nX-Client-Secret: s\r\nKeep-Alive: timeout=9\r\n\
                 TE: trailers\r\nTrailer: X-Sum\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
                 Upgrade: h2c\r\nX-End-To-End: kept\r\nTransfer-Encoding: chunked\r\n";
    let response = raw(
        edge,
        "POST",
        &format!("/app/{APP}/echo"),
        extra,
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    .await?;
    ensure!(
        response.status == 200,
        "hop-by-hop request: {}",
        response.status
    );
    let body: Value = serde_json::from_slice(&response.body)?;
    let headers = body["headers"].as_object().context("no headers echoed")?;
    for gone in [
        "x-client-secret",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
    ] {
        ensure!(
            !headers.contains_key(gone),
            "{gone} reached the app: {headers:?}"
        );
    }
    ensure!(headers["x-end-to-end"] == json!(["kept"]), "{headers:?}");
    ensure!(body["body_bytes"] == 5, "the chunked body: {body}");

    let response = raw(edge, "GET", &format!("/app/{APP}/hop-response"), "", b"").await?;
    ensure!(
        response.status == 200 && response.body == b"hop",
        "{response:?}"
    );
    ensure!(
        response.header("x-app-visible") == ["yes"],
        "{:?}",
        response.headers
    );
    for gone in [
        "x-app-secret",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "upgrade",
    ] {
        ensure!(
            response.header(gone).is_empty(),
            "{gone} reached the client: {:?}",
            response.headers
        );
    }
    Ok(())
}

async fn websocket(edge: SocketAddr) -> Result<()> {
    let mut request = format!("ws://{edge}/app/{APP}/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", bearer().parse()?);
    let (mut ws, response) =
        tokio::time::timeout(REQUEST_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .context("WebSocket upgrade timed out")??;
    ensure!(
        response.status() == StatusCode::SWITCHING_PROTOCOLS,
        "{response:?}"
    );
    let messages = [
        Message::text("hello through the mesh"),
        Message::binary(vec![0x5au8; 200_000]),
        Message::text("bye"),
    ];
    for message in messages {
        ws.send(message.clone()).await?;
        let echoed = tokio::time::timeout(REQUEST_TIMEOUT, ws.next())
            .await
            .context("no WebSocket echo")?
            .context("WebSocket closed")??;
        ensure!(
            echoed == message,
            "WebSocket echo differs ({} bytes)",
            echoed.len()
        );
    }
    ws.close(None).await?;
    Ok(())
}

/// Reads `body` until `text` has been seen, for at most `timeout`.
async fn read_until<B>(body: &mut B, seen: &mut String, text: &str, timeout: Duration) -> Result<()>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    tokio::time::timeout(timeout, async {
        while !seen.contains(text) {
            let Some(frame) = body.frame().await else {
                bail!("the stream ended before {text:?}; got {seen:?}");
            };
            if let Ok(data) = frame?.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        Ok(())
    })
    .await
    .with_context(|| format!("{text:?} did not arrive; got {seen:?}"))?
}

#[test]
fn edge_reaches_an_app_through_the_mesh() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl])?;
    for binary in [
        tabbify_tests::bins::tabbify_mesh(),
        tabbify_tests::bins::tabbify_mesh_ca(),
        tabbify_tests::bins::tabbify_mesh_coordinator(),
        tabbify_tests::bins::tabbify_node(),
    ] {
        binary?;
    }
    let policy = json!({
        "tags": ["node", "supervisor"],
        "app_hosts": ["tag:supervisor"],
        "allow": [{"src": ["tag:node"], "dst": ["tag:supervisor:8730"]}],
    });
    let bed = Testbed::start(policy, 3)?;
    let (edge_ns, _) = bed.host()?;
    let (sup_ns, _) = bed.host()?;
    let sup = bed.join(
        &sup_ns,
        JoinSpec::new("supervisor-01", &["supervisor"], None),
    )?;
    let mut node = bed.join(&edge_ns, JoinSpec::new("node-01", &["node"], None))?;

    let app: Uuid = APP.parse()?;
    let app_ula = sup.app_add(&app)?;
    ensure!(app_ula == ula::app_ula(&app), "`app add` printed {app_ula}");
    let app_addr = SocketAddr::new(app_ula.into(), tabbify_tests::app::APP_PORT);
    let mut app_process = AppProcess::start(&sup_ns, testapp(), app_addr, "app-01")?;
    let port_8730 = tabbify_tests::status::PortRange {
        first: 8730,
        last: 8730,
    };
    node.wait_peer(
        "supervisor-01",
        "to advertise the app, TCP 8730 open",
        SETTLE,
        |peer| peer.app_ulas.contains(&app_ula) && peer.ports.outbound == [port_8730],
    )?;
    let edge = EdgeNode::start(
        &edge_ns,
        "0.0.0.0:8090".parse()?,
        KEY,
        &["--upstream-timeout", "2s", "--connect-timeout", "5s"],
    )?;
    let edge_addr: SocketAddr = "127.0.0.1:8090".parse()?;

    tabbify_tests::inside::block_on(&edge_ns, || async move {
        forwarding_and_streams(edge_addr)
            .await
            .context("forwarding and streams")?;
        errors(edge_addr).await.context("error statuses")?;
        hop_by_hop(edge_addr).await.context("hop-by-hop headers")?;
        websocket(edge_addr).await.context("WebSocket echo")
    })?;

    // Server-sent events: three events come through while the app holds the stream open;
    // the end comes only after the app is told to release it.
    let app_ref = &mut app_process;
    tabbify_tests::inside::block_on(&edge_ns, move || async move {
        let request = Request::get(format!("http://{edge_addr}/app/{APP}/sse?n=3"))
            .header("authorization", bearer())
            .header("accept", "text/event-stream")
            .body(empty())?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, client().request(request))
            .await
            .context("SSE request timed out")??;
        ensure!(response.status() == 200, "SSE: {}", response.status());
        ensure!(
            response.headers()["content-type"] == "text/event-stream",
            "{:?}",
            response.headers()
        );
        let mut body = response.into_body();
        let mut seen = String::new();
        read_until(
            &mut body,
            &mut seen,
            "data: event 2\n\n",
            Duration::from_secs(20),
        )
        .await?;
        ensure!(
            !seen.contains("event: end"),
            "the stream ended early: {seen:?}"
        );
        app_ref.release_sse()?;
        read_until(
            &mut body,
            &mut seen,
            "event: end\ndata: bye\n\n",
            Duration::from_secs(20),
        )
        .await?;
        ensure!(
            body.frame().await.is_none(),
            "the stream stays open after the app closed it"
        );
        Ok(())
    })
    .context("server-sent events")?;

    // The port rule is enforced: 8730 only, so no ICMP, and a SYN to another port is dropped
    // (a connection attempt times out; without the filter the app host would refuse it).
    let stats = ping(&edge_ns, IpAddr::V6(app_ula), 3, "0.2")?;
    ensure!(
        stats.received == 0,
        "ping to the app ULA answered: {stats:?}"
    );
    let other_port = SocketAddr::new(app_ula.into(), 8731);
    tabbify_tests::inside::block_on(&edge_ns, || async move {
        match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(other_port),
        )
        .await
        {
            Err(_) => Ok(()),
            Ok(Ok(_)) => bail!("connected to {other_port} despite the port rule"),
            Ok(Err(error)) => bail!("{other_port}: {error}: the SYN was answered, not dropped"),
        }
    })?;

    let access = edge.logs();
    ensure!(
        access.contains(&format!("/app/{APP}/bytes/{BIG}")),
        "no access log line for the big GET:\n{access}"
    );
    node.stop()?;
    sup.stop()?;
    Ok(())
}
