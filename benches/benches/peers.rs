//! Table publication with many peers (issue 17, Deliver 4): the cost of one change to the
//! engine's peer/route table when 1,000 or 10,000 peers are configured.
//!
//! Every writer (config, UAPI `wg set`, the coordinator roster) publishes a new snapshot
//! built from the old one (`core::table`): the flat parts are copied (a pointer per peer
//! entry, the route trie's node arrays, the key map and the index list) and only the
//! change is applied (the changed peer's prefixes in the trie; a removal renumbers
//! positions). This bench says what one change costs as the table grows:
//! * `set_allowed_ips`: one peer's AllowedIPs replaced (a roster update moving an address);
//! * `upsert_endpoint`: an existing peer upserted with a new endpoint (keeps its session);
//! * `add_remove`: a new peer added and removed again (two publications, one new `Tunn`).
//!
//! Each iteration is one full publication that readers would see; the assertions after
//! setup check that the change really landed (a published snapshot routes the moved
//! address to the peer). The throughput, the many-peer data path and the handshake burst
//! are measured in the namespace rig by `tabbify-perf peers`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tabbify_engine::core::net::IpNet;
use tabbify_engine::core::peer::PeerConfig;
use tabbify_engine::core::table::Table;

const SIZES: [usize; 2] = [1_000, 10_000];

/// Peer `i`'s key: deterministic, distinct (byte 0 is left alone: X25519 clamping
/// clears its low bits, which would make keys collide).
fn key(i: usize) -> [u8; 32] {
    let mut secret = [0u8; 32];
    secret[1..9].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    secret[31] = 0x42;
    PublicKey::from(&StaticSecret::from(secret)).to_bytes()
}

/// Peer `i`'s /32 in 10.0.0.0/8.
fn addr(i: usize) -> IpAddr {
    let host = i as u32 + 1;
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | host))
}

fn peer(i: usize) -> PeerConfig {
    PeerConfig {
        public_key: key(i),
        preshared_key: None,
        endpoint: Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            51820,
        )),
        allowed_ips: vec![IpNet::new(addr(i), 32).expect("prefix")],
        persistent_keepalive: None,
    }
}

/// A table with `n` peers, each routing its own /32.
fn table(n: usize) -> Table {
    let table = Table::new(StaticSecret::from([7u8; 32]), 51820);
    for i in 0..n {
        table.upsert_peer(peer(i)).expect("peer index");
    }
    table
}

fn publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("table_publish");
    group.sample_size(20);
    for n in SIZES {
        let t = table(n);
        assert_eq!(t.load().peers.len(), n);
        let moved = IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 255, 0, 1)), 32).expect("prefix");
        let own = IpNet::new(addr(0), 32).expect("prefix");
        // The change lands: after one publication the moved address routes to peer 0.
        assert!(t.set_allowed_ips(&key(0), &[own, moved], true));
        let routed = t.load().route(moved.addr()).map(|p| p.public_key);
        assert_eq!(routed, Some(key(0)), "a published change must be visible");

        let mut flip = false;
        group.bench_with_input(BenchmarkId::new("set_allowed_ips", n), &n, |b, _| {
            b.iter(|| {
                flip = !flip;
                let ips: &[IpNet] = if flip { &[own] } else { &[own, moved] };
                black_box(t.set_allowed_ips(&key(0), ips, true))
            });
        });
        let mut port = 1u16;
        group.bench_with_input(BenchmarkId::new("upsert_endpoint", n), &n, |b, _| {
            b.iter(|| {
                port = port.wrapping_add(1).max(1);
                let mut cfg = peer(1);
                cfg.endpoint = Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
                    port,
                ));
                black_box(t.upsert_peer(cfg).expect("peer"))
            });
        });
        let extra = peer(n + 1);
        group.bench_with_input(BenchmarkId::new("add_remove", n), &n, |b, _| {
            b.iter(|| {
                t.upsert_peer(extra.clone()).expect("peer");
                assert!(t.remove_peer(&extra.public_key));
            });
        });
        assert_eq!(
            t.load().peers.len(),
            n,
            "add_remove leaves the table as it was"
        );
    }
    group.finish();
}

criterion_group!(benches, publish);
criterion_main!(benches);
