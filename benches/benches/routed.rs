//! The routed filter selection (`PeerEntry::filter_for`) on an exit node's entry: every
//! packet a member sends through its exit node is routed, so this runs once per packet (per
//! super-packet) on the send path and once per packet on the receive path.
//!
//! The entry is what a member holds for its exit node: the node's ULA /128, mesh IPv4 /32
//! and 8 hosted-app ULAs /128, plus the 34 exit prefixes (everything but the mesh, IPv4 and
//! IPv6) routed through it. Destinations are random public IPv4 and IPv6 addresses (all
//! routed). Two variants in the same run:
//! * `filter_for`: the engine's selection (own host addresses derived once, a binary search
//!   over them);
//! * `linear_own_host`: the selection before that change, rebuilt from public parts (the
//!   peer's own host addresses found by a linear `allowed_ips.contains` per packet).
//!
//! Both return the same filter for every destination (checked before measuring).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tabbify_engine::core::behind::Behind;
use tabbify_engine::core::filter::PortFilter;
use tabbify_engine::core::net::IpNet;
use tabbify_engine::core::peer::PeerConfig;
use tabbify_engine::core::table::{PeerEntry, Table};

const BATCH: usize = 4096;

/// The prefixes covering all of `hole`'s family but `hole` (the siblings of its ancestors).
fn complement(hole: IpNet) -> Vec<IpNet> {
    (1..=hole.prefix_len())
        .map(|len| {
            let sibling = match hole.addr() {
                IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
                    u32::from(a) ^ (1u32 << (32 - u32::from(len))),
                )),
                IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
                    u128::from(a) ^ (1u128 << (128 - u32::from(len))),
                )),
            };
            IpNet::new(sibling, len).map_or(IpNet::host(sibling), |n| n.network())
        })
        .collect()
}

fn exit_entry() -> (Table, Vec<IpAddr>) {
    let table = Table::new(boringtun::x25519::StaticSecret::from([7u8; 32]), 1);
    let mut allowed: Vec<IpNet> = vec![
        "fd5a:1f00:1:2:3::1/128".parse().unwrap(),
        "100.64.3.4/32".parse().unwrap(),
    ];
    for i in 0..8u16 {
        allowed.push(IpNet::host(IpAddr::V6(Ipv6Addr::new(
            0xfd5a, 0x1f02, i, 0, 0, 0, 0, 1,
        ))));
    }
    let mut routed = complement("100.64.0.0/10".parse().unwrap());
    routed.extend(complement("fd5a:1f00::/24".parse().unwrap()));
    assert_eq!(routed.len(), 34);
    allowed.extend(routed.iter().copied());
    table
        .upsert_peer_with_filters(
            PeerConfig {
                public_key: [2u8; 32],
                preshared_key: None,
                endpoint: Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                    51820,
                )),
                allowed_ips: allowed,
                persistent_keepalive: None,
            },
            Some(PortFilter::from_ranges(&[(22, 22)], &[])),
            Some(Behind::new([]).with_routed(routed)),
        )
        .unwrap();
    // xorshift64*: deterministic.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut dsts = Vec::with_capacity(BATCH);
    while dsts.len() < BATCH {
        let d = if dsts.len() % 2 == 0 {
            IpAddr::V4(Ipv4Addr::from((next() >> 32) as u32 | 0x0100_0000))
        } else {
            IpAddr::V6(Ipv6Addr::from(
                (u128::from(next()) << 64 | u128::from(next())) >> 3 | 1u128 << 125,
            ))
        };
        let mesh = "100.64.0.0/10".parse::<IpNet>().unwrap().contains(d)
            || "fd5a:1f00::/24".parse::<IpNet>().unwrap().contains(d);
        if !mesh {
            dsts.push(d);
        }
    }
    (table, dsts)
}

/// The selection before own hosts were derived once: a linear scan of `allowed_ips`.
fn linear_own_host(e: &PeerEntry, remote: IpAddr) -> Option<&PortFilter> {
    match &e.behind {
        None => e.filter.as_deref(),
        Some(b) => match b.get(remote) {
            Some(f) => Some(f),
            None => match b.routed(remote) {
                Some(f) => {
                    let host = IpNet::host(remote);
                    if !b.is_routed_prefix(&host) && e.allowed_ips.contains(&host) {
                        e.filter.as_deref()
                    } else {
                        Some(f)
                    }
                }
                None => e.filter.as_deref(),
            },
        },
    }
}

fn bench(c: &mut Criterion) {
    let (table, dsts) = exit_entry();
    let snap = table.load_full();
    let entry = snap.route_entry(dsts[0]).unwrap().clone();
    for d in &dsts {
        assert_eq!(entry.filter_for(*d), linear_own_host(&entry, *d), "{d}");
        assert!(
            entry.filter_for(*d) != entry.filter.as_deref(),
            "{d} is routed"
        );
    }
    let mut g = c.benchmark_group("routed_filter_select");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("filter_for", |b| {
        b.iter(|| {
            for d in &dsts {
                black_box(entry.filter_for(black_box(*d)));
            }
        })
    });
    g.bench_function("linear_own_host", |b| {
        b.iter(|| {
            for d in &dsts {
                black_box(linear_own_host(&entry, black_box(*d)));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
