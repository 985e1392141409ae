//! Issue 15, items 1 and 4: the joiner's host DNS integration with the real programs —
//! Debian's systemd-resolved (with its own `dbus-daemon`) and Debian's openresolv — each
//! confined to a test namespace with private mounts ([`Netns::private_mounts`]: fresh
//! `/run`, copy-on-write `/etc`, the unpacked package over `/usr`), so this machine's
//! resolver is never touched (checked at the end of each test).
//!
//! | test | what | checked |
//! |---|---|---|
//! | resolved | the package installed, resolved not running; `--dns auto` | `auto` takes the file, not the package's `resolvconf` (a link to resolvectl); `getent` resolves `sup2.mesh` through it; restored on stop |
//! | resolved | `--dns off` | the TUN gets no DNS server or domain from us; the underlay link's settings stay as the test set them |
//! | resolved | `--dns resolved` | the TUN link has the stub's IPv6 address, `~mesh`, no default route; nothing of ours in resolved's global servers; `dig @127.0.0.53`, `resolvectl query` and `getent ahosts` (libc through stub-resolv.conf) answer `sup2.mesh` from the TUN link, `getent hosts` names sup2's ULA and mesh IPv4 (the mesh reverse zones are routing domains too); `outside.example` is answered over the underlay link, not the TUN; the underlay link untouched |
//! | resolved | SIGKILL, restart with `--dns auto` | resolved dropped the dead link (no `~mesh` anywhere, `sup2.mesh` not answered); `auto` picks resolved and the new link resolves |
//! | resolved | the coordinator claims `example.com` | refused: the live TUN link has no DNS server or domain left (`resolvectl revert`); after a clean stop no `~mesh` anywhere |
//! | resolvconf | `--dns off` | records and resolv.conf unchanged |
//! | resolvconf | `--dns resolvconf` | a record for the TUN naming the stub; the generated resolv.conf names the stub; `getent ahosts` resolves `sup2.mesh` and `outside.example` through it |
//! | resolvconf | SIGKILL, restart with `--dns auto` | the stale record stays after the kill; the restart deletes it before reading the upstreams (the stub's are dnsmasq, not itself) and `auto` picks resolvconf (one record, the new TUN's) |
//! | resolvconf | the coordinator claims `example.com` | refused: the record is deleted, the underlay's stays, resolv.conf as before the joiner |

use std::net::Ipv6Addr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tabbify_tests::joiner::Joiner;
use tabbify_tests::mountns::unpacked_usr;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::resolved::{self, Resolved};
use tabbify_tests::{wait, JoinSpec, Netns, Testbed};

/// The stub's IPv6 service address.
const STUB: &str = "fd5a:1f00::53";
/// The stub's IPv4 service address.
const STUB_V4: &str = "127.0.0.153";
/// What dnsmasq answers for the outside name.
const OUTSIDE_A: &str = "203.0.113.7";
/// resolved's stub listener.
const RESOLVED_STUB: &str = "127.0.0.53";
/// What resolved's stub-resolv.conf says.
const RESOLVED_STUB_CONF: &str = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n";
/// Rosters settling, resolved noticing links (liveness only).
const SETTLE: Duration = Duration::from_secs(30);
/// The Debian package that provides resolvconf here.
const OPENRESOLV: &str = "openresolv";

/// The tools, binaries and the unpacked `package` a test needs (`more` besides the common
/// ones); returns the package's `/usr` tree.
fn prerequisites(package: &str, more: &[Tool]) -> Result<std::path::PathBuf> {
    let mut tools = vec![
        Tool::Iproute2,
        Tool::Dig,
        Tool::Dnsmasq,
        Tool::Getent,
        Tool::UtilLinux,
    ];
    tools.extend_from_slice(more);
    require(&tools)?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    unpacked_usr(package)
}

