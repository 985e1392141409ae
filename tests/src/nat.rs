//! A home-router NAT: a router namespace between a private LAN (one host) and a [`Lan`],
//! masquerading the host's traffic behind the router's LAN address.
//!
//! ```text
//!  host ns                  router ns                              public LAN ns
//!  nat0 192.168.N.2/24 ── nat0 192.168.N.1/24   lanM 10.200.0.M/24 ── br0 (10.200.0.1)
//!  default via .1          forwarding, nftables masquerade on lanM
//! ```
//!
//! The nftables table `tbt_nat` in the router namespace:
//! * `postrouting`: masquerade everything leaving by the WAN link (Linux keeps the source
//!   port when it is free, so a host's UDP port 51820 shows up as ROUTER:51820: an
//!   endpoint-independent, port-preserving mapping, the kind hole punching is made for);
//! * `input` and `forward`: drop new connections arriving on the WAN link. Replies to the
//!   host's own traffic are de-NATed in prerouting and pass. Dropping in `input` also keeps
//!   an unsolicited probe (the other side's first hole-punching packet, when it arrives
//!   before the host has sent anything) from leaving a conntrack entry behind: the entry is
//!   only confirmed when the packet survives the input hooks, and a confirmed one would
//!   force the host's later mapping onto another port.
//!
//! Invariants: the private /24 is `192.168.N.0/24` with N unique per process (100, 101, …)
//! so two NATs of one test differ; everything lives in the namespaces given or created
//! here and goes away with them.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Context, Result};

use crate::lan::{Lan, LanPort};
use crate::netns::Netns;
use crate::veth::create_pair;

/// Name of both ends of the private link.
const PRIVATE_IF: &str = "nat0";

/// A router masquerading one private host onto a [`Lan`].
#[derive(Debug, Clone)]
pub struct NatRouter {
    /// The router's namespace.
    pub netns: Netns,
    /// The router's link into the public LAN; its address is the NAT's public address.
    pub wan: LanPort,
    /// The namespace of the host behind the NAT.
    pub host: Netns,
    /// The host's private address.
    pub host_addr: Ipv4Addr,
    /// The router's private address (the host's default gateway).
    pub gateway: Ipv4Addr,
}

impl NatRouter {
    /// Creates a router namespace attached to `lan`, links it to `host` over a private
    /// /24, routes the host's traffic through it and installs the NAT rules. Returns once
    /// the host reaches the LAN's bridge address through the NAT.
    pub fn new(lan: &Lan, host: &Netns) -> Result<NatRouter> {
        static SUBNET: AtomicU8 = AtomicU8::new(100);
        let subnet = SUBNET.fetch_add(1, Ordering::Relaxed);
        let router = Netns::new()?;
        let wan = lan.attach(&router)?;
        let gateway = Ipv4Addr::new(192, 168, subnet, 1);
        let host_addr = Ipv4Addr::new(192, 168, subnet, 2);
        create_pair(&router, PRIVATE_IF, host, PRIVATE_IF)?;
        for (ns, addr) in [(&router, gateway), (host, host_addr)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", PRIVATE_IF])?;
            ns.ip(&["link", "set", "dev", PRIVATE_IF, "up"])?;
        }
        host.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        router.write_sysfs("/proc/sys/net/ipv4/ip_forward", "1")?;

        let rules = format!(
            "table ip tbt_nat {{\n\
             \x20 chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   oifname \"{wan}\" masquerade\n\
             \x20 }}\n\
             \x20 chain input {{\n\
             \x20   type filter hook input priority filter; policy accept;\n\
             \x20   iifname \"{wan}\" ct state new counter drop\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             \x20   iifname \"{wan}\" ct state new counter drop\n\
             \x20 }}\n\
             }}\n",
            wan = wan.ifname
        );
        let path = router.workdir().join("nat.nft");
        std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
        let path = path.to_str().context("non-UTF-8 work directory")?;
        router
            .run("nft", &["-f", path])
            .context("installing the NAT rules")?;

        crate::traffic::wait_ping(host, lan.addr().into(), std::time::Duration::from_secs(10))
            .with_context(|| format!("{} cannot reach the LAN through its NAT", host.name()))?;
        Ok(NatRouter {
            netns: router,
            wan,
            host: host.clone(),
            host_addr,
            gateway,
        })
    }

    /// The NAT's public address: what the LAN sees as the source of the host's traffic.
    pub fn public_addr(&self) -> Ipv4Addr {
        self.wan.addr
    }

    /// The router's NAT rules with their drop counters and, where the kernel exposes
    /// `/proc/net/nf_conntrack`, its connection tracking table: for failure messages.
    pub fn describe(&self) -> String {
        let rules = self
            .netns
            .run("nft", &["list", "table", "ip", "tbt_nat"])
            .unwrap_or_else(|error| format!("<nft list failed: {error:#}>"));
        let conntrack = self
            .netns
            .run("cat", &["/proc/net/nf_conntrack"])
            .unwrap_or_else(|_| "<no /proc/net/nf_conntrack>".to_owned());
        format!(
            "NAT {} (public {}):\n{rules}\nconntrack:\n{conntrack}",
            self.netns.name(),
            self.public_addr()
        )
    }
}
