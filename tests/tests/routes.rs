//! Issue 15, item 2: subnet routers and exit nodes, end to end in namespaces.
//!
//! | test | setup | checked |
//! |---|---|---|
//! | `a_lan_behind_a_router_is_reachable_only_by_members_the_policy_allows` | coordinator LAN; `router1` (`--advertise-routes` its LAN's /24, auto-approved by the policy's `routes`) with a LAN namespace behind it by veth; `user1` allowed the prefix; `other1` allowed only the router's ULA | `user1`: ping and a TCP transfer (checksummed) to the LAN host; `other1`: no route; the attacker `other1` forces the route (`wg set … allowed-ips`, `ip route`) and pings: nothing reaches the LAN host (nftables counter there), the router counts `destination_not_granted`; the router's `inet tabbify` table and `ip_forward=1` exist while it runs, survive a SIGKILL, and are gone (forwarding back to 0) after the restart and a SIGTERM |
//! | `an_exit_node_carries_the_internet_while_the_mesh_stays_direct` | `exit1` (`--advertise-exit-node`) with an "internet" namespace behind it holding 198.51.100.1; `user2 --exit-node exit1` | the user reaches 198.51.100.1 (it has no other route there); its path to `exit1` stays direct on the LAN address, mesh pings to `exit1`'s ULA answer, the coordinator stays connected; the policy rules (fwmark 0x7462) exist while it runs, survive a SIGKILL, and are gone after a restart without `--exit-node` |
//! | `an_ipv6_prefix_is_routed_with_and_without_snat` | `router6` advertises its LAN's IPv6 /64 (`fd77:…`, approved by the policy's `fd77::/16`); `user6` allowed it | `user6` pings the LAN host's IPv6 address; with `--snat true` (default) the LAN host sees the router's address as source; restarted with `--snat false` (no `inet tabbify` table) and the LAN given a route back to the mesh, the LAN host sees `user6`'s ULA; started with a `PATH` without `nft` and `--snat true`, the router exits with an error naming nftables and `--snat false`, and leaves forwarding as it was |
//! | `an_exit_node_user_keeps_its_relay_path` | NAT lab: `rx-user` behind a router that drops all UDP (only TCP to the relay's 443 and the coordinator pass), `rx-exit1` (`--advertise-exit-node`) with a public address and an "internet" namespace behind it holding 198.51.100.1; a real relay; `rx-user --exit-node rx-exit1 --relay …` | the user's relay session comes up over TLS (its TCP connection to the relay leaves from the underlay address: it carries the exit fwmark, so it does not follow the default route into the tunnel), its path to `rx-exit1` is `relay`, and through it the user pings 198.51.100.1 and `rx-exit1`'s ULA |
//! | `a_prefix_rule_alone_reaches_the_lan_through_a_concentrating_router` | `rp-router` (`--advertise-routes` its LAN's IPv4 /24 and IPv6 /64, `--concentrator`, serving a minted client `rp-phone1`); `rp-laptop` whose only rule is the two prefixes (nothing to the router's own ports: the coordinator gives it the router with empty ports) | the laptop pings the LAN host on IPv4 and IPv6 and moves a checksummed TCP transfer to it; it can neither ping the router's ULA nor open a TCP connection to a port on it; the LAN host (given routes back to the mesh) can neither ping the laptop's ULA and IPv4 nor open a TCP connection to it, and the router counts those drops; `rp-web`, whose rule is the prefixes with `:tcp:24803`, opens TCP 24803 on the LAN host (IPv4 and IPv6), not 24804, no ping, and its own filter counts the drops |
//! | `two_routers_for_one_prefix_fail_over_when_the_primary_dies` | `r1` and `r2` both advertise 10.99.0.0/24 (one LAN host behind both); `user3` pings it every 50 ms | SIGKILL the primary (the one carrying the traffic): pings resume through the other (measured and printed; asserted only that they resume) |

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tabbify_tests::joiner::Joiner;
use tabbify_tests::pinger::{unix_now, Pinger};
use tabbify_tests::pki::Issued;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::traffic::{ping, tcp_transfer, wait_ping};
use tabbify_tests::{JoinSpec, Netns, Testbed, VethOptions, VethPair};

/// Rosters settling, routes installed (liveness only).
const SETTLE: Duration = Duration::from_secs(30);
/// The internet host behind the exit node.
const INTERNET: &str = "198.51.100.1";
/// The fwmark of `join --exit-node`.
const EXIT_MARK: &str = "0x7462";

