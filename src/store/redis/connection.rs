//! Connections to the Redis primary: where it is (one fixed address, whatever the
//! Sentinels name, or the primaries of a Cluster by slot), bb8's view of a connection,
//! and the rules by which a connection is declared dead or the primary declared moved.
//!
//! # Following the primary
//! A `MultiplexedConnection` never reconnects. So every dial asks afresh:
//! [`Manager::connect`] resolves the primary through the Sentinels (see `sentinel`) and
//! records the address. Each connection is stamped with the [`Primary`]'s epoch at its
//! dial; when the primary may have moved (a `+switch-master` from a Sentinel, a
//! `READONLY` or `NOREPLICAS` reply) the epoch moves on, and bb8 replaces every older
//! connection at its next checkout. A dropped connection is replaced alone.
//!
//! A Cluster connection follows its primaries itself: redis-rs's cluster client learns
//! the slot map, follows MOVED and ASK, and reconnects to a node that went away. bb8
//! replaces one only when its driver has stopped, and bounds its dial, which redis-rs
//! does not (redis-rs issue 1953).
//!
//! None of this is what keeps reads and writes off a replica: every script carries a
//! shebang line without `no-writes` (see `super::SHEBANG`), which Redis refuses on a
//! replica and on a primary short of `min-replicas-to-write`, whatever the client
//! believes. Following the primary is what makes the service work again afterwards.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use bb8::{ErrorSink, ManageConnection};
use bb8_redis::redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult,
    Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use tracing::warn;

use super::{primary::Primary, sentinel::Resolver};
use crate::store::StoreError;

/// Where connections go.
pub(crate) enum Target {
    /// One Redis at a fixed address (`--redis-url`).
    Direct(Client),
    /// The primary that the Sentinels name, asked at every dial.
    Sentinel(Resolver),
    /// The primaries of a Redis Cluster, found from seed nodes.
    Cluster(ClusterClient),
}

/// A pipelined connection: to one node, or to every primary of a Cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// bb8's view of a connection: the pipelined handle, its `broken` flag, and the epoch
/// of its dial.
pub(crate) struct Pooled {
    pub(crate) conn: Conn,
    broken: Arc<AtomicBool>,
    epoch: u64,
    primary: Arc<Primary>,
}

/// Dials connections to the primary and recognises the stale ones.
#[derive(Clone)]
pub(crate) struct Manager {
    shared: Arc<Shared>,
}

struct Shared {
    target: Target,
    connection: AsyncConnectionConfig,
    /// How long one node's dial may take (the Cluster dial is a few of them).
    connection_timeout: std::time::Duration,
    primary: Arc<Primary>,
}

/// A Cluster dial asks a seed node for the slot map, then dials every primary: a few
/// node dials' worth of time.
const CLUSTER_DIAL_ATTEMPTS: u32 = 3;

impl Manager {
    pub(crate) fn new(
        target: Target,
        connection: AsyncConnectionConfig,
        connection_timeout: std::time::Duration,
        primary: Arc<Primary>,
    ) -> Self {
        Manager {
            shared: Arc::new(Shared {
                target,
                connection,
                connection_timeout,
                primary,
            }),
        }
    }

    fn is_stale(&self, conn: &Pooled) -> bool {
        conn.broken.load(Ordering::Relaxed) || conn.epoch != self.shared.primary.epoch()
    }
}

impl ManageConnection for Manager {
    type Connection = Pooled;
    type Error = RedisError;

    async fn connect(&self) -> Result<Pooled, RedisError> {
        // The epoch is read before resolving: a move announced meanwhile makes this
        // connection stale at once rather than letting it pass for a current one.
        let epoch = self.shared.primary.epoch();
        let conn = match &self.shared.target {
            Target::Direct(client) => {
                let conn = client
                    .get_multiplexed_async_connection_with_config(&self.shared.connection)
                    .await?;
                self.shared
                    .primary
                    .dialled(client.get_connection_info().addr().to_string());
                Conn::Node(conn)
            }
            Target::Sentinel(resolver) => {
                let announced = self.shared.primary.announced();
                let (conn, address) = resolver
                    .connect(&self.shared.connection, announced.as_deref())
                    .await?;
                self.shared.primary.dialled(address);
                Conn::Node(conn)
            }
            Target::Cluster(client) => {
                // Bounded here: redis-rs waits for its first slot map without a bound of
                // its own, and a dial that never ends would hold a pool slot for ever.
                let dial = self
                    .shared
                    .connection_timeout
                    .saturating_mul(CLUSTER_DIAL_ATTEMPTS);
                let conn = tokio::time::timeout(dial, client.get_async_connection())
                    .await
                    .map_err(|_| {
                        RedisError::from((ErrorKind::Io, "no Redis Cluster node answered in time"))
                    })??;
                Conn::Cluster(conn)
            }
        };
        Ok(Pooled {
            conn,
            broken: Arc::new(AtomicBool::new(false)),
            epoch,
            primary: self.shared.primary.clone(),
        })
    }

