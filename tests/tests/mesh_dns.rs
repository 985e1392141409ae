//! Issue 15, item 1: mesh DNS, end to end in namespaces with stock tools (`dig`, `getent`,
//! `dnsmasq` as the host's upstream resolver in a namespace of its own).
//!
//! | step | what | checked |
//! |---|---|---|
//! | setup | coordinator on a LAN; `dnsmasq` in its own namespace answering `outside.example`; `sup1` and `sup2` (supervisors) each in a namespace whose private resolv.conf names dnsmasq; `sup2` hosts an app | both joiners run `--dns file` |
//! | names | from `sup1`: `dig AAAA sup1.mesh @fd5a:1f00::53`, `sup2.mesh`, `<uuid>.app.mesh`, over UDP and TCP, IPv6 and the IPv4 service address; `getent ahosts sup1.mesh` through the managed resolv.conf | the right ULAs; `A` → NOERROR without answers; unknown → NXDOMAIN |
//! | reverse | `dig -x` at the stub for sup2's ULA and mesh IPv4, sup2's app ULA (from sup2 and from sup1), an unknown mesh ULA, an outside address; `getent hosts <sup2's ULA>` | `sup2.mesh.`; `<uuid>.app.mesh.` on the app's host, NOERROR without an answer elsewhere; NXDOMAIN; forwarded to dnsmasq |
//! | forward | `dig A outside.example` at the stub | dnsmasq's answer, UDP and TCP |
//! | status | `status --json` / `status` | `dns.address`, `dns.domain`, the words |
//! | late joiner | `late1` joins; from the moment `sup1` lists it in `peers` | `late1.mesh` resolves within 1 s |
//! | attacker: a name | a member named `SUP2` (sup2's name, case folded) joins | `sup2.mesh` never answers its ULA |
//! | crash | SIGKILL `sup1`: the managed block stays; restart | one block (not two), then SIGTERM restores the original byte for byte |
//! | attacker: coordinator | the coordinator restarts with `--dns-domain example.com` | joiners refuse it: no answers from the zone for `sup2.example.com`, the resolv.conf block removed, `status` says why |

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use tabbify_tests::joiner::Joiner;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{JoinSpec, Netns, Testbed};

/// The app sup2 hosts.
const APP: &str = "5b6d0f2e-4c1a-4e8b-9f3d-2a7c6e1b0d94";
/// The stub's IPv6 service address.
const STUB: &str = "fd5a:1f00::53";
/// The stub's IPv4 service address.
const STUB_V4: &str = "127.0.0.153";
/// What dnsmasq answers for the outside name.
const OUTSIDE_A: &str = "203.0.113.7";
/// The issue's bound from a roster event to a resolving name.
const RESOLVE_BOUND: Duration = Duration::from_secs(1);
/// Rosters settling, re-registration (liveness only).
const SETTLE: Duration = Duration::from_secs(30);

fn prerequisites() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Dig, Tool::Dnsmasq, Tool::Getent])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    Ok(())
}

/// `dig` in `netns`: the reply's status and its AAAA/A answers.
struct Dig {
    status: String,
    answers: Vec<String>,
}

fn dig(netns: &Netns, server: &str, qtype: &str, name: &str, tcp: bool) -> Result<Dig> {
    let at = format!("@{server}");
    let mut args = vec![
        "+time=2",
        "+tries=1",
        "+noall",
        "+comments",
        "+answer",
        &at,
        qtype,
        name,
    ];
    if tcp {
        args.push("+tcp");
    }
    let out = netns.run("dig", &args)?;
    let status = out
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .with_context(|| format!("dig {args:?} printed no status:\n{out}"))?
        .to_owned();
    let answers = out
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 5 && (w[3] == "AAAA" || w[3] == "A")).then(|| w[4].to_owned())
        })
        .collect();
    Ok(Dig { status, answers })
}

