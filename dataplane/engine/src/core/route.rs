//! `RouteTable`: longest-prefix match from an inner address to a value (a peer slot).
//!
//! One path-compressed binary trie per address family (the structure of WireGuard's
//! `allowedips`), stored in a flat `Vec` of nodes linked by `u32` indices: no per-node
//! allocation, a clone is one `memcpy`-like copy per family, and a lookup touches one
//! small node per branching point. Keys are host-order integers (`u32` for IPv4, `u128`
//! for IPv6), most significant bit first.
//!
//! Large tables (from 1024 routes per family) add a lookup shortcut: a direct-indexed
//! array over the first 16 address bits giving, per block, the node to resume from and
//! the best value above it, so a lookup skips the top of the trie (one array read instead
//! of up to 16 dependent node reads). It costs 2^16 entries (768 KiB for a `u32` value)
//! per family and is kept exact on every insert and remove.
//!
//! Invariants, kept by every mutation:
//! * every stored prefix has its host bits cleared (inputs are normalised with
//!   [`IpNet::network`]);
//! * a node's children extend its prefix: child `b` of a node of length `l` has a longer
//!   prefix whose bit `l` is `b`;
//! * a node without a value has exactly two children (a branching point), so the node
//!   count is below twice the route count;
//! * `len` counts nodes holding a value.
//!
//! Readers use an immutable snapshot; writers clone, modify and publish (see
//! `core::table`). Lookups never allocate and never panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::core::net::IpNet;

/// Longest-prefix-match table over IPv4 and IPv6 prefixes.
#[derive(Clone, Debug)]
pub struct RouteTable<V: Copy> {
    v4: Trie<u32, V>,
    v6: Trie<u128, V>,
}

impl<V: Copy> Default for RouteTable<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Copy> RouteTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            v4: Trie::new(),
            v6: Trie::new(),
        }
    }

    #[cfg(test)]
    fn with_top(top_bits: u8, top_min: usize) -> Self {
        Self {
            v4: Trie::with_top(top_bits, top_min),
            v6: Trie::with_top(top_bits, top_min),
        }
    }

    /// Number of prefixes stored (both families).
    pub fn len(&self) -> usize {
        self.v4.len + self.v6.len
    }

    /// Whether no prefix is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<V> {
        match addr {
            IpAddr::V4(a) => self.lookup_v4(u32::from(a)),
            IpAddr::V6(a) => self.lookup_v6(u128::from(a)),
        }
    }

    /// [`lookup`](Self::lookup) for an IPv4 address as a host-order integer.
    #[inline]
    pub fn lookup_v4(&self, addr: u32) -> Option<V> {
        self.v4.lookup(addr)
    }

    /// [`lookup`](Self::lookup) for an IPv6 address as a host-order integer.
    #[inline]
    pub fn lookup_v6(&self, addr: u128) -> Option<V> {
        self.v6.lookup(addr)
    }

    /// The value stored for exactly this prefix (host bits ignored).
    pub fn lookup_exact(&self, net: &IpNet) -> Option<V> {
        match net.network().addr() {
            IpAddr::V4(a) => self.v4.get(u32::from(a), net.prefix_len()),
            IpAddr::V6(a) => self.v6.get(u128::from(a), net.prefix_len()),
        }
    }

    /// Stores `value` for `net` (host bits ignored); returns the value it replaces.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        match net.network().addr() {
            IpAddr::V4(a) => self.v4.insert(u32::from(a), net.prefix_len(), value),
            IpAddr::V6(a) => self.v6.insert(u128::from(a), net.prefix_len(), value),
        }
    }

    /// Removes `net` (host bits ignored); returns its value if it was stored.
    pub fn remove(&mut self, net: IpNet) -> Option<V> {
        match net.network().addr() {
            IpAddr::V4(a) => self.v4.remove(u32::from(a), net.prefix_len()),
            IpAddr::V6(a) => self.v6.remove(u128::from(a), net.prefix_len()),
        }
    }

    /// Keeps only the prefixes for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(IpNet, V) -> bool) {
        let doomed: Vec<IpNet> = self
            .iter()
            .filter(|&(n, v)| !keep(n, v))
            .map(|(n, _)| n)
            .collect();
        for n in doomed {
            self.remove(n);
        }
    }

    /// Removes every prefix whose value matches (all prefixes of one peer); returns how
    /// many were removed.
    pub fn remove_value(&mut self, mut matches: impl FnMut(V) -> bool) -> usize {
        let before = self.len();
        self.retain(|_, v| !matches(v));
        before - self.len()
    }

    /// Replaces every stored value `v` by `f(v)`, keeping every prefix and the trie's
    /// shape (the lookup shortcut's values included): one pass over the flat node arrays,
    /// no allocation. The table's writers use it to renumber peer positions.
    pub fn map_values(&mut self, mut f: impl FnMut(V) -> V) {
        self.v4.map_values(&mut f);
        self.v6.map_values(&mut f);
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// Every (prefix, value), IPv4 first, each family in address order with shorter
    /// prefixes before the longer ones they contain.
    pub fn iter(&self) -> Iter<'_, V> {
        Iter {
            v4: self.v4.iter(),
            v6: self.v6.iter(),
        }
    }

    /// Heap bytes held by the node arrays (for memory reports).
    pub fn heap_bytes(&self) -> usize {
        self.v4.heap_bytes() + self.v6.heap_bytes()
    }
}

