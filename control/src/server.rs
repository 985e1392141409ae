//! The coordinator service: configuration, shared state, the HTTP routes, and the
//! accept loop (plain TCP or mTLS, HTTP/1.1 via hyper).
//!
//! Request pipeline: accept → connection caps (overall and per source IP) → TLS handshake
//! within [`Config::tls_handshake_timeout`] (a client certificate, if presented, verified
//! against the mesh CA; its CN becomes the connection's identity) → hyper HTTP/1.1 with a
//! header read timeout → [`Coordinator::handle`] routes, reads at most
//! [`MAX_BODY_BYTES`](crate::api::MAX_BODY_BYTES) of JSON within a timeout, and maps every
//! failure through [`ApiError`] once.
//!
//! Who may call what: the open routes (`/health`, `/openapi.json`, `/swagger-ui`, the
//! dashboard's assets under `/ui` and its login link `/ui/login`) need nothing; every other
//! route needs a client certificate of the mesh CA (401 without one), or a dashboard
//! session cookie ([`crate::sessions`]), which reaches the admin routes only (403
//! elsewhere) and must carry its CSRF token in `x-csrf-token` on every method but `GET`
//! (403 `csrf` without it). A session cannot mint login links (an admin certificate must).
//!
//! Caps (see [`crate::limits`]): a connection over a cap is not served. Up to
//! [`MAX_REFUSALS_IN_FLIGHT`] such connections at a time get their first request answered
//! with the refusal (503 `overloaded` or 429 `too_many_connections`, JSON) and are then
//! closed; beyond that they are closed at once. Both are counted. SSE streams per identity
//! (429 `too_many_streams`) and heartbeats/registrations per identity (token bucket, 429
//! `rate_limited`) are checked per request.
//!
//! Locking: one `RwLock` over the registry and the store, never held across an await.
//! Writers (register, heartbeat, revoke, policy, tokens, expiry) hold it for an in-memory
//! update, at most a few database commits (each durable before the request is answered;
//! see [`crate::store`]), and one broadcast send per committed change, which keeps the
//! event order equal to the id order. With a database, member changes go through
//! [`crate::roster::Core`] (preview, commit, then events under the commit's id).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::api::*;
use crate::auth::AuthClient;
use crate::clock::Clock;
use crate::error::ApiError;
use crate::limits::{ConnLimits, ConnRefusal, RateConfig, RateLimiter, StreamLimits};
use crate::metrics::{Gauges, Metrics};
use crate::policy::Policy;
use crate::registry::{HeartbeatError, Limits, MoveError, NewPeer, Registry};
use crate::sse::{self, ChannelBody, Resync, StreamConfig, Subscriber};
use crate::store::{IdentityRecord, Store, StoredPolicy, TokenRecord};
use crate::traffic::Traffic;
use crate::{tokens, ula};

/// Change-log entries applied per step of a catch-up (well under the stream broadcast
/// capacity, [`Limits::broadcast`]).
pub const CATCH_UP_CHUNK: usize = 256;
/// The pause between two steps of a long catch-up.
pub const CATCH_UP_PAUSE: Duration = Duration::from_millis(5);
/// How often coalesced roster changes are checked for the end of their window.
pub const FLUSH_PERIOD: Duration = Duration::from_millis(100);
/// Header that names the caller when mTLS is off (loopback development only).
pub const INSECURE_IDENTITY_HEADER: &str = "x-tabbify-identity";
/// Environment variable that must be `1` for `--insecure-no-mtls`.
pub const ALLOW_INSECURE_ENV: &str = "TABBIFY_ALLOW_INSECURE";
/// Most endpoints a peer may report.
pub const MAX_ENDPOINTS: usize = 64;
/// Most app ULAs a peer may announce.
pub const MAX_HOSTED_APPS: usize = 1024;
/// Most tags in a request.
pub const MAX_TAGS_PER_PEER: usize = 64;
/// Connections over a cap that are answered with the refusal at the same time; more are
/// closed without an answer.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// Tags and name a join token grants, and the hash of a local token to spend.
type Claims = (Vec<String>, Option<String>, Option<String>);

/// The response body type of every route.
pub type ResponseBody = BoxBody<Bytes, Infallible>;

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The policy is invalid.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The `--auth-url` is unusable.
    #[error("--auth-url: {0}")]
    AuthUrl(String),
    /// Plaintext was requested where it is not allowed.
    #[error("{0}")]
    Insecure(String),
}

/// Coordinator settings, validated once by the binary (or a test).
#[derive(Debug, Clone)]
pub struct Config {
    /// Legacy `--admin CN` list. With mTLS an admin is a certificate carrying the admin
    /// role (`tabbify-mesh-ca issue-admin`); when this list is not empty its CN must also
    /// be in it (a narrowing, never a grant). Without mTLS (loopback development) the
    /// identity header must name an entry of this list.
    pub admins: BTreeSet<String>,
    /// Directory of the SQLite database `state.db` (and of a `state.log` to import);
    /// `None` with no `database` keeps state in memory.
    pub state_dir: Option<PathBuf>,
    /// The database, when not SQLite under `state_dir` (`--database postgres://…`).
    pub database: Option<crate::storage::Database>,
    /// The policy from `--policy-file`.
    pub policy: PolicyDocument,
    /// blake3 (hex) of the policy file's bytes.
    pub policy_file_hash: String,
    /// The `--auth-url` client, if any.
    pub auth: Option<AuthClient>,
    /// How often peers must send a heartbeat.
    pub heartbeat_interval: Duration,
    /// SSE keepalive and slow-client limits.
    pub stream: StreamConfig,
    /// Event buffer sizes.
    pub limits: Limits,
    /// Whether mTLS is off (then identities come from [`INSECURE_IDENTITY_HEADER`]).
    pub insecure: bool,
    /// How long a client may take to send a request body (and headers).
    pub request_timeout: Duration,
    /// How long a stale peer stays in rosters before it is removed (`expired`).
    pub stale_after: Duration,
    /// How long a client may take to complete the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// PostgreSQL: the change log keeps entries this long and at most this many (the
    /// expiry-lock holder prunes it on its sweeps).
    pub change_log_keep: (Duration, u64),
    /// Most SSE streams one identity may hold open.
    pub max_streams_per_identity: usize,
    /// Most open connections overall.
    pub max_connections: usize,
    /// Most open connections from one source IP.
    pub max_connections_per_ip: usize,
    /// Heartbeats and registrations per identity (token bucket).
    pub heartbeat_rate: RateConfig,
    /// The local addresses the STUN server answers on ([`crate::stun`]); register and
    /// heartbeat responses list them as `stun_servers` (an unspecified IP replaced by the
    /// one the client connected to). Empty: no STUN server.
    pub stun_addrs: Vec<SocketAddr>,
    /// The relays advertised in register and heartbeat answers (`--relay`, `--relay-url`);
    /// a heartbeat's `home_relay` must be one of them.
    pub relays: crate::relays::Relays,
    /// Signs relay tokens (`POST /v1/relay/token`); see [`crate::relay_tokens`]. `None`:
    /// the route answers 404.
    pub relay_token_key: Option<Arc<tabbify_api::relay_token::SigningKey>>,
    /// The mesh DNS domain sent in register answers (`--dns-domain`, normalized by
    /// [`tabbify_api::dns::normalize_domain`]).
    pub dns_domain: String,
}

impl Config {
    /// Defaults around a policy: 10 s heartbeats, 15 s keepalives, 30 s write timeout,
    /// stale peers kept 1 h, 3 s TLS handshakes, 4 streams per identity, 20,000
    /// connections (512 per source IP), heartbeats in bursts of 10 refilled at 1/s.
    pub fn new(policy: PolicyDocument, policy_file_hash: String) -> Self {
        Self {
            admins: BTreeSet::new(),
            state_dir: None,
            database: None,
            policy,
            policy_file_hash,
            auth: None,
            heartbeat_interval: Duration::from_secs(10),
            stream: StreamConfig {
                keepalive: Duration::from_secs(15),
                write_timeout: Duration::from_secs(30),
            },
            limits: Limits::default(),
            insecure: false,
            request_timeout: Duration::from_secs(10),
            stale_after: Duration::from_secs(3600),
            tls_handshake_timeout: Duration::from_secs(3),
            change_log_keep: (Duration::from_secs(86_400), 100_000),
            max_streams_per_identity: 4,
            max_connections: 20_000,
            max_connections_per_ip: 512,
            heartbeat_rate: RateConfig {
                burst: 10,
                per_sec: 1.0,
            },
            stun_addrs: Vec::new(),
            relays: crate::relays::Relays::default(),
            // A key for this process; the binary loads the state directory's instead.
            relay_token_key: tabbify_api::relay_token::SigningKey::generate()
                .ok()
                .map(|(k, _)| Arc::new(k)),
            dns_domain: tabbify_api::dns::DEFAULT_DOMAIN.to_owned(),
        }
    }
}

/// Refuses plaintext unless it was asked for explicitly, allowed by the environment, and
/// bound to loopback.
pub fn check_insecure(bind: SocketAddr, allow_env: Option<&str>) -> Result<(), StartError> {
    if allow_env != Some("1") {
        return Err(StartError::Insecure(format!(
            "--insecure-no-mtls needs the environment variable {ALLOW_INSECURE_ENV}=1"
        )));
    }
    if !bind.ip().is_loopback() {
        return Err(StartError::Insecure(format!(
            "--insecure-no-mtls only binds loopback addresses, not {bind}"
        )));
    }
    Ok(())
}

/// What the accept loop knows about a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address (its IP is the reflexive IP).
    pub remote: SocketAddr,
    /// The address the client connected to (its IP goes into `stun_servers`), when known.
    pub local: Option<SocketAddr>,
    /// The verified client certificate's CN (mTLS).
    pub identity: Option<String>,
    /// Whether the verified client certificate carries the admin role
    /// ([`ADMIN_ROLE_URI`](crate::api::ADMIN_ROLE_URI)).
    pub admin_role: bool,
}

use crate::roster::Core;

