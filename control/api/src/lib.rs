//! The mesh's wire types, shared by the coordinator, the joiner, the edge and the tests:
//! every request, response, roster entry and SSE event of the coordinator's JSON API
//! (this file and [`sse`]), the derived addresses ([`ula`]), the joiner's local control
//! socket ([`local`]), the STUN codec ([`stun`]) and its per-source answer limit ([`stun_limit`]) and, with the `tls` feature, the client side of the mesh's TLS
//! ([`tls`]).
//!
//! This crate holds no server, CA or certificate-parsing code: a client links only this.
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
//! | `POST /v1/mesh/rotate-key` | [`RotateKeyRequest`] → [`RotateKeyResponse`] |
//! | `POST /v1/mesh/leave` | [`LeaveRequest`] (`{}`) → [`LeaveResponse`] (the caller leaves the mesh at once) |
//! | `POST /v1/relay/token` | [`RelayTokenRequest`] → [`RelayTokenResponse`] (a relay admission for the caller's key) |
//! | `DELETE /v1/identities/{cn}` (admin) | → [`IdentityResponse`] (revokes the identity) |
//! | `POST /v1/identities/{cn}/readmit` (admin) | → [`IdentityResponse`] |
//! | `DELETE /v1/identities/{cn}/key` (admin) | → [`IdentityResponse`] (forgets a lost key) |
//! | `DELETE /v1/mesh/peers/{id}` (admin) | → [`RevokeResponse`] (revokes the peer's identity) |
//! | `GET /v1/revocations` (admin) | → `Vec<`[`Revocation`]`>` |
//! | `DELETE /v1/revocations/{id}` (admin) | → [`RevokeResponse`] (re-admits the identity) |
//! | `POST /v1/tokens` (admin) | [`TokenRequest`] → [`TokenResponse`] |
//! | `GET /v1/tokens` (admin) | → `Vec<`[`TokenInfo`]`>` (no secrets) |
//! | `DELETE /v1/tokens/{token_id}` (admin) | → [`TokenInfo`] (the deleted token) |
//! | `POST /v1/apps/{uuid}/move` (admin) | [`MoveAppRequest`] → [`MoveAppResponse`] |
//! | `GET /v1/routes` (admin) | → [`RoutesResponse`] (every route advertisement) |
//! | `POST /v1/routes/{id}/approve` (admin) | → [`RoutesResponse`] (the route, approved) |
//! | `DELETE /v1/routes/{id}/approve` (admin) | → [`RoutesResponse`] (the admin approval withdrawn) |
//! | `POST /v1/clients` (admin) | [`ClientCreateRequest`] → [`ClientCreateResponse`] (201; the private key only here) |
//! | `GET /v1/clients` (admin) | → [`ClientsResponse`] (no secrets) |
//! | `DELETE /v1/clients/{id}` (admin) | → [`ClientInfo`] (the revoked client) |
//! | `GET /health` | → [`Health`] |
//! | `GET /metrics` | → Prometheus text |
//! | `GET /openapi.json` | → OpenAPI 3 document |
//!
//! Every error is a 4xx/5xx status with an [`ErrorBody`]: `{"error": "...", "code": "..."}`.
//!
//! The SSE stream's wire format and its decoder are in [`sse`].
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

pub mod cli;
pub mod dns;
pub mod local;
#[cfg(feature = "tls")]
pub mod relay_token;
pub mod route;
pub mod sse;
pub mod stun;
pub mod stun_limit;
#[cfg(feature = "tls")]
pub mod tls;
pub mod ula;