impl<V: Copy> FromIterator<(IpNet, V)> for RouteTable<V> {
    fn from_iter<T: IntoIterator<Item = (IpNet, V)>>(iter: T) -> Self {
        let mut t = Self::new();
        for (n, v) in iter {
            t.insert(n, v);
        }
        t
    }
}

/// Iterator over a [`RouteTable`]'s (prefix, value) pairs.
#[derive(Debug)]
pub struct Iter<'a, V: Copy> {
    v4: TrieIter<'a, u32, V>,
    v6: TrieIter<'a, u128, V>,
}

impl<V: Copy> Iterator for Iter<'_, V> {
    type Item = (IpNet, V);

    fn next(&mut self) -> Option<Self::Item> {
        if let Some((k, l, v)) = self.v4.next() {
            return Some((net(IpAddr::V4(Ipv4Addr::from(k)), l), v));
        }
        let (k, l, v) = self.v6.next()?;
        Some((net(IpAddr::V6(Ipv6Addr::from(k)), l), v))
    }
}

/// Builds an `IpNet` from a stored (already in range) key and length.
fn net(addr: IpAddr, len: u8) -> IpNet {
    IpNet::new(addr, len).unwrap_or_else(|| IpNet::host(addr))
}

/// A key type: an unsigned integer read most significant bit first.
trait Bits: Copy + Eq + std::fmt::Debug {
    const BITS: u8;
    /// Number of leading bits `self` and `other` share (`BITS` when equal).
    fn common(self, other: Self) -> u8;
    /// Bit `i` counted from the most significant (0-based), as a child slot.
    fn bit(self, i: u8) -> usize;
    /// `self` with all but the first `len` bits cleared.
    fn mask(self, len: u8) -> Self;
    /// The first `bits` bits (1..=16) as an index.
    fn top(self, bits: u8) -> usize;
    /// The key whose first `bits` bits are `block` and the rest zero.
    fn from_top(block: usize, bits: u8) -> Self;
}

impl Bits for u32 {
    const BITS: u8 = 32;
    #[inline(always)]
    fn common(self, other: Self) -> u8 {
        (self ^ other).leading_zeros() as u8
    }
    #[inline(always)]
    fn bit(self, i: u8) -> usize {
        ((self >> (31 - u32::from(i & 31))) & 1) as usize
    }
    #[inline(always)]
    fn mask(self, len: u8) -> Self {
        self & crate::core::net::mask32(len)
    }
    #[inline(always)]
    fn top(self, bits: u8) -> usize {
        (self >> (32 - u32::from(bits.clamp(1, 16)))) as usize
    }
    fn from_top(block: usize, bits: u8) -> Self {
        (block as u32) << (32 - u32::from(bits.clamp(1, 16)))
    }
}

