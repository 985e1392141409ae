//! The coordinator's admin API as an operator uses it: `curl` with the admin's client
//! certificate, run inside a namespace (`ip netns exec`), against the coordinator's HTTPS
//! address.
//!
//! Why curl: it is an independent HTTPS client (its own TLS stack checks the coordinator
//! certificate against the mesh CA and presents the admin certificate), it runs inside the
//! namespace with no code of ours entering it, and `scripts/setup.sh` installs it.
//! [`crate::prereq::Tool::Curl`] names it when missing.
//!
//! Invariants: every request has a deadline (`--max-time`); a transport failure is an error
//! with curl's message; an HTTP status is returned to the caller as is, except in the
//! typed helpers, which fail on anything but success and quote the body.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use tabbify_api as api;

use crate::netns::{run_checked, Netns};
use crate::pki::{path_str, Issued};

/// Seconds curl may take for one request, connection included.
const MAX_TIME: &str = "10";

/// An admin client: a certificate with the admin role (`tabbify-mesh-ca issue-admin`).
#[derive(Debug, Clone)]
pub struct Admin {
    netns: Netns,
    base_url: String,
    cert: Issued,
}

/// An HTTP answer: status and body (parsed as JSON when it is JSON, else a string).
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: Value,
}

impl Admin {
    /// A client running in `netns` against `base_url` (`https://HOST:PORT`) with `cert`.
    pub fn new(netns: &Netns, base_url: &str, cert: Issued) -> Admin {
        Admin {
            netns: netns.clone(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            cert,
        }
    }

    /// Sends `method path` with an optional JSON body; returns the status and body.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer> {
        static SERIAL: AtomicU32 = AtomicU32::new(0);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let workdir = self.netns.workdir();
        let out = workdir.join(format!("admin-{serial}.out"));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.netns.name(), "curl"])
            .args(["-sS", "--max-time", MAX_TIME, "-X", method])
            .args(["--cacert", path_str(&self.cert.ca)?])
            .args(["--cert", path_str(&self.cert.cert)?])
            .args(["--key", path_str(&self.cert.key)?])
            .args(["-o", path_str(&out)?, "-w", "%{http_code}"]);
        if let Some(body) = body {
            let input = workdir.join(format!("admin-{serial}.json"));
            std::fs::write(&input, serde_json::to_vec(body)?)
                .with_context(|| format!("writing {}", input.display()))?;
            command
                .args(["-H", "content-type: application/json"])
                .arg("--data-binary")
                .arg(format!("@{}", path_str(&input)?));
        }
        command.arg(format!("{}{path}", self.base_url));
        let code =
            run_checked(&mut command).with_context(|| format!("admin request {method} {path}"))?;
        let status: u16 = code
            .trim()
            .parse()
            .with_context(|| format!("curl printed {code:?} instead of a status"))?;
        let bytes = std::fs::read(&out).unwrap_or_default();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(Answer { status, body })
    }

    /// Like [`Admin::request`], failing unless the status is 2xx; returns the body.
    pub fn expect_ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let answer = self.request(method, path, body)?;
        ensure!(
            (200..300).contains(&answer.status),
            "{method} {path} answered {}: {}",
            answer.status,
            answer.body
        );
        Ok(answer.body)
    }

    /// `PUT /v1/policy`; returns the new revision's answer.
    pub fn put_policy(&self, policy: &Value) -> Result<Value> {
        self.expect_ok("PUT", api::PATH_POLICY, Some(policy))
    }

    /// `POST /v1/tokens`: a join token granting `tags` (and the display name `name`),
    /// valid for ten minutes and `max_uses` registrations (0: unlimited, asked for
    /// explicitly); returns the secret.
    pub fn create_token(&self, tags: &[&str], name: Option<&str>, max_uses: u32) -> Result<String> {
        let request = api::TokenRequest {
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            name: name.map(str::to_owned),
            ttl_secs: 600,
            max_uses,
            unlimited: max_uses == 0,
            identity: None,
        };
        let answer = self.expect_ok(
            "POST",
            api::PATH_TOKENS,
            Some(&serde_json::to_value(&request)?),
        )?;
        let token: api::TokenResponse = serde_json::from_value(answer.clone())
            .with_context(|| format!("not a token answer: {answer}"))?;
        Ok(token.token)
    }

    /// `DELETE /v1/mesh/peers/{id}`: revokes a peer.
    pub fn revoke(&self, peer_id: &str) -> Result<()> {
        let answer = self.expect_ok("DELETE", &format!("{}/{peer_id}", api::PATH_PEERS), None)?;
        let revoked: api::RevokeResponse = serde_json::from_value(answer.clone())
            .with_context(|| format!("not a revocation answer: {answer}"))?;
        ensure!(
            revoked.revoked,
            "revocation answer without revoked: true: {answer}"
        );
        Ok(())
    }
}
