//! The NAT lab: two members, each behind a router of a chosen [`RouterKind`], on an
//! "internet" of benchmark-space addresses (RFC 2544, 198.18.0.0/15, never routed on the
//! real internet), where a coordinator, a relay or a reflector runs.
//!
//! ```text
//!   internet ns: br0 198.18.0.1/24 (HUB: coordinator, reflector)
//!                    198.18.0.2/24 (RELAY: TCP 443 stays open through UdpBlocked)
//!                    198.18.0.3/24 (RELAY2: a second relay, for members with different
//!                                   home relays)
//!     ├── None:               member wan0 198.18.0.N                       (public address)
//!     ├── EndpointIndependent router wan0 198.18.0.N ── lan0 192.168.S.1 ── member eth0 .2
//!     ├── EndpointDependent   router wan0 198.18.0.N ── lan0 192.168.S.1 ── member eth0 .2
//!     ├── UdpBlocked          router wan0 198.18.0.N ── lan0 192.168.S.1 ── member eth0 .2
//!     └── Double              outer wan0 198.18.0.N ── lan0 100.64.S.1
//!                             inner wan0 100.64.S.2 ── lan0 192.168.S.1 ── member eth0 .2
//! ```
//! S is 1 on the left and 2 on the right, so the two private LANs never look alike.
//!
//! Each router has the nftables table `tbt_nat`:
//! * `postrouting`: `masquerade` on `wan0` (Linux keeps the source port when it is free:
//!   an endpoint-independent, port-preserving mapping), or for
//!   [`RouterKind::EndpointDependent`] `masquerade random,fully-random` (a fresh random
//!   port for every new 5-tuple: a "symmetric" NAT);
//! * `input` and `forward`: drop connections that arrive new on `wan0` (only replies to
//!   the member's own traffic come in; see [`crate::nat`] for why `input` too).
//!
//! [`RouterKind::UdpBlocked`] is an endpoint-independent router that also has the table
//! `tbt_block` (forward, input and output hooks): every UDP packet is dropped both ways,
//! and TCP passes only to and from [`RELAY`] port 443 and the coordinator
//! ([`HUB`] port [`crate::testbed::COORDINATOR_PORT`]); ICMP passes, so reachability can
//! still be checked with ping. [`NatLab::insert_udp_block`] and
//! [`NatLab::lift_udp_block`] add and delete that table at runtime on any side (on the
//! outermost router, or in the member's own namespace for [`RouterKind::None`]).
//!
//! [`NatLab::move_member`] gives a member a new underlay address the way a roaming device
//! gets one: its own interface address changes (a netlink `RTM_NEWADDR` then
//! `RTM_DELADDR` in its namespace), and behind a NAT the outermost router's public
//! address changes too, which makes the kernel forget that router's masquerade mappings.
//!
//! Invariants: every namespace is a [`Netns`] named after the lab and its role, so names
//! are unique and everything, links included, is removed when the [`NatLab`] drops, also
//! while a failing test unwinds; addresses are handed out once per lab; only the lab's
//! own namespaces carry traffic.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::process::Process;
use crate::veth::create_pair;

/// The internet namespace's own address: where the coordinator and the reflector listen.
pub const HUB: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The relay's address, also in the internet namespace: TCP 443 to it passes
/// [`RouterKind::UdpBlocked`].
pub const RELAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A second relay's address in the internet namespace (members homed at different
/// relays). [`RouterKind::UdpBlocked`] does not let TCP to it through.
pub const RELAY2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The relay's TCP port that [`RouterKind::UdpBlocked`] lets through.
pub const RELAY_TCP_PORT: u16 = 443;
/// The first address handed to a router's or public member's WAN link.
const FIRST_PUBLIC_HOST: u8 = 10;
/// The bridge inside the internet namespace.
const BRIDGE: &str = "br0";
/// The bridge's fixed MAC address (locally administered): see [`crate::lan`] for why.
const BRIDGE_MAC: &str = "02:00:c6:12:00:01";
/// A router's (or a public member's) link into the internet.
const WAN_IF: &str = "wan0";
/// A router's link towards the member (or the inner router).
const LAN_IF: &str = "lan0";
/// The member's link to its router.
const MEMBER_IF: &str = "eth0";

