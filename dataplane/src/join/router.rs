//! What a subnet router, exit node or concentrator changes on its host (issue 15): IP
//! forwarding and the masquerade of forwarded mesh traffic.
//!
//! ```text
//! start (every join):  recover()  — a record left by a killed run: sysctls put back,
//!                                   table `inet tabbify` deleted, record removed
//! start (a router):    Router::start — record the forwarding sysctls, then set them to 1
//!                                   (only the families it routes); with --snat, create
//!                                   table `inet tabbify` (below)
//! stop:                Router::stop (also on drop) — table deleted, sysctls restored,
//!                                   record removed
//! ```
//!
//! ```text
//! table inet tabbify {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         iifname "TUN" oifname != "TUN" ip daddr { ROUTES } masquerade
//!         iifname "TUN" oifname != "TUN" ip6 daddr { ROUTES } masquerade
//!         iifname "TUN" oifname != "TUN" masquerade          (an exit node: everything)
//!     }
//!     chain output {                                          (a concentrator)
//!         type filter hook output priority filter; policy accept;
//!         oifname "TUN" icmp type redirect drop
//!         oifname "TUN" icmpv6 type nd-redirect drop
//!     }
//! }
//! ```
//!
//! A concentrator (`--concentrator`) forwards between its stock WireGuard clients and the
//! mesh through the kernel: a client's packet leaves the engine on the TUN and the kernel
//! routes it back into the TUN towards the member (the engine admits it only by the
//! client's grants, `core::local`). That needs forwarding on for both families and nothing
//! else: client traffic goes TUN to TUN, which the masquerade (`oifname != TUN`) never
//! matches, so members see the client's own address and apply its rules. A same-interface
//! forward makes the kernel send ICMP redirects to the client; the `output` chain drops
//! them (they would tell a stock client nothing useful). A host whose own firewall drops
//! forwarded packets (a `forward` hook with policy drop, as Docker installs) would drop the
//! clients' traffic: [`forward_blocked`] finds that and the start logs a warning naming
//! the chain (this module never edits other tables).
//!
//! Why the `nft` binary (`nft -f -`, one atomic transaction per script) and not netlink:
//! the rules are written once at start, not per packet; the project already drives
//! iproute2 and nftables this way (`crate::policy`, the `up` fwmark table), and a netlink
//! nftables encoder would be a second, larger parser/emitter to trust. Missing `nft` with
//! routes advertised and `--snat true` fails the start with a message naming the package.
//!
//! Invariants: the record (`router.json` in the state directory) is written, synced, before
//! any sysctl changes, so a crash at any point leaves enough to undo; only the sysctls
//! recorded are restored, to the values recorded; the table name is this module's alone.
//! The data plane admits forwarded traffic only from peers granted a route
//! (`core::local`), so forwarding never opens the LAN to members the policy does not allow.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::core::net::IpNet;

/// The nftables table of the masquerade (family inet).
pub const NFT_TABLE: &str = "tabbify";

const FORWARD_V4: &str = "/proc/sys/net/ipv4/ip_forward";
const FORWARD_V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// What was changed, to put back.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    /// `net.ipv4.ip_forward` before, if this run set it.
    ipv4_forward: Option<String>,
    /// `net.ipv6.conf.all.forwarding` before, if this run set it.
    ipv6_forward: Option<String>,
    /// The masquerade table was created.
    nft_table: bool,
}

fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("router.json")
}

/// What the router does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterSpec {
    /// The TUN.
    pub interface: String,
    /// The prefixes advertised.
    pub routes: Vec<IpNet>,
    /// An exit node (forward and masquerade everything from the TUN).
    pub exit_node: bool,
    /// `--snat` (default true).
    pub snat: bool,
    /// `--concentrator`: forward between stock WireGuard clients and the mesh.
    pub concentrator: bool,
}

impl RouterSpec {
    fn v4(&self) -> bool {
        self.concentrator || self.exit_node || self.routes.iter().any(|r| r.addr().is_ipv4())
    }

    fn v6(&self) -> bool {
        self.concentrator || self.exit_node || self.routes.iter().any(|r| r.addr().is_ipv6())
    }

    /// Whether anything is masqueraded.
    fn masquerades(&self) -> bool {
        self.snat && (self.exit_node || !self.routes.is_empty())
    }
}

/// The masquerade script for `spec`.
pub fn nft_script(spec: &RouterSpec) -> String {
    let i = &spec.interface;
    let mut rules = String::new();
    let set = |v4: bool| -> Vec<String> {
        spec.routes
            .iter()
            .filter(|r| r.addr().is_ipv4() == v4)
            .map(|r| r.network().to_string())
            .collect()
    };
    if !spec.masquerades() {
        // No masquerade (a concentrator only, or --snat false).
    } else if spec.exit_node {
        rules.push_str(&format!(
            "\t\tiifname \"{i}\" oifname != \"{i}\" masquerade\n"
        ));
    } else {
        for (v4, kw) in [(true, "ip"), (false, "ip6")] {
            let s = set(v4);
            if !s.is_empty() {
                rules.push_str(&format!(
                    "\t\tiifname \"{i}\" oifname != \"{i}\" {kw} daddr {{ {} }} masquerade\n",
                    s.join(", ")
                ));
            }
        }
    }
    let mut chains = String::new();
    if spec.masquerades() {
        chains.push_str(&format!(
            "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{rules}\t}}\n"
        ));
    }
    if spec.concentrator {
        chains.push_str(&format!(
            "\tchain output {{\n\t\ttype filter hook output priority filter; policy accept;\n\t\toifname \"{i}\" icmp type redirect drop\n\t\toifname \"{i}\" icmpv6 type nd-redirect drop\n\t}}\n"
        ));
    }
    format!("table inet {NFT_TABLE} {{\n{chains}}}\n")
}

