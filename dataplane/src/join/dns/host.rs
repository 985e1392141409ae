//! Pointing the host's resolver at the stub for the mesh domain, and undoing it.
//!
//! * `resolved` (systemd-resolved runs): per-link DNS server (the stub's IPv6 address,
//!   which is on the TUN; never the loopback IPv4 one, which resolved would make global)
//!   and routing domains `~<domain>` and `~<each mesh reverse zone>` (PTR answers for
//!   mesh addresses, [`super::zone::reverse_zones`]) on the TUN, the link kept out of the
//!   default route, through `resolvectl`; resolved forgets a link's settings when the link
//!   goes, so a crash leaves nothing.
//! * `resolvconf` (installed, resolved not running): a record for the TUN
//!   (`resolvconf -a IFACE`), removed with `resolvconf -d IFACE`. `auto` takes only a
//!   resolvconf of its own (openresolv, Debian's resolvconf), never the `resolvconf` link to
//!   `resolvectl` that systemd-resolved's package installs: that one needs resolved running.
//! * `file`: a marked block at the top of `/etc/resolv.conf` naming the stub first, the
//!   original content kept below it. The original is saved in the state directory
//!   (`dns/resolv.conf.orig`, fsynced) before the file is touched and written back on exit.
//!   The file is rewritten in place, never renamed over: under `ip netns exec` it is a bind
//!   mount of `/etc/netns/<ns>/resolv.conf`, which a rename cannot replace.
//!
//! Crash recovery ([`recover`], run at start before anything else): a saved original left by
//! a process that did not exit cleanly is written back, a resolvconf record left behind is
//! deleted. Only then are the upstream resolvers read ([`upstreams`]), so they are always
//! the host's own, never the stub.
//!
//! Every mode runs against the real programs in the end-to-end tests: `file` in
//! `tests/tests/mesh_dns.rs`; Debian's systemd-resolved (with its own bus) and openresolv,
//! confined to a test namespace, in `tests/tests/host_dns.rs`.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// How the host is told about the stub (`--dns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// resolved if it runs, else resolvconf if installed, else the file.
    Auto,
    /// No stub, no host change.
    Off,
    /// systemd-resolved through resolvectl.
    Resolved,
    /// resolvconf.
    Resolvconf,
    /// A managed block in /etc/resolv.conf.
    File,
}

/// The file the `file` mode manages and the upstreams are read from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// resolved's list of the real upstream servers (not its stub).
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";
/// resolved's varlink socket: present while resolved runs.
const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";

/// What was changed, to undo it.
#[derive(Debug)]
pub enum Applied {
    /// resolvectl on this link.
    Resolved {
        /// The TUN.
        link: String,
    },
    /// A resolvconf record.
    Resolvconf {
        /// The record's name (the TUN).
        record: String,
        /// The marker file in the state directory.
        marker: PathBuf,
    },
    /// The managed block.
    File {
        /// The saved original.
        saved: PathBuf,
    },
}

impl Applied {
    /// The mode's name for `status`.
    pub fn name(&self) -> &'static str {
        match self {
            Applied::Resolved { .. } => "resolved",
            Applied::Resolvconf { .. } => "resolvconf",
            Applied::File { .. } => "file",
        }
    }
}

fn dns_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("dns")
}

fn saved_path(state_dir: &Path) -> PathBuf {
    dns_dir(state_dir).join("resolv.conf.orig")
}

fn resolvconf_marker(state_dir: &Path) -> PathBuf {
    dns_dir(state_dir).join("resolvconf")
}

/// Undoes what a crashed run left: writes a saved resolv.conf back, deletes a resolvconf
/// record. Returns what it did, for the log.
pub fn recover(state_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let saved = saved_path(state_dir);
    if saved.exists() {
        restore_file(&saved)?;
        done.push(format!("{RESOLV_CONF} restored from {}", saved.display()));
    }
    let marker = resolvconf_marker(state_dir);
    if let Ok(record) = std::fs::read_to_string(&marker) {
        let _ = run("resolvconf", &["-d", record.trim()], None);
        let _ = std::fs::remove_file(&marker);
        done.push(format!("resolvconf record {} deleted", record.trim()));
    }
    Ok(done)
}

