//! Subnet routes and exit nodes on the coordinator: what a member advertises, whether an
//! advertisement is approved, which routes a viewer may use, and the mesh IPv4 address.
//!
//! What it owns:
//! * [`Advertisement`]: a member's advertised prefixes, whether it offers itself as an
//!   exit node, and the prefixes an admin approved. Stored with the member (its row in
//!   [`crate::members`], so it is durable and reaches every coordinator through the change
//!   log like any member change). [`parse_advertisement`] validates a request's fields
//!   (canonical prefixes, at most [`MAX_ADVERTISED_ROUTES`], no mesh, loopback,
//!   link-local, multicast or default prefix: [`crate::api::route::check_advertised`]).
//! * Approval ([`approval`]): the policy's `routes` section approves an advertisement of
//!   a prefix inside one of its keys by a member one of the key's selectors names;
//!   otherwise an admin approval ([`Advertisement::admin_approved`]) does; otherwise it
//!   is pending.
//! * Use ([`usable`]): a viewer may use an approved route R when an allow rule whose
//!   `src` names it has a prefix destination containing R (all of R), or inside R (that
//!   part only), minus the prefix destinations of deny rules naming it. The default
//!   routes of an exit node are usable only through a destination that is exactly that
//!   default route (`0.0.0.0/0`, `::/0`, `autogroup:internet`). A prefix destination with
//!   ports (`10.1.0.0/16:443`) makes its part usable on those destination ports only.
//! * The roster fields ([`decorate`]): `routes`/`exit_node` (what the viewer may send
//!   through the peer) and `may_use` (what the peer may send through the viewer), all
//!   traffic; `route_ports` / `may_use_ports` the port-limited parts. A port-limited part
//!   is never in `routes`/`may_use`: a joiner from before the ports fields, router or
//!   member, then neither installs nor grants it (it loses that access instead of
//!   getting every port).
//! * The mesh IPv4 ([`ipv4_candidate`]): the `n`-th candidate for a peer id, from
//!   blake3, in `100.64.0.0/10`, never the first or last address of the /10 nor
//!   `100.100.100.100`. The registry picks the first candidate no other member holds; the
//!   database's unique `member_ipv4.ipv4` refuses a duplicate that two coordinators
//!   allocated at once (the registration fails with 409 and is retried).
//!
//! Invariants: only validated prefixes enter an [`Advertisement`]; `admin_approved` is a
//! subset of what is advertised (an approval is forgotten with its advertisement).

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::api::route::{check_advertised, Prefix, DEFAULT_V4, DEFAULT_V6};
use crate::api::{
    ApprovedBy, RosterEntry, RouteApproval, RouteInfo, RoutePorts, RouteState,
    MAX_ADVERTISED_ROUTES,
};
use crate::policy::{matches, Policy, Principal, RouteRule};
use crate::ports::ProtoPorts;

/// A member's route advertisement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertisement {
    /// Advertised subnet prefixes (never a default route), sorted, deduplicated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Prefix>,
    /// Offers itself as an exit node (`0.0.0.0/0` and `::/0`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit_node: bool,
    /// Prefixes an admin approved (`POST /v1/routes/{id}/approve`), each advertised.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_approved: Vec<Prefix>,
}

impl Advertisement {
    /// Whether nothing is advertised.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && !self.exit_node
    }

    /// Whether there is nothing to store (nothing advertised, nothing approved).
    pub fn is_empty_all(&self) -> bool {
        self.is_empty() && self.admin_approved.is_empty()
    }

    /// Every advertised prefix with whether it belongs to the exit node offer.
    pub fn prefixes(&self) -> Vec<(Prefix, bool)> {
        let mut out: Vec<(Prefix, bool)> = self.routes.iter().map(|p| (*p, false)).collect();
        if self.exit_node {
            out.push((DEFAULT_V4, true));
            out.push((DEFAULT_V6, true));
        }
        out
    }

    /// Whether `p` is advertised.
    pub fn advertises(&self, p: &Prefix) -> bool {
        if p.is_default() {
            self.exit_node
        } else {
            self.routes.contains(p)
        }
    }

    /// Replaces what is advertised, forgetting admin approvals of prefixes no longer in it.
    pub fn replace(&mut self, routes: Vec<Prefix>, exit_node: bool) {
        self.routes = routes;
        self.exit_node = exit_node;
        let keep: Vec<Prefix> = self
            .admin_approved
            .iter()
            .copied()
            .filter(|p| self.advertises(p))
            .collect();
        self.admin_approved = keep;
    }
}

