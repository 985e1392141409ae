//! A private mount namespace inside a test's network namespace, where the host's resolver
//! programs (systemd-resolved, resolvconf) run confined: whatever they write stays in the
//! test's work directory, never on this machine.
//!
//! The namespace is held by one process (`sleep infinity` after the mounts are made),
//! started with `ip netns exec NAME unshare --mount --propagation private`; every later
//! command of the [`Netns`] enters it with `nsenter --target HOLDER --mount --net`
//! ([`Netns::command`]). Its mounts:
//!
//! * `/run`: a fresh tmpfs (D-Bus socket, `/run/systemd/resolve`, `/run/resolvconf`, the
//!   joiner's control socket all live there);
//! * `/etc`: an overlay whose upper layer is in the work directory (users added for a
//!   daemon, `resolv.conf.bak` and the like land there), with `/etc/resolv.conf` bound to
//!   the namespace's own (`Netns::private_resolv_conf`), so that the test reads it from
//!   outside;
//! * `/usr`: read-only overlay of the given trees over the machine's `/usr`, i.e. the
//!   programs of a Debian package unpacked under `target/host-dns/` appear installed.
//!
//! Invariants: the mounts exist before [`start_holder`] returns (the holder writes a
//! marker after the last one); the holder is a child of the test process, killed and reaped
//! when the namespace's last handle drops, which ends the mount namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// How long the holder gets to make its mounts.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the holder of `netns`'s private mounts (see the module docs) and waits until the
/// mounts are made.
pub(crate) fn start_holder(
    netns: &Netns,
    resolv_conf: &Path,
    usr_overlays: &[&Path],
) -> Result<Child> {
    let dir = netns.workdir().join("mounts");
    let (upper, work) = (dir.join("etc-upper"), dir.join("etc-work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let ready = dir.join("ready");
    let log = dir.join("holder.log");
    let mut lowers = String::new();
    for tree in usr_overlays {
        if !tree.join("bin").is_dir() && !tree.join("lib").is_dir() && !tree.join("sbin").is_dir() {
            bail!(
                "{} is not a /usr tree (no bin, lib or sbin)",
                tree.display()
            );
        }
        lowers.push_str(&format!("{}:", shell_path(tree)?));
    }
    // The namespace's resolv.conf is under /etc: it is bound to a spot outside /etc before
    // the overlay hides it (through the overlay, writes would go to a copy in the upper
    // layer, not to the file the test reads).
    let keep = dir.join("resolv.conf");
    std::fs::write(&keep, "").with_context(|| format!("creating {}", keep.display()))?;
    let mut script = format!(
        "set -e\n\
         mount -t tmpfs -o mode=0755 tabbify-run /run\n\
         mount --bind {resolv} {keep}\n\
         mount -t overlay tabbify-etc -o lowerdir=/etc,upperdir={upper},workdir={work} /etc\n\
         rm -f /etc/resolv.conf\n\
         touch /etc/resolv.conf\n\
         mount --bind {keep} /etc/resolv.conf\n",
        resolv = shell_path(resolv_conf)?,
        keep = shell_path(&keep)?,
        upper = shell_path(&upper)?,
        work = shell_path(&work)?,
    );
    if !lowers.is_empty() {
        script.push_str(&format!(
            "mount -t overlay tabbify-usr -o ro,lowerdir={lowers}/usr /usr\n"
        ));
    }
    script.push_str(&format!(
        "touch {}\nexec sleep infinity\n",
        shell_path(&ready)?
    ));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns.name()])
        .args(["unshare", "--mount", "--propagation", "private", "--"])
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting the holder of the private mounts (unshare, util-linux)")?;
    let waited = crate::wait::until("the private mounts", READY_TIMEOUT, || {
        if ready.exists() {
            return Ok(Some(()));
        }
        if let Some(status) = child.try_wait()? {
            return Err(crate::wait::fatal(anyhow::anyhow!(
                "the mount script exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            )));
        }
        Ok(None)
    });
    if let Err(e) = waited {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e.context(format!("private mounts for namespace {}", netns.name())));
    }
    Ok(child)
}

/// `path` for the mount script: absolute, without characters the shell or a mount
/// option list would read (`,` `:` quotes, spaces).
fn shell_path(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    if !path.is_absolute()
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
    {
        bail!("{text}: not usable in a mount command (absolute, [A-Za-z0-9/._+-] only)");
    }
    Ok(text.to_owned())
}

/// Where `scripts/setup.sh` unpacks the Debian package `package` (its files under `usr/`,
/// merged-/usr layout): `$TABBIFY_HOST_DNS_DIR/<package>/usr`, by default
/// `target/host-dns/<package>/usr` in the workspace. An error naming the set-up step when
/// it is not there.
pub fn unpacked_usr(package: &str) -> Result<PathBuf> {
    let base = match std::env::var_os("TABBIFY_HOST_DNS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("host-dns"),
    };
    let usr = base.join(package).join("usr");
    if !usr.is_dir() {
        bail!(
            "Debian package {package} not unpacked at {}: run scripts/setup.sh (it runs \
             `apt-get download {package}` and unpacks it there, nothing installed)",
            usr.display()
        );
    }
    // Canonical: the mount script wants no `..`.
    usr.canonicalize()
        .with_context(|| format!("resolving {}", usr.display()))
}
