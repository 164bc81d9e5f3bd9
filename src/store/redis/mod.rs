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
//! Concurrent Gets do not go to Redis one by one: `coalesce` sends the lookups that are
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
//! writes. Outside Cluster both stay one script and one round trip. Batches go to a
//! Cluster as one pipeline per primary, by the slot map (`read`, `coalesce`, `nodes`).
//!
//! # The parts
//! - `settings`: what the flags say; `pool` and `connection`: the connections, and
//!   `primary`: where the primary is; `sentinel` and `cluster`: what each topology adds.
//! - `scripts`: the Lua scripts and how a script call is sent.
//! - `read`: how a lookup reads, on one Redis and in Cluster side by side; `coalesce`:
//!   concurrent calls sent as pipelines.
//! - `readiness`: whether a Redis that answers may serve.
//! - Here: the store itself, and how each of its calls runs within its deadline.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bb8::Pool;
use bb8_redis::redis::{
    self, AsyncConnectionConfig, Client, Cmd, FromRedisValue, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, ScriptInvocation, TlsCertificates, io::tcp::TcpSettings,
};
use tokio::{
    sync::mpsc,
    time::{Instant, timeout_at},
};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

use super::{
    Fence, Judgement, Limits, Lookup, Store, StoreError, Stored, marker_revokes_fence, read_marker,
    session_id_ttl,
};

mod cluster;
mod coalesce;
mod connection;
mod nodes;
mod pool;
mod primary;
mod read;
mod readiness;
mod scripts;
mod sentinel;
mod settings;
mod slots;

use connection::{DialErrors, Handle, Manager, Target};
use pool::{DURABLE_CONNECTIONS, checkout, pool, pool_error};
use primary::Primary;
use scripts::{Lua, Scripts};
use settings::CONNECT_TIMEOUT;
pub use settings::{Credentials, HostPort, LookupMode, RedisConfig, RedisTopology, SentinelConfig};

