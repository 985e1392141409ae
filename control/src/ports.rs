//! Port sets: normalized lists of inclusive ranges, with union, difference and parsing of
//! the policy's `:PORTS` suffix; [`ProtoPorts`] pairs a TCP and a UDP set (the policy's
//! `tcp:N` / `udp:N` items; a bare item is both).
//!
//! Invariant: the ranges of a [`PortSet`] are sorted, disjoint and non-adjacent, so two
//! sets are equal exactly when they hold the same ports.

use crate::api::{PortRange, PortRules};

/// A transport protocol the policy's port rules name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// The TCP and the UDP ports a rule covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ProtoPorts {
    /// TCP destination ports.
    pub tcp: PortSet,
    /// UDP destination ports.
    pub udp: PortSet,
}

impl ProtoPorts {
    /// No ports.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Every port of both protocols: all traffic.
    pub fn all() -> Self {
        Self {
            tcp: PortSet::all(),
            udp: PortSet::all(),
        }
    }

    /// The same ports for both protocols.
    pub fn both(p: PortSet) -> Self {
        Self {
            tcp: p.clone(),
            udp: p,
        }
    }

    /// Whether `port` of `proto` is in.
    pub fn contains(&self, proto: Proto, port: u16) -> bool {
        match proto {
            Proto::Tcp => self.tcp.contains(port),
            Proto::Udp => self.udp.contains(port),
        }
    }

    /// Whether no port of either protocol is in.
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty()
    }

    /// Adds every port of `other`, protocol by protocol.
    pub fn union_with(&mut self, other: &ProtoPorts) {
        self.tcp.union_with(&other.tcp);
        self.udp.union_with(&other.udp);
    }

    /// Removes every port of `other`, protocol by protocol.
    pub fn subtract(&mut self, other: &ProtoPorts) {
        self.tcp.subtract(&other.tcp);
        self.udp.subtract(&other.udp);
    }

    /// Parses a comma-separated list of items, each `*`, `N` or `A-B`, optionally prefixed
    /// with `tcp:` or `udp:` (that protocol only; unprefixed = both): `tcp:22,udp:53,80`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut out = ProtoPorts::empty();
        for part in spec.split(',') {
            let part = part.trim();
            let (tcp, udp, ports) = if let Some(p) = part.strip_prefix("tcp:") {
                (true, false, p)
            } else if let Some(p) = part.strip_prefix("udp:") {
                (false, true, p)
            } else {
                (true, true, part)
            };
            let set = PortSet::parse(ports)?;
            if tcp {
                out.tcp.union_with(&set);
            }
            if udp {
                out.udp.union_with(&set);
            }
        }
        Ok(out)
    }

    /// The roster's form: (ports open to both, TCP only, UDP only).
    pub fn split(&self) -> (PortSet, PortSet, PortSet) {
        let mut both = self.tcp.clone();
        both.subtract(&self.udp_complement());
        let mut tcp_only = self.tcp.clone();
        tcp_only.subtract(&self.udp);
        let mut udp_only = self.udp.clone();
        udp_only.subtract(&self.tcp);
        (both, tcp_only, udp_only)
    }

    fn udp_complement(&self) -> PortSet {
        let mut c = PortSet::all();
        c.subtract(&self.udp);
        c
    }

    /// Back from the roster's form (the inverse of [`ProtoPorts::split`]).
    pub fn from_lists(both: &[PortRange], tcp: &[PortRange], udp: &[PortRange]) -> Self {
        let b = PortSet(both.to_vec());
        let mut out = ProtoPorts::both(PortSet::empty());
        out.tcp.union_with(&b);
        out.tcp.union_with(&PortSet(tcp.to_vec()));
        out.udp.union_with(&b);
        out.udp.union_with(&PortSet(udp.to_vec()));
        out
    }
}

/// The roster entry's rules from what the viewer may open on the peer (`outbound`) and
/// what the peer may open on the viewer (`inbound`).
pub fn port_rules(outbound: &ProtoPorts, inbound: &ProtoPorts) -> PortRules {
    let (ob, ot, ou) = outbound.split();
    let (ib, it, iu) = inbound.split();
    PortRules {
        outbound: ob.0,
        inbound: ib.0,
        outbound_tcp: ot.0,
        outbound_udp: ou.0,
        inbound_tcp: it.0,
        inbound_udp: iu.0,
    }
}

/// A set of ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortSet(Vec<PortRange>);

impl PortSet {
    /// No ports.
    pub fn empty() -> Self {
        Self(Vec::new())
    }

    /// Every port.
    pub fn all() -> Self {
        Self(vec![PortRange::ALL])
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The normalized ranges.
    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }

    /// Adds every port of `other`.
    pub fn union_with(&mut self, other: &PortSet) {
        if other.0.is_empty() {
            return;
        }
        if self.0.is_empty() {
            self.0.clone_from(&other.0);
            return;
        }
        let mut all: Vec<PortRange> = self.0.iter().chain(&other.0).copied().collect();
        all.sort();
        let mut out: Vec<PortRange> = Vec::with_capacity(all.len());
        for r in all {
            match out.last_mut() {
                Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                    last.last = last.last.max(r.last);
                }
                _ => out.push(r),
            }
        }
        self.0 = out;
    }

    /// Removes every port of `other`.
    pub fn subtract(&mut self, other: &PortSet) {
        if other.0.is_empty() || self.0.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len());
        for r in &self.0 {
            let mut pieces = vec![*r];
            for cut in &other.0 {
                let mut next = Vec::with_capacity(pieces.len() + 1);
                for p in pieces {
                    if cut.last < p.first || cut.first > p.last {
                        next.push(p);
                        continue;
                    }
                    if cut.first > p.first {
                        next.push(PortRange {
                            first: p.first,
                            last: cut.first - 1,
                        });
                    }
                    if cut.last < p.last {
                        next.push(PortRange {
                            first: cut.last + 1,
                            last: p.last,
                        });
                    }
                }
                pieces = next;
            }
            out.extend(pieces);
        }
        self.0 = out;
    }

    /// Parses `*`, `N`, `A-B`, or a comma-separated list of those.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut set = PortSet::empty();
        for part in spec.split(',') {
            let part = part.trim();
            let range = if part == "*" {
                PortRange::ALL
            } else if let Some((a, b)) = part.split_once('-') {
                let first = parse_port(a)?;
                let last = parse_port(b)?;
                if first > last {
                    return Err(format!("port range {part:?} is backwards"));
                }
                PortRange { first, last }
            } else {
                let p = parse_port(part)?;
                PortRange { first: p, last: p }
            };
            set.union_with(&PortSet(vec![range]));
        }
        Ok(set)
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.trim()
        .parse::<u16>()
        .map_err(|_| format!("{s:?} is not a port number (0-65535)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn parse_normalizes() {
        let s = PortSet::parse("80,81,22,1000-2000,1500-2500").unwrap();
        assert_eq!(s.ranges(), &[r(22, 22), r(80, 81), r(1000, 2500)]);
        assert_eq!(PortSet::parse("*").unwrap(), PortSet::all());
        for bad in ["", "x", "70000", "9-1", "1-", "-1"] {
            assert!(PortSet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn protocol_items_parse_and_split() {
        let p = ProtoPorts::parse("tcp:8730,udp:53,80-90, tcp:85-100").unwrap();
        assert_eq!(p.tcp, PortSet::parse("80-100,8730").unwrap());
        assert_eq!(p.udp, PortSet::parse("53,80-90").unwrap());
        let (both, t, u) = p.split();
        assert_eq!(both.ranges(), &[r(80, 90)]);
        assert_eq!(t.ranges(), &[r(91, 100), r(8730, 8730)]);
        assert_eq!(u.ranges(), &[r(53, 53)]);
        assert_eq!(
            ProtoPorts::from_lists(both.ranges(), t.ranges(), u.ranges()),
            p
        );
        assert_eq!(ProtoPorts::parse("*").unwrap(), ProtoPorts::all());
        assert_eq!(ProtoPorts::parse("tcp:*").unwrap().udp, PortSet::empty());
        for bad in ["tcp:", "udp:x", "icmp:1", "tcp:udp:1", ""] {
            assert!(ProtoPorts::parse(bad).is_err(), "{bad}");
        }
        // Bare ports mean both protocols: old policies keep their meaning.
        let old = ProtoPorts::parse("8730").unwrap();
        let rules = port_rules(&old, &ProtoPorts::empty());
        assert_eq!(rules.outbound, vec![r(8730, 8730)]);
        assert!(rules.outbound_tcp.is_empty() && rules.outbound_udp.is_empty());
    }

    #[test]
    fn subtract_splits_ranges() {
        let mut s = PortSet::all();
        s.subtract(&PortSet::parse("22,8000-8100").unwrap());
        assert_eq!(s.ranges(), &[r(0, 21), r(23, 7999), r(8101, 65535)]);
        assert!(!s.contains(22));
        assert!(s.contains(23));
        let mut t = PortSet::parse("22").unwrap();
        t.subtract(&PortSet::all());
        assert!(t.is_empty());
    }

    #[test]
    fn set_ops_agree_with_a_bitmap() {
        // Deterministic pseudo-random sets checked against a naive per-port model.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut a = PortSet::empty();
            let mut b = PortSet::empty();
            let mut ma = vec![false; 65536];
            let mut mb = vec![false; 65536];
            for (set, model) in [(&mut a, &mut ma), (&mut b, &mut mb)] {
                for _ in 0..(next() % 5) {
                    let x = (next() % 65536) as u16;
                    let y = x.saturating_add((next() % 3000) as u16);
                    set.union_with(&PortSet(vec![r(x, y)]));
                    for p in x..=y {
                        model[p as usize] = true;
                    }
                }
            }
            let mut u = a.clone();
            u.union_with(&b);
            let mut d = a.clone();
            d.subtract(&b);
            for p in 0..=65535u16 {
                let (x, y) = (ma[p as usize], mb[p as usize]);
                assert_eq!(u.contains(p), x || y);
                assert_eq!(d.contains(p), x && !y);
            }
            for w in u.ranges().windows(2) {
                assert!(u32::from(w[0].last) + 1 < u32::from(w[1].first));
            }
        }
    }
}
