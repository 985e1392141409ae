//! Processes spawned inside a namespace, with their output captured to a log file.
//!
//! Invariants: a [`Process`] holds a handle to its namespace, so the namespace outlives
//! it; its PID is registered with the namespace until the child has been reaped, so a
//! PID that gets signalled is always our own unreaped child (never a recycled PID). On
//! drop a still-running process gets SIGTERM, then SIGKILL if it has not exited within
//! [`STOP_GRACE`]; its log is then written to stderr according to [`set_log_dump`]
//! (the test harness captures stderr and shows it only for failing tests).

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::wait;

/// How long a process gets to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Lines of a log shown when it is dumped.
const DUMP_LINES: usize = 200;

/// When process logs are written to stderr as their handles drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDump {
    /// Always (the default: test harnesses show it only for failing tests).
    Always,
    /// Only while the thread is panicking.
    OnPanic,
    /// Never.
    Never,
}

static LOG_DUMP: AtomicU8 = AtomicU8::new(0);

/// Sets when process logs are dumped to stderr, for the whole process.
pub fn set_log_dump(policy: LogDump) {
    let value = match policy {
        LogDump::Always => 0,
        LogDump::OnPanic => 1,
        LogDump::Never => 2,
    };
    LOG_DUMP.store(value, Ordering::Relaxed);
}

fn log_dump() -> LogDump {
    match LOG_DUMP.load(Ordering::Relaxed) {
        0 => LogDump::Always,
        1 => LogDump::OnPanic,
        _ => LogDump::Never,
    }
}

/// A child process running inside a [`Netns`].
pub struct Process {
    label: String,
    child: Child,
    exited: Option<ExitStatus>,
    log_path: PathBuf,
    netns: Netns,
}

impl Process {
    /// Spawns `command` (already wrapped in `ip netns exec`) with stdout and stderr going
    /// to a log file in the namespace's work directory.
    pub fn spawn(netns: Netns, label: &str, mut command: Command) -> Result<Process> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let serial = COUNTER.fetch_add(1, Ordering::Relaxed);
        let log_path = netns.workdir().join(format!("{label}.{serial}.log"));
        let log = File::create(&log_path)
            .with_context(|| format!("creating log file {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("spawning {label}: {command:?}"))?;
        netns.track(child.id());
        Ok(Process {
            label: label.to_owned(),
            child,
            exited: None,
            log_path,
            netns,
        })
    }

    /// The process id (the program's own: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The label given at spawn time.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The log file (stdout and stderr); it stays until the namespace is dropped.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }

    /// Everything the process has written to stdout and stderr so far, without ANSI
    /// colour sequences.
    pub fn logs(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| strip_ansi(&String::from_utf8_lossy(&bytes)))
            .unwrap_or_else(|error| {
                format!("<log {} unreadable: {error}>", self.log_path.display())
            })
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            if let Some(status) = self.child.try_wait().context("polling the child")? {
                self.netns.untrack(self.child.id());
                self.exited = Some(status);
            }
        }
        Ok(self.exited)
    }

    /// Fails (with the log) if the process has already exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.try_exit_status()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited early ({status}); log:\n{}",
                self.label,
                self.logs()
            ),
        }
    }

    /// Sends `signal` if the process has not been reaped yet.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        if self.try_exit_status()?.is_none() {
            kill(self.pid(), signal);
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit by itself; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let label = self.label.clone();
        wait::until(&format!("{label} to exit"), timeout, || {
            self.try_exit_status()
        })
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status. If the process is
    /// still running then, it is killed and this is an error.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        match self.wait_exit(timeout) {
            Ok(status) => Ok(status),
            Err(error) => {
                self.signal(libc::SIGKILL)?;
                let _ = self.wait_exit(STOP_GRACE);
                Err(error.context(format!("{} ignored SIGTERM and was killed", self.label)))
            }
        }
    }

    /// Waits until the log contains `needle` (failing early if the process exits).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let what = format!("{} to log {needle:?}", self.label);
        wait::until(&what, timeout, || {
            if self.logs().contains(needle) {
                return Ok(Some(()));
            }
            self.ensure_running().map_err(wait::fatal)?;
            Ok(None)
        })
    }

    /// User plus system CPU time the process has used so far (all its threads), from
    /// `/proc/PID/stat`.
    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !matches!(self.try_exit_status(), Ok(Some(_))) {
            kill(self.pid(), libc::SIGTERM);
            if self.wait_exit(STOP_GRACE).is_err() {
                kill(self.pid(), libc::SIGKILL);
                let _ = self.child.wait();
                self.netns.untrack(self.child.id());
            }
        }
        let dump = match log_dump() {
            LogDump::Always => true,
            LogDump::OnPanic => std::thread::panicking(),
            LogDump::Never => false,
        };
        if dump {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let tail = &lines[lines.len().saturating_sub(DUMP_LINES)..];
            eprintln!(
                "----- log of {} (pid {}, netns {}, {}; last {} of {} lines) -----\n{}\n----- end of {} -----",
                self.label,
                self.child.id(),
                self.netns.name(),
                self.exited.map_or_else(|| "not reaped".to_owned(), |status| status.to_string()),
                tail.len(),
                lines.len(),
                tail.join("\n"),
                self.label
            );
        }
    }
}

/// `text` without ANSI CSI sequences (`ESC [ … final-byte`), which loggers emit even
/// into files.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Sends `signal` to `pid`, ignoring errors (the process may be gone already).
pub(crate) fn kill(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; callers pass
    // PIDs of children they have not reaped (or processes inside their own namespace).
    unsafe {
        libc::kill(pid, signal);
    }
}

/// User plus system CPU time of `pid` (all threads), from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces: fields after
    // the last ')' start at field 3 (state); utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .context("short /proc/PID/stat")?
            .parse::<u64>()
            .context("non-numeric /proc/PID/stat field")
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(
        total as f64 / clock_ticks_per_second() as f64,
    ))
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colour_codes() {
        let coloured =
            "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m driver\u{1b}[2m=\u{1b}[0mepoll";
        assert_eq!(strip_ansi(coloured), "2026  INFO driver=epoll");
        assert_eq!(strip_ansi("plain [text]"), "plain [text]");
    }

    #[test]
    fn reads_own_cpu_time() {
        // Spin until the kernel has charged at least one clock tick to this process.
        let mut x = 0u64;
        let used = crate::wait::until("CPU time to be charged", Duration::from_secs(60), || {
            for _ in 0..1_000_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            Ok(Some(cpu_time(std::process::id())?).filter(|t| *t > Duration::ZERO))
        })
        .unwrap();
        assert!(used > Duration::ZERO && x > 0);
        assert!(cpu_time(u32::MAX).is_err(), "no such process");
    }
}
