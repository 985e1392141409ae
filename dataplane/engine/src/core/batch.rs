//! Send-side batch assembly: encrypted datagrams for one endpoint are laid end to end in a
//! slot so the driver can send the whole slot with one `UDP_SEGMENT` (GSO) `sendmsg`.
//!
//! GSO rule: every datagram in one send has the slot's segment size except the last, which
//! may be shorter; a shorter one closes the slot. A slot also closes at
//! [`MAX_SEGMENTS`] datagrams or when the next one would pass [`SLOT_BYTES`].
//!
//! Ownership: a slot is `Filling` while the core appends to it, `InFlight` from the moment
//! the driver hands it to the kernel until that operation's completion arrives (the kernel
//! may read it until then), then `Free` again via [`TxBatch::complete`]. Slots are
//! preallocated at start; nothing allocates per packet.

use std::net::SocketAddr;

/// The most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;
/// Bytes in one slot: the largest UDP payload one GSO send may carry.
pub const SLOT_BYTES: usize = 65_507;

/// The state of a send slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Empty and ready.
    Free,
    /// Being filled by the core.
    Filling,
    /// Handed to the kernel; its buffer must not be touched until completion.
    InFlight,
}

/// One GSO send: `len` bytes of `segment`-sized datagrams to `dst`.
#[derive(Debug)]
pub struct TxSlot {
    /// The datagrams, back to back.
    pub buf: Box<[u8]>,
    /// Bytes used.
    pub len: usize,
    /// Size of every datagram but possibly the last.
    pub segment: usize,
    /// Number of datagrams.
    pub segments: usize,
    /// Destination.
    pub dst: SocketAddr,
    /// Where the slot is in its life.
    pub state: SlotState,
    closed: bool,
}

/// A fixed pool of send slots.
#[derive(Debug)]
pub struct TxBatch {
    slots: Vec<TxSlot>,
    /// Slots in fill order (indexes into `slots`).
    filling: Vec<usize>,
    max_segments: usize,
}

/// The pool has no free slot: send and complete some first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

impl TxBatch {
    /// `slots` slots; `gso` false limits each slot to one datagram.
    pub fn new(slots: usize, gso: bool) -> Self {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let bytes = if gso { SLOT_BYTES } else { 9216 };
        Self {
            slots: (0..slots)
                .map(|_| TxSlot {
                    buf: vec![0u8; bytes].into_boxed_slice(),
                    len: 0,
                    segment: 0,
                    segments: 0,
                    dst: unspecified,
                    state: SlotState::Free,
                    closed: false,
                })
                .collect(),
            filling: Vec::with_capacity(slots),
            max_segments: if gso { MAX_SEGMENTS } else { 1 },
        }
    }

