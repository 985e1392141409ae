//! WireGuard endpoints for tests: ours (`tabbify-mesh up`), `wireguard-go` (Debian's, and
//! v0.0.20250522 with offloads as `wireguard-go-offload`), `boringtun-cli` and
//! `gotatun-cli`, started in a namespace and configured identically.
//!
//! Ours reads a wg-quick file and does its own addresses and routes. The stock daemons
//! are started with just an interface name, then configured from outside the way
//! wg-quick would: `wg setconf` over the UAPI socket, `ip addr`, `ip link set mtu … up`,
//! and one route per AllowedIPs entry.
//!
//! Interface names are random (`tw` + 8 hex digits) because the UAPI socket path
//! `/var/run/wireguard/<ifname>.sock` is shared by every namespace on the machine.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rand::Rng;

use crate::netns::{run_checked, Netns};
use crate::prereq::Tool;
use crate::process::Process;
use crate::wait;

/// How long a daemon gets to create its interface and UAPI socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A WireGuard key pair, base64 as `wg` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keypair {
    /// The private key.
    pub private: String,
    /// The public key derived from it.
    pub public: String,
}

impl Keypair {
    /// A fresh key pair from `wg genkey` and `wg pubkey`.
    pub fn generate() -> Result<Keypair> {
        let private = run_checked(Command::new("wg").arg("genkey"))?
            .trim()
            .to_owned();
        let public = wg_pubkey(&private)?;
        Ok(Keypair { private, public })
    }
}

/// A fresh preshared key from `wg genpsk`.
pub fn generate_psk() -> Result<String> {
    Ok(run_checked(Command::new("wg").arg("genpsk"))?
        .trim()
        .to_owned())
}

fn wg_pubkey(private: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running wg pubkey")?;
    child
        .stdin
        .take()
        .context("wg pubkey stdin")?
        .write_all(format!("{private}\n").as_bytes())
        .context("writing to wg pubkey")?;
    let output = child.wait_with_output().context("waiting for wg pubkey")?;
    ensure!(
        output.status.success(),
        "wg pubkey failed: {}",
        output.status
    );
    Ok(String::from_utf8(output.stdout)
        .context("wg pubkey printed non-UTF-8")?
        .trim()
        .to_owned())
}

/// Which I/O driver our data plane uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring (`--driver uring`).
    Uring,
    /// epoll via mio (`--driver epoll`).
    Epoll,
}

impl Driver {
    /// The `--driver` argument value.
    pub fn as_arg(self) -> &'static str {
        match self {
            Driver::Uring => "uring",
            Driver::Epoll => "epoll",
        }
    }
}

/// Options for our data plane; `None` leaves the binary's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OursOptions {
    /// `--driver`.
    pub driver: Option<Driver>,
    /// `--offloads on|off`.
    pub offloads: Option<bool>,
    /// `--threads`.
    pub threads: Option<u32>,
    /// `--pin cores` (true) or `--pin none` (false).
    pub pin: Option<bool>,
    /// The binary; found with [`crate::bins::tabbify_mesh`] when `None`.
    pub binary: Option<PathBuf>,
}

/// A WireGuard implementation a [`WgPeer`] can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Implementation {
    /// Ours: `tabbify-mesh up`.
    Ours(OursOptions),
    /// Debian's `wireguard-go`.
    WireguardGo,
    /// wireguard-go v0.0.20250522, the version with TUN TSO/GRO and UDP GSO/GRO (the
    /// engine inside Tailscale); it turns its offloads on by itself when the kernel offers
    /// them.
    WireguardGoOffload {
        /// The binary; `wireguard-go-offload` on `PATH` when `None`.
        binary: Option<PathBuf>,
    },
    /// `boringtun-cli` 0.7.1, with `--threads` when given.
    Boringtun {
        /// `--threads`; its default (4) when `None`.
        threads: Option<u32>,
    },
    /// `gotatun` from `gotatun-cli` 0.10.2 (Mullvad's boringtun fork). It has no thread
    /// option: its tokio runtime starts one worker per CPU.
    Gotatun,
}

impl Implementation {
    /// Ours with the given driver and offloads, default threads.
    pub fn ours(driver: Driver, offloads: bool) -> Implementation {
        Implementation::Ours(OursOptions {
            driver: Some(driver),
            offloads: Some(offloads),
            ..OursOptions::default()
        })
    }

