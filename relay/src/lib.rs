//! The mesh relay (`tabbify-mesh-relay`): forwards opaque WireGuard messages between
//! members that cannot reach each other directly, with zero extra bytes per datagram.
//!
//! * [`proto`]: the wire formats (relay frames, UDP control datagrams, the TLS stream's
//!   records, the key-possession proof), sans-IO.
//! * [`server`]: the relay (sessions, limits, the UDP forwarding path with GRO/GSO, the
//!   TLS stream transport, `/health`, `/metrics`).
//! * [`client`]: what a member uses to open a session, look up peers and move frames.
//!
//! The protocol is written up in `relay/PROTOCOL.md`.

pub mod client;
pub mod proto;
pub mod server;