/// `dig -x ADDR @STUB`: the status and the PTR targets.
fn dig_ptr(netns: &Netns, addr: &str) -> Result<Dig> {
    let at = format!("@{STUB}");
    let args = [
        "+time=2",
        "+tries=1",
        "+noall",
        "+comments",
        "+answer",
        &at,
        "-x",
        addr,
    ];
    let out = netns.run("dig", &args)?;
    let status = out
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .with_context(|| format!("dig {args:?} printed no status:\n{out}"))?
        .to_owned();
    let answers = out
        .lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 5 && w[3] == "PTR").then(|| w[4].to_owned())
        })
        .collect();
    Ok(Dig { status, answers })
}

fn expect_aaaa(netns: &Netns, name: &str, want: Ipv6Addr) -> Result<()> {
    for (server, tcp) in [(STUB, false), (STUB, true), (STUB_V4, false)] {
        let d = dig(netns, server, "AAAA", name, tcp)?;
        ensure!(
            d.status == "NOERROR" && d.answers == [want.to_string()],
            "dig AAAA {name} @{server} (tcp {tcp}): {} {:?}, want {want}",
            d.status,
            d.answers
        );
    }
    Ok(())
}

fn join_spec(name: &str) -> JoinSpec {
    let mut spec = JoinSpec::new(name, &["supervisor"], None);
    spec.dns = Some("file".into());
    spec
}

fn join(bed: &Testbed, netns: &Netns, name: &str, upstream: &str) -> Result<Joiner> {
    netns.private_resolv_conf(&format!("nameserver {upstream}\n"))?;
    bed.join(netns, join_spec(name))
}

fn resolv_conf(netns: &Netns) -> Result<String> {
    netns.run("cat", &["/etc/resolv.conf"])
}

