//! Members in the database: the durable form of a registered peer ([`MemberRow`]), as
//! written by the coordinator that handled the register, heartbeat, rotation, app move or
//! removal, and read back by every coordinator on the same database (at start, and from
//! the change log while running) to build its roster.
//!
//! What it owns: the conversion between the registry's [`PeerRecord`] and the row, and
//! the rules for what is durable. Everything another coordinator needs to serve the
//! member in its rosters is in the row: peer id, identity, key, display name, tags,
//! endpoints, listen port, reflexive and mapped endpoints, NAT class, home relay, hosted
//! apps, whether it is stale, and `last_seen` (Unix seconds, coarsened: see below). Not
//! durable: the visibility class (derived from the policy in force), the path counts
//! (they feed the `/metrics` of the coordinator that got the heartbeat).
//!
//! Invariants:
//! * The database refuses a member whose key is not bound to its identity (a foreign
//!   key onto `identity_keys (key, identity)`), a second member with the same identity
//!   or key, and an app held by two members (`member_apps.app` is a primary key).
//! * `last_seen` is written only when the member changes, and otherwise at most once
//!   per [`liveness_write_ms`] per coordinator in one batched statement ([`crate::storage::touch`]),
//!   never into the change log: an unchanged heartbeat costs no write. Staleness judged
//!   from the database adds that slack ([`stale_slack_ms`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::api::NatClass;
use crate::registry::PeerRecord;
use crate::visibility::ClassId;

/// One member as stored (the `members` row with its `member_apps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRow {
    /// Peer id (derived from the identity).
    pub peer_id: String,
    /// Identity (certificate CN).
    pub identity: String,
    /// WireGuard key, standard base64.
    pub key: String,
    /// Display name.
    pub display_name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Local endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// WireGuard listen port.
    pub wg_listen_port: u16,
    /// Reflexive endpoint.
    pub reflexive: SocketAddr,
    /// Hosted app ULAs, sorted.
    pub hosted_app_ulas: Vec<Ipv6Addr>,
    /// Mapped endpoints (STUN).
    #[serde(default)]
    pub mapped: Vec<SocketAddr>,
    /// NAT class (STUN).
    #[serde(default)]
    pub nat: NatClass,
    /// Home relay URL.
    #[serde(default)]
    pub home_relay: Option<String>,
    /// Last register/heartbeat known to the database, Unix seconds (coarsened).
    pub last_seen: u64,
    /// Missed its heartbeats.
    #[serde(default)]
    pub stale: bool,
    /// Registered as ephemeral: removed, not marked stale, when it misses its heartbeats.
    #[serde(default)]
    pub ephemeral: bool,
    /// The mesh IPv4 address (unique: `member_ipv4.ipv4` is a primary key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    /// Advertised routes and their admin approvals.
    #[serde(
        default,
        skip_serializing_if = "crate::routes::Advertisement::is_empty_all"
    )]
    pub ads: crate::routes::Advertisement,
    /// Serves stock WireGuard clients (`join --concentrator`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub concentrator: bool,
}

impl MemberRow {
    /// The row for `p`.
    pub fn of(p: &PeerRecord) -> Self {
        Self {
            peer_id: p.id.clone(),
            identity: p.identity.clone(),
            key: p.key_b64.clone(),
            display_name: p.display_name.clone(),
            tags: p.tags.clone(),
            endpoints: p.endpoints.clone(),
            wg_listen_port: p.wg_listen_port,
            reflexive: p.reflexive,
            hosted_app_ulas: p.hosted_app_ulas.clone(),
            mapped: p.mapped.clone(),
            nat: p.nat,
            home_relay: p.home_relay.clone(),
            last_seen: p.last_seen_ms / 1000,
            stale: p.stale,
            ephemeral: p.ephemeral,
            ipv4: p.ipv4,
            ads: p.ads.clone(),
            concentrator: p.concentrator,
        }
    }

