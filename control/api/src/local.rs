//! The joiner's local control socket, as typed values: the requests `tabbify-mesh
//! status|peers|app ...|rotate-key` send and the status they get back (`status --json`,
//! `peers --json`). The joiner serves them; the CLI and the tests read them.

use std::net::{Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::PortRules;

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The whole status.
    Status,
    /// The peers only.
    Peers,
    /// Host an app here.
    AppAdd {
        /// The app.
        uuid: Uuid,
    },
    /// Stop hosting an app.
    AppRemove {
        /// The app.
        uuid: Uuid,
    },
    /// Rotate the node's WireGuard key now; answered with [`KeyRotated`] once the
    /// coordinator accepted the new key and the data plane uses it.
    RotateKey,
    /// Leave the mesh: the joiner deregisters (`POST /v1/mesh/leave`), answers with
    /// [`crate::LeaveResponse`] and exits.
    Leave,
}

/// The answer to [`Request::RotateKey`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRotated {
    /// The previous public key (base64).
    pub old_public_key: String,
    /// The public key now in use (base64).
    pub public_key: String,
    /// Our peer id (unchanged).
    pub peer_id: String,
    /// Our ULA (unchanged).
    pub ula: Ipv6Addr,
}

/// The coordinator connection as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    /// The URL of the coordinator in use.
    pub url: String,
    /// The address in use, when its host name resolved to several (each a target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    /// Every coordinator target, in the order tried (`--coordinator` order).
    #[serde(default)]
    pub targets: Vec<CoordinatorTarget>,
    /// The SSE stream is open.
    pub connected: bool,
    /// The id of the last roster event applied.
    pub last_event_id: Option<u64>,
}

/// One coordinator target (a `--coordinator` URL, or one address of its host name).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CoordinatorTarget {
    /// The URL.
    pub url: String,
    /// The address, when the host name resolved to several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    /// The joiner talks to this one now.
    pub in_use: bool,
}

/// An app hosted here.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostedApp {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its ULA (on our TUN).
    pub ula: Ipv6Addr,
    /// Another peer holds it at the coordinator (its 409 `app_taken` message); the joiner
    /// keeps claiming it with every heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contested: Option<String>,
}

/// One peer as `peers` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The coordinator's peer id.
    pub peer_id: String,
    /// Display name.
    pub name: String,
    /// Its ULA.
    pub ula: Ipv6Addr,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its public key (base64).
    pub public_key: String,
    /// Where its datagrams go now: its direct endpoint, or the relay's UDP address when
    /// relayed (the relay's URL is `relay`).
    pub endpoint: Option<SocketAddr>,
    /// `"direct"` or `"relay"`.
    #[serde(default = "direct_str")]
    pub path: String,
    /// The relay URL when relayed.
    #[serde(default)]
    pub relay: Option<String>,
    /// Why it is relayed, in words (e.g. "peer behind an endpoint-dependent NAT"); null
    /// when direct (or the reason it would be relayed when no relay is available).
    #[serde(default)]
    pub reason: Option<String>,
    /// Its direct endpoint (where direct probes go), whatever the path.
    #[serde(default)]
    pub direct_endpoint: Option<SocketAddr>,
    /// Its NAT class (from its heartbeat).
    #[serde(default)]
    pub nat: crate::NatClass,
    /// Its NAT's mappings as STUN servers saw them (from its heartbeat).
    #[serde(default)]
    pub mapped_endpoints: Vec<SocketAddr>,
    /// Unix seconds of the last completed handshake.
    pub latest_handshake: Option<u64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// A session with it is live (a handshake completed in the last 3 minutes) and its path
    /// is direct.
    pub direct: bool,
    /// App ULAs it hosts.
    pub app_ulas: Vec<Ipv6Addr>,
    /// The coordinator lost contact with it (missed heartbeats); its tunnel stays.
    #[serde(default)]
    pub stale: bool,
    /// The port rules the filter enforces with it.
    pub ports: PortRules,
}

fn direct_str() -> String {
    "direct".to_owned()
}

