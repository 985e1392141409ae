//! Many peers (issue 17, Deliver 4): ours with 1,000 peers configured, against ours with
//! one, in the suite's namespace rig (two namespaces, one veth, RPS on).
//!
//! Per round, in turn (the order alternating by round):
//! * **one peer**: the suite's tunnel (ours on both ends, one peer each), iperf3 TCP 1
//!   stream; the right daemon's RSS once the tunnel is up.
//! * **many peers**: the right daemon (the iperf3 server's side) is configured with the
//!   real client plus `--peers − 1` more, each with its own key and a /32 of
//!   10.100.0.0/16; the same TCP 1 stream to the one busy peer, and RSS once up. Then every
//!   extra peer handshakes at once: `tabbify-perf handshake-flood` runs in the left
//!   namespace, holds one boringtun `Tunn` per extra peer (their private keys), sends all
//!   initiations back to back from one socket, answers cookie replies and retransmits on
//!   boringtun's timers as a real peer would, and reports the time until every session is
//!   up. The right daemon's RSS is read again with every session established.
//!
//! Memory per peer = (RSS with N peers − RSS with one) / (N − 1), idle (configured only) and
//! with sessions; "beyond the `Tunn`" subtracts boringtun's own per-peer memory, measured
//! in this process as the RSS growth of N `Tunn`s (configured, and with a session).
//! The table publication cost at 10,000 peers is a criterion bench (`benches/benches/
//! peers.rs`): it is in-process work with no I/O, which criterion times best.
//!
//! Attacker's view: the flood's initiators are members with valid keys doing nothing
//! WireGuard forbids; the responder's cookie mechanism (WireGuard §5.3, 100 handshakes/s
//! before cookies) is part of what is measured, not bypassed.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::{Deserialize, Serialize};
use tabbify_tests::labmesh::rss_kib;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::wait_ping;
use tabbify_tests::wg::{
    Driver, Implementation, InterfaceConfig, Keypair, OursOptions, WgPeer, WgPeerConfig,
};
use tabbify_tests::{Inner, Netns, Tunnel, TunnelSpec, VethOptions, VethPair};

use crate::iperf::{measure, Metric, Server};
use crate::report::median;

/// The rig's WireGuard port (both namespaces).
const PORT: u16 = 51820;
/// How long the flood waits for every handshake.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `tabbify-perf peers`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Peers configured on the busy side (the real one plus synthetic ones).
    #[arg(long, default_value_t = 1000)]
    pub peers: u32,
}

/// Options of the internal `handshake-flood`.
#[derive(Debug, clap::Args)]
pub struct FloodArgs {
    /// File with one base64 private key per line: the initiators.
    #[arg(long)]
    pub keys: PathBuf,
    /// The responder's public key (base64).
    #[arg(long)]
    pub server_public: String,
    /// The responder's UDP endpoint.
    #[arg(long)]
    pub endpoint: SocketAddr,
}

/// What the flood reports (one JSON line on stdout, after [`FLOOD_TAG`]).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FloodResult {
    /// Initiators.
    pub peers: usize,
    /// Sessions established (a handshake response taken and confirmed).
    pub completed: usize,
    /// Seconds from the first initiation until the last session was up (or the timeout).
    pub all_done_s: f64,
    /// Seconds until half were up.
    pub half_done_s: Option<f64>,
    /// Cookie replies received (the responder under load).
    pub cookie_replies: u64,
    /// Initiations sent again on boringtun's timers.
    pub retransmits: u64,
}

const FLOOD_TAG: &str = "FLOOD_RESULT ";

/// One round's figures.
#[derive(Debug, Default, Serialize)]
struct Round {
    one_peer_tcp1_gbps: Option<f64>,
    many_peers_tcp1_gbps: Option<f64>,
    one_peer_rss_kib: Option<u64>,
    many_peers_rss_kib: Option<u64>,
    many_peers_established_rss_kib: Option<u64>,
    flood: Option<FloodResult>,
    errors: Vec<String>,
}

/// The JSON written per run.
#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    peers: u32,
    duration_s: u32,
    binary: String,
    load_average: [Option<f64>; 2],
    tunn_bytes_configured: Option<f64>,
    tunn_bytes_established: Option<f64>,
    rounds: Vec<Round>,
    median_one_peer_tcp1_gbps: Option<f64>,
    median_many_peers_tcp1_gbps: Option<f64>,
    many_over_one: Option<f64>,
    median_handshakes_all_done_s: Option<f64>,
    median_bytes_per_peer_idle: Option<f64>,
    median_bytes_per_peer_established: Option<f64>,
}

