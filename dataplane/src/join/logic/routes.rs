//! Subnet routes and exit nodes, sans IO (issue 15): which peer carries which routed
//! prefix, which kernel routes go on the TUN, and which peers may route through us.
//!
//! Inputs: every visible peer's [`Offer`] (from its roster entry: mesh IPv4, the approved
//! routes this node may use through it, whether it is an exit node this node may use, and
//! `may_use` — which of *our* routes it may use through us), this node's [`Settings`]
//! (flags), its underlay addresses, and which peers answer on the data plane
//! ([`Liveness`], fed by the shell from the engine's receive times, with `now`).
//! Output: a [`Plan`], a pure function of those.
//!
//! What the coordinator says is checked, as for the rest of the roster:
//! * a peer's IPv4 outside `100.64.0.0/10` is ignored;
//! * an offered prefix that is not canonical, overlaps the mesh (`fd5a:1f00::/24`,
//!   `100.64.0.0/10`), loopback, link-local or multicast space, or contains one of this
//!   node's underlay addresses (it would capture the path to the coordinator and peers), is
//!   refused ([`Plan::refused`]);
//! * the default routes are taken only from the peer named by `--exit-node`, and only when
//!   its entry says it is an exit node;
//! * a `may_use` prefix counts only inside a route this node advertises (the coordinator
//!   cannot open our LAN wider than we offered it).
//!
//! The default routes never enter the engine as `0.0.0.0/0` / `::/0`: they are split into
//! the prefixes that cover everything *but* the mesh ([`exit_prefixes`]), so neither an
//! exit node (as a source) nor a peer using ours (as a destination) can claim a mesh
//! address through the default route.
//!
//! Failover: a prefix offered by several peers goes to one primary, chosen
//! deterministically: the peers with a live data path first, then the lowest peer id. A
//! peer is live when the engine received from it within [`DEAD_AFTER`]; the shell probes
//! every peer that shares a prefix every [`PROBE_EVERY`] (a ping inside the session, which
//! the peer answers), so a dead primary loses its prefixes within `DEAD_AFTER` plus one
//! tick of the shell, under the 2 s the issue asks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::core::filter::{Proto, ProtoRanges};
use crate::core::net::IpNet;

/// A peer that shares a prefix with others is probed this often.
pub const PROBE_EVERY: Duration = Duration::from_millis(400);
/// A peer heard from longer ago than this is not live (three probes unanswered).
pub const DEAD_AFTER: Duration = Duration::from_millis(1300);

/// The mesh IPv4 space (CGNAT, as Tailscale).
pub fn mesh_v4() -> IpNet {
    net(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), 10)
}

/// The mesh's IPv6 space (peer and app ULAs and services): `fd5a:1f00::/24`.
pub fn mesh_v6() -> IpNet {
    net(
        IpAddr::V6(Ipv6Addr::new(0xfd5a, 0x1f00, 0, 0, 0, 0, 0, 0)),
        24,
    )
}

fn net(addr: IpAddr, len: u8) -> IpNet {
    IpNet::new(addr, len).map_or_else(|| IpNet::host(addr), |n| n.network())
}