/// The coordinator: shared state plus the route handlers.
pub struct Coordinator {
    core: RwLock<Core>,
    config: Config,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    rate: std::sync::Mutex<RateLimiter>,
    conns: ConnLimits,
    streams: StreamLimits,
    refusals: Arc<std::sync::atomic::AtomicUsize>,
    /// Dashboard login links and sessions when there is no database (this process only);
    /// with one they live in it ([`crate::sessions`]).
    sessions: std::sync::Mutex<crate::sessions::Memory>,
    /// Whether sessions live in the database (shared by its coordinators, kept over
    /// restarts).
    sessions_in_db: bool,
    /// The latest traffic report of each member (memory only, see [`crate::traffic`]).
    traffic: std::sync::Mutex<Traffic>,
    /// The members whose traffic report the admin streams should send (one id per
    /// update, at most one per member per heartbeat interval).
    traffic_tx: tokio::sync::broadcast::Sender<String>,
    /// The name of this coordinator's event log ([`EVENT_LOG_HEADER`]): the database's
    /// (a `meta` row) when its change log numbers the events, else random per start.
    event_log: String,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Opens the store, settles the policy (the stored one unless the policy file changed
    /// since it was recorded) and builds an empty roster.
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Arc<Self>, StartError> {
        let now_secs = clock.now_ms() / 1000;
        let mut store = match (&config.database, &config.state_dir) {
            (Some(db), dir) => Store::open_database(db, dir.as_deref(), now_secs)?,
            (None, Some(dir)) => Store::open(dir, now_secs)?,
            (None, None) => Store::in_memory(),
        };
        tracing::info!(engine = store.engine_name(), "state store open");
        store.prune_tokens(now_secs)?;
        let (revision, doc) = match store.policy() {
            Some(p) if p.file_hash == config.policy_file_hash => (p.revision, p.document.clone()),
            stored => {
                let revision = stored.map_or(1, |p| p.revision + 1);
                Policy::compile(config.policy.clone())?;
                store.set_policy(StoredPolicy {
                    revision,
                    file_hash: config.policy_file_hash.clone(),
                    document: config.policy.clone(),
                })?;
                (revision, config.policy.clone())
            }
        };
        let policy = Arc::new(Policy::compile(doc)?);
        tracing::info!(revision, "policy in force");
        let registry = Registry::new(policy, revision, config.limits);
        // On a database with a change log the event ids are the log's, the same on every
        // coordinator: so is the log's name. Elsewhere a random one per start.
        let event_log = match store.shared_event_log()? {
            Some(name) => name,
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        let sessions_in_db = store.is_durable();
        let core = Core::new(registry, store, clock.now_ms());
        Ok(Arc::new(Self {
            core: RwLock::new(core),
            rate: std::sync::Mutex::new(RateLimiter::new(config.heartbeat_rate)),
            conns: ConnLimits::new(config.max_connections, config.max_connections_per_ip),
            streams: StreamLimits::new(config.max_streams_per_identity),
            refusals: Arc::default(),
            sessions: std::sync::Mutex::default(),
            sessions_in_db,
            traffic: std::sync::Mutex::default(),
            traffic_tx: tokio::sync::broadcast::channel(TRAFFIC_CHANNEL).0,
            event_log,
            config,
            clock,
            metrics: Metrics::default(),
        }))
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn read(&self) -> RwLockReadGuard<'_, Core> {
        // A panic while holding the lock leaves consistent data (every update is applied
        // before the next await point), so a poisoned lock is still usable.
        self.core.read().unwrap_or_else(|e| e.into_inner())
    }

    fn traffic(&self) -> std::sync::MutexGuard<'_, Traffic> {
        self.traffic.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Core> {
        self.core.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Open client connections (those holding a slot under the connection caps).
    pub fn connections_open(&self) -> usize {
        self.conns.open()
    }

    /// Number of registered peers.
    pub fn peer_count(&self) -> usize {
        self.read().registry.len()
    }

    /// Checks the one-identity-one-key invariants (for tests and fuzzing): every registered
    /// peer's key is the key its identity has admitted, and its id and ULA derive from its
    /// identity. (The store itself never binds a key to two identities.) `Err` names the
    /// first violation.
    pub fn check_identity_invariants(&self) -> Result<(), String> {
        let core = self.read();
        for cn in core.store.identities().keys() {
            let Some(p) = core.registry.peer_by_identity(cn) else {
                continue;
            };
            let admitted = core.store.identity(cn).and_then(|r| r.key.clone());
            if admitted.as_deref() != Some(p.key_b64.as_str()) {
                return Err(format!(
                    "peer {} of {cn:?} uses key {} but {admitted:?} is admitted",
                    p.id, p.key_b64
                ));
            }
            if p.id != ula::identity_peer_id(cn) || p.ula != ula::identity_ula(cn) {
                return Err(format!("peer {} of {cn:?} has a foreign id or ULA", p.id));
            }
            if core.store.owner_of_key(&p.key_b64) != Some(cn.as_str()) {
                return Err(format!("key {} of {cn:?} is owned elsewhere", p.key_b64));
            }
        }
        Ok(())
    }

    /// Marks stale the peers that missed three heartbeats and removes those stale for
    /// longer than `stale_after`; forgets full rate-limit buckets.
    pub fn sweep(&self) -> crate::registry::Expiry {
        let timeout = self.config.heartbeat_interval.as_millis() as u64
            * u64::from(MISSED_HEARTBEATS_TO_EXPIRE);
        let now = self.clock.now_ms();
        let durable = self.read().store.is_durable();
        let out = if durable {
            self.write().sweep(
                &self.metrics,
                crate::roster::Timing {
                    now_ms: now,
                    heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
                    stale_after_ms: self.config.stale_after.as_millis() as u64,
                    change_log_keep: self.config.change_log_keep,
                },
            )
        } else {
            self.write()
                .registry
                .expire(now, timeout, self.config.stale_after.as_millis() as u64)
        };
        for _ in &out.stale {
            Metrics::inc(&self.metrics.stale_marks);
        }
        for _ in &out.removed {
            Metrics::inc(&self.metrics.expirations);
        }
        self.rate().prune(now);
        out
    }

    /// Announces the coalesced roster changes whose window has ended.
    pub fn flush(&self) {
        if self.read().registry.has_pending() {
            let now = self.clock.now_ms();
            self.write().registry.flush(now);
        }
    }

    /// Applies what other coordinators on the same database committed since the last
    /// call (see [`crate::follow`] and [`crate::roster`]): their members, policy and
    /// revocations go into force here, each entry's events on every stream under the
    /// entry's change-log id. Returns how many entries were applied.
    ///
    /// A long backlog (after an outage) is applied in chunks of [`CATCH_UP_CHUNK`]
    /// entries, releasing the lock and pausing between them, so the streams drain their
    /// events as they come instead of falling more than the broadcast capacity behind
    /// (which would resync them with snapshots).
    pub fn catch_up(&self) -> Result<usize, crate::store::StoreError> {
        let mut total = 0;
        loop {
            let more = {
                let mut guard = self.write();
                let core = &mut *guard;
                let (entries, more) = core.store.catch_up_some(CATCH_UP_CHUNK)?;
                for (id, changes) in &entries {
                    core.apply_entry(&self.metrics, *id, changes);
                }
                if core.store.has_change_log() {
                    core.registry
                        .advance_to(u64::try_from(core.store.last_change()).unwrap_or(0));
                }
                total += entries.len();
                more
            };
            if !more {
                return Ok(total);
            }
            std::thread::sleep(CATCH_UP_PAUSE);
        }
    }

    /// Has the store call `on_change` when other coordinators may have committed
    /// changes; `false` without a shared database.
    pub fn watch_database(
        &self,
        on_change: Box<dyn Fn() + Send>,
    ) -> Result<bool, crate::store::StoreError> {
        self.read().store.watch(on_change)
    }

    /// Runs [`Self::sweep`] every half heartbeat interval and [`Self::flush`] every
    /// [`FLUSH_PERIOD`] until the coordinator is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let period = self.config.heartbeat_interval / 2;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
            let mut flush = tokio::time::interval(FLUSH_PERIOD);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let Some(c) = weak.upgrade() else { return };
                        let out = c.sweep();
                        if !out.stale.is_empty() || !out.removed.is_empty() {
                            tracing::info!(
                                stale = out.stale.len(),
                                expired = out.removed.len(),
                                "peers missed their heartbeats"
                            );
                        }
                    }
                    _ = flush.tick() => {
                        let Some(c) = weak.upgrade() else { return };
                        c.flush();
                    }
                }
            }
        })
    }

    fn rate(&self) -> std::sync::MutexGuard<'_, RateLimiter> {
        self.rate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a token from `key`'s heartbeat bucket or refuses with 429.
    fn check_rate(&self, key: &str) -> Result<(), ApiError> {
        if self.rate().allow(key, self.clock.now_ms()) {
            Ok(())
        } else {
            Metrics::inc(&self.metrics.rate_limited);
            Err(ApiError::RateLimited(format!(
                "too many heartbeats/registrations from {key:?}: at most {} at once, {} per second",
                self.config.heartbeat_rate.burst, self.config.heartbeat_rate.per_sec
            )))
        }
    }

    /// Handles one request.
    pub async fn handle<B>(
        self: &Arc<Self>,
        conn: &ConnInfo,
        req: Request<B>,
    ) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let resp = match self.route(conn, req).await {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, ApiError::KeyTaken | ApiError::KeyMismatch(_)) {
                    Metrics::inc(&self.metrics.key_refusals);
                }
                if e.status().is_server_error() {
                    tracing::warn!(error = %e, "request failed");
                }
                json_response(e.status(), &e.body())
            }
        };
        let s = resp.status();
        Metrics::inc(if s.is_server_error() {
            &self.metrics.responses_5xx
        } else if s.is_client_error() {
            &self.metrics.responses_4xx
        } else {
            &self.metrics.responses_ok
        });
        resp
    }

    async fn route<B>(
        self: &Arc<Self>,
        conn: &ConnInfo,
        req: Request<B>,
    ) -> Result<Response<ResponseBody>, ApiError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        if let Some(r) = self.open_route(&method, &path, req.uri())? {
            return Ok(r);
        }
        // A certificate's identity wins; without one, a dashboard session (admin routes
        // only, CSRF token on changes); without either, 401 (with mTLS).
        let session_conn;
        let mut session_id = None;
        let (conn, identity) = match self.identity(conn, req.headers()) {
            Some(i) => (conn, Some(i)),
            None => match self.session(req.headers())? {
                Some((id, s)) => {
                    if !session_route(&method, &path) {
                        return Err(ApiError::Forbidden(
                            "a dashboard session reaches the admin routes only".into(),
                        ));
                    }
                    if method != Method::GET {
                        let sent = req
                            .headers()
                            .get(crate::sessions::CSRF_HEADER)
                            .map(|v| v.as_bytes());
                        if !sent.is_some_and(|v| ct_eq(v, s.csrf.as_bytes())) {
                            Metrics::inc(&self.metrics.csrf_refusals);
                            return Err(ApiError::Csrf);
                        }
                    }
                    session_conn = ConnInfo {
                        identity: Some(s.admin.clone()),
                        admin_role: true,
                        ..conn.clone()
                    };
                    session_id = Some(id);
                    (&session_conn, Some(s.admin))
                }
                None if self.config.insecure => (conn, None),
                None => {
                    return Err(ApiError::Unauthorized(
                        "this route needs a client certificate signed by the mesh CA, or a \
                         dashboard session (tabbify-mesh-coordinator admin-login)"
                            .into(),
                    ))
                }
            },
        };
        let ok = |v: &dyn erased::Json| Ok(v.respond(StatusCode::OK));
        match (method.clone(), path.as_str()) {
            (Method::POST, PATH_LOGIN_LINKS) => {
                if session_id.is_some() {
                    return Err(ApiError::Forbidden(
                        "a dashboard session cannot mint login links: use an admin certificate"
                            .into(),
                    ));
                }
                let who = self.admin(conn, identity.as_deref())?;
                let body: LoginLinkRequest = self.read_json(req).await?;
                ok(&self.mint_login_link(&who, body)?)
            }
            (Method::GET | Method::DELETE, PATH_ADMIN_SESSION) => {
                let no_session =
                    || ApiError::NotFound("this request carries no dashboard session".into());
                let id = session_id.ok_or_else(no_session)?;
                let now = self.clock.now_ms();
                let s = self
                    .with_sessions(|b| crate::sessions::get(b, &id, now))?
                    .ok_or_else(no_session)?;
                let view = AdminSession {
                    admin: s.admin.clone(),
                    csrf_token: s.csrf,
                    expires_at: s.expires_ms / 1000,
                };
                if method == Method::GET {
                    return ok(&view);
                }
                self.with_sessions(|b| crate::sessions::logout(b, &id))?;
                audit(&s.admin, "dashboard.logout", "session");
                let mut r = json_response(StatusCode::OK, &view);
                if let Ok(v) = header::HeaderValue::from_str(&crate::sessions::clear_cookie()) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
                Ok(r)
            }
            (Method::GET, PATH_ADMIN_MEMBERS) => {
                self.admin(conn, identity.as_deref())?;
                ok(&self.admin_members())
            }
            (Method::GET, PATH_ADMIN_REACH) => {
                self.admin(conn, identity.as_deref())?;
                ok(&crate::ui::reach(&self.read().registry))
            }
            (Method::GET, PATH_ADMIN_STREAM) => {
                let who = self.admin(conn, identity.as_deref())?;
                self.admin_stream(&who)
            }
            (Method::POST, PATH_POLICY_TEST) => {
                self.admin(conn, identity.as_deref())?;
                let body: PolicyTestRequest = self.read_json(req).await?;
                ok(&self.policy_test(body)?)
            }
            (Method::GET, "/metrics") => {
                let text = {
                    let core = self.read();
                    self.metrics.render(Gauges {
                        peers: core.registry.len() as u64,
                        classes: core.registry.visibility().len() as u64,
                        last_event_id: core.registry.last_event_id(),
                        policy_revision: core.registry.revision(),
                        stale_peers: core.registry.stale_count() as u64,
                        connections: self.conns.open() as u64,
                    }) + &crate::paths::PathGauges::of(core.registry.peers()).render()
                };
                Ok(text_response("text/plain; version=0.0.4", text))
            }
            (Method::POST, PATH_REGISTER) => {
                let relays = self.config.relays.advertised(req.headers());
                let body: RegisterRequest = self.read_json(req).await?;
                ok(&self.register(conn, identity, body, relays).await?)
            }
            (Method::POST, PATH_HEARTBEAT) => {
                let relays = self.config.relays.advertised(req.headers());
                let body: HeartbeatRequest = self.read_json(req).await?;
                ok(&self.heartbeat(conn, identity, body, relays)?)
            }
            (Method::GET, PATH_PEERS) => {
                let core = self.read();
                let id = resolve_peer(
                    &core.registry,
                    identity.as_deref(),
                    query_peer_id(req.uri()),
                )?;
                ok(&PeersResponse {
                    event_id: core.registry.last_event_id(),
                    peers: core.registry.roster(&id),
                })
            }
            (Method::GET, PATH_PEERS_STREAM) => self.stream(identity, req),
            (Method::POST, PATH_RELAY_TOKEN) => {
                let body: RelayTokenRequest = self.read_json(req).await?;
                ok(&self.relay_token(identity, body)?)
            }
            (Method::POST, PATH_ROTATE_KEY) => {
                let body: RotateKeyRequest = self.read_json(req).await?;
                ok(&self.rotate_key(identity, body)?)
            }
            (Method::POST, PATH_LEAVE) => {
                let _: LeaveRequest = self.read_json(req).await?;
                ok(&self.leave(identity)?)
            }
            (Method::GET, PATH_POLICY) => {
                self.admin(conn, identity.as_deref())?;
                let core = self.read();
                ok(&PolicyResponse {
                    revision: core.registry.revision(),
                    policy: core.registry.policy().document().clone(),
                })
            }
            (Method::PUT, PATH_POLICY) => {
                let who = self.admin(conn, identity.as_deref())?;
                let doc: PolicyDocument = self.read_json(req).await?;
                ok(&self.put_policy(&who, doc)?)
            }
            (Method::POST, PATH_TOKENS) => {
                let who = self.admin(conn, identity.as_deref())?;
                let body: TokenRequest = self.read_json(req).await?;
                ok(&self.mint_token(&who, body)?)
            }
            (Method::GET, PATH_TOKENS) => {
                self.admin(conn, identity.as_deref())?;
                ok(&self.list_tokens())
            }
            (Method::DELETE, p) if p.starts_with("/v1/tokens/") => {
                let who = self.admin(conn, identity.as_deref())?;
                ok(&self.delete_token(&who, &p["/v1/tokens/".len()..])?)
            }
            (Method::GET, PATH_REVOCATIONS) => {
                self.admin(conn, identity.as_deref())?;
                ok(&self.revocations())
            }
            (method, p) if p.starts_with(PATH_IDENTITIES_PREFIX) => {
                let who = self.admin(conn, identity.as_deref())?;
                let rest = &p[PATH_IDENTITIES_PREFIX.len()..];
                match (method, rest.split_once('/')) {
                    (Method::DELETE, None) => ok(&self.revoke_identity(&who, rest)?),
                    (Method::POST, Some((cn, "readmit"))) => ok(&self.readmit_identity(&who, cn)?),
                    (Method::DELETE, Some((cn, "key"))) => ok(&self.clear_key(&who, cn)?),
                    (_, None | Some((_, "readmit" | "key"))) => Err(ApiError::MethodNotAllowed),
                    _ => Err(ApiError::NotFound(format!("no route {p}"))),
                }
            }
            (Method::DELETE, p) if p.starts_with("/v1/mesh/peers/") && p != PATH_PEERS_STREAM => {
                let who = self.admin(conn, identity.as_deref())?;
                let peer_id = &p["/v1/mesh/peers/".len()..];
                let cn = self.identity_of_peer(peer_id)?;
                self.revoke_identity(&who, &cn)?;
                ok(&RevokeResponse {
                    peer_id: peer_id.to_owned(),
                    revoked: true,
                })
            }
            (Method::POST, p) if p.starts_with("/v1/apps/") => {
                let who = self.admin(conn, identity.as_deref())?;
                let uuid = p["/v1/apps/".len()..]
                    .strip_suffix("/move")
                    .ok_or_else(|| ApiError::NotFound(format!("no route {p}")))?;
                let uuid = uuid::Uuid::parse_str(uuid)
                    .map_err(|e| ApiError::BadRequest(format!("bad app uuid {uuid:?}: {e}")))?;
                let body: MoveAppRequest = self.read_json(req).await?;
                ok(&self.move_app(&who, uuid, body)?)
            }
            (Method::POST, PATH_CLIENTS) => {
                let who = self.admin(conn, identity.as_deref())?;
                let body: ClientCreateRequest = self.read_json(req).await?;
                Ok(json_response(
                    StatusCode::CREATED,
                    &self.create_client(&who, body)?,
                ))
            }
            (Method::GET, PATH_CLIENTS) => {
                self.admin(conn, identity.as_deref())?;
                let core = self.read();
                let mut clients: Vec<ClientInfo> =
                    core.registry.clients().map(|c| c.info()).collect();
                clients.sort_by(|a, b| a.display_name.cmp(&b.display_name));
                ok(&ClientsResponse { clients })
            }
            (Method::DELETE, p) if p.starts_with("/v1/clients/") => {
                let who = self.admin(conn, identity.as_deref())?;
                ok(&self.revoke_client(&who, &p["/v1/clients/".len()..])?)
            }
            (Method::GET, PATH_ROUTES) => {
                self.admin(conn, identity.as_deref())?;
                ok(&RoutesResponse {
                    routes: self.read().registry.route_infos(),
                })
            }
            (method, p) if p.starts_with("/v1/routes/") => {
                let who = self.admin(conn, identity.as_deref())?;
                let rest = &p["/v1/routes/".len()..];
                match (method, rest.split_once('/')) {
                    (Method::POST, Some((id, "approve"))) => {
                        ok(&self.approve_route(&who, id, true)?)
                    }
                    (Method::DELETE, Some((id, "approve"))) => {
                        ok(&self.approve_route(&who, id, false)?)
                    }
                    (_, Some((_, "approve"))) => Err(ApiError::MethodNotAllowed),
                    _ => Err(ApiError::NotFound(format!("no route {p}"))),
                }
            }
            (Method::DELETE, p) if p.starts_with("/v1/revocations/") => {
                let who = self.admin(conn, identity.as_deref())?;
                ok(&self.readmit_peer(&who, &p["/v1/revocations/".len()..])?)
            }
            (_, p) if known_path(p) => Err(ApiError::MethodNotAllowed),
            (_, p) => Err(ApiError::NotFound(format!("no route {p}"))),
        }
    }

    /// The routes that need no credential: `/health`, `/openapi.json`, Swagger UI, the
    /// dashboard's assets and its login link. `None` for every other path.
    fn open_route(
        &self,
        method: &Method,
        path: &str,
        uri: &http::Uri,
    ) -> Result<Option<Response<ResponseBody>>, ApiError> {
        let open = matches!(path, "/health" | "/openapi.json" | "/swagger-ui" | "/ui")
            || path.starts_with("/swagger-ui/")
            || path.starts_with("/ui/");
        if !open {
            return Ok(None);
        }
        if *method != Method::GET {
            return Err(ApiError::MethodNotAllowed);
        }
        let not_found = || ApiError::NotFound(format!("no route {path}"));
        Ok(Some(match path {
            "/health" => {
                let core = self.read();
                json_response(
                    StatusCode::OK,
                    &Health {
                        status: "ok".into(),
                        peers: core.registry.len() as u64,
                        policy_revision: core.registry.revision(),
                    },
                )
            }
            "/openapi.json" => json_response(StatusCode::OK, &crate::openapi::document()),
            "/ui/login" => self.login(uri)?,
            p if p.starts_with("/swagger-ui") => {
                let (ct, body) = crate::openapi::swagger_ui(p).ok_or_else(not_found)?;
                let mut r = Response::new(Full::new(Bytes::from_static(body)).boxed());
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
                r
            }
            p => {
                let (ct, body) = crate::ui::asset(p).ok_or_else(not_found)?;
                let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
                page_headers(r.headers_mut());
                r
            }
        }))
    }

    /// `GET /ui/login?link=…`: spends a login link and answers 303 to `/ui/` with the
    /// session cookie; a used, expired or unknown link is 401 and sets nothing.
    fn login(&self, uri: &http::Uri) -> Result<Response<ResponseBody>, ApiError> {
        let link = uri
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("link=")))
            .filter(|l| !l.is_empty())
            .ok_or_else(|| {
                ApiError::BadRequest(
                    "missing ?link=: mint one with tabbify-mesh-coordinator admin-login".into(),
                )
            })?;
        let now = self.clock.now_ms();
        let redeemed = self.with_sessions(|b| crate::sessions::redeem(b, link, now));
        let (id, session) = redeemed.map_err(|e| {
            Metrics::inc(&self.metrics.login_refusals);
            match e {
                crate::sessions::LinkError::Store(e) => ApiError::from(e),
                e => ApiError::Unauthorized(e.to_string()),
            }
        })?;
        Metrics::inc(&self.metrics.logins);
        audit(&session.admin, "dashboard.login", "session");
        let cookie = header::HeaderValue::from_str(&crate::sessions::set_cookie(&id))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::SEE_OTHER;
        let h = r.headers_mut();
        h.insert(header::LOCATION, header::HeaderValue::from_static("/ui/"));
        h.insert(header::SET_COOKIE, cookie);
        page_headers(h);
        Ok(r)
    }

    /// Runs `f` on where sessions live: the database (under the core's lock, which owns
    /// the connection) or this process's memory.
    fn with_sessions<T>(&self, f: impl FnOnce(&mut dyn crate::sessions::Backend) -> T) -> T {
        if self.sessions_in_db {
            let mut core = self.write();
            f(&mut core.store)
        } else {
            let mut mem = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut *mem)
        }
    }

    /// The live dashboard session named by the request's cookie, with its id. A cookie
    /// of the wrong shape is never looked up; a database that fails is 503.
    fn session(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<(String, crate::sessions::Session)>, ApiError> {
        let now = self.clock.now_ms();
        let ids: Vec<&str> = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| crate::sessions::cookie_value(v, crate::sessions::COOKIE))
            .filter(|id| crate::sessions::plausible_id(id))
            .take(4)
            .collect();
        if ids.is_empty() {
            return Ok(None);
        }
        self.with_sessions(|b| {
            for id in ids {
                if let Some(s) = crate::sessions::get(b, id, now)? {
                    return Ok(Some((id.to_owned(), s)));
                }
            }
            Ok(None)
        })
        .map_err(|e: crate::store::StoreError| ApiError::from(e))
    }

    /// `POST /v1/admin/login-links`.
    fn mint_login_link(
        &self,
        who: &str,
        req: LoginLinkRequest,
    ) -> Result<LoginLinkResponse, ApiError> {
        use crate::sessions::{DEFAULT_LINK_TTL_SECS, MAX_LINK_TTL_SECS};
        let ttl = req.ttl_secs.unwrap_or(DEFAULT_LINK_TTL_SECS);
        if ttl == 0 || ttl > MAX_LINK_TTL_SECS {
            return Err(ApiError::BadRequest(format!(
                "ttl_secs must be 1..={MAX_LINK_TTL_SECS}"
            )));
        }
        let now = self.clock.now_ms();
        let (link, expires_ms) =
            self.with_sessions(|b| crate::sessions::mint_link(b, who, ttl, now))?;
        audit(
            who,
            "dashboard.login_link",
            &format!("expires {}", expires_ms / 1000),
        );
        Ok(LoginLinkResponse {
            path: format!("/ui/login?link={link}"),
            link,
            expires_at: expires_ms / 1000,
        })
    }

    /// `GET /v1/admin/members`.
    fn admin_members(&self) -> AdminMembersResponse {
        let core = self.read();
        let traffic = self.traffic();
        let mut members: Vec<AdminMember> = core
            .registry
            .peers()
            .map(|p| crate::ui::admin_member(p, traffic.get(&p.id)))
            .collect();
        drop(traffic);
        members.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        AdminMembersResponse {
            event_id: core.registry.last_event_id(),
            policy_revision: core.registry.revision(),
            members,
        }
    }

    /// `POST /v1/policy/test`: the policy in force decides, through
    /// [`Policy::decide`](crate::policy::Policy::decide), for the members' tags as the
    /// registry holds them.
    fn policy_test(&self, req: PolicyTestRequest) -> Result<PolicyTestResponse, ApiError> {
        use crate::policy::{Principal, Verdict};
        use crate::ports::Proto;
        let proto = match req.proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "proto {other:?}: use tcp or udp"
                )))
            }
        };
        let core = self.read();
        let reg = &core.registry;
        let src = find_member(reg, &req.src)?;
        let dst = find_member(reg, &req.dst)?;
        let policy = reg.policy();
        let (st, dt) = (
            policy.known_tag_ids(&src.tags),
            policy.known_tag_ids(&dst.tags),
        );
        let verdict = policy.decide(
            Principal {
                identity: &src.identity,
                tags: &st,
            },
            Principal {
                identity: &dst.identity,
                tags: &dt,
            },
            proto,
            req.port,
        );
        let doc = policy.document();
        let what = format!(
            "{} -> {} on {}:{}",
            src.display_name,
            dst.display_name,
            req.proto.to_ascii_lowercase(),
            req.port
        );
        let rule_ref = |kind: &str, index: usize, rules: &[PolicyRule]| {
            rules.get(index).map(|r| RuleRef {
                kind: kind.to_owned(),
                index,
                rule: r.clone(),
            })
        };
        let (rule, reason) = match verdict {
            Verdict::Allowed { allow } => (
                rule_ref("allow", allow, &doc.allow),
                format!("{what}: allowed by allow rule {allow}"),
            ),
            Verdict::Denied { allow, deny } => (
                rule_ref("deny", deny, &doc.deny),
                format!(
                    "{what}: refused by deny rule {deny} (allow rule {allow} admits it, but deny wins)"
                ),
            ),
            Verdict::NoRule => (
                None,
                format!("{what}: no allow rule admits it (default deny)"),
            ),
        };
        Ok(PolicyTestResponse {
            allowed: verdict.allowed(),
            rule,
            reason,
            src_peer_id: src.id.clone(),
            dst_peer_id: dst.id.clone(),
            policy_revision: reg.revision(),
        })
    }

    /// `GET /v1/admin/stream`: every member change as the admin sees it, coalesced per
    /// batch of dispatches (a burst of changes to one member is one frame), from the same
    /// broadcast the roster streams read. Counted against the admin's stream cap.
    fn admin_stream(self: &Arc<Self>, who: &str) -> Result<Response<ResponseBody>, ApiError> {
        let key = format!("admin-stream:{who}");
        let permit = self.streams.acquire(&key).ok_or_else(|| {
            Metrics::inc(&self.metrics.streams_refused);
            ApiError::TooManyStreams(format!(
                "{who:?} holds {} admin streams already (the maximum)",
                self.streams.max()
            ))
        })?;
        let (rx, last) = {
            let core = self.read();
            (core.registry.subscribe(), core.registry.last_event_id())
        };
        let traffic_rx = self.traffic_tx.subscribe();
        let (tx, body_rx) = mpsc::channel(64);
        let weak = Arc::downgrade(self);
        let cfg = self.config.stream;
        tokio::spawn(async move {
            run_admin_stream(weak, (rx, traffic_rx), tx, last, cfg).await;
            drop(permit);
        });
        let mut r = Response::new(ChannelBody::new(body_rx).boxed());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        Ok(r)
    }

    fn identity(&self, conn: &ConnInfo, headers: &HeaderMap) -> Option<String> {
        if self.config.insecure {
            headers
                .get(INSECURE_IDENTITY_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        } else {
            conn.identity.clone()
        }
    }

    /// The admin's identity if the caller may use the admin routes: a certificate with
    /// the admin role (and, if `--admin` lists CNs, one of them); without mTLS, an identity
    /// header naming an `--admin` entry.
    fn admin(&self, conn: &ConnInfo, identity: Option<&str>) -> Result<String, ApiError> {
        let Some(i) = identity else {
            return Err(ApiError::Unauthorized("no client identity".into()));
        };
        let listed = self.config.admins.contains(i);
        let ok = if self.config.insecure {
            listed
        } else {
            conn.admin_role && (self.config.admins.is_empty() || listed)
        };
        if ok {
            Ok(i.to_owned())
        } else if !self.config.insecure && !conn.admin_role {
            Err(ApiError::Forbidden(format!(
                "{i:?} is not an admin: its certificate lacks the admin role \
                 (tabbify-mesh-ca issue-admin)"
            )))
        } else {
            Err(ApiError::Forbidden(format!("{i:?} is not an admin")))
        }
    }

    async fn read_json<T: DeserializeOwned, B>(&self, req: Request<B>) -> Result<T, ApiError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
            if !ct.starts_with("application/json") {
                return Err(ApiError::UnsupportedMediaType);
            }
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
        }
        let body = Limited::new(req.into_body(), MAX_BODY_BYTES);
        let bytes = match tokio::time::timeout(self.config.request_timeout, body.collect()).await {
            Err(_) => return Err(ApiError::Timeout),
            Ok(Err(e)) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
                }
                return Err(ApiError::BadRequest(format!("reading body: {e}")));
            }
            Ok(Ok(c)) => c.to_bytes(),
        };
        parse_json(&bytes)
    }

    async fn register(
        &self,
        conn: &ConnInfo,
        identity: Option<String>,
        req: RegisterRequest,
        relays: Vec<RelayInfo>,
    ) -> Result<RegisterResponse, ApiError> {
        let key = decode_key(&req.public_key)?;
        let key_b64 = base64::engine::general_purpose::STANDARD.encode(key);
        crate::ca::validate_name(&req.name).map_err(|_| {
            ApiError::BadRequest(format!(
                "invalid name {:?}: use 1-64 characters from A-Z a-z 0-9 . _ -",
                req.name
            ))
        })?;
        if req.wg_listen_port == 0 {
            return Err(ApiError::BadRequest("wg_listen_port must not be 0".into()));
        }
        check_endpoints(&req.endpoints)?;
        let advertised =
            crate::routes::parse_advertisement(&req.advertise_routes, req.advertise_exit_node)
                .map_err(ApiError::BadRequest)?;
        let exit_node = req.advertise_exit_node;
        if req.tags.len() > MAX_TAGS_PER_PEER {
            return Err(ApiError::BadRequest(format!(
                "more than {MAX_TAGS_PER_PEER} tags"
            )));
        }
        let identity = match identity {
            Some(i) => i,
            None if self.config.insecure => req.name.clone(),
            None => return Err(ApiError::Unauthorized("no client identity".into())),
        };
        if !crate::clients::is_member_identity(&identity) {
            return Err(ApiError::Forbidden(format!(
                "identity {identity:?} contains '/': member identities never do (client \
                 identities are {CLIENT_IDENTITY_PREFIX}<uuid>)"
            )));
        }
        self.check_rate(&identity)?;
        {
            let core = self.read();
            core.registry
                .policy()
                .tag_ids(&req.tags)
                .map_err(|e| ApiError::BadRequest(e.0))?;
            check_key(&core.store, &identity, &key_b64)?;
        }
        // An external validation happens before taking the lock (it is a network call).
        let external = match (&self.config.auth, &req.join_token) {
            (Some(auth), Some(token)) => Some(
                auth.validate(&AuthValidateRequest {
                    token: token.clone(),
                    identity: identity.clone(),
                    requested_name: req.name.clone(),
                    requested_tags: req.tags.clone(),
                    public_key: key_b64.clone(),
                })
                .await,
            ),
            _ => None,
        };
        let now_ms = self.clock.now_ms();
        let mut guard = self.write();
        let core = &mut *guard;
        // Checked again under the lock: the state may have changed during the auth call.
        let record = check_key(&core.store, &identity, &key_b64)?;
        let admitted = record
            .as_ref()
            .filter(|r| r.key.as_deref() == Some(key_b64.as_str()));
        // The token decides the tags; the admitted key may come back without a usable one.
        let claims: Result<Claims, ApiError> = match (external, &req.join_token) {
            (Some(result), _) => result.map(|(t, n)| (t, n, None)),
            (None, Some(token)) => {
                let hash = tokens::hash(token);
                match core.store.token(&hash) {
                    None => Err(ApiError::TokenInvalid),
                    Some(rec) if rec.identity.as_ref().is_some_and(|b| *b != identity) => {
                        Err(ApiError::TokenIdentity)
                    }
                    Some(rec) => tokens::check(rec, now_ms / 1000)
                        .map(|()| (rec.tags.clone(), rec.name.clone(), Some(hash))),
                }
            }
            (None, None) => Err(ApiError::Unauthorized(
                "a join token is required for a key that was not admitted before".into(),
            )),
        };
        let (tags, name, spend) = match (claims, admitted) {
            (Ok(c), _) => c,
            (Err(_), Some(a)) => (a.tags.clone(), Some(a.display_name.clone()), None),
            (Err(e), None) => return Err(e),
        };
        core.registry.policy().tag_ids(&tags).map_err(|e| {
            ApiError::BadRequest(format!(
                "the join token grants a tag the policy lacks: {}",
                e.0
            ))
        })?;
        let display_name = name.unwrap_or_else(|| identity.clone());
        let ula = ula::identity_ula(&identity);
        let id = ula::identity_peer_id(&identity);
        // Ids and ULAs are truncated hashes: refuse an identity whose id or ULA another holds.
        if let Some(other) = core
            .registry
            .peer(&id)
            .or_else(|| core.registry.peer_by_ula(&ula))
            .filter(|p| p.identity != identity)
        {
            return Err(ApiError::Conflict(format!(
                "peer id {id} or ULA {ula} is taken by identity {:?}",
                other.identity
            )));
        }
        let mut updated = record.clone().unwrap_or_default();
        if updated.key.as_deref() != Some(key_b64.as_str()) {
            updated.set_key(Some(key_b64.clone()), now_ms / 1000);
        }
        updated.display_name = display_name.clone();
        updated.tags = tags.clone();
        let pre = core
            .store
            .admit_changes(&identity, updated, spend.as_deref())
            .map_err(ApiError::from)?;
        let reflexive = SocketAddr::new(canonical_ip(conn.remote.ip()), req.wg_listen_port);
        let new_peer = NewPeer {
            key,
            identity,
            display_name: display_name.clone(),
            tags: tags.clone(),
            endpoints: req.endpoints,
            wg_listen_port: req.wg_listen_port,
            reflexive,
            ephemeral: req.ephemeral,
            concentrator: req.concentrator,
        };
        // The admission and the member row: one transaction, before the answer.
        core.member_change(&self.metrics, pre, std::slice::from_ref(&id), |reg| {
            let id = reg.upsert(new_peer, now_ms).id.clone();
            reg.set_advertisement(&id, advertised, exit_node, now_ms);
            Ok(())
        })?;
        let class = core
            .registry
            .peer(&id)
            .map(|p| p.class)
            .ok_or(ApiError::NotRegistered)?;
        let roster = core.registry.roster(&id);
        let ipv4 = core.registry.peer(&id).and_then(|p| p.ipv4);
        let routes = core.registry.own_route_states(&id);
        Metrics::inc(&self.metrics.registrations);
        Ok(RegisterResponse {
            peer_id: id,
            ula,
            display_name,
            tags,
            may_host_apps: core.registry.visibility().may_host_apps(class),
            reflexive_endpoint: reflexive,
            heartbeat_interval_secs: self.config.heartbeat_interval.as_secs().max(1),
            roster,
            stun_servers: self.stun_servers(conn),
            relays,
            dns_domain: self.config.dns_domain.clone(),
            ipv4,
            routes,
        })
    }

    /// `POST /v1/clients`: mints a stock WireGuard client (see [`crate::clients`]).
    fn create_client(
        &self,
        who: &str,
        req: ClientCreateRequest,
    ) -> Result<ClientCreateResponse, ApiError> {
        crate::clients::check_name(&req.name).map_err(ApiError::BadRequest)?;
        if req.tags.len() > MAX_CLIENT_TAGS {
            return Err(ApiError::BadRequest(format!(
                "tags: more than {MAX_CLIENT_TAGS} tags"
            )));
        }
        if let Some(t) = req
            .tags
            .iter()
            .find(|t| crate::ca::validate_name(t).is_err())
        {
            return Err(ApiError::BadRequest(format!(
                "tags: {t:?} is not a tag (1-64 of A-Z a-z 0-9 . _ -, without `tag:`)"
            )));
        }
        if let Some(e) = &req.endpoint {
            crate::clients::check_endpoint(e).map_err(ApiError::BadRequest)?;
        }
        let now_ms = self.clock.now_ms();
        let mut guard = self.write();
        let core = &mut *guard;
        core.registry
            .policy()
            .tag_ids(&req.tags)
            .map_err(|e| ApiError::BadRequest(format!("tags: {}", e.0)))?;
        let reg = &core.registry;
        // The concentrator: named (peer id or display name), or the only one there is.
        let conc = match &req.concentrator {
            Some(n) => {
                let p = reg
                    .peer(n)
                    .or_else(|| reg.peers().find(|p| p.display_name == *n))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("concentrator: no member {n:?} is registered"))
                    })?;
                if !p.concentrator {
                    return Err(ApiError::BadRequest(format!(
                        "concentrator: member {n:?} did not register as a concentrator \
                         (join --concentrator)"
                    )));
                }
                p
            }
            None => {
                let mut all = reg.peers().filter(|p| p.concentrator && !p.stale);
                match (all.next(), all.next()) {
                    (Some(p), None) => p,
                    (None, _) => {
                        return Err(ApiError::BadRequest(
                            "concentrator: no live member registered as a concentrator \
                             (join --concentrator)"
                                .into(),
                        ))
                    }
                    (Some(_), Some(_)) => {
                        return Err(ApiError::BadRequest(
                            "concentrator: several members are concentrators; name one".into(),
                        ))
                    }
                }
            }
        };
        if reg.peers().any(|p| p.display_name == req.name)
            || reg.clients().any(|c| c.display_name == req.name)
        {
            return Err(ApiError::Conflict(format!(
                "name: {:?} is the display name of a member or client already",
                req.name
            )));
        }
        let identity = crate::clients::new_identity();
        let peer_id = ula::identity_peer_id(&identity);
        let ula = ula::identity_ula(&identity);
        if reg.peer(&peer_id).is_some()
            || reg.peer_by_ula(&ula).is_some()
            || reg.client(&peer_id).is_some()
        {
            return Err(ApiError::Conflict(
                "the new client's peer id or ULA collides; try again".into(),
            ));
        }
        let ipv4 = reg
            .allocate_client_ipv4(&peer_id)
            .ok_or_else(|| ApiError::Conflict("no free mesh IPv4 address".into()))?;
        let (private_key, public_key) = crate::clients::new_key_pair();
        let endpoint = req
            .endpoint
            .clone()
            .unwrap_or_else(|| conc.reflexive.to_string());
        let row = crate::clients::ClientRow {
            peer_id: peer_id.clone(),
            identity,
            display_name: req.name.clone(),
            tags: req.tags.clone(),
            ipv4,
            public_key,
            concentrator: conc.id.clone(),
            created_at: now_ms / 1000,
        };
        let config = crate::clients::render_wg_quick(&crate::clients::WgQuick {
            client: &row,
            private_key: &private_key,
            concentrator_key: &conc.key_b64,
            endpoint: &endpoint,
            dns_domain: req
                .dns
                .unwrap_or(true)
                .then_some(self.config.dns_domain.as_str()),
        });
        let png = crate::clients::qr_png(&config).map_err(ApiError::Internal)?;
        let info = row.info();
        core.client_change(&self.metrics, crate::storage::Change::Client(row))?;
        tracing::info!(admin = who, client = %peer_id, name = %req.name, concentrator = %info.concentrator, "client minted");
        Ok(ClientCreateResponse {
            client: info,
            config,
            qr_png: base64::engine::general_purpose::STANDARD.encode(png),
        })
    }

    /// `DELETE /v1/clients/{id}`: revokes a client (by peer id or display name).
    fn revoke_client(&self, who: &str, id: &str) -> Result<ClientInfo, ApiError> {
        let mut guard = self.write();
        let core = &mut *guard;
        let row = core
            .registry
            .client(id)
            .or_else(|| core.registry.clients().find(|c| c.display_name == id))
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no client {id:?}")))?;
        core.client_change(
            &self.metrics,
            crate::storage::Change::RemoveClient(row.peer_id.clone()),
        )?;
        tracing::info!(admin = who, client = %row.peer_id, "client revoked");
        Ok(row.info())
    }

    fn heartbeat(
        &self,
        conn: &ConnInfo,
        identity: Option<String>,
        req: HeartbeatRequest,
        relays: Vec<RelayInfo>,
    ) -> Result<HeartbeatResponse, ApiError> {
        match &identity {
            Some(i) => self.check_rate(i)?,
            None => self.check_rate(&format!("peer:{}", req.peer_id))?,
        }
        check_endpoints(&req.endpoints)?;
        if let Some(t) = &req.traffic {
            crate::traffic::validate(t).map_err(ApiError::BadRequest)?;
        }
        if req.hosted_app_ulas.len() > MAX_HOSTED_APPS {
            return Err(ApiError::BadRequest(format!(
                "more than {MAX_HOSTED_APPS} hosted apps"
            )));
        }
        if let Some(bad) = req.hosted_app_ulas.iter().find(|a| !ula::is_app_ula(a)) {
            return Err(ApiError::BadRequest(format!(
                "{bad} is not an app ULA (fd5a:1f02::/32)"
            )));
        }
        if let Some(home) = &req.home_relay {
            if !relays.iter().any(|r| &r.url == home) {
                return Err(ApiError::BadRequest(format!(
                    "home_relay {home:?} is not one of the relays this coordinator advertises"
                )));
            }
        }
        let advertised =
            crate::routes::parse_advertisement(&req.advertise_routes, req.advertise_exit_node)
                .map_err(ApiError::BadRequest)?;
        let exit_node = req.advertise_exit_node;
        let mut apps: Vec<Ipv6Addr> = req.hosted_app_ulas;
        apps.sort_unstable();
        apps.dedup();
        let now_ms = self.clock.now_ms();
        let mut core = self.write();
        let id = resolve_peer(&core.registry, identity.as_deref(), Some(&req.peer_id))?;
        let class = core
            .registry
            .peer(&id)
            .map(|p| p.class)
            .ok_or(ApiError::NotRegistered)?;
        if !apps.is_empty() && !core.registry.visibility().may_host_apps(class) {
            return Err(ApiError::Forbidden(
                "the policy does not let this peer host apps".into(),
            ));
        }
        check_mapped(
            &core.registry,
            &id,
            &req.mapped_endpoints,
            &req.endpoints,
            canonical_ip(conn.remote.ip()),
        )?;
        let source = canonical_ip(conn.remote.ip());
        let traffic = req.traffic;
        // A heartbeat that changes the member is committed before the answer (503 while
        // the database is unreachable, the liveness kept); an unchanged one writes nothing.
        let reflexive = core.member_change(
            &self.metrics,
            Vec::new(),
            std::slice::from_ref(&id),
            |reg| match reg.heartbeat(
                &id,
                req.endpoints,
                apps,
                (req.mapped_endpoints, req.nat),
                (req.home_relay, req.paths),
                source,
                now_ms,
            ) {
                Ok(r) => {
                    reg.ensure_ipv4(&id, now_ms);
                    reg.set_advertisement(&id, advertised, exit_node, now_ms);
                    reg.set_concentrator(&id, req.concentrator, now_ms);
                    Ok(r)
                }
                Err(HeartbeatError::NotRegistered) => Err(ApiError::NotRegistered),
                Err(HeartbeatError::AppTaken {
                    app,
                    holder_id,
                    holder_name,
                }) => {
                    Metrics::inc(&self.metrics.app_claims_refused);
                    Err(ApiError::AppTaken(format!(
                        "app {app} is hosted by peer {holder_id} ({holder_name}); it must release it \
                         or an admin must move it (POST /v1/apps/{{uuid}}/move); nothing but this \
                         peer's liveness was updated"
                    )))
                }
            },
        )?;
        Metrics::inc(&self.metrics.heartbeats);
        if let Some(report) = traffic {
            // Memory only: the report never reaches the database.
            let reg = &core.registry;
            let vis = reg.visibility();
            let visible = |p: &str| reg.peer(p).is_some_and(|t| vis.visible(class, t.class));
            let gap = self.config.heartbeat_interval.as_millis() as u64 / 2;
            let mut held = self.traffic();
            let due = held.record(&id, report, visible, now_ms, gap);
            if held.len() > reg.len() {
                held.retain(|m| reg.peer(m).is_some());
            }
            drop(held);
            if due {
                // No admin stream listening is not an error.
                let _ = self.traffic_tx.send(id.clone());
            }
        }
        drop(core);
        Ok(HeartbeatResponse {
            heartbeat_interval_secs: self.config.heartbeat_interval.as_secs().max(1),
            reflexive_endpoint: reflexive,
            stun_servers: self.stun_servers(conn),
            relays,
        })
    }

    /// `POST /v1/mesh/leave`: removes the caller's own member (its identity is its
    /// certificate's CN; the body names nobody) from every roster at once, reason `left`.
    /// Its streams close; its admission stays, so it may register again.
    fn leave(&self, identity: Option<String>) -> Result<LeaveResponse, ApiError> {
        let Some(identity) = identity else {
            return Err(ApiError::Unauthorized("no client identity".into()));
        };
        self.check_rate(&identity)?;
        let id = ula::identity_peer_id(&identity);
        let mut guard = self.write();
        let core = &mut *guard;
        match core.registry.peer(&id) {
            Some(p) if p.identity == identity => {}
            _ => return Err(ApiError::NotRegistered),
        }
        // With a database: the member row goes too, on every coordinator.
        core.remove_member(&self.metrics, Vec::new(), &id, "left")?;
        tracing::info!(peer_id = %id, %identity, "member left the mesh");
        Ok(LeaveResponse {
            peer_id: id,
            left: true,
        })
    }

    /// Mints a relay token for the caller's identity and registered key.
    fn relay_token(
        &self,
        identity: Option<String>,
        req: RelayTokenRequest,
    ) -> Result<RelayTokenResponse, ApiError> {
        match &identity {
            Some(i) => self.check_rate(i)?,
            None => self.check_rate(&format!("peer:{}", req.peer_id))?,
        }
        let key = self
            .config
            .relay_token_key
            .as_ref()
            .ok_or_else(|| ApiError::NotFound("relay tokens are not enabled".into()))?;
        let core = self.read();
        let id = resolve_peer(&core.registry, identity.as_deref(), Some(&req.peer_id))?;
        let peer = core.registry.peer(&id).ok_or(ApiError::NotRegistered)?;
        Metrics::inc(&self.metrics.relay_tokens);
        crate::relay_tokens::mint(key, peer, self.clock.now_ms() / 1000)
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// The STUN servers to tell a client about: [`Config::stun_addrs`] with an unspecified
    /// IP replaced by the one the client connected to (skipped when that is unknown or of
    /// the other family).
    fn stun_servers(&self, conn: &ConnInfo) -> Vec<SocketAddr> {
        let local = conn.local.map(|l| canonical_ip(l.ip()));
        self.config
            .stun_addrs
            .iter()
            .filter_map(|a| {
                if !a.ip().is_unspecified() {
                    return Some(*a);
                }
                let ip = local?;
                (ip.is_ipv4() == a.is_ipv4() || a.is_ipv6()).then(|| SocketAddr::new(ip, a.port()))
            })
            .collect()
    }

    fn stream<B>(
        self: &Arc<Self>,
        identity: Option<String>,
        req: Request<B>,
    ) -> Result<Response<ResponseBody>, ApiError> {
        // An id from another event log (another coordinator's, or ours before a restart)
        // says nothing about ours: a snapshot, not a replay of unrelated events.
        let same_log = req
            .headers()
            .get(EVENT_LOG_HEADER)
            .is_none_or(|v| v.as_bytes() == self.event_log.as_bytes());
        let last_event_id = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|_| same_log);
        // A Last-Event-ID of this log that is ahead of this coordinator (issued by another
        // coordinator on the same database): catch up with the change log first, so the
        // stream resumes instead of starting over.
        if let Some(last) = last_event_id {
            if last > self.read().registry.last_event_id() {
                if let Err(e) = self.catch_up() {
                    tracing::debug!(error = %e, "catching up before a resume failed");
                }
            }
        }
        let (sub, initial, rx, permit) = {
            let core = self.read();
            let reg = &core.registry;
            let id = resolve_peer(reg, identity.as_deref(), query_peer_id(req.uri()))?;
            let class = reg
                .peer(&id)
                .map(|p| p.class)
                .ok_or(ApiError::NotRegistered)?;
            let identity = reg
                .peer(&id)
                .map(|p| p.identity.clone())
                .unwrap_or_default();
            let permit = self.streams.acquire(&identity).ok_or_else(|| {
                Metrics::inc(&self.metrics.streams_refused);
                ApiError::TooManyStreams(format!(
                    "identity {identity:?} holds {} SSE streams already (the maximum)",
                    self.streams.max()
                ))
            })?;
            let rx = reg.subscribe();
            let mut sub = Subscriber {
                peer_id: id.clone(),
                class,
                last_id: 0,
            };
            let resumed = last_event_id.and_then(|last| {
                let replay = reg.replay_since(last)?;
                let mut probe = Subscriber {
                    last_id: last,
                    ..sub.clone()
                };
                let mut frames = vec![Bytes::from_static(b": resumed\n\n")];
                for d in &replay {
                    match probe.step(d) {
                        sse::Step::Send(b) => frames.push(b),
                        sse::Step::Skip => {}
                        // The peer itself changed meanwhile: start over with a snapshot.
                        sse::Step::Resync | sse::Step::Close => return None,
                    }
                }
                probe.last_id = reg.last_event_id();
                Some((probe, frames))
            });
            let initial = match resumed {
                Some((probe, frames)) => {
                    Metrics::inc(&self.metrics.streams_resumed);
                    sub = probe;
                    frames
                }
                None => {
                    Metrics::inc(&self.metrics.stream_snapshots);
                    sub.last_id = reg.last_event_id();
                    vec![reg.snapshot_frame(&id)]
                }
            };
            (sub, initial, rx, permit)
        };
        let (tx, body_rx) = mpsc::channel(64);
        let weak = Arc::downgrade(self);
        let resync: Arc<Resync> = Arc::new(move |peer: &str| {
            let c = weak.upgrade()?;
            let core = c.read();
            let class = core.registry.peer(peer)?.class;
            Some((
                core.registry.snapshot_frame(peer),
                core.registry.last_event_id(),
                class,
            ))
        });
        let cfg = self.config.stream;
        let me = self.clone();
        Metrics::inc(&self.metrics.streams_open);
        tokio::spawn(async move {
            sse::run_stream(sub, initial, rx, tx, cfg, resync).await;
            drop(permit);
            me.metrics
                .streams_open
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .header(EVENT_LOG_HEADER, self.event_log.as_str())
            .body(ChannelBody::new(body_rx).boxed())
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn put_policy(&self, who: &str, doc: PolicyDocument) -> Result<PolicyResponse, ApiError> {
        self.replace_policy(who, doc, None)
    }

    /// `systemctl reload` (SIGHUP): the policy file was re-read; `file_hash` is the BLAKE3 of
    /// its bytes. A file whose hash is the one the policy in force came from is no change
    /// (`Ok(None)`: a policy set through the API since then stays). Otherwise the file's
    /// policy replaces the one in force as `PUT /v1/policy` would (a new revision on every
    /// roster stream, no stream dropped) and is remembered as coming from this file.
    /// An invalid policy is refused and the one in force stays.
    pub fn reload_policy_file(
        &self,
        doc: PolicyDocument,
        file_hash: String,
    ) -> Result<Option<u64>, ApiError> {
        let from = self
            .read()
            .store
            .policy()
            .map(|p| p.file_hash.clone())
            .unwrap_or_else(|| self.config.policy_file_hash.clone());
        if from == file_hash {
            return Ok(None);
        }
        self.replace_policy("policy-file (reload)", doc, Some(file_hash))
            .map(|r| Some(r.revision))
    }

    /// Replaces the policy; `file_hash` = it comes from the policy file with that hash
    /// (`None`: from the API, the stored file hash stays).
    fn replace_policy(
        &self,
        who: &str,
        doc: PolicyDocument,
        file_hash: Option<String>,
    ) -> Result<PolicyResponse, ApiError> {
        let policy =
            Policy::compile(doc.clone()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut core = self.write();
        let revision = core.registry.revision() + 1;
        let stored = core.store.policy().map(|p| p.revision);
        let file_hash = file_hash.unwrap_or_else(|| {
            core.store
                .policy()
                .map(|p| p.file_hash.clone())
                .unwrap_or_else(|| self.config.policy_file_hash.clone())
        });
        // Compare-and-set on the stored revision: another coordinator on the same database
        // that changed the policy meanwhile wins, and this request is a 409 to retry.
        core.store
            .replace_policy(
                StoredPolicy {
                    revision,
                    file_hash,
                    document: doc.clone(),
                },
                stored,
            )
            .map_err(ApiError::from)?;
        core.after_commit(&self.metrics, |reg| {
            reg.set_policy(Arc::new(policy), revision)
        });
        Metrics::inc(&self.metrics.policy_changes);
        audit(who, "policy.replace", &format!("revision {revision}"));
        Ok(PolicyResponse {
            revision,
            policy: doc,
        })
    }

    fn mint_token(&self, who: &str, req: TokenRequest) -> Result<TokenResponse, ApiError> {
        if req.ttl_secs == 0 || req.ttl_secs > tokens::MAX_TTL_SECS {
            return Err(ApiError::BadRequest(format!(
                "ttl_secs must be 1..={}",
                tokens::MAX_TTL_SECS
            )));
        }
        if req.max_uses == 0 && !req.unlimited {
            return Err(ApiError::BadRequest(
                "max_uses 0 makes an unlimited-use token: also pass \"unlimited\": true".into(),
            ));
        }
        if req.max_uses != 0 && req.unlimited {
            return Err(ApiError::BadRequest(
                "\"unlimited\": true needs max_uses 0".into(),
            ));
        }
        if req.tags.len() > MAX_TAGS_PER_PEER {
            return Err(ApiError::BadRequest(format!(
                "more than {MAX_TAGS_PER_PEER} tags"
            )));
        }
        for n in req.name.iter().chain(&req.identity) {
            crate::ca::validate_name(n).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        }
        let mut core = self.write();
        core.registry
            .policy()
            .tag_ids(&req.tags)
            .map_err(|e| ApiError::BadRequest(e.0))?;
        let (token, hash) = tokens::generate();
        let now_secs = self.clock.now_ms() / 1000;
        let expires_at = now_secs + req.ttl_secs;
        let mut tags = req.tags;
        tags.sort();
        tags.dedup();
        core.store
            .put_token(
                hash.clone(),
                TokenRecord {
                    tags: tags.clone(),
                    name: req.name.clone(),
                    expires_at,
                    max_uses: req.max_uses,
                    uses: 0,
                    identity: req.identity.clone(),
                    created_at: now_secs,
                },
            )
            .map_err(ApiError::from)?;
        core.after_commit(&self.metrics, |_| {});
        Metrics::inc(&self.metrics.tokens_minted);
        let token_id = tokens::id_of(&hash);
        audit(who, "token.mint", &format!("token {token_id}"));
        Ok(TokenResponse {
            token,
            token_id,
            tags,
            name: req.name,
            expires_at,
            max_uses: req.max_uses,
            identity: req.identity,
        })
    }

    fn move_app(
        &self,
        admin: &str,
        app: uuid::Uuid,
        req: MoveAppRequest,
    ) -> Result<MoveAppResponse, ApiError> {
        let app_ula = ula::app_ula(&app);
        let now = self.clock.now_ms();
        let mut guard = self.write();
        let core = &mut *guard;
        let mut touched: Vec<String> = core
            .registry
            .app_holder(&app_ula)
            .map(|p| p.id.clone())
            .into_iter()
            .collect();
        touched.push(req.to.clone());
        touched.dedup();
        // The old holder's row (releasing the app) and the new one's: one transaction.
        let from = core.member_change(&self.metrics, Vec::new(), &touched, |reg| {
            reg.move_app(app_ula, &req.to, MAX_HOSTED_APPS, now)
                .map_err(|e| match e {
                    MoveError::NoPeer => ApiError::NotFound(format!("no peer {:?}", req.to)),
                    MoveError::MayNotHost => ApiError::Forbidden(format!(
                        "the policy does not let peer {:?} host apps",
                        req.to
                    )),
                    MoveError::TooManyApps => ApiError::Conflict(format!(
                        "peer {:?} hosts {MAX_HOSTED_APPS} apps already",
                        req.to
                    )),
                })
        })?;
        drop(guard);
        Metrics::inc(&self.metrics.app_moves);
        tracing::info!(%app, %app_ula, from = ?from, to = %req.to, admin, "app moved");
        audit(admin, "app.move", &format!("app {app} to {}", req.to));
        Ok(MoveAppResponse {
            app_ula,
            from,
            to: req.to,
        })
    }

    /// `POST|DELETE /v1/routes/{id}/approve`: records or withdraws an admin approval,
    /// durably (the member's row), announced like any member change.
    fn approve_route(
        &self,
        admin: &str,
        route_id: &str,
        approve: bool,
    ) -> Result<RoutesResponse, ApiError> {
        let now = self.clock.now_ms();
        let mut guard = self.write();
        let core = &mut *guard;
        let (peer_id, prefix) = core
            .registry
            .find_route(route_id)
            .ok_or_else(|| ApiError::NotFound(format!("no route advertisement {route_id:?}")))?;
        core.member_change(
            &self.metrics,
            Vec::new(),
            std::slice::from_ref(&peer_id),
            |reg| {
                reg.set_route_approval(&peer_id, prefix, approve, now)
                    .map(|_| ())
                    .ok_or_else(|| {
                        ApiError::NotFound(format!("no route advertisement {route_id:?}"))
                    })
            },
        )?;
        let routes: Vec<RouteInfo> = core
            .registry
            .route_infos()
            .into_iter()
            .filter(|r| r.id == route_id)
            .collect();
        drop(guard);
        let action = if approve {
            "route.approve"
        } else {
            "route.withdraw"
        };
        tracing::info!(route_id, %prefix, peer_id = %peer_id, admin, action, "route approval changed");
        audit(
            admin,
            action,
            &format!("route {route_id} ({prefix} of {peer_id})"),
        );
        Ok(RoutesResponse { routes })
    }

    fn list_tokens(&self) -> Vec<TokenInfo> {
        let core = self.read();
        let mut list: Vec<TokenInfo> = core
            .store
            .tokens()
            .map(|(hash, t)| token_info(hash, t))
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.token_id).cmp(&(b.created_at, &b.token_id)));
        list
    }

    fn delete_token(&self, who: &str, token_id: &str) -> Result<TokenInfo, ApiError> {
        let mut core = self.write();
        let matches: Vec<(String, TokenInfo)> = core
            .store
            .tokens()
            .filter(|(hash, _)| tokens::id_of(hash) == token_id)
            .map(|(hash, t)| (hash.clone(), token_info(hash, t)))
            .collect();
        let (hash, info) = match matches.as_slice() {
            [one] => one.clone(),
            [] => return Err(ApiError::NotFound(format!("no token {token_id:?}"))),
            _ => {
                return Err(ApiError::Conflict(format!(
                    "token id {token_id:?} is ambiguous"
                )))
            }
        };
        core.store.delete_token(&hash).map_err(ApiError::from)?;
        core.after_commit(&self.metrics, |_| {});
        audit(who, "token.delete", &format!("token {token_id}"));
        Ok(info)
    }

    fn revocations(&self) -> Vec<Revocation> {
        let core = self.read();
        let by_identity = core.store.identities().iter().filter_map(|(cn, r)| {
            Some(Revocation {
                peer_id: ula::identity_peer_id(cn),
                identity: cn.clone(),
                public_key: r.key.clone().unwrap_or_default(),
                revoked_at: r.revoked_at?,
            })
        });
        let by_key = core.store.revoked_keys().iter().map(|(k, r)| Revocation {
            peer_id: r.peer_id.clone(),
            identity: String::new(),
            public_key: k.clone(),
            revoked_at: r.at,
        });
        by_identity.chain(by_key).collect()
    }

    /// Rotates the caller's WireGuard key: `old_public_key` must be the key admitted for
    /// the caller's identity and `new_public_key` a key never admitted for any identity.
    /// Idempotent: repeating an applied rotation answers the same.
    fn rotate_key(
        &self,
        identity: Option<String>,
        req: RotateKeyRequest,
    ) -> Result<RotateKeyResponse, ApiError> {
        let old = decode_key(&req.old_public_key)?;
        let new = decode_key(&req.new_public_key)?;
        let old_b64 = base64::engine::general_purpose::STANDARD.encode(old);
        let new_b64 = base64::engine::general_purpose::STANDARD.encode(new);
        if old == new {
            return Err(ApiError::BadRequest(
                "new_public_key equals old_public_key".into(),
            ));
        }
        let now_ms = self.clock.now_ms();
        let mut guard = self.write();
        let core = &mut *guard;
        // The identity is the certificate's (with mTLS); the peer need not be registered
        // right now, so a joiner can finish a rotation it started before a restart.
        let cn = match identity {
            Some(cn) => cn,
            None => core
                .registry
                .peer(&resolve_peer(&core.registry, None, Some(&req.peer_id))?)
                .map(|p| p.identity.clone())
                .ok_or(ApiError::NotRegistered)?,
        };
        let id = ula::identity_peer_id(&cn);
        if req.peer_id != id {
            return Err(ApiError::Forbidden(format!(
                "peer {:?} does not belong to identity {cn:?}",
                req.peer_id
            )));
        }
        let mut record = core
            .store
            .identity(&cn)
            .cloned()
            .ok_or(ApiError::NotRegistered)?;
        if record.revoked_at.is_some() || core.store.is_key_revoked(&new_b64) {
            return Err(ApiError::Revoked);
        }
        // A retry of a rotation that was applied (the answer was lost): the same answer.
        if record.key.as_deref() == Some(new_b64.as_str()) && record.past_keys.contains(&old_b64) {
            return Ok(RotateKeyResponse {
                peer_id: id,
                ula: ula::identity_ula(&cn),
                public_key: new_b64,
                key_since: record.key_since,
            });
        }
        if record.key.as_deref() != Some(old_b64.as_str()) {
            return Err(ApiError::Conflict(
                "old_public_key is not the key admitted for this identity".into(),
            ));
        }
        match core.store.owner_of_key(&new_b64) {
            Some(o) if o == cn => {
                return Err(ApiError::BadRequest(
                    "new_public_key was used before by this identity; generate a fresh key".into(),
                ))
            }
            Some(_) => return Err(ApiError::KeyTaken),
            None => {}
        }
        let key_since = now_ms / 1000;
        record.set_key(Some(new_b64.clone()), key_since);
        let pre = core.store.admit_changes(&cn, record, None)?;
        // Registered: one upsert with the new key, committed with the identity. Not
        // registered: the next registration brings the new key.
        core.member_change(&self.metrics, pre, std::slice::from_ref(&id), |reg| {
            reg.rotate_key(&id, new, now_ms);
            Ok(())
        })?;
        let ula = ula::identity_ula(&cn);
        Metrics::inc(&self.metrics.key_rotations);
        tracing::info!(identity = %cn, peer_id = %id, "key rotated");
        Ok(RotateKeyResponse {
            peer_id: id,
            ula,
            public_key: new_b64,
            key_since,
        })
    }

    /// The identity of `peer_id`: the registered peer's, else the stored identity whose
    /// derived id it is.
    fn identity_of_peer(&self, peer_id: &str) -> Result<String, ApiError> {
        let core = self.read();
        if let Some(p) = core.registry.peer(peer_id) {
            return Ok(p.identity.clone());
        }
        core.store
            .identities()
            .keys()
            .find(|cn| ula::identity_peer_id(cn) == peer_id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no peer {peer_id:?}")))
    }

    /// Revokes `cn`: removes its peer from every roster now and refuses every future
    /// registration, whatever key or token, until an admin re-admits it. An identity that
    /// never joined can be revoked ahead.
    fn revoke_identity(&self, who: &str, cn: &str) -> Result<IdentityResponse, ApiError> {
        crate::ca::validate_name(cn).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let at = self.clock.now_ms() / 1000;
        let mut guard = self.write();
        let core = &mut *guard;
        let mut record = core.store.identity(cn).cloned().unwrap_or_default();
        let id = ula::identity_peer_id(cn);
        let mut changes = Vec::new();
        if record.revoked_at.is_none() {
            record.revoked_at = Some(at);
            changes = core.store.admit_changes(cn, record.clone(), None)?;
            Metrics::inc(&self.metrics.revocations);
        }
        core.remove_member(&self.metrics, changes, &id, "revoked")?;
        audit(who, "identity.revoke", cn);
        Ok(identity_response(cn, &record))
    }

    /// Lifts the revocation of `cn`. Its key is cleared too: the node comes back with a
    /// new join token (its old key, still bound to it, or a new one).
    fn readmit_identity(&self, who: &str, cn: &str) -> Result<IdentityResponse, ApiError> {
        let mut core = self.write();
        let mut record = core
            .store
            .identity(cn)
            .filter(|r| r.revoked_at.is_some())
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("identity {cn:?} is not revoked")))?;
        record.revoked_at = None;
        let since = record.key_since;
        record.set_key(None, since);
        core.store
            .put_identity(cn, record.clone())
            .map_err(ApiError::from)?;
        core.after_commit(&self.metrics, |_| {});
        audit(who, "identity.readmit", cn);
        Ok(identity_response(cn, &record))
    }

    /// Forgets the key admitted for `cn` (the node lost it): the peer leaves the rosters
    /// and may register a new key with a new join token. The old key stays bound to `cn`.
    fn clear_key(&self, who: &str, cn: &str) -> Result<IdentityResponse, ApiError> {
        let mut core = self.write();
        let mut record = core
            .store
            .identity(cn)
            .filter(|r| r.key.is_some())
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("identity {cn:?} has no key admitted")))?;
        let since = record.key_since;
        record.set_key(None, since);
        let id = ula::identity_peer_id(cn);
        let changes = core.store.admit_changes(cn, record.clone(), None)?;
        core.remove_member(&self.metrics, changes, &id, "key_cleared")?;
        audit(who, "identity.clear_key", cn);
        Ok(identity_response(cn, &record))
    }

    /// `DELETE /v1/revocations/{peer_id}`: re-admits the revoked identity with that peer
    /// id, or lifts a key revocation of a pre-identity log.
    fn readmit_peer(&self, who: &str, peer_id: &str) -> Result<RevokeResponse, ApiError> {
        let (cn, legacy_key) = {
            let core = self.read();
            let cn = core
                .store
                .identities()
                .iter()
                .find(|(cn, r)| r.revoked_at.is_some() && ula::identity_peer_id(cn) == peer_id)
                .map(|(cn, _)| cn.clone());
            let key = core
                .store
                .revoked_keys()
                .iter()
                .find(|(_, r)| r.peer_id == peer_id)
                .map(|(k, _)| k.clone());
            (cn, key)
        };
        match (cn, legacy_key) {
            (Some(cn), _) => {
                self.readmit_identity(who, &cn)?;
            }
            (None, Some(key)) => {
                let mut core = self.write();
                core.store.unrevoke_key(&key).map_err(ApiError::from)?;
                core.after_commit(&self.metrics, |_| {});
                audit(who, "key.readmit", &key);
            }
            (None, None) => {
                return Err(ApiError::NotFound(format!(
                    "peer {peer_id:?} is not revoked"
                )))
            }
        }
        Ok(RevokeResponse {
            peer_id: peer_id.to_owned(),
            revoked: false,
        })
    }
}

