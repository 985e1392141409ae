//! Path selection, sans IO: per peer, whether its datagrams go straight to a direct
//! endpoint or through a relay, why, and which relay; plus which relays the joiner may use
//! at all. Every decision takes `now`; the shell ([`crate::join::shell`] with
//! [`crate::join::relay`]) applies the [`PathAction`]s to the engine (`PeerState::path`,
//! `relay`, `Handshaker::probe_direct`, `initiate`) and feeds back what the engine saw
//! ([`Observed`]).
//!
//! Rules (issue 13, paths contract):
//! * a peer starts **direct** when it has a direct candidate and neither side's NAT class
//!   rules that out; it goes to the **relay at once** when either side is
//!   `endpoint_dependent` or `udp_blocked`, when it has no candidate, or under
//!   `--force-relay` (the reason names it);
//! * a direct start that completes no direct handshake within [`DIRECT_WINDOW`] goes to
//!   the relay ("no direct handshake after 1.5 s") and the handshake is re-sent through the
//!   relay at once ([`PathAction::Initiate`]), so the first packet passes within 3 s;
//! * while relayed (not forced), every [`PROBE_EVERY`] one direct probe goes straight to
//!   each direct candidate ([`PathAction::Probe`]: a ping inside the session, or a
//!   handshake initiation without one); the engine upgrades the peer to direct only when
//!   an answer to *its own* probe arrives directly (the round trip went direct both ways,
//!   `tabbify_engine::core::path`), which [`Paths::observe`] learns. The peer's data,
//!   keepalives and probes arriving directly do not upgrade: with only the peer → us
//!   direction open they would black-hole our sends;
//! * while direct, a direct path silent for longer than [`DIRECT_SILENT`] (one persistent
//!   keepalive plus a handshake timeout) falls back to the relay; the WireGuard session is
//!   kept (only where datagrams go changes);
//! * after an underlay change every relayed peer is probed at once and every direct peer
//!   re-handshakes and must answer within [`DIRECT_WINDOW`].
//!
//! Invariants (an attacker's view):
//! * relays come only from `--relay` flags and the coordinator's advertised list, each
//!   checked by [`check_relay_url`]: `https://HOST:PORT` only; a relay the coordinator
//!   advertises may not be a loopback, link-local, unspecified, multicast or mesh address
//!   (the shell checks the resolved addresses again with [`relay_ip_allowed`]); at most
//!   [`MAX_RELAYS`] are kept;
//! * a roster `home_relay` outside that set is ignored (the peer is reached through our
//!   own home relay instead, where it may also hold a session), so a coordinator cannot
//!   make the joiner connect anywhere it did not advertise; at most [`MAX_SESSIONS`] relay
//!   sessions are wanted at once, the home relay first;
//! * a peer's NAT class (its own claim, through the coordinator) only decides the *start*:
//!   probes continue while relayed, and a working direct path (direct receipt within
//!   [`DIRECT_SILENT`]) is never abandoned because of a claim.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tabbify_api::NatClass;

use super::roster::usable_endpoint;

/// A direct start must see a direct handshake completed within this long.
pub const DIRECT_WINDOW: Duration = Duration::from_millis(1500);
/// While relayed, probe each direct candidate this often: half the 1 s bound for
/// switching to a direct path once it works, so one probe interval plus a round trip fits.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A direct path with no authenticated direct receipt for this long falls back to the
/// relay: the persistent keepalive (25 s, [`super::roster::KEEPALIVE_SECS`]) plus a
/// handshake timeout (5 s).
pub const DIRECT_SILENT: Duration = Duration::from_secs(super::roster::KEEPALIVE_SECS as u64 + 5);
/// Most relays kept from flags and advertisements together.
pub const MAX_RELAYS: usize = 16;
/// Most relay sessions wanted at once (the home relay and peers' home relays).
pub const MAX_SESSIONS: usize = 4;
/// Most direct candidates probed per peer per round.
pub const MAX_PROBES: usize = 4;

/// Whether a roster hint (a new roster endpoint, a hole-punch notice) may replace the
/// engine's current direct endpoint for a peer: not while that endpoint is *proven*, i.e.
/// an authenticated datagram arrived straight from it within [`DIRECT_SILENT`]
/// (`since_direct_rx`: time since that receipt, `None` if never). The endpoint the engine
/// learned by roaming is where the peer really is (behind an endpoint-dependent NAT it is
/// a port the coordinator never saw); overwriting it with the roster's would send into a
/// closed mapping until the peer's next packet roams it back (up to a persistent
/// keepalive, 25 s). A peer that really moved re-handshakes from its new address, and
/// that authenticated receipt moves the endpoint (WireGuard roaming), so keeping a proven
/// endpoint never strands one.
pub fn roster_may_set_endpoint(since_direct_rx: Option<Duration>) -> bool {
    since_direct_rx.is_none_or(|d| d >= DIRECT_SILENT)
}

/// Where a peer's datagrams go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Path {
    /// Straight to its endpoint.
    #[default]
    Direct,
    /// Through a relay.
    Relay,
}

impl Path {
    /// `"direct"` or `"relay"` (as `peers --json` says it).
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "relay",
        }
    }
}

/// Why a peer is relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `--force-relay`.
    Forced,
    /// Our STUN probe found no answer.
    UdpBlockedHere,
    /// Our NAT maps per destination.
    EndpointDependentHere,
    /// The peer reports UDP blocked.
    PeerUdpBlocked,
    /// The peer reports an endpoint-dependent NAT.
    PeerEndpointDependent,
    /// The roster gives no direct endpoint for the peer.
    NoDirectCandidate,
    /// A direct attempt saw no handshake within [`DIRECT_WINDOW`].
    NoDirectHandshake,
    /// The direct path went silent for [`DIRECT_SILENT`].
    DirectSilent,
}

