//! The data-plane packet filter: the coordinator's per-peer port rules plus connection
//! tracking, checked on both ends of a tunnel.
//!
//! A [`PortFilter`] holds one peer's rules, as the coordinator's roster entry gives them
//! (`ports.outbound` / `ports.inbound`, see `tabbify_api::PortRules`), split by protocol:
//!
//! * `outbound` TCP and UDP ports ON THE PEER that we may open,
//! * `inbound` TCP and UDP ports ON US that the peer may open.
//!
//! A rule without a protocol (a bare port or range) covers both TCP and UDP. A direction
//! whose TCP *and* UDP sets both cover every port 0–65535 is "all traffic" (what the
//! coordinator sends for a rule without a port suffix): every packet passes that way.
//!
//! The sender checks a packet with [`PortFilter::check`]`(Dir::Out, …)` before encrypting
//! it, the receiver with `check(Dir::In, …)` after decrypting it (and after the
//! allowed-source check), each against its own flow table for the peer
//! ([`crate::core::conntrack`]), so a peer that does not filter, or filters with stale
//! rules, still cannot reach a port the receiver's own roster forbids. A peer without a
//! filter (a `wg-quick` style configuration, UAPI `wg set`) passes everything and is not
//! tracked.
//!
//! # Semantics (rules open flows; flows carry replies)
//!
//! For a packet going in direction `dir`, *fwd* is the rule set of that direction (the
//! ports on the receiver that the sender may open). A packet passes when
//!
//! | packet | passes when |
//! |---|---|
//! | TCP/UDP/echo packet of a tracked flow (either direction) | the flow's state accepts it (TCP flags, see conntrack) and the rules still allow the flow's opening (a revoked rule ends its flows) |
//! | TCP SYN without ACK, no flow | dst port ∈ *fwd* TCP; the flow is tracked from here |
//! | UDP datagram, no flow | dst port ∈ *fwd* UDP; tracked |
//! | ICMP/ICMPv6 echo request, no flow | *fwd* is all traffic; tracked (the identifier is the port) |
//! | any other TCP segment, an echo reply, no flow | *fwd* is all traffic (untracked), else dropped as invalid state |
//! | ICMP errors (v4: unreachable, time exceeded, parameter problem; v6: unreachable, packet too big, time exceeded, parameter problem) | the packet it quotes belongs to a tracked flow and the error goes to that packet's sender ("related"), or *fwd* is all traffic |
//! | any other ICMP type, other protocols, non-first fragments, an IPv6 header chain that does not reach the transport header | *fwd* is all traffic |
//! | malformed or truncated (no valid IP header, an L4 header cut short) | never |
//!
//! So a source port proves nothing: a UDP datagram or a non-SYN TCP segment *from* an
//! allowed service port passes only as part of a flow that was opened the allowed way.
//! Drops are told apart ([`Deny`]): not allowed by the rules, the flow table full, a
//! packet invalid for its flow's state, an ICMP error quoting no tracked flow, malformed.
//!
//! IPv6 hop-by-hop, routing, destination-options, fragment and authentication headers are
//! walked to find the transport header; ESP and unknown headers end the walk ("other
//! protocol"). Ports are read from the first fragment only, and only when it holds a whole
//! TCP (20+ bytes) or UDP (8 bytes) header, so a tiny first fragment cannot hide its ports.
//! For a TSO/USO super-packet the headers of the first segment decide for the whole
//! super-packet (all segments share ports; SYN is never segmented; a FIN is in the template
//! header when the super-packet ends with one).
//!
//! # Cost
//!
//! Port sets are normalized once at construction (sorted, disjoint, non-adjacent ranges); a
//! lookup is a binary search (one comparison for the usual single range). Checking a packet
//! reads only its headers, does one flow-table lookup (plus an insert for a new flow),
//! never allocates in steady state and never panics: the functions are total over any
//! bytes.

use crate::core::conntrack::{self, Dir, FlowKey, FlowTable, State};
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

/// Which transport protocols a port rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP only (`tcp:8730`).
    Tcp,
    /// UDP only (`udp:53`).
    Udp,
    /// Both (a bare port or range).
    Both,
}

/// `(protocol, first, last)` port rules, as [`PortFilter::from_rules`] takes them.
pub type ProtoRanges = Vec<(Proto, u16, u16)>;

/// Why [`PortFilter::check`] refused a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deny {
    /// Not a well-formed IP packet (or its transport header is cut short).
    Malformed,
    /// The rules do not let this packet open a flow (or no longer allow its flow).
    NotAllowed,
    /// The rules allow the new flow but the peer's flow table is full.
    CtFull,
    /// No flow, or the flow's state does not accept it (a non-SYN TCP segment without a
    /// connection, a SYN inside one, an echo reply nobody asked for).
    InvalidState,
    /// An ICMP error that quotes no tracked flow.
    IcmpUnrelated,
}

/// One peer's port rules, checked on every packet to and from that peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortFilter {
    out_tcp: PortSet,
    out_udp: PortSet,
    in_tcp: PortSet,
    in_udp: PortSet,
}

