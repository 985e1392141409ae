//! The relay server: the TLS/TCP listener (HTTP/1.1 `GET /health`, and `Upgrade:
//! tabbify-relay` into the framed stream with the session handshake), the UDP forwarding
//! thread on the same port number, idle expiry, and `/metrics` on its own listener.
//!
//! Owns: the [`core::Registry`] behind one mutex (the UDP thread takes it once per received
//! batch, a stream task once per read of its stream), the UDP socket, the counters.
//!
//! The stream side batches: a session's task reads its stream in 16 KiB chunks
//! ([`proto::RecordBuf`]), decides every record of a read under one registry lock, queues
//! the frames for each destination stream as one buffer, and each session's writer
//! coalesces its queue into one write and one flush (sockets have `TCP_NODELAY`).
//!
//! Invariants: a session exists only after admission — mesh mTLS (a client certificate
//! chaining to the mesh CA; its CN is the identity the per-identity limit counts) or, when
//! the relay was given the coordinator's token key, a valid relay token
//! ([`tabbify_api::relay_token`]: signature, expiry; its identity counts) in the upgrade
//! request's `authorization: Bearer` header — and a verified proof of possession of the
//! WireGuard private key whose public key it registers, which for a token must be the key
//! the token names (a token copied to another member opens nothing); when a session
//! ends (connection closed, replaced, idle) every other session is told GONE; no input
//! panics the server (malformed records and datagrams are dropped and counted).

pub mod core;
pub mod metrics;
pub mod udp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, ReusableSecret};
use rand_core::{OsRng, RngCore};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::proto::{self, Msg, RefuseCode, COOKIE_LEN, NONCE_LEN};
use core::{Deliver, Drop, Limits, Refuse, Registry};
use metrics::Metrics;
use tabbify_api::tls::{certs, key, provider, roots, TlsError};

/// Buffers queued towards one session's stream before frames to it are dropped (each
/// buffer holds the frames of one read of a source stream, or one frame from UDP).
pub const STREAM_QUEUE: usize = 1024;
/// Bytes a session's stream is read in (one TLS record's plaintext at most: many frames
/// per read while the memory per session stays small).
const SESSION_READ: usize = 16 * 1024;
/// Largest HTTP request head read before the upgrade.
const MAX_HEAD: usize = 8192;
/// Time a client has to finish TLS, the HTTP request and the proof.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A session's stream sink: its writer queue and the signal that ends its connection.
#[derive(Clone)]
pub struct Sink {
    tx: mpsc::Sender<Vec<u8>>,
    kill: Arc<Notify>,
}

impl Sink {
    fn push(&self, m: &Msg<'_>) -> bool {
        let mut v = Vec::new();
        m.encode_record(&mut v).is_ok() && self.tx.try_send(v).is_ok()
    }
}

/// What the relay needs to run.
pub struct Config {
    /// TCP (TLS) and UDP listen address: the same port number on both.
    pub listen: SocketAddr,
    /// Where `/metrics` is served (None: not served).
    pub metrics: Option<SocketAddr>,
    /// The TLS server config ([`server_config`]).
    pub tls: Arc<ServerConfig>,
    /// Limits.
    pub limits: Limits,
}

