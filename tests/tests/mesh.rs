//! The live mesh (`tabbify-mesh join` driven by the coordinator) end to end, in namespaces
//! this test makes and removes.
//!
//! `live_mesh_follows_the_acl_policy_changes_revocation_and_outages`, one topology, steps in
//! order:
//!
//! | step | what | checked |
//! |---|---|---|
//! | join | coordinator (mTLS) in the LAN namespace; `supervisor-01`, `supervisor-02` (tag supervisor, io_uring), `node-01` (tag node, epoll, 1 thread), each in its own namespace on the LAN | every joiner registered; rosters, tags, `may_host_apps`, port rules per the policy; node key 0600 in the state dir |
//! | apps | `app add` on supervisor-01 (and refused on node-01); the test app on `[app_ula]:8730` | the ULA is the shared derivation; node-01 routes it within 1 s |
//! | ACL | ping matrix over peer ULAs | sup↔sup and node→sup answer; sup→node gets nothing |
//! | app | HTTP from node-01 and supervisor-02 to `[app_ula]:8730` | the app answers |
//! | outage | SIGKILL the coordinator | joiners report `registered: false`; sup1→sup2 and node→sup1 pings lose nothing for 3 s; HTTP still works |
//! | restart | the coordinator again on the same state dir | every joiner `registered: true`, the same rosters, traffic flows |
//! | policy | PUT a policy without node→supervisor | node→sup1 traffic stops within 1 s; sup1↔sup2 is not disturbed; rosters shrink |
//! | app remove | `app remove` on supervisor-01 | supervisor-02 withdraws its app ULA route within 1 s; the address leaves supervisor-01's interface |
//! | revoke | DELETE supervisor-02 | sup1↔sup2 traffic stops within 1 s; sup1's roster empties; sup2 exits non-zero naming the revocation, interface and control socket removed |
//! | stop | SIGTERM the other joiners | exit 0, interface and control socket removed |
//!
//! `refusals_restarts_and_an_unreachable_coordinator`: `join` without a coordinator says how
//! to give one; a made-up token and a used single-use token are refused at the first
//! registration (non-zero exit naming `token_invalid` / `token_used`); a joiner restarted on
//! its state dir without a token keeps its peer id and ULA; a joiner started while the
//! coordinator is down keeps its interface up, keeps retrying and registers once it is back.
//!
//! `joiners_behind_two_nats_connect_directly_by_hole_punching`: two supervisors, each behind
//! its own masquerading router ([`NatRouter`]), reach each other over ULAs, and `peers --json`
//! on each side shows a completed handshake, `direct: true` and the other NAT's public
//! address as the endpoint.
//!
//! `a_key_rotation_keeps_the_address_tags_and_the_tunnel`: two supervisors see each other;
//! `tabbify-mesh rotate-key` on supervisor-a answers with a new public key and the same peer
//! id and ULA; its status and supervisor-b's roster show the new key under the same peer id,
//! ULA and tags; the state dir holds the new key (0600) and no pending one; pings over the
//! ULAs flow again both ways (a re-handshake under the new key).
//!
//! `a_joiner_cut_from_the_coordinator_keeps_its_tunnels_and_comes_back_fresh` (issue 11,
//! cascade teardown): with 1 s heartbeats (expiry after 3 s), nftables in supervisor-01's
//! namespace drops its packets to the coordinator for 8 s; the coordinator marks it stale,
//! supervisor-02 keeps it (`peers --json` shows `stale: true`) and pings to it over the
//! tunnel lose nothing; once the rule goes, its heartbeats make it fresh again.
//!
//! `a_second_claim_on_an_app_leaves_its_traffic_with_the_holder` (issue 11, app capture):
//! supervisor-02 adds supervisor-01's app and serves an impostor on its ULA; the coordinator
//! refuses the claim, supervisor-02 shows it contested (naming supervisor-01) and stays
//! registered, and node-01's HTTP to the app keeps reaching supervisor-01's app; once
//! supervisor-01 removes the app, supervisor-02's next heartbeat claims it.
//!
//! "Within 1 s" is the bound the issue states; the checks use 1 s plus a 0.5 s margin for
//! scheduling on a shared 2-core machine (process start-up of the admin's curl included),
//! measured from just before the admin request is sent, with a background ping every 50 ms
//! whose reply timestamps say when traffic stopped.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use http_body_util::{BodyExt, Either, Full};
use serde_json::{json, Value};
use tabbify_api::ula;
use tabbify_tests::joiner::Joiner;
use tabbify_tests::pinger::unix_now;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::status::PortRange;
use tabbify_tests::traffic::{ping, wait_ping};
use tabbify_tests::wg::Driver;
use tabbify_tests::{AppProcess, JoinSpec, NatRouter, Netns, Pinger, Testbed};

