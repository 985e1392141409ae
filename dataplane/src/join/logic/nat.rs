//! The joiner's STUN probe, sans IO: which Binding requests to send from the WireGuard
//! socket and when, what the answers say, and how the NAT maps the socket.
//!
//! Call order: [`Probe::set_servers`] when the server list changes (the coordinator's
//! `stun_servers` plus `--stun`), [`Probe::reprobe`] when the heartbeat's reflexive address
//! changes, [`Probe::underlay_changed`] when the node's own addresses change; then, whenever [`Probe::poll_timeout`] passes or a STUN datagram arrives,
//! [`Probe::handle_datagram`] and [`Probe::poll_transmit`]. Time is always an argument;
//! transaction ids come from the caller (random).
//!
//! Invariants:
//! * only servers that are usable unicast endpoints outside the mesh are probed (a
//!   malicious coordinator cannot make the joiner send into the tunnel or to multicast);
//! * an answer counts only if it comes from the server the request went to, carries that
//!   request's transaction id and a usable mapped address;
//! * retransmissions follow RFC 8489 §6.2.1 (RTO 500 ms doubling, at most [`MAX_SENDS`]
//!   requests, then [`FINAL_WAIT_RTOS`] × RTO), so one round is bounded;
//! * a new round starts every [`REPROBE_EVERY`] and at once on [`Probe::reprobe`].
//!
//! Classification (when the round ends): no answer at all → `udp_blocked`; a mapped
//! endpoint equal to one of our own `ip:port` → `none`; two or more server endpoints of one
//! family answered with the same mapped endpoint → `endpoint_independent`, different ones →
//! `endpoint_dependent`; one answer only → `unknown`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tabbify_api::stun::{self, TransactionId};
use tabbify_api::NatClass;

use super::roster::usable_endpoint;

/// The first retransmission timeout (RFC 8489 §6.2.1).
pub const INITIAL_RTO: Duration = Duration::from_millis(500);
/// Requests per transaction (Rc).
pub const MAX_SENDS: u32 = 7;
/// After the last request, wait this many RTOs (Rm).
pub const FINAL_WAIT_RTOS: u32 = 16;
/// A new round this often.
pub const REPROBE_EVERY: Duration = Duration::from_secs(60);
/// Most servers probed in a round.
pub const MAX_SERVERS: usize = 8;

#[derive(Debug, Clone)]
struct Tx {
    server: SocketAddr,
    txid: Option<TransactionId>,
    sends: u32,
    next_at: Instant,
    mapped: Option<SocketAddr>,
}

/// The probe (see the module docs).
#[derive(Debug, Clone)]
pub struct Probe {
    servers: Vec<SocketAddr>,
    local: Vec<SocketAddr>,
    round: Vec<Tx>,
    next_round: Option<Instant>,
    class: NatClass,
    mapped: Vec<SocketAddr>,
    reflexive_ip: Option<std::net::IpAddr>,
}

impl Probe {
    /// A probe that knows no servers yet; `local` are this node's own `ip:listen_port`.
    pub fn new(local: Vec<SocketAddr>) -> Self {
        Self {
            servers: Vec::new(),
            local,
            round: Vec::new(),
            next_round: None,
            class: NatClass::Unknown,
            mapped: Vec::new(),
            reflexive_ip: None,
        }
    }

    /// This node's own `ip:listen_port`s (a mapping equal to one means no NAT).
    pub fn set_local(&mut self, local: Vec<SocketAddr>) {
        self.local = local;
    }

    /// The reflexive IP the coordinator last reported (the shell re-probes when it moves).
    pub fn last_reflexive_ip(&self) -> Option<std::net::IpAddr> {
        self.reflexive_ip
    }

    /// Records the reflexive IP the coordinator reported.
    pub fn set_reflexive_ip(&mut self, ip: std::net::IpAddr) {
        self.reflexive_ip = Some(ip);
    }

    /// Replaces the server list (unusable addresses dropped, at most [`MAX_SERVERS`]); a
    /// changed list starts a new round at once.
    pub fn set_servers(&mut self, servers: &[SocketAddr], now: Instant) {
        let mut list: Vec<SocketAddr> = Vec::new();
        for s in servers.iter().filter(|s| usable_endpoint(s)) {
            if !list.contains(s) && list.len() < MAX_SERVERS {
                list.push(*s);
            }
        }
        if list != self.servers {
            self.servers = list;
            self.reprobe(now);
        }
    }

