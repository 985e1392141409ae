//! Forwarding one request to an app and its response back.
//!
//! Pipeline for a request already matched to an app (by `/app/{uuid}` or a hostname route):
//! 1. resolve the app's address with the [`Upstream`] (no I/O);
//! 2. strip hop-by-hop headers, set `Host` to the app's address and the `X-Forwarded-*`
//!    headers from the client connection (client-sent `X-Forwarded-*` are replaced: this is
//!    the first hop);
//! 3. a request without a body (the common GET) is written on a pooled keep-alive connection
//!    in this task ([`crate::fetch`]); one with a body goes through hyper-util's pooled client,
//!    the body being hyper's `Incoming`, handed over frame by frame, so nothing is collected;
//! 4. wait for response headers with the upstream timeout, restarted while the request body
//!    is still moving (a slow 1 GiB upload is not a dead app);
//! 5. strip hop-by-hop headers from the response and return it with the app's `Incoming`
//!    body, again frame by frame (server-sent events flow as they are written).
//!
//! A protocol upgrade (WebSocket) takes a dedicated connection instead of the pool: after the
//! app's `101 Switching Protocols`, the two upgraded streams are spliced byte for byte until
//! both sides close, or until neither has sent anything for the idle timeout.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

use crate::body::EdgeBody;
use crate::config::Limits;
use crate::error::EdgeError;
use crate::fetch::Fetcher;
use crate::headers::{is_fixed_hop_by_hop, is_upgrade, restore_upgrade, strip_hop_by_hop};
use crate::metrics::Metrics;
use crate::pool::ConnPool;
use crate::upstream::{host_header, Upstream};
use crate::wire;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED_PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");

/// What to forward: the app, the path and query the app sees, and where the request came from.
#[derive(Debug)]
pub struct Target {
    /// The app.
    pub app: Uuid,
    /// Path and query as the app receives them.
    pub path: AppPath,
    /// The client's address as `X-Forwarded-For` carries it (see [`forwarded_for`]; computed
    /// once per client connection).
    pub forwarded_for: Option<HeaderValue>,
    /// Remove `Authorization` (it carried the edge's own key, which apps must not see).
    pub strip_authorization: bool,
}

/// The path and query an app receives, usually a tail of the client's (no copy).
#[derive(Debug, Clone)]
pub enum AppPath {
    /// The client's path and query from this byte offset on; it starts with `/` (an offset
    /// past the end, or a request without a path, reads as `/`).
    Tail(usize),
    /// A path and query of its own.
    Own(PathAndQuery),
}

impl AppPath {
    /// The path and query for a request whose target is `uri`.
    pub fn resolve<'a>(&'a self, uri: &'a Uri) -> &'a str {
        match self {
            AppPath::Tail(from) => uri
                .path_and_query()
                .and_then(|pq| pq.as_str().get(*from..))
                .filter(|tail| tail.starts_with('/'))
                .unwrap_or("/"),
            AppPath::Own(pq) => pq.as_str(),
        }
    }
}

/// The `X-Forwarded-For` value for a client at `client`: its IP, IPv4-mapped IPv6 shown as
/// IPv4.
pub fn forwarded_for(client: SocketAddr) -> Option<HeaderValue> {
    HeaderValue::from_str(&client.ip().to_canonical().to_string()).ok()
}

/// Forwards requests to apps. One per edge, shared by every connection.
pub struct Proxy {
    client: Client<HttpConnector, ProgressBody>,
    fetcher: Fetcher,
    pool: Arc<ConnPool>,
    upstream: Upstream,
    /// `Host` for the one address of [`Upstream::Fixed`], rendered once.
    fixed_host: Option<(SocketAddr, HeaderValue)>,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// A proxy with empty connection pools.
    pub fn new(upstream: Upstream, limits: Limits, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(limits.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let pool = Arc::new(ConnPool::new(limits.pool_idle_timeout));
        let fixed_host = match &upstream {
            Upstream::Fixed(addr) => Some((*addr, host_header(*addr))),
            _ => None,
        };
        Proxy {
            client,
            fetcher: Fetcher::new(pool.clone(), limits.connect_timeout),
            pool,
            upstream,
            fixed_host,
            limits,
            metrics,
        }
    }

    /// The pool of idle connections used for bodyless requests (the edge reaps it).
    pub fn pool(&self) -> Arc<ConnPool> {
        self.pool.clone()
    }

    /// Forwards `req` to `target.app` and returns the app's response (or the error to answer).
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        target: Target,
    ) -> Result<Response<EdgeBody>, EdgeError> {
        let result = self.forward_inner(req, target).await;
        if let Err(err) = result {
            self.metrics.upstream_error(err);
        }
        result
    }

