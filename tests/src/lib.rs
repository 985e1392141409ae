//! Test harness for end-to-end tests: network namespaces, veth links and WireGuard peers
//! (ours and stock), all created by the test and removed when it ends, even when it fails.
//!
//! The pieces, in the order a test uses them:
//! * [`prereq`]: fail early, with "install X", when a tool is missing or we are not root.
//! * [`Netns`]: a uniquely named namespace with loopback up; dropping the last handle kills
//!   the processes spawned inside it (by PID) and deletes it.
//! * [`VethPair`]: a veth link between two namespaces with IPv4 and IPv6 underlay addresses,
//!   RPS on both receive queues, and optional `tc netem` impairment.
//! * [`Process`]: a program running inside a namespace with its output in a log file, dumped
//!   to stderr when the handle drops (the test harness shows it only when a test fails).
//! * [`WgPeer`]: one WireGuard endpoint run by our `tabbify-mesh`, `wireguard-go` or
//!   `boringtun-cli`, configured the same way for all three.
//! * [`wait`]: polling with deadlines; nothing here synchronises by sleeping a fixed time.
//! * [`traffic`]: ping and a TCP transfer of N bytes checked by SHA-256 on both ends.
//! * [`Tunnel`]: the common two-node scenario built from the pieces above.
//!
//! Everything runs commands (`ip`, `wg`, `tc`, …) as root; the only traffic goes between
//! namespaces this harness created.

pub mod bins;
pub mod netns;
pub mod prereq;
pub mod process;
pub mod traffic;
pub mod tunnel;
pub mod veth;
pub mod wait;
pub mod wg;

pub use netns::Netns;
pub use process::Process;
pub use tunnel::{Inner, Tunnel, TunnelSpec};
pub use veth::{VethOptions, VethPair};
pub use wg::{Implementation, InterfaceConfig, Keypair, PeerConfig, WgPeer};
