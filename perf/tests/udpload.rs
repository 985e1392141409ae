//! Namespace smoke test of the suite's UDP load generator (`udp-blast` with UDP GSO,
//! `udp-sink` with `UDP_GRO`): two namespaces over a veth, the real binary at both ends,
//! and a stranger spraying short datagrams and replays at the receiver's port meanwhile.
//! The receiver must count only the run's distinct datagrams and never more than were
//! sent.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{Netns, Process, VethOptions, VethPair};

const TAG: &str = "udpload-result: ";

fn result(process: &Process) -> Value {
    let log = process.logs();
    let line = log
        .lines()
        .find_map(|l| l.split_once(TAG).map(|(_, json)| json))
        .unwrap_or_else(|| panic!("{} printed no result:\n{log}", process.label()));
    serde_json::from_str(line).expect("the result line is JSON")
}

#[test]
fn gso_sender_is_counted_by_the_receiver_and_strangers_are_not() {
    require(&[Tool::Iproute2]).unwrap();
    let exe = env!("CARGO_BIN_EXE_tabbify-perf");
    let left = Netns::new().unwrap();
    let right = Netns::new().unwrap();
    let veth = VethPair::connect(&left, &right, &VethOptions::default()).unwrap();
    let to = SocketAddr::new(veth.b.addr(false), 5202).to_string();

    let mut sink = right
        .spawn(
            "udp-sink",
            exe,
            &["udp-sink", "--bind", &to, "--deadline", "20"],
        )
        .unwrap();
    sink.wait_for_log("udp-sink listening", Duration::from_secs(10))
        .unwrap();
    // The attacker: datagrams too short to carry a sequence number, and replays of
    // sequence numbers the sender uses (0, 1, 2: sent before the blaster starts, so the
    // blaster's own are the replays and are counted once).
    let ip = veth.b.addr(false);
    let spray = format!(
        "for i in $(seq 50); do printf xyz > /dev/udp/{ip}/5202; done; \
         for n in 00 01 02; do printf \"\\x$n\\x00\\x00\\x00\\x00\\x00\\x00\\x00qqqq\" \
         > /dev/udp/{ip}/5202; done"
    );
    left.run("bash", &["-c", &spray]).unwrap();
    let mut blaster = left
        .spawn(
            "udp-blast",
            exe,
            &[
                "udp-blast",
                "--to",
                &to,
                "--seconds",
                "2",
                // Paced: the test checks counting, not the machine's limit, and shares it.
                "--offer-gbps",
                "1",
            ],
        )
        .unwrap();
    assert!(blaster
        .wait_exit(Duration::from_secs(20))
        .unwrap()
        .success());
    assert!(sink.wait_exit(Duration::from_secs(25)).unwrap().success());
    let sent = result(&blaster);
    let got = result(&sink);
    let sent_datagrams = sent["datagrams"].as_u64().unwrap();
    let received = got["datagrams"].as_u64().unwrap();
    assert!(sent_datagrams > 1000, "sent {sent}");
    assert!(received > 0, "received {got}");
    // Every distinct sequence number counts once: the sender's 0..=2 were already seen
    // from the stranger, so at most sent + 0 distinct.
    assert!(received <= sent_datagrams, "sent {sent}, received {got}");
    assert_eq!(got["malformed"].as_u64(), Some(50), "{got}");
    assert!(got["duplicates"].as_u64().unwrap() >= 3, "{got}");
    // Over a veth (checksum offload on) the kernel takes GSO.
    assert_eq!(sent["gso"], Value::Bool(true), "{sent}");
}