impl Bits for u128 {
    const BITS: u8 = 128;
    #[inline(always)]
    fn common(self, other: Self) -> u8 {
        (self ^ other).leading_zeros() as u8
    }
    #[inline(always)]
    fn bit(self, i: u8) -> usize {
        ((self >> (127 - u32::from(i & 127))) & 1) as usize
    }
    #[inline(always)]
    fn mask(self, len: u8) -> Self {
        self & crate::core::net::mask128(len)
    }
    #[inline(always)]
    fn top(self, bits: u8) -> usize {
        (self >> (128 - u32::from(bits.clamp(1, 16)))) as usize
    }
    fn from_top(block: usize, bits: u8) -> Self {
        (block as u128) << (128 - u32::from(bits.clamp(1, 16)))
    }
}

/// "No node": an index past any real node, so `nodes.get(NIL)` is `None`.
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Node<K, V> {
    /// The prefix, host bits cleared.
    key: K,
    /// Children by the bit after the prefix; `NIL` when absent.
    child: [u32; 2],
    /// Prefix length.
    len: u8,
    /// The route's value; `None` for a branching point.
    value: Option<V>,
}

/// Where a node index is stored: the root slot or a child slot of a node.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Root,
    Child(u32, usize),
}

#[derive(Clone, Debug)]
struct Trie<K, V> {
    nodes: Vec<Node<K, V>>,
    /// Indices of unused entries in `nodes`, reused by the next insertions.
    free: Vec<u32>,
    root: u32,
    len: usize,
    /// Lookup shortcut, indexed by an address's first `top_bits` bits; empty while the
    /// trie holds fewer than `top_min` routes. See [`TopEntry`].
    top: Vec<TopEntry<V>>,
    top_bits: u8,
    top_min: usize,
}

/// Where a lookup for an address in one block (same first `top_bits` bits) resumes: the
/// first node on the block's path whose prefix is at least `top_bits` long (or `NIL`),
/// and the value of the longest shorter prefix covering the whole block.
///
/// Kept exact by recomputing, after every insert or remove of prefix P, the blocks P
/// overlaps: nodes added or spliced out elsewhere are valueless branching points shorter
/// than `top_bits`, which do not change any other block's entry.
#[derive(Clone, Copy, Debug)]
struct TopEntry<V> {
    node: u32,
    best: Option<V>,
}

/// Block bits of the lookup shortcut: 2^16 entries, 512 KiB-1 MiB per family.
const TOP_BITS: u8 = 16;
/// Routes per family from which the shortcut is kept.
const TOP_MIN: usize = 1024;

impl<K: Bits, V: Copy> Trie<K, V> {
    fn new() -> Self {
        Self {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
            len: 0,
            top: Vec::new(),
            top_bits: TOP_BITS,
            top_min: TOP_MIN,
        }
    }

    #[cfg(test)]
    fn with_top(top_bits: u8, top_min: usize) -> Self {
        Self {
            top_bits,
            top_min,
            ..Self::new()
        }
    }

    /// The shortcut entry for block `b`, by walking from the root.
    fn top_entry(&self, b: usize) -> TopEntry<V> {
        let base = K::from_top(b, self.top_bits);
        let mut best = None;
        let mut i = self.root;
        while let Some(n) = self.nodes.get(i as usize) {
            if n.len >= self.top_bits {
                let node = if base.common(n.key) >= self.top_bits {
                    i
                } else {
                    NIL
                };
                return TopEntry { node, best };
            }
            if base.common(n.key) < n.len {
                break;
            }
            if n.value.is_some() {
                best = n.value;
            }
            i = n.child[base.bit(n.len)];
        }
        TopEntry { node: NIL, best }
    }

    /// Keeps the shortcut exact after `key/len` was inserted or removed, building or
    /// dropping it as the route count crosses `top_min`.
    fn refresh_top(&mut self, key: K, len: u8) {
        if self.top.is_empty() {
            if self.len >= self.top_min.max(1) {
                self.top = (0..1usize << self.top_bits)
                    .map(|b| self.top_entry(b))
                    .collect();
            }
            return;
        }
        if self.len < self.top_min / 4 || self.len == 0 {
            self.top = Vec::new();
            return;
        }
        let first = key.top(self.top_bits);
        let count = if len >= self.top_bits {
            1
        } else {
            1usize << (self.top_bits - len)
        };
        for b in first..first + count {
            let e = self.top_entry(b);
            if let Some(slot) = self.top.get_mut(b) {
                *slot = e;
            }
        }
    }

