//! `tabbify-mesh-relay`: the relay as a process.
//!
//! tabbify-mesh-relay --listen ADDR --tls-cert PEM --tls-key PEM --tls-ca PEM
//!   [--metrics-bind ADDR] [--max-sessions N] [--max-sessions-per-identity N]
//!   [--rate-mbit N] [--burst-kib N] [--idle-timeout-secs N] [--token-key PATH]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tabbify_relay::server::{self, core::Limits, Relay};

/// The Tabbify mesh relay.
#[derive(Parser, Debug)]
#[command(name = "tabbify-mesh-relay", version)]
struct Args {
    /// TCP (TLS) and UDP address: the same port number serves both.
    #[arg(long, default_value = "[::]:443")]
    listen: SocketAddr,
    /// The relay's server certificate (PEM), issued by the mesh CA.
    #[arg(long)]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// The mesh CA (PEM): clients must present a certificate it signed.
    #[arg(long)]
    tls_ca: PathBuf,
    /// Where `/metrics` (Prometheus text, plain HTTP) is served.
    #[arg(long, default_value = "127.0.0.1:9091")]
    metrics_bind: SocketAddr,
    /// Most live sessions.
    #[arg(long, default_value_t = 10_000)]
    max_sessions: usize,
    /// Most live sessions per member identity (certificate CN).
    #[arg(long, default_value_t = 4)]
    max_sessions_per_identity: usize,
    /// Per-session forwarding rate, Mbit/s.
    #[arg(long, default_value_t = 2_500)]
    rate_mbit: u64,
    /// Per-session burst, KiB.
    #[arg(long, default_value_t = 4_096)]
    burst_kib: u64,
    /// Sessions without traffic, BIND or keepalive for this long end.
    #[arg(long, default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Most connections at once still in TLS, upgrade or proof; more are closed at accept.
    #[arg(long, default_value_t = 1024)]
    max_handshakes: usize,
    /// The coordinator's relay-token public key (`relay-token.pub` in its --state-dir):
    /// clients without a certificate are admitted with a token it signed, for the
    /// WireGuard key the token names. Without it only mesh mTLS admits.
    #[arg(long)]
    token_key: Option<PathBuf>,
}

fn read(p: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

fn main() -> std::process::ExitCode {
    tabbify_api::cli::install();
    tabbify_api::cli::finish("tabbify-mesh-relay", run())
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let tls = server::server_config(&read(&a.tls_cert)?, &read(&a.tls_key)?, &read(&a.tls_ca)?)?;
    let token_key = match &a.token_key {
        Some(p) => Some(
            tabbify_api::relay_token::decode_public(&read(p)?).with_context(|| {
                format!(
                    "--token-key {}: not a base64 Ed25519 public key",
                    p.display()
                )
            })?,
        ),
        None => None,
    };
    let relay = Relay::start_with_token_key(
        server::Config {
            listen: a.listen,
            metrics: Some(a.metrics_bind),
            tls,
            limits: Limits {
                max_sessions: a.max_sessions,
                max_sessions_per_identity: a.max_sessions_per_identity,
                rate_bytes_per_sec: a.rate_mbit.saturating_mul(125_000),
                burst_bytes: a.burst_kib.saturating_mul(1024),
                idle_timeout: Duration::from_secs(a.idle_timeout_secs.max(1)),
                max_handshakes: a.max_handshakes,
            },
        },
        token_key,
    )
    .await?;
    tracing::info!(addr = %relay.addr, metrics = ?relay.metrics_addr, "relay listening (TCP+UDP)");
    println!("listening {}", relay.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
