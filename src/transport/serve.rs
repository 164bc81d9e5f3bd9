//! The gRPC listener: each accepted connection takes its place (`super::accept`), its
//! TLS handshake when the server has a certificate, and is then served by hyper's
//! HTTP/2 server over the service the server assembled, one task per connection. Each
//! connection is its own so that it can be closed on its own: gracefully (GOAWAY, then
//! its calls' grace) when the sweep or the drain asks, or cut with GOAWAY
//! ENHANCE_YOUR_CALM when it abuses stream resets (`super::frames`).
//!
//! Every request carries its connection's [`Activity`], for `super::Track`, and what
//! tonic's own server would give it: `TcpConnectInfo`, or `TlsConnectInfo` with the
//! client's certificates, for the call layer.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{body::Incoming, server::conn::http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tonic::{
    body::Body as GrpcBody,
    codegen::{Service, http},
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};
use tracing::debug;

use super::{
    GRPC,
    accept::{accept, configure, enter, identify},
    behind::{Answering, Behind, Busy},
    conn::{Activity, Connection, Connections},
    frames::Frames,
    peers::Entered,
};

/// Streams one connection may have open at once; with `--max-in-flight` this bounds
/// what a few greedy clients can queue inside the process.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// An idle HTTP/2 connection is pinged this often, and dropped when the ping is not
/// answered within the timeout: dead peers (a crashed pod, a cut network) do not hold
/// connections and their memory forever.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest header list (every header of a request, decompressed) accepted: an API key,
/// a trace context and gRPC's own headers take well under 1 KiB.
pub(crate) const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Streams the client may reset before the server accepted them, at once, before h2
/// cuts the connection with GOAWAY ENHANCE_YOUR_CALM (h2's own default, made explicit).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams h2 may reset on protocol errors of the client before it cuts the connection
/// with GOAWAY ENHANCE_YOUR_CALM.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// How long a cut connection has to send its GOAWAY, and let the client read it, before
/// it is dropped.
const CUT_GRACE: Duration = Duration::from_secs(2);

/// What every connection of the listener shares.
pub(crate) struct Grpc<S> {
    pub service: S,
    pub connections: Arc<Connections>,
    pub tls: Option<crate::tls::Current>,
    /// Whether each connection starts with a PROXY protocol v2 header.
    pub proxy_protocol: bool,
}

/// What answers the calls of a connection: the layered routes, each answer's body a
/// [`ReplyBody`].
pub(crate) trait Routes<B>:
    Service<
        http::Request<GrpcBody>,
        Response = http::Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T, B> Routes<B> for T where
    T: Service<
            http::Request<GrpcBody>,
            Response = http::Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// The body of an answer, as hyper's HTTP/2 sends it.
pub(crate) trait ReplyBody:
    http_body::Body<
        Data = hyper::body::Bytes,
        Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    > + Send
    + 'static
{
}

impl<T> ReplyBody for T where
    T: http_body::Body<
            Data = hyper::body::Bytes,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        > + Send
        + 'static
{
}

/// Serves `listener` until `stop` completes; then stops accepting, asks every
/// connection to close gracefully, and returns once all have closed (the caller bounds
/// that wait).
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    grpc: Grpc<S>,
    stop: impl std::future::Future<Output = ()>,
) where
    S: Routes<B> + Sync,
    B: ReplyBody,
{
    let grpc = Arc::new(grpc);
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS);
    let builder = Arc::new(builder);
    let drain = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut last_logged = None;
    let mut stop = pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            (tcp, addr) = accept(&listener, &mut last_logged) => {
                let Some(entered) = enter(&grpc.connections.peers, GRPC) else {
                    continue;
                };
                configure(&tcp);
                let (grpc, builder, drain) = (grpc.clone(), builder.clone(), drain.clone());
                connections.spawn(connection(tcp, addr, entered, grpc, builder, drain));
            }
        }
    }
    drop(listener);
    drain.cancel();
    while connections.join_next().await.is_some() {}
}

