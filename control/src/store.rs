//! The durable state under `--state-dir`: join tokens (hashes only), one record per
//! identity (its admitted WireGuard key, retired keys, granted tags and name, revocation)
//! and the current policy. Rosters are not stored: addresses are derived from identities
//! and peers re-register after a restart.
//!
//! Invariant: a WireGuard key belongs to at most one identity, for good: once admitted
//! for an identity, a key stays bound to it (as its current key or a retired one) even
//! after rotation, clearing or revocation.
//!
//! Migration: logs written when admissions were per key (`admit`/`unadmit`/`revoke`/
//! `unrevoke` records keyed by the WireGuard key) replay into identity records: an
//! admission becomes its identity's current key, a revocation revokes the identity that
//! held the key (a revoked key whose identity the log no longer names stays refused on
//! its own). The first compaction rewrites the log in the identity form.
//!
//! Format: `state.log`, one JSON record per line, appended and `fdatasync`ed before a
//! change is acknowledged. On open the log is replayed and rewritten compactly (temp
//! file, fsync, rename, fsync of the directory), and it is compacted the same way when
//! it grows well past its live size. A torn last line (a crash mid-append) is ignored; a
//! corrupt line elsewhere refuses to open. An append that fails (a short write, a full
//! disk, a failed fsync) is cut back to the log's last good length and the change is
//! refused, so a torn record never sits mid-log; if even that cut fails, the store refuses
//! every further change until a restart (whose open drops the torn last line). Open stays
//! strict: a bad line followed by good ones is not provably the residue of a failed write. Why not an embedded database: this state is
//! small (kilobytes to a few megabytes), written rarely, and a line log is crash-safe with
//! one fsync per change, readable with `cat`, and adds no dependency.
//!
//! Token secrets never reach this file: only their SHA-256 is recorded.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::PolicyDocument;

/// Name of the log file inside the state directory.
pub const LOG_FILE: &str = "state.log";

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the log failed.
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
    /// A record in the middle of the log does not parse.
    #[error("state store {path}: line {line} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        reason: String,
    },
}

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedKey {
    /// The peer id it had.
    pub peer_id: String,
    /// When, Unix seconds.
    pub at: u64,
}

/// The store: in-memory view plus the log it is mirrored to (none without a state dir).
#[derive(Debug)]
pub struct Store {
    path: Option<PathBuf>,
    file: Option<File>,
    lines: usize,
    tokens: HashMap<String, TokenRecord>,
    identities: BTreeMap<String, IdentityRecord>,
    /// Every key any identity holds or held → that identity.
    key_owner: HashMap<String, String>,
    revoked_keys: BTreeMap<String, RevokedKey>,
    policy: Option<StoredPolicy>,
}

