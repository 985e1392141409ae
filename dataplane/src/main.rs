//! `tabbify-mesh`: the joiner's command line.
//!
//! * `genkey` / `pubkey` — keys as `wg` prints them (base64).
//! * `up --config FILE` — a TUN and the WireGuard engine from a wg-quick file, in the
//!   foreground; SIGINT/SIGTERM remove the interface and exit 0.
//! * `join` — the same engine driven by the coordinator's live roster.
//! * `status` / `peers` / `app add|remove` / `rotate-key` / `leave` — ask the running
//!   joiner over its local socket.
//! * `speedtest PEER` — throughput and RTT to a peer's responder over the mesh
//!   (`join::speedtest`), with the path the running joiner reports for it.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use tabbify_dataplane::config::{self, Config, Key};
use tabbify_dataplane::core::peer::PeerConfig;
use tabbify_dataplane::core::table::Table;
use tabbify_dataplane::driver::{DriverKind, EngineOptions};
use tabbify_dataplane::interface::{Interface, InterfaceSpec};
use tabbify_dataplane::join::config_file as join_file;
use tabbify_dataplane::join::control::{self, PeerStatus, Request, Status};
use tabbify_dataplane::join::metrics;
use tabbify_dataplane::join::{dns, JoinOptions, TlsFiles};
use tabbify_dataplane::policy::{self, Family};

