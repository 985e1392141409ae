//! `tabbify-node`: the public edge. Parses flags and `TABBIFY_NODE_KEY`, starts the edge,
//! stops gracefully on SIGINT/SIGTERM.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tabbify_edge::auth::NodeKey;
use tabbify_edge::{Edge, EdgeConfig, Limits, Upstream};

/// The public edge of the Tabbify mesh: proxies /app/{uuid}/... to [app_ula]:8730.
///
/// The bearer key is read from the environment variable TABBIFY_NODE_KEY (at least 16
/// printable characters); the edge refuses to start without it.
#[derive(Parser, Debug)]
#[command(name = "tabbify-node", version)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "0.0.0.0:8090")]
    bind: SocketAddr,
    /// Hostname routes file (`host [path-prefix] app-uuid` per line), re-read when it changes.
    #[arg(long)]
    routes: Option<PathBuf>,
    /// How often to check the routes file for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    routes_poll: Duration,
    /// Time to connect to an app before answering 504.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Time an app has to send response headers (while the request body is not moving)
    /// before answering 504.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    upstream_timeout: Duration,
    /// Time a client has to send a request head; also the idle keep-alive limit.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// Largest request head in bytes; larger gets 431.
    #[arg(long, default_value_t = 16 * 1024)]
    max_header_bytes: usize,
    /// Most request headers; more gets 431.
    #[arg(long, default_value_t = 100)]
    max_headers: usize,
    /// Most client connections open at once; more are answered 503 and closed.
    #[arg(long, default_value_t = 16 * 1024)]
    max_connections: usize,
    /// Most client connections open at once from one IP address (IPv6: one /64); more are
    /// answered 429 and closed.
    #[arg(long, default_value_t = 64)]
    max_connections_per_ip: usize,
    /// Head and body of a request must arrive within this (0: no deadline); else 408.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Minimum request body rate in bytes per second (0: none); slower bodies are cut (408).
    #[arg(long, default_value_t = 1024)]
    min_body_rate: u64,
    /// Window (of time spent waiting on the client) over which the body rate is measured.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    body_rate_window: Duration,
    /// Waiting time at the start of a body before its rate is checked.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    body_rate_grace: Duration,
    /// A spliced WebSocket connection idle in both directions this long is closed.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    ws_idle_timeout: Duration,
    /// Listen address of the metrics listener (`/metrics`, `/health`), or `off`.
    #[arg(long, default_value = "127.0.0.1:9588", value_parser = parse_metrics_bind)]
    metrics_bind: MetricsBind,
    /// File holding a key (>= 16 printable characters) that also opens `/metrics` on the
    /// public listener to `Authorization: Bearer <key>`. Without it the public listener
    /// answers 404 for `/metrics`.
    #[arg(long)]
    metrics_key_file: Option<PathBuf>,
    /// Idle pooled connections to apps are closed after this long.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pool_idle_timeout: Duration,
    /// Worker threads (default: one per core; 1 runs a single-threaded runtime).
    #[arg(long)]
    workers: Option<usize>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Time to let open requests finish on shutdown.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// For benchmarks and tests only: send every app's traffic to HOST:PORT instead of its
    /// ULA. Never use in production.
    #[arg(long, hide = true)]
    upstream_override: Option<SocketAddr>,
}

/// The `--metrics-bind` value: an address or `off`.
#[derive(Clone, Copy, Debug)]
struct MetricsBind(Option<SocketAddr>);

fn parse_metrics_bind(s: &str) -> Result<MetricsBind, String> {
    if s == "off" || s == "none" {
        return Ok(MetricsBind(None));
    }
    s.parse()
        .map(|a| MetricsBind(Some(a)))
        .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:9588, or `off`"))
}

/// `250ms`, `5s`, `2m`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 5s or 2m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("`{s}`: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is out of range"))
}

fn main() -> std::process::ExitCode {
    tabbify_api::cli::install();
    tabbify_api::cli::finish("tabbify-node", start())
}

fn start() -> Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    let key = match std::env::var("TABBIFY_NODE_KEY") {
        Ok(k) if !k.is_empty() => NodeKey::new(&k).context("TABBIFY_NODE_KEY")?,
        _ => bail!("TABBIFY_NODE_KEY is not set: the edge has no default key and will not start without one"),
    };
    let mut config = EdgeConfig::new(args.bind, key);
    config.routes_file = args.routes.clone();
    config.limits = Limits {
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        header_read_timeout: args.header_read_timeout,
        connect_timeout: args.connect_timeout,
        upstream_timeout: args.upstream_timeout,
        pool_idle_timeout: args.pool_idle_timeout,
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        request_timeout: (!args.request_timeout.is_zero()).then_some(args.request_timeout),
        min_body_rate: args.min_body_rate,
        body_rate_window: args.body_rate_window,
        body_rate_grace: args.body_rate_grace,
        ws_idle_timeout: args.ws_idle_timeout,
        routes_poll: args.routes_poll,
    };
    if args.ws_idle_timeout.is_zero() || args.body_rate_window.is_zero() {
        bail!("--ws-idle-timeout and --body-rate-window must be longer than 0");
    }
    config.metrics_bind = args.metrics_bind.0;
    if let Some(path) = &args.metrics_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --metrics-key-file {}", path.display()))?;
        config.metrics_key = Some(
            NodeKey::new(text.trim())
                .with_context(|| format!("--metrics-key-file {}", path.display()))?,
        );
    }
    if let Some(addr) = args.upstream_override {
        tracing::warn!(%addr, "--upstream-override: every app is sent to one address (benchmarks and tests only)");
        config.upstream = Upstream::Fixed(addr);
    }
    // One worker runs on a current-thread runtime: no work-stealing scheduler, no cross-thread
    // wake-ups, the same shape as one nginx worker process.
    let mut runtime = match args.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(config, args.shutdown_grace))
}

async fn run(config: EdgeConfig, grace: Duration) -> Result<()> {
    let edge = Edge::new(config).context("configuring the edge")?;
    let running = edge.start().await.context("starting the edge")?;
    tracing::info!(addr = %running.local_addr(), metrics = ?running.metrics_addr(), "tabbify-node listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.shutdown(grace).await;
    Ok(())
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_bind_is_an_address_or_off() {
        assert_eq!(
            parse_metrics_bind("127.0.0.1:9588").unwrap().0,
            Some(SocketAddr::from(([127, 0, 0, 1], 9588)))
        );
        assert_eq!(parse_metrics_bind("off").unwrap().0, None);
        assert!(parse_metrics_bind("everywhere").is_err());
    }

    #[test]
    fn new_limit_flags_have_their_documented_defaults() {
        let args = Args::try_parse_from(["tabbify-node"]).unwrap();
        assert_eq!(args.max_connections_per_ip, 64);
        assert_eq!(args.request_timeout, Duration::from_secs(600));
        assert_eq!(args.min_body_rate, 1024);
        assert_eq!(args.ws_idle_timeout, Duration::from_secs(300));
        assert_eq!(
            args.metrics_bind.0,
            Some(SocketAddr::from(([127, 0, 0, 1], 9588)))
        );
        assert!(args.metrics_key_file.is_none());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }
}
