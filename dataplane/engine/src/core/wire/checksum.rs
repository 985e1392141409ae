//! The Internet checksum (RFC 1071): one's-complement sum of big-endian 16-bit words.
//!
//! [`sum`] adds 8 bytes at a time into a `u64` accumulator with end-around carry and
//! [`fold`] reduces it to 16 bits at the end; [`checksum`] is the complemented result as it
//! goes on the wire. Partial sums of several slices may be added with [`add`] as long as
//! every slice but the last has an even length (each word must keep its byte position).
//! [`update16`]/[`update32`] patch a stored checksum when one field changes (RFC 1624), and
//! [`pseudo_header_v4`]/[`pseudo_header_v6`] give the TCP/UDP pseudo-header sums.

use std::net::{Ipv4Addr, Ipv6Addr};

/// One's-complement sum of `data` as big-endian 16-bit words (an odd final byte is the high
/// byte of a zero-padded word), added to `initial`. Not folded: pass the result to [`fold`].
#[inline]
pub fn sum(initial: u64, data: &[u8]) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        // Four independent loads, each split into 32-bit halves so the four additions of a
        // round cannot overflow the 64-bit accumulator before the carry is folded back in.
        let a = be64(&c[0..8]);
        let b = be64(&c[8..16]);
        let d = be64(&c[16..24]);
        let e = be64(&c[24..32]);
        let s = (a >> 32) + (a & 0xffff_ffff) + (b >> 32) + (b & 0xffff_ffff);
        let t = (d >> 32) + (d & 0xffff_ffff) + (e >> 32) + (e & 0xffff_ffff);
        acc = add(acc, s + t);
    }
    let mut rest = chunks.remainder().chunks_exact(8);
    for c in &mut rest {
        acc = add(acc, be64(c));
    }
    let tail = rest.remainder();
    if !tail.is_empty() {
        let mut buf = [0u8; 8];
        buf[..tail.len()].copy_from_slice(tail);
        acc = add(acc, u64::from_be_bytes(buf));
    }
    acc
}

/// One's-complement addition of two partial sums (end-around carry).
#[inline]
pub fn add(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    s + u64::from(carry)
}

/// Folds a partial sum to 16 bits (not complemented).
#[inline]
pub fn fold(sum: u64) -> u16 {
    let mut s = (sum >> 32) + (sum & 0xffff_ffff);
    s = (s >> 32) + (s & 0xffff_ffff);
    s = (s >> 16) + (s & 0xffff);
    s = (s >> 16) + (s & 0xffff);
    s = (s >> 16) + (s & 0xffff);
    // After three folds of a value below 2^33 the result fits in 16 bits.
    (s & 0xffff) as u16
}

/// The checksum of `data` as stored on the wire: the complement of the folded sum.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(0, data))
}

/// Complemented checksum of a partial sum (what goes into a header field).
#[inline]
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}

/// Updates a stored checksum `old_csum` after a 16-bit field changed from `old` to `new`
/// (RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`).
#[inline]
pub fn update16(old_csum: u16, old: u16, new: u16) -> u16 {
    let s = u64::from(!old_csum) + u64::from(!old) + u64::from(new);
    !fold(s)
}

/// Updates a stored checksum after a 32-bit field changed from `old` to `new`.
#[inline]
pub fn update32(old_csum: u16, old: u32, new: u32) -> u16 {
    let s = u64::from(!old_csum)
        + u64::from(!(old >> 16) & 0xffff)
        + u64::from(!old & 0xffff)
        + u64::from(new >> 16)
        + u64::from(new & 0xffff);
    !fold(s)
}

/// Partial sum of the IPv4 TCP/UDP pseudo-header (RFC 793 §3.1, RFC 768): source,
/// destination, zero, protocol, and the L4 length (header plus payload).
#[inline]
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: u32) -> u64 {
    u64::from(u32::from(src) >> 16)
        + u64::from(u32::from(src) & 0xffff)
        + u64::from(u32::from(dst) >> 16)
        + u64::from(u32::from(dst) & 0xffff)
        + u64::from(protocol)
        + u64::from(l4_len >> 16)
        + u64::from(l4_len & 0xffff)
}

