//! TSO/USO segmentation on the send side: [`split`] turns one TUN read (a super-packet
//! behind its vnet header) into MTU-sized packets to encrypt, and [`complete_checksum`]
//! finishes the partial checksum of a packet that is not a super-packet.
//!
//! Invariants: every header is validated before the first segment is emitted, so an error
//! means nothing was emitted; segments are built one at a time in a caller-owned scratch
//! buffer and each is valid only inside the callback; nothing allocates and no input can
//! make it panic.

use std::ops::ControlFlow;

use super::vnet::{flags, gso_type, VirtioNetHdr};
use super::GsoError;
use crate::core::wire::{
    checksum, ipv6, protocol, tcp, udp, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket, WireError,
};

/// Completes the partial checksum of a non-GSO packet in place: sums from `csum_start` to
/// the end, stores the complement at `csum_start + csum_offset` (a zero result is stored as
/// `0xffff`, which TCP and UDP both accept). Does nothing without [`flags::NEEDS_CSUM`].
pub fn complete_checksum(hdr: &VirtioNetHdr, pkt: &mut [u8]) -> Result<(), GsoError> {
    if hdr.flags & flags::NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > pkt.len() {
        return Err(GsoError::BadCsumOffset);
    }
    let c = match checksum::finish(checksum::sum(0, &pkt[start..])) {
        0 => 0xffff,
        c => c,
    };
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// What [`split`] learned from the headers of a super-packet.
#[derive(Debug, Clone, Copy)]
struct Plan {
    v6: bool,
    tcp: bool,
    /// IP header length (the L4 offset).
    l3: usize,
    /// L3 + L4 header length.
    hlen: usize,
    /// End of the IP packet as declared by its length field.
    end: usize,
    /// Pseudo-header sum without the length.
    pseudo: u64,
    /// IPv4 identification of the super-packet (0 for IPv6).
    ident: u16,
    /// TCP sequence number and flags of the super-packet (0 for UDP).
    seq: u32,
    tcp_flags: u8,
}

/// Splits one TUN read (`hdr` + `pkt`, the IP packet after the vnet header) into the
/// packets to encrypt, calling `emit` with each in order; stops early when `emit` breaks.
/// Returns the number of packets emitted.
///
/// * `gso_type` NONE: `pkt` is emitted as is, after completing its checksum in `scratch`
///   when `NEEDS_CSUM` is set.
/// * TCPV4/TCPV6: each segment carries at most `gso_size` payload bytes, its own IPv4 total
///   length, identification (+1 per segment) and header checksum, or IPv6 payload length;
///   the TCP sequence number advances per segment, FIN and PSH stay only on the last
///   segment and CWR only on the first; the TCP checksum is computed from scratch.
/// * UDP_L4: each datagram carries at most `gso_size` payload bytes with its own UDP length
///   and checksum.
///
/// Every header is validated before the first `emit`, so an error means nothing was
/// emitted. `scratch` must hold the largest segment (headers + `gso_size`); a
/// [`MAX_PACKET`](super::MAX_PACKET)-sized scratch always does.
pub fn split(
    hdr: &VirtioNetHdr,
    pkt: &[u8],
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<usize, GsoError> {
    if !hdr.is_gso() {
        if hdr.flags & flags::NEEDS_CSUM == 0 {
            let _ = emit(pkt);
            return Ok(1);
        }
        let out = scratch
            .get_mut(..pkt.len())
            .ok_or(GsoError::ScratchTooSmall)?;
        out.copy_from_slice(pkt);
        complete_checksum(hdr, out)?;
        let _ = emit(out);
        return Ok(1);
    }
    let plan = plan(hdr, pkt)?;
    let gso = usize::from(hdr.gso_size);
    let payload = &pkt[plan.hlen..plan.end];
    let largest = plan.hlen + gso.min(payload.len());
    if scratch.len() < largest {
        return Err(GsoError::ScratchTooSmall);
    }
    let nseg = payload.len().div_ceil(gso).max(1);
    for i in 0..nseg {
        let chunk = payload.get(i * gso..).unwrap_or(&[]);
        let chunk = &chunk[..chunk.len().min(gso)];
        let n = plan.hlen + chunk.len();
        let out = &mut scratch[..n];
        out[..plan.hlen].copy_from_slice(&pkt[..plan.hlen]);
        out[plan.hlen..].copy_from_slice(chunk);
        // The views below cannot fail: the headers were copied from `pkt`, which `plan`
        // validated, and a segment is no longer than `pkt`.
        segment_headers(out, plan, i, nseg, gso)?;
        if emit(out).is_break() {
            return Ok(i + 1);
        }
    }
    Ok(nseg)
}

/// Validates a super-packet's headers against its vnet header.
fn plan(hdr: &VirtioNetHdr, pkt: &[u8]) -> Result<Plan, GsoError> {
    let ty = hdr.gso_type & !gso_type::ECN;
    let (want_v6, tcp) = match ty {
        gso_type::TCPV4 => (Some(false), true),
        gso_type::TCPV6 => (Some(true), true),
        gso_type::UDP_L4 => (None, false),
        other => return Err(GsoError::UnsupportedGsoType(other)),
    };
    if hdr.gso_size == 0 {
        return Err(GsoError::ZeroGsoSize);
    }
    if usize::from(hdr.hdr_len) > pkt.len() {
        return Err(GsoError::BadHdrLen);
    }
    let proto = if tcp { protocol::TCP } else { protocol::UDP };
    let (v6, l3, end, pseudo, ident) = match pkt.first().map(|b| b >> 4) {
        Some(4) if want_v6 != Some(true) => {
            let ip = Ipv4Packet::new_checked(pkt)?;
            if ip.is_fragment() {
                return Err(GsoError::Fragment);
            }
            if ip.protocol() != proto {
                return Err(GsoError::WrongProtocol);
            }
            (
                false,
                ip.header_len(),
                ip.total_len(),
                ip.pseudo_header_sum(0),
                ip.ident(),
            )
        }
        Some(6) if want_v6 != Some(false) => {
            let ip = Ipv6Packet::new_checked(pkt)?;
            if ip.next_header() != proto {
                return Err(GsoError::WrongProtocol);
            }
            (
                true,
                ipv6::HEADER_LEN,
                ip.total_len(),
                ip.pseudo_header_sum(0),
                0,
            )
        }
        Some(4 | 6) => return Err(GsoError::WrongProtocol),
        Some(_) => return Err(GsoError::Header(WireError::BadVersion)),
        None => return Err(GsoError::Truncated),
    };
    let l4 = &pkt[l3..end];
    let (l4h, seq, tcp_flags) = if tcp {
        let t = TcpPacket::new_checked(l4)?;
        (t.header_len(), t.seq(), t.flags())
    } else if l4.len() < udp::HEADER_LEN {
        return Err(GsoError::Header(WireError::Truncated));
    } else {
        (udp::HEADER_LEN, 0, 0)
    };
    if hdr.flags & flags::NEEDS_CSUM != 0 {
        let off = if tcp {
            tcp::CHECKSUM_OFFSET
        } else {
            udp::CHECKSUM_OFFSET
        };
        if usize::from(hdr.csum_start) != l3 || usize::from(hdr.csum_offset) != off {
            return Err(GsoError::BadCsumOffset);
        }
    }
    Ok(Plan {
        v6,
        tcp,
        l3,
        hlen: l3 + l4h,
        end,
        pseudo,
        ident,
        seq,
        tcp_flags,
    })
}

/// Rewrites the headers copied from the super-packet for segment `i` of `nseg` (`seg`
/// holds the headers and the segment's payload): the IPv4 total length, identification and
/// header checksum or the IPv6 payload length; then the TCP sequence number, flags and
/// checksum, or the UDP length and checksum.
fn segment_headers(
    seg: &mut [u8],
    plan: Plan,
    i: usize,
    nseg: usize,
    gso: usize,
) -> Result<(), WireError> {
    let l4_len = seg.len() - plan.l3;
    if plan.v6 {
        Ipv6Packet::new_resized(&mut *seg)?;
    } else {
        let mut ip = Ipv4Packet::new_resized(&mut *seg)?;
        // Per RFC 6864 the kernel's TSO increments the ID per segment unless the
        // sender asked for a fixed ID; ours never does.
        ip.set_ident(plan.ident.wrapping_add(i as u16));
        ip.fill_checksum();
    }
    let pseudo = checksum::add(plan.pseudo, u64::from(l4_len as u32));
    let l4 = &mut seg[plan.l3..];
    if plan.tcp {
        let mut t = TcpPacket::new_checked(l4)?;
        t.set_seq(plan.seq.wrapping_add((i * gso) as u32));
        let mut f = plan.tcp_flags;
        if i + 1 < nseg {
            f &= !(tcp::FIN | tcp::PSH);
        }
        if i > 0 {
            f &= !tcp::CWR;
        }
        t.set_flags(f);
        t.fill_checksum(pseudo);
    } else {
        UdpPacket::new_resized(l4)?.fill_checksum(pseudo);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::MAX_PACKET;
    use super::*;
    use proptest::prelude::*;

    fn check_tcp_split(v6: bool) {
        let payload = payload_bytes(44 * 1368 + 500, 3);
        let (hdr, sup) = SuperPacket::tcp(
            v6,
            &payload,
            1368,
            tcp::ACK | tcp::PSH | tcp::FIN | tcp::CWR,
        )
        .build();
        let segs = split_all(&hdr, &sup).unwrap();
        assert_eq!(segs.len(), 45);
        let l3 = if v6 { 40 } else { 20 };
        let hl = l3 + 32;
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_segment_checksums(s);
            let want = if i < 44 { 1368 } else { 500 };
            assert_eq!(s.len(), hl + want);
            let t = &s[l3..];
            let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
            assert_eq!(seq, 0xffff_f000u32.wrapping_add(i as u32 * 1368));
            let f = t[13];
            assert_eq!(
                f & (tcp::PSH | tcp::FIN) != 0,
                i == 44,
                "segment {i} flags {f:#x}"
            );
            assert_eq!(f & tcp::CWR != 0, i == 0);
            assert_eq!(t[20..32], TS_OPTS);
            if !v6 {
                assert_eq!(
                    u16::from_be_bytes([s[4], s[5]]),
                    0xfff0u16.wrapping_add(i as u16)
                );
            }
            joined.extend_from_slice(&s[hl..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn splits_tcp_v4_super_packet() {
        check_tcp_split(false);
    }

    #[test]
    fn splits_tcp_v6_super_packet() {
        check_tcp_split(true);
    }

    #[test]
    fn splits_udp_super_packets() {
        for v6 in [false, true] {
            let payload = payload_bytes(10 * 1392 + 1, 9);
            let (hdr, sup) = SuperPacket::udp(v6, &payload, 1392).build();
            let segs = split_all(&hdr, &sup).unwrap();
            assert_eq!(segs.len(), 11);
            let l3 = if v6 { 40 } else { 20 };
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert_segment_checksums(s);
                let u = &s[l3..];
                assert_eq!(usize::from(u16::from_be_bytes([u[4], u[5]])), u.len());
                assert_eq!(u.len(), 8 + if i < 10 { 1392 } else { 1 });
                if !v6 {
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), 7 + i as u16);
                }
                joined.extend_from_slice(&u[8..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn completes_checksum_of_single_packet() {
        let payload = payload_bytes(300, 1);
        let (mut hdr, sup) = SuperPacket::tcp(false, &payload, 1368, tcp::ACK).build();
        hdr.gso_type = gso_type::NONE;
        let segs = split_all(&hdr, &sup).unwrap();
        assert_eq!(segs.len(), 1);
        assert_segment_checksums(&segs[0]);
        assert_eq!(segs[0][..36], sup[..36]);
        // Without NEEDS_CSUM the packet goes through untouched.
        hdr.flags = 0;
        assert_eq!(split_all(&hdr, &sup).unwrap(), vec![sup.clone()]);
        // UDP whose checksum computes to zero is sent as 0xffff.
        let mut p = sup.clone();
        complete_checksum(
            &VirtioNetHdr {
                flags: flags::NEEDS_CSUM,
                csum_start: 20,
                csum_offset: 16,
                ..Default::default()
            },
            &mut p,
        )
        .unwrap();
        assert_eq!(p, segs[0]);
        let mut zeros = [0u8; 8];
        let h = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            csum_start: 0,
            csum_offset: 6,
            ..Default::default()
        };
        zeros[0] = 0xff;
        zeros[1] = 0xff;
        complete_checksum(&h, &mut zeros).unwrap();
        assert_eq!(zeros[6..8], [0xff, 0xff]);
        let mut short = [0u8; 7];
        assert_eq!(
            complete_checksum(&h, &mut short).unwrap_err(),
            GsoError::BadCsumOffset
        );
    }

    #[test]
    fn rejects_inconsistent_super_packets() {
        let payload = payload_bytes(5000, 2);
        let (hdr, sup) = SuperPacket::tcp(false, &payload, 1368, tcp::ACK).build();
        let (hdr6, sup6) = SuperPacket::tcp(true, &payload, 1368, tcp::ACK).build();
        let (uhdr, usup) = SuperPacket::udp(false, &payload, 1000).build();
        let mut scratch = vec![0u8; MAX_PACKET];
        let run = |h: &VirtioNetHdr, p: &[u8], scratch: &mut [u8]| {
            let mut n = 0;
            let r = split(h, p, scratch, |_| {
                n += 1;
                ControlFlow::Continue(())
            });
            assert!(r.is_ok() || n == 0);
            r
        };
        let mut h = hdr;
        h.gso_size = 0;
        assert_eq!(run(&h, &sup, &mut scratch), Err(GsoError::ZeroGsoSize));
        let mut h = hdr;
        h.hdr_len = sup.len() as u16 + 1;
        assert_eq!(run(&h, &sup, &mut scratch), Err(GsoError::BadHdrLen));
        assert_eq!(run(&hdr, &sup6, &mut scratch), Err(GsoError::WrongProtocol));
        assert_eq!(run(&hdr6, &sup, &mut scratch), Err(GsoError::WrongProtocol));
        let mut h = uhdr;
        h.gso_type = gso_type::TCPV4;
        h.csum_offset = 16;
        assert_eq!(run(&h, &usup, &mut scratch), Err(GsoError::WrongProtocol));
        let mut h = hdr;
        h.gso_type = gso_type::UDP;
        assert_eq!(
            run(&h, &sup, &mut scratch),
            Err(GsoError::UnsupportedGsoType(3))
        );
        h.gso_type = 9;
        assert_eq!(
            run(&h, &sup, &mut scratch),
            Err(GsoError::UnsupportedGsoType(9))
        );
        let mut h = hdr;
        h.csum_offset = 6;
        assert_eq!(run(&h, &sup, &mut scratch), Err(GsoError::BadCsumOffset));
        let mut h = hdr;
        h.csum_start = 0;
        assert_eq!(run(&h, &sup, &mut scratch), Err(GsoError::BadCsumOffset));
        assert_eq!(
            run(&hdr, &sup[..sup.len() - 1], &mut scratch),
            Err(GsoError::Header(WireError::Truncated))
        );
        assert_eq!(
            run(&hdr, &sup[..30], &mut scratch),
            Err(GsoError::BadHdrLen)
        );
        let mut h = hdr;
        h.hdr_len = 0;
        assert_eq!(
            run(&h, &sup[..30], &mut scratch),
            Err(GsoError::Header(WireError::Truncated))
        );
        assert_eq!(run(&h, &[], &mut scratch), Err(GsoError::Truncated));
        let mut frag = sup.clone();
        frag[6] |= 0x20;
        assert_eq!(run(&hdr, &frag, &mut scratch), Err(GsoError::Fragment));
        let mut bad_off = sup.clone();
        bad_off[32] = 0x40;
        assert_eq!(
            run(&hdr, &bad_off, &mut scratch),
            Err(GsoError::Header(WireError::BadHeaderLen))
        );
        assert_eq!(
            run(&hdr, &sup, &mut scratch[..1000]),
            Err(GsoError::ScratchTooSmall)
        );
        assert_eq!(run(&hdr, &sup, &mut scratch[..52 + 1368]), Ok(4));
        // The callback may stop the split early.
        let mut seen = 0;
        let n = split(&hdr, &sup, &mut scratch, |_| {
            seen += 1;
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(n, Ok(2));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn uso_split_preserves_payload(v6 in any::<bool>(), seg in 1u16..=2000, len in 0usize..=30_000) {
            let payload = payload_bytes(len, 1);
            let (hdr, sup) = SuperPacket::udp(v6, &payload, seg).build();
            let segs = split_all(&hdr, &sup).unwrap();
            prop_assert_eq!(segs.len(), len.div_ceil(usize::from(seg)).max(1));
            let hl = if v6 { 48 } else { 28 };
            let mut joined = Vec::new();
            for s in &segs {
                assert_segment_checksums(s);
                joined.extend_from_slice(&s[hl..]);
            }
            prop_assert_eq!(joined, payload);
        }
    }
}