    /// The servers probed (after filtering).
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Starts a new round now (the reflexive address changed, or the network did).
    pub fn reprobe(&mut self, now: Instant) {
        self.round = self
            .servers
            .iter()
            .map(|s| Tx {
                server: *s,
                txid: None,
                sends: 0,
                next_at: now,
                mapped: None,
            })
            .collect();
        self.next_round = Some(now + REPROBE_EVERY);
    }

    /// The node's own addresses changed (it moved): the last round's mapped endpoints
    /// and class described the old network, so they are dropped at once (class back to
    /// `unknown`; a heartbeat must not carry a mapping of an address the node no longer
    /// has, and the coordinator refuses one), `local` becomes the new own `ip:port`s and
    /// a new round starts now. Answers to the old round no longer count.
    pub fn underlay_changed(&mut self, local: Vec<SocketAddr>, now: Instant) {
        self.local = local;
        self.mapped.clear();
        self.class = NatClass::Unknown;
        self.reprobe(now);
    }

    /// The requests due at `now`, as `(server, datagram)`; `txid` gives a fresh random
    /// transaction id for each new transaction.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        mut txid: impl FnMut() -> TransactionId,
    ) -> Vec<(SocketAddr, [u8; stun::BINDING_REQUEST_LEN])> {
        if self.next_round.is_some_and(|t| now >= t) {
            self.reprobe(now);
        }
        let mut out = Vec::new();
        for tx in &mut self.round {
            if tx.mapped.is_some() || tx.sends >= MAX_SENDS || now < tx.next_at {
                continue;
            }
            let id = *tx.txid.get_or_insert_with(&mut txid);
            tx.sends += 1;
            let rto = INITIAL_RTO * (1 << (tx.sends - 1));
            tx.next_at = now
                + if tx.sends == MAX_SENDS {
                    INITIAL_RTO * FINAL_WAIT_RTOS
                } else {
                    rto
                };
            out.push((tx.server, stun::binding_request(&id)));
        }
        self.finish_if_done(now);
        out
    }

    /// A STUN datagram from `src` (from the engine's control queue). Returns whether it
    /// answered one of our transactions.
    pub fn handle_datagram(&mut self, src: SocketAddr, bytes: &[u8], now: Instant) -> bool {
        let Ok(msg) = stun::parse(bytes) else {
            return false;
        };
        let Some(tx) = self
            .round
            .iter_mut()
            .find(|t| t.server == src && t.txid == Some(msg.transaction_id))
        else {
            return false;
        };
        let Some(mapped) = msg
            .binding_success_for(&msg.transaction_id)
            .filter(usable_endpoint)
        else {
            return false;
        };
        tx.mapped = Some(mapped);
        self.finish_if_done(now);
        true
    }

    /// When to call [`Probe::poll_transmit`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pending = self
            .round
            .iter()
            .filter(|t| t.mapped.is_none() && t.sends <= MAX_SENDS)
            .map(|t| t.next_at);
        pending.chain(self.next_round).min()
    }

    /// The class from the last finished round.
    pub fn class(&self) -> NatClass {
        self.class
    }

    /// The distinct mapped endpoints from the last finished round (at most
    /// [`tabbify_api::MAX_MAPPED_ENDPOINTS`]).
    pub fn mapped_endpoints(&self) -> &[SocketAddr] {
        &self.mapped
    }

    /// Ends the round when every transaction is answered or gave up.
    fn finish_if_done(&mut self, now: Instant) {
        if self.round.is_empty() {
            return;
        }
        let done = self
            .round
            .iter()
            .all(|t| t.mapped.is_some() || (t.sends >= MAX_SENDS && now >= t.next_at));
        if !done {
            return;
        }
        let answers: Vec<(SocketAddr, SocketAddr)> = self
            .round
            .iter()
            .filter_map(|t| Some((t.server, t.mapped?)))
            .collect();
        self.round.clear();
        let mut mapped: Vec<SocketAddr> = Vec::new();
        for (_, m) in &answers {
            if !mapped.contains(m) && mapped.len() < tabbify_api::MAX_MAPPED_ENDPOINTS {
                mapped.push(*m);
            }
        }
        self.mapped = mapped;
        self.class = classify(&answers, &self.local);
    }
}

