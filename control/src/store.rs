//! The durable state of the coordinator: join tokens (hashes only), one record per
//! identity (its admitted WireGuard key, retired keys, granted tags and name, revocation)
//! and the current policy, kept in memory for reads and written through to a database
//! ([`crate::storage`]: SQLite under `--state-dir` by default, or PostgreSQL). Members
//! (the roster) are stored too, but kept in memory by the registry, not here: the store
//! hands the ones read at open to the coordinator ([`Store::take_members`]) and writes the
//! member changes it is given ([`crate::roster`]).
//!
//! Invariants:
//! * A change is committed to the database before it is applied in memory, and the
//!   request that made it is answered only after that; a change the database refuses
//!   (a failed commit, a full disk, a lost connection) is not applied and the request
//!   fails. So a restart finds every acknowledged change.
//! * A WireGuard key belongs to at most one identity, for good: once admitted for an
//!   identity, a key stays bound to it (as its current key or a retired one) even after
//!   rotation, clearing or revocation. The store refuses such a record before writing it,
//!   and the database's primary key on the key refuses it again.
//!
//! Import of the line log: earlier coordinators kept this state in `state.log`, one JSON
//! record per line. On the first start with a database, an existing `state.log` is replayed
//! (a torn last line from a crash mid-append is ignored; a corrupt line elsewhere refuses
//! to start), written to the database in one transaction together with a `meta` row
//! marking the import, and then renamed `state.log.imported` (kept as a backup). A crash
//! between the commit and the rename is finished at the next start (the `meta` row says
//! the import happened; the file is renamed, not imported again). A `state.log` beside a
//! database that already holds other state is refused rather than merged.
//!
//! Migration of per-key logs: logs written when admissions were per key (`admit`/
//! `unadmit`/`revoke`/`unrevoke` records keyed by the WireGuard key) replay into identity
//! records: an admission becomes its identity's current key, a revocation revokes the
//! identity that held the key (a revoked key whose identity the log no longer names stays
//! refused on its own).
//!
//! Token secrets never reach the database: only their SHA-256 is recorded.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::{self, Change, Database, Engine, Snapshot, StorageError};

use crate::api::PolicyDocument;

/// Name of the legacy line log inside the state directory (imported once).
pub const LOG_FILE: &str = "state.log";
/// What the line log is renamed to once imported.
pub const IMPORTED_LOG_FILE: &str = "state.log.imported";

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading the legacy log or renaming it failed.
    #[error("state store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A record would bind a key that another identity holds.
    #[error("key {key} is bound to identity {identity:?}")]
    KeyBound {
        /// The key (base64).
        key: String,
        /// The identity holding it.
        identity: String,
    },
    /// A record in the middle of the legacy log does not parse.
    #[error("state store {path}: line {line} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        reason: String,
    },
    /// A `state.log` was found beside a database that already holds state it did not come
    /// from: importing it could contradict that state, so nothing is imported.
    #[error(
        "{path} exists but the database already holds state: move the file away (it was \
         not imported), or start once with an empty database to import it"
    )]
    ImportConflict {
        /// The log.
        path: PathBuf,
    },
    /// The database failed or refused the change; nothing of it was applied.
    #[error("state store: {0}")]
    Storage(#[from] StorageError),
}

/// Change-log entries of other coordinators: `(id, changes)`, oldest first.
pub type LogEntries = Vec<(i64, Vec<Change>)>;

/// A minted join token, keyed by the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Granted tags.
    pub tags: Vec<String>,
    /// Granted display name.
    pub name: Option<String>,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Allowed admissions (0 = unlimited, minted only with an explicit `unlimited`).
    pub max_uses: u32,
    /// Admissions so far.
    pub uses: u32,
    /// If set, only this identity (certificate CN) may use the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// When it was minted, Unix seconds (0 in logs that did not record it).
    #[serde(default)]
    pub created_at: u64,
}

/// What the coordinator knows durably about one identity (certificate CN): the one
/// WireGuard key admitted for it, what its join token granted, and whether it is revoked.
///
/// Invariant (kept by [`Store`]): a key appears as `key` or in `past_keys` of at most one
/// identity, so a key admitted once stays bound to that identity for good.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// The admitted key (base64); `None` before the first admission, or after an admin
    /// cleared it (`DELETE /v1/identities/{cn}/key`) so a node that lost its key can
    /// register a new one with a new token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When `key` was admitted or rotated in, Unix seconds (0 when imported from a log
    /// that did not record it).
    #[serde(default)]
    pub key_since: u64,
    /// The display name granted.
    pub display_name: String,
    /// The tags granted.
    pub tags: Vec<String>,
    /// Keys this identity held before (rotated out or cleared), oldest first; they stay
    /// bound to it so no other identity can ever register them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub past_keys: Vec<String>,
    /// When an admin revoked the identity, Unix seconds; a revoked identity cannot
    /// register, whatever key or token it presents, until an admin re-admits it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

impl IdentityRecord {
    /// Replaces the current key with `key` (admitted at `now_secs`), retiring the old one.
    pub fn set_key(&mut self, key: Option<String>, now_secs: u64) {
        if let Some(old) = self.key.take() {
            if Some(&old) != key.as_ref() && !self.past_keys.contains(&old) {
                self.past_keys.push(old);
            }
        }
        if let Some(k) = &key {
            self.past_keys.retain(|p| p != k);
        }
        self.key = key;
        self.key_since = now_secs;
    }
}

