//! The real `tabbify-mesh-coordinator` as a process inside a namespace, with mTLS, a policy
//! file, one admin identity and a state directory that survives restarts.
//!
//! Invariants: at most one coordinator process per [`Coordinator`] runs at a time; it is
//! killed by its own PID (never by name); the state directory and policy file live in a
//! temporary directory that outlives every restart and is removed with the handle.
//! [`Coordinator::start`] and [`Coordinator::restart`] return only after the process has
//! printed `listening on ADDR`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::pki::{path_str, Pki};
use crate::process::Process;

/// How long a coordinator gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How a [`Coordinator`] is run.
#[derive(Debug, Clone)]
pub struct CoordinatorSpec {
    /// Listen address (an address of the namespace it runs in).
    pub bind: SocketAddr,
    /// The policy document written to the `--policy-file`.
    pub policy: serde_json::Value,
    /// Certificate CN allowed to use the admin routes (`--admin`).
    pub admin: String,
    /// `--heartbeat-secs`.
    pub heartbeat_secs: u64,
    /// `--relay`: run the mesh relay in the coordinator process (on its default
    /// `--relay-bind`, the coordinator's address with port + 2), advertised first.
    pub relay: bool,
    /// `--relay-url`, one per further relay to advertise, in order.
    pub relay_urls: Vec<String>,
}

/// A coordinator process that can be killed and started again on the same state.
pub struct Coordinator {
    netns: Netns,
    spec: CoordinatorSpec,
    args: Vec<String>,
    process: Option<Process>,
    /// Holds `state/` and `policy.json`.
    dir: tempfile::TempDir,
    starts: u32,
}

impl Coordinator {
    /// Writes the policy file and starts the coordinator in `netns` with the coordinator
    /// certificate of `pki`.
    pub fn start(netns: &Netns, pki: &Pki, spec: CoordinatorSpec) -> Result<Coordinator> {
        Self::start_with_database(netns, pki, spec, None)
    }

    /// As [`Coordinator::start`], with the state in the PostgreSQL database `database`
    /// (`--database`; from inside a namespace use
    /// [`crate::postgres::Postgres::socket_url`]: unix sockets cross network namespaces).
    pub fn start_with_database(
        netns: &Netns,
        pki: &Pki,
        spec: CoordinatorSpec,
        database: Option<&str>,
    ) -> Result<Coordinator> {
        let binary = crate::bins::tabbify_mesh_coordinator()?;
        let dir = tempfile::Builder::new()
            .prefix("tbt-coordinator-")
            .tempdir()
            .context("creating the coordinator directory")?;
        let policy_file = dir.path().join("policy.json");
        std::fs::write(&policy_file, serde_json::to_vec_pretty(&spec.policy)?)
            .with_context(|| format!("writing {}", policy_file.display()))?;
        let state_dir = dir.path().join("state");
        let server = pki.coordinator();
        let mut args: Vec<String> = vec![path_str(&binary)?.to_owned()];
        args.extend(
            [
                "--bind",
                &spec.bind.to_string(),
                "--tls-cert",
                path_str(&server.cert)?,
                "--tls-key",
                path_str(&server.key)?,
                "--tls-ca",
                path_str(&pki.ca_cert())?,
                "--policy-file",
                path_str(&policy_file)?,
                "--admin",
                &spec.admin,
                "--state-dir",
                path_str(&state_dir)?,
                "--heartbeat-secs",
                &spec.heartbeat_secs.to_string(),
            ]
            .map(str::to_owned),
        );
        if spec.relay {
            args.push("--relay".to_owned());
        }
        for url in &spec.relay_urls {
            args.extend(["--relay-url".to_owned(), url.clone()]);
        }
        if let Some(url) = database {
            args.extend(["--database".to_owned(), url.to_owned()]);
        }
        let mut coordinator = Coordinator {
            netns: netns.clone(),
            spec,
            args,
            process: None,
            dir,
            starts: 0,
        };
        coordinator.launch()?;
        Ok(coordinator)
    }

    fn launch(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("the coordinator is already running");
        }
        self.starts += 1;
        let (program, args) = self.args.split_first().context("no coordinator binary")?;
        let mut command = self.netns.command(program);
        command.args(args);
        command.env("RUST_LOG", "info");
        let mut process = Process::spawn(
            self.netns.clone(),
            &format!("coordinator-{}", self.starts),
            command,
        )?;
        process
            .wait_for_log(&format!("listening on {}", self.spec.bind), START_TIMEOUT)
            .context("starting the coordinator")?;
        self.process = Some(process);
        Ok(())
    }

    /// `https://ADDR`, the URL joiners are given.
    pub fn url(&self) -> String {
        format!("https://{}", self.spec.bind)
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.spec.bind
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The PID of the running process, if one runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// The policy file (`--policy-file`).
    pub fn policy_file(&self) -> PathBuf {
        self.dir.path().join("policy.json")
    }

    /// Sends `signal` to the running process (SIGHUP: `systemctl reload`).
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        self.process
            .as_mut()
            .context("no coordinator is running")?
            .signal(signal)
    }

    /// The state directory (`--state-dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Kills the running process with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        let mut process = self.process.take().context("no coordinator is running")?;
        process.signal(libc::SIGKILL)?;
        let status = process.wait_exit(Duration::from_secs(10))?;
        if status.code().is_some() {
            bail!("the coordinator exited by itself ({status}) instead of being killed");
        }
        Ok(())
    }

    /// Appends `args` to the command line of the next (re)start.
    pub fn add_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
    }

    /// Starts the coordinator again with the same arguments and state directory.
    pub fn restart(&mut self) -> Result<()> {
        self.launch()
    }

    /// The log of the running process (empty when none runs).
    pub fn logs(&self) -> String {
        self.process.as_ref().map(Process::logs).unwrap_or_default()
    }
}
