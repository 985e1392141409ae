//! `tabbify-perf`: iperf3 and ping between two network namespaces over a veth, through our
//! data plane (io_uring and epoll drivers), boringtun-cli (`--threads 1` and its default),
//! Debian's wireguard-go, wireguard-go v0.0.20250522 with offloads
//! (`wireguard-go-offload`), gotatun-cli 0.10.2, and the bare veth; and ours relayed
//! (`ours-relay-udp`, `ours-relay-tls`: two joiners pinned to a relay, see [`relayed`]).
//! Each implementation's throughput per core of daemon CPU is set against the crypto
//! bound ([`crypto`]), and every ratio names the best stock implementation it is taken
//! against. Subcommands run the benchmarks of ours alone: `peers` (1,000 peers, see
//! [`peers`]), `multi-core` (several tunnel pairs at once, see [`multicore`]) and
//! `crypto-bound`; `profile` renders flame graphs of both daemons of any implementation
//! (see [`profile`]).
//!
//! The namespaces and the veth (RPS on) are built once. Every round runs every
//! implementation once, round-robin, starting one place later each round so no
//! implementation always runs first. Each turn brings up a fresh tunnel (the same
//! implementation on both ends, IPv4 inner and outer, MTU 1420), runs TCP 1 stream, TCP 4
//! streams, UDP from the GSO sender (see [`udpload`]) and from iperf3, and ping, and
//! tears the tunnel down. A failing implementation
//! is recorded with its error and shown as FAILED in the table, never dropped.
//!
//! Output: a table of medians and ratios on stdout, one JSON file per run and a PNG plot
//! (via `perf/plot.py`) in the output directory, optionally the table and plot in a
//! README section between `<!-- perf-results:begin -->` and `<!-- perf-results:end -->`.
//! All traffic stays between the two namespaces.

mod crypto;
mod iperf;
mod multicore;
mod peers;
mod profile;
mod relayed;
mod report;
mod udpload;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::process::{set_log_dump, LogDump};
use tabbify_tests::tunnel::MTU;
use tabbify_tests::wg::{Driver, Implementation, OursOptions, PortRules};
use tabbify_tests::{Inner, Netns, Tunnel, TunnelSpec, VethOptions, VethPair};

use crate::iperf::{measure_between, Metric, Server};
use crate::relayed::{RelayBed, RelayMode};
use crate::report::{ImplResult, Kind, RoundResult, Run};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "iperf3/ping through ours and stock WireGuard between two namespaces")]
struct Args {
    /// A benchmark other than the side-by-side suite (which runs without one).
    #[command(subcommand)]
    command: Option<Bench>,
    /// Rounds; each runs every implementation once.
    #[arg(long, default_value_t = 3, global = true)]
    rounds: u32,
    /// Seconds per iperf3 test.
    #[arg(long, default_value_t = 10, global = true)]
    duration: u32,
    /// Our binary (a release build; default: `release/tabbify-mesh` under
    /// `CARGO_TARGET_DIR` or the workspace's `target`); ours is reported FAILED if it is
    /// missing.
    #[arg(long, env = "TABBIFY_MESH_BIN", global = true)]
    mesh_bin: Option<PathBuf>,
    /// The relay binary for `ours-relay-udp` and `ours-relay-tls` (a release build;
    /// default: `tabbify-mesh-relay` next to the `tabbify-mesh` measured).
    #[arg(long, env = "TABBIFY_RELAY_BIN")]
    relay_bin: Option<PathBuf>,
    /// A second build of ours to compare against in the same run (A/B): adds
    /// `base-uring` and `base-epoll`, which run this binary with the same options.
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// `--threads` for ours (its default when absent).
    #[arg(long)]
    ours_threads: Option<u32>,
    /// `--pin` for ours. The default `none` because this suite runs both tunnel ends on
    /// one machine: pinned, the two daemons' workers that carry one peer's traffic land on
    /// the same core whenever the kernel's flow hashes pick the same worker index on both
    /// ends (for a whole boot), and the stock implementations are not pinned either.
    #[arg(long, value_parser = ["cores", "none"], default_value = "none")]
    ours_pin: String,
    /// `--offloads` for ours (its default when absent).
    #[arg(long, value_parser = ["on", "off"])]
    offloads: Option<String>,
    /// Only these implementations (comma-separated names; see --list).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these tests, in the suite's order (comma-separated: `tcp1`, `tcp4`, `udp`,
    /// `udp-iperf3`, `ping`; default: all). A test left out reads "not run" in the table
    /// and is absent from the JSON rounds, e.g. `--tests ping` for a quick latency A/B.
    #[arg(long, value_delimiter = ',', value_parser = ["tcp1", "tcp4", "udp", "udp-iperf3", "ping"])]
    tests: Vec<String>,
    /// List implementation names and exit.
    #[arg(long)]
    list: bool,
    /// Directory for the JSON file and the plot.
    #[arg(long, default_value = "perf/results", global = true)]
    out: PathBuf,
    /// Replace the results section of this README with the table and plot.
    #[arg(long)]
    update_readme: Option<PathBuf>,
    /// Python interpreter with matplotlib for the plot.
    #[arg(long, env = "PERF_PYTHON")]
    python: Option<PathBuf>,
    /// wireguard-go v0.0.20250522 (the version with offloads) for `wireguard-go-offload`
    /// (default: `wireguard-go-offload` on PATH; reported as not available without it).
    #[arg(long, env = "WIREGUARD_GO_OFFLOAD_BIN")]
    wireguard_go_offload_bin: Option<PathBuf>,
    /// RPS on the veth's receive queues (`on`, the default) or not (`off`: the issue's
    /// "no-RPS rig", where the single-queue veth receiver runs on one CPU).
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    veth_rps: String,
    /// Payload Gbit/s the UDP test's GSO sender offers at most (0: unpaced, as fast as
    /// the kernel takes datagrams; an unpaced sender spends a core copying datagrams the
    /// TUN's queue then drops, which on a 2-core machine is taken from the daemons).
    #[arg(long, default_value_t = 0.0, global = true)]
    udp_offer_gbps: f64,
    /// Seconds the crypto bound (ChaCha20-Poly1305 seal + open through boringtun, one
    /// core) is measured for at the start of a run; 0 skips it.
    #[arg(long, default_value_t = 3)]
    crypto_seconds: u32,
}

