//! The listener: accepting connections, limits, dispatch by hostname and path, access log.
//!
//! Dispatch order for each request:
//! 1. a hostname route from the routes file (open: routed hostnames are public sites);
//! 2. `/health`, `/metrics`, `/openapi.json`, `/swagger-ui` (open);
//! 3. `/app/{uuid}[/{rest}]` and `/v1/*` (bearer key);
//! 4. anything else: 404.
//!
//! Each accepted connection is counted per source address and overall ([`ConnLimiter`]);
//! over either cap it gets a JSON 429 or 503 and is closed. Otherwise it is served by hyper's
//! HTTP/1.1 server with upgrades enabled, a header-read timeout (which also bounds idle
//! keep-alive time: hyper arms it whenever it waits for a request head) and limits on the
//! head's size and header count, reading through [`GuardedIo`] (strict CRLF, request
//! deadline, minimum body rate; see [`crate::conn`] for how its refusals are answered).
//! Shutdown stops accepting and lets in-flight requests finish.
//!
//! `/metrics` is served on its own listener (`metrics_bind`, loopback by default); on the
//! public listener only to a bearer of the metrics key, else 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use uuid::Uuid;

use crate::auth::NodeKey;
use crate::body::{full, json, EdgeBody};
use crate::config::{EdgeConfig, Limits};
use crate::conn::{ConnLimiter, ConnState, GuardedIo};
use crate::error::EdgeError;
use crate::metrics::{Metrics, Refusal, RouteKind};
use crate::proxy::{AppPath, Proxy, Target};
use crate::routes::{self, HostRoutes, RouteError, Routes};

/// Why an edge could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The routes file is unreadable or invalid.
    #[error("routes file: {0}")]
    Routes(#[from] RouteError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// State shared by every connection of one edge.
struct Shared {
    key: NodeKey,
    routes: Arc<Routes>,
    proxy: Proxy,
    metrics: Arc<Metrics>,
    limits: Limits,
    openapi: Bytes,
    metrics_key: Option<NodeKey>,
    limiter: Arc<ConnLimiter>,
}

/// Most refused connections being answered at once; past it they are closed unanswered.
const MAX_REFUSING: usize = 256;

/// A configured edge, not yet listening.
pub struct Edge {
    shared: Arc<Shared>,
    config: EdgeConfig,
}

impl Edge {
    /// Validates `config` and loads the routes file, if any.
    pub fn new(config: EdgeConfig) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::default());
        let table = match &config.routes_file {
            Some(path) => {
                let table = HostRoutes::load(path)?;
                metrics.routes_loaded(table.len());
                table
            }
            None => HostRoutes::default(),
        };
        let shared = Shared {
            key: config.key.clone(),
            routes: Arc::new(Routes::new(table)),
            proxy: Proxy::new(
                config.upstream.clone(),
                config.limits.clone(),
                metrics.clone(),
            ),
            metrics,
            limits: config.limits.clone(),
            openapi: Bytes::from(crate::openapi::document().to_string()),
            metrics_key: config.metrics_key.clone(),
            limiter: ConnLimiter::new(
                config.limits.max_connections,
                config.limits.max_connections_per_ip,
            ),
        };
        Ok(Edge {
            shared: Arc::new(shared),
            config,
        })
    }

    /// The edge's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Binds the listen address and starts serving (and watching the routes file) in
    /// background tasks on the current tokio runtime.
    pub async fn start(self) -> Result<RunningEdge, StartError> {
        let addr = self.config.bind;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let metrics_listener = match self.config.metrics_bind {
            Some(maddr) => {
                let l = TcpListener::bind(maddr)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: maddr,
                        source,
                    })?;
                let bound = l.local_addr().map_err(|source| StartError::Bind {
                    addr: maddr,
                    source,
                })?;
                Some((l, bound))
            }
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().map(|(_, a)| *a);
        let metrics_task =
            metrics_listener.map(|(l, _)| tokio::spawn(serve_metrics(l, self.shared.clone())));
        let (stop_tx, stop_rx) = watch::channel(false);
        let watcher = self.config.routes_file.clone().map(|path| {
            tokio::spawn(routes::watch(
                path,
                self.shared.routes.clone(),
                self.shared.metrics.clone(),
                self.shared.limits.routes_poll,
            ))
        });
        let reap_period = (self.shared.limits.pool_idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        let reaper = tokio::spawn(self.shared.proxy.pool().reap_every(reap_period));
        let task = tokio::spawn(accept_loop(listener, self.shared.clone(), stop_rx));
        Ok(RunningEdge {
            local_addr,
            stop: stop_tx,
            task,
            watcher,
            reaper,
            metrics_task,
            metrics_addr,
            metrics: self.shared.metrics.clone(),
        })
    }
}

/// A listening edge.
pub struct RunningEdge {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Duration>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// Closes idle app connections past their idle timeout.
    reaper: tokio::task::JoinHandle<()>,
    /// The metrics listener, if any.
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
}