/// What sits between a member and the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouterKind {
    /// Nothing: the member has a public address.
    None,
    /// Masquerade keeping ports: one mapping per source whatever the destination.
    EndpointIndependent,
    /// `masquerade random,fully-random`: a new mapped port for every destination.
    EndpointDependent,
    /// Two endpoint-independent routers in a row (a home router behind a carrier NAT).
    Double,
    /// An endpoint-independent router that drops all UDP and lets TCP through only to
    /// the relay's port 443 and the coordinator.
    UdpBlocked,
}

impl RouterKind {
    /// Every kind, in the order the matrix prints them.
    pub const ALL: [RouterKind; 5] = [
        RouterKind::None,
        RouterKind::EndpointIndependent,
        RouterKind::EndpointDependent,
        RouterKind::Double,
        RouterKind::UdpBlocked,
    ];

    /// A short name for tables and namespace labels.
    pub fn short(self) -> &'static str {
        match self {
            RouterKind::None => "none",
            RouterKind::EndpointIndependent => "eim",
            RouterKind::EndpointDependent => "edm",
            RouterKind::Double => "double",
            RouterKind::UdpBlocked => "udp-blocked",
        }
    }

    /// Whether a member behind this kind can take part in a direct (hole-punched) path:
    /// not behind an endpoint-dependent mapping and not with UDP blocked. Issue 13 wants
    /// a pair direct exactly when both sides can.
    pub fn allows_direct(self) -> bool {
        !matches!(self, RouterKind::EndpointDependent | RouterKind::UdpBlocked)
    }

    /// Whether a pair of members behind `self` and `other` should end up on a direct path.
    /// Issue 13's rule is "direct exactly when both sides allow it" ([`Self::allows_direct`]),
    /// with one deliberate exception: a member behind an endpoint-dependent NAT reaches a
    /// member with a public address (kind `None`, nothing filters its inbound UDP) directly —
    /// the public side learns the NAT's per-destination port from the first authenticated
    /// datagram, as WireGuard's roaming does — and relaying a pair that works directly would
    /// only cost throughput. Tailscale and NetBird go direct in that case too.
    pub fn pair_is_direct(self, other: RouterKind) -> bool {
        use RouterKind::{EndpointDependent as Edm, None as Public};
        match (self, other) {
            (Edm, Public) | (Public, Edm) => true,
            _ => self.allows_direct() && other.allows_direct(),
        }
    }

    /// Whether the member's traffic is translated at all.
    pub fn is_nat(self) -> bool {
        self != RouterKind::None
    }
}

impl std::fmt::Display for RouterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short())
    }
}

/// One of the lab's two members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first member (private subnet 1).
    Left,
    /// The second member (private subnet 2).
    Right,
}

impl Side {
    fn subnet(self) -> u8 {
        match self {
            Side::Left => 1,
            Side::Right => 2,
        }
    }

    fn short(self) -> &'static str {
        match self {
            Side::Left => "l",
            Side::Right => "r",
        }
    }
}

/// A router namespace of the lab.
#[derive(Debug, Clone)]
pub struct Router {
    /// Its namespace.
    pub netns: Netns,
    /// The address of its WAN link (the translated source of everything behind it).
    pub wan_addr: Ipv4Addr,
    /// The address of its LAN link (the default gateway of what is behind it).
    pub lan_addr: Ipv4Addr,
}

/// A member: the namespace a joiner runs in, and the routers in front of it.
#[derive(Debug, Clone)]
pub struct Member {
    /// The member's namespace.
    pub netns: Netns,
    /// Its router kind.
    pub kind: RouterKind,
    /// Its interface (`wan0` with a public address, `eth0` behind a router).
    pub ifname: String,
    /// The address on that interface.
    pub addr: Ipv4Addr,
    /// The address the internet sees its traffic come from (equal to `addr` for
    /// [`RouterKind::None`]).
    pub public: Ipv4Addr,
    /// Its routers, outermost first (none for [`RouterKind::None`], two for
    /// [`RouterKind::Double`]).
    pub routers: Vec<Router>,
}

impl Member {
    /// The namespace where the side's internet-facing rules live: the outermost router,
    /// or the member itself when it has a public address.
    pub fn edge(&self) -> &Netns {
        self.routers
            .first()
            .map_or(&self.netns, |router| &router.netns)
    }

