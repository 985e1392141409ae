//! `tabbify-mesh join`: a node of the live mesh. The coordinator's roster becomes the data
//! plane's table.
//!
//! * [`logic`] — the decisions, sans IO: the roster and the peers it implies, the session
//!   with the coordinator as one enum, and the state machine that takes every input with
//!   `now` and returns the actions to apply. Unit-tested rule by rule.
//! * [`shell`] — the I/O shell (tokio, one thread): bring-up, then feeds the machine and
//!   applies its actions to the table, routes, handshaker and coordinator client.
//! * [`relay`] — the relay sessions (TLS stream, UDP BIND from the WireGuard socket, the
//!   loopback bridge when UDP does not bind, LOOKUPs); [`logic::paths`] decides which.
//! * [`router`] — a subnet router's or exit node's host changes (forwarding, masquerade),
//!   undone on exit and after a crash; [`route_flags`] — the route flags of `join`.
//! * [`dns`] — the mesh DNS stub (names from the roster) and the host resolver settings.
//! * [`client`] (HTTPS/SSE to the coordinator), [`control`] (the local socket for
//!   `status`/`peers`/`app`), [`state_dir`] (node key, hosted apps), [`metrics`]
//!   (Prometheus text on `--metrics-bind`), [`speedtest`] (the responder on the mesh ULA
//!   and the `speedtest` command's client), [`reload`] (what SIGHUP re-reads and applies), [`traffic`] (the
//!   heartbeat's report of this member's traffic).
//!
//! Invariants:
//! * the table changes only by applying the machine's actions, and the machine touches
//!   only peers that changed, so a roster event never resets another peer's session;
//! * a coordinator outage never touches the table: established tunnels keep working, and
//!   the machine moves to the next coordinator at once, or re-registers with backoff
//!   (0.5 s doubling to the heartbeat interval) once every coordinator failed in a row;
//! * the node key never leaves the state directory; only its public half is sent.

pub mod client;
pub mod config_file;
pub mod control;
pub mod dns;
pub mod logic;
pub mod metrics;
pub mod relay;
pub mod reload;
pub mod route_flags;
pub mod router;
pub mod shell;
pub mod speedtest;
pub mod state_dir;
pub mod traffic;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

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
    /// Coordinator URLs, in the order to try them (at least one). A host name that
    /// resolves to several addresses counts as several coordinators.
    pub coordinators: Vec<String>,
    /// An ephemeral member: the coordinator drops it as soon as it goes stale, and it
    /// leaves the mesh when it stops cleanly (SIGINT/SIGTERM).
    pub ephemeral: bool,
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
    /// Extra STUN servers (`--stun HOST:PORT`), probed besides the coordinator's.
    pub stun: Vec<String>,
    /// Relays besides the coordinator's (`--relay URL`).
    pub relays: Vec<String>,
    /// Pin every peer to the relay (`--force-relay`).
    pub force_relay: bool,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Rotate the node key once it is this old (`--key-max-age`, default 90 days).
    pub key_max_age: std::time::Duration,
    /// Mesh DNS (`--dns`, `--dns-domain`).
    pub dns: dns::Options,
    /// Where to serve Prometheus metrics (`--metrics-bind`).
    pub metrics: metrics::MetricsBind,
    /// Subnet routes and exit node (`--advertise-routes`, `--advertise-exit-node`,
    /// `--exit-node`, `--accept-routes`).
    pub routes: logic::routes::Settings,
    /// Masquerade forwarded traffic (`--snat`).
    pub snat: bool,
    /// The speedtest responder's port on the mesh ULA (`--speedtest-bind`); `None` = off.
    pub speedtest: Option<u16>,
    /// The log filter (`--log-level`, `TABBIFY_LOG`), as `tracing_subscriber::EnvFilter`
    /// reads it.
    pub log_level: String,
}

/// Longest join token file read (a token is a few dozen characters).
const MAX_TOKEN_FILE: u64 = 4096;

/// The join token in `path` (`--join-token-file`): its first line, trimmed. An empty file
/// or an oversized one is refused with a message naming it; a file others can read is
/// used, with a warning (the token is a secret until spent).
pub fn read_join_token_file(path: &Path) -> anyhow::Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("--join-token-file {}", path.display()))?;
    if !meta.is_file() {
        bail!("--join-token-file {} is not a file", path.display());
    }
    if meta.len() > MAX_TOKEN_FILE {
        bail!(
            "--join-token-file {} is {} bytes; a join token is one short line",
            path.display(),
            meta.len()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--join-token-file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        bail!("--join-token-file {} is empty", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the join token file is readable by others; chmod 600 it");
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11, "the join token on argv shows in `ps`": the token can come from a file.
    #[test]
    fn join_token_file_is_read_and_bad_files_are_refused_naming_them() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("token");
        std::fs::write(&path, "  tok-123  \nignored\n").unwrap();
        assert_eq!(read_join_token_file(&path).unwrap(), "tok-123");
        std::fs::write(&path, "\n").unwrap();
        let e = format!("{:#}", read_join_token_file(&path).unwrap_err());
        assert!(e.contains("is empty") && e.contains("token"), "{e}");
        std::fs::write(&path, vec![b'x'; 5000]).unwrap();
        let e = format!("{:#}", read_join_token_file(&path).unwrap_err());
        assert!(e.contains("one short line"), "{e}");
        let missing = d.path().join("missing");
        let e = format!("{:#}", read_join_token_file(&missing).unwrap_err());
        assert!(e.contains("missing"), "{e}");
        let e = format!("{:#}", read_join_token_file(d.path()).unwrap_err());
        assert!(e.contains("not a file"), "{e}");
    }
}
