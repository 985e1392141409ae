//! Mesh DNS: the joiner answers `<name>.<domain>` and `<uuid>.app.<domain>` from the roster
//! it holds, forwards every other name to the host's own resolvers, and points the host's
//! resolver at itself for the domain.
//!
//! * [`zone`] — sans IO: the names the roster implies (forward, and PTR in the reverse
//!   zones of the mesh's own address space) and the answer to one query (hickory-proto
//!   messages).
//! * [`server`] — the UDP and TCP loops on the service addresses and the forwarding.
//! * [`host`] — systemd-resolved, resolvconf or a managed `/etc/resolv.conf`, restored on
//!   exit and, after a crash, on the next start.
//!
//! Service addresses (port 53, UDP and TCP):
//! * [`SERVICE_V6`] `fd5a:1f00::53`, a /128 on the TUN. It lies in the peer prefix but no
//!   peer can hold it (peer ULAs end in `::1` after 48 hash bits). The kernel's local table
//!   delivers the host's own packets to it before the mesh route is consulted, so a query
//!   never enters the engine; and the engine's local set ([`crate::core::local`]) does not
//!   list it, so a packet a peer addresses to it through the tunnel is dropped
//!   (`destination_not_local`): the stub serves this host only.
//! * [`SERVICE_V4`] `127.0.0.153`, for IPv4-only resolver configurations. Loopback is
//!   host-local by definition (the kernel never routes 127/8 off the host), needs no
//!   address or route of ours, and collides neither with CGNAT users of 100.64/10 (where
//!   Tailscale's 100.100.100.100 lives) nor with 169.254.169.254 (cloud metadata) nor with
//!   resolved's 127.0.0.53/127.0.0.54.
//!
//! The domain comes from the coordinator's register answer. A coordinator cannot take over
//! public names: the joiner accepts a domain only if it is `mesh` (the default), under
//! `internal` (ICANN's private-use TLD), a subdomain of `home.arpa` (RFC 8375), under
//! `test` (RFC 6761), or exactly the domain the joiner itself was given with
//! `--dns-domain`. Any other (`com`, `google.com`, the root, the empty name) is refused:
//! nothing is answered from the zone, every query is forwarded, the host is not pointed
//! at the stub for it, and `status` says why.

pub mod host;
pub mod server;
pub mod zone;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use tabbify_api::local::DnsStatus;

use crate::core::net::IpNet;
use crate::sys::link;

pub use host::Mode;
pub use zone::{Member, Zone};

/// The IPv6 service address.
pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0xfd5a, 0x1f00, 0, 0, 0, 0, 0, 0x53);
/// The IPv4 service address (loopback).
pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 153);
/// The port.
pub const PORT: u16 = 53;

/// What `join` is told about DNS.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--dns`.
    pub mode: Mode,
    /// `--dns-domain`: a domain this joiner accepts from the coordinator besides the
    /// private-use ones.
    pub domain: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            domain: None,
        }
    }
}

/// The coordinator's domain `offered`, normalized, if this joiner takes it (see the module
/// docs), else why not.
pub fn accept_domain(offered: &str, pinned: Option<&str>) -> Result<String, String> {
    let d = tabbify_api::dns::normalize_domain(offered).map_err(|e| e.to_string())?;
    if let Some(p) = pinned {
        return if d == p {
            Ok(d)
        } else {
            Err(format!(
                "the coordinator's domain {d:?} is not the --dns-domain {p:?} this joiner was given"
            ))
        };
    }
    let under = |suffix: &str| d == suffix || d.ends_with(&format!(".{suffix}"));
    if d == tabbify_api::dns::DEFAULT_DOMAIN
        || under("internal")
        || under("test")
        || d.ends_with(".home.arpa")
    {
        Ok(d)
    } else {
        Err(format!(
            "the coordinator's domain {d:?} could shadow public names: only \"mesh\" and \
             names under internal, test or home.arpa are taken unless this joiner is started \
             with --dns-domain {d}"
        ))
    }
}

struct Inner {
    domain: Option<String>,
    refused: Option<String>,
    applied: Option<host::Applied>,
    members: Vec<Member>,
    apps: Vec<Ipv6Addr>,
    local_apps: Vec<uuid::Uuid>,
}

