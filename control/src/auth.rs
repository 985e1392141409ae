//! The `--auth-url` client: asks an external service whether a join token is valid and
//! which tags and name it grants.
//!
//! Contract: `POST {auth_url}/v1/join-tokens/validate` with an
//! [`AuthValidateRequest`] JSON body. `200` with an [`AuthValidateResponse`] whose `valid`
//! is `true` admits the joiner with the returned tags (and name, if any); `200` with
//! `valid: false`, `401` or `403` refuses it (the `reason` or `error` field, or a plain-text
//! body, is passed on; `code` is optional);
//! any other answer, a timeout or an unreachable service is a `502` for the joiner.
//! `http://` and `https://` URLs are supported; for `https` the service's certificate
//! must chain to the CA given to the coordinator (`--auth-ca`, default `--tls-ca`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::api::{AuthValidateRequest, AuthValidateResponse, ErrorBody, PATH_AUTH_VALIDATE};
use crate::error::ApiError;

/// How long one validation may take, connection included.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed `--auth-url` and how to reach it.
#[derive(Debug, Clone)]
pub struct AuthClient {
    host: String,
    port: u16,
    base_path: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl AuthClient {
    /// Parses `url` (`http://host[:port][/base]` or `https://…`); `https` needs
    /// `tls` (a client config trusting the service's CA).
    pub fn new(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Self, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "auth URL {url:?} must start with http:// or https://"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, after) = h
                .split_once(']')
                .ok_or_else(|| format!("auth URL {url:?}: unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p
                    .parse()
                    .map_err(|_| format!("auth URL {url:?}: bad port"))?,
                None => default_port,
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse()
                        .map_err(|_| format!("auth URL {url:?}: bad port"))?,
                ),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("auth URL {url:?} has no host"));
        }
        let tls = if https {
            let cfg =
                tls.ok_or_else(|| format!("auth URL {url:?} is https but no CA was given"))?;
            Some(cfg)
        } else {
            None
        };
        Ok(Self {
            host,
            port,
            base_path: path.to_owned(),
            tls,
        })
    }

    /// Validates a token; `Ok` holds the granted tags and name.
    pub async fn validate(
        &self,
        req: &AuthValidateRequest,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        match tokio::time::timeout(AUTH_TIMEOUT, self.call(req)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::AuthService("timed out".into())),
        }
    }

    async fn call(
        &self,
        req: &AuthValidateRequest,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        let svc = |e: &dyn std::fmt::Display| ApiError::AuthService(e.to_string());
        let body = serde_json::to_vec(req).map_err(|e| svc(&e))?;
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| svc(&e))?;
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = http::Request::post(format!("{}{}", self.base_path, PATH_AUTH_VALIDATE))
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| svc(&e))?;
        let resp = match &self.tls {
            Some(cfg) => {
                let connector = tokio_rustls::TlsConnector::from(cfg.clone());
                let name = ServerName::try_from(self.host.clone()).map_err(|e| svc(&e))?;
                let tls = connector.connect(name, tcp).await.map_err(|e| svc(&e))?;
                send(TokioIo::new(tls), request).await?
            }
            None => send(TokioIo::new(tcp), request).await?,
        };
        let (status, bytes) = resp;
        match status.as_u16() {
            200 => {
                let r: AuthValidateResponse = serde_json::from_slice(&bytes)
                    .map_err(|e| ApiError::AuthService(format!("bad answer: {e}")))?;
                if r.valid {
                    Ok((r.tags, r.name))
                } else {
                    Err(ApiError::Unauthorized(format!(
                        "join token refused by the auth service: {}",
                        r.reason.unwrap_or_else(|| "no reason given".into())
                    )))
                }
            }
            401 | 403 => {
                let reason = refusal_reason(&bytes);
                let msg = format!("join token refused by the auth service: {reason}");
                Err(if status.as_u16() == 401 {
                    ApiError::Unauthorized(msg)
                } else {
                    ApiError::Forbidden(msg)
                })
            }
            other => Err(ApiError::AuthService(format!("answered HTTP {other}"))),
        }
    }
}

