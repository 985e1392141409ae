//! `tabbify-mesh join`: the control task that turns the coordinator's roster into the data
//! plane's table.
//!
//! ```text
//! start: node key (state dir) ─▶ engine (TUN + workers) ─▶ peer ULA + hosted app ULAs on the TUN
//! session loop (tokio, one thread):
//!   register ─▶ roster ─▶ reconcile ─▶ heartbeat (apps) ─▶ SSE stream ─┬▶ event ─▶ reconcile
//!                                                                     ├▶ heartbeat tick / `app add`
//!                                                                     └▶ stream ends ─▶ backoff ─▶ register again
//! ```
//!
//! Invariants:
//! * the table only changes through `Joiner::reconcile`, which diffs the desired peers
//!   against what it applied last and touches only peers that changed, so a roster event
//!   never resets another peer's session;
//! * a coordinator outage never touches the table: established tunnels keep working, and
//!   the loop re-registers with backoff (0.5 s doubling to the heartbeat interval);
//! * the node key never leaves the state directory; only its public half is sent.
//!
//! Files: [`client`] (HTTPS/SSE to the coordinator), [`roster`] (sans-IO roster and the
//! desired peers), [`control`] (the local socket), [`state_dir`] (key, hosted apps).

pub mod client;
pub mod control;
pub mod roster;
pub mod state_dir;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use base64::Engine as _;
use tabbify_api::{
    self as api, HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse, SseEvent,
};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::core::filter::PortFilter;
use crate::core::net::IpNet;
use crate::core::peer::PeerConfig;
use crate::core::table::Table;
use crate::driver::{DriverKind, Engine, EngineOptions};
use crate::sys::{ifaddrs, link};

use client::{Client, ClientError};
use control::{CoordinatorStatus, HostedApp, PeerStatus, Request, Status};
use roster::{Applied, Desired, Roster, SelfView, KEEPALIVE_SECS};
use state_dir::StateDir;

/// The TLS files of the joiner's identity.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The mesh CA (PEM).
    pub ca: PathBuf,
}

/// Everything `join` is told.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// Display name asked for.
    pub name: String,
    /// Tags asked for.
    pub tags: Vec<String>,
    /// Coordinator URL.
    pub coordinator: String,
    /// mTLS files; `None` = plaintext (`--insecure-no-mtls`).
    pub tls: Option<TlsFiles>,
    /// Join token.
    pub join_token: Option<String>,
    /// TUN name.
    pub interface: String,
    /// UDP listen port.
    pub listen_port: u16,
    /// TUN MTU.
    pub mtu: u32,
    /// State directory.
    pub state_dir: PathBuf,
    /// Engine options.
    pub threads: usize,
    /// Forced driver.
    pub driver: Option<DriverKind>,
    /// Offloads on.
    pub offloads: bool,
    /// Pin workers to cores.
    pub pin: bool,
    /// Endpoints to report (empty = every non-loopback address + the listen port).
    pub endpoints: Vec<SocketAddr>,
    /// Control socket path.
    pub control_socket: PathBuf,
}

/// A handshake that completed within this long means a live (direct) session.
const LIVE_SESSION: Duration = Duration::from_secs(180);
/// Initiations in a hole-punch burst, and the gap between them.
const PUNCH_BURST: u32 = 8;
const PUNCH_GAP: Duration = Duration::from_millis(125);

/// The joiner's mutable control state (short critical sections, never held across await).
struct Inner {
    roster: Roster,
    me: SelfView,
    applied: BTreeMap<[u8; 32], Desired>,
    routes: BTreeSet<IpNet>,
    registered: bool,
    connected: bool,
    ever_registered: bool,
    may_host_apps: Option<bool>,
    display_name: String,
    tags: Vec<String>,
    apps: Vec<Uuid>,
    heartbeat: Duration,
    /// After a re-registration, peers missing from the fresh roster are kept until then:
    /// they may not have re-registered yet (a coordinator restart), and dropping them
    /// would reset working sessions. Explicit removals and policy changes act at once.
    grace_until: Option<tokio::time::Instant>,
    /// Peers removed by an explicit `peer_remove` during the grace period.
    removed: BTreeSet<String>,
}

