//! Packet-layer costs on the per-packet path: the Internet checksum over 1400 bytes, IPv4
//! and IPv6 header parsing, the routing fast path `peek_dst`, and the WireGuard view.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tabbify_engine::core::wire::{
    checksum, peek_dst, protocol, IpPacket, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, WgMessage,
};

fn bench_checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for len in [40usize, 1400, 65535] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("{len}B"), |b| {
            b.iter(|| checksum::checksum(black_box(&data)))
        });
    }
    g.finish();
}

fn bench_parse(c: &mut Criterion) {
    let mut v4 = vec![0u8; 1420];
    Ipv4Repr {
        src: [10, 7, 0, 1].into(),
        dst: [10, 7, 0, 2].into(),
        protocol: protocol::TCP,
        payload_len: 1400,
        ttl: 64,
        tos: 0,
        ident: 1,
        dont_frag: true,
    }
    .emit(&mut v4)
    .expect("header fits");
    let mut v6 = vec![0u8; 1420];
    Ipv6Repr {
        src: "fd5a:1f00:1:2:3::1".parse().expect("address"),
        dst: "fd5a:1f00:4:5:6::1".parse().expect("address"),
        next_header: protocol::TCP,
        payload_len: 1380,
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
    }
    .emit(&mut v6)
    .expect("header fits");
    let mut wg = vec![0u8; 1452];
    wg[0] = 4;

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ipv4_checked_src_dst", |b| {
        b.iter(|| {
            let p = Ipv4Packet::new_checked(black_box(&v4[..])).expect("valid");
            (p.src(), p.dst(), p.protocol())
        })
    });
    g.bench_function("ipv4_checked_verify_checksum", |b| {
        b.iter(|| {
            Ipv4Packet::new_checked(black_box(&v4[..]))
                .expect("valid")
                .verify_checksum()
        })
    });
    g.bench_function("ipv6_checked_src_dst", |b| {
        b.iter(|| {
            let p = Ipv6Packet::new_checked(black_box(&v6[..])).expect("valid");
            (p.src(), p.dst(), p.next_header())
        })
    });
    g.bench_function("ip_packet_dispatch_v6", |b| {
        b.iter(|| {
            IpPacket::new_checked(black_box(&v6[..]))
                .expect("valid")
                .dst()
        })
    });
    g.bench_function("peek_dst_v4", |b| b.iter(|| peek_dst(black_box(&v4[..]))));
    g.bench_function("peek_dst_v6", |b| b.iter(|| peek_dst(black_box(&v6[..]))));
    g.bench_function("wireguard_data_receiver_index", |b| {
        b.iter(|| {
            WgMessage::new_checked(black_box(&wg[..]))
                .expect("valid")
                .receiver_index()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_checksum, bench_parse);
criterion_main!(benches);
