//! Fuzz the relay's wire formats (`tabbify_relay::proto`) and the registry's forwarding
//! decision: no input panics; every control datagram and stream record that parses encodes
//! back to the same bytes; a WireGuard message survives `wg_to_frame` → `frame_to_wg`
//! unchanged; the record splitter never claims more bytes than it was given; the chunked
//! stream reader (`RecordBuf`) fed the input in pieces yields exactly the records the
//! splitter finds; a datagram the registry forwards carries the source session's handle.
#![no_main]

use std::net::SocketAddr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use tabbify_relay::proto::{self, Control, Kind, Msg};
use tabbify_relay::server::core::{Deliver, Limits, Registry};

fuzz_target!(|data: &[u8]| {
    let kind = proto::classify(data);
    if let Ok(c) = Control::parse(data) {
        assert_eq!(c.encode(), data);
    }
    if let Ok(m) = Msg::parse(data) {
        let mut v = Vec::new();
        m.encode_record(&mut v).expect("a parsed record re-encodes");
        let (rec, used) = proto::split_record(&v).expect("one whole record");
        assert_eq!(used, v.len());
        assert_eq!(rec, data);
        assert_eq!(Msg::parse(rec).expect("re-parses"), m);
    }
    let mut rest = data;
    while let Some((rec, used)) = proto::split_record(rest) {
        assert!(used <= rest.len() && rec.len() + 2 == used);
        let _ = Msg::parse(rec);
        rest = &rest[used..];
    }
    // The chunked reader: pieces of a size taken from the first byte, same records.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut rb = proto::RecordBuf::new();
    let mut chunked: Vec<Vec<u8>> = Vec::new();
    for piece in data.chunks(step) {
        let sp = rb.spare();
        sp[..piece.len()].copy_from_slice(piece);
        rb.filled(piece.len());
        while let Some(r) = rb.next_record() {
            chunked.push(r.to_vec());
        }
    }
    let mut whole: Vec<Vec<u8>> = Vec::new();
    let mut rest = data;
    while let Some((rec, used)) = proto::split_record(rest) {
        whole.push(rec.to_vec());
        rest = &rest[used..];
    }
    assert_eq!(chunked, whole);
    assert_eq!(rb.pending(), rest.len());
    if kind == Kind::WireGuard {
        let mut f = data.to_vec();
        proto::wg_to_frame(&mut f, 0x00AB_CDEF).expect("WireGuard converts");
        assert_eq!(proto::classify(&f), Kind::RelayFrame);
        assert_eq!(proto::frame_to_wg(&mut f), Ok(0x00AB_CDEF));
        assert_eq!(f, data);
    }
    // The forwarding decision on the datagram as a frame from a bound session.
    let now = Instant::now();
    let mut reg: Registry<u8> = Registry::new(Limits::default());
    let a = reg
        .open([1; 32], "a", [1; 16], false, 1, now)
        .expect("room");
    let b = reg
        .open([2; 32], "b", [2; 16], false, 2, now)
        .expect("room");
    let from: SocketAddr = ([127, 0, 0, 1], 1).into();
    reg.bind(from, a.handle, &[1; 16], now).expect("bind");
    let mut f = data.to_vec();
    match reg.forward_udp(from, &mut f, now) {
        Ok(d) => {
            assert_eq!(kind, Kind::RelayFrame);
            assert_eq!(proto::frame_header(&f).expect("frame").1, a.handle);
            assert_eq!(&f[4..], &data[4..]);
            let dst = proto::frame_header(data).expect("frame").1;
            if dst == b.handle {
                assert_eq!(d, Deliver::Stream(2));
            } else {
                assert_eq!((dst, d), (a.handle, Deliver::Udp(from)));
            }
        }
        Err(_) => assert_eq!(f, data, "a dropped datagram is not modified"),
    }
});