/// The benchmarks besides the suite.
#[derive(Debug, clap::Subcommand)]
enum Bench {
    /// The crypto bound alone: ChaCha20-Poly1305 seal + open through boringtun on one core.
    CryptoBound {
        /// Seconds to measure.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
    },
    /// Many peers (issue 17, Deliver 4): ours with 1,000 peers configured (see `peers`).
    Peers(peers::Args),
    /// Multi-core scaling (issue 17, Deliver 5): several tunnel pairs at once, ours at
    /// several `--threads` (see `multicore`).
    MultiCore(multicore::Args),
    /// Flame graphs of both daemons during TCP 1 stream and UDP (`perf record`, DWARF
    /// unwinder, frame pointers for wireguard-go; rendered with inferno) into `--out`.
    Profile(profile::Args),
    /// Internal: the UDP GSO sender of the suite's UDP test, run inside a namespace.
    #[command(hide = true)]
    UdpBlast(udpload::BlastArgs),
    /// Internal: the UDP receiver of the suite's UDP test, run inside a namespace.
    #[command(hide = true)]
    UdpSink(udpload::SinkArgs),
    /// Internal: the handshake initiators of `peers`, run inside a namespace.
    #[command(hide = true)]
    HandshakeFlood(peers::FloodArgs),
}

/// One implementation as the suite runs it.
struct Contender {
    name: &'static str,
    kind: Kind,
    /// `None` for the bare veth.
    implementation: Option<Implementation>,
    /// Why it cannot run at all (e.g. our binary is missing).
    unavailable: Option<String>,
    /// Port rules on both ends (`ours-uring-tracked`): every packet goes through the
    /// packet filter and the flow table.
    tracked: bool,
    /// A relayed case: two joiners pinned to a relay (see `relayed`).
    relay: Option<RelayMode>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    set_log_dump(LogDump::Never);
    match &args.command {
        None => {}
        Some(Bench::CryptoBound { seconds }) => {
            let gbps = crypto::bound(Duration::from_secs(u64::from(*seconds)))?;
            println!(
                "crypto bound: {gbps:.2} Gbit/s (ChaCha20-Poly1305 seal + open through \
                 boringtun, one core, {}-byte packets, {seconds} s)",
                crypto::PACKET
            );
            return Ok(());
        }
        Some(Bench::Peers(bench)) => {
            return peers::run(
                bench,
                &mesh_bin(&args)?,
                args.duration,
                args.rounds,
                &args.out,
            )
        }
        Some(Bench::MultiCore(bench)) => {
            return multicore::run(
                bench,
                &mesh_bin(&args)?,
                args.duration,
                args.rounds,
                &args.out,
            )
        }
        Some(Bench::HandshakeFlood(flood)) => return peers::flood(flood),
        Some(Bench::Profile(profile)) => return run_profile(&args, profile),
        Some(Bench::UdpBlast(blast)) => return udpload::blast(blast),
        Some(Bench::UdpSink(sink)) => return udpload::sink(sink),
    }
    let contenders = contenders(&args)?;
    if args.list {
        for contender in &contenders {
            println!("{}", contender.name);
        }
        return Ok(());
    }
    // The stock daemons are optional: one that is not installed is reported as not
    // available (see `contenders`), the rest of the run goes on.
    require(&[Tool::Iproute2, Tool::Wg, Tool::Iperf3, Tool::Ping])?;
    if args.rounds == 0 || args.duration == 0 {
        bail!("--rounds and --duration must be at least 1");
    }
    set_log_dump(LogDump::Never);

