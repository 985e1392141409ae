//! Stock WireGuard clients, sans IO (issue 15): which roster entries are clients this node
//! serves as a concentrator, which are clients reached through another member, and what
//! that means for the data plane (peers, addresses behind peers with their own rules, and
//! who may send to whom through us).
//!
//! Inputs: the accepted roster entries (already checked by `roster`: peer id and ULA derived
//! from the identity, key well formed), our peer id, and whether we run with
//! `--concentrator`. Output: a [`ClientPlan`], a pure function of those.
//!
//! A client K (identity `client/<uuid>`) appears in the roster of
//! * its concentrator C, with `client: true`: C makes K a WireGuard peer with no endpoint
//!   (K dials in), AllowedIPs K's ULA /128 and mesh IPv4 /32, K's own port rules; K may
//!   send through C to the addresses of its `may_use`, and each member P to K when P's
//!   `may_use` names K's address and P's `client_ports` carries the rules between P and K
//!   (C holds P to them: the stock client filters nothing, and P may not filter either,
//!   `core::local`); a member named in K's `may_use` but not granted K, or granted K
//!   without rules for it (an older coordinator: fail closed), gets a reply grant: it may
//!   answer inside flows K opened, never open one (the engine tracks K's flows at C,
//!   `core::local`). P applies K's rules both ways;
//! * every member V that the policy lets see K, with `via = C`: K is no peer of V; K's
//!   addresses are added to C's AllowedIPs on V, with K's rules behind C's entry
//!   (`core::behind`), so V holds K to what the policy gives K's tags, not C's.
//!
//! What a coordinator says is checked, as for the rest of the roster (a malicious
//! coordinator must not turn a member into a hub, or route a member's address through
//! another member). Refused and logged ([`ClientPlan::refused`]):
//! * a `client: true` entry when this node was not started with `--concentrator`;
//! * a `client` or `via` entry whose identity is not a client identity
//!   ([`tabbify_api::CLIENT_IDENTITY_PREFIX`]) — a member's address never moves behind
//!   another member —, or that is both;
//! * a `via` naming ourselves, a peer absent from the roster, or an entry that is itself a
//!   client (only members carry clients);
//! * a client identity without either flag (a client is never a direct peer);
//! * a client's IPv4 outside `100.64.0.0/10` or held by a member (the address is dropped,
//!   the ULA kept);
//! * a `may_use` address of a client that is not exactly one mesh member's ULA, app ULA or
//!   IPv4 in this roster (no prefixes, nothing outside the mesh).
//!
//! Invariants: an entry that is a client never becomes an ordinary peer
//! ([`ClientPlan::not_peers`]); every address behind a carrier and every served client's
//! address is a host address inside the mesh space; grants name only host addresses of
//! members or served clients.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use tabbify_api::RosterEntry;

use super::roster::{decode_key, port_rules};
use super::routes::{mesh_v4, mesh_v6};
use crate::core::filter::Proto;
use crate::core::net::IpNet;

/// Port rules as (protocol, first, last).
pub type Rules = Vec<(Proto, u16, u16)>;

/// A client this concentrator serves (a WireGuard peer of ours).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// Its peer id.
    pub peer_id: String,
    /// Its public key.
    pub key: [u8; 32],
    /// Its addresses: the ULA, and the mesh IPv4 if usable.
    pub addrs: Vec<IpAddr>,
}

/// A client behind a carrier peer, with the rules between us and the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carried {
    /// The client's peer id.
    pub peer_id: String,
    /// Its addresses (ULA, and the mesh IPv4 if usable).
    pub addrs: Vec<IpAddr>,
    /// Ports on the client we may open.
    pub outbound: Rules,
    /// Ports on us the client may open.
    pub inbound: Rules,
}

/// What the roster's clients mean for this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientPlan {
    /// The clients we serve, by public key (only with `--concentrator`).
    pub served: BTreeMap<[u8; 32], Served>,
    /// Per carrier peer (by public key): the clients behind it.
    pub behind: BTreeMap<[u8; 32], Vec<Carried>>,
    /// (peer, host address) pairs: that peer may send to that address through us.
    pub grants: Vec<([u8; 32], IpNet)>,
    /// (member, served client address) pairs: that member may send to the client only
    /// inside a flow the client opened (the client may reach it, not the other way).
    pub reply_grants: Vec<([u8; 32], IpNet)>,
    /// (member, served client address, ports on the client the member may open): the
    /// rules the concentrator holds a granted member to on what it forwards to the client
    /// (from the member entry's `client_ports`). Sorted; one per (member, address).
    pub client_rules: Vec<([u8; 32], IpAddr, Rules)>,
    /// Public keys of entries that must not become ordinary peers (clients seen through
    /// a carrier, refused client entries).
    pub not_peers: BTreeSet<[u8; 32]>,
    /// Refusals as (peer id, why).
    pub refused: Vec<(String, String)>,
}