/// Writes the audit line of an admin action: who (the admin's certificate CN), what, and
/// on which object, on the tracing target `audit`.
fn audit(admin: &str, action: &str, object: &str) {
    tracing::info!(target: "audit", admin, action, object, "admin action");
}

fn token_info(hash: &str, t: &TokenRecord) -> TokenInfo {
    TokenInfo {
        token_id: tokens::id_of(hash),
        tags: t.tags.clone(),
        name: t.name.clone(),
        identity: t.identity.clone(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        max_uses: t.max_uses,
        uses: t.uses,
    }
}

fn identity_response(cn: &str, r: &IdentityRecord) -> IdentityResponse {
    IdentityResponse {
        identity: cn.to_owned(),
        peer_id: ula::identity_peer_id(cn),
        ula: ula::identity_ula(cn),
        revoked: r.revoked_at.is_some(),
        public_key: r.key.clone(),
    }
}

/// Accepts connections until the listener fails; each connection is served on its own
/// task. With `tls`, a client that does not complete the mTLS handshake within
/// [`Config::tls_handshake_timeout`] is dropped (and counted). A connection over a cap is
/// answered with the refusal on its first request and closed, or closed at once when
/// [`MAX_REFUSALS_IN_FLIGHT`] refusals are being answered already.
pub async fn serve(
    coord: Arc<Coordinator>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    serve_with(
        coord,
        listener,
        tls.map(|a| TlsSource::new(a.config().clone())),
    )
    .await
}

/// The TLS configuration each new connection is accepted with. [`TlsSource::replace`]
/// (the binary's SIGHUP: a rotated certificate, key or CA) swaps it for the connections
/// accepted afterwards; connections already open keep the one they were accepted with, so
/// no stream drops.
#[derive(Clone, Debug)]
pub struct TlsSource(Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>);

impl TlsSource {
    /// A source serving `cfg` until replaced.
    pub fn new(cfg: Arc<rustls::ServerConfig>) -> Self {
        Self(Arc::new(std::sync::RwLock::new(cfg)))
    }

    /// New connections get `cfg` from now on.
    pub fn replace(&self, cfg: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    /// An acceptor with the configuration in force.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// [`serve`] with a [`TlsSource`] the caller can replace while serving.
pub async fn serve_with(coord: Arc<Coordinator>, listener: TcpListener, tls: Option<TlsSource>) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let (permit, refusal) = match coord.conns.acquire(canonical_ip(remote.ip())) {
            Ok(p) => (Some(p), None),
            Err(r) => {
                let (counter, err) = match r {
                    ConnRefusal::Overall => (
                        &coord.metrics.conns_refused_overall,
                        ApiError::Overloaded(format!(
                            "the coordinator holds its maximum of {} connections; retry later",
                            coord.config.max_connections
                        )),
                    ),
                    ConnRefusal::PerIp => (
                        &coord.metrics.conns_refused_per_ip,
                        ApiError::TooManyConnections(format!(
                            "{} holds its maximum of {} connections",
                            canonical_ip(remote.ip()),
                            coord.config.max_connections_per_ip
                        )),
                    ),
                };
                Metrics::inc(counter);
                let slots = coord.refusals.clone();
                if slots.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_REFUSALS_IN_FLIGHT
                {
                    slots.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    Metrics::inc(&coord.metrics.conns_dropped);
                    drop(tcp);
                    continue;
                }
                (None, Some(err))
            }
        };
        let coord = coord.clone();
        let tls = tls.as_ref().map(TlsSource::acceptor);
        tokio::spawn(async move {
            let refusing = refusal.is_some();
            match tls {
                Some(acceptor) => {
                    let timeout = coord.config.tls_handshake_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let chain = stream.get_ref().1.peer_certificates();
                            let conn = ConnInfo {
                                remote,
                                local,
                                identity: crate::tls::common_name(chain),
                                admin_role: crate::tls::has_admin_role(chain),
                            };
                            serve_conn(coord.clone(), TokioIo::new(stream), conn, refusal).await;
                        }
                        Ok(Err(e)) => {
                            Metrics::inc(&coord.metrics.tls_failures);
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            Metrics::inc(&coord.metrics.tls_failures);
                            Metrics::inc(&coord.metrics.tls_handshake_timeouts);
                            tracing::debug!(%remote, "TLS handshake not completed in time");
                        }
                    }
                }
                None => {
                    serve_conn(
                        coord.clone(),
                        TokioIo::new(tcp),
                        ConnInfo {
                            remote,
                            local,
                            identity: None,
                            admin_role: false,
                        },
                        refusal,
                    )
                    .await
                }
            }
            if refusing {
                coord
                    .refusals
                    .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
            drop(permit);
        });
    }
}

