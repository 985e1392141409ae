//! Fuzz the ICMP unreachable builder and the local-destination set: arbitrary bytes as a
//! TUN read no peer covers. Whatever the bytes, `icmp::unreachable` answers without
//! panicking, never writes past the buffer it is given, and an answer it does build is a
//! well-formed IP packet of the same family that goes back to the sender, comes from the
//! unreachable destination, is never an answer to an ICMP error, carries valid checksums and
//! quotes the start of the packet. The same bytes as a destination address are checked
//! against a `LocalNets` holding exactly that address and nothing else.
//!
//! Input: byte 0 = answer buffer size selector (`V6_MAX` minus 0-255), then the packet.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::icmp::{self, V6_MAX};
use tabbify_engine::core::local::LocalNets;
use tabbify_engine::core::wire::{checksum, peek_dst, peek_src, protocol, IpPacket};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, pkt)) = data.split_first() else {
        return;
    };
    let len = V6_MAX - usize::from(cut);
    let mut out = vec![0xa5u8; V6_MAX + 64];
    let Some(n) = icmp::unreachable(pkt, &mut out[..len]) else {
        assert!(out.iter().all(|&b| b == 0xa5), "no answer, nothing written");
        return;
    };
    assert!(n <= len, "answer of {n} bytes in a {len}-byte buffer");
    assert!(
        out[len..].iter().all(|&b| b == 0xa5),
        "wrote past the buffer"
    );
    let answer = &out[..n];
    let parsed = IpPacket::new_checked(answer).expect("the answer parses");
    let (src, dst) = (peek_src(answer).unwrap(), peek_dst(answer).unwrap());
    assert_eq!(Some(src), peek_dst(pkt), "from the unreachable destination");
    assert_eq!(Some(dst), peek_src(pkt), "to the sender");
    let (l3, proto) = match parsed {
        IpPacket::V4(p) => {
            assert!(p.verify_checksum());
            (20, protocol::ICMP)
        }
        IpPacket::V6(_) => (40, protocol::ICMPV6),
    };
    let icmp = &answer[l3..];
    match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            assert_eq!(answer[9], proto);
            assert_eq!(checksum::checksum(icmp), 0);
            assert_eq!((icmp[0], icmp[1]), (3, 1));
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            assert_eq!(answer[6], proto);
            let sum = checksum::pseudo_header_v6(s, d, proto, icmp.len() as u32);
            assert_eq!(checksum::finish(checksum::sum(sum, icmp)), 0);
            assert_eq!((icmp[0], icmp[1]), (1, 0));
        }
        _ => panic!("the answer changed family"),
    }
    let quoted = &icmp[8..];
    assert_eq!(quoted, &pkt[..quoted.len()], "quotes the packet's start");
    // Never an answer to an ICMP error.
    match src {
        IpAddr::V4(_) => assert!(
            !(pkt[9] == protocol::ICMP
                && matches!(
                    pkt.get(usize::from(pkt[0] & 0xf) * 4),
                    Some(3 | 4 | 5 | 11 | 12)
                ))
        ),
        IpAddr::V6(_) => {
            assert!(!(pkt[6] == protocol::ICMPV6 && pkt.get(40).is_some_and(|t| *t < 128)))
        }
    }

    // The set of exactly the packet's destination holds it and not its sender (unless equal).
    let local = LocalNets::new([src], []);
    assert!(local.contains(src));
    assert_eq!(local.contains(dst), dst == src);
});
