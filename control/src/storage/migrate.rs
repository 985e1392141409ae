//! The schema, as numbered migrations applied in order, each in one transaction with
//! its row in `schema_migrations`. The same SQL runs on SQLite and PostgreSQL (only
//! `TEXT` and `BIGINT` columns, `ON CONFLICT` upserts), except migrations marked for one
//! engine (the change log, which only PostgreSQL's several coordinators need); the other
//! engine records their version without running them, so versions mean the same on both.
//!
//! Invariants: a migration, once released, never changes (add a new one instead); a
//! database whose newest applied version is above [`LATEST`] was written by a newer
//! coordinator and is refused rather than written to. Concurrent starts against one
//! PostgreSQL database are serialized by the engine (`pg_advisory_lock`), so each
//! migration runs once.

use super::{Engine, Statement, StorageError, Value};

/// One schema step.
#[derive(Debug)]
pub struct Migration {
    /// Its number, from 1, without gaps.
    pub version: i64,
    /// What it does.
    pub name: &'static str,
    /// The only engine it runs on (`None`: both).
    pub engine: Option<&'static str>,
    /// Its DDL, one statement each.
    pub statements: &'static [&'static str],
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "tokens, identities and their keys, revoked keys, policy, meta",
        engine: None,
        statements: &[
            "CREATE TABLE tokens (
            hash TEXT PRIMARY KEY,
            tags TEXT NOT NULL,
            name TEXT,
            expires_at BIGINT NOT NULL,
            max_uses BIGINT NOT NULL,
            uses BIGINT NOT NULL,
            identity TEXT,
            created_at BIGINT NOT NULL
        )",
            "CREATE TABLE identities (
            identity TEXT PRIMARY KEY,
            key_since BIGINT NOT NULL,
            display_name TEXT NOT NULL,
            tags TEXT NOT NULL,
            revoked_at BIGINT
        )",
            // Every key an identity holds (seq NULL) or held (seq = retirement order). The
            // primary key makes a key belong to one identity for good.
            "CREATE TABLE identity_keys (
            key TEXT PRIMARY KEY,
            identity TEXT NOT NULL REFERENCES identities (identity),
            seq BIGINT
        )",
            "CREATE INDEX identity_keys_by_identity ON identity_keys (identity)",
            "CREATE TABLE revoked_keys (
            key TEXT PRIMARY KEY,
            peer_id TEXT NOT NULL,
            at BIGINT NOT NULL
        )",
            "CREATE TABLE policy (
            id BIGINT PRIMARY KEY CHECK (id = 1),
            revision BIGINT NOT NULL,
            file_hash TEXT NOT NULL,
            document TEXT NOT NULL
        )",
            "CREATE TABLE meta (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )",
        ],
    },
    Migration {
        version: 2,
        name: "change log: every committed change, in commit order, for the other coordinators",
        engine: Some("postgres"),
        statements: &["CREATE TABLE change_log (
            id BIGSERIAL PRIMARY KEY,
            origin TEXT NOT NULL,
            body TEXT NOT NULL,
            at BIGINT NOT NULL
        )"],
    },
    Migration {
        version: 3,
        name: "members: the roster every coordinator serves, and the apps they hold",
        engine: None,
        statements: &[
            // A member's key must be bound to its identity (current or retired: keys are
            // never unbound), whatever a coordinator's memory says.
            "CREATE UNIQUE INDEX identity_keys_key_identity ON identity_keys (key, identity)",
            "CREATE TABLE members (
            peer_id TEXT PRIMARY KEY,
            identity TEXT NOT NULL UNIQUE,
            key TEXT NOT NULL UNIQUE,
            body TEXT NOT NULL,
            last_seen BIGINT NOT NULL,
            stale BIGINT NOT NULL,
            FOREIGN KEY (key, identity) REFERENCES identity_keys (key, identity)
        )",
            // One holder per app.
            "CREATE TABLE member_apps (
            app TEXT PRIMARY KEY,
            peer_id TEXT NOT NULL REFERENCES members (peer_id) ON DELETE CASCADE
        )",
            "CREATE INDEX member_apps_by_peer ON member_apps (peer_id)",
        ],
    },
    Migration {
        version: 4,
        name: "member_ipv4: one mesh IPv4 per member, one member per mesh IPv4",
        engine: None,
        statements: &["CREATE TABLE member_ipv4 (
            ipv4 TEXT PRIMARY KEY,
            peer_id TEXT NOT NULL UNIQUE REFERENCES members (peer_id) ON DELETE CASCADE
        )"],
    },
    Migration {
        version: 5,
        name: "dashboard sessions and login links, shared by every coordinator on the database",
        engine: None,
        statements: &[
            // Secrets are kept only as SHA-256 (hex); expiries in ms since the epoch.
            "CREATE TABLE dashboard_links (
            hash TEXT PRIMARY KEY,
            admin TEXT NOT NULL,
            expires_ms BIGINT NOT NULL
        )",
            "CREATE TABLE dashboard_sessions (
            hash TEXT PRIMARY KEY,
            admin TEXT NOT NULL,
            csrf TEXT NOT NULL,
            expires_ms BIGINT NOT NULL
        )",
            "CREATE INDEX dashboard_links_by_expiry ON dashboard_links (expires_ms)",
            "CREATE INDEX dashboard_sessions_by_expiry ON dashboard_sessions (expires_ms)",
        ],
    },
    Migration {
        version: 6,
        name: "clients: stock WireGuard clients; member_ipv4 holds clients' addresses too",
        engine: None,
        statements: &[
            "CREATE TABLE clients (
            peer_id TEXT PRIMARY KEY,
            identity TEXT NOT NULL UNIQUE,
            display_name TEXT NOT NULL UNIQUE,
            key TEXT NOT NULL UNIQUE,
            body TEXT NOT NULL
        )",
            // The uniqueness table of mesh IPv4s, rebuilt without the foreign key onto
            // members: a client's address is in it too (rows are deleted explicitly with
            // their member or client).
            "CREATE TABLE mesh_ipv4_new (
            ipv4 TEXT PRIMARY KEY,
            peer_id TEXT NOT NULL UNIQUE
        )",
            "INSERT INTO mesh_ipv4_new (ipv4, peer_id) SELECT ipv4, peer_id FROM member_ipv4",
            "DROP TABLE member_ipv4",
            "ALTER TABLE mesh_ipv4_new RENAME TO member_ipv4",
        ],
    },
];

