//! One client connection's guard rails: the connection caps ([`ConnLimiter`]), the byte stream
//! hyper reads through ([`GuardedIo`], driving [`crate::inbound::Inbound`] with the clock),
//! and the per-connection state shared with the request handler ([`ConnState`]).
//!
//! How a refusal reaches the client:
//! * over a cap, before any request is read: a fixed JSON response with `Connection: close`
//!   written straight to the socket ([`refuse`]), 429 per address, 503 overall;
//! * a bad or late request head (never handed to hyper): [`GuardedIo`] hands hyper a
//!   stand-in request instead, `GET / HTTP/1.1` with `Connection: close`, and records its
//!   index in [`ConnState`]; the handler answers that request with the refusal's JSON error
//!   (400 or 408) after the responses to earlier pipelined requests, then hyper closes;
//! * a body cut mid-way: reads fail from then on (hyper sees the body break off); the
//!   handler of that request answers 408 if it has not answered yet, else the connection is
//!   just closed.
//!
//! A cut or refused connection is half-closed and drained (at most 1 s, 64 KiB) before it is
//! closed, so unread client bytes do not turn the close into a reset that destroys the answer;
//! a cut connection keeps its place under the caps until then.
//!
//! Invariants: every refusal is counted once in [`Metrics`]; a stand-in request can only come
//! from [`GuardedIo`] (the handler matches it by request index, which a client cannot forge).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::error::EdgeError;
use crate::inbound::{Inbound, InboundLimits, Scan};
use crate::metrics::{Metrics, Refusal};

/// The request hyper is handed in place of a refused head. Should it ever be dispatched as a
/// request, it reaches nothing: its host (`_` is not a hostname character) can match no route
/// of the routes file, and `/` is no endpoint (404).
const STAND_IN: &[u8] =
    b"GET / HTTP/1.1\r\nhost: _stand-in_\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// The address a connection is counted under: the IP, IPv4-mapped IPv6 as IPv4, and other
/// IPv6 addresses by their /64 (one host usually holds a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Counts open client connections, per source and overall.
pub struct ConnLimiter {
    max_total: u64,
    max_per_source: u32,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: u64,
    by_source: HashMap<IpAddr, u32>,
}

/// One counted connection; dropping it uncounts it.
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    source: IpAddr,
}

