//! The two-node scenario most tests need: two namespaces over a veth, one WireGuard
//! endpoint in each, configured as each other's only peer.
//!
//! Inner addresses are host routes only (`/32`, `/128`), so the only way to the other side
//! is the route the endpoint sets up for the peer's AllowedIPs. IPv6 inner addresses are
//! mesh-style ULAs `fd5a:1f00:xxxx:xxxx:xxxx::1`. Only the left side is given the right
//! side's endpoint; the right side learns the left's from the handshake, as a responder
//! behind NAT would.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use rand::Rng;

use crate::traffic::{tcp_transfer, wait_ping};
use crate::veth::{VethOptions, VethPair};
use crate::wg::{
    generate_psk, Implementation, InterfaceConfig, Keypair, PortRules, WgPeer, WgPeerConfig,
};
use crate::Netns;

/// Tunnel MTU used by every scenario (the mesh default).
pub const MTU: u16 = 1420;

/// Which inner address families the tunnel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// IPv4 only.
    V4,
    /// IPv6 ULAs only.
    V6,
    /// Both; IPv6 listed first.
    Dual,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct TunnelSpec {
    /// Implementation in the left namespace (the initiator).
    pub left: Implementation,
    /// Implementation in the right namespace.
    pub right: Implementation,
    /// Inner address families.
    pub inner: Inner,
    /// Whether the outer (underlay) endpoint is IPv6.
    pub outer_v6: bool,
    /// Use a preshared key.
    pub psk: bool,
    /// PersistentKeepalive on the left side.
    pub keepalive: Option<u16>,
    /// Random loss in percent on both veth ends, set before the endpoints start.
    pub loss_percent: Option<u8>,
    /// Tunnel MTU.
    pub mtu: u16,
    /// Port rules the left endpoint applies to the right (ours only).
    pub left_ports: PortRules,
    /// Port rules the right endpoint applies to the left (ours only).
    pub right_ports: PortRules,
}

impl TunnelSpec {
    /// A spec with IPv6 inner, IPv4 outer, no PSK, no keepalive, no impairment.
    pub fn new(left: Implementation, right: Implementation) -> TunnelSpec {
        TunnelSpec {
            left,
            right,
            inner: Inner::V6,
            outer_v6: false,
            psk: false,
            keepalive: None,
            loss_percent: None,
            mtu: MTU,
            left_ports: PortRules::default(),
            right_ports: PortRules::default(),
        }
    }
}

/// A running two-node tunnel.
pub struct Tunnel {
    /// The left endpoint (knows the right's underlay endpoint).
    pub left: WgPeer,
    /// The right endpoint.
    pub right: WgPeer,
    /// The underlay link.
    pub veth: VethPair,
    /// Inner addresses of the left endpoint.
    pub left_inner: Vec<IpAddr>,
    /// Inner addresses of the right endpoint.
    pub right_inner: Vec<IpAddr>,
}

/// Listen port of both endpoints (each is in its own namespace).
const PORT: u16 = 51820;

impl Tunnel {
    /// Builds namespaces, link and both endpoints; returns once both answer `wg show`
    /// (no traffic has flowed yet: see [`Tunnel::wait_ready`]).
    pub fn start(spec: &TunnelSpec) -> Result<Tunnel> {
        let left_ns = Netns::new()?;
        let right_ns = Netns::new()?;
        Tunnel::start_in(spec, &left_ns, &right_ns, &VethOptions::default())
    }

    /// Like [`Tunnel::start`] with caller-made namespaces and link options.
    pub fn start_in(
        spec: &TunnelSpec,
        left_ns: &Netns,
        right_ns: &Netns,
        veth: &VethOptions,
    ) -> Result<Tunnel> {
        let veth = VethPair::connect(left_ns, right_ns, veth)?;
        Tunnel::start_on(spec, &veth)
    }

    /// Like [`Tunnel::start`] over an existing link: the left endpoint runs in
    /// `veth.a`'s namespace, the right one in `veth.b`'s. Several tunnels may use one
    /// link one after another (interface names are unique).
    pub fn start_on(spec: &TunnelSpec, veth: &VethPair) -> Result<Tunnel> {
        let veth = veth.clone();
        let (left_ns, right_ns) = (&veth.a.netns.clone(), &veth.b.netns.clone());
        if let Some(percent) = spec.loss_percent {
            veth.set_loss(percent)?;
        }
        let (left_key, right_key) = (Keypair::generate()?, Keypair::generate()?);
        let psk = spec.psk.then(generate_psk).transpose()?;
        let left_inner = inner_addresses(spec.inner, 1);
        let right_inner = inner_addresses(spec.inner, 2);

        let right_endpoint = SocketAddr::new(veth.b.addr(spec.outer_v6), PORT);
        let left = WgPeer::start(
            left_ns,
            &spec.left,
            &interface(&left_key, &left_inner, spec.mtu),
            &[WgPeerConfig {
                public_key: right_key.public.clone(),
                preshared_key: psk.clone(),
                allowed_ips: host_prefixes(&right_inner),
                endpoint: Some(right_endpoint),
                persistent_keepalive: spec.keepalive,
                ports: spec.left_ports.clone(),
            }],
        )
        .context("starting the left endpoint")?;
        let right = WgPeer::start(
            right_ns,
            &spec.right,
            &interface(&right_key, &right_inner, spec.mtu),
            &[WgPeerConfig {
                public_key: left_key.public.clone(),
                preshared_key: psk,
                allowed_ips: host_prefixes(&left_inner),
                endpoint: None,
                persistent_keepalive: None,
                ports: spec.right_ports.clone(),
            }],
        )
        .context("starting the right endpoint")?;
        Ok(Tunnel {
            left,
            right,
            veth,
            left_inner,
            right_inner,
        })
    }

