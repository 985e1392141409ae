//! The durable state under `--state-dir`: join tokens (hashes only), admitted keys,
//! revocations and the current policy. Rosters are not stored: addresses are derived and
//! peers re-register after a restart.
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
    /// Allowed admissions (0 = unlimited).
    pub max_uses: u32,
    /// Admissions so far.
    pub uses: u32,
}

/// A key that was admitted with a valid token: it may re-register without one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// The identity (certificate CN) it was admitted under.
    pub identity: String,
    /// The display name granted.
    pub display_name: String,
    /// The tags granted.
    pub tags: Vec<String>,
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
    Admit {
        key: String,
        admission: Admission,
    },
    Unadmit {
        key: String,
    },
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

/// A revocation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    /// The revoked peer id.
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
    admitted: HashMap<String, Admission>,
    revoked: BTreeMap<String, RevocationRecord>,
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
            admitted: HashMap::new(),
            revoked: BTreeMap::new(),
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

    /// The admission of `key` (base64), if any.
    pub fn admission(&self, key: &str) -> Option<&Admission> {
        self.admitted.get(key)
    }

    /// Records that `key` was admitted.
    pub fn admit(&mut self, key: &str, admission: Admission) -> Result<(), StoreError> {
        if self.admitted.get(key) == Some(&admission) {
            return Ok(());
        }
        self.append(Record::Admit {
            key: key.to_owned(),
            admission,
        })
    }

    /// The admitted key (base64) whose derived peer id is `peer_id`.
    pub fn admitted_key_of(&self, peer_id: &str) -> Option<String> {
        use base64::Engine;
        self.admitted.keys().find_map(|k| {
            let bytes = base64::engine::general_purpose::STANDARD.decode(k).ok()?;
            let key = <[u8; 32]>::try_from(bytes.as_slice()).ok()?;
            (crate::ula::peer_id(&key) == peer_id).then(|| k.clone())
        })
    }

    /// Whether `key` (base64) is revoked.
    pub fn is_revoked(&self, key: &str) -> bool {
        self.revoked.contains_key(key)
    }

    /// Revocations by key.
    pub fn revocations(&self) -> &BTreeMap<String, RevocationRecord> {
        &self.revoked
    }

    /// Revokes `key` and forgets its admission.
    pub fn revoke(&mut self, key: &str, peer_id: &str, at: u64) -> Result<(), StoreError> {
        self.append(Record::Unadmit {
            key: key.to_owned(),
        })?;
        self.append(Record::Revoke {
            key: key.to_owned(),
            peer_id: peer_id.to_owned(),
            at,
        })
    }

    /// Lifts the revocation of `key`; it needs a new join token to come back.
    pub fn unrevoke(&mut self, key: &str) -> Result<(), StoreError> {
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
            Record::Admit { key, admission } => {
                self.admitted.insert(key, admission);
            }
            Record::Unadmit { key } => {
                self.admitted.remove(&key);
            }
            Record::Revoke { key, peer_id, at } => {
                self.revoked.insert(key, RevocationRecord { peer_id, at });
            }
            Record::Unrevoke { key } => {
                self.revoked.remove(&key);
            }
            Record::Policy { policy } => self.policy = Some(policy),
        }
    }

    fn live_records(&self) -> usize {
        self.tokens.len() + self.admitted.len() + self.revoked.len() + 1
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
        for (key, admission) in &self.admitted {
            records.push(Record::Admit {
                key: key.clone(),
                admission: admission.clone(),
            });
        }
        for (key, r) in &self.revoked {
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
        }
    }

    #[test]
    fn survives_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path()).unwrap();
            s.put_token("h1".into(), token()).unwrap();
            s.use_token("h1").unwrap();
            s.revoke("KEY", "pid", 5).unwrap();
            s.set_policy(StoredPolicy {
                revision: 7,
                file_hash: "f".into(),
                document: PolicyDocument::default(),
            })
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.token("h1").unwrap().uses, 1);
        assert!(s.is_revoked("KEY"));
        assert_eq!(s.policy().unwrap().revision, 7);
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
