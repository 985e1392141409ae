//! Derived mesh addresses: peer ULAs in `fd5a:1f00::/32`, app ULAs in `fd5a:1f02::/32`.
//!
//! Addresses are derived, never allocated: the same key or app UUID always yields the same
//! address, on the coordinator, the joiner and the edge alike, so a restart changes nothing.
//! Layout: `fdxx:xxxx` prefix, then bytes 0..6 of a blake3 digest, then `::1`.

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

/// The ULA of the peer whose WireGuard public key is `public_key` (32 raw bytes).
pub fn peer_ula(public_key: &[u8; 32]) -> Ipv6Addr {
    derive(PEER_PREFIX, public_key)
}

/// The ULA of the app with this UUID (hashed over its 16 raw bytes).
pub fn app_ula(app: &uuid::Uuid) -> Ipv6Addr {
    derive(APP_PREFIX, app.as_bytes())
}

/// Whether `addr` lies in the app range `fd5a:1f02::/32`.
pub fn is_app_ula(addr: &Ipv6Addr) -> bool {
    addr.octets()[..4] == APP_PREFIX
}

/// Whether `addr` lies in the peer range `fd5a:1f00::/32`.
pub fn is_peer_ula(addr: &Ipv6Addr) -> bool {
    addr.octets()[..4] == PEER_PREFIX
}
