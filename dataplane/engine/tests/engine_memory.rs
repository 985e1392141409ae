//! Two engines' pipelines talking to each other in memory: handshake, data both ways,
//! TSO super-packets split, sent as GSO batches and coalesced again on receive, and
//! hostile input (garbage, truncation, unknown indexes, replays, spoofed inner sources)
//! dropped and counted, and the per-peer port filter enforced at the sender and at the
//! receiver. A peer routing through the receiver (an inner destination that is not the
//! receiver's) is refused, and a TUN read no peer covers is answered with an ICMP
//! unreachable. No sockets: datagrams are handed from one pipeline to the other.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use boringtun::x25519::{PublicKey, StaticSecret};
use tabbify_engine::core::behind::Behind;
use tabbify_engine::core::counters::{DropCounters, DropReason};
use tabbify_engine::core::demux::{ControlQueue, Kind};
use tabbify_engine::core::filter::{PortFilter, Proto};
use tabbify_engine::core::local::LocalNets;
use tabbify_engine::core::net::IpNet;
use tabbify_engine::core::offload::testkit::SuperPacket;
use tabbify_engine::core::offload::{self, VirtioNetHdr};
use tabbify_engine::core::peer::PeerConfig;
use tabbify_engine::core::pipeline::{Pipeline, TunSink};
use tabbify_engine::core::rxsink::RxSink;
use tabbify_engine::core::table::Table;
use tabbify_engine::core::wire::{checksum, tcp};

/// Addresses used only as labels inside this process (never on a socket).
const EP_A: &str = "192.0.2.1:51820";
const EP_B: &str = "192.0.2.2:51820";

#[derive(Default)]
struct Collect(Vec<Vec<u8>>);

impl TunSink for Collect {
    fn push(&mut self, pkt: &[u8]) -> bool {
        self.0.push(pkt.to_vec());
        true
    }
}

struct Node {
    table: Arc<Table>,
    pipe: Pipeline,
    counters: Arc<DropCounters>,
    ep: SocketAddr,
}

fn node(
    secret: &StaticSecret,
    peer: &StaticSecret,
    peer_ep: &str,
    allowed: &str,
    own: &str,
    vnet: bool,
    ep: &str,
) -> Node {
    let table = Arc::new(Table::new(secret.clone(), 51820));
    table.set_local(LocalNets::new([own.parse::<IpAddr>().unwrap()], []));
    table
        .upsert_peer(PeerConfig {
            public_key: PublicKey::from(peer).to_bytes(),
            preshared_key: None,
            endpoint: Some(peer_ep.parse().unwrap()),
            allowed_ips: vec![allowed.parse::<IpNet>().unwrap()],
            persistent_keepalive: None,
        })
        .unwrap();
    let counters = Arc::new(DropCounters::default());
    Node {
        table,
        pipe: Pipeline::new(counters.clone(), vnet, true, 16),
        counters,
        ep: ep.parse().unwrap(),
    }
}

fn pair(vnet: bool) -> (Node, Node) {
    let ka = StaticSecret::from([1u8; 32]);
    let kb = StaticSecret::from([2u8; 32]);
    let a = node(&ka, &kb, EP_B, "10.0.0.2/32", "10.0.0.1", vnet, EP_A);
    let b = node(&kb, &ka, EP_A, "10.0.0.1/32", "10.0.0.2", vnet, EP_B);
    (a, b)
}

/// Every datagram `from` has queued, as (dst, bytes, segment size).
fn take(from: &mut Node) -> Vec<(SocketAddr, Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut done = Vec::new();
    from.pipe.tx.drain(|i, s| {
        out.push((s.dst, s.buf[..s.len].to_vec(), s.segment));
        done.push(i);
    });
    for i in done {
        from.pipe.tx.complete(i);
    }
    out
}

/// Delivers everything `from` queued to `to`, as GRO receives; returns what reached `to`'s TUN.
fn deliver(from: &mut Node, to: &mut Node, sink: &mut impl TunSink) -> usize {
    let mut n = 0;
    for (dst, bytes, seg) in take(from) {
        assert_eq!(dst, to.ep, "sent to the peer's endpoint");
        let snap = to.table.load_full();
        to.pipe
            .on_udp(&snap, from.ep, &bytes, Some(seg as u16), sink)
            .unwrap();
        n += 1;
    }
    n
}

fn ipv4_udp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    udp4(src, dst, 4000, 5000, payload)
}

/// An IPv4 header with a valid checksum around `l4` (protocol `proto`).
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let c = checksum::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..].copy_from_slice(l4);
    p
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8 + payload.len()];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u[8..].copy_from_slice(payload);
    ipv4(src, dst, 17, &u)
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    ipv4(src, dst, 6, &t)
}

fn ping4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    ipv4(
        src,
        dst,
        1,
        &[8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'],
    )
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const IP_A: [u8; 4] = [10, 0, 0, 1];
const IP_B: [u8; 4] = [10, 0, 0, 2];

/// Gives `node`'s peer (the other node of [`pair`]) port rules, keeping its session.
fn set_filter(node: &Node, peer: u8, filter: Option<PortFilter>) {
    let (ep, allowed) = if peer == 2 {
        (EP_B, "10.0.0.2/32")
    } else {
        (EP_A, "10.0.0.1/32")
    };
    node.table
        .upsert_peer_with_filter(
            PeerConfig {
                public_key: PublicKey::from(&StaticSecret::from([peer; 32])).to_bytes(),
                preshared_key: None,
                endpoint: Some(ep.parse().unwrap()),
                allowed_ips: vec![allowed.parse::<IpNet>().unwrap()],
                persistent_keepalive: None,
            },
            filter,
        )
        .unwrap();
}

/// Runs each packet through `node`'s TUN side.
fn send_all(node: &mut Node, pkts: &[Vec<u8>]) {
    let snap = node.table.load_full();
    for p in pkts {
        node.pipe.on_tun(&snap, &mut p.clone()).unwrap();
    }
}

fn handshake(a: &mut Node, b: &mut Node, first: &[u8]) -> Collect {
    let mut pkt = first.to_vec();
    let snap = a.table.load_full();
    a.pipe.on_tun(&snap, &mut pkt).unwrap();
    let mut sink_b = Collect::default();
    let mut sink_a = Collect::default();
    assert_eq!(deliver(a, b, &mut sink_b), 1, "initiation");
    assert_eq!(deliver(b, a, &mut sink_a), 1, "response");
    assert!(
        deliver(a, b, &mut sink_b) >= 1,
        "queued data after the handshake"
    );
    sink_b
}

#[test]
fn handshake_then_data_both_ways() {
    let (mut a, mut b) = pair(false);
    let p1 = ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"hello through the tunnel");
    let got = handshake(&mut a, &mut b, &p1);
    assert_eq!(got.0, vec![p1.clone()]);

    let p2 = ipv4_udp([10, 0, 0, 2], [10, 0, 0, 1], b"and back");
    let snap = b.table.load_full();
    b.pipe.on_tun(&snap, &mut p2.clone()).unwrap();
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0, vec![p2]);
    assert_eq!(a.counters.total() + b.counters.total(), 0);

    let snap = a.table.load_full();
    let peer = snap
        .by_key(&PublicKey::from(&StaticSecret::from([2u8; 32])).to_bytes())
        .unwrap();
    assert!(
        peer.stats
            .tx_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(
        peer.stats
            .rx_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[test]
fn no_route_and_no_endpoint_are_counted() {
    let (mut a, _b) = pair(false);
    let snap = a.table.load_full();
    let mut p = ipv4_udp([10, 0, 0, 1], [10, 9, 9, 9], b"x");
    a.pipe.on_tun(&snap, &mut p).unwrap();
    assert_eq!(a.counters.get(DropReason::NoRoute), 1);
    let mut junk = vec![0x45u8, 0, 0];
    a.pipe.on_tun(&snap, &mut junk).unwrap();
    assert_eq!(a.counters.get(DropReason::MalformedInner), 1);
    assert!(take(&mut a).is_empty());
}

/// Issue 12: a member with a valid session sends packets whose inner source is its own
/// (allowed) address but whose destination is a LAN address behind the receiver, another
/// peer's ULA, or multicast: none reaches the receiver's TUN, each is counted.
#[test]
fn a_peer_cannot_route_through_the_receiver() {
    let (mut a, mut b) = pair(false);
    handshake(
        &mut a,
        &mut b,
        &ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"ok"),
    );
    // The attacker's side routes the foreign destinations to B (its own table is its own).
    let kb = PublicKey::from(&StaticSecret::from([2u8; 32])).to_bytes();
    a.table
        .upsert_peer(PeerConfig {
            public_key: kb,
            preshared_key: None,
            endpoint: Some(EP_B.parse().unwrap()),
            allowed_ips: vec!["0.0.0.0/0".parse().unwrap()],
            persistent_keepalive: None,
        })
        .unwrap();
    let snap = a.table.load_full();
    let foreign: [[u8; 4]; 4] = [
        [192, 168, 1, 10],
        [10, 0, 0, 3],
        [224, 0, 0, 1],
        [10, 0, 0, 255],
    ];
    for dst in foreign {
        a.pipe
            .on_tun(&snap, &mut ipv4_udp([10, 0, 0, 1], dst, b"through"))
            .unwrap();
    }
    let mut sink = Collect::default();
    deliver(&mut a, &mut b, &mut sink);
    assert!(
        sink.0.is_empty(),
        "nothing for another host reached B's TUN"
    );
    assert_eq!(b.counters.get(DropReason::DestinationNotLocal), 4);
    // B's own address still gets through, on the same session.
    a.pipe
        .on_tun(&snap, &mut ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"mine"))
        .unwrap();
    deliver(&mut a, &mut b, &mut sink);
    assert_eq!(sink.0.len(), 1);
    assert_eq!(b.counters.total(), 4);
}

