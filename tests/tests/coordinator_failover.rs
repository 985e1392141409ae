//! Issue 14, item 3: joiners that know several coordinators fail over, members leave, and
//! ephemeral members go, end to end in namespaces this test makes and removes.
//!
//! `a_joiner_fails_over_to_the_next_coordinator_and_its_tunnels_never_notice`:
//!
//! | step | what | checked |
//! |---|---|---|
//! | start | PostgreSQL (started by the test); coordinators c1 and c2 on it (`10.200.0.1:8443`, `:8444`, shared tokens and admissions, each its own in-memory roster); a foreign coordinator (`:8445`) whose certificate comes from another CA | — |
//! | join | supervisor-a with `--coordinator foreign,c1,c2`, supervisor-b with `c1,c2`, each in its own namespace | both register with c1 (a's log names the TLS refusal of the foreign one) and see each other; `status` lists the targets and which is in use |
//! | kill | SIGKILL c1 by PID, with a ping every 100 ms from a to b's ULA | both re-home to c2 within one heartbeat interval (c2 knows them: the members are rows of the shared database, so the heartbeat is answered and nobody registers again); no ping lost from the kill until 6 s after; each still sees the other |
//! | leave | `tabbify-mesh leave` on b | b exits 0; a's roster (`peers --json`) drops b within 1 s |
//!
//! `a_name_with_two_addresses_is_two_coordinators`: c1 on `10.200.0.1:8443` and c2 on
//! `10.200.0.254:8443` (one PostgreSQL), and a joiner given only
//! `https://coordinator.mesh.test:8443`, a name its namespace's hosts file
//! (`/etc/netns/<ns>/hosts`, which `ip netns exec` mounts) gives both addresses: `status`
//! lists two targets with one address each; SIGKILL the one in use and the joiner streams
//! from the other within one heartbeat interval, TLS checked against the name.
//!
//! `ephemeral_members_go_at_staleness_or_at_once_when_stopped`: one coordinator (2 s
//! heartbeats, state in SQLite: stale after 3 + 3.5 intervals + 1 s = 14 s), an observer,
//! an ordinary member and two `--ephemeral` ones. SIGKILL the ordinary member and one ephemeral member: the ephemeral one leaves the
//! observer's roster at staleness while the ordinary one stays, marked stale; SIGTERM the
//! other ephemeral member: it leaves the roster at once (within 1 s) and exits 0. The dead
//! ordinary member is then removed by `tabbify-mesh leave --coordinator … --tls-*` run with
//! its certificate (no joiner running): within 1 s.
//!
//! "Within one heartbeat interval" and "within 1 s" are the issue's bounds; the checks allow
//! 0.5 s more for `status` polling on a shared 2-core machine and print what they measured.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tabbify_tests::coordinator::{Coordinator, CoordinatorSpec};
use tabbify_tests::pinger::unix_now;
use tabbify_tests::postgres::Postgres;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{Admin, JoinSpec, Joiner, Lan, Netns, Pinger, Pki, Testbed};

/// The coordinators' heartbeat interval: the failover bound.
const HEARTBEAT_SECS: u64 = 2;

/// Slack for polling `status` on a loaded machine.
const SLACK: Duration = Duration::from_millis(500);

/// Deadline for the first rosters to settle.
const SETTLE: Duration = Duration::from_secs(30);

/// Supervisors see each other.
fn policy() -> Value {
    json!({
        "tags": ["supervisor"],
        "app_hosts": ["tag:supervisor"],
        "allow": [{"src": ["tag:supervisor"], "dst": ["tag:supervisor"]}],
    })
}

fn spec(lan: &Lan, port: u16) -> CoordinatorSpec {
    CoordinatorSpec {
        bind: SocketAddr::new(lan.addr().into(), port),
        policy: policy(),
        admin: tabbify_tests::testbed::ADMIN.to_owned(),
        heartbeat_secs: HEARTBEAT_SECS,
        relay: false,
        relay_urls: Vec::new(),
    }
}

/// Polls until `joiner` streams from the coordinator at `url`.
fn wait_homed(joiner: &mut Joiner, url: &str, timeout: Duration) -> Result<()> {
    joiner.wait_status(&format!("to stream from {url}"), timeout, |s| {
        s.registered && s.coordinator.connected && s.coordinator.url == url
    })?;
    Ok(())
}

