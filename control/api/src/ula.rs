//! Derived mesh addresses: peer ULAs in `fd5a:1f00::/32`, app ULAs in `fd5a:1f02::/32`.
//!
//! Addresses are derived, never allocated: the same identity or app UUID always yields the
//! same address, on the coordinator, the joiner and the edge alike, so a restart changes
//! nothing. Layout: `fdxx:xxxx` prefix, then bytes 0..6 of a blake3 digest, then `::1`.
//!
//! A member's address and peer id come from its **identity** (the CN of its mesh
//! certificate), not from its WireGuard key, so a key rotation keeps both
//! ([`identity_ula`], [`identity_peer_id`]). The identity is hashed with a domain-separation
//! prefix, so no identity can be chosen to collide with a key-derived address of the
//! earlier scheme ([`peer_ula`], [`peer_id`], kept for migration and the `ula` command).

use std::net::Ipv6Addr;

/// The /32 that holds every peer ULA.
pub const PEER_PREFIX: [u8; 4] = [0xfd, 0x5a, 0x1f, 0x00];
/// The /32 that holds every app ULA.
pub const APP_PREFIX: [u8; 4] = [0xfd, 0x5a, 0x1f, 0x02];
/// The port every app's runner binds on its app ULA.
pub const APP_PORT: u16 = 8730;

fn derive(prefix: [u8; 4], input: &[u8]) -> Ipv6Addr {
    let digest = blake3::hash(input);
    let mut octets = [0u8; 16];
    octets[..4].copy_from_slice(&prefix);
    octets[4..10].copy_from_slice(&digest.as_bytes()[..6]);
    octets[15] = 1;
    Ipv6Addr::from(octets)
}

/// The ULA the earlier scheme derived from a WireGuard public key (32 raw bytes); kept for
/// migrating state and for `tabbify-mesh ula`.
pub fn peer_ula(public_key: &[u8; 32]) -> Ipv6Addr {
    derive(PEER_PREFIX, public_key)
}

/// The ULA of the app with this UUID (hashed over its 16 raw bytes).
pub fn app_ula(app: &uuid::Uuid) -> Ipv6Addr {
    derive(APP_PREFIX, app.as_bytes())
}

/// Domain separation for identity-derived addresses and ids.
const IDENTITY_CONTEXT: &[u8] = b"tabbify-mesh peer identity v1\0";

fn identity_digest(identity: &str) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(IDENTITY_CONTEXT);
    h.update(identity.as_bytes());
    h.finalize()
}

/// The ULA of the member whose identity (certificate CN) is `identity`. Stable across
/// WireGuard key rotations.
pub fn identity_ula(identity: &str) -> Ipv6Addr {
    let digest = identity_digest(identity);
    let mut octets = [0u8; 16];
    octets[..4].copy_from_slice(&PEER_PREFIX);
    octets[4..10].copy_from_slice(&digest.as_bytes()[..6]);
    octets[15] = 1;
    Ipv6Addr::from(octets)
}

/// The peer id of the member whose identity is `identity`: 16 lowercase hex digits of
/// the same digest as [`identity_ula`] (its first 12 digits are the ULA's interface bits).
pub fn identity_peer_id(identity: &str) -> String {
    hex16(identity_digest(identity).as_bytes())
}

fn hex16(digest: &[u8; 32]) -> String {
    let mut out = String::with_capacity(16);
    for b in &digest[..8] {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    out
}

/// Whether `addr` lies in the app range `fd5a:1f02::/32`.
pub fn is_app_ula(addr: &Ipv6Addr) -> bool {
    addr.octets()[..4] == APP_PREFIX
}

/// Whether `addr` lies in the peer range `fd5a:1f00::/32`.
pub fn is_peer_ula(addr: &Ipv6Addr) -> bool {
    addr.octets()[..4] == PEER_PREFIX
}

/// The peer id of the node whose WireGuard public key is `public_key`: 16 lowercase hex
/// digits, bytes 0..8 of blake3(public key). Derived like the ULA, so it survives a
/// coordinator restart; its first 12 digits are the ULA's interface bits.
pub fn peer_id(public_key: &[u8; 32]) -> String {
    hex16(blake3::hash(public_key).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed outside this crate, with the Python `blake3` package
    // (`blake3.blake3(data).digest()[:6]`), not with the Rust implementation under test.
    #[test]
    fn peer_ula_matches_independent_vectors() {
        let cases: [([u8; 32], &str); 3] = [
            ([0u8; 32], "fd5a:1f00:2ada:83c1:819a::1"),
            (
                core::array::from_fn(|i| i as u8),
                "fd5a:1f00:e528:e957:9803::1",
            ),
            ([0xff; 32], "fd5a:1f00:9b34:f060:fbc0::1"),
        ];
        for (key, want) in cases {
            let got = peer_ula(&key);
            assert_eq!(got, want.parse::<Ipv6Addr>().unwrap(), "key {key:?}");
            assert!(is_peer_ula(&got));
            assert!(!is_app_ula(&got));
        }
    }

    #[test]
    fn app_ula_matches_independent_vectors() {
        let cases = [
            (
                "00000000-0000-0000-0000-000000000000",
                "fd5a:1f02:e572:dff8:2304::1",
            ),
            (
                "67e55044-10b1-426f-9247-bb680e5fe0c8",
                "fd5a:1f02:b8ab:49d9:7aa2::1",
            ),
        ];
        for (app, want) in cases {
            let got = app_ula(&uuid::Uuid::parse_str(app).unwrap());
            assert_eq!(got, want.parse::<Ipv6Addr>().unwrap(), "app {app}");
            assert!(is_app_ula(&got));
            assert!(!is_peer_ula(&got));
        }
    }

    #[test]
    fn peer_id_extends_the_ula_bits() {
        assert_eq!(peer_id(&[0u8; 32]).len(), 16);
        assert!(peer_id(&[0u8; 32]).starts_with("2ada83c1819a"));
        assert!(peer_id(&[0xff; 32]).starts_with("9b34f060fbc0"));
    }

    // Computed outside this crate: blake3(b"tabbify-mesh peer identity v1\0" + identity)
    // with the Python `blake3` package.
    #[test]
    fn identity_addresses_match_vectors_and_differ_from_key_ones() {
        assert_eq!(
            identity_ula("alice"),
            "fd5a:1f00:7580:22f:3035::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(identity_peer_id("alice"), "7580022f303596f8");
        assert_eq!(
            identity_ula("sup-1"),
            "fd5a:1f00:19ea:9d2b:b7c7::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(identity_peer_id("sup-1"), "19ea9d2bb7c7c3e7");
        assert!(is_peer_ula(&identity_ula("")));
        assert_ne!(identity_ula("alice"), identity_ula("alice "));
    }

    #[test]
    fn range_checks_look_only_at_the_prefix() {
        assert!(is_app_ula(&"fd5a:1f02::".parse().unwrap()));
        assert!(!is_app_ula(&"fd5a:1f03::1".parse().unwrap()));
        assert!(!is_app_ula(&"::1".parse().unwrap()));
        assert!(is_peer_ula(
            &"fd5a:1f00:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap()
        ));
    }
}