#[derive(Parser)]
#[command(
    name = "tabbify-mesh",
    version,
    about = "The Tabbify mesh joiner: TUN + userspace WireGuard"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DriverArg {
    Uring,
    Epoll,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a new private key (base64).
    Genkey,
    /// Read a private key on stdin, print its public key.
    Pubkey,
    /// Read an identity (a member certificate's CN) on stdin, print the peer ULA the mesh
    /// derives from it (stable across key rotations).
    Ula,
    /// Bring up an interface from a wg-quick file and run in the foreground.
    Up {
        /// The wg-quick configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Interface name (default: the file name without `.conf`).
        #[arg(long, short)]
        interface: Option<String>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Join the mesh: register with the coordinator and follow its live roster.
    Join(Box<JoinArgs>),
    /// Show the running joiner: self, coordinator, hosted apps, peers.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the running joiner's peers.
    Peers {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Host apps on this node (a supervisor): their ULAs go on the TUN and are advertised.
    App {
        #[command(subcommand)]
        cmd: AppCmd,
    },
    /// Rotate the running joiner's WireGuard key now (the coordinator must accept it; the
    /// node keeps its identity, address, tags and apps, and its peers re-handshake).
    RotateKey {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure throughput and RTT to a peer over the mesh path in use (no iperf3 needed):
    /// the peer's joiner answers on [its ULA]:8731 unless it runs with
    /// `--speedtest-bind off`, and the policy must allow that port (`tag:x:tcp:8731`).
    Speedtest {
        /// The peer: its name, peer id or ULA.
        peer: String,
        /// How long each direction runs: N followed by s or ms (at most 30s).
        #[arg(long, default_value = "5s", value_parser = parse_test_duration)]
        duration: Duration,
        /// Only the peer → this node direction (default: this node → the peer, then back).
        #[arg(long, conflicts_with = "send_only")]
        reverse: bool,
        /// Only this node → the peer.
        #[arg(long)]
        send_only: bool,
        /// The responder's port on the peer.
        #[arg(long, default_value_t = tabbify_dataplane::join::speedtest::DEFAULT_PORT)]
        port: u16,
        /// RTT samples before the first transfer.
        #[arg(long, default_value_t = 10)]
        pings: u16,
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Leave the mesh: the running joiner deregisters (every peer drops this node at once)
    /// and exits. Its key stays admitted, so `join` brings it back without a token. With
    /// --coordinator and the TLS files, the node deregisters directly (no joiner needs to
    /// run: a node that died or was stopped).
    Leave {
        #[command(flatten)]
        target: Target,
        /// Deregister directly at this coordinator (repeat: tried in order until one
        /// removes the node) instead of asking the running joiner.
        #[arg(long, requires_all = ["tls_cert", "tls_key", "tls_ca"])]
        coordinator: Vec<String>,
        /// The node's client certificate (its identity is the one that leaves).
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// Its private key.
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// The mesh CA certificate.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AppCmd {
    /// Host an app: print its ULA; its runner then binds `[ULA]:8730`.
    Add {
        /// The app's UUID.
        uuid: uuid::Uuid,
        #[command(flatten)]
        target: Target,
    },
    /// Stop hosting an app.
    Remove {
        /// The app's UUID.
        uuid: uuid::Uuid,
        #[command(flatten)]
        target: Target,
    },
}

/// Engine options shared by `up` and `join`.
#[derive(clap::Args)]
struct EngineArgs {
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Force a driver (default: io_uring, epoll when io_uring is unavailable).
    #[arg(long, value_enum)]
    driver: Option<DriverArg>,
    /// TUN segmentation offloads and UDP GSO/GRO.
    #[arg(long, value_enum, default_value = "on")]
    offloads: OnOff,
    /// Worker placement: `cores` pins worker i to the i-th core the process may run on
    /// (restrict with taskset or systemd's CPUAffinity=); `none` leaves it to the scheduler.
    #[arg(long, value_enum, default_value = "cores")]
    pin: Pin,
}

/// Worker placement.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pin {
    /// One core per worker.
    Cores,
    /// No pinning.
    None,
}

impl EngineArgs {
    fn pin(&self) -> bool {
        self.pin == Pin::Cores
    }

    fn driver(&self) -> Option<DriverKind> {
        self.driver.map(|d| match d {
            DriverArg::Uring => DriverKind::Uring,
            DriverArg::Epoll => DriverKind::Epoll,
        })
    }

    fn offloads(&self) -> bool {
        self.offloads == OnOff::On
    }
}

/// Refuses an MTU the engine cannot carry (`what` names the source in the message).
fn check_mtu(what: &str, mtu: u32) -> anyhow::Result<()> {
    let max = tabbify_dataplane::core::pipeline::MAX_MTU;
    if mtu < 1280 || mtu as usize > max {
        bail!("{what} {mtu} is out of range: 1280 (the IPv6 minimum) to {max}");
    }
    Ok(())
}

/// Which running joiner to ask.
#[derive(clap::Args)]
struct Target {
    /// The joiner's interface.
    #[arg(long, short, default_value = "tabbify0")]
    interface: String,
    /// The control socket (default: `/run/tabbify-mesh/INTERFACE.sock`).
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

impl Target {
    fn path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| control::default_path(&self.interface))
    }
}

#[derive(clap::Args)]
struct JoinArgs {
    /// A TOML file with these flags as keys (`listen-port = 51821`, `tag = ["web"]`,
    /// `ephemeral = true`); flags given here override it [default: /etc/tabbify/join.toml
    /// if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The display name to ask for.
    #[arg(long)]
    name: String,
    /// A tag to ask for (repeat, or comma-separate). The join token decides the tags granted.
    #[arg(long = "tag", value_delimiter = ',')]
    tags: Vec<String>,
    /// A coordinator, https://HOST:PORT (there is no default). Repeat (or comma-separate)
    /// for several: the joiner uses one at a time, in this order, and moves to the next
    /// when one fails. A host name that resolves to several addresses counts as several.
    #[arg(long, env = "TABBIFY_MESH_COORDINATOR", value_delimiter = ',')]
    coordinator: Vec<String>,
    /// An ephemeral node (CI runners, short-lived containers): the coordinator removes it
    /// as soon as it misses its heartbeats, and it leaves the mesh when stopped with
    /// SIGINT/SIGTERM.
    #[arg(long)]
    ephemeral: bool,
    /// This node's client certificate (from `tabbify-mesh-ca issue-peer`).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The mesh CA certificate (the only root trusted).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The join token (needed until this node key has been admitted). Prefer
    /// --join-token-file: a token on the command line shows in `ps`.
    #[arg(long, env = "MESH_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file holding the join token (one line; keep it 0600). Not shown in `ps`.
    #[arg(long, env = "TABBIFY_JOIN_TOKEN_FILE", conflicts_with = "join_token")]
    join_token_file: Option<PathBuf>,
    /// TUN interface name.
    #[arg(long, short, default_value = "tabbify0")]
    interface: String,
    /// WireGuard UDP listen port.
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Where the node key and the hosted apps are kept.
    #[arg(long, default_value = "/var/lib/tabbify-mesh")]
    state_dir: PathBuf,
    #[command(flatten)]
    engine: EngineArgs,
    /// TUN MTU.
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// An endpoint to report, IP:PORT (repeat; default: every non-loopback address).
    #[arg(long = "endpoint")]
    endpoints: Vec<std::net::SocketAddr>,
    /// A STUN server to probe from the WireGuard socket besides the coordinator's,
    /// HOST:PORT (repeat; any standard RFC 5389/8489 server).
    #[arg(long = "stun", value_name = "HOST:PORT")]
    stun: Vec<String>,
    /// A relay to use besides the ones the coordinator advertises, `https://HOST:PORT`
    /// (repeat; HOST is the name on the relay's certificate from the mesh CA).
    #[arg(long = "relay", value_name = "URL")]
    relays: Vec<String>,
    /// Send every peer's traffic through the relay, never direct (perf and debugging).
    #[arg(long)]
    force_relay: bool,
    /// The local control socket (default: `/run/tabbify-mesh/INTERFACE.sock`).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Rotate the node key automatically once it is this old: N followed by d, h, m or s
    /// (the key's age is kept in the state directory).
    #[arg(long, default_value = "90d", value_parser = parse_age)]
    key_max_age: Duration,
    /// Plaintext HTTP to a loopback coordinator (development only; needs TABBIFY_ALLOW_INSECURE=1).
    #[arg(long)]
    insecure_no_mtls: bool,
    /// Serve Prometheus metrics at http://IP:PORT/metrics, or `off` [default: 127.0.0.1:9587;
    /// the default only warns if taken, an address given here must bind].
    #[arg(long, value_name = "IP:PORT|off")]
    metrics_bind: Option<String>,
    /// The speedtest responder (`tabbify-mesh speedtest`): a TCP port bound on this node's
    /// mesh ULA only (at most 2 tests at once, 30 s each), or `off`.
    #[arg(long, value_name = "PORT|off", default_value = "8731")]
    speedtest_bind: String,
    /// Mesh DNS: serve `<name>.<domain>` on [fd5a:1f00::53]:53 and 127.0.0.153:53 and point
    /// the host's resolver there through systemd-resolved, resolvconf or /etc/resolv.conf
    /// (`auto` picks the first present); `off` runs no stub and leaves the host alone.
    #[arg(long, value_enum, default_value = "auto")]
    dns: DnsArg,
    /// Accept this mesh DNS domain from the coordinator besides `mesh` and names under
    /// `internal`, `test` or `home.arpa` (a coordinator cannot claim a public domain alone).
    #[arg(long, value_name = "DOMAIN",
          value_parser = |s: &str| tabbify_api::dns::normalize_domain(s).map_err(|e| e.to_string()))]
    dns_domain: Option<String>,
    /// What to log: a level (`error` … `trace`) or per-module directives
    /// (`info,tabbify_dataplane::join=debug`). `systemctl reload` applies a change.
    #[arg(long, env = "TABBIFY_LOG", value_name = "FILTER", default_value = "info",
          value_parser = parse_log_level)]
    log_level: String,
    #[command(flatten)]
    routes: tabbify_dataplane::join::route_flags::RouteFlags,
}