/// Issue 15, the attacker at a subnet router: B routes 192.168.7.0/24 for a peer that
/// `may_use` it, not for A. A, with a valid session, crafts packets into that LAN: B drops
/// every one under `destination_not_granted`; once A is granted the /24 (a policy change),
/// the same packets pass.
#[test]
fn a_subnet_router_admits_its_lan_only_from_peers_granted_it() {
    let (mut a, mut b) = pair(false);
    handshake(
        &mut a,
        &mut b,
        &ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"ok"),
    );
    let ka = PublicKey::from(&StaticSecret::from([1u8; 32])).to_bytes();
    let someone_else = [9u8; 32];
    let lan: IpNet = "192.168.7.0/24".parse().unwrap();
    let own = || LocalNets::new(["10.0.0.2".parse::<IpAddr>().unwrap()], []);
    b.table.set_local(own().with_grants([(someone_else, lan)]));
    // A's own table routes the LAN to B (the attacker controls its side).
    let kb = PublicKey::from(&StaticSecret::from([2u8; 32])).to_bytes();
    a.table
        .upsert_peer(PeerConfig {
            public_key: kb,
            preshared_key: None,
            endpoint: Some(EP_B.parse().unwrap()),
            allowed_ips: vec!["10.0.0.2/32".parse().unwrap(), lan],
            persistent_keepalive: None,
        })
        .unwrap();
    let snap = a.table.load_full();
    for last in [1u8, 10, 254] {
        a.pipe
            .on_tun(
                &snap,
                &mut ipv4_udp([10, 0, 0, 1], [192, 168, 7, last], b"in"),
            )
            .unwrap();
    }
    let mut sink = Collect::default();
    deliver(&mut a, &mut b, &mut sink);
    assert!(sink.0.is_empty(), "nothing reached the LAN");
    assert_eq!(b.counters.get(DropReason::DestinationNotGranted), 3);
    assert_eq!(b.counters.get(DropReason::DestinationNotLocal), 0);
    // Granted: the same packet passes, on the same session.
    b.table
        .set_local(own().with_grants([(someone_else, lan), (ka, lan)]));
    a.pipe
        .on_tun(
            &snap,
            &mut ipv4_udp([10, 0, 0, 1], [192, 168, 7, 10], b"in"),
        )
        .unwrap();
    deliver(&mut a, &mut b, &mut sink);
    assert_eq!(sink.0.len(), 1);
    assert_eq!(b.counters.get(DropReason::DestinationNotGranted), 3);
}

/// A table nobody gave its addresses delivers nothing (fails closed).
#[test]
fn a_receiver_without_local_addresses_delivers_nothing() {
    let (mut a, mut b) = pair(false);
    handshake(
        &mut a,
        &mut b,
        &ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"ok"),
    );
    b.table.set_local(LocalNets::default());
    let snap = a.table.load_full();
    a.pipe
        .on_tun(&snap, &mut ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"x"))
        .unwrap();
    let mut sink = Collect::default();
    deliver(&mut a, &mut b, &mut sink);
    assert!(sink.0.is_empty());
    assert_eq!(b.counters.get(DropReason::DestinationNotLocal), 1);
}

/// A TUN read for an address no peer covers (a removed peer) is answered at once with an
/// ICMP unreachable to the local sender, rate limited, and nothing goes to the network.
#[test]
fn no_route_is_answered_with_icmp_unreachable_rate_limited() {
    let (mut a, _b) = pair(false);
    let t0 = std::time::Instant::now();
    a.pipe.tick(t0);
    let snap = a.table.load_full();
    let mut p = ipv4_udp([10, 0, 0, 1], [10, 9, 9, 9], b"to a removed peer");
    a.pipe.on_tun(&snap, &mut p.clone()).unwrap();
    assert!(take(&mut a).is_empty(), "nothing sent to any peer");
    let mut sink = Collect::default();
    a.pipe.drain_replies(&mut sink);
    assert_eq!(sink.0.len(), 1);
    let ans = &sink.0[0];
    assert_eq!(&ans[12..16], &[10, 9, 9, 9], "from the unreachable address");
    assert_eq!(&ans[16..20], &[10, 0, 0, 1], "to the sender");
    assert_eq!((ans[20], ans[21]), (3, 1), "ICMP host unreachable");
    assert_eq!(&ans[28..], &p[..], "quotes the packet");
    assert_eq!(a.counters.unreachable_sent(), 1);
    // A flood gets the burst, then nothing until time passes.
    for _ in 0..200 {
        a.pipe.on_tun(&snap, &mut p).unwrap();
    }
    let mut sink = Collect::default();
    a.pipe.drain_replies(&mut sink);
    let burst = tabbify_engine::core::icmp::DEFAULT_BURST as usize;
    assert_eq!(sink.0.len(), burst - 1);
    assert_eq!(
        a.counters.get(DropReason::UnreachableLimited),
        200 - (burst as u64 - 1)
    );
    a.pipe.tick(t0 + std::time::Duration::from_secs(1));
    a.pipe.on_tun(&snap, &mut p).unwrap();
    let mut sink = Collect::default();
    a.pipe.drain_replies(&mut sink);
    assert_eq!(sink.0.len(), 1, "refilled");
    assert!(!a.pipe.has_replies());
    assert_eq!(a.counters.get(DropReason::NoRoute), 202);
}

#[test]
fn hostile_datagrams_are_dropped_and_counted() {
    let (mut a, mut b) = pair(false);
    let p1 = ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"first");
    handshake(&mut a, &mut b, &p1);

    // Capture one real data datagram to replay and mangle.
    let snap = a.table.load_full();
    a.pipe
        .on_tun(&snap, &mut ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"again"))
        .unwrap();
    let sent = take(&mut a);
    let data = sent[0].1.clone();
    let snap_b = b.table.load_full();
    let mut sink = Collect::default();
    b.pipe
        .on_udp(&snap_b, a.ep, &data, None, &mut sink)
        .unwrap();
    assert_eq!(sink.0.len(), 1);

    // Replay.
    b.pipe
        .on_udp(&snap_b, a.ep, &data, None, &mut sink)
        .unwrap();
    assert_eq!(b.counters.get(DropReason::Replay), 1);
    // Wrong receiver index.
    let mut wrong = data.clone();
    wrong[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    b.pipe
        .on_udp(&snap_b, a.ep, &wrong, None, &mut sink)
        .unwrap();
    assert_eq!(b.counters.get(DropReason::UnknownIndex), 1);
    // Flipped ciphertext bit.
    let mut flipped = data.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    flipped[8] = flipped[8].wrapping_add(1); // fresh counter so it is not a replay
    b.pipe
        .on_udp(&snap_b, a.ep, &flipped, None, &mut sink)
        .unwrap();
    assert!(b.counters.get(DropReason::Auth) + b.counters.get(DropReason::Replay) >= 2);
    // Truncations of every length and random bytes.
    let mut rng = 0x1234_5678_9abc_def0u64;
    for len in 0..data.len() {
        b.pipe
            .on_udp(&snap_b, a.ep, &data[..len], None, &mut sink)
            .unwrap();
    }
    for _ in 0..2000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = (rng % 200) as usize;
        let mut d: Vec<u8> = (0..len).map(|i| (rng >> (i % 56)) as u8).collect();
        if len > 0 {
            d[0] = (rng % 6) as u8;
        }
        b.pipe
            .on_udp(&snap_b, a.ep, &d, Some(17), &mut sink)
            .unwrap();
    }
    assert_eq!(sink.0.len(), 1, "nothing hostile reached the TUN");
    assert!(b.counters.get(DropReason::MalformedOuter) > 0);
}

/// The WireGuard socket also carries STUN and relay control (`core::demux`): a STUN answer
/// and a relay BIND_ACK reach the control queue with their sender, byte for byte; a flood
/// of junk (and of STUN beyond the queue's room) is dropped and counted by reason, never
/// delivered, and data between the peers flows on as before, interleaved in the same GRO
/// receive.
#[test]
fn stun_goes_to_the_control_queue_and_junk_is_counted() {
    let (mut a, mut b) = pair(false);
    let queue = Arc::new(ControlQueue::with_capacity(4));
    b.pipe.set_control(queue.clone());
    handshake(
        &mut a,
        &mut b,
        &ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"first"),
    );
    let snap_b = b.table.load_full();
    let stun_server: SocketAddr = "198.51.100.1:3478".parse().unwrap();
    // A Binding success response header (type 0x0101, length 0, magic cookie, txid).
    let mut stun = vec![0x01, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42];
    stun.extend_from_slice(&[7; 12]);
    let mut sink = Collect::default();
    b.pipe
        .on_udp(&snap_b, stun_server, &stun, None, &mut sink)
        .unwrap();
    b.pipe
        .on_udp(&snap_b, stun_server, &[0xF1, 0, 0, 9], None, &mut sink)
        .unwrap();
    let d = queue.try_pop().unwrap();
    assert_eq!(
        (d.src, d.kind, d.bytes()),
        (stun_server, Kind::Stun, &stun[..])
    );
    let d = queue.try_pop().unwrap();
    assert_eq!(
        (d.kind, d.bytes()),
        (Kind::RelayControl, &[0xF1, 0, 0, 9][..])
    );
    assert!(sink.0.is_empty());

    // Flood: junk of every first byte that is none of the kinds, malformed relay frames,
    // and STUN beyond the queue's room; data datagrams from the peer in between.
    let junk_before = b.counters.get(DropReason::Junk);
    let mut junk = 0u64;
    let mut delivered = 0usize;
    for round in 0..50u8 {
        for first in [0x00u8, 0x05, 0x45, 0x60, 0x80, 0xC0, 0xE0, 0xEF] {
            let mut d = vec![round; 64];
            d[0] = first;
            b.pipe.on_udp(&snap_b, a.ep, &d, None, &mut sink).unwrap();
            junk += 1;
        }
        // A relay frame too short for the message it claims (a 64-byte "response").
        let mut d = vec![round; 64];
        d[0] = 0xE2;
        b.pipe.on_udp(&snap_b, a.ep, &d, None, &mut sink).unwrap();
        b.pipe
            .on_udp(&snap_b, stun_server, &stun, None, &mut sink)
            .unwrap();
        let snap_a = a.table.load_full();
        a.pipe
            .on_tun(
                &snap_a,
                &mut ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], &[round; 100]),
            )
            .unwrap();
        delivered += deliver(&mut a, &mut b, &mut sink);
    }
    assert_eq!(b.counters.get(DropReason::Junk) - junk_before, junk);
    assert_eq!(b.counters.get(DropReason::RelayMalformed), 50);
    assert_eq!(queue.len(), 4, "the queue holds its room, no more");
    assert_eq!(b.counters.get(DropReason::ControlDropped), 50 - 4);
    assert_eq!(delivered, 50);
    assert_eq!(
        sink.0.len(),
        50,
        "every data packet reached the TUN, nothing else"
    );

    // A GRO receive mixing a data datagram and a STUN one of the same size.
    let snap_a = a.table.load_full();
    a.pipe
        .on_tun(
            &snap_a,
            &mut ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"mixed"),
        )
        .unwrap();
    let (_, data, _) = take(&mut a).remove(0);
    let mut stun_same = stun.clone();
    stun_same.resize(data.len(), 0);
    stun_same[3] = (data.len() - 20) as u8;
    let mut gro = data.clone();
    gro.extend_from_slice(&stun_same);
    while queue.try_pop().is_some() {}
    b.pipe
        .on_udp(&snap_b, a.ep, &gro, Some(data.len() as u16), &mut sink)
        .unwrap();
    assert_eq!(sink.0.len(), 51);
    assert_eq!(queue.try_pop().unwrap().bytes(), &stun_same[..]);
}