fn prerequisites() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Ping, Tool::Nft, Tool::Wg])?;
    tabbify_tests::bins::tabbify_mesh()?;
    tabbify_tests::bins::tabbify_mesh_ca()?;
    tabbify_tests::bins::tabbify_mesh_coordinator()?;
    tabbify_tests::bins::tabbify_xfer()?;
    Ok(())
}

fn spec(name: &str, tag: &str, args: &[&str]) -> JoinSpec {
    let mut s = JoinSpec::new(name, &[tag], None);
    s.extra_args = args.iter().map(|a| a.to_string()).collect();
    s.extra_args.extend(["--metrics-bind".into(), "off".into()]);
    s
}

/// Starts a joiner with a fresh certificate (kept for its restarts) and join token.
fn first_start(
    bed: &Testbed,
    netns: &Netns,
    name: &str,
    tag: &str,
    args: &[&str],
) -> Result<(Issued, Joiner)> {
    let cert = bed.pki.issue_peer(name)?;
    let mut s = spec(name, tag, args);
    s.join_token = Some(bed.token_for(&s)?);
    let j = Joiner::start(netns, &bed.coordinator.url(), &cert, s)?;
    Ok((cert, j))
}

/// Starts the joiner `name` again (its key is admitted: no token).
fn restart(
    bed: &Testbed,
    netns: &Netns,
    cert: &Issued,
    name: &str,
    tag: &str,
    args: &[&str],
) -> Result<Joiner> {
    Joiner::start(netns, &bed.coordinator.url(), cert, spec(name, tag, args))
}

/// Whether `ping` from `netns` to `addr` gets no reply at all (2 tries).
fn unreachable(netns: &Netns, addr: &str) -> Result<bool> {
    let out = netns
        .command("ping")
        .args(["-n", "-c", "2", "-i", "0.2", "-W", "1", addr])
        .output()
        .context("running ping")?;
    Ok(!out.status.success())
}

fn sysctl(netns: &Netns, path: &str) -> Result<String> {
    Ok(netns.run("cat", &[path])?.trim().to_owned())
}

