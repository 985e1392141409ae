//! Fuzz connection tracking: port rules and a sequence of packets, each sent one way or the
//! other through [`PortFilter::check`] against one flow table, with the clock moving
//! forward. Whatever the bytes: no panic, the table never holds more flows than its
//! capacity, a fresh table passes exactly what the rules let open, and a packet the rules
//! would not let open passes only when a flow was tracked before it (or its direction is
//! all traffic).
//!
//! Input: byte 0 = number of outbound ranges (low 2 bits) and inbound ranges (bits 2-3);
//! then 5 bytes per range (protocol: 0 both / 1 TCP / 2 UDP by its low 2 bits, then first
//! and last, big-endian); then records of [op, clock step, length, packet bytes...]. Op
//! bit 0: direction (0 out, 1 in); bit 1: instead of the record's bytes, send the previous
//! packet back the other way with its addresses and ports swapped (so replies happen).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::conntrack::{Dir, FlowTable};
use tabbify_engine::core::filter::{PortFilter, Proto};

const CAPACITY: usize = 8;

/// The same packet coming back: addresses and (for TCP/UDP without IP options or IPv6
/// extension headers) ports swapped. Anything too short is returned as it is.
fn reverse(p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    let (addr, n, l4, proto) = match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => (12, 4, 20, p[9]),
        Some(6) if p.len() >= 40 => (8, 16, 40, p[6]),
        _ => return p,
    };
    let (a, b) = (
        p[addr..addr + n].to_vec(),
        p[addr + n..addr + 2 * n].to_vec(),
    );
    p[addr..addr + n].copy_from_slice(&b);
    p[addr + n..addr + 2 * n].copy_from_slice(&a);
    if matches!(proto, 6 | 17) && p.len() >= l4 + 4 {
        let (s, d) = (p[l4..l4 + 2].to_vec(), p[l4 + 2..l4 + 4].to_vec());
        p[l4..l4 + 2].copy_from_slice(&d);
        p[l4 + 2..l4 + 4].copy_from_slice(&s);
    }
    p
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let (n_out, n_in) = (usize::from(head & 3), usize::from((head >> 2) & 3));
    let Some((rules, mut recs)) = rest.split_at_checked((n_out + n_in) * 5) else {
        return;
    };
    let rules: Vec<(Proto, u16, u16)> = rules
        .chunks_exact(5)
        .map(|c| {
            let p = match c[0] & 3 {
                1 => Proto::Tcp,
                2 => Proto::Udp,
                _ => Proto::Both,
            };
            (
                p,
                u16::from_be_bytes([c[1], c[2]]),
                u16::from_be_bytes([c[3], c[4]]),
            )
        })
        .collect();
    let (out, inb) = rules.split_at(n_out);
    let f = PortFilter::from_rules(out, inb);
    let mut table = FlowTable::new(CAPACITY, 7);
    let mut now = 0u32;
    let mut prev: Vec<u8> = Vec::new();
    while let [op, step, len, tail @ ..] = recs {
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        recs = next;
        now = now.saturating_add(u32::from(*step) * u32::from(*step));
        let dir = if op & 1 == 0 { Dir::Out } else { Dir::In };
        let pkt = if op & 2 != 0 {
            reverse(&prev)
        } else {
            bytes.to_vec()
        };
        let had_flows = !table.is_empty();
        let opens = match dir {
            Dir::Out => f.allows_out(&pkt),
            Dir::In => f.allows_in(&pkt),
        };
        let verdict = f.check(dir, &pkt, &mut table, now);
        assert!(table.len() <= CAPACITY, "over capacity: {}", table.len());
        if verdict.is_ok() && !opens {
            assert!(
                had_flows || f.all_traffic(dir),
                "a packet the rules refuse passed without any flow"
            );
        }
        let mut fresh = FlowTable::new(CAPACITY, 9);
        assert_eq!(
            f.check(dir, &pkt, &mut fresh, now).is_ok(),
            opens,
            "a fresh table passes exactly what may open"
        );
        prev = pkt;
    }
});
