//! Results of a run: the JSON document written per run, medians, the ratio of ours to the
//! best other (stock) implementation per metric, named, the efficiency (Gbit/s per core of
//! daemon CPU, both ends) against the crypto bound, and the text/markdown tables.
//!
//! Invariants: an implementation that failed or is not available stays in every table as
//! FAILED with its reason, and never counts as "best"; every ratio names the
//! implementation it is taken against.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::iperf::Metric;

/// One run of the suite, as written to `perf/results/<timestamp>.json`.
#[derive(Debug, Serialize)]
pub struct Run {
    /// UTC start time, RFC 3339.
    pub timestamp: String,
    /// The command line that produced it.
    pub command: String,
    /// `uname -r`.
    pub kernel: String,
    /// CPU model from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// CPUs available to the run.
    pub cores: usize,
    /// Tunnel MTU.
    pub mtu: u16,
    /// iperf3 UDP payload size in bytes.
    pub udp_payload: u32,
    /// Rounds (each round runs every implementation once, in rotating order).
    pub rounds: u32,
    /// Seconds per iperf3 test.
    pub duration_s: u32,
    /// Whether RPS spreads veth receive work over all CPUs.
    pub veth_rps: bool,
    /// 1-minute load average before and after the run (`/proc/loadavg`): other work on
    /// the machine skews every figure, so a high value flags a run not to trust.
    pub load_average: [Option<f64>; 2],
    /// ChaCha20-Poly1305 seal + open through boringtun on one core, 1420-byte packets
    /// (see `crypto`): the most a tunnel's two daemons can move per core of their CPU.
    pub crypto_bound_gbps: Option<f64>,
    /// Per implementation: its settings, raw per-round figures and medians.
    pub implementations: Vec<ImplResult>,
    /// Per metric (and per efficiency key), the best stock implementation's name.
    pub best_stock: BTreeMap<String, Option<String>>,
    /// `ours … / best stock` per ours implementation and metric (for ping: best stock RTT
    /// divided by ours, so above 1 is better everywhere), and TCP 1 stream as a fraction
    /// of plain veth.
    pub ratios: BTreeMap<String, BTreeMap<String, Option<f64>>>,
}

/// Which family an implementation belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Our data plane.
    Ours,
    /// A stock WireGuard implementation.
    Stock,
    /// No tunnel: the veth alone.
    Veth,
}

/// Everything measured for one implementation.
#[derive(Debug, Serialize)]
pub struct ImplResult {
    /// Short name (`ours-uring`, `boringtun-t1`, …).
    pub name: String,
    /// Human-readable description of how it was run.
    pub label: String,
    /// Ours, stock or veth.
    pub kind: Kind,
    /// I/O driver requested (ours only).
    pub driver: Option<String>,
    /// Worker threads requested (`default` when the implementation picks).
    pub threads: Option<String>,
    /// Offloads requested (ours only; `default` when not given).
    pub offloads: Option<String>,
    /// The binary run (ours only).
    pub binary: Option<String>,
    /// Log lines of ours that name the driver and offloads, from the first round.
    pub startup_log: Vec<String>,
    /// Raw figures per round.
    pub rounds: Vec<RoundResult>,
    /// Median over rounds per metric (`None` when no round succeeded).
    pub median: BTreeMap<String, Option<f64>>,
    /// Median CPU use of both daemons together during each iperf3 test, in cores
    /// (CPU seconds / test seconds).
    pub median_cpu_cores: BTreeMap<String, Option<f64>>,
    /// Throughput per core of daemon CPU (both ends, all threads; Gbit/s ÷ cores) during
    /// TCP 1 stream (`tcp1_gbps`) and UDP (`udp_delivered_gbps`), median of the rounds.
    pub median_gbps_per_core: BTreeMap<String, Option<f64>>,
    /// Relayed cases: the relay process's CPU per Gbit/s during each throughput test, in
    /// cores (CPU seconds / test seconds / Gbit/s), median of the rounds.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub median_relay_cores_per_gbit: BTreeMap<String, Option<f64>>,
}

