//! What a running joiner reports: `tabbify-mesh status --json` and `tabbify-mesh peers
//! --json`, as typed values: the joiner's own types from `tabbify_api::local`.
//!
//! The contract test below parses the documented example: every field the joiner's types
//! require must be in it, so a joiner that drops or renames one fails the parse with the
//! field's name. Fields the contract does not list are ignored.

pub use tabbify_api::local::{CoordinatorStatus, HostedApp, PeerStatus, Status};
pub use tabbify_api::{PortRange, PortRules};

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