/// `0.0.0.0/0`.
pub fn default_v4() -> IpNet {
    net(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

/// `::/0`.
pub fn default_v6() -> IpNet {
    net(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
}

/// Whether `n` is one of the two default routes.
pub fn is_default(n: &IpNet) -> bool {
    n.prefix_len() == 0
}

/// Whether two prefixes share an address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.addr().is_ipv4() == b.addr().is_ipv4()
        && (a.contains(b.network().addr()) || b.contains(a.network().addr()))
}

/// Whether `outer` contains all of `inner`.
pub fn covers(outer: &IpNet, inner: &IpNet) -> bool {
    outer.addr().is_ipv4() == inner.addr().is_ipv4()
        && outer.prefix_len() <= inner.prefix_len()
        && outer.contains(inner.network().addr())
}

/// The prefixes that make up the whole of `hole`'s family except `hole` (one per bit of
/// its length: the sibling of each of its ancestors).
fn complement(hole: &IpNet) -> Vec<IpNet> {
    let hole = hole.network();
    let mut out = Vec::new();
    for len in 1..=hole.prefix_len() {
        let sibling = match hole.addr() {
            IpAddr::V4(a) => {
                let bits = u32::from(a) ^ (1u32 << (32 - u32::from(len)));
                IpAddr::V4(Ipv4Addr::from(bits))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a) ^ (1u128 << (128 - u32::from(len)));
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        };
        out.push(net(sibling, len));
    }
    out
}

/// What a default route stands for in the engine: everything in its family but the mesh
/// (10 IPv4 prefixes around `100.64.0.0/10`, 24 IPv6 prefixes around `fd5a:1f00::/24`).
pub fn exit_prefixes(default: &IpNet) -> Vec<IpNet> {
    if default.addr().is_ipv4() {
        complement(&mesh_v4())
    } else {
        complement(&mesh_v6())
    }
}

/// Why a prefix is not usable as a route.
pub fn check_route(n: &IpNet) -> Result<(), String> {
    if n.network() != *n {
        return Err(format!("{n} has host bits set (write {})", n.network()));
    }
    if is_default(n) {
        return Err(format!(
            "{n} is a default route: offer it with --advertise-exit-node"
        ));
    }
    let special: [(&str, u8, &str); 9] = [
        ("100.64.0.0", 10, "the mesh's IPv4 space"),
        ("fd5a:1f00::", 24, "the mesh's IPv6 space"),
        ("127.0.0.0", 8, "loopback"),
        ("::1", 128, "loopback"),
        ("169.254.0.0", 16, "link-local"),
        ("fe80::", 10, "link-local"),
        ("224.0.0.0", 4, "multicast"),
        ("ff00::", 8, "multicast"),
        ("0.0.0.0", 8, "this network (0.0.0.0/8)"),
    ];
    for (a, len, what) in special {
        let Ok(addr) = a.parse::<IpAddr>() else {
            continue;
        };
        if overlaps(n, &net(addr, len)) {
            return Err(format!("{n} overlaps {what} ({addr}/{len})"));
        }
    }
    Ok(())
}

/// Parses `--advertise-routes` entries (comma lists, repeatable): canonical prefixes only.
pub fn parse_advertised(values: &[String]) -> Result<Vec<IpNet>, String> {
    let mut out: Vec<IpNet> = Vec::new();
    for v in values.iter().flat_map(|v| v.split(',')) {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        if !v.contains('/') {
            return Err(format!("--advertise-routes {v}: a prefix needs /LEN"));
        }
        let n: IpNet = v
            .parse()
            .map_err(|e| format!("--advertise-routes {v}: {e}"))?;
        check_route(&n).map_err(|e| format!("--advertise-routes: {e}"))?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    if out.len() > tabbify_api::MAX_ADVERTISED_ROUTES {
        return Err(format!(
            "--advertise-routes: {} prefixes, at most {}",
            out.len(),
            tabbify_api::MAX_ADVERTISED_ROUTES
        ));
    }
    Ok(out)
}

/// `--exit-node`: which peer carries our default routes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExitChoice {
    /// None (the default).
    #[default]
    Off,
    /// The peer with this display name or peer id.
    Peer(String),
}

impl ExitChoice {
    /// Parses `off` or a name / peer id.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("--exit-node needs a name, a peer id or `off`".into());
        }
        Ok(if s.eq_ignore_ascii_case("off") {
            ExitChoice::Off
        } else {
            ExitChoice::Peer(s.to_owned())
        })
    }
}

