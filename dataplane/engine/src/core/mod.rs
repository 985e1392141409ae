//! Sans-IO core: plain functions and state machines over caller-owned byte slices.
//!
//! Nothing here opens a socket, spawns a thread or reads the clock: callers pass buffers
//! in, and get back what to send or write. (boringtun's `Tunn` reads the clock inside
//! `update_timers`; only the timer thread calls it. `path::mono_ns` is the clock the
//! drivers and the control side read for the per-peer receive times; the core itself only
//! stores the value it is handed.)
#![forbid(unsafe_code)]

pub mod batch;
pub mod batchstats;
pub mod behind;
pub mod conntrack;
pub mod counters;
pub mod demux;
pub mod filter;
pub mod icmp;
pub mod local;
pub mod net;
pub mod offload;
pub mod path;
pub mod peer;
pub mod pipeline;
pub mod route;
pub mod rxsink;
pub mod table;
pub mod tunbatch;
pub mod wire;
