//! Issue 16, slice 1: metrics on every joiner, and CLI hygiene of the five programs.
//!
//! `every_joiner_serves_metrics_that_move_with_traffic_and_off_binds_nothing`: two
//! supervisors in their own namespaces; supervisor-a runs with the default `--metrics-bind`
//! (127.0.0.1:9587, its namespace's loopback), supervisor-b with `--metrics-bind off`.
//! `status --json` names the address (`"metrics"`, null on b) and `status` prints it; curl
//! scrapes a's `/metrics` (per-peer rx/tx, handshake age, path, drops, filter refusals,
//! roster facts), the byte counters for b grow after pings; other paths answer 404, other
//! methods 405; b listens on nothing (curl is refused, `ss` shows no listener). `status
//! --json` and `peers --json` into a pipe whose reader is gone exit 0 without a panic.
//!
//! `every_program_exits_quietly_when_its_reader_is_gone` and
//! `errors_are_one_line_without_a_backtrace`: the five programs, no namespaces.

use std::net::IpAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::{ping, wait_ping};
use tabbify_tests::{JoinSpec, Netns, Testbed};

const SETTLE: Duration = Duration::from_secs(30);
const HEARTBEAT_SECS: u64 = 3;
const DEFAULT_METRICS: &str = "127.0.0.1:9587";

/// Runs `command` with stdout a pipe whose reading end is already closed (a `| head` that
/// has gone), stdin empty; returns its exit and stderr.
fn with_reader_gone(mut command: Command) -> Result<Output> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("a pipe");
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    command
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .env_remove("RUST_BACKTRACE");
    let out = command.output().context("spawning")?;
    Ok(out)
}

fn quiet_exit(what: &str, out: &Output) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(0) && !stderr.contains("panicked"),
        "{what} into a closed pipe: {:?}, stderr: {stderr}",
        out.status
    );
    Ok(())
}

/// curl `url` inside `netns`: (HTTP status, body).
fn curl(netns: &Netns, args: &[&str], url: &str) -> Result<(u16, String)> {
    let mut full = vec!["-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    full.extend_from_slice(args);
    full.push(url);
    let text = netns.run("curl", &full)?;
    let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// The value of the sample whose series (name and labels) is exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn every_joiner_serves_metrics_that_move_with_traffic_and_off_binds_nothing() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl])?;
    let mesh = tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let policy = json!({
        "tags": ["supervisor"],
        "allow": [{"src": ["tag:supervisor"], "dst": ["tag:supervisor"]}],
    });
    let bed = Testbed::start(policy, HEARTBEAT_SECS)?;
    let (a_ns, _) = bed.host()?;
    let (b_ns, _) = bed.host()?;
    let mut a = bed.join(&a_ns, JoinSpec::new("supervisor-a", &["supervisor"], None))?;
    let mut b_spec = JoinSpec::new("supervisor-b", &["supervisor"], None);
    b_spec.extra_args = vec!["--metrics-bind".into(), "off".into()];
    let mut b = bed.join(&b_ns, b_spec)?;
    let sa = a.wait_peer_names(&["supervisor-b"], SETTLE)?;
    let sb = b.wait_peer_names(&["supervisor-a"], SETTLE)?;

    ensure!(
        sa.metrics.as_deref() == Some(DEFAULT_METRICS),
        "a's status names {:?}",
        sa.metrics
    );
    ensure!(sb.metrics.is_none(), "b's status names {:?}", sb.metrics);
    let raw: serde_json::Value = serde_json::from_str(&b.local_command(&["status", "--json"])?)?;
    ensure!(
        raw["metrics"].is_null(),
        "b: \"metrics\" is {}",
        raw["metrics"]
    );
    let text = a.local_command(&["status"])?;
    ensure!(
        text.contains(&format!("http://{DEFAULT_METRICS}/metrics")),
        "a's status: {text}"
    );
    let text = b.local_command(&["status"])?;
    ensure!(text.contains("metrics:     off"), "b's status: {text}");

    let url = format!("http://{DEFAULT_METRICS}/metrics");
    let rx = format!(
        "tabbify_mesh_peer_rx_bytes_total{{peer=\"{}\",name=\"supervisor-b\"}}",
        sb.peer_id
    );
    let tx = rx.replace("_rx_", "_tx_");
    let (code, before) = curl(a.netns(), &[], &url)?;
    ensure!(code == 200, "GET /metrics: {code} {before}");
    let rx0 = sample(&before, &rx).with_context(|| format!("no {rx} in\n{before}"))?;
    let tx0 = sample(&before, &tx).with_context(|| format!("no {tx} in\n{before}"))?;

    wait_ping(a.netns(), IpAddr::V6(sb.ula), SETTLE).context("a → b")?;
    let stats = ping(a.netns(), IpAddr::V6(sb.ula), 5, "0.2")?;
    ensure!(stats.received == 5, "a → b pings: {stats:?}");
    let (code, after) = curl(a.netns(), &[], &url)?;
    ensure!(code == 200, "GET /metrics: {code} {after}");
    let rx1 = sample(&after, &rx).context("rx after")?;
    let tx1 = sample(&after, &tx).context("tx after")?;
    ensure!(
        rx1 > rx0 && tx1 > tx0,
        "bytes did not move: rx {rx0} → {rx1}, tx {tx0} → {tx1}\n{after}"
    );
    let label = format!("peer=\"{}\",name=\"supervisor-b\"", sb.peer_id);
    for series in [
        format!("tabbify_mesh_peer_handshake_age_seconds{{{label}}}"),
        format!("tabbify_mesh_peer_path{{{label},path=\"direct\"}}"),
        "tabbify_mesh_peers_configured".to_owned(),
        "tabbify_mesh_roster_event_id".to_owned(),
        "tabbify_mesh_drops_total{reason=\"no_route\"}".to_owned(),
        "tabbify_mesh_filter_refusals_total{direction=\"in\"}".to_owned(),
        "tabbify_mesh_coordinator_connected".to_owned(),
    ] {
        ensure!(sample(&after, &series).is_some(), "no {series} in\n{after}");
    }
    ensure!(
        sample(
            &after,
            &format!("tabbify_mesh_peer_path{{{label},path=\"direct\"}}")
        ) == Some(1.0)
            && sample(&after, "tabbify_mesh_peers_configured") == Some(1.0),
        "path and peer count:\n{after}"
    );

    let (code, _) = curl(a.netns(), &[], &format!("http://{DEFAULT_METRICS}/other"))?;
    ensure!(code == 404, "GET /other: {code}");
    let (code, _) = curl(a.netns(), &["-X", "POST"], &url)?;
    ensure!(code == 405, "POST /metrics: {code}");

    // `off` binds nothing.
    let refused = b_ns
        .command("curl")
        .args(["-sS", "--max-time", "5", &url])
        .output()?;
    ensure!(
        refused.status.code() == Some(7),
        "curl to b's loopback :9587 should be refused: {:?} {}",
        refused.status,
        String::from_utf8_lossy(&refused.stderr)
    );
    let listening = b_ns.run("ss", &["-Htln"])?;
    ensure!(
        !listening.contains(":9587"),
        "b listens on the metrics port: {listening}"
    );

    // `status --json | head -c 10` with the reader already gone.
    for cmd in [["status", "--json"], ["peers", "--json"]] {
        let mut c = a.netns().command(&mesh);
        c.args(cmd).args(["--interface", a.ifname()]);
        quiet_exit(&cmd.join(" "), &with_reader_gone(c)?)?;
    }
    a.stop()?;
    b.stop()?;
    Ok(())
}

#[test]
fn every_program_exits_quietly_when_its_reader_is_gone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = tabbify_tests::bins::tabbify_mesh()?;
    let ca = tabbify_tests::bins::tabbify_mesh_ca()?;
    for bin in [
        mesh.clone(),
        ca.clone(),
        tabbify_tests::bins::tabbify_mesh_coordinator()?,
        tabbify_tests::bins::tabbify_node()?,
        tabbify_tests::bins::tabbify_mesh_relay()?,
    ] {
        let mut c = Command::new(&bin);
        c.arg("--help");
        quiet_exit(&format!("{} --help", bin.display()), &with_reader_gone(c)?)?;
    }
    let mut c = Command::new(&mesh);
    c.arg("genkey");
    quiet_exit("tabbify-mesh genkey", &with_reader_gone(c)?)?;
    let mut c = Command::new(&ca);
    c.args(["init", "--out"]).arg(dir.path().join("ca"));
    quiet_exit("tabbify-mesh-ca init", &with_reader_gone(c)?)?;
    Ok(())
}