#[test]
fn mesh_names_resolve_from_the_roster_and_the_host_is_restored() -> Result<()> {
    prerequisites()?;
    let policy = json!({
        "tags": ["supervisor"],
        "app_hosts": ["tag:supervisor"],
        "allow": [{"src": ["tag:supervisor"], "dst": ["tag:supervisor"]}],
    });
    let mut bed = Testbed::start(policy, 1)?;

    // The host's own resolver: dnsmasq, authoritative for one outside name.
    let (up_ns, up_port) = bed.host()?;
    let upstream = up_port.addr.to_string();
    let _dnsmasq = up_ns.spawn(
        "dnsmasq",
        "dnsmasq",
        &[
            "--keep-in-foreground",
            "--log-facility=-",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--bind-interfaces",
            &format!("--listen-address={upstream}"),
            &format!("--address=/outside.example/{OUTSIDE_A}"),
            "--ptr-record=7.113.0.203.in-addr.arpa,outside.example",
        ],
    )?;

    let (ns1, _) = bed.host()?;
    let (ns2, _) = bed.host()?;
    let original = format!("nameserver {upstream}\n");
    // sup1's certificate is kept for its restart after the crash below.
    ns1.private_resolv_conf(&original)?;
    let cert1 = bed.pki.issue_peer("sup1")?;
    let mut spec1 = join_spec("sup1");
    spec1.join_token = Some(bed.token_for(&spec1)?);
    let mut sup1 = Joiner::start(&ns1, &bed.coordinator.url(), &cert1, spec1)?;
    let sup2 = join(&bed, &ns2, "sup2", &upstream)?;
    let app: uuid::Uuid = APP.parse()?;
    let app_ula = sup2.app_add(&app)?;
    sup1.wait_peer("sup2", "with its app", SETTLE, |p| {
        p.app_ulas.contains(&app_ula)
    })?;
    let ula1 = tabbify_api::ula::identity_ula("sup1");
    let ula2 = tabbify_api::ula::identity_ula("sup2");

    // Names from the roster, UDP and TCP, both service addresses.
    wait_until("the stub to answer", SETTLE, || {
        Ok(dig(&ns1, STUB, "AAAA", "sup1.mesh", false)?.answers == [ula1.to_string()])
    })?;
    expect_aaaa(&ns1, "sup1.mesh", ula1)?;
    expect_aaaa(&ns1, "SUP2.mesh.", ula2)?;
    expect_aaaa(&ns1, &format!("{app}.app.mesh"), app_ula)?;

    // The stub's address on the TUN is never a source for mesh traffic: sup2's ULA shares
    // more leading bits with fd5a:1f00::53 than with sup1's own ULA, so without the address
    // being deprecated the kernel picked it (RFC 6724 rule 8) and sup2 dropped every packet
    // (source not allowed) — the demo's sup1 could not ping sup2.
    let route = ns1.run("ip", &["-6", "route", "get", &ula2.to_string()])?;
    ensure!(
        route.contains(&format!("src {ula1}")),
        "the route to sup2 does not use sup1's ULA as source: {route}"
    );
    tabbify_tests::traffic::wait_ping(&ns1, ula2.into(), SETTLE)
        .context("sup1 pings sup2 with the stub's address on its TUN")?;
    let a = dig(&ns1, STUB, "A", "sup1.mesh", false)?;
    ensure!(
        a.status == "NOERROR" && a.answers.is_empty(),
        "A sup1.mesh: {} {:?}",
        a.status,
        a.answers
    );
    let nx = dig(&ns1, STUB, "AAAA", "nobody.mesh", false)?;
    ensure!(nx.status == "NXDOMAIN", "nobody.mesh: {}", nx.status);
    let unlisted = format!("{}.app.mesh", uuid::Uuid::from_u128(7));
    let nx = dig(&ns1, STUB, "AAAA", &unlisted, false)?;
    ensure!(nx.status == "NXDOMAIN", "{unlisted}: {}", nx.status);

    // Reverse lookups of mesh addresses come from the roster too.
    let p = dig_ptr(&ns1, &ula2.to_string())?;
    ensure!(
        p.status == "NOERROR" && p.answers == ["sup2.mesh."],
        "PTR of sup2's ULA: {} {:?}",
        p.status,
        p.answers
    );
    let v4 = sup2
        .status()?
        .routes
        .ipv4
        .context("sup2 has no mesh IPv4")?;
    let p = dig_ptr(&ns1, &v4.to_string())?;
    ensure!(p.answers == ["sup2.mesh."], "PTR of {v4}: {:?}", p.answers);
    let p = dig_ptr(&ns2, &app_ula.to_string())?;
    ensure!(
        p.answers == [format!("{app}.app.mesh.")],
        "PTR of the app's ULA on its host: {} {:?}",
        p.status,
        p.answers
    );
    let p = dig_ptr(&ns1, &app_ula.to_string())?;
    ensure!(
        p.status == "NOERROR" && p.answers.is_empty(),
        "PTR of a remote app's ULA: {} {:?}",
        p.status,
        p.answers
    );
    let p = dig_ptr(&ns1, "fd5a:1f00:1:2:3::1")?;
    ensure!(p.status == "NXDOMAIN", "unknown mesh ULA: {}", p.status);
    let p = dig_ptr(&ns1, OUTSIDE_A)?;
    ensure!(
        p.answers == ["outside.example."],
        "an outside address is forwarded to dnsmasq: {} {:?}",
        p.status,
        p.answers
    );
    let hosts = ns1.run("getent", &["hosts", &ula2.to_string()])?;
    ensure!(hosts.contains("sup2.mesh"), "getent hosts {ula2}: {hosts}");

    // Everything else goes to the host's own resolver.
    for tcp in [false, true] {
        let o = dig(&ns1, STUB, "A", "outside.example", tcp)?;
        ensure!(
            o.status == "NOERROR" && o.answers == [OUTSIDE_A],
            "outside.example via the stub (tcp {tcp}): {} {:?}",
            o.status,
            o.answers
        );
    }

    // The system resolver (glibc, through the managed resolv.conf).
    let conf = resolv_conf(&ns1)?;
    ensure!(
        conf.starts_with("# BEGIN tabbify-mesh") && conf.contains(&format!("nameserver {STUB}")),
        "managed resolv.conf:\n{conf}"
    );
    let hosts = ns1.run("getent", &["ahosts", "sup1.mesh"])?;
    ensure!(
        hosts.contains(&ula1.to_string()),
        "getent ahosts sup1.mesh: {hosts}"
    );
    let hosts = ns1.run("getent", &["ahosts", "outside.example"])?;
    ensure!(
        hosts.contains(OUTSIDE_A),
        "getent ahosts outside.example: {hosts}"
    );

    // status says where and for which domain.
    let v: serde_json::Value = serde_json::from_str(&sup1.local_command(&["status", "--json"])?)?;
    ensure!(
        v["dns"]["address"] == STUB && v["dns"]["domain"] == "mesh" && v["dns"]["host"] == "file",
        "status dns: {}",
        v["dns"]
    );
    let words = sup1.local_command(&["status"])?;
    ensure!(
        words.contains("dns:") && words.contains("<name>.mesh"),
        "{words}"
    );

    // A member joining later resolves within 1 s of appearing in peers.
    let (ns3, _) = bed.host()?;
    let late = join(&bed, &ns3, "late1", &upstream)?;
    sup1.wait_peer("late1", "listed", SETTLE, |_| true)?;
    let listed = Instant::now();
    let ula3 = tabbify_api::ula::identity_ula("late1");
    wait_until("late1.mesh to resolve", RESOLVE_BOUND, || {
        Ok(dig(&ns1, STUB, "AAAA", "late1.mesh", false)?.answers == [ula3.to_string()])
    })?;
    eprintln!(
        "late1.mesh resolved {:?} after it was listed",
        listed.elapsed()
    );
    drop(late);

    // Attacker: a member with sup2's name in other case cannot take it over.
    let (ns4, _) = bed.host()?;
    let _shadow = join(&bed, &ns4, "SUP2", &upstream)?;
    sup1.wait_peer("SUP2", "listed", SETTLE, |_| true)?;
    let ula_shadow = tabbify_api::ula::identity_ula("SUP2");
    let d = dig(&ns1, STUB, "AAAA", "sup2.mesh", false)?;
    ensure!(
        !d.answers.contains(&ula_shadow.to_string()),
        "sup2.mesh answered the impostor's ULA: {:?}",
        d.answers
    );
    ensure!(
        d.status == "NXDOMAIN",
        "a contested name resolves for nobody: {}",
        d.status
    );
    expect_aaaa(&ns1, &format!("{app}.app.mesh"), app_ula)?;

    // Crash: SIGKILL leaves the block; the next start restores first and writes one block;
    // a clean stop restores the original byte for byte.
    sup1.process().signal(libc::SIGKILL)?;
    sup1.process().wait_exit(Duration::from_secs(10))?;
    let left = resolv_conf(&ns1)?;
    ensure!(
        left.contains("# BEGIN tabbify-mesh"),
        "after SIGKILL:\n{left}"
    );
    drop(sup1);
    let mut sup1 = Joiner::start(&ns1, &bed.coordinator.url(), &cert1, join_spec("sup1"))?;
    sup1.wait_status("to take the domain", SETTLE, |s| {
        s.dns.as_ref().is_some_and(|d| d.domain.is_some())
    })?;
    let conf = resolv_conf(&ns1)?;
    ensure!(
        conf.matches("# BEGIN tabbify-mesh").count() == 1 && conf.ends_with(&original),
        "after the restart:\n{conf}"
    );
    expect_aaaa(&ns1, "sup1.mesh", ula1)?;

    // Attacker: a coordinator claiming a public domain is refused by the joiners.
    bed.coordinator.kill()?;
    bed.coordinator.add_args(&["--dns-domain", "example.com"]);
    bed.coordinator.restart()?;
    let s = sup1.wait_status("to refuse example.com", SETTLE, |s| {
        s.dns.as_ref().is_some_and(|d| d.refused.is_some())
    })?;
    let dns = s.dns.context("no dns in status")?;
    ensure!(dns.domain.is_none(), "{dns:?}");
    let d = dig(&ns1, STUB, "AAAA", "sup2.example.com", false)?;
    ensure!(
        !d.answers.contains(&ula2.to_string()) && d.status != "NOERROR",
        "sup2.example.com answered from the mesh: {} {:?}",
        d.status,
        d.answers
    );
    // The refused domain also took the host's resolver settings back.
    let conf = resolv_conf(&ns1)?;
    ensure!(conf == original, "after the refusal:\n{conf}");

    sup1.stop()?;
    ensure!(resolv_conf(&ns1)? == original, "after stop");
    sup2.stop()?;
    ensure!(resolv_conf(&ns2)? == original, "sup2 after stop");
    Ok(())
}

/// Polls `check` every 50 ms until it says yes, for at most `timeout`.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?} (last error: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