/// The newest schema version this coordinator knows.
pub const LATEST: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Brings the schema up to [`LATEST`]; returns how many migrations ran. The caller holds
/// whatever lock keeps other coordinators out meanwhile.
pub fn apply(engine: &mut dyn Engine, now_secs: u64) -> Result<usize, StorageError> {
    engine.transaction(&[Statement {
        must_change: false,
        sql: "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )",
        params: vec![],
    }])?;
    let rows = engine.query(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        &[Value::Int(0)],
    )?;
    let current = match rows.first().and_then(|r| r.first()) {
        Some(Value::Int(v)) => *v,
        _ => 0,
    };
    if current > LATEST {
        return Err(StorageError::Corrupt {
            engine: engine.name(),
            message: format!(
                "the schema is at version {current}, newer than this coordinator knows \
                 ({LATEST}): upgrade the coordinator"
            ),
        });
    }
    let mut ran = 0;
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        let runs_here = m.engine.is_none_or(|e| e == engine.name());
        let mut statements: Vec<Statement> = m
            .statements
            .iter()
            .filter(|_| runs_here)
            .map(|sql| Statement {
                must_change: false,
                sql,
                params: vec![],
            })
            .collect();
        statements.push(Statement {
            must_change: false,
            sql: "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params: vec![
                Value::Int(m.version),
                Value::Text(m.name.into()),
                Value::Int(i64::try_from(now_secs).unwrap_or(i64::MAX)),
            ],
        });
        engine.transaction(&statements)?;
        tracing::info!(
            engine = engine.name(),
            version = m.version,
            name = m.name,
            "schema migrated"
        );
        ran += 1;
    }
    Ok(ran)
}
