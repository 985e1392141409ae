//! Traffic between namespaces: ping, a TCP transfer verified by SHA-256 on both ends, and
//! numbered UDP datagrams each checked for its size and bytes.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::Rng;

use crate::netns::Netns;
use crate::process::Process;
use crate::wait;

/// Where the transfer receivers listen: below Linux's ephemeral range (32768–60999 by
/// default), so a listener never collides with the local port of a connection already in
/// the namespace (a full test run once lost `ours_uring_initiates_to_boringtun` to
/// "Address already in use" with the old 20000–60000).
const LISTEN_PORTS: std::ops::Range<u16> = 20_000..32_768;

/// The summary of one `ping` run.
#[derive(Debug, Clone, PartialEq)]
pub struct PingStats {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
    /// Average round-trip time in milliseconds, when any reply came back.
    pub avg_ms: Option<f64>,
}

/// Runs `ping -c COUNT -i INTERVAL -w DEADLINE ADDR` in `netns` and parses its summary,
/// where DEADLINE is COUNT × INTERVAL plus two seconds for the last reply.
/// Replies missing is not an error here; check [`PingStats::received`].
pub fn ping(netns: &Netns, addr: IpAddr, count: u32, interval: &str) -> Result<PingStats> {
    let seconds: f64 = interval
        .parse()
        .with_context(|| format!("ping interval {interval:?}"))?;
    let deadline = (f64::from(count) * seconds).ceil() as u64 + 2;
    let output = netns
        .command("ping")
        .args(["-n", "-q", "-c", &count.to_string(), "-i", interval])
        .args(["-w", &deadline.to_string()])
        .arg(addr.to_string())
        .output()
        .context("running ping")?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_ping(&text).with_context(|| {
        format!(
            "ping {addr} in {}: {text}{}",
            netns.name(),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Pings `addr` once a try until a reply comes back, for at most `timeout`.
pub fn wait_ping(netns: &Netns, addr: IpAddr, timeout: Duration) -> Result<()> {
    wait::until(
        &format!("a ping reply from {addr} in {}", netns.name()),
        timeout,
        || {
            let stats = ping(netns, addr, 1, "0.2")?;
            Ok((stats.received > 0).then_some(()))
        },
    )
}

fn parse_ping(text: &str) -> Result<PingStats> {
    let summary = text
        .lines()
        .find(|line| line.contains("packets transmitted"))
        .context("no summary line")?;
    let number_before = |word: &str| -> Result<u32> {
        let fields: Vec<&str> = summary
            .split([',', ' '])
            .filter(|f| !f.is_empty())
            .collect();
        let index = fields
            .iter()
            .position(|f| *f == word)
            .with_context(|| format!("no {word:?}"))?;
        fields
            .get(index.wrapping_sub(1))
            .context("no count")?
            .parse()
            .with_context(|| format!("count before {word:?}"))
    };
    let transmitted = number_before("packets")?;
    let received = number_before("received")?;
    let avg_ms = text
        .lines()
        .find_map(|line| {
            line.split_once(" = ")
                .filter(|(name, _)| name.starts_with("rtt"))
        })
        .map(|(_, values)| -> Result<f64> {
            values
                .split('/')
                .nth(1)
                .context("rtt line without avg")?
                .parse()
                .context("rtt avg")
        })
        .transpose()?;
    Ok(PingStats {
        transmitted,
        received,
        avg_ms,
    })
}

/// The outcome of a verified transfer.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Bytes moved (equal on both ends).
    pub bytes: u64,
    /// Their SHA-256 (equal on both ends), hex.
    pub sha256: String,
    /// Wall time from connect to the receiver's close, for information only.
    pub elapsed: Duration,
}

/// Sends `bytes` pseudo-random bytes over TCP from `from` to `to_addr` (an address of
/// namespace `to`) with the `tabbify-xfer` helper at `xfer`, and checks that both ends
/// counted the same number of bytes with the same SHA-256. The whole transfer must end
/// within `timeout`.
pub fn tcp_transfer(
    xfer: &Path,
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    bytes: u64,
    timeout: Duration,
) -> Result<Transfer> {
    let mut rng = rand::thread_rng();
    let port: u16 = rng.gen_range(LISTEN_PORTS);
    let seed: u64 = rng.gen();
    let mut receiver = Process::spawn(to.clone(), &format!("xfer-recv-{port}"), {
        let mut command = to.command(xfer);
        command.args(["recv", &port.to_string()]);
        command
    })?;
    receiver.wait_for_log("LISTENING", Duration::from_secs(10))?;

    let start = Instant::now();
    let target = SocketAddr::new(to_addr, port);
    let mut sender = Process::spawn(from.clone(), &format!("xfer-send-{port}"), {
        let mut command = from.command(xfer);
        command.args([
            "send",
            &target.to_string(),
            &bytes.to_string(),
            &seed.to_string(),
        ]);
        command
    })?;
    let sent_status = sender.wait_exit(timeout).with_context(|| {
        format!(
            "sending {bytes} bytes to {target}; sender log:\n{}",
            sender.logs()
        )
    })?;
    let elapsed = start.elapsed();
    ensure!(
        sent_status.success(),
        "sender failed ({sent_status}):\n{}",
        sender.logs()
    );
    let received_status = receiver.wait_exit(Duration::from_secs(10))?;
    ensure!(
        received_status.success(),
        "receiver failed ({received_status}):\n{}",
        receiver.logs()
    );

    let (sent_bytes, sent_hash) = parse_report(&sender.logs(), "SENT")?;
    let (got_bytes, got_hash) = parse_report(&receiver.logs(), "RECEIVED")?;
    ensure!(
        sent_bytes == bytes,
        "sender reports {sent_bytes} bytes, asked for {bytes}"
    );
    if got_bytes != sent_bytes || got_hash != sent_hash {
        bail!(
            "transfer to {target} corrupted: sent {sent_bytes} bytes sha256 {sent_hash}, \
             received {got_bytes} bytes sha256 {got_hash}"
        );
    }
    Ok(Transfer {
        bytes,
        sha256: sent_hash,
        elapsed,
    })
}

/// What the UDP receiver saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpReport {
    /// Datagrams that arrived with their exact size and bytes, once each.
    pub good: u32,
    /// Datagrams that arrived altered (wrong size, wrong bytes, unknown number).
    pub bad: u32,
    /// Datagrams that arrived more than once.
    pub dup: u32,
}

/// Sends `count` numbered datagrams (`tabbify-xfer udp-send`, bursts of 64) from `from`
/// to `to_addr` in `to` and returns what the receiver saw.
pub fn udp_transfer(
    xfer: &Path,
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    count: u32,
) -> Result<UdpReport> {
    let port: u16 = rand::thread_rng().gen_range(LISTEN_PORTS);
    let mut receiver = Process::spawn(to.clone(), &format!("udp-recv-{port}"), {
        let mut command = to.command(xfer);
        command.args(["udp-recv", &port.to_string(), &count.to_string()]);
        command
    })?;
    receiver.wait_for_log("LISTENING", Duration::from_secs(10))?;
    let mut sender = Process::spawn(from.clone(), &format!("udp-send-{port}"), {
        let mut command = from.command(xfer);
        command.args([
            "udp-send",
            &SocketAddr::new(to_addr, port).to_string(),
            &count.to_string(),
        ]);
        command
    })?;
    let sent = sender.wait_exit(Duration::from_secs(60))?;
    ensure!(
        sent.success(),
        "UDP sender failed ({sent}):\n{}",
        sender.logs()
    );
    let received = receiver.wait_exit(Duration::from_secs(30))?;
    ensure!(
        received.success(),
        "UDP receiver failed ({received}):\n{}",
        receiver.logs()
    );
    let log = receiver.logs();
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("UDP-RECEIVED "))
        .with_context(|| format!("no UDP-RECEIVED line in:\n{log}"))?;
    let n: Vec<u32> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad UDP-RECEIVED line {line:?}"))?;
    let [good, bad, dup] = n[..] else {
        bail!("bad UDP-RECEIVED line {line:?}");
    };
    Ok(UdpReport { good, bad, dup })
}

fn parse_report(log: &str, tag: &str) -> Result<(u64, String)> {
    let line = log
        .lines()
        .find_map(|line| line.strip_prefix(tag).map(str::trim))
        .with_context(|| format!("no {tag} line in:\n{log}"))?;
    let (count, hash) = line
        .split_once(' ')
        .with_context(|| format!("bad {tag} line {line:?}"))?;
    ensure!(hash.len() == 64, "bad sha256 in {line:?}");
    Ok((
        count
            .parse()
            .with_context(|| format!("bad count in {line:?}"))?,
        hash.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summaries() {
        let ok =
            "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\n--- 10.0.0.2 ping statistics ---\n\
                  20 packets transmitted, 19 received, 5% packet loss, time 960ms\n\
                  rtt min/avg/max/mdev = 0.041/0.064/0.120/0.015 ms\n";
        assert_eq!(
            parse_ping(ok).unwrap(),
            PingStats {
                transmitted: 20,
                received: 19,
                avg_ms: Some(0.064)
            }
        );
        let none = "--- fd5a::2 ping statistics ---\n3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2040ms\n";
        assert_eq!(
            parse_ping(none).unwrap(),
            PingStats {
                transmitted: 3,
                received: 0,
                avg_ms: None
            }
        );
        assert!(parse_ping("ping: connect: Network is unreachable\n").is_err());
    }

    #[test]
    fn parses_transfer_reports() {
        let hash = "a".repeat(64);
        assert_eq!(
            parse_report(&format!("x\nSENT 42 {hash}\n"), "SENT").unwrap(),
            (42, hash.clone())
        );
        assert!(parse_report("RECEIVED 42 short\n", "RECEIVED").is_err());
        assert!(parse_report("nothing\n", "SENT").is_err());
    }
}