    #[inline]
    fn lookup(&self, addr: K) -> Option<V> {
        let (mut i, mut best) = match self.top.get(addr.top(self.top_bits)) {
            Some(e) => (e.node, e.best),
            None => (self.root, None),
        };
        while let Some(n) = self.nodes.get(i as usize) {
            if addr.common(n.key) < n.len {
                break;
            }
            if n.value.is_some() {
                best = n.value;
            }
            if n.len >= K::BITS {
                break;
            }
            i = n.child[addr.bit(n.len)];
        }
        best
    }

    fn get(&self, key: K, len: u8) -> Option<V> {
        let mut i = self.root;
        while let Some(n) = self.nodes.get(i as usize) {
            if n.len > len || key.common(n.key) < n.len {
                return None;
            }
            if n.len == len {
                return n.value;
            }
            i = n.child[key.bit(n.len)];
        }
        None
    }

    fn alloc(&mut self, node: Node<K, V>) -> u32 {
        if let Some(i) = self.free.pop() {
            if let Some(slot) = self.nodes.get_mut(i as usize) {
                *slot = node;
                return i;
            }
        }
        self.nodes.push(node);
        // Node count stays far below u32::MAX (two per route); a table that large could
        // not be allocated anyway.
        (self.nodes.len() - 1) as u32
    }

    fn release(&mut self, i: u32) {
        if let Some(n) = self.nodes.get_mut(i as usize) {
            n.child = [NIL, NIL];
            n.value = None;
            self.free.push(i);
        }
    }

    fn set_slot(&mut self, slot: Slot, target: u32) {
        match slot {
            Slot::Root => self.root = target,
            Slot::Child(p, b) => {
                if let Some(n) = self.nodes.get_mut(p as usize) {
                    n.child[b] = target;
                }
            }
        }
    }

    fn node(&self, i: u32) -> Option<Node<K, V>> {
        self.nodes.get(i as usize).copied()
    }

    fn leaf(key: K, len: u8, value: V) -> Node<K, V> {
        Node {
            key,
            child: [NIL, NIL],
            len,
            value: Some(value),
        }
    }

    /// `len <= K::BITS`; host bits of `key` are ignored.
    fn insert(&mut self, key: K, len: u8, value: V) -> Option<V> {
        let key = key.mask(len);
        let old = self.insert_node(key, len, value);
        self.refresh_top(key, len);
        old
    }

    fn remove(&mut self, key: K, len: u8) -> Option<V> {
        let key = key.mask(len);
        let old = self.remove_node(key, len);
        if old.is_some() {
            self.refresh_top(key, len);
        }
        old
    }

    /// `key` has its host bits cleared.
    fn insert_node(&mut self, key: K, len: u8, value: V) -> Option<V> {
        let mut slot = Slot::Root;
        let mut i = self.root;
        loop {
            let Some(n) = self.node(i) else {
                // Empty slot: hang a new leaf here.
                let leaf = self.alloc(Self::leaf(key, len, value));
                self.set_slot(slot, leaf);
                self.len += 1;
                return None;
            };
            let common = key.common(n.key).min(len).min(n.len);
            if common == n.len {
                if n.len == len {
                    // The same prefix: replace (or fill a branching point).
                    let old = n.value;
                    if let Some(m) = self.nodes.get_mut(i as usize) {
                        m.value = Some(value);
                    }
                    if old.is_none() {
                        self.len += 1;
                    }
                    return old;
                }
                // `n` contains the new prefix: descend.
                let b = key.bit(n.len);
                slot = Slot::Child(i, b);
                i = n.child[b];
                continue;
            }
            if common == len {
                // The new prefix contains `n`: it goes between the slot and `n`.
                let mut new = Self::leaf(key, len, value);
                new.child[n.key.bit(len)] = i;
                let j = self.alloc(new);
                self.set_slot(slot, j);
                self.len += 1;
                return None;
            }
            // They diverge at bit `common`: a branching point holds both.
            let leaf = self.alloc(Self::leaf(key, len, value));
            let mut join = Node {
                key: key.mask(common),
                child: [NIL, NIL],
                len: common,
                value: None,
            };
            join.child[key.bit(common)] = leaf;
            join.child[n.key.bit(common)] = i;
            let j = self.alloc(join);
            self.set_slot(slot, j);
            self.len += 1;
            return None;
        }
    }

