//! wg-quick's policy routing for a default route in AllowedIPs (`tabbify-mesh up`).
//!
//! Routing `0.0.0.0/0` or `::/0` into the TUN in the main table would also capture the
//! engine's own encrypted datagrams (a routing loop) and replace the host's default route.
//! Like `wg-quick`, for each family that has a default route in AllowedIPs:
//!
//! ```text
//! engine UDP sockets: SO_MARK M               (set by the engine before binding)
//! table M:            default dev TUN
//! rule:               not fwmark M lookup M   everything but the engine's datagrams
//! rule:               lookup main suppress_prefixlength 0
//!                                             ahead of it: the main table, except its
//!                                             default route (LAN and underlay routes win)
//! ```
//!
//! so every packet without a more specific route enters the tunnel, while the datagrams
//! carrying it (marked M) skip table M and leave by the underlay.
//!
//! Replies to those datagrams arrive unmarked, and a strict reverse-path filter
//! (`rp_filter=1`) would look their source up in table M, find the TUN and drop them when
//! the peer's address is reachable only by the default route (a server on the internet).
//! As wg-quick does: `net.ipv4.conf.all.src_valid_mark=1`, and an nftables table
//! `inet tabbify-M` copies the mark into the connection (postrouting, UDP with mark M) and
//! back onto its incoming packets (prerouting), so the reverse-path check sees mark M. Without
//! `nft` this part is skipped with a warning.
//!
//! Ownership and invariants: every rule this module adds carries the routing protocol
//! [`RULE_PROTO`], which is how it finds its own rules and nobody else's. The rules exist
//! while a [`PolicyRoutes`] does: it removes them when dropped (normal exit, a failed
//! start). A process that is killed cannot; the next start of any `up` with a default route
//! removes such stale rules first ([`PolicyRoutes::install`]). Table M is refused when it
//! still holds a route (another running interface uses that mark; set `FwMark` to another
//! value). The suppress rule is shared: it is removed only when no `not fwmark` rule of
//! ours remains in its family.

use std::process::Command;

use anyhow::{bail, Context};

/// The routing protocol number on our rules (unassigned in iproute2's `rt_protos`).
pub const RULE_PROTO: u8 = 201;

/// The mark and table when the configuration sets no `FwMark` (wg-quick's first choice).
pub const DEFAULT_MARK: u32 = 51820;

/// An address family's `ip` switch and default prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_prefix(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// The policy rules and table-M routes of one interface, removed on drop.
#[derive(Debug)]
pub struct PolicyRoutes {
    ifname: String,
    mark: u32,
    families: Vec<Family>,
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The rules of one family, as `ip -j rule show` prints them.
fn rules(fam: Family) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = ip(&[fam.flag(), "-N", "-j", "rule", "show"])?;
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).context("parsing `ip -j rule show`")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The nftables table that carries mark M across the connection (see the module docs).
fn nft_table(mark: u32) -> String {
    format!("tabbify-{mark}")
}

/// Runs `nft -f -` with `script` (also the router's masquerade, `join::router`).
pub(crate) fn nft(script: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running `nft` (install nftables)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`nft` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes the mark-carrying table of `mark`, if present (a stale one included).
fn remove_connmark(mark: u32) {
    let _ = nft(&format!("destroy table inet {}\n", nft_table(mark)))
        .or_else(|_| nft(&format!("delete table inet {}\n", nft_table(mark))));
}

/// `src_valid_mark` and the connmark table (see the module docs); a failure is logged.
fn install_connmark(mark: u32) {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/conf/all/src_valid_mark", "1") {
        tracing::warn!(error = %e, "net.ipv4.conf.all.src_valid_mark not set: a strict rp_filter may drop the peers' datagrams");
    }
    remove_connmark(mark);
    let t = nft_table(mark);
    let script = format!(
        "table inet {t} {{\n\
         \tchain premangle {{ type filter hook prerouting priority -150; meta l4proto udp meta mark set ct mark; }}\n\
         \tchain postmangle {{ type filter hook postrouting priority -150; meta l4proto udp meta mark {mark} ct mark set meta mark; }}\n\
         }}\n"
    );
    if let Err(e) = nft(&script) {
        tracing::warn!(error = %e, "the fwmark is not carried to incoming datagrams: a strict rp_filter may drop them");
    }
}

fn is_ours(rule: &serde_json::Value) -> bool {
    let proto = RULE_PROTO.to_string();
    rule.get("protocol").and_then(|p| p.as_str()) == Some(proto.as_str())
}

fn is_our_mark_rule(rule: &serde_json::Value) -> bool {
    is_ours(rule) && rule.get("fwmark").is_some()
}

/// Whether table `mark` holds any route in `fam` (a missing table holds none).
fn table_in_use(fam: Family, mark: u32) -> bool {
    ip(&[fam.flag(), "route", "show", "table", &mark.to_string()])
        .map(|out| !out.trim().is_empty())
        .unwrap_or(false)
}

