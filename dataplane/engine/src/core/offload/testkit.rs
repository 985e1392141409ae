//! Test super-packets for unit tests, integration tests, fuzz targets and benches: one
//! builder instead of a copy per test file. Compiled for this crate's unit tests and, for
//! everyone else, behind the cargo feature `testkit`; the data plane never uses it.
//!
//! [`SuperPacket`] describes a TSO (TCP) or USO (UDP) super-packet the way the kernel hands
//! it to a TUN reader with `IFF_VNET_HDR`: full IP lengths, the L4 checksum field holding the
//! folded pseudo-header sum (`NEEDS_CSUM`, the kernel's `CHECKSUM_PARTIAL`), and the
//! [`VirtioNetHdr`] that describes the split. Its checksums come from [`ref_sum`], an RFC 1071
//! sum written independently of [`crate::core::wire::checksum`], so the offload code is not
//! checked against itself; [`assert_segment_checksums`] checks a segment the same way.
//!
//! Unlike the rest of the engine this module allocates and panics (on a packet larger than
//! 64 KiB): it builds test inputs and asserts on outputs.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::ControlFlow;

use super::{flags, gso_type, split, GsoError, VirtioNetHdr, MAX_PACKET, VNET_HDR_LEN};
use crate::core::wire::{ipv4, ipv6, protocol, tcp, udp, Ipv4Repr, Ipv6Repr, TcpRepr, UdpRepr};

/// Default IPv4 source: `10.7.0.1`.
pub const SRC4: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 1);
/// Default IPv4 destination: `10.7.0.2`.
pub const DST4: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 2);
/// Default IPv6 source: `fd5a:1f00:102:304:506::1`.
pub const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd5a, 0x1f00, 0x0102, 0x0304, 0x0506, 0, 0, 1);
/// Default IPv6 destination: `fd5a:1f00:908:706:504::1`.
pub const DST6: Ipv6Addr = Ipv6Addr::new(0xfd5a, 0x1f00, 0x0908, 0x0706, 0x0504, 0, 0, 1);
/// NOP, NOP, timestamps (TSval 0x01020304, TSecr 0x0a0b0c0d), as Linux sends on data: the
/// default TCP options, which make a 32-byte TCP header.
pub const TS_OPTS: [u8; 12] = [1, 1, 8, 10, 1, 2, 3, 4, 10, 11, 12, 13];

/// A TSO or USO super-packet to build. Start from [`SuperPacket::tcp`] or
/// [`SuperPacket::udp`] and change fields with struct update syntax; [`build`](Self::build)
/// lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperPacket<'a> {
    /// IPv6 (with [`src6`](Self::src6)/[`dst6`](Self::dst6)) or IPv4.
    pub v6: bool,
    /// [`protocol::TCP`] (TSO) or [`protocol::UDP`] (USO).
    pub protocol: u8,
    /// IPv4 source address.
    pub src4: Ipv4Addr,
    /// IPv4 destination address.
    pub dst4: Ipv4Addr,
    /// IPv6 source address.
    pub src6: Ipv6Addr,
    /// IPv6 destination address.
    pub dst6: Ipv6Addr,
    /// IPv4 identification (the first segment's; TSO/USO increments it per segment).
    pub ident: u16,
    /// IPv4 don't-fragment bit.
    pub dont_frag: bool,
    /// IPv6 flow label.
    pub flow_label: u32,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// L4 source port.
    pub src_port: u16,
    /// L4 destination port.
    pub dst_port: u16,
    /// TCP sequence number of the first payload byte.
    pub seq: u32,
    /// TCP acknowledgment number.
    pub ack: u32,
    /// TCP flags ([`tcp::ACK`], …).
    pub tcp_flags: u8,
    /// TCP window.
    pub window: u16,
    /// TCP options (a multiple of 4 bytes, at most 40).
    pub tcp_options: &'a [u8],
    /// The payload to segment.
    pub payload: &'a [u8],
    /// Payload bytes per segment: the TCP MSS or the UDP payload per datagram.
    pub gso_size: u16,
}

impl<'a> SuperPacket<'a> {
    /// A TSO super-packet: [`SRC4`]→[`DST4`] (or [`SRC6`]→[`DST6`], flow label `0xbeef`),
    /// port 40000→5201, TTL 64, DF, identification `0xfff0`, sequence number `0xffff_f000`
    /// (it wraps within the first 4 KiB), ACK number `0x1234_5678`, window 502,
    /// [`TS_OPTS`].
    pub fn tcp(v6: bool, payload: &'a [u8], mss: u16, tcp_flags: u8) -> Self {
        Self {
            v6,
            protocol: protocol::TCP,
            src4: SRC4,
            dst4: DST4,
            src6: SRC6,
            dst6: DST6,
            ident: 0xfff0,
            dont_frag: true,
            flow_label: 0xbeef,
            ttl: 64,
            src_port: 40000,
            dst_port: 5201,
            seq: 0xffff_f000,
            ack: 0x1234_5678,
            tcp_flags,
            window: 502,
            tcp_options: &TS_OPTS,
            payload,
            gso_size: mss,
        }
    }

