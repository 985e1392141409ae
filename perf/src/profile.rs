//! Profiles of both tunnel daemons during a test: `perf record` with the DWARF unwinder
//! (release builds of ours carry line tables), `perf script`, then the `inferno` crate as
//! a library to collapse the stacks and render one flame graph per implementation and
//! test, `<out>/<run>-<impl>-<test>.svg`.
//!
//! Owns: the `perf record` children (one per daemon, stopped with SIGINT, killed on drop)
//! and their data files (in a scratch directory removed afterwards). Invariants: each
//! stack is rooted at `client` or `server` (which daemon) and then the thread's name, so
//! one SVG shows both ends side by side; a failed profile is an error naming what to
//! install, never a silent empty SVG.

use std::io::{BufReader, BufWriter, Cursor};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use inferno::collapse::perf::{Folder, Options as CollapseOptions};
use inferno::collapse::Collapse;
use inferno::flamegraph::{self, Options as FlameOptions};

/// Options of `tabbify-perf profile`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Implementations to profile (names as for `--only`).
    #[arg(long, value_delimiter = ',', default_value = "ours-uring")]
    pub impls: Vec<String>,
    /// Samples per second per thread.
    #[arg(long, default_value_t = 199)]
    pub freq: u32,
    /// The run's name in the SVG file names (default: the UTC time).
    #[arg(long)]
    pub run: Option<String>,
}

/// The unwinder for a daemon: Go keeps frame pointers (and its frames do not unwind well
/// with DWARF), the Rust daemons are built without them, so DWARF with 16 KiB of user
/// stack per sample (enough for the engine's workers, no deep recursion; a 10 s profile
/// stays in tens of MB).
pub fn call_graph_for(go: bool) -> &'static str {
    if go {
        "fp"
    } else {
        "dwarf,16384"
    }
}

/// One `perf record -p PID` running.
pub struct Recorder {
    child: Child,
    data: PathBuf,
    side: &'static str,
}

impl Recorder {
    /// Starts sampling `pid` (all its threads) into `dir/<side>.data`, unwinding with
    /// `call_graph` ([`call_graph_for`]).
    pub fn start(
        pid: u32,
        side: &'static str,
        dir: &Path,
        freq: u32,
        call_graph: &str,
    ) -> Result<Recorder> {
        let data = dir.join(format!("{side}.data"));
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F"])
            .arg(freq.to_string())
            .args(["--call-graph", call_graph, "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running perf record (install linux-perf)")?;
        Ok(Recorder { child, data, side })
    }

    /// Stops sampling (SIGINT, as perf expects) and waits for the data file.
    pub fn stop(mut self) -> Result<(&'static str, PathBuf)> {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let output = wait_output(&mut self.child, Duration::from_secs(60))?;
        ensure!(
            self.data.is_file(),
            "perf record wrote no {}: {}",
            self.data.display(),
            output.trim()
        );
        Ok((self.side, self.data.clone()))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_output(child: &mut Child, timeout: Duration) -> Result<String> {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                use std::io::Read as _;
                let _ = stderr.read_to_string(&mut err);
            }
            // perf exits non-zero on SIGINT on some versions; the data file decides.
            let _ = status;
            return Ok(err);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            bail!("perf record did not stop within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Collapsed stacks of one `perf.data`, each prefixed with `side` (`client`/`server`).
fn collapse(side: &str, data: &Path) -> Result<Vec<String>> {
    let output = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running perf script (install linux-perf)")?;
    ensure!(
        output.status.success(),
        "perf script -i {} failed: {}",
        data.display(),
        output.status
    );
    let mut folder = Folder::from(CollapseOptions::default());
    let mut collapsed = Vec::new();
    folder
        .collapse(BufReader::new(Cursor::new(output.stdout)), &mut collapsed)
        .context("collapsing perf script output")?;
    let collapsed = String::from_utf8_lossy(&collapsed);
    Ok(collapsed
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| format!("{side};{line}"))
        .collect())
}

/// Renders the recordings into one flame graph at `svg`; returns the CPU nanoseconds sampled.
pub fn render(recordings: &[(&'static str, PathBuf)], title: &str, svg: &Path) -> Result<u64> {
    let mut lines = Vec::new();
    for (side, data) in recordings {
        lines.extend(collapse(side, data)?);
    }
    let samples: u64 = lines
        .iter()
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    ensure!(
        samples > 0,
        "no samples in {recordings:?} (is perf allowed? kernel.perf_event_paranoid)"
    );
    let mut options = FlameOptions::default();
    options.title = title.to_owned();
    options.subtitle = Some(
        "left: client (sending) daemon, right: server (receiving) daemon; width = CPU time"
            .to_owned(),
    );
    // perf script gives each cpu-clock sample its period, so counts are CPU nanoseconds.
    options.count_name = "ns of CPU".to_owned();
    let file = std::fs::File::create(svg).with_context(|| format!("creating {}", svg.display()))?;
    flamegraph::from_lines(
        &mut options,
        lines.iter().map(String::as_str),
        BufWriter::new(file),
    )
    .with_context(|| format!("rendering {}", svg.display()))?;
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_collapsed_stacks_of_both_sides() {
        let dir = std::env::temp_dir().join(format!("tbp-speed-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("t.svg");
        let mut options = FlameOptions::default();
        let lines = ["client;worker;seal 30", "server;worker;open 20"];
        flamegraph::from_lines(
            &mut options,
            lines.iter().copied(),
            std::fs::File::create(&svg).unwrap(),
        )
        .unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("seal") && text.contains("open"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