    let timestamp = utc_now()?;
    let crypto_bound_gbps = if args.crypto_seconds == 0 {
        None
    } else {
        eprintln!("perf: crypto bound ({} s, one core)", args.crypto_seconds);
        match crypto::bound(Duration::from_secs(u64::from(args.crypto_seconds))) {
            Ok(gbps) => Some(gbps),
            Err(error) => {
                eprintln!("perf: crypto bound failed: {error:#}");
                None
            }
        }
    };
    let load_before = load_average();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if load_before.is_some_and(|load| load > cores as f64 / 2.0) {
        eprintln!(
            "perf: warning: load average {:.1} on {cores} CPUs: other work will skew the figures",
            load_before.unwrap_or_default()
        );
    }
    let left = Netns::new()?;
    let right = Netns::new()?;
    let veth_rps = args.veth_rps == "on";
    let veth = VethPair::connect(
        &left,
        &right,
        &VethOptions {
            rps: veth_rps,
            ..VethOptions::default()
        },
    )?;

    let metrics = selected_metrics(&args.tests);
    let mut results: Vec<ImplResult> = contenders.iter().map(|c| new_result(c, &args)).collect();
    for round in 1..=args.rounds {
        let offset = (round as usize - 1) % contenders.len();
        for position in 0..contenders.len() {
            let index = (offset + position) % contenders.len();
            let contender = &contenders[index];
            eprintln!("perf: round {round}/{}: {}", args.rounds, contender.name);
            let (mut result, startup_log) = run_turn(
                contender,
                &veth,
                &metrics,
                args.duration,
                args.udp_offer_gbps,
            );
            result.round = round;
            result.position = position;
            for (key, error) in &result.errors {
                eprintln!(
                    "perf:   {} {key} failed: {}",
                    contender.name,
                    error.lines().next().unwrap_or("")
                );
            }
            if results[index].startup_log.is_empty() {
                results[index].startup_log = startup_log;
            }
            results[index].rounds.push(result);
        }
    }
    for result in &mut results {
        result.summarize(args.duration);
    }

    let run = Run {
        timestamp: timestamp.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        kernel: command_output("uname", &["-r"]).unwrap_or_default(),
        cpu_model: cpu_model(),
        cores,
        mtu: MTU,
        udp_payload: iperf::UDP_PAYLOAD.parse().unwrap_or(0),
        rounds: args.rounds,
        duration_s: args.duration,
        veth_rps,
        load_average: [load_before, load_average()],
        crypto_bound_gbps,
        ratios: report::ratios(&results, crypto_bound_gbps),
        best_stock: report::best_stock_names(&results),
        implementations: results,
    };
    let table = report::markdown(&run);
    println!(
        "\n{} · kernel {} · {} × {} · MTU {} · veth RPS {} · {} rounds × {} s · load average {} → {}\n",
        run.timestamp,
        run.kernel,
        run.cores,
        run.cpu_model,
        run.mtu,
        if run.veth_rps { "on" } else { "off" },
        run.rounds,
        run.duration_s,
        fmt_load(run.load_average[0]),
        fmt_load(run.load_average[1])
    );
    println!("{table}");

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let stem = timestamp.replace(':', "-");
    let json_path = args.out.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&run)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("wrote {}", json_path.display());
    let png_path = args.out.join(format!("{stem}.png"));
    let plotted = match plot(&args, &json_path, &png_path) {
        Ok(()) => {
            println!("wrote {}", png_path.display());
            true
        }
        Err(error) => {
            eprintln!("perf: no plot: {error:#}");
            false
        }
    };
    if let Some(readme) = &args.update_readme {
        update_readme(readme, &run, &table, plotted.then_some(png_path.as_path()))?;
        println!("updated {}", readme.display());
    }
    Ok(())
}