impl Reason {
    /// In words, for `peers --json` and `status`.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Forced => "relay forced (--force-relay)",
            Reason::UdpBlockedHere => "UDP blocked here",
            Reason::EndpointDependentHere => "endpoint-dependent NAT here",
            Reason::PeerUdpBlocked => "UDP blocked at the peer",
            Reason::PeerEndpointDependent => "peer behind an endpoint-dependent NAT",
            Reason::NoDirectCandidate => "no direct endpoint known for the peer",
            Reason::NoDirectHandshake => "no direct handshake after 1.5 s",
            Reason::DirectSilent => "direct path silent for 30 s",
        }
    }
}

/// Where a relay URL came from (what it is trusted for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--relay URL` on our command line: the operator's choice (loopback allowed).
    Configured,
    /// The coordinator's `relays` list.
    Advertised,
}

/// A checked relay URL: `https://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayUrl {
    /// The URL as given (the relay's identity everywhere).
    pub url: String,
    /// The TLS server name (a DNS name or an IP literal without brackets).
    pub host: String,
    /// TCP and UDP port.
    pub port: u16,
    /// Where it came from.
    pub origin: Origin,
}

impl RelayUrl {
    /// `host:port` for connecting (IPv6 literals bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Longest relay URL accepted.
pub const MAX_URL_LEN: usize = 256;

/// Checks a relay URL: `https://HOST:PORT` (a trailing `/` allowed, nothing else after
/// the port; no user info). An advertised relay's host may not be a loopback,
/// link-local, unspecified, multicast or mesh address, nor `localhost`.
pub fn check_relay_url(url: &str, origin: Origin) -> Result<RelayUrl, String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("relay URL longer than {MAX_URL_LEN} bytes"));
    }
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("relay URL {url:?} is not https://HOST:PORT"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?', '#']) || rest.chars().any(|c| c.is_whitespace()) {
        return Err(format!("relay URL {url:?} is not https://HOST:PORT"));
    }
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r
            .split_once("]:")
            .ok_or_else(|| format!("relay URL {url:?} has no port"))?;
        (h, p)
    } else {
        rest.rsplit_once(':')
            .ok_or_else(|| format!("relay URL {url:?} has no port"))?
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("relay URL {url:?} has no valid port"))?;
    if host.is_empty() {
        return Err(format!("relay URL {url:?} has no host"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        if origin == Origin::Advertised && !relay_ip_allowed(ip) {
            return Err(format!(
                "relay URL {url:?}: {ip} is not a public relay address"
            ));
        }
    } else {
        let ok = host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !ok {
            return Err(format!("relay URL {url:?}: {host:?} is not a host name"));
        }
        let lower = host.to_ascii_lowercase();
        if origin == Origin::Advertised && (lower == "localhost" || lower.ends_with(".localhost")) {
            return Err(format!("relay URL {url:?}: localhost is not a relay"));
        }
    }
    Ok(RelayUrl {
        url: url.to_owned(),
        host: host.to_owned(),
        port,
        origin,
    })
}

/// Whether a coordinator-advertised relay may resolve to `ip`: not loopback, link-local,
/// unspecified, multicast, broadcast, nor in the mesh's own prefixes.
pub fn relay_ip_allowed(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let port_ok = usable_endpoint(&SocketAddr::new(ip, 1));
    port_ok
        && match ip {
            IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local()),
            IpAddr::V6(v6) => !(v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80),
        }
}

/// The home relay among latency measurements (`None` = unreachable): the lowest, but a
/// current home stays unless another is faster by more than 20% and 5 ms (no flapping).
pub fn choose_home(
    measured: &[(String, Option<Duration>)],
    current: Option<&str>,
) -> Option<String> {
    let best = measured
        .iter()
        .filter_map(|(u, d)| d.map(|d| (u, d)))
        .min_by_key(|(_, d)| *d)?;
    if let Some(cur) = current {
        if let Some((_, Some(cd))) = measured.iter().find(|(u, _)| u == cur) {
            let margin = (*cd / 5).max(Duration::from_millis(5));
            if best.1 + margin >= *cd {
                return Some(cur.to_owned());
            }
        }
    }
    Some(best.0.clone())
}

/// What the roster says about a peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerFacts {
    /// Direct candidates (the chosen endpoint first, then mapped, reflexive, reported).
    pub candidates: Vec<SocketAddr>,
    /// Its NAT class (its claim).
    pub nat: NatClass,
    /// Its home relay (its claim, through the coordinator).
    pub home_relay: Option<String>,
}

/// What the engine saw of a peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The engine's path now (it upgrades Relay → Direct when its direct probe is answered
    /// directly).
    pub path: Path,
    /// The last authenticated direct receipt.
    pub last_direct_rx: Option<Instant>,
}

/// One thing for the shell to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathAction {
    /// Send to the peer's direct endpoint.
    UseDirect {
        /// The peer.
        key: [u8; 32],
    },
    /// Send through `relay` (a session there, then LOOKUP of the peer's key); then
    /// re-send the handshake through it at once.
    UseRelay {
        /// The peer.
        key: [u8; 32],
        /// The relay URL (in the allowed set).
        relay: String,
        /// Pin it there (`--force-relay`): the engine never upgrades it.
        pinned: bool,
    },
    /// Send one authenticated datagram straight to `dst` (the engine's `probe_direct`).
    Probe {
        /// The peer.
        key: [u8; 32],
        /// A direct candidate.
        dst: SocketAddr,
    },
    /// Re-handshake now over the path in use.
    Initiate {
        /// The peer.
        key: [u8; 32],
    },
}

/// A peer's path as `peers` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    /// The path in use.
    pub path: Path,
    /// The relay URL when relayed.
    pub relay: Option<String>,
    /// Why it is relayed (or why it wants to be and cannot: no relay).
    pub reason: Option<Reason>,
}

