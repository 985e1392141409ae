//! The mesh zone and the answer to one query, sans IO: bytes in, a [`Verdict`] out.
//!
//! [`Zone`] is built from the roster the joiner holds (never from the network): member
//! names `<label>.<domain>` from display names ([`tabbify_api::dns::member_label`]) and app
//! names `<uuid>.app.<domain>` for the app ULAs visible in the roster or hosted here.
//!
//! Reverse lookups (PTR) for the mesh's own address space are answered from the same
//! roster: the reverse zones `0.0.f.1.a.5.d.f.ip6.arpa` (member ULAs, `fd5a:1f00::/32`),
//! `2.0.f.1.a.5.d.f.ip6.arpa` (app ULAs, `fd5a:1f02::/32`) and `<64..127>.100.in-addr.arpa`
//! (member IPv4s, `100.64.0.0/10`). A member address names its member (the same
//! uncontested label the forward zone answers), an app ULA hosted here names
//! `<uuid>.app.<domain>`; an app ULA hosted elsewhere is NOERROR without an answer (the
//! roster carries app ULAs, never their uuids, and a ULA cannot be turned back into one);
//! any other address in those spaces is NXDOMAIN. Reverse names outside them (the rest of
//! `ip6.arpa` and `in-addr.arpa`) are forwarded like any other name.
//!
//! Invariants:
//! * a name is bound to at most one address, and only through the roster entry that holds
//!   it: a label two members share (case folded) belongs to neither, so a member with a
//!   crafted display name cannot take over another member's name, whatever order the
//!   roster arrived in; an app name resolves only to `app_ula(uuid)` and only when that
//!   ULA is in the roster (the joiner already checked every app ULA against its prefix);
//! * under the domain, every answer is ours (authoritative, TTL [`TTL`], negative answers
//!   carry an SOA whose minimum is [`NEGATIVE_TTL`]); nothing under it is forwarded, and
//!   nothing outside it is answered from the zone;
//! * input that is not one well-formed query is never answered from the zone: a message
//!   that does not parse gets FORMERR when its header can be read, else nothing; a
//!   response (QR set) is dropped, so two stubs cannot ping-pong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{AAAA, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tabbify_api::dns::{member_label, APP_LABEL};

/// TTL of positive answers: short, so a renamed or removed member stops resolving soon.
pub const TTL: u32 = 5;
/// SOA minimum (the negative-caching TTL, RFC 2308): a name that appears in the roster
/// resolves within a second even where a resolver cached its NXDOMAIN.
pub const NEGATIVE_TTL: u32 = 1;
/// Largest UDP answer we send to a query without EDNS (RFC 1035 §4.2.1).
const PLAIN_UDP_MAX: usize = 512;
/// Largest UDP payload we advertise and honour with EDNS (the DNS flag day 2020 value).
pub const EDNS_UDP_MAX: u16 = 1232;

/// One member as the zone sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Display name from the roster (not yet a label).
    pub display_name: String,
    /// Its peer id (for logs).
    pub peer_id: String,
    /// Its ULA.
    pub ula: Ipv6Addr,
    /// Its mesh IPv4 (`100.64.0.0/10`), if the coordinator gave it one (only for PTR).
    pub ipv4: Option<Ipv4Addr>,
}

/// The names this joiner answers for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zone {
    /// The domain, lowercase, without the trailing dot; `None` until the coordinator's
    /// domain was accepted (then nothing is answered from the zone).
    domain: Option<Vec<Vec<u8>>>,
    /// Label → ULA, for labels exactly one member holds.
    members: BTreeMap<String, Ipv6Addr>,
    /// Labels more than one member asked for (nobody gets them).
    contested: BTreeSet<String>,
    /// App ULAs visible from here.
    apps: BTreeSet<Ipv6Addr>,
    /// Member address (ULA or mesh IPv4) → its label, for uncontested labels (PTR).
    reverse: BTreeMap<IpAddr, String>,
    /// App ULA → uuid, for the apps hosted here (the only uuids this joiner knows).
    app_names: BTreeMap<Ipv6Addr, uuid::Uuid>,
}

/// What to do with one datagram or TCP message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Not ours: forward the query to the upstream resolvers unchanged.
    Forward {
        /// The query's id (the upstream's answer must carry it).
        id: u16,
    },
    /// Say nothing (a response, or bytes without a readable header).
    Drop,
}

/// How the verdict came about (for counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An address answer.
    Answered,
    /// NOERROR without an answer (the name exists, the type does not).
    NoData,
    /// NXDOMAIN.
    NxDomain,
    /// Forwarded upstream.
    Forwarded,
    /// FORMERR, NOTIMP or REFUSED for a malformed or unsupported query.
    Malformed,
    /// Nothing sent.
    Dropped,
}

