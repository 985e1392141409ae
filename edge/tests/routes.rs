//! Hostname routes: longest prefix wins, open without the key, reloaded on change without
//! dropping connections, and a bad file keeps the old table.
#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a test failure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tabbify_edge::testkit::{raw_request, start_edge, TestApp, TEST_KEY};
use tabbify_edge::{Limits, Upstream};
use uuid::Uuid;

fn ids() -> [Uuid; 3] {
    [
        Uuid::from_u128(0xa),
        Uuid::from_u128(0xb),
        Uuid::from_u128(0xc),
    ]
}

/// The `name` the app behind `host` + `path` reports, or the status if it is not a 200.
async fn served_by(edge: SocketAddr, host: &str, path: &str) -> Result<String, u16> {
    let resp = raw_request(
        edge,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        b"",
    )
    .await
    .unwrap();
    if resp.status != 200 {
        return Err(resp.status);
    }
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    Ok(format!(
        "{}:{}",
        v["name"].as_str().unwrap(),
        v["path"].as_str().unwrap()
    ))
}

/// Writes the routes file by rename, as an operator's tooling should.
fn write_routes(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostname_routes_reload_without_dropping_connections() {
    let [a, b, c] = ids();
    let app_a = TestApp::start_local("A").await.unwrap();
    let app_b = TestApp::start_local("B").await.unwrap();
    let app_c = TestApp::start_local("C").await.unwrap();
    let table = HashMap::from([(a, app_a.addr()), (b, app_b.addr()), (c, app_c.addr())]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes");
    write_routes(&file, &format!("site.test {a}\nsite.test /api {c}\n"));
    let limits = Limits {
        routes_poll: Duration::from_millis(20),
        ..Limits::default()
    };
    let edge = start_edge(Upstream::Table(Arc::new(table)), Some(file.clone()), limits)
        .await
        .unwrap();
    let addr = edge.local_addr();

    // Open without the key, full path forwarded, longest prefix wins, port and case ignored.
    assert_eq!(
        served_by(addr, "site.test", "/x?y=1").await,
        Ok("A:/x?y=1".into())
    );
    assert_eq!(
        served_by(addr, "SITE.test:8090", "/api/v1").await,
        Ok("C:/api/v1".into())
    );
    assert_eq!(
        served_by(addr, "site.test", "/apiary").await,
        Ok("A:/apiary".into())
    );
    // Unlisted hosts fall through to the built-in paths.
    assert_eq!(served_by(addr, "other.test", "/x").await, Err(404));
    let health = raw_request(
        addr,
        "GET /health HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(health.status, 200);

    // A keep-alive connection opened before the reload.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    let ask = |host: &'static str| {
        Request::get("/kept")
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let first = sender.send_request(ask("site.test")).await.unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&first.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["name"], "A");

    write_routes(&file, &format!("# moved\nsite.test {b}\nnew.test /n {a}\n"));
    eventually("reload to B", || async {
        served_by(addr, "site.test", "/").await == Ok("B:/".into())
    })
    .await;
    assert_eq!(
        served_by(addr, "site.test", "/api/v1").await,
        Ok("B:/api/v1".into())
    );
    assert_eq!(
        served_by(addr, "new.test", "/n/1").await,
        Ok("A:/n/1".into())
    );

    // The old connection still works and sees the new table.
    let second = sender.send_request(ask("site.test")).await.unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&second.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["name"], "B");

    // A bad file is rejected and the table stays.
    write_routes(
        &file,
        &format!("site.test {c}\nbroken.test /p not-a-uuid\n"),
    );
    let metrics = edge.metrics();
    eventually("rejected reload counted", || {
        let m = metrics.clone();
        async move {
            m.render()
                .contains("tabbify_edge_routes_reloads_total{result=\"rejected\"} 1\n")
        }
    })
    .await;
    assert_eq!(served_by(addr, "site.test", "/").await, Ok("B:/".into()));

    // The /v1/routes view shows the table in force.
    let listed = raw_request(
        addr,
        &format!("GET /v1/routes HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {TEST_KEY}\r\nConnection: close\r\n\r\n"),
        b"",
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&listed.body).unwrap();
    assert_eq!(
        v["routes"],
        serde_json::json!([
            {"host": "new.test", "prefix": "/n", "app": a.to_string()},
            {"host": "site.test", "prefix": "/", "app": b.to_string()},
        ])
    );
    drop(sender);
    let _ = conn_task.await;
}

#[tokio::test]
async fn an_invalid_routes_file_stops_start_up_with_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes");
    std::fs::write(&file, "ok.test 00000000-0000-0000-0000-000000000001\nbad.test:80 00000000-0000-0000-0000-000000000002\n").unwrap();
    let err = start_edge(Upstream::AppUla, Some(file), Limits::default())
        .await
        .err()
        .expect("start-up must fail");
    let text = format!("{err:#}");
    assert!(text.contains("line 2, field host"), "{text}");
}