#[test]
fn inner_source_outside_allowed_ips_is_dropped() {
    let (mut a, mut b) = pair(false);
    handshake(
        &mut a,
        &mut b,
        &ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"ok"),
    );
    // A sends a packet whose inner source is not in B's AllowedIPs for A (10.0.0.1/32).
    let snap = a.table.load_full();
    a.pipe
        .on_tun(
            &snap,
            &mut ipv4_udp([10, 0, 0, 66], [10, 0, 0, 2], b"spoof"),
        )
        .unwrap();
    let mut sink = Collect::default();
    deliver(&mut a, &mut b, &mut sink);
    assert!(sink.0.is_empty());
    assert_eq!(b.counters.get(DropReason::SourceNotAllowed), 1);
}

/// One TUN read of a TSO super-packet 10.0.0.1:40000 → 10.0.0.2:5201 with a 20-byte TCP
/// header, and its payload.
fn tcp_super_packet(payload_len: usize, mss: u16) -> (Vec<u8>, Vec<u8>) {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 % 251) as u8).collect();
    let read = SuperPacket {
        src4: IP_A.into(),
        dst4: IP_B.into(),
        tcp_options: &[],
        ..SuperPacket::tcp(false, &payload, mss, tcp::ACK)
    }
    .tun_read();
    (read, payload)
}

#[test]
fn tso_super_packet_is_split_sent_as_gso_and_coalesced_again() {
    let (mut a, mut b) = pair(true);
    // Handshake with a small plain packet behind a zero virtio header.
    let mut first = vec![0u8; offload::VNET_HDR_LEN];
    first.extend(ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"hi"));
    let mut sink = RxSink::new(true, true, 8, 8, 1 << 20);
    {
        let snap = a.table.load_full();
        a.pipe.on_tun(&snap, &mut first).unwrap();
        deliver(&mut a, &mut b, &mut sink);
        let mut sa = RxSink::new(true, true, 8, 8, 1 << 20);
        deliver(&mut b, &mut a, &mut sa);
        deliver(&mut a, &mut b, &mut sink);
        sink.clear();
    }
    let (mut sp, payload) = tcp_super_packet(40 * 1368, 1368);
    let snap = a.table.load_full();
    a.pipe.on_tun(&snap, &mut sp).unwrap();
    let sent = take(&mut a);
    // 40 segments of 1408 bytes + 32 overhead fit one GSO send.
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].2, 20 + 20 + 1368 + 32);
    assert_eq!(sent[0].1.len(), 40 * (20 + 20 + 1368 + 32));
    let snap_b = b.table.load_full();
    b.pipe
        .on_udp(&snap_b, a.ep, &sent[0].1, Some(sent[0].2 as u16), &mut sink)
        .unwrap();
    let mut outs = Vec::new();
    sink.for_each(|buf| outs.push(buf.to_vec()));
    assert_eq!(outs.len(), 1, "one coalesced super-packet");
    let out = &outs[0];
    let h = VirtioNetHdr::parse(&out[..offload::VNET_HDR_LEN]).unwrap();
    assert_eq!(h.gso_type, offload::gso_type::TCPV4);
    assert_eq!(h.gso_size, 1368);
    assert_eq!(&out[offload::VNET_HDR_LEN + 40..], &payload[..]);
    assert_eq!(b.counters.total(), 0);
}

#[test]
fn allowed_ip_moves_between_peers() {
    let t = Table::new(StaticSecret::from([9u8; 32]), 1);
    let k1 = [1u8; 32];
    let k2 = [2u8; 32];
    for k in [k1, k2] {
        t.upsert_peer(PeerConfig {
            public_key: k,
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec!["10.1.0.0/16".parse().unwrap()],
            persistent_keepalive: None,
        })
        .unwrap();
    }
    let s = t.load_full();
    let dst = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    assert_eq!(s.route(dst).unwrap().public_key, k2, "last claim wins");
    assert!(s.peers[0].allowed_ips.is_empty());
    assert!(t.remove_peer(&k2));
    assert!(t.load().route(dst).is_none());
}

#[test]
fn port_filter_refuses_at_the_sender() {
    let (mut a, mut b) = pair(false);
    // A may open port 5000 on B; B may open nothing on A. B holds the mirror image.
    set_filter(&a, 2, Some(PortFilter::from_ranges(&[(5000, 5000)], &[])));
    set_filter(&b, 1, Some(PortFilter::from_ranges(&[], &[(5000, 5000)])));
    let ok = udp4(IP_A, IP_B, 4000, 5000, b"allowed");
    let got = handshake(&mut a, &mut b, &ok);
    assert_eq!(got.0, vec![ok]);

    // Another port, a ping, a SYN elsewhere: refused before encryption, nothing sent.
    send_all(
        &mut a,
        &[
            udp4(IP_A, IP_B, 4000, 5001, b"no"),
            ping4(IP_A, IP_B),
            tcp4(IP_A, IP_B, 40000, 22, SYN),
        ],
    );
    assert_eq!(a.counters.get(DropReason::FilteredOut), 3);
    assert!(take(&mut a).is_empty());
    // ... while the allowed port still passes on the same session.
    let ok2 = tcp4(IP_A, IP_B, 40000, 5000, SYN);
    send_all(&mut a, std::slice::from_ref(&ok2));
    let mut sink_b = Collect::default();
    assert_eq!(deliver(&mut a, &mut b, &mut sink_b), 1);
    assert_eq!(sink_b.0, vec![ok2]);

    // B's replies from the service port pass both ends; B opening anything on A does not.
    let reply = udp4(IP_B, IP_A, 5000, 4000, b"reply");
    send_all(
        &mut b,
        &[
            reply.clone(),
            udp4(IP_B, IP_A, 5001, 4000, b"not from the service"),
            tcp4(IP_B, IP_A, 5000, 4000, SYN),
            ping4(IP_B, IP_A),
        ],
    );
    assert_eq!(b.counters.get(DropReason::FilteredOut), 3);
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0, vec![reply]);
    assert_eq!(a.counters.get(DropReason::FilteredIn), 0);
    assert_eq!(b.counters.get(DropReason::FilteredIn), 0);
}

#[test]
fn port_filter_refuses_at_the_receiver() {
    let (mut a, mut b) = pair(false);
    // A has no rules for B (sends anything); B accepts only port 5000 from A.
    set_filter(&b, 1, Some(PortFilter::from_ranges(&[], &[(5000, 5000)])));
    let ok = udp4(IP_A, IP_B, 4000, 5000, b"allowed");
    assert_eq!(handshake(&mut a, &mut b, &ok).0, vec![ok]);

    // Six equal-size datagrams, alternately allowed and not: one GSO send, one GRO receive
    // on B, filtered packet by packet.
    let batch: Vec<Vec<u8>> = (0..6u16)
        .map(|i| udp4(IP_A, IP_B, 4000, 5000 + i % 2, &[i as u8; 100]))
        .collect();
    send_all(&mut a, &batch);
    let sent = take(&mut a);
    assert_eq!(sent.len(), 1, "one GSO send");
    assert_eq!(sent[0].1.len() / sent[0].2, 6, "of six datagrams");
    let mut sink = Collect::default();
    let snap_b = b.table.load_full();
    b.pipe
        .on_udp(&snap_b, a.ep, &sent[0].1, Some(sent[0].2 as u16), &mut sink)
        .unwrap();
    let want: Vec<Vec<u8>> = batch.iter().step_by(2).cloned().collect();
    assert_eq!(sink.0, want);
    assert_eq!(b.counters.get(DropReason::FilteredIn), 3);

    // A ping and a SYN to another port are dropped after decryption; a SYN to 5000 is not.
    let syn_ok = tcp4(IP_A, IP_B, 40000, 5000, SYN);
    send_all(
        &mut a,
        &[
            ping4(IP_A, IP_B),
            tcp4(IP_A, IP_B, 40000, 22, SYN),
            syn_ok.clone(),
        ],
    );
    let mut sink = Collect::default();
    deliver(&mut a, &mut b, &mut sink);
    assert_eq!(sink.0, vec![syn_ok]);
    assert_eq!(b.counters.get(DropReason::FilteredIn), 5);
    assert_eq!(a.counters.get(DropReason::FilteredOut), 0);
    // The refused packets were authenticated: nothing else was counted against them.
    assert_eq!(b.counters.total(), 5);

    // Removing the rules lets everything through again, on the same session.
    set_filter(&b, 1, None);
    let ping = ping4(IP_A, IP_B);
    send_all(&mut a, std::slice::from_ref(&ping));
    let mut sink = Collect::default();
    deliver(&mut a, &mut b, &mut sink);
    assert_eq!(sink.0, vec![ping]);
}

#[test]
fn tso_super_packet_is_filtered_once_by_its_first_segment() {
    let (mut a, mut b) = pair(true);
    let mut first = vec![0u8; offload::VNET_HDR_LEN];
    first.extend(ipv4_udp(IP_A, IP_B, b"hi"));
    let mut sink = Collect::default();
    let snap = a.table.load_full();
    a.pipe.on_tun(&snap, &mut first).unwrap();
    deliver(&mut a, &mut b, &mut sink);
    deliver(&mut b, &mut a, &mut Collect::default());
    deliver(&mut a, &mut b, &mut sink);
    assert_eq!(sink.0.len(), 1);

    // 40 segments to port 5201: refused as one super-packet when only port 80 is allowed
    // (data of a connection that was never opened).
    set_filter(&a, 2, Some(PortFilter::from_ranges(&[(80, 80)], &[])));
    let (mut sp, _) = tcp_super_packet(40 * 1368, 1368);
    let snap = a.table.load_full();
    a.pipe.on_tun(&snap, &mut sp).unwrap();
    assert_eq!(a.counters.get(DropReason::CtInvalid), 1);
    assert!(take(&mut a).is_empty());

    // With 5201 allowed the data still needs its connection: refused until the handshake
    // has been seen.
    set_filter(&a, 2, Some(PortFilter::from_ranges(&[(5201, 5201)], &[])));
    let (mut sp, _) = tcp_super_packet(40 * 1368, 1368);
    let snap = a.table.load_full();
    a.pipe.on_tun(&snap, &mut sp).unwrap();
    assert_eq!(a.counters.get(DropReason::CtInvalid), 2);
    let mut syn = vec![0u8; offload::VNET_HDR_LEN];
    syn.extend(tcp4(IP_A, IP_B, 40000, 5201, SYN));
    a.pipe.on_tun(&snap, &mut syn).unwrap();
    deliver(&mut a, &mut b, &mut sink);
    let mut synack = vec![0u8; offload::VNET_HDR_LEN];
    synack.extend(tcp4(IP_B, IP_A, 5201, 40000, SYN | ACK));
    let snap_b = b.table.load_full();
    b.pipe.on_tun(&snap_b, &mut synack).unwrap();
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0.len(), 1, "the SYN-ACK of the connection A opened");

    // Allowed: all 40 segments go out in one GSO send.
    let (mut sp, _) = tcp_super_packet(40 * 1368, 1368);
    a.pipe.on_tun(&snap, &mut sp).unwrap();
    let sent = take(&mut a);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1.len() / sent[0].2, 40);
    assert_eq!(a.counters.total(), 2);
}

