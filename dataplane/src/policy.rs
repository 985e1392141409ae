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
            remove_rules(fam, mark).context("removing stale policy rules")?;
            let f = fam.flag();
            me.families.push(fam);
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
        for fam in std::mem::take(&mut self.families) {
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
