//! WireGuard timers off the hot path: one thread for the whole device (never one per peer)
//! that every [`TICK`] calls `Tunn::update_timers` on each peer — handshake retries,
//! keepalives, rekeying, session expiry — and sends what it asks for from the listen port.
//! It also resets the device-wide handshake rate limiter once a second, as boringtun
//! expects of a shared limiter.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;

use crate::core::counters::{DropCounters, DropReason};
use crate::core::table::Table;
use crate::sys::udp;

/// How often timers run (boringtun's own device uses 250 ms).
pub const TICK: Duration = Duration::from_millis(250);

/// Runs until `stop` is set. `socket` is a dup of a worker's listen socket.
pub fn run(
    table: Arc<Table>,
    socket: OwnedFd,
    ipv6: bool,
    counters: Arc<DropCounters>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 2048];
    let mut last_reset = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let snap = table.load_full();
        if last_reset.elapsed() >= Duration::from_secs(1) {
            snap.limiter.reset_count();
            last_reset = Instant::now();
        }
        for e in &snap.peers {
            let mut st = e.peer.lock();
            let endpoint = st.endpoint;
            let out = match st.tunn.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(p) => Some(p.len()),
                _ => None,
            };
            drop(st);
            if let (Some(n), Some(ep)) = (out, endpoint) {
                match udp::send(socket.as_raw_fd(), &buf[..n], ep, None, ipv6) {
                    Ok(_) => e.peer.stats.add_tx(n),
                    Err(_) => counters.add(DropReason::Io),
                }
            }
        }
    }
}