/// A malicious peer without a filter of its own (B) tries the source-port tricks against A,
/// whose rules let A open B's 5000 and nothing else: A's receive side drops each one and
/// counts it by reason, while A's own flow to 5000 gets its replies.
#[test]
fn receiver_drops_source_port_tricks_of_an_unfiltered_peer() {
    let (mut a, mut b) = pair(false);
    set_filter(&a, 2, Some(PortFilter::from_ranges(&[(5000, 5000)], &[])));
    // A opens UDP 4000 → B:5000 (and the handshake happens on the way).
    let hello = udp4(IP_A, IP_B, 4000, 5000, b"hello");
    assert_eq!(handshake(&mut a, &mut b, &hello).0, vec![hello]);

    let reply = udp4(IP_B, IP_A, 5000, 4000, b"reply");
    let tricks = [
        // UDP from B's service port to another port of A.
        udp4(IP_B, IP_A, 5000, 7000, b"from-src-port-5000"),
        // Non-SYN TCP from the service port: ACK injection, RST.
        tcp4(IP_B, IP_A, 5000, 22, ACK),
        tcp4(IP_B, IP_A, 5000, 22, 0x04),
        // An ICMP port unreachable quoting a UDP packet A never sent (4001 → 5000).
        ipv4(IP_B, IP_A, 1, &{
            let mut m = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(&udp4(IP_A, IP_B, 4001, 5000, b"x")[..28]);
            m
        }),
    ];
    let related = ipv4(IP_B, IP_A, 1, &{
        let mut m = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&udp4(IP_A, IP_B, 4000, 5000, b"x")[..28]);
        m
    });
    let mut all = vec![reply.clone()];
    all.extend(tricks.iter().cloned());
    all.push(related.clone());
    send_all(&mut b, &all);
    let mut sink = Collect::default();
    deliver(&mut b, &mut a, &mut sink);
    assert_eq!(
        sink.0,
        vec![reply, related],
        "only the reply and the related error"
    );
    assert_eq!(a.counters.get(DropReason::FilteredIn), 1);
    assert_eq!(a.counters.get(DropReason::CtInvalid), 2);
    assert_eq!(a.counters.get(DropReason::IcmpUnrelated), 1);
}

// ---------------------------------------------------------------------------------------
// Relayed paths (issue 13, `core::path`): frames through a relay, upgrades on direct receipt.

use tabbify_engine::core::path::{self as relay_path, PathKind, RelayRoute};
use tabbify_engine::core::peer::Peer;

/// The relay's address (a label, never a socket) and the handles it gave A and B.
const RELAY: &str = "203.0.113.7:443";
const H_A: u32 = 0x00_0A0A;
const H_B: u32 = 0x0B_0B0B;

/// `node`'s one peer (key byte `peer`).
fn peer_of(node: &Node, peer: u8) -> Arc<Peer> {
    let snap = node.table.load_full();
    snap.by_key(&PublicKey::from(&StaticSecret::from([peer; 32])).to_bytes())
        .unwrap()
        .clone()
}

/// Both nodes send through the relay (A knows B as `H_B`, B knows A as `H_A`).
fn relayed_pair() -> (Node, Node) {
    let (a, b) = pair(false);
    let relay: SocketAddr = RELAY.parse().unwrap();
    let route = |handle| {
        Some(RelayRoute {
            addr: relay,
            handle,
        })
    };
    relay_path::set_path(&peer_of(&a, 2), PathKind::Relay, route(H_B));
    relay_path::set_path(&peer_of(&b, 1), PathKind::Relay, route(H_A));
    (a, b)
}

/// Plays the relay: everything `from` queued must be frames to the relay for `to_handle`,
/// in GSO slots of equal-size frames; each frame's handle is rewritten to `from_handle`
/// and the slot is handed to `to` as one GRO receive from the relay. Returns the slots.
fn relay(
    from: &mut Node,
    to: &mut Node,
    to_handle: u32,
    from_handle: u32,
    sink: &mut impl TunSink,
) -> usize {
    let relay: SocketAddr = RELAY.parse().unwrap();
    let mut n = 0;
    for (dst, mut bytes, seg) in take(from) {
        assert_eq!(dst, relay, "sent to the relay");
        for f in bytes.chunks_mut(seg) {
            assert!(
                (0xE1..=0xE4).contains(&f[0]),
                "a relay frame: {:02x?}",
                &f[..4]
            );
            let h = u32::from_be_bytes([0, f[1], f[2], f[3]]);
            assert_eq!(h, to_handle, "addressed to the destination's handle");
            f[1..4].copy_from_slice(&from_handle.to_be_bytes()[1..]);
        }
        let snap = to.table.load_full();
        to.pipe
            .on_udp(&snap, relay, &bytes, Some(seg as u16), sink)
            .unwrap();
        n += 1;
    }
    n
}

fn state(node: &Node, peer: u8) -> (Option<SocketAddr>, PathKind, Option<RelayRoute>) {
    let p = peer_of(node, peer);
    let st = p.lock();
    (st.endpoint, st.path, st.relay)
}