/// The app supervisor-01 hosts.
const APP: &str = "3f2a7c1e-0b6d-4d8e-9a51-7b0c2d4e6f80";

/// The issue's bound for a policy change or a revocation to cut traffic (1 s), plus a
/// scheduling margin (see the module documentation).
const CUT_BOUND: Duration = Duration::from_millis(1_500);

/// The issue's bound for a remote app ULA's route to appear or go (1 s), plus the same
/// margin.
const ROUTE_BOUND: Duration = Duration::from_millis(1_500);

/// How long traffic is watched after it should have stopped, or while it must go on.
const OBSERVE: Duration = Duration::from_secs(1);

/// How long the coordinator stays down.
const OUTAGE: Duration = Duration::from_secs(3);

/// Deadline for rosters to settle, first handshakes and re-registration (liveness only).
const SETTLE: Duration = Duration::from_secs(30);

/// Heartbeat interval the coordinator hands out.
const HEARTBEAT_SECS: u64 = 3;

fn testapp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tabbify-testapp"))
}

/// The test policy: supervisors talk to each other, nodes may open supervisors, and
/// supervisors host apps. Without `node_to_supervisor` only the first rule remains.
fn policy(node_to_supervisor: bool) -> Value {
    let mut allow = vec![json!({"src": ["tag:supervisor"], "dst": ["tag:supervisor"]})];
    if node_to_supervisor {
        allow.push(json!({"src": ["tag:node"], "dst": ["tag:supervisor"]}));
    }
    json!({
        "tags": ["supervisor", "node"],
        "app_hosts": ["tag:supervisor"],
        "allow": allow,
    })
}

fn prerequisites(extra: &[Tool]) -> Result<()> {
    let mut tools = vec![Tool::Iproute2, Tool::Ping, Tool::Curl];
    tools.extend_from_slice(extra);
    require(&tools)?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    Ok(())
}

