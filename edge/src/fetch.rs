//! Forwarding a request without a body to an app, in the task that serves the client.
//!
//! The common request (a GET) needs no second task: [`Fetcher::send`] takes an idle
//! connection from the [`ConnPool`] (or connects), writes the head [`crate::wire`] encoded,
//! and reads until the response head parses. The returned [`ResponseBody`] owns the
//! connection and decodes the body frame by frame as the client's connection asks for it, so
//! nothing is buffered beyond one read; when the body ends cleanly the connection goes back
//! to the pool, otherwise it is closed.
//!
//! Retry rule: a request on a reused connection that got no byte back (the app closed the
//! idle connection as we wrote) is sent once more on a fresh connection, for idempotent
//! methods only (RFC 9110 §9.2.2). Everything else fails with the error mapped in
//! [`EdgeError`]: connect refused/unreachable → 502, connect timeout → 504, any failure after
//! connecting → 502.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, Version};
use hyper::body::{Body, Frame, SizeHint};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::EdgeError;
use crate::pool::{Conn, ConnPool};
use crate::wire::{self, CodecError, Decoder};

/// Bytes kept free in a connection's read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;
/// Read size once a body is streaming (large downloads move in few system calls).
const BODY_READ_CHUNK: usize = 64 * 1024;

/// Sends bodyless requests over pooled connections.
#[derive(Debug)]
pub struct Fetcher {
    pool: Arc<ConnPool>,
    connect_timeout: Duration,
}

/// Why an exchange on one connection failed.
enum Failed {
    /// Nothing came back: the connection may have been closed while idle.
    Silent,
    /// The app answered with something unusable or broke off mid-head.
    Broken,
}

impl Fetcher {
    /// A fetcher over `pool`, connecting with `connect_timeout`.
    pub fn new(pool: Arc<ConnPool>, connect_timeout: Duration) -> Self {
        Fetcher {
            pool,
            connect_timeout,
        }
    }

    /// Sends the encoded request `head` to `addr` and returns the response with its body
    /// still on the wire.
    pub async fn send(
        &self,
        addr: SocketAddr,
        method: &Method,
        head: &[u8],
    ) -> Result<Response<ResponseBody>, EdgeError> {
        let head_request = *method == Method::HEAD;
        if let Some(conn) = self.pool.checkout(addr) {
            match exchange(conn, head, head_request).await {
                Ok((resp, conn)) => return Ok(self.response(resp, conn)),
                Err(Failed::Silent) if method.is_idempotent() => {
                    tracing::debug!(%addr, "pooled connection closed by the app; retrying");
                }
                Err(_) => return Err(EdgeError::BadGateway),
            }
        }
        let conn = self.connect(addr).await?;
        match exchange(conn, head, head_request).await {
            Ok((resp, conn)) => Ok(self.response(resp, conn)),
            Err(_) => Err(EdgeError::BadGateway),
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, EdgeError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| EdgeError::Timeout)?
            .map_err(|e| {
                tracing::debug!(%addr, error = %e, "connecting to app failed");
                match e.kind() {
                    std::io::ErrorKind::TimedOut => EdgeError::Timeout,
                    _ => EdgeError::Unreachable,
                }
            })?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: bytes::BytesMut::with_capacity(READ_CHUNK),
            addr,
        })
    }

    fn response(&self, head: wire::ResponseHead, conn: Conn) -> Response<ResponseBody> {
        let mut body = ResponseBody {
            conn: Some(conn),
            decoder: Decoder::new(head.framing),
            keep_alive: head.keep_alive,
            pool: self.pool.clone(),
        };
        if body.decoder.is_done() {
            body.release();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.version_mut() = Version::HTTP_11;
        *resp.headers_mut() = head.headers;
        resp
    }
}

/// Writes `head` and reads until a response head parses.
async fn exchange(
    mut conn: Conn,
    head: &[u8],
    head_request: bool,
) -> Result<(wire::ResponseHead, Conn), Failed> {
    if conn.stream.write_all(head).await.is_err() {
        return Err(Failed::Silent);
    }
    let mut received = false;
    loop {
        match wire::parse_response(&mut conn.buf, head_request) {
            Ok(Some(resp)) => return Ok((resp, conn)),
            Ok(None) => {}
            Err(err) => {
                tracing::debug!(addr = %conn.addr, error = %err, "invalid response from app");
                return Err(Failed::Broken);
            }
        }
        if conn.buf.capacity() - conn.buf.len() < READ_CHUNK / 4 {
            conn.buf.reserve(READ_CHUNK);
        }
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(n) if n > 0 => received = true,
            Ok(_) | Err(_) if received => return Err(Failed::Broken),
            Ok(_) | Err(_) => return Err(Failed::Silent),
        }
    }
}

/// Why a response body broke off.
#[derive(Debug, Error)]
pub enum BodyError {
    /// Reading from the app failed.
    #[error("reading the response body: {0}")]
    Io(#[from] std::io::Error),
    /// The body's framing is invalid or it ended early.
    #[error("response body: {0}")]
    Wire(#[from] CodecError),
}

/// A response body read from the app's connection as it is polled.
#[derive(Debug)]
pub struct ResponseBody {
    /// The connection, until the body ends (then pooled or closed).
    conn: Option<Conn>,
    decoder: Decoder,
    keep_alive: bool,
    pool: Arc<ConnPool>,
}

impl ResponseBody {
    /// The body has ended: pool the connection if it can carry another request.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                self.pool.checkin(conn);
            }
        }
    }

    fn fail(&mut self, err: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        tracing::debug!(error = %err, "response body from app broke off");
        self.conn = None;
        Poll::Ready(Some(Err(err)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf) {
                Ok(Some(data)) => {
                    if this.decoder.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.decoder.is_done() => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(err) => return this.fail(err.into()),
            }
            if conn.buf.capacity() - conn.buf.len() < READ_CHUNK {
                conn.buf.reserve(BODY_READ_CHUNK);
            }
            let read = std::pin::pin!(conn.stream.read_buf(&mut conn.buf));
            match std::future::Future::poll(read, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => return this.fail(err.into()),
                Poll::Ready(Ok(0)) => {
                    if let Err(err) = this.decoder.eof() {
                        return this.fail(err.into());
                    }
                    // Read until close: the connection is spent.
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves unread bytes on the connection: close it.
        if self.decoder.is_done() {
            self.release();
        }
    }
}
