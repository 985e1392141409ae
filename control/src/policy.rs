//! The tag ACL: compiles a [`PolicyDocument`] into rules that can be matched against a
//! peer's identity and tags, and answers "which ports may A open on B".
//!
//! Semantics (default deny): traffic from A to B on a port is allowed when some allow
//! rule has A in `src` and B (with that port) in `dst`, and no deny rule does. Ports carry
//! their protocol (`tcp:8730`, `udp:53`; a bare port or range is both), and allow and deny
//! are computed per protocol. A peer sees
//! another when traffic is allowed in either direction. Which peers may host apps is a
//! separate selector list. Compilation rejects unknown tags and groups, groups inside
//! groups, malformed selectors and port specs, so a compiled [`Policy`] is always
//! consistent. Per-pair answers for many peers come from [`crate::visibility`].
//!
//! Routes: a `dst` that is an IP prefix (`10.1.0.0/16`, `::/0`, or `autogroup:internet`
//! for both default routes) is not a peer selector: it goes to the rule's
//! [`RouteRule`] and names advertised subnet routes, never a member (visibility and port
//! rules ignore it; [`crate::routes`] evaluates it). It may carry ports like a tag
//! (`10.1.0.0/16:443`, `fd00:1::/64:tcp:22`): the rule then covers only those destination
//! ports inside the prefix; a default route takes none. The `routes` section compiles to
//! the auto-approval list ([`Policy::route_auto`]).

use std::collections::{HashMap, HashSet};

use crate::api::route::{Prefix, DEFAULT_V4, DEFAULT_V6};
use crate::api::PolicyDocument;
use crate::ca::validate_name;
use crate::ports::{Proto, ProtoPorts};

/// Why a policy document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy: {0}")]
pub struct PolicyError(pub String);

/// Index of a tag in the policy's tag list.
pub type TagId = u16;

/// Who a selector names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Everyone (`*`).
    Any,
    /// Peers carrying this tag.
    Tag(TagId),
    /// The peer with this identity.
    Peer(String),
}

/// A compiled rule: senders, and receivers each with the ports the rule covers.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Who sends.
    pub src: Vec<Selector>,
    /// Who receives, and on which ports.
    pub dst: Vec<(Selector, ProtoPorts)>,
}

/// A rule's prefix destinations: `src` may use approved routes inside or around `dst`.
#[derive(Debug, Clone)]
pub struct RouteRule {
    /// Who sends.
    pub src: Vec<Selector>,
    /// The prefixes, each with the destination ports the rule covers inside it
    /// ([`ProtoPorts::all`] without a `:PORTS` suffix: all traffic). Sorted by prefix, one
    /// entry per prefix (a prefix listed twice gets the union of its ports).
    pub dst: Vec<(Prefix, ProtoPorts)>,
}

/// A peer as the policy sees it: its identity and its tags.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    /// Identity (certificate CN).
    pub identity: &'a str,
    /// Tag ids, from [`Policy::tag_ids`].
    pub tags: &'a [TagId],
}

/// A validated, compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    doc: PolicyDocument,
    tags: HashMap<String, TagId>,
    named_peers: HashSet<String>,
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    app_hosts: Vec<Selector>,
    route_allow: Vec<RouteRule>,
    route_deny: Vec<RouteRule>,
    route_auto: Vec<(Prefix, Vec<Selector>)>,
}

/// The most entries the policy's `routes` section may hold.
pub const MAX_ROUTE_KEYS: usize = 4096;

/// The most tags a policy may define.
pub const MAX_TAGS: usize = 4096;
/// The most rules (allow + deny) a policy may hold.
pub const MAX_RULES: usize = 10_000;

