//! Two real engines (TUN devices, io_uring and epoll workers, real UDP) talking through the
//! real relay (`Relay::start`, TLS sessions, BIND from the engines' WireGuard sockets):
//! traffic passes over the relay with both peers on `PathKind::Relay`; direct probes
//! (`Handshaker::probe_direct`), each answered straight back, then upgrade each prober to
//! `Direct` and the relay sees no more frames; a peer pinned to the relay (`relay_only`)
//! stays relayed. The attacker's view: a member with a valid certificate sends forged frames through the relay, and a
//! host that is not the relay sends forged frames straight to the engine; neither changes
//! the peer's endpoint, path or relay route, and every one is counted.
//!
//! Layout: two network namespaces made for the test (`tbre-<pid>-a`, `tbre-<pid>-b`, removed
//! on drop, also when the test fails) joined by a veth pair 192.168.77.1 <-> .2. Engine A
//! (tunnel 10.77.0.1) and the relay run in A's namespace, engine B (10.77.0.2) in B's. The
//! direct path between the engines exists all along: only the path decides where frames go.
//! Needs root (namespaces, TUN) and iproute2.

#![allow(clippy::unwrap_used)]
#![allow(unsafe_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::OsRng;
use tabbify_control::ca::{Ca, Validity};
use tabbify_engine::core::counters::DropReason;
use tabbify_engine::core::demux::Kind;
use tabbify_engine::core::local::LocalNets;
use tabbify_engine::core::net::IpNet;
use tabbify_engine::core::path::{self, PathKind, RelayRoute};
use tabbify_engine::core::peer::{Peer, PeerConfig};
use tabbify_engine::core::table::Table;
use tabbify_engine::driver::{DriverKind, Engine, EngineOptions};
use tabbify_relay::client::{self, RelayClient};
use tabbify_relay::server::core::Limits;
use tabbify_relay::server::{self, Relay};

const WAIT: Duration = Duration::from_secs(15);
const RELAY_IP: &str = "192.168.77.1";
const B_IP: &str = "192.168.77.2";

