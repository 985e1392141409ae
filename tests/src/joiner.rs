//! `tabbify-mesh join` as a process inside a namespace, and the local commands that talk to
//! it (`status --json`, `peers --json`, `app add|remove`), run in the same namespace.
//!
//! Several joiners share this machine, one per namespace, so each gets its own interface
//! name (`tm` + 8 random hex digits: the UAPI socket `/var/run/wireguard/<if>.sock` and the
//! control socket `/run/tabbify-mesh/<if>.sock` are not namespaced) and its own state
//! directory inside its namespace's work directory. Local commands find the joiner by
//! `--interface`, i.e. through the default control socket path.
//!
//! Invariants: [`Joiner::start`] returns once the joiner reports `registered: true`, or
//! fails with its log ([`Joiner::spawn`] does not wait); every wait polls `status --json` until a condition holds or a
//! deadline passes, and the error then carries the last status seen.

use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::Rng;

use crate::netns::Netns;
use crate::pki::{path_str, Issued};
use crate::process::Process;
use crate::status::{PeerStatus, Status};
use crate::wait;
use crate::wg::Driver;

/// How long a joiner gets to register after it starts.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an exited joiner's interface and control socket may take to disappear.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run a joiner.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    /// `--name`.
    pub name: String,
    /// `--tag` values.
    pub tags: Vec<String>,
    /// The join token (passed with `--join-token-file`); `None` for a key admitted before.
    pub join_token: Option<String>,
    /// `--driver`; the joiner's default when `None`.
    pub driver: Option<Driver>,
    /// `--threads`; the joiner's default when `None`.
    pub threads: Option<u32>,
    /// `--listen-port`.
    pub listen_port: u16,
    /// `--stun HOST:PORT` servers besides the coordinator's.
    pub stun: Vec<String>,
    /// `--relay URL` relays besides the coordinator's (issue 13).
    pub relays: Vec<String>,
    /// `--force-relay`: every peer over the relay.
    pub force_relay: bool,
    /// `--dns MODE` (issue 15). `None` runs `--dns off`: a joiner may touch a resolver
    /// configuration only in a namespace given its own (`Netns::private_resolv_conf`),
    /// never this machine's `/etc/resolv.conf`.
    pub dns: Option<String>,
    /// `--dns-domain DOMAIN`.
    pub dns_domain: Option<String>,
    /// More `--coordinator` URLs, tried after the one the joiner is started with (issue 14).
    pub more_coordinators: Vec<String>,
    /// `--ephemeral` (issue 14).
    pub ephemeral: bool,
    /// More `join` arguments, appended as given (e.g. `--metrics-bind off`).
    pub extra_args: Vec<String>,
    /// Environment variables set for the joiner (e.g. a `PATH` without a tool).
    pub env: Vec<(String, String)>,
}

