//! Stock WireGuard clients (issue 15): a phone or laptop running wg-quick or the WireGuard
//! app, reached through a **concentrator** member (`join --concentrator`).
//!
//! What it owns: the durable form of a client ([`ClientRow`], the `clients` table of
//! migration 6), the checks of a mint request ([`check_name`], [`check_endpoint`]), the
//! client's key pair ([`new_key_pair`]), its identity ([`new_identity`]), and what the
//! operator gets back: the wg-quick file ([`render_wg_quick`]) and its QR code as a PNG
//! ([`qr_png`]) and as terminal text ([`qr_terminal`]). How clients appear in rosters is the
//! registry's part ([`crate::registry::Registry::add_client`]).
//!
//! Invariants:
//! * A client's identity is [`crate::api::CLIENT_IDENTITY_PREFIX`] + a UUID v4; its peer
//!   id and ULA derive from it exactly as a member's do, and no member CN may contain `/`
//!   (refused at registration), so a member can never hold a client's identity, peer id
//!   or ULA.
//! * Only the client's public key is stored; the private key exists only in the answer to
//!   the mint request (inside the wg-quick file and its QR code).
//! * The mesh IPv4 of a client comes from the same allocator as a member's and is held in
//!   the same uniqueness table (`member_ipv4`), so members and clients never share one.
//! * Clients never go stale; they live until revoked. While their concentrator is absent
//!   (or no longer registers as one) they are absent from every roster.

use std::net::{Ipv4Addr, Ipv6Addr};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::api::{ClientInfo, CLIENT_ALLOWED_IPS, CLIENT_IDENTITY_PREFIX};

/// One client as stored (the `clients` row's body) and as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRow {
    /// Peer id, `ula::identity_peer_id(identity)`.
    pub peer_id: String,
    /// `client/<uuid>`.
    pub identity: String,
    /// Display name (unique among members and clients).
    pub display_name: String,
    /// Tags (known to the policy at mint).
    pub tags: Vec<String>,
    /// Mesh IPv4.
    pub ipv4: Ipv4Addr,
    /// WireGuard public key, standard base64.
    pub public_key: String,
    /// The concentrator's peer id.
    pub concentrator: String,
    /// Minted at, Unix seconds.
    pub created_at: u64,
}

impl ClientRow {
    /// The client's ULA.
    pub fn ula(&self) -> Ipv6Addr {
        crate::ula::identity_ula(&self.identity)
    }

    /// Whether the row is one a coordinator writes: a client identity, the id derived
    /// from it, a mesh IPv4 and a 32-byte key.
    pub fn is_sound(&self) -> bool {
        self.identity.starts_with(CLIENT_IDENTITY_PREFIX)
            && self.peer_id == crate::ula::identity_peer_id(&self.identity)
            && crate::routes::is_mesh_ipv4(self.ipv4)
            && base64::engine::general_purpose::STANDARD
                .decode(&self.public_key)
                .is_ok_and(|k| k.len() == 32)
    }

    /// The API view (no secrets).
    pub fn info(&self) -> ClientInfo {
        ClientInfo {
            id: self.peer_id.clone(),
            identity: self.identity.clone(),
            display_name: self.display_name.clone(),
            tags: self.tags.clone(),
            ula: self.ula(),
            ipv4: self.ipv4,
            public_key: self.public_key.clone(),
            concentrator: self.concentrator.clone(),
            created_at: self.created_at,
        }
    }
}

/// A fresh client identity: `client/<uuid v4>`.
pub fn new_identity() -> String {
    format!("{CLIENT_IDENTITY_PREFIX}{}", uuid::Uuid::new_v4())
}

/// Whether a certificate CN (or an insecure-mode name) may be a member's identity: never
/// one shaped like a client's (no `/` at all).
pub fn is_member_identity(cn: &str) -> bool {
    !cn.contains('/')
}

/// A fresh X25519 key pair: (private, public), standard base64.
pub fn new_key_pair() -> (String, String) {
    let secret = x25519_dalek::StaticSecret::random();
    let public = x25519_dalek::PublicKey::from(&secret);
    let b64 = base64::engine::general_purpose::STANDARD;
    (b64.encode(secret.to_bytes()), b64.encode(public.as_bytes()))
}

/// Checks a client display name: as a member's (1-64 of `A-Z a-z 0-9 . _ -`).
pub fn check_name(name: &str) -> Result<(), String> {
    crate::ca::validate_name(name)
        .map_err(|_| format!("name {name:?}: use 1-64 characters from A-Z a-z 0-9 . _ -"))
}

