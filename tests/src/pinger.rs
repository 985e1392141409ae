//! A ping running in the background with a timestamp on every line, to tell when traffic
//! stopped relative to an event (a policy change, a revocation) or that it never did (a
//! coordinator outage).
//!
//! `ping -n -D -O -i INTERVAL ADDR` prints `[UNIX.MICROS] 64 bytes from …: icmp_seq=N …
//! time=RTT ms` for each reply and `[UNIX.MICROS] no answer yet for icmp_seq=N` for each
//! request still unanswered when the next one goes out. A reply's request left at its
//! arrival time minus its round-trip time, so every check here is about when requests were
//! *sent*: a reply that arrives late to a request sent in time does not count against a
//! cut-off, and a request reported missing whose reply arrives later is not lost.
//! Timestamps are the kernel's wall clock, the same clock [`unix_now`] reads, so they
//! compare with instants taken in the test.
//!
//! Invariant: the ping process is ours (spawned in the namespace, killed by PID when the
//! [`Pinger`] drops).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Result};

use crate::netns::Netns;
use crate::process::Process;
use crate::wait;

/// A reply to a request sent this recently before a change shows that traffic was flowing
/// when it happened.
const FLOWING: Duration = Duration::from_millis(500);

/// How long after a window a reply to a request sent in it may still arrive.
const LATE_REPLY: Duration = Duration::from_secs(1);

/// A background ping.
pub struct Pinger {
    process: Process,
    addr: IpAddr,
}

/// One line of ping's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PingEvent {
    /// A reply arrived.
    Reply {
        /// Sequence number.
        seq: u32,
        /// Arrival, Unix seconds.
        at: f64,
        /// Round-trip time in seconds.
        rtt: f64,
    },
    /// The request was not answered before the next one was sent.
    Missing {
        /// Sequence number.
        seq: u32,
        /// When ping gave up on it, Unix seconds.
        at: f64,
    },
}

/// The current wall-clock time in Unix seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

impl Pinger {
    /// Starts pinging `addr` from `netns` every `interval` seconds (e.g. `"0.05"`; below
    /// 0.2 needs root, which the harness is).
    pub fn start(netns: &Netns, addr: IpAddr, interval: &str) -> Result<Pinger> {
        let mut command = netns.command("ping");
        command
            .args(["-n", "-D", "-O", "-i", interval])
            .arg(addr.to_string());
        let process = Process::spawn(netns.clone(), &format!("ping-{addr}"), command)?;
        Ok(Pinger { process, addr })
    }

    /// Every timestamped line so far, in order.
    pub fn events(&self) -> Vec<PingEvent> {
        self.process.logs().lines().filter_map(parse_line).collect()
    }

    /// Send times (Unix seconds) of every request answered so far.
    pub fn answered_sends(&self) -> Vec<f64> {
        self.events()
            .into_iter()
            .filter_map(|event| match event {
                PingEvent::Reply { at, rtt, .. } => Some(at - rtt),
                PingEvent::Missing { .. } => None,
            })
            .collect()
    }

    /// Waits until a request sent later than `after` (Unix seconds) is answered, for at
    /// most `timeout`.
    pub fn wait_reply_after(&mut self, after: f64, timeout: Duration) -> Result<()> {
        let addr = self.addr;
        wait::until(&format!("a ping reply from {addr}"), timeout, || {
            self.process.ensure_running().map_err(wait::fatal)?;
            Ok(self
                .answered_sends()
                .iter()
                .any(|&sent| sent > after)
                .then_some(()))
        })
    }

