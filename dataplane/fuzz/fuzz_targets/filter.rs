//! Fuzz the packet filter: port rules and a packet from the input. Whatever the bytes,
//! `allows_out`/`allows_in` (may this packet open a flow) answer without panicking, and the answers keep the filter's
//! invariants: normalized ranges, outbound and inbound are mirror images, an empty rule set
//! refuses everything, no rule set allows more than "every port both ways", and that one
//! allows exactly the well-formed packets.
//!
//! Input: byte 0 = number of outbound ranges (low 2 bits) and inbound ranges (bits 2-3),
//! then 4 bytes per range (first, last; big-endian, either order), then the IP packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::filter::{PortFilter, Proto};
use tabbify_engine::core::wire::IpPacket;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let (n_out, n_in) = (usize::from(head & 3), usize::from((head >> 2) & 3));
    let Some((rules, pkt)) = rest.split_at_checked((n_out + n_in) * 4) else {
        return;
    };
    let ranges: Vec<(u16, u16)> = rules
        .chunks_exact(4)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u16::from_be_bytes([c[2], c[3]]),
            )
        })
        .collect();
    let (out, inb) = ranges.split_at(n_out);
    let f = PortFilter::from_ranges(out, inb);

    let (fo, fi) = (f.outbound(Proto::Tcp), f.inbound(Proto::Udp));
    assert_eq!(
        fo,
        f.outbound(Proto::Both),
        "bare ranges cover both protocols"
    );
    for (norm, raw) in [(&fo[..], out), (&fi[..], inb)] {
        for w in norm.windows(2) {
            assert!(
                u32::from(w[0].1) + 1 < u32::from(w[1].0),
                "sorted, apart: {norm:?}"
            );
        }
        for &(a, b) in norm {
            assert!(a <= b);
        }
        // Same ports as the input, checked at every range edge of the input.
        for &(a, b) in raw {
            for p in [a, b, a.wrapping_sub(1), b.wrapping_add(1)] {
                let naive = raw.iter().any(|&(x, y)| x.min(y) <= p && p <= x.max(y));
                let got = norm.iter().any(|&(x, y)| x <= p && p <= y);
                assert_eq!(naive, got, "port {p} in {raw:?} vs {norm:?}");
            }
        }
    }
    assert_eq!(PortFilter::from_ranges(&fo, &fi), f);

    let (o, i) = (f.allows_out(pkt), f.allows_in(pkt));
    let mirror = PortFilter::from_ranges(inb, out);
    assert_eq!(mirror.allows_in(pkt), o, "allows_in is allows_out mirrored");
    assert_eq!(
        mirror.allows_out(pkt),
        i,
        "allows_out is allows_in mirrored"
    );

    let none = PortFilter::from_ranges(&[], &[]);
    assert!(!none.allows_out(pkt) && !none.allows_in(pkt));

    let all = PortFilter::from_ranges(&[(0, u16::MAX)], &[(0, u16::MAX)]);
    let (ao, ai) = (all.allows_out(pkt), all.allows_in(pkt));
    assert_eq!(ao, ai);
    assert!(!o || ao, "nothing passes that every-port rules refuse");
    assert!(!i || ai);
    if ao {
        assert!(
            IpPacket::new_checked(pkt).is_ok(),
            "only well-formed IP passes"
        );
    }
});
