//! Drop counters by reason: every packet the data plane refuses is counted here, never
//! panicked on. Device-wide relaxed atomics: drops are the rare path, and a counter is
//! touched only when a packet is dropped.

use std::sync::atomic::{AtomicU64, Ordering};

use boringtun::noise::errors::WireGuardError;

/// How many [`DropReason`]s there are.
const REASONS: usize = 25;

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// A TUN read that is not a valid IPv4/IPv6 packet (or a bad virtio header).
    MalformedInner,
    /// No peer's AllowedIPs cover the inner destination (answered with an ICMP
    /// unreachable where the rules of `core::icmp` allow).
    NoRoute,
    /// The peer has no endpoint yet.
    NoEndpoint,
    /// A datagram that is not a well-formed WireGuard message.
    MalformedOuter,
    /// A receiver index that names no peer of ours.
    UnknownIndex,
    /// A handshake initiation from a key we do not know.
    UnknownKey,
    /// Authentication failed (AEAD tag, MAC, wrong key or timestamp).
    Auth,
    /// A replayed or too-old counter.
    Replay,
    /// Under load and without a valid cookie.
    RateLimited,
    /// Any other protocol state error (no session, unexpected message, expired).
    Protocol,
    /// Decrypted inner source is outside the sending peer's AllowedIPs.
    SourceNotAllowed,
    /// The decrypted payload is not a valid IP packet.
    MalformedDecrypted,
    /// The kernel refused a send or a TUN write.
    Io,
    /// A batch buffer ran out of room.
    NoBuffer,
    /// The port rules refused a packet we were about to send to a peer (it may not open a
    /// flow and belongs to none).
    FilteredOut,
    /// The port rules refused a decrypted packet from a peer.
    FilteredIn,
    /// A decrypted packet (from an allowed source) for an address that is neither this
    /// node's nor a prefix it routes: a peer trying to route through us (see `core::local`).
    DestinationNotLocal,
    /// A decrypted packet (from an allowed source) for a prefix this node routes, from a
    /// peer the policy does not let use that route (`may_use`, see `core::local`).
    DestinationNotGranted,
    /// A TUN read for a destination no peer covers (counted as [`DropReason::NoRoute`])
    /// whose ICMP unreachable answer the rate limit held back (see `core::icmp`).
    UnreachableLimited,
    /// The rules allowed a new flow but the peer's flow table was full (either direction).
    CtFull,
    /// A packet that fits no flow state: a non-SYN TCP segment, echo reply or similar
    /// without a tracked flow, or a segment its flow's TCP state does not accept.
    CtInvalid,
    /// An ICMP error quoting a packet of no tracked flow.
    IcmpUnrelated,
    /// A datagram on the WireGuard socket that is neither WireGuard, a relay frame, STUN
    /// nor relay control (see `core::demux`).
    Junk,
    /// A STUN or relay-control datagram the control side could not take (its queue full,
    /// the datagram too large, or no control side).
    ControlDropped,
    /// A relay frame (`0xE1..=0xE4`) whose restored message is not a well-formed WireGuard
    /// message (too short for its type, or larger than any datagram). Frames that are
    /// well formed but fail authentication count as [`DropReason::Auth`] and the like.
    RelayMalformed,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; REASONS] = [
        Self::MalformedInner,
        Self::NoRoute,
        Self::NoEndpoint,
        Self::MalformedOuter,
        Self::UnknownIndex,
        Self::UnknownKey,
        Self::Auth,
        Self::Replay,
        Self::RateLimited,
        Self::Protocol,
        Self::SourceNotAllowed,
        Self::MalformedDecrypted,
        Self::Io,
        Self::NoBuffer,
        Self::FilteredOut,
        Self::FilteredIn,
        Self::DestinationNotLocal,
        Self::DestinationNotGranted,
        Self::UnreachableLimited,
        Self::CtFull,
        Self::CtInvalid,
        Self::IcmpUnrelated,
        Self::Junk,
        Self::ControlDropped,
        Self::RelayMalformed,
    ];

    /// A stable snake_case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::MalformedInner => "malformed_inner",
            Self::NoRoute => "no_route",
            Self::NoEndpoint => "no_endpoint",
            Self::MalformedOuter => "malformed_outer",
            Self::UnknownIndex => "unknown_index",
            Self::UnknownKey => "unknown_key",
            Self::Auth => "auth",
            Self::Replay => "replay",
            Self::RateLimited => "rate_limited",
            Self::Protocol => "protocol",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::MalformedDecrypted => "malformed_decrypted",
            Self::Io => "io",
            Self::NoBuffer => "no_buffer",
            Self::FilteredOut => "filtered_out",
            Self::FilteredIn => "filtered_in",
            Self::DestinationNotLocal => "destination_not_local",
            Self::DestinationNotGranted => "destination_not_granted",
            Self::UnreachableLimited => "unreachable_rate_limited",
            Self::CtFull => "ct_full",
            Self::CtInvalid => "ct_invalid_state",
            Self::IcmpUnrelated => "icmp_unrelated",
            Self::Junk => "junk",
            Self::ControlDropped => "control_dropped",
            Self::RelayMalformed => "relay_malformed",
        }
    }

    /// The reason a boringtun error stands for.
    pub fn from_wg(e: &WireGuardError) -> Self {
        use WireGuardError as E;
        match e {
            E::InvalidAeadTag | E::InvalidMac | E::WrongKey | E::InvalidTai64nTimestamp => {
                Self::Auth
            }
            E::WrongTai64nTimestamp | E::DuplicateCounter | E::InvalidCounter => Self::Replay,
            E::UnderLoad => Self::RateLimited,
            E::WrongIndex => Self::UnknownIndex,
            E::IncorrectPacketLength | E::InvalidPacket | E::WrongPacketType => {
                Self::MalformedOuter
            }
            _ => Self::Protocol,
        }
    }
}

/// Device-wide drop counters, plus the count of ICMP unreachable answers written back to
/// the TUN for dropped packets.
#[derive(Debug, Default)]
pub struct DropCounters {
    counts: [AtomicU64; REASONS],
    unreachable_sent: AtomicU64,
}

impl DropCounters {
    /// Counts one drop.
    #[inline]
    pub fn add(&self, reason: DropReason) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The count for one reason.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }

    /// Every non-zero (reason, count), for logs and metrics.
    pub fn nonzero(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.get(*r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Counts one ICMP unreachable answer written back to the TUN.
    #[inline]
    pub fn add_unreachable_sent(&self) {
        self.unreachable_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// ICMP unreachable answers written back to the TUN.
    pub fn unreachable_sent(&self) -> u64 {
        self.unreachable_sent.load(Ordering::Relaxed)
    }

    /// Sum over every reason.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_counter_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
