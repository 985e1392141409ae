//! The joiner's decisions, sans IO: no sockets, no clock reads, no files, no tokio.

pub mod roster;
