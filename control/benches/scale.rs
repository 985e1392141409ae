//! Scale benchmark of the coordinator (reports; never fails CI).
//!
//! `cargo bench -p tabbify-control --bench scale` (options: `-- --peers N --subscribers N
//! [--postgres] [--coordinators K] [--heartbeat-secs S] [--steady-secs N]
//! [--only recompute]`; the last runs step 4 alone).
//!
//! With `--postgres` (implied by `--coordinators` above 1) the bench starts a throwaway
//! PostgreSQL cluster (`tests/src/postgres.rs`; Debian's `postgresql` package) and K
//! coordinators on one database: peers register round-robin over them, each streams from
//! another coordinator than the one it registered on, the change is made on the first, and
//! the bench also reports each coordinator's RSS and the database's writes while every
//! peer sends unchanged heartbeats, one round per heartbeat interval for `--steady-secs`
//! (default: one round), the steady state.
//!
//! 1. Starts the real `tabbify-mesh-coordinator` binary as a child process (plaintext on
//!    loopback, so the figures measure the coordinator rather than TLS handshakes) with a
//!    policy of 100 rules: `team-i → team-i` for 99 teams and `* → hub:8730`.
//! 2. Registers N peers (default 10,000; each in one team) plus one hub over keep-alive
//!    HTTP connections and reports throughput, latency percentiles and the coordinator's
//!    RSS (VmRSS of the child process).
//! 3. Opens one SSE stream per peer over real loopback TCP connections (RLIMIT_NOFILE is
//!    raised first), waits for every snapshot, then changes the hub (a heartbeat with a new
//!    endpoint) and reports the time until the last stream has the `peer_upsert`.
//! 4. In-process, times a policy change (reclassify every peer, rebuild the class matrix,
//!    build every class's roster) for 10k peers × 100 rules, plus a harder mix where each
//!    peer has a random pair of 100 tags (thousands of classes).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tabbify_control::api::{PolicyDocument, PolicyRule};
use tabbify_control::policy::Policy;
use tabbify_control::registry::{Limits, NewPeer, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "../../tests/src/postgres.rs"]
mod postgres;

