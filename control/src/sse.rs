//! Roster streams: what a change dispatches, how each stream picks its frame out of a
//! dispatch, and the per-stream task that writes frames, keepalives and resyncs. The wire
//! format is documented in [`crate::api`].
//!
//! One [`Dispatch`] per change goes to every stream over one broadcast channel. A dispatch
//! holds frames already serialized per visibility class (or per target peer for
//! `hole_punch`, or per class roster for `policy`), so a stream's work per event is an
//! index lookup and a reference-counted copy. A stream that falls more than the channel's
//! capacity behind gets a fresh snapshot; one whose client stops reading for the write
//! timeout is closed, so a slow client costs bounded memory.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::{broadcast, mpsc};

use crate::registry::PolicyFrame;
use crate::visibility::ClassId;

/// One change, ready for every stream.
#[derive(Debug)]
pub struct Dispatch {
    /// Event id.
    pub id: u64,
    /// Policy revision it was computed under.
    pub revision: u64,
    /// Frames by audience.
    pub payload: Payload,
}

/// Who gets which frame of a dispatch.
#[derive(Debug)]
pub enum Payload {
    /// A change to `subject`: `frames[class]` for streams of that class (none = not
    /// visible); the subject's own streams do `action` instead.
    ByClass {
        /// The peer that changed.
        subject: String,
        /// Frame per viewer class.
        frames: Vec<Option<Bytes>>,
        /// What the subject's own streams do.
        action: SubjectAction,
    },
    /// Frames for particular peers (`hole_punch`).
    Targeted(Vec<(String, Bytes)>),
    /// Changes to several peers that take effect together (an app handover: its old
    /// holder's upsert, then its new holder's), each shaped like [`Payload::ByClass`]; a
    /// stream gets the frames it may see concatenated, in order, under one event id.
    Batch(Vec<Payload>),
    /// A policy change: each peer's new class and each class's roster.
    Policy {
        /// Roster per class.
        frames: Vec<Option<Arc<PolicyFrame>>>,
        /// Every registered peer's new class.
        classes: Arc<HashMap<String, ClassId>>,
    },
}

/// What a peer's own stream does when the dispatch is about that peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectAction {
    /// Nothing (a peer is not in its own roster).
    Skip,
    /// Its class changed: send a fresh snapshot.
    Resync,
    /// It was removed (expired, revoked, replaced): end the stream.
    Close,
}

/// What a stream does with one dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes.
    Send(Bytes),
    /// Nothing for this stream.
    Skip,
    /// Send a fresh snapshot.
    Resync,
    /// End the stream.
    Close,
}

/// A stream's view of itself.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The peer reading the stream.
    pub peer_id: String,
    /// Its class under the policy of `revision`.
    pub class: ClassId,
    /// Newest event id already reflected in what the stream sent.
    pub last_id: u64,
}

impl Subscriber {
    /// Picks this stream's part of `d`.
    pub fn step(&mut self, d: &Dispatch) -> Step {
        if d.id <= self.last_id {
            return Step::Skip;
        }
        self.last_id = d.id;
        self.pick(&d.payload)
    }

