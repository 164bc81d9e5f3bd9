//! The Redis store: the Python service's layout, one Lua script per write (and per lone
//! lookup; batched lookups are plain commands, see `batch`), and a pool of pipelined
//! connections that heals after a Redis restart, follows a Sentinel
//! failover, or spans the primaries of a Redis Cluster.
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
//! that a call raises when Redis drops it, and the epoch of its dial, which moves when
//! the primary may have moved (see `connection`); checkout tests only these, so bb8
//! drops the dead or stale connection and dials a new one, with no PING on the hot path.
//!
//! Revocations that must reach replicas (`--revocation-replicas`) are the exception:
//! `WAIT` blocks the connection it is sent on, so each holds a connection of a second,
//! small pool to itself while it waits.
//!
//! Concurrent Gets do not go to Redis one by one: `batch` sends the lookups that are
//! ready at the same moment as one pipeline of plain commands (GET and TIME, then the
//! markers of the live entries), which cost Redis a third of the Get script's CPU. A
//! lone Get takes the script, one round trip instead of two, and goes straight. Sets
//! and revocations (those that wait for no replica) are batched the same way, each
//! still its own script: a pipeline of `EVALSHA`s, one socket write and one wake-up of
//! the connection's driver for the lot; a lone one goes straight too.
//!
//! # Cluster
//! Every script touches the keys of one slot: the entry and its tombstone, whose hash
//! tag puts it in the entry's slot, or a user's marker. The marker is in its user's slot,
//! so in Cluster two things take two steps (SPEC §8): a lookup that finds an entry reads
//! the marker after it, and a Set with a fence reads the marker before its script
//! writes. Outside Cluster both stay one script and one round trip. Lookups are not
//! batched in Cluster: a pipeline goes to one node, and consecutive lookups rarely
//! share one.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bb8::{Pool, RunError};
use bb8_redis::redis::{
    self, AsyncConnectionConfig, Client, Cmd, FromRedisValue, IntoConnectionInfo, RedisError,
    Script, ScriptInvocation, TlsCertificates, io::tcp::TcpSettings,
};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use tokio::sync::{mpsc, oneshot};

use super::{
    Fence, Limits, Lookup, Store, StoreError, Stored, Verdict, judge_cached, marker_revokes_fence,
    read_marker, session_id_ttl,
};

mod batch;
mod cluster;
mod connection;
mod sentinel;

pub use batch::LookupMode;
use connection::{Conn, DialErrors, Handle, Manager, Primary, Target};
pub use sentinel::SentinelConfig;

use crate::{
    clock::Micros,
    config::HostPort,
    entry::{self, Session},
    keys::{TokenHash, marker_key},
};

/// How long dialling Redis may take. A dial to a healthy Redis takes milliseconds; this
/// bounds a dial to one that accepts TCP but never answers (a frozen process), so that
/// dials cannot pile up. It runs off the request path: bb8 dials in the background, and
/// every call is bounded by the store timeout whatever the dial does.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections held by revocations that wait for replicas. `WAIT` blocks the
/// connection it is sent on, so each such revocation holds one connection of this pool
/// to itself, apart from the pipelined connections that lookups share: a lookup never
/// queues behind a `WAIT`.
const DURABLE_CONNECTIONS: u32 = 8;

/// A user name and password for Redis or the Sentinels; the password never prints.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Where the Redis primary is (SPEC §8).
#[derive(Clone)]
pub enum RedisTopology {
    /// One Redis: a `redis://` or `rediss://` URL, with credentials and database if any.
    Url(String),
    /// The primary that these Sentinels name.
    Sentinel(SentinelConfig),
    /// A Redis Cluster, found from these seed nodes.
    Cluster(Vec<HostPort>),
}