pub use sse::{SseDecoder, SseEvent, SseFrame, SseParseError, SseTooLarge, MAX_EVENT_BYTES};

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
/// Route of [`RotateKeyRequest`].
pub const PATH_ROTATE_KEY: &str = "/v1/mesh/rotate-key";
/// Route of [`LeaveRequest`].
pub const PATH_LEAVE: &str = "/v1/mesh/leave";
/// Route listing every route advertisement (admin, [`RoutesResponse`]);
/// `POST|DELETE {PATH_ROUTES}/{id}/approve` approves or withdraws an admin approval.
pub const PATH_ROUTES: &str = "/v1/routes";
/// Route of the stock WireGuard clients (admin): `POST` mints one ([`ClientCreateRequest`]),
/// `GET` lists them ([`ClientsResponse`]), `DELETE {PATH_CLIENTS}/{id}` revokes one.
pub const PATH_CLIENTS: &str = "/v1/clients";
/// Every client's identity is this prefix followed by a UUID v4 chosen at mint
/// (`client/0b6f…`). No member certificate CN may contain `/`, so no member can ever hold
/// a client's identity (and so its peer id or ULA).
pub const CLIENT_IDENTITY_PREFIX: &str = "client/";
/// The most tags a client may carry.
pub const MAX_CLIENT_TAGS: usize = 16;
/// The prefixes a client's wg-quick file routes to its concentrator: the peer ULAs, the app
/// ULAs and the mesh IPv4 range.
pub const CLIENT_ALLOWED_IPS: &str = "fd5a:1f00::/32, fd5a:1f02::/32, 100.64.0.0/10";
/// The mesh DNS stub's service address on every member (a concentrator's clients use it
/// through their tunnel).
pub const DNS_SERVICE_ADDR: Ipv6Addr = Ipv6Addr::new(0xfd5a, 0x1f00, 0, 0, 0, 0, 0, 0x53);
/// The most prefixes one member may advertise in `advertise_routes`.
pub const MAX_ADVERTISED_ROUTES: usize = 64;
/// Header naming the event log a roster stream's ids belong to: the coordinator sends it
/// with every stream, and a joiner resuming with `Last-Event-ID` sends back the one its id
/// came from. A coordinator replays only ids of its own log (a restarted coordinator, or
/// another one with its own log, answers with a snapshot); coordinators sharing one log
/// (one database) name it alike, so a joiner resumes on any of them.
pub const EVENT_LOG_HEADER: &str = "x-tabbify-event-log";
/// Route of [`RelayTokenRequest`].
pub const PATH_RELAY_TOKEN: &str = "/v1/relay/token";
/// Prefix of the identity lifecycle routes (admin): `DELETE {prefix}{cn}`,
/// `POST {prefix}{cn}/readmit`, `DELETE {prefix}{cn}/key`.
pub const PATH_IDENTITIES_PREFIX: &str = "/v1/identities/";
/// The URI subject alternative name that gives a mesh certificate the admin role.
/// `tabbify-mesh-ca issue-admin` puts it in; peer certificates never carry it.
pub const ADMIN_ROLE_URI: &str = "urn:tabbify:role:admin";
/// Prefix of the admin app handover route: `POST {PATH_APPS}/{uuid}/move` with [`MoveAppRequest`].
pub const PATH_APPS: &str = "/v1/apps";
/// Route of [`PolicyTestRequest`] (admin): may A reach B on a port, and by which rule.
pub const PATH_POLICY_TEST: &str = "/v1/policy/test";
/// Route minting a dashboard login link (admin certificate only): [`LoginLinkRequest`].
pub const PATH_LOGIN_LINKS: &str = "/v1/admin/login-links";
/// Route of the dashboard session ([`AdminSession`]); `DELETE` logs out.
pub const PATH_ADMIN_SESSION: &str = "/v1/admin/session";
/// Route of every member as an admin sees it ([`AdminMembersResponse`]).
pub const PATH_ADMIN_MEMBERS: &str = "/v1/admin/members";
/// Route of who may reach whom under the policy ([`ReachResponse`]).
pub const PATH_ADMIN_REACH: &str = "/v1/admin/reach";
/// Route of the admin event stream (SSE: `member`, `member_remove`, `policy`, `resync`).
pub const PATH_ADMIN_STREAM: &str = "/v1/admin/stream";
/// Path the coordinator calls on `--auth-url` to validate a join token.
pub const PATH_AUTH_VALIDATE: &str = "/v1/join-tokens/validate";
/// The largest request body the coordinator accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// How many heartbeat intervals a peer may miss before it is marked stale (it is removed,
/// `expired`, only after the coordinator's `--stale-after` more).
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
    /// The join token. May be omitted when this key is the one admitted for the caller's
    /// identity (re-registration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
    /// An ephemeral member (`join --ephemeral`): removed from every roster as soon as it
    /// misses its heartbeats (no stale window), and it leaves when it stops cleanly.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
    /// Prefixes this member routes to (subnet router), canonical (host bits zero):
    /// `"10.1.0.0/16"`, `"fd00:1::/64"`; at most [`MAX_ADVERTISED_ROUTES`]. Mesh prefixes,
    /// `100.64.0.0/10`, loopback, link-local, multicast and the default routes are refused
    /// (400). The policy's `routes` approves them, or an admin does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertise_routes: Vec<String>,
    /// This member offers itself as an exit node (`0.0.0.0/0` and `::/0`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub advertise_exit_node: bool,
    /// This member serves stock WireGuard clients (`join --concentrator`): the clients minted
    /// for it appear in its roster with [`RosterEntry::client`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub concentrator: bool,
}

/// `POST /v1/mesh/leave`: the caller (its certificate's identity, never a peer id in the
/// body) leaves the mesh: it is removed from every roster at once (a `peer_remove` with
/// reason `left`) and its streams close. Its key stays admitted, so it may register again.
/// The body is `{}`; any field is refused (400), so a member cannot name another one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {}

/// The answer to [`LeaveRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveResponse {
    /// The caller's peer id.
    pub peer_id: String,
    /// It was removed.
    pub left: bool,
}

