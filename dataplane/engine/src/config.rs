//! The wg-quick configuration file (`[Interface]` + `[Peer]` sections) and WireGuard keys.
//!
//! [`Config::parse`] turns the text into plain structs, validated once: every key is
//! 32 bytes, every prefix is in range, every endpoint is a literal socket address, every
//! peer has a distinct public key. Any problem is a [`ConfigError`] naming the line and the
//! field. Keys understood only by `wg-quick` itself (DNS, Table, PreUp, PostUp, PreDown,
//! PostDown, SaveConfig) are accepted and listed in [`Config::ignored`] so the caller can
//! warn; any other unknown key is an error.
//!
//! Syntax, as `wg` and `wg-quick` read it: `#` starts a comment anywhere on a line; section
//! names and keys are case-insensitive; whitespace around keys, values and list items is
//! ignored; list keys (Address, AllowedIPs) take comma-separated items and may repeat.
//!
//! Normalisation: AllowedIPs are stored with host bits cleared (as routes); interface
//! Addresses keep them (`10.0.0.1/24` is an address, not a network).
//! `PersistentKeepalive = 0` and `= off` both mean disabled (`None`).
//!
//! Port rules (a tabbify extension, not read by `wg-quick`): `[Peer]` keys
//! `AllowedPortsOut` (ports ON THE PEER that we may open) and `AllowedPortsIn` (ports ON US
//! that the peer may open) take comma-separated items `tcp:N`, `udp:N`, `N` (both
//! protocols), ranges `N-M` / `tcp:N-M` / `udp:N-M`, or the single word `none`; they may
//! repeat. A peer with neither key has no filter (every packet passes, untracked, as with
//! `wg-quick`); a peer with one of them gets a [`PortFilter`] with connection tracking, the
//! absent direction allowing every port. See [`PeerSection::port_filter`].
//!
//! Endpoints must be IP literals (`192.0.2.1:51820`, `[2001:db8::1]:51820`): the data
//! plane has no resolver policy, so a DNS name is rejected with an error that says so.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::core::filter::{PortFilter, Proto};
use crate::core::net::IpNet;

/// A 32-byte WireGuard key (private, public or preshared), printed as base64 like `wg`.
///
/// `Debug` prints the base64 text; types that hold secret keys implement `Debug` by hand
/// and redact them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

/// Why a key did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not valid base64.
    #[error("not valid base64 ({0})")]
    BadBase64(String),
    /// The text is not valid hex.
    #[error("not valid hex ({0})")]
    BadHex(String),
    /// The decoded key is not 32 bytes long.
    #[error("wrong length ({0} bytes, expected 32)")]
    WrongLength(usize),
}

impl Key {
    /// Decodes standard base64 (44 characters with one `=`), as `wg genkey` prints.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let bytes = BASE64
            .decode(s.trim())
            .map_err(|e| KeyError::BadBase64(e.to_string()))?;
        Self::from_slice(&bytes)
    }

    /// Decodes 64 hex digits, as the UAPI carries keys.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(s).map_err(|e| KeyError::BadHex(e.to_string()))?;
        Self::from_slice(&bytes)
    }

    /// The base64 text, as `wg` prints it.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// The 64 lowercase hex digits, as the UAPI carries keys.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether every byte is zero (the UAPI's "no key").
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }

    fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        <[u8; 32]>::try_from(bytes)
            .map(Self)
            .map_err(|_| KeyError::WrongLength(bytes.len()))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.to_base64())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl FromStr for Key {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

/// A fresh X25519 private key from the OS random generator, clamped as `wg genkey` prints it.
pub fn generate_private_key() -> Key {
    use rand_core::RngCore as _;
    let mut k = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut k);
    Key(clamp(k))
}

/// The X25519 public key of a private key (`wg pubkey`). Clamping is applied to the
/// scalar, so an unclamped private key yields the same public key as its clamped form.
pub fn public_key(private: &Key) -> Key {
    let secret = boringtun::x25519::StaticSecret::from(private.0);
    Key(boringtun::x25519::PublicKey::from(&secret).to_bytes())
}

fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

/// A parsed wg-quick file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The `[Interface]` section.
    pub interface: InterfaceConfig,
    /// The `[Peer]` sections, in file order; public keys are distinct.
    pub peers: Vec<PeerSection>,
    /// wg-quick-only keys that were accepted but are not acted on, in file order.
    pub ignored: Vec<IgnoredKey>,
}

/// The `[Interface]` section.
#[derive(Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// `PrivateKey` (required).
    pub private_key: Key,
    /// `ListenPort`; `None` (or 0) means an ephemeral port.
    pub listen_port: Option<u16>,
    /// `Address` entries, host bits kept, in file order.
    pub addresses: Vec<IpNet>,
    /// `MTU` (576..=65535).
    pub mtu: Option<u16>,
    /// `FwMark`; `None` when absent, `off` or 0.
    pub fwmark: Option<u32>,
}

impl fmt::Debug for InterfaceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterfaceConfig")
            .field("private_key", &"<redacted>")
            .field("public_key", &public_key(&self.private_key))
            .field("listen_port", &self.listen_port)
            .field("addresses", &self.addresses)
            .field("mtu", &self.mtu)
            .field("fwmark", &self.fwmark)
            .finish()
    }
}

/// One `[Peer]` section.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerSection {
    /// `PublicKey` (required, unique in the file).
    pub public_key: Key,
    /// `PresharedKey`.
    pub preshared_key: Option<Key>,
    /// `AllowedIPs`, host bits cleared, in file order (duplicates kept as written).
    pub allowed_ips: Vec<IpNet>,
    /// `Endpoint`, an IP literal and port.
    pub endpoint: Option<SocketAddr>,
    /// `PersistentKeepalive` in seconds; `None` when absent, `off` or 0.
    pub persistent_keepalive: Option<u16>,
    /// `AllowedPortsOut` (tabbify extension): ports on the peer we may open, in file
    /// order; `None` when absent, empty for `none`.
    pub allowed_ports_out: Option<Vec<PortRule>>,
    /// `AllowedPortsIn` (tabbify extension): ports on us the peer may open.
    pub allowed_ports_in: Option<Vec<PortRule>>,
}

