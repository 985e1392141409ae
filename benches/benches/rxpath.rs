//! The receive data path from encrypted GRO buffer to TUN write buffers, for instruction
//! counts: `Pipeline::on_udp` of 44-datagram GRO buffers (freshly encrypted, counters
//! increasing) into the drivers' coalescing `RxSink` (virtio header, USO), then every
//! write buffer yielded and the sink cleared, as the driver does per batch.
//!
//! A plain `main` with a fixed amount of work, so that callgrind counts the same work on
//! two builds (instructions per byte = the count / the inner bytes it prints):
//!
//! ```text
//! cargo bench -p tabbify-benches --bench rxpath --no-run
//! valgrind --tool=callgrind --toggle-collect='*rx_batch*' target/release/deps/rxpath-… tcp 50
//! ```
//!
//! Arguments: `tcp` (1420-byte TCP/IPv4 segments of one flow, coalesced by TCP GRO), `tcp6`
//! (the same over IPv6), `udp` (1400-byte UDP/IPv4 datagrams of one flow, coalesced by UDP
//! GRO), the number of batches (default 200), and optionally `push`: the sink then offers
//! no room to decrypt into, so every packet is decrypted into the pipeline's scratch and
//! copied into the coalescer (the path before decrypt-in-place), for an A/B in one binary.
//! Without valgrind it prints the wall time per byte too (noisy on a shared machine: quote
//! the instruction counts).

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::TunnResult;
use boringtun::x25519::{PublicKey, StaticSecret};
use tabbify_benches::{MSS, TCP_HDR};
use tabbify_engine::core::counters::DropCounters;
use tabbify_engine::core::local::LocalNets;
use tabbify_engine::core::net::IpNet;
use tabbify_engine::core::offload;
use tabbify_engine::core::offload::testkit::SuperPacket;
use tabbify_engine::core::peer::{Peer, PeerConfig};
use tabbify_engine::core::pipeline::{Pipeline, TunSink};
use tabbify_engine::core::rxsink::RxSink;
use tabbify_engine::core::table::{Snapshot, Table};
use tabbify_engine::core::wire::{protocol, tcp, Ipv4Repr};

/// Datagrams per GRO receive.
const BATCH: usize = 44;
/// WireGuard data-message overhead.
const WG_OVERHEAD: usize = 32;

struct Node {
    table: Arc<Table>,
    pipe: Pipeline,
    counters: Arc<DropCounters>,
    ep: SocketAddr,
}

fn node(
    me: [u8; 32],
    peer: [u8; 32],
    peer_ep: &str,
    allowed: &[&str],
    own: &[&str],
    ep: &str,
) -> Node {
    let table = Arc::new(Table::new(StaticSecret::from(me), 51820));
    table.set_local(LocalNets::new(
        own.iter().map(|a| a.parse::<IpAddr>().expect("address")),
        [],
    ));
    table
        .upsert_peer(PeerConfig {
            public_key: PublicKey::from(&StaticSecret::from(peer)).to_bytes(),
            preshared_key: None,
            endpoint: Some(peer_ep.parse().expect("endpoint")),
            allowed_ips: allowed
                .iter()
                .map(|a| a.parse::<IpNet>().expect("prefix"))
                .collect(),
            persistent_keepalive: None,
        })
        .expect("peer");
    let counters = Arc::new(DropCounters::default());
    Node {
        table,
        pipe: Pipeline::new(counters.clone(), true, true, 64),
        counters,
        ep: ep.parse().expect("endpoint"),
    }
}

fn peer_of(snap: &Snapshot, other: [u8; 32]) -> &Arc<Peer> {
    snap.by_key(&PublicKey::from(&StaticSecret::from(other)).to_bytes())
        .expect("peer configured")
}

#[derive(Default)]
struct Count(usize);

impl TunSink for Count {
    fn push(&mut self, pkt: &[u8]) -> bool {
        self.0 += black_box(pkt).len();
        true
    }
}

/// The sink without its room to decrypt into (`TunSink::land` stays `None`): every packet
/// is copied in by `push`.
struct PushOnly<'a>(&'a mut RxSink);

impl TunSink for PushOnly<'_> {
    fn push(&mut self, pkt: &[u8]) -> bool {
        self.0.push(pkt)
    }
}

fn deliver(from: &mut Node, to: &mut Node, sink: &mut impl TunSink) {
    let mut out = Vec::new();
    let mut done = Vec::new();
    from.pipe.tx.drain(|i, s| {
        out.push((s.buf[..s.len].to_vec(), s.segment));
        done.push(i);
    });
    for i in done {
        from.pipe.tx.complete(i);
    }
    let snap = to.table.load_full();
    for (bytes, seg) in out {
        to.pipe
            .on_udp(&snap, from.ep, &bytes, Some(seg as u16), sink)
            .expect("room in the send batch");
    }
}