/// `tabbify-perf profile`: per implementation, a fresh tunnel per test (TCP 1 stream and
/// UDP), both daemons sampled with `perf record` for the test's whole duration, one SVG
/// per implementation and test in `--out`.
fn run_profile(args: &Args, prof: &profile::Args) -> Result<()> {
    require(&[Tool::Iproute2, Tool::Wg, Tool::Iperf3, Tool::Ping])?;
    if on_path("perf").is_none() {
        bail!("perf not on PATH (install linux-perf, Debian's package of perf)");
    }
    let run = match &prof.run {
        Some(run) => run.clone(),
        None => utc_now()?.replace(':', "-"),
    };
    let all = contenders(args)?;
    let mut chosen = Vec::new();
    for name in &prof.impls {
        let contender = all
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("unknown implementation {name:?} (see --list)"))?;
        if let Some(reason) = &contender.unavailable {
            bail!("{name}: {reason}");
        }
        if contender.implementation.is_none() || contender.relay.is_some() {
            bail!("{name}: only a tunnel on the veth has daemons to profile");
        }
        chosen.push(contender);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let left = Netns::new()?;
    let right = Netns::new()?;
    let veth = VethPair::connect(
        &left,
        &right,
        &VethOptions {
            rps: args.veth_rps == "on",
            ..VethOptions::default()
        },
    )?;
    let scratch = left.workdir().join("profile");
    std::fs::create_dir_all(&scratch)?;
    for contender in chosen {
        let Some(implementation) = &contender.implementation else {
            continue;
        };
        for (metric, test) in [(Metric::Tcp1, "tcp1"), (Metric::Udp, "udp")] {
            eprintln!("perf: profiling {} during {test}", contender.name);
            let tunnel = start_tunnel(implementation, contender.tracked, &veth)?;
            let server_addr = tunnel.right_inner[0];
            let server = Server::start(&veth.b.netns)?;
            let call_graph = profile::call_graph_for(matches!(
                implementation,
                Implementation::WireguardGo | Implementation::WireguardGoOffload { .. }
            ));
            let recorders = [
                profile::Recorder::start(
                    tunnel.left.process().pid(),
                    "client",
                    &scratch,
                    prof.freq,
                    call_graph,
                )?,
                profile::Recorder::start(
                    tunnel.right.process().pid(),
                    "server",
                    &scratch,
                    prof.freq,
                    call_graph,
                )?,
            ];
            let sample = measure_between(
                &veth.a.netns,
                &veth.b.netns,
                server_addr,
                metric,
                args.duration,
                args.udp_offer_gbps,
            );
            let recordings = recorders
                .into_iter()
                .map(profile::Recorder::stop)
                .collect::<Result<Vec<_>>>()?;
            drop(server);
            tunnel.stop()?;
            let sample = sample?;
            let svg = args
                .out
                .join(format!("{run}-{}-{test}.svg", contender.name));
            let title = format!(
                "{} · {test} · {:.2} {} · {} s · {run}",
                implementation.label(),
                sample.value,
                if metric == Metric::Ping {
                    "ms"
                } else {
                    "Gbit/s"
                },
                args.duration
            );
            let samples = profile::render(&recordings, &title, &svg)?;
            for (_, data) in &recordings {
                let _ = std::fs::remove_file(data);
            }
            println!(
                "{}: {test} {:.2} Gbit/s, {:.2} s of daemon CPU sampled → {}",
                contender.name,
                sample.value,
                samples as f64 / 1e9,
                svg.display()
            );
        }
    }
    Ok(())
}

/// Our release binary for the benchmarks that run only ours.
fn mesh_bin(args: &Args) -> Result<PathBuf> {
    release_mesh_bin(args)
        .filter(|path| path.is_file())
        .context(
        "tabbify-mesh not found (build: cargo build --release -p tabbify-dataplane, or --mesh-bin)",
    )
}

/// `--mesh-bin`, else a release build under `CARGO_TARGET_DIR` or the workspace's target.
fn release_mesh_bin(args: &Args) -> Option<PathBuf> {
    // Only a release build is worth measuring: without --mesh-bin, look in the release
    // directories and nowhere else.
    args.mesh_bin.clone().or_else(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .into_iter()
            .chain([workspace.join("target")])
            .map(|target| target.join("release").join("tabbify-mesh"))
            .find(|path| path.is_file())
    })
}

