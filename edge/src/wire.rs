//! HTTP/1.1 to apps, sans I/O: the request head the edge writes, the response head it parses,
//! and the response body framing (RFC 9112 §6). No sockets, no clock: [`crate::fetch`] moves
//! the bytes.
//!
//! Only requests without a body take this path (the common GET); requests with a body, and
//! upgrades, go through hyper's client. Invariants:
//! * a response head is parsed whole or not at all; a head larger than [`MAX_HEAD`] bytes or
//!   with more than [`MAX_HEADERS`] fields is refused (the caller answers 502);
//! * header values are slices of the one buffer holding the head (no copy per header);
//! * the framing follows §6.3: no body for `HEAD` and 1xx/204/304; `Transfer-Encoding` with
//!   `chunked` last wins over `Content-Length` (which is then removed); other transfer
//!   codings and a missing length read until the app closes; differing or malformed
//!   `Content-Length` values are an error (a smuggling vector, not a guess);
//! * a connection is reusable only after an HTTP/1.1 response without `Connection: close`
//!   whose body framing ended cleanly with no bytes left over.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode};
use thiserror::Error;

/// Largest response head accepted from an app.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most response header fields accepted from an app.
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields accepted (they are read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// Why an app's response cannot be relayed.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum CodecError {
    /// The head is not valid HTTP/1.x.
    #[error("invalid response head")]
    Head,
    /// The head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] fields.
    #[error("response head too large")]
    HeadTooLarge,
    /// `101 Switching Protocols` to a request that did not ask for an upgrade.
    #[error("unexpected protocol switch")]
    UnexpectedSwitch,
    /// `Content-Length` is malformed or given twice with different values.
    #[error("invalid content-length")]
    ContentLength,
    /// A chunk-size line or chunk delimiter is malformed or too long.
    #[error("invalid chunked encoding")]
    Chunked,
    /// The app closed the connection before the body's declared end.
    #[error("response body ended early")]
    Truncated,
}

