//! Fuzz the edge's client-side request scanner (`tabbify_edge::inbound`): a client's byte
//! stream fed whole and fed in pieces (the first input byte picks the piece size) must never
//! panic and must give the same outcome both ways: the same bytes handed on, the same refusal,
//! the same number of request heads. Bytes are only ever handed on in order, unchanged: what
//! is handed on is a prefix of the input.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tabbify_edge::inbound::{feed_all, Inbound, InboundLimits};

fn limits() -> InboundLimits {
    InboundLimits {
        max_head: 2048,
        max_headers: 16,
        request_timeout: Some(Duration::from_secs(60)),
        min_body_rate: 0,
        rate_window: Duration::from_secs(1),
        rate_grace: Duration::from_secs(1),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(ctl).max(1);
    let now = Instant::now();

    let mut whole = Inbound::new(limits());
    let (out_whole, cut_whole) = feed_all(&mut whole, now, input);

    let mut pieces = Inbound::new(limits());
    let mut out_pieces = Vec::new();
    let mut cut_pieces = None;
    for piece in input.chunks(step) {
        let (out, cut) = feed_all(&mut pieces, now, piece);
        out_pieces.extend(out);
        if cut.is_some() {
            cut_pieces = cut;
            break;
        }
    }
    assert_eq!(cut_whole, cut_pieces);
    assert_eq!(whole.heads(), pieces.heads());
    // A head held when the input ran out is not handed on in either feeding.
    assert_eq!(out_whole, out_pieces);
    assert!(input.starts_with(&out_whole));
    // The deadline logic must not panic either, at any time.
    let _ = whole.check(now + Duration::from_secs(u64::from(ctl)));
});
