//! The HTTP listener (`--http-listen`, SPEC §11 and §12): HTTP/1.1 beside the gRPC port,
//! for the callers that speak plain HTTP (identity providers pushing revocations, proxies
//! asking about a request). Off unless the flag is given; TLS with the server's
//! certificate when `--tls-cert` is given, reloaded with it.
//!
//! Each path is one small [`Route`] over shared plumbing ([`listener`]), which bounds
//! what a peer can hold: connections (`--http-max-connections`, and each client
//! address's share of them, a quarter; closed at accept past either), header bytes ([`MAX_HEADER_BYTES`], 431), body bytes ([`MAX_BODY_BYTES`],
//! 413), and time (`--request-timeout-ms` from the head to the answer: 408 while the body
//! is still arriving, 503 when the route has not answered; an answer unread for
//! `--stall-timeout-seconds` closes the connection). A path no route claims
//! answers 404. Every answer is counted by path and status, and timed by path
//! (`session_cache_http_requests_total`, `session_cache_http_request_duration_seconds`).

mod config;
mod listener;
pub(crate) mod metrics;

pub use config::HttpFlags;
pub(crate) use listener::{Bounds, Listener, bind};

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;

/// Largest request body read, in bytes; a larger one is answered 413 unread. A webhook
/// or a logout token takes a few KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Largest request head (the request line and every header) read, in bytes; a larger one
/// is answered 431 by hyper.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// A request as a route sees it: the head, the whole body, the peer.
#[allow(dead_code)] // not every route reads every field
pub(crate) struct HttpRequest {
    pub head: http::request::Parts,
    pub body: bytes::Bytes,
    /// The TCP peer.
    pub peer: std::net::SocketAddr,
    /// The client certificate chain verified by TLS (mutual TLS), leaf first.
    pub peer_certs: Option<std::sync::Arc<Vec<rustls_pki_types::CertificateDer<'static>>>>,
}

pub(crate) type HttpResponse = http::Response<http_body_util::Full<bytes::Bytes>>;

/// One path of the HTTP listener.
pub(crate) trait Route: Send + Sync + 'static {
    /// The exact path served, such as "/auth"; also the `path` metric label.
    fn path(&self) -> &'static str;
    /// The status codes this route can answer, so their series are exported at 0.
    fn statuses(&self) -> &'static [u16];
    /// Answers one request. Never panics on any input.
    fn handle(
        &self,
        request: HttpRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = HttpResponse> + Send + '_>>;
}

/// An answer with this status, content type and body.
pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> HttpResponse {
    let mut response = http::Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A JSON answer with this status.
pub(crate) fn respond_json(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    respond(status, "application/json", body.to_string())
}

/// A short plain-text answer, for the plumbing's own refusals.
pub(crate) fn respond_text(status: StatusCode, text: &'static str) -> HttpResponse {
    respond(status, "text/plain; charset=utf-8", text)
}
