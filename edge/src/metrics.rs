//! Counters of the edge, rendered as Prometheus text on `/metrics`.
//!
//! Plain relaxed atomics: each is independent, and a scrape may see one request counted in
//! one family and not yet in another.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::error::EdgeError;

/// Which part of the edge answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// `/app/{uuid}/...`.
    App,
    /// A hostname route from the routes file.
    Host,
    /// The edge's own endpoints (`/health`, `/metrics`, `/v1/*`, ...) and 404s.
    Builtin,
}

impl RouteKind {
    /// The `route` label value.
    pub fn label(self) -> &'static str {
        match self {
            RouteKind::App => "app",
            RouteKind::Host => "host",
            RouteKind::Builtin => "builtin",
        }
    }
}

const KINDS: [RouteKind; 3] = [RouteKind::App, RouteKind::Host, RouteKind::Builtin];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const UPSTREAM_ERRORS: [EdgeError; 3] = [
    EdgeError::Unreachable,
    EdgeError::BadGateway,
    EdgeError::Timeout,
];
/// Why the edge refused or cut a client (each has its own series of
/// `tabbify_edge_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A request line or header line ended in a bare LF (or held a bare CR): 400.
    BareLf,
    /// A request head the edge cannot frame (bad `Content-Length`, unknown transfer coding,
    /// malformed chunked body, invalid head): 400, or the connection closed mid-body.
    BadFraming,
    /// The request (head and body) took longer than `--request-timeout`: 408 or closed.
    RequestDeadline,
    /// The request body arrived slower than `--min-body-rate`: 408 or closed.
    BodyTooSlow,
    /// The client's address (IPv6: its /64) already had `--max-connections-per-ip` open: 429.
    PerIpCap,
    /// `--max-connections` were already open: 503.
    ConnectionCap,
    /// `/metrics` asked on the public listener without a metrics key configured: 404.
    MetricsPublic,
    /// `/metrics` asked on the public listener without the right metrics key: 404.
    MetricsUnauthorized,
}

impl Refusal {
    /// Every reason, in the order they are rendered.
    pub const ALL: [Refusal; 8] = [
        Refusal::BareLf,
        Refusal::BadFraming,
        Refusal::RequestDeadline,
        Refusal::BodyTooSlow,
        Refusal::PerIpCap,
        Refusal::ConnectionCap,
        Refusal::MetricsPublic,
        Refusal::MetricsUnauthorized,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BareLf => "bare_lf",
            Refusal::BadFraming => "bad_framing",
            Refusal::RequestDeadline => "request_deadline",
            Refusal::BodyTooSlow => "body_too_slow",
            Refusal::PerIpCap => "per_ip_cap",
            Refusal::ConnectionCap => "connection_cap",
            Refusal::MetricsPublic => "metrics_public",
            Refusal::MetricsUnauthorized => "metrics_unauthorized",
        }
    }

    /// The error a client is answered with, when an answer is still possible.
    pub fn error(self) -> EdgeError {
        match self {
            Refusal::BareLf | Refusal::BadFraming => EdgeError::BadRequest,
            Refusal::RequestDeadline | Refusal::BodyTooSlow => EdgeError::RequestTimeout,
            Refusal::PerIpCap => EdgeError::TooManyConnections,
            Refusal::ConnectionCap => EdgeError::Overloaded,
            Refusal::MetricsPublic | Refusal::MetricsUnauthorized => EdgeError::NotFound,
        }
    }
}

