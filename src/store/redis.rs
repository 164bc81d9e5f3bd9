//! The Redis store: the Python service's layout, one Lua script per operation, and a
//! pool of pipelined connections that heals after a Redis restart.
//!
//! # Why the pool looks like this
//! A `MultiplexedConnection` pipelines: any number of calls can be in flight on it at
//! once, and cloning it is cheap. Holding one exclusively per call (what bb8 does by
//! default) serialises calls and, measured on 2 cores with 500 calls in flight, halves
//! throughput against one shared connection. So a call checks a connection out of bb8
//! only to clone its handle, and gives the slot back at once: bb8 decides which
//! connections exist, creates them, and replaces broken ones; it does not decide who
//! may use them.
//!
//! A multiplexed connection never reconnects, and bb8-redis cannot tell a dead one from
//! a live one without a PING per checkout. Here each connection carries a `broken` flag
//! that a call raises when Redis drops it; checkout tests only the flag, so bb8 drops
//! the dead connection and dials a new one, with no PING on the hot path.
//!
//! Concurrent Gets do not go to Redis one by one: `batch` sends the lookups that are
//! ready at the same moment as one pipeline. A lone Get, and the rarer Sets and
//! invalidations, go straight.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bb8::{ManageConnection, Pool, RunError};
use bb8_redis::redis::{
    self, AsyncConnectionConfig, Client, FromRedisValue, IntoConnectionInfo, RedisError, Script,
    ScriptInvocation, TlsCertificates, aio::MultiplexedConnection, io::tcp::TcpSettings,
};
use tokio::time::{Instant, timeout_at};
use tracing::{debug, warn};

use tokio::sync::{mpsc, oneshot};

use super::{Fence, Limits, Lookup, Store, StoreError, Stored, Verdict, judge};

mod batch;
use crate::{
    clock::Micros,
    entry::{self, Session},
    keys::{TokenHash, marker_key},
};

/// How long dialling Redis may take. A dial to a healthy Redis takes milliseconds; this
/// bounds a dial to one that accepts TCP but never answers (a frozen process), so that
/// dials cannot pile up. It runs off the request path: bb8 dials in the background, and
/// every call is bounded by the store timeout whatever the dial does.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL, with credentials and database if any.
    pub url: String,
    /// The bound on every call: checkout, command and reply together.
    pub timeout: Duration,
    /// How many pipelined connections to keep open.
    pub connections: u32,
    /// Entry, tombstone and marker lifetimes.
    pub limits: Limits,
    /// A PEM CA to trust for `rediss://` besides the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Whether to serve from a Redis that may evict any key.
    pub allow_evicting: bool,
}

/// Sessions in Redis, in the layout the Python service shares.
pub struct RedisStore {
    pool: Pool<Manager>,
    /// Get lookups, coalesced into pipelines (see `batch`).
    gets: mpsc::UnboundedSender<batch::Job>,
    /// Lookups in progress: a lookup with no other beside it goes straight to Redis,
    /// since there is nothing to coalesce and the batcher's hop would only add latency.
    lookups: AtomicUsize,
    timeout: Duration,
    limits: Limits,
    scripts: Scripts,
    allow_evicting: bool,
}

struct Scripts {
    get: Script,
    set: Script,
    invalidate_token: Script,
    invalidate_user: Script,
    remove_if: Script,
}

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("scripts/lib.lua"),
            include_str!(concat!("scripts/", $file))
        ))
    };
}