/// Validates a request's `advertise_routes` and `advertise_exit_node`; the error names
/// the field and the prefix.
pub fn parse_advertisement(routes: &[String], exit_node: bool) -> Result<Vec<Prefix>, String> {
    if routes.len() > MAX_ADVERTISED_ROUTES {
        return Err(format!(
            "advertise_routes: more than {MAX_ADVERTISED_ROUTES} prefixes"
        ));
    }
    let mut out = Vec::with_capacity(routes.len());
    for r in routes {
        let p: Prefix = r.parse().map_err(|e| format!("advertise_routes: {e}"))?;
        check_advertised(&p).map_err(|e| format!("advertise_routes: {e}"))?;
        out.push(p);
    }
    out.sort();
    out.dedup();
    let _ = exit_node;
    Ok(out)
}

/// The stable id of a route: hex of the first 8 bytes of blake3(peer_id ‖ "\0" ‖ prefix).
pub fn route_id(peer_id: &str, prefix: &Prefix) -> String {
    let mut h = blake3::Hasher::new();
    h.update(peer_id.as_bytes());
    h.update(b"\0");
    h.update(prefix.to_string().as_bytes());
    hex::encode(&h.finalize().as_bytes()[..8])
}

/// Who approved `prefix` of a member (`p` as the policy sees it), or `None`: pending.
pub fn approval(
    policy: &Policy,
    p: Principal<'_>,
    ads: &Advertisement,
    prefix: &Prefix,
) -> Option<ApprovedBy> {
    let by_policy = policy.route_auto().iter().any(|(key, sels)| {
        // A default route is approved only by that default route's key.
        let covers = if prefix.is_default() {
            key == prefix
        } else {
            key.contains(prefix)
        };
        covers && sels.iter().any(|s| matches(s, p))
    });
    if by_policy {
        Some(ApprovedBy::Policy)
    } else if ads.admin_approved.contains(prefix) {
        Some(ApprovedBy::Admin)
    } else {
        None
    }
}

/// The member's approved prefixes, with whether each is an exit route.
pub fn approved(policy: &Policy, p: Principal<'_>, ads: &Advertisement) -> Vec<(Prefix, bool)> {
    if ads.is_empty() {
        return Vec::new();
    }
    ads.prefixes()
        .into_iter()
        .filter(|(prefix, _)| approval(policy, p, ads, prefix).is_some())
        .collect()
}

fn rules_for<'a>(
    rules: &'a [RouteRule],
    viewer: Principal<'a>,
) -> impl Iterator<Item = &'a (Prefix, ProtoPorts)> + 'a {
    rules
        .iter()
        .filter(move |r| r.src.iter().any(|s| matches(s, viewer)))
        .flat_map(|r| r.dst.iter())
}

/// Whether every port of `inner` is in `outer`.
fn ports_within(inner: &ProtoPorts, outer: &ProtoPorts) -> bool {
    let mut rest = inner.clone();
    rest.subtract(outer);
    rest.is_empty()
}

