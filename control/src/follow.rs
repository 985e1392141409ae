//! Following the other coordinators on one PostgreSQL database: every committed change
//! is also a row of the database's change log, and its commit notifies
//! [`crate::storage::CHANGE_CHANNEL`]. A listener connection (a thread of the storage
//! engine) wakes the task here on each notification, after each reconnect and every
//! couple of seconds; the task then runs [`Coordinator::catch_up`], which reads the log
//! after the last entry it applied, updates the store and puts the effects (a policy, a
//! revocation) on this coordinator's SSE streams.
//!
//! Invariants: wake-ups coalesce (a burst of notifications is one catch-up), and the
//! catch-up itself reads from the last applied id, so nothing is skipped when a
//! notification is lost; the blocking database read runs off the async workers.

use std::sync::Arc;

use crate::server::Coordinator;
use crate::store::StoreError;

/// Starts following, if the coordinator's database has a change log; `None` otherwise
/// (SQLite, memory). The task ends when the coordinator is dropped.
pub fn spawn(coord: &Arc<Coordinator>) -> Result<Option<tokio::task::JoinHandle<()>>, StoreError> {
    let wake = Arc::new(tokio::sync::Notify::new());
    let waker = wake.clone();
    if !coord.watch_database(Box::new(move || waker.notify_one()))? {
        return Ok(None);
    }
    let weak = Arc::downgrade(coord);
    Ok(Some(tokio::spawn(async move {
        loop {
            wake.notified().await;
            let Some(c) = weak.upgrade() else { return };
            match tokio::task::spawn_blocking(move || c.catch_up()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::debug!(changes = n, "applied other coordinators' changes"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "catching up with the database failed; retrying on the next wake-up")
                }
                Err(e) => tracing::error!(error = %e, "catch-up task failed"),
            }
        }
    })))
}