/// Never shows the URL, which may carry a password.
impl std::fmt::Debug for RedisTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTopology::Url(_) => f.write_str("Url(..)"),
            RedisTopology::Sentinel(sentinels) => {
                f.debug_tuple("Sentinel").field(sentinels).finish()
            }
            RedisTopology::Cluster(nodes) => f.debug_tuple("Cluster").field(nodes).finish(),
        }
    }
}

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub topology: RedisTopology,
    /// Credentials for the data nodes, besides (never as well as) those in a URL.
    pub credentials: Credentials,
    /// TLS to the Sentinels and the data nodes they name, or to the Cluster's nodes (a
    /// URL says so itself).
    pub tls: bool,
    /// The bound on every call: checkout, command and reply together.
    pub timeout: Duration,
    /// How many pipelined connections to keep open.
    pub connections: u32,
    /// Entry, tombstone and marker lifetimes, and the clock-skew margin.
    pub limits: Limits,
    /// A PEM CA to trust for TLS besides the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Whether to serve from a Redis that may evict any key.
    pub allow_evicting: bool,
    /// Replicas that must have a revocation before it is acknowledged (Redis `WAIT`).
    pub revocation_replicas: u32,
    /// How a lookup reads Redis outside Cluster (see `batch`).
    pub lookup: LookupMode,
}

/// Sessions in Redis, in the layout the Python service shares.
pub struct RedisStore {
    kind: &'static str,
    /// Keys of one script live in one slot, and the marker elsewhere (see above).
    cluster: bool,
    /// The Cluster's primaries, for the health ping (see `cluster::Primaries`).
    primaries: cluster::Primaries,
    pool: Pool<Manager>,
    /// Connections that revocations hold alone while they `WAIT` for replicas; `None`
    /// when no replica is waited for.
    durable: Option<Pool<Manager>>,
    revocation_replicas: u32,
    /// Get lookups, coalesced into pipelines (see `batch`).
    gets: mpsc::UnboundedSender<batch::Job>,
    /// Sets and revocations (those that wait for no replica), coalesced the same way
    /// outside Cluster.
    calls: mpsc::UnboundedSender<batch::Call>,
    /// Script calls in progress: one with no other beside it goes straight to Redis.
    calling: AtomicUsize,
    /// How a lookup reads Redis outside Cluster.
    reader: Arc<batch::Reader>,
    /// Lookups in progress: a lookup with no other beside it goes straight to Redis,
    /// since there is nothing to coalesce and the batcher's hop would only add latency.
    lookups: AtomicUsize,
    timeout: Duration,
    limits: Limits,
    scripts: Scripts,
    allow_evicting: bool,
    /// Ends the Sentinel watchers when the store goes.
    _watchers: DropGuard,
}

struct Scripts {
    get: Script,
    set: Arc<Lua>,
    invalidate_token: Arc<Lua>,
    invalidate_user: Arc<Lua>,
    remove_if: Script,
    ping: Lua,
}

/// A script with its text, for where it goes as `EVAL`: inside the pipeline of a
/// revocation that waits for replicas, where a primary that lost its script cache (a
/// failover) could not be answered `NOSCRIPT` and retried, and to every Cluster primary
/// at once for a ping; and for `SCRIPT LOAD` where a batched call is answered
/// `NOSCRIPT`.
struct Lua {
    script: Script,
    code: String,
}

impl Lua {
    fn new(code: String) -> Self {
        Lua {
            script: Script::new(&code),
            code,
        }
    }

    /// `EVAL` of this script with these keys and arguments.
    fn eval(&self, keys: &[String], args: &[String]) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&self.code).arg(keys.len()).arg(keys).arg(args);
        cmd
    }

    /// `EVALSHA` of this script with these keys and arguments, as a command of its own
    /// (for the batcher; see `batch::evalsha` for the `NOSCRIPT` that may answer it).
    fn evalsha(&self, keys: &[String], args: &[String]) -> Cmd {
        let mut cmd = self.evalsha_of(keys.len());
        cmd.arg(keys).arg(args);
        cmd
    }

    /// `EVALSHA` of this script, to be given its `keys` keys and then its arguments.
    fn evalsha_of(&self, keys: usize) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(keys);
        cmd
    }

    /// `EVALSHA` of this script, loading it where it is missing.
    fn invocation(&self, keys: &[String], args: &[String]) -> ScriptInvocation<'_> {
        let mut invocation = self.script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        invocation
    }
}

