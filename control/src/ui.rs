//! The dashboard (`/ui`): its assets, compiled into the binary from `control/assets/ui/`
//! (plain HTML, CSS and JavaScript, no bundler, no CDN, so it works offline), the headers
//! they are served with, and the admin views the dashboard reads (members, who may reach
//! whom) computed from the registry and the compiled policy.
//!
//! The assets are open (a browser loads them before it has a session); every piece of
//! data they show comes from admin routes that need an admin certificate or a dashboard
//! session ([`crate::sessions`]). The page runs under [`CSP`]: scripts and styles from
//! this origin only, no inline script, no framing.

use crate::api::{
    AdminMember, PortRange, PortRules, ReachClass, ReachEdge, ReachResponse, ReportedTraffic,
};
use crate::registry::{PeerRecord, Registry};

/// The Content-Security-Policy of the dashboard's pages.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

static INDEX: &str = include_str!("../assets/ui/index.html");
static APP_JS: &str = include_str!("../assets/ui/app.js");
static APP_CSS: &str = include_str!("../assets/ui/app.css");

/// The asset at `path` (under `/ui`) and its content type, or `None`.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/ui" | "/ui/" | "/ui/index.html" => Some(("text/html; charset=utf-8", INDEX)),
        "/ui/app.js" => Some(("text/javascript; charset=utf-8", APP_JS)),
        "/ui/app.css" => Some(("text/css; charset=utf-8", APP_CSS)),
        _ => None,
    }
}

/// A member as the dashboard shows it, with its latest traffic report if any.
pub fn admin_member(p: &PeerRecord, traffic: Option<&ReportedTraffic>) -> AdminMember {
    AdminMember {
        peer_id: p.id.clone(),
        identity: p.identity.clone(),
        display_name: p.display_name.clone(),
        ula: p.ula,
        tags: p.tags.clone(),
        nat: p.nat,
        paths: p.paths,
        home_relay: p.home_relay.clone(),
        endpoints: p.endpoints.clone(),
        hosted_app_ulas: p.hosted_app_ulas.clone(),
        last_seen_ms: p.last_seen_ms,
        stale: p.stale,
        traffic: traffic.cloned(),
    }
}

/// Who may reach whom: the registry's visibility classes that have members, and for each
/// visible pair the ports the policy opens from one to the other (the same table the
/// rosters are built from, so the view cannot disagree with what members are told).
pub fn reach(reg: &Registry) -> ReachResponse {
    let mut by_class: std::collections::BTreeMap<u32, (String, Vec<String>)> =
        std::collections::BTreeMap::new();
    for p in reg.peers() {
        let e = by_class.entry(p.class).or_insert_with(|| {
            let known = reg.policy().known_tag_ids(&p.tags);
            let mut label: Vec<String> = p
                .tags
                .iter()
                .filter(|t| {
                    reg.policy()
                        .tag_ids(std::slice::from_ref(*t))
                        .is_ok_and(|id| known.contains(&id[0]))
                })
                .map(|t| format!("tag:{t}"))
                .collect();
            label.sort();
            label.dedup();
            if reg.policy().names_peer(&p.identity) {
                label.push(format!("peer:{}", p.identity));
            }
            if label.is_empty() {
                label.push("(no tags)".into());
            }
            (label.join(" "), Vec::new())
        });
        e.1.push(p.id.clone());
    }
    let vis = reg.visibility();
    let mut edges = Vec::new();
    for &from in by_class.keys() {
        for to in vis.visible_from(from) {
            if !by_class.contains_key(&to) {
                continue;
            }
            if let Some(rules) = vis.port_rules(from, to) {
                let ports = format_outbound(rules);
                if !ports.is_empty() {
                    edges.push(ReachEdge { from, to, ports });
                }
            }
        }
    }
    let classes = by_class
        .into_iter()
        .map(|(id, (label, mut members))| {
            members.sort();
            ReachClass { id, label, members }
        })
        .collect();
    ReachResponse {
        policy_revision: reg.revision(),
        classes,
        edges,
    }
}

/// The ports a viewer may open on a target, in the policy's syntax (`*`, `22`,
/// `tcp:8000-8010`, `udp:53`, comma-separated); empty when none.
pub fn format_outbound(r: &PortRules) -> String {
    let mut parts = Vec::new();
    let fmt = |prefix: &str, ranges: &[PortRange], parts: &mut Vec<String>| {
        for range in ranges {
            let body = if *range == PortRange::ALL {
                "*".to_owned()
            } else if range.first == range.last {
                range.first.to_string()
            } else {
                format!("{}-{}", range.first, range.last)
            };
            parts.push(format!("{prefix}{body}"));
        }
    };
    fmt("", &r.outbound, &mut parts);
    fmt("tcp:", &r.outbound_tcp, &mut parts);
    fmt("udp:", &r.outbound_udp, &mut parts);
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_embedded_without_inline_script_or_remote_origins() {
        let (ct, html) = asset("/ui/").unwrap();
        assert!(ct.starts_with("text/html"));
        assert!(html.contains("/ui/app.js") && html.contains("/ui/app.css"));
        // Every <script> has a src (the CSP forbids inline script) and nothing is fetched
        // from another origin (the dashboard works offline).
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..i + html[i..].find('>').unwrap()];
            assert!(tag.contains("src=\"/ui/"), "{tag}");
        }
        for text in [
            html,
            asset("/ui/app.js").unwrap().1,
            asset("/ui/app.css").unwrap().1,
        ] {
            // The SVG namespace is a name, never fetched.
            let text = text.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(!text.contains("http://") && !text.contains("https://"));
            assert!(!text.contains(" style=\""), "inline styles break the CSP");
        }
        assert!(asset("/ui/nope.js").is_none());
    }

    #[test]
    fn outbound_ports_read_like_the_policy() {
        let r = |a, b| PortRange { first: a, last: b };
        let rules = PortRules {
            outbound: vec![r(22, 22), r(8000, 8010)],
            inbound: vec![],
            outbound_tcp: vec![r(443, 443)],
            outbound_udp: vec![PortRange::ALL],
            inbound_tcp: vec![],
            inbound_udp: vec![],
        };
        assert_eq!(format_outbound(&rules), "22,8000-8010,tcp:443,udp:*");
    }
}
