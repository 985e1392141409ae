//! Our data plane (`tabbify-mesh up`) end to end in network namespaces: against itself,
//! wireguard-go and boringtun-cli, with ping and SHA-256-checked TCP transfers both ways.
//!
//! The matrix covers every dimension — peer implementation, driver, offloads, inner
//! family, outer family, loss, who initiates — without the full cross product:
//!
//! | test | left (initiator) | right | inner | outer | loss | TCP each way |
//! |---|---|---|---|---|---|---|
//! | `ours_pair_uring_offloads_on` | ours uring, offloads on | same | IPv6 | IPv4 | – | 100 MiB |
//! | `ours_pair_epoll_offloads_off` | ours epoll, offloads off | same | IPv4 | IPv6 | – | 100 MiB |
//! | `ours_mixed_drivers_and_offloads_dual_stack` | ours uring, off | ours epoll, on | v6+v4 | IPv6 | – | 100 MiB (+1 MiB v4) |
//! | `ours_uring_initiates_to_wireguard_go` | ours uring, on | wireguard-go | v6+v4 | IPv4 | – | 100 MiB (+1 MiB v4) |
//! | `wireguard_go_initiates_to_ours_epoll` | wireguard-go | ours epoll, on | IPv4 | IPv6 | – | 100 MiB |
//! | `ours_uring_initiates_to_boringtun` | ours uring, on | boringtun-cli -t1 | IPv6 | IPv6 | – | 100 MiB |
//! | `boringtun_initiates_to_ours_epoll_offloads_off` | boringtun-cli | ours epoll, off | IPv4 | IPv4 | – | 100 MiB |
//! | `ours_pair_uring_under_loss` | ours uring, on | same | IPv6 | IPv4 | 10% | 20 MiB |
//! | `ours_epoll_offloads_off_and_wireguard_go_under_loss` | ours epoll, off | wireguard-go | IPv4 | IPv6 | 10% | 20 MiB |
//! | `boringtun_and_ours_uring_offloads_off_under_loss` | boringtun-cli -t1 | ours uring, off | IPv6 | IPv4 | 10% | 20 MiB |
//!
//! `ours_pair_carries_udp_datagrams_whole_and_coalesced` (ours uring ↔ ours epoll, offloads
//! on, v6+v4 inside, IPv4 outside) sends numbered UDP datagrams both ways and checks each
//! one's size and bytes, and that the receiving side coalesced them (UDP GRO over USO).
//!
//! Every test also checks `wg show` on our interface (peer listed, handshake, transfer
//! counters at least the bytes moved), that our log names the driver it was asked for and
//! the offloads, and that SIGTERM makes ours exit 0 and remove its interface and socket.
//! PSK and persistent keepalive are exercised on some rows. Loss is random drops on both
//! veth ends (`tc netem`, or nftables where the kernel has no netem).

use std::time::Duration;

use anyhow::{ensure, Result};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::wg::{Driver, Implementation, WgPeer};
use tabbify_tests::{Inner, Tunnel, TunnelSpec};

const MIB: u64 = 1 << 20;
const FULL: u64 = 100 * MIB;
const LOSSY: u64 = 20 * MIB;

fn ours(driver: Driver, offloads: bool) -> Implementation {
    Implementation::ours(driver, offloads)
}

fn wireguard_go() -> Implementation {
    Implementation::WireguardGo
}

fn boringtun(threads: Option<u32>) -> Implementation {
    Implementation::Boringtun { threads }
}