/// Serves one connection; with `refusal`, every request gets that error and the
/// connection closes after the first answer.
async fn serve_conn<I>(coord: Arc<Coordinator>, io: I, conn: ConnInfo, refusal: Option<ApiError>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let timeout = coord.config.request_timeout;
    let refusing = refusal.is_some();
    let service = service_fn(move |req| {
        let coord = coord.clone();
        let conn = conn.clone();
        let refusal = refusal.clone();
        async move {
            Ok::<_, Infallible>(match refusal {
                Some(e) => {
                    Metrics::inc(if e.status().is_server_error() {
                        &coord.metrics.responses_5xx
                    } else {
                        &coord.metrics.responses_4xx
                    });
                    let mut r = json_response(e.status(), &e.body());
                    r.headers_mut().insert(
                        header::CONNECTION,
                        header::HeaderValue::from_static("close"),
                    );
                    r
                }
                None => coord.handle(&conn, req).await,
            })
        }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(!refusing)
        .serve_connection(io, service)
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The member a policy test names: by peer id, identity, ULA or display name (a name
/// several members carry is ambiguous: 409).
fn find_member<'a>(
    reg: &'a Registry,
    name: &str,
) -> Result<&'a crate::registry::PeerRecord, ApiError> {
    let name = name.trim();
    if let Some(p) = reg.peer(name).or_else(|| reg.peer_by_identity(name)) {
        return Ok(p);
    }
    if let Ok(ip) = name.parse::<Ipv6Addr>() {
        if let Some(p) = reg.peer_by_ula(&ip) {
            return Ok(p);
        }
    }
    let mut named = reg.peers().filter(|p| p.display_name == name);
    match (named.next(), named.next()) {
        (Some(p), None) => Ok(p),
        (Some(_), Some(_)) => Err(ApiError::Conflict(format!(
            "several members are named {name:?}: use a peer id, identity or ULA"
        ))),
        (None, _) => Err(ApiError::NotFound(format!(
            "no member {name:?} (a peer id, identity, name or ULA of a registered member)"
        ))),
    }
}

/// The routes a dashboard session may use: the admin routes (but not minting login
/// links) and its own session.
fn session_route(method: &Method, p: &str) -> bool {
    matches!(
        p,
        PATH_POLICY
            | PATH_POLICY_TEST
            | PATH_TOKENS
            | PATH_REVOCATIONS
            | PATH_ADMIN_SESSION
            | PATH_ADMIN_MEMBERS
            | PATH_ADMIN_REACH
            | PATH_ADMIN_STREAM
            | PATH_CLIENTS
    ) || p.starts_with("/v1/tokens/")
        || p.starts_with("/v1/clients/")
        || p.starts_with("/v1/revocations/")
        || p.starts_with(PATH_IDENTITIES_PREFIX)
        || p.starts_with("/v1/apps/")
        || (*method == Method::DELETE && p.starts_with("/v1/mesh/peers/"))
}

/// Byte equality in time independent of where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Headers of the dashboard's pages: the CSP, no sniffing, no referrer (a login link in
/// the address bar never leaks), no caching of the login answer.
fn page_headers(h: &mut HeaderMap) {
    h.insert(
        "content-security-policy",
        header::HeaderValue::from_static(crate::ui::CSP),
    );
    h.insert(
        "x-content-type-options",
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "referrer-policy",
        header::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
}

/// How many traffic updates the admin streams' broadcast holds before a slow stream skips
/// some (a skipped update is only a late one: the next heartbeat's report replaces it).
const TRAFFIC_CHANNEL: usize = 4096;

/// The admin stream's task: waits for a dispatch or a traffic update, takes every one
/// queued behind it, and writes one frame per member that changed (its current record, or
/// its removal), a `traffic` frame ([`TrafficEvent`]) per member whose report is due, a
/// `policy` frame for a policy change and `resync` when it fell behind the broadcast.
/// Keepalive comments between; ends when the client stops reading for the write timeout,
/// the channel closes or the coordinator goes away.
async fn run_admin_stream(
    weak: std::sync::Weak<Coordinator>,
    (mut rx, mut traffic_rx): (
        tokio::sync::broadcast::Receiver<Arc<sse::Dispatch>>,
        tokio::sync::broadcast::Receiver<String>,
    ),
    tx: mpsc::Sender<Bytes>,
    mut last: u64,
    cfg: StreamConfig,
) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let send = |b: Bytes| {
        let tx = tx.clone();
        async move {
            matches!(
                tokio::time::timeout(cfg.write_timeout, tx.send(b)).await,
                Ok(Ok(()))
            )
        }
    };
    if !send(Bytes::from(format!(
        ": admin stream after event {last}\n\n"
    )))
    .await
    {
        return;
    }
    let mut tick = tokio::time::interval(cfg.keepalive.max(Duration::from_millis(10)));
    tick.tick().await;
    loop {
        let mut subjects = BTreeSet::new();
        let mut traffic = BTreeSet::new();
        let mut policy = false;
        let mut resync = false;
        let mut take = |d: &sse::Dispatch, last: &mut u64| {
            if d.id > *last {
                *last = d.id;
                collect_subjects(&d.payload, &mut subjects, &mut policy);
            }
        };
        tokio::select! {
            r = rx.recv() => match r {
                Ok(d) => take(&d, &mut last),
                Err(RecvError::Lagged(_)) => resync = true,
                Err(RecvError::Closed) => return,
            },
            r = traffic_rx.recv() => match r {
                Ok(id) => {
                    traffic.insert(id);
                }
                // Skipped updates are late ones; the next heartbeats bring them.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                if !send(Bytes::from_static(b": keepalive\n\n")).await {
                    return;
                }
                continue;
            }
        }
        loop {
            match rx.try_recv() {
                Ok(d) => take(&d, &mut last),
                Err(TryRecvError::Lagged(_)) => resync = true,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            }
        }
        loop {
            match traffic_rx.try_recv() {
                Ok(id) => {
                    traffic.insert(id);
                }
                Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            }
        }
        let Some(c) = weak.upgrade() else { return };
        let mut out = Vec::new();
        {
            let core = c.read();
            let reports = c.traffic();
            let reg = &core.registry;
            let mut frame = |event: &str, data: &serde_json::Value| {
                out.extend_from_slice(
                    format!("id: {last}\nevent: {event}\ndata: {data}\n\n").as_bytes(),
                );
            };
            if resync {
                frame(
                    "resync",
                    &serde_json::json!({ "event_id": reg.last_event_id() }),
                );
            } else {
                if policy {
                    frame("policy", &serde_json::json!({ "revision": reg.revision() }));
                }
                for id in &subjects {
                    match reg.peer(id) {
                        Some(p) => frame(
                            "member",
                            &serde_json::to_value(crate::ui::admin_member(p, reports.get(id)))
                                .unwrap_or_default(),
                        ),
                        None => frame("member_remove", &serde_json::json!({ "peer_id": id })),
                    }
                }
            }
            // A member frame above carries the report already; resync refetches it.
            for id in traffic.difference(&subjects) {
                if resync || reg.peer(id).is_none() {
                    continue;
                }
                if let Some(t) = reports.get(id) {
                    let ev = TrafficEvent {
                        peer_id: id.clone(),
                        traffic: t.clone(),
                    };
                    frame("traffic", &serde_json::to_value(ev).unwrap_or_default());
                }
            }
        }
        drop(c);
        if !out.is_empty() && !send(Bytes::from(out)).await {
            return;
        }
    }
}

/// The members a dispatch is about, and whether it changes the policy.
fn collect_subjects(p: &sse::Payload, subjects: &mut BTreeSet<String>, policy: &mut bool) {
    match p {
        sse::Payload::ByClass { subject, .. } => {
            subjects.insert(subject.clone());
        }
        sse::Payload::Batch(parts) => {
            for part in parts {
                collect_subjects(part, subjects, policy);
            }
        }
        sse::Payload::Policy { .. } => *policy = true,
        sse::Payload::Targeted(_) => {}
    }
}

fn known_path(p: &str) -> bool {
    matches!(
        p,
        "/health"
            | "/metrics"
            | "/openapi.json"
            | PATH_REGISTER
            | PATH_HEARTBEAT
            | PATH_PEERS
            | PATH_PEERS_STREAM
            | PATH_POLICY
            | PATH_TOKENS
            | PATH_REVOCATIONS
            | PATH_ROTATE_KEY
            | PATH_LEAVE
            | PATH_RELAY_TOKEN
            | PATH_ROUTES
            | PATH_POLICY_TEST
            | PATH_LOGIN_LINKS
            | PATH_ADMIN_SESSION
            | PATH_ADMIN_MEMBERS
            | PATH_ADMIN_REACH
            | PATH_ADMIN_STREAM
            | PATH_CLIENTS
    ) || p.starts_with("/v1/mesh/peers/")
        || p.starts_with("/v1/clients/")
        || p.starts_with("/v1/routes/")
        || p.starts_with("/v1/revocations/")
        || p.starts_with("/v1/tokens/")
        || p.starts_with("/v1/apps/")
}

fn query_peer_id(uri: &http::Uri) -> Option<&str> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("peer_id="))
}