/// Runs `nft -f -` with `script` (the one runner `crate::policy` has).
fn nft(script: &str) -> anyhow::Result<()> {
    crate::policy::nft(script)
        .context("the masquerade of routed traffic (install nftables, or run with --snat false)")
}

/// Deletes our table if it exists (`destroy` needs nftables ≥ 1.0.8; older ones `delete`,
/// which fails quietly on a missing table).
fn delete_table() {
    let _ = nft(&format!("destroy table inet {NFT_TABLE}\n"))
        .or_else(|_| nft(&format!("delete table inet {NFT_TABLE}\n")));
}

fn write_record(state_dir: &Path, r: &Record) -> anyhow::Result<()> {
    use std::io::Write as _;
    let path = record_path(state_dir);
    let tmp = path.with_extension("json.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec(r)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn read_sysctl(path: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_owned())
}

fn undo(state_dir: &Path, r: &Record) -> Vec<String> {
    let mut done = Vec::new();
    if r.nft_table {
        delete_table();
        done.push(format!("nftables table inet {NFT_TABLE} deleted"));
    }
    for (path, old) in [(FORWARD_V4, &r.ipv4_forward), (FORWARD_V6, &r.ipv6_forward)] {
        if let Some(old) = old {
            match std::fs::write(path, old) {
                Ok(()) => done.push(format!("{path} restored to {old}")),
                Err(e) => tracing::warn!(%path, error = %e, "forwarding sysctl not restored"),
            }
        }
    }
    let _ = std::fs::remove_file(record_path(state_dir));
    done
}

/// Undoes what a killed run left (its record), and deletes a stray table of ours.
/// Returns what was done, for the log.
pub fn recover(state_dir: &Path) -> Vec<String> {
    let path = record_path(state_dir);
    let mut done = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) => undo(state_dir, &r),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable router record removed");
                let _ = std::fs::remove_file(&path);
                Vec::new()
            }
        },
        Err(_) => Vec::new(),
    };
    if done.is_empty() && which_nft() {
        // A table without a record (the record lost): ours by name.
        if nft(&format!("list table inet {NFT_TABLE}\n")).is_ok() {
            delete_table();
            done.push(format!("stray nftables table inet {NFT_TABLE} deleted"));
        }
    }
    done
}

/// A `forward` base chain of another table whose policy is drop, as `family table/chain`
/// (from `nft list ruleset`), if there is one: forwarded traffic may be dropped there.
pub fn forward_blocked() -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .ok()?;
    forward_drop_chain(&String::from_utf8_lossy(&out.stdout))
}

/// [`forward_blocked`]'s parser over `nft list ruleset` text: the first chain of a table
/// other than ours with `hook forward` and `policy drop`.
fn forward_drop_chain(ruleset: &str) -> Option<String> {
    let mut table = String::new();
    let mut chain = String::new();
    for line in ruleset.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix("table ") {
            table = t.trim_end_matches('{').trim().to_owned();
        } else if let Some(c) = line.strip_prefix("chain ") {
            chain = c.trim_end_matches('{').trim().to_owned();
        } else if line.contains("hook forward")
            && line.contains("policy drop")
            && table != format!("inet {NFT_TABLE}")
        {
            return Some(format!("{table}/{chain}"));
        }
    }
    None
}

fn which_nft() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The router's host changes, undone by [`Router::stop`] or on drop.
#[derive(Debug)]
pub struct Router {
    state_dir: PathBuf,
    record: Option<Record>,
}

