//! The running joiner's local control socket: `tabbify-mesh status|peers|app ...` talk to
//! it. A Unix stream socket (root only, mode 0600) at `/run/tabbify-mesh/<iface>.sock`;
//! one JSON request line in, one JSON answer line out, then the connection closes.
//!
//! ```text
//! → {"cmd":"status"} | {"cmd":"peers"} | {"cmd":"app_add","uuid":"…"} | {"cmd":"app_remove","uuid":"…"}
//! ← {"ok":true,"result":…} | {"ok":false,"error":"…"}
//! ```
//!
//! The socket file is removed when the joiner stops. A leftover file with nobody listening
//! (a crash) is replaced; a live one means another joiner owns the interface, which is
//! refused.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tabbify_control::api::PortRules;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use uuid::Uuid;

/// Where the control socket of `interface` lives by default.
pub fn default_path(interface: &str) -> PathBuf {
    PathBuf::from(format!("/run/tabbify-mesh/{interface}.sock"))
}

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The whole status.
    Status,
    /// The peers only.
    Peers,
    /// Host an app here.
    AppAdd {
        /// The app.
        uuid: Uuid,
    },
    /// Stop hosting an app.
    AppRemove {
        /// The app.
        uuid: Uuid,
    },
}

#[derive(Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The coordinator connection as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    /// The URL.
    pub url: String,
    /// The SSE stream is open.
    pub connected: bool,
    /// The id of the last roster event applied.
    pub last_event_id: Option<u64>,
}

/// An app hosted here.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostedApp {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its ULA (on our TUN).
    pub ula: Ipv6Addr,
}

/// One peer as `peers` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The coordinator's peer id.
    pub peer_id: String,
    /// Display name.
    pub name: String,
    /// Its ULA.
    pub ula: Ipv6Addr,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its public key (base64).
    pub public_key: String,
    /// Where we send to it now.
    pub endpoint: Option<SocketAddr>,
    /// Unix seconds of the last completed handshake.
    pub latest_handshake: Option<u64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// A session with it is live (a handshake completed in the last 3 minutes). There is no
    /// relay: a live session is always direct.
    pub direct: bool,
    /// App ULAs it hosts.
    pub app_ulas: Vec<Ipv6Addr>,
    /// The port rules the filter enforces with it.
    pub ports: PortRules,
}

/// What `status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// TUN name.
    pub interface: String,
    /// Display name (as the coordinator granted it, else as asked).
    pub name: String,
    /// Our peer id.
    pub peer_id: String,
    /// Our ULA.
    pub ula: Ipv6Addr,
    /// Our public key (base64).
    pub public_key: String,
    /// Tags (as granted, else as asked).
    pub tags: Vec<String>,
    /// UDP listen port.
    pub listen_port: u16,
    /// Data-plane driver.
    pub driver: String,
    /// Registered and streaming.
    pub registered: bool,
    /// The coordinator connection.
    pub coordinator: CoordinatorStatus,
    /// Our endpoint as the coordinator saw it.
    pub reflexive_endpoint: Option<SocketAddr>,
    /// The policy lets us host apps.
    pub may_host_apps: bool,
    /// Apps hosted here.
    pub hosted_apps: Vec<HostedApp>,
    /// Visible peers.
    pub peers: Vec<PeerStatus>,
}

/// What answers requests (the joiner).
pub trait Handler: Send + Sync + 'static {
    /// Answers one request: a JSON result or a message for the user.
    fn handle(
        &self,
        req: Request,
    ) -> impl std::future::Future<Output = Result<serde_json::Value, String>> + Send;
}

/// The listening socket; removes its file when dropped.
pub struct Server {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds `path` (creating its directory), refusing if a live joiner already owns it.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another joiner is running on {} (stop it, or use another --interface)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Serves requests until the task is dropped.
    pub async fn serve<H: Handler>(&self, handler: std::sync::Arc<H>) {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let h = handler.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut line = String::new();
                let mut rd = tokio::io::BufReader::new(rd).take(MAX_REQUEST as u64);
                let read = tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line));
                let answer = match read.await {
                    Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
                        Ok(req) => match h.handle(req).await {
                            Ok(v) => Answer {
                                ok: true,
                                result: Some(v),
                                error: None,
                            },
                            Err(e) => Answer {
                                ok: false,
                                result: None,
                                error: Some(e),
                            },
                        },
                        Err(e) => Answer {
                            ok: false,
                            result: None,
                            error: Some(format!("bad request: {e}")),
                        },
                    },
                    _ => return,
                };
                let mut out = serde_json::to_vec(&answer).unwrap_or_default();
                out.push(b'\n');
                let _ = wr.write_all(&out).await;
            });
        }
    }
}

use tokio::io::AsyncReadExt as _;

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to the joiner at `path` (blocking; for the CLI).
pub fn call(path: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "no joiner is running on {} (start `tabbify-mesh join`, or pass the right --interface / --control-socket)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .context("reading the joiner's answer")?;
    let a: Answer = serde_json::from_str(answer.trim())
        .with_context(|| format!("the joiner's answer is not JSON: {answer:?}"))?;
    if a.ok {
        Ok(a.result.unwrap_or(serde_json::Value::Null))
    } else {
        bail!("{}", a.error.unwrap_or_else(|| "refused".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        async fn handle(&self, req: Request) -> Result<serde_json::Value, String> {
            match req {
                Request::Status => Ok(serde_json::json!({"s": 1})),
                Request::AppAdd { uuid } => Ok(serde_json::json!(uuid.to_string())),
                _ => Err("nope".into()),
            }
        }
    }

    #[test]
    fn requests_on_the_wire() {
        let r: Request = serde_json::from_str(
            r#"{"cmd":"app_add","uuid":"67e55044-10b1-426f-9247-bb680e5fe0c8"}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::AppAdd { .. }));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"app_add","uuid":"x"}"#).is_err());
    }

    #[tokio::test]
    async fn round_trip_and_stale_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sub/t.sock");
        let server = Server::bind(&path).unwrap();
        assert!(
            Server::bind(&path).is_err(),
            "a live socket is not taken over"
        );
        let task = tokio::spawn(async move { server.serve(std::sync::Arc::new(Echo)).await });
        let p = path.clone();
        let v = tokio::task::spawn_blocking(move || call(&p, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v, serde_json::json!({"s": 1}));
        let p = path.clone();
        let e = tokio::task::spawn_blocking(move || call(&p, &Request::Peers))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.to_string(), "nope");
        // Garbage gets an error answer, not a hang.
        let p = path.clone();
        let raw = tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
            s.write_all(b"{nope\n").unwrap();
            let mut a = String::new();
            BufReader::new(s).read_line(&mut a).unwrap();
            a
        })
        .await
        .unwrap();
        assert!(raw.contains("bad request"), "{raw}");
        task.abort();
        let _ = task.await;
        // The server was dropped with the task: the file is gone, a new bind works.
        assert!(!path.exists());
        let e = call(&path, &Request::Status).unwrap_err().to_string();
        assert!(e.contains("no joiner is running"), "{e}");
    }
}