/// GET `url` from inside `netns`; returns status and JSON body, or an error when no answer
/// came within `timeout`.
fn http_get(netns: &Netns, url: &str, timeout: Duration) -> Result<(u16, Value)> {
    let url = url.to_owned();
    tabbify_tests::inside::block_on(netns, || async move {
        let request =
            http::Request::get(&url).body(Either::Right(Full::new(bytes::Bytes::new())))?;
        let exchange = async {
            let response = tabbify_edge::testkit::client().request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .with_context(|| format!("no answer from {url} within {timeout:?}"))?
    })
}

/// Whether `netns` has a /128 route to `addr` on `ifname`.
fn has_route(netns: &Netns, addr: Ipv6Addr, ifname: &str) -> bool {
    netns
        .ip(&["-6", "route", "show", &format!("{addr}/128")])
        .is_ok_and(|routes| routes.contains(&format!("dev {ifname}")))
}

fn expect_no_reply(from: &Joiner, to_name: &str, to: Ipv6Addr) -> Result<()> {
    let stats = ping(from.netns(), IpAddr::V6(to), 3, "0.2")?;
    ensure!(
        stats.received == 0,
        "{} → {to_name} ({to}) must be refused by the ACL, got {stats:?}",
        from.name()
    );
    Ok(())
}

#[test]
fn live_mesh_follows_the_acl_policy_changes_revocation_and_outages() -> Result<()> {
    prerequisites(&[])?;
    let mut bed = Testbed::start(policy(true), HEARTBEAT_SECS)?;
    let (sup1_ns, sup1_lan) = bed.host()?;
    let (sup2_ns, _) = bed.host()?;
    let (node_ns, node_lan) = bed.host()?;

    // --- join
    let mut sup1 = bed.join(
        &sup1_ns,
        JoinSpec::new("supervisor-01", &["supervisor"], None),
    )?;
    let mut sup2 = bed.join(
        &sup2_ns,
        JoinSpec::new("supervisor-02", &["supervisor"], None),
    )?;
    let mut node_spec = JoinSpec::new("node-01", &["node"], None);
    node_spec.driver = Some(Driver::Epoll);
    node_spec.threads = Some(1);
    let mut node = bed.join(&node_ns, node_spec)?;

    let s1 = sup1.wait_peer_names(&["node-01", "supervisor-02"], SETTLE)?;
    let s2 = sup2.wait_peer_names(&["node-01", "supervisor-01"], SETTLE)?;
    let n = node.wait_peer_names(&["supervisor-01", "supervisor-02"], SETTLE)?;
    for (status, tag, hosts) in [
        (&s1, "supervisor", true),
        (&s2, "supervisor", true),
        (&n, "node", false),
    ] {
        ensure!(
            status.tags == [tag],
            "{}: tags {:?}",
            status.name,
            status.tags
        );
        ensure!(
            status.may_host_apps == hosts,
            "{}: may_host_apps {}",
            status.name,
            status.may_host_apps
        );
        ensure!(
            ula::is_peer_ula(&status.ula),
            "{}: ULA {}",
            status.name,
            status.ula
        );
        ensure!(
            status.peer_id.len() == 16 && status.peer_id.chars().all(|c| c.is_ascii_hexdigit()),
            "{}: peer id {:?}",
            status.name,
            status.peer_id
        );
        ensure!(
            status.registered && status.coordinator.connected,
            "{}",
            status.summary()
        );
        ensure!(
            status.coordinator.url == bed.coordinator.url(),
            "{}: coordinator url {}",
            status.name,
            status.coordinator.url
        );
    }
    ensure!(
        n.driver.contains("epoll"),
        "node-01 runs driver {}",
        n.driver
    );
    for joiner in [&sup1, &sup2, &node] {
        let key = joiner.state_dir().join("node.key");
        let mode = std::fs::metadata(&key)
            .with_context(|| format!("{}: no {}", joiner.name(), key.display()))?
            .permissions()
            .mode()
            & 0o777;
        ensure!(mode == 0o600, "{}: node.key mode {mode:o}", joiner.name());
    }
    // Port rules as the policy says: all traffic between supervisors and from the node to
    // the supervisors, nothing from the supervisors to the node.
    let all = vec![PortRange::ALL];
    let rules = |status: &tabbify_tests::status::Status, name: &str| {
        status
            .peer(name)
            .map(|peer| (peer.ports.outbound.clone(), peer.ports.inbound.clone()))
    };
    ensure!(
        rules(&s1, "supervisor-02") == Some((all.clone(), all.clone())),
        "{}",
        s1.summary()
    );
    ensure!(
        rules(&s1, "node-01") == Some((vec![], all.clone())),
        "{}",
        s1.summary()
    );
    ensure!(
        rules(&n, "supervisor-01") == Some((all.clone(), vec![])),
        "{}",
        n.summary()
    );
    let (sup1_ula, sup2_ula, node_ula) = (s1.ula, s2.ula, n.ula);

    // --- apps
    let app: uuid::Uuid = APP.parse()?;
    ensure!(
        node.app_add(&app).is_err(),
        "node-01 may not host apps, yet `app add` succeeded"
    );
    let before_add = Instant::now();
    let app_ula = sup1.app_add(&app)?;
    ensure!(
        app_ula == ula::app_ula(&app),
        "`app add` printed {app_ula}, the shared derivation gives {}",
        ula::app_ula(&app)
    );
    tabbify_tests::wait::until_true(
        "node-01 to route the app ULA through its interface",
        ROUTE_BOUND.saturating_sub(before_add.elapsed()),
        || has_route(&node_ns, app_ula, node.ifname()),
    )
    .with_context(|| format!("routes: {:?}", node_ns.ip(&["-6", "route"])))?;
    eprintln!("app ULA route on node-01 after {:?}", before_add.elapsed());
    node.wait_peer("supervisor-01", "to advertise the app", SETTLE, |peer| {
        peer.app_ulas.contains(&app_ula)
    })?;
    let s1 = sup1.status()?;
    ensure!(
        s1.hosted_apps.len() == 1 && s1.hosted_apps[0].ula == app_ula,
        "{}",
        s1.summary()
    );
    let _app = AppProcess::start(
        &sup1_ns,
        testapp(),
        SocketAddr::new(app_ula.into(), tabbify_tests::app::APP_PORT),
        "app-01",
    )?;

    // --- ACL: the ping matrix
    for (from, to_name, to) in [
        (&sup1, "supervisor-02", sup2_ula),
        (&sup2, "supervisor-01", sup1_ula),
        (&node, "supervisor-01", sup1_ula),
        (&node, "supervisor-02", sup2_ula),
    ] {
        wait_ping(from.netns(), IpAddr::V6(to), SETTLE)
            .with_context(|| format!("{} → {to_name} must be allowed", from.name()))?;
    }
    // node-01 has opened its tunnels to both supervisors, so silence here is the filter.
    expect_no_reply(&sup1, "node-01", node_ula)?;
    expect_no_reply(&sup2, "node-01", node_ula)?;
    let direct = sup1.wait_peer("node-01", "to show the handshake", SETTLE, |peer| {
        peer.direct && peer.latest_handshake.is_some()
    })?;
    ensure!(
        direct.endpoint == Some(SocketAddr::new(node_lan.addr.into(), 51820)),
        "supervisor-01 reaches node-01 at {:?}, its LAN address is {}",
        direct.endpoint,
        node_lan.addr
    );
    let back = node.wait_peer("supervisor-01", "to show the handshake", SETTLE, |peer| {
        peer.direct && peer.latest_handshake.is_some() && peer.rx_bytes > 0 && peer.tx_bytes > 0
    })?;
    ensure!(
        back.endpoint == Some(SocketAddr::new(sup1_lan.addr.into(), 51820)),
        "node-01 reaches supervisor-01 at {:?}",
        back.endpoint
    );

    // --- the app on its ULA answers node-01 and supervisor-02
    let app_url = format!("http://[{app_ula}]:8730/echo");
    for from in [&node_ns, &sup2_ns] {
        let (status, body) = http_get(from, &app_url, Duration::from_secs(20))?;
        ensure!(status == 200 && body["name"] == "app-01", "{status} {body}");
    }

    // --- coordinator outage: established tunnels keep working
    let mut sup_pinger = Pinger::start(&sup1_ns, IpAddr::V6(sup2_ula), "0.05")?;
    let mut node_pinger = Pinger::start(&node_ns, IpAddr::V6(sup1_ula), "0.05")?;
    let started = unix_now();
    sup_pinger.wait_reply_after(started, Duration::from_secs(10))?;
    node_pinger.wait_reply_after(started, Duration::from_secs(10))?;
    bed.coordinator.kill()?;
    let killed_at = unix_now();
    for joiner in [&mut sup1, &mut sup2, &mut node] {
        joiner.wait_status("to report the coordinator gone", SETTLE, |status| {
            !status.registered
        })?;
    }
    let (status, body) = http_get(&node_ns, &app_url, Duration::from_secs(5))
        .context("HTTP node-01 → app during the coordinator outage")?;
    ensure!(status == 200 && body["name"] == "app-01", "{status} {body}");
    sup_pinger
        .check_uninterrupted(killed_at, OUTAGE)
        .context("supervisor-01 → supervisor-02 during the coordinator outage")?;
    node_pinger
        .check_uninterrupted(killed_at, OUTAGE)
        .context("node-01 → supervisor-01 during the coordinator outage")?;

    // --- restart on the same state: everyone re-registers, rosters come back
    bed.coordinator.restart()?;
    let restarted = Instant::now();
    for (joiner, names) in [
        (&mut sup1, ["node-01", "supervisor-02"]),
        (&mut sup2, ["node-01", "supervisor-01"]),
        (&mut node, ["supervisor-01", "supervisor-02"]),
    ] {
        let mut want: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
        want.sort();
        joiner.wait_status("to re-register with its peers back", SETTLE, |status| {
            status.registered && status.coordinator.connected && status.peer_names() == want
        })?;
    }
    eprintln!(
        "every joiner re-registered {:?} after the coordinator restart",
        restarted.elapsed()
    );
    node.wait_peer(
        "supervisor-01",
        "to advertise the app again",
        SETTLE,
        |peer| peer.app_ulas.contains(&app_ula),
    )?;
    let now = unix_now();
    sup_pinger.wait_reply_after(now, SETTLE)?;
    node_pinger.wait_reply_after(now, SETTLE)?;
    let (status, _) = http_get(&node_ns, &app_url, Duration::from_secs(10))?;
    ensure!(
        status == 200,
        "HTTP node-01 → app after the restart: {status}"
    );

    // --- policy change: node → supervisor removed
    let since = unix_now();
    bed.admin.put_policy(&policy(false))?;
    let last = node_pinger
        .check_cut(since, CUT_BOUND, OBSERVE)
        .context("node-01 → supervisor-01 after the policy removed node→supervisor")?;
    eprintln!("policy change: last node-01 → supervisor-01 reply {last:.3} s after the PUT");
    sup_pinger
        .check_uninterrupted(since, CUT_BOUND + OBSERVE)
        .context("supervisor-01 → supervisor-02 across the policy change")?;
    ensure!(
        http_get(&node_ns, &app_url, Duration::from_secs(3)).is_err(),
        "node-01 still reaches the app after the policy change"
    );
    node.wait_peer_names(&[], SETTLE)?;
    sup1.wait_peer_names(&["supervisor-02"], SETTLE)?;
    ensure!(
        !has_route(&node_ns, app_ula, node.ifname()),
        "node-01 still routes the app ULA"
    );

    // --- app remove: supervisor-02 withdraws its route to the app ULA
    ensure!(
        has_route(&sup2_ns, app_ula, sup2.ifname()),
        "supervisor-02 does not route the app ULA"
    );
    let before_remove = Instant::now();
    sup1.app_remove(&app)?;
    tabbify_tests::wait::until_true(
        "supervisor-02 to withdraw its route to the app ULA",
        ROUTE_BOUND.saturating_sub(before_remove.elapsed()),
        || !has_route(&sup2_ns, app_ula, sup2.ifname()),
    )?;
    eprintln!(
        "app ULA route withdrawn on supervisor-02 after {:?}",
        before_remove.elapsed()
    );
    let s1 = sup1.status()?;
    ensure!(s1.hosted_apps.is_empty(), "{}", s1.summary());
    let addresses = sup1_ns.ip(&["-6", "addr", "show", "dev", sup1.ifname()])?;
    ensure!(
        !addresses.contains(&app_ula.to_string()),
        "the app ULA is still on supervisor-01's interface: {addresses}"
    );

    // --- revocation of supervisor-02
    let since = unix_now();
    bed.admin.revoke(&s2.peer_id)?;
    let last = sup_pinger
        .check_cut(since, CUT_BOUND, OBSERVE)
        .context("supervisor-01 → supervisor-02 after revoking supervisor-02")?;
    eprintln!("revocation: last supervisor-01 → supervisor-02 reply {last:.3} s after the DELETE");
    sup1.wait_peer_names(&[], SETTLE)?;
    // Its re-registration is refused for good (403 revoked): a permanent refusal, so it
    // exits non-zero with the reason, leaving no interface or control socket behind.
    sup2.expect_refused_exit("revoked", SETTLE)?;

    // --- clean stop
    drop((sup_pinger, node_pinger));
    for joiner in [sup1, node] {
        joiner.stop()?;
    }
    Ok(())
}

#[test]
fn a_key_rotation_keeps_the_address_tags_and_the_tunnel() -> Result<()> {
    prerequisites(&[])?;
    let policy = json!({
        "tags": ["supervisor"],
        "app_hosts": ["tag:supervisor"],
        "allow": [{"src": ["tag:supervisor"], "dst": ["tag:supervisor"]}],
    });
    let bed = Testbed::start(policy, HEARTBEAT_SECS)?;
    let (a_ns, _) = bed.host()?;
    let (b_ns, _) = bed.host()?;
    let mut a = bed.join(&a_ns, JoinSpec::new("supervisor-a", &["supervisor"], None))?;
    let mut b = bed.join(&b_ns, JoinSpec::new("supervisor-b", &["supervisor"], None))?;
    let before = a.wait_peer_names(&["supervisor-b"], SETTLE)?;
    let sb = b.wait_peer_names(&["supervisor-a"], SETTLE)?;
    ensure!(
        before.ula == ula::identity_ula("supervisor-a"),
        "the ULA is derived from the certificate CN: {}",
        before.summary()
    );
    wait_ping(b.netns(), IpAddr::V6(before.ula), SETTLE).context("b → a before")?;

    let text = a.local_command(&["rotate-key", "--json"])?;
    let answer: Value = serde_json::from_str(&text).with_context(|| text.clone())?;
    let new_key = answer["public_key"].as_str().unwrap_or_default().to_owned();
    ensure!(
        answer["old_public_key"] == json!(before.public_key)
            && new_key != before.public_key
            && answer["peer_id"] == json!(before.peer_id)
            && answer["ula"] == json!(before.ula.to_string()),
        "rotate-key answered {answer}"
    );
    let after = a.status()?;
    ensure!(
        after.public_key == new_key
            && after.ula == before.ula
            && after.peer_id == before.peer_id
            && after.tags == before.tags,
        "after the rotation: {}",
        after.summary()
    );
    let seen = b.wait_peer("supervisor-a", "to carry the new key", SETTLE, |p| {
        p.public_key == new_key
    })?;
    ensure!(
        seen.ula == before.ula && seen.peer_id == before.peer_id && seen.tags == before.tags,
        "supervisor-b sees {seen:?}"
    );
    let state = a.state_dir();
    ensure!(
        !state.join("node.key.next").exists(),
        "a pending key is left"
    );
    let mode = std::fs::metadata(state.join("node.key"))?
        .permissions()
        .mode()
        & 0o777;
    ensure!(mode == 0o600, "node.key mode {mode:o}");
    wait_ping(b.netns(), IpAddr::V6(before.ula), SETTLE).context("b → a after the rotation")?;
    wait_ping(a.netns(), IpAddr::V6(sb.ula), SETTLE).context("a → b after the rotation")?;
    a.stop()?;
    b.stop()?;
    Ok(())
}

#[test]
fn joiners_behind_two_nats_connect_directly_by_hole_punching() -> Result<()> {
    prerequisites(&[Tool::Nft])?;
    let policy = json!({
        "tags": ["supervisor"],
        "allow": [{"src": ["tag:supervisor"], "dst": ["tag:supervisor"]}],
    });
    let bed = Testbed::start(policy, HEARTBEAT_SECS)?;
    let (a_ns, b_ns) = (Netns::new()?, Netns::new()?);
    let nat_a = NatRouter::new(&bed.lan, &a_ns)?;
    let nat_b = NatRouter::new(&bed.lan, &b_ns)?;
    let nats = || format!("{}\n{}", nat_a.describe(), nat_b.describe());

    let mut a = bed.join(&a_ns, JoinSpec::new("supervisor-a", &["supervisor"], None))?;
    let mut b = bed.join(&b_ns, JoinSpec::new("supervisor-b", &["supervisor"], None))?;
    let sa = a.wait_peer_names(&["supervisor-b"], SETTLE)?;
    let sb = b.wait_peer_names(&["supervisor-a"], SETTLE)?;
    // Both probe the coordinator's two STUN ports through their NAT (a masquerade that
    // keeps the mapping per socket): endpoint-independent, mapped at the NAT's address.
    for (joiner, own_nat) in [(&mut a, &nat_a), (&mut b, &nat_b)] {
        let public = IpAddr::V4(own_nat.public_addr());
        let st = joiner
            .wait_status("to classify its NAT", SETTLE, |s| {
                s.nat == tabbify_api::NatClass::EndpointIndependent
                    && s.mapped_endpoints.iter().any(|m| m.ip() == public)
            })
            .with_context(nats)?;
        eprintln!(
            "{} nat {:?} mapped {:?}",
            joiner.name(),
            st.nat,
            st.mapped_endpoints
        );
    }

    for (from, to) in [(&a, sb.ula), (&b, sa.ula)] {
        wait_ping(from.netns(), IpAddr::V6(to), SETTLE)
            .with_context(|| format!("{} → {to} across both NATs\n{}", from.name(), nats()))?;
    }
    for (joiner, other, other_nat) in [
        (&mut a, "supervisor-b", &nat_b),
        (&mut b, "supervisor-a", &nat_a),
    ] {
        let public = IpAddr::V4(other_nat.public_addr());
        let peer = joiner
            .wait_peer(
                other,
                "to be reached directly at its NAT's address",
                SETTLE,
                |peer| {
                    peer.direct
                        && peer.latest_handshake.is_some()
                        && peer.endpoint.map(|e| e.ip()) == Some(public)
                },
            )
            .with_context(nats)?;
        eprintln!("{} reaches {other} at {:?}", joiner.name(), peer.endpoint);
    }
    let stats = ping(&a_ns, IpAddr::V6(sb.ula), 5, "0.1")?;
    ensure!(
        stats.received == 5,
        "supervisor-a → supervisor-b: {stats:?}\n{}",
        nats()
    );
    a.stop()?;
    b.stop()?;
    Ok(())
}

#[test]
fn refusals_restarts_and_an_unreachable_coordinator() -> Result<()> {
    prerequisites(&[])?;
    let mut bed = Testbed::start(policy(true), HEARTBEAT_SECS)?;
    let url = bed.coordinator.url();
    let (ns1, _) = bed.host()?;
    let (ns2, _) = bed.host()?;
    let (ns3, _) = bed.host()?;
    let cert1 = bed.pki.issue_peer("node-01")?;
    let cert2 = bed.pki.issue_peer("node-02")?;
    let cert3 = bed.pki.issue_peer("node-03")?;

    // No coordinator given: the joiner says how to give one.
    let output = ns1
        .command(tabbify_tests::bins::tabbify_mesh()?)
        .args([
            "join",
            "--name",
            "node-01",
            "--tag",
            "node",
            "--interface",
            "tmnocoord",
        ])
        .args([
            "--tls-cert",
            path(&cert1.cert)?,
            "--tls-key",
            path(&cert1.key)?,
        ])
        .args(["--tls-ca", path(&cert1.ca)?])
        .args(["--state-dir", path(&ns1.workdir().join("nocoord"))?])
        .env_remove("TABBIFY_MESH_COORDINATOR")
        .output()?;
    let said = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success()
            && (said.contains("--coordinator") || said.contains("TABBIFY_MESH_COORDINATOR")),
        "join without a coordinator: {} {said}",
        output.status
    );

    // A made-up token: refused at the first registration (401 token_invalid).
    let bogus = JoinSpec::new("node-01", &["node"], Some("tmj_made-up".to_owned()));
    Joiner::spawn(&ns1, &url, &cert1, bogus)?.expect_refused_exit("token_invalid", SETTLE)?;

    // A single-use token admits one key; another key presenting it is refused (token_used).
    let spec = JoinSpec::new("node-01", &["node"], None);
    let token = bed.token_for(&spec)?;
    let first = Joiner::start(
        &ns1,
        &url,
        &cert1,
        JoinSpec::new("node-01", &["node"], Some(token.clone())),
    )?;
    let reused = JoinSpec::new("node-02", &["node"], Some(token));
    Joiner::spawn(&ns2, &url, &cert2, reused)?.expect_refused_exit("token_used", SETTLE)?;

    // Restarted on its state dir, without a token: the same key, so the same identity.
    let before = first.status()?;
    first.stop()?;
    let again = Joiner::start(&ns1, &url, &cert1, spec)?;
    let after = again.status()?;
    ensure!(
        (after.peer_id.as_str(), after.ula) == (before.peer_id.as_str(), before.ula),
        "restarted on the same state dir as {} ({}), was {} ({})",
        after.peer_id,
        after.ula,
        before.peer_id,
        before.ula
    );
    again.stop()?;

    // The coordinator is down at start: the joiner keeps its interface up, retries, and
    // registers once the coordinator is back.
    let spec = JoinSpec::new("node-03", &["node"], None);
    let token = bed.token_for(&spec)?;
    bed.coordinator.kill()?;
    let mut waiting = Joiner::spawn(
        &ns3,
        &url,
        &cert3,
        JoinSpec::new("node-03", &["node"], Some(token)),
    )?;
    let spawned = Instant::now();
    waiting.wait_status("to run unregistered", SETTLE, |status| !status.registered)?;
    ensure!(
        ns3.has_link(waiting.ifname()),
        "no interface while unregistered"
    );
    // Several retries' worth of time (0.5 s, 1 s, 2 s, …): it must still be running.
    tabbify_tests::wait::until_true("3 s of retries", Duration::from_secs(10), || {
        spawned.elapsed() > Duration::from_secs(3)
    })?;
    waiting.process().ensure_running()?;
    bed.coordinator.restart()?;
    waiting.wait_status(
        "to register once the coordinator is back",
        SETTLE,
        |status| status.registered,
    )?;
    waiting.stop()
}

