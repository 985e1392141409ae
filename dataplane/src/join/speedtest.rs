//! `tabbify-mesh speedtest PEER`: throughput and RTT between two members over the mesh path
//! in use, without iperf3 (issue 16, Deliver 5).
//!
//! This module owns the wire protocol, the responder every joiner runs on its mesh ULA
//! ([`serve`], TCP [`DEFAULT_PORT`], `--speedtest-bind off` disables it) and the client the
//! command runs ([`run_test`]). Traffic goes through the TUN like any other: the packet
//! filter applies, so the policy must allow the port to the peer's tags
//! (`tag:x:tcp:8731`), and the path (direct or relayed) is the engine's.
//!
//! Protocol, one test per TCP connection, all integers big-endian:
//!
//! ```text
//! client → responder  request (12 bytes): "TBST" | version 1 | direction (0: client sends,
//!                     1: responder sends) | pings u16 (RTT samples, ≤ MAX_PINGS) |
//!                     duration ms u32 (the responder grants at most MAX_DURATION)
//! responder → client  answer (8 bytes): status (0 accepted, 1 busy, 2 bad request) |
//!                     3 bytes zero | granted duration ms u32; anything but 0 closes
//! ping phase          `pings` times: the client sends 8 bytes, the responder echoes them
//! bulk phase          the sender writes for the granted duration, then shuts its write
//!                     side; direction 0: the responder reads to EOF and answers with the
//!                     bytes it received (u64) and the microseconds from the phase's start
//!                     to EOF (u64); direction 1: the client reads to EOF and measures
//! ```
//!
//! Invariants of the responder (so a member allowed by the policy cannot use it to burn
//! the host):
//! * at most [`MAX_TESTS`] tests run at once; a request beyond that is answered busy;
//! * at most [`MAX_PENDING`] connections wait for their request, each at most
//!   [`REQUEST_TIMEOUT`]; more are closed at once;
//! * a test lasts at most [`MAX_DURATION`] of bulk transfer, and its connection lives at
//!   most [`MAX_DURATION`] + [`GRACE`] + the ping phase's bound ([`PING_PHASE`]) whatever
//!   the client does (a stalled reader, a sender that never stops);
//! * the listener is bound to the mesh ULA only, never a LAN address.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The responder's default port (next to apps' 8730).
pub const DEFAULT_PORT: u16 = 8731;
/// Tests served at once.
pub const MAX_TESTS: usize = 2;
/// Connections waiting for their request at once.
pub const MAX_PENDING: usize = 8;
/// The request must arrive within this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest bulk phase granted.
pub const MAX_DURATION: Duration = Duration::from_secs(30);
/// The most RTT samples a client may ask for.
pub const MAX_PINGS: u16 = 100;
/// Bound on the whole ping phase.
pub const PING_PHASE: Duration = Duration::from_secs(10);
/// Slack after the bulk phase for the sender's last bytes and the result.
pub const GRACE: Duration = Duration::from_secs(3);
/// How long the client waits for the responder to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

const MAGIC: &[u8; 4] = b"TBST";
const VERSION: u8 = 1;
/// Bytes of a request.
pub const REQUEST_LEN: usize = 12;
const ANSWER_LEN: usize = 8;
const CHUNK: usize = 128 * 1024;

/// Answer status: accepted.
const ACCEPTED: u8 = 0;
/// Answer status: [`MAX_TESTS`] already running.
const BUSY: u8 = 1;
/// Answer status: not a request of this protocol.
const BAD_REQUEST: u8 = 2;

/// Which way the bulk data flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The client sends, the responder receives (this node → the peer).
    Send,
    /// The responder sends, the client receives (the peer → this node).
    Receive,
}

