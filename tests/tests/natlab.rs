//! The NAT lab's routers behave as named, with plain UDP and TCP against a reflector in the
//! internet namespace (`tabbify-reflector`), before any mesh test relies on them.

use std::net::{SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tabbify_tests::natlab::{tcp_probe, udp_probe, Member, Seen, HUB, RELAY, RELAY_TCP_PORT};
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{NatLab, RouterKind, Side};

/// The reflector's two UDP ports on the hub.
const PORT_A: u16 = 3478;
const PORT_B: u16 = 3479;
/// How long a TCP connect may take before it counts as blocked.
const TCP_TIMEOUT: Duration = Duration::from_secs(2);

fn targets() -> [SocketAddr; 2] {
    [
        SocketAddrV4::new(HUB, PORT_A).into(),
        SocketAddrV4::new(HUB, PORT_B).into(),
    ]
}

fn tcp_targets() -> [SocketAddrV4; 2] {
    [
        SocketAddrV4::new(RELAY, RELAY_TCP_PORT),
        SocketAddrV4::new(HUB, RELAY_TCP_PORT),
    ]
}

fn start(lab: &NatLab) -> Result<tabbify_tests::Process> {
    lab.start_reflector(&[PORT_A, PORT_B], &tcp_targets())
}

/// One row of the matrix: what the reflector saw from one member.
struct Row {
    kind: RouterKind,
    addr: String,
    public: String,
    a: Option<Seen>,
    b: Option<Seen>,
    relay_tcp: Option<Seen>,
    other_tcp: Option<Seen>,
    translations: Vec<u64>,
}

fn observe(member: &Member, local_port: u16) -> Result<Row> {
    let seen = udp_probe(&member.netns, local_port, &targets())?;
    let [relay, other] = tcp_targets();
    Ok(Row {
        kind: member.kind,
        addr: member.addr.to_string(),
        public: member.public.to_string(),
        a: seen[0],
        b: seen[1],
        relay_tcp: tcp_probe(&member.netns, relay.into(), TCP_TIMEOUT)?,
        other_tcp: tcp_probe(&member.netns, other.into(), TCP_TIMEOUT)?,
        translations: member.translated_packets()?,
    })
}

fn show(seen: Option<Seen>) -> String {
    seen.map_or_else(|| "-".to_owned(), |seen| seen.source.to_string())
}

/// Checks a row against the behaviour its kind is named for.
fn check(row: &Row, member: &Member, local_port: u16) -> Result<&'static str> {
    let public: std::net::IpAddr = member.public.into();
    let context = || member.describe();
    let verdict = match row.kind {
        RouterKind::UdpBlocked => {
            ensure!(
                row.a.is_none() && row.b.is_none(),
                "UDP answered through the block\n{}",
                context()
            );
            "no UDP"
        }
        _ => {
            let (a, b) = (
                row.a
                    .with_context(|| format!("no UDP answer on {PORT_A}\n{}", context()))?,
                row.b
                    .with_context(|| format!("no UDP answer on {PORT_B}\n{}", context()))?,
            );
            ensure!(
                a.source.ip() == public && b.source.ip() == public,
                "seen from {} and {}, expected {public}",
                a.source,
                b.source
            );
            match row.kind {
                RouterKind::None => {
                    ensure!(
                        a.source.port() == local_port && b.source.port() == local_port,
                        "a public member's port was translated: {a:?} {b:?}"
                    );
                    "untranslated"
                }
                RouterKind::EndpointIndependent | RouterKind::Double => {
                    ensure!(
                        a.source.port() == b.source.port(),
                        "two mapped ports {} and {} behind an endpoint-independent NAT\n{}",
                        a.source.port(),
                        b.source.port(),
                        context()
                    );
                    ensure!(
                        a.source.port() == local_port,
                        "the mapping did not keep port {local_port}: {}",
                        a.source.port()
                    );
                    "same mapped port"
                }
                RouterKind::EndpointDependent => {
                    ensure!(
                        a.source.port() != b.source.port(),
                        "one mapped port {} for two destinations behind an \
                         endpoint-dependent NAT\n{}",
                        a.source.port(),
                        context()
                    );
                    "new port per destination"
                }
                RouterKind::UdpBlocked => unreachable!(),
            }
        }
    };
    let relay = row
        .relay_tcp
        .with_context(|| format!("TCP 443 to the relay did not connect\n{}", context()))?;
    ensure!(relay.source.ip() == public, "relay saw {}", relay.source);
    if row.kind == RouterKind::UdpBlocked {
        ensure!(
            row.other_tcp.is_none(),
            "TCP 443 to a non-relay address connected through the block"
        );
    } else {
        ensure!(
            row.other_tcp.is_some(),
            "TCP 443 to the hub failed for {}",
            row.kind
        );
    }
    let expected_routers = match row.kind {
        RouterKind::None => 0,
        RouterKind::Double => 2,
        _ => 1,
    };
    ensure!(
        row.translations.len() == expected_routers && row.translations.iter().all(|n| *n > 0),
        "translations per router {:?}, expected {expected_routers} routers each translating",
        row.translations
    );
    Ok(verdict)
}

