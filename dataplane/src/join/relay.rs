//! The joiner's relay sessions (I/O): one [`tabbify_relay::client::RelayClient`] per relay
//! in use (the home relay, and peers' home relays on demand), each with
//! * its UDP side bound from the WireGuard socket: BIND sent with
//!   [`Handshaker::send_raw`] at once, every second until the first BIND_ACK, then every
//!   [`REBIND_EVERY`] and at once after an underlay change; the BIND_ACK arrives through
//!   the engine's control queue ([`Kind::RelayControl`]) and is fed in with
//!   [`RelaySessions::handle_control`];
//! * a loopback UDP **bridge** socket: when UDP to the relay does not bind (no BIND_ACK
//!   within [`BOUND_FOR`]), peers' relay routes point the engine at the bridge instead;
//!   frames the engine sends there go out on the TLS stream, and frames the stream
//!   delivers are sent from the bridge to the engine's listen port on loopback, so the
//!   engine needs no TLS. Both directions batch: every wake-up drains the bridge socket
//!   (`UDP_GRO`, up to [`BRIDGE_BATCH`] receives) into one buffer of records for
//!   [`RelayClient::send_frames`], and the stream's frames arrive a read at a time
//!   ([`RelayClient::recv_batch`]) and go to the engine as UDP GSO sends;
//! * LOOKUPs of peers' keys (handles cached per session generation, dropped on GONE).
//!
//! Choosing *which* relay is not done here: [`crate::join::logic::paths`] decides (sans
//! IO), this module measures latency ([`measure`], TCP connect time) and moves bytes.
//!
//! Invariants:
//! * only relays in the path manager's checked set are contacted; an advertised relay
//!   whose name resolves to a loopback, link-local or mesh address is refused
//!   ([`paths::relay_ip_allowed`]);
//! * the WireGuard private key never leaves the process (the relay client proves
//!   possession over TLS);
//! * the bridge forwards only relay frames, and only from the engine's own port on
//!   loopback; anything else is dropped and counted;
//! * a session that fails is reconnected with backoff (0.5 s doubling to 30 s); its
//!   cached handles die with it (a new generation).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tabbify_engine::sys::udp;
use tabbify_relay::client::{self, Batch, FrameBatch, RelayClient};
use tabbify_relay::proto::Control;
use tabbify_relay::server::udp::plan_gso;
use tokio::sync::{mpsc, oneshot};

use crate::core::path::RelayRoute;
use crate::driver::Handshaker;

use super::logic::paths::{self, Origin, RelayUrl};

/// BIND keepalive interval once bound (the relay protocol's 10 s).
pub const REBIND_EVERY: Duration = Duration::from_secs(10);
/// A BIND_ACK keeps the UDP side counted as bound this long (two missed re-BINDs and a
/// margin); after that routes use the bridge.
pub const BOUND_FOR: Duration = Duration::from_secs(25);
/// Before the first BIND_ACK, BIND this often.
const BIND_RETRY: Duration = Duration::from_secs(1);
/// A LOOKUP waits this long for its ANSWER.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Most datagrams the bridge drains from the engine per wake-up (then they go on the
/// stream as one buffer).
const BRIDGE_BATCH: usize = 128;
/// Most bytes of records the bridge gathers per wake-up.
const BRIDGE_BATCH_BYTES: usize = 64 * 1024;
/// TCP connect timeout for a latency measurement.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(2);

enum Cmd {
    Lookup([u8; 32], oneshot::Sender<Option<u32>>),
    Rebind,
}

/// The live part of a session, shared with its task.
#[derive(Debug, Default)]
struct Live {
    /// Session handle and a generation number (bumped on every new session).
    handle: Option<u32>,
    generation: u64,
    /// The relay's UDP address (resolved).
    udp: Option<SocketAddr>,
    /// The bridge socket's address.
    bridge: Option<SocketAddr>,
    /// Last BIND_ACK.
    acked: Option<Instant>,
    /// The last connect failure, for `status`.
    error: Option<String>,
    /// Handles the relay said are GONE in this generation (bounded by [`MAX_GONE`]).
    gone: std::collections::HashSet<u32>,
}