/// A parsed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRequest {
    /// Which way the data flows.
    pub direction: Direction,
    /// RTT samples before the bulk phase.
    pub pings: u16,
    /// Bulk phase length asked for, in milliseconds.
    pub duration_ms: u32,
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not "TBST".
    #[error("not a speedtest request")]
    Magic,
    /// Another protocol version.
    #[error("unsupported speedtest version {0}")]
    Version(u8),
    /// Neither 0 nor 1.
    #[error("unknown direction {0}")]
    Direction(u8),
    /// More pings than [`MAX_PINGS`].
    #[error("{0} pings asked, at most {MAX_PINGS}")]
    Pings(u16),
}

impl TestRequest {
    /// The request's wire form.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4] = VERSION;
        b[5] = match self.direction {
            Direction::Send => 0,
            Direction::Receive => 1,
        };
        b[6..8].copy_from_slice(&self.pings.to_be_bytes());
        b[8..12].copy_from_slice(&self.duration_ms.to_be_bytes());
        b
    }

    /// Parses a request (exactly [`REQUEST_LEN`] bytes are read by the caller).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, RequestError> {
        if &b[..4] != MAGIC {
            return Err(RequestError::Magic);
        }
        if b[4] != VERSION {
            return Err(RequestError::Version(b[4]));
        }
        let direction = match b[5] {
            0 => Direction::Send,
            1 => Direction::Receive,
            d => return Err(RequestError::Direction(d)),
        };
        let pings = u16::from_be_bytes([b[6], b[7]]);
        if pings > MAX_PINGS {
            return Err(RequestError::Pings(pings));
        }
        Ok(Self {
            direction,
            pings,
            duration_ms: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }

    /// The bulk phase the responder grants: the request's, at most `max`.
    pub fn granted(&self, max: Duration) -> Duration {
        Duration::from_millis(u64::from(self.duration_ms)).min(max)
    }
}

/// The responder's bounds (the constants above; tests shrink them).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Tests at once.
    pub tests: usize,
    /// Connections waiting for their request.
    pub pending: usize,
    /// Time allowed for the request.
    pub request_timeout: Duration,
    /// Longest bulk phase.
    pub max_duration: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tests: MAX_TESTS,
            pending: MAX_PENDING,
            request_timeout: REQUEST_TIMEOUT,
            max_duration: MAX_DURATION,
        }
    }
}

/// Parses `--speedtest-bind`: a port (bound on the mesh ULA only) or `off`.
pub fn parse_bind(s: &str) -> Result<Option<u16>, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(Some(p)),
        _ => Err(format!(
            "--speedtest-bind {s:?}: expected a port (bound on the mesh ULA only, default {DEFAULT_PORT}) or `off`"
        )),
    }
}

/// Binds the responder on `[ula]:port`.
pub async fn bind(ula: Ipv6Addr, port: u16) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(IpAddr::V6(ula), port);
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("--speedtest-bind: binding the speedtest responder on {addr}"))
}

/// Serves tests on `listener` forever (until the future is dropped).
pub async fn serve(listener: TcpListener, limits: Limits) {
    let tests = Arc::new(Semaphore::new(limits.tests));
    let pending = Arc::new(Semaphore::new(limits.pending));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "speedtest accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(waiting) = pending.clone().try_acquire_owned() else {
            tracing::debug!(%from, "speedtest: too many connections waiting, closed");
            drop(stream);
            continue;
        };
        let tests = tests.clone();
        tokio::spawn(async move {
            if let Err(e) = session(stream, waiting, &tests, limits).await {
                tracing::debug!(%from, error = %e, "speedtest session ended");
            }
        });
    }
}