#[test]
fn a_joiner_fails_over_to_the_next_coordinator_and_its_tunnels_never_notice() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let pg = Postgres::start().map_err(anyhow::Error::msg)?;
    pg.create_database("failover").map_err(anyhow::Error::msg)?;
    let database = pg.socket_url("failover");

    let lan = Lan::new()?;
    let pki = Pki::new(&[lan.addr().into()])?;
    let mut c1 =
        Coordinator::start_with_database(lan.netns(), &pki, spec(&lan, 8443), Some(&database))?;
    let c2 =
        Coordinator::start_with_database(lan.netns(), &pki, spec(&lan, 8444), Some(&database))?;
    // A coordinator of another mesh (another CA) at the head of a's list.
    let foreign_pki = Pki::new(&[lan.addr().into()])?;
    let foreign = Coordinator::start(lan.netns(), &foreign_pki, spec(&lan, 8445))?;
    let admin = Admin::new(
        lan.netns(),
        &c1.url(),
        pki.issue_admin(tabbify_tests::testbed::ADMIN)?,
    );

    let a_ns = Netns::new()?;
    lan.attach(&a_ns)?;
    let b_ns = Netns::new()?;
    lan.attach(&b_ns)?;
    let token = || admin.create_token(&["supervisor"], None, 1);
    let mut a_spec = JoinSpec::new("supervisor-a", &["supervisor"], Some(token()?));
    a_spec.more_coordinators = vec![c1.url(), c2.url()];
    let mut a = Joiner::start(
        &a_ns,
        &foreign.url(),
        &pki.issue_peer("supervisor-a")?,
        a_spec,
    )?;
    let mut b_spec = JoinSpec::new("supervisor-b", &["supervisor"], Some(token()?));
    b_spec.more_coordinators = vec![c2.url()];
    let mut b = Joiner::start(&b_ns, &c1.url(), &pki.issue_peer("supervisor-b")?, b_spec)?;

    a.wait_peer_names(&["supervisor-b"], SETTLE)?;
    let status = b.wait_peer_names(&["supervisor-a"], SETTLE)?;
    let b_ula = status.ula;
    wait_homed(&mut a, &c1.url(), SETTLE)?;
    let status = a.status()?;
    let targets: Vec<(String, bool)> = status
        .coordinator
        .targets
        .iter()
        .map(|t| (t.url.clone(), t.in_use))
        .collect();
    ensure!(
        targets == vec![(foreign.url(), false), (c1.url(), true), (c2.url(), false)],
        "supervisor-a's coordinator targets: {targets:?}"
    );
    ensure!(
        a.logs().contains("TLS"),
        "supervisor-a's log does not name the foreign coordinator's TLS refusal:\n{}",
        a.logs()
    );
    ensure!(
        !foreign.logs().contains("supervisor-a"),
        "the foreign coordinator saw supervisor-a:\n{}",
        foreign.logs()
    );

    let mut pinger = Pinger::start(&a_ns, b_ula.into(), "0.1")?;
    pinger.wait_reply_after(unix_now(), Duration::from_secs(10))?;

    let killed = unix_now();
    c1.kill()?;
    let bound = Duration::from_secs(HEARTBEAT_SECS) + SLACK;
    wait_homed(&mut a, &c2.url(), bound).context("supervisor-a re-homing")?;
    let a_took = unix_now() - killed;
    wait_homed(&mut b, &c2.url(), bound).context("supervisor-b re-homing")?;
    let b_took = unix_now() - killed;
    let answered = pinger.check_uninterrupted(killed, Duration::from_secs(6))?;
    a.wait_peer_names(&["supervisor-b"], Duration::from_secs(5))?;
    b.wait_peer_names(&["supervisor-a"], Duration::from_secs(5))?;
    println!(
        "c1 killed: supervisor-a seen streaming from c2 {a_took:.2} s after, supervisor-b \
         {b_took:.2} s after (bound {HEARTBEAT_SECS} s + polling); {answered} pings answered, \
         none lost"
    );
    // c1 and c2 share the members through PostgreSQL: c2 answers the heartbeat, so neither
    // joiner registers again (a coordinator that did not know it would get a registration).
    for (name, joiner) in [("supervisor-a", &a), ("supervisor-b", &b)] {
        ensure!(
            !joiner.logs().contains("does not know us: registering"),
            "{name} registered again with c2, which shares its member row:\n{}",
            joiner.logs()
        );
    }

    // b leaves: it exits 0, and a drops it within 1 s.
    let left = Instant::now();
    let answer = b.local_command(&["leave", "--json"])?;
    let answer: tabbify_api::LeaveResponse =
        serde_json::from_str(&answer).with_context(|| format!("leave answered {answer:?}"))?;
    ensure!(answer.left, "leave answered {answer:?}");
    a.wait_peer_names(&[], Duration::from_secs(1) + SLACK)?;
    println!(
        "supervisor-b left: gone from supervisor-a's roster after {:.2} s",
        left.elapsed().as_secs_f64()
    );
    let status = b.process().wait_exit(Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "supervisor-b exited with {status} after leave"
    );

    drop(pinger);
    a.stop()?;
    Ok(())
}

