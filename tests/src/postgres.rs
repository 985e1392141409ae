//! A throwaway PostgreSQL server for tests: `initdb` and `pg_ctl` from Debian's
//! `postgresql` package (`/usr/lib/postgresql/*/bin`), a cluster in a fresh temporary
//! directory, listening on 127.0.0.1 on a free port and on a unix socket in that
//! directory, trusting local connections of the user `tabbify`.
//!
//! PostgreSQL refuses to run as root, so when the test runs as root the directory is
//! handed to `nobody` and the server runs as that user (the client programs need no
//! privileges). Dropping the handle stops the server (`pg_ctl stop -m immediate`) and
//! removes the directory, also when the test panicked.
//!
//! Uses only `std`, so crates without this harness include it by path:
//! `#[path = "../../tests/src/postgres.rs"] mod postgres;` (as `control/tests` does).
//!
//! `fsync` is off: these clusters hold test data only, and a crash of the machine ends
//! the test anyway. Durability across a crash of the *coordinator* does not depend on it
//! (the server process survives).

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The Debian package that provides the server.
pub const PACKAGE: &str = "postgresql";
/// The database user the cluster is created with (trusted, superuser).
pub const USER: &str = "tabbify";

/// A running PostgreSQL cluster, stopped and deleted when dropped.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// The uid and gid the server runs as, when not the current user.
    run_as: Option<(u32, u32)>,
    running: bool,
}

/// The directory holding `initdb` and `pg_ctl` (the newest version installed), or an
/// error saying what to install.
pub fn bin_dir() -> Result<PathBuf, String> {
    let missing = || {
        format!(
            "PostgreSQL is not installed: this test needs initdb and pg_ctl from Debian's \
             `{PACKAGE}` package (apt-get install --no-install-recommends {PACKAGE}; \
             scripts/setup.sh installs it)"
        )
    };
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| missing())?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or_else(missing)
}

fn uid_gid_of(user: &str) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
    passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        })
        .flatten()
        .next()
        .ok_or_else(|| format!("no user {user:?} in /etc/passwd to run PostgreSQL as"))
}

fn is_root() -> bool {
    // /proc/self belongs to the effective uid (std has no geteuid).
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn check(what: &str, out: std::io::Result<Output>) -> Result<Output, String> {
    let out = out.map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

impl Postgres {
    /// Creates a cluster in a new temporary directory and starts it.
    pub fn start() -> Result<Self, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "tabbify-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let run_as = if is_root() {
            let ids = uid_gid_of("nobody")?;
            std::os::unix::fs::chown(&dir, Some(ids.0), Some(ids.1))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
            Some(ids)
        } else {
            None
        };
        let mut pg = Self {
            bin,
            dir,
            port: 0,
            run_as,
            running: false,
        };
        check(
            "initdb",
            pg.command("initdb")
                .arg("-D")
                .arg(pg.data())
                .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
                .output(),
        )?;
        pg.start_server()?;
        Ok(pg)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.current_dir(&self.dir).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the server (again, after [`Postgres::stop`]) on a free port (a new one
    /// unless it was started before).
    pub fn start_server(&mut self) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..5 {
            let port = if self.port == 0 {
                free_port()?
            } else {
                self.port
            };
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c max_connections=200",
                self.dir.display()
            );
            let out = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "60", "-o", &opts, "start"])
                .output();
            match check("pg_ctl start", out) {
                Ok(_) => {
                    self.port = port;
                    self.running = true;
                    return Ok(());
                }
                Err(e) => {
                    last = format!(
                        "{e}\nserver.log:\n{}",
                        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
                    );
                    if self.port != 0 {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// Stops the server at once (`-m immediate`: as if it crashed); the data stays.
    pub fn stop(&mut self) -> Result<(), String> {
        self.stop_mode("immediate")
    }

    /// Stops the server as an operator does for maintenance (`-m fast`: clients are
    /// disconnected, the server shuts down cleanly); the data stays.
    pub fn stop_fast(&mut self) -> Result<(), String> {
        self.stop_mode("fast")
    }

    fn stop_mode(&mut self, mode: &str) -> Result<(), String> {
        self.running = false;
        check(
            &format!("pg_ctl stop -m {mode}"),
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-m", mode, "stop"])
                .output(),
        )
        .map(drop)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory (data in `data/`, the server log in `server.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates database `name` and returns its URL (`postgres://tabbify@127.0.0.1:PORT/NAME`).
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        check(
            "createdb",
            Command::new(self.bin.join("createdb"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    USER,
                    name,
                ])
                .output(),
        )?;
        Ok(self.url(name))
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// The URL of database `name` over the unix socket in the cluster's directory, which
    /// works from any network namespace of this host.
    pub fn socket_url(&self, name: &str) -> String {
        let dir: String = self
            .dir
            .to_string_lossy()
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!("postgres://{USER}@{dir}:{}/{name}", self.port)
    }

    /// Runs `sql` with `psql` on database `name` and returns its unaligned output.
    pub fn psql(&self, name: &str, sql: &str) -> Result<String, String> {
        let out = check(
            "psql",
            Command::new(self.bin.join("psql"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
                .args([
                    "-X",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    name,
                    "-c",
                    sql,
                ])
                .output(),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            if let Err(e) = self.stop() {
                eprintln!("postgres test cluster {}: {e}", self.dir.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
