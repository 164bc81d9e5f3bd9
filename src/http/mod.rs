//! The HTTP listener's handler interface: each path of `--http-listen` is one [`Route`].

/// A request as a route sees it: the head, the whole body, the peer.
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
