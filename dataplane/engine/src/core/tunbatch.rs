//! Receive-side batch without coalescing: decrypted packets laid end to end in one
//! preallocated arena, each optionally behind a zero virtio header (GSO_NONE), ready for
//! one TUN write each.
//!
//! Ownership: the driver writes every packet of the batch to the TUN and calls
//! [`TunBatch::clear`] only after all those writes completed.

use crate::core::gso::VNET_HDR_LEN;
use crate::core::pipeline::TunSink;

/// Packets waiting to be written to the TUN.
#[derive(Debug)]
pub struct TunBatch {
    arena: Box<[u8]>,
    used: usize,
    ranges: Vec<(usize, usize)>,
    vnet: bool,
}

impl TunBatch {
    /// An arena of `bytes`; `vnet` puts a zero virtio header before each packet.
    pub fn new(bytes: usize, vnet: bool) -> Self {
        Self {
            arena: vec![0u8; bytes].into_boxed_slice(),
            used: 0,
            // The smallest IP packet is 20 bytes: that bounds how many fit.
            ranges: Vec::with_capacity(bytes / 20 + 1),
            vnet,
        }
    }

    /// Number of packets held.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether no packet is held.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Packet `i` as it must be written (header included).
    pub fn get(&self, i: usize) -> &[u8] {
        let (s, e) = self.ranges[i];
        &self.arena[s..e]
    }

    /// Empties the batch (only after every write of it completed).
    pub fn clear(&mut self) {
        self.used = 0;
        self.ranges.clear();
    }
}

impl TunSink for TunBatch {
    fn push(&mut self, pkt: &[u8]) -> bool {
        let hdr = if self.vnet { VNET_HDR_LEN } else { 0 };
        let start = self.used;
        let end = start + hdr + pkt.len();
        if end > self.arena.len() || self.ranges.len() == self.ranges.capacity() {
            return false;
        }
        self.arena[start..start + hdr].fill(0);
        self.arena[start + hdr..end].copy_from_slice(pkt);
        self.used = end;
        self.ranges.push((start, end));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_packets_until_full() {
        let mut b = TunBatch::new(64, true);
        assert!(b.push(&[1; 20]));
        assert!(b.push(&[2; 20]));
        assert!(!b.push(&[3; 20]));
        assert_eq!(b.len(), 2);
        assert_eq!(&b.get(1)[..10], &[0; 10]);
        assert_eq!(&b.get(1)[10..], &[2; 20]);
        b.clear();
        assert!(b.is_empty());
    }
}