impl PeerSection {
    /// The peer's packet filter: `None` (no filter, no tracking) when the section has
    /// neither `AllowedPortsOut` nor `AllowedPortsIn`; otherwise the rules as the joiner
    /// builds them from a roster ([`PortFilter::from_rules`]), a direction without its key
    /// allowing all traffic.
    pub fn port_filter(&self) -> Option<PortFilter> {
        if self.allowed_ports_out.is_none() && self.allowed_ports_in.is_none() {
            return None;
        }
        let all = [PortRule::ALL.tuple()];
        let dir = |d: &Option<Vec<PortRule>>| match d {
            Some(rules) => rules.iter().map(|r| r.tuple()).collect::<Vec<_>>(),
            None => all.to_vec(),
        };
        Some(PortFilter::from_rules(
            &dir(&self.allowed_ports_out),
            &dir(&self.allowed_ports_in),
        ))
    }
}

/// One `AllowedPorts*` item: a protocol and an inclusive port range (`first <= last`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// TCP, UDP or both (no prefix).
    pub proto: Proto,
    /// First port.
    pub first: u16,
    /// Last port (inclusive, `>= first`).
    pub last: u16,
}

impl PortRule {
    /// Every port, both protocols.
    pub const ALL: PortRule = PortRule {
        proto: Proto::Both,
        first: 0,
        last: 65535,
    };

    /// The `(protocol, first, last)` form [`PortFilter::from_rules`] takes.
    pub fn tuple(&self) -> (Proto, u16, u16) {
        (self.proto, self.first, self.last)
    }
}

impl fmt::Display for PortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            Proto::Tcp => f.write_str("tcp:")?,
            Proto::Udp => f.write_str("udp:")?,
            Proto::Both => {}
        }
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRule {
    type Err = ConfigErrorReason;

    /// `tcp:N`, `udp:N`, `N`, `N-M`, `tcp:N-M`, `udp:N-M` (prefix case-insensitive, ports
    /// decimal 0..=65535, `N <= M`).
    fn from_str(item: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigErrorReason::BadPortRule(item.to_string());
        let (proto, rest) = match item.split_once(':') {
            Some((p, rest)) if p.trim().eq_ignore_ascii_case("tcp") => (Proto::Tcp, rest),
            Some((p, rest)) if p.trim().eq_ignore_ascii_case("udp") => (Proto::Udp, rest),
            Some(_) => return Err(bad()),
            None => (Proto::Both, item),
        };
        let port = |s: &str| {
            let s = s.trim();
            // Digits only: `u16::from_str` would also accept a leading `+`.
            if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse::<u16>().ok()
        };
        let (first, last) = match rest.split_once('-') {
            Some((a, b)) => (port(a).ok_or_else(bad)?, port(b).ok_or_else(bad)?),
            None => {
                let p = port(rest).ok_or_else(bad)?;
                (p, p)
            }
        };
        if first > last {
            return Err(ConfigErrorReason::ReversedPortRange(item.to_string()));
        }
        Ok(PortRule { proto, first, last })
    }
}

impl fmt::Debug for PeerSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerSection")
            .field("public_key", &self.public_key)
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .field("allowed_ips", &self.allowed_ips)
            .field("endpoint", &self.endpoint)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("allowed_ports_out", &self.allowed_ports_out)
            .field("allowed_ports_in", &self.allowed_ports_in)
            .finish()
    }
}

/// A wg-quick-only key that was accepted and not acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredKey {
    /// 1-based line number.
    pub line: usize,
    /// The key as written in the file.
    pub key: String,
    /// The value as written (trimmed, comment removed).
    pub value: String,
}

/// A configuration error: `line N: Field: reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {field}: {reason}")]
pub struct ConfigError {
    /// 1-based line number the problem is on (for a missing key: the section header).
    pub line: usize,
    /// The key or section the problem is about, as the file format names it.
    pub field: String,
    /// What is wrong.
    pub reason: ConfigErrorReason,
}

/// What is wrong on a line of a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigErrorReason {
    /// A key did not decode.
    #[error("{0}")]
    Key(#[from] KeyError),
    /// An address or prefix is not an IP address.
    #[error("`{0}` is not an IP address")]
    BadAddress(String),
    /// A prefix length is not a number or too long for its family.
    #[error("prefix length {len} out of range in `{item}` (0-{max} for {family})")]
    PrefixLenOutOfRange {
        /// The list item as written.
        item: String,
        /// The length as written.
        len: String,
        /// The family's maximum.
        max: u8,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// A list contains an empty item (`a,,b` or a trailing comma).
    #[error("empty list item")]
    EmptyItem,
    /// A number is malformed or out of range.
    #[error("`{value}` is not a number in {range}")]
    BadNumber {
        /// The value as written.
        value: String,
        /// The accepted range, in words.
        range: &'static str,
    },
    /// An endpoint is a host name rather than an IP literal.
    #[error("`{0}` is a host name; DNS names are not supported (the data plane has no resolver policy), use an IP address")]
    HostName(String),
    /// An endpoint is not `ip:port` / `[ipv6]:port`.
    #[error("`{0}` is not `ipv4:port` or `[ipv6]:port`")]
    BadEndpoint(String),
    /// A line is neither a section header, a `key = value` pair, a comment nor blank.
    #[error("expected `[Section]` or `Key = Value`, found `{0}`")]
    Syntax(String),
    /// A section header other than `[Interface]` or `[Peer]`.
    #[error("unknown section (expected [Interface] or [Peer])")]
    UnknownSection,
    /// A second `[Interface]` section.
    #[error("second [Interface] section (the first is on line {0})")]
    DuplicateInterface(usize),
    /// A key before the first section header.
    #[error("key outside any section")]
    OutsideSection,
    /// A key not known in this section.
    #[error("unknown key in [{0}] section")]
    UnknownKey(&'static str),
    /// A single-valued key given twice in one section.
    #[error("given twice in one section (first on line {0})")]
    DuplicateKey(usize),
    /// A key with an empty value where one is required.
    #[error("empty value")]
    EmptyValue,
    /// A required key or section is missing.
    #[error("missing in [{0}] section")]
    Missing(&'static str),
    /// There is no `[Interface]` section.
    #[error("missing [Interface] section")]
    MissingInterface,
    /// An `AllowedPorts*` item is not a port rule.
    #[error("`{0}` is not a port rule (expected tcp:N, udp:N, N, or a range N-M with an optional tcp:/udp: prefix, ports 0-65535; or `none` alone)")]
    BadPortRule(String),
    /// An `AllowedPorts*` range ends before it starts.
    #[error("`{0}`: the range ends before it starts")]
    ReversedPortRange(String),
    /// `none` mixed with port rules in one `AllowedPorts*` direction.
    #[error("`none` cannot be combined with port rules")]
    NoneWithRules,
    /// Two peers have the same public key.
    #[error("duplicate peer public key (first used on line {0})")]
    DuplicatePeer(usize),
}

/// A configuration file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file's content is invalid.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The first problem found.
        source: Box<ConfigError>,
    },
}

/// The wg-quick-only keys accepted and reported in [`Config::ignored`].
const WG_QUICK_ONLY: &[&str] = &[
    "DNS",
    "Table",
    "PreUp",
    "PostUp",
    "PreDown",
    "PostDown",
    "SaveConfig",
];

impl Config {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| LoadError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses wg-quick text; the first problem found is returned.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut p = Parser::default();
        for (i, raw) in text.lines().enumerate() {
            p.line(i + 1, raw)?;
        }
        p.finish()
    }
}

