//! Counters for `/metrics`, rendered as Prometheus text. Plain atomics: incrementing one
//! never blocks a request.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Process-wide coordinator counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Successful registrations.
    pub registrations: AtomicU64,
    /// Successful heartbeats.
    pub heartbeats: AtomicU64,
    /// Peers removed after being stale for `--stale-after`.
    pub expirations: AtomicU64,
    /// Peers revoked by an admin.
    pub revocations: AtomicU64,
    /// Accepted policy changes.
    pub policy_changes: AtomicU64,
    /// Join tokens minted.
    pub tokens_minted: AtomicU64,
    /// WireGuard keys rotated.
    pub key_rotations: AtomicU64,
    /// Registrations refused because the key belongs to another identity (`key_taken`)
    /// or the identity has another key admitted (`key_mismatch`).
    pub key_refusals: AtomicU64,
    /// Requests answered with a 4xx status.
    pub responses_4xx: AtomicU64,
    /// Requests answered with a 5xx status.
    pub responses_5xx: AtomicU64,
    /// Requests answered with another status.
    pub responses_ok: AtomicU64,
    /// TLS handshakes that failed (no, bad or expired client certificate, …).
    pub tls_failures: AtomicU64,
    /// SSE streams open right now.
    pub streams_open: AtomicU64,
    /// Peers marked stale after missing their heartbeats.
    pub stale_marks: AtomicU64,
    /// Heartbeats refused because they claimed an app another peer holds.
    pub app_claims_refused: AtomicU64,
    /// App handovers by an admin.
    pub app_moves: AtomicU64,
    /// SSE streams refused: the identity held its maximum.
    pub streams_refused: AtomicU64,
    /// SSE streams opened with a `Last-Event-ID` and resumed with the events after it
    /// (no snapshot).
    pub streams_resumed: AtomicU64,
    /// SSE streams that started with a snapshot (no `Last-Event-ID`, or one that could
    /// not be resumed).
    pub stream_snapshots: AtomicU64,
    /// Heartbeats and registrations refused by the per-identity rate limit.
    pub rate_limited: AtomicU64,
    /// Connections refused: the coordinator held its maximum.
    pub conns_refused_overall: AtomicU64,
    /// Connections refused: the source IP held its maximum.
    pub conns_refused_per_ip: AtomicU64,
    /// Refused connections closed without an answer (too many refusals in flight).
    pub conns_dropped: AtomicU64,
    /// TLS handshakes not completed within the handshake timeout.
    pub tls_handshake_timeouts: AtomicU64,
    /// STUN requests answered (Binding successes and error responses).
    pub stun_answered: AtomicU64,
    /// Well-formed STUN datagrams that get no answer (indications, responses).
    pub stun_ignored: AtomicU64,
    /// Datagrams on a STUN port that are not STUN messages: dropped.
    pub stun_malformed: AtomicU64,
    /// STUN requests not answered: their source was over its answer rate
    /// ([`tabbify_api::stun_limit`]).
    pub stun_rate_limited: AtomicU64,
    /// Relay tokens minted.
    pub relay_tokens: AtomicU64,
    /// Dashboard logins (login links spent).
    pub logins: AtomicU64,
    /// Login links refused (unknown, used or expired).
    pub login_refusals: AtomicU64,
    /// Dashboard-session requests refused for a missing or wrong CSRF token.
    pub csrf_refusals: AtomicU64,
}

/// Gauges read from the live state at render time.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    /// Registered peers.
    pub peers: u64,
    /// Visibility classes.
    pub classes: u64,
    /// Newest event id.
    pub last_event_id: u64,
    /// Policy revision.
    pub policy_revision: u64,
    /// Stale peers.
    pub stale_peers: u64,
    /// Open connections.
    pub connections: u64,
}

