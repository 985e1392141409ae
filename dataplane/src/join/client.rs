//! The joiner's HTTPS client for the coordinator: JSON requests and the SSE roster stream.
//!
//! One TCP (+TLS) connection per request: the joiner sends a heartbeat every few seconds
//! and keeps one long-lived SSE stream, so connection reuse buys nothing and a fresh
//! connection never carries a half-dead socket across a coordinator restart. mTLS by
//! default: the server must chain to the mesh CA (never system roots) and the joiner
//! presents its peer certificate. Plaintext `http://` is for loopback development only and
//! names the caller with the `x-tabbify-identity` header, as the coordinator expects.
//!
//! Every connection has TCP keepalive ([`TCP_KEEPALIVE_IDLE`], [`TCP_KEEPALIVE_INTERVAL`],
//! [`TCP_KEEPALIVE_RETRIES`]): a path that dies without a FIN or RST (the underlay address
//! changed, a middlebox dropped its state) fails the stream's read within
//! `IDLE + INTERVAL × RETRIES` = 14 s of the last byte received, instead of never.
//! The stream's idle deadline is kept by the machine
//! ([`crate::join::logic::machine::STREAM_IDLE_TIMEOUT`]), fed by
//! [`EventStream::take_activity`].
//!
//! Errors are split into what retrying can fix ([`ClientError::Transport`], 5xx, 408) and
//! what it cannot (every other 4xx, with the coordinator's `code` and reason), so the
//! control loop knows whether to back off or to give up.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tabbify_api::{SseDecoder, SseEvent};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long a connect (TCP + TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connect may take when there are other coordinators to move to: short, so a
/// dead one (no RST: its host is gone) is left well within one heartbeat interval.
pub const FAILOVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a JSON request may take, end to end.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle time before the first TCP keepalive probe on a control connection.
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// Time between unanswered TCP keepalive probes.
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// Unanswered probes after which the kernel declares the connection dead.
pub const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// What went wrong talking to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator could not be reached or the connection broke (retry later).
    #[error("coordinator unreachable: {0}")]
    Transport(String),
    /// The coordinator answered with an error status.
    #[error("coordinator refused ({status}, {code}): {message}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The `code` of the JSON error body (`token_invalid`, `revoked`, …).
        code: String,
        /// The `error` of the JSON error body.
        message: String,
    },
    /// A success answer whose body is not what the API defines.
    #[error("unexpected answer from the coordinator: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether retrying later may succeed (network trouble, 5xx, 408, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::Protocol(_) => true,
            ClientError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
        }
    }

    /// The coordinator's error code, if it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Where the coordinator is and how to talk to it.
