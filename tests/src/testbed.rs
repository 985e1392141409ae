//! The mesh scenarios' common ground: a public [`Lan`], the PKI, a coordinator with mTLS in
//! the LAN's namespace, an admin client, and a way to add hosts and joiners to it.
//!
//! ```text
//!   LAN namespace: br0 10.200.0.1/24, tabbify-mesh-coordinator on 10.200.0.1:8443 (mTLS)
//!     ├── host namespace (10.200.0.N)      tabbify-mesh join …
//!     └── router namespace (10.200.0.M) ── NAT ── host namespace (192.168.X.2)
//! ```
//!
//! Every joiner gets its own client certificate (CN = its name) and a single-use join token
//! from the admin API carrying its tags; the admin's certificate CN is [`ADMIN`].

use std::net::SocketAddr;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::admin::Admin;
use crate::coordinator::{Coordinator, CoordinatorSpec};
use crate::joiner::{JoinSpec, Joiner};
use crate::lan::{Lan, LanPort};
use crate::netns::Netns;
use crate::pki::Pki;

/// The admin identity (certificate CN) the coordinator is started with.
pub const ADMIN: &str = "mesh-admin";

/// The coordinator's port on the LAN.
pub const COORDINATOR_PORT: u16 = 8443;

/// A coordinator on a public LAN, ready for hosts and joiners.
pub struct Testbed {
    /// The public LAN; the coordinator runs in its namespace.
    pub lan: Lan,
    /// The mesh PKI.
    pub pki: Pki,
    /// The coordinator.
    pub coordinator: Coordinator,
    /// The admin client (runs curl in the LAN namespace).
    pub admin: Admin,
}

impl Testbed {
    /// Builds the LAN and the PKI and starts the coordinator with `policy` and
    /// `--heartbeat-secs heartbeat_secs`.
    pub fn start(policy: Value, heartbeat_secs: u64) -> Result<Testbed> {
        let lan = Lan::new()?;
        let pki = Pki::new(&[lan.addr().into()])?;
        let coordinator = Coordinator::start(
            lan.netns(),
            &pki,
            CoordinatorSpec {
                bind: SocketAddr::new(lan.addr().into(), COORDINATOR_PORT),
                policy,
                admin: ADMIN.to_owned(),
                heartbeat_secs,
                relay: false,
                relay_urls: Vec::new(),
            },
        )?;
        let admin_cert = pki.issue_admin(ADMIN)?;
        let admin = Admin::new(lan.netns(), &coordinator.url(), admin_cert);
        Ok(Testbed {
            lan,
            pki,
            coordinator,
            admin,
        })
    }

    /// A new host namespace plugged into the LAN.
    pub fn host(&self) -> Result<(Netns, LanPort)> {
        let netns = Netns::new()?;
        let port = self.lan.attach(&netns)?;
        Ok((netns, port))
    }

    /// Issues a certificate for `spec.name` and, unless the spec has one, a single-use join
    /// token for `spec.tags`; starts the joiner in `netns` and waits for its registration.
    pub fn join(&self, netns: &Netns, mut spec: JoinSpec) -> Result<Joiner> {
        let cert = self.pki.issue_peer(&spec.name)?;
        if spec.join_token.is_none() {
            spec.join_token = Some(self.token_for(&spec)?);
        }
        Joiner::start(netns, &self.coordinator.url(), &cert, spec)
    }

    /// A single-use join token granting `spec.tags`.
    pub fn token_for(&self, spec: &JoinSpec) -> Result<String> {
        let tags: Vec<&str> = spec.tags.iter().map(String::as_str).collect();
        self.admin
            .create_token(&tags, None, 1)
            .with_context(|| format!("a join token for {}", spec.name))
    }
}
