//! The stub's sockets: UDP and TCP (RFC 1035 §4.2, RFC 7766) on the service addresses, and
//! plain forwarding of everything outside the mesh domain to the host's upstream
//! resolvers.
//!
//! ```text
//! UDP datagram / TCP message ─▶ Zone::handle ─▶ Answer: send back
//!                                            └▶ Forward: same bytes to upstream 1, 2, …
//!                                               (fresh UDP socket each, 2 s each; TCP over
//!                                               TCP), first reply with our id and QR set
//!                                               goes back; none: SERVFAIL
//!                                            └▶ Drop: nothing (counted)
//! ```
//!
//! Invariants: the upstream list never holds our own service addresses (no loop through
//! ourselves); at most [`MAX_FORWARDS`] forwards and [`MAX_TCP`] TCP connections run at once,
//! more are dropped and counted; a TCP connection idle for [`TCP_IDLE`] is closed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Header, Message, MessageType, ResponseCode};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::zone::{Outcome, Verdict, Zone};

/// Forwards in flight at once (UDP and TCP together).
pub const MAX_FORWARDS: usize = 256;
/// TCP connections served at once.
pub const MAX_TCP: usize = 64;
/// A TCP connection with no complete message for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long one upstream gets to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest UDP datagram read (EDNS payloads up to 4096 from clients; larger is cut and then
/// fails to parse, which is counted).
const UDP_BUF: usize = 4096;

/// What the stub has done since start.
#[derive(Debug, Default)]
pub struct Counters {
    /// Answered from the zone with an address (or the SOA).
    pub answered: AtomicU64,
    /// NOERROR without data from the zone.
    pub nodata: AtomicU64,
    /// NXDOMAIN from the zone.
    pub nxdomain: AtomicU64,
    /// Forwarded upstream.
    pub forwarded: AtomicU64,
    /// Forwards no upstream answered (SERVFAIL sent).
    pub upstream_failed: AtomicU64,
    /// Malformed or unsupported queries (FORMERR, NOTIMP, REFUSED or nothing sent).
    pub malformed: AtomicU64,
    /// Dropped: responses sent to us, or over the forward/connection limits.
    pub dropped: AtomicU64,
}

impl Counters {
    fn count(&self, o: Outcome) {
        let c = match o {
            Outcome::Answered => &self.answered,
            Outcome::NoData => &self.nodata,
            Outcome::NxDomain => &self.nxdomain,
            Outcome::Forwarded => &self.forwarded,
            Outcome::Malformed => &self.malformed,
            Outcome::Dropped => &self.dropped,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as `status` shows them.
    pub fn snapshot(&self) -> tabbify_api::local::DnsCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        tabbify_api::local::DnsCounters {
            answered: g(&self.answered),
            nodata: g(&self.nodata),
            nxdomain: g(&self.nxdomain),
            forwarded: g(&self.forwarded),
            upstream_failed: g(&self.upstream_failed),
            malformed: g(&self.malformed),
            dropped: g(&self.dropped),
        }
    }
}

/// What the socket loops share.
pub struct Shared {
    /// The zone in force (replaced whole on every roster change).
    pub zone: RwLock<Arc<Zone>>,
    /// Upstream resolvers, in order.
    pub upstreams: Vec<SocketAddr>,
    /// Counters.
    pub counters: Counters,
    forwards: Arc<Semaphore>,
    tcp: Arc<Semaphore>,
}

impl Shared {
    /// Shared state forwarding to `upstreams`.
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Self {
            zone: RwLock::new(Arc::new(Zone::default())),
            upstreams,
            counters: Counters::default(),
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
            tcp: Arc::new(Semaphore::new(MAX_TCP)),
        }
    }