    /// Installs the UDP block (table `tbt_block`, see the module docs) on this member's
    /// internet-facing namespace. Replaces the table if it is there already.
    pub fn insert_udp_block(&self) -> Result<()> {
        install_block(self.edge())
    }

    /// Deletes the UDP block of this member (an error if there is none).
    pub fn lift_udp_block(&self) -> Result<()> {
        self.edge()
            .run("nft", &["delete", "table", "ip", "tbt_block"])
            .map(drop)
            .with_context(|| format!("lifting the UDP block of {}", self.netns.name()))
    }

    /// Packets each router has translated so far (its `masquerade` rule's counter),
    /// outermost first.
    pub fn translated_packets(&self) -> Result<Vec<u64>> {
        self.routers
            .iter()
            .map(|router| {
                let chain = router
                    .netns
                    .run("nft", &["list", "chain", "ip", "tbt_nat", "postrouting"])?;
                let line = chain
                    .lines()
                    .find(|line| line.contains("masquerade"))
                    .context("no masquerade rule")?;
                let mut words = line.split_whitespace();
                words
                    .find(|word| *word == "packets")
                    .and_then(|_| words.next())
                    .and_then(|count| count.parse().ok())
                    .with_context(|| format!("no packet counter in {line:?}"))
            })
            .collect()
    }

    /// The rules and connection tracking table of each router, for failure messages.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "member {} ({}) addr {} public {}\n",
            self.netns.name(),
            self.kind,
            self.addr,
            self.public
        );
        let mut namespaces: Vec<&Netns> = self.routers.iter().map(|r| &r.netns).collect();
        namespaces.push(&self.netns);
        for netns in namespaces {
            let rules = netns
                .run("nft", &["list", "ruleset"])
                .unwrap_or_else(|error| format!("<nft list failed: {error:#}>"));
            let conntrack = netns
                .run("cat", &["/proc/net/nf_conntrack"])
                .unwrap_or_else(|_| "<no /proc/net/nf_conntrack>".to_owned());
            text.push_str(&format!(
                "--- {}\n{rules}\nconntrack:\n{conntrack}\n",
                netns.name()
            ));
        }
        text
    }
}

/// The lab: the internet namespace and two members behind their routers.
#[derive(Debug)]
pub struct NatLab {
    /// The internet: [`HUB`], [`RELAY`] and [`RELAY2`] are its addresses; run the
    /// coordinator, relays or [`NatLab::start_reflector`] here.
    pub internet: Netns,
    /// The left member.
    pub left: Member,
    /// The right member.
    pub right: Member,
    /// Next host number on the internet /24.
    next_public: AtomicU8,
    /// Next host number on the private /24s (members start at .2).
    next_private: AtomicU8,
    /// Next private subnet number S for [`NatLab::add_member`] (1 and 2 are the sides').
    next_subnet: AtomicU8,
    /// The lab's name as it appears in namespace names.
    tag: String,
}

impl NatLab {
    /// Builds the internet and both sides; `name` goes into every namespace's name.
    /// Returns once both members reach [`HUB`] (by ping, which every kind lets through).
    pub fn new(name: &str, left: RouterKind, right: RouterKind) -> Result<NatLab> {
        let tag: String = name.chars().take(10).collect();
        let internet = Netns::with_label(&format!("nl-{tag}-inet"))?;
        internet
            .ip(&[
                "link",
                "add",
                BRIDGE,
                "address",
                BRIDGE_MAC,
                "type",
                "bridge",
                "forward_delay",
                "0",
            ])
            .context("creating the internet bridge")?;
        for addr in [HUB, RELAY, RELAY2] {
            internet.ip(&["addr", "add", &format!("{addr}/24"), "dev", BRIDGE])?;
        }
        internet.ip(&["link", "set", "dev", BRIDGE, "up"])?;
        let next_public = AtomicU8::new(FIRST_PUBLIC_HOST);
        let next_private = AtomicU8::new(3);
        let build = |side: Side, kind: RouterKind| {
            build_side(
                &internet,
                &next_public,
                &tag,
                side.short(),
                side.subnet(),
                kind,
            )
            .with_context(|| format!("building the {side:?} side ({kind})"))
        };
        let left = build(Side::Left, left)?;
        let right = build(Side::Right, right)?;
        let lab = NatLab {
            internet,
            left,
            right,
            next_public,
            next_private,
            next_subnet: AtomicU8::new(3),
            tag,
        };
        for member in [&lab.left, &lab.right] {
            crate::traffic::wait_ping(&member.netns, HUB.into(), Duration::from_secs(10))
                .with_context(|| format!("{} cannot reach the hub", member.netns.name()))?;
        }
        Ok(lab)
    }

