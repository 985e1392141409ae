//! `tabbify-mesh`, the joiner: the command line, `up` over a wg-quick file, and `join` to
//! the coordinator ([`join`]: control client, roster, status socket, hosted apps). The
//! data plane it drives is the engine crate, `tabbify_engine`, re-exported here under its
//! module names so the joiner reads `crate::core`, `crate::driver`, … as before.
//! [`interface`] is the one bring-up and shutdown path of `up` and `join`.
#![forbid(unsafe_code)]

pub use tabbify_engine::{config, core, device, driver, sys, uapi};

pub mod interface;
pub mod join;
pub mod policy;
