//! A mesh in the [`NatLab`]: one coordinator on [`HUB`] (mTLS, its STUN server on its
//! port and the next), an admin client, and joiners started in the lab's member
//! namespaces with a fresh certificate and single-use token each; plus the attacker's
//! tool the lab tests use, [`junk_flood`], and [`rss_kib`] to watch a process's memory.
//!
//! Invariants: everything runs in the lab's own namespaces; the certificates name
//! [`HUB`] and [`RELAY`] (so a relay on [`RELAY`] can use the coordinator's certificate
//! chain); every member gets the tag [`TAG`], and the policy lets every member reach
//! every other one.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::admin::Admin;
use crate::coordinator::{Coordinator, CoordinatorSpec};
use crate::joiner::{JoinSpec, Joiner};
use crate::natlab::{NatLab, HUB, RELAY, RELAY2, RELAY_TCP_PORT};
use crate::netns::Netns;
use crate::pki::{Issued, Pki};
use crate::process::Process;
use crate::testbed::{ADMIN, COORDINATOR_PORT};

/// The tag every lab member gets.
pub const TAG: &str = "node";

/// The URL of the relay [`LabMesh::start_relay`] runs: TLS over TCP and UDP on
/// [`RELAY`]:[`RELAY_TCP_PORT`] (the port [`crate::RouterKind::UdpBlocked`] lets through).
pub fn relay_url() -> String {
    format!("https://{RELAY}:{RELAY_TCP_PORT}")
}

/// The URL of the second relay ([`LabMesh::start_relay2`]) on [`RELAY2`]:[`RELAY_TCP_PORT`].
pub fn relay2_url() -> String {
    format!("https://{RELAY2}:{RELAY_TCP_PORT}")
}

/// A coordinator in the lab's internet namespace and what it takes to add members.
pub struct LabMesh {
    /// The mesh PKI (SANs [`HUB`] and [`RELAY`]).
    pub pki: Pki,
    /// The coordinator on [`HUB`]:[`COORDINATOR_PORT`].
    pub coordinator: Coordinator,
    /// The admin client (in the internet namespace).
    pub admin: Admin,
}

impl LabMesh {
    /// Starts the coordinator in `lab`'s internet namespace with all-to-all policy and
    /// `--heartbeat-secs heartbeat_secs`.
    pub fn start(lab: &NatLab, heartbeat_secs: u64) -> Result<LabMesh> {
        Self::start_advertising(lab, heartbeat_secs, Vec::new())
    }

    /// As [`LabMesh::start`], the coordinator advertising `relay_urls` (`--relay-url`
    /// each, in order) in its register and heartbeat answers.
    pub fn start_advertising(
        lab: &NatLab,
        heartbeat_secs: u64,
        relay_urls: Vec<String>,
    ) -> Result<LabMesh> {
        let policy = json!({
            "tags": [TAG],
            "allow": [{"src": [format!("tag:{TAG}")], "dst": [format!("tag:{TAG}")]}],
        });
        Self::start_with_policy(lab, heartbeat_secs, relay_urls, policy)
    }

    /// As [`LabMesh::start_advertising`], with `policy` (members still get [`TAG`] from
    /// [`LabMesh::spec`], so the policy should name it).
    pub fn start_with_policy(
        lab: &NatLab,
        heartbeat_secs: u64,
        relay_urls: Vec<String>,
        policy: serde_json::Value,
    ) -> Result<LabMesh> {
        let pki = Pki::new(&[IpAddr::V4(HUB), IpAddr::V4(RELAY)])?;
        let coordinator = Coordinator::start(
            &lab.internet,
            &pki,
            CoordinatorSpec {
                bind: SocketAddr::new(HUB.into(), COORDINATOR_PORT),
                policy,
                admin: ADMIN.to_owned(),
                heartbeat_secs,
                relay: false,
                relay_urls,
            },
        )?;
        let admin = Admin::new(&lab.internet, &coordinator.url(), pki.issue_admin(ADMIN)?);
        Ok(LabMesh {
            pki,
            coordinator,
            admin,
        })
    }

    /// Starts `tabbify-mesh-relay` in `lab`'s internet namespace on
    /// [`RELAY`]:[`RELAY_TCP_PORT`] with the coordinator's certificate (its SANs name
    /// [`RELAY`]), metrics on 127.0.0.1:9091 there; returns once it listens.
    pub fn start_relay(&self, lab: &NatLab) -> Result<Process> {
        let cert = self.pki.coordinator().clone();
        self.start_relay_at(lab, "relay", RELAY, &cert, 9091)
    }

    /// Starts a second `tabbify-mesh-relay` in `lab`'s internet namespace on
    /// [`RELAY2`]:[`RELAY_TCP_PORT`] ([`relay2_url`]) with a server certificate of its own
    /// from the mesh CA (SAN [`RELAY2`]), metrics on 127.0.0.1:9092 there.
    pub fn start_relay2(&self, lab: &NatLab) -> Result<Process> {
        let cert = self.pki.issue_relay("relay2", &[IpAddr::V4(RELAY2)])?;
        self.start_relay_at(lab, "relay2", RELAY2, &cert, 9092)
    }