impl Zone {
    /// The zone of `domain` (normalized, see [`tabbify_api::dns::normalize_domain`]) with
    /// these members (ourselves included) and visible app ULAs.
    pub fn new(
        domain: Option<&str>,
        members: impl IntoIterator<Item = Member>,
        apps: impl IntoIterator<Item = Ipv6Addr>,
    ) -> Self {
        let mut by_label: BTreeMap<String, Vec<Member>> = BTreeMap::new();
        for m in members {
            if let Some(label) = member_label(&m.display_name) {
                by_label.entry(label).or_default().push(m);
            }
        }
        let mut zone = Zone {
            domain: domain.map(|d| d.split('.').map(|l| l.as_bytes().to_vec()).collect()),
            apps: apps
                .into_iter()
                .filter(tabbify_api::ula::is_app_ula)
                .collect(),
            ..Zone::default()
        };
        let mut claims: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for (label, holders) in by_label {
            // One member with two roster views (it cannot happen, ULAs are unique) would
            // still be one holder.
            let ulas: BTreeSet<Ipv6Addr> = holders.iter().map(|m| m.ula).collect();
            if ulas.len() == 1 {
                for m in &holders {
                    if tabbify_api::ula::is_peer_ula(&m.ula) {
                        claims
                            .entry(IpAddr::V6(m.ula))
                            .or_default()
                            .insert(label.clone());
                    }
                    if let Some(v4) = m.ipv4.filter(|a| in_mesh_v4(*a)) {
                        claims
                            .entry(IpAddr::V4(v4))
                            .or_default()
                            .insert(label.clone());
                    }
                }
                zone.members.insert(label, holders[0].ula);
            } else {
                let ids: Vec<&str> = holders.iter().map(|m| m.peer_id.as_str()).collect();
                tracing::debug!(%label, peers = ?ids, "DNS name held by several members: nobody gets it");
                zone.contested.insert(label);
            }
        }
        // An address two names claim (a forged roster) names neither, in any order.
        zone.reverse = claims
            .into_iter()
            .filter_map(|(addr, labels)| {
                let mut it = labels.into_iter();
                match (it.next(), it.next()) {
                    (Some(l), None) => Some((addr, l)),
                    _ => None,
                }
            })
            .collect();
        zone
    }

    /// Names the apps hosted here (`<uuid>.app.<domain>` in PTR answers for their ULAs);
    /// their ULAs are added to the visible apps.
    pub fn with_local_apps(mut self, apps: impl IntoIterator<Item = uuid::Uuid>) -> Self {
        for uuid in apps {
            let ula = tabbify_api::ula::app_ula(&uuid);
            self.apps.insert(ula);
            self.app_names.insert(ula, uuid);
        }
        self
    }

    /// The domain served, if any.
    pub fn domain(&self) -> Option<String> {
        self.domain.as_ref().map(|labels| {
            labels
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect::<Vec<_>>()
                .join(".")
        })
    }

    /// Labels several members share (they resolve for nobody).
    pub fn contested(&self) -> impl Iterator<Item = &str> {
        self.contested.iter().map(String::as_str)
    }

