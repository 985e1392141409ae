//! Where the joiner stands with the coordinator, as one state.
//!
//! ```text
//!              ┌──────── refused before any admission, or revoked ───────▶ Ended
//!              │
//! Registering ─┴─ok─▶ Opening ─heartbeat ok, stream open─▶ Connected
//!      ▲   ▲             │  ▲                                 │
//!      │   └─404─ Resuming ─┘ok   ┌── any failure ──┐   ┌── stream ends, heartbeat 404,
//!      │            ▲             ▼                 ▼   ▼   refusal, transient failure
//!      │            └── admitted, several ── Disconnected
//!      └──────────── retry_at reached ────────────┘
//! ```
//!
//! `retry_at` is now when another coordinator is left to try, else after the backoff
//! ([`super::failover`]). `leave` goes to `Ended` from any state.
//!
//! `status` reports `registered` and `coordinator.connected` as [`Session::is_connected`]:
//! both are true exactly while the roster stream is open.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The session with the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Session {
    /// A registration request is out. `with_token`: it carries the join token (the first
    /// registration, or the retry of a re-registration the coordinator refused with 401).
    Registering {
        /// The request carries the join token.
        with_token: bool,
    },
    /// Registered: the first heartbeat, then the roster stream, are on their way.
    Opening {
        /// Missing peers kept after a re-registration.
        grace: Option<Grace>,
    },
    /// An admitted node moved to another coordinator: a heartbeat is out to it. `Ok`: it
    /// knows us (a shared database), so the stream is opened with `Last-Event-ID`; 404:
    /// it does not, so we register with it.
    Resuming,
    /// The roster stream is open; heartbeats go out every `period` from `next_heartbeat`.
    Connected {
        /// Missing peers kept after a re-registration.
        grace: Option<Grace>,
        /// The heartbeat period, fixed when the stream opened.
        period: Duration,
        /// When the next heartbeat is due.
        next_heartbeat: Instant,
    },
    /// No session (the coordinator is unreachable, closed the stream, or refused a node it
    /// had admitted): register again at `retry_at`. The table is left as it is.
    Disconnected {
        /// When to register again.
        retry_at: Instant,
    },
    /// Revoked, refused before ever being admitted, or leaving: the joiner exits.
    Ended,
}

impl Session {
    /// Registered and streaming the roster.
    pub fn is_connected(&self) -> bool {
        matches!(self, Session::Connected { .. })
    }

    /// The grace period in force, if any (only while registered).
    pub fn grace(&self) -> Option<&Grace> {
        match self {
            Session::Opening { grace } | Session::Connected { grace, .. } => grace.as_ref(),
            _ => None,
        }
    }

    /// The grace slot of a registered session.
    pub(super) fn grace_mut(&mut self) -> Option<&mut Option<Grace>> {
        match self {
            Session::Opening { grace } | Session::Connected { grace, .. } => Some(grace),
            _ => None,
        }
    }
}

/// After a re-registration, peers missing from the fresh roster are kept until `until`:
/// they may not have re-registered yet (a coordinator restart), and dropping them would
/// reset working sessions. Explicit removals and policy changes act at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grace {
    /// The end of the window (the coordinator's expiry: missed heartbeats × interval).
    pub until: Instant,
    /// Peers removed by an explicit `peer_remove` since the window began.
    pub removed: BTreeSet<String>,
}

impl Grace {
    /// A window of `len` from `now`.
    pub fn new(now: Instant, len: Duration) -> Self {
        Self {
            until: now + len,
            removed: BTreeSet::new(),
        }
    }

    /// Whether the peer `peer_id`, missing from the roster, stays in the table at `now`.
    pub fn keeps(&self, peer_id: &str, now: Instant) -> bool {
        now < self.until && !self.removed.contains(peer_id)
    }
}
