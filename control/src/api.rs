//! The coordinator's wire types: every request, response, roster entry and SSE event of
//! the JSON API, shared by the coordinator, the joiner and the edge.
//!
//! This module depends only on `serde`, `serde_json` and `std`, so that a client can use it
//! without pulling in the server.
//!
//! # Routes
//!
//! | route | body → answer |
//! |---|---|
//! | `POST /v1/mesh/register` | [`RegisterRequest`] → [`RegisterResponse`] |
//! | `POST /v1/mesh/heartbeat` | [`HeartbeatRequest`] → [`HeartbeatResponse`] |
//! | `GET /v1/mesh/peers` | → [`PeersResponse`] (the caller's ACL-filtered roster) |
//! | `GET /v1/mesh/peers/stream` | → `text/event-stream` of [`SseEvent`]s, see below |
//! | `GET /v1/policy` (admin) | → [`PolicyResponse`] |
//! | `PUT /v1/policy` (admin) | [`PolicyDocument`] → [`PolicyResponse`] |
//! | `DELETE /v1/mesh/peers/{id}` (admin) | → [`RevokeResponse`] |
//! | `GET /v1/revocations` (admin) | → `Vec<`[`Revocation`]`>` |
//! | `DELETE /v1/revocations/{id}` (admin) | → [`RevokeResponse`] (re-admits the key) |
//! | `POST /v1/tokens` (admin) | [`TokenRequest`] → [`TokenResponse`] |
//! | `GET /health` | → [`Health`] |
//! | `GET /metrics` | → Prometheus text |
//! | `GET /openapi.json` | → OpenAPI 3 document |
//!
//! Every error is a 4xx/5xx status with an [`ErrorBody`]: `{"error": "...", "code": "..."}`.
//!
//! # SSE wire format (`GET /v1/mesh/peers/stream`)
//!
//! Standard `text/event-stream` frames, one per event:
//!
//! ```text
//! id: 42
//! event: peer_upsert
//! data: {"peer_id":"…","ula":"fd5a:1f00:…::1",…}
//!
//! ```
//!
//! * `id` is a coordinator-wide, strictly increasing event number. A stream skips the ids
//!   of events it may not see, so ids have gaps.
//! * The first event of every stream is `snapshot` ([`Snapshot`]): the caller's whole
//!   visible roster. Then, in id order: `peer_upsert` ([`RosterEntry`], add or replace by
//!   `peer_id`), `peer_remove` ([`PeerRemove`]), `policy` ([`Snapshot`]: the policy changed;
//!   replace the whole roster with this one) and `hole_punch` ([`HolePunch`]).
//! * A reconnecting client sends `Last-Event-ID: <id>`. If the coordinator still holds every
//!   event after that id (and the policy has not changed since), the stream resumes with
//!   them and no snapshot; otherwise it starts with a fresh `snapshot`. Either way the first
//!   frame tells the client which case it is.
//! * Lines starting with `:` are keepalive comments; ignore them.
//! * A client that reads too slowly to keep up is sent a fresh `snapshot` once it catches up
//!   (or is disconnected if it stops reading altogether).
//!
//! [`SseDecoder`] turns the byte stream back into [`SseFrame`]s and [`SseEvent::parse`]
//! turns a frame into a typed event.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Route of [`RegisterRequest`].
pub const PATH_REGISTER: &str = "/v1/mesh/register";
/// Route of [`HeartbeatRequest`].
pub const PATH_HEARTBEAT: &str = "/v1/mesh/heartbeat";
/// Route of the caller's roster ([`PeersResponse`]).
pub const PATH_PEERS: &str = "/v1/mesh/peers";
/// Route of the roster event stream.
pub const PATH_PEERS_STREAM: &str = "/v1/mesh/peers/stream";
/// Route of the policy (admin).
pub const PATH_POLICY: &str = "/v1/policy";
/// Route for minting join tokens (admin).
pub const PATH_TOKENS: &str = "/v1/tokens";
/// Route listing revocations (admin); `DELETE {PATH_REVOCATIONS}/{peer_id}` re-admits.
pub const PATH_REVOCATIONS: &str = "/v1/revocations";
/// Path the coordinator calls on `--auth-url` to validate a join token.
pub const PATH_AUTH_VALIDATE: &str = "/v1/join-tokens/validate";
/// The largest request body the coordinator accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// How many heartbeat intervals a peer may miss before it expires.
pub const MISSED_HEARTBEATS_TO_EXPIRE: u32 = 3;