    /// A short human-readable name, e.g. `ours(uring, offloads on)`.
    pub fn label(&self) -> String {
        match self {
            Implementation::Ours(options) => {
                let mut parts = Vec::new();
                if let Some(driver) = options.driver {
                    parts.push(driver.as_arg().to_owned());
                }
                if let Some(offloads) = options.offloads {
                    parts.push(format!("offloads {}", if offloads { "on" } else { "off" }));
                }
                if let Some(threads) = options.threads {
                    parts.push(format!("{threads} threads"));
                }
                if let Some(pin) = options.pin {
                    parts.push(if pin { "pinned" } else { "unpinned" }.to_owned());
                }
                format!("ours({})", parts.join(", "))
            }
            Implementation::WireguardGo => "wireguard-go".to_owned(),
            Implementation::WireguardGoOffload { .. } => {
                "wireguard-go v0.0.20250522 (offloads)".to_owned()
            }
            Implementation::Boringtun { threads: None } => "boringtun-cli".to_owned(),
            Implementation::Boringtun { threads: Some(n) } => {
                format!("boringtun-cli --threads {n}")
            }
            Implementation::Gotatun => "gotatun-cli 0.10.2".to_owned(),
        }
    }

    /// The external tools needed to run and configure it.
    pub fn tools(&self) -> Vec<Tool> {
        match self {
            Implementation::Ours(_) => vec![Tool::Iproute2, Tool::Wg],
            Implementation::WireguardGo => vec![Tool::Iproute2, Tool::Wg, Tool::WireguardGo],
            Implementation::WireguardGoOffload { binary: None } => {
                vec![Tool::Iproute2, Tool::Wg, Tool::WireguardGoOffload]
            }
            Implementation::WireguardGoOffload { binary: Some(_) } => {
                vec![Tool::Iproute2, Tool::Wg]
            }
            Implementation::Boringtun { .. } => vec![Tool::Iproute2, Tool::Wg, Tool::BoringtunCli],
            Implementation::Gotatun => vec![Tool::Iproute2, Tool::Wg, Tool::GotatunCli],
        }
    }

    fn is_ours(&self) -> bool {
        matches!(self, Implementation::Ours(_))
    }
}

/// The `[Interface]` part of a configuration.
#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    /// The interface's key pair.
    pub keypair: Keypair,
    /// UDP listen port.
    pub listen_port: u16,
    /// Inner addresses in CIDR form (`10.9.0.1/24`, `fd5a:1f00:1:2:3::1/128`).
    pub addresses: Vec<String>,
    /// Tunnel MTU.
    pub mtu: u16,
}

/// One `[Peer]` section.
#[derive(Debug, Clone, Default)]
pub struct WgPeerConfig {
    /// The peer's public key.
    pub public_key: String,
    /// Optional preshared key.
    pub preshared_key: Option<String>,
    /// AllowedIPs in CIDR form; each also gets a route on the interface.
    pub allowed_ips: Vec<String>,
    /// Where to send the first handshake.
    pub endpoint: Option<SocketAddr>,
    /// PersistentKeepalive in seconds.
    pub persistent_keepalive: Option<u16>,
    /// Port rules for this peer (ours only: `AllowedPortsOut` / `AllowedPortsIn`).
    pub ports: PortRules,
}

/// A peer's `AllowedPortsOut` / `AllowedPortsIn` values as written in the file (ours only;
/// a stock implementation given rules refuses to start). Both `None`: no filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRules {
    /// `AllowedPortsOut`: ports on the peer we may open, e.g. `tcp:5201, udp:5201`.
    pub outbound: Option<String>,
    /// `AllowedPortsIn`: ports on us the peer may open.
    pub inbound: Option<String>,
}

impl PortRules {
    /// Whether any rule is set.
    pub fn is_set(&self) -> bool {
        self.outbound.is_some() || self.inbound.is_some()
    }
}

/// A running WireGuard endpoint inside a namespace.
pub struct WgPeer {
    implementation: Implementation,
    ifname: String,
    public_key: String,
    process: Process,
}