/// Runs the benchmark; prints and writes (`out/peers-<time>.json`) the results.
pub fn run(args: &Args, mesh_bin: &Path, duration: u32, rounds: u32, out: &Path) -> Result<()> {
    require(&[Tool::Iproute2, Tool::Wg, Tool::Iperf3, Tool::Ping])?;
    ensure!(
        (2..=60_000).contains(&args.peers),
        "--peers must be 2..=60000"
    );
    ensure!(
        rounds > 0 && duration > 0,
        "--rounds and --duration must be at least 1"
    );
    let n = args.peers as usize;
    let load_before = crate::load_average();
    // boringtun's own per-peer memory, before any namespaces (this process only).
    let tunn_configured = tunn_bytes(n, false).ok();
    let tunn_established = tunn_bytes(n, true).ok();
    let left = Netns::with_label("perf-peers-a")?;
    let right = Netns::with_label("perf-peers-b")?;
    let veth = VethPair::connect(&left, &right, &VethOptions::default())?;
    let ours = Implementation::Ours(OursOptions {
        driver: Some(Driver::Uring),
        offloads: None,
        threads: None,
        pin: Some(false),
        binary: Some(mesh_bin.to_path_buf()),
    });
    let mut all = Vec::new();
    for round in 1..=rounds {
        let mut r = Round::default();
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for many in order {
            eprintln!(
                "perf peers: round {round}/{rounds}: {}",
                if many { "many peers" } else { "one peer" }
            );
            let outcome = if many {
                many_peers(&ours, &veth, n, duration, &mut r)
            } else {
                one_peer(&ours, &veth, duration, &mut r)
            };
            if let Err(error) = outcome {
                eprintln!("perf peers: {error:#}");
                r.errors.push(format!("{error:#}"));
            }
        }
        all.push(r);
    }
    let per_peer = |pick: fn(&Round) -> Option<u64>| {
        median(all.iter().map(|r| {
            let many = pick(r)?;
            let one = r.one_peer_rss_kib?;
            Some((many as f64 - one as f64) * 1024.0 / (n - 1) as f64)
        }))
    };
    let one = median(all.iter().map(|r| r.one_peer_tcp1_gbps));
    let many = median(all.iter().map(|r| r.many_peers_tcp1_gbps));
    let report = Report {
        bench: "peers",
        peers: args.peers,
        duration_s: duration,
        binary: mesh_bin.display().to_string(),
        load_average: [load_before, crate::load_average()],
        tunn_bytes_configured: tunn_configured,
        tunn_bytes_established: tunn_established,
        median_one_peer_tcp1_gbps: one,
        median_many_peers_tcp1_gbps: many,
        many_over_one: match (many, one) {
            (Some(m), Some(o)) if o > 0.0 => Some(m / o),
            _ => None,
        },
        median_handshakes_all_done_s: median(all.iter().map(|r| {
            r.flood
                .as_ref()
                .filter(|f| f.completed == f.peers)
                .map(|f| f.all_done_s)
        })),
        median_bytes_per_peer_idle: per_peer(|r| r.many_peers_rss_kib),
        median_bytes_per_peer_established: per_peer(|r| r.many_peers_established_rss_kib),
        rounds: all,
    };
    println!("{}", markdown(&report));
    let path = crate::multicore::write_json(out, "peers", &report)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn one_peer(ours: &Implementation, veth: &VethPair, duration: u32, r: &mut Round) -> Result<()> {
    let mut spec = TunnelSpec::new(ours.clone(), ours.clone());
    spec.inner = Inner::V4;
    spec.outer_v6 = false;
    let tunnel = Tunnel::start_on(&spec, veth)?;
    tunnel.wait_ready(Duration::from_secs(20))?;
    r.one_peer_rss_kib = Some(rss_kib(tunnel.right.process().pid())?);
    let server = Server::start(tunnel.right.netns())?;
    let sample = measure(
        tunnel.left.netns(),
        tunnel.right_inner[0],
        Metric::Tcp1,
        duration,
    );
    drop(server);
    tunnel.stop()?;
    r.one_peer_tcp1_gbps = Some(sample?.value);
    Ok(())
}

/// A key pair as `wg` prints it, made in-process (1,000 `wg genkey` runs take seconds).
fn keypair() -> (StaticSecret, Keypair) {
    let (secret, public) = crate::crypto::keypair();
    let keypair = Keypair {
        private: STANDARD.encode(secret.to_bytes()),
        public: STANDARD.encode(public.as_bytes()),
    };
    (secret, keypair)
}

/// The synthetic peers' inner /32s: 10.100.0.1, … (never the rig's 10.99.0.0/24).
fn synthetic_ip(i: usize) -> Ipv4Addr {
    let host = i + 1;
    Ipv4Addr::new(10, 100, (host / 250) as u8, (host % 250) as u8 + 1)
}

fn many_peers(
    ours: &Implementation,
    veth: &VethPair,
    n: usize,
    duration: u32,
    r: &mut Round,
) -> Result<()> {
    let (_, left_key) = keypair();
    let (_, right_key) = keypair();
    let left_ip = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
    let right_ip = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2));
    let interface = |keypair: &Keypair, ip: IpAddr| InterfaceConfig {
        keypair: keypair.clone(),
        listen_port: PORT,
        addresses: vec![format!("{ip}/32")],
        mtu: tabbify_tests::tunnel::MTU,
    };
    let extra: Vec<(StaticSecret, Keypair)> = (1..n).map(|_| keypair()).collect();
    let mut right_peers = vec![WgPeerConfig {
        public_key: left_key.public.clone(),
        allowed_ips: vec![format!("{left_ip}/32")],
        ..WgPeerConfig::default()
    }];
    right_peers.extend(extra.iter().enumerate().map(|(i, (_, k))| WgPeerConfig {
        public_key: k.public.clone(),
        allowed_ips: vec![format!("{}/32", synthetic_ip(i))],
        ..WgPeerConfig::default()
    }));
    let right = WgPeer::start(
        &veth.b.netns,
        ours,
        &interface(&right_key, right_ip),
        &right_peers,
    )
    .context("starting ours with many peers")?;
    let right_endpoint = SocketAddr::new(veth.b.addr(false), PORT);
    let left = WgPeer::start(
        &veth.a.netns,
        ours,
        &interface(&left_key, left_ip),
        &[WgPeerConfig {
            public_key: right_key.public.clone(),
            allowed_ips: vec![format!("{right_ip}/32")],
            endpoint: Some(right_endpoint),
            ..WgPeerConfig::default()
        }],
    )
    .context("starting the busy peer")?;
    wait_ping(left.netns(), right_ip, Duration::from_secs(20))?;
    left.wait_handshake(right.public_key(), Duration::from_secs(20))?;
    r.many_peers_rss_kib = Some(rss_kib(right.process().pid())?);
    let server = Server::start(right.netns())?;
    let sample = measure(left.netns(), right_ip, Metric::Tcp1, duration);
    drop(server);
    r.many_peers_tcp1_gbps = Some(sample?.value);

    // Every extra peer handshakes at once, from the left namespace.
    let keys = left.netns().workdir().join("flood-keys");
    let mut file = std::fs::File::create(&keys)?;
    for (secret, _) in &extra {
        writeln!(file, "{}", STANDARD.encode(secret.to_bytes()))?;
    }
    drop(file);
    let exe = std::env::current_exe().context("finding this executable")?;
    let exe = exe.to_str().context("non-UTF-8 executable path")?;
    let keys_arg = keys.to_str().context("non-UTF-8 key path")?;
    let endpoint = right_endpoint.to_string();
    let mut flood = left.netns().spawn(
        "handshake-flood",
        exe,
        &[
            "handshake-flood",
            "--keys",
            keys_arg,
            "--server-public",
            &right_key.public,
            "--endpoint",
            &endpoint,
        ],
    )?;
    flood.wait_exit(FLOOD_TIMEOUT + Duration::from_secs(30))?;
    let log = flood.logs();
    let line = log
        .lines()
        .find_map(|l| l.split_once(FLOOD_TAG).map(|(_, json)| json))
        .with_context(|| format!("handshake-flood printed no result:\n{log}"))?;
    let result: FloodResult = serde_json::from_str(line).context("parsing the flood result")?;
    r.many_peers_established_rss_kib = Some(rss_kib(right.process().pid())?);
    r.flood = Some(result);
    left.stop()?;
    right.stop()?;
    Ok(())
}