/// `POST /v1/mesh/register`: join the mesh (or rejoin, e.g. after a coordinator restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The node's display name. With mTLS the coordinator identifies the caller by its
    /// certificate CN; a name claim in the join token wins over this field.
    pub name: String,
    /// The node's WireGuard public key: standard base64 of 32 bytes.
    pub public_key: String,
    /// Requested tags, without the `tag:` prefix. The join token's tags are
    /// authoritative; a requested tag the token does not grant is refused.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The UDP port WireGuard listens on (combined with the observed source IP of this
    /// HTTP request to form the reflexive endpoint).
    pub wg_listen_port: u16,
    /// The node's local endpoints (`ip:port`), as the node sees them.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// The join token. May be omitted when the key was admitted before (re-registration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
}

/// The answer to [`RegisterRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The peer's id (derived from its public key).
    pub peer_id: String,
    /// The peer's ULA (derived from its public key).
    pub ula: Ipv6Addr,
    /// The display name the coordinator recorded.
    pub display_name: String,
    /// The tags the coordinator granted (from the join token).
    pub tags: Vec<String>,
    /// Whether the policy lets this peer host apps.
    pub may_host_apps: bool,
    /// Source IP of the registration request + `wg_listen_port`.
    pub reflexive_endpoint: SocketAddr,
    /// Send a heartbeat this often; three missed heartbeats expire the peer.
    pub heartbeat_interval_secs: u64,
    /// The peers this peer may see, ACL-filtered.
    pub roster: Vec<RosterEntry>,
}

/// `POST /v1/mesh/heartbeat`: liveness plus the current endpoints and hosted apps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// The caller's peer id (must belong to the caller's identity).
    pub peer_id: String,
    /// The node's current local endpoints; replaces the registered ones.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// App ULAs (each in `fd5a:1f02::/32`) this node hosts; replaces the previous list.
    #[serde(default)]
    pub hosted_app_ulas: Vec<Ipv6Addr>,
}

/// The answer to [`HeartbeatRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// Send the next heartbeat within this many seconds.
    pub heartbeat_interval_secs: u64,
    /// Source IP of this request + the registered `wg_listen_port`.
    pub reflexive_endpoint: SocketAddr,
}

/// A port range, both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (≥ `first`).
    pub last: u16,
}

impl PortRange {
    /// Every port; in a [`PortRules`] list this alone means "all traffic" (any protocol,
    /// ICMP included).
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// What the ACL allows between the viewer (the peer that receives the roster) and one
/// roster entry's peer. Lists are sorted, disjoint and non-adjacent; empty means nothing
/// is allowed in that direction. Ports are TCP/UDP destination ports; a list equal to
/// `[PortRange::ALL]` means all traffic including ICMP. Traffic to an app ULA the peer
/// hosts is subject to the same rules as traffic to the peer's own ULA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRules {
    /// Destination ports on this peer that the viewer may open.
    pub outbound: Vec<PortRange>,
    /// Destination ports on the viewer that this peer may open.
    pub inbound: Vec<PortRange>,
}

impl PortRules {
    /// Whether the viewer may send to `port` on this peer.
    pub fn allows_outbound(&self, port: u16) -> bool {
        self.outbound.iter().any(|r| r.contains(port))
    }

    /// Whether this peer may send to `port` on the viewer.
    pub fn allows_inbound(&self, port: u16) -> bool {
        self.inbound.iter().any(|r| r.contains(port))
    }
}

/// One peer as another peer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// The peer's id.
    pub peer_id: String,
    /// The peer's ULA.
    pub ula: Ipv6Addr,
    /// The peer's display name.
    pub display_name: String,
    /// The peer's tags (without `tag:`).
    pub tags: Vec<String>,
    /// The peer's WireGuard public key, standard base64.
    pub public_key: String,
    /// The peer's local endpoints as it reported them.
    pub endpoints: Vec<SocketAddr>,
    /// The endpoint the coordinator observed (source IP + `wg_listen_port`).
    pub reflexive_endpoint: SocketAddr,
    /// App ULAs this peer hosts; route them to this peer.
    pub hosted_app_ulas: Vec<Ipv6Addr>,
    /// The ACL between the viewer and this peer, for the data-plane filter.
    pub ports: PortRules,
}

/// `GET /v1/mesh/peers`: the caller's visible roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeersResponse {
    /// The id of the last event this roster reflects (usable as `Last-Event-ID`).
    pub event_id: u64,
    /// The peers, sorted by `peer_id`.
    pub peers: Vec<RosterEntry>,
}

/// Data of the `snapshot` and `policy` SSE events: the whole visible roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Revision of the policy this roster was computed under.
    pub policy_revision: u64,
    /// The peers, sorted by `peer_id`.
    pub peers: Vec<RosterEntry>,
}

