//! The real edge, `tabbify-node`, as a process inside a namespace (the one whose joiner is
//! tagged `node`), with its bearer key from `TABBIFY_NODE_KEY` as in production.
//!
//! Invariant: [`EdgeNode::start`] returns once the edge has logged `tabbify-node
//! listening`, i.e. it accepts connections on its bind address.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::process::Process;

/// A running `tabbify-node`.
pub struct EdgeNode {
    process: Process,
    bind: SocketAddr,
    key: String,
}

impl EdgeNode {
    /// Starts `tabbify-node --bind BIND EXTRA…` in `netns` with `key` in
    /// `TABBIFY_NODE_KEY`.
    pub fn start(netns: &Netns, bind: SocketAddr, key: &str, extra: &[&str]) -> Result<EdgeNode> {
        let binary = crate::bins::tabbify_node()?;
        let mut command = netns.command(&binary);
        command
            .args(["--bind", &bind.to_string()])
            .args(extra)
            .env("TABBIFY_NODE_KEY", key)
            .env("RUST_LOG", "info");
        let mut process = Process::spawn(netns.clone(), "tabbify-node", command)?;
        process
            .wait_for_log("tabbify-node listening", Duration::from_secs(20))
            .context("starting tabbify-node")?;
        Ok(EdgeNode {
            process,
            bind,
            key: key.to_owned(),
        })
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.bind
    }

    /// The bearer key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `Bearer KEY`, the `Authorization` header value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.key)
    }

    /// The edge process.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// The edge's log so far (the access log included).
    pub fn logs(&self) -> String {
        self.process.logs()
    }
}
