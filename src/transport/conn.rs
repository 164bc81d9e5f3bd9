//! The open connections of the gRPC listener: each one's place (`super::peers`), what it
//! has in flight ([`Activity`]), and the sweep that closes the idle
//! (`--idle-timeout-seconds`), the stalled (`--stall-timeout-seconds`) and, on a
//! reserved place, those that have not authenticated in time.
//!
//! The sweep closes gracefully: it asks the connection's server (`super::serve`) for a
//! GOAWAY, after which calls in progress have the request timeout to finish, so that a
//! call that raced the close is still answered. A connection that abuses stream resets
//! (`super::track`) is cut instead, with GOAWAY ENHANCE_YOUR_CALM (`super::frames`).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::peers::{self, PeerCounts, Peers, Place};

/// How often connections are checked against the idle and stall bounds.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// The window over which a connection's stream resets are counted.
pub(crate) const RESET_WINDOW: Duration = Duration::from_secs(10);

/// The transport's bounds, from the flags.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    pub connections: peers::Limits,
    pub idle_timeout: Duration,
    pub stall_timeout: Duration,
    /// How long a closed connection's calls have to finish, and a connection on a
    /// reserved place to authenticate.
    pub request_timeout: Duration,
    pub calls: CallLimits,
    /// Streams one connection may have reset in [`RESET_WINDOW`] (when they are also
    /// most of its streams there) before it is cut.
    pub max_stream_resets: u32,
}

/// The bounds on calls whose answer is not yet delivered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallLimits {
    /// Over all connections.
    pub max: usize,
    /// Of `max`, those only authenticated calls may take.
    pub reserved: usize,
    /// One peer's share.
    pub per_peer: usize,
    /// One connection's share.
    pub per_connection: usize,
}

/// The open connections, shared by the listener, [`super::Track`] and the sweep.
pub(crate) struct Connections {
    pub(super) bounds: Bounds,
    pub(super) peers: Arc<Peers>,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    next_id: AtomicU64,
    /// Calls over all connections whose answer is not yet delivered.
    pub(super) open_calls: AtomicUsize,
    /// Streams started over all connections, ever (see `super::behind`).
    pub(super) started: AtomicU64,
    epoch: Instant,
}

/// What is in flight on one connection, and the signals that close it.
pub(crate) struct Activity {
    /// Closes the connection gracefully (GOAWAY, then its calls' grace).
    close: CancellationToken,
    /// Why it was closed, once it is.
    close_reason: std::sync::OnceLock<&'static str>,
    /// Cuts the connection with GOAWAY ENHANCE_YOUR_CALM.
    calm: CancellationToken,
    /// What its peer holds.
    pub(super) peer: Arc<PeerCounts>,
    /// Streams open, of any kind, and since when (milliseconds after the epoch) the
    /// count last changed.
    pub(super) streams: Mutex<(u32, u64)>,
    /// Calls whose answer is not yet delivered, by (start, id): the oldest tells whether
    /// the peer reads; their number is the connection's open calls.
    pub(super) calls: Mutex<BTreeSet<(u64, u64)>>,
    pub(super) next_call: AtomicU64,
    /// Streams whose request hyper has handed to the service and whose answer is not
    /// ready yet (see `super::behind`).
    pub(super) answering: AtomicU32,
    /// On a reserved place, until a call on it authenticates.
    pub(super) probation: AtomicBool,
    opened: u64,
    /// Streams ended and streams reset in the current window.
    resets: Mutex<Resets>,
}

#[derive(Default)]
struct Resets {
    since: u64,
    ended: u32,
    reset: u32,
}

