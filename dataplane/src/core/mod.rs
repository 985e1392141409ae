//! Sans-IO core: plain functions and state machines over caller-owned byte slices.
//!
//! Nothing here opens a socket, spawns a thread or reads the clock: callers pass `now`
//! and buffers in, and get back what to send or write.
#![forbid(unsafe_code)]

pub mod gso;
pub mod net;
pub mod route;
pub mod wire;
