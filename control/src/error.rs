//! The one error type of the HTTP API and its mapping to a status code and a JSON body
//! `{"error": "<reason>", "code": "<kind>"}`. Every handler returns it; nothing else picks
//! status codes for errors.

use http::StatusCode;

use crate::api::ErrorBody;

/// Everything a request can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or semantically invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// The body is not the expected JSON (400).
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// The body exceeds the size limit (413).
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The client sent the body too slowly (408).
    #[error("request body not received in time")]
    Timeout,
    /// The caller has no identity, or a credential is wrong (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The join token is unknown (401).
    #[error("join token is not valid")]
    TokenInvalid,
    /// The join token has expired (401).
    #[error("join token has expired")]
    TokenExpired,
    /// The join token has no uses left (403).
    #[error("join token has already been used")]
    TokenUsed,
    /// The caller is known but not allowed to do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// A dashboard session's state-changing request without its CSRF token, or with
    /// another (403).
    #[error(
        "missing or wrong x-csrf-token for this dashboard session (GET /v1/admin/session gives it)"
    )]
    Csrf,
    /// The join token is bound to another identity (403).
    #[error("join token is bound to another identity")]
    TokenIdentity,
    /// The caller's identity (or, from a pre-identity log, the key) was revoked by an
    /// admin (403).
    #[error("this identity has been revoked; an admin must re-admit it")]
    Revoked,
    /// The public key is bound to another identity (409); nothing changed.
    #[error("public key is bound to another identity")]
    KeyTaken,
    /// The identity has another key admitted (409): rotate with `tabbify-mesh rotate-key`
    /// (`POST /v1/mesh/rotate-key`), or, if the node lost its key, an admin clears it with
    /// `DELETE /v1/identities/{cn}/key` and the node joins again with a new token.
    #[error(
        "identity {0:?} has another key admitted: rotate it (tabbify-mesh rotate-key), or if \
         the node lost its key an admin clears it (DELETE /v1/identities/{0}/key) and the node \
         joins again with a new token"
    )]
    KeyMismatch(String),
    /// The caller is not a registered peer (404); register (again) first.
    #[error("not registered: register first")]
    NotRegistered,
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The method is not defined for this path (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request conflicts with current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The app is hosted by another peer (409); the message names the holder.
    #[error("{0}")]
    AppTaken(String),
    /// The identity holds its maximum of open SSE streams (429).
    #[error("{0}")]
    TooManyStreams(String),
    /// The identity sends requests faster than its rate limit (429).
    #[error("{0}")]
    RateLimited(String),
    /// The source address holds its maximum of open connections (429).
    #[error("{0}")]
    TooManyConnections(String),
    /// The coordinator holds its maximum of open connections (503).
    #[error("{0}")]
    Overloaded(String),
    /// The body is not JSON (415).
    #[error("content-type must be application/json")]
    UnsupportedMediaType,
    /// The `--auth-url` service failed or could not be reached (502).
    #[error("auth service: {0}")]
    AuthService(String),
    /// The state database failed the write or cannot be reached; nothing changed (503).
    /// Retry later (or on another coordinator).
    #[error("state database unavailable: {0}")]
    Unavailable(String),
    /// Something on our side failed (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for ApiError {
    /// The one mapping of store failures: a key bound elsewhere is 409 `key_taken`; a
    /// compare-and-set lost to another coordinator on the same database (a token's last
    /// use, a key) is 409 `conflict` (a retry sees the winner's change); a database that
    /// failed or is gone is 503 `unavailable`; anything else 500.
    fn from(e: crate::store::StoreError) -> Self {
        use crate::storage::StorageError;
        use crate::store::StoreError;
        match e {
            StoreError::KeyBound { .. } => ApiError::KeyTaken,
            StoreError::Storage(StorageError::Conflict { .. }) => ApiError::Conflict(
                "another coordinator changed this token or key at the same time; retry".into(),
            ),
            StoreError::Storage(e @ (StorageError::Engine { .. } | StorageError::Io { .. })) => {
                ApiError::Unavailable(e.to_string())
            }
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl ApiError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized(_) | ApiError::TokenInvalid | ApiError::TokenExpired => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::TokenUsed
            | ApiError::TokenIdentity
            | ApiError::Forbidden(_)
            | ApiError::Csrf
            | ApiError::Revoked => StatusCode::FORBIDDEN,
            ApiError::NotRegistered | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_)
            | ApiError::KeyTaken
            | ApiError::KeyMismatch(_)
            | ApiError::AppTaken(_) => StatusCode::CONFLICT,
            ApiError::TooManyStreams(_)
            | ApiError::RateLimited(_)
            | ApiError::TooManyConnections(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::AuthService(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Timeout => "timeout",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::TokenInvalid => "token_invalid",
            ApiError::TokenExpired => "token_expired",
            ApiError::TokenUsed => "token_used",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Csrf => "csrf",
            ApiError::TokenIdentity => "token_identity",
            ApiError::Revoked => "revoked",
            ApiError::KeyTaken => "key_taken",
            ApiError::KeyMismatch(_) => "key_mismatch",
            ApiError::NotRegistered => "not_registered",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::AppTaken(_) => "app_taken",
            ApiError::TooManyStreams(_) => "too_many_streams",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::TooManyConnections(_) => "too_many_connections",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::AuthService(_) => "auth_service",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            code: self.code().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes() {
        let e = ApiError::TokenUsed;
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        let body = serde_json::to_value(e.body()).unwrap();
        assert_eq!(body["code"], "token_used");
        assert_eq!(body["error"], "join token has already been used");
        assert_eq!(ApiError::PayloadTooLarge(5).status().as_u16(), 413);
        assert!(ApiError::InvalidJson("x".into()).status().is_client_error());
    }
}