/// The answer to [`RegisterRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The peer's id (`ula::identity_peer_id(identity)`).
    pub peer_id: String,
    /// The peer's ULA (`ula::identity_ula(identity)`), stable across key rotations.
    pub ula: Ipv6Addr,
    /// The display name the coordinator recorded.
    pub display_name: String,
    /// The tags the coordinator granted (from the join token).
    pub tags: Vec<String>,
    /// Whether the policy lets this peer host apps.
    pub may_host_apps: bool,
    /// Source IP of the registration request + `wg_listen_port`.
    pub reflexive_endpoint: SocketAddr,
    /// Send a heartbeat this often; three missed heartbeats make the peer stale.
    pub heartbeat_interval_secs: u64,
    /// The peers this peer may see, ACL-filtered.
    pub roster: Vec<RosterEntry>,
    /// The coordinator's STUN servers (UDP `ip:port`, the IP this request reached): send
    /// Binding requests there from the WireGuard socket to learn the mapped endpoint.
    /// Empty when the coordinator runs none (`--stun-bind off`) or is older.
    #[serde(default)]
    pub stun_servers: Vec<SocketAddr>,
    /// The relays this mesh offers (the coordinator's own with `--relay`, then each
    /// `--relay-url`). Empty when it runs none or is older.
    #[serde(default)]
    pub relays: Vec<RelayInfo>,
    /// The mesh DNS domain (`--dns-domain`): members are `<name>.<domain>`, apps
    /// `<uuid>.app.<domain>` ([`dns`]). `"mesh"` when the coordinator is older.
    #[serde(default = "default_dns_domain")]
    pub dns_domain: String,
    /// The peer's mesh IPv4 address in `100.64.0.0/10`, stable for its peer id and unique
    /// in the mesh. `None`: the coordinator is older (use IPv6 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    /// The state of each of this peer's own advertisements (informational).
    #[serde(default)]
    pub routes: Vec<RouteState>,
}

/// Whether an advertised route is in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteApproval {
    /// Approved (by the policy's `routes` or by an admin): members the policy allows may
    /// use it.
    Approved,
    /// Waiting for an admin (`POST /v1/routes/{id}/approve`) or a policy change.
    #[default]
    Pending,
}

/// Who approved a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovedBy {
    /// The policy's `routes` section.
    Policy,
    /// An admin, through `POST /v1/routes/{id}/approve`.
    Admin,
}

/// One of a member's own advertisements, as [`RegisterResponse::routes`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteState {
    /// The prefix (`"10.1.0.0/16"`; `"0.0.0.0/0"` and `"::/0"` for an exit node).
    pub prefix: String,
    /// Part of an exit node advertisement.
    #[serde(default)]
    pub exit_node: bool,
    /// Whether it is in force.
    pub state: RouteApproval,
}

/// One advertisement, as `GET /v1/routes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// Stable id: hex of the first 8 bytes of blake3(peer_id ‖ `"\0"` ‖ prefix).
    pub id: String,
    /// The advertising member.
    pub peer_id: String,
    /// Its display name.
    pub display_name: String,
    /// The prefix.
    pub prefix: String,
    /// Part of an exit node advertisement.
    #[serde(default)]
    pub exit_node: bool,
    /// Whether it is in force.
    pub state: RouteApproval,
    /// Who approved it; `None` while pending.
    #[serde(default)]
    pub approved_by: Option<ApprovedBy>,
}

/// `GET /v1/routes` (admin), and the answer of `POST|DELETE /v1/routes/{id}/approve`
/// (then holding the one route concerned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesResponse {
    /// Every advertisement, sorted by peer id then prefix.
    pub routes: Vec<RouteInfo>,
}

fn default_dns_domain() -> String {
    dns::DEFAULT_DOMAIN.to_owned()
}

/// One relay a coordinator advertises.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelayInfo {
    /// `https://HOST:PORT`: TLS over TCP (the stream transport, after `Upgrade:
    /// tabbify-relay`) and UDP (the datagram transport) on the same port. `HOST` is the
    /// TLS server name the relay's certificate carries. Also the relay's identity in
    /// heartbeats and rosters (`home_relay`).
    pub url: String,
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
    /// The endpoints STUN servers saw this node's WireGuard socket as (its NAT's mappings),
    /// at most [`MAX_MAPPED_ENDPOINTS`]; replaces the previous list. Empty: not probed.
    #[serde(default)]
    pub mapped_endpoints: Vec<SocketAddr>,
    /// How this node's NAT maps its WireGuard socket, from its STUN probe.
    #[serde(default)]
    pub nat: NatClass,
    /// The URL of this node's home relay (one of the advertised [`RelayInfo::url`]s, the
    /// one with the lowest measured latency), where peers reach it when no direct path
    /// works. `None`: no relay session (none advertised, or none reachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_relay: Option<String>,
    /// How many of this node's peers it reaches directly and how many through a relay.
    #[serde(default)]
    pub paths: PathCounts,
    /// The prefixes this node advertises, as in [`RegisterRequest::advertise_routes`]: the
    /// full list every time (the coordinator writes only on change).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertise_routes: Vec<String>,
    /// As in [`RegisterRequest::advertise_exit_node`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub advertise_exit_node: bool,
    /// As in [`RegisterRequest::concentrator`]: the current value every time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub concentrator: bool,
    /// What this node measured of its own traffic (the dashboard shows it, labelled as
    /// reported by the member). The coordinator keeps only the latest report per member,
    /// in memory (never a database write per heartbeat). `None`: not reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficReport>,
}

/// The most peers one [`TrafficReport`] may list (more: `400` naming `traffic.peers`).
pub const MAX_TRAFFIC_PEERS: usize = 256;

/// A member's own account of its traffic, sent with its heartbeat. These are claims of the
/// member, not measurements of the coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficReport {
    /// Bytes received from all peers since the joiner started.
    pub rx_bytes: u64,
    /// Bytes sent to all peers since the joiner started.
    pub tx_bytes: u64,
    /// Per peer, the busiest first; at most [`MAX_TRAFFIC_PEERS`]. Peer ids the reporter
    /// may not see are dropped by the coordinator.
    #[serde(default)]
    pub peers: Vec<PeerTraffic>,
}

