//! `IpNet`: an address prefix (IPv4 or IPv6 CIDR), the unit of AllowedIPs, addresses and routes.
//!
//! Invariant: `prefix_len` is at most 32 for IPv4 and 128 for IPv6; the host bits of `addr`
//! may be set (an interface address keeps them); [`IpNet::network`] clears them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 prefix such as `10.0.0.1/24` or `fd5a:1f00::/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a prefix did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    /// The address part is not an IPv4 or IPv6 address.
    #[error("`{0}` is not an IP address")]
    BadAddress(String),
    /// The part after `/` is not a number in range for the address family.
    #[error("prefix length `{0}` is out of range (0-32 for IPv4, 0-128 for IPv6)")]
    BadPrefixLen(String),
}

impl IpNet {
    /// A prefix; `None` if `prefix_len` is too long for the family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        (prefix_len <= max).then_some(Self { addr, prefix_len })
    }

    /// The single-host prefix of `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        let prefix_len = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        Self { addr, prefix_len }
    }

    /// The address as written (host bits kept).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The same prefix with host bits cleared.
    pub fn network(&self) -> Self {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a) & mask32(self.prefix_len);
                IpAddr::V4(Ipv4Addr::from(bits))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a) & mask128(self.prefix_len);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        };
        Self {
            addr,
            prefix_len: self.prefix_len,
        }
    }

    /// Whether `ip` lies inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = mask32(self.prefix_len);
                u32::from(n) & m == u32::from(a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = mask128(self.prefix_len);
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }
}

/// The netmask of an IPv4 prefix length as a host-order integer.
pub fn mask32(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    }
}

/// The netmask of an IPv6 prefix length as a host-order integer.
pub fn mask128(prefix_len: u8) -> u128 {
    if prefix_len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix_len.min(128)))
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    /// Parses `addr/len`, or a bare address as a host prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| IpNetError::BadAddress(a.to_string()))?;
        match l {
            None => Ok(Self::host(addr)),
            Some(l) => {
                let len: u8 = l
                    .parse()
                    .map_err(|_| IpNetError::BadPrefixLen(l.to_string()))?;
                Self::new(addr, len).ok_or_else(|| IpNetError::BadPrefixLen(l.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_masks() {
        let n: IpNet = "10.1.2.3/8".parse().unwrap();
        assert_eq!(n.network().to_string(), "10.0.0.0/8");
        assert!(n.contains("10.200.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        let v6: IpNet = "fd5a:1f00::1/32".parse().unwrap();
        assert!(v6.contains("fd5a:1f00:abcd::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert_eq!("0.0.0.0/0".parse::<IpNet>().unwrap().prefix_len(), 0);
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nope/3".parse::<IpNet>().is_err());
        assert_eq!("::1".parse::<IpNet>().unwrap().prefix_len(), 128);
    }
}