/// Partial sum of the IPv6 pseudo-header (RFC 8200 §8.1): source, destination, the 32-bit
/// upper-layer length, three zero bytes and the next header.
#[inline]
pub fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4_len: u32) -> u64 {
    // Folded first, so the result stays far below 2^64 and callers may add to it.
    let s = u64::from(fold(sum(sum(0, &src.octets()), &dst.octets())));
    s + u64::from(next_header) + u64::from(l4_len >> 16) + u64::from(l4_len & 0xffff)
}

#[inline]
fn be64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_be_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook RFC 1071 loop, 16 bits at a time, as an independent reference.
    fn reference(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        let mut i = 0;
        while i + 1 < data.len() {
            s += u32::from(u16::from_be_bytes([data[i], data[i + 1]]));
            i += 2;
        }
        if i < data.len() {
            s += u32::from(data[i]) << 8;
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn real_ipv4_header() {
        // A captured IPv4 header (ping 192.168.0.1 -> 192.168.0.199) with checksum b861.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0);
        let mut zeroed = hdr;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(checksum(&zeroed), 0xb861);
    }

    #[test]
    fn pseudo_header_sums_do_not_overflow() {
        // All-ones addresses drive the unfolded sum close to 2^64.
        let a = Ipv6Addr::from([0xff; 16]);
        let s = pseudo_header_v6(a, a, 17, u32::MAX);
        assert_eq!(fold(add(s, u64::MAX - 1)), fold(add(s, 0xffff_fffe)));
        let b = Ipv4Addr::from([0xff; 4]);
        let _ = add(pseudo_header_v4(b, b, 255, u32::MAX), u64::MAX);
    }

    #[test]
    fn all_ones_and_empty() {
        assert_eq!(checksum(&[]), 0xffff);
        assert_eq!(checksum(&[0xff; 1500]), 0);
        assert_eq!(checksum(&[0xff; 1501]), reference(&[0xff; 1501]));
    }

    proptest! {
        #[test]
        fn matches_reference(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            prop_assert_eq!(checksum(&data), reference(&data));
        }

        #[test]
        fn split_sums_add(data in proptest::collection::vec(any::<u8>(), 0..600), cut in 0usize..300) {
            let cut = (cut * 2).min(data.len() & !1);
            let s = add(sum(0, &data[..cut]), sum(0, &data[cut..]));
            prop_assert_eq!(finish(s), reference(&data));
        }

        #[test]
        fn incremental_matches_recompute(
            mut data in proptest::collection::vec(any::<u8>(), 8..200),
            pos in 0usize..100,
            new16 in any::<u16>(),
            new32 in any::<u32>(),
        ) {
            let p = (pos * 2) % (data.len() & !3).max(4);
            let p = p.min(data.len() - 4) & !1;
            let c0 = checksum(&data);
            let old16 = u16::from_be_bytes([data[p], data[p + 1]]);
            data[p..p + 2].copy_from_slice(&new16.to_be_bytes());
            let c1 = update16(c0, old16, new16);
            // 0x0000 and 0xffff are the same value in one's complement.
            let want = checksum(&data);
            prop_assert!(c1 == want || (c1 ^ want) == 0xffff && (c1 == 0 || c1 == 0xffff));
            let old32 = u32::from_be_bytes([data[p], data[p + 1], data[p + 2], data[p + 3]]);
            data[p..p + 4].copy_from_slice(&new32.to_be_bytes());
            let c2 = update32(c1, old32, new32);
            let want = checksum(&data);
            prop_assert!(c2 == want || (c2 ^ want) == 0xffff && (c2 == 0 || c2 == 0xffff));
        }
    }
}