/// The caller's peer id: by identity when there is one (and `claimed` must agree), else
/// (mTLS off, no identity header) the claimed id.
fn resolve_peer(
    reg: &Registry,
    identity: Option<&str>,
    claimed: Option<&str>,
) -> Result<String, ApiError> {
    match identity {
        Some(i) => {
            let p = reg.peer_by_identity(i).ok_or(ApiError::NotRegistered)?;
            match claimed {
                Some(c) if c != p.id => Err(ApiError::Forbidden(format!(
                    "peer {c:?} does not belong to identity {i:?}"
                ))),
                _ => Ok(p.id.clone()),
            }
        }
        None => match claimed {
            Some(c) if reg.peer(c).is_some() => Ok(c.to_owned()),
            Some(_) => Err(ApiError::NotRegistered),
            None => Err(ApiError::Unauthorized("no client identity".into())),
        },
    }
}

/// Whether `identity` may present `key_b64`: not revoked, the key bound to no other
/// identity, and no other key admitted for it. Returns the identity's record.
fn check_key(
    store: &Store,
    identity: &str,
    key_b64: &str,
) -> Result<Option<IdentityRecord>, ApiError> {
    let record = store.identity(identity);
    if record.is_some_and(|r| r.revoked_at.is_some()) || store.is_key_revoked(key_b64) {
        return Err(ApiError::Revoked);
    }
    if store.owner_of_key(key_b64).is_some_and(|o| o != identity) {
        return Err(ApiError::KeyTaken);
    }
    if record
        .and_then(|r| r.key.as_deref())
        .is_some_and(|k| k != key_b64)
    {
        return Err(ApiError::KeyMismatch(identity.to_owned()));
    }
    Ok(record.cloned())
}

