//! Shared test fixtures: a PKI minted with the CA code, an in-process coordinator on a
//! loopback ephemeral port, and a small HTTPS/SSE client built on hyper + rustls.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tabbify_control::api::{PolicyDocument, SseDecoder, SseEvent, SseFrame};
use tabbify_control::ca::{Ca, Issued, Validity};
use tabbify_control::clock::ManualClock;
use tabbify_control::server::{self, Config, Coordinator};
use tabbify_control::tls;
use tokio::net::TcpStream;

/// Time a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// A CA with a coordinator certificate for 127.0.0.1.
#[derive(Clone)]
pub struct Pki {
    pub ca: Ca,
    pub server: Issued,
}

impl Pki {
    pub fn new() -> Self {
        let ca = Ca::generate("test-mesh-ca", Validity::days_from_now(30)).unwrap();
        let server = ca
            .issue_coordinator(
                "coordinator",
                &["127.0.0.1".into()],
                Validity::days_from_now(30),
            )
            .unwrap();
        Self { ca, server }
    }

    pub fn peer(&self, name: &str) -> Issued {
        self.ca
            .issue_peer(name, Validity::days_from_now(1))
            .unwrap()
    }

    pub fn client(&self, name: &str) -> Client {
        let issued = self.peer(name);
        self.client_with(Some(&issued))
    }

    /// A client whose certificate has the admin role (`issue-admin`).
    pub fn admin_client(&self, name: &str) -> Client {
        let issued = self
            .ca
            .issue_admin(name, Validity::days_from_now(1))
            .unwrap();
        self.client_with(Some(&issued))
    }

    pub fn client_with(&self, cert: Option<&Issued>) -> Client {
        let cfg = tls::client_config(
            self.ca.cert_pem(),
            cert.map(|c| (c.cert_pem.as_str(), c.key_pem.as_str())),
        )
        .unwrap();
        Client {
            addr: None,
            local: None,
            tls: Some(cfg),
            identity_header: None,
        }
    }
}

/// The default policy of the tests.
pub fn policy() -> PolicyDocument {
    serde_json::from_value(json!({
        "tags": ["node", "supervisor", "worker", "ops", "isolated"],
        "groups": {"servers": ["tag:supervisor", "tag:worker"]},
        "app_hosts": ["tag:supervisor"],
        "allow": [
            {"src": ["tag:node"], "dst": ["tag:supervisor:8730"]},
            {"src": ["tag:ops"], "dst": ["group:servers"]},
            {"src": ["tag:supervisor"], "dst": ["tag:worker:9000-9100"]}
        ],
        "deny": [
            {"src": ["tag:ops"], "dst": ["tag:worker:22"]}
        ]
    }))
    .unwrap()
}

/// An in-process coordinator with mTLS on 127.0.0.1:0 and a manual clock.
pub struct Harness {
    pub coord: Arc<Coordinator>,
    pub addr: SocketAddr,
    pub clock: ManualClock,
    pub pki: Pki,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_pki(Pki::new(), tweak).await
    }

    /// A coordinator with the given PKI (several coordinators of one mesh share it).
    pub async fn start_with_pki(pki: Pki, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_at(pki, 1_700_000_000_000, tweak).await
    }

    /// A coordinator whose manual clock starts at `now_ms` (a restart some time later).
    pub async fn start_at(pki: Pki, now_ms: u64, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new(policy(), "test".into());
        tweak(&mut config);
        let clock = ManualClock::new(now_ms);
        let coord = Coordinator::new(config, Arc::new(clock.clone())).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = tls::server_config(&pki.server.cert_pem, &pki.server.key_pem, pki.ca.cert_pem())
            .unwrap();
        let task = tokio::spawn(server::serve(
            coord.clone(),
            listener,
            Some(server::acceptor(tls)),
        ));
        Self {
            coord,
            addr,
            clock,
            pki,
            task,
        }
    }

    pub fn client(&self, name: &str) -> Client {
        self.pki.client(name).at(self.addr)
    }

    /// A client with an admin-role certificate named `admin`.
    pub fn admin(&self) -> Client {
        self.pki.admin_client("admin").at(self.addr)
    }

    /// Mints a token with `tags` as the admin.
    pub async fn token(&self, tags: &[&str]) -> String {
        let (s, v) = self.admin().post("/v1/tokens", json!({"tags": tags})).await;
        assert_eq!(s, 200, "{v}");
        v["token"].as_str().unwrap().to_owned()
    }

    /// Registers a peer named `name` (its cert CN) with a fresh token for `tags`.
    pub async fn join(&self, name: &str, tags: &[&str]) -> Peer {
        let token = self.token(tags).await;
        let key = key_for(name);
        let client = self.client(name);
        let (s, v) = client
            .post("/v1/mesh/register", register_body(name, &key, tags, &token))
            .await;
        assert_eq!(s, 200, "{v}");
        Peer {
            name: name.to_owned(),
            id: v["peer_id"].as_str().unwrap().to_owned(),
            key,
            client,
            registration: v,
        }
    }
}

/// A registered peer and its client.
pub struct Peer {
    pub name: String,
    pub id: String,
    pub key: [u8; 32],
    pub client: Client,
    pub registration: Value,
}

impl Peer {
    pub async fn roster_ids(&self) -> Vec<String> {
        let (s, v) = self.client.get("/v1/mesh/peers").await;
        assert_eq!(s, 200, "{v}");
        ids(&v["peers"])
    }

