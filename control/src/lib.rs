//! The Tabbify mesh control plane: the coordinator, the CA helper, and what the joiner
//! and the edge share with them (API types, address derivation).
//!
//! The joiner and the edge need only [`api`] (wire types, SSE decoding) and [`ula`]
//! (derived addresses); the rest is the coordinator: [`policy`] and [`visibility`] (the
//! ACL), [`registry`] (the live roster and its events), [`sse`] (streams), [`store`] and
//! [`tokens`] (durable state), [`server`] (HTTP, TLS, routing), [`ca`] (certificates).
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod ca;
pub mod clock;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod policy;
pub mod ports;
pub mod registry;
pub mod server;
pub mod sse;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod ula;
pub mod visibility;
