//! The joiner's Prometheus metrics: `GET /metrics` on `--metrics-bind` (default
//! `127.0.0.1:9587`, `off` disables), plain HTTP/1.1 served by hyper on the joiner's tokio
//! runtime.
//!
//! This module owns the address syntax ([`parse_bind`]), the text exposition
//! ([`render`], sans IO: a [`Status`] and `now` in, text out; [`render_batches`]: the
//! engine workers' batch-size histograms) and the listener
//! ([`serve`]). It reads what the joiner already keeps for `status` (the per-peer byte
//! counters and handshake time, the engine's drop counters); it adds no per-packet work.
//!
//! Invariants:
//! * every label value is escaped per the exposition format (`\\`, `\"`, `\n`), so a
//!   member's display name cannot add series or break the output, and is cut to
//!   [`MAX_LABEL_CHARS`] characters;
//! * per-peer series exist only for the peers of the roster (label `peer` = the
//!   coordinator's peer id, `name` = the display name): a peer that leaves the roster
//!   leaves the output, so cardinality is bounded by the roster;
//! * the listener is bounded: at most [`MAX_CONNECTIONS`] connections at once (more are
//!   closed at once), request head at most [`MAX_HEAD_BYTES`], the head must arrive within
//!   [`READ_TIMEOUT`], one request per connection, a connection lives at most
//!   [`CONNECTION_TIMEOUT`]; so a local process cannot exhaust the joiner through it;
//! * `GET /metrics` is the only route: other paths answer 404, other methods on
//!   `/metrics` 405 with `Allow: GET`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

use super::control::Status;
use crate::core::batchstats::{BatchOp, Histogram, BUCKET_BOUNDS};
use crate::core::counters::DropReason;

/// The default `--metrics-bind`.
pub const DEFAULT_BIND: &str = "127.0.0.1:9587";
/// Connections served at once; more are closed without an answer.
pub const MAX_CONNECTIONS: usize = 8;
/// Largest request head read (hyper's smallest buffer limit).
pub const MAX_HEAD_BYTES: usize = 8192;
/// The request head must arrive within this long.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection lives at most this long.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Label values (display names) are cut to this many characters.
pub const MAX_LABEL_CHARS: usize = 128;

/// Where metrics are served, as `join` was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsBind {
    /// The address; `None` = `off`.
    pub addr: Option<SocketAddr>,
    /// Given on the command line: a bind failure stops the joiner. The default address
    /// only warns when taken (another joiner on the host may hold it).
    pub explicit: bool,
}

impl Default for MetricsBind {
    fn default() -> Self {
        Self {
            addr: parse_bind(DEFAULT_BIND).ok().flatten(),
            explicit: false,
        }
    }
}

/// Parses `--metrics-bind`: `IP:PORT` or `off`. The message names the flag.
pub fn parse_bind(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!("--metrics-bind {s:?}: expected IP:PORT (e.g. {DEFAULT_BIND}, [::1]:9587) or `off`")
    })
}

/// Binds the listener. An explicit address that cannot be bound is an error naming the
/// flag; the default one is a warning and `Ok(None)` (the joiner runs without metrics and
/// `status` shows `"metrics": null`).
pub async fn bind(b: MetricsBind) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = b.addr else {
        return Ok(None);
    };
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if !b.explicit => {
            tracing::warn!(%addr, error = %e, "metrics not served: the default --metrics-bind address is taken (pass --metrics-bind IP:PORT or off)");
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| {
            format!("--metrics-bind {addr}: cannot listen (pass another address, or `off`)")
        }),
    }
}

/// Serves `GET /metrics` on `listener` until dropped; `render` makes the body.
pub async fn serve<F>(listener: TcpListener, render: Arc<F>)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&req, || render())) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

/// [`serve`] when there is a listener; pending forever otherwise (a `select!` arm).
pub async fn serve_opt<F>(listener: Option<TcpListener>, render: F)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    match listener {
        Some(l) => serve(l, Arc::new(render)).await,
        None => std::future::pending().await,
    }
}

