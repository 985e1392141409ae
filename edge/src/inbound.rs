//! The client's byte stream before hyper sees it, sans I/O: strict CRLF in request heads,
//! request framing, the total request deadline and the minimum body rate. No sockets, no
//! clock of its own: [`crate::conn::GuardedIo`] feeds it the bytes read from a client with
//! the time they arrived and tells it when the edge starts waiting on the client.
//!
//! What it owns:
//! * **Heads are held until complete.** Bytes of a request head are kept here (up to the
//!   head size limit plus slack) and handed on only once the blank line ending the head has
//!   arrived and every line of it ended in CRLF. A bare LF or a bare CR anywhere in a head
//!   (request line, header lines, the blank line, empty lines before the request line) is
//!   [`Refusal::BareLf`]; since the head was never handed on, the edge can still answer 400.
//! * **Framing is the same as hyper's**, so the next head is found where hyper will look for
//!   it: `Transfer-Encoding` whose last coding is `chunked` (wins over `Content-Length`),
//!   else `Content-Length` (repeats must agree), else no body. Anything hyper would refuse
//!   (another transfer coding, a bad length, an unparsable head) is [`Refusal::BadFraming`].
//!   Chunked bodies are checked as they pass (CRLF after every size line, chunk and trailer
//!   line); body bytes themselves are passed on without being held or copied.
//! * **A request asking for a protocol switch** (`Upgrade`, or `CONNECT`) ends inspection:
//!   the rest of the connection is opaque (spliced bytes). The server closes a connection
//!   whose upgrade was not granted, so no further request is read unchecked.
//! * **Deadlines.** A request's clock starts at the first byte of its head. The whole request
//!   (head and body) must have arrived within the request timeout ([`Refusal::RequestDeadline`]).
//!   The body must arrive at least at the minimum rate: after a grace period, in every window
//!   of *time the edge spent waiting on the client* at least `rate × window` bytes must come
//!   ([`Refusal::BodyTooSlow`]). Time the edge does not read (because the app is slow to take
//!   the body) is not counted against the client's rate.
//!
//! Invariants: every byte fed is either handed on exactly once, in order, or the stream has
//! been cut; after a cut nothing more is handed on; no input makes it panic (fuzzed by
//! `edge/fuzz/fuzz_targets/inbound.rs`).

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use crate::metrics::Refusal;

/// Longest chunk-size line (size, extensions) accepted in a request body.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields accepted in a chunked request body.
const MAX_TRAILERS: usize = 16 * 1024;
/// Bytes past the configured head limit a held head may grow to before it is handed to hyper
/// as is (hyper then answers 431 and closes).
const HEAD_SLACK: usize = 1024;

/// The limits [`Inbound`] enforces.
#[derive(Clone, Copy, Debug)]
pub struct InboundLimits {
    /// Largest request head hyper accepts (`--max-header-bytes`).
    pub max_head: usize,
    /// Most header fields hyper accepts (`--max-headers`).
    pub max_headers: usize,
    /// Head and body of one request must arrive within this; `None`: no deadline.
    pub request_timeout: Option<Duration>,
    /// Minimum body rate in bytes per second; 0: none.
    pub min_body_rate: u64,
    /// Length of one rate window (waiting time).
    pub rate_window: Duration,
    /// Waiting time at the start of a body before the rate is checked.
    pub rate_grace: Duration,
}