/// The first line of every script. A script with a shebang and without the `no-writes`
/// flag is one that Redis (7.0 and later) refuses on a replica (`READONLY`) and on a
/// primary short of `min-replicas-to-write` (`NOREPLICAS`): so no call, not even a
/// lookup, is ever served by a demoted primary or a replica, whatever this process
/// believes about where the primary is. `allow-oom` lets the scripts that only read or
/// delete run on a full Redis, as plain scripts did; Set and the revocations leave it
/// off, and a full Redis refuses them (under `noeviction`) before they run.
const SHEBANG: &str = "#!lua\n";
const SHEBANG_ALLOW_OOM: &str = "#!lua flags=allow-oom\n";

macro_rules! lua {
    ($shebang:expr, $file:literal) => {
        [
            $shebang,
            include_str!("scripts/lib.lua"),
            include_str!(concat!("scripts/", $file)),
        ]
        .concat()
    };
}

macro_rules! script {
    ($shebang:expr, $file:literal) => {
        Script::new(&lua!($shebang, $file))
    };
}

/// The Get script's argument that has it read the marker in the same round trip
/// (outside Cluster only; see `scripts/get.lua`).
const READ_MARKER: &str = "marker";

impl RedisStore {
    /// Sets up the pools without dialling: the service starts, and reports NOT_SERVING,
    /// while Redis is down. Must be called within a Tokio runtime (it starts the Get
    /// batcher and, with Sentinels, their watchers).
    pub fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        let certificates = config.ca_pem.as_ref().map(|ca| TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        });
        let primary = Arc::new(Primary::default());
        let stop = CancellationToken::new();
        let (kind, target) = match &config.topology {
            RedisTopology::Url(url) => {
                // Small requests and replies: send each at once instead of letting
                // Nagle's algorithm hold it back for an ACK (redis-rs leaves TCP_NODELAY
                // off).
                let mut info = url
                    .as_str()
                    .into_connection_info()?
                    .set_tcp_settings(TcpSettings::default().set_nodelay(true));
                let mut redis = info.redis_settings().clone();
                if let Some(user) = &config.credentials.username {
                    redis = redis.set_username(user);
                }
                if let Some(password) = &config.credentials.password {
                    redis = redis.set_password(password);
                }
                info = info.set_redis_settings(redis);
                let client = match &certificates {
                    Some(certificates) => Client::build_with_tls(info, certificates.clone())?,
                    None => Client::open(info)?,
                };
                ("redis", Target::Direct(client))
            }
            RedisTopology::Sentinel(sentinels) => {
                let tls = config.tls.then(|| sentinel::Tls {
                    certificates: certificates.clone(),
                });
                let resolver =
                    sentinel::Resolver::new(sentinels, &config.credentials, tls.clone())?;
                sentinel::watch(sentinels, tls.as_ref(), primary.clone(), stop.clone())?;
                ("redis-sentinel", Target::Sentinel(resolver))
            }
            RedisTopology::Cluster(nodes) => {
                let client = cluster::client(nodes, config, certificates.clone())?;
                ("redis-cluster", Target::Cluster(client))
            }
        };
        let cluster = matches!(config.topology, RedisTopology::Cluster(_));
        // redis-rs has its own response timeout (500 ms by default); it must agree with
        // ours, or a late reply would be waited for after the caller was answered.
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(config.timeout));
        let manager = Manager::new(target, connection, CONNECT_TIMEOUT, primary);
        let dial_errors = DialErrors::default();
        let shared =
            pool(config.connections, config.timeout, &dial_errors).build_unchecked(manager.clone());
        let durable = (config.revocation_replicas > 0).then(|| {
            pool(DURABLE_CONNECTIONS, config.timeout, &dial_errors)
                .min_idle(Some(1))
                .build_unchecked(manager)
        });
        let get = script!(SHEBANG_ALLOW_OOM, "get.lua");
        let reader = Arc::new(batch::Reader {
            mode: config.lookup,
            script: get.clone(),
            margin: config.limits.clock_skew,
            mget: AtomicBool::new(true),
        });
        Ok(RedisStore {
            kind,
            cluster,
            primaries: cluster::Primaries::default(),
            gets: batch::lookups(shared.clone(), reader.clone()),
            calls: batch::calls(shared.clone()),
            calling: AtomicUsize::new(0),
            reader,
            lookups: AtomicUsize::new(0),
            pool: shared,
            durable,
            revocation_replicas: config.revocation_replicas,
            timeout: config.timeout,
            limits: config.limits,
            allow_evicting: config.allow_evicting,
            scripts: Scripts {
                get,
                set: Arc::new(Lua::new(lua!(SHEBANG, "set.lua"))),
                invalidate_token: Arc::new(Lua::new(lua!(SHEBANG, "invalidate_token.lua"))),
                invalidate_user: Arc::new(Lua::new(lua!(SHEBANG, "invalidate_user.lua"))),
                remove_if: script!(SHEBANG_ALLOW_OOM, "remove_if.lua"),
                ping: Lua::new(lua!(SHEBANG_ALLOW_OOM, "ping.lua")),
            },
            _watchers: stop.drop_guard(),
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

    /// Runs one script call (`cmd`, an `EVALSHA` of `script`) within `deadline`: outside
    /// Cluster, through the batcher when another call is in progress (see `batch`), else
    /// straight away.
    async fn call<T: FromRedisValue>(
        &self,
        deadline: Instant,
        script: &Arc<Lua>,
        cmd: Cmd,
    ) -> Result<T, StoreError> {
        let counted = Counted::enter(&self.calling);
        let value = if self.cluster || counted.alone {
            let call = async {
                let mut handle = self.connection().await?;
                batch::evalsha(&mut handle, script, &cmd).await
            };
            timeout_at(deadline, call)
                .await
                .unwrap_or(Err(StoreError::Timeout))?
        } else {
            let (reply, replied) = oneshot::channel();
            let call = batch::Call {
                cmd,
                script: script.clone(),
                reply,
            };
            self.calls
                .send(call)
                .map_err(|_| StoreError::Failed("the call batcher has stopped".into()))?;
            timeout_at(deadline, replied)
                .await
                .map_err(|_| StoreError::Timeout)?
                .map_err(|_| StoreError::Failed("the call batcher dropped a call".into()))??
        };
        T::from_redis_value(value).map_err(|e| StoreError::Failed(e.to_string()))
    }

    /// Runs one command within `deadline`.
    async fn query<T: FromRedisValue>(
        &self,
        deadline: Instant,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        let call = async {
            let mut handle = self.connection().await?;
            cmd.query_async(&mut handle.conn)
                .await
                .map_err(|e| handle.failed(e))
        };
        timeout_at(deadline, call)
            .await
            .unwrap_or(Err(StoreError::Timeout))
    }

    /// Runs a revocation's script and, with `--revocation-replicas`, waits until that
    /// many replicas have it (SPEC §8). The scripts are idempotent, so a caller may
    /// retry one that was not acknowledged.
    async fn revoke<T: FromRedisValue>(
        &self,
        lua: &Arc<Lua>,
        keys: &[String],
        args: &[String],
    ) -> Result<T, StoreError> {
        let deadline = self.deadline();
        let Some(durable) = &self.durable else {
            return self.call(deadline, lua, lua.evalsha(keys, args)).await;
        };
        let call = async {
            let pooled = durable.get().await.map_err(pool_error)?;
            let mut handle = Handle::of(&pooled);
            // WAIT answers for the writes of the connection it is sent on, so it goes
            // right behind the script, in one pipeline: to one node, over one
            // connection, even when a Cluster redirects it (see `cluster::durable`).
            // Nine tenths of what is left, so that WAIT's own answer (how many replicas
            // have the write) arrives before the deadline and says what fell short.
            // WAIT 0 would wait for ever.
            let wait_ms = (deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                * 9
                / 10)
                .max(1);
            let mut wait = redis::cmd("WAIT");
            wait.arg(self.revocation_replicas)
                .arg(u64::try_from(wait_ms).unwrap_or(u64::MAX));
            let (value, replicas) =
                cluster::durable(&mut handle, &keys[0], lua.eval(keys, args), wait, deadline)
                    .await?;
            if replicas < self.revocation_replicas {
                return Err(StoreError::NotReplicated {
                    reached: replicas,
                    wanted: self.revocation_replicas,
                });
            }
            T::from_redis_value(value)
                .map_err(|e| StoreError::Failed(format!("a revocation script answered {e}")))
        };
        timeout_at(deadline, call)
            .await
            .unwrap_or(Err(StoreError::Timeout))
    }

    /// Judges an entry that a Cluster lookup found, reading its user's marker after it
    /// (SPEC §8: a marker only moves forward, so the later read is the safe one). A
    /// marker that cannot be read fails the lookup: never a hit without the check.
    async fn judge_in_cluster(
        &self,
        deadline: Instant,
        raw: &[u8],
        now: Micros,
    ) -> Result<Verdict, StoreError> {
        let Ok(cached) = entry::decode(raw) else {
            return Ok(Verdict::Remove(Lookup::Corrupt));
        };
        if Micros::from_datetime(cached.session.session_expire) < now {
            return Ok(judge_cached(cached, None, now, self.limits.clock_skew));
        }
        let marker: Option<Vec<u8>> = self
            .query(
                deadline,
                redis::cmd("GET").arg(marker_key(&cached.session.user.id)),
            )
            .await?;
        Ok(judge_cached(
            cached,
            marker.as_deref().map(read_marker),
            now,
            self.limits.clock_skew,
        ))
    }

    /// The Cluster's health within `deadline` (see `cluster::ping`).
    async fn ping_cluster(&self, deadline: Instant) -> Result<(), StoreError> {
        let call = async {
            let mut handle = self.connection().await?;
            cluster::ping(
                &mut handle,
                &self.primaries,
                self.scripts.ping.eval(&[], &[]),
            )
            .await
        };
        timeout_at(deadline, call)
            .await
            .unwrap_or(Err(StoreError::Timeout))
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Looks `key` up outside Cluster: directly when no other lookup is in progress,
    /// else through the batcher.
    async fn lookup(&self, deadline: Instant, key: &str) -> Result<batch::Looked, StoreError> {
        let counted = Counted::enter(&self.lookups);
        if counted.alone {
            let call = async {
                let mut handle = self.connection().await?;
                let mut outcomes = self.reader.read(&mut handle, &[key], true).await;
                outcomes
                    .pop()
                    .unwrap_or_else(|| Err(StoreError::Failed("a lookup had no answer".into())))
            };
            return timeout_at(deadline, call)
                .await
                .unwrap_or(Err(StoreError::Timeout));
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

    /// Looks `key` up in Cluster: the Get script on the entry's node, then the marker
    /// of a live entry (see `judge_in_cluster`).
    async fn lookup_in_cluster(
        &self,
        deadline: Instant,
        key: &str,
    ) -> Result<batch::Looked, StoreError> {
        let (raw, _, now): (Option<Vec<u8>>, Option<Vec<u8>>, i64) =
            self.run(deadline, &self.scripts.get.key(key)).await?;
        let now = Micros(now);
        let verdict = match &raw {
            Some(value) => self.judge_in_cluster(deadline, value, now).await?,
            None => Verdict::Miss,
        };
        Ok(batch::Looked { raw, now, verdict })
    }

    /// Redis's `maxmemory-policy`, from CONFIG GET or, where an ACL forbids that, from
    /// INFO; `None` when neither is allowed. In Cluster, the first `allkeys-*` policy of
    /// any primary, else the first primary's.
    pub async fn eviction_policy(&self) -> Result<Option<String>, StoreError> {
        let mut handle = self.connection().await?;
        let mut config = redis::cmd("CONFIG");
        config.arg("GET").arg("maxmemory-policy");
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        let (config, info) = match &mut handle.conn {
            Conn::Node(conn) => (
                config.query_async::<Vec<String>>(conn).await,
                info.query_async::<String>(conn).await,
            ),
            Conn::Cluster(conn) => {
                // Every primary's answer, or the first refusal.
                let everywhere = async |conn: &mut _, cmd| {
                    let replies = cluster::on_each_primary(conn, &self.primaries, &cmd).await?;
                    replies
                        .into_iter()
                        .map(|(_, reply)| reply)
                        .collect::<Result<Vec<_>, _>>()
                };
                let config = everywhere(conn, config).await.and_then(|replies| {
                    let mut pairs = Vec::new();
                    for reply in replies {
                        pairs.extend(Vec::<String>::from_redis_value(reply)?);
                    }
                    Ok(pairs)
                });
                let info = everywhere(conn, info).await.and_then(|replies| {
                    let mut texts = Vec::new();
                    for reply in replies {
                        texts.push(String::from_redis_value(reply)?);
                    }
                    Ok(texts.join("\n"))
                });
                (config, info)
            }
        };
        let policies: Vec<String> = match (config, info) {
            (Ok(pairs), _) => pairs.into_iter().skip(1).step_by(2).collect(),
            (Err(_), Ok(text)) => text
                .lines()
                .filter_map(|line| line.strip_prefix("maxmemory_policy:"))
                .map(|policy| policy.trim().to_owned())
                .collect(),
            (Err(_), Err(_)) => Vec::new(),
        };
        let evicting = policies.iter().find(|p| p.starts_with("allkeys")).cloned();
        Ok(evicting.or_else(|| policies.into_iter().next()))
    }
}

impl RedisStore {
    /// Whether the node behind a one-node topology has cluster mode on (`INFO cluster`);
    /// `false` when it cannot tell.
    async fn is_cluster_node(&self) -> bool {
        let Ok(mut handle) = self.connection().await else {
            return false;
        };
        let info: Result<String, _> = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut handle.conn)
            .await;
        info.is_ok_and(|text| text.lines().any(|line| line.trim() == "cluster_enabled:1"))
    }
}

/// A pool's settings, shared by both pools.
fn pool(size: u32, timeout: Duration, dial_errors: &DialErrors) -> bb8::Builder<Manager> {
    Pool::builder()
        .error_sink(Box::new(dial_errors.clone()))
        .max_size(size)
        .min_idle(Some(size))
        // The test is the `broken` flag and the epoch, not a PING.
        .test_on_check_out(true)
        // Connections live as long as Redis keeps them; a broken one is replaced.
        .max_lifetime(None)
        .idle_timeout(None)
        // bb8's own default is 30 s; a checkout never waits longer than a call may.
        .connection_timeout(timeout)
        // A refused dial fails the checkout at once instead of retrying until the
        // timeout: the caller gets UNAVAILABLE fast and the pinger tries again.
        .retry_connection(false)
}

fn pool_error(e: RunError<RedisError>) -> StoreError {
    match e {
        RunError::User(e) => StoreError::Failed(e.to_string()),
        RunError::TimedOut => StoreError::Timeout,
    }
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn get(&self, token: &TokenHash) -> Result<Lookup, StoreError> {
        let deadline = self.deadline();
        let key = token.entry_key();
        let batch::Looked { raw, now, verdict } = if self.cluster {
            self.lookup_in_cluster(deadline, &key).await?
        } else {
            self.lookup(deadline, &key).await?
        };
        let fence = Fence(now);
        match verdict {
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
        let mut keys = vec![token.entry_key(), token.tombstone_key()];
        if self.cluster {
            // The marker is in another slot: checked first, here. A marker written
            // between this read and the script's write postdates the fence, so the Get
            // that finds the entry finds the marker too and refuses it (SPEC §8).
            if let Some(fence) = fence {
                let marker: Option<Vec<u8>> = self
                    .query(
                        deadline,
                        redis::cmd("GET").arg(marker_key(&session.user.id)),
                    )
                    .await?;
                let stale = marker.is_some_and(|raw| {
                    read_marker(&raw)
                        .is_none_or(|at| marker_revokes_fence(at, fence, self.limits.clock_skew))
                });
                if stale {
                    return Ok(Stored::Stale);
                }
            }
        } else {
            keys.extend([marker_key(&session.user.id), token.legacy_tombstone_key()]);
        }
        let script = &self.scripts.set;
        let mut cmd = script.evalsha_of(keys.len());
        cmd.arg(keys)
            .arg(entry::encode_head(session))
            .arg(expire.0)
            .arg(fence.map(|f| f.to_string()).unwrap_or_default())
            .arg(self.limits.ttl_seconds)
            .arg(self.limits.clock_skew.0)
            .arg(self.limits.marker_ttl_seconds);
        let (outcome, ttl): (String, u32) = self.call(deadline, script, cmd).await?;
        match outcome.as_str() {
            "stored" => Ok(Stored::Stored { ttl_seconds: ttl }),
            "revoked" => Ok(Stored::Revoked),
            "stale" => Ok(Stored::Stale),
            "expired" => Ok(Stored::Expired),
            "fence-out-of-range" => Ok(Stored::FenceOutOfRange),
            other => Err(StoreError::Failed(format!(
                "the set script answered {other:?}"
            ))),
        }
    }

    async fn invalidate_token(&self, token: &TokenHash) -> Result<bool, StoreError> {
        let mut keys = vec![token.entry_key(), token.tombstone_key()];
        if !self.cluster {
            keys.push(token.legacy_tombstone_key());
        }
        let deleted: i64 = self
            .revoke(
                &self.scripts.invalidate_token,
                &keys,
                &[self.limits.ttl_seconds.to_string()],
            )
            .await?;
        Ok(deleted > 0)
    }

    async fn invalidate_user(&self, user_id: &str) -> Result<Micros, StoreError> {
        let at: i64 = self
            .revoke(
                &self.scripts.invalidate_user,
                &[marker_key(user_id)],
                &[self.limits.marker_ttl_seconds.to_string()],
            )
            .await?;
        Ok(Micros(at))
    }

    async fn refused(&self, token: &TokenHash) -> Result<bool, StoreError> {
        self.query(
            self.deadline(),
            redis::cmd("EXISTS").arg(token.refused_key()),
        )
        .await
    }

    async fn refuse(&self, token: &TokenHash) -> Result<(), StoreError> {
        if self.limits.negative_ttl_seconds == 0 {
            return Ok(());
        }
        self.query(
            self.deadline(),
            redis::cmd("SET")
                .arg(token.refused_key())
                .arg(1)
                .arg("EX")
                .arg(self.limits.negative_ttl_seconds),
        )
        .await
    }

    async fn remember_session(
        &self,
        sid: &TokenHash,
        user_id: &str,
        session_expire: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StoreError> {
        // This process's clock: the key's lifetime needs no better, unlike a fence.
        let now = Micros::from_datetime(chrono::Utc::now());
        let expire = Micros::from_datetime(session_expire);
        let Some(ttl) = session_id_ttl(expire, now, self.limits.ttl_seconds) else {
            return Ok(());
        };
        self.query(
            self.deadline(),
            redis::cmd("SET")
                .arg(sid.session_id_key())
                .arg(user_id)
                .arg("EX")
                .arg(ttl),
        )
        .await
    }

    async fn session_user(&self, sid: &TokenHash) -> Result<Option<String>, StoreError> {
        self.query(self.deadline(), redis::cmd("GET").arg(sid.session_id_key()))
            .await
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        // Not PING, which a replica answers too: the ping script passes only where a
        // lookup and a revocation would (see SHEBANG). In Cluster, on every primary,
        // and each must say its Cluster is ok: with one slot unserved, a Cluster refuses
        // every call by default (cluster-require-full-coverage).
        let deadline = started + self.timeout;
        let ping = if self.cluster {
            self.ping_cluster(deadline).await
        } else {
            self.run::<String>(deadline, &self.scripts.ping.invocation(&[], &[]))
                .await
                .map(drop)
        };
        ping.map_err(|e| match e {
            // Redis before 7.0 reads the shebang as Lua, and fails to compile it.
            StoreError::Failed(text) if text.contains("near '#'") => StoreError::Failed(
                "this Redis cannot run scripts with flags (#!lua): Redis 7.0 or later is \
                     needed"
                    .into(),
            ),
            e => e,
        })?;
        Ok(started.elapsed())
    }

    fn upkeep(&self) {
        let state = self.pool.state();
        crate::metrics::redis_connections(state.connections, state.idle_connections);
    }

    async fn readiness_problem(&self) -> Option<String> {
        if !self.cluster && timeout_at(self.deadline(), self.is_cluster_node()).await == Ok(true) {
            return Some(
                "this Redis is a node of a Redis Cluster, which refuses keys of slots it does \
                 not serve: give the Cluster's nodes with --redis-cluster-nodes"
                    .into(),
            );
        }
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
    let pooled = pool.get().await.map_err(pool_error)?;
    Ok(Handle::of(&pooled))
}