/// The relay's TLS config: serves `cert_pem`/`key_pem`; a client certificate is optional at
/// the TLS layer (so `GET /health` works for load balancers) but, when presented, must chain
/// to `ca_pem`; the upgrade to a relay session requires one.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "server certificate")?, key(key_pem)?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The CN of the first certificate of a verified chain.
fn common_name(chain: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let der = chain?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// State shared by the listener tasks and the UDP thread.
pub struct Shared {
    reg: Mutex<Registry<Sink>>,
    /// The coordinator's relay-token public key (Ed25519); `None`: only mTLS admits.
    token_key: Option<[u8; 32]>,
    /// Counters.
    pub metrics: Metrics,
    udp: udp::Socket,
}

impl Shared {
    fn reg(&self) -> MutexGuard<'_, Registry<Sink>> {
        // A poisoned lock means a panic elsewhere; the registry itself stays consistent
        // (every mutation completes before returning), so keep serving.
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells every live session that `handle` is gone.
    fn broadcast_gone(&self, handle: u32) {
        let sinks = self.reg().sinks();
        for (_, s) in sinks {
            let _ = s.push(&Msg::Gone { handle });
        }
    }

    /// Ends a session and tells the others.
    fn end(&self, handle: u32) {
        if self.reg().close(handle).is_some() {
            self.broadcast_gone(handle);
        }
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.reg().len()
    }
}

/// A running relay.
pub struct Relay {
    /// The TCP and UDP address.
    pub addr: SocketAddr,
    /// The metrics address, if served.
    pub metrics_addr: Option<SocketAddr>,
    /// Shared state (counters, sessions).
    pub shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Binds TCP and UDP on `cfg.listen` (port 0: one free port for both) and starts
    /// serving on the current tokio runtime; admits by mesh mTLS only.
    pub async fn start(cfg: Config) -> anyhow::Result<Relay> {
        Self::start_with_token_key(cfg, None).await
    }

    /// As [`Relay::start`], also admitting clients with a relay token signed by
    /// `token_key` (the coordinator's Ed25519 public key) in place of a client certificate.
    pub async fn start_with_token_key(
        cfg: Config,
        token_key: Option<[u8; 32]>,
    ) -> anyhow::Result<Relay> {
        let (tcp, sock) = bind_pair(cfg.listen).await?;
        let addr = tcp.local_addr()?;
        let shared = Arc::new(Shared {
            token_key,
            reg: Mutex::new(Registry::new(cfg.limits)),
            metrics: Metrics::default(),
            udp: sock,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("relay-udp".into())
                .spawn(move || udp::run(&shared, &stop))?
        };
        let mut tasks = Vec::new();
        let acceptor = TlsAcceptor::from(cfg.tls);
        let pending = Arc::new(Semaphore::new(cfg.limits.max_handshakes.max(1)));
        {
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((conn, peer)) = tcp.accept().await else {
                        continue;
                    };
                    let Ok(permit) = pending.clone().try_acquire_owned() else {
                        shared.metrics.busy();
                        drop(conn);
                        continue;
                    };
                    let _ = conn.set_nodelay(true);
                    let shared = shared.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_conn(shared, acceptor, conn, permit).await {
                            tracing::debug!(%peer, "relay connection: {e:#}");
                        }
                    });
                }
            }));
        }
        {
            let shared = shared.clone();
            let tick = cfg.limits.idle_timeout.min(Duration::from_secs(5)) / 2;
            tasks.push(tokio::spawn(async move {
                let mut iv = tokio::time::interval(tick.max(Duration::from_millis(100)));
                loop {
                    iv.tick().await;
                    let dead = shared.reg().expire(Instant::now());
                    for (h, sink) in dead {
                        sink.kill();
                        shared.broadcast_gone(h);
                    }
                }
            }));
        }
        let mut metrics_addr = None;
        if let Some(m) = cfg.metrics {
            let l = TcpListener::bind(m).await?;
            metrics_addr = Some(l.local_addr()?);
            let shared = shared.clone();
            tasks.push(tokio::spawn(metrics::serve(l, shared)));
        }
        Ok(Relay {
            addr,
            metrics_addr,
            shared,
            stop,
            tasks,
            thread: Some(thread),
        })
    }

    /// Stops serving (live connections end when their peers close them).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::ops::Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// TCP listener and UDP socket on the same port number (port 0: retries until one free
/// port has both).
async fn bind_pair(listen: SocketAddr) -> anyhow::Result<(TcpListener, udp::Socket)> {
    let mut last = None;
    for _ in 0..16 {
        let tcp = TcpListener::bind(listen).await?;
        let a = tcp.local_addr()?;
        match udp::Socket::bind(a) {
            Ok(s) => return Ok((tcp, s)),
            Err(e) if listen.port() == 0 => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(anyhow::anyhow!(
        "no port free on both TCP and UDP: {last:?}"
    ))
}

async fn write_http<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.flush().await?;
    // close_notify for TLS: the client sees a clean end of the response.
    s.shutdown().await
}

fn json_error(error: &str, code: &str) -> String {
    format!(
        "{{\"error\":{},\"code\":{}}}",
        json_str(error),
        json_str(code)
    )
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Reads an HTTP request head (up to the blank line); returns it and any bytes after it.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            anyhow::bail!("request head too large");
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("connection closed in the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

enum Route {
    Health,
    /// The upgrade, with the bearer token of an `authorization` header, if any.
    Upgrade(Option<String>),
    NotFound,
    BadRequest,
}

fn route(head: &[u8]) -> Route {
    let mut hs = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut hs);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Route::BadRequest,
    }
    let upgrade = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("upgrade")
            && std::str::from_utf8(h.value)
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case(proto::UPGRADE_TOKEN))
    });
    let token = req.headers.iter().find_map(|h| {
        if !h.name.eq_ignore_ascii_case("authorization") {
            return None;
        }
        let v = std::str::from_utf8(h.value).ok()?.trim();
        let (scheme, t) = v.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case(tabbify_api::relay_token::AUTH_SCHEME)
            .then(|| t.trim().to_owned())
    });
    match (req.method, req.path) {
        (Some("GET"), Some("/health")) => Route::Health,
        (Some("GET"), Some("/relay")) if upgrade => Route::Upgrade(token),
        _ => Route::NotFound,
    }
}