fn has_table(netns: &Netns) -> bool {
    netns
        .command("nft")
        .args(["list", "table", "inet", "tabbify"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn peer_key(j: &Joiner, name: &str) -> Result<(String, String)> {
    let p = j
        .peers()?
        .into_iter()
        .find(|p| p.name == name)
        .with_context(|| format!("{} does not list {name}", j.name()))?;
    Ok((p.public_key, p.ula.to_string()))
}

#[test]
fn a_lan_behind_a_router_is_reachable_only_by_members_the_policy_allows() -> Result<()> {
    prerequisites()?;
    let policy = json!({
        "tags": ["router", "user", "other"],
        "routes": {"10.77.0.0/16": ["tag:router"]},
        "allow": [
            {"src": ["tag:user"], "dst": ["tag:router", "10.77.0.0/16"]},
            {"src": ["tag:other"], "dst": ["tag:router"]},
            {"src": ["tag:router"], "dst": ["tag:user", "tag:other"]},
        ],
    });
    let bed = Testbed::start(policy, 1)?;
    let (router_ns, _) = bed.host()?;
    let lan_ns = Netns::with_label("routes-joiner-lan")?;
    let pair = VethPair::connect(&router_ns, &lan_ns, &VethOptions::default())?;
    let o = pair.b.v4.octets();
    let prefix = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    let lan_host = pair.b.v4.to_string();

    let (router_cert, mut router) = first_start(
        &bed,
        &router_ns,
        "router1",
        "router",
        &["--advertise-routes", &prefix],
    )?;
    ensure!(sysctl(&router_ns, "/proc/sys/net/ipv4/ip_forward")? == "1");
    ensure!(
        has_table(&router_ns),
        "the masquerade table exists while routing"
    );
    let (user_ns, _) = bed.host()?;
    let user = bed.join(&user_ns, spec("user1", "user", &[]))?;
    let (other_ns, _) = bed.host()?;
    let mut other = bed.join(&other_ns, spec("other1", "other", &[]))?;

    // The allowed member: ping and TCP.
    wait_ping(&user_ns, lan_host.parse()?, SETTLE).with_context(|| {
        format!(
            "user1 reaching the LAN; router log:\n{}\nuser log:\n{}",
            router.logs(),
            user.logs()
        )
    })?;
    let stats = ping(&user_ns, lan_host.parse()?, 5, "0.2")?;
    ensure!(stats.received == 5, "{stats:?}");
    let xfer = tabbify_tests::bins::tabbify_xfer()?;
    tcp_transfer(
        &xfer,
        &user_ns,
        &lan_ns,
        lan_host.parse()?,
        1 << 20,
        Duration::from_secs(30),
    )?;

    // The member the policy does not allow has no route.
    other.wait_peer_names(&["router1"], SETTLE).ok();
    ensure!(
        unreachable(&other_ns, &lan_host)?,
        "other1 must not reach the LAN"
    );

    // The attacker forces it: the router's peer entry takes the LAN, the kernel routes it.
    lan_ns.run("nft", &["add", "table", "inet", "probe"])?;
    lan_ns.run(
        "nft",
        &["add chain inet probe in { type filter hook prerouting priority -300; }"],
    )?;
    lan_ns.run(
        "nft",
        &["add rule inet probe in icmp type echo-request counter"],
    )?;
    let (router_key, router_ula) = peer_key(&other, "router1")?;
    let allowed = format!("{router_ula}/128,{prefix}");
    other_ns.run(
        "wg",
        &[
            "set",
            other.ifname(),
            "peer",
            &router_key,
            "allowed-ips",
            &allowed,
        ],
    )?;
    other_ns.ip(&["route", "replace", &prefix, "dev", other.ifname()])?;
    let drops_before = router
        .status()?
        .drops
        .get("destination_not_granted")
        .copied()
        .unwrap_or(0);
    let crafted = ping(&other_ns, lan_host.parse()?, 5, "0.2")?;
    ensure!(
        crafted.received == 0,
        "the crafted pings were answered: {crafted:?}"
    );
    let counter = lan_ns.run("nft", &["list", "chain", "inet", "probe", "in"])?;
    ensure!(
        counter.contains("packets 0 "),
        "echo requests reached the LAN host:\n{counter}"
    );
    let drops = router
        .status()?
        .drops
        .get("destination_not_granted")
        .copied()
        .unwrap_or(0);
    ensure!(
        drops >= drops_before + 5,
        "the router counted {drops} destination_not_granted (before {drops_before})"
    );

    // Crash: the table and forwarding stay; the next start cleans them, a stop restores.
    router.process().signal(9)?;
    router.process().wait_exit(Duration::from_secs(10))?;
    ensure!(has_table(&router_ns), "a SIGKILL cannot clean up");
    let router = restart(&bed, &router_ns, &router_cert, "router1", "router", &[])?;
    ensure!(
        !has_table(&router_ns),
        "the restart deleted the stale table"
    );
    ensure!(sysctl(&router_ns, "/proc/sys/net/ipv4/ip_forward")? == "0");
    router.stop()?;
    let router = restart(
        &bed,
        &router_ns,
        &router_cert,
        "router1",
        "router",
        &["--advertise-routes", &prefix],
    )?;
    ensure!(has_table(&router_ns));
    router.stop()?;
    ensure!(!has_table(&router_ns), "a stop deletes the table");
    ensure!(sysctl(&router_ns, "/proc/sys/net/ipv4/ip_forward")? == "0");
    Ok(())
}

#[test]
fn an_exit_node_carries_the_internet_while_the_mesh_stays_direct() -> Result<()> {
    prerequisites()?;
    let policy = json!({
        "tags": ["exit", "user"],
        "routes": {"0.0.0.0/0": ["tag:exit"], "::/0": ["tag:exit"]},
        "allow": [
            {"src": ["tag:user"], "dst": ["tag:exit", "0.0.0.0/0", "::/0"]},
            {"src": ["tag:exit"], "dst": ["tag:user"]},
        ],
    });
    let bed = Testbed::start(policy, 1)?;
    let (exit_ns, exit_port) = bed.host()?;
    let inet_ns = Netns::with_label("routes-joiner-inet")?;
    let pair = VethPair::connect(&exit_ns, &inet_ns, &VethOptions::default())?;
    inet_ns.ip(&["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"])?;
    exit_ns.ip(&["route", "add", "default", "via", &pair.b.v4.to_string()])?;
    let exit = bed.join(&exit_ns, spec("exit1", "exit", &["--advertise-exit-node"]))?;

    let (user_ns, _) = bed.host()?;
    ensure!(
        unreachable(&user_ns, INTERNET)?,
        "the user has no route to the internet host of its own"
    );
    let (user_cert, mut user) =
        first_start(&bed, &user_ns, "user2", "user", &["--exit-node", "exit1"])?;
    wait_ping(&user_ns, INTERNET.parse()?, SETTLE).with_context(|| {
        format!(
            "user2 through exit1; exit log:\n{}\nuser log:\n{}",
            exit.logs(),
            user.logs()
        )
    })?;
    let stats = ping(&user_ns, INTERNET.parse()?, 5, "0.2")?;
    ensure!(stats.received == 5, "{stats:?}");
    // The mesh and the underlay stay direct.
    let (_, exit_ula) = peer_key(&user, "exit1")?;
    let mesh = ping(&user_ns, exit_ula.parse()?, 3, "0.2")?;
    ensure!(mesh.received == 3, "mesh ping: {mesh:?}");
    let status = user.status()?;
    let p = status
        .peers
        .iter()
        .find(|p| p.name == "exit1")
        .context("exit1 in status")?;
    ensure!(p.path == "direct", "path to the exit node: {}", p.path);
    ensure!(
        p.endpoint.map(|e| e.ip()) == Some(IpAddr::V4(exit_port.addr)),
        "the exit node is reached on its LAN address, not through itself: {:?}",
        p.endpoint
    );
    std::thread::sleep(Duration::from_secs(3));
    ensure!(user.status()?.registered, "the coordinator stays reachable");
    let rules = user_ns.ip(&["-4", "rule", "show"])?;
    ensure!(rules.contains(EXIT_MARK), "policy rules: {rules}");

    // Crash, then a start without --exit-node removes the rules.
    user.process().signal(9)?;
    user.process().wait_exit(Duration::from_secs(10))?;
    ensure!(user_ns.ip(&["-4", "rule", "show"])?.contains(EXIT_MARK));
    let user = restart(&bed, &user_ns, &user_cert, "user2", "user", &[])?;
    for fam in ["-4", "-6"] {
        let rules = user_ns.ip(&[fam, "rule", "show"])?;
        ensure!(!rules.contains(EXIT_MARK), "stale rules ({fam}): {rules}");
    }
    ensure!(
        unreachable(&user_ns, INTERNET)?,
        "no exit node, no internet"
    );
    user.stop()?;
    Ok(())
}

/// An nftables counter in `netns` (table `inet probe`) of ICMPv6 echo requests from `src`;
/// returns its chain name.
fn count_echo_from(netns: &Netns, chain: &str, src: &str) -> Result<()> {
    let _ = netns.run("nft", &["add", "table", "inet", "probe"]);
    netns.run(
        "nft",
        &[&format!(
            "add chain inet probe {chain} {{ type filter hook prerouting priority -300; }}"
        )],
    )?;
    netns.run(
        "nft",
        &[&format!(
            "add rule inet probe {chain} ip6 saddr {src} icmpv6 type echo-request counter"
        )],
    )?;
    Ok(())
}

/// The packets the counter of [`count_echo_from`] saw.
fn echo_count(netns: &Netns, chain: &str) -> Result<u64> {
    let out = netns.run("nft", &["list", "chain", "inet", "probe", chain])?;
    out.split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no counter in:\n{out}"))
}

/// A directory of links to every program on this `PATH` but `nft`: a host without nftables.
fn path_without_nft(dir: &std::path::Path) -> Result<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]) {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let link = dir.join(&name);
            if name != "nft" && !link.exists() {
                std::os::unix::fs::symlink(e.path(), link)?;
            }
        }
    }
    ensure!(dir.join("ip").exists() && !dir.join("nft").exists());
    dir.to_str()
        .map(str::to_owned)
        .context("non-UTF-8 temp dir")
}