impl RunningEdge {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The edge's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The bound address of the metrics listener, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops accepting, waits up to `grace` for open connections to finish their requests,
    /// then drops the rest.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        if let Some(w) = &self.watcher {
            w.abort();
        }
        self.reaper.abort();
        if let Some(m) = &self.metrics_task {
            m.abort();
        }
        // The accept loop returns once every connection has closed (each finishes its
        // in-flight request and then closes, as told by the stop signal).
        let _ = tokio::time::timeout(grace, &mut self.task).await;
        self.task.abort();
    }
}

impl Drop for RunningEdge {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
        self.reaper.abort();
        if let Some(w) = &self.watcher {
            w.abort();
        }
        if let Some(m) = &self.metrics_task {
            m.abort();
        }
    }
}

fn http_builder(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    http
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Duration {
    let started = Instant::now();
    let http = http_builder(&shared.limits);
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    // Every connection task holds a clone; `recv` returns `None` once all are gone.
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let inbound_limits = shared.limits.inbound();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors or a connection aborted before accept: back off
                    // briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let permit = match shared.limiter.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(reason) => {
                shared.metrics.refused(reason);
                tracing::debug!(%peer, reason = reason.label(), "connection refused");
                if let Ok(slot) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        crate::conn::refuse(stream, reason.error()).await;
                        drop(slot);
                    });
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn_shared = shared.clone();
        let state = Arc::new(ConnState::default());
        let io = GuardedIo::new(
            stream,
            inbound_limits,
            state.clone(),
            shared.metrics.clone(),
            permit,
        );
        // Rendered once per connection: every request on it comes from the same address.
        let forwarded_for = crate::proxy::forwarded_for(peer);
        let service = service_fn(move |req| {
            handle(
                conn_shared.clone(),
                state.clone(),
                req,
                peer,
                forwarded_for.clone(),
            )
        });
        let conn = http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let metrics = shared.metrics.clone();
        metrics.connection_opened();
        let mut conn_stop = stop.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { conn_stop.wait_for(|stopped| *stopped).await.map(|_| ()) } => {
                    // Finish the request in flight (if any), then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "client connection ended with an error");
            }
            metrics.connection_closed();
            drop(alive);
        });
    }
    drop(listener);
    drop(alive);
    let _ = all_closed.recv().await;
    started.elapsed()
}