#[derive(Clone)]
pub struct Client {
    host: String,
    port: u16,
    /// Connect here instead of resolving `host` (one address of a name that resolves to
    /// several); TLS still names `host`.
    addr: Option<std::net::SocketAddr>,
    connect_timeout: Duration,
    authority: String,
    tls: Option<(TlsConnector, rustls::pki_types::ServerName<'static>)>,
    identity: Option<String>,
    url: String,
    /// `SO_MARK` on every connection (`--exit-node`: keeps the coordinator off the tunnel).
    fwmark: Option<u32>,
}

/// A coordinator URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("coordinator URL {url:?}: {reason}")]
pub struct UrlError {
    url: String,
    reason: String,
}

impl Client {
    /// A client for `url` (`https://HOST[:PORT]`). `tls` is the rustls config (mesh CA +
    /// client certificate); `None` means plaintext `http://`, where `identity` names us.
    pub fn new(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        identity: Option<String>,
    ) -> Result<Self, UrlError> {
        let bad = |reason: &str| UrlError {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .trim_end_matches('/')
            .parse()
            .map_err(|_| bad("not a URL"))?;
        let scheme = uri
            .scheme_str()
            .ok_or_else(|| bad("no scheme (https://…)"))?;
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad("must not have a path"));
        }
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => {
                return Err(bad(
                    "scheme must be https (or http with --insecure-no-mtls)",
                ))
            }
        };
        if https != tls.is_some() {
            return Err(bad(if https {
                "https needs the TLS files"
            } else {
                "http:// is only for --insecure-no-mtls; use https://"
            }));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = match uri.authority() {
            Some(a) => a.as_str().to_owned(),
            None => return Err(bad("no host")),
        };
        let tls = match tls {
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|_| bad("host is not a valid TLS server name"))?;
                Some((TlsConnector::from(cfg), name))
            }
            None => None,
        };
        Ok(Self {
            host,
            port,
            addr: None,
            connect_timeout: CONNECT_TIMEOUT,
            authority,
            tls,
            identity,
            url: url.to_owned(),
            fwmark: None,
        })
    }

    /// Marks every connection with `SO_MARK` `mark` (policy routing keeps marked traffic
    /// off the tunnel: `crate::policy`).
    pub fn set_fwmark(&mut self, mark: Option<u32>) {
        self.fwmark = mark;
    }

    /// Replaces the TLS client configuration (a reload's new certificates); the server name
    /// stays. A plaintext client stays plaintext.
    pub fn set_tls(&mut self, cfg: Arc<rustls::ClientConfig>) {
        if let Some((connector, _)) = &mut self.tls {
            *connector = TlsConnector::from(cfg);
        }
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The host and port of the URL (to resolve into several targets).
    pub fn host_port(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    /// The same coordinator reached at `addr` (one address of its host name); the TLS
    /// server name stays the URL's host.
    pub fn at(&self, addr: std::net::SocketAddr) -> Self {
        Self {
            addr: Some(addr),
            ..self.clone()
        }
    }

    /// The fixed address, when this client is one address of a name.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.addr
    }

    /// Sets how long a connect may take ([`FAILOVER_CONNECT_TIMEOUT`] with several
    /// coordinators).
    pub fn set_connect_timeout(&mut self, t: Duration) {
        self.connect_timeout = t;
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let t = |e: &dyn std::fmt::Display| ClientError::Transport(e.to_string());
        let connect = async {
            let tcp = match (self.addr, self.fwmark) {
                (Some(addr), None) => TcpStream::connect(addr).await,
                (None, None) => TcpStream::connect((self.host.as_str(), self.port)).await,
                (addr, Some(mark)) => connect_marked(addr, &self.host, self.port, mark).await,
            }
            .map_err(|e| t(&e))?;
            let _ = tcp.set_nodelay(true);
            set_keepalive(&tcp);
            match &self.tls {
                Some((conn, name)) => {
                    let tls = conn
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| t(&format!("TLS: {e}")))?;
                    handshake(tls).await
                }
                None => handshake(tcp).await,
            }
        };
        let mut sender = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| t(&"connect timed out"))??;
        sender.send_request(req).await.map_err(|e| t(&e))
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(
                http::header::USER_AGENT,
                concat!("tabbify-mesh/", env!("CARGO_PKG_VERSION")),
            );
        if !body.is_empty() {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(id) = &self.identity {
            b = b.header("x-tabbify-identity", id);
        }
        b.body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// POSTs `body` as JSON to `path` and decodes the JSON answer.
    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let req = self.request(Method::POST, path, Bytes::from(json))?;
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            let resp = self.send(req).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(status_error(status, &bytes));
            }
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
        })
        .await
        .map_err(|_| ClientError::Transport("request timed out".into()))?
    }

    /// Opens the SSE roster stream at `path`, resuming after event `last_event_id` when
    /// given (`Last-Event-ID`, with the event log the id came from: the coordinator replays
    /// what came after it, or sends a snapshot when it no longer holds those events or
    /// keeps another log).
    pub async fn stream(
        &self,
        path: &str,
        last_event_id: Option<(u64, Option<&str>)>,
    ) -> Result<EventStream, ClientError> {
        let mut req = self.request(Method::GET, path, Bytes::new())?;
        req.headers_mut().insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static("text/event-stream"),
        );
        if let Some((id, log)) = last_event_id {
            req.headers_mut()
                .insert("last-event-id", http::HeaderValue::from(id));
            if let Some(v) = log.and_then(|l| http::HeaderValue::from_str(l).ok()) {
                req.headers_mut().insert(tabbify_api::EVENT_LOG_HEADER, v);
            }
        }
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.send(req))
            .await
            .map_err(|_| ClientError::Transport("stream request timed out".into()))??;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(status_error(status, &bytes));
        }
        let event_log = resp
            .headers()
            .get(tabbify_api::EVENT_LOG_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(EventStream {
            event_log,
            body: resp.into_body(),
            decoder: SseDecoder::new(),
            pending: std::collections::VecDeque::new(),
            activity: None,
        })
    }
}

