//! Network namespaces owned by a test.
//!
//! Invariants: a [`Netns`] name is unique on the machine (`tbt-<pid>-<counter>-<random>`,
//! or `tbt-<pid>-<counter>-<label>-<random>` from [`Netns::with_label`]);
//! the namespace exists, with loopback up, for as long as any handle to it lives; when the
//! last handle drops, every process spawned inside it is killed by PID and the namespace is
//! deleted, also while unwinding from a panic. Namespaces left behind by a test process that
//! was killed outright (so never ran its destructors) are swept, by the same rule, the first
//! time a later test process creates a namespace: their owner PID is no longer alive.
//!
//! A namespace may also get private mounts ([`Netns::private_mounts`], see
//! [`crate::mountns`]): from then on every command of the namespace runs in one shared
//! mount namespace (entered with `nsenter`), where host resolver programs run confined.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};

use anyhow::{bail, Context, Result};
use rand::Rng;

use crate::process::Process;

/// Prefix of every namespace this harness creates.
const PREFIX: &str = "tbt-";

/// A network namespace that is deleted when the last clone of its handle drops.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    /// PIDs of live processes spawned inside, killed on drop if still there.
    pids: Mutex<BTreeSet<u32>>,
    /// The process holding the private mount namespace ([`Netns::private_mounts`]).
    mounts: Mutex<Option<std::process::Child>>,
    /// Logs and config files of this namespace's processes.
    workdir: tempfile::TempDir,
}

impl Netns {
    /// Creates a fresh namespace with loopback up.
    pub fn new() -> Result<Netns> {
        Netns::with_label("")
    }

