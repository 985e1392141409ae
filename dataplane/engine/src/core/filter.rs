//! The data-plane packet filter: the coordinator's per-peer port rules, checked on both
//! ends of a tunnel from the same table snapshot that routes the packet.
//!
//! A [`PortFilter`] holds two port sets for one peer, as the coordinator's roster entry
//! gives them (`ports.outbound` / `ports.inbound`, see `tabbify_api::PortRules`):
//!
//! * `outbound`: ports ON THE PEER that we may open,
//! * `inbound`: ports ON US that the peer may open.
//!
//! The sender checks a packet with [`PortFilter::allows_out`] before encrypting it, the
//! receiver with [`PortFilter::allows_in`] after decrypting it (and after the allowed-source
//! check), so a peer that does not filter, or filters with stale rules, still cannot reach a
//! port the receiver's own roster forbids. A peer without a filter (a `wg-quick` style
//! configuration, UAPI `wg set`) passes everything.
//!
//! # Semantics (stateless and symmetric)
//!
//! For a packet going from a sender to a receiver, let *fwd* be the ports on the receiver
//! that the sender may open and *rev* the ports on the sender that the receiver may open.
//! Outbound (us → peer) *fwd* = `outbound`, *rev* = `inbound`; inbound (peer → us) it is the
//! mirror image, *fwd* = `inbound`, *rev* = `outbound`. Then:
//!
//! | packet | allowed when |
//! |---|---|
//! | TCP with SYN and without ACK (opens a connection) | dst port ∈ *fwd* |
//! | any other TCP segment | dst port ∈ *fwd* or src port ∈ *rev* (a reply from a service the other side may reach) |
//! | UDP | dst port ∈ *fwd* or src port ∈ *rev* |
//! | ICMPv4/ICMPv6 echo request | *fwd* covers every port 0–65535 |
//! | ICMPv4/ICMPv6 echo reply | *rev* covers every port |
//! | ICMP errors (v4: unreachable, time exceeded, parameter problem; v6: unreachable, packet too big, time exceeded, parameter problem) | *fwd* or *rev* is non-empty |
//! | any other ICMP type (redirect, timestamp, router/neighbour discovery, MLD, …) | *fwd* covers every port |
//! | any other protocol, a non-first fragment (it carries no ports), an IPv6 header chain that does not reach TCP/UDP/ICMPv6 | *fwd* covers every port |
//! | malformed or truncated (no valid IP header, an L4 header cut short) | never |
//!
//! "Covers every port" is what the coordinator sends for a rule without a port suffix, and
//! means all traffic. IPv6 hop-by-hop, routing, destination-options, fragment and
//! authentication headers are walked to find the transport header; ESP and unknown headers
//! end the walk ("other protocol"). Ports are read from the first fragment only, and only
//! when it holds a whole TCP (20+ bytes) or UDP (8 bytes) header, so a tiny first fragment
//! cannot hide its ports. For a TSO/USO super-packet the headers of the first segment decide
//! for the whole super-packet (all segments share ports; SYN is never segmented).
//!
//! Being stateless, the filter lets through a non-SYN TCP segment or a UDP datagram whose
//! *source* port is an allowed service port whatever its destination port: this is what lets
//! replies through without connection tracking. Such a packet cannot open a TCP connection
//! (the receiving stack answers a stray ACK with a reset), but a UDP service on the receiver
//! can be reached by a peer that forges an allowed source port.
//!
//! # Cost
//!
//! Port sets are normalized once at construction (sorted, disjoint, non-adjacent ranges); a
//! lookup is a binary search (one comparison for the usual single range). Checking a packet
//! reads only its headers, never allocates and never panics: the functions are total over
//! any bytes.

use crate::core::wire::{protocol, tcp, IpPacket, TcpPacket};

/// IPv6 extension headers the filter walks (RFC 8200 §4, RFC 4302).
mod ext {
    /// Hop-by-hop options.
    pub const HOP_BY_HOP: u8 = 0;
    /// Routing header.
    pub const ROUTING: u8 = 43;
    /// Fragment header.
    pub const FRAGMENT: u8 = 44;
    /// Authentication header.
    pub const AUTH: u8 = 51;
    /// Destination options.
    pub const DEST_OPTS: u8 = 60;
    /// Headers walked before giving up (each is at least 8 bytes, so a 64 KiB packet could
    /// hold thousands): past this the chain counts as "other protocol".
    pub const MAX_WALK: usize = 8;
}