/// The pre-identity admission record (one per key), read from old logs and converted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LegacyAdmission {
    identity: String,
    display_name: String,
    tags: Vec<String>,
}

/// The policy in force, with the hash of the policy file it was last reconciled with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    /// Revision number.
    pub revision: u64,
    /// blake3 (hex) of the `--policy-file` bytes when this policy was recorded.
    pub file_hash: String,
    /// The document.
    pub document: PolicyDocument,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Token {
        hash: String,
        token: TokenRecord,
    },
    TokenUse {
        hash: String,
    },
    TokenDelete {
        hash: String,
    },
    Identity {
        identity: String,
        record: IdentityRecord,
    },
    /// Legacy (per-key admission): imported as the identity's key.
    Admit {
        key: String,
        admission: LegacyAdmission,
    },
    /// Legacy: the key's admission ended (it stays bound to its identity).
    Unadmit {
        key: String,
    },
    /// Legacy (per-key revocation): revokes the identity holding the key; a key no
    /// identity holds stays refused on its own.
    Revoke {
        key: String,
        peer_id: String,
        at: u64,
    },
    Unrevoke {
        key: String,
    },
    Policy {
        policy: StoredPolicy,
    },
}

/// A key revoked by a log written before revocation was per identity, whose identity
/// the log does not name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedKey {
    /// The peer id it had.
    pub peer_id: String,
    /// When, Unix seconds.
    pub at: u64,
}

/// The store: the in-memory view, and the database it is written through to (none for
/// a store kept in memory only).
#[derive(Debug)]
pub struct Store {
    engine: Option<Box<dyn Engine + Sync>>,
    tokens: HashMap<String, TokenRecord>,
    identities: BTreeMap<String, IdentityRecord>,
    /// Every key any identity holds or held → that identity.
    key_owner: HashMap<String, String>,
    revoked_keys: BTreeMap<String, RevokedKey>,
    policy: Option<StoredPolicy>,
    /// The newest change-log entry applied (engines with a change log).
    last_change: i64,
    /// Other coordinators' entries read while committing (those before this process's
    /// own entry), for the caller to act on before its own change: `(id, changes)`.
    remote: Vec<(i64, Vec<Change>)>,
    /// The change-log id of this process's last commit, until taken.
    last_own: Option<i64>,
    /// Members as read at open, until taken.
    members: Vec<crate::members::MemberRow>,
    /// Clients as read at open, until taken.
    clients: Vec<crate::clients::ClientRow>,
}

impl Store {
    /// A store that keeps everything in memory only.
    pub fn in_memory() -> Self {
        Self {
            engine: None,
            tokens: HashMap::new(),
            identities: BTreeMap::new(),
            key_owner: HashMap::new(),
            revoked_keys: BTreeMap::new(),
            policy: None,
            last_change: 0,
            remote: Vec::new(),
            last_own: None,
            members: Vec::new(),
            clients: Vec::new(),
        }
    }

    /// Opens the SQLite database in `dir` (creating it), importing a `state.log` found
    /// there once.
    pub fn open(dir: &Path, now_secs: u64) -> Result<Self, StoreError> {
        Self::open_database(&Database::Sqlite(dir.to_owned()), Some(dir), now_secs)
    }

    /// Opens `database` (migrating its schema) and reads it; a `state.log` in
    /// `legacy_dir` is imported once (see the module docs).
    pub fn open_database(
        database: &Database,
        legacy_dir: Option<&Path>,
        now_secs: u64,
    ) -> Result<Self, StoreError> {
        let mut engine = database.open(now_secs)?;
        // Read the change log's end before the tables: a change committed in between is
        // then applied again by `catch_up`, which is harmless (every change is a whole row).
        let mut last_change = storage::last_change_id(engine.as_mut())?;
        let mut snapshot = storage::load(engine.as_mut())?;
        if let Some(dir) = legacy_dir {
            if import_log(engine.as_mut(), &snapshot, dir, now_secs)? {
                last_change = storage::last_change_id(engine.as_mut())?;
                snapshot = storage::load(engine.as_mut())?;
            }
        }
        let mut store = Self::from_snapshot(snapshot);
        store.engine = Some(engine);
        store.last_change = last_change;
        Ok(store)
    }

    /// Applies the change-log entries committed since the last call (or since open) and
    /// returns those other coordinators made, oldest first, with their ids, for the caller
    /// to act on (rosters, policy); entries read during a commit of this process come
    /// first. Without a change log (SQLite, memory): nothing. Call it under the same lock
    /// as the writes, so no own write interleaves.
    pub fn catch_up(&mut self) -> Result<Vec<(i64, Vec<Change>)>, StoreError> {
        let mut out = self.take_remote();
        out.extend(self.read_log(None, usize::MAX)?);
        Ok(out)
    }

    /// As [`Store::catch_up`], reading at most about `max` entries (whole batches); the
    /// flag says whether more may follow.
    pub fn catch_up_some(&mut self, max: usize) -> Result<(LogEntries, bool), StoreError> {
        let mut out = self.take_remote();
        let before = self.last_change;
        out.extend(self.read_log(None, max)?);
        let more =
            self.has_change_log() && usize::try_from(self.last_change - before).unwrap_or(0) >= max;
        Ok((out, more))
    }

