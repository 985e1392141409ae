//! The heartbeat's `traffic` report (issue 16): this member's own account of its traffic,
//! made from what `status` shows of every peer (the engine's per-peer byte counters,
//! handshake time and path).
//!
//! This module owns the translation ([`report`], sans IO: the peers and `now` in, the report
//! out).
//!
//! Invariants:
//! * at most [`api::MAX_TRAFFIC_PEERS`] peers, the busiest (rx + tx) first, ties by peer id,
//!   so a roster of any size (a malicious coordinator's included) never makes a heartbeat
//!   the coordinator refuses;
//! * the totals count every peer in the table, listed or not (saturating);
//! * a handshake time in the future (a clock step) is age 0, never a wrap.

use tabbify_api::local::PeerStatus;
use tabbify_api::{self as api, PeerPath, PeerTraffic, TrafficReport};

/// The report for `peers` at Unix time `now_unix` (seconds).
pub fn report(peers: &[PeerStatus], now_unix: u64) -> TrafficReport {
    let (rx_bytes, tx_bytes) = peers.iter().fold((0u64, 0u64), |(rx, tx), p| {
        (rx.saturating_add(p.rx_bytes), tx.saturating_add(p.tx_bytes))
    });
    let mut busiest: Vec<&PeerStatus> = peers.iter().collect();
    busiest.sort_by(|a, b| {
        let load = |p: &PeerStatus| p.rx_bytes.saturating_add(p.tx_bytes);
        load(b)
            .cmp(&load(a))
            .then_with(|| a.peer_id.cmp(&b.peer_id))
    });
    busiest.truncate(api::MAX_TRAFFIC_PEERS);
    TrafficReport {
        rx_bytes,
        tx_bytes,
        peers: busiest
            .into_iter()
            .map(|p| PeerTraffic {
                peer_id: p.peer_id.clone(),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                last_handshake_secs: p.latest_handshake.map(|t| now_unix.saturating_sub(t)),
                path: path(p, now_unix),
            })
            .collect(),
    }
}

/// A session older than this is not a path (WireGuard rejects it after 180 s).
const SESSION_LIFETIME_SECS: u64 = 180;

/// The path traffic to the peer takes now: direct or relayed only with a live session (a
/// handshake in the last 3 minutes, as `status`'s `direct` means it), else none — a peer
/// whose endpoint is known but that never answered is not "direct".
fn path(p: &PeerStatus, now_unix: u64) -> PeerPath {
    let live = p
        .latest_handshake
        .is_some_and(|t| now_unix.saturating_sub(t) < SESSION_LIFETIME_SECS);
    if p.direct {
        PeerPath::Direct
    } else if live && p.path == "relay" {
        PeerPath::Relay
    } else {
        PeerPath::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, rx: u64, tx: u64, path: &str, endpoint: bool, hs: Option<u64>) -> PeerStatus {
        // `status` calls a peer direct when its session is live and its path direct.
        let direct =
            path == "direct" && endpoint && hs.is_some_and(|t| t + SESSION_LIFETIME_SECS > 1000);
        serde_json::from_value(serde_json::json!({
            "peer_id": id, "name": id, "ula": "fd7a::2", "tags": [], "public_key": "k",
            "endpoint": endpoint.then_some("192.0.2.1:51820"), "path": path,
            "latest_handshake": hs, "rx_bytes": rx, "tx_bytes": tx, "direct": direct,
            "app_ulas": [], "ports": {"outbound": [], "inbound": []}
        }))
        .expect("a peer status")
    }

    #[test]
    fn the_busiest_come_first_with_age_and_path() {
        let r = report(
            &[
                peer("quiet", 1, 1, "direct", true, None),
                peer("busy", 500, 700, "relay", true, Some(900)),
                peer("mid", 100, 0, "direct", true, Some(990)),
                peer("lost", 0, 0, "direct", false, Some(2000)),
                peer("stale-relay", 0, 0, "relay", true, Some(100)),
            ],
            1000,
        );
        assert_eq!((r.rx_bytes, r.tx_bytes), (601, 701));
        let ids: Vec<&str> = r.peers.iter().map(|p| p.peer_id.as_str()).collect();
        assert_eq!(ids, ["busy", "mid", "quiet", "lost", "stale-relay"]);
        assert_eq!(r.peers[0].path, PeerPath::Relay);
        assert_eq!(r.peers[0].last_handshake_secs, Some(100));
        assert_eq!(r.peers[1].path, PeerPath::Direct);
        // An endpoint without a handshake is no path (API members with made-up endpoints
        // showed as "direct" before).
        assert_eq!(r.peers[2].path, PeerPath::None);
        assert_eq!(r.peers[2].last_handshake_secs, None);
        assert_eq!(r.peers[3].path, PeerPath::None);
        // A handshake "in the future" (the clock stepped back) is age 0.
        assert_eq!(r.peers[3].last_handshake_secs, Some(0));
        // A relayed peer whose session expired is no path either.
        assert_eq!(r.peers[4].path, PeerPath::None);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["peers"][0]["path"], "relay");
    }

    /// A malicious coordinator hands us a huge roster: the report stays within the
    /// coordinator's limit (so the heartbeat is not refused), keeps the busiest, and the
    /// totals still count everyone; counters near the top do not wrap.
    #[test]
    fn a_huge_roster_is_capped_and_the_totals_saturate() {
        let mut peers: Vec<PeerStatus> = (0..api::MAX_TRAFFIC_PEERS as u64 + 100)
            .map(|i| peer(&format!("p{i:04}"), i, 0, "direct", true, None))
            .collect();
        peers.push(peer("huge", u64::MAX, u64::MAX, "direct", true, None));
        let r = report(&peers, 0);
        assert_eq!(r.peers.len(), api::MAX_TRAFFIC_PEERS);
        assert_eq!(r.peers[0].peer_id, "huge");
        assert_eq!(r.peers[1].peer_id, "p0355");
        assert!(r.peers.iter().all(|p| p.peer_id != "p0000"));
        assert_eq!((r.rx_bytes, r.tx_bytes), (u64::MAX, u64::MAX));
    }
}
