//! Fuzz the joiner's path selection (`join::logic::paths`) as a malicious coordinator and
//! peers would drive it: advertised relay URLs (raw bytes as strings, or a vocabulary of
//! good, loopback, link-local, mesh and non-https ones), roster home relays, NAT claims,
//! candidates, engine observations, underlay changes and time. After every step:
//! * `check_relay_url` never panics, and every relay kept is https with a port, and an
//!   advertised one never has a loopback, link-local or mesh IP literal;
//! * every relay a peer uses and every session wanted is in the kept set, and at most
//!   `MAX_SESSIONS` sessions are wanted;
//! * under `--force-relay` no direct probe is ever asked for;
//! * the path counts add up to the peers tracked.
#![no_main]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tabbify_api::NatClass;
use tabbify_dataplane::join::logic::paths::{
    check_relay_url, Observed, Origin, Path, PathAction, Paths, PeerFacts, MAX_SESSIONS,
};

const URLS: [&str; 10] = [
    "https://r1.example.net:443",
    "https://r2.example.net:443",
    "https://[2001:db8::1]:8443",
    "https://127.0.0.1:443",
    "https://[::1]:443",
    "https://169.254.0.1:443",
    "https://[fd5a:1f00::1]:443",
    "http://r1.example.net:443",
    "https://localhost:443",
    "https://r3.example.net:65535/",
];
const NATS: [NatClass; 5] = [
    NatClass::Unknown,
    NatClass::None,
    NatClass::EndpointIndependent,
    NatClass::EndpointDependent,
    NatClass::UdpBlocked,
];

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn url(&mut self) -> Option<String> {
        let b = self.next()?;
        if b & 0x80 == 0 {
            return Some(URLS[usize::from(b) % URLS.len()].to_owned());
        }
        let n = usize::from(b & 0x3f).min(self.0.len());
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(String::from_utf8_lossy(s).into_owned())
    }
}

fn check(p: &Paths, force: bool, acts: &[PathAction]) {
    for r in p.relays() {
        assert!(r.url.starts_with("https://") && r.port != 0, "{r:?}");
        if r.origin == Origin::Advertised {
            if let Ok(ip) = r.host.parse::<IpAddr>() {
                let bad = match ip {
                    IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
                    IpAddr::V6(v6) => {
                        v6.is_loopback()
                            || (v6.segments()[0] & 0xffc0) == 0xfe80
                            || tabbify_api::ula::is_peer_ula(&v6)
                    }
                };
                assert!(!bad, "advertised relay kept: {r:?}");
            }
        }
    }
    let kept = |u: &str| p.relays().iter().any(|r| r.url == u);
    let wanted = p.wanted_sessions();
    assert!(wanted.len() <= MAX_SESSIONS, "{wanted:?}");
    assert!(wanted.iter().all(|u| kept(u)), "{wanted:?}");
    let mut n = 0;
    for k in p.peers() {
        let v = p.view(&k).unwrap();
        if let Some(r) = &v.relay {
            assert!(kept(r), "peer relay {r} not kept");
        }
        assert_eq!(v.path == Path::Relay, v.relay.is_some());
        n += 1;
    }
    let (d, r) = p.counts();
    assert_eq!(d + r, n);
    for a in acts {
        if let PathAction::UseRelay { relay, .. } = a {
            assert!(kept(relay), "{relay}");
        }
        if force {
            assert!(!matches!(a, PathAction::Probe { .. }), "probe while forced");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let Some(flags) = b.next() else { return };
    let force = flags & 1 == 1;
    let mut p = Paths::new(force);
    let start = Instant::now();
    let mut now = start;
    while let Some(op) = b.next() {
        match op % 8 {
            0 => {
                let mut adv = Vec::new();
                for _ in 0..(op >> 3) % 6 {
                    let Some(u) = b.url() else { break };
                    let _ = check_relay_url(&u, Origin::Advertised);
                    adv.push(u);
                }
                let conf: Vec<String> = b.url().into_iter().filter(|_| op & 0x40 != 0).collect();
                let _ = p.set_relays(&conf, &adv, now);
            }
            1 => {
                let h = b.url();
                p.set_home(h, now);
            }
            2 => {
                let Some(k) = b.next() else { break };
                let Some(f) = b.next() else { break };
                let home = if f & 0x80 != 0 { b.url() } else { None };
                let candidates = (0..f & 3)
                    .map(|i| {
                        format!("198.51.100.{}:51820", k.wrapping_add(i))
                            .parse()
                            .unwrap()
                    })
                    .collect();
                p.upsert_peer(
                    [k % 8; 32],
                    PeerFacts {
                        candidates,
                        nat: NATS[usize::from(f >> 2) % NATS.len()],
                        home_relay: home,
                    },
                    now,
                );
            }
            3 => {
                let Some(k) = b.next() else { break };
                p.remove_peer(&[k % 8; 32]);
            }
            4 => {
                let Some(k) = b.next() else { break };
                let path = if k & 0x80 != 0 {
                    Path::Direct
                } else {
                    Path::Relay
                };
                let rx = (k & 0x40 != 0).then_some(now);
                p.observe(
                    &[k % 8; 32],
                    Observed {
                        path,
                        last_direct_rx: rx,
                    },
                    now,
                );
            }
            5 => p.underlay_changed(now),
            6 => {
                let Some(n) = b.next() else { break };
                let _ = p.set_own_nat(NATS[usize::from(n) % NATS.len()], now);
            }
            _ => {
                let Some(ms) = b.next() else { break };
                now += Duration::from_millis(u64::from(ms) * 100);
                p.handle_timeout(now);
            }
        }
        let acts: Vec<PathAction> = std::iter::from_fn(|| p.poll_action()).collect();
        check(&p, force, &acts);
    }
});
