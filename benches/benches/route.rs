//! Route table lookup at 10 / 10k / 1M routes, IPv4 and IPv6, plus the snapshot clone cost.
//!
//! Prefix lengths follow real tables: IPv4 mostly /24 with /8../32 around it, IPv6 mostly
//! /48 and /64 with some /32 and host routes. Every looked-up address lies inside an
//! inserted prefix (a hit), so the walk goes as deep as real traffic makes it. Each
//! iteration looks up a batch of addresses; criterion's throughput line reads as lookups/s.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tabbify_engine::core::net::IpNet;
use tabbify_engine::core::route::RouteTable;

const BATCH: usize = 4096;
const SIZES: [usize; 3] = [10, 10_000, 1_000_000];

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn v4_len(r: &mut Rng) -> u8 {
    match r.below(100) {
        0..=54 => 24,
        55..=74 => 16 + r.below(8) as u8,
        75..=89 => 25 + r.below(8) as u8,
        _ => 8 + r.below(8) as u8,
    }
}

fn v6_len(r: &mut Rng) -> u8 {
    match r.below(100) {
        0..=39 => 48,
        40..=69 => 64,
        70..=84 => 32 + r.below(16) as u8,
        85..=94 => 128,
        _ => 49 + r.below(15) as u8,
    }
}

/// `n` random prefixes and, for a sample of them, an address inside each.
fn workload(v6: bool, n: usize, seed: u64) -> (RouteTable<u32>, Vec<IpAddr>) {
    let mut r = Rng(seed);
    let mut table = RouteTable::new();
    let mut nets = Vec::with_capacity(n);
    while table.len() < n {
        let net = if v6 {
            // Global unicast 2000::/3 like a real table.
            let a = (u128::from(r.next()) << 64 | u128::from(r.next())) >> 3 | 1u128 << 125;
            IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), v6_len(&mut r))
        } else {
            IpNet::new(IpAddr::V4(Ipv4Addr::from(r.next() as u32)), v4_len(&mut r))
        };
        let Some(net) = net.map(|n| n.network()) else {
            continue;
        };
        if table.insert(net, table.len() as u32).is_none() {
            nets.push(net);
        }
    }
    let addrs = (0..BATCH)
        .map(|_| {
            let net = nets[r.below(nets.len() as u64) as usize];
            match net.addr() {
                IpAddr::V4(a) => {
                    let host =
                        (r.next() as u32) & !tabbify_engine::core::net::mask32(net.prefix_len());
                    IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
                }
                IpAddr::V6(a) => {
                    let rnd = u128::from(r.next()) << 64 | u128::from(r.next());
                    let host = rnd & !tabbify_engine::core::net::mask128(net.prefix_len());
                    IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
                }
            }
        })
        .collect();
    (table, addrs)
}

fn lookup(c: &mut Criterion) {
    for (family, v6) in [("v4", false), ("v6", true)] {
        let mut g = c.benchmark_group(format!("route_lookup_{family}"));
        g.throughput(Throughput::Elements(BATCH as u64));
        for n in SIZES {
            let (table, addrs) = workload(v6, n, 0x9e37_79b9_7f4a_7c15 ^ n as u64);
            assert!(
                addrs.iter().all(|a| table.lookup(*a).is_some()),
                "every address hits"
            );
            eprintln!(
                "route {family} {n} routes: {:.1} MiB of nodes ({:.1} bytes/route)",
                table.heap_bytes() as f64 / (1 << 20) as f64,
                table.heap_bytes() as f64 / n as f64
            );
            g.bench_with_input(BenchmarkId::from_parameter(n), &addrs, |b, addrs| {
                b.iter(|| {
                    let mut hits = 0u64;
                    for a in addrs {
                        if let Some(v) = table.lookup(black_box(*a)) {
                            hits = hits.wrapping_add(u64::from(v));
                        }
                    }
                    hits
                })
            });
        }
        g.finish();
    }
}

fn clone_snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_clone");
    g.sample_size(10);
    for (family, v6) in [("v4", false), ("v6", true)] {
        let (table, _) = workload(v6, 1_000_000, 7);
        g.bench_function(format!("{family}_1M"), |b| {
            b.iter(|| black_box(table.clone()))
        });
    }
    g.finish();
}

criterion_group!(benches, lookup, clone_snapshot);
criterion_main!(benches);