fn contenders(args: &Args) -> Result<Vec<Contender>> {
    let mesh_bin = release_mesh_bin(args);
    let unavailable = match &mesh_bin {
        Some(path) if path.is_file() => None,
        Some(path) => Some(format!(
            "{} not found (build: cargo build --release -p tabbify-dataplane)",
            path.display()
        )),
        None => Some(
            "tabbify-mesh not found (build: cargo build --release -p tabbify-dataplane)".to_owned(),
        ),
    };
    // The relayed cases run joiners, which find `tabbify-mesh` and `tabbify-mesh-relay`
    // through these variables (tabbify_tests::bins): the builds under test, never a debug
    // build next to this runner.
    if let Some(path) = &mesh_bin {
        std::env::set_var("TABBIFY_MESH_BIN", path);
    }
    let relay_bin = args.relay_bin.clone().or_else(|| {
        mesh_bin
            .as_ref()
            .and_then(|m| m.parent())
            .map(|dir| dir.join("tabbify-mesh-relay"))
    });
    let relay_unavailable = match &relay_bin {
        Some(path) if path.is_file() => {
            std::env::set_var("TABBIFY_RELAY_BIN", path);
            None
        }
        Some(path) => Some(format!(
            "{} not found (build: cargo build --release -p tabbify-relay --bin tabbify-mesh-relay)",
            path.display()
        )),
        None => Some("tabbify-mesh-relay not found (--relay-bin)".to_owned()),
    };
    let build = |driver, binary: &Option<PathBuf>| {
        Some(Implementation::Ours(OursOptions {
            driver: Some(driver),
            offloads: args.offloads.as_deref().map(|o| o == "on"),
            threads: args.ours_threads,
            pin: Some(args.ours_pin == "cores"),
            binary: binary.clone(),
        }))
    };
    let ours = |driver| build(driver, &mesh_bin);
    let wg_go_offload = args
        .wireguard_go_offload_bin
        .clone()
        .or_else(|| on_path("wireguard-go-offload"));
    let wg_go_offload_unavailable = match &wg_go_offload {
        Some(path) if path.is_file() => None,
        Some(path) => Some(format!(
            "not available: {} not found (--wireguard-go-offload-bin)",
            path.display()
        )),
        None => Some(format!(
            "not available: wireguard-go-offload not on PATH and no --wireguard-go-offload-bin ({})",
            Tool::WireguardGoOffload.install_hint()
        )),
    };
    let mut all = vec![
        Contender {
            name: "ours-uring",
            kind: Kind::Ours,
            implementation: ours(Driver::Uring),
            unavailable: unavailable.clone(),
            tracked: false,
            relay: None,
        },
        Contender {
            name: "ours-epoll",
            kind: Kind::Ours,
            implementation: ours(Driver::Epoll),
            unavailable: unavailable.clone(),
            tracked: false,
            relay: None,
        },
        Contender {
            name: "ours-uring-tracked",
            kind: Kind::Ours,
            implementation: ours(Driver::Uring),
            unavailable: unavailable.clone(),
            tracked: true,
            relay: None,
        },
        Contender {
            name: "ours-relay-udp",
            kind: Kind::Ours,
            implementation: ours(Driver::Uring),
            unavailable: unavailable.clone().or_else(|| relay_unavailable.clone()),
            tracked: false,
            relay: Some(RelayMode::Udp),
        },
        Contender {
            name: "ours-relay-tls",
            kind: Kind::Ours,
            implementation: ours(Driver::Uring),
            unavailable: unavailable.or(relay_unavailable),
            tracked: false,
            relay: Some(RelayMode::Tls),
        },
        Contender {
            name: "boringtun-t1",
            kind: Kind::Stock,
            implementation: Some(Implementation::Boringtun { threads: Some(1) }),
            unavailable: missing_tool(Tool::BoringtunCli),
            tracked: false,
            relay: None,
        },
        Contender {
            name: "boringtun-default",
            kind: Kind::Stock,
            implementation: Some(Implementation::Boringtun { threads: None }),
            unavailable: missing_tool(Tool::BoringtunCli),
            tracked: false,
            relay: None,
        },
        Contender {
            name: "wireguard-go",
            kind: Kind::Stock,
            implementation: Some(Implementation::WireguardGo),
            unavailable: missing_tool(Tool::WireguardGo),
            tracked: false,
            relay: None,
        },
        Contender {
            name: "wireguard-go-offload",
            kind: Kind::Stock,
            implementation: Some(Implementation::WireguardGoOffload {
                binary: wg_go_offload.clone(),
            }),
            unavailable: wg_go_offload_unavailable,
            tracked: false,
            relay: None,
        },
        Contender {
            name: "gotatun",
            kind: Kind::Stock,
            implementation: Some(Implementation::Gotatun),
            unavailable: missing_tool(Tool::GotatunCli),
            tracked: false,
            relay: None,
        },
        Contender {
            name: "veth",
            kind: Kind::Veth,
            implementation: None,
            unavailable: None,
            tracked: false,
            relay: None,
        },
    ];
    if let Some(base) = &args.baseline_bin {
        let unavailable =
            (!base.is_file()).then(|| format!("{} not found (--baseline-bin)", base.display()));
        let binary = Some(base.clone());
        all.insert(
            2,
            Contender {
                name: "base-epoll",
                kind: Kind::Ours,
                implementation: build(Driver::Epoll, &binary),
                unavailable: unavailable.clone(),
                tracked: false,
                relay: None,
            },
        );
        all.insert(
            2,
            Contender {
                name: "base-uring",
                kind: Kind::Ours,
                implementation: build(Driver::Uring, &binary),
                unavailable,
                tracked: false,
                relay: None,
            },
        );
    }
    for name in &args.only {
        if !all.iter().any(|c| c.name == name) {
            bail!("unknown implementation {name:?} (see --list)");
        }
    }
    Ok(all
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.iter().any(|n| n == c.name))
        .collect())
}

fn new_result(contender: &Contender, args: &Args) -> ImplResult {
    let (driver, threads, offloads, binary) = match &contender.implementation {
        Some(Implementation::Ours(options)) => (
            options.driver.map(|d| d.as_arg().to_owned()),
            Some(
                options
                    .threads
                    .map_or_else(|| "default".to_owned(), |t| t.to_string()),
            ),
            Some(
                args.offloads
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
            ),
            options.binary.as_ref().map(|p| p.display().to_string()),
        ),
        Some(Implementation::Boringtun { threads }) => (
            None,
            Some(threads.map_or_else(|| "default".to_owned(), |t| t.to_string())),
            None,
            None,
        ),
        Some(Implementation::WireguardGo) => (None, Some("default".to_owned()), None, None),
        Some(Implementation::WireguardGoOffload { binary }) => (
            None,
            Some("default".to_owned()),
            Some("its own (TUN TSO/GRO, UDP GSO/GRO when offered)".to_owned()),
            binary.as_ref().map(|p| p.display().to_string()),
        ),
        Some(Implementation::Gotatun) => (
            None,
            Some("default (one tokio worker per CPU)".to_owned()),
            None,
            None,
        ),
        None => (None, None, None, None),
    };
    let label = match &contender.implementation {
        // The baseline build of ours reads as such in the table.
        Some(implementation) if contender.name.starts_with("base-") => {
            format!("baseline {}", implementation.label())
        }
        Some(implementation) if contender.relay.is_some() => format!(
            "{} relayed over {} (--force-relay)",
            implementation.label(),
            match contender.relay {
                Some(RelayMode::Tls) => "the relay's TLS stream",
                _ => "relay UDP",
            }
        ),
        Some(implementation) if contender.tracked => {
            format!("{} + port rules, tracked", implementation.label())
        }
        Some(implementation) => implementation.label(),
        None => "plain veth (no tunnel)".to_owned(),
    };
    ImplResult {
        name: contender.name.to_owned(),
        label,
        kind: contender.kind,
        driver,
        threads,
        offloads,
        binary,
        startup_log: Vec::new(),
        rounds: Vec::new(),
        median: BTreeMap::new(),
        median_cpu_cores: BTreeMap::new(),
        median_gbps_per_core: BTreeMap::new(),
        median_relay_cores_per_gbit: BTreeMap::new(),
    }
}