/// One connection, from its place to its end.
async fn connection<S, B>(
    mut tcp: TcpStream,
    addr: SocketAddr,
    entered: Entered,
    grpc: Arc<Grpc<S>>,
    builder: Arc<http2::Builder<TokioExecutor>>,
    drain: CancellationToken,
) where
    S: Routes<B>,
    B: ReplyBody,
{
    let Some((_, place)) = identify(&mut tcp, addr, entered, grpc.proxy_protocol, GRPC).await
    else {
        return;
    };
    let connection = grpc.connections.register(place);
    let tcp_info = tcp.connect_info();
    let close_grace = grpc.connections.bounds.request_timeout;
    match &grpc.tls {
        None => {
            let info = Info::Tcp(tcp_info);
            serve_connection(tcp, info, &connection, &grpc, &builder, &drain, close_grace).await;
        }
        Some(current) => {
            if let Some(tls) = crate::tls::accept(current, tcp).await {
                let info = Info::Tls(tls.connect_info());
                serve_connection(tls, info, &connection, &grpc, &builder, &drain, close_grace)
                    .await;
            }
        }
    }
}

/// Serves HTTP/2 on `io` until the peer closes, or the connection is closed (by the
/// sweep or the drain, gracefully) or cut.
async fn serve_connection<IO, S, B>(
    io: IO,
    info: Info,
    connection: &Connection,
    grpc: &Grpc<S>,
    builder: &http2::Builder<TokioExecutor>,
    drain: &CancellationToken,
    close_grace: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Routes<B>,
    B: ReplyBody,
{
    let activity = connection.activity().clone();
    let service = TowerToHyperService::new(PerConnection {
        inner: grpc.service.clone(),
        info,
        activity: activity.clone(),
    });
    let io = TokioIo::new(Frames::new(io, activity.calm().clone()));
    let busy = Busy::new(activity.clone(), grpc.connections.clone());
    Behind::new(
        serve_until_closed(io, service, &activity, builder, drain, close_grace),
        move || busy.now(),
    )
    .await;
}

/// Serves `io` until the peer closes, or the connection is closed or cut (see
/// [`serve_connection`]).
async fn serve_until_closed<IO, S, B>(
    io: TokioIo<Frames<IO>>,
    service: TowerToHyperService<PerConnection<S>>,
    activity: &Activity,
    builder: &http2::Builder<TokioExecutor>,
    drain: &CancellationToken,
    close_grace: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Routes<B>,
    B: ReplyBody,
{
    let mut served = pin!(builder.serve_connection(io, service));
    // Until the connection ends, or is to be closed: gracefully within a grace (the
    // sweep's, or the drain's, which the caller bounds), or cut.
    let grace = tokio::select! {
        result = served.as_mut() => {
            if let Err(e) = result {
                debug!(error = %e, "a gRPC connection ended on an error");
            }
            return;
        }
        () = activity.closing().cancelled() => Some(if activity.stalled() {
            // Its answers went unread for the stall timeout already.
            CUT_GRACE
        } else {
            close_grace
        }),
        () = drain.cancelled() => None,
        () = activity.calm().cancelled() => {
            // The GOAWAY goes out after the frame being written, then the IO ends.
            let _ = tokio::time::timeout(CUT_GRACE, served).await;
            return;
        }
    };
    served.as_mut().graceful_shutdown();
    let finished = async {
        tokio::select! {
            _ = served.as_mut() => {}
            () = activity.calm().cancelled() => {
                let _ = tokio::time::timeout(CUT_GRACE, served.as_mut()).await;
            }
        }
    };
    match grace {
        None => finished.await,
        Some(grace) => {
            let _ = tokio::time::timeout(grace, finished).await;
        }
    }
}

/// What tonic's server puts in a request's extensions about its connection.
#[derive(Clone)]
enum Info {
    Tcp(TcpConnectInfo),
    Tls(TlsConnectInfo<TcpConnectInfo>),
}

/// The service on one connection: each request gets the connection's [`Info`] and
/// [`Activity`], and tonic's body.
#[derive(Clone)]
struct PerConnection<S> {
    inner: S,
    info: Info,
    activity: Arc<Activity>,
}

impl<S> Service<http::Request<Incoming>> for PerConnection<S>
where
    S: Service<http::Request<GrpcBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Answering<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let mut request = request.map(GrpcBody::new);
        let extensions = request.extensions_mut();
        match &self.info {
            Info::Tcp(info) => {
                extensions.insert(info.clone());
            }
            Info::Tls(info) => {
                extensions.insert(info.clone());
            }
        }
        extensions.insert(self.activity.clone());
        Answering::new(self.inner.call(request), self.activity.clone())
    }
}
