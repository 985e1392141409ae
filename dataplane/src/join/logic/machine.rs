//! The joiner's control state machine: coordinator answers, roster events, hosted-app
//! changes and timer ticks in; table, route, handshake and coordinator requests out.
//!
//! Call order (the I/O shell in [`crate::join::shell`] does exactly this):
//!
//! ```text
//! Machine::new(config)                            queues Register
//! loop {
//!     while let Some(action) = m.poll_action() {  apply it, in order; the results of
//!         …                                       Register / Heartbeat / OpenStream go
//!     }                                           back in through handle_registered /
//!                                                 handle_heartbeat / handle_stream_opened
//!     wait for m.poll_timeout(), a roster event, the stream's end or an app change
//!     m.handle_timeout(now) | m.handle_event(now, …) | m.handle_stream_closed(now, …) | …
//! }                                               until Action::Exit
//! ```
//!
//! Invariants:
//! * the table changes only through [`Action::UpsertPeer`], [`Action::RemovePeer`] and
//!   [`Action::ClearPeers`]; a reconcile emits them only for peers whose desired state
//!   differs from what was applied last, so a roster event never resets another peer's
//!   session;
//! * losing the coordinator emits no table action: established tunnels keep working while
//!   the machine re-registers with backoff (0.5 s doubling, capped at the heartbeat
//!   interval, reset once a stream opens);
//! * every input that depends on time takes `now`; the machine never reads a clock and
//!   performs no I/O (it logs through `tracing`, as quinn-proto does).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tabbify_api::{self as api, HeartbeatResponse, RegisterResponse, SseEvent};
use uuid::Uuid;

use super::roster::{self, Applied, Desired, Roster, SelfView, KEEPALIVE_SECS};
use super::session::{Grace, Session};
use crate::core::filter::PortFilter;
use crate::core::net::IpNet;
use crate::core::peer::PeerConfig;
use crate::join::client::ClientError;

/// The first retry delay after a lost session; it doubles up to the heartbeat interval.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// The heartbeat interval assumed until the coordinator states one.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Initiations in a hole-punch burst, and the gap between them.
pub const PUNCH_BURST: u32 = 8;
/// The gap between two initiations of a hole-punch burst.
pub const PUNCH_GAP: Duration = Duration::from_millis(125);

/// What the machine is told once, at start.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our peer id (derived from the node key).
    pub peer_id: String,
    /// Our peer ULA (derived from the node key).
    pub ula: Ipv6Addr,
    /// The display name asked for.
    pub name: String,
    /// The tags asked for.
    pub tags: Vec<String>,
    /// A join token was given.
    pub has_join_token: bool,
    /// The apps hosted here (from the state directory).
    pub apps: Vec<Uuid>,
}

/// What the coordinator granted at the last registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The display name recorded.
    pub display_name: String,
    /// The tags granted.
    pub tags: Vec<String>,
    /// The policy lets this node host apps.
    pub may_host_apps: bool,
}

/// Names a peer in the log lines the shell writes when it applies an action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerLabel {
    /// The coordinator's peer id.
    pub peer_id: String,
    /// Display name.
    pub name: String,
    /// The peer's ULA.
    pub ula: Ipv6Addr,
}

impl PeerLabel {
    fn of(d: &Desired) -> Self {
        Self {
            peer_id: d.peer_id.clone(),
            name: d.name.clone(),
            ula: d.ula,
        }
    }
}

/// Why the joiner stops on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The coordinator revoked this node (its message).
    Revoked(String),
    /// The coordinator refused the first registration (its message).
    Refused(String),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Revoked(e) => write!(f, "this node was revoked by the coordinator: {e}"),
            Exit::Refused(e) => write!(f, "registration refused: {e}"),
        }
    }
}

/// One thing for the shell to do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `POST /v1/mesh/register`, with the join token when `with_token`; answer with
    /// [`Machine::handle_registered`].
    Register {
        /// Send the join token.
        with_token: bool,
    },
    /// `POST /v1/mesh/heartbeat` advertising these app ULAs; answer with
    /// [`Machine::handle_heartbeat`].
    Heartbeat {
        /// The hosted app ULAs to advertise.
        hosted_app_ulas: Vec<Ipv6Addr>,
    },
    /// Open the SSE roster stream; answer with [`Machine::handle_stream_opened`].
    OpenStream,
    /// Drop the roster stream (the session ended).
    CloseStream,
    /// Add or update a table peer and its port filter.
    UpsertPeer {
        /// The peer as the table should have it.
        config: PeerConfig,
        /// Its port rules.
        filter: PortFilter,
        /// It was not in the table before.
        new: bool,
        /// For the log.
        label: PeerLabel,
    },
    /// Remove a table peer.
    RemovePeer {
        /// Its public key.
        public_key: [u8; 32],
        /// For the log.
        label: PeerLabel,
    },
    /// Add and delete kernel routes into the TUN.
    Routes {
        /// Prefixes to route into the TUN.
        add: Vec<IpNet>,
        /// Prefixes no longer routed.
        del: Vec<IpNet>,
    },
    /// Send a handshake initiation to a new peer now, so that the first packet finds a
    /// live session and NAT mappings open from both sides.
    Initiate {
        /// The peer.
        public_key: [u8; 32],
    },
    /// A hole punch begins: point the peer at the other side's reflexive endpoint.
    HolePunch {
        /// The peer.
        public_key: [u8; 32],
        /// The other side's reflexive endpoint.
        endpoint: SocketAddr,
    },
    /// One initiation of a hole-punch burst, skipped once a handshake with the peer has
    /// completed since `burst_started`.
    PunchInitiation {
        /// The peer.
        public_key: [u8; 32],
        /// When the burst began.
        burst_started: Instant,
    },
    /// Remove every table peer (revocation).
    ClearPeers,
    /// Stop the joiner with this reason (the last action).
    Exit(Exit),
}

/// A hole-punch burst in progress.
#[derive(Clone, Debug)]
struct Punch {
    public_key: [u8; 32],
    started: Instant,
    next_at: Instant,
    left: u32,
}