    /// The answer to the DNS message `query` (UDP when `udp`; TCP messages are not
    /// truncated).
    pub fn handle(&self, query: &[u8], udp: bool) -> (Verdict, Outcome) {
        let msg = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => return (formerr(query), Outcome::Malformed),
        };
        if msg.metadata.message_type != MessageType::Query {
            return (Verdict::Drop, Outcome::Dropped);
        }
        if msg.metadata.op_code != OpCode::Query {
            return (
                self.error(&msg, ResponseCode::NotImp, udp),
                Outcome::Malformed,
            );
        }
        let [q] = msg.queries.as_slice() else {
            return (
                self.error(&msg, ResponseCode::FormErr, udp),
                Outcome::Malformed,
            );
        };
        let (apex, lookup) = if let Some(relative) = self.relative(q.name()) {
            (self.apex(), self.lookup(&relative))
        } else if let Some((apex, rev)) = self.reverse(q.name()) {
            (apex, self.lookup_reverse(rev))
        } else {
            return (
                Verdict::Forward {
                    id: msg.metadata.id,
                },
                Outcome::Forwarded,
            );
        };
        if q.query_class() != DNSClass::IN {
            return (
                self.error(&msg, ResponseCode::Refused, udp),
                Outcome::Malformed,
            );
        }
        let mut answer = self.response(&msg, udp);
        let outcome = match lookup {
            Lookup::Ptr(target) if q.query_type() == RecordType::PTR => {
                answer.add_answer(Record::from_rdata(
                    q.name().clone(),
                    TTL,
                    RData::PTR(PTR(target)),
                ));
                Outcome::Answered
            }
            Lookup::Address(ula) if q.query_type() == RecordType::AAAA => {
                answer.add_answer(Record::from_rdata(
                    q.name().clone(),
                    TTL,
                    RData::AAAA(AAAA(ula)),
                ));
                Outcome::Answered
            }
            Lookup::Apex if q.query_type() == RecordType::SOA => {
                answer.add_answer(self.soa(apex));
                Outcome::Answered
            }
            Lookup::Address(_) | Lookup::Ptr(_) | Lookup::Apex | Lookup::Empty => {
                answer.add_authority(self.soa(apex));
                Outcome::NoData
            }
            Lookup::None => {
                answer.metadata.response_code = ResponseCode::NXDomain;
                answer.add_authority(self.soa(apex));
                Outcome::NxDomain
            }
        };
        (encode(answer, max_size(&msg, udp)), outcome)
    }

    /// The labels of `name` below the domain (empty for the apex), lowercase; `None` when
    /// `name` is not in the zone (or no domain is served).
    fn relative(&self, name: &Name) -> Option<Vec<Vec<u8>>> {
        let domain = self.domain.as_ref()?;
        let labels: Vec<Vec<u8>> = name.iter().map(|l| l.to_ascii_lowercase()).collect();
        let split = labels.len().checked_sub(domain.len())?;
        (labels[split..] == domain[..]).then(|| labels[..split].to_vec())
    }

    fn lookup(&self, relative: &[Vec<u8>]) -> Lookup {
        match relative {
            [] => Lookup::Apex,
            [label] if label.as_slice() == APP_LABEL.as_bytes() => Lookup::Empty,
            [label] => std::str::from_utf8(label)
                .ok()
                .and_then(|l| self.members.get(l))
                .map_or(Lookup::None, |ula| Lookup::Address(*ula)),
            [uuid, app] if app.as_slice() == APP_LABEL.as_bytes() => std::str::from_utf8(uuid)
                .ok()
                // The canonical hyphenated form only: one name per app.
                .filter(|s| s.len() == 36)
                .and_then(|s| uuid::Uuid::try_parse(s).ok())
                .map(|u| tabbify_api::ula::app_ula(&u))
                .filter(|ula| self.apps.contains(ula))
                .map_or(Lookup::None, Lookup::Address),
            _ => Lookup::None,
        }
    }

    /// The reverse zone `name` lies in (its apex) and the address or part of one it
    /// names; `None` when it is not in the mesh's reverse zones (or no domain is served:
    /// PTR targets need one).
    fn reverse(&self, name: &Name) -> Option<(Name, Reverse)> {
        self.domain.as_ref()?;
        let labels: Vec<Vec<u8>> = name.iter().map(|l| l.to_ascii_lowercase()).collect();
        let (suffix, rest) = labels.split_last_chunk::<2>().map(|(r, s)| (s, r))?;
        // Most significant label first.
        let parts: Vec<&[u8]> = rest.iter().rev().map(Vec::as_slice).collect();
        match suffix {
            [a, b] if a == b"ip6" && b == b"arpa" => reverse_v6(&parts),
            [a, b] if a == b"in-addr" && b == b"arpa" => reverse_v4(&parts),
            _ => None,
        }
    }

    fn lookup_reverse(&self, rev: Reverse) -> Lookup {
        let addr = match rev {
            Reverse::Address(a) => a,
            Reverse::Partial => return Lookup::Empty,
            Reverse::Invalid => return Lookup::None,
        };
        if let Some(label) = self.reverse.get(&addr) {
            return self
                .fqdn(&[label.as_bytes()])
                .map_or(Lookup::None, Lookup::Ptr);
        }
        let IpAddr::V6(v6) = addr else {
            return Lookup::None;
        };
        if let Some(uuid) = self.app_names.get(&v6) {
            let uuid = uuid.hyphenated().to_string();
            return self
                .fqdn(&[uuid.as_bytes(), APP_LABEL.as_bytes()])
                .map_or(Lookup::None, Lookup::Ptr);
        }
        if self.apps.contains(&v6) {
            // In use, but its uuid is known only to its host.
            return Lookup::Empty;
        }
        Lookup::None
    }

    /// `labels` under the domain, fully qualified.
    fn fqdn(&self, labels: &[&[u8]]) -> Option<Name> {
        Name::from_labels(labels.iter().copied())
            .ok()?
            .append_domain(&self.apex())
            .ok()
    }

    fn soa(&self, apex: Name) -> Record {
        let rname = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&self.apex()))
            .unwrap_or_else(|_| apex.clone());
        Record::from_rdata(
            apex.clone(),
            NEGATIVE_TTL,
            RData::SOA(SOA::new(apex, rname, 1, 60, 10, 3600, NEGATIVE_TTL)),
        )
    }

    fn apex(&self) -> Name {
        let mut name = Name::root();
        if let Some(labels) = &self.domain {
            for l in labels.iter().rev() {
                if let Ok(n) = Name::from_labels([l.as_slice()]) {
                    name = n.append_domain(&name).unwrap_or(name);
                }
            }
        }
        name.set_fqdn(true);
        name
    }

    /// An answer skeleton for `msg`: same id, question and RD, AA and RA set, an OPT
    /// record when the query had one.
    fn response(&self, msg: &Message, _udp: bool) -> Message {
        let mut r = Message::response(msg.metadata.id, msg.metadata.op_code);
        r.metadata.authoritative = true;
        r.metadata.recursion_desired = msg.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.add_queries(msg.queries.iter().cloned());
        if msg.edns.is_some() {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_UDP_MAX);
            r.set_edns(e);
        }
        r
    }

    fn error(&self, msg: &Message, code: ResponseCode, udp: bool) -> Verdict {
        let mut r = self.response(msg, udp);
        r.metadata.authoritative = false;
        r.metadata.response_code = code;
        encode(r, max_size(msg, udp))
    }
}