/// This node's route flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `--advertise-routes`.
    pub advertised: Vec<IpNet>,
    /// `--advertise-exit-node`.
    pub advertise_exit_node: bool,
    /// `--exit-node`.
    pub exit_node: ExitChoice,
    /// `--accept-routes` (default true): install the routes peers offer.
    pub accept_routes: bool,
    /// `--concentrator`: serve stock WireGuard clients (`super::clients`).
    pub concentrator: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            advertised: Vec::new(),
            advertise_exit_node: false,
            exit_node: ExitChoice::Off,
            accept_routes: true,
            concentrator: false,
        }
    }
}

impl Settings {
    /// What this node offers, as the coordinator's `advertise_routes` strings.
    pub fn advertise_strings(&self) -> Vec<String> {
        self.advertised.iter().map(IpNet::to_string).collect()
    }

    /// Whether this node routes for others (forwarding, masquerade).
    pub fn is_router(&self) -> bool {
        !self.advertised.is_empty() || self.advertise_exit_node
    }
}

/// One visible peer as far as routes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Peer id (ties are broken by it).
    pub peer_id: String,
    /// Display name (`--exit-node NAME`).
    pub name: String,
    /// Its public key.
    pub key: [u8; 32],
    /// Its mesh IPv4.
    pub ipv4: Option<Ipv4Addr>,
    /// The prefixes we may send to through it (strings as the roster has them).
    pub routes: Vec<String>,
    /// It is an exit node we may use.
    pub exit_node: bool,
    /// Which of our prefixes it may use through us.
    pub may_use: Vec<String>,
    /// Prefixes we may send to through it on some destination ports only.
    pub route_ports: Vec<(String, ProtoRanges)>,
    /// Which of our prefixes it may use through us on some destination ports only.
    pub may_use_ports: Vec<(String, ProtoRanges)>,
}

/// A roster `RoutePorts` as `(prefix text, (protocol, first, last) rules)`.
fn port_route(r: &tabbify_api::RoutePorts) -> (String, ProtoRanges) {
    let tag = |p: Proto, v: &[tabbify_api::PortRange]| {
        v.iter()
            .map(move |x| (p, x.first, x.last))
            .collect::<Vec<_>>()
    };
    let mut rules = tag(Proto::Both, &r.ports);
    rules.extend(tag(Proto::Tcp, &r.tcp));
    rules.extend(tag(Proto::Udp, &r.udp));
    (r.prefix.clone(), rules)
}

impl Offer {
    /// From a roster entry.
    pub fn of(e: &tabbify_api::RosterEntry, key: [u8; 32]) -> Self {
        Self {
            peer_id: e.peer_id.clone(),
            name: e.display_name.clone(),
            key,
            ipv4: e.ipv4,
            routes: e.routes.clone(),
            exit_node: e.exit_node,
            may_use: e.may_use.clone(),
            route_ports: e.route_ports.iter().map(port_route).collect(),
            may_use_ports: e.may_use_ports.iter().map(port_route).collect(),
        }
    }
}

/// What the data plane and the kernel should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per peer, what to add to its AllowedIPs: its mesh IPv4 /32 and the prefixes it is
    /// the primary for (the exit prefixes for the chosen exit node).
    pub allowed: BTreeMap<[u8; 32], Vec<IpNet>>,
    /// Kernel routes into the TUN (main table): every routed prefix some peer carries and
    /// the peers' mesh IPv4 /32s. Never a default route (that is policy routing).
    pub kernel: BTreeSet<IpNet>,
    /// The exit node in use, if any.
    pub exit: Option<[u8; 32]>,
    /// Peers allowed to route through us: (peer, prefix) for the engine's destination check.
    pub grants: Vec<([u8; 32], IpNet)>,
    /// Peers allowed to route through us on some destination ports only: (peer, prefix,
    /// rules), for the engine's destination check and route filter.
    pub port_grants: Vec<([u8; 32], IpNet, ProtoRanges)>,
    /// Per peer, the port-limited prefixes it is the primary for, with their rules (also
    /// in `allowed` and `kernel`; the engine's routed filter opens only those ports).
    pub routed_ports: BTreeMap<[u8; 32], Vec<(IpNet, ProtoRanges)>>,
    /// For every prefix offered by several peers: the peers, primary first.
    pub shared: BTreeMap<IpNet, Vec<String>>,
    /// Offers refused, as (peer id, why).
    pub refused: Vec<(String, String)>,
}