fn udp4(total: usize, ident: u16) -> Vec<u8> {
    let mut p = vec![0u8; total];
    Ipv4Repr {
        src: [10, 0, 0, 1].into(),
        dst: [10, 0, 0, 2].into(),
        protocol: protocol::UDP,
        payload_len: total - 20,
        ttl: 64,
        tos: 0,
        ident,
        dont_frag: true,
    }
    .emit(&mut p)
    .expect("header fits");
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// The inner packets of one batch.
fn inner(kind: &str) -> Vec<Vec<u8>> {
    match kind {
        "udp" => (0..BATCH).map(|i| udp4(1400, i as u16)).collect(),
        "tcp" | "tcp6" => {
            let payload: Vec<u8> = (0..BATCH * MSS).map(|i| (i * 7 % 251) as u8).collect();
            let (hdr, sp) = SuperPacket {
                src4: [10, 0, 0, 1].into(),
                dst4: [10, 0, 0, 2].into(),
                src6: "fd00::1".parse().expect("address"),
                dst6: "fd00::2".parse().expect("address"),
                ..tabbify_benches::tso_super_packet(kind == "tcp6", &payload, tcp::ACK)
            }
            .build();
            let mut scratch = vec![0u8; offload::MAX_PACKET];
            let mut segs = Vec::new();
            offload::split(&hdr, &sp, &mut scratch, |s| {
                segs.push(s.to_vec());
                ControlFlow::Continue(())
            })
            .expect("valid super-packet");
            assert!(segs.iter().all(|s| s.len() >= 20 + TCP_HDR + MSS));
            segs
        }
        other => panic!("unknown kind {other}: tcp, tcp6 or udp"),
    }
}

/// One receive batch as the driver handles it: `on_udp`, every write buffer, `clear`. Not
/// inlined, so that callgrind can count exactly this (`--toggle-collect='*rx_batch*'`).
#[inline(never)]
fn rx_batch(
    pipe: &mut Pipeline,
    snap: &Snapshot,
    from: SocketAddr,
    d: &[u8],
    dlen: usize,
    rx: &mut RxSink,
    push_only: bool,
) -> (usize, usize) {
    if push_only {
        pipe.on_udp(
            snap,
            from,
            black_box(d),
            Some(dlen as u16),
            &mut PushOnly(rx),
        )
    } else {
        pipe.on_udp(snap, from, black_box(d), Some(dlen as u16), rx)
    }
    .expect("room");
    let (mut writes, mut written) = (0, 0);
    rx.for_each(|w| {
        writes += 1;
        written += black_box(w).len();
    });
    rx.clear();
    (writes, written)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let kind = args.first().map_or("tcp", String::as_str);
    let batches: usize = args.get(1).map_or(200, |n| n.parse().expect("a count"));
    let push_only = args.get(2).is_some_and(|a| a == "push");
    let key_a = [1u8; 32];
    let key_b = [2u8; 32];
    let (ep_a, ep_b) = ("192.0.2.1:51820", "192.0.2.2:51820");
    let mut a = node(
        key_a,
        key_b,
        ep_b,
        &["10.0.0.2/32", "fd00::2/128"],
        &["10.0.0.1", "fd00::1"],
        ep_a,
    );
    let mut b = node(
        key_b,
        key_a,
        ep_a,
        &["10.0.0.1/32", "fd00::1/128"],
        &["10.0.0.2", "fd00::2"],
        ep_b,
    );
    // Handshake through a first packet.
    let mut first = vec![0u8; offload::VNET_HDR_LEN];
    first.extend(udp4(64, 0));
    let snap = a.table.load_full();
    a.pipe.on_tun(&snap, &mut first).expect("room");
    let mut count = Count::default();
    deliver(&mut a, &mut b, &mut count);
    deliver(&mut b, &mut a, &mut Count::default());
    deliver(&mut a, &mut b, &mut count);
    assert!(count.0 > 0, "handshake completed");

    let segs = inner(kind);
    let a_snap = a.table.load_full();
    let a_peer = peer_of(&a_snap, key_b).clone();
    let b_snap = b.table.load_full();
    let dlen = segs[0].len() + WG_OVERHEAD;
    let encrypted: Vec<Vec<u8>> = (0..batches)
        .map(|_| {
            let mut buf = vec![0u8; segs.len() * dlen];
            let mut st = a_peer.lock();
            for (s, out) in segs.iter().zip(buf.chunks_mut(dlen)) {
                match st.tunn.encapsulate(s, out) {
                    TunnResult::WriteToNetwork(p) => assert_eq!(p.len(), dlen),
                    _ => panic!("established session encrypts"),
                }
            }
            buf
        })
        .collect();
    let mut rx = RxSink::with_default_sizes(true, true);
    let mut writes = 0usize;
    let mut written = 0usize;
    let t = Instant::now();
    for d in &encrypted {
        let (n, bytes) = rx_batch(&mut b.pipe, &b_snap, a.ep, d, dlen, &mut rx, push_only);
        writes += n;
        written += bytes;
    }
    let el = t.elapsed();
    assert_eq!(b.counters.total(), 0, "no drop");
    let inner_bytes: usize = batches * segs.iter().map(Vec::len).sum::<usize>();
    println!(
        "{kind}{}: {batches} batches, {inner_bytes} inner bytes, {writes} TUN writes of {written} bytes, {:.3} ns/byte",
        if push_only { " (push)" } else { "" },
        el.as_nanos() as f64 / inner_bytes as f64
    );
}
