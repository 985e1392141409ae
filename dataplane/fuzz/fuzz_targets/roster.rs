//! Fuzz the joiner's roster handling (`Roster::apply` through the joiner's `Machine`) as a
//! malicious coordinator would drive it: random sequences of snapshots, upserts, removals
//! and hole punches built from a small vocabulary of identities, keys, ULAs (derived or
//! forged), app ULAs (in and out of the app prefix, contested) and endpoints (usable or
//! not), or raw SSE bytes decoded and parsed as the stream would. After every event:
//! * no route outside `fd5a:1f00::/32` and `fd5a:1f02::/32` was ever added;
//! * the table the actions build (a model: public key → AllowedIPs) gives every prefix to
//!   at most one peer, and the kernel routes are exactly the union of its AllowedIPs;
//! * every accepted roster entry passes the per-entry checks, and no two share a ULA, a key
//!   or an app ULA;
//! * stock WireGuard clients (issue 15: `client/…` identities, `client`/`via` flags, forged
//!   on members too, `may_use` with junk): a table peer is a member, or a client this node
//!   serves only when it runs with `--concentrator`; every grant is a host address in the
//!   mesh (`fd5a:1f00::/24`, `100.64.0.0/10`); `client_ports` forged on any entry, for
//!   any id: a member granted a served client always has rules for it (else only a reply
//!   grant), and rules exist only with such a grant.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tabbify_api::{
    ula, ClientPorts, HeartbeatResponse, HolePunch, PeerRemove, PortRange, PortRules,
    RegisterResponse, RosterEntry, RosterSnapshot, SseDecoder, SseEvent,
};
use tabbify_dataplane::core::net::IpNet;
use tabbify_dataplane::join::logic::{roster, Action, Config, Machine};

const IDS: [&str; 8] = ["me", "a", "b", "c", "d", "e", "client/x", "client/y"];
const MAY_USE: [&str; 6] = [
    "fd5a:1f02::1",
    "10.0.0.0/8",
    "100.64.0.7/32",
    "fd5a:1f00::/32",
    "junk",
    "0.0.0.0/0",
];
const APPS: [&str; 6] = [
    "fd5a:1f02::1",
    "fd5a:1f02::2",
    "fd5a:1f02::3",
    "2001:db8::1",
    "fd5a:1f00::1",
    "::ffff:10.0.0.1",
];
const ENDPOINTS: [&str; 8] = [
    "198.51.100.1:51820",
    "127.0.0.1:51821",
    "[2001:db8::2]:51820",
    "10.0.0.2:4000",
    "0.0.0.0:51820",
    "224.0.0.1:51820",
    "198.51.100.1:0",
    "[fd5a:1f00::1]:51820",
];

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
}

fn b64(k: u8) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([k; 32])
}

fn entry(b: &mut Bytes<'_>) -> Option<RosterEntry> {
    let id = IDS[usize::from(b.next()?) % IDS.len()];
    let flags = b.next()?;
    let key = b.next()? % 5;
    let mut e = RosterEntry {
        peer_id: ula::identity_peer_id(id),
        identity: id.into(),
        ula: ula::identity_ula(id),
        display_name: id.into(),
        tags: vec![],
        public_key: b64(key),
        endpoints: vec![ENDPOINTS[usize::from(flags & 7) % ENDPOINTS.len()]
            .parse()
            .ok()?],
        reflexive_endpoint: ENDPOINTS[usize::from(flags >> 5) % ENDPOINTS.len()]
            .parse()
            .ok()?,
        mapped_endpoints: vec![],
        nat: Default::default(),
        hosted_app_ulas: Vec::new(),
        home_relay: None,
        ports: PortRules {
            outbound: vec![PortRange::ALL],
            inbound: vec![PortRange::ALL],
            ..Default::default()
        },
        stale: false,
        ipv4: None,
        routes: vec![],
        exit_node: false,
        may_use: vec![],
        route_ports: vec![],
        may_use_ports: vec![],
        via: None,
        client: false,
        client_ports: vec![],
    };
    let cflags = b.next()?;
    e.client = cflags & 1 != 0;
    if cflags & 2 != 0 {
        e.via = Some(ula::identity_peer_id(
            IDS[usize::from(cflags >> 5) % IDS.len()],
        ));
    }
    if cflags & 4 != 0 {
        e.ipv4 = Some(std::net::Ipv4Addr::new(100, 64, 0, cflags >> 3));
    }
    if cflags & 8 != 0 {
        e.may_use
            .push(ula::identity_ula(IDS[usize::from(cflags >> 4) % IDS.len()]).to_string());
        e.may_use
            .push(MAY_USE[usize::from(cflags >> 5) % MAY_USE.len()].into());
    }
    if cflags & 0x10 != 0 {
        // Rules for a client (or a member, or nobody: forged), on any entry.
        e.client_ports.push(ClientPorts {
            client: ula::identity_peer_id(IDS[usize::from(cflags >> 2) % IDS.len()]),
            ports: PortRules {
                outbound: vec![PortRange {
                    first: u16::from(flags),
                    last: u16::from(cflags),
                }],
                ..Default::default()
            },
        });
    }
    let apps = b.next()?;
    e.stale = apps & 0x40 != 0;
    for (i, a) in APPS.iter().enumerate() {
        if apps & (1 << i) != 0 {
            e.hosted_app_ulas.push(a.parse().ok()?);
        }
    }
    match flags & 0x18 {
        0x08 => e.ula = Ipv6Addr::new(0xfd5a, 0x1f00, 0, 0, 0, 0, 0, 0xdead),
        0x10 => e.peer_id = ula::identity_peer_id("someone-else"),
        0x18 if apps & 0x80 != 0 => e.public_key = "not a key".into(),
        _ => {}
    }
    Some(e)
}

