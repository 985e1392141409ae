//! Issue 14, item 4: three active coordinators on one PostgreSQL (started by the test), four
//! members spread over them in namespaces the test makes and removes, through a policy
//! change, a coordinator killed with SIGKILL, a 10 s database outage and a restart of every
//! coordinator.
//!
//! `three_coordinators_on_postgres_survive_kill_outage_and_restart`:
//!
//! | step | what | checked |
//! |---|---|---|
//! | start | PostgreSQL; c1, c2, c3 on it (`10.200.0.1:8443`, `:8444`, `:8445`, 2 s heartbeats); m1 (`--coordinator c1,c2,c3`), m2 (`c2,c3,c1`), m3 (`c3,c1,c2`), m4 (`c1,c3,c2`, tag `probe`, the others `member`) | each homes on the first of its list; every member sees the three others |
//! | fan-out | `PUT /v1/policy` on c1 without the `probe` rule, then with it again | m2 (on c2) and m3 (on c3) drop m4, then list it again, each within 1 s of the request |
//! | kill | pings every 100 ms m1→m2, m4→m3, m2→m3; SIGKILL (by PID) the coordinator with the most members (c1: m1 and m4) | its members stream from another coordinator within one heartbeat interval, without registering again (their heartbeat is known there: no `registered`, no `does not know us`), their streams resumed after `Last-Event-ID` (the survivors' `streams_resumed_total` up by their number, `stream_snapshots_total` unchanged); no ping lost in the 6 s after the kill; everyone still sees everyone. c1 is then started again on the database |
//! | outage | `pg_ctl stop -m fast`, 10 s, `pg_ctl start` on the same data directory | no ping lost from the stop until 3 s after the restart; during it `POST /v1/tokens` on c2 and `PUT /v1/policy` on c3 answer 503 `unavailable`, while `GET /v1/mesh/peers` (a member's certificate), `GET /v1/policy` and `/health` answer 200 with what they had; after it a policy PUT on c2 (retried while it answers 503) reaches m3's stream on c3 and c1's reads |
//! | restart | a token minted on c3; SIGKILL all three coordinators, start them again | every coordinator lists the same members (`/health`, `GET /v1/mesh/peers`), the token (`GET /v1/tokens`) and the policy revision as before; every member streams again without registering again; no ping lost from the kill until 3 s after the last re-homing |
//!
//! The bounds are the issue's ("within 1 s", "within one heartbeat interval"); the checks
//! allow the same 0.5 s for `status` polling on a shared 2-core machine as
//! `coordinator_failover.rs`, and the test prints a table of what it measured.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tabbify_api as api;
use tabbify_tests::coordinator::{Coordinator, CoordinatorSpec};
use tabbify_tests::pinger::unix_now;
use tabbify_tests::postgres::Postgres;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{Admin, JoinSpec, Joiner, Lan, Netns, Pinger, Pki};

/// The coordinators' heartbeat interval: the failover bound.
const HEARTBEAT_SECS: u64 = 2;

/// Slack for polling `status` on a loaded machine (as in `coordinator_failover.rs`).
const SLACK: Duration = Duration::from_millis(500);

/// The issue's fan-out bound: a change on one coordinator reaches the others' streams.
const FAN_OUT: Duration = Duration::from_secs(1);

/// Deadline for the first rosters to settle.
const SETTLE: Duration = Duration::from_secs(30);

/// How long PostgreSQL stays down.
const OUTAGE: Duration = Duration::from_secs(10);

const MEMBERS: [&str; 4] = ["m1", "m2", "m3", "m4"];

/// Everyone sees everyone: members and the probe.
fn policy_all() -> Value {
    json!({
        "tags": ["member", "probe"],
        "app_hosts": ["tag:member"],
        "allow": [{"src": ["tag:member", "tag:probe"], "dst": ["tag:member", "tag:probe"]}],
    })
}

/// The probe (m4) is hidden: no rule names it.
fn policy_hide_probe() -> Value {
    json!({
        "tags": ["member", "probe"],
        "app_hosts": ["tag:member"],
        "allow": [{"src": ["tag:member"], "dst": ["tag:member"]}],
    })
}