    /// The member on `side`.
    pub fn member(&self, side: Side) -> &Member {
        match side {
            Side::Left => &self.left,
            Side::Right => &self.right,
        }
    }

    /// A further member behind a router of `kind`, on the same internet, with a private
    /// subnet of its own (192.168.S.0/24 and, for [`RouterKind::Double`], 100.64.S.0/24,
    /// S from 3 up): so one lab, one coordinator and one relay can serve many members
    /// (the matrix test). `label` (a few characters) goes into its namespaces' names.
    /// Returns once it reaches [`HUB`]. It is not movable with [`NatLab::move_member`].
    pub fn add_member(&self, label: &str, kind: RouterKind) -> Result<Member> {
        let subnet = self.next_subnet.fetch_add(1, Ordering::Relaxed);
        if subnet == 0 || subnet == 255 {
            bail!("the lab ran out of private subnets");
        }
        let member = build_side(
            &self.internet,
            &self.next_public,
            &self.tag,
            label,
            subnet,
            kind,
        )
        .with_context(|| format!("building member {label} ({kind})"))?;
        crate::traffic::wait_ping(&member.netns, HUB.into(), Duration::from_secs(10))
            .with_context(|| format!("{} cannot reach the hub", member.netns.name()))?;
        Ok(member)
    }

    /// The TCP destinations [`RouterKind::UdpBlocked`] lets through: the relay's port 443
    /// and the coordinator.
    pub fn allowed_tcp() -> [SocketAddrV4; 2] {
        [
            SocketAddrV4::new(RELAY, RELAY_TCP_PORT),
            SocketAddrV4::new(HUB, crate::testbed::COORDINATOR_PORT),
        ]
    }

    /// Installs the UDP block (table `tbt_block`, see the module docs) on `side`'s
    /// internet-facing namespace. Replaces the table if it is there already.
    pub fn insert_udp_block(&self, side: Side) -> Result<()> {
        self.member(side).insert_udp_block()
    }

    /// Deletes the UDP block on `side` (an error if there is none). Connections the
    /// block dropped are not resurrected; new packets pass at once.
    pub fn lift_udp_block(&self, side: Side) -> Result<()> {
        self.member(side)
            .lift_udp_block()
            .with_context(|| format!("on the {side:?} side"))
    }

    /// Gives `side`'s member a new underlay address: a new address on its own interface
    /// (added before the old one is deleted, so there is always one) and, behind a NAT,
    /// a new public address on the outermost router. Returns the new `(addr, public)`.
    /// Sockets bound to the wildcard address keep working; the peer sees a new source.
    pub fn move_member(&mut self, side: Side) -> Result<(Ipv4Addr, Ipv4Addr)> {
        let public = next_host(&self.next_public, [198, 18, 0])?;
        let private_host = self.next_private.fetch_add(1, Ordering::Relaxed);
        let member = match side {
            Side::Left => &mut self.left,
            Side::Right => &mut self.right,
        };
        if member.kind == RouterKind::None {
            renumber(&member.netns, WAN_IF, member.addr, public)?;
            member.addr = public;
            member.public = public;
        } else {
            let subnet = side.subnet();
            let private = Ipv4Addr::new(192, 168, subnet, private_host);
            renumber(&member.netns, MEMBER_IF, member.addr, private)?;
            member.netns.ip(&[
                "route",
                "replace",
                "default",
                "via",
                &Ipv4Addr::new(192, 168, subnet, 1).to_string(),
            ])?;
            let outer = member
                .routers
                .first_mut()
                .context("a NATed member without a router")?;
            renumber(&outer.netns, WAN_IF, outer.wan_addr, public)?;
            outer.wan_addr = public;
            member.addr = private;
            member.public = public;
        }
        crate::traffic::wait_ping(&member.netns, HUB.into(), Duration::from_secs(10))
            .with_context(|| {
                format!("{} cannot reach the hub after moving", member.netns.name())
            })?;
        Ok((member.addr, member.public))
    }

