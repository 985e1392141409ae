//! Fuzz the relay-frame header restore (`core::path::restore`): it never panics; what it
//! accepts is exactly what the demux calls a relay frame (and fits the scratch buffer); the
//! restored message rewritten with the same handle gives back the frame byte for byte; and
//! the restored bytes pass through the WireGuard message view without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::demux::{classify, Kind};
use tabbify_engine::core::path::{restore, rewrite, FrameError};
use tabbify_engine::core::wire::wireguard::WgMessage;

fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; 2048];
    match restore(data, &mut out) {
        Ok((handle, n)) => {
            assert_eq!(classify(data), Kind::RelayFrame);
            assert_eq!(n, data.len());
            assert!(handle <= 0x00FF_FFFF);
            assert_eq!(&out[1..4], &[0, 0, 0]);
            if let Ok(m) = WgMessage::new_checked(&out[..n]) {
                let _ = (m.receiver_index(), m.counter(), m.macs());
            }
            let mut again = out[..n].to_vec();
            rewrite(&mut again, handle);
            assert_eq!(again, data);
        }
        Err(FrameError::TooLarge) => assert!(data.len() > out.len()),
        Err(FrameError::NotAFrame) => assert_ne!(classify(data), Kind::RelayFrame),
    }
});
