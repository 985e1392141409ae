//! TSO split + checksum of a 64 KB TCP super-packet at MSS 1368 (the tunnel MTU 1420 minus
//! IPv4 and TCP-with-timestamps headers), and GRO coalescing of 44 such segments.
//!
//! Each bench is reported twice: with `Throughput::Bytes` (payload bytes, read as Gbit/s
//! of TCP payload) and with `Throughput::Elements` (segments, read as segments/s; the
//! per-segment cost is its inverse).

use std::hint::black_box;
use std::ops::ControlFlow;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tabbify_engine::core::gso::{self, split, Coalescer, VirtioNetHdr};
use tabbify_engine::core::wire::{checksum, protocol, Ipv4Repr, Ipv6Repr};

const MSS: usize = 1368;
/// 47 × 1368 = 64,296 payload bytes: the largest multiple of the MSS in a 64 KB packet.
const SEGMENTS: usize = 47;
const TCP_HDR: usize = 32;

/// A TSO super-packet as the kernel hands it to a TUN reader: full IP lengths, the TCP
/// checksum field holding the folded pseudo-header sum, `NEEDS_CSUM`.
fn super_packet(v6: bool, payload_len: usize) -> (VirtioNetHdr, Vec<u8>) {
    let l3 = if v6 { 40 } else { 20 };
    let total = l3 + TCP_HDR + payload_len;
    let mut p = vec![0u8; total];
    if v6 {
        Ipv6Repr {
            src: "fd5a:1f00:1:2:3::1".parse().expect("address"),
            dst: "fd5a:1f00:4:5:6::1".parse().expect("address"),
            next_header: protocol::TCP,
            payload_len: total - 40,
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0x1234,
        }
        .emit(&mut p)
        .expect("header fits");
    } else {
        Ipv4Repr {
            src: [10, 7, 0, 1].into(),
            dst: [10, 7, 0, 2].into(),
            protocol: protocol::TCP,
            payload_len: total - 20,
            ttl: 64,
            tos: 0,
            ident: 1,
            dont_frag: true,
        }
        .emit(&mut p)
        .expect("header fits");
    }
    let t = &mut p[l3..];
    t[0..4].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
    t[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
    t[8..12].copy_from_slice(&2_000_000u32.to_be_bytes());
    t[12] = ((TCP_HDR / 4) as u8) << 4;
    t[13] = 0x18;
    t[14..16].copy_from_slice(&502u16.to_be_bytes());
    t[20..32].copy_from_slice(&[1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8]);
    for (i, b) in t[TCP_HDR..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let l4_len = (total - l3) as u32;
    let pseudo = if v6 {
        checksum::pseudo_header_v6(
            "fd5a:1f00:1:2:3::1".parse().expect("address"),
            "fd5a:1f00:4:5:6::1".parse().expect("address"),
            protocol::TCP,
            l4_len,
        )
    } else {
        checksum::pseudo_header_v4(
            [10, 7, 0, 1].into(),
            [10, 7, 0, 2].into(),
            protocol::TCP,
            l4_len,
        )
    };
    p[l3 + 16..l3 + 18].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    let hdr = VirtioNetHdr {
        flags: gso::flags::NEEDS_CSUM,
        gso_type: if v6 {
            gso::gso_type::TCPV6
        } else {
            gso::gso_type::TCPV4
        },
        hdr_len: (l3 + TCP_HDR) as u16,
        gso_size: MSS as u16,
        csum_start: l3 as u16,
        csum_offset: 16,
    };
    (hdr, p)
}

fn tso_split(c: &mut Criterion) {
    let mut g = c.benchmark_group("tso_split_64k_mss1368");
    let mut scratch = vec![0u8; gso::MAX_PACKET];
    for v6 in [false, true] {
        let name = if v6 { "tcpv6" } else { "tcpv4" };
        let (hdr, pkt) = super_packet(v6, SEGMENTS * MSS);
        for (unit, tp) in [
            ("bytes", Throughput::Bytes((SEGMENTS * MSS) as u64)),
            ("segments", Throughput::Elements(SEGMENTS as u64)),
        ] {
            g.throughput(tp);
            g.bench_function(BenchmarkId::new(name, unit), |b| {
                b.iter(|| {
                    let n = split(&hdr, black_box(&pkt), &mut scratch, |seg| {
                        black_box(seg);
                        ControlFlow::Continue(())
                    });
                    assert_eq!(n, Ok(SEGMENTS));
                })
            });
        }
    }
    g.finish();
}

fn gro_coalesce(c: &mut Criterion) {
    const N: usize = 44;
    let mut g = c.benchmark_group("gro_coalesce_44x1368");
    let mut scratch = vec![0u8; gso::MAX_PACKET];
    for v6 in [false, true] {
        let name = if v6 { "tcpv6" } else { "tcpv4" };
        let (hdr, pkt) = super_packet(v6, N * MSS);
        let mut segs = Vec::with_capacity(N);
        split(&hdr, &pkt, &mut scratch, |s| {
            segs.push(s.to_vec());
            ControlFlow::Continue(())
        })
        .expect("valid super-packet");
        let mut co = Coalescer::new(64);
        for (unit, tp) in [
            ("bytes", Throughput::Bytes((N * MSS) as u64)),
            ("segments", Throughput::Elements(N as u64)),
        ] {
            g.throughput(tp);
            g.bench_function(BenchmarkId::new(name, unit), |b| {
                b.iter(|| {
                    for s in &segs {
                        co.push(black_box(s)).expect("room for one flow");
                    }
                    let mut out = 0;
                    for buf in co.finish() {
                        out += black_box(buf).len();
                    }
                    co.clear();
                    assert_eq!(out, gso::VNET_HDR_LEN + pkt.len());
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, tso_split, gro_coalesce);
criterion_main!(benches);
