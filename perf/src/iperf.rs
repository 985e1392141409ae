//! One iperf3 or ping measurement between the two namespaces.
//!
//! The iperf3 server runs in the right namespace for the life of one implementation's
//! turn; each client runs in the left namespace with `-J` and is parsed from its JSON.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tabbify_tests::traffic::ping;
use tabbify_tests::{Netns, Process};

/// The iperf3 port inside the right namespace.
pub const PORT: &str = "5201";

/// UDP payload that fits a 1420-byte tunnel MTU without fragmenting (1420 − 20 − 8).
pub const UDP_PAYLOAD: &str = "1392";

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// iperf3 TCP, one stream.
    Tcp1,
    /// iperf3 TCP, four parallel streams.
    Tcp4,
    /// UDP from the suite's own GSO sender (`udpload`), rate delivered to the receiver.
    Udp,
    /// iperf3 UDP at unlimited rate (`-b 0`), rate delivered to the receiver: kept next to
    /// [`Metric::Udp`] for comparison with earlier runs (iperf3 offers less).
    UdpIperf,
    /// Idle round-trip time, 20 pings 50 ms apart.
    Ping,
}

impl Metric {
    /// Every metric, in run order.
    pub const ALL: [Metric; 5] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::Udp,
        Metric::UdpIperf,
        Metric::Ping,
    ];

    /// The name `--tests` takes.
    pub fn test_name(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp1",
            Metric::Tcp4 => "tcp4",
            Metric::Udp => "udp",
            Metric::UdpIperf => "udp-iperf3",
            Metric::Ping => "ping",
        }
    }

    /// Key used in the JSON file and the table.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp1_gbps",
            Metric::Tcp4 => "tcp4_gbps",
            Metric::Udp => "udp_delivered_gbps",
            Metric::UdpIperf => "udp_iperf3_gbps",
            Metric::Ping => "ping_avg_ms",
        }
    }

    /// Column title.
    pub fn title(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream (Gbit/s)",
            Metric::Tcp4 => "TCP 4 streams (Gbit/s)",
            Metric::Udp => "UDP delivered, GSO sender (Gbit/s)",
            Metric::UdpIperf => "UDP delivered, iperf3 (Gbit/s)",
            Metric::Ping => "ping avg (ms)",
        }
    }

    /// Whether a larger value is better.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::Ping)
    }
}

/// A measured value plus what iperf3 said about losses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Gbit/s for throughput metrics, milliseconds for ping.
    pub value: f64,
    /// TCP retransmissions (TCP) or lost datagrams (UDP) or lost pings.
    pub lost: Option<u64>,
}

/// An iperf3 server in `netns`, stopped on drop.
pub struct Server {
    process: Process,
}

impl Server {
    /// Starts `iperf3 -s` and waits until it listens.
    pub fn start(netns: &Netns) -> Result<Server> {
        let mut process = netns.spawn(
            "iperf3-server",
            "iperf3",
            &["-s", "-p", PORT, "--forceflush"],
        )?;
        process.wait_for_log("Server listening", Duration::from_secs(10))?;
        Ok(Server { process })
    }

    /// Fails if the server died.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.process.ensure_running()
    }
}

/// Runs `metric` from `client` to `server_addr` (in `server`) for `duration`;
/// `udp_offer_gbps` paces the GSO UDP sender (0: unpaced).
pub fn measure_between(
    client: &Netns,
    server: &Netns,
    server_addr: IpAddr,
    metric: Metric,
    duration: u32,
    udp_offer_gbps: f64,
) -> Result<Sample> {
    if metric == Metric::Udp {
        let outcome =
            crate::udpload::measure(client, server, server_addr, duration, udp_offer_gbps)?;
        eprintln!(
            "perf:   udp: offered {:.2} Gbit/s (GSO {}, {} calls, {} refused), delivered {:.2}, \
             {} GRO super-packets received, {} duplicates",
            outcome.offered_gbps,
            if outcome.blast.gso { "on" } else { "off" },
            outcome.blast.calls,
            outcome.blast.refused,
            outcome.delivered_gbps,
            outcome.sink.coalesced,
            outcome.sink.duplicates
        );
        return Ok(Sample {
            value: outcome.delivered_gbps,
            lost: Some(outcome.lost),
        });
    }
    measure(client, server_addr, metric, duration)
}