impl Store {
    /// A store that keeps everything in memory only.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            file: None,
            lines: 0,
            tokens: HashMap::new(),
            identities: BTreeMap::new(),
            key_owner: HashMap::new(),
            revoked_keys: BTreeMap::new(),
            policy: None,
        }
    }

    /// Opens (or creates) the store in `dir`, replays it, and compacts it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(LOG_FILE);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let mut store = match File::open(&path) {
            Ok(f) => {
                let lines: Vec<String> = BufReader::new(f)
                    .lines()
                    .collect::<Result<_, _>>()
                    .map_err(io)?;
                Self::replay(&lines).map_err(|(line, reason)| StoreError::Corrupt {
                    path: path.clone(),
                    line,
                    reason,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::in_memory(),
            Err(e) => return Err(io(e)),
        };
        store.path = Some(path);
        store.compact()?;
        Ok(store)
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
        self.append(Record::Token { hash, token })
    }

    /// Counts one use of a token.
    pub fn use_token(&mut self, hash: &str) -> Result<(), StoreError> {
        self.append(Record::TokenUse {
            hash: hash.to_owned(),
        })
    }

    /// Every token, by hash.
    pub fn tokens(&self) -> impl Iterator<Item = (&String, &TokenRecord)> {
        self.tokens.iter()
    }

    /// Deletes a token (it can no longer be used).
    pub fn delete_token(&mut self, hash: &str) -> Result<(), StoreError> {
        self.append(Record::TokenDelete {
            hash: hash.to_owned(),
        })
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
        if self.identities.get(identity) == Some(&record) {
            return Ok(());
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
        self.append(Record::Identity {
            identity: identity.to_owned(),
            record,
        })
    }

    /// Whether `key` (base64) was revoked by a pre-identity log without a known identity.
    pub fn is_key_revoked(&self, key: &str) -> bool {
        self.revoked_keys.contains_key(key)
    }

    /// Keys revoked by a pre-identity log without a known identity.
    pub fn revoked_keys(&self) -> &BTreeMap<String, RevokedKey> {
        &self.revoked_keys
    }

    /// Lifts the revocation of a key from a pre-identity log.
    pub fn unrevoke_key(&mut self, key: &str) -> Result<(), StoreError> {
        self.append(Record::Unrevoke {
            key: key.to_owned(),
        })
    }

    /// The stored policy.
    pub fn policy(&self) -> Option<&StoredPolicy> {
        self.policy.as_ref()
    }

    /// Records the policy in force.
    pub fn set_policy(&mut self, policy: StoredPolicy) -> Result<(), StoreError> {
        self.append(Record::Policy { policy })
    }

    /// Drops tokens that expired before `now_secs` (done at compaction).
    pub fn prune_tokens(&mut self, now_secs: u64) {
        self.tokens.retain(|_, t| t.expires_at > now_secs);
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

    fn live_records(&self) -> usize {
        self.tokens.len() + self.identities.len() + self.revoked_keys.len() + 1
    }

    fn append(&mut self, r: Record) -> Result<(), StoreError> {
        if let Some(path) = &self.path {
            let io = |source| StoreError::Io {
                path: path.clone(),
                source,
            };
            // None after a failed write whose undo failed too: the log's end is unknown.
            let Some(file) = self.file.as_mut() else {
                return Err(io(std::io::Error::other(
                    "the log could not be repaired after a failed write; restart the coordinator",
                )));
            };
            let mut line = serde_json::to_vec(&r).map_err(|e| io(e.into()))?;
            line.push(b'\n');
            let good = file.metadata().map_err(io)?.len();
            if let Err(e) = write_line(file, &line) {
                // A partial record would glue onto the next one and leave a corrupt line
                // mid-log: cut the file back to its last good length. The change is not
                // acknowledged either way.
                if let Err(undo) = file.set_len(good).and_then(|()| file.sync_data()) {
                    tracing::error!(path = %path.display(), error = %undo, "state log: a failed append could not be undone; refusing further changes");
                    self.file = None;
                }
                return Err(io(e));
            }
            self.lines += 1;
        }
        self.apply(r);
        if self.path.is_some() && self.lines > 4 * self.live_records() + 1024 {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the log as one record per live item, atomically.
    fn compact(&mut self) -> Result<(), StoreError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut records = Vec::with_capacity(self.live_records());
        if let Some(p) = &self.policy {
            records.push(Record::Policy { policy: p.clone() });
        }
        for (hash, token) in &self.tokens {
            records.push(Record::Token {
                hash: hash.clone(),
                token: token.clone(),
            });
        }
        for (identity, record) in &self.identities {
            records.push(Record::Identity {
                identity: identity.clone(),
                record: record.clone(),
            });
        }
        for (key, r) in &self.revoked_keys {
            records.push(Record::Revoke {
                key: key.clone(),
                peer_id: r.peer_id.clone(),
                at: r.at,
            });
        }
        let mut buf = Vec::new();
        for r in &records {
            serde_json::to_writer(&mut buf, r).map_err(|e| io(e.into()))?;
            buf.push(b'\n');
        }
        let tmp = path.with_extension("log.tmp");
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&buf).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &path).map_err(io)?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        self.file = Some(
            OpenOptions::new()
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?,
        );
        self.lines = records.len();
        Ok(())
    }
}

/// Writes one record line and makes it durable.
fn write_line(file: &mut File, line: &[u8]) -> std::io::Result<()> {
    #[cfg(test)]
    if let Some(n) = tests::FAIL_WRITE_AFTER.with(|f| f.take()) {
        // Fault injection: a short write, as a full disk or an I/O error leaves it.
        file.write_all(&line[..n.min(line.len())])?;
        return Err(std::io::Error::other("injected write failure"));
    }
    file.write_all(line)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Makes the next append write this many bytes and fail.
        pub(super) static FAIL_WRITE_AFTER: std::cell::Cell<Option<usize>> =
            const { std::cell::Cell::new(None) };
    }

    /// Issue 11, "a failed append leaves a torn line mid-log and the coordinator then
    /// refuses to start": the partial record is cut off, later appends land on a clean
    /// line, and the store opens again with every acknowledged change and nothing else.
    #[test]
    fn a_failed_append_leaves_no_torn_line_and_the_store_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path()).unwrap();
            s.put_token("h1".into(), token()).unwrap();
            FAIL_WRITE_AFTER.with(|f| f.set(Some(17)));
            assert!(s.put_token("h2".into(), token()).is_err());
            assert!(s.token("h2").is_none(), "a failed change is not applied");
            s.put_token("h3".into(), token()).unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
        assert!(!text.contains("h2"), "{text}");
        let s = Store::open(dir.path()).unwrap();
        assert!(s.token("h1").is_some());
        assert!(s.token("h2").is_none());
        assert!(s.token("h3").is_some());
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
    fn survives_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path()).unwrap();
            s.put_token("h1".into(), token()).unwrap();
            s.use_token("h1").unwrap();
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
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.token("h1").unwrap().uses, 1);
        let rec = s.identity("n1").unwrap();
        assert_eq!(rec.key.as_deref(), Some("K2"));
        assert_eq!(rec.past_keys, vec!["K1".to_string()]);
        assert_eq!(rec.revoked_at, Some(11));
        assert_eq!(s.owner_of_key("K1"), Some("n1"));
        assert_eq!(s.policy().unwrap().revision, 7);
    }

    #[test]
    fn a_key_is_never_bound_to_a_second_identity() {
        let mut s = Store::in_memory();
        s.put_identity("owner", ident("K")).unwrap();
        assert!(matches!(
            s.put_identity("mallory", ident("K")),
            Err(StoreError::KeyBound { .. })
        ));
        let mut retired = ident("K2");
        retired.past_keys = vec!["K".into()];
        assert!(s.put_identity("mallory", retired).is_err());
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

        // After a compaction the log is in the identity form and replays the same.
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOG_FILE), lines.join("\n")).unwrap();
        drop(Store::open(dir.path()).unwrap());
        let text = fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
        assert!(!text.contains("\"admit\""), "{text}");
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.identities(), s.identities());
        assert!(again.is_key_revoked("KX"));
    }

    #[test]
    fn torn_last_line_is_ignored_and_corruption_elsewhere_is_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path()).unwrap();
            s.put_token("h1".into(), token()).unwrap();
        }
        let path = dir.path().join(LOG_FILE);
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{\"t\":\"token_use\",\"ha");
        fs::write(&path, &text).unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.token("h1").unwrap().uses, 0);
        drop(s);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, format!("garbage\n{text}")).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Corrupt { line: 1, .. })
        ));
    }
}