enum Lookup {
    /// The name holds this address.
    Address(Ipv6Addr),
    /// The reverse name of a mesh address names this.
    Ptr(Name),
    /// The domain itself.
    Apex,
    /// A name that exists without an address (`app.<domain>`).
    Empty,
    /// No such name.
    None,
}

/// Where a name in the mesh's reverse zones points.
#[derive(Debug, PartialEq, Eq)]
enum Reverse {
    /// A whole address.
    Address(IpAddr),
    /// A prefix of one (an empty non-terminal: NOERROR, no data).
    Partial,
    /// Labels that are no address (NXDOMAIN).
    Invalid,
}

/// `100.64.0.0/10`, the mesh's IPv4 space.
fn in_mesh_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 100 && (64..128).contains(&o[1])
}

/// The nibbles of the mesh's reverse zones: `fd5a:1f00::/32` and `fd5a:1f02::/32`.
const V6_ZONES: [[u8; 8]; 2] = [
    [0xf, 0xd, 0x5, 0xa, 0x1, 0xf, 0x0, 0x0],
    [0xf, 0xd, 0x5, 0xa, 0x1, 0xf, 0x0, 0x2],
];

/// The apexes of the mesh's reverse zones (`0.0.f.1.a.5.d.f.ip6.arpa`,
/// `2.0.f.1.a.5.d.f.ip6.arpa`, `64.100.in-addr.arpa` … `127.100.in-addr.arpa`), without the
/// final dot: what a resolver that routes by domain (systemd-resolved) must send here for
/// PTR answers about mesh addresses.
pub fn reverse_zones() -> Vec<String> {
    let v6 = V6_ZONES.iter().map(|zone| {
        let mut labels: Vec<String> = zone.iter().rev().map(|n| format!("{n:x}")).collect();
        labels.push("ip6.arpa".to_owned());
        labels.join(".")
    });
    let v4 = (64..128u8).map(|b| format!("{b}.100.in-addr.arpa"));
    v6.chain(v4).collect()
}

fn nibble(label: &[u8]) -> Option<u8> {
    match label {
        [c] => char::from(*c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok()),
        _ => None,
    }
}

/// An `ip6.arpa` name's labels (most significant first): in a mesh reverse zone?
fn reverse_v6(parts: &[&[u8]]) -> Option<(Name, Reverse)> {
    let zone: Vec<u8> = parts
        .iter()
        .take(8)
        .map(|l| nibble(l))
        .collect::<Option<_>>()?;
    if !V6_ZONES.iter().any(|z| z[..] == zone[..]) {
        return None;
    }
    let apex = arpa_name(zone.iter().rev().map(|n| format!("{n:x}")), "ip6")?;
    let rest: Option<Vec<u8>> = parts[8..].iter().map(|l| nibble(l)).collect();
    let rev = match rest {
        Some(_) if parts.len() < 32 => Reverse::Partial,
        Some(_) if parts.len() == 32 => {
            let mut octets = [0u8; 16];
            for (i, pair) in parts.chunks(2).enumerate() {
                let hi = nibble(pair[0]).unwrap_or(0);
                let lo = nibble(pair[1]).unwrap_or(0);
                octets[i] = hi << 4 | lo;
            }
            Reverse::Address(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => Reverse::Invalid,
    };
    Some((apex, rev))
}

fn octet(label: &[u8]) -> Option<u8> {
    let s = std::str::from_utf8(label).ok()?;
    let v: u8 = s.parse().ok()?;
    // One spelling per octet: no leading zeros, no sign.
    (v.to_string() == s).then_some(v)
}

/// An `in-addr.arpa` name's labels (most significant first): in `100.64.0.0/10`?
fn reverse_v4(parts: &[&[u8]]) -> Option<(Name, Reverse)> {
    let (a, b) = (octet(parts.first()?)?, octet(parts.get(1)?)?);
    if !in_mesh_v4(Ipv4Addr::new(a, b, 0, 0)) {
        return None;
    }
    let apex = arpa_name([b.to_string(), a.to_string()].into_iter(), "in-addr")?;
    let rest: Option<Vec<u8>> = parts[2..].iter().map(|l| octet(l)).collect();
    let rev = match rest {
        Some(r) if r.len() < 2 => Reverse::Partial,
        Some(r) if r.len() == 2 => Reverse::Address(IpAddr::V4(Ipv4Addr::new(a, b, r[0], r[1]))),
        _ => Reverse::Invalid,
    };
    Some((apex, rev))
}

/// `<labels>.<kind>.arpa.` (labels least significant first).
fn arpa_name(labels: impl Iterator<Item = String>, kind: &str) -> Option<Name> {
    let mut all: Vec<String> = labels.collect();
    all.push(kind.to_owned());
    all.push("arpa".to_owned());
    let mut n = Name::from_labels(all.iter().map(String::as_bytes)).ok()?;
    n.set_fqdn(true);
    Some(n)
}

/// The reverse name of `addr` (`…ip6.arpa.` / `…in-addr.arpa.`), for tests and the fuzz
/// corpus.
pub fn reverse_name(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let mut s = String::new();
            for b in a.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s + "ip6.arpa."
        }
    }
}