fn rx_times(node: &Node, peer: u8) -> (u64, u64) {
    let p = peer_of(node, peer);
    (
        p.stats
            .last_direct_rx_ns
            .load(std::sync::atomic::Ordering::Relaxed),
        p.stats
            .last_relay_rx_ns
            .load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// A handshake and data both ways through the relay: every datagram is a frame (zero
/// bytes of overhead), GSO batches of frames stay batched, the receiver learns the relay
/// route from authenticated frames and never touches the direct endpoint or the path.
#[test]
fn relayed_handshake_and_data_are_frames_and_move_only_the_relay_route() {
    let (mut a, mut b) = relayed_pair();
    let relay_addr: SocketAddr = RELAY.parse().unwrap();
    a.pipe.set_now_ns(111);
    b.pipe.set_now_ns(222);
    let mut sink_a = Collect::default();
    let mut sink_b = Collect::default();
    let p1 = ipv4_udp(IP_A, IP_B, b"first, through the relay");
    send_all(&mut a, std::slice::from_ref(&p1));
    assert_eq!(
        relay(&mut a, &mut b, H_B, H_A, &mut sink_b),
        1,
        "initiation"
    );
    assert_eq!(relay(&mut b, &mut a, H_A, H_B, &mut sink_a), 1, "response");
    assert!(
        relay(&mut a, &mut b, H_B, H_A, &mut sink_b) >= 1,
        "queued data"
    );
    assert_eq!(sink_b.0, vec![p1]);

    // A burst of equal packets: one GSO slot of frames, as direct.
    let burst: Vec<Vec<u8>> = (0..8u8).map(|i| ipv4_udp(IP_B, IP_A, &[i; 1000])).collect();
    send_all(&mut b, &burst);
    assert_eq!(relay(&mut b, &mut a, H_A, H_B, &mut sink_a), 1, "one batch");
    assert_eq!(sink_a.0, burst);
    assert_eq!(a.counters.total() + b.counters.total(), 0);

    // The route was learned from the frames (the handle the relay wrote: the source's).
    let route = |handle| {
        Some(RelayRoute {
            addr: relay_addr,
            handle,
        })
    };
    assert_eq!(
        state(&b, 1),
        (Some(EP_A.parse().unwrap()), PathKind::Relay, route(H_A))
    );
    assert_eq!(
        state(&a, 2),
        (Some(EP_B.parse().unwrap()), PathKind::Relay, route(H_B))
    );
    assert_eq!(rx_times(&b, 1), (0, 222));
    assert_eq!(rx_times(&a, 2), (0, 111));
}

/// Relay roaming: an authenticated frame through another relay (or with another handle)
/// moves the relay route; sends follow it. A path set to `Relay` without a route falls
/// back to the direct endpoint.
#[test]
fn relay_route_roams_and_relay_without_route_falls_back_to_direct() {
    let (mut a, mut b) = relayed_pair();
    let mut sink = Collect::default();
    send_all(&mut a, &[ipv4_udp(IP_A, IP_B, b"x")]);
    relay(&mut a, &mut b, H_B, H_A, &mut sink);
    relay(&mut b, &mut a, H_A, H_B, &mut sink);
    relay(&mut a, &mut b, H_B, H_A, &mut sink);
    // A's next frame arrives at B from another relay address with another handle.
    send_all(&mut a, &[ipv4_udp(IP_A, IP_B, b"roamed")]);
    let (_, mut bytes, _) = take(&mut a).remove(0);
    bytes[1..4].copy_from_slice(&[0, 0, 0x77]);
    let other: SocketAddr = "203.0.113.8:443".parse().unwrap();
    let snap_b = b.table.load_full();
    b.pipe
        .on_udp(&snap_b, other, &bytes, None, &mut sink)
        .unwrap();
    let moved = Some(RelayRoute {
        addr: other,
        handle: 0x77,
    });
    assert_eq!(state(&b, 1).2, moved);
    send_all(&mut b, &[ipv4_udp(IP_B, IP_A, b"follows")]);
    let (dst, bytes, _) = take(&mut b).remove(0);
    assert_eq!((dst, &bytes[..4]), (other, &[0xE4, 0, 0, 0x77][..]));

    // No route: the direct endpoint, as plain WireGuard.
    relay_path::set_path(&peer_of(&b, 1), PathKind::Relay, None);
    send_all(&mut b, &[ipv4_udp(IP_B, IP_A, b"direct")]);
    let (dst, bytes, _) = take(&mut b).remove(0);
    assert_eq!((dst, bytes[0]), (EP_A.parse().unwrap(), 4));
}

/// One direct probe from `node` to its peer (`core::path::probe_datagram`): a ping inside
/// the session when there is one, else a handshake initiation.
fn probe(node: &Node, peer: u8) -> Vec<u8> {
    let p = peer_of(node, peer);
    let mut buf = [0u8; 256];
    let n = relay_path::probe_datagram(&mut p.lock(), &mut buf).unwrap();
    buf[..n].to_vec()
}

/// Hands `bytes` to `to` as one receive straight from `src`.
fn direct_rx(to: &mut Node, src: SocketAddr, bytes: &[u8], sink: &mut impl TunSink) {
    let snap = to.table.load_full();
    to.pipe.on_udp(&snap, src, bytes, None, sink).unwrap();
}

/// Hands `bytes` (a WireGuard message) to `to` as a frame from the relay, carrying the
/// source's handle `from_handle`.
fn relay_rx(to: &mut Node, from_handle: u32, bytes: &[u8], sink: &mut impl TunSink) {
    let mut f = bytes.to_vec();
    relay_path::rewrite(&mut f, from_handle);
    let snap = to.table.load_full();
    to.pipe
        .on_udp(&snap, RELAY.parse().unwrap(), &f, None, sink)
        .unwrap();
}

/// A relayed pair with a session made through the relay.
fn relayed_session() -> (Node, Node) {
    let (mut a, mut b) = relayed_pair();
    let mut sink = Collect::default();
    send_all(&mut a, &[ipv4_udp(IP_A, IP_B, b"x")]);
    relay(&mut a, &mut b, H_B, H_A, &mut sink);
    relay(&mut b, &mut a, H_A, H_B, &mut sink);
    relay(&mut a, &mut b, H_B, H_A, &mut sink);
    assert_eq!(sink.0.len(), 1);
    (a, b)
}

/// The one-way direct path (issue 13): the peer's direct datagrams reach us, ours may not
/// reach it. Plain authenticated direct receipt (data, a keepalive) moves the endpoint and
/// stamps `last_direct_rx_ns` but leaves the path `Relay` and sends nothing back; the
/// peer's ping is answered with a pong straight to where it came from, without upgrading
/// or stamping us; only a pong that answers one of *our* pings, received directly, upgrades
/// us (the round trip went direct). A pong through the relay, or with an id we never sent
/// (the peer lying or replaying an old answer), upgrades nothing; a pinned peer stays
/// relayed even when its probe is answered, and answers no probe itself.
#[test]
fn only_a_direct_answer_to_our_own_probe_upgrades() {
    let (mut a, mut b) = relayed_session();
    let mut sink = Collect::default();
    b.pipe.set_now_ns(5_000);
    a.pipe.set_now_ns(6_000);
    let a_new: SocketAddr = "192.0.2.99:40000".parse().unwrap();

    // A's data and keepalive straight to B: authenticated, not an answer to B's probe.
    send_all(&mut a, &[ipv4_udp(IP_A, IP_B, b"direct data")]);
    let (_, data, _) = take(&mut a).remove(0);
    direct_rx(&mut b, a_new, &data, &mut sink);
    let pa = peer_of(&a, 2);
    let mut buf = [0u8; 256];
    let n = match pa.lock().tunn.encapsulate(&[], &mut buf) {
        boringtun::noise::TunnResult::WriteToNetwork(p) => p.len(),
        _ => panic!("a session exists"),
    };
    direct_rx(&mut b, a_new, &buf[..n], &mut sink);
    let (ep, path, route) = state(&b, 1);
    assert_eq!((ep, path), (Some(a_new), PathKind::Relay), "no upgrade");
    assert!(route.is_some());
    assert_eq!(rx_times(&b, 1).0, 5_000, "direct receipt is still stamped");
    assert!(take(&mut b).is_empty(), "no echo");
    assert_eq!(
        sink.0.last().unwrap(),
        &ipv4_udp(IP_A, IP_B, b"direct data")
    );

    // B probes: a ping straight to A. A answers straight back, stays relayed, and does not
    // count the ping as direct receipt.
    let ping = probe(&b, 1);
    assert_eq!(ping[0], 4, "a data message inside the session");
    let delivered = sink.0.len();
    direct_rx(&mut a, b.ep, &ping, &mut sink);
    assert_eq!(sink.0.len(), delivered, "a probe never reaches the TUN");
    assert_eq!(state(&a, 2).1, PathKind::Relay, "a ping upgrades nobody");
    assert_eq!(rx_times(&a, 2).0, 0, "a ping is no direct receipt");
    assert_eq!(state(&a, 2).0, Some(b.ep));
    let pong = take(&mut a);
    assert_eq!(pong.len(), 1);
    assert_eq!(
        (pong[0].0, pong[0].1[0]),
        (b.ep, 4),
        "the pong goes straight back, not through the relay"
    );
    let pong = pong[0].1.clone();

    // The pong through the relay: proves nothing about the direct path.
    relay_rx(&mut b, H_A, &pong, &mut sink);
    assert_eq!(state(&b, 1).1, PathKind::Relay);
    // A pong with an id B never sent, straight from A: nothing.
    let forged = match pa
        .lock()
        .tunn
        .encapsulate(&relay_path::Probe::Pong(0x1234_5678).packet(), &mut buf)
    {
        boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("a session exists"),
    };
    direct_rx(&mut b, a.ep, &forged, &mut sink);
    assert_eq!(state(&b, 1).1, PathKind::Relay);
    assert_eq!(sink.0.len(), delivered, "pongs never reach the TUN");

    // B's next ping answered straight back: B upgrades; A is still relayed until its own
    // probe is answered.
    let ping = probe(&b, 1);
    direct_rx(&mut a, b.ep, &ping, &mut sink);
    let pong = take(&mut a).remove(0).1;
    b.pipe.set_now_ns(7_000);
    direct_rx(&mut b, a.ep, &pong, &mut sink);
    assert_eq!(
        state(&b, 1).1,
        PathKind::Direct,
        "the answered probe upgraded B"
    );
    assert_eq!(rx_times(&b, 1).0, 7_000);
    assert_eq!(state(&a, 2).1, PathKind::Relay);
    let ping = probe(&a, 2);
    direct_rx(&mut b, a.ep, &ping, &mut sink);
    let pong = take(&mut b).remove(0);
    assert_eq!(pong.0, a.ep, "a direct side answers too");
    direct_rx(&mut a, b.ep, &pong.1, &mut sink);
    assert_eq!(state(&a, 2).1, PathKind::Direct);
    // From now on data goes direct.
    send_all(&mut a, &[ipv4_udp(IP_A, IP_B, b"direct now")]);
    let sent = take(&mut a);
    assert_eq!((sent[0].0, sent[0].1[0]), (EP_B.parse().unwrap(), 4));

    // Pinned (--force-relay): even an answered probe leaves the path relayed.
    let pb = peer_of(&b, 1);
    let route = pb.lock().relay;
    relay_path::set_path(&pb, PathKind::Relay, route);
    relay_path::set_relay_only(&pb, true);
    let ping = probe(&b, 1);
    direct_rx(&mut a, b.ep, &ping, &mut sink);
    let pong = take(&mut a).remove(0).1;
    direct_rx(&mut b, a.ep, &pong, &mut sink);
    assert_eq!(state(&b, 1).1, PathKind::Relay);
    // And B, pinned, does not answer A's probe: relayed A stays relayed.
    let route = pa.lock().relay;
    relay_path::set_path(&pa, PathKind::Relay, route);
    let ping = probe(&a, 2);
    direct_rx(&mut b, a.ep, &ping, &mut sink);
    assert!(take(&mut b).is_empty(), "a pinned peer answers no probe");
    assert_eq!(state(&a, 2).1, PathKind::Relay);
    assert_eq!(a.counters.total() + b.counters.total(), 0);
}

/// Without a session the probe is a handshake initiation. Its response received directly
/// (receiver index = the probe's sender index, accepted by boringtun) upgrades the prober;
/// the same response through the relay, or a direct response to another initiation (one
/// the prober sent the normal way), does not; the responder is not upgraded by the
/// initiation it answered, nor does it count it as direct receipt (`last_direct_rx_ns`,
/// which the joiner's direct attempts read: with our direction dropped, the peer's
/// initiations would otherwise "answer" our attempt).
#[test]
fn a_probe_initiation_answered_directly_upgrades_and_nothing_else_does() {
    // Answered directly.
    let (mut a, mut b) = relayed_pair();
    a.pipe.set_now_ns(300);
    b.pipe.set_now_ns(400);
    let mut sink = Collect::default();
    let init = probe(&b, 1);
    assert_eq!(init[0], 1, "no session: an initiation");
    direct_rx(&mut a, b.ep, &init, &mut sink);
    let resp = take(&mut a);
    assert_eq!((resp.len(), resp[0].0, resp[0].1[0]), (1, b.ep, 2));
    assert_eq!(
        state(&a, 2).1,
        PathKind::Relay,
        "an initiation upgrades nobody"
    );
    assert_eq!(state(&a, 2).0, Some(b.ep), "the endpoint roams as always");
    assert_eq!(
        rx_times(&a, 2),
        (0, 0),
        "the peer's initiation is no evidence for our direction"
    );
    direct_rx(&mut b, a.ep, &resp[0].1, &mut sink);
    assert_eq!(state(&b, 1).1, PathKind::Direct);
    assert_eq!(rx_times(&b, 1), (400, 0));

    // The same exchange, the response through the relay.
    let (mut a, mut b) = relayed_pair();
    let init = probe(&b, 1);
    direct_rx(&mut a, b.ep, &init, &mut sink);
    let resp = take(&mut a).remove(0).1;
    relay_rx(&mut b, H_A, &resp, &mut sink);
    assert!(
        peer_of(&b, 1)
            .lock()
            .tunn
            .time_since_last_handshake()
            .is_some(),
        "boringtun accepted it"
    );
    assert_eq!(state(&b, 1).1, PathKind::Relay);

    // A direct response to an initiation that was not the probe.
    let (mut a, mut b) = relayed_pair();
    let _probe = probe(&b, 1);
    let pb = peer_of(&b, 1);
    let mut buf = [0u8; 256];
    let other = match pb.lock().tunn.format_handshake_initiation(&mut buf, true) {
        boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("an initiation"),
    };
    direct_rx(&mut a, b.ep, &other, &mut sink);
    let resp = take(&mut a).remove(0).1;
    direct_rx(&mut b, a.ep, &resp, &mut sink);
    assert!(pb.lock().tunn.time_since_last_handshake().is_some());
    assert_eq!(state(&b, 1).1, PathKind::Relay);
    assert_eq!(a.counters.total() + b.counters.total(), 0);
}

/// Probe parsing is total and exact: only the 56-byte probe packet is a probe; any other
/// byte string (traffic) is left alone.
#[test]
fn probe_packets_parse_exactly() {
    use relay_path::Probe;
    for p in [Probe::Ping(1), Probe::Pong(u64::MAX), Probe::Ping(0xABCD)] {
        assert_eq!(Probe::parse(&p.packet()), Some(p));
        let pkt = p.packet();
        for i in 0..pkt.len() {
            if i >= 48 {
                continue; // the id: any value
            }
            let mut bad = pkt;
            bad[i] ^= 0x01;
            assert_eq!(Probe::parse(&bad), None, "byte {i} flipped");
        }
        assert_eq!(Probe::parse(&pkt[..55]), None);
        let mut long = pkt.to_vec();
        long.push(0);
        assert_eq!(Probe::parse(&long), None);
    }
}

/// A handshake initiation that comes through the relay is answered through it, with the
/// handle the frame carried, even when the receiver's path is direct and it has no relay
/// route yet; the route is learned from the authenticated initiation.
#[test]
fn a_relayed_initiation_is_answered_through_the_relay() {
    let (mut a, mut b) = pair(false);
    let relay_addr: SocketAddr = RELAY.parse().unwrap();
    let route = Some(RelayRoute {
        addr: relay_addr,
        handle: H_B,
    });
    relay_path::set_path(&peer_of(&a, 2), PathKind::Relay, route);
    let mut sink = Collect::default();
    send_all(&mut a, &[ipv4_udp(IP_A, IP_B, b"x")]);
    relay(&mut a, &mut b, H_B, H_A, &mut sink);
    let out = take(&mut b);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].0, &out[0].1[..4]),
        (relay_addr, &[0xE2, 0, 0x0A, 0x0A][..])
    );
    assert_eq!(
        state(&b, 1),
        (
            Some(EP_A.parse().unwrap()),
            PathKind::Direct,
            Some(RelayRoute {
                addr: relay_addr,
                handle: H_A
            })
        )
    );
}