impl PortFilter {
    /// A filter from inclusive `(first, last)` port ranges covering TCP and UDP alike:
    /// `outbound` = ports on the peer that we may open, `inbound` = ports on us that the
    /// peer may open. Ranges may come in any order, overlap, touch or be reversed; they are
    /// normalized. An empty list allows nothing in that direction; `[(0, 65535)]` allows
    /// all traffic.
    pub fn from_ranges(outbound: &[(u16, u16)], inbound: &[(u16, u16)]) -> PortFilter {
        let o: Vec<_> = outbound.iter().map(|&(a, b)| (Proto::Both, a, b)).collect();
        let i: Vec<_> = inbound.iter().map(|&(a, b)| (Proto::Both, a, b)).collect();
        Self::from_rules(&o, &i)
    }

    /// A filter from `(protocol, first, last)` rules (see [`PortFilter::from_ranges`]).
    pub fn from_rules(outbound: &[(Proto, u16, u16)], inbound: &[(Proto, u16, u16)]) -> Self {
        let pick = |rules: &[(Proto, u16, u16)], p: Proto| {
            let v: Vec<(u16, u16)> = rules
                .iter()
                .filter(|r| r.0 == p || r.0 == Proto::Both)
                .map(|r| (r.1, r.2))
                .collect();
            PortSet::new(&v)
        };
        PortFilter {
            out_tcp: pick(outbound, Proto::Tcp),
            out_udp: pick(outbound, Proto::Udp),
            in_tcp: pick(inbound, Proto::Tcp),
            in_udp: pick(inbound, Proto::Udp),
        }
    }

    /// The normalized outbound ranges of one protocol (`Both`: ports open for both).
    pub fn outbound(&self, p: Proto) -> Vec<(u16, u16)> {
        select(&self.out_tcp, &self.out_udp, p)
    }

    /// The normalized inbound ranges of one protocol (`Both`: ports open for both).
    pub fn inbound(&self, p: Proto) -> Vec<(u16, u16)> {
        select(&self.in_tcp, &self.in_udp, p)
    }

    /// Whether every packet may go in direction `dir` (the rules cover every TCP and UDP
    /// port that way).
    #[inline]
    pub fn all_traffic(&self, dir: Dir) -> bool {
        let (t, u) = self.sets(dir);
        t.is_all() && u.is_all()
    }

    #[inline]
    fn sets(&self, dir: Dir) -> (&PortSet, &PortSet) {
        match dir {
            Dir::Out => (&self.out_tcp, &self.out_udp),
            Dir::In => (&self.in_tcp, &self.in_udp),
        }
    }

    /// Would the rules let this packet we send *open* a flow (or pass untracked)? The
    /// stateless half of [`PortFilter::check`]: replies are not considered. False for
    /// anything that is not a well-formed packet.
    #[inline]
    pub fn allows_out(&self, pkt: &[u8]) -> bool {
        self.opens(Dir::Out, pkt)
    }

    /// [`PortFilter::allows_out`] for a decrypted packet from the peer.
    #[inline]
    pub fn allows_in(&self, pkt: &[u8]) -> bool {
        self.opens(Dir::In, pkt)
    }

    fn opens(&self, dir: Dir, pkt: &[u8]) -> bool {
        let Some(p) = dissect(pkt) else {
            return false;
        };
        let (tcp_set, udp_set) = self.sets(dir);
        match p.l4 {
            L4::Tcp { dport, flags, .. } if is_syn(flags) => tcp_set.contains(dport),
            L4::Udp { dport, .. } => udp_set.contains(dport),
            _ => self.all_traffic(dir),
        }
    }

