//! The relayed cases, `ours-relay-udp` and `ours-relay-tls` (issue 13, Deliver 6): two
//! joiners (`tabbify-mesh join --force-relay --relay URL`, the release build under test)
//! on a bridged LAN with the coordinator and one `tabbify-mesh-relay` process in the LAN's
//! own namespace, so every datagram between the joiners goes joiner → relay → joiner.
//!
//! ```text
//!   LAN namespace: br0 10.200.0.1, coordinator :8443, tabbify-mesh-relay :443 (TCP+UDP)
//!     ├── host a (10.200.0.N)   tabbify-mesh join --force-relay --relay https://10.200.0.1:443
//!     └── host b (10.200.0.M)   the same; the iperf3 server listens on b's mesh ULA
//! ```
//!
//! `ours-relay-tls` also drops UDP between each host and the relay's port (table
//! `tbp_relay_block` in each host namespace), so the relay's UDP BIND never answers and the
//! joiners carry their frames over the TLS stream (the loopback bridge). The relay's CPU
//! (utime + stime from `/proc/PID/stat`) is read around every iperf3 test, so the suite
//! can report relay cores per Gbit/s. Everything runs in namespaces this module creates.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tabbify_tests::lan::LanPort;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{JoinSpec, Joiner, Netns, Process, Testbed};

/// The relay's port on the LAN address (TCP and UDP).
pub const RELAY_PORT: u16 = 443;
/// The tag both joiners get.
const TAG: &str = "perf";

/// Which relay transport the joiners must use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// UDP frames to the relay (the fast path).
    Udp,
    /// UDP to the relay dropped: frames over the TLS stream.
    Tls,
}

/// A running relayed pair (see the module docs).
pub struct RelayBed {
    /// The client's namespace (iperf3 client, ping).
    pub client: Netns,
    /// The server's namespace (iperf3 server).
    pub server: Netns,
    /// The server joiner's ULA, where iperf3 connects.
    pub server_addr: IpAddr,
    relay: Process,
    left: Joiner,
    right: Joiner,
    _ports: (LanPort, LanPort),
    bed: Testbed,
}

impl RelayBed {
    /// Builds the LAN, the coordinator and the relay (`relay_bin`), starts both joiners
    /// pinned to the relay, and returns once a ping passes both ways with both sides
    /// saying `path: relay` (and, for [`RelayMode::Tls`], the stream bridge in use).
    pub fn start(mode: RelayMode, relay_bin: &Path) -> Result<RelayBed> {
        let bed = Testbed::start(
            json!({"tags": [TAG], "allow": [{"src": [format!("tag:{TAG}")], "dst": [format!("tag:{TAG}")]}]}),
            10,
        )?;
        let relay_addr = SocketAddr::new(bed.lan.addr().into(), RELAY_PORT);
        let cert = bed.pki.coordinator();
        let str_of = |p: &Path| -> Result<String> {
            p.to_str()
                .map(str::to_owned)
                .with_context(|| format!("non-UTF-8 path {}", p.display()))
        };
        let args = [
            "--listen".to_owned(),
            relay_addr.to_string(),
            "--tls-cert".to_owned(),
            str_of(&cert.cert)?,
            "--tls-key".to_owned(),
            str_of(&cert.key)?,
            "--tls-ca".to_owned(),
            str_of(&cert.ca)?,
            "--metrics-bind".to_owned(),
            "127.0.0.1:9091".to_owned(),
            // One session carries the whole test: no per-session limit.
            "--rate-mbit".to_owned(),
            "1000000".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut relay = bed.lan.netns().spawn("relay", &str_of(relay_bin)?, &args)?;
        relay.wait_for_log("listening", Duration::from_secs(10))?;

        let (client, client_port) = bed.host()?;
        let (server, server_port) = bed.host()?;
        if mode == RelayMode::Tls {
            require(&[Tool::Nft])?;
            for netns in [&client, &server] {
                block_udp_to(netns, relay_addr)?;
            }
        }
        let url = format!("https://{relay_addr}");
        let join = |netns: &Netns, name: &str| -> Result<Joiner> {
            let mut spec = JoinSpec::new(name, &[TAG], None);
            spec.relays = vec![url.clone()];
            spec.force_relay = true;
            bed.join(netns, spec)
        };
        let mut left = join(&client, "perf-a")?;
        let mut right = join(&server, "perf-b")?;
        let timeout = Duration::from_secs(20);
        let server_addr: IpAddr = left
            .wait_peer("perf-b", "on the relay", timeout, |p| p.path == "relay")?
            .ula
            .into();
        let client_addr: IpAddr = right
            .wait_peer("perf-a", "on the relay", timeout, |p| p.path == "relay")?
            .ula
            .into();
        tabbify_tests::traffic::wait_ping(&client, server_addr, timeout)?;
        tabbify_tests::traffic::wait_ping(&server, client_addr, timeout)?;
        // The transport the case is named for is the one in use on both ends.
        let udp = mode == RelayMode::Udp;
        for joiner in [&mut left, &mut right] {
            joiner.wait_status(
                if udp {
                    "to bind the relay's UDP side"
                } else {
                    "to use the relay's TLS stream (UDP blocked)"
                },
                timeout,
                |s| {
                    !s.relays.is_empty() && s.relays.iter().all(|r| r.session && r.udp_bound == udp)
                },
            )?;
        }
        Ok(RelayBed {
            client,
            server,
            server_addr,
            relay,
            left,
            right,
            _ports: (client_port, server_port),
            bed,
        })
    }

    /// CPU time both joiners used so far.
    pub fn joiners_cpu(&mut self) -> Result<Duration> {
        Ok(self.left.process().cpu_time()? + self.right.process().cpu_time()?)
    }

    /// CPU time the relay process used so far.
    pub fn relay_cpu(&self) -> Result<Duration> {
        self.relay.cpu_time()
    }

    /// The first lines of the client joiner's log that name the relay transport.
    pub fn startup_log(&self) -> Vec<String> {
        self.left
            .logs()
            .lines()
            .filter(|line| line.contains("relay") || line.contains("driver"))
            .take(8)
            .map(str::to_owned)
            .collect()
    }

    /// Stops both joiners (checking their clean exit), then the relay and the rest.
    pub fn stop(self) -> Result<()> {
        let RelayBed {
            left,
            right,
            mut relay,
            bed,
            ..
        } = self;
        let stopped = left.stop().and(right.stop());
        relay.stop(Duration::from_secs(5))?;
        drop(bed);
        stopped
    }
}

/// Drops UDP between `netns` and `relay` both ways (table `tbp_relay_block`).
fn block_udp_to(netns: &Netns, relay: SocketAddr) -> Result<()> {
    let (ip, port) = (relay.ip(), relay.port());
    let rules = format!(
        "table inet tbp_relay_block {{\n\
         \x20 chain output {{\n\
         \x20   type filter hook output priority filter; policy accept;\n\
         \x20   ip daddr {ip} udp dport {port} counter drop\n\
         \x20 }}\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   ip saddr {ip} udp sport {port} counter drop\n\
         \x20 }}\n\
         }}\n"
    );
    let path = netns.workdir().join("relay-block.nft");
    std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
    let path = path.to_str().context("non-UTF-8 work directory")?;
    netns
        .run("nft", &["-f", path])
        .map(drop)
        .context("blocking UDP to the relay")
}