/// `--log-level`: checked as `tracing_subscriber::EnvFilter` reads it.
fn parse_log_level(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?}: {e} (e.g. info, debug, or info,tabbify_dataplane=debug)"))
}

/// `--dns`.
#[derive(Clone, Copy, ValueEnum)]
enum DnsArg {
    Auto,
    Off,
    Resolved,
    Resolvconf,
    File,
}

fn main() -> ExitCode {
    tabbify_api::cli::install();
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("tabbify-mesh: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let r = match cli.cmd {
        Cmd::Genkey => genkey(),
        Cmd::Pubkey => pubkey(),
        Cmd::Ula => ula(),
        Cmd::Up {
            config,
            interface,
            engine,
        } => up(config, interface, &engine),
        Cmd::Join(args) => join(*args),
        Cmd::Status { target, json } => status(&target, json),
        Cmd::Peers { target, json } => peers(&target, json),
        Cmd::App { cmd } => app(cmd),
        Cmd::RotateKey { target, json } => rotate_key(&target, json),
        Cmd::Speedtest {
            peer,
            duration,
            reverse,
            send_only,
            port,
            pings,
            target,
            json,
        } => speedtest(
            &target,
            &peer,
            SpeedtestPlan {
                duration,
                send: !reverse,
                receive: !send_only,
                port,
                pings,
            },
            json,
        ),
        Cmd::Leave {
            target,
            coordinator,
            tls_cert,
            tls_key,
            tls_ca,
            json,
        } => match (tls_cert, tls_key, tls_ca) {
            (Some(cert), Some(key), Some(ca)) if !coordinator.is_empty() => {
                leave_directly(&coordinator, &TlsFiles { cert, key, ca }, json)
            }
            _ => leave(&target, json),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped early (`pubkey | head -c0`): quiet, as a print would be.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tabbify-mesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the error is a write to a stdout whose reader went away.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The command line, with `join`'s config file (`--config`, or the default path when it
/// exists) merged in by `join::config_file`: its keys become arguments before the command
/// line's, skipped for the flags the command line or the environment gave.
fn parse_cli() -> anyhow::Result<Cli> {
    parse_argv(std::env::args_os().collect(), |e| e.exit())
}

/// [`parse_cli`] over `argv`; a clap error goes to `fail` (at start: print and exit; on a
/// reload: an error to log).
fn parse_argv(
    argv: Vec<std::ffi::OsString>,
    fail: impl Fn(clap::Error) -> anyhow::Error,
) -> anyhow::Result<Cli> {
    let mut cmd = Cli::command();
    // A required flag may come from the file: look past its absence in this first pass
    // (the merged command line below is checked in full).
    let matches = match cmd.clone().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) if e.kind() == clap::error::ErrorKind::MissingRequiredArgument => cmd
            .clone()
            .ignore_errors(true)
            .try_get_matches_from(&argv)
            .map_err(&fail)?,
        Err(e) => return Err(fail(e)),
    };
    let Some(("join", jm)) = matches.subcommand() else {
        return Cli::from_arg_matches(&matches).map_err(fail);
    };
    let path = match jm.get_one::<PathBuf>("config") {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from(join_file::DEFAULT_PATH);
            if !p.exists() {
                return Cli::from_arg_matches(&matches).map_err(fail);
            }
            p
        }
    };
    let join_cmd = cmd
        .find_subcommand_mut("join")
        .context("the join subcommand")?;
    join_cmd.build();
    let given = |id: &str| {
        matches!(
            jm.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        )
    };
    let file = join_file::load(join_cmd, &path, given)?;
    // No global flags: argv[1] is `join`; the file's arguments go right after it.
    let at = argv
        .iter()
        .position(|a| a == "join")
        .context("`join` in the arguments")?;
    let merged: Vec<_> = argv[..=at]
        .iter()
        .cloned()
        .chain(file)
        .chain(argv[at + 1..].iter().cloned())
        .collect();
    Cli::try_parse_from(merged).map_err(fail)
}