/// The largest answer `msg` may get back.
fn max_size(msg: &Message, udp: bool) -> usize {
    match (udp, &msg.edns) {
        (false, _) => usize::from(u16::MAX),
        (true, None) => PLAIN_UDP_MAX,
        (true, Some(e)) => usize::from(e.max_payload().clamp(512, EDNS_UDP_MAX)),
    }
}

/// The bytes of `r`, truncated (TC set, answers dropped) when over `max`. A message whose
/// question section alone is over `max` (a query may carry many questions; they are
/// echoed) goes back as the header alone, TC set: the client retries over TCP.
fn encode(r: Message, max: usize) -> Verdict {
    match r.to_vec() {
        Ok(b) if b.len() <= max => Verdict::Answer(b),
        Ok(_) => {
            let mut t = r.truncate();
            match t.to_vec() {
                Ok(b) if b.len() <= max => Verdict::Answer(b),
                Ok(_) => {
                    t.queries.clear();
                    t.to_vec().map_or(Verdict::Drop, Verdict::Answer)
                }
                Err(_) => Verdict::Drop,
            }
        }
        Err(_) => Verdict::Drop,
    }
}

/// FORMERR for bytes that are not a message, when at least the header reads as a query.
fn formerr(bytes: &[u8]) -> Verdict {
    let Ok(h) = Header::read(&mut BinDecoder::new(bytes)) else {
        return Verdict::Drop;
    };
    if h.metadata.message_type != MessageType::Query {
        return Verdict::Drop;
    }
    let r = Message::error_msg(h.metadata.id, h.metadata.op_code, ResponseCode::FormErr);
    r.to_vec().map_or(Verdict::Drop, Verdict::Answer)
}