impl Policy {
    /// Validates and compiles `doc`.
    pub fn compile(doc: PolicyDocument) -> Result<Self, PolicyError> {
        if doc.tags.len() > MAX_TAGS {
            return Err(PolicyError(format!("more than {MAX_TAGS} tags")));
        }
        if doc.allow.len() + doc.deny.len() > MAX_RULES {
            return Err(PolicyError(format!("more than {MAX_RULES} rules")));
        }
        let mut tags = HashMap::new();
        for (i, t) in doc.tags.iter().enumerate() {
            validate_name(t).map_err(|_| PolicyError(format!("bad tag name {t:?}")))?;
            // MAX_TAGS keeps every index within TagId.
            let id = TagId::try_from(i).map_err(|_| PolicyError("too many tags".into()))?;
            if tags.insert(t.clone(), id).is_some() {
                return Err(PolicyError(format!("tag {t:?} listed twice")));
            }
        }
        let mut c = Compiler {
            tags: &tags,
            groups: &doc.groups,
            named_peers: HashSet::new(),
        };
        for (name, members) in &doc.groups {
            validate_name(name).map_err(|_| PolicyError(format!("bad group name {name:?}")))?;
            for m in members {
                if m.starts_with("group:") {
                    return Err(PolicyError(format!(
                        "group {name:?} contains {m:?}: groups hold tags, peers or *, not groups"
                    )));
                }
                c.selector(m)?;
            }
        }
        let mut compile_rules = |rules: &[crate::api::PolicyRule], kind: &str| {
            let mut out = Vec::new();
            let mut routes = Vec::new();
            for (i, r) in rules.iter().enumerate() {
                let (rule, route) = c
                    .rule(r)
                    .map_err(|e| PolicyError(format!("{kind} rule {i}: {}", e.0)))?;
                out.push(rule);
                if !route.dst.is_empty() {
                    routes.push(route);
                }
            }
            Ok::<_, PolicyError>((out, routes))
        };
        let (allow, route_allow) = compile_rules(&doc.allow, "allow")?;
        let (deny, route_deny) = compile_rules(&doc.deny, "deny")?;
        if doc.routes.len() > MAX_ROUTE_KEYS {
            return Err(PolicyError(format!(
                "more than {MAX_ROUTE_KEYS} entries in \"routes\""
            )));
        }
        let mut route_auto = Vec::new();
        for (prefix, sels) in &doc.routes {
            let p: Prefix = prefix
                .parse()
                .map_err(|e: crate::api::route::PrefixError| PolicyError(format!("routes: {e}")))?;
            let mut out = Vec::new();
            for s in sels {
                out.extend(
                    c.selector(s)
                        .map_err(|e| PolicyError(format!("routes {prefix:?}: {}", e.0)))?,
                );
            }
            route_auto.push((p, out));
        }
        let mut app_hosts = Vec::new();
        for s in &doc.app_hosts {
            app_hosts.extend(c.selector(s)?);
        }
        let named_peers = c.named_peers;
        Ok(Self {
            doc,
            tags,
            named_peers,
            allow,
            deny,
            app_hosts,
            route_allow,
            route_deny,
            route_auto,
        })
    }

    /// The allow rules' prefix destinations.
    pub fn route_allow(&self) -> &[RouteRule] {
        &self.route_allow
    }

    /// The deny rules' prefix destinations.
    pub fn route_deny(&self) -> &[RouteRule] {
        &self.route_deny
    }

    /// The `routes` section: a prefix and who gets its advertisements (and those of any
    /// prefix inside it) approved.
    pub fn route_auto(&self) -> &[(Prefix, Vec<Selector>)] {
        &self.route_auto
    }

    /// The document this policy was compiled from.
    pub fn document(&self) -> &PolicyDocument {
        &self.doc
    }

