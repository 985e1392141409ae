//! The relay client the joiner uses: connect (TCP, optionally through an HTTP CONNECT
//! proxy, then TLS with the member's mesh certificate — or, with
//! [`RelayClient::connect_with_token`], a relay token from the coordinator in the upgrade
//! request instead — then `Upgrade: tabbify-relay`), prove
//! possession of the WireGuard private key, receive the session's handle and bind cookie;
//! then look up public keys, send and receive relay frames over the stream, and learn of
//! ended sessions (GONE). The UDP side is the joiner's own WireGuard socket: this module
//! only builds the BIND datagram and converts WireGuard messages to relay frames and back
//! (re-exported from [`crate::proto`]).
//!
//! Invariants: the private key never leaves the process (only the proof MAC does, bound to
//! this TLS session by an exporter); one reader task owns the receive half and routes
//! ANSWERs to the waiting lookups, frames and GONEs to [`RelayClient::recv`] /
//! [`RelayClient::recv_batch`] in arrival order.
//!
//! Batching (the stream's throughput): the reader reads the stream in
//! [`proto::READ_CHUNK`]-byte reads and hands every frame of one read to the receiver as
//! one [`FrameBatch`] (one buffer, one channel message, one wake-up); a sender can queue
//! many frames as one buffer ([`RelayClient::send_frames`]); the writer coalesces
//! everything queued into one buffer and writes it with one `write_all` + `flush`, so TLS
//! records are up to 16 KiB and a burst of frames costs one `write` on the socket (the
//! TCP socket has `TCP_NODELAY`: the batching is explicit, not Nagle's).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boringtun::x25519::{PublicKey, StaticSecret};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::proto::{self, Control, Msg, COOKIE_LEN};
pub use crate::proto::{classify, frame_to_wg, wg_to_frame, Kind};
use crate::server::{read_head, read_record};

/// How often the client sends KEEPALIVE on the stream (the relay's idle timeout is 60 s
/// by default; UDP BINDs every 10 s keep a session alive too).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// Connection failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP, TLS or stream I/O.
    #[error("relay I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The proxy refused CONNECT or answered nonsense.
    #[error("proxy: {0}")]
    Proxy(String),
    /// The relay refused the HTTP upgrade (status line and body).
    #[error("relay refused the upgrade: {0}")]
    Upgrade(String),
    /// The relay refused the session.
    #[error("relay refused the session ({code}): {reason}")]
    Refused {
        /// [`proto::RefuseCode`] as u8.
        code: u8,
        /// The relay's reason.
        reason: String,
    },
    /// The relay spoke something else.
    #[error("relay protocol: {0}")]
    Protocol(String),
    /// Bad server name or the like.
    #[error("{0}")]
    Config(String),
    /// The session ended.
    #[error("relay session closed")]
    Closed,
}

/// How to reach a relay.
#[derive(Clone)]
pub struct Config {
    /// `host:port` of the relay.
    pub server: String,
    /// The name its certificate is checked against (a DNS name or IP literal).
    pub server_name: String,
    /// TLS: the mesh CA as the only root and the member's certificate
    /// ([`tabbify_api::tls::client_config`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// An HTTP proxy `host:port` (or `http://host:port`) to CONNECT through.
    pub proxy: Option<String>,
    /// Ask the relay to deliver to this session over the stream only (no UDP).
    pub stream_only: bool,
    /// `SO_MARK` on the TCP connection (to the relay or the proxy), set before the SYN: a
    /// member whose default route goes into its tunnel (an exit node) marks it so policy
    /// routing keeps it on the underlay, like the WireGuard socket's datagrams.
    pub fwmark: Option<u32>,
}

/// The `HTTPS_PROXY` (or `https_proxy`) setting, if any.
pub fn proxy_from_env() -> Option<String> {
    ["HTTPS_PROXY", "https_proxy"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .filter(|s| !s.is_empty())
}

/// What the relay pushes to a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A relay frame (header carries the source's handle; [`frame_to_wg`] restores it).
    Frame(Vec<u8>),
    /// The session with this handle ended.
    Gone(u32),
}

