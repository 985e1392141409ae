//! The SQLite engine: `state.db` under `--state-dir`, the default. The SQLite library is
//! compiled into the binary (rusqlite's `bundled`), so the coordinator needs nothing but
//! a directory.
//!
//! Settings and why:
//! * `journal_mode=WAL`: readers (a `sqlite3 state.db .backup` beside a running
//!   coordinator) do not block the writer, and a commit appends to the WAL instead of
//!   rewriting pages.
//! * `synchronous=FULL`: the WAL is fsynced at every commit, so a change acknowledged to a
//!   client survives a power loss as well as a crash. `NORMAL` would survive a crash of
//!   the coordinator (kill -9) but may lose the last commits on power loss; writes here
//!   are rare (registrations, admin changes — never unchanged heartbeats), so the fsync
//!   per commit costs nothing that matters.
//! * `foreign_keys=ON`, and `busy_timeout` so a backup holding a read lock delays a write
//!   a little instead of failing it.
//!
//! Invariant: one connection, used under a mutex; every write is one `BEGIN IMMEDIATE`
//! transaction. One coordinator process per database file (SQLite is the single-host
//! engine; several coordinators need PostgreSQL).

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, TransactionBehavior};

use super::{Engine, Statement, StorageError, Value};

const ENGINE: &str = "sqlite";

/// An open SQLite database.
#[derive(Debug)]
pub struct Sqlite {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn err(e: rusqlite::Error) -> StorageError {
    StorageError::Engine {
        engine: ENGINE,
        message: e.to_string(),
    }
}

impl Sqlite {
    /// Opens (creating it with mode 0600 if absent) `state.db` in `dir`, sets WAL and
    /// `synchronous=FULL`, and migrates the schema.
    pub fn open(dir: &Path, now_secs: u64) -> Result<Self, StorageError> {
        let path = super::sqlite_path(dir);
        let io = |source| StorageError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Create the file ourselves so it is private; SQLite gives its -wal and -shm files
        // the database file's permissions.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StorageError::Engine {
                engine: ENGINE,
                message: format!(
                    "{}: could not switch to WAL (journal_mode {mode})",
                    path.display()
                ),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        let mut db = Self {
            path,
            conn: Mutex::new(conn),
        };
        super::migrate::apply(&mut db, now_secs)?;
        Ok(db)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn bind(v: &Value) -> SqlValue {
    match v {
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Text(s) => SqlValue::Text(s.clone()),
        Value::NullInt | Value::NullText => SqlValue::Null,
    }
}

impl Engine for Sqlite {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn transaction(&mut self, statements: &[Statement]) -> Result<(), StorageError> {
        let conn = self.conn.get_mut().unwrap_or_else(|e| e.into_inner());
        // Dropped without commit (an error below) = rolled back.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        for s in statements {
            let mut stmt = tx.prepare(s.sql).map_err(err)?;
            let n = stmt
                .execute(rusqlite::params_from_iter(s.params.iter().map(bind)))
                .map_err(err)?;
            if s.must_change && n == 0 {
                return Err(StorageError::Conflict {
                    engine: ENGINE,
                    message: format!("no row changed by `{}`", s.sql),
                });
            }
        }
        tx.commit().map_err(err)
    }

    fn query(&mut self, sql: &str, columns: &[Value]) -> Result<Vec<Vec<Value>>, StorageError> {
        let conn = self.conn.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut stmt = conn.prepare(sql).map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(err)? {
            let mut vals = Vec::with_capacity(columns.len());
            for (i, want) in columns.iter().enumerate() {
                let v = match (row.get_ref(i).map_err(err)?, want) {
                    (ValueRef::Null, Value::Int(_) | Value::NullInt) => Value::NullInt,
                    (ValueRef::Null, _) => Value::NullText,
                    (ValueRef::Integer(n), Value::Int(_) | Value::NullInt) => Value::Int(n),
                    (ValueRef::Text(t), Value::Text(_) | Value::NullText) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                    (other, _) => {
                        return Err(StorageError::Corrupt {
                            engine: ENGINE,
                            message: format!(
                                "column {i} of `{sql}` has type {:?}",
                                other.data_type()
                            ),
                        })
                    }
                };
                vals.push(v);
            }
            out.push(vals);
        }
        Ok(out)
    }
}