/// The running joiner.
pub struct Joiner {
    opts: JoinOptions,
    engine: Engine,
    table: Arc<Table>,
    client: Client,
    state: StateDir,
    public_key: [u8; 32],
    peer_id: String,
    ula: Ipv6Addr,
    inner: Mutex<Inner>,
    heartbeat_now: Notify,
}

/// Runs the joiner until SIGINT/SIGTERM (Ok) or a permanent refusal (Err).
pub fn run(opts: JoinOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: JoinOptions) -> anyhow::Result<()> {
    let tls = match &opts.tls {
        Some(f) => {
            let read = |p: &PathBuf, what: &str| {
                std::fs::read_to_string(p).with_context(|| format!("{what} {}", p.display()))
            };
            let cert = read(&f.cert, "--tls-cert")?;
            let key = read(&f.key, "--tls-key")?;
            let ca = read(&f.ca, "--tls-ca")?;
            Some(tabbify_api::tls::client_config(&ca, Some((&cert, &key))).context("TLS files")?)
        }
        None => None,
    };
    let identity = opts.tls.is_none().then(|| opts.name.clone());
    let client = Client::new(&opts.coordinator, tls, identity)?;
    let state = StateDir::open(&opts.state_dir)?;
    let key = state.node_key()?;
    let public_key = crate::config::public_key(&key).0;
    let ula = tabbify_api::ula::peer_ula(&public_key);
    let peer_id = tabbify_api::ula::peer_id(&public_key);
    let apps = state.apps()?;
    let server = control::Server::bind(&opts.control_socket)?;

    let table = Arc::new(Table::new(
        boringtun::x25519::StaticSecret::from(key.0),
        opts.listen_port,
    ));
    let engine = Engine::start(
        &EngineOptions {
            interface: opts.interface.clone(),
            threads: opts.threads,
            driver: opts.driver,
            offloads: opts.offloads,
            listen_port: opts.listen_port,
            pin: opts.pin,
        },
        table.clone(),
    )
    .with_context(|| format!("starting the engine on {}", opts.interface))?;
    engine.info.log(&opts.interface);
    link::up(&opts.interface, opts.mtu)?;
    link::add_address(&opts.interface, &IpNet::host(IpAddr::V6(ula)))?;
    for a in &apps {
        let app = tabbify_api::ula::app_ula(a);
        link::add_address(&opts.interface, &IpNet::host(IpAddr::V6(app)))?;
    }
    let uapi = crate::device::serve_uapi(&opts.interface, table.clone(), engine.shared.clone())
        .with_context(|| format!("opening the UAPI socket for {}", opts.interface))?;

    let joiner = Arc::new(Joiner {
        inner: Mutex::new(Inner {
            roster: Roster::new(&peer_id),
            me: SelfView {
                peer_id: peer_id.clone(),
                reflexive: None,
            },
            applied: BTreeMap::new(),
            routes: BTreeSet::new(),
            registered: false,
            connected: false,
            ever_registered: false,
            may_host_apps: None,
            display_name: opts.name.clone(),
            tags: opts.tags.clone(),
            apps,
            heartbeat: Duration::from_secs(10),
            grace_until: None,
            removed: BTreeSet::new(),
        }),
        opts,
        engine,
        table,
        client,
        state,
        public_key,
        peer_id,
        ula,
        heartbeat_now: Notify::new(),
    });
    tracing::info!(peer_id = %joiner.peer_id, ula = %joiner.ula, coordinator = %joiner.client.url(), "joining");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let serve = server.serve(joiner.clone());
    let sessions = joiner.clone().sessions();
    let failed = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if joiner.engine.failed() {
                return;
            }
        }
    };
    let result = tokio::select! {
        _ = sigterm.recv() => Ok(()),
        _ = sigint.recv() => Ok(()),
        _ = serve => Ok(()),
        r = sessions => r,
        _ = failed => Err(anyhow::anyhow!("a data-plane worker failed; see the log above")),
    };
    drop(server);
    drop(uapi);
    let Ok(joiner) = Arc::try_unwrap(joiner) else {
        bail!("internal: the joiner is still shared at shutdown");
    };
    let drops = joiner.engine.shared.counters.nonzero();
    joiner.engine.stop();
    for (reason, n) in drops {
        tracing::info!(reason = reason.name(), count = n, "dropped packets");
    }
    if result.is_ok() {
        tracing::info!("interface removed; bye");
    }
    result
}