impl WgPeer {
    /// Starts `implementation` in `netns` with the given configuration and waits until
    /// its interface is up and answers `wg show`.
    pub fn start(
        netns: &Netns,
        implementation: &Implementation,
        interface: &InterfaceConfig,
        peers: &[WgPeerConfig],
    ) -> Result<WgPeer> {
        crate::prereq::require(&implementation.tools())?;
        ensure!(
            implementation.is_ours() || !peers.iter().any(|p| p.ports.is_set()),
            "{}: port rules (AllowedPortsOut/In) are a tabbify extension; only ours reads them",
            implementation.label()
        );
        let ifname = fresh_ifname();
        let config_path = netns.workdir().join(format!("{ifname}.conf"));
        let config = render_config(interface, peers, implementation.is_ours());
        std::fs::write(&config_path, &config)
            .with_context(|| format!("writing {}", config_path.display()))?;

        let label = format!(
            "{}-{ifname}",
            implementation.label().replace([' ', ',', '(', ')'], "")
        );
        let mut process = match implementation {
            Implementation::Ours(options) => {
                let binary = match &options.binary {
                    Some(path) => path.clone(),
                    None => crate::bins::tabbify_mesh()?,
                };
                let mut command = netns.command(&binary);
                command
                    .args(["up", "--config"])
                    .arg(&config_path)
                    .args(["--interface", &ifname]);
                if let Some(threads) = options.threads {
                    command.args(["--threads", &threads.to_string()]);
                }
                if let Some(driver) = options.driver {
                    command.args(["--driver", driver.as_arg()]);
                }
                if let Some(offloads) = options.offloads {
                    command.args(["--offloads", if offloads { "on" } else { "off" }]);
                }
                if let Some(pin) = options.pin {
                    command.args(["--pin", if pin { "cores" } else { "none" }]);
                }
                Process::spawn(netns.clone(), &label, command)?
            }
            Implementation::WireguardGo => {
                let mut command = netns.command("wireguard-go");
                command.args(["-f", &ifname]);
                Process::spawn(netns.clone(), &label, command)?
            }
            Implementation::WireguardGoOffload { binary } => {
                let mut command = netns.command(
                    binary
                        .as_deref()
                        .unwrap_or(Path::new("wireguard-go-offload")),
                );
                command.args(["-f", &ifname]);
                Process::spawn(netns.clone(), &label, command)?
            }
            Implementation::Gotatun => {
                let mut command = netns.command("gotatun");
                command.args(["--foreground", "--disable-drop-privileges", &ifname]);
                Process::spawn(netns.clone(), &label, command)?
            }
            Implementation::Boringtun { threads } => {
                let mut command = netns.command("boringtun-cli");
                command.args(["--foreground", "--disable-drop-privileges"]);
                if let Some(threads) = threads {
                    command.args(["--threads", &threads.to_string()]);
                }
                command.arg(&ifname);
                Process::spawn(netns.clone(), &label, command)?
            }
        };

        let socket = uapi_socket(&ifname);
        wait::until(
            &format!("{label} to create {ifname} and {}", socket.display()),
            START_TIMEOUT,
            || {
                process.ensure_running().map_err(wait::fatal)?;
                Ok((netns.has_link(&ifname) && socket.exists()).then_some(()))
            },
        )?;

        let peer = WgPeer {
            implementation: implementation.clone(),
            ifname,
            public_key: interface.keypair.public.clone(),
            process,
        };
        if !peer.implementation.is_ours() {
            peer.configure_stock(&config_path, interface, peers)
                .with_context(|| format!("configuring {label}; log:\n{}", peer.process.logs()))?;
        }
        // Ours configures itself; either way the result must be visible through UAPI.
        let dump = wait::until(
            &format!("{label} to answer wg show"),
            START_TIMEOUT,
            || match peer.dump() {
                Ok(dump) if dump.peers.len() == peers.len() => Ok(Some(dump)),
                Ok(dump) => bail!(
                    "wg show lists {} peers, want {}",
                    dump.peers.len(),
                    peers.len()
                ),
                Err(error) => Err(error),
            },
        )
        .with_context(|| format!("log of {label}:\n{}", peer.process.logs()))?;
        // boringtun-cli 0.7.1 (and perhaps its fork gotatun) answers UAPI `get` with
        // `own_public_key=` instead of `private_key=`, which `wg` does not parse: it shows
        // "(none)".
        let key_hidden = matches!(
            implementation,
            Implementation::Boringtun { .. } | Implementation::Gotatun
        ) && dump.public_key == "(none)";
        ensure!(
            key_hidden || dump.public_key == interface.keypair.public,
            "{label}: wg show reports public key {}, configured {}",
            dump.public_key,
            interface.keypair.public
        );
        wait::until_true(&format!("{} to be up", peer.ifname), START_TIMEOUT, || {
            peer.netns()
                .ip(&["-o", "link", "show", "dev", &peer.ifname])
                .map(|line| link_flags(&line).any(|flag| flag == "UP"))
                .unwrap_or(false)
        })?;
        Ok(peer)
    }