impl ClientPlan {
    /// The addresses of the clients we serve.
    pub fn served_addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.served.values().flat_map(|s| s.addrs.iter().copied())
    }
}

/// Whether `identity` is a client's.
pub fn is_client_identity(identity: &str) -> bool {
    identity.starts_with(tabbify_api::CLIENT_IDENTITY_PREFIX)
}

fn host(a: IpAddr) -> IpNet {
    IpNet::host(a)
}

/// The client's addresses: its ULA, and its IPv4 if inside the mesh and no member's.
fn client_addrs(
    e: &RosterEntry,
    member_v4: &BTreeSet<IpAddr>,
    refused: &mut Vec<(String, String)>,
) -> Vec<IpAddr> {
    let mut addrs = vec![IpAddr::V6(e.ula)];
    if let Some(v4) = e.ipv4 {
        let v4 = IpAddr::V4(v4);
        if !mesh_v4().contains(v4) {
            refused.push((
                e.peer_id.clone(),
                format!("client IPv4 {v4} outside 100.64.0.0/10"),
            ));
        } else if member_v4.contains(&v4) {
            refused.push((e.peer_id.clone(), format!("client IPv4 {v4} is a member's")));
        } else {
            addrs.push(v4);
        }
    }
    addrs
}

/// Computes the plan from the accepted roster `entries`, our peer id `me` and whether we
/// run with `--concentrator`.
pub fn plan<'a>(
    entries: impl IntoIterator<Item = &'a RosterEntry>,
    me: &str,
    concentrator: bool,
) -> ClientPlan {
    let mut entries: Vec<&RosterEntry> = entries.into_iter().collect();
    entries.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    let mut p = ClientPlan::default();
    // Members: by peer id (carriers), and who owns which host address (grants).
    let members: BTreeMap<&str, (&RosterEntry, [u8; 32])> = entries
        .iter()
        .filter(|e| !is_client_identity(&e.identity) && !e.client && e.via.is_none())
        .filter_map(|e| Some((e.peer_id.as_str(), (*e, decode_key(&e.public_key)?))))
        .collect();
    let mut owner: BTreeMap<IpAddr, [u8; 32]> = BTreeMap::new();
    for (e, key) in members.values() {
        owner.insert(IpAddr::V6(e.ula), *key);
        for a in &e.hosted_app_ulas {
            owner.insert(IpAddr::V6(*a), *key);
        }
        if let Some(v4) = e.ipv4.filter(|v| mesh_v4().contains(IpAddr::V4(*v))) {
            owner.insert(IpAddr::V4(v4), *key);
        }
    }
    let member_v4: BTreeSet<IpAddr> = owner.keys().filter(|a| a.is_ipv4()).copied().collect();
    let mut served_may_use: Vec<([u8; 32], Vec<IpAddr>, &Vec<String>)> = Vec::new();
    let mut taken_v4: BTreeSet<IpAddr> = BTreeSet::new();
    for e in &entries {
        let client_id = is_client_identity(&e.identity);
        if !client_id && !e.client && e.via.is_none() {
            continue;
        }
        let Some(key) = decode_key(&e.public_key) else {
            continue;
        };
        let refuse = |p: &mut ClientPlan, why: String| {
            p.not_peers.insert(key);
            p.refused.push((e.peer_id.clone(), why));
        };
        if !client_id {
            refuse(
                &mut p,
                format!(
                    "a member identity {:?} marked as a client (client or via): refused",
                    e.identity
                ),
            );
            continue;
        }
        if e.client && e.via.is_some() {
            refuse(
                &mut p,
                "both a client we serve and one behind another peer".into(),
            );
            continue;
        }
        let mut addrs = client_addrs(e, &member_v4, &mut p.refused);
        // One client per IPv4 (first by peer id).
        addrs.retain(|a| !a.is_ipv4() || taken_v4.insert(*a));
        if e.client {
            if !concentrator {
                refuse(
                    &mut p,
                    "a client to serve, but this node was not started with --concentrator".into(),
                );
                continue;
            }
            p.served.insert(
                key,
                Served {
                    peer_id: e.peer_id.clone(),
                    key,
                    addrs: addrs.clone(),
                },
            );
            served_may_use.push((key, addrs, &e.may_use));
            continue;
        }
        let Some(via) = &e.via else {
            refuse(&mut p, "a client identity without a concentrator".into());
            continue;
        };
        p.not_peers.insert(key);
        if via == me {
            p.refused.push((
                e.peer_id.clone(),
                "via names us; the clients we serve come as client entries".into(),
            ));
            continue;
        }
        let Some((_, carrier)) = members.get(via.as_str()) else {
            p.refused.push((
                e.peer_id.clone(),
                format!("via {via} is not a member in our roster"),
            ));
            continue;
        };
        let (outbound, inbound) = port_rules(&e.ports);
        p.behind.entry(*carrier).or_default().push(Carried {
            peer_id: e.peer_id.clone(),
            addrs,
            outbound,
            inbound,
        });
    }
    if !concentrator {
        return p;
    }
    // Grants: each served client to the member addresses of its may_use (and those
    // members back to it), each member to the served clients its may_use names.
    let served_owner: BTreeMap<IpAddr, [u8; 32]> = p
        .served
        .values()
        .flat_map(|s| s.addrs.iter().map(|a| (*a, s.key)))
        .collect();
    for (k, addrs, may_use) in served_may_use {
        for m in may_use {
            let Some(a) = mesh_host(m) else {
                p.refused.push((
                    peer_id_of(&p, &k),
                    format!("may_use {m:?} is not a mesh host address"),
                ));
                continue;
            };
            let Some(member) = owner.get(&a) else {
                p.refused.push((
                    peer_id_of(&p, &k),
                    format!("may_use {a} is no member's address in our roster"),
                ));
                continue;
            };
            p.grants.push((k, host(a)));
            for own in &addrs {
                p.reply_grants.push((*member, host(*own)));
            }
        }
    }
    // A member's grant to a client comes with the rules between them (`client_ports`):
    // without rules for that client (an older coordinator) it is only a reply grant.
    for (e, key) in members.values() {
        for m in &e.may_use {
            let Some((a, k)) = mesh_host(m).and_then(|a| Some((a, served_owner.get(&a)?))) else {
                continue;
            };
            let id = p
                .served
                .get(k)
                .map(|s| s.peer_id.as_str())
                .unwrap_or_default();
            match e.client_ports.iter().find(|c| c.client == id) {
                Some(c) => {
                    p.grants.push((*key, host(a)));
                    p.client_rules.push((*key, a, port_rules(&c.ports).0));
                }
                None => p.reply_grants.push((*key, host(a))),
            }
        }
    }
    p.client_rules.sort_by_key(|r| (r.0, r.1));
    p.client_rules.dedup_by(|a, b| (a.0, a.1) == (b.0, b.1));
    p.grants.sort();
    p.grants.dedup();
    // A member granted the client outright needs no reply grant.
    let full: BTreeSet<([u8; 32], IpNet)> = p.grants.iter().copied().collect();
    p.reply_grants.retain(|g| !full.contains(g));
    p.reply_grants.sort();
    p.reply_grants.dedup();
    p
}