async fn serve_conn(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    conn: TcpStream,
    permit: OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let (mut tls, head, rest) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut tls = acceptor.accept(conn).await?;
        let (head, rest) = read_head(&mut tls).await?;
        anyhow::Ok((tls, head, rest))
    })
    .await??;
    let token = match route(&head) {
        Route::Health => {
            write_http(
                &mut tls,
                "200 OK",
                "application/json",
                "{\"status\":\"ok\"}\n",
            )
            .await?;
            return Ok(());
        }
        Route::NotFound => {
            let body = json_error("no such route", "not_found");
            write_http(&mut tls, "404 Not Found", "application/json", &body).await?;
            return Ok(());
        }
        Route::BadRequest => {
            let body = json_error("malformed HTTP request", "bad_request");
            write_http(&mut tls, "400 Bad Request", "application/json", &body).await?;
            return Ok(());
        }
        Route::Upgrade(token) => token,
    };
    let (identity, exporter) = {
        let c = tls.get_ref().1;
        let identity = common_name(c.peer_certificates());
        let mut exp = [0u8; 32];
        c.export_keying_material(&mut exp, proto::EXPORTER_LABEL, None)?;
        (identity, exp)
    };
    // A certificate admits; without one, a valid token does, for the key it names only.
    let admitted = match (identity, token, shared.token_key) {
        (Some(cn), _, _) => Ok((cn, None)),
        (None, Some(t), Some(k)) => tabbify_api::relay_token::verify(&t, &k, unix_now())
            .map(|c| (c.identity, Some(c.key)))
            .map_err(|e| {
                shared.metrics.token_refused();
                json_error(&e.to_string(), "bad_token")
            }),
        (None, _, _) => Err(json_error(
            if shared.token_key.is_some() {
                "a client certificate from the mesh CA or a relay token is required"
            } else {
                "a client certificate from the mesh CA is required"
            },
            "unauthenticated",
        )),
    };
    let (identity, token_key) = match admitted {
        Ok(a) => a,
        Err(body) => {
            write_http(&mut tls, "401 Unauthorized", "application/json", &body).await?;
            return Ok(());
        }
    };
    if !rest.is_empty() {
        // The client must wait for 101 before speaking the stream protocol.
        let body = json_error("data before the upgrade", "bad_request");
        write_http(&mut tls, "400 Bad Request", "application/json", &body).await?;
        return Ok(());
    }
    tls.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {}\r\n\r\n",
            proto::UPGRADE_TOKEN
        )
        .as_bytes(),
    )
    .await?;
    tls.flush().await?;
    session(shared, tls, identity, token_key, exporter, permit).await
}

/// Seconds since the Unix epoch (token expiry is wall-clock time, like the coordinator's).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads one length-prefixed record into `buf` (reused).
pub(crate) async fn read_record<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    s.read_exact(buf).await?;
    Ok(())
}

async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, code: RefuseCode, reason: &str) {
    let mut v = Vec::new();
    if (Msg::Refused {
        code: code as u8,
        reason,
    })
    .encode_record(&mut v)
    .is_ok()
    {
        let _ = s.write_all(&v).await;
        let _ = s.flush().await;
    }
}