    /// Checks that traffic stopped within `bound` of `since` (Unix seconds): fails unless a
    /// request sent in the half second before `since` was answered (traffic was flowing);
    /// waits until `observe` has passed after `since + bound` with ping still running, then
    /// fails if any request sent later than `since + bound` was answered. Returns the send
    /// time of the last answered request relative to `since` (negative if none was sent
    /// after it).
    pub fn check_cut(&mut self, since: f64, bound: Duration, observe: Duration) -> Result<f64> {
        ensure!(
            self.answered_sends()
                .iter()
                .any(|&sent| sent <= since && since - sent <= FLOWING.as_secs_f64()),
            "no ping to {} sent in the {FLOWING:?} before the change was answered: traffic \
             was not flowing; log:\n{}",
            self.addr,
            self.process.logs()
        );
        let end = since + (bound + observe).as_secs_f64();
        wait_until_past(end, bound + observe)?;
        self.process.ensure_running()?;
        let last = self
            .answered_sends()
            .into_iter()
            .fold(f64::NEG_INFINITY, f64::max)
            - since;
        if last > bound.as_secs_f64() {
            bail!(
                "a ping to {} sent {last:.3} s after the change was still answered (bound \
                 {:.3} s); log:\n{}",
                self.addr,
                bound.as_secs_f64(),
                self.process.logs()
            );
        }
        Ok(last)
    }

    /// Checks that every request sent in the `window` after `since` was answered: waits
    /// until the window (and a grace second for late replies) has passed, then fails if a
    /// request ping reported missing in the window never got its reply, or if none was
    /// answered. Returns the number of requests answered in the window.
    pub fn check_uninterrupted(&mut self, since: f64, window: Duration) -> Result<usize> {
        let end = since + window.as_secs_f64();
        wait_until_past(end + LATE_REPLY.as_secs_f64(), window + LATE_REPLY)?;
        self.process.ensure_running()?;
        let events = self.events();
        let in_window = |at: f64| at > since && at <= end;
        let answered: BTreeSet<u32> = events
            .iter()
            .filter_map(|event| match *event {
                PingEvent::Reply { seq, .. } => Some(seq),
                PingEvent::Missing { .. } => None,
            })
            .collect();
        let lost: Vec<u32> = events
            .iter()
            .filter_map(|event| match *event {
                PingEvent::Missing { seq, at } if in_window(at) && !answered.contains(&seq) => {
                    Some(seq)
                }
                _ => None,
            })
            .collect();
        let replies = events
            .iter()
            .filter(
                |event| matches!(event, PingEvent::Reply { at, rtt, .. } if in_window(*at - *rtt)),
            )
            .count();
        ensure!(
            lost.is_empty() && replies > 0,
            "ping to {}: {replies} requests answered and {lost:?} lost in the {:.1} s \
             window; log:\n{}",
            self.addr,
            window.as_secs_f64(),
            self.process.logs()
        );
        Ok(replies)
    }

    /// The ping log so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }
}

/// Waits until the wall clock is past `end` (Unix seconds); `span` bounds the wait.
fn wait_until_past(end: f64, span: Duration) -> Result<()> {
    wait::until_true(
        "the observation window to pass",
        span + Duration::from_secs(5),
        || unix_now() > end,
    )
}

fn parse_line(line: &str) -> Option<PingEvent> {
    let rest = line.strip_prefix('[')?;
    let (stamp, text) = rest.split_once(']')?;
    let at: f64 = stamp.parse().ok()?;
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
    };
    let seq: u32 = field("icmp_seq=")?.parse().ok()?;
    if text.contains("bytes from") {
        let rtt_ms: f64 = field("time=")?.parse().ok()?;
        Some(PingEvent::Reply {
            seq,
            at,
            rtt: rtt_ms / 1000.0,
        })
    } else if text.contains("no answer yet") {
        Some(PingEvent::Missing { seq, at })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_timestamped_lines() {
        assert_eq!(
            parse_line("[1763945000.123456] 64 bytes from fd5a:1f00:1:2:3::1: icmp_seq=7 ttl=64 time=0.335 ms"),
            Some(PingEvent::Reply {
                seq: 7,
                at: 1_763_945_000.123_456,
                rtt: 0.000_335
            })
        );
        assert_eq!(
            parse_line("[1763945000.5] no answer yet for icmp_seq=8"),
            Some(PingEvent::Missing {
                seq: 8,
                at: 1_763_945_000.5
            })
        );
        assert_eq!(parse_line("PING fd5a::1 (fd5a::1) 56 data bytes"), None);
        assert_eq!(parse_line("ping: sendmsg: Network is unreachable"), None);
        assert_eq!(
            parse_line("[1763945001.0] From fd5a::2 icmp_seq=9 Destination unreachable"),
            None
        );
    }
}