impl RedisStore {
    /// Sets up the pool without dialling: the service starts, and reports NOT_SERVING,
    /// while Redis is down. Must be called within a Tokio runtime (it starts the Get
    /// batcher).
    pub fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        // Small requests and replies: send each at once instead of letting Nagle's
        // algorithm hold it back for an ACK (redis-rs leaves TCP_NODELAY off).
        let info = config
            .url
            .as_str()
            .into_connection_info()?
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let client = match &config.ca_pem {
            Some(ca) => Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )?,
            None => Client::open(info)?,
        };
        // redis-rs has its own response timeout (500 ms by default); it must agree with
        // ours, or a late reply would be waited for after the caller was answered.
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(config.timeout));
        let pool = Pool::builder()
            .max_size(config.connections)
            .min_idle(Some(config.connections))
            // The test is the `broken` flag, not a PING.
            .test_on_check_out(true)
            // Connections live as long as Redis keeps them; a broken one is replaced.
            .max_lifetime(None)
            .idle_timeout(None)
            // bb8's own default is 30 s; a checkout never waits longer than a call may.
            .connection_timeout(config.timeout)
            // A refused dial fails the checkout at once instead of retrying until the
            // timeout: the caller gets UNAVAILABLE fast and the pinger tries again.
            .retry_connection(false)
            .build_unchecked(Manager { client, connection });
        let get = script!("get.lua");
        Ok(RedisStore {
            gets: batch::spawn(pool.clone(), get.clone()),
            lookups: AtomicUsize::new(0),
            pool,
            timeout: config.timeout,
            limits: config.limits,
            allow_evicting: config.allow_evicting,
            scripts: Scripts {
                get: get.clone(),
                set: script!("set.lua"),
                invalidate_token: script!("invalidate_token.lua"),
                invalidate_user: script!("invalidate_user.lua"),
                remove_if: script!("remove_if.lua"),
            },
        })
    }

    async fn connection(&self) -> Result<Handle, StoreError> {
        checkout(&self.pool).await
    }

    /// Runs one script within `deadline`.
    async fn run<T: FromRedisValue>(
        &self,
        deadline: Instant,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let call = async {
            let mut handle = self.connection().await?;
            invocation
                .invoke_async(&mut handle.conn)
                .await
                .map_err(|e| handle.failed(e))
        };
        timeout_at(deadline, call)
            .await
            .unwrap_or(Err(StoreError::Timeout))
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Runs the Get script for `key`: directly when no other lookup is in progress,
    /// else through the batcher.
    async fn lookup(&self, deadline: Instant, key: &str) -> Result<batch::Reply, StoreError> {
        let counted = Counted::enter(&self.lookups);
        if counted.alone {
            return self.run(deadline, &self.scripts.get.key(key)).await;
        }
        let (reply, replied) = oneshot::channel();
        let job = batch::Job {
            key: key.to_owned(),
            reply,
        };
        self.gets
            .send(job)
            .map_err(|_| StoreError::Failed("the get batcher has stopped".into()))?;
        timeout_at(deadline, replied)
            .await
            .map_err(|_| StoreError::Timeout)?
            .map_err(|_| StoreError::Failed("the get batcher dropped a lookup".into()))?
    }

    /// Redis's `maxmemory-policy`, from CONFIG GET or, where an ACL forbids that, from
    /// INFO; `None` when neither is allowed.
    pub async fn eviction_policy(&self) -> Result<Option<String>, StoreError> {
        let mut handle = self.connection().await?;
        let config: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut handle.conn)
            .await;
        if let Ok(pair) = config {
            return Ok(pair.into_iter().nth(1));
        }
        let info: Result<String, _> = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut handle.conn)
            .await;
        Ok(info.ok().and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("maxmemory_policy:"))
                .map(|policy| policy.trim().to_owned())
        }))
    }
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, token: &TokenHash) -> Result<Lookup, StoreError> {
        let deadline = self.deadline();
        let key = token.entry_key();
        let (raw, marker, now) = self.lookup(deadline, &key).await?;
        let fence = Fence(Micros(now));
        match judge(raw.as_deref(), marker.as_deref(), Micros(now)) {
            Verdict::Hit(session) => Ok(Lookup::Hit(session)),
            Verdict::Miss => Ok(Lookup::Miss(fence)),
            Verdict::Remove(outcome) => {
                // The verdict stands whether or not the removal lands: the next Get
                // judges the same entry the same way.
                let mut removal = self.scripts.remove_if.key(&key);
                removal.arg(raw.as_deref());
                if let Err(e) = self.run::<i64>(deadline, &removal).await {
                    debug!(token = token.short(), error = %e, "removing a dead entry failed");
                }
                Ok(outcome(fence))
            }
        }
    }

    async fn set(
        &self,
        token: &TokenHash,
        session: &Session,
        fence: Option<Fence>,
    ) -> Result<Stored, StoreError> {
        let deadline = self.deadline();
        let expire = Micros::from_datetime(session.session_expire);
        let (outcome, ttl): (String, u32) = self
            .run(
                deadline,
                self.scripts
                    .set
                    .key(token.entry_key())
                    .key(token.tombstone_key())
                    .key(marker_key(&session.user.id))
                    .arg(entry::encode_head(session))
                    .arg(expire.0)
                    .arg(fence.map(|f| f.to_string()).unwrap_or_default())
                    .arg(self.limits.ttl_seconds),
            )
            .await?;
        match outcome.as_str() {
            "stored" => Ok(Stored::Stored { ttl_seconds: ttl }),
            "revoked" => Ok(Stored::Revoked),
            "stale" => Ok(Stored::Stale),
            "expired" => Ok(Stored::Expired),
            other => Err(StoreError::Failed(format!(
                "the set script answered {other:?}"
            ))),
        }
    }

    async fn invalidate_token(&self, token: &TokenHash) -> Result<bool, StoreError> {
        let deleted: i64 = self
            .run(
                self.deadline(),
                self.scripts
                    .invalidate_token
                    .key(token.entry_key())
                    .key(token.tombstone_key())
                    .arg(self.limits.ttl_seconds),
            )
            .await?;
        Ok(deleted > 0)
    }

    async fn invalidate_user(&self, user_id: &str) -> Result<Micros, StoreError> {
        let at: i64 = self
            .run(
                self.deadline(),
                self.scripts
                    .invalidate_user
                    .key(marker_key(user_id))
                    .arg(self.limits.marker_ttl_seconds),
            )
            .await?;
        Ok(Micros(at))
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        let call = async {
            let mut handle = self.connection().await?;
            redis::cmd("PING")
                .query_async::<()>(&mut handle.conn)
                .await
                .map_err(|e| handle.failed(e))
        };
        timeout_at(started + self.timeout, call)
            .await
            .unwrap_or(Err(StoreError::Timeout))?;
        Ok(started.elapsed())
    }

    fn upkeep(&self) {
        let state = self.pool.state();
        crate::metrics::redis_connections(state.connections, state.idle_connections);
    }

    async fn readiness_problem(&self) -> Option<String> {
        if self.allow_evicting {
            return None;
        }
        let policy = timeout_at(self.deadline(), self.eviction_policy()).await;
        match policy {
            Ok(Ok(Some(policy))) if policy.starts_with("allkeys") => Some(format!(
                "Redis maxmemory-policy is {policy}: it may evict invalidation markers and \
                 tombstones, which would revive revoked sessions. Set noeviction or a \
                 volatile-* policy, or pass --allow-evicting-redis"
            )),
            Ok(Ok(None)) => {
                warn!("cannot read Redis maxmemory-policy (CONFIG and INFO refused): not checked");
                None
            }
            _ => None,
        }
    }
}

