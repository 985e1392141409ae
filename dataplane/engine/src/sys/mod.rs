//! The kernel surface: TUN, UDP sockets, offloads, addresses and routes.
//!
//! Every `unsafe` block of the data plane outside the io_uring driver lives here, each with a
//! `// SAFETY:` comment.

pub mod addr_watch;
pub mod fd;
pub mod ifaddrs;
pub mod link;
pub mod tun;
pub mod udp;