    /// The filter's verdict on one packet going `dir`, with the peer's flow table: passes
    /// it (opening or advancing its flow) or says why not. See the module documentation.
    #[inline]
    pub fn check(&self, dir: Dir, pkt: &[u8], flows: &mut FlowTable, now: u32) -> Result<(), Deny> {
        let p = dissect(pkt).ok_or(Deny::Malformed)?;
        let all = self.all_traffic(dir);
        let (key, flags, opens) = match p.l4 {
            L4::Other => return if all { Ok(()) } else { Err(Deny::NotAllowed) },
            L4::Error(q) => {
                let related = q.is_some_and(|q| {
                    q.v4 == p.v4 && q.src == p.dst && flows.lookup(&q.key(dir.rev()), now).is_some()
                });
                return if related || all {
                    Ok(())
                } else {
                    Err(Deny::IcmpUnrelated)
                };
            }
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let opens = is_syn(flags).then(|| self.sets(dir).0.contains(dport));
                (p.key(dir, protocol::TCP, sport, dport, 0), flags, opens)
            }
            L4::Udp { sport, dport } => {
                let opens = Some(self.sets(dir).1.contains(dport));
                (p.key(dir, protocol::UDP, sport, dport, 0), 0, opens)
            }
            L4::Echo { request, id } => {
                let by_remote = (dir == Dir::In) == request;
                let flag = if by_remote {
                    conntrack::KEY_ECHO_BY_REMOTE
                } else {
                    0
                };
                let proto = if p.v4 {
                    protocol::ICMP
                } else {
                    protocol::ICMPV6
                };
                (p.key(dir, proto, id, id, flag), 0, request.then_some(all))
            }
        };
        if let Some(r) = flows.lookup(&key, now) {
            let still = flows.get(r).is_some_and(|f| self.still_allows(f));
            if !still {
                flows.remove(r);
                return Err(Deny::NotAllowed);
            }
            return match flows.step(r, dir, flags, now) {
                Ok(()) => Ok(()),
                Err(_) if all => Ok(()),
                Err(_) => Err(Deny::InvalidState),
            };
        }
        match opens {
            Some(true) => {
                let state = match key.proto {
                    protocol::TCP => State::SynSent,
                    protocol::UDP => State::UdpNew,
                    _ => State::Echo,
                };
                flows
                    .insert(key, dir, state, now)
                    .map(|_| ())
                    .map_err(|_| Deny::CtFull)
            }
            Some(false) => Err(Deny::NotAllowed),
            None if all => Ok(()),
            None => Err(Deny::InvalidState),
        }
    }

    /// Do the rules still let the flow's opening packet through (its protocol and the
    /// port it opened)? Rules change with the roster; a revoked rule ends its flows.
    #[inline]
    fn still_allows(&self, f: &conntrack::Flow) -> bool {
        let (t, u) = self.sets(f.opened);
        let port = match f.opened {
            Dir::Out => f.key.remote_port,
            Dir::In => f.key.local_port,
        };
        match f.key.proto {
            protocol::TCP => t.contains(port),
            protocol::UDP => u.contains(port),
            _ => t.is_all() && u.is_all(),
        }
    }
}

fn select(t: &PortSet, u: &PortSet, p: Proto) -> Vec<(u16, u16)> {
    match p {
        Proto::Tcp => t.ranges.to_vec(),
        Proto::Udp => u.ranges.to_vec(),
        Proto::Both => {
            // The intersection of two normalized lists.
            let mut out = Vec::new();
            for &(a, b) in t.ranges.iter() {
                for &(c, d) in u.ranges.iter() {
                    let (lo, hi) = (a.max(c), b.min(d));
                    if lo <= hi {
                        out.push((lo, hi));
                    }
                }
            }
            out
        }
    }
}

#[inline]
fn is_syn(flags: u8) -> bool {
    flags & tcp::SYN != 0 && flags & tcp::ACK == 0
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

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// What the filter sees of a packet: addresses (IPv4 mapped into 16 bytes) and transport.
#[derive(Clone, Copy, Debug)]
struct Dissected {
    v4: bool,
    src: [u8; 16],
    dst: [u8; 16],
    l4: L4,
}

#[derive(Clone, Copy, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP or ICMPv6 echo request or reply.
    Echo {
        request: bool,
        id: u16,
    },
    /// An ICMP error and the packet it quotes (`None`: a quote we cannot read, which
    /// relates to no flow).
    Error(Option<Quoted>),
    /// Anything without ports: other protocols and ICMP types, non-first fragments.
    Other,
}

/// The header of the packet an ICMP error quotes (a packet that went the other way).
#[derive(Clone, Copy, Debug)]
struct Quoted {
    v4: bool,
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    /// Ports, or the echo identifier twice.
    sport: u16,
    dport: u16,
    /// For a quoted echo: whether it was a request.
    echo_request: bool,
}

impl Quoted {
    /// The key of the flow the quoted packet belongs to; it went `qdir`.
    fn key(&self, qdir: Dir) -> FlowKey {
        let mut flags = if self.v4 { conntrack::KEY_V4 } else { 0 };
        if matches!(self.proto, protocol::ICMP | protocol::ICMPV6)
            && (qdir == Dir::In) == self.echo_request
        {
            flags |= conntrack::KEY_ECHO_BY_REMOTE;
        }
        make_key(
            qdir, self.src, self.dst, self.proto, self.sport, self.dport, flags,
        )
    }
}

impl Dissected {
    #[inline]
    fn key(&self, dir: Dir, proto: u8, sport: u16, dport: u16, flags: u8) -> FlowKey {
        let v4 = if self.v4 { conntrack::KEY_V4 } else { 0 };
        make_key(dir, self.src, self.dst, proto, sport, dport, flags | v4)
    }
}

#[inline]
fn make_key(
    dir: Dir,
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
) -> FlowKey {
    match dir {
        Dir::Out => FlowKey {
            local: src,
            remote: dst,
            local_port: sport,
            remote_port: dport,
            proto,
            flags,
        },
        Dir::In => FlowKey {
            local: dst,
            remote: src,
            local_port: dport,
            remote_port: sport,
            proto,
            flags,
        },
    }
}

#[inline]
fn mapped(a: [u8; 4]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12..].copy_from_slice(&a);
    m
}