fn event(b: &mut Bytes<'_>) -> Option<SseEvent> {
    Some(match b.next()? % 4 {
        0 => {
            let n = b.next()? % 6;
            let mut peers = Vec::new();
            for _ in 0..n {
                peers.push(entry(b)?);
            }
            SseEvent::Snapshot(RosterSnapshot {
                policy_revision: 1,
                peers,
            })
        }
        1 => SseEvent::PeerUpsert(entry(b)?),
        2 => SseEvent::PeerRemove(PeerRemove {
            peer_id: ula::identity_peer_id(IDS[usize::from(b.next()?) % IDS.len()]),
            reason: "gone".into(),
        }),
        _ => SseEvent::HolePunch(HolePunch {
            peer_id: String::new(),
            public_key: b64(b.next()? % 5),
            endpoint: ENDPOINTS[usize::from(b.next()?) % ENDPOINTS.len()]
                .parse()
                .ok()?,
        }),
    })
}

fn in_mesh(n: &IpNet) -> bool {
    match n.addr() {
        IpAddr::V6(a) => ula::is_peer_ula(&a) || ula::is_app_ula(&a),
        // Mesh IPv4 /32s (peers' and clients').
        IpAddr::V4(a) => n.prefix_len() == 32 && a.octets()[0] == 100 && a.octets()[1] & 0xc0 == 64,
    }
}

/// The table and routes as the actions build them.
#[derive(Default)]
struct Model {
    table: BTreeMap<[u8; 32], Vec<IpNet>>,
    routes: BTreeSet<IpNet>,
}

impl Model {
    fn apply(&mut self, m: &mut Machine) {
        while let Some(a) = m.poll_action() {
            match a {
                Action::UpsertPeer { config, .. } => {
                    self.table.insert(config.public_key, config.allowed_ips);
                }
                Action::RemovePeer { public_key, .. } => {
                    self.table.remove(&public_key);
                }
                Action::ClearPeers => self.table.clear(),
                Action::Routes { add, del } => {
                    for n in &add {
                        assert!(in_mesh(n), "route outside the mesh prefixes: {n:?}");
                    }
                    for n in del {
                        self.routes.remove(&n);
                    }
                    self.routes.extend(add);
                }
                _ => {}
            }
            // Each table write leaves every prefix with at most one peer.
            let mut owner: BTreeMap<IpNet, [u8; 32]> = BTreeMap::new();
            for (k, ips) in &self.table {
                for n in ips {
                    if let Some(other) = owner.insert(*n, *k) {
                        panic!("{n:?} held by two peers ({other:?}, {k:?})");
                    }
                }
            }
        }
    }