/// `path` as UTF-8 (every path here is made by the harness).
fn path_str(path: &std::path::Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

/// Removes `/etc/netns/<ns>` (the namespace's hosts file) when dropped, also on failure.
struct NetnsEtc(std::path::PathBuf);

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_name_with_two_addresses_is_two_coordinators() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let pg = Postgres::start().map_err(anyhow::Error::msg)?;
    pg.create_database("names").map_err(anyhow::Error::msg)?;
    let database = pg.socket_url("names");
    let lan = Lan::new()?;
    let second: std::net::IpAddr = "10.200.0.254".parse()?;
    lan.netns()
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "br0"])?;
    let pki = Pki::new(&[lan.addr().into()])?;
    let first = spec(&lan, 8443);
    let mut other = spec(&lan, 8443);
    other.bind = SocketAddr::new(second, 8443);
    let mut coordinators = [
        Coordinator::start_with_database(lan.netns(), &pki, first, Some(&database))?,
        Coordinator::start_with_database(lan.netns(), &pki, other, Some(&database))?,
    ];
    let admin = Admin::new(
        lan.netns(),
        &coordinators[0].url(),
        pki.issue_admin(tabbify_tests::testbed::ADMIN)?,
    );
    let ns = Netns::new()?;
    lan.attach(&ns)?;
    let etc = NetnsEtc(std::path::PathBuf::from(format!(
        "/etc/netns/{}",
        ns.name()
    )));
    std::fs::create_dir_all(&etc.0)?;
    let name = tabbify_tests::pki::COORDINATOR_NAME;
    std::fs::write(
        etc.0.join("hosts"),
        format!(
            "127.0.0.1 localhost\n{} {name}\n{second} {name}\n",
            lan.addr()
        ),
    )?;
    let url = format!("https://{name}:8443");
    let token = admin.create_token(&["supervisor"], None, 1)?;
    let spec = JoinSpec::new("supervisor-n", &["supervisor"], Some(token));
    let mut joiner = Joiner::start(&ns, &url, &pki.issue_peer("supervisor-n")?, spec)?;
    let status = joiner.wait_status("to stream", SETTLE, |s| s.coordinator.connected)?;
    let addresses: Vec<Option<SocketAddr>> = status
        .coordinator
        .targets
        .iter()
        .map(|t| t.address)
        .collect();
    let mut want = vec![Some(coordinators[0].addr()), Some(coordinators[1].addr())];
    let mut seen = addresses.clone();
    seen.sort();
    want.sort();
    ensure!(
        seen == want && status.coordinator.targets.iter().all(|t| t.url == url),
        "targets of {url}: {:?}",
        status.coordinator.targets
    );
    let in_use = status.coordinator.address.context("no address in use")?;
    let (dead, alive) = if in_use == coordinators[0].addr() {
        (0, 1)
    } else {
        (1, 0)
    };
    let killed = unix_now();
    coordinators[dead].kill()?;
    let alive_addr = coordinators[alive].addr();
    joiner.wait_status(
        &format!("to stream from {alive_addr}"),
        Duration::from_secs(HEARTBEAT_SECS) + SLACK,
        |s| s.coordinator.connected && s.coordinator.address == Some(alive_addr),
    )?;
    println!(
        "{url} = {in_use} and {alive_addr}: {in_use} killed, streaming from {alive_addr} {:.2} s after",
        unix_now() - killed
    );
    joiner.stop()?;
    Ok(())
}