    /// Pings the right side's first inner address from the left until a reply comes
    /// back, then waits until both sides report the handshake.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        wait_ping(self.left.netns(), self.right_inner[0], timeout)?;
        self.left.wait_handshake(self.right.public_key(), timeout)?;
        self.right.wait_handshake(self.left.public_key(), timeout)?;
        Ok(())
    }

    /// The standard workout: ping every inner address in both directions, send `bytes`
    /// over TCP each way on the first inner address (1 MiB on any other) checked by
    /// SHA-256, then check that `wg show` on both sides lists the peer with a handshake,
    /// an endpoint and at least `bytes` transferred each way. Each transfer must finish
    /// within `timeout`.
    pub fn exercise(&self, xfer: &Path, bytes: u64, timeout: Duration) -> Result<()> {
        self.wait_ready(Duration::from_secs(30))?;
        let sides = [
            (&self.left, &self.right, &self.right_inner),
            (&self.right, &self.left, &self.left_inner),
        ];
        for (from, to, addresses) in sides {
            for (index, &addr) in addresses.iter().enumerate() {
                wait_ping(from.netns(), addr, Duration::from_secs(30))
                    .with_context(|| format!("{} → {}", from.ifname(), to.ifname()))?;
                let size = if index == 0 { bytes } else { 1 << 20 };
                tcp_transfer(xfer, from.netns(), to.netns(), addr, size, timeout).with_context(
                    || {
                        format!(
                            "TCP {} → {addr} ({} → {})",
                            from.ifname(),
                            from.implementation().label(),
                            to.implementation().label()
                        )
                    },
                )?;
            }
        }
        for (side, other) in [(&self.left, &self.right), (&self.right, &self.left)] {
            let dump = side.dump()?;
            let peer = dump
                .peer(other.public_key())
                .with_context(|| format!("{} does not list its peer: {dump:?}", side.ifname()))?;
            ensure!(
                peer.latest_handshake > 0,
                "{}: no handshake in wg show: {peer:?}",
                side.ifname()
            );
            ensure!(
                peer.rx_bytes >= bytes && peer.tx_bytes >= bytes,
                "{}: wg show counts rx {} / tx {} bytes after {bytes} each way",
                side.ifname(),
                peer.rx_bytes,
                peer.tx_bytes
            );
            ensure!(
                peer.endpoint.is_some(),
                "{}: no endpoint for the peer: {peer:?}",
                side.ifname()
            );
        }
        Ok(())
    }

    /// Stops both endpoints (checking our clean-exit contract where it applies).
    pub fn stop(self) -> Result<()> {
        let left = self.left.stop().context("stopping the left endpoint");
        let right = self.right.stop().context("stopping the right endpoint");
        left?;
        right?;
        Ok(())
    }
}

fn interface(keypair: &Keypair, addresses: &[IpAddr], mtu: u16) -> InterfaceConfig {
    InterfaceConfig {
        keypair: keypair.clone(),
        listen_port: PORT,
        addresses: host_prefixes(addresses),
        mtu,
    }
}

/// `addr/32` or `addr/128` for each address.
pub fn host_prefixes(addresses: &[IpAddr]) -> Vec<String> {
    addresses
        .iter()
        .map(|addr| match addr {
            IpAddr::V4(v4) => format!("{v4}/32"),
            IpAddr::V6(v6) => format!("{v6}/128"),
        })
        .collect()
}

/// Inner addresses for host number `host` (1 or 2).
fn inner_addresses(inner: Inner, host: u8) -> Vec<IpAddr> {
    let v4 = IpAddr::V4(Ipv4Addr::new(10, 99, 0, host));
    let v6 = IpAddr::V6(peer_ula());
    match inner {
        Inner::V4 => vec![v4],
        Inner::V6 => vec![v6],
        Inner::Dual => vec![v6, v4],
    }
}

/// A random mesh peer ULA, `fd5a:1f00:xxxx:xxxx:xxxx::1`.
pub fn peer_ula() -> Ipv6Addr {
    let mut rng = rand::thread_rng();
    Ipv6Addr::new(0xfd5a, 0x1f00, rng.gen(), rng.gen(), rng.gen(), 0, 0, 1)
}