/// Data of the `peer_remove` SSE event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRemove {
    /// The peer that left the roster.
    pub peer_id: String,
    /// Why: `expired`, `revoked`, `replaced` (same identity, new key), `policy`.
    pub reason: String,
}

/// Data of the `hole_punch` SSE event: both NATed peers get one at the same moment; each
/// should start a burst of handshakes to `endpoint` right away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolePunch {
    /// The other peer.
    pub peer_id: String,
    /// The other peer's public key, standard base64.
    pub public_key: String,
    /// The other peer's reflexive endpoint.
    pub endpoint: SocketAddr,
}

/// A typed SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEvent {
    /// The whole visible roster (first event of a stream, or after falling behind).
    Snapshot(Snapshot),
    /// A peer joined or changed.
    PeerUpsert(RosterEntry),
    /// A peer left.
    PeerRemove(PeerRemove),
    /// The policy changed: the whole roster as the new policy shows it.
    Policy(Snapshot),
    /// Punch a hole towards another NATed peer now.
    HolePunch(HolePunch),
}

/// An SSE `event:` name that this API does not define.
#[derive(Debug, thiserror::Error)]
pub enum SseParseError {
    /// Unknown event name.
    #[error("unknown SSE event {0:?}")]
    UnknownEvent(String),
    /// The data is not the JSON this event carries.
    #[error("bad data for SSE event {event}: {source}")]
    Data {
        /// The event name.
        event: String,
        /// The JSON error.
        source: serde_json::Error,
    },
}

impl SseEvent {
    /// Event name of a snapshot.
    pub const SNAPSHOT: &'static str = "snapshot";
    /// Event name of an upsert.
    pub const PEER_UPSERT: &'static str = "peer_upsert";
    /// Event name of a removal.
    pub const PEER_REMOVE: &'static str = "peer_remove";
    /// Event name of a policy change.
    pub const POLICY: &'static str = "policy";
    /// Event name of a hole punch.
    pub const HOLE_PUNCH: &'static str = "hole_punch";

    /// The `event:` name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            SseEvent::Snapshot(_) => Self::SNAPSHOT,
            SseEvent::PeerUpsert(_) => Self::PEER_UPSERT,
            SseEvent::PeerRemove(_) => Self::PEER_REMOVE,
            SseEvent::Policy(_) => Self::POLICY,
            SseEvent::HolePunch(_) => Self::HOLE_PUNCH,
        }
    }

    /// The `data:` JSON on the wire (one line).
    pub fn data_json(&self) -> String {
        let r = match self {
            SseEvent::Snapshot(s) | SseEvent::Policy(s) => serde_json::to_string(s),
            SseEvent::PeerUpsert(e) => serde_json::to_string(e),
            SseEvent::PeerRemove(e) => serde_json::to_string(e),
            SseEvent::HolePunch(e) => serde_json::to_string(e),
        };
        // These types hold only strings, numbers and addresses: serializing cannot fail.
        r.unwrap_or_else(|_| String::from("{}"))
    }

    /// Parses an event from its `event:` name and `data:` JSON.
    pub fn parse(event: &str, data: &str) -> Result<Self, SseParseError> {
        let err = |source| SseParseError::Data {
            event: event.to_owned(),
            source,
        };
        Ok(match event {
            Self::SNAPSHOT => SseEvent::Snapshot(serde_json::from_str(data).map_err(err)?),
            Self::PEER_UPSERT => SseEvent::PeerUpsert(serde_json::from_str(data).map_err(err)?),
            Self::PEER_REMOVE => SseEvent::PeerRemove(serde_json::from_str(data).map_err(err)?),
            Self::POLICY => SseEvent::Policy(serde_json::from_str(data).map_err(err)?),
            Self::HOLE_PUNCH => SseEvent::HolePunch(serde_json::from_str(data).map_err(err)?),
            other => return Err(SseParseError::UnknownEvent(other.to_owned())),
        })
    }

    /// The whole frame as sent on the wire, ending with the blank line.
    pub fn to_frame(&self, id: u64) -> String {
        format!(
            "id: {id}\nevent: {}\ndata: {}\n\n",
            self.name(),
            self.data_json()
        )
    }
}

/// One decoded `text/event-stream` frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseFrame {
    /// The `id:` field, if the frame had one.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental `text/event-stream` decoder: feed it bytes as they arrive, take frames out.
/// Comment lines (keepalives) are skipped; `\n`, `\r\n` and `\r` line ends are accepted.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    current: SseFrame,
    has_data: bool,
}

