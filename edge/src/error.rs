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
            EdgeError::BadAppId => StatusCode::BAD_REQUEST,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn bodies_are_json_with_code_and_message() {
        for err in [
            EdgeError::BadAppId,
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
