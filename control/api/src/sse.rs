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

/// Incremental `text/event-stream` decoder: feed it bytes as they arrive, take frames out.
/// Comment lines (keepalives) are skipped; `\n`, `\r\n` and `\r` line ends are accepted.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    current: SseFrame,
    has_data: bool,
}

impl SseDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes` and returns every frame completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseFrame> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                // A lone `\r` at the end of the buffer may be the first half of `\r\n`.
                if b == b'\r' && i + 1 == self.buf.len() {
                    break;
                }
                let line = String::from_utf8_lossy(&self.buf[start..i]).into_owned();
                if b == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                i += 1;
                start = i;
                if let Some(frame) = self.line(&line) {
                    frames.push(frame);
                }
            } else {
                i += 1;
            }
        }
        self.buf.drain(..start);
        frames
    }

    fn line(&mut self, line: &str) -> Option<SseFrame> {
        if line.is_empty() {
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
            frames.extend(dec.feed(chunk));
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
        assert!(dec.feed(b"data: a\r").is_empty());
        let frames = dec.feed(b"\ndata: b\r\n\r\n");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].data, "a\nb");
        assert_eq!(frames[0].event, "message");
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
