//! WireGuard timers off the hot path: one thread for the whole device (never one per peer)
//! that every [`TICK`] calls `Tunn::update_timers` on each peer — handshake retries,
//! keepalives, rekeying, session expiry — and sends what it asks for from the listen port.
//! It also resets the device-wide handshake rate limiter once a second, as boringtun
//! expects of a shared limiter.
//!
//! The work of one tick is [`Timers::tick`], which takes `now` and a send function and
//! opens no socket: [`run`] drives it from a thread with `Instant::now()` and the listen
//! socket, the simulation (`dataplane/sim`) from its controlled clock and simulated network.
//! `Tunn::update_timers` still reads boringtun's own clock (the real one in the joiner, the
//! mock one in the simulation); this is the one place that calls it.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;

use crate::core::counters::{DropCounters, DropReason};
use crate::core::path;
use crate::core::table::{Snapshot, Table};
use crate::sys::udp;

/// How often timers run (boringtun's own device uses 250 ms).
pub const TICK: Duration = Duration::from_millis(250);

/// How often the shared handshake rate limiter's count is reset.
pub const LIMITER_RESET: Duration = Duration::from_secs(1);

/// Room `Tunn::update_timers` needs: a handshake initiation (148 bytes) or a keepalive.
pub const TIMER_BUF: usize = 2048;

/// The state the timer loop keeps between ticks.
#[derive(Debug)]
pub struct Timers {
    last_reset: Instant,
    buf: Box<[u8]>,
}

impl Timers {
    /// Timers whose first limiter reset is [`LIMITER_RESET`] after `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            last_reset: now,
            buf: vec![0u8; TIMER_BUF].into_boxed_slice(),
        }
    }

    /// One tick at `now`: resets the rate limiter when [`LIMITER_RESET`] has passed, then
    /// runs every peer's timers and hands each datagram they ask for to `send(destination,
    /// datagram)`, which returns whether it went out (counted as sent bytes, or as an
    /// [`DropReason::Io`] drop). The destination follows the peer's path
    /// (`core::path::target`: through its relay, the header rewritten, or to its endpoint);
    /// a peer with neither sends nothing.
    pub fn tick(
        &mut self,
        now: Instant,
        snap: &Snapshot,
        counters: &DropCounters,
        mut send: impl FnMut(SocketAddr, &[u8]) -> bool,
    ) {
        if now.saturating_duration_since(self.last_reset) >= LIMITER_RESET {
            snap.limiter.reset_count();
            self.last_reset = now;
        }
        for e in &snap.peers {
            let mut st = e.peer.lock();
            let to = path::target(st.endpoint, st.path, st.relay);
            let out = match st.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(p) => Some(p.len()),
                _ => None,
            };
            drop(st);
            if let (Some(n), Some(to)) = (out, to) {
                if let Some(h) = to.handle() {
                    path::rewrite(&mut self.buf[..n], h);
                }
                if send(to.addr(), &self.buf[..n]) {
                    e.peer.stats.add_tx(n);
                } else {
                    counters.add(DropReason::Io);
                }
            }
        }
    }
}

/// Runs until `stop` is set. `socket` is a dup of a worker's listen socket.
pub fn run(
    table: Arc<Table>,
    socket: OwnedFd,
    ipv6: bool,
    counters: Arc<DropCounters>,
    stop: Arc<AtomicBool>,
) {
    let mut timers = Timers::new(Instant::now());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let snap = table.load_full();
        timers.tick(Instant::now(), &snap, &counters, |ep, datagram| {
            udp::send(socket.as_raw_fd(), datagram, ep, None, ipv6).is_ok()
        });
    }
}