#[derive(Clone, Debug)]
struct PeerPath {
    facts: PeerFacts,
    path: Path,
    /// Why the peer wants the relay (set even when no relay is available).
    want: Option<Reason>,
    relay: Option<String>,
    /// A direct attempt began here; a direct receipt newer than `baseline` (the last one
    /// seen when it began) must come within the window. A new peer's baseline is none: its
    /// first handshake may complete before the path manager first sees it.
    attempt: Option<Instant>,
    baseline: Option<Instant>,
    next_probe: Instant,
    last_direct_rx: Option<Instant>,
    /// When it last went to the relay: only a direct receipt after this proves the engine
    /// upgraded it (an engine still direct because the switch is not applied yet does not).
    relay_since: Option<Instant>,
}

/// Path selection for every peer.
#[derive(Debug)]
pub struct Paths {
    force_relay: bool,
    own_nat: NatClass,
    relays: Vec<RelayUrl>,
    home: Option<String>,
    peers: BTreeMap<[u8; 32], PeerPath>,
    actions: VecDeque<PathAction>,
    ignored_home_relays: u64,
}

impl Paths {
    /// No relays, no peers.
    pub fn new(force_relay: bool) -> Self {
        Paths {
            force_relay,
            own_nat: NatClass::Unknown,
            relays: Vec::new(),
            home: None,
            peers: BTreeMap::new(),
            actions: VecDeque::new(),
            ignored_home_relays: 0,
        }
    }

    /// The relays to use: `configured` (`--relay`) then `advertised` (the coordinator's),
    /// each checked, deduplicated, at most [`MAX_RELAYS`]. Returns the refused ones with
    /// the reason. A home relay no longer in the set is dropped.
    pub fn set_relays(
        &mut self,
        configured: &[String],
        advertised: &[String],
        now: Instant,
    ) -> Vec<String> {
        let mut out: Vec<RelayUrl> = Vec::new();
        let mut refused = Vec::new();
        let all = configured
            .iter()
            .map(|u| (u, Origin::Configured))
            .chain(advertised.iter().map(|u| (u, Origin::Advertised)));
        for (u, origin) in all {
            if out.iter().any(|r| &r.url == u) {
                continue;
            }
            if out.len() >= MAX_RELAYS {
                refused.push(format!("relay {u:?}: more than {MAX_RELAYS} relays"));
                continue;
            }
            match check_relay_url(u, origin) {
                Ok(r) => out.push(r),
                Err(e) => refused.push(e),
            }
        }
        self.relays = out;
        if let Some(h) = &self.home {
            if !self.allowed(h) {
                self.home = None;
            }
        }
        self.reevaluate(now);
        refused
    }

    /// The relays in use.
    pub fn relays(&self) -> &[RelayUrl] {
        &self.relays
    }

    /// The relay `url` if it is in the set.
    pub fn relay(&self, url: &str) -> Option<&RelayUrl> {
        self.relays.iter().find(|r| r.url == url)
    }

    fn allowed(&self, url: &str) -> bool {
        self.relays.iter().any(|r| r.url == url)
    }

    /// Our home relay (a session there is up), or none. Ignored unless in the set.
    pub fn set_home(&mut self, home: Option<String>, now: Instant) {
        let home = home.filter(|h| self.allowed(h));
        if home != self.home {
            self.home = home;
            self.reevaluate(now);
        }
    }

    /// Our home relay.
    pub fn home(&self) -> Option<&str> {
        self.home.as_deref()
    }

    /// Our NAT class from the STUN probe.
    pub fn set_own_nat(&mut self, nat: NatClass, now: Instant) {
        if nat != self.own_nat {
            self.own_nat = nat;
            self.reevaluate(now);
        }
    }

    /// Roster home relays refused for not being in the set.
    pub fn ignored_home_relays(&self) -> u64 {
        self.ignored_home_relays
    }

    /// A peer appeared or its roster entry changed. A new peer starts direct (a direct
    /// attempt, the machine's first initiation, begins `now`) or relayed by the rules.
    pub fn upsert_peer(&mut self, key: [u8; 32], facts: PeerFacts, now: Instant) {
        if let Some(h) = &facts.home_relay {
            let known = self
                .peers
                .get(&key)
                .and_then(|p| p.facts.home_relay.as_ref());
            if !self.allowed(h) && known != Some(h) {
                self.ignored_home_relays += 1;
                tracing::warn!(relay = %h, "a peer's home relay is not one we may use; ignored");
            }
        }
        match self.peers.get_mut(&key) {
            Some(p) => {
                if p.facts == facts {
                    return;
                }
                p.facts = facts;
            }
            None => {
                self.peers.insert(
                    key,
                    PeerPath {
                        facts,
                        path: Path::Direct,
                        want: None,
                        relay: None,
                        attempt: Some(now),
                        baseline: None,
                        next_probe: now,
                        last_direct_rx: None,
                        relay_since: None,
                    },
                );
            }
        }
        self.decide(key, now);
    }

    /// The peers tracked.
    pub fn peers(&self) -> Vec<[u8; 32]> {
        self.peers.keys().copied().collect()
    }

    /// A peer left the roster.
    pub fn remove_peer(&mut self, key: &[u8; 32]) {
        self.peers.remove(key);
    }