/// Parses a request body as the routes do: any JSON error is a 400 `invalid_json`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))
}

fn decode_key(b64: &str) -> Result<[u8; 32], ApiError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| ApiError::BadRequest(format!("public_key is not base64: {e}")))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        ApiError::BadRequest(format!("public_key must be 32 bytes, got {}", bytes.len()))
    })
}

fn check_endpoints(eps: &[SocketAddr]) -> Result<(), ApiError> {
    if eps.len() > MAX_ENDPOINTS {
        return Err(ApiError::BadRequest(format!(
            "more than {MAX_ENDPOINTS} endpoints"
        )));
    }
    if let Some(bad) = eps
        .iter()
        .find(|e| e.port() == 0 || e.ip().is_unspecified() || e.ip().is_multicast())
    {
        return Err(ApiError::BadRequest(format!(
            "endpoint {bad} is not usable"
        )));
    }
    Ok(())
}

/// A heartbeat's `mapped_endpoints`: at most [`MAX_MAPPED_ENDPOINTS`], each usable unicast
/// with a port, outside the mesh's own prefixes, on the IP the heartbeat came from or one
/// of the peer's own endpoint IPs (a NAT maps to its public address; without NAT the node's
/// own), and none another peer's mapped endpoint already (a member cannot divert another's
/// hole punches to itself, nor point peers at a third party's address).
fn check_mapped(
    registry: &Registry,
    id: &str,
    mapped: &[SocketAddr],
    endpoints: &[SocketAddr],
    source: IpAddr,
) -> Result<(), ApiError> {
    if mapped.len() > MAX_MAPPED_ENDPOINTS {
        return Err(ApiError::BadRequest(format!(
            "more than {MAX_MAPPED_ENDPOINTS} mapped endpoints"
        )));
    }
    for m in mapped {
        let ip = canonical_ip(m.ip());
        let mesh = matches!(ip, IpAddr::V6(v6) if ula::is_peer_ula(&v6) || ula::is_app_ula(&v6));
        if m.port() == 0
            || ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
            || mesh
        {
            return Err(ApiError::BadRequest(format!(
                "mapped endpoint {m} is not a usable unicast address"
            )));
        }
        let own = ip == source || endpoints.iter().any(|e| canonical_ip(e.ip()) == ip);
        if !own {
            return Err(ApiError::BadRequest(format!(
                "mapped endpoint {m} is neither the address this heartbeat came from \
                 ({source}) nor one of the reported endpoints"
            )));
        }
        if let Some(other) = registry
            .peers()
            .find(|p| p.id != id && p.mapped.contains(m))
        {
            return Err(ApiError::BadRequest(format!(
                "mapped endpoint {m} is peer {}'s",
                other.id
            )));
        }
    }
    Ok(())
}

/// IPv4-mapped IPv6 source addresses (dual-stack listeners) as plain IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn json_response<T: Serialize + ?Sized>(status: StatusCode, v: &T) -> Response<ResponseBody> {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text_response(content_type: &'static str, text: String) -> Response<ResponseBody> {
    let mut r = Response::new(Full::new(Bytes::from(text)).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// Lets `route` hand any serializable answer to one `ok` helper.
mod erased {
    use super::*;

    pub(super) trait Json {
        fn respond(&self, status: StatusCode) -> Response<ResponseBody>;
    }

    impl<T: Serialize> Json for T {
        fn respond(&self, status: StatusCode) -> Response<ResponseBody> {
            json_response(status, self)
        }
    }
}

/// Re-export for the binary: the ALPN-configured acceptor for a server config.
pub fn acceptor(cfg: Arc<rustls::ServerConfig>) -> tokio_rustls::TlsAcceptor {
    tokio_rustls::TlsAcceptor::from(cfg)
}