    /// The zone in force.
    pub fn zone(&self) -> Arc<Zone> {
        match self.zone.read() {
            Ok(z) => z.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Puts `zone` in force.
    pub fn set_zone(&self, zone: Zone) {
        let zone = Arc::new(zone);
        match self.zone.write() {
            Ok(mut z) => *z = zone,
            Err(p) => *p.into_inner() = zone,
        }
    }
}

/// Serves DNS over UDP on `socket` until the task is dropped.
pub async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; UDP_BUF];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let query = &buf[..n];
        let (verdict, outcome) = shared.zone().handle(query, true);
        shared.counters.count(outcome);
        match verdict {
            Verdict::Answer(b) => {
                let _ = socket.send_to(&b, from).await;
            }
            Verdict::Drop => {}
            Verdict::Forward { id } => {
                let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
                    shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let query = query.to_vec();
                let (socket, shared) = (socket.clone(), shared.clone());
                tokio::spawn(async move {
                    let answer = forward_udp(&shared, &query, id).await;
                    drop(permit);
                    let _ = socket.send_to(&answer, from).await;
                });
            }
        }
    }
}

/// Serves DNS over TCP on `listener` until the task is dropped.
pub async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = shared.tcp.clone().try_acquire_owned() else {
            shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_tcp_conn(stream, &shared).await;
            drop(permit);
        });
    }
}

async fn serve_tcp_conn(mut stream: TcpStream, shared: &Shared) {
    loop {
        let query = match tokio::time::timeout(TCP_IDLE, read_tcp_message(&mut stream)).await {
            Ok(Ok(q)) => q,
            _ => return,
        };
        let (verdict, outcome) = shared.zone().handle(&query, false);
        shared.counters.count(outcome);
        let answer = match verdict {
            Verdict::Answer(b) => b,
            Verdict::Drop => return,
            Verdict::Forward { id } => {
                let Ok(_permit) = shared.forwards.try_acquire() else {
                    shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                forward_tcp(shared, &query, id).await
            }
        };
        if write_tcp_message(&mut stream, &answer).await.is_err() {
            return;
        }
    }
}

/// Reads one length-prefixed DNS message (RFC 1035 §4.2.2).
async fn read_tcp_message(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_tcp_message(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::ErrorKind::InvalidData)?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

/// Whether `answer` is a response to query `id` (the upstream's reply, not noise).
fn is_reply(answer: &[u8], id: u16) -> bool {
    Header::read(&mut BinDecoder::new(answer))
        .is_ok_and(|h| h.metadata.id == id && h.metadata.message_type == MessageType::Response)
}

/// The upstreams' answer to `query`, or SERVFAIL.
async fn forward_udp(shared: &Shared, query: &[u8], id: u16) -> Vec<u8> {
    for up in &shared.upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65_535];
        let got = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            loop {
                match sock.recv(&mut buf).await {
                    Ok(n) if is_reply(&buf[..n], id) => return Some(n),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        })
        .await;
        if let Ok(Some(n)) = got {
            buf.truncate(n);
            return buf;
        }
    }
    shared
        .counters
        .upstream_failed
        .fetch_add(1, Ordering::Relaxed);
    servfail(query, id)
}

/// The upstreams' answer to `query` over TCP, or SERVFAIL.
async fn forward_tcp(shared: &Shared, query: &[u8], id: u16) -> Vec<u8> {
    for up in &shared.upstreams {
        let exchange = async {
            let mut s = TcpStream::connect(up).await?;
            write_tcp_message(&mut s, query).await?;
            read_tcp_message(&mut s).await
        };
        if let Ok(Ok(answer)) = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
            if is_reply(&answer, id) {
                return answer;
            }
        }
    }
    shared
        .counters
        .upstream_failed
        .fetch_add(1, Ordering::Relaxed);
    servfail(query, id)
}

fn servfail(query: &[u8], id: u16) -> Vec<u8> {
    let mut r = match Message::from_vec(query) {
        Ok(q) => {
            let mut r = Message::response(id, q.metadata.op_code);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.add_queries(q.queries);
            r
        }
        Err(_) => Message::response(id, hickory_proto::op::OpCode::Query),
    };
    r.metadata.recursion_available = true;
    r.metadata.response_code = ResponseCode::ServFail;
    r.to_vec().unwrap_or_default()
}