    async fn is_valid(&self, conn: &mut Pooled) -> Result<(), RedisError> {
        if self.is_stale(conn) {
            Err(RedisError::from((ErrorKind::Io, STALE)))
        } else {
            Ok(())
        }
    }

    fn has_broken(&self, conn: &mut Pooled) -> bool {
        self.is_stale(conn)
    }
}

/// What `is_valid` says of a connection that must be replaced.
const STALE: &str = "the connection was dropped or the primary moved";

/// How often the same dial error is logged again while it lasts.
const REPEAT_DIAL_ERROR: std::time::Duration = std::time::Duration::from_secs(10);

/// Logs why dials fail. bb8 hands a failed dial's error here, not to the call that was
/// waiting for a connection (that call sees its timeout), so without this a wrong
/// password or an unknown master name would read as "did not answer in time". The same
/// error is logged once per [`REPEAT_DIAL_ERROR`], whatever the rate of dials.
#[derive(Clone, Debug, Default)]
pub(crate) struct DialErrors {
    last: Arc<Mutex<Option<(String, std::time::Instant)>>>,
}

impl ErrorSink<RedisError> for DialErrors {
    fn sink(&self, error: RedisError) {
        let text = error.to_string();
        // bb8 sends here what `is_valid` says of a connection at checkout too; a stale
        // connection is routine (its replacement is dialled next) and not a dial error.
        if text.contains(STALE) {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let repeated = last
            .as_ref()
            .is_some_and(|(seen, at)| *seen == text && at.elapsed() < REPEAT_DIAL_ERROR);
        if !repeated {
            warn!(error = %text, "dialling the Redis primary failed");
            *last = Some((text, std::time::Instant::now()));
        }
    }

    fn boxed_clone(&self) -> Box<dyn ErrorSink<RedisError>> {
        Box::new(self.clone())
    }
}

/// A clone of a pooled connection's handle, used outside the pool.
pub(crate) struct Handle {
    pub(crate) conn: Conn,
    broken: Arc<AtomicBool>,
    epoch: u64,
    primary: Arc<Primary>,
}

impl Handle {
    pub(crate) fn of(pooled: &Pooled) -> Self {
        Handle {
            conn: pooled.conn.clone(),
            broken: pooled.broken.clone(),
            epoch: pooled.epoch,
            primary: pooled.primary.clone(),
        }
    }

    /// Sends `pipe` (which ignores errors, and none of whose commands is `ignore`d) on
    /// this connection: every command's reply, a refusal as a `Value::ServerError`.
    pub(crate) async fn send(&self, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// Maps a Redis error. A connection that Redis dropped is marked broken so that the
    /// pool replaces it; a reply that says the node is no (longer a fit) primary moves
    /// the epoch so that every connection is dialled afresh.
    pub(crate) fn failed(&self, e: RedisError) -> StoreError {
        let dropped = match self.conn {
            Conn::Node(_) => {
                e.is_unrecoverable_error() || e.is_connection_dropped() || e.is_io_error()
            }
            // A node's connection inside it fails and heals on its own; only a stopped
            // driver, or one that has lost every node, is beyond repair.
            Conn::Cluster(_) => {
                e.kind() == ErrorKind::ClusterConnectionNotFound
                    || e.to_string().contains(CLUSTER_DRIVER_GONE)
            }
        };
        if dropped && !self.broken.swap(true, Ordering::Relaxed) {
            warn!(error = %e, "redis connection lost; it will be replaced");
        }
        if let Some(code) = e.code() {
            self.refused(code);
        }
        if e.is_timeout() {
            return StoreError::Timeout;
        }
        StoreError::Failed(e.to_string())
    }

    /// Looks at an error code that Redis answered, also inside a pipeline.
    pub(crate) fn refused(&self, code: &str) {
        if is_not_primary(code) {
            self.primary
                .moved(self.epoch, "Redis refused a call: not a writable primary");
        }
    }
}

/// What redis-rs's cluster client answers once its driver task has stopped.
const CLUSTER_DRIVER_GONE: &str = "redis_cluster: Unable to";

/// The error codes by which a node says it is not a primary that may serve: a replica
/// (`READONLY`, also what a demoted primary answers), or a primary cut off from its
/// replicas (`NOREPLICAS`, `min-replicas-to-write`), which a failover may have replaced.
pub(crate) fn is_not_primary(code: &str) -> bool {
    matches!(code, "READONLY" | "NOREPLICAS" | "MASTERDOWN")
}
