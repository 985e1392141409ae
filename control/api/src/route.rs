//! IP prefixes of subnet routes and exit nodes: the canonical text form
//! (`"10.1.0.0/16"`, `"fd00:1::/64"`), containment and overlap, CIDR subtraction, and the
//! rule for what a member may advertise ([`check_advertised`]).
//!
//! Invariant: a [`Prefix`] is canonical — its host bits are zero and its length fits the
//! family — so two prefixes are equal exactly when they cover the same addresses, and
//! `to_string()` gives back the one accepted text form. The parser accepts nothing else
//! (no host bits, no leading zeros in the length, no brackets, no zone).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The IPv4 default route, what an exit node offers with [`DEFAULT_V6`].
pub const DEFAULT_V4: Prefix = Prefix {
    addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    len: 0,
};
/// The IPv6 default route.
pub const DEFAULT_V6: Prefix = Prefix {
    addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    len: 0,
};
/// The mesh IPv4 space (CGNAT, as Tailscale): every member's `ipv4` is in it.
pub const MESH_V4: Prefix = Prefix {
    addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)),
    len: 10,
};
/// The mesh's IPv6 space: member ULAs (`fd5a:1f00::/32`), app ULAs (`fd5a:1f02::/32`)
/// and whatever the mesh may take next; no advertisement may overlap it.
pub const MESH_V6: Prefix = Prefix {
    addr: IpAddr::V6(Ipv6Addr::new(0xfd5a, 0x1f00, 0, 0, 0, 0, 0, 0)),
    len: 24,
};

/// A canonical IP prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why a prefix text was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixError(pub String);

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PrefixError {}

fn bits(a: IpAddr) -> (u128, u8) {
    match a {
        IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
        IpAddr::V6(v) => (u128::from(v), 128),
    }
}

fn mask(len: u8, width: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    (u128::MAX << (128 - u32::from(len))) >> (128 - u32::from(width))
}

fn from_bits(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

impl Prefix {
    /// The prefix of `addr` with length `len`; `None` when `len` is too long for the
    /// family or a host bit is set.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let (v, width) = bits(addr);
        if len > width || v & !mask(len, width) != 0 {
            return None;
        }
        Some(Self { addr, len })
    }

    /// The /32 or /128 of one address.
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether it is a default route (`/0`).
    pub fn is_default(&self) -> bool {
        self.len == 0
    }

    /// Whether it is IPv4.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether every address of `other` is in `self` (same family only).
    pub fn contains(&self, other: &Prefix) -> bool {
        if self.is_ipv4() != other.is_ipv4() || other.len < self.len {
            return false;
        }
        let (a, w) = bits(self.addr);
        let (b, _) = bits(other.addr);
        b & mask(self.len, w) == a
    }

    /// Whether `addr` is in the prefix.
    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        self.contains(&Prefix::host(addr))
    }

    /// Whether the two share an address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.contains(other) || other.contains(self)
    }

    /// The common part of two prefixes (the longer one when one contains the other).
    pub fn intersect(&self, other: &Prefix) -> Option<Prefix> {
        if self.contains(other) {
            Some(*other)
        } else if other.contains(self) {
            Some(*self)
        } else {
            None
        }
    }

    /// The two halves (`None` for a /32 or /128).
    pub fn halves(&self) -> Option<(Prefix, Prefix)> {
        let (v, w) = bits(self.addr);
        if self.len >= w {
            return None;
        }
        let len = self.len + 1;
        let high = v | (1u128 << (w - len));
        let v4 = self.is_ipv4();
        Some((
            Prefix {
                addr: self.addr,
                len,
            },
            Prefix {
                addr: from_bits(high, v4),
                len,
            },
        ))
    }

    /// `self` minus `other`, as the fewest prefixes (at most one per bit of length
    /// difference), sorted.
    pub fn subtract(&self, other: &Prefix) -> Vec<Prefix> {
        if other.contains(self) {
            return Vec::new();
        }
        if !self.contains(other) {
            return vec![*self];
        }
        let mut out = Vec::new();
        let mut cur = *self;
        // `other` is strictly inside `cur`: keep the half that misses it, descend into the
        // one that holds it.
        while cur != *other {
            let Some((lo, hi)) = cur.halves() else { break };
            if lo.contains(other) {
                out.push(hi);
                cur = lo;
            } else {
                out.push(lo);
                cur = hi;
            }
        }
        out.sort();
        out
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    /// Parses the canonical form `ADDR/LEN` (host bits zero).
    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let bad = |why: &str| PrefixError(format!("bad prefix {s:?}: {why}"));
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/LENGTH"))?;
        if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the length must be 0-32 (IPv4) or 0-128 (IPv6)"));
        }
        if l.len() > 1 && l.starts_with('0') {
            return Err(bad("the length has a leading zero"));
        }
        let len: u8 = l
            .parse()
            .map_err(|_| bad("the length must be 0-32 (IPv4) or 0-128 (IPv6)"))?;
        let addr: IpAddr = a.parse().map_err(|_| bad("not an IP address"))?;
        let p = Prefix::new(addr, len).ok_or_else(|| {
            if len > if addr.is_ipv4() { 32 } else { 128 } {
                bad("the length is too long for the address family")
            } else {
                bad("host bits are set (write the network address)")
            }
        })?;
        // IPv4-mapped IPv6 forms would alias IPv4 space: refused.
        if let IpAddr::V6(v6) = addr {
            if v6.to_ipv4_mapped().is_some() && len >= 96 {
                return Err(bad("IPv4-mapped IPv6 prefixes are not accepted"));
            }
        }
        // Only the canonical text: `10.1.0.0/16`, not `10.01.0.0/16`; lowercase,
        // compressed IPv6.
        if p.to_string() != s {
            return Err(bad(&format!("write it as {p}")));
        }
        Ok(p)
    }
}

impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether a member may advertise `p` in `advertise_routes`: refused are the default
/// routes (offered only with `advertise_exit_node`), anything overlapping the mesh's
/// own space ([`MESH_V6`], [`MESH_V4`]) — a member must not hijack mesh addresses —,
/// and loopback, link-local, multicast, unspecified and broadcast space.
pub fn check_advertised(p: &Prefix) -> Result<(), PrefixError> {
    let refuse = |why: &str| Err(PrefixError(format!("prefix {p} is refused: {why}")));
    if p.is_default() {
        return refuse("default routes are offered only with advertise_exit_node");
    }
    let forbidden: &[(&str, &str)] = if p.is_ipv4() {
        &[
            ("100.64.0.0/10", "it overlaps the mesh's IPv4 space"),
            ("127.0.0.0/8", "loopback"),
            ("169.254.0.0/16", "link-local"),
            ("224.0.0.0/4", "multicast"),
            ("240.0.0.0/4", "reserved (class E and broadcast)"),
            ("0.0.0.0/8", "this-network addresses"),
        ]
    } else {
        &[
            (
                "fd5a:1f00::/24",
                "it overlaps the mesh's IPv6 space (member and app ULAs)",
            ),
            ("::1/128", "loopback"),
            ("::/128", "unspecified"),
            ("fe80::/10", "link-local"),
            ("ff00::/8", "multicast"),
            ("::ffff:0:0/96", "IPv4-mapped"),
        ]
    };
    for (text, why) in forbidden {
        if let Ok(f) = text.parse::<Prefix>() {
            if f.overlaps(p) {
                return refuse(why);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn only_the_canonical_form_parses() {
        assert_eq!(p("10.1.0.0/16").to_string(), "10.1.0.0/16");
        assert_eq!(p("fd00:1::/64").to_string(), "fd00:1::/64");
        assert_eq!(p("0.0.0.0/0"), DEFAULT_V4);
        assert_eq!(p("::/0"), DEFAULT_V6);
        for bad in [
            "10.1.0.1/16",
            "10.1.0.0",
            "10.1.0.0/33",
            "10.1.0.0/016",
            "10.1.0.0/",
            "/16",
            "FD00:1::/64",
            "fd00:0001::/64",
            "[fd00::]/64",
            "fd00::/129",
            "10.1.0.0/16 ",
            "::ffff:10.0.0.0/104",
            "",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad} parsed");
        }
        assert_eq!(
            serde_json::to_string(&p("10.1.0.0/16")).unwrap(),
            "\"10.1.0.0/16\""
        );
    }

    #[test]
    fn containment_and_subtraction() {
        assert!(p("10.0.0.0/8").contains(&p("10.1.0.0/16")));
        assert!(!p("10.1.0.0/16").contains(&p("10.0.0.0/8")));
        assert!(DEFAULT_V4.contains(&p("10.1.0.0/16")));
        assert!(!DEFAULT_V6.contains(&p("10.1.0.0/16")));
        assert_eq!(
            p("10.1.0.0/16").intersect(&p("10.0.0.0/8")),
            Some(p("10.1.0.0/16"))
        );
        assert_eq!(p("10.1.0.0/16").intersect(&p("10.2.0.0/16")), None);
        let rest = p("10.1.0.0/16").subtract(&p("10.1.5.0/24"));
        assert_eq!(rest.len(), 8);
        assert!(rest.iter().all(|r| !r.overlaps(&p("10.1.5.0/24"))));
        assert!(rest.iter().all(|r| p("10.1.0.0/16").contains(r)));
        let size: u64 = rest.iter().map(|r| 1u64 << (32 - r.prefix_len())).sum();
        assert_eq!(size, (1 << 16) - (1 << 8));
        assert!(p("10.1.0.0/16").subtract(&p("10.0.0.0/8")).is_empty());
        assert_eq!(
            p("10.1.0.0/16").subtract(&p("10.2.0.0/16")),
            vec![p("10.1.0.0/16")]
        );
        assert_eq!(DEFAULT_V6.subtract(&p("::/1")), vec![p("8000::/1")]);
        assert_eq!(
            p("10.0.0.0/31").subtract(&p("10.0.0.1/32")),
            vec![p("10.0.0.0/32")]
        );
    }

    #[test]
    fn mesh_and_special_space_cannot_be_advertised() {
        for bad in [
            "fd5a:1f00::/32",
            "fd5a:1f02::/32",
            "fd5a::/16",
            "fd5a:1f00:1:2:3::1/128",
            "100.64.0.0/10",
            "100.100.100.100/32",
            "100.0.0.0/8",
            "0.0.0.0/0",
            "::/0",
            "127.0.0.0/8",
            "169.254.1.0/24",
            "224.0.0.0/4",
            "fe80::/64",
            "ff02::/16",
        ] {
            assert!(check_advertised(&p(bad)).is_err(), "{bad} accepted");
        }
        for good in [
            "10.1.0.0/16",
            "192.168.1.0/24",
            "fd00:1::/64",
            "2001:db8::/32",
        ] {
            assert!(check_advertised(&p(good)).is_ok(), "{good} refused");
        }
    }
}