/// What the front of the bytes passed to [`Inbound::scan`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// This many bytes are to be handed on as they are (body or opaque bytes).
    Pass(usize),
    /// This many bytes were taken into the held head; nothing to hand on yet.
    Held(usize),
    /// This many bytes completed the held head: hand on [`Inbound::take_head`].
    Head(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line: bytes so far, size so far, still in the hex digits, CR seen.
    Size {
        len: usize,
        size: u64,
        digits: u8,
        in_digits: bool,
        cr: bool,
    },
    /// This many bytes of chunk data remain.
    Data(u64),
    /// Expecting the CR, then the LF, after chunk data.
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines (this many bytes of trailers, this many in the
    /// current line, CR seen) until an empty line.
    Trailers {
        total: usize,
        line: usize,
        cr: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a head: bytes in the current line (without CR), CR seen, non-empty lines so far.
    Head { line: usize, cr: bool, lines: usize },
    /// This many body bytes remain.
    Length(u64),
    /// In a chunked body.
    Chunked(Chunk),
    /// Not inspected any more (after an upgrade request, or a head handed to hyper to refuse).
    Opaque,
    /// Cut: nothing more is handed on.
    Cut(Refusal),
}

/// The clock of the request in progress.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// When the request must have fully arrived.
    deadline: Option<Instant>,
    /// Rate bookkeeping, once the body has started.
    rate: Option<Rate>,
}

#[derive(Debug, Clone, Copy)]
struct Rate {
    /// Waiting time left in the grace period.
    grace_left: Duration,
    /// Waiting time in the current window.
    waited: Duration,
    /// Body bytes received in the current window (after the grace period).
    bytes: u64,
}

/// The inspection state of one client connection.
#[derive(Debug)]
pub struct Inbound {
    limits: InboundLimits,
    state: State,
    head: Vec<u8>,
    heads: u64,
    clock: Option<Clock>,
    waiting_since: Option<Instant>,
}

impl Inbound {
    /// A connection about to send its first request.
    pub fn new(limits: InboundLimits) -> Self {
        Inbound {
            limits,
            state: State::Head {
                line: 0,
                cr: false,
                lines: 0,
            },
            head: Vec::new(),
            heads: 0,
            clock: None,
            waiting_since: None,
        }
    }

    /// Request heads handed on so far.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// Whether a head is being held (not yet handed on): a refusal can still be answered.
    pub fn holding_head(&self) -> bool {
        matches!(self.state, State::Head { .. })
    }

    /// Why the stream was cut, if it was.
    pub fn cut(&self) -> Option<Refusal> {
        match self.state {
            State::Cut(r) => Some(r),
            _ => None,
        }
    }

    /// The completed head, to be handed on (after [`Scan::Head`]).
    pub fn take_head(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.head)
    }

    /// Appends the completed head to `out` (after [`Scan::Head`]), keeping the buffer for the
    /// next head.
    pub fn move_head_into(&mut self, out: &mut bytes::BytesMut) {
        out.extend_from_slice(&self.head);
        self.head.clear();
        if self.head.capacity() > 4096 {
            // Do not keep a large head's buffer for an idle keep-alive connection.
            self.head = Vec::new();
        }
    }

    /// The edge starts waiting for bytes from the client at `now` (a read found none).
    pub fn waiting(&mut self, now: Instant) {
        if self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
    }

    /// When [`Inbound::check`] should next be called if no bytes arrive, while waiting.
    pub fn next_check(&self, now: Instant) -> Option<Instant> {
        let clock = self.clock?;
        let mut at = clock.deadline;
        if let (Some(rate), Some(since)) = (clock.rate, self.waiting_since) {
            if self.limits.min_body_rate > 0 {
                let waited_now = now.saturating_duration_since(since);
                let needed = rate.grace_left + self.limits.rate_window.saturating_sub(rate.waited);
                let due = now + needed.saturating_sub(waited_now);
                at = Some(at.map_or(due, |d| d.min(due)));
            }
        }
        at
    }

    /// Applies the deadlines at `now`; `Err` cuts the stream.
    pub fn check(&mut self, now: Instant) -> Result<(), Refusal> {
        if let State::Cut(r) = self.state {
            return Err(r);
        }
        let Some(mut clock) = self.clock else {
            return Ok(());
        };
        if let Some(since) = self.waiting_since {
            // Still waiting: the time since the last accounting counts, and so on from now.
            self.waiting_since = Some(now);
            if let Some(rate) = clock.rate.as_mut() {
                let waited = now.saturating_duration_since(since);
                self.advance_rate(rate, waited)?;
            }
            self.clock = Some(clock);
        }
        if clock.deadline.is_some_and(|d| now >= d) {
            return Err(self.cut_with(Refusal::RequestDeadline));
        }
        Ok(())
    }

    fn advance_rate(&mut self, rate: &mut Rate, mut waited: Duration) -> Result<(), Refusal> {
        if self.limits.min_body_rate == 0 {
            return Ok(());
        }
        let grace = waited.min(rate.grace_left);
        rate.grace_left -= grace;
        waited -= grace;
        rate.waited += waited;
        let window = self.limits.rate_window.max(Duration::from_millis(1));
        while rate.waited >= window {
            let need = (self.limits.min_body_rate as f64 * window.as_secs_f64()).ceil() as u64;
            if rate.bytes < need {
                return Err(self.cut_with(Refusal::BodyTooSlow));
            }
            rate.waited -= window;
            rate.bytes = 0;
        }
        Ok(())
    }

    fn cut_with(&mut self, reason: Refusal) -> Refusal {
        self.state = State::Cut(reason);
        self.head.clear();
        self.clock = None;
        reason
    }

    /// Takes bytes from the front of `data` (non-empty), which arrived at `now`.
    pub fn scan(&mut self, now: Instant, data: &[u8]) -> Result<Scan, Refusal> {
        if data.is_empty() {
            return Ok(Scan::Pass(0));
        }
        if let Some(since) = self.waiting_since.take() {
            if let Some(mut clock) = self.clock {
                if let Some(rate) = clock.rate.as_mut() {
                    self.advance_rate(rate, now.saturating_duration_since(since))?;
                }
                self.clock = Some(clock);
            }
        }
        if let Some(clock) = self.clock {
            if clock.deadline.is_some_and(|d| now >= d) {
                return Err(self.cut_with(Refusal::RequestDeadline));
            }
        }
        match self.state {
            State::Cut(r) => Err(r),
            State::Opaque => Ok(Scan::Pass(data.len())),
            State::Head { .. } => self.scan_head(now, data),
            State::Length(n) => {
                let take = clamp(n, data.len());
                let left = n - take as u64;
                self.count_body(take);
                if left == 0 {
                    self.request_done();
                } else {
                    self.state = State::Length(left);
                }
                Ok(Scan::Pass(take))
            }
            State::Chunked(chunk) => self.scan_chunked(chunk, data),
        }
    }

    fn count_body(&mut self, n: usize) {
        if let Some(rate) = self.clock.as_mut().and_then(|c| c.rate.as_mut()) {
            if rate.grace_left.is_zero() {
                rate.bytes = rate.bytes.saturating_add(n as u64);
            }
        }
    }

    fn request_done(&mut self) {
        self.state = State::Head {
            line: 0,
            cr: false,
            lines: 0,
        };
        self.clock = None;
    }

    fn scan_head(&mut self, now: Instant, data: &[u8]) -> Result<Scan, Refusal> {
        let State::Head {
            mut line,
            mut cr,
            mut lines,
        } = self.state
        else {
            return Ok(Scan::Pass(0));
        };
        if self.clock.is_none() {
            self.clock = Some(Clock {
                deadline: self.limits.request_timeout.map(|t| now + t),
                rate: None,
            });
        }
        let room = (self.limits.max_head + HEAD_SLACK).saturating_sub(self.head.len());
        for (i, &b) in data.iter().enumerate() {
            if i >= room {
                // Too large for hyper anyway: hand it over as is; hyper answers 431 and closes.
                self.head.extend_from_slice(&data[..i]);
                self.state = State::Opaque;
                self.clock = None;
                self.heads += 1;
                return Ok(Scan::Head(i));
            }
            match b {
                b'\r' if cr => return Err(self.cut_with(Refusal::BareLf)),
                b'\r' => cr = true,
                b'\n' if !cr => return Err(self.cut_with(Refusal::BareLf)),
                b'\n' => {
                    cr = false;
                    if line > 0 {
                        lines += 1;
                        line = 0;
                    } else if lines > 0 {
                        // The blank line: the head is complete.
                        self.head.extend_from_slice(&data[..=i]);
                        self.head_complete()?;
                        self.heads += 1;
                        return Ok(Scan::Head(i + 1));
                    }
                }
                _ if cr => return Err(self.cut_with(Refusal::BareLf)),
                _ => line += 1,
            }
        }
        self.head.extend_from_slice(data);
        self.state = State::Head { line, cr, lines };
        Ok(Scan::Held(data.len()))
    }

    /// Works out the framing of the held, complete head.
    fn head_complete(&mut self) -> Result<(), Refusal> {
        // The fields on the stack for the usual limit (no allocation per request).
        const ON_STACK: usize = 128;
        let n = self.limits.max_headers.clamp(1, 1024);
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; ON_STACK];
        let mut heap;
        let fields: &mut [MaybeUninit<httparse::Header<'_>>] = if n <= ON_STACK {
            &mut stack[..n]
        } else {
            heap = vec![MaybeUninit::uninit(); n];
            &mut heap
        };
        let mut req = httparse::Request::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, &self.head, fields);
        match parsed {
            Ok(httparse::Status::Complete(_)) => {}
            Err(httparse::Error::TooManyHeaders) => {
                // hyper answers 431 and closes.
                self.state = State::Opaque;
                return Ok(());
            }
            _ => return Err(self.cut_with(Refusal::BadFraming)),
        }
        let upgrade = req.method == Some("CONNECT")
            || req
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
        let mut coding: Option<Vec<u8>> = None;
        let mut length: Option<u64> = None;
        let mut bad_length = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if !token.is_empty() {
                        coding = Some(token.to_ascii_lowercase());
                    }
                }
                if coding.is_none() {
                    bad_length = true;
                }
            } else if h.name.eq_ignore_ascii_case("content-length") {
                for part in h.value.split(|b| *b == b',') {
                    match parse_decimal(part.trim_ascii()) {
                        Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                        _ => bad_length = true,
                    }
                }
            }
        }
        let http10 = req.version == Some(0);
        let state = match coding {
            Some(c) if c == b"chunked" && !http10 => State::Chunked(Chunk::Size {
                len: 0,
                size: 0,
                digits: 0,
                in_digits: true,
                cr: false,
            }),
            Some(_) => return Err(self.cut_with(Refusal::BadFraming)),
            None if bad_length => return Err(self.cut_with(Refusal::BadFraming)),
            None => match length {
                Some(n) if n > 0 => State::Length(n),
                _ => State::Head {
                    line: 0,
                    cr: false,
                    lines: 0,
                },
            },
        };
        if upgrade {
            self.state = State::Opaque;
            self.clock = None;
            return Ok(());
        }
        self.state = state;
        if matches!(self.state, State::Head { .. }) {
            self.clock = None;
        } else if let Some(clock) = self.clock.as_mut() {
            clock.rate = Some(Rate {
                grace_left: self.limits.rate_grace,
                waited: Duration::ZERO,
                bytes: 0,
            });
        }
        Ok(())
    }

    fn scan_chunked(&mut self, mut chunk: Chunk, data: &[u8]) -> Result<Scan, Refusal> {
        if let Chunk::Data(n) = chunk {
            let take = clamp(n, data.len());
            let left = n - take as u64;
            self.count_body(take);
            self.state = State::Chunked(if left == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data(left)
            });
            return Ok(Scan::Pass(take));
        }
        // Framing bytes: checked one by one until data starts or the body ends. Bytes before
        // a bad one are handed on first, so the outcome does not depend on how reads split.
        for (i, &b) in data.iter().enumerate() {
            match chunk_step(chunk, b) {
                Ok(Step::Next(next)) => chunk = next,
                Ok(Step::Data) => {
                    self.state = State::Chunked(chunk);
                    self.count_body(i);
                    return Ok(Scan::Pass(i));
                }
                Ok(Step::End) => {
                    self.count_body(i + 1);
                    self.request_done();
                    return Ok(Scan::Pass(i + 1));
                }
                Err(_) if i > 0 => {
                    self.state = State::Chunked(chunk);
                    self.count_body(i);
                    return Ok(Scan::Pass(i));
                }
                Err(reason) => return Err(self.cut_with(reason)),
            }
        }
        self.count_body(data.len());
        self.state = State::Chunked(chunk);
        Ok(Scan::Pass(data.len()))
    }
}

