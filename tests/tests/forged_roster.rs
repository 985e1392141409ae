//! A malicious coordinator against a real `tabbify-mesh join` (issue 11, Deliver 3): a fake
//! coordinator (an in-process TLS server with a certificate from our CA helper, on loopback
//! inside the joiner's namespace) registers the joiner honestly but serves a forged roster,
//! in the registration answer and again as the stream's snapshot:
//!
//! | entry | forgery | expected |
//! |---|---|---|
//! | `good` | none; hosts `fd5a:1f02::1` | a peer; its ULA and app routed |
//! | `forged` | ULA `fd5a:1f00::dead`, not derived from its identity | refused, not routed |
//! | `docapp` | app ULA `2001:db8::1` | refused, not routed |
//! | `v4app` | app `::ffff:192.0.2.1` (an IPv4 app) | refused, not routed |
//! | `dupapp` | claims `good`'s app `fd5a:1f02::1` | a peer without that app |
//! | `thief` | `good`'s public key | refused |
//!
//! Checked: `ip -6 route` / `ip -4 route` in the joiner's namespace and `status --json`
//! (peers, their apps, `roster_refused`).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tabbify_api::{
    ula, HeartbeatResponse, PortRange, PortRules, RegisterResponse, RosterEntry, RosterSnapshot,
    SseEvent, PATH_HEARTBEAT, PATH_PEERS_STREAM, PATH_REGISTER,
};
use tabbify_tests::pki::Pki;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{JoinSpec, Joiner, Netns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GOOD_APP: &str = "fd5a:1f02::1";

fn addr(s: &str) -> Ipv6Addr {
    s.parse().expect("a literal IPv6 address")
}

fn key(n: u8) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

fn entry(identity: &str, n: u8) -> RosterEntry {
    let ep: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 52000 + u16::from(n));
    RosterEntry {
        peer_id: ula::identity_peer_id(identity),
        identity: identity.into(),
        ula: ula::identity_ula(identity),
        display_name: identity.into(),
        tags: vec!["node".into()],
        public_key: key(n),
        endpoints: vec![ep],
        reflexive_endpoint: ep,
        mapped_endpoints: vec![],
        nat: Default::default(),
        home_relay: None,
        hosted_app_ulas: vec![],
        ports: PortRules {
            outbound: vec![PortRange::ALL],
            inbound: vec![PortRange::ALL],
            ..Default::default()
        },
        stale: false,
        ipv4: None,
        routes: vec![],
        exit_node: false,
        may_use: vec![],
        route_ports: vec![],
        may_use_ports: vec![],
        via: None,
        client: false,
        client_ports: vec![],
    }
}

fn forged_roster() -> Vec<RosterEntry> {
    let mut good = entry("good", 1);
    good.hosted_app_ulas = vec![addr(GOOD_APP)];
    let mut forged = entry("forged", 2);
    forged.ula = addr("fd5a:1f00::dead");
    let mut docapp = entry("docapp", 3);
    docapp.hosted_app_ulas = vec![addr("2001:db8::1")];
    let mut v4app = entry("v4app", 4);
    v4app.hosted_app_ulas = vec![addr("::ffff:192.0.2.1")];
    let mut dupapp = entry("dupapp", 5);
    dupapp.hosted_app_ulas = vec![addr(GOOD_APP)];
    let mut thief = entry("thief", 6);
    thief.public_key = key(1);
    vec![good, forged, docapp, v4app, dupapp, thief]
}

