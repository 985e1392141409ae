//! The mesh zone and the answer to one query, sans IO: bytes in, a [`Verdict`] out.
//!
//! [`Zone`] is built from the roster the joiner holds (never from the network): member
//! names `<label>.<domain>` from display names ([`tabbify_api::dns::member_label`]) and app
//! names `<uuid>.app.<domain>` for the app ULAs visible in the roster or hosted here.
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
use std::net::Ipv6Addr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{AAAA, SOA};
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
        for (label, holders) in by_label {
            // One member with two roster views (it cannot happen, ULAs are unique) would
            // still be one holder.
            let ulas: BTreeSet<Ipv6Addr> = holders.iter().map(|m| m.ula).collect();
            if ulas.len() == 1 {
                zone.members.insert(label, holders[0].ula);
            } else {
                let ids: Vec<&str> = holders.iter().map(|m| m.peer_id.as_str()).collect();
                tracing::debug!(%label, peers = ?ids, "DNS name held by several members: nobody gets it");
                zone.contested.insert(label);
            }
        }
        zone
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
        let Some(relative) = self.relative(q.name()) else {
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
        let lookup = self.lookup(&relative);
        let mut answer = self.response(&msg, udp);
        let outcome = match lookup {
            Lookup::Address(ula) if q.query_type() == RecordType::AAAA => {
                answer.add_answer(Record::from_rdata(
                    q.name().clone(),
                    TTL,
                    RData::AAAA(AAAA(ula)),
                ));
                Outcome::Answered
            }
            Lookup::Apex if q.query_type() == RecordType::SOA => {
                answer.add_answer(self.soa());
                Outcome::Answered
            }
            Lookup::Address(_) | Lookup::Apex | Lookup::Empty => {
                answer.add_authority(self.soa());
                Outcome::NoData
            }
            Lookup::None => {
                answer.metadata.response_code = ResponseCode::NXDomain;
                answer.add_authority(self.soa());
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

    fn soa(&self) -> Record {
        let apex = self.apex();
        let rname = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&apex))
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
    /// The domain itself.
    Apex,
    /// A name that exists without an address (`app.<domain>`).
    Empty,
    /// No such name.
    None,
}

/// The largest answer `msg` may get back.
fn max_size(msg: &Message, udp: bool) -> usize {
    match (udp, &msg.edns) {
        (false, _) => usize::from(u16::MAX),
        (true, None) => PLAIN_UDP_MAX,
        (true, Some(e)) => usize::from(e.max_payload().clamp(512, EDNS_UDP_MAX)),
    }
}

/// The bytes of `r`, truncated (TC set, answers dropped) when over `max`.
fn encode(r: Message, max: usize) -> Verdict {
    match r.to_vec() {
        Ok(b) if b.len() <= max => Verdict::Answer(b),
        Ok(_) => r.truncate().to_vec().map_or(Verdict::Drop, Verdict::Answer),
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
}