/// The joiner's control state. See the module documentation for the call order.
#[derive(Debug)]
pub struct Machine {
    config: Config,
    session: Session,
    /// Set by the first successful registration (and kept): the node has been admitted.
    grant: Option<Grant>,
    roster: Roster,
    me: SelfView,
    /// The peers as last written to the table, by public key.
    applied: BTreeMap<[u8; 32], Desired>,
    /// The kernel routes last written.
    routes: BTreeSet<IpNet>,
    apps: Vec<Uuid>,
    /// The coordinator's heartbeat interval.
    heartbeat: Duration,
    /// The delay before the next registration after a lost session.
    backoff: Duration,
    /// The hosted apps changed while no stream was open: heartbeat once one is.
    heartbeat_pending: bool,
    punches: Vec<Punch>,
    actions: VecDeque<Action>,
}

impl Machine {
    /// A machine about to register for the first time (queues [`Action::Register`]).
    pub fn new(config: Config) -> Self {
        let mut m = Self {
            roster: Roster::new(&config.peer_id),
            me: SelfView {
                peer_id: config.peer_id.clone(),
                reflexive: None,
            },
            apps: config.apps.clone(),
            config,
            session: Session::Registering { with_token: true },
            grant: None,
            applied: BTreeMap::new(),
            routes: BTreeSet::new(),
            heartbeat: DEFAULT_HEARTBEAT,
            backoff: INITIAL_BACKOFF,
            heartbeat_pending: false,
            punches: Vec::new(),
            actions: VecDeque::new(),
        };
        m.actions.push_back(Action::Register { with_token: true });
        m
    }

