//! What one peer can hold of the process, bounded below the gRPC layer: accepted
//! connections (`--max-connections`, closed at accept past the cap), connections with
//! nothing in flight (`--idle-timeout-seconds`), and connections whose answers are not
//! being read (`--stall-timeout-seconds`); calls whose answer is not yet delivered,
//! over all connections (`--max-open-calls`, refused with RESOURCE_EXHAUSTED past it).
//! Slow requests are cut by tonic's request
//! timeout (`--request-timeout-ms`, set in `server.rs`).
//!
//! Activity is counted in HTTP/2 streams, not bytes: keepalive PINGs and window
//! updates keep no connection open. Each accepted [`Conn`] registers its [`Activity`]
//! under its peer address (unique per listener); [`Track`] finds it from the request's
//! `TcpConnectInfo` and counts the stream until its answer has been handed to the
//! peer's flow control. A sweep closes the connections past a bound by failing their
//! socket's next read and write.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{Stream, stream};
use http_body::{Body, Frame, SizeHint};
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{
    Status,
    body::Body as GrpcBody,
    codegen::{Service, http},
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};
use tracing::{info, warn};

/// After an accept error other than a peer's own (EMFILE, ENFILE, ENOBUFS...), the
/// loop waits this long before accepting again: retrying at once spins a core while
/// the process is out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Accept errors are logged at most once per this interval.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(5);
/// How often connections are checked against the idle and stall bounds.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// The transport's bounds, from the flags.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub stall_timeout: Duration,
    pub max_open_calls: usize,
}

/// The open connections, shared by the accept loop, [`Track`] and the sweep.
pub(crate) struct Connections {
    bounds: Bounds,
    permits: Arc<Semaphore>,
    open: Mutex<HashMap<SocketAddr, Arc<Activity>>>,
    /// Calls over all connections whose answer is not yet delivered.
    open_calls: AtomicUsize,
    epoch: Instant,
}

/// What is in flight on one connection.
struct Activity {
    close: CancellationToken,
    /// Streams open, of any kind, and since when (milliseconds after the epoch) the
    /// count last changed.
    streams: Mutex<(u32, u64)>,
    /// Calls whose answer is not yet delivered, by (start, id): the oldest tells whether
    /// the peer reads.
    calls: Mutex<BTreeSet<(u64, u64)>>,
    next_call: AtomicU64,
}

impl Connections {
    pub(crate) fn new(bounds: Bounds) -> Arc<Connections> {
        Arc::new(Connections {
            bounds,
            permits: Arc::new(Semaphore::new(bounds.max_connections)),
            open: Mutex::new(HashMap::new()),
            open_calls: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn activity(&self, peer: SocketAddr) -> Option<Arc<Activity>> {
        self.open.lock().unwrap().get(&peer).cloned()
    }

    /// Closes the connections past a bound, every [`SWEEP_EVERY`], until `stop`.
    pub(crate) async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        let idle = self.bounds.idle_timeout.as_millis() as u64;
        let stall = self.bounds.stall_timeout.as_millis() as u64;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let now = self.now_ms();
            let open: Vec<Arc<Activity>> = self.open.lock().unwrap().values().cloned().collect();
            for activity in open {
                if activity.close.is_cancelled() {
                    continue;
                }
                let (streams, since) = *activity.streams.lock().unwrap();
                let oldest_call = activity.calls.lock().unwrap().first().map(|c| c.0);
                let reason = if streams == 0 && now.saturating_sub(since) >= idle {
                    "idle"
                } else if oldest_call.is_some_and(|start| now.saturating_sub(start) >= stall) {
                    "stalled"
                } else {
                    continue;
                };
                crate::metrics::connection_closed(reason);
                activity.close.cancel();
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit, so that the connection cap
/// and not the default 1024 descriptors is what bounds connections.
pub(crate) fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(limit, "open files limit"),
        Err(e) => warn!(error = %e, "cannot raise the open files limit"),
    }
}

/// Connections accepted from `listener` with TCP_NODELAY and TCP keepalive, at most
/// `--max-connections` open at once: one past the cap is closed at once. Accept errors
/// never end the stream.
pub(crate) fn incoming(
    listener: TcpListener,
    connections: Arc<Connections>,
    keepalive: Duration,
) -> impl Stream<Item = io::Result<Conn>> {
    let keepalive = TcpKeepalive::new().with_time(keepalive);
    let last_logged: Option<Instant> = None;
    stream::unfold(
        (listener, connections, keepalive, last_logged),
        |(listener, connections, keepalive, mut last_logged)| async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) if is_peer_error(&e) => continue,
                    Err(e) => {
                        if last_logged.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
                            warn!(error = %e, backoff = ?ACCEPT_BACKOFF, "cannot accept connections");
                            last_logged = Some(Instant::now());
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.permits.clone().try_acquire_owned() else {
                    crate::metrics::connection_refused();
                    continue;
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    warn!(error = %e, "cannot set TCP_NODELAY");
                }
                if let Err(e) = SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
                    warn!(error = %e, "cannot set TCP keepalive");
                }
                let conn = Conn::new(tcp, peer, permit, &connections);
                return Some((Ok(conn), (listener, connections, keepalive, last_logged)));
            }
        },
    )
}