/// One peer's traffic as the reporting member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTraffic {
    /// The peer's id.
    pub peer_id: String,
    /// Bytes received from the peer since the joiner started.
    pub rx_bytes: u64,
    /// Bytes sent to the peer since the joiner started.
    pub tx_bytes: u64,
    /// Seconds since the last completed handshake with the peer; `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake_secs: Option<u64>,
    /// How traffic to the peer goes now.
    pub path: PeerPath,
}

/// The path a member's traffic to one peer takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerPath {
    /// Straight to a UDP endpoint of the peer.
    Direct,
    /// Through a relay.
    Relay,
    /// No working path (no endpoint known and no relay).
    #[default]
    None,
}

impl PeerPath {
    /// The path as the wire spells it (`"direct"`, `"relay"`, `"none"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
            Self::None => "none",
        }
    }
}

/// `POST /v1/relay/token`: a short-lived relay admission for the caller (a registered
/// member; the token binds its identity and its registered WireGuard key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayTokenRequest {
    /// The caller's peer id (must belong to the caller's identity).
    pub peer_id: String,
}

/// A relay token (format: `relay_token` module, with the `tls` feature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayTokenResponse {
    /// The token, for `authorization: Bearer <token>` in the relay's upgrade request.
    pub token: String,
    /// Unix seconds from which relays refuse it (at most 10 minutes after minting).
    pub expires_at: u64,
    /// The WireGuard public key (base64) it names: the only key a session may prove.
    pub public_key: String,
    /// The coordinator's token-signing public key (base64), what relays verify with.
    pub signing_key: String,
}

/// How many peers a node reaches by each path (from its heartbeat).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathCounts {
    /// Peers whose traffic goes straight to a UDP endpoint of theirs.
    pub direct: u32,
    /// Peers whose traffic goes through a relay.
    pub relay: u32,
}

/// The most mapped endpoints a heartbeat may report.
pub const MAX_MAPPED_ENDPOINTS: usize = 4;

/// How a node's NAT maps its WireGuard socket, as its STUN probe classified it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatClass {
    /// Not probed yet, or only one STUN server answered.
    #[default]
    Unknown,
    /// No NAT: a STUN server saw one of the node's own addresses and its listen port.
    None,
    /// The same mapped endpoint towards every STUN server (port-preserving or not): a
    /// peer can reach the node at its mapped endpoint after a hole punch.
    EndpointIndependent,
    /// A different mapped endpoint per destination (a symmetric NAT): direct paths need
    /// the other side to be reachable; otherwise a relay.
    EndpointDependent,
    /// No STUN server answered: UDP out of the WireGuard socket seems blocked.
    UdpBlocked,
}

impl NatClass {
    /// The class in words, for `status`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Unknown => "unknown (not probed, or one STUN server only)",
            Self::None => "no NAT",
            Self::EndpointIndependent => "endpoint-independent NAT (hole punching works)",
            Self::EndpointDependent => "endpoint-dependent (symmetric) NAT",
            Self::UdpBlocked => "UDP blocked (no STUN server answered)",
        }
    }
}

/// The answer to [`HeartbeatRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// Send the next heartbeat within this many seconds.
    pub heartbeat_interval_secs: u64,
    /// Source IP of this request + the registered `wg_listen_port`.
    pub reflexive_endpoint: SocketAddr,
    /// The coordinator's STUN servers, as in [`RegisterResponse::stun_servers`].
    #[serde(default)]
    pub stun_servers: Vec<SocketAddr>,
    /// The relays, as in [`RegisterResponse::relays`].
    #[serde(default)]
    pub relays: Vec<RelayInfo>,
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
/// is allowed in that direction. Ports are destination ports: `outbound`/`inbound` hold
/// the ports open to both TCP and UDP, the `_tcp`/`_udp` lists the ports open to that
/// protocol only (policy `tcp:8730`, `udp:53`; absent in older rosters, which therefore
/// parse with the same meaning). A direction where both TCP and UDP cover every port
/// (`outbound == [PortRange::ALL]`) means all traffic including ICMP. A port allows
/// *opening* a connection or flow to it; the data plane tracks the flow and lets its replies
/// through. Traffic to an app ULA the peer hosts is subject to the same rules as traffic to
/// the peer's own ULA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRules {
    /// Destination ports on this peer that the viewer may open (TCP and UDP).
    pub outbound: Vec<PortRange>,
    /// Destination ports on the viewer that this peer may open (TCP and UDP).
    pub inbound: Vec<PortRange>,
    /// Destination ports on this peer that the viewer may open over TCP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_tcp: Vec<PortRange>,
    /// Destination ports on this peer that the viewer may open over UDP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_udp: Vec<PortRange>,
    /// Destination ports on the viewer that this peer may open over TCP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_tcp: Vec<PortRange>,
    /// Destination ports on the viewer that this peer may open over UDP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_udp: Vec<PortRange>,
}

