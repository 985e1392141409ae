//! Multi-core scaling (issue 17, Deliver 5): `--pairs` tunnel pairs, each in its own pair
//! of namespaces joined by its own veth (RPS on), all carrying one iperf3 TCP stream at the
//! same time, with ours at each `--threads` value in turn. Reported per thread count: the
//! total throughput (sum of the pairs' delivered rates) and the cores all the daemons used
//! (utime + stime of every daemon, all threads, from `/proc/PID/stat`, over the test's
//! seconds), medians over `--rounds`.
//!
//! Both ends of every pair run on this machine, so with `P` pairs there are `2P` daemons of
//! `threads` workers each sharing the machine's cores: the figure says what `--threads`
//! buys when several peers are busy at once, not what one host would do alone. Ours runs
//! unpinned (`--pin none`) for the reason the suite does. Traffic stays in the namespaces.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::wg::{Driver, Implementation, OursOptions};
use tabbify_tests::{Inner, Netns, Tunnel, TunnelSpec, VethOptions, VethPair};

use crate::iperf::{measure, Metric, Server};
use crate::report::median;

/// Options of `tabbify-perf multi-core`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Tunnel pairs, each in its own two namespaces.
    #[arg(long, default_value_t = 4)]
    pub pairs: u32,
    /// `--threads` values for ours, measured in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<u32>,
}

/// One thread count's figures.
#[derive(Debug, Serialize)]
pub struct ThreadsResult {
    /// Ours' `--threads`.
    pub threads: u32,
    /// Sum over the pairs of TCP 1 stream Gbit/s, per round (`None`: a pair failed).
    pub total_gbps: Vec<Option<f64>>,
    /// Cores used by all daemons together, per round.
    pub cores: Vec<Option<f64>>,
    /// Each pair's Gbit/s, per round.
    pub per_pair_gbps: Vec<Vec<Option<f64>>>,
    /// Medians over the rounds.
    pub median_total_gbps: Option<f64>,
    /// Median cores.
    pub median_cores: Option<f64>,
    /// Errors, per round.
    pub errors: Vec<String>,
}

/// The JSON written per run.
#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    pairs: u32,
    duration_s: u32,
    rounds: u32,
    binary: String,
    load_average: [Option<f64>; 2],
    results: Vec<ThreadsResult>,
}

