//! The coordinator binary's own client for its admin subcommands (`admin-login`,
//! `policy test`): one HTTPS request with the admin's client certificate to a running
//! coordinator, trusting only the mesh CA.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// How long one admin request may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the coordinator is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct AdminClient {
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl AdminClient {
    /// `url` is `https://HOST[:PORT]` (default port 8443); `tls` carries the mesh CA and
    /// the admin certificate.
    pub fn new(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("coordinator URL {url:?} must start with https://"))?;
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            return Err(format!("coordinator URL {url:?} must not have a path"));
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, after) = h
                .split_once(']')
                .ok_or_else(|| format!("coordinator URL {url:?}: unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port"))?,
                None => 8443,
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().map_err(|_| format!("{url:?}: bad port"))?,
                ),
                None => (authority.to_owned(), 8443),
            }
        };
        if host.is_empty() {
            return Err(format!("coordinator URL {url:?} has no host"));
        }
        Ok(Self { host, port, tls })
    }

    /// `https://HOST:PORT`, as the browser should open it.
    pub fn origin(&self) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{}", self.host, self.port)
        } else {
            format!("https://{}:{}", self.host, self.port)
        }
    }

    /// Sends one request with a JSON body; returns the status and the body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        match tokio::time::timeout(TIMEOUT, self.exchange(method, path, body)).await {
            Ok(r) => r,
            Err(_) => anyhow::bail!("{} did not answer within {TIMEOUT:?}", self.origin()),
        }
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        use anyhow::Context;
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to {}", self.origin()))?;
        let name = ServerName::try_from(self.host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {}", self.origin()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::builder().method(method).uri(path).header(
            http::header::HOST,
            self.origin().trim_start_matches("https://"),
        );
        let bytes = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(b)?)
            }
            None => Bytes::new(),
        };
        let resp = sender.send_request(req.body(Full::new(bytes))?).await?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
            .to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        Ok((status, v))
    }
}

/// Parses a duration like `600`, `90s`, `10m` or `1h` into seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a duration (like 600, 90s, 10m or 1h)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_urls() {
        assert_eq!(parse_duration_secs("10m"), Ok(600));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("1h"), Ok(3600));
        assert_eq!(parse_duration_secs("42"), Ok(42));
        assert!(parse_duration_secs("m").is_err());
        assert!(parse_duration_secs("-1m").is_err());
        let tls = tabbify_api::tls::client_config(
            crate::ca::Ca::generate("t", crate::ca::Validity::days_from_now(1))
                .unwrap()
                .cert_pem(),
            None,
        )
        .unwrap();
        let c = AdminClient::new("https://127.0.0.1:9443/", tls.clone()).unwrap();
        assert_eq!(c.origin(), "https://127.0.0.1:9443");
        let c = AdminClient::new("https://[::1]", tls.clone()).unwrap();
        assert_eq!(c.origin(), "https://[::1]:8443");
        assert!(AdminClient::new("http://x", tls.clone()).is_err());
        assert!(AdminClient::new("https://x/path", tls).is_err());
    }
}
