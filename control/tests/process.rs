//! The built binaries as real processes: `tabbify-mesh-ca` mints the PKI, the coordinator
//! serves mTLS on a loopback ephemeral port; a good certificate works, no certificate, one
//! from another CA and an expired one are refused; state survives a restart; plaintext is
//! refused unless explicitly allowed on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::json;
use tabbify_control::ca::{Ca, Issued, Validity};

const CA_BIN: &str = env!("CARGO_BIN_EXE_tabbify-mesh-ca");
const COORD_BIN: &str = env!("CARGO_BIN_EXE_tabbify-mesh-coordinator");

fn ca(args: &[&str]) -> std::process::Output {
    Command::new(CA_BIN).args(args).output().unwrap()
}

fn ca_ok(args: &[&str]) {
    let out = ca(args);
    assert!(
        out.status.success(),
        "tabbify-mesh-ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn issued(dir: &Path) -> Issued {
    Issued {
        cert_pem: std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
        key_pem: std::fs::read_to_string(dir.join("key.pem")).unwrap(),
    }
}

/// A coordinator child process, killed (by its PID) when dropped.
struct Coordinator {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[String], env: &[(&str, &str)]) -> Result<Coordinator, String> {
    let mut cmd = Command::new(COORD_BIN);
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    match line.trim().strip_prefix("listening on ") {
        Some(a) => Ok(Coordinator {
            addr: a.parse().unwrap(),
            child,
        }),
        None => {
            let out = child.wait_with_output().unwrap();
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: Pki,
}

impl Setup {
    /// CA, coordinator and peer certificates, all from the `tabbify-mesh-ca` binary.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let p = |s: &str| root.join(s).to_str().unwrap().to_owned();
        ca_ok(&["init", "--out", &p("ca")]);
        ca_ok(&[
            "issue-coordinator",
            "--name",
            "coordinator",
            "--san",
            "127.0.0.1",
            "--ca-dir",
            &p("ca"),
            "--out",
            &p("coord"),
        ]);
        for (cmd, name) in [
            ("issue-admin", "admin"),
            ("issue-peer", "n1"),
            ("issue-peer", "s1"),
        ] {
            ca_ok(&[cmd, "--name", name, "--ca-dir", &p("ca"), "--out", &p(name)]);
        }
        std::fs::write(
            root.join("policy.json"),
            serde_json::to_vec(&policy()).unwrap(),
        )
        .unwrap();
        let pki = Pki {
            ca: Ca::load(&root.join("ca")).unwrap(),
            server: issued(&root.join("coord")),
        };
        Self {
            _dir: dir,
            root,
            pki,
        }
    }

    fn path(&self, s: &str) -> String {
        self.root.join(s).to_str().unwrap().to_owned()
    }

    fn mtls_args(&self) -> Vec<String> {
        [
            "--bind",
            "127.0.0.1:0",
            "--tls-cert",
            &self.path("coord/cert.pem"),
            "--tls-key",
            &self.path("coord/key.pem"),
            "--tls-ca",
            &self.path("ca/ca.pem"),
            "--policy-file",
            &self.path("policy.json"),
            "--admin",
            "admin",
            "--state-dir",
            &self.path("state"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn client(&self, name: &str, addr: SocketAddr) -> Client {
        self.pki
            .client_with(Some(&issued(&self.root.join(name))))
            .at(addr)
    }
}

#[test]
fn ca_binary_writes_private_keys_and_refuses_to_overwrite() {
    let s = Setup::new();
    for key in ["ca/ca.key", "n1/key.pem", "coord/key.pem"] {
        let mode = std::fs::metadata(s.root.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let before = std::fs::read(s.root.join("ca/ca.key")).unwrap();
    let out = ca(&["init", "--out", &s.path("ca")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(s.root.join("ca/ca.key")).unwrap(), before);
    let out = ca(&[
        "issue-peer",
        "--name",
        "bad name",
        "--ca-dir",
        &s.path("ca"),
        "--out",
        &s.path("x"),
    ]);
    assert!(!out.status.success());
    ca_ok(&["init", "--out", &s.path("ca"), "--force"]);
    assert_ne!(std::fs::read(s.root.join("ca/ca.key")).unwrap(), before);
}

#[tokio::test]
async fn mtls_accepts_only_current_certs_from_the_mesh_ca() {
    let s = Setup::new();
    let coord = start(&s.mtls_args(), &[]).unwrap();
    let addr = coord.addr;

    // Good certificate.
    let (st, v) = s.client("n1", addr).get("/health").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "ok");

    // No certificate: the open routes answer (a load balancer's health check), every
    // other route is 401.
    let anon = s.pki.client_with(None).at(addr);
    assert_eq!(anon.get("/health").await.0, 200);
    let (st, v) = anon.get("/v1/mesh/peers").await;
    assert_eq!((st, v["code"].as_str()), (401, Some("unauthorized")), "{v}");

    // A certificate from another CA, with the same name.
    let other = Ca::generate("other-ca", Validity::days_from_now(10)).unwrap();
    let foreign = other.issue_peer("n1", Validity::days_from_now(1)).unwrap();
    let c = s.pki.client_with(Some(&foreign)).at(addr);
    assert!(c.call("GET", "/health", None).await.is_err());

    // An expired certificate from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = s
        .pki
        .ca
        .issue_peer(
            "n1",
            Validity {
                not_before: now - time::Duration::days(10),
                not_after: now - time::Duration::days(1),
            },
        )
        .unwrap();
    let c = s.pki.client_with(Some(&expired)).at(addr);
    assert!(c.call("GET", "/health", None).await.is_err());

    // The refusals (foreign and expired certificates) are counted.
    let (_, metrics) = s.client("n1", addr).get("/metrics").await;
    let text = metrics.as_str().unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("tabbify_coordinator_tls_handshake_failures_total "))
        .unwrap();
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 2, "{line}");
}

#[tokio::test]
async fn tokens_revocations_and_policy_survive_a_restart() {
    let s = Setup::new();
    let coord = start(&s.mtls_args(), &[]).unwrap();
    let admin = s.client("admin", coord.addr);
    let (_, t) = admin.post("/v1/tokens", json!({"tags": ["node"]})).await;
    let used = t["token"].as_str().unwrap().to_owned();
    let (_, t) = admin
        .post("/v1/tokens", json!({"tags": ["supervisor"]}))
        .await;
    let fresh = t["token"].as_str().unwrap().to_owned();
    let n1 = s.client("n1", coord.addr);
    let (st, v) = n1
        .post(
            "/v1/mesh/register",
            register_body("n1", &key_for("n1"), &[], &used),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let n1_id = v["peer_id"].as_str().unwrap().to_owned();
    let (st, _) = admin.delete(&format!("/v1/mesh/peers/{n1_id}")).await;
    assert_eq!(st, 200);
    let mut doc = policy();
    doc.allow.clear();
    assert_eq!(
        admin
            .put("/v1/policy", serde_json::to_value(&doc).unwrap())
            .await
            .0,
        200
    );
    drop(coord);

    let coord = start(&s.mtls_args(), &[]).unwrap();
    let admin = s.client("admin", coord.addr);
    let (_, p) = admin.get("/v1/policy").await;
    assert_eq!(p["revision"], 2);
    assert_eq!(p["policy"]["allow"], json!([]));
    // Still revoked.
    let (st, v) = s
        .client("n1", coord.addr)
        .post(
            "/v1/mesh/register",
            register_body("n1", &key_for("n1"), &[], &fresh),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("revoked")), "{v}");
    // Still used.
    let s1 = s.client("s1", coord.addr);
    let (st, v) = s1
        .post(
            "/v1/mesh/register",
            register_body("s1", &key_for("s1"), &[], &used),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("token_used")), "{v}");
    // Still valid.
    let (st, v) = s1
        .post(
            "/v1/mesh/register",
            register_body("s1", &key_for("s1"), &[], &fresh),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    drop(coord);

    // Editing the policy file wins over the stored policy at the next start.
    let mut doc = policy();
    doc.tags.push("extra".into());
    std::fs::write(
        s.root.join("policy.json"),
        serde_json::to_vec(&doc).unwrap(),
    )
    .unwrap();
    let coord = start(&s.mtls_args(), &[]).unwrap();
    let (_, p) = s.client("admin", coord.addr).get("/v1/policy").await;
    assert_eq!(p["revision"], 3);
    assert!(p["policy"]["tags"]
        .as_array()
        .unwrap()
        .contains(&json!("extra")));

    let stored = state_text(&s.root.join("state"));
    assert!(
        stored.contains("SQLite format 3"),
        "the state is in state.db"
    );
    assert!(!stored.contains(&used) && !stored.contains(&fresh));
}

#[tokio::test]
async fn plaintext_needs_the_flag_the_environment_and_loopback() {
    let s = Setup::new();
    let base = |bind: &str| -> Vec<String> {
        vec![
            "--bind".into(),
            bind.into(),
            "--policy-file".into(),
            s.path("policy.json"),
            "--insecure-no-mtls".into(),
        ]
    };
    let err = start(&base("127.0.0.1:0"), &[]).err().unwrap();
    assert!(err.contains("TABBIFY_ALLOW_INSECURE"), "{err}");
    let err = start(&base("0.0.0.0:0"), &[("TABBIFY_ALLOW_INSECURE", "1")])
        .err()
        .unwrap();
    assert!(err.contains("loopback"), "{err}");
    // mTLS is the default: without the flag, certificates are required.
    let err = start(
        &[
            "--bind".into(),
            "127.0.0.1:0".into(),
            "--policy-file".into(),
            s.path("policy.json"),
        ],
        &[],
    )
    .err()
    .unwrap();
    assert!(err.contains("--tls-cert"), "{err}");

    // A bad mesh DNS domain is refused naming the flag (issue 15).
    for bad in [".", "", "a..b", "*.mesh"] {
        let mut args = base("127.0.0.1:0");
        args.extend(["--dns-domain".into(), bad.into()]);
        let err = start(&args, &[("TABBIFY_ALLOW_INSECURE", "1")])
            .err()
            .unwrap();
        assert!(err.contains("--dns-domain"), "{bad}: {err}");
    }

    let coord = start(&base("127.0.0.1:0"), &[("TABBIFY_ALLOW_INSECURE", "1")]).unwrap();
    let c = Client::plain(coord.addr, None);
    let (st, v) = c.get("/health").await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = c.get("/openapi.json").await;
    assert_eq!(st, 200);
}

/// Sends a Binding request to `server` until it is answered; the mapped address.
fn stun_mapped(server: SocketAddr) -> Option<SocketAddr> {
    use tabbify_control::api::stun;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let txid = [0x42; 12];
    let mut buf = [0u8; 1500];
    for _ in 0..20 {
        sock.send_to(&stun::binding_request(&txid), server).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return stun::parse(&buf[..n]).ok()?.binding_success_for(&txid);
        }
    }
    None
}

/// By default the binary answers STUN on its HTTP port number over UDP and on the next
/// port, and lists both in the registration; `--stun-bind off` mixed with an address is
/// refused at start.
#[tokio::test]
async fn the_binary_answers_stun_on_its_port_and_the_next() {
    let s = Setup::new();
    let coord = start(&s.mtls_args(), &[]).unwrap();
    let addr = coord.addr;
    let next = SocketAddr::new(addr.ip(), addr.port() + 1);
    for server in [addr, next] {
        let mapped = stun_mapped(server).unwrap_or_else(|| panic!("no STUN answer on {server}"));
        assert_eq!(mapped.ip(), addr.ip());
    }
    let mut args = s.mtls_args();
    args.extend([
        "--stun-bind".into(),
        "off".into(),
        "--stun-bind".into(),
        "127.0.0.1:0".into(),
    ]);
    let err = start(&args, &[]).err().unwrap();
    assert!(err.contains("--stun-bind off"), "{err}");
}

/// Runs an admin subcommand of the coordinator binary with `who`'s certificate.
fn admin_cmd(s: &Setup, addr: SocketAddr, who: &str, args: &[&str]) -> std::process::Output {
    let (sub, rest) = args.split_first().unwrap();
    let mut cmd = Command::new(COORD_BIN);
    cmd.arg(sub);
    let mut rest = rest.to_vec();
    if *sub == "policy" {
        cmd.arg(rest.remove(0));
    }
    cmd.args([
        "--coordinator",
        &format!("https://{addr}"),
        "--tls-cert",
        &s.path(&format!("{who}/cert.pem")),
        "--tls-key",
        &s.path(&format!("{who}/key.pem")),
        "--tls-ca",
        &s.path("ca/ca.pem"),
    ])
    .args(rest)
    .output()
    .unwrap()
}

#[tokio::test]
async fn admin_login_and_policy_test_from_the_command_line() {
    let s = Setup::new();
    let coord = start(&s.mtls_args(), &[]).unwrap();
    let addr = coord.addr;
    // admin-login prints a URL whose link signs a browser in once.
    let out = admin_cmd(&s, addr, "admin", &["admin-login", "--ttl", "2m"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let prefix = format!("https://{addr}/ui/login?link=tml_");
    assert!(url.starts_with(&prefix), "{url}");
    let path = url
        .trim_start_matches(&format!("https://{addr}"))
        .to_owned();
    let anon = s.pki.client_with(None).at(addr);
    let resp = anon.send("GET", &path, None, &[]).await.unwrap();
    assert_eq!(resp.status(), 303);
    let resp = anon.send("GET", &path, None, &[]).await.unwrap();
    assert_eq!(resp.status(), 401, "a replayed link");
    // A member's certificate cannot mint a login link.
    let out = admin_cmd(&s, addr, "n1", &["admin-login"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") && err.contains("not an admin"), "{err}");
    // policy test: two members, the rule that decides.
    let admin = s.client("admin", addr);
    for (name, tag) in [("n1", "node"), ("s1", "supervisor")] {
        let (_, t) = admin.post("/v1/tokens", json!({"tags": [tag]})).await;
        let (st, v) = s
            .client(name, addr)
            .post(
                "/v1/mesh/register",
                register_body(name, &key_for(name), &[], t["token"].as_str().unwrap()),
            )
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let out = admin_cmd(
        &s,
        addr,
        "admin",
        &["policy", "test", "n1", "s1", "tcp:8730"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("allowed: n1 -> s1 on tcp:8730: allowed by allow rule 0"),
        "{text}"
    );
    let out = admin_cmd(
        &s,
        addr,
        "admin",
        &["policy", "test", "s1", "n1", "8730", "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["allowed"].as_bool(), v["rule"].is_null()),
        (Some(false), true),
        "{v}"
    );
    let out = admin_cmd(&s, addr, "n1", &["policy", "test", "n1", "s1", "8730"]);
    assert!(!out.status.success(), "a member cannot use the tester");
}