use crate::{
    clock::Micros,
    entry::{self, Session},
    keys::{TokenHash, marker_key},
};

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
    /// Get lookups, coalesced into pipelines (see `coalesce`).
    gets: mpsc::UnboundedSender<coalesce::Job>,
    /// Sets and revocations (those that wait for no replica), coalesced the same way
    /// outside Cluster.
    calls: mpsc::UnboundedSender<coalesce::ScriptCall>,
    /// Script calls in progress: one with no other beside it goes straight to Redis.
    calling: AtomicUsize,
    /// How a lookup reads Redis outside Cluster (see `read`).
    reader: Arc<read::Reader>,
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
        let map = slots::SlotMap::default();
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
                let client = cluster::client(nodes, config, certificates.clone(), map.clone())?;
                ("redis-cluster", Target::Cluster(client))
            }
        };
        let cluster = matches!(config.topology, RedisTopology::Cluster(_));
        // redis-rs has its own response timeout (500 ms by default); it must agree with
        // ours, or a late reply would be waited for after the caller was answered.
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(config.timeout));
        // Batches in a Cluster go on connections of their own to each primary (see
        // `nodes`), dialled as the cluster client dials.
        let nodes = cluster.then(|| {
            let mut redis = RedisConnectionInfo::default();
            if let Some(user) = &config.credentials.username {
                redis = redis.set_username(user);
            }
            if let Some(password) = &config.credentials.password {
                redis = redis.set_password(password);
            }
            Arc::new(nodes::Nodes::new(
                map,
                nodes::Dial {
                    redis,
                    tls: config.tls.then(|| certificates.clone()),
                    config: connection.clone(),
                },
            ))
        });
        let manager = Manager::new(target, connection, CONNECT_TIMEOUT, primary);
        let dial_errors = DialErrors::default();
        let shared =
            pool(config.connections, config.timeout, &dial_errors).build_unchecked(manager.clone());
        let durable = (config.revocation_replicas > 0).then(|| {
            pool(DURABLE_CONNECTIONS, config.timeout, &dial_errors)
                .min_idle(Some(1))
                .build_unchecked(manager)
        });
        let scripts = Scripts::new();
        let reader = Arc::new(read::Reader {
            mode: config.lookup,
            script: scripts.get.clone(),
            margin: config.limits.clock_skew,
            mget: AtomicBool::new(true),
            cluster: nodes.clone(),
        });
        Ok(RedisStore {
            kind,
            cluster,
            primaries: cluster::Primaries::default(),
            gets: coalesce::lookups(shared.clone(), reader.clone()),
            calls: coalesce::calls(shared.clone(), nodes),
            calling: AtomicUsize::new(0),
            reader,
            lookups: AtomicUsize::new(0),
            pool: shared,
            durable,
            revocation_replicas: config.revocation_replicas,
            timeout: config.timeout,
            limits: config.limits,
            allow_evicting: config.allow_evicting,
            scripts,
            _watchers: stop.drop_guard(),
        })
    }

    async fn connection(&self) -> Result<Handle, StoreError> {
        checkout(&self.pool).await
    }

    /// Runs `work` on a connection of the shared pool, checkout included, within
    /// `deadline`.
    async fn within<T>(
        &self,
        deadline: Instant,
        work: impl AsyncFnOnce(&mut Handle) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let call = async {
            let mut handle = self.connection().await?;
            work(&mut handle).await
        };
        timeout_at(deadline, call)
            .await
            .unwrap_or(Err(StoreError::Timeout))
    }

    /// Runs one script within `deadline`.
    async fn run<T: FromRedisValue>(
        &self,
        deadline: Instant,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.within(deadline, async |handle| {
            invocation
                .invoke_async(&mut handle.conn)
                .await
                .map_err(|e| handle.failed(e))
        })
        .await
    }

    /// Runs one script call (`cmd`, an `EVALSHA` of `script` whose first key is `key`)
    /// within `deadline`: through the coalescer when another call is in progress (see
    /// `coalesce`), else straight away.
    async fn call<T: FromRedisValue>(
        &self,
        deadline: Instant,
        script: &Arc<Lua>,
        key: &str,
        cmd: Cmd,
    ) -> Result<T, StoreError> {
        let counted = Counted::enter(&self.calling);
        let value = if counted.alone {
            self.within(deadline, async |handle| {
                scripts::evalsha(handle, script, &cmd).await
            })
            .await?
        } else {
            // No timer here: the batch answers by the deadline (see `coalesce`).
            let (reply, replied) = coalesce::Reply::new();
            let call = coalesce::ScriptCall {
                cmd,
                script: script.clone(),
                slot: slots::slot(key.as_bytes()),
                deadline,
                reply,
            };
            self.calls
                .send(call)
                .map_err(|_| StoreError::Failed("the call batcher has stopped".into()))?;
            replied
                .await
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
        self.within(deadline, async |handle| {
            cmd.query_async(&mut handle.conn)
                .await
                .map_err(|e| handle.failed(e))
        })
        .await
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
            return self
                .call(deadline, lua, &keys[0], lua.evalsha(keys, args))
                .await;
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

    /// The Cluster's health within `deadline` (see `cluster::ping`).
    async fn ping_cluster(&self, deadline: Instant) -> Result<(), StoreError> {
        self.within(deadline, async |handle| {
            cluster::ping(handle, &self.primaries, self.scripts.ping.eval(&[], &[])).await
        })
        .await
    }

    /// Looks `key` up: directly when no other lookup is in progress, else through the
    /// coalescer.
    async fn lookup(&self, deadline: Instant, key: &str) -> Result<read::Looked, StoreError> {
        let counted = Counted::enter(&self.lookups);
        if counted.alone {
            return self
                .within(deadline, async |handle| {
                    let mut outcomes = self.reader.read(handle, &[key], true).await;
                    outcomes
                        .pop()
                        .unwrap_or_else(|| Err(StoreError::Failed("a lookup had no answer".into())))
                })
                .await;
        }
        // No timer here: the batch answers by the deadline (see `coalesce`).
        let (reply, replied) = coalesce::Reply::new();
        let job = coalesce::Job {
            key: key.to_owned(),
            deadline,
            reply,
        };
        self.gets
            .send(job)
            .map_err(|_| StoreError::Failed("the get batcher has stopped".into()))?;
        replied
            .await
            .map_err(|_| StoreError::Failed("the get batcher dropped a lookup".into()))?
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn get(&self, token: &TokenHash) -> Result<Lookup, StoreError> {
        let deadline = self.deadline();
        let key = token.entry_key();
        let read::Looked {
            raw,
            now,
            judgement,
        } = self.lookup(deadline, &key).await?;
        let fence = Fence(now);
        match judgement {
            Judgement::Hit(session) => Ok(Lookup::Hit(session)),
            Judgement::Miss => Ok(Lookup::Miss(fence)),
            Judgement::Remove(outcome) => {
                // The judgement stands whether or not the removal lands: the next Get
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
        cmd.arg(&keys)
            .arg(entry::encode_head(session))
            .arg(expire.0)
            .arg(fence.map(|f| f.to_string()).unwrap_or_default())
            .arg(self.limits.ttl_seconds)
            .arg(self.limits.clock_skew.0)
            .arg(self.limits.marker_ttl_seconds);
        let (outcome, ttl): (String, u32) = self.call(deadline, script, &keys[0], cmd).await?;
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
        self.readiness_problem_now().await
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