/// The parts of the approved route `route` that `viewer` may send to, each with the
/// destination ports it may open there ([`ProtoPorts::all`]: all traffic); empty: none.
///
/// The parts may nest (a port-limited /16 around an all-traffic /24): a destination gets
/// the union of the ports of every part holding it, which is what both ends compute
/// (longest match over prefixes whose ports include those of the prefixes around them).
/// A part inside another with no port the outer one lacks is dropped. A deny rule's
/// prefix is cut out of every part; with ports, only those ports are cut inside it.
pub fn usable(
    policy: &Policy,
    viewer: Principal<'_>,
    route: &Prefix,
    exit: bool,
) -> Vec<(Prefix, ProtoPorts)> {
    let mut out: Vec<(Prefix, ProtoPorts)> = Vec::new();
    for (d, ports) in rules_for(policy.route_allow(), viewer) {
        let part = if exit {
            (d == route).then_some(*route)
        } else {
            d.intersect(route)
        };
        if let Some(part) = part {
            out.push((part, ports.clone()));
        }
    }
    if out.is_empty() {
        return out;
    }
    for (d, dports) in rules_for(policy.route_deny(), viewer) {
        let mut next = Vec::with_capacity(out.len());
        for (k, kp) in out {
            let Some(inner) = k.intersect(d) else {
                next.push((k, kp));
                continue;
            };
            next.extend(k.subtract(d).into_iter().map(|piece| (piece, kp.clone())));
            let mut rest = kp;
            rest.subtract(dports);
            if !rest.is_empty() {
                next.push((inner, rest));
            }
        }
        out = next;
    }
    // One entry per prefix (the union), then drop parts adding nothing to one around them.
    out.sort_by_key(|a| a.0);
    let mut merged: Vec<(Prefix, ProtoPorts)> = Vec::with_capacity(out.len());
    for (p, ports) in out {
        match merged.last_mut() {
            Some((q, qp)) if *q == p => qp.union_with(&ports),
            _ => merged.push((p, ports)),
        }
    }
    merged.sort_by_key(|(p, _)| (p.is_ipv4(), p.prefix_len()));
    let mut kept: Vec<(Prefix, ProtoPorts)> = Vec::new();
    for (p, ports) in merged {
        if !kept
            .iter()
            .any(|(k, kp)| k.contains(&p) && ports_within(&ports, kp))
        {
            kept.push((p, ports));
        }
    }
    kept.sort_by_key(|a| a.0);
    kept
}

/// The roster's form of a port-limited part.
pub fn route_ports(prefix: &Prefix, ports: &ProtoPorts) -> RoutePorts {
    let (both, tcp, udp) = ports.split();
    RoutePorts {
        prefix: prefix.to_string(),
        ports: both.ranges().to_vec(),
        tcp: tcp.ranges().to_vec(),
        udp: udp.ranges().to_vec(),
    }
}

/// What a viewer may send through a member ([`offered`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offered {
    /// The all-traffic prefixes (text), for `routes` / `may_use`.
    pub routes: Vec<String>,
    /// The member is an exit node the viewer may use.
    pub exit_node: bool,
    /// The port-limited prefixes, for `route_ports` / `may_use_ports`.
    pub ports: Vec<RoutePorts>,
}

/// What `viewer` may send through a member whose approved routes are `routes`: the
/// all-traffic prefixes, whether it may use the member as an exit node, and the
/// port-limited prefixes (never in the all-traffic list: a joiner that does not know the
/// ports field gets no route rather than every port).
pub fn offered(policy: &Policy, viewer: Principal<'_>, routes: &[(Prefix, bool)]) -> Offered {
    let mut all = Vec::new();
    let mut limited: Vec<(Prefix, ProtoPorts)> = Vec::new();
    let mut exit_node = false;
    for (r, exit) in routes {
        let parts = usable(policy, viewer, r, *exit);
        if *exit && !parts.is_empty() {
            exit_node = true;
        }
        for (p, ports) in parts {
            if ports == ProtoPorts::all() {
                all.push(p);
            } else {
                limited.push((p, ports));
            }
        }
    }
    all.sort();
    all.dedup();
    limited.sort_by_key(|a| a.0);
    let mut ports: Vec<RoutePorts> = Vec::with_capacity(limited.len());
    let mut last: Option<(Prefix, ProtoPorts)> = None;
    for (p, pp) in limited {
        match &mut last {
            Some((q, qp)) if *q == p => qp.union_with(&pp),
            _ => {
                if let Some((q, qp)) = last.take() {
                    ports.push(route_ports(&q, &qp));
                }
                last = Some((p, pp));
            }
        }
    }
    if let Some((q, qp)) = last {
        ports.push(route_ports(&q, &qp));
    }
    Offered {
        routes: all.iter().map(ToString::to_string).collect(),
        exit_node,
        ports,
    }
}

