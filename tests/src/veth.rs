//! A veth link between two namespaces: the underlay that WireGuard endpoints talk over.
//!
//! Each pair gets its own IPv4 /24 and IPv6 /64 (IPv6 added with `nodad`, so usable at
//! once), both ends up, and RPS on both receive queues: without it a single-queue veth
//! handles every received packet on the sending CPU and a fast receiver starves. Random
//! loss on both ends ([`VethPair::set_loss`]) stands in for a lossy network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use crate::netns::{run_checked, Netns};

/// How to build a [`VethPair`].
#[derive(Debug, Clone)]
pub struct VethOptions {
    /// Spread receive processing over all CPUs (RPS) on both ends.
    pub rps: bool,
    /// Link MTU; the kernel default (1500) when `None`.
    pub mtu: Option<u32>,
}

impl Default for VethOptions {
    fn default() -> Self {
        VethOptions {
            rps: true,
            mtu: None,
        }
    }
}

/// One end of a veth pair.
#[derive(Debug, Clone)]
pub struct VethEnd {
    /// The namespace this end lives in.
    pub netns: Netns,
    /// The interface name inside that namespace.
    pub ifname: String,
    /// Its IPv4 underlay address (prefix length 24).
    pub v4: Ipv4Addr,
    /// Its IPv6 underlay address (prefix length 64).
    pub v6: Ipv6Addr,
}

impl VethEnd {
    /// The underlay address of the given family.
    pub fn addr(&self, ipv6: bool) -> IpAddr {
        if ipv6 {
            IpAddr::V6(self.v6)
        } else {
            IpAddr::V4(self.v4)
        }
    }
}

/// A veth pair between namespaces `a` and `b`, with addresses on both ends. Clones refer
/// to the same link, which lives as long as its namespaces.
#[derive(Debug, Clone)]
pub struct VethPair {
    /// The end in the first namespace.
    pub a: VethEnd,
    /// The end in the second namespace.
    pub b: VethEnd,
}

impl VethPair {
    /// Creates the pair, assigns addresses, brings both ends up and applies `options`.
    pub fn connect(a: &Netns, b: &Netns, options: &VethOptions) -> Result<VethPair> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let index = COUNTER.fetch_add(1, Ordering::Relaxed);
        let subnet = u8::try_from(index % 250).unwrap_or(0);
        let (if_a, if_b) = (format!("veth{index}a"), format!("veth{index}b"));
        create_pair(a, &if_a, b, &if_b)?;