    /// `key` has its host bits cleared.
    fn remove_node(&mut self, key: K, len: u8) -> Option<V> {
        // The path from the root: (slot holding the node, node index).
        let mut path: Vec<(Slot, u32)> = Vec::with_capacity(32);
        let mut slot = Slot::Root;
        let mut i = self.root;
        loop {
            let n = self.node(i)?;
            if n.len > len || key.common(n.key) < n.len {
                return None;
            }
            path.push((slot, i));
            if n.len == len {
                break;
            }
            let b = key.bit(n.len);
            slot = Slot::Child(i, b);
            i = n.child[b];
        }
        let (slot, i) = path.pop()?;
        let n = self.node(i)?;
        let old = n.value?;
        self.len -= 1;
        match (n.child[0] != NIL, n.child[1] != NIL) {
            (true, true) => {
                // Still a branching point.
                if let Some(m) = self.nodes.get_mut(i as usize) {
                    m.value = None;
                }
            }
            (true, false) | (false, true) => {
                // One child: splice it into our slot.
                let only = if n.child[0] != NIL {
                    n.child[0]
                } else {
                    n.child[1]
                };
                self.set_slot(slot, only);
                self.release(i);
            }
            (false, false) => {
                self.set_slot(slot, NIL);
                self.release(i);
                // A valueless parent now has one child: splice it out too.
                if let Some(&(pslot, p)) = path.last() {
                    if let Some(pn) = self.node(p) {
                        if pn.value.is_none() {
                            let other = if pn.child[0] != NIL {
                                pn.child[0]
                            } else {
                                pn.child[1]
                            };
                            self.set_slot(pslot, other);
                            self.release(p);
                        }
                    }
                }
            }
        }
        Some(old)
    }

    fn map_values(&mut self, f: &mut impl FnMut(V) -> V) {
        for n in &mut self.nodes {
            n.value = n.value.map(&mut *f);
        }
        for e in &mut self.top {
            e.best = e.best.map(&mut *f);
        }
    }

    fn iter(&self) -> TrieIter<'_, K, V> {
        let mut stack = Vec::with_capacity(64);
        if self.root != NIL {
            stack.push(self.root);
        }
        TrieIter { trie: self, stack }
    }

    fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node<K, V>>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }
}

#[derive(Debug)]
struct TrieIter<'a, K, V> {
    trie: &'a Trie<K, V>,
    stack: Vec<u32>,
}