/// A test bed whose members may reach each other, with dnsmasq (the "host's own
/// resolver", in a namespace of its own) answering `outside.example`; returns it with
/// dnsmasq's address.
fn bed_with_upstream() -> Result<(Testbed, String, tabbify_tests::Process)> {
    let policy = json!({
        "tags": ["supervisor"],
        "allow": [{"src": ["tag:supervisor"], "dst": ["tag:supervisor"]}],
    });
    let bed = Testbed::start(policy, 1)?;
    let (up_ns, up_port) = bed.host()?;
    let upstream = up_port.addr.to_string();
    let dnsmasq = up_ns.spawn(
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
        ],
    )?;
    Ok((bed, upstream, dnsmasq))
}

fn spec(name: &str, dns: &str) -> JoinSpec {
    let mut spec = JoinSpec::new(name, &["supervisor"], None);
    spec.dns = Some(dns.into());
    spec
}

/// The `dns.host` field of `status --json` (`None` when there is no stub).
fn dns_host(joiner: &Joiner) -> Result<Option<String>> {
    let v: serde_json::Value = serde_json::from_str(&joiner.local_command(&["status", "--json"])?)?;
    Ok(v["dns"]["host"].as_str().map(str::to_owned))
}

/// Waits until the joiner has taken the domain and says how it told the host.
fn wait_dns_host(joiner: &mut Joiner, want: &str) -> Result<()> {
    joiner.wait_status("to take the mesh domain", SETTLE, |s| {
        s.dns.as_ref().is_some_and(|d| d.domain.is_some())
    })?;
    let host = dns_host(joiner)?;
    ensure!(
        host.as_deref() == Some(want),
        "dns.host {host:?}, want {want}\n{}",
        joiner.logs()
    );
    Ok(())
}

/// The coordinator restarts claiming a public domain; waits until `joiner` refuses it.
fn refuse_domain(bed: &mut Testbed, joiner: &mut Joiner) -> Result<()> {
    bed.coordinator.kill()?;
    bed.coordinator.add_args(&["--dns-domain", "example.com"]);
    bed.coordinator.restart()?;
    joiner.wait_status("to refuse example.com", SETTLE, |s| {
        s.dns.as_ref().is_some_and(|d| d.refused.is_some())
    })?;
    Ok(())
}

/// `dig +short`-like: the status and the AAAA/A answers of `qtype name` at `server`.
fn dig(netns: &Netns, server: &str, qtype: &str, name: &str) -> Result<(String, Vec<String>)> {
    let at = format!("@{server}");
    let args = [
        "+time=2",
        "+tries=1",
        "+noall",
        "+comments",
        "+answer",
        &at,
        qtype,
        name,
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
            (w.len() >= 5 && (w[3] == "AAAA" || w[3] == "A")).then(|| w[4].to_owned())
        })
        .collect();
    Ok((status, answers))
}

/// The machine's own resolver files, to check they are untouched.
fn host_files() -> Vec<(String, Option<Vec<u8>>)> {
    ["/etc/resolv.conf", "/etc/passwd", "/etc/group"]
        .into_iter()
        .map(|p| (p.to_owned(), std::fs::read(p).ok()))
        .collect()
}

/// `resolvectl dns LINK` and `resolvectl domain LINK`, the values after the colon.
fn link_config(resolved: &Resolved, link: &str) -> Result<(String, String)> {
    let value = |out: String| {
        out.split_once(':')
            .map_or(String::new(), |(_, v)| v.trim().to_owned())
    };
    Ok((
        value(resolved.resolvectl(&["dns", link])?),
        value(resolved.resolvectl(&["domain", link])?),
    ))
}

/// `resolvectl --cache=no query NAME`: the output, or the error.
fn query(resolved: &Resolved, name: &str) -> Result<String> {
    resolved.resolvectl(&["--cache=no", "query", name])
}