#[test]
fn an_ipv6_prefix_is_routed_with_and_without_snat() -> Result<()> {
    prerequisites()?;
    let policy = json!({
        "tags": ["router", "user"],
        "routes": {"fd77::/16": ["tag:router"]},
        "allow": [
            {"src": ["tag:user"], "dst": ["tag:router", "fd77::/16"]},
            {"src": ["tag:router"], "dst": ["tag:user"]},
        ],
    });
    let bed = Testbed::start(policy, 1)?;
    let (router_ns, _) = bed.host()?;
    let lan_ns = Netns::with_label("routes-joiner-lan6")?;
    let pair = VethPair::connect(&router_ns, &lan_ns, &VethOptions::default())?;
    let seg = pair.b.v6.segments();
    let prefix = format!("{:x}:{:x}:{:x}:{:x}::/64", seg[0], seg[1], seg[2], seg[3]);
    let lan_host = IpAddr::V6(pair.b.v6);
    let forwarding = "/proc/sys/net/ipv6/conf/all/forwarding";
    let forwarding_before = sysctl(&router_ns, forwarding)?;

    let (router_cert, router) = first_start(
        &bed,
        &router_ns,
        "router6",
        "router",
        &["--advertise-routes", &prefix],
    )?;
    ensure!(sysctl(&router_ns, forwarding)? == "1");
    let (user_ns, _) = bed.host()?;
    let user = bed.join(&user_ns, spec("user6", "user", &[]))?;
    let user_ula = user.status()?.ula.to_string();

    // Masqueraded: the LAN host sees the router.
    count_echo_from(&lan_ns, "from_router", &pair.a.v6.to_string())?;
    count_echo_from(&lan_ns, "from_user", &user_ula)?;
    wait_ping(&user_ns, lan_host, SETTLE).with_context(|| {
        format!(
            "user6 reaching {lan_host}; router log:\n{}\nuser log:\n{}",
            router.logs(),
            user.logs()
        )
    })?;
    let stats = ping(&user_ns, lan_host, 5, "0.2")?;
    ensure!(stats.received == 5, "{stats:?}");
    ensure!(echo_count(&lan_ns, "from_router")? >= 5);
    ensure!(echo_count(&lan_ns, "from_user")? == 0, "not masqueraded");
    router.stop()?;

    // --snat false: no masquerade; with a route back, the LAN host sees the member.
    let router = restart(
        &bed,
        &router_ns,
        &router_cert,
        "router6",
        "router",
        &["--advertise-routes", &prefix, "--snat", "false"],
    )?;
    ensure!(
        !has_table(&router_ns),
        "--snat false installs no masquerade"
    );
    lan_ns.ip(&[
        "-6",
        "route",
        "add",
        "fd5a:1f00::/32",
        "via",
        &pair.a.v6.to_string(),
    ])?;
    wait_ping(&user_ns, lan_host, SETTLE)
        .with_context(|| format!("--snat false; router log:\n{}", router.logs()))?;
    let stats = ping(&user_ns, lan_host, 5, "0.2")?;
    ensure!(stats.received == 5, "{stats:?}");
    ensure!(
        echo_count(&lan_ns, "from_user")? >= 5,
        "the LAN host sees the member's ULA"
    );
    router.stop()?;
    ensure!(sysctl(&router_ns, forwarding)? == forwarding_before);

    // No nft on the PATH with --snat true: a clear error, nothing changed.
    let bin = tempfile::tempdir()?;
    let mut s = spec("router6", "router", &["--advertise-routes", &prefix]);
    s.env = vec![("PATH".into(), path_without_nft(bin.path())?)];
    let mut nonft = Joiner::spawn(&router_ns, &bed.coordinator.url(), &router_cert, s)?;
    let status = nonft.process().wait_exit(SETTLE)?;
    let log = nonft.logs();
    ensure!(!status.success(), "started without nft:\n{log}");
    ensure!(
        log.contains("install nftables") && log.contains("--snat false"),
        "the error names what to install:\n{log}"
    );
    ensure!(sysctl(&router_ns, forwarding)? == forwarding_before);
    ensure!(!has_table(&router_ns));
    Ok(())
}