#[test]
fn a_second_claim_on_an_app_leaves_its_traffic_with_the_holder() -> Result<()> {
    prerequisites(&[])?;
    let bed = Testbed::start(policy(true), 1)?;
    let (ns1, _) = bed.host()?;
    let (ns2, _) = bed.host()?;
    let (ns3, _) = bed.host()?;
    let mut sup1 = bed.join(&ns1, JoinSpec::new("supervisor-01", &["supervisor"], None))?;
    let mut sup2 = bed.join(&ns2, JoinSpec::new("supervisor-02", &["supervisor"], None))?;
    let mut node = bed.join(&ns3, JoinSpec::new("node-01", &["node"], None))?;
    sup1.wait_peer_names(&["node-01", "supervisor-02"], SETTLE)?;
    sup2.wait_peer_names(&["node-01", "supervisor-01"], SETTLE)?;
    node.wait_peer_names(&["supervisor-01", "supervisor-02"], SETTLE)?;

    let app: uuid::Uuid = APP.parse()?;
    let app_ula = sup1.app_add(&app)?;
    let app_addr = SocketAddr::new(app_ula.into(), tabbify_tests::app::APP_PORT);
    let _real = AppProcess::start(&ns1, testapp(), app_addr, "app-01")?;
    let app_url = format!("http://[{app_ula}]:8730/echo");
    let ifname = node.ifname().to_owned();
    tabbify_tests::wait::until_true("node-01 to route the app ULA", SETTLE, || {
        has_route(&ns3, app_ula, &ifname)
    })?;
    let (status, body) = http_get(&ns3, &app_url, SETTLE)?;
    ensure!(status == 200 && body["name"] == "app-01", "{status} {body}");

    // The attack: supervisor-02 claims the same app and serves an impostor on its ULA.
    sup2.app_add(&app)?;
    let _impostor = AppProcess::start(&ns2, testapp(), app_addr, "impostor")?;
    let s2 = sup2.wait_status("to show the app contested", SETTLE, |status| {
        status.hosted_apps.iter().any(|a| {
            a.ula == app_ula
                && a.contested
                    .as_deref()
                    .is_some_and(|why| why.contains("supervisor-01"))
        })
    })?;
    ensure!(
        s2.registered,
        "the refused claim cost supervisor-02 its session: {}",
        s2.summary()
    );
    // Several heartbeats later, the app's traffic still goes to its holder.
    for _ in 0..5 {
        let (status, body) = http_get(&ns3, &app_url, Duration::from_secs(5))?;
        ensure!(
            status == 200 && body["name"] == "app-01",
            "node-01 → app reached {body} ({status})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let peers = node.peers()?;
    let apps_of = |name: &str| {
        peers
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.app_ulas.clone())
            .unwrap_or_default()
    };
    ensure!(
        apps_of("supervisor-01") == vec![app_ula] && apps_of("supervisor-02").is_empty(),
        "node-01's roster: {peers:?}"
    );

    // The holder lets it go: the contested claim, retried with every heartbeat, succeeds.
    sup1.app_remove(&app)?;
    node.wait_peer("supervisor-02", "to host the app", SETTLE, |p| {
        p.app_ulas == vec![app_ula]
    })?;
    sup2.wait_status("to hold the app", SETTLE, |status| {
        status.hosted_apps.iter().all(|a| a.contested.is_none())
    })?;
    node.stop()?;
    sup1.stop()?;
    sup2.stop()
}

/// How long the cut test keeps a joiner from its coordinator: well past the expiry
/// (three missed 1 s heartbeats).
const CONTROL_CUT: Duration = Duration::from_secs(8);

#[test]
fn a_joiner_cut_from_the_coordinator_keeps_its_tunnels_and_comes_back_fresh() -> Result<()> {
    prerequisites(&[Tool::Nft])?;
    let bed = Testbed::start(policy(true), 1)?;
    let (ns1, _) = bed.host()?;
    let (ns2, _) = bed.host()?;
    let mut sup1 = bed.join(&ns1, JoinSpec::new("supervisor-01", &["supervisor"], None))?;
    let mut sup2 = bed.join(&ns2, JoinSpec::new("supervisor-02", &["supervisor"], None))?;
    let s1 = sup1.wait_peer_names(&["supervisor-02"], SETTLE)?;
    sup2.wait_peer_names(&["supervisor-01"], SETTLE)?;
    wait_ping(&ns2, IpAddr::V6(s1.ula), SETTLE)?;
    let mut pinger = Pinger::start(&ns2, IpAddr::V6(s1.ula), "0.1")?;

    // Cut supervisor-01 from the coordinator: every packet it sends there is dropped.
    let coordinator = bed.coordinator.addr();
    let rules = ns1.workdir().join("cut.nft");
    std::fs::write(
        &rules,
        format!(
            "table inet tbt_cut {{\n  chain out {{\n    type filter hook output priority 0;\n    \
             ip daddr {} tcp dport {} drop\n  }}\n}}\n",
            coordinator.ip(),
            coordinator.port()
        ),
    )?;
    ns1.run("nft", &["-f", path(&rules)?])?;
    let cut_at = unix_now();
    // Three missed heartbeats: the coordinator marks it stale; supervisor-02 keeps it.
    sup2.wait_peer("supervisor-01", "to be marked stale", SETTLE, |p| p.stale)?;
    // For the whole cut, well past the expiry, the tunnel carries every ping.
    pinger.check_uninterrupted(cut_at, CONTROL_CUT)?;
    let peers = sup2.peers()?;
    ensure!(
        peers.iter().any(|p| p.name == "supervisor-01" && p.stale),
        "supervisor-01 left supervisor-02's roster during the cut: {peers:?}"
    );
    let logs = bed.coordinator.logs();
    ensure!(
        !logs.contains("expired=1"),
        "the coordinator expired a peer during the cut:\n{logs}"
    );

    // Reconnected: its heartbeats make it fresh again, without disturbing traffic.
    ns1.run("nft", &["delete", "table", "inet", "tbt_cut"])?;
    let back_at = unix_now();
    sup2.wait_peer("supervisor-01", "to be fresh again", SETTLE, |p| !p.stale)?;
    pinger.check_uninterrupted(back_at, Duration::from_secs(2))?;
    sup1.stop()?;
    sup2.stop()
}

fn path(path: &Path) -> Result<&str> {
    path.to_str().context("non-UTF-8 path")
}
