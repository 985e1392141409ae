//! A stand-in app runner for the edge benchmark and manual tests: the `testkit` [`TestApp`]
//! on the address given as the first argument (default `127.0.0.1:8730`), until killed.
//!
//! `GET /bytes/{n}` streams n bytes, `POST /sink` drains a body, `/echo` echoes the request;
//! see `tabbify_edge::testkit::TestApp` for the rest.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tabbify_edge::testkit::TestApp;

fn main() -> Result<()> {
    let bind: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8730".to_owned())
        .parse()
        .context("usage: edge-upstream [HOST:PORT]")?;
    let workers = std::env::var("UPSTREAM_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let app = TestApp::start(bind, "bench").await?;
        println!("listening {}", app.addr());
        std::future::pending::<()>().await;
        Ok(())
    })
}