    /// Appends one datagram for `dst`: `write` gets at least `need` bytes of room and
    /// returns how many it wrote (0 = nothing to send). Returns `Err(Full)` when no slot
    /// is free; nothing was written then.
    #[inline]
    pub fn push(
        &mut self,
        dst: SocketAddr,
        need: usize,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<(), Full> {
        let i = self.slot_for(dst, need)?;
        let slot = &mut self.slots[i];
        let start = slot.len;
        let n = write(&mut slot.buf[start..start + need]);
        if n == 0 {
            if slot.segments == 0 {
                self.release_empty(i);
            }
            return Ok(());
        }
        if slot.segments > 0 && n > slot.segment {
            // Larger than the slot's datagrams (say a full packet after a bare ACK): it
            // starts a slot of its own. Copy it there.
            slot.closed = true;
            let j = self.take_free(n).ok_or(Full)?;
            let (a, b) = if i < j {
                let (lo, hi) = self.slots.split_at_mut(j);
                (&lo[i], &mut hi[0])
            } else {
                let (lo, hi) = self.slots.split_at_mut(i);
                (&hi[0], &mut lo[j])
            };
            b.buf[..n].copy_from_slice(&a.buf[start..start + n]);
            b.dst = dst;
            b.len = n;
            b.segment = n;
            b.segments = 1;
            b.closed = self.max_segments == 1;
            return Ok(());
        }
        let slot = &mut self.slots[i];
        if slot.segments == 0 {
            slot.segment = n;
        } else if n < slot.segment {
            slot.closed = true;
        }
        slot.len += n;
        slot.segments += 1;
        if slot.segments >= self.max_segments {
            slot.closed = true;
        }
        Ok(())
    }

    fn slot_for(&mut self, dst: SocketAddr, need: usize) -> Result<usize, Full> {
        if let Some(&i) = self.filling.last() {
            let s = &self.slots[i];
            if !s.closed && s.dst == dst && s.len + need <= s.buf.len() {
                return Ok(i);
            }
            self.slots[i].closed = true;
        }
        let i = self.take_free(need).ok_or(Full)?;
        self.slots[i].dst = dst;
        Ok(i)
    }

    /// Claims a free slot with room for `need` bytes and puts it at the end of the fill order.
    fn take_free(&mut self, need: usize) -> Option<usize> {
        let i = self
            .slots
            .iter()
            .position(|s| s.state == SlotState::Free && s.buf.len() >= need)?;
        let s = &mut self.slots[i];
        s.state = SlotState::Filling;
        s.len = 0;
        s.segments = 0;
        s.segment = 0;
        s.closed = false;
        self.filling.push(i);
        Some(i)
    }

    fn release_empty(&mut self, i: usize) {
        self.slots[i].state = SlotState::Free;
        self.filling.retain(|&j| j != i);
    }

    /// Whether any slot holds datagrams not yet handed out.
    pub fn has_pending(&self) -> bool {
        !self.filling.is_empty()
    }

    /// Hands every filled slot to `send(slot index, slot)`; each becomes `InFlight`.
    /// The driver calls [`TxBatch::complete`] with the index when the kernel is done.
    pub fn drain(&mut self, mut send: impl FnMut(usize, &TxSlot)) {
        for k in 0..self.filling.len() {
            let i = self.filling[k];
            let s = &mut self.slots[i];
            s.state = SlotState::InFlight;
            s.closed = true;
            send(i, s);
        }
        self.filling.clear();
    }

    /// Hands every filled slot to a synchronous `send` and frees it at once (drivers whose
    /// send returns only when the kernel has copied the data).
    pub fn send_all(&mut self, mut send: impl FnMut(&TxSlot)) {
        for k in 0..self.filling.len() {
            let i = self.filling[k];
            send(&self.slots[i]);
            let s = &mut self.slots[i];
            s.state = SlotState::Free;
            s.len = 0;
            s.segments = 0;
        }
        self.filling.clear();
    }

    /// Marks slot `i` free again (its send completed).
    pub fn complete(&mut self, i: usize) {
        if let Some(s) = self.slots.get_mut(i) {
            s.state = SlotState::Free;
            s.len = 0;
            s.segments = 0;
        }
    }

    /// Slot `i`, for drivers that build their syscall arguments from it.
    pub fn slot(&self, i: usize) -> &TxSlot {
        &self.slots[i]
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], p))
    }

    #[test]
    fn groups_equal_segments_per_destination() {
        let mut b = TxBatch::new(4, true);
        for _ in 0..3 {
            b.push(a(1), 1500, |buf| {
                buf[..100].fill(1);
                100
            })
            .unwrap();
        }
        // A short one closes the slot; the next goes to a new slot.
        b.push(a(1), 1500, |_| 40).unwrap();
        b.push(a(1), 1500, |_| 100).unwrap();
        b.push(a(2), 1500, |_| 100).unwrap();
        let mut seen = Vec::new();
        b.drain(|i, s| seen.push((i, s.dst, s.segment, s.segments, s.len)));
        assert_eq!(seen.len(), 3);
        assert_eq!((seen[0].2, seen[0].3, seen[0].4), (100, 4, 340));
        assert_eq!((seen[1].3, seen[2].1), (1, a(2)));
        // All in flight: no room until completions.
        assert!(b.push(a(3), 1500, |_| 10).is_ok());
        assert_eq!(b.push(a(4), 1500, |_| 10), Err(Full));
        b.complete(seen[0].0);
        assert!(b.push(a(4), 1500, |_| 10).is_ok());
    }

    #[test]
    fn without_gso_one_datagram_per_slot() {
        let mut b = TxBatch::new(2, false);
        b.push(a(1), 100, |_| 50).unwrap();
        b.push(a(1), 100, |_| 50).unwrap();
        assert_eq!(b.push(a(1), 100, |_| 50), Err(Full));
        let mut n = 0;
        b.drain(|_, s| {
            assert_eq!(s.segments, 1);
            n += 1
        });
        assert_eq!(n, 2);
    }

    #[test]
    fn caps_segments_and_bytes() {
        let mut b = TxBatch::new(3, true);
        for _ in 0..(MAX_SEGMENTS + 1) {
            b.push(a(1), 200, |_| 200).unwrap();
        }
        let mut segs = Vec::new();
        b.drain(|_, s| segs.push(s.segments));
        assert_eq!(segs, vec![MAX_SEGMENTS, 1]);
        let mut b = TxBatch::new(3, true);
        for _ in 0..50 {
            b.push(a(1), 1452, |_| 1452).unwrap();
        }
        let mut lens = Vec::new();
        b.drain(|_, s| lens.push(s.len));
        assert!(lens.iter().all(|l| *l <= SLOT_BYTES));
        assert_eq!(lens.iter().sum::<usize>(), 50 * 1452);
    }
}