/// The attacker: forged relay frames from a non-relay address or with a wrong handle,
/// carrying a replayed WireGuard message or garbage, change no state (no endpoint, relay
/// route or path change) and are counted; a relay frame that fails authentication never
/// sets `relay`; a truncated frame is counted as malformed.
#[test]
fn forged_relay_frames_change_nothing_and_are_counted() {
    let (mut a, mut b) = pair(false);
    let mut sink = handshake(&mut a, &mut b, &ipv4_udp(IP_A, IP_B, b"first"));
    // A real data datagram, seen on the wire and delivered.
    send_all(&mut a, &[ipv4_udp(IP_A, IP_B, b"seen")]);
    let (_, data, _) = take(&mut a).remove(0);
    let snap_b = b.table.load_full();
    b.pipe
        .on_udp(&snap_b, a.ep, &data, None, &mut sink)
        .unwrap();
    let delivered = sink.0.len();
    let before = state(&b, 1);
    assert_eq!(before.2, None);
    let times = rx_times(&b, 1);
    let attacker: SocketAddr = "198.51.100.66:666".parse().unwrap();
    let frame = |msg: &[u8], handle: u32| {
        let mut f = msg.to_vec();
        relay_path::rewrite(&mut f, handle);
        f
    };
    // Replayed as a frame, from a non-relay address and from the "relay" with any handle.
    for (src, h) in [(attacker, H_A), (RELAY.parse().unwrap(), 0xBAD)] {
        b.pipe
            .on_udp(&snap_b, src, &frame(&data, h), None, &mut sink)
            .unwrap();
    }
    assert_eq!(b.counters.get(DropReason::Replay), 2);
    // Garbage with a valid receiver index, a forged initiation and response, a fake
    // cookie reply.
    let mut garbage = data.clone();
    garbage[16..].fill(0x5A);
    garbage[8] = garbage[8].wrapping_add(7);
    let mut init = vec![0x5Au8; 148];
    init[..4].copy_from_slice(&[1, 0, 0, 0]);
    let mut resp = vec![0x5Au8; 92];
    resp[..4].copy_from_slice(&[2, 0, 0, 0]);
    resp[8..12].copy_from_slice(&data[4..8]);
    let mut cookie = vec![0x5Au8; 64];
    cookie[..4].copy_from_slice(&[3, 0, 0, 0]);
    cookie[4..8].copy_from_slice(&data[4..8]);
    for m in [&garbage, &init, &resp, &cookie] {
        b.pipe
            .on_udp(&snap_b, attacker, &frame(m, 1), None, &mut sink)
            .unwrap();
    }
    // Truncated frames.
    for len in 1..32 {
        b.pipe
            .on_udp(&snap_b, attacker, &frame(&data, 1)[..len], None, &mut sink)
            .unwrap();
    }
    assert_eq!(state(&b, 1), before, "no endpoint, path or relay change");
    assert_eq!(rx_times(&b, 1), times);
    assert_eq!(sink.0.len(), delivered, "nothing reached the TUN");
    assert!(take(&mut b).is_empty(), "nothing answered");
    assert!(b.counters.get(DropReason::Auth) >= 2);
    assert!(b.counters.get(DropReason::RelayMalformed) >= 28);
    let total = b.counters.total();
    assert_eq!(total, 2 + 4 + 31, "every forgery counted once");
}

/// Issue 17, "handshake rate limit counted twice": every valid initiation counts once
/// against the device's limiter of [`HANDSHAKE_RATE_LIMIT`] a second. Members with valid
/// keys (the attacker here: each a configured peer, each from its own address) flood the
/// responder with initiations inside one limiter period: exactly the limit gets handshake
/// responses and no cookie; every initiation past it gets a cookie reply instead (and is
/// counted as rate limited), before any Diffie-Hellman.
///
/// No clock is involved: the limiter's count is reset only by `reset_count`, which the
/// driver's timer thread calls once a second and this test never does, so the whole
/// flood falls in one period whatever the machine's speed.
#[test]
fn handshake_rate_limit_counts_each_initiation_once() {
    use boringtun::noise::{Tunn, TunnResult};
    use tabbify_engine::core::table::HANDSHAKE_RATE_LIMIT;

    let limit = HANDSHAKE_RATE_LIMIT as usize;
    let over = 7;
    let responder_key = StaticSecret::from([3u8; 32]);
    let responder_pub = PublicKey::from(&responder_key);
    let table = Arc::new(Table::new(responder_key, 51820));
    table.set_local(LocalNets::new(["10.9.0.1".parse::<IpAddr>().unwrap()], []));
    let mut initiators = Vec::new();
    for i in 0..limit + over {
        let mut secret = [0u8; 32];
        secret[1..9].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        secret[31] = 0x41;
        let secret = StaticSecret::from(secret);
        let host = u32::try_from(i).unwrap() + 2;
        table
            .upsert_peer(PeerConfig {
                public_key: PublicKey::from(&secret).to_bytes(),
                preshared_key: None,
                endpoint: None,
                allowed_ips: vec![
                    IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a0a_0000 | host)), 32).unwrap(),
                ],
                persistent_keepalive: None,
            })
            .unwrap();
        let tunn = Tunn::new(secret, responder_pub, None, None, host, None);
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0xc633_6400 | host)), 40000);
        initiators.push((tunn, src));
    }
    let counters = Arc::new(DropCounters::default());
    let mut pipe = Pipeline::new(counters.clone(), false, true, 16);
    let snap = table.load_full();
    let (mut responses, mut cookies) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 256];
    for (i, (tunn, src)) in initiators.iter_mut().enumerate() {
        let init = match tunn.encapsulate(&[], &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("initiator {i} produced no initiation"),
        };
        assert_eq!(init[0], 1, "a handshake initiation");
        pipe.on_udp(&snap, *src, &init, None, &mut Collect::default())
            .unwrap();
        let mut out = Vec::new();
        let mut done = Vec::new();
        pipe.tx.drain(|j, s| {
            out.push((s.dst, s.buf[..s.len].to_vec()));
            done.push(j);
        });
        for j in done {
            pipe.tx.complete(j);
        }
        assert_eq!(out.len(), 1, "initiation {i}: exactly one answer");
        let (dst, answer) = &out[0];
        assert_eq!(dst, src, "answered to the sender");
        match answer[0] {
            2 => responses.push(i),
            3 => cookies.push(i),
            t => panic!("initiation {i}: answer of type {t}"),
        }
    }
    assert_eq!(
        responses,
        (0..limit).collect::<Vec<_>>(),
        "every initiation up to the limit is answered with a handshake response"
    );
    assert_eq!(
        cookies,
        (limit..limit + over).collect::<Vec<_>>(),
        "every initiation past the limit gets a cookie reply"
    );
    assert_eq!(counters.get(DropReason::RateLimited), over as u64);

    // Once the period is over (the timer thread's reset), initiations are answered again.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    snap.limiter.reset_count();
    let (tunn, src) = &mut initiators[limit];
    let init = match tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no retransmitted initiation"),
    };
    pipe.on_udp(&snap, *src, &init, None, &mut Collect::default())
        .unwrap();
    let mut types = Vec::new();
    pipe.tx.drain(|_, s| types.push(s.buf[0]));
    assert_eq!(types, vec![2], "answered after the limiter's reset");
}

/// The address of the stock WireGuard client behind B in the concentrator tests.
const IP_K: [u8; 4] = [10, 0, 0, 9];
/// Another client of B that A is not granted.
const IP_K2: [u8; 4] = [10, 0, 0, 8];

fn key(n: u8) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from([n; 32])).to_bytes()
}

