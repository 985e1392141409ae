//! Decrypting in place for the coalescers: the room a coalescer hands out for the next
//! packet ([`Landing`]), where that packet most likely stays, and the bytes it covers.
//!
//! A packet continuing a head lands with its headers over the head's last bytes and its
//! payload right after them, exactly where joining would copy it: the covered bytes (the
//! previous payload's end) are saved in a [`Stash`] and put back when the landing ends, so
//! joining copies only the headers' worth of bytes back. A packet starting a head lands at
//! the start of a free slot. Wherever a packet ends up instead, it is copied there from its
//! landing ([`place`]), as a pushed one is from the caller's slice.
//!
//! Invariants: at most one landing is out per coalescer; while it is out, the covered head
//! bytes hold the landed packet's headers, so the coalescer ends it ([`Stash::abandon`])
//! before anything reads or writes its buffers; a landing never covers a head's own
//! headers; nothing here allocates.

use std::ops::Range;

use super::vnet::{BUF_LEN, VNET_HDR_LEN};

/// The most header bytes a landing covers: IPv6 (40, the longest header a head takes) and
/// TCP with the most options (60).
pub(crate) const STASH: usize = 40 + 60;

/// Room handed out for the next packet, in a coalescer's arena of [`BUF_LEN`] slots.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Landing {
    /// Arena offset of the packet's first byte.
    pub(crate) at: usize,
    /// Bytes of room from `at`, to the end of the slot.
    pub(crate) room: usize,
    /// Head bytes the packet's headers cover (0 in a free slot).
    pub(crate) saved: usize,
}

impl Landing {
    /// At the start of free slot `i` (after its vnet header), if `need` bytes fit a slot.
    pub(crate) fn fresh(i: usize, need: usize) -> Option<Self> {
        (need <= BUF_LEN - VNET_HDR_LEN).then_some(Self {
            at: i * BUF_LEN + VNET_HDR_LEN,
            room: BUF_LEN - VNET_HDR_LEN,
            saved: 0,
        })
    }

    /// In the tail of the head in slot `i`, `len` bytes long (vnet header included), for a
    /// packet of up to `need` bytes whose headers are `hdrs` long (the head's): if they do
    /// not reach back into the head's own headers and the packet fits the slot.
    pub(crate) fn tail(i: usize, len: usize, hdrs: usize, need: usize) -> Option<Self> {
        let base = i * BUF_LEN;
        let at = (base + len).checked_sub(hdrs)?;
        let ok = hdrs <= STASH && at >= base + VNET_HDR_LEN + hdrs && at + need <= base + BUF_LEN;
        ok.then_some(Self {
            at,
            room: base + BUF_LEN - at,
            saved: hdrs,
        })
    }
}

/// The landing out, if any, and the head bytes it covers.
#[derive(Debug)]
pub(crate) struct Stash {
    out: Option<Landing>,
    bytes: [u8; STASH],
}

impl Stash {
    pub(crate) const fn new() -> Self {
        Self {
            out: None,
            bytes: [0; STASH],
        }
    }

    /// Hands out `l` (any landing out must have been ended): saves what it covers and
    /// returns its room.
    pub(crate) fn open<'a>(&mut self, arena: &'a mut [u8], l: Landing) -> Option<&'a mut [u8]> {
        debug_assert!(self.out.is_none(), "one landing at a time");
        let covered = arena.get(l.at..l.at + l.saved)?;
        self.bytes[..l.saved].copy_from_slice(covered);
        self.out = Some(l);
        arena.get_mut(l.at..l.at + l.room)
    }

    /// The landing out.
    pub(crate) fn out(&self) -> Option<Landing> {
        self.out
    }

    /// The first `len` bytes of the landing out, if one is and it is that large.
    pub(crate) fn landed<'a>(&self, arena: &'a [u8], len: usize) -> Option<&'a [u8]> {
        let l = self.out?;
        if len > l.room {
            return None;
        }
        arena.get(l.at..l.at + len)
    }

    /// Ends the landing out, if any: puts back the bytes it covered.
    pub(crate) fn abandon(&mut self, arena: &mut [u8]) {
        if let Some(l) = self.out.take() {
            if let Some(covered) = arena.get_mut(l.at..l.at + l.saved) {
                covered.copy_from_slice(&self.bytes[..l.saved]);
            }
        }
    }

    /// Forgets the landing out without restoring (the arena is being emptied).
    pub(crate) fn forget(&mut self) {
        self.out = None;
    }
}

/// Where a packet being taken is: a caller's slice, or landed in the arena.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Src<'a> {
    Outside(&'a [u8]),
    /// Arena offset and length.
    Landed(usize, usize),
}

impl<'a> Src<'a> {
    /// The packet's bytes (empty if a landing lies outside `arena`, which never happens).
    pub(crate) fn bytes(self, arena: &'a [u8]) -> &'a [u8] {
        match self {
            Src::Outside(p) => p,
            Src::Landed(at, len) => arena.get(at..at + len).unwrap_or(&[]),
        }
    }
}

/// Copies `range` of the packet to arena offset `to`; nothing to do when it landed there.
/// Callers pass ranges inside the packet and destinations inside the arena.
pub(crate) fn place(arena: &mut [u8], src: Src<'_>, range: Range<usize>, to: usize) {
    let n = range.len();
    match src {
        Src::Outside(p) => arena[to..to + n].copy_from_slice(&p[range]),
        Src::Landed(at, _) if at + range.start == to => {}
        Src::Landed(at, _) => arena.copy_within(at + range.start..at + range.end, to),
    }
}
