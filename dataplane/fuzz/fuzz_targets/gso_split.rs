//! Fuzz TSO/USO splitting: a random vnet header and packet must split or be rejected, never
//! panic; every emitted segment fits the scratch, parses as IP, and for a super-packet each
//! segment's L4 checksum verifies.
#![no_main]

use std::ops::ControlFlow;

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::offload::{self, split, VirtioNetHdr};
use tabbify_engine::core::wire::{checksum, IpPacket};

fuzz_target!(|data: &[u8]| {
    let Ok(hdr) = VirtioNetHdr::parse(data) else {
        return;
    };
    let pkt = &data[offload::VNET_HDR_LEN..];
    // A scratch sized by the input exercises the too-small path too.
    let cap = usize::from(data.first().copied().unwrap_or(0)) * 300;
    let mut scratch = vec![0u8; cap.min(offload::MAX_PACKET)];
    let mut seen = 0usize;
    let res = split(&hdr, pkt, &mut scratch, |seg| {
        seen += 1;
        if hdr.is_gso() {
            let ip = IpPacket::new_checked(seg).expect("segments are valid IP");
            let l4 = ip.payload();
            let sum = checksum::sum(ip.pseudo_header_sum(l4.len() as u32), l4);
            assert_eq!(checksum::fold(sum), 0xffff, "segment checksum verifies");
        }
        if seen > 70_000 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    if let Ok(n) = res {
        assert_eq!(n, seen);
    } else {
        assert_eq!(seen, 0, "errors come before any output");
    }
});
