//! Interface configuration: MTU, link state, addresses and routes, through iproute2's `ip`
//! (as wg-quick does), plus the per-interface IPv6 sysctls that keep a fresh TUN quiet.
//!
//! Every call names the interface explicitly; nothing here touches other interfaces.

use std::io;
use std::process::Command;

use crate::core::net::IpNet;

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("running `ip` failed ({e}); install iproute2"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Sets the MTU and brings the link up. Router solicitations and autoconf are turned off
/// first (best effort: the sysctls are absent when IPv6 is disabled).
pub fn up(name: &str, mtu: u32) -> io::Result<()> {
    for (key, value) in [
        ("accept_ra", "0"),
        ("autoconf", "0"),
        ("router_solicitations", "0"),
    ] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/{key}"), value);
    }
    ip(&["link", "set", "dev", name, "mtu", &mtu.to_string(), "up"])
}

/// Adds an interface address (IPv6 without duplicate address detection, usable at once).
pub fn add_address(name: &str, addr: &IpNet) -> io::Result<()> {
    let a = addr.to_string();
    if addr.addr().is_ipv6() {
        ip(&["-6", "addr", "replace", &a, "dev", name, "nodad"])
    } else {
        ip(&["-4", "addr", "replace", &a, "dev", name])
    }
}

/// Adds a *service* address (a local /128 that programs bind to, like the mesh DNS stub's)
/// as deprecated (`preferred_lft 0`): the kernel still delivers to it and sockets still bind
/// it, but source address selection never picks it for outgoing traffic (RFC 6724 rule 3,
/// avoid deprecated addresses), so packets to peers keep the member's own ULA as source.
/// Without this, a service address in the peer prefix wins rule 8 (longest matching prefix)
/// for every peer whose ULA shares more leading bits with it, and those peers drop our
/// packets (source not allowed).
pub fn add_service_address(name: &str, addr: &IpNet) -> io::Result<()> {
    let a = addr.to_string();
    if addr.addr().is_ipv6() {
        ip(&[
            "-6",
            "addr",
            "replace",
            &a,
            "dev",
            name,
            "nodad",
            "preferred_lft",
            "0",
        ])
    } else {
        ip(&[
            "-4",
            "addr",
            "replace",
            &a,
            "dev",
            name,
            "preferred_lft",
            "0",
        ])
    }
}

/// Removes an interface address.
pub fn del_address(name: &str, addr: &IpNet) -> io::Result<()> {
    ip(&["addr", "del", &addr.to_string(), "dev", name])
}

/// Routes `net` into the interface (replacing an existing route for the same prefix).
pub fn add_route(name: &str, net: &IpNet) -> io::Result<()> {
    let n = net.network().to_string();
    let fam = if net.addr().is_ipv6() { "-6" } else { "-4" };
    ip(&[fam, "route", "replace", &n, "dev", name])
}

/// Withdraws the route for `net` from the interface.
pub fn del_route(name: &str, net: &IpNet) -> io::Result<()> {
    let n = net.network().to_string();
    let fam = if net.addr().is_ipv6() { "-6" } else { "-4" };
    ip(&[fam, "route", "del", &n, "dev", name])
}

/// Adds and withdraws many routes on the interface with one `ip -batch` process (a roster
/// change can touch hundreds). Every line is tried; the error lists the lines that failed.
/// Withdrawing a route that is already gone is not an error.
pub fn sync_routes(name: &str, add: &[IpNet], del: &[IpNet]) -> io::Result<()> {
    use std::io::Write as _;
    if add.is_empty() && del.is_empty() {
        return Ok(());
    }
    let mut script = String::new();
    for n in add {
        script.push_str(&format!("route replace {} dev {name}\n", n.network()));
    }
    for n in del {
        script.push_str(&format!("route del {} dev {name}\n", n.network()));
    }
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("running `ip` failed ({e}); install iproute2"),
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("No such process") && !l.contains("Command failed"))
        .map(str::to_owned)
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "route changes on {name} failed: {}",
            errors.join("; ")
        )))
    }
}
