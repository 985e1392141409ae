//! Debian's systemd-resolved, confined to a test namespace with private mounts
//! ([`Netns::private_mounts`] over the package unpacked by `scripts/setup.sh`), on a
//! system bus of its own (`dbus-daemon`), so that `resolvectl` and the joiner's
//! `--dns resolved` talk to it exactly as on a host that runs it.
//!
//! Invariants: [`Resolved::start`] returns once resolved's varlink socket exists (what the
//! joiner's `auto` mode looks for) and `resolvectl` gets an answer over D-Bus; the bus and
//! the daemon are [`Process`]es of the namespace, stopped by PID when dropped.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::process::Process;

/// The Debian package that provides systemd-resolved and resolvectl.
pub const PACKAGE: &str = "systemd-resolved";

/// The system bus configuration: the standard socket, any local peer may own and call
/// anything (a bus private to one test namespace).
const BUS_CONFIG: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#;

/// What the package's sysusers.d entry creates (`u systemd-resolve - "systemd Resolver"`),
/// added to the namespace's copy-on-write `/etc` only; the ids are unused on Debian.
const ADD_USER: &str = "grep -q '^systemd-resolve:' /etc/passwd || { \
     echo 'systemd-resolve:x:989:989:systemd Resolver:/:/usr/sbin/nologin' >> /etc/passwd; \
     echo 'systemd-resolve:x:989:' >> /etc/group; }";

/// How long the bus and the daemon get to come up.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running systemd-resolved with its bus.
pub struct Resolved {
    netns: Netns,
    _bus: Process,
    daemon: Process,
}

impl Resolved {
    /// Starts a system bus and systemd-resolved in `netns`, which must have private mounts
    /// with the unpacked package over `/usr` (see [`crate::mountns::unpacked_usr`]).
    pub fn start(netns: &Netns) -> Result<Resolved> {
        if !netns.has_private_mounts() {
            bail!(
                "systemd-resolved in namespace {} needs private mounts (Netns::private_mounts)",
                netns.name()
            );
        }
        let config = netns.workdir().join("system-bus.conf");
        std::fs::write(&config, BUS_CONFIG)
            .with_context(|| format!("writing {}", config.display()))?;
        // The directories the packages own (resolved creates /run/systemd/resolve itself).
        netns.run("mkdir", &["-p", "/run/dbus", "/run/systemd"])?;
        let bus = netns.spawn(
            "dbus-daemon",
            "dbus-daemon",
            &[
                "--nofork",
                "--nopidfile",
                "--nosyslog",
                &format!("--config-file={}", config.display()),
            ],
        )?;
        crate::wait::until("the system bus socket", START_TIMEOUT, || {
            Ok(netns
                .run("test", &["-S", "/run/dbus/system_bus_socket"])
                .is_ok()
                .then_some(()))
        })
        .with_context(|| format!("dbus-daemon: {}", bus.logs()))?;
        netns.run("sh", &["-c", ADD_USER])?;
        let daemon = netns.spawn("systemd-resolved", "/usr/lib/systemd/systemd-resolved", &[])?;
        let resolved = Resolved {
            netns: netns.clone(),
            _bus: bus,
            daemon,
        };
        crate::wait::until("systemd-resolved to answer", START_TIMEOUT, || {
            if resolved
                .netns
                .run("test", &["-S", "/run/systemd/resolve/io.systemd.Resolve"])
                .is_err()
            {
                return Ok(None);
            }
            resolved.resolvectl(&["status"]).map(Some)
        })
        .with_context(|| format!("systemd-resolved: {}", resolved.daemon.logs()))?;
        Ok(resolved)
    }

    /// `resolvectl ARGS…` in the namespace; its stdout.
    pub fn resolvectl(&self, args: &[&str]) -> Result<String> {
        self.netns.run("resolvectl", args)
    }

    /// resolved's own log.
    pub fn logs(&self) -> String {
        self.daemon.logs()
    }
}