/// One connection: request, answer, pings, bulk phase, each under its bound.
async fn session(
    mut s: TcpStream,
    waiting: tokio::sync::OwnedSemaphorePermit,
    tests: &Arc<Semaphore>,
    limits: Limits,
) -> anyhow::Result<()> {
    let mut req = [0u8; REQUEST_LEN];
    tokio::time::timeout(limits.request_timeout, s.read_exact(&mut req))
        .await
        .context("no request in time")??;
    drop(waiting);
    let req = match TestRequest::parse(&req) {
        Ok(r) => r,
        Err(e) => {
            let _ = s.write_all(&answer(BAD_REQUEST, Duration::ZERO)).await;
            return Err(e.into());
        }
    };
    let Ok(_slot) = tests.clone().try_acquire_owned() else {
        let _ = s.write_all(&answer(BUSY, Duration::ZERO)).await;
        bail!("busy: {} tests running", limits.tests);
    };
    let granted = req.granted(limits.max_duration);
    let bound = PING_PHASE + granted + GRACE;
    tokio::time::timeout(bound, async {
        s.set_nodelay(true)?;
        s.write_all(&answer(ACCEPTED, granted)).await?;
        let mut ping = [0u8; 8];
        for _ in 0..req.pings {
            s.read_exact(&mut ping).await?;
            s.write_all(&ping).await?;
        }
        match req.direction {
            Direction::Send => {
                let start = Instant::now();
                let deadline = tokio::time::Instant::now() + granted + GRACE;
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0u64;
                loop {
                    match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                        Ok(Ok(0)) => break,
                        Ok(Ok(k)) => n += k as u64,
                        Ok(Err(e)) => return Err(e.into()),
                        // A sender that does not stop: measured up to here, then cut.
                        Err(_) => break,
                    }
                }
                let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                let mut r = [0u8; 16];
                r[..8].copy_from_slice(&n.to_be_bytes());
                r[8..].copy_from_slice(&us.to_be_bytes());
                s.write_all(&r).await?;
                s.shutdown().await?;
            }
            Direction::Receive => {
                send_for(&mut s, granted).await?;
                s.shutdown().await?;
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("test exceeded its time bound")?
}

fn answer(status: u8, granted: Duration) -> [u8; ANSWER_LEN] {
    let mut a = [0u8; ANSWER_LEN];
    a[0] = status;
    let ms = u32::try_from(granted.as_millis()).unwrap_or(u32::MAX);
    a[4..].copy_from_slice(&ms.to_be_bytes());
    a
}

/// Writes zeros for `d`; returns the bytes written.
async fn send_for(s: &mut TcpStream, d: Duration) -> std::io::Result<u64> {
    let buf = vec![0u8; CHUNK];
    let end = Instant::now() + d;
    let mut n = 0u64;
    while Instant::now() < end {
        s.write_all(&buf).await?;
        n += CHUNK as u64;
    }
    Ok(n)
}

/// Round-trip times of the ping phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rtt {
    /// Samples taken.
    pub samples: usize,
    /// Smallest, in milliseconds.
    pub min_ms: f64,
    /// Mean, in milliseconds.
    pub avg_ms: f64,
}

/// One direction's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Throughput {
    /// Which way.
    pub direction: Direction,
    /// Payload bytes the receiver counted.
    pub bytes: u64,
    /// Seconds the receiver measured.
    pub seconds: f64,
    /// Gbit/s of TCP payload.
    pub gbit_s: f64,
}

/// What one test connection measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// The bulk phase.
    pub throughput: Throughput,
    /// The ping phase (empty if no pings were asked).
    pub rtt: Rtt,
}

/// Why a test could not run.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// No TCP connection within [`CONNECT_TIMEOUT`], or refused.
    #[error("no speedtest responder answered at {addr} within {secs} s ({why}): blocked by policy or no responder — the policy must allow tcp:{port} to the peer (an allow rule with `tag:<its tag>:tcp:{port}`), and the peer must not run with --speedtest-bind off", secs = CONNECT_TIMEOUT.as_secs(), port = addr.port())]
    Unreachable {
        /// Where.
        addr: SocketAddr,
        /// What the socket said.
        why: String,
    },
    /// The responder runs [`MAX_TESTS`] tests already.
    #[error("the peer's speedtest responder is busy (at most {MAX_TESTS} tests at once); try again shortly")]
    Busy,
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Runs one test against the responder at `addr`.
pub async fn run_test(
    addr: SocketAddr,
    direction: Direction,
    duration: Duration,
    pings: u16,
) -> Result<Measured, TestError> {
    let mut s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(TestError::Unreachable {
                addr,
                why: e.to_string(),
            })
        }
        Err(_) => {
            return Err(TestError::Unreachable {
                addr,
                why: "timed out".into(),
            })
        }
    };
    s.set_nodelay(true).context("TCP_NODELAY")?;
    let req = TestRequest {
        direction,
        pings: pings.min(MAX_PINGS),
        duration_ms: u32::try_from(duration.as_millis()).unwrap_or(u32::MAX),
    };
    let bound = CONNECT_TIMEOUT + PING_PHASE + duration.min(MAX_DURATION) + GRACE * 2;
    tokio::time::timeout(bound, client(&mut s, req))
        .await
        .map_err(|_| anyhow::anyhow!("the test to {addr} did not finish in time"))?
}