    fn pick(&mut self, payload: &Payload) -> Step {
        match payload {
            Payload::ByClass {
                subject,
                frames,
                action,
            } => {
                if *subject == self.peer_id {
                    return match action {
                        SubjectAction::Skip => Step::Skip,
                        SubjectAction::Resync => Step::Resync,
                        SubjectAction::Close => Step::Close,
                    };
                }
                match frames.get(self.class as usize) {
                    Some(Some(b)) => Step::Send(b.clone()),
                    _ => Step::Skip,
                }
            }
            Payload::Targeted(targets) => {
                let mine: Vec<&Bytes> = targets
                    .iter()
                    .filter(|(p, _)| *p == self.peer_id)
                    .map(|(_, b)| b)
                    .collect();
                match mine.len() {
                    0 => Step::Skip,
                    1 => Step::Send(mine[0].clone()),
                    _ => Step::Send(Bytes::from(mine.iter().fold(Vec::new(), |mut v, b| {
                        v.extend_from_slice(b);
                        v
                    }))),
                }
            }
            Payload::Batch(parts) => {
                let mut out = Vec::new();
                for part in parts {
                    match self.pick(part) {
                        Step::Send(b) => out.extend_from_slice(&b),
                        Step::Skip => {}
                        other => return other,
                    }
                }
                if out.is_empty() {
                    Step::Skip
                } else {
                    Step::Send(Bytes::from(out))
                }
            }
            Payload::Policy { frames, classes } => match classes.get(&self.peer_id) {
                None => Step::Close,
                Some(c) => {
                    self.class = *c;
                    match frames.get(*c as usize) {
                        Some(Some(f)) => Step::Send(f.frame_for(&self.peer_id)),
                        _ => Step::Resync,
                    }
                }
            },
        }
    }
}

/// Stream timing.
#[derive(Debug, Clone, Copy)]
pub struct StreamConfig {
    /// Interval between keepalive comments.
    pub keepalive: Duration,
    /// How long a write may wait for a client that does not read before the stream is
    /// closed.
    pub write_timeout: Duration,
}

/// A fresh snapshot for a stream: (frame, its event id, the peer's class); `None` when
/// the peer is gone and the stream should end.
pub type Resync = dyn Fn(&str) -> Option<(Bytes, u64, ClassId)> + Send + Sync;

/// Runs one stream until the client goes away, the peer is removed, or the client stops
/// reading. `initial` is written first (the snapshot, or the replayed events).
pub async fn run_stream(
    mut sub: Subscriber,
    initial: Vec<Bytes>,
    mut rx: broadcast::Receiver<Arc<Dispatch>>,
    tx: mpsc::Sender<Bytes>,
    cfg: StreamConfig,
    resync: Arc<Resync>,
) {
    let send = |b: Bytes| {
        let tx = tx.clone();
        async move {
            matches!(
                tokio::time::timeout(cfg.write_timeout, tx.send(b)).await,
                Ok(Ok(()))
            )
        }
    };
    for b in initial {
        if !send(b).await {
            return;
        }
    }
    let mut keepalive = tokio::time::interval(cfg.keepalive);
    keepalive.tick().await;
    loop {
        let step = tokio::select! {
            r = rx.recv() => match r {
                Ok(d) => sub.step(&d),
                Err(broadcast::error::RecvError::Lagged(_)) => Step::Resync,
                Err(broadcast::error::RecvError::Closed) => Step::Close,
            },
            _ = keepalive.tick() => Step::Send(Bytes::from_static(b": keepalive\n\n")),
            _ = tx.closed() => Step::Close,
        };
        match step {
            Step::Send(b) => {
                if !send(b).await {
                    return;
                }
            }
            Step::Skip => {}
            Step::Close => return,
            Step::Resync => match resync(&sub.peer_id) {
                None => return,
                Some((frame, id, class)) => {
                    sub.last_id = id;
                    sub.class = class;
                    if !send(frame).await {
                        return;
                    }
                }
            },
        }
    }
}