impl PortRules {
    /// Whether the viewer may open `port` on this peer over TCP or UDP.
    pub fn allows_outbound(&self, port: u16) -> bool {
        let has = |v: &[PortRange]| v.iter().any(|r| r.contains(port));
        has(&self.outbound) || has(&self.outbound_tcp) || has(&self.outbound_udp)
    }

    /// Whether this peer may open `port` on the viewer over TCP or UDP.
    pub fn allows_inbound(&self, port: u16) -> bool {
        let has = |v: &[PortRange]| v.iter().any(|r| r.contains(port));
        has(&self.inbound) || has(&self.inbound_tcp) || has(&self.inbound_udp)
    }

    /// Whether nothing is allowed either way.
    pub fn is_empty(&self) -> bool {
        self.outbound.is_empty()
            && self.inbound.is_empty()
            && self.outbound_tcp.is_empty()
            && self.outbound_udp.is_empty()
            && self.inbound_tcp.is_empty()
            && self.inbound_udp.is_empty()
    }
}

/// A routed prefix the policy opens only on some destination ports
/// ([`RosterEntry::route_ports`], [`RosterEntry::may_use_ports`]): flows may be opened to
/// these ports of hosts inside `prefix`; replies come back, nothing else passes (no ICMP
/// echo: that needs every port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutePorts {
    /// The prefix, canonical (`"10.1.0.0/16"`, `"fd00:1::/64"`); never a default route.
    pub prefix: String,
    /// Destination ports of both TCP and UDP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    /// Destination ports of TCP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<PortRange>,
    /// Destination ports of UDP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub udp: Vec<PortRange>,
}

/// One peer as another peer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// The peer's id (`ula::identity_peer_id(identity)`).
    pub peer_id: String,
    /// The peer's identity: the CN of its mesh certificate. Its ULA and peer id are derived
    /// from it, so joiners can check them.
    pub identity: String,
    /// The peer's ULA (`ula::identity_ula(identity)`).
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
    /// The peer's NAT mappings as STUN servers saw them (its heartbeat's
    /// `mapped_endpoints`); preferred over `reflexive_endpoint` when present.
    #[serde(default)]
    pub mapped_endpoints: Vec<SocketAddr>,
    /// The peer's NAT class, from its heartbeat.
    #[serde(default)]
    pub nat: NatClass,
    /// The peer's home relay URL, from its heartbeat: reach it there (look up its public
    /// key) when no direct path works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_relay: Option<String>,
    /// App ULAs this peer hosts; route them to this peer.
    pub hosted_app_ulas: Vec<Ipv6Addr>,
    /// The ACL between the viewer and this peer, for the data-plane filter.
    pub ports: PortRules,
    /// The peer missed its heartbeats: the coordinator lost contact with it, but its
    /// tunnels and apps stay (the data path may be fine). A heartbeat makes it fresh again;
    /// it is removed (`expired`) only after the coordinator's `--stale-after`.
    #[serde(default)]
    pub stale: bool,
    /// The peer's mesh IPv4 address (`100.64.0.0/10`); put its /32 in the peer's allowed
    /// IPs. `None` from an older coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    /// The peer's approved routes the viewer may send to through it (the policy's allow
    /// rules with a prefix destination, intersected with the route). Exit prefixes
    /// (`0.0.0.0/0`, `::/0`) are included when the viewer may use the peer as an exit node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// The peer is an approved exit node the viewer may use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit_node: bool,
    /// The prefixes of the **viewer's own** approved routes this peer may use through the
    /// viewer: the viewer's data plane admits a packet from the peer to a routed
    /// destination only inside these.
    ///
    /// In a concentrator's roster also: on a [`client`](Self::client) entry, the addresses
    /// that client may send to through the concentrator (each visible member's ULA /128 and
    /// IPv4 /32 and its hosted app ULAs /128); on a member entry, the /128 and /32 of each of
    /// the concentrator's clients this member may reach through it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub may_use: Vec<String>,
    /// Like [`routes`](Self::routes), for the parts the policy opens only on some ports
    /// (a destination `"10.1.0.0/16:443"`): the viewer may open flows to these ports inside
    /// each prefix through the peer. A prefix is listed here or in `routes`, never both
    /// with the same ports: a joiner that ignores this field installs no route for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route_ports: Vec<RoutePorts>,
    /// Like [`may_use`](Self::may_use), for the parts of the viewer's own routes this peer
    /// may use only on some ports: the viewer's data plane admits the peer's flows into
    /// the prefix only to these ports. Never in `may_use` as well, so a router that ignores
    /// this field refuses the traffic instead of opening every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub may_use_ports: Vec<RoutePorts>,
    /// This entry is a stock WireGuard client reached through the concentrator with this
    /// peer id (which is in the same roster): no endpoints, `public_key` is the client's key
    /// (informational), `ports` are the rules between the viewer and the client itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Only in a concentrator's own roster: this entry is a client it serves. Configure it
    /// as a WireGuard peer with no endpoint (it dials in), allowed IPs its ULA /128 and IPv4
    /// /32.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client: bool,
    /// Only in a concentrator's roster, on a member entry: the port rules between this
    /// member and each client of the concentrator that its `may_use` names, from the
    /// member's side ([`ClientPorts`]). The concentrator holds the member to them on
    /// traffic it forwards to the client (the stock client filters nothing).
    ///
    /// Absent from older coordinators. A concentrator fails closed: a client address in
    /// `may_use` without an entry here for that client gets only a reply grant (the member
    /// may answer inside flows the client opened, never open one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_ports: Vec<ClientPorts>,
}