    /// Reads and applies the change-log entries after the last applied one (and before
    /// `before`; stopping once `max` were read), returning the others' entries.
    fn read_log(
        &mut self,
        before: Option<i64>,
        max: usize,
    ) -> Result<Vec<(i64, Vec<Change>)>, StoreError> {
        let Some(origin) = self
            .engine
            .as_ref()
            .and_then(|e| e.change_log_origin())
            .map(str::to_owned)
        else {
            return Ok(Vec::new());
        };
        let batch = max.clamp(1, 1000);
        let mut applied = Vec::new();
        let mut read = 0usize;
        while let Some(engine) = self.engine.as_mut() {
            let entries = storage::changes_after(engine.as_mut(), self.last_change, before, batch)?;
            let n = entries.len();
            read += n;
            for (id, from, changes) in entries {
                // Our own entries are applied again too (in log order that converges on
                // the database's state, and covers a commit whose answer was lost), but
                // only the others' are returned.
                for c in &changes {
                    self.apply_change(c.clone());
                }
                if from != origin {
                    applied.push((id, changes));
                }
                self.last_change = id;
            }
            if n < batch || read >= max {
                break;
            }
        }
        Ok(applied)
    }

    /// Calls `on_change` (from another thread) when other coordinators may have committed
    /// changes, and every few seconds; the caller then runs [`Store::catch_up`]. `false`
    /// when the engine has no change log.
    pub fn watch(&self, on_change: Box<dyn Fn() + Send>) -> Result<bool, StoreError> {
        match &self.engine {
            Some(e) => Ok(e.watch(on_change)?),
            None => Ok(false),
        }
    }