impl Connections {
    pub(crate) fn new(bounds: Bounds) -> Arc<Connections> {
        Arc::new(Connections {
            bounds,
            peers: Peers::new(bounds.connections),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            open_calls: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Registers an admitted connection; it stays open until the returned guard drops.
    pub(super) fn register(self: &Arc<Self>, place: Place) -> Connection {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let activity = Arc::new(Activity {
            close: CancellationToken::new(),
            close_reason: std::sync::OnceLock::new(),
            calm: CancellationToken::new(),
            peer: place.counts().clone(),
            streams: Mutex::new((0, now)),
            calls: Mutex::new(BTreeSet::new()),
            next_call: AtomicU64::new(0),
            answering: AtomicU32::new(0),
            probation: AtomicBool::new(place.on_probation()),
            opened: now,
            resets: Mutex::new(Resets {
                since: now,
                ..Resets::default()
            }),
        });
        self.open.lock().unwrap().insert(id, activity.clone());
        crate::metrics::connections_open(super::GRPC, self.peers.open());
        Connection {
            id,
            activity,
            connections: self.clone(),
            _place: place,
        }
    }

    /// Closes the connections past a bound, every [`SWEEP_EVERY`], until `stop`.
    pub(crate) async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        let idle = self.bounds.idle_timeout.as_millis() as u64;
        let stall = self.bounds.stall_timeout.as_millis() as u64;
        let probation = self.bounds.request_timeout.as_millis() as u64;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let now = self.now_ms();
            let open: Vec<Arc<Activity>> = self.open.lock().unwrap().values().cloned().collect();
            for activity in open {
                if activity.close.is_cancelled() || activity.calm.is_cancelled() {
                    continue;
                }
                let (streams, since) = *activity.streams.lock().unwrap();
                let oldest_call = activity.calls.lock().unwrap().first().map(|c| c.0);
                let reason = if streams == 0 && now.saturating_sub(since) >= idle {
                    "idle"
                } else if oldest_call.is_some_and(|start| now.saturating_sub(start) >= stall) {
                    "stalled"
                } else if activity.probation.load(Ordering::Relaxed)
                    && now.saturating_sub(activity.opened) >= probation
                {
                    "unauthenticated"
                } else {
                    continue;
                };
                activity.close(reason);
            }
        }
    }
}

impl Activity {
    /// Asks for a graceful close, counted under `reason`; once.
    pub(super) fn close(&self, reason: &'static str) {
        if !self.calm.is_cancelled() && self.close_reason.set(reason).is_ok() {
            crate::metrics::connection_closed(reason);
            self.close.cancel();
        }
    }

    /// Whether it was closed for leaving its answers unread.
    pub(super) fn stalled(&self) -> bool {
        self.close_reason.get() == Some(&"stalled")
    }

    pub(super) fn closing(&self) -> &CancellationToken {
        &self.close
    }

    pub(super) fn calm(&self) -> &CancellationToken {
        &self.calm
    }

    /// Counts a stream that ended, `reset` (by the client before its answer was
    /// delivered, or by the server on an error) or not, and cuts the connection when
    /// its resets pass the bound in the window and are most of its streams there.
    pub(super) fn stream_ended(&self, connections: &Connections, reset: bool) {
        let now = connections.now_ms();
        let mut resets = self.resets.lock().unwrap();
        if now.saturating_sub(resets.since) >= RESET_WINDOW.as_millis() as u64 {
            *resets = Resets {
                since: now,
                ..Resets::default()
            };
        }
        resets.ended += 1;
        if !reset {
            return;
        }
        resets.reset += 1;
        let cut =
            resets.reset > connections.bounds.max_stream_resets && resets.reset * 2 > resets.ended;
        drop(resets);
        if cut && !self.calm.is_cancelled() {
            crate::metrics::connection_closed("resets");
            self.calm.cancel();
        }
    }
}

/// An admitted connection: holds its place and its registration until dropped.
pub(crate) struct Connection {
    id: u64,
    activity: Arc<Activity>,
    connections: Arc<Connections>,
    _place: Place,
}

impl Connection {
    pub(super) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.connections.open.lock().unwrap().remove(&self.id);
        // The place is released after this body: one fewer than counted.
        let open = self.connections.peers.open().saturating_sub(1);
        crate::metrics::connections_open(super::GRPC, open);
    }
}