#[test]
fn router_kinds_behave_as_named() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Nft, Tool::Ping])?;
    let pairs = [
        (RouterKind::None, RouterKind::EndpointIndependent),
        (RouterKind::EndpointDependent, RouterKind::Double),
        (RouterKind::UdpBlocked, RouterKind::EndpointIndependent),
    ];
    let mut table = vec![format!(
        "{:<12} {:<14} {:<14} {:<20} {:<20} {:<24} {:<16} {:<9} {:<8} {}",
        "kind",
        "member",
        "public",
        "udp :3478 seen",
        "udp :3479 seen",
        "mapping",
        "tcp relay:443",
        "other:443",
        "NATs",
        "translated"
    )];
    let mut covered = Vec::new();
    for (index, (left, right)) in pairs.into_iter().enumerate() {
        let lab = NatLab::new(&format!("kinds{index}"), left, right)?;
        let _reflector = start(&lab)?;
        for (n, side) in [Side::Left, Side::Right].into_iter().enumerate() {
            let member = lab.member(side);
            let local_port = 40_000 + u16::try_from(index * 2 + n)?;
            let row = observe(member, local_port)?;
            let verdict = check(&row, member, local_port)
                .with_context(|| format!("{} ({side:?} of lab {index})", row.kind))?;
            table.push(format!(
                "{:<12} {:<14} {:<14} {:<20} {:<20} {:<24} {:<16} {:<9} {:<8} {:?}",
                row.kind.short(),
                row.addr,
                row.public,
                show(row.a),
                show(row.b),
                verdict,
                if row.relay_tcp.is_some() {
                    "connects"
                } else {
                    "blocked"
                },
                if row.other_tcp.is_some() {
                    "connects"
                } else {
                    "blocked"
                },
                row.translations.len(),
                row.translations,
            ));
            covered.push(row.kind);
        }
    }
    println!("NAT lab router kinds (reflector on {HUB}, relay {RELAY}):");
    for line in &table {
        println!("{line}");
    }
    for kind in RouterKind::ALL {
        assert!(covered.contains(&kind), "{kind} not covered");
    }
    Ok(())
}

#[test]
fn udp_block_lifts_and_comes_back() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Nft, Tool::Ping])?;
    let lab = NatLab::new(
        "block",
        RouterKind::UdpBlocked,
        RouterKind::EndpointIndependent,
    )?;
    let _reflector = start(&lab)?;
    let answered = |side: Side, port: u16| -> Result<bool> {
        let seen = udp_probe(&lab.member(side).netns, port, &targets()[..1])?;
        Ok(seen[0].is_some())
    };
    assert!(!answered(Side::Left, 41_000)?, "blocked from the start");
    lab.lift_udp_block(Side::Left)?;
    assert!(answered(Side::Left, 41_001)?, "UDP passes once lifted");
    lab.insert_udp_block(Side::Left)?;
    assert!(!answered(Side::Left, 41_002)?, "blocked again");
    // Re-inserting replaces the table rather than failing or doubling it.
    lab.insert_udp_block(Side::Left)?;

    // The same on a side that started open.
    assert!(answered(Side::Right, 41_003)?);
    lab.insert_udp_block(Side::Right)?;
    assert!(!answered(Side::Right, 41_004)?, "inserted block drops UDP");
    let relay = SocketAddrV4::new(RELAY, RELAY_TCP_PORT).into();
    assert!(
        tcp_probe(&lab.right.netns, relay, TCP_TIMEOUT)?.is_some(),
        "TCP 443 to the relay still passes"
    );
    lab.lift_udp_block(Side::Right)?;
    assert!(answered(Side::Right, 41_005)?, "UDP passes once lifted");
    assert!(
        lab.lift_udp_block(Side::Right).is_err(),
        "lifting twice is an error, not a silent no-op"
    );
    Ok(())
}

#[test]
fn moved_member_is_seen_at_its_new_address() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Nft, Tool::Ping])?;
    let mut lab = NatLab::new("move", RouterKind::None, RouterKind::Double)?;
    let _reflector = start(&lab)?;
    for (n, side) in [Side::Left, Side::Right].into_iter().enumerate() {
        let port = 42_000 + u16::try_from(n)?;
        let before = udp_probe(&lab.member(side).netns, port, &targets()[..1])?[0]
            .context("no answer before the move")?;
        let (old_addr, old_public) = (lab.member(side).addr, lab.member(side).public);
        let (addr, public) = lab.move_member(side)?;
        assert_ne!(addr, old_addr);
        assert_ne!(public, old_public);
        let listed = lab.member(side).netns.ip(&[
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            &lab.member(side).ifname,
        ])?;
        assert!(listed.contains(&format!("{addr}/24")), "{listed}");
        assert!(!listed.contains(&format!("{old_addr}/")), "{listed}");
        let after = udp_probe(&lab.member(side).netns, port, &targets()[..1])?[0]
            .context("no answer after the move")?;
        assert_eq!(before.source.ip(), std::net::IpAddr::from(old_public));
        assert_eq!(after.source.ip(), std::net::IpAddr::from(public));
    }
    Ok(())
}

fn lab_namespaces(tag: &str) -> Result<Vec<String>> {
    let list = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            name.starts_with(&format!("tbt-{}-", std::process::id()))
                && name.contains(&format!("-nl-{tag}-"))
        })
        .map(str::to_owned)
        .collect())
}

#[test]
fn lab_goes_away_on_drop_and_on_panic() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Nft, Tool::Ping])?;
    let lab = NatLab::new("gone", RouterKind::Double, RouterKind::UdpBlocked)?;
    // internet + (member, two routers) + (member, one router)
    assert_eq!(
        lab_namespaces("gone")?.len(),
        6,
        "{:?}",
        lab_namespaces("gone")?
    );
    drop(lab);
    assert!(lab_namespaces("gone")?.is_empty());

    let outcome = std::panic::catch_unwind(|| {
        let _lab = NatLab::new("panic", RouterKind::EndpointDependent, RouterKind::None).unwrap();
        assert_eq!(lab_namespaces("panic").unwrap().len(), 4);
        panic!("deliberate panic with a lab alive");
    });
    assert!(outcome.is_err());
    assert!(lab_namespaces("panic")?.is_empty());
    Ok(())
}
