//! Visibility classes: peers the policy cannot tell apart share a class, and the ACL is
//! evaluated once per pair of classes instead of once per pair of peers.
//!
//! A class is a (sorted tag set, identity if a `peer:` selector names it) pair. For each
//! class the table keeps which rules it matches as a sender (a bitset) and as a receiver
//! (rule index → ports); a pair of classes then costs a walk over the receiver's few
//! matching rules. Each allow rule also lists the classes on its two sides, so a new class
//! is only paired with classes that share an allow rule with it: the work is proportional
//! to the number of visible class pairs, not to C². Rows are sparse (visible classes only)
//! and symmetric, since visibility holds in either direction. Each visible pair maps to an
//! index into a table of distinct [`PortRules`], so roster entries and SSE payloads can be
//! serialized once per distinct answer. Classes are only ever added while a policy is in
//! force (their ids stay valid for that policy); a new policy builds a new table.

use std::collections::HashMap;
use std::sync::Arc;

use crate::api::PortRules;
use crate::policy::{matches, Policy, Principal, TagId};
use crate::ports::{port_rules, ProtoPorts};

/// Index of a class in a [`Visibility`] table.
pub type ClassId = u32;

/// Index (+1) of a distinct [`PortRules`]; 0 means "not visible".
pub type RulesId = u32;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClassKey {
    tags: Vec<TagId>,
    identity: Option<String>,
}

#[derive(Debug)]
struct Class {
    src_allow: Vec<u64>,
    src_deny: Vec<u64>,
    dst_allow: Vec<(u32, ProtoPorts)>,
    dst_deny: Vec<(u32, ProtoPorts)>,
    may_host_apps: bool,
    /// What another class may open on this one, by which of `dst_allow` and `dst_deny`
    /// it matches (bit k = entry k): (allow mask, deny mask, id in `Visibility::sets`).
    /// A receiver sees few distinct masks, so a linear scan beats hashing.
    memo: Vec<(u64, u64, u32)>,
}

/// The per-policy class table and the sparse class × class visibility rows.
#[derive(Debug)]
pub struct Visibility {
    policy: Arc<Policy>,
    keys: HashMap<ClassKey, ClassId>,
    classes: Vec<Class>,
    /// `rows[viewer]`: (target, 1 + index into `rules`) for every visible target,
    /// sorted by target. `t` is in `rows[v]` exactly when `v` is in `rows[t]`.
    rows: Vec<Vec<(ClassId, RulesId)>>,
    /// Per allow rule: classes matching its `src`, and classes matching its `dst`.
    allow_src: Vec<Vec<ClassId>>,
    allow_dst: Vec<Vec<ClassId>>,
    /// Scratch marks for candidate deduplication (`stamp` = "seen this round").
    marks: Vec<u32>,
    stamp: u32,
    rules: Vec<PortRules>,
    rules_index: HashMap<PortRules, RulesId>,
    /// Distinct port sets one class may open on another; id 0 is the empty set. A pair
    /// is computed as ids ([`Class::memo`]), so the common case allocates nothing.
    sets: Vec<ProtoPorts>,
    sets_index: HashMap<ProtoPorts, u32>,
    /// The answer per (outbound set id, inbound set id), so a pair whose sets were seen
    /// before skips building its roster form (`port_rules` splits and allocates).
    pair_index: HashMap<(u32, u32), RulesId>,
}

impl Visibility {
    /// An empty table for `policy`.
    pub fn new(policy: Arc<Policy>) -> Self {
        let n_allow = policy.allow_rules().len();
        Self {
            policy,
            keys: HashMap::new(),
            classes: Vec::new(),
            rows: Vec::new(),
            allow_src: vec![Vec::new(); n_allow],
            allow_dst: vec![Vec::new(); n_allow],
            marks: Vec::new(),
            stamp: 0,
            rules: Vec::new(),
            rules_index: HashMap::new(),
            sets: vec![ProtoPorts::empty()],
            sets_index: HashMap::from([(ProtoPorts::empty(), 0)]),
            pair_index: HashMap::new(),
        }
    }