/// Appends the head of a bodyless request: request line, `Host`, then `fields` in order
/// (a `Host` among them is skipped), then `Content-Length: 0` for methods that usually carry a
/// body (when `fields` has none), so the app never waits for one.
pub fn encode_request<'a>(
    buf: &mut BytesMut,
    method: &Method,
    target: &str,
    host: &HeaderValue,
    fields: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    buf.reserve(512 + target.len());
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.extend_from_slice(b" ");
    buf.extend_from_slice(target.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    buf.extend_from_slice(host.as_bytes());
    buf.extend_from_slice(b"\r\n");
    let mut has_length = false;
    for (name, value) in fields {
        if name == HOST {
            continue;
        }
        has_length |= name == CONTENT_LENGTH;
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    let bodyless_method = matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    if !bodyless_method && !has_length {
        buf.extend_from_slice(b"content-length: 0\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status (never 1xx: interim responses are skipped).
    pub status: StatusCode,
    /// Every header field as sent (hop-by-hop ones included; the proxy strips them).
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub framing: Framing,
    /// The connection may carry another request once the body has ended cleanly.
    pub keep_alive: bool,
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the app closes the connection.
    UntilClose,
}

/// Parses a response head from the front of `buf`, consuming it (and any interim 1xx
/// responses before it). `Ok(None)`: more bytes are needed. `head_request`: the request was
/// `HEAD`, so the response has no body whatever its headers say.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, CodecError> {
    loop {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(CodecError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(CodecError::HeadTooLarge),
            Err(_) => return Err(CodecError::Head),
        };
        if len > MAX_HEAD {
            return Err(CodecError::HeadTooLarge);
        }
        let code = resp.code.ok_or(CodecError::Head)?;
        let status = StatusCode::from_u16(code).map_err(|_| CodecError::Head)?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(CodecError::UnexpectedSwitch);
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let http11 = resp.version == Some(1);
        let count = resp.headers.len();
        // Header offsets into the head, so the values can be slices of one frozen buffer.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let base = buf.as_ptr() as usize;
        for (span, field) in spans.iter_mut().zip(resp.headers.iter()) {
            // Offsets and lengths are below MAX_HEAD, so they fit in u32.
            let at = |p: *const u8| (p as usize - base) as u32;
            *span = (
                at(field.name.as_ptr()),
                field.name.len() as u32,
                at(field.value.as_ptr()),
                field.value.len() as u32,
            );
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for &(name, name_len, value, value_len) in &spans[..count] {
            let (name, name_len) = (name as usize, name_len as usize);
            let (value, value_len) = (value as usize, value_len as usize);
            let name = HeaderName::from_bytes(&head[name..name + name_len])
                .map_err(|_| CodecError::Head)?;
            let value = HeaderValue::from_maybe_shared(head.slice(value..value + value_len))
                .map_err(|_| CodecError::Head)?;
            headers.append(name, value);
        }
        return finish_head(status, headers, http11, head_request).map(Some);
    }
}

/// Works out framing and reuse from the parsed fields.
fn finish_head(
    status: StatusCode,
    mut headers: HeaderMap,
    http11: bool,
    head_request: bool,
) -> Result<ResponseHead, CodecError> {
    let close = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"));
    let chunked = last_transfer_coding(&headers).map(|last| last.eq_ignore_ascii_case("chunked"));
    let bodyless =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = match chunked {
        _ if bodyless => {
            // The length fields describe the body a GET would get; keep them for the client.
            Framing::Empty
        }
        Some(true) => {
            headers.remove(CONTENT_LENGTH);
            Framing::Chunked
        }
        Some(false) => {
            headers.remove(CONTENT_LENGTH);
            Framing::UntilClose
        }
        None => match content_length(&headers)? {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        },
    };
    let keep_alive = http11 && !close && framing != Framing::UntilClose;
    Ok(ResponseHead {
        status,
        headers,
        framing,
        keep_alive,
    })
}

/// The last transfer coding named by the `Transfer-Encoding` fields, if any.
fn last_transfer_coding(headers: &HeaderMap) -> Option<&str> {
    let mut last = None;
    for value in headers.get_all(TRANSFER_ENCODING) {
        // A field that is not text is still a transfer coding we do not know.
        let text = value.to_str().unwrap_or("unknown");
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            last = Some(token);
        }
    }
    last
}

/// The one `Content-Length` value (repeats must agree), or `None` when absent.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, CodecError> {
    let mut found = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let n = parse_decimal(trim_ows(part)).ok_or(CodecError::ContentLength)?;
            if found.is_some_and(|f| f != n) {
                return Err(CodecError::ContentLength);
            }
            found = Some(n);
        }
    }
    Ok(found)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, b| {
        let digit = (*b as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Takes body bytes out of the read buffer according to the framing.
///
/// Call order: [`Decoder::decode`] until it returns `Ok(None)`; then, unless
/// [`Decoder::is_done`], read more into the buffer and repeat; on end of input call
/// [`Decoder::eof`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoder {
    /// This many body bytes remain.
    Length(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Everything until the app closes.
    UntilClose,
    /// The body has ended.
    Done,
}

/// Where a chunked decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer fields (this many bytes seen) until an empty line.
    Trailers(usize),
}

impl Decoder {
    /// The decoder for a body with `framing`.
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(Chunk::Size),
            Framing::UntilClose => Decoder::UntilClose,
        }
    }

    /// The body has ended.
    pub fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// Body bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of body data from the front of `buf`, or `Ok(None)` when `buf` holds no
    /// more (or the body has ended: see [`Decoder::is_done`]).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        loop {
            match self {
                Decoder::Done => return Ok(None),
                Decoder::Length(remaining) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = clamp_len(*remaining, buf.len());
                    *remaining -= take as u64;
                    let data = buf.split_to(take).freeze();
                    if *remaining == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Some(data));
                }
                Decoder::UntilClose => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                Decoder::Chunked(state) => match *state {
                    Chunk::Size => {
                        let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                            return Ok(None);
                        };
                        let size = parse_chunk_size(&line)?;
                        *state = if size == 0 {
                            Chunk::Trailers(0)
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(remaining) => {
                        if buf.is_empty() {
                            return Ok(None);
                        }
                        let take = clamp_len(remaining, buf.len());
                        let left = remaining - take as u64;
                        *state = if left == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left)
                        };
                        return Ok(Some(buf.split_to(take).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(None);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(CodecError::Chunked);
                        }
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers(seen) => {
                        let Some(line) = take_line(buf, MAX_TRAILERS - seen)? else {
                            return Ok(None);
                        };
                        if line.is_empty() {
                            *self = Decoder::Done;
                        } else {
                            *state = Chunk::Trailers(seen + line.len() + 2);
                        }
                    }
                },
            }
        }
    }

    /// The app closed the connection: fine for a read-until-close body, an error for a body
    /// that has not reached its declared end.
    pub fn eof(&mut self) -> Result<(), CodecError> {
        match self {
            Decoder::UntilClose | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(CodecError::Truncated),
        }
    }
}

fn clamp_len(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

/// Takes one CRLF-terminated line (without the CRLF) off the front of `buf`; `Ok(None)` when
/// no complete line is there yet; an error past `limit` bytes or on a bare LF.
fn take_line(buf: &mut BytesMut, limit: usize) -> Result<Option<BytesMut>, CodecError> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(lf) if lf > 0 && buf[lf - 1] == b'\r' && lf < limit => {
            let mut line = buf.split_to(lf + 1);
            line.truncate(lf - 1);
            Ok(Some(line))
        }
        Some(_) => Err(CodecError::Chunked),
        None if buf.len() >= limit => Err(CodecError::Chunked),
        None => Ok(None),
    }
}

