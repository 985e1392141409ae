//! The coordinator's STUN server: one tokio task per UDP socket answering RFC 8489 Binding
//! requests (the codec is [`tabbify_api::stun`]), so joiners learn the address and port
//! their NAT maps their WireGuard socket to. Two sockets by default — the coordinator's TCP
//! port number on UDP and that port + 1 — so one coordinator gives a joiner two server
//! endpoints to compare, which is how it tells an endpoint-independent mapping from an
//! endpoint-dependent one.
//!
//! Invariants: the server keeps no state per client (an answer depends only on the
//! datagram and its source), never answers a datagram that is not a well-formed STUN
//! message (dropped and counted in `/metrics`), and answers at most one datagram per
//! datagram received, never larger than [`MAX_MESSAGE_LEN`](tabbify_api::stun::MAX_MESSAGE_LEN);
//! answers to one source (IPv4 address or IPv6 /64) are rate limited by one
//! [`SourceLimiter`] shared by all the sockets (an answer is ~1.5x its request, and UDP
//! sources can be spoofed: the limit caps what a spoofer can aim at a victim; requests over
//! it are dropped and counted as `stun_rate_limited`). The limiter is the only state, and it
//! is bounded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tabbify_api::stun_limit::SourceLimiter;

use tokio::net::UdpSocket;

use crate::metrics::Metrics;
use crate::server::Coordinator;

/// Where the STUN server listens (`--stun-bind`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StunBind {
    /// The coordinator's TCP address on UDP and the next port (the default).
    Default,
    /// No STUN server (`--stun-bind off`).
    Off,
    /// These addresses.
    Addrs(Vec<SocketAddr>),
}

impl StunBind {
    /// From the `--stun-bind` values: none → [`StunBind::Default`]; `off` alone →
    /// [`StunBind::Off`]; otherwise each must be an `ip:port`.
    pub fn from_args(args: &[String]) -> Result<Self, String> {
        if args.is_empty() {
            return Ok(Self::Default);
        }
        if args.iter().any(|a| a == "off") {
            return if args.len() == 1 {
                Ok(Self::Off)
            } else {
                Err("--stun-bind off cannot be combined with addresses".into())
            };
        }
        args.iter()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| format!("--stun-bind {a}: {e} (want ip:port or off)"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::Addrs)
    }

    /// Binds the sockets, given the address the HTTP listener got. With
    /// [`StunBind::Default`] a port that cannot be bound is skipped with a warning (the
    /// coordinator works without STUN); explicit addresses must all bind.
    pub fn bind(&self, tcp_local: SocketAddr) -> std::io::Result<Vec<std::net::UdpSocket>> {
        match self {
            Self::Off => Ok(Vec::new()),
            Self::Addrs(addrs) => addrs.iter().map(|a| bind_one(*a)).collect(),
            Self::Default => {
                let port = tcp_local.port();
                let mut out = Vec::new();
                for p in [Some(port), port.checked_add(1)].into_iter().flatten() {
                    let addr = SocketAddr::new(tcp_local.ip(), p);
                    match bind_one(addr) {
                        Ok(s) => out.push(s),
                        Err(e) => {
                            tracing::warn!(%addr, error = %e, "STUN port not bound; skipped")
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Answers Binding requests on `socket` until it fails, within `limiter`'s per-source
/// rate; counts answers and drops in the coordinator's metrics.
pub async fn serve(coord: Arc<Coordinator>, socket: UdpSocket, limiter: Arc<Mutex<SourceLimiter>>) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier sends surface here on some kernels: not fatal.
                tracing::debug!(error = %e, "STUN receive failed");
                continue;
            }
        };
        let metrics = coord.metrics();
        // A datagram filling the buffer may be truncated: not a message we answer.
        let answer = if n == buf.len() {
            Err(tabbify_api::stun::StunError::BadLength)
        } else {
            tabbify_api::stun::answer(&buf[..n], src)
        };
        match answer {
            Ok(Some(_))
                if !limiter
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .allow(src.ip(), Instant::now()) =>
            {
                Metrics::inc(&metrics.stun_rate_limited);
            }
            Ok(Some(reply)) => {
                Metrics::inc(&metrics.stun_answered);
                if let Err(e) = socket.send_to(&reply, src).await {
                    tracing::debug!(%src, error = %e, "STUN answer not sent");
                }
            }
            Ok(None) => Metrics::inc(&metrics.stun_ignored),
            Err(e) => {
                Metrics::inc(&metrics.stun_malformed);
                tracing::trace!(%src, error = %e, "malformed STUN datagram dropped");
            }
        }
    }
}

/// The local addresses of bound sockets, for
/// [`Config::stun_addrs`](crate::server::Config::stun_addrs).
pub fn local_addrs(sockets: &[std::net::UdpSocket]) -> std::io::Result<Vec<SocketAddr>> {
    sockets.iter().map(|s| s.local_addr()).collect()
}

/// Spawns [`serve`] on each socket (inside a tokio runtime), all sharing one
/// [`SourceLimiter`] with the default rates.
pub fn spawn(coord: &Arc<Coordinator>, sockets: Vec<std::net::UdpSocket>) -> std::io::Result<()> {
    let limiter = Arc::new(Mutex::new(SourceLimiter::default()));
    for s in sockets {
        let s = UdpSocket::from_std(s)?;
        tokio::spawn(serve(coord.clone(), s, limiter.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stun_bind_arguments() {
        assert_eq!(StunBind::from_args(&[]), Ok(StunBind::Default));
        assert_eq!(StunBind::from_args(&["off".into()]), Ok(StunBind::Off));
        assert!(StunBind::from_args(&["off".into(), "127.0.0.1:1".into()]).is_err());
        assert!(StunBind::from_args(&["nonsense".into()]).is_err());
        assert_eq!(
            StunBind::from_args(&["127.0.0.1:3478".into(), "[::1]:3479".into()]),
            Ok(StunBind::Addrs(vec![
                "127.0.0.1:3478".parse().unwrap(),
                "[::1]:3479".parse().unwrap()
            ]))
        );
    }
}