    /// The peer record this row describes, in visibility class `class`; `None` when the
    /// key is not 32 bytes of base64 or the id/ULA do not derive from the identity (a row
    /// no coordinator writes).
    pub fn to_peer(&self, class: ClassId) -> Option<PeerRecord> {
        let key: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(&self.key)
            .ok()?
            .try_into()
            .ok()?;
        if self.peer_id != crate::ula::identity_peer_id(&self.identity) {
            return None;
        }
        Some(PeerRecord {
            id: self.peer_id.clone(),
            key,
            key_b64: self.key.clone(),
            ula: crate::ula::identity_ula(&self.identity),
            identity: self.identity.clone(),
            display_name: self.display_name.clone(),
            tags: self.tags.clone(),
            endpoints: self.endpoints.clone(),
            wg_listen_port: self.wg_listen_port,
            reflexive: self.reflexive,
            hosted_app_ulas: self.hosted_app_ulas.clone(),
            mapped: self.mapped.clone(),
            nat: self.nat,
            home_relay: self.home_relay.clone(),
            paths: crate::api::PathCounts::default(),
            last_seen_ms: self.last_seen.saturating_mul(1000),
            stale: self.stale,
            ephemeral: self.ephemeral,
            class,
            ipv4: self.ipv4.filter(|a| crate::routes::is_mesh_ipv4(*a)),
            ads: self.ads.clone(),
            concentrator: self.concentrator,
        })
    }

    /// The row as stored in `members.body`: everything but `last_seen` and `stale`, which
    /// have columns of their own.
    pub fn body(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.remove("last_seen");
            m.remove("stale");
        }
        v.to_string()
    }

    /// The row from `members.body` and its columns.
    pub fn from_body(body: &str, last_seen: u64, stale: bool) -> Result<Self, String> {
        let mut v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
        if let Some(m) = v.as_object_mut() {
            m.insert("last_seen".into(), last_seen.into());
            m.insert("stale".into(), stale.into());
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }
}

/// How often, at most, a coordinator writes an unchanged member's `last_seen`: once per
/// expiry timeout (three heartbeat intervals).
pub fn liveness_write_ms(heartbeat_interval_ms: u64) -> u64 {
    heartbeat_interval_ms.saturating_mul(u64::from(crate::api::MISSED_HEARTBEATS_TO_EXPIRE))
}

/// How far a stored `last_seen` may lag the member's real last heartbeat: the write
/// interval, plus one sweep period (the batched write runs on the sweep, every half
/// heartbeat interval), plus a second of rounding to whole seconds.
pub fn stale_slack_ms(heartbeat_interval_ms: u64) -> u64 {
    liveness_write_ms(heartbeat_interval_ms)
        .saturating_add(heartbeat_interval_ms / 2)
        .saturating_add(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_round_trips_through_its_body() {
        let identity = "n1".to_string();
        let row = MemberRow {
            peer_id: crate::ula::identity_peer_id(&identity),
            identity,
            key: base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
            display_name: "One".into(),
            tags: vec!["node".into()],
            endpoints: vec!["10.0.0.1:51820".parse().unwrap()],
            wg_listen_port: 51820,
            reflexive: "192.0.2.1:51820".parse().unwrap(),
            hosted_app_ulas: vec!["fd5a:1f02::1".parse().unwrap()],
            mapped: vec!["192.0.2.1:4000".parse().unwrap()],
            nat: NatClass::default(),
            home_relay: Some("https://r".into()),
            last_seen: 1_700_000_000,
            stale: true,
            ephemeral: true,
            ipv4: Some("100.64.1.2".parse().unwrap()),
            ads: crate::routes::Advertisement {
                routes: vec!["10.1.0.0/16".parse().unwrap()],
                exit_node: true,
                admin_approved: vec!["10.1.0.0/16".parse().unwrap()],
            },
            concentrator: true,
        };
        let back = MemberRow::from_body(&row.body(), row.last_seen, row.stale).unwrap();
        assert_eq!(back, row);
        let p = row.to_peer(3).unwrap();
        assert_eq!((p.class, p.key, p.stale), (3, [7u8; 32], true));
        assert_eq!(MemberRow::of(&p), row);
        // A row whose id does not derive from its identity is refused.
        let forged = MemberRow {
            peer_id: "someone-else".into(),
            ..row
        };
        assert!(forged.to_peer(0).is_none());
    }
}