#[test]
fn errors_are_one_line_without_a_backtrace() -> Result<()> {
    let nx = "/nonexistent/tabbify-node-metrics";
    let cases: Vec<(&str, Command)> = vec![
        ("tabbify-mesh", {
            let mut c = Command::new(tabbify_tests::bins::tabbify_mesh()?);
            c.args(["status", "--control-socket", nx]);
            c
        }),
        ("tabbify-mesh-ca", {
            let mut c = Command::new(tabbify_tests::bins::tabbify_mesh_ca()?);
            c.args(["issue-peer", "--name", "x", "--ca-dir", nx, "--out", nx]);
            c
        }),
        ("tabbify-mesh-coordinator", {
            let mut c = Command::new(tabbify_tests::bins::tabbify_mesh_coordinator()?);
            c.args(["--bind", "127.0.0.1:0", "--policy-file", nx])
                .args(["--tls-cert", nx, "--tls-key", nx, "--tls-ca", nx]);
            c
        }),
        ("tabbify-node", {
            let mut c = Command::new(tabbify_tests::bins::tabbify_node()?);
            c.env_remove("TABBIFY_NODE_KEY");
            c
        }),
        ("tabbify-mesh-relay", {
            let mut c = Command::new(tabbify_tests::bins::tabbify_mesh_relay()?);
            c.args(["--tls-cert", nx, "--tls-key", nx, "--tls-ca", nx]);
            c
        }),
    ];
    for (program, mut c) in cases {
        for backtrace in [None, Some("1")] {
            match backtrace {
                Some(v) => c.env("RUST_BACKTRACE", v).env("RUST_LIB_BACKTRACE", v),
                None => c
                    .env_remove("RUST_BACKTRACE")
                    .env_remove("RUST_LIB_BACKTRACE"),
            };
            let out = c.stdin(Stdio::null()).output()?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            ensure!(
                !out.status.success()
                    && lines.len() == 1
                    && lines[0].starts_with(&format!("{program}: "))
                    && !stderr.contains("panicked")
                    && !stderr.contains("Caused by")
                    && !stderr.contains("backtrace"),
                "{program} (RUST_BACKTRACE={backtrace:?}): {:?}\n{stderr}",
                out.status
            );
        }
    }
    Ok(())
}