/// Most GONE handles remembered per session (the set is cleared when full: a forgotten
/// one costs at most a route that fails until the peer's next frame or LOOKUP).
const MAX_GONE: usize = 4096;

/// One relay session, kept up by its task.
pub struct Session {
    /// The relay.
    pub url: RelayUrl,
    live: Mutex<Live>,
    cmd: mpsc::Sender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Session {
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session is set up (a handle assigned).
    pub fn is_up(&self) -> bool {
        self.live().handle.is_some()
    }

    /// The UDP side is bound (a BIND_ACK within [`BOUND_FOR`]).
    pub fn udp_bound(&self, now: Instant) -> bool {
        self.live()
            .acked
            .is_some_and(|t| now.saturating_duration_since(t) < BOUND_FOR)
    }

    /// Where the engine should send frames for this relay now: its UDP address when bound,
    /// else the bridge; with the current generation.
    pub fn route_addr(&self, now: Instant) -> Option<(SocketAddr, u64)> {
        let bound = self.udp_bound(now);
        let l = self.live();
        l.handle?;
        let addr = if bound { l.udp } else { l.bridge }?;
        Some((addr, l.generation))
    }

    /// The relay's UDP address (once resolved).
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.live().udp
    }

    /// Whether `addr` is this session's relay or bridge address.
    pub fn owns_addr(&self, addr: SocketAddr) -> bool {
        let l = self.live();
        let a = canonical(addr);
        l.udp.map(canonical) == Some(a) || l.bridge.map(canonical) == Some(a)
    }