#[test]
fn systemd_resolved_routes_the_mesh_domain_to_the_stub_and_forgets_a_dead_link() -> Result<()> {
    let usr = prerequisites(resolved::PACKAGE, &[Tool::DbusDaemon])?;
    let before = host_files();
    let (mut bed, upstream, _dnsmasq) = bed_with_upstream()?;
    let (ns2, _) = bed.host()?;
    let sup2 = bed.join(&ns2, spec("sup2", "off"))?;
    let ula2: Ipv6Addr = tabbify_api::ula::identity_ula("sup2");

    let (ns1, port1) = bed.host()?;
    let resolv_conf = ns1.private_resolv_conf(&format!("nameserver {upstream}\n"))?;
    let original = format!("nameserver {upstream}\n");
    ns1.private_mounts(&[&usr])?;

    // The package is installed but resolved does not run: `auto` must not take the
    // package's `resolvconf` (a link to resolvectl, useless without resolved) but the file.
    let cert1 = bed.pki.issue_peer("sup1")?;
    let mut first = spec("sup1", "auto");
    first.join_token = Some(bed.token_for(&first)?);
    let mut sup1 = Joiner::start(&ns1, &bed.coordinator.url(), &cert1, first)?;
    wait_dns_host(&mut sup1, "file")?;
    let conf = ns1.run("cat", &["/etc/resolv.conf"])?;
    ensure!(
        conf.starts_with("# BEGIN tabbify-mesh") && conf.ends_with(&original),
        "auto without resolved running:\n{conf}"
    );
    sup1.wait_peer_names(&["sup2"], SETTLE)?;
    wait::until("getent ahosts sup2.mesh through the file", SETTLE, || {
        let out = ns1.run("getent", &["ahosts", "sup2.mesh"])?;
        ensure!(out.contains(&ula2.to_string()), "{out}");
        Ok(Some(()))
    })?;
    sup1.stop()?;
    ensure!(ns1.run("cat", &["/etc/resolv.conf"])? == original);

    let resolved = Resolved::start(&ns1)?;
    // The underlay link's own settings, as a DHCP client would have set them: no joiner
    // mode may touch them.
    let underlay = port1.ifname.as_str();
    resolved.resolvectl(&["dns", underlay, &upstream])?;
    resolved.resolvectl(&["domain", underlay, "corp.test"])?;
    let underlay_config = link_config(&resolved, underlay)?;
    // As on a host that runs resolved: libc asks resolved's stub (stub-resolv.conf), and
    // the upstream is the underlay link's.
    std::fs::write(&resolv_conf, RESOLVED_STUB_CONF)
        .with_context(|| format!("writing {}", resolv_conf.display()))?;
    ensure!(
        underlay_config == (upstream.clone(), "corp.test".to_owned()),
        "underlay link: {underlay_config:?}"
    );

    // --dns off: resolved is left alone.
    let mut sup1 = Joiner::start(&ns1, &bed.coordinator.url(), &cert1, spec("sup1", "off"))?;
    sup1.wait_peer_names(&["sup2"], SETTLE)?;
    ensure!(dns_host(&sup1)?.is_none(), "--dns off runs a stub");
    ensure!(
        link_config(&resolved, sup1.ifname())? == (String::new(), String::new()),
        "--dns off configured the TUN: {:?}",
        link_config(&resolved, sup1.ifname())?
    );
    ensure!(link_config(&resolved, underlay)? == underlay_config);
    ensure!(
        !resolved.resolvectl(&["domain"])?.contains("~mesh"),
        "--dns off: ~mesh in resolved"
    );
    sup1.stop()?;

    // --dns resolved: per-link server and routing domain on the TUN.
    let mut sup1 = Joiner::start(
        &ns1,
        &bed.coordinator.url(),
        &cert1,
        spec("sup1", "resolved"),
    )?;
    wait_dns_host(&mut sup1, "resolved")?;
    let link = sup1.ifname().to_owned();
    let (servers, domains) = link_config(&resolved, &link)?;
    // Nothing of ours in resolved's global list (which gets every name): resolved puts a
    // link's loopback servers there, so the link must not name 127.0.0.153.
    let global = resolved.resolvectl(&["dns"])?;
    let global = global
        .lines()
        .find(|l| l.starts_with("Global"))
        .unwrap_or("");
    ensure!(
        !global.contains(STUB_V4) && !global.contains(STUB),
        "the stub is among resolved's global servers: {global}"
    );
    let domains: Vec<&str> = domains.split_whitespace().collect();
    ensure!(
        servers == STUB
            && domains.first() == Some(&"~mesh")
            && domains.contains(&"~0.0.f.1.a.5.d.f.ip6.arpa")
            && domains.contains(&"~2.0.f.1.a.5.d.f.ip6.arpa")
            && domains.contains(&"~64.100.in-addr.arpa")
            && domains.contains(&"~127.100.in-addr.arpa")
            && domains.len() == 1 + 2 + 64,
        "resolvectl on {link}: dns {servers:?}, domain {domains:?}"
    );
    let status = resolved.resolvectl(&["status", &link])?;
    ensure!(
        status.contains("-DefaultRoute"),
        "{link} is a default route for names outside the mesh:\n{status}"
    );
    ensure!(link_config(&resolved, underlay)? == underlay_config);
    sup1.wait_peer_names(&["sup2"], SETTLE)?;
    wait::until("sup2.mesh through resolved's stub", SETTLE, || {
        let (status, answers) = dig(&ns1, RESOLVED_STUB, "AAAA", "sup2.mesh")?;
        ensure!(
            answers == [ula2.to_string()],
            "dig AAAA sup2.mesh @{RESOLVED_STUB}: {status} {answers:?}"
        );
        Ok(Some(()))
    })
    .with_context(|| format!("resolved's log:\n{}", resolved.logs()))?;
    // libc through resolved: forward and reverse.
    let out = ns1.run("getent", &["ahosts", "sup2.mesh"])?;
    ensure!(
        out.contains(&ula2.to_string()),
        "getent ahosts sup2.mesh: {out}"
    );
    let out = ns1.run("getent", &["ahosts", "outside.example"])?;
    ensure!(
        out.contains(OUTSIDE_A),
        "getent ahosts outside.example: {out}"
    );
    let v4 = sup2
        .status()?
        .routes
        .ipv4
        .context("sup2 has no mesh IPv4")?;
    for addr in [ula2.to_string(), v4.to_string()] {
        let out = ns1.run("getent", &["hosts", &addr])?;
        ensure!(
            out.contains("sup2.mesh"),
            "getent hosts {addr} through resolved: {out}"
        );
    }
    let q = query(&resolved, "sup2.mesh")?;
    eprintln!("resolvectl query sup2.mesh:\n{q}");
    ensure!(
        q.contains(&ula2.to_string()) && q.contains(&format!("link: {link}")),
        "resolvectl query sup2.mesh is not answered over {link}:\n{q}"
    );
    let (status, answers) = dig(&ns1, RESOLVED_STUB, "A", "outside.example")?;
    ensure!(
        status == "NOERROR" && answers == [OUTSIDE_A],
        "outside.example through resolved: {status} {answers:?}"
    );
    let q = query(&resolved, "outside.example")?;
    eprintln!("resolvectl query outside.example:\n{q}");
    ensure!(
        q.contains(OUTSIDE_A) && q.contains(&format!("link: {underlay}")) && !q.contains(&link),
        "outside.example is not answered over {underlay} alone:\n{q}"
    );

    // SIGKILL: the TUN goes with the process, and resolved with it forgets the link's
    // settings; nothing is left for the next start to undo.
    sup1.process().signal(libc::SIGKILL)?;
    sup1.process().wait_exit(Duration::from_secs(10))?;
    wait::until("resolved to drop the dead link", SETTLE, || {
        let domains = resolved.resolvectl(&["domain"])?;
        ensure!(!domains.contains("~mesh"), "still routed:\n{domains}");
        Ok(Some(()))
    })?;
    let (_, answers) = dig(&ns1, RESOLVED_STUB, "AAAA", "sup2.mesh")?;
    ensure!(
        !answers.contains(&ula2.to_string()),
        "sup2.mesh still answered after the joiner died"
    );
    drop(sup1);

    // Restart with auto: resolved runs, so resolved it is.
    let mut sup1 = Joiner::start(&ns1, &bed.coordinator.url(), &cert1, spec("sup1", "auto"))?;
    wait_dns_host(&mut sup1, "resolved")?;
    let link = sup1.ifname().to_owned();
    ensure!(
        link_config(&resolved, &link)?.1.starts_with("~mesh "),
        "after the restart: {:?}",
        link_config(&resolved, &link)?
    );
    sup1.wait_peer_names(&["sup2"], SETTLE)?;
    wait::until("sup2.mesh after the restart", SETTLE, || {
        let (status, answers) = dig(&ns1, RESOLVED_STUB, "AAAA", "sup2.mesh")?;
        ensure!(answers == [ula2.to_string()], "{status} {answers:?}");
        Ok(Some(()))
    })?;
    ensure!(
        resolved.resolvectl(&["domain"])?.matches("~mesh").count() == 1,
        "{}",
        resolved.resolvectl(&["domain"])?
    );

    // A refused domain takes the settings back while the link stays (`resolvectl revert`).
    refuse_domain(&mut bed, &mut sup1)?;
    ensure!(ns1.has_link(&link), "{link} went away");
    ensure!(
        link_config(&resolved, &link)? == (String::new(), String::new()),
        "{link} after the refusal: {:?}",
        link_config(&resolved, &link)?
    );
    sup1.stop()?;
    ensure!(
        !resolved.resolvectl(&["domain"])?.contains("~mesh"),
        "after a clean stop:\n{}",
        resolved.resolvectl(&["domain"])?
    );
    ensure!(link_config(&resolved, underlay)? == underlay_config);
    ensure!(
        host_files() == before,
        "this machine's resolv.conf, passwd or group changed"
    );
    Ok(())
}

