//! The harness itself, and stock WireGuard implementations against each other: these
//! prove the tooling works before any test of ours relies on it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::{ping, tcp_transfer, wait_ping};
use tabbify_tests::wg::Implementation;
use tabbify_tests::{Inner, Netns, Tunnel, TunnelSpec, VethOptions, VethPair};

const MB: u64 = 1024 * 1024;

fn namespace_exists(name: &str) -> Result<bool> {
    let list = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name)))
}

fn process_alive(pid: u32) -> bool {
    // A killed child is reaped by its handle, so its /proc entry disappears.
    Path::new(&format!("/proc/{pid}")).exists()
}

fn xfer() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_tabbify-xfer").into()
}

#[test]
fn namespace_and_its_processes_go_away_on_drop() -> Result<()> {
    require(&[Tool::Iproute2])?;
    let ns = Netns::new()?;
    let name = ns.name().to_owned();
    assert!(namespace_exists(&name)?);
    assert!(
        ns.ip(&["-o", "link", "show", "lo"])?.contains("UP"),
        "loopback is up"
    );
    let sleeper = ns.spawn("sleeper", "sleep", &["600"])?;
    let pid = sleeper.pid();
    assert!(process_alive(pid));
    drop(sleeper);
    assert!(!process_alive(pid), "dropping the handle kills the process");

    // A process that escaped its parent (double fork) still dies with the namespace.
    let orphan: u32 = ns
        .run("sh", &["-c", "sleep 600 >/dev/null 2>&1 & echo $!"])?
        .trim()
        .parse()?;
    assert!(process_alive(orphan));
    drop(ns);
    assert!(!namespace_exists(&name)?, "namespace {name} deleted");
    tabbify_tests::wait::until_true("the orphan to be reaped", Duration::from_secs(10), || {
        !process_alive(orphan)
    })?;
    Ok(())
}

#[test]
fn namespace_is_removed_when_a_test_panics() -> Result<()> {
    require(&[Tool::Iproute2])?;
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(move || {
        let ns = Netns::new().unwrap();
        tx.send(ns.name().to_owned()).unwrap();
        panic!("deliberate panic with a namespace alive");
    });
    assert!(outcome.is_err());
    let name = rx.recv()?;
    assert!(
        !namespace_exists(&name)?,
        "namespace {name} deleted while unwinding"
    );
    Ok(())
}

#[test]
fn veth_carries_ipv4_and_ipv6_with_rps_and_loss() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Nft])?;
    let (a, b) = (Netns::new()?, Netns::new()?);
    let veth = VethPair::connect(&a, &b, &VethOptions::default())?;
    for ipv6 in [false, true] {
        let stats = ping(&a, veth.b.addr(ipv6), 3, "0.05")?;
        assert_eq!(
            stats.received,
            3,
            "ping {} over the veth: {stats:?}",
            veth.b.addr(ipv6)
        );
        assert!(stats.avg_ms.is_some());
    }
    let rps = b.run(
        "cat",
        &[&format!(
            "/sys/class/net/{}/queues/rx-0/rps_cpus",
            veth.b.ifname
        )],
    )?;
    assert!(
        u64::from_str_radix(rps.trim().replace(',', "").trim_start_matches('0'), 16).unwrap_or(0)
            != 0,
        "RPS mask set: {rps}"
    );
    veth.set_loss(100)?;
    let stats = ping(&a, veth.b.addr(false), 2, "0.05")?;
    assert_eq!(stats.received, 0, "100% loss drops everything: {stats:?}");
    assert!(veth.loss_drops()? >= 2, "the drops are counted");
    veth.clear_loss()?;
    wait_ping(&a, veth.b.addr(true), Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn tcp_transfer_is_verified_end_to_end_over_plain_veth() -> Result<()> {
    require(&[Tool::Iproute2])?;
    let (a, b) = (Netns::new()?, Netns::new()?);
    let veth = VethPair::connect(&a, &b, &VethOptions::default())?;
    let transfer = tcp_transfer(
        &xfer(),
        &a,
        &b,
        veth.b.addr(true),
        16 * MB,
        Duration::from_secs(60),
    )?;
    assert_eq!(transfer.bytes, 16 * MB);
    assert_eq!(transfer.sha256.len(), 64);
    // Nobody listens on the other side's address in the wrong namespace: must fail.
    let wrong = tcp_transfer(
        &xfer(),
        &a,
        &a,
        veth.b.addr(false),
        MB,
        Duration::from_secs(20),
    );
    assert!(
        wrong.is_err(),
        "a transfer to a namespace without the receiver fails"
    );
    Ok(())
}

#[test]
fn wireguard_go_and_boringtun_ipv6_inner_ipv4_outer() -> Result<()> {
    require(&[
        Tool::Iproute2,
        Tool::Wg,
        Tool::WireguardGo,
        Tool::BoringtunCli,
        Tool::Ping,
    ])?;
    let mut spec = TunnelSpec::new(
        Implementation::WireguardGo,
        Implementation::Boringtun { threads: Some(1) },
    );
    spec.inner = Inner::V6;
    spec.psk = true;
    let tunnel = Tunnel::start(&spec)?;
    tunnel.exercise(&xfer(), 32 * MB, Duration::from_secs(120))?;
    tunnel.stop()
}

#[test]
fn boringtun_and_wireguard_go_dual_inner_ipv6_outer() -> Result<()> {
    require(&[
        Tool::Iproute2,
        Tool::Wg,
        Tool::WireguardGo,
        Tool::BoringtunCli,
        Tool::Ping,
    ])?;
    let mut spec = TunnelSpec::new(
        Implementation::Boringtun { threads: None },
        Implementation::WireguardGo,
    );
    spec.inner = Inner::Dual;
    spec.outer_v6 = true;
    spec.keepalive = Some(1);
    let tunnel = Tunnel::start(&spec)?;
    tunnel.exercise(&xfer(), 16 * MB, Duration::from_secs(120))?;
    tunnel.stop()
}

#[test]
fn wireguard_go_pair_ipv4_inner_ipv6_outer_under_10pct_loss() -> Result<()> {
    require(&[
        Tool::Iproute2,
        Tool::Wg,
        Tool::WireguardGo,
        Tool::Ping,
        Tool::Nft,
    ])?;
    let mut spec = TunnelSpec::new(Implementation::WireguardGo, Implementation::WireguardGo);
    spec.inner = Inner::V4;
    spec.outer_v6 = true;
    spec.loss_percent = Some(10);
    let tunnel = Tunnel::start(&spec)?;
    tunnel.exercise(&xfer(), 8 * MB, Duration::from_secs(120))?;
    let drops = tunnel.veth.loss_drops()?;
    assert!(
        drops > 100,
        "the transfers went through a lossy link ({drops} packets dropped)"
    );
    tunnel.stop()
}