async fn session<S>(
    shared: Arc<Shared>,
    mut tls: S,
    identity: String,
    token_key: Option<[u8; 32]>,
    exporter: [u8; 32],
    permit: OwnedSemaphorePermit,
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = Vec::new();
    // HELLO → CHALLENGE → PROOF.
    let proven = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        read_record(&mut tls, &mut buf).await?;
        let flags = match Msg::parse(&buf) {
            Ok(Msg::Hello { version, flags }) if version == proto::VERSION => flags,
            _ => {
                refuse(&mut tls, RefuseCode::Protocol, "expected HELLO version 1").await;
                anyhow::bail!("bad hello");
            }
        };
        let eph = ReusableSecret::random_from_rng(OsRng);
        let eph_pub = PublicKey::from(&eph).to_bytes();
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let mut v = Vec::new();
        Msg::Challenge {
            ephemeral: eph_pub,
            nonce,
        }
        .encode_record(&mut v)?;
        tls.write_all(&v).await?;
        tls.flush().await?;
        read_record(&mut tls, &mut buf).await?;
        let Ok(Msg::Proof { key, mac }) = Msg::parse(&buf) else {
            refuse(&mut tls, RefuseCode::Protocol, "expected PROOF").await;
            anyhow::bail!("bad proof message");
        };
        let shared_secret = eph.diffie_hellman(&PublicKey::from(key));
        let want = proto::proof_mac(shared_secret.as_bytes(), &exporter, &eph_pub, &nonce, &key);
        if !shared_secret.was_contributory() || !proto::mac_eq(&want, &mac) {
            shared.metrics.refused(RefuseCode::BadProof);
            refuse(
                &mut tls,
                RefuseCode::BadProof,
                "the proof of the WireGuard key did not verify",
            )
            .await;
            anyhow::bail!("bad proof from {identity}");
        }
        if token_key.is_some_and(|k| k != key) {
            shared.metrics.refused(RefuseCode::BadProof);
            refuse(
                &mut tls,
                RefuseCode::BadProof,
                "the relay token names another WireGuard key",
            )
            .await;
            anyhow::bail!("{identity}: token for another key");
        }
        anyhow::Ok((key, flags))
    })
    .await??;
    let (key, flags) = proven;
    // The handshake is over: the slot is free for the next one.
    drop(permit);
    let mut cookie = [0u8; COOKIE_LEN];
    OsRng.fill_bytes(&mut cookie);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
    let kill = Arc::new(Notify::new());
    let sink = Sink {
        tx,
        kill: kill.clone(),
    };
    let opened = shared.reg().open(
        key,
        &identity,
        cookie,
        flags & proto::FLAG_STREAM_ONLY != 0,
        sink.clone(),
        Instant::now(),
    );
    let opened = match opened {
        Ok(o) => o,
        Err(r) => {
            let code = match r {
                Refuse::Full => RefuseCode::Full,
                Refuse::IdentityLimit => RefuseCode::IdentityLimit,
            };
            shared.metrics.refused(code);
            refuse(&mut tls, code, "session limit reached").await;
            return Ok(());
        }
    };
    let handle = opened.handle;
    if let Some((old, old_sink)) = opened.replaced {
        old_sink.kill();
        shared.broadcast_gone(old);
    }
    tracing::info!(%identity, handle, key = %hex::encode(&key[..4]), "relay session opened");
    let mut v = Vec::new();
    Msg::Assigned { handle, cookie }.encode_record(&mut v)?;
    tls.write_all(&v).await?;
    tls.flush().await?;

    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        crate::client::write_coalesced(&mut wr, &mut rx, crate::client::RELAY_WRITE_KEEP).await;
        let _ = wr.shutdown().await;
    });
    let result = async {
        let mut rb = proto::RecordBuf::with_chunk(SESSION_READ);
        let mut out = StreamOut::default();
        loop {
            let n = tokio::select! {
                r = rd.read(rb.spare()) => r?,
                _ = kill.notified() => return anyhow::Ok(()),
            };
            if n == 0 {
                return Ok(());
            }
            rb.filled(n);
            let now = Instant::now();
            {
                // One registry lock per read, for every record in it.
                let mut reg = shared.reg();
                while let Some(rec) = rb.next_record() {
                    match rec.first() {
                        Some(0xE1..=0xE4) if rec.len() >= proto::FRAME_HEADER => {
                            match reg.forward_stream(handle, rec, now) {
                                Ok(Deliver::Stream(s)) => out.stream(s, rec),
                                Ok(Deliver::Udp(a)) => out.udp(a, rec),
                                Err(d) => shared.metrics.drop(d, 1),
                            }
                        }
                        _ => match Msg::parse(rec) {
                            Ok(Msg::Lookup { key }) => {
                                reg.touch(handle, now);
                                if !reg.is_live(handle) {
                                    return Ok(());
                                }
                                let h = reg.lookup(&key);
                                let _ = Msg::Answer { key, handle: h }.encode_record(&mut out.own);
                            }
                            Ok(Msg::Keepalive) => {
                                reg.touch(handle, now);
                                let _ = Msg::Keepalive.encode_record(&mut out.own);
                            }
                            _ => shared.metrics.drop(Drop::Malformed, 1),
                        },
                    }
                }
            }
            out.flush(&shared, &sink);
        }
    }
    .await;
    shared.end(handle);
    drop(sink);
    writer.abort();
    tracing::info!(%identity, handle, "relay session closed");
    result
}