/// RSS growth of this process per `Tunn` for `n` of them (`established`: each with a
/// session, via an in-memory handshake; the initiators are dropped first).
fn tunn_bytes(n: usize, established: bool) -> Result<f64> {
    let before = rss_kib(std::process::id())?;
    let mut tunns = Vec::with_capacity(n);
    for _ in 0..n {
        if established {
            let (a, b) = crate::crypto::established_pair()?;
            drop(a);
            tunns.push(b);
        } else {
            let (secret, _) = crate::crypto::keypair();
            let (_, public) = crate::crypto::keypair();
            tunns.push(Tunn::new(secret, public, None, None, 1, None));
        }
    }
    let after = rss_kib(std::process::id())?;
    drop(tunns);
    Ok((after.saturating_sub(before)) as f64 * 1024.0 / n as f64)
}

/// The receiver index of a WireGuard response (type 2), cookie reply (3) or data (4).
fn receiver_index(datagram: &[u8]) -> Option<u32> {
    let at = match *datagram.first()? {
        2 => 8,
        3 | 4 => 4,
        _ => return None,
    };
    let bytes = datagram.get(at..at + 4)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// What one datagram from the responder did to the flood's initiators.
#[derive(Debug)]
enum Taken<'o> {
    /// A handshake response authenticated: the session is up; `reply` (the confirming
    /// keepalive) goes back.
    Established { peer: usize, reply: &'o [u8] },
    /// Something else to send back.
    Reply(&'o [u8]),
    /// A cookie reply taken (the responder is under load; the next initiation carries it).
    Cookie,
    /// The initiator it names refused it (bad MAC, wrong key, replay, …).
    Rejected { peer: usize, reason: String },
    /// Not for any initiator (junk, unknown index, an initiation).
    Ignored,
}

/// Hands `datagram` (from `from`) to the initiator its receiver index names. Only a
/// response that initiator's `Tunn` authenticates counts as a session: a forged or
/// misdirected one is refused by boringtun and counted as nothing.
fn take<'o>(tunns: &mut [Tunn], datagram: &[u8], from: IpAddr, out: &'o mut [u8]) -> Taken<'o> {
    let Some(peer) = receiver_index(datagram).map(|r| (r >> 8) as usize) else {
        return Taken::Ignored;
    };
    let Some(tunn) = tunns.get_mut(peer) else {
        return Taken::Ignored;
    };
    let kind = datagram[0];
    match tunn.decapsulate(Some(from), datagram, out) {
        TunnResult::WriteToNetwork(reply) if kind == 2 => Taken::Established { peer, reply },
        TunnResult::WriteToNetwork(reply) => Taken::Reply(reply),
        TunnResult::Err(error) => Taken::Rejected {
            peer,
            reason: format!("{error:?}"),
        },
        _ if kind == 3 => Taken::Cookie,
        _ => Taken::Ignored,
    }
}

