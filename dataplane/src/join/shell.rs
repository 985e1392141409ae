//! The joiner's I/O shell: it feeds the [`Machine`] coordinator answers, roster events,
//! app changes and timer ticks, and applies what the machine returns to the table, the
//! kernel routes, the handshaker and the coordinator client. It decides nothing itself.
//!
//! ```text
//! start: node key (state dir) ─▶ control socket ─▶ crate::interface (engine, TUN, peer ULA
//!        + hosted app ULAs, UAPI, SIGINT/SIGTERM) — the bring-up and shutdown `up` uses
//! drive (tokio, one thread):
//!   machine.poll_action() ─▶ apply: Register / Heartbeat / OpenStream (await, answer back),
//!                                   table and route writes, initiations, hole punches
//!   then wait for: a roster event │ the stream's end │ machine.poll_timeout() │ `app add|remove`
//!                  │ a changed set of underlay addresses (netlink, see `UnderlayWatch`)
//!   after each wake-up, first: the time bytes last arrived on the stream → the machine
//!   (its idle deadline; the read itself has no timeout, being restarted every wake-up)
//! probe (tokio): STUN requests from the WireGuard socket, answers from the control queue
//! paths (tokio, every 250 ms or at the path manager's deadline):
//!   relay latency → home relay → relay sessions kept (`join::relay`);
//!   roster + engine (path, last direct receipt) → `logic::paths` → set_path / relay
//!   routes (LOOKUP) / probe_direct / initiate; BIND_ACKs from the control queue → sessions
//! ```
//!
//! The machine lives behind a mutex shared with the control socket (`status`, `app`);
//! critical sections are short and never span an await.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use base64::Engine as _;
use tabbify_api::local::KeyRotated;
use tabbify_api::{
    self as api, HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse,
    RotateKeyRequest, RotateKeyResponse, SseEvent,
};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::core::behind::Behind;
use crate::core::counters::DropCounters;
use crate::core::filter::{PortFilter, ProtoRanges};
use crate::core::local::LocalNets;
use crate::core::net::IpNet;
use crate::core::table::Table;
use crate::driver::{EngineInfo, EngineOptions, Handshaker};
use crate::interface::{Interface, InterfaceSpec};
use crate::sys::{addr_watch, ifaddrs, link};

use super::client::{Client, ClientError, EventStream};
use super::control::{
    self, CoordinatorStatus, CoordinatorTarget, HostedApp, PeerStatus, Request, Status,
};
use super::logic::paths::roster_may_set_endpoint;
use super::logic::{self, roster, Action, Machine};
use super::state_dir::StateDir;
use super::JoinOptions;
use crate::core::path::{self as engine_path, PathKind};
use tabbify_api::local::RelayStatus;

/// A handshake that completed within this long means a live (direct) session.
const LIVE_SESSION: Duration = Duration::from_secs(180);

/// How long an ephemeral node that is stopping tries to leave before it exits anyway.
const EPHEMERAL_LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The coordinator targets: each URL, and for a host name each address it resolves to
/// (all with the URL's host as TLS server name). A name that does not resolve now stays
/// one target, resolved at each connect. Duplicates are dropped.
async fn coordinator_targets(
    urls: &[String],
    tls: Option<Arc<rustls::ClientConfig>>,
    identity: Option<String>,
) -> anyhow::Result<Vec<Client>> {
    let mut out: Vec<Client> = Vec::new();
    for url in urls {
        let client = Client::new(url, tls.clone(), identity.clone())?;
        let (host, port) = client.host_port();
        let host = host.to_owned();
        if host.parse::<IpAddr>().is_ok() {
            out.push(client);
            continue;
        }
        let looked: std::io::Result<Vec<SocketAddr>> =
            match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(addrs) => Ok(addrs.collect()),
                Err(e) => Err(e),
            };
        match looked {
            Ok(mut addrs) => {
                addrs.dedup();
                if addrs.len() > 1 {
                    tracing::info!(%url, ?addrs, "the coordinator's name resolves to several addresses: each is a coordinator");
                    out.extend(addrs.into_iter().map(|a| client.at(a)));
                } else {
                    out.push(client);
                }
            }
            Err(e) => {
                tracing::warn!(%url, error = %e, "cannot resolve the coordinator now; it is resolved again at each connect");
                out.push(client);
            }
        }
    }
    out.dedup_by(|a, b| a.url() == b.url() && a.addr() == b.addr());
    if out.is_empty() {
        bail!("no coordinator given");
    }
    if out.len() > 1 {
        for c in &mut out {
            c.set_connect_timeout(super::client::FAILOVER_CONNECT_TIMEOUT);
        }
    }
    Ok(out)
}

/// A target for logs and `status`: its URL, and its address when it is one of several.
fn describe_target(c: &Client) -> String {
    match c.addr() {
        Some(a) => format!("{} ({a})", c.url()),
        None => c.url().to_owned(),
    }
}

/// The running joiner.
pub struct Joiner {
    opts: JoinOptions,
    /// What the engine runs with (listen port, driver).
    info: EngineInfo,
    /// The sockets speak IPv6.
    ipv6: bool,
    handshaker: Handshaker,
    table: Arc<Table>,
    /// The engine's drop counters (for `status`).
    counters: Arc<DropCounters>,
    /// The engine's per-worker batch-size histograms (for the metrics).
    batches: Arc<crate::core::batchstats::BatchStats>,
    /// The coordinator targets, in the order tried; the machine says which is in use.
    targets: Vec<Client>,
    state: StateDir,
    /// The node's public key in use (replaced by a rotation).
    public_key: Mutex<[u8; 32]>,
    peer_id: String,
    ula: Ipv6Addr,
    machine: Mutex<Machine>,
    /// Wakes [`Joiner::drive`] when the machine has new actions (an app change).
    wake: Notify,
    /// The event log of the last roster stream (its ids mean something only there).
    event_log: Mutex<Option<String>>,
    /// The STUN probe (`logic::nat`), driven by [`Joiner::run_probe`].
    probe: Mutex<logic::nat::Probe>,
    /// Wakes [`Joiner::run_probe`] when the server list changed or a re-probe is due.
    probe_wake: Notify,
    /// `--stun` servers, resolved at start.
    stun_extra: Vec<SocketAddr>,
    /// Path selection (`logic::paths`), driven by [`Joiner::run_paths`].
    paths: Mutex<logic::paths::Paths>,
    /// The relay sessions.
    relays: Arc<super::relay::RelaySessions>,
    /// The coordinator's advertised relays (from the last register/heartbeat answer).
    advertised_relays: Mutex<Vec<String>>,
    /// The last latency measurement of the relays.
    measured: Mutex<Vec<(String, Option<Duration>)>>,
    /// Wakes [`Joiner::run_paths`].
    paths_wake: Notify,
    /// The mesh DNS stub (`None` with `--dns off`).
    dns: Option<Arc<super::dns::Service>>,
    /// Where metrics are served (`None`: off or not bound).
    metrics_addr: Option<SocketAddr>,
    /// Our mesh IPv4 (from the registration; on the TUN as a /32).
    ipv4: Mutex<Option<Ipv4Addr>>,
    /// Our advertisements' state, from the last registration.
    advertised_routes: Mutex<Vec<api::RouteState>>,
    /// The member's identity (its certificate's CN): a reloaded certificate must keep it.
    identity: String,
    /// The TLS configuration the last reload loaded (`None`: the start's).
    tls_reloaded: Mutex<Option<Arc<rustls::ClientConfig>>>,
    /// The subnet router (`None`: this node routes for nobody).
    router: Mutex<Option<super::router::Router>>,
}

/// Runs the joiner until SIGINT/SIGTERM (Ok) or a permanent refusal (Err); SIGHUP re-reads
/// the configuration through `hooks` (see [`super::reload`]).
pub fn run(opts: JoinOptions, hooks: super::reload::Hooks) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    rt.block_on(run_async(opts, hooks))
}

/// Loads the TLS files: the client configuration and the certificate's CN.
fn load_tls(f: &super::TlsFiles) -> anyhow::Result<(Arc<rustls::ClientConfig>, String)> {
    let read = |p: &PathBuf, what: &str| {
        std::fs::read_to_string(p).with_context(|| format!("{what} {}", p.display()))
    };
    let cert = read(&f.cert, "--tls-cert")?;
    let key = read(&f.key, "--tls-key")?;
    let ca = read(&f.ca, "--tls-ca")?;
    let cn = certificate_cn(&cert).with_context(|| format!("--tls-cert {}", f.cert.display()))?;
    let cfg = tabbify_api::tls::client_config(&ca, Some((&cert, &key))).context("TLS files")?;
    Ok((cfg, cn))
}