/// ICMPv4 and ICMPv6 message types the filter distinguishes (RFC 792, RFC 4443).
mod icmp {
    pub const V4_ECHO_REPLY: u8 = 0;
    pub const V4_UNREACHABLE: u8 = 3;
    pub const V4_ECHO_REQUEST: u8 = 8;
    pub const V4_TIME_EXCEEDED: u8 = 11;
    pub const V4_PARAMETER_PROBLEM: u8 = 12;
    pub const V6_UNREACHABLE: u8 = 1;
    pub const V6_PACKET_TOO_BIG: u8 = 2;
    pub const V6_TIME_EXCEEDED: u8 = 3;
    pub const V6_PARAMETER_PROBLEM: u8 = 4;
    pub const V6_ECHO_REQUEST: u8 = 128;
    pub const V6_ECHO_REPLY: u8 = 129;
    /// Both ICMP headers are 8 bytes (type, code, checksum, 4 bytes of rest-of-header).
    pub const HEADER_LEN: usize = 8;
}

/// One peer's port rules, checked on every packet to and from that peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortFilter {
    outbound: PortSet,
    inbound: PortSet,
}

impl PortFilter {
    /// A filter from inclusive `(first, last)` port ranges: `outbound` = ports on the peer
    /// that we may open, `inbound` = ports on us that the peer may open. Ranges may come in
    /// any order, overlap, touch or be reversed (`(last, first)`); they are normalized. An
    /// empty list allows nothing in that direction; `[(0, 65535)]` allows all traffic.
    pub fn from_ranges(outbound: &[(u16, u16)], inbound: &[(u16, u16)]) -> PortFilter {
        PortFilter {
            outbound: PortSet::new(outbound),
            inbound: PortSet::new(inbound),
        }
    }

    /// The normalized outbound ranges (ports on the peer we may open).
    pub fn outbound(&self) -> &[(u16, u16)] {
        &self.outbound.ranges
    }

    /// The normalized inbound ranges (ports on us the peer may open).
    pub fn inbound(&self) -> &[(u16, u16)] {
        &self.inbound.ranges
    }

    /// May we send this IP packet to the peer? For a TSO/USO super-packet, its first
    /// segment's headers decide. False for anything that is not a well-formed packet.
    #[inline]
    pub fn allows_out(&self, pkt: &[u8]) -> bool {
        decide(pkt, &self.outbound, &self.inbound)
    }

    /// May this decrypted IP packet from the peer reach us? False for anything that is not
    /// a well-formed packet.
    #[inline]
    pub fn allows_in(&self, pkt: &[u8]) -> bool {
        decide(pkt, &self.inbound, &self.outbound)
    }
}

/// A set of ports as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PortSet {
    ranges: Box<[(u16, u16)]>,
}

impl PortSet {
    fn new(input: &[(u16, u16)]) -> Self {
        let mut v: Vec<(u16, u16)> = input.iter().map(|&(a, b)| (a.min(b), a.max(b))).collect();
        v.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
        for (first, last) in v {
            match out.last_mut() {
                // Overlapping or adjacent (u32: `last + 1` of 65535 must not wrap).
                Some(cur) if u32::from(first) <= u32::from(cur.1) + 1 => cur.1 = cur.1.max(last),
                _ => out.push((first, last)),
            }
        }
        Self {
            ranges: out.into_boxed_slice(),
        }
    }

    #[inline]
    fn contains(&self, port: u16) -> bool {
        let i = self.ranges.partition_point(|&(_, last)| last < port);
        matches!(self.ranges.get(i), Some(&(first, _)) if first <= port)
    }