/// The answer to one request (the routing, sans IO).
fn answer<B>(req: &Request<B>, render: impl FnOnce() -> String) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, text: &str| {
        let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
        *r.status_mut() = code;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "not found: GET /metrics");
    }
    if req.method() != Method::GET {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: GET only",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// A label value escaped per the text exposition format and cut to [`MAX_LABEL_CHARS`].
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars().take(MAX_LABEL_CHARS) {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes `# HELP` and `# TYPE` lines.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition text for the joiner in `s` at Unix time `now_unix` (seconds).
pub fn render(s: &Status, now_unix: u64) -> String {
    let mut o = String::with_capacity(1024 + s.peers.len() * 512);
    head(
        &mut o,
        "tabbify_mesh_info",
        "gauge",
        "This joiner (always 1; the labels carry the facts).",
    );
    let _ = writeln!(
        o,
        "tabbify_mesh_info{{interface=\"{}\",peer_id=\"{}\",name=\"{}\",ula=\"{}\",driver=\"{}\"}} 1",
        escape_label(&s.interface),
        escape_label(&s.peer_id),
        escape_label(&s.name),
        s.ula,
        escape_label(&s.driver)
    );
    let gauge = |o: &mut String, name: &str, help: &str, v: u64| {
        head(o, name, "gauge", help);
        let _ = writeln!(o, "{name} {v}");
    };
    gauge(
        &mut o,
        "tabbify_mesh_peers_configured",
        "Peers in the roster (and so in the engine's table).",
        s.peers.len() as u64,
    );
    gauge(
        &mut o,
        "tabbify_mesh_roster_event_id",
        "The id of the last roster event applied (0 before the first).",
        s.coordinator.last_event_id.unwrap_or(0),
    );
    gauge(
        &mut o,
        "tabbify_mesh_coordinator_connected",
        "1 while registered with the coordinator and following its roster.",
        u64::from(s.coordinator.connected),
    );
    gauge(
        &mut o,
        "tabbify_mesh_hosted_apps",
        "Apps hosted on this node.",
        s.hosted_apps.len() as u64,
    );

    let label = |p: &super::control::PeerStatus| {
        format!(
            "peer=\"{}\",name=\"{}\"",
            escape_label(&p.peer_id),
            escape_label(&p.name)
        )
    };
    head(
        &mut o,
        "tabbify_mesh_peer_rx_bytes_total",
        "counter",
        "Authenticated WireGuard bytes received from the peer.",
    );
    for p in &s.peers {
        let _ = writeln!(
            o,
            "tabbify_mesh_peer_rx_bytes_total{{{}}} {}",
            label(p),
            p.rx_bytes
        );
    }
    head(
        &mut o,
        "tabbify_mesh_peer_tx_bytes_total",
        "counter",
        "WireGuard bytes sent to the peer.",
    );
    for p in &s.peers {
        let _ = writeln!(
            o,
            "tabbify_mesh_peer_tx_bytes_total{{{}}} {}",
            label(p),
            p.tx_bytes
        );
    }
    head(
        &mut o,
        "tabbify_mesh_peer_handshake_age_seconds",
        "gauge",
        "Seconds since the last completed handshake with the peer (absent: never).",
    );
    for p in &s.peers {
        if let Some(t) = p.latest_handshake {
            let _ = writeln!(
                o,
                "tabbify_mesh_peer_handshake_age_seconds{{{}}} {}",
                label(p),
                now_unix.saturating_sub(t)
            );
        }
    }
    head(
        &mut o,
        "tabbify_mesh_peer_path",
        "gauge",
        "The path the engine uses to the peer: 1 on the series of that path, 0 on the other.",
    );
    for p in &s.peers {
        let relayed = p.path == "relay";
        for (path, on) in [("direct", !relayed), ("relay", relayed)] {
            let _ = writeln!(
                o,
                "tabbify_mesh_peer_path{{{},path=\"{path}\"}} {}",
                label(p),
                u8::from(on)
            );
        }
    }

    // Every engine reason, zeros included (so rate() sees the series from the start), then
    // any other counter `status` reports (the relay sessions').
    let mut drops: BTreeMap<&str, u64> = DropReason::ALL.iter().map(|r| (r.name(), 0)).collect();
    for (k, v) in &s.drops {
        drops.insert(k.as_str(), *v);
    }
    head(
        &mut o,
        "tabbify_mesh_drops_total",
        "counter",
        "Packets the data plane dropped, by reason.",
    );
    for (reason, n) in &drops {
        let _ = writeln!(
            o,
            "tabbify_mesh_drops_total{{reason=\"{}\"}} {n}",
            escape_label(reason)
        );
    }
    head(
        &mut o,
        "tabbify_mesh_filter_refusals_total",
        "counter",
        "Packets the port rules refused: out = to a peer, in = from a peer.",
    );
    for (dir, reason) in [
        ("in", DropReason::FilteredIn),
        ("out", DropReason::FilteredOut),
    ] {
        let _ = writeln!(
            o,
            "tabbify_mesh_filter_refusals_total{{direction=\"{dir}\"}} {}",
            drops.get(reason.name()).copied().unwrap_or(0)
        );
    }
    head(
        &mut o,
        "tabbify_mesh_unreachable_sent_total",
        "counter",
        "ICMP unreachable answers written back to the TUN for dropped packets.",
    );
    let _ = writeln!(
        o,
        "tabbify_mesh_unreachable_sent_total {}",
        s.unreachable_sent
    );
    o
}

/// Appends the workers' batch sizes as one Prometheus histogram,
/// `tabbify_mesh_batch_packets{worker,op}` (`op` = `tun_read`, `udp_recv`, `udp_send`;
/// buckets `le` = the powers of two of `core::batchstats::BUCKET_BOUNDS`, then `+Inf`).
/// Every worker and op is present, zeros included.
pub fn render_batches(o: &mut String, workers: &[[Histogram; 3]]) {
    head(
        o,
        "tabbify_mesh_batch_packets",
        "histogram",
        "Packets per batch, by worker and op: TUN reads and UDP receives per turn, UDP datagrams per send flush.",
    );
    for (w, ops) in workers.iter().enumerate() {
        for (op, h) in BatchOp::ALL.iter().zip(ops) {
            let labels = format!("worker=\"{w}\",op=\"{}\"", op.name());
            let mut cumulative = 0;
            for (bound, n) in BUCKET_BOUNDS.iter().zip(h.counts) {
                cumulative += n;
                let _ = writeln!(
                    o,
                    "tabbify_mesh_batch_packets_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                o,
                "tabbify_mesh_batch_packets_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(o, "tabbify_mesh_batch_packets_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(
                o,
                "tabbify_mesh_batch_packets_count{{{labels}}} {cumulative}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status with one peer whose display name is chosen by an attacker (a member with a
    /// valid certificate picks its own name).
    fn status(name: &str) -> Status {
        serde_json::from_value(serde_json::json!({
            "interface": "tabbify0", "name": "me", "peer_id": "p-self",
            "ula": "fd7a::1", "public_key": "k", "tags": [], "listen_port": 51820,
            "driver": "epoll", "registered": true,
            "coordinator": {"url": "https://c:1", "connected": true, "last_event_id": 42},
            "reflexive_endpoint": null, "may_host_apps": false, "hosted_apps": [],
            "peers": [{
                "peer_id": "p-evil", "name": name, "ula": "fd7a::2", "tags": [],
                "public_key": "k2", "endpoint": null, "path": "relay",
                "latest_handshake": 1000, "rx_bytes": 7, "tx_bytes": 9, "direct": false,
                "app_ulas": [], "ports": {"outbound": [], "inbound": []}
            }],
            "drops": {"filtered_in": 3, "relay_frames_bad": 2},
            "unreachable_sent": 1
        }))
        .unwrap()
    }

    /// Every non-comment line is `name{labels} value` or `name value` with a number.
    fn well_formed(text: &str) -> usize {
        let mut samples = 0;
        for line in text.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            if let Some((_, labels)) = series.split_once('{') {
                let labels = labels.strip_suffix('}').expect(line);
                // Walk the label list: name="escaped value", ...
                let mut rest = labels;
                while !rest.is_empty() {
                    let (_, v) = rest.split_once("=\"").expect(line);
                    let mut chars = v.char_indices();
                    let end = loop {
                        match chars.next().expect(line) {
                            (_, '\\') => {
                                let (_, e) = chars.next().expect(line);
                                assert!(matches!(e, '\\' | '"' | 'n'), "bad escape in {line:?}");
                            }
                            (i, '"') => break i,
                            _ => {}
                        }
                    };
                    rest = v[end + 1..].strip_prefix(',').unwrap_or(&v[end + 1..]);
                }
            }
            samples += 1;
        }
        samples
    }

    #[test]
    fn the_exposition_carries_every_metric_of_the_brief() {
        let t = render(&status("bob"), 1030);
        well_formed(&t);
        for want in [
            "tabbify_mesh_peer_rx_bytes_total{peer=\"p-evil\",name=\"bob\"} 7",
            "tabbify_mesh_peer_tx_bytes_total{peer=\"p-evil\",name=\"bob\"} 9",
            "tabbify_mesh_peer_handshake_age_seconds{peer=\"p-evil\",name=\"bob\"} 30",
            "tabbify_mesh_peer_path{peer=\"p-evil\",name=\"bob\",path=\"relay\"} 1",
            "tabbify_mesh_peer_path{peer=\"p-evil\",name=\"bob\",path=\"direct\"} 0",
            "tabbify_mesh_drops_total{reason=\"filtered_in\"} 3",
            "tabbify_mesh_drops_total{reason=\"no_route\"} 0",
            "tabbify_mesh_drops_total{reason=\"relay_frames_bad\"} 2",
            "tabbify_mesh_filter_refusals_total{direction=\"in\"} 3",
            "tabbify_mesh_filter_refusals_total{direction=\"out\"} 0",
            "tabbify_mesh_peers_configured 1",
            "tabbify_mesh_roster_event_id 42",
            "tabbify_mesh_unreachable_sent_total 1",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }

    /// Attacker: a member names itself so that, unescaped, its name would close the label,
    /// forge a series for another peer and start a new line.
    #[test]
    fn a_hostile_display_name_cannot_forge_series_or_break_the_text() {
        let evil =
            "x\"} 1\ntabbify_mesh_peer_rx_bytes_total{peer=\"victim\",name=\"v\\\"} 999999\n";
        let honest = well_formed(&render(&status("bob"), 1030));
        let t = render(&status(evil), 1030);
        assert_eq!(well_formed(&t), honest, "same number of samples:\n{t}");
        assert!(!t.contains("peer=\"victim\""), "{t}");
        assert!(!t
            .lines()
            .any(|l| l.starts_with("tabbify_mesh_peer_rx_bytes_total{peer=\"victim")));
        assert!(t.contains(r#"name="x\"} 1\ntabbify_mesh_peer_rx_bytes_total{peer=\"victim\",name=\"v\\\"} 999999\n""#), "{t}");
        // A long name is cut, so a name cannot inflate every scrape without bound.
        let t = render(&status(&"a".repeat(10_000)), 1030);
        assert!(!t.contains(&"a".repeat(MAX_LABEL_CHARS + 1)));
    }

    #[test]
    fn the_batch_histograms_are_cumulative_per_worker_and_op() {
        let stats = crate::core::batchstats::BatchStats::new(2);
        stats.worker(0).record(BatchOp::TunRead, 1);
        stats.worker(0).record(BatchOp::TunRead, 3);
        stats.worker(1).record(BatchOp::UdpSend, 64);
        let mut t = String::new();
        render_batches(&mut t, &stats.snapshot());
        assert_eq!(well_formed(&t), 2 * 3 * (BUCKET_BOUNDS.len() + 3));
        for want in [
            "# TYPE tabbify_mesh_batch_packets histogram",
            "tabbify_mesh_batch_packets_bucket{worker=\"0\",op=\"tun_read\",le=\"1\"} 1",
            "tabbify_mesh_batch_packets_bucket{worker=\"0\",op=\"tun_read\",le=\"2\"} 1",
            "tabbify_mesh_batch_packets_bucket{worker=\"0\",op=\"tun_read\",le=\"4\"} 2",
            "tabbify_mesh_batch_packets_bucket{worker=\"0\",op=\"tun_read\",le=\"+Inf\"} 2",
            "tabbify_mesh_batch_packets_sum{worker=\"0\",op=\"tun_read\"} 4",
            "tabbify_mesh_batch_packets_count{worker=\"1\",op=\"udp_send\"} 1",
            "tabbify_mesh_batch_packets_bucket{worker=\"1\",op=\"udp_send\",le=\"32\"} 0",
            "tabbify_mesh_batch_packets_bucket{worker=\"1\",op=\"udp_send\",le=\"64\"} 1",
            "tabbify_mesh_batch_packets_count{worker=\"1\",op=\"udp_recv\"} 0",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }

    #[test]
    fn the_bind_flag_parses_an_address_or_off_and_names_itself_when_bad() {
        assert_eq!(parse_bind("off"), Ok(None));
        assert_eq!(
            parse_bind("[::1]:9000"),
            Ok(Some("[::1]:9000".parse().unwrap()))
        );
        assert_eq!(
            MetricsBind::default().addr,
            Some(DEFAULT_BIND.parse().unwrap())
        );
        let e = parse_bind("localhost").unwrap_err();
        assert!(e.contains("--metrics-bind") && e.contains("off"), "{e}");
    }

    #[tokio::test]
    async fn an_explicit_address_that_is_taken_is_an_error_the_default_a_warning() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let e = bind(MetricsBind {
            addr: Some(addr),
            explicit: true,
        })
        .await
        .unwrap_err();
        assert!(format!("{e:#}").contains("--metrics-bind"), "{e:#}");
        let l = bind(MetricsBind {
            addr: Some(addr),
            explicit: false,
        })
        .await
        .unwrap();
        assert!(l.is_none());
        assert!(bind(MetricsBind {
            addr: None,
            explicit: true
        })
        .await
        .unwrap()
        .is_none());
    }

    /// Sends raw bytes, returns what came back before the server closed or reset the
    /// connection (or `None` if it kept the connection open past `wait`).
    async fn raw(addr: SocketAddr, req: &[u8], wait: Duration) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(req).await;
        let mut out = Vec::new();
        // A reset (the server closed with our bytes unread) counts as closed.
        tokio::time::timeout(wait, s.read_to_end(&mut out))
            .await
            .ok()?
            .ok();
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    /// A local process plays the attacker against the listener: other paths and methods,
    /// an oversized head, a slow head and a flood of idle connections.
    #[tokio::test]
    async fn the_listener_answers_get_metrics_only_and_stays_bounded() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(serve(l, Arc::new(|| "m 1\n".to_owned())));
        let long = Duration::from_secs(30);
        let ok = raw(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", long)
            .await
            .unwrap();
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("text/plain; version=0.0.4") && ok.ends_with("m 1\n"),
            "{ok}"
        );
        let nf = raw(addr, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n", long)
            .await
            .unwrap();
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let na = raw(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            long,
        )
        .await
        .unwrap();
        assert!(
            na.starts_with("HTTP/1.1 405") && na.to_lowercase().contains("allow: get"),
            "{na}"
        );
        // A head larger than the limit is refused, not buffered.
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 4 * MAX_HEAD_BYTES));
        let r = raw(addr, &big, long).await.unwrap_or_default();
        assert!(!r.contains(" 200 "), "{r}");
        // Idle connections past the limit: the extra ones are closed at once, and the slots
        // come back when the head read times out.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let extra = raw(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            READ_TIMEOUT / 2,
        )
        .await;
        assert_eq!(
            extra.as_deref(),
            Some(""),
            "a connection past the limit is closed"
        );
        tokio::time::sleep(READ_TIMEOUT + Duration::from_secs(1)).await;
        let again = raw(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", long)
            .await
            .unwrap();
        assert!(
            again.starts_with("HTTP/1.1 200"),
            "slots freed by the read timeout: {again}"
        );
        drop(idle);
        task.abort();
    }
}
