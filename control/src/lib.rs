//! The Tabbify mesh control plane: the coordinator and the CA helper.
//!
//! The wire types it shares with the joiner, the edge and the tests live in the
//! `tabbify-api` crate (`control/api/`), re-exported here as [`api`] and [`ula`]; clients
//! link only that crate. The rest is the coordinator: [`policy`] and [`visibility`] (the
//! ACL), [`registry`] (the live roster and its events), [`sse`] (streams), [`store`],
//! [`storage`] (its SQLite and PostgreSQL engines), [`follow`] (other coordinators'
//! changes on a shared database) and [`tokens`] (durable state), [`limits`] (caps and rate limits per member and source),
//! [`server`] (HTTP, TLS, routing), [`stun`] (the STUN server on UDP), [`relays`] (the relays advertised, the in-process
//! relay's URL), [`relay_tokens`] (relay admissions the coordinator signs), [`paths`] (path metrics), [`ca`]
//! (certificates), [`sessions`] (dashboard login links and browser sessions), [`admin_client`]
//! (the binary's admin subcommands' HTTPS client) and [`ui`] (the
//! dashboard's built-in assets and its admin views).
#![forbid(unsafe_code)]

pub use tabbify_api as api;
pub mod admin_client;
pub mod auth;
pub mod ca;
pub mod clients;
pub mod clock;
pub mod error;
pub mod follow;
pub mod limits;
pub mod members;
pub mod metrics;
pub mod openapi;
pub mod paths;
pub mod policy;
pub mod ports;
pub mod registry;
pub mod relay_tokens;
pub mod relays;
pub mod roster;
pub mod routes;
pub mod server;
pub mod sessions;
pub mod sse;
pub mod storage;
pub mod store;
pub mod stun;
pub mod tls;
pub mod tokens;
pub mod traffic;
pub mod ui;
pub use tabbify_api::ula;
pub mod visibility;
