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
        let text = m.render();
        assert!(text.contains("tabbify_edge_requests_total{route=\"app\",code=\"2xx\"} 2\n"));
        assert!(text.contains("tabbify_edge_requests_total{route=\"builtin\",code=\"4xx\"} 1\n"));
        assert!(text.contains("tabbify_edge_upstream_errors_total{kind=\"app_timeout\"} 1\n"));
        assert!(text.contains("tabbify_edge_upstream_header_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("tabbify_edge_upstream_header_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("tabbify_edge_upstream_header_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("tabbify_edge_connections_active 1\n"));
    }
}