/// A query message for `name`/`qtype` (tests and the fuzz corpus).
pub fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    if let Ok(n) = Name::from_ascii(name) {
        m.add_query(Query::query(n, qtype));
    }
    m.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> Member {
        Member {
            display_name: name.into(),
            peer_id: tabbify_api::ula::identity_peer_id(name),
            ula: tabbify_api::ula::identity_ula(name),
            ipv4: None,
        }
    }

    fn ask(zone: &Zone, name: &str, t: RecordType) -> (Message, Outcome) {
        match zone.handle(&query(7, name, t), true) {
            (Verdict::Answer(b), o) => (Message::from_vec(&b).unwrap(), o),
            other => panic!("{name}: {other:?}"),
        }
    }

    fn aaaa(m: &Message) -> Vec<Ipv6Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    fn app() -> uuid::Uuid {
        "67e55044-10b1-426f-9247-bb680e5fe0c8".parse().unwrap()
    }

    fn zone() -> Zone {
        Zone::new(
            Some("mesh"),
            [member("sup1"), member("Web"), member("me")],
            [tabbify_api::ula::app_ula(&app())],
        )
    }

    #[test]
    fn members_and_apps_resolve_to_their_ulas() {
        let z = zone();
        let (m, o) = ask(&z, "sup1.mesh.", RecordType::AAAA);
        assert_eq!(o, Outcome::Answered);
        assert_eq!(aaaa(&m), [tabbify_api::ula::identity_ula("sup1")]);
        assert!(m.metadata.authoritative);
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.answers[0].ttl, TTL);
        // Case-insensitive both ways.
        let (m, _) = ask(&z, "WEB.Mesh", RecordType::AAAA);
        assert_eq!(aaaa(&m), [tabbify_api::ula::identity_ula("Web")]);
        let (m, _) = ask(&z, &format!("{}.app.mesh", app()), RecordType::AAAA);
        assert_eq!(aaaa(&m), [tabbify_api::ula::app_ula(&app())]);
    }

    #[test]
    fn a_on_a_member_is_nodata_unknown_is_nxdomain_with_a_short_soa() {
        let z = zone();
        let (m, o) = ask(&z, "sup1.mesh", RecordType::A);
        assert_eq!(
            (o, m.metadata.response_code),
            (Outcome::NoData, ResponseCode::NoError)
        );
        assert!(m.answers.is_empty());
        let (m, o) = ask(&z, "nobody.mesh", RecordType::AAAA);
        assert_eq!(
            (o, m.metadata.response_code),
            (Outcome::NxDomain, ResponseCode::NXDomain)
        );
        let RData::SOA(soa) = &m.authorities[0].data else {
            panic!("no SOA")
        };
        assert_eq!(soa.minimum, NEGATIVE_TTL);
        for name in ["a.b.mesh", "app.app.mesh", "x.sup1.mesh"] {
            assert_eq!(
                ask(&z, name, RecordType::AAAA).1,
                Outcome::NxDomain,
                "{name}"
            );
        }
        assert_eq!(ask(&z, "mesh", RecordType::SOA).1, Outcome::Answered);
        assert_eq!(ask(&z, "app.mesh", RecordType::AAAA).1, Outcome::NoData);
    }

    #[test]
    fn outside_names_are_forwarded_and_nothing_is_answered_without_a_domain() {
        let z = zone();
        let q = query(9, "example.org", RecordType::A);
        assert_eq!(
            z.handle(&q, true),
            (Verdict::Forward { id: 9 }, Outcome::Forwarded)
        );
        // "mesh" inside another name is not the zone.
        let q = query(9, "sup1.mesh.example.org", RecordType::AAAA);
        assert_eq!(z.handle(&q, true).1, Outcome::Forwarded);
        let none = Zone::new(None, [member("sup1")], []);
        let q = query(9, "sup1.mesh", RecordType::AAAA);
        assert_eq!(none.handle(&q, true).1, Outcome::Forwarded);
    }

    /// Attacker: members with crafted display names.
    #[test]
    fn crafted_display_names_shadow_no_member_and_no_app() {
        let hidden_app: uuid::Uuid = "11111111-2222-4333-8444-555555555555".parse().unwrap();
        let z = Zone::new(
            Some("mesh"),
            [
                member("sup1"),
                member("SUP1"), // another member, same name case-folded
                member("web"),
                member(&format!("{}.app", app())),
                member(&format!("{hidden_app}.app")),
                member("*"),
                member(&"x".repeat(300)),
                member("app"),
            ],
            [tabbify_api::ula::app_ula(&app())],
        );
        // Nobody gets a contested name, in either roster order.
        assert_eq!(ask(&z, "sup1.mesh", RecordType::AAAA).1, Outcome::NxDomain);
        assert_eq!(z.contested().collect::<Vec<_>>(), ["sup1"]);
        // The app name still points at the app, an unlisted app does not resolve.
        let (m, _) = ask(&z, &format!("{}.app.mesh", app()), RecordType::AAAA);
        assert_eq!(aaaa(&m), [tabbify_api::ula::app_ula(&app())]);
        let n = format!("{hidden_app}.app.mesh");
        assert_eq!(ask(&z, &n, RecordType::AAAA).1, Outcome::NxDomain);
        assert_eq!(ask(&z, "*.mesh", RecordType::AAAA).1, Outcome::NxDomain);
        assert_eq!(ask(&z, "app.mesh", RecordType::AAAA).1, Outcome::NoData);
        assert_eq!(z.members.len(), 1, "{:?}", z.members);
        assert_eq!(aaaa(&ask(&z, "web.mesh", RecordType::AAAA).0).len(), 1);
        // Order independence.
        let z2 = Zone::new(Some("mesh"), [member("SUP1"), member("sup1")], []);
        assert_eq!(ask(&z2, "sup1.mesh", RecordType::AAAA).1, Outcome::NxDomain);
        // A non-app ULA offered as an app is ignored.
        let z3 = Zone::new(Some("mesh"), [], [tabbify_api::ula::identity_ula("x")]);
        assert!(z3.apps.is_empty());
    }

    #[test]
    fn malformed_input_gets_formerr_or_nothing_never_a_panic() {
        let z = zone();
        assert_eq!(z.handle(&[], true), (Verdict::Drop, Outcome::Malformed));
        assert_eq!(z.handle(&[0; 5], true).0, Verdict::Drop);
        // A header claiming one question with no question bytes.
        let mut bad = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        let (v, o) = z.handle(&bad, true);
        assert_eq!(o, Outcome::Malformed);
        let Verdict::Answer(b) = v else {
            panic!("{v:?}")
        };
        let m = Message::from_vec(&b).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0x1234, ResponseCode::FormErr)
        );
        // The same as a response: dropped.
        bad[2] |= 0x80;
        assert_eq!(z.handle(&bad, true).0, Verdict::Drop);
        // Two questions: FORMERR.
        let mut m = Message::new(3, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("a.mesh").unwrap(),
            RecordType::AAAA,
        ));
        m.add_query(Query::query(
            Name::from_ascii("b.mesh").unwrap(),
            RecordType::AAAA,
        ));
        let (_, o) = z.handle(&m.to_vec().unwrap(), true);
        assert_eq!(o, Outcome::Malformed);
        // A well-formed answer sent to us is dropped, not answered.
        let (Verdict::Answer(resp), _) = z.handle(&query(1, "sup1.mesh", RecordType::AAAA), true)
        else {
            panic!()
        };
        assert_eq!(z.handle(&resp, true), (Verdict::Drop, Outcome::Dropped));
    }

    /// Found by the `dns_query` fuzz target: a query with many long questions got a
    /// FORMERR echoing them all, over 512 bytes on plain UDP even after truncation.
    #[test]
    fn a_udp_answer_fits_512_bytes_whatever_the_question_section() {
        let z = zone();
        let mut m = Message::new(9, MessageType::Query, OpCode::Query);
        for i in 0..8 {
            // Distinct labels: repeated names would be compressed.
            let long = format!("{}{i}.{}{i}.mesh", "a".repeat(60), "b".repeat(60));
            m.add_query(Query::query(
                Name::from_ascii(&long).unwrap(),
                RecordType::AAAA,
            ));
        }
        let q = m.to_vec().unwrap();
        assert!(q.len() > 512);
        let (Verdict::Answer(b), o) = z.handle(&q, true) else {
            panic!("no answer")
        };
        assert_eq!(o, Outcome::Malformed);
        assert!(b.len() <= 512, "{} bytes", b.len());
        let a = Message::from_vec(&b).unwrap();
        assert_eq!(a.metadata.id, 9);
        assert!(a.metadata.truncation, "TC set: retry over TCP");
        // Over TCP the whole FORMERR goes back.
        let (Verdict::Answer(b), _) = z.handle(&q, false) else {
            panic!("no answer")
        };
        assert_eq!(Message::from_vec(&b).unwrap().queries.len(), 8);
    }
}