    /// The engine's name (`sqlite`, `postgres`), or `memory`.
    pub fn engine_name(&self) -> &'static str {
        self.engine.as_ref().map_or("memory", |e| e.name())
    }

    fn from_snapshot(s: Snapshot) -> Self {
        let mut store = Self::in_memory();
        store.tokens = s.tokens.into_iter().collect();
        for (identity, record) in s.identities {
            store.apply_identity(identity, record);
        }
        store.revoked_keys = s.revoked_keys.into_iter().collect();
        store.policy = s.policy;
        store.members = s.members;
        store.clients = s.clients;
        store
    }

    /// The clients read at open (once; later calls return nothing).
    pub fn take_clients(&mut self) -> Vec<crate::clients::ClientRow> {
        std::mem::take(&mut self.clients)
    }

    /// The members read at open (once; later calls return nothing).
    pub fn take_members(&mut self) -> Vec<crate::members::MemberRow> {
        std::mem::take(&mut self.members)
    }

    /// Whether a database backs this store (members are then written to it).
    pub fn is_durable(&self) -> bool {
        self.engine.is_some()
    }

    /// The name of the database's event log (a `meta` row created once by whichever
    /// coordinator starts first) when it has a change log; `None` otherwise.
    pub fn shared_event_log(&mut self) -> Result<Option<String>, StoreError> {
        if !self.has_change_log() {
            return Ok(None);
        }
        let Some(engine) = self.engine.as_mut() else {
            return Ok(None);
        };
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        Ok(Some(storage::meta_get_or_init(
            engine.as_mut(),
            storage::META_EVENT_LOG,
            &fresh,
        )?))
    }

    /// Whether the database has a change log other coordinators follow (PostgreSQL).
    pub fn has_change_log(&self) -> bool {
        self.engine
            .as_ref()
            .is_some_and(|e| e.change_log_origin().is_some())
    }

    /// The newest change-log entry applied (0 without a change log).
    pub fn last_change(&self) -> i64 {
        self.last_change
    }

    /// The change-log id of this process's last commit since the last call (`None`
    /// without a change log).
    pub fn take_last_own(&mut self) -> Option<i64> {
        self.last_own.take()
    }

    /// Other coordinators' entries read while committing, oldest first, for the caller
    /// to act on before its own change.
    pub fn take_remote(&mut self) -> Vec<(i64, Vec<Change>)> {
        std::mem::take(&mut self.remote)
    }

    /// Writes member changes (and anything else) in one transaction; see
    /// [`Store::take_last_own`] for its change-log id.
    pub fn commit_changes(&mut self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.commit(changes)
    }

    /// Writes the coarsened `last_seen` of these members (no change-log entry).
    pub fn touch(&mut self, peer_ids: &[String], secs: u64) -> Result<(), StoreError> {
        match self.engine.as_mut() {
            Some(e) => Ok(storage::touch(e.as_mut(), peer_ids, secs)?),
            None => Ok(()),
        }
    }

    fn dashboard_engine(&mut self) -> Result<&mut (dyn Engine + Sync), StoreError> {
        match self.engine.as_mut() {
            Some(e) => Ok(e.as_mut()),
            None => Err(StoreError::Storage(storage::StorageError::Config(
                "dashboard sessions need a database; this store is in memory".into(),
            ))),
        }
    }

    /// Whether this process runs member expiry now (see [`Engine::expiry_lock`]).
    pub fn expiry_lock(&mut self) -> Result<bool, StoreError> {
        match self.engine.as_mut() {
            Some(e) => Ok(e.expiry_lock()?),
            None => Ok(true),
        }
    }

    /// Deletes change-log entries older than `before_secs` or beyond the newest
    /// `keep_rows` (the newest entry is always kept). Without a change log: nothing.
    pub fn prune_change_log(&mut self, before_secs: u64, keep_rows: u64) -> Result<(), StoreError> {
        match self.engine.as_mut() {
            Some(e) if e.change_log_origin().is_some() => Ok(storage::prune_change_log(
                e.as_mut(),
                before_secs,
                keep_rows,
            )?),
            _ => Ok(()),
        }
    }

    /// Members the database last saw before `before_secs`: `(peer_id, last_seen, stale)`.
    pub fn members_seen_before(
        &mut self,
        before_secs: u64,
    ) -> Result<Vec<(String, u64, bool)>, StoreError> {
        match self.engine.as_mut() {
            Some(e) => Ok(storage::members_seen_before(e.as_mut(), before_secs)?),
            None => Ok(Vec::new()),
        }
    }

    /// Every durable fact of this store, as database changes (what an import writes).
    fn changes(&self) -> Vec<Change> {
        let mut out = Vec::new();
        out.extend(self.policy.clone().map(Change::Policy));
        let mut tokens: Vec<_> = self.tokens.iter().collect();
        tokens.sort_by(|a, b| a.0.cmp(b.0));
        out.extend(
            tokens
                .into_iter()
                .map(|(h, t)| Change::Token(h.clone(), t.clone())),
        );
        out.extend(
            self.identities
                .iter()
                .map(|(i, r)| Change::Identity(i.clone(), r.clone())),
        );
        out.extend(
            self.revoked_keys
                .iter()
                .map(|(k, r)| Change::RevokedKey(k.clone(), r.clone())),
        );
        out
    }

    /// The in-memory state that the log `lines` describe. Blank lines are skipped; a final
    /// line that does not parse is a torn append (a crash mid-write) and is ignored; any other
    /// line that does not parse is `Err((1-based line number, reason))`.
    pub fn replay<S: AsRef<str>>(lines: &[S]) -> Result<Self, (usize, String)> {
        let mut store = Self::in_memory();
        let n = lines.len();
        for (i, line) in lines.iter().enumerate() {
            let line = line.as_ref();
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Record>(line) {
                Ok(r) => store.apply(r),
                // A crash mid-append leaves a torn final line: drop it.
                Err(_) if i + 1 == n => break,
                Err(e) => return Err((i + 1, e.to_string())),
            }
        }
        Ok(store)
    }

    /// Tokens by hash.
    pub fn token(&self, hash: &str) -> Option<&TokenRecord> {
        self.tokens.get(hash)
    }

    /// Records a new token.
    pub fn put_token(&mut self, hash: String, token: TokenRecord) -> Result<(), StoreError> {
        self.commit(vec![Change::Token(hash, token)])
    }

    /// Counts one use of a token.
    pub fn use_token(&mut self, hash: &str) -> Result<(), StoreError> {
        let changes = self.token_use(hash).into_iter().collect();
        self.commit(changes)
    }

    fn token_use(&self, hash: &str) -> Option<Change> {
        let mut t = self.tokens.get(hash)?.clone();
        t.uses = t.uses.saturating_add(1);
        Some(Change::SpendToken(hash.to_owned(), t))
    }

    /// An admission: replaces the record of `identity` (as [`Store::put_identity`]) and
    /// counts one use of the token `spend`, in one transaction, so a crash never leaves an
    /// admission whose token use was not counted.
    pub fn admit(
        &mut self,
        identity: &str,
        record: IdentityRecord,
        spend: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut changes: Vec<Change> = self
            .identity_change(identity, record)?
            .into_iter()
            .collect();
        changes.extend(spend.and_then(|h| self.token_use(h)));
        self.commit(changes)
    }

    /// The changes [`Store::admit`] would commit, to commit with others in one
    /// transaction ([`Store::commit_changes`]).
    pub fn admit_changes(
        &self,
        identity: &str,
        record: IdentityRecord,
        spend: Option<&str>,
    ) -> Result<Vec<Change>, StoreError> {
        let mut changes: Vec<Change> = self
            .identity_change(identity, record)?
            .into_iter()
            .collect();
        changes.extend(spend.and_then(|h| self.token_use(h)));
        Ok(changes)
    }

    /// Every token, by hash.
    pub fn tokens(&self) -> impl Iterator<Item = (&String, &TokenRecord)> {
        self.tokens.iter()
    }

    /// Deletes a token (it can no longer be used).
    pub fn delete_token(&mut self, hash: &str) -> Result<(), StoreError> {
        self.commit(vec![Change::DeleteToken(hash.to_owned())])
    }

    /// The record of `identity`, if it was ever admitted or revoked.
    pub fn identity(&self, identity: &str) -> Option<&IdentityRecord> {
        self.identities.get(identity)
    }

    /// Every identity record, by identity.
    pub fn identities(&self) -> &BTreeMap<String, IdentityRecord> {
        &self.identities
    }

    /// The identity that holds or held `key` (base64), if any.
    pub fn owner_of_key(&self, key: &str) -> Option<&str> {
        self.key_owner.get(key).map(String::as_str)
    }

    /// Replaces the record of `identity`. Refuses (without writing) a record whose keys
    /// another identity holds, which would break the one-key-one-identity invariant.
    pub fn put_identity(
        &mut self,
        identity: &str,
        record: IdentityRecord,
    ) -> Result<(), StoreError> {
        let changes = self
            .identity_change(identity, record)?
            .into_iter()
            .collect();
        self.commit(changes)
    }

    /// The change that stores `record` for `identity` (`None`: it is stored already), or
    /// the refusal of a record that would take another identity's key.
    fn identity_change(
        &self,
        identity: &str,
        record: IdentityRecord,
    ) -> Result<Option<Change>, StoreError> {
        if self.identities.get(identity) == Some(&record) {
            return Ok(None);
        }
        let foreign = record
            .key
            .iter()
            .chain(&record.past_keys)
            .find(|k| self.owner_of_key(k).is_some_and(|o| o != identity));
        if let Some(k) = foreign {
            return Err(StoreError::KeyBound {
                key: k.clone(),
                identity: self.key_owner[k].clone(),
            });
        }
        // A key this identity held stays bound to it even if the new record leaves it out.
        let mut record = record;
        if let Some(old) = self.identities.get(identity) {
            for k in old.key.iter().chain(&old.past_keys) {
                if record.key.as_ref() != Some(k) && !record.past_keys.contains(k) {
                    record.past_keys.push(k.clone());
                }
            }
        }
        Ok(Some(Change::Identity(identity.to_owned(), record)))
    }

    /// Whether `key` (base64) was revoked by a pre-identity log without a known identity.
    pub fn is_key_revoked(&self, key: &str) -> bool {
        self.revoked_keys.contains_key(key)
    }

    /// Keys revoked by a pre-identity log without a known identity.
    pub fn revoked_keys(&self) -> &BTreeMap<String, RevokedKey> {
        &self.revoked_keys
    }

    /// Lifts the revocation of a key from a pre-identity log (and of the identity that
    /// holds it).
    pub fn unrevoke_key(&mut self, key: &str) -> Result<(), StoreError> {
        let mut changes = vec![Change::DeleteRevokedKey(key.to_owned())];
        if let Some(owner) = self.key_owner.get(key) {
            if let Some(rec) = self.identities.get(owner) {
                let mut rec = rec.clone();
                rec.revoked_at = None;
                changes.push(Change::Identity(owner.clone(), rec));
            }
        }
        self.commit(changes)
    }

    /// The stored policy.
    pub fn policy(&self) -> Option<&StoredPolicy> {
        self.policy.as_ref()
    }

    /// Records the policy in force.
    pub fn set_policy(&mut self, policy: StoredPolicy) -> Result<(), StoreError> {
        self.commit(vec![Change::Policy(policy)])
    }

    /// Records the policy in force if the stored one still has revision `expected`
    /// (`None`: none stored); otherwise fails with a conflict and changes nothing.
    pub fn replace_policy(
        &mut self,
        policy: StoredPolicy,
        expected: Option<u64>,
    ) -> Result<(), StoreError> {
        self.commit(vec![Change::ReplacePolicy(policy, expected)])
    }

    /// Deletes the tokens that expired at or before `now_secs`.
    pub fn prune_tokens(&mut self, now_secs: u64) -> Result<(), StoreError> {
        if self.tokens.values().any(|t| t.expires_at <= now_secs) {
            self.commit(vec![Change::PruneTokens(now_secs)])?;
        }
        Ok(())
    }

    /// Writes `changes` in one transaction, then applies them in memory; on a failed
    /// commit nothing changes.
    fn commit(&mut self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        if let Some(engine) = self.engine.as_mut() {
            if let Some(id) = storage::commit(engine.as_mut(), &changes)? {
                // Other coordinators' entries committed before ours are applied first, so
                // memory follows the log's order; the caller acts on them before its own
                // change (their events get their own, lower ids).
                // The change is durable whatever happens here: a failed read leaves those
                // entries to the next catch-up.
                match self.read_log(Some(id), usize::MAX) {
                    Ok(remote) => {
                        self.remote.extend(remote);
                        self.last_change = self.last_change.max(id);
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the change log after a commit"),
                }
                self.last_own = Some(id);
            }
        }
        for c in changes {
            self.apply_change(c);
        }
        Ok(())
    }

    fn apply_change(&mut self, c: Change) {
        match c {
            Change::Token(hash, t) | Change::SpendToken(hash, t) => {
                self.tokens.insert(hash, t);
            }
            Change::DeleteToken(hash) => {
                self.tokens.remove(&hash);
            }
            Change::PruneTokens(now) => self.tokens.retain(|_, t| t.expires_at > now),
            Change::Identity(identity, record) => self.apply_identity(identity, record),
            Change::RevokedKey(key, r) => {
                self.revoked_keys.insert(key, r);
            }
            Change::DeleteRevokedKey(key) => {
                self.revoked_keys.remove(&key);
            }
            Change::Policy(p) | Change::ReplacePolicy(p, _) => self.policy = Some(p),
            // Members live in the registry; the coordinator applies them there.
            Change::Meta(..)
            | Change::Member(_)
            | Change::RemoveMember(..)
            | Change::StaleMember(..)
            | Change::ExpireMember(..)
            | Change::Client(_)
            | Change::RemoveClient(_) => {}
        }
    }

    fn apply(&mut self, r: Record) {
        match r {
            Record::Token { hash, token } => {
                self.tokens.insert(hash, token);
            }
            Record::TokenUse { hash } => {
                if let Some(t) = self.tokens.get_mut(&hash) {
                    t.uses = t.uses.saturating_add(1);
                }
            }
            Record::TokenDelete { hash } => {
                self.tokens.remove(&hash);
            }
            Record::Identity { identity, record } => self.apply_identity(identity, record),
            Record::Admit { key, admission } => {
                let mut rec = self.identities.get(&admission.identity).cloned();
                let rec = rec.get_or_insert_with(IdentityRecord::default);
                rec.display_name = admission.display_name;
                rec.tags = admission.tags;
                if rec.key.as_ref() != Some(&key) {
                    rec.set_key(Some(key), 0);
                }
                let rec = rec.clone();
                self.apply_identity(admission.identity, rec);
            }
            Record::Unadmit { key } => {
                if let Some(owner) = self.key_owner.get(&key).cloned() {
                    if let Some(mut rec) = self.identities.get(&owner).cloned() {
                        if rec.key.as_ref() == Some(&key) {
                            rec.set_key(None, rec.key_since);
                            self.apply_identity(owner, rec);
                        }
                    }
                }
            }
            Record::Revoke { key, peer_id, at } => match self.key_owner.get(&key).cloned() {
                Some(owner) => {
                    if let Some(mut rec) = self.identities.get(&owner).cloned() {
                        rec.revoked_at = Some(at);
                        self.apply_identity(owner, rec);
                    }
                }
                None => {
                    self.revoked_keys.insert(key, RevokedKey { peer_id, at });
                }
            },
            Record::Unrevoke { key } => {
                self.revoked_keys.remove(&key);
                if let Some(owner) = self.key_owner.get(&key).cloned() {
                    if let Some(mut rec) = self.identities.get(&owner).cloned() {
                        rec.revoked_at = None;
                        self.apply_identity(owner, rec);
                    }
                }
            }
            Record::Policy { policy } => self.policy = Some(policy),
        }
    }

    /// Installs `record`, keeping the key index in step. A key another identity holds
    /// is not moved (replaying a log written by a buggy or tampered coordinator must not
    /// hand a key over); `put_identity` refuses such records before they are written.
    fn apply_identity(&mut self, identity: String, mut record: IdentityRecord) {
        let foreign = |k: &String| self.key_owner.get(k).is_some_and(|o| o != &identity);
        if record.key.as_ref().is_some_and(foreign) {
            record.key = None;
        }
        record.past_keys.retain(|k| !foreign(k));
        for k in record.key.iter().chain(&record.past_keys) {
            self.key_owner.insert(k.clone(), identity.clone());
        }
        self.identities.insert(identity, record);
    }
}