/// Issue 15, the member side: B is a concentrator with client K behind it. A (a member)
/// holds B's entry with B's own rules (everything) and K's rules behind it (K may open
/// 8730 on A; A may open nothing on K). The attacker is K, or B forwarding for it: a packet
/// from K is checked against K's rules on receive, a packet to K against K's rules on
/// send, never against B's generous ones; B's own traffic still gets B's rules.
#[test]
fn a_client_behind_a_concentrator_gets_its_own_rules_both_ways() {
    let (mut a, mut b) = pair(false);
    let all = PortFilter::from_ranges(&[(0, 65535)], &[(0, 65535)]);
    let client = PortFilter::from_ranges(&[], &[(8730, 8730)]);
    a.table
        .upsert_peer_with_filters(
            PeerConfig {
                public_key: key(2),
                preshared_key: None,
                endpoint: Some(EP_B.parse().unwrap()),
                allowed_ips: vec![
                    "10.0.0.2/32".parse().unwrap(),
                    "10.0.0.9/32".parse().unwrap(),
                ],
                persistent_keepalive: None,
            },
            Some(all),
            Some(Behind::new([(
                vec![IpAddr::from(IP_K), "fd5a:1f00:9::9".parse().unwrap()],
                client,
            )])),
        )
        .unwrap();
    let ok = udp4(IP_A, IP_B, 4000, 22, b"to the concentrator itself");
    assert_eq!(handshake(&mut a, &mut b, &ok).0, vec![ok]);

    // Send side on A: to B anything, to K nothing (A may open no port on K).
    let to_b = tcp4(IP_A, IP_B, 40000, 22, SYN);
    send_all(
        &mut a,
        &[
            to_b.clone(),
            tcp4(IP_A, IP_K, 40000, 22, SYN),
            tcp4(IP_A, IP_K, 40000, 8730, SYN),
            udp4(IP_A, IP_K, 4000, 53, b"x"),
        ],
    );
    assert_eq!(a.counters.get(DropReason::FilteredOut), 3);
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert_eq!(sink_b.0, vec![to_b]);

    // Receive side on A: B forwards K's packets (B itself filters nothing towards A). K may
    // open 8730 on A and nothing else, though B may open anything.
    let k_ok = tcp4(IP_K, IP_A, 50000, 8730, SYN);
    let from_b = tcp4(IP_B, IP_A, 50000, 22, SYN);
    send_all(
        &mut b,
        &[
            tcp4(IP_K, IP_A, 50000, 22, SYN),
            k_ok.clone(),
            udp4(IP_K, IP_A, 4000, 5000, b"no"),
            ping4(IP_K, IP_A),
            from_b.clone(),
        ],
    );
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0, vec![k_ok, from_b]);
    assert_eq!(a.counters.get(DropReason::FilteredIn), 3);
    // A's reply on K's flow passes A's send side under K's rules.
    let reply = tcp4(IP_A, IP_K, 8730, 50000, SYN | ACK);
    send_all(&mut a, std::slice::from_ref(&reply));
    assert_eq!(a.counters.get(DropReason::FilteredOut), 3);
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert_eq!(
        sink_b.0.len(),
        0,
        "B does not admit K's address: it serves nobody here"
    );
    assert_eq!(b.counters.get(DropReason::DestinationNotLocal), 1);

    // Without the behind set (upsert_peer_with_filter), K's address falls back to B's rules.
    a.table
        .upsert_peer_with_filter(
            PeerConfig {
                public_key: key(2),
                preshared_key: None,
                endpoint: Some(EP_B.parse().unwrap()),
                allowed_ips: vec![
                    "10.0.0.2/32".parse().unwrap(),
                    "10.0.0.9/32".parse().unwrap(),
                ],
                persistent_keepalive: None,
            },
            Some(PortFilter::from_ranges(&[(0, 65535)], &[(0, 65535)])),
        )
        .unwrap();
    let snap = a.table.load_full();
    let e = snap.route_entry(IpAddr::from(IP_K)).unwrap();
    assert!(e.behind.is_none());
}

/// Issue 15, the concentrator side: B serves clients K and K2; A is a member granted K
/// only (with the A↔K rules: A may open 8730 and 22 on K), and B's own rules with A open
/// nothing. A's packets to K pass B by the grant and the A↔K rules (B's rules are about B,
/// not K); to K2 they are refused (not granted); to B itself B's rules apply. B forwarding K's traffic to A (as its kernel hands it back through the
/// TUN) is not held to B's rules either, while B's own packets to A are.
#[test]
fn a_concentrator_forwards_for_its_client_by_grant_not_by_its_own_rules() {
    let (mut a, mut b) = pair(false);
    a.table
        .upsert_peer(PeerConfig {
            public_key: key(2),
            preshared_key: None,
            endpoint: Some(EP_B.parse().unwrap()),
            allowed_ips: vec![
                "10.0.0.2/32".parse().unwrap(),
                "10.0.0.9/32".parse().unwrap(),
                "10.0.0.8/32".parse().unwrap(),
            ],
            persistent_keepalive: None,
        })
        .unwrap();
    let host = |a: [u8; 4]| IpNet::host(IpAddr::from(a));
    b.table.set_local(
        LocalNets::new([IpAddr::from(IP_B)], [])
            .with_grants([(key(1), host(IP_K))])
            .with_served([IpAddr::from(IP_K), IpAddr::from(IP_K2)])
            .with_client_rules([(
                key(1),
                IpAddr::from(IP_K),
                [(Proto::Both, 8730, 8730), (Proto::Both, 22, 22)],
            )]),
    );
    set_filter(&b, 1, Some(PortFilter::from_ranges(&[], &[])));
    let ok = udp4(IP_A, IP_K, 4000, 8730, b"to the client");
    assert_eq!(handshake(&mut a, &mut b, &ok).0, vec![ok.clone()]);
    assert_eq!(b.counters.total(), 0);

    let syn_k = tcp4(IP_A, IP_K, 40000, 22, SYN);
    send_all(
        &mut a,
        &[
            syn_k.clone(),
            tcp4(IP_A, IP_K2, 40000, 22, SYN),
            tcp4(IP_A, IP_B, 40000, 22, SYN),
        ],
    );
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert_eq!(sink_b.0, vec![syn_k]);
    assert_eq!(
        b.counters.get(DropReason::DestinationNotLocal),
        1,
        "K2: nobody granted it"
    );
    assert_eq!(b.counters.get(DropReason::FilteredIn), 1);

    // B's send side: K's traffic to A is forwarded; B's own is held to B's rules.
    let from_k = tcp4(IP_K, IP_A, 50000, 8730, SYN);
    send_all(
        &mut b,
        &[from_k.clone(), tcp4(IP_B, IP_A, 50000, 8730, SYN)],
    );
    assert_eq!(b.counters.get(DropReason::FilteredOut), 1);
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0, vec![from_k]);
    assert_eq!(a.counters.total(), 0);
}

/// Issue 15, the attacker is a member the client may reach (so it holds only a reply
/// grant at the concentrator B): with a valid session it opens a TCP connection and sends
/// UDP to the client: B drops both. Once the client opens a flow to it (forwarded out by
/// B, tracked), its answers on that flow pass, and nothing else does.
#[test]
fn a_member_with_a_reply_grant_cannot_open_a_flow_to_the_client() {
    let (mut a, mut b) = pair(false);
    a.table
        .upsert_peer(PeerConfig {
            public_key: key(2),
            preshared_key: None,
            endpoint: Some(EP_B.parse().unwrap()),
            allowed_ips: vec![
                "10.0.0.2/32".parse().unwrap(),
                "10.0.0.9/32".parse().unwrap(),
            ],
            persistent_keepalive: None,
        })
        .unwrap();
    b.table.set_local(
        LocalNets::new([IpAddr::from(IP_B)], [])
            .with_reply_grants([(key(1), IpNet::host(IpAddr::from(IP_K)))])
            .with_served([IpAddr::from(IP_K)]),
    );
    let hello = udp4(IP_A, IP_B, 4000, 5000, b"to B itself");
    assert_eq!(handshake(&mut a, &mut b, &hello).0, vec![hello]);
    // A opens towards K: refused at B.
    send_all(
        &mut a,
        &[
            tcp4(IP_A, IP_K, 40000, 22, SYN),
            udp4(IP_A, IP_K, 4000, 53, b"x"),
        ],
    );
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert!(sink_b.0.is_empty(), "{:?}", sink_b.0);
    assert_eq!(b.counters.get(DropReason::FilteredIn), 2);
    // K opens towards A (B's kernel hands the forwarded SYN to B's TUN side).
    let syn = tcp4(IP_K, IP_A, 50000, 8730, SYN);
    send_all(&mut b, std::slice::from_ref(&syn));
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0, vec![syn]);
    // A's answer on that flow passes B; a new connection from A still does not.
    let answer = tcp4(IP_A, IP_K, 8730, 50000, SYN | ACK);
    send_all(
        &mut a,
        &[answer.clone(), tcp4(IP_A, IP_K, 8730, 50001, SYN)],
    );
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert_eq!(sink_b.0, vec![answer]);
    assert_eq!(b.counters.get(DropReason::FilteredIn), 3);
}

/// Issue 15, the attacker is a member A with a valid session that bypasses its own filter
/// (A's engine here has no rules for B at all): the policy lets it open TCP 22 on client K
/// only. Concentrator B passes its SYN to K:22 and drops (counted `filtered_in`) its SYN to
/// K:80, UDP to K:22 and K:53 and a ping to K; a bare ACK to a port with no flow is an
/// invalid state. K's answers on the allowed flow pass B back to A, and so do the flows K
/// opens itself (its grant's business; A filters them). When the coordinator withdraws
/// the rule, B ends the flow: A's next segment on it is dropped.
#[test]
fn a_member_bypassing_its_filter_reaches_only_the_client_ports_it_may_open() {
    let (mut a, mut b) = pair(false);
    a.table
        .upsert_peer(PeerConfig {
            public_key: key(2),
            preshared_key: None,
            endpoint: Some(EP_B.parse().unwrap()),
            allowed_ips: vec![
                "10.0.0.2/32".parse().unwrap(),
                "10.0.0.9/32".parse().unwrap(),
            ],
            persistent_keepalive: None,
        })
        .unwrap();
    let granted = || {
        LocalNets::new([IpAddr::from(IP_B)], [])
            .with_grants([(key(1), IpNet::host(IpAddr::from(IP_K)))])
            .with_served([IpAddr::from(IP_K)])
    };
    b.table.set_local(granted().with_client_rules([(
        key(1),
        IpAddr::from(IP_K),
        [(Proto::Tcp, 22, 22)],
    )]));
    let hello = udp4(IP_A, IP_B, 4000, 5000, b"to B itself");
    assert_eq!(handshake(&mut a, &mut b, &hello).0, vec![hello]);

    let ssh = tcp4(IP_A, IP_K, 40000, 22, SYN);
    send_all(
        &mut a,
        &[
            ssh.clone(),
            tcp4(IP_A, IP_K, 40001, 80, SYN),
            udp4(IP_A, IP_K, 4000, 22, b"x"),
            udp4(IP_A, IP_K, 4000, 53, b"x"),
            ping4(IP_A, IP_K),
            tcp4(IP_A, IP_K, 40002, 80, ACK),
        ],
    );
    assert_eq!(a.counters.total(), 0, "A filters nothing");
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert_eq!(sink_b.0, vec![ssh]);
    assert_eq!(b.counters.get(DropReason::FilteredIn), 4);
    assert_eq!(b.counters.get(DropReason::CtInvalid), 1);

    // K answers (B's kernel hands the forwarded answer to B's TUN side), and K opens a
    // flow of its own to A: both pass B and reach A.
    let answer = tcp4(IP_K, IP_A, 22, 40000, SYN | ACK);
    let own = udp4(IP_K, IP_A, 5353, 8730, b"k's own");
    send_all(&mut b, &[answer.clone(), own.clone()]);
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0, vec![answer, own]);
    // A's next segment on its flow and its reply on K's flow pass B.
    let ack = tcp4(IP_A, IP_K, 40000, 22, ACK);
    let reply = udp4(IP_A, IP_K, 8730, 5353, b"reply");
    send_all(&mut a, &[ack.clone(), reply.clone()]);
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert_eq!(sink_b.0, vec![ack.clone(), reply]);
    assert_eq!(b.counters.get(DropReason::FilteredIn), 4);

    // The rule is withdrawn (a roster without `client_ports` for A: fail closed, the
    // grant alone opens nothing): A's flow to K:22 ends at B.
    b.table.set_local(granted());
    send_all(&mut a, &[ack, tcp4(IP_A, IP_K, 40003, 22, SYN)]);
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert!(sink_b.0.is_empty(), "{:?}", sink_b.0);
    assert_eq!(b.counters.get(DropReason::FilteredIn), 6);
}

