//! A "public" LAN: a namespace holding a bridge that other namespaces plug into by veth,
//! standing in for the network the coordinator and the non-NATed hosts share.
//!
//! Layout: the bridge `br0` lives in the LAN's own namespace and carries its first address
//! ([`Lan::addr`], `10.200.0.1/24`), so a service started in that namespace (the
//! coordinator) is reachable from every attached host. [`Lan::attach`] adds a veth whose
//! host end gets the next free address of the /24 and whose other end is a bridge port.
//!
//! Invariants: the bridge's MAC address is fixed, so attaching a host never changes it;
//! the LAN is IPv4 only; addresses are handed out once per [`Lan`]; interface
//! names are unique within each namespace they live in (the bridge ports count up, the
//! host end is `lan<N>`), and every link and the bridge go away with their namespaces,
//! which are deleted when the last handle drops, also when a test panics (see
//! [`Netns`]).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::veth::create_pair;

/// Name of the bridge inside the LAN namespace.
const BRIDGE: &str = "br0";

/// The bridge's own MAC address (locally administered).
const BRIDGE_MAC: &str = "02:00:0a:c8:00:01";

/// A bridged IPv4 /24 in its own namespace.
#[derive(Clone)]
pub struct Lan {
    netns: Netns,
    /// Host numbers handed out so far (the bridge itself is `.1`).
    next_host: Arc<AtomicU8>,
}

/// One host's link into a [`Lan`].
#[derive(Debug, Clone)]
pub struct LanPort {
    /// The host's namespace.
    pub netns: Netns,
    /// The interface name inside the host's namespace.
    pub ifname: String,
    /// The host's address on the LAN (prefix length 24).
    pub addr: Ipv4Addr,
}

impl Lan {
    /// The /24 every LAN uses (each LAN is its own namespace, so they never clash).
    pub const PREFIX: [u8; 3] = [10, 200, 0];

    /// Creates the namespace and the bridge, with [`Lan::addr`] on the bridge.
    pub fn new() -> Result<Lan> {
        let netns = Netns::new()?;
        // A fixed address: a bridge without one takes the lowest address among its ports,
        // so plugging in a host could change it under hosts that already cached the old one
        // in their ARP tables, and their frames would be dropped until the entries expire.
        netns
            .ip(&[
                "link",
                "add",
                BRIDGE,
                "address",
                BRIDGE_MAC,
                "type",
                "bridge",
                "forward_delay",
                "0",
            ])
            .context("creating the LAN bridge")?;
        let lan = Lan {
            netns,
            next_host: Arc::new(AtomicU8::new(2)),
        };
        lan.netns
            .ip(&["addr", "add", &format!("{}/24", lan.addr()), "dev", BRIDGE])?;
        lan.netns.ip(&["link", "set", "dev", BRIDGE, "up"])?;
        Ok(lan)
    }

    /// The LAN's namespace (where the bridge is).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The bridge's own address: services run in [`Lan::netns`] listen here.
    pub fn addr(&self) -> Ipv4Addr {
        let [a, b, c] = Lan::PREFIX;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Plugs `host` into the LAN: a veth whose host end gets the next free address and is
    /// up, and whose other end is a bridge port. Returns once the host reaches the bridge
    /// address.
    pub fn attach(&self, host: &Netns) -> Result<LanPort> {
        let number = self.next_host.fetch_add(1, Ordering::Relaxed);
        if number == 0 || number == 255 {
            bail!("the LAN has no free address left");
        }
        let [a, b, c] = Lan::PREFIX;
        let addr = Ipv4Addr::new(a, b, c, number);
        let port = format!("port{number}");
        let ifname = format!("lan{number}");
        create_pair(host, &ifname, &self.netns, &port)?;
        self.netns
            .ip(&["link", "set", "dev", &port, "master", BRIDGE, "up"])
            .with_context(|| format!("adding {port} to the LAN bridge"))?;
        host.ip(&["addr", "add", &format!("{addr}/24"), "dev", &ifname])?;
        host.ip(&["link", "set", "dev", &ifname, "up"])?;
        crate::traffic::wait_ping(host, self.addr().into(), std::time::Duration::from_secs(10))
            .with_context(|| format!("{} cannot reach the LAN bridge", host.name()))?;
        Ok(LanPort {
            netns: host.clone(),
            ifname,
            addr,
        })
    }
}

impl std::fmt::Debug for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lan")
            .field("netns", &self.netns)
            .field("addr", &self.addr())
            .finish()
    }
}