/// Issue 15 (exit node): the relay connection is marked like the WireGuard socket. The user
/// can reach the exit node only through the relay's TLS stream (its router drops all UDP);
/// without the mark its TCP connection to the relay would follow the exit default route
/// into the tunnel, whose only path is that relay session: it could never come up.
#[test]
fn an_exit_node_user_keeps_its_relay_path() -> Result<()> {
    use tabbify_tests::labmesh::{relay_url, LabMesh, TAG};
    use tabbify_tests::natlab::RELAY;
    use tabbify_tests::{NatLab, RouterKind, Side};

    prerequisites()?;
    let lab = NatLab::new("rx-exit", RouterKind::UdpBlocked, RouterKind::None)?;
    let node = format!("tag:{TAG}");
    let policy = json!({
        "tags": [TAG],
        "routes": {"0.0.0.0/0": [node], "::/0": [node]},
        "allow": [{"src": [node], "dst": [node, "0.0.0.0/0", "::/0"]}],
    });
    let mesh = LabMesh::start_with_policy(&lab, 5, Vec::new(), policy)?;
    let _relay = mesh.start_relay(&lab)?;

    // The internet behind the exit node: reachable from nowhere else.
    let exit_ns = &lab.member(Side::Right).netns;
    let inet_ns = Netns::with_label("rx-exit-inet")?;
    let pair = VethPair::connect(exit_ns, &inet_ns, &VethOptions::default())?;
    inet_ns.ip(&["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"])?;
    exit_ns.ip(&[
        "route",
        "add",
        &format!("{INTERNET}/32"),
        "via",
        &pair.b.v4.to_string(),
    ])?;
    let user_ns = &lab.member(Side::Left).netns;
    ensure!(
        unreachable(user_ns, INTERNET)?,
        "the user has no route to the internet host of its own"
    );

    let mut exit_spec = mesh.spec("rx-exit1")?;
    exit_spec.relays = vec![relay_url()];
    exit_spec.extra_args = vec!["--advertise-exit-node".into()];
    let exit = mesh.join(exit_ns, exit_spec)?;
    let mut user_spec = mesh.spec("rx-user")?;
    user_spec.relays = vec![relay_url()];
    user_spec.extra_args = vec!["--exit-node".into(), "rx-exit1".into()];
    let mut user = mesh.join(user_ns, user_spec)?;

    user.wait_status("to hold its relay session", SETTLE, |s| {
        s.relays.iter().any(|r| r.session)
    })
    .with_context(|| {
        format!(
            "user log:
{}",
            user.logs()
        )
    })?;
    wait_ping(user_ns, INTERNET.parse()?, SETTLE).with_context(|| {
        format!(
            "the user through the exit node over the relay; exit log:
{}
user log:
{}",
            exit.logs(),
            user.logs()
        )
    })?;
    let stats = ping(user_ns, INTERNET.parse()?, 5, "0.2")?;
    ensure!(stats.received == 5, "{stats:?}");
    let (_, exit_ula) = peer_key(&user, "rx-exit1")?;
    let mesh_ping = ping(user_ns, exit_ula.parse()?, 3, "0.2")?;
    ensure!(mesh_ping.received == 3, "mesh ping: {mesh_ping:?}");
    let p = user
        .status()?
        .peers
        .into_iter()
        .find(|p| p.name == "rx-exit1")
        .context("rx-exit1 in status")?;
    ensure!(
        p.path == "relay",
        "UDP is blocked: the path must be the relay, is {}",
        p.path
    );
    // The relay connection leaves from the underlay address, not the tunnel's.
    let conns = user_ns.run(
        "ss",
        &[
            "-Htn",
            "state",
            "established",
            "dst",
            &format!("{RELAY}:443"),
        ],
    )?;
    let underlay = format!("{}:", lab.member(Side::Left).addr);
    ensure!(
        conns.lines().any(|l| l.contains(&underlay)),
        "no relay connection from {underlay}:
{conns}"
    );
    ensure!(user.status()?.registered, "the coordinator stays reachable");
    Ok(())
}