/// Fills `e` (the viewer's entry for a peer): `routes`/`exit_node` from the peer's
/// approved routes `target_routes` as the viewer may use them, and `may_use` from the
/// viewer's own approved routes `viewer_routes` as the peer may use them.
pub fn decorate(
    policy: &Policy,
    e: &mut RosterEntry,
    viewer: Principal<'_>,
    target: Principal<'_>,
    target_routes: &[(Prefix, bool)],
    viewer_routes: &[(Prefix, bool)],
) {
    if !target_routes.is_empty() {
        let o = offered(policy, viewer, target_routes);
        e.routes = o.routes;
        e.exit_node = o.exit_node;
        e.route_ports = o.ports;
    }
    if !viewer_routes.is_empty() {
        let o = offered(policy, target, viewer_routes);
        e.may_use = o.routes;
        e.may_use_ports = o.ports;
    }
}

/// A member's own advertisements and their state (`RegisterResponse::routes`).
pub fn own_states(policy: &Policy, p: Principal<'_>, ads: &Advertisement) -> Vec<RouteState> {
    ads.prefixes()
        .into_iter()
        .map(|(prefix, exit_node)| RouteState {
            prefix: prefix.to_string(),
            exit_node,
            state: match approval(policy, p, ads, &prefix) {
                Some(_) => RouteApproval::Approved,
                None => RouteApproval::Pending,
            },
        })
        .collect()
}

/// The `GET /v1/routes` entries of one member.
pub fn infos(
    policy: &Policy,
    peer_id: &str,
    display_name: &str,
    p: Principal<'_>,
    ads: &Advertisement,
) -> Vec<RouteInfo> {
    ads.prefixes()
        .into_iter()
        .map(|(prefix, exit_node)| {
            let by = approval(policy, p, ads, &prefix);
            RouteInfo {
                id: route_id(peer_id, &prefix),
                peer_id: peer_id.to_owned(),
                display_name: display_name.to_owned(),
                prefix: prefix.to_string(),
                exit_node,
                state: if by.is_some() {
                    RouteApproval::Approved
                } else {
                    RouteApproval::Pending
                },
                approved_by: by,
            }
        })
        .collect()
}

/// The `n`-th mesh IPv4 candidate of `peer_id` (see the module docs), `None` for the
/// excluded addresses (the caller moves on to the next `n`).
pub fn ipv4_candidate(peer_id: &str, n: u32) -> Option<Ipv4Addr> {
    let mut h = blake3::Hasher::new();
    h.update(b"tabbify mesh ipv4\0");
    h.update(peer_id.as_bytes());
    h.update(&n.to_le_bytes());
    let b = h.finalize();
    let bytes = b.as_bytes();
    let host = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) & 0x003f_ffff;
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) | host);
    let excluded = host == 0 || host == 0x003f_ffff || addr == Ipv4Addr::new(100, 100, 100, 100);
    (!excluded).then_some(addr)
}

/// How many candidates [`allocate_ipv4`] tries before giving up.
pub const IPV4_CANDIDATES: u32 = 64;

/// The first candidate for `peer_id` that `taken` says is free.
pub fn allocate_ipv4(peer_id: &str, taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    (0..IPV4_CANDIDATES)
        .filter_map(|n| ipv4_candidate(peer_id, n))
        .find(|a| !taken(*a))
}