    /// Looks up `key` (None: absent, session down, or no answer in time).
    pub async fn lookup(&self, key: [u8; 32]) -> Option<u32> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(Cmd::Lookup(key, tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// The last connection error.
    pub fn error(&self) -> Option<String> {
        self.live().error.clone()
    }
}

/// IPv4-mapped IPv6 as IPv4, for comparing addresses.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Counters for `status`.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Datagrams at the bridge not from the engine's port, or not relay frames.
    pub bridge_refused: AtomicU64,
    /// Relay control datagrams that matched no session.
    pub stray_control: AtomicU64,
    /// GONEs received.
    pub gone: AtomicU64,
}

impl RelayCounters {
    /// The non-zero drop counters by name (for `status` drops): `relay_bridge_refused`,
    /// `relay_stray_control`.
    pub fn nonzero(&self) -> Vec<(String, u64)> {
        [
            ("relay_bridge_refused", &self.bridge_refused),
            ("relay_stray_control", &self.stray_control),
        ]
        .into_iter()
        .map(|(n, c)| (n.to_owned(), c.load(Ordering::Relaxed)))
        .filter(|(_, v)| *v > 0)
        .collect()
    }
}

/// Relay cached handle of a peer at a session.
#[derive(Clone, Copy, Debug)]
struct Cached {
    generation: u64,
    handle: Option<u32>,
    at: Instant,
}

/// Every relay session of the joiner.
pub struct RelaySessions {
    tls: Option<Arc<rustls::ClientConfig>>,
    key: Mutex<[u8; 32]>,
    sender: Handshaker,
    engine: SocketAddr,
    ipv6: bool,
    /// `SO_MARK` on the relay TCP connections (`--exit-node`).
    fwmark: Option<u32>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// (relay url, peer key) → handle.
    handles: Mutex<HashMap<(String, [u8; 32]), Cached>>,
    /// Lookups in flight.
    inflight: Mutex<std::collections::HashSet<(String, [u8; 32])>>,
    /// Counters.
    pub counters: RelayCounters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RelaySessions {
    /// Sessions use `tls` (the mesh CA and our certificate; `None` = no relays: the
    /// relay admits members by mesh mTLS only), prove `key`, BIND through `sender` and
    /// deliver stream frames to the engine's `listen_port` on loopback; their TCP
    /// connections carry `SO_MARK` `fwmark` when given.
    pub fn new(
        tls: Option<Arc<rustls::ClientConfig>>,
        key: [u8; 32],
        sender: Handshaker,
        listen_port: u16,
        ipv6: bool,
        fwmark: Option<u32>,
    ) -> Arc<Self> {
        let lo = if ipv6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        Arc::new(RelaySessions {
            tls,
            key: Mutex::new(key),
            sender,
            engine: SocketAddr::new(lo, listen_port),
            ipv6,
            fwmark,
            sessions: Mutex::default(),
            handles: Mutex::default(),
            inflight: Mutex::default(),
            counters: RelayCounters::default(),
        })
    }

    /// The mark on the relay connections.
    pub fn fwmark(&self) -> Option<u32> {
        self.fwmark
    }

    /// Whether relays can be used at all (mesh mTLS configured).
    pub fn enabled(&self) -> bool {
        self.tls.is_some()
    }

    /// The session at `url`, if one is kept.
    pub fn session(&self, url: &str) -> Option<Arc<Session>> {
        lock(&self.sessions).get(url).cloned()
    }

    /// Keeps sessions at exactly `wanted` (opening new ones, dropping the rest).
    pub fn keep(self: &Arc<Self>, wanted: &[RelayUrl]) {
        if self.tls.is_none() {
            return;
        }
        let mut s = lock(&self.sessions);
        s.retain(|url, _| wanted.iter().any(|w| &w.url == url));
        for w in wanted {
            if !s.contains_key(&w.url) {
                let (tx, rx) = mpsc::channel(64);
                let sess = Arc::new_cyclic(|weak: &std::sync::Weak<Session>| Session {
                    url: w.clone(),
                    live: Mutex::default(),
                    cmd: tx,
                    task: tokio::spawn(self.clone().run_session(weak.clone(), rx)),
                });
                tracing::info!(relay = %w.url, "opening a relay session");
                s.insert(w.url.clone(), sess);
            }
        }
    }

    /// The node key changed (rotation): every session is re-opened to prove the new one.
    pub fn set_key(self: &Arc<Self>, key: [u8; 32]) {
        *lock(&self.key) = key;
        let wanted: Vec<RelayUrl> = lock(&self.sessions)
            .values()
            .map(|s| s.url.clone())
            .collect();
        lock(&self.sessions).clear();
        lock(&self.handles).clear();
        self.keep(&wanted);
    }

    /// A relay control datagram from the WireGuard socket (a BIND_ACK).
    pub fn handle_control(&self, src: SocketAddr, bytes: &[u8], now: Instant) {
        let Ok(Control::BindAck { handle }) = Control::parse(bytes) else {
            self.counters.stray_control.fetch_add(1, Ordering::Relaxed);
            return;
        };
        for s in lock(&self.sessions).values() {
            let mut l = s.live();
            if ack_matches(&l, src, handle) {
                if l.acked.is_none() {
                    tracing::info!(relay = %s.url.url, "relay UDP bound");
                }
                l.acked = Some(now);
                return;
            }
        }
        self.counters.stray_control.fetch_add(1, Ordering::Relaxed);
    }

    /// The network changed: BIND again at once everywhere.
    pub fn rebind_all(&self) {
        for s in lock(&self.sessions).values() {
            let _ = s.cmd.try_send(Cmd::Rebind);
        }
    }

    /// The route to `key` through `url` if known now; otherwise starts a LOOKUP (at most
    /// one in flight per peer and relay, repeated at most once a second) and returns None.
    pub fn route(self: &Arc<Self>, url: &str, key: [u8; 32], now: Instant) -> Option<RelayRoute> {
        let sess = self.session(url)?;
        let (addr, generation) = sess.route_addr(now)?;
        let k = (url.to_owned(), key);
        let cached = lock(&self.handles).get(&k).copied();
        match cached {
            Some(c) if c.generation == generation => {
                if let Some(handle) = c.handle {
                    return Some(RelayRoute { addr, handle });
                }
                if now.saturating_duration_since(c.at) < Duration::from_secs(1) {
                    return None;
                }
            }
            _ => {}
        }
        if !lock(&self.inflight).insert(k.clone()) {
            return None;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let handle = sess.lookup(key).await;
            lock(&me.handles).insert(
                k.clone(),
                Cached {
                    generation,
                    handle,
                    at: Instant::now(),
                },
            );
            lock(&me.inflight).remove(&k);
        });
        None
    }