/// The flood socket's receive buffer.
const FLOOD_RCVBUF: libc::c_int = 32 << 20;

/// `SO_RCVBUFFORCE` (root may exceed `net.core.rmem_max`, which is per namespace).
fn force_receive_buffer(socket: &UdpSocket, bytes: libc::c_int) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is a live UDP socket owned by `socket` for the whole call, and the
    // option value points at a c_int whose size is passed alongside it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "SO_RCVBUFFORCE {bytes}: {} (run as root)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The initiators of `peers` (run inside the left namespace): see the module docs.
pub fn flood(args: &FloodArgs) -> Result<()> {
    let keys = std::fs::read_to_string(&args.keys)
        .with_context(|| format!("reading {}", args.keys.display()))?;
    let server: [u8; 32] = STANDARD
        .decode(args.server_public.trim())
        .ok()
        .and_then(|k| k.try_into().ok())
        .context("--server-public is not a base64 32-byte key")?;
    let server = PublicKey::from(server);
    let mut tunns = Vec::new();
    for (i, line) in keys.lines().enumerate() {
        let secret: [u8; 32] = STANDARD
            .decode(line.trim())
            .ok()
            .and_then(|k| k.try_into().ok())
            .with_context(|| format!("key line {} is not a base64 32-byte key", i + 1))?;
        // The index is the Tunn's 24-bit local index: responses name it (index << 8).
        tunns.push(Tunn::new(
            StaticSecret::from(secret),
            server,
            None,
            None,
            i as u32,
            None,
        ));
    }
    ensure!(!tunns.is_empty(), "no keys in {}", args.keys.display());
    let bind = if args.endpoint.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).context("binding the flood's socket")?;
    // Every response of the burst must find room: with the default receive buffer (about
    // 200 datagrams' worth) the kernel drops the rest and their peers wait for boringtun's
    // 5 s retransmit, which would measure this harness instead of the responder.
    force_receive_buffer(&socket, FLOOD_RCVBUF)?;
    socket.set_read_timeout(Some(Duration::from_millis(10)))?;
    let mut result = FloodResult {
        peers: tunns.len(),
        ..FloodResult::default()
    };
    let mut done_at: HashMap<usize, Duration> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let start = Instant::now();
    for tunn in &mut tunns {
        if let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, false)
        {
            socket.send_to(init, args.endpoint)?;
        }
    }
    let mut last_timers = Instant::now();
    while done_at.len() < tunns.len() && start.elapsed() < FLOOD_TIMEOUT {
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => match take(&mut tunns, &buf[..len], from.ip(), &mut out) {
                Taken::Established { peer, reply } => {
                    socket.send_to(reply, args.endpoint)?;
                    done_at.entry(peer).or_insert_with(|| start.elapsed());
                }
                Taken::Reply(reply) => {
                    socket.send_to(reply, args.endpoint)?;
                }
                Taken::Cookie => result.cookie_replies += 1,
                Taken::Rejected { peer, reason } => eprintln!("flood: peer {peer}: {reason}"),
                Taken::Ignored => {}
            },
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => bail!("receiving: {error}"),
        }
        if last_timers.elapsed() >= Duration::from_millis(50) {
            last_timers = Instant::now();
            for (i, tunn) in tunns.iter_mut().enumerate() {
                if done_at.contains_key(&i) {
                    continue;
                }
                if let TunnResult::WriteToNetwork(packet) = tunn.update_timers(&mut out) {
                    if packet.first() == Some(&1) {
                        result.retransmits += 1;
                    }
                    socket.send_to(packet, args.endpoint)?;
                }
            }
        }
    }
    result.completed = done_at.len();
    let mut times: Vec<Duration> = done_at.values().copied().collect();
    times.sort();
    result.all_done_s = if result.completed == result.peers {
        times.last().map_or(0.0, Duration::as_secs_f64)
    } else {
        start.elapsed().as_secs_f64()
    };
    result.half_done_s = times
        .get(result.peers.div_ceil(2).saturating_sub(1))
        .map(Duration::as_secs_f64);
    println!("{FLOOD_TAG}{}", serde_json::to_string(&result)?);
    Ok(())
}