    /// Starts `tabbify-reflector` in the internet namespace on [`HUB`] at each of
    /// `udp_ports` (UDP) and at each of `tcp` (TCP); returns once it is listening.
    pub fn start_reflector(&self, udp_ports: &[u16], tcp: &[SocketAddrV4]) -> Result<Process> {
        let binary = crate::bins::locate(
            "tabbify-reflector",
            "TABBIFY_REFLECTOR_BIN",
            "cargo build -p tabbify-tests --bin tabbify-reflector",
        )?;
        let mut args: Vec<String> = Vec::new();
        for port in udp_ports {
            args.push("--udp".to_owned());
            args.push(SocketAddrV4::new(HUB, *port).to_string());
        }
        for addr in tcp {
            args.push("--tcp".to_owned());
            args.push(addr.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let binary = binary.to_str().context("non-UTF-8 binary path")?;
        let mut process = self.internet.spawn("reflector", binary, &args)?;
        process.wait_for_log("ready", Duration::from_secs(10))?;
        Ok(process)
    }
}

/// What a reflector said it saw: the source address of the probe, and where it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The source address as the reflector saw it (after every translation).
    pub source: SocketAddr,
    /// The reflector's address the probe reached.
    pub at: SocketAddr,
}

impl Seen {
    /// Parses a reflector line `SEEN <source> AT <local>`.
    pub fn parse(line: &str) -> Result<Seen> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("SEEN"), Some(source), Some("AT"), Some(at)) => Ok(Seen {
                source: source
                    .parse()
                    .with_context(|| format!("source in {line:?}"))?,
                at: at.parse().with_context(|| format!("address in {line:?}"))?,
            }),
            _ => bail!("not a reflector reply: {line:?}"),
        }
    }
}

/// Sends UDP probes from one socket (bound to `local_port`, 0 for any) in `netns` to each
/// of `targets`, retrying each up to five times (a retry waits 300 ms for the answer);
/// returns what the reflector saw per target, `None` where no answer came.
pub fn udp_probe(
    netns: &Netns,
    local_port: u16,
    targets: &[SocketAddr],
) -> Result<Vec<Option<Seen>>> {
    crate::inside::block_on(netns, || async move {
        let socket = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, local_port))
            .await
            .context("binding the probe socket")?;
        let mut results = Vec::new();
        for target in targets {
            let mut seen = None;
            'tries: for _ in 0..5 {
                socket
                    .send_to(b"probe", target)
                    .await
                    .context("sending a probe")?;
                let mut buf = [0u8; 512];
                let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
                loop {
                    match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                        Err(_) => break,
                        Ok(received) => {
                            let (len, from) = received.context("receiving a reply")?;
                            if from != *target {
                                continue;
                            }
                            let reply = std::str::from_utf8(&buf[..len])
                                .context("a reply that is not UTF-8")?;
                            seen = Some(Seen::parse(reply)?);
                            break 'tries;
                        }
                    }
                }
            }
            results.push(seen);
        }
        Ok(results)
    })
}

/// Opens a TCP connection from `netns` to `target` and reads the reflector's line;
/// `None` when no connection is made within `timeout` (a dropped SYN) or it is refused.
pub fn tcp_probe(netns: &Netns, target: SocketAddr, timeout: Duration) -> Result<Option<Seen>> {
    crate::inside::block_on(netns, || async move {
        use tokio::io::AsyncReadExt;
        let stream =
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
                Err(_) => return Ok(None),
                Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Ok(None)
                }
                Ok(Err(error)) => return Err(error).context("connecting"),
                Ok(Ok(stream)) => stream,
            };
        let mut line = String::new();
        let mut stream = stream;
        tokio::time::timeout(timeout, stream.read_to_string(&mut line))
            .await
            .context("no line from the reflector in time")?
            .context("reading the reflector's line")?;
        Seen::parse(line.trim()).map(Some)
    })
}