/// The LAN behind B in the routed-traffic tests.
const LAN: [u8; 4] = [192, 168, 7, 10];

/// A's entry for B as a subnet router: B's own /32 plus `lan`, A's rules with B (A may
/// open port 22 on B, nothing else), and `lan` routed through B (`core::behind`).
fn router_entry(a: &Node, lan: IpNet) {
    a.table
        .upsert_peer_with_filters(
            PeerConfig {
                public_key: key(2),
                preshared_key: None,
                endpoint: Some(EP_B.parse().unwrap()),
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap(), lan],
                persistent_keepalive: None,
            },
            Some(PortFilter::from_ranges(&[(22, 22)], &[])),
            Some(Behind::new([]).with_routed([lan])),
        )
        .unwrap();
}

/// Issue 15, routed traffic: A may use B's route 192.168.7.0/24 and its ULA rule with B is
/// `tag:router:22` only. Routes carry all traffic: A reaches LAN port 80 through B (A's
/// routed filter, B's grant and route filter, not the member↔router rules), and the LAN
/// host's answers come back; A still reaches B itself only on 22. The attacker is the LAN
/// (or B): a LAN host opening a flow to A is dropped at B, and when B is malicious and
/// forwards it anyway, at A. A member without the grant is still refused at B.
#[test]
fn routed_traffic_is_not_held_to_the_member_router_port_rules() {
    let (mut a, mut b) = pair(false);
    let lan: IpNet = "192.168.7.0/24".parse().unwrap();
    router_entry(&a, lan);
    let own = || LocalNets::new([IpAddr::from(IP_B)], []);
    b.table.set_local(own().with_grants([(key(1), lan)]));
    // B's rules with A: A may open 22 on B, B nothing on A.
    set_filter(&b, 1, Some(PortFilter::from_ranges(&[], &[(22, 22)])));
    let ssh = tcp4(IP_A, IP_B, 40000, 22, SYN);
    assert_eq!(handshake(&mut a, &mut b, &ssh).0, vec![ssh]);

    // A → LAN:80 and LAN UDP pass both ends; A → B:80 is refused at A.
    let web = tcp4(IP_A, LAN, 40001, 80, SYN);
    let dns = udp4(IP_A, LAN, 4000, 53, b"q");
    send_all(
        &mut a,
        &[web.clone(), dns.clone(), tcp4(IP_A, IP_B, 40002, 80, SYN)],
    );
    assert_eq!(a.counters.get(DropReason::FilteredOut), 1);
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert_eq!(sink_b.0, vec![web, dns]);
    assert_eq!(b.counters.total(), 0);

    // The LAN host answers (B's kernel hands the answers to B's TUN side): they pass.
    let answer = tcp4(LAN, IP_A, 80, 40001, SYN | ACK);
    let dns_answer = udp4(LAN, IP_A, 53, 4000, b"a");
    // The LAN host opens its own flows to A: B refuses them (replies only).
    send_all(
        &mut b,
        &[
            answer.clone(),
            dns_answer.clone(),
            tcp4(LAN, IP_A, 50000, 22, SYN),
            udp4(LAN, IP_A, 5000, 4000, b"x"),
        ],
    );
    assert_eq!(b.counters.get(DropReason::FilteredOut), 2);
    assert_eq!(b.counters.get(DropReason::CtInvalid), 0);
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0, vec![answer, dns_answer]);
    assert_eq!(a.counters.total(), 1, "only A's own refusal so far");

    // B turns malicious: no grants (so no route filter) and no rules for A; it forwards
    // LAN-opened flows to A. A drops them: the routed filter admits replies only.
    b.table.set_local(own());
    set_filter(&b, 1, None);
    send_all(
        &mut b,
        &[
            tcp4(LAN, IP_A, 50001, 22, SYN),
            udp4(LAN, IP_A, 5001, 4000, b"x"),
            ping4(LAN, IP_A),
        ],
    );
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert!(sink_a.0.is_empty(), "{:?}", sink_a.0);
    assert_eq!(a.counters.get(DropReason::FilteredIn), 3);

    // A member without the grant (here A, once the grant goes to someone else) is refused
    // at B whatever its routed filter lets out.
    b.table.set_local(own().with_grants([([9u8; 32], lan)]));
    send_all(&mut a, &[tcp4(IP_A, LAN, 40003, 80, SYN)]);
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert!(sink_b.0.is_empty());
    assert_eq!(b.counters.get(DropReason::DestinationNotGranted), 1);
}

/// Ports on a routed prefix (`192.168.7.0/24:tcp:443`): B grants A the LAN on TCP 443
/// only. The attacker is A, a member with a valid session that bypasses its own routed
/// filter (its entry for B routes the LAN for all traffic): B still delivers only SYNs to
/// port 443 and drops the rest (`filtered_in`), UDP and ping included. An honest A with
/// the port-limited routed filter drops them itself (`filtered_out`). Another peer's
/// all-traffic grant for the same LAN does not widen A's.
#[test]
fn a_port_limited_route_is_enforced_at_the_router_against_a_member_bypassing_its_filter() {
    use tabbify_engine::core::filter::Proto;
    let (mut a, mut b) = pair(false);
    let lan: IpNet = "192.168.7.0/24".parse().unwrap();
    // A's side, malicious: the LAN routed for all traffic (its own filter opens anything).
    router_entry(&a, lan);
    let own = || LocalNets::new([IpAddr::from(IP_B)], []);
    b.table.set_local(own().with_route_grants(
        [([9u8; 32], lan)],
        [(key(1), lan, vec![(Proto::Tcp, 443, 443)])],
    ));
    set_filter(&b, 1, Some(PortFilter::from_ranges(&[], &[(22, 22)])));
    let ssh = tcp4(IP_A, IP_B, 40000, 22, SYN);
    assert_eq!(handshake(&mut a, &mut b, &ssh).0, vec![ssh]);

    let web = tcp4(IP_A, LAN, 40001, 443, SYN);
    send_all(
        &mut a,
        &[
            web.clone(),
            tcp4(IP_A, LAN, 40002, 22, SYN),
            udp4(IP_A, LAN, 4000, 443, b"q"),
            ping4(IP_A, LAN),
        ],
    );
    assert_eq!(a.counters.total(), 0, "A filters nothing of its own");
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert_eq!(sink_b.0, vec![web], "only TCP 443 reaches the LAN");
    assert_eq!(b.counters.get(DropReason::FilteredIn), 3);
    // The LAN host's answer to the allowed flow goes back; its own SYN to A does not.
    let answer = tcp4(LAN, IP_A, 443, 40001, SYN | ACK);
    send_all(&mut b, &[answer.clone(), tcp4(LAN, IP_A, 50000, 22, SYN)]);
    assert_eq!(b.counters.get(DropReason::FilteredOut), 1);
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0, vec![answer]);

    // An honest A: the routed filter of the port-limited prefix drops the rest at A.
    a.table
        .upsert_peer_with_filters(
            PeerConfig {
                public_key: key(2),
                preshared_key: None,
                endpoint: Some(EP_B.parse().unwrap()),
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap(), lan],
                persistent_keepalive: None,
            },
            Some(PortFilter::from_ranges(&[(22, 22)], &[])),
            Some(Behind::new([]).with_routed_ports([(lan, vec![(Proto::Tcp, 443, 443)])])),
        )
        .unwrap();
    let before = a.counters.get(DropReason::FilteredOut);
    send_all(
        &mut a,
        &[
            tcp4(IP_A, LAN, 40003, 443, SYN),
            tcp4(IP_A, LAN, 40004, 80, SYN),
            ping4(IP_A, LAN),
        ],
    );
    assert_eq!(a.counters.get(DropReason::FilteredOut), before + 2);
    let mut sink_b = Collect::default();
    deliver(&mut a, &mut b, &mut sink_b);
    assert_eq!(sink_b.0.len(), 1);
}

/// Route-only visibility: A's rules with B are empty (A may open nothing on B); the route
/// still carries everything to the LAN, and B itself stays closed. For an exit node's
/// default route, B's own address inside `0.0.0.0/0` keeps B's rules.
#[test]
fn route_only_visibility_reaches_the_lan_and_not_the_router() {
    let (mut a, mut b) = pair(false);
    let default: IpNet = "0.0.0.0/0".parse().unwrap();
    a.table
        .upsert_peer_with_filters(
            PeerConfig {
                public_key: key(2),
                preshared_key: None,
                endpoint: Some(EP_B.parse().unwrap()),
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap(), default],
                persistent_keepalive: None,
            },
            Some(PortFilter::from_ranges(&[], &[])),
            Some(Behind::new([]).with_routed([default])),
        )
        .unwrap();
    b.table
        .set_local(LocalNets::new([IpAddr::from(IP_B)], []).with_grants([(key(1), default)]));
    set_filter(&b, 1, Some(PortFilter::from_ranges(&[], &[])));
    let out = udp4(IP_A, [198, 51, 100, 7], 4000, 443, b"to the internet");
    assert_eq!(handshake(&mut a, &mut b, &out).0, vec![out]);
    send_all(
        &mut a,
        &[
            tcp4(IP_A, IP_B, 40000, 22, SYN),
            udp4(IP_A, IP_B, 4000, 53, b"x"),
        ],
    );
    assert_eq!(
        a.counters.get(DropReason::FilteredOut),
        2,
        "B itself: B's rules"
    );
    // B's own packets to A are held to B's rules, not the route filter.
    send_all(&mut b, &[tcp4(IP_B, IP_A, 50000, 22, SYN)]);
    assert_eq!(b.counters.get(DropReason::FilteredOut), 1);
    let answer = udp4([198, 51, 100, 7], IP_A, 443, 4000, b"back");
    send_all(&mut b, std::slice::from_ref(&answer));
    let mut sink_a = Collect::default();
    deliver(&mut b, &mut a, &mut sink_a);
    assert_eq!(sink_a.0, vec![answer]);
}