    /// A USO super-packet: [`SRC4`]→[`DST4`] (or [`SRC6`]→[`DST6`], flow label 0), port
    /// 5000→5001, TTL 64, identification 7, DF clear.
    pub fn udp(v6: bool, payload: &'a [u8], seg: u16) -> Self {
        Self {
            protocol: protocol::UDP,
            ident: 7,
            dont_frag: false,
            flow_label: 0,
            src_port: 5000,
            dst_port: 5001,
            seq: 0,
            ack: 0,
            tcp_flags: 0,
            window: 0,
            tcp_options: &[],
            ..Self::tcp(v6, payload, seg, 0)
        }
    }

    /// The vnet header and the IP packet, as one TUN read delivers them.
    pub fn build(&self) -> (VirtioNetHdr, Vec<u8>) {
        let tcp = self.protocol == protocol::TCP;
        let l3 = if self.v6 {
            ipv6::HEADER_LEN
        } else {
            ipv4::HEADER_LEN
        };
        let l4h = if tcp {
            tcp::HEADER_LEN + self.tcp_options.len()
        } else {
            udp::HEADER_LEN
        };
        let l4_len = l4h + self.payload.len();
        let mut p = vec![0u8; l3 + l4_len];
        if self.v6 {
            Ipv6Repr {
                src: self.src6,
                dst: self.dst6,
                next_header: self.protocol,
                payload_len: l4_len,
                hop_limit: self.ttl,
                traffic_class: 0,
                flow_label: self.flow_label,
            }
            .emit(&mut p)
            .expect("a super-packet fits 64 KiB");
        } else {
            Ipv4Repr {
                src: self.src4,
                dst: self.dst4,
                protocol: self.protocol,
                payload_len: l4_len,
                ttl: self.ttl,
                tos: 0,
                ident: self.ident,
                dont_frag: self.dont_frag,
            }
            .emit(&mut p)
            .expect("a super-packet fits 64 KiB");
        }
        let l4 = &mut p[l3..];
        if tcp {
            TcpRepr {
                src_port: self.src_port,
                dst_port: self.dst_port,
                seq: self.seq,
                ack: self.ack,
                flags: self.tcp_flags,
                window: self.window,
                options: self.tcp_options,
            }
            .emit(l4)
            .expect("TCP options of at most 40 bytes, a multiple of 4");
        } else {
            UdpRepr {
                src_port: self.src_port,
                dst_port: self.dst_port,
                len: l4_len,
            }
            .emit(l4)
            .expect("a super-packet fits 64 KiB");
        }
        l4[l4h..].copy_from_slice(self.payload);
        let csum_offset = if tcp {
            tcp::CHECKSUM_OFFSET
        } else {
            udp::CHECKSUM_OFFSET
        };
        let partial = ref_sum(&[&ref_pseudo(self.v6, &p, self.protocol, l4_len)]);
        p[l3 + csum_offset..l3 + csum_offset + 2].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: match (tcp, self.v6) {
                (true, false) => gso_type::TCPV4,
                (true, true) => gso_type::TCPV6,
                (false, _) => gso_type::UDP_L4,
            },
            hdr_len: (l3 + l4h) as u16,
            gso_size: self.gso_size,
            csum_start: l3 as u16,
            csum_offset: csum_offset as u16,
        };
        (hdr, p)
    }

    /// One TUN read: the vnet header's bytes followed by the IP packet.
    pub fn tun_read(&self) -> Vec<u8> {
        let (hdr, pkt) = self.build();
        let mut b = Vec::with_capacity(VNET_HDR_LEN + pkt.len());
        b.extend_from_slice(&hdr.to_bytes());
        b.extend_from_slice(&pkt);
        b
    }
}

