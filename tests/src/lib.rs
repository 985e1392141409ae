//! Test harness for end-to-end tests: network namespaces, veth links and WireGuard peers
//! (ours and stock), the mesh's own programs (coordinator, joiners, edge), all created by
//! the test and removed when it ends, even when it fails.
//!
//! The pieces, in the order a test uses them:
//! * [`prereq`]: fail early, with "install X", when a tool is missing or we are not root.
//! * [`Netns`]: a uniquely named namespace with loopback up; dropping the last handle kills
//!   the processes spawned inside it (by PID) and deletes it.
//! * [`VethPair`]: a veth link between two namespaces with IPv4 and IPv6 underlay addresses,
//!   RPS on both receive queues, and optional `tc netem` impairment.
//! * [`Lan`]: a bridged "public" LAN in its own namespace that hosts plug into;
//!   [`NatRouter`]: a masquerading router between a private host and a [`Lan`].
//! * [`NatLab`]: two members behind routers of chosen [`RouterKind`]s (none,
//!   endpoint-independent, endpoint-dependent, double NAT, UDP blocked) on a benchmark-space
//!   "internet" where the coordinator and relay run; [`labmesh`]: a coordinator on its hub
//!   and joiners in its members, plus the junk flood the attacker tests send.
//! * [`Process`]: a program running inside a namespace with its output in a log file, dumped
//!   to stderr when the handle drops (the test harness shows it only when a test fails).
//! * [`WgPeer`]: one WireGuard endpoint run by our `tabbify-mesh`, `wireguard-go` or
//!   `boringtun-cli`, configured the same way for all three.
//! * The mesh: [`Pki`] (via `tabbify-mesh-ca`), [`Coordinator`], [`Admin`] (curl with the
//!   admin certificate), [`Joiner`] (`tabbify-mesh join` and its local commands, whose JSON
//!   is typed in [`status`]), [`Testbed`] (all of them on one LAN), [`EdgeNode`]
//!   (`tabbify-node`) and [`AppProcess`] (the test app on an app ULA).
//! * [`wait`]: polling with deadlines; nothing here synchronises by sleeping a fixed time.
//! * [`traffic`]: ping and a TCP transfer of N bytes checked by SHA-256 on both ends;
//!   [`Pinger`]: a timestamped background ping, to tell when traffic stopped.
//! * [`rawsock`]: raw IPv4/IPv6 sockets to forge segments and ICMP errors and to capture.
//! * [`inside`]: async client code run in this process but inside a namespace.
//! * [`Tunnel`]: the common two-node scenario built from the pieces above.
//! * [`postgres::Postgres`]: a throwaway PostgreSQL cluster (Debian `postgresql`) for
//!   coordinators on PostgreSQL.
//!
//! Everything runs commands (`ip`, `wg`, `tc`, `nft`, `curl`, …) as root; the only traffic
//! goes between namespaces this harness created.

pub mod admin;
pub mod app;
pub mod bins;
pub mod coordinator;
pub mod edge;
pub mod inside;
pub mod joiner;
pub mod labmesh;
pub mod lan;
pub mod mountns;
pub mod nat;
pub mod natlab;
pub mod netns;
pub mod pinger;
pub mod pki;
pub mod postgres;
pub mod prereq;
pub mod process;
pub mod rawsock;
pub mod resolved;
pub mod status;
pub mod testbed;
pub mod traffic;
pub mod tunnel;
pub mod veth;
pub mod wait;
pub mod wg;

pub use admin::Admin;
pub use app::AppProcess;
pub use coordinator::Coordinator;
pub use edge::EdgeNode;
pub use joiner::{JoinSpec, Joiner};
pub use lan::Lan;
pub use nat::NatRouter;
pub use natlab::{NatLab, RouterKind, Side};
pub use netns::Netns;
pub use pinger::Pinger;
pub use pki::Pki;
pub use process::Process;
pub use testbed::Testbed;
pub use tunnel::{Inner, Tunnel, TunnelSpec};
pub use veth::{VethOptions, VethPair};
pub use wg::{Implementation, InterfaceConfig, Keypair, WgPeer, WgPeerConfig};