/// The host's upstream resolvers (port 53), our own `own` addresses left out. Read after
/// [`recover`] and before [`apply`].
pub fn upstreams(own: &[IpAddr]) -> Vec<SocketAddr> {
    // With resolved, its own list names the real servers; its stub (127.0.0.53) is the
    // fallback when that list is empty.
    let mut out = Vec::new();
    for path in [RESOLVED_UPSTREAMS, RESOLV_CONF] {
        if let Ok(text) = std::fs::read_to_string(path) {
            out = parse_nameservers(&text, own);
            if !out.is_empty() {
                break;
            }
        }
    }
    out
}

/// The `nameserver` lines of a resolv.conf, as port-53 socket addresses, without `own`.
/// Scoped IPv6 addresses (`fe80::1%eth0`) and unparsable lines are skipped.
pub fn parse_nameservers(text: &str, own: &[IpAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if ip.is_unspecified() || own.contains(&ip) {
            continue;
        }
        let sa = SocketAddr::new(ip, 53);
        if !out.contains(&sa) {
            out.push(sa);
        }
    }
    out
}

/// Points the host at the stub (`v6`, `v4`) for `domain` as `mode` says, on `link`.
pub fn apply(
    mode: Mode,
    link: &str,
    domain: &str,
    v6: Ipv6Addr,
    v4: Ipv4Addr,
    state_dir: &Path,
) -> anyhow::Result<Option<Applied>> {
    let mode = match mode {
        Mode::Off => return Ok(None),
        Mode::Auto if resolved_runs() => Mode::Resolved,
        Mode::Auto if standalone_resolvconf() => Mode::Resolvconf,
        Mode::Auto => Mode::File,
        m => m,
    };
    std::fs::create_dir_all(dns_dir(state_dir))
        .with_context(|| format!("creating {}", dns_dir(state_dir).display()))?;
    match mode {
        Mode::Resolved => {
            // The IPv6 service address only: resolved moves a link's DNS server on a
            // loopback address (127.0.0.153) into its global list, where it would get every
            // name, not only the mesh's (seen with systemd 252 in tests/tests/host_dns.rs).
            // Routing domains: the mesh domain and the mesh's reverse zones (PTR answers).
            let mut domains = vec![format!("~{domain}")];
            domains.extend(super::zone::reverse_zones().iter().map(|z| format!("~{z}")));
            let mut args = vec!["domain", link];
            args.extend(domains.iter().map(String::as_str));
            let set = run("resolvectl", &["dns", link, &v6.to_string()], None)
                .and_then(|()| run("resolvectl", &args, None));
            if let Err(e) = set {
                // Half-applied settings are not left behind.
                let _ = run("resolvectl", &["revert", link], None);
                return Err(e);
            }
            // Only names under the domain come here; everything else keeps its route.
            let _ = run("resolvectl", &["default-route", link, "false"], None);
            Ok(Some(Applied::Resolved {
                link: link.to_owned(),
            }))
        }
        Mode::Resolvconf => {
            let marker = resolvconf_marker(state_dir);
            std::fs::write(&marker, link)
                .with_context(|| format!("writing {}", marker.display()))?;
            let record = format!("nameserver {v6}\nnameserver {v4}\n");
            run("resolvconf", &["-a", link], Some(&record))?;
            Ok(Some(Applied::Resolvconf {
                record: link.to_owned(),
                marker,
            }))
        }
        _ => {
            let saved = saved_path(state_dir);
            let original = std::fs::read(RESOLV_CONF).unwrap_or_default();
            write_synced(&saved, &original)?;
            let text = managed(&String::from_utf8_lossy(&original), link, v6, &saved);
            write_in_place(Path::new(RESOLV_CONF), text.as_bytes())?;
            Ok(Some(Applied::File { saved }))
        }
    }
}