impl Plan {
    /// The peers whose liveness decides something (they share a prefix with another).
    pub fn contested(&self, offers: &[Offer]) -> BTreeSet<[u8; 32]> {
        let ids: BTreeSet<&String> = self.shared.values().flatten().collect();
        offers
            .iter()
            .filter(|o| ids.contains(&o.peer_id))
            .map(|o| o.key)
            .collect()
    }
}

/// Computes the plan. `live(key)`: the engine heard from that peer within [`DEAD_AFTER`].
pub fn plan(
    offers: &[Offer],
    settings: &Settings,
    underlay: &[IpAddr],
    live: &dyn Fn(&[u8; 32]) -> bool,
) -> Plan {
    let mut p = Plan::default();
    // Candidates per prefix.
    let mut by_prefix: BTreeMap<IpNet, Vec<&Offer>> = BTreeMap::new();
    // Port-limited offers: (prefix, peer) → rules. A prefix a peer also offers for all
    // traffic is all traffic from it.
    let mut limited: BTreeMap<(IpNet, [u8; 32]), ProtoRanges> = BTreeMap::new();
    let mut exit: Option<&Offer> = None;
    // A mesh IPv4 is one member's: one that the roster gives to several peers (only a
    // malicious or broken coordinator does) goes to none of them.
    let mut claims: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for v4 in offers.iter().filter_map(|o| o.ipv4) {
        *claims.entry(v4).or_default() += 1;
    }
    for o in offers {
        if let Some(v4) = o.ipv4 {
            let host = IpNet::host(IpAddr::V4(v4));
            if claims.get(&v4).copied().unwrap_or(0) > 1 {
                p.refused.push((
                    o.peer_id.clone(),
                    format!("IPv4 {v4} given to several peers"),
                ));
            } else if mesh_v4().contains(IpAddr::V4(v4)) {
                p.allowed.entry(o.key).or_default().push(host);
                p.kernel.insert(host);
            } else {
                p.refused.push((
                    o.peer_id.clone(),
                    format!("IPv4 {v4} outside 100.64.0.0/10"),
                ));
            }
        }
        let chosen_exit = match &settings.exit_node {
            ExitChoice::Peer(n) => o.exit_node && (&o.peer_id == n || &o.name == n),
            ExitChoice::Off => false,
        };
        for r in &o.routes {
            let Ok(n) = r.parse::<IpNet>() else {
                p.refused
                    .push((o.peer_id.clone(), format!("route {r:?} is not a prefix")));
                continue;
            };
            if is_default(&n) {
                if chosen_exit && exit.is_none_or(|e| e.peer_id == o.peer_id) {
                    exit = Some(o);
                    let v = p.allowed.entry(o.key).or_default();
                    for x in exit_prefixes(&n) {
                        if !v.contains(&x) {
                            v.push(x);
                        }
                    }
                }
                continue;
            }
            if let Err(e) = check_route(&n) {
                p.refused.push((o.peer_id.clone(), e));
                continue;
            }
            if let Some(a) = underlay.iter().find(|a| n.contains(**a)) {
                p.refused.push((
                    o.peer_id.clone(),
                    format!("{n} contains this node's underlay address {a}"),
                ));
                continue;
            }
            if settings.accept_routes {
                by_prefix.entry(n).or_default().push(o);
            }
        }
        // Port-limited routes: checked like the others, never a default route.
        for (r, rules) in &o.route_ports {
            let Ok(n) = r.parse::<IpNet>() else {
                p.refused
                    .push((o.peer_id.clone(), format!("route {r:?} is not a prefix")));
                continue;
            };
            if let Err(e) = check_route(&n) {
                p.refused.push((o.peer_id.clone(), e));
                continue;
            }
            if let Some(a) = underlay.iter().find(|a| n.contains(**a)) {
                p.refused.push((
                    o.peer_id.clone(),
                    format!("{n} contains this node's underlay address {a}"),
                ));
                continue;
            }
            if settings.accept_routes {
                let v = by_prefix.entry(n).or_default();
                if !v.iter().any(|x| x.peer_id == o.peer_id) {
                    v.push(o);
                }
                limited
                    .entry((n, o.key))
                    .or_default()
                    .extend(rules.iter().copied());
            }
        }
        // Port-limited grants: inside what we advertise, never a default route.
        for (m, rules) in &o.may_use_ports {
            let Ok(n) = m.parse::<IpNet>() else {
                continue;
            };
            if !is_default(&n) && settings.advertised.iter().any(|a| covers(a, &n)) {
                p.port_grants.push((o.key, n, rules.clone()));
            }
        }
        // Grants: only inside what we advertise.
        for m in &o.may_use {
            let Ok(n) = m.parse::<IpNet>() else {
                continue;
            };
            if is_default(&n) {
                if settings.advertise_exit_node {
                    p.grants
                        .extend(exit_prefixes(&n).into_iter().map(|x| (o.key, x)));
                }
                continue;
            }
            if settings.advertised.iter().any(|a| covers(a, &n)) {
                p.grants.push((o.key, n));
            }
        }
    }
    p.exit = exit.map(|e| e.key);
    for (prefix, mut cands) in by_prefix {
        cands.sort_by(|a, b| (!live(&a.key), &a.peer_id).cmp(&(!live(&b.key), &b.peer_id)));
        cands.dedup_by(|a, b| a.peer_id == b.peer_id);
        let Some(primary) = cands.first() else {
            continue;
        };
        p.allowed.entry(primary.key).or_default().push(prefix);
        p.kernel.insert(prefix);
        let all_traffic = primary
            .routes
            .iter()
            .any(|r| r.parse::<IpNet>().ok() == Some(prefix));
        if let (false, Some(rules)) = (all_traffic, limited.get(&(prefix, primary.key))) {
            p.routed_ports
                .entry(primary.key)
                .or_default()
                .push((prefix, rules.clone()));
        }
        if cands.len() > 1 {
            p.shared
                .insert(prefix, cands.iter().map(|c| c.peer_id.clone()).collect());
        }
    }
    p.grants.sort();
    p.grants.dedup();
    p.port_grants.sort();
    p.port_grants.dedup();
    p
}