    /// Starts `tabbify-mesh-relay` (process label `label`) in `lab`'s internet namespace on
    /// `addr`:[`RELAY_TCP_PORT`] (TCP and UDP) with `cert` (its SANs must name `addr`),
    /// metrics on 127.0.0.1:`metrics_port` there; returns once it listens.
    fn start_relay_at(
        &self,
        lab: &NatLab,
        label: &str,
        addr: std::net::Ipv4Addr,
        cert: &Issued,
        metrics_port: u16,
    ) -> Result<Process> {
        let binary = crate::bins::locate(
            "tabbify-mesh-relay",
            "TABBIFY_RELAY_BIN",
            "cargo build -p tabbify-relay --bin tabbify-mesh-relay",
        )?;
        let listen = SocketAddr::new(addr.into(), RELAY_TCP_PORT).to_string();
        let path = |p: &std::path::Path| -> Result<String> {
            p.to_str()
                .map(str::to_owned)
                .with_context(|| format!("non-UTF-8 path {}", p.display()))
        };
        let args = [
            "--listen".to_owned(),
            listen,
            "--tls-cert".to_owned(),
            path(&cert.cert)?,
            "--tls-key".to_owned(),
            path(&cert.key)?,
            "--tls-ca".to_owned(),
            path(&cert.ca)?,
            "--metrics-bind".to_owned(),
            format!("127.0.0.1:{metrics_port}"),
            // The perf and matrix runs must not be limited per session.
            "--rate-mbit".to_owned(),
            "1000000".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut relay = lab.internet.spawn(label, &path(&binary)?, &args)?;
        relay.wait_for_log("listening", Duration::from_secs(10))?;
        Ok(relay)
    }

    /// A spec for member `name` with [`TAG`] and a fresh single-use token.
    pub fn spec(&self, name: &str) -> Result<JoinSpec> {
        let token = self
            .admin
            .create_token(&[TAG], None, 1)
            .with_context(|| format!("a join token for {name}"))?;
        Ok(JoinSpec::new(name, &[TAG], Some(token)))
    }

    /// Starts `spec` in `netns` and waits for its registration.
    pub fn join(&self, netns: &Netns, spec: JoinSpec) -> Result<Joiner> {
        let cert = self.pki.issue_peer(&spec.name)?;
        Joiner::start(netns, &self.coordinator.url(), &cert, spec)
    }
}

/// What [`junk_flood`] sent, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flood {
    /// Random bytes whose first byte is no known kind (the engine's `junk`).
    pub random: u64,
    /// WireGuard-shaped datagrams (types 1..4, zero reserved bytes) with random contents:
    /// bad lengths, unknown receiver indexes, initiations no key of ours made.
    pub wireguard: u64,
    /// STUN-shaped datagrams (the magic cookie) with random contents: they reach the
    /// control side, which must ignore them.
    pub stun: u64,
    /// Relay frames (`0xE1..=0xE4` + handle) with random contents.
    pub relay_frames: u64,
    /// Relay control datagrams (`0xF0..=0xFF`) with random contents.
    pub relay_control: u64,
}

impl Flood {
    /// Every datagram sent.
    pub fn total(&self) -> u64 {
        self.random + self.wireguard + self.stun + self.relay_frames + self.relay_control
    }
}

/// Sends `per_kind` datagrams of each [`Flood`] kind, interleaved, from one UDP socket in
/// `netns` to `target`, pausing 1 ms every 64 datagrams (so the receiver's socket buffer,
/// not the flood's speed, is what the test exercises less). Deterministic contents
/// (`seed`), so a failure can be replayed.
pub fn junk_flood(netns: &Netns, target: SocketAddr, per_kind: u64, seed: u64) -> Result<Flood> {
    crate::inside::block_on(netns, || async move {
        let bind: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let socket = tokio::net::UdpSocket::bind(bind)
            .await
            .context("binding the flood socket")?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut sent = Flood::default();
        let mut buf = [0u8; 1500];
        let mut n = 0u64;
        for _ in 0..per_kind {
            for kind in 0..5 {
                let len = match kind {
                    // WireGuard: the real sizes of each type half the time.
                    1 if rng.gen_bool(0.5) => [148, 92, 64, 32][rng.gen_range(0..4)],
                    2 => rng.gen_range(20..600),
                    _ => rng.gen_range(1..1400),
                };
                let datagram = &mut buf[..len];
                rng.fill(&mut datagram[..]);
                match kind {
                    0 => {
                        // 0x05..=0xDF or 0xE5..=0xEF: neither WireGuard, relay nor STUN
                        // (a top-bits-00 first byte without the cookie is junk too).
                        let first = rng.gen_range(0x05u8..=0xEF);
                        datagram[0] = if (0xE0..=0xE4).contains(&first) {
                            first + 5
                        } else {
                            first
                        };
                        sent.random += 1;
                    }
                    1 => {
                        datagram[0] = rng.gen_range(1..=4);
                        if datagram.len() >= 4 {
                            datagram[1..4].fill(0);
                        }
                        sent.wireguard += 1;
                    }
                    2 => {
                        datagram[0] &= 0x01;
                        datagram[4..8].copy_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
                        sent.stun += 1;
                    }
                    3 => {
                        datagram[0] = rng.gen_range(0xE1..=0xE4);
                        sent.relay_frames += 1;
                    }
                    _ => {
                        datagram[0] = rng.gen_range(0xF0..=0xFF);
                        sent.relay_control += 1;
                    }
                }
                socket
                    .send_to(datagram, target)
                    .await
                    .context("sending junk")?;
                n += 1;
                if n % 64 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        Ok(sent)
    })
}

/// The resident set size of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}
