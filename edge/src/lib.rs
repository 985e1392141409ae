//! `tabbify-node`: the public edge into app ULAs.
//!
//! The only component of the mesh with a public listener. It accepts HTTP/1.1 on one
//! address and proxies `/app/{uuid}` and `/app/{uuid}/{*rest}` (and hostnames from a routes
//! file) to the app's runner at `[app_ula]:8730`, where `app_ula` is derived locally from the
//! UUID with [`tabbify_api::ula::app_ula`]: there is no per-request lookup.
//!
//! Layout, in request order:
//! * [`server`] accepts connections, applies limits and timeouts, dispatches by path and
//!   hostname, writes the access log, and serves `/metrics` on its own listener;
//! * [`conn`] caps connections per source and overall and puts each client stream through
//!   [`inbound`] (strict CRLF, request framing, request deadline, minimum body rate) before
//!   hyper parses it;
//! * [`auth`] checks the bearer key on `/v1/*` and `/app/*`;
//! * [`routes`] holds the hostname table and reloads it when its file changes;
//! * [`proxy`] forwards one request to the [`upstream`] address, streaming both bodies and
//!   splicing upgraded (WebSocket) connections; [`headers`] strips hop-by-hop headers;
//!   bodyless requests go through [`fetch`] (the [`wire`] codec over [`pool`]ed connections,
//!   in the client's task), the rest through hyper's client;
//! * [`error`] is the one mapping from failure to status and JSON body;
//! * [`metrics`] renders Prometheus text; [`openapi`] serves the API description and an
//!   offline Swagger UI.
//!
//! Invariants: bodies are never collected in memory (every body is forwarded frame by frame,
//! so memory per request is bounded by hyper's buffers, not by body size); error responses
//! carry only fixed strings, never upstream addresses or OS error text.
#![forbid(unsafe_code)]

pub mod auth;
pub mod body;
pub mod config;
pub mod conn;
pub mod error;
pub mod fetch;
pub mod headers;
pub mod inbound;
pub mod metrics;
pub mod openapi;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod upstream;
pub mod wire;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::{EdgeConfig, Limits};
pub use server::{Edge, RunningEdge};
pub use upstream::Upstream;