impl Router {
    /// Turns forwarding on (recording the values before) and, with `snat`, installs the
    /// masquerade. A failure undoes what was done.
    pub fn start(state_dir: &Path, spec: &RouterSpec) -> anyhow::Result<Self> {
        let have_nft = which_nft();
        if spec.masquerades() && !have_nft {
            bail!("advertising routes with --snat true needs the `nft` binary: install nftables, or run with --snat false (then the LAN needs a route back to the mesh)");
        }
        // A concentrator without nft still forwards; only the redirects are not dropped.
        let table = spec.masquerades() || (spec.concentrator && have_nft);
        if spec.concentrator && !have_nft {
            tracing::warn!("no `nft` binary: the kernel's ICMP redirects to stock WireGuard clients are not dropped (install nftables)");
        }
        if spec.concentrator {
            if let Some(chain) = forward_blocked() {
                tracing::warn!(%chain, "this host's firewall drops forwarded packets by default: the concentrator's clients reach nobody until it accepts traffic in and out of {}", spec.interface);
            }
        }
        let mut record = Record::default();
        if spec.v4() {
            record.ipv4_forward = Some(read_sysctl(FORWARD_V4)?);
        }
        if spec.v6() {
            record.ipv6_forward = read_sysctl(FORWARD_V6).ok();
        }
        record.nft_table = table;
        write_record(state_dir, &record)?;
        // From here on, an error drops `me`, which undoes what was done.
        let me = Router {
            state_dir: state_dir.to_owned(),
            record: Some(record.clone()),
        };
        if record.ipv4_forward.is_some() {
            std::fs::write(FORWARD_V4, "1").with_context(|| format!("setting {FORWARD_V4}"))?;
        }
        if record.ipv6_forward.is_some() {
            std::fs::write(FORWARD_V6, "1").with_context(|| format!("setting {FORWARD_V6}"))?;
        }
        if table {
            delete_table();
            nft(&nft_script(spec)).context("installing the masquerade")?;
        }
        tracing::info!(interface = %spec.interface, routes = ?spec.routes, exit_node = spec.exit_node, snat = spec.snat, concentrator = spec.concentrator, "routing for the mesh: forwarding on");
        Ok(me)
    }

    /// Puts the host back.
    pub fn stop(&mut self) {
        if let Some(r) = self.record.take() {
            for line in undo(&self.state_dir, &r) {
                tracing::info!("{line}");
            }
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masquerade_covers_the_routes_or_everything_for_an_exit_node() {
        let spec = RouterSpec {
            interface: "tbr0".into(),
            routes: vec![
                "10.1.0.0/16".parse().unwrap(),
                "fd00:1::/64".parse().unwrap(),
            ],
            exit_node: false,
            snat: true,
            concentrator: false,
        };
        let s = nft_script(&spec);
        assert!(s.starts_with("table inet tabbify {"), "{s}");
        assert!(
            s.contains("iifname \"tbr0\" oifname != \"tbr0\" ip daddr { 10.1.0.0/16 } masquerade"),
            "{s}"
        );
        assert!(s.contains("ip6 daddr { fd00:1::/64 } masquerade"), "{s}");
        assert!(spec.v4() && spec.v6());
        let exit = RouterSpec {
            routes: vec![],
            exit_node: true,
            ..spec
        };
        let s = nft_script(&exit);
        assert!(
            s.contains("iifname \"tbr0\" oifname != \"tbr0\" masquerade"),
            "{s}"
        );
        assert!(!s.contains("daddr"), "{s}");
    }

    #[test]
    fn a_record_round_trips_and_an_unreadable_one_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let r = Record {
            ipv4_forward: Some("0".into()),
            ipv6_forward: None,
            nft_table: false,
        };
        write_record(d.path(), &r).unwrap();
        let back: Record =
            serde_json::from_slice(&std::fs::read(record_path(d.path())).unwrap()).unwrap();
        assert_eq!(back, r);
        std::fs::write(record_path(d.path()), b"{not json").unwrap();
        let _ = recover(d.path());
        assert!(!record_path(d.path()).exists());
    }

    /// A concentrator forwards TUN to TUN without masquerading (members must see the
    /// client's own address) and drops the redirects such a forward provokes; with routes
    /// too, only the routes are masqueraded.
    #[test]
    fn a_concentrator_forwards_both_families_and_masquerades_nothing_of_its_own() {
        let spec = RouterSpec {
            interface: "tbr0".into(),
            routes: vec![],
            exit_node: false,
            snat: true,
            concentrator: true,
        };
        assert!(spec.v4() && spec.v6() && !spec.masquerades());
        let s = nft_script(&spec);
        assert!(
            !s.contains("masquerade") && !s.contains("postrouting"),
            "{s}"
        );
        assert!(
            s.contains("oifname \"tbr0\" icmp type redirect drop"),
            "{s}"
        );
        assert!(
            s.contains("oifname \"tbr0\" icmpv6 type nd-redirect drop"),
            "{s}"
        );
        let both = RouterSpec {
            routes: vec!["10.1.0.0/16".parse().unwrap()],
            ..spec
        };
        let s = nft_script(&both);
        assert!(
            s.contains("ip daddr { 10.1.0.0/16 } masquerade") && s.contains("chain output"),
            "{s}"
        );
    }

    #[test]
    fn a_forward_chain_with_policy_drop_is_found_in_other_tables_only() {
        let docker = "table ip filter {\n\tchain FORWARD {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n";
        assert_eq!(
            forward_drop_chain(docker).as_deref(),
            Some("ip filter/FORWARD")
        );
        let open = "table inet fw {\n\tchain fwd {\n\t\ttype filter hook forward priority filter; policy accept;\n\t}\n}\n";
        assert_eq!(forward_drop_chain(open), None);
        let ours = "table inet tabbify {\n\tchain f {\n\t\ttype filter hook forward priority 0; policy drop;\n\t}\n}\n";
        assert_eq!(forward_drop_chain(ours), None);
        assert_eq!(forward_drop_chain(""), None);
    }
}
