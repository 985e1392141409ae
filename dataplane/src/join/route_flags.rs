//! `join`'s route flags (issue 15), parsed once into [`super::logic::routes::Settings`].

use clap::ArgAction;

use super::logic::routes::{parse_advertised, ExitChoice, Settings};

/// Subnet router, exit node and route acceptance flags of `join`.
#[derive(Clone, Debug, clap::Args)]
pub struct RouteFlags {
    /// Offer these prefixes to the mesh as a subnet router (comma list or repeated;
    /// canonical, e.g. 10.1.0.0/16,fd00:1::/64). The policy's `routes` or an admin
    /// approves them; this host then forwards (and with --snat, masquerades) for the
    /// members the policy allows.
    #[arg(long, value_name = "PREFIX[,PREFIX…]")]
    pub advertise_routes: Vec<String>,
    /// Offer this node as an exit node (0.0.0.0/0 and ::/0), subject to approval.
    #[arg(long)]
    pub advertise_exit_node: bool,
    /// Send the default routes (IPv4 and IPv6) through this member (display name or peer
    /// id), or `off`. Mesh traffic and the underlay paths to peers, relays and the
    /// coordinator stay direct; until that member is present, traffic for the internet is
    /// refused (ICMP unreachable), never sent around it.
    #[arg(long, value_name = "NAME|PEER_ID|off", default_value = "off")]
    pub exit_node: String,
    /// Masquerade traffic forwarded from the mesh (a subnet router or exit node), so the
    /// LAN needs no route back to the mesh.
    #[arg(long, value_name = "true|false", default_value_t = true, action = ArgAction::Set)]
    pub snat: bool,
    /// Install the routes other members offer (and this node may use).
    #[arg(long, value_name = "true|false", default_value_t = true, action = ArgAction::Set)]
    pub accept_routes: bool,
    /// Serve stock WireGuard clients (phones, laptops with the WireGuard app) minted for
    /// this member with `tabbify-mesh-coordinator client add`: they dial in on this node's
    /// port, and this host forwards (IP forwarding on, no masquerade) between them and the
    /// members the policy lets them reach.
    #[arg(long)]
    pub concentrator: bool,
}

impl RouteFlags {
    /// The validated settings (a bad prefix names the flag and the prefix).
    pub fn settings(&self) -> Result<Settings, String> {
        Ok(Settings {
            advertised: parse_advertised(&self.advertise_routes)?,
            advertise_exit_node: self.advertise_exit_node,
            exit_node: ExitChoice::parse(&self.exit_node)?,
            accept_routes: self.accept_routes,
            concentrator: self.concentrator,
        })
    }
}
