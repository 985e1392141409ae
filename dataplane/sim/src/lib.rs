//! Deterministic simulation of Tabbify engine cores: several nodes, each running the real
//! engine core (`core::table` and `core::peer` around boringtun's `Tunn`, the sans-IO
//! `core::pipeline::Pipeline`, the driver's `driver::timers::Timers`), exchange datagrams
//! over a simulated network with loss, duplication, delay, reordering, blocked messages
//! and NAT rebinding, on a clock the simulation moves. Nothing of WireGuard is
//! re-implemented here; the harness only stands where the kernel and the clock would.
//!
//! # Design
//!
//! * **Clock.** boringtun reads its own clock (`update_timers`, handshake retries, the
//!   rate limiter). Built with boringtun's `mock-instant` feature it reads
//!   `mock_instant::Instant`, which this crate moves ([`clock`]). mock_instant 0.3's clock
//!   is thread-local (its `sync` feature stays off), so one simulation runs on one
//!   thread, owns that thread's clock, and tests never share time, whether libtest runs
//!   them as threads or nextest as processes (`sim_clock_is_per_thread` checks it).
//! * **Outside the workspace.** Cargo unifies features across one workspace build: if any
//!   member (even as a dev-dependency) enabled `boringtun/mock-instant`, the
//!   `tabbify-mesh` binary that `cargo nextest run --workspace` builds for the end-to-end
//!   tests would run on a frozen clock. So this crate has its own `[workspace]` and
//!   `Cargo.lock`, like `dataplane/fuzz`, and depends on the engine (`tabbify-engine`,
//!   `dataplane/engine`) by path; `scripts/test-sim.sh` fails if `mock-instant` ever shows
//!   up in the workspace's own feature graph.
//!   `scripts/test-sim.sh` runs it with `cargo nextest run --manifest-path
//!   dataplane/sim/Cargo.toml`, sharing the root `target/` directory: artifacts are keyed
//!   by their features and dependency graph, so the mock-clock boringtun and engine build
//!   beside the real ones and no binary of the workspace is touched (the script checks
//!   that the workspace's `tabbify-mesh` is byte-identical before and after), while the
//!   dependencies both builds share (ring, the crypto crates) compile once; the crate
//!   copies the workspace's dev profile for that.
//! * **Determinism.** Every random choice (keys, packet bytes, timer phases, every fault)
//!   comes from one `StdRng` seeded by [`sim::seed`], which prints the seed and takes
//!   `TABBIFY_SIM_SEED` to replay it. Events run in (time, send order).
//! * **Accounting.** The [`ledger`] follows every application packet to delivery
//!   (byte-identical, once) or to a counted loss.
//!
//! Tests live in `tests/sim.rs`; every one has `sim` in its name, so
//! `cargo nextest run --manifest-path dataplane/sim/Cargo.toml -E 'test(/sim/)'` selects
//! them. Two are `#[ignore]`d reproducers of bugs the simulation found (run them with
//! `--run-ignored only`): packets stranded in boringtun's queue after a session is
//! confirmed to its responder, and boringtun 0.7.1 sending on an unconfirmed responder
//! session whose ring slot aliases `Tunn::current`.

pub mod clock;
pub mod ledger;
pub mod net;
pub mod sim;

pub use net::{Block, Impairments, NetDrop};
pub use sim::{Kind, NodeOptions, Origin, Sim};