/// One implementation's figures in one round.
#[derive(Debug, Default, Serialize)]
pub struct RoundResult {
    /// 1-based round number.
    pub round: u32,
    /// Position within the round (0 = ran first).
    pub position: usize,
    /// Measured value per metric (`None` when it failed).
    pub values: BTreeMap<String, Option<f64>>,
    /// TCP retransmits, lost UDP datagrams or lost pings per metric.
    pub lost: BTreeMap<String, Option<u64>>,
    /// CPU seconds used by both daemons during each iperf3 test.
    pub cpu_s: BTreeMap<String, Option<f64>>,
    /// Relayed cases: CPU seconds the relay process used during each iperf3 test.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub relay_cpu_s: BTreeMap<String, Option<f64>>,
    /// Failures, per metric or `setup`/`teardown`.
    pub errors: BTreeMap<String, String>,
}

/// The median of the values present; `None` when there are none.
pub fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().flatten().collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

impl ImplResult {
    /// Fills `median` and `median_cpu_cores` from the rounds.
    pub fn summarize(&mut self, duration_s: u32) {
        for metric in Metric::ALL {
            let key = metric.key();
            self.median.insert(
                key.to_owned(),
                median(
                    self.rounds
                        .iter()
                        .map(|r| r.values.get(key).copied().flatten()),
                ),
            );
            if metric != Metric::Ping && self.rounds.iter().any(|r| !r.relay_cpu_s.is_empty()) {
                self.median_relay_cores_per_gbit.insert(
                    key.to_owned(),
                    median(self.rounds.iter().map(|r| {
                        let cpu = r.relay_cpu_s.get(key).copied().flatten()?;
                        let gbit = r.values.get(key).copied().flatten()?;
                        (gbit > 0.0).then(|| cpu / f64::from(duration_s) / gbit)
                    })),
                );
            }
            if EFFICIENCY.contains(&metric) {
                self.median_gbps_per_core.insert(
                    key.to_owned(),
                    median(self.rounds.iter().map(|r| {
                        let cpu = r.cpu_s.get(key).copied().flatten()?;
                        let gbit = r.values.get(key).copied().flatten()?;
                        let cores = cpu / f64::from(duration_s);
                        (cores > 0.0).then(|| gbit / cores)
                    })),
                );
            }
            if metric != Metric::Ping {
                self.median_cpu_cores.insert(
                    key.to_owned(),
                    median(self.rounds.iter().map(|r| {
                        r.cpu_s
                            .get(key)
                            .copied()
                            .flatten()
                            .map(|s| s / f64::from(duration_s))
                    })),
                );
            }
        }
    }

    fn successes(&self, key: &str) -> usize {
        self.rounds
            .iter()
            .filter(|r| r.values.get(key).copied().flatten().is_some())
            .count()
    }
}

/// The metrics whose Gbit/s per daemon core the suite reports.
pub const EFFICIENCY: [Metric; 2] = [Metric::Tcp1, Metric::Udp];

/// The key of a metric's per-core figure in [`Run::ratios`] and [`Run::best_stock`].
pub fn per_core_key(metric: Metric) -> String {
    format!("{}_per_core", metric.key())
}

