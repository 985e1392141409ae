//! Per-worker batch-size histograms: how many packets each TUN read turn, UDP receive turn
//! and UDP send flush of a worker handled (issue 16, "workers' batch sizes" in the metrics).
//!
//! This module owns the cells and their bucketing ([`bucket`]); the drivers record, the
//! metrics scrape reads [`BatchStats::snapshot`].
//!
//! Invariants:
//! * each worker writes only its own [`WorkerBatches`] (its own cache lines, 128-byte
//!   aligned), with a relaxed load and store, never a read-modify-write: no lock prefix and
//!   no line shared with another worker on the hot path. The scrape reads relaxed, so a
//!   snapshot may be a few batches behind, never torn within a cell;
//! * a batch of 0 packets is not recorded;
//! * bucket `i` counts batches of at most `2^i` packets and more than `2^(i-1)`; the last
//!   bucket counts everything above [`BUCKET_BOUNDS`]'s last bound too, so no batch is lost.

use std::sync::atomic::{AtomicU64, Ordering};

/// The upper bounds of the buckets (powers of two up to the largest batch a driver takes:
/// io_uring reaps up to its ring size per turn).
pub const BUCKET_BOUNDS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];
const BUCKETS: usize = BUCKET_BOUNDS.len();

/// What a batch was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum BatchOp {
    /// Packets read from the TUN in one turn.
    TunRead,
    /// Datagrams received from the UDP socket in one turn.
    UdpRecv,
    /// Datagrams sent in one flush (a GSO send counts its segments).
    UdpSend,
}

impl BatchOp {
    /// Every op, in cell order.
    pub const ALL: [BatchOp; 3] = [Self::TunRead, Self::UdpRecv, Self::UdpSend];

    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Self::TunRead => "tun_read",
            Self::UdpRecv => "udp_recv",
            Self::UdpSend => "udp_send",
        }
    }
}

/// The bucket of a batch of `n` (> 0) packets.
pub fn bucket(n: u64) -> usize {
    let i = (u64::BITS - n.saturating_sub(1).leading_zeros()) as usize;
    i.min(BUCKETS - 1)
}

/// One op's cells: per-bucket counts and the packet sum.
#[derive(Default)]
struct Cells {
    buckets: [AtomicU64; BUCKETS],
    sum: AtomicU64,
}

/// One worker's histograms (written by that worker only).
#[derive(Default)]
#[repr(align(128))]
pub struct WorkerBatches {
    ops: [Cells; 3],
}

/// Single writer: a relaxed load and store, no locked read-modify-write.
#[inline(always)]
fn bump(c: &AtomicU64, by: u64) {
    c.store(
        c.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

impl WorkerBatches {
    /// Records a batch of `n` packets (nothing for 0). Only the owning worker calls this.
    #[inline]
    pub fn record(&self, op: BatchOp, n: usize) {
        if n == 0 {
            return;
        }
        let n = n as u64;
        let cells = &self.ops[op as usize];
        bump(&cells.buckets[bucket(n)], 1);
        bump(&cells.sum, n);
    }

    /// The histogram of `op`: counts per bucket (not cumulative) and the packet sum.
    pub fn histogram(&self, op: BatchOp) -> Histogram {
        let cells = &self.ops[op as usize];
        Histogram {
            counts: std::array::from_fn(|i| cells.buckets[i].load(Ordering::Relaxed)),
            sum: cells.sum.load(Ordering::Relaxed),
        }
    }
}

/// A read of one histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Batches per bucket of [`BUCKET_BOUNDS`] (not cumulative).
    pub counts: [u64; BUCKETS],
    /// Packets over all batches.
    pub sum: u64,
}

impl Histogram {
    /// Batches recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Every worker's histograms.
pub struct BatchStats {
    workers: Box<[WorkerBatches]>,
}

impl BatchStats {
    /// Cells for `workers` workers.
    pub fn new(workers: usize) -> Self {
        Self {
            workers: (0..workers).map(|_| WorkerBatches::default()).collect(),
        }
    }

    /// Worker `id`'s cells (the last worker's for an id out of range, so a caller bug
    /// skews a histogram rather than panicking in a worker).
    pub fn worker(&self, id: usize) -> &WorkerBatches {
        &self.workers[id.min(self.workers.len().saturating_sub(1))]
    }

    /// How many workers there are.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Every worker's histogram of every op: `[worker][op]`, ops as in [`BatchOp::ALL`].
    pub fn snapshot(&self) -> Vec<[Histogram; 3]> {
        self.workers
            .iter()
            .map(|w| BatchOp::ALL.map(|op| w.histogram(op)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fall_in_power_of_two_buckets_and_nothing_is_lost() {
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 1);
        assert_eq!(bucket(3), 2);
        assert_eq!(bucket(4), 2);
        assert_eq!(bucket(5), 3);
        assert_eq!(bucket(64), 6);
        assert_eq!(bucket(65), 7);
        assert_eq!(bucket(512), 9);
        assert_eq!(bucket(513), 9);
        assert_eq!(bucket(u64::MAX), 9);
        for (i, b) in BUCKET_BOUNDS.iter().enumerate() {
            assert_eq!(bucket(*b), i);
        }
    }

    #[test]
    fn each_worker_keeps_its_own_histograms() {
        let s = BatchStats::new(2);
        s.worker(0).record(BatchOp::TunRead, 64);
        s.worker(0).record(BatchOp::TunRead, 1);
        s.worker(0).record(BatchOp::TunRead, 0);
        s.worker(1).record(BatchOp::UdpSend, 3);
        s.worker(7).record(BatchOp::UdpRecv, 10_000);
        let snap = s.snapshot();
        let tun0 = snap[0][BatchOp::TunRead as usize];
        assert_eq!((tun0.count(), tun0.sum), (2, 65));
        assert_eq!((tun0.counts[0], tun0.counts[6]), (1, 1));
        assert_eq!(snap[1][BatchOp::UdpSend as usize].counts[2], 1);
        assert_eq!(snap[1][BatchOp::UdpRecv as usize].counts[9], 1);
        assert_eq!(snap[0][BatchOp::UdpSend as usize].count(), 0);
        assert_eq!(std::mem::align_of::<WorkerBatches>(), 128);
    }
}