fn genkey() -> anyhow::Result<()> {
    println!("{}", config::generate_private_key().to_base64());
    Ok(())
}

fn pubkey() -> anyhow::Result<()> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the private key from stdin")?;
    let key = Key::from_base64(s.trim()).context("private key on stdin")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", config::public_key(&key).to_base64())?;
    Ok(())
}

fn ula() -> anyhow::Result<()> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the identity from stdin")?;
    let identity = s.trim();
    if identity.is_empty() {
        anyhow::bail!("no identity on stdin (the CN of the member's certificate)");
    }
    println!("{}", tabbify_api::ula::identity_ula(identity));
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TABBIFY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
}

fn up(path: PathBuf, interface: Option<String>, engine: &EngineArgs) -> anyhow::Result<()> {
    init_tracing();
    let cfg = Config::load(&path)?;
    for ig in &cfg.ignored {
        tracing::warn!(line = ig.line, key = %ig.key, "wg-quick-only key ignored");
    }
    let name = match interface {
        Some(n) => n,
        None => path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
            .context("cannot derive an interface name from the file name; pass --interface")?,
    };
    if name.is_empty() || name.len() > 15 {
        bail!("interface name `{name}` must be 1-15 bytes");
    }
    // A default route in AllowedIPs goes through the tunnel as wg-quick does it: the
    // sockets carry a fwmark, table MARK routes everything into the TUN, and policy rules
    // keep the marked (encrypted) datagrams and the main table's specific routes outside.
    let allowed = || cfg.peers.iter().flat_map(|p| p.allowed_ips.iter());
    let default_route: Vec<Family> = [(true, Family::V4), (false, Family::V6)]
        .into_iter()
        .filter(|(v4, _)| allowed().any(|n| n.prefix_len() == 0 && n.addr().is_ipv4() == *v4))
        .map(|(_, f)| f)
        .collect();
    let fwmark = match (cfg.interface.fwmark, default_route.is_empty()) {
        (Some(m), _) => Some(m),
        (None, false) => Some(policy::DEFAULT_MARK),
        (None, true) => None,
    };
    let mtu = u32::from(cfg.interface.mtu.unwrap_or(1420));
    check_mtu("MTU", mtu)?;
    let table = Arc::new(Table::new(
        boringtun::x25519::StaticSecret::from(cfg.interface.private_key.0),
        cfg.interface.listen_port.unwrap_or(0),
    ));
    let spec = InterfaceSpec {
        engine: EngineOptions {
            interface: name.clone(),
            threads: engine.threads,
            driver: engine.driver(),
            offloads: engine.offloads(),
            listen_port: cfg.interface.listen_port.unwrap_or(0),
            pin: engine.pin(),
            fwmark,
        },
        mtu,
        addresses: cfg.interface.addresses.clone(),
        covering_routes: Vec::new(),
        routed: Vec::new(),
        // The default prefixes go into table MARK (policy routing), not the main table.
        routes: allowed().filter(|n| n.prefix_len() != 0).copied().collect(),
        default_route,
    };
    // Fail closed: the TUN, its addresses and every AllowedIPs route exist before any peer
    // does, so from the first packet on, traffic for those prefixes goes into the engine
    // (which answers "unreachable" while no peer covers it), never out of another interface.
    let iface = Interface::start(&spec, table.clone())?;
    for p in &cfg.peers {
        // AllowedPortsOut/In (tabbify extension): the joiner's filter and connection
        // tracking, set in the same snapshot as the peer so no packet sees it unfiltered.
        let filter = p.port_filter();
        if filter.is_some() {
            tracing::info!(peer = %p.public_key, "port rules and connection tracking on");
        }
        table.upsert_peer_with_filter(
            PeerConfig {
                public_key: p.public_key.0,
                preshared_key: p.preshared_key.map(|k| k.0),
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: p.persistent_keepalive,
            },
            filter,
        )?;
    }
    tracing::info!(interface = %name, "up; SIGINT or SIGTERM to stop");
    let stop = loop {
        if let Some(stop) = iface.stop_reason() {
            break stop;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    iface.shut_down();
    stop.into_result()
}

fn join(a: JoinArgs) -> anyhow::Result<()> {
    let opts = join_options(a)?;
    let set_log_level = init_tracing_reloadable(&opts.log_level);
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let hooks = tabbify_dataplane::join::reload::Hooks {
        // The same parse as at start: the command line and environment of this process,
        // the config file as it is now.
        reread: Box::new(move || {
            let cli = parse_argv(argv.clone(), |e| {
                let text = e.to_string();
                anyhow::anyhow!("{}", text.lines().next().unwrap_or("invalid arguments"))
            })?;
            match cli.cmd {
                Cmd::Join(a) => join_options(*a),
                _ => bail!("the command line is no longer `join`"),
            }
        }),
        set_log_level,
    };
    tabbify_dataplane::join::run(opts, hooks)
}

/// Logging for `join`: the filter can be replaced later (a reload's `--log-level`).
fn init_tracing_reloadable(level: &str) -> tabbify_dataplane::join::reload::SetLogLevel {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(
                    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
                ),
        )
        .init();
    Box::new(move |level: &str| {
        let f = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

/// `join`'s arguments, checked, as the joiner's options.
fn join_options(a: JoinArgs) -> anyhow::Result<JoinOptions> {
    let coordinators: Vec<String> = a
        .coordinator
        .iter()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect();
    if coordinators.is_empty() {
        bail!(
            "no coordinator given: pass --coordinator https://HOST:PORT (repeat for several) or set TABBIFY_MESH_COORDINATOR (there is no built-in address)"
        );
    }
    if a.tags.iter().any(|t| t.trim().is_empty()) {
        bail!("--tag: empty tag");
    }
    if a.interface.is_empty() || a.interface.len() > 15 {
        bail!("--interface `{}` must be 1-15 bytes", a.interface);
    }
    check_mtu("--mtu", a.mtu)?;
    let speedtest = tabbify_dataplane::join::speedtest::parse_bind(&a.speedtest_bind)
        .map_err(anyhow::Error::msg)?;
    let metrics = match &a.metrics_bind {
        None => metrics::MetricsBind::default(),
        Some(s) => metrics::MetricsBind {
            addr: metrics::parse_bind(s).map_err(anyhow::Error::msg)?,
            explicit: true,
        },
    };
    let tls = if a.insecure_no_mtls {
        if std::env::var("TABBIFY_ALLOW_INSECURE").as_deref() != Ok("1") {
            bail!("--insecure-no-mtls is for loopback development only and needs TABBIFY_ALLOW_INSECURE=1");
        }
        None
    } else {
        match (a.tls_cert, a.tls_key, a.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
            _ => bail!(
                "mTLS needs --tls-cert, --tls-key and --tls-ca (make them with `tabbify-mesh-ca issue-peer`)"
            ),
        }
    };
    let join_token = match &a.join_token_file {
        Some(path) => Some(tabbify_dataplane::join::read_join_token_file(path)?),
        None => a.join_token.filter(|t| !t.is_empty()),
    };
    let control_socket = a
        .control_socket
        .unwrap_or_else(|| control::default_path(&a.interface));
    Ok(JoinOptions {
        name: a.name,
        tags: a.tags.into_iter().map(|t| t.trim().to_owned()).collect(),
        coordinators,
        ephemeral: a.ephemeral,
        tls,
        join_token,
        interface: a.interface,
        listen_port: a.listen_port,
        mtu: a.mtu,
        state_dir: a.state_dir,
        threads: a.engine.threads,
        driver: a.engine.driver(),
        offloads: a.engine.offloads(),
        pin: a.engine.pin(),
        endpoints: a.endpoints,
        stun: a.stun,
        relays: a.relays,
        force_relay: a.force_relay,
        control_socket,
        key_max_age: a.key_max_age,
        dns: dns::Options {
            mode: match a.dns {
                DnsArg::Auto => dns::Mode::Auto,
                DnsArg::Off => dns::Mode::Off,
                DnsArg::Resolved => dns::Mode::Resolved,
                DnsArg::Resolvconf => dns::Mode::Resolvconf,
                DnsArg::File => dns::Mode::File,
            },
            domain: a.dns_domain,
        },
        metrics,
        routes: a.routes.settings().map_err(anyhow::Error::msg)?,
        snat: a.routes.snat,
        speedtest,
        log_level: a.log_level,
    })
}

/// `90d`, `12h`, `30m` or `45s` (at least one minute, at most ten years).
fn parse_age(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len());
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected N followed by d, h, m or s, e.g. 90d"))?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" => Some(n),
        _ => None,
    }
    .ok_or_else(|| format!("{s:?}: expected N followed by d, h, m or s, e.g. 90d"))?;
    if !(60..=10 * 365 * 86_400).contains(&secs) {
        return Err(format!("{s:?}: must be between 1m and 3650d"));
    }
    Ok(Duration::from_secs(secs))
}

/// `--duration`: `5s`, `500ms` (100 ms to 30 s).
fn parse_test_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected N followed by s or ms, e.g. 5s");
    let d = if let Some(ms) = s.strip_suffix("ms") {
        Duration::from_millis(ms.parse().map_err(|_| bad())?)
    } else if let Some(secs) = s.strip_suffix('s') {
        Duration::from_secs(secs.parse().map_err(|_| bad())?)
    } else {
        return Err(bad());
    };
    let max = tabbify_dataplane::join::speedtest::MAX_DURATION;
    if d < Duration::from_millis(100) || d > max {
        return Err(format!(
            "{s:?}: must be between 100ms and {}s",
            max.as_secs()
        ));
    }
    Ok(d)
}

/// What `speedtest` runs.
struct SpeedtestPlan {
    duration: Duration,
    send: bool,
    receive: bool,
    port: u16,
    pings: u16,
}

/// `speedtest --json`.
#[derive(serde::Serialize)]
struct SpeedtestReport {
    peer: String,
    peer_id: String,
    ula: std::net::Ipv6Addr,
    responder: std::net::SocketAddr,
    /// `"direct"` or `"relay"`, from the running joiner after the test.
    path: String,
    /// The relay's URL when relayed.
    relay: Option<String>,
    /// The path in words, as `peers` prints it.
    path_words: String,
    /// The path before the test, when it differs (a path change during the test).
    path_before: Option<String>,
    send: Option<tabbify_dataplane::join::speedtest::Throughput>,
    receive: Option<tabbify_dataplane::join::speedtest::Throughput>,
    rtt: tabbify_dataplane::join::speedtest::Rtt,
}

fn speedtest(t: &Target, who: &str, plan: SpeedtestPlan, json: bool) -> anyhow::Result<()> {
    use tabbify_dataplane::join::speedtest::{self as st, Direction};
    let find = || -> anyhow::Result<PeerStatus> {
        let v = control::call(&t.path(), &Request::Peers)?;
        let peers: Vec<PeerStatus> = serde_json::from_value(v).context("the joiner's peers")?;
        let ula: Option<std::net::Ipv6Addr> = who.parse().ok();
        peers
            .into_iter()
            .find(|p| p.name == who || p.peer_id == who || Some(p.ula) == ula)
            .with_context(|| {
                format!("no peer {who:?} in this node's roster (by name, peer id or ULA; see `tabbify-mesh peers`)")
            })
    };
    let before = find()?;
    let addr = std::net::SocketAddr::new(std::net::IpAddr::V6(before.ula), plan.port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let mut rtt = st::Rtt::default();
    let (mut send, mut receive) = (None, None);
    let mut pings = plan.pings;
    for (dir, wanted) in [
        (Direction::Send, plan.send),
        (Direction::Receive, plan.receive),
    ] {
        if !wanted {
            continue;
        }
        let m = rt.block_on(st::run_test(addr, dir, plan.duration, pings))?;
        if pings > 0 {
            rtt = m.rtt;
            pings = 0;
        }
        match dir {
            Direction::Send => send = Some(m.throughput),
            Direction::Receive => receive = Some(m.throughput),
        }
    }
    let after = find()?;
    let words = path_words(&after);
    let words_before = path_words(&before);
    let report = SpeedtestReport {
        peer: after.name.clone(),
        peer_id: after.peer_id.clone(),
        ula: after.ula,
        responder: addr,
        path: after.path.clone(),
        relay: after.relay.clone(),
        path_before: (words_before != words).then_some(words_before),
        path_words: words,
        send,
        receive,
        rtt,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("speedtest to {} ({}) at {}", report.peer, report.ula, addr);
    println!("path:     {}", report.path_words);
    if let Some(b) = &report.path_before {
        println!("          (was {b} before the test)");
    }
    let line = |label: &str, t: &st::Throughput| {
        println!(
            "{label} {:.3} Gbit/s ({} bytes in {:.2} s)",
            t.gbit_s, t.bytes, t.seconds
        );
    };
    if let Some(s) = &report.send {
        line("send:    ", s);
    }
    if let Some(r) = &report.receive {
        line("receive: ", r);
    }
    if report.rtt.samples > 0 {
        println!(
            "rtt:      min {:.3} ms, avg {:.3} ms ({} samples over TCP)",
            report.rtt.min_ms, report.rtt.avg_ms, report.rtt.samples
        );
    }
    Ok(())
}

fn rotate_key(t: &Target, json: bool) -> anyhow::Result<()> {
    let v = control::call(&t.path(), &Request::RotateKey)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let r: tabbify_api::local::KeyRotated =
        serde_json::from_value(v).context("the joiner's answer")?;
    println!("rotated: {} -> {}", r.old_public_key, r.public_key);
    println!("peer id and ULA unchanged: {} {}", r.peer_id, r.ula);
    Ok(())
}

fn leave(t: &Target, json: bool) -> anyhow::Result<()> {
    let v = control::call(&t.path(), &Request::Leave)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let r: tabbify_api::LeaveResponse = serde_json::from_value(v).context("the joiner's answer")?;
    println!(
        "left the mesh: peer {} removed; the joiner exits",
        r.peer_id
    );
    Ok(())
}

/// `leave --coordinator … --tls-*`: `POST /v1/mesh/leave` as the certificate's identity,
/// at each coordinator in turn until one removes it.
fn leave_directly(coordinators: &[String], tls: &TlsFiles, json: bool) -> anyhow::Result<()> {
    let read = |p: &PathBuf, what: &str| {
        std::fs::read_to_string(p).with_context(|| format!("{what} {}", p.display()))
    };
    let (cert, key, ca) = (
        read(&tls.cert, "--tls-cert")?,
        read(&tls.key, "--tls-key")?,
        read(&tls.ca, "--tls-ca")?,
    );
    let cfg = tabbify_api::tls::client_config(&ca, Some((&cert, &key))).context("TLS files")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let mut errors = Vec::new();
    for url in coordinators {
        let client = tabbify_dataplane::join::client::Client::new(url, Some(cfg.clone()), None)?;
        let r = rt.block_on(client.post::<_, tabbify_api::LeaveResponse>(
            tabbify_api::PATH_LEAVE,
            &tabbify_api::LeaveRequest {},
        ));
        match r {
            Ok(r) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    println!("left the mesh: peer {} removed by {url}", r.peer_id);
                }
                return Ok(());
            }
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    bail!("no coordinator removed this node: {}", errors.join("; "))
}

fn status(t: &Target, json: bool) -> anyhow::Result<()> {
    let v = control::call(&t.path(), &Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s: Status = serde_json::from_value(v).context("the joiner's status")?;
    println!(
        "interface:   {} ({}, port {})",
        s.interface, s.driver, s.listen_port
    );
    println!("name:        {} [{}]", s.name, s.tags.join(", "));
    println!("peer id:     {}", s.peer_id);
    println!("ula:         {}", s.ula);
    println!("public key:  {}", s.public_key);
    println!(
        "coordinator: {}{} ({}{})",
        s.coordinator.url,
        s.coordinator
            .address
            .map(|a| format!(" at {a}"))
            .unwrap_or_default(),
        if s.registered {
            "registered"
        } else {
            "not registered"
        },
        match s.reflexive_endpoint {
            Some(r) => format!(", seen as {r}"),
            None => String::new(),
        }
    );
    if s.coordinator.targets.len() > 1 {
        for c in &s.coordinator.targets {
            println!(
                "  {} {}{}",
                if c.in_use { "*" } else { "-" },
                c.url,
                c.address.map(|a| format!(" at {a}")).unwrap_or_default()
            );
        }
    }
    println!(
        "nat: {}{}",
        s.nat.describe(),
        if s.mapped_endpoints.is_empty() {
            String::new()
        } else {
            let m: Vec<String> = s.mapped_endpoints.iter().map(|e| e.to_string()).collect();
            format!(", mapped as {}", m.join(", "))
        }
    );
    match &s.dns {
        None => println!("dns:         off"),
        Some(d) => match (&d.domain, &d.refused) {
            (Some(dom), _) => println!(
                "dns:         <name>.{dom} and <uuid>.app.{dom} served on {} and {} (host resolver: {})",
                d.address, d.address_v4, d.host
            ),
            (None, Some(why)) => println!(
                "dns:         no mesh names ({why}); {} and {} only forward",
                d.address, d.address_v4
            ),
            (None, None) => println!(
                "dns:         listening on {} and {}, waiting for the coordinator's domain",
                d.address, d.address_v4
            ),
        },
    }
    print_routes(&s.routes);
    if let Some(c) = &s.concentrator {
        let n = c.serving.len();
        println!(
            "concentrator: serving {n} client{}",
            if n == 1 { "" } else { "s" }
        );
        for (peer, why) in &c.refused {
            println!("refused:     client entry {peer}: {why}");
        }
    }
    println!(
        "metrics:     {}",
        s.metrics
            .as_deref()
            .map_or("off".to_owned(), |a| format!("http://{a}/metrics"))
    );
    match &s.home_relay {
        Some(h) => println!("home relay:  {h}"),
        None if s.relays.is_empty() => println!("home relay:  none (no relays known)"),
        None => println!("home relay:  none reachable yet"),
    }
    for r in &s.relays {
        println!(
            "  relay {}: {}{}",
            r.url,
            match (r.session, r.udp_bound) {
                (true, true) => "session up, UDP bound",
                (true, false) => "session up, UDP not bound (frames over the TLS stream)",
                (false, _) => "no session",
            },
            r.error
                .as_deref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        );
    }
    if !s.hosted_apps.is_empty() {
        println!("apps:");
        for a in &s.hosted_apps {
            match &a.contested {
                Some(why) => println!("  {}  {}  CONTESTED: {why}", a.uuid, a.ula),
                None => println!("  {}  {}", a.uuid, a.ula),
            }
        }
    }
    println!();
    print_peers(&s.peers);
    Ok(())
}

fn peers(t: &Target, json: bool) -> anyhow::Result<()> {
    let v = control::call(&t.path(), &Request::Peers)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let p: Vec<PeerStatus> = serde_json::from_value(v).context("the joiner's peers")?;
    print_peers(&p);
    Ok(())
}

fn print_peers(peers: &[PeerStatus]) {
    if peers.is_empty() {
        println!("no peers");
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!(
        "{:<20} {:<28} {:<24} {:>10} {:>12} {:>12}  path",
        "name", "ula", "endpoint", "handshake", "rx", "tx"
    );
    for p in peers {
        let hs = match p.latest_handshake {
            Some(t) => format!("{}s ago", now.saturating_sub(t)),
            None => "never".into(),
        };
        let ep = p
            .endpoint
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<28} {:<24} {:>10} {:>12} {:>12}  {}",
            p.name,
            p.ula.to_string(),
            ep,
            hs,
            p.rx_bytes,
            p.tx_bytes,
            path_words(p)
        );
        for a in &p.app_ulas {
            println!("  app {a}");
        }
    }
}

/// A peer's path in words: direct, or through which relay and why.
fn path_words(p: &PeerStatus) -> String {
    let live = p.latest_handshake.is_some_and(|t| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        now.saturating_sub(t) < 180
    });
    let mut out = match (p.path.as_str(), &p.relay) {
        ("relay", Some(url)) => format!("relayed via {url}"),
        _ if live => "direct".to_owned(),
        _ => "no session".to_owned(),
    };
    if let Some(why) = &p.reason {
        if p.path == "relay" {
            out.push_str(&format!(" ({why})"));
        } else {
            out.push_str(&format!(" (no relay to use: {why})"));
        }
    }
    if p.stale {
        out.push_str(" (stale at coordinator)");
    }
    out
}

fn app(cmd: AppCmd) -> anyhow::Result<()> {
    match cmd {
        AppCmd::Add { uuid, target } => {
            let v = control::call(&target.path(), &Request::AppAdd { uuid })?;
            println!(
                "{}",
                v.get("ula").and_then(|u| u.as_str()).unwrap_or_default()
            );
        }
        AppCmd::Remove { uuid, target } => {
            control::call(&target.path(), &Request::AppRemove { uuid })?;
        }
    }
    Ok(())
}

/// `status`'s routes lines (issue 15); nothing when no route feature is in use.
fn print_routes(r: &tabbify_api::local::RoutesStatus) {
    if let Some(v4) = r.ipv4 {
        println!("mesh IPv4:   {v4}");
    }
    for a in &r.advertised {
        let what = if a.exit_node { " (exit node)" } else { "" };
        println!("advertises:  {}{what}: {:?}", a.prefix, a.state);
    }
    match (&r.exit_node, &r.exit_node_in_use) {
        (Some(want), Some(id)) => println!("exit node:   {want} ({id})"),
        (Some(want), None) => println!(
            "exit node:   {want}: not in the roster as an exit node this member may use; internet traffic is refused"
        ),
        (None, _) => {}
    }
    for (prefix, via) in &r.installed {
        println!("route:       {prefix} via {via}");
    }
    for (peer, why) in &r.refused {
        println!("refused:     route from {peer}: {why}");
    }
}