/// Connects with `SO_MARK` set before the SYN: to `addr`, or to each address of `host`
/// in turn.
async fn connect_marked(
    addr: Option<std::net::SocketAddr>,
    host: &str,
    port: u16,
    mark: u32,
) -> std::io::Result<TcpStream> {
    let addrs: Vec<std::net::SocketAddr> = match addr {
        Some(a) => vec![a],
        None => tokio::net::lookup_host((host, port)).await?.collect(),
    };
    tabbify_relay::client::connect_marked_to(addrs, mark).await
}

/// Turns on TCP keepalive with the constants above. A failure is logged, not fatal: the
/// machine's stream idle deadline still bounds a dead stream.
fn set_keepalive(tcp: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "cannot enable TCP keepalive on the coordinator connection");
    }
}

async fn handshake<S>(
    io: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| ClientError::Transport(e.to_string()))?;
    tokio::spawn(async move {
        // The connection ends with its response (or the stream): nothing to report.
        let _ = conn.await;
    });
    Ok(sender)
}

fn status_error(status: StatusCode, body: &[u8]) -> ClientError {
    #[derive(serde::Deserialize)]
    struct ErrBody {
        error: String,
        #[serde(default)]
        code: String,
    }
    match serde_json::from_slice::<ErrBody>(body) {
        Ok(e) => ClientError::Status {
            status,
            code: e.code,
            message: e.error,
        },
        Err(_) => ClientError::Status {
            status,
            code: String::new(),
            message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}

/// An open SSE stream: typed events with their ids, in order.
///
/// It has no timeout of its own: [`EventStream::next`] is cancelled and called again
/// whenever the shell wakes for something else, so a per-call timeout would restart on
/// every wake-up. Instead it records when bytes last arrived ([`EventStream::take_activity`])
/// and the machine keeps the idle deadline.
pub struct EventStream {
    /// The event log its ids belong to (the coordinator's [`tabbify_api::EVENT_LOG_HEADER`]).
    event_log: Option<String>,
    body: Incoming,
    decoder: SseDecoder,
    pending: std::collections::VecDeque<(Option<u64>, SseEvent)>,
    /// When bytes last arrived and the machine has not been told yet.
    activity: Option<std::time::Instant>,
}

impl EventStream {
    /// The next event; `Ok(None)` when the coordinator closed the stream. Unknown event
    /// names (a newer coordinator) are skipped with a log line; undecodable data of a known
    /// event is an error, because applying a partial roster would be worse than reconnecting.
    /// Cancel-safe: a frame is decoded as soon as it is read, and complete events wait in
    /// `pending` for the next call.
    pub async fn next(&mut self) -> Result<Option<(Option<u64>, SseEvent)>, ClientError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(e));
            }
            let frame = match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Transport(e.to_string())),
                Some(Ok(f)) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if !data.is_empty() {
                self.activity = Some(std::time::Instant::now());
            }
            // An oversized event ends the stream; the machine reconnects and a fresh
            // snapshot follows.
            let frames = self
                .decoder
                .feed(&data)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            for f in frames {
                match SseEvent::parse(&f.event, &f.data) {
                    Ok(ev) => {
                        let id = f.id.as_deref().and_then(|s| s.parse().ok());
                        self.pending.push_back((id, ev));
                    }
                    Err(tabbify_api::SseParseError::UnknownEvent(name)) => {
                        tracing::debug!(event = %name, "unknown SSE event skipped");
                    }
                    Err(e) => return Err(ClientError::Protocol(e.to_string())),
                }
            }
        }
    }

    /// The event log this stream's ids belong to, as the coordinator named it.
    pub fn event_log(&self) -> Option<&str> {
        self.event_log.as_deref()
    }

    /// When bytes last arrived (an event or a keepalive comment), once: for
    /// [`crate::join::logic::Machine::handle_stream_activity`].
    pub fn take_activity(&mut self) -> Option<std::time::Instant> {
        self.activity.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(Client::new("http://127.0.0.1:8443", None, Some("x".into())).is_ok());
        let e = Client::new("https://127.0.0.1:8443", None, None)
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("TLS files"));
        let e = Client::new("ftp://h", None, None)
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("scheme"));
        let e = Client::new("127.0.0.1:8443", None, None)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some());
        let e = Client::new("http://h:1/v1", None, None)
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("path"));
        let c = Client::new("http://[::1]:9/", None, None).ok();
        assert_eq!(c.map(|c| (c.host, c.port)), Some(("::1".to_owned(), 9)));
    }

    /// A test server: answers one request with an SSE head and a keepalive comment, then
    /// holds the connection; hands back the request head it read.
    async fn sse_server() -> (u16, tokio::sync::oneshot::Receiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).to_lowercase());
            conn.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                  transfer-encoding: chunked\r\n\r\nd\r\n: keepalive\n\n\r\n",
            )
            .await
            .unwrap();
            std::future::pending::<()>().await;
        });
        (port, rx)
    }

    /// Issue 13: a reopened stream resumes with `Last-Event-ID`, and a keepalive comment,
    /// which is no event, still counts as activity for the machine's idle deadline.
    #[tokio::test]
    async fn the_stream_resumes_by_id_and_reports_comments_as_activity() {
        for last in [Some(7u64), None] {
            let (port, head) = sse_server().await;
            let client =
                Client::new(&format!("http://127.0.0.1:{port}"), None, Some("x".into())).unwrap();
            let mut stream = client
                .stream("/v1/mesh/peers/stream", last.map(|id| (id, Some("log-1"))))
                .await
                .unwrap();
            let head = head.await.unwrap();
            match last {
                Some(id) => {
                    assert!(head.contains(&format!("last-event-id: {id}\r\n")), "{head}");
                    assert!(head.contains("x-tabbify-event-log: log-1\r\n"), "{head}");
                }
                None => assert!(!head.contains("last-event-id"), "{head}"),
            }
            assert!(stream.take_activity().is_none());
            let next = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
            assert!(
                next.is_err(),
                "a comment is not an event: {:?}",
                next.ok().map(|r| r.map(|e| e.is_some()))
            );
            assert!(stream.take_activity().is_some(), "but it is activity");
            assert!(stream.take_activity().is_none(), "reported once");
        }
    }

    #[test]
    fn transient_or_not() {
        let s = |status, code: &str| ClientError::Status {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(s(StatusCode::BAD_GATEWAY, "auth_service").is_transient());
        assert!(!s(StatusCode::UNAUTHORIZED, "token_invalid").is_transient());
        assert!(!s(StatusCode::FORBIDDEN, "revoked").is_transient());
        assert!(ClientError::Transport("x".into()).is_transient());
        assert_eq!(
            status_error(StatusCode::FORBIDDEN, br#"{"error":"no","code":"revoked"}"#).code(),
            Some("revoked")
        );
    }
}