/// The port rules between a member and one client of the concentrator whose roster holds
/// them ([`RosterEntry::client_ports`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientPorts {
    /// The client's peer id (a `client: true` entry of the same roster).
    pub client: String,
    /// The rules as the member sees the client: `outbound` = ports on the client the
    /// member may open, `inbound` = ports on the member the client may open (the same
    /// evaluation as `ports` of the client's entry in the member's own roster).
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
pub struct RosterSnapshot {
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
    /// Why: `expired` (stale for the coordinator's `--stale-after`), `revoked`, `replaced`
    /// (same identity, new key), `policy`.
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
/// a comma-separated list of those, each optionally prefixed `tcp:` or `udp:` (that protocol
/// only; unprefixed = both): `tag:x:tcp:8730,udp:53`. No suffix means all traffic. Traffic from A to B on a
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
    /// Route auto-approval: a prefix (`"10.1.0.0/16"`, `"0.0.0.0/0"`, `"::/0"`) → the
    /// selectors of members whose advertisement of that prefix, or of any prefix inside
    /// it, is approved without an admin.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, Vec<String>>,
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
    /// How many registrations it admits (default 1). 0 means unlimited until it expires
    /// and is refused unless `unlimited` is also `true`.
    #[serde(default = "default_token_uses")]
    pub max_uses: u32,
    /// Must be `true` for `max_uses: 0` (an unlimited-use token).
    #[serde(default)]
    pub unlimited: bool,
    /// If set, only the member whose certificate CN is this identity may use the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
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
    /// The identity the token is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// One entry of `GET /v1/tokens`: a token without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The non-secret id (`DELETE /v1/tokens/{token_id}`).
    pub token_id: String,
    /// Granted tags.
    pub tags: Vec<String>,
    /// Granted name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The identity it is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// When it was minted, Unix seconds (0 if unknown).
    pub created_at: u64,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Admissions allowed (0 = unlimited).
    pub max_uses: u32,
    /// Admissions so far.
    pub uses: u32,
}

/// `POST /v1/mesh/rotate-key`: replace the caller's WireGuard key. Authenticated by the
/// caller's mTLS identity; `old_public_key` must be the key admitted for it. Identity,
/// peer id, ULA, tags, name and hosted apps stay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyRequest {
    /// The caller's peer id.
    pub peer_id: String,
    /// The key admitted now, standard base64.
    pub old_public_key: String,
    /// The new key, standard base64; it must never have been admitted for any identity.
    pub new_public_key: String,
}

/// The answer to [`RotateKeyRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyResponse {
    /// The peer id (unchanged).
    pub peer_id: String,
    /// The ULA (unchanged).
    pub ula: Ipv6Addr,
    /// The key now admitted.
    pub public_key: String,
    /// When it was admitted, Unix seconds.
    pub key_since: u64,
}

/// The answer of the identity lifecycle routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityResponse {
    /// The identity (certificate CN).
    pub identity: String,
    /// Its peer id.
    pub peer_id: String,
    /// Its ULA.
    pub ula: Ipv6Addr,
    /// Whether it is revoked.
    pub revoked: bool,
    /// The key admitted for it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
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
    /// `true` when the peer's identity is now revoked, `false` when it was re-admitted.
    pub revoked: bool,
}

/// One entry of `GET /v1/revocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The revoked peer's id.
    pub peer_id: String,
    /// The revoked identity; empty for a key revoked before revocation was per identity
    /// whose identity is unknown.
    #[serde(default)]
    pub identity: String,
    /// Its last admitted public key, base64 (empty if none).
    pub public_key: String,
    /// When, Unix seconds.
    pub revoked_at: u64,
}

/// `POST /v1/apps/{uuid}/move` (admin): hand an app over to another peer in one roster
/// change (the app's ULA moves from its holder to `to`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveAppRequest {
    /// The peer id that hosts the app from now on.
    pub to: String,
}

/// The answer to [`MoveAppRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveAppResponse {
    /// The app's ULA.
    pub app_ula: Ipv6Addr,
    /// The peer that held it before, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The peer that holds it now.
    pub to: String,
}

/// `POST /v1/policy/test`: may `src` open `proto`/`port` on `dst`?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTestRequest {
    /// The sender: a registered member's peer id, identity, display name or ULA.
    pub src: String,
    /// The receiver, named the same ways.
    pub dst: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// Destination port.
    pub port: u16,
}

/// A policy rule named by its list and index in the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// `allow` or `deny`.
    pub kind: String,
    /// Index in the document's `allow` or `deny` list.
    pub index: usize,
    /// The rule as written.
    pub rule: PolicyRule,
}

/// The answer to [`PolicyTestRequest`], from the policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTestResponse {
    /// Whether the traffic is allowed.
    pub allowed: bool,
    /// The rule that decided: the allow rule that admits it, or the deny rule that
    /// refuses it; `null` when no allow rule matches (default deny).
    pub rule: Option<RuleRef>,
    /// A sentence saying why.
    pub reason: String,
    /// The sender's peer id.
    pub src_peer_id: String,
    /// The receiver's peer id.
    pub dst_peer_id: String,
    /// Policy revision the answer was computed under.
    pub policy_revision: u64,
}

