//! Prerequisite checks: the tools the end-to-end tests drive, and root.
//!
//! A missing prerequisite is an error naming what to install; tests call [`require`] first
//! so that they fail with that message instead of passing silently or failing obscurely.

use std::ffi::OsStr;
use std::path::PathBuf;

use anyhow::{bail, Result};

/// An external program the harness runs, with where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `ip` and `tc` (Debian `iproute2`).
    Iproute2,
    /// `wg` (Debian `wireguard-tools`).
    Wg,
    /// `wireguard-go` (Debian `wireguard-go`).
    WireguardGo,
    /// `boringtun-cli` 0.7.1 (crates.io).
    BoringtunCli,
    /// `wireguard-go-offload`: wireguard-go v0.0.20250522 (TUN TSO/GRO, UDP GSO/GRO) under
    /// that name, so it can sit next to Debian's 2022 `wireguard-go`. Perf only.
    WireguardGoOffload,
    /// `gotatun` from `gotatun-cli` 0.10.2 (Mullvad's boringtun fork, crates.io). Perf only.
    GotatunCli,
    /// `ping` (Debian `iputils-ping`).
    Ping,
    /// `iperf3` (Debian `iperf3`).
    Iperf3,
    /// `nft` (Debian `nftables`).
    Nft,
    /// `ethtool` (Debian `ethtool`).
    Ethtool,
    /// `curl` (Debian `curl`).
    Curl,
    /// `turnserver`, a standard STUN server (Debian `coturn`).
    Coturn,
    /// `dig` (Debian `bind9-dnsutils`).
    Dig,
    /// `dnsmasq`, a small standard DNS server (Debian `dnsmasq-base`).
    Dnsmasq,
    /// `getent` (Debian `libc-bin`).
    Getent,
    /// `dbus-daemon`, a private system bus for a confined systemd-resolved (Debian
    /// `dbus-daemon`).
    DbusDaemon,
    /// `unshare` and `nsenter` (Debian `util-linux`), for private mount namespaces.
    UtilLinux,
}

impl Tool {
    /// The executable names this tool provides (all must be on `PATH`).
    pub fn programs(self) -> &'static [&'static str] {
        match self {
            Tool::Iproute2 => &["ip", "tc"],
            Tool::Wg => &["wg"],
            Tool::WireguardGo => &["wireguard-go"],
            Tool::BoringtunCli => &["boringtun-cli"],
            Tool::WireguardGoOffload => &["wireguard-go-offload"],
            Tool::GotatunCli => &["gotatun"],
            Tool::Ping => &["ping"],
            Tool::Iperf3 => &["iperf3"],
            Tool::Nft => &["nft"],
            Tool::Ethtool => &["ethtool"],
            Tool::Curl => &["curl"],
            Tool::Coturn => &["turnserver"],
            Tool::Dig => &["dig"],
            Tool::Dnsmasq => &["dnsmasq"],
            Tool::Getent => &["getent"],
            Tool::DbusDaemon => &["dbus-daemon"],
            Tool::UtilLinux => &["unshare", "nsenter"],
        }
    }

    /// How to install it.
    pub fn install_hint(self) -> &'static str {
        match self {
            Tool::Iproute2 => "apt-get install --no-install-recommends iproute2",
            Tool::Wg => "apt-get install --no-install-recommends wireguard-tools",
            Tool::WireguardGo => "apt-get install --no-install-recommends wireguard-go",
            Tool::BoringtunCli => "cargo install boringtun-cli --version 0.7.1 --locked",
            Tool::WireguardGoOffload => {
                "go install golang.zx2c4.com/wireguard@v0.0.20250522, then put the binary on PATH \
                 as wireguard-go-offload or pass its path"
            }
            Tool::GotatunCli => {
                "cargo install gotatun-cli --version 0.10.2 --locked, or TABBIFY_SETUP_PERF=1 \
                 scripts/setup.sh"
            }
            Tool::Ping => "apt-get install --no-install-recommends iputils-ping",
            Tool::Iperf3 => "apt-get install --no-install-recommends iperf3",
            Tool::Nft => "apt-get install --no-install-recommends nftables",
            Tool::Ethtool => "apt-get install --no-install-recommends ethtool",
            Tool::Curl => "apt-get install --no-install-recommends curl",
            Tool::Coturn => "apt-get install --no-install-recommends coturn",
            Tool::Dig => "apt-get install --no-install-recommends bind9-dnsutils",
            Tool::Dnsmasq => "apt-get install --no-install-recommends dnsmasq-base",
            Tool::Getent => "apt-get install --no-install-recommends libc-bin",
            Tool::DbusDaemon => "apt-get install --no-install-recommends dbus-daemon",
            Tool::UtilLinux => "apt-get install --no-install-recommends util-linux",
        }
    }
}

/// Fails unless the process runs as root and every tool in `tools` is on `PATH`.
///
/// The error lists every missing piece with its install command (`scripts/setup.sh`
/// installs all of them).
pub fn require(tools: &[Tool]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing = missing(tools, &path, is_root());
    if missing.is_empty() {
        Ok(())
    } else {
        bail!(
            "missing prerequisites (scripts/setup.sh installs them all):\n  - {}",
            missing.join("\n  - ")
        )
    }
}

/// One line per missing prerequisite, given a `PATH` value and whether we are root.
fn missing(tools: &[Tool], path: &OsStr, root: bool) -> Vec<String> {
    let mut missing = Vec::new();
    if !root {
        missing.push("root (network namespaces need it): run the tests as root".to_owned());
    }
    for &tool in tools {
        for program in tool.programs() {
            if find_in(program, path).is_none() {
                missing.push(format!(
                    "`{program}` not found: install it with `{}`",
                    tool.install_hint()
                ));
            }
        }
    }
    missing
}

/// Whether the effective user id is 0, read from `/proc/self/status`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The first executable file named `program` on `PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    find_in(program, &std::env::var_os("PATH")?)
}

/// The first executable file named `program` in the directories of `path`.
fn find_in(program: &str, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_not_a_made_up_program() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("tabbify-no-such-program-7f3a").is_none());
    }

    #[test]
    fn names_what_to_install_when_missing() {
        let lines = missing(
            &[Tool::Wg, Tool::BoringtunCli],
            OsStr::new("/nonexistent"),
            false,
        );
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains("root"));
        assert!(lines[1].contains("`wg` not found") && lines[1].contains("wireguard-tools"));
        assert!(lines[2].contains("cargo install boringtun-cli --version 0.7.1"));
        assert!(missing(
            &[Tool::Iproute2],
            OsStr::new("/usr/sbin:/sbin:/usr/bin:/bin"),
            true
        )
        .is_empty());
    }
}
