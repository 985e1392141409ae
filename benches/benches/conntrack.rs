//! The connection tracker alone: `PortFilter::check` of a reply packet against a flow table
//! holding 1,000 and 100,000 UDP flows (each iteration checks the replies of 1,024 flows
//! spread over the table, so caches see a realistic spread), and of a packet that opens a
//! new flow and is refused by a full table (the overflow path, the sweep rate-limited).
//!
//! No tunnel, no sockets: the filter and the table as the pipeline calls them, under the
//! peer lock it would already hold.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tabbify_engine::core::conntrack::{Dir, FlowTable};
use tabbify_engine::core::filter::{Deny, PortFilter};
use tabbify_engine::core::wire::{protocol, Ipv6Repr};

/// Replies checked per iteration.
const PROBES: usize = 1024;

/// A 100-byte IPv6/UDP packet from `src` port `sport` to `dst` port `dport`.
fn udp6(src: u32, sport: u16, dst: u32, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 100];
    let addr = |n: u32| {
        let mut a = [0xfd, 0x5a, 0x1f, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        a[12..].copy_from_slice(&n.to_be_bytes());
        std::net::Ipv6Addr::from(a)
    };
    Ipv6Repr {
        src: addr(src),
        dst: addr(dst),
        next_header: protocol::UDP,
        payload_len: 60,
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
    }
    .emit(&mut p)
    .expect("header fits");
    p[40..42].copy_from_slice(&sport.to_be_bytes());
    p[42..44].copy_from_slice(&dport.to_be_bytes());
    p[44..46].copy_from_slice(&60u16.to_be_bytes());
    p
}

/// Flow `i`: our port 1024 + i % 60000 on address 1 + i / 60000 to the peer's port 53.
fn ends(i: usize) -> (u32, u16) {
    (1 + (i / 60_000) as u32, 1024 + (i % 60_000) as u16)
}

fn tracker(c: &mut Criterion) {
    let mut g = c.benchmark_group("conntrack");
    let f = PortFilter::from_ranges(&[(53, 53)], &[]);
    for flows in [1_000usize, 100_000] {
        let mut t = FlowTable::new(flows, 0x5eed);
        t.reserve_all();
        for i in 0..flows {
            let (a, p) = ends(i);
            f.check(Dir::Out, &udp6(a, p, 0xffff, 53), &mut t, 0)
                .expect("opens");
        }
        assert_eq!(t.len(), flows);
        // Replies of PROBES flows spread over the table.
        let replies: Vec<Vec<u8>> = (0..PROBES)
            .map(|k| {
                let (a, p) = ends(k * flows / PROBES);
                udp6(0xffff, 53, a, p)
            })
            .collect();
        g.throughput(Throughput::Elements(PROBES as u64));
        g.bench_function(BenchmarkId::new("reply_hit", flows), |b| {
            b.iter(|| {
                for r in &replies {
                    black_box(f.check(Dir::In, black_box(r), &mut t, 1)).expect("tracked");
                }
            })
        });
        // A new flow while the table is full (nothing expired): refused, counted.
        let new: Vec<Vec<u8>> = (0..PROBES)
            .map(|k| udp6(0xfffe, 2000 + k as u16, 0xffff, 53))
            .collect();
        g.bench_function(BenchmarkId::new("new_flow_table_full", flows), |b| {
            b.iter(|| {
                for p in &new {
                    let r = f.check(Dir::Out, black_box(p), &mut t, 1);
                    assert_eq!(r, Err(Deny::CtFull));
                }
            })
        });
        // A source-port trick: a lookup miss, refused by the rules.
        let tricks: Vec<Vec<u8>> = (0..PROBES)
            .map(|k| udp6(0xffff, 53, 0xfffe, 3000 + k as u16))
            .collect();
        g.bench_function(BenchmarkId::new("unrelated_refused", flows), |b| {
            b.iter(|| {
                for p in &tricks {
                    let r = f.check(Dir::In, black_box(p), &mut t, 1);
                    assert_eq!(r, Err(Deny::NotAllowed));
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = tracker
}
criterion_main!(benches);
