//! `tabbify-mesh-coordinator`: the control plane service.
//!
//! ```text
//! tabbify-mesh-coordinator --bind ADDR --tls-cert F --tls-key F --tls-ca F --policy-file F
//!     [--auth-url URL] [--auth-ca F] [--admin NAME]... [--state-dir DIR]
//!     [--database postgres://… [--change-log-keep-secs N] [--change-log-keep-rows N]]
//!     [--heartbeat-secs N] [--stale-after SECS] [--max-streams-per-identity N]
//!     [--max-connections N] [--max-connections-per-ip N] [--heartbeat-burst N]
//!     [--heartbeat-per-sec R] [--tls-handshake-secs N] [--stun-bind ADDR|off]...
//!     [--relay [--relay-bind ADDR] [--relay-public-url URL] [--relay-metrics-bind ADDR]]
//!     [--relay-url URL]...
//!     [--insecure-no-mtls]
//! ```
//!
//! `--relay` runs the mesh relay (`tabbify_relay::server::Relay`) in this process, on
//! `--relay-bind` (TCP for the TLS stream and UDP for frames and STUN on the same port;
//! default: the `--bind` IP with the `--bind` port + 2, because the port itself is HTTPS on
//! TCP and STUN on UDP, and port + 1 is the second STUN port), with the coordinator's
//! certificate, key and CA, admitting members by mTLS or by the relay tokens this
//! coordinator signs.
//!
//! SIGHUP (`systemctl reload`) re-reads the policy file and the TLS certificate, key and CA
//! without dropping a connection or stream (`reload`); SIGINT/SIGTERM stop it.
//!
//! Admin subcommands, talking to a running coordinator with an admin certificate
//! (`tabbify-mesh-ca issue-admin`):
//!
//! ```text
//! tabbify-mesh-coordinator admin-login --coordinator https://HOST:PORT --tls-cert F --tls-key F --tls-ca F [--ttl 10m]
//! tabbify-mesh-coordinator policy test --coordinator URL --tls-cert F --tls-key F --tls-ca F SRC DST PROTO:PORT [--json]
//! tabbify-mesh-coordinator client add NAME --tag T... [--concentrator NAME|PEER_ID] [--endpoint HOST:PORT] [--no-dns] [--out DIR] (+ connection options)
//! tabbify-mesh-coordinator client list [--json] (+ connection options)
//! tabbify-mesh-coordinator client revoke ID|NAME (+ connection options)
//! ```
//!
//! `client add` mints a stock WireGuard client (`POST /v1/clients`): it writes `NAME.conf`
//! (the wg-quick file with the private key, mode 0600) and `NAME.png` (its QR code) into
//! `--out` and prints the QR code to the terminal.
//!
//! `admin-login` prints a one-time dashboard login URL; `policy test` asks
//! `POST /v1/policy/test` whether SRC may open PROTO:PORT on DST and which rule decides.
//!
//! Prints `listening on ADDR` on stdout once it accepts connections (its STUN server, if
//! any, answers by then), after `relay on ADDR` when it runs the relay.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tabbify_control::api::PolicyDocument;
use tabbify_control::auth::AuthClient;
use tabbify_control::clock::SystemClock;
use tabbify_control::server::{self, Config, Coordinator, ALLOW_INSECURE_ENV};
use tabbify_control::stun::StunBind;
use tabbify_control::{relays, tls};

