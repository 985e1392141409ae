//! Issue 15, item 3: a stock WireGuard client through a concentrator, end to end in
//! namespaces.
//!
//! `a_stock_wireguard_client_reaches_only_what_its_tags_allow_and_is_cut_on_revocation`:
//!
//! | step | what | checked |
//! |---|---|---|
//! | setup | a coordinator; `srv1` (tag `server`) serving TCP on its ULA `:8730` and `:8740`; `hid1` (tag `hidden`) serving `:8730`; `conc1` (`join --concentrator`); policy: `phone → server:8730` only | `conc1`'s `status --json` says it is a concentrator |
//! | mint | `POST /v1/clients` `{"name": "phone1", "tags": ["phone"]}` (the only concentrator is chosen) | 201 with a wg-quick file |
//! | client | a namespace running the Debian `wireguard-go`, configured from that file (parsed; `wg setconf` and `ip`, as `tabbify_tests::wg` does for stock implementations) | a handshake with `conc1`; `conc1` serves 1 client |
//! | allowed | the client connects to `srv1`'s `[ula]:8730` through `conc1` | the server's line arrives, and the server saw the client's own ULA (no masquerade) |
//! | refused port | the client connects to `srv1`'s `:8740` | no connection (dropped by the filter of the client's rules) |
//! | hidden member | the client connects to `hid1:8730` and pings it | nothing |
//! | revoke | `DELETE /v1/clients/{id}` | within 10 s the client no longer connects to `srv1:8730`; `conc1` serves 0 clients |
//!
//! The client talks to nothing but `conc1`; every other member reaches it through `conc1`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use tabbify_tests::inside::block_on;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::wg::{Implementation, InterfaceConfig, Keypair, WgPeer, WgPeerConfig};
use tabbify_tests::{JoinSpec, Netns, Testbed};

const SETTLE: Duration = Duration::from_secs(30);
const ALLOWED: u16 = 8730;
const NOT_ALLOWED: u16 = 8740;
/// How long a connection attempt that should fail is given.
const REFUSED_WAIT: Duration = Duration::from_secs(3);

/// The parts of a wg-quick file a stock client uses.
struct WgQuick {
    private_key: String,
    addresses: Vec<String>,
    peer_key: String,
    endpoint: SocketAddr,
    allowed_ips: Vec<String>,
    keepalive: Option<u16>,
}

/// Parses the minted file as wg-quick would (`Key = value` lines in `[Interface]` and
/// `[Peer]`, comments and unknown keys such as `DNS` skipped).
fn parse_wg_quick(text: &str) -> Result<WgQuick> {
    let (mut section, mut f) = (String::new(), std::collections::BTreeMap::new());
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("not a `Key = value` line: {line:?}"))?;
        f.insert(format!("{section}{}", k.trim()), v.trim().to_owned());
    }
    let get = |k: &str| {
        f.get(k)
            .cloned()
            .with_context(|| format!("{k} missing in the file:\n{text}"))
    };
    let list = |v: String| -> Vec<String> {
        v.split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    Ok(WgQuick {
        private_key: get("[Interface]PrivateKey")?,
        addresses: list(get("[Interface]Address")?),
        peer_key: get("[Peer]PublicKey")?,
        endpoint: get("[Peer]Endpoint")?
            .parse()
            .context("the file's Endpoint")?,
        allowed_ips: list(get("[Peer]AllowedIPs")?),
        keepalive: f
            .get("[Peer]PersistentKeepalive")
            .map(|v| v.parse())
            .transpose()?,
    })
}

/// Serves TCP on `[::]:port` for each port in `netns` until `stop`: each connection gets
/// one line naming the port and the peer address it came from.
fn serve(netns: &Netns, ports: &[u16], stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let (netns, ports) = (netns.clone(), ports.to_vec());
    std::thread::spawn(move || {
        let _ = block_on(&netns, || async move {
            use tokio::io::AsyncWriteExt;
            let mut listeners = Vec::new();
            for p in ports {
                listeners.push(
                    tokio::net::TcpListener::bind(SocketAddrV6::new(
                        Ipv6Addr::UNSPECIFIED,
                        p,
                        0,
                        0,
                    ))
                    .await?,
                );
            }
            for l in listeners {
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(Ok((mut s, from))) =
                            tokio::time::timeout(Duration::from_millis(200), l.accept()).await
                        {
                            let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
                            let _ = s
                                .write_all(format!("port {port} from {}\n", from.ip()).as_bytes())
                                .await;
                        }
                    }
                });
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            anyhow::Ok(())
        });
    })
}