    async fn forward_inner(
        &self,
        req: Request<Incoming>,
        target: Target,
    ) -> Result<Response<EdgeBody>, EdgeError> {
        let addr = self
            .upstream
            .resolve(&target.app)
            .ok_or(EdgeError::Unreachable)?;
        let host = match &self.fixed_host {
            Some((fixed, host)) if *fixed == addr => host.clone(),
            _ => host_header(addr),
        };
        let (mut parts, body) = req.into_parts();
        if body.is_end_stream() && !is_upgrade(&parts.headers) {
            return self.fetch(addr, parts, &host, target).await;
        }
        let original_host = original_host(&parts);
        let upgrade = strip_hop_by_hop(&mut parts.headers);
        if target.strip_authorization {
            parts.headers.remove(AUTHORIZATION);
        }
        set_forwarded(&mut parts.headers, target.forwarded_for, original_host);

        parts.headers.insert(HOST, host.clone());
        let authority = Authority::from_maybe_shared(Bytes::copy_from_slice(host.as_bytes()))
            .map_err(|_| EdgeError::Unreachable)?;
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(authority);
        let path = target.path.resolve(&parts.uri);
        uri.path_and_query = Some(PathAndQuery::try_from(path).map_err(|_| EdgeError::NotFound)?);
        parts.uri = Uri::from_parts(uri).map_err(|_| EdgeError::NotFound)?;
        parts.version = http::Version::HTTP_11;

        if let Some(protocol) = upgrade {
            restore_upgrade(&mut parts.headers, protocol);
            let client_upgrade = parts.extensions.remove::<OnUpgrade>();
            return self
                .forward_upgrade(Request::from_parts(parts, body), addr, client_upgrade)
                .await;
        }

        let progress = (!body.is_end_stream()).then(|| Arc::new(AtomicU64::new(0)));
        let body = ProgressBody {
            inner: body,
            progress: progress.clone(),
        };
        let started = Instant::now();
        let pending = self.client.request(Request::from_parts(parts, body));
        tokio::pin!(pending);
        let mut seen = 0;
        let resp = loop {
            match tokio::time::timeout(self.limits.upstream_timeout, &mut pending).await {
                Ok(result) => break result.map_err(|e| classify_client_error(&e))?,
                Err(_) => {
                    let now = progress.as_ref().map_or(0, |p| p.load(Relaxed));
                    if now == seen {
                        return Err(EdgeError::Timeout);
                    }
                    seen = now;
                }
            }
        };
        self.metrics.upstream_latency(started.elapsed());
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, EdgeBody::Incoming(body)))
    }

    /// Sends a request without a body over a pooled connection, in this task (see
    /// [`crate::fetch`]); the upstream timeout covers connecting, sending and the response
    /// head. The head is written in one pass over the client's fields, skipping what
    /// [`set_forwarded`] and [`strip_hop_by_hop`] would replace or remove, so the request's
    /// header map is not edited.
    async fn fetch(
        &self,
        addr: SocketAddr,
        mut parts: http::request::Parts,
        host: &HeaderValue,
        target: Target,
    ) -> Result<Response<EdgeBody>, EdgeError> {
        let original_host = original_host(&parts);
        if parts.headers.contains_key(CONNECTION) {
            // Removes the fields `Connection` names, too.
            strip_hop_by_hop(&mut parts.headers);
        }
        let strip_authorization = target.strip_authorization;
        let fields = parts.headers.iter().filter(|(name, _)| {
            !(is_fixed_hop_by_hop(name)
                || *name == X_FORWARDED_FOR
                || *name == X_FORWARDED_PROTO
                || *name == X_FORWARDED_HOST
                || (strip_authorization && *name == AUTHORIZATION))
        });
        let forwarded = [
            (&X_FORWARDED_FOR, target.forwarded_for.as_ref()),
            (&X_FORWARDED_PROTO, Some(&FORWARDED_PROTO_HTTP)),
            (&X_FORWARDED_HOST, original_host.as_ref()),
        ];
        let forwarded = forwarded
            .into_iter()
            .filter_map(|(name, value)| Some((name, value?)));
        let mut head = BytesMut::new();
        wire::encode_request(
            &mut head,
            &parts.method,
            target.path.resolve(&parts.uri),
            host,
            fields.chain(forwarded),
        );
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started) + self.limits.upstream_timeout;
        let resp = tokio::time::timeout_at(deadline, self.fetcher.send(addr, &parts.method, &head))
            .await
            .map_err(|_| EdgeError::Timeout)??;
        self.metrics.upstream_latency(started.elapsed());
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, EdgeBody::Fetched(body)))
    }

    /// Sends an upgrade request on its own connection; on `101`, splices the two upgraded
    /// streams in a background task.
    async fn forward_upgrade(
        &self,
        req: Request<Incoming>,
        addr: SocketAddr,
        client_upgrade: Option<OnUpgrade>,
    ) -> Result<Response<EdgeBody>, EdgeError> {
        let stream = tokio::time::timeout(
            self.limits.connect_timeout,
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| EdgeError::Timeout)?
        .map_err(|e| classify_io_error(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| EdgeError::BadGateway)?;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!(error = %err, "upgrade connection to app ended with an error");
            }
        });
        let started = Instant::now();
        let mut resp = tokio::time::timeout(self.limits.upstream_timeout, sender.send_request(req))
            .await
            .map_err(|_| EdgeError::Timeout)?
            .map_err(|e| classify_hyper_error(&e))?;
        self.metrics.upstream_latency(started.elapsed());
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let app_upgrade = switching.then(|| hyper::upgrade::on(&mut resp));
        let (mut parts, body) = resp.into_parts();
        let protocol = strip_hop_by_hop(&mut parts.headers);
        let (Some(app_upgrade), Some(client_upgrade)) = (app_upgrade, client_upgrade) else {
            return Ok(Response::from_parts(parts, EdgeBody::Incoming(body)));
        };
        let Some(protocol) = protocol else {
            // A 101 without `Connection: upgrade` + `Upgrade` is not a protocol switch we can relay.
            return Err(EdgeError::BadGateway);
        };
        restore_upgrade(&mut parts.headers, protocol);
        self.metrics.upgrade();
        tokio::spawn(splice(
            client_upgrade,
            app_upgrade,
            self.limits.ws_idle_timeout,
            self.metrics.clone(),
        ));
        Ok(Response::from_parts(parts, crate::body::empty()))
    }
}

