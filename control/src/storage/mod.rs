//! The coordinator's durable storage: one interface ([`Engine`]) over two database
//! engines, SQLite ([`sqlite`], the default, a file under `--state-dir`) and PostgreSQL
//! ([`postgres`], `--database postgres://…`).
//!
//! What it owns: the rows behind [`crate::store::Store`] — join tokens (hashes only),
//! identities with every key they hold or held, keys revoked by pre-identity logs, the
//! policy in force, the members with the apps they hold ([`crate::members`]), and a few
//! facts about the database itself (`meta`: when a `state.log` was imported). The schema is in [`migrate`]; every statement the coordinator runs is
//! built here, once, in the SQL both engines speak, so the engines only bind values and
//! run transactions.
//!
//! Invariants:
//! * [`Engine::commit`] applies a batch of [`Change`]s in one transaction and returns only
//!   once it is durable (SQLite: WAL with `synchronous=FULL`; PostgreSQL: a committed
//!   transaction with the server's `synchronous_commit`); a failed commit changes nothing.
//!   The store applies a change to its in-memory view only after the commit returned, so
//!   a change is durable before any request that made it is acknowledged.
//! * A WireGuard key is the primary key of `identity_keys`, and its rows are only ever
//!   added: the database itself refuses to bind a key to a second identity (the upsert
//!   changes no row and the transaction fails with [`StorageError::Conflict`]), whatever
//!   the coordinator's memory says, and a stale record never unbinds a key.
//! * Spending a token is a compare-and-set on its use count, so coordinators sharing a
//!   database cannot both spend its last use.
//! * With a change log (PostgreSQL), each transaction also appends its changes as one
//!   row, under a transaction-level advisory lock so that log ids follow commit order.
//! * Integers are stored as signed 64-bit; a value above `i64::MAX` is refused, never
//!   wrapped.

pub mod migrate;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::members::MemberRow;
use crate::store::{IdentityRecord, RevokedKey, StoredPolicy, TokenRecord};

/// Name of the SQLite database file inside `--state-dir`.
pub const SQLITE_FILE: &str = "state.db";
/// The environment variable naming the database when `--database` is absent.
pub const DATABASE_URL_ENV: &str = "TABBIFY_DATABASE_URL";
/// The `meta` row naming the database's event log (`x-tabbify-event-log`).
pub const META_EVENT_LOG: &str = "event_log";
/// The `meta` row recording that a `state.log` was imported (value: Unix seconds).
pub const META_LOG_IMPORTED: &str = "state_log_imported";

/// Where the durable state lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite database `state.db` in this directory.
    Sqlite(PathBuf),
    /// A PostgreSQL connection string (`postgres://…` or `key=value` form).
    Postgres(String),
}

impl fmt::Debug for Database {
    // The connection string may carry a password: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(dir) => f.debug_tuple("Sqlite").field(dir).finish(),
            Self::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

impl Database {
    /// The database a `--database` value (or [`DATABASE_URL_ENV`]) names; `None` for an
    /// empty one. Only PostgreSQL URLs are accepted here: SQLite is chosen by
    /// `--state-dir` alone.
    pub fn from_url(url: &str) -> Result<Option<Self>, StorageError> {
        let url = url.trim();
        if url.is_empty() {
            return Ok(None);
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Some(Self::Postgres(url.to_owned())));
        }
        Err(StorageError::Config(
            "--database must be a postgres:// or postgresql:// URL (SQLite needs only --state-dir)"
                .into(),
        ))
    }

