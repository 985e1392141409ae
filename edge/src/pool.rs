//! Idle keep-alive connections to apps, per app address.
//!
//! A connection is in the pool only while no request uses it: [`ConnPool::checkout`] takes
//! one out (most recently used first, so few connections stay warm), a response body that
//! ended cleanly puts it back with [`ConnPool::checkin`]. Nothing polls an idle connection;
//! checkout looks at the reactor's readiness instead, and a connection that became readable
//! while idle (the app closed it, or sent bytes nobody asked for) is dropped there without a
//! system call in the common case. [`ConnPool::reap`], run periodically by the edge, closes
//! connections idle longer than the idle timeout.
//!
//! One mutex guards the table; it is held for a vector push or pop, never across I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Most idle connections kept per app address; more are closed when they come back.
const MAX_IDLE_PER_ADDR: usize = 1024;

/// A connection to an app, with the bytes read from it and not yet consumed.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// Read buffer. Empty whenever the connection is idle.
    pub buf: BytesMut,
    /// The app address (the pool key).
    pub addr: SocketAddr,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// Idle connections by app address.
#[derive(Debug)]
pub struct ConnPool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    idle_timeout: Duration,
}

impl ConnPool {
    /// An empty pool whose connections are closed after `idle_timeout` unused.
    pub fn new(idle_timeout: Duration) -> Self {
        ConnPool {
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
        }
    }

    /// An idle connection to `addr` that looks alive, if any.
    pub fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        loop {
            let conn = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.get_mut(&addr)?.pop()?.conn
            };
            if still_open(&conn.stream) {
                return Some(conn);
            }
        }
    }

    /// Returns a connection whose last response ended cleanly.
    pub fn checkin(&self, conn: Conn) {
        debug_assert!(conn.buf.is_empty());
        let since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(conn.addr).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push(Idle { conn, since });
        }
    }

    /// Closes connections idle for longer than the idle timeout at `now`.
    pub fn reap(&self, now: Instant) {
        let expired: Vec<Idle> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let mut expired = Vec::new();
            idle.retain(|_, list| {
                // Oldest first: checkin pushes to the back.
                let keep_from = list
                    .iter()
                    .position(|i| now.saturating_duration_since(i.since) < self.idle_timeout)
                    .unwrap_or(list.len());
                expired.extend(list.drain(..keep_from));
                !list.is_empty()
            });
            expired
        };
        // Sockets close here, outside the lock.
        drop(expired);
    }

    /// Idle connections to `addr` (for tests and metrics).
    pub fn idle_count(&self, addr: SocketAddr) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get(&addr).map_or(0, Vec::len)
    }

    /// Runs [`ConnPool::reap`] every `period` until the task is aborted.
    pub async fn reap_every(self: std::sync::Arc<Self>, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reap(Instant::now());
        }
    }
}

/// Whether an idle connection can carry a request: not readable (nothing arrived while it
/// was idle), or readable but with nothing to read (a stale readiness).
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair(listener: &TcpListener) -> (Conn, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let conn = Conn {
            stream,
            buf: BytesMut::new(),
            addr,
        };
        (conn, server)
    }

    #[tokio::test]
    async fn checkout_skips_connections_the_app_closed_or_wrote_to() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = ConnPool::new(Duration::from_secs(60));
        let (alive, _alive_server) = pair(&listener).await;
        let (closed, closed_server) = pair(&listener).await;
        let (chatty, mut chatty_server) = pair(&listener).await;
        pool.checkin(alive);
        pool.checkin(closed);
        pool.checkin(chatty);
        drop(closed_server);
        chatty_server
            .write_all(b"HTTP/1.1 200 OK\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.idle_count(addr), 3);
        let got = pool.checkout(addr).expect("the live connection");
        assert_eq!(pool.idle_count(addr), 0);
        assert!(pool.checkout(addr).is_none());
        pool.checkin(got);
        assert_eq!(pool.idle_count(addr), 1);
    }

    #[tokio::test]
    async fn reap_closes_connections_idle_past_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = ConnPool::new(Duration::from_secs(10));
        let (a, _sa) = pair(&listener).await;
        pool.checkin(a);
        pool.reap(Instant::now() + Duration::from_secs(5));
        assert_eq!(pool.idle_count(addr), 1);
        pool.reap(Instant::now() + Duration::from_secs(11));
        assert_eq!(pool.idle_count(addr), 0);
    }
}