/// `1*HEXDIG [ BWS ";" extensions ]`: the size, extensions ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, CodecError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(CodecError::Chunked);
    }
    let rest = trim_ows(&line[digits..]);
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(CodecError::Chunked);
    }
    line[..digits].iter().try_fold(0u64, |acc, b| {
        let digit = (*b as char).to_digit(16).ok_or(CodecError::Chunked)?;
        Ok((acc << 4) | u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> (Result<Option<ResponseHead>, CodecError>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let head = parse_response(&mut buf, false);
        (head, buf)
    }

    fn decode_all(framing: Framing, raw: &[u8], step: usize) -> Result<Vec<u8>, CodecError> {
        let mut dec = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in raw.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(data) = dec.decode(&mut buf)? {
                out.extend_from_slice(&data);
            }
        }
        if !dec.is_done() {
            dec.eof()?;
        }
        Ok(out)
    }

    #[test]
    fn request_head_has_host_first_and_a_zero_length_for_body_methods() {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("ignored"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let host = HeaderValue::from_static("127.0.0.1:9");
        let mut buf = BytesMut::new();
        encode_request(&mut buf, &Method::GET, "/p?q=1", &host, &h);
        assert_eq!(
            &buf[..],
            b"GET /p?q=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        buf.clear();
        encode_request(&mut buf, &Method::POST, "/", &host, &HeaderMap::new());
        assert_eq!(
            &buf[..],
            b"POST / HTTP/1.1\r\nhost: 127.0.0.1:9\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn head_is_parsed_after_interim_responses_and_leaves_the_body() {
        let (head, rest) = parse(
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello",
        );
        let head = head.unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        let xa: Vec<_> = head.headers.get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        assert_eq!(&rest[..], b"hello");
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_fail() {
        let (head, rest) = parse(b"HTTP/1.1 200 OK\r\nContent-Le");
        assert!(head.unwrap().is_none());
        assert_eq!(rest.len(), 27, "nothing consumed");
        let mut big = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse(&big).0.unwrap_err(), CodecError::HeadTooLarge);
        assert_eq!(
            parse(b"HTTP/1.1 2000 OK\r\n\r\n").0.unwrap_err(),
            CodecError::Head
        );
        assert_eq!(
            parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
                .0
                .unwrap_err(),
            CodecError::UnexpectedSwitch
        );
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let framing = |raw: &[u8]| parse(raw).0.map(|h| h.map(|h| (h.framing, h.keep_alive)));
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"),
            Ok(Some((Framing::Chunked, true)))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            Ok(Some((Framing::UntilClose, false)))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\n\r\n"),
            Ok(Some((Framing::UntilClose, false)))
        );
        assert_eq!(
            framing(b"HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\n"),
            Ok(Some((Framing::Empty, true)))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"),
            Ok(Some((Framing::Length(3), false)))
        );
        assert_eq!(
            framing(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\n"),
            Ok(Some((Framing::Length(3), false)))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n"),
            Ok(Some((Framing::Length(3), true)))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n"),
            Err(CodecError::ContentLength)
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\n"),
            Err(CodecError::ContentLength)
        );
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n"[..]);
        let head = parse_response(&mut buf, true).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Empty);
        assert_eq!(head.headers.get(CONTENT_LENGTH).unwrap(), "3");
    }

    #[test]
    fn chunked_bodies_decode_at_any_split() {
        let raw = b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nx-sum: 1\r\n\r\n";
        for step in 1..raw.len() {
            assert_eq!(
                decode_all(Framing::Chunked, raw, step).unwrap(),
                b"hello 0123456789",
                "step {step}"
            );
        }
    }

    #[test]
    fn chunked_errors_and_truncation() {
        assert_eq!(
            decode_all(Framing::Chunked, b"zz\r\n", 64),
            Err(CodecError::Chunked)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"3\r\nabcX\r\n", 64),
            Err(CodecError::Chunked)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"3\nabc\r\n", 64),
            Err(CodecError::Chunked)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"11111111111111111\r\n", 64),
            Err(CodecError::Chunked)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"3\r\nab", 64),
            Err(CodecError::Truncated)
        );
        assert_eq!(
            decode_all(Framing::Length(4), b"abc", 64),
            Err(CodecError::Truncated)
        );
        assert_eq!(decode_all(Framing::UntilClose, b"abc", 2).unwrap(), b"abc");
    }

    #[test]
    fn length_bodies_stop_at_their_end() {
        let mut dec = Decoder::new(Framing::Length(3));
        let mut buf = BytesMut::from(&b"abcEXTRA"[..]);
        assert_eq!(dec.decode(&mut buf).unwrap().unwrap(), &b"abc"[..]);
        assert!(dec.is_done());
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"EXTRA");
    }
}
