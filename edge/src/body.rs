//! The one response body type of the edge, and builders for the edge's own responses.
//!
//! A proxied response carries the app's [`Incoming`] body untouched (frames are forwarded as
//! they arrive); the edge's own answers (errors, `/health`, assets) are a single [`Full`]
//! buffer. [`Either`] joins the two without boxing.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// The body of every response the edge sends.
pub type EdgeBody = Either<Incoming, Full<Bytes>>;

/// A response whose body the edge produced itself.
pub fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<EdgeBody> {
    let mut resp = Response::new(Either::Right(Full::new(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A JSON response the edge produced itself.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<EdgeBody> {
    full(status, "application/json", body)
}
