//! The open connections of the gRPC listener: each one's place under
//! `--max-connections`, what it has in flight, and the sweep that closes the idle
//! (`--idle-timeout-seconds`) and the stalled (`--stall-timeout-seconds`).
//!
//! Each accepted [`Connection`] registers its [`Activity`] under its peer address (unique per
//! listener); `track` finds it from the request's `TcpConnectInfo` and counts the
//! stream until its answer has been handed to the peer's flow control. The sweep closes
//! the connections past a bound by failing their socket's next read and write.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

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
    pub(super) bounds: Bounds,
    pub(super) permits: Arc<Semaphore>,
    open: Mutex<HashMap<SocketAddr, Arc<Activity>>>,
    /// Calls over all connections whose answer is not yet delivered.
    pub(super) open_calls: AtomicUsize,
    epoch: Instant,
}

/// What is in flight on one connection.
pub(super) struct Activity {
    close: CancellationToken,
    /// Streams open, of any kind, and since when (milliseconds after the epoch) the
    /// count last changed.
    pub(super) streams: Mutex<(u32, u64)>,
    /// Calls whose answer is not yet delivered, by (start, id): the oldest tells whether
    /// the peer reads.
    pub(super) calls: Mutex<BTreeSet<(u64, u64)>>,
    pub(super) next_call: AtomicU64,
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

    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn activity(&self, peer: SocketAddr) -> Option<Arc<Activity>> {
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

/// An accepted connection: holds its place under the cap and fails its reads and
/// writes once the sweep closes it.
pub(crate) struct Connection {
    tcp: TcpStream,
    peer: SocketAddr,
    activity: Arc<Activity>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    connections: Arc<Connections>,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    pub(super) fn new(
        tcp: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        connections: &Arc<Connections>,
    ) -> Connection {
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
        Connection {
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

impl Drop for Connection {
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

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for Connection {
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

impl AsyncWrite for Connection {
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
