//! The HTTP listener's plumbing: accept as every listener does (`crate::transport`: the
//! accept-error backoff, a cap on connections and each peer's share of it, the PROXY
//! header with `--proxy-protocol`), the TLS handshake when the server has a certificate,
//! hyper's HTTP/1.1 with its head bounded in size and time, the body read whole within
//! its bounds, answers that must be read within `--stall-timeout-seconds`, exact-path
//! routing, and the metrics of every answer.
//!
//! A connection idle between requests is closed after `--idle-timeout-seconds` (hyper's
//! header read timeout starts when it waits for a request's head, so it bounds both an
//! idle keep-alive connection and a head that arrives slowly). From a head to its answer
//! the request has `--request-timeout-ms`: a body still arriving then is answered 408,
//! a route that has not answered 503, and the connection closed.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::{Instant, timeout, timeout_at},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    HttpRequest, HttpResponse, MAX_BODY_BYTES, MAX_HEADER_BYTES, Route, metrics, respond_text,
};
use crate::{
    error::SetupError,
    transport::{
        HTTP,
        accept::{accept, configure, enter, identify},
        peers::{Limits, Peers},
        stall::Stall,
    },
};

/// The one application protocol served over TLS.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Binds `--http-listen`; a port that cannot be bound stops the start (exit 69).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, SetupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| SetupError::bind("--http-listen", addr, &e))
}

/// The bound listener with its routes and bounds; [`Listener::run`] serves.
pub(crate) struct Listener {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<Tls>>,
    bounds: Bounds,
}

/// What a peer may hold of the listener, from the flags.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// `--http-max-connections`.
    pub max_connections: u32,
    /// Of them, what one client address may hold.
    pub per_peer: u32,
    /// From a request's head to its answer.
    pub request_timeout: Duration,
    /// Between requests, and for a head to arrive.
    pub idle_timeout: Duration,
    /// For the peer to read what it is sent.
    pub stall_timeout: Duration,
    /// Whether each connection starts with a PROXY protocol v2 header.
    pub proxy_protocol: bool,
}

/// What every request of every connection reads.
struct Shared {
    routes: Vec<Arc<dyn Route>>,
    request_timeout: Duration,
}

impl Listener {
    /// Serves `routes` on `listener`; with `tls`, over TLS with the server's certificate
    /// in force at each handshake.
    pub(crate) fn new(
        listener: TcpListener,
        routes: Vec<Arc<dyn Route>>,
        tls: Option<crate::tls::Current>,
        bounds: Bounds,
    ) -> Listener {
        metrics::export(routes.iter().map(|r| (r.path(), r.statuses())));
        Listener {
            listener,
            shared: Arc::new(Shared {
                routes,
                request_timeout: bounds.request_timeout,
            }),
            tls: tls.map(|current| {
                Arc::new(Tls {
                    current,
                    derived: Mutex::new(None),
                })
            }),
            bounds,
        }
    }

    /// Accepts and serves until `stop` is cancelled; then lets the requests in flight
    /// finish for at most `grace`, and closes every connection.
    pub(crate) async fn run(self, stop: CancellationToken, grace: Duration) {
        let Listener {
            listener,
            shared,
            tls,
            bounds,
        } = self;
        info!(
            http_listen = ?listener.local_addr().ok(),
            tls = tls.is_some(),
            routes = ?shared.routes.iter().map(|r| r.path()).collect::<Vec<_>>(),
            "serving HTTP"
        );
        let peers = Peers::new(Limits {
            max_connections: bounds.max_connections as usize,
            per_peer: bounds.per_peer as usize,
            reserved: 0,
        });
        let mut connections = JoinSet::new();
        let mut last_logged: Option<Instant> = None;
        loop {
            let (mut tcp, addr) = tokio::select! {
                () = stop.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = accept(&listener, &mut last_logged) => accepted,
            };
            // Past the cap, or the peer's share, the connection is closed at once: the
            // peer sees its connection end, never silence.
            let Some(entered) = enter(&peers, HTTP) else {
                continue;
            };
            configure(&tcp);
            let (shared, tls, stop, peers) =
                (shared.clone(), tls.clone(), stop.clone(), peers.clone());
            connections.spawn(async move {
                let proxy = bounds.proxy_protocol;
                let Some((peer, place)) = identify(&mut tcp, addr, entered, proxy, HTTP).await
                else {
                    return;
                };
                crate::metrics::connections_open(HTTP, peers.open());
                match tls {
                    None => serve(tcp, peer, None, shared, bounds, stop).await,
                    Some(tls) => {
                        if let Some(stream) = tls.handshake(tcp).await {
                            let certs = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|chain| Arc::new(chain.to_vec()));
                            serve(stream, peer, certs, shared, bounds, stop).await;
                        }
                    }
                }
                drop(place);
                crate::metrics::connections_open(HTTP, peers.open());
            });
        }
        drop(listener);
        // Every connection was told to finish its request in flight and close.
        let drained = async { while connections.join_next().await.is_some() {} };
        if timeout(grace, drained).await.is_err() {
            warn!(
                ?grace,
                "HTTP requests still in flight after the grace period; closing them"
            );
        }
    }
}

/// Serves one connection until the peer closes it, it idles out, or `stop` (then the
/// request in flight is answered first).
async fn serve<IO>(
    io: IO,
    peer: SocketAddr,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    shared: Arc<Shared>,
    bounds: Bounds,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let (shared, certs) = (shared.clone(), certs.clone());
        async move { Ok::<_, Infallible>(answer(&shared, request, peer, certs).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.idle_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let io = TokioIo::new(Stall::new(io, bounds.stall_timeout));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "an HTTP connection ended on an error");
    }
}