#[derive(Parser)]
#[command(
    name = "tabbify-mesh-coordinator",
    about = "The Tabbify mesh control plane",
    after_help = "Admin subcommands (against a running coordinator, with an admin certificate):\n  \
                  tabbify-mesh-coordinator admin-login --help\n  \
                  tabbify-mesh-coordinator policy test --help\n  \
                  tabbify-mesh-coordinator client --help"
)]
struct Cli {
    /// Address to listen on, e.g. 0.0.0.0:8443 or 127.0.0.1:0.
    #[arg(long)]
    bind: SocketAddr,
    /// Server certificate (PEM), from `tabbify-mesh-ca issue-coordinator`.
    #[arg(long, required_unless_present = "insecure_no_mtls")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, required_unless_present = "insecure_no_mtls")]
    tls_key: Option<PathBuf>,
    /// The mesh CA (PEM): clients must present a certificate it signed.
    #[arg(long, required_unless_present = "insecure_no_mtls")]
    tls_ca: Option<PathBuf>,
    /// The ACL policy (JSON; see the README).
    #[arg(long)]
    policy_file: PathBuf,
    /// Validate join tokens with POST {URL}/v1/join-tokens/validate.
    #[arg(long)]
    auth_url: Option<String>,
    /// CA (PEM) for an https --auth-url (default: --tls-ca).
    #[arg(long)]
    auth_ca: Option<PathBuf>,
    /// Legacy narrowing of the admin role (repeatable): with mTLS an admin is a certificate
    /// from `tabbify-mesh-ca issue-admin`; if any --admin is given, its CN must also be
    /// listed. Never makes a peer certificate an admin. Without mTLS: the identity header
    /// values allowed on the admin routes.
    #[arg(long = "admin")]
    admins: Vec<String>,
    /// Directory for tokens, admissions, revocations and the policy in force (the SQLite
    /// database `state.db`; a `state.log` found there is imported once).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Keep that state in PostgreSQL instead (`postgres://user@host/db`).
    #[arg(long, env = "TABBIFY_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
    /// PostgreSQL: change-log entries are pruned once older than this many seconds
    /// (a `Last-Event-ID` from before the pruned horizon gets a snapshot).
    #[arg(long, default_value_t = 86_400)]
    change_log_keep_secs: u64,
    /// PostgreSQL: at most this many change-log entries are kept.
    #[arg(long, default_value_t = 100_000)]
    change_log_keep_rows: u64,
    /// Heartbeat interval handed to peers; three missed ones make a peer stale.
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// Seconds a peer that missed its heartbeats stays in rosters (marked stale) before it
    /// is removed.
    #[arg(long, default_value_t = 3600)]
    stale_after: u64,
    /// Most SSE streams one identity may hold open (more: 429).
    #[arg(long, default_value_t = 4)]
    max_streams_per_identity: usize,
    /// Most open connections overall (more: 503, or closed).
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
    /// Most open connections from one source IP (more: 429, or closed).
    #[arg(long, default_value_t = 512)]
    max_connections_per_ip: usize,
    /// Heartbeats and registrations one identity may send at once (token bucket size).
    #[arg(long, default_value_t = 10)]
    heartbeat_burst: u32,
    /// Heartbeats and registrations per second one identity may sustain (bucket refill).
    #[arg(long, default_value_t = 1.0)]
    heartbeat_per_sec: f64,
    /// Seconds a client has to complete the TLS handshake.
    #[arg(long, default_value_t = 3)]
    tls_handshake_secs: u64,
    /// UDP address for the STUN server (repeatable). Default: the --bind address's IP with
    /// the port the HTTP listener got and that port + 1 (two server endpoints, so joiners
    /// can classify their NAT); `off` runs no STUN server.
    #[arg(long = "stun-bind", value_name = "ADDR|off")]
    stun_bind: Vec<String>,
    /// Run the mesh relay in this process (needs mTLS) and advertise it first.
    #[arg(long)]
    relay: bool,
    /// TCP+UDP address of the in-process relay. Default: the --bind IP, port --bind + 2
    /// (8445 for 8443); production relays usually take 443 (`[::]:443`).
    #[arg(long, value_name = "ADDR", requires = "relay")]
    relay_bind: Option<SocketAddr>,
    /// The in-process relay's URL as members reach it (`https://HOST:PORT`; HOST must be in
    /// the coordinator certificate). Default: the host name the member used to reach the
    /// coordinator, with the relay's port.
    #[arg(long, value_name = "URL", requires = "relay")]
    relay_public_url: Option<String>,
    /// Where the in-process relay serves its own `/metrics` (plain HTTP; keep it on
    /// loopback or a private network). Default: not served.
    #[arg(long, value_name = "ADDR", requires = "relay")]
    relay_metrics_bind: Option<SocketAddr>,
    /// Another relay to advertise (`https://HOST:PORT`, repeatable), after the own one.
    #[arg(long = "relay-url", value_name = "URL")]
    relay_urls: Vec<String>,
    /// The mesh DNS domain sent to members: they serve `<name>.DOMAIN` and
    /// `<uuid>.app.DOMAIN`. A joiner takes a domain other than `mesh` or one under
    /// `internal`, `home.arpa` or `test` only if started with the same `--dns-domain`.
    #[arg(long, value_name = "DOMAIN", default_value = tabbify_api::dns::DEFAULT_DOMAIN,
          value_parser = |s: &str| tabbify_api::dns::normalize_domain(s).map_err(|e| e.to_string()))]
    dns_domain: String,
    /// Serve plaintext HTTP (needs TABBIFY_ALLOW_INSECURE=1 and a loopback --bind).
    #[arg(long)]
    insecure_no_mtls: bool,
}