async fn client(s: &mut TcpStream, req: TestRequest) -> Result<Measured, TestError> {
    s.write_all(&req.encode())
        .await
        .context("sending the request")?;
    let mut a = [0u8; ANSWER_LEN];
    s.read_exact(&mut a)
        .await
        .context("reading the responder's answer")?;
    match a[0] {
        ACCEPTED => {}
        BUSY => return Err(TestError::Busy),
        other => {
            return Err(
                anyhow::anyhow!("the responder refused the request (status {other})").into(),
            )
        }
    }
    let granted = Duration::from_millis(u64::from(u32::from_be_bytes([a[4], a[5], a[6], a[7]])));
    let mut rtts = Vec::with_capacity(usize::from(req.pings));
    for seq in 0..u64::from(req.pings) {
        let t = Instant::now();
        s.write_all(&seq.to_be_bytes()).await.context("ping")?;
        let mut echo = [0u8; 8];
        s.read_exact(&mut echo).await.context("ping echo")?;
        if u64::from_be_bytes(echo) != seq {
            return Err(anyhow::anyhow!("ping echo out of order").into());
        }
        rtts.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let rtt = if rtts.is_empty() {
        Rtt::default()
    } else {
        Rtt {
            samples: rtts.len(),
            min_ms: rtts.iter().copied().fold(f64::INFINITY, f64::min),
            avg_ms: rtts.iter().sum::<f64>() / rtts.len() as f64,
        }
    };
    let (bytes, seconds) = match req.direction {
        Direction::Send => {
            send_for(s, granted).await.context("sending")?;
            s.shutdown().await.context("ending the send")?;
            let mut r = [0u8; 16];
            s.read_exact(&mut r)
                .await
                .context("reading the responder's count")?;
            let n = u64::from_be_bytes(r[..8].try_into().unwrap_or_default());
            let us = u64::from_be_bytes(r[8..].try_into().unwrap_or_default());
            (n, us as f64 / 1e6)
        }
        Direction::Receive => {
            let start = Instant::now();
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0u64;
            loop {
                let k = s.read(&mut buf).await.context("receiving")?;
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            (n, start.elapsed().as_secs_f64())
        }
    };
    let gbit_s = if seconds > 0.0 {
        bytes as f64 * 8.0 / seconds / 1e9
    } else {
        0.0
    };
    Ok(Measured {
        throughput: Throughput {
            direction: req.direction,
            bytes,
            seconds,
            gbit_s,
        },
        rtt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_bad_ones_are_refused() {
        let r = TestRequest {
            direction: Direction::Receive,
            pings: 10,
            duration_ms: 5000,
        };
        assert_eq!(TestRequest::parse(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] = b'X';
        assert_eq!(TestRequest::parse(&b), Err(RequestError::Magic));
        let mut b = r.encode();
        b[4] = 9;
        assert_eq!(TestRequest::parse(&b), Err(RequestError::Version(9)));
        let mut b = r.encode();
        b[5] = 7;
        assert_eq!(TestRequest::parse(&b), Err(RequestError::Direction(7)));
        let mut b = r.encode();
        b[6..8].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(TestRequest::parse(&b), Err(RequestError::Pings(1000)));
        let long = TestRequest {
            duration_ms: u32::MAX,
            ..r
        };
        assert_eq!(long.granted(MAX_DURATION), MAX_DURATION);
    }

    #[test]
    fn bind_syntax() {
        assert_eq!(parse_bind("off"), Ok(None));
        assert_eq!(parse_bind("8731"), Ok(Some(8731)));
        assert!(parse_bind("0").is_err());
        assert!(parse_bind("0.0.0.0:8731").unwrap_err().contains("ULA only"));
    }

    async fn responder(limits: Limits) -> SocketAddr {
        let l = TcpListener::bind("[::1]:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, limits));
        addr
    }

    /// A test in each direction measures what went through and the RTT.
    #[tokio::test]
    async fn both_directions_measure_bytes_and_rtt() {
        let addr = responder(Limits::default()).await;
        let d = Duration::from_millis(200);
        let up = run_test(addr, Direction::Send, d, 5).await.unwrap();
        assert!(up.throughput.bytes > 0 && up.throughput.gbit_s > 0.0);
        assert_eq!(up.rtt.samples, 5);
        assert!(up.rtt.min_ms <= up.rtt.avg_ms);
        let down = run_test(addr, Direction::Receive, d, 0).await.unwrap();
        assert!(down.throughput.bytes > 0);
        assert_eq!(down.throughput.direction, Direction::Receive);
        assert_eq!(down.rtt.samples, 0);
    }

    /// The attacker: a member the policy lets reach the responder tries to burn the host
    /// with many tests, endless tests and idle connections. A third concurrent test is
    /// answered busy; a huge duration is granted only the maximum; connections that never
    /// send a request are closed and free their place; garbage is refused.
    #[tokio::test]
    async fn a_member_cannot_use_the_responder_to_burn_the_host() {
        let limits = Limits {
            tests: 2,
            pending: 2,
            request_timeout: Duration::from_millis(300),
            max_duration: Duration::from_millis(400),
        };
        let addr = responder(limits).await;
        let req = |ms: u32| TestRequest {
            direction: Direction::Receive,
            pings: 0,
            duration_ms: ms,
        };
        // Two running tests that ask for an hour each.
        let mut running = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&req(3_600_000).encode()).await.unwrap();
            let mut a = [0u8; ANSWER_LEN];
            s.read_exact(&mut a).await.unwrap();
            assert_eq!(a[0], ACCEPTED);
            assert_eq!(
                u32::from_be_bytes([a[4], a[5], a[6], a[7]]),
                400,
                "granted only the maximum"
            );
            running.push(s);
        }
        // A third is busy.
        match run_test(addr, Direction::Send, Duration::from_millis(100), 0).await {
            Err(TestError::Busy) => {}
            other => panic!("expected busy, got {other:?}"),
        }
        // The two endless tests end on their own (the responder closes after the granted
        // maximum): reading them to EOF terminates, with a bounded byte count.
        for mut s in running {
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).await.unwrap();
            assert!(!sink.is_empty());
        }
        // Idle connections that never send a request: closed by the responder.
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        for mut s in idle {
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).await.unwrap(), 0, "closed without a request");
        }
        // Garbage gets a bad-request answer and a close.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut a = [0u8; ANSWER_LEN];
        s.read_exact(&mut a).await.unwrap();
        assert_eq!(a[0], BAD_REQUEST);
        // And the slots are free again: a real test runs.
        let m = run_test(addr, Direction::Send, Duration::from_millis(100), 2)
            .await
            .unwrap();
        assert!(m.throughput.bytes > 0);
    }

    /// Nothing listening: a clear error naming the policy and the responder.
    #[tokio::test]
    async fn no_responder_is_a_clear_error() {
        let l = std::net::TcpListener::bind("[::1]:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = run_test(addr, Direction::Send, Duration::from_millis(100), 0)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("blocked by policy or no responder"), "{e}");
        assert!(e.contains("tcp:"), "{e}");
    }
}