/// The running stub.
pub struct Service {
    opts: Options,
    link: String,
    state_dir: PathBuf,
    shared: Arc<server::Shared>,
    inner: Mutex<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Service {
    /// Crash recovery: undoes host changes a previous run left. Call before anything else.
    pub fn recover(state_dir: &std::path::Path) -> anyhow::Result<()> {
        for done in host::recover(state_dir).context("restoring the host's DNS settings")? {
            tracing::info!(%done, "DNS settings left by an earlier run undone");
        }
        Ok(())
    }

    /// Reads the upstream resolvers, puts [`SERVICE_V6`] on `link` and starts serving on
    /// both service addresses. `None` with `--dns off`.
    pub async fn start(
        opts: Options,
        link: &str,
        state_dir: PathBuf,
    ) -> anyhow::Result<Option<Arc<Service>>> {
        if opts.mode == Mode::Off {
            return Ok(None);
        }
        let own = [IpAddr::V6(SERVICE_V6), IpAddr::V4(SERVICE_V4)];
        let upstreams = host::upstreams(&own);
        if upstreams.is_empty() {
            tracing::warn!(
                "no upstream resolver found in {}: names outside the mesh get SERVFAIL",
                host::RESOLV_CONF
            );
        }
        link::add_service_address(link, &IpNet::host(IpAddr::V6(SERVICE_V6)))
            .with_context(|| format!("adding the DNS service address {SERVICE_V6} to {link}"))?;
        let shared = Arc::new(server::Shared::new(upstreams));
        let mut tasks = Vec::new();
        for ip in own {
            let addr = SocketAddr::new(ip, PORT);
            let hint =
                "another resolver or joiner holds it; pass --dns off to run without mesh DNS";
            let udp = tokio::net::UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding the DNS stub on udp {addr} ({hint})"))?;
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the DNS stub on tcp {addr} ({hint})"))?;
            tasks.push(tokio::spawn(server::serve_udp(
                Arc::new(udp),
                shared.clone(),
            )));
            tasks.push(tokio::spawn(server::serve_tcp(tcp, shared.clone())));
        }
        tracing::info!(v6 = %SERVICE_V6, v4 = %SERVICE_V4, upstreams = ?shared.upstreams, "mesh DNS stub listening");
        Ok(Some(Arc::new(Service {
            opts,
            link: link.to_owned(),
            state_dir,
            shared,
            inner: Mutex::new(Inner {
                domain: None,
                refused: None,
                applied: None,
                members: Vec::new(),
                apps: Vec::new(),
                local_apps: Vec::new(),
            }),
            tasks,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The coordinator's domain (from a register answer): taken or refused; the first
    /// domain taken (or a changed one) points the host at the stub.
    pub fn offer_domain(&self, offered: &str) {
        let mut inner = self.lock();
        match accept_domain(offered, self.opts.domain.as_deref()) {
            Ok(d) => {
                inner.refused = None;
                if inner.domain.as_deref() == Some(d.as_str()) && inner.applied.is_some() {
                    return;
                }
                if let Some(old) = inner.applied.take() {
                    host::restore(old);
                }
                tracing::info!(domain = %d, "mesh DNS domain");
                match host::apply(
                    self.opts.mode,
                    &self.link,
                    &d,
                    SERVICE_V6,
                    SERVICE_V4,
                    &self.state_dir,
                ) {
                    Ok(applied) => inner.applied = applied,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "the host's resolver was not pointed at the mesh DNS stub")
                    }
                }
                inner.domain = Some(d);
            }
            Err(why) => {
                if inner.refused.as_deref() != Some(why.as_str()) {
                    tracing::warn!(%why, "mesh DNS domain refused");
                }
                inner.domain = None;
                inner.refused = Some(why);
                if let Some(old) = inner.applied.take() {
                    host::restore(old);
                }
            }
        }
        self.rebuild(&inner);
    }

    /// The members (ourselves included), the app ULAs visible now and the apps hosted
    /// here (by uuid: PTR answers name them).
    pub fn update(
        &self,
        mut members: Vec<Member>,
        mut apps: Vec<Ipv6Addr>,
        mut local_apps: Vec<uuid::Uuid>,
    ) {
        members.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        apps.sort();
        local_apps.sort();
        let mut inner = self.lock();
        if inner.members == members && inner.apps == apps && inner.local_apps == local_apps {
            return;
        }
        inner.members = members;
        inner.apps = apps;
        inner.local_apps = local_apps;
        self.rebuild(&inner);
    }

    fn rebuild(&self, inner: &Inner) {
        let zone = Zone::new(
            inner.domain.as_deref(),
            inner.members.iter().cloned(),
            inner.apps.iter().copied(),
        )
        .with_local_apps(inner.local_apps.iter().copied());
        if *self.shared.zone() != zone {
            self.shared.set_zone(zone);
        }
    }

    /// What `status` shows.
    pub fn status(&self) -> DnsStatus {
        let inner = self.lock();
        DnsStatus {
            address: SERVICE_V6,
            address_v4: SERVICE_V4,
            domain: inner.domain.clone(),
            refused: inner.refused.clone(),
            host: inner
                .applied
                .as_ref()
                .map_or("none", host::Applied::name)
                .to_owned(),
            upstreams: self.shared.upstreams.clone(),
            contested: self.shared.zone().contested().map(str::to_owned).collect(),
            counters: self.shared.counters.snapshot(),
        }
    }

    /// Stops serving and restores the host's settings.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(applied) = self.lock().applied.take() {
            host::restore(applied);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attacker: a malicious coordinator's domain.
    #[test]
    fn public_domains_are_refused_unless_pinned() {
        for ok in [
            "mesh",
            "MESH.",
            "corp.internal",
            "internal",
            "lab.test",
            "x.home.arpa",
        ] {
            assert!(accept_domain(ok, None).is_ok(), "{ok}");
        }
        for bad in [
            "com",
            ".",
            "",
            "google.com",
            "home.arpa",
            "arpa",
            "ip6.arpa",
            "meshx",
            "local",
        ] {
            let e = accept_domain(bad, None).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert_eq!(
            accept_domain("Corp.Example.", Some("corp.example")).unwrap(),
            "corp.example"
        );
        assert!(accept_domain("mesh", Some("corp.example")).is_err());
        assert!(accept_domain("com", Some("corp.example")).is_err());
    }

    #[test]
    fn the_service_address_is_no_peer_ula() {
        assert!(tabbify_api::ula::is_peer_ula(&SERVICE_V6));
        assert_eq!(SERVICE_V6.octets()[15], 0x53);
        assert!(SERVICE_V4.is_loopback());
    }
}