/// An error that concerns one peer only, not the listener.
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// An accepted connection: holds its place under the cap and fails its reads and
/// writes once the sweep closes it.
pub(crate) struct Conn {
    tcp: TcpStream,
    peer: SocketAddr,
    activity: Arc<Activity>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    connections: Arc<Connections>,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn new(
        tcp: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        connections: &Arc<Connections>,
    ) -> Conn {
        let close = CancellationToken::new();
        let activity = Arc::new(Activity {
            close: close.clone(),
            streams: Mutex::new((0, connections.now_ms())),
            calls: Mutex::new(BTreeSet::new()),
            next_call: AtomicU64::new(0),
        });
        connections
            .open
            .lock()
            .unwrap()
            .insert(peer, activity.clone());
        crate::metrics::connections_open(connections.open_count());
        Conn {
            tcp,
            peer,
            activity,
            closed: Box::pin(close.cancelled_owned()),
            connections: connections.clone(),
            _permit: permit,
        }
    }

    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.closed.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "connection closed: idle, or its answers unread",
            )
        })
    }
}

impl Connections {
    fn open_count(&self) -> usize {
        self.bounds.max_connections - self.permits.available_permits()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().unwrap();
        if open
            .get(&self.peer)
            .is_some_and(|a| Arc::ptr_eq(a, &self.activity))
        {
            open.remove(&self.peer);
        }
        drop(open);
        // The permit is released after this body: one fewer than counted.
        crate::metrics::connections_open(self.connections.open_count().saturating_sub(1));
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Counts each stream on its connection's [`Activity`] from its headers until its
/// answer's last frame is handed to HTTP/2 (or the stream is reset).
#[derive(Clone)]
pub(crate) struct Track<S> {
    inner: S,
    connections: Arc<Connections>,
}

impl<S> Track<S> {
    pub(crate) fn layer(
        connections: Arc<Connections>,
    ) -> impl tower_layer::Layer<S, Service = Track<S>> + Clone {
        tower_layer::layer_fn(move |inner| Track {
            inner,
            connections: connections.clone(),
        })
    }
}

/// Whether a method is a long-lived stream, whose answer may rightly stay open (health
/// Watch, reflection), rather than a call that must be answered and read.
fn is_long_lived(path: &str) -> bool {
    path.ends_with("/Watch") || path.ends_with("/ServerReflectionInfo")
}

/// One stream's place in its connection's counts, released on drop.
struct InFlight {
    activity: Arc<Activity>,
    connections: Arc<Connections>,
    call: Option<(u64, u64)>,
}

impl InFlight {
    /// Counts a stream from `peer`; `Err` when it is a call and `--max-open-calls` are
    /// open.
    fn start(
        connections: &Arc<Connections>,
        peer: Option<SocketAddr>,
        call: bool,
    ) -> Result<Option<InFlight>, Status> {
        if call {
            let open = connections.open_calls.fetch_add(1, Ordering::Relaxed);
            if open >= connections.bounds.max_open_calls {
                connections.open_calls.fetch_sub(1, Ordering::Relaxed);
                return Err(Status::resource_exhausted(
                    "overloaded: too many answers not yet delivered; retry with backoff",
                ));
            }
        }
        let Some(activity) = peer.and_then(|peer| connections.activity(peer)) else {
            if call {
                connections.open_calls.fetch_sub(1, Ordering::Relaxed);
            }
            return Ok(None);
        };
        let now = connections.now_ms();
        {
            let mut streams = activity.streams.lock().unwrap();
            *streams = (streams.0 + 1, now);
        }
        let call = call.then(|| {
            let key = (now, activity.next_call.fetch_add(1, Ordering::Relaxed));
            activity.calls.lock().unwrap().insert(key);
            key
        });
        Ok(Some(InFlight {
            activity,
            connections: connections.clone(),
            call,
        }))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.connections.now_ms();
        {
            let mut streams = self.activity.streams.lock().unwrap();
            *streams = (streams.0.saturating_sub(1), now);
        }
        if let Some(key) = self.call {
            self.activity.calls.lock().unwrap().remove(&key);
            self.connections.open_calls.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn peer_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
}

impl<S, B> Service<http::Request<B>> for Track<S>
where
    S: Service<http::Request<B>, Response = http::Response<GrpcBody>>,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<GrpcBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = !is_long_lived(request.uri().path());
        let in_flight = match InFlight::start(&self.connections, peer_of(&request), call) {
            Ok(in_flight) => in_flight,
            Err(refused) => {
                let response = refused.into_http().map(|body| Tracked {
                    body,
                    _in_flight: None,
                });
                return Box::pin(std::future::ready(Ok(response)));
            }
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// An answer's body that keeps its stream counted until HTTP/2 drops it.
pub(crate) struct Tracked<B> {
    body: B,
    _in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