/// Imports `dir/state.log` into `engine` if it is there (see the module docs); `true` if
/// anything was written.
fn import_log(
    engine: &mut dyn Engine,
    current: &Snapshot,
    dir: &Path,
    now_secs: u64,
) -> Result<bool, StoreError> {
    let path = dir.join(LOG_FILE);
    let backup = dir.join(IMPORTED_LOG_FILE);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    let lines: Vec<String> = match File::open(&path) {
        Ok(f) => BufReader::new(f)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(io(&path))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(&path)(e)),
    };
    let wrote = if current.meta.contains_key(storage::META_LOG_IMPORTED) {
        // Imported before; the rename did not happen (a crash right after the commit).
        tracing::warn!(path = %path.display(), "state.log was already imported; renaming it");
        false
    } else {
        let empty = current.tokens.is_empty()
            && current.identities.is_empty()
            && current.revoked_keys.is_empty()
            && current.policy.is_none();
        if !empty {
            return Err(StoreError::ImportConflict { path });
        }
        let log = Store::replay(&lines).map_err(|(line, reason)| StoreError::Corrupt {
            path: path.clone(),
            line,
            reason,
        })?;
        let mut changes = log.changes();
        let n = changes.len();
        changes.push(Change::Meta(
            storage::META_LOG_IMPORTED.into(),
            now_secs.to_string(),
        ));
        storage::commit(engine, &changes)?;
        tracing::info!(path = %path.display(), records = n, engine = engine.name(), "imported state.log");
        true
    };
    if backup.exists() {
        tracing::warn!(path = %path.display(), backup = %backup.display(), "not renaming state.log: the backup name is taken");
        return Ok(wrote);
    }
    fs::rename(&path, &backup).map_err(io(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(wrote)
}

/// Dashboard links and sessions in the database ([`storage::dashboard`]), for every
/// coordinator on it. A store without a database refuses (the coordinator keeps them in
/// memory then: [`crate::sessions::Memory`]).
impl crate::sessions::Backend for Store {
    fn put_link(&mut self, hash: &str, admin: &str, expires_ms: u64) -> Result<(), StoreError> {
        let e = self.dashboard_engine()?;
        Ok(storage::dashboard::put_link(e, hash, admin, expires_ms)?)
    }

    fn take_link(&mut self, hash: &str) -> Result<Option<(String, u64)>, StoreError> {
        let e = self.dashboard_engine()?;
        Ok(storage::dashboard::take_link(e, hash)?)
    }

    fn put_session(
        &mut self,
        hash: &str,
        session: &crate::sessions::Session,
    ) -> Result<(), StoreError> {
        let e = self.dashboard_engine()?;
        Ok(storage::dashboard::put_session(
            e,
            hash,
            &session.admin,
            &session.csrf,
            session.expires_ms,
        )?)
    }

    fn session(&mut self, hash: &str) -> Result<Option<crate::sessions::Session>, StoreError> {
        let e = self.dashboard_engine()?;
        Ok(
            storage::dashboard::session(e, hash)?.map(|(admin, csrf, expires_ms)| {
                crate::sessions::Session {
                    admin,
                    csrf,
                    expires_ms,
                }
            }),
        )
    }

    fn delete_session(&mut self, hash: &str) -> Result<bool, StoreError> {
        let e = self.dashboard_engine()?;
        Ok(storage::dashboard::delete_session(e, hash)?)
    }

    fn sweep(&mut self, now_ms: u64) -> Result<(), StoreError> {
        let e = self.dashboard_engine()?;
        Ok(storage::dashboard::sweep(
            e,
            now_ms,
            crate::sessions::MAX_LINKS,
            crate::sessions::MAX_SESSIONS,
        )?)
    }

    fn counts(&mut self) -> Result<(usize, usize), StoreError> {
        let e = self.dashboard_engine()?;
        Ok(storage::dashboard::counts(e)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Statement, Value};

    /// An engine that commits nothing and fails every transaction.
    #[derive(Debug)]
    struct Refusing;

    impl Engine for Refusing {
        fn name(&self) -> &'static str {
            "refusing"
        }
        fn transaction(&mut self, _: &[Statement]) -> Result<(), StorageError> {
            Err(StorageError::Engine {
                engine: "refusing",
                message: "disk full".into(),
            })
        }
        fn query(&mut self, _: &str, _: &[Value]) -> Result<Vec<Vec<Value>>, StorageError> {
            Ok(Vec::new())
        }
    }

    /// A change the database refuses is not applied and not acknowledged.
    #[test]
    fn a_refused_commit_changes_nothing() {
        let mut s = Store::in_memory();
        s.put_token("h1".into(), token()).unwrap();
        s.engine = Some(Box::new(Refusing));
        assert!(s.put_token("h2".into(), token()).is_err());
        assert!(s.use_token("h1").is_err());
        assert!(s.put_identity("n", ident("K")).is_err());
        assert!(s.admit("n", ident("K"), Some("h1")).is_err());
        assert!(s.token("h2").is_none());
        assert_eq!(s.token("h1").unwrap().uses, 0);
        assert!(s.identity("n").is_none() && s.owner_of_key("K").is_none());
    }

    fn token() -> TokenRecord {
        TokenRecord {
            tags: vec!["node".into()],
            name: None,
            expires_at: 100,
            max_uses: 1,
            uses: 0,
            identity: None,
            created_at: 0,
        }
    }

    fn ident(key: &str) -> IdentityRecord {
        IdentityRecord {
            key: Some(key.into()),
            key_since: 5,
            display_name: "n".into(),
            tags: vec!["node".into()],
            ..IdentityRecord::default()
        }
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), 1).unwrap();
            assert_eq!(s.engine_name(), "sqlite");
            s.put_token("h1".into(), token()).unwrap();
            s.use_token("h1").unwrap();
            s.put_token("h2".into(), token()).unwrap();
            s.delete_token("h2").unwrap();
            let mut rec = ident("K1");
            rec.set_key(Some("K2".into()), 9);
            rec.revoked_at = Some(11);
            s.put_identity("n1", rec).unwrap();
            s.set_policy(StoredPolicy {
                revision: 7,
                file_hash: "f".into(),
                document: PolicyDocument::default(),
            })
            .unwrap();
        }
        let mode = fs::metadata(storage::sqlite_path(dir.path()))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
            .unwrap();
        assert_eq!(mode & 0o077, 0, "state.db is private: {mode:o}");
        let mut s = Store::open(dir.path(), 2).unwrap();
        assert_eq!(s.token("h1").unwrap().uses, 1);
        assert!(s.token("h2").is_none());
        let rec = s.identity("n1").unwrap();
        assert_eq!(rec.key.as_deref(), Some("K2"));
        assert_eq!(rec.past_keys, vec!["K1".to_string()]);
        assert_eq!(rec.revoked_at, Some(11));
        assert_eq!(s.owner_of_key("K1"), Some("n1"));
        assert_eq!(s.policy().unwrap().revision, 7);
        // Expired tokens are deleted from the database too.
        s.prune_tokens(100).unwrap();
        drop(s);
        assert!(Store::open(dir.path(), 3).unwrap().token("h1").is_none());
    }

    #[test]
    fn a_key_is_never_bound_to_a_second_identity() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), 1).unwrap();
        s.put_identity("owner", ident("K")).unwrap();
        assert!(matches!(
            s.put_identity("mallory", ident("K")),
            Err(StoreError::KeyBound { .. })
        ));
        let mut retired = ident("K2");
        retired.past_keys = vec!["K".into()];
        assert!(s.put_identity("mallory", retired).is_err());
        assert!(s.identity("mallory").is_none());
        // A record that drops a key the identity held does not free the key.
        let mut fresh = ident("K3");
        fresh.past_keys.clear();
        s.put_identity("owner", fresh).unwrap();
        drop(s);
        let mut s = Store::open(dir.path(), 2).unwrap();
        assert_eq!(s.owner_of_key("K"), Some("owner"));
        assert!(s.put_identity("mallory", ident("K")).is_err());
        // The database refuses on its own, whatever the memory says.
        s.key_owner.remove("K");
        assert!(matches!(
            s.put_identity("mallory", ident("K")),
            Err(StoreError::Storage(_))
        ));
        assert!(s.identity("mallory").is_none());
        // Even a log that says otherwise (tampered, or written by a buggy coordinator)
        // does not move the key.
        let lines = [
            r#"{"t":"identity","identity":"owner","record":{"key":"K","display_name":"o","tags":[]}}"#,
            r#"{"t":"identity","identity":"mallory","record":{"key":"K","display_name":"m","tags":[]}}"#,
        ];
        let s = Store::replay(&lines).unwrap();
        assert_eq!(s.owner_of_key("K"), Some("owner"));
        assert_eq!(s.identity("mallory").unwrap().key, None);
    }

    #[test]
    fn per_key_logs_migrate_to_identity_records() {
        // A log written when admissions and revocations were per WireGuard key.
        let lines = [
            r#"{"t":"admit","key":"KA","admission":{"identity":"a","display_name":"A","tags":["node"]}}"#,
            r#"{"t":"admit","key":"KB","admission":{"identity":"b","display_name":"b","tags":[]}}"#,
            r#"{"t":"admit","key":"KB2","admission":{"identity":"b","display_name":"b","tags":["ops"]}}"#,
            r#"{"t":"admit","key":"KC","admission":{"identity":"c","display_name":"c","tags":[]}}"#,
            r#"{"t":"unadmit","key":"KC"}"#,
            r#"{"t":"revoke","key":"KC","peer_id":"pc","at":7}"#,
            r#"{"t":"revoke","key":"KX","peer_id":"px","at":8}"#,
            r#"{"t":"token","hash":"h","token":{"tags":[],"name":null,"expires_at":100,"max_uses":0,"uses":0}}"#,
        ];
        let s = Store::replay(&lines).unwrap();
        let a = s.identity("a").unwrap();
        assert_eq!((a.key.as_deref(), a.key_since), (Some("KA"), 0));
        assert_eq!(
            (a.display_name.as_str(), &a.tags[..]),
            ("A", &["node".to_string()][..])
        );
        let b = s.identity("b").unwrap();
        assert_eq!(b.key.as_deref(), Some("KB2"));
        assert_eq!(b.past_keys, vec!["KB".to_string()]);
        assert_eq!(b.tags, vec!["ops".to_string()]);
        // c's key was revoked: the identity is revoked, and the key stays c's.
        let c = s.identity("c").unwrap();
        assert_eq!((c.key.as_deref(), c.revoked_at), (None, Some(7)));
        assert_eq!(s.owner_of_key("KC"), Some("c"));
        // A revoked key whose identity the log no longer knows stays refused on its own.
        assert!(s.is_key_revoked("KX"));
        assert!(s.token("h").unwrap().identity.is_none());

        // Imported into the database, it reads back the same, and the log is kept aside.
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOG_FILE), lines.join("\n")).unwrap();
        drop(Store::open(dir.path(), 1).unwrap());
        assert!(!dir.path().join(LOG_FILE).exists());
        assert!(dir.path().join(IMPORTED_LOG_FILE).exists());
        let mut again = Store::open(dir.path(), 2).unwrap();
        assert_eq!(again.identities(), s.identities());
        assert!(again.is_key_revoked("KX"));
        again.unrevoke_key("KC").unwrap();
        again.unrevoke_key("KX").unwrap();
        drop(again);
        let again = Store::open(dir.path(), 3).unwrap();
        assert!(!again.is_key_revoked("KX"));
        assert_eq!(again.identity("c").unwrap().revoked_at, None);
    }

    #[test]
    fn torn_last_line_is_imported_without_it_and_corruption_elsewhere_refuses() {
        let good = r#"{"t":"token","hash":"h1","token":{"tags":[],"name":null,"expires_at":100,"max_uses":1,"uses":0}}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        fs::write(&path, format!("{good}\n{{\"t\":\"token_use\",\"ha")).unwrap();
        let s = Store::open(dir.path(), 1).unwrap();
        assert_eq!(s.token("h1").unwrap().uses, 0);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        fs::write(&path, format!("garbage\n{good}\n")).unwrap();
        assert!(matches!(
            Store::open(dir.path(), 1),
            Err(StoreError::Corrupt { line: 1, .. })
        ));
        // Nothing imported, the log left where it was.
        assert!(path.exists());
        fs::remove_file(&path).unwrap();
        assert!(Store::open(dir.path(), 1).unwrap().token("h1").is_none());
    }

    /// A crash between the import's commit and the rename: the next start renames the
    /// log and does not import it a second time (which would undo later changes).
    #[test]
    fn an_interrupted_import_is_finished_not_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let log = r#"{"t":"token","hash":"h1","token":{"tags":[],"name":null,"expires_at":100,"max_uses":2,"uses":0}}"#;
        fs::write(dir.path().join(LOG_FILE), log).unwrap();
        let mut s = Store::open(dir.path(), 1).unwrap();
        s.use_token("h1").unwrap();
        drop(s);
        // Put the log back as if the rename never happened.
        fs::rename(
            dir.path().join(IMPORTED_LOG_FILE),
            dir.path().join(LOG_FILE),
        )
        .unwrap();
        let s = Store::open(dir.path(), 2).unwrap();
        assert_eq!(s.token("h1").unwrap().uses, 1);
        assert!(dir.path().join(IMPORTED_LOG_FILE).exists());
        assert!(!dir.path().join(LOG_FILE).exists());
        drop(s);
        // A log beside a database that holds other state is refused, not merged.
        let dir2 = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir2.path(), 1).unwrap();
            s.put_token("other".into(), token()).unwrap();
        }
        fs::write(dir2.path().join(LOG_FILE), log).unwrap();
        assert!(matches!(
            Store::open(dir2.path(), 2),
            Err(StoreError::ImportConflict { .. })
        ));
    }
}
