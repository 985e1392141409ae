//! # SSE wire format (`GET /v1/mesh/peers/stream`)
//!
//! Standard `text/event-stream` frames, one per event:
//!
//! ```text
//! id: 42
//! event: peer_upsert
//! data: {"peer_id":"…","ula":"fd5a:1f00:…::1",…}
//!
//! ```
//!
//! * `id` is a coordinator-wide, strictly increasing event number. A stream skips the ids
//!   of events it may not see, so ids have gaps.
//! * The first event of every stream is `snapshot` ([`RosterSnapshot`]): the caller's whole
//!   visible roster. Then, in id order: `peer_upsert` ([`RosterEntry`], add or replace by
//!   `peer_id`), `peer_remove` ([`PeerRemove`]), `policy` ([`RosterSnapshot`]: the policy changed;
//!   replace the whole roster with this one) and `hole_punch` ([`HolePunch`]).
//! * A reconnecting client sends `Last-Event-ID: <id>`. If the coordinator still holds every
//!   event after that id (and the policy has not changed since), the stream resumes with
//!   them and no snapshot; otherwise it starts with a fresh `snapshot`. Either way the first
//!   frame tells the client which case it is.
//! * Lines starting with `:` are keepalive comments; ignore them.
//! * A client that reads too slowly to keep up is sent a fresh `snapshot` once it catches up
//!   (or is disconnected if it stops reading altogether).
//!
//! [`SseDecoder`] turns the byte stream back into [`SseFrame`]s and [`SseEvent::parse`]
//! turns a frame into a typed event.

use crate::{HolePunch, PeerRemove, RosterEntry, RosterSnapshot};

/// A typed SSE event.
// A roster entry (with its per-protocol port lists) is several times the size of the other
// variants; events are built once per change and serialized at once, never stored in bulk,
// so boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEvent {
    /// The whole visible roster (first event of a stream, or after falling behind).
    Snapshot(RosterSnapshot),
    /// A peer joined or changed.
    PeerUpsert(RosterEntry),
    /// A peer left.
    PeerRemove(PeerRemove),
    /// The policy changed: the whole roster as the new policy shows it.
    Policy(RosterSnapshot),
    /// Punch a hole towards another NATed peer now.
    HolePunch(HolePunch),
}

/// An SSE `event:` name that this API does not define.
#[derive(Debug, thiserror::Error)]
pub enum SseParseError {
    /// Unknown event name.
    #[error("unknown SSE event {0:?}")]
    UnknownEvent(String),
    /// The data is not the JSON this event carries.
    #[error("bad data for SSE event {event}: {source}")]
    Data {
        /// The event name.
        event: String,
        /// The JSON error.
        source: serde_json::Error,
    },
}

impl SseEvent {
    /// Event name of a snapshot.
    pub const SNAPSHOT: &'static str = "snapshot";
    /// Event name of an upsert.
    pub const PEER_UPSERT: &'static str = "peer_upsert";
    /// Event name of a removal.
    pub const PEER_REMOVE: &'static str = "peer_remove";
    /// Event name of a policy change.
    pub const POLICY: &'static str = "policy";
    /// Event name of a hole punch.
    pub const HOLE_PUNCH: &'static str = "hole_punch";

    /// The `event:` name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            SseEvent::Snapshot(_) => Self::SNAPSHOT,
            SseEvent::PeerUpsert(_) => Self::PEER_UPSERT,
            SseEvent::PeerRemove(_) => Self::PEER_REMOVE,
            SseEvent::Policy(_) => Self::POLICY,
            SseEvent::HolePunch(_) => Self::HOLE_PUNCH,
        }
    }

    /// The `data:` JSON on the wire (one line).
    pub fn data_json(&self) -> String {
        let r = match self {
            SseEvent::Snapshot(s) | SseEvent::Policy(s) => serde_json::to_string(s),
            SseEvent::PeerUpsert(e) => serde_json::to_string(e),
            SseEvent::PeerRemove(e) => serde_json::to_string(e),
            SseEvent::HolePunch(e) => serde_json::to_string(e),
        };
        // These types hold only strings, numbers and addresses: serializing cannot fail.
        r.unwrap_or_else(|_| String::from("{}"))
    }

    /// Parses an event from its `event:` name and `data:` JSON.
    pub fn parse(event: &str, data: &str) -> Result<Self, SseParseError> {
        let err = |source| SseParseError::Data {
            event: event.to_owned(),
            source,
        };
        Ok(match event {
            Self::SNAPSHOT => SseEvent::Snapshot(serde_json::from_str(data).map_err(err)?),
            Self::PEER_UPSERT => SseEvent::PeerUpsert(serde_json::from_str(data).map_err(err)?),
            Self::PEER_REMOVE => SseEvent::PeerRemove(serde_json::from_str(data).map_err(err)?),
            Self::POLICY => SseEvent::Policy(serde_json::from_str(data).map_err(err)?),
            Self::HOLE_PUNCH => SseEvent::HolePunch(serde_json::from_str(data).map_err(err)?),
            other => return Err(SseParseError::UnknownEvent(other.to_owned())),
        })
    }

    /// The whole frame as sent on the wire, ending with the blank line.
    pub fn to_frame(&self, id: u64) -> String {
        format!(
            "id: {id}\nevent: {}\ndata: {}\n\n",
            self.name(),
            self.data_json()
        )
    }
}