/// What one read of a session's stream produces, gathered while the registry is locked and
/// sent after: frames per destination stream as one buffer each (one queue entry, one
/// writer wake-up per destination per read), frames to UDP destinations, and the answers
/// to this session's own LOOKUPs and KEEPALIVEs.
#[derive(Default)]
struct StreamOut {
    /// (destination, its records, frame count, frame bytes).
    streams: Vec<(Sink, Vec<u8>, u64, usize)>,
    /// Frames to UDP destinations: all bytes, and (address, length) per frame.
    udp_bytes: Vec<u8>,
    udp_to: Vec<(SocketAddr, usize)>,
    /// Records for this session itself.
    own: Vec<u8>,
}

impl StreamOut {
    fn stream(&mut self, to: Sink, frame: &[u8]) {
        let i = match self
            .streams
            .iter()
            .position(|(s, ..)| s.tx.same_channel(&to.tx))
        {
            Some(i) => i,
            None => {
                self.streams.push((to, Vec::new(), 0, 0));
                self.streams.len() - 1
            }
        };
        let e = &mut self.streams[i];
        if Msg::Frame(frame).encode_record(&mut e.1).is_ok() {
            e.2 += 1;
            e.3 += frame.len();
        }
    }

    fn udp(&mut self, to: SocketAddr, frame: &[u8]) {
        self.udp_bytes.extend_from_slice(frame);
        self.udp_to.push((to, frame.len()));
    }

    /// Sends everything gathered (the registry lock is not held) and counts it.
    fn flush(&mut self, shared: &Shared, own: &Sink) {
        for (s, buf, n, bytes) in self.streams.drain(..) {
            if s.tx.try_send(buf).is_ok() {
                shared.metrics.forwarded_n(true, n, bytes);
            } else {
                shared.metrics.drop(Drop::QueueFull, n);
            }
        }
        let mut at = 0;
        for (a, len) in self.udp_to.drain(..) {
            let frame = &self.udp_bytes[at..at + len];
            at += len;
            match shared.udp.send_one(frame, a) {
                Ok(()) => shared.metrics.forwarded(false, len),
                Err(_) => shared.metrics.drop(Drop::SendError, 1),
            }
        }
        self.udp_bytes.clear();
        if !self.own.is_empty() && own.tx.try_send(std::mem::take(&mut self.own)).is_err() {
            shared.metrics.drop(Drop::QueueFull, 1);
        }
    }
}

/// Delivers a forwarding decision; counts drops and forwarded traffic.
pub(crate) fn deliver(
    shared: &Shared,
    res: Result<Deliver<Sink>, Drop>,
    frame: &[u8],
    from_stream: bool,
) {
    match res {
        Ok(Deliver::Stream(s)) => {
            if s.push(&Msg::Frame(frame)) {
                shared.metrics.forwarded(true, frame.len());
            } else {
                shared.metrics.drop(Drop::QueueFull, 1);
            }
        }
        Ok(Deliver::Udp(a)) => {
            debug_assert!(from_stream);
            match shared.udp.send_one(frame, a) {
                Ok(()) => shared.metrics.forwarded(false, frame.len()),
                Err(_) => shared.metrics.drop(Drop::SendError, 1),
            }
        }
        Err(d) => shared.metrics.drop(d, 1),
    }
}

/// Kills a session's connection (used when the registry ended it).
impl Sink {
    /// Ends the connection this sink belongs to.
    pub fn kill(&self) {
        self.kill.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(
            route(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"),
            Route::Health
        ));
        assert!(matches!(
            route(b"GET /relay HTTP/1.1\r\nconnection: upgrade\r\nupgrade: Tabbify-Relay\r\n\r\n"),
            Route::Upgrade(None)
        ));
        assert!(matches!(
            route(b"GET /relay HTTP/1.1\r\nupgrade: tabbify-relay\r\nAuthorization: bearer abc_-1 \r\n\r\n"),
            Route::Upgrade(Some(t)) if t == "abc_-1"
        ));
        assert!(matches!(
            route(b"GET /relay HTTP/1.1\r\nupgrade: tabbify-relay\r\nauthorization: Basic abc\r\n\r\n"),
            Route::Upgrade(None)
        ));
        assert!(matches!(
            route(b"GET /relay HTTP/1.1\r\n\r\n"),
            Route::NotFound
        ));
        assert!(matches!(
            route(b"\x00\x01garbage\r\n\r\n"),
            Route::BadRequest
        ));
        assert_eq!(
            json_error("a \"b\"\n", "c"),
            "{\"error\":\"a \\\"b\\\"\\u000a\",\"code\":\"c\"}"
        );
    }
}