/// What one framing byte of a chunked body does.
enum Step {
    /// The framing continues in this state.
    Next(Chunk),
    /// Chunk data starts at this byte (not consumed).
    Data,
    /// This byte ended the body.
    End,
}

fn chunk_step(chunk: Chunk, b: u8) -> Result<Step, Refusal> {
    Ok(Step::Next(match chunk {
        Chunk::Data(_) => return Ok(Step::Data),
        Chunk::DataCr if b == b'\r' => Chunk::DataLf,
        Chunk::DataLf if b == b'\n' => Chunk::Size {
            len: 0,
            size: 0,
            digits: 0,
            in_digits: true,
            cr: false,
        },
        Chunk::DataCr | Chunk::DataLf => return Err(framing_refusal(b)),
        Chunk::Size {
            len,
            size,
            digits,
            in_digits,
            cr,
        } => match b {
            b'\n' if cr && digits > 0 => {
                if size == 0 {
                    Chunk::Trailers {
                        total: 0,
                        line: 0,
                        cr: false,
                    }
                } else {
                    Chunk::Data(size)
                }
            }
            b'\n' if !cr => return Err(Refusal::BareLf),
            _ if cr => return Err(Refusal::BadFraming),
            b'\r' => Chunk::Size {
                len,
                size,
                digits,
                in_digits: false,
                cr: true,
            },
            _ if len + 1 > MAX_CHUNK_LINE => return Err(Refusal::BadFraming),
            _ if in_digits && b.is_ascii_hexdigit() => {
                if digits >= 16 {
                    return Err(Refusal::BadFraming);
                }
                let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                Chunk::Size {
                    len: len + 1,
                    size: (size << 4) | d,
                    digits: digits + 1,
                    in_digits,
                    cr,
                }
            }
            b' ' | b'\t' | b';' if digits > 0 => Chunk::Size {
                len: len + 1,
                size,
                digits,
                in_digits: false,
                cr,
            },
            _ if !in_digits && b != 0x7f && (b >= 0x20 || b == b'\t') => Chunk::Size {
                len: len + 1,
                size,
                digits,
                in_digits,
                cr,
            },
            _ => return Err(Refusal::BadFraming),
        },
        Chunk::Trailers { total, line, cr } => match b {
            b'\n' if cr && line == 0 => return Ok(Step::End),
            b'\n' if cr => Chunk::Trailers {
                total,
                line: 0,
                cr: false,
            },
            b'\n' => return Err(Refusal::BareLf),
            _ if cr => return Err(framing_refusal(b)),
            _ if total + 1 > MAX_TRAILERS => return Err(Refusal::BadFraming),
            b'\r' => Chunk::Trailers {
                total: total + 1,
                line,
                cr: true,
            },
            _ => Chunk::Trailers {
                total: total + 1,
                line: line + 1,
                cr,
            },
        },
    }))
}