    /// Whether `route` is good as it is: its address is where a live session wants frames
    /// now (the relay's address when bound, else the bridge) and that session's relay has
    /// not said its handle is GONE. The engine may have roamed to such a route (the peer
    /// sends through another relay we also hold a session at): it is left alone.
    pub fn route_is_current(&self, route: RelayRoute, now: Instant) -> bool {
        let a = canonical(route.addr);
        lock(&self.sessions).values().any(|s| {
            s.route_addr(now).is_some_and(|(r, _)| canonical(r) == a)
                && !s.live().gone.contains(&route.handle)
        })
    }

    fn forget_handle(&self, url: &str, handle: u32) {
        lock(&self.handles).retain(|(u, _), c| !(u == url && c.handle == Some(handle)));
    }

    async fn resolve(url: &RelayUrl, ipv6: bool) -> Result<SocketAddr, String> {
        let addrs = tokio::net::lookup_host(url.authority())
            .await
            .map_err(|e| format!("resolving {}: {e}", url.authority()))?;
        let mut found = None;
        for a in addrs {
            if url.origin == Origin::Advertised && !paths::relay_ip_allowed(a.ip()) {
                return Err(format!(
                    "{} resolves to {}, which is no relay address",
                    url.host,
                    a.ip()
                ));
            }
            if found.is_none() && (ipv6 || a.is_ipv4()) {
                found = Some(a);
            }
        }
        found.ok_or_else(|| format!("{} has no usable address", url.host))
    }

