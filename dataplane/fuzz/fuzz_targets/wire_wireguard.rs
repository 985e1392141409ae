//! Fuzz the WireGuard message view: any accepted datagram answers every accessor, and the
//! demux fast path agrees with the view.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_engine::core::wire::wireguard::{peek_receiver_index, MessageType, WgMessage};

fuzz_target!(|data: &[u8]| {
    match WgMessage::new_checked(data) {
        Ok(m) => {
            let ty = m.message_type();
            assert_eq!(peek_receiver_index(data), m.receiver_index());
            assert_eq!(
                m.receiver_index().is_none(),
                ty == MessageType::HandshakeInit
            );
            assert_eq!(m.counter().is_some(), ty == MessageType::Data);
            let _ = (
                m.sender_index(),
                m.encrypted_payload(),
                m.plaintext_len(),
                m.macs(),
            );
            assert_eq!(m.as_bytes(), data);
        }
        Err(_) => assert_eq!(peek_receiver_index(data), None),
    }
});
