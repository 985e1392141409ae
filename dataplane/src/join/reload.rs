//! `systemctl reload tabbify-mesh` (SIGHUP): the joiner re-reads its `--config` file (with
//! the same command line and environment, so flags still beat the file) and applies what can
//! change without a restart.
//!
//! This module owns the decision ([`plan`], sans IO: the options in force and the options
//! just read in, a [`Plan`] out) and the hooks the binary hands to the shell ([`Hooks`]).
//! The shell applies the plan:
//! * certificates and key files ([`Plan::tls`]): re-read and checked; the next coordinator
//!   connection uses them. A file that does not load, or a certificate for another
//!   identity, keeps the old ones;
//! * `advertise-routes`, `advertise-exit-node` (sent at the next heartbeat, the router's
//!   forwarding and masquerade redone), `exit-node` (from one peer to another),
//!   `accept-routes` ([`Plan::routes`]);
//! * `log-level` ([`Plan::log_level`]).
//!
//! Invariants:
//! * a file that does not parse changes nothing: the error (file, line, column, key) is
//!   logged and the joiner keeps every setting it had;
//! * every other changed setting is named in [`Plan::restart`] (logged as "needs a restart:
//!   FIELD", by its flag's name) and left as it was; nothing is half-applied;
//! * `exit-node` from `off` to a peer or back needs a restart (the policy routing and the
//!   sockets' mark are set up at start), so it is in [`Plan::restart`] too.

use super::logic::routes::{ExitChoice, Settings};
use super::JoinOptions;

/// Re-reads the command line and the config file into options (the same parse as at start).
/// `Err`: the message to log (it names the file, line and key).
pub type Reread = Box<dyn Fn() -> anyhow::Result<JoinOptions> + Send + Sync>;
/// Sets the log filter (`--log-level`, `tracing_subscriber::EnvFilter` syntax).
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the binary gives the shell so that SIGHUP can re-read and re-configure.
pub struct Hooks {
    /// See [`Reread`].
    pub reread: Reread,
    /// See [`SetLogLevel`].
    pub set_log_level: SetLogLevel,
}

/// What a reload does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Re-read the TLS files (always, when mTLS is on: the paths may be the same and the
    /// files new).
    pub tls: bool,
    /// The new route flags, when they changed.
    pub routes: Option<Settings>,
    /// The new log filter, when it changed.
    pub log_level: Option<String>,
    /// The settings that changed but need a restart, by flag name, in flag order.
    pub restart: Vec<&'static str>,
}