/// Counts a lookup in progress for as long as it lives, however it ends.
struct Counted<'a> {
    count: &'a AtomicUsize,
    /// No other lookup was in progress when this one began.
    alone: bool,
}

impl<'a> Counted<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let before = count.fetch_add(1, Ordering::Relaxed);
        Counted {
            count,
            alone: before == 0,
        }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A handle on a pipelined connection; the pool slot is given back at once.
async fn checkout(pool: &Pool<Manager>) -> Result<Handle, StoreError> {
    let pooled = pool.get().await.map_err(|e| match e {
        RunError::User(e) => StoreError::Failed(e.to_string()),
        RunError::TimedOut => StoreError::Timeout,
    })?;
    Ok(Handle {
        conn: pooled.conn.clone(),
        broken: pooled.broken.clone(),
    })
}

/// A clone of a pooled connection's handle, used outside the pool.
struct Handle {
    conn: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

impl Handle {
    /// Maps a Redis error, and marks the connection broken when Redis dropped it so
    /// that the pool replaces it at its next checkout.
    fn failed(&self, e: RedisError) -> StoreError {
        let dropped = e.is_unrecoverable_error() || e.is_connection_dropped() || e.is_io_error();
        if dropped && !self.broken.swap(true, Ordering::Relaxed) {
            warn!(error = %e, "redis connection lost; it will be replaced");
        }
        if e.is_timeout() {
            return StoreError::Timeout;
        }
        StoreError::Failed(e.to_string())
    }
}

/// bb8's view of a connection: the pipelined handle and its `broken` flag.
struct Pooled {
    conn: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

/// Dials pipelined connections and recognises the broken ones by their flag.
struct Manager {
    client: Client,
    connection: AsyncConnectionConfig,
}

impl ManageConnection for Manager {
    type Connection = Pooled;
    type Error = RedisError;

    async fn connect(&self) -> Result<Pooled, RedisError> {
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.connection)
            .await?;
        Ok(Pooled {
            conn,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn is_valid(&self, conn: &mut Pooled) -> Result<(), RedisError> {
        if conn.broken.load(Ordering::Relaxed) {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe).into())
        } else {
            Ok(())
        }
    }

    fn has_broken(&self, conn: &mut Pooled) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}