    /// One session's life: connect, bridge, BIND, serve; reconnect with backoff.
    async fn run_session(
        self: Arc<Self>,
        me: std::sync::Weak<Session>,
        mut cmds: mpsc::Receiver<Cmd>,
    ) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let Some(sess) = me.upgrade() else { return };
            let url = sess.url.clone();
            drop(sess);
            let r = self.serve_once(&me, &url, &mut cmds).await;
            let Some(sess) = me.upgrade() else { return };
            {
                let mut l = sess.live();
                l.handle = None;
                l.acked = None;
                if let Err(e) = &r {
                    l.error = Some(e.clone());
                }
            }
            drop(sess);
            match r {
                Ok(()) => {
                    tracing::info!(relay = %url.url, "relay session ended; reconnecting");
                    backoff = Duration::from_millis(500);
                }
                Err(e) => tracing::warn!(relay = %url.url, error = %e, "relay session failed"),
            }
            // Drain lookups waiting on the dead session.
            while let Ok(c) = cmds.try_recv() {
                if let Cmd::Lookup(_, tx) = c {
                    let _ = tx.send(None);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn serve_once(
        &self,
        me: &std::sync::Weak<Session>,
        url: &RelayUrl,
        cmds: &mut mpsc::Receiver<Cmd>,
    ) -> Result<(), String> {
        let tls = self.tls.clone().ok_or("no mesh TLS")?;
        let udp = Self::resolve(url, self.ipv6).await?;
        let cfg = client::Config {
            server: udp.to_string(),
            server_name: url.host.clone(),
            tls,
            proxy: client::proxy_from_env(),
            stream_only: false,
            fwmark: self.fwmark,
        };
        let key = *lock(&self.key);
        let mut c = RelayClient::connect(&cfg, &key)
            .await
            .map_err(|e| e.to_string())?;
        let bridge = Bridge::bind(self.engine).map_err(|e| format!("bridge socket: {e}"))?;
        let bridge_addr = bridge.sock.local_addr().map_err(|e| e.to_string())?;
        let bind = c.bind_datagram();
        {
            let sess = me.upgrade().ok_or("dropped")?;
            let mut l = sess.live();
            l.handle = Some(c.handle);
            l.generation += 1;
            l.udp = Some(udp);
            l.bridge = Some(bridge_addr);
            l.acked = None;
            l.error = None;
            l.gone.clear();
        }
        tracing::info!(relay = %url.url, handle = c.handle, %udp, bridge = %bridge_addr, "relay session up");
        let mut next_bind = tokio::time::Instant::now();
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                ev = c.recv_batch() => match ev {
                    Some(Batch::Frames(b)) => {
                        // Delivered over the stream: hand them to the engine from the bridge.
                        if let Err(e) = bridge.deliver(&b).await {
                            tracing::debug!(error = %e, "bridge send to the engine failed");
                        }
                    }
                    Some(Batch::Gone(h)) => {
                        self.counters.gone.fetch_add(1, Ordering::Relaxed);
                        self.forget_handle(&url.url, h);
                        if let Some(s) = me.upgrade() {
                            let mut l = s.live();
                            if l.gone.len() >= MAX_GONE {
                                l.gone.clear();
                            }
                            l.gone.insert(h);
                        }
                    }
                    None => return Ok(()),
                },
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Lookup(key, tx)) => {
                        let r = tokio::time::timeout(LOOKUP_TIMEOUT, c.lookup(&key)).await;
                        match r {
                            Ok(Ok(h)) => { let _ = tx.send(h); }
                            Ok(Err(e)) => { let _ = tx.send(None); return Err(e.to_string()); }
                            Err(_) => { let _ = tx.send(None); }
                        }
                    }
                    Some(Cmd::Rebind) => next_bind = tokio::time::Instant::now(),
                    None => return Ok(()),
                },
                r = bridge.sock.readable() => {
                    r.map_err(|e| format!("bridge: {e}"))?;
                    // Drain what the engine queued; all of it goes on the stream as one
                    // buffer (one writer wake-up, one TLS write).
                    let records = bridge
                        .drain(&mut buf, &self.counters)
                        .map_err(|e| format!("bridge: {e}"))?;
                    c.send_frames(records).await.map_err(|e| e.to_string())?;
                },
                _ = tokio::time::sleep_until(next_bind) => {
                    if let Err(e) = self.sender.send_raw(udp, &bind) {
                        tracing::debug!(relay = %url.url, error = %e, "BIND not sent");
                    }
                    let bound = me.upgrade().is_some_and(|s| s.live().acked.is_some());
                    next_bind = tokio::time::Instant::now() + if bound { REBIND_EVERY } else { BIND_RETRY };
                }
            }
        }
    }
}

/// The loopback bridge between the engine and a relay stream. Receives with `UDP_GRO`
/// (the engine's GSO sends to it arrive as one buffer of equal-size frames, and the
/// kernel coalesces the rest) and sends to the engine with UDP GSO (`UDP_SEGMENT`, runs
/// of equal-size frames as one send), falling back to one datagram per send where the
/// kernel refuses either.
struct Bridge {
    sock: tokio::net::UdpSocket,
    engine: SocketAddr,
    /// GSO sends still worth trying (cleared on the first refusal).
    gso: std::sync::atomic::AtomicBool,
    /// Contiguous bytes of one GSO send.
    scratch: Mutex<Vec<u8>>,
}

