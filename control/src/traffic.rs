//! What members report about their own traffic (`HeartbeatRequest::traffic`): the latest
//! report per member, held in this coordinator's memory for the dashboard.
//!
//! Sans-IO: every method takes the time (`now_ms`); the caller decides visibility.
//!
//! Invariants:
//! * Memory only: a report never causes a database write (issue 14's "no write per
//!   unchanged heartbeat" holds), and a restart forgets every report.
//! * A report lists at most [`MAX_TRAFFIC_PEERS`] peers ([`validate`] refuses more, naming
//!   `traffic.peers`); after [`Traffic::record`] it names only peers the reporter may see
//!   (others, the reporter itself and repeats are dropped silently), so a member learns
//!   nothing by probing and cannot plant rows about members outside its roster.
//! * At most one entry per registered member ([`Traffic::retain`] drops the others), and
//!   at most one dashboard update per member per `min_gap_ms` ([`Traffic::record`]'s
//!   answer), however often the member heartbeats.
//! * The figures are the member's claims, not the coordinator's measurements; the
//!   dashboard says so.

use std::collections::{HashMap, HashSet};

use crate::api::{ReportedTraffic, TrafficReport, MAX_TRAFFIC_PEERS};

/// Refuses a report the coordinator will not hold: more than [`MAX_TRAFFIC_PEERS`] peers.
pub fn validate(report: &TrafficReport) -> Result<(), String> {
    if report.peers.len() > MAX_TRAFFIC_PEERS {
        return Err(format!(
            "traffic.peers lists {} peers; at most {MAX_TRAFFIC_PEERS}",
            report.peers.len()
        ));
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Entry {
    traffic: ReportedTraffic,
    /// When a dashboard update for this member last went out.
    notified_ms: Option<u64>,
}

/// The latest report of each member.
#[derive(Debug, Default)]
pub struct Traffic {
    reports: HashMap<String, Entry>,
}

impl Traffic {
    /// Keeps `report` as `reporter`'s latest, minus peers `visible` refuses (and the
    /// reporter itself, and repeated ids). Returns `true` when the dashboards should hear
    /// of it now: the first report, or `min_gap_ms` after the last update that went out.
    /// The caller has checked the report with [`validate`].
    pub fn record(
        &mut self,
        reporter: &str,
        mut report: TrafficReport,
        visible: impl Fn(&str) -> bool,
        now_ms: u64,
        min_gap_ms: u64,
    ) -> bool {
        let mut seen = HashSet::new();
        report.peers.retain(|p| {
            p.peer_id != reporter && seen.insert(p.peer_id.clone()) && visible(&p.peer_id)
        });
        report.peers.truncate(MAX_TRAFFIC_PEERS);
        let traffic = ReportedTraffic {
            reported_ms: now_ms,
            report,
        };
        let e = self.reports.entry(reporter.to_owned()).or_insert(Entry {
            traffic: traffic.clone(),
            notified_ms: None,
        });
        e.traffic = traffic;
        let due = match e.notified_ms {
            None => true,
            Some(t) => now_ms.saturating_sub(t) >= min_gap_ms,
        };
        if due {
            e.notified_ms = Some(now_ms);
        }
        due
    }

    /// `member`'s latest report, if any.
    pub fn get(&self, member: &str) -> Option<&ReportedTraffic> {
        self.reports.get(member).map(|e| &e.traffic)
    }

    /// Forgets `member`'s report (it left or was revoked).
    pub fn remove(&mut self, member: &str) {
        self.reports.remove(member);
    }

    /// Keeps only the reports of members `registered` accepts.
    pub fn retain(&mut self, registered: impl Fn(&str) -> bool) {
        self.reports.retain(|k, _| registered(k));
    }

    /// How many members' reports are held.
    pub fn len(&self) -> usize {
        self.reports.len()
    }

    /// Whether no report is held.
    pub fn is_empty(&self) -> bool {
        self.reports.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PeerPath, PeerTraffic};

    fn peer(id: &str, rx: u64) -> PeerTraffic {
        PeerTraffic {
            peer_id: id.into(),
            rx_bytes: rx,
            tx_bytes: rx * 2,
            last_handshake_secs: Some(3),
            path: PeerPath::Direct,
        }
    }

    #[test]
    fn too_many_peers_are_refused_naming_the_field() {
        let mut r = TrafficReport {
            peers: (0..=MAX_TRAFFIC_PEERS)
                .map(|i| peer(&i.to_string(), 1))
                .collect(),
            ..TrafficReport::default()
        };
        let err = validate(&r).unwrap_err();
        assert!(err.contains("traffic.peers"), "{err}");
        r.peers.pop();
        assert!(validate(&r).is_ok());
    }

    /// The attacker: a member whose report names peers outside its roster, itself, and
    /// the same peer twice (to inflate a row). Only the visible peer, once, is kept.
    #[test]
    fn invisible_self_and_repeated_peers_are_dropped() {
        let mut t = Traffic::default();
        let report = TrafficReport {
            rx_bytes: 10,
            tx_bytes: 20,
            peers: vec![
                peer("secret-db", 1),
                peer("mallory", 2),
                peer("web", 3),
                peer("web", 999),
            ],
        };
        assert!(t.record(
            "mallory",
            report,
            |p| p == "web" || p == "mallory",
            1_000,
            10_000
        ));
        let got = t.get("mallory").unwrap();
        assert_eq!(got.reported_ms, 1_000);
        assert_eq!(got.report.peers, vec![peer("web", 3)]);
        assert_eq!((got.report.rx_bytes, got.report.tx_bytes), (10, 20));
    }

    #[test]
    fn updates_go_out_at_most_once_per_gap_and_keep_the_latest() {
        let mut t = Traffic::default();
        let r = |rx| TrafficReport {
            rx_bytes: rx,
            ..TrafficReport::default()
        };
        assert!(t.record("a", r(1), |_| true, 0, 5_000));
        // A member heartbeating in a loop: held, not pushed.
        for i in 1..50 {
            assert!(!t.record("a", r(1 + i), |_| true, i * 10, 5_000));
        }
        assert_eq!(t.get("a").unwrap().report.rx_bytes, 50);
        assert!(t.record("a", r(51), |_| true, 5_000, 5_000));
        // Another member has its own budget.
        assert!(t.record("b", r(1), |_| true, 5_001, 5_000));
        t.retain(|m| m == "b");
        assert!(t.get("a").is_none());
        t.remove("b");
        assert!(t.is_empty());
    }
}