impl JoinSpec {
    /// A spec with the default driver and threads on port 51820.
    pub fn new(name: &str, tags: &[&str], join_token: Option<String>) -> JoinSpec {
        JoinSpec {
            name: name.to_owned(),
            tags: tags.iter().map(|&tag| tag.to_owned()).collect(),
            join_token,
            driver: None,
            threads: None,
            listen_port: 51820,
            stun: Vec::new(),
            relays: Vec::new(),
            force_relay: false,
            dns: None,
            dns_domain: None,
            more_coordinators: Vec::new(),
            ephemeral: false,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running joiner.
pub struct Joiner {
    spec: JoinSpec,
    ifname: String,
    state_dir: PathBuf,
    binary: PathBuf,
    process: Process,
}

impl Joiner {
    /// Starts `tabbify-mesh join` in `netns` against `coordinator_url` with the client
    /// certificate `cert`, and waits until it reports `registered: true`.
    pub fn start(
        netns: &Netns,
        coordinator_url: &str,
        cert: &Issued,
        spec: JoinSpec,
    ) -> Result<Joiner> {
        let mut joiner = Joiner::spawn(netns, coordinator_url, cert, spec)?;
        joiner
            .wait_status("to register", REGISTER_TIMEOUT, |status| status.registered)
            .with_context(|| format!("starting joiner {}", joiner.spec.name))?;
        Ok(joiner)
    }

    /// Starts `tabbify-mesh join` like [`Joiner::start`] without waiting for anything.
    /// The state directory is `<namespace work dir>/state-<name>`, so a joiner started
    /// again under the same name in the same namespace finds its node key.
    pub fn spawn(
        netns: &Netns,
        coordinator_url: &str,
        cert: &Issued,
        spec: JoinSpec,
    ) -> Result<Joiner> {
        let binary = crate::bins::tabbify_mesh()?;
        let ifname = format!("tm{:08x}", rand::thread_rng().gen::<u32>());
        let state_dir = netns.workdir().join(format!("state-{}", spec.name));
        let mut command = netns.command(&binary);
        command
            .args(["join", "--name", &spec.name])
            .args(["--coordinator", coordinator_url])
            .args(["--tls-cert", path_str(&cert.cert)?])
            .args(["--tls-key", path_str(&cert.key)?])
            .args(["--tls-ca", path_str(&cert.ca)?])
            .args(["--interface", &ifname])
            .args(["--listen-port", &spec.listen_port.to_string()])
            .args(["--state-dir", path_str(&state_dir)?]);
        for tag in &spec.tags {
            command.args(["--tag", tag]);
        }
        if let Some(token) = &spec.join_token {
            // In a file, as the README advises: a token on argv shows in `ps`.
            let token_file = netns
                .workdir()
                .join(format!("token-{}-{ifname}", spec.name));
            std::fs::write(&token_file, format!("{token}\n"))
                .with_context(|| format!("writing {}", token_file.display()))?;
            command.args(["--join-token-file", path_str(&token_file)?]);
        }
        if let Some(driver) = spec.driver {
            command.args(["--driver", driver.as_arg()]);
        }
        if let Some(threads) = spec.threads {
            command.args(["--threads", &threads.to_string()]);
        }
        for server in &spec.stun {
            command.args(["--stun", server]);
        }
        for relay in &spec.relays {
            command.args(["--relay", relay]);
        }
        if spec.force_relay {
            command.arg("--force-relay");
        }
        match spec.dns.as_deref() {
            None | Some("off") => {
                command.args(["--dns", "off"]);
            }
            Some(mode) => {
                ensure!(
                    netns.has_private_resolv_conf(),
                    "--dns {mode} in namespace {} without a resolv.conf of its own would edit \
                     this machine's /etc/resolv.conf: call Netns::private_resolv_conf first",
                    netns.name()
                );
                command.args(["--dns", mode]);
            }
        }
        if let Some(domain) = &spec.dns_domain {
            command.args(["--dns-domain", domain]);
        }
        for url in &spec.more_coordinators {
            command.args(["--coordinator", url]);
        }
        if spec.ephemeral {
            command.arg("--ephemeral");
        }
        command.args(&spec.extra_args);
        command.envs(spec.env.iter().map(|(k, v)| (k, v)));
        // The token and coordinator come from flags only: nothing inherited may override.
        command
            .env_remove("MESH_JOIN_TOKEN")
            .env_remove("TABBIFY_MESH_COORDINATOR");
        let process = Process::spawn(
            netns.clone(),
            &format!("join-{}-{ifname}", spec.name),
            command,
        )?;
        Ok(Joiner {
            spec,
            ifname,
            state_dir,
            binary,
            process,
        })
    }

    /// The display name asked for.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The TUN interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &Netns {
        self.process.netns()
    }

    /// The state directory (`--state-dir`).
    pub fn state_dir(&self) -> &PathBuf {
        &self.state_dir
    }

    /// The joiner process.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// The joiner's log so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// Runs `tabbify-mesh ARGS… --interface IF` in the joiner's namespace; returns stdout.
    pub fn local_command(&self, args: &[&str]) -> Result<String> {
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--interface", &self.ifname]);
        self.netns()
            .run(path_str(&self.binary)?, &full)
            .with_context(|| format!("tabbify-mesh {} ({})", args.join(" "), self.spec.name))
    }

    /// `tabbify-mesh status --json`.
    pub fn status(&self) -> Result<Status> {
        let text = self.local_command(&["status", "--json"])?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing `status --json` of {}: {text}", self.spec.name))
    }

    /// `tabbify-mesh peers --json`.
    pub fn peers(&self) -> Result<Vec<PeerStatus>> {
        let text = self.local_command(&["peers", "--json"])?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing `peers --json` of {}: {text}", self.spec.name))
    }

    /// `tabbify-mesh peers --json` as plain JSON, for fields newer than [`PeerStatus`]
    /// (`path`, `relay`, `reason`).
    pub fn peers_json(&self) -> Result<Vec<serde_json::Value>> {
        let text = self.local_command(&["peers", "--json"])?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing `peers --json` of {}: {text}", self.spec.name))
    }

    /// `tabbify-mesh app add UUID`; returns the app ULA it prints.
    pub fn app_add(&self, app: &uuid::Uuid) -> Result<Ipv6Addr> {
        let text = self.local_command(&["app", "add", &app.to_string()])?;
        text.split_whitespace()
            .find_map(|word| word.parse::<Ipv6Addr>().ok())
            .with_context(|| format!("`app add {app}` printed no address: {text:?}"))
    }

    /// `tabbify-mesh app remove UUID`.
    pub fn app_remove(&self, app: &uuid::Uuid) -> Result<()> {
        self.local_command(&["app", "remove", &app.to_string()])
            .map(drop)
    }

    /// Polls `status --json` until `condition` holds, for at most `timeout`; returns that
    /// status. Fails at once if the joiner exits; on timeout the error shows the last status
    /// seen (or the last error getting it).
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&Status) -> bool,
    ) -> Result<Status> {
        let label = format!("{} {what}", self.spec.name);
        let result = wait::until(&label, timeout, || {
            self.process.ensure_running().map_err(wait::fatal)?;
            let status = self.status()?;
            if condition(&status) {
                Ok(Some(status))
            } else {
                Err(anyhow!("last status: {}", status.summary()))
            }
        });
        result.with_context(|| format!("log of {}:\n{}", self.spec.name, tail(&self.logs())))
    }