/// SIGHUP (`systemctl reload`): re-reads the policy file and the TLS certificate, key and
/// CA. Each part is applied on its own: an unreadable or invalid part is logged and the one
/// in force stays. Open connections and SSE streams are untouched; a new policy reaches
/// them as a policy event, new TLS files apply to connections accepted afterwards. The
/// other flags need a restart (logged).
fn reload(cli: &Cli, coordinator: &Coordinator, tls: Option<&server::TlsSource>) {
    tracing::info!(
        "SIGHUP: reloading the policy file and the TLS files (other flags need a restart)"
    );
    let policy = std::fs::read(&cli.policy_file)
        .with_context(|| format!("reading {}", cli.policy_file.display()))
        .and_then(|bytes| {
            let doc: PolicyDocument = serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing policy file {}", cli.policy_file.display()))?;
            coordinator
                .reload_policy_file(doc, blake3::hash(&bytes).to_hex().to_string())
                .map_err(|e| anyhow::anyhow!("policy file {}: {e}", cli.policy_file.display()))
        });
    match policy {
        Ok(Some(revision)) => {
            tracing::info!(revision, file = %cli.policy_file.display(), "reload: policy file applied")
        }
        Ok(None) => {
            tracing::info!(file = %cli.policy_file.display(), "reload: policy file unchanged")
        }
        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload: policy kept as it was"),
    }
    let (Some(source), Some(cert), Some(key), Some(ca)) =
        (tls, &cli.tls_cert, &cli.tls_key, &cli.tls_ca)
    else {
        return;
    };
    let fresh =
        (|| tls::server_config(&read(cert)?, &read(key)?, &read(ca)?).context("TLS set-up"))();
    match fresh {
        Ok(cfg) => {
            source.replace(cfg);
            tracing::info!(cert = %cert.display(), "reload: TLS certificate, key and CA applied to new connections");
        }
        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload: TLS files kept as they were"),
    }
    if cli.relay {
        tracing::warn!("reload: the in-process relay keeps its TLS files until a restart");
    }
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn main() -> std::process::ExitCode {
    tabbify_api::cli::install();
    let sub = std::env::args().nth(1);
    let result = match sub.as_deref() {
        Some("admin-login") => admin_login(AdminLogin::parse_from(std::env::args().skip(1))),
        Some("policy") => policy_cmd(PolicyCli::parse_from(std::env::args().skip(1))),
        Some("client") => client_cmd(ClientCli::parse_from(std::env::args().skip(1))),
        _ => run(),
    };
    tabbify_api::cli::finish("tabbify-mesh-coordinator", result)
}

/// How an admin subcommand reaches the running coordinator.
#[derive(clap::Args)]
struct Conn {
    /// The coordinator, `https://HOST:PORT` (HOST must be in its certificate).
    #[arg(long, env = "TABBIFY_COORDINATOR")]
    coordinator: String,
    /// The admin certificate (PEM), from `tabbify-mesh-ca issue-admin`.
    #[arg(long)]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// The mesh CA (PEM).
    #[arg(long)]
    tls_ca: PathBuf,
}

impl Conn {
    fn client(&self) -> anyhow::Result<tabbify_control::admin_client::AdminClient> {
        let tls = tls::client_config(
            &read(&self.tls_ca)?,
            Some((&read(&self.tls_cert)?, &read(&self.tls_key)?)),
        )
        .context("TLS set-up")?;
        tabbify_control::admin_client::AdminClient::new(&self.coordinator, tls)
            .map_err(anyhow::Error::msg)
    }
}

/// `admin-login`: prints a one-time login URL for the dashboard.
#[derive(Parser)]
#[command(name = "tabbify-mesh-coordinator admin-login")]
struct AdminLogin {
    #[command(flatten)]
    conn: Conn,
    /// How long the link may wait to be opened (600, 90s, 10m, 1h; at most 1h). The
    /// session it opens lasts 8 hours.
    #[arg(long, default_value = "10m", value_parser = tabbify_control::admin_client::parse_duration_secs)]
    ttl: u64,
}

/// `policy`: questions about the policy in force.
#[derive(Parser)]
#[command(name = "tabbify-mesh-coordinator policy")]
struct PolicyCli {
    #[command(subcommand)]
    cmd: PolicyCmd,
}

#[derive(clap::Subcommand)]
enum PolicyCmd {
    /// May SRC open PROTO:PORT on DST, and by which rule? (Members by name, identity,
    /// peer id or ULA.)
    Test {
        #[command(flatten)]
        conn: Conn,
        /// The sender.
        src: String,
        /// The receiver.
        dst: String,
        /// `tcp:8730`, `udp:53`, or a bare port (tcp).
        port: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `client`: stock WireGuard clients served by a concentrator.
#[derive(Parser)]
#[command(name = "tabbify-mesh-coordinator client")]
struct ClientCli {
    #[command(subcommand)]
    cmd: ClientCmd,
}

#[derive(clap::Subcommand)]
enum ClientCmd {
    /// Mint a client: writes NAME.conf (wg-quick, mode 0600) and NAME.png (its QR code)
    /// and prints the QR code.
    Add {
        #[command(flatten)]
        conn: Conn,
        /// Its display name.
        name: String,
        /// A tag the policy applies to it (repeat for several).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The concentrator (display name or peer id); default: the only one.
        #[arg(long)]
        concentrator: Option<String>,
        /// HOST:PORT of the concentrator for the file; default: its reflexive endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        /// Leave the DNS line out (the concentrator runs with --dns off).
        #[arg(long)]
        no_dns: bool,
        /// Where to write the files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// List the clients (no secrets).
    List {
        #[command(flatten)]
        conn: Conn,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a client (peer id or display name): its concentrator drops it.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        /// The client's peer id or display name.
        id: String,
    },
}

fn client_cmd(cli: ClientCli) -> anyhow::Result<()> {
    use base64::Engine;
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        ClientCmd::Add {
            conn,
            name,
            tags,
            concentrator,
            endpoint,
            no_dns,
            out,
        } => {
            let client = conn.client()?;
            let body = serde_json::to_value(tabbify_control::api::ClientCreateRequest {
                name: name.clone(),
                tags,
                concentrator,
                endpoint,
                dns: no_dns.then_some(false),
            })?;
            let (status, v) =
                rt.block_on(client.call("POST", tabbify_control::api::PATH_CLIENTS, Some(&body)))?;
            if status != 201 {
                bail!("the coordinator answered {status}: {}", error_text(&v));
            }
            let resp: tabbify_control::api::ClientCreateResponse =
                serde_json::from_value(v).context("reading the answer")?;
            let png = base64::engine::general_purpose::STANDARD
                .decode(&resp.qr_png)
                .context("qr_png is not base64")?;
            let conf_path = out.join(format!("{name}.conf"));
            let png_path = out.join(format!("{name}.png"));
            write_private(&conf_path, resp.config.as_bytes())?;
            std::fs::write(&png_path, png)
                .with_context(|| format!("writing {}", png_path.display()))?;
            let qr =
                tabbify_control::clients::qr_terminal(&resp.config).map_err(anyhow::Error::msg)?;
            print!("{qr}");
            println!(
                "client {} ({}) ula {} ipv4 {} via {}",
                resp.client.display_name,
                resp.client.id,
                resp.client.ula,
                resp.client.ipv4,
                resp.client.concentrator
            );
            println!("wrote {} and {}", conf_path.display(), png_path.display());
        }
        ClientCmd::List { conn, json } => {
            let client = conn.client()?;
            let (status, v) =
                rt.block_on(client.call("GET", tabbify_control::api::PATH_CLIENTS, None))?;
            if status != 200 {
                bail!("the coordinator answered {status}: {}", error_text(&v));
            }
            if json {
                println!("{v}");
            } else {
                let list: tabbify_control::api::ClientsResponse =
                    serde_json::from_value(v).context("reading the answer")?;
                for c in list.clients {
                    println!(
                        "{}\t{}\t{}\t{}\ttags={}\tvia={}",
                        c.id,
                        c.display_name,
                        c.ula,
                        c.ipv4,
                        c.tags.join(","),
                        c.concentrator
                    );
                }
            }
        }
        ClientCmd::Revoke { conn, id } => {
            let client = conn.client()?;
            let (status, v) = rt.block_on(client.call(
                "DELETE",
                &format!("{}/{id}", tabbify_control::api::PATH_CLIENTS),
                None,
            ))?;
            if status != 200 {
                bail!("the coordinator answered {status}: {}", error_text(&v));
            }
            println!("revoked client {} ({})", v["display_name"], v["id"]);
        }
    }
    Ok(())
}

/// Writes `bytes` to a new or truncated file readable by its owner only (the file holds a
/// private key).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

fn admin_login(cli: AdminLogin) -> anyhow::Result<()> {
    let client = cli.conn.client()?;
    let body = serde_json::json!({ "ttl_secs": cli.ttl });
    let (status, v) = tokio::runtime::Runtime::new()?.block_on(client.call(
        "POST",
        tabbify_control::api::PATH_LOGIN_LINKS,
        Some(&body),
    ))?;
    if status != 200 {
        bail!("the coordinator answered {status}: {}", error_text(&v));
    }
    let path = v["path"].as_str().context("answer without a path")?;
    println!("{}{path}", client.origin());
    eprintln!(
        "Open this link once within {} s (until Unix time {}); it signs the browser in as this admin.",
        cli.ttl, v["expires_at"]
    );
    Ok(())
}

fn policy_cmd(cli: PolicyCli) -> anyhow::Result<()> {
    let PolicyCmd::Test {
        conn,
        src,
        dst,
        port,
        json,
    } = cli.cmd;
    let (proto, port) = match port.split_once(':') {
        Some((p, n)) => (p.to_owned(), n),
        None => ("tcp".to_owned(), port.as_str()),
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("port {port:?} is not 0-65535"))?;
    let client = conn.client()?;
    let body = serde_json::json!({ "src": src, "dst": dst, "proto": proto, "port": port });
    let (status, v) = tokio::runtime::Runtime::new()?.block_on(client.call(
        "POST",
        tabbify_control::api::PATH_POLICY_TEST,
        Some(&body),
    ))?;
    if status != 200 {
        bail!("the coordinator answered {status}: {}", error_text(&v));
    }
    if json {
        println!("{v}");
    } else {
        println!(
            "{}: {}",
            if v["allowed"] == true {
                "allowed"
            } else {
                "refused"
            },
            v["reason"].as_str().unwrap_or_default()
        );
        if !v["rule"].is_null() {
            println!("rule: {}", v["rule"]["rule"]);
        }
    }
    Ok(())
}

fn error_text(v: &serde_json::Value) -> String {
    v["error"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.heartbeat_secs == 0 {
        bail!("--heartbeat-secs must be at least 1");
    }
    let policy_bytes = std::fs::read(&cli.policy_file)
        .with_context(|| format!("reading {}", cli.policy_file.display()))?;
    let policy: PolicyDocument = serde_json::from_slice(&policy_bytes)
        .with_context(|| format!("parsing policy file {}", cli.policy_file.display()))?;
    let mut config = Config::new(policy, blake3::hash(&policy_bytes).to_hex().to_string());
    config.admins = cli.admins.iter().cloned().collect();
    config.state_dir = cli.state_dir.clone();
    config.database = match &cli.database {
        Some(url) => tabbify_control::storage::Database::from_url(url)?,
        None => None,
    };
    config.heartbeat_interval = Duration::from_secs(cli.heartbeat_secs);
    if cli.max_streams_per_identity == 0
        || cli.max_connections == 0
        || cli.max_connections_per_ip == 0
        || cli.heartbeat_burst == 0
        || cli.tls_handshake_secs == 0
    {
        bail!("--max-streams-per-identity, --max-connections, --max-connections-per-ip, --heartbeat-burst and --tls-handshake-secs must be at least 1");
    }
    if !(cli.heartbeat_per_sec.is_finite() && cli.heartbeat_per_sec > 0.0) {
        bail!("--heartbeat-per-sec must be a positive number");
    }
    config.stale_after = Duration::from_secs(cli.stale_after);
    config.dns_domain = cli.dns_domain.clone();
    config.change_log_keep = (
        Duration::from_secs(cli.change_log_keep_secs),
        cli.change_log_keep_rows,
    );
    config.max_streams_per_identity = cli.max_streams_per_identity;
    config.max_connections = cli.max_connections;
    config.max_connections_per_ip = cli.max_connections_per_ip;
    config.heartbeat_rate = tabbify_control::limits::RateConfig {
        burst: cli.heartbeat_burst,
        per_sec: cli.heartbeat_per_sec,
    };
    config.tls_handshake_timeout = Duration::from_secs(cli.tls_handshake_secs);
    let stun_bind = StunBind::from_args(&cli.stun_bind).map_err(anyhow::Error::msg)?;
    for u in &cli.relay_urls {
        config
            .relays
            .others
            .push(relays::parse_url("--relay-url", u).map_err(anyhow::Error::msg)?);
    }
    let relay_public = cli
        .relay_public_url
        .as_deref()
        .map(|u| relays::parse_url("--relay-public-url", u))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if cli.relay && cli.insecure_no_mtls {
        bail!("--relay needs mTLS (--tls-cert, --tls-key, --tls-ca); it cannot run with --insecure-no-mtls");
    }
    if let Some(dir) = &cli.state_dir {
        config.relay_token_key = Some(
            tabbify_control::relay_tokens::load_or_create(dir)
                .context("the relay-token key in --state-dir")?,
        );
    }

    let tls_config = if cli.insecure_no_mtls {
        server::check_insecure(cli.bind, std::env::var(ALLOW_INSECURE_ENV).ok().as_deref())?;
        config.insecure = true;
        eprintln!(
            "WARNING: serving plaintext without client authentication (loopback development only)"
        );
        None
    } else {
        let (Some(cert), Some(key), Some(ca)) = (&cli.tls_cert, &cli.tls_key, &cli.tls_ca) else {
            bail!("--tls-cert, --tls-key and --tls-ca are required (or --insecure-no-mtls)");
        };
        Some(tls::server_config(&read(cert)?, &read(key)?, &read(ca)?).context("TLS set-up")?)
    };
    if let Some(url) = &cli.auth_url {
        let ca = cli.auth_ca.as_ref().or(cli.tls_ca.as_ref());
        let client_tls = match ca {
            Some(ca) => Some(tls::client_config(&read(ca)?, None)?),
            None => None,
        };
        config.auth = Some(AuthClient::new(url, client_tls).map_err(anyhow::Error::msg)?);
    }

    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async move {
        let mut config = config;
        let listener = tokio::net::TcpListener::bind(cli.bind)
            .await
            .with_context(|| format!("binding {}", cli.bind))?;
        let local = listener.local_addr()?;
        let stun_sockets = stun_bind
            .bind(local)
            .context("binding the STUN server (--stun-bind)")?;
        config.stun_addrs = tabbify_control::stun::local_addrs(&stun_sockets)?;
        let _relay = if cli.relay {
            let (Some(cert), Some(key), Some(ca)) = (&cli.tls_cert, &cli.tls_key, &cli.tls_ca)
            else {
                bail!("--relay needs --tls-cert, --tls-key and --tls-ca");
            };
            let listen = cli.relay_bind.unwrap_or_else(|| {
                let port = match local.port() {
                    0 => 0,
                    p => p.saturating_add(2),
                };
                SocketAddr::new(local.ip(), port)
            });
            let tls = tabbify_relay::server::server_config(&read(cert)?, &read(key)?, &read(ca)?)
                .context("relay TLS set-up")?;
            let token_key = config.relay_token_key.as_ref().map(|k| k.public());
            let relay = tabbify_relay::server::Relay::start_with_token_key(
                tabbify_relay::server::Config {
                    listen,
                    metrics: cli.relay_metrics_bind,
                    tls,
                    limits: tabbify_relay::server::core::Limits::default(),
                },
                token_key,
            )
            .await
            .with_context(|| format!("starting the relay on {listen} (--relay-bind)"))?;
            config.relays.own = Some(match relay_public {
                Some(u) => relays::OwnRelay::Public(u),
                None => relays::OwnRelay::FromHost {
                    port: relay.addr.port(),
                    names: relays::cert_names(&read(cert)?),
                },
            });
            println!("relay on {}", relay.addr);
            Some(relay)
        } else {
            None
        };
        let coordinator = Coordinator::new(config, Arc::new(SystemClock::new()))?;
        tabbify_control::stun::spawn(&coordinator, stun_sockets)?;
        println!("listening on {local}");
        std::io::stdout().flush()?;
        tracing::info!(%local, mtls = tls_config.is_some(), stun = ?coordinator.config().stun_addrs, "coordinator started");
        let _sweeper = coordinator.spawn_sweeper();
        let _follower = tabbify_control::follow::spawn(&coordinator)?;
        let tls_source = tls_config.map(server::TlsSource::new);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let serving = server::serve_with(coordinator.clone(), listener, tls_source.clone());
        tokio::pin!(serving);
        loop {
            tokio::select! {
                _ = &mut serving => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hup.recv() => reload(&cli, &coordinator, tls_source.as_ref()),
            }
        }
        tracing::info!("coordinator stopping");
        anyhow::Ok(())
    })
}
