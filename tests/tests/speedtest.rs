//! Issue 16, Deliver 5: `tabbify-mesh speedtest PEER` between members, over the mesh.
//!
//! Three members in their own namespaces under one coordinator. The policy lets
//! supervisors reach each other on every port and the node reach supervisors on
//! tcp:8730 only. supervisor-a runs with `--speedtest-bind off`; supervisor-b with the
//! default responder on its ULA.
//! * a → b (both directions, `--json` and text): runs, reports bytes and Gbit/s each way,
//!   RTT samples, and the path from the engine's peer state ("direct");
//! * b → a: a runs no responder: the clear "blocked by policy or no responder" error;
//! * node → b: the policy does not allow tcp:8731 (the node's outbound filter drops the
//!   SYN): the same clear error after the short connect timeout, not a hang;
//! * b's responder listens on its ULA only (`ss`), never on a wildcard or LAN address.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{JoinSpec, Testbed};

const SETTLE: Duration = Duration::from_secs(30);

#[test]
fn speedtest_runs_between_members_and_refusals_are_clear() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping])?;
    let mesh = tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let policy = json!({
        "tags": ["supervisor", "node"],
        "allow": [
            {"src": ["tag:supervisor"], "dst": ["tag:supervisor"]},
            {"src": ["tag:node"], "dst": ["tag:supervisor:tcp:8730"]},
        ],
    });
    let bed = Testbed::start(policy, 3)?;
    let (a_ns, _) = bed.host()?;
    let (b_ns, _) = bed.host()?;
    let (n_ns, _) = bed.host()?;
    let mut a_spec = JoinSpec::new("supervisor-a", &["supervisor"], None);
    a_spec.extra_args = vec!["--speedtest-bind".into(), "off".into()];
    let mut a = bed.join(&a_ns, a_spec)?;
    let mut b = bed.join(&b_ns, JoinSpec::new("supervisor-b", &["supervisor"], None))?;
    let mut n = bed.join(&n_ns, JoinSpec::new("node-1", &["node"], None))?;
    let sb = b.wait_peer_names(&["supervisor-a", "node-1"], SETTLE)?;
    // Supervisors see the node too (it may reach them), the node sees both supervisors.
    a.wait_peer_names(&["supervisor-b", "node-1"], SETTLE)?;
    n.wait_peer_names(&["supervisor-a", "supervisor-b"], SETTLE)?;

    // b's responder: on its ULA only.
    let listening = b_ns.run("ss", &["-Htln"])?;
    ensure!(
        listening.contains(&format!("[{}]:8731", sb.ula)),
        "b's responder is not on its ULA: {listening}"
    );
    ensure!(
        !listening.contains("*:8731") && !listening.contains("0.0.0.0:8731"),
        "b listens on a wildcard: {listening}"
    );
    ensure!(
        !a_ns.run("ss", &["-Htln"])?.contains(":8731"),
        "a runs with --speedtest-bind off"
    );

    // a → b, both directions, JSON.
    let text = a
        .local_command(&[
            "speedtest",
            "supervisor-b",
            "--duration",
            "1s",
            "--pings",
            "5",
            "--json",
        ])
        .context("speedtest a → b")?;
    let r: serde_json::Value = serde_json::from_str(&text).context(text.clone())?;
    ensure!(r["peer"] == "supervisor-b", "{text}");
    ensure!(r["path"] == "direct", "path: {text}");
    ensure!(r["path_words"] == "direct", "path in words: {text}");
    for dir in ["send", "receive"] {
        let bytes = r[dir]["bytes"].as_u64().unwrap_or(0);
        let gbit = r[dir]["gbit_s"].as_f64().unwrap_or(0.0);
        ensure!(bytes > 0 && gbit > 0.0, "{dir}: {text}");
        ensure!(r[dir]["direction"] == dir, "{dir}: {text}");
    }
    ensure!(r["rtt"]["samples"] == 5, "rtt: {text}");
    let (min, avg) = (
        r["rtt"]["min_ms"].as_f64().unwrap_or(-1.0),
        r["rtt"]["avg_ms"].as_f64().unwrap_or(-1.0),
    );
    ensure!(min > 0.0 && min <= avg, "rtt: {text}");

    // The same in words, by ULA, one direction.
    let text = a.local_command(&[
        "speedtest",
        &sb.ula.to_string(),
        "--duration",
        "500ms",
        "--reverse",
    ])?;
    ensure!(
        text.contains("path:     direct") && text.contains("receive:") && text.contains("Gbit/s"),
        "{text}"
    );
    ensure!(
        !text.contains("send:"),
        "--reverse runs only peer → us: {text}"
    );

    // b → a: a runs no responder.
    let out = b_ns
        .command(&mesh)
        .args(["speedtest", "supervisor-a", "--duration", "1s"])
        .args(["--interface", b.ifname()])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("blocked by policy or no responder"),
        "b → a: {:?} {err}",
        out.status
    );

    // node → b: the policy allows tcp:8730 only.
    let out = n_ns
        .command(&mesh)
        .args(["speedtest", "supervisor-b", "--duration", "1s"])
        .args(["--interface", n.ifname()])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("blocked by policy or no responder")
            && err.contains("tcp:8731"),
        "node → b: {:?} {err}",
        out.status
    );
    ensure!(!err.contains("panicked"), "{err}");

    a.stop()?;
    b.stop()?;
    n.stop()?;
    Ok(())
}