/// Whether `a` is a valid mesh IPv4 (what a stored row may hold).
pub fn is_mesh_ipv4(a: Ipv4Addr) -> bool {
    crate::api::route::MESH_V4.contains_addr(IpAddr::V4(a))
        && a != Ipv4Addr::new(100, 64, 0, 0)
        && a != Ipv4Addr::new(100, 127, 255, 255)
        && a != Ipv4Addr::new(100, 100, 100, 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PolicyDocument, PolicyRule};
    use crate::ports::Proto;

    fn pfx(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn policy() -> Policy {
        let rule = |src: &str, dst: &[&str]| PolicyRule {
            src: vec![src.into()],
            dst: dst.iter().map(|d| d.to_string()).collect(),
        };
        Policy::compile(PolicyDocument {
            tags: ["router", "exit", "user", "guest", "ops"]
                .map(String::from)
                .to_vec(),
            allow: vec![
                rule("tag:user", &["tag:router:22", "10.1.0.0/16", "0.0.0.0/0"]),
                rule("tag:guest", &["10.1.2.0/24"]),
                rule("tag:ops", &["10.0.0.0/8", "autogroup:internet"]),
            ],
            deny: vec![rule("tag:ops", &["10.1.5.0/24"])],
            routes: [
                ("10.0.0.0/8".to_string(), vec!["tag:router".to_string()]),
                ("0.0.0.0/0".to_string(), vec!["tag:exit".to_string()]),
                ("::/0".to_string(), vec!["tag:exit".to_string()]),
            ]
            .into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn who<'a>(p: &Policy, name: &'a str, tags: &'a mut Vec<u16>, t: &[&str]) -> Principal<'a> {
        *tags = p.known_tag_ids(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        Principal {
            identity: name,
            tags: tags.as_slice(),
        }
    }

    #[test]
    fn policy_approves_inside_its_keys_and_only_for_its_selectors() {
        let p = policy();
        let mut t = Vec::new();
        let router = who(&p, "r", &mut t, &["router"]);
        let ads = Advertisement {
            routes: vec![pfx("10.1.0.0/16"), pfx("192.168.0.0/24")],
            exit_node: true,
            admin_approved: vec![],
        };
        let got = approved(&p, router, &ads);
        // Inside 10.0.0.0/8: approved; 192.168 and the exit offer: pending.
        assert_eq!(got, vec![(pfx("10.1.0.0/16"), false)]);
        let mut t2 = Vec::new();
        let exit = who(&p, "e", &mut t2, &["exit"]);
        // A default-route key approves the exit offer and, as any key, every prefix
        // inside it: here every IPv4 subnet (documented in control/README.md).
        let got = approved(&p, exit, &ads);
        assert_eq!(got.len(), 4, "{got:?}");
        let mut t3 = Vec::new();
        let user = who(&p, "u", &mut t3, &["user"]);
        assert!(approved(&p, user, &ads).is_empty());
        // An admin approval counts; it is forgotten with the advertisement.
        let mut ads2 = ads.clone();
        ads2.admin_approved = vec![pfx("192.168.0.0/24")];
        assert_eq!(
            approval(&p, router, &ads2, &pfx("192.168.0.0/24")),
            Some(ApprovedBy::Admin)
        );
        ads2.replace(vec![pfx("10.1.0.0/16")], false);
        assert!(ads2.admin_approved.is_empty());
    }

    /// The prefixes of all-traffic parts (panics on a port-limited one).
    fn all(parts: Vec<(Prefix, ProtoPorts)>) -> Vec<Prefix> {
        parts
            .into_iter()
            .map(|(p, ports)| {
                assert_eq!(ports, ProtoPorts::all(), "{p}");
                p
            })
            .collect()
    }

    #[test]
    fn use_is_the_intersection_minus_denies() {
        let p = policy();
        let (mut a, mut b, mut c, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let user = who(&p, "u", &mut a, &["user"]);
        let guest = who(&p, "g", &mut b, &["guest"]);
        let ops = who(&p, "o", &mut c, &["ops"]);
        let router = who(&p, "r", &mut d, &["router"]);
        let lan = pfx("10.1.0.0/16");
        assert_eq!(all(usable(&p, user, &lan, false)), vec![lan]);
        // A rule inside the route: only that part.
        assert_eq!(
            all(usable(&p, guest, &lan, false)),
            vec![pfx("10.1.2.0/24")]
        );
        // A rule around the route, minus the deny: 8 prefixes, none holding 10.1.5.0/24.
        let o = all(usable(&p, ops, &lan, false));
        assert_eq!(o.len(), 8);
        assert!(o.iter().all(|x| !x.overlaps(&pfx("10.1.5.0/24"))));
        // No rule: nothing.
        assert!(usable(&p, router, &lan, false).is_empty());
        // 0.0.0.0/0 in a rule contains the LAN, and uses the exit's IPv4 default only.
        assert_eq!(all(usable(&p, user, &DEFAULT_V4, true)), vec![DEFAULT_V4]);
        assert!(usable(&p, user, &DEFAULT_V6, true).is_empty());
        // A LAN rule never makes an exit node usable.
        assert!(usable(&p, guest, &DEFAULT_V4, true).is_empty());
        assert_eq!(all(usable(&p, ops, &DEFAULT_V6, true)), vec![DEFAULT_V6]);
        let o = offered(&p, user, &[(lan, false), (DEFAULT_V4, true)]);
        assert_eq!(
            o.routes,
            vec!["0.0.0.0/0".to_string(), "10.1.0.0/16".to_string()]
        );
        assert!(o.exit_node);
        assert!(o.ports.is_empty());
    }

    /// Ports on a prefix destination: the part carries them, never lands in the
    /// all-traffic list (an older joiner must not get every port), nests under and around
    /// all-traffic parts, and a deny with ports cuts only those ports.
    #[test]
    fn ports_on_a_prefix_limit_the_part_and_stay_out_of_the_all_traffic_list() {
        let rule = |src: &str, dst: &[&str]| PolicyRule {
            src: vec![src.into()],
            dst: dst.iter().map(|d| d.to_string()).collect(),
        };
        let p = Policy::compile(PolicyDocument {
            tags: ["router", "web", "mixed", "denied"]
                .map(String::from)
                .to_vec(),
            allow: vec![
                rule("tag:web", &["10.1.0.0/16:tcp:443"]),
                rule("tag:mixed", &["10.0.0.0/8:22", "10.1.7.0/24"]),
                rule("tag:denied", &["10.1.0.0/16:22,443"]),
            ],
            deny: vec![rule("tag:denied", &["10.1.5.0/24:22"])],
            routes: [("10.0.0.0/8".to_string(), vec!["tag:router".to_string()])].into(),
            ..Default::default()
        })
        .unwrap();
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        let web = who(&p, "w", &mut a, &["web"]);
        let mixed = who(&p, "m", &mut b, &["mixed"]);
        let denied = who(&p, "d", &mut c, &["denied"]);
        let lan = pfx("10.1.0.0/16");
        let u = usable(&p, web, &lan, false);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].0, lan);
        assert!(u[0].1.contains(Proto::Tcp, 443) && !u[0].1.contains(Proto::Udp, 443));
        let o = offered(&p, web, &[(lan, false)]);
        assert!(
            o.routes.is_empty(),
            "a port-limited part is not all traffic"
        );
        assert_eq!(
            o.ports,
            vec![RoutePorts {
                prefix: "10.1.0.0/16".into(),
                ports: vec![],
                tcp: vec![crate::api::PortRange {
                    first: 443,
                    last: 443
                }],
                udp: vec![],
            }]
        );
        // Port 22 on the whole LAN, all traffic on one /24 inside it: both, apart.
        let o = offered(&p, mixed, &[(lan, false)]);
        assert_eq!(o.routes, vec!["10.1.7.0/24".to_string()]);
        assert_eq!(o.ports.len(), 1);
        assert_eq!(o.ports[0].prefix, "10.1.0.0/16");
        // The deny with ports: 22 cut inside 10.1.5.0/24 only, 443 kept there.
        let u = usable(&p, denied, &lan, false);
        let at = |s: &str| {
            u.iter().filter(|(q, _)| q.contains(&pfx(s))).fold(
                ProtoPorts::empty(),
                |mut acc, (_, pp)| {
                    acc.union_with(pp);
                    acc
                },
            )
        };
        let inside = at("10.1.5.9/32");
        assert!(inside.contains(Proto::Tcp, 443) && !inside.contains(Proto::Tcp, 22));
        let outside = at("10.1.6.9/32");
        assert!(outside.contains(Proto::Tcp, 443) && outside.contains(Proto::Tcp, 22));
        assert!(u.iter().all(|(_, pp)| *pp != ProtoPorts::all()));
    }

    #[test]
    fn attacker_advertisements_are_refused() {
        let other_ula = crate::ula::identity_ula("victim");
        for bad in [
            "fd5a:1f00::/32".to_string(),
            "fd5a:1f02::/32".to_string(),
            format!("{other_ula}/128"),
            "100.64.0.0/10".to_string(),
            "100.64.1.2/32".to_string(),
            "0.0.0.0/0".to_string(),
            "::/0".to_string(),
            "127.0.0.0/8".to_string(),
            "10.1.0.1/16".to_string(),
        ] {
            let e = parse_advertisement(std::slice::from_ref(&bad), false).unwrap_err();
            assert!(e.starts_with("advertise_routes"), "{bad}: {e}");
        }
        let many: Vec<String> = (0..=MAX_ADVERTISED_ROUTES)
            .map(|i| format!("10.{}.0.0/16", i % 256))
            .collect();
        assert!(parse_advertisement(&many, false).is_err());
        assert_eq!(
            parse_advertisement(&["10.1.0.0/16".into(), "10.1.0.0/16".into()], true).unwrap(),
            vec![pfx("10.1.0.0/16")]
        );
    }

    #[test]
    fn a_stored_member_without_an_ipv4_gets_one_and_keeps_it() {
        use crate::registry::{Limits, NewPeer, Registry};
        use base64::Engine;
        let mut r = Registry::new(std::sync::Arc::new(policy()), 1, Limits::default());
        let new = |name: &str| NewPeer {
            key: *blake3::hash(name.as_bytes()).as_bytes(),
            identity: name.into(),
            display_name: name.into(),
            tags: vec!["user".into()],
            endpoints: vec![],
            wg_listen_port: 51820,
            reflexive: "192.0.2.1:51820".parse().unwrap(),
            ephemeral: false,
            concentrator: false,
        };
        let a = r.upsert(new("a"), 1).clone();
        let a4 = a.ipv4.unwrap();
        assert!(is_mesh_ipv4(a4));
        // Registering again keeps the address.
        assert_eq!(r.upsert(new("a"), 2).ipv4, Some(a4));
        // A member row from before IPv4s: none until its heartbeat asks for one.
        let mut row = crate::members::MemberRow::of(&a);
        row.identity = "b".into();
        row.peer_id = crate::ula::identity_peer_id("b");
        row.key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        row.ipv4 = None;
        assert!(r.load_member(&row));
        assert_eq!(r.peer(&row.peer_id).unwrap().ipv4, None);
        assert!(r.ensure_ipv4(&row.peer_id, 3));
        let b4 = r.peer(&row.peer_id).unwrap().ipv4.unwrap();
        assert_ne!(a4, b4);
        assert_eq!(r.peer_by_ipv4(b4).unwrap().id, row.peer_id);
        assert!(!r.ensure_ipv4(&row.peer_id, 4), "kept");
        // A stored row holding an address outside the mesh space is not believed.
        row.ipv4 = Some("10.0.0.1".parse().unwrap());
        assert_eq!(row.to_peer(0).unwrap().ipv4, None);
    }

    #[test]
    fn ipv4_candidates_stay_in_the_mesh_space_and_skip_taken_ones() {
        for i in 0..2000 {
            let id = format!("peer{i}");
            let a = allocate_ipv4(&id, |_| false).unwrap();
            assert!(is_mesh_ipv4(a), "{a}");
            assert_eq!(Some(a), allocate_ipv4(&id, |_| false), "stable");
            // The first candidate taken by someone else: the next one.
            let b = allocate_ipv4(&id, |x| x == a).unwrap();
            assert_ne!(a, b);
            assert!(is_mesh_ipv4(b));
        }
        assert!(allocate_ipv4("x", |_| true).is_none());
        assert_eq!(route_id("p", &pfx("10.1.0.0/16")).len(), 16);
        assert_ne!(
            route_id("p", &pfx("10.1.0.0/16")),
            route_id("q", &pfx("10.1.0.0/16"))
        );
    }
}