fn framing_refusal(b: u8) -> Refusal {
    if b == b'\n' {
        Refusal::BareLf
    } else {
        Refusal::BadFraming
    }
}

fn clamp(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
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

/// Feeds `data` whole through `inbound` at `now` and returns the bytes handed on, or the
/// refusal (with the bytes handed on before it). For tests and the fuzz target.
pub fn feed_all(
    inbound: &mut Inbound,
    now: Instant,
    mut data: &[u8],
) -> (Vec<u8>, Option<Refusal>) {
    let mut out = Vec::new();
    while !data.is_empty() {
        match inbound.scan(now, data) {
            Ok(Scan::Pass(n)) => {
                out.extend_from_slice(&data[..n]);
                data = &data[n..];
            }
            Ok(Scan::Held(n)) => data = &data[n..],
            Ok(Scan::Head(n)) => {
                out.extend_from_slice(&inbound.take_head());
                data = &data[n..];
            }
            Err(r) => return (out, Some(r)),
        }
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> InboundLimits {
        InboundLimits {
            max_head: 16 * 1024,
            max_headers: 100,
            request_timeout: Some(Duration::from_secs(10)),
            min_body_rate: 100,
            rate_window: Duration::from_secs(1),
            rate_grace: Duration::from_secs(1),
        }
    }

    fn run(input: &[u8]) -> (Vec<u8>, Option<Refusal>) {
        let mut ib = Inbound::new(limits());
        feed_all(&mut ib, Instant::now(), input)
    }

    #[test]
    fn crlf_requests_pass_whole_and_in_any_split() {
        let input: &[u8] = b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe\nlo\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3;ext=1\r\na\nb\r\n0\r\nX-T: 1\r\n\r\n\
GET /d HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\n\nraw\rbytes";
        let (out, cut) = run(input);
        assert_eq!((out.as_slice(), cut), (input, None));
        for step in 1..40 {
            let mut ib = Inbound::new(limits());
            let now = Instant::now();
            let mut out = Vec::new();
            for piece in input.chunks(step) {
                let (o, cut) = feed_all(&mut ib, now, piece);
                assert_eq!(cut, None, "step {step}");
                out.extend(o);
            }
            assert_eq!(out, input, "step {step}");
            assert_eq!(ib.heads(), 4);
        }
    }

    #[test]
    fn bare_lf_or_cr_in_a_head_is_refused_before_anything_is_handed_on() {
        for bad in [
            &b"GET / HTTP/1.1\nHost: x\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\n",
            b"\nGET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\rY: 1\r\n\r\n",
        ] {
            let mut ib = Inbound::new(limits());
            let (out, cut) = feed_all(&mut ib, Instant::now(), bad);
            assert_eq!((out.len(), cut), (0, Some(Refusal::BareLf)), "{bad:?}");
            assert!(ib.scan(Instant::now(), b"x").is_err(), "stays cut");
        }
        // The second of two pipelined requests: the first is handed on, then the cut.
        let (out, cut) = run(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\nA: b\n\r\n");
        assert_eq!(out, b"GET /1 HTTP/1.1\r\n\r\n");
        assert_eq!(cut, Some(Refusal::BareLf));
    }

    #[test]
    fn bodies_are_framed_like_hyper_and_bad_framing_is_refused() {
        // Bytes after a body that look like a bad head are a bad head.
        let (_, cut) = run(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET / HTTP/1.1\n\n");
        assert_eq!(cut, Some(Refusal::BareLf));
        let mut ib = Inbound::new(limits());
        let (_, cut) = feed_all(
            &mut ib,
            Instant::now(),
            b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
        );
        assert_eq!(cut, Some(Refusal::BadFraming));
        assert_eq!(ib.heads(), 1, "a refused head is not counted as handed on");
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 2, 3\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXY",
            b"G@T / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(run(bad).1, Some(Refusal::BadFraming), "{bad:?}");
        }
        assert_eq!(
            run(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\na\r\n").1,
            Some(Refusal::BareLf)
        );
        assert_eq!(
            run(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nT: 1\n\r\n")
                .1,
            Some(Refusal::BareLf)
        );
    }

    #[test]
    fn a_trickled_body_is_cut_after_grace_and_a_window() {
        let mut ib = Inbound::new(limits());
        let t0 = Instant::now();
        let (_, cut) = feed_all(
            &mut ib,
            t0,
            b"POST / HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
        );
        assert_eq!(cut, None);
        let mut t = t0;
        let mut result = Ok(());
        for _ in 0..10 {
            ib.waiting(t);
            let due = ib.next_check(t).unwrap();
            assert!(due > t);
            t += Duration::from_millis(700);
            if t >= due {
                result = ib.check(due);
                if result.is_err() {
                    break;
                }
            }
            if let Err(r) = ib.scan(t, b"x") {
                result = Err(r);
                break;
            }
        }
        assert_eq!(result, Err(Refusal::BodyTooSlow));
    }

    #[test]
    fn a_fast_body_passes_and_time_not_waiting_does_not_count() {
        let mut ib = Inbound::new(InboundLimits {
            request_timeout: Some(Duration::from_secs(60)),
            ..limits()
        });
        let t0 = Instant::now();
        feed_all(
            &mut ib,
            t0,
            b"POST / HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
        );
        let mut t = t0;
        for _ in 0..50 {
            // The edge does not read for 5 s (app backpressure), then finds 150 bytes waiting
            // after 0.5 s of waiting.
            t += Duration::from_secs(5);
            ib.waiting(t);
            t += Duration::from_millis(500);
            assert!(ib.check(t).is_ok());
            assert_eq!(ib.scan(t, &[b'x'; 150]), Ok(Scan::Pass(150)));
            if t > t0 + Duration::from_secs(40) {
                break;
            }
        }
        // ...but the request deadline is real time.
        assert_eq!(
            ib.check(t0 + Duration::from_secs(60)),
            Err(Refusal::RequestDeadline)
        );
    }

    #[test]
    fn a_trickled_head_hits_the_request_deadline() {
        let mut ib = Inbound::new(limits());
        let t0 = Instant::now();
        assert_eq!(ib.next_check(t0), None, "no clock between requests");
        assert_eq!(ib.scan(t0, b"GET / HT"), Ok(Scan::Held(8)));
        ib.waiting(t0);
        assert_eq!(ib.next_check(t0), Some(t0 + Duration::from_secs(10)));
        assert_eq!(
            ib.scan(t0 + Duration::from_secs(10), b"T"),
            Err(Refusal::RequestDeadline)
        );
        assert!(ib.cut().is_some());
    }
}
