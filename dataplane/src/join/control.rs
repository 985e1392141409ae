//! The running joiner's local control socket: `tabbify-mesh status|peers|app ...` talk to
//! it. A Unix stream socket (root only, mode 0600) at `/run/tabbify-mesh/<iface>.sock`;
//! one JSON request line in, one JSON answer line out, then the connection closes.
//!
//! ```text
//! → {"cmd":"status"} | {"cmd":"peers"} | {"cmd":"app_add","uuid":"…"} | {"cmd":"app_remove","uuid":"…"}
//!   | {"cmd":"rotate_key"} | {"cmd":"leave"}
//! ← {"ok":true,"result":…} | {"ok":false,"error":"…"}
//! ```
//!
//! The socket file is removed when the joiner stops. A leftover file with nobody listening
//! (a crash) is replaced; a live one means another joiner owns the interface, which is
//! refused.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
pub use tabbify_api::local::{
    CoordinatorStatus, CoordinatorTarget, HostedApp, PeerStatus, Request, Status,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Where the control socket of `interface` lives by default.
pub fn default_path(interface: &str) -> PathBuf {
    PathBuf::from(format!("/run/tabbify-mesh/{interface}.sock"))
}

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

#[derive(Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
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