/// The metrics `--tests` selects, in the suite's order (every one when it names none).
fn selected_metrics(tests: &[String]) -> Vec<Metric> {
    Metric::ALL
        .into_iter()
        .filter(|m| tests.is_empty() || tests.iter().any(|t| t == m.test_name()))
        .collect()
}

/// One implementation's turn in a round. Never fails: errors are recorded in the result.
fn run_turn(
    contender: &Contender,
    veth: &VethPair,
    metrics: &[Metric],
    duration: u32,
    udp_offer: f64,
) -> (RoundResult, Vec<String>) {
    let mut result = RoundResult::default();
    let mut startup_log = Vec::new();
    if let Some(reason) = &contender.unavailable {
        result.errors.insert("setup".to_owned(), reason.clone());
        for &metric in metrics {
            result.values.insert(metric.key().to_owned(), None);
        }
        return (result, startup_log);
    }
    if let Some(mode) = contender.relay {
        return run_relay_turn(mode, metrics, duration, udp_offer);
    }
    let tunnel = match &contender.implementation {
        None => None,
        Some(implementation) => match start_tunnel(implementation, contender.tracked, veth) {
            Ok(tunnel) => {
                if contender.kind == Kind::Ours {
                    startup_log = tunnel
                        .left
                        .logs()
                        .lines()
                        .filter(|line| line.contains("driver") || line.contains("offload"))
                        .map(str::to_owned)
                        .collect();
                } else {
                    startup_log = tun_offloads(&tunnel.left);
                }
                Some(tunnel)
            }
            Err(error) => {
                result
                    .errors
                    .insert("setup".to_owned(), format!("{error:#}"));
                for &metric in metrics {
                    result.values.insert(metric.key().to_owned(), None);
                }
                return (result, startup_log);
            }
        },
    };
    let server_addr: IpAddr = match &tunnel {
        Some(tunnel) => tunnel.right_inner[0],
        None => veth.b.addr(false),
    };
    let mut server = match Server::start(&veth.b.netns) {
        Ok(server) => server,
        Err(error) => {
            result
                .errors
                .insert("setup".to_owned(), format!("iperf3 server: {error:#}"));
            return (result, startup_log);
        }
    };
    for &metric in metrics {
        let key = metric.key().to_owned();
        let cpu_before = tunnel.as_ref().and_then(|t| daemon_cpu(t).ok());
        let outcome = measure_between(
            &veth.a.netns,
            &veth.b.netns,
            server_addr,
            metric,
            duration,
            udp_offer,
        );
        let cpu_after = tunnel.as_ref().and_then(|t| daemon_cpu(t).ok());
        match outcome {
            Ok(sample) => {
                result.values.insert(key.clone(), Some(sample.value));
                result.lost.insert(key.clone(), sample.lost);
            }
            Err(error) => {
                result.values.insert(key.clone(), None);
                result.errors.insert(key.clone(), format!("{error:#}"));
            }
        }
        if metric != Metric::Ping {
            let cpu = match (cpu_before, cpu_after) {
                (Some(before), Some(after)) => Some((after - before).as_secs_f64()),
                _ => None,
            };
            result.cpu_s.insert(key, cpu);
        }
        if let Err(error) = server.ensure_running() {
            result
                .errors
                .insert("iperf3_server".to_owned(), format!("{error:#}"));
            break;
        }
    }
    drop(server);
    if let Some(tunnel) = tunnel {
        if let Err(error) = tunnel.stop() {
            result
                .errors
                .insert("teardown".to_owned(), format!("{error:#}"));
        }
    }
    (result, startup_log)
}