/// Undoes `applied`; errors are logged, not returned (this runs on the way out).
pub fn restore(applied: Applied) {
    let r = match &applied {
        Applied::Resolved { link } => run("resolvectl", &["revert", link], None),
        Applied::Resolvconf { record, marker } => {
            let r = run("resolvconf", &["-d", record], None);
            let _ = std::fs::remove_file(marker);
            r
        }
        Applied::File { saved } => restore_file(saved),
    };
    match r {
        Ok(()) => tracing::info!(how = applied.name(), "host DNS settings restored"),
        Err(e) => {
            tracing::warn!(how = applied.name(), error = %format!("{e:#}"), "host DNS settings not restored")
        }
    }
}

/// The managed resolv.conf: our block, then the original.
pub fn managed(original: &str, link: &str, v6: Ipv6Addr, saved: &Path) -> String {
    format!(
        "# BEGIN tabbify-mesh {link}: mesh DNS first (managed; the original is saved in {})\n\
         nameserver {v6}\n\
         # END tabbify-mesh {link}\n{original}",
        saved.display()
    )
}

fn restore_file(saved: &Path) -> anyhow::Result<()> {
    let original = std::fs::read(saved).with_context(|| format!("reading {}", saved.display()))?;
    write_in_place(Path::new(RESOLV_CONF), &original)?;
    std::fs::remove_file(saved).with_context(|| format!("removing {}", saved.display()))?;
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

fn write_in_place(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(path)
        .with_context(|| format!("opening {} for writing", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

fn resolved_runs() -> bool {
    Path::new(RESOLVED_SOCKET).exists() && has_program("resolvectl")
}

/// Whether a `resolvconf` of its own is installed (openresolv or Debian's resolvconf).
/// systemd-resolved's package installs `resolvconf` as a link to `resolvectl`, which only
/// works while resolved runs: with resolved stopped, `auto` must not pick it (it would
/// fail and leave the host without mesh names) but fall through to the file.
fn standalone_resolvconf() -> bool {
    find_program("resolvconf").is_some_and(|path| !is_resolvectl(&path))
}

/// Whether `path` is, through any links, systemd's `resolvectl`.
fn is_resolvectl(path: &Path) -> bool {
    std::fs::canonicalize(path)
        .ok()
        .and_then(|real| real.file_name().map(|n| n == "resolvectl"))
        .unwrap_or(false)
}

/// Whether `program` is an executable on `PATH` (or the sbin directories).
fn has_program(program: &str) -> bool {
    find_program(program).is_some()
}

/// Where `program` is on `PATH` (or the sbin directories, which root's `PATH` may lack).
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_are_read_without_our_own_and_scoped_ones() {
        let own: Vec<IpAddr> = vec![
            "fd5a:1f00::53".parse().unwrap(),
            "127.0.0.153".parse().unwrap(),
        ];
        let text = "# c\nsearch x\nnameserver 10.0.0.1\nnameserver fd5a:1f00::53\n\
                    nameserver fe80::1%eth0\nnameserver 2001:db8::1 # x\nnameserver 10.0.0.1\n\
                    nameserver\nnameserver 127.0.0.153\nnameserver 0.0.0.0\n";
        assert_eq!(
            parse_nameservers(text, &own),
            vec![
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn resolvectl_behind_a_resolvconf_link_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let resolvectl = dir.path().join("resolvectl");
        let openresolv = dir.path().join("resolvconf-script");
        std::fs::write(&resolvectl, "").unwrap();
        std::fs::write(&openresolv, "").unwrap();
        let link = dir.path().join("resolvconf");
        std::os::unix::fs::symlink(&resolvectl, &link).unwrap();
        assert!(is_resolvectl(&link));
        assert!(is_resolvectl(&resolvectl));
        assert!(!is_resolvectl(&openresolv));
        assert!(!is_resolvectl(&dir.path().join("missing")));
    }

    #[test]
    fn the_managed_file_names_the_stub_first_and_keeps_the_original() {
        let t = managed(
            "nameserver 10.0.0.1\n",
            "tb0",
            "fd5a:1f00::53".parse().unwrap(),
            Path::new("/s"),
        );
        let ns: Vec<&str> = t.lines().filter(|l| l.starts_with("nameserver")).collect();
        assert_eq!(ns, ["nameserver fd5a:1f00::53", "nameserver 10.0.0.1"]);
        assert!(t.starts_with("# BEGIN tabbify-mesh tb0"));
    }
}