impl ConnLimiter {
    /// At most `max_total` connections, `max_per_source` from one source (see [`source_key`]).
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(ConnLimiter {
            max_total: u64::try_from(max_total.max(1)).unwrap_or(u64::MAX),
            max_per_source: u32::try_from(max_per_source.max(1)).unwrap_or(u32::MAX),
            open: Mutex::new(Open::default()),
        })
    }

    /// Counts a connection from `ip`, or says which cap it is over.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refusal> {
        let source = source_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= self.max_total {
            return Err(Refusal::ConnectionCap);
        }
        let count = open.by_source.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            return Err(Refusal::PerIpCap);
        }
        *count += 1;
        open.total += 1;
        Ok(ConnPermit {
            limiter: self.clone(),
            source,
        })
    }

    /// Connections counted now.
    pub fn open(&self) -> u64 {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

/// Answers a refused connection with `err`'s JSON body and closes it: write (bounded in
/// time), half-close, then drain what the client sent for a moment so the close does not
/// turn into a reset that destroys the answer.
pub async fn refuse(mut stream: TcpStream, err: EdgeError) {
    let response = err.raw_response();
    if tokio::time::timeout(Duration::from_secs(1), stream.write_all(&response))
        .await
        .is_ok()
    {
        linger(stream).await;
    }
}

/// What the request handler learns from [`GuardedIo`] about one connection.
#[derive(Default)]
pub struct ConnState {
    /// Requests the handler has started (the next request's index).
    handled: AtomicU64,
    /// 1 + index of the stand-in request, 0 if none.
    stand_in: AtomicU64,
    /// 1 + index of the request whose body was cut, 0 if none.
    cut: AtomicU64,
    /// The refusal of the stand-in or the cut (as its index in [`Refusal::ALL`]).
    reason: AtomicU8,
}

impl ConnState {
    /// The handler starts a request: its index on this connection.
    pub fn next_request(&self) -> u64 {
        self.handled.fetch_add(1, Relaxed)
    }

    /// The refusal to answer request `index` with, if it is the stand-in for a refused head.
    pub fn stand_in(&self, index: u64) -> Option<Refusal> {
        (self.stand_in.load(Relaxed) == index + 1).then(|| self.reason())
    }

    /// The refusal that cut request `index`'s body, if one did.
    pub fn cut(&self, index: u64) -> Option<Refusal> {
        (self.cut.load(Relaxed) == index + 1).then(|| self.reason())
    }

    fn reason(&self) -> Refusal {
        Refusal::ALL
            .get(usize::from(self.reason.load(Relaxed)))
            .copied()
            .unwrap_or(Refusal::BadFraming)
    }

    fn set_reason(&self, reason: Refusal) {
        let i = Refusal::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.reason.store(u8::try_from(i).unwrap_or(0), Relaxed);
    }
}

/// A client stream seen through [`Inbound`]: what hyper reads has passed its checks.
pub struct GuardedIo {
    inner: Option<TcpStream>,
    inbound: Inbound,
    /// Checked bytes waiting to be read by hyper (completed heads, the stand-in).
    out: BytesMut,
    /// After `out` drains: nothing more (after a stand-in) or an error (after a body cut).
    after: After,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    state: Arc<ConnState>,
    metrics: Arc<Metrics>,
    /// The connection's place under the caps, held until the socket is closed (also while a
    /// cut connection lingers), so refused clients cannot exceed the caps by being cut.
    #[allow(dead_code)] // Held for its `Drop`; only moved, never read.
    permit: Option<ConnPermit>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    Read,
    /// Nothing more, ever: not even end of stream, which would make hyper drop the stand-in
    /// unanswered. The stand-in asks for `Connection: close`, so hyper closes after answering.
    Hold,
    Fail,
}

impl GuardedIo {
    /// Guards `inner` with `limits`; refusals are counted in `metrics` and reported in `state`.
    /// `permit` is released when the socket is closed.
    pub fn new(
        inner: TcpStream,
        limits: InboundLimits,
        state: Arc<ConnState>,
        metrics: Arc<Metrics>,
        permit: ConnPermit,
    ) -> Self {
        GuardedIo {
            inner: Some(inner),
            inbound: Inbound::new(limits),
            out: BytesMut::new(),
            after: After::Read,
            timer: None,
            state,
            metrics,
            permit: Some(permit),
        }
    }

    /// The stream was cut for `reason` while `holding` a head (or not).
    fn on_cut(&mut self, reason: Refusal, holding: bool) {
        self.metrics.refused(reason);
        self.state.set_reason(reason);
        let heads = self.inbound.heads();
        if holding {
            self.state.stand_in.store(heads + 1, Relaxed);
            self.out.extend_from_slice(STAND_IN);
            self.after = After::Hold;
        } else {
            // The body of the last head handed on was cut.
            self.state.cut.store(heads, Relaxed);
            self.after = After::Fail;
        }
        self.timer = None;
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            match this.after {
                After::Read => {}
                After::Hold => return Poll::Pending,
                After::Fail => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request cut by the edge's limits",
                    )))
                }
            }
            let start = buf.filled().len();
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match Pin::new(inner).poll_read(cx, buf) {
                Poll::Pending => {
                    let now = Instant::now();
                    this.inbound.waiting(now);
                    let Some(at) = this.inbound.next_check(now) else {
                        this.timer = None;
                        return Poll::Pending;
                    };
                    let at = tokio::time::Instant::from_std(at);
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    if timer.deadline() != at {
                        timer.as_mut().reset(at);
                    }
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let holding = this.inbound.holding_head();
                    if let Err(reason) = this.inbound.check(Instant::now()) {
                        this.on_cut(reason, holding);
                    }
                    // Checked: loop to serve the stand-in, fail, or re-arm the timer.
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let end = buf.filled().len();
            if end == start {
                return Poll::Ready(Ok(()));
            }
            let now = Instant::now();
            let mut keep = start;
            let mut direct = true;
            let mut i = start;
            while i < end {
                let holding = this.inbound.holding_head();
                match this.inbound.scan(now, &buf.filled()[i..end]) {
                    Ok(Scan::Pass(n)) => {
                        if direct {
                            keep = i + n;
                        } else {
                            this.out.extend_from_slice(&buf.filled()[i..i + n]);
                        }
                        i += n;
                    }
                    Ok(Scan::Held(n)) => {
                        direct = false;
                        i += n;
                    }
                    Ok(Scan::Head(n)) => {
                        direct = false;
                        this.inbound.move_head_into(&mut this.out);
                        i += n;
                    }
                    Err(reason) => {
                        this.on_cut(reason, holding);
                        break;
                    }
                }
            }
            buf.set_filled(keep);
            if keep > start {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection already closed")
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, data),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl Drop for GuardedIo {
    fn drop(&mut self) {
        // A cut connection usually has unread client bytes (the rest of a refused head, a
        // trickled body): closing with them unread makes the kernel send a reset, which can
        // destroy the refusal the client has not read yet. Drain briefly first.
        if self.after == After::Read {
            return;
        }
        if let (Some(stream), Ok(rt)) = (self.inner.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(linger(stream));
        }
    }
}

/// Half-closes `stream` and reads (and drops) what the client still sends, for at most one
/// second and 64 KiB, then closes it.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_group_ipv6_by_64_and_unmap_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1"
            .parse()
            .unwrap_or(IpAddr::V4([0; 4].into()));
        let b: IpAddr = "2001:db8:1:2:bbbb::9"
            .parse()
            .unwrap_or(IpAddr::V4([0; 4].into()));
        let c: IpAddr = "2001:db8:1:3::1"
            .parse()
            .unwrap_or(IpAddr::V4([0; 4].into()));
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7"
            .parse()
            .unwrap_or(IpAddr::V4([0; 4].into()));
        assert_eq!(source_key(mapped), IpAddr::V4([192, 0, 2, 7].into()));
    }

    #[test]
    fn limiter_caps_per_source_and_overall_and_releases_on_drop() {
        let l = ConnLimiter::new(3, 2);
        let x = IpAddr::V4([10, 0, 0, 1].into());
        let y = IpAddr::V4([10, 0, 0, 2].into());
        let p1 = l.try_acquire(x).ok();
        let p2 = l.try_acquire(x).ok();
        assert!(p1.is_some() && p2.is_some());
        assert_eq!(l.try_acquire(x).err(), Some(Refusal::PerIpCap));
        let p3 = l.try_acquire(y).ok();
        assert!(p3.is_some());
        assert_eq!(l.try_acquire(y).err(), Some(Refusal::ConnectionCap));
        drop(p1);
        assert!(l.try_acquire(x).is_ok());
        drop((p2, p3));
        assert_eq!(l.open(), 0);
    }
}