/// Checks an `Endpoint` for the file: `host:port` with an IPv4 address, `[IPv6]` or a DNS
/// name, and a port 1-65535. Anything else (spaces, newlines, another key) is refused, so
/// nothing but the endpoint can reach the file.
pub fn check_endpoint(s: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("endpoint {s:?}: {why}; use HOST:PORT"));
    if s.len() > 260 {
        return bad("too long");
    }
    if s.parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.port() != 0)
    {
        return Ok(());
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return bad("no port");
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !port.starts_with('+') => {}
        _ => return bad("the port is not 1-65535"),
    }
    if host.is_empty() || host.len() > 253 {
        return bad("no host");
    }
    let name_ok = host.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if !name_ok {
        return bad("the host is not an IP address or a DNS name");
    }
    Ok(())
}

/// What goes into a client's wg-quick file.
#[derive(Debug, Clone)]
pub struct WgQuick<'a> {
    /// The client.
    pub client: &'a ClientRow,
    /// Its private key, standard base64.
    pub private_key: &'a str,
    /// The concentrator's WireGuard public key, standard base64.
    pub concentrator_key: &'a str,
    /// `host:port` of the concentrator.
    pub endpoint: &'a str,
    /// The mesh DNS domain; `None`: no `DNS` line.
    pub dns_domain: Option<&'a str>,
}

/// The wg-quick file: the client's address, the concentrator as its one peer with the
/// mesh prefixes as allowed IPs, and the concentrator's mesh DNS stub.
pub fn render_wg_quick(w: &WgQuick<'_>) -> String {
    let c = w.client;
    let mut out = format!(
        "# tabbify client {} {}\n[Interface]\nPrivateKey = {}\nAddress = {}/128, {}/32\n",
        c.display_name,
        c.peer_id,
        w.private_key,
        c.ula(),
        c.ipv4
    );
    if let Some(d) = w.dns_domain {
        out.push_str(&format!("DNS = {}, {d}\n", crate::api::DNS_SERVICE_ADDR));
    }
    out.push_str(&format!(
        "\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = {CLIENT_ALLOWED_IPS}\nPersistentKeepalive = 25\n",
        w.concentrator_key, w.endpoint
    ));
    out
}

/// How many pixels per QR module in the PNG, and modules of quiet zone around it.
const PNG_SCALE: usize = 6;
const QUIET: usize = 4;

fn qr(text: &str) -> Result<qrcode::QrCode, String> {
    qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::L)
        .map_err(|e| format!("the file does not fit a QR code: {e}"))
}

