//! Hostname routes: which app serves a hostname (and optionally a path prefix under it).
//!
//! File format, one route per line, fields separated by spaces or tabs, `#` starts a comment:
//!
//! ```text
//! # host               [path-prefix]   app-uuid
//! shop.example.com                     3f2a7c1e-0b6d-4d8e-9a51-7b0c2d4e6f80
//! shop.example.com     /api            9b1c2d3e-4f50-4a6b-8c7d-8e9f0a1b2c3d
//! ```
//!
//! A request whose `Host` (port ignored, case-insensitive) is listed goes to the route with
//! the longest prefix that matches its path on a segment boundary (`/api` matches `/api` and
//! `/api/x`, not `/apix`); no prefix means `/`. The full path is forwarded unchanged.
//!
//! The active table is an [`ArcSwap`]: requests read it without locks, and [`watch`] swaps in
//! a new table when the file changes. A file that fails to parse is rejected whole and the old
//! table stays; the log names the line and the field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use thiserror::Error;
use uuid::Uuid;

use crate::metrics::Metrics;

/// Why a routes file was rejected.
#[derive(Debug, Error)]
pub enum RouteError {
    /// A line is malformed; `field` is `line`, `host`, `prefix` or `app`.
    #[error("line {line}, field {field}: {reason}")]
    Invalid {
        /// 1-based line number.
        line: usize,
        /// Which field is wrong.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The routes file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// One route, as listed in the file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Route {
    /// Lower-case hostname.
    pub host: String,
    /// Path prefix without trailing slash (`/` for the whole host).
    pub prefix: String,
    /// The app that serves it.
    pub app: Uuid,
}

/// The hostname → (prefix → app) table.
#[derive(Debug, Default)]
pub struct HostRoutes {
    /// Per host, routes sorted by prefix length, longest first.
    hosts: HashMap<String, Vec<Route>>,
    len: usize,
}

impl HostRoutes {
    /// Parses the routes file format (see the module docs).
    pub fn parse(text: &str) -> Result<Self, RouteError> {
        let mut hosts: HashMap<String, Vec<Route>> = HashMap::new();
        let mut first_line: HashMap<(String, String), usize> = HashMap::new();
        let mut len = 0;
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let content = raw.split('#').next().unwrap_or("");
            let fields: Vec<&str> = content.split_ascii_whitespace().collect();
            let (host, prefix, app) = match fields.as_slice() {
                [] => continue,
                [host, app] => (*host, "/", *app),
                [host, prefix, app] => (*host, *prefix, *app),
                _ => {
                    return Err(invalid(
                        line,
                        "line",
                        format!(
                            "expected `host [prefix] app-uuid`, found {} fields",
                            fields.len()
                        ),
                    ))
                }
            };
            let host = parse_host(host).map_err(|r| invalid(line, "host", r))?;
            let prefix = parse_prefix(prefix).map_err(|r| invalid(line, "prefix", r))?;
            let app = Uuid::try_parse(app)
                .map_err(|_| invalid(line, "app", format!("`{app}` is not a UUID")))?;
            if let Some(first) = first_line.insert((host.clone(), prefix.clone()), line) {
                return Err(invalid(
                    line,
                    "prefix",
                    format!("duplicate route for {host} {prefix} (first on line {first})"),
                ));
            }
            hosts
                .entry(host.clone())
                .or_default()
                .push(Route { host, prefix, app });
            len += 1;
        }
        for routes in hosts.values_mut() {
            routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        }
        Ok(HostRoutes { hosts, len })
    }

    /// Reads and parses a routes file.
    pub fn load(path: &Path) -> Result<Self, RouteError> {
        let text = std::fs::read_to_string(path).map_err(|source| RouteError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The app for a request with this `Host` header value and path, if a route matches.
    pub fn lookup(&self, host: &str, path: &str) -> Option<Uuid> {
        if self.hosts.is_empty() {
            return None;
        }
        let host = strip_port(host);
        let routes = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(&host.to_ascii_lowercase())
        } else {
            self.hosts.get(host)
        }?;
        routes
            .iter()
            .find(|r| prefix_matches(&r.prefix, path))
            .map(|r| r.app)
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every route, sorted by host then longest prefix first.
    pub fn routes(&self) -> Vec<Route> {
        let mut all: Vec<Route> = self.hosts.values().flatten().cloned().collect();
        all.sort_by(|a, b| {
            a.host
                .cmp(&b.host)
                .then(b.prefix.len().cmp(&a.prefix.len()))
        });
        all
    }
}

fn invalid(line: usize, field: &'static str, reason: String) -> RouteError {
    RouteError::Invalid {
        line,
        field,
        reason,
    }
}

fn parse_host(host: &str) -> Result<String, String> {
    let ok_chars = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if host.is_empty() || host.len() > 253 || !ok_chars || host.starts_with(['.', '-']) {
        return Err(format!(
            "`{host}` is not a hostname (letters, digits, `-` and `.`, no port)"
        ));
    }
    Ok(host.trim_end_matches('.').to_ascii_lowercase())
}

fn parse_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') || prefix.contains(['?', '#']) {
        return Err(format!(
            "`{prefix}` is not a path prefix (must start with `/`, no query)"
        ));
    }
    let trimmed = prefix.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    })
}