/// The best stock implementation for `metric` (`per_core`: its Gbit/s per daemon core
/// instead of the metric), as (name, median); `None` when no stock one has a figure.
pub fn best_stock(
    implementations: &[ImplResult],
    metric: Metric,
    per_core: bool,
) -> Option<(&str, f64)> {
    let values = implementations
        .iter()
        .filter(|i| i.kind == Kind::Stock)
        .filter_map(|i| {
            let map = if per_core {
                &i.median_gbps_per_core
            } else {
                &i.median
            };
            Some((i.name.as_str(), map.get(metric.key()).copied().flatten()?))
        });
    if metric.higher_is_better() || per_core {
        values.max_by(|a, b| a.1.total_cmp(&b.1))
    } else {
        values.min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// Computes [`Run::best_stock`].
pub fn best_stock_names(implementations: &[ImplResult]) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for metric in Metric::ALL {
        out.insert(
            metric.key().to_owned(),
            best_stock(implementations, metric, false).map(|(n, _)| n.to_owned()),
        );
    }
    for metric in EFFICIENCY {
        out.insert(
            per_core_key(metric),
            best_stock(implementations, metric, true).map(|(n, _)| n.to_owned()),
        );
    }
    out
}

/// Computes [`Run::ratios`]: per ours implementation, each metric over the best stock
/// implementation's median for that metric (ping inverted), the per-core figures over the
/// best stock per-core figure and as a fraction of `crypto_bound` (Gbit/s), and TCP 1
/// stream as a fraction of plain veth.
pub fn ratios(
    implementations: &[ImplResult],
    crypto_bound: Option<f64>,
) -> BTreeMap<String, BTreeMap<String, Option<f64>>> {
    let best = |metric: Metric| best_stock(implementations, metric, false).map(|(_, v)| v);
    let veth_tcp1 = implementations
        .iter()
        .find(|i| i.kind == Kind::Veth)
        .and_then(|i| i.median.get(Metric::Tcp1.key()).copied().flatten());
    let mut out = BTreeMap::new();
    for ours in implementations.iter().filter(|i| i.kind == Kind::Ours) {
        let mut row = BTreeMap::new();
        for metric in Metric::ALL {
            let value = ours.median.get(metric.key()).copied().flatten();
            let ratio = match (value, best(metric)) {
                (Some(v), Some(b)) if v > 0.0 && b > 0.0 => Some(if metric.higher_is_better() {
                    v / b
                } else {
                    b / v
                }),
                _ => None,
            };
            row.insert(format!("{}_vs_best_stock", metric.key()), ratio);
        }
        let of_veth = match (
            ours.median.get(Metric::Tcp1.key()).copied().flatten(),
            veth_tcp1,
        ) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
        row.insert("tcp1_fraction_of_veth".to_owned(), of_veth);
        for metric in EFFICIENCY {
            let value = ours
                .median_gbps_per_core
                .get(metric.key())
                .copied()
                .flatten();
            let best = best_stock(implementations, metric, true).map(|(_, v)| v);
            row.insert(
                format!("{}_vs_best_stock", per_core_key(metric)),
                match (value, best) {
                    (Some(v), Some(b)) if b > 0.0 => Some(v / b),
                    _ => None,
                },
            );
            row.insert(
                format!("{}_of_crypto_bound", per_core_key(metric)),
                match (value, crypto_bound) {
                    (Some(v), Some(c)) if c > 0.0 => Some(v / c),
                    _ => None,
                },
            );
        }
        if !ours.median_relay_cores_per_gbit.is_empty() {
            // Issue 13: relayed TCP 1 stream against direct (`ours-uring`) in the same run.
            let direct = implementations
                .iter()
                .find(|i| i.name == "ours-uring")
                .and_then(|i| i.median.get(Metric::Tcp1.key()).copied().flatten());
            let fraction = match (
                ours.median.get(Metric::Tcp1.key()).copied().flatten(),
                direct,
            ) {
                (Some(v), Some(d)) if d > 0.0 => Some(v / d),
                _ => None,
            };
            row.insert("tcp1_fraction_of_direct".to_owned(), fraction);
        }
        out.insert(ours.name.clone(), row);
    }
    out
}

/// The results as a markdown table (medians; CPU in cores for TCP 1 stream), followed by
/// the ratio lines.
pub fn markdown(run: &Run) -> String {
    let mut out = String::new();
    if let Some(bound) = run.crypto_bound_gbps {
        let _ = writeln!(
            out,
            "Crypto bound (ChaCha20-Poly1305 seal + open through boringtun, one core, 1420-byte \
             packets): **{bound:.2} Gbit/s**.\n"
        );
    }
    let _ = write!(out, "| implementation |");
    for metric in Metric::ALL {
        let _ = write!(out, " {} |", metric.title());
    }
    let _ = writeln!(
        out,
        " CPU during TCP 1 (cores) | Gbit/s per daemon core, TCP 1 | Gbit/s per daemon core, UDP \
         | TCP 1 per core, % of crypto bound |"
    );
    let _ = writeln!(out, "|---|{}---|", "---|".repeat(Metric::ALL.len() + 3));
    for implementation in &run.implementations {
        let _ = write!(out, "| {} |", implementation.label);
        let not_available = implementation.rounds.iter().all(|r| {
            r.errors
                .get("setup")
                .is_some_and(|e| e.starts_with("not available"))
        });
        for metric in Metric::ALL {
            let key = metric.key();
            let cell = match implementation.median.get(key).copied().flatten() {
                Some(value) => {
                    let ok = implementation.successes(key);
                    let partial = if ok < implementation.rounds.len() {
                        format!(" ({ok}/{} rounds)", implementation.rounds.len())
                    } else {
                        String::new()
                    };
                    if metric == Metric::Ping {
                        format!("{value:.3}{partial}")
                    } else {
                        format!("{value:.2}{partial}")
                    }
                }
                None if not_available && !implementation.rounds.is_empty() => {
                    "not available (below)".to_owned()
                }
                // Left out by `--tests`: no round has the key at all.
                None if !implementation.rounds.is_empty()
                    && implementation
                        .rounds
                        .iter()
                        .all(|r| !r.values.contains_key(key)) =>
                {
                    "not run".to_owned()
                }
                None => "FAILED (below)".to_owned(),
            };
            let _ = write!(out, " {cell} |");
        }
        let dash = || "–".to_owned();
        let cpu = implementation
            .median_cpu_cores
            .get(Metric::Tcp1.key())
            .copied()
            .flatten()
            .map_or_else(dash, |c| format!("{c:.2}"));
        let per_core = |metric: Metric| {
            implementation
                .median_gbps_per_core
                .get(metric.key())
                .copied()
                .flatten()
        };
        let tcp1 = per_core(Metric::Tcp1).map_or_else(dash, |v| format!("{v:.2}"));
        let udp = per_core(Metric::Udp).map_or_else(dash, |v| format!("{v:.2}"));
        let of_bound = match (per_core(Metric::Tcp1), run.crypto_bound_gbps) {
            (Some(v), Some(b)) if b > 0.0 => format!("{:.0}%", v / b * 100.0),
            _ => dash(),
        };
        let _ = writeln!(out, " {cpu} | {tcp1} | {udp} | {of_bound} |");
    }
    let mut failures = String::new();
    for implementation in &run.implementations {
        for round in &implementation.rounds {
            for (what, error) in &round.errors {
                let _ = writeln!(
                    failures,
                    "- {} round {} {what}: {}",
                    implementation.label,
                    round.round,
                    shorten(error)
                );
            }
        }
    }
    if !failures.is_empty() {
        let _ = write!(
            out,
            "\nFailures and implementations not available:\n{failures}"
        );
    }
    let best_name = |key: &str| {
        run.best_stock
            .get(key)
            .cloned()
            .flatten()
            .map_or_else(String::new, |n| format!(" vs {n}"))
    };
    for (name, row) in &run.ratios {
        let _ = write!(out, "\n**{name} / best stock:**");
        for metric in Metric::ALL {
            let key = format!("{}_vs_best_stock", metric.key());
            let cell = row
                .get(&key)
                .copied()
                .flatten()
                .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}×"));
            let _ = write!(
                out,
                " {} {cell}{};",
                metric.title(),
                best_name(metric.key())
            );
        }
        for metric in EFFICIENCY {
            let key = per_core_key(metric);
            let cell = row
                .get(&format!("{key}_vs_best_stock"))
                .copied()
                .flatten()
                .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}×"));
            let _ = write!(
                out,
                " Gbit/s per daemon core ({}) {cell}{};",
                if metric == Metric::Tcp1 {
                    "TCP 1"
                } else {
                    "UDP"
                },
                best_name(&key)
            );
        }
        let veth = row
            .get("tcp1_fraction_of_veth")
            .copied()
            .flatten()
            .map_or_else(|| "n/a".to_owned(), |r| format!("{:.0}%", r * 100.0));
        let _ = write!(out, " TCP 1 stream = {veth} of plain veth.");
        if let Some(direct) = row.get("tcp1_fraction_of_direct") {
            let direct = direct.map_or_else(|| "n/a".to_owned(), |r| format!("{:.0}%", r * 100.0));
            let relay_cpu = run
                .implementations
                .iter()
                .find(|i| i.name == *name)
                .and_then(|i| i.median_relay_cores_per_gbit.get(Metric::Tcp1.key()))
                .copied()
                .flatten()
                .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.3}"));
            let _ = write!(
                out,
                " Relayed TCP 1 stream = {direct} of direct (ours-uring); relay CPU \
                 {relay_cpu} cores per Gbit/s."
            );
        }
        let _ = writeln!(out);
    }
    if !run.ratios.is_empty() {
        let _ = writeln!(
            out,
            "\n(Ratios are medians of ours over the best stock median per metric, named after \
             \"vs\"; for ping the best stock RTT over ours, so above 1× is better everywhere. \
             Gbit/s per daemon core: throughput ÷ the CPU of both daemons, all threads, during \
             the test.)"
        );
    }
    out
}