#[test]
fn two_routers_for_one_prefix_fail_over_when_the_primary_dies() -> Result<()> {
    prerequisites()?;
    let policy = json!({
        "tags": ["router", "user"],
        "routes": {"10.99.0.0/16": ["tag:router"]},
        "allow": [
            {"src": ["tag:user"], "dst": ["tag:router", "10.99.0.0/24"]},
            {"src": ["tag:router"], "dst": ["tag:user"]},
        ],
    });
    let bed = Testbed::start(policy, 1)?;
    let lan_ns = Netns::with_label("routes-joiner-lan2")?;
    lan_ns.ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"])?;
    let mut routers = Vec::new();
    for name in ["r1", "r2"] {
        let (ns, _) = bed.host()?;
        let pair = VethPair::connect(&ns, &lan_ns, &VethOptions::default())?;
        ns.ip(&[
            "route",
            "add",
            "10.99.0.0/24",
            "via",
            &pair.b.v4.to_string(),
        ])?;
        routers.push(bed.join(
            &ns,
            spec(name, "router", &["--advertise-routes", "10.99.0.0/24"]),
        )?);
    }
    let (user_ns, _) = bed.host()?;
    let user = bed.join(&user_ns, spec("user3", "user", &[]))?;
    wait_ping(&user_ns, "10.99.0.1".parse()?, SETTLE)
        .with_context(|| format!("user3 log:\n{}", user.logs()))?;

    // The primary is the one the traffic goes through.
    let tx = |name: &str| -> Result<u64> {
        Ok(user
            .peers()?
            .iter()
            .find(|p| p.name == name)
            .map_or(0, |p| p.tx_bytes))
    };
    let before = (tx("r1")?, tx("r2")?);
    let stats = ping(&user_ns, "10.99.0.1".parse()?, 20, "0.05")?;
    ensure!(stats.received == 20, "{stats:?}");
    let after = (tx("r1")?, tx("r2")?);
    let primary = if after.0 - before.0 > after.1 - before.1 {
        0
    } else {
        1
    };

    let mut pinger = Pinger::start(&user_ns, "10.99.0.1".parse()?, "0.05")?;
    pinger.wait_reply_after(unix_now(), Duration::from_secs(5))?;
    let killed_at = unix_now();
    routers[primary].process().signal(9)?;
    pinger
        .wait_reply_after(killed_at, SETTLE)
        .with_context(|| format!("no failover; user3 log:\n{}", user.logs()))?;
    let resumed = pinger
        .answered_sends()
        .into_iter()
        .filter(|&s| s > killed_at)
        .fold(f64::INFINITY, f64::min);
    println!(
        "failover: traffic to 10.99.0.0/24 resumed through r{} {:.3} s after SIGKILL of r{}",
        2 - primary,
        resumed - killed_at,
        primary + 1
    );
    Ok(())
}

