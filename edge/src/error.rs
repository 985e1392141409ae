//! The one mapping from an edge failure to an HTTP status and a JSON body.
//!
//! Bodies are built from fixed strings only: no upstream address, OS error text or request
//! data ever reaches a client. The cause is logged server-side by the caller.

use http::{header::WWW_AUTHENTICATE, HeaderValue, Response, StatusCode};
use thiserror::Error;

use crate::body::{json, EdgeBody};

/// A request the edge answers itself with an error.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum EdgeError {
    /// The app id in `/app/{uuid}` is not a UUID.
    #[error("the app id is not a valid UUID")]
    BadAppId,
    /// The bearer key is missing or wrong.
    #[error("a valid bearer key is required")]
    Unauthorized,
    /// No route, built-in endpoint or app path matches.
    #[error("no such route")]
    NotFound,
    /// The endpoint exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request is not strict HTTP/1.1 (a bare LF, a body that cannot be framed).
    #[error("the request is not valid HTTP/1.1 (lines must end in CRLF)")]
    BadRequest,
    /// The request head and body did not arrive in time or fast enough.
    #[error("the request did not arrive in time")]
    RequestTimeout,
    /// The client's address has too many connections open.
    #[error("too many connections from this address")]
    TooManyConnections,
    /// The edge has as many connections open as it accepts.
    #[error("the edge is at its connection limit")]
    Overloaded,
    /// The app could not be reached: refused, no route to it, reset, or unknown to the resolver.
    #[error("the app is unreachable")]
    Unreachable,
    /// The app answered with something that is not valid HTTP, or broke off mid-request.
    #[error("the app sent an invalid response")]
    BadGateway,
    /// The app did not accept the connection or answer in time.
    #[error("the app did not answer in time")]
    Timeout,
}

impl EdgeError {
    /// The HTTP status for this error.
    pub fn status(self) -> StatusCode {
        match self {
            EdgeError::BadAppId | EdgeError::BadRequest => StatusCode::BAD_REQUEST,
            EdgeError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            EdgeError::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
            EdgeError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            EdgeError::Unauthorized => StatusCode::UNAUTHORIZED,
            EdgeError::NotFound => StatusCode::NOT_FOUND,
            EdgeError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            EdgeError::Unreachable | EdgeError::BadGateway => StatusCode::BAD_GATEWAY,
            EdgeError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A stable machine-readable code, the `error` field of the body.
    pub fn code(self) -> &'static str {
        match self {
            EdgeError::BadAppId => "bad_app_id",
            EdgeError::BadRequest => "bad_request",
            EdgeError::RequestTimeout => "request_timeout",
            EdgeError::TooManyConnections => "too_many_connections",
            EdgeError::Overloaded => "overloaded",
            EdgeError::Unauthorized => "unauthorized",
            EdgeError::NotFound => "not_found",
            EdgeError::MethodNotAllowed => "method_not_allowed",
            EdgeError::Unreachable => "app_unreachable",
            EdgeError::BadGateway => "bad_gateway",
            EdgeError::Timeout => "app_timeout",
        }
    }

    /// The response: `{"error": code, "message": text}` with the matching status.
    pub fn response(self) -> Response<EdgeBody> {
        let body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        let mut resp = json(self.status(), body.to_string());
        if self == EdgeError::Unauthorized {
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }

    /// The whole HTTP/1.1 response for this error, with `Connection: close`, for a client
    /// refused before any request of its was read (no HTTP server is running on it yet).
    pub fn raw_response(self) -> Vec<u8> {
        let body =
            serde_json::json!({ "error": self.code(), "message": self.to_string() }).to_string();
        let status = self.status();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len(),
            body
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn bodies_are_json_with_code_and_message() {
        for err in [
            EdgeError::BadAppId,
            EdgeError::BadRequest,
            EdgeError::RequestTimeout,
            EdgeError::TooManyConnections,
            EdgeError::Overloaded,
            EdgeError::Unauthorized,
            EdgeError::NotFound,
            EdgeError::MethodNotAllowed,
            EdgeError::Unreachable,
            EdgeError::BadGateway,
            EdgeError::Timeout,
        ] {
            let resp = err.response();
            assert_eq!(resp.status(), err.status());
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["error"], err.code());
            assert_eq!(v.as_object().unwrap().len(), 2);
        }
    }
}