    fn configure_stock(
        &self,
        config_path: &Path,
        interface: &InterfaceConfig,
        peers: &[WgPeerConfig],
    ) -> Result<()> {
        let netns = self.netns();
        let config = config_path.to_str().context("non-UTF-8 config path")?;
        netns.run("wg", &["setconf", &self.ifname, config])?;
        for address in &interface.addresses {
            let mut args = vec!["addr", "add", address.as_str(), "dev", &self.ifname];
            if address.contains(':') {
                args.push("nodad");
            }
            netns.ip(&args)?;
        }
        netns.ip(&[
            "link",
            "set",
            "dev",
            &self.ifname,
            "mtu",
            &interface.mtu.to_string(),
            "up",
        ])?;
        for peer in peers {
            for allowed in &peer.allowed_ips {
                netns.ip(&["route", "replace", allowed, "dev", &self.ifname])?;
            }
        }
        Ok(())
    }

    /// The implementation running this endpoint.
    pub fn implementation(&self) -> &Implementation {
        &self.implementation
    }

    /// The interface name (also the UAPI socket name).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// This endpoint's public key.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &Netns {
        self.process.netns()
    }

    /// The daemon process.
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// The daemon's log so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// The output of `wg show IFNAME`.
    pub fn show(&self) -> Result<String> {
        self.netns().run("wg", &["show", &self.ifname])
    }

    /// `wg show IFNAME dump`, parsed.
    pub fn dump(&self) -> Result<WgDump> {
        WgDump::parse(&self.netns().run("wg", &["show", &self.ifname, "dump"])?)
    }

    /// Runs `wg set IFNAME args…` (add or remove peers at run time).
    pub fn set(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["set", self.ifname.as_str()];
        full.extend_from_slice(args);
        self.netns().run("wg", &full).map(drop)
    }

    /// Waits until `wg show` reports a completed handshake with `peer_public_key`.
    pub fn wait_handshake(&self, peer_public_key: &str, timeout: Duration) -> Result<WgPeerStatus> {
        wait::until(
            &format!(
                "{} to complete a handshake with {peer_public_key}",
                self.ifname
            ),
            timeout,
            || {
                let dump = self.dump()?;
                let peer = dump
                    .peer(peer_public_key)
                    .with_context(|| format!("peer {peer_public_key} not listed"))?;
                Ok((peer.latest_handshake > 0).then(|| peer.clone()))
            },
        )
    }

    /// User plus system CPU time the daemon has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        self.process.cpu_time()
    }

    /// Fails, with the log, if the daemon has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.process.ensure_running()
    }

    /// [`WgPeer::stop`] that also returns the daemon's whole log (ours logs its drop
    /// counters on the way out).
    pub fn stop_with_logs(self) -> Result<(ExitStatus, String)> {
        // The log file lives in the namespace's work directory, which outlives the daemon.
        let path = self.process.log_path().to_owned();
        let status = self.stop()?;
        let logs = std::fs::read(&path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .with_context(|| format!("reading {}", path.display()))?;
        Ok((status, logs))
    }

    /// Sends SIGTERM and waits for the exit. For ours this also checks the contract of
    /// `tabbify-mesh up`: exit status 0, the interface and its UAPI socket gone.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let label = self.process.label().to_owned();
        let status = self.process.stop(Duration::from_secs(10))?;
        if self.implementation.is_ours() {
            ensure!(
                status.success(),
                "{label} exited with {status} after SIGTERM; log:\n{}",
                self.process.logs()
            );
            let netns = self.netns().clone();
            wait::until_true(
                &format!("{} to disappear", self.ifname),
                Duration::from_secs(5),
                || !netns.has_link(&self.ifname),
            )?;
            let socket = uapi_socket(&self.ifname);
            ensure!(!socket.exists(), "{label} left {} behind", socket.display());
        }
        Ok(status)
    }
}