/// A relayed case's turn (see `relayed`): a fresh LAN, coordinator, relay and two joiners
/// pinned to the relay; the same metrics; the joiners' CPU in `cpu_s` and the relay's in
/// `relay_cpu_s`. Never fails: errors are recorded in the result.
fn run_relay_turn(
    mode: RelayMode,
    metrics: &[Metric],
    duration: u32,
    udp_offer: f64,
) -> (RoundResult, Vec<String>) {
    let mut result = RoundResult::default();
    let fail = |result: &mut RoundResult, what: &str, error: anyhow::Error| {
        result.errors.insert(what.to_owned(), format!("{error:#}"));
        for &metric in metrics {
            result.values.entry(metric.key().to_owned()).or_insert(None);
        }
    };
    let relay_bin = match std::env::var_os("TABBIFY_RELAY_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            fail(
                &mut result,
                "setup",
                anyhow::anyhow!("no relay binary (--relay-bin)"),
            );
            return (result, Vec::new());
        }
    };
    let mut bed = match RelayBed::start(mode, &relay_bin) {
        Ok(bed) => bed,
        Err(error) => {
            fail(&mut result, "setup", error);
            return (result, Vec::new());
        }
    };
    let startup_log = bed.startup_log();
    let mut server = match Server::start(&bed.server) {
        Ok(server) => server,
        Err(error) => {
            fail(&mut result, "setup", error.context("iperf3 server"));
            return (result, startup_log);
        }
    };
    for &metric in metrics {
        let key = metric.key().to_owned();
        let before = (bed.joiners_cpu().ok(), bed.relay_cpu().ok());
        let outcome = measure_between(
            &bed.client,
            &bed.server,
            bed.server_addr,
            metric,
            duration,
            udp_offer,
        );
        let after = (bed.joiners_cpu().ok(), bed.relay_cpu().ok());
        match outcome {
            Ok(sample) => {
                result.values.insert(key.clone(), Some(sample.value));
                result.lost.insert(key.clone(), sample.lost);
            }
            Err(error) => {
                result.values.insert(key.clone(), None);
                result.errors.insert(key.clone(), format!("{error:#}"));
            }
        }
        if metric != Metric::Ping {
            let spent = |b: Option<Duration>, a: Option<Duration>| match (b, a) {
                (Some(b), Some(a)) => Some((a - b).as_secs_f64()),
                _ => None,
            };
            result.cpu_s.insert(key.clone(), spent(before.0, after.0));
            result.relay_cpu_s.insert(key, spent(before.1, after.1));
        }
        if let Err(error) = server.ensure_running() {
            result
                .errors
                .insert("iperf3_server".to_owned(), format!("{error:#}"));
            break;
        }
    }
    drop(server);
    if let Err(error) = bed.stop() {
        result
            .errors
            .insert("teardown".to_owned(), format!("{error:#}"));
    }
    (result, startup_log)
}

/// With `tracked`, both ends get port rules naming iperf3's port for TCP and UDP, so every
/// packet of every test goes through the filter and its flow table on both ends. The rules
/// restrict the direction the tests never open (the server side opening ports on the
/// client): a direction that allows all traffic still tracks every TCP and UDP flow, and
/// the client's pings (echo requests open a flow only where a direction allows all
/// traffic) keep working, so the readiness check and the ping metric run as for
/// `ours-uring`.
fn start_tunnel(implementation: &Implementation, tracked: bool, veth: &VethPair) -> Result<Tunnel> {
    let mut spec = TunnelSpec::new(implementation.clone(), implementation.clone());
    spec.inner = Inner::V4;
    spec.outer_v6 = false;
    if tracked {
        let rules = Some(format!("tcp:{port}, udp:{port}", port = iperf::PORT));
        // The client (left) lets the server open only iperf3's port on it; the server
        // (right) opens only that port on the client.
        spec.left_ports = PortRules {
            outbound: None,
            inbound: rules.clone(),
        };
        spec.right_ports = PortRules {
            outbound: rules,
            inbound: None,
        };
    }
    let tunnel = Tunnel::start_on(&spec, veth)?;
    tunnel.wait_ready(Duration::from_secs(20))?;
    Ok(tunnel)
}

/// The TUN's segmentation and receive offloads as `ethtool -k` reports them (a stock
/// daemon turns them on itself when it supports them: wireguard-go v0.0.20250522 does).
fn tun_offloads(peer: &tabbify_tests::WgPeer) -> Vec<String> {
    match peer.netns().run("ethtool", &["-k", peer.ifname()]) {
        Ok(features) => features
            .lines()
            .filter(|line| {
                [
                    "tcp-segmentation-offload:",
                    "generic-receive-offload:",
                    "tx-udp-segmentation:",
                    "rx-udp-gro-forwarding:",
                ]
                .iter()
                .any(|f| line.trim_start().starts_with(f))
            })
            .map(|line| format!("{}: {}", peer.ifname(), line.trim()))
            .collect(),
        Err(error) => vec![format!("ethtool -k {}: {error:#}", peer.ifname())],
    }
}

/// CPU time used so far by both daemons of the tunnel.
fn daemon_cpu(tunnel: &Tunnel) -> Result<Duration> {
    Ok(tunnel.left.cpu_time()? + tunnel.right.cpu_time()?)
}