/// Reads the IP header (and IPv6 extension headers) down to the transport header. `None`
/// when the packet is malformed.
#[inline]
fn dissect(pkt: &[u8]) -> Option<Dissected> {
    match IpPacket::new_checked(pkt).ok()? {
        IpPacket::V4(ip) => {
            let (src, dst) = (mapped(ip.src().octets()), mapped(ip.dst().octets()));
            let l4 = if ip.frag_offset() != 0 {
                L4::Other
            } else {
                transport(ip.protocol(), ip.payload(), false)?
            };
            Some(Dissected {
                v4: true,
                src,
                dst,
                l4,
            })
        }
        IpPacket::V6(ip) => {
            let (src, dst) = (ip.src().octets(), ip.dst().octets());
            let l4 = match walk_v6(ip.next_header(), ip.payload())? {
                Some((next, rest)) => transport(next, rest, true)?,
                None => L4::Other,
            };
            Some(Dissected {
                v4: false,
                src,
                dst,
                l4,
            })
        }
    }
}

/// Walks IPv6 extension headers from `next` over `rest`: `Some(Some((proto, l4)))` at a
/// transport (or unknown) header, `Some(None)` for "other" (a non-first fragment, a chain
/// too long), `None` when a header runs past the packet.
#[inline]
fn walk_v6(mut next: u8, mut rest: &[u8]) -> Option<Option<(u8, &[u8])>> {
    for _ in 0..ext::MAX_WALK {
        let len = match next {
            ext::HOP_BY_HOP | ext::ROUTING | ext::DEST_OPTS => (usize::from(*rest.get(1)?) + 1) * 8,
            ext::AUTH => (usize::from(*rest.get(1)?) + 2) * 4,
            ext::FRAGMENT => {
                let off = u16::from_be_bytes([*rest.get(2)?, *rest.get(3)?]) >> 3;
                if off != 0 {
                    return Some(None);
                }
                8
            }
            _ => return Some(Some((next, rest))),
        };
        next = *rest.first()?;
        rest = rest.get(len..)?;
    }
    Some(None)
}

/// Classifies a transport header (`l4` starts at it) of protocol `proto`.
#[inline]
fn transport(proto: u8, l4: &[u8], v6: bool) -> Option<L4> {
    match proto {
        protocol::TCP => {
            let t = TcpPacket::new_checked(l4).ok()?;
            Some(L4::Tcp {
                sport: t.src_port(),
                dport: t.dst_port(),
                flags: t.flags(),
            })
        }
        // Only the ports: a USO super-packet's length field spans every segment.
        protocol::UDP => match l4 {
            [s0, s1, d0, d1, _, _, _, _, ..] => Some(L4::Udp {
                sport: u16::from_be_bytes([*s0, *s1]),
                dport: u16::from_be_bytes([*d0, *d1]),
            }),
            _ => None,
        },
        protocol::ICMP if !v6 => icmp_class(l4, false),
        protocol::ICMPV6 if v6 => icmp_class(l4, true),
        _ => Some(L4::Other),
    }
}

#[inline]
fn icmp_class(l4: &[u8], v6: bool) -> Option<L4> {
    if l4.len() < icmp::HEADER_LEN {
        return None;
    }
    let ty = *l4.first()?;
    let id = u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]);
    Some(match (v6, ty) {
        (false, icmp::V4_ECHO_REQUEST) | (true, icmp::V6_ECHO_REQUEST) => {
            L4::Echo { request: true, id }
        }
        (false, icmp::V4_ECHO_REPLY) | (true, icmp::V6_ECHO_REPLY) => {
            L4::Echo { request: false, id }
        }
        (false, icmp::V4_UNREACHABLE | icmp::V4_TIME_EXCEEDED | icmp::V4_PARAMETER_PROBLEM)
        | (
            true,
            icmp::V6_UNREACHABLE
            | icmp::V6_PACKET_TOO_BIG
            | icmp::V6_TIME_EXCEEDED
            | icmp::V6_PARAMETER_PROBLEM,
        ) => L4::Error(quoted(l4.get(icmp::HEADER_LEN..)?, v6)),
        _ => L4::Other,
    })
}