/// `example.com:8090` → `example.com`, `[::1]:80` → `[::1]`; a trailing dot is dropped.
fn strip_port(host: &str) -> &str {
    let host = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    host.strip_suffix('.').unwrap_or(host)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// The active routes table, shared by every connection.
#[derive(Default)]
pub struct Routes {
    table: ArcSwap<HostRoutes>,
}

impl Routes {
    /// A handle holding `table`.
    pub fn new(table: HostRoutes) -> Self {
        Routes {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// The current table (cheap; valid even if a reload happens meanwhile).
    pub fn current(&self) -> arc_swap::Guard<Arc<HostRoutes>> {
        self.table.load()
    }

    /// Replaces the table; requests already routed are unaffected.
    pub fn replace(&self, table: HostRoutes) {
        self.table.store(Arc::new(table));
    }
}

/// What identifies one version of the file: modification time, size and inode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// Polls `path` every `interval` and swaps in the new table when the file changes (also when
/// it is replaced by a rename). Runs until the task is dropped. A file that cannot be read or
/// parsed is logged with its line and field and the current table stays in force.
pub async fn watch(path: PathBuf, routes: Arc<Routes>, metrics: Arc<Metrics>, interval: Duration) {
    let mut last = stamp(&path).ok();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let now = match stamp(&path) {
            Ok(s) => Some(s),
            Err(err) => {
                if last.is_some() {
                    tracing::warn!(path = %path.display(), error = %err, "routes file unreadable; keeping the current routes");
                    metrics.routes_rejected();
                }
                last = None;
                continue;
            }
        };
        if now == last {
            continue;
        }
        last = now;
        match HostRoutes::load(&path) {
            Ok(table) => {
                tracing::info!(path = %path.display(), routes = table.len(), "routes reloaded");
                metrics.routes_loaded(table.len());
                routes.replace(table);
            }
            Err(err) => {
                tracing::error!(path = %path.display(), error = %err, "routes file rejected; keeping the current routes");
                metrics.routes_rejected();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "00000000-0000-4000-8000-00000000000a";
    const B: &str = "00000000-0000-4000-8000-00000000000b";
    const C: &str = "00000000-0000-4000-8000-00000000000c";

    fn u(s: &str) -> Uuid {
        Uuid::parse_str(s).unwrap()
    }

    #[test]
    fn longest_prefix_on_segment_boundary_wins() {
        let t = HostRoutes::parse(&format!(
            "# comment\n\nShop.Example.com {A}\nshop.example.com /api {B}  # trailing\nshop.example.com /api/v2/ {C}\n"
        ))
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup("shop.example.com", "/"), Some(u(A)));
        assert_eq!(t.lookup("shop.example.com", "/apix"), Some(u(A)));
        assert_eq!(t.lookup("shop.example.com", "/api"), Some(u(B)));
        assert_eq!(t.lookup("shop.example.com", "/api/v1/x"), Some(u(B)));
        assert_eq!(t.lookup("SHOP.example.com:8090", "/api/v2"), Some(u(C)));
        assert_eq!(t.lookup("shop.example.com.", "/api/v2/y"), Some(u(C)));
        assert_eq!(t.lookup("other.example.com", "/"), None);
    }

    #[test]
    fn host_without_root_route_misses_other_paths() {
        let t = HostRoutes::parse(&format!("a.test /only {A}\n")).unwrap();
        assert_eq!(t.lookup("a.test", "/only/x"), Some(u(A)));
        assert_eq!(t.lookup("a.test", "/"), None);
    }

    fn err_of(text: &str) -> (usize, &'static str) {
        match HostRoutes::parse(text).unwrap_err() {
            RouteError::Invalid { line, field, .. } => (line, field),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn errors_name_line_and_field() {
        assert_eq!(
            err_of(&format!("a.test {A}\nb.test not-a-uuid\n")),
            (2, "app")
        );
        assert_eq!(err_of(&format!("a.test:80 {A}\n")), (1, "host"));
        assert_eq!(err_of(&format!("a.test api {A}\n")), (1, "prefix"));
        assert_eq!(err_of(&format!("\n\na.test / {A} extra\n")), (3, "line"));
        assert_eq!(err_of("lonely\n"), (1, "line"));
        assert_eq!(
            err_of(&format!("a.test /x {A}\nA.test /x/ {B}\n")),
            (2, "prefix")
        );
    }

    #[test]
    fn routes_lists_every_entry() {
        let t = HostRoutes::parse(&format!("b.test {A}\na.test /x {B}\na.test {C}\n")).unwrap();
        let r = t.routes();
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].host.as_str(), r[0].prefix.as_str()), ("a.test", "/x"));
        assert_eq!(r[2].host, "b.test");
    }

    #[test]
    fn strip_port_handles_ipv6_literals() {
        assert_eq!(strip_port("[::1]:8090"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("h:1"), "h");
    }
}