fn plot(args: &Args, json: &Path, png: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("plot.py");
    let python = match &args.python {
        Some(python) => python.clone(),
        // Debian's python3-matplotlib lives with the system interpreter, which a pyenv
        // shim earlier on PATH would hide.
        None if Path::new("/usr/bin/python3").exists() => PathBuf::from("/usr/bin/python3"),
        None => PathBuf::from("python3"),
    };
    let output = Command::new(&python)
        .arg(&script)
        .arg(json)
        .arg(png)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed: {} (install python3-matplotlib)",
            python.display(),
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

const BEGIN: &str = "<!-- perf-results:begin -->";
const END: &str = "<!-- perf-results:end -->";

fn update_readme(readme: &Path, run: &Run, table: &str, png: Option<&Path>) -> Result<()> {
    let text =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(start), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{} has no {BEGIN} … {END} section", readme.display());
    };
    let mut section = format!(
        "{BEGIN}\nLatest run: {} · kernel {} · {} × {} · tunnel MTU {} · veth RPS {} · {} rounds × {} s per test · \
         load average {} → {} · `{}`\n\n{table}",
        run.timestamp, run.kernel, run.cores, run.cpu_model, run.mtu, if run.veth_rps { "on" } else { "off" }, run.rounds, run.duration_s, fmt_load(run.load_average[0]), fmt_load(run.load_average[1]), run.command
    );
    if let Some(png) = png {
        let dir = readme.parent().unwrap_or(Path::new("."));
        let latest = dir.join("results").join("latest.png");
        std::fs::copy(png, &latest)
            .with_context(|| format!("copying the plot to {}", latest.display()))?;
        section.push_str("\n![latest results](results/latest.png)\n");
    }
    section.push_str(END);
    let updated = format!("{}{section}{}", &text[..start], &text[end + END.len()..]);
    std::fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))
}

/// "not available: …" when one of `tool`'s programs is not on `PATH`.
fn missing_tool(tool: Tool) -> Option<String> {
    let missing: Vec<&str> = tool
        .programs()
        .iter()
        .copied()
        .filter(|p| on_path(p).is_none())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "not available: {} not on PATH ({})",
            missing.join(", "),
            tool.install_hint()
        )
    })
}

/// `program` found in a directory of `PATH`.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

pub(crate) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub(crate) fn fmt_load(load: Option<f64>) -> String {
    load.map_or_else(|| "?".to_owned(), |l| format!("{l:.2}"))
}

pub(crate) fn utc_now() -> Result<String> {
    command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

fn command_output(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!("{program} failed: {}", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contender<'a>(all: &'a [Contender], name: &str) -> &'a Contender {
        all.iter().find(|c| c.name == name).expect("listed")
    }

    #[test]
    fn strongest_others_are_listed_and_a_missing_one_is_not_available() {
        let args = Args::parse_from([
            "tabbify-perf",
            "--wireguard-go-offload-bin",
            "/nonexistent/wireguard-go-offload",
        ]);
        let all = contenders(&args).unwrap();
        let offload = contender(&all, "wireguard-go-offload");
        assert_eq!(offload.kind, Kind::Stock);
        let reason = offload.unavailable.as_deref().unwrap();
        assert!(
            reason.starts_with("not available: /nonexistent"),
            "{reason}"
        );
        let gotatun = contender(&all, "gotatun");
        assert_eq!(gotatun.kind, Kind::Stock);
        assert_eq!(gotatun.implementation, Some(Implementation::Gotatun));
        // Available exactly when its binary is on PATH.
        assert_eq!(gotatun.unavailable.is_none(), on_path("gotatun").is_some());
    }

    #[test]
    fn a_given_offload_binary_is_used() {
        let exe = std::env::current_exe().unwrap();
        let args = Args::parse_from([
            "tabbify-perf".as_ref(),
            "--wireguard-go-offload-bin".as_ref(),
            exe.as_os_str(),
        ]);
        let all = contenders(&args).unwrap();
        let offload = contender(&all, "wireguard-go-offload");
        assert_eq!(offload.unavailable, None);
        assert_eq!(
            offload.implementation,
            Some(Implementation::WireguardGoOffload { binary: Some(exe) })
        );
    }

    #[test]
    fn subcommands_parse_with_the_shared_options() {
        let args = Args::parse_from([
            "tabbify-perf",
            "--mesh-bin",
            "/x/tabbify-mesh",
            "multi-core",
            "--threads",
            "1,2,4",
            "--rounds",
            "2",
        ]);
        assert_eq!(args.rounds, 2);
        assert_eq!(args.mesh_bin.as_deref(), Some(Path::new("/x/tabbify-mesh")));
        match args.command {
            Some(Bench::MultiCore(mc)) => {
                assert_eq!(mc.threads, vec![1, 2, 4]);
                assert_eq!(mc.pairs, 4);
            }
            other => panic!("{other:?}"),
        }
        let args = Args::parse_from(["tabbify-perf", "peers", "--peers", "50"]);
        assert!(matches!(args.command, Some(Bench::Peers(p)) if p.peers == 50));
        assert!(Args::try_parse_from(["tabbify-perf", "--veth-rps", "maybe"]).is_err());
    }
}