fn build_side(
    internet: &Netns,
    next_public: &AtomicU8,
    tag: &str,
    short: &str,
    subnet: u8,
    kind: RouterKind,
) -> Result<Member> {
    let label = |role: &str| format!("nl-{tag}-{short}{role}");
    let member_ns = Netns::with_label(&label("m"))?;
    let public = next_host(next_public, [198, 18, 0])?;
    if kind == RouterKind::None {
        plug_into_internet(internet, &member_ns, public)?;
        return Ok(Member {
            netns: member_ns,
            kind,
            ifname: WAN_IF.to_owned(),
            addr: public,
            public,
            routers: Vec::new(),
        });
    }
    let outer_ns = Netns::with_label(&label("r0"))?;
    plug_into_internet(internet, &outer_ns, public)?;
    let mut routers = Vec::new();
    let mut last = outer_ns.clone();
    if kind == RouterKind::Double {
        // The carrier NAT: outer router's LAN 100.64.S.0/24 (RFC 6598 shared space).
        let outer_lan = Ipv4Addr::new(100, 64, subnet, 1);
        let inner_wan = Ipv4Addr::new(100, 64, subnet, 2);
        let inner_ns = Netns::with_label(&label("r1"))?;
        link(&outer_ns, LAN_IF, outer_lan, &inner_ns, WAN_IF, inner_wan)?;
        install_nat(&outer_ns, RouterKind::EndpointIndependent)?;
        routers.push(Router {
            netns: outer_ns,
            wan_addr: public,
            lan_addr: outer_lan,
        });
        // The inner router's WAN address is filled in below with its LAN.
        routers.push(Router {
            netns: inner_ns.clone(),
            wan_addr: inner_wan,
            lan_addr: Ipv4Addr::UNSPECIFIED,
        });
        last = inner_ns;
    } else {
        routers.push(Router {
            netns: outer_ns.clone(),
            wan_addr: public,
            lan_addr: Ipv4Addr::UNSPECIFIED,
        });
    }
    let gateway = Ipv4Addr::new(192, 168, subnet, 1);
    let addr = Ipv4Addr::new(192, 168, subnet, 2);
    link(&last, LAN_IF, gateway, &member_ns, MEMBER_IF, addr)?;
    member_ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
    if let Some(router) = routers.last_mut() {
        router.lan_addr = gateway;
    }
    let nat_kind = match kind {
        RouterKind::EndpointDependent => RouterKind::EndpointDependent,
        _ => RouterKind::EndpointIndependent,
    };
    install_nat(&last, nat_kind)?;
    if kind == RouterKind::UdpBlocked {
        install_block(&last)?;
    }
    Ok(Member {
        netns: member_ns,
        kind,
        ifname: MEMBER_IF.to_owned(),
        addr,
        public,
        routers,
    })
}

/// A veth from `host`'s `wan0` (address `addr`/24) to a new port of the internet bridge.
fn plug_into_internet(internet: &Netns, host: &Netns, addr: Ipv4Addr) -> Result<()> {
    let port = format!("p{}", addr.octets()[3]);
    create_pair(host, WAN_IF, internet, &port)?;
    internet
        .ip(&["link", "set", "dev", &port, "master", BRIDGE, "up"])
        .with_context(|| format!("adding {port} to the internet bridge"))?;
    // Moving a member adds a second address and deletes the first: keep the second.
    host.write_sysfs(
        &format!("/proc/sys/net/ipv4/conf/{WAN_IF}/promote_secondaries"),
        "1",
    )?;
    host.ip(&["addr", "add", &format!("{addr}/24"), "dev", WAN_IF])?;
    host.ip(&["link", "set", "dev", WAN_IF, "up"])?;
    Ok(())
}

/// A veth between `a` (`a_if`, `a_addr`/24) and `b` (`b_if`, `b_addr`/24); `a` forwards.
fn link(
    a: &Netns,
    a_if: &str,
    a_addr: Ipv4Addr,
    b: &Netns,
    b_if: &str,
    b_addr: Ipv4Addr,
) -> Result<()> {
    create_pair(a, a_if, b, b_if)?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.write_sysfs(
            &format!("/proc/sys/net/ipv4/conf/{ifname}/promote_secondaries"),
            "1",
        )?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
        ns.ip(&["link", "set", "dev", ifname, "up"])?;
    }
    a.write_sysfs("/proc/sys/net/ipv4/ip_forward", "1")?;
    if b_if == WAN_IF {
        // An inner router: its default route is the outer router.
        b.ip(&["route", "add", "default", "via", &a_addr.to_string()])?;
    }
    Ok(())
}

