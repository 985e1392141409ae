//! Issue 16: the Grafana dashboard (`ops/grafana/tabbify.json`) queries only what the
//! programs serve. Two joiners in their own namespaces and a coordinator (the testbed);
//! a ping so every per-peer series exists (the handshake age appears after the first
//! handshake); then every metric name and every label the dashboard's queries use (in
//! `by (…)`, in matchers and in `{{legend}}`s, except Prometheus' own `instance`) must be in
//! a real scrape: the joiner's `/metrics` for `tabbify_mesh_*`, the coordinator's for
//! `tabbify_coordinator_*`. Also: the file is valid JSON with a uid, panels and the
//! `$joiner`/`$coordinator` variables the queries refer to.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::wait_ping;
use tabbify_tests::{JoinSpec, Testbed};

const SETTLE: Duration = Duration::from_secs(30);
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/grafana/tabbify.json");

/// Every `expr` of every panel (rows hold none here, but nested panels are walked too).
fn exprs(panels: &[Value], out: &mut Vec<String>) {
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push(e.to_owned());
            }
            if let Some(l) = t["legendFormat"].as_str() {
                // Legends name labels as {{label}}: keep them as `by (label)` for the check.
                let mut rest = l;
                while let Some((_, after)) = rest.split_once("{{") {
                    let Some((label, tail)) = after.split_once("}}") else {
                        break;
                    };
                    out.push(format!("by ({})", label.trim()));
                    rest = tail;
                }
            }
        }
        if let Some(nested) = p["panels"].as_array() {
            exprs(nested, out);
        }
    }
}

/// Identifiers of a PromQL expression: metric names (`tabbify_…`) and label names (in
/// `by (…)`/`without (…)` and before `=`, `=~`, `!=`, `!~` inside braces).
fn names(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let is_id = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let mut i = 0;
    let b = expr.as_bytes();
    while i < b.len() {
        let c = b[i] as char;
        if c == '"' {
            // Skip a string (label value).
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c == '[' {
            // A range ([5m], [$__rate_interval]): not identifiers.
            while i < b.len() && b[i] != b']' {
                i += 1;
            }
            continue;
        }
        if is_id(c) && (i == 0 || !(is_id(b[i - 1] as char) || b[i - 1] == b'$')) {
            let start = i;
            while i < b.len() && is_id(b[i] as char) {
                i += 1;
            }
            let id = &expr[start..i];
            let next = expr[i..].trim_start();
            if id.starts_with("tabbify_") {
                metrics.insert(id.to_owned());
            } else if next.starts_with("=~")
                || next.starts_with("!~")
                || next.starts_with("!=")
                || (next.starts_with('=') && !next.starts_with("=="))
            {
                labels.insert(id.to_owned());
            } else if id == "by" || id == "without" {
                let list = next.strip_prefix('(').unwrap_or("");
                let list = list.split(')').next().unwrap_or("");
                for l in list.split(',') {
                    labels.insert(l.trim().to_owned());
                }
            }
            continue;
        }
        i += 1;
    }
    labels.remove("instance");
    labels.remove("");
    (metrics, labels)
}

/// Metric names and label names of the samples in a scrape.
fn scrape_names(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, rest) = series.split_once('{').unwrap_or((series, ""));
        metrics.insert(name.to_owned());
        // Label names: before each `="` (values are escaped, so `="` inside one is `=\"`).
        for part in rest.split("\",") {
            if let Some((l, _)) = part.split_once("=\"") {
                labels.insert(l.trim_start_matches(',').to_owned());
            }
        }
    }
    (metrics, labels)
}

#[test]
fn names_of_queries_and_scrapes_are_read_right() {
    let (m, l) = names(
        "sum by (instance, reason) (rate(tabbify_mesh_drops_total{instance=~\"$joiner\",path=\"a=b\"}[$__rate_interval])) > 0",
    );
    assert_eq!(m, BTreeSet::from(["tabbify_mesh_drops_total".to_owned()]));
    assert_eq!(l, BTreeSet::from(["path".to_owned(), "reason".to_owned()]));
    let (m, l) = scrape_names("# HELP x y\nx_total{peer=\"p\",name=\"a\\\",b=\\\"\"} 1\ny 2\n");
    assert_eq!(m, BTreeSet::from(["x_total".to_owned(), "y".to_owned()]));
    assert_eq!(l, BTreeSet::from(["name".to_owned(), "peer".to_owned()]));
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_served() -> Result<()> {
    let text = std::fs::read_to_string(DASHBOARD).with_context(|| DASHBOARD.to_owned())?;
    let dash: Value =
        serde_json::from_str(&text).context("ops/grafana/tabbify.json is not JSON")?;
    ensure!(
        dash["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "no uid"
    );
    let panels = dash["panels"].as_array().context("no panels")?;
    let mut all = Vec::new();
    exprs(panels, &mut all);
    ensure!(all.len() >= 10, "only {} queries", all.len());
    let vars: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .context("no variables")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for e in &all {
        for v in ["$joiner", "$coordinator"] {
            if e.contains(v) {
                ensure!(vars.contains(&v[1..]), "{e} uses {v}, not defined");
            }
        }
    }

    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let policy = json!({
        "tags": ["node"],
        "allow": [{"src": ["tag:node"], "dst": ["tag:node"]}],
    });
    let bed = Testbed::start(policy, 3)?;
    let (a_ns, _) = bed.host()?;
    let (b_ns, _) = bed.host()?;
    let mut a = bed.join(&a_ns, JoinSpec::new("graf-a", &["node"], None))?;
    let mut b = bed.join(&b_ns, JoinSpec::new("graf-b", &["node"], None))?;
    a.wait_peer_names(&["graf-b"], SETTLE)?;
    let sb = b.wait_peer_names(&["graf-a"], SETTLE)?;
    wait_ping(a.netns(), IpAddr::V6(sb.ula), SETTLE).context("a → b")?;

    let joiner = a_ns.run(
        "curl",
        &["-sS", "--max-time", "10", "http://127.0.0.1:9587/metrics"],
    )?;
    let coordinator = match bed.admin.request("GET", "/metrics", None)? {
        a if a.status == 200 => match a.body {
            Value::String(s) => s,
            other => bail!("coordinator /metrics is not text: {other}"),
        },
        a => bail!("coordinator /metrics: {} {}", a.status, a.body),
    };
    let (jm, jl) = scrape_names(&joiner);
    let (cm, cl) = scrape_names(&coordinator);
    let mut missing = Vec::new();
    for e in &all {
        let (metrics, labels) = names(e);
        let coord = metrics
            .iter()
            .any(|m| m.starts_with("tabbify_coordinator_"));
        let (have_m, have_l) = if coord { (&cm, &cl) } else { (&jm, &jl) };
        for m in &metrics {
            if !have_m.contains(m) {
                missing.push(format!("metric {m} (in {e})"));
            }
        }
        for l in &labels {
            if !have_l.contains(l) {
                missing.push(format!("label {l} (in {e})"));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "the dashboard queries what no scrape has:\n{}\n-- joiner:\n{joiner}\n-- coordinator:\n{coordinator}",
        missing.join("\n")
    );
    a.stop()?;
    b.stop()?;
    Ok(())
}
