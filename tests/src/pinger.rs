//! A ping running in the background with a timestamp on every line, to tell when traffic
//! stopped relative to an event (a policy change, a revocation) or that it never did (a
//! coordinator outage).
//!
//! `ping -n -D -O -i INTERVAL ADDR` prints `[UNIX.MICROS] 64 bytes from …: icmp_seq=N …` for
//! each reply and `[UNIX.MICROS] no answer yet for icmp_seq=N` for each request left
//! unanswered when the next one goes out. Timestamps are the kernel's wall clock, the same
//! clock [`unix_now`] reads, so they compare with instants taken in the test.
//!
//! Invariant: the ping process is ours (spawned in the namespace, killed by PID when the
//! [`Pinger`] drops).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Result};

use crate::netns::Netns;
use crate::process::Process;
use crate::wait;

/// A reply this recent before a change shows that traffic was flowing when it happened.
const FLOWING: Duration = Duration::from_millis(500);

/// A background ping.
pub struct Pinger {
    process: Process,
    addr: IpAddr,
}

/// One line of ping's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PingEvent {
    /// A reply arrived at the time given (Unix seconds).
    Reply {
        /// Sequence number.
        seq: u32,
        /// Arrival, Unix seconds.
        at: f64,
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

    /// Arrival times of every reply so far.
    pub fn replies(&self) -> Vec<f64> {
        self.events()
            .into_iter()
            .filter_map(|event| match event {
                PingEvent::Reply { at, .. } => Some(at),
                PingEvent::Missing { .. } => None,
            })
            .collect()
    }

    /// Waits until a reply arrives later than `after` (Unix seconds), for at most
    /// `timeout`.
    pub fn wait_reply_after(&mut self, after: f64, timeout: Duration) -> Result<()> {
        let addr = self.addr;
        wait::until(&format!("a ping reply from {addr}"), timeout, || {
            self.process.ensure_running().map_err(wait::fatal)?;
            Ok(self.replies().iter().any(|&at| at > after).then_some(()))
        })
    }

    /// Checks that traffic stopped within `bound` of `since` (Unix seconds): fails unless a
    /// reply arrived in the half second before `since` (so traffic was flowing); waits
    /// until `observe` has passed after `since + bound` with ping still running, then fails
    /// if any reply arrived later than `since + bound`. Returns when the last reply arrived,
    /// relative to `since` (negative if none came after it).
    pub fn check_cut(&mut self, since: f64, bound: Duration, observe: Duration) -> Result<f64> {
        ensure!(
            self.replies()
                .iter()
                .any(|&at| at <= since && since - at <= FLOWING.as_secs_f64()),
            "no ping reply from {} in the {FLOWING:?} before the change: traffic was not \
             flowing; log:\n{}",
            self.addr,
            self.process.logs()
        );
        let end = since + (bound + observe).as_secs_f64();
        wait::until_true(
            "the observation window to pass",
            bound + observe + Duration::from_secs(5),
            || unix_now() > end,
        )?;
        self.process.ensure_running()?;
        let last = self.replies().last().copied().unwrap_or(since) - since;
        if last > bound.as_secs_f64() {
            bail!(
                "ping to {} still answered {last:.3} s after the change (bound {:.3} s); log:\n{}",
                self.addr,
                bound.as_secs_f64(),
                self.process.logs()
            );
        }
        Ok(last)
    }

    /// Checks that every request sent in `window` after `since` was answered: waits until
    /// the window has passed, then fails on a `no answer yet` line in it or if no reply
    /// came at all. Returns the number of replies in the window.
    pub fn check_uninterrupted(&mut self, since: f64, window: Duration) -> Result<usize> {
        let end = since + window.as_secs_f64();
        wait::until_true(
            "the observation window to pass",
            window + Duration::from_secs(5),
            || unix_now() > end,
        )?;
        self.process.ensure_running()?;
        let events = self.events();
        let in_window = |at: f64| at > since && at <= end;
        let missing: Vec<u32> = events
            .iter()
            .filter_map(|event| match *event {
                PingEvent::Missing { seq, at } if in_window(at) => Some(seq),
                _ => None,
            })
            .collect();
        let replies = events
            .iter()
            .filter(|event| matches!(event, PingEvent::Reply { at, .. } if in_window(*at)))
            .count();
        ensure!(
            missing.is_empty() && replies > 0,
            "ping to {}: {replies} replies and unanswered requests {missing:?} in the {:.1} s \
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

fn parse_line(line: &str) -> Option<PingEvent> {
    let rest = line.strip_prefix('[')?;
    let (stamp, text) = rest.split_once(']')?;
    let at: f64 = stamp.parse().ok()?;
    let seq: u32 = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("icmp_seq="))?
        .parse()
        .ok()?;
    if text.contains("bytes from") {
        Some(PingEvent::Reply { seq, at })
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
                at: 1_763_945_000.123_456
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
