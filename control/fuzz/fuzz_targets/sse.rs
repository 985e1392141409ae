//! Fuzz the roster stream's decoding (`tabbify_api::sse`): the bytes after the first, fed
//! whole and fed in pieces (the first byte picks the piece size), must give the same frames;
//! no input panics; every frame that parses as an event renders back to a frame that decodes
//! and parses to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_api::{SseDecoder, SseEvent};

fuzz_target!(|data: &[u8]| {
    let Some((&piece, wire)) = data.split_first() else {
        return;
    };
    let whole = SseDecoder::new().feed(wire);
    let mut dec = SseDecoder::new();
    let mut pieces = Vec::new();
    for chunk in wire.chunks(usize::from(piece).max(1)) {
        pieces.extend(dec.feed(chunk));
    }
    assert_eq!(whole, pieces, "piecewise feeding changed the frames");
    for frame in &whole {
        let Ok(event) = SseEvent::parse(&frame.event, &frame.data) else {
            continue;
        };
        let again = SseDecoder::new().feed(event.to_frame(7).as_bytes());
        assert_eq!(again.len(), 1, "a rendered event is one frame");
        assert_eq!(again[0].id.as_deref(), Some("7"));
        let back = SseEvent::parse(&again[0].event, &again[0].data).expect("rendered event parses");
        assert_eq!(back, event);
    }
});