/// A response body fed from a channel: the stream task writes, hyper reads.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    /// A body reading from `rx`.
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self { rx }
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_class(id: u64, subject: &str, frames: Vec<Option<&'static str>>) -> Dispatch {
        Dispatch {
            id,
            revision: 1,
            payload: Payload::ByClass {
                subject: subject.into(),
                frames: frames
                    .into_iter()
                    .map(|f| f.map(|s: &'static str| Bytes::from_static(s.as_bytes())))
                    .collect(),
                action: SubjectAction::Close,
            },
        }
    }

    #[test]
    fn step_filters_by_class_subject_and_id() {
        let mut s = Subscriber {
            peer_id: "me".into(),
            class: 1,
            last_id: 5,
        };
        assert_eq!(s.step(&by_class(5, "x", vec![None, Some("a")])), Step::Skip);
        assert_eq!(
            s.step(&by_class(6, "x", vec![None, Some("a")])),
            Step::Send(Bytes::from_static(b"a"))
        );
        assert_eq!(s.step(&by_class(7, "x", vec![Some("a"), None])), Step::Skip);
        assert_eq!(
            s.step(&by_class(8, "me", vec![None, Some("a")])),
            Step::Close
        );
        let t = Dispatch {
            id: 9,
            revision: 1,
            payload: Payload::Targeted(vec![
                ("me".into(), Bytes::from_static(b"1")),
                ("you".into(), Bytes::from_static(b"2")),
                ("me".into(), Bytes::from_static(b"3")),
            ]),
        };
        assert_eq!(s.step(&t), Step::Send(Bytes::from_static(b"13")));
        assert_eq!(s.last_id, 9);
        // A batch (an app move): the parts this stream may see, in order, under one id;
        // its own part is skipped.
        let part = |subject: &str, f: &'static str| Payload::ByClass {
            subject: subject.into(),
            frames: vec![None, Some(Bytes::from_static(f.as_bytes()))],
            action: SubjectAction::Skip,
        };
        let batch = |id, parts| Dispatch {
            id,
            revision: 1,
            payload: Payload::Batch(parts),
        };
        assert_eq!(
            s.step(&batch(10, vec![part("a", "old"), part("b", "new")])),
            Step::Send(Bytes::from_static(b"oldnew"))
        );
        assert_eq!(
            s.step(&batch(11, vec![part("me", "mine"), part("b", "new")])),
            Step::Send(Bytes::from_static(b"new"))
        );
        assert_eq!(s.step(&batch(12, vec![part("me", "mine")])), Step::Skip);
    }

    fn cfg(write_ms: u64) -> StreamConfig {
        StreamConfig {
            keepalive: Duration::from_secs(3600),
            write_timeout: Duration::from_millis(write_ms),
        }
    }

    fn resync_to(frame: &'static [u8], id: u64) -> Arc<Resync> {
        Arc::new(move |_: &str| Some((Bytes::from_static(frame), id, 0)))
    }

    #[tokio::test]
    async fn a_lagging_stream_is_resynced_with_a_snapshot() {
        let (btx, brx) = broadcast::channel(2);
        for id in 1..=10 {
            btx.send(Arc::new(by_class(id, "x", vec![Some("ev")])))
                .unwrap();
        }
        let (tx, mut rx) = mpsc::channel(16);
        let sub = Subscriber {
            peer_id: "me".into(),
            class: 0,
            last_id: 0,
        };
        let task = tokio::spawn(run_stream(
            sub,
            vec![],
            brx,
            tx,
            cfg(1000),
            resync_to(b"snapshot", 10),
        ));
        // The receiver lost events 1..=8: it gets a snapshot at id 10, and the still
        // buffered events 9 and 10 are already covered by it.
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"snapshot"));
        btx.send(Arc::new(by_class(11, "x", vec![Some("new")])))
            .unwrap();
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"new"));
        drop(btx);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_disconnected() {
        let (btx, brx) = broadcast::channel(64);
        let (tx, rx) = mpsc::channel(1);
        let sub = Subscriber {
            peer_id: "me".into(),
            class: 0,
            last_id: 0,
        };
        let task = tokio::spawn(run_stream(
            sub,
            vec![Bytes::from_static(b"snapshot")],
            brx,
            tx,
            cfg(50),
            resync_to(b"snapshot", 0),
        ));
        for id in 1..=3 {
            btx.send(Arc::new(by_class(id, "x", vec![Some("ev")])))
                .unwrap();
        }
        // Nobody reads `rx`: the stream gives up after the write timeout, on its own.
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stream task did not end")
            .unwrap();
        drop(rx);
    }
}