impl Joiner {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Register, stream, repeat, until a permanent refusal.
    async fn sessions(self: Arc<Self>) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(500);
        loop {
            let r = self.session(&mut backoff).await;
            {
                let mut g = self.lock();
                g.registered = false;
                g.connected = false;
            }
            match r {
                Ok(()) => tracing::warn!("coordinator closed the roster stream; reconnecting"),
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "coordinator");
                }
                Err(e) => {
                    let ever = self.lock().ever_registered;
                    if e.code() == Some("revoked") {
                        self.table.clear_peers();
                        bail!("this node was revoked by the coordinator: {e}");
                    }
                    if !ever {
                        bail!("registration refused: {e}");
                    }
                    tracing::error!(error = %e, retry_in = ?backoff, "coordinator refused us; retrying");
                }
            }
            tokio::time::sleep(backoff).await;
            let cap = self.lock().heartbeat.max(Duration::from_secs(1));
            backoff = (backoff * 2).min(cap);
        }
    }

    fn endpoints(&self) -> Vec<SocketAddr> {
        if !self.opts.endpoints.is_empty() {
            return self.opts.endpoints.clone();
        }
        let port = self.engine.info.listen_port;
        let mut out = Vec::new();
        for a in ifaddrs::list().unwrap_or_default() {
            if a.interface == self.opts.interface || a.addr.is_loopback() {
                continue;
            }
            let keep = match a.addr {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => {
                    // Link-local needs a scope; our own mesh addresses are not underlay.
                    (v6.segments()[0] & 0xffc0) != 0xfe80
                        && !tabbify_api::ula::is_peer_ula(&v6)
                        && !tabbify_api::ula::is_app_ula(&v6)
                }
            };
            if keep && (self.engine.shared.udp.ipv6 || a.addr.is_ipv4()) {
                let ep = SocketAddr::new(a.addr, port);
                if !out.contains(&ep) {
                    out.push(ep);
                }
            }
        }
        out
    }

    async fn register(&self) -> Result<RegisterResponse, ClientError> {
        let ever = self.lock().ever_registered;
        let mut req = RegisterRequest {
            name: self.opts.name.clone(),
            public_key: base64::engine::general_purpose::STANDARD.encode(self.public_key),
            tags: self.opts.tags.clone(),
            wg_listen_port: self.engine.info.listen_port,
            endpoints: self.endpoints(),
            // A single-use token is spent by the first registration: later ones go
            // without it (the key is admitted) and fall back to it only if refused.
            join_token: if ever {
                None
            } else {
                self.opts.join_token.clone()
            },
        };
        match self.client.post(api::PATH_REGISTER, &req).await {
            Err(ClientError::Status { status, .. })
                if ever
                    && status == http::StatusCode::UNAUTHORIZED
                    && self.opts.join_token.is_some() =>
            {
                req.join_token = self.opts.join_token.clone();
                self.client.post(api::PATH_REGISTER, &req).await
            }
            r => r,
        }
    }

    async fn session(&self, backoff: &mut Duration) -> Result<(), ClientError> {
        let resp = self.register().await?;
        if resp.ula != self.ula {
            tracing::warn!(ours = %self.ula, coordinator = %resp.ula, "the coordinator derives another ULA for our key");
        }
        {
            let mut g = self.lock();
            if g.ever_registered {
                // Peers re-register at their own pace after a coordinator restart; the
                // coordinator expires a silent peer after this many heartbeats anyway.
                let window = Duration::from_secs(resp.heartbeat_interval_secs.clamp(1, 3600))
                    * api::MISSED_HEARTBEATS_TO_EXPIRE;
                g.grace_until = Some(tokio::time::Instant::now() + window);
                g.removed.clear();
            }
            g.ever_registered = true;
            g.may_host_apps = Some(resp.may_host_apps);
            g.display_name = resp.display_name.clone();
            g.tags = resp.tags.clone();
            g.heartbeat = Duration::from_secs(resp.heartbeat_interval_secs.clamp(1, 3600));
            g.me.reflexive = Some(resp.reflexive_endpoint);
            g.roster.replace(resp.roster);
            if !resp.may_host_apps && !g.apps.is_empty() {
                tracing::warn!(
                    apps = g.apps.len(),
                    "the policy does not let this node host apps; hosted apps are not advertised"
                );
            }
        }
        tracing::info!(name = %resp.display_name, peer_id = %resp.peer_id, ula = %resp.ula, tags = ?resp.tags, reflexive = %resp.reflexive_endpoint, "registered");
        self.reconcile();
        self.heartbeat().await?;
        let mut stream = self.client.stream(api::PATH_PEERS_STREAM).await?;
        {
            let mut g = self.lock();
            g.registered = true;
            g.connected = true;
        }
        *backoff = Duration::from_millis(500);
        let period = self.lock().heartbeat;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = stream.next() => {
                    let Some((id, ev)) = ev? else { return Ok(()) };
                    let applied = {
                        let mut g = self.lock();
                        match &ev {
                            SseEvent::PeerRemove(r) => {
                                g.removed.insert(r.peer_id.clone());
                            }
                            SseEvent::Policy(_) => g.grace_until = None,
                            _ => {}
                        }
                        g.roster.apply(id, ev)
                    };
                    match applied {
                        Applied::Changed => self.reconcile(),
                        Applied::Unchanged => {}
                        Applied::HolePunch { public_key, endpoint } => self.hole_punch(&public_key, endpoint),
                    }
                }
                _ = tick.tick() => {
                    self.end_grace_if_over();
                    self.heartbeat_or_reregister().await?;
                }
                _ = self.heartbeat_now.notified() => self.heartbeat_or_reregister().await?,
            }
        }
    }

    async fn heartbeat_or_reregister(&self) -> Result<(), ClientError> {
        match self.heartbeat().await {
            // The coordinator forgot us (restart, expiry): register again right away.
            Err(ClientError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => {
                Err(ClientError::Transport(
                    "the coordinator no longer knows us".into(),
                ))
            }
            Err(e) if e.is_transient() => {
                // The stream notices a dead coordinator; a lost heartbeat is not fatal.
                tracing::warn!(error = %e, "heartbeat failed");
                Ok(())
            }
            r => r,
        }
    }

    async fn heartbeat(&self) -> Result<(), ClientError> {
        let hosted: Vec<Ipv6Addr> = {
            let g = self.lock();
            if g.may_host_apps == Some(true) {
                g.apps.iter().map(tabbify_api::ula::app_ula).collect()
            } else {
                Vec::new()
            }
        };
        let req = HeartbeatRequest {
            peer_id: self.peer_id.clone(),
            endpoints: self.endpoints(),
            hosted_app_ulas: hosted,
        };
        let resp: HeartbeatResponse = self.client.post(api::PATH_HEARTBEAT, &req).await?;
        let changed = {
            let mut g = self.lock();
            g.heartbeat = Duration::from_secs(resp.heartbeat_interval_secs.clamp(1, 3600));
            let changed = g.me.reflexive != Some(resp.reflexive_endpoint);
            g.me.reflexive = Some(resp.reflexive_endpoint);
            changed
        };
        if changed {
            self.reconcile();
        }
        Ok(())
    }

    fn end_grace_if_over(&self) {
        let over = {
            let mut g = self.lock();
            let over = g
                .grace_until
                .is_some_and(|t| tokio::time::Instant::now() >= t);
            if over {
                g.grace_until = None;
                g.removed.clear();
            }
            over
        };
        if over {
            self.reconcile();
        }
    }

    /// Makes the table and the kernel routes match the roster; touches only what changed.
    fn reconcile(&self) {
        let mut g = self.lock();
        let desired = g.roster.desired(&g.me);
        let grace = g
            .grace_until
            .is_some_and(|t| tokio::time::Instant::now() < t);
        let mut next = desired.clone();
        let mut fresh = Vec::new();
        for (key, d) in &desired {
            let before = g.applied.get(key);
            if before == Some(d) {
                continue;
            }
            let endpoint_changed = before.map(|b| b.endpoint) != Some(d.endpoint);
            let cfg = PeerConfig {
                public_key: *key,
                preshared_key: None,
                // Keep an endpoint learned by roaming unless the roster's choice changed.
                endpoint: if endpoint_changed { d.endpoint } else { None },
                allowed_ips: d.allowed_ips.clone(),
                persistent_keepalive: Some(KEEPALIVE_SECS),
            };
            let filter = PortFilter::from_ranges(&d.outbound, &d.inbound);
            match self.table.upsert_peer_with_filter(cfg, Some(filter)) {
                Ok(peer) => {
                    if before.is_none() {
                        fresh.push(peer);
                        tracing::info!(peer = %d.name, peer_id = %d.peer_id, ula = %d.ula, endpoint = ?d.endpoint, "peer added");
                    } else {
                        tracing::info!(peer = %d.name, peer_id = %d.peer_id, "peer updated");
                    }
                }
                Err(e) => tracing::error!(peer = %d.peer_id, error = %e, "peer not added"),
            }
        }
        for (key, d) in &g.applied {
            if !desired.contains_key(key) {
                if grace && !g.removed.contains(&d.peer_id) {
                    next.insert(*key, d.clone());
                    continue;
                }
                self.table.remove_peer(key);
                tracing::info!(peer = %d.name, peer_id = %d.peer_id, "peer removed");
            }
        }
        let wanted: BTreeSet<IpNet> = next
            .values()
            .flat_map(|d| d.allowed_ips.iter().copied())
            .collect();
        let add: Vec<IpNet> = wanted.difference(&g.routes).copied().collect();
        let del: Vec<IpNet> = g.routes.difference(&wanted).copied().collect();
        if let Err(e) = link::sync_routes(&self.opts.interface, &add, &del) {
            tracing::error!(error = %e, "routes");
        }
        g.routes = wanted;
        g.applied = next;
        drop(g);
        // Start sessions with new peers now: the first packet then finds a live session,
        // and NAT mappings open from both sides.
        for p in fresh {
            if let Err(e) = self.engine.handshaker().initiate(&p) {
                tracing::debug!(error = %e, "handshake initiation not sent");
            }
        }
    }

    /// Sends a burst of handshake initiations to `endpoint` so that both NATs open.
    fn hole_punch(&self, public_key: &str, endpoint: SocketAddr) {
        let Some(key) = roster::decode_key(public_key) else {
            return;
        };
        let snap = self.table.load_full();
        let Some(peer) = snap.by_key(&key).cloned() else {
            return;
        };
        tracing::info!(peer = %public_key, %endpoint, "hole punching");
        peer.lock().endpoint = Some(endpoint);
        let started = std::time::Instant::now();
        let hs = match self.engine.handshaker().try_clone() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "hole punch not sent");
                return;
            }
        };
        tokio::spawn(async move {
            for _ in 0..PUNCH_BURST {
                // Stop once a handshake completed after the burst began.
                if handshake_age(&peer).is_some_and(|age| age < started.elapsed()) {
                    break;
                }
                let _ = hs.initiate(&peer);
                tokio::time::sleep(PUNCH_GAP).await;
            }
        });
    }

    fn status(&self) -> Status {
        let g = self.lock();
        let snap = self.table.load_full();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut peers = Vec::new();
        for e in g.roster.entries() {
            let key = roster::decode_key(&e.public_key);
            let p = key.and_then(|k| snap.by_key(&k));
            let (endpoint, hs, rx, tx) = match p {
                Some(p) => {
                    let age = handshake_age(p);
                    (
                        p.lock().endpoint,
                        age.map(|a| now.saturating_sub(a)),
                        p.stats.rx_bytes.load(Ordering::Relaxed),
                        p.stats.tx_bytes.load(Ordering::Relaxed),
                    )
                }
                None => (None, None, 0, 0),
            };
            peers.push(PeerStatus {
                peer_id: e.peer_id.clone(),
                name: e.display_name.clone(),
                ula: e.ula,
                tags: e.tags.clone(),
                public_key: e.public_key.clone(),
                endpoint,
                latest_handshake: hs.map(|d| d.as_secs()),
                rx_bytes: rx,
                tx_bytes: tx,
                direct: hs.is_some_and(|d| now.saturating_sub(d) < LIVE_SESSION),
                app_ulas: e.hosted_app_ulas.clone(),
                ports: e.ports.clone(),
            });
        }
        Status {
            interface: self.opts.interface.clone(),
            name: g.display_name.clone(),
            peer_id: self.peer_id.clone(),
            ula: self.ula,
            public_key: base64::engine::general_purpose::STANDARD.encode(self.public_key),
            tags: g.tags.clone(),
            listen_port: self.engine.info.listen_port,
            driver: self.engine.info.driver.to_string(),
            registered: g.registered,
            coordinator: CoordinatorStatus {
                url: self.client.url().to_owned(),
                connected: g.connected,
                last_event_id: g.roster.last_event_id,
            },
            reflexive_endpoint: g.me.reflexive,
            may_host_apps: g.may_host_apps == Some(true),
            hosted_apps: g
                .apps
                .iter()
                .map(|u| HostedApp {
                    uuid: *u,
                    ula: tabbify_api::ula::app_ula(u),
                })
                .collect(),
            peers,
        }
    }

    fn app_change(&self, uuid: Uuid, add: bool) -> Result<serde_json::Value, String> {
        let ula = tabbify_api::ula::app_ula(&uuid);
        let net = IpNet::host(IpAddr::V6(ula));
        let mut g = self.lock();
        if add {
            match g.may_host_apps {
                None => return Err("not registered with the coordinator yet; try again in a moment".into()),
                Some(false) => return Err("the coordinator's policy does not let this node host apps (policy `app_hosts`)".into()),
                Some(true) => {}
            }
            link::add_address(&self.opts.interface, &net).map_err(|e| e.to_string())?;
            if !g.apps.contains(&uuid) {
                g.apps.push(uuid);
            }
        } else {
            if !g.apps.contains(&uuid) {
                return Err(format!("app {uuid} is not hosted here"));
            }
            g.apps.retain(|a| *a != uuid);
            if let Err(e) = link::del_address(&self.opts.interface, &net) {
                tracing::warn!(error = %e, "app address not removed");
            }
        }
        self.state.set_apps(&g.apps).map_err(|e| format!("{e:#}"))?;
        drop(g);
        tracing::info!(app = %uuid, %ula, hosted = add, "hosted apps changed");
        self.heartbeat_now.notify_one();
        Ok(serde_json::json!({"uuid": uuid, "ula": ula}))
    }
}

/// Time since the peer's last completed handshake.
fn handshake_age(peer: &crate::core::peer::Peer) -> Option<Duration> {
    peer.lock().tunn.time_since_last_handshake()
}

impl control::Handler for Joiner {
    async fn handle(&self, req: Request) -> Result<serde_json::Value, String> {
        let json = |r: serde_json::Result<serde_json::Value>| r.map_err(|e| e.to_string());
        match req {
            Request::Status => json(serde_json::to_value(self.status())),
            Request::Peers => json(serde_json::to_value(self.status().peers)),
            Request::AppAdd { uuid } => self.app_change(uuid, true),
            Request::AppRemove { uuid } => self.app_change(uuid, false),
        }
    }
}