async fn run_async(opts: JoinOptions, hooks: super::reload::Hooks) -> anyhow::Result<()> {
    // Before anything that takes a while: SIGHUP's default action would end the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    // The member's identity is its certificate's CN (the coordinator reads the same CN);
    // without mTLS (loopback development) it is the name it registers with.
    let (tls, member) = match &opts.tls {
        Some(f) => {
            let (cfg, cn) = load_tls(f)?;
            (Some(cfg), cn)
        }
        None => (None, opts.name.clone()),
    };
    // Our ULA and peer id derive from the identity, so a registration answer naming
    // others is refused.
    let identity = member;
    let options_at_start = opts.clone();
    let header_identity = opts.tls.is_none().then(|| opts.name.clone());
    let mut targets = coordinator_targets(&opts.coordinators, tls.clone(), header_identity).await?;
    if opts.routes.exit_node != logic::routes::ExitChoice::Off {
        for t in &mut targets {
            t.set_fwmark(Some(EXIT_MARK));
        }
    }
    let state = StateDir::open(&opts.state_dir)?;
    // Before anything else: undo host DNS settings a crashed run left.
    super::dns::Service::recover(&opts.state_dir)?;
    // …and the router's forwarding and masquerade, and the exit node's policy rules.
    for line in super::router::recover(&opts.state_dir) {
        tracing::info!("left by an earlier run: {line}");
    }
    crate::policy::remove_stale(EXIT_MARK);
    let key = state.node_key()?;
    let public_key = crate::config::public_key(&key).0;
    let key_age = Duration::from_secs(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .saturating_sub(state.key_since()?),
    );
    // Derived from the identity, not the key: a key rotation keeps both.
    let ula = tabbify_api::ula::identity_ula(&identity);
    let peer_id = tabbify_api::ula::identity_peer_id(&identity);
    let apps = state.apps()?;
    let server = control::Server::bind(&opts.control_socket)?;
    let metrics_listener = super::metrics::bind(opts.metrics).await?;
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let uses_exit = opts.routes.exit_node != logic::routes::ExitChoice::Off;
    let table = Arc::new(Table::new(
        boringtun::x25519::StaticSecret::from(key.0),
        opts.listen_port,
    ));
    let addresses = std::iter::once(ula)
        .chain(apps.iter().map(tabbify_api::ula::app_ula))
        .map(|a| IpNet::host(IpAddr::V6(a)))
        .collect();
    let iface = Interface::start(
        &InterfaceSpec {
            engine: EngineOptions {
                interface: opts.interface.clone(),
                threads: opts.threads,
                driver: opts.driver,
                offloads: opts.offloads,
                listen_port: opts.listen_port,
                pin: opts.pin,
                // With an exit node, the engine's datagrams carry the mark that keeps
                // them (and the coordinator and relay connections) off the tunnel.
                fwmark: uses_exit.then_some(EXIT_MARK),
            },
            mtu: opts.mtu,
            addresses,
            // The whole mesh routes into the engine: a removed peer or an unknown app gets
            // an ICMP unreachable from the engine, never a cleartext packet on the LAN.
            covering_routes: mesh_prefixes(),
            routes: Vec::new(),
            routed: Vec::new(),
            // `--exit-node`: both default routes into the TUN by policy routing from the
            // start; until the exit node is in the roster the engine answers unreachable.
            default_route: if uses_exit {
                vec![crate::policy::Family::V4, crate::policy::Family::V6]
            } else {
                Vec::new()
            },
        },
        table.clone(),
    )?;
    let router = if opts.routes.is_router() || opts.routes.concentrator {
        Some(super::router::Router::start(
            &opts.state_dir,
            &super::router::RouterSpec {
                interface: opts.interface.clone(),
                routes: opts.routes.advertised.clone(),
                exit_node: opts.routes.advertise_exit_node,
                snat: opts.snat,
                concentrator: opts.routes.concentrator,
            },
        )?)
    } else {
        None
    };
    let handshaker = iface
        .handshaker()
        .context("a handshake socket for the control task")?;
    // On the ULA only (the TUN has it now, without DAD): reachable only over the mesh,
    // where the policy and the packet filter decide who may test.
    let speedtest_listener = match opts.speedtest {
        Some(port) => Some(super::speedtest::bind(ula, port).await?),
        None => None,
    };
    let dns = super::dns::Service::start(opts.dns.clone(), &opts.interface, opts.state_dir.clone())
        .await?;

    let mut stun_extra = Vec::new();
    for server in &opts.stun {
        let addrs = tokio::net::lookup_host(server.as_str())
            .await
            .with_context(|| format!("resolving --stun {server}"))?;
        stun_extra.extend(addrs.filter(|a| iface.ipv6() || a.is_ipv4()));
    }
    let (stun_tx, stun_rx) = tokio::sync::mpsc::channel(64);
    let (relay_tx, relay_rx) = tokio::sync::mpsc::channel(64);
    spawn_control_drain(iface.control_queue(), stun_tx, relay_tx)?;
    let probe_sender = iface.handshaker().context("a socket for STUN requests")?;
    if tls.is_none() && !opts.relays.is_empty() {
        tracing::warn!("relays admit members by mesh mTLS only: --relay is ignored without it");
    }
    let relays = super::relay::RelaySessions::new(
        tls.clone(),
        key.0,
        iface.handshaker().context("a socket for relay BINDs")?,
        opts.listen_port,
        iface.ipv6(),
        // With an exit node, the relay streams (and the latency probes) carry the mark
        // that keeps them off the tunnel, like the engine's datagrams and STUN (sent from
        // the engine's socket, which already carries it).
        uses_exit.then_some(EXIT_MARK),
    );
    let mut paths = logic::paths::Paths::new(opts.force_relay);
    if let Some(refused) = paths
        .set_relays(&opts.relays, &[], Instant::now())
        .into_iter()
        .next()
    {
        bail!("--relay: {refused}");
    }

    let machine = Machine::new(logic::Config {
        peer_id: peer_id.clone(),
        ula,
        name: opts.name.clone(),
        tags: opts.tags.clone(),
        has_join_token: opts.join_token.is_some(),
        apps,
        key_max_age: opts.key_max_age,
        rotate_at: Instant::now() + opts.key_max_age.saturating_sub(key_age),
        coordinators: targets.len(),
        routes: opts.routes.clone(),
    });
    let joiner = Arc::new(Joiner {
        machine: Mutex::new(machine),
        opts,
        info: iface.info().clone(),
        ipv6: iface.ipv6(),
        handshaker,
        table,
        counters: iface.counters(),
        batches: iface.batches(),
        targets,
        state,
        public_key: Mutex::new(public_key),
        peer_id,
        ula,
        wake: Notify::new(),
        event_log: Mutex::new(None),
        probe: Mutex::new(logic::nat::Probe::new(Vec::new())),
        probe_wake: Notify::new(),
        stun_extra,
        paths: Mutex::new(paths),
        relays,
        advertised_relays: Mutex::new(Vec::new()),
        measured: Mutex::new(Vec::new()),
        paths_wake: Notify::new(),
        dns,
        metrics_addr,
        ipv4: Mutex::new(None),
        advertised_routes: Mutex::new(Vec::new()),
        identity: identity.clone(),
        tls_reloaded: Mutex::new(None),
        router: Mutex::new(router),
    });
    let coordinators: Vec<String> = joiner.targets.iter().map(describe_target).collect();
    tracing::info!(%identity, peer_id = %joiner.peer_id, ula = %joiner.ula, ?coordinators, ephemeral = joiner.opts.ephemeral, "joining");

    let serve = server.serve(joiner.clone());
    let drive = joiner.clone().drive();
    let probe = joiner.clone().run_probe(stun_rx, probe_sender);
    let paths = joiner.clone().run_paths(relay_rx);
    let metrics = {
        let j = joiner.clone();
        super::metrics::serve_opt(metrics_listener, move || {
            let mut text = super::metrics::render(&j.status(), unix_now());
            super::metrics::render_batches(&mut text, &j.batches.snapshot());
            text
        })
    };
    let speedtest = async move {
        match speedtest_listener {
            Some(l) => {
                if let Ok(a) = l.local_addr() {
                    tracing::info!(addr = %a, "speedtest responder listening");
                }
                super::speedtest::serve(l, super::speedtest::Limits::default()).await
            }
            None => std::future::pending().await,
        }
    };
    let stopped = async {
        loop {
            if let Some(stop) = iface.stop_reason() {
                return stop;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let reload = {
        let j = joiner.clone();
        async move {
            let mut in_force = options_at_start;
            while hangup.recv().await.is_some() {
                j.reload(&mut in_force, &hooks, Instant::now());
            }
            std::future::pending::<()>().await
        }
    };
    let (result, clean_stop) = tokio::select! {
        _ = reload => (Ok(()), false),
        stop = stopped => (stop.into_result(), true),
        _ = serve => (Ok(()), false),
        r = drive => (r, false),
        _ = probe => (Ok(()), false),
        _ = paths => (Ok(()), false),
        _ = metrics => (Ok(()), false),
        _ = speedtest => (Ok(()), false),
    };
    // An ephemeral node that is stopped (SIGINT/SIGTERM) leaves the mesh, so its peers
    // drop it now instead of at the coordinator's expiry.
    if clean_stop && joiner.opts.ephemeral && joiner.lock().begin_leave().is_ok() {
        match tokio::time::timeout(EPHEMERAL_LEAVE_TIMEOUT, joiner.leave()).await {
            Ok(Ok(_)) => tracing::info!("ephemeral node stopped: left the mesh"),
            Ok(Err(e)) => tracing::warn!(error = %e, "ephemeral node stopped without leaving"),
            Err(_) => tracing::warn!("ephemeral node stopped: the leave request timed out"),
        }
    }
    drop(server);
    if let Some(dns) = &joiner.dns {
        dns.stop();
    }
    iface.shut_down();
    if let Some(r) = joiner
        .router
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
    {
        r.stop();
    }
    result
}

impl Joiner {
    fn lock(&self) -> MutexGuard<'_, Machine> {
        match self.machine.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Applies the machine's actions and feeds it what happens, until it says to exit.
    async fn drive(self: Arc<Self>) -> anyhow::Result<()> {
        let mut stream: Option<EventStream> = None;
        let mut underlay = UnderlayWatch::open(&self.opts.interface);
        // Netlink also reports address flag and lifetime updates (DAD completing, every
        // router advertisement refreshing an IPv6 lifetime): only a changed set counts.
        let mut underlay_addrs = self.underlay_addrs();
        self.lock()
            .set_underlay(Instant::now(), underlay_addrs.clone());
        loop {
            loop {
                let action = self.lock().poll_action();
                let Some(action) = action else { break };
                if let Action::Exit(exit) = action {
                    if exit == logic::Exit::Left {
                        tracing::info!("left the mesh; exiting");
                        return Ok(());
                    }
                    bail!("{exit}");
                }
                self.apply(action, &mut stream).await;
            }
            self.refresh_dns();
            let deadline = self.lock().poll_timeout();
            let woke = tokio::select! {
                ev = next_event(&mut stream) => Woke::Stream(Box::new(ev)),
                _ = sleep_until(deadline) => Woke::Timer,
                _ = self.wake.notified() => Woke::Notified,
                () = underlay_changed(&mut underlay) => Woke::Underlay,
            };
            // Bytes seen on the stream (keepalive comments included) go to the machine
            // before anything else, so that its idle deadline never fires on a live stream.
            if let Some(at) = stream.as_mut().and_then(EventStream::take_activity) {
                self.lock().handle_stream_activity(at);
            }
            let now = Instant::now();
            match woke {
                Woke::Stream(ev) => match *ev {
                    Ok(Some((id, ev))) => self.lock().handle_event(now, id, ev),
                    Ok(None) => self.lock().handle_stream_closed(now, Ok(())),
                    Err(e) => self.lock().handle_stream_closed(now, Err(e)),
                },
                Woke::Timer => self.lock().handle_timeout(now),
                // The control socket queued work for the machine: poll its actions.
                Woke::Notified => {}
                Woke::Underlay => {
                    let addrs = self.underlay_addrs();
                    if addrs != underlay_addrs {
                        tracing::info!(from = ?underlay_addrs, to = ?addrs, "underlay addresses changed");
                        underlay_addrs = addrs;
                        self.lock().set_underlay(now, underlay_addrs.clone());
                        // The mapping belonged to the old network: drop it, probe again now.
                        self.probe().underlay_changed(self.endpoints(), now);
                        self.probe_wake.notify_one();
                        self.lock().handle_underlay_changed(now);
                        self.relays.rebind_all();
                        self.paths().underlay_changed(now);
                        self.paths_wake.notify_one();
                    }
                }
            }
        }
    }

    /// Does one thing the machine asked for; the answers of coordinator requests go back
    /// into the machine.
    async fn apply(&self, action: Action, stream: &mut Option<EventStream>) {
        match action {
            Action::Register { with_token } => {
                let r = self.register(with_token).await;
                if let Ok(resp) = &r {
                    self.stun_servers(&resp.stun_servers, resp.reflexive_endpoint);
                    self.advertised(&resp.relays);
                    if let Some(dns) = &self.dns {
                        dns.offer_domain(&resp.dns_domain);
                    }
                    self.set_ipv4(resp.ipv4);
                    for r in &resp.routes {
                        tracing::info!(prefix = %r.prefix, exit_node = r.exit_node, state = ?r.state, "advertised route");
                    }
                    resp.routes.clone_into(
                        &mut self
                            .advertised_routes
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()),
                    );
                }
                self.lock().handle_registered(Instant::now(), r);
            }
            Action::Heartbeat { hosted_app_ulas } => {
                let (r, mapped) = self.heartbeat(hosted_app_ulas.clone()).await;
                // A 400 refusing a heartbeat that carried mapped endpoints: the mapping is
                // likely stale (the node moved, or the NAT remapped): drop it, re-probe,
                // and send the heartbeat again without it rather than lose the session.
                let r = match r {
                    Err(ClientError::Status {
                        status, message, ..
                    }) if status == http::StatusCode::BAD_REQUEST && mapped => {
                        tracing::warn!(reason = %message, "heartbeat refused; dropping the STUN mapping and sending it again without");
                        self.probe()
                            .underlay_changed(self.endpoints(), Instant::now());
                        self.probe_wake.notify_one();
                        self.heartbeat(hosted_app_ulas).await.0
                    }
                    r => r,
                };
                if let Ok(resp) = &r {
                    self.stun_servers(&resp.stun_servers, resp.reflexive_endpoint);
                    self.advertised(&resp.relays);
                }
                self.lock().handle_heartbeat(Instant::now(), r);
            }
            Action::OpenStream => {
                // Resume after the roster the machine holds (from the registration that
                // preceded this, or the stream before it).
                let last_event_id = self.lock().roster().last_event_id;
                let log = self
                    .event_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let r = self
                    .client()
                    .stream(
                        api::PATH_PEERS_STREAM,
                        last_event_id.map(|id| (id, log.as_deref())),
                    )
                    .await;
                let r = r.map(|s| {
                    *self.event_log.lock().unwrap_or_else(|p| p.into_inner()) =
                        s.event_log().map(str::to_owned);
                    *stream = Some(s);
                });
                self.lock().handle_stream_opened(Instant::now(), r);
            }
            Action::CloseStream => *stream = None,
            Action::UpsertPeer {
                config,
                filter,
                behind,
                routed,
                routed_ports,
                new,
                label,
            } => {
                let mut config = config;
                if !new
                    && !self
                        .table
                        .load_full()
                        .by_key(&config.public_key)
                        .is_none_or(|p| roster_may_set_endpoint(since_direct_rx(p)))
                {
                    // The engine's endpoint is proven by direct receipt: keep it.
                    config.endpoint = None;
                }
                let endpoint = config.endpoint;
                // Clients behind a concentrator: each with its own rules (`core::behind`),
                // and the prefixes routed through the peer (the routed filter), published
                // with the AllowedIPs that route them here.
                let behind = (!behind.is_empty() || !routed.is_empty() || !routed_ports.is_empty())
                    .then(|| {
                        Behind::new(behind.iter().map(|c| {
                            (
                                c.addrs.clone(),
                                PortFilter::from_rules(&c.outbound, &c.inbound),
                            )
                        }))
                        .with_routed(routed.iter().copied())
                        .with_routed_ports(routed_ports.iter().cloned())
                    });
                match self
                    .table
                    .upsert_peer_with_filters(config, Some(*filter), behind)
                {
                    Ok(_) if new => {
                        tracing::info!(peer = %label.name, peer_id = %label.peer_id, ula = %label.ula, ?endpoint, "peer added");
                    }
                    Ok(_) => {
                        tracing::info!(peer = %label.name, peer_id = %label.peer_id, "peer updated");
                    }
                    Err(e) => {
                        tracing::error!(peer = %label.peer_id, error = %e, "peer not added");
                    }
                }
            }
            Action::RemovePeer { public_key, label } => {
                self.table.remove_peer(&public_key);
                tracing::info!(peer = %label.name, peer_id = %label.peer_id, "peer removed");
            }
            Action::Routes { add, del } => {
                if let Err(e) = link::sync_routes(&self.opts.interface, &add, &del) {
                    tracing::error!(error = %e, "routes");
                }
            }
            Action::Initiate { public_key } => {
                let snap = self.table.load_full();
                if let Some(peer) = snap.by_key(&public_key) {
                    if let Err(e) = self.handshaker.initiate(peer) {
                        tracing::debug!(error = %e, "handshake initiation not sent");
                    }
                }
            }
            Action::HolePunch {
                public_key,
                endpoint,
            } => {
                let snap = self.table.load_full();
                if let Some(peer) = snap.by_key(&public_key) {
                    let key = base64::engine::general_purpose::STANDARD.encode(public_key);
                    if roster_may_set_endpoint(since_direct_rx(peer)) {
                        tracing::info!(peer = %key, %endpoint, "hole punching");
                        peer.lock().endpoint = Some(endpoint);
                    } else {
                        tracing::debug!(peer = %key, %endpoint, "hole punch notice: endpoint proven by direct receipt, kept");
                    }
                }
            }
            Action::PunchInitiation {
                public_key,
                burst_started,
            } => {
                let snap = self.table.load_full();
                let Some(peer) = snap.by_key(&public_key) else {
                    return;
                };
                // A handshake completed since the burst began: the hole is open.
                if handshake_age(peer).is_some_and(|age| age < burst_started.elapsed()) {
                    return;
                }
                let _ = self.handshaker.initiate(peer);
            }
            Action::RotateKey => {
                let r = self.rotate().await.map(|_| ());
                self.lock().handle_rotated(Instant::now(), r);
            }
            Action::ClearPeers => self.table.clear_peers(),
            Action::Grants => {
                let m = self.lock();
                for (key, prefix) in m.grants() {
                    tracing::debug!(peer = %base64::engine::general_purpose::STANDARD.encode(key), %prefix, "may route through us");
                }
                self.refresh_local(&m);
            }
            // `drive` returns on it before applying anything.
            Action::Exit(_) => {}
        }
    }

    /// `status`'s routes section.
    fn routes_status(&self, m: &Machine) -> tabbify_api::local::RoutesStatus {
        let plan = m.route_plan();
        let id_of = |k: &[u8; 32]| {
            let b = base64::engine::general_purpose::STANDARD.encode(k);
            m.roster()
                .entries()
                .find(|e| e.public_key == b)
                .map(|e| e.peer_id.clone())
        };
        let mut installed = Vec::new();
        for (key, nets) in &plan.allowed {
            let Some(id) = id_of(key) else { continue };
            for n in nets {
                let mesh_ip = n.prefix_len() == 32 && logic::routes::mesh_v4().contains(n.addr());
                if !mesh_ip && plan.kernel.contains(n) {
                    installed.push((n.to_string(), id.clone()));
                }
            }
        }
        tabbify_api::local::RoutesStatus {
            ipv4: *self.ipv4.lock().unwrap_or_else(|p| p.into_inner()),
            advertised: self
                .advertised_routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            exit_node: match &m.route_settings().exit_node {
                logic::routes::ExitChoice::Off => None,
                logic::routes::ExitChoice::Peer(p) => Some(p.clone()),
            },
            exit_node_in_use: plan.exit.as_ref().and_then(id_of),
            installed,
            refused: plan.refused.clone(),
        }
    }

    /// The table's local set from our addresses and the machine's grants.
    fn refresh_local(&self, m: &Machine) {
        let ipv4 = *self.ipv4.lock().unwrap_or_else(|p| p.into_inner());
        self.table.set_local(
            local_nets(self.ula, ipv4, m.apps(), m.grants(), m.port_grants())
                .with_served(m.client_plan().served_addrs())
                .with_reply_grants(m.client_plan().reply_grants.iter().copied())
                .with_client_rules(
                    m.client_plan()
                        .client_rules
                        .iter()
                        .map(|(k, a, r)| (*k, *a, r.as_slice())),
                ),
        );
    }

    /// Our mesh IPv4 from a registration: on the TUN as a /32 with the mesh's IPv4 space
    /// routed into the TUN (fail closed, as the ULA prefixes), and local to the engine. An
    /// address outside `100.64.0.0/10` is refused.
    fn set_ipv4(&self, ipv4: Option<Ipv4Addr>) {
        let Some(v4) = ipv4 else { return };
        let mesh = logic::routes::mesh_v4();
        if !mesh.contains(IpAddr::V4(v4)) {
            tracing::warn!(ipv4 = %v4, "the coordinator's IPv4 for us lies outside 100.64.0.0/10: refused");
            return;
        }
        let mut cur = self.ipv4.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == Some(v4) {
            return;
        }
        let iface = &self.opts.interface;
        if let Some(old) = *cur {
            let _ = link::del_address(iface, &IpNet::host(IpAddr::V4(old)));
        }
        if let Err(e) = link::add_address(iface, &IpNet::host(IpAddr::V4(v4))) {
            tracing::error!(ipv4 = %v4, error = %e, "mesh IPv4 not added to the TUN");
            return;
        }
        if let Err(e) = link::add_route(iface, &mesh) {
            tracing::warn!(error = %e, "100.64.0.0/10 not routed into the TUN");
        }
        *cur = Some(v4);
        drop(cur);
        tracing::info!(ipv4 = %v4, "mesh IPv4");
        let m = self.lock();
        self.refresh_local(&m);
    }

    /// Route failover (`logic::routes`): probes the peers that share a prefix every
    /// `PROBE_EVERY` (a ping inside the session, answered by the peer), reads when the
    /// engine last heard from each, and hands the live set to the machine; a change of
    /// primary wakes the drive loop to apply it.
    fn keep_route_liveness(
        &self,
        now: Instant,
        liveness: &mut logic::routes::Liveness,
        probed: &mut std::collections::HashMap<[u8; 32], Instant>,
    ) {
        let contested = self.lock().route_contested();
        if contested.is_empty() && probed.is_empty() {
            return;
        }
        let snap = self.table.load_full();
        let now_ns = engine_path::mono_ns();
        for key in &contested {
            let Some(peer) = snap.by_key(key) else {
                continue;
            };
            let due = probed
                .get(key)
                .is_none_or(|t| now.saturating_duration_since(*t) >= logic::routes::PROBE_EVERY);
            if due {
                let endpoint = peer.lock().endpoint;
                if let Some(ep) = endpoint {
                    if let Err(e) = self.handshaker.probe_direct(peer, ep) {
                        tracing::debug!(error = %e, "route liveness probe not sent");
                    }
                }
                probed.insert(*key, now);
            }
            let rx = peer
                .stats
                .last_direct_rx_ns
                .load(Ordering::Relaxed)
                .max(peer.stats.last_relay_rx_ns.load(Ordering::Relaxed));
            let at = (rx != 0)
                .then(|| now.checked_sub(Duration::from_nanos(now_ns.saturating_sub(rx))))
                .flatten();
            liveness.observe(*key, at);
        }
        probed.retain(|k, _| contested.contains(k));
        liveness.retain(&contested);
        let live = liveness.live(now);
        let mut m = self.lock();
        let before = m.route_plan().allowed.clone();
        m.handle_liveness(now, live);
        let changed = m.route_plan().allowed != before;
        drop(m);
        if changed {
            self.wake.notify_one();
        }
    }

    /// SIGHUP: re-reads the configuration and applies what [`super::reload::plan`] allows.
    /// `in_force` is what runs now; it is updated with what was applied.
    fn reload(&self, in_force: &mut JoinOptions, hooks: &super::reload::Hooks, now: Instant) {
        let new = match (hooks.reread)() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("reload refused, every setting kept: {e:#}");
                return;
            }
        };
        let plan = super::reload::plan(in_force, &new);
        for field in &plan.restart {
            tracing::warn!("reload: needs a restart: {field} (the running value is kept)");
        }
        let mut applied = Vec::new();
        if plan.tls {
            if let Some(files) = &new.tls {
                match load_tls(files) {
                    Ok((_, cn)) if cn != self.identity => tracing::error!(
                        "reload: --tls-cert {}: the certificate is for {cn:?}, not {:?} (a new identity needs a restart); the old certificates are kept",
                        files.cert.display(),
                        self.identity
                    ),
                    Ok((cfg, _)) => {
                        *self.tls_reloaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(cfg);
                        in_force.tls = Some(files.clone());
                        applied.push("tls-cert, tls-key, tls-ca (the next coordinator connection uses them)");
                    }
                    Err(e) => tracing::error!(
                        "reload: {e:#}; the old certificates are kept"
                    ),
                }
            }
        }
        if let Some(level) = &plan.log_level {
            match (hooks.set_log_level)(level) {
                Ok(()) => {
                    in_force.log_level.clone_from(level);
                    applied.push("log-level");
                }
                Err(e) => {
                    tracing::error!("reload: --log-level {level:?}: {e}; the old level is kept")
                }
            }
        }
        if let Some(routes) = plan.routes {
            match self.apply_routes(&routes, now) {
                Ok(()) => {
                    in_force.routes = routes;
                    applied.push("advertise-routes, advertise-exit-node, exit-node, accept-routes (the coordinator learns them at the next heartbeat)");
                }
                Err(e) => tracing::error!("reload: the route flags: {e:#}; the old ones are kept"),
            }
        }
        tracing::info!(applied = ?applied, needs_restart = ?plan.restart, "configuration reloaded");
    }

    /// New route flags: the router (forwarding, masquerade) redone when what it routes
    /// changed, then the machine's plan; the next heartbeat carries the advertisement.
    fn apply_routes(&self, routes: &logic::routes::Settings, now: Instant) -> anyhow::Result<()> {
        let old = self.lock().route_settings().clone();
        let spec = |s: &logic::routes::Settings| {
            (s.is_router() || s.concentrator).then(|| super::router::RouterSpec {
                interface: self.opts.interface.clone(),
                routes: s.advertised.clone(),
                exit_node: s.advertise_exit_node,
                snat: self.opts.snat,
                concentrator: s.concentrator,
            })
        };
        let (was, will) = (spec(&old), spec(routes));
        if was != will {
            let mut router = self.router.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = router.as_mut() {
                r.stop();
            }
            *router = None;
            if let Some(s) = &will {
                match super::router::Router::start(&self.opts.state_dir, s) {
                    Ok(r) => *router = Some(r),
                    Err(e) => {
                        // Put back what ran before.
                        if let Some(w) = &was {
                            *router = super::router::Router::start(&self.opts.state_dir, w).ok();
                        }
                        return Err(e);
                    }
                }
            }
        }
        self.lock().set_route_settings(now, routes.clone());
        self.wake.notify_one();
        Ok(())
    }

    /// The coordinator in use.
    fn client(&self) -> Client {
        let i = self.lock().coordinator();
        let mut c = self.targets[i.min(self.targets.len() - 1)].clone();
        if let Some(cfg) = self.reloaded_tls() {
            c.set_tls(cfg);
        }
        c
    }

    /// The TLS configuration a reload loaded (`None`: the one of the start is in use).
    fn reloaded_tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls_reloaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Deregisters (`POST /v1/mesh/leave`): at the coordinator in use, then at the others
    /// until one removes us. The machine's session was ended by `begin_leave`.
    async fn leave(&self) -> Result<api::LeaveResponse, String> {
        let first = self.lock().coordinator();
        let n = self.targets.len();
        let mut last = String::from("no coordinator");
        for i in (0..n).map(|k| (first + k) % n) {
            let mut target = self.targets[i].clone();
            if let Some(cfg) = self.reloaded_tls() {
                target.set_tls(cfg);
            }
            let target = &target;
            match target
                .post::<_, api::LeaveResponse>(api::PATH_LEAVE, &api::LeaveRequest {})
                .await
            {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!(coordinator = %describe_target(target), error = %e, "leave");
                    last = e.to_string();
                }
            }
        }
        Err(format!("no coordinator removed us (last: {last})"))
    }

    /// `tabbify-mesh leave`: deregister, answer, then exit.
    async fn leave_now(&self) -> Result<serde_json::Value, String> {
        self.lock().begin_leave()?;
        self.wake.notify_one();
        let r = self.leave().await;
        self.lock()
            .handle_left(Instant::now(), r.as_ref().map(|_| ()).map_err(Clone::clone));
        self.wake.notify_one();
        serde_json::to_value(r?).map_err(|e| e.to_string())
    }

    fn public_key(&self) -> [u8; 32] {
        *self.public_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rotates the node key: the pending key from the state directory (or a new one,
    /// recorded there first), offered to the coordinator; once accepted it becomes
    /// `node.key`, the data plane switches to it and every peer re-handshakes. A transient
    /// failure keeps the pending key for the next attempt; a refusal drops it.
    async fn rotate(&self) -> Result<KeyRotated, String> {
        let next = self.state.begin_rotation().map_err(|e| format!("{e:#}"))?;
        let new_public = crate::config::public_key(&next).0;
        let old_public = self.public_key();
        let b64 = |k: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
        let req = RotateKeyRequest {
            peer_id: self.peer_id.clone(),
            old_public_key: b64(&old_public),
            new_public_key: b64(&new_public),
        };
        match self
            .client()
            .post::<_, RotateKeyResponse>(api::PATH_ROTATE_KEY, &req)
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_transient() => return Err(e.to_string()),
            Err(e) => {
                if let Err(d) = self.state.abandon_rotation() {
                    tracing::warn!(error = %format!("{d:#}"), "pending key not removed");
                }
                return Err(e.to_string());
            }
        }
        // Accepted. If persisting fails the pending file still holds the accepted key and
        // the next start settles it (the coordinator answers the retry the same way).
        self.state
            .finish_rotation(&next)
            .map_err(|e| format!("{e:#}"))?;
        self.table
            .set_private_key(boringtun::x25519::StaticSecret::from(next.0));
        *self.public_key.lock().unwrap_or_else(|p| p.into_inner()) = new_public;
        self.relays.set_key(next.0);
        let snap = self.table.load_full();
        for e in &snap.peers {
            if let Err(err) = self.handshaker.initiate(&e.peer) {
                tracing::debug!(error = %err, "handshake initiation not sent");
            }
        }
        tracing::info!(old = %b64(&old_public), new = %b64(&new_public), "node key rotated");
        Ok(KeyRotated {
            old_public_key: b64(&old_public),
            public_key: b64(&new_public),
            peer_id: self.peer_id.clone(),
            ula: self.ula,
        })
    }

    /// `tabbify-mesh rotate-key`: a rotation now, unless one is in flight.
    async fn rotate_now(&self) -> Result<serde_json::Value, String> {
        self.lock().begin_rotation()?;
        let r = self.rotate().await;
        self.lock()
            .handle_rotated(Instant::now(), r.as_ref().map(|_| ()).map_err(Clone::clone));
        self.wake.notify_one();
        serde_json::to_value(r?).map_err(|e| e.to_string())
    }

    fn probe(&self) -> MutexGuard<'_, logic::nat::Probe> {
        match self.probe.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn paths(&self) -> MutexGuard<'_, logic::paths::Paths> {
        match self.paths.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The coordinator's advertised relays into the path manager (with `--relay`).
    fn advertised(&self, relays: &[api::RelayInfo]) {
        let urls: Vec<String> = relays.iter().map(|r| r.url.clone()).collect();
        let mut adv = self
            .advertised_relays
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *adv == urls {
            return;
        }
        adv.clone_from(&urls);
        drop(adv);
        for refused in self
            .paths()
            .set_relays(&self.opts.relays, &urls, Instant::now())
        {
            tracing::warn!(%refused, "an advertised relay is refused");
        }
        self.paths_wake.notify_one();
    }

    /// Path selection: keeps the relay sessions (home relay by latency, peers' relays on
    /// demand), feeds the path manager the roster and what the engine saw, applies its
    /// actions (paths, relay routes, probes, handshakes) and routes BIND_ACKs to the
    /// sessions, until the joiner stops.
    async fn run_paths(
        self: Arc<Self>,
        mut control: tokio::sync::mpsc::Receiver<(SocketAddr, Vec<u8>)>,
    ) {
        /// Re-measure the relays this often (sooner while none answers).
        const MEASURE_EVERY: Duration = Duration::from_secs(300);
        const TICK: Duration = Duration::from_millis(250);
        let mut measured_for: Vec<String> = Vec::new();
        let mut next_measure = Instant::now();
        let mut initiate_when_routed: std::collections::HashSet<[u8; 32]> =
            std::collections::HashSet::new();
        let mut liveness = logic::routes::Liveness::default();
        let mut probed = std::collections::HashMap::new();
        loop {
            let now = Instant::now();
            self.keep_route_liveness(now, &mut liveness, &mut probed);
            // Latency to every relay (in the background), then the home relay.
            let relays: Vec<logic::paths::RelayUrl> = self.paths().relays().to_vec();
            let urls: Vec<String> = relays.iter().map(|r| r.url.clone()).collect();
            if self.relays.enabled()
                && !relays.is_empty()
                && (urls != measured_for || now >= next_measure)
            {
                measured_for = urls;
                let me = self.clone();
                let ipv6 = self.ipv6;
                let fwmark = self.relays.fwmark();
                let any_before = self.measured().iter().any(|(_, d)| d.is_some());
                next_measure = now
                    + if any_before {
                        MEASURE_EVERY
                    } else {
                        Duration::from_secs(10)
                    };
                tokio::spawn(async move {
                    let m = super::relay::measure(&relays, ipv6, fwmark).await;
                    tracing::debug!(measured = ?m, "relay latency");
                    *me.measured.lock().unwrap_or_else(|p| p.into_inner()) = m;
                    me.paths_wake.notify_one();
                });
            }
            self.keep_sessions(now);
            self.sync_paths(now);
            let actions: Vec<logic::paths::PathAction> = {
                let mut p = self.paths();
                p.handle_timeout(now);
                std::iter::from_fn(|| p.poll_action()).collect()
            };
            for a in actions {
                self.apply_path(a, now, &mut initiate_when_routed);
            }
            self.keep_routes(now, &mut initiate_when_routed);
            let deadline = self
                .paths()
                .poll_timeout()
                .map_or(now + TICK, |d| d.min(now + TICK));
            tokio::select! {
                c = control.recv() => match c {
                    Some((src, bytes)) => self.relays.handle_control(src, &bytes, Instant::now()),
                    None => return,
                },
                _ = sleep_until(Some(deadline)) => {}
                _ = self.paths_wake.notified() => {}
            }
        }
    }

    fn measured(&self) -> Vec<(String, Option<Duration>)> {
        self.measured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sessions at the home relay (lowest latency) and at the relays relayed peers use;
    /// the home relay counts once its session is up.
    fn keep_sessions(&self, now: Instant) {
        if !self.relays.enabled() {
            return;
        }
        let measured = self.measured();
        let mut p = self.paths();
        let current = p.home().map(str::to_owned);
        let pick = logic::paths::choose_home(&measured, current.as_deref());
        let mut wanted: Vec<logic::paths::RelayUrl> = Vec::new();
        for url in pick.iter().chain(p.wanted_sessions().iter()) {
            if let Some(r) = p.relay(url) {
                if !wanted.iter().any(|w| w.url == r.url) {
                    wanted.push(r.clone());
                }
            }
        }
        wanted.truncate(logic::paths::MAX_SESSIONS);
        let up = |u: &Option<String>| {
            u.as_deref()
                .and_then(|u| self.relays.session(u))
                .is_some_and(|s| s.is_up())
        };
        let home = if up(&pick) {
            pick
        } else if up(&current) {
            current
        } else {
            None
        };
        if home != p.home().map(str::to_owned) {
            tracing::info!(home = ?home, "home relay");
        }
        p.set_home(home, now);
        drop(p);
        self.relays.keep(&wanted);
    }

    /// The roster and the engine's view of each peer into the path manager.
    fn sync_paths(&self, now: Instant) {
        let own_nat = self.probe().class();
        let m = self.lock();
        let snap = self.table.load_full();
        let mut p = self.paths();
        p.set_own_nat(own_nat, now);
        let now_ns = engine_path::mono_ns();
        let mut seen = std::collections::HashSet::new();
        for e in m.roster().entries() {
            let Some(key) = roster::decode_key(&e.public_key) else {
                continue;
            };
            let Some(peer) = snap.by_key(&key) else {
                continue;
            };
            let st = peer.lock();
            let (endpoint, path) = (st.endpoint, st.path);
            drop(st);
            let mut candidates: Vec<SocketAddr> = Vec::new();
            let refl =
                (!e.reflexive_endpoint.ip().is_unspecified()).then_some(e.reflexive_endpoint);
            for c in endpoint
                .into_iter()
                .chain(e.mapped_endpoints.iter().copied())
                .chain(refl)
                .chain(e.endpoints.iter().copied())
            {
                if roster::usable_endpoint(&c)
                    && (self.ipv6 || c.is_ipv4())
                    && !candidates.contains(&c)
                {
                    candidates.push(c);
                }
            }
            p.upsert_peer(
                key,
                logic::paths::PeerFacts {
                    candidates,
                    nat: e.nat,
                    home_relay: e.home_relay.clone(),
                },
                now,
            );
            let rx_ns = peer.stats.last_direct_rx_ns.load(Ordering::Relaxed);
            let last_direct_rx = (rx_ns != 0)
                .then(|| now.checked_sub(Duration::from_nanos(now_ns.saturating_sub(rx_ns))))
                .flatten();
            p.observe(
                &key,
                logic::paths::Observed {
                    path: match path {
                        PathKind::Direct => logic::paths::Path::Direct,
                        PathKind::Relay => logic::paths::Path::Relay,
                    },
                    last_direct_rx,
                },
                now,
            );
            seen.insert(key);
        }
        for gone in p.peers().into_iter().filter(|k| !seen.contains(k)) {
            p.remove_peer(&gone);
        }
    }

    fn apply_path(
        &self,
        a: logic::paths::PathAction,
        now: Instant,
        initiate_when_routed: &mut std::collections::HashSet<[u8; 32]>,
    ) {
        use logic::paths::PathAction;
        let snap = self.table.load_full();
        let b64 = |k: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
        match a {
            PathAction::UseDirect { key } => {
                if let Some(peer) = snap.by_key(&key) {
                    let route = peer.lock().relay;
                    engine_path::set_path(peer, PathKind::Direct, route);
                    engine_path::set_relay_only(peer, false);
                    tracing::info!(peer = %b64(&key), "path: direct");
                }
            }
            PathAction::UseRelay { key, relay, pinned } => {
                let Some(peer) = snap.by_key(&key) else {
                    return;
                };
                let route = self.relays.route(&relay, key, now);
                let reason = self
                    .paths()
                    .view(&key)
                    .and_then(|v| v.reason)
                    .map(|r| r.describe());
                tracing::info!(peer = %b64(&key), %relay, ?route, reason = ?reason, "path: relay");
                let old = peer.lock().relay;
                engine_path::set_path(peer, PathKind::Relay, route.or(old));
                engine_path::set_relay_only(peer, pinned);
            }
            PathAction::Probe { key, dst } => {
                if let Some(peer) = snap.by_key(&key) {
                    if let Err(e) = self.handshaker.probe_direct(peer, dst) {
                        tracing::debug!(%dst, error = %e, "direct probe not sent");
                    }
                }
            }
            PathAction::Initiate { key } => {
                let Some(peer) = snap.by_key(&key) else {
                    return;
                };
                let st = peer.lock();
                let routed = st.path == PathKind::Direct || st.relay.is_some();
                drop(st);
                if routed {
                    if let Err(e) = self.handshaker.initiate(peer) {
                        tracing::debug!(error = %e, "handshake initiation not sent");
                    }
                } else {
                    // Sent through the relay once the LOOKUP answers (`keep_routes`).
                    initiate_when_routed.insert(key);
                }
            }
        }
    }

    /// Relayed peers get their route (LOOKUP at their relay) and keep it current (the
    /// session's UDP address when bound, else its bridge); a handshake waiting for a route
    /// goes once it has one.
    fn keep_routes(
        &self,
        now: Instant,
        initiate_when_routed: &mut std::collections::HashSet<[u8; 32]>,
    ) {
        let relayed: Vec<([u8; 32], String)> = {
            let p = self.paths();
            p.peers()
                .into_iter()
                .filter_map(|k| {
                    let v = p.view(&k)?;
                    (v.path == logic::paths::Path::Relay).then_some((k, v.relay?))
                })
                .collect()
        };
        let snap = self.table.load_full();
        for (key, url) in relayed {
            let Some(peer) = snap.by_key(&key) else {
                continue;
            };
            let current = peer.lock().relay;
            if current.is_some_and(|r| self.relays.route_is_current(r, now)) {
                if initiate_when_routed.remove(&key) {
                    let _ = self.handshaker.initiate(peer);
                }
                continue;
            }
            if let Some(route) = self.relays.route(&url, key, now) {
                // Only the route: the path was set by `UseRelay`, and the engine may have
                // upgraded it to direct since (the path manager learns that next tick).
                peer.lock().relay = Some(route);
                tracing::debug!(?route, "relay route");
                if initiate_when_routed.remove(&key) {
                    let _ = self.handshaker.initiate(peer);
                }
            }
        }
        initiate_when_routed.retain(|k| snap.by_key(k).is_some());
    }

    /// The coordinator's STUN servers (plus `--stun`) into the probe; a new reflexive IP
    /// (the network changed) re-probes at once.
    fn stun_servers(&self, coordinator: &[SocketAddr], reflexive: SocketAddr) {
        let mut servers: Vec<SocketAddr> = coordinator
            .iter()
            .filter(|s| self.ipv6 || s.is_ipv4())
            .copied()
            .collect();
        servers.extend(&self.stun_extra);
        let now = Instant::now();
        let mut p = self.probe();
        p.set_local(self.endpoints());
        p.set_servers(&servers, now);
        if p.last_reflexive_ip() != Some(reflexive.ip()) {
            p.set_reflexive_ip(reflexive.ip());
            p.reprobe(now);
        }
        drop(p);
        self.probe_wake.notify_one();
    }

    /// Sends the probe's Binding requests from the WireGuard port and feeds it the STUN
    /// answers the engine queued, until the joiner stops.
    async fn run_probe(
        self: Arc<Self>,
        mut answers: tokio::sync::mpsc::Receiver<(SocketAddr, Vec<u8>)>,
        sender: Handshaker,
    ) {
        loop {
            let sends = self.probe().poll_transmit(Instant::now(), random_txid);
            for (server, req) in sends {
                if let Err(e) = sender.send_raw(server, &req) {
                    tracing::debug!(%server, error = %e, "STUN request not sent");
                }
            }
            let deadline = self.probe().poll_timeout();
            tokio::select! {
                a = answers.recv() => match a {
                    Some((src, bytes)) => {
                        let mut p = self.probe();
                        let before = (p.class(), p.mapped_endpoints().to_vec());
                        p.handle_datagram(src, &bytes, Instant::now());
                        let after = (p.class(), p.mapped_endpoints().to_vec());
                        drop(p);
                        if before != after {
                            tracing::info!(nat = ?after.0, mapped = ?after.1, "STUN probe result");
                            // Report it now: peers punch towards the mapped endpoint.
                            self.lock().handle_nat_changed();
                            self.wake.notify_one();
                        }
                    }
                    None => return,
                },
                _ = sleep_until(deadline) => {}
                _ = self.probe_wake.notified() => {}
            }
        }
    }

    fn endpoints(&self) -> Vec<SocketAddr> {
        if !self.opts.endpoints.is_empty() {
            return self.opts.endpoints.clone();
        }
        let port = self.info.listen_port;
        let mut out = Vec::new();
        for addr in self.underlay_addrs() {
            let ep = SocketAddr::new(addr, port);
            if !out.contains(&ep) {
                out.push(ep);
            }
        }
        out
    }

    /// The addresses peers could reach us at, sorted: every address of a non-TUN
    /// interface but loopback, link-local and our own mesh addresses (IPv4 only unless the
    /// sockets speak IPv6).
    fn underlay_addrs(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = ifaddrs::list()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.interface != self.opts.interface && !a.addr.is_loopback())
            .map(|a| a.addr)
            .filter(|addr| match addr {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => {
                    // Link-local needs a scope; our own mesh addresses are not underlay.
                    (v6.segments()[0] & 0xffc0) != 0xfe80
                        && !tabbify_api::ula::is_peer_ula(v6)
                        && !tabbify_api::ula::is_app_ula(v6)
                }
            })
            .filter(|addr| self.ipv6 || addr.is_ipv4())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    async fn register(&self, with_token: bool) -> Result<RegisterResponse, ClientError> {
        // A rotation that a crash or a lost answer left unsettled is settled first, so the
        // key registered is the one the coordinator admitted.
        if matches!(self.state.next_key(), Ok(Some(_))) {
            match self.rotate().await {
                Ok(_) => tracing::info!("finished the key rotation left pending"),
                Err(e) => tracing::warn!(error = %e, "the pending key rotation is not settled yet"),
            }
        }
        // The route flags in force (a reload may have changed them).
        let routes = self.lock().route_settings().clone();
        let req = RegisterRequest {
            name: self.opts.name.clone(),
            public_key: base64::engine::general_purpose::STANDARD.encode(self.public_key()),
            tags: self.opts.tags.clone(),
            wg_listen_port: self.info.listen_port,
            endpoints: self.endpoints(),
            join_token: if with_token {
                self.opts.join_token.clone()
            } else {
                None
            },
            ephemeral: self.opts.ephemeral,
            advertise_routes: routes.advertise_strings(),
            advertise_exit_node: routes.advertise_exit_node,
            concentrator: self.opts.routes.concentrator,
        };
        self.client().post(api::PATH_REGISTER, &req).await
    }

    /// Sends a heartbeat; also says whether it carried STUN mapped endpoints.
    async fn heartbeat(
        &self,
        hosted_app_ulas: Vec<Ipv6Addr>,
    ) -> (Result<HeartbeatResponse, ClientError>, bool) {
        let (mapped_endpoints, nat) = {
            let p = self.probe();
            (p.mapped_endpoints().to_vec(), p.class())
        };
        let mapped = !mapped_endpoints.is_empty();
        let (home_relay, (direct, relay)) = {
            let p = self.paths();
            (p.home().map(str::to_owned), p.counts())
        };
        // The coordinator accepts only a relay it advertised (else 400): a home relay
        // from `--relay` alone is not reported (peers reach us through their own).
        let home_relay = home_relay.filter(|h| {
            self.advertised_relays
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(h)
        });
        let routes = self.lock().route_settings().clone();
        let req = HeartbeatRequest {
            peer_id: self.peer_id.clone(),
            endpoints: self.endpoints(),
            hosted_app_ulas,
            mapped_endpoints,
            nat,
            home_relay,
            paths: api::PathCounts { direct, relay },
            advertise_routes: routes.advertise_strings(),
            advertise_exit_node: routes.advertise_exit_node,
            // Our own account of our traffic (the dashboard labels it as reported by us).
            traffic: Some(super::traffic::report(&self.status().peers, unix_now())),
            concentrator: self.opts.routes.concentrator,
        };
        (self.client().post(api::PATH_HEARTBEAT, &req).await, mapped)
    }

    fn status(&self) -> Status {
        let m = self.lock();
        let paths = self.paths();
        let snap = self.table.load_full();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut peers = Vec::new();
        for e in m.roster().entries() {
            let key = roster::decode_key(&e.public_key);
            let p = key.and_then(|k| snap.by_key(&k));
            let (direct_endpoint, engine_path, route, hs, rx, tx) = match p {
                Some(p) => {
                    let age = handshake_age(p);
                    let st = p.lock();
                    let (ep, path, route) = (st.endpoint, st.path, st.relay);
                    drop(st);
                    (
                        ep,
                        path,
                        route,
                        age.map(|a| now.saturating_sub(a)),
                        p.stats.rx_bytes.load(Ordering::Relaxed),
                        p.stats.tx_bytes.load(Ordering::Relaxed),
                    )
                }
                None => (None, PathKind::Direct, None, None, 0, 0),
            };
            let view = key.and_then(|k| paths.view(&k));
            let relayed = engine_path == PathKind::Relay && route.is_some();
            let relay_url = view
                .as_ref()
                .and_then(|v| v.relay.clone())
                .filter(|_| relayed);
            let relay_udp = relay_url
                .as_deref()
                .and_then(|u| self.relays.session(u))
                .and_then(|s| s.udp_addr());
            let endpoint = if relayed { relay_udp } else { direct_endpoint };
            // The engine's path is the truth (it upgrades on a direct receipt before the
            // path task notices): a reason shows while relayed, or while the manager
            // wants a relay it does not have.
            let reason = view
                .filter(|v| relayed || v.path == logic::paths::Path::Direct)
                .and_then(|v| v.reason)
                .map(|r| r.describe().to_owned());
            peers.push(PeerStatus {
                peer_id: e.peer_id.clone(),
                name: e.display_name.clone(),
                ula: e.ula,
                tags: e.tags.clone(),
                public_key: e.public_key.clone(),
                endpoint,
                path: if relayed { "relay" } else { "direct" }.to_owned(),
                relay: relay_url,
                reason,
                direct_endpoint,
                nat: e.nat,
                mapped_endpoints: e.mapped_endpoints.clone(),
                latest_handshake: hs.map(|d| d.as_secs()),
                rx_bytes: rx,
                tx_bytes: tx,
                direct: !relayed && hs.is_some_and(|d| now.saturating_sub(d) < LIVE_SESSION),
                app_ulas: e.hosted_app_ulas.clone(),
                ports: e.ports.clone(),
                stale: e.stale,
            });
        }
        let connected = m.session().is_connected();
        let in_use = m.coordinator().min(self.targets.len() - 1);
        let home_relay = paths.home().map(str::to_owned);
        let relays = paths
            .relays()
            .iter()
            .map(|r| {
                let s = self.relays.session(&r.url);
                RelayStatus {
                    url: r.url.clone(),
                    session: s.as_ref().is_some_and(|s| s.is_up()),
                    udp_bound: s.as_ref().is_some_and(|s| s.udp_bound(Instant::now())),
                    error: s.and_then(|s| s.error()),
                }
            })
            .collect();
        drop(paths);
        let probe = self.probe();
        Status {
            interface: self.opts.interface.clone(),
            name: m.display_name().to_owned(),
            peer_id: self.peer_id.clone(),
            ula: self.ula,
            public_key: base64::engine::general_purpose::STANDARD.encode(self.public_key()),
            tags: m.tags().to_vec(),
            listen_port: self.info.listen_port,
            driver: self.info.driver.to_string(),
            registered: connected,
            coordinator: CoordinatorStatus {
                url: self.targets[in_use].url().to_owned(),
                address: self.targets[in_use].addr(),
                targets: self
                    .targets
                    .iter()
                    .enumerate()
                    .map(|(i, c)| CoordinatorTarget {
                        url: c.url().to_owned(),
                        address: c.addr(),
                        in_use: i == in_use,
                    })
                    .collect(),
                connected,
                last_event_id: m.roster().last_event_id,
            },
            reflexive_endpoint: m.reflexive(),
            nat: probe.class(),
            mapped_endpoints: probe.mapped_endpoints().to_vec(),
            stun_servers: probe.servers().to_vec(),
            home_relay,
            relays,
            may_host_apps: m.grant().is_some_and(|g| g.may_host_apps),
            hosted_apps: m
                .apps()
                .iter()
                .map(|u| HostedApp {
                    uuid: *u,
                    ula: tabbify_api::ula::app_ula(u),
                    contested: m
                        .contested(&tabbify_api::ula::app_ula(u))
                        .map(str::to_owned),
                })
                .collect(),
            peers,
            roster_refused: m.refused(),
            drops: self
                .counters
                .nonzero()
                .into_iter()
                .map(|(r, n)| (r.name().to_owned(), n))
                .chain(self.relays.counters.nonzero())
                .collect(),
            unreachable_sent: self.counters.unreachable_sent(),
            dns: self.dns.as_ref().map(|d| d.status()),
            metrics: self.metrics_addr.map(|a| a.to_string()),
            routes: self.routes_status(&m),
            concentrator: self.opts.routes.concentrator.then(|| {
                let c = m.client_plan();
                tabbify_api::local::ConcentratorStatus {
                    serving: c.served.values().map(|s| s.peer_id.clone()).collect(),
                    refused: c.refused.clone(),
                }
            }),
        }
    }

    /// The roster's names and app ULAs into the DNS stub (it swaps its zone only when they
    /// changed).
    fn refresh_dns(&self) {
        let Some(dns) = &self.dns else { return };
        let ipv4 = *self.ipv4.lock().unwrap_or_else(|p| p.into_inner());
        let (members, apps, local) = {
            let m = self.lock();
            let me = super::dns::Member {
                display_name: m.display_name().to_owned(),
                peer_id: self.peer_id.clone(),
                ula: self.ula,
                ipv4,
            };
            let mut apps: Vec<Ipv6Addr> = m.apps().iter().map(tabbify_api::ula::app_ula).collect();
            let mut members = vec![me];
            for e in m.roster().entries() {
                members.push(super::dns::Member {
                    display_name: e.display_name.clone(),
                    peer_id: e.peer_id.clone(),
                    ula: e.ula,
                    ipv4: e.ipv4,
                });
                apps.extend(e.hosted_app_ulas.iter().copied());
            }
            (members, apps, m.apps().to_vec())
        };
        dns.update(members, apps, local);
    }

    fn app_change(&self, uuid: Uuid, add: bool) -> Result<serde_json::Value, String> {
        let ula = tabbify_api::ula::app_ula(&uuid);
        let net = IpNet::host(IpAddr::V6(ula));
        let mut m = self.lock();
        if add {
            m.check_app_add()?;
            link::add_address(&self.opts.interface, &net).map_err(|e| e.to_string())?;
            m.handle_app_added(uuid);
        } else {
            m.handle_app_removed(uuid)?;
            if let Err(e) = link::del_address(&self.opts.interface, &net) {
                tracing::warn!(error = %e, "app address not removed");
            }
        }
        // Decrypted packets are delivered only to our ULA and the apps hosted now.
        self.refresh_local(&m);
        self.state
            .set_apps(m.apps())
            .map_err(|e| format!("{e:#}"))?;
        drop(m);
        tracing::info!(app = %uuid, %ula, hosted = add, "hosted apps changed");
        self.wake.notify_one();
        Ok(serde_json::json!({"uuid": uuid, "ula": ula}))
    }
}

/// The CN of the first certificate in `pem`: the identity the coordinator sees.
fn certificate_cn(pem: &str) -> anyhow::Result<String> {
    let certs = tabbify_api::tls::certs(pem, "certificate")?;
    let der = certs.first().context("no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .context("the certificate has no common name (CN)")?;
    let cn = cn
        .as_str()
        .context("the certificate's CN is not a string")?;
    Ok(cn.to_owned())
}

/// The mesh prefixes (peer ULAs, app ULAs), routed into the TUN for the joiner's life.
pub fn mesh_prefixes() -> Vec<IpNet> {
    [
        Ipv6Addr::new(0xfd5a, 0x1f00, 0, 0, 0, 0, 0, 0),
        Ipv6Addr::new(0xfd5a, 0x1f02, 0, 0, 0, 0, 0, 0),
    ]
    .into_iter()
    .filter_map(|a| IpNet::new(IpAddr::V6(a), 32))
    .collect()
}

/// The fwmark (and policy routing table) of `--exit-node`: the engine's sockets and the
/// coordinator connections carry it, so they skip the tunnel (`crate::policy`). Distinct
/// from `up`'s default so both can run in one namespace.
pub const EXIT_MARK: u32 = 0x7462;

/// The destinations this joiner accepts from peers: its ULA, its mesh IPv4, its hosted
/// apps' ULAs, and the prefixes it routes for the peers granted them.
fn local_nets(
    ula: Ipv6Addr,
    ipv4: Option<Ipv4Addr>,
    apps: &[Uuid],
    grants: &[([u8; 32], IpNet)],
    port_grants: &[([u8; 32], IpNet, ProtoRanges)],
) -> LocalNets {
    let addrs = std::iter::once(ula)
        .chain(apps.iter().map(tabbify_api::ula::app_ula))
        .map(IpAddr::V6)
        .chain(ipv4.map(IpAddr::V4));
    LocalNets::new(addrs, []).with_route_grants(grants.iter().copied(), port_grants.iter().cloned())
}

/// What [`EventStream::next`] yields: an event with its id, the end, or a failure.
type StreamItem = Result<Option<(Option<u64>, SseEvent)>, ClientError>;

/// What ended one wait of [`Joiner::drive`].
enum Woke {
    /// The stream yielded an event, ended or broke (boxed: an event is large, and this
    /// happens once per roster change).
    Stream(Box<StreamItem>),
    /// The machine's next deadline passed.
    Timer,
    /// The control socket changed something.
    Notified,
    /// An address of a non-TUN interface appeared or went.
    Underlay,
}

/// The netlink address watch and the TUN's interface index (its own address changes, the
/// hosted app ULAs, are not underlay changes).
struct UnderlayWatch {
    socket: tokio::io::unix::AsyncFd<addr_watch::AddrWatch>,
    tun_index: u32,
}

impl UnderlayWatch {
    /// `None` (logged) when the socket cannot be opened or the TUN's index read: the
    /// joiner then learns of a move at its next heartbeat, or when its stream dies.
    // `AsyncFd::new` is deprecated because a type could hand it a descriptor it does not
    // own; `AddrWatch` owns its `OwnedFd` and always returns that same descriptor, which
    // stays open until the `AsyncFd` (and the watch inside it) drops, so the condition of
    // the unsafe `AsyncFd::register` holds, and this crate forbids unsafe code.
    #[allow(deprecated)]
    fn open(tun: &str) -> Option<UnderlayWatch> {
        let path = format!("/sys/class/net/{tun}/ifindex");
        let opened = std::fs::read_to_string(&path)
            .map_err(|e| format!("{path}: {e}"))
            .and_then(|text| {
                text.trim()
                    .parse::<u32>()
                    .map_err(|e| format!("{path}: {e}"))
            })
            .and_then(|tun_index| {
                let socket = addr_watch::AddrWatch::open()
                    .and_then(tokio::io::unix::AsyncFd::new)
                    .map_err(|e| format!("netlink: {e}"))?;
                Ok(UnderlayWatch { socket, tun_index })
            });
        match opened {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::warn!(%error, "cannot watch for underlay address changes");
                None
            }
        }
    }
}

/// Resolves when an address of an interface other than the TUN appeared or went; never
/// without a watch (or after the watch failed, which is logged). Cancel-safe: datagrams
/// are read only between awaits and a relevant one resolves at once.
async fn underlay_changed(watch: &mut Option<UnderlayWatch>) {
    let Some(w) = watch else {
        return std::future::pending().await;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut guard = match w.socket.readable().await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::warn!(%error, "underlay address watch failed");
                *watch = None;
                return std::future::pending().await;
            }
        };
        let mut relevant = false;
        loop {
            match guard.get_inner().recv(&mut buf) {
                Ok(n) => {
                    let parsed = addr_watch::parse(&buf[..n.min(buf.len())]);
                    if parsed.malformed > 0 {
                        tracing::debug!("malformed netlink address message skipped");
                    }
                    relevant |= parsed.changes.iter().any(|c| c.ifindex != w.tun_index);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                // ENOBUFS (105): the kernel dropped notifications; something changed.
                Err(e) if e.raw_os_error() == Some(105) => relevant = true,
                Err(error) => {
                    tracing::warn!(%error, "underlay address watch failed");
                    *watch = None;
                    return std::future::pending().await;
                }
            }
        }
        if relevant {
            return;
        }
    }
}