fn peer_id_of(p: &ClientPlan, k: &[u8; 32]) -> String {
    p.served
        .get(k)
        .map(|s| s.peer_id.clone())
        .unwrap_or_default()
}

/// `s` as a host address inside the mesh (`fd5a:1f00::/24`, `100.64.0.0/10`): a bare
/// address or a /128 or /32.
fn mesh_host(s: &str) -> Option<IpAddr> {
    let a = match s.parse::<IpNet>() {
        Ok(n) if n.prefix_len() == if n.addr().is_ipv4() { 32 } else { 128 } => n.addr(),
        Ok(_) => return None,
        Err(_) => s.parse::<IpAddr>().ok()?,
    };
    (mesh_v6().contains(a) || mesh_v4().contains(a)).then_some(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use tabbify_api::{ula, ClientPorts, PortRange, PortRules};

    fn b64(k: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([k; 32])
    }

    fn member(name: &str, k: u8, v4: u8) -> RosterEntry {
        let identity = format!("{name}.example");
        let mut e = tabbify_api::RosterEntry {
            peer_id: ula::identity_peer_id(&identity),
            ula: ula::identity_ula(&identity),
            identity,
            display_name: name.into(),
            public_key: b64(k),
            ipv4: Some(Ipv4Addr::new(100, 64, 0, v4)),
            ..serde_json::from_value(serde_json::json!({
                "peer_id": "", "identity": "", "ula": "::", "display_name": "",
                "tags": [], "public_key": "", "endpoints": [],
                "reflexive_endpoint": "192.0.2.1:51820", "hosted_app_ulas": [],
                "ports": {"outbound": [], "inbound": []}
            }))
            .unwrap()
        };
        e.tags = vec![];
        e
    }

    fn client(name: &str, k: u8, v4: u8) -> RosterEntry {
        let mut e = member(name, k, v4);
        e.identity = format!("client/{name}");
        e.peer_id = ula::identity_peer_id(&e.identity);
        e.ula = ula::identity_ula(&e.identity);
        e
    }

    fn ports(out: u16, inb: u16) -> PortRules {
        PortRules {
            outbound: vec![PortRange {
                first: out,
                last: out,
            }],
            inbound: vec![PortRange {
                first: inb,
                last: inb,
            }],
            ..PortRules::default()
        }
    }

    /// The concentrator's roster: K is served, may use P's ULA and app; P may reach K.
    /// Q is a member K may not see. Grants both ways for P, none for Q.
    #[test]
    fn a_concentrator_serves_its_clients_and_grants_by_may_use() {
        let mut p = member("p", 2, 2);
        let app = ula::app_ula(&uuid::Uuid::from_u128(7));
        p.hosted_app_ulas = vec![app];
        let q = member("q", 3, 3);
        let mut k = client("k", 9, 9);
        k.client = true;
        k.ports = ports(0, 53);
        k.may_use = vec![
            format!("{}/128", p.ula),
            app.to_string(),
            "100.64.0.2/32".into(),
        ];
        let kula = k.ula;
        p.may_use = vec![
            format!("{kula}/128"),
            "100.64.0.9/32".into(),
            "10.1.0.0/16".into(),
        ];
        p.client_ports = vec![ClientPorts {
            client: k.peer_id.clone(),
            ports: ports(22, 8730),
        }];
        let plan = plan([&p, &q, &k], "me", true);
        assert_eq!(plan.served.len(), 1);
        let s = &plan.served[&[9; 32]];
        assert_eq!(
            s.addrs,
            vec![IpAddr::V6(kula), IpAddr::V4(Ipv4Addr::new(100, 64, 0, 9))]
        );
        assert!(plan.refused.is_empty(), "{:?}", plan.refused);
        let g = |k: u8, a: IpAddr| plan.grants.contains(&([k; 32], IpNet::host(a)));
        assert!(g(9, IpAddr::V6(p.ula)) && g(9, IpAddr::V6(app)));
        assert!(g(9, "100.64.0.2".parse().unwrap()));
        assert!(g(2, IpAddr::V6(kula)) && g(2, "100.64.0.9".parse().unwrap()));
        assert!(plan.reply_grants.is_empty(), "p is granted outright");
        // With the rules between p and k for each of k's addresses.
        let rules = vec![(Proto::Both, 22, 22)];
        assert_eq!(
            plan.client_rules,
            vec![
                (
                    [2; 32],
                    IpAddr::V4(Ipv4Addr::new(100, 64, 0, 9)),
                    rules.clone()
                ),
                ([2; 32], IpAddr::V6(kula), rules),
            ]
        );
        assert!(
            !plan.grants.iter().any(|(k, _)| *k == [3; 32]),
            "Q: nothing"
        );
        assert!(!g(9, IpAddr::V6(q.ula)));
        assert_eq!(plan.served_addrs().count(), 2);
        // p without its own may_use: only a reply grant back to k.
        let mut p2 = p.clone();
        p2.may_use.clear();
        let plan = super::plan([&p2, &q, &k], "me", true);
        assert!(!plan.grants.iter().any(|(k, _)| *k == [2; 32]));
        assert!(plan
            .reply_grants
            .contains(&([2; 32], IpNet::host(IpAddr::V6(kula)))));
        assert_eq!(plan.reply_grants.len(), 2);
    }

    /// A member granted a client (its `may_use`) without the rules between them — an
    /// older coordinator, or rules naming another client — fails closed: only a reply
    /// grant, no grant and no rules, so it cannot open a flow to the client.
    #[test]
    fn a_grant_without_client_ports_is_only_a_reply_grant() {
        let mut p = member("p", 2, 2);
        let mut k = client("k", 9, 9);
        k.client = true;
        let other = client("other", 10, 10);
        p.may_use = vec![format!("{}/128", k.ula), "100.64.0.9/32".into()];
        for cp in [
            vec![],
            vec![ClientPorts {
                client: other.peer_id.clone(),
                ports: ports(0, 0),
            }],
        ] {
            p.client_ports = cp;
            let plan = plan([&p, &k], "me", true);
            assert!(plan.grants.is_empty(), "{:?}", plan.grants);
            assert!(plan.client_rules.is_empty(), "{:?}", plan.client_rules);
            assert_eq!(
                plan.reply_grants,
                vec![
                    ([2; 32], IpNet::host("100.64.0.9".parse().unwrap())),
                    ([2; 32], IpNet::host(IpAddr::V6(k.ula))),
                ]
            );
        }
    }

    /// The attacker is the coordinator, talking to a member that is no concentrator: it
    /// hands it client entries to serve, a member's identity marked `via` (to route that
    /// member's ULA through another), a `via` naming a client, ourselves or nobody, and a
    /// client IPv4 that is a member's or outside the mesh. Nothing of it is served or
    /// carried; all of it is refused with a reason.
    #[test]
    fn a_malicious_coordinator_cannot_make_a_hub_or_reroute_members() {
        let c = member("c", 1, 1);
        let p = member("p", 2, 2);
        let mut k = client("k", 9, 9);
        k.client = true;
        let mut fake = member("victim", 4, 4);
        fake.via = Some(c.peer_id.clone());
        let mut k2 = client("k2", 10, 2); // IPv4 of member p
        k2.via = Some(c.peer_id.clone());
        k2.ports = ports(22, 8730);
        let mut k3 = client("k3", 11, 11);
        k3.via = Some(k2.peer_id.clone());
        let mut k4 = client("k4", 12, 12);
        k4.via = Some("me".into());
        let mut k5 = client("k5", 13, 13);
        k5.via = Some("nobody".into());
        let k6 = client("k6", 14, 14); // no flag at all
        let mut k7 = client("k7", 15, 15);
        k7.ipv4 = Some(Ipv4Addr::new(192, 168, 1, 1));
        k7.via = Some(c.peer_id.clone());
        let plan = plan(
            [&c, &p, &k, &fake, &k2, &k3, &k4, &k5, &k6, &k7],
            "me",
            false,
        );
        assert!(plan.served.is_empty());
        assert!(plan.grants.is_empty());
        // Only k2 (ULA only: its IPv4 is p's) and k7 (ULA only) are behind c.
        let behind = &plan.behind[&[1; 32]];
        assert_eq!(behind.len(), 2, "{behind:?}");
        assert_eq!(behind[0].addrs, vec![IpAddr::V6(k2.ula)]);
        assert_eq!(behind[0].outbound, vec![(Proto::Both, 22, 22)]);
        assert_eq!(behind[0].inbound, vec![(Proto::Both, 8730, 8730)]);
        assert_eq!(behind[1].addrs, vec![IpAddr::V6(k7.ula)]);
        assert_eq!(plan.behind.len(), 1);
        for key in [9u8, 4, 10, 11, 12, 13, 14, 15] {
            assert!(plan.not_peers.contains(&[key; 32]), "{key}");
        }
        assert!(!plan.not_peers.contains(&[1; 32]) && !plan.not_peers.contains(&[2; 32]));
        let why = |id: &str| {
            plan.refused
                .iter()
                .filter(|(p, _)| p == id)
                .map(|(_, w)| w.clone())
                .collect::<Vec<_>>()
                .join("; ")
        };
        assert!(why(&k.peer_id).contains("--concentrator"));
        assert!(why(&fake.peer_id).contains("member identity"));
        assert!(why(&k2.peer_id).contains("is a member's"));
        assert!(why(&k3.peer_id).contains("not a member"));
        assert!(why(&k4.peer_id).contains("names us"));
        assert!(why(&k5.peer_id).contains("not a member"));
        assert!(why(&k6.peer_id).contains("without a concentrator"));
        assert!(why(&k7.peer_id).contains("outside 100.64.0.0/10"));
    }

    /// A concentrator's coordinator grants a client prefixes, addresses outside the mesh
    /// and addresses nobody in the roster holds: only member host addresses become grants.
    #[test]
    fn a_client_is_granted_only_member_host_addresses() {
        let p = member("p", 2, 2);
        let mut k = client("k", 9, 9);
        k.client = true;
        k.may_use = vec![
            "fd5a:1f00::/32".into(),
            "100.64.0.0/10".into(),
            "10.1.2.3".into(),
            "0.0.0.0/0".into(),
            Ipv6Addr::new(0xfd5a, 0x1f00, 9, 9, 9, 9, 9, 9).to_string(),
            "junk".into(),
            p.ula.to_string(),
        ];
        let plan = plan([&p, &k], "me", true);
        assert_eq!(
            plan.grants.iter().filter(|(k, _)| *k == [9; 32]).count(),
            1,
            "{:?}",
            plan.grants
        );
        assert_eq!(plan.refused.len(), 6, "{:?}", plan.refused);
    }
}
