//! Fuzz UDP GRO: a sequence of random packets (length-prefixed in the input) must never
//! panic; every yielded buffer has a parseable vnet header, and a coalesced one splits back
//! into at least two datagrams whose checksums verify and whose payloads add up to its own.
#![no_main]

use std::ops::ControlFlow;

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::offload::{self, split, CoalesceError, VirtioNetHdr};
use tabbify_engine::core::offload::{UdpCoalescer, UdpPush};
use tabbify_engine::core::wire::{checksum, IpPacket};

fuzz_target!(|data: &[u8]| {
    let mut c = UdpCoalescer::new(4);
    let mut scratch = vec![0u8; offload::MAX_PACKET];
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let pkt = &rest[..n.min(rest.len())];
        rest = &rest[pkt.len()..];
        match c.push(pkt) {
            Ok(UdpPush::NotCandidate) => {}
            Ok(_) => assert!(!c.is_empty()),
            Err(CoalesceError::Full) => {
                check(&mut c, &mut scratch);
                assert_ne!(c.push(pkt), Err(CoalesceError::Full));
            }
            Err(CoalesceError::TooLarge | CoalesceError::NoLanding) => {
                unreachable!("inputs are at most 65535 bytes, and push needs no landing")
            }
        }
        // Interleave finish() with pushes: finished heads must stay closed.
        if pkt.first() == Some(&0xff) {
            let _ = c.finish().count();
        }
    }
    check(&mut c, &mut scratch);
});

fn check(c: &mut UdpCoalescer, scratch: &mut [u8]) {
    for buf in c.finish() {
        let hdr = VirtioNetHdr::parse(buf).expect("every buffer starts with a vnet header");
        if !hdr.is_gso() {
            assert_eq!(hdr, VirtioNetHdr::default());
            continue;
        }
        let ip_len = buf.len() - offload::VNET_HDR_LEN;
        let hlen = usize::from(hdr.hdr_len);
        let mut payload = 0;
        let res = split(&hdr, &buf[offload::VNET_HDR_LEN..], scratch, |seg| {
            let ip = IpPacket::new_checked(seg).expect("datagrams are valid IP");
            let l4 = ip.payload();
            payload += l4.len() - 8;
            let sum = checksum::sum(ip.pseudo_header_sum(l4.len() as u32), l4);
            assert_eq!(checksum::fold(sum), 0xffff);
            ControlFlow::Continue(())
        });
        assert!(res.expect("a coalesced head splits") >= 2);
        assert_eq!(payload, ip_len - hlen);
    }
    c.clear();
}
