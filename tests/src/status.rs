//! What a running joiner reports: `tabbify-mesh status --json` and `tabbify-mesh peers
//! --json`, as typed values.
//!
//! The shapes are the joiner's documented contract; every field of it is required here, so
//! a joiner that drops or renames one fails the parse with the field's name. Fields the
//! contract does not list are ignored.

use std::net::{Ipv6Addr, SocketAddr};

use serde::Deserialize;

/// `tabbify-mesh status --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    /// The TUN interface.
    pub interface: String,
    /// The display name.
    pub name: String,
    /// The coordinator's peer id (16 hex digits).
    pub peer_id: String,
    /// The peer ULA.
    pub ula: Ipv6Addr,
    /// The node public key (base64).
    pub public_key: String,
    /// Tags granted by the coordinator.
    pub tags: Vec<String>,
    /// WireGuard UDP port.
    pub listen_port: u16,
    /// The data-plane driver in use.
    pub driver: String,
    /// A registration succeeded and the roster stream is open.
    pub registered: bool,
    /// The coordinator connection.
    pub coordinator: CoordinatorStatus,
    /// Whether the policy lets this peer host apps.
    pub may_host_apps: bool,
    /// Apps hosted here.
    pub hosted_apps: Vec<HostedApp>,
    /// Visible peers.
    pub peers: Vec<PeerStatus>,
}

/// The `coordinator` object of [`Status`].
#[derive(Debug, Clone, Deserialize)]
pub struct CoordinatorStatus {
    /// The coordinator URL in use.
    pub url: String,
    /// Whether the roster stream is connected.
    pub connected: bool,
    /// The last roster event id seen.
    pub last_event_id: Option<u64>,
}

/// One entry of [`Status::hosted_apps`].
#[derive(Debug, Clone, Deserialize)]
pub struct HostedApp {
    /// The app UUID.
    pub uuid: String,
    /// Its app ULA.
    pub ula: Ipv6Addr,
}

/// One visible peer (an element of `peers --json`).
#[derive(Debug, Clone, Deserialize)]
pub struct PeerStatus {
    /// Peer id.
    pub peer_id: String,
    /// Display name.
    pub name: String,
    /// Peer ULA.
    pub ula: Ipv6Addr,
    /// Tags.
    pub tags: Vec<String>,
    /// Public key (base64).
    pub public_key: String,
    /// Current WireGuard endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Latest completed handshake, Unix seconds.
    pub latest_handshake: Option<u64>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// A handshake completed with the peer's endpoint.
    pub direct: bool,
    /// App ULAs the peer hosts.
    pub app_ulas: Vec<Ipv6Addr>,
    /// Port rules between this node and the peer.
    pub ports: Ports,
}

/// Port rules of a [`PeerStatus`].
#[derive(Debug, Clone, Deserialize)]
pub struct Ports {
    /// Ports on the peer this node may open.
    pub outbound: Vec<PortRange>,
    /// Ports on this node the peer may open.
    pub inbound: Vec<PortRange>,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl PortRange {
    /// Every port (and, in the data-plane filter, every protocol).
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: 65535,
    };
}

impl Status {
    /// The visible peer named `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|peer| peer.name == name)
    }

    /// A one-line digest for failure messages: registration, connection and each peer's
    /// endpoint, handshake, direct flag, app ULAs and outbound ports.
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

    /// Visible peer names, sorted.
    pub fn peer_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.peers.iter().map(|peer| peer.name.clone()).collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let text = r#"{"interface": "tm-sup1", "name": "supervisor-01", "peer_id": "0123456789abcdef",
          "ula": "fd5a:1f00:1:2:3::1", "public_key": "AAAA", "tags": ["supervisor"],
          "listen_port": 51820, "driver": "io_uring", "registered": true,
          "coordinator": {"url": "https://10.77.0.1:8443", "connected": true, "last_event_id": 12},
          "may_host_apps": true, "hosted_apps": [{"uuid": "5b6d0f2e-4c1a-4e8b-9f3d-2a7c6e1b0d94", "ula": "fd5a:1f02:1:2:3::1"}],
          "peers": [{"peer_id": "fedcba9876543210", "name": "supervisor-02", "ula": "fd5a:1f00:4:5:6::1",
            "tags": ["supervisor"], "public_key": "BBBB", "endpoint": "10.77.0.3:51820",
            "latest_handshake": 1795500000, "rx_bytes": 0, "tx_bytes": 0, "direct": true,
            "app_ulas": [], "ports": {"outbound": [{"first": 0, "last": 65535}], "inbound": []},
            "extra": "ignored"}]}"#;
        let status: Status = serde_json::from_str(text).unwrap();
        assert!(status.registered);
        assert_eq!(status.coordinator.last_event_id, Some(12));
        let peer = status.peer("supervisor-02").unwrap();
        assert_eq!(peer.endpoint, Some("10.77.0.3:51820".parse().unwrap()));
        assert_eq!(peer.ports.outbound, vec![PortRange::ALL]);
        assert_eq!(status.peer_names(), vec!["supervisor-02".to_owned()]);

        let missing = text.replace(r#""direct": true,"#, "");
        let error = serde_json::from_str::<Status>(&missing).unwrap_err();
        assert!(error.to_string().contains("direct"), "{error}");
    }
}