    // ----- outputs -----

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Machine::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let session = match self.session {
            Session::Disconnected { retry_at } => Some(retry_at),
            Session::Connected { next_heartbeat, .. } => Some(next_heartbeat),
            _ => None,
        };
        self.punches.iter().map(|p| p.next_at).chain(session).min()
    }

    // ----- inputs -----

    /// The answer to [`Action::Register`].
    pub fn handle_registered(&mut self, now: Instant, r: Result<RegisterResponse, ClientError>) {
        let Session::Registering { with_token } = self.session else {
            return;
        };
        let resp = match r {
            Ok(resp) => resp,
            // A single-use token is spent by the first registration: later ones go
            // without it (the key is admitted) and fall back to it only if refused.
            Err(ClientError::Status { status, .. })
                if self.grant.is_some()
                    && !with_token
                    && status == http::StatusCode::UNAUTHORIZED
                    && self.config.has_join_token =>
            {
                self.session = Session::Registering { with_token: true };
                self.actions
                    .push_back(Action::Register { with_token: true });
                return;
            }
            Err(e) => return self.lose_session(now, Err(e)),
        };
        if resp.ula != self.config.ula {
            tracing::warn!(ours = %self.config.ula, coordinator = %resp.ula, "the coordinator derives another ULA for our key");
        }
        let interval = interval(resp.heartbeat_interval_secs);
        // Peers re-register at their own pace after a coordinator restart; the
        // coordinator expires a silent peer after this many heartbeats anyway.
        let grace = self
            .grant
            .is_some()
            .then(|| Grace::new(now, interval * api::MISSED_HEARTBEATS_TO_EXPIRE));
        self.grant = Some(Grant {
            display_name: resp.display_name.clone(),
            tags: resp.tags.clone(),
            may_host_apps: resp.may_host_apps,
        });
        self.heartbeat = interval;
        self.me.reflexive = Some(resp.reflexive_endpoint);
        self.roster.replace(resp.roster);
        if !resp.may_host_apps && !self.apps.is_empty() {
            tracing::warn!(
                apps = self.apps.len(),
                "the policy does not let this node host apps; hosted apps are not advertised"
            );
        }
        tracing::info!(name = %resp.display_name, peer_id = %resp.peer_id, ula = %resp.ula, tags = ?resp.tags, reflexive = %resp.reflexive_endpoint, "registered");
        self.session = Session::Opening { grace };
        self.reconcile(now);
        self.push_heartbeat();
    }

    /// The answer to [`Action::Heartbeat`].
    pub fn handle_heartbeat(&mut self, now: Instant, r: Result<HeartbeatResponse, ClientError>) {
        let opening = match self.session {
            Session::Opening { .. } => true,
            Session::Connected { .. } => false,
            _ => return,
        };
        let resp = match r {
            Ok(resp) => resp,
            // Before the stream is open, any failure ends the attempt.
            Err(e) if opening => return self.lose_session(now, Err(e)),
            // The coordinator forgot us (restart, expiry): register again.
            Err(ClientError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => {
                return self.lose_session(
                    now,
                    Err(ClientError::Transport(
                        "the coordinator no longer knows us".into(),
                    )),
                );
            }
            Err(e) if e.is_transient() => {
                // The stream notices a dead coordinator; a lost heartbeat is not fatal.
                tracing::warn!(error = %e, "heartbeat failed");
                return;
            }
            Err(e) => return self.lose_session(now, Err(e)),
        };
        self.heartbeat = interval(resp.heartbeat_interval_secs);
        let changed = self.me.reflexive != Some(resp.reflexive_endpoint);
        self.me.reflexive = Some(resp.reflexive_endpoint);
        if changed {
            self.reconcile(now);
        }
        if opening {
            self.actions.push_back(Action::OpenStream);
        }
    }

    /// The answer to [`Action::OpenStream`].
    pub fn handle_stream_opened(&mut self, now: Instant, r: Result<(), ClientError>) {
        let Session::Opening { grace } = &mut self.session else {
            return;
        };
        let grace = grace.take();
        if let Err(e) = r {
            return self.lose_session(now, Err(e));
        }
        self.session = Session::Connected {
            grace,
            period: self.heartbeat,
            next_heartbeat: now + self.heartbeat,
        };
        self.backoff = INITIAL_BACKOFF;
        if std::mem::take(&mut self.heartbeat_pending) {
            self.push_heartbeat();
        }
    }

    /// One roster event from the stream (`id`: its SSE id).
    pub fn handle_event(&mut self, now: Instant, id: Option<u64>, ev: SseEvent) {
        if let Some(grace) = self.session.grace_mut() {
            match &ev {
                SseEvent::PeerRemove(r) => {
                    if let Some(g) = grace {
                        g.removed.insert(r.peer_id.clone());
                    }
                }
                SseEvent::Policy(_) => *grace = None,
                _ => {}
            }
        }
        match self.roster.apply(id, ev) {
            Applied::Changed => self.reconcile(now),
            Applied::Unchanged => {}
            Applied::HolePunch {
                public_key,
                endpoint,
            } => self.hole_punch(now, &public_key, endpoint),
        }
    }

    /// The roster stream ended: `Ok` when the coordinator closed it, `Err` when it broke.
    pub fn handle_stream_closed(&mut self, now: Instant, r: Result<(), ClientError>) {
        if self.session.is_connected() {
            self.lose_session(now, r);
        }
    }

    /// Time passed: register again, heartbeat, end a grace period, punch.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (mut grace_over, mut heartbeat) = (false, false);
        match &mut self.session {
            Session::Disconnected { retry_at } if now >= *retry_at => {
                let with_token = self.grant.is_none();
                self.session = Session::Registering { with_token };
                self.actions.push_back(Action::Register { with_token });
            }
            Session::Connected {
                period,
                next_heartbeat,
                grace,
            } if now >= *next_heartbeat => {
                *next_heartbeat = now + *period;
                // The grace period ends at the first heartbeat tick past its window.
                if grace.as_ref().is_some_and(|g| now >= g.until) {
                    *grace = None;
                    grace_over = true;
                }
                heartbeat = true;
            }
            _ => {}
        }
        if grace_over {
            self.reconcile(now);
        }
        if heartbeat {
            self.push_heartbeat();
        }
        self.fire_punches(now);
    }

    /// Whether an app may be added now: `Err` is the message for the user.
    pub fn check_app_add(&self) -> Result<(), String> {
        match self.grant.as_ref().map(|g| g.may_host_apps) {
            None => Err("not registered with the coordinator yet; try again in a moment".into()),
            Some(false) => Err(
                "the coordinator's policy does not let this node host apps (policy `app_hosts`)"
                    .into(),
            ),
            Some(true) => Ok(()),
        }
    }

    /// The app is hosted here (its address is on the TUN); the coordinator learns it with
    /// the next heartbeat, sent at once when a stream is open.
    pub fn handle_app_added(&mut self, uuid: Uuid) {
        if !self.apps.contains(&uuid) {
            self.apps.push(uuid);
        }
        self.apps_changed();
    }

    /// The app is no longer hosted here; `Err` (for the user) when it was not.
    pub fn handle_app_removed(&mut self, uuid: Uuid) -> Result<(), String> {
        if !self.apps.contains(&uuid) {
            return Err(format!("app {uuid} is not hosted here"));
        }
        self.apps.retain(|a| *a != uuid);
        self.apps_changed();
        Ok(())
    }

    // ----- what `status` shows -----

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The visible roster.
    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// What the last registration granted (`None` until the node is first admitted).
    pub fn grant(&self) -> Option<&Grant> {
        self.grant.as_ref()
    }

    /// The display name: as granted, else as asked.
    pub fn display_name(&self) -> &str {
        self.grant
            .as_ref()
            .map_or(&self.config.name, |g| &g.display_name)
    }

    /// The tags: as granted, else as asked.
    pub fn tags(&self) -> &[String] {
        self.grant.as_ref().map_or(&self.config.tags, |g| &g.tags)
    }

    /// Our endpoint as the coordinator last saw it.
    pub fn reflexive(&self) -> Option<SocketAddr> {
        self.me.reflexive
    }

    /// The apps hosted here.
    pub fn apps(&self) -> &[Uuid] {
        &self.apps
    }

    // ----- rules -----

    /// Ends the session: the table is left alone; revocation and a refusal before any
    /// admission end the joiner, anything else registers again after the backoff.
    fn lose_session(&mut self, now: Instant, r: Result<(), ClientError>) {
        self.actions.push_back(Action::CloseStream);
        match r {
            Ok(()) => tracing::warn!("coordinator closed the roster stream; reconnecting"),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in = ?self.backoff, "coordinator");
            }
            Err(e) => {
                if e.code() == Some("revoked") {
                    self.session = Session::Ended;
                    self.actions.push_back(Action::ClearPeers);
                    self.actions
                        .push_back(Action::Exit(Exit::Revoked(e.to_string())));
                    return;
                }
                if self.grant.is_none() {
                    self.session = Session::Ended;
                    self.actions
                        .push_back(Action::Exit(Exit::Refused(e.to_string())));
                    return;
                }
                tracing::error!(error = %e, retry_in = ?self.backoff, "coordinator refused us; retrying");
            }
        }
        self.session = Session::Disconnected {
            retry_at: now + self.backoff,
        };
        let cap = self.heartbeat.max(Duration::from_secs(1));
        self.backoff = (self.backoff * 2).min(cap);
    }

    fn apps_changed(&mut self) {
        if self.session.is_connected() {
            self.push_heartbeat();
        } else {
            self.heartbeat_pending = true;
        }
    }

    fn push_heartbeat(&mut self) {
        let hosted_app_ulas = if self.grant.as_ref().is_some_and(|g| g.may_host_apps) {
            self.apps.iter().map(tabbify_api::ula::app_ula).collect()
        } else {
            Vec::new()
        };
        self.actions
            .push_back(Action::Heartbeat { hosted_app_ulas });
    }

    /// Makes the table and the kernel routes match the roster; touches only what changed.
    fn reconcile(&mut self, now: Instant) {
        let desired = self.roster.desired(&self.me);
        let grace = self.session.grace();
        let mut next = desired.clone();
        let mut fresh = Vec::new();
        for (key, d) in &desired {
            let before = self.applied.get(key);
            if before == Some(d) {
                continue;
            }
            let endpoint_changed = before.map(|b| b.endpoint) != Some(d.endpoint);
            let config = PeerConfig {
                public_key: *key,
                preshared_key: None,
                // Keep an endpoint learned by roaming unless the roster's choice changed.
                endpoint: if endpoint_changed { d.endpoint } else { None },
                allowed_ips: d.allowed_ips.clone(),
                persistent_keepalive: Some(KEEPALIVE_SECS),
            };
            self.actions.push_back(Action::UpsertPeer {
                config,
                filter: PortFilter::from_rules(&d.outbound, &d.inbound),
                new: before.is_none(),
                label: PeerLabel::of(d),
            });
            if before.is_none() {
                fresh.push(*key);
            }
        }
        for (key, d) in &self.applied {
            if !desired.contains_key(key) {
                if grace.is_some_and(|g| g.keeps(&d.peer_id, now)) {
                    next.insert(*key, d.clone());
                    continue;
                }
                self.actions.push_back(Action::RemovePeer {
                    public_key: *key,
                    label: PeerLabel::of(d),
                });
            }
        }
        let wanted: BTreeSet<IpNet> = next
            .values()
            .flat_map(|d| d.allowed_ips.iter().copied())
            .collect();
        let add: Vec<IpNet> = wanted.difference(&self.routes).copied().collect();
        let del: Vec<IpNet> = self.routes.difference(&wanted).copied().collect();
        if !add.is_empty() || !del.is_empty() {
            self.actions.push_back(Action::Routes { add, del });
        }
        self.routes = wanted;
        self.applied = next;
        for public_key in fresh {
            self.actions.push_back(Action::Initiate { public_key });
        }
    }

    /// The coordinator asks both NATed sides to open a path at once: point the peer at the
    /// other side's reflexive endpoint and send a burst of initiations there.
    fn hole_punch(&mut self, now: Instant, public_key: &str, endpoint: SocketAddr) {
        let Some(key) = roster::decode_key(public_key) else {
            return;
        };
        if !self.applied.contains_key(&key) {
            return;
        }
        self.actions.push_back(Action::HolePunch {
            public_key: key,
            endpoint,
        });
        self.punches.push(Punch {
            public_key: key,
            started: now,
            next_at: now,
            left: PUNCH_BURST,
        });
        self.fire_punches(now);
    }

    fn fire_punches(&mut self, now: Instant) {
        for p in &mut self.punches {
            if p.next_at <= now {
                self.actions.push_back(Action::PunchInitiation {
                    public_key: p.public_key,
                    burst_started: p.started,
                });
                p.left -= 1;
                p.next_at = now + PUNCH_GAP;
            }
        }
        self.punches.retain(|p| p.left > 0);
    }
}

