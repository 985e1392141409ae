//! The relay's UDP port answers STUN Binding requests (so joiners can use it as a STUN
//! server), and an attacker flooding requests with a victim's source address gets at most
//! the per-source answer rate while other sources are still answered.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tabbify_api::stun;
use tabbify_api::stun_limit::{DEFAULT_BURST, DEFAULT_PER_SEC};
use tabbify_control::ca::{Ca, Validity};
use tabbify_relay::server::core::{Drop, Limits};
use tabbify_relay::server::{self, Relay};
use tokio::net::UdpSocket;

async fn start() -> Relay {
    let ca = Ca::generate("relay-stun-ca", Validity::days_from_now(1)).unwrap();
    let cert = ca
        .issue_coordinator(
            "relay.mesh.test",
            &["127.0.0.1".to_owned()],
            Validity::days_from_now(1),
        )
        .unwrap();
    let tls = server::server_config(&cert.cert_pem, &cert.key_pem, ca.cert_pem()).unwrap();
    Relay::start(server::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics: None,
        tls,
        limits: Limits::default(),
    })
    .await
    .unwrap()
}

fn request(i: u32) -> Vec<u8> {
    let mut txid = [7u8; 12];
    txid[..4].copy_from_slice(&i.to_be_bytes());
    stun::binding_request(&txid).to_vec()
}

/// Asks once (retrying on loss) and returns the mapped address answered.
async fn ask(s: &UdpSocket, relay: SocketAddr, i: u32) -> SocketAddr {
    let req = request(i);
    let txid = stun::parse(&req).unwrap().transaction_id;
    let mut buf = [0u8; 1500];
    for _ in 0..20 {
        s.send_to(&req, relay).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await
        {
            let m = stun::parse(&buf[..n]).unwrap();
            if let Some(a) = m.binding_success_for(&txid) {
                return a;
            }
        }
    }
    panic!("no STUN answer from the relay");
}

#[tokio::test]
async fn binding_requests_are_answered_with_the_source_address() {
    let relay = start().await;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(ask(&s, relay.addr, 1).await, s.local_addr().unwrap());
    assert_eq!(relay.shared.metrics.stun_answers(), 1);
}

#[tokio::test]
async fn a_spoofed_flood_gets_at_most_the_per_source_rate_and_others_are_still_answered() {
    let relay = start().await;
    // The attacker's requests all carry the victim's source address (here: the victim's
    // own socket sends them, which is what a spoofer's packets look like to the relay).
    let victim = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    const FLOOD: u64 = 2000;
    let t0 = Instant::now();
    for i in 0..FLOOD {
        victim
            .send_to(&request(i as u32), relay.addr)
            .await
            .unwrap();
    }
    let m = &relay.shared.metrics;
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.stun_answers() + m.drops(Drop::StunRateLimited) < FLOOD {
        assert!(
            Instant::now() < deadline,
            "the relay did not account for every request: {} answered, {} limited",
            m.stun_answers(),
            m.drops(Drop::StunRateLimited)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = t0.elapsed().as_secs() + 1;
    let answered = m.stun_answers();
    let bound = u64::from(DEFAULT_BURST) + u64::from(DEFAULT_PER_SEC) * elapsed;
    assert!(
        answered <= bound,
        "{answered} answers to one source in {elapsed} s (limit {bound})"
    );
    assert!(answered >= u64::from(DEFAULT_BURST));
    // What reached the victim is what was answered, no more.
    let mut buf = [0u8; 1500];
    let mut received = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), victim.recv_from(&mut buf)).await
    {
        received += 1;
    }
    assert!(received <= answered);
    // Another source is answered while the victim's bucket is spent.
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    assert_eq!(
        ask(&other, relay.addr, 99_999).await,
        other.local_addr().unwrap()
    );
}