/// What `status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// TUN name.
    pub interface: String,
    /// Display name (as the coordinator granted it, else as asked).
    pub name: String,
    /// Our peer id.
    pub peer_id: String,
    /// Our ULA.
    pub ula: Ipv6Addr,
    /// Our public key (base64).
    pub public_key: String,
    /// Tags (as granted, else as asked).
    pub tags: Vec<String>,
    /// UDP listen port.
    pub listen_port: u16,
    /// Data-plane driver.
    pub driver: String,
    /// Registered and streaming.
    pub registered: bool,
    /// The coordinator connection.
    pub coordinator: CoordinatorStatus,
    /// Our endpoint as the coordinator saw it.
    pub reflexive_endpoint: Option<SocketAddr>,
    /// Our NAT class, from the STUN probe.
    #[serde(default)]
    pub nat: crate::NatClass,
    /// Where STUN servers saw our WireGuard socket (our NAT's mappings).
    #[serde(default)]
    pub mapped_endpoints: Vec<SocketAddr>,
    /// The STUN servers the probe uses (the coordinator's and `--stun`).
    #[serde(default)]
    pub stun_servers: Vec<SocketAddr>,
    /// Our home relay (a session is up there), if any.
    #[serde(default)]
    pub home_relay: Option<String>,
    /// The relays in use (`--relay` and the coordinator's), and their state.
    #[serde(default)]
    pub relays: Vec<RelayStatus>,
    /// The policy lets us host apps.
    pub may_host_apps: bool,
    /// Apps hosted here.
    pub hosted_apps: Vec<HostedApp>,
    /// Visible peers.
    pub peers: Vec<PeerStatus>,
    /// Roster entries and events the joiner refused (a coordinator that forged or
    /// contradicted the design), counted by reason since start.
    #[serde(default)]
    pub roster_refused: RosterRefusals,
    /// Packets the data plane dropped, by reason (the engine's snake_case reason names,
    /// e.g. `destination_not_local`, `no_route`); reasons with no drops are left out.
    #[serde(default)]
    pub drops: std::collections::BTreeMap<String, u64>,
    /// ICMP unreachable answers the data plane wrote back to the TUN for packets to mesh
    /// addresses no peer holds.
    #[serde(default)]
    pub unreachable_sent: u64,
    /// Where Prometheus metrics are served (`--metrics-bind`), null when off or not bound.
    #[serde(default)]
    pub metrics: Option<String>,
    /// The mesh DNS stub; `null` when it is off (`--dns off`).
    #[serde(default)]
    pub dns: Option<DnsStatus>,
    /// Subnet routes and exit node (issue 15).
    #[serde(default)]
    pub routes: RoutesStatus,
    /// Stock WireGuard clients served (`join --concentrator`, issue 15); `null` when this
    /// member is no concentrator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concentrator: Option<ConcentratorStatus>,
}

/// A concentrator's clients as `status` shows them ("concentrator: serving N clients").
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConcentratorStatus {
    /// The peer ids of the clients served (each a WireGuard peer of this node).
    #[serde(default)]
    pub serving: Vec<String>,
    /// Client entries of the roster that were refused, as (peer id, why).
    #[serde(default)]
    pub refused: Vec<(String, String)>,
}

/// The joiner's routes as `status` shows them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoutesStatus {
    /// Our mesh IPv4 (`100.64.0.0/10`), once the coordinator gave one.
    #[serde(default)]
    pub ipv4: Option<std::net::Ipv4Addr>,
    /// Our advertisements and their state, from the last registration.
    #[serde(default)]
    pub advertised: Vec<crate::RouteState>,
    /// `--exit-node` as given (`null`: off).
    #[serde(default)]
    pub exit_node: Option<String>,
    /// The peer id of the exit node in use (`null`: none, or not in the roster).
    #[serde(default)]
    pub exit_node_in_use: Option<String>,
    /// The routed prefixes installed, each with the peer id carrying it.
    #[serde(default)]
    pub installed: Vec<(String, String)>,
    /// Offers from the roster that were refused, as (peer id, why).
    #[serde(default)]
    pub refused: Vec<(String, String)>,
}

/// The joiner's mesh DNS stub as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DnsStatus {
    /// The IPv6 service address the stub listens on (UDP and TCP port 53).
    pub address: Ipv6Addr,
    /// The IPv4 service address for IPv4-only resolvers (loopback; UDP and TCP port 53).
    pub address_v4: std::net::Ipv4Addr,
    /// The domain answered (`<name>.<domain>`, `<uuid>.app.<domain>`); `null` until the
    /// coordinator's domain was accepted, or when it was refused (see `refused`).
    pub domain: Option<String>,
    /// Why the coordinator's domain was refused, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// How the host sends mesh names here: `resolved`, `resolvconf`, `file`, or `none`
    /// (not yet, or nothing to do).
    pub host: String,
    /// The upstream resolvers other names are forwarded to.
    pub upstreams: Vec<std::net::SocketAddr>,
    /// Display-name labels several members share: they resolve for nobody.
    #[serde(default)]
    pub contested: Vec<String>,
    /// What the stub did since start.
    #[serde(default)]
    pub counters: DnsCounters,
}

