//! Fuzz the STUN codec (`tabbify_api::stun`): no input panics; a datagram that parses is one
//! `looks_like_stun` accepts; the server's answer (when there is one) parses, has a correct
//! FINGERPRINT and the request's transaction id, and a Binding success names the source.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tabbify_api::stun::{self, Class};

fuzz_target!(|data: &[u8]| {
    let parsed = stun::parse(data);
    if parsed.is_ok() {
        assert!(stun::looks_like_stun(data));
    }
    let sources: [SocketAddr; 2] = [
        SocketAddr::from(([198, 51, 100, 7], 40000)),
        SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 5], 51820)),
    ];
    for source in sources {
        match stun::answer(data, source) {
            Err(_) => assert!(parsed.is_err()),
            Ok(None) => {}
            Ok(Some(reply)) => {
                let req = parsed.expect("an answered datagram parses");
                assert!(reply.len() <= stun::MAX_MESSAGE_LEN);
                let m = stun::parse(&reply).expect("our answer parses");
                assert!(m.fingerprint);
                assert_eq!(m.transaction_id, req.transaction_id);
                match m.class {
                    Class::SuccessResponse => {
                        assert_eq!(m.binding_success_for(&req.transaction_id), Some(source))
                    }
                    Class::ErrorResponse => assert!(m.error_code.is_some()),
                    _ => panic!("answer of class {:?}", m.class),
                }
            }
        }
    }
});
