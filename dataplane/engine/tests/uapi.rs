//! Stock `wg` (wireguard-tools) against our UAPI server: `wg show`, `wg set`, `wg showconf`.
//!
//! Each test serves a fake interface with a unique name on
//! `/var/run/wireguard/<name>.sock` (removed when the server drops, even on panic) and a
//! handler that applies updates to an in-memory device the way the engine would.

#![allow(clippy::unwrap_used)] // Tests may unwrap.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tabbify_engine::config::{public_key, Key};
use tabbify_engine::uapi::{
    DeviceStatus, DeviceUpdate, UapiErrno, UapiHandler, UapiPeerStatus, UapiServer,
};

const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
const PUB: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
const PEER_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const PEER_B: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
const PSK: &str = "8PH3pY8tSn39jmGLO6mXgW0S5Qr0MdK9FKbNZXdmeCM=";

/// An in-memory device: applies updates like the engine, records every update.
#[derive(Default)]
struct Device {
    status: Mutex<DeviceStatus>,
    updates: Mutex<Vec<DeviceUpdate>>,
}

impl UapiHandler for Device {
    fn get(&self) -> DeviceStatus {
        self.status.lock().unwrap().clone()
    }

    fn set(&self, u: DeviceUpdate) -> Result<(), UapiErrno> {
        self.updates.lock().unwrap().push(u.clone());
        if u.listen_port == Some(1) {
            return Err(UapiErrno::PortInUse);
        }
        let mut s = self.status.lock().unwrap();
        if let Some(k) = u.private_key {
            s.private_key = (!k.is_zero()).then_some(k);
        }
        if let Some(p) = u.listen_port {
            s.listen_port = p;
        }
        if let Some(m) = u.fwmark {
            s.fwmark = (m != 0).then_some(m);
        }
        if u.replace_peers {
            s.peers.clear();
        }
        for p in u.peers {
            let pos = s.peers.iter().position(|x| x.public_key == p.public_key);
            if p.remove {
                if let Some(i) = pos {
                    s.peers.remove(i);
                }
                continue;
            }
            let i = match pos {
                Some(i) => i,
                None if p.update_only => continue,
                None => {
                    s.peers.push(UapiPeerStatus::new(p.public_key));
                    s.peers.len() - 1
                }
            };
            let peer = &mut s.peers[i];
            if let Some(psk) = p.preshared_key {
                peer.preshared_key = psk;
            }
            if let Some(e) = p.endpoint {
                peer.endpoint = Some(e);
            }
            if let Some(k) = p.persistent_keepalive {
                peer.persistent_keepalive = (k != 0).then_some(k);
            }
            if p.replace_allowed_ips {
                peer.allowed_ips.clear();
            }
            peer.allowed_ips.extend(p.allowed_ips);
        }
        Ok(())
    }
}

fn key(b64: &str) -> Key {
    Key::from_base64(b64).unwrap()
}

/// A fresh interface name, at most 15 bytes, unique per process and test.
fn iface_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "tbu{}x{}",
        std::process::id() % 1_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    );
    assert!(name.len() <= 15);
    name
}

fn require_wg() {
    match Command::new("wg").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => panic!("`wg` not found: install wireguard-tools (apt-get install --no-install-recommends wireguard-tools)"),
    }
}