    /// Creates a fresh namespace with loopback up whose name also carries `label` (only
    /// its ASCII letters, digits and `-` are kept, at most 24 of them), so that
    /// `ip netns list` tells which test and role a namespace belongs to.
    pub fn with_label(label: &str) -> Result<Netns> {
        static SWEEP: Once = Once::new();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        SWEEP.call_once(sweep_stale);

        let label: String = label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(24)
            .collect();
        let label = if label.is_empty() {
            String::new()
        } else {
            format!("{label}-")
        };
        let name = format!(
            "{PREFIX}{}-{}-{label}{:06x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::thread_rng().gen_range(0..0x100_0000u32)
        );
        let workdir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .context("creating the namespace's work directory")?;
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let netns = Netns {
            inner: Arc::new(Inner {
                name,
                pids: Mutex::new(BTreeSet::new()),
                mounts: Mutex::new(None),
                workdir,
            }),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A directory for this namespace's logs and config files, removed with it.
    pub fn workdir(&self) -> &Path {
        self.inner.workdir.path()
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`),
    /// or, once the namespace has private mounts, inside those too (`nsenter --target
    /// HOLDER --mount --net program`).
    ///
    /// Both exec the program, so the spawned child's PID is the program's own.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if let Some(holder) = lock(&self.inner.mounts).as_ref().map(|c| c.id()) {
            let mut command = Command::new("nsenter");
            command
                .args(["--target", &holder.to_string(), "--mount", "--net", "--"])
                .arg(program);
            return command;
        }
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.name()]).arg(program);
        command
    }

    /// Gives the namespace private mounts: a fresh `/run`, a copy-on-write `/etc` (its
    /// `resolv.conf` the one of [`Netns::private_resolv_conf`], which must exist), and
    /// `/usr` with the trees in `usr_overlays` laid over it; every later command of the
    /// namespace runs there. See [`crate::mountns`]. Once per namespace.
    pub fn private_mounts(&self, usr_overlays: &[&Path]) -> Result<()> {
        let mut mounts = lock(&self.inner.mounts);
        if mounts.is_some() {
            bail!("namespace {} already has private mounts", self.name());
        }
        let resolv_conf = etc_netns(self.name()).join("resolv.conf");
        if !resolv_conf.is_file() {
            bail!(
                "namespace {}: private mounts need a resolv.conf of its own first \
                 (Netns::private_resolv_conf)",
                self.name()
            );
        }
        let holder = crate::mountns::start_holder(self, &resolv_conf, usr_overlays)?;
        *mounts = Some(holder);
        Ok(())
    }

    /// Whether [`Netns::private_mounts`] gave the namespace private mounts.
    pub fn has_private_mounts(&self) -> bool {
        lock(&self.inner.mounts).is_some()
    }

    /// Runs `program args…` inside the namespace to completion; returns its stdout.
    ///
    /// A non-zero exit is an error carrying the command line, status and stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut command = self.command(program);
        command.args(args);
        run_checked(&mut command).with_context(|| format!("in namespace {}", self.name()))
    }

    /// Runs `ip -n NAME args…`; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new("ip");
        command.args(["-n", self.name()]).args(args);
        run_checked(&mut command)
    }

    /// Whether a network interface called `ifname` exists in the namespace.
    pub fn has_link(&self, ifname: &str) -> bool {
        Command::new("ip")
            .args(["-n", self.name(), "link", "show", "dev", ifname])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    }

    /// Writes `value` to a sysfs or procfs file as seen from inside the namespace
    /// (`ip netns exec` mounts the namespace's own `/sys`).
    pub fn write_sysfs(&self, path: &str, value: &str) -> Result<()> {
        self.run("sh", &["-c", &format!("echo {value} > {path}")])
            .map(drop)
            .with_context(|| format!("writing {value} to {path}"))
    }

    /// Gives the namespace its own `/etc/resolv.conf` holding `content`: `ip netns exec`
    /// bind-mounts `/etc/netns/<name>/resolv.conf` over `/etc/resolv.conf` for every
    /// command it runs, so programs inside read and edit this copy, never the machine's.
    /// Removed with the namespace. Returns the file's path as seen from outside.
    pub fn private_resolv_conf(&self, content: &str) -> Result<std::path::PathBuf> {
        let dir = etc_netns(self.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("resolv.conf");
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Whether [`Netns::private_resolv_conf`] gave the namespace its own resolv.conf.
    pub fn has_private_resolv_conf(&self) -> bool {
        etc_netns(self.name()).join("resolv.conf").is_file()
    }

    /// Starts `program args…` inside the namespace; see [`Process`].
    pub fn spawn(&self, label: &str, program: &str, args: &[&str]) -> Result<Process> {
        let mut command = self.command(program);
        command.args(args);
        Process::spawn(self.clone(), label, command)
    }

    pub(crate) fn track(&self, pid: u32) {
        lock(&self.inner.pids).insert(pid);
    }

    pub(crate) fn untrack(&self, pid: u32) {
        lock(&self.inner.pids).remove(&pid);
    }
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Netns").field(&self.inner.name).finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tracked: Vec<u32> = lock(&self.pids).iter().copied().collect();
        for pid in tracked {
            crate::process::kill(pid, libc::SIGKILL);
        }
        // The holder of the private mounts is our own unreaped child: kill and reap it.
        if let Some(mut holder) = lock(&self.mounts).take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        remove_namespace(&self.name);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Kills every process still inside `name` (all of them started by this harness), then
/// deletes the namespace. Errors are reported on stderr: this runs in destructors.
fn remove_namespace(name: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse::<u32>().ok())
        {
            crate::process::kill(pid, libc::SIGKILL);
        }
    }
    match Command::new("ip").args(["netns", "del", name]).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => eprintln!(
            "harness: deleting namespace {name} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => eprintln!("harness: deleting namespace {name} failed: {error}"),
    }
    // Only our own namespaces' names reach here (they carry PREFIX).
    if name.starts_with(PREFIX) {
        let _ = std::fs::remove_dir_all(etc_netns(name));
    }
}

/// `/etc/netns/<name>`: files `ip netns exec` bind-mounts over `/etc` inside `name`.
fn etc_netns(name: &str) -> std::path::PathBuf {
    Path::new("/etc/netns").join(name)
}

/// Deletes namespaces of this harness whose creating process is gone.
fn sweep_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(owner) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{owner}")).exists() {
            eprintln!("harness: removing stale namespace {name} (owner {owner} is gone)");
            remove_namespace(name);
            remove_stale_workdirs(name);
        }
    }
}

/// Removes the work directories (`<tmp>/<name>-XXXXXX`) of a swept namespace.
fn remove_stale_workdirs(name: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let prefix = format!("{name}-");
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs a command to completion; a non-zero exit is an error with its stderr.
pub(crate) fn run_checked(command: &mut Command) -> Result<String> {
    let output: Output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("{command:?} printed non-UTF-8"))
}