/// The first line of an error plus the first later line that reports an error (such as
/// the ERROR line of a daemon log attached to it), at most 300 characters.
fn shorten(error: &str) -> String {
    let mut lines = error.lines();
    let mut line = lines.next().unwrap_or("").to_owned();
    if let Some(cause) = lines.find(|l| l.contains("ERROR") || l.contains("error")) {
        line.push_str(" … ");
        line.push_str(cause.trim());
    }
    let line = line.replace('|', "/");
    if line.chars().count() > 300 {
        format!("{}…", line.chars().take(299).collect::<String>())
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn implementation(
        name: &str,
        kind: Kind,
        tcp1: &[Option<f64>],
        ping: &[Option<f64>],
    ) -> ImplResult {
        let mut result = ImplResult {
            name: name.into(),
            label: name.into(),
            kind,
            driver: None,
            threads: None,
            offloads: None,
            binary: None,
            startup_log: Vec::new(),
            rounds: Vec::new(),
            median: BTreeMap::new(),
            median_cpu_cores: BTreeMap::new(),
            median_gbps_per_core: BTreeMap::new(),
            median_relay_cores_per_gbit: BTreeMap::new(),
        };
        for (i, (t, p)) in tcp1.iter().zip(ping).enumerate() {
            let mut round = RoundResult {
                round: i as u32 + 1,
                ..RoundResult::default()
            };
            round.values.insert(Metric::Tcp1.key().into(), *t);
            round.values.insert(Metric::Ping.key().into(), *p);
            if t.is_none() {
                round
                    .errors
                    .insert(Metric::Tcp1.key().into(), "iperf3: boom\nmore".into());
            }
            result.rounds.push(round);
        }
        result.summarize(10);
        result
    }

    #[test]
    fn medians_skip_failures() {
        assert_eq!(median([Some(3.0), None, Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(median([Some(4.0), Some(1.0)]), Some(2.5));
        assert_eq!(median([None, None]), None);
    }

    #[test]
    fn ratios_against_best_stock_and_veth() {
        let impls = vec![
            implementation(
                "ours",
                Kind::Ours,
                &[Some(3.0), Some(4.0), Some(5.0)],
                &[Some(0.1); 3],
            ),
            implementation(
                "bt",
                Kind::Stock,
                &[Some(1.0), Some(1.0), Some(1.0)],
                &[Some(0.3); 3],
            ),
            implementation(
                "wg-go",
                Kind::Stock,
                &[Some(0.5), Some(0.5), Some(0.5)],
                &[Some(0.2); 3],
            ),
            implementation(
                "veth",
                Kind::Veth,
                &[Some(10.0), Some(10.0), Some(10.0)],
                &[Some(0.05); 3],
            ),
        ];
        let r = &ratios(&impls, None)["ours"];
        assert!((r["tcp1_gbps_vs_best_stock"].unwrap() - 4.0).abs() < 1e-9);
        assert!((r["ping_avg_ms_vs_best_stock"].unwrap() - 2.0).abs() < 1e-9);
        assert!((r["tcp1_fraction_of_veth"].unwrap() - 0.4).abs() < 1e-9);
        assert_eq!(r["tcp4_gbps_vs_best_stock"], None);
    }

    /// Gives every round of `result` CPU seconds for TCP 1 stream such that the daemons
    /// used `cores` cores during a 10 s test, and recomputes the medians.
    fn with_cores(mut result: ImplResult, cores: f64) -> ImplResult {
        for round in &mut result.rounds {
            round
                .cpu_s
                .insert(Metric::Tcp1.key().into(), Some(cores * 10.0));
        }
        result.summarize(10);
        result
    }

    #[test]
    fn ratios_name_the_best_stock_per_metric_and_per_core() {
        // The fastest stock one (bt) is not the most efficient (wg-go-offload uses half a
        // core): each ratio is against its own best, and a missing one never wins.
        let impls = vec![
            with_cores(
                implementation("ours", Kind::Ours, &[Some(4.0); 3], &[Some(0.3); 3]),
                1.0,
            ),
            with_cores(
                implementation("bt", Kind::Stock, &[Some(2.0); 3], &[Some(0.2); 3]),
                2.0,
            ),
            with_cores(
                implementation(
                    "wg-go-offload",
                    Kind::Stock,
                    &[Some(1.0); 3],
                    &[Some(0.4); 3],
                ),
                0.5,
            ),
            implementation("gotatun", Kind::Stock, &[None; 3], &[None; 3]),
        ];
        let names = best_stock_names(&impls);
        assert_eq!(names["tcp1_gbps"].as_deref(), Some("bt"));
        assert_eq!(names["ping_avg_ms"].as_deref(), Some("bt"));
        assert_eq!(
            names["tcp1_gbps_per_core"].as_deref(),
            Some("wg-go-offload")
        );
        assert_eq!(names["udp_delivered_gbps_per_core"], None);
        let r = &ratios(&impls, Some(8.0))["ours"];
        assert!((r["tcp1_gbps_vs_best_stock"].unwrap() - 2.0).abs() < 1e-9);
        assert!((r["ping_avg_ms_vs_best_stock"].unwrap() - 2.0 / 3.0).abs() < 1e-9);
        // ours 4 Gbit/s on 1 core; wg-go-offload 1 Gbit/s on 0.5 core = 2 per core.
        assert!((r["tcp1_gbps_per_core_vs_best_stock"].unwrap() - 2.0).abs() < 1e-9);
        assert!((r["tcp1_gbps_per_core_of_crypto_bound"].unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(r["udp_delivered_gbps_per_core_vs_best_stock"], None);
    }

    #[test]
    fn unavailable_implementations_are_reported_as_such() {
        let mut missing = implementation("gotatun", Kind::Stock, &[None], &[None]);
        missing.rounds[0].errors.clear();
        missing.rounds[0].errors.insert(
            "setup".into(),
            "not available: gotatun not on PATH (cargo install gotatun-cli)".into(),
        );
        let impls = vec![
            implementation("ours", Kind::Ours, &[Some(1.0)], &[Some(0.3)]),
            missing,
        ];
        let run = Run {
            timestamp: String::new(),
            command: String::new(),
            kernel: String::new(),
            cpu_model: String::new(),
            cores: 2,
            mtu: 1420,
            udp_payload: 1392,
            rounds: 1,
            duration_s: 10,
            veth_rps: true,
            load_average: [None, None],
            crypto_bound_gbps: Some(3.0),
            ratios: ratios(&impls, Some(3.0)),
            best_stock: best_stock_names(&impls),
            implementations: impls,
        };
        let table = markdown(&run);
        assert!(
            table.contains("| gotatun | not available (below) |"),
            "{table}"
        );
        assert!(table.contains("gotatun round 1 setup: not available: gotatun not on PATH"));
        assert!(table.contains("**3.00 Gbit/s**"), "{table}");
        assert!(
            table.contains("TCP 1 stream (Gbit/s) n/a;"),
            "no stock figure, no ratio: {table}"
        );
    }

    #[test]
    fn tests_left_out_read_not_run() {
        // `implementation` fills only tcp1 and ping, as `--tests tcp1,ping` would.
        let impls = vec![implementation(
            "ours",
            Kind::Ours,
            &[Some(2.0)],
            &[Some(0.3)],
        )];
        let run = Run {
            timestamp: String::new(),
            command: String::new(),
            kernel: String::new(),
            cpu_model: String::new(),
            cores: 2,
            mtu: 1420,
            udp_payload: 1392,
            rounds: 1,
            duration_s: 10,
            veth_rps: true,
            load_average: [None, None],
            crypto_bound_gbps: None,
            ratios: ratios(&impls, None),
            best_stock: best_stock_names(&impls),
            implementations: impls,
        };
        let table = markdown(&run);
        assert!(
            table.contains("| ours | 2.00 | not run | not run | not run | 0.300 |"),
            "{table}"
        );
        assert!(!table.contains("FAILED"), "{table}");
    }

    #[test]
    fn table_reports_failures_instead_of_skipping() {
        let impls = vec![
            implementation("ours", Kind::Ours, &[None, None], &[None, None]),
            implementation(
                "bt",
                Kind::Stock,
                &[Some(1.0), None],
                &[Some(0.3), Some(0.3)],
            ),
        ];
        let run = Run {
            timestamp: String::new(),
            command: String::new(),
            kernel: String::new(),
            cpu_model: String::new(),
            cores: 2,
            mtu: 1420,
            udp_payload: 1392,
            rounds: 2,
            duration_s: 10,
            veth_rps: true,
            load_average: [None, None],
            crypto_bound_gbps: None,
            ratios: ratios(&impls, None),
            best_stock: best_stock_names(&impls),
            implementations: impls,
        };
        let table = markdown(&run);
        assert!(table.contains("| ours | FAILED (below) |"), "{table}");
        assert!(
            table.contains("- ours round 1 tcp1_gbps: iperf3: boom\n"),
            "{table}"
        );
        assert!(table.contains("1.00 (1/2 rounds)"), "{table}");
        assert!(
            table.contains("**ours / best stock:** TCP 1 stream (Gbit/s) n/a vs bt;"),
            "{table}"
        );
    }
}