fn spec(lan: &Lan, port: u16) -> CoordinatorSpec {
    CoordinatorSpec {
        bind: SocketAddr::new(lan.addr().into(), port),
        policy: policy_all(),
        admin: tabbify_tests::testbed::ADMIN.to_owned(),
        heartbeat_secs: HEARTBEAT_SECS,
        relay: false,
        relay_urls: Vec::new(),
    }
}

/// One member: its joiner, namespace and certificate.
struct Member {
    name: &'static str,
    joiner: Joiner,
    ns: Netns,
    cert: tabbify_tests::pki::Issued,
}

impl Member {
    /// Lines of the joiner's log saying it registered (with or without a token).
    fn registrations(&self) -> usize {
        registrations(&self.joiner.logs())
    }
}

fn registrations(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" registered ") || l.ends_with(" registered"))
        .filter(|l| l.contains("peer_id="))
        .count()
}

/// The names of every member but `name`.
fn others(name: &str) -> Vec<&'static str> {
    MEMBERS.iter().copied().filter(|m| *m != name).collect()
}

/// A measured figure for the final table.
struct Row {
    what: String,
    took: f64,
    bound: String,
}

fn record(rows: &mut Vec<Row>, what: impl Into<String>, took: f64, bound: impl Into<String>) {
    let row = Row {
        what: what.into(),
        took,
        bound: bound.into(),
    };
    println!("{}: {:.3} s (bound {})", row.what, row.took, row.bound);
    rows.push(row);
}

/// Waits until every member sees exactly the three others.
fn wait_full_mesh(members: &mut [Member], timeout: Duration) -> Result<()> {
    for m in members.iter_mut() {
        m.joiner.wait_peer_names(&others(m.name), timeout)?;
    }
    Ok(())
}

/// Waits until `m` streams from a coordinator whose URL satisfies `ok`; returns that URL.
fn wait_streaming(m: &mut Member, timeout: Duration, ok: impl Fn(&str) -> bool) -> Result<String> {
    let status = m
        .joiner
        .wait_status("to stream from a live coordinator", timeout, |s| {
            s.registered && s.coordinator.connected && ok(&s.coordinator.url)
        })?;
    Ok(status.coordinator.url)
}

/// `PUT /v1/policy` on `admin` and the time it was sent; returns the new revision.
fn put_policy(admin: &Admin, policy: &Value) -> Result<(f64, u64)> {
    let sent = unix_now();
    let answer = admin.put_policy(policy)?;
    let answer: api::PolicyResponse = serde_json::from_value(answer.clone())
        .with_context(|| format!("not a policy answer: {answer}"))?;
    Ok((sent, answer.revision))
}

/// Waits until `m`'s roster lists (`visible`) or omits the member `other`; returns the time
/// since `since`.
fn wait_visibility(
    m: &mut Member,
    other: &str,
    visible: bool,
    since: f64,
    timeout: Duration,
) -> Result<f64> {
    let what = if visible { "to list" } else { "to drop" };
    m.joiner
        .wait_status(&format!("{what} {other}"), timeout, |s| {
            s.peer(other).is_some() == visible
        })?;
    Ok(unix_now() - since)
}

/// `GET path` with `client`, which must answer 200; returns the body.
fn get_ok(client: &Admin, path: &str) -> Result<Value> {
    client.expect_ok("GET", path, None)
}

/// The policy revision `client`'s coordinator has in force.
fn revision(client: &Admin) -> Result<u64> {
    let body = get_ok(client, api::PATH_POLICY)?;
    let policy: api::PolicyResponse = serde_json::from_value(body.clone())
        .with_context(|| format!("not a policy answer: {body}"))?;
    Ok(policy.revision)
}

/// The peer count and policy revision of `/health`.
fn health(client: &Admin) -> Result<api::Health> {
    let body = get_ok(client, "/health")?;
    serde_json::from_value(body.clone()).with_context(|| format!("not a health answer: {body}"))
}