/// The flags of an `ip -o link show` line (`<POINTOPOINT,NOARP,UP,LOWER_UP>`).
fn link_flags(line: &str) -> impl Iterator<Item = &str> {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map_or("", |(flags, _)| flags)
        .split(',')
}

/// The UAPI socket path of interface `ifname`.
pub fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

/// A random interface name whose UAPI socket does not exist yet.
fn fresh_ifname() -> String {
    let mut rng = rand::thread_rng();
    loop {
        let name = format!("tw{:08x}", rng.gen::<u32>());
        if !uapi_socket(&name).exists() {
            return name;
        }
    }
}

/// The configuration file: wg-quick format for ours (with Address and MTU), `wg setconf`
/// format for the stock daemons (without them).
fn render_config(interface: &InterfaceConfig, peers: &[WgPeerConfig], wg_quick: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "[Interface]");
    let _ = writeln!(out, "PrivateKey = {}", interface.keypair.private);
    let _ = writeln!(out, "ListenPort = {}", interface.listen_port);
    if wg_quick {
        if !interface.addresses.is_empty() {
            let _ = writeln!(out, "Address = {}", interface.addresses.join(", "));
        }
        let _ = writeln!(out, "MTU = {}", interface.mtu);
    }
    for peer in peers {
        let _ = writeln!(out, "\n[Peer]");
        let _ = writeln!(out, "PublicKey = {}", peer.public_key);
        if let Some(psk) = &peer.preshared_key {
            let _ = writeln!(out, "PresharedKey = {psk}");
        }
        if !peer.allowed_ips.is_empty() {
            let _ = writeln!(out, "AllowedIPs = {}", peer.allowed_ips.join(", "));
        }
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "Endpoint = {endpoint}");
        }
        if let Some(keepalive) = peer.persistent_keepalive {
            let _ = writeln!(out, "PersistentKeepalive = {keepalive}");
        }
        if wg_quick {
            if let Some(rules) = &peer.ports.outbound {
                let _ = writeln!(out, "AllowedPortsOut = {rules}");
            }
            if let Some(rules) = &peer.ports.inbound {
                let _ = writeln!(out, "AllowedPortsIn = {rules}");
            }
        }
    }
    out
}

/// `wg show IFNAME dump`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDump {
    /// The interface's public key.
    pub public_key: String,
    /// The listen port.
    pub listen_port: u16,
    /// One entry per peer.
    pub peers: Vec<WgPeerStatus>,
}

/// One peer line of `wg show dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeerStatus {
    /// Its public key.
    pub public_key: String,
    /// Its current endpoint, if known.
    pub endpoint: Option<String>,
    /// Its AllowedIPs.
    pub allowed_ips: Vec<String>,
    /// Unix time of the latest handshake; 0 if none yet.
    pub latest_handshake: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// Persistent keepalive interval, if set.
    pub persistent_keepalive: Option<u16>,
}

