//! Fuzz the coordinator's JSON request bodies through the path its routes use.
//!
//! 1. Every request type the coordinator parses (`RegisterRequest`, `HeartbeatRequest`,
//!    `TokenRequest`, `MoveAppRequest`, `RelayTokenRequest`, `LeaveRequest`, `PolicyTestRequest`,
//!    `LoginLinkRequest`, and the auth service's `AuthValidateResponse`) goes
//!    through `server::parse_json`: it parses or is refused with 400 `invalid_json`, never a
//!    panic, and a parsed value serializes back to JSON that parses to the same value.
//! 2. The same bytes are the body of every POST route of an in-process coordinator
//!    (`Coordinator::handle`, plaintext with the identity header, a registered peer and an
//!    admin; `leave` as an identity that is no member, so the peer stays for the other
//!    routes): each answer is a status, and every error status carries the JSON error body.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tabbify_api::{
    AuthValidateResponse, ErrorBody, HeartbeatRequest, LeaveRequest, LoginLinkRequest,
    MoveAppRequest, PolicyDocument, PolicyTestRequest, RegisterRequest, RelayTokenRequest,
    TokenRequest,
};
use tabbify_control::clock::ManualClock;
use tabbify_control::limits::RateConfig;
use tabbify_control::server::{self, Config, ConnInfo, Coordinator, INSECURE_IDENTITY_HEADER};

fn round_trip<T>(data: &[u8])
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    match server::parse_json::<T>(data) {
        Ok(v) => {
            let text = serde_json::to_vec(&v).expect("a parsed request serializes");
            let back: T = server::parse_json(&text).expect("a serialized request parses");
            assert_eq!(back, v);
        }
        Err(e) => assert_eq!(e.code(), "invalid_json"),
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    coord: Arc<Coordinator>,
    peer_id: String,
}

const PEER: &str = "fuzz-peer";
const ADMIN: &str = "fuzz-admin";

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let policy: PolicyDocument = serde_json::from_str(
            r#"{"tags":["node","supervisor"],"app_hosts":["tag:supervisor"],
                "allow":[{"src":["*"],"dst":["*"]}]}"#,
        )
        .expect("policy");
        let mut config = Config::new(policy, "fuzz".into());
        config.insecure = true;
        config.admins = [ADMIN.to_string()].into();
        config.heartbeat_rate = RateConfig {
            burst: u32::MAX,
            per_sec: 1e9,
        };
        let coord = Coordinator::new(config, Arc::new(ManualClock::new(1_700_000_000_000)))
            .expect("coordinator");
        let token = rt.block_on(call(
            &coord,
            ADMIN,
            "/v1/tokens",
            br#"{"tags":["supervisor"],"max_uses":1}"#,
        ));
        let token: serde_json::Value = serde_json::from_slice(&token.1).expect("token");
        let body = serde_json::json!({
            "name": PEER, "public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "wg_listen_port": 51820, "join_token": token["token"],
        });
        let (status, reg) = rt.block_on(call(
            &coord,
            PEER,
            "/v1/mesh/register",
            body.to_string().as_bytes(),
        ));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reg));
        let reg: serde_json::Value = serde_json::from_slice(&reg).expect("registration");
        let peer_id = reg["peer_id"].as_str().expect("peer id").to_owned();
        World { rt, coord, peer_id }
    })
}

async fn call(coord: &Arc<Coordinator>, identity: &str, path: &str, body: &[u8]) -> (u16, Bytes) {
    let conn = ConnInfo {
        remote: SocketAddr::from(([127, 0, 0, 1], 40000)),
        local: None,
        identity: None,
        admin_role: false,
    };
    let req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json")
        .header(INSECURE_IDENTITY_HEADER, identity)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let resp = coord.handle(&conn, req).await;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (status, bytes)
}

fuzz_target!(|data: &[u8]| {
    round_trip::<RegisterRequest>(data);
    round_trip::<HeartbeatRequest>(data);
    round_trip::<TokenRequest>(data);
    round_trip::<MoveAppRequest>(data);
    round_trip::<RelayTokenRequest>(data);
    round_trip::<AuthValidateResponse>(data);
    round_trip::<LeaveRequest>(data);
    round_trip::<PolicyTestRequest>(data);
    round_trip::<LoginLinkRequest>(data);

    let w = world();
    let routes = [
        (PEER, "/v1/mesh/register".to_owned()),
        (PEER, "/v1/mesh/heartbeat".to_owned()),
        (PEER, "/v1/relay/token".to_owned()),
        ("fuzz-stranger", "/v1/mesh/leave".to_owned()),
        (ADMIN, "/v1/tokens".to_owned()),
        (ADMIN, "/v1/policy/test".to_owned()),
        (ADMIN, "/v1/admin/login-links".to_owned()),
        (
            ADMIN,
            "/v1/apps/00000000-0000-0000-0000-000000000001/move".to_owned(),
        ),
    ];
    for (identity, path) in &routes {
        let (status, body) = w.rt.block_on(call(&w.coord, identity, path, data));
        if status >= 400 {
            let e: ErrorBody = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("{path}: {status} without a JSON error body"));
            assert!(!e.code.is_empty());
        }
    }
    // The registered peer is still there (a bad body changes nothing it should not).
    let _ = &w.peer_id;
});