/// `n` payload bytes that differ from one position to the next and with `seed`.
pub fn payload_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// RFC 1071 the slow way, over a list of byte slices concatenated (independent of
/// [`crate::core::wire::checksum`]): returns the folded, uncomplemented sum.
pub fn ref_sum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut s: u32 = 0;
    for pair in bytes.chunks(2) {
        let w = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        s += u32::from(w);
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The TCP/UDP pseudo-header of IP packet `pkt` (addresses read from its fixed header) for
/// protocol `proto` and an L4 length of `l4_len`, as bytes.
pub fn ref_pseudo(v6: bool, pkt: &[u8], proto: u8, l4_len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    if v6 {
        p.extend_from_slice(&pkt[8..40]);
        p.extend_from_slice(&(l4_len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
    } else {
        p.extend_from_slice(&pkt[12..20]);
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
    }
    p
}

/// Checks a segment's IP length, IPv4 header checksum and L4 checksum with [`ref_sum`].
pub fn assert_segment_checksums(seg: &[u8]) {
    let v6 = seg[0] >> 4 == 6;
    let l3 = if v6 { 40 } else { usize::from(seg[0] & 15) * 4 };
    let proto = if v6 { seg[6] } else { seg[9] };
    if !v6 {
        assert_eq!(ref_sum(&[&seg[..l3]]), 0xffff, "IPv4 header checksum");
        assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), seg.len());
    } else {
        assert_eq!(
            usize::from(u16::from_be_bytes([seg[4], seg[5]])),
            seg.len() - 40
        );
    }
    let l4 = &seg[l3..];
    let pseudo = ref_pseudo(v6, seg, proto, l4.len());
    assert_eq!(ref_sum(&[&pseudo, l4]), 0xffff, "L4 checksum");
}

/// Every packet [`split()`] emits for `hdr` + `pkt`, with a [`MAX_PACKET`] scratch.
pub fn split_all(hdr: &VirtioNetHdr, pkt: &[u8]) -> Result<Vec<Vec<u8>>, GsoError> {
    let mut scratch = vec![0u8; MAX_PACKET];
    let mut out = Vec::new();
    let n = split(hdr, pkt, &mut scratch, |s| {
        out.push(s.to_vec());
        ControlFlow::Continue(())
    })?;
    assert_eq!(n, out.len());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::wire::{checksum, IpPacket, TcpPacket, UdpPacket};

    #[test]
    fn super_packets_read_back_through_the_views() {
        let payload = payload_bytes(3000, 1);
        for v6 in [false, true] {
            let (hdr, p) = SuperPacket::tcp(v6, &payload, 1000, tcp::ACK).build();
            let ip = IpPacket::new_checked(&p[..]).unwrap();
            assert_eq!(ip.total_len(), p.len());
            assert_eq!(ip.protocol(), protocol::TCP);
            let l3 = ip.header_len();
            let t = TcpPacket::new_checked(ip.payload()).unwrap();
            assert_eq!((t.src_port(), t.dst_port()), (40000, 5201));
            assert_eq!(
                (t.seq(), t.ack(), t.flags()),
                (0xffff_f000, 0x1234_5678, tcp::ACK)
            );
            assert_eq!((t.window(), t.options()), (502, &TS_OPTS[..]));
            assert_eq!(t.payload(), &payload[..]);
            // The partial sum agrees with the engine's own checksum code.
            let pseudo = ip.pseudo_header_sum(ip.payload().len() as u32);
            assert_eq!(t.checksum(), checksum::fold(pseudo));
            assert_eq!(
                hdr,
                VirtioNetHdr {
                    flags: flags::NEEDS_CSUM,
                    gso_type: if v6 { gso_type::TCPV6 } else { gso_type::TCPV4 },
                    hdr_len: (l3 + 32) as u16,
                    gso_size: 1000,
                    csum_start: l3 as u16,
                    csum_offset: tcp::CHECKSUM_OFFSET as u16,
                }
            );
            let segs = split_all(&hdr, &p).unwrap();
            assert_eq!(segs.len(), 3);
            segs.iter().for_each(|s| assert_segment_checksums(s));

            let sp = SuperPacket::udp(v6, &payload, 1200);
            let (hdr, p) = sp.build();
            let ip = IpPacket::new_checked(&p[..]).unwrap();
            let u = UdpPacket::new_checked(ip.payload()).unwrap();
            assert_eq!((u.src_port(), u.dst_port(), u.len()), (5000, 5001, 3008));
            let pseudo = ip.pseudo_header_sum(3008);
            assert_eq!(u.checksum(), checksum::fold(pseudo));
            assert_eq!(hdr.gso_type, gso_type::UDP_L4);
            assert_eq!(split_all(&hdr, &p).unwrap().len(), 3);
            let read = sp.tun_read();
            assert_eq!(read[..VNET_HDR_LEN], hdr.to_bytes());
            assert_eq!(read[VNET_HDR_LEN..], p[..]);
        }
    }

    #[test]
    fn fields_can_be_overridden() {
        let sp = SuperPacket {
            src4: Ipv4Addr::new(10, 0, 0, 1),
            tcp_options: &[],
            seq: 1000,
            ..SuperPacket::tcp(false, &[7; 10], 1368, tcp::ACK)
        };
        let (hdr, p) = sp.build();
        assert_eq!(hdr.hdr_len, 40);
        assert_eq!(p.len(), 50);
        assert_eq!(p[12..16], [10, 0, 0, 1]);
        assert_eq!(TcpPacket::new_checked(&p[20..]).unwrap().seq(), 1000);
        assert_segment_checksums(&split_all(&hdr, &p).unwrap()[0]);
    }
}