impl Metrics {
    /// Adds one to `c`.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP tabbify_coordinator_{name} {help}");
            let _ = writeln!(out, "# TYPE tabbify_coordinator_{name} {kind}");
            let _ = writeln!(out, "tabbify_coordinator_{name} {v}");
        };
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        line("peers", "gauge", "Registered peers.", g.peers);
        line(
            "visibility_classes",
            "gauge",
            "Visibility classes under the current policy.",
            g.classes,
        );
        line(
            "last_event_id",
            "gauge",
            "Newest roster event id.",
            g.last_event_id,
        );
        line(
            "policy_revision",
            "gauge",
            "Policy revision in force.",
            g.policy_revision,
        );
        line("stale_peers", "gauge", "Peers marked stale.", g.stale_peers);
        line(
            "connections_open",
            "gauge",
            "Open client connections.",
            g.connections,
        );
        line(
            "streams_open",
            "gauge",
            "Open SSE streams.",
            c(&self.streams_open),
        );
        line(
            "dashboard_logins_total",
            "counter",
            "Dashboard login links spent.",
            c(&self.logins),
        );
        line(
            "dashboard_login_refusals_total",
            "counter",
            "Dashboard login links refused (unknown, used or expired).",
            c(&self.login_refusals),
        );
        line(
            "dashboard_csrf_refusals_total",
            "counter",
            "Dashboard-session changes refused for a missing or wrong CSRF token.",
            c(&self.csrf_refusals),
        );
        line(
            "registrations_total",
            "counter",
            "Successful registrations.",
            c(&self.registrations),
        );
        line(
            "heartbeats_total",
            "counter",
            "Successful heartbeats.",
            c(&self.heartbeats),
        );
        line(
            "expirations_total",
            "counter",
            "Peers removed after being stale for --stale-after.",
            c(&self.expirations),
        );
        line(
            "revocations_total",
            "counter",
            "Peers revoked by an admin.",
            c(&self.revocations),
        );
        line(
            "policy_changes_total",
            "counter",
            "Accepted policy changes.",
            c(&self.policy_changes),
        );
        line(
            "tokens_minted_total",
            "counter",
            "Join tokens minted.",
            c(&self.tokens_minted),
        );
        line(
            "key_rotations_total",
            "counter",
            "WireGuard keys rotated.",
            c(&self.key_rotations),
        );
        line(
            "key_refusals_total",
            "counter",
            "Requests refused with key_taken or key_mismatch.",
            c(&self.key_refusals),
        );
        line(
            "responses_ok_total",
            "counter",
            "Responses with a 1xx-3xx status.",
            c(&self.responses_ok),
        );
        line(
            "responses_4xx_total",
            "counter",
            "Responses with a 4xx status.",
            c(&self.responses_4xx),
        );
        line(
            "responses_5xx_total",
            "counter",
            "Responses with a 5xx status.",
            c(&self.responses_5xx),
        );
        line(
            "tls_handshake_failures_total",
            "counter",
            "Failed TLS handshakes.",
            c(&self.tls_failures),
        );
        line(
            "tls_handshake_timeouts_total",
            "counter",
            "TLS handshakes cut for not completing in time.",
            c(&self.tls_handshake_timeouts),
        );
        line(
            "stale_marks_total",
            "counter",
            "Peers marked stale after missed heartbeats.",
            c(&self.stale_marks),
        );
        line(
            "app_claims_refused_total",
            "counter",
            "Heartbeats refused for claiming an app another peer holds.",
            c(&self.app_claims_refused),
        );
        line(
            "app_moves_total",
            "counter",
            "App handovers by an admin.",
            c(&self.app_moves),
        );
        line(
            "streams_refused_total",
            "counter",
            "SSE streams refused: the identity held its maximum.",
            c(&self.streams_refused),
        );
        line(
            "streams_resumed_total",
            "counter",
            "SSE streams resumed after their Last-Event-ID without a snapshot.",
            c(&self.streams_resumed),
        );
        line(
            "stream_snapshots_total",
            "counter",
            "SSE streams that started with a snapshot.",
            c(&self.stream_snapshots),
        );
        line(
            "rate_limited_total",
            "counter",
            "Heartbeats and registrations refused by the per-identity rate limit.",
            c(&self.rate_limited),
        );
        line(
            "connections_refused_overall_total",
            "counter",
            "Connections refused: the coordinator held its maximum.",
            c(&self.conns_refused_overall),
        );
        line(
            "connections_refused_per_ip_total",
            "counter",
            "Connections refused: the source IP held its maximum.",
            c(&self.conns_refused_per_ip),
        );
        line(
            "connections_dropped_total",
            "counter",
            "Refused connections closed without an answer.",
            c(&self.conns_dropped),
        );
        line(
            "stun_answered_total",
            "counter",
            "STUN requests answered (Binding successes and error responses).",
            c(&self.stun_answered),
        );
        line(
            "stun_ignored_total",
            "counter",
            "Well-formed STUN datagrams not answered (indications, responses).",
            c(&self.stun_ignored),
        );
        line(
            "stun_malformed_total",
            "counter",
            "Datagrams on a STUN port that are not STUN messages (dropped).",
            c(&self.stun_malformed),
        );
        line(
            "stun_rate_limited_total",
            "counter",
            "STUN requests not answered because their source was over its answer rate.",
            c(&self.stun_rate_limited),
        );
        line(
            "relay_tokens_total",
            "counter",
            "Relay tokens minted (POST /v1/relay/token).",
            c(&self.relay_tokens),
        );
        out
    }
}
