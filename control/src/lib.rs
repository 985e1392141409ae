//! The Tabbify mesh control plane: the coordinator, the CA helper, and what the joiner
//! and the edge share with them (API types, address derivation).
//!
//! The joiner and the edge need only [`api`] (wire types, SSE decoding) and [`ula`]
//! (derived addresses); the rest is the coordinator.
#![forbid(unsafe_code)]

pub mod api;
pub mod ca;
pub mod ula;