    /// Opens the engine and brings its schema up to date (`now_secs` is recorded with
    /// each migration applied).
    pub fn open(&self, now_secs: u64) -> Result<Box<dyn Engine + Sync>, StorageError> {
        match self {
            Self::Sqlite(dir) => Ok(Box::new(sqlite::Sqlite::open(dir, now_secs)?)),
            Self::Postgres(url) => Ok(Box::new(postgres::Postgres::connect(url, now_secs)?)),
        }
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The configuration names no usable database.
    #[error("{0}")]
    Config(String),
    /// The engine refused or failed a statement, or the connection broke.
    #[error("{engine}: {message}")]
    Engine {
        /// `sqlite` or `postgres`.
        engine: &'static str,
        /// What failed (never the connection string).
        message: String,
    },
    /// The database holds something this coordinator cannot read.
    #[error("{engine}: {message}")]
    Corrupt {
        /// `sqlite` or `postgres`.
        engine: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A compare-and-set lost: another coordinator changed the row first; nothing of the
    /// transaction was applied.
    #[error("{engine}: {message}")]
    Conflict {
        /// `sqlite` or `postgres`.
        engine: &'static str,
        /// What conflicted.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A value bound to or read from a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A 64-bit integer (`BIGINT`).
    Int(i64),
    /// Text.
    Text(String),
    /// SQL NULL in an integer column.
    NullInt,
    /// SQL NULL in a text column.
    NullText,
}

/// One statement with its parameters, written with `?1`, `?2`, … placeholders.
#[derive(Debug, Clone)]
pub struct Statement {
    /// The SQL.
    pub sql: &'static str,
    /// The parameters, in placeholder order.
    pub params: Vec<Value>,
    /// The statement must change at least one row, else the transaction fails with
    /// [`StorageError::Conflict`] (a compare-and-set that lost to another writer).
    pub must_change: bool,
}

/// One durable fact to write; a batch of them is one transaction (and, on PostgreSQL,
/// one row of the change log, as JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum Change {
    /// Insert or replace a token.
    Token(String, TokenRecord),
    /// Count one use of a token: the token as it is after the use, written only if the
    /// stored count is one less (so two coordinators cannot spend the same last use); an
    /// unlimited token's count is incremented instead.
    SpendToken(String, TokenRecord),
    /// Delete a token.
    DeleteToken(String),
    /// Delete every token that expired at or before these Unix seconds.
    PruneTokens(u64),
    /// Insert or replace an identity and the keys it holds and held.
    Identity(String, IdentityRecord),
    /// Insert or replace a key revoked by a pre-identity log.
    RevokedKey(String, RevokedKey),
    /// Lift a key revocation from a pre-identity log.
    DeleteRevokedKey(String),
    /// Record the policy in force.
    Policy(StoredPolicy),
    /// Record the policy in force only if the stored one has this revision (`None`: no
    /// policy stored), so two coordinators cannot both write the next revision.
    ReplacePolicy(StoredPolicy, Option<u64>),
    /// Set a `meta` row.
    Meta(String, String),
    /// Insert or replace a member (a registration, a heartbeat that changed it, a key
    /// rotation, an app move) with the apps it holds. Refused ([`StorageError::Conflict`])
    /// when another member holds one of the apps or the peer id belongs to another
    /// identity; refused by the foreign key when the key is not bound to the identity.
    Member(MemberRow),
    /// Remove a member (revoked, key cleared, replaced, left), with the reason its
    /// `peer_remove` event carries.
    RemoveMember(String, String),
    /// Mark a member stale if the database last saw it before these Unix seconds and it
    /// is not stale yet (the expiry runner's decision; refused when a heartbeat won).
    StaleMember(String, u64),
    /// Remove a member the database last saw before these Unix seconds (expired).
    ExpireMember(String, u64),
    /// Insert a stock WireGuard client (minted) with its mesh IPv4; refused
    /// ([`StorageError::Conflict`]) when its address, peer id, identity, display name or
    /// key is taken.
    Client(crate::clients::ClientRow),
    /// Remove a client (revoked) and free its address.
    RemoveClient(String),
}

/// Everything durable, as read at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Tokens by hash.
    pub tokens: Vec<(String, TokenRecord)>,
    /// Identity records.
    pub identities: Vec<(String, IdentityRecord)>,
    /// Keys revoked by pre-identity logs.
    pub revoked_keys: Vec<(String, RevokedKey)>,
    /// The policy in force.
    pub policy: Option<StoredPolicy>,
    /// `meta` rows.
    pub meta: BTreeMap<String, String>,
    /// Members (the roster), by peer id.
    pub members: Vec<MemberRow>,
    /// Stock WireGuard clients, by peer id.
    pub clients: Vec<crate::clients::ClientRow>,
}

/// A storage engine: runs transactions of [`Statement`]s and answers queries. Built
/// by [`Database::open`] with its schema already migrated.
pub trait Engine: Send + fmt::Debug {
    /// `sqlite` or `postgres`.
    fn name(&self) -> &'static str;
    /// Runs `statements` in one transaction; returns once it is durable. On error nothing
    /// of it is applied.
    fn transaction(&mut self, statements: &[Statement]) -> Result<(), StorageError>;
    /// As [`Engine::transaction`], and returns the value (first column of the first row)
    /// of the last statement when its SQL has a `RETURNING` clause (engines with a change
    /// log: the new entry's id).
    fn transaction_returning(
        &mut self,
        statements: &[Statement],
    ) -> Result<Option<i64>, StorageError> {
        self.transaction(statements).map(|()| None)
    }
    /// Runs a query without parameters and returns its rows; each column is read as the
    /// type `columns` names (`Value::Int`/`Value::Text`, NULL as `NullInt`/`NullText`).
    fn query(&mut self, sql: &str, columns: &[Value]) -> Result<Vec<Vec<Value>>, StorageError>;
    /// Whether this process is the one that runs member expiry now. PostgreSQL: it holds
    /// (or just took) a session advisory lock on its connection, released when the
    /// connection ends, so exactly one coordinator on the database holds it at a time.
    /// Engines of one process (SQLite): always.
    fn expiry_lock(&mut self) -> Result<bool, StorageError> {
        Ok(true)
    }
    /// This process's name in the change log, if the engine keeps one (PostgreSQL: several
    /// coordinators share the database and follow each other's changes through it).
    fn change_log_origin(&self) -> Option<&str> {
        None
    }
    /// Calls `on_change` (from another thread) whenever another process may have
    /// committed changes, and at least every few seconds; `false` if the engine has no
    /// change log to watch.
    fn watch(&self, on_change: Box<dyn Fn() + Send>) -> Result<bool, StorageError> {
        drop(on_change);
        Ok(false)
    }
}

/// The channel `LISTEN`ed to for change-log notifications.
pub const CHANGE_CHANNEL: &str = "tabbify_changes";

/// Writes `changes` in one transaction. With a change log, the same transaction appends
/// them to it (under a transaction-level advisory lock, so log ids are assigned in commit
/// order and a follower reading "after id N" never skips a later-committing lower id) and
/// notifies [`CHANGE_CHANNEL`] at commit. Returns the change-log id of the entry (`None`
/// without a change log).
pub fn commit(engine: &mut dyn Engine, changes: &[Change]) -> Result<Option<i64>, StorageError> {
    let name = engine.name();
    let mut statements = Vec::new();
    let origin = engine.change_log_origin().map(str::to_owned);
    if origin.is_some() {
        statements.push(Statement {
            must_change: false,
            sql: "SELECT pg_advisory_xact_lock(7521028161258875250)",
            params: vec![],
        });
    }
    for c in changes {
        statements_for(name, c, &mut statements)?;
    }
    if let Some(origin) = origin {
        let body = serde_json::to_string(changes).map_err(|e| StorageError::Engine {
            engine: name,
            message: format!("change log entry: {e}"),
        })?;
        // Notifications are delivered at commit, so the order within it does not matter;
        // the insert goes last for its RETURNING id.
        statements.push(Statement {
            must_change: false,
            sql: "SELECT pg_notify('tabbify_changes', '')",
            params: vec![],
        });
        statements.push(Statement {
            must_change: false,
            sql: "INSERT INTO change_log (origin, body, at) \
                  VALUES (?1, ?2, CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)) RETURNING id",
            params: vec![Value::Text(origin), Value::Text(body)],
        });
        return engine.transaction_returning(&statements);
    }
    engine.transaction(&statements).map(|()| None)
}

/// Writes `last_seen = secs` for the members `peer_ids` whose stored value is older, in one
/// transaction and outside the change log (liveness is not an event; see
/// [`crate::members`]).
pub fn touch(engine: &mut dyn Engine, peer_ids: &[String], secs: u64) -> Result<(), StorageError> {
    if peer_ids.is_empty() {
        return Ok(());
    }
    let secs = i64::try_from(secs).map_err(|_| StorageError::Engine {
        engine: engine.name(),
        message: format!("{secs} does not fit a 64-bit signed column"),
    })?;
    let statements: Vec<Statement> = peer_ids
        .iter()
        .map(|id| Statement {
            must_change: false,
            sql: "UPDATE members SET last_seen = ?2 WHERE peer_id = ?1 AND last_seen < ?2",
            params: vec![Value::Text(id.clone()), Value::Int(secs)],
        })
        .collect();
    engine.transaction(&statements)
}

/// Dashboard login links and sessions ([`crate::sessions`]) in the database, so every
/// coordinator on it accepts them and a restart keeps them. Not events: written outside the
/// change log. Keys are SHA-256 hashes of the secrets in lowercase hex (checked here, so
/// they can be spelled into a query), expiries ms since the epoch.
pub mod dashboard {
    use super::{Engine, Statement, StorageError, Value};

