//! Fuzz the edge's HTTP/1.1 response codec (`tabbify_edge::wire`): a response head and its
//! body, fed whole and fed in pieces (the first input byte picks the piece size and whether
//! the request was HEAD), must never panic and must give the same outcome both ways: the
//! same status, framing and keep-alive, the same body bytes, the same error.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tabbify_edge::wire::{parse_response, Decoder, CodecError};

/// What one feeding produced.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    NeedMore,
    Error(CodecError),
    Response {
        status: u16,
        keep_alive: bool,
        body: Vec<u8>,
        end: Result<(), CodecError>,
    },
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let head_request = ctl & 0x80 != 0;
    let step = usize::from(ctl & 0x7f).max(1);
    let whole = feed(input, input.len().max(1), head_request);
    let pieces = feed(input, step, head_request);
    assert_eq!(whole, pieces);
});

fn feed(input: &[u8], step: usize, head_request: bool) -> Outcome {
    let mut buf = BytesMut::new();
    let mut chunks = input.chunks(step);
    let head = loop {
        match parse_response(&mut buf, head_request) {
            Ok(Some(head)) => break head,
            Ok(None) => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => return Outcome::NeedMore,
            },
            Err(e) => return Outcome::Error(e),
        }
    };
    let mut decoder = Decoder::new(head.framing);
    let mut body = Vec::new();
    let end = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(piece)) => body.extend_from_slice(&piece),
            Ok(None) if decoder.is_done() => break Ok(()),
            Ok(None) => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => break decoder.eof(),
            },
            Err(e) => break Err(e),
        }
    };
    Outcome::Response {
        status: head.status.as_u16(),
        keep_alive: head.keep_alive,
        body,
        end,
    }
}
