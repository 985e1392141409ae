//! `tabbify-mesh`: the joiner's command line.
//!
//! * `genkey` / `pubkey` — keys as `wg` prints them (base64).
//! * `up --config FILE` — a TUN and the WireGuard engine from a wg-quick file, in the
//!   foreground; SIGINT/SIGTERM remove the interface and exit 0.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

use tabbify_dataplane::config::{self, Config, Key};
use tabbify_dataplane::core::peer::PeerConfig;
use tabbify_dataplane::core::table::Table;
use tabbify_dataplane::device;
use tabbify_dataplane::driver::{DriverKind, Engine, EngineOptions};
use tabbify_dataplane::sys::link;

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
    /// Read a public key on stdin, print the peer ULA the mesh derives from it.
    Ula,
    /// Bring up an interface from a wg-quick file and run in the foreground.
    Up {
        /// The wg-quick configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Interface name (default: the file name without `.conf`).
        #[arg(long, short)]
        interface: Option<String>,
        /// Worker threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Force a driver (default: io_uring, epoll when io_uring is unavailable).
        #[arg(long, value_enum)]
        driver: Option<DriverArg>,
        /// TUN segmentation offloads and UDP GSO/GRO.
        #[arg(long, value_enum, default_value = "on")]
        offloads: OnOff,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Genkey => genkey(),
        Cmd::Pubkey => pubkey(),
        Cmd::Ula => ula(),
        Cmd::Up {
            config,
            interface,
            threads,
            driver,
            offloads,
        } => up(config, interface, threads, driver, offloads == OnOff::On),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tabbify-mesh: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        .context("reading the public key from stdin")?;
    let key = Key::from_base64(s.trim()).context("public key on stdin")?;
    println!("{}", tabbify_control::ula::peer_ula(&key.0));
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

fn up(
    path: PathBuf,
    interface: Option<String>,
    threads: usize,
    driver: Option<DriverArg>,
    offloads: bool,
) -> anyhow::Result<()> {
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
    let table = Arc::new(Table::new(
        boringtun::x25519::StaticSecret::from(cfg.interface.private_key.0),
        cfg.interface.listen_port.unwrap_or(0),
    ));
    for p in &cfg.peers {
        table.upsert_peer(PeerConfig {
            public_key: p.public_key.0,
            preshared_key: p.preshared_key.map(|k| k.0),
            endpoint: p.endpoint,
            allowed_ips: p.allowed_ips.clone(),
            persistent_keepalive: p.persistent_keepalive,
        })?;
    }
    let opts = EngineOptions {
        interface: name.clone(),
        threads,
        driver: driver.map(|d| match d {
            DriverArg::Uring => DriverKind::Uring,
            DriverArg::Epoll => DriverKind::Epoll,
        }),
        offloads,
        listen_port: cfg.interface.listen_port.unwrap_or(0),
    };
    let engine = Engine::start(&opts, table.clone())
        .with_context(|| format!("starting the engine on {name}"))?;
    let info = engine.info.clone();
    tracing::info!(
        interface = %name,
        driver = %info.driver,
        threads = info.threads,
        tun_offloads = %info.tun,
        udp_gso = info.udp.gso,
        udp_gro = info.udp.gro,
        listen_port = info.listen_port,
        "engine started"
    );
    let mtu = u32::from(cfg.interface.mtu.unwrap_or(1420));
    if mtu < 1280 || mtu as usize > tabbify_dataplane::core::pipeline::MAX_MTU {
        bail!(
            "MTU {mtu} is out of range: 1280 (the IPv6 minimum) to {}",
            tabbify_dataplane::core::pipeline::MAX_MTU
        );
    }
    link::up(&name, mtu)?;
    for a in &cfg.interface.addresses {
        link::add_address(&name, a)?;
    }
    for p in &cfg.peers {
        for n in &p.allowed_ips {
            if let Err(e) = link::add_route(&name, n) {
                tracing::warn!(prefix = %n, error = %e, "route not added");
            }
        }
    }
    let uapi = device::serve_uapi(&name, table.clone(), engine.shared.clone())
        .with_context(|| format!("opening the UAPI socket for {name}"))?;

    let term = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, term.clone()).context("installing signal handlers")?;
    }
    tracing::info!(interface = %name, "up; SIGINT or SIGTERM to stop");
    while !term.load(Ordering::Relaxed) && !engine.failed() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed = engine.failed();
    let drops = engine.shared.counters.nonzero();
    drop(uapi);
    engine.stop();
    for (reason, n) in drops {
        tracing::info!(reason = reason.name(), count = n, "dropped packets");
    }
    if failed {
        bail!("a worker failed; see the log above");
    }
    tracing::info!(interface = %name, "interface removed");
    Ok(())
}