    #[inline]
    fn is_all(&self) -> bool {
        *self.ranges == [(0, u16::MAX)]
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// What the filter sees of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// A TCP segment that opens a connection (SYN without ACK).
    TcpOpen { dst: u16 },
    /// Any other TCP segment, or a UDP datagram.
    Ports { src: u16, dst: u16 },
    /// ICMP or ICMPv6 echo request.
    EchoRequest,
    /// ICMP or ICMPv6 echo reply.
    EchoReply,
    /// An ICMP or ICMPv6 error message.
    IcmpError,
    /// Anything without ports: other protocols and ICMP types, non-first fragments.
    Other,
}

/// The rule table of the module doc; `fwd` = ports on the receiver the sender may open,
/// `rev` = ports on the sender the receiver may open.
#[inline]
fn decide(pkt: &[u8], fwd: &PortSet, rev: &PortSet) -> bool {
    match classify(pkt) {
        Some(Class::TcpOpen { dst }) => fwd.contains(dst),
        Some(Class::Ports { src, dst }) => fwd.contains(dst) || rev.contains(src),
        Some(Class::EchoRequest) => fwd.is_all(),
        Some(Class::EchoReply) => rev.is_all(),
        Some(Class::IcmpError) => !fwd.is_empty() || !rev.is_empty(),
        Some(Class::Other) => fwd.is_all(),
        None => false,
    }
}

/// Reads the IP header (and IPv6 extension headers) down to the transport header. `None`
/// when the packet is malformed.
fn classify(pkt: &[u8]) -> Option<Class> {
    match IpPacket::new_checked(pkt).ok()? {
        IpPacket::V4(ip) => {
            if ip.frag_offset() != 0 {
                return Some(Class::Other);
            }
            transport(ip.protocol(), ip.payload(), false)
        }
        IpPacket::V6(ip) => {
            let mut next = ip.next_header();
            let mut rest = ip.payload();
            for _ in 0..ext::MAX_WALK {
                let len = match next {
                    ext::HOP_BY_HOP | ext::ROUTING | ext::DEST_OPTS => {
                        (usize::from(*rest.get(1)?) + 1) * 8
                    }
                    ext::AUTH => (usize::from(*rest.get(1)?) + 2) * 4,
                    ext::FRAGMENT => {
                        let off = u16::from_be_bytes([*rest.get(2)?, *rest.get(3)?]) >> 3;
                        if off != 0 {
                            return Some(Class::Other);
                        }
                        8
                    }
                    _ => return transport(next, rest, true),
                };
                next = *rest.first()?;
                rest = rest.get(len..)?;
            }
            Some(Class::Other)
        }
    }
}

/// Classifies a transport header (`l4` starts at it) of protocol `proto`.
#[inline]
fn transport(proto: u8, l4: &[u8], v6: bool) -> Option<Class> {
    match proto {
        protocol::TCP => {
            let t = TcpPacket::new_checked(l4).ok()?;
            let f = t.flags();
            if f & tcp::SYN != 0 && f & tcp::ACK == 0 {
                Some(Class::TcpOpen { dst: t.dst_port() })
            } else {
                Some(Class::Ports {
                    src: t.src_port(),
                    dst: t.dst_port(),
                })
            }
        }
        // Only the ports: a USO super-packet's length field spans every segment.
        protocol::UDP => match l4 {
            [s0, s1, d0, d1, _, _, _, _, ..] => Some(Class::Ports {
                src: u16::from_be_bytes([*s0, *s1]),
                dst: u16::from_be_bytes([*d0, *d1]),
            }),
            _ => None,
        },
        protocol::ICMP if !v6 => icmp_class(l4, false),
        protocol::ICMPV6 if v6 => icmp_class(l4, true),
        _ => Some(Class::Other),
    }
}

#[inline]
fn icmp_class(l4: &[u8], v6: bool) -> Option<Class> {
    if l4.len() < icmp::HEADER_LEN {
        return None;
    }
    let ty = *l4.first()?;
    Some(match (v6, ty) {
        (false, icmp::V4_ECHO_REQUEST) | (true, icmp::V6_ECHO_REQUEST) => Class::EchoRequest,
        (false, icmp::V4_ECHO_REPLY) | (true, icmp::V6_ECHO_REPLY) => Class::EchoReply,
        (false, icmp::V4_UNREACHABLE | icmp::V4_TIME_EXCEEDED | icmp::V4_PARAMETER_PROBLEM)
        | (
            true,
            icmp::V6_UNREACHABLE
            | icmp::V6_PACKET_TOO_BIG
            | icmp::V6_TIME_EXCEEDED
            | icmp::V6_PARAMETER_PROBLEM,
        ) => Class::IcmpError,
        _ => Class::Other,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;
    use crate::core::wire::{Ipv4Repr, Ipv6Repr};

    const ALL: (u16, u16) = (0, u16::MAX);
    const ICMP4: u8 = protocol::ICMP;
    const ICMP6: u8 = protocol::ICMPV6;

    fn v4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + l4.len()];
        Ipv4Repr {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            protocol: proto,
            payload_len: l4.len(),
            ttl: 64,
            tos: 0,
            ident: 7,
            dont_frag: true,
        }
        .emit(&mut p)
        .unwrap();
        p[20..].copy_from_slice(l4);
        p
    }

    fn v6(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload.len()];
        Ipv6Repr {
            src: "fd5a:1f00:1::1".parse::<Ipv6Addr>().unwrap(),
            dst: "fd5a:1f00:2::1".parse::<Ipv6Addr>().unwrap(),
            next_header: next,
            payload_len: payload.len(),
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
        }
        .emit(&mut p)
        .unwrap();
        p[40..].copy_from_slice(payload);
        p
    }