/// What changes when `new` (just read) replaces `old` (in force).
pub fn plan(old: &JoinOptions, new: &JoinOptions) -> Plan {
    let mut restart = Vec::new();
    let mut differs = |changed: bool, flag: &'static str| {
        if changed {
            restart.push(flag);
        }
    };
    differs(old.name != new.name, "name");
    differs(old.tags != new.tags, "tag");
    differs(old.coordinators != new.coordinators, "coordinator");
    differs(old.ephemeral != new.ephemeral, "ephemeral");
    differs(old.tls.is_some() != new.tls.is_some(), "insecure-no-mtls");
    differs(old.join_token != new.join_token, "join-token");
    differs(old.interface != new.interface, "interface");
    differs(old.listen_port != new.listen_port, "listen-port");
    differs(old.mtu != new.mtu, "mtu");
    differs(old.state_dir != new.state_dir, "state-dir");
    differs(old.threads != new.threads, "threads");
    differs(old.driver != new.driver, "driver");
    differs(old.offloads != new.offloads, "offloads");
    differs(old.pin != new.pin, "pin");
    differs(old.endpoints != new.endpoints, "endpoint");
    differs(old.stun != new.stun, "stun");
    differs(old.relays != new.relays, "relay");
    differs(old.force_relay != new.force_relay, "force-relay");
    differs(old.control_socket != new.control_socket, "control-socket");
    differs(old.key_max_age != new.key_max_age, "key-max-age");
    differs(old.dns.mode != new.dns.mode, "dns");
    differs(old.dns.domain != new.dns.domain, "dns-domain");
    differs(old.metrics.addr != new.metrics.addr, "metrics-bind");
    differs(old.snat != new.snat, "snat");
    differs(old.speedtest != new.speedtest, "speedtest-bind");
    let exit_toggled =
        (old.routes.exit_node == ExitChoice::Off) != (new.routes.exit_node == ExitChoice::Off);
    differs(exit_toggled, "exit-node");
    // Serving clients is registered with the coordinator at start: a restart changes it.
    differs(
        old.routes.concentrator != new.routes.concentrator,
        "concentrator",
    );
    let mut routes = new.routes.clone();
    routes.concentrator = old.routes.concentrator;
    if exit_toggled {
        // The rest of the route flags still apply; the exit node stays as it is.
        routes.exit_node = old.routes.exit_node.clone();
    }
    Plan {
        tls: new.tls.is_some() && old.tls.is_some(),
        routes: (routes != old.routes).then_some(routes),
        log_level: (old.log_level != new.log_level).then(|| new.log_level.clone()),
        restart,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::net::IpNet;

    fn opts() -> JoinOptions {
        JoinOptions {
            name: "web-1".into(),
            tags: vec!["web".into()],
            coordinators: vec!["https://c:8443".into()],
            ephemeral: false,
            tls: Some(super::super::TlsFiles {
                cert: "/etc/tabbify/node.pem".into(),
                key: "/etc/tabbify/node.key".into(),
                ca: "/etc/tabbify/ca.pem".into(),
            }),
            join_token: None,
            interface: "tabbify0".into(),
            listen_port: 51820,
            mtu: 1420,
            state_dir: "/var/lib/tabbify".into(),
            threads: 0,
            driver: None,
            offloads: true,
            pin: false,
            endpoints: vec![],
            stun: vec![],
            relays: vec![],
            force_relay: false,
            control_socket: "/run/tabbify/tabbify0.sock".into(),
            key_max_age: std::time::Duration::from_secs(90 * 86_400),
            dns: super::super::dns::Options::default(),
            metrics: super::super::metrics::MetricsBind::default(),
            routes: Settings::default(),
            snat: true,
            speedtest: None,
            log_level: "info".into(),
        }
    }

    #[test]
    fn an_unchanged_file_only_rereads_the_certificates() {
        assert_eq!(
            plan(&opts(), &opts()),
            Plan {
                tls: true,
                ..Plan::default()
            }
        );
        let mut plain = opts();
        plain.tls = None;
        assert!(!plan(&plain, &plain).tls);
    }

    #[test]
    fn route_flags_and_the_log_level_apply_live() {
        let mut new = opts();
        new.routes.advertised = vec!["10.9.0.0/24".parse::<IpNet>().unwrap()];
        new.routes.advertise_exit_node = true;
        new.routes.accept_routes = false;
        new.log_level = "debug".into();
        let p = plan(&opts(), &new);
        assert!(p.restart.is_empty(), "{p:?}");
        assert_eq!(p.routes.as_ref(), Some(&new.routes));
        assert_eq!(p.log_level.as_deref(), Some("debug"));
        // From one exit node to another is live too.
        let mut a = opts();
        a.routes.exit_node = ExitChoice::Peer("gw-1".into());
        let mut b = a.clone();
        b.routes.exit_node = ExitChoice::Peer("gw-2".into());
        let p = plan(&a, &b);
        assert_eq!(p.routes.unwrap().exit_node, ExitChoice::Peer("gw-2".into()));
        assert!(p.restart.is_empty());
    }

    /// A file edit that would need the engine, the TUN or the identity rebuilt is reported
    /// by flag name and not applied; the route flags next to it still are.
    #[test]
    fn everything_else_is_named_as_needing_a_restart_and_left_alone() {
        let mut new = opts();
        new.name = "other".into();
        new.listen_port = 51821;
        new.interface = "tabbify1".into();
        new.metrics.addr = None;
        new.tls = None;
        new.routes.exit_node = ExitChoice::Peer("gw".into());
        new.routes.accept_routes = false;
        let p = plan(&opts(), &new);
        assert_eq!(
            p.restart,
            [
                "name",
                "insecure-no-mtls",
                "interface",
                "listen-port",
                "metrics-bind",
                "exit-node"
            ]
        );
        assert!(!p.tls, "mTLS switched off is not applied");
        let routes = p.routes.expect("accept-routes still applies");
        assert_eq!(
            routes.exit_node,
            ExitChoice::Off,
            "exit node left as it was"
        );
        assert!(!routes.accept_routes);
        // Serving clients is not switched by a reload either.
        let mut hub = new.clone();
        hub.routes.concentrator = true;
        let p = plan(&opts(), &hub);
        assert!(p.restart.contains(&"concentrator"), "{:?}", p.restart);
        assert!(p.routes.is_none_or(|r| !r.concentrator));
    }
}