const COORD_BIN: &str = env!("CARGO_BIN_EXE_tabbify-mesh-coordinator");
const TEAMS: usize = 99;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    let peers = opt("--peers", 10_000);
    let subscribers = opt("--subscribers", peers).min(peers);
    let coordinators = opt("--coordinators", 1).max(1);
    let heartbeat_secs = opt("--heartbeat-secs", 3600);
    let steady_secs = opt("--steady-secs", 0);
    // `--only recompute`: just the in-process policy recompute (no coordinator, no streams).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    match only {
        None => {}
        Some("recompute") => {
            in_process(peers);
            return Ok(());
        }
        Some(other) => bail!("--only {other:?}: the only part is `recompute`"),
    }
    let pg = if coordinators > 1 || args.iter().any(|a| a == "--postgres") {
        Some(postgres::Postgres::start().map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    let nofile = raise_nofile(2 * subscribers as u64 + 4096);
    println!(
        "scale bench: {peers} peers, {subscribers} SSE subscribers, {coordinators} \
         coordinator(s) on {}, heartbeat {heartbeat_secs} s, RLIMIT_NOFILE={nofile}",
        if pg.is_some() {
            "one PostgreSQL"
        } else {
            "memory"
        }
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(over_http(
        peers,
        subscribers,
        coordinators,
        (heartbeat_secs, steady_secs),
        pg.as_ref(),
    ))?;
    in_process(peers);
    Ok(())
}

fn policy(teams: usize) -> PolicyDocument {
    let mut tags: Vec<String> = (0..teams).map(|i| format!("team-{i}")).collect();
    tags.push("hub".into());
    let mut allow: Vec<PolicyRule> = (0..teams)
        .map(|i| PolicyRule {
            src: vec![format!("tag:team-{i}")],
            dst: vec![format!("tag:team-{i}")],
        })
        .collect();
    allow.push(PolicyRule {
        src: vec!["*".into()],
        dst: vec!["tag:hub:8730".into()],
    });
    PolicyDocument {
        tags,
        allow,
        ..Default::default()
    }
}

fn key(i: usize) -> [u8; 32] {
    *blake3::hash(&(i as u64).to_le_bytes()).as_bytes()
}

fn b64(k: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(k)
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn start_coordinator(
    policy_path: &std::path::Path,
    database: Option<&str>,
    heartbeat_secs: usize,
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let mut cmd = Command::new(COORD_BIN);
    cmd.args([
        "--bind",
        "127.0.0.1:0",
        "--insecure-no-mtls",
        "--admin",
        "admin",
    ])
    .args(["--heartbeat-secs", &heartbeat_secs.to_string()])
    // Every simulated peer connects from 127.0.0.1: lift the per-IP and overall caps.
    .args(["--max-connections", "1000000"])
    .args(["--max-connections-per-ip", "1000000"])
    .args(["--stun-bind", "off"])
    .arg("--policy-file")
    .arg(policy_path)
    .env("TABBIFY_ALLOW_INSECURE", "1")
    .env("RUST_LOG", "error")
    .env_remove("TABBIFY_DATABASE_URL")
    .stdout(Stdio::piped());
    if let Some(url) = database {
        cmd.args(["--database", url]);
    }
    let mut child = cmd.spawn().context("starting the coordinator")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let child = ChildGuard(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .context("coordinator did not start")?
        .parse()?;
    Ok((child, addr))
}

/// What the database was written since `since` (Unix seconds): change-log entries (every
/// committed change) up to now, and members whose `last_seen` was written since (the
/// batched liveness writes, which are not in the log). Exact counts, not statistics.
fn db_writes(pg: &postgres::Postgres, since: u64) -> anyhow::Result<(u64, u64)> {
    let q = |sql: &str| -> anyhow::Result<u64> {
        Ok(pg
            .psql("bench", sql)
            .map_err(anyhow::Error::msg)?
            .trim()
            .parse()?)
    };
    Ok((
        q("SELECT COALESCE(max(id), 0) FROM change_log")?,
        q(&format!(
            "SELECT count(*) FROM members WHERE last_seen >= {since}"
        ))?,
    ))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn over_http(
    peers: usize,
    subscribers: usize,
    coordinators: usize,
    (heartbeat_secs, steady_secs): (usize, usize),
    pg: Option<&postgres::Postgres>,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let policy_path = dir.path().join("policy.json");
    std::fs::write(&policy_path, serde_json::to_vec(&policy(TEAMS))?)?;
    let url = match pg {
        Some(pg) => Some(pg.create_database("bench").map_err(anyhow::Error::msg)?),
        None => None,
    };
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..coordinators {
        let (child, addr) = start_coordinator(&policy_path, url.as_deref(), heartbeat_secs)?;
        println!(
            "coordinator pid {} on {addr}, idle RSS {} KiB",
            child.0.id(),
            rss_kib(child.0.id())
        );
        children.push(child);
        addrs.push(addr);
    }
    let pids: Vec<u32> = children.iter().map(|c| c.0.id()).collect();
    let rss = |label: &str| {
        let per: Vec<String> = pids
            .iter()
            .map(|p| format!("{:.1}", rss_kib(*p) as f64 / 1024.0))
            .collect();
        println!("coordinator RSS {label}: {} MiB", per.join(" / "));
    };
    let addr = addrs[0];
    let pid = pids[0];
    let mut admin = Conn::open(addr, "admin").await?;
    let (st, t) = admin
        .request(
            "POST",
            "/v1/tokens",
            Some(json!({"tags": ["hub"], "max_uses": 0, "unlimited": true})),
        )
        .await?;
    if st != 200 {
        bail!("minting: {st} {t}");
    }
    let hub_token = t["token"].as_str().unwrap_or_default().to_owned();
    let mut team_tokens = Vec::new();
    for i in 0..TEAMS {
        let (_, t) = admin
            .request(
                "POST",
                "/v1/tokens",
                Some(json!({"tags": [format!("team-{i}")], "max_uses": 0, "unlimited": true})),
            )
            .await?;
        team_tokens.push(t["token"].as_str().unwrap_or_default().to_owned());
    }
    let team_tokens = Arc::new(team_tokens);
    if coordinators > 1 {
        // The other coordinators learn the tokens from the change log.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let addrs = Arc::new(addrs);

    // Register.
    let workers = 32;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let tokens = team_tokens.clone();
        let addrs = addrs.clone();
        tasks.push(tokio::spawn(async move {
            let addr = addrs[w % addrs.len()];
            let mut lat = Vec::new();
            let mut conn: Option<Conn> = None;
            for i in (w..peers).step_by(workers) {
                let name = format!("p{i}");
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => conn.insert(Conn::open(addr, &name).await?),
                };
                c.identity = name.clone();
                let body = json!({
                    "name": name, "public_key": b64(&key(i)), "wg_listen_port": 51820,
                    "endpoints": ["127.0.0.1:51820"], "join_token": tokens[i % TEAMS],
                });
                let t0 = Instant::now();
                let (mut st, mut v) = c
                    .request("POST", "/v1/mesh/register", Some(body.clone()))
                    .await?;
                // A lost race with another coordinator is retried, as a joiner does.
                for _ in 0..5 {
                    if st != 409 {
                        break;
                    }
                    (st, v) = c
                        .request("POST", "/v1/mesh/register", Some(body.clone()))
                        .await?;
                }
                lat.push(t0.elapsed());
                if st != 200 {
                    bail!("register {i}: {st} {v}");
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let took = started.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    println!(
        "register {peers} peers: {:.2} s ({:.0}/s), latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        took.as_secs_f64(),
        peers as f64 / took.as_secs_f64(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3,
    );
    let mut hub = Conn::open(addr, "hub").await?;
    let (st, v) = hub
        .request(
            "POST",
            "/v1/mesh/register",
            Some(
                json!({"name": "hub", "public_key": b64(&key(usize::MAX)), "wg_listen_port": 51820,
                        "endpoints": ["127.0.0.1:51820"], "join_token": hub_token}),
            ),
        )
        .await?;
    if st != 200 {
        bail!("hub: {st} {v}");
    }
    let hub_id = v["peer_id"].as_str().unwrap_or_default().to_owned();
    println!(
        "coordinator RSS with {} registered peers: {:.1} MiB",
        peers + 1,
        rss_kib(pid) as f64 / 1024.0
    );
    rss(&format!("with {} registered peers", peers + 1));
    // Every coordinator serves every member once it has caught up with the change log.
    let caught_up = Instant::now();
    for a in addrs.iter() {
        let mut c = Conn::open(*a, "admin").await?;
        loop {
            let (_, h) = c.request("GET", "/health", None).await?;
            if h["peers"].as_u64() == Some(peers as u64 + 1) {
                break;
            }
            if caught_up.elapsed() > Duration::from_secs(300) {
                bail!("coordinator {a} holds {} peers", h["peers"]);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if coordinators > 1 {
        println!(
            "every coordinator holds all {} members {:.2} s after the last registration answer",
            peers + 1,
            caught_up.elapsed().as_secs_f64()
        );
    }

    // Streams.
    let ready = Arc::new(AtomicUsize::new(0));
    let got = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let opened = Instant::now();
    let mut streams = Vec::new();
    for i in 0..subscribers {
        let ready = ready.clone();
        let got = got.clone();
        let done = done_tx.clone();
        // The peer registered through coordinator (i % 32) % K: stream from the next one.
        let addr = addrs[((i % 32) % addrs.len() + 1) % addrs.len()];
        streams.push(tokio::spawn(async move {
            let r = sse_client(addr, &format!("p{i}"), &ready, &got, &done).await;
            if let Err(e) = r {
                eprintln!("stream p{i}: {e:#}");
            }
        }));
        if i % 500 == 499 {
            // Let the accept queue drain.
            tokio::task::yield_now().await;
        }
    }
    drop(done_tx);
    while ready.load(Ordering::SeqCst) < subscribers {
        if opened.elapsed() > Duration::from_secs(300) {
            bail!(
                "only {} streams got their snapshot",
                ready.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{subscribers} SSE streams open with snapshots after {:.2} s; coordinator RSS {:.1} MiB",
        opened.elapsed().as_secs_f64(),
        rss_kib(pid) as f64 / 1024.0
    );
    rss(&format!("with {subscribers} SSE streams open"));

    // The hub's connection idled while the streams opened (the coordinator closes idle
    // keep-alive connections after its request timeout): a fresh one.
    let mut hub = Conn::open(addr, "hub").await?;
    let t0 = Instant::now();
    let (st, v) = hub
        .request(
            "POST",
            "/v1/mesh/heartbeat",
            Some(json!({"peer_id": hub_id, "endpoints": ["127.0.0.1:4242"]})),
        )
        .await?;
    if st != 200 {
        bail!("hub heartbeat: {st} {v}");
    }
    let acked = t0.elapsed();
    let mut last = t0;
    let mut arrivals = Vec::with_capacity(subscribers);
    while arrivals.len() < subscribers {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some(t)) => {
                last = last.max(t);
                arrivals.push(t.duration_since(t0));
            }
            _ => break,
        }
    }
    arrivals.sort();
    let n = arrivals.len();
    if n == 0 {
        bail!("no stream received the change");
    }
    println!(
        "fan-out of one change to {n}/{subscribers} SSE subscribers: last {:.1} ms after the \
         heartbeat was sent (heartbeat answered after {:.1} ms; p50 {:.1} ms, p99 {:.1} ms)",
        last.duration_since(t0).as_secs_f64() * 1e3,
        acked.as_secs_f64() * 1e3,
        arrivals[n / 2].as_secs_f64() * 1e3,
        arrivals[(n - 1) * 99 / 100].as_secs_f64() * 1e3,
    );
    if let Some(pg) = pg {
        // Steady state: every peer sends one unchanged heartbeat, through the coordinator
        // it registered on.
        // Whole seconds: a row written in the second the window starts counts.
        let since = unix_now() + 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = db_writes(pg, since)?;
        let t0 = Instant::now();
        let mut rounds = 0;
        loop {
            let round = Instant::now();
            heartbeat_round(&addrs, workers, peers).await?;
            // The hub too, unchanged since the fan-out (else it would go stale: a write).
            let mut hub = Conn::open(addr, "hub").await?;
            let (st, v) = hub
                .request(
                    "POST",
                    "/v1/mesh/heartbeat",
                    Some(json!({"peer_id": hub_id, "endpoints": ["127.0.0.1:4242"]})),
                )
                .await?;
            if st != 200 {
                bail!("hub heartbeat: {st} {v}");
            }
            rounds += 1;
            let next = round + Duration::from_secs(heartbeat_secs as u64);
            if t0.elapsed() + Duration::from_secs(heartbeat_secs as u64)
                > Duration::from_secs(steady_secs as u64)
            {
                break;
            }
            tokio::time::sleep_until(next.into()).await;
        }
        let took = t0.elapsed();
        // Let the coordinators' sweeps (every half heartbeat interval, at most 5 s here)
        // run once.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let after = db_writes(pg, since)?;
        let window = t0.elapsed().as_secs_f64();
        println!(
            "steady state: {rounds} round(s) of {peers} unchanged heartbeats over \
             {coordinators} coordinator(s) in {:.1} s; in the {window:.1} s window the database \
             got {} change-log entries and {} members' last_seen written ({:.2} writes/s)",
            took.as_secs_f64(),
            after.0 - before.0,
            after.1,
            (after.0 - before.0 + after.1) as f64 / window,
        );
    }
    for s in streams {
        s.abort();
    }
    Ok(())
}

/// Every peer sends one unchanged heartbeat, through the coordinator it registered on.
async fn heartbeat_round(
    addrs: &Arc<Vec<SocketAddr>>,
    workers: usize,
    peers: usize,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let addr = addrs[w % addrs.len()];
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr, "p0").await?;
            for i in (w..peers).step_by(workers) {
                let name = format!("p{i}");
                conn.identity = name.clone();
                let body = json!({"peer_id": tabbify_control::ula::identity_peer_id(&name),
                                  "endpoints": ["127.0.0.1:51820"]});
                let (st, v) = conn
                    .request("POST", "/v1/mesh/heartbeat", Some(body))
                    .await?;
                if st != 200 {
                    bail!("heartbeat {i}: {st} {v}");
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// A keep-alive HTTP/1.1 connection naming itself with the insecure identity header.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    identity: String,
}

impl Conn {
    async fn open(addr: SocketAddr, identity: &str) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender,
            identity: identity.to_owned(),
        })
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "coordinator")
            .header("content-type", "application/json")
            .header("x-tabbify-identity", &self.identity)
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let st = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((st, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }
}

/// Reads one stream: counts the snapshot, then reports the arrival of the first upsert.
async fn sse_client(
    addr: SocketAddr,
    identity: &str,
    ready: &AtomicUsize,
    got: &AtomicUsize,
    done: &tokio::sync::mpsc::UnboundedSender<Instant>,
) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(
        format!(
            "GET /v1/mesh/peers/stream HTTP/1.1\r\nhost: c\r\nx-tabbify-identity: {identity}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    let mut snapshot = false;
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            bail!("stream closed");
        }
        tail.extend_from_slice(&buf[..n]);
        if !snapshot && find(&tail, b"event: snapshot").is_some() {
            snapshot = true;
            ready.fetch_add(1, Ordering::SeqCst);
        }
        if snapshot && find(&tail, b"event: peer_upsert").is_some() {
            got.fetch_add(1, Ordering::SeqCst);
            let _ = done.send(Instant::now());
            // Keep the connection open (and idle) until the bench ends.
            loop {
                if tcp.read(&mut buf).await? == 0 {
                    return Ok(());
                }
            }
        }
        let keep = tail.len().saturating_sub(32);
        tail.drain(..keep);
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn in_process(peers: usize) {
    for (label, two_tags) in [
        ("one team tag per peer", false),
        ("a random pair of 100 tags per peer", true),
    ] {
        let doc = policy(TEAMS);
        let p1 = Arc::new(Policy::compile(doc.clone()).expect("policy"));
        let mut reg = Registry::new(p1, 1, Limits::default());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as usize
        };
        for i in 0..peers {
            let mut tags = BTreeSet::new();
            tags.insert(format!("team-{}", i % TEAMS));
            if two_tags {
                tags.insert(format!("team-{}", rnd() % TEAMS));
            }
            reg.upsert(
                NewPeer {
                    key: key(i),
                    identity: format!("p{i}"),
                    display_name: format!("p{i}"),
                    tags: tags.into_iter().collect(),
                    endpoints: vec!["127.0.0.1:51820".parse().expect("addr")],
                    wg_listen_port: 51820,
                    reflexive: "127.0.0.1:51820".parse().expect("addr"),
                    ephemeral: false,
                    concentrator: false,
                },
                0,
            );
        }
        // The same rules in another order: a real recompute, same answer.
        let mut doc2 = doc;
        doc2.allow.reverse();
        let p2 = Arc::new(Policy::compile(doc2).expect("policy"));
        let t0 = Instant::now();
        let rules = p2.allow_rules().len() + p2.deny_rules().len();
        reg.set_policy(p2, 2);
        let took = t0.elapsed();
        println!(
            "policy recompute, {peers} peers × {rules} rules, {label}: {:.1} ms \
             ({} classes; includes every class's roster for the policy event)",
            took.as_secs_f64() * 1e3,
            reg.visibility().len()
        );
    }
}

/// Raises the open-file limit to at least `want` (as far as the hard limit allows, or
/// further as root). Returns the soft limit in force.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: setrlimit reads the rlimit struct we own; failure leaves the limit as is.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
        return want;
    }
    let fallback = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &fallback) };
    lim.rlim_max
}