/// The fake coordinator: answers register and heartbeat honestly for `identity` and serves
/// the forged roster; the stream stays open (keepalive comments) until the test ends.
async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    identity: String,
) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            let Ok(mut s) = acceptor.accept(tcp).await else {
                return;
            };
            let Ok((method, path, _body)) = read_request(&mut s).await else {
                return;
            };
            let json = |v: String| {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{v}",
                    v.len()
                )
            };
            let answer = match (method.as_str(), path.as_str()) {
                ("POST", PATH_REGISTER) => json(
                    serde_json::to_string(&RegisterResponse {
                        peer_id: ula::identity_peer_id(&identity),
                        ula: ula::identity_ula(&identity),
                        display_name: identity.clone(),
                        tags: vec!["node".into()],
                        may_host_apps: false,
                        reflexive_endpoint: peer,
                        heartbeat_interval_secs: 5,
                        roster: forged_roster(),
                        stun_servers: vec![],
                        relays: vec![],
                        dns_domain: "mesh".into(),
                        ipv4: None,
                        routes: vec![],
                    })
                    .expect("the answer serializes"),
                ),
                ("POST", PATH_HEARTBEAT) => json(
                    serde_json::to_string(&HeartbeatResponse {
                        heartbeat_interval_secs: 5,
                        reflexive_endpoint: peer,
                        stun_servers: vec![],
                        relays: vec![],
                    })
                    .expect("the answer serializes"),
                ),
                ("GET", PATH_PEERS_STREAM) => {
                    let snap = SseEvent::Snapshot(RosterSnapshot {
                        policy_revision: 1,
                        peers: forged_roster(),
                    });
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                    if s.write_all(head.as_bytes()).await.is_err()
                        || s.write_all(snap.to_frame(1).as_bytes()).await.is_err()
                    {
                        return;
                    }
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        if s.write_all(b": keepalive\n\n").await.is_err() {
                            return;
                        }
                    }
                }
                _ => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_owned(),
            };
            let _ = s.write_all(answer.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Reads one HTTP/1.1 request: method, path and body (by content-length).
async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        ensure!(buf.len() < 64 * 1024, "request head too long");
        let n = s.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = BufReader::new(head.as_bytes()).lines();
    let first = lines.next().context("no request line")??;
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut len = 0usize;
    for line in lines {
        let line = line?;
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse()?;
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((method, path, body))
}

/// The fake coordinator on its own thread inside the joiner's namespace; dropping it stops
/// the server and joins the thread, so the namespace handle it holds is released and the
/// namespace removed, even when the test fails.
struct FakeCoordinator {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeCoordinator {
    fn start(netns: &Netns, tls: Arc<rustls::ServerConfig>, identity: String) -> Result<Self> {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server_ns = netns.clone();
        let thread = std::thread::spawn(move || {
            let r = tabbify_tests::inside::block_on(&server_ns, || async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                port_tx.send(listener.local_addr()?.port())?;
                tokio::select! {
                    r = serve(listener, tls, identity) => r,
                    _ = stopped => Ok(()),
                }
            });
            if let Err(e) = r {
                eprintln!("fake coordinator: {e:#}");
            }
        });
        let mut fake = FakeCoordinator {
            port: 0,
            stop: Some(stop),
            thread: Some(thread),
        };
        fake.port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the fake coordinator did not start")?;
        Ok(fake)
    }
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn server_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>> {
    let c = pki.coordinator();
    let cert = std::fs::read_to_string(&c.cert)?;
    let key = std::fs::read_to_string(&c.key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(tabbify_api::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            tabbify_api::tls::certs(&cert, "coordinator certificate")?,
            tabbify_api::tls::key(&key)?,
        )?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[test]
fn a_forged_roster_is_refused_by_the_joiner_and_nothing_outside_the_mesh_is_routed() -> Result<()> {
    require(&[Tool::Iproute2])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    let pki = Pki::new(&[IpAddr::V4(Ipv4Addr::LOCALHOST)])?;
    let cert = pki.issue_peer("victim")?;
    let netns = Netns::new()?;
    let tls = server_config(&pki)?;

    let fake = FakeCoordinator::start(&netns, tls, cert.name.clone())?;
    let url = format!("https://127.0.0.1:{}", fake.port);
    let spec = JoinSpec::new("victim", &["node"], Some("token".into()));
    let mut joiner = Joiner::start(&netns, &url, &cert, spec)?;
    let status = joiner.wait_status("to refuse the forgeries", Duration::from_secs(20), |s| {
        s.roster_refused.total() >= 5
    })?;

    // status --json: only the honest entries, dupapp without the contested app.
    let mut names = status.peer_names();
    names.sort();
    ensure!(names == ["dupapp", "good"], "peers: {names:?}");
    let good = status.peer("good").context("good")?;
    ensure!(good.app_ulas == [GOOD_APP.parse::<Ipv6Addr>()?], "{good:?}");
    let dupapp = status.peer("dupapp").context("dupapp")?;
    ensure!(dupapp.app_ulas.is_empty(), "{dupapp:?}");
    let r = status.roster_refused;
    ensure!(
        (
            r.bad_ula,
            r.bad_app_ula,
            r.duplicate_app,
            r.duplicate_public_key
        ) == (1, 2, 1, 1),
        "{r:?}"
    );
    ensure!(status.ula == ula::identity_ula("victim"), "{}", status.ula);

    // The kernel routes in the joiner's namespace: the honest ULAs and the one app, nothing
    // forged, nothing outside the mesh prefixes on the tunnel.
    let v6 = netns.ip(&["-6", "route", "show", "dev", joiner.ifname()])?;
    let v4 = netns.ip(&["-4", "route", "show", "dev", joiner.ifname()])?;
    for want in [
        ula::identity_ula("good").to_string(),
        ula::identity_ula("dupapp").to_string(),
        GOOD_APP.to_owned(),
    ] {
        ensure!(v6.contains(&want), "{want} not routed:\n{v6}");
    }
    for forged in [
        "fd5a:1f00::dead",
        "2001:db8::1",
        "192.0.2.1",
        &ula::identity_ula("forged").to_string(),
        &ula::identity_ula("thief").to_string(),
    ] {
        ensure!(
            !v6.contains(forged) && !v4.contains(forged),
            "{forged} routed:\n{v6}\n{v4}"
        );
    }
    for line in v6.lines().chain(v4.lines()) {
        let dst = line.split_whitespace().next().unwrap_or("");
        let addr = dst.split('/').next().unwrap_or("");
        match addr.parse::<Ipv6Addr>() {
            Ok(a) if ula::is_peer_ula(&a) || ula::is_app_ula(&a) => {}
            // The kernel's own link-local and multicast routes on the interface.
            Ok(a) if a.segments()[0] & 0xffc0 == 0xfe80 || a.is_multicast() => {}
            _ if dst == "multicast" || dst.starts_with("ff00::") || dst.starts_with("fe80::") => {}
            _ => bail!("a route outside the mesh prefixes on the tunnel: {line}"),
        }
    }
    joiner.stop()?;
    drop(fake);
    Ok(())
}
