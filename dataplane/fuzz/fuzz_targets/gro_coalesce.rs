//! Fuzz GRO coalescing: a sequence of random packets (length-prefixed in the input) must
//! never panic; every yielded buffer has a parseable vnet header and a coalesced one splits
//! back into segments whose checksums verify and whose payload sum matches.
//!
//! The same sequence also goes through the decrypt-in-place entry point
//! (`Coalescer::land`, the packet written into the room followed by junk as a cipher's tag
//! would be, then `commit`; a packet whose first byte is 0xfe is abandoned instead, as the
//! pipeline does with a filtered packet): its buffers must be identical to those of `push`.
#![no_main]

use std::ops::ControlFlow;

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::offload::{self, split, CoalesceError, Coalescer, VirtioNetHdr};
use tabbify_engine::core::wire::{checksum, IpPacket};

fuzz_target!(|data: &[u8]| {
    let mut c = Coalescer::new(4);
    let mut landed = Coalescer::new(4);
    let mut scratch = vec![0u8; offload::MAX_PACKET];
    let mut rest = data;
    let mut pushed = 0usize;
    let mut want = Vec::new();
    let mut got = Vec::new();
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let pkt = &rest[..n.min(rest.len())];
        rest = &rest[pkt.len()..];
        let dropped = pkt.first() == Some(&0xfe);
        if !dropped {
            match c.push(pkt) {
                Ok(_) => pushed += 1,
                Err(CoalesceError::Full) => {
                    check(&mut c, &mut scratch, &mut want);
                    c.push(pkt).expect("an empty coalescer takes a packet");
                    pushed += 1;
                }
                Err(CoalesceError::TooLarge | CoalesceError::NoLanding) => {
                    unreachable!("inputs are at most 65535 bytes, and push needs no landing")
                }
            }
        }
        land(&mut landed, pkt, dropped, &mut scratch, &mut got);
        // Interleave finish() with pushes: finished heads must stay closed.
        if pkt.first() == Some(&0xff) {
            let _ = c.finish().count();
            let _ = landed.finish().count();
        }
    }
    assert!(pushed == 0 || !c.is_empty());
    check(&mut c, &mut scratch, &mut want);
    check(&mut landed, &mut scratch, &mut got);
    assert_eq!(got, want, "landing and pushing coalesce alike");
});

/// `pkt` through `land` and `commit` (or `abandon` when `dropped`), flushing when full.
fn land(c: &mut Coalescer, pkt: &[u8], dropped: bool, scratch: &mut [u8], out: &mut Vec<Vec<u8>>) {
    let need = pkt.len() + 32;
    loop {
        let Some(room) = c.land(need) else {
            // No room: the pipeline decrypts into its scratch and pushes.
            assert_eq!(c.len(), c.capacity(), "no room only when full");
            if !dropped && c.push(pkt) == Err(CoalesceError::Full) {
                check(c, scratch, out);
                c.push(pkt).expect("an empty coalescer takes a packet");
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
            Ok(_) => return,
            Err(CoalesceError::Full) => {
                assert_eq!(c.landed(pkt.len()), Some(pkt));
                c.abandon();
                check(c, scratch, out);
            }
            Err(e) => panic!("a landing takes what fits it: {e}"),
        }
    }
}

fn check(c: &mut Coalescer, scratch: &mut [u8], out: &mut Vec<Vec<u8>>) {
    for buf in c.finish() {
        out.push(buf.to_vec());
        let hdr = VirtioNetHdr::parse(buf).expect("every buffer starts with a vnet header");
        if !hdr.is_gso() {
            assert_eq!(hdr, VirtioNetHdr::default());
            continue;
        }
        let res = split(&hdr, &buf[offload::VNET_HDR_LEN..], scratch, |seg| {
            let ip = IpPacket::new_checked(seg).expect("segments are valid IP");
            let l4 = ip.payload();
            let sum = checksum::sum(ip.pseudo_header_sum(l4.len() as u32), l4);
            assert_eq!(checksum::fold(sum), 0xffff);
            ControlFlow::Continue(())
        });
        assert!(res.expect("a coalesced head splits") >= 2);
    }
    c.clear();
}