impl WgDump {
    /// Parses the tab-separated output of `wg show IFNAME dump`.
    pub fn parse(text: &str) -> Result<WgDump> {
        let mut lines = text.lines().filter(|line| !line.trim().is_empty());
        let head: Vec<&str> = lines
            .next()
            .context("empty wg show dump")?
            .split('\t')
            .collect();
        ensure!(
            head.len() == 4,
            "wg show dump interface line has {} fields: {head:?}",
            head.len()
        );
        let mut peers = Vec::new();
        for line in lines {
            let f: Vec<&str> = line.split('\t').collect();
            ensure!(
                f.len() == 8,
                "wg show dump peer line has {} fields: {line:?}",
                f.len()
            );
            let none = |s: &str| (s != "(none)" && s != "off").then(|| s.to_owned());
            peers.push(WgPeerStatus {
                public_key: f[0].to_owned(),
                endpoint: none(f[2]),
                allowed_ips: none(f[3])
                    .map(|ips| ips.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                latest_handshake: f[4]
                    .parse()
                    .with_context(|| format!("latest-handshake {:?}", f[4]))?,
                rx_bytes: f[5]
                    .parse()
                    .with_context(|| format!("transfer-rx {:?}", f[5]))?,
                tx_bytes: f[6]
                    .parse()
                    .with_context(|| format!("transfer-tx {:?}", f[6]))?,
                persistent_keepalive: none(f[7])
                    .map(|k| k.parse())
                    .transpose()
                    .with_context(|| format!("persistent-keepalive {:?}", f[7]))?,
            });
        }
        Ok(WgDump {
            public_key: head[1].to_owned(),
            listen_port: head[2]
                .parse()
                .with_context(|| format!("listen-port {:?}", head[2]))?,
            peers,
        })
    }

    /// The peer with this public key.
    pub fn peer(&self, public_key: &str) -> Option<&WgPeerStatus> {
        self.peers.iter().find(|peer| peer.public_key == public_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_dump() {
        let text = "cPriv=\tPub1=\t51820\toff\n\
                    Pub2=\t(none)\t10.0.0.2:51821\t10.9.0.2/32,fd5a::2/128\t1700000000\t1234\t5678\t25\n\
                    Pub3=\tPsk=\t(none)\t(none)\t0\t0\t0\toff\n";
        let dump = WgDump::parse(text).unwrap();
        assert_eq!(dump.public_key, "Pub1=");
        assert_eq!(dump.listen_port, 51820);
        assert_eq!(dump.peers.len(), 2);
        let p = dump.peer("Pub2=").unwrap();
        assert_eq!(p.endpoint.as_deref(), Some("10.0.0.2:51821"));
        assert_eq!(p.allowed_ips, ["10.9.0.2/32", "fd5a::2/128"]);
        assert_eq!(
            (p.latest_handshake, p.rx_bytes, p.tx_bytes),
            (1_700_000_000, 1234, 5678)
        );
        assert_eq!(p.persistent_keepalive, Some(25));
        let q = dump.peer("Pub3=").unwrap();
        assert_eq!(
            (
                q.endpoint.clone(),
                q.allowed_ips.len(),
                q.persistent_keepalive
            ),
            (None, 0, None)
        );
    }

    #[test]
    fn reads_link_flags() {
        let line = "5: tw1: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 1420 qdisc fq_codel";
        assert!(link_flags(line).any(|f| f == "UP"));
        let down = "5: tw1: <POINTOPOINT,MULTICAST,NOARP,LOWER_UP> mtu 1420";
        assert!(!link_flags(down).any(|f| f == "UP"));
    }

    #[test]
    fn rejects_malformed_dumps() {
        assert!(WgDump::parse("").is_err());
        assert!(WgDump::parse("a\tb\n").is_err());
        assert!(WgDump::parse("a\tb\t1\toff\nshort\tline\n").is_err());
        assert!(WgDump::parse("a\tb\t1\toff\np\t(none)\t(none)\t(none)\tx\t0\t0\toff\n").is_err());
    }

    #[test]
    fn renders_wg_quick_and_setconf_formats() {
        let interface = InterfaceConfig {
            keypair: Keypair {
                private: "priv".into(),
                public: "pub".into(),
            },
            listen_port: 51820,
            addresses: vec!["10.9.0.1/24".into(), "fd5a:1f00:1:2:3::1/128".into()],
            mtu: 1420,
        };
        let peers = [WgPeerConfig {
            public_key: "peer".into(),
            preshared_key: Some("psk".into()),
            allowed_ips: vec!["10.9.0.2/32".into()],
            endpoint: Some("[fd77::2]:51821".parse().unwrap()),
            persistent_keepalive: Some(25),
            ports: PortRules {
                outbound: Some("tcp:8730".into()),
                inbound: None,
            },
        }];
        let quick = render_config(&interface, &peers, true);
        assert!(quick.contains("Address = 10.9.0.1/24, fd5a:1f00:1:2:3::1/128\n"));
        assert!(quick.contains("MTU = 1420\n"));
        assert!(quick.contains("Endpoint = [fd77::2]:51821\n"));
        assert!(quick.contains("PresharedKey = psk\n"));
        let setconf = render_config(&interface, &peers, false);
        assert!(!setconf.contains("Address") && !setconf.contains("MTU"));
        assert!(setconf.contains("PersistentKeepalive = 25\n"));
        assert!(quick.contains("AllowedPortsOut = tcp:8730\n"));
        assert!(!quick.contains("AllowedPortsIn"));
        assert!(
            !setconf.contains("AllowedPorts"),
            "stock daemons do not read it"
        );
    }
}