/// The test's namespaces; deleted on drop (also while unwinding).
struct Namespaces {
    a: String,
    b: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` failed: install iproute2");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn namespaces(tag: &str) -> Namespaces {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "this test needs root (network namespaces and TUN devices): run it as root"
    );
    let pid = std::process::id();
    let ns = Namespaces {
        a: format!("tbre-{pid}-{tag}-a"),
        b: format!("tbre-{pid}-{tag}-b"),
    };
    for n in [&ns.a, &ns.b] {
        ip(&["netns", "add", n]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
    }
    ip(&[
        "-n", &ns.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &ns.b,
    ]);
    ip(&["-n", &ns.a, "addr", "add", "192.168.77.1/24", "dev", "va"]);
    ip(&["-n", &ns.b, "addr", "add", "192.168.77.2/24", "dev", "vb"]);
    ip(&["-n", &ns.a, "link", "set", "va", "up"]);
    ip(&["-n", &ns.b, "link", "set", "vb", "up"]);
    ns
}

/// Moves the calling thread (only it) into namespace `ns`: sockets and TUN devices it
/// opens from now on live there.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // SAFETY: setns with a valid namespace fd changes only this thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

struct Node {
    engine: Engine,
    table: Arc<Table>,
    public: [u8; 32],
    secret: [u8; 32],
    port: u16,
}

/// Starts an engine in the calling thread's namespace on TUN `ifname` with tunnel address
/// `own`, routing `peer_ip` to the peer `peer_pub` (direct endpoint `peer_ep`, if known).
fn engine(
    ns: &str,
    ifname: &str,
    driver: DriverKind,
    secret: StaticSecret,
    own: &str,
    peer_pub: [u8; 32],
    peer_ip: &str,
) -> Node {
    let public = PublicKey::from(&secret).to_bytes();
    let table = Arc::new(Table::new(secret.clone(), 0));
    table.set_local(LocalNets::new([own.parse::<IpAddr>().unwrap()], []));
    table
        .upsert_peer(PeerConfig {
            public_key: peer_pub,
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec![format!("{peer_ip}/32").parse::<IpNet>().unwrap()],
            persistent_keepalive: None,
        })
        .unwrap();
    let engine = Engine::start(
        &EngineOptions {
            interface: ifname.into(),
            threads: 1,
            driver: Some(driver),
            offloads: true,
            listen_port: 0,
            pin: false,
            fwmark: None,
        },
        table.clone(),
    )
    .unwrap();
    ip(&["-n", ns, "link", "set", ifname, "mtu", "1420", "up"]);
    ip(&["-n", ns, "addr", "add", &format!("{own}/32"), "dev", ifname]);
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &format!("{peer_ip}/32"),
        "dev",
        ifname,
    ]);
    let port = engine.info.listen_port;
    Node {
        engine,
        table,
        public,
        secret: secret.to_bytes(),
        port,
    }
}

fn peer(node: &Node, key: &[u8; 32]) -> Arc<Peer> {
    node.table.load_full().by_key(key).unwrap().clone()
}

fn state(p: &Peer) -> (Option<SocketAddr>, PathKind, Option<RelayRoute>) {
    let st = p.lock();
    (st.endpoint, st.path, st.relay)
}

/// Sends numbered datagrams from `from` to `to` through the tunnel until one arrives.
fn ping(from: &UdpSocket, to: &UdpSocket, what: &str) {
    let dst = to.local_addr().unwrap();
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 2048];
    to.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut i = 0u32;
    loop {
        assert!(
            Instant::now() < deadline,
            "no traffic through the tunnel: {what}"
        );
        i += 1;
        from.send_to(format!("{what} {i}").as_bytes(), dst).unwrap();
        if let Ok((n, _)) = to.recv_from(&mut buf) {
            assert!(buf[..n].starts_with(what.as_bytes()));
            return;
        }
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// BINDs `client`'s session from `node`'s WireGuard socket until the BIND_ACK arrives on
/// the engine's control queue.
fn bind(node: &Node, client: &RelayClient, relay: SocketAddr) {
    let bind = client.bind_datagram();
    let q = node.engine.control_queue();
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no BIND_ACK through the engine");
        node.engine.handshaker().send_raw(relay, &bind).unwrap();
        if let Some(d) = q.pop_wait(Duration::from_millis(300)) {
            if d.kind == Kind::RelayControl && d.src == relay {
                return;
            }
        }
    }
}

struct Setup {
    a: Node,
    b: Node,
    relay: Relay,
    rt: tokio::runtime::Runtime,
    ca: Ca,
    _clients: Vec<RelayClient>,
    /// A's peer B and B's peer A.
    ab: Arc<Peer>,
    ba: Arc<Peer>,
    /// UDP sockets on the tunnel addresses (A's in A's namespace, B's in B's).
    sa: UdpSocket,
    sb: UdpSocket,
    b_direct: SocketAddr,
    a_direct: SocketAddr,
    route_to_a: RelayRoute,
    route_to_b: RelayRoute,
}

impl Setup {
    fn client_cfg(&self, name: &str) -> client::Config {
        let cert = self
            .ca
            .issue_peer(name, Validity::days_from_now(1))
            .unwrap();
        client::Config {
            server: self.relay.addr.to_string(),
            server_name: RELAY_IP.into(),
            tls: tabbify_api::tls::client_config(
                self.ca.cert_pem(),
                Some((cert.cert_pem.as_str(), cert.key_pem.as_str())),
            )
            .unwrap(),
            proxy: None,
            stream_only: false,
            fwmark: None,
        }
    }

    fn relayed_frames(&self) -> u64 {
        self.relay.shared.metrics.forwarded_frames().0
    }
}

/// The namespaces, the relay and both engines, each engine with a relay session bound from
/// its WireGuard socket and its peer on the relayed path (direct endpoints known too).
fn setup(ns: &Namespaces, tag: &str) -> Setup {
    let (na, nb) = (ns.a.clone(), ns.b.clone());
    let (ka, kb) = (
        StaticSecret::random_from_rng(OsRng),
        StaticSecret::random_from_rng(OsRng),
    );
    let (pa, pb) = (
        PublicKey::from(&ka).to_bytes(),
        PublicKey::from(&kb).to_bytes(),
    );
    // B in its own namespace, from a thread that enters it.
    let tun_b = format!("tbre{tag}b");
    let (b, sb) = std::thread::spawn(move || {
        enter(&nb);
        let b = engine(
            &nb,
            &tun_b,
            DriverKind::Epoll,
            kb,
            "10.77.0.2",
            pa,
            "10.77.0.1",
        );
        let sb = UdpSocket::bind("10.77.0.2:7000").unwrap();
        (b, sb)
    })
    .join()
    .unwrap();
    // A, the relay and the sessions in A's namespace (this thread from now on).
    enter(&na);
    let driver = if tabbify_engine::driver::uring::available() {
        DriverKind::Uring
    } else {
        DriverKind::Epoll
    };
    let a = engine(
        &na,
        &format!("tbre{tag}a"),
        driver,
        ka,
        "10.77.0.1",
        pb,
        "10.77.0.2",
    );
    let sa = UdpSocket::bind("10.77.0.1:0").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = Ca::generate("relay-engine-test-ca", Validity::days_from_now(1)).unwrap();
    let cert = ca
        .issue_coordinator(
            "relay.mesh.test",
            &[RELAY_IP.to_owned()],
            Validity::days_from_now(1),
        )
        .unwrap();
    let relay = rt.block_on(async {
        Relay::start(server::Config {
            listen: format!("{RELAY_IP}:0").parse().unwrap(),
            metrics: None,
            tls: server::server_config(&cert.cert_pem, &cert.key_pem, ca.cert_pem()).unwrap(),
            limits: Limits::default(),
        })
        .await
        .unwrap()
    });
    let mut s = Setup {
        ab: peer(&a, &pb),
        ba: peer(&b, &pa),
        a_direct: format!("{RELAY_IP}:{}", a.port).parse().unwrap(),
        b_direct: format!("{B_IP}:{}", b.port).parse().unwrap(),
        a,
        b,
        relay,
        rt,
        ca,
        _clients: Vec::new(),
        sa,
        sb,
        route_to_a: RelayRoute {
            addr: "0.0.0.0:0".parse().unwrap(),
            handle: 0,
        },
        route_to_b: RelayRoute {
            addr: "0.0.0.0:0".parse().unwrap(),
            handle: 0,
        },
    };
    let (ca_cfg, cb_cfg) = (s.client_cfg("member-a"), s.client_cfg("member-b"));
    let (sa_secret, sb_secret) = (s.a.secret, s.b.secret);
    let (ca_client, cb_client) = s.rt.block_on(async {
        (
            RelayClient::connect(&ca_cfg, &sa_secret).await.unwrap(),
            RelayClient::connect(&cb_cfg, &sb_secret).await.unwrap(),
        )
    });
    bind(&s.a, &ca_client, s.relay.addr);
    bind(&s.b, &cb_client, s.relay.addr);
    let (hb, ha) = s.rt.block_on(async {
        (
            ca_client.lookup(&s.b.public).await.unwrap().unwrap(),
            cb_client.lookup(&s.a.public).await.unwrap().unwrap(),
        )
    });
    assert_eq!((ha, hb), (ca_client.handle, cb_client.handle));
    s.route_to_b = RelayRoute {
        addr: s.relay.addr,
        handle: hb,
    };
    s.route_to_a = RelayRoute {
        addr: s.relay.addr,
        handle: ha,
    };
    s._clients = vec![ca_client, cb_client];
    s.ab.lock().endpoint = Some(s.b_direct);
    s.ba.lock().endpoint = Some(s.a_direct);
    path::set_path(&s.ab, PathKind::Relay, Some(s.route_to_b));
    path::set_path(&s.ba, PathKind::Relay, Some(s.route_to_a));
    s
}

/// Relayed traffic both ways (the handshake too: initiated by the engine), then each
/// side's direct probe, answered straight back, upgrades that side within one round trip
/// and the relay forwards nothing more;
/// then a pinned peer stays on the relay although direct datagrams arrive.
#[test]
fn traffic_over_the_relay_then_a_direct_probe_upgrades_both_sides() {
    let ns = namespaces("up");
    let s = setup(&ns, "up");
    // The control side's handshake (`initiate`) follows the path: through the relay, and
    // the answer comes back through it.
    let r0 = s.relayed_frames();
    assert!(s.a.engine.handshaker().initiate(&s.ab).unwrap());
    wait_for("initiation and response through the relay", || {
        s.relayed_frames() >= r0 + 2
    });
    wait_for("B's relay receipt", || {
        s.ba.stats.last_relay_rx_ns.load(Ordering::Relaxed) > 0
    });
    ping(&s.sa, &s.sb, "a to b over the relay");
    ping(&s.sb, &s.sa, "b to a over the relay");
    assert!(
        s.relayed_frames() >= r0 + 4,
        "handshake and data went through the relay"
    );
    for (p, route, direct) in [
        (&s.ab, s.route_to_b, s.b_direct),
        (&s.ba, s.route_to_a, s.a_direct),
    ] {
        assert_eq!(state(p), (Some(direct), PathKind::Relay, Some(route)));
        assert!(p.stats.last_relay_rx_ns.load(Ordering::Relaxed) > 0);
        assert_eq!(p.stats.last_direct_rx_ns.load(Ordering::Relaxed), 0);
    }

    // One probe from A, answered straight back by B: A upgrades. B stays relayed (A's
    // probe says nothing about B's direct sends) until its own probe is answered.
    assert!(s
        .a
        .engine
        .handshaker()
        .probe_direct(&s.ab, s.b_direct)
        .unwrap());
    wait_for("A direct", || state(&s.ab).1 == PathKind::Direct);
    assert_eq!(
        state(&s.ba).1,
        PathKind::Relay,
        "B's probes are not answered yet"
    );
    assert!(s
        .b
        .engine
        .handshaker()
        .probe_direct(&s.ba, s.a_direct)
        .unwrap());
    wait_for("both sides direct", || {
        state(&s.ab).1 == PathKind::Direct && state(&s.ba).1 == PathKind::Direct
    });
    assert_eq!(
        state(&s.ab).2,
        Some(s.route_to_b),
        "the relay route stays known"
    );
    assert!(s.ba.stats.last_direct_rx_ns.load(Ordering::Relaxed) > 0);
    assert!(s.ab.stats.last_direct_rx_ns.load(Ordering::Relaxed) > 0);
    let relayed = s.relayed_frames();
    ping(&s.sa, &s.sb, "a to b direct");
    ping(&s.sb, &s.sa, "b to a direct");
    assert_eq!(
        s.relayed_frames(),
        relayed,
        "nothing more went through the relay"
    );

    // Pinned (--force-relay): probes arrive directly (counted as received), a pinned peer
    // answers none, and the path stays relayed.
    for (p, route) in [(&s.ab, s.route_to_b), (&s.ba, s.route_to_a)] {
        path::set_path(p, PathKind::Relay, Some(route));
        path::set_relay_only(p, true);
    }
    let before = s.ba.stats.rx_bytes.load(Ordering::Relaxed);
    assert!(s
        .a
        .engine
        .handshaker()
        .probe_direct(&s.ab, s.b_direct)
        .unwrap());
    assert!(s
        .b
        .engine
        .handshaker()
        .probe_direct(&s.ba, s.a_direct)
        .unwrap());
    wait_for("the probe's receipt", || {
        s.ba.stats.rx_bytes.load(Ordering::Relaxed) > before
    });
    ping(&s.sa, &s.sb, "a to b pinned");
    ping(&s.sb, &s.sa, "b to a pinned");
    assert_eq!(state(&s.ab).1, PathKind::Relay);
    assert_eq!(state(&s.ba).1, PathKind::Relay);
    wait_for("pinned traffic counted at the relay", || {
        s.relayed_frames() >= relayed + 2
    });
    for n in [&s.a, &s.b] {
        let c = &n.engine.shared.counters;
        for r in [
            DropReason::Auth,
            DropReason::Replay,
            DropReason::RelayMalformed,
            DropReason::Junk,
            DropReason::UnknownIndex,
            DropReason::MalformedOuter,
        ] {
            assert_eq!(c.get(r), 0, "{r:?}: {:?}", c.nonzero());
        }
    }
    let mut s = s;
    s._clients.clear();
    s.a.engine.stop();
    s.b.engine.stop();
}

/// The attacker: a member with a valid certificate and its own relay session sends
/// forged frames through the real relay to A (a data message with A's receiver index and a
/// garbage tag, a garbage initiation); a host that is not the relay sends forged frames with a wrong handle
/// straight to A's engine. A's peer keeps its endpoint, path and relay route; every frame
/// is counted; the relayed tunnel keeps working.
#[test]
fn forged_frames_through_the_relay_or_from_elsewhere_change_nothing() {
    let ns = namespaces("atk");
    let s = setup(&ns, "atk");
    ping(&s.sb, &s.sa, "b to a over the relay");
    let before = state(&s.ab);
    let a_ctr = &s.a.engine.shared.counters;
    let dropped = a_ctr.total();

    // A data message for A's session with B (A's receiver index, a fresh counter) whose
    // ciphertext and tag are garbage, and a garbage handshake initiation. (Replays of
    // captured messages through a relay: `engine_memory`'s forged-frame test.)
    let ridx = s.ab.index << 8;
    let mut data = vec![0u8; 32 + 64];
    data[0] = 4;
    data[4..8].copy_from_slice(&ridx.to_le_bytes());
    data[8] = 200;
    data[16..].fill(0x5A);
    let mut init = vec![0x5Au8; 148];
    init[..4].copy_from_slice(&[1, 0, 0, 0]);

    // Through the relay, from an attacker's own session (valid certificate).
    let cfg = s.client_cfg("member-mallory");
    let mallory_secret = StaticSecret::random_from_rng(OsRng).to_bytes();
    let route_to_a = s.route_to_a;
    let sent = s.rt.block_on(async {
        let m = RelayClient::connect(&cfg, &mallory_secret).await.unwrap();
        let mut n = 0;
        for msg in [&data, &init] {
            let mut f = msg.clone();
            path::rewrite(&mut f, route_to_a.handle);
            m.send_frame(&f).await.unwrap();
            n += 1;
        }
        // Let the relay forward them before the session ends.
        tokio::time::sleep(Duration::from_millis(300)).await;
        n
    });
    // Straight to A, from B's namespace address but not from the relay, wrong handle.
    let sock = UdpSocket::bind(format!("{RELAY_IP}:0")).unwrap();
    let a_wg: SocketAddr = format!("{RELAY_IP}:{}", s.a.port).parse().unwrap();
    for msg in [&data, &init] {
        let mut f = msg.clone();
        path::rewrite(&mut f, 0xBAD);
        sock.send_to(&f, a_wg).unwrap();
    }
    // And a truncated frame.
    sock.send_to(&[0xE4, 0, 0, 1, 0], a_wg).unwrap();
    let expect = dropped + sent + 3;
    wait_for("every forged frame counted", || a_ctr.total() >= expect);
    assert_eq!(state(&s.ab), before, "no endpoint, path or relay change");
    assert!(a_ctr.get(DropReason::RelayMalformed) >= 1);
    assert!(a_ctr.get(DropReason::Auth) + a_ctr.get(DropReason::Replay) >= 2);
    // The tunnel still works through the relay.
    ping(&s.sa, &s.sb, "a to b after the forgeries");
    ping(&s.sb, &s.sa, "b to a after the forgeries");
    assert_eq!(state(&s.ab), before);
    let mut s = s;
    s._clients.clear();
    s.a.engine.stop();
    s.b.engine.stop();
}