        let end = |netns: &Netns, ifname: String, host: u8| VethEnd {
            netns: netns.clone(),
            ifname,
            v4: Ipv4Addr::new(10, 77, subnet, host),
            v6: Ipv6Addr::new(0xfd77, 0, 0, u16::from(subnet), 0, 0, 0, u16::from(host)),
        };
        let pair = VethPair {
            a: end(a, if_a, 1),
            b: end(b, if_b, 2),
        };
        let mask = all_cpus_mask();
        for end in [&pair.a, &pair.b] {
            let ns = &end.netns;
            // No duplicate address detection at all, not even for the link-local address:
            // neighbour discovery would otherwise wait for it (about a second).
            ns.write_sysfs(
                &format!("/proc/sys/net/ipv6/conf/{}/accept_dad", end.ifname),
                "0",
            )?;
            ns.ip(&["addr", "add", &format!("{}/24", end.v4), "dev", &end.ifname])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", end.v6),
                "dev",
                &end.ifname,
                "nodad",
            ])?;
            if let Some(mtu) = options.mtu {
                ns.ip(&["link", "set", "dev", &end.ifname, "mtu", &mtu.to_string()])?;
            }
            ns.ip(&["link", "set", "dev", &end.ifname, "up"])?;
            if options.rps {
                ns.write_sysfs(
                    &format!("/sys/class/net/{}/queues/rx-0/rps_cpus", end.ifname),
                    &mask,
                )?;
            }
        }
        // IPv6 neighbour discovery over a fresh veth loses its first solicitation (the
        // reply comes after the one-second retransmission): settle both families now so
        // that callers start from a link that answers at once.
        for ipv6 in [false, true] {
            crate::traffic::wait_ping(a, pair.b.addr(ipv6), std::time::Duration::from_secs(10))
                .context("the new veth link does not carry traffic")?;
        }
        Ok(pair)
    }

    /// Drops `percent`% of the packets leaving each end, independently at random, so both
    /// directions are impaired. Uses `tc qdisc … netem loss P%` where the kernel has
    /// netem; kernels built without it (`CONFIG_NET_SCH_NETEM` unset, as on the CI VMs)
    /// get the same random loss from an nftables netdev egress hook
    /// (`numgen random mod 100 < P drop`). Returns the method used.
    pub fn set_loss(&self, percent: u8) -> Result<LossMethod> {
        anyhow::ensure!(
            (1..=100).contains(&percent),
            "loss must be 1–100%, got {percent}%"
        );
        let loss = format!("{percent}%");
        match self.set_netem(&["loss", &loss]) {
            Ok(()) => return Ok(LossMethod::Netem),
            Err(error) if format!("{error:#}").contains("qdisc kind is unknown") => {}
            Err(error) => return Err(error),
        }
        let verdict = if percent == 100 {
            "counter drop".to_owned()
        } else {
            format!("numgen random mod 100 < {percent} counter drop")
        };
        for end in [&self.a, &self.b] {
            let rules = format!(
                "table netdev tbt_loss {{\n  chain egress_{ifname} {{\n    \
                 type filter hook egress device \"{ifname}\" priority 0;\n    \
                 {verdict}\n  }}\n}}\n",
                ifname = end.ifname
            );
            let path = end.netns.workdir().join(format!("loss-{}.nft", end.ifname));
            std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
            let path = path.to_str().context("non-UTF-8 work directory")?;
            end.netns
                .run("nft", &["-f", path])
                .with_context(|| format!("installing the nftables loss rule on {}", end.ifname))?;
        }
        Ok(LossMethod::Nftables)
    }

    /// Removes impairment set by [`VethPair::set_loss`] or [`VethPair::set_netem`].
    pub fn clear_loss(&self) -> Result<()> {
        for end in [&self.a, &self.b] {
            let ns = end.netns.name();
            // Either may be absent: only one method was used.
            let _ = run_checked(std::process::Command::new("tc").args([
                "-n",
                ns,
                "qdisc",
                "del",
                "dev",
                &end.ifname,
                "root",
            ]));
            let _ = end
                .netns
                .run("nft", &["delete", "table", "netdev", "tbt_loss"]);
        }
        Ok(())
    }

    /// Packets dropped so far by [`VethPair::set_loss`] on both ends together (from the
    /// nftables counters or the netem qdisc statistics).
    pub fn loss_drops(&self) -> Result<u64> {
        let mut total = 0;
        for end in [&self.a, &self.b] {
            let nft = end
                .netns
                .run("nft", &["list", "table", "netdev", "tbt_loss"])
                .unwrap_or_default();
            let tc = run_checked(std::process::Command::new("tc").args([
                "-n",
                end.netns.name(),
                "-s",
                "qdisc",
                "show",
                "dev",
                &end.ifname,
            ]))?;
            total += number_after(&nft, "packets")
                + if tc.contains("netem") {
                    number_after(&tc, "dropped")
                } else {
                    0
                };
        }
        Ok(total)
    }

    /// Applies `tc netem ARGS` (e.g. `["delay", "5ms"]`) to the egress of both ends.
    /// Fails on kernels without netem; [`VethPair::set_loss`] works on those too.
    pub fn set_netem(&self, args: &[&str]) -> Result<()> {
        for end in [&self.a, &self.b] {
            let mut command = std::process::Command::new("tc");
            command
                .args([
                    "-n",
                    end.netns.name(),
                    "qdisc",
                    "replace",
                    "dev",
                    &end.ifname,
                    "root",
                    "netem",
                ])
                .args(args);
            run_checked(&mut command)
                .with_context(|| format!("setting netem {args:?} on {}", end.ifname))?;
        }
        Ok(())
    }
}

/// Creates a veth link with end `a_if` in namespace `a` and end `b_if` in `b`, both down
/// and without addresses. Names need only be unique inside their own namespace: the link
/// is created directly in its namespaces, never in the caller's.
pub(crate) fn create_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    run_checked(std::process::Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]))
    .map(drop)
    .with_context(|| {
        format!(
            "creating veth {a_if}/{b_if} between {} and {}",
            a.name(),
            b.name()
        )
    })
}

/// How [`VethPair::set_loss`] impairs the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossMethod {
    /// `tc qdisc … netem loss`.
    Netem,
    /// An nftables netdev egress rule dropping at random.
    Nftables,
}

/// The number following the first occurrence of `word` (0 when there is none).
fn number_after(text: &str, word: &str) -> u64 {
    let mut tokens = text.split(|c: char| c.is_whitespace() || c == ',' || c == '(');
    while let Some(token) = tokens.next() {
        if token == word {
            return tokens
                .find(|t| !t.is_empty())
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

/// The `rps_cpus` mask selecting every CPU this process may run on, in the kernel's
/// format (hex, comma every 32 bits).
fn all_cpus_mask() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut words: Vec<String> = Vec::new();
    let mut left = cpus;
    while left > 0 {
        let bits = left.min(32);
        let word: u64 = (1u64 << bits) - 1;
        words.push(format!("{word:x}"));
        left -= bits;
    }
    words.reverse();
    words.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_drop_counters() {
        assert_eq!(
            number_after(
                "numgen random mod 100 < 10 counter packets 17 bytes 2040 drop",
                "packets"
            ),
            17
        );
        assert_eq!(
            number_after(" Sent 1 bytes 2 pkt (dropped 5, overlimits 0", "dropped"),
            5
        );
        assert_eq!(number_after("nothing here", "packets"), 0);
    }

    #[test]
    fn mask_covers_every_cpu() {
        let mask = all_cpus_mask();
        let cpus = std::thread::available_parallelism().unwrap().get();
        let ones: u32 = mask
            .split(',')
            .map(|word| u32::from_str_radix(word, 16).unwrap().count_ones())
            .sum();
        assert_eq!(ones as usize, cpus);
    }
}
