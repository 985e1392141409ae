//! `tabbify-mesh join`: a node of the live mesh. The coordinator's roster becomes the data
//! plane's table.
//!
//! * [`logic`] — the decisions, sans IO: the roster and the peers it implies, the session
//!   with the coordinator as one enum, and the state machine that takes every input with
//!   `now` and returns the actions to apply. Unit-tested rule by rule.
//! * [`shell`] — the I/O shell (tokio, one thread): bring-up, then feeds the machine and
//!   applies its actions to the table, routes, handshaker and coordinator client.
//! * [`client`] (HTTPS/SSE to the coordinator), [`control`] (the local socket for
//!   `status`/`peers`/`app`), [`state_dir`] (node key, hosted apps).
//!
//! Invariants:
//! * the table changes only by applying the machine's actions, and the machine touches
//!   only peers that changed, so a roster event never resets another peer's session;
//! * a coordinator outage never touches the table: established tunnels keep working, and
//!   the machine re-registers with backoff (0.5 s doubling to the heartbeat interval);
//! * the node key never leaves the state directory; only its public half is sent.

pub mod client;
pub mod control;
pub mod logic;
pub mod shell;
pub mod state_dir;

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::driver::DriverKind;

pub use shell::run;

/// The TLS files of the joiner's identity.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The mesh CA (PEM).
    pub ca: PathBuf,
}

/// Everything `join` is told.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// Display name asked for.
    pub name: String,
    /// Tags asked for.
    pub tags: Vec<String>,
    /// Coordinator URL.
    pub coordinator: String,
    /// mTLS files; `None` = plaintext (`--insecure-no-mtls`).
    pub tls: Option<TlsFiles>,
    /// Join token.
    pub join_token: Option<String>,
    /// TUN name.
    pub interface: String,
    /// UDP listen port.
    pub listen_port: u16,
    /// TUN MTU.
    pub mtu: u32,
    /// State directory.
    pub state_dir: PathBuf,
    /// Engine options.
    pub threads: usize,
    /// Forced driver.
    pub driver: Option<DriverKind>,
    /// Offloads on.
    pub offloads: bool,
    /// Pin workers to cores.
    pub pin: bool,
    /// Endpoints to report (empty = every non-loopback address + the listen port).
    pub endpoints: Vec<SocketAddr>,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Rotate the node key once it is this old (`--key-max-age`, default 90 days).
    pub key_max_age: std::time::Duration,
}