    /// Waits until the visible peers are exactly `names` (any order).
    pub fn wait_peer_names(&mut self, names: &[&str], timeout: Duration) -> Result<Status> {
        let mut want: Vec<String> = names.iter().map(|&name| name.to_owned()).collect();
        want.sort();
        self.wait_status(&format!("to see exactly {want:?}"), timeout, |status| {
            status.peer_names() == want
        })
    }

    /// Polls `peers --json` until the peer named `name` is listed and `condition` holds
    /// for it, for at most `timeout`; returns that entry. Fails at once if the joiner
    /// exits; on timeout the error shows the last list seen.
    pub fn wait_peer(
        &mut self,
        name: &str,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&PeerStatus) -> bool,
    ) -> Result<PeerStatus> {
        let label = format!("{}: peer {name} {what}", self.spec.name);
        let result = wait::until(&label, timeout, || {
            self.process.ensure_running().map_err(wait::fatal)?;
            let peers = self.peers()?;
            match peers.iter().find(|peer| peer.name == name) {
                Some(peer) if condition(peer) => Ok(Some(peer.clone())),
                _ => Err(anyhow!("last `peers --json`: {peers:?}")),
            }
        });
        result.with_context(|| format!("log of {}:\n{}", self.spec.name, tail(&self.logs())))
    }

    /// SIGTERM, then checks the contract: exit status 0, the interface and the control
    /// socket removed.
    pub fn stop(mut self) -> Result<()> {
        let status = self.process.stop(Duration::from_secs(10))?;
        ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM; log:\n{}",
            self.spec.name,
            tail(&self.logs())
        );
        self.check_cleaned_up()
    }

    /// Waits up to `timeout` for the joiner to exit by itself with a non-zero status and a
    /// log mentioning `reason` (a permanent refusal), then checks that it removed its
    /// interface and control socket.
    pub fn expect_refused_exit(&mut self, reason: &str, timeout: Duration) -> Result<()> {
        let status = self
            .process
            .wait_exit(timeout)
            .with_context(|| format!("log of {}:\n{}", self.spec.name, tail(&self.logs())))?;
        ensure!(
            !status.success(),
            "{} exited with {status}, want a failure",
            self.spec.name
        );
        let log = self.logs();
        ensure!(
            log.contains(reason),
            "{} exited ({status}) without saying {reason:?}:\n{}",
            self.spec.name,
            tail(&log)
        );
        self.check_cleaned_up()
    }

    /// The interface and the control socket are gone (after the joiner exited).
    ///
    /// Polled briefly: when a process exits without removing its TUN, the kernel deletes
    /// the device once the last file reference closes, and references held by an io_uring
    /// instance are dropped by the ring's deferred teardown, after the exit is reported.
    fn check_cleaned_up(&self) -> Result<()> {
        let socket = PathBuf::from(format!("/run/tabbify-mesh/{}.sock", self.ifname));
        wait::until(
            &format!("{} to be cleaned up", self.spec.name),
            CLEANUP_TIMEOUT,
            || {
                if self.netns().has_link(&self.ifname) {
                    bail!("interface {} is still there", self.ifname);
                }
                // With private mounts the socket is in the namespace's own /run.
                let there = if self.netns().has_private_mounts() {
                    self.netns()
                        .run("test", &["-e", path_str(&socket)?])
                        .is_ok()
                } else {
                    socket.exists()
                };
                if there {
                    bail!("control socket {} is still there", socket.display());
                }
                Ok(Some(()))
            },
        )
    }
}

/// The last lines of a log, for error messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}