/// `resolvconf -i`: the interfaces with a record, sorted.
fn records(ns: &Netns) -> Result<Vec<String>> {
    let mut list: Vec<String> = ns
        .run("resolvconf", &["-i"])?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    list.sort();
    Ok(list)
}

fn resolv_conf(ns: &Netns) -> Result<String> {
    ns.run("cat", &["/etc/resolv.conf"])
}

#[test]
fn resolvconf_gets_a_record_for_the_stub_and_a_stale_one_is_removed() -> Result<()> {
    let usr = prerequisites(OPENRESOLV, &[])?;
    let before = host_files();
    let (mut bed, upstream, _dnsmasq) = bed_with_upstream()?;
    let (ns2, _) = bed.host()?;
    let _sup2 = bed.join(&ns2, spec("sup2", "off"))?;
    let ula2: Ipv6Addr = tabbify_api::ula::identity_ula("sup2");

    let (ns1, port1) = bed.host()?;
    ns1.private_resolv_conf(&format!("nameserver {upstream}\n"))?;
    ns1.private_mounts(&[&usr])?;
    // The underlay's record, as dhclient's hook would have added it.
    let dhcp = format!("{}.dhcp", port1.ifname);
    ns1.run(
        "sh",
        &[
            "-c",
            &format!("echo 'nameserver {upstream}' | resolvconf -a {dhcp}"),
        ],
    )?;
    let base_records = records(&ns1)?;
    ensure!(base_records == [dhcp.clone()], "records: {base_records:?}");
    let base_conf = resolv_conf(&ns1)?;
    ensure!(
        base_conf.contains(&format!("nameserver {upstream}")),
        "resolvconf's resolv.conf:\n{base_conf}"
    );

    // --dns off: nothing changes.
    let cert1 = bed.pki.issue_peer("sup1")?;
    let mut off = spec("sup1", "off");
    off.join_token = Some(bed.token_for(&off)?);
    let mut sup1 = Joiner::start(&ns1, &bed.coordinator.url(), &cert1, off)?;
    sup1.wait_peer_names(&["sup2"], SETTLE)?;
    ensure!(records(&ns1)? == base_records && resolv_conf(&ns1)? == base_conf);
    sup1.stop()?;

    // --dns resolvconf: a record for the TUN; resolv.conf names the stub.
    let mut sup1 = Joiner::start(
        &ns1,
        &bed.coordinator.url(),
        &cert1,
        spec("sup1", "resolvconf"),
    )?;
    wait_dns_host(&mut sup1, "resolvconf")?;
    let link = sup1.ifname().to_owned();
    ensure!(
        records(&ns1)? == sorted([dhcp.clone(), link.clone()]),
        "records: {:?}",
        records(&ns1)?
    );
    let record = ns1.run("resolvconf", &["-l", &link])?;
    ensure!(
        record.contains(&format!("nameserver {STUB}"))
            && record.contains(&format!("nameserver {STUB_V4}")),
        "the record for {link}:\n{record}"
    );
    let conf = resolv_conf(&ns1)?;
    eprintln!("resolvconf's resolv.conf with the joiner:\n{conf}");
    let first = conf
        .lines()
        .find(|l| l.starts_with("nameserver"))
        .unwrap_or_default();
    ensure!(
        first == format!("nameserver {STUB_V4}") || first == format!("nameserver {STUB}"),
        "resolv.conf does not name the stub first:\n{conf}"
    );
    sup1.wait_peer_names(&["sup2"], SETTLE)?;
    wait::until("getent ahosts sup2.mesh", SETTLE, || {
        let out = ns1.run("getent", &["ahosts", "sup2.mesh"])?;
        ensure!(out.contains(&ula2.to_string()), "{out}");
        Ok(Some(()))
    })?;
    let out = ns1.run("getent", &["ahosts", "outside.example"])?;
    ensure!(
        out.contains(OUTSIDE_A),
        "getent ahosts outside.example: {out}"
    );

    // SIGKILL leaves the record; the next start deletes it before anything else.
    sup1.process().signal(libc::SIGKILL)?;
    sup1.process().wait_exit(Duration::from_secs(10))?;
    ensure!(
        records(&ns1)?.contains(&link),
        "the record went with the process: {:?}",
        records(&ns1)?
    );
    drop(sup1);
    let mut sup1 = Joiner::start(&ns1, &bed.coordinator.url(), &cert1, spec("sup1", "auto"))?;
    wait_dns_host(&mut sup1, "resolvconf")?;
    let new_link = sup1.ifname().to_owned();
    ensure!(
        records(&ns1)? == sorted([dhcp.clone(), new_link.clone()]),
        "after the restart ({link} was the old TUN): {:?}",
        records(&ns1)?
    );
    let v: serde_json::Value = serde_json::from_str(&sup1.local_command(&["status", "--json"])?)?;
    let upstreams = v["dns"]["upstreams"].to_string();
    ensure!(
        upstreams.contains(&upstream) && !upstreams.contains(STUB_V4),
        "the stub's upstreams after the restart: {upstreams}"
    );
    wait::until("getent ahosts sup2.mesh after the restart", SETTLE, || {
        let out = ns1.run("getent", &["ahosts", "sup2.mesh"])?;
        ensure!(out.contains(&ula2.to_string()), "{out}");
        Ok(Some(()))
    })?;

    // A refused domain deletes the record while the joiner runs on.
    refuse_domain(&mut bed, &mut sup1)?;
    ensure!(
        records(&ns1)? == base_records && resolv_conf(&ns1)? == base_conf,
        "after the refusal: {:?}\n{}",
        records(&ns1)?,
        resolv_conf(&ns1)?
    );
    sup1.stop()?;
    ensure!(
        records(&ns1)? == base_records,
        "after a clean stop: {:?}",
        records(&ns1)?
    );
    ensure!(
        resolv_conf(&ns1)? == base_conf,
        "resolv.conf after a clean stop:\n{}",
        resolv_conf(&ns1)?
    );
    ensure!(
        host_files() == before,
        "this machine's resolv.conf, passwd or group changed"
    );
    Ok(())
}

fn sorted<const N: usize>(mut list: [String; N]) -> Vec<String> {
    list.sort();
    list.to_vec()
}
