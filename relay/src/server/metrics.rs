//! The relay's counters and their Prometheus text on `--metrics-bind` (loopback by
//! default): live sessions, frames and bytes forwarded by egress transport, drops by
//! reason, sessions refused by reason.
//!
//! Invariants: counters only grow (relaxed atomics: exact per counter, not a consistent
//! snapshot across counters); the endpoint answers `GET /metrics` and nothing else.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::core::Drop;
use super::Shared;
use crate::proto::RefuseCode;

/// Counters.
#[derive(Default)]
pub struct Metrics {
    fwd_udp: AtomicU64,
    fwd_udp_bytes: AtomicU64,
    fwd_stream: AtomicU64,
    fwd_stream_bytes: AtomicU64,
    drops: [AtomicU64; Drop::ALL.len()],
    refused: [AtomicU64; 4],
    busy: AtomicU64,
    stun_answered: AtomicU64,
    token_refused: AtomicU64,
}

impl Metrics {
    /// Counts one forwarded frame of `bytes`, sent over the stream or UDP.
    pub fn forwarded(&self, stream: bool, bytes: usize) {
        self.forwarded_n(stream, 1, bytes);
    }

    /// Counts `n` forwarded frames totalling `bytes`.
    pub fn forwarded_n(&self, stream: bool, n: u64, bytes: usize) {
        let (c, b) = if stream {
            (&self.fwd_stream, &self.fwd_stream_bytes)
        } else {
            (&self.fwd_udp, &self.fwd_udp_bytes)
        };
        c.fetch_add(n, Ordering::Relaxed);
        b.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts `n` drops for `reason`.
    pub fn drop(&self, reason: Drop, n: u64) {
        self.drops[reason.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Drops so far for `reason`.
    pub fn drops(&self, reason: Drop) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    /// Counts a refused session.
    pub fn refused(&self, code: RefuseCode) {
        let i = (code as usize).saturating_sub(1).min(3);
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an upgrade refused for a bad relay token.
    pub fn token_refused(&self) {
        self.token_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Upgrades refused for a bad relay token so far.
    pub fn tokens_refused(&self) -> u64 {
        self.token_refused.load(Ordering::Relaxed)
    }

    /// Counts an answered STUN request.
    pub fn stun_answered(&self) {
        self.stun_answered.fetch_add(1, Ordering::Relaxed);
    }

    /// STUN requests answered so far.
    pub fn stun_answers(&self) -> u64 {
        self.stun_answered.load(Ordering::Relaxed)
    }

    /// Counts a connection closed at accept (too many handshakes pending).
    pub fn busy(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
    }

    /// Frames forwarded so far (udp, stream).
    pub fn forwarded_frames(&self) -> (u64, u64) {
        (
            self.fwd_udp.load(Ordering::Relaxed),
            self.fwd_stream.load(Ordering::Relaxed),
        )
    }

    /// The Prometheus text exposition.
    pub fn render(&self, sessions: usize) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# HELP tabbify_relay_sessions Live relay sessions.");
        let _ = writeln!(o, "# TYPE tabbify_relay_sessions gauge");
        let _ = writeln!(o, "tabbify_relay_sessions {sessions}");
        let _ = writeln!(
            o,
            "# HELP tabbify_relay_forwarded_datagrams_total Frames forwarded, by the transport they left on."
        );
        let _ = writeln!(o, "# TYPE tabbify_relay_forwarded_datagrams_total counter");
        let _ = writeln!(o, "# HELP tabbify_relay_forwarded_bytes_total Bytes of frames forwarded, by the transport they left on.");
        let _ = writeln!(o, "# TYPE tabbify_relay_forwarded_bytes_total counter");
        for (t, c, b) in [
            ("udp", &self.fwd_udp, &self.fwd_udp_bytes),
            ("stream", &self.fwd_stream, &self.fwd_stream_bytes),
        ] {
            let _ = writeln!(
                o,
                "tabbify_relay_forwarded_datagrams_total{{transport=\"{t}\"}} {}",
                c.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                o,
                "tabbify_relay_forwarded_bytes_total{{transport=\"{t}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP tabbify_relay_drops_total Datagrams and frames dropped, by reason."
        );
        let _ = writeln!(o, "# TYPE tabbify_relay_drops_total counter");
        for d in Drop::ALL {
            let _ = writeln!(
                o,
                "tabbify_relay_drops_total{{reason=\"{}\"}} {}",
                d.label(),
                self.drops(d)
            );
        }
        let _ = writeln!(
            o,
            "# HELP tabbify_relay_sessions_refused_total Sessions refused, by reason."
        );
        let _ = writeln!(o, "# TYPE tabbify_relay_sessions_refused_total counter");
        for (i, r) in ["protocol", "bad_proof", "full", "identity_limit"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                o,
                "tabbify_relay_sessions_refused_total{{reason=\"{r}\"}} {}",
                self.refused[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP tabbify_relay_stun_answered_total STUN requests answered on the UDP port."
        );
        let _ = writeln!(o, "# TYPE tabbify_relay_stun_answered_total counter");
        let _ = writeln!(
            o,
            "tabbify_relay_stun_answered_total {}",
            self.stun_answered.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP tabbify_relay_tokens_refused_total Upgrades refused for a bad relay token (forged, expired, malformed)."
        );
        let _ = writeln!(o, "# TYPE tabbify_relay_tokens_refused_total counter");
        let _ = writeln!(
            o,
            "tabbify_relay_tokens_refused_total {}",
            self.token_refused.load(Ordering::Relaxed)
        );
        let _ = writeln!(o, "# HELP tabbify_relay_connections_refused_total Connections closed at accept because too many handshakes were pending.");
        let _ = writeln!(o, "# TYPE tabbify_relay_connections_refused_total counter");
        let _ = writeln!(
            o,
            "tabbify_relay_connections_refused_total{{reason=\"handshakes_pending\"}} {}",
            self.busy.load(Ordering::Relaxed)
        );
        o
    }
}

/// Serves `GET /metrics` on `l` (plain HTTP; bind it to loopback or a private network).
pub async fn serve(l: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((mut c, _)) = l.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(Ok((head, _))) =
                tokio::time::timeout(std::time::Duration::from_secs(5), super::read_head(&mut c))
                    .await
            else {
                return;
            };
            let ok = head.starts_with(b"GET /metrics ");
            let (status, ctype, body) = if ok {
                (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    shared.metrics.render(shared.sessions()),
                )
            } else {
                (
                    "404 Not Found",
                    "application/json",
                    super::json_error("no such route", "not_found"),
                )
            };
            let _ = super::write_http(&mut c, status, ctype, &body).await;
            let _ = c.shutdown().await;
        });
    }
}