    fn check(&self, m: &Machine, concentrator: bool) {
        use tabbify_dataplane::join::logic::clients::is_client_identity;
        for key in self.table.keys() {
            let b = {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(key)
            };
            for e in m.roster().entries().filter(|e| e.public_key == b) {
                if is_client_identity(&e.identity) {
                    assert!(
                        concentrator && e.client && e.via.is_none(),
                        "a client as a table peer: {e:?}"
                    );
                } else {
                    assert!(
                        !e.client && e.via.is_none(),
                        "a flagged member as a peer: {e:?}"
                    );
                }
            }
        }
        // A member's grant to a served client always comes with its rules, and rules only
        // with such a grant (fail closed: `client_ports` absent means reply grant only).
        let plan = m.client_plan();
        let served: BTreeSet<IpAddr> = plan.served_addrs().collect();
        for (k, a, _) in &plan.client_rules {
            assert!(served.contains(a), "rules for an address nobody is served at: {a}");
            assert!(plan.grants.contains(&(*k, IpNet::host(*a))), "rules without a grant: {a}");
        }
        for (k, n) in &plan.grants {
            if served.contains(&n.addr()) && !plan.served.contains_key(k) {
                assert!(
                    plan.client_rules.iter().any(|(rk, ra, _)| rk == k && *ra == n.addr()),
                    "a member granted client address {n:?} without rules"
                );
            }
        }
        for (_, n) in m.grants().iter().chain(&m.client_plan().reply_grants) {
            let host = n.prefix_len() == if n.addr().is_ipv4() { 32 } else { 128 };
            assert!(host && in_mesh(n), "grant outside the mesh hosts: {n:?}");
        }
        let union: BTreeSet<IpNet> = self.table.values().flatten().copied().collect();
        assert_eq!(union, self.routes, "kernel routes differ from the table");
        let (mut ulas, mut keys, mut apps) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for e in m.roster().entries() {
            let key = roster::check_entry(e).expect("accepted entries pass the checks");
            assert!(ulas.insert(e.ula), "two peers with {}", e.ula);
            assert!(keys.insert(key), "two peers with one key");
            for a in &e.hosted_app_ulas {
                assert!(apps.insert(*a), "two peers with {a}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let t = Instant::now();
    let mut m = Machine::new(Config {
        peer_id: ula::identity_peer_id("me"),
        ula: ula::identity_ula("me"),
        name: "me".into(),
        tags: vec![],
        has_join_token: true,
        apps: vec![],
        // No rotation falls due while the target runs: it drives the roster, not the key.
        key_max_age: Duration::from_secs(90 * 86_400),
        rotate_at: t + Duration::from_secs(90 * 86_400),
        coordinators: 1,
        routes: tabbify_dataplane::join::logic::routes::Settings {
            concentrator: mode & 2 != 0,
            ..Default::default()
        },
    });
    let concentrator = mode & 2 != 0;
    let mut model = Model::default();
    model.apply(&mut m);
    let reflexive: SocketAddr = "203.0.113.9:51820".parse().unwrap();
    m.handle_registered(
        t,
        Ok(RegisterResponse {
            peer_id: ula::identity_peer_id("me"),
            ula: ula::identity_ula("me"),
            display_name: "me".into(),
            tags: vec![],
            may_host_apps: true,
            reflexive_endpoint: reflexive,
            heartbeat_interval_secs: 10,
            roster: vec![],
            stun_servers: vec![],
            relays: vec![],
            dns_domain: tabbify_api::dns::DEFAULT_DOMAIN.to_owned(),
            ipv4: None,
            routes: vec![],
        }),
    );
    model.apply(&mut m);
    m.handle_heartbeat(
        t,
        Ok(HeartbeatResponse {
            heartbeat_interval_secs: 10,
            reflexive_endpoint: reflexive,
            stun_servers: vec![],
            relays: vec![],
        }),
    );
    m.handle_stream_opened(t, Ok(()));
    model.apply(&mut m);
    if mode & 1 == 0 {
        let mut b = Bytes(rest);
        while let Some(ev) = event(&mut b) {
            m.handle_event(t, None, ev);
            model.apply(&mut m);
            model.check(&m, concentrator);
        }
    } else {
        let mut dec = SseDecoder::with_limit(1 << 16);
        let Ok(frames) = dec.feed(rest) else {
            return;
        };
        for f in frames {
            if let Ok(ev) = SseEvent::parse(&f.event, &f.data) {
                m.handle_event(t, f.id.and_then(|s| s.parse().ok()), ev);
                model.apply(&mut m);
                model.check(&m, concentrator);
            }
        }
    }
});
