//! The one response body type of the edge, and builders for the edge's own responses.
//!
//! A proxied response carries the app's body untouched, frame by frame as it arrives: either
//! hyper's [`Incoming`] (requests sent through hyper's client) or a [`ResponseBody`] read
//! straight off a pooled connection (bodyless requests, see [`crate::fetch`]). The edge's own
//! answers (errors, `/health`, assets) are a single [`Full`] buffer. One enum joins the three
//! without boxing.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::fetch::ResponseBody;

/// The error of a response body that broke off mid-stream (the client connection is then
/// aborted, so the client sees the truncation).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the edge sends.
#[derive(Debug)]
pub enum EdgeBody {
    /// An app's body received through hyper's client.
    Incoming(Incoming),
    /// An app's body read from a pooled connection.
    Fetched(ResponseBody),
    /// A body the edge produced itself.
    Own(Full<Bytes>),
}

impl Body for EdgeBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            EdgeBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            EdgeBody::Fetched(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            EdgeBody::Own(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EdgeBody::Incoming(b) => b.is_end_stream(),
            EdgeBody::Fetched(b) => b.is_end_stream(),
            EdgeBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EdgeBody::Incoming(b) => b.size_hint(),
            EdgeBody::Fetched(b) => b.size_hint(),
            EdgeBody::Own(b) => b.size_hint(),
        }
    }
}

/// An empty body of the edge's own.
pub fn empty() -> EdgeBody {
    EdgeBody::Own(Full::new(Bytes::new()))
}

/// A response whose body the edge produced itself.
pub fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<EdgeBody> {
    let mut resp = Response::new(EdgeBody::Own(Full::new(body.into())));
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