/// Serves `/metrics` (and `/health`) on the metrics listener; everything else is 404.
async fn serve_metrics(listener: TcpListener, shared: Arc<Shared>) {
    let http = http_builder(&shared.limits);
    let open = Arc::new(Semaphore::new(64));
    loop {
        let Ok(permit) = open.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let shared = shared.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let shared = shared.clone();
            async move {
                let readable = matches!(*req.method(), Method::GET | Method::HEAD);
                let resp = match req.uri().path() {
                    "/metrics" if readable => metrics_response(&shared),
                    "/health" if readable => json(StatusCode::OK, r#"{"status":"ok"}"#),
                    "/metrics" | "/health" => EdgeError::MethodNotAllowed.response(),
                    _ => EdgeError::NotFound.response(),
                };
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}

fn metrics_response(shared: &Shared) -> Response<EdgeBody> {
    full(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        shared.metrics.render(),
    )
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    forwarded_for: Option<HeaderValue>,
) -> Result<Response<EdgeBody>, Infallible> {
    let log = tracing::enabled!(target: "tabbify_edge::access", tracing::Level::INFO);
    let logged = log.then(|| {
        (
            Instant::now(),
            req.method().clone(),
            req.uri().path().to_owned(),
        )
    });
    let index = conn.next_request();
    let (kind, resp) = match conn.stand_in(index) {
        // Not a request of the client's: the stand-in for a head the edge refused.
        Some(reason) => (RouteKind::Builtin, closing(reason.error().response())),
        None => {
            let upgrade = crate::headers::is_upgrade(req.headers());
            let (kind, resp) = dispatch(&shared, &conn, index, req, forwarded_for).await;
            // An upgrade that was not granted closes the connection: the bytes after it were
            // not inspected as requests (see `crate::inbound`).
            let granted = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            (
                kind,
                if upgrade && !granted {
                    closing(resp)
                } else {
                    resp
                },
            )
        }
    };
    let status = resp.status();
    shared.metrics.request(kind, status.as_u16());
    if let Some((started, method, path)) = logged {
        tracing::info!(
            target: "tabbify_edge::access",
            %peer,
            %method,
            path,
            status = status.as_u16(),
            route = kind.label(),
            micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        );
    }
    Ok(resp)
}

/// `resp` with `Connection: close`: hyper closes the connection after sending it.
fn closing(mut resp: Response<EdgeBody>) -> Response<EdgeBody> {
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

async fn dispatch(
    shared: &Shared,
    conn: &ConnState,
    index: u64,
    req: Request<Incoming>,
    forwarded_for: Option<HeaderValue>,
) -> (RouteKind, Response<EdgeBody>) {
    if let Some(app) = host_route(shared, &req) {
        let target = Target {
            app,
            path: AppPath::Tail(0),
            forwarded_for,
            strip_authorization: false,
        };
        return (
            RouteKind::Host,
            proxy(shared, conn, index, req, target).await,
        );
    }
    let path = req.uri().path();
    if path == "/app" || path.starts_with("/app/") {
        if !shared
            .key
            .authorizes(req.headers().get(http::header::AUTHORIZATION))
        {
            return (RouteKind::App, EdgeError::Unauthorized.response());
        }
        let target = match app_target(&req, forwarded_for) {
            Ok(t) => t,
            Err(err) => return (RouteKind::App, err.response()),
        };
        return (
            RouteKind::App,
            proxy(shared, conn, index, req, target).await,
        );
    }
    (RouteKind::Builtin, builtin(shared, &req))
}

async fn proxy(
    shared: &Shared,
    conn: &ConnState,
    index: u64,
    req: Request<Incoming>,
    target: Target,
) -> Response<EdgeBody> {
    let app = target.app;
    match shared.proxy.forward(req, target).await {
        Ok(resp) => resp,
        Err(_) if conn.cut(index).is_some() => {
            // The client's body was cut by the edge's limits (already counted), not the app's
            // fault: say so, if the connection can still carry it.
            closing(EdgeError::RequestTimeout.response())
        }
        Err(err) => {
            tracing::warn!(%app, error = %err, "request to app failed");
            err.response()
        }
    }
}

/// The app of a hostname route matching this request, if any.
fn host_route(shared: &Shared, req: &Request<Incoming>) -> Option<Uuid> {
    let table = shared.routes.current();
    if table.is_empty() {
        return None;
    }
    let host = match req.headers().get(HOST) {
        Some(h) => h.to_str().ok()?,
        None => req.uri().host()?,
    };
    table.lookup(host, req.uri().path())
}

/// Parses `/app/{uuid}[/{rest}][?query]` into the forwarding target.
fn app_target(
    req: &Request<Incoming>,
    forwarded_for: Option<HeaderValue>,
) -> Result<Target, EdgeError> {
    let path = req.uri().path();
    if path == "/app" {
        return Err(EdgeError::NotFound);
    }
    let after = &path["/app/".len()..];
    let (id, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    let app = Uuid::try_parse(id).map_err(|_| EdgeError::BadAppId)?;
    let path = if rest.is_empty() {
        // `/app/{uuid}` and `/app/{uuid}?q`: the app sees `/` and `/?q`.
        let own = match req.uri().query() {
            Some(q) => PathAndQuery::try_from(format!("/?{q}")),
            None => Ok(PathAndQuery::from_static("/")),
        };
        AppPath::Own(own.map_err(|_| EdgeError::NotFound)?)
    } else {
        // `rest` and the query after it are the tail of the client's path and query.
        AppPath::Tail(path.len() - rest.len())
    };
    Ok(Target {
        app,
        path,
        forwarded_for,
        strip_authorization: true,
    })
}

/// The edge's own endpoints.
fn builtin(shared: &Shared, req: &Request<Incoming>) -> Response<EdgeBody> {
    let path = req.uri().path();
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    if path == "/metrics" {
        // Not on the public listener unless the metrics key is configured and presented;
        // a refusal looks like any unknown path.
        let reason = match &shared.metrics_key {
            Some(key) if key.authorizes(req.headers().get(http::header::AUTHORIZATION)) => {
                return if readable {
                    metrics_response(shared)
                } else {
                    EdgeError::MethodNotAllowed.response()
                };
            }
            Some(_) => Refusal::MetricsUnauthorized,
            None => Refusal::MetricsPublic,
        };
        shared.metrics.refused(reason);
        return EdgeError::NotFound.response();
    }
    let open = match path {
        "/health" => Some(json(StatusCode::OK, r#"{"status":"ok"}"#)),
        "/openapi.json" => Some(json(StatusCode::OK, shared.openapi.clone())),
        p if p == "/swagger-ui" || p.starts_with("/swagger-ui/") => {
            Some(crate::openapi::swagger_ui(p).unwrap_or_else(|| EdgeError::NotFound.response()))
        }
        _ => None,
    };
    if let Some(resp) = open {
        return if readable {
            resp
        } else {
            EdgeError::MethodNotAllowed.response()
        };
    }
    if path == "/v1" || path.starts_with("/v1/") {
        if !shared
            .key
            .authorizes(req.headers().get(http::header::AUTHORIZATION))
        {
            return EdgeError::Unauthorized.response();
        }
        return match path {
            "/v1/routes" if readable => {
                let routes = shared.routes.current().routes();
                json(
                    StatusCode::OK,
                    serde_json::json!({ "routes": routes }).to_string(),
                )
            }
            "/v1/routes" => EdgeError::MethodNotAllowed.response(),
            _ => EdgeError::NotFound.response(),
        };
    }
    EdgeError::NotFound.response()
}