/// Most characters of an auth service's reason passed on to the joiner.
const MAX_REASON: usize = 200;

/// The reason of a `401`/`403` from the auth service: the `error` of a JSON error body
/// (with or without `code`), else its `reason`, else the body as text; "no reason given"
/// only when there is none. Capped at [`MAX_REASON`] characters, control characters
/// replaced, since it goes into the joiner's error message and our log.
fn refusal_reason(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Reason {
        reason: String,
    }
    let text = if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        e.error
    } else if let Ok(r) = serde_json::from_slice::<Reason>(body) {
        r.reason
    } else {
        String::from_utf8_lossy(body).into_owned()
    };
    let clean: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect();
    if clean.is_empty() {
        "no reason given".into()
    } else {
        clean
    }
}

async fn send<I>(
    io: I,
    request: http::Request<Full<Bytes>>,
) -> Result<(http::StatusCode, Bytes), ApiError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = |e: &dyn std::fmt::Display| ApiError::AuthService(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| svc(&e))?;
    tokio::spawn(conn);
    let resp = sender.send_request(request).await.map_err(|e| svc(&e))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| svc(&e))?
        .to_bytes();
    Ok((status, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An auth service on loopback that answers every request with `status` and `body`.
    async fn auth_service(status: &'static str, body: &'static str) -> AuthClient {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 16 * 1024];
                let _ = s.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        AuthClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap()
    }

    fn request() -> AuthValidateRequest {
        AuthValidateRequest {
            token: "t".into(),
            identity: "node-1".into(),
            requested_name: "node-1".into(),
            requested_tags: vec![],
            public_key: "k".into(),
        }
    }

    /// Issue 11, "the auth service's 403 reason is lost": a body without `code` used to
    /// fail to parse and read "no reason given".
    #[tokio::test]
    async fn auth_service_403_reason_without_code_is_passed_on() {
        let c = auth_service("403 Forbidden", r#"{"error":"token revoked by HR"}"#).await;
        let e = c.validate(&request()).await.unwrap_err();
        assert!(matches!(e, ApiError::Forbidden(_)), "{e:?}");
        assert!(e.to_string().contains("token revoked by HR"), "{e}");
        let c = auth_service("401 Unauthorized", r#"{"error":"expired","code":"x"}"#).await;
        let e = c.validate(&request()).await.unwrap_err();
        assert!(matches!(e, ApiError::Unauthorized(_)), "{e:?}");
        assert!(e.to_string().contains("expired"), "{e}");
    }

    #[test]
    fn refusal_reasons_are_read_from_any_body_and_capped() {
        assert_eq!(refusal_reason(br#"{"error":"a"}"#), "a");
        assert_eq!(refusal_reason(br#"{"error":"a","code":"b"}"#), "a");
        assert_eq!(refusal_reason(br#"{"reason":"r"}"#), "r");
        assert_eq!(refusal_reason(b"plain\ntext"), "plain text");
        assert_eq!(refusal_reason(b""), "no reason given");
        assert_eq!(refusal_reason(br#"{"error":""}"#), "no reason given");
        assert_eq!(refusal_reason(&[b'x'; 5000]).len(), MAX_REASON);
    }

    #[test]
    fn parses_urls() {
        let c = AuthClient::new("http://127.0.0.1:9000/base/", None).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base_path.as_str()),
            ("127.0.0.1", 9000, "/base")
        );
        let c = AuthClient::new("http://[::1]:81", None).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 81));
        let c = AuthClient::new("http://auth", None).unwrap();
        assert_eq!(c.port, 80);
        assert!(AuthClient::new("ftp://x", None).is_err());
        assert!(AuthClient::new("https://x", None).is_err());
        assert!(AuthClient::new("http://:80", None).is_err());
    }
}