impl SseDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes` and returns every frame completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseFrame> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                // A lone `\r` at the end of the buffer may be the first half of `\r\n`.
                if b == b'\r' && i + 1 == self.buf.len() {
                    break;
                }
                let line = String::from_utf8_lossy(&self.buf[start..i]).into_owned();
                if b == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                i += 1;
                start = i;
                if let Some(frame) = self.line(&line) {
                    frames.push(frame);
                }
            } else {
                i += 1;
            }
        }
        self.buf.drain(..start);
        frames
    }

    fn line(&mut self, line: &str) -> Option<SseFrame> {
        if line.is_empty() {
            let frame = std::mem::take(&mut self.current);
            let had = std::mem::replace(&mut self.has_data, false);
            return had.then(|| SseFrame {
                event: if frame.event.is_empty() {
                    "message".to_owned()
                } else {
                    frame.event
                },
                ..frame
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

/// The policy document (policy file and `PUT /v1/policy` body).
///
/// ```json
/// {
///   "tags": ["node", "supervisor", "worker"],
///   "groups": {"servers": ["tag:supervisor", "tag:worker"]},
///   "app_hosts": ["tag:supervisor"],
///   "allow": [{"src": ["tag:node"], "dst": ["tag:supervisor:8730", "group:servers:22"]}],
///   "deny":  [{"src": ["tag:worker"], "dst": ["tag:supervisor:22"]}]
/// }
/// ```
///
/// Selectors: `tag:NAME`, `group:NAME`, `peer:NAME` (a peer's identity) and `*` (everyone).
/// In `dst`, a selector may end with `:PORTS` where PORTS is `*`, a port, a range `A-B`, or
/// a comma-separated list of those; no suffix means every port. Traffic from A to B on a
/// port is allowed if an allow rule matches and no deny rule does; everything else is
/// denied. Groups hold selectors (not other groups).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Every tag that exists; a peer with another tag is refused.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Named groups of selectors.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Selectors of peers that may host apps (announce `hosted_app_ulas`).
    #[serde(default)]
    pub app_hosts: Vec<String>,
    /// Allow rules.
    #[serde(default)]
    pub allow: Vec<PolicyRule>,
    /// Deny rules; they win over allow rules.
    #[serde(default)]
    pub deny: Vec<PolicyRule>,
}

/// One allow or deny rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Who sends.
    pub src: Vec<String>,
    /// Who receives, with optional `:PORTS`.
    pub dst: Vec<String>,
}

/// `GET|PUT /v1/policy`: the policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyResponse {
    /// Increases by one with every accepted change.
    pub revision: u64,
    /// The document.
    pub policy: PolicyDocument,
}

/// `POST /v1/tokens`: mint a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Tags a peer joining with this token gets (authoritative).
    #[serde(default)]
    pub tags: Vec<String>,
    /// If set, the display name a peer joining with this token gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Lifetime in seconds (default one hour, at most 30 days).
    #[serde(default = "default_token_ttl")]
    pub ttl_secs: u64,
    /// How many registrations it admits (default 1; 0 = unlimited until it expires).
    #[serde(default = "default_token_uses")]
    pub max_uses: u32,
}

fn default_token_ttl() -> u64 {
    3600
}

fn default_token_uses() -> u32 {
    1
}

/// The answer to [`TokenRequest`]. The token itself is shown only here; the coordinator
/// keeps only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The secret token to hand to the joiner.
    pub token: String,
    /// A non-secret id (a prefix of the hash) for logs.
    pub token_id: String,
    /// Granted tags.
    pub tags: Vec<String>,
    /// Granted name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Admissions allowed (0 = unlimited).
    pub max_uses: u32,
}

/// `POST {auth_url}/v1/join-tokens/validate` request (see the README for the contract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthValidateRequest {
    /// The token the joiner presented.
    pub token: String,
    /// The joiner's identity (certificate CN, or the requested name without mTLS).
    pub identity: String,
    /// The name the joiner asked for.
    pub requested_name: String,
    /// The tags the joiner asked for.
    pub requested_tags: Vec<String>,
    /// The joiner's WireGuard public key, base64.
    pub public_key: String,
}

/// `POST {auth_url}/v1/join-tokens/validate` success answer (HTTP 200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthValidateResponse {
    /// Must be `true` for the token to be accepted.
    pub valid: bool,
    /// The tags the joiner gets (authoritative).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The display name the joiner gets, if the service decides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Why the token is invalid, when `valid` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `DELETE /v1/mesh/peers/{id}` and `DELETE /v1/revocations/{id}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// The peer id concerned.
    pub peer_id: String,
    /// `true` when the key is now revoked, `false` when it was re-admitted.
    pub revoked: bool,
}

