//! Fuzz the joiner's route plan (`join::logic::routes::plan`) as a malicious coordinator
//! would feed it: peers with random mesh IPv4s, offered routes (canonical, not canonical,
//! mesh space, special ranges, default routes, garbage), exit flags and `may_use` lists,
//! random liveness and settings. After every plan:
//! * no kernel route is a default route or overlaps the mesh (`fd5a:1f00::/24`,
//!   `100.64.0.0/10`) unless it is a peer's mesh IPv4 /32;
//! * every routed prefix (not a /32 mesh IPv4, not an exit prefix) has exactly one peer;
//! * only the chosen exit node carries exit prefixes, and none covers a mesh address;
//! * every grant lies inside an advertised route, or is an exit prefix while we advertise
//!   an exit node; every port-limited grant lies inside an advertised route;
//! * every port-limited routed prefix is in its peer's AllowedIPs and the kernel routes.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use tabbify_dataplane::core::filter::Proto;
use tabbify_dataplane::core::net::IpNet;
use tabbify_dataplane::join::logic::routes::{
    covers, default_v4, default_v6, exit_prefixes, mesh_v4, mesh_v6, overlaps, plan, ExitChoice,
    Offer, Settings,
};

const PREFIXES: [&str; 16] = [
    "10.1.0.0/16",
    "10.1.5.0/24",
    "10.1.0.1/16",
    "0.0.0.0/0",
    "::/0",
    "100.64.0.0/10",
    "100.0.0.0/8",
    "fd5a:1f00::/32",
    "fd5a::/16",
    "fd00:1::/64",
    "127.0.0.0/8",
    "192.168.1.0/24",
    "nonsense",
    "224.0.0.0/4",
    "10.0.0.0/8",
    "fe80::/64",
];

fuzz_target!(|data: &[u8]| {
    let mut it = data.iter().copied();
    let mut next = move || it.next();
    let Some(flags) = next() else { return };
    let settings = Settings {
        advertised: vec!["10.1.0.0/16".parse().unwrap()],
        advertise_exit_node: flags & 1 != 0,
        exit_node: if flags & 2 != 0 {
            ExitChoice::Peer("p1".into())
        } else {
            ExitChoice::Off
        },
        accept_routes: flags & 4 == 0,
        concentrator: flags & 8 != 0,
    };
    let live_mask = next().unwrap_or(0);
    let mut offers = Vec::new();
    for k in 0..4u8 {
        let Some(n) = next() else { break };
        let pick = |b: u8| PREFIXES[usize::from(b) % PREFIXES.len()].to_string();
        let routes = (0..(n % 4)).filter_map(|_| next()).map(pick).collect();
        let may_use = (0..((n >> 2) % 3))
            .filter_map(|_| next())
            .map(pick)
            .collect();
        // Port-limited routes and grants: the same prefixes, TCP 443.
        let limited = |b: u8| (pick(b), vec![(Proto::Tcp, 443, 443)]);
        let route_ports = (0..((n >> 4) % 2))
            .filter_map(|_| next())
            .map(limited)
            .collect();
        let may_use_ports = (0..((n >> 5) % 2))
            .filter_map(|_| next())
            .map(limited)
            .collect();
        offers.push(Offer {
            peer_id: format!("p{k}"),
            name: format!("n{k}"),
            key: [k; 32],
            ipv4: next().map(|b| Ipv4Addr::new(100, 64 + (b & 0x7f), 0, b)),
            routes,
            exit_node: n & 0x40 != 0,
            may_use,
            route_ports,
            may_use_ports,
        });
    }
    let underlay: Vec<IpAddr> = vec!["192.168.1.9".parse().unwrap()];
    let p = plan(&offers, &settings, &underlay, &|k: &[u8; 32]| {
        live_mask & (1 << (k[0] & 7)) != 0
    });
    let exit: Vec<IpNet> = [default_v4(), default_v6()]
        .iter()
        .flat_map(exit_prefixes)
        .collect();
    for k in &p.kernel {
        assert!(k.prefix_len() > 0, "{k}");
        let mesh_ip = k.prefix_len() == 32 && mesh_v4().contains(k.addr());
        assert!(mesh_ip || !overlaps(k, &mesh_v4()), "{k}");
        assert!(!overlaps(k, &mesh_v6()), "{k}");
        assert!(!exit.contains(k), "{k}");
    }
    let mut owners: BTreeMap<IpNet, usize> = BTreeMap::new();
    for (key, nets) in &p.allowed {
        for n in nets {
            if exit.contains(n) {
                assert_eq!(p.exit, Some(*key));
                continue;
            }
            if n.prefix_len() == 32 && mesh_v4().contains(n.addr()) {
                continue;
            }
            *owners.entry(*n).or_default() += 1;
        }
    }
    assert!(owners.values().all(|&c| c == 1), "{owners:?}");
    for (key, limited) in &p.routed_ports {
        for (n, _) in limited {
            assert!(p.allowed[key].contains(n) && p.kernel.contains(n), "{n}");
        }
    }
    for (_, g, _) in &p.port_grants {
        assert!(settings.advertised.iter().any(|a| covers(a, g)), "{g}");
    }
    for (_, g) in &p.grants {
        let in_route = settings.advertised.iter().any(|a| covers(a, g));
        assert!(
            in_route || (settings.advertise_exit_node && exit.contains(g)),
            "{g}"
        );
        assert!(
            !overlaps(g, &mesh_v6()) && (!overlaps(g, &mesh_v4()) || in_route),
            "{g}"
        );
    }
});
