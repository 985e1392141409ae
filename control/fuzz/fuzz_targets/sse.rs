//! Fuzz the roster stream's decoding (`tabbify_api::sse`): the bytes after the first, fed
//! whole and fed in pieces (the first byte picks the piece size), must give the same frames;
//! no input panics; every frame that parses as an event renders back to a frame that decodes
//! and parses to the same event. A small event limit (the second byte, in 16-byte steps)
//! exercises the size cap: whole and piecewise feeding refuse the same inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_api::{SseDecoder, SseEvent};

fuzz_target!(|data: &[u8]| {
    let Some((&piece, rest)) = data.split_first() else {
        return;
    };
    let Some((&limit, wire)) = rest.split_first() else {
        return;
    };
    let limit = if limit == 0 {
        tabbify_api::MAX_EVENT_BYTES
    } else {
        usize::from(limit) * 16
    };
    let whole = SseDecoder::with_limit(limit).feed(wire);
    let mut dec = SseDecoder::with_limit(limit);
    let mut pieces = Ok(Vec::new());
    for chunk in wire.chunks(usize::from(piece).max(1)) {
        match dec.feed(chunk) {
            Ok(f) => {
                if let Ok(p) = &mut pieces {
                    p.extend(f);
                }
            }
            Err(e) => {
                pieces = Err(e);
                break;
            }
        }
    }
    assert_eq!(
        whole.is_err(),
        pieces.is_err(),
        "piecewise feeding changed whether the limit was passed"
    );
    let (Ok(whole), Ok(pieces)) = (whole, pieces) else {
        return;
    };
    assert_eq!(whole, pieces, "piecewise feeding changed the frames");
    for frame in &whole {
        let Ok(event) = SseEvent::parse(&frame.event, &frame.data) else {
            continue;
        };
        let again = SseDecoder::new()
            .feed(event.to_frame(7).as_bytes())
            .expect("a rendered event is within the default limit");
        assert_eq!(again.len(), 1, "a rendered event is one frame");
        assert_eq!(again[0].id.as_deref(), Some("7"));
        let back = SseEvent::parse(&again[0].event, &again[0].data).expect("rendered event parses");
        assert_eq!(back, event);
    }
});
