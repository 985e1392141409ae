//! Issue 16, `systemctl reload tabbify-mesh` = SIGHUP to a joiner the test started with
//! `--config FILE` in its own namespace.
//! * The file gains `advertise-routes`, `log-level = "debug"` and an `mtu`, then SIGHUP: the
//!   coordinator lists the new advertisement (sent at the next heartbeat), the node turns
//!   forwarding on and its masquerade table appears, debug lines start, and the log says
//!   "needs a restart: mtu" (the TUN keeps its MTU).
//! * A broken file (a typo, or an attacker with write access to it), then SIGHUP: refused
//!   with its line and key; the joiner keeps running, registered, with its route.
//! * The certificate file replaced by a valid one of ANOTHER member (same mesh CA), then
//!   SIGHUP: refused as another identity; the joiner keeps its own certificate (the next
//!   reload's route change still reaches the coordinator, so its heartbeats still work).
//! * The route removed from the file, then SIGHUP: the coordinator no longer lists it and
//!   the node's forwarding and masquerade are undone.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tabbify_tests::joiner::Joiner;
use tabbify_tests::pki::Issued;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{JoinSpec, Netns, Testbed};

const SETTLE: Duration = Duration::from_secs(30);
const PREFIX: &str = "10.78.5.0/24";

/// The prefixes the coordinator lists for `name`.
fn advertised(bed: &Testbed, name: &str) -> Result<Vec<String>> {
    let v = bed.admin.expect_ok("GET", "/v1/routes", None)?;
    let routes = v["routes"]
        .as_array()
        .with_context(|| format!("no routes in {v}"))?;
    Ok(routes
        .iter()
        .filter(|r| r["display_name"] == name)
        .filter_map(|r| r["prefix"].as_str().map(str::to_owned))
        .collect())
}

fn wait_advertised(bed: &Testbed, name: &str, want: &[&str], j: &Joiner) -> Result<()> {
    tabbify_tests::wait::until_true(
        &format!("the coordinator to list {want:?} for {name}"),
        SETTLE,
        || advertised(bed, name).is_ok_and(|a| a == want),
    )
    .with_context(|| format!("joiner log:\n{}", j.logs()))
}

fn forwarding(netns: &Netns) -> Result<String> {
    Ok(netns
        .run("cat", &["/proc/sys/net/ipv4/ip_forward"])?
        .trim()
        .to_owned())
}