/// Whether a TCP transfer of a few bytes from `from` to `to_addr:port` (served in `to`)
/// completes within `within`; a refused or silently dropped connection is `false`.
fn tcp_reaches(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    port: u16,
    within: Duration,
) -> Result<bool> {
    use tabbify_tests::process::Process;
    let xfer = tabbify_tests::bins::tabbify_xfer()?;
    let mut receiver = Process::spawn(to.clone(), &format!("rp-recv-{port}"), {
        let mut c = to.command(&xfer);
        c.args(["recv", &port.to_string()]);
        c
    })?;
    receiver.wait_for_log("LISTENING", Duration::from_secs(10))?;
    let target = std::net::SocketAddr::new(to_addr, port);
    let mut sender = Process::spawn(from.clone(), &format!("rp-send-{port}"), {
        let mut c = from.command(&xfer);
        c.args(["send", &target.to_string(), "4096", "7"]);
        c
    })?;
    let sent = matches!(sender.wait_exit(within), Ok(s) if s.success());
    let received = sent && matches!(receiver.wait_exit(within), Ok(s) if s.success());
    Ok(sent && received)
}

fn drop_total(j: &Joiner) -> Result<u64> {
    Ok(j.status()?.drops.values().sum())
}

/// The brief's prefix-only member: its only rule is a prefix destination, so the
/// coordinator gives it the router with empty ports (route-only visibility). Through a
/// router that is also a concentrator (routed filter and client filters side by side), it
/// reaches the LAN on IPv4 and IPv6, never the router's own ports; the LAN cannot open
/// anything towards it.
#[test]
fn a_prefix_rule_alone_reaches_the_lan_through_a_concentrating_router() -> Result<()> {
    prerequisites()?;
    let policy = json!({
        "tags": ["router", "laptop", "phone", "web"],
        "routes": {"10.77.0.0/16": ["tag:router"], "fd77::/16": ["tag:router"]},
        "allow": [
            {"src": ["tag:laptop"], "dst": ["10.77.0.0/16", "fd77::/16"]},
            {"src": ["tag:web"], "dst": [
                format!("10.77.0.0/16:tcp:{WEB_PORT}"),
                format!("fd77::/16:tcp:{WEB_PORT}"),
            ]},
        ],
    });
    let bed = Testbed::start(policy, 1)?;
    let (router_ns, _) = bed.host()?;
    let lan_ns = Netns::with_label("rp-prefix-lan")?;
    let pair = VethPair::connect(&router_ns, &lan_ns, &VethOptions::default())?;
    let o = pair.b.v4.octets();
    let prefix4 = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    let seg = pair.b.v6.segments();
    let prefix6 = format!("{:x}:{:x}:{:x}:{:x}::/64", seg[0], seg[1], seg[2], seg[3]);
    let (lan4, lan6) = (IpAddr::V4(pair.b.v4), IpAddr::V6(pair.b.v6));

    let routes = format!("{prefix4},{prefix6}");
    let mut router = bed.join(
        &router_ns,
        spec(
            "rp-router",
            "router",
            &["--advertise-routes", &routes, "--concentrator"],
        ),
    )?;
    // A served client: the concentrator's forwarding checks are live beside the grants.
    let minted = bed.admin.request(
        "POST",
        "/v1/clients",
        Some(&json!({"name": "rp-phone1", "tags": ["phone"]})),
    )?;
    ensure!(minted.status == 201, "minting: {minted:?}");
    router
        .wait_status("to serve rp-phone1", SETTLE, |s| {
            s.concentrator
                .as_ref()
                .is_some_and(|c| c.serving.len() == 1)
        })
        .with_context(|| format!("router log:\n{}", router.logs()))?;

    let (laptop_ns, _) = bed.host()?;
    let mut laptop = bed.join(&laptop_ns, spec("rp-laptop", "laptop", &[]))?;
    laptop.wait_peer_names(&["rp-router"], SETTLE)?;
    let p = laptop
        .peers()?
        .into_iter()
        .find(|p| p.name == "rp-router")
        .context("rp-router in the laptop's peers")?;
    ensure!(
        p.ports.is_empty(),
        "route-only visibility gives the router no ports: {:?}",
        p.ports
    );

    // The LAN, both families: ping and TCP.
    for lan in [lan4, lan6] {
        wait_ping(&laptop_ns, lan, SETTLE).with_context(|| {
            format!(
                "rp-laptop reaching {lan}; router log:\n{}\nlaptop log:\n{}",
                router.logs(),
                laptop.logs()
            )
        })?;
        let stats = ping(&laptop_ns, lan, 5, "0.2")?;
        ensure!(stats.received == 5, "{lan}: {stats:?}");
    }
    let xfer = tabbify_tests::bins::tabbify_xfer()?;
    for lan in [lan4, lan6] {
        tcp_transfer(
            &xfer,
            &laptop_ns,
            &lan_ns,
            lan,
            1 << 20,
            Duration::from_secs(30),
        )?;
    }

    // The router's own ports: nothing.
    let router_ula = IpAddr::V6(router.status()?.ula);
    ensure!(
        unreachable(&laptop_ns, &router_ula.to_string())?,
        "the laptop pinged the router's ULA"
    );
    ensure!(
        !tcp_reaches(
            &laptop_ns,
            &router_ns,
            router_ula,
            24_801,
            Duration::from_secs(3)
        )?,
        "the laptop opened a TCP connection to the router's ULA"
    );

    // The LAN towards the laptop: nothing opens (the LAN routes the mesh to the router).
    lan_ns.ip(&[
        "-6",
        "route",
        "add",
        "fd5a:1f00::/32",
        "via",
        &pair.a.v6.to_string(),
    ])?;
    lan_ns.ip(&[
        "route",
        "add",
        "100.64.0.0/10",
        "via",
        &pair.a.v4.to_string(),
    ])?;
    let status = laptop.status()?;
    let laptop_ula = IpAddr::V6(status.ula);
    let laptop_v4 = status.routes.ipv4.context("the laptop's mesh IPv4")?;
    let drops_before = drop_total(&router)?;
    for target in [laptop_ula, IpAddr::V4(laptop_v4)] {
        ensure!(
            unreachable(&lan_ns, &target.to_string())?,
            "the LAN host pinged the laptop at {target}"
        );
        ensure!(
            !tcp_reaches(&lan_ns, &laptop_ns, target, 24_802, Duration::from_secs(3))?,
            "the LAN host opened a TCP connection to the laptop at {target}"
        );
    }
    let drops = drop_total(&router)?;
    ensure!(
        drops >= drops_before + 4,
        "the router dropped the LAN's attempts: {drops} drops, {drops_before} before; {:?}",
        router.status()?.drops
    );
    // And the laptop still reaches the LAN afterwards.
    let stats = ping(&laptop_ns, lan4, 3, "0.2")?;
    ensure!(stats.received == 3, "{stats:?}");

    // Ports on the prefix: `rp-web` may open only TCP WEB_PORT inside the LAN.
    let (web_ns, _) = bed.host()?;
    let mut web = bed.join(&web_ns, spec("rp-web", "web", &[]))?;
    web.wait_peer_names(&["rp-router"], SETTLE)?;
    for lan in [lan4, lan6] {
        let t0 = std::time::Instant::now();
        while !tcp_reaches(&web_ns, &lan_ns, lan, WEB_PORT, Duration::from_secs(3))? {
            ensure!(
                t0.elapsed() < SETTLE,
                "rp-web never reached {lan}:{WEB_PORT}; router log:\n{}\nweb log:\n{}",
                router.logs(),
                web.logs()
            );
        }
        ensure!(
            !tcp_reaches(&web_ns, &lan_ns, lan, WEB_PORT + 1, Duration::from_secs(3))?,
            "rp-web opened {lan}:{} (not in its rule)",
            WEB_PORT + 1
        );
        ensure!(
            unreachable(&web_ns, &lan.to_string())?,
            "rp-web pinged {lan} (a port-limited route carries no ICMP echo)"
        );
    }
    let drops = web.status()?.drops;
    ensure!(
        drops.get("filtered_out").copied().unwrap_or(0) >= 2,
        "rp-web's own routed filter dropped the other port and the pings: {drops:?}"
    );
    Ok(())
}

/// The TCP port `rp-web` may open inside the LAN (`a_prefix_rule_alone_…`).
const WEB_PORT: u16 = 24_803;
