//! The joiner's decisions, sans IO: no sockets, no clock reads, no files, no tokio.
//!
//! * [`roster`] — the coordinator's roster as SSE events build it, and the data plane's
//!   peers it implies (endpoint choice, AllowedIPs, port rules).
//! * [`nat`] — the STUN probe: Binding requests from the WireGuard socket, retransmissions,
//!   the mapped endpoints and the NAT class.
//! * [`paths`] — path selection per peer (direct or relay, why, which relay) and the
//!   relays the joiner may use.
//! * [`routes`] — subnet routes and exit nodes: which peer carries which prefix (with
//!   failover on data-plane liveness), kernel routes, and who may route through us.
//! * [`clients`] — stock WireGuard clients: the ones this node serves as a concentrator,
//!   the ones behind other members (with their own port rules), and the grants between
//!   them and the mesh.
//! * [`session`] — where the joiner stands with the coordinator: one enum.
//! * [`failover`] — which of several coordinators is in use, and when to move on.
//! * [`machine`] — the state machine: coordinator answers, roster events, app changes and
//!   ticks in (each with `now`); table, route, handshake and coordinator requests out.
//!
//! The I/O shell ([`crate::join::shell`]) feeds it and applies what it returns. The only
//! thing taken from the shell's side is [`crate::join::client::ClientError`], as data: the
//! rules that tell a transient failure from a refusal or a revocation live here.

#![forbid(unsafe_code)]

pub mod clients;
pub mod failover;
pub mod machine;
pub mod nat;
pub mod paths;
pub mod roster;
pub mod routes;
pub mod session;

pub use machine::{Action, Config, Exit, Machine};
pub use session::{Grace, Session};
