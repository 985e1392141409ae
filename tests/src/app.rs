//! An app runner stand-in as its own process: `tabbify-testapp` (this package's binary,
//! serving `tabbify_edge::testkit::TestApp`) bound to `[app_ula]:8730` inside the namespace
//! of the supervisor that hosts the app.
//!
//! Invariant: [`AppProcess::start`] returns once the app accepts connections; the process is
//! killed by its own PID when the handle drops.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::process::Process;

/// The port every app runner listens on, on its app ULA.
pub const APP_PORT: u16 = 8730;

/// A running test app.
pub struct AppProcess {
    process: Process,
    addr: SocketAddr,
}

impl AppProcess {
    /// Starts `binary ADDR NAME` (the `tabbify-testapp` binary) in `netns`.
    pub fn start(netns: &Netns, binary: &Path, addr: SocketAddr, name: &str) -> Result<AppProcess> {
        let mut command = netns.command(binary);
        command.arg(addr.to_string()).arg(name);
        let mut process = Process::spawn(netns.clone(), &format!("app-{name}"), command)?;
        process
            .wait_for_log(&format!("listening {addr}"), Duration::from_secs(20))
            .with_context(|| format!("starting the test app on {addr}"))?;
        Ok(AppProcess { process, addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Lets every `/sse` stream the app holds open send its `end` event and close
    /// (SIGUSR1 to the app process).
    pub fn release_sse(&mut self) -> Result<()> {
        self.process.signal(libc::SIGUSR1)
    }

    /// The app's log so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }
}