/// Relay frames received in one read of the stream, in order, in one buffer (the records
/// as they came, each a well-formed frame).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameBatch {
    records: Vec<u8>,
    count: usize,
}

impl FrameBatch {
    /// The frames, in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.records[..];
        std::iter::from_fn(move || {
            let (rec, used) = proto::split_record(rest)?;
            rest = &rest[used..];
            Some(rec)
        })
    }

    /// Appends a frame (refused if it is not a relay frame).
    pub fn push(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        push_frame(&mut self.records, frame)?;
        self.count += 1;
        Ok(())
    }

    /// How many frames.
    pub fn len(&self) -> usize {
        self.count
    }

    /// No frames.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// What [`RelayClient::recv_batch`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Batch {
    /// Frames (one read's worth).
    Frames(FrameBatch),
    /// The session with this handle ended.
    Gone(u32),
}

/// Appends `frame` as a stream record to `out` (for [`RelayClient::send_frames`]); refuses
/// anything that is not a relay frame.
pub fn push_frame(out: &mut Vec<u8>, frame: &[u8]) -> Result<(), ClientError> {
    if proto::frame_header(frame).is_err() {
        return Err(ClientError::Protocol("not a relay frame".into()));
    }
    Msg::Frame(frame)
        .encode_record(out)
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Whether `records` is a sequence of whole stream records, each a relay frame.
fn all_frames(mut records: &[u8]) -> bool {
    while !records.is_empty() {
        let Some((rec, used)) = proto::split_record(records) else {
            return false;
        };
        if proto::frame_header(rec).is_err() {
            return false;
        }
        records = &records[used..];
    }
    true
}

/// Largest buffer the writers coalesce before writing (then they write and go on).
pub const WRITE_BATCH: usize = 256 * 1024;
/// Capacity a member's writer keeps between bursts (one session per relay: keeping the
/// burst buffer saves a fresh allocation, and its page faults, per burst).
const CLIENT_WRITE_KEEP: usize = 2 * WRITE_BATCH;
/// Capacity a relay session's writer keeps between bursts (many sessions: bounded).
pub(crate) const RELAY_WRITE_KEEP: usize = 64 * 1024;

type Pending = Arc<Mutex<HashMap<[u8; 32], Vec<oneshot::Sender<Option<u32>>>>>>;

/// A live relay session.
pub struct RelayClient {
    /// This session's handle (peers address frames to us with it).
    pub handle: u32,
    /// The bind cookie for [`RelayClient::bind_datagram`].
    pub cookie: [u8; COOKIE_LEN],
    tx: mpsc::Sender<Vec<u8>>,
    events: mpsc::Receiver<Batch>,
    /// A batch [`RelayClient::recv`] is part-way through (records from byte `.1` on).
    partial: Option<(FrameBatch, usize)>,
    pending: Pending,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RelayClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn strip_scheme(p: &str) -> &str {
    let p = p.strip_prefix("http://").unwrap_or(p);
    p.trim_end_matches('/')
}

/// Connects to `addr` (`host:port`, each address in turn), with `SO_MARK` `mark` set
/// before the SYN when given.
pub async fn connect_marked(addr: &str, mark: Option<u32>) -> std::io::Result<TcpStream> {
    match mark {
        None => TcpStream::connect(addr).await,
        Some(mark) => connect_marked_to(tokio::net::lookup_host(addr).await?, mark).await,
    }
}

/// Connects to each of `addrs` in turn with `SO_MARK` `mark` set before the SYN (so an
/// exit node's policy routing leaves the connection on the underlay); the first that
/// answers wins, else the last error.
pub async fn connect_marked_to(
    addrs: impl IntoIterator<Item = std::net::SocketAddr>,
    mark: u32,
) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for a in addrs {
        let sock = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket2::SockRef::from(&sock).set_mark(mark)?;
        match sock.connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connect_tcp(cfg: &Config) -> Result<TcpStream, ClientError> {
    let Some(proxy) = cfg.proxy.as_deref() else {
        let s = connect_marked(&cfg.server, cfg.fwmark).await?;
        s.set_nodelay(true)?;
        return Ok(s);
    };
    let mut s = connect_marked(strip_scheme(proxy), cfg.fwmark).await?;
    s.set_nodelay(true)?;
    let req = format!("CONNECT {0} HTTP/1.1\r\nhost: {0}\r\n\r\n", cfg.server);
    s.write_all(req.as_bytes()).await?;
    let (head, rest) = read_head(&mut s)
        .await
        .map_err(|e| ClientError::Proxy(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ClientError::Proxy("data after the CONNECT answer".into()));
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(ClientError::Proxy(status.to_owned()));
    }
    Ok(s)
}

/// Connects and upgrades to the relay stream, without the session handshake (what
/// [`RelayClient::connect`] builds on; public for tests that play a misbehaving client).
pub async fn open_stream(cfg: &Config) -> Result<TlsStream<TcpStream>, ClientError> {
    open_stream_with_token(cfg, None).await
}

/// As [`open_stream`], sending `token` (a relay token) as `authorization: Bearer`.
pub async fn open_stream_with_token(
    cfg: &Config,
    token: Option<&str>,
) -> Result<TlsStream<TcpStream>, ClientError> {
    if token.is_some_and(|t| !t.bytes().all(|b| b.is_ascii_graphic())) {
        return Err(ClientError::Config(
            "a relay token is printable ASCII".into(),
        ));
    }
    let tcp = connect_tcp(cfg).await?;
    let name = ServerName::try_from(cfg.server_name.clone())
        .map_err(|e| ClientError::Config(format!("server name {}: {e}", cfg.server_name)))?;
    let mut tls = TlsConnector::from(cfg.tls.clone())
        .connect(name, tcp)
        .await?;
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET /relay HTTP/1.1\r\nhost: {}\r\nconnection: upgrade\r\nupgrade: {}\r\n{auth}\r\n",
        cfg.server_name,
        proto::UPGRADE_TOKEN
    );
    tls.write_all(req.as_bytes()).await?;
    tls.flush().await?;
    let (head, rest) = read_head(&mut tls)
        .await
        .map_err(|e| ClientError::Upgrade(e.to_string()))?;
    let text = String::from_utf8_lossy(&head).into_owned();
    if !text.starts_with("HTTP/1.1 101") {
        let mut body = rest;
        let _ = tokio::time::timeout(Duration::from_secs(2), tls.read_to_end(&mut body)).await;
        return Err(ClientError::Upgrade(format!(
            "{} {}",
            text.lines().next().unwrap_or_default(),
            String::from_utf8_lossy(&body)
        )));
    }
    if !rest.is_empty() {
        return Err(ClientError::Protocol("data before the first record".into()));
    }
    Ok(tls)
}

/// The exporter value the proof binds to, from the client's view of the TLS session.
pub fn exporter(tls: &TlsStream<TcpStream>) -> Result<[u8; 32], ClientError> {
    let mut e = [0u8; 32];
    tls.get_ref()
        .1
        .export_keying_material(&mut e, proto::EXPORTER_LABEL, None)
        .map_err(|e| ClientError::Protocol(format!("TLS exporter: {e}")))?;
    Ok(e)
}

async fn send_msg<S: AsyncWrite + Unpin>(s: &mut S, m: &Msg<'_>) -> Result<(), ClientError> {
    let mut v = Vec::new();
    m.encode_record(&mut v)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    s.write_all(&v).await?;
    s.flush().await?;
    Ok(())
}

fn refused(m: Result<Msg<'_>, proto::ProtoError>, want: &str) -> ClientError {
    match m {
        Ok(Msg::Refused { code, reason }) => ClientError::Refused {
            code,
            reason: reason.to_owned(),
        },
        other => ClientError::Protocol(format!("expected {want}, got {other:?}")),
    }
}

impl RelayClient {
    /// Connects, proves possession of `private_key` (the member's WireGuard static key) and
    /// opens a session.
    pub async fn connect(cfg: &Config, private_key: &[u8; 32]) -> Result<Self, ClientError> {
        Self::connect_with_token(cfg, private_key, None).await
    }

    /// As [`RelayClient::connect`], presenting a relay token (`POST /v1/relay/token` at the
    /// coordinator) for a `cfg.tls` without a client certificate. The token names the key
    /// of `private_key`; the relay refuses any other.
    pub async fn connect_with_token(
        cfg: &Config,
        private_key: &[u8; 32],
        token: Option<&str>,
    ) -> Result<Self, ClientError> {
        let mut tls = open_stream_with_token(cfg, token).await?;
        let exp = exporter(&tls)?;
        let flags = if cfg.stream_only {
            proto::FLAG_STREAM_ONLY
        } else {
            0
        };
        send_msg(
            &mut tls,
            &Msg::Hello {
                version: proto::VERSION,
                flags,
            },
        )
        .await?;
        let mut buf = Vec::new();
        read_record(&mut tls, &mut buf).await?;
        let (ephemeral, nonce) = match Msg::parse(&buf) {
            Ok(Msg::Challenge { ephemeral, nonce }) => (ephemeral, nonce),
            other => return Err(refused(other, "CHALLENGE")),
        };
        let secret = StaticSecret::from(*private_key);
        let key = PublicKey::from(&secret).to_bytes();
        let shared = secret.diffie_hellman(&PublicKey::from(ephemeral));
        if !shared.was_contributory() {
            return Err(ClientError::Protocol("non-contributory ephemeral".into()));
        }
        let mac = proto::proof_mac(shared.as_bytes(), &exp, &ephemeral, &nonce, &key);
        send_msg(&mut tls, &Msg::Proof { key, mac }).await?;
        read_record(&mut tls, &mut buf).await?;
        let (handle, cookie) = match Msg::parse(&buf) {
            Ok(Msg::Assigned { handle, cookie }) => (handle, cookie),
            other => return Err(refused(other, "ASSIGNED")),
        };
        Ok(Self::run(tls, handle, cookie))
    }

    fn run(tls: TlsStream<TcpStream>, handle: u32, cookie: [u8; COOKIE_LEN]) -> Self {
        let (rd, wr) = tokio::io::split(tls);
        let (tx, rx) = mpsc::channel::<Vec<u8>>(1024);
        let (etx, events) = mpsc::channel(256);
        let pending: Pending = Arc::default();
        let writer = tokio::spawn(writer(wr, rx));
        let reader = tokio::spawn(reader(rd, etx, pending.clone()));
        let keepalive = {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut v = Vec::new();
                if Msg::Keepalive.encode_record(&mut v).is_err() {
                    return;
                }
                loop {
                    tokio::time::sleep(KEEPALIVE_EVERY).await;
                    if tx.send(v.clone()).await.is_err() {
                        return;
                    }
                }
            })
        };
        RelayClient {
            handle,
            cookie,
            tx,
            events,
            partial: None,
            pending,
            tasks: vec![writer, reader, keepalive],
        }
    }

    /// The BIND datagram to send from the WireGuard socket to the relay's UDP port (every
    /// 10 s, and at once after a network change).
    pub fn bind_datagram(&self) -> Vec<u8> {
        Control::Bind {
            handle: self.handle,
            cookie: self.cookie,
        }
        .encode()
    }

    /// The live handle of `key` on this relay, if it has a session.
    pub async fn lookup(&self, key: &[u8; 32]) -> Result<Option<u32>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*key)
            .or_default()
            .push(tx);
        self.send_record(&Msg::Lookup { key: *key }).await?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    async fn send_record(&self, m: &Msg<'_>) -> Result<(), ClientError> {
        let mut v = Vec::new();
        m.encode_record(&mut v)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.tx.send(v).await.map_err(|_| ClientError::Closed)
    }

    /// Sends a relay frame (header = the destination's handle) over the stream.
    pub async fn send_frame(&self, frame: &[u8]) -> Result<(), ClientError> {
        if proto::frame_header(frame).is_err() {
            return Err(ClientError::Protocol("not a relay frame".into()));
        }
        self.send_record(&Msg::Frame(frame)).await
    }

    /// Sends many relay frames as one queued buffer: `records` is what [`push_frame`]
    /// appended (whole records, each a relay frame; anything else is refused and nothing
    /// is sent).
    pub async fn send_frames(&self, records: Vec<u8>) -> Result<(), ClientError> {
        if !all_frames(&records) {
            return Err(ClientError::Protocol(
                "not a sequence of relay frames".into(),
            ));
        }
        if records.is_empty() {
            return Ok(());
        }
        self.tx.send(records).await.map_err(|_| ClientError::Closed)
    }

    /// Sends a keepalive over the stream (the relay ends sessions idle past its timeout).
    pub async fn keepalive(&self) -> Result<(), ClientError> {
        self.send_record(&Msg::Keepalive).await
    }

    /// The next frame or GONE; `None` when the session ended.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if let Some((b, at)) = &mut self.partial {
                if let Some((f, used)) = b.records.get(*at..).and_then(proto::split_record) {
                    *at += used;
                    return Some(Event::Frame(f.to_vec()));
                }
                self.partial = None;
            }
            match self.events.recv().await? {
                Batch::Frames(b) => self.partial = Some((b, 0)),
                Batch::Gone(h) => return Some(Event::Gone(h)),
            }
        }
    }

    /// The next batch of frames (all frames of one read of the stream) or GONE; `None`
    /// when the session ended. Frames a [`RelayClient::recv`] left unread come first.
    pub async fn recv_batch(&mut self) -> Option<Batch> {
        if let Some((b, at)) = self.partial.take() {
            let mut rest = FrameBatch::default();
            let mut tail = b.records.get(at..).unwrap_or_default();
            while let Some((f, used)) = proto::split_record(tail) {
                let _ = rest.push(f);
                tail = &tail[used..];
            }
            if !rest.is_empty() {
                return Some(Batch::Frames(rest));
            }
        }
        self.events.recv().await
    }
}

