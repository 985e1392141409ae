//! The simulation's clock: boringtun's mock clock, moved only by the simulation.
//!
//! With its `mock-instant` feature boringtun reads `mock_instant::Instant` for every timer
//! (`Tunn::update_timers`, handshake retry, session expiry, rate limiter). mock_instant 0.3
//! keeps that clock in a thread-local (its `sync` feature, which would make it one global
//! clock, stays off), so a [`Clock`] is the clock of the thread that made it: a simulation
//! runs on one thread, and simulations on different threads (libtest) or in different
//! processes (nextest) never see each other's time.
//!
//! Invariant: time only moves forward, and only through [`Clock::advance_to`]. Engine code
//! that takes a `std::time::Instant` (the driver's [`Timers::tick`]) gets [`Clock::instant`],
//! a fixed real instant plus the simulated time, so both clocks move together.
//!
//! [`Timers::tick`]: tabbify_engine::driver::timers::Timers::tick

use std::time::{Duration, Instant};

use mock_instant::MockClock;

/// The simulated clock of the current thread.
#[derive(Debug)]
pub struct Clock {
    /// The mock clock's reading when the simulation started (another simulation may have
    /// run on this thread before).
    start: Duration,
    /// The real instant that simulated time zero maps to.
    base: Instant,
}

impl Clock {
    /// Starts simulated time at zero on this thread.
    pub fn new() -> Self {
        Self {
            start: MockClock::time(),
            base: Instant::now(),
        }
    }

    /// Simulated time since the start.
    pub fn now(&self) -> Duration {
        MockClock::time().saturating_sub(self.start)
    }

    /// The current simulated time as a `std::time::Instant`.
    pub fn instant(&self) -> Instant {
        self.base + self.now()
    }

    /// Moves the clock forward to `t` (a `t` in the past leaves it where it is).
    pub fn advance_to(&self, t: Duration) {
        let now = self.now();
        if t > now {
            MockClock::advance(t - now);
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