/// Parses the quoted packet of an ICMP error: an IP header of the error's own version, as
/// much of the transport header as RFC 792 guarantees (8 bytes). Lenient about lengths
/// (the quote is truncated by design), strict about what it reads.
fn quoted(b: &[u8], v6: bool) -> Option<Quoted> {
    let (v4, src, dst, proto, l4) = if !v6 {
        let first = *b.first()?;
        let ihl = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || ihl < 20 {
            return None;
        }
        let frag = u16::from_be_bytes([*b.get(6)?, *b.get(7)?]) & 0x1fff;
        if frag != 0 {
            return None;
        }
        let s: [u8; 4] = b.get(12..16)?.try_into().ok()?;
        let d: [u8; 4] = b.get(16..20)?.try_into().ok()?;
        (true, mapped(s), mapped(d), *b.get(9)?, b.get(ihl..)?)
    } else {
        if *b.first()? >> 4 != 6 {
            return None;
        }
        let s: [u8; 16] = b.get(8..24)?.try_into().ok()?;
        let d: [u8; 16] = b.get(24..40)?.try_into().ok()?;
        let (next, rest) = walk_v6(*b.get(6)?, b.get(40..)?)??;
        (false, s, d, next, rest)
    };
    let l4: &[u8; 8] = l4.get(..8)?.try_into().ok()?;
    let w0 = u16::from_be_bytes([l4[0], l4[1]]);
    let w1 = u16::from_be_bytes([l4[2], l4[3]]);
    let id = u16::from_be_bytes([l4[4], l4[5]]);
    let (sport, dport, echo_request) = match (proto, v6, l4[0]) {
        (protocol::TCP | protocol::UDP, _, _) => (w0, w1, false),
        (protocol::ICMP, false, icmp::V4_ECHO_REQUEST)
        | (protocol::ICMPV6, true, icmp::V6_ECHO_REQUEST) => (id, id, true),
        (protocol::ICMP, false, icmp::V4_ECHO_REPLY)
        | (protocol::ICMPV6, true, icmp::V6_ECHO_REPLY) => (id, id, false),
        _ => return None,
    };
    Some(Quoted {
        v4,
        src,
        dst,
        proto,
        sport,
        dport,
        echo_request,
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

    fn check(f: &PortFilter, t: &mut FlowTable, dir: Dir, p: &[u8]) -> Result<(), Deny> {
        f.check(dir, p, t, 0)
    }

    fn table() -> FlowTable {
        FlowTable::new(64, 42)
    }

    /// A 5-tuple packet builder for either IP version, from our side's point of view.
    struct Mk {
        v6: bool,
    }

    impl Mk {
        fn tcp(&self, s: u16, d: u16, fl: u8) -> Vec<u8> {
            if self.v6 {
                tcp6(s, d, fl)
            } else {
                tcp4(s, d, fl)
            }
        }
        fn udp(&self, s: u16, d: u16) -> Vec<u8> {
            if self.v6 {
                udp6(s, d)
            } else {
                udp4(s, d)
            }
        }
        /// The same segment seen coming back: addresses swapped.
        fn back(&self, mut p: Vec<u8>) -> Vec<u8> {
            if self.v6 {
                let (a, b) = (p[8..24].to_vec(), p[24..40].to_vec());
                p[8..24].copy_from_slice(&b);
                p[24..40].copy_from_slice(&a);
            } else {
                let (a, b) = (p[12..16].to_vec(), p[16..20].to_vec());
                p[12..16].copy_from_slice(&b);
                p[16..20].copy_from_slice(&a);
                // The header checksum is symmetric in the two addresses.
            }
            p
        }
        fn icmp(&self, ty4: u8, ty6: u8, id: u16) -> Vec<u8> {
            let mut h = icmp_hdr(if self.v6 { ty6 } else { ty4 });
            h[4..6].copy_from_slice(&id.to_be_bytes());
            if self.v6 {
                v6(ICMP6, &h)
            } else {
                v4(ICMP4, &h)
            }
        }
        /// An ICMP port-unreachable (v4 type 3, v6 type 1) quoting `inner`, addressed to
        /// the quoted packet's source.
        fn unreachable(&self, inner: &[u8]) -> Vec<u8> {
            let mut h = icmp_hdr(if self.v6 { 1 } else { 3 });
            h.truncate(8);
            let quote = &inner[..inner.len().min(if self.v6 { 48 } else { 28 })];
            h.extend_from_slice(quote);
            // The error goes back to the quoted packet's sender.
            let mut e = if self.v6 {
                v6(ICMP6, &h)
            } else {
                v4(ICMP4, &h)
            };
            let (s, d, n) = if self.v6 { (8, 24, 16) } else { (12, 16, 4) };
            e[s..s + n].copy_from_slice(&inner[d..d + n]);
            e[d..d + n].copy_from_slice(&inner[s..s + n]);
            e
        }
    }

    const BOTH: [Mk; 2] = [Mk { v6: false }, Mk { v6: true }];

    #[test]
    fn ranges_are_normalized_per_protocol() {
        let f = PortFilter::from_ranges(
            &[(90, 80), (10, 20), (15, 30), (31, 40), (100, 100), (99, 99)],
            &[],
        );
        assert_eq!(f.outbound(Proto::Tcp), vec![(10, 40), (80, 90), (99, 100)]);
        assert_eq!(f.outbound(Proto::Udp), f.outbound(Proto::Tcp));
        assert_eq!(f.outbound(Proto::Both), f.outbound(Proto::Tcp));
        assert!(f.inbound(Proto::Both).is_empty());
        let f = PortFilter::from_ranges(&[(0, 100), (101, 65535)], &[(65535, 65535), (0, 0)]);
        assert!(f.all_traffic(Dir::Out) && !f.all_traffic(Dir::In));
        assert_eq!(f.inbound(Proto::Udp), vec![(0, 0), (65535, 65535)]);
        let f = PortFilter::from_rules(
            &[
                (Proto::Tcp, 22, 22),
                (Proto::Udp, 53, 53),
                (Proto::Both, 80, 90),
            ],
            &[(Proto::Tcp, 0, 65535)],
        );
        assert_eq!(f.outbound(Proto::Tcp), vec![(22, 22), (80, 90)]);
        assert_eq!(f.outbound(Proto::Udp), vec![(53, 53), (80, 90)]);
        assert_eq!(f.outbound(Proto::Both), vec![(80, 90)]);
        // Every TCP port but no UDP port is not "all traffic".
        assert!(!f.all_traffic(Dir::In));
        let all = PortFilter::from_rules(&[(Proto::Tcp, 0, 65535), (Proto::Udp, 0, 65535)], &[]);
        assert!(all.all_traffic(Dir::Out));
    }

    #[test]
    fn protocol_rules_keep_tcp_and_udp_apart() {
        let f = PortFilter::from_rules(&[(Proto::Tcp, 8730, 8730), (Proto::Udp, 53, 53)], &[]);
        for m in &BOTH {
            let mut t = table();
            assert_eq!(
                check(&f, &mut t, Dir::Out, &m.tcp(40000, 8730, tcp::SYN)),
                Ok(())
            );
            assert_eq!(
                check(&f, &mut t, Dir::Out, &m.udp(40000, 8730)),
                Err(Deny::NotAllowed)
            );
            assert_eq!(check(&f, &mut t, Dir::Out, &m.udp(40000, 53)), Ok(()));
            assert_eq!(
                check(&f, &mut t, Dir::Out, &m.tcp(40001, 53, tcp::SYN)),
                Err(Deny::NotAllowed)
            );
        }
    }

    /// The demo policy: we (node) may open the peer's (supervisor's) 8730, nothing back.
    fn node_to_sup() -> PortFilter {
        PortFilter::from_ranges(&[(8730, 8730)], &[])
    }

    #[test]
    fn tcp_connection_both_ways_then_closed() {
        let f = node_to_sup();
        for m in &BOTH {
            let mut t = table();
            let out = |fl| m.tcp(40000, 8730, fl);
            let back = |fl| m.back(m.tcp(8730, 40000, fl));
            // The peer cannot answer before we open.
            assert_eq!(
                check(&f, &mut t, Dir::In, &back(tcp::SYN | tcp::ACK)),
                Err(Deny::InvalidState)
            );
            assert_eq!(check(&f, &mut t, Dir::Out, &out(tcp::SYN)), Ok(()));
            assert_eq!(
                check(&f, &mut t, Dir::In, &back(tcp::SYN | tcp::ACK)),
                Ok(())
            );
            assert_eq!(check(&f, &mut t, Dir::Out, &out(tcp::ACK)), Ok(()));
            assert_eq!(
                check(&f, &mut t, Dir::In, &back(tcp::ACK | tcp::PSH)),
                Ok(())
            );
            assert_eq!(
                check(&f, &mut t, Dir::Out, &out(tcp::FIN | tcp::ACK)),
                Ok(())
            );
            assert_eq!(
                check(&f, &mut t, Dir::In, &back(tcp::FIN | tcp::ACK)),
                Ok(())
            );
            assert_eq!(check(&f, &mut t, Dir::Out, &out(tcp::ACK)), Ok(()));
            // The peer may not open anything on us, nor SYN into our connection.
            assert_eq!(
                check(&f, &mut t, Dir::In, &back(tcp::SYN)),
                Err(Deny::InvalidState)
            );
            // The other end's SYN from the connection's own ports is not a reopen.
            let mut t = table();
            check(&f, &mut t, Dir::Out, &out(tcp::SYN)).unwrap();
            check(&f, &mut t, Dir::In, &back(tcp::SYN | tcp::ACK)).unwrap();
            check(&f, &mut t, Dir::Out, &out(tcp::ACK)).unwrap();
            assert_eq!(
                check(&f, &mut t, Dir::Out, &out(tcp::SYN)),
                Err(Deny::InvalidState)
            );
        }
    }

    #[test]
    fn source_port_tricks_are_dropped() {
        // The peer may open our 8730 (we are the supervisor).
        let f = PortFilter::from_ranges(&[], &[(8730, 8730)]);
        for m in &BOTH {
            let mut t = table();
            // UDP from the peer's port 8730 to any port of ours: not a reply to anything.
            assert_eq!(
                check(&f, &mut t, Dir::In, &m.udp(8730, 5353)),
                Err(Deny::NotAllowed)
            );
            // Non-SYN TCP from port 8730 (ACK or RST injection) opens nothing.
            for fl in [
                tcp::ACK,
                tcp::RST,
                tcp::ACK | tcp::PSH,
                tcp::FIN | tcp::ACK,
                0,
            ] {
                assert_eq!(
                    check(&f, &mut t, Dir::In, &m.tcp(8730, 22, fl)),
                    Err(Deny::InvalidState),
                    "flags {fl:#x}"
                );
            }
            // Nor does our own stack's datagram from 8730 reach an arbitrary peer port.
            assert_eq!(
                check(&f, &mut t, Dir::Out, &m.udp(8730, 5353)),
                Err(Deny::NotAllowed)
            );
            assert!(t.is_empty(), "nothing was tracked");
        }
    }

    #[test]
    fn udp_replies_pass_only_for_the_exact_flow() {
        let f = PortFilter::from_ranges(&[(53, 53)], &[]);
        for m in &BOTH {
            let mut t = table();
            assert_eq!(check(&f, &mut t, Dir::Out, &m.udp(40000, 53)), Ok(()));
            assert_eq!(
                check(&f, &mut t, Dir::In, &m.back(m.udp(53, 40000))),
                Ok(())
            );
            // Another port of ours, or from another port of theirs: no flow.
            assert_eq!(
                check(&f, &mut t, Dir::In, &m.back(m.udp(53, 40001))),
                Err(Deny::NotAllowed)
            );
            assert_eq!(
                check(&f, &mut t, Dir::In, &m.back(m.udp(54, 40000))),
                Err(Deny::NotAllowed)
            );
            // Expired after 120 s of silence once answered.
            assert_eq!(
                f.check(Dir::In, &m.back(m.udp(53, 40000)), &mut t, 119),
                Ok(())
            );
            assert_eq!(
                f.check(Dir::In, &m.back(m.udp(53, 40000)), &mut t, 119 + 120),
                Err(Deny::NotAllowed)
            );
        }
    }

    #[test]
    fn icmp_echo_is_tracked_by_identifier() {
        let out_all = PortFilter::from_ranges(&[ALL], &[(8730, 8730)]);
        for m in &BOTH {
            let mut t = table();
            let req = m.icmp(8, 128, 7);
            let rep = m.back(m.icmp(0, 129, 7));
            // An unsolicited reply and the peer's request: refused.
            assert_eq!(
                check(&out_all, &mut t, Dir::In, &rep),
                Err(Deny::InvalidState)
            );
            assert_eq!(
                check(&out_all, &mut t, Dir::In, &m.back(m.icmp(8, 128, 7))),
                Err(Deny::NotAllowed)
            );
            assert_eq!(check(&out_all, &mut t, Dir::Out, &req), Ok(()));
            assert_eq!(check(&out_all, &mut t, Dir::In, &rep), Ok(()));
            // Another identifier, or a request from the peer with ours: no flow.
            assert_eq!(
                check(&out_all, &mut t, Dir::In, &m.back(m.icmp(0, 129, 8))),
                Err(Deny::InvalidState)
            );
            assert_eq!(
                check(&out_all, &mut t, Dir::In, &m.back(m.icmp(8, 128, 7))),
                Err(Deny::NotAllowed)
            );
            // Port rules alone allow no ping.
            let mut t = table();
            assert_eq!(
                check(&node_to_sup(), &mut t, Dir::Out, &req),
                Err(Deny::NotAllowed)
            );
        }
    }

    #[test]
    fn icmp_errors_must_quote_a_tracked_flow() {
        let f = node_to_sup();
        for m in &BOTH {
            let mut t = table();
            let syn = m.tcp(40000, 8730, tcp::SYN);
            let udp = m.udp(40000, 8730);
            // Before anything was sent: unrelated.
            assert_eq!(
                check(&f, &mut t, Dir::In, &m.unreachable(&udp)),
                Err(Deny::IcmpUnrelated)
            );
            check(&f, &mut t, Dir::Out, &udp).unwrap();
            check(&f, &mut t, Dir::Out, &syn).unwrap();
            assert_eq!(check(&f, &mut t, Dir::In, &m.unreachable(&udp)), Ok(()));
            assert_eq!(check(&f, &mut t, Dir::In, &m.unreachable(&syn)), Ok(()));
            // Quoting another port, or a packet the peer sent (it goes the wrong way).
            assert_eq!(
                check(&f, &mut t, Dir::In, &m.unreachable(&m.udp(40000, 8731))),
                Err(Deny::IcmpUnrelated)
            );
            assert_eq!(
                check(
                    &f,
                    &mut t,
                    Dir::In,
                    &m.unreachable(&m.back(m.udp(8730, 40000)))
                ),
                Err(Deny::IcmpUnrelated)
            );
            // Our own stack's error about a packet of a tracked flow goes out.
            let reply = m.back(m.udp(8730, 40000));
            check(&f, &mut t, Dir::In, &reply).unwrap();
            assert_eq!(check(&f, &mut t, Dir::Out, &m.unreachable(&reply)), Ok(()));
            // A quote cut short, or of another IP version, is unrelated.
            let mut short = m.unreachable(&udp);
            let n = short.len() - 5;
            short.truncate(n);
            if m.v6 {
                short[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
            } else {
                short[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            }
            assert_eq!(check(&f, &mut t, Dir::In, &short), Err(Deny::IcmpUnrelated));
        }
        // Error addressed to someone other than the quoted packet's sender.
        let m = &BOTH[0];
        let mut t = table();
        let udp = m.udp(40000, 8730);
        check(&f, &mut t, Dir::Out, &udp).unwrap();
        let mut e = m.unreachable(&udp);
        e[19] ^= 1; // outer destination
        assert_eq!(check(&f, &mut t, Dir::In, &e), Err(Deny::IcmpUnrelated));
    }

    #[test]
    fn revoking_a_rule_ends_its_flows() {
        let mut t = table();
        let m = &BOTH[1];
        let old = node_to_sup();
        check(&old, &mut t, Dir::Out, &m.udp(40000, 8730)).unwrap();
        let new = PortFilter::from_ranges(&[(22, 22)], &[]);
        assert_eq!(
            check(&new, &mut t, Dir::In, &m.back(m.udp(8730, 40000))),
            Err(Deny::NotAllowed)
        );
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_flows_only() {
        let f = PortFilter::from_ranges(&[(0, 65535)], &[]);
        let mut t = FlowTable::new(4, 9);
        let m = &BOTH[0];
        for p in 0..4 {
            check(&f, &mut t, Dir::Out, &m.udp(40000 + p, 53)).unwrap();
        }
        assert_eq!(
            check(&f, &mut t, Dir::Out, &m.udp(50000, 53)),
            Err(Deny::CtFull)
        );
        // Existing flows keep working.
        assert_eq!(
            check(&f, &mut t, Dir::In, &m.back(m.udp(53, 40001))),
            Ok(())
        );
        // Untracked traffic of an all-traffic direction still passes.
        assert_eq!(check(&f, &mut t, Dir::Out, &v4(47, &[0u8; 8])), Ok(()));
    }

    #[test]
    fn all_traffic_passes_everything_that_way() {
        let f = PortFilter::from_ranges(&[ALL], &[]);
        let mut t = table();
        for m in &BOTH {
            for p in [
                m.tcp(1, 2, tcp::ACK),
                m.tcp(1, 2, tcp::RST),
                m.udp(1, 2),
                m.icmp(0, 129, 1),
                m.unreachable(&m.udp(9, 9)),
            ] {
                assert_eq!(check(&f, &mut t, Dir::Out, &p), Ok(()));
            }
        }
        // Malformed is malformed whatever the rules.
        assert_eq!(
            check(&f, &mut t, Dir::Out, &[0x45, 0]),
            Err(Deny::Malformed)
        );
    }

    #[test]
    fn super_packet_first_segment_decides() {
        // A TSO super-packet: 40 KiB of payload behind one header set.
        let f = PortFilter::from_ranges(&[(8000, 8100)], &[]);
        let mut t = table();
        check(&f, &mut t, Dir::Out, &tcp4(40000, 8000, tcp::SYN)).unwrap();
        let mut synack = tcp4(8000, 40000, tcp::SYN | tcp::ACK);
        synack = BOTH[0].back(synack);
        check(&f, &mut t, Dir::In, &synack).unwrap();
        let big = v4(protocol::TCP, &tcp_hdr(40000, 8000, tcp::ACK, 40_000));
        assert_eq!(check(&f, &mut t, Dir::Out, &big), Ok(()));
        // USO: a UDP length field that does not match the packet does not matter.
        let mut uso = v4(protocol::UDP, &udp_hdr(40000, 8080, 3000));
        uso[24..26].copy_from_slice(&1452u16.to_be_bytes());
        assert!(f.allows_out(&uso));
        assert_eq!(check(&f, &mut t, Dir::Out, &uso), Ok(()));
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

    /// The rules for opening a flow, written out naively over the unnormalized input.
    fn reference(
        out: &[(u16, u16)],
        inb: &[(u16, u16)],
        outbound_dir: bool,
        tcp: Option<u8>,
        dst: u16,
    ) -> bool {
        let has =
            |rs: &[(u16, u16)], p: u16| rs.iter().any(|&(a, b)| a.min(b) <= p && p <= a.max(b));
        let fwd = if outbound_dir { out } else { inb };
        let all = (0..=u16::MAX).all(|p| has(fwd, p));
        match tcp {
            Some(fl) if fl & tcp::SYN != 0 && fl & tcp::ACK == 0 => has(fwd, dst),
            Some(_) => all,
            None => has(fwd, dst),
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
            let mut t = FlowTable::new(8, 1);
            let _ = (f.allows_out(&bytes), f.allows_in(&bytes));
            let _ = (f.check(Dir::Out, &bytes, &mut t, 0), f.check(Dir::In, &bytes, &mut t, 0));
            // Also with a plausible version byte, so the walk gets past the IP header.
            let mut b = bytes;
            if let Some(first) = b.first_mut() {
                *first = version;
            }
            let _ = (f.allows_out(&b), f.allows_in(&b));
            let _ = (f.check(Dir::Out, &b, &mut t, 0), f.check(Dir::In, &b, &mut t, 0));
        }

        #[test]
        fn opening_agrees_with_a_naive_reference(
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
            prop_assert_eq!(f.allows_out(&pkt), reference(&out, &inb, true, fl, dst));
            prop_assert_eq!(f.allows_in(&pkt), reference(&out, &inb, false, fl, dst));
            // With an empty table, check passes exactly what may open (or pass untracked).
            let mut t = FlowTable::new(8, 1);
            prop_assert_eq!(f.check(Dir::Out, &pkt, &mut t, 0).is_ok(), f.allows_out(&pkt));
            // The normalized sets hold exactly the input's ports.
            let has = |rs: &[(u16, u16)], p: u16| rs.iter().any(|&(a, b)| a.min(b) <= p && p <= a.max(b));
            prop_assert_eq!(f.out_tcp.contains(probe), has(&out, probe));
            prop_assert_eq!(f.in_udp.contains(probe), has(&inb, probe));
        }
    }
}