    /// What the engine saw of `key`: its path (an upgrade to direct it made when its direct
    /// probe was answered directly) and the last direct receipt.
    pub fn observe(&mut self, key: &[u8; 32], seen: Observed, _now: Instant) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        let newer = seen.last_direct_rx > p.last_direct_rx;
        if newer {
            p.last_direct_rx = seen.last_direct_rx;
            // Still direct (no relay was available): a direct receipt answers a failed
            // attempt or a silence.
            if p.path == Path::Direct
                && matches!(
                    p.want,
                    Some(Reason::NoDirectHandshake | Reason::DirectSilent)
                )
            {
                p.want = None;
            }
        }
        if p.attempt.is_some() && p.last_direct_rx > p.baseline {
            p.attempt = None;
        }
        let upgraded = seen.path == Path::Direct
            && seen
                .last_direct_rx
                .is_some_and(|rx| p.relay_since.is_none_or(|s| rx >= s));
        if p.path == Path::Relay && upgraded && !self.force_relay {
            // The engine upgraded on a direct answer to its probe: open both ways.
            p.path = Path::Direct;
            p.want = None;
            p.relay = None;
            p.attempt = None;
        }
    }

    /// The network under us changed: probe every relayed peer at once, re-handshake every
    /// direct one and give it [`DIRECT_WINDOW`] to answer directly.
    pub fn underlay_changed(&mut self, now: Instant) {
        for (key, p) in &mut self.peers {
            match p.path {
                Path::Relay => p.next_probe = now,
                Path::Direct => {
                    p.attempt = Some(now);
                    p.baseline = p.last_direct_rx;
                    self.actions.push_back(PathAction::Initiate { key: *key });
                }
            }
        }
    }

    /// Timers: direct attempts that saw no handshake, silent direct paths, probes.
    pub fn handle_timeout(&mut self, now: Instant) {
        let keys: Vec<[u8; 32]> = self.peers.keys().copied().collect();
        for key in keys {
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            match p.path {
                Path::Direct => {
                    let why = if p.attempt.is_some_and(|a| now >= a + DIRECT_WINDOW) {
                        Some(Reason::NoDirectHandshake)
                    } else if p.attempt.is_none()
                        && p.last_direct_rx.is_some_and(|rx| now >= rx + DIRECT_SILENT)
                    {
                        Some(Reason::DirectSilent)
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        p.want = Some(why);
                        p.attempt = None;
                        self.apply_want(key, now);
                    }
                }
                Path::Relay => {
                    if self.force_relay || now < p.next_probe {
                        continue;
                    }
                    for dst in p.facts.candidates.iter().take(MAX_PROBES) {
                        self.actions.push_back(PathAction::Probe { key, dst: *dst });
                    }
                    p.next_probe = now + PROBE_EVERY;
                }
            }
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<PathAction> {
        self.actions.pop_front()
    }

    /// When [`Paths::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| match p.path {
                Path::Direct => match (p.attempt, p.last_direct_rx) {
                    (Some(a), _) => Some(a + DIRECT_WINDOW),
                    (None, Some(rx)) => Some(rx + DIRECT_SILENT),
                    (None, None) => None,
                },
                Path::Relay if !self.force_relay && !p.facts.candidates.is_empty() => {
                    Some(p.next_probe)
                }
                Path::Relay => None,
            })
            .min()
    }

    /// A peer's path for `peers`.
    pub fn view(&self, key: &[u8; 32]) -> Option<PeerView> {
        self.peers.get(key).map(|p| PeerView {
            path: p.path,
            relay: p.relay.clone(),
            reason: p.want,
        })
    }

    /// (direct, relayed) peer counts for the heartbeat.
    pub fn counts(&self) -> (u32, u32) {
        let relay = self
            .peers
            .values()
            .filter(|p| p.path == Path::Relay)
            .count();
        let n = u32::try_from(self.peers.len()).unwrap_or(u32::MAX);
        let relay = u32::try_from(relay).unwrap_or(u32::MAX);
        (n - relay, relay)
    }

    /// The relays a session is wanted at: the home relay first, then the relays of
    /// relayed peers; at most [`MAX_SESSIONS`].
    pub fn wanted_sessions(&self) -> Vec<String> {
        let mut out: Vec<String> = self.home.iter().cloned().collect();
        for p in self.peers.values() {
            if let Some(r) = &p.relay {
                if !out.contains(r) && out.len() < MAX_SESSIONS {
                    out.push(r.clone());
                }
            }
        }
        out
    }

    /// The relay to reach a peer through: its home relay if we may use it and a session
    /// slot is free for it, else our own home relay.
    fn relay_for(&self, key: &[u8; 32]) -> Option<String> {
        let p = self.peers.get(key)?;
        if let Some(h) = p.facts.home_relay.as_ref().filter(|h| self.allowed(h)) {
            let in_use = self.wanted_sessions();
            if in_use.contains(h) || in_use.len() < MAX_SESSIONS {
                return Some(h.clone());
            }
        }
        self.home.clone()
    }

    /// The start rules: a reason to relay at once, or none (try direct).
    fn start_reason(&self, p: &PeerPath) -> Option<Reason> {
        if self.force_relay {
            return Some(Reason::Forced);
        }
        // A working direct path is never abandoned for a claim.
        if p.path == Path::Direct && p.attempt.is_none() && p.last_direct_rx.is_some() {
            return None;
        }
        match self.own_nat {
            NatClass::UdpBlocked => return Some(Reason::UdpBlockedHere),
            NatClass::EndpointDependent => return Some(Reason::EndpointDependentHere),
            _ => {}
        }
        match p.facts.nat {
            NatClass::UdpBlocked => return Some(Reason::PeerUdpBlocked),
            NatClass::EndpointDependent => return Some(Reason::PeerEndpointDependent),
            _ => {}
        }
        if p.facts.candidates.is_empty() {
            return Some(Reason::NoDirectCandidate);
        }
        None
    }

    fn decide(&mut self, key: [u8; 32], now: Instant) {
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        let start = self.start_reason(p);
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        match (start, p.want) {
            (Some(r), _) => p.want = Some(r),
            // Only start reasons are lifted here; a failed attempt or silence stays until
            // the engine sees a direct receipt.
            (
                None,
                Some(
                    Reason::Forced
                    | Reason::UdpBlockedHere
                    | Reason::EndpointDependentHere
                    | Reason::PeerUdpBlocked
                    | Reason::PeerEndpointDependent
                    | Reason::NoDirectCandidate,
                ),
            ) => {
                if p.path == Path::Relay {
                    // Try direct again at once, with the relay as a net (it stays, and so
                    // does its reason, until the engine sees a direct receipt).
                    p.next_probe = now;
                } else {
                    p.want = None;
                }
            }
            (None, _) => {}
        }
        self.apply_want(key, now);
    }

    /// Moves a peer to the relay it wants (when one is available).
    fn apply_want(&mut self, key: [u8; 32], now: Instant) {
        if self.peers.get(&key).and_then(|p| p.want).is_none() {
            return;
        }
        let relay = self.relay_for(&key);
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let Some(relay) = relay else {
            // No relay to go to: stay direct and keep trying; the reason stays visible.
            if p.path == Path::Relay {
                p.path = Path::Direct;
                p.relay = None;
                self.actions.push_back(PathAction::UseDirect { key });
            }
            return;
        };
        if p.path == Path::Relay && p.relay.as_ref() == Some(&relay) {
            return;
        }
        p.path = Path::Relay;
        p.relay = Some(relay.clone());
        p.next_probe = now + PROBE_EVERY;
        p.relay_since = Some(now);
        self.actions.push_back(PathAction::UseRelay {
            key,
            relay,
            pinned: self.force_relay,
        });
        self.actions.push_back(PathAction::Initiate { key });
    }

    fn reevaluate(&mut self, now: Instant) {
        let keys: Vec<[u8; 32]> = self.peers.keys().copied().collect();
        for key in keys {
            // A peer whose relay left the set (or which had none) is placed again.
            if let Some(p) = self.peers.get_mut(&key) {
                if p.path == Path::Relay
                    && p.relay
                        .as_ref()
                        .is_some_and(|r| !self.relays.iter().any(|x| &x.url == r))
                {
                    p.relay = None;
                    p.path = Path::Direct;
                    self.actions.push_back(PathAction::UseDirect { key });
                }
            }
            self.decide(key, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proven_endpoint_is_not_overwritten_by_a_roster_hint() {
        assert!(roster_may_set_endpoint(None));
        assert!(!roster_may_set_endpoint(Some(Duration::ZERO)));
        assert!(!roster_may_set_endpoint(Some(
            DIRECT_SILENT - Duration::from_millis(1)
        )));
        assert!(roster_may_set_endpoint(Some(DIRECT_SILENT)));
    }

    const A: [u8; 32] = [1; 32];
    const R1: &str = "https://relay1.example.net:443";
    const R2: &str = "https://relay2.example.net:8443";

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn facts(nat: NatClass) -> PeerFacts {
        PeerFacts {
            candidates: vec![ep("198.51.100.7:51820")],
            nat,
            home_relay: None,
        }
    }

    fn with_relay(force: bool, now: Instant) -> Paths {
        let mut p = Paths::new(force);
        assert!(p.set_relays(&[R1.to_owned()], &[], now).is_empty());
        p.set_home(Some(R1.to_owned()), now);
        p
    }

    fn drain(p: &mut Paths) -> Vec<PathAction> {
        std::iter::from_fn(|| p.poll_action()).collect()
    }

    fn use_relay(relay: &str) -> PathAction {
        PathAction::UseRelay {
            key: A,
            relay: relay.to_owned(),
            pinned: false,
        }
    }

    #[test]
    fn relay_urls_are_checked() {
        let c = Origin::Configured;
        let a = Origin::Advertised;
        let r = check_relay_url("https://relay.example.net:443", a).unwrap();
        assert_eq!((r.host.as_str(), r.port), ("relay.example.net", 443));
        assert_eq!(r.authority(), "relay.example.net:443");
        let r = check_relay_url("https://[2001:db8::1]:8443/", a).unwrap();
        assert_eq!(r.authority(), "[2001:db8::1]:8443");
        for bad in [
            "http://relay.example.net:443",
            "relay.example.net:443",
            "https://relay.example.net",
            "https://relay.example.net:0",
            "https://relay.example.net:99999",
            "https://user@relay.example.net:443",
            "https://relay.example.net:443/path",
            "https://:443",
            "https://rel ay:443",
        ] {
            assert!(check_relay_url(bad, c).is_err(), "{bad}");
        }
        // Loopback is the operator's choice on the command line, never the coordinator's.
        assert!(check_relay_url("https://127.0.0.1:8443", c).is_ok());
        for bad in [
            "https://127.0.0.1:8443",
            "https://[::1]:8443",
            "https://169.254.1.1:443",
            "https://[fe80::1]:443",
            "https://0.0.0.0:443",
            "https://224.0.0.1:443",
            "https://[fd5a:1f00::1]:443",
            "https://[fd5a:1f02::1]:443",
            "https://[::ffff:127.0.0.1]:443",
            "https://localhost:443",
            "https://x.localhost:443",
        ] {
            assert!(check_relay_url(bad, a).is_err(), "{bad}");
        }
        assert!(check_relay_url(&format!("https://{}:1", "a".repeat(300)), c).is_err());
    }

    #[test]
    fn relays_are_deduplicated_and_capped() {
        let now = Instant::now();
        let mut p = Paths::new(false);
        let many: Vec<String> = (0..20)
            .map(|i| format!("https://r{i}.example.net:443"))
            .collect();
        let refused = p.set_relays(&[R1.to_owned()], &[vec![R1.to_owned()], many].concat(), now);
        assert_eq!(p.relays().len(), MAX_RELAYS);
        assert_eq!(p.relays()[0].origin, Origin::Configured);
        assert_eq!(refused.len(), 20 - (MAX_RELAYS - 1));
    }

    #[test]
    fn home_relay_is_the_fastest_with_hysteresis() {
        let ms = Duration::from_millis;
        let m = vec![
            ("a".to_owned(), Some(ms(30))),
            ("b".to_owned(), Some(ms(20))),
            ("c".to_owned(), None),
        ];
        assert_eq!(choose_home(&m, None).as_deref(), Some("b"));
        // 30 vs 20: faster by more than 20% and 5 ms, switch.
        assert_eq!(choose_home(&m, Some("a")).as_deref(), Some("b"));
        let m2 = vec![
            ("a".to_owned(), Some(ms(22))),
            ("b".to_owned(), Some(ms(20))),
        ];
        assert_eq!(choose_home(&m2, Some("a")).as_deref(), Some("a"));
        // The current one unreachable: move.
        let m3 = vec![("a".to_owned(), None), ("b".to_owned(), Some(ms(50)))];
        assert_eq!(choose_home(&m3, Some("a")).as_deref(), Some("b"));
        assert_eq!(choose_home(&[("a".to_owned(), None)], None), None);
    }

    #[test]
    fn a_direct_start_that_handshakes_stays_direct() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        p.upsert_peer(A, facts(NatClass::EndpointIndependent), now);
        assert!(drain(&mut p).is_empty());
        assert_eq!(p.view(&A).unwrap().path, Path::Direct);
        assert_eq!(p.poll_timeout(), Some(now + DIRECT_WINDOW));
        let t = now + Duration::from_millis(200);
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(t),
            },
            t,
        );
        p.handle_timeout(now + DIRECT_WINDOW);
        assert!(drain(&mut p).is_empty());
        assert_eq!(p.view(&A).unwrap().reason, None);
        assert_eq!(p.counts(), (1, 0));
        assert_eq!(p.poll_timeout(), Some(t + DIRECT_SILENT));
    }

    #[test]
    fn no_direct_handshake_in_the_window_goes_to_the_relay_and_re_handshakes() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        p.upsert_peer(A, facts(NatClass::EndpointIndependent), now);
        p.handle_timeout(now + Duration::from_millis(1400));
        assert!(drain(&mut p).is_empty());
        let t = now + DIRECT_WINDOW;
        p.handle_timeout(t);
        assert_eq!(
            drain(&mut p),
            vec![use_relay(R1), PathAction::Initiate { key: A }]
        );
        let v = p.view(&A).unwrap();
        assert_eq!(v.path, Path::Relay);
        assert_eq!(v.relay.as_deref(), Some(R1));
        assert_eq!(v.reason, Some(Reason::NoDirectHandshake));
        assert_eq!(
            v.reason.unwrap().describe(),
            "no direct handshake after 1.5 s"
        );
        assert_eq!(p.counts(), (0, 1));
        assert_eq!(p.wanted_sessions(), vec![R1.to_owned()]);
        // While relayed: probes to each candidate every PROBE_EVERY.
        assert_eq!(p.poll_timeout(), Some(t + PROBE_EVERY));
        p.handle_timeout(t + PROBE_EVERY);
        assert_eq!(
            drain(&mut p),
            vec![PathAction::Probe {
                key: A,
                dst: ep("198.51.100.7:51820")
            }]
        );
        p.handle_timeout(t + PROBE_EVERY + PROBE_EVERY / 2);
        assert!(drain(&mut p).is_empty());
        p.handle_timeout(t + 2 * PROBE_EVERY);
        assert_eq!(drain(&mut p).len(), 1);
    }

    #[test]
    fn the_engine_upgrade_to_direct_is_followed() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        p.upsert_peer(A, facts(NatClass::EndpointIndependent), now);
        p.handle_timeout(now + DIRECT_WINDOW);
        drain(&mut p);
        let t = now + Duration::from_secs(3);
        // Still relayed in the engine: nothing changes.
        p.observe(
            &A,
            Observed {
                path: Path::Relay,
                last_direct_rx: None,
            },
            t,
        );
        assert_eq!(p.view(&A).unwrap().path, Path::Relay);
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(t),
            },
            t,
        );
        let v = p.view(&A).unwrap();
        assert_eq!((v.path, v.relay, v.reason), (Path::Direct, None, None));
        assert!(p.wanted_sessions() == vec![R1.to_owned()]);
    }

    /// The engine still says direct right after the switch (the shell has not applied it
    /// yet, or an old direct receipt): that is no upgrade.
    /// The first handshake can complete before the path manager first sees the peer (the
    /// machine initiates when it adds the peer): that receipt counts.
    #[test]
    fn a_handshake_before_the_manager_saw_the_peer_counts() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        let t = now + Duration::from_millis(200);
        p.upsert_peer(A, facts(NatClass::None), t);
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(now),
            },
            t,
        );
        p.handle_timeout(t + DIRECT_WINDOW);
        assert!(drain(&mut p).is_empty());
        assert_eq!(p.view(&A).unwrap().path, Path::Direct);
        // After an underlay change only a newer receipt counts.
        p.underlay_changed(t + Duration::from_secs(2));
        drain(&mut p);
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(now),
            },
            t,
        );
        p.handle_timeout(t + Duration::from_secs(2) + DIRECT_WINDOW);
        assert!(matches!(
            drain(&mut p)[..],
            [PathAction::UseRelay { .. }, PathAction::Initiate { .. }]
        ));
    }

    #[test]
    fn a_stale_direct_observation_does_not_undo_the_switch() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        p.upsert_peer(A, facts(NatClass::EndpointDependent), now);
        assert_eq!(drain(&mut p).len(), 2);
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: None,
            },
            now,
        );
        assert_eq!(p.view(&A).unwrap().path, Path::Relay);
        let old = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        let later = now + Duration::from_millis(1);
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(old),
            },
            later,
        );
        let v = p.view(&A).unwrap();
        assert_eq!(
            (v.path, v.reason),
            (Path::Relay, Some(Reason::PeerEndpointDependent))
        );
    }

    #[test]
    fn a_silent_direct_path_falls_back_to_the_relay_keeping_the_session() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        p.upsert_peer(A, facts(NatClass::None), now);
        let rx = now + Duration::from_millis(100);
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(rx),
            },
            rx,
        );
        p.handle_timeout(rx + DIRECT_SILENT - Duration::from_millis(1));
        assert!(drain(&mut p).is_empty());
        p.handle_timeout(rx + DIRECT_SILENT);
        // The session is kept: the relay carries it (a handshake re-sent through it).
        assert_eq!(
            drain(&mut p),
            vec![use_relay(R1), PathAction::Initiate { key: A }]
        );
        assert_eq!(p.view(&A).unwrap().reason, Some(Reason::DirectSilent));
    }

    #[test]
    fn nat_classes_relay_at_once_and_name_the_reason() {
        for (own, peer, why) in [
            (NatClass::UdpBlocked, NatClass::None, Reason::UdpBlockedHere),
            (
                NatClass::EndpointDependent,
                NatClass::None,
                Reason::EndpointDependentHere,
            ),
            (NatClass::None, NatClass::UdpBlocked, Reason::PeerUdpBlocked),
            (
                NatClass::Unknown,
                NatClass::EndpointDependent,
                Reason::PeerEndpointDependent,
            ),
        ] {
            let now = Instant::now();
            let mut p = with_relay(false, now);
            p.set_own_nat(own, now);
            p.upsert_peer(A, facts(peer), now);
            assert_eq!(
                drain(&mut p),
                vec![use_relay(R1), PathAction::Initiate { key: A }]
            );
            assert_eq!(p.view(&A).unwrap().reason, Some(why));
        }
        assert_eq!(
            Reason::PeerEndpointDependent.describe(),
            "peer behind an endpoint-dependent NAT"
        );
        assert_eq!(Reason::UdpBlockedHere.describe(), "UDP blocked here");
        // No candidate at all.
        let now = Instant::now();
        let mut p = with_relay(false, now);
        p.upsert_peer(A, PeerFacts::default(), now);
        assert_eq!(p.view(&A).unwrap().reason, Some(Reason::NoDirectCandidate));
        assert_eq!(p.poll_timeout(), None);
    }

    /// The attacker: a member (or the coordinator for it) claims an endpoint-dependent
    /// NAT to keep us off a direct path. Probes continue, the engine's upgrade on a direct
    /// receipt is followed, and a working direct path is not abandoned for the claim.
    #[test]
    fn a_claimed_endpoint_dependent_nat_cannot_keep_us_off_a_working_direct_path() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        p.upsert_peer(A, facts(NatClass::EndpointDependent), now);
        drain(&mut p);
        p.handle_timeout(now + PROBE_EVERY);
        assert!(matches!(drain(&mut p)[..], [PathAction::Probe { .. }]));
        let t = now + Duration::from_millis(1200);
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(t),
            },
            t,
        );
        assert_eq!(p.view(&A).unwrap().path, Path::Direct);
        // The claim repeated in the next roster (another field changed): still direct.
        let mut f = facts(NatClass::EndpointDependent);
        f.candidates.push(ep("198.51.100.8:51820"));
        p.upsert_peer(A, f, t + Duration::from_secs(1));
        assert!(drain(&mut p).is_empty());
        assert_eq!(p.view(&A).unwrap().path, Path::Direct);
        // Hours later the claim still does not apply while direct receipts continue.
        let mut rx = t;
        for _ in 0..1000 {
            rx += Duration::from_secs(20);
            p.observe(
                &A,
                Observed {
                    path: Path::Direct,
                    last_direct_rx: Some(rx),
                },
                rx,
            );
            p.handle_timeout(rx);
        }
        assert!(drain(&mut p).is_empty());
        assert_eq!(p.view(&A).unwrap().path, Path::Direct);
    }

    /// The attacker: a malicious coordinator gives a peer a home relay it never
    /// advertised (its own server, or an internal address). It is ignored and counted;
    /// the peer is reached through our home relay; no session is wanted there.
    #[test]
    fn a_home_relay_outside_the_set_is_ignored() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        for evil in [
            "https://evil.example.net:443",
            "https://127.0.0.1:22",
            "http://relay1.example.net:443",
        ] {
            let mut f = facts(NatClass::EndpointDependent);
            f.home_relay = Some(evil.to_owned());
            p.upsert_peer(A, f, now);
            drain(&mut p);
            assert_eq!(p.view(&A).unwrap().relay.as_deref(), Some(R1), "{evil}");
            assert_eq!(p.wanted_sessions(), vec![R1.to_owned()]);
            p.remove_peer(&A);
        }
        assert_eq!(p.ignored_home_relays(), 3);
        // An advertised loopback relay is refused at the list.
        let refused = p.set_relays(&[R1.to_owned()], &["https://127.0.0.1:443".to_owned()], now);
        assert_eq!(refused.len(), 1);
        // A peer's home relay in the set is used.
        p.set_relays(&[R1.to_owned()], &[R2.to_owned()], now);
        let mut f = facts(NatClass::EndpointDependent);
        f.home_relay = Some(R2.to_owned());
        p.upsert_peer(A, f, now);
        assert_eq!(
            drain(&mut p),
            vec![use_relay(R2), PathAction::Initiate { key: A }]
        );
        assert_eq!(p.wanted_sessions(), vec![R1.to_owned(), R2.to_owned()]);
    }

    /// The attacker: a coordinator advertises many relays and gives each peer another
    /// one; sessions stay capped and the surplus peers use our home relay.
    #[test]
    fn relay_sessions_are_capped() {
        let now = Instant::now();
        let mut p = Paths::new(false);
        let many: Vec<String> = (0..10)
            .map(|i| format!("https://r{i}.example.net:443"))
            .collect();
        p.set_relays(&[], &many, now);
        p.set_home(Some(many[0].clone()), now);
        for i in 1..10u8 {
            let mut f = facts(NatClass::EndpointDependent);
            f.home_relay = Some(many[usize::from(i)].clone());
            p.upsert_peer([i; 32], f, now);
        }
        let wanted = p.wanted_sessions();
        assert_eq!(wanted.len(), MAX_SESSIONS);
        assert_eq!(wanted[0], many[0]);
        for i in 1..10u8 {
            let r = p.view(&[i; 32]).unwrap().relay.unwrap();
            assert!(wanted.contains(&r), "{r}");
        }
    }

    #[test]
    fn forced_relay_pins_and_never_probes() {
        let now = Instant::now();
        let mut p = with_relay(true, now);
        p.upsert_peer(A, facts(NatClass::None), now);
        assert_eq!(
            drain(&mut p),
            vec![
                PathAction::UseRelay {
                    key: A,
                    relay: R1.to_owned(),
                    pinned: true
                },
                PathAction::Initiate { key: A }
            ]
        );
        assert_eq!(p.view(&A).unwrap().reason, Some(Reason::Forced));
        p.handle_timeout(now + Duration::from_secs(10));
        assert!(drain(&mut p).is_empty());
        // Even a direct observation does not unpin it.
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(now),
            },
            now,
        );
        assert_eq!(p.view(&A).unwrap().path, Path::Relay);
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn without_a_relay_a_peer_stays_direct_and_moves_once_one_is_up() {
        let now = Instant::now();
        let mut p = Paths::new(false);
        p.set_relays(&[R1.to_owned()], &[], now);
        p.upsert_peer(A, facts(NatClass::EndpointDependent), now);
        assert!(drain(&mut p).is_empty());
        let v = p.view(&A).unwrap();
        assert_eq!(
            (v.path, v.reason),
            (Path::Direct, Some(Reason::PeerEndpointDependent))
        );
        p.set_home(Some(R1.to_owned()), now);
        assert_eq!(
            drain(&mut p),
            vec![use_relay(R1), PathAction::Initiate { key: A }]
        );
        // The relay leaves the set: back to direct.
        p.set_relays(&[], &[], now);
        assert_eq!(drain(&mut p), vec![PathAction::UseDirect { key: A }]);
        assert_eq!(p.home(), None);
        // A home outside the set is not taken.
        p.set_home(Some(R1.to_owned()), now);
        assert_eq!(p.home(), None);
    }

    /// Without a relay a failed attempt leaves the peer direct with the reason shown; a
    /// later direct receipt clears it.
    #[test]
    fn without_a_relay_a_late_direct_handshake_clears_the_reason() {
        let now = Instant::now();
        let mut p = Paths::new(false);
        p.upsert_peer(A, facts(NatClass::EndpointIndependent), now);
        p.handle_timeout(now + DIRECT_WINDOW);
        assert!(drain(&mut p).is_empty());
        let v = p.view(&A).unwrap();
        assert_eq!(
            (v.path, v.reason),
            (Path::Direct, Some(Reason::NoDirectHandshake))
        );
        let t = now + Duration::from_secs(3);
        p.observe(
            &A,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(t),
            },
            t,
        );
        assert_eq!(p.view(&A).unwrap().reason, None);
        assert_eq!(p.poll_timeout(), Some(t + DIRECT_SILENT));
    }

    #[test]
    fn an_underlay_change_re_probes_at_once() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        const B: [u8; 32] = [2; 32];
        p.upsert_peer(A, facts(NatClass::EndpointDependent), now);
        p.upsert_peer(B, facts(NatClass::None), now);
        p.observe(
            &B,
            Observed {
                path: Path::Direct,
                last_direct_rx: Some(now),
            },
            now,
        );
        drain(&mut p);
        let t = now + Duration::from_millis(300);
        p.underlay_changed(t);
        assert_eq!(drain(&mut p), vec![PathAction::Initiate { key: B }]);
        assert_eq!(p.poll_timeout(), Some(t));
        p.handle_timeout(t);
        assert!(matches!(
            drain(&mut p)[..],
            [PathAction::Probe { key: A, .. }]
        ));
        // B must answer directly within the window, else the relay.
        p.handle_timeout(t + DIRECT_WINDOW);
        let acts: Vec<PathAction> = drain(&mut p)
            .into_iter()
            .filter(|a| !matches!(a, PathAction::Probe { key: A, .. }))
            .collect();
        assert_eq!(
            acts,
            vec![
                PathAction::UseRelay {
                    key: B,
                    relay: R1.to_owned(),
                    pinned: false
                },
                PathAction::Initiate { key: B }
            ]
        );
        assert_eq!(p.view(&B).unwrap().reason, Some(Reason::NoDirectHandshake));
    }

    #[test]
    fn a_lifted_claim_tries_direct_again_with_the_relay_as_a_net() {
        let now = Instant::now();
        let mut p = with_relay(false, now);
        p.upsert_peer(A, facts(NatClass::EndpointDependent), now);
        drain(&mut p);
        p.upsert_peer(
            A,
            facts(NatClass::EndpointIndependent),
            now + Duration::from_secs(2),
        );
        // Still on the relay (it works) until the engine sees a direct receipt, but
        // probing starts at once.
        let v = p.view(&A).unwrap();
        assert_eq!(v.path, Path::Relay);
        p.handle_timeout(now + Duration::from_secs(2));
        assert!(matches!(drain(&mut p)[..], [PathAction::Probe { .. }]));
    }
}
