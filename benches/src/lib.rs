//! Criterion benchmarks live in `benches/benches/`, one file per subject. This library holds
//! the inputs several of them share: the TSO super-packet the `gso` and `path` benches feed
//! the engine, built with the engine's shared test builder
//! ([`tabbify_engine::core::offload::testkit`]).

use std::net::Ipv6Addr;

use tabbify_engine::core::offload::testkit::SuperPacket;

/// TCP payload per segment at tunnel MTU 1420 (IPv4 + TCP with timestamps).
pub const MSS: usize = 1368;
/// TCP header length of the benches' segments: 20 bytes plus [`TS_OPTS`].
pub const TCP_HDR: usize = 32;
/// NOP, NOP, timestamps (TSval 0x01020304, TSecr 0x05060708).
pub const TS_OPTS: [u8; 12] = [1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8];

/// A TSO super-packet of `payload` at [`MSS`], as the kernel hands it to a TUN reader:
/// [`SuperPacket::tcp`] with the benches' header values (identification 1, sequence number
/// 1,000,000, ACK number 2,000,000, [`TS_OPTS`], over IPv6 `fd5a:1f00:1:2:3::1` →
/// `fd5a:1f00:4:5:6::1` with flow label `0x1234`). Change the addresses with struct update
/// syntax where a bench routes them.
pub fn tso_super_packet(v6: bool, payload: &[u8], tcp_flags: u8) -> SuperPacket<'_> {
    SuperPacket {
        src6: Ipv6Addr::new(0xfd5a, 0x1f00, 1, 2, 3, 0, 0, 1),
        dst6: Ipv6Addr::new(0xfd5a, 0x1f00, 4, 5, 6, 0, 0, 1),
        flow_label: 0x1234,
        ident: 1,
        seq: 1_000_000,
        ack: 2_000_000,
        tcp_options: &TS_OPTS,
        ..SuperPacket::tcp(v6, payload, MSS as u16, tcp_flags)
    }
}
