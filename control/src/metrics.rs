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
    /// Peers removed for missing heartbeats.
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
        line(
            "streams_open",
            "gauge",
            "Open SSE streams.",
            c(&self.streams_open),
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
            "Peers expired after missed heartbeats.",
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
        out
    }
}