/// The stream's next event; never resolves without a stream.
async fn next_event(stream: &mut Option<EventStream>) -> StreamItem {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; never resolves without one.
/// A fresh random STUN transaction id (from a v4 UUID's random bytes).
fn random_txid() -> api::stun::TransactionId {
    let u = Uuid::new_v4();
    let mut t = [0u8; 12];
    t.copy_from_slice(&u.as_bytes()[4..]);
    t
}

/// A thread that moves datagrams from the engine's control queue (a blocking wait): STUN
/// to the probe task, relay control (BIND_ACK) to the path task; it ends when both are
/// gone.
fn spawn_control_drain(
    queue: Arc<crate::core::demux::ControlQueue>,
    tx: tokio::sync::mpsc::Sender<(SocketAddr, Vec<u8>)>,
    relay_tx: tokio::sync::mpsc::Sender<(SocketAddr, Vec<u8>)>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("tabbify-control-rx".into())
        .spawn(move || {
            while !(tx.is_closed() && relay_tx.is_closed()) {
                let Some(d) = queue.pop_wait(Duration::from_millis(500)) else {
                    continue;
                };
                // Full: the task is behind; a lost answer is retransmitted for (STUN) or
                // BIND again (relay).
                match d.kind {
                    crate::core::demux::Kind::Stun => {
                        let _ = tx.try_send((d.src, d.bytes().to_vec()));
                    }
                    crate::core::demux::Kind::RelayControl => {
                        let _ = relay_tx.try_send((d.src, d.bytes().to_vec()));
                    }
                    _ => {}
                }
            }
        })
        .context("starting the control-queue thread")?;
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}
/// Time since the last authenticated datagram straight from `peer` (`None`: never).
fn since_direct_rx(peer: &crate::core::peer::Peer) -> Option<Duration> {
    let rx = peer.stats.last_direct_rx_ns.load(Ordering::Relaxed);
    (rx != 0).then(|| Duration::from_nanos(engine_path::mono_ns().saturating_sub(rx)))
}

/// Unix time in seconds (metrics' `now`).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
            Request::RotateKey => self.rotate_now().await,
            Request::Leave => self.leave_now().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_prefixes_cover_every_peer_and_app_ula() {
        let p = mesh_prefixes();
        assert_eq!(
            p.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["fd5a:1f00::/32", "fd5a:1f02::/32"]
        );
        let peer = tabbify_api::ula::peer_ula(&[7u8; 32]);
        let app = tabbify_api::ula::app_ula(&Uuid::from_u128(42));
        assert!(p.iter().any(|n| n.contains(IpAddr::V6(peer))));
        assert!(p.iter().any(|n| n.contains(IpAddr::V6(app))));
    }

    #[test]
    fn a_joiner_accepts_only_its_ula_and_its_apps() {
        let me = tabbify_api::ula::peer_ula(&[1u8; 32]);
        let other = tabbify_api::ula::peer_ula(&[2u8; 32]);
        let mine = Uuid::from_u128(1);
        let theirs = Uuid::from_u128(2);
        let l = local_nets(me, None, &[mine], &[], &[]);
        assert!(l.contains(IpAddr::V6(me)));
        assert!(l.contains(IpAddr::V6(tabbify_api::ula::app_ula(&mine))));
        assert!(!l.contains(IpAddr::V6(other)));
        assert!(!l.contains(IpAddr::V6(tabbify_api::ula::app_ula(&theirs))));
        assert!(!l.contains("192.168.1.1".parse().unwrap()));
        // The DNS stub's address is on the TUN but not local to the engine: a packet a
        // peer sends to it through the tunnel is dropped (the stub serves this host only).
        assert!(!l.contains(IpAddr::V6(crate::join::dns::SERVICE_V6)));
    }
}
