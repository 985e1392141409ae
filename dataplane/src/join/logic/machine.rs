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
//! * with several coordinators ([`super::failover`]) a failed request or stream moves to
//!   the next one at once (backoff only once all failed in a row); an admitted node first
//!   heartbeats there ([`Session::Resuming`]) and registers only if that coordinator
//!   answers 404 (it does not know us), then reopens the stream with `Last-Event-ID`;
//! * `leave` ([`Machine::begin_leave`]) ends the session before the request goes out, so
//!   the stream the coordinator closes on our removal is not mistaken for an outage;
//! * every input that depends on time takes `now`; the machine never reads a clock and
//!   performs no I/O (it logs through `tracing`, as quinn-proto does);
//! * at most one key rotation is in flight: [`Action::RotateKey`] (when the node key
//!   reaches `--key-max-age` while connected) or [`Machine::begin_rotation`] (asked for on
//!   the control socket), each settled by [`Machine::handle_rotated`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tabbify_api::{self as api, HeartbeatResponse, RegisterResponse, SseEvent};
use uuid::Uuid;

use super::failover::{Failover, Next};
use super::roster::{self, Applied, Desired, Roster, SelfView, KEEPALIVE_SECS};
use super::session::{Grace, Session};
use crate::core::filter::{PortFilter, ProtoRanges};
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
/// The delay before an automatic key rotation that failed is tried again.
pub const ROTATION_RETRY: Duration = Duration::from_secs(3600);
/// The coordinator's SSE keepalive period: a `: keepalive` comment on an idle stream
/// (tabbify-control `StreamConfig::keepalive`, 15 s).
pub const COORDINATOR_KEEPALIVE: Duration = Duration::from_secs(15);
/// A roster stream that delivers no bytes at all (no event, not even a keepalive comment)
/// for this long is dead: two missed keepalives plus 5 s of slack. The deadline belongs to
/// the machine, not to a read on the stream, so heartbeat ticks and other wake-ups cannot
/// postpone it (issue 13: a per-read timeout restarted on every tick never fired).
pub const STREAM_IDLE_TIMEOUT: Duration =
    Duration::from_secs(2 * COORDINATOR_KEEPALIVE.as_secs() + 5);
/// After an underlay address change, the machine acts once the address set has been quiet
/// this long: a move is an `RTM_NEWADDR` then an `RTM_DELADDR`, and a heartbeat sent at the
/// first of them could leave from the address about to vanish (issue 13).
pub const UNDERLAY_SETTLE: Duration = Duration::from_millis(300);

/// What the machine is told once, at start.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our peer id (`identity_peer_id` of our identity, the CN of our certificate).
    pub peer_id: String,
    /// Our peer ULA (`identity_ula` of our identity); a registration answer naming another
    /// ULA or peer id is refused.
    pub ula: Ipv6Addr,
    /// The display name asked for.
    pub name: String,
    /// The tags asked for.
    pub tags: Vec<String>,
    /// A join token was given.
    pub has_join_token: bool,
    /// The apps hosted here (from the state directory).
    pub apps: Vec<Uuid>,
    /// Rotate the node key after it has been in use this long (`--key-max-age`).
    pub key_max_age: Duration,
    /// When the node key reaches `key_max_age` (from its age in the state directory).
    pub rotate_at: Instant,
    /// How many coordinator targets there are (`--coordinator`, each address of a name
    /// that resolves to several counting once); at least one.
    pub coordinators: usize,
    /// Subnet routes and exit node flags (`super::routes`).
    pub routes: super::routes::Settings,
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
    /// This node left the mesh (`tabbify-mesh leave`): the coordinator removed it.
    Left,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Revoked(e) => write!(f, "this node was revoked by the coordinator: {e}"),
            Exit::Refused(e) => write!(f, "registration refused: {e}"),
            Exit::Left => write!(f, "left the mesh"),
        }
    }
}

/// One thing for the shell to do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `POST /v1/mesh/register` to the current coordinator ([`Machine::coordinator`]),
    /// with the join token when `with_token`; answer with [`Machine::handle_registered`].
    Register {
        /// Send the join token.
        with_token: bool,
    },
    /// `POST /v1/mesh/heartbeat` advertising these app ULAs, to the current coordinator;
    /// answer with [`Machine::handle_heartbeat`].
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
        /// Its port rules (boxed: the largest part of the largest action).
        filter: Box<PortFilter>,
        /// Stock WireGuard clients behind it with their own rules (`super::clients`).
        behind: Vec<super::clients::Carried>,
        /// Prefixes routed through it (`super::routes`): all traffic, replies only back.
        routed: Vec<IpNet>,
        /// Port-limited prefixes routed through it, with the destination ports we may open.
        routed_ports: Vec<(IpNet, ProtoRanges)>,
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
    /// Rotate the node key (`POST /v1/mesh/rotate-key` with a new key kept durably as
    /// pending until the answer); answer with [`Machine::handle_rotated`].
    RotateKey,
    /// Remove every table peer (revocation).
    ClearPeers,
    /// The peers allowed to route through us changed ([`Machine::grants`]): rebuild the
    /// table's local set.
    Grants,
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
    /// App ULAs another peer holds at the coordinator (409 `app_taken`), with its message.
    contested: BTreeMap<Ipv6Addr, String>,
    /// The app ULAs the last heartbeat claimed.
    claimed: Vec<Ipv6Addr>,
    punches: Vec<Punch>,
    /// When the next automatic key rotation is due.
    rotate_at: Instant,
    /// A key rotation is in flight.
    rotating: bool,
    /// While the stream is open: when it counts as dead unless bytes arrive before
    /// ([`Machine::handle_stream_activity`] moves it).
    stream_idle_until: Option<Instant>,
    /// An underlay change waits for the address set to settle until then
    /// ([`UNDERLAY_SETTLE`] after the last change).
    underlay_settle_until: Option<Instant>,
    /// Which coordinator is in use.
    failover: Failover,
    /// Peers the data plane heard from lately (`routes::Liveness`), for route failover.
    live: BTreeSet<[u8; 32]>,
    /// Our underlay addresses: a peer's route containing one is refused.
    underlay: Vec<IpAddr>,
    /// The route plan last applied.
    plan: super::routes::Plan,
    /// The client plan last applied (`super::clients`).
    clients: super::clients::ClientPlan,
    /// Route grants and client grants together, for the table's local set.
    grants: Vec<([u8; 32], IpNet)>,
    actions: VecDeque<Action>,
}