impl FromStr for Config {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Writes the configuration back in wg-quick format (ignored keys are not written).
/// Parsing the output yields an equal `Config` apart from `ignored`.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.interface;
        writeln!(f, "[Interface]")?;
        writeln!(f, "PrivateKey = {}", i.private_key)?;
        if let Some(p) = i.listen_port {
            writeln!(f, "ListenPort = {p}")?;
        }
        if let Some(m) = i.fwmark {
            writeln!(f, "FwMark = {m:#x}")?;
        }
        for a in &i.addresses {
            writeln!(f, "Address = {a}")?;
        }
        if let Some(m) = i.mtu {
            writeln!(f, "MTU = {m}")?;
        }
        for p in &self.peers {
            writeln!(f)?;
            writeln!(f, "[Peer]")?;
            writeln!(f, "PublicKey = {}", p.public_key)?;
            if let Some(k) = &p.preshared_key {
                writeln!(f, "PresharedKey = {k}")?;
            }
            for a in &p.allowed_ips {
                writeln!(f, "AllowedIPs = {a}")?;
            }
            if let Some(e) = p.endpoint {
                writeln!(f, "Endpoint = {e}")?;
            }
            if let Some(k) = p.persistent_keepalive {
                writeln!(f, "PersistentKeepalive = {k}")?;
            }
            for (key, rules) in [
                ("AllowedPortsOut", &p.allowed_ports_out),
                ("AllowedPortsIn", &p.allowed_ports_in),
            ] {
                match rules.as_deref() {
                    None => {}
                    Some([]) => writeln!(f, "{key} = none")?,
                    Some(rules) => {
                        let items: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
                        writeln!(f, "{key} = {}", items.join(", "))?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    None,
    Interface,
    Peer,
}

#[derive(Default)]
struct PartialInterface {
    header_line: usize,
    private_key: Option<(usize, Key)>,
    listen_port: Option<(usize, u16)>,
    addresses: Vec<IpNet>,
    mtu: Option<(usize, u16)>,
    fwmark: Option<(usize, Option<u32>)>,
}

#[derive(Default)]
struct PartialPeer {
    header_line: usize,
    public_key: Option<(usize, Key)>,
    preshared_key: Option<(usize, Key)>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<(usize, SocketAddr)>,
    persistent_keepalive: Option<(usize, Option<u16>)>,
    allowed_ports_out: Option<PartialPorts>,
    allowed_ports_in: Option<PartialPorts>,
}

/// One direction's `AllowedPorts*` lines so far: the rules, and the line of a `none`.
#[derive(Default)]
struct PartialPorts {
    rules: Vec<PortRule>,
    none_line: Option<usize>,
}

impl PartialPorts {
    /// Adds one line's value: `none` or comma-separated rules; `none` and rules exclude
    /// each other across all lines of the direction.
    fn add(&mut self, n: usize, field: &str, value: &str) -> Result<(), ConfigError> {
        if value.eq_ignore_ascii_case("none") {
            if !self.rules.is_empty() {
                return Err(err(n, field, ConfigErrorReason::NoneWithRules));
            }
            self.none_line = Some(n);
            return Ok(());
        }
        let items = list_items(n, field, value)?;
        if self.none_line.is_some() || items.iter().any(|i| i.eq_ignore_ascii_case("none")) {
            return Err(err(n, field, ConfigErrorReason::NoneWithRules));
        }
        for item in items {
            self.rules
                .push(item.parse::<PortRule>().map_err(|r| err(n, field, r))?);
        }
        Ok(())
    }
}

struct Parser {
    section: Section,
    interface: Option<PartialInterface>,
    peers: Vec<PartialPeer>,
    ignored: Vec<IgnoredKey>,
}

impl Default for Parser {
    fn default() -> Self {
        Self {
            section: Section::None,
            interface: None,
            peers: Vec::new(),
            ignored: Vec::new(),
        }
    }
}

fn err(line: usize, field: &str, reason: ConfigErrorReason) -> ConfigError {
    ConfigError {
        line,
        field: field.to_string(),
        reason,
    }
}

/// Stores a single-valued key, refusing a second occurrence in the same section.
fn set_once<T>(
    slot: &mut Option<(usize, T)>,
    line: usize,
    field: &str,
    value: T,
) -> Result<(), ConfigError> {
    if let Some((first, _)) = slot {
        return Err(err(line, field, ConfigErrorReason::DuplicateKey(*first)));
    }
    *slot = Some((line, value));
    Ok(())
}

impl Parser {
    fn line(&mut self, n: usize, raw: &str) -> Result<(), ConfigError> {
        let line = raw.split_once('#').map_or(raw, |(l, _)| l).trim();
        if line.is_empty() {
            return Ok(());
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.strip_suffix(']').map(str::trim);
            return match name {
                Some(s) if s.eq_ignore_ascii_case("interface") => {
                    if let Some(i) = &self.interface {
                        return Err(err(
                            n,
                            "[Interface]",
                            ConfigErrorReason::DuplicateInterface(i.header_line),
                        ));
                    }
                    self.interface = Some(PartialInterface {
                        header_line: n,
                        ..Default::default()
                    });
                    self.section = Section::Interface;
                    Ok(())
                }
                Some(s) if s.eq_ignore_ascii_case("peer") => {
                    self.peers.push(PartialPeer {
                        header_line: n,
                        ..Default::default()
                    });
                    self.section = Section::Peer;
                    Ok(())
                }
                _ => Err(err(n, line, ConfigErrorReason::UnknownSection)),
            };
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(n, line, ConfigErrorReason::Syntax(line.to_string())));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(err(n, line, ConfigErrorReason::Syntax(line.to_string())));
        }
        match self.section {
            Section::None => Err(err(n, key, ConfigErrorReason::OutsideSection)),
            Section::Interface => self.interface_key(n, key, value),
            Section::Peer => self.peer_key(n, key, value),
        }
    }

    fn interface_key(&mut self, n: usize, key: &str, value: &str) -> Result<(), ConfigError> {
        let Some(i) = self.interface.as_mut() else {
            return Err(err(n, key, ConfigErrorReason::OutsideSection));
        };
        let is = |name: &str| key.eq_ignore_ascii_case(name);
        if is("PrivateKey") {
            let k = parse_key(n, "PrivateKey", value)?;
            set_once(&mut i.private_key, n, "PrivateKey", k)
        } else if is("ListenPort") {
            let p = parse_num::<u16>(n, "ListenPort", value, "0..=65535")?;
            set_once(&mut i.listen_port, n, "ListenPort", p)
        } else if is("Address") {
            for item in list_items(n, "Address", value)? {
                i.addresses.push(parse_prefix(n, "Address", item)?);
            }
            Ok(())
        } else if is("MTU") {
            let m = parse_num::<u16>(n, "MTU", value, "576..=65535")?;
            if m < 576 {
                return Err(err(
                    n,
                    "MTU",
                    ConfigErrorReason::BadNumber {
                        value: value.to_string(),
                        range: "576..=65535",
                    },
                ));
            }
            set_once(&mut i.mtu, n, "MTU", m)
        } else if is("FwMark") {
            let m = parse_fwmark(n, value)?;
            set_once(&mut i.fwmark, n, "FwMark", m)
        } else if let Some(name) = WG_QUICK_ONLY.iter().find(|k| is(k)) {
            self.ignored.push(IgnoredKey {
                line: n,
                key: (*name).to_string(),
                value: value.to_string(),
            });
            Ok(())
        } else {
            Err(err(n, key, ConfigErrorReason::UnknownKey("Interface")))
        }
    }

    fn peer_key(&mut self, n: usize, key: &str, value: &str) -> Result<(), ConfigError> {
        let Some(p) = self.peers.last_mut() else {
            return Err(err(n, key, ConfigErrorReason::OutsideSection));
        };
        let is = |name: &str| key.eq_ignore_ascii_case(name);
        if is("PublicKey") {
            let k = parse_key(n, "PublicKey", value)?;
            set_once(&mut p.public_key, n, "PublicKey", k)
        } else if is("PresharedKey") {
            let k = parse_key(n, "PresharedKey", value)?;
            set_once(&mut p.preshared_key, n, "PresharedKey", k)
        } else if is("AllowedIPs") {
            if value.is_empty() {
                return Ok(());
            }
            for item in list_items(n, "AllowedIPs", value)? {
                p.allowed_ips
                    .push(parse_prefix(n, "AllowedIPs", item)?.network());
            }
            Ok(())
        } else if is("Endpoint") {
            let e = parse_endpoint(value).map_err(|r| err(n, "Endpoint", r))?;
            set_once(&mut p.endpoint, n, "Endpoint", e)
        } else if is("PersistentKeepalive") {
            let k = if value.eq_ignore_ascii_case("off") {
                None
            } else {
                Some(parse_num::<u16>(
                    n,
                    "PersistentKeepalive",
                    value,
                    "`off` or 0..=65535",
                )?)
                .filter(|&k| k != 0)
            };
            set_once(&mut p.persistent_keepalive, n, "PersistentKeepalive", k)
        } else if is("AllowedPortsOut") {
            p.allowed_ports_out
                .get_or_insert_with(PartialPorts::default)
                .add(n, "AllowedPortsOut", value)
        } else if is("AllowedPortsIn") {
            p.allowed_ports_in
                .get_or_insert_with(PartialPorts::default)
                .add(n, "AllowedPortsIn", value)
        } else {
            Err(err(n, key, ConfigErrorReason::UnknownKey("Peer")))
        }
    }

    fn finish(self) -> Result<Config, ConfigError> {
        let Some(i) = self.interface else {
            return Err(err(1, "[Interface]", ConfigErrorReason::MissingInterface));
        };
        let Some((_, private_key)) = i.private_key else {
            return Err(err(
                i.header_line,
                "PrivateKey",
                ConfigErrorReason::Missing("Interface"),
            ));
        };
        let interface = InterfaceConfig {
            private_key,
            listen_port: i.listen_port.map(|(_, p)| p).filter(|&p| p != 0),
            addresses: i.addresses,
            mtu: i.mtu.map(|(_, m)| m),
            fwmark: i.fwmark.and_then(|(_, m)| m),
        };
        let mut seen: std::collections::HashMap<Key, usize> = std::collections::HashMap::new();
        let mut peers = Vec::with_capacity(self.peers.len());
        for p in self.peers {
            let Some((key_line, public_key)) = p.public_key else {
                return Err(err(
                    p.header_line,
                    "PublicKey",
                    ConfigErrorReason::Missing("Peer"),
                ));
            };
            if let Some(first) = seen.insert(public_key, key_line) {
                return Err(err(
                    key_line,
                    "PublicKey",
                    ConfigErrorReason::DuplicatePeer(first),
                ));
            }
            peers.push(PeerSection {
                public_key,
                preshared_key: p.preshared_key.map(|(_, k)| k),
                allowed_ips: p.allowed_ips,
                endpoint: p.endpoint.map(|(_, e)| e),
                persistent_keepalive: p.persistent_keepalive.and_then(|(_, k)| k),
                allowed_ports_out: p.allowed_ports_out.map(|d| d.rules),
                allowed_ports_in: p.allowed_ports_in.map(|d| d.rules),
            });
        }
        Ok(Config {
            interface,
            peers,
            ignored: self.ignored,
        })
    }
}

fn parse_key(n: usize, field: &str, value: &str) -> Result<Key, ConfigError> {
    if value.is_empty() {
        return Err(err(n, field, ConfigErrorReason::EmptyValue));
    }
    Key::from_base64(value).map_err(|e| err(n, field, e.into()))
}

fn parse_num<T: FromStr>(
    n: usize,
    field: &str,
    value: &str,
    range: &'static str,
) -> Result<T, ConfigError> {
    value.parse::<T>().map_err(|_| {
        err(
            n,
            field,
            ConfigErrorReason::BadNumber {
                value: value.to_string(),
                range,
            },
        )
    })
}

/// `off`, a decimal or a `0x` hexadecimal u32, as `wg` accepts.
fn parse_fwmark(n: usize, value: &str) -> Result<Option<u32>, ConfigError> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => value.parse::<u32>().ok(),
    };
    match parsed {
        Some(m) => Ok(Some(m).filter(|&m| m != 0)),
        None => Err(err(
            n,
            "FwMark",
            ConfigErrorReason::BadNumber {
                value: value.to_string(),
                range: "`off` or 0..=4294967295 (decimal or 0x hex)",
            },
        )),
    }
}

fn list_items<'a>(n: usize, field: &str, value: &'a str) -> Result<Vec<&'a str>, ConfigError> {
    if value.is_empty() {
        return Err(err(n, field, ConfigErrorReason::EmptyValue));
    }
    value
        .split(',')
        .map(str::trim)
        .map(|item| {
            if item.is_empty() {
                Err(err(n, field, ConfigErrorReason::EmptyItem))
            } else {
                Ok(item)
            }
        })
        .collect()
}