/// What every test runs: build, exercise, check our side, stop cleanly.
fn run(spec: TunnelSpec, bytes: u64) -> Result<()> {
    let mut tools = vec![Tool::Iproute2, Tool::Wg, Tool::Ping];
    for side in [&spec.left, &spec.right] {
        tools.extend(side.tools());
    }
    if spec.loss_percent.is_some() {
        tools.push(Tool::Nft);
    }
    require(&tools)?;
    tabbify_tests::bins::tabbify_mesh()?;

    let tunnel = Tunnel::start(&spec)?;
    tunnel.exercise(
        std::path::Path::new(env!("CARGO_BIN_EXE_tabbify-xfer")),
        bytes,
        Duration::from_secs(300),
    )?;
    for (side, other) in [(&tunnel.left, &tunnel.right), (&tunnel.right, &tunnel.left)] {
        if let Implementation::Ours(options) = side.implementation() {
            check_wg_show(side, other)?;
            check_startup_log(side, options.driver)?;
        }
    }
    tunnel.stop()
}

/// `wg show IFNAME` (the human format) against our UAPI lists the peer with a handshake
/// and transfer figures.
fn check_wg_show(ours: &WgPeer, peer: &WgPeer) -> Result<()> {
    let text = ours.show()?;
    ensure!(
        text.contains(&format!("interface: {}", ours.ifname())),
        "wg show:\n{text}"
    );
    ensure!(
        text.contains(&format!("peer: {}", peer.public_key())),
        "peer not listed by wg show:\n{text}"
    );
    ensure!(
        text.contains("latest handshake:"),
        "no handshake in wg show:\n{text}"
    );
    ensure!(
        text.contains("transfer:"),
        "no transfer counters in wg show:\n{text}"
    );
    ensure!(
        text.contains("endpoint:"),
        "no endpoint in wg show:\n{text}"
    );
    Ok(())
}

/// Our log names the driver in use and the offloads.
fn check_startup_log(ours: &WgPeer, driver: Option<Driver>) -> Result<()> {
    let logs = ours.logs();
    if let Some(driver) = driver {
        ensure!(
            logs.lines()
                .any(|line| line.contains("driver") && line.contains(driver.as_arg())),
            "log does not name driver {}:\n{logs}",
            driver.as_arg()
        );
    }
    ensure!(
        logs.contains("offload"),
        "log does not mention offloads:\n{logs}"
    );
    Ok(())
}

#[test]
fn ours_pair_uring_offloads_on() -> Result<()> {
    let mut spec = TunnelSpec::new(ours(Driver::Uring, true), ours(Driver::Uring, true));
    spec.inner = Inner::V6;
    spec.outer_v6 = false;
    run(spec, FULL)
}

#[test]
fn ours_pair_epoll_offloads_off() -> Result<()> {
    let mut spec = TunnelSpec::new(ours(Driver::Epoll, false), ours(Driver::Epoll, false));
    spec.inner = Inner::V4;
    spec.outer_v6 = true;
    spec.psk = true;
    run(spec, FULL)
}

#[test]
fn ours_mixed_drivers_and_offloads_dual_stack() -> Result<()> {
    let mut spec = TunnelSpec::new(ours(Driver::Uring, false), ours(Driver::Epoll, true));
    spec.inner = Inner::Dual;
    spec.outer_v6 = true;
    spec.keepalive = Some(1);
    run(spec, FULL)
}

#[test]
fn ours_uring_initiates_to_wireguard_go() -> Result<()> {
    let mut spec = TunnelSpec::new(ours(Driver::Uring, true), wireguard_go());
    spec.inner = Inner::Dual;
    spec.outer_v6 = false;
    spec.psk = true;
    run(spec, FULL)
}

#[test]
fn wireguard_go_initiates_to_ours_epoll() -> Result<()> {
    let mut spec = TunnelSpec::new(wireguard_go(), ours(Driver::Epoll, true));
    spec.inner = Inner::V4;
    spec.outer_v6 = true;
    run(spec, FULL)
}

#[test]
fn ours_uring_initiates_to_boringtun() -> Result<()> {
    let mut spec = TunnelSpec::new(ours(Driver::Uring, true), boringtun(Some(1)));
    spec.inner = Inner::V6;
    spec.outer_v6 = true;
    spec.keepalive = Some(1);
    run(spec, FULL)
}

