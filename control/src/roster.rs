//! The roster on a database: how the coordinator's in-memory [`Registry`] follows the
//! members stored by [`crate::store::Store`] (see [`crate::members`] for the rows).
//!
//! What it owns: the order of a member change — preview, commit, then events — and the
//! database-driven liveness and expiry.
//!
//! * A member change (register, heartbeat, rotation, app move) first runs on the
//!   registry as a preview with its events held back; the rows it produced are then
//!   committed (with the identity and token changes of the same request, in one
//!   transaction), the preview is undone, and the committed rows are put in force with
//!   [`Registry::apply_member`]. A change the database refuses is not applied and not
//!   announced; the request fails (409 or 503). A heartbeat that changes nothing but
//!   liveness writes nothing.
//! * Event ids: with a change log (PostgreSQL), every entry's events go out as one
//!   dispatch whose id is the entry's change-log id, on every coordinator alike, so a
//!   `Last-Event-ID` from one coordinator resumes on another. Other coordinators' entries
//!   committed before this coordinator's own are applied first (the store reads them
//!   during the commit), so ids only grow. Without a change log (SQLite), ids continue
//!   from the start time in milliseconds, so an id from before a restart gets a
//!   snapshot, never a wrong replay.
//! * Liveness: `last_seen` is written when a member changes and otherwise in one batched
//!   statement per sweep for the members whose stored value is older than
//!   [`crate::members::liveness_write_ms`]. Expiry runs only on the coordinator holding
//!   the database's expiry lock and judges from the stored `last_seen` with
//!   [`crate::members::stale_slack_ms`] of slack; each stale mark or removal is one
//!   committed, conditional change (a heartbeat that won the race makes it change no row,
//!   and nothing is announced), and so one event on every coordinator. The same
//!   coordinator prunes the change log ([`crate::server::Config::change_log_keep`]).
//!   That is the rule with a change log (PostgreSQL, where several coordinators share the
//!   members). A coordinator alone on its database (SQLite) judges from its exact
//!   in-memory last heartbeat instead (stale at three missed intervals, as without a
//!   database); only members loaded at start and not heard from since get the slack.
//!
//! Without a database (memory) none of this runs: the registry is used as before, with
//! its coalescing window and local expiry.

use std::collections::{HashMap, HashSet};

use crate::error::ApiError;
use crate::members::{self, MemberRow};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::registry::{Expiry, PeerRecord, Registry};
use crate::storage::Change;
use crate::store::Store;
use std::sync::Arc;

/// The coordinator's mutable state, under its lock.
#[derive(Debug)]
pub struct Core {
    /// The live roster.
    pub registry: Registry,
    /// The durable state.
    pub store: Store,
    /// Each member's `last_seen` as this coordinator last wrote or read it, Unix seconds.
    pub db_seen: HashMap<String, u64>,
    /// When this coordinator last pruned the change log (ms since the epoch).
    pub last_prune_ms: u64,
    /// When this coordinator started (ms since the epoch): a member last seen before it
    /// was loaded from the database and has not been heard from since, so its `last_seen`
    /// is the coarsened stored one.
    pub started_ms: u64,
}

/// How often the expiry-lock holder prunes the change log.
pub const PRUNE_EVERY_MS: u64 = 60_000;

/// The clock and intervals a sweep runs with.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Now, ms since the epoch.
    pub now_ms: u64,
    /// The heartbeat interval, ms.
    pub heartbeat_interval_ms: u64,
    /// How long a stale member stays before it is removed, ms.
    pub stale_after_ms: u64,
    /// How long, and how many, change-log entries are kept.
    pub change_log_keep: (std::time::Duration, u64),
}

impl Core {
    /// The state at start: with a database, its members are loaded (as they were stored:
    /// a member that stopped heartbeating while no coordinator ran goes stale at the first
    /// sweep that judges it), and the event sequence continues from the change-log
    /// position (PostgreSQL) or from `now_ms` (SQLite).
    pub fn new(mut registry: Registry, mut store: Store, now_ms: u64) -> Self {
        let mut db_seen = HashMap::new();
        if store.is_durable() {
            registry.set_coalescing(false);
            for row in store.take_members() {
                if !registry.load_member(&row) {
                    tracing::warn!(peer_id = %row.peer_id, "ignoring a stored member whose id does not derive from its identity");
                    continue;
                }
                db_seen.insert(row.peer_id.clone(), row.last_seen);
            }
            for row in store.take_clients() {
                let id = row.peer_id.clone();
                if !registry.load_client(row) {
                    tracing::warn!(peer_id = %id, "ignoring a stored client no coordinator writes");
                }
            }
            // Commits made while starting (the policy, token pruning) and what was read
            // with them are in the store already; the roster starts after them.
            let remote = store.take_remote();
            store.take_last_own();
            let mut core = Self {
                registry,
                store,
                db_seen,
                last_prune_ms: 0,
                started_ms: now_ms,
            };
            let metrics = Metrics::default();
            for (id, changes) in &remote {
                core.apply_entry(&metrics, *id, changes);
            }
            let start = if core.store.has_change_log() {
                u64::try_from(core.store.last_change()).unwrap_or(0)
            } else {
                now_ms
            };
            core.registry.start_at(start);
            return core;
        }
        Self {
            registry,
            store,
            db_seen,
            last_prune_ms: 0,
            started_ms: now_ms,
        }
    }