/// Parses `addr/len` (or a bare address as a host prefix) with errors that name the item.
pub(crate) fn parse_prefix_item(item: &str) -> Result<IpNet, ConfigErrorReason> {
    let (a, l) = match item.split_once('/') {
        Some((a, l)) => (a.trim(), Some(l.trim())),
        None => (item, None),
    };
    let addr: IpAddr = a
        .parse()
        .map_err(|_| ConfigErrorReason::BadAddress(a.to_string()))?;
    let (max, family) = match addr {
        IpAddr::V4(_) => (32u8, "IPv4"),
        IpAddr::V6(_) => (128u8, "IPv6"),
    };
    let Some(l) = l else {
        return Ok(IpNet::host(addr));
    };
    let out_of_range = || ConfigErrorReason::PrefixLenOutOfRange {
        item: item.to_string(),
        len: l.to_string(),
        max,
        family,
    };
    // Digits only: `u8::from_str` would also accept a leading `+`.
    if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
        return Err(out_of_range());
    }
    let len: u8 = l.parse().map_err(|_| out_of_range())?;
    IpNet::new(addr, len).ok_or_else(out_of_range)
}

fn parse_prefix(n: usize, field: &str, item: &str) -> Result<IpNet, ConfigError> {
    parse_prefix_item(item).map_err(|r| err(n, field, r))
}