/// One request: its body read within the bounds, its route found, its answer counted.
async fn answer(
    shared: &Shared,
    request: Request<Incoming>,
    peer: SocketAddr,
    peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
) -> HttpResponse {
    let started = Instant::now();
    let deadline = started + shared.request_timeout;
    let (head, body) = request.into_parts();
    let route = shared
        .routes
        .iter()
        .find(|route| route.path() == head.uri.path())
        .cloned();
    let path = route.as_ref().map_or(metrics::OTHER, |route| route.path());
    let response = match read_body(&head, body, deadline).await {
        Err(refusal) => refusal,
        Ok(body) => match route {
            None => respond_text(StatusCode::NOT_FOUND, "no such path\n"),
            Some(route) => {
                let request = HttpRequest {
                    head,
                    body,
                    peer,
                    peer_certs,
                };
                match timeout_at(deadline, route.handle(request)).await {
                    Ok(response) => response,
                    Err(_) => closing(respond_text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no answer within the request timeout; retry\n",
                    )),
                }
            }
        },
    };
    metrics::request(path, response.status().as_u16(), started.elapsed());
    response
}

/// The whole body, or the answer that refuses it: 413 past [`MAX_BODY_BYTES`] (from
/// `Content-Length` before reading, or while reading), 408 past `deadline`, 400 when
/// it breaks off. A refused body is left unread, so its connection is closed.
async fn read_body(
    head: &http::request::Parts,
    body: Incoming,
    deadline: Instant,
) -> Result<Bytes, HttpResponse> {
    let too_large = || {
        closing(respond_text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body over 64 KiB\n",
        ))
    };
    let declared = head
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match timeout_at(deadline, Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => {
            debug!(error = %e, "a request body broke off");
            Err(closing(respond_text(
                StatusCode::BAD_REQUEST,
                "the request body broke off\n",
            )))
        }
        Err(_) => Err(closing(respond_text(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive within the request timeout\n",
        ))),
    }
}

/// The answer, with the connection closed after it.
fn closing(mut response: HttpResponse) -> HttpResponse {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The server's TLS for HTTP/1.1: the gRPC port's configuration in force (reloaded with
/// it, see `reload.rs`), with HTTP/1.1 as its one application protocol, derived again
/// only when a reload swapped the configuration.
struct Tls {
    current: crate::tls::Current,
    /// The last configuration in force and the one derived from it.
    derived: Mutex<Option<(Arc<ServerConfig>, Arc<ServerConfig>)>>,
}

impl Tls {
    fn acceptor(&self) -> TlsAcceptor {
        let grpc = self.current.load_full();
        let mut derived = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((from, made)) = derived.as_ref()
            && Arc::ptr_eq(from, &grpc)
        {
            return TlsAcceptor::from(made.clone());
        }
        let mut config = (*grpc).clone();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        let made = Arc::new(config);
        *derived = Some((grpc, made.clone()));
        TlsAcceptor::from(made)
    }

    /// The handshake, as the gRPC port's (bounded in time, a failure counted).
    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        crate::tls::handshake(self.acceptor(), tcp).await
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, pin::Pin};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::http::respond;

    /// Answers with what it was given: the method, the peer's IP and the body.
    struct Echo;

    impl Route for Echo {
        fn path(&self) -> &'static str {
            "/echo"
        }

        fn statuses(&self) -> &'static [u16] {
            &[200]
        }

        fn handle(
            &self,
            request: HttpRequest,
        ) -> Pin<Box<dyn Future<Output = HttpResponse> + Send + '_>> {
            Box::pin(async move {
                let text = format!(
                    "{} {} {}",
                    request.head.method,
                    request.peer.ip(),
                    String::from_utf8_lossy(&request.body)
                );
                respond(StatusCode::OK, "text/plain", text)
            })
        }
    }

    /// Never answers.
    struct Stuck;

    impl Route for Stuck {
        fn path(&self) -> &'static str {
            "/stuck"
        }

        fn statuses(&self) -> &'static [u16] {
            &[200]
        }

        fn handle(
            &self,
            _: HttpRequest,
        ) -> Pin<Box<dyn Future<Output = HttpResponse> + Send + '_>> {
            Box::pin(std::future::pending())
        }
    }

    async fn exchange(addr: SocketAddr, raw: &str) -> String {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(raw.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer
    }

    /// A route gets the request whole on its exact path only; a route that does not
    /// answer within the request timeout is answered 503 for it.
    #[tokio::test]
    async fn routes_by_exact_path_and_bounds_the_routes_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Vec<Arc<dyn Route>> = vec![Arc::new(Echo), Arc::new(Stuck)];
        let stop = CancellationToken::new();
        let served = Listener::new(
            listener,
            routes,
            None,
            Bounds {
                max_connections: 8,
                per_peer: 8,
                request_timeout: Duration::from_millis(200),
                idle_timeout: Duration::from_secs(5),
                stall_timeout: Duration::from_secs(5),
                proxy_protocol: false,
            },
        );
        let task = tokio::spawn(served.run(stop.clone(), Duration::from_secs(1)));
        let request = |method: &str, path: &str, body: &str| {
            format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let echoed = exchange(addr, &request("POST", "/echo", "hello")).await;
        assert!(echoed.starts_with("HTTP/1.1 200"), "{echoed}");
        assert!(echoed.ends_with("POST 127.0.0.1 hello"), "{echoed}");
        for path in ["/echo/", "/ECHO", "/echo/x", "/"] {
            let answer = exchange(addr, &request("GET", path, "")).await;
            assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
        }
        let stuck = exchange(addr, &request("GET", "/stuck", "")).await;
        assert!(stuck.starts_with("HTTP/1.1 503"), "{stuck}");
        stop.cancel();
        task.await.unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after the stop"
        );
    }
}