fn markdown(report: &Report) -> String {
    let f2 = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
    let kib = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{:.1}", v / 1024.0));
    let beyond = |ours: Option<f64>, tunn: Option<f64>| match (ours, tunn) {
        (Some(o), Some(t)) => format!("{:.1}", (o - t) / 1024.0),
        _ => "n/a".to_owned(),
    };
    let mut out = format!(
        "peers: {} configured on the busy side, {} round(s) × {} s, load average {} → {}\n\n\
         | figure | value |\n|---|---|\n\
         | TCP 1 stream, one peer configured (Gbit/s) | {} |\n\
         | TCP 1 stream to one busy peer among {} (Gbit/s) | {} ({}% of one peer) |\n\
         | {} handshakes at once: all done (s) | {} |\n\
         | memory per peer, configured (KiB; boringtun Tunn {} of it; beyond the Tunn {}) | {} |\n\
         | memory per peer, session up (KiB; boringtun Tunn {} of it; beyond the Tunn {}) | {} |\n",
        report.peers,
        report.rounds.len(),
        report.duration_s,
        crate::fmt_load(report.load_average[0]),
        crate::fmt_load(report.load_average[1]),
        f2(report.median_one_peer_tcp1_gbps),
        report.peers,
        f2(report.median_many_peers_tcp1_gbps),
        report
            .many_over_one
            .map_or_else(|| "n/a".to_owned(), |r| format!("{:.0}", r * 100.0)),
        report.peers - 1,
        f2(report.median_handshakes_all_done_s),
        kib(report.tunn_bytes_configured),
        beyond(
            report.median_bytes_per_peer_idle,
            report.tunn_bytes_configured
        ),
        kib(report.median_bytes_per_peer_idle),
        kib(report.tunn_bytes_established),
        beyond(
            report.median_bytes_per_peer_established,
            report.tunn_bytes_established
        ),
        kib(report.median_bytes_per_peer_established),
    );
    for (i, round) in report.rounds.iter().enumerate() {
        if let Some(flood) = &round.flood {
            out.push_str(&format!(
                "\nround {}: {}/{} handshakes in {:.2} s (half by {}), {} cookie replies, {} \
                 retransmitted initiations",
                i + 1,
                flood.completed,
                flood.peers,
                flood.all_done_s,
                f2(flood.half_done_s),
                flood.cookie_replies,
                flood.retransmits
            ));
        }
        for error in &round.errors {
            out.push_str(&format!("\nround {} error: {error}", i + 1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_index_reads_each_message_type_and_rejects_junk() {
        let mut response = vec![2u8; 92];
        response[8..12].copy_from_slice(&0x0000_0701u32.to_le_bytes());
        assert_eq!(receiver_index(&response), Some(0x701));
        let mut cookie = vec![3u8; 64];
        cookie[4..8].copy_from_slice(&0x0000_0900u32.to_le_bytes());
        assert_eq!(receiver_index(&cookie), Some(0x900));
        // An initiation names no receiver; truncated or empty input is no index, not a panic.
        assert_eq!(receiver_index(&[1u8; 148]), None);
        assert_eq!(receiver_index(&[2u8, 0, 0]), None);
        assert_eq!(receiver_index(&[]), None);
    }

    /// Initiators `0..n` (flood indexes) towards `responder`, and their public keys.
    fn initiators(n: usize, responder: &PublicKey) -> (Vec<Tunn>, Vec<StaticSecret>) {
        let mut tunns = Vec::new();
        let mut secrets = Vec::new();
        for i in 0..n {
            let (secret, _) = crate::crypto::keypair();
            secrets.push(secret.clone());
            tunns.push(Tunn::new(secret, *responder, None, None, i as u32, None));
        }
        (tunns, secrets)
    }

    #[test]
    fn only_an_authenticated_response_counts_as_a_session() {
        let (server_secret, server_public) = crate::crypto::keypair();
        let (mut tunns, secrets) = initiators(2, &server_public);
        let from: IpAddr = Ipv4Addr::new(10, 77, 0, 2).into();
        let mut buf = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let init = match tunns[1].format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        let mut server = Tunn::new(
            server_secret,
            PublicKey::from(&secrets[1]),
            None,
            None,
            77,
            None,
        );
        let response = match server.decapsulate(Some(from), &init, &mut out) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };

        // An attacker re-addresses the genuine response to initiator 0 (who never sent
        // an initiation with that index): refused, not a session.
        let mut misdirected = response.clone();
        misdirected[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            take(&mut tunns, &misdirected, from, &mut out),
            Taken::Rejected { peer: 0, .. }
        ));
        // A flipped bit in the genuine response: refused (MAC).
        let mut forged = response.clone();
        forged[40] ^= 1;
        assert!(matches!(
            take(&mut tunns, &forged, from, &mut out),
            Taken::Rejected { peer: 1, .. }
        ));
        // Junk and truncated datagrams are nobody's.
        assert!(matches!(
            take(&mut tunns, &[2, 0], from, &mut out),
            Taken::Ignored
        ));
        assert!(matches!(
            take(&mut tunns, &init, from, &mut out),
            Taken::Ignored
        ));
        // The genuine response establishes initiator 1 and yields its keepalive.
        match take(&mut tunns, &response, from, &mut out) {
            Taken::Established { peer: 1, reply } => assert_eq!(reply[0], 4),
            other => panic!("{other:?}"),
        }
        // Replayed: refused, so a session is never counted twice.
        assert!(matches!(
            take(&mut tunns, &response, from, &mut out),
            Taken::Rejected { peer: 1, .. }
        ));
    }

    #[test]
    fn synthetic_addresses_are_distinct_and_outside_the_rig() {
        let ips: std::collections::HashSet<_> = (0..60_000).map(synthetic_ip).collect();
        assert_eq!(ips.len(), 60_000);
        assert!(ips.iter().all(|ip| ip.octets()[0..2] == [10, 100]));
    }
}