    /// Puts one change-log entry of another coordinator in force, its events as one
    /// dispatch with id `id`.
    pub fn apply_entry(&mut self, metrics: &Metrics, id: i64, changes: &[Change]) {
        self.registry.begin_entry(u64::try_from(id).ok());
        let members: HashSet<&str> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Member(r) => Some(r.peer_id.as_str()),
                Change::RemoveMember(p, _) => Some(p.as_str()),
                _ => None,
            })
            .collect();
        for c in changes {
            match c {
                // Revisions written by PUT /v1/policy are compare-and-set, so they only
                // grow; coordinators starting with a changed policy file at once may both
                // write the same one (with the same document).
                Change::Policy(p) | Change::ReplacePolicy(p, _)
                    if p.revision >= self.registry.revision() =>
                {
                    match Policy::compile(p.document.clone()) {
                        Ok(policy) => {
                            self.registry.set_policy(Arc::new(policy), p.revision);
                            Metrics::inc(&metrics.policy_changes);
                            tracing::info!(
                                revision = p.revision,
                                "policy changed by another coordinator"
                            );
                        }
                        Err(e) => {
                            tracing::error!(revision = p.revision, error = %e, "another coordinator stored a policy this one cannot compile; keeping the current one")
                        }
                    }
                }
                // An identity change without a member change in the same entry (an
                // admin's revocation or key clearing written by an older coordinator, or
                // by a store-level writer): the member it invalidates leaves.
                Change::Identity(cn, record) => {
                    let pid = crate::ula::identity_peer_id(cn);
                    if members.contains(pid.as_str()) {
                        continue;
                    }
                    let Some(key) = self.registry.peer(&pid).map(|p| p.key_b64.clone()) else {
                        continue;
                    };
                    if record.revoked_at.is_some() {
                        self.registry.remove(&pid, "revoked");
                    } else if record.key.as_deref() != Some(key.as_str()) {
                        self.registry.remove(&pid, "key_cleared");
                    }
                }
                Change::Member(row) if self.registry.apply_member(row) => {
                    self.db_seen.insert(row.peer_id.clone(), row.last_seen);
                }
                Change::RemoveMember(pid, reason) => {
                    self.registry.remove(pid, reason);
                    self.db_seen.remove(pid);
                }
                Change::Client(row) => {
                    self.registry.add_client(row.clone());
                }
                Change::RemoveClient(pid) => {
                    self.registry.remove_client(pid);
                }
                Change::StaleMember(pid, _) => self.registry.mark_stale(pid),
                Change::ExpireMember(pid, _) => {
                    self.registry.remove(pid, "expired");
                    self.db_seen.remove(pid);
                }
                _ => {}
            }
        }
        self.registry.end_entry();
    }

    /// After this coordinator committed something: puts the other coordinators' entries
    /// read during the commit in force, then runs `own` (this change's effects on the
    /// roster) as one entry with the commit's id. Without a database `own` just runs.
    pub fn after_commit(&mut self, metrics: &Metrics, own: impl FnOnce(&mut Registry)) {
        if !self.store.is_durable() {
            own(&mut self.registry);
            return;
        }
        for (id, changes) in self.store.take_remote() {
            self.apply_entry(metrics, id, &changes);
        }
        let id = self.store.take_last_own();
        self.registry
            .begin_entry(id.and_then(|i| u64::try_from(i).ok()));
        own(&mut self.registry);
        self.registry.end_entry();
    }

    /// Removes member `id` (reason `reason` in its `peer_remove`), committed with `pre`
    /// (the request's other changes) in one transaction before it takes effect. Every
    /// route that ends a membership (revocation, key clearing, leaving) goes through here,
    /// so the stored roster and every coordinator's follow.
    pub fn remove_member(
        &mut self,
        metrics: &Metrics,
        mut pre: Vec<Change>,
        id: &str,
        reason: &str,
    ) -> Result<(), ApiError> {
        if self.store.is_durable() && self.registry.peer(id).is_some() {
            pre.push(Change::RemoveMember(id.to_owned(), reason.to_owned()));
        }
        self.store.commit_changes(pre)?;
        self.after_commit(metrics, |reg| {
            reg.remove(id, reason);
        });
        self.db_seen.remove(id);
        Ok(())
    }

    /// A client change (mint, revocation): committed first (one transaction, and one
    /// change-log entry every coordinator sharing the database applies), then put in
    /// force on the registry, its events under the commit's id. Without a database the
    /// registry changes at once.
    pub fn client_change(&mut self, metrics: &Metrics, change: Change) -> Result<(), ApiError> {
        let apply = |reg: &mut Registry, c: &Change| match c {
            Change::Client(row) => {
                reg.add_client(row.clone());
            }
            Change::RemoveClient(id) => {
                reg.remove_client(id);
            }
            _ => {}
        };
        self.store.commit_changes(vec![change.clone()])?;
        self.after_commit(metrics, |reg| apply(reg, &change));
        Ok(())
    }

    /// A change to the members `touched`, made by `mutate` on the registry, committed with
    /// `pre` (the request's other changes) in one transaction before it takes effect (see
    /// the module docs). Without a database: `pre` is applied, then `mutate` runs as
    /// before.
    pub fn member_change<T>(
        &mut self,
        metrics: &Metrics,
        pre: Vec<Change>,
        touched: &[String],
        mutate: impl FnOnce(&mut Registry) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        if !self.store.is_durable() {
            self.store.commit_changes(pre)?;
            return mutate(&mut self.registry);
        }
        let before: Vec<Option<PeerRecord>> = touched
            .iter()
            .map(|id| self.registry.peer(id).cloned())
            .collect();
        self.registry.hold();
        let out = mutate(&mut self.registry);
        self.registry.discard();
        let after: Vec<PeerRecord> = touched
            .iter()
            .filter_map(|id| self.registry.peer(id).cloned())
            .collect();
        let rows: Vec<MemberRow> = after
            .iter()
            .filter(|a| {
                let row = MemberRow::of(a);
                !before.iter().flatten().any(|b| {
                    b.id == a.id
                        && MemberRow {
                            last_seen: row.last_seen,
                            ..MemberRow::of(b)
                        } == row
                })
            })
            .map(MemberRow::of)
            .collect();
        if out.is_ok() && rows.is_empty() && pre.is_empty() {
            // Liveness only: kept in memory, written coarsened by the sweep.
            return out;
        }
        for (id, b) in touched.iter().zip(before) {
            self.registry.set_silent(id, b);
        }
        let keep_liveness = |reg: &mut Registry| {
            for a in &after {
                reg.set_liveness(&a.id, a.last_seen_ms, a.paths);
            }
        };
        let out = match out {
            Ok(v) => v,
            Err(e) => {
                keep_liveness(&mut self.registry);
                return Err(e);
            }
        };
        let mut changes = pre;
        changes.extend(rows.iter().cloned().map(Change::Member));
        if let Err(e) = self.store.commit_changes(changes) {
            keep_liveness(&mut self.registry);
            return Err(e.into());
        }
        for r in &rows {
            self.db_seen.insert(r.peer_id.clone(), r.last_seen);
        }
        self.after_commit(metrics, |reg| {
            for r in &rows {
                reg.apply_member(r);
            }
        });
        keep_liveness(&mut self.registry);
        Ok(out)
    }

    /// One sweep with a database: writes the coarsened `last_seen` of members that
    /// heartbeated here, then, if this coordinator holds the expiry lock, marks stale and
    /// removes the members the database last saw too long ago (see the module docs).
    pub fn sweep(&mut self, metrics: &Metrics, t: Timing) -> Expiry {
        let now_secs = t.now_ms / 1000;
        let every = members::liveness_write_ms(t.heartbeat_interval_ms) / 1000;
        let due: Vec<String> = self
            .registry
            .peers()
            .filter(|p| {
                let stored = self.db_seen.get(&p.id).copied().unwrap_or(0);
                p.last_seen_ms / 1000 >= stored.saturating_add(every.max(1))
            })
            .map(|p| p.id.clone())
            .collect();
        if !due.is_empty() {
            match self.store.touch(&due, now_secs) {
                Ok(()) => {
                    for id in due {
                        self.db_seen.insert(id, now_secs);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "writing members' last_seen failed"),
            }
        }
        let mut out = Expiry::default();
        match self.store.expiry_lock() {
            Ok(true) => {}
            Ok(false) => return out,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the expiry lock; not expiring");
                return out;
            }
        }
        // Pruning is a write: at most once a minute, not on every sweep.
        if t.now_ms >= self.last_prune_ms.saturating_add(PRUNE_EVERY_MS) {
            self.last_prune_ms = t.now_ms;
            let (keep, rows) = t.change_log_keep;
            if let Err(e) = self.store.prune_change_log(keep.as_secs(), rows) {
                tracing::warn!(error = %e, "pruning the change log failed");
            }
        }
        let timeout = t
            .heartbeat_interval_ms
            .saturating_mul(u64::from(crate::api::MISSED_HEARTBEATS_TO_EXPIRE));
        let decisions = if self.store.has_change_log() {
            match self.coarse_expiry(t, timeout) {
                Some(d) => d,
                None => return out,
            }
        } else {
            self.exact_expiry(t, timeout)
        };
        for (id, change, removed) in decisions {
            // Conditional on last_seen: a heartbeat committed meanwhile wins (no row
            // changes, the transaction fails, nothing is announced).
            if let Err(e) = self.store.commit_changes(vec![change]) {
                tracing::debug!(peer_id = %id, error = %e, "expiry lost to a change");
                continue;
            }
            self.after_commit(metrics, |reg| {
                if removed {
                    reg.remove(&id, "expired");
                } else {
                    reg.mark_stale(&id);
                }
            });
            if removed {
                self.db_seen.remove(&id);
                out.removed.push(id);
            } else {
                out.stale.push(id);
            }
        }
        out
    }
    /// Expiry judged from the database's coarsened `last_seen` (several coordinators on
    /// one database: only the stored value is common to all of them), with
    /// [`members::stale_slack_ms`] of slack; each change is conditional on the stored value
    /// so a heartbeat committed by another coordinator meanwhile wins. `None` when the
    /// database cannot be read.
    fn coarse_expiry(&mut self, t: Timing, timeout: u64) -> Option<Vec<(String, Change, bool)>> {
        let judged = t
            .now_ms
            .saturating_sub(timeout + members::stale_slack_ms(t.heartbeat_interval_ms));
        let stale_before = judged / 1000;
        let remove_before = judged.saturating_sub(t.stale_after_ms) / 1000;
        let candidates = match self.store.members_seen_before(stale_before) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading members for expiry failed");
                return None;
            }
        };
        let mut out = Vec::new();
        for (id, seen, stale) in candidates {
            // An ephemeral member has no stale window.
            let ephemeral = self.registry.peer(&id).is_some_and(|p| p.ephemeral);
            let (change, removed) = if ephemeral {
                (Change::ExpireMember(id.clone(), stale_before), true)
            } else if seen < remove_before {
                (Change::ExpireMember(id.clone(), remove_before), true)
            } else if !stale {
                (Change::StaleMember(id.clone(), stale_before), false)
            } else {
                continue;
            };
            out.push((id, change, removed));
        }
        Some(out)
    }

    /// Expiry of a coordinator alone on its database (SQLite, one coordinator per file):
    /// judged from the exact in-memory last heartbeat, stale after `timeout` (three
    /// intervals) as without a database. A member loaded at start and not heard from
    /// since only has the coarsened stored `last_seen`, so it gets the coarsened slack
    /// until its first heartbeat here. No other writer exists and the caller holds the
    /// coordinator's lock, so memory decides: the stored `last_seen` condition is lifted.
    fn exact_expiry(&self, t: Timing, timeout: u64) -> Vec<(String, Change, bool)> {
        const ANY_LAST_SEEN: u64 = i64::MAX as u64;
        let slack = members::stale_slack_ms(t.heartbeat_interval_ms);
        let mut out: Vec<(String, Change, bool)> = self
            .registry
            .peers()
            .filter_map(|p| {
                let grace = if p.last_seen_ms < self.started_ms {
                    slack
                } else {
                    0
                };
                let stale_at = p.last_seen_ms.saturating_add(timeout).saturating_add(grace);
                if t.now_ms <= stale_at {
                    return None;
                }
                let id = p.id.clone();
                if p.ephemeral || t.now_ms > stale_at.saturating_add(t.stale_after_ms) {
                    Some((id.clone(), Change::ExpireMember(id, ANY_LAST_SEEN), true))
                } else if !p.stale {
                    Some((id.clone(), Change::StaleMember(id, ANY_LAST_SEEN), false))
                } else {
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