/// The class of a round's `(server, mapped)` answers (see the module docs).
pub fn classify(answers: &[(SocketAddr, SocketAddr)], local: &[SocketAddr]) -> NatClass {
    if answers.is_empty() {
        return NatClass::UdpBlocked;
    }
    if answers.iter().any(|(_, m)| local.contains(m)) {
        return NatClass::None;
    }
    for v4 in [true, false] {
        let fam: Vec<&SocketAddr> = answers
            .iter()
            .filter(|(s, _)| s.is_ipv4() == v4)
            .map(|(_, m)| m)
            .collect();
        if fam.len() >= 2 {
            return if fam.iter().all(|m| *m == fam[0]) {
                NatClass::EndpointIndependent
            } else {
                NatClass::EndpointDependent
            };
        }
    }
    NatClass::Unknown
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Answers every request as a server behind which the node appears at `map(server)`.
    fn answer_all(
        p: &mut Probe,
        sent: &[(SocketAddr, [u8; stun::BINDING_REQUEST_LEN])],
        map: impl Fn(SocketAddr) -> SocketAddr,
        now: Instant,
    ) {
        for (server, req) in sent {
            let m = stun::parse(req).unwrap();
            let res = stun::binding_success(&m.transaction_id, map(*server));
            assert!(p.handle_datagram(*server, &res, now));
        }
    }

    fn ids() -> impl FnMut() -> TransactionId {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; 12]
        }
    }

    const S1: &str = "198.51.100.1:8443";
    const S2: &str = "198.51.100.1:8444";

    #[test]
    fn same_mapping_from_two_ports_is_endpoint_independent() {
        let t = Instant::now();
        let mut p = Probe::new(vec![a("192.168.1.2:51820")]);
        p.set_servers(&[a(S1), a(S2)], t);
        let sent = p.poll_transmit(t, ids());
        assert_eq!(sent.len(), 2);
        answer_all(&mut p, &sent, |_| a("203.0.113.5:40001"), t);
        assert_eq!(p.class(), NatClass::EndpointIndependent);
        assert_eq!(p.mapped_endpoints(), &[a("203.0.113.5:40001")]);
    }

    #[test]
    fn different_mappings_are_endpoint_dependent() {
        let t = Instant::now();
        let mut p = Probe::new(vec![a("192.168.1.2:51820")]);
        p.set_servers(&[a(S1), a(S2)], t);
        let sent = p.poll_transmit(t, ids());
        answer_all(
            &mut p,
            &sent,
            |s| a(&format!("203.0.113.5:{}", s.port() + 1000)),
            t,
        );
        assert_eq!(p.class(), NatClass::EndpointDependent);
        assert_eq!(p.mapped_endpoints().len(), 2);
    }

    #[test]
    fn own_address_is_no_nat_and_one_server_is_unknown() {
        let t = Instant::now();
        let mut p = Probe::new(vec![a("198.51.100.9:51820")]);
        p.set_servers(&[a(S1), a(S2)], t);
        let sent = p.poll_transmit(t, ids());
        answer_all(&mut p, &sent, |_| a("198.51.100.9:51820"), t);
        assert_eq!(p.class(), NatClass::None);

        let mut p = Probe::new(vec![]);
        p.set_servers(&[a(S1)], t);
        let sent = p.poll_transmit(t, ids());
        answer_all(&mut p, &sent, |_| a("203.0.113.5:40001"), t);
        assert_eq!(p.class(), NatClass::Unknown);
        assert_eq!(p.mapped_endpoints(), &[a("203.0.113.5:40001")]);
    }

    #[test]
    fn retransmits_on_rfc_timing_then_udp_blocked() {
        let t0 = Instant::now();
        let mut p = Probe::new(vec![]);
        p.set_servers(&[a(S1), a(S2)], t0);
        let mut now = t0;
        let mut sends = 0;
        let mut txids = std::collections::HashSet::new();
        while let Some(next) = p.poll_timeout() {
            if next >= t0 + REPROBE_EVERY {
                break;
            }
            now = next;
            for (_, req) in p.poll_transmit(now, ids()) {
                txids.insert(stun::parse(&req).unwrap().transaction_id);
                sends += 1;
            }
        }
        assert_eq!(sends, 2 * MAX_SENDS as usize, "Rc requests per server");
        assert_eq!(txids.len(), 2, "a retransmission keeps its transaction id");
        // 0.5 + 1 + 2 + 4 + 8 + 16 s between sends, then 16 × RTO: 39.5 s.
        assert_eq!(now - t0, Duration::from_millis(39_500));
        assert_eq!(p.class(), NatClass::UdpBlocked);
        // The next round starts on schedule.
        assert_eq!(p.poll_timeout(), Some(t0 + REPROBE_EVERY));
        assert_eq!(p.poll_transmit(t0 + REPROBE_EVERY, ids()).len(), 2);
    }

    /// A malicious coordinator's server list: multicast, unspecified, port 0, broadcast and
    /// mesh addresses are never probed; forged answers (wrong source, wrong transaction,
    /// garbage, an unusable mapped address) change nothing.
    #[test]
    fn attacker_servers_and_answers_are_refused() {
        let t = Instant::now();
        let mesh = a(&format!("[{}]:3478", tabbify_api::ula::identity_ula("x")));
        let mut p = Probe::new(vec![]);
        p.set_servers(
            &[
                a("224.0.0.1:3478"),
                a("0.0.0.0:3478"),
                a("198.51.100.1:0"),
                a("255.255.255.255:3478"),
                mesh,
                a(S1),
            ],
            t,
        );
        assert_eq!(p.servers(), &[a(S1)]);
        let sent = p.poll_transmit(t, ids());
        assert_eq!(sent.len(), 1);
        let txid = stun::parse(&sent[0].1).unwrap().transaction_id;
        let good = stun::binding_success(&txid, a("203.0.113.5:40001"));
        assert!(
            !p.handle_datagram(a("198.51.100.66:8443"), &good, t),
            "wrong source"
        );
        let other = stun::binding_success(&[0xAA; 12], a("203.0.113.5:40001"));
        assert!(!p.handle_datagram(a(S1), &other, t), "wrong transaction");
        assert!(!p.handle_datagram(a(S1), &[0xFF; 40], t), "garbage");
        let bad = stun::binding_success(&txid, a("224.0.0.9:1"));
        assert!(
            !p.handle_datagram(a(S1), &bad, t),
            "unusable mapped address"
        );
        assert_eq!(p.class(), NatClass::Unknown);
        assert!(p.handle_datagram(a(S1), &good, t));
        assert_eq!(p.mapped_endpoints(), &[a("203.0.113.5:40001")]);
    }

    #[test]
    fn reprobe_starts_a_round_at_once() {
        let t = Instant::now();
        let mut p = Probe::new(vec![]);
        p.set_servers(&[a(S1), a(S2)], t);
        let sent = p.poll_transmit(t, ids());
        answer_all(&mut p, &sent, |_| a("203.0.113.5:40001"), t);
        let later = t + Duration::from_secs(5);
        assert!(p.poll_transmit(later, ids()).is_empty());
        p.reprobe(later);
        assert_eq!(p.poll_transmit(later, ids()).len(), 2);
        // The last result stands until the new round ends.
        assert_eq!(p.class(), NatClass::EndpointIndependent);
    }

    #[test]
    fn an_underlay_change_forgets_the_mapping_and_ignores_the_old_round() {
        let t = Instant::now();
        let mut p = Probe::new(vec![a("192.168.1.2:51820")]);
        p.set_servers(&[a(S1), a(S2)], t);
        let sent = p.poll_transmit(t, ids());
        answer_all(&mut p, &sent, |_| a("203.0.113.5:40001"), t);
        assert_eq!(p.class(), NatClass::EndpointIndependent);

        // A round in flight when the node moves: its answers come too late to count.
        let later = t + Duration::from_secs(61);
        let stale = p.poll_transmit(later, ids());
        assert_eq!(stale.len(), 2);
        p.underlay_changed(vec![a("192.168.1.3:51820")], later);
        assert_eq!(p.class(), NatClass::Unknown);
        assert!(p.mapped_endpoints().is_empty());
        for (server, req) in &stale {
            let m = stun::parse(req).unwrap();
            let res = stun::binding_success(&m.transaction_id, a("203.0.113.5:40001"));
            assert!(!p.handle_datagram(*server, &res, later));
        }
        assert!(p.mapped_endpoints().is_empty());

        // The new round goes out at once and its answers classify the new network.
        let fresh = p.poll_transmit(later, ids());
        assert_eq!(fresh.len(), 2);
        answer_all(&mut p, &fresh, |_| a("192.168.1.3:51820"), later);
        assert_eq!(p.class(), NatClass::None, "the new own address counts");
        assert_eq!(p.mapped_endpoints(), &[a("192.168.1.3:51820")]);
    }
}