    /// The policy the table was built for.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Whether there are no classes yet.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// The class of a peer with `identity` and `tags` (tag names the policy does not
    /// define are ignored), creating it and its visibility row if new.
    pub fn class_of(&mut self, identity: &str, tags: &[String]) -> ClassId {
        let key = ClassKey {
            tags: self.policy.known_tag_ids(tags),
            identity: self
                .policy
                .names_peer(identity)
                .then(|| identity.to_owned()),
        };
        if let Some(id) = self.keys.get(&key) {
            return *id;
        }
        let principal = Principal {
            identity,
            tags: &key.tags,
        };
        let class = self.build_class(principal);
        let id = ClassId::try_from(self.classes.len()).unwrap_or(ClassId::MAX);
        self.classes.push(class);
        self.keys.insert(key, id);
        self.extend_rows(id);
        id
    }

    /// Whether a peer of class `viewer` sees a peer of class `target`.
    pub fn visible(&self, viewer: ClassId, target: ClassId) -> bool {
        self.rules_id(viewer, target) != 0
    }

    /// The pair's rules id (0 = not visible); equal ids mean equal [`PortRules`].
    pub fn rules_id(&self, viewer: ClassId, target: ClassId) -> RulesId {
        let Some(row) = self.rows.get(viewer as usize) else {
            return 0;
        };
        match row.binary_search_by_key(&target, |(t, _)| *t) {
            Ok(i) => row[i].1,
            Err(_) => 0,
        }
    }

    /// The port rules a `viewer` peer gets for a `target` peer, if visible.
    pub fn port_rules(&self, viewer: ClassId, target: ClassId) -> Option<&PortRules> {
        match self.rules_id(viewer, target) {
            0 => None,
            id => self.rules.get(id as usize - 1),
        }
    }

    /// Whether peers of `class` may host apps.
    pub fn may_host_apps(&self, class: ClassId) -> bool {
        self.classes
            .get(class as usize)
            .is_some_and(|c| c.may_host_apps)
    }

