//! Fuzz UDP GRO: a sequence of random packets (length-prefixed in the input) must never
//! panic; every yielded buffer has a parseable vnet header, and a coalesced one splits back
//! into at least two datagrams whose checksums verify and whose payloads add up to its own.
//!
//! The same sequence also goes through the decrypt-in-place entry point
//! (`UdpCoalescer::land`, the datagram written into the room followed by junk as a cipher's
//! tag would be, then `commit`, or `abandon` for one it does not take and for one whose
//! first byte is 0xfe, as the pipeline does with a filtered packet): its buffers must be
//! identical to those of `push`.
#![no_main]

use std::ops::ControlFlow;

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::offload::{self, split, CoalesceError, VirtioNetHdr};
use tabbify_engine::core::offload::{UdpCoalescer, UdpPush};
use tabbify_engine::core::wire::{checksum, IpPacket};

fuzz_target!(|data: &[u8]| {
    let mut c = UdpCoalescer::new(4);
    let mut landed = UdpCoalescer::new(4);
    let mut scratch = vec![0u8; offload::MAX_PACKET];
    let mut want = Vec::new();
    let mut got = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let pkt = &rest[..n.min(rest.len())];
        rest = &rest[pkt.len()..];
        let dropped = pkt.first() == Some(&0xfe);
        land(&mut landed, pkt, dropped, &mut scratch, &mut got);
        if dropped {
            continue;
        }
        match c.push(pkt) {
            Ok(UdpPush::NotCandidate) => {}
            Ok(_) => assert!(!c.is_empty()),
            Err(CoalesceError::Full) => {
                check(&mut c, &mut scratch, &mut want);
                assert_ne!(c.push(pkt), Err(CoalesceError::Full));
            }
            Err(CoalesceError::TooLarge | CoalesceError::NoLanding) => {
                unreachable!("inputs are at most 65535 bytes, and push needs no landing")
            }
        }
        // Interleave finish() with pushes: finished heads must stay closed.
        if pkt.first() == Some(&0xff) {
            let _ = c.finish().count();
            let _ = landed.finish().count();
        }
    }
    check(&mut c, &mut scratch, &mut want);
    check(&mut landed, &mut scratch, &mut got);
    assert_eq!(got, want, "landing and pushing coalesce alike");
});

/// `pkt` through `land` and `commit` (or `abandon` when `dropped` or not taken), flushing
/// when full; with no room, pushed as the pipeline does.
fn land(
    c: &mut UdpCoalescer,
    pkt: &[u8],
    dropped: bool,
    scratch: &mut [u8],
    out: &mut Vec<Vec<u8>>,
) {
    let need = pkt.len() + 32;
    loop {
        let Some(room) = c.land(need) else {
            if !dropped && c.push(pkt) == Err(CoalesceError::Full) {
                check(c, scratch, out);
                assert_ne!(c.push(pkt), Err(CoalesceError::Full));
            }
            return;
        };
        room[..need].fill(0xa5);
        if dropped {
            c.abandon();
            return;
        }
        room[..pkt.len()].copy_from_slice(pkt);
        match c.commit(pkt.len()) {
            Ok(UdpPush::Coalesced | UdpPush::Head) => return,
            Ok(UdpPush::NotCandidate) => {
                assert_eq!(c.landed(pkt.len()), Some(pkt));
                c.abandon();
                return;
            }
            Err(CoalesceError::Full) => {
                assert_eq!(c.landed(pkt.len()), Some(pkt));
                c.abandon();
                check(c, scratch, out);
            }
            Err(e) => panic!("a landing takes what fits it: {e}"),
        }
    }
}

fn check(c: &mut UdpCoalescer, scratch: &mut [u8], out: &mut Vec<Vec<u8>>) {
    for buf in c.finish() {
        out.push(buf.to_vec());
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