/// Installs table `tbt_nat` (see the module docs) in router `netns`.
fn install_nat(netns: &Netns, kind: RouterKind) -> Result<()> {
    let masquerade = if kind == RouterKind::EndpointDependent {
        "masquerade random,fully-random"
    } else {
        "masquerade"
    };
    let rules = format!(
        "table ip tbt_nat {{\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   oifname \"{WAN_IF}\" counter {masquerade}\n\
         \x20 }}\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"{WAN_IF}\" ct state new counter drop\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         \x20   iifname \"{WAN_IF}\" ct state new counter drop\n\
         \x20 }}\n\
         }}\n"
    );
    load(netns, "nat.nft", &rules).context("installing the NAT rules")
}

/// Installs (or replaces) table `tbt_block` (see the module docs) in `netns`.
fn install_block(netns: &Netns) -> Result<()> {
    let [relay, coordinator] = NatLab::allowed_tcp();
    let mut chains = String::new();
    for hook in ["forward", "input", "output"] {
        chains.push_str(&format!(
            "  chain {hook} {{\n\
             \x20   type filter hook {hook} priority filter - 10; policy accept;\n\
             \x20   meta l4proto udp counter drop\n\
             \x20   ip daddr {ra} tcp dport {rp} accept\n\
             \x20   ip saddr {ra} tcp sport {rp} accept\n\
             \x20   ip daddr {ca} tcp dport {cp} accept\n\
             \x20   ip saddr {ca} tcp sport {cp} accept\n\
             \x20   meta l4proto tcp counter drop\n\
             \x20 }}\n",
            ra = relay.ip(),
            rp = relay.port(),
            ca = coordinator.ip(),
            cp = coordinator.port(),
        ));
    }
    // `add table` + `delete table` + the table: replaces an existing block atomically.
    let rules = format!(
        "add table ip tbt_block\ndelete table ip tbt_block\ntable ip tbt_block {{\n{chains}}}\n"
    );
    load(netns, "block.nft", &rules).context("installing the UDP block")
}

fn load(netns: &Netns, file: &str, rules: &str) -> Result<()> {
    let path = netns.workdir().join(file);
    std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
    let path = path.to_str().context("non-UTF-8 work directory")?;
    netns.run("nft", &["-f", path]).map(drop)
}

/// Adds `new`/24 to `ifname` in `netns`, then deletes `old`/24 (the interface promotes the
/// new address when the old primary goes).
fn renumber(netns: &Netns, ifname: &str, old: Ipv4Addr, new: Ipv4Addr) -> Result<()> {
    netns
        .ip(&["addr", "add", &format!("{new}/24"), "dev", ifname])
        .with_context(|| format!("adding {new} to {ifname}"))?;
    netns
        .ip(&["addr", "del", &format!("{old}/24"), "dev", ifname])
        .with_context(|| format!("deleting {old} from {ifname}"))?;
    Ok(())
}

fn next_host(counter: &AtomicU8, prefix: [u8; 3]) -> Result<Ipv4Addr> {
    let host = counter.fetch_add(1, Ordering::Relaxed);
    if host == 0 || host == 255 {
        bail!("the lab ran out of addresses");
    }
    let [a, b, c] = prefix;
    Ok(Ipv4Addr::new(a, b, c, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reflector_lines() {
        let seen = Seen::parse("SEEN 198.18.0.10:40000 AT 198.18.0.1:3478").unwrap();
        assert_eq!(seen.source, "198.18.0.10:40000".parse().unwrap());
        assert_eq!(seen.at, "198.18.0.1:3478".parse().unwrap());
        assert!(Seen::parse("SEEN 1.2.3.4:5").is_err());
        assert!(Seen::parse("HELLO 1.2.3.4:5 AT 1.2.3.4:6").is_err());
        assert!(Seen::parse("SEEN nonsense AT 1.2.3.4:6").is_err());
    }

    #[test]
    fn direct_only_without_edm_or_blocked_udp() {
        let direct: Vec<_> = RouterKind::ALL
            .iter()
            .filter(|kind| kind.allows_direct())
            .collect();
        assert_eq!(
            direct,
            [
                &RouterKind::None,
                &RouterKind::EndpointIndependent,
                &RouterKind::Double
            ]
        );
    }
}