/// One entry of `GET /v1/revocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The revoked peer's id.
    pub peer_id: String,
    /// Its public key, base64.
    pub public_key: String,
    /// When, Unix seconds.
    pub revoked_at: u64,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `ok` when the service answers.
    pub status: String,
    /// Registered, unexpired peers.
    pub peers: u64,
    /// Policy revision in force.
    pub policy_revision: u64,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable reason.
    pub error: String,
    /// Machine-readable kind, e.g. `bad_request`, `unauthorized`, `token_used`.
    pub code: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> RosterEntry {
        RosterEntry {
            peer_id: "00aa".into(),
            ula: "fd5a:1f00:1:2:3::1".parse().unwrap(),
            display_name: "n1".into(),
            tags: vec!["node".into()],
            public_key: "AAAA".into(),
            endpoints: vec!["192.168.1.2:51820".parse().unwrap()],
            reflexive_endpoint: "203.0.113.5:51820".parse().unwrap(),
            hosted_app_ulas: vec!["fd5a:1f02:1:2:3::1".parse().unwrap()],
            ports: PortRules {
                outbound: vec![PortRange::ALL],
                inbound: vec![PortRange {
                    first: 8730,
                    last: 8730,
                }],
            },
        }
    }

    #[test]
    fn roster_entry_json_has_the_documented_fields() {
        let v = serde_json::to_value(entry()).unwrap();
        for key in [
            "peer_id",
            "ula",
            "display_name",
            "tags",
            "public_key",
            "endpoints",
            "hosted_app_ulas",
            "reflexive_endpoint",
            "ports",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["ula"], "fd5a:1f00:1:2:3::1");
        assert_eq!(v["endpoints"][0], "192.168.1.2:51820");
        assert_eq!(v["ports"]["inbound"][0]["first"], 8730);
    }

    #[test]
    fn frames_round_trip_through_the_decoder() {
        let events = [
            SseEvent::Snapshot(Snapshot {
                policy_revision: 3,
                peers: vec![entry()],
            }),
            SseEvent::PeerUpsert(entry()),
            SseEvent::PeerRemove(PeerRemove {
                peer_id: "x".into(),
                reason: "expired".into(),
            }),
            SseEvent::HolePunch(HolePunch {
                peer_id: "y".into(),
                public_key: "k".into(),
                endpoint: "[2001:db8::1]:5".parse().unwrap(),
            }),
        ];
        let mut wire = String::from(": keepalive\n\n");
        for (i, e) in events.iter().enumerate() {
            wire.push_str(&e.to_frame(i as u64 + 10));
            wire.push_str(":\n");
        }
        // Feed it in awkward pieces, with CRLF line ends on half of it.
        let wire = wire.replacen('\n', "\r\n", 7);
        let mut dec = SseDecoder::new();
        let mut frames = Vec::new();
        for chunk in wire.as_bytes().chunks(7) {
            frames.extend(dec.feed(chunk));
        }
        assert_eq!(frames.len(), events.len());
        for (i, (f, e)) in frames.iter().zip(&events).enumerate() {
            assert_eq!(f.id.as_deref(), Some((i as u64 + 10).to_string().as_str()));
            assert_eq!(&SseEvent::parse(&f.event, &f.data).unwrap(), e);
        }
    }

    #[test]
    fn decoder_joins_multi_line_data_and_splits_cr_lf_across_feeds() {
        let mut dec = SseDecoder::new();
        assert!(dec.feed(b"data: a\r").is_empty());
        let frames = dec.feed(b"\ndata: b\r\n\r\n");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].data, "a\nb");
        assert_eq!(frames[0].event, "message");
    }

    #[test]
    fn unknown_events_and_bad_data_are_errors() {
        assert!(matches!(
            SseEvent::parse("nope", "{}"),
            Err(SseParseError::UnknownEvent(_))
        ));
        assert!(matches!(
            SseEvent::parse("peer_remove", "{"),
            Err(SseParseError::Data { .. })
        ));
    }

    #[test]
    fn token_request_defaults() {
        let t: TokenRequest = serde_json::from_str(r#"{"tags":["node"]}"#).unwrap();
        assert_eq!(t.ttl_secs, 3600);
        assert_eq!(t.max_uses, 1);
    }

    #[test]
    fn policy_rejects_unknown_fields() {
        let r: Result<PolicyDocument, _> = serde_json::from_str(r#"{"allows":[]}"#);
        assert!(r.is_err());
    }
}