/// Deletes our `not fwmark M lookup M` rules of `fam` (all of them: duplicates of a crashed
/// run included), then the suppress rules when no mark rule of ours is left.
fn remove_rules(fam: Family, mark: u32) -> anyhow::Result<()> {
    let (m, proto) = (mark.to_string(), RULE_PROTO.to_string());
    let f = fam.flag();
    let del_mark = [
        f, "rule", "del", "not", "fwmark", &m, "table", &m, "protocol", &proto,
    ];
    let del_suppress = [
        f,
        "rule",
        "del",
        "table",
        "main",
        "suppress_prefixlength",
        "0",
        "protocol",
        &proto,
    ];
    // Bounded: each pass removes one rule; a namespace holds few.
    for _ in 0..64 {
        if ip(&del_mark).is_err() {
            break;
        }
    }
    if !rules(fam)?.iter().any(is_our_mark_rule) {
        for _ in 0..64 {
            if ip(&del_suppress).is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// Removes what a killed process left for `mark` (its rules in both families, the connmark
/// table; the table-M routes went with its TUN), when no interface uses table `mark` now.
/// For the joiner's `--exit-node`, at every start: a run without it must not keep a dead
/// run's rules. Errors are logged; a host without `ip` has nothing to remove.
pub fn remove_stale(mark: u32) {
    for fam in [Family::V4, Family::V6] {
        // A killed process's TUN (and the table-M route through it) can outlive the
        // process by a moment while the kernel tears it down: wait a little for that.
        let mut waited = 0;
        while table_in_use(fam, mark) && waited < 20 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            waited += 1;
        }
        if table_in_use(fam, mark) {
            tracing::warn!(family = fam.flag(), fwmark = format_args!("{mark:#x}"), "routing table {mark} is in use by another interface: its policy rules are left alone");
            continue;
        }
        let stale = rules(fam)
            .map(|r| {
                r.iter().any(|r| {
                    is_our_mark_rule(r)
                        && r.get("table").and_then(|t| t.as_str()) == Some(&mark.to_string())
                })
            })
            .unwrap_or(false);
        if stale {
            match remove_rules(fam, mark) {
                Ok(()) => {
                    tracing::info!(
                        family = fam.flag(),
                        fwmark = format_args!("{mark:#x}"),
                        "policy rules left by an earlier run removed"
                    )
                }
                Err(e) => {
                    tracing::warn!(family = fam.flag(), error = %e, "stale policy rules not removed")
                }
            }
        }
    }
    remove_connmark(mark);
}

impl PolicyRoutes {
    /// Installs the policy for `families` on `ifname` (which must exist and be up), after
    /// removing stale rules of `mark` left by a run that could not clean up. The engine's
    /// sockets must already carry `mark`.
    pub fn install(ifname: &str, mark: u32, families: &[Family]) -> anyhow::Result<Self> {
        let mut me = PolicyRoutes {
            ifname: ifname.to_owned(),
            mark,
            families: Vec::new(),
        };
        let (m, proto) = (mark.to_string(), RULE_PROTO.to_string());
        for &fam in families {
            if table_in_use(fam, mark) {
                bail!(
                    "routing table {mark} ({}) already holds routes: another interface uses fwmark {mark:#x}; set FwMark to another value",
                    fam.flag()
                );
            }
        }
        if !families.is_empty() {
            install_connmark(mark);
        }
        for &fam in families {
            // From here on, dropping `me` (an error below) removes what was added.
            me.families.push(fam);
            remove_rules(fam, mark).context("removing stale policy rules")?;
            let f = fam.flag();
            ip(&[
                f,
                "route",
                "replace",
                fam.default_prefix(),
                "dev",
                ifname,
                "table",
                &m,
            ])?;
            ip(&[
                f, "rule", "add", "not", "fwmark", &m, "table", &m, "protocol", &proto,
            ])?;
            ip(&[
                f,
                "rule",
                "add",
                "table",
                "main",
                "suppress_prefixlength",
                "0",
                "protocol",
                &proto,
            ])?;
            tracing::info!(
                interface = ifname,
                family = f,
                fwmark = format_args!("{mark:#x}"),
                "default route through the tunnel (policy routing, as wg-quick)"
            );
        }
        Ok(me)
    }

    /// Removes the rules and table-M routes (also done on drop). Errors are logged.
    pub fn remove(&mut self) {
        let families = std::mem::take(&mut self.families);
        if !families.is_empty() {
            remove_connmark(self.mark);
        }
        for fam in families {
            let m = self.mark.to_string();
            // The route goes with the TUN anyway; remove it first so nothing new enters.
            let _ = ip(&[
                fam.flag(),
                "route",
                "del",
                fam.default_prefix(),
                "dev",
                &self.ifname,
                "table",
                &m,
            ]);
            if let Err(e) = remove_rules(fam, self.mark) {
                tracing::warn!(family = fam.flag(), error = %e, "policy rules not removed");
            }
        }
    }
}

impl Drop for PolicyRoutes {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_its_own_rules() {
        // `ip -N -j rule show` with wg-quick's rules (no protocol), ours, and another
        // daemon's rule with a protocol of its own.
        let rules: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"priority":0,"src":"all","table":"255"},
                {"priority":32762,"src":"all","table":"254","suppress_prefixlen":0},
                {"priority":32763,"not":null,"src":"all","fwmark":"0xca6d","table":"51821"},
                {"priority":32764,"src":"all","table":"254","suppress_prefixlen":0,"protocol":"201"},
                {"priority":32765,"not":null,"src":"all","fwmark":"0xca6c","table":"51820","protocol":"201"},
                {"priority":32766,"src":"all","table":"254","protocol":"99"}]"#,
        )
        .unwrap();
        let ours: Vec<i64> = rules
            .iter()
            .filter(|r| is_ours(r))
            .filter_map(|r| r["priority"].as_i64())
            .collect();
        assert_eq!(ours, [32764, 32765]);
        let marks: Vec<i64> = rules
            .iter()
            .filter(|r| is_our_mark_rule(r))
            .filter_map(|r| r["priority"].as_i64())
            .collect();
        assert_eq!(marks, [32765]);
    }
}