/// Parses `ipv4:port` or `[ipv6]:port` (port 1..=65535); names a host name as such.
pub(crate) fn parse_endpoint(value: &str) -> Result<SocketAddr, ConfigErrorReason> {
    if value.is_empty() {
        return Err(ConfigErrorReason::EmptyValue);
    }
    if let Ok(sa) = value.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(ConfigErrorReason::BadEndpoint(value.to_string()));
        }
        return Ok(sa);
    }
    // Not a literal: a host name if the part before the last `:` looks like one.
    if let Some((host, port)) = value.rsplit_once(':') {
        let looks_like_name = !host.is_empty()
            && !host.starts_with('[')
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && host.bytes().any(|b| b.is_ascii_alphabetic())
            && port.parse::<u16>().is_ok();
        if looks_like_name {
            return Err(ConfigErrorReason::HostName(value.to_string()));
        }
    }
    Err(ConfigErrorReason::BadEndpoint(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real keys from `wg genkey` / `wg pubkey` / `wg genpsk`.
    const PRIV_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB_A: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    const PUB_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PUB_C: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const PSK: &str = "8PH3pY8tSn39jmGLO6mXgW0S5Qr0MdK9FKbNZXdmeCM=";

    fn e(text: &str) -> ConfigError {
        Config::parse(text).expect_err("should be rejected")
    }

    #[test]
    fn parses_the_wireguard_man_page_example() {
        // The example from wg(8), as `wg showconf` prints it, plus wg-quick keys.
        let text = format!(
            "[Interface]\n\
             PrivateKey = {PRIV_A}\n\
             ListenPort = 51820\n\
             Address = 10.192.122.1/24, fd5a:1f00::1/64\n\
             Address = 10.10.0.1/16\n\
             MTU = 1420\n\
             DNS = 10.192.122.2\n\
             PostUp = iptables -A FORWARD -i %i -j ACCEPT\n\
             \n\
             [Peer]\n\
             PublicKey = {PUB_B}\n\
             PresharedKey = {PSK}\n\
             Endpoint = 192.95.5.67:1234\n\
             AllowedIPs = 10.192.122.3/32, 10.192.124.1/24\n\
             \n\
             [Peer]\n\
             PublicKey = {PUB_C}\n\
             Endpoint = [2607:5300:60:6b0::c05f:543]:2468\n\
             AllowedIPs = 10.192.122.4/32, 192.168.0.0/16\n\
             AllowedIPs = ::/0\n\
             PersistentKeepalive = 25\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.interface.private_key.to_base64(), PRIV_A);
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.interface.mtu, Some(1420));
        assert_eq!(c.interface.fwmark, None);
        let addrs: Vec<String> = c
            .interface
            .addresses
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            addrs,
            ["10.192.122.1/24", "fd5a:1f00::1/64", "10.10.0.1/16"]
        );
        assert_eq!(c.peers.len(), 2);
        let p = &c.peers[0];
        assert_eq!(p.public_key.to_base64(), PUB_B);
        assert_eq!(p.preshared_key.unwrap().to_base64(), PSK);
        assert_eq!(p.endpoint, Some("192.95.5.67:1234".parse().unwrap()));
        let ips: Vec<String> = p.allowed_ips.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            ips,
            ["10.192.122.3/32", "10.192.124.0/24"],
            "host bits cleared"
        );
        assert_eq!(p.persistent_keepalive, None);
        let q = &c.peers[1];
        assert_eq!(
            q.endpoint,
            Some("[2607:5300:60:6b0::c05f:543]:2468".parse().unwrap())
        );
        assert_eq!(q.allowed_ips.len(), 3);
        assert_eq!(q.allowed_ips[2].to_string(), "::/0");
        assert_eq!(q.persistent_keepalive, Some(25));
        assert_eq!(
            c.ignored,
            vec![
                IgnoredKey {
                    line: 7,
                    key: "DNS".into(),
                    value: "10.192.122.2".into()
                },
                IgnoredKey {
                    line: 8,
                    key: "PostUp".into(),
                    value: "iptables -A FORWARD -i %i -j ACCEPT".into()
                },
            ]
        );
    }

    #[test]
    fn parses_wg_showconf_output() {
        // Byte-for-byte the shape `wg showconf` prints (no spaces after commas removed).
        let text = format!(
            "[Interface]\nListenPort = 41414\nFwMark = 0x1234\nPrivateKey = {PRIV_A}\n\n\
             [Peer]\nPublicKey = {PUB_B}\nPresharedKey = {PSK}\n\
             AllowedIPs = 10.0.0.2/32, fd5a:1f00:1::/48\nEndpoint = 127.0.0.1:51821\n\
             PersistentKeepalive = 15\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.interface.fwmark, Some(0x1234));
        assert_eq!(c.interface.listen_port, Some(41414));
        assert_eq!(c.peers[0].allowed_ips.len(), 2);
        assert!(c.ignored.is_empty());
    }

    #[test]
    fn comments_case_and_whitespace() {
        let text = format!(
            "# leading comment\n\
             \t[ interface ]   # trailing\n\
             privatekey={PRIV_A}#comment right after\n\
             LISTENPORT   =   0\n\
             fwmark = off\n\
             \n   \n\
             [PEER]\n\
             publickey= {PUB_B} \n\
             allowedips =   \n\
             persistentkeepalive = OFF\n\
             [peer]\n\
             PublicKey = {PUB_C}\n\
             PersistentKeepalive = 0\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.interface.listen_port, None, "0 means ephemeral");
        assert_eq!(c.interface.fwmark, None);
        assert!(c.peers[0].allowed_ips.is_empty());
        assert_eq!(c.peers[0].persistent_keepalive, None);
        assert_eq!(c.peers[1].persistent_keepalive, None);
    }

    #[test]
    fn display_round_trips() {
        let text = format!(
            "[Interface]\nPrivateKey = {PRIV_A}\nListenPort = 1\nFwMark = 7\nAddress = 10.0.0.1/8\n\
             Address = fd00::1/64\nMTU = 1280\nTable = off\n[Peer]\nPublicKey = {PUB_B}\n\
             PresharedKey = {PSK}\nAllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = [::1]:9\n\
             PersistentKeepalive = 65535\n[Peer]\nPublicKey = {PUB_C}\n"
        );
        let c = Config::parse(&text).unwrap();
        let again = Config::parse(&c.to_string()).unwrap();
        assert_eq!(again.interface, c.interface);
        assert_eq!(again.peers, c.peers);
        assert!(again.ignored.is_empty());
    }

    #[test]
    fn debug_redacts_secrets() {
        let text = format!(
            "[Interface]\nPrivateKey = {PRIV_A}\n[Peer]\nPublicKey = {PUB_B}\nPresharedKey = {PSK}\n"
        );
        let dbg = format!("{:?}", Config::parse(&text).unwrap());
        assert!(!dbg.contains(PRIV_A), "{dbg}");
        assert!(!dbg.contains(PSK), "{dbg}");
        assert!(dbg.contains(PUB_A), "shows the derived public key: {dbg}");
        assert!(dbg.contains(PUB_B), "{dbg}");
    }

    #[test]
    fn key_errors_say_why() {
        assert_eq!(
            Key::from_base64("not base64!").unwrap_err().to_string(),
            "not valid base64 (Invalid symbol 32, offset 3.)"
        );
        // 31 bytes of valid base64.
        let short = BASE64.encode([1u8; 31]);
        assert_eq!(
            Key::from_base64(&short).unwrap_err(),
            KeyError::WrongLength(31)
        );
        assert_eq!(
            Key::from_base64(&short).unwrap_err().to_string(),
            "wrong length (31 bytes, expected 32)"
        );
        assert!(matches!(
            Key::from_hex("zz").unwrap_err(),
            KeyError::BadHex(_)
        ));
        assert_eq!(Key::from_hex("00ff").unwrap_err(), KeyError::WrongLength(2));
        let k = Key::from_base64(PUB_B).unwrap();
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(k.to_string(), PUB_B);
        assert!(Key([0; 32]).is_zero());
        assert!(!k.is_zero());
    }

    #[test]
    fn public_key_matches_wg_pubkey() {
        // `echo PRIV_A | wg pubkey` prints PUB_A.
        let private = Key::from_base64(PRIV_A).unwrap();
        assert_eq!(public_key(&private).to_base64(), PUB_A);
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = generate_private_key();
        let b = generate_private_key();
        assert_ne!(a, b);
        for k in [a, b] {
            assert_eq!(k.0[0] & 7, 0);
            assert_eq!(k.0[31] & 0xc0, 0x40);
            assert_eq!(Key::from_base64(&k.to_base64()).unwrap(), k);
            assert_ne!(public_key(&k), k);
        }
    }

    fn iface() -> String {
        format!("[Interface]\nPrivateKey = {PRIV_A}\n")
    }

    #[test]
    fn error_bad_base64_names_line_and_field() {
        let err = e(&format!("{}[Peer]\nPublicKey = abc$def\n", iface()));
        assert_eq!(err.line, 4);
        assert_eq!(err.field, "PublicKey");
        assert!(
            err.to_string()
                .starts_with("line 4: PublicKey: not valid base64 ("),
            "{err}"
        );
    }

    #[test]
    fn error_wrong_key_length() {
        let short = BASE64.encode([7u8; 16]);
        let err = e(&format!("[Interface]\nPrivateKey = {short}\n"));
        assert_eq!(
            err.to_string(),
            "line 2: PrivateKey: wrong length (16 bytes, expected 32)"
        );
        let err = e(&format!(
            "{}[Peer]\nPublicKey = {PUB_B}\nPresharedKey = {short}\n",
            iface()
        ));
        assert_eq!(
            err.to_string(),
            "line 5: PresharedKey: wrong length (16 bytes, expected 32)"
        );
        let err = e("[Interface]\nPrivateKey =\n");
        assert_eq!(err.to_string(), "line 2: PrivateKey: empty value");
    }

    #[test]
    fn error_prefix_length_out_of_range() {
        let text = format!(
            "{}\n\n\n\n[Peer]\nPublicKey = {PUB_B}\nAllowedIPs = 10.0.0.0/33\n",
            iface()
        );
        let err = e(&text);
        assert_eq!(err.line, 9);
        assert_eq!(
            err.to_string(),
            "line 9: AllowedIPs: prefix length 33 out of range in `10.0.0.0/33` (0-32 for IPv4)"
        );
        let err = e(&format!("{}Address = fd00::1/129\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 3: Address: prefix length 129 out of range in `fd00::1/129` (0-128 for IPv6)"
        );
        let err = e(&format!("{}Address = 10.0.0.1/+8\n", iface()));
        assert!(matches!(
            err.reason,
            ConfigErrorReason::PrefixLenOutOfRange { .. }
        ));
        let err = e(&format!("{}Address = 10.0.0.1/\n", iface()));
        assert!(matches!(
            err.reason,
            ConfigErrorReason::PrefixLenOutOfRange { .. }
        ));
    }

    #[test]
    fn error_bad_address_and_empty_items() {
        let err = e(&format!("{}Address = 10.0.0.300/24\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 3: Address: `10.0.0.300` is not an IP address"
        );
        let err = e(&format!(
            "{}[Peer]\nPublicKey = {PUB_B}\nAllowedIPs = 10.0.0.0/8,,fd00::/8\n",
            iface()
        ));
        assert_eq!(err.to_string(), "line 5: AllowedIPs: empty list item");
        let err = e(&format!("{}Address =\n", iface()));
        assert_eq!(err.to_string(), "line 3: Address: empty value");
    }

    #[test]
    fn error_endpoints() {
        let peer = |ep: &str| {
            e(&format!(
                "{}[Peer]\nPublicKey = {PUB_B}\nEndpoint = {ep}\n",
                iface()
            ))
        };
        let err = peer("vpn.example.com:51820");
        assert_eq!(err.line, 5);
        assert!(matches!(err.reason, ConfigErrorReason::HostName(_)));
        assert!(
            err.to_string().contains("DNS names are not supported"),
            "{err}"
        );
        assert!(matches!(
            peer("fd00::1:51820").reason,
            ConfigErrorReason::BadEndpoint(_)
        ));
        assert!(matches!(
            peer("10.0.0.1").reason,
            ConfigErrorReason::BadEndpoint(_)
        ));
        assert!(matches!(
            peer("10.0.0.1:0").reason,
            ConfigErrorReason::BadEndpoint(_)
        ));
        assert!(matches!(
            peer("10.0.0.1:65536").reason,
            ConfigErrorReason::BadEndpoint(_)
        ));
        assert!(matches!(
            peer("[fd00::1]").reason,
            ConfigErrorReason::BadEndpoint(_)
        ));
        assert_eq!(peer("").to_string(), "line 5: Endpoint: empty value");
    }

    #[test]
    fn error_numbers() {
        let err = e(&format!("{}ListenPort = 65536\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 3: ListenPort: `65536` is not a number in 0..=65535"
        );
        let err = e(&format!("{}MTU = 500\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 3: MTU: `500` is not a number in 576..=65535"
        );
        let err = e(&format!("{}FwMark = 0xzz\n", iface()));
        assert_eq!(err.field, "FwMark");
        let err = e(&format!(
            "{}[Peer]\nPublicKey = {PUB_B}\nPersistentKeepalive = -1\n",
            iface()
        ));
        assert_eq!(
            err.to_string(),
            "line 5: PersistentKeepalive: `-1` is not a number in `off` or 0..=65535"
        );
    }

    #[test]
    fn error_structure() {
        let err = e(&format!("PrivateKey = {PRIV_A}\n[Interface]\n"));
        assert_eq!(
            err.to_string(),
            "line 1: PrivateKey: key outside any section"
        );

        let err = e(&format!("{}[Peers]\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 3: [Peers]: unknown section (expected [Interface] or [Peer])"
        );
        let err = e(&format!("{}[Peer\n", iface()));
        assert!(matches!(err.reason, ConfigErrorReason::UnknownSection));

        let err = e(&format!("{}Table = off\nFooBar = 1\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 4: FooBar: unknown key in [Interface] section"
        );

        let err = e(&format!(
            "{}[Peer]\nPublicKey = {PUB_B}\nAddress = 10.0.0.1/32\n",
            iface()
        ));
        assert_eq!(
            err.to_string(),
            "line 5: Address: unknown key in [Peer] section"
        );

        let err = e(&format!("{}just some words\n", iface()));
        assert_eq!(err.line, 3);
        assert!(matches!(err.reason, ConfigErrorReason::Syntax(_)));
        let err = e(&format!("{} = value\n", iface()));
        assert!(matches!(err.reason, ConfigErrorReason::Syntax(_)));

        let err = e(&format!("{}ListenPort = 1\nListenPort = 2\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 4: ListenPort: given twice in one section (first on line 3)"
        );

        let err = e(&format!("{}\n[Interface]\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 4: [Interface]: second [Interface] section (the first is on line 1)"
        );
    }

    #[test]
    fn error_missing_pieces() {
        let err = e("# nothing\n");
        assert_eq!(
            err.to_string(),
            "line 1: [Interface]: missing [Interface] section"
        );

        let err = e(&format!(
            "\n[Interface]\nListenPort = 1\n[Peer]\nPublicKey = {PUB_B}\n"
        ));
        assert_eq!(
            err.to_string(),
            "line 2: PrivateKey: missing in [Interface] section"
        );

        let err = e(&format!("{}[Peer]\nAllowedIPs = 10.0.0.0/8\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 3: PublicKey: missing in [Peer] section"
        );
    }

    #[test]
    fn error_duplicate_peer() {
        let err = e(&format!(
            "{}[Peer]\nPublicKey = {PUB_B}\n[Peer]\nPublicKey = {PUB_C}\n[Peer]\nPublicKey = {PUB_B}\n",
            iface()
        ));
        assert_eq!(
            err.to_string(),
            "line 8: PublicKey: duplicate peer public key (first used on line 4)"
        );
    }

    #[test]
    fn allowed_ports_parse_into_the_joiners_filter() {
        use crate::core::conntrack::Dir;
        let text = format!(
            "{}[Peer]\nPublicKey = {PUB_B}\nAllowedPortsOut = tcp:8730, UDP:53,1000-1001\n\
             allowedportsout = udp:5000-5010\nAllowedPortsIn = none\n\
             [Peer]\nPublicKey = {PUB_C}\nAllowedPortsIn = 22\n\
             [Peer]\nPublicKey = {PUB_A}\n",
            iface()
        );
        let c = Config::parse(&text).unwrap();
        let rule = |proto, first, last| PortRule { proto, first, last };
        assert_eq!(
            c.peers[0].allowed_ports_out,
            Some(vec![
                rule(Proto::Tcp, 8730, 8730),
                rule(Proto::Udp, 53, 53),
                rule(Proto::Both, 1000, 1001),
                rule(Proto::Udp, 5000, 5010),
            ])
        );
        assert_eq!(c.peers[0].allowed_ports_in, Some(vec![]));
        let f = c.peers[0].port_filter().expect("rules make a filter");
        assert_eq!(f.outbound(Proto::Tcp), vec![(1000, 1001), (8730, 8730)]);
        assert_eq!(
            f.outbound(Proto::Udp),
            vec![(53, 53), (1000, 1001), (5000, 5010)]
        );
        assert!(f.inbound(Proto::Tcp).is_empty() && f.inbound(Proto::Udp).is_empty());
        // Only one direction given: the other allows all traffic.
        let g = c.peers[1].port_filter().unwrap();
        assert!(g.all_traffic(Dir::Out));
        assert!(!g.all_traffic(Dir::In));
        assert_eq!(g.inbound(Proto::Both), vec![(22, 22)]);
        // Neither key: no filter, as with wg-quick.
        assert_eq!(c.peers[2].port_filter(), None);
        // Printed and parsed back equal (what the `config` fuzz target checks).
        let again = Config::parse(&c.to_string()).unwrap();
        assert_eq!(again.peers, c.peers);
        assert!(c.to_string().contains("AllowedPortsIn = none"), "{c}");
    }

    #[test]
    fn allowed_ports_errors_name_line_and_field() {
        let peer = |line: &str| e(&format!("{}[Peer]\nPublicKey = {PUB_B}\n{line}\n", iface()));
        assert_eq!(
            peer("AllowedPortsOut = tcp:8730, sctp:9").to_string(),
            "line 5: AllowedPortsOut: `sctp:9` is not a port rule (expected tcp:N, udp:N, N, or a range N-M with an optional tcp:/udp: prefix, ports 0-65535; or `none` alone)"
        );
        assert_eq!(
            peer("AllowedPortsIn = 2000-1000").to_string(),
            "line 5: AllowedPortsIn: `2000-1000`: the range ends before it starts"
        );
        for bad in [
            "65536",
            "+80",
            "tcp:",
            "1-",
            "-1",
            "1-2-3",
            "tcp:udp:1",
            "80 81",
            "0x50",
        ] {
            let err = peer(&format!("AllowedPortsIn = {bad}"));
            assert_eq!(err.line, 5, "{bad}");
            assert_eq!(err.field, "AllowedPortsIn", "{bad}");
            assert!(
                matches!(err.reason, ConfigErrorReason::BadPortRule(_)),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            peer("AllowedPortsOut = none, 22").to_string(),
            "line 5: AllowedPortsOut: `none` cannot be combined with port rules"
        );
        let err = e(&format!(
            "{}[Peer]\nPublicKey = {PUB_B}\nAllowedPortsOut = 22\nAllowedPortsOut = none\n",
            iface()
        ));
        assert_eq!(err.line, 6);
        assert!(matches!(err.reason, ConfigErrorReason::NoneWithRules));
        assert_eq!(
            peer("AllowedPortsOut = 1,,2").to_string(),
            "line 5: AllowedPortsOut: empty list item"
        );
        assert_eq!(
            peer("AllowedPortsOut =").to_string(),
            "line 5: AllowedPortsOut: empty value"
        );
        let err = e(&format!("{}AllowedPortsIn = 22\n", iface()));
        assert_eq!(
            err.to_string(),
            "line 3: AllowedPortsIn: unknown key in [Interface] section"
        );
    }

    #[test]
    fn load_reads_files_and_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg0.conf");
        std::fs::write(&path, format!("{}[Peer]\nPublicKey = {PUB_B}\n", iface())).unwrap();
        assert_eq!(Config::load(&path).unwrap().peers.len(), 1);
        std::fs::write(&path, "[Interface]\n").unwrap();
        let msg = Config::load(&path).unwrap_err().to_string();
        assert!(
            msg.ends_with("wg0.conf: line 1: PrivateKey: missing in [Interface] section"),
            "{msg}"
        );
        let missing = dir.path().join("nope.conf");
        assert!(matches!(Config::load(&missing), Err(LoadError::Io { .. })));
    }
}