#[test]
fn boringtun_initiates_to_ours_epoll_offloads_off() -> Result<()> {
    let mut spec = TunnelSpec::new(boringtun(None), ours(Driver::Epoll, false));
    spec.inner = Inner::V4;
    spec.outer_v6 = false;
    spec.psk = true;
    run(spec, FULL)
}

#[test]
fn ours_pair_uring_under_loss() -> Result<()> {
    let mut spec = TunnelSpec::new(ours(Driver::Uring, true), ours(Driver::Uring, true));
    spec.inner = Inner::V6;
    spec.outer_v6 = false;
    spec.loss_percent = Some(10);
    run(spec, LOSSY)
}

#[test]
fn ours_epoll_offloads_off_and_wireguard_go_under_loss() -> Result<()> {
    let mut spec = TunnelSpec::new(ours(Driver::Epoll, false), wireguard_go());
    spec.inner = Inner::V4;
    spec.outer_v6 = true;
    spec.loss_percent = Some(10);
    run(spec, LOSSY)
}

#[test]
fn boringtun_and_ours_uring_offloads_off_under_loss() -> Result<()> {
    let mut spec = TunnelSpec::new(boringtun(Some(1)), ours(Driver::Uring, false));
    spec.inner = Inner::V6;
    spec.outer_v6 = false;
    spec.loss_percent = Some(10);
    run(spec, LOSSY)
}

/// Writes to the TUN the kernel counted on `side`'s interface (each one packet or one
/// coalesced super-packet).
fn tun_writes(side: &WgPeer) -> Result<u64> {
    let path = format!("/sys/class/net/{}/statistics/rx_packets", side.ifname());
    let text = side.netns().run("cat", &[&path])?;
    Ok(text.trim().parse()?)
}

/// Numbered UDP datagrams of mixed sizes, IPv6 and IPv4 inside, both ways between an
/// io_uring and an epoll receiver: every datagram arrives once with its exact size and
/// bytes (at most 1% lost: UDP may drop under CPU starvation, but not corrupt), and where
/// the TUN took USO, the receiver wrote far fewer super-datagrams than datagrams (the UDP
/// GRO path carried them).
#[test]
fn ours_pair_carries_udp_datagrams_whole_and_coalesced() -> Result<()> {
    const COUNT: u32 = 4000;
    require(&[Tool::Iproute2, Tool::Wg, Tool::Ping])?;
    tabbify_tests::bins::tabbify_mesh()?;
    let mut spec = TunnelSpec::new(ours(Driver::Uring, true), ours(Driver::Epoll, true));
    spec.inner = Inner::Dual;
    spec.outer_v6 = false;
    let tunnel = Tunnel::start(&spec)?;
    tunnel.wait_ready(Duration::from_secs(30))?;
    let xfer = std::path::Path::new(env!("CARGO_BIN_EXE_tabbify-xfer"));
    let sides = [
        (&tunnel.left, &tunnel.right, &tunnel.right_inner),
        (&tunnel.right, &tunnel.left, &tunnel.left_inner),
    ];
    for (from, to, addresses) in sides {
        let uso = to.logs().contains("uso4+uso6");
        for &addr in addresses.iter() {
            tabbify_tests::traffic::wait_ping(from.netns(), addr, Duration::from_secs(30))?;
            let before = tun_writes(to)?;
            let report =
                tabbify_tests::traffic::udp_transfer(xfer, from.netns(), to.netns(), addr, COUNT)?;
            let writes = tun_writes(to)? - before;
            let what = format!(
                "UDP {} → {addr} ({}): {report:?}, {writes} TUN writes",
                from.ifname(),
                to.implementation().label()
            );
            ensure!(report.bad == 0 && report.dup == 0, "{what}");
            ensure!(report.good >= COUNT - COUNT / 100, "{what}");
            if uso {
                ensure!(u64::from(report.good) > 2 * writes, "not coalesced: {what}");
            }
            eprintln!("{what}");
        }
    }
    tunnel.stop()
}
