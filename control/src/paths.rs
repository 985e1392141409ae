//! Path metrics: how members reach their peers, from each member's last heartbeat
//! (`paths: {direct, relay}`), for `/metrics`.
//!
//! * `tabbify_coordinator_members_by_path{path="direct"|"relay"|"mixed"|"none"}`: members
//!   whose peers are all direct, all relayed, some of each, or who reported none (no peers
//!   yet, or a joiner too old to report);
//! * `tabbify_coordinator_peer_paths{path="direct"|"relay"}`: the sums of the members'
//!   counts (each pair is counted once from each end).
//!
//! Invariant: computed at render time from the registry; nothing here is stored.

use std::fmt::Write as _;

use crate::api::PathCounts;
use crate::registry::PeerRecord;

/// The path gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathGauges {
    /// Members by path: direct, relay, mixed, none.
    pub members: [u64; 4],
    /// Sum of the members' direct counts.
    pub direct: u64,
    /// Sum of the members' relay counts.
    pub relay: u64,
}

/// The labels of [`PathGauges::members`], in order.
pub const MEMBER_PATHS: [&str; 4] = ["direct", "relay", "mixed", "none"];

impl PathGauges {
    /// Counts `peers`.
    pub fn of<'a>(peers: impl Iterator<Item = &'a PeerRecord>) -> Self {
        let mut g = PathGauges::default();
        for p in peers {
            g.add(p.paths);
        }
        g
    }

    fn add(&mut self, c: PathCounts) {
        let i = match (c.direct > 0, c.relay > 0) {
            (true, false) => 0,
            (false, true) => 1,
            (true, true) => 2,
            (false, false) => 3,
        };
        self.members[i] += 1;
        self.direct += u64::from(c.direct);
        self.relay += u64::from(c.relay);
    }

    /// The Prometheus text of these gauges.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP tabbify_coordinator_members_by_path Members by how they reach their peers (last heartbeat)."
        );
        let _ = writeln!(o, "# TYPE tabbify_coordinator_members_by_path gauge");
        for (label, n) in MEMBER_PATHS.iter().zip(self.members) {
            let _ = writeln!(
                o,
                "tabbify_coordinator_members_by_path{{path=\"{label}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP tabbify_coordinator_peer_paths Sum over members of the peers they reach by each path."
        );
        let _ = writeln!(o, "# TYPE tabbify_coordinator_peer_paths gauge");
        let _ = writeln!(
            o,
            "tabbify_coordinator_peer_paths{{path=\"direct\"}} {}",
            self.direct
        );
        let _ = writeln!(
            o,
            "tabbify_coordinator_peer_paths{{path=\"relay\"}} {}",
            self.relay
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_classified_and_counts_summed() {
        let mut g = PathGauges::default();
        for (direct, relay) in [(3, 0), (0, 2), (1, 1), (0, 0), (5, 0)] {
            g.add(PathCounts { direct, relay });
        }
        assert_eq!(g.members, [2, 1, 1, 1]);
        assert_eq!((g.direct, g.relay), (9, 3));
        let text = g.render();
        assert!(text.contains("tabbify_coordinator_members_by_path{path=\"mixed\"} 1\n"));
        assert!(text.contains("tabbify_coordinator_peer_paths{path=\"relay\"} 3\n"));
    }
}