/// Upper bounds (seconds) of the time-to-response-headers histogram.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// All counters of one edge.
#[derive(Default)]
pub struct Metrics {
    connections_total: AtomicU64,
    connections_active: AtomicI64,
    requests: [[AtomicU64; 5]; 3],
    upstream_errors: [AtomicU64; 3],
    upgrades: AtomicU64,
    upgrades_idle_closed: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    routes_reload_ok: AtomicU64,
    routes_reload_failed: AtomicU64,
    routes_entries: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Metrics {
    /// A client connection was accepted.
    pub fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Relaxed);
        self.connections_active.fetch_add(1, Relaxed);
    }

    /// A client connection ended.
    pub fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    /// A response with `status` was sent for a request of `kind`.
    pub fn request(&self, kind: RouteKind, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        let k = KINDS.iter().position(|x| *x == kind).unwrap_or(2);
        self.requests[k][class].fetch_add(1, Relaxed);
    }

    /// Forwarding to an app failed with `err` (only upstream errors are counted).
    pub fn upstream_error(&self, err: EdgeError) {
        if let Some(i) = UPSTREAM_ERRORS.iter().position(|e| *e == err) {
            self.upstream_errors[i].fetch_add(1, Relaxed);
        }
    }

    /// An app answered with headers after `elapsed`.
    pub fn upstream_latency(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us.fetch_add(us, Relaxed);
    }

    /// A protocol upgrade (WebSocket) was spliced.
    pub fn upgrade(&self) {
        self.upgrades.fetch_add(1, Relaxed);
    }

    /// A spliced (WebSocket) connection was closed because neither side sent anything for
    /// the idle timeout.
    pub fn upgrade_idle_closed(&self) {
        self.upgrades_idle_closed.fetch_add(1, Relaxed);
    }

    /// A client was refused or cut for `reason`.
    pub fn refused(&self, reason: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|r| *r == reason) {
            self.refused[i].fetch_add(1, Relaxed);
        }
    }

    /// How many clients were refused or cut for `reason`.
    pub fn refused_count(&self, reason: Refusal) -> u64 {
        Refusal::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.refused[i].load(Relaxed))
    }

    /// How many spliced connections were closed as idle.
    pub fn upgrades_idle_closed_count(&self) -> u64 {
        self.upgrades_idle_closed.load(Relaxed)
    }

    /// The routes file was (re)loaded with `entries` routes.
    pub fn routes_loaded(&self, entries: usize) {
        self.routes_reload_ok.fetch_add(1, Relaxed);
        self.routes_entries
            .store(u64::try_from(entries).unwrap_or(u64::MAX), Relaxed);
    }

    /// A changed routes file was rejected and the previous table kept.
    pub fn routes_rejected(&self) {
        self.routes_reload_failed.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // `write!` into a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(out, "# HELP tabbify_edge_connections_total Client connections accepted.\n# TYPE tabbify_edge_connections_total counter");
        let _ = writeln!(
            out,
            "tabbify_edge_connections_total {}",
            self.connections_total.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP tabbify_edge_connections_active Client connections open.\n# TYPE tabbify_edge_connections_active gauge");
        let _ = writeln!(
            out,
            "tabbify_edge_connections_active {}",
            self.connections_active.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP tabbify_edge_requests_total Responses sent, by route kind and status class.\n# TYPE tabbify_edge_requests_total counter");
        for (k, kind) in KINDS.iter().enumerate() {
            for (c, class) in CLASSES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "tabbify_edge_requests_total{{route=\"{}\",code=\"{}\"}} {}",
                    kind.label(),
                    class,
                    self.requests[k][c].load(Relaxed)
                );
            }
        }
        let _ = writeln!(out, "# HELP tabbify_edge_upstream_errors_total Requests the edge could not forward, by cause.\n# TYPE tabbify_edge_upstream_errors_total counter");
        for (i, err) in UPSTREAM_ERRORS.iter().enumerate() {
            let _ = writeln!(
                out,
                "tabbify_edge_upstream_errors_total{{kind=\"{}\"}} {}",
                err.code(),
                self.upstream_errors[i].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP tabbify_edge_upgrades_total Protocol upgrades (WebSocket) spliced.\n# TYPE tabbify_edge_upgrades_total counter");
        let _ = writeln!(
            out,
            "tabbify_edge_upgrades_total {}",
            self.upgrades.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP tabbify_edge_upgrades_idle_closed_total Spliced connections closed because both directions were idle for --ws-idle-timeout.\n# TYPE tabbify_edge_upgrades_idle_closed_total counter");
        let _ = writeln!(
            out,
            "tabbify_edge_upgrades_idle_closed_total {}",
            self.upgrades_idle_closed.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP tabbify_edge_refused_total Clients refused or cut by the edge's limits, by reason.\n# TYPE tabbify_edge_refused_total counter");
        for (i, reason) in Refusal::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "tabbify_edge_refused_total{{reason=\"{}\"}} {}",
                reason.label(),
                self.refused[i].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP tabbify_edge_routes_reloads_total Routes file loads, by result.\n# TYPE tabbify_edge_routes_reloads_total counter");
        let _ = writeln!(
            out,
            "tabbify_edge_routes_reloads_total{{result=\"ok\"}} {}",
            self.routes_reload_ok.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "tabbify_edge_routes_reloads_total{{result=\"rejected\"}} {}",
            self.routes_reload_failed.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP tabbify_edge_routes_entries Routes in the active table.\n# TYPE tabbify_edge_routes_entries gauge");
        let _ = writeln!(
            out,
            "tabbify_edge_routes_entries {}",
            self.routes_entries.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP tabbify_edge_upstream_header_seconds Time from forwarding a request to the app's response headers.\n# TYPE tabbify_edge_upstream_header_seconds histogram");
        let mut cumulative = 0u64;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "tabbify_edge_upstream_header_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            out,
            "tabbify_edge_upstream_header_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.latency_sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "tabbify_edge_upstream_header_seconds_sum {sum}");
        let _ = writeln!(out, "tabbify_edge_upstream_header_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_by_kind_class_and_bucket() {
        let m = Metrics::default();
        m.request(RouteKind::App, 200);
        m.request(RouteKind::App, 204);
        m.request(RouteKind::Builtin, 404);
        m.upstream_error(EdgeError::Timeout);
        m.upstream_error(EdgeError::NotFound);
        m.upstream_latency(Duration::from_millis(3));
        m.connection_opened();
        m.refused(Refusal::PerIpCap);
        m.upgrade_idle_closed();
        let text = m.render();
        assert!(text.contains("tabbify_edge_refused_total{reason=\"per_ip_cap\"} 1\n"));
        assert!(text.contains("tabbify_edge_refused_total{reason=\"bare_lf\"} 0\n"));
        assert!(text.contains("tabbify_edge_upgrades_idle_closed_total 1\n"));
        assert!(text.contains("tabbify_edge_requests_total{route=\"app\",code=\"2xx\"} 2\n"));
        assert!(text.contains("tabbify_edge_requests_total{route=\"builtin\",code=\"4xx\"} 1\n"));
        assert!(text.contains("tabbify_edge_upstream_errors_total{kind=\"app_timeout\"} 1\n"));
        assert!(text.contains("tabbify_edge_upstream_header_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("tabbify_edge_upstream_header_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("tabbify_edge_upstream_header_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("tabbify_edge_connections_active 1\n"));
    }
}
