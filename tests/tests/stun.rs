//! The joiner's STUN probe end to end, in namespaces: a joiner on the public LAN probes the
//! coordinator's STUN server (its HTTP port and the next, on UDP) and a stock coturn
//! (`turnserver --stun-only`, named with `--stun`) from its WireGuard socket, and
//! classifies itself as not NATed (every server saw its own address and listen port);
//! `status --json` shows the class, the mapped endpoint and the servers, and the other
//! member's `peers --json` shows the same class and mapped endpoint from the roster.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use tabbify_api::NatClass;
use tabbify_tests::joiner::JoinSpec;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::testbed::{Testbed, COORDINATOR_PORT};

const COTURN_PORT: u16 = 3478;

#[test]
fn probe_with_coordinator_and_coturn_on_the_wireguard_socket() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Curl, Tool::Coturn])?;
    let bed = Testbed::start(
        json!({"tags": ["node"], "allow": [{"src": ["tag:node"], "dst": ["tag:node"]}]}),
        2,
    )?;
    let lan_ip = bed.lan.addr();
    let coturn_addr = SocketAddr::new(lan_ip.into(), COTURN_PORT);
    let _coturn = bed.lan.netns().spawn(
        "coturn",
        "turnserver",
        &[
            "--stun-only",
            "-n",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "-L",
            &lan_ip.to_string(),
            "-p",
            &COTURN_PORT.to_string(),
            "--log-file",
            "stdout",
        ],
    )?;
    let (ns_a, _pa) = bed.host()?;
    let (ns_b, _pb) = bed.host()?;
    let mut spec = JoinSpec::new("stun-a", &["node"], None);
    spec.stun = vec![coturn_addr.to_string()];
    let mut a = bed.join(&ns_a, spec)?;
    let mut b = bed.join(&ns_b, JoinSpec::new("stun-b", &["node"], None))?;

    let st = a.wait_status("to classify its NAT", Duration::from_secs(20), |s| {
        s.nat == NatClass::None && !s.mapped_endpoints.is_empty()
    })?;
    let coordinator_stun = [
        SocketAddr::new(lan_ip.into(), COORDINATOR_PORT),
        SocketAddr::new(lan_ip.into(), COORDINATOR_PORT + 1),
    ];
    for s in coordinator_stun.iter().chain([&coturn_addr]) {
        assert!(st.stun_servers.contains(s), "{s} in {:?}", st.stun_servers);
    }
    let own = st.mapped_endpoints[0];
    assert_eq!(own.port(), 51820, "no NAT: the listen port itself");
    assert_eq!(st.mapped_endpoints.len(), 1, "{:?}", st.mapped_endpoints);

    // The other member sees a's class and mapped endpoint through the roster.
    b.wait_status("to see a's NAT class", Duration::from_secs(20), |s| {
        s.peer("stun-a")
            .is_some_and(|p| p.nat == NatClass::None && p.mapped_endpoints == vec![own])
    })?;
    let _ = &mut a;
    Ok(())
}