impl<K: Bits, V: Copy> Iterator for TrieIter<'_, K, V> {
    type Item = (K, u8, V);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(i) = self.stack.pop() {
            let Some(n) = self.trie.node(i) else {
                continue;
            };
            // Pre-order, child 0 before child 1: address order, shorter first.
            for c in [n.child[1], n.child[0]] {
                if c != NIL {
                    self.stack.push(c);
                }
            }
            if let Some(v) = n.value {
                return Some((n.key, n.len, v));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_table_finds_nothing() {
        let t: RouteTable<u32> = RouteTable::new();
        assert_eq!(t.lookup(a("10.0.0.1")), None);
        assert_eq!(t.lookup(a("::1")), None);
        assert!(t.is_empty());
        assert_eq!(t.iter().count(), 0);
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = RouteTable::new();
        assert_eq!(t.insert(n("0.0.0.0/0"), 0), None);
        assert_eq!(t.insert(n("10.0.0.0/8"), 1), None);
        assert_eq!(t.insert(n("10.1.0.0/16"), 2), None);
        assert_eq!(t.insert(n("10.1.2.3/32"), 3), None);
        assert_eq!(t.insert(n("fd5a:1f00::/32"), 4), None);
        assert_eq!(t.insert(n("fd5a:1f00:1234::1/128"), 5), None);
        assert_eq!(t.len(), 6);
        assert_eq!(t.lookup(a("192.168.0.1")), Some(0));
        assert_eq!(t.lookup(a("10.200.0.1")), Some(1));
        assert_eq!(t.lookup(a("10.1.200.1")), Some(2));
        assert_eq!(t.lookup(a("10.1.2.3")), Some(3));
        assert_eq!(t.lookup(a("10.1.2.4")), Some(2));
        assert_eq!(t.lookup(a("fd5a:1f00:1234::1")), Some(5));
        assert_eq!(t.lookup(a("fd5a:1f00:1234::2")), Some(4));
        assert_eq!(t.lookup(a("fd5a:1f01::1")), None, "no IPv6 default route");
        assert_eq!(t.lookup_v4(0x0a01_0203), Some(3));
        assert_eq!(
            t.lookup_v6(u128::from(Ipv6Addr::from([
                0xfd5a, 0x1f00, 0, 0, 0, 0, 0, 9
            ]))),
            Some(4)
        );
    }

    #[test]
    fn insert_replaces_and_normalises_host_bits() {
        let mut t = RouteTable::new();
        assert_eq!(t.insert(n("10.1.2.3/8"), 1), None);
        assert_eq!(t.insert(n("10.0.0.0/8"), 2), Some(1));
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup_exact(&n("10.9.9.9/8")), Some(2));
        assert_eq!(t.lookup_exact(&n("10.0.0.0/9")), None);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(n("10.0.0.0/8"), 2)]);
        assert_eq!(t.remove(n("10.255.0.0/8")), Some(2));
        assert!(t.is_empty());
    }

    #[test]
    fn remove_keeps_the_rest_reachable() {
        let mut t = RouteTable::new();
        for (i, p) in [
            "10.0.0.0/8",
            "10.0.0.0/24",
            "10.0.1.0/24",
            "10.0.0.0/16",
            "0.0.0.0/0",
        ]
        .iter()
        .enumerate()
        {
            t.insert(n(p), i);
        }
        assert_eq!(t.remove(n("10.0.0.0/16")), Some(3));
        assert_eq!(t.remove(n("10.0.0.0/16")), None);
        assert_eq!(t.remove(n("10.0.2.0/24")), None);
        assert_eq!(t.lookup(a("10.0.1.9")), Some(2));
        assert_eq!(t.lookup(a("10.0.0.9")), Some(1));
        assert_eq!(t.lookup(a("10.0.2.9")), Some(0));
        assert_eq!(t.remove(n("10.0.0.0/24")), Some(1));
        assert_eq!(t.remove(n("10.0.1.0/24")), Some(2));
        assert_eq!(t.lookup(a("10.0.1.9")), Some(0));
        assert_eq!(t.remove(n("0.0.0.0/0")), Some(4));
        assert_eq!(t.lookup(a("11.0.0.1")), None);
        assert_eq!(t.len(), 1);
        // Freed nodes are reused.
        let nodes_before = t.v4.nodes.len();
        t.insert(n("10.0.3.0/24"), 7);
        t.insert(n("10.0.4.0/24"), 8);
        assert!(t.v4.nodes.len() <= nodes_before + 1);
        assert_eq!(t.lookup(a("10.0.4.1")), Some(8));
    }

    #[test]
    fn iteration_is_ordered_and_remove_value_drops_one_peer() {
        let mut t = RouteTable::new();
        t.insert(n("fd00::/8"), 1);
        t.insert(n("10.0.0.0/8"), 1);
        t.insert(n("10.0.0.0/16"), 2);
        t.insert(n("9.0.0.0/8"), 2);
        t.insert(n("::/0"), 3);
        let all: Vec<String> = t.iter().map(|(n, v)| format!("{n}={v}")).collect();
        assert_eq!(
            all,
            [
                "9.0.0.0/8=2",
                "10.0.0.0/8=1",
                "10.0.0.0/16=2",
                "::/0=3",
                "fd00::/8=1"
            ]
        );
        assert_eq!(t.remove_value(|v| v == 2), 2);
        assert_eq!(t.lookup(a("10.0.0.1")), Some(1));
        assert_eq!(t.lookup(a("9.0.0.1")), None);
        t.retain(|n, _| n.addr().is_ipv6());
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(a("10.0.0.1")), None);
        assert_eq!(t.lookup(a("fd00::1")), Some(1));
        t.clear();
        assert!(t.is_empty());
    }

    #[test]
    fn clone_is_independent() {
        let mut t: RouteTable<u8> = [(n("10.0.0.0/8"), 1)].into_iter().collect();
        let snapshot = t.clone();
        t.insert(n("10.0.0.0/8"), 2);
        t.insert(n("10.1.0.0/16"), 3);
        assert_eq!(snapshot.lookup(a("10.1.0.1")), Some(1));
        assert_eq!(t.lookup(a("10.1.0.1")), Some(3));
    }

    // ---- property test against a naive reference ----

    #[derive(Default)]
    struct Naive(Vec<(IpNet, u8)>);

    impl Naive {
        fn insert(&mut self, net: IpNet, v: u8) -> Option<u8> {
            let net = net.network();
            match self.0.iter_mut().find(|(n, _)| *n == net) {
                Some((_, old)) => Some(std::mem::replace(old, v)),
                None => {
                    self.0.push((net, v));
                    None
                }
            }
        }
        fn remove(&mut self, net: IpNet) -> Option<u8> {
            let net = net.network();
            let pos = self.0.iter().position(|(n, _)| *n == net)?;
            Some(self.0.swap_remove(pos).1)
        }
        fn lookup(&self, addr: IpAddr) -> Option<u8> {
            self.0
                .iter()
                .filter(|(n, _)| n.contains(addr))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, v)| *v)
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(IpNet, u8),
        Remove(IpNet),
        Lookup(IpAddr),
        RemoveValue(u8),
    }

    /// IPv4 addresses clustered so prefixes overlap often: a few fixed high parts.
    fn v4_addr() -> impl Strategy<Value = u32> {
        prop_oneof![
            any::<u32>(),
            (0u32..4, any::<u32>()).prop_map(|(hi, lo)| (0x0a00_0000 | (hi << 16)) ^ (lo & 0xff)),
            (0u32..4, any::<u16>()).prop_map(|(hi, lo)| (hi << 30) | u32::from(lo)),
            Just(0u32),
            Just(u32::MAX),
        ]
    }

    fn v6_addr() -> impl Strategy<Value = u128> {
        prop_oneof![
            any::<u128>(),
            (0u128..4, any::<u16>())
                .prop_map(|(hi, lo)| (0xfd5a_1f00u128 << 96) | (hi << 80) | u128::from(lo)),
            (0u128..4, any::<u8>()).prop_map(|(hi, lo)| (hi << 126) | u128::from(lo)),
            Just(0u128),
            Just(u128::MAX),
        ]
    }

    fn addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            v4_addr().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            v6_addr().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        ]
    }

    fn prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (
                v4_addr(),
                prop_oneof![0u8..=32, Just(0u8), Just(32u8), 8u8..=24]
            )
                .prop_map(|(a, l)| IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), l).unwrap()),
            (
                v6_addr(),
                prop_oneof![0u8..=128, Just(0u8), Just(128u8), 16u8..=64]
            )
                .prop_map(|(a, l)| IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), l).unwrap()),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (prefix(), 0u8..8).prop_map(|(p, v)| Op::Insert(p, v)),
            2 => prefix().prop_map(Op::Remove),
            4 => addr().prop_map(Op::Lookup),
            1 => (0u8..8).prop_map(Op::RemoveValue),
        ]
    }

    fn check_same(t: &RouteTable<u8>, r: &Naive) {
        assert_eq!(t.len(), r.0.len());
        let mut want = r.0.clone();
        want.sort();
        let got: Vec<(IpNet, u8)> = t.iter().collect();
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, want);
        // Iteration order is address order within each family, IPv4 first.
        assert_eq!(got, sorted);
        for (net, v) in &r.0 {
            assert_eq!(t.lookup_exact(net), Some(*v));
            assert_eq!(t.lookup(net.addr()), r.lookup(net.addr()));
        }
        // Node count bound: a branching point per route at most.
        assert!(t.v4.nodes.len() - t.v4.free.len() < 2 * t.v4.len + 1);
        assert!(t.v6.nodes.len() - t.v6.free.len() < 2 * t.v6.len + 1);
    }

    /// Without the lookup shortcut, or with a small one (1-6 block bits) switched on at
    /// 0-11 routes, so building, updating and dropping it are all exercised.
    fn accel() -> impl Strategy<Value = Option<(u8, usize)>> {
        prop_oneof![Just(None), (1u8..=6, 0usize..12).prop_map(Some)]
    }

    fn table(accel: Option<(u8, usize)>) -> RouteTable<u8> {
        match accel {
            None => RouteTable::new(),
            Some((bits, min)) => RouteTable::with_top(bits, min),
        }
    }

    /// `map_values` renumbers every value, the lookup shortcut's included, and keeps
    /// every prefix (the table's writers renumber peer positions with it).
    #[test]
    fn map_values_renumbers_trie_and_shortcut() {
        let mut t = RouteTable::with_top(8, 4);
        for i in 0..8u32 {
            t.insert(
                IpNet::new(IpAddr::V4(Ipv4Addr::from(i << 24)), 8).unwrap(),
                i + 10,
            );
        }
        t.insert(n("0.0.0.0/0"), 5);
        t.insert(n("fd5a::/16"), 6);
        assert_eq!(t.v4.top.len(), 256);
        let before: Vec<_> = t.iter().map(|(p, _)| p).collect();
        t.map_values(|v| v * 2);
        assert_eq!(t.iter().map(|(p, _)| p).collect::<Vec<_>>(), before);
        assert_eq!(t.lookup(a("3.1.1.1")), Some(26));
        assert_eq!(
            t.lookup(a("200.0.0.1")),
            Some(10),
            "the shortcut's best value too"
        );
        assert_eq!(t.lookup(a("fd5a::1")), Some(12));
    }

    #[test]
    fn shortcut_is_built_and_dropped_with_the_route_count() {
        let mut t = RouteTable::with_top(8, 8);
        for i in 0..8u32 {
            t.insert(
                IpNet::new(IpAddr::V4(Ipv4Addr::from(i << 24)), 8).unwrap(),
                i,
            );
        }
        assert_eq!(t.v4.top.len(), 256);
        t.insert(n("0.0.0.0/0"), 99);
        t.insert(n("7.1.2.0/24"), 77);
        assert_eq!(t.lookup(a("7.1.2.3")), Some(77));
        assert_eq!(t.lookup(a("7.1.3.3")), Some(7));
        assert_eq!(t.lookup(a("200.0.0.1")), Some(99));
        for i in 0..8u32 {
            t.remove(IpNet::new(IpAddr::V4(Ipv4Addr::from(i << 24)), 8).unwrap());
        }
        assert_eq!(
            t.v4.top.len(),
            256,
            "kept down to a quarter of the threshold"
        );
        assert_eq!(t.lookup(a("7.1.3.3")), Some(99));
        t.remove(n("0.0.0.0/0"));
        assert!(
            t.v4.top.is_empty(),
            "dropped below a quarter of the threshold"
        );
        assert_eq!(t.lookup(a("7.1.2.3")), Some(77));
        assert_eq!(t.lookup(a("7.1.3.3")), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn matches_naive_reference(ops in proptest::collection::vec(op(), 1..200), accel in accel()) {
            let mut t = table(accel);
            let mut r = Naive::default();
            for op in ops {
                match op {
                    Op::Insert(p, v) => prop_assert_eq!(t.insert(p, v), r.insert(p, v), "insert {}", p),
                    Op::Remove(p) => prop_assert_eq!(t.remove(p), r.remove(p), "remove {}", p),
                    Op::Lookup(a) => prop_assert_eq!(t.lookup(a), r.lookup(a), "lookup {}", a),
                    Op::RemoveValue(v) => {
                        let before = r.0.len();
                        r.0.retain(|(_, x)| *x != v);
                        prop_assert_eq!(t.remove_value(|x| x == v), before - r.0.len());
                    }
                }
            }
            check_same(&t, &r);
        }

        #[test]
        fn insert_all_then_remove_all(prefixes in proptest::collection::vec(prefix(), 1..300), accel in accel()) {
            let mut t = table(accel);
            let mut r = Naive::default();
            for (i, p) in prefixes.iter().enumerate() {
                t.insert(*p, i as u8);
                r.insert(*p, i as u8);
            }
            check_same(&t, &r);
            for p in prefixes.iter().rev() {
                prop_assert_eq!(t.remove(*p), r.remove(*p));
                for q in &prefixes {
                    prop_assert_eq!(t.lookup(q.addr()), r.lookup(q.addr()));
                }
            }
            prop_assert!(t.is_empty());
            prop_assert_eq!(t.v4.nodes.len(), t.v4.free.len());
            prop_assert_eq!(t.v6.nodes.len(), t.v6.free.len());
        }
    }
}
