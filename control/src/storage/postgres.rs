//! The PostgreSQL engine: `--database postgres://…` (or `TABBIFY_DATABASE_URL`).
//!
//! The client is the synchronous `postgres` crate, which drives its connection on a
//! runtime of its own and so must not be called from inside the coordinator's tokio
//! runtime. It therefore lives on a dedicated thread that owns the connection; callers
//! send it a transaction or a query and wait for the answer, exactly as they wait for an
//! SQLite commit (the store is written under the coordinator's lock, off any await).
//!
//! At connect the thread takes `pg_advisory_lock(`[`MIGRATION_LOCK`]`)`, applies the
//! migrations, and releases it, so coordinators starting together against one database
//! migrate it once. A broken connection is re-established on the next request (the
//! request that found it broken fails, and so is not acknowledged). Statements are
//! prepared once per connection. A statement that runs longer than the configured
//! `statement_timeout` (default 10 s unless the URL sets `options`) fails instead of
//! holding the coordinator.
//!
//! Not here: TLS to the database (the connection uses `NoTls`; use a unix socket, a
//! loopback address or a private network) — a URL with `sslmode=require` is refused at
//! connect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls};

use super::{Engine, Statement, StorageError, Value};

const ENGINE: &str = "postgres";

/// The advisory lock key held while migrating ("tabbify" in ASCII, as a big-endian
/// integer).
pub const MIGRATION_LOCK: i64 = 0x0074_6162_6269_6679;

/// The advisory lock (two-int form: "tabb", 1) whose holder runs member expiry.
const EXPIRY_LOCK_SQL: &str = "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks \
     WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND classid = 1952539234 \
     AND objid = 1 AND objsubid = 2 AND granted) THEN 1 \
     ELSE CAST(pg_try_advisory_lock(1952539234, 1) AS INT) END";

type Reply<T> = SyncSender<Result<T, StorageError>>;

enum Request {
    Transaction(Vec<Statement>, Reply<Option<i64>>),
    Query(String, Vec<Value>, Reply<Vec<Vec<Value>>>),
}

/// A PostgreSQL database, reached through the connection thread.
#[derive(Debug)]
pub struct Postgres {
    requests: Mutex<Option<Sender<Request>>>,
    thread: Option<JoinHandle<()>>,
    config: postgres::Config,
    /// This process's name in the change log.
    origin: String,
    /// Set when dropped: the watch thread stops.
    stop: Arc<AtomicBool>,
}

fn err(e: &postgres::Error) -> StorageError {
    let message = match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    StorageError::Engine {
        engine: ENGINE,
        message,
    }
}

fn gone() -> StorageError {
    StorageError::Engine {
        engine: ENGINE,
        message: "the database connection thread has stopped".into(),
    }
}