/// `POST /v1/admin/login-links`: a one-time dashboard login link.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginLinkRequest {
    /// Lifetime of the link in seconds (default 600, at most 3600).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// The answer to [`LoginLinkRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginLinkResponse {
    /// The path to open (append it to the coordinator's `https://HOST:PORT`): `/ui/login?link=…`.
    pub path: String,
    /// The secret alone (`tml_…`), shown once.
    pub link: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

/// `GET /v1/admin/session`: the dashboard session of the cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminSession {
    /// The admin identity that minted the login link.
    pub admin: String,
    /// The token to send in `x-csrf-token` with every state-changing request.
    pub csrf_token: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

/// A member as an admin sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminMember {
    /// Peer id.
    pub peer_id: String,
    /// Identity (certificate CN).
    pub identity: String,
    /// Display name.
    pub display_name: String,
    /// ULA.
    pub ula: Ipv6Addr,
    /// Tags.
    pub tags: Vec<String>,
    /// NAT class from its last heartbeat.
    pub nat: NatClass,
    /// Direct and relayed path counts from its last heartbeat.
    pub paths: PathCounts,
    /// Its home relay, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_relay: Option<String>,
    /// Reported endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Announced app ULAs.
    pub hosted_app_ulas: Vec<Ipv6Addr>,
    /// Last register or heartbeat, ms since the epoch.
    pub last_seen_ms: u64,
    /// Missed its heartbeats.
    pub stale: bool,
    /// The latest traffic report it sent with a heartbeat to this coordinator (its own
    /// claims, kept in memory only). `None`: none reported since this coordinator started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<ReportedTraffic>,
}

/// A member's latest [`TrafficReport`] as a coordinator holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedTraffic {
    /// When the coordinator received it, ms since the epoch (handshake ages are as of then).
    pub reported_ms: u64,
    /// The report, with peer ids the reporter may not see dropped.
    #[serde(flatten)]
    pub report: TrafficReport,
}

/// Data of the admin stream's `traffic` event: a member's new traffic report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficEvent {
    /// The reporting member.
    pub peer_id: String,
    /// Its report.
    pub traffic: ReportedTraffic,
}

/// `GET /v1/admin/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminMembersResponse {
    /// Newest event id reflected (the admin stream continues after it).
    pub event_id: u64,
    /// Policy revision in force.
    pub policy_revision: u64,
    /// Every member, by peer id.
    pub members: Vec<AdminMember>,
}

/// A group of members the policy treats alike (same identity-independent tags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReachClass {
    /// Class index (stable within one answer).
    pub id: u32,
    /// The tags its members carry that the policy knows (or the identity, for a member a
    /// `peer:` selector names).
    pub label: String,
    /// Its members' peer ids.
    pub members: Vec<String>,
}

/// One edge of [`ReachResponse`]: members of `from` may open `ports` on members of `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReachEdge {
    /// Sender class.
    pub from: u32,
    /// Receiver class.
    pub to: u32,
    /// The ports, in the policy's syntax (`tcp:22,udp:53,8730`; `*` for all).
    pub ports: String,
}

/// `GET /v1/admin/reach`: who may reach whom, per class of members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReachResponse {
    /// Policy revision in force.
    pub policy_revision: u64,
    /// Classes with at least one member.
    pub classes: Vec<ReachClass>,
    /// Allowed directions between them.
    pub edges: Vec<ReachEdge>,
}

/// `POST /v1/clients` (admin): mint a stock WireGuard client. The coordinator generates its
/// key pair, stores only the public key and returns the private key once, inside
/// [`ClientCreateResponse::config`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCreateRequest {
    /// Display name, as a member's (and not another member's or client's: 409).
    pub name: String,
    /// Tags, as a member's (without `tag:`), at most [`MAX_CLIENT_TAGS`]; the policy applies
    /// to the client by them.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The concentrator: a member's peer id or display name; it must have registered with
    /// `concentrator: true`. Absent: the only live concentrator (none or several: 400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concentrator: Option<String>,
    /// `host:port` written into the file as the peer's `Endpoint`. Absent: the
    /// concentrator's reflexive endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Write the `DNS` line (the concentrator's mesh DNS stub and the mesh domain) into
    /// the file; default `true`. `false` when the concentrator runs with `--dns off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<bool>,
}

/// A stock WireGuard client (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Its peer id (`ula::identity_peer_id(identity)`), the id of `DELETE /v1/clients/{id}`.
    pub id: String,
    /// Its identity: [`CLIENT_IDENTITY_PREFIX`] + a UUID v4.
    pub identity: String,
    /// Display name.
    pub display_name: String,
    /// Tags (without `tag:`).
    pub tags: Vec<String>,
    /// Its ULA (`ula::identity_ula(identity)`).
    pub ula: Ipv6Addr,
    /// Its mesh IPv4 address (`100.64.0.0/10`), unique among members and clients.
    pub ipv4: Ipv4Addr,
    /// Its WireGuard public key, standard base64.
    pub public_key: String,
    /// The peer id of the concentrator that serves it.
    pub concentrator: String,
    /// When it was minted, Unix seconds.
    pub created_at: u64,
}