/// The server's line for a connection from `netns` to `target`, `None` when no connection
/// is made within `wait`.
fn probe(netns: &Netns, target: SocketAddr, wait: Duration) -> Result<Option<String>> {
    block_on(netns, || async move {
        use tokio::io::AsyncReadExt;
        let mut s = match tokio::time::timeout(wait, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            _ => return Ok(None),
        };
        let mut line = String::new();
        match tokio::time::timeout(wait, s.read_to_string(&mut line)).await {
            Ok(Ok(_)) => Ok(Some(line.trim().to_owned())),
            _ => Ok(None),
        }
    })
}

fn serving(j: &tabbify_tests::joiner::Joiner) -> Result<Option<usize>> {
    Ok(j.status()?.concentrator.map(|c| c.serving.len()))
}

#[test]
fn a_stock_wireguard_client_reaches_only_what_its_tags_allow_and_is_cut_on_revocation() -> Result<()>
{
    require(&[Tool::Iproute2, Tool::Ping, Tool::Wg, Tool::WireguardGo])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let policy = json!({
        "tags": ["server", "concentrator", "phone", "hidden"],
        "allow": [
            {"src": ["tag:phone"], "dst": [format!("tag:server:{ALLOWED}")]},
            {"src": ["tag:hidden"], "dst": ["tag:server"]},
        ],
    });
    let bed = Testbed::start(policy, 1)?;
    let (srv_ns, _) = bed.host()?;
    let (hid_ns, _) = bed.host()?;
    let (conc_ns, _) = bed.host()?;
    let (client_ns, _) = bed.host()?;
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        serve(&srv_ns, &[ALLOWED, NOT_ALLOWED], stop.clone()),
        serve(&hid_ns, &[ALLOWED], stop.clone()),
    ];
    let result = (|| -> Result<()> {
        let srv = bed.join(&srv_ns, JoinSpec::new("srv1", &["server"], None))?;
        let hid = bed.join(&hid_ns, JoinSpec::new("hid1", &["hidden"], None))?;
        let mut conc_spec = JoinSpec::new("conc1", &["concentrator"], None);
        conc_spec.extra_args = vec!["--concentrator".into()];
        let mut conc = bed.join(&conc_ns, conc_spec)?;
        ensure!(
            serving(&conc)? == Some(0),
            "conc1 says it is a concentrator serving nobody: {:?}",
            conc.status()?.concentrator
        );
        let (srv_ula, hid_ula) = (srv.status()?.ula, hid.status()?.ula);

        // Mint the client (the only concentrator is chosen).
        let minted = bed.admin.request(
            "POST",
            "/v1/clients",
            Some(&json!({"name": "phone1", "tags": ["phone"]})),
        )?;
        ensure!(minted.status == 201, "minting: {minted:?}");
        let id = minted.body["client"]["id"]
            .as_str()
            .context("client.id")?
            .to_owned();
        let public = minted.body["client"]["public_key"]
            .as_str()
            .context("client.public_key")?
            .to_owned();
        let file = minted.body["config"].as_str().context("config")?;
        let q = parse_wg_quick(file)?;
        let client_ula: Ipv6Addr = q
            .addresses
            .iter()
            .find_map(|a| a.split('/').next()?.parse().ok())
            .context("an IPv6 Address in the file")?;
        let wg = WgPeer::start(
            &client_ns,
            &Implementation::WireguardGo,
            &InterfaceConfig {
                keypair: Keypair {
                    private: q.private_key.clone(),
                    public: public.clone(),
                },
                listen_port: 0,
                addresses: q.addresses.clone(),
                mtu: 1280,
            },
            &[WgPeerConfig {
                public_key: q.peer_key.clone(),
                allowed_ips: q.allowed_ips.clone(),
                endpoint: Some(q.endpoint),
                persistent_keepalive: q.keepalive,
                ..WgPeerConfig::default()
            }],
        )?;
        conc.wait_status("to serve phone1", SETTLE, |s| {
            s.concentrator
                .as_ref()
                .is_some_and(|c| c.serving.len() == 1)
        })?;

        // Allowed: srv1:8730, through conc1, from the client's own address.
        let target = SocketAddr::new(IpAddr::V6(srv_ula), ALLOWED);
        let t0 = Instant::now();
        let line = loop {
            if let Some(l) = probe(&client_ns, target, REFUSED_WAIT)? {
                break l;
            }
            if t0.elapsed() > SETTLE {
                bail!(
                    "the client never reached srv1:{ALLOWED}\nwg: {}\nconc1 log:\n{}\nsrv1 log:\n{}",
                    wg.show().unwrap_or_default(),
                    conc.logs(),
                    srv.logs()
                );
            }
        };
        ensure!(
            line == format!("port {ALLOWED} from {client_ula}"),
            "srv1 saw {line:?}, want the client's own ULA {client_ula}"
        );
        wg.wait_handshake(&q.peer_key, SETTLE)?;

        // The port the policy does not give tag:phone.
        let other = SocketAddr::new(IpAddr::V6(srv_ula), NOT_ALLOWED);
        ensure!(
            probe(&client_ns, other, REFUSED_WAIT)?.is_none(),
            "the client reached srv1:{NOT_ALLOWED}"
        );
        // The member the policy hides from the client.
        let hidden = SocketAddr::new(IpAddr::V6(hid_ula), ALLOWED);
        ensure!(
            probe(&client_ns, hidden, REFUSED_WAIT)?.is_none(),
            "the client reached hid1"
        );
        let ping = tabbify_tests::traffic::ping(&client_ns, IpAddr::V6(hid_ula), 2, "0.2")?;
        ensure!(ping.received == 0, "the client pinged hid1: {ping:?}");

        // Revoke: the client is cut within seconds.
        let gone = bed
            .admin
            .request("DELETE", &format!("/v1/clients/{id}"), None)?;
        ensure!(gone.status == 200, "revoking: {gone:?}");
        let t0 = Instant::now();
        loop {
            if probe(&client_ns, target, Duration::from_secs(1))?.is_none() {
                break;
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "the revoked client still reaches srv1 after 10 s"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        println!("revocation cut the client after {:?}", t0.elapsed());
        ensure!(
            probe(&client_ns, target, REFUSED_WAIT)?.is_none(),
            "the revoked client reached srv1 again"
        );
        conc.wait_status("to serve nobody", SETTLE, |s| {
            s.concentrator
                .as_ref()
                .is_some_and(|c| c.serving.is_empty())
        })?;
        drop(wg);
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    result
}

/// Ports on the client in the bypass test: the policy lets `sup` open the first only.
const CLIENT_ALLOWED: u16 = 8722;
const CLIENT_FORBIDDEN: u16 = 8723;

/// Issue 15, the attacker is a member with a valid certificate that bypasses its own
/// filter: the concentrator enforces the member → client ports itself.
///
/// | step | what | checked |
/// |---|---|---|
/// | setup | a coordinator; `conc1` (`join --concentrator`); `sup1` (tag `sup`); policy `sup → phone:8722`, `phone → sup:8730`; a stock `wireguard-go` client (tag `phone`) serving TCP on `:8722` and `:8723` | the client handshakes with `conc1` |
/// | honest member | `sup1`'s joiner connects to the client's `:8722` and `:8723` | `:8722` answers, `:8723` does not (either end's filter) |
/// | bypass | `sup1`'s joiner is killed (SIGKILL: it stays registered, as a patched joiner would) and `sup1`'s node key runs in a stock `wireguard-go` in `sup1`'s namespace, its only peer `conc1` with AllowedIPs the client's ULA: a data plane that filters nothing | `:8722` answers through `conc1`; `:8723` does not — only `conc1` stands between them |
#[test]
fn a_member_that_bypasses_its_filter_reaches_only_the_client_ports_it_may_open() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Wg, Tool::WireguardGo])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    let policy = json!({
        "tags": ["concentrator", "phone", "sup"],
        "allow": [
            {"src": ["tag:sup"], "dst": [format!("tag:phone:{CLIENT_ALLOWED}")]},
            {"src": ["tag:phone"], "dst": [format!("tag:sup:{ALLOWED}")]},
        ],
    });
    let bed = Testbed::start(policy, 1)?;
    let (sup_ns, _) = bed.host()?;
    let (conc_ns, conc_port) = bed.host()?;
    let (client_ns, _) = bed.host()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(
        &client_ns,
        &[CLIENT_ALLOWED, CLIENT_FORBIDDEN],
        stop.clone(),
    );
    let result = (|| -> Result<()> {
        let mut sup = bed.join(&sup_ns, JoinSpec::new("sup1", &["sup"], None))?;
        let mut conc_spec = JoinSpec::new("conc1", &["concentrator"], None);
        conc_spec.extra_args = vec!["--concentrator".into()];
        let mut conc = bed.join(&conc_ns, conc_spec)?;
        let minted = bed.admin.request(
            "POST",
            "/v1/clients",
            Some(&json!({"name": "phone1", "tags": ["phone"]})),
        )?;
        ensure!(minted.status == 201, "minting: {minted:?}");
        let public = minted.body["client"]["public_key"]
            .as_str()
            .context("client.public_key")?
            .to_owned();
        let q = parse_wg_quick(minted.body["config"].as_str().context("config")?)?;
        let client_ula: Ipv6Addr = q
            .addresses
            .iter()
            .find_map(|a| a.split('/').next()?.parse().ok())
            .context("an IPv6 Address in the file")?;
        let client_wg = WgPeer::start(
            &client_ns,
            &Implementation::WireguardGo,
            &InterfaceConfig {
                keypair: Keypair {
                    private: q.private_key.clone(),
                    public,
                },
                listen_port: 0,
                addresses: q.addresses.clone(),
                mtu: 1280,
            },
            &[WgPeerConfig {
                public_key: q.peer_key.clone(),
                allowed_ips: q.allowed_ips.clone(),
                endpoint: Some(q.endpoint),
                persistent_keepalive: q.keepalive.or(Some(1)),
                ..WgPeerConfig::default()
            }],
        )?;
        conc.wait_status("to serve phone1", SETTLE, |s| {
            s.concentrator
                .as_ref()
                .is_some_and(|c| c.serving.len() == 1)
        })?;
        client_wg.wait_handshake(&q.peer_key, SETTLE)?;
        let allowed = SocketAddr::new(IpAddr::V6(client_ula), CLIENT_ALLOWED);
        let forbidden = SocketAddr::new(IpAddr::V6(client_ula), CLIENT_FORBIDDEN);
        let reach = |what: &str, conc: &tabbify_tests::joiner::Joiner| -> Result<String> {
            let t0 = Instant::now();
            loop {
                if let Some(l) = probe(&sup_ns, allowed, REFUSED_WAIT)? {
                    return Ok(l);
                }
                if t0.elapsed() > SETTLE {
                    bail!(
                        "{what} never reached the client's :{CLIENT_ALLOWED}\nconc1 log:\n{}",
                        conc.logs()
                    );
                }
            }
        };

        // The honest member: its own filter and the concentrator's agree.
        let sup_status = sup.status()?;
        let line = reach("sup1's joiner", &conc)?;
        ensure!(
            line == format!("port {CLIENT_ALLOWED} from {}", sup_status.ula),
            "the client saw {line:?}, want sup1's ULA"
        );
        ensure!(
            probe(&sup_ns, forbidden, REFUSED_WAIT)?.is_none(),
            "sup1's joiner reached the client's :{CLIENT_FORBIDDEN}"
        );

        // The bypass: sup1's key in a data plane that filters nothing. SIGKILL, so the
        // coordinator keeps sup1 registered (no leave) and conc1 keeps its session rules.
        let key = std::fs::read_to_string(sup.state_dir().join("node.key"))
            .context("sup1's node key")?
            .trim()
            .to_owned();
        sup.process().signal(libc::SIGKILL)?;
        sup.process().wait_exit(Duration::from_secs(10))?;
        let conc_status = conc.status()?;
        let raw = WgPeer::start(
            &sup_ns,
            &Implementation::WireguardGo,
            &InterfaceConfig {
                keypair: Keypair {
                    private: key,
                    public: sup_status.public_key.clone(),
                },
                // Any port: the concentrator answers where the handshake came from (the
                // killed joiner's io_uring socket may still hold its port a moment).
                listen_port: 0,
                addresses: vec![format!("{}/128", sup_status.ula)],
                mtu: 1280,
            },
            &[WgPeerConfig {
                public_key: conc_status.public_key.clone(),
                allowed_ips: vec![format!("{client_ula}/128")],
                endpoint: Some(SocketAddr::new(
                    IpAddr::V4(conc_port.addr),
                    conc_status.listen_port,
                )),
                persistent_keepalive: Some(1),
                ..WgPeerConfig::default()
            }],
        )?;
        let line = reach("sup1's unfiltered wireguard-go", &conc)?;
        ensure!(
            line == format!("port {CLIENT_ALLOWED} from {}", sup_status.ula),
            "the client saw {line:?}, want sup1's ULA"
        );
        raw.wait_handshake(&conc_status.public_key, SETTLE)?;
        ensure!(
            probe(&sup_ns, forbidden, REFUSED_WAIT)?.is_none(),
            "a member bypassing its own filter reached the client's :{CLIENT_FORBIDDEN} \
             through conc1\nconc1 log:\n{}",
            conc.logs()
        );
        // And again once the flow to the allowed port is known to work (not a slow start).
        ensure!(
            probe(&sup_ns, allowed, REFUSED_WAIT)?.is_some(),
            "the allowed port stopped answering"
        );
        ensure!(
            probe(&sup_ns, forbidden, REFUSED_WAIT)?.is_none(),
            "the forbidden port answered on a second try"
        );
        drop(raw);
        drop(client_wg);
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    result
}