impl Postgres {
    /// Connects to `url`, migrates the schema under the advisory lock, and keeps the
    /// connection on its own thread.
    pub fn connect(url: &str, now_secs: u64) -> Result<Self, StorageError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| StorageError::Config(format!("--database: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_options().is_none() {
            config.options("-c statement_timeout=10000");
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let (tx, rx) = mpsc::channel();
        let (ready, started) = mpsc::sync_channel(1);
        let kept = config.clone();
        // Connecting runs the client's own runtime: on the connection thread too, since
        // the caller may be inside the coordinator's.
        let thread = std::thread::Builder::new()
            .name("tabbify-postgres".into())
            .spawn(move || {
                let conn = Conn::connect(&config).and_then(|mut c| {
                    c.migrate(now_secs)?;
                    Ok(c)
                });
                match conn {
                    Ok(c) => {
                        let _ = ready.send(Ok(()));
                        serve(config, Some(c), rx);
                    }
                    Err(e) => drop(ready.send(Err(e))),
                }
            })
            .map_err(|e| StorageError::Engine {
                engine: ENGINE,
                message: format!("starting the connection thread: {e}"),
            })?;
        started.recv().map_err(|_| gone())??;
        Ok(Self {
            requests: Mutex::new(Some(tx)),
            thread: Some(thread),
            config: kept,
            origin: uuid::Uuid::new_v4().to_string(),
            stop: Arc::default(),
        })
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, StorageError> {
        let (reply, answer) = mpsc::sync_channel(1);
        {
            let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            let sender = requests.as_ref().ok_or_else(gone)?;
            sender.send(make(reply)).map_err(|_| gone())?;
        }
        answer.recv().map_err(|_| gone())?
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the channel ends the thread's loop.
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Engine for Postgres {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn transaction(&mut self, statements: &[Statement]) -> Result<(), StorageError> {
        self.transaction_returning(statements).map(drop)
    }

    fn transaction_returning(
        &mut self,
        statements: &[Statement],
    ) -> Result<Option<i64>, StorageError> {
        let statements = statements.to_vec();
        self.call(|r| Request::Transaction(statements, r))
    }

    fn query(&mut self, sql: &str, columns: &[Value]) -> Result<Vec<Vec<Value>>, StorageError> {
        let (sql, columns) = (sql.to_owned(), columns.to_vec());
        self.call(|r| Request::Query(sql, columns, r))
    }

    fn change_log_origin(&self) -> Option<&str> {
        Some(&self.origin)
    }

    fn expiry_lock(&mut self) -> Result<bool, StorageError> {
        // Taken once per connection (the check keeps the lock's count at one); a new
        // connection after a break must win it again.
        let rows = self.query(EXPIRY_LOCK_SQL, &[Value::Int(0)])?;
        Ok(matches!(
            rows.first().and_then(|r| r.first()),
            Some(Value::Int(1))
        ))
    }

    fn watch(&self, on_change: Box<dyn Fn() + Send>) -> Result<bool, StorageError> {
        let (config, stop) = (self.config.clone(), self.stop.clone());
        std::thread::Builder::new()
            .name("tabbify-pg-listen".into())
            .spawn(move || listen(&config, &stop, &*on_change))
            .map_err(|e| StorageError::Engine {
                engine: ENGINE,
                message: format!("starting the listener thread: {e}"),
            })?;
        Ok(true)
    }
}

/// How often the listener wakes its follower without a notification: a notification
/// lost with a broken connection is caught up at the latest then.
const POLL: Duration = Duration::from_secs(2);

/// The listener thread: a connection of its own that `LISTEN`s to the change channel and
/// calls `on_change` for every notification, after every (re)connect, and every
/// [`POLL`]; reconnects after a second when the connection breaks; ends when `stop` is
/// set.
fn listen(config: &postgres::Config, stop: &AtomicBool, on_change: &dyn Fn()) {
    while !stop.load(Ordering::Relaxed) {
        let mut client = match config.connect(NoTls) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "change log listener: cannot connect; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = client.batch_execute(&format!("LISTEN {}", super::CHANGE_CHANNEL)) {
            tracing::warn!(error = %e, "change log listener: LISTEN failed; retrying");
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        on_change();
        while !stop.load(Ordering::Relaxed) {
            let next = client.notifications().timeout_iter(POLL).next();
            match next {
                Ok(Some(_)) => on_change(),
                Err(e) => {
                    tracing::warn!(error = %e, "change log listener: connection lost");
                    break;
                }
                Ok(None) if client.is_closed() => break,
                Ok(None) => on_change(),
            }
        }
    }
}

/// The connection thread: answers requests until the store is dropped, reconnecting
/// when the connection broke.
fn serve(config: postgres::Config, mut conn: Option<Conn>, requests: Receiver<Request>) {
    for req in requests {
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            conn = match Conn::connect(&config) {
                Ok(c) => Some(c),
                Err(e) => {
                    match req {
                        Request::Transaction(_, r) => drop(r.send(Err(e))),
                        Request::Query(_, _, r) => drop(r.send(Err(e))),
                    }
                    continue;
                }
            };
        }
        let Some(c) = conn.as_mut() else { continue };
        match req {
            Request::Transaction(s, r) => drop(r.send(c.transaction(&s))),
            Request::Query(sql, cols, r) => drop(r.send(c.query(&sql, &cols))),
        }
    }
}

/// One connection with its prepared statements.
struct Conn {
    client: Client,
    prepared: HashMap<&'static str, postgres::Statement>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

/// `?N` placeholders (the form both engines' statements are written in) as PostgreSQL's
/// `$N`. The statements carry no `?` anywhere else.
fn dollar(sql: &str) -> String {
    sql.replace('?', "$")
}

impl Conn {
    fn connect(config: &postgres::Config) -> Result<Self, StorageError> {
        let client = config.connect(NoTls).map_err(|e| err(&e))?;
        Ok(Self {
            client,
            prepared: HashMap::new(),
        })
    }

    fn migrate(&mut self, now_secs: u64) -> Result<(), StorageError> {
        self.client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .map_err(|e| err(&e))?;
        let applied = super::migrate::apply(self, now_secs);
        let unlocked = self
            .client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .map_err(|e| err(&e));
        applied?;
        unlocked.map(drop)
    }

    fn transaction(&mut self, statements: &[Statement]) -> Result<Option<i64>, StorageError> {
        // Prepare outside the transaction (a prepared statement outlives it).
        for s in statements.iter().filter(|s| !s.params.is_empty()) {
            if !self.prepared.contains_key(s.sql) {
                let p = self.client.prepare(&dollar(s.sql)).map_err(|e| err(&e))?;
                self.prepared.insert(s.sql, p);
            }
        }
        let mut tx = self.client.transaction().map_err(|e| err(&e))?;
        let mut returned = None;
        for (i, s) in statements.iter().enumerate() {
            if s.params.is_empty() {
                tx.batch_execute(s.sql).map_err(|e| err(&e))?;
                continue;
            }
            let params: Vec<Box<dyn ToSql + Sync>> = s
                .params
                .iter()
                .map(|v| -> Box<dyn ToSql + Sync> {
                    match v {
                        Value::Int(i) => Box::new(*i),
                        Value::Text(t) => Box::new(t.clone()),
                        Value::NullInt => Box::new(None::<i64>),
                        Value::NullText => Box::new(None::<String>),
                    }
                })
                .collect();
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|b| b.as_ref()).collect();
            let stmt = &self.prepared[s.sql];
            if i + 1 == statements.len() && s.sql.contains("RETURNING") {
                let row = tx.query_one(stmt, &refs).map_err(|e| err(&e))?;
                returned = Some(row.try_get::<_, i64>(0).map_err(|e| err(&e))?);
                continue;
            }
            let n = tx.execute(stmt, &refs).map_err(|e| err(&e))?;
            if s.must_change && n == 0 {
                return Err(StorageError::Conflict {
                    engine: ENGINE,
                    message: format!("no row changed by `{}`", s.sql),
                });
            }
        }
        // Dropped without commit (an error above) = rolled back.
        tx.commit().map_err(|e| err(&e))?;
        Ok(returned)
    }

    fn query(&mut self, sql: &str, columns: &[Value]) -> Result<Vec<Vec<Value>>, StorageError> {
        let rows = self.client.query(sql, &[]).map_err(|e| err(&e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut vals = Vec::with_capacity(columns.len());
            for (i, want) in columns.iter().enumerate() {
                let ty = row.columns().get(i).map(|c| c.type_().clone());
                let bad = || StorageError::Corrupt {
                    engine: ENGINE,
                    message: format!("column {i} of `{sql}` has type {ty:?}"),
                };
                let v = match want {
                    Value::Int(_) | Value::NullInt => {
                        let n: Option<i64> = match ty {
                            Some(Type::INT8) => row.try_get(i).map_err(|_| bad())?,
                            Some(Type::INT4) => row
                                .try_get::<_, Option<i32>>(i)
                                .map_err(|_| bad())?
                                .map(i64::from),
                            _ => return Err(bad()),
                        };
                        n.map_or(Value::NullInt, Value::Int)
                    }
                    Value::Text(_) | Value::NullText => {
                        let s: Option<String> = row.try_get(i).map_err(|_| bad())?;
                        s.map_or(Value::NullText, Value::Text)
                    }
                };
                vals.push(v);
            }
            out.push(vals);
        }
        Ok(out)
    }
}

impl Engine for Conn {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn transaction(&mut self, statements: &[Statement]) -> Result<(), StorageError> {
        Conn::transaction(self, statements).map(drop)
    }

    fn query(&mut self, sql: &str, columns: &[Value]) -> Result<Vec<Vec<Value>>, StorageError> {
        Conn::query(self, sql, columns)
    }
}