/// Copies bytes both ways between the client's and the app's upgraded connections until
/// both directions are closed, or until neither side has sent anything for `idle` (then both
/// are closed and it is counted). A write that cannot progress for `idle` (a peer that does
/// not read) also ends it.
async fn splice(client: OnUpgrade, app: OnUpgrade, idle: Duration, metrics: Arc<Metrics>) {
    let (client, app) = tokio::join!(client, app);
    let (client, app) = match (client, app) {
        (Ok(c), Ok(a)) => (c, a),
        (Err(err), _) | (_, Err(err)) => {
            tracing::debug!(error = %err, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut app = TokioIo::new(app);
    match splice_with_idle(&mut client, &mut app, idle).await {
        Ok(SpliceEnd::Closed { up, down }) => {
            tracing::debug!(up, down, "upgraded connection closed");
        }
        Ok(SpliceEnd::Idle) => {
            metrics.upgrade_idle_closed();
            tracing::debug!("upgraded connection closed after being idle");
        }
        Err(err) => tracing::debug!(error = %err, "upgraded connection ended with an error"),
    }
}

/// How a splice ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides closed their direction; bytes copied client→app and app→client.
    Closed {
        /// Client to app.
        up: u64,
        /// App to client.
        down: u64,
    },
    /// Nothing moved either way for the idle timeout.
    Idle,
}

/// Copies bytes both ways between `a` (the client) and `b` (the app): a side that closes
/// its direction has the other side's write half shut down; ends when both directions are
/// closed, or with [`SpliceEnd::Idle`] when no byte moved either way for `idle`.
pub async fn splice_with_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Duration,
) -> std::io::Result<SpliceEnd>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut abuf = vec![0u8; 16 * 1024];
    let mut bbuf = vec![0u8; 16 * 1024];
    let (mut a_open, mut b_open) = (true, true);
    let (mut up, mut down) = (0u64, 0u64);
    let idle_end = |last: tokio::time::Instant| last + idle;
    let mut last = tokio::time::Instant::now();
    while a_open || b_open {
        tokio::select! {
            r = a.read(&mut abuf), if a_open => {
                let n = r?;
                if n == 0 {
                    a_open = false;
                    let _ = b.shutdown().await;
                } else {
                    tokio::time::timeout(idle, b.write_all(&abuf[..n]))
                        .await
                        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "app does not read"))??;
                    up += n as u64;
                }
                last = tokio::time::Instant::now();
            }
            r = b.read(&mut bbuf), if b_open => {
                let n = r?;
                if n == 0 {
                    b_open = false;
                    let _ = a.shutdown().await;
                } else {
                    tokio::time::timeout(idle, a.write_all(&bbuf[..n]))
                        .await
                        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client does not read"))??;
                    down += n as u64;
                }
                last = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(idle_end(last)) => {
                let _ = a.shutdown().await;
                let _ = b.shutdown().await;
                return Ok(SpliceEnd::Idle);
            }
        }
    }
    Ok(SpliceEnd::Closed { up, down })
}

