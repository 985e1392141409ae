//! The device as the control side sees it: `wg show` / `wg set` over the UAPI socket,
//! mapped onto the table. Runs on the UAPI thread, never on the hot path.
//!
//! What `wg set` can change at runtime: peers (add, update, remove, replace all), their
//! endpoints, AllowedIPs, pre-shared keys and keepalives, and the private key. The listen
//! port and fwmark are fixed for the engine's life (the sockets are open); asking to change
//! the port is refused with `EINVAL`, as is any request the table cannot honour.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Key;
use crate::core::peer::PeerConfig;
use crate::core::table::Table;
use crate::driver::Shared;
use crate::uapi::{DeviceStatus, DeviceUpdate, UapiErrno, UapiHandler, UapiPeerStatus, UapiServer};

/// Serves `/var/run/wireguard/<name>.sock` until the returned server is dropped.
pub fn serve_uapi(name: &str, table: Arc<Table>, shared: Shared) -> std::io::Result<UapiServer> {
    UapiServer::bind(name, Arc::new(Device { table, shared }))
}

/// The UAPI view of one device.
pub struct Device {
    table: Arc<Table>,
    /// The running engine's shared state (drop counters for status and metrics).
    pub shared: Shared,
}

impl Device {
    /// The device for a table and running engine.
    pub fn new(table: Arc<Table>, shared: Shared) -> Self {
        Self { table, shared }
    }
}

impl UapiHandler for Device {
    fn get(&self) -> DeviceStatus {
        let snap = self.table.load_full();
        let now = SystemTime::now();
        let peers = snap
            .peers
            .iter()
            .map(|e| {
                let st = e.peer.lock();
                let since = st.tunn.time_since_last_handshake();
                let endpoint = st.endpoint;
                drop(st);
                let last_handshake = since
                    .and_then(|d| now.checked_sub(d))
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                UapiPeerStatus {
                    public_key: Key(e.peer.public_key),
                    preshared_key: e.peer.config.preshared_key.map(Key),
                    endpoint,
                    allowed_ips: e.allowed_ips.clone(),
                    last_handshake,
                    rx_bytes: e
                        .peer
                        .stats
                        .rx_bytes
                        .load(std::sync::atomic::Ordering::Relaxed),
                    tx_bytes: e
                        .peer
                        .stats
                        .tx_bytes
                        .load(std::sync::atomic::Ordering::Relaxed),
                    persistent_keepalive: e.peer.config.persistent_keepalive,
                }
            })
            .collect();
        DeviceStatus {
            private_key: Some(Key(snap.private_key.to_bytes())),
            listen_port: snap.listen_port,
            fwmark: self.shared.fwmark,
            peers,
        }
    }

    fn set(&self, u: DeviceUpdate) -> Result<(), UapiErrno> {
        if let Some(port) = u.listen_port {
            if port != self.table.load().listen_port {
                return Err(UapiErrno::Invalid);
            }
        }
        if let Some(k) = u.private_key {
            // An all-zero key means "remove the private key"; a running engine keeps one.
            if k.is_zero() {
                return Err(UapiErrno::Invalid);
            }
            self.table
                .set_private_key(boringtun::x25519::StaticSecret::from(k.0));
        }
        if u.replace_peers {
            self.table.clear_peers();
        }
        for p in u.peers {
            let key = p.public_key.0;
            if p.remove {
                self.table.remove_peer(&key);
                continue;
            }
            let snap = self.table.load_full();
            let existing = snap.peers.iter().find(|e| e.peer.public_key == key);
            if existing.is_none() && p.update_only {
                continue;
            }
            let (mut allowed, psk, keepalive, endpoint) = match existing {
                Some(e) => (
                    e.allowed_ips.clone(),
                    e.peer.config.preshared_key,
                    e.peer.config.persistent_keepalive,
                    e.peer.lock().endpoint,
                ),
                None => (Vec::new(), None, None, None),
            };
            if p.replace_allowed_ips {
                allowed.clear();
            }
            for n in p.allowed_ips {
                let n = n.network();
                if !allowed.contains(&n) {
                    allowed.push(n);
                }
            }
            let cfg = PeerConfig {
                public_key: key,
                preshared_key: match p.preshared_key {
                    Some(k) => k.filter(|k| !k.is_zero()).map(|k| k.0),
                    None => psk,
                },
                endpoint: p.endpoint.or(endpoint),
                allowed_ips: allowed,
                persistent_keepalive: match p.persistent_keepalive {
                    Some(0) => None,
                    Some(k) => Some(k),
                    None => keepalive,
                },
            };
            self.table
                .upsert_peer(cfg)
                .map_err(|_| UapiErrno::Invalid)?;
        }
        Ok(())
    }
}