    fn int(engine: &dyn Engine, v: u64) -> Result<Value, StorageError> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| StorageError::Engine {
                engine: engine.name(),
                message: format!("{v} does not fit a 64-bit signed column"),
            })
    }

    fn check_hash(engine: &dyn Engine, hash: &str) -> Result<(), StorageError> {
        if hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(())
        } else {
            Err(StorageError::Engine {
                engine: engine.name(),
                message: "a dashboard secret's hash must be 64 lowercase hex digits".into(),
            })
        }
    }

    /// Deletes expired links and sessions, then the soonest-expiring beyond `max_links`
    /// and `max_sessions`.
    pub fn sweep(
        engine: &mut dyn Engine,
        now_ms: u64,
        max_links: usize,
        max_sessions: usize,
    ) -> Result<(), StorageError> {
        let now = int(engine, now_ms)?;
        let cap = |n: usize| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
        engine.transaction(&[
            Statement {
                must_change: false,
                sql: "DELETE FROM dashboard_links WHERE expires_ms <= ?1",
                params: vec![now.clone()],
            },
            Statement {
                must_change: false,
                sql: "DELETE FROM dashboard_sessions WHERE expires_ms <= ?1",
                params: vec![now],
            },
            Statement {
                must_change: false,
                sql: "DELETE FROM dashboard_links WHERE hash NOT IN \
                      (SELECT hash FROM dashboard_links ORDER BY expires_ms DESC, hash LIMIT ?1)",
                params: vec![cap(max_links)],
            },
            Statement {
                must_change: false,
                sql: "DELETE FROM dashboard_sessions WHERE hash NOT IN \
                      (SELECT hash FROM dashboard_sessions ORDER BY expires_ms DESC, hash LIMIT ?1)",
                params: vec![cap(max_sessions)],
            },
        ])
    }

    /// Records a login link.
    pub fn put_link(
        engine: &mut dyn Engine,
        hash: &str,
        admin: &str,
        expires_ms: u64,
    ) -> Result<(), StorageError> {
        check_hash(engine, hash)?;
        let exp = int(engine, expires_ms)?;
        engine.transaction(&[Statement {
            must_change: false,
            sql: "INSERT INTO dashboard_links (hash, admin, expires_ms) VALUES (?1, ?2, ?3)",
            params: vec![Value::Text(hash.into()), Value::Text(admin.into()), exp],
        }])
    }

    /// Removes a login link and returns `(admin, expires_ms)`; `None` when it is absent or
    /// another coordinator removed it first (the delete is the compare-and-set: of two
    /// coordinators redeeming one link at once, one gets it).
    pub fn take_link(
        engine: &mut dyn Engine,
        hash: &str,
    ) -> Result<Option<(String, u64)>, StorageError> {
        check_hash(engine, hash)?;
        let rows = engine.query(
            &format!("SELECT admin, expires_ms FROM dashboard_links WHERE hash = '{hash}'"),
            &[Value::Text(String::new()), Value::Int(0)],
        )?;
        let Some([Value::Text(admin), Value::Int(exp)]) = rows.first().map(Vec::as_slice) else {
            return Ok(None);
        };
        let taken = engine.transaction(&[Statement {
            must_change: true,
            sql: "DELETE FROM dashboard_links WHERE hash = ?1",
            params: vec![Value::Text(hash.into())],
        }]);
        match taken {
            Ok(()) => Ok(Some((admin.clone(), u64::try_from(*exp).unwrap_or(0)))),
            Err(StorageError::Conflict { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records a session.
    pub fn put_session(
        engine: &mut dyn Engine,
        hash: &str,
        admin: &str,
        csrf: &str,
        expires_ms: u64,
    ) -> Result<(), StorageError> {
        check_hash(engine, hash)?;
        let exp = int(engine, expires_ms)?;
        engine.transaction(&[Statement {
            must_change: false,
            sql: "INSERT INTO dashboard_sessions (hash, admin, csrf, expires_ms) \
                  VALUES (?1, ?2, ?3, ?4)",
            params: vec![
                Value::Text(hash.into()),
                Value::Text(admin.into()),
                Value::Text(csrf.into()),
                exp,
            ],
        }])
    }

    /// The session with this hash: `(admin, csrf, expires_ms)`, expired or not.
    pub fn session(
        engine: &mut dyn Engine,
        hash: &str,
    ) -> Result<Option<(String, String, u64)>, StorageError> {
        check_hash(engine, hash)?;
        let rows = engine.query(
            &format!(
                "SELECT admin, csrf, expires_ms FROM dashboard_sessions WHERE hash = '{hash}'"
            ),
            &[
                Value::Text(String::new()),
                Value::Text(String::new()),
                Value::Int(0),
            ],
        )?;
        Ok(match rows.first().map(Vec::as_slice) {
            Some([Value::Text(a), Value::Text(c), Value::Int(e)]) => {
                Some((a.clone(), c.clone(), u64::try_from(*e).unwrap_or(0)))
            }
            _ => None,
        })
    }

    /// Deletes a session; `true` if it existed.
    pub fn delete_session(engine: &mut dyn Engine, hash: &str) -> Result<bool, StorageError> {
        check_hash(engine, hash)?;
        match engine.transaction(&[Statement {
            must_change: true,
            sql: "DELETE FROM dashboard_sessions WHERE hash = ?1",
            params: vec![Value::Text(hash.into())],
        }]) {
            Ok(()) => Ok(true),
            Err(StorageError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `(links, sessions)` held.
    pub fn counts(engine: &mut dyn Engine) -> Result<(usize, usize), StorageError> {
        let mut n = [0usize; 2];
        for (i, table) in ["dashboard_links", "dashboard_sessions"].iter().enumerate() {
            let rows = engine.query(&format!("SELECT COUNT(*) FROM {table}"), &[Value::Int(0)])?;
            if let Some(Value::Int(c)) = rows.first().and_then(|r| r.first()) {
                n[i] = usize::try_from(*c).unwrap_or(0);
            }
        }
        Ok((n[0], n[1]))
    }
}

/// Deletes change-log entries older than `keep_secs` (by the database's clock) or older
/// than the newest `keep_rows`; the newest entry always stays (it is where a starting
/// coordinator's event ids continue from). A follower that was away longer than that gets
/// snapshots, never a wrong replay: streams resume only from what a coordinator saw
/// itself.
pub fn prune_change_log(
    engine: &mut dyn Engine,
    keep_secs: u64,
    keep_rows: u64,
) -> Result<(), StorageError> {
    let int = |v: u64| Value::Int(i64::try_from(v).unwrap_or(i64::MAX));
    engine.transaction(&[Statement {
        must_change: false,
        sql: "DELETE FROM change_log WHERE id < (SELECT MAX(id) FROM change_log) \
              AND (at < CAST(EXTRACT(EPOCH FROM now()) AS BIGINT) - ?1 \
              OR id <= (SELECT MAX(id) FROM change_log) - ?2)",
        params: vec![int(keep_secs), int(keep_rows)],
    }])
}

/// The value of `meta` row `name`, set to `value` first if it is absent (the first
/// writer wins; everyone reads the same value). `name` is a constant of this module.
pub fn meta_get_or_init(
    engine: &mut dyn Engine,
    name: &'static str,
    value: &str,
) -> Result<String, StorageError> {
    engine.transaction(&[Statement {
        must_change: false,
        sql: "INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        params: vec![Value::Text(name.into()), Value::Text(value.into())],
    }])?;
    let rows = engine.query(
        &format!("SELECT value FROM meta WHERE name = '{name}'"),
        &[Value::Text(String::new())],
    )?;
    match rows.first().and_then(|r| r.first()) {
        Some(Value::Text(v)) => Ok(v.clone()),
        _ => Err(StorageError::Corrupt {
            engine: engine.name(),
            message: format!("meta row {name} is missing after it was written"),
        }),
    }
}

/// Members the database last saw before `before_secs`: `(peer_id, last_seen, stale)`.
pub fn members_seen_before(
    engine: &mut dyn Engine,
    before_secs: u64,
) -> Result<Vec<(String, u64, bool)>, StorageError> {
    let before = i64::try_from(before_secs).unwrap_or(i64::MAX);
    let rows = engine.query(
        &format!("SELECT peer_id, last_seen, stale FROM members WHERE last_seen < {before}"),
        &[Value::Text(String::new()), Value::Int(0), Value::Int(0)],
    )?;
    Ok(rows
        .into_iter()
        .filter_map(|r| match &r[..] {
            [Value::Text(id), Value::Int(seen), Value::Int(stale)] => {
                Some((id.clone(), u64::try_from(*seen).unwrap_or(0), *stale != 0))
            }
            _ => None,
        })
        .collect())
}

/// The newest change-log id (0 when empty or without a change log).
pub fn last_change_id(engine: &mut dyn Engine) -> Result<i64, StorageError> {
    if engine.change_log_origin().is_none() {
        return Ok(0);
    }
    let rows = engine.query(
        "SELECT COALESCE(MAX(id), 0) FROM change_log",
        &[Value::Int(0)],
    )?;
    Ok(match rows.first().and_then(|r| r.first()) {
        Some(Value::Int(v)) => *v,
        _ => 0,
    })
}

/// Change-log entries after id `after` and before `before` (`None`: no bound), oldest
/// first, at most `limit`: `(id, origin, changes)`.
pub fn changes_after(
    engine: &mut dyn Engine,
    after: i64,
    before: Option<i64>,
    limit: usize,
) -> Result<Vec<(i64, String, Vec<Change>)>, StorageError> {
    let name = engine.name();
    let before = before.unwrap_or(i64::MAX);
    let rows = engine.query(
        &format!(
            "SELECT id, origin, body FROM change_log WHERE id > {after} AND id < {before} \
             ORDER BY id LIMIT {limit}"
        ),
        &[
            Value::Int(0),
            Value::Text(String::new()),
            Value::Text(String::new()),
        ],
    )?;
    rows.into_iter()
        .map(|r| match &r[..] {
            [Value::Int(id), Value::Text(origin), Value::Text(body)] => {
                let changes = serde_json::from_str(body).map_err(|e| StorageError::Corrupt {
                    engine: name,
                    message: format!("change log entry {id}: {e}"),
                })?;
                Ok((*id, origin.clone(), changes))
            }
            _ => Err(StorageError::Corrupt {
                engine: name,
                message: "change log: unexpected row".into(),
            }),
        })
        .collect()
}

/// Reads everything durable.
pub fn load(engine: &mut dyn Engine) -> Result<Snapshot, StorageError> {
    let name = engine.name();
    let corrupt = |message: String| StorageError::Corrupt {
        engine: name,
        message,
    };
    let (i, t) = (Value::Int(0), Value::Text(String::new()));
    let mut snap = Snapshot::default();
    let rows = engine.query(
        "SELECT hash, tags, name, expires_at, max_uses, uses, identity, created_at \
         FROM tokens ORDER BY hash",
        &[
            t.clone(),
            t.clone(),
            t.clone(),
            i.clone(),
            i.clone(),
            i.clone(),
            t.clone(),
            i.clone(),
        ],
    )?;
    for r in rows {
        let [hash, tags, name, expires_at, max_uses, uses, identity, created_at] = &r[..] else {
            return Err(corrupt("tokens: wrong column count".into()));
        };
        let hash = text(hash).ok_or_else(|| corrupt("tokens: hash is NULL".into()))?;
        let token = TokenRecord {
            tags: tags_of(tags).map_err(|e| corrupt(format!("token {hash}: tags: {e}")))?,
            name: text(name),
            expires_at: uint(expires_at).ok_or_else(|| corrupt(format!("token {hash}")))?,
            max_uses: uint(max_uses)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| corrupt(format!("token {hash}: max_uses")))?,
            uses: uint(uses)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| corrupt(format!("token {hash}: uses")))?,
            identity: text(identity),
            created_at: uint(created_at).ok_or_else(|| corrupt(format!("token {hash}")))?,
        };
        snap.tokens.push((hash, token));
    }
    let rows = engine.query(
        "SELECT identity, key_since, display_name, tags, revoked_at FROM identities \
         ORDER BY identity",
        &[t.clone(), i.clone(), t.clone(), t.clone(), i.clone()],
    )?;
    let mut identities = BTreeMap::new();
    for r in rows {
        let [identity, key_since, display_name, tags, revoked_at] = &r[..] else {
            return Err(corrupt("identities: wrong column count".into()));
        };
        let identity = text(identity).ok_or_else(|| corrupt("identity is NULL".into()))?;
        let record = IdentityRecord {
            key: None,
            key_since: uint(key_since).ok_or_else(|| corrupt(format!("identity {identity}")))?,
            display_name: text(display_name).unwrap_or_default(),
            tags: tags_of(tags).map_err(|e| corrupt(format!("identity {identity}: {e}")))?,
            past_keys: Vec::new(),
            revoked_at: match revoked_at {
                Value::NullInt | Value::NullText => None,
                v => Some(uint(v).ok_or_else(|| corrupt(format!("identity {identity}")))?),
            },
        };
        identities.insert(identity, record);
    }
    // Past keys in the order they were retired (seq), the current key has seq NULL.
    let rows = engine.query(
        "SELECT key, identity, seq FROM identity_keys ORDER BY identity, seq",
        &[t.clone(), t.clone(), i.clone()],
    )?;
    for r in rows {
        let [key, identity, seq] = &r[..] else {
            return Err(corrupt("identity_keys: wrong column count".into()));
        };
        let (Some(key), Some(identity)) = (text(key), text(identity)) else {
            return Err(corrupt("identity_keys: NULL key or identity".into()));
        };
        let Some(rec) = identities.get_mut(&identity) else {
            return Err(corrupt(format!(
                "key {key} names unknown identity {identity}"
            )));
        };
        match seq {
            Value::NullInt | Value::NullText => {
                if rec.key.replace(key).is_some() {
                    return Err(corrupt(format!("identity {identity} has two current keys")));
                }
            }
            _ => rec.past_keys.push(key),
        }
    }
    snap.identities = identities.into_iter().collect();
    let rows = engine.query(
        "SELECT key, peer_id, at FROM revoked_keys ORDER BY key",
        &[t.clone(), t.clone(), i.clone()],
    )?;
    for r in rows {
        let [key, peer_id, at] = &r[..] else {
            return Err(corrupt("revoked_keys: wrong column count".into()));
        };
        let key = text(key).ok_or_else(|| corrupt("revoked key is NULL".into()))?;
        let at = uint(at).ok_or_else(|| corrupt(format!("revoked key {key}")))?;
        snap.revoked_keys.push((
            key,
            RevokedKey {
                peer_id: text(peer_id).unwrap_or_default(),
                at,
            },
        ));
    }
    let rows = engine.query(
        "SELECT revision, file_hash, document FROM policy WHERE id = 1",
        &[i.clone(), t.clone(), t.clone()],
    )?;
    if let Some(r) = rows.into_iter().next() {
        let [revision, file_hash, document] = &r[..] else {
            return Err(corrupt("policy: wrong column count".into()));
        };
        let document = text(document).unwrap_or_default();
        snap.policy = Some(StoredPolicy {
            revision: uint(revision).ok_or_else(|| corrupt("policy revision".into()))?,
            file_hash: text(file_hash).unwrap_or_default(),
            document: serde_json::from_str(&document)
                .map_err(|e| corrupt(format!("policy document: {e}")))?,
        });
    }
    let rows = engine.query("SELECT name, value FROM meta", &[t.clone(), t.clone()])?;
    for r in rows {
        if let [Value::Text(n), Value::Text(v)] = &r[..] {
            snap.meta.insert(n.clone(), v.clone());
        }
    }
    let rows = engine.query(
        "SELECT peer_id, body, last_seen, stale FROM members ORDER BY peer_id",
        &[t.clone(), t, i.clone(), i],
    )?;
    for r in rows {
        let [Value::Text(id), Value::Text(body), last_seen, Value::Int(stale)] = &r[..] else {
            return Err(corrupt("members: unexpected row".into()));
        };
        let last_seen = uint(last_seen).ok_or_else(|| corrupt(format!("member {id}")))?;
        let row = MemberRow::from_body(body, last_seen, *stale != 0)
            .map_err(|e| corrupt(format!("member {id}: {e}")))?;
        if row.peer_id != *id {
            return Err(corrupt(format!("member {id}: body names {}", row.peer_id)));
        }
        snap.members.push(row);
    }
    let rows = engine.query(
        "SELECT peer_id, body FROM clients ORDER BY peer_id",
        &[Value::Text(String::new()), Value::Text(String::new())],
    )?;
    for r in rows {
        let [Value::Text(id), Value::Text(body)] = &r[..] else {
            return Err(corrupt("clients: unexpected row".into()));
        };
        let row: crate::clients::ClientRow =
            serde_json::from_str(body).map_err(|e| corrupt(format!("client {id}: {e}")))?;
        if row.peer_id != *id {
            return Err(corrupt(format!("client {id}: body names {}", row.peer_id)));
        }
        snap.clients.push(row);
    }
    Ok(snap)
}

fn statements_for(
    engine: &'static str,
    change: &Change,
    out: &mut Vec<Statement>,
) -> Result<(), StorageError> {
    let int = |v: u64| {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| StorageError::Engine {
                engine,
                message: format!("{v} does not fit a 64-bit signed column"),
            })
    };
    let tags = |t: &[String]| Value::Text(serde_json::Value::from(t.to_vec()).to_string());
    let opt = |s: &Option<String>| s.clone().map_or(Value::NullText, Value::Text);
    match change {
        Change::Token(hash, t) => out.push(Statement {
            must_change: false,
            sql: "INSERT INTO tokens (hash, tags, name, expires_at, max_uses, uses, identity, \
                  created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                  ON CONFLICT (hash) DO UPDATE SET tags = excluded.tags, name = excluded.name, \
                  expires_at = excluded.expires_at, max_uses = excluded.max_uses, \
                  uses = excluded.uses, identity = excluded.identity, \
                  created_at = excluded.created_at",
            params: vec![
                Value::Text(hash.clone()),
                tags(&t.tags),
                opt(&t.name),
                int(t.expires_at)?,
                Value::Int(t.max_uses.into()),
                Value::Int(t.uses.into()),
                opt(&t.identity),
                int(t.created_at)?,
            ],
        }),
        // An unlimited token has no last use to protect: count the use without a
        // compare-and-set, so members registering through several coordinators at once
        // with one fleet token do not conflict.
        Change::SpendToken(hash, t) if t.max_uses == 0 => out.push(Statement {
            must_change: true,
            sql: "UPDATE tokens SET uses = uses + 1 WHERE hash = ?1 AND max_uses = 0",
            params: vec![Value::Text(hash.clone())],
        }),
        Change::SpendToken(hash, t) => out.push(Statement {
            must_change: true,
            sql: "UPDATE tokens SET uses = ?2 WHERE hash = ?1 AND uses = ?3 \
                  AND (max_uses = 0 OR uses < max_uses)",
            params: vec![
                Value::Text(hash.clone()),
                Value::Int(t.uses.into()),
                Value::Int(t.uses.saturating_sub(1).into()),
            ],
        }),
        Change::DeleteToken(hash) => out.push(Statement {
            must_change: false,
            sql: "DELETE FROM tokens WHERE hash = ?1",
            params: vec![Value::Text(hash.clone())],
        }),
        Change::PruneTokens(now) => out.push(Statement {
            must_change: false,
            sql: "DELETE FROM tokens WHERE expires_at <= ?1",
            params: vec![int(*now)?],
        }),
        Change::Identity(identity, r) => {
            out.push(Statement {
                must_change: false,
                sql: "INSERT INTO identities (identity, key_since, display_name, tags, \
                      revoked_at) VALUES (?1, ?2, ?3, ?4, ?5) \
                      ON CONFLICT (identity) DO UPDATE SET key_since = excluded.key_since, \
                      display_name = excluded.display_name, tags = excluded.tags, \
                      revoked_at = excluded.revoked_at",
                params: vec![
                    Value::Text(identity.clone()),
                    int(r.key_since)?,
                    Value::Text(r.display_name.clone()),
                    tags(&r.tags),
                    match r.revoked_at {
                        Some(at) => int(at)?,
                        None => Value::NullInt,
                    },
                ],
            });
            // Keys never leave their identity: rows are only added or re-ordered, never
            // deleted, so a record written from a stale view (another coordinator admitted
            // a key meanwhile) keeps that key bound as a retired one. The current key is
            // demoted first, then the record's keys are upserted; an upsert of a key that
            // another identity holds changes no row and fails the transaction.
            out.push(Statement {
                must_change: false,
                sql: "UPDATE identity_keys SET seq = -1 WHERE identity = ?1 AND seq IS NULL",
                params: vec![Value::Text(identity.clone())],
            });
            let keys = r
                .past_keys
                .iter()
                .enumerate()
                .map(|(seq, k)| (k, Value::Int(seq as i64)))
                .chain(r.key.iter().map(|k| (k, Value::NullInt)));
            for (k, seq) in keys {
                out.push(Statement {
                    must_change: true,
                    sql: "INSERT INTO identity_keys (key, identity, seq) VALUES (?1, ?2, ?3) \
                          ON CONFLICT (key) DO UPDATE SET seq = excluded.seq \
                          WHERE identity_keys.identity = excluded.identity",
                    params: vec![Value::Text(k.clone()), Value::Text(identity.clone()), seq],
                });
            }
        }
        Change::RevokedKey(key, r) => out.push(Statement {
            must_change: false,
            sql: "INSERT INTO revoked_keys (key, peer_id, at) VALUES (?1, ?2, ?3) \
                  ON CONFLICT (key) DO UPDATE SET peer_id = excluded.peer_id, at = excluded.at",
            params: vec![
                Value::Text(key.clone()),
                Value::Text(r.peer_id.clone()),
                int(r.at)?,
            ],
        }),
        Change::DeleteRevokedKey(key) => out.push(Statement {
            must_change: false,
            sql: "DELETE FROM revoked_keys WHERE key = ?1",
            params: vec![Value::Text(key.clone())],
        }),
        Change::Policy(p) => out.push(Statement {
            must_change: false,
            sql: "INSERT INTO policy (id, revision, file_hash, document) VALUES (1, ?1, ?2, ?3) \
                  ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, \
                  file_hash = excluded.file_hash, document = excluded.document",
            params: vec![
                int(p.revision)?,
                Value::Text(p.file_hash.clone()),
                Value::Text(serde_json::to_string(&p.document).map_err(|e| {
                    StorageError::Engine {
                        engine,
                        message: format!("policy document: {e}"),
                    }
                })?),
            ],
        }),
        Change::ReplacePolicy(p, expected) => {
            let document = Value::Text(serde_json::to_string(&p.document).map_err(|e| {
                StorageError::Engine {
                    engine,
                    message: format!("policy document: {e}"),
                }
            })?);
            out.push(Statement {
                must_change: true,
                sql:
                    "INSERT INTO policy (id, revision, file_hash, document) VALUES (1, ?1, ?2, ?3) \
                      ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, \
                      file_hash = excluded.file_hash, document = excluded.document \
                      WHERE policy.revision = ?4",
                params: vec![
                    int(p.revision)?,
                    Value::Text(p.file_hash.clone()),
                    document,
                    // No stored policy: the insert happens, the WHERE is never consulted.
                    match expected {
                        Some(r) => int(*r)?,
                        None => Value::Int(-1),
                    },
                ],
            });
        }
        Change::Meta(name, value) => out.push(Statement {
            must_change: false,
            sql: "INSERT INTO meta (name, value) VALUES (?1, ?2) \
                  ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            params: vec![Value::Text(name.clone()), Value::Text(value.clone())],
        }),
        Change::Member(m) => {
            // A peer id held by another identity (a truncated-hash collision) is not
            // overwritten: the upsert changes no row and the transaction fails.
            out.push(Statement {
                must_change: true,
                sql: "INSERT INTO members (peer_id, identity, key, body, last_seen, stale) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                      ON CONFLICT (peer_id) DO UPDATE SET key = excluded.key, \
                      body = excluded.body, last_seen = excluded.last_seen, \
                      stale = excluded.stale WHERE members.identity = excluded.identity",
                params: vec![
                    Value::Text(m.peer_id.clone()),
                    Value::Text(m.identity.clone()),
                    Value::Text(m.key.clone()),
                    Value::Text(m.body()),
                    int(m.last_seen)?,
                    Value::Int(i64::from(m.stale)),
                ],
            });
            out.push(Statement {
                must_change: false,
                sql: "DELETE FROM member_apps WHERE peer_id = ?1",
                params: vec![Value::Text(m.peer_id.clone())],
            });
            // A mesh IPv4 another member holds: no row inserted, the transaction fails.
            out.push(Statement {
                must_change: false,
                sql: "DELETE FROM member_ipv4 WHERE peer_id = ?1",
                params: vec![Value::Text(m.peer_id.clone())],
            });
            if let Some(a) = m.ipv4 {
                out.push(Statement {
                    must_change: true,
                    sql: "INSERT INTO member_ipv4 (ipv4, peer_id) VALUES (?1, ?2) \
                          ON CONFLICT (ipv4) DO NOTHING",
                    params: vec![Value::Text(a.to_string()), Value::Text(m.peer_id.clone())],
                });
            }
            // An app another member holds: no row inserted, the transaction fails.
            for app in &m.hosted_app_ulas {
                out.push(Statement {
                    must_change: true,
                    sql: "INSERT INTO member_apps (app, peer_id) VALUES (?1, ?2) \
                          ON CONFLICT (app) DO NOTHING",
                    params: vec![Value::Text(app.to_string()), Value::Text(m.peer_id.clone())],
                });
            }
        }
        Change::RemoveMember(peer_id, _) => {
            out.push(Statement {
                must_change: false,
                sql: "DELETE FROM member_apps WHERE peer_id = ?1",
                params: vec![Value::Text(peer_id.clone())],
            });
            out.push(Statement {
                must_change: false,
                sql: "DELETE FROM member_ipv4 WHERE peer_id = ?1",
                params: vec![Value::Text(peer_id.clone())],
            });
            out.push(Statement {
                must_change: false,
                sql: "DELETE FROM members WHERE peer_id = ?1",
                params: vec![Value::Text(peer_id.clone())],
            });
        }
        Change::Client(c) => {
            out.push(Statement {
                must_change: true,
                sql: "INSERT INTO clients (peer_id, identity, display_name, key, body) \
                      VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                params: vec![
                    Value::Text(c.peer_id.clone()),
                    Value::Text(c.identity.clone()),
                    Value::Text(c.display_name.clone()),
                    Value::Text(c.public_key.clone()),
                    Value::Text(serde_json::to_string(c).map_err(|e| StorageError::Engine {
                        engine,
                        message: format!("client row: {e}"),
                    })?),
                ],
            });
            // An address a member or another client holds: no row, the transaction fails.
            out.push(Statement {
                must_change: true,
                sql: "INSERT INTO member_ipv4 (ipv4, peer_id) VALUES (?1, ?2) \
                      ON CONFLICT DO NOTHING",
                params: vec![
                    Value::Text(c.ipv4.to_string()),
                    Value::Text(c.peer_id.clone()),
                ],
            });
        }
        Change::RemoveClient(peer_id) => {
            out.push(Statement {
                must_change: false,
                sql: "DELETE FROM member_ipv4 WHERE peer_id = ?1",
                params: vec![Value::Text(peer_id.clone())],
            });
            out.push(Statement {
                must_change: false,
                sql: "DELETE FROM clients WHERE peer_id = ?1",
                params: vec![Value::Text(peer_id.clone())],
            });
        }
        Change::StaleMember(peer_id, before) => out.push(Statement {
            must_change: true,
            sql: "UPDATE members SET stale = 1 WHERE peer_id = ?1 AND stale = 0 AND last_seen < ?2",
            params: vec![Value::Text(peer_id.clone()), int(*before)?],
        }),
        Change::ExpireMember(peer_id, before) => {
            out.push(Statement {
                must_change: false,
                sql: "DELETE FROM member_apps WHERE peer_id = ?1 AND peer_id IN \
                      (SELECT peer_id FROM members WHERE last_seen < ?2)",
                params: vec![Value::Text(peer_id.clone()), int(*before)?],
            });
            out.push(Statement {
                must_change: false,
                sql: "DELETE FROM member_ipv4 WHERE peer_id = ?1 AND peer_id IN \
                      (SELECT peer_id FROM members WHERE last_seen < ?2)",
                params: vec![Value::Text(peer_id.clone()), int(*before)?],
            });
            out.push(Statement {
                must_change: true,
                sql: "DELETE FROM members WHERE peer_id = ?1 AND last_seen < ?2",
                params: vec![Value::Text(peer_id.clone()), int(*before)?],
            });
        }
    }
    Ok(())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(s) => Some(s.clone()),
        _ => None,
    }
}

fn uint(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

fn tags_of(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Text(s) => serde_json::from_str(s).map_err(|e| e.to_string()),
        _ => Err("NULL".into()),
    }
}

/// The path of the SQLite database in `dir`.
pub fn sqlite_path(dir: &Path) -> PathBuf {
    dir.join(SQLITE_FILE)
}