/// One decoded `text/event-stream` frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseFrame {
    /// The `id:` field, if the frame had one.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// The largest event [`SseDecoder`] accepts by default: its raw lines (field names and
/// values, line ends excluded). A 10k-peer snapshot is about 3 MiB.
pub const MAX_EVENT_BYTES: usize = 64 << 20;

/// An event grew past the decoder's limit; the decoder dropped it and everything buffered,
/// and the stream should be reconnected (a fresh snapshot follows).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SSE event larger than {limit} bytes")]
pub struct SseTooLarge {
    /// The limit that was passed.
    pub limit: usize,
}

/// Incremental `text/event-stream` decoder: feed it bytes as they arrive, take frames out.
/// Comment lines (keepalives) are skipped; `\n`, `\r\n` and `\r` line ends are accepted.
///
/// Linear: every byte is examined once (a `\r` that ends a chunk twice), however the
/// stream is cut into chunks: the scan resumes where the last chunk's scan stopped.
/// Bounded: an event whose raw lines (plus any partial line) exceed the limit is an
/// [`SseTooLarge`] error, checked after every line and at the end of every feed, so a
/// coordinator (or anyone in the path) cannot make the joiner buffer without end.
#[derive(Debug)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// `buf[..scan]` holds no line end (only a held-back final `\r` is rescanned).
    scan: usize,
    current: SseFrame,
    has_data: bool,
    /// Raw bytes of the current event's complete lines.
    event_bytes: usize,
    limit: usize,
    scanned: u64,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl SseDecoder {
    /// A decoder with nothing buffered and the default limit [`MAX_EVENT_BYTES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that refuses events larger than `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            scan: 0,
            current: SseFrame::default(),
            has_data: false,
            event_bytes: 0,
            limit,
            scanned: 0,
        }
    }

    /// Bytes examined so far (work done, for tests that check the decoder is linear).
    pub fn bytes_scanned(&self) -> u64 {
        self.scanned
    }

    /// Consumes `bytes` and returns every frame completed by them; `Err` when an event
    /// outgrows the limit (the decoder is then empty and ready for a new stream).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseFrame>, SseTooLarge> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut start = 0;
        let mut i = self.scan;
        let mut held_cr = false;
        while i < self.buf.len() {
            self.scanned += 1;
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                // A lone `\r` at the end of the buffer may be the first half of `\r\n`.
                if b == b'\r' && i + 1 == self.buf.len() {
                    held_cr = true;
                    break;
                }
                let line = String::from_utf8_lossy(&self.buf[start..i]).into_owned();
                if b == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                i += 1;
                start = i;
                self.event_bytes += line.len();
                if self.event_bytes > self.limit {
                    return Err(self.overflow());
                }
                if let Some(frame) = self.line(&line) {
                    frames.push(frame);
                }
            } else {
                i += 1;
            }
        }
        self.buf.drain(..start);
        self.scan = i - start;
        let pending = self.buf.len() - usize::from(held_cr);
        if self.event_bytes + pending > self.limit {
            return Err(self.overflow());
        }
        Ok(frames)
    }

    fn overflow(&mut self) -> SseTooLarge {
        let limit = self.limit;
        let scanned = self.scanned;
        *self = Self::with_limit(limit);
        self.scanned = scanned;
        SseTooLarge { limit }
    }

    fn line(&mut self, line: &str) -> Option<SseFrame> {
        if line.is_empty() {
            self.event_bytes = 0;
            let frame = std::mem::take(&mut self.current);
            let had = std::mem::replace(&mut self.has_data, false);
            return had.then(|| SseFrame {
                event: if frame.event.is_empty() {
                    "message".to_owned()
                } else {
                    frame.event
                },
                ..frame
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::entry;

    #[test]
    fn frames_round_trip_through_the_decoder() {
        let events = [
            SseEvent::Snapshot(RosterSnapshot {
                policy_revision: 3,
                peers: vec![entry()],
            }),
            SseEvent::PeerUpsert(entry()),
            SseEvent::PeerRemove(PeerRemove {
                peer_id: "x".into(),
                reason: "expired".into(),
            }),
            SseEvent::HolePunch(HolePunch {
                peer_id: "y".into(),
                public_key: "k".into(),
                endpoint: "[2001:db8::1]:5".parse().unwrap(),
            }),
        ];
        let mut wire = String::from(": keepalive\n\n");
        for (i, e) in events.iter().enumerate() {
            wire.push_str(&e.to_frame(i as u64 + 10));
            wire.push_str(":\n");
        }
        // Feed it in awkward pieces, with CRLF line ends on half of it.
        let wire = wire.replacen('\n', "\r\n", 7);
        let mut dec = SseDecoder::new();
        let mut frames = Vec::new();
        for chunk in wire.as_bytes().chunks(7) {
            frames.extend(dec.feed(chunk).unwrap());
        }
        assert_eq!(frames.len(), events.len());
        for (i, (f, e)) in frames.iter().zip(&events).enumerate() {
            assert_eq!(f.id.as_deref(), Some((i as u64 + 10).to_string().as_str()));
            assert_eq!(&SseEvent::parse(&f.event, &f.data).unwrap(), e);
        }
    }
    #[test]
    fn decoder_joins_multi_line_data_and_splits_cr_lf_across_feeds() {
        let mut dec = SseDecoder::new();
        assert!(dec.feed(b"data: a\r").unwrap().is_empty());
        let frames = dec.feed(b"\ndata: b\r\n\r\n").unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].data, "a\nb");
        assert_eq!(frames[0].event, "message");
    }
    /// Issue 11, "the joiner's SSE decoder rescans its buffer from the start on every chunk":
    /// a 10k-peer snapshot fed in 64-byte chunks is scanned once, not once per chunk.
    #[test]
    fn sse_decoder_scans_a_10k_peer_snapshot_in_small_chunks_linearly() {
        let peers: Vec<RosterEntry> = (0..10_000)
            .map(|n| {
                let mut e = entry();
                e.peer_id = format!("{n:016x}");
                e
            })
            .collect();
        let snap = SseEvent::Snapshot(RosterSnapshot {
            policy_revision: 1,
            peers,
        });
        let wire = format!(": hi\n\n{}", snap.to_frame(1)).replace('\n', "\r\n");
        assert!(wire.len() > 3 << 20, "a realistic size: {}", wire.len());
        let mut dec = SseDecoder::new();
        let mut frames = Vec::new();
        let chunks = wire.as_bytes().chunks(64);
        let n_chunks = chunks.len() as u64;
        for chunk in chunks {
            frames.extend(dec.feed(chunk).unwrap());
        }
        assert_eq!(frames.len(), 1);
        assert_eq!(
            SseEvent::parse(&frames[0].event, &frames[0].data).unwrap(),
            snap
        );
        // Each byte once, plus a `\r` held back at the end of a chunk.
        let len = wire.len() as u64;
        assert!(
            dec.bytes_scanned() <= len + n_chunks,
            "scanned {} bytes of {len}",
            dec.bytes_scanned()
        );
    }

    #[test]
    fn an_event_over_the_limit_is_an_error_and_the_decoder_starts_afresh() {
        let mut dec = SseDecoder::with_limit(100);
        // One endless line, fed in pieces: refused once it passes the limit.
        assert_eq!(dec.feed(&[b'x'; 60]).unwrap(), vec![]);
        assert_eq!(dec.feed(&[b'x'; 60]), Err(SseTooLarge { limit: 100 }));
        // Many small data lines of one event: refused too.
        let mut dec = SseDecoder::with_limit(100);
        let lines = "data: 0123456789\n".repeat(10);
        assert!(dec.feed(lines.as_bytes()).is_err());
        // After the error the decoder takes a new stream.
        let ok = SseEvent::PeerRemove(PeerRemove {
            peer_id: "x".into(),
            reason: "r".into(),
        });
        let frames = dec.feed(ok.to_frame(3).as_bytes()).unwrap();
        assert_eq!(frames.len(), 1);
        // Events under the limit pass, however many.
        let mut dec = SseDecoder::with_limit(100);
        let wire = ok.to_frame(3).repeat(50);
        assert_eq!(dec.feed(wire.as_bytes()).unwrap().len(), 50);
    }

    #[test]
    fn unknown_events_and_bad_data_are_errors() {
        assert!(matches!(
            SseEvent::parse("nope", "{}"),
            Err(SseParseError::UnknownEvent(_))
        ));
        assert!(matches!(
            SseEvent::parse("peer_remove", "{"),
            Err(SseParseError::Data { .. })
        ));
    }
}