#[cfg(test)]
mod ptr_tests {
    use super::*;

    fn member(name: &str, v4: Option<&str>) -> Member {
        Member {
            display_name: name.into(),
            peer_id: tabbify_api::ula::identity_peer_id(name),
            ula: tabbify_api::ula::identity_ula(name),
            ipv4: v4.map(|a| a.parse().unwrap()),
        }
    }

    fn local_app() -> uuid::Uuid {
        "67e55044-10b1-426f-9247-bb680e5fe0c8".parse().unwrap()
    }

    fn remote_app() -> Ipv6Addr {
        tabbify_api::ula::app_ula(&uuid::Uuid::from_u128(42))
    }

    fn zone() -> Zone {
        Zone::new(
            Some("mesh"),
            [member("sup1", Some("100.64.0.7")), member("Web", None)],
            [remote_app()],
        )
        .with_local_apps([local_app()])
    }

    fn ptr(zone: &Zone, addr: IpAddr) -> (Verdict, Outcome) {
        zone.handle(&query(5, &reverse_name(addr), RecordType::PTR), true)
    }

    fn answer(v: Verdict) -> Message {
        match v {
            Verdict::Answer(b) => Message::from_vec(&b).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn targets(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn member_and_app_addresses_name_their_owner() {
        let z = zone();
        let ula = IpAddr::V6(tabbify_api::ula::identity_ula("sup1"));
        for addr in [ula, "100.64.0.7".parse().unwrap()] {
            let (v, o) = ptr(&z, addr);
            assert_eq!(o, Outcome::Answered, "{addr}");
            let m = answer(v);
            assert_eq!(targets(&m), ["sup1.mesh."], "{addr}");
            assert!(m.metadata.authoritative);
            assert_eq!(m.answers[0].ttl, TTL);
        }
        // The label is the forward zone's (lowercase).
        let web = IpAddr::V6(tabbify_api::ula::identity_ula("Web"));
        assert_eq!(targets(&answer(ptr(&z, web).0)), ["web.mesh."]);
        let app = IpAddr::V6(tabbify_api::ula::app_ula(&local_app()));
        assert_eq!(
            targets(&answer(ptr(&z, app).0)),
            [format!("{}.app.mesh.", local_app())]
        );
        // Upper-case nibbles are the same name.
        let upper = reverse_name(ula).to_ascii_uppercase();
        let (v, o) = z.handle(&query(5, &upper, RecordType::PTR), true);
        assert_eq!(o, Outcome::Answered);
        assert_eq!(targets(&answer(v)), ["sup1.mesh."]);
        // A forward lookup of the PTR target gives the address back.
        let (v, _) = z.handle(&query(5, "sup1.mesh", RecordType::AAAA), true);
        assert!(matches!(&answer(v).answers[0].data, RData::AAAA(a) if IpAddr::V6(a.0) == ula));
    }

    #[test]
    fn unknown_mesh_addresses_are_nxdomain_and_other_reverse_names_are_forwarded() {
        let z = zone();
        for addr in [
            "fd5a:1f00:1:2:3::1",
            "fd5a:1f00::53",
            "fd5a:1f02:9:9:9::1",
            "100.64.0.8",
            "100.127.255.255",
        ] {
            let addr: IpAddr = addr.parse().unwrap();
            let (v, o) = ptr(&z, addr);
            assert_eq!(o, Outcome::NxDomain, "{addr}");
            let m = answer(v);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
            // The SOA is the reverse zone's, with the short negative TTL.
            let soa = &m.authorities[0];
            assert!(soa.name.to_ascii().ends_with(".arpa."), "{}", soa.name);
            let RData::SOA(s) = &soa.data else { panic!() };
            assert_eq!(s.minimum, NEGATIVE_TTL);
        }
        // A remote app's ULA is in use, but only its host knows the uuid.
        let (v, o) = ptr(&z, IpAddr::V6(remote_app()));
        assert_eq!(o, Outcome::NoData);
        assert_eq!(answer(v).metadata.response_code, ResponseCode::NoError);
        for addr in [
            "10.0.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "2001:db8::1",
            "fd5a:1f01::1",
            "fd00::1",
        ] {
            let addr: IpAddr = addr.parse().unwrap();
            assert_eq!(
                ptr(&z, addr),
                (Verdict::Forward { id: 5 }, Outcome::Forwarded),
                "{addr}"
            );
        }
        // Parts of the zones: the apex and empty non-terminals exist; nonsense does not.
        for (name, want) in [
            ("0.0.f.1.a.5.d.f.ip6.arpa", Outcome::NoData),
            ("1.0.0.f.1.a.5.d.f.ip6.arpa", Outcome::NoData),
            ("64.100.in-addr.arpa", Outcome::NoData),
            ("0.64.100.in-addr.arpa", Outcome::NoData),
            ("x.0.0.f.1.a.5.d.f.ip6.arpa", Outcome::NxDomain),
            ("10.0.0.f.1.a.5.d.f.ip6.arpa", Outcome::NxDomain),
            ("07.0.64.100.in-addr.arpa", Outcome::NxDomain),
            ("1.7.0.64.100.in-addr.arpa", Outcome::NxDomain),
            ("256.0.64.100.in-addr.arpa", Outcome::NxDomain),
        ] {
            let (_, o) = z.handle(&query(5, name, RecordType::PTR), true);
            assert_eq!(o, want, "{name}");
        }
        for name in [
            "f.ip6.arpa",
            "100.in-addr.arpa",
            "ip6.arpa",
            "arpa",
            "in-addr.arpa",
        ] {
            let (_, o) = z.handle(&query(5, name, RecordType::PTR), true);
            assert_eq!(o, Outcome::Forwarded, "{name}");
        }
        // Other types on a member's reverse name: NOERROR, no data.
        let ula = IpAddr::V6(tabbify_api::ula::identity_ula("sup1"));
        let q = query(5, &reverse_name(ula), RecordType::AAAA);
        assert_eq!(z.handle(&q, true).1, Outcome::NoData);
        // No domain accepted: nothing answered from the zone, reverse names included.
        let none = Zone::new(None, [member("sup1", Some("100.64.0.7"))], []);
        assert_eq!(ptr(&none, ula).1, Outcome::Forwarded);
    }

    /// Attacker: members claiming a name or an address another member holds.
    #[test]
    fn a_contested_name_or_address_names_nobody() {
        // Two members with one label: neither address names anyone.
        let z = Zone::new(
            Some("mesh"),
            [
                member("sup1", Some("100.64.0.7")),
                member("SUP1", Some("100.64.0.9")),
            ],
            [],
        );
        for addr in [
            IpAddr::V6(tabbify_api::ula::identity_ula("sup1")),
            IpAddr::V6(tabbify_api::ula::identity_ula("SUP1")),
            "100.64.0.7".parse().unwrap(),
            "100.64.0.9".parse().unwrap(),
        ] {
            assert_eq!(ptr(&z, addr).1, Outcome::NxDomain, "{addr}");
        }
        // Two members claiming one IPv4 (a forged roster): it names neither, in either
        // order; their ULAs still name them.
        for order in [["web", "evil"], ["evil", "web"]] {
            let z = Zone::new(
                Some("mesh"),
                order.map(|n| member(n, Some("100.64.0.7"))),
                [],
            );
            assert_eq!(ptr(&z, "100.64.0.7".parse().unwrap()).1, Outcome::NxDomain);
            let web = IpAddr::V6(tabbify_api::ula::identity_ula("web"));
            assert_eq!(targets(&answer(ptr(&z, web).0)), ["web.mesh."]);
        }
        // An IPv4 outside 100.64.0.0/10 in the roster names nothing (and stays forwarded).
        let z = Zone::new(Some("mesh"), [member("web", Some("10.0.0.7"))], []);
        assert_eq!(ptr(&z, "10.0.0.7".parse().unwrap()).1, Outcome::Forwarded);
    }

    #[test]
    fn the_reverse_zones_are_the_mesh_prefixes() {
        let zones = reverse_zones();
        assert_eq!(zones.len(), 2 + 64);
        assert_eq!(zones[0], "0.0.f.1.a.5.d.f.ip6.arpa");
        assert_eq!(zones[1], "2.0.f.1.a.5.d.f.ip6.arpa");
        assert_eq!(zones[2], "64.100.in-addr.arpa");
        assert_eq!(zones[65], "127.100.in-addr.arpa");
        // Every member, app and IPv4 address's reverse name falls in one of them.
        for addr in [
            "fd5a:1f00:1:2:3::1",
            "fd5a:1f02::9",
            "100.64.0.1",
            "100.127.255.254",
        ] {
            let name = reverse_name(addr.parse().unwrap());
            assert!(
                zones.iter().any(|z| name.ends_with(&format!(".{z}."))),
                "{name}"
            );
        }
        for addr in ["fd5a:1f01::1", "100.128.0.1", "100.63.0.1"] {
            let name = reverse_name(addr.parse().unwrap());
            assert!(
                !zones.iter().any(|z| name.ends_with(&format!(".{z}."))),
                "{name}"
            );
        }
    }
}