impl Bridge {
    /// A bridge socket on the engine's loopback address (an ephemeral port).
    fn bind(engine: SocketAddr) -> std::io::Result<Bridge> {
        let std_sock = std::net::UdpSocket::bind(SocketAddr::new(engine.ip(), 0))?;
        std_sock.set_nonblocking(true)?;
        // A refusal (no UDP_GRO in this kernel) only costs batching.
        let _ = udp::enable_gro(std::os::fd::AsRawFd::as_raw_fd(&std_sock));
        // Bursts in both directions: buffers like the engine's (capped by rmem_max /
        // wmem_max without privilege), so a burst is not dropped at the bridge.
        let sref = socket2::SockRef::from(&std_sock);
        let _ = sref.set_recv_buffer_size(udp::SOCKET_BUFFER);
        let _ = sref.set_send_buffer_size(udp::SOCKET_BUFFER);
        Ok(Bridge {
            sock: tokio::net::UdpSocket::from_std(std_sock)?,
            engine,
            gso: std::sync::atomic::AtomicBool::new(true),
            scratch: Mutex::new(Vec::with_capacity(GSO_MAX_BYTES)),
        })
    }

    fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }

    /// Everything the socket holds now (up to [`BRIDGE_BATCH`] receives or
    /// [`BRIDGE_BATCH_BYTES`]), as stream records; datagrams that are not relay frames
    /// from the engine's port are dropped and counted. `buf` must hold 64 KiB (a GRO
    /// buffer).
    fn drain(&self, buf: &mut [u8], counters: &RelayCounters) -> std::io::Result<Vec<u8>> {
        let mut records = Vec::with_capacity(BRIDGE_BATCH_BYTES + buf.len() + 2 * 64);
        for _ in 0..BRIDGE_BATCH {
            let r = self
                .sock
                .try_io(tokio::io::Interest::READABLE, || udp::recv(self.fd(), buf));
            let (n, src, seg) = match r {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            let Some(src) = src else {
                counters.bridge_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            for frame in gro_segments(&buf[..n], seg) {
                if !bridge_accepts(src, self.engine, frame)
                    || client::push_frame(&mut records, frame).is_err()
                {
                    counters.bridge_refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            if records.len() >= BRIDGE_BATCH_BYTES {
                break;
            }
        }
        Ok(records)
    }

    /// Sends `batch` to the engine: runs of equal-size frames (a shorter one may end a
    /// run) as one GSO send each, waiting for room only when the socket buffer is full.
    async fn deliver(&self, batch: &FrameBatch) -> std::io::Result<()> {
        let frames: Vec<&[u8]> = batch.iter().collect();
        if !self.gso.load(Ordering::Relaxed) {
            for f in frames {
                self.send(f, None).await?;
            }
            return Ok(());
        }
        let sizes: Vec<usize> = frames.iter().map(|f| f.len()).collect();
        for (first, count, seg) in plan_gso(&sizes, udp::GSO_MAX_SEGMENTS, GSO_MAX_BYTES) {
            let group = &frames[first..first + count];
            if count == 1 {
                self.send(group[0], None).await?;
                continue;
            }
            let bytes = {
                let mut s = lock(&self.scratch);
                s.clear();
                for f in group {
                    s.extend_from_slice(f);
                }
                std::mem::take(&mut *s)
            };
            let r = self.send(&bytes, u16::try_from(seg).ok()).await;
            if let Err(e) = r {
                // The kernel refused GSO (or its size): one datagram per send from now on.
                tracing::debug!(error = %e, "bridge GSO send refused; sending one by one");
                self.gso.store(false, Ordering::Relaxed);
                for f in group {
                    self.send(f, None).await?;
                }
            }
            *lock(&self.scratch) = bytes;
        }
        Ok(())
    }

    async fn send(&self, bytes: &[u8], segment: Option<u16>) -> std::io::Result<()> {
        let ipv6 = self.engine.is_ipv6();
        self.sock
            .async_io(tokio::io::Interest::WRITABLE, || {
                udp::send(self.fd(), bytes, self.engine, segment, ipv6).map(drop)
            })
            .await
    }
}

/// The frames of a received buffer: `seg`-byte pieces of a GRO buffer (the last may be
/// shorter), or the whole datagram.
fn gro_segments(buf: &[u8], seg: Option<u16>) -> impl Iterator<Item = &[u8]> {
    let size = seg.map_or(buf.len(), usize::from).max(1);
    buf.chunks(size)
}

/// Largest GSO send to the engine (below the 64 KiB IP datagram limit).
const GSO_MAX_BYTES: usize = 60_000;

/// Whether a BIND_ACK for `handle` from `src` is this session's: the session's own handle,
/// from the relay's own address (a forged ACK from elsewhere never counts the UDP side as
/// bound, which would black-hole frames the relay cannot deliver by UDP).
fn ack_matches(l: &Live, src: SocketAddr, handle: u32) -> bool {
    l.handle == Some(handle) && l.udp.map(canonical) == Some(canonical(src))
}

/// Whether the bridge forwards a datagram to the relay's stream: a relay frame from the
/// engine's own port on loopback (another local process cannot inject through it).
fn bridge_accepts(src: SocketAddr, engine: SocketAddr, frame: &[u8]) -> bool {
    src.ip().is_loopback()
        && src.port() == engine.port()
        && matches!(frame.first(), Some(0xE1..=0xE4))
        && frame.len() >= 4
}

/// The latency to each relay: TCP connect time (`None`: unreachable or refused). Behind
/// an HTTP proxy (`HTTPS_PROXY`) the relays cannot be reached directly: each counts as
/// equally fast (the first in the list becomes home). The probes carry `SO_MARK` `fwmark`
/// when given, like the sessions.
pub async fn measure(
    relays: &[RelayUrl],
    ipv6: bool,
    fwmark: Option<u32>,
) -> Vec<(String, Option<Duration>)> {
    if client::proxy_from_env().is_some() {
        return relays
            .iter()
            .map(|r| (r.url.clone(), Some(Duration::ZERO)))
            .collect();
    }
    let mut out = Vec::new();
    for r in relays {
        let d = async {
            let addr = RelaySessions::resolve(r, ipv6).await.ok()?;
            let t = Instant::now();
            let addr = addr.to_string();
            let s = tokio::time::timeout(MEASURE_TIMEOUT, client::connect_marked(&addr, fwmark))
                .await
                .ok()?
                .ok()?;
            drop(s);
            Some(t.elapsed())
        }
        .await;
        out.push((r.url.clone(), d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The attacker: anyone who can send us UDP forges a BIND_ACK (another address, or
    /// the relay's address with another handle). Only the relay's own ACK for our handle
    /// counts; v4-mapped and plain IPv4 are the same address.
    #[test]
    fn only_the_relays_own_ack_for_our_handle_binds() {
        let l = Live {
            handle: Some(7),
            udp: Some(sa("198.18.0.2:443")),
            ..Live::default()
        };
        assert!(ack_matches(&l, sa("198.18.0.2:443"), 7));
        assert!(ack_matches(&l, sa("[::ffff:198.18.0.2]:443"), 7));
        assert!(!ack_matches(&l, sa("198.18.0.3:443"), 7));
        assert!(!ack_matches(&l, sa("198.18.0.2:444"), 7));
        assert!(!ack_matches(&l, sa("198.18.0.2:443"), 8));
        assert!(!ack_matches(&Live::default(), sa("198.18.0.2:443"), 7));
    }

    /// The attacker: a local process sends to the bridge's loopback port to get frames (or
    /// junk) onto our relay stream. Only relay frames from the engine's port pass.
    #[test]
    fn the_bridge_takes_only_relay_frames_from_the_engine() {
        let engine = sa("[::1]:51820");
        let frame = [0xE4, 0, 0, 9, 1, 2, 3];
        assert!(bridge_accepts(sa("[::1]:51820"), engine, &frame));
        assert!(bridge_accepts(sa("127.0.0.1:51820"), engine, &frame));
        assert!(!bridge_accepts(sa("[::1]:40000"), engine, &frame));
        assert!(!bridge_accepts(sa("198.18.0.9:51820"), engine, &frame));
        for junk in [&[4u8, 0, 0, 0, 1][..], &[0xF0, 0, 0, 1], &[0xE1, 0, 0], &[]] {
            assert!(!bridge_accepts(sa("[::1]:51820"), engine, junk), "{junk:?}");
        }
    }

    fn relay_frame(i: u16, len: usize) -> Vec<u8> {
        let mut f = vec![0xE4, 0, 0, 9];
        f.extend_from_slice(&i.to_be_bytes());
        f.resize(len, 0xA5);
        f
    }

    fn batch_of(frames: &[Vec<u8>]) -> FrameBatch {
        let mut b = FrameBatch::default();
        for f in frames {
            b.push(f).unwrap();
        }
        b
    }

    /// Stream → engine: a batch of equal-size frames with a short tail, and sizes that
    /// change mid-batch, reach the engine's socket as separate datagrams, whole and in
    /// order (GSO sends are split by the kernel for a socket without GRO).
    #[tokio::test]
    async fn the_bridge_delivers_batches_to_the_engine_whole_and_in_order() {
        let engine = std::net::UdpSocket::bind("[::1]:0").unwrap();
        engine
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let bridge = Bridge::bind(engine.local_addr().unwrap()).unwrap();
        // Small enough for a default receive buffer (no reader runs during the send).
        let mut frames: Vec<Vec<u8>> = (0..30).map(|i| relay_frame(i, 1452)).collect();
        frames.push(relay_frame(30, 300));
        frames.extend((31..40).map(|i| relay_frame(i, 200)));
        frames.push(relay_frame(40, 1452));
        bridge.deliver(&batch_of(&frames)).await.unwrap();
        let mut buf = vec![0u8; 65536];
        for (i, want) in frames.iter().enumerate() {
            let (n, src) = engine
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("frame {i}: {e}"));
            assert_eq!(src, bridge.sock.local_addr().unwrap());
            assert_eq!(&buf[..n], &want[..]);
        }
    }

    /// Engine → stream: a burst (GSO from the engine, and single sends) is drained in one
    /// go into stream records, split at the GRO segment size; a datagram from another
    /// local port, or one that is not a relay frame, is dropped and counted.
    #[tokio::test]
    async fn the_bridge_drains_bursts_and_refuses_strangers() {
        let engine = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let stranger = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let bridge = Bridge::bind(engine.local_addr().unwrap()).unwrap();
        let to = bridge.sock.local_addr().unwrap();
        let frames: Vec<Vec<u8>> = (0..40).map(|i| relay_frame(i, 1452)).collect();
        let gso: Vec<u8> = frames[..20].concat();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&engine);
        match udp::send(fd, &gso, to, Some(1452), true) {
            Ok(_) => {}
            // No GSO in this kernel: the same frames one by one.
            Err(_) => {
                for f in &frames[..20] {
                    engine.send_to(f, to).unwrap();
                }
            }
        }
        stranger.send_to(&frames[0], to).unwrap();
        engine.send_to(&[4, 0, 0, 0, 1, 2], to).unwrap();
        for f in &frames[20..] {
            engine.send_to(f, to).unwrap();
        }
        let counters = RelayCounters::default();
        let mut buf = vec![0u8; 65536];
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.len() < 40 {
            assert!(Instant::now() < deadline, "got {} of 40 frames", got.len());
            bridge.sock.readable().await.unwrap();
            records.extend(bridge.drain(&mut buf, &counters).unwrap());
            let mut rest = &records[..];
            got.clear();
            while let Some((rec, used)) = tabbify_relay::proto::split_record(rest) {
                got.push(rec.to_vec());
                rest = &rest[used..];
            }
        }
        assert_eq!(got, frames);
        assert_eq!(counters.bridge_refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn canonical_folds_v4_mapped() {
        assert_eq!(canonical(sa("[::ffff:10.0.0.1]:5")), sa("10.0.0.1:5"));
        assert_eq!(canonical(sa("[2001:db8::1]:5")), sa("[2001:db8::1]:5"));
    }
}
