//! The Tabbify mesh data-plane engine: a TUN device and userspace WireGuard to every peer
//! of a table. It has no async runtime, no HTTP and no TLS; the joiner (`tabbify-dataplane`)
//! drives it from the coordinator's roster, `tabbify-mesh up` from a wg-quick file.
//!
//! Layout (one concept per file):
//! * [`core`] — sans-IO: packet views, the route/peer table, the packet filter, per-peer
//!   WireGuard state around `boringtun::noise::Tunn`, drop counters. No sockets, no clock
//!   reads, no threads; `#![forbid(unsafe_code)]`.
//! * [`sys`] — the kernel surface: TUN with `IFF_VNET_HDR`/offloads, UDP sockets with
//!   GSO/GRO, interface addresses and routes. Where `unsafe` lives.
//! * [`driver`] — thin loops that move batches between `sys` and `core`: the io_uring
//!   thread-per-core driver and the portable epoll driver.
//! * [`config`] — the wg-quick configuration file; [`uapi`] — WireGuard's cross-platform
//!   UAPI, so stock `wg` can show and set the device.
//!
//! `unsafe` is denied everywhere but in [`sys`] and the io_uring driver
//! ([`driver::uring`]), the two places that talk to the kernel through raw pointers; each
//! block there carries a `// SAFETY:` comment.
#![deny(unsafe_code)]

pub mod config;
pub mod core;
pub mod device;
pub mod driver;
#[allow(unsafe_code)]
pub mod sys;
pub mod uapi;