    /// Every class that sees `target` (the same as those `target` sees).
    pub fn viewers_of(&self, target: ClassId) -> impl Iterator<Item = ClassId> + '_ {
        self.visible_from(target)
    }

    /// Every class `viewer` sees with the pair's rules id, sorted by class.
    pub fn row(&self, viewer: ClassId) -> &[(ClassId, RulesId)] {
        self.rows.get(viewer as usize).map_or(&[], Vec::as_slice)
    }

    /// Every class `viewer` sees.
    pub fn visible_from(&self, viewer: ClassId) -> impl Iterator<Item = ClassId> + '_ {
        self.rows
            .get(viewer as usize)
            .into_iter()
            .flat_map(|row| row.iter().map(|(t, _)| *t))
    }

    fn build_class(&self, p: Principal<'_>) -> Class {
        let bits = |rules: &[crate::policy::Rule]| {
            let mut v = vec![0u64; rules.len().div_ceil(64)];
            for (i, r) in rules.iter().enumerate() {
                if r.src.iter().any(|s| matches(s, p)) {
                    v[i / 64] |= 1 << (i % 64);
                }
            }
            v
        };
        let dst = |rules: &[crate::policy::Rule]| {
            let mut v = Vec::new();
            for (i, r) in rules.iter().enumerate() {
                let mut ports = ProtoPorts::empty();
                for (s, ps) in &r.dst {
                    if matches(s, p) {
                        ports.union_with(ps);
                    }
                }
                if !ports.is_empty() {
                    v.push((i as u32, ports));
                }
            }
            v
        };
        Class {
            src_allow: bits(self.policy.allow_rules()),
            src_deny: bits(self.policy.deny_rules()),
            dst_allow: dst(self.policy.allow_rules()),
            dst_deny: dst(self.policy.deny_rules()),
            may_host_apps: self.policy.may_host_apps(p),
            memo: Vec::new(),
        }
    }

    /// Ports `a` may open on `b`.
    fn ports(&self, a: ClassId, b: ClassId) -> ProtoPorts {
        let (ca, cb) = (&self.classes[a as usize], &self.classes[b as usize]);
        let has = |bits: &[u64], i: u32| bits[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let mut allowed = ProtoPorts::empty();
        for (i, ps) in &cb.dst_allow {
            if has(&ca.src_allow, *i) {
                allowed.union_with(ps);
            }
        }
        if allowed.is_empty() {
            return allowed;
        }
        for (i, ps) in &cb.dst_deny {
            if has(&ca.src_deny, *i) {
                allowed.subtract(ps);
            }
        }
        allowed
    }

    /// The id in `sets` of the ports `a` may open on `b`. The answer depends only on which
    /// of `b`'s receiving rules `a` sends under, so it is remembered per (`b`, those
    /// rules) and computed once.
    fn ports_id(&mut self, a: ClassId, b: ClassId) -> u32 {
        let (ca, cb) = (&self.classes[a as usize], &self.classes[b as usize]);
        if cb.dst_allow.len() > 64 || cb.dst_deny.len() > 64 {
            let p = self.ports(a, b);
            return self.intern(p);
        }
        let has = |bits: &[u64], i: u32| bits[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let mask = |entries: &[(u32, ProtoPorts)], bits: &[u64]| {
            entries
                .iter()
                .enumerate()
                .filter(|(_, (i, _))| has(bits, *i))
                .fold(0u64, |m, (k, _)| m | (1 << k))
        };
        let allow = mask(&cb.dst_allow, &ca.src_allow);
        if allow == 0 {
            return 0;
        }
        let deny = mask(&cb.dst_deny, &ca.src_deny);
        if let Some(&(_, _, id)) = cb.memo.iter().find(|(m, d, _)| *m == allow && *d == deny) {
            return id;
        }
        let p = self.ports(a, b);
        let id = self.intern(p);
        self.classes[b as usize].memo.push((allow, deny, id));
        id
    }

    fn intern(&mut self, p: ProtoPorts) -> u32 {
        if let Some(id) = self.sets_index.get(&p) {
            return *id;
        }
        let id = u32::try_from(self.sets.len()).unwrap_or(u32::MAX);
        self.sets.push(p.clone());
        self.sets_index.insert(p, id);
        id
    }

    /// The rules id of a pair whose outbound and inbound port sets are `out` and `inb`.
    fn pair_of(&mut self, out: u32, inb: u32) -> RulesId {
        if out == 0 && inb == 0 {
            return 0;
        }
        if let Some(id) = self.pair_index.get(&(out, inb)) {
            return *id;
        }
        let rules = port_rules(&self.sets[out as usize], &self.sets[inb as usize]);
        let id = match self.rules_index.get(&rules) {
            Some(id) => *id,
            None => {
                self.rules.push(rules.clone());
                let id = RulesId::try_from(self.rules.len()).unwrap_or(RulesId::MAX);
                self.rules_index.insert(rules, id);
                id
            }
        };
        self.pair_index.insert((out, inb), id);
        id
    }

    fn extend_rows(&mut self, new: ClassId) {
        let c = new as usize;
        // Register the class on the sides of the allow rules it matches.
        let (src_rules, dst_rules): (Vec<u32>, Vec<u32>) = {
            let class = &self.classes[c];
            let src = (0..self.allow_src.len() as u32)
                .filter(|i| class.src_allow[(*i / 64) as usize] & (1 << (*i % 64)) != 0)
                .collect();
            let dst = class.dst_allow.iter().map(|(i, _)| *i).collect();
            (src, dst)
        };
        for r in &src_rules {
            self.allow_src[*r as usize].push(new);
        }
        for r in &dst_rules {
            self.allow_dst[*r as usize].push(new);
        }
        // Candidates: classes across an allow rule from the new one (itself included).
        self.marks.resize(self.classes.len(), 0);
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.stamp = 1;
        }
        let mut candidates = Vec::new();
        for (rules, sides) in [(&src_rules, &self.allow_dst), (&dst_rules, &self.allow_src)] {
            for r in rules.iter() {
                for t in &sides[*r as usize] {
                    if self.marks[*t as usize] != self.stamp {
                        self.marks[*t as usize] = self.stamp;
                        candidates.push(*t);
                    }
                }
            }
        }
        candidates.sort_unstable();
        let mut row = Vec::new();
        self.rows.push(Vec::new());
        for t in candidates {
            let (out, inb) = (self.ports_id(new, t), self.ports_id(t, new));
            let id = self.pair_of(out, inb);
            if id == 0 {
                continue;
            }
            row.push((t, id));
            if t != new {
                // `new` is the largest id so far: pushing keeps the other row sorted.
                let back = self.pair_of(inb, out);
                self.rows[t as usize].push((new, back));
            }
        }
        self.rows[c] = row;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PolicyDocument, PolicyRule, PortRange};

    fn policy(allow: &[(&str, &str)], deny: &[(&str, &str)]) -> Arc<Policy> {
        let r = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(s, d)| PolicyRule {
                    src: vec![s.to_string()],
                    dst: vec![d.to_string()],
                })
                .collect()
        };
        Arc::new(
            Policy::compile(PolicyDocument {
                tags: ["a", "b", "c"].map(String::from).to_vec(),
                allow: r(allow),
                deny: r(deny),
                ..Default::default()
            })
            .unwrap(),
        )
    }

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn visibility_is_either_direction_and_carries_ports() {
        let p = policy(&[("tag:a", "tag:b:80")], &[]);
        let mut v = Visibility::new(p);
        let a = v.class_of("x", &tags(&["a"]));
        let b = v.class_of("y", &tags(&["b"]));
        let c = v.class_of("z", &tags(&["c"]));
        assert!(v.visible(a, b) && v.visible(b, a));
        assert!(!v.visible(a, c) && !v.visible(c, a) && !v.visible(a, a));
        let r = v.port_rules(a, b).unwrap();
        assert_eq!(
            r.outbound,
            vec![PortRange {
                first: 80,
                last: 80
            }]
        );
        assert!(r.inbound.is_empty());
        let r = v.port_rules(b, a).unwrap();
        assert!(r.outbound.is_empty());
        assert_eq!(
            r.inbound,
            vec![PortRange {
                first: 80,
                last: 80
            }]
        );
        assert_eq!(v.viewers_of(b).collect::<Vec<_>>(), vec![a]);
        assert_eq!(v.visible_from(a).collect::<Vec<_>>(), vec![b]);
    }

    #[test]
    fn same_tags_share_a_class_and_named_peers_do_not() {
        let p = policy(&[("peer:boss", "tag:a")], &[]);
        let mut v = Visibility::new(p);
        let x = v.class_of("x", &tags(&["a", "a"]));
        let y = v.class_of("y", &tags(&["a"]));
        let boss = v.class_of("boss", &tags(&["a"]));
        assert_eq!(x, y);
        assert_ne!(x, boss);
        assert!(v.visible(boss, x) && v.visible(x, boss) && !v.visible(x, y));
    }

    #[test]
    fn deny_of_every_port_hides_the_pair() {
        let p = policy(&[("*", "*")], &[("tag:a", "tag:b")]);
        let mut v = Visibility::new(p);
        let a = v.class_of("x", &tags(&["a"]));
        let b = v.class_of("y", &tags(&["b"]));
        let c = v.class_of("z", &tags(&["c"]));
        // a → b is denied, but b → a is allowed, so they still see each other.
        assert!(v.port_rules(a, b).unwrap().outbound.is_empty());
        assert_eq!(v.port_rules(a, b).unwrap().inbound, vec![PortRange::ALL]);
        assert!(v.visible(a, c) && v.visible(a, a));
    }

    #[test]
    fn rows_agree_with_direct_policy_evaluation() {
        let p = policy(
            &[
                ("tag:a", "tag:b:1-100"),
                ("tag:b", "tag:c:50"),
                ("*", "tag:c:7"),
            ],
            &[("tag:a", "tag:b:20-30"), ("tag:c", "*:7")],
        );
        let sets: Vec<Vec<String>> = vec![
            tags(&[]),
            tags(&["a"]),
            tags(&["b"]),
            tags(&["c"]),
            tags(&["a", "b"]),
            tags(&["b", "c"]),
            tags(&["a", "b", "c"]),
        ];
        let mut v = Visibility::new(p.clone());
        let ids: Vec<ClassId> = sets.iter().map(|t| v.class_of("n", t)).collect();
        for (i, ti) in sets.iter().enumerate() {
            for (j, tj) in sets.iter().enumerate() {
                let (ki, kj) = (p.known_tag_ids(ti), p.known_tag_ids(tj));
                let pi = Principal {
                    identity: "n",
                    tags: &ki,
                };
                let pj = Principal {
                    identity: "n",
                    tags: &kj,
                };
                let out = p.allowed_ports(pi, pj);
                let inb = p.allowed_ports(pj, pi);
                match v.port_rules(ids[i], ids[j]) {
                    None => assert!(out.is_empty() && inb.is_empty()),
                    Some(r) => {
                        assert_eq!(r, &port_rules(&out, &inb));
                    }
                }
            }
        }
    }

    #[test]
    fn random_policies_agree_with_direct_evaluation() {
        let seed = std::cell::Cell::new(0x1234_5678_9abc_def1u64);
        let rnd = |n: u64| {
            let mut x = seed.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            seed.set(x);
            x % n
        };
        let names = ["a", "b", "c", "d", "e", "f"];
        for _ in 0..40 {
            let sel = |with_ports: bool| -> String {
                let base = match rnd(8) {
                    0 => "*".to_string(),
                    1 => "peer:n3".to_string(),
                    _ => format!("tag:{}", names[rnd(6) as usize]),
                };
                if with_ports && rnd(2) == 0 {
                    let p = rnd(50) as u16;
                    let suffix = format!("{}-{}", p, p + rnd(20) as u16);
                    if base == "*" {
                        format!("*:{suffix}")
                    } else {
                        format!("{base}:{suffix}")
                    }
                } else {
                    base
                }
            };
            let rules = |n: u64| -> Vec<PolicyRule> {
                (0..n)
                    .map(|_| PolicyRule {
                        src: vec![sel(false)],
                        dst: vec![sel(true), sel(true)],
                    })
                    .collect()
            };
            let allow = rules(rnd(6) + 1);
            let deny = rules(rnd(3));
            let p = Arc::new(
                Policy::compile(PolicyDocument {
                    tags: names.map(String::from).to_vec(),
                    allow,
                    deny,
                    ..Default::default()
                })
                .unwrap(),
            );
            let mut v = Visibility::new(p.clone());
            let peers: Vec<(String, Vec<String>)> = (0..12)
                .map(|i| {
                    let tags = names
                        .iter()
                        .filter(|_| rnd(3) == 0)
                        .map(|t| t.to_string())
                        .collect();
                    (format!("n{i}"), tags)
                })
                .collect();
            let classes: Vec<ClassId> = peers.iter().map(|(n, t)| v.class_of(n, t)).collect();
            for (i, (ni, ti)) in peers.iter().enumerate() {
                for (j, (nj, tj)) in peers.iter().enumerate() {
                    let (ki, kj) = (p.known_tag_ids(ti), p.known_tag_ids(tj));
                    let pi = Principal {
                        identity: ni,
                        tags: &ki,
                    };
                    let pj = Principal {
                        identity: nj,
                        tags: &kj,
                    };
                    let out = p.allowed_ports(pi, pj);
                    let inb = p.allowed_ports(pj, pi);
                    let got = v.port_rules(classes[i], classes[j]);
                    match got {
                        None => assert!(out.is_empty() && inb.is_empty()),
                        Some(r) => {
                            assert_eq!(r, &port_rules(&out, &inb));
                        }
                    }
                    assert_eq!(
                        v.viewers_of(classes[j]).any(|c| c == classes[i]),
                        got.is_some()
                    );
                }
            }
        }
    }
}