/// Which peers answered lately, from the engine's receive times.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    last_rx: BTreeMap<[u8; 32], Instant>,
}

impl Liveness {
    /// The engine last received from `key` at `at` (`None`: never).
    pub fn observe(&mut self, key: [u8; 32], at: Option<Instant>) {
        match at {
            Some(t) => {
                self.last_rx.insert(key, t);
            }
            None => {
                self.last_rx.remove(&key);
            }
        }
    }

    /// Forgets peers not in `keep`.
    pub fn retain(&mut self, keep: &BTreeSet<[u8; 32]>) {
        self.last_rx.retain(|k, _| keep.contains(k));
    }

    /// The peers heard from within [`DEAD_AFTER`] of `now`.
    pub fn live(&self, now: Instant) -> BTreeSet<[u8; 32]> {
        self.last_rx
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) <= DEAD_AFTER)
            .map(|(k, _)| *k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn offer(id: &str, k: u8, routes: &[&str]) -> Offer {
        Offer {
            peer_id: id.into(),
            name: format!("name-{id}"),
            key: [k; 32],
            ipv4: Some(Ipv4Addr::new(100, 64, 0, k)),
            routes: routes.iter().map(|s| s.to_string()).collect(),
            exit_node: false,
            may_use: vec![],
            route_ports: vec![],
            may_use_ports: vec![],
        }
    }

    #[test]
    fn exit_prefixes_cover_everything_but_the_mesh() {
        let v4 = exit_prefixes(&default_v4());
        assert_eq!(v4.len(), 10);
        let v6 = exit_prefixes(&default_v6());
        assert_eq!(v6.len(), 24);
        let inside = |set: &[IpNet], a: &str| set.iter().any(|p| p.contains(a.parse().unwrap()));
        for a in [
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "255.255.255.255",
            "0.0.0.1",
        ] {
            assert!(inside(&v4, a), "{a}");
        }
        for a in ["100.64.0.1", "100.100.100.100", "100.127.255.254"] {
            assert!(!inside(&v4, a), "{a}");
        }
        for a in ["2001:db8::1", "fd5a:1e00::1", "fd5a:2000::", "::1"] {
            assert!(inside(&v6, a), "{a}");
        }
        for a in ["fd5a:1f00::1", "fd5a:1f02:1::1", "fd5a:1fff::"] {
            assert!(!inside(&v6, a), "{a}");
        }
        // Disjoint.
        for (i, a) in v6.iter().enumerate() {
            for b in &v6[i + 1..] {
                assert!(!overlaps(a, b), "{a} {b}");
            }
        }
    }

    #[test]
    fn advertised_routes_are_canonical_and_never_mesh_or_special() {
        let ok =
            parse_advertised(&["10.1.0.0/16,fd00:1::/64".into(), "10.1.0.0/16".into()]).unwrap();
        assert_eq!(ok, vec![n("10.1.0.0/16"), n("fd00:1::/64")]);
        for bad in [
            "10.1.0.1/16",
            "0.0.0.0/0",
            "::/0",
            "100.64.0.0/10",
            "100.100.0.0/16",
            "100.0.0.0/8",
            "fd5a:1f00::/32",
            "fd5a::/16",
            "127.0.0.0/8",
            "169.254.1.0/24",
            "fe80::/64",
            "224.0.0.0/8",
            "ff02::/16",
            "10.1.0.0",
            "nonsense/8",
        ] {
            assert!(parse_advertised(&[bad.into()]).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..65).map(|i| format!("10.{i}.0.0/16")).collect();
        assert!(parse_advertised(&many).unwrap_err().contains("at most 64"));
    }

    /// The attacker is the coordinator: it offers mesh space, our own LAN, a default route
    /// from a peer we did not pick, an IPv4 outside the mesh, and `may_use` wider than we
    /// advertise. None of it reaches the plan.
    #[test]
    fn a_coordinator_cannot_route_mesh_or_underlay_space_or_widen_grants() {
        let mut evil = offer(
            "p-evil",
            9,
            &[
                "fd5a:1f00::/32",
                "100.64.0.0/10",
                "192.168.1.0/24",
                "0.0.0.0/0",
                "::/0",
                "10.9.0.0/16",
            ],
        );
        evil.ipv4 = Some(Ipv4Addr::new(192, 168, 1, 7));
        evil.exit_node = true;
        evil.may_use = vec!["10.0.0.0/8".into(), "::/0".into(), "10.1.2.0/24".into()];
        let settings = Settings {
            advertised: vec![n("10.1.0.0/16")],
            ..Settings::default()
        };
        let underlay: Vec<IpAddr> = vec!["192.168.1.50".parse().unwrap()];
        let p = plan(&[evil], &settings, &underlay, &|_| true);
        assert_eq!(p.allowed.get(&[9; 32]).unwrap(), &vec![n("10.9.0.0/16")]);
        assert_eq!(p.kernel, BTreeSet::from([n("10.9.0.0/16")]));
        assert_eq!(p.exit, None, "not the exit node we chose (none)");
        // Only the /24 inside our /16: not the /8, not the default route (we are no exit).
        assert_eq!(p.grants, vec![([9; 32], n("10.1.2.0/24"))]);
        assert_eq!(p.refused.len(), 4, "{:?}", p.refused);
    }

    /// The attacker is the coordinator: it gives one mesh IPv4 to two members (found by the
    /// roster fuzz target). Neither gets it; the others keep theirs.
    #[test]
    fn a_mesh_ipv4_given_to_two_peers_goes_to_neither() {
        let (mut a, mut b, mut c) = (
            offer("p-a", 1, &[]),
            offer("p-b", 2, &[]),
            offer("p-c", 3, &[]),
        );
        a.ipv4 = Some(Ipv4Addr::new(100, 64, 0, 7));
        b.ipv4 = Some(Ipv4Addr::new(100, 64, 0, 7));
        c.ipv4 = Some(Ipv4Addr::new(100, 64, 0, 8));
        let p = plan(&[a, b, c], &Settings::default(), &[], &|_| true);
        assert!(
            p.allowed.get(&[1; 32]).is_none_or(|v| v.is_empty()),
            "{:?}",
            p.allowed
        );
        assert!(
            p.allowed.get(&[2; 32]).is_none_or(|v| v.is_empty()),
            "{:?}",
            p.allowed
        );
        assert_eq!(p.allowed[&[3; 32]], vec![n("100.64.0.8/32")]);
        assert_eq!(p.kernel, BTreeSet::from([n("100.64.0.8/32")]));
        assert_eq!(p.refused.len(), 2, "{:?}", p.refused);
    }

    #[test]
    fn the_chosen_exit_node_gets_everything_but_the_mesh_and_no_kernel_default() {
        let mut e = offer("p-exit", 3, &["0.0.0.0/0", "::/0"]);
        e.exit_node = true;
        let mut other = offer("p-other", 4, &["0.0.0.0/0", "::/0"]);
        other.exit_node = true;
        let settings = Settings {
            exit_node: ExitChoice::Peer("name-p-exit".into()),
            ..Settings::default()
        };
        let p = plan(&[e.clone(), other.clone()], &settings, &[], &|_| true);
        assert_eq!(p.exit, Some([3; 32]));
        assert_eq!(p.allowed[&[3; 32]].len(), 1 + 10 + 24);
        assert_eq!(p.allowed[&[4; 32]].len(), 1, "only its IPv4");
        assert!(
            p.kernel.iter().all(|k| k.prefix_len() == 32),
            "{:?}",
            p.kernel
        );
        // By peer id too; off: nobody.
        let by_id = Settings {
            exit_node: ExitChoice::Peer("p-other".into()),
            ..Settings::default()
        };
        assert_eq!(
            plan(&[e.clone(), other.clone()], &by_id, &[], &|_| true).exit,
            Some([4; 32])
        );
        assert_eq!(
            plan(&[e, other], &Settings::default(), &[], &|_| true).exit,
            None
        );
        assert_eq!(ExitChoice::parse("OFF").unwrap(), ExitChoice::Off);
    }

    #[test]
    fn an_exit_node_grants_the_default_route_without_the_mesh() {
        let mut user = offer("p-user", 5, &[]);
        user.may_use = vec!["0.0.0.0/0".into()];
        let settings = Settings {
            advertise_exit_node: true,
            ..Settings::default()
        };
        let p = plan(&[user.clone()], &settings, &[], &|_| true);
        assert_eq!(p.grants.len(), 10);
        assert!(p
            .grants
            .iter()
            .all(|(k, g)| *k == [5; 32] && !overlaps(g, &mesh_v4())));
        // Not an exit node: the coordinator's grant is ignored.
        assert!(plan(&[user], &Settings::default(), &[], &|_| true)
            .grants
            .is_empty());
    }

    /// Port-limited routes (`route_ports`, `may_use_ports`): a member routes the prefix
    /// to its primary with the ports for the engine's routed filter; a router grants it
    /// with the ports, only inside what it advertises. The malicious coordinator: a
    /// default route or mesh space in `route_ports`, or a `may_use_ports` outside our
    /// advertisement, gets nothing.
    #[test]
    fn port_limited_routes_reach_the_plan_with_their_ports() {
        let web = vec![(Proto::Tcp, 443, 443)];
        let mut r = offer("p-r", 1, &["10.2.0.0/16"]);
        r.route_ports = vec![
            ("10.1.0.0/16".into(), web.clone()),
            ("0.0.0.0/0".into(), web.clone()),
            ("fd5a:1f00::/32".into(), web.clone()),
        ];
        let p = plan(&[r], &Settings::default(), &[], &|_| true);
        assert!(p.allowed[&[1; 32]].contains(&n("10.1.0.0/16")));
        assert!(p.kernel.contains(&n("10.1.0.0/16")));
        assert_eq!(
            p.routed_ports[&[1; 32]],
            vec![(n("10.1.0.0/16"), web.clone())],
            "the all-traffic 10.2.0.0/16 is not port-limited"
        );
        assert!(!p.allowed[&[1; 32]].iter().any(|x| x.prefix_len() == 0));
        assert_eq!(p.refused.len(), 2, "{:?}", p.refused);
        assert!(p.exit.is_none());

        let mut user = offer("p-user", 5, &[]);
        user.may_use_ports = vec![
            ("10.1.0.0/24".into(), web.clone()),
            ("10.9.0.0/16".into(), web.clone()),
            ("0.0.0.0/0".into(), web.clone()),
        ];
        let settings = Settings {
            advertised: vec![n("10.1.0.0/16")],
            advertise_exit_node: true,
            ..Settings::default()
        };
        let p = plan(&[user], &settings, &[], &|_| true);
        assert_eq!(p.port_grants, vec![([5; 32], n("10.1.0.0/24"), web)]);
        assert!(p.grants.is_empty());
    }

    #[test]
    fn two_routers_one_primary_the_live_one_then_the_lowest_peer_id() {
        let a = offer("p-a", 1, &["10.1.0.0/16"]);
        let b = offer("p-b", 2, &["10.1.0.0/16"]);
        let s = Settings::default();
        let both = plan(&[b.clone(), a.clone()], &s, &[], &|_| true);
        assert!(both.allowed[&[1; 32]].contains(&n("10.1.0.0/16")));
        assert!(!both.allowed[&[2; 32]].contains(&n("10.1.0.0/16")));
        assert_eq!(both.shared[&n("10.1.0.0/16")], vec!["p-a", "p-b"]);
        assert_eq!(both.contested(&[a.clone(), b.clone()]).len(), 2);
        // Neither live (no probes answered yet): the lowest id still.
        let none = plan(&[a.clone(), b.clone()], &s, &[], &|_| false);
        assert!(none.allowed[&[1; 32]].contains(&n("10.1.0.0/16")));
        // a dies: b takes over; a comes back: a again.
        let a_dead = plan(&[a.clone(), b.clone()], &s, &[], &|k| *k == [2; 32]);
        assert!(a_dead.allowed[&[2; 32]].contains(&n("10.1.0.0/16")));
        assert!(!a_dead.allowed[&[1; 32]].contains(&n("10.1.0.0/16")));
        assert_eq!(a_dead.kernel, both.kernel, "the kernel route stays");
        // --accept-routes false: only the mesh IPv4s.
        let off = Settings {
            accept_routes: false,
            ..Settings::default()
        };
        let p = plan(&[a, b], &off, &[], &|_| true);
        assert!(p.kernel.iter().all(|k| k.prefix_len() == 32));
    }

    #[test]
    fn liveness_is_a_receipt_within_the_window() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        l.observe([1; 32], Some(t0));
        l.observe([2; 32], None);
        assert_eq!(l.live(t0 + DEAD_AFTER), BTreeSet::from([[1; 32]]));
        assert!(l
            .live(t0 + DEAD_AFTER + Duration::from_millis(1))
            .is_empty());
        // Failover bound: dead after DEAD_AFTER, noticed within one 250 ms tick.
        assert!(DEAD_AFTER + Duration::from_millis(250) < Duration::from_secs(2));
        l.retain(&BTreeSet::new());
        assert!(l.live(t0).is_empty());
    }
}