/// The answer to [`ClientCreateRequest`] (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCreateResponse {
    /// The client.
    pub client: ClientInfo,
    /// The wg-quick file, private key included (shown only here).
    pub config: String,
    /// A PNG of the QR code of `config`, standard base64.
    pub qr_png: String,
}

/// `GET /v1/clients` (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientsResponse {
    /// Every client, sorted by display name.
    pub clients: Vec<ClientInfo>,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `ok` when the service answers.
    pub status: String,
    /// Registered peers, stale ones included.
    pub peers: u64,
    /// Policy revision in force.
    pub policy_revision: u64,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable reason.
    pub error: String,
    /// Machine-readable kind, e.g. `bad_request`, `unauthorized`, `token_used`. Our
    /// services always send it; a body without it (an external auth service) reads as `""`,
    /// so its `error` is not lost.
    #[serde(default)]
    pub code: String,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry() -> RosterEntry {
        RosterEntry {
            peer_id: "00aa".into(),
            identity: "n1".into(),
            ula: "fd5a:1f00:1:2:3::1".parse().unwrap(),
            display_name: "n1".into(),
            tags: vec!["node".into()],
            public_key: "AAAA".into(),
            endpoints: vec!["192.168.1.2:51820".parse().unwrap()],
            reflexive_endpoint: "203.0.113.5:51820".parse().unwrap(),
            mapped_endpoints: vec![],
            nat: NatClass::Unknown,
            home_relay: None,
            hosted_app_ulas: vec!["fd5a:1f02:1:2:3::1".parse().unwrap()],
            ports: PortRules {
                outbound: vec![PortRange::ALL],
                inbound: vec![PortRange {
                    first: 8730,
                    last: 8730,
                }],
                ..Default::default()
            },
            stale: false,
            ipv4: None,
            routes: vec![],
            exit_node: false,
            may_use: vec![],
            route_ports: vec![],
            may_use_ports: vec![],
            via: None,
            client: false,
            client_ports: vec![],
        }
    }

    #[test]
    fn client_types_round_trip() {
        let req: ClientCreateRequest =
            serde_json::from_str(r#"{"name":"phone1","tags":["phone"]}"#).unwrap();
        assert_eq!(req.concentrator, None);
        assert_eq!(req.endpoint, None);
        assert!(serde_json::from_str::<ClientCreateRequest>(r#"{"name":"a","key":"x"}"#).is_err());
        let info = ClientInfo {
            id: ula::identity_peer_id("client/4a2c"),
            identity: "client/4a2c".into(),
            display_name: "phone1".into(),
            tags: vec!["phone".into()],
            ula: ula::identity_ula("client/4a2c"),
            ipv4: "100.64.0.9".parse().unwrap(),
            public_key: "AAAA".into(),
            concentrator: "00aa".into(),
            created_at: 7,
        };
        let resp = ClientCreateResponse {
            client: info.clone(),
            config: "[Interface]\n".into(),
            qr_png: "iVBO".into(),
        };
        let back: ClientCreateResponse =
            serde_json::from_str(&serde_json::to_string(&resp).unwrap()).unwrap();
        assert_eq!(back, resp);
        let list = ClientsResponse {
            clients: vec![info],
        };
        let back: ClientsResponse =
            serde_json::from_str(&serde_json::to_string(&list).unwrap()).unwrap();
        assert_eq!(back, list);
        // The roster flags: absent on ordinary entries (old joiners see the same JSON),
        // round-tripped when set.
        let plain = serde_json::to_value(entry()).unwrap();
        assert!(plain.get("via").is_none() && plain.get("client").is_none());
        let mut e = entry();
        e.via = Some("00bb".into());
        e.client = true;
        let back: RosterEntry = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        let hb: HeartbeatRequest = serde_json::from_str(r#"{"peer_id":"x"}"#).unwrap();
        assert!(!hb.concentrator);
        assert_eq!(DNS_SERVICE_ADDR.to_string(), "fd5a:1f00::53");
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
    fn port_rules_without_protocol_lists_parse_as_before() {
        // A roster from a coordinator that predates protocol rules.
        let old: PortRules =
            serde_json::from_str(r#"{"outbound":[{"first":22,"last":22}],"inbound":[]}"#).unwrap();
        assert_eq!(
            old.outbound,
            vec![PortRange {
                first: 22,
                last: 22
            }]
        );
        assert!(old.outbound_tcp.is_empty() && old.inbound_udp.is_empty());
        // Empty protocol lists are left out, so old joiners see the same JSON as before.
        let v = serde_json::to_value(&old).unwrap();
        assert!(v.get("outbound_tcp").is_none());
        // A TCP-only port round-trips.
        let tcp = PortRules {
            outbound_tcp: vec![PortRange {
                first: 8730,
                last: 8730,
            }],
            ..PortRules::default()
        };
        let back: PortRules = serde_json::from_value(serde_json::to_value(&tcp).unwrap()).unwrap();
        assert_eq!(back, tcp);
        assert!(tcp.allows_outbound(8730) && !tcp.allows_inbound(8730));
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