/// The client's `Host` (or the authority of an absolute-form target), for `X-Forwarded-Host`.
fn original_host(parts: &http::request::Parts) -> Option<HeaderValue> {
    parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// Sets `X-Forwarded-For`, `-Proto` and `-Host`, replacing whatever the client sent.
fn set_forwarded(
    headers: &mut http::HeaderMap,
    forwarded_for: Option<HeaderValue>,
    host: Option<HeaderValue>,
) {
    match forwarded_for {
        Some(v) => {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        None => {
            headers.remove(&X_FORWARDED_FOR);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), FORWARDED_PROTO_HTTP.clone());
    match host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST.clone(), h);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// Maps a pooled-client failure to the answer: connect refused/unreachable → 502,
/// connect timeout → 504, anything after connecting (reset, garbage, early close) → 502.
fn classify_client_error(err: &hyper_util::client::legacy::Error) -> EdgeError {
    tracing::debug!(error = ?err, "forwarding to app failed");
    if err.is_connect() {
        return if chain_has_timeout(err) {
            EdgeError::Timeout
        } else {
            EdgeError::Unreachable
        };
    }
    EdgeError::BadGateway
}

fn classify_hyper_error(err: &hyper::Error) -> EdgeError {
    tracing::debug!(error = ?err, "forwarding upgrade to app failed");
    EdgeError::BadGateway
}

fn classify_io_error(err: &std::io::Error) -> EdgeError {
    match err.kind() {
        std::io::ErrorKind::TimedOut => EdgeError::Timeout,
        _ => EdgeError::Unreachable,
    }
}

/// Whether any error in the source chain is an I/O timeout (hyper-util reports its connect
/// timeout as a wrapped `TimedOut`).
fn chain_has_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
            // `io::Error::source` skips the wrapped error itself; look at it directly.
            if let Some(inner) = io.get_ref() {
                if chain_has_timeout(inner) {
                    return true;
                }
            }
        }
        cur = e.source();
    }
    false
}

/// A request body that counts forwarded frames, so the response wait knows the upload moves.
pub struct ProgressBody {
    inner: Incoming,
    progress: Option<Arc<AtomicU64>>,
}

impl Body for ProgressBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(_))), Some(progress)) = (&polled, &this.progress) {
            progress.fetch_add(1, Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_replace_client_values() {
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-forwarded-host", HeaderValue::from_static("spoof"));
        let client: SocketAddr = "[::ffff:192.0.2.7]:5000".parse().unwrap();
        set_forwarded(&mut h, forwarded_for(client), None);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.7");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert!(h.get("x-forwarded-host").is_none());
        set_forwarded(
            &mut h,
            forwarded_for(client),
            Some(HeaderValue::from_static("a.test")),
        );
        assert_eq!(h.get("x-forwarded-host").unwrap(), "a.test");
    }

    #[test]
    fn io_errors_map_to_502_or_504() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            classify_io_error(&Error::from(ErrorKind::ConnectionRefused)),
            EdgeError::Unreachable
        );
        assert_eq!(
            classify_io_error(&Error::from(ErrorKind::TimedOut)),
            EdgeError::Timeout
        );
        let wrapped = Error::other(Error::from(ErrorKind::TimedOut));
        assert!(chain_has_timeout(&wrapped));
        assert!(!chain_has_timeout(&Error::other("refused")));
    }
}