/// Runs `metric` from `client` to `server_addr` for `duration` with iperf3 or ping
/// ([`Metric::Udp`] needs the server's namespace: [`measure_between`]).
pub fn measure(
    client: &Netns,
    server_addr: IpAddr,
    metric: Metric,
    duration: u32,
) -> Result<Sample> {
    if metric == Metric::Udp {
        bail!("the GSO UDP sender runs through measure_between");
    }
    if metric == Metric::Ping {
        let stats = ping(client, server_addr, 20, "0.05")?;
        let avg = stats
            .avg_ms
            .with_context(|| format!("no ping replies from {server_addr}"))?;
        return Ok(Sample {
            value: avg,
            lost: Some(u64::from(stats.transmitted.saturating_sub(stats.received))),
        });
    }
    let mut args = vec![
        "-c".to_owned(),
        server_addr.to_string(),
        "-p".to_owned(),
        PORT.to_owned(),
        "-t".to_owned(),
        duration.to_string(),
        "-J".to_owned(),
    ];
    match metric {
        Metric::Tcp4 => args.extend(["-P", "4"].map(str::to_owned)),
        Metric::UdpIperf => {
            args.extend(["-u", "-b", "0", "-l", UDP_PAYLOAD].map(str::to_owned));
        }
        Metric::Tcp1 | Metric::Udp | Metric::Ping => {}
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut process = client.spawn(&format!("iperf3-{}", metric.key()), "iperf3", &args)?;
    let status = process.wait_exit(Duration::from_secs(u64::from(duration) + 30))?;
    let output = process.logs();
    let json =
        parse_json(&output).with_context(|| format!("iperf3 ({status}) printed:\n{output}"))?;
    if let Some(error) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3: {error}");
    }
    sample(&json, metric)
}

fn parse_json(output: &str) -> Result<Value> {
    let start = output.find('{').context("no JSON in iperf3 output")?;
    let end = output.rfind('}').context("no JSON in iperf3 output")?;
    serde_json::from_str(&output[start..=end]).context("parsing iperf3 JSON")
}

fn sample(json: &Value, metric: Metric) -> Result<Sample> {
    let end = json.get("end").context("iperf3 JSON without \"end\"")?;
    let received = end
        .get("sum_received")
        .context("iperf3 JSON without end.sum_received")?;
    let bps = received
        .get("bits_per_second")
        .and_then(Value::as_f64)
        .context("end.sum_received.bits_per_second")?;
    let lost = match metric {
        Metric::Udp | Metric::UdpIperf => received.get("lost_packets").and_then(Value::as_u64),
        _ => end
            .get("sum_sent")
            .and_then(|sent| sent.get("retransmits"))
            .and_then(Value::as_u64),
    };
    Ok(Sample {
        value: bps / 1e9,
        lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_delivered_rates() {
        let udp = r#"noise {"end":{"sum_sent":{"bits_per_second":8.0e8},
            "sum_received":{"bits_per_second":3.4e8,"lost_packets":93711}}} "#;
        let json = parse_json(udp).unwrap();
        let s = sample(&json, Metric::UdpIperf).unwrap();
        assert!((s.value - 0.34).abs() < 1e-9);
        assert_eq!(s.lost, Some(93711));
        let tcp = r#"{"end":{"sum_sent":{"bits_per_second":1.2e9,"retransmits":7},
            "sum_received":{"bits_per_second":1.15e9}}}"#;
        let s = sample(&parse_json(tcp).unwrap(), Metric::Tcp1).unwrap();
        assert!((s.value - 1.15).abs() < 1e-9);
        assert_eq!(s.lost, Some(7));
        assert!(sample(&parse_json(r#"{"start":{}}"#).unwrap(), Metric::Tcp1).is_err());
        assert!(parse_json("iperf3: error - unable to connect").is_err());
    }
}