fn has_table(netns: &Netns) -> bool {
    netns
        .command("nft")
        .args(["list", "table", "inet", "tabbify"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Copies the issued files to `dir` (the test rewrites them; the PKI's stay intact).
fn own_copy(issued: &Issued, dir: &Path) -> Result<Issued> {
    std::fs::create_dir_all(dir)?;
    let copy = |from: &Path, name: &str| -> Result<std::path::PathBuf> {
        let to = dir.join(name);
        std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        Ok(to)
    };
    Ok(Issued {
        name: issued.name.clone(),
        cert: copy(&issued.cert, "node.crt")?,
        key: copy(&issued.key, "node.key")?,
        ca: copy(&issued.ca, "ca.crt")?,
    })
}

/// Counts the log lines containing `needle`.
fn count(j: &Joiner, needle: &str) -> usize {
    j.logs().matches(needle).count()
}

/// Writes the config file, sends SIGHUP and waits for the `done`-th line with `needle`.
fn reload(j: &mut Joiner, file: &Path, text: &str, needle: &str, done: usize) -> Result<()> {
    std::fs::write(file, text)?;
    j.process().signal(libc::SIGHUP)?;
    tabbify_tests::wait::until_true(&format!("the joiner to log {needle:?}"), SETTLE, || {
        count(j, needle) >= done
    })
    .with_context(|| format!("joiner log:\n{}", j.logs()))?;
    j.process().ensure_running()
}

#[test]
fn sighup_applies_the_route_flags_and_keeps_everything_on_a_bad_file() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Nft])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let policy = json!({
        "tags": ["router"],
        "routes": {"10.78.0.0/16": ["tag:router"]},
        "allow": [{"src": ["tag:router"], "dst": ["tag:router"]}],
    });
    let bed = Testbed::start(policy, 1)?;
    let (ns, _) = bed.host()?;
    let issued = bed.pki.issue_peer("reload-r1")?;
    let cert = own_copy(&issued, &ns.workdir().join("tls-r1"))?;
    let file = ns.workdir().join("join.toml");
    std::fs::write(&file, "# nothing yet\n")?;
    let mut spec = JoinSpec::new("reload-r1", &["router"], None);
    spec.extra_args = vec![
        "--config".into(),
        file.display().to_string(),
        "--metrics-bind".into(),
        "off".into(),
    ];
    spec.join_token = Some(bed.token_for(&spec)?);
    let mut j = Joiner::start(&ns, &bed.coordinator.url(), &cert, spec)?;
    ensure!(advertised(&bed, "reload-r1")?.is_empty());
    ensure!(!has_table(&ns), "not a router yet");
    let forwarding_before = forwarding(&ns)?;
    let mtu_before = ns.ip(&["link", "show", j.ifname()])?;

    // Routes, log level and a flag that needs a restart.
    let routed = format!("advertise-routes = [\"{PREFIX}\"]\nlog-level = \"debug\"\nmtu = 1300\n");
    reload(&mut j, &file, &routed, "configuration reloaded", 1)?;
    wait_advertised(&bed, "reload-r1", &[PREFIX], &j)?;
    ensure!(forwarding(&ns)? == "1", "forwarding on for the new route");
    ensure!(
        has_table(&ns),
        "the masquerade table exists for the new route"
    );
    let logs = j.logs();
    ensure!(logs.contains("needs a restart: mtu"), "{logs}");
    ensure!(
        ns.ip(&["link", "show", j.ifname()])? == mtu_before,
        "the MTU changed without a restart"
    );
    tabbify_tests::wait::until_true("a debug line after the reload", SETTLE, || {
        j.logs().contains("DEBUG")
    })?;

    // A broken file: nothing changes, the joiner runs on.
    let broken = format!("advertise-routes = [\"{PREFIX}\"]\nlisten-prot = 1\n");
    reload(&mut j, &file, &broken, "reload refused", 1)?;
    let logs = j.logs();
    ensure!(
        logs.contains(":2:1: key `listen-prot`"),
        "the refusal names the line and key: {logs}"
    );
    let s = j.status()?;
    ensure!(s.registered && s.coordinator.connected, "{}", s.summary());
    ensure!(advertised(&bed, "reload-r1")? == [PREFIX]);
    ensure!(forwarding(&ns)? == "1" && has_table(&ns));

    // Attacker: another member's valid certificate written over ours.
    let other = bed.pki.issue_peer("reload-mallory")?;
    std::fs::copy(&cert.cert, ns.workdir().join("tls-r1/own.crt"))?;
    std::fs::copy(&cert.key, ns.workdir().join("tls-r1/own.key"))?;
    std::fs::copy(&other.cert, &cert.cert)?;
    std::fs::copy(&other.key, &cert.key)?;
    reload(&mut j, &file, &routed, "not \"reload-r1\"", 1)?;
    std::fs::copy(ns.workdir().join("tls-r1/own.crt"), &cert.cert)?;
    std::fs::copy(ns.workdir().join("tls-r1/own.key"), &cert.key)?;

    // The route withdrawn: the heartbeats (with our own certificate) carry it.
    reload(&mut j, &file, "# no routes\n", "configuration reloaded", 3)?;
    wait_advertised(&bed, "reload-r1", &[], &j)?;
    ensure!(
        forwarding(&ns)? == forwarding_before,
        "forwarding back to {forwarding_before}"
    );
    ensure!(!has_table(&ns), "masquerade undone");
    let s = j.status()?;
    ensure!(s.registered && s.coordinator.connected, "{}", s.summary());
    j.stop()?;
    Ok(())
}