    /// A 20-byte TCP header (plus `data` bytes of payload).
    fn tcp_hdr(src: u16, dst: u16, flags: u8, data: usize) -> Vec<u8> {
        let mut t = vec![0u8; 20 + data];
        t[0..2].copy_from_slice(&src.to_be_bytes());
        t[2..4].copy_from_slice(&dst.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        t
    }

    fn udp_hdr(src: u16, dst: u16, data: usize) -> Vec<u8> {
        let mut u = vec![0u8; 8 + data];
        u[0..2].copy_from_slice(&src.to_be_bytes());
        u[2..4].copy_from_slice(&dst.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + data) as u16).to_be_bytes());
        u
    }

    fn icmp_hdr(ty: u8) -> Vec<u8> {
        // type, code, checksum, identifier, sequence, 4 bytes of payload
        vec![ty, 0, 0, 0, 0x12, 0x34, 0, 1, 0xde, 0xad, 0xbe, 0xef]
    }

    fn tcp4(src: u16, dst: u16, flags: u8) -> Vec<u8> {
        v4(protocol::TCP, &tcp_hdr(src, dst, flags, 0))
    }

    fn tcp6(src: u16, dst: u16, flags: u8) -> Vec<u8> {
        v6(protocol::TCP, &tcp_hdr(src, dst, flags, 0))
    }

    fn udp4(src: u16, dst: u16) -> Vec<u8> {
        v4(protocol::UDP, &udp_hdr(src, dst, 4))
    }

    fn udp6(src: u16, dst: u16) -> Vec<u8> {
        v6(protocol::UDP, &udp_hdr(src, dst, 4))
    }

    /// An IPv6 extension header of `len` bytes (a multiple of 8) announcing `next`.
    fn ext_hdr(next: u8, len: usize) -> Vec<u8> {
        let mut h = vec![0u8; len];
        h[0] = next;
        h[1] = (len / 8 - 1) as u8;
        h
    }

    fn frag_hdr(next: u8, offset_units: u16, more: bool) -> Vec<u8> {
        let word = (offset_units << 3) | u16::from(more);
        let mut h = vec![next, 0, 0, 0, 0, 0, 0, 9];
        h[2..4].copy_from_slice(&word.to_be_bytes());
        h
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// We may open port 22 and 8000-8100 on the peer; the peer may open 8730 on us.
    fn ssh_web() -> PortFilter {
        PortFilter::from_ranges(&[(8100, 8000), (22, 22)], &[(8730, 8730)])
    }

    #[test]
    fn ranges_are_normalized() {
        let f = PortFilter::from_ranges(
            &[(90, 80), (10, 20), (15, 30), (31, 40), (100, 100), (99, 99)],
            &[],
        );
        assert_eq!(f.outbound(), &[(10, 40), (80, 90), (99, 100)]);
        assert_eq!(f.inbound(), &[] as &[(u16, u16)]);
        let f = PortFilter::from_ranges(&[(0, 100), (101, 65535)], &[(65535, 65535), (0, 0)]);
        assert_eq!(f.outbound(), &[ALL]);
        assert!(f.outbound.is_all());
        assert_eq!(f.inbound(), &[(0, 0), (65535, 65535)]);
        assert!(!f.inbound.is_all());
        assert_eq!(
            PortFilter::from_ranges(&[(5, 5), (5, 5)], &[]).outbound(),
            &[(5, 5)]
        );
        assert_eq!(
            PortFilter::from_ranges(&[(65535, 0)], &[]).outbound(),
            &[ALL]
        );
    }

    #[test]
    fn membership_at_range_edges() {
        let s = PortSet::new(&[(10, 20), (30, 30), (65535, 65535), (0, 0)]);
        for (p, want) in [
            (0, true),
            (1, false),
            (9, false),
            (10, true),
            (15, true),
            (20, true),
            (21, false),
            (29, false),
            (30, true),
            (31, false),
            (65534, false),
            (65535, true),
        ] {
            assert_eq!(s.contains(p), want, "port {p}");
        }
        let empty = PortSet::new(&[]);
        assert!(empty.is_empty() && !empty.contains(0) && !empty.contains(65535));
    }

    #[test]
    fn real_linux_syn_bytes() {
        // 10.0.0.1:45678 → 10.0.0.2:5201 with options (MSS, SACK-permitted, timestamps,
        // window scale), as Linux sends it.
        let syn = [
            0x45, 0x00, 0x00, 0x3c, 0x8a, 0x2f, 0x40, 0x00, 0x40, 0x06, 0x9c, 0x8a, 0x0a, 0x00,
            0x00, 0x01, 0x0a, 0x00, 0x00, 0x02, 0xb2, 0x6e, 0x14, 0x51, 0x5d, 0x3e, 0x7a, 0x01,
            0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00, 0x02, 0x04,
            0x05, 0x8c, 0x04, 0x02, 0x08, 0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x00, 0x00, 0x00, 0x00,
            0x01, 0x03, 0x03, 0x07,
        ];
        assert!(PortFilter::from_ranges(&[(5201, 5201)], &[]).allows_out(&syn));
        assert!(!PortFilter::from_ranges(&[(5202, 6000)], &[(45678, 45678)]).allows_out(&syn));
        assert!(PortFilter::from_ranges(&[], &[(5201, 5201)]).allows_in(&syn));
        assert!(!PortFilter::from_ranges(&[(5201, 5201)], &[]).allows_in(&syn));
    }

    #[test]
    fn tcp_outbound() {
        let f = ssh_web();
        for (mk, name) in [(tcp4 as fn(u16, u16, u8) -> Vec<u8>, "v4"), (tcp6, "v6")] {
            // Opening a connection: only to an outbound port.
            assert!(f.allows_out(&mk(40000, 22, tcp::SYN)), "{name}");
            assert!(f.allows_out(&mk(40000, 8050, tcp::SYN)), "{name}");
            assert!(!f.allows_out(&mk(40000, 23, tcp::SYN)), "{name}");
            // A SYN from our service port does not open anything on the peer.
            assert!(!f.allows_out(&mk(8730, 23, tcp::SYN)), "{name}");
            // Data of a connection we opened.
            assert!(f.allows_out(&mk(40000, 22, tcp::ACK | tcp::PSH)), "{name}");
            assert!(f.allows_out(&mk(40000, 22, tcp::FIN | tcp::ACK)), "{name}");
            // Our service's replies to the peer (SYN-ACK, data, reset).
            assert!(
                f.allows_out(&mk(8730, 50000, tcp::SYN | tcp::ACK)),
                "{name}"
            );
            assert!(f.allows_out(&mk(8730, 50000, tcp::ACK)), "{name}");
            assert!(f.allows_out(&mk(8730, 50000, tcp::RST)), "{name}");
            // Neither.
            assert!(!f.allows_out(&mk(8731, 50000, tcp::ACK)), "{name}");
            assert!(!f.allows_out(&mk(40000, 8101, tcp::ACK)), "{name}");
        }
    }

    #[test]
    fn tcp_inbound_is_the_mirror_image() {
        let f = ssh_web();
        for mk in [tcp4 as fn(u16, u16, u8) -> Vec<u8>, tcp6] {
            // The peer opens our 8730, not our 22.
            assert!(f.allows_in(&mk(50000, 8730, tcp::SYN)));
            assert!(!f.allows_in(&mk(50000, 22, tcp::SYN)));
            // A SYN "from" the peer's ssh port to another port of ours opens nothing.
            assert!(!f.allows_in(&mk(22, 9999, tcp::SYN)));
            // Replies from the peer's ssh and web service.
            assert!(f.allows_in(&mk(22, 40000, tcp::SYN | tcp::ACK)));
            assert!(f.allows_in(&mk(8000, 40000, tcp::ACK)));
            assert!(!f.allows_in(&mk(23, 40000, tcp::ACK)));
            // Data of the connection the peer opened to us.
            assert!(f.allows_in(&mk(50000, 8730, tcp::ACK)));
        }
    }

    #[test]
    fn udp_both_directions() {
        let f = ssh_web();
        for mk in [udp4 as fn(u16, u16) -> Vec<u8>, udp6] {
            assert!(f.allows_out(&mk(40000, 8080)));
            assert!(f.allows_out(&mk(8730, 40000)), "reply from our service");
            assert!(!f.allows_out(&mk(40000, 8730)));
            assert!(f.allows_in(&mk(40000, 8730)));
            assert!(
                f.allows_in(&mk(8080, 40000)),
                "reply from the peer's service"
            );
            assert!(!f.allows_in(&mk(40000, 8080)));
        }
        let none = PortFilter::from_ranges(&[], &[]);
        assert!(!none.allows_out(&udp4(1, 2)) && !none.allows_in(&udp6(1, 2)));
    }

    #[test]
    fn icmp_echo_needs_every_port() {
        let all_out = PortFilter::from_ranges(&[ALL], &[(8730, 8730)]);
        let ports = ssh_web();
        for (req, rep, ip) in [(8u8, 0u8, v4 as fn(u8, &[u8]) -> Vec<u8>), (128, 129, v6)] {
            let proto = if req == 8 { ICMP4 } else { ICMP6 };
            let request = ip(proto, &icmp_hdr(req));
            let reply = ip(proto, &icmp_hdr(rep));
            // We may ping the peer (outbound all); the peer may not ping us.
            assert!(all_out.allows_out(&request));
            assert!(all_out.allows_in(&reply));
            assert!(!all_out.allows_in(&request));
            assert!(!all_out.allows_out(&reply));
            // Port rules alone allow no ping either way.
            assert!(!ports.allows_out(&request) && !ports.allows_in(&request));
            assert!(!ports.allows_out(&reply) && !ports.allows_in(&reply));
            // The mirror image: the peer may ping us.
            let all_in = PortFilter::from_ranges(&[], &[ALL]);
            assert!(all_in.allows_in(&request) && all_in.allows_out(&reply));
            assert!(!all_in.allows_out(&request) && !all_in.allows_in(&reply));
        }
    }

    #[test]
    fn icmp_errors_pass_with_any_rule() {
        let ports = ssh_web();
        let in_only = PortFilter::from_ranges(&[], &[(8730, 8730)]);
        let none = PortFilter::from_ranges(&[], &[]);
        let errors = [
            v4(ICMP4, &icmp_hdr(3)),
            v4(ICMP4, &icmp_hdr(11)),
            v4(ICMP4, &icmp_hdr(12)),
            v6(ICMP6, &icmp_hdr(1)),
            v6(ICMP6, &icmp_hdr(2)), // packet too big: PMTU discovery
            v6(ICMP6, &icmp_hdr(3)),
            v6(ICMP6, &icmp_hdr(4)),
        ];
        for e in &errors {
            assert!(ports.allows_out(e) && ports.allows_in(e));
            assert!(in_only.allows_out(e) && in_only.allows_in(e));
            assert!(!none.allows_out(e) && !none.allows_in(e));
        }
    }

    #[test]
    fn other_icmp_types_need_every_port() {
        let ports = ssh_web();
        let all = PortFilter::from_ranges(&[ALL], &[ALL]);
        let others = [
            v4(ICMP4, &icmp_hdr(5)),   // redirect
            v4(ICMP4, &icmp_hdr(13)),  // timestamp
            v6(ICMP6, &icmp_hdr(133)), // router solicitation
            v6(ICMP6, &icmp_hdr(134)), // router advertisement
            v6(ICMP6, &icmp_hdr(135)), // neighbour solicitation
            v6(ICMP6, &icmp_hdr(143)), // MLDv2 report
            v4(ICMP6, &icmp_hdr(128)), // ICMPv6 inside IPv4 is just another protocol
            v6(ICMP4, &icmp_hdr(8)),   // and ICMPv4 inside IPv6
        ];
        for p in &others {
            assert!(!ports.allows_out(p) && !ports.allows_in(p));
            assert!(all.allows_out(p) && all.allows_in(p));
        }
        // A truncated ICMP header is malformed, whatever the rules.
        let short = v4(ICMP4, &[8, 0, 0, 0]);
        assert!(!all.allows_out(&short) && !all.allows_in(&short));
    }

    #[test]
    fn other_protocols_need_every_port_in_that_direction() {
        let gre4 = v4(47, &[0u8; 8]);
        let sctp6 = v6(132, &[0u8; 12]);
        let esp6 = v6(50, &[0u8; 16]);
        let out_all = PortFilter::from_ranges(&[ALL], &[(1, 65535)]);
        for p in [&gre4, &sctp6, &esp6] {
            assert!(out_all.allows_out(p));
            assert!(!out_all.allows_in(p), "inbound lacks port 0");
            assert!(!ssh_web().allows_out(p) && !ssh_web().allows_in(p));
        }
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        let f = ssh_web();
        let tcp = tcp_hdr(40000, 22, tcp::SYN, 0);
        let bad = tcp_hdr(40000, 23, tcp::SYN, 0);
        for (chain, name) in [
            (vec![ext_hdr(protocol::TCP, 8)], "dest-opts"),
            (
                vec![ext_hdr(60, 8), ext_hdr(protocol::TCP, 16)],
                "hbh+dest-opts",
            ),
            (vec![ext_hdr(protocol::TCP, 24)], "routing"),
            (vec![frag_hdr(protocol::TCP, 0, true)], "first fragment"),
            (
                vec![ext_hdr(51, 8), frag_hdr(protocol::TCP, 0, true)],
                "hbh+frag",
            ),
        ] {
            let first = match name {
                "dest-opts" => 60,
                "routing" => 43,
                "first fragment" => 44,
                _ => 0,
            };
            let mut parts: Vec<&[u8]> = chain.iter().map(|h| &h[..]).collect();
            parts.push(&tcp);
            let ok = v6(first, &cat(&parts));
            *parts.last_mut().unwrap() = &bad;
            let no = v6(first, &cat(&parts));
            assert!(f.allows_out(&ok), "{name}");
            assert!(!f.allows_out(&no), "{name}");
        }
        // Authentication header: length in 4-byte units minus 2 (12 bytes of ICV here).
        let mut ah = vec![protocol::UDP, 4, 0, 0];
        ah.extend_from_slice(&[0u8; 20]);
        let p = v6(51, &cat(&[&ah, &udp_hdr(40000, 8080, 0)]));
        assert!(f.allows_out(&p));
        let p = v6(51, &cat(&[&ah, &udp_hdr(40000, 9090, 0)]));
        assert!(!f.allows_out(&p));
    }

    #[test]
    fn fragments_without_ports_are_other() {
        let f = ssh_web();
        let all = PortFilter::from_ranges(&[ALL], &[ALL]);
        // IPv6 non-first fragment: its bytes are not a TCP header.
        let later = v6(44, &cat(&[&frag_hdr(protocol::TCP, 185, true), &[0u8; 64]]));
        assert!(!f.allows_out(&later) && !f.allows_in(&later));
        assert!(all.allows_out(&later) && all.allows_in(&later));
        // IPv4: first fragment by its ports, later ones as "other".
        let mut first = v4(protocol::UDP, &udp_hdr(40000, 8080, 32));
        first[6] = 0x20; // MF, offset 0
        assert!(f.allows_out(&first));
        let mut later = first.clone();
        later[6] = 0x20;
        later[7] = 5; // offset 40 bytes
        assert!(!f.allows_out(&later));
        assert!(all.allows_out(&later));
        // A first fragment too short to hold the whole TCP header is refused.
        let tiny = v4(protocol::TCP, &tcp_hdr(40000, 22, tcp::SYN, 0)[..8]);
        assert!(!f.allows_out(&tiny) && !all.allows_out(&tiny));
    }

    #[test]
    fn unwalkable_and_truncated_ipv6_chains() {
        let all = PortFilter::from_ranges(&[ALL], &[ALL]);
        let f = ssh_web();
        // More headers than the walk follows: other protocol.
        let mut chain = Vec::new();
        for _ in 0..ext::MAX_WALK {
            chain.extend(ext_hdr(60, 8));
        }
        chain.extend(tcp_hdr(40000, 22, tcp::SYN, 0));
        let long = v6(60, &chain);
        assert!(!f.allows_out(&long));
        assert!(all.allows_out(&long));
        // A header whose length runs past the packet: malformed.
        let mut cut = ext_hdr(protocol::TCP, 8);
        cut[1] = 3;
        let p = v6(60, &cat(&[&cut, &tcp_hdr(40000, 22, tcp::SYN, 0)]));
        assert!(!f.allows_out(&p) && !all.allows_out(&p));
        // No next header.
        let p = v6(59, &[]);
        assert!(!f.allows_out(&p) && all.allows_out(&p));
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let l4 = tcp_hdr(40000, 22, tcp::SYN, 0);
        let mut p = vec![0u8; 24 + l4.len()];
        p[..20].copy_from_slice(&v4(protocol::TCP, &l4)[..20]);
        p[0] = 0x46;
        p[2..4].copy_from_slice(&((24 + l4.len()) as u16).to_be_bytes());
        p[20] = 1; // NOP options
        p[21] = 1;
        p[22] = 1;
        p[23] = 0;
        p[24..].copy_from_slice(&l4);
        assert!(ssh_web().allows_out(&p));
        p[24 + 3] = 23;
        assert!(!ssh_web().allows_out(&p));
    }

    #[test]
    fn super_packet_first_segment_decides() {
        // A TSO super-packet: 40 KiB of payload behind one header set.
        let f = ssh_web();
        let big = v4(protocol::TCP, &tcp_hdr(40000, 8000, tcp::ACK, 40_000));
        assert!(f.allows_out(&big));
        let big6 = v6(protocol::UDP, &udp_hdr(8730, 40000, 60_000));
        assert!(f.allows_out(&big6));
        // USO: a UDP length field that does not match the packet does not matter.
        let mut uso = v4(protocol::UDP, &udp_hdr(40000, 8080, 3000));
        uso[24..26].copy_from_slice(&1452u16.to_be_bytes());
        assert!(f.allows_out(&uso));
    }

    #[test]
    fn truncated_and_garbage_are_refused() {
        let all = PortFilter::from_ranges(&[ALL], &[ALL]);
        let good = [
            tcp4(1, 2, tcp::SYN),
            tcp6(1, 2, tcp::SYN),
            udp4(1, 2),
            udp6(1, 2),
            v4(ICMP4, &icmp_hdr(8)),
            v6(ICMP6, &icmp_hdr(128)),
        ];
        for p in &good {
            assert!(all.allows_out(p) && all.allows_in(p));
            // Every shorter prefix either breaks the IP length or the L4 header.
            for n in 0..p.len() {
                assert!(!all.allows_out(&p[..n]), "prefix {n} of {p:?}");
                assert!(!all.allows_in(&p[..n]), "prefix {n} of {p:?}");
            }
        }
        for junk in [&[][..], &[0x45], &[0x00; 64], &[0xff; 64], &[0x50; 40]] {
            assert!(!all.allows_out(junk) && !all.allows_in(junk));
        }
        // IHL below 5 and a bad TCP data offset.
        let mut p = tcp4(1, 2, tcp::SYN);
        p[0] = 0x44;
        assert!(!all.allows_out(&p));
        let mut p = tcp4(1, 2, tcp::SYN);
        p[32] = 4 << 4;
        assert!(!all.allows_out(&p));
    }

    /// The rules of the module doc, written out naively over the unnormalized input.
    fn reference(
        out: &[(u16, u16)],
        inb: &[(u16, u16)],
        outbound_dir: bool,
        tcp: Option<u8>,
        src: u16,
        dst: u16,
    ) -> bool {
        let has =
            |rs: &[(u16, u16)], p: u16| rs.iter().any(|&(a, b)| a.min(b) <= p && p <= a.max(b));
        let (fwd, rev) = if outbound_dir { (out, inb) } else { (inb, out) };
        match tcp {
            Some(fl) if fl & tcp::SYN != 0 && fl & tcp::ACK == 0 => has(fwd, dst),
            _ => has(fwd, dst) || has(rev, src),
        }
    }

    fn ranges() -> impl Strategy<Value = Vec<(u16, u16)>> {
        // Small ports often, so random packets hit and miss the ranges.
        let port = prop_oneof![0u16..64, any::<u16>()];
        prop::collection::vec((port.clone(), port), 0..6)
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..200),
            version in prop_oneof![Just(0x45u8), Just(0x60), any::<u8>()],
            out in ranges(),
            inb in ranges(),
        ) {
            let f = PortFilter::from_ranges(&out, &inb);
            let _ = (f.allows_out(&bytes), f.allows_in(&bytes));
            // Also with a plausible version byte, so the walk gets past the IP header.
            let mut b = bytes;
            if let Some(first) = b.first_mut() {
                *first = version;
            }
            let _ = (f.allows_out(&b), f.allows_in(&b));
        }

        #[test]
        fn agrees_with_a_naive_reference(
            out in ranges(),
            inb in ranges(),
            v6 in any::<bool>(),
            is_tcp in any::<bool>(),
            flags in any::<u8>(),
            src in prop_oneof![0u16..64, any::<u16>()],
            dst in prop_oneof![0u16..64, any::<u16>()],
            data in 0usize..32,
            probe in any::<u16>(),
        ) {
            let f = PortFilter::from_ranges(&out, &inb);
            let (proto, l4) = if is_tcp {
                (protocol::TCP, tcp_hdr(src, dst, flags, data))
            } else {
                (protocol::UDP, udp_hdr(src, dst, data))
            };
            let pkt = if v6 { self::v6(proto, &l4) } else { v4(proto, &l4) };
            let fl = is_tcp.then_some(flags);
            prop_assert_eq!(f.allows_out(&pkt), reference(&out, &inb, true, fl, src, dst));
            prop_assert_eq!(f.allows_in(&pkt), reference(&out, &inb, false, fl, src, dst));
            // The normalized sets hold exactly the input's ports.
            let has = |rs: &[(u16, u16)], p: u16| rs.iter().any(|&(a, b)| a.min(b) <= p && p <= a.max(b));
            prop_assert_eq!(f.outbound.contains(probe), has(&out, probe));
            prop_assert_eq!(f.inbound.contains(probe), has(&inb, probe));
        }
    }
}
