//! Visibility classes: peers the policy cannot tell apart share a class, and the ACL is
//! evaluated once per pair of classes instead of once per pair of peers.
//!
//! A class is a (sorted tag set, identity if a `peer:` selector names it) pair. For each
//! class the table keeps which rules it matches as a sender (a bitset) and as a receiver
//! (rule index → ports); a pair of classes then costs a walk over the receiver's few
//! matching rules. The result for every ordered pair is an index into a table of distinct
//! [`PortRules`], so roster entries and SSE payloads can be serialized once per distinct
//! answer. Classes are only ever added while a policy is in force (their ids stay valid
//! for that policy); a new policy builds a new table.
//!
//! Cost: O(C² · r) for C classes and r rules matching a class, C usually being the
//! number of distinct tag sets in the mesh, not the number of peers.

use std::collections::HashMap;
use std::sync::Arc;

use crate::api::PortRules;
use crate::policy::{matches, Policy, Principal, TagId};
use crate::ports::PortSet;

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
    dst_allow: Vec<(u32, PortSet)>,
    dst_deny: Vec<(u32, PortSet)>,
    may_host_apps: bool,
}

/// The per-policy class table and the class × class visibility matrix.
#[derive(Debug)]
pub struct Visibility {
    policy: Arc<Policy>,
    keys: HashMap<ClassKey, ClassId>,
    classes: Vec<Class>,
    /// `matrix[viewer][target]`: 0 = not visible, else 1 + index into `rules`.
    matrix: Vec<Vec<RulesId>>,
    rules: Vec<PortRules>,
    rules_index: HashMap<PortRules, RulesId>,
}

impl Visibility {
    /// An empty table for `policy`.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self {
            policy,
            keys: HashMap::new(),
            classes: Vec::new(),
            matrix: Vec::new(),
            rules: Vec::new(),
            rules_index: HashMap::new(),
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
    /// define are ignored), creating it and its matrix row and column if new.
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
        self.extend_matrix(id);
        id
    }

    /// Whether a peer of class `viewer` sees a peer of class `target`.
    pub fn visible(&self, viewer: ClassId, target: ClassId) -> bool {
        self.rules_id(viewer, target) != 0
    }

    /// The pair's rules id (0 = not visible); equal ids mean equal [`PortRules`].
    pub fn rules_id(&self, viewer: ClassId, target: ClassId) -> RulesId {
        self.matrix
            .get(viewer as usize)
            .and_then(|row| row.get(target as usize))
            .copied()
            .unwrap_or(0)
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

    /// Every class that sees `target`.
    pub fn viewers_of(&self, target: ClassId) -> impl Iterator<Item = ClassId> + '_ {
        self.matrix
            .iter()
            .enumerate()
            .filter(move |(_, row)| row.get(target as usize).is_some_and(|r| *r != 0))
            .map(|(v, _)| v as ClassId)
    }

    /// Every class `viewer` sees.
    pub fn visible_from(&self, viewer: ClassId) -> impl Iterator<Item = ClassId> + '_ {
        self.matrix
            .get(viewer as usize)
            .into_iter()
            .flat_map(|row| row.iter().enumerate())
            .filter(|(_, r)| **r != 0)
            .map(|(t, _)| t as ClassId)
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
                let mut ports = PortSet::empty();
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
        }
    }

    /// Ports `a` may open on `b`.
    fn ports(&self, a: ClassId, b: ClassId) -> PortSet {
        let (ca, cb) = (&self.classes[a as usize], &self.classes[b as usize]);
        let has = |bits: &[u64], i: u32| bits[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let mut allowed = PortSet::empty();
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

    fn pair(&mut self, viewer: ClassId, target: ClassId) -> RulesId {
        let outbound = self.ports(viewer, target);
        let inbound = self.ports(target, viewer);
        if outbound.is_empty() && inbound.is_empty() {
            return 0;
        }
        let rules = PortRules {
            outbound: outbound.ranges().to_vec(),
            inbound: inbound.ranges().to_vec(),
        };
        if let Some(id) = self.rules_index.get(&rules) {
            return *id;
        }
        self.rules.push(rules.clone());
        let id = RulesId::try_from(self.rules.len()).unwrap_or(RulesId::MAX);
        self.rules_index.insert(rules, id);
        id
    }

    fn extend_matrix(&mut self, new: ClassId) {
        let n = self.classes.len();
        let mut row = Vec::with_capacity(n);
        for t in 0..n as ClassId {
            row.push(self.pair(new, t));
        }
        for v in 0..(n - 1) as ClassId {
            let id = self.pair(v, new);
            self.matrix[v as usize].push(id);
        }
        self.matrix.push(row);
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
    fn matrix_agrees_with_direct_policy_evaluation() {
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
                        assert_eq!(r.outbound, out.ranges());
                        assert_eq!(r.inbound, inb.ranges());
                    }
                }
            }
        }
    }
}