/// The DNS stub's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DnsCounters {
    /// Address (or SOA) answers from the mesh zone.
    pub answered: u64,
    /// NOERROR answers without data (e.g. `A` on a member name).
    pub nodata: u64,
    /// NXDOMAIN answers for unknown mesh names.
    pub nxdomain: u64,
    /// Queries forwarded upstream.
    pub forwarded: u64,
    /// Forwards no upstream answered (SERVFAIL sent).
    pub upstream_failed: u64,
    /// Malformed or unsupported queries.
    pub malformed: u64,
    /// Dropped: responses sent to the stub, or over its limits.
    pub dropped: u64,
}

/// One relay as `status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayStatus {
    /// Its URL.
    pub url: String,
    /// A session is up.
    pub session: bool,
    /// Its UDP side is bound (else frames go over the TLS stream).
    pub udp_bound: bool,
    /// The last connection error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counts of what the joiner refused from the coordinator's roster, by reason. Each
/// standing refusal counts once when it appears (a forged entry repeated in every
/// snapshot counts once until it goes away and comes back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RosterRefusals {
    /// The peer id is not `identity_peer_id(identity)`.
    pub bad_peer_id: u64,
    /// The ULA is not `identity_ula(identity)`.
    pub bad_ula: u64,
    /// The public key is not 32 bytes of standard base64.
    pub bad_public_key: u64,
    /// A hosted app ULA outside `fd5a:1f02::/32`.
    pub bad_app_ula: u64,
    /// An endpoint or reflexive endpoint that is not a usable unicast address.
    pub bad_endpoint: u64,
    /// A second peer claiming a ULA (or peer id) another peer holds.
    pub duplicate_ula: u64,
    /// A second peer claiming a public key another peer holds.
    pub duplicate_public_key: u64,
    /// A second peer claiming an app ULA another peer holds (only that app is refused).
    pub duplicate_app: u64,
    /// A hole punch towards an address that is not a usable unicast address.
    pub bad_hole_punch: u64,
    /// A registration answer whose ULA or peer id is not the one derived from our identity.
    pub bad_registration: u64,
}

impl RosterRefusals {
    /// Every refusal, all reasons together.
    pub fn total(&self) -> u64 {
        self.bad_peer_id
            + self.bad_ula
            + self.bad_public_key
            + self.bad_app_ula
            + self.bad_endpoint
            + self.duplicate_ula
            + self.duplicate_public_key
            + self.duplicate_app
            + self.bad_hole_punch
            + self.bad_registration
    }
}

impl Status {
    /// The visible peer named `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|peer| peer.name == name)
    }

    /// Visible peer names, sorted.
    pub fn peer_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.peers.iter().map(|peer| peer.name.clone()).collect();
        names.sort();
        names
    }

    /// A one-line digest (for logs and failure messages): registration, connection and
    /// each peer's endpoint, handshake, direct flag, app ULAs and outbound ports.
    pub fn summary(&self) -> String {
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|peer| {
                format!(
                    "{} ({}) endpoint {} handshake {} direct {} apps {:?} out {:?}",
                    peer.name,
                    peer.ula,
                    peer.endpoint
                        .map_or_else(|| "none".to_owned(), |e| e.to_string()),
                    peer.latest_handshake
                        .map_or_else(|| "never".to_owned(), |t| t.to_string()),
                    peer.direct,
                    peer.app_ulas,
                    peer.ports
                        .outbound
                        .iter()
                        .map(|r| format!("{}-{}", r.first, r.last))
                        .collect::<Vec<_>>()
                )
            })
            .collect();
        format!(
            "{} ({}) registered {} connected {} hosted {:?} peers [{}]",
            self.name,
            self.ula,
            self.registered,
            self.coordinator.connected,
            self.hosted_apps.iter().map(|a| a.ula).collect::<Vec<_>>(),
            peers.join("; ")
        )
    }
}
