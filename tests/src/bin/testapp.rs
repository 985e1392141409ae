//! `tabbify-testapp`: an app runner stand-in for the mesh end-to-end tests, run as its own
//! process inside a namespace so it binds `[app_ula]:8730` where the joiner put the app's
//! address.
//!
//! ```text
//! tabbify-testapp ADDR NAME    # serve tabbify_edge::testkit::TestApp on ADDR (e.g.
//!                              # [fd5a:1f02:…::1]:8730) until killed; print
//!                              # "listening <addr>" once it accepts connections
//! ```
//!
//! SIGUSR1 releases every held `/sse` stream (`TestApp::release_sse`): a test reads the first
//! events through the edge while the app still holds the stream open, then signals the
//! process to let the stream end. Routes: see `tabbify_edge::testkit::TestApp`.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use tabbify_edge::testkit::TestApp;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: tabbify-testapp ADDR NAME";
    let bind: SocketAddr = args
        .next()
        .context(usage)?
        .parse()
        .context("ADDR is not an address like [::1]:8730")?;
    let name = args.next().context(usage)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let mut release = signal(SignalKind::user_defined1()).context("handling SIGUSR1")?;
        let app = TestApp::start(bind, &name).await?;
        println!("listening {}", app.addr());
        std::io::stdout().flush().context("writing stdout")?;
        while release.recv().await.is_some() {
            app.release_sse();
        }
        Ok(())
    })
}