/// The names `GET /v1/mesh/peers` lists to the member whose certificate `client` has.
fn roster_read(client: &Admin) -> Result<Vec<String>> {
    let body = get_ok(client, api::PATH_PEERS)?;
    let peers = body
        .get("peers")
        .and_then(Value::as_array)
        .with_context(|| format!("no peers in {body}"))?;
    let mut names: Vec<String> = peers
        .iter()
        .filter_map(|p| {
            p.get("display_name")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// The token ids `GET /v1/tokens` lists.
fn token_ids(client: &Admin) -> Result<Vec<String>> {
    let body = get_ok(client, api::PATH_TOKENS)?;
    let list = body
        .as_array()
        .or_else(|| body.get("tokens").and_then(Value::as_array))
        .with_context(|| format!("not a token list: {body}"))?;
    Ok(list
        .iter()
        .filter_map(|t| t.get("token_id").and_then(Value::as_str).map(str::to_owned))
        .collect())
}

/// The coordinator counter `name` on `/metrics` (without its `tabbify_coordinator_`
/// prefix).
fn metric(client: &Admin, name: &str) -> Result<u64> {
    let body = get_ok(client, "/metrics")?;
    let text = body.as_str().context("/metrics is not text")?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("tabbify_coordinator_{name} ")))
        .with_context(|| format!("no metric {name} in\n{text}"))?
        .trim()
        .parse()
        .with_context(|| format!("metric {name} is not a count"))
}

/// `streams_resumed_total` and `stream_snapshots_total` of every coordinator in `which`.
fn stream_starts(admins: &[Admin], which: &[usize]) -> Result<(u64, u64)> {
    let mut sum = (0, 0);
    for &i in which {
        sum.0 += metric(&admins[i], "streams_resumed_total")?;
        sum.1 += metric(&admins[i], "stream_snapshots_total")?;
    }
    Ok(sum)
}

/// Expects `method path` on `client` to be refused with 503 `unavailable`.
fn expect_unavailable(client: &Admin, method: &str, path: &str, body: &Value) -> Result<()> {
    let answer = client.request(method, path, Some(body))?;
    ensure!(
        answer.status == 503
            && answer.body.get("code").and_then(Value::as_str) == Some("unavailable"),
        "{method} {path} during the database outage answered {}: {}",
        answer.status,
        answer.body
    );
    Ok(())
}

#[test]
fn three_coordinators_on_postgres_survive_kill_outage_and_restart() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let mut pg = Postgres::start().map_err(anyhow::Error::msg)?;
    pg.create_database("ha").map_err(anyhow::Error::msg)?;
    let database = pg.socket_url("ha");
    let mut rows: Vec<Row> = Vec::new();

    // --- start: three coordinators, four members spread over them.
    let lan = Lan::new()?;
    let pki = Pki::new(&[lan.addr().into()])?;
    let mut cs = Vec::new();
    for port in [8443, 8444, 8445] {
        cs.push(Coordinator::start_with_database(
            lan.netns(),
            &pki,
            spec(&lan, port),
            Some(&database),
        )?);
    }
    let urls: Vec<String> = cs.iter().map(Coordinator::url).collect();
    let admin_cert = pki.issue_admin(tabbify_tests::testbed::ADMIN)?;
    let admins: Vec<Admin> = urls
        .iter()
        .map(|u| Admin::new(lan.netns(), u, admin_cert.clone()))
        .collect();
    // Each member's coordinator order (indices into `cs`): each homes on its first.
    let orders: [(&str, &str, [usize; 3]); 4] = [
        ("m1", "member", [0, 1, 2]),
        ("m2", "member", [1, 2, 0]),
        ("m3", "member", [2, 0, 1]),
        ("m4", "probe", [0, 2, 1]),
    ];
    let mut members = Vec::new();
    for (i, (name, tag, order)) in orders.iter().enumerate() {
        let ns = Netns::new()?;
        lan.attach(&ns)?;
        // Tokens minted on different coordinators: each knows the others'.
        let token = admins[i % 3].create_token(&[tag], None, 1)?;
        let mut join = JoinSpec::new(name, &[tag], Some(token));
        join.more_coordinators = order[1..].iter().map(|&c| urls[c].clone()).collect();
        let cert = pki.issue_peer(name)?;
        let joiner = Joiner::start(&ns, &urls[order[0]], &cert, join)?;
        members.push(Member {
            name,
            joiner,
            ns,
            cert,
        });
    }
    wait_full_mesh(&mut members, SETTLE)?;
    for (m, (_, _, order)) in members.iter_mut().zip(orders.iter()) {
        let first = urls[order[0]].clone();
        wait_streaming(m, SETTLE, |u| u == first)
            .with_context(|| format!("{} homing on {first}", m.name))?;
    }
    println!("start: m1 and m4 on c1, m2 on c2, m3 on c3; every member sees the three others");

    // --- fan-out: a policy PUT on c1 reaches the streams on c2 (m2) and c3 (m3).
    let fan_out_bound = FAN_OUT + SLACK;
    for (label, policy, visible) in [
        ("hides m4", policy_hide_probe(), false),
        ("shows m4", policy_all(), true),
    ] {
        let (sent, rev) = put_policy(&admins[0], &policy)?;
        for (idx, home) in [(1, "c2"), (2, "c3")] {
            let took = wait_visibility(
                &mut members[idx],
                "m4",
                visible,
                sent,
                Duration::from_secs(10),
            )?;
            record(
                &mut rows,
                format!(
                    "policy PUT on c1 (revision {rev}, {label}) seen by {} on {home}",
                    members[idx].name
                ),
                took,
                "1 s + 0.5 s polling",
            );
            ensure!(
                took <= fan_out_bound.as_secs_f64(),
                "the policy change took {took:.3} s to reach {}'s stream on {home}",
                members[idx].name
            );
        }
    }
    wait_full_mesh(&mut members, Duration::from_secs(10))?;

    // --- kill: SIGKILL the coordinator with the most members, pings running.
    let pairs = [(0usize, 1usize), (3, 2), (1, 2)];
    let mut pingers = Vec::new();
    for &(from, to) in &pairs {
        let ula = members[to].joiner.status()?.ula;
        let mut pinger = Pinger::start(&members[from].ns, ula.into(), "0.1")?;
        pinger.wait_reply_after(unix_now(), Duration::from_secs(15))?;
        pingers.push((
            format!("{}→{}", members[from].name, members[to].name),
            pinger,
        ));
    }
    let mut homes = Vec::new();
    for m in &members {
        homes.push(m.joiner.status()?.coordinator.url);
    }
    let load = |i: usize| homes.iter().filter(|h| **h == urls[i]).count();
    let victim = (0..3)
        .max_by_key(|&i| (load(i), std::cmp::Reverse(i)))
        .unwrap_or(0);
    let dead_url = urls[victim].clone();
    let moved: Vec<usize> = (0..members.len())
        .filter(|&i| homes[i] == dead_url)
        .collect();
    let before: Vec<(usize, Option<u64>)> = members
        .iter()
        .map(|m| {
            Ok((
                m.registrations(),
                m.joiner.status()?.coordinator.last_event_id,
            ))
        })
        .collect::<Result<_>>()?;
    ensure!(
        before.iter().all(|&(n, _)| n == 1),
        "each member's log should show one registration before the kill: {before:?}"
    );
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let starts_before = stream_starts(&admins, &survivors)?;
    let killed = unix_now();
    cs[victim].kill()?;
    let bound = Duration::from_secs(HEARTBEAT_SECS) + SLACK;
    for &i in &moved {
        let url = wait_streaming(&mut members[i], bound, |u| u != dead_url).with_context(|| {
            format!(
                "{} re-homing after c{} was killed",
                members[i].name,
                victim + 1
            )
        })?;
        let took = unix_now() - killed;
        record(
            &mut rows,
            format!(
                "c{} killed: {} streams from {url}",
                victim + 1,
                members[i].name
            ),
            took,
            "2 s heartbeat + 0.5 s polling",
        );
    }
    for (label, pinger) in &mut pingers {
        let answered = pinger
            .check_uninterrupted(killed, Duration::from_secs(6))
            .with_context(|| format!("pings {label} across the kill"))?;
        println!("pings {label}: {answered} answered in the 6 s after the kill, none lost");
    }
    wait_full_mesh(&mut members, Duration::from_secs(5))?;
    for &i in &moved {
        let m = &members[i];
        let log = m.joiner.logs();
        ensure!(
            m.registrations() == before[i].0 && !log.contains("does not know us"),
            "{} registered again after the failover instead of resuming (a shared database \
             knows it):\n{log}",
            m.name
        );
        println!(
            "{}: resumed on the new coordinator without registering (last event id {:?} \
             before the kill, {:?} now)",
            m.name,
            before[i].1,
            m.joiner.status()?.coordinator.last_event_id
        );
    }
    // The survivors saw every event the moved members had: their streams resume.
    let starts_after = stream_starts(&admins, &survivors)?;
    let (resumed, snapshots) = (
        starts_after.0 - starts_before.0,
        starts_after.1 - starts_before.1,
    );
    println!(
        "after the kill the surviving coordinators opened {resumed} streams by resuming after \
         Last-Event-ID and {snapshots} with a snapshot"
    );
    ensure!(
        resumed == moved.len() as u64 && snapshots == 0,
        "the {} moved members' streams: {resumed} resumed, {snapshots} snapshots (want every \
         one resumed)",
        moved.len()
    );
    cs[victim].restart()?;

    // --- outage: PostgreSQL down for 10 s.
    let rev_before = revision(&admins[1])?;
    let reader = Admin::new(lan.netns(), &urls[1], members[0].cert.clone());
    let stopped = unix_now();
    pg.stop_fast().map_err(anyhow::Error::msg)?;
    let token_request = serde_json::to_value(api::TokenRequest {
        tags: vec!["member".to_owned()],
        name: None,
        ttl_secs: 600,
        max_uses: 1,
        unlimited: false,
        identity: None,
    })?;
    expect_unavailable(&admins[1], "POST", api::PATH_TOKENS, &token_request)?;
    expect_unavailable(&admins[2], "PUT", api::PATH_POLICY, &policy_hide_probe())?;
    let names = roster_read(&reader)?;
    ensure!(
        names == others("m1"),
        "GET /v1/mesh/peers on c2 during the outage listed {names:?} to m1"
    );
    for (i, admin) in admins.iter().enumerate() {
        ensure!(
            revision(admin)? == rev_before,
            "c{} lost its policy during the outage",
            i + 1
        );
        let h = health(admin)?;
        ensure!(
            h.peers == MEMBERS.len() as u64,
            "c{}'s /health during the outage: {h:?}",
            i + 1
        );
    }
    println!(
        "database down: token mint on c2 and policy PUT on c3 answered 503 unavailable; \
         GET /v1/mesh/peers, /v1/policy and /health answered on every coordinator"
    );
    tabbify_tests::wait::until_true(
        "the outage to last",
        OUTAGE + Duration::from_secs(5),
        || unix_now() - stopped >= OUTAGE.as_secs_f64(),
    )?;
    // Still serving reads at the end of the outage.
    let names = roster_read(&reader)?;
    ensure!(
        names == others("m1"),
        "GET /v1/mesh/peers on c2 at the end of the outage listed {names:?} to m1"
    );
    pg.start_server().map_err(anyhow::Error::msg)?;
    let restarted = unix_now();
    let window = Duration::from_secs_f64(restarted - stopped) + Duration::from_secs(3);
    for (label, pinger) in &mut pingers {
        let answered = pinger
            .check_uninterrupted(stopped, window)
            .with_context(|| format!("pings {label} across the database outage"))?;
        println!(
            "pings {label}: {answered} answered from the database stop to 3 s after its \
             restart ({:.1} s), none lost",
            window.as_secs_f64()
        );
    }
    for m in members.iter_mut() {
        m.joiner
            .wait_status("to stream after the outage", Duration::from_secs(5), |s| {
                s.coordinator.connected
            })?;
    }
    // Catch-up: a write on c2 reaches c3's streams and c1.
    let mut refused = 0;
    let (sent, rev) = loop {
        let sent = unix_now();
        let answer = admins[1].request("PUT", api::PATH_POLICY, Some(&policy_hide_probe()))?;
        if answer.status == 503 && unix_now() - restarted < 20.0 {
            refused += 1;
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        ensure!(
            answer.status == 200,
            "policy PUT on c2 after the database came back answered {}: {}",
            answer.status,
            answer.body
        );
        let policy: api::PolicyResponse = serde_json::from_value(answer.body.clone())
            .with_context(|| format!("not a policy answer: {}", answer.body))?;
        break (sent, policy.revision);
    };
    println!(
        "after the outage: policy PUT on c2 sent {:.2} s after the database restart \
         (after the ping check) accepted ({refused} answered 503 first), revision {rev}",
        sent - restarted
    );
    let m3_home = members[2].joiner.status()?.coordinator.url;
    ensure!(
        m3_home == urls[2],
        "m3 left c3 ({m3_home}) during the outage"
    );
    let took = wait_visibility(&mut members[2], "m4", false, sent, Duration::from_secs(10))?;
    record(
        &mut rows,
        "after the outage: policy PUT on c2 seen by m3 on c3",
        took,
        "1 s + 0.5 s polling",
    );
    ensure!(
        took <= fan_out_bound.as_secs_f64(),
        "after the outage, the policy change on c2 took {took:.3} s to reach m3 on c3"
    );
    tabbify_tests::wait::until_true(
        "c1 and c3 to have the revision written on c2",
        Duration::from_secs(10),
        || {
            [0, 2]
                .iter()
                .all(|&i| revision(&admins[i]).is_ok_and(|r| r == rev))
        },
    )?;
    let (_, rev) = put_policy(&admins[2], &policy_all())?;
    wait_full_mesh(&mut members, Duration::from_secs(10))?;
    for (label, pinger) in &mut pingers {
        pinger
            .wait_reply_after(unix_now(), Duration::from_secs(15))
            .with_context(|| format!("pings {label} after m4 was shown again"))?;
    }

    // --- restart: every coordinator killed and started again on the database.
    admins[2].create_token(&["member"], Some("kept"), 3)?;
    let tokens_before = token_ids(&admins[2])?;
    ensure!(
        !tokens_before.is_empty(),
        "GET /v1/tokens on c3 lists no token after one was minted"
    );
    let registered_before: Vec<usize> = members.iter().map(Member::registrations).collect();
    let all_killed = unix_now();
    for c in cs.iter_mut() {
        c.kill()?;
    }
    for c in cs.iter_mut() {
        c.restart()?;
    }
    let mut last_home = all_killed;
    for m in members.iter_mut() {
        let url = wait_streaming(m, Duration::from_secs(60), |_| true)
            .with_context(|| format!("{} re-homing after every coordinator restarted", m.name))?;
        let now = unix_now();
        last_home = last_home.max(now);
        record(
            &mut rows,
            format!("all coordinators restarted: {} streams from {url}", m.name),
            now - all_killed,
            "none (their backoff)",
        );
    }
    for (i, admin) in admins.iter().enumerate() {
        let h = health(admin)?;
        ensure!(
            h.peers == MEMBERS.len() as u64 && h.policy_revision == rev,
            "c{} after the restart: {h:?} (want {} peers, policy revision {rev})",
            i + 1,
            MEMBERS.len()
        );
        ensure!(
            revision(admin)? == rev,
            "c{}'s GET /v1/policy after the restart",
            i + 1
        );
        let reader = Admin::new(lan.netns(), &urls[i], members[0].cert.clone());
        let names = roster_read(&reader)?;
        ensure!(
            names == others("m1"),
            "GET /v1/mesh/peers on c{} after the restart listed {names:?} to m1",
            i + 1
        );
        let tokens = token_ids(admin)?;
        ensure!(
            tokens_before.iter().all(|t| tokens.contains(t)),
            "c{} lost tokens in the restart: {tokens_before:?} before, {tokens:?} after",
            i + 1
        );
    }
    // A coordinator that restarted has seen none of the events before its start, so a
    // stream may start with a snapshot there (by design); shown, not checked.
    let (resumed, snapshots) = stream_starts(&admins, &[0, 1, 2])?;
    println!(
        "after the restart of every coordinator: {resumed} streams resumed after \
         Last-Event-ID, {snapshots} started with a snapshot"
    );
    for (m, &before) in members.iter().zip(&registered_before) {
        ensure!(
            m.registrations() == before,
            "{} registered again after the coordinators restarted:\n{}",
            m.name,
            m.joiner.logs()
        );
    }
    wait_full_mesh(&mut members, Duration::from_secs(10))?;
    let window = Duration::from_secs_f64(last_home - all_killed) + Duration::from_secs(3);
    for (label, pinger) in &mut pingers {
        let answered = pinger
            .check_uninterrupted(all_killed, window)
            .with_context(|| format!("pings {label} across the restart of every coordinator"))?;
        println!(
            "pings {label}: {answered} answered from the kill of every coordinator to 3 s \
             after the last re-homing ({:.1} s), none lost",
            window.as_secs_f64()
        );
    }
    println!(
        "all coordinators restarted: {} members, {} tokens and policy revision {rev} on each; \
         no member registered again",
        MEMBERS.len(),
        tokens_before.len()
    );

    println!("\n| measured | took | bound |\n|---|---|---|");
    for row in &rows {
        println!("| {} | {:.3} s | {} |", row.what, row.took, row.bound);
    }

    drop(pingers);
    for m in members {
        m.joiner.stop()?;
    }
    Ok(())
}