impl Machine {
    /// A machine about to register for the first time (queues [`Action::Register`]).
    pub fn new(config: Config) -> Self {
        let coordinators = config.coordinators;
        let mut m = Self {
            roster: Roster::new(&config.peer_id),
            me: SelfView {
                peer_id: config.peer_id.clone(),
                reflexive: None,
            },
            apps: config.apps.clone(),
            rotate_at: config.rotate_at,
            config,
            session: Session::Registering { with_token: true },
            grant: None,
            applied: BTreeMap::new(),
            routes: BTreeSet::new(),
            heartbeat: DEFAULT_HEARTBEAT,
            backoff: INITIAL_BACKOFF,
            heartbeat_pending: false,
            contested: BTreeMap::new(),
            claimed: Vec::new(),
            punches: Vec::new(),
            rotating: false,
            stream_idle_until: None,
            underlay_settle_until: None,
            failover: Failover::new(coordinators),
            live: BTreeSet::new(),
            underlay: Vec::new(),
            plan: super::routes::Plan::default(),
            clients: super::clients::ClientPlan::default(),
            grants: Vec::new(),
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
        let rotation = (self.session.is_connected() && !self.rotating).then_some(self.rotate_at);
        let idle = self
            .stream_idle_until
            .filter(|_| self.session.is_connected());
        self.punches
            .iter()
            .map(|p| p.next_at)
            .chain(session)
            .chain(rotation)
            .chain(idle)
            .chain(self.underlay_settle_until)
            .min()
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
        if resp.ula != self.config.ula || resp.peer_id != self.config.peer_id {
            return self.refuse_registration(now, &resp);
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
        // A registration's roster carries no event id, and the coordinator may have
        // restarted and numbered its events afresh: the stream that follows must start
        // with a snapshot, never resume from an id of an earlier stream.
        self.roster.last_event_id = None;
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
        let (opening, resuming) = match self.session {
            Session::Opening { .. } => (true, false),
            Session::Resuming => (true, true),
            Session::Connected { .. } => (false, false),
            _ => return,
        };
        let resp = match r {
            Ok(resp) => resp,
            // Another peer holds one of our apps: nothing of this heartbeat was applied
            // (but it counted as alive). Send it again without the contested apps; every
            // later heartbeat claims them again, so the claim succeeds once they are free.
            Err(ClientError::Status { code, message, .. }) if code == "app_taken" => {
                let app = contested_app(&message);
                tracing::warn!(app = ?app, reason = %message, "an app we host is held by another peer");
                match app.filter(|a| self.claimed.contains(a)) {
                    Some(a) => {
                        self.contested.insert(a, message);
                    }
                    None => {
                        for a in &self.claimed {
                            self.contested.insert(*a, message.clone());
                        }
                    }
                }
                let hosted_app_ulas: Vec<Ipv6Addr> = self
                    .claimed
                    .iter()
                    .filter(|a| !self.contested.contains_key(a))
                    .copied()
                    .collect();
                self.claimed = hosted_app_ulas.clone();
                self.actions
                    .push_back(Action::Heartbeat { hosted_app_ulas });
                return;
            }
            // A coordinator we moved to does not know us: register with it (no backoff).
            Err(ClientError::Status { status, .. })
                if resuming && status == http::StatusCode::NOT_FOUND =>
            {
                tracing::info!(
                    coordinator = self.failover.current(),
                    "this coordinator does not know us: registering"
                );
                self.session = Session::Registering { with_token: false };
                self.actions
                    .push_back(Action::Register { with_token: false });
                return;
            }
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
            // With another coordinator to go to, a failed request moves there at once.
            Err(e) if e.is_transient() && self.failover.several() => {
                return self.lose_session(now, Err(e));
            }
            Err(e) if e.is_transient() => {
                // The stream notices a dead coordinator; a lost heartbeat is not fatal.
                tracing::warn!(error = %e, "heartbeat failed");
                return;
            }
            Err(e) => return self.lose_session(now, Err(e)),
        };
        let claimed = &self.claimed;
        self.contested.retain(|a, _| !claimed.contains(a));
        self.heartbeat = interval(resp.heartbeat_interval_secs);
        let changed = self.me.reflexive != Some(resp.reflexive_endpoint);
        self.me.reflexive = Some(resp.reflexive_endpoint);
        if changed {
            self.reconcile(now);
        }
        if resuming {
            // It knows us: no registration, and the stream resumes after our last event.
            self.session = Session::Opening { grace: None };
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
        self.stream_idle_until = Some(now + STREAM_IDLE_TIMEOUT);
        self.backoff = INITIAL_BACKOFF;
        self.failover.connected();
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

    /// Bytes arrived on the roster stream at `at` (an event, part of one, or a keepalive
    /// comment): it is alive, so its idle deadline moves to `at` + [`STREAM_IDLE_TIMEOUT`].
    pub fn handle_stream_activity(&mut self, at: Instant) {
        if self.session.is_connected() {
            let until = at + STREAM_IDLE_TIMEOUT;
            if self.stream_idle_until.is_none_or(|old| until > old) {
                self.stream_idle_until = Some(until);
            }
        }
    }

    /// An address of a non-TUN interface appeared or went (netlink `RTM_NEWADDR` /
    /// `RTM_DELADDR`): the node may have moved. Nothing happens until the address set has
    /// been quiet for [`UNDERLAY_SETTLE`] (each further change restarts the wait; see
    /// [`Machine::handle_timeout`]), so that a move's add-then-delete is one change and the
    /// heartbeat leaves from the address that stays. The shell drops the STUN mapped
    /// endpoints and re-probes at once, so that heartbeat carries no stale mapping.
    pub fn handle_underlay_changed(&mut self, now: Instant) {
        self.underlay_settle_until = Some(now + UNDERLAY_SETTLE);
    }

    /// The STUN probe's result (NAT class or mapped endpoints) changed: heartbeat now so
    /// the roster carries it (peers punch towards the mapped endpoint), or once the
    /// stream is open. While an underlay change settles, its heartbeat carries it.
    pub fn handle_nat_changed(&mut self) {
        if self.underlay_settle_until.is_none() {
            self.apps_changed();
        }
    }

    /// The underlay address set settled after a change. While streaming: heartbeat at once
    /// (it carries the current endpoints, and the coordinator sees the new source address)
    /// and reopen the roster stream (the old connection may be bound to a vanished address,
    /// and would only be noticed dead by keepalive or the idle deadline); the table is left
    /// alone. While disconnected: register at once instead of at the end of the backoff.
    /// While registering or opening: heartbeat again once the stream is open.
    fn underlay_settled(&mut self, now: Instant) {
        match &mut self.session {
            Session::Connected { grace, .. } => {
                let grace = grace.take();
                tracing::info!(
                    "underlay address changed: heartbeat and reopen the roster stream now"
                );
                self.actions.push_back(Action::CloseStream);
                self.stream_idle_until = None;
                self.session = Session::Opening { grace };
                self.push_heartbeat();
            }
            Session::Disconnected { retry_at } => *retry_at = now,
            // A request in flight may have left from the old address: heartbeat again
            // once the stream is open.
            Session::Registering { .. } | Session::Opening { .. } | Session::Resuming => {
                self.heartbeat_pending = true
            }
            Session::Ended => {}
        }
    }

    /// The roster stream ended: `Ok` when the coordinator closed it, `Err` when it broke.
    pub fn handle_stream_closed(&mut self, now: Instant, r: Result<(), ClientError>) {
        if self.session.is_connected() {
            self.lose_session(now, r);
        }
    }

    /// Time passed: act on a settled underlay change, drop a silent stream, register
    /// again, heartbeat, end a grace period, punch.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.underlay_settle_until.is_some_and(|t| now >= t) {
            self.underlay_settle_until = None;
            self.underlay_settled(now);
        }
        if self.session.is_connected() && self.stream_idle_until.is_some_and(|t| now >= t) {
            self.lose_session(
                now,
                Err(ClientError::Transport(format!(
                    "the roster stream delivered nothing for {} s",
                    STREAM_IDLE_TIMEOUT.as_secs()
                ))),
            );
        }
        let (mut grace_over, mut heartbeat, mut resume) = (false, false, false);
        match &mut self.session {
            // An admitted node with several coordinators heartbeats first: the one it
            // moved to may know it already (a shared database), and then neither a
            // registration nor a full roster is needed.
            Session::Disconnected { retry_at }
                if now >= *retry_at && self.grant.is_some() && self.failover.several() =>
            {
                self.session = Session::Resuming;
                resume = true;
            }
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
        if heartbeat || resume {
            self.push_heartbeat();
        }
        if self.session.is_connected() && !self.rotating && now >= self.rotate_at {
            tracing::info!(
                max_age_secs = self.config.key_max_age.as_secs(),
                "the node key reached its maximum age: rotating it"
            );
            self.rotating = true;
            self.actions.push_back(Action::RotateKey);
        }
        self.fire_punches(now);
    }

    /// A rotation asked for now (`tabbify-mesh rotate-key`): `Err` is the message for the
    /// user. On `Ok` the caller rotates and reports with [`Machine::handle_rotated`].
    pub fn begin_rotation(&mut self) -> Result<(), String> {
        if self.rotating {
            return Err("a key rotation is already in progress".into());
        }
        if !self.session.is_connected() {
            return Err("not connected to the coordinator; try again in a moment".into());
        }
        self.rotating = true;
        Ok(())
    }

    /// How a rotation ended: the next automatic one is due `key_max_age` after a success,
    /// or [`ROTATION_RETRY`] after a failure (the old key stays in use).
    pub fn handle_rotated(&mut self, now: Instant, r: Result<(), String>) {
        self.rotating = false;
        match r {
            Ok(()) => self.rotate_at = now + self.config.key_max_age,
            Err(e) => {
                tracing::warn!(error = %e, "key rotation failed; the current key stays in use");
                self.rotate_at = now + ROTATION_RETRY.min(self.config.key_max_age);
            }
        }
    }

    /// `tabbify-mesh leave` (or an ephemeral node stopping): the session ends now, so the
    /// stream the coordinator closes when it removes us is not taken for an outage and
    /// nothing registers again. `Err` (for the user) when there is nothing to leave. The
    /// caller sends the request and reports with [`Machine::handle_left`].
    pub fn begin_leave(&mut self) -> Result<(), String> {
        if self.grant.is_none() {
            return Err("not registered with the coordinator yet; nothing to leave".into());
        }
        if self.session == Session::Ended {
            return Err("the joiner is stopping already".into());
        }
        self.session = Session::Ended;
        self.stream_idle_until = None;
        self.actions.push_back(Action::CloseStream);
        Ok(())
    }

    /// How the leave request ended: on `Ok` the joiner exits ([`Exit::Left`]); on `Err`
    /// (no coordinator reached) it stays in the mesh and registers again at once.
    pub fn handle_left(&mut self, now: Instant, r: Result<(), String>) {
        if self.session != Session::Ended {
            return;
        }
        match r {
            Ok(()) => self.actions.push_back(Action::Exit(Exit::Left)),
            Err(e) => {
                tracing::warn!(error = %e, "leave failed; staying in the mesh");
                self.session = Session::Disconnected { retry_at: now };
            }
        }
    }

    /// The data plane's liveness of the peers that share a prefix ([`Machine::route_contested`]):
    /// the peers heard from within `routes::DEAD_AFTER`. A change of primary reconciles.
    pub fn handle_liveness(&mut self, now: Instant, live: BTreeSet<[u8; 32]>) {
        if live == self.live {
            return;
        }
        self.live = live;
        self.reconcile(now);
    }

    /// Our underlay addresses changed (a peer's route may not contain one).
    pub fn set_underlay(&mut self, now: Instant, mut addrs: Vec<IpAddr>) {
        addrs.sort();
        if addrs == self.underlay {
            return;
        }
        self.underlay = addrs;
        self.reconcile(now);
    }

    /// The peers whose liveness decides a route's primary (they share a prefix).
    pub fn route_contested(&self) -> BTreeSet<[u8; 32]> {
        self.plan.contested(&self.offers())
    }

    /// The route plan in force.
    pub fn route_plan(&self) -> &super::routes::Plan {
        &self.plan
    }

    /// The (peer, prefix) pairs allowed to route through us, for the table's local set:
    /// the route grants and the client grants of a concentrator.
    pub fn grants(&self) -> &[([u8; 32], IpNet)] {
        &self.grants
    }

    /// The port-limited (peer, prefix, rules) grants of the route plan in force.
    pub fn port_grants(&self) -> &[([u8; 32], IpNet, ProtoRanges)] {
        &self.plan.port_grants
    }

    /// The client plan in force (`super::clients`).
    pub fn client_plan(&self) -> &super::clients::ClientPlan {
        &self.clients
    }

    /// The route flags.
    pub fn route_settings(&self) -> &super::routes::Settings {
        &self.config.routes
    }

    /// New route flags (a reload): the plan is redone at once; the coordinator learns the
    /// advertisement at the next heartbeat.
    pub fn set_route_settings(&mut self, now: Instant, routes: super::routes::Settings) {
        if routes == self.config.routes {
            return;
        }
        self.config.routes = routes;
        self.reconcile(now);
    }

    fn offers(&self) -> Vec<super::routes::Offer> {
        self.roster
            .entries()
            // Clients offer no routes (and their IPv4 goes with the client plan).
            .filter(|e| {
                !e.client && e.via.is_none() && !super::clients::is_client_identity(&e.identity)
            })
            .filter_map(|e| {
                let key = roster::decode_key(&e.public_key)?;
                Some(super::routes::Offer::of(e, key))
            })
            .collect()
    }

    /// The coordinator target in use (an index into the shell's list).
    pub fn coordinator(&self) -> usize {
        self.failover.current()
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

    /// What the joiner refused from the coordinator, by reason.
    pub fn refused(&self) -> tabbify_api::local::RosterRefusals {
        self.roster.refused()
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

    /// Why the coordinator refused our claim on app `ula`, while another peer holds it.
    pub fn contested(&self, ula: &Ipv6Addr) -> Option<&str> {
        self.contested.get(ula).map(String::as_str)
    }

    // ----- rules -----

    /// Ends the session: the table is left alone; revocation and a refusal before any
    /// admission end the joiner, anything else registers again after the backoff.
    fn lose_session(&mut self, now: Instant, r: Result<(), ClientError>) {
        self.actions.push_back(Action::CloseStream);
        self.stream_idle_until = None;
        match r {
            Ok(()) => tracing::warn!("coordinator closed the roster stream; reconnecting"),
            Err(e) if e.is_transient() => {
                tracing::warn!(coordinator = self.failover.current(), error = %e, "coordinator");
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
                tracing::error!(coordinator = self.failover.current(), error = %e, "coordinator refused us; retrying");
            }
        }
        self.retry_elsewhere(now);
    }

    /// Disconnected: the next coordinator is tried at once, or, once every one failed in
    /// a row (always, with one coordinator), after the backoff.
    fn retry_elsewhere(&mut self, now: Instant) {
        let retry_at = match self.failover.failed() {
            Next::Now => {
                tracing::info!(
                    coordinator = self.failover.current(),
                    "moving to the next coordinator"
                );
                now
            }
            Next::Backoff => {
                tracing::info!(retry_in = ?self.backoff, "trying the coordinator again after the backoff");
                let at = now + self.backoff;
                let cap = self.heartbeat.max(Duration::from_secs(1));
                self.backoff = (self.backoff * 2).min(cap);
                at
            }
        };
        self.session = Session::Disconnected { retry_at };
    }

    /// A registration answer that names another ULA or peer id than our identity derives:
    /// nothing of it is applied (a coordinator must not move us, nor route our address
    /// elsewhere). Before any admission the joiner stops with the reason; an admitted node
    /// keeps its table and tries again after the backoff.
    fn refuse_registration(&mut self, now: Instant, resp: &RegisterResponse) {
        self.roster.count_bad_registration();
        let reason = format!(
            "the coordinator assigned ULA {} and peer id {}, but our identity derives ULA {} and peer id {}",
            resp.ula, resp.peer_id, self.config.ula, self.config.peer_id
        );
        self.actions.push_back(Action::CloseStream);
        if self.grant.is_none() {
            self.session = Session::Ended;
            self.actions.push_back(Action::Exit(Exit::Refused(reason)));
            return;
        }
        tracing::error!(%reason, "registration answer refused; retrying");
        self.retry_elsewhere(now);
    }

    fn apps_changed(&mut self) {
        if self.session.is_connected() {
            self.push_heartbeat();
        } else {
            self.heartbeat_pending = true;
        }
    }

    fn push_heartbeat(&mut self) {
        let hosted_app_ulas: Vec<Ipv6Addr> = if self.grant.as_ref().is_some_and(|g| g.may_host_apps)
        {
            self.apps.iter().map(tabbify_api::ula::app_ula).collect()
        } else {
            Vec::new()
        };
        let apps = &hosted_app_ulas;
        self.contested.retain(|a, _| apps.contains(a));
        self.claimed = hosted_app_ulas.clone();
        self.actions
            .push_back(Action::Heartbeat { hosted_app_ulas });
    }

    /// Makes the table and the kernel routes match the roster; touches only what changed.
    fn reconcile(&mut self, now: Instant) {
        let mut desired = self.roster.desired(&self.me);
        // Routes (issue 15): mesh IPv4s, subnet routes with their primaries, the exit node.
        let offers = self.offers();
        let live = &self.live;
        let plan = super::routes::plan(
            &offers,
            &self.config.routes,
            &self.underlay,
            &|k: &[u8; 32]| live.contains(k),
        );
        for (key, extra) in &plan.allowed {
            if let Some(d) = desired.get_mut(key) {
                for n in extra {
                    if !d.allowed_ips.contains(n) {
                        d.allowed_ips.push(*n);
                    }
                    // Everything but the peer's mesh IPv4 is a route: the engine's routed
                    // filter, not the member↔router port rules (`core::behind`). Nothing in
                    // the mesh's own spaces is ever treated as routed.
                    let mesh = super::routes::covers(&super::routes::mesh_v4(), n)
                        || super::routes::covers(&super::routes::mesh_v6(), n);
                    let limited = plan
                        .routed_ports
                        .get(key)
                        .is_some_and(|v| v.iter().any(|(p, _)| p == n));
                    if !mesh && !limited && !d.routed.contains(n) {
                        d.routed.push(*n);
                    }
                }
            }
        }
        for (key, limited) in &plan.routed_ports {
            if let Some(d) = desired.get_mut(key) {
                d.routed_ports = limited.clone();
            }
        }
        for (peer, why) in plan
            .refused
            .iter()
            .filter(|r| !self.plan.refused.contains(r))
        {
            tracing::warn!(%peer, reason = %why, "a route offered by the roster is refused");
        }
        if plan.shared != self.plan.shared {
            for (prefix, peers) in &plan.shared {
                tracing::info!(%prefix, primary = ?peers.first(), candidates = ?peers, "route primary");
            }
        }
        if plan.exit != self.plan.exit {
            let name = plan
                .exit
                .and_then(|k| offers.iter().find(|o| o.key == k))
                .map(|o| o.peer_id.clone());
            tracing::info!(exit_node = ?name, "exit node");
        }
        // Clients (issue 15): never ordinary peers; the ones we serve get their IPv4 and
        // no endpoint, the ones behind a carrier go into its AllowedIPs with their rules.
        let clients = super::clients::plan(
            self.roster.entries(),
            &self.me.peer_id,
            self.config.routes.concentrator,
        );
        for key in &clients.not_peers {
            desired.remove(key);
        }
        for (key, s) in &clients.served {
            if let Some(d) = desired.get_mut(key) {
                d.endpoint = None;
                for a in &s.addrs {
                    let n = IpNet::host(*a);
                    if !d.allowed_ips.contains(&n) {
                        d.allowed_ips.push(n);
                    }
                }
            }
        }
        for (key, carried) in &clients.behind {
            if let Some(d) = desired.get_mut(key) {
                for n in carried
                    .iter()
                    .flat_map(|c| c.addrs.iter().map(|a| IpNet::host(*a)))
                {
                    if !d.allowed_ips.contains(&n) {
                        d.allowed_ips.push(n);
                    }
                }
                d.behind = carried.clone();
            }
        }
        for (peer, why) in clients
            .refused
            .iter()
            .filter(|r| !self.clients.refused.contains(r))
        {
            tracing::warn!(%peer, reason = %why, "a client entry of the roster is refused");
        }
        let mut grants = plan.grants.clone();
        grants.extend(clients.grants.iter().copied());
        grants.sort();
        grants.dedup();
        let port_grants_changed = plan.port_grants != self.plan.port_grants;
        let served_changed = clients.served.keys().ne(self.clients.served.keys())
            || clients.served_addrs().ne(self.clients.served_addrs())
            || clients.reply_grants != self.clients.reply_grants;
        if grants != self.grants || served_changed || port_grants_changed {
            self.actions.push_back(Action::Grants);
        }
        self.grants = grants;
        self.clients = clients;
        self.plan = plan;
        let grace = self.session.grace();
        let mut next = desired.clone();
        let mut fresh = Vec::new();
        // Removals first, then upserts that claim no address they did not have, then the
        // rest: a prefix is released before another peer claims it (the table gives a
        // prefix to the last peer that claims it and takes it from the others), so a key
        // rotation or an app moving between peers never leaves a prefix with nobody.
        let claimed: BTreeSet<&IpNet> = desired.values().flat_map(|d| &d.allowed_ips).collect();
        for (key, d) in &self.applied {
            if !desired.contains_key(key) {
                // Grace keeps a peer the fresh roster lacks, not one whose addresses the
                // roster gives to someone else (or to itself under a rotated key).
                let superseded = d.allowed_ips.iter().any(|n| claimed.contains(n));
                if !superseded && grace.is_some_and(|g| g.keeps(&d.peer_id, now)) {
                    next.insert(*key, d.clone());
                    continue;
                }
                self.actions.push_back(Action::RemovePeer {
                    public_key: *key,
                    label: PeerLabel::of(d),
                });
            }
        }
        // A peer that gives up some prefixes and takes others (two apps trading hosts)
        // first drops what it gives up, so no order of the growing upserts below can make
        // two peers claim one prefix.
        for (key, d) in &desired {
            let Some(before) = self.applied.get(key) else {
                continue;
            };
            let gives_up = before
                .allowed_ips
                .iter()
                .any(|n| !d.allowed_ips.contains(n));
            let takes = d
                .allowed_ips
                .iter()
                .any(|n| !before.allowed_ips.contains(n));
            if gives_up && takes {
                let kept = before
                    .allowed_ips
                    .iter()
                    .filter(|n| d.allowed_ips.contains(n))
                    .copied()
                    .collect();
                self.actions.push_back(Action::UpsertPeer {
                    config: PeerConfig {
                        public_key: *key,
                        preshared_key: None,
                        endpoint: None,
                        allowed_ips: kept,
                        persistent_keepalive: Some(KEEPALIVE_SECS),
                    },
                    filter: Box::new(PortFilter::from_rules(&before.outbound, &before.inbound)),
                    behind: before.behind.clone(),
                    routed: before
                        .routed
                        .iter()
                        .filter(|n| d.allowed_ips.contains(n))
                        .copied()
                        .collect(),
                    routed_ports: before
                        .routed_ports
                        .iter()
                        .filter(|(n, _)| d.allowed_ips.contains(n))
                        .cloned()
                        .collect(),
                    new: false,
                    label: PeerLabel::of(before),
                });
            }
        }
        let claims_more = |d: &Desired, before: Option<&Desired>| {
            d.allowed_ips
                .iter()
                .any(|n| !before.is_some_and(|b| b.allowed_ips.contains(n)))
        };
        let mut order: Vec<(&[u8; 32], &Desired)> = desired.iter().collect();
        order.sort_by_key(|(k, d)| (claims_more(d, self.applied.get(*k)), **k));
        for (key, d) in order {
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
                filter: Box::new(PortFilter::from_rules(&d.outbound, &d.inbound)),
                behind: d.behind.clone(),
                routed: d.routed.clone(),
                routed_ports: d.routed_ports.clone(),
                new: before.is_none(),
                label: PeerLabel::of(d),
            });
            // A client we serve has no endpoint: it dials in.
            if before.is_none() && !self.clients.served.contains_key(key) {
                fresh.push(*key);
            }
        }
        // The exit prefixes go through the policy table (`crate::policy`), never the main
        // one: they would capture the underlay.
        let exit: BTreeSet<IpNet> = [super::routes::default_v4(), super::routes::default_v6()]
            .iter()
            .flat_map(super::routes::exit_prefixes)
            .collect();
        let wanted: BTreeSet<IpNet> = next
            .values()
            .flat_map(|d| d.allowed_ips.iter().copied())
            .filter(|n| !exit.contains(n))
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

/// The app a 409 `app_taken` names: the coordinator's message starts `app <ULA> is hosted by`.
fn contested_app(message: &str) -> Option<Ipv6Addr> {
    message
        .strip_prefix("app ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use http::StatusCode;
    use tabbify_api::{HolePunch, PeerRemove, PortRange, PortRules, RosterEntry, RosterSnapshot};

    pub(super) const SEC: Duration = Duration::from_secs(1);
    pub(super) const MS: Duration = Duration::from_millis(1);

    pub(super) fn key(n: u8) -> [u8; 32] {
        [n; 32]
    }

    pub(super) fn host(ip: &str) -> IpNet {
        IpNet::host(ip.parse().unwrap())
    }

    /// The peer id derived from the identity `name`.
    pub(super) fn pid(name: &str) -> String {
        tabbify_api::ula::identity_peer_id(name)
    }

    /// The ULA derived from the identity `name`.
    pub(super) fn ula_of(name: &str) -> Ipv6Addr {
        tabbify_api::ula::identity_ula(name)
    }

    /// The host route of the ULA derived from the identity `name`.
    pub(super) fn ula_host(name: &str) -> IpNet {
        IpNet::host(std::net::IpAddr::V6(ula_of(name)))
    }

    pub(super) fn b64(k: [u8; 32]) -> String {
        base64::engine::general_purpose::STANDARD.encode(k)
    }

    /// Every route added by `actions`, sorted.
    pub(super) fn all_routes(actions: &[Action]) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = actions
            .iter()
            .flat_map(|a| match a {
                Action::Routes { add, .. } => add.clone(),
                _ => Vec::new(),
            })
            .collect();
        out.sort();
        out
    }

    /// A public peer (its reflexive endpoint is its own address).
    pub(super) fn entry(id: &str, n: u8) -> RosterEntry {
        let ep: SocketAddr = format!("198.51.100.{n}:51820").parse().unwrap();
        RosterEntry {
            peer_id: pid(id),
            identity: id.into(),
            ula: ula_of(id),
            display_name: id.into(),
            tags: vec!["supervisor".into()],
            public_key: base64::engine::general_purpose::STANDARD.encode(key(n)),
            endpoints: vec![ep],
            reflexive_endpoint: ep,
            mapped_endpoints: vec![],
            nat: Default::default(),
            home_relay: None,
            hosted_app_ulas: vec![],
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

    pub(super) fn config(has_join_token: bool, apps: Vec<Uuid>) -> Config {
        Config {
            peer_id: pid("me"),
            ula: ula_of("me"),
            name: "asked".into(),
            tags: vec!["asked".into()],
            has_join_token,
            apps,
            key_max_age: Duration::from_secs(90 * 86_400),
            rotate_at: Instant::now() + Duration::from_secs(90 * 86_400),
            coordinators: 1,
            routes: super::super::routes::Settings::default(),
        }
    }

    pub(super) fn registered(roster: Vec<RosterEntry>) -> RegisterResponse {
        RegisterResponse {
            peer_id: pid("me"),
            ula: ula_of("me"),
            display_name: "granted".into(),
            tags: vec!["supervisor".into()],
            may_host_apps: true,
            reflexive_endpoint: "203.0.113.9:51820".parse().unwrap(),
            heartbeat_interval_secs: 10,
            roster,
            stun_servers: vec![],
            relays: vec![],
            dns_domain: "mesh".into(),
            ipv4: None,
            routes: vec![],
        }
    }

    pub(super) fn beat(reflexive: &str) -> HeartbeatResponse {
        HeartbeatResponse {
            heartbeat_interval_secs: 10,
            reflexive_endpoint: reflexive.parse().unwrap(),
            stun_servers: vec![],
            relays: vec![],
        }
    }

    pub(super) fn refused(status: StatusCode, code: &str) -> ClientError {
        ClientError::Status {
            status,
            code: code.into(),
            message: "no".into(),
        }
    }

    pub(super) fn unreachable() -> ClientError {
        ClientError::Transport("connection refused".into())
    }

    pub(super) fn drain(m: &mut Machine) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    /// Register (answered with `roster`), heartbeat and open the stream, all at `t`.
    pub(super) fn connect(m: &mut Machine, t: Instant, roster: Vec<RosterEntry>) -> Vec<Action> {
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
    pub(super) fn reconnect(
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

    pub(super) fn upserts(actions: &[Action]) -> Vec<([u8; 32], bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::UpsertPeer { config, new, .. } => Some((config.public_key, *new)),
                _ => None,
            })
            .collect()
    }

    pub(super) fn removals(actions: &[Action]) -> Vec<[u8; 32]> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::RemovePeer { public_key, .. } => Some(*public_key),
                _ => None,
            })
            .collect()
    }

    pub(super) fn initiations(actions: &[Action]) -> Vec<[u8; 32]> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Initiate { public_key } => Some(*public_key),
                _ => None,
            })
            .collect()
    }

    pub(super) fn is_table_action(a: &Action) -> bool {
        matches!(
            a,
            Action::UpsertPeer { .. }
                | Action::RemovePeer { .. }
                | Action::ClearPeers
                | Action::Routes { .. }
                | Action::Grants
        )
    }

    /// A machine told of `n` coordinator targets.
    fn with_coordinators(n: usize) -> Machine {
        let mut cfg = config(true, vec![]);
        cfg.coordinators = n;
        Machine::new(cfg)
    }

    fn tls_refused() -> ClientError {
        ClientError::Transport("TLS: invalid peer certificate: UnknownIssuer".into())
    }

    /// Issue 14: the coordinator in use dies (its stream breaks); the joiner moves to the
    /// next one at once, heartbeats there first, and, known there, reopens the stream with
    /// the last event id it applied; the table is never touched, and a snapshot of the
    /// same roster afterwards changes nothing.
    #[test]
    fn a_dead_coordinator_is_left_at_once_for_one_that_knows_us_without_touching_the_table() {
        let t = Instant::now();
        let mut m = with_coordinators(2);
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        m.handle_event(t, Some(41), SseEvent::PeerUpsert(entry("a", 1)));
        drain(&mut m);
        assert_eq!(m.coordinator(), 0);
        let died = t + 3 * SEC;
        m.handle_stream_closed(died, Err(unreachable()));
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        assert_eq!(m.coordinator(), 1);
        assert_eq!(
            m.poll_timeout(),
            Some(died),
            "no backoff on the first failover"
        );
        m.handle_timeout(died);
        assert_eq!(
            drain(&mut m),
            vec![Action::Heartbeat {
                hosted_app_ulas: vec![]
            }],
            "an admitted node heartbeats first, it does not register"
        );
        assert_eq!(m.session(), &Session::Resuming);
        m.handle_heartbeat(died + 10 * MS, Ok(beat("203.0.113.9:51820")));
        assert_eq!(drain(&mut m), vec![Action::OpenStream]);
        assert_eq!(m.roster().last_event_id, Some(41), "resumes after event 41");
        m.handle_stream_opened(died + 20 * MS, Ok(()));
        assert!(m.session().is_connected());
        assert_eq!(drain(&mut m), vec![]);
        // The new coordinator chose a snapshot: the same peers, so nothing changes.
        let snap = RosterSnapshot {
            policy_revision: 1,
            peers: vec![entry("b", 2), entry("a", 1)],
        };
        m.handle_event(died + 30 * MS, Some(7), SseEvent::Snapshot(snap));
        assert_eq!(drain(&mut m), vec![]);
    }

    /// Issue 14: the coordinator moved to does not know us (its own state): 404 to the
    /// heartbeat, so we register there, without the spent token; the fresh stream starts
    /// with a snapshot (no event id of the other coordinator), and grace keeps the peers
    /// that have not re-registered there yet.
    #[test]
    fn a_coordinator_that_does_not_know_us_gets_a_registration_and_grace_keeps_our_peers() {
        let t = Instant::now();
        let mut m = with_coordinators(2);
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        m.handle_event(t, Some(41), SseEvent::PeerUpsert(entry("a", 1)));
        drain(&mut m);
        m.handle_stream_closed(t, Ok(()));
        drain(&mut m);
        m.handle_timeout(t);
        drain(&mut m);
        m.handle_heartbeat(t, Err(refused(StatusCode::NOT_FOUND, "not_registered")));
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: false }]);
        assert_eq!(
            m.coordinator(),
            1,
            "registers with the new one, no failover"
        );
        m.handle_registered(t, Ok(registered(vec![entry("a", 1)])));
        let a = drain(&mut m);
        assert!(!a.iter().any(is_table_action), "{a:?}");
        assert_eq!(m.roster().last_event_id, None);
        m.handle_heartbeat(t, Ok(beat("203.0.113.9:51820")));
        assert_eq!(drain(&mut m), vec![Action::OpenStream]);
        m.handle_stream_opened(t, Ok(()));
        assert!(m.session().is_connected());
    }

    #[test]
    fn once_every_coordinator_failed_in_a_row_the_machine_backs_off() {
        let t = Instant::now();
        let mut m = with_coordinators(2);
        connect(&mut m, t, vec![]);
        m.handle_stream_closed(t, Err(unreachable()));
        drain(&mut m);
        m.handle_timeout(t);
        drain(&mut m);
        // The second one is down too.
        m.handle_heartbeat(t + SEC, Err(unreachable()));
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        assert_eq!(m.coordinator(), 0, "round robin: the first is tried again");
        assert_eq!(m.poll_timeout(), Some(t + SEC + INITIAL_BACKOFF));
        m.handle_timeout(t + SEC + INITIAL_BACKOFF);
        drain(&mut m);
        m.handle_heartbeat(t + 2 * SEC, Ok(beat("203.0.113.9:51820")));
        drain(&mut m);
        m.handle_stream_opened(t + 2 * SEC, Ok(()));
        // A stream opened: a new round, the next failure moves on at once again.
        m.handle_stream_closed(t + 3 * SEC, Ok(()));
        drain(&mut m);
        assert_eq!((m.coordinator(), m.poll_timeout()), (1, Some(t + 3 * SEC)));
    }

    #[test]
    fn a_failed_heartbeat_moves_on_only_when_there_is_another_coordinator() {
        let t = Instant::now();
        let mut one = with_coordinators(1);
        connect(&mut one, t, vec![]);
        one.handle_heartbeat(t + 10 * SEC, Err(unreachable()));
        assert_eq!(drain(&mut one), vec![]);
        assert!(one.session().is_connected(), "the stream decides");
        let mut two = with_coordinators(2);
        connect(&mut two, t, vec![]);
        two.handle_heartbeat(t + 10 * SEC, Err(refused(StatusCode::BAD_GATEWAY, "")));
        assert_eq!(drain(&mut two), vec![Action::CloseStream]);
        assert_eq!(
            (two.coordinator(), two.poll_timeout()),
            (1, Some(t + 10 * SEC))
        );
    }

    /// Attacker: a coordinator in the list that presents a certificate from another CA is
    /// refused by TLS, and the joiner moves on to the next one at once, also before its
    /// first admission (the refusal is no reason to exit).
    #[test]
    fn a_coordinator_with_a_foreign_certificate_is_skipped_at_once() {
        let t = Instant::now();
        let mut m = with_coordinators(2);
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: true }]);
        m.handle_registered(t, Err(tls_refused()));
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        assert_eq!((m.coordinator(), m.poll_timeout()), (1, Some(t)));
        m.handle_timeout(t);
        assert_eq!(
            drain(&mut m),
            vec![Action::Register { with_token: true }],
            "not admitted yet: it registers, with the token"
        );
        m.handle_registered(t, Ok(registered(vec![])));
        drain(&mut m);
        assert!(m.grant().is_some());
    }

    /// `tabbify-mesh leave`: the session ends first, so the stream the coordinator closes
    /// on our removal registers nothing; success exits, failure stays in the mesh.
    #[test]
    fn leaving_ends_the_session_and_exits_once_the_coordinator_removed_us() {
        let t = Instant::now();
        let mut m = with_coordinators(2);
        assert!(
            m.begin_leave().is_err(),
            "nothing to leave before admission"
        );
        connect(&mut m, t, vec![entry("a", 1)]);
        assert!(m.begin_leave().is_ok());
        assert!(m.begin_leave().is_err(), "once");
        assert_eq!(drain(&mut m), vec![Action::CloseStream]);
        m.handle_stream_closed(t, Ok(()));
        m.handle_timeout(t + 60 * SEC);
        assert_eq!(drain(&mut m), vec![], "no failover, no registration");
        m.handle_left(t, Ok(()));
        assert_eq!(drain(&mut m), vec![Action::Exit(Exit::Left)]);

        let mut m = with_coordinators(1);
        connect(&mut m, t, vec![entry("a", 1)]);
        m.begin_leave().unwrap();
        drain(&mut m);
        m.handle_left(t, Err("unreachable".into()));
        assert_eq!(
            m.poll_timeout(),
            Some(t),
            "stays, and registers again at once"
        );
        m.handle_timeout(t);
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: false }]);
    }

    #[test]
    fn the_first_registration_carries_the_join_token() {
        let mut m = Machine::new(config(true, vec![]));
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: true }]);
        assert_eq!(m.session(), &Session::Registering { with_token: true });
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn the_key_is_rotated_when_it_reaches_its_maximum_age_and_once_at_a_time() {
        let t = Instant::now();
        let day = Duration::from_secs(86_400);
        let mut cfg = config(true, vec![]);
        cfg.key_max_age = 90 * day;
        cfg.rotate_at = t + 2 * day;
        let mut m = Machine::new(cfg);
        // Not connected: no rotation is scheduled.
        drain(&mut m);
        assert_eq!(m.poll_timeout(), None);
        connect(&mut m, t, vec![]);
        drain(&mut m);
        m.handle_stream_activity(t + day);
        m.handle_timeout(t + day);
        assert!(!drain(&mut m).contains(&Action::RotateKey));
        m.handle_stream_activity(t + 2 * day);
        m.handle_timeout(t + 2 * day);
        assert!(drain(&mut m).contains(&Action::RotateKey));
        // In flight: neither the timer nor the control socket starts another one.
        m.handle_stream_activity(t + 2 * day + SEC);
        m.handle_timeout(t + 2 * day + SEC);
        assert!(!drain(&mut m).contains(&Action::RotateKey));
        assert!(m.begin_rotation().is_err());
        // A failure retries an hour later with the old key; a success waits a full age.
        m.handle_rotated(t + 2 * day, Err("unreachable".into()));
        m.handle_stream_activity(t + 2 * day + 1800 * SEC);
        m.handle_timeout(t + 2 * day + 1800 * SEC);
        assert!(!drain(&mut m).contains(&Action::RotateKey));
        m.handle_stream_activity(t + 2 * day + ROTATION_RETRY);
        m.handle_timeout(t + 2 * day + ROTATION_RETRY);
        assert!(drain(&mut m).contains(&Action::RotateKey));
        m.handle_rotated(t + 3 * day, Ok(()));
        m.handle_stream_activity(t + 92 * day);
        m.handle_timeout(t + 92 * day);
        assert!(!drain(&mut m).contains(&Action::RotateKey));
        m.handle_stream_activity(t + 93 * day);
        m.handle_timeout(t + 93 * day);
        assert!(drain(&mut m).contains(&Action::RotateKey));
        m.handle_rotated(t + 93 * day, Ok(()));
        // Asked for by hand while connected.
        assert!(m.begin_rotation().is_ok());
        assert!(m.begin_rotation().is_err());
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
                    add: vec![ula_host("a")],
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

    /// A stock WireGuard client's entry (issue 15): a `client/` identity, no endpoints.
    fn client_entry(id: &str, n: u8) -> RosterEntry {
        let mut e = entry(&format!("client/{id}"), n);
        e.endpoints = vec![];
        e.reflexive_endpoint = "0.0.0.0:0".parse().unwrap();
        e.ipv4 = Some(std::net::Ipv4Addr::new(100, 64, 1, n));
        e
    }

    /// Issue 15, the concentrator: a served client becomes a peer with its ULA and IPv4,
    /// no endpoint and no initiation (it dials in); the member it may use gets a grant back
    /// to it, and the grants and served addresses reach the table (`Grants`).
    #[test]
    fn a_concentrator_makes_its_clients_peers_without_endpoints_and_grants_them() {
        let t = Instant::now();
        let p = entry("p", 1);
        let mut k = client_entry("k", 9);
        k.client = true;
        k.may_use = vec![format!("{}/128", p.ula)];
        let mut cfg = config(true, vec![]);
        cfg.routes.concentrator = true;
        let mut m = Machine::new(cfg);
        let acts = connect(&mut m, t, vec![p.clone(), k.clone()]);
        let up = acts
            .iter()
            .find_map(|a| match a {
                Action::UpsertPeer { config, .. } if config.public_key == key(9) => Some(config),
                _ => None,
            })
            .expect("the client is a peer");
        assert_eq!(up.endpoint, None);
        assert!(up.allowed_ips.contains(&IpNet::host(IpAddr::V6(k.ula))));
        assert!(up.allowed_ips.contains(&host("100.64.1.9")));
        assert!(!acts.contains(&Action::Initiate { public_key: key(9) }));
        assert!(acts.contains(&Action::Initiate { public_key: key(1) }));
        assert!(acts.contains(&Action::Grants), "{acts:?}");
        assert!(m
            .grants()
            .contains(&(key(9), IpNet::host(IpAddr::V6(p.ula)))));
        assert!(m
            .client_plan()
            .reply_grants
            .contains(&(key(1), host("100.64.1.9"))));
        assert_eq!(m.client_plan().served_addrs().count(), 2);
        // Revoked: the client's peer goes (the session and keys with it).
        let rm = PeerRemove {
            peer_id: k.peer_id.clone(),
            reason: "revoked".into(),
        };
        m.handle_event(t, None, SseEvent::PeerRemove(rm));
        let acts = drain(&mut m);
        assert_eq!(removals(&acts), vec![key(9)], "{acts:?}");
        assert!(acts.contains(&Action::Grants));
        assert!(m.grants().is_empty() && m.client_plan().reply_grants.is_empty());
    }

    /// Issue 15, a member: a client behind concentrator C is no peer; its addresses join
    /// C's AllowedIPs with its own rules behind C. The same roster given to a member that
    /// is no concentrator as `client: true` is refused: no peer, no grant.
    #[test]
    fn a_member_carries_a_client_behind_its_concentrator_and_refuses_to_serve_one() {
        let t = Instant::now();
        let c = entry("c", 1);
        let mut k = client_entry("k", 9);
        k.via = Some(c.peer_id.clone());
        k.ports = PortRules {
            outbound: vec![],
            inbound: vec![PortRange {
                first: 22,
                last: 22,
            }],
            ..Default::default()
        };
        let mut m = Machine::new(config(true, vec![]));
        let acts = connect(&mut m, t, vec![c.clone(), k.clone()]);
        assert_eq!(upserts(&acts), vec![(key(1), true)], "{acts:?}");
        let Some(Action::UpsertPeer {
            config: up, behind, ..
        }) = acts.iter().find(|a| matches!(a, Action::UpsertPeer { .. }))
        else {
            panic!("{acts:?}")
        };
        assert!(up.allowed_ips.contains(&IpNet::host(IpAddr::V6(k.ula))));
        assert!(up.allowed_ips.contains(&host("100.64.1.9")));
        assert_eq!(behind.len(), 1);
        assert_eq!(
            behind[0].inbound,
            vec![(crate::core::filter::Proto::Both, 22, 22)]
        );
        assert!(behind[0].outbound.is_empty());
        assert!(all_routes(&acts).contains(&host("100.64.1.9")));
        // Not a concentrator: a client to serve is refused.
        let mut m = Machine::new(config(true, vec![]));
        let mut served = client_entry("k", 9);
        served.client = true;
        served.may_use = vec![format!("{}/128", c.ula)];
        let acts = connect(&mut m, t, vec![c, served]);
        assert_eq!(upserts(&acts), vec![(key(1), true)], "{acts:?}");
        assert!(m.grants().is_empty());
        assert_eq!(m.client_plan().refused.len(), 1);
    }

    /// Issue 15: two routers offer one LAN; the lowest peer id carries it; when its path
    /// dies (liveness), the prefix moves to the other in one reconcile, the kernel route
    /// stays, and it moves back when the first answers again. A peer's mesh IPv4 is in its
    /// AllowedIPs and routed; an exit route from a peer we did not choose is not.
    #[test]
    fn a_shared_route_fails_over_on_liveness_and_back() {
        let t = Instant::now();
        let lan: IpNet = "10.1.0.0/16".parse().unwrap();
        let mut a = entry("a", 1);
        a.routes = vec![lan.to_string()];
        a.ipv4 = Some("100.64.0.1".parse().unwrap());
        let mut b = entry("b", 2);
        b.routes = vec![lan.to_string(), "0.0.0.0/0".into()];
        b.exit_node = true;
        let (first, second) = if pid("a") < pid("b") { (1, 2) } else { (2, 1) };
        let mut m = Machine::new(config(true, vec![]));
        let acts = connect(&mut m, t, vec![a, b]);
        let allowed = |acts: &[Action], k: u8| -> Option<Vec<IpNet>> {
            acts.iter().rev().find_map(|x| match x {
                Action::UpsertPeer { config, .. } if config.public_key == key(k) => {
                    Some(config.allowed_ips.clone())
                }
                _ => None,
            })
        };
        assert!(allowed(&acts, first).unwrap().contains(&lan), "{acts:?}");
        assert!(!allowed(&acts, second).unwrap().contains(&lan));
        assert!(allowed(&acts, 1).unwrap().contains(&host("100.64.0.1")));
        let routes = all_routes(&acts);
        assert!(routes.contains(&lan) && routes.contains(&host("100.64.0.1")));
        assert!(
            routes.iter().all(|r| r.prefix_len() > 1),
            "no default route: {routes:?}"
        );
        assert_eq!(m.route_contested(), BTreeSet::from([key(1), key(2)]));
        // The first router's path dies: only the second is live.
        m.handle_liveness(t, BTreeSet::from([key(second)]));
        let acts = drain(&mut m);
        assert!(allowed(&acts, second).unwrap().contains(&lan), "{acts:?}");
        assert!(!allowed(&acts, first).unwrap().contains(&lan));
        assert!(
            all_routes(&acts).is_empty(),
            "the kernel route stays: {acts:?}"
        );
        // The same liveness again changes nothing; both live: back to the first.
        m.handle_liveness(t, BTreeSet::from([key(second)]));
        assert!(drain(&mut m).is_empty());
        m.handle_liveness(t, BTreeSet::from([key(1), key(2)]));
        let acts = drain(&mut m);
        assert!(allowed(&acts, first).unwrap().contains(&lan), "{acts:?}");
    }

    /// Issue 15, routed traffic: the router's LAN prefix goes to the engine as routed (the
    /// routed filter, not the member↔router port rules), its mesh IPv4 does not (it keeps
    /// the port rules); when the route fails over, the routed set moves with it.
    #[test]
    fn a_routers_prefixes_are_routed_and_its_mesh_ipv4_is_not() {
        let t = Instant::now();
        let lan: IpNet = "10.1.0.0/16".parse().unwrap();
        let mut a = entry("a", 1);
        a.routes = vec![lan.to_string()];
        a.ipv4 = Some("100.64.0.1".parse().unwrap());
        let mut b = entry("b", 2);
        b.routes = vec![lan.to_string()];
        let (first, second) = if pid("a") < pid("b") { (1, 2) } else { (2, 1) };
        let mut m = Machine::new(config(true, vec![]));
        let acts = connect(&mut m, t, vec![a, b]);
        let routed = |acts: &[Action], k: u8| -> Option<Vec<IpNet>> {
            acts.iter().rev().find_map(|x| match x {
                Action::UpsertPeer { config, routed, .. } if config.public_key == key(k) => {
                    Some(routed.clone())
                }
                _ => None,
            })
        };
        assert_eq!(routed(&acts, first).unwrap(), vec![lan], "{acts:?}");
        assert!(routed(&acts, second).unwrap().is_empty());
        m.handle_liveness(t, BTreeSet::from([key(second)]));
        let acts = drain(&mut m);
        assert_eq!(routed(&acts, second).unwrap(), vec![lan], "{acts:?}");
        assert!(routed(&acts, first).unwrap().is_empty());
    }

    /// Issue 15: a peer granted our route (`may_use`) gets a `Grants` action; the grant is
    /// clipped to what we advertise.
    #[test]
    fn may_use_inside_our_routes_becomes_a_grant() {
        let t = Instant::now();
        let mut cfg = config(true, vec![]);
        cfg.routes.advertised = vec!["10.7.0.0/16".parse().unwrap()];
        let mut a = entry("a", 1);
        a.may_use = vec!["10.7.0.0/16".into(), "10.8.0.0/16".into()];
        let mut m = Machine::new(cfg);
        let acts = connect(&mut m, t, vec![a]);
        assert!(acts.contains(&Action::Grants), "{acts:?}");
        assert_eq!(m.grants(), [(key(1), "10.7.0.0/16".parse().unwrap())]);
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
            ..
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
                allowed_ips: vec![ula_host("a"), host("fd5a:1f02::7")],
                persistent_keepalive: Some(25),
            }
        );
        assert_eq!(
            &**filter,
            &PortFilter::from_ranges(&[(0, 65535)], &[(8730, 8730)])
        );
        assert_eq!(label.peer_id, pid("a"));
    }

    #[test]
    fn a_removed_peer_leaves_the_table_and_its_routes_at_once() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1), entry("b", 2)]);
        let rm = PeerRemove {
            peer_id: pid("b"),
            reason: "revoked".into(),
        };
        m.handle_event(t, Some(3), SseEvent::PeerRemove(rm));
        let a = drain(&mut m);
        assert_eq!(removals(&a), vec![key(2)]);
        assert_eq!(
            a[1],
            Action::Routes {
                add: vec![],
                del: vec![ula_host("b")]
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
                peer_id: pid(id),
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

    /// Issue 13: heartbeat ticks (and any other wake-up) never postpone the stream's idle
    /// deadline; only bytes on the stream do. A stream that goes silent without a FIN or RST
    /// is dropped one idle timeout after its last byte, and the joiner registers again.
    #[test]
    fn a_silent_stream_is_dropped_although_heartbeats_tick() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![]);
        m.handle_stream_activity(t + SEC);
        let mut beats = 0;
        let now = loop {
            let now = m.poll_timeout().unwrap();
            m.handle_timeout(now);
            let a = drain(&mut m);
            if a.contains(&Action::CloseStream) {
                break now;
            }
            assert!(matches!(a[..], [Action::Heartbeat { .. }]), "{a:?}");
            m.handle_heartbeat(now, Ok(beat("203.0.113.9:51820")));
            beats += 1;
            assert!(m.session().is_connected());
        };
        assert_eq!(now, t + SEC + STREAM_IDLE_TIMEOUT);
        assert_eq!(beats, 3, "heartbeats kept going until then");
        assert!(!m.session().is_connected());
        let t1 = m.poll_timeout().unwrap();
        assert_eq!(t1, now + INITIAL_BACKOFF);
        m.handle_timeout(t1);
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: false }]);
    }

    /// Issue 13: a new underlay address heartbeats and reopens the stream once the address
    /// set has settled for [`UNDERLAY_SETTLE`], without re-registering or touching the
    /// table; a disconnected node retries at once.
    #[test]
    fn an_underlay_change_heartbeats_and_reopens_the_stream_once_settled() {
        let ms = Duration::from_millis(1);
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        // A move: the new address appears, the old one goes 100 ms later.
        m.handle_underlay_changed(t + 3 * SEC);
        assert!(drain(&mut m).is_empty(), "nothing before the set settles");
        assert_eq!(m.poll_timeout(), Some(t + 3 * SEC + UNDERLAY_SETTLE));
        m.handle_timeout(t + 3 * SEC + 100 * ms);
        assert!(drain(&mut m).is_empty());
        m.handle_underlay_changed(t + 3 * SEC + 100 * ms);
        let settled = t + 3 * SEC + 100 * ms + UNDERLAY_SETTLE;
        assert_eq!(m.poll_timeout(), Some(settled), "the wait restarts");
        // The probe's new result during the wait adds no heartbeat of its own.
        m.handle_nat_changed();
        m.handle_timeout(settled - ms);
        assert!(drain(&mut m).is_empty());
        m.handle_timeout(settled);
        let a = drain(&mut m);
        assert!(
            matches!(a[..], [Action::CloseStream, Action::Heartbeat { .. }]),
            "{a:?}"
        );
        assert!(!m.session().is_connected());
        // Another change while the heartbeat is out: one more once streaming.
        m.handle_underlay_changed(settled);
        m.handle_timeout(settled + UNDERLAY_SETTLE);
        assert!(drain(&mut m).is_empty());
        m.handle_heartbeat(settled, Ok(beat("198.18.0.20:51820")));
        assert_eq!(drain(&mut m), vec![Action::OpenStream]);
        m.handle_stream_opened(t + 4 * SEC, Ok(()));
        let a = drain(&mut m);
        assert!(matches!(a[..], [Action::Heartbeat { .. }]), "{a:?}");
        m.handle_heartbeat(t + 4 * SEC, Ok(beat("198.18.0.20:51820")));
        assert!(
            drain(&mut m).is_empty(),
            "same roster: the table is not touched"
        );
        assert!(m.session().is_connected());
        assert_eq!(m.reflexive(), Some("198.18.0.20:51820".parse().unwrap()));
        assert_eq!(
            m.poll_timeout(),
            Some(t + 14 * SEC),
            "heartbeats restart from here"
        );
        // A new probe result while streaming heartbeats at once.
        m.handle_nat_changed();
        let a = drain(&mut m);
        assert!(matches!(a[..], [Action::Heartbeat { .. }]), "{a:?}");
        m.handle_heartbeat(t + 4 * SEC, Ok(beat("198.18.0.20:51820")));

        // Disconnected, waiting out a backoff: register once settled.
        m.handle_stream_closed(t + 5 * SEC, Err(unreachable()));
        drain(&mut m);
        m.handle_underlay_changed(t + 5 * SEC);
        assert_eq!(m.poll_timeout(), Some(t + 5 * SEC + UNDERLAY_SETTLE));
        m.handle_timeout(t + 5 * SEC + UNDERLAY_SETTLE);
        assert_eq!(drain(&mut m), vec![Action::Register { with_token: false }]);
        // A stream reopened without registering resumes after the last event seen.
        m.handle_event(
            t + 5 * SEC,
            Some(9),
            SseEvent::Snapshot(tabbify_api::RosterSnapshot {
                policy_revision: 1,
                peers: vec![entry("a", 1)],
            }),
        );
        assert_eq!(m.roster().last_event_id, Some(9));
        // Registering: nothing now; a heartbeat follows once the stream is open.
        let t6 = t + 6 * SEC;
        m.handle_underlay_changed(t6);
        m.handle_timeout(t6 + UNDERLAY_SETTLE);
        assert!(drain(&mut m).is_empty());
        m.handle_registered(t6, Ok(registered(vec![entry("a", 1)])));
        drain(&mut m);
        m.handle_heartbeat(t6, Ok(beat("198.18.0.20:51820")));
        drain(&mut m);
        m.handle_stream_opened(t6, Ok(()));
        let a = drain(&mut m);
        assert!(matches!(a[..], [Action::Heartbeat { .. }]), "{a:?}");
        // After a registration, though, it starts over with a snapshot.
        assert_eq!(m.roster().last_event_id, None);
    }

    #[test]
    fn keepalive_comments_keep_a_quiet_stream_open() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![]);
        for k in 1..=20u32 {
            let at = t + k * COORDINATOR_KEEPALIVE;
            while let Some(due) = m.poll_timeout().filter(|due| *due <= at) {
                m.handle_timeout(due);
                for a in drain(&mut m) {
                    assert!(matches!(a, Action::Heartbeat { .. }), "{a:?}");
                    m.handle_heartbeat(due, Ok(beat("203.0.113.9:51820")));
                }
            }
            m.handle_stream_activity(at);
        }
        assert!(m.session().is_connected());
        // A stale report (bytes seen earlier, reported late) never pulls the deadline in.
        let last = t + 20 * COORDINATOR_KEEPALIVE;
        m.handle_stream_activity(t);
        m.handle_timeout(last + STREAM_IDLE_TIMEOUT - SEC);
        assert!(!drain(&mut m).contains(&Action::CloseStream));
        m.handle_timeout(last + STREAM_IDLE_TIMEOUT);
        assert!(drain(&mut m).contains(&Action::CloseStream));
        // Activity after the session ended changes nothing.
        m.handle_stream_activity(last + STREAM_IDLE_TIMEOUT + SEC);
        assert!(!m.session().is_connected());
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

    /// Issue 11 (one host per app): a 409 `app_taken` on a heartbeat is not a lost session:
    /// the joiner resends without the contested app, shows it, and claims it again with the
    /// next heartbeat; a successful claim clears it.
    #[test]
    fn a_contested_app_is_retried_without_losing_the_session() {
        let t = Instant::now();
        let (a, b) = (Uuid::from_u128(7), Uuid::from_u128(8));
        let (ua, ub) = (tabbify_api::ula::app_ula(&a), tabbify_api::ula::app_ula(&b));
        let mut m = Machine::new(config(true, vec![a, b]));
        drain(&mut m);
        m.handle_registered(t, Ok(registered(vec![])));
        let first = drain(&mut m);
        let Action::Heartbeat { hosted_app_ulas } = &first[0] else {
            panic!("{first:?}")
        };
        assert_eq!(hosted_app_ulas.len(), 2);
        let taken = ClientError::Status {
            status: StatusCode::CONFLICT,
            code: "app_taken".into(),
            message: format!("app {ub} is hosted by peer 00ff (other); ..."),
        };
        m.handle_heartbeat(t, Err(taken));
        assert_eq!(
            drain(&mut m),
            vec![Action::Heartbeat {
                hosted_app_ulas: vec![ua]
            }],
            "resent without the contested app, session kept"
        );
        assert!(m.contested(&ub).unwrap().contains("00ff"));
        assert_eq!(m.contested(&ua), None);
        m.handle_heartbeat(t, Ok(beat("203.0.113.9:51820")));
        assert_eq!(drain(&mut m), vec![Action::OpenStream]);
        m.handle_stream_opened(t, Ok(()));
        assert!(m.contested(&ub).is_some(), "still held elsewhere");
        // The next heartbeat claims both again; this time the claim succeeds.
        m.handle_timeout(t + 10 * SEC);
        let Action::Heartbeat { hosted_app_ulas } = &drain(&mut m)[0] else {
            panic!()
        };
        assert_eq!(hosted_app_ulas.len(), 2);
        m.handle_heartbeat(t + 10 * SEC, Ok(beat("203.0.113.9:51820")));
        assert_eq!(m.contested(&ub), None);
        assert!(m.session().is_connected());
        // A message that names no app: every claimed app is held back for this round.
        m.handle_timeout(t + 20 * SEC);
        drain(&mut m);
        let vague = ClientError::Status {
            status: StatusCode::CONFLICT,
            code: "app_taken".into(),
            message: "taken".into(),
        };
        m.handle_heartbeat(t + 20 * SEC, Err(vague));
        assert_eq!(
            drain(&mut m),
            vec![Action::Heartbeat {
                hosted_app_ulas: vec![]
            }]
        );
        assert!(m.session().is_connected());
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
            peer_id: pid("a"),
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

/// A malicious coordinator, played through the machine: every forgery the design refuses is
/// refused, counted, and never reaches the table or the kernel routes.
#[cfg(test)]
mod forged_roster_tests {
    use super::tests::*;
    use super::*;
    use tabbify_api::{HolePunch, PeerRemove, RosterSnapshot};

    fn snapshot(peers: Vec<api::RosterEntry>) -> SseEvent {
        SseEvent::Snapshot(RosterSnapshot {
            policy_revision: 1,
            peers,
        })
    }

    #[test]
    fn a_peer_ula_not_derived_from_the_identity_is_refused_and_never_routed() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let mut forged = entry("b", 2);
        forged.ula = "fd5a:1f00::dead".parse().unwrap();
        let a = connect(&mut m, t, vec![entry("a", 1), forged]);
        assert_eq!(upserts(&a), vec![(key(1), true)]);
        assert_eq!(all_routes(&a), vec![ula_host("a")]);
        assert_eq!(m.refused().bad_ula, 1);
        assert_eq!(m.roster().entries().count(), 1);
    }

    #[test]
    fn a_peer_id_not_derived_from_the_identity_is_refused() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let mut forged = entry("b", 2);
        forged.peer_id = pid("a");
        let a = connect(&mut m, t, vec![forged]);
        assert!(!a.iter().any(is_table_action), "{a:?}");
        assert_eq!(m.refused().bad_peer_id, 1);
    }

    #[test]
    fn an_app_ula_outside_the_app_prefix_refuses_the_entry() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        for outside in [
            "2001:db8::1",
            "fd5a:1f00::7",
            "::ffff:10.0.0.1",
            "fd5a:1f01::1",
        ] {
            let mut forged = entry("a", 1);
            forged.hosted_app_ulas =
                vec!["fd5a:1f02::7".parse().unwrap(), outside.parse().unwrap()];
            m.handle_event(t, None, SseEvent::PeerUpsert(forged));
            assert_eq!(
                drain(&mut m),
                vec![],
                "{outside}: the upsert is not applied"
            );
        }
        assert_eq!(m.refused().bad_app_ula, 4);
        // The peer keeps its last good entry.
        assert_eq!(m.roster().entries().count(), 1);
        // A good upsert after the forgeries applies.
        let mut good = entry("a", 1);
        good.hosted_app_ulas = vec!["fd5a:1f02::7".parse().unwrap()];
        m.handle_event(t, None, SseEvent::PeerUpsert(good));
        assert_eq!(all_routes(&drain(&mut m)), vec![host("fd5a:1f02::7")]);
    }

    #[test]
    fn unusable_endpoints_refuse_the_entry_and_loopback_and_private_ones_do_not() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![]);
        let bad = [
            "0.0.0.0:51820",
            "224.0.0.1:51820",
            "255.255.255.255:51820",
            "198.51.100.1:0",
            "[::]:51820",
            "[ff02::1]:51820",
            "[::ffff:0.0.0.0]:51820",
            "[fd5a:1f00::1]:51820",
            "[fd5a:1f02::1]:51820",
        ];
        for (i, ep) in bad.iter().enumerate() {
            let ep: SocketAddr = ep.parse().unwrap();
            let mut reported = entry("b", 2);
            reported.endpoints = vec!["198.51.100.2:51820".parse().unwrap(), ep];
            let mut reflexive = entry("c", 3);
            reflexive.reflexive_endpoint = ep;
            m.handle_event(t, None, snapshot(vec![reported, reflexive]));
            assert_eq!(drain(&mut m), vec![], "{ep}");
            assert_eq!(m.refused().bad_endpoint, 2 * (i as u64 + 1), "{ep}");
            // Clear the standing refusals, so the next round counts again.
            m.handle_event(t, None, snapshot(vec![]));
        }
        let mut local = entry("b", 2);
        local.endpoints = vec![
            "127.0.0.1:51820".parse().unwrap(),
            "[::1]:51820".parse().unwrap(),
        ];
        local.reflexive_endpoint = "10.1.2.3:51820".parse().unwrap();
        m.handle_event(t, None, snapshot(vec![local]));
        assert_eq!(upserts(&drain(&mut m)), vec![(key(2), true)]);
    }

    #[test]
    fn a_hole_punch_towards_an_unusable_address_is_refused() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        for endpoint in ["0.0.0.0:4000", "239.1.1.1:4000", "192.0.2.7:0"] {
            let punch = HolePunch {
                peer_id: pid("a"),
                public_key: b64(key(1)),
                endpoint: endpoint.parse().unwrap(),
            };
            m.handle_event(t, None, SseEvent::HolePunch(punch));
            assert_eq!(drain(&mut m), vec![], "{endpoint}");
        }
        assert_eq!(m.refused().bad_hole_punch, 3);
    }

    #[test]
    fn two_peers_with_one_public_key_keep_the_first_seen() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        // b takes over a's key: refused whole, a undisturbed.
        let mut thief = entry("b", 2);
        thief.public_key = b64(key(1));
        m.handle_event(t, None, SseEvent::PeerUpsert(thief.clone()));
        assert_eq!(drain(&mut m), vec![]);
        // Listed first in a snapshot (b sorts before nobody: order is the coordinator's):
        // still refused, a was seen first.
        m.handle_event(t, None, snapshot(vec![thief.clone(), entry("a", 1)]));
        assert_eq!(drain(&mut m), vec![]);
        assert_eq!(
            m.refused().duplicate_public_key,
            1,
            "counted once while it stands"
        );
        let ids: Vec<_> = m.roster().entries().map(|e| e.peer_id.clone()).collect();
        assert_eq!(ids, vec![pid("a")]);
        // a leaves: b's claim is the only one and is accepted.
        m.handle_event(
            t,
            None,
            SseEvent::PeerRemove(PeerRemove {
                peer_id: pid("a"),
                reason: "deregistered".into(),
            }),
        );
        // The engine peer is the key's: it stays, now with b's addresses.
        let a = drain(&mut m);
        let Some(Action::UpsertPeer { config, label, .. }) = a
            .iter()
            .rev()
            .find(|a| matches!(a, Action::UpsertPeer { .. }))
        else {
            panic!("{a:?}")
        };
        assert_eq!(config.public_key, key(1));
        assert_eq!(label.peer_id, pid("b"));
        assert_eq!(config.allowed_ips, vec![ula_host("b")]);
        assert!(
            a.contains(&Action::Routes {
                add: vec![ula_host("b")],
                del: vec![ula_host("a")]
            }),
            "{a:?}"
        );
    }

    #[test]
    fn a_duplicate_peer_id_in_one_snapshot_keeps_the_first() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let mut second = entry("a", 1);
        second.public_key = b64(key(7));
        let a = connect(&mut m, t, vec![entry("a", 1), second]);
        assert_eq!(upserts(&a), vec![(key(1), true)]);
        assert_eq!(m.refused().duplicate_ula, 1);
    }

    #[test]
    fn an_upsert_claiming_an_app_another_peer_holds_is_refused_for_that_app() {
        let t = Instant::now();
        let held: Ipv6Addr = "fd5a:1f02::7".parse().unwrap();
        let free: Ipv6Addr = "fd5a:1f02::8".parse().unwrap();
        let mut m = Machine::new(config(true, vec![]));
        let mut a = entry("a", 1);
        a.hosted_app_ulas = vec![held];
        connect(&mut m, t, vec![a.clone(), entry("b", 2)]);
        let mut b = entry("b", 2);
        b.hosted_app_ulas = vec![held, free];
        m.handle_event(t, None, SseEvent::PeerUpsert(b.clone()));
        let acts = drain(&mut m);
        let Some(Action::UpsertPeer { config, .. }) = acts.first() else {
            panic!("{acts:?}")
        };
        assert_eq!(config.public_key, key(2));
        assert_eq!(
            config.allowed_ips,
            vec![ula_host("b"), IpNet::host(std::net::IpAddr::V6(free))],
            "b gets the free app only"
        );
        assert_eq!(
            all_routes(&acts),
            vec![IpNet::host(std::net::IpAddr::V6(free))]
        );
        assert_eq!(m.refused().duplicate_app, 1);
        // A snapshot that lists b first does not hand it the app either.
        m.handle_event(t, None, snapshot(vec![b.clone(), a.clone()]));
        assert_eq!(drain(&mut m), vec![]);
        assert_eq!(
            m.refused().duplicate_app,
            1,
            "still the same standing refusal"
        );
        // a releases the app: b's standing claim takes it; a shrinks before b grows.
        a.hosted_app_ulas = vec![];
        m.handle_event(t, None, SseEvent::PeerUpsert(a));
        let acts = drain(&mut m);
        assert_eq!(upserts(&acts), vec![(key(1), false), (key(2), false)]);
        assert_eq!(
            acts.iter()
                .filter(|a| matches!(a, Action::Routes { .. }))
                .count(),
            0,
            "the route stays, only its peer changes"
        );
    }

    /// Found by the roster fuzz target: two peers trading apps in one snapshot (a gives X
    /// and takes Y, b gives Y and takes X) must never both hold one prefix in the table,
    /// whatever the upsert order, or the engine's last-claimant rule drops a prefix.
    #[test]
    fn two_peers_trading_apps_never_share_a_prefix_in_the_table() {
        let t = Instant::now();
        let (x, y): (Ipv6Addr, Ipv6Addr) = (
            "fd5a:1f02::1".parse().unwrap(),
            "fd5a:1f02::2".parse().unwrap(),
        );
        let mut m = Machine::new(config(true, vec![]));
        let (mut a, mut b) = (entry("a", 1), entry("b", 2));
        a.hosted_app_ulas = vec![x];
        b.hosted_app_ulas = vec![y];
        connect(&mut m, t, vec![a.clone(), b.clone()]);
        a.hosted_app_ulas = vec![y];
        b.hosted_app_ulas = vec![x];
        m.handle_event(t, None, snapshot(vec![a, b]));
        let mut table: BTreeMap<[u8; 32], Vec<IpNet>> = BTreeMap::new();
        table.insert(key(1), vec![ula_host("a"), IpNet::host(x.into())]);
        table.insert(key(2), vec![ula_host("b"), IpNet::host(y.into())]);
        for act in drain(&mut m) {
            if let Action::UpsertPeer { config, .. } = act {
                table.insert(config.public_key, config.allowed_ips);
                let all: Vec<&IpNet> = table.values().flatten().collect();
                let unique: BTreeSet<&IpNet> = all.iter().copied().collect();
                assert_eq!(all.len(), unique.len(), "{table:?}");
            }
        }
        assert_eq!(table[&key(1)], vec![ula_host("a"), IpNet::host(y.into())]);
        assert_eq!(table[&key(2)], vec![ula_host("b"), IpNet::host(x.into())]);
    }

    #[test]
    fn a_contested_app_goes_to_the_first_claim_not_to_the_lowest_key() {
        let t = Instant::now();
        let app: Ipv6Addr = "fd5a:1f02::7".parse().unwrap();
        let mut m = Machine::new(config(true, vec![]));
        // The incumbent has the highest key; the claimant ground the lowest one.
        let mut holder = entry("holder", 200);
        holder.hosted_app_ulas = vec![app];
        let mut grinder = entry("grinder", 0);
        grinder.hosted_app_ulas = vec![app];
        connect(&mut m, t, vec![holder.clone()]);
        m.handle_event(t, None, snapshot(vec![grinder, holder]));
        let d = m.roster().desired(&SelfView::default());
        assert!(d[&key(200)].app_ulas.contains(&app));
        assert!(d[&key(0)].app_ulas.is_empty());
    }

    #[test]
    fn a_key_rotation_replaces_the_engine_peer_keeping_its_ula_and_apps() {
        let t = Instant::now();
        let app: Ipv6Addr = "fd5a:1f02::7".parse().unwrap();
        let mut m = Machine::new(config(true, vec![]));
        let mut a = entry("a", 1);
        a.hosted_app_ulas = vec![app];
        connect(&mut m, t, vec![a.clone()]);
        a.public_key = b64(key(11));
        m.handle_event(t, None, SseEvent::PeerUpsert(a));
        let acts = drain(&mut m);
        assert!(
            matches!(&acts[0], Action::RemovePeer { public_key, .. } if *public_key == key(1)),
            "the old key goes first: {acts:?}"
        );
        let Some(Action::UpsertPeer { config, new, .. }) = acts.get(1) else {
            panic!("{acts:?}")
        };
        assert!(*new);
        assert_eq!(config.public_key, key(11));
        assert_eq!(
            config.allowed_ips,
            vec![ula_host("a"), IpNet::host(std::net::IpAddr::V6(app))]
        );
        assert_eq!(
            acts[2],
            Action::Initiate {
                public_key: key(11)
            }
        );
        assert_eq!(acts.len(), 3, "no route changes: {acts:?}");
        assert_eq!(m.refused().total(), 0);
    }

    #[test]
    fn a_key_rotation_during_grace_does_not_keep_the_old_key() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        let mut rotated = entry("a", 1);
        rotated.public_key = b64(key(11));
        let (_, acts) = reconnect(&mut m, t + SEC, vec![rotated]);
        assert_eq!(removals(&acts), vec![key(1)]);
        assert_eq!(upserts(&acts), vec![(key(11), true)]);
    }

    #[test]
    fn a_registration_answer_with_another_ula_stops_a_new_joiner() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        drain(&mut m);
        let mut r = registered(vec![entry("a", 1)]);
        r.ula = "fd5a:1f00::dead".parse().unwrap();
        m.handle_registered(t, Ok(r));
        let a = drain(&mut m);
        assert!(!a.iter().any(is_table_action), "{a:?}");
        let Some(Action::Exit(Exit::Refused(why))) = a.last() else {
            panic!("{a:?}")
        };
        assert!(why.contains("fd5a:1f00::dead"), "{why}");
        assert_eq!(m.refused().bad_registration, 1);
    }

    #[test]
    fn a_registration_answer_with_another_peer_id_after_admission_is_retried() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        connect(&mut m, t, vec![entry("a", 1)]);
        m.handle_stream_closed(t, Err(unreachable()));
        drain(&mut m);
        m.handle_timeout(m.poll_timeout().unwrap());
        drain(&mut m);
        let mut r = registered(vec![]);
        r.peer_id = pid("someone-else");
        m.handle_registered(t + SEC, Ok(r));
        let a = drain(&mut m);
        assert_eq!(a, vec![Action::CloseStream], "the table is left alone");
        assert!(matches!(m.session(), Session::Disconnected { .. }));
        assert_eq!(m.roster().entries().count(), 1);
    }

    #[test]
    fn a_forged_roster_routes_nothing_outside_the_mesh_prefixes() {
        let t = Instant::now();
        let mut m = Machine::new(config(true, vec![]));
        let mut not_derived = entry("b", 2);
        not_derived.ula = "fd5a:1f00::dead".parse().unwrap();
        let mut doc_app = entry("c", 3);
        doc_app.hosted_app_ulas = vec!["2001:db8::1".parse().unwrap()];
        let mut v4_app = entry("d", 4);
        v4_app.hosted_app_ulas = vec!["::ffff:192.0.2.1".parse().unwrap()];
        let mut dup_app_1 = entry("e", 5);
        dup_app_1.hosted_app_ulas = vec!["fd5a:1f02::5".parse().unwrap()];
        let mut dup_app_2 = entry("f", 6);
        dup_app_2.hosted_app_ulas = vec!["fd5a:1f02::5".parse().unwrap()];
        let acts = connect(
            &mut m,
            t,
            vec![
                not_derived,
                doc_app,
                v4_app,
                dup_app_1,
                dup_app_2,
                entry("me", 9),
            ],
        );
        let routes = all_routes(&acts);
        assert!(
            routes.iter().all(|n| match n.addr() {
                std::net::IpAddr::V6(a) =>
                    tabbify_api::ula::is_peer_ula(&a) || tabbify_api::ula::is_app_ula(&a),
                std::net::IpAddr::V4(_) => false,
            }),
            "{routes:?}"
        );
        assert_eq!(
            routes,
            vec![ula_host("e"), ula_host("f"), host("fd5a:1f02::5")]
                .into_iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        let r = m.refused();
        assert_eq!((r.bad_ula, r.bad_app_ula, r.duplicate_app), (1, 2, 1));
    }
}
