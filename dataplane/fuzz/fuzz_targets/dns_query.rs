//! Fuzz the mesh DNS stub's input side as any local program could drive it: arbitrary
//! bytes as a UDP datagram and as a TCP message to `Zone::handle` (hickory-proto parses
//! them), and arbitrary text as the resolv.conf the upstreams are read from. Checks:
//! * no panic, whatever the bytes;
//! * every answer is a well-formed DNS response (QR set) carrying the query's id, and a
//!   UDP answer fits 512 bytes unless the query offered more with EDNS;
//! * a message that is itself a response is never answered (no ping-pong between stubs);
//! * only names under the zone's domain are answered from the zone, the rest forwarded;
//! * reverse names (PTR) of whole addresses in the mesh's spaces (`fd5a:1f00::/32`,
//!   `fd5a:1f02::/32`, `100.64.0.0/10`) are never forwarded, and a PTR answer names a
//!   name under the domain;
//! * the upstream list never holds the stub's own addresses.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::RData;
use libfuzzer_sys::fuzz_target;
use tabbify_dataplane::join::dns::host::parse_nameservers;
use tabbify_dataplane::join::dns::zone::{Member, Verdict, Zone};
use tabbify_dataplane::join::dns::{SERVICE_V4, SERVICE_V6};

fn zone() -> Zone {
    let member = |name: &str| Member {
        display_name: name.to_owned(),
        peer_id: tabbify_api::ula::identity_peer_id(name),
        ula: tabbify_api::ula::identity_ula(name),
        ipv4: Some(Ipv4Addr::new(100, 64, 0, name.len() as u8)),
    };
    Zone::new(
        Some("mesh"),
        [
            member("sup1"),
            member("SUP1"),
            member("web"),
            member("x.app"),
        ],
        [tabbify_api::ula::app_ula(&uuid::Uuid::from_u128(7))],
    )
    .with_local_apps([uuid::Uuid::from_u128(8)])
}

/// The address a whole reverse name spells, if it is in the mesh's spaces.
fn mesh_reverse(labels: &[Vec<u8>]) -> Option<IpAddr> {
    let (rest, suffix) = labels.split_last_chunk::<2>()?;
    let text: Vec<String> = rest
        .iter()
        .rev()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let addr: IpAddr = match (&suffix[0][..], &suffix[1][..]) {
        (b"ip6", b"arpa") if text.len() == 32 && text.iter().all(|l| l.len() == 1) => {
            let hex = text.concat();
            let groups: Vec<&str> = (0..8).map(|i| &hex[i * 4..i * 4 + 4]).collect();
            groups.join(":").parse().ok()?
        }
        (b"in-addr", b"arpa") if text.len() == 4 => {
            let ok = text
                .iter()
                .all(|o| o.parse::<u8>().is_ok_and(|v| v.to_string() == *o));
            if !ok {
                return None;
            }
            text.join(".").parse().ok()?
        }
        _ => return None,
    };
    let mesh = match addr {
        IpAddr::V6(a) => tabbify_api::ula::is_peer_ula(&a) || tabbify_api::ula::is_app_ula(&a),
        IpAddr::V4(a) => a.octets()[0] == 100 && (64..128).contains(&a.octets()[1]),
    };
    mesh.then_some(addr)
}

fuzz_target!(|data: &[u8]| {
    let zone = zone();
    let parsed = Message::from_vec(data).ok();
    for udp in [true, false] {
        let (verdict, _) = zone.handle(data, udp);
        match verdict {
            Verdict::Answer(bytes) => {
                let answer = Message::from_vec(&bytes).expect("our answers parse");
                assert_eq!(answer.metadata.message_type, MessageType::Response);
                assert_eq!(&bytes[..2], &data[..2], "the answer carries the query's id");
                if udp && parsed.as_ref().is_some_and(|m| m.edns.is_none()) {
                    assert!(bytes.len() <= 512, "{} bytes without EDNS", bytes.len());
                }
                if let Some(q) = &parsed {
                    assert_eq!(q.metadata.message_type, MessageType::Query);
                }
                for r in &answer.answers {
                    if let RData::PTR(p) = &r.data {
                        let last = p.0.iter().last().map(<[u8]>::to_ascii_lowercase);
                        assert_eq!(last.as_deref(), Some(&b"mesh"[..]), "PTR to {}", p.0);
                    }
                }
            }
            Verdict::Forward { id } => {
                let q = parsed.as_ref().expect("only parsed queries are forwarded");
                assert_eq!(q.metadata.id, id);
                let last = q.queries[0]
                    .name()
                    .iter()
                    .last()
                    .map(<[u8]>::to_ascii_lowercase);
                assert_ne!(
                    last.as_deref(),
                    Some(&b"mesh"[..]),
                    "a mesh name was forwarded"
                );
                let labels: Vec<Vec<u8>> = q.queries[0]
                    .name()
                    .iter()
                    .map(<[u8]>::to_ascii_lowercase)
                    .collect();
                assert_eq!(
                    mesh_reverse(&labels),
                    None,
                    "a mesh reverse name was forwarded"
                );
            }
            Verdict::Drop => {}
        }
    }
    let own = [IpAddr::V6(SERVICE_V6), IpAddr::V4(SERVICE_V4)];
    for up in parse_nameservers(&String::from_utf8_lossy(data), &own) {
        assert!(!own.contains(&up.ip()) && up.port() == 53);
        assert_ne!(up.ip(), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
});
