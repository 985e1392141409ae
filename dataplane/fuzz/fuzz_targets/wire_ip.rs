//! Fuzz the IP/TCP/UDP views: whatever `new_checked` accepts, every accessor must answer
//! without panicking, and the views must agree with each other and with the peek fast paths.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::wire::{
    checksum, peek_dst, peek_src, IpPacket, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpPacket,
    UdpPacket,
};

fuzz_target!(|data: &[u8]| {
    let _ = checksum::checksum(data);
    if let Ok(p) = IpPacket::new_checked(data) {
        assert_eq!(peek_src(data), Some(p.src()));
        assert_eq!(peek_dst(data), Some(p.dst()));
        assert!(p.total_len() <= data.len());
        assert_eq!(p.header_len() + p.payload().len(), p.total_len());
        let _ = (
            p.protocol(),
            p.packet(),
            p.pseudo_header_sum(p.payload().len() as u32),
        );
        l4(p.payload(), p.pseudo_header_sum(p.payload().len() as u32));
    }
    if let Ok(p) = Ipv4Packet::new_checked(data) {
        let _ = (
            p.tos(),
            p.ident(),
            p.flags_frag(),
            p.dont_frag(),
            p.more_frags(),
        );
        let _ = (
            p.frag_offset(),
            p.is_fragment(),
            p.ttl(),
            p.checksum(),
            p.verify_checksum(),
        );
        let _ = (p.header(), p.options());
        let r = Ipv4Repr::parse(&p);
        let mut out = [0u8; 20];
        r.emit(&mut out).expect("a parsed header re-emits");
        let mut copy = data.to_vec();
        let mut m = Ipv4Packet::new_checked(&mut copy[..]).expect("same bytes");
        m.set_ident(1);
        m.set_ttl(2);
        let n = data.len();
        for len in [0, 19, 20, 21, n / 2, n, n + 1, usize::MAX] {
            m.set_total_len(len);
            m.fill_checksum();
            assert!(m.verify_checksum());
            let _ = m.payload_mut();
            let _ = m.payload();
        }
    }
    if let Ok(p) = Ipv6Packet::new_checked(data) {
        let _ = (
            p.traffic_class(),
            p.flow_label(),
            p.hop_limit(),
            p.header(),
            p.next_header(),
        );
        let mut out = [0u8; 40];
        Ipv6Repr::parse(&p)
            .emit(&mut out)
            .expect("a parsed header re-emits");
        let mut copy = data.to_vec();
        let mut m = Ipv6Packet::new_checked(&mut copy[..]).expect("same bytes");
        m.set_hop_limit(1);
        for len in [0, 1, data.len(), usize::MAX] {
            m.set_payload_len(len);
            let _ = m.payload_mut();
            let _ = m.payload();
        }
    }
    l4(data, 0);
});

fn l4(data: &[u8], pseudo: u64) {
    if let Ok(t) = TcpPacket::new_checked(data) {
        let _ = (
            t.src_port(),
            t.dst_port(),
            t.seq(),
            t.ack(),
            t.flags(),
            t.window(),
        );
        let _ = (
            t.checksum(),
            t.urgent(),
            t.header(),
            t.options(),
            t.payload(),
        );
        let _ = t.verify_checksum(pseudo);
        let mut copy = data.to_vec();
        let mut m = TcpPacket::new_checked(&mut copy[..]).expect("same bytes");
        m.set_seq(7);
        m.set_flags(0xff);
        m.fill_checksum(pseudo);
        assert!(m.verify_checksum(pseudo));
    }
    if let Ok(u) = UdpPacket::new_checked(data) {
        let _ = (
            u.src_port(),
            u.dst_port(),
            u.len(),
            u.is_empty(),
            u.checksum(),
        );
        let _ = (u.payload(), u.datagram(), u.verify_checksum(pseudo));
        let mut copy = data.to_vec();
        let mut m = UdpPacket::new_checked(&mut copy[..]).expect("same bytes");
        m.fill_checksum(pseudo);
        assert!(m.verify_checksum(pseudo));
    }
}
