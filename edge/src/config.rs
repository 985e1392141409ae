//! The edge's configuration: plain structs with defaults, validated once by the binary.
//!
//! Nothing in the edge reads the environment or files on its own: `main.rs` turns flags and
//! `TABBIFY_NODE_KEY` into an [`EdgeConfig`], and tests build one directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::NodeKey;
use crate::upstream::Upstream;

/// Limits and timeouts of the listener and of upstream requests.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request head (request line plus headers) in bytes; larger heads get 431.
    pub max_header_bytes: usize,
    /// Most request headers; more get 431.
    pub max_headers: usize,
    /// Time a client has to send a complete request head, also the time an idle keep-alive
    /// connection is kept waiting for its next request.
    pub header_read_timeout: Duration,
    /// Time to open a TCP connection to an app; past it the request gets 504.
    pub connect_timeout: Duration,
    /// Time an app has to answer with response headers while the request body makes no
    /// progress; past it the request gets 504. Streaming bodies are not cut by it.
    pub upstream_timeout: Duration,
    /// Idle upstream connections kept in the pool this long.
    pub pool_idle_timeout: Duration,
    /// Most client connections open at once; further connections wait in the accept queue.
    pub max_connections: usize,
    /// How often the routes file is checked for changes.
    pub routes_poll: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(90),
            max_connections: 16 * 1024,
            routes_poll: Duration::from_secs(1),
        }
    }
}

/// Everything one edge needs to run.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Listen address.
    pub bind: SocketAddr,
    /// The bearer key that guards `/v1/*` and `/app/*`.
    pub key: NodeKey,
    /// The hostname routes file, if any.
    pub routes_file: Option<PathBuf>,
    /// Where app requests go.
    pub upstream: Upstream,
    /// Limits and timeouts.
    pub limits: Limits,
}

impl EdgeConfig {
    /// A configuration with default limits, production upstreams and no routes file.
    pub fn new(bind: SocketAddr, key: NodeKey) -> Self {
        EdgeConfig {
            bind,
            key,
            routes_file: None,
            upstream: Upstream::AppUla,
            limits: Limits::default(),
        }
    }
}
