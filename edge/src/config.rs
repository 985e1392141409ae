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
    /// Most client connections open at once; further connections are answered 503.
    pub max_connections: usize,
    /// Most client connections open at once from one address (IPv6: one /64); further
    /// connections from it are answered 429.
    pub max_connections_per_ip: usize,
    /// Head and body of one request must have arrived within this from the head's first
    /// byte, or the request is answered 408 (or the connection closed, mid-body). `None`:
    /// no deadline.
    pub request_timeout: Option<Duration>,
    /// Minimum request body rate in bytes per second, measured over [`Limits::body_rate_window`]
    /// of time spent waiting on the client, after [`Limits::body_rate_grace`]; slower bodies
    /// are cut (408 or closed). 0: no minimum.
    pub min_body_rate: u64,
    /// The window the body rate is measured over.
    pub body_rate_window: Duration,
    /// Waiting time at the start of a body before its rate is checked.
    pub body_rate_grace: Duration,
    /// A spliced (WebSocket) connection on which neither side sent anything for this long is
    /// closed.
    pub ws_idle_timeout: Duration,
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
            max_connections_per_ip: 64,
            request_timeout: Some(Duration::from_secs(600)),
            min_body_rate: 1024,
            body_rate_window: Duration::from_secs(10),
            body_rate_grace: Duration::from_secs(10),
            ws_idle_timeout: Duration::from_secs(300),
            routes_poll: Duration::from_secs(1),
        }
    }
}

impl Limits {
    /// What [`crate::inbound::Inbound`] enforces on each client connection.
    pub fn inbound(&self) -> crate::inbound::InboundLimits {
        crate::inbound::InboundLimits {
            max_head: self.max_header_bytes,
            max_headers: self.max_headers,
            request_timeout: self.request_timeout,
            min_body_rate: self.min_body_rate,
            rate_window: self.body_rate_window,
            rate_grace: self.body_rate_grace,
        }
    }
}

/// Default address of the metrics listener.
pub const DEFAULT_METRICS_BIND: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9588);

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
    /// Where `/metrics` is served on its own listener (`None`: no metrics listener).
    pub metrics_bind: Option<SocketAddr>,
    /// With a key, `/metrics` is also served on the public listener to `Authorization:
    /// Bearer <key>`; without, the public listener answers 404 for it.
    pub metrics_key: Option<NodeKey>,
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
            metrics_bind: Some(DEFAULT_METRICS_BIND),
            metrics_key: None,
        }
    }
}