/// Runs `wg args...`; Ok(stdout) on success, Err(stderr) on failure.
fn wg(args: &[&str]) -> Result<String> {
    let out = Command::new("wg")
        .args(args)
        .output()
        .context("running wg")?;
    if out.status.success() {
        Ok(String::from_utf8(out.stdout)?)
    } else {
        bail!(
            "wg {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

fn start() -> (String, Arc<Device>, UapiServer) {
    require_wg();
    let name = iface_name();
    let dev = Arc::new(Device::default());
    let server = UapiServer::bind(&name, Arc::clone(&dev)).expect("start UAPI server");
    (name, dev, server)
}

#[test]
fn wg_show_dump_lists_device_and_peers() -> Result<()> {
    let (name, dev, _server) = start();
    {
        let mut s = dev.status.lock().unwrap();
        s.private_key = Some(key(PRIV));
        s.listen_port = 51820;
        s.fwmark = Some(0x42);
        let mut a = UapiPeerStatus::new(key(PEER_A));
        a.preshared_key = Some(key(PSK));
        a.endpoint = Some("192.0.2.7:51821".parse()?);
        a.allowed_ips = vec!["10.0.0.2/32".parse()?, "fd5a:1f00:1::/48".parse()?];
        a.last_handshake = Some(Duration::new(1_700_000_000, 5));
        a.rx_bytes = 1111;
        a.tx_bytes = 2222;
        a.persistent_keepalive = Some(25);
        let mut b = UapiPeerStatus::new(key(PEER_B));
        b.endpoint = Some("[2001:db8::1]:4500".parse()?);
        s.peers = vec![a, b];
    }
    let dump = wg(&["show", &name, "dump"])?;
    let lines: Vec<&str> = dump.lines().collect();
    assert_eq!(lines.len(), 3, "{dump}");
    assert_eq!(lines[0], format!("{PRIV}\t{PUB}\t51820\t0x42"));
    assert_eq!(
        lines[1],
        format!("{PEER_A}\t{PSK}\t192.0.2.7:51821\t10.0.0.2/32,fd5a:1f00:1::/48\t1700000000\t1111\t2222\t25")
    );
    assert_eq!(
        lines[2],
        format!("{PEER_B}\t(none)\t[2001:db8::1]:4500\t(none)\t0\t0\t0\toff")
    );
    // The human-readable form shows the same facts.
    let pretty = wg(&["show", &name])?;
    assert!(pretty.contains(&format!("interface: {name}")), "{pretty}");
    assert!(pretty.contains(&format!("public key: {PUB}")), "{pretty}");
    assert!(pretty.contains("latest handshake:"), "{pretty}");
    assert!(
        pretty.contains("transfer: 1.08 KiB received, 2.17 KiB sent"),
        "{pretty}"
    );
    // `wg show interfaces` finds us through the socket directory.
    let all = wg(&["show", "interfaces"])?;
    assert!(all.split_whitespace().any(|i| i == name), "{all}");
    Ok(())
}

#[test]
fn wg_set_adds_changes_and_removes_peers() -> Result<()> {
    let (name, dev, _server) = start();
    let dir = tempfile::tempdir()?;
    let keyfile = dir.path().join("private");
    std::fs::write(&keyfile, format!("{PRIV}\n"))?;
    let pskfile = dir.path().join("psk");
    std::fs::write(&pskfile, format!("{PSK}\n"))?;

    wg(&[
        "set",
        &name,
        "private-key",
        keyfile.to_str().unwrap(),
        "listen-port",
        "51999",
        "peer",
        PEER_A,
        "preshared-key",
        pskfile.to_str().unwrap(),
        "allowed-ips",
        "10.9.0.7/24,fd00::/64",
        "endpoint",
        "127.0.0.1:51998",
        "persistent-keepalive",
        "25",
    ])?;
    {
        let ups = dev.updates.lock().unwrap();
        assert_eq!(ups.len(), 1);
        let u = &ups[0];
        assert_eq!(u.private_key, Some(key(PRIV)));
        assert_eq!(u.listen_port, Some(51999));
        assert!(!u.replace_peers);
        assert_eq!(u.peers.len(), 1);
        let p = &u.peers[0];
        assert_eq!(p.public_key, key(PEER_A));
        assert!(!p.remove);
        assert_eq!(p.preshared_key, Some(Some(key(PSK))));
        assert_eq!(p.endpoint, Some("127.0.0.1:51998".parse::<SocketAddr>()?));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(
            p.replace_allowed_ips,
            "wg set allowed-ips replaces the list"
        );
        assert_eq!(
            p.allowed_ips,
            vec!["10.9.0.0/24".parse()?, "fd00::/64".parse()?]
        );
    }
    assert_eq!(public_key(&key(PRIV)), key(PUB));
    let dump = wg(&["show", &name, "dump"])?;
    assert_eq!(
        dump,
        format!(
            "{PRIV}\t{PUB}\t51999\toff\n\
             {PEER_A}\t{PSK}\t127.0.0.1:51998\t10.9.0.0/24,fd00::/64\t0\t0\t0\t25\n"
        )
    );

    // A second peer with an IPv6 endpoint; then the first one goes away.
    wg(&[
        "set",
        &name,
        "peer",
        PEER_B,
        "endpoint",
        "[::1]:4000",
        "allowed-ips",
        "10.1.0.0/16",
    ])?;
    wg(&["set", &name, "peer", PEER_A, "remove"])?;
    {
        let ups = dev.updates.lock().unwrap();
        let last = ups.last().unwrap();
        assert_eq!(last.peers.len(), 1);
        assert_eq!(last.peers[0].public_key, key(PEER_A));
        assert!(last.peers[0].remove);
    }
    let dump = wg(&["show", &name, "dump"])?;
    assert_eq!(
        dump,
        format!(
            "{PRIV}\t{PUB}\t51999\toff\n\
             {PEER_B}\t(none)\t[::1]:4000\t10.1.0.0/16\t0\t0\t0\toff\n"
        )
    );

    // `wg showconf` round-trips through our config parser.
    let conf = wg(&["showconf", &name])?;
    let parsed = tabbify_engine::config::Config::parse(&conf)?;
    assert_eq!(parsed.interface.private_key, key(PRIV));
    assert_eq!(parsed.interface.listen_port, Some(51999));
    assert_eq!(parsed.peers.len(), 1);
    assert_eq!(parsed.peers[0].endpoint, Some("[::1]:4000".parse()?));
    Ok(())
}

#[test]
fn wg_reports_handler_errors_and_bad_input() -> Result<()> {
    let (name, dev, _server) = start();
    // The handler refuses port 1 with EADDRINUSE; wg prints the errno's text.
    let err = wg(&["set", &name, "listen-port", "1"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("Address already in use"), "{err}");
    assert_eq!(dev.updates.lock().unwrap().len(), 1);
    // Nothing changed.
    assert_eq!(dev.status.lock().unwrap().listen_port, 0);
    // `wg show` of an interface nobody serves fails (no socket, no kernel module).
    assert!(wg(&["show", "tbunone0", "dump"]).is_err());
    Ok(())
}

#[test]
fn socket_is_removed_when_the_server_stops() {
    let (name, _dev, server) = start();
    let path = std::path::PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
    assert!(path.exists());
    assert_eq!(server.path(), path);
    // A second server for the same live interface is refused.
    let again = UapiServer::bind(&name, Arc::new(Device::default()));
    assert_eq!(again.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
    drop(server);
    assert!(!path.exists());
    assert!(wg(&["show", &name, "dump"]).is_err());
}