#[test]
fn ephemeral_members_go_at_staleness_or_at_once_when_stopped() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Curl])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let bed = Testbed::start(policy(), HEARTBEAT_SECS)?;
    let join = |name: &str, ephemeral: bool| -> Result<(Joiner, tabbify_tests::pki::Issued)> {
        let (netns, _) = bed.host()?;
        let mut spec = JoinSpec::new(name, &["supervisor"], None);
        spec.ephemeral = ephemeral;
        spec.join_token = Some(bed.token_for(&spec)?);
        let cert = bed.pki.issue_peer(name)?;
        Ok((
            Joiner::start(&netns, &bed.coordinator.url(), &cert, spec)?,
            cert,
        ))
    };
    let (mut observer, _) = join("observer", false)?;
    let (mut ordinary, ordinary_cert) = join("ordinary", false)?;
    let (mut killed, _) = join("ephemeral-killed", true)?;
    let (stopped, _) = join("ephemeral-stopped", true)?;
    observer.wait_peer_names(
        &["ephemeral-killed", "ephemeral-stopped", "ordinary"],
        SETTLE,
    )?;

    // SIGKILL: no leave is sent. At the stale mark the ephemeral member is removed, the
    // ordinary one only marked stale. The coordinator keeps its state in SQLite, so liveness
    // is judged from the stored, coarsened `last_seen` (control/README, Liveness): stale once
    // the database has not seen a member for 3 + 3.5 heartbeat intervals plus a second.
    let t = Instant::now();
    ordinary.process().signal(libc::SIGKILL)?;
    killed.process().signal(libc::SIGKILL)?;
    let stale_after = Duration::from_millis(6_500 * HEARTBEAT_SECS) + Duration::from_secs(1);
    let stale_bound = stale_after + Duration::from_secs(HEARTBEAT_SECS) + SLACK;
    let status = observer.wait_status(
        "to drop the killed ephemeral member and keep the ordinary one, stale",
        stale_bound + Duration::from_secs(5),
        |s| s.peer("ephemeral-killed").is_none() && s.peer("ordinary").is_some_and(|p| p.stale),
    )?;
    println!(
        "SIGKILL: the ephemeral member left the roster {:.1} s after (stale after {:.1} s)",
        t.elapsed().as_secs_f64(),
        stale_after.as_secs_f64()
    );
    ensure!(
        status.peer("ephemeral-stopped").is_some(),
        "the live ephemeral member went too"
    );
    // The dead ordinary member is removed by its owner with its certificate (no joiner
    // runs): `leave --coordinator … --tls-*` from its namespace.
    let cert = ordinary_cert;
    let binary = tabbify_tests::bins::tabbify_mesh()?;
    let url = bed.coordinator.url();
    let args = [
        "leave",
        "--coordinator",
        url.as_str(),
        "--tls-cert",
        path_str(&cert.cert)?,
        "--tls-key",
        path_str(&cert.key)?,
        "--tls-ca",
        path_str(&cert.ca)?,
        "--json",
    ];
    let t = Instant::now();
    let out = ordinary.netns().run(path_str(&binary)?, &args)?;
    ensure!(
        out.contains("\"left\": true"),
        "leave --coordinator printed {out:?}"
    );
    observer.wait_status(
        "to drop the ordinary member that left",
        Duration::from_secs(1) + SLACK,
        |s| s.peer("ordinary").is_none(),
    )?;
    println!(
        "leave --coordinator: the dead ordinary member left the roster {:.2} s after",
        t.elapsed().as_secs_f64()
    );

    // SIGTERM: it leaves at once and exits 0.
    let t = Instant::now();
    stopped.stop()?;
    observer.wait_status(
        "to drop the stopped ephemeral member",
        Duration::from_secs(1) + SLACK,
        |s| s.peer("ephemeral-stopped").is_none(),
    )?;
    println!(
        "SIGTERM: the ephemeral member left the roster {:.2} s after (its shutdown included)",
        t.elapsed().as_secs_f64()
    );
    observer.stop()?;
    Ok(())
}
