//! Admission by relay token (the coordinator's Ed25519-signed token in the upgrade request,
//! in place of a client certificate), played by an attacker: an expired token, a token for
//! another key, a forged or tampered signature, and a member replaying another member's
//! token with its own WireGuard key are all refused; the genuine holder gets a session,
//! and a relay given no token key admits no token at all.

#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::OsRng;
use tabbify_api::relay_token::{Claims, SigningKey};
use tabbify_control::ca::{Ca, Validity};
use tabbify_relay::client::{self, ClientError, RelayClient};
use tabbify_relay::proto::RefuseCode;
use tabbify_relay::server::core::Limits;
use tabbify_relay::server::{self, Relay};

struct Setup {
    ca: Ca,
    relay: Relay,
    key: SigningKey,
}

async fn setup(token_key: bool) -> Setup {
    let ca = Ca::generate("relay-token-ca", Validity::days_from_now(1)).unwrap();
    let cert = ca
        .issue_coordinator(
            "relay.mesh.test",
            &["127.0.0.1".to_owned()],
            Validity::days_from_now(1),
        )
        .unwrap();
    let tls = server::server_config(&cert.cert_pem, &cert.key_pem, ca.cert_pem()).unwrap();
    let (key, _) = SigningKey::generate().unwrap();
    let relay = Relay::start_with_token_key(
        server::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics: None,
            tls,
            limits: Limits::default(),
        },
        token_key.then(|| key.public()),
    )
    .await
    .unwrap();
    Setup { ca, relay, key }
}

/// A client config with the mesh CA as root and NO client certificate.
fn anon(s: &Setup) -> client::Config {
    client::Config {
        server: s.relay.addr.to_string(),
        server_name: "127.0.0.1".into(),
        tls: tabbify_api::tls::client_config(s.ca.cert_pem(), None).unwrap(),
        proxy: None,
        stream_only: false,
        fwmark: None,
    }
}

fn wg_key() -> ([u8; 32], [u8; 32]) {
    let s = StaticSecret::random_from_rng(OsRng);
    (s.to_bytes(), PublicKey::from(&s).to_bytes())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(k: &SigningKey, identity: &str, key: [u8; 32], issued_at: u64) -> String {
    k.mint(&Claims {
        identity: identity.into(),
        key,
        issued_at,
        expires_at: issued_at + 300,
    })
    .unwrap()
}

fn assert_unauthenticated(r: Result<RelayClient, ClientError>, code: &str, what: &str) {
    match r {
        Err(ClientError::Upgrade(m)) => assert!(
            m.contains("401") && m.contains(&format!("\"code\":\"{code}\"")),
            "{what}: {m}"
        ),
        Err(e) => panic!("{what}: wrong refusal: {e}"),
        Ok(_) => panic!("{what}: got a session"),
    }
}

#[tokio::test]
async fn a_valid_token_admits_its_own_key_only() {
    let s = setup(true).await;
    let (secret, public) = wg_key();
    let t = token(&s.key, "n1", public, now());
    let c = RelayClient::connect_with_token(&anon(&s), &secret, Some(&t))
        .await
        .unwrap();
    assert_eq!(c.lookup(&public).await.unwrap(), Some(c.handle));

    // Another member (its own WireGuard key) replays n1's token: the proof is for its key,
    // not the token's, and is refused.
    let (mallory, _) = wg_key();
    match RelayClient::connect_with_token(&anon(&s), &mallory, Some(&t)).await {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, RefuseCode::BadProof as u8);
            assert!(reason.contains("another WireGuard key"), "{reason}");
        }
        Err(e) => panic!("replay: wrong refusal: {e}"),
        Ok(_) => panic!("a replayed token opened a session for another key"),
    }
    // n1's session is untouched.
    assert_eq!(c.lookup(&public).await.unwrap(), Some(c.handle));
    assert_eq!(s.relay.shared.sessions(), 1);
}

#[tokio::test]
async fn expired_forged_tampered_and_foreign_key_tokens_are_refused() {
    let s = setup(true).await;
    let (secret, public) = wg_key();
    let cfg = anon(&s);
    // Expired: minted an hour ago (lifetime 5 minutes).
    let old = token(&s.key, "n1", public, now() - 3600);
    assert_unauthenticated(
        RelayClient::connect_with_token(&cfg, &secret, Some(&old)).await,
        "bad_token",
        "expired",
    );
    // Forged: signed by a key that is not the coordinator's.
    let (forger, _) = SigningKey::generate().unwrap();
    let forged = token(&forger, "n1", public, now());
    assert_unauthenticated(
        RelayClient::connect_with_token(&cfg, &secret, Some(&forged)).await,
        "bad_token",
        "forged",
    );
    // Tampered: a genuine token for mallory's key with the key bytes swapped for n1's.
    let (_, mallory_public) = wg_key();
    let genuine = token(&s.key, "mallory", mallory_public, now());
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut raw = b64.decode(&genuine).unwrap();
    raw[17..49].copy_from_slice(&public);
    assert_unauthenticated(
        RelayClient::connect_with_token(&cfg, &secret, Some(&b64.encode(&raw))).await,
        "bad_token",
        "tampered",
    );
    // A genuine, live token for another key: the holder of `secret` cannot use it.
    match RelayClient::connect_with_token(&cfg, &secret, Some(&genuine)).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, RefuseCode::BadProof as u8),
        Err(e) => panic!("token for another key: wrong refusal: {e}"),
        Ok(_) => panic!("a token for another key opened a session"),
    }
    // Garbage and no token at all.
    assert_unauthenticated(
        RelayClient::connect_with_token(&cfg, &secret, Some("x.y")).await,
        "bad_token",
        "garbage",
    );
    assert_unauthenticated(
        RelayClient::connect(&cfg, &secret).await,
        "unauthenticated",
        "no token",
    );
    assert_eq!(s.relay.shared.sessions(), 0);
    assert_eq!(s.relay.shared.metrics.tokens_refused(), 4);
}

#[tokio::test]
async fn a_relay_without_a_token_key_admits_no_token() {
    let s = setup(false).await;
    let (secret, public) = wg_key();
    let t = token(&s.key, "n1", public, now());
    assert_unauthenticated(
        RelayClient::connect_with_token(&anon(&s), &secret, Some(&t)).await,
        "unauthenticated",
        "no token key",
    );
}