    /// The ids of `tags`, or an error naming the first tag the policy does not define.
    pub fn tag_ids(&self, tags: &[String]) -> Result<Vec<TagId>, PolicyError> {
        let mut ids = tags
            .iter()
            .map(|t| {
                self.tags
                    .get(t)
                    .copied()
                    .ok_or_else(|| PolicyError(format!("unknown tag {t:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// The ids of `tags`, skipping tags the policy does not define (used when a new
    /// policy drops a tag that registered peers still carry: they lose its rights).
    pub fn known_tag_ids(&self, tags: &[String]) -> Vec<TagId> {
        let mut ids: Vec<TagId> = tags
            .iter()
            .filter_map(|t| self.tags.get(t).copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Whether some `peer:` selector names `identity` (then it matters for classes).
    pub fn names_peer(&self, identity: &str) -> bool {
        self.named_peers.contains(identity)
    }

    /// The allow rules.
    pub fn allow_rules(&self) -> &[Rule] {
        &self.allow
    }

    /// The deny rules.
    pub fn deny_rules(&self) -> &[Rule] {
        &self.deny
    }

    /// Whether `p` may host apps.
    pub fn may_host_apps(&self, p: Principal<'_>) -> bool {
        self.app_hosts.iter().any(|s| matches(s, p))
    }

    /// Why `a` may or may not open `port` of `proto` on `b`: the first allow rule that
    /// admits it and the first deny rule that refuses it, by their index in the document.
    /// Uses the same rules and [`matches`] as [`Policy::allowed_ports`], so the verdict is
    /// `allowed` exactly when `allowed_ports(a, b)` contains the port.
    pub fn decide(&self, a: Principal<'_>, b: Principal<'_>, proto: Proto, port: u16) -> Verdict {
        let first = |rules: &[Rule]| {
            rules.iter().position(|r| {
                r.src.iter().any(|s| matches(s, a))
                    && r.dst
                        .iter()
                        .any(|(s, ports)| matches(s, b) && ports.contains(proto, port))
            })
        };
        match (first(&self.allow), first(&self.deny)) {
            (None, _) => Verdict::NoRule,
            (Some(allow), None) => Verdict::Allowed { allow },
            (Some(allow), Some(deny)) => Verdict::Denied { allow, deny },
        }
    }

    /// The ports `a` may open on `b` (allow minus deny); empty when none.
    pub fn allowed_ports(&self, a: Principal<'_>, b: Principal<'_>) -> ProtoPorts {
        let mut allowed = collect(&self.allow, a, b);
        if !allowed.is_empty() {
            allowed.subtract(&collect(&self.deny, a, b));
        }
        allowed
    }
}

/// The answer of [`Policy::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by `allow` rule (index into the document's `allow`), and no deny rule.
    Allowed {
        /// Index of the first allow rule that admits the traffic.
        allow: usize,
    },
    /// An allow rule admits it but a deny rule refuses it (deny wins).
    Denied {
        /// Index of the first allow rule that admits the traffic.
        allow: usize,
        /// Index of the first deny rule that refuses it.
        deny: usize,
    },
    /// No allow rule admits it (default deny).
    NoRule,
}

impl Verdict {
    /// Whether the traffic is allowed.
    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allowed { .. })
    }
}

/// Whether selector `s` names principal `p`.
pub fn matches(s: &Selector, p: Principal<'_>) -> bool {
    match s {
        Selector::Any => true,
        Selector::Tag(t) => p.tags.binary_search(t).is_ok(),
        Selector::Peer(name) => p.identity == name,
    }
}

fn collect(rules: &[Rule], a: Principal<'_>, b: Principal<'_>) -> ProtoPorts {
    let mut set = ProtoPorts::empty();
    for r in rules {
        if r.src.iter().any(|s| matches(s, a)) {
            for (s, ports) in &r.dst {
                if matches(s, b) {
                    set.union_with(ports);
                }
            }
        }
    }
    set
}

struct Compiler<'a> {
    tags: &'a HashMap<String, TagId>,
    groups: &'a std::collections::BTreeMap<String, Vec<String>>,
    named_peers: HashSet<String>,
}

impl Compiler<'_> {
    fn rule(&mut self, r: &crate::api::PolicyRule) -> Result<(Rule, RouteRule), PolicyError> {
        if r.src.is_empty() || r.dst.is_empty() {
            return Err(PolicyError("src and dst must not be empty".into()));
        }
        let mut src = Vec::new();
        for s in &r.src {
            src.extend(self.selector(s)?);
        }
        let mut dst = Vec::new();
        let mut prefixes = Vec::new();
        for d in &r.dst {
            if let Some(ps) = route_destination(d)? {
                prefixes.extend(ps);
                continue;
            }
            let (sel, ports) = split_ports(d)?;
            for s in self.selector(sel)? {
                dst.push((s, ports.clone()));
            }
        }
        prefixes.sort_by_key(|a| a.0);
        let mut merged: Vec<(Prefix, ProtoPorts)> = Vec::with_capacity(prefixes.len());
        for (p, ports) in prefixes {
            match merged.last_mut() {
                Some((q, qp)) if *q == p => qp.union_with(&ports),
                _ => merged.push((p, ports)),
            }
        }
        let prefixes = merged;
        Ok((
            Rule {
                src: src.clone(),
                dst,
            },
            RouteRule { src, dst: prefixes },
        ))
    }

    /// Resolves one selector (a group expands to its members).
    fn selector(&mut self, s: &str) -> Result<Vec<Selector>, PolicyError> {
        if s == "*" {
            return Ok(vec![Selector::Any]);
        }
        if let Some(t) = s.strip_prefix("tag:") {
            return match self.tags.get(t) {
                Some(id) => Ok(vec![Selector::Tag(*id)]),
                None => Err(PolicyError(format!(
                    "unknown tag {t:?} (add it to \"tags\")"
                ))),
            };
        }
        if let Some(name) = s.strip_prefix("peer:") {
            validate_name(name).map_err(|_| PolicyError(format!("bad peer name {name:?}")))?;
            self.named_peers.insert(name.to_owned());
            return Ok(vec![Selector::Peer(name.to_owned())]);
        }
        if let Some(g) = s.strip_prefix("group:") {
            let members = self
                .groups
                .get(g)
                .ok_or_else(|| PolicyError(format!("unknown group {g:?}")))?;
            let mut out = Vec::new();
            for m in members {
                if m.starts_with("group:") {
                    return Err(PolicyError(format!("group {g:?} contains a group")));
                }
                out.extend(self.selector(m)?);
            }
            return Ok(out);
        }
        Err(PolicyError(format!(
            "bad selector {s:?}: use tag:NAME, group:NAME, peer:NAME or *"
        )))
    }
}

/// A prefix destination (`10.1.0.0/16`, `fd00:1::/64`, `::/0`, `autogroup:internet`)
/// with its ports, or `None` for a selector destination. The `/LEN` digits end the prefix,
/// so IPv6 needs no brackets: `10.1.0.0/16:443`, `fd00:1::/64:tcp:22,udp:53` take the same
/// `:PORTS` grammar as a tag (no suffix: all traffic). A default route (`0.0.0.0/0`,
/// `::/0`) takes no ports: an exit node carries all traffic.
pub fn route_destination(d: &str) -> Result<Option<Vec<(Prefix, ProtoPorts)>>, PolicyError> {
    if d == "autogroup:internet" {
        return Ok(Some(vec![
            (DEFAULT_V4, ProtoPorts::all()),
            (DEFAULT_V6, ProtoPorts::all()),
        ]));
    }
    if d == "*"
        || d.starts_with("*:")
        || d.starts_with("tag:")
        || d.starts_with("group:")
        || d.starts_with("peer:")
        || d.starts_with("autogroup:")
        || !d.contains('/')
    {
        return Ok(None);
    }
    let bad = |e: String| PolicyError(format!("destination {d:?}: {e}"));
    let slash = d.find('/').unwrap_or(d.len());
    let digits = d[slash + 1..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    let end = slash + 1 + digits;
    let prefix: Prefix = d[..end]
        .parse()
        .map_err(|e: crate::api::route::PrefixError| bad(e.0))?;
    if end == d.len() {
        return Ok(Some(vec![(prefix, ProtoPorts::all())]));
    }
    let Some(spec) = d[end..].strip_prefix(':') else {
        return Err(bad(format!(
            "unexpected {:?} after the prefix (write PREFIX or PREFIX:PORTS)",
            &d[end..]
        )));
    };
    if prefix.is_default() {
        return Err(bad(
            "ports on a default route are not supported: an exit node carries all traffic \
             (write the default route alone)"
                .into(),
        ));
    }
    let ports = ProtoPorts::parse(spec).map_err(bad)?;
    Ok(Some(vec![(prefix, ports)]))
}

/// Splits `tag:x:80,443` (or `tag:x:tcp:22,udp:53`) into (`tag:x`, ports); no suffix means
/// every port of both protocols.
fn split_ports(d: &str) -> Result<(&str, ProtoPorts), PolicyError> {
    let bad = |e: String| PolicyError(format!("destination {d:?}: {e}"));
    if d == "*" {
        return Ok((d, ProtoPorts::all()));
    }
    if let Some(rest) = d.strip_prefix("*:") {
        return Ok(("*", ProtoPorts::parse(rest).map_err(bad)?));
    }
    // kind:name[:ports]
    let mut parts = d.splitn(3, ':');
    let kind = parts.next().unwrap_or_default();
    let name = parts.next().ok_or_else(|| bad("missing name".into()))?;
    match parts.next() {
        None => Ok((d, ProtoPorts::all())),
        Some(ports) => Ok((
            &d[..kind.len() + 1 + name.len()],
            ProtoPorts::parse(ports).map_err(bad)?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PolicyRule;

    fn rule(src: &[&str], dst: &[&str]) -> PolicyRule {
        PolicyRule {
            src: src.iter().map(|s| s.to_string()).collect(),
            dst: dst.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn doc() -> PolicyDocument {
        PolicyDocument {
            tags: ["node", "supervisor", "worker", "ops"]
                .map(String::from)
                .to_vec(),
            groups: [(
                "servers".to_string(),
                vec!["tag:supervisor".to_string(), "tag:worker".to_string()],
            )]
            .into(),
            app_hosts: vec!["tag:supervisor".into()],
            allow: vec![
                rule(&["tag:node"], &["tag:supervisor:8730"]),
                rule(&["tag:ops"], &["group:servers"]),
                rule(&["peer:boss"], &["*:22"]),
            ],
            deny: vec![rule(&["tag:ops"], &["tag:worker:22"])],
            routes: Default::default(),
        }
    }

    #[test]
    fn prefix_destinations_are_routes_not_selectors() {
        let mut d = doc();
        d.allow.push(rule(
            &["tag:node"],
            &[
                "10.1.0.0/16",
                "fd00:1::/64",
                "autogroup:internet",
                "tag:ops:22",
            ],
        ));
        d.deny.push(rule(&["tag:node"], &["10.1.5.0/24"]));
        d.routes = [("10.0.0.0/8".to_string(), vec!["tag:ops".to_string()])].into();
        let p = Policy::compile(d).unwrap();
        assert_eq!(p.route_allow().len(), 1);
        let r = &p.route_allow()[0];
        assert_eq!(r.dst.len(), 4, "{:?}", r.dst);
        assert_eq!(p.route_deny().len(), 1);
        assert_eq!(p.route_auto().len(), 1);
        // The rule's selector destination still counts for the ACL.
        let t = |names: &[&str]| {
            p.tag_ids(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
        };
        let (node, ops) = (t(&["node"]), t(&["ops"]));
        let pr = |identity, tags| Principal { identity, tags };
        assert!(p
            .allowed_ports(pr("n", &node), pr("o", &ops))
            .tcp
            .contains(22));
        // Bad prefixes and bad ports on a prefix are refused, naming the destination.
        for (dst, want) in [
            ("10.1.0.1/16", "host bits"),
            ("10.1.0.0/40", "too long"),
            ("10.1.0.0/16:", "10.1.0.0/16:"),
            ("10.1.0.0/16:99999", "not a port"),
            ("10.1.0.0/16:tcp:", "10.1.0.0/16:tcp:"),
            ("10.1.0.0/16:icmp:1", "icmp:1"),
            ("10.1.0.0/16x", "after the prefix"),
            ("10.1.0.0/16-22", "after the prefix"),
            ("fd00:1::/64:443-80,", "fd00:1::/64"),
            ("0.0.0.0/0:443", "default route"),
            ("::/0:tcp:443", "default route"),
        ] {
            let mut d = doc();
            d.allow.push(rule(&["tag:node"], &[dst]));
            let e = Policy::compile(d).unwrap_err();
            assert!(
                e.0.contains(want) && e.0.contains("allow rule 3"),
                "{dst}: {e}"
            );
        }
        let mut d = doc();
        d.routes = [("10.1.0.1/16".to_string(), vec!["tag:ops".to_string()])].into();
        assert!(Policy::compile(d).unwrap_err().0.contains("routes"));
        // Ports on a route in the routes section: not a prefix.
        let mut d = doc();
        d.routes = [("10.1.0.0/16:22".to_string(), vec!["tag:ops".to_string()])].into();
        assert!(Policy::compile(d).unwrap_err().0.contains("routes"));
        let mut d = doc();
        d.routes = [("10.1.0.0/16".to_string(), vec!["tag:nope".to_string()])].into();
        assert!(Policy::compile(d).unwrap_err().0.contains("unknown tag"));
    }

    /// Ports on a prefix destination: the tag grammar (bare, ranges, `tcp:`/`udp:`), IPv4
    /// and IPv6 without brackets; a prefix listed twice in a rule gets the union.
    #[test]
    fn prefix_destinations_take_ports_like_tags() {
        let mut d = doc();
        d.allow.push(rule(
            &["tag:node"],
            &[
                "10.1.0.0/16:443",
                "10.1.0.0/16:tcp:22,udp:53",
                "fd00:1::/64:tcp:8000-8010",
                "10.2.0.0/16:*",
                "10.3.0.0/16",
            ],
        ));
        let p = Policy::compile(d).unwrap();
        let r = &p.route_allow()[0];
        let get = |s: &str| {
            let want: Prefix = s.parse().unwrap();
            r.dst
                .iter()
                .find(|(q, _)| *q == want)
                .map(|(_, ports)| ports.clone())
                .unwrap()
        };
        assert_eq!(r.dst.len(), 4, "{:?}", r.dst);
        let lan = get("10.1.0.0/16");
        assert!(lan.contains(Proto::Tcp, 443) && lan.contains(Proto::Udp, 443));
        assert!(lan.contains(Proto::Tcp, 22) && !lan.contains(Proto::Udp, 22));
        assert!(lan.contains(Proto::Udp, 53) && !lan.contains(Proto::Tcp, 53));
        assert!(!lan.contains(Proto::Tcp, 80));
        let v6 = get("fd00:1::/64");
        assert!(v6.contains(Proto::Tcp, 8005) && !v6.contains(Proto::Udp, 8005));
        assert!(!v6.contains(Proto::Tcp, 8011));
        assert_eq!(get("10.2.0.0/16"), ProtoPorts::all());
        assert_eq!(get("10.3.0.0/16"), ProtoPorts::all());
    }

    #[test]
    fn allow_deny_and_ports() {
        let p = Policy::compile(doc()).unwrap();
        let t = |names: &[&str]| {
            p.tag_ids(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
        };
        let (node, sup, work, ops) = (
            t(&["node"]),
            t(&["supervisor"]),
            t(&["worker"]),
            t(&["ops"]),
        );
        let pr = |identity, tags| Principal { identity, tags };
        let a = p.allowed_ports(pr("n", &node), pr("s", &sup));
        assert_eq!(a, ProtoPorts::parse("8730").unwrap());
        assert!(p.allowed_ports(pr("s", &sup), pr("n", &node)).is_empty());
        assert!(p.allowed_ports(pr("n", &node), pr("w", &work)).is_empty());
        // Explicit deny carves 22 out of "every port".
        let o = p.allowed_ports(pr("o", &ops), pr("w", &work));
        assert!(!o.tcp.contains(22) && o.tcp.contains(21) && o.tcp.contains(23));
        assert_eq!(
            p.allowed_ports(pr("o", &ops), pr("s", &sup)),
            ProtoPorts::all()
        );
        // peer: selectors match identities only.
        assert_eq!(
            p.allowed_ports(pr("boss", &[]), pr("x", &node)),
            ProtoPorts::parse("22").unwrap()
        );
        assert!(p.allowed_ports(pr("boss2", &[]), pr("x", &node)).is_empty());
        assert!(p.names_peer("boss"));
        assert!(p.may_host_apps(pr("s", &sup)));
        assert!(!p.may_host_apps(pr("n", &node)));
    }

    /// The tester's verdict is the enforced answer: for every pair of principals, both
    /// protocols and a spread of ports, `decide` allows exactly what `allowed_ports` holds,
    /// and names the rule that decided.
    #[test]
    fn decide_agrees_with_allowed_ports_and_names_the_rule() {
        let mut d = doc();
        d.allow
            .push(rule(&["tag:node"], &["tag:worker:udp:53,tcp:1000-1010"]));
        d.deny.push(rule(&["*"], &["tag:worker:tcp:1005"]));
        let p = Policy::compile(d).unwrap();
        let ids: Vec<(String, Vec<TagId>)> = [
            ("n", vec!["node"]),
            ("s", vec!["supervisor"]),
            ("w", vec!["worker"]),
            ("o", vec!["ops"]),
            ("boss", vec![]),
            ("nw", vec!["node", "worker"]),
        ]
        .into_iter()
        .map(|(i, t)| {
            let t: Vec<String> = t.into_iter().map(String::from).collect();
            (i.to_owned(), p.tag_ids(&t).unwrap())
        })
        .collect();
        for (ia, ta) in &ids {
            for (ib, tb) in &ids {
                let a = Principal {
                    identity: ia,
                    tags: ta,
                };
                let b = Principal {
                    identity: ib,
                    tags: tb,
                };
                let ports = p.allowed_ports(a, b);
                for proto in [Proto::Tcp, Proto::Udp] {
                    for port in [0, 1, 21, 22, 23, 53, 999, 1000, 1005, 1010, 8730, 65535] {
                        let v = p.decide(a, b, proto, port);
                        assert_eq!(
                            v.allowed(),
                            ports.contains(proto, port),
                            "{ia} -> {ib} {proto:?}:{port} {v:?}"
                        );
                    }
                }
            }
        }
        let pr = |identity, tags| Principal { identity, tags };
        let (n, s, w, o) = (&ids[0].1, &ids[1].1, &ids[2].1, &ids[3].1);
        assert_eq!(
            p.decide(pr("n", n), pr("s", s), Proto::Tcp, 8730),
            Verdict::Allowed { allow: 0 }
        );
        assert_eq!(
            p.decide(pr("o", o), pr("w", w), Proto::Tcp, 22),
            Verdict::Denied { allow: 1, deny: 0 }
        );
        assert_eq!(
            p.decide(pr("n", n), pr("w", w), Proto::Tcp, 1005),
            Verdict::Denied { allow: 3, deny: 1 }
        );
        assert_eq!(
            p.decide(pr("s", s), pr("n", n), Proto::Udp, 53),
            Verdict::NoRule
        );
    }

    #[test]
    fn protocol_ports_allow_and_deny_per_protocol() {
        let mut d = doc();
        d.allow = vec![
            rule(&["tag:node"], &["tag:supervisor:tcp:8730,udp:53"]),
            rule(&["tag:ops"], &["tag:worker:1000-2000"]),
        ];
        d.deny = vec![rule(&["tag:ops"], &["tag:worker:udp:1500"])];
        let p = Policy::compile(d).unwrap();
        let t = |names: &[&str]| {
            p.tag_ids(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
        };
        let (node, sup, work, ops) = (
            t(&["node"]),
            t(&["supervisor"]),
            t(&["worker"]),
            t(&["ops"]),
        );
        let pr = |identity, tags| Principal { identity, tags };
        let a = p.allowed_ports(pr("n", &node), pr("s", &sup));
        assert!(a.tcp.contains(8730) && !a.udp.contains(8730));
        assert!(a.udp.contains(53) && !a.tcp.contains(53));
        let o = p.allowed_ports(pr("o", &ops), pr("w", &work));
        assert!(o.tcp.contains(1500) && !o.udp.contains(1500) && o.udp.contains(1501));
        // A bad protocol is refused with the reason.
        let mut d = doc();
        d.allow = vec![rule(&["tag:node"], &["tag:supervisor:icmp:1"])];
        let e = Policy::compile(d).unwrap_err();
        assert!(e.0.contains("icmp:1"), "{e}");
    }

    #[test]
    fn bad_documents_are_rejected_with_a_reason() {
        let cases: Vec<(PolicyDocument, &str)> = vec![
            (
                PolicyDocument {
                    allow: vec![rule(&["tag:nope"], &["*"])],
                    ..doc()
                },
                "unknown tag",
            ),
            (
                PolicyDocument {
                    allow: vec![rule(&["group:nope"], &["*"])],
                    ..doc()
                },
                "unknown group",
            ),
            (
                PolicyDocument {
                    allow: vec![rule(&["tag:node"], &["tag:node:99999"])],
                    ..doc()
                },
                "not a port",
            ),
            (
                PolicyDocument {
                    allow: vec![rule(&["node"], &["*"])],
                    ..doc()
                },
                "bad selector",
            ),
            (
                PolicyDocument {
                    allow: vec![rule(&[], &["*"])],
                    ..doc()
                },
                "must not be empty",
            ),
            (
                PolicyDocument {
                    tags: vec!["a".into(), "a".into()],
                    ..Default::default()
                },
                "twice",
            ),
            (
                PolicyDocument {
                    groups: [("g".to_string(), vec!["group:servers".to_string()])].into(),
                    ..doc()
                },
                "not groups",
            ),
        ];
        for (d, want) in cases {
            let e = Policy::compile(d).unwrap_err();
            assert!(e.0.contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn unknown_tags_are_reported() {
        let p = Policy::compile(doc()).unwrap();
        let e = p.tag_ids(&["node".into(), "bogus".into()]).unwrap_err();
        assert!(e.0.contains("bogus"));
        assert_eq!(p.known_tag_ids(&["node".into(), "bogus".into()]).len(), 1);
    }
}
