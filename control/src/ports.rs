//! Port sets: normalized lists of inclusive ranges, with union, difference and parsing of
//! the policy's `:PORTS` suffix.
//!
//! Invariant: the ranges of a [`PortSet`] are sorted, disjoint and non-adjacent, so two
//! sets are equal exactly when they hold the same ports.

use crate::api::PortRange;

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
