//! The cost the batch-size histograms (`core::batchstats`, issue 16) add to a worker: one
//! `record` per TUN read turn, UDP receive turn and send flush (never per packet). Measured
//! alone, per call, for small and large batches, so it can be set against the per-batch
//! work of the `path` bench (a 64-packet batch's encryption).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tabbify_engine::core::batchstats::{BatchOp, BatchStats};

fn bench_record(c: &mut Criterion) {
    let stats = BatchStats::new(4);
    let mine = stats.worker(1);
    let mut g = c.benchmark_group("batchstats_record");
    for n in [1usize, 64, 512] {
        g.bench_function(format!("batch_{n}"), |b| {
            b.iter(|| mine.record(black_box(BatchOp::TunRead), black_box(n)))
        });
    }
    g.bench_function("three_ops_per_turn", |b| {
        b.iter(|| {
            mine.record(BatchOp::TunRead, black_box(17));
            mine.record(BatchOp::UdpRecv, black_box(9));
            mine.record(BatchOp::UdpSend, black_box(33));
        })
    });
    g.finish();
}

criterion_group!(benches, bench_record);
criterion_main!(benches);