/// The QR code of `text` as an 8-bit grayscale PNG (dark modules black, a white quiet
/// zone of four modules).
pub fn qr_png(text: &str) -> Result<Vec<u8>, String> {
    let code = qr(text)?;
    let w = code.width();
    let colors = code.to_colors();
    let side = (w + 2 * QUIET) * PNG_SCALE;
    let mut pixels = vec![0xffu8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c != qrcode::Color::Dark {
            continue;
        }
        let (x, y) = ((i % w + QUIET) * PNG_SCALE, (i / w + QUIET) * PNG_SCALE);
        for row in pixels[y * side..(y + PNG_SCALE) * side].chunks_mut(side) {
            row[x..x + PNG_SCALE].fill(0);
        }
    }
    let mut out = Vec::new();
    {
        let side32 = u32::try_from(side).map_err(|e| e.to_string())?;
        let mut enc = png::Encoder::new(&mut out, side32, side32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer
            .write_image_data(&pixels)
            .map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// The QR code of `text` for a terminal: two modules per character cell with Unicode half
/// blocks, light modules drawn (so it scans on a dark terminal background), with a quiet
/// zone of two modules.
pub fn qr_terminal(text: &str) -> Result<String, String> {
    let code = qr(text)?;
    let w = code.width();
    let colors = code.to_colors();
    const Q: usize = 2;
    let side = w + 2 * Q;
    // Light = drawn (true).
    let light = |x: usize, y: usize| -> bool {
        if x < Q || y < Q || x >= w + Q || y >= w + Q {
            return true;
        }
        colors[(y - Q) * w + (x - Q)] == qrcode::Color::Light
    };
    let mut out = String::new();
    for y in (0..side).step_by(2) {
        for x in 0..side {
            let top = light(x, y);
            let bottom = y + 1 < side && light(x, y + 1);
            out.push(match (top, bottom) {
                (true, true) => '█',
                (true, false) => '▀',
                (false, true) => '▄',
                (false, false) => ' ',
            });
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> ClientRow {
        let identity = new_identity();
        ClientRow {
            peer_id: crate::ula::identity_peer_id(&identity),
            identity,
            display_name: "phone1".into(),
            tags: vec!["phone".into()],
            ipv4: "100.64.3.4".parse().unwrap(),
            public_key: new_key_pair().1,
            concentrator: "00aa".into(),
            created_at: 1,
        }
    }

    /// Parses a wg-quick file into (section, key, value) triples, as wg-quick reads it.
    fn parse(text: &str) -> Vec<(String, String, String)> {
        let mut section = String::new();
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                section = line.trim_matches(['[', ']']).to_owned();
                continue;
            }
            let (k, v) = line.split_once('=').expect("key = value");
            out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
        }
        out
    }

    #[test]
    fn wg_quick_file_parses_back() {
        let c = row();
        let (private, _) = new_key_pair();
        let (_, conc) = new_key_pair();
        let text = render_wg_quick(&WgQuick {
            client: &c,
            private_key: &private,
            concentrator_key: &conc,
            endpoint: "203.0.113.7:51820",
            dns_domain: Some("mesh"),
        });
        let kv = parse(&text);
        let get = |s: &str, k: &str| {
            kv.iter()
                .find(|(a, b, _)| a == s && b == k)
                .map(|(_, _, v)| v.clone())
                .unwrap_or_else(|| panic!("{s}.{k} missing in {text}"))
        };
        assert_eq!(get("Interface", "PrivateKey"), private);
        assert_eq!(
            get("Interface", "Address"),
            format!("{}/128, {}/32", c.ula(), c.ipv4)
        );
        assert_eq!(get("Interface", "DNS"), "fd5a:1f00::53, mesh");
        assert_eq!(get("Peer", "PublicKey"), conc);
        assert_eq!(get("Peer", "Endpoint"), "203.0.113.7:51820");
        assert_eq!(
            get("Peer", "AllowedIPs"),
            "fd5a:1f00::/32, fd5a:1f02::/32, 100.64.0.0/10"
        );
        assert_eq!(get("Peer", "PersistentKeepalive"), "25");
        assert_eq!(kv.len(), 7, "{text}");
        // Each key is 32 bytes of base64; the private key is not the public one.
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(b64.decode(&private).unwrap().len(), 32);
        assert_ne!(private, c.public_key);
        // Without DNS there is no DNS line.
        let text = render_wg_quick(&WgQuick {
            dns_domain: None,
            client: &c,
            private_key: &private,
            concentrator_key: &conc,
            endpoint: "[2001:db8::1]:51820",
        });
        assert!(!text.contains("DNS"));
        assert!(parse(&text)
            .iter()
            .any(|(_, k, v)| k == "Endpoint" && v == "[2001:db8::1]:51820"));
    }

    #[test]
    fn key_pair_matches() {
        let (private, public) = new_key_pair();
        let b64 = base64::engine::general_purpose::STANDARD;
        let sk: [u8; 32] = b64.decode(private).unwrap().try_into().unwrap();
        let pk = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(sk));
        assert_eq!(b64.encode(pk.as_bytes()), public);
    }

    #[test]
    fn qr_png_is_a_png_of_the_right_size() {
        let text = render_wg_quick(&WgQuick {
            client: &row(),
            private_key: &new_key_pair().0,
            concentrator_key: &new_key_pair().1,
            endpoint: "vpn.example.com:51820",
            dns_domain: Some("mesh"),
        });
        let png = qr_png(&text).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, square, a whole number of modules with the quiet zone.
        let w = u32::from_be_bytes(png[16..20].try_into().unwrap()) as usize;
        let h = u32::from_be_bytes(png[20..24].try_into().unwrap()) as usize;
        assert_eq!(w, h);
        let modules = qr(&text).unwrap().width();
        assert_eq!(w, (modules + 2 * QUIET) * PNG_SCALE);
        assert!(modules >= 21 && (modules - 17) % 4 == 0, "{modules}");
        let term = qr_terminal(&text).unwrap();
        assert_eq!(term.lines().count(), (modules + 4).div_ceil(2));
        assert!(term.lines().all(|l| l.chars().count() == modules + 4));
    }

    #[test]
    fn endpoints_and_names_are_checked() {
        for ok in [
            "203.0.113.7:51820",
            "[2001:db8::1]:51820",
            "vpn.example.com:443",
            "host:1",
        ] {
            check_endpoint(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "host",
            "host:0",
            "host:65536",
            "host:+5",
            ":51820",
            "a b:1",
            "x:1\nPostUp = rm -rf /",
            "2001:db8::1:51820x",
            "-a.com:1",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_name("phone-1").is_ok());
        assert!(check_name("client/x").is_err() && check_name("").is_err());
        assert!(!is_member_identity(&new_identity()));
        assert!(is_member_identity("sup1"));
        let r = row();
        assert!(r.is_sound());
        assert!(!ClientRow {
            identity: "sup1".into(),
            peer_id: crate::ula::identity_peer_id("sup1"),
            ..r
        }
        .is_sound());
    }
}