/// Writes what `rx` queues: everything queued at a wake-up is coalesced into one buffer
/// (up to [`WRITE_BATCH`]), written with one `write_all` and flushed once; the buffer keeps
/// at most `keep` bytes of capacity between bursts. Returns when the queue closes or a
/// write fails.
pub(crate) async fn write_coalesced<W: AsyncWrite + Unpin>(
    wr: &mut W,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    keep: usize,
) {
    let mut out: Vec<u8> = Vec::new();
    while let Some(first) = rx.recv().await {
        out.clear();
        out.extend_from_slice(&first);
        loop {
            while out.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(more) => out.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if wr.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            // More may have been queued while writing: keep the flush for the end.
            match rx.try_recv() {
                Ok(more) => out.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
        // Keep at most `keep` bytes of capacity, not the largest burst.
        out.shrink_to(keep);
    }
}

async fn writer<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    write_coalesced(&mut wr, &mut rx, CLIENT_WRITE_KEEP).await;
}

async fn reader<R: AsyncRead + Unpin>(mut rd: R, events: mpsc::Sender<Batch>, pending: Pending) {
    let mut rb = proto::RecordBuf::new();
    loop {
        match rd.read(rb.spare()).await {
            Ok(0) | Err(_) => return,
            Ok(n) => rb.filled(n),
        }
        // One allocation per read: the frames of a read fit in what was read plus a
        // partial record (grown if not).
        let mut batch = FrameBatch {
            records: Vec::with_capacity(rb.pending()),
            count: 0,
        };
        while let Some(rec) = rb.next_record() {
            match Msg::parse(rec) {
                Ok(Msg::Frame(f)) => {
                    let _ = batch.push(f);
                }
                Ok(Msg::Gone { handle }) => {
                    // Keep the order: frames before the GONE go first.
                    if !batch.is_empty()
                        && events
                            .send(Batch::Frames(std::mem::take(&mut batch)))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    if events.send(Batch::Gone(handle)).await.is_err() {
                        return;
                    }
                }
                Ok(Msg::Answer { key, handle }) => {
                    let waiters = pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key)
                        .unwrap_or_default();
                    for w in waiters {
                        let _ = w.send(handle);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("relay sent a malformed record: {e}"),
            }
        }
        if !batch.is_empty() && events.send(Batch::Frames(batch)).await.is_err() {
            return;
        }
    }
}