/// Runs the benchmark and prints and writes (`out/multicore-<time>.json`) the results.
pub fn run(args: &Args, mesh_bin: &Path, duration: u32, rounds: u32, out: &Path) -> Result<()> {
    require(&[Tool::Iproute2, Tool::Wg, Tool::Iperf3, Tool::Ping])?;
    if args.pairs == 0 || args.threads.is_empty() || rounds == 0 || duration == 0 {
        bail!("--pairs, --threads, --rounds and --duration must be given and at least 1");
    }
    let load_before = crate::load_average();
    let links: Vec<VethPair> = (0..args.pairs)
        .map(|i| {
            let left = Netns::with_label(&format!("perf-mc{i}a"))?;
            let right = Netns::with_label(&format!("perf-mc{i}b"))?;
            VethPair::connect(&left, &right, &VethOptions::default())
        })
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    for &threads in &args.threads {
        let mut result = ThreadsResult {
            threads,
            total_gbps: Vec::new(),
            cores: Vec::new(),
            per_pair_gbps: Vec::new(),
            median_total_gbps: None,
            median_cores: None,
            errors: Vec::new(),
        };
        for round in 1..=rounds {
            eprintln!("perf multi-core: --threads {threads}, round {round}/{rounds}");
            match one_round(&links, mesh_bin, threads, duration) {
                Ok((per_pair, cores)) => {
                    let total = per_pair.iter().copied().sum::<Option<f64>>();
                    result.total_gbps.push(total);
                    result.cores.push(Some(cores));
                    result.per_pair_gbps.push(per_pair);
                }
                Err(error) => {
                    result.errors.push(format!("round {round}: {error:#}"));
                    result.total_gbps.push(None);
                    result.cores.push(None);
                    result.per_pair_gbps.push(Vec::new());
                }
            }
        }
        result.median_total_gbps = median(result.total_gbps.iter().copied());
        result.median_cores = median(result.cores.iter().copied());
        results.push(result);
    }
    let report = Report {
        bench: "multi-core",
        pairs: args.pairs,
        duration_s: duration,
        rounds,
        binary: mesh_bin.display().to_string(),
        load_average: [load_before, crate::load_average()],
        results,
    };
    println!("{}", markdown(&report));
    let path = write_json(out, "multicore", &report)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// One round at one thread count: fresh tunnels on every link, one TCP stream through
/// each at once. Returns each pair's Gbit/s and the cores all daemons used.
fn one_round(
    links: &[VethPair],
    mesh_bin: &Path,
    threads: u32,
    duration: u32,
) -> Result<(Vec<Option<f64>>, f64)> {
    let ours = Implementation::Ours(OursOptions {
        driver: Some(Driver::Uring),
        offloads: None,
        threads: Some(threads),
        pin: Some(false),
        binary: Some(mesh_bin.to_path_buf()),
    });
    let mut tunnels = Vec::new();
    for link in links {
        let mut spec = TunnelSpec::new(ours.clone(), ours.clone());
        spec.inner = Inner::V4;
        spec.outer_v6 = false;
        let tunnel = Tunnel::start_on(&spec, link)?;
        tunnel.wait_ready(Duration::from_secs(20))?;
        tunnels.push(tunnel);
    }
    let servers = tunnels
        .iter()
        .map(|t| Server::start(t.right.netns()))
        .collect::<Result<Vec<_>>>()?;
    let cpu = |tunnels: &[Tunnel]| -> Result<Duration> {
        let mut total = Duration::ZERO;
        for tunnel in tunnels {
            total += tunnel.left.cpu_time()? + tunnel.right.cpu_time()?;
        }
        Ok(total)
    };
    let before = cpu(&tunnels)?;
    let targets: Vec<(Netns, IpAddr)> = tunnels
        .iter()
        .map(|t| (t.left.netns().clone(), t.right_inner[0]))
        .collect();
    let per_pair: Vec<Option<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|(netns, addr)| scope.spawn(move || measure(netns, *addr, Metric::Tcp1, duration)))
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(Ok(sample)) => Some(sample.value),
                Ok(Err(error)) => {
                    eprintln!("perf multi-core: a pair failed: {error:#}");
                    None
                }
                Err(_) => None,
            })
            .collect()
    });
    let after = cpu(&tunnels)?;
    drop(servers);
    for tunnel in tunnels {
        tunnel.stop().context("stopping a tunnel")?;
    }
    Ok((
        per_pair,
        (after - before).as_secs_f64() / f64::from(duration),
    ))
}

fn markdown(report: &Report) -> String {
    let mut out = format!(
        "multi-core: {} tunnel pairs, one TCP stream each at once, {} round(s) × {} s, load \
         average {} → {}\n\n| ours --threads | total TCP Gbit/s (median) | per round | cores used \
         (all daemons) | Gbit/s per core |\n|---|---|---|---|---|\n",
        report.pairs,
        report.rounds,
        report.duration_s,
        crate::fmt_load(report.load_average[0]),
        crate::fmt_load(report.load_average[1]),
    );
    let fmt = |v: Option<f64>| v.map_or_else(|| "FAILED".to_owned(), |v| format!("{v:.2}"));
    for r in &report.results {
        let rounds: Vec<String> = r.total_gbps.iter().map(|v| fmt(*v)).collect();
        let per_core = match (r.median_total_gbps, r.median_cores) {
            (Some(g), Some(c)) if c > 0.0 => format!("{:.2}", g / c),
            _ => "–".to_owned(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {per_core} |\n",
            r.threads,
            fmt(r.median_total_gbps),
            rounds.join(", "),
            fmt(r.median_cores)
        ));
        for error in &r.errors {
            out.push_str(&format!("\n- --threads {}: {error}\n", r.threads));
        }
    }
    out
}

/// Writes `value` as `out/<stem>-<UTC time>.json`.
pub fn write_json(out: &Path, stem: &str, value: &impl Serialize) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(format!(
        "{stem}-{}.json",
        crate::utc_now()?.replace(':', "-")
    ));
    std::fs::write(&path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
