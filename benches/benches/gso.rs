//! TSO split + checksum of a 64 KB TCP super-packet at MSS 1368 (the tunnel MTU 1420 minus
//! IPv4 and TCP-with-timestamps headers), and GRO coalescing of 44 such segments.
//!
//! Each bench is reported twice: with `Throughput::Bytes` (payload bytes, read as Gbit/s
//! of TCP payload) and with `Throughput::Elements` (segments, read as segments/s; the
//! per-segment cost is its inverse).

use std::hint::black_box;
use std::ops::ControlFlow;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tabbify_benches::{tso_super_packet, MSS};
use tabbify_engine::core::offload::{self, split, Coalescer, VirtioNetHdr};
use tabbify_engine::core::wire::tcp;

/// 47 × 1368 = 64,296 payload bytes: the largest multiple of the MSS in a 64 KB packet.
const SEGMENTS: usize = 47;

/// A TSO super-packet of `payload_len` bytes as the kernel hands it to a TUN reader: full IP
/// lengths, the TCP checksum field holding the folded pseudo-header sum, `NEEDS_CSUM`.
fn super_packet(v6: bool, payload_len: usize) -> (VirtioNetHdr, Vec<u8>) {
    let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
    tso_super_packet(v6, &payload, tcp::ACK | tcp::PSH).build()
}

fn tso_split(c: &mut Criterion) {
    let mut g = c.benchmark_group("tso_split_64k_mss1368");
    let mut scratch = vec![0u8; offload::MAX_PACKET];
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
    let mut scratch = vec![0u8; offload::MAX_PACKET];
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
                    assert_eq!(out, offload::VNET_HDR_LEN + pkt.len());
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, tso_split, gro_coalesce);
criterion_main!(benches);