    pub async fn heartbeat(&self, body: Value) -> (u16, Value) {
        let mut body = body;
        body["peer_id"] = json!(self.id);
        self.client.post("/v1/mesh/heartbeat", body).await
    }
}

pub fn ids(peers: &Value) -> Vec<String> {
    let mut v: Vec<String> = peers
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// A deterministic WireGuard-like key per name.
pub fn key_for(name: &str) -> [u8; 32] {
    *blake3::hash(name.as_bytes()).as_bytes()
}

pub fn b64(key: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

pub fn register_body(name: &str, key: &[u8; 32], tags: &[&str], token: &str) -> Value {
    json!({
        "name": name,
        "public_key": b64(key),
        "tags": tags,
        "wg_listen_port": 51820,
        "endpoints": ["127.0.0.1:51820"],
        "join_token": token,
    })
}

/// A one-request-per-connection HTTP/1.1 client, over TLS when configured.
#[derive(Clone)]
pub struct Client {
    pub addr: Option<SocketAddr>,
    /// Source address to connect from (any 127.0.0.0/8 address), if not the default.
    pub local: Option<std::net::IpAddr>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub identity_header: Option<String>,
}

impl Client {
    pub fn plain(addr: SocketAddr, identity: Option<&str>) -> Self {
        Self {
            addr: Some(addr),
            local: None,
            tls: None,
            identity_header: identity.map(str::to_owned),
        }
    }

    pub fn with_source_ip(mut self, ip: &str) -> Self {
        self.local = Some(ip.parse().unwrap());
        self
    }

    pub fn at(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// Sends a request and returns the response with its body still streaming.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<hyper::Response<Incoming>, String> {
        let addr = self.addr.expect("client has no address");
        let tcp = match self.local {
            None => TcpStream::connect(addr).await.map_err(|e| e.to_string())?,
            Some(ip) => {
                let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
                sock.bind(SocketAddr::new(ip, 0))
                    .map_err(|e| e.to_string())?;
                sock.connect(addr).await.map_err(|e| e.to_string())?
            }
        };
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        if let Some(i) = &self.identity_header {
            builder = builder.header(server::INSECURE_IDENTITY_HEADER, i.as_str());
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        match &self.tls {
            Some(cfg) => {
                let connector = tokio_rustls::TlsConnector::from(cfg.clone());
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                exchange(TokioIo::new(tls), req).await
            }
            None => exchange(TokioIo::new(tcp), req).await,
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, Value), String> {
        let resp = self.send(method, path, body, &[]).await?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, v))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await.unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(Bytes::from(body.to_string())))
            .await
            .unwrap()
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("PUT", path, Some(Bytes::from(body.to_string())))
            .await
            .unwrap()
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.call("DELETE", path, None).await.unwrap()
    }

    /// Opens the roster stream.
    pub async fn stream(&self, last_event_id: Option<u64>) -> EventStream {
        let id = last_event_id.map(|i| i.to_string());
        let headers: Vec<(&str, &str)> = id.iter().map(|i| ("last-event-id", i.as_str())).collect();
        self.stream_with(&headers).await.1
    }

    /// Opens the roster stream with these request headers; returns the response headers.
    pub async fn stream_with(&self, headers: &[(&str, &str)]) -> (hyper::HeaderMap, EventStream) {
        let resp = self
            .send("GET", "/v1/mesh/peers/stream", None, headers)
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let head = resp.headers().clone();
        let stream = EventStream {
            body: resp.into_body(),
            decoder: SseDecoder::new(),
            pending: Default::default(),
            comments: 0,
        };
        (head, stream)
    }
}

async fn exchange<I>(
    io: I,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))
}

/// An open SSE stream.
pub struct EventStream {
    body: Incoming,
    decoder: SseDecoder,
    pending: std::collections::VecDeque<SseFrame>,
    pub comments: usize,
}

impl EventStream {
    /// The next frame, or `None` when the stream ended; panics after [`WAIT`].
    pub async fn next_frame(&mut self) -> Option<SseFrame> {
        tokio::time::timeout(WAIT, self.next_inner())
            .await
            .expect("no SSE event in time")
    }

    /// The next frame if one arrives within `d`.
    pub async fn try_next(&mut self, d: Duration) -> Option<Option<SseFrame>> {
        tokio::time::timeout(d, self.next_inner()).await.ok()
    }

    async fn next_inner(&mut self) -> Option<SseFrame> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Some(f);
            }
            let frame = self.body.frame().await?.ok()?;
            if let Ok(data) = frame.into_data() {
                if data.starts_with(b":") {
                    self.comments += 1;
                }
                self.pending.extend(
                    self.decoder
                        .feed(&data)
                        .expect("SSE event within the limit"),
                );
            }
        }
    }

    /// The next event, parsed, with its id.
    pub async fn next_event(&mut self) -> (u64, SseEvent) {
        let f = self.next_frame().await.expect("stream ended");
        let id = f.id.as_deref().unwrap().parse().unwrap();
        (id, SseEvent::parse(&f.event, &f.data).unwrap())
    }
}

/// Every file of a state directory (the database and its WAL), as lossy text: for checks
/// of what reached the disk.
pub fn state_text(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        out.push_str(&String::from_utf8_lossy(&bytes));
    }
    out
}