/// The coordinator's heartbeat interval, bounded to 1 s … 1 h.
fn interval(secs: u64) -> Duration {
    Duration::from_secs(secs.clamp(1, 3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use http::StatusCode;
    use tabbify_api::{HolePunch, PeerRemove, PortRange, PortRules, RosterEntry, RosterSnapshot};

    const SEC: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn key(n: u8) -> [u8; 32] {
        [n; 32]
    }

    fn host(ip: &str) -> IpNet {
        IpNet::host(ip.parse().unwrap())
    }

    /// A public peer (its reflexive endpoint is its own address).
    fn entry(id: &str, n: u8) -> RosterEntry {
        let ep: SocketAddr = format!("198.51.100.{n}:51820").parse().unwrap();
        RosterEntry {
            peer_id: id.into(),
            identity: id.into(),
            ula: format!("fd5a:1f00::{n}").parse().unwrap(),
            display_name: id.into(),
            tags: vec!["supervisor".into()],
            public_key: base64::engine::general_purpose::STANDARD.encode(key(n)),
            endpoints: vec![ep],
            reflexive_endpoint: ep,
            hosted_app_ulas: vec![],
            ports: PortRules {
                outbound: vec![PortRange::ALL],
                inbound: vec![PortRange {
                    first: 8730,
                    last: 8730,
                }],
                ..Default::default()
            },
        }
    }

    fn config(has_join_token: bool, apps: Vec<Uuid>) -> Config {
        Config {
            peer_id: "me".into(),
            ula: "fd5a:1f00::99".parse().unwrap(),
            name: "asked".into(),
            tags: vec!["asked".into()],
            has_join_token,
            apps,
        }
    }

    fn registered(roster: Vec<RosterEntry>) -> RegisterResponse {
        RegisterResponse {
            peer_id: "me".into(),
            ula: "fd5a:1f00::99".parse().unwrap(),
            display_name: "granted".into(),
            tags: vec!["supervisor".into()],
            may_host_apps: true,
            reflexive_endpoint: "203.0.113.9:51820".parse().unwrap(),
            heartbeat_interval_secs: 10,
            roster,
        }
    }

    fn beat(reflexive: &str) -> HeartbeatResponse {
        HeartbeatResponse {
            heartbeat_interval_secs: 10,
            reflexive_endpoint: reflexive.parse().unwrap(),
        }
    }

    fn refused(status: StatusCode, code: &str) -> ClientError {
        ClientError::Status {
            status,
            code: code.into(),
            message: "no".into(),
        }
    }

    fn unreachable() -> ClientError {
        ClientError::Transport("connection refused".into())
    }

    fn drain(m: &mut Machine) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    /// Register (answered with `roster`), heartbeat and open the stream, all at `t`.
    fn connect(m: &mut Machine, t: Instant, roster: Vec<RosterEntry>) -> Vec<Action> {
        let mut out = drain(m);
        m.handle_registered(t, Ok(registered(roster)));
        out.extend(drain(m));
        m.handle_heartbeat(t, Ok(beat("203.0.113.9:51820")));
        out.extend(drain(m));
        m.handle_stream_opened(t, Ok(()));
        out.extend(drain(m));
        out
    }

    /// Loses the stream at `lost`, registers again when the backoff says (answered with
    /// `again`) and opens the stream. Returns when that was and its actions.
    fn reconnect(
        m: &mut Machine,
        lost: Instant,
        again: Vec<RosterEntry>,
    ) -> (Instant, Vec<Action>) {
        m.handle_stream_closed(lost, Ok(()));
        assert_eq!(drain(m), vec![Action::CloseStream]);
        let t1 = m.poll_timeout().unwrap();
        m.handle_timeout(t1);
        (t1, connect(m, t1, again))
    }

    fn upserts(actions: &[Action]) -> Vec<([u8; 32], bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::UpsertPeer { config, new, .. } => Some((config.public_key, *new)),
                _ => None,
            })
            .collect()
    }

    fn removals(actions: &[Action]) -> Vec<[u8; 32]> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::RemovePeer { public_key, .. } => Some(*public_key),
                _ => None,
            })
            .collect()
    }

    fn initiations(actions: &[Action]) -> Vec<[u8; 32]> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Initiate { public_key } => Some(*public_key),
                _ => None,
            })
            .collect()
    }

    fn is_table_action(a: &Action) -> bool {
        matches!(
            a,
            Action::UpsertPeer { .. }
                | Action::RemovePeer { .. }
                | Action::ClearPeers
                | Action::Routes { .. }
        )
    }

    #[test]
    fn the_first_registration_carries_the_join_token() {
        let mut m = Machine::new(config(true, vec![]));
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: true }]);
        assert_eq!(m.session(), &Session::Registering { with_token: true });
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn a_reregistration_omits_the_token_and_retries_with_it_after_a_401() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![]);
        m.handle_stream_closed(t, Ok(()));
        drain(&mut m);
        m.handle_timeout(t + 500 * MS);
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: false }]);
        m.handle_registered(
            t + 510 * MS,
            Err(refused(StatusCode::UNAUTHORIZED, "token_missing")),
        );
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: true }]);
        // Refused with the token as well: an admitted node keeps retrying.
        m.handle_registered(
            t + 520 * MS,
            Err(refused(StatusCode::UNAUTHORIZED, "token_used")),
        );
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        assert!(matches!(m.session(), Session::Disconnected { .. }));
    }

    #[test]
    fn a_reregistration_without_a_configured_token_is_not_retried_with_one() {
        let t = Instant::now();
        let mut m = Machine::new(config(false, vec![]));
        connect(&mut m, t, vec![]);
        m.handle_stream_closed(t, Ok(()));
        drain(&mut m);
        m.handle_timeout(t + SEC);
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: false }]);
        m.handle_registered(
            t + SEC,
            Err(refused(StatusCode::UNAUTHORIZED, "token_missing")),
        );
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        assert!(matches!(m.session(), Session::Disconnected { .. }));
    }

    #[test]
    fn registration_reconciles_then_heartbeats_then_opens_the_stream() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: true }]);
        m.handle_registered(t, Ok(registered(vec![entry("a", 1)])));
        let a = drain(&mut m);
        assert!(
            matches!(&a[0], Action::UpsertPeer { new: true, .. }),
            "{a:?}"
        );
        assert_eq!(
            a[1..],
            [
                Action::Routes {
                    add: vec![host("fd5a:1f00::1")],
                    del: vec![]
                },
                Action::Initiate { public_key: key(1) },
                Action::Heartbeat {
                    hosted_app_ulas: vec![]
                },
            ]
        );
        assert!(matches!(m.session(), Session::Opening { grace: None }));
        m.handle_heartbeat(t, Ok(beat("203.0.113.9:51820")));
        assert_eq!(drain(&mut m), vec![Action::OpenStream]);
        m.handle_stream_opened(t, Ok(()));
        assert_eq!(drain(&mut m), vec![]);
        assert!(m.session().is_connected());
        assert_eq!(m.display_name(), "granted");
        assert_eq!(m.tags(), ["supervisor".to_owned()]);
    }

    #[test]
    fn registered_is_reported_only_while_the_stream_is_open() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        assert!(!m.session().is_connected());
        drain(&mut m);
        m.handle_registered(t, Ok(registered(vec![])));
        assert!(
            !m.session().is_connected(),
            "registered, stream not open yet"
        );
        m.handle_heartbeat(t, Ok(beat("203.0.113.9:51820")));
        assert!(!m.session().is_connected());
        m.handle_stream_opened(t, Ok(()));
        assert!(m.session().is_connected());
        m.handle_stream_closed(t + SEC, Err(unreachable()));
        assert!(!m.session().is_connected());
        assert_eq!(
            m.display_name(),
            "granted",
            "the grant outlives the session"
        );
    }

    #[test]
    fn new_peers_get_a_handshake_initiation_and_updated_ones_do_not() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let a = connect(&mut m, t, vec![entry("a", 1)]);
        assert_eq!(initiations(&a), vec![key(1)]);
        let mut a2 = entry("a", 1);
        a2.display_name = "renamed".into();
        m.handle_event(t, Some(1), SseEvent::PeerUpsert(a2));
        m.handle_event(t, Some(2), SseEvent::PeerUpsert(entry("b", 2)));
        let a = drain(&mut m);
        assert_eq!(upserts(&a), vec![(key(1), false), (key(2), true)]);
        assert_eq!(initiations(&a), vec![key(2)]);
        // Initiations follow the table and route writes.
        assert!(matches!(a.last(), Some(Action::Initiate { .. })));
    }

    #[test]
    fn an_unchanged_roster_touches_nothing() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        m.handle_event(t, Some(1), SseEvent::PeerUpsert(entry("a", 1)));
        let snap = RosterSnapshot {
            policy_revision: 1,
            peers: vec![entry("b", 2), entry("a", 1)],
        };
        m.handle_event(t, Some(2), SseEvent::Snapshot(snap));
        assert_eq!(drain(&mut m), vec![]);
        assert_eq!(m.roster().last_event_id, Some(2));
    }

    #[test]
    fn a_changed_peer_is_the_only_one_touched() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        let mut b = entry("b", 2);
        b.hosted_app_ulas = vec!["fd5a:1f02::7".parse().unwrap()];
        let snap = RosterSnapshot {
            policy_revision: 1,
            peers: vec![entry("a", 1), b],
        };
        m.handle_event(t, Some(1), SseEvent::Snapshot(snap));
        let a = drain(&mut m);
        assert_eq!(upserts(&a), vec![(key(2), false)]);
        assert_eq!(
            a[1],
            Action::Routes {
                add: vec![host("fd5a:1f02::7")],
                del: vec![]
            }
        );
        assert_eq!(a.len(), 2, "{a:?}");
    }

    #[test]
    fn a_roamed_endpoint_is_kept_unless_the_rosters_choice_changes() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let a = connect(&mut m, t, vec![entry("a", 1)]);
        let Some(Action::UpsertPeer { config, .. }) = a.get(1) else {
            panic!("{a:?}")
        };
        assert_eq!(config.endpoint, Some("198.51.100.1:51820".parse().unwrap()));
        let mut a1 = entry("a", 1);
        a1.display_name = "renamed".into();
        m.handle_event(t, None, SseEvent::PeerUpsert(a1.clone()));
        let a = drain(&mut m);
        let Some(Action::UpsertPeer { config, .. }) = a.first() else {
            panic!("{a:?}")
        };
        assert_eq!(config.endpoint, None, "the table keeps the roamed endpoint");
        let moved: SocketAddr = "198.51.100.50:40000".parse().unwrap();
        a1.reflexive_endpoint = moved;
        a1.endpoints = vec![moved];
        m.handle_event(t, None, SseEvent::PeerUpsert(a1));
        let a = drain(&mut m);
        let Some(Action::UpsertPeer { config, .. }) = a.first() else {
            panic!("{a:?}")
        };
        assert_eq!(config.endpoint, Some(moved));
    }

    #[test]
    fn a_peer_is_its_ula_and_app_ulas_with_keepalive_25_and_the_rosters_port_rules() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let mut e = entry("a", 1);
        e.hosted_app_ulas = vec!["fd5a:1f02::7".parse().unwrap()];
        let a = connect(&mut m, t, vec![e]);
        let Some(Action::UpsertPeer {
            config,
            filter,
            new,
            label,
        }) = a.get(1)
        else {
            panic!("{a:?}")
        };
        assert!(*new);
        assert_eq!(
            config,
            &PeerConfig {
                public_key: key(1),
                preshared_key: None,
                endpoint: Some("198.51.100.1:51820".parse().unwrap()),
                allowed_ips: vec![host("fd5a:1f00::1"), host("fd5a:1f02::7")],
                persistent_keepalive: Some(25),
            }
        );
        assert_eq!(
            filter,
            &PortFilter::from_ranges(&[(0, 65535)], &[(8730, 8730)])
        );
        assert_eq!(label.peer_id, "a");
    }

    #[test]
    fn a_removed_peer_leaves_the_table_and_its_routes_at_once() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        let rm = PeerRemove {
            peer_id: "b".into(),
            reason: "revoked".into(),
        };
        m.handle_event(t, Some(3), SseEvent::PeerRemove(rm));
        let a = drain(&mut m);
        assert_eq!(removals(&a), vec![key(2)]);
        assert_eq!(
            a[1],
            Action::Routes {
                add: vec![],
                del: vec![host("fd5a:1f00::2")]
            }
        );
    }

    #[test]
    fn grace_begins_only_at_a_reregistration_and_lasts_three_heartbeat_intervals() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        drain(&mut m);
        m.handle_registered(t, Ok(registered(vec![])));
        assert_eq!(
            m.session().grace(),
            None,
            "nothing to keep at the first registration"
        );
        m.handle_heartbeat(t, Ok(beat("203.0.113.9:51820")));
        m.handle_stream_opened(t, Ok(()));
        drain(&mut m);
        let (t1, _) = reconnect(&mut m, t + SEC, vec![]);
        assert_eq!(m.session().grace().map(|g| g.until), Some(t1 + 30 * SEC));
    }

    #[test]
    fn grace_keeps_peers_missing_from_the_fresh_roster() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        let (_, a) = reconnect(&mut m, t + SEC, vec![entry("a", 1)]);
        assert!(removals(&a).is_empty());
        assert!(!a.iter().any(is_table_action), "{a:?}");
        // b is still applied: a later change that keeps b missing still keeps it.
        let mut a1 = entry("a", 1);
        a1.display_name = "renamed".into();
        m.handle_event(t + 2 * SEC, None, SseEvent::PeerUpsert(a1));
        assert!(removals(&drain(&mut m)).is_empty());
    }

    #[test]
    fn an_explicit_removal_during_grace_acts_at_once() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2), entry("c", 3)]);
        let (t1, _) = reconnect(&mut m, t + SEC, vec![entry("a", 1), entry("b", 2)]);
        let rm = |id: &str| {
            SseEvent::PeerRemove(PeerRemove {
                peer_id: id.into(),
                reason: "revoked".into(),
            })
        };
        m.handle_event(t1, None, rm("b"));
        assert_eq!(removals(&drain(&mut m)), vec![key(2)]);
        // c, kept by grace, is not in the roster: its removal changes no roster and waits
        // for the next change to act.
        m.handle_event(t1, None, rm("c"));
        assert_eq!(drain(&mut m), vec![]);
        let mut a1 = entry("a", 1);
        a1.display_name = "renamed".into();
        m.handle_event(t1, None, SseEvent::PeerUpsert(a1));
        assert_eq!(removals(&drain(&mut m)), vec![key(3)]);
    }

    #[test]
    fn a_policy_change_ends_grace_at_once() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        let (t1, _) = reconnect(&mut m, t + SEC, vec![entry("a", 1)]);
        let policy = RosterSnapshot {
            policy_revision: 2,
            peers: vec![entry("a", 1)],
        };
        m.handle_event(t1, Some(9), SseEvent::Policy(policy));
        assert_eq!(removals(&drain(&mut m)), vec![key(2)]);
        assert_eq!(m.session().grace(), None);
    }

    #[test]
    fn grace_ends_at_the_first_heartbeat_tick_past_its_window() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        let (t1, _) = reconnect(&mut m, t + SEC, vec![entry("a", 1)]);
        for n in 1..3 {
            assert_eq!(m.poll_timeout(), Some(t1 + n * 10 * SEC));
            m.handle_timeout(t1 + n * 10 * SEC);
            assert!(matches!(drain(&mut m)[..], [Action::Heartbeat { .. }]));
        }
        m.handle_timeout(t1 + 30 * SEC);
        let a = drain(&mut m);
        assert_eq!(removals(&a), vec![key(2)]);
        assert!(matches!(a.last(), Some(Action::Heartbeat { .. })), "{a:?}");
        assert_eq!(m.session().grace(), None);
    }

    #[test]
    fn a_change_after_the_window_but_before_the_tick_drops_missing_peers() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        let (t1, _) = reconnect(&mut m, t + SEC, vec![entry("a", 1)]);
        m.handle_event(t1 + 31 * SEC, None, SseEvent::PeerUpsert(entry("c", 3)));
        assert_eq!(removals(&drain(&mut m)), vec![key(2)]);
    }

    #[test]
    fn a_new_reflexive_endpoint_reroutes_peers_behind_our_nat_to_their_lan_address() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        // c shares our NAT's public address once the coordinator sees us from there.
        let mut c = entry("c", 3);
        c.reflexive_endpoint = "192.0.2.1:40001".parse().unwrap();
        c.endpoints = vec!["192.168.1.3:51820".parse().unwrap()];
        let a = connect(&mut m, t, vec![c]);
        let Some(Action::UpsertPeer { config, .. }) = a.get(1) else {
            panic!("{a:?}")
        };
        assert_eq!(config.endpoint, Some("192.0.2.1:40001".parse().unwrap()));
        m.handle_timeout(t + 10 * SEC);
        drain(&mut m);
        m.handle_heartbeat(t + 10 * SEC, Ok(beat("192.0.2.1:40000")));
        let a = drain(&mut m);
        let Some(Action::UpsertPeer { config, .. }) = a.first() else {
            panic!("{a:?}")
        };
        assert_eq!(config.endpoint, Some("192.168.1.3:51820".parse().unwrap()));
        assert_eq!(m.reflexive(), Some("192.0.2.1:40000".parse().unwrap()));
        // The same reflexive endpoint again changes nothing.
        m.handle_heartbeat(t + 20 * SEC, Ok(beat("192.0.2.1:40000")));
        assert_eq!(drain(&mut m), vec![]);
    }

    #[test]
    fn revocation_clears_the_peers_and_exits() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        m.handle_timeout(t + 10 * SEC);
        drain(&mut m);
        m.handle_heartbeat(t + 10 * SEC, Err(refused(StatusCode::FORBIDDEN, "revoked")));
        let a = drain(&mut m);
        assert_eq!(a[..2], [Action::CloseStream, Action::ClearPeers]);
        let Some(Action::Exit(exit)) = a.get(2) else {
            panic!("{a:?}")
        };
        assert_eq!(
            exit.to_string(),
            "this node was revoked by the coordinator: coordinator refused (403 Forbidden, revoked): no"
        );
        assert_eq!(m.session(), &Session::Ended);
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn revocation_at_a_reregistration_exits_too() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        m.handle_stream_closed(t, Err(unreachable()));
        drain(&mut m);
        m.handle_timeout(t + SEC);
        drain(&mut m);
        m.handle_registered(t + SEC, Err(refused(StatusCode::FORBIDDEN, "revoked")));
        let a = drain(&mut m);
        assert!(a.contains(&Action::ClearPeers));
        assert!(matches!(a.last(), Some(Action::Exit(Exit::Revoked(_)))));
    }

    #[test]
    fn a_refused_first_registration_exits_with_the_coordinators_reason() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        drain(&mut m);
        m.handle_registered(t, Err(refused(StatusCode::UNAUTHORIZED, "token_invalid")));
        let a = drain(&mut m);
        let Some(Action::Exit(exit)) = a.last() else {
            panic!("{a:?}")
        };
        assert!(!a.contains(&Action::ClearPeers));
        assert_eq!(
            exit.to_string(),
            "registration refused: coordinator refused (401 Unauthorized, token_invalid): no"
        );
    }

    #[test]
    fn an_unreachable_coordinator_at_start_is_retried() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        drain(&mut m);
        m.handle_registered(t, Err(unreachable()));
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        assert_eq!(m.poll_timeout(), Some(t + 500 * MS));
        m.handle_timeout(t + 499 * MS);
        assert_eq!(drain(&mut m), vec![]);
        m.handle_timeout(t + 500 * MS);
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: true }]);
    }

    #[test]
    fn a_refusal_after_admission_is_retried() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![]);
        m.handle_timeout(t + 10 * SEC);
        drain(&mut m);
        m.handle_heartbeat(
            t + 10 * SEC,
            Err(refused(StatusCode::FORBIDDEN, "forbidden")),
        );
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        assert_eq!(
            m.session(),
            &Session::Disconnected {
                retry_at: t + 10 * SEC + 500 * MS
            }
        );
    }

    #[test]
    fn backoff_doubles_from_half_a_second_to_the_heartbeat_interval_and_resets_once_streaming() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let mut now = t;
        let mut delays = Vec::new();
        drain(&mut m);
        for _ in 0..7 {
            m.handle_registered(now, Err(unreachable()));
            let next = m.poll_timeout().unwrap();
            delays.push((next - now).as_millis());
            now = next;
            m.handle_timeout(now);
            drain(&mut m);
        }
        // Before any registration the interval is the default 10 s.
        assert_eq!(delays, vec![500, 1000, 2000, 4000, 8000, 10000, 10000]);
        m.handle_registered(now, Ok(registered(vec![])));
        m.handle_heartbeat(now, Ok(beat("203.0.113.9:51820")));
        m.handle_stream_opened(now, Ok(()));
        drain(&mut m);
        m.handle_stream_closed(now, Ok(()));
        assert_eq!(m.poll_timeout(), Some(now + 500 * MS));
    }

    #[test]
    fn a_heartbeat_404_ends_the_session_and_registers_again() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        m.handle_timeout(t + 10 * SEC);
        drain(&mut m);
        m.handle_heartbeat(
            t + 10 * SEC,
            Err(refused(StatusCode::NOT_FOUND, "not_found")),
        );
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        m.handle_timeout(t + 10 * SEC + 500 * MS);
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: false }]);
    }

    #[test]
    fn a_transient_heartbeat_failure_keeps_the_session() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![]);
        m.handle_timeout(t + 10 * SEC);
        drain(&mut m);
        m.handle_heartbeat(t + 10 * SEC, Err(unreachable()));
        assert_eq!(drain(&mut m), vec![]);
        assert!(m.session().is_connected());
        assert_eq!(m.poll_timeout(), Some(t + 20 * SEC));
    }

    #[test]
    fn any_failure_before_the_stream_opens_ends_the_attempt() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        drain(&mut m);
        m.handle_registered(t, Ok(registered(vec![])));
        drain(&mut m);
        m.handle_heartbeat(t, Err(unreachable()));
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        assert!(matches!(m.session(), Session::Disconnected { .. }));
        m.handle_timeout(m.poll_timeout().unwrap());
        drain(&mut m);
        m.handle_registered(t + SEC, Ok(registered(vec![])));
        m.handle_heartbeat(t + SEC, Ok(beat("203.0.113.9:51820")));
        assert_eq!(drain(&mut m).last(), Some(&Action::OpenStream));
        m.handle_stream_opened(t + SEC, Err(unreachable()));
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        assert!(matches!(m.session(), Session::Disconnected { .. }));
    }

    #[test]
    fn an_outage_leaves_the_table_alone() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        m.handle_stream_closed(t + SEC, Err(unreachable()));
        let mut all = drain(&mut m);
        for _ in 0..5 {
            m.handle_timeout(m.poll_timeout().unwrap());
            all.extend(drain(&mut m));
            m.handle_registered(t + 2 * SEC, Err(unreachable()));
            all.extend(drain(&mut m));
        }
        assert!(!all.iter().any(is_table_action), "{all:?}");
    }

    #[test]
    fn a_closed_stream_is_reopened_after_the_backoff() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        let (t1, a) = reconnect(&mut m, t + 5 * SEC, vec![entry("a", 1)]);
        assert_eq!(t1, t + 5 * SEC + 500 * MS);
        assert_eq!(a.first(), Some(&Action::Register { with_token: false }));
        assert!(
            !a.iter().any(is_table_action),
            "same roster, nothing to do: {a:?}"
        );
        assert!(m.session().is_connected());
    }

    #[test]
    fn heartbeats_go_out_every_interval_once_streaming() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![]);
        assert_eq!(m.poll_timeout(), Some(t + 10 * SEC));
        m.handle_timeout(t + 5 * SEC);
        assert_eq!(drain(&mut m), vec![]);
        // A late tick: the next one is an interval after it.
        m.handle_timeout(t + 11 * SEC);
        assert!(matches!(drain(&mut m)[..], [Action::Heartbeat { .. }]));
        assert_eq!(m.poll_timeout(), Some(t + 21 * SEC));
    }

    #[test]
    fn hosted_apps_are_advertised_only_when_the_policy_allows() {
        let t = Instant::now();
        let app = Uuid::from_u128(7);
        let ula = tabbify_api::ula::app_ula(&app);
        let mut m = Machine::new(config(true, vec![app]));
        drain(&mut m);
        m.handle_registered(t, Ok(registered(vec![])));
        assert_eq!(
            drain(&mut m),
            vec![Action::Heartbeat {
                hosted_app_ulas: vec![ula]
            }]
        );
        let mut m = Machine::new(config(true, vec![app]));
        drain(&mut m);
        let mut refused = registered(vec![]);
        refused.may_host_apps = false;
        m.handle_registered(t, Ok(refused));
        assert_eq!(
            drain(&mut m),
            vec![Action::Heartbeat {
                hosted_app_ulas: vec![]
            }]
        );
        assert_eq!(m.apps(), [app], "kept, only not advertised");
    }

    #[test]
    fn adding_an_app_is_refused_before_registration_and_by_policy() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let e = m.check_app_add().unwrap_err();
        assert!(e.contains("not registered"), "{e}");
        drain(&mut m);
        let mut refused = registered(vec![]);
        refused.may_host_apps = false;
        m.handle_registered(t, Ok(refused));
        let e = m.check_app_add().unwrap_err();
        assert!(e.contains("app_hosts"), "{e}");
        let e = m.handle_app_removed(Uuid::from_u128(1)).unwrap_err();
        assert!(e.contains("is not hosted here"), "{e}");
    }

    #[test]
    fn an_app_change_heartbeats_at_once_when_streaming_else_once_the_stream_opens() {
        let t = Instant::now();
        let app = Uuid::from_u128(7);
        let ula = tabbify_api::ula::app_ula(&app);
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![]);
        assert_eq!(m.check_app_add(), Ok(()));
        m.handle_app_added(app);
        assert_eq!(
            drain(&mut m),
            vec![Action::Heartbeat {
                hosted_app_ulas: vec![ula]
            }]
        );
        m.handle_stream_closed(t, Ok(()));
        drain(&mut m);
        m.handle_app_removed(app).unwrap();
        assert_eq!(drain(&mut m), vec![], "no session: nothing to send now");
        m.handle_timeout(m.poll_timeout().unwrap());
        let a = connect(&mut m, t + SEC, vec![]);
        let beats: Vec<_> = a
            .iter()
            .filter(|a| matches!(a, Action::Heartbeat { .. }))
            .collect();
        assert_eq!(
            beats.len(),
            2,
            "the registration's, then the pending one: {a:?}"
        );
        assert!(m.apps().is_empty());
    }

    #[test]
    fn a_hole_punch_points_the_peer_at_the_endpoint_and_bursts_8_initiations_125_ms_apart() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        let endpoint: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let punch = HolePunch {
            peer_id: "a".into(),
            public_key: base64::engine::general_purpose::STANDARD.encode(key(1)),
            endpoint,
        };
        let t1 = t + SEC;
        m.handle_event(t1, Some(5), SseEvent::HolePunch(punch));
        let first = Action::PunchInitiation {
            public_key: key(1),
            burst_started: t1,
        };
        assert_eq!(
            drain(&mut m),
            vec![
                Action::HolePunch {
                    public_key: key(1),
                    endpoint
                },
                first.clone()
            ]
        );
        let mut fired = 1;
        while let Some(at) = m.poll_timeout().filter(|at| *at < t + 10 * SEC) {
            assert_eq!(at, t1 + fired * PUNCH_GAP);
            m.handle_timeout(at);
            assert_eq!(drain(&mut m), vec![first.clone()]);
            fired += 1;
        }
        assert_eq!(fired, PUNCH_BURST);
        assert_eq!(
            m.poll_timeout(),
            Some(t + 10 * SEC),
            "only the heartbeat is left"
        );
    }

    #[test]
    fn a_hole_punch_for_an_unknown_peer_or_a_bad_key_does_nothing() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        for public_key in [
            base64::engine::general_purpose::STANDARD.encode(key(9)),
            "not a key".into(),
        ] {
            let punch = HolePunch {
                peer_id: "x".into(),
                public_key,
                endpoint: "192.0.2.7:40000".parse().unwrap(),
            };
            m.handle_event(t, None, SseEvent::HolePunch(punch));
            assert_eq!(drain(&mut m), vec![]);
        }
        assert_eq!(m.poll_timeout(), Some(t + 10 * SEC));
    }

    #[test]
    fn ourselves_in_the_roster_is_never_a_peer() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let a = connect(&mut m, t, vec![entry("me", 9), entry("a", 1)]);
        assert_eq!(upserts(&a), vec![(key(1), true)]);
    }
}
