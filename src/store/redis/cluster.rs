//! Redis Cluster: the client, and what it cannot do for the store by itself.
//!
//! redis-rs's cluster client routes each command by its first key, follows MOVED and
//! ASK, and reconnects to nodes that went away. Two things are left here:
//! - A revocation that waits for replicas sends its script and `WAIT` in one pipeline,
//!   because `WAIT` answers for the writes of the connection it arrives on. The client
//!   routes the pipeline by the script's key but does not follow a redirection that
//!   one of its commands answers, so [`durable`] does: it never trusts a `WAIT` whose
//!   script did not run on that connection, before it.
//! - A ping must reach every primary (see `RedisStore::ping`), and so must the start-up
//!   check of the eviction policy: [`on_each_primary`].

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use bb8_redis::redis::{
    self, Cmd, ConnectionAddr, FromRedisValue, IntoConnectionInfo, RedisError, RedisResult,
    ServerErrorKind, TlsCertificates, TlsMode, Value,
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
    io::tcp::TcpSettings,
};
use tokio::time::{Instant, sleep};

use super::{
    connection::{Conn, Handle},
    settings::{CONNECT_TIMEOUT, HostPort, RedisConfig},
    slots::SlotMap,
};
use crate::store::StoreError;

/// How long a revocation waits before it tries again on a slot that a Cluster is moving
/// (`TRYAGAIN`) or cannot serve yet (`CLUSTERDOWN`), within its deadline.
const SETTLE: Duration = Duration::from_millis(10);

/// The cluster client: the store timeout bounds each call, retries included; TLS and
/// credentials apply to every node; every slot map it learns is kept in `slots`.
pub(super) fn client(
    nodes: &[HostPort],
    config: &RedisConfig,
    certificates: Option<TlsCertificates>,
    slots: SlotMap,
) -> RedisResult<ClusterClient> {
    let seeds = nodes
        .iter()
        .map(|node| {
            let address = if config.tls {
                ConnectionAddr::TcpTls {
                    host: node.host.clone(),
                    port: node.port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(node.host.clone(), node.port)
            };
            address.into_connection_info()
        })
        .collect::<RedisResult<Vec<_>>>()?;
    let mut builder = ClusterClientBuilder::new(seeds)
        .connection_timeout(CONNECT_TIMEOUT)
        // Per attempt and overall, retries and redirections included.
        .response_timeout(config.timeout)
        // Small requests and replies: send each at once (see RedisStore::new).
        .tcp_settings(TcpSettings::default().set_nodelay(true))
        // Reads still go to primaries; the strategy is how the store sees the slot map.
        .read_routing_strategy(slots);
    if let Some(user) = &config.credentials.username {
        builder = builder.username(user);
    }
    if let Some(password) = &config.credentials.password {
        builder = builder.password(password);
    }
    if config.tls {
        builder = builder.tls(TlsMode::Secure);
        if let Some(certificates) = certificates {
            builder = builder.certs(certificates);
        }
    }
    builder.build()
}

/// Runs `script` on `handle` and `wait` right behind it on the same node connection;
/// answers the script's reply and the replica count `WAIT` reported. In a Cluster,
/// follows the redirections that the script answers until `deadline`; `key` is the
/// script's first key, by which a Cluster routes it.
pub(super) async fn durable(
    handle: &mut Handle,
    key: &str,
    script: Cmd,
    wait: Cmd,
    deadline: Instant,
) -> Result<(Value, u32), StoreError> {
    // None: by the script's first key, as the cluster client routes.
    let mut ask: Option<(String, u16)> = None;
    loop {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if ask.is_some() {
            pipe.cmd("ASKING");
        }
        pipe.add_command(script.clone()).add_command(wait.clone());
        let sent = match (&mut handle.conn, ask.take()) {
            (Conn::Cluster(conn), Some((host, port))) => {
                let count = pipe.len();
                conn.route_pipeline(
                    pipe,
                    0,
                    count,
                    SingleNodeRoutingInfo::ByAddress { host, port },
                )
                .await
            }
            (conn, _) => pipe.query_async::<Vec<Value>>(conn).await,
        };
        let mut values = sent.map_err(|e| handle.failed(e))?;
        let replicas = values.pop();
        let reply = values.pop();
        let error = match (reply, replicas) {
            (Some(Value::ServerError(e)), _) => e,
            (Some(reply), Some(Value::Int(replicas))) => {
                return Ok((reply, u32::try_from(replicas).unwrap_or(0)));
            }
            (_, Some(Value::ServerError(e))) => {
                return Err(StoreError::Failed(format!("WAIT failed: {e}")));
            }
            (reply, replicas) => {
                return Err(StoreError::Failed(format!(
                    "a revocation answered {reply:?} and WAIT {replicas:?}"
                )));
            }
        };
        handle.refused(error.code());
        let kind = error.kind();
        let redirect = RedisError::from(error.clone())
            .redirect_node()
            .map(|(host, port)| (host.to_owned(), port));
        match (kind, redirect) {
            // The slot is moving: this key is on the importing node already.
            (Some(ServerErrorKind::Ask), Some(node)) => ask = Some(node),
            // The slot has moved: a plain command through the cluster client follows
            // the redirection and has it learn the new slot map; then the pipeline
            // goes by key again.
            (Some(ServerErrorKind::Moved), Some(_)) => {
                relearn(handle, key).await;
            }
            (Some(ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown), _) => {
                sleep(SETTLE).await;
            }
            _ => return Err(StoreError::Failed(format!("a revocation failed: {error}"))),
        }
        if Instant::now() >= deadline {
            return Err(StoreError::Timeout);
        }
    }
}

/// Has the cluster client learn where the script's first key lives now, by asking for
/// it (`EXISTS`, which changes nothing) and following the redirection that answers.
async fn relearn(handle: &mut Handle, key: &str) {
    let _: RedisResult<Value> = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut handle.conn)
        .await;
    sleep(SETTLE).await;
}

/// Runs `cmd` on each primary that serves slots now, one call per primary, all at once;
/// answers each primary's reply by address. The primaries come from `CLUSTER SLOTS` of
/// a primary, and each call is routed by a slot that primary serves, so that it goes
/// through the cluster client's redirections, retries and reconnections like any keyed
/// call. (The client's own all-primaries routing skips a node it has no connection to,
/// and after a failover it kept timing out on alternate calls for over a minute while
/// keyed calls worked.)
pub(super) async fn on_each_primary(
    conn: &mut ClusterConnection,
    primaries: &Primaries,
    cmd: &Cmd,
) -> RedisResult<Vec<(String, RedisResult<Value>)>> {
    let calls = primaries
        .get(conn)
        .await?
        .into_iter()
        .map(|(address, slot)| {
            let mut conn = conn.clone();
            let cmd = cmd.clone();
            async move {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(slot, SlotAddr::Master),
                ));
                (address, conn.route_command(cmd, route).await)
            }
        });
    Ok(futures_util::future::join_all(calls).await)
}

/// How long a list of primaries is trusted before `CLUSTER SLOTS` is asked again.
const PRIMARIES_LIFETIME: Duration = Duration::from_secs(10);

/// The primaries that the last `CLUSTER SLOTS` named, each with a slot it serves, kept a
/// while so that a ping is one round trip to each primary rather than two. Forgotten
/// when a call through it fails, and when it is [`PRIMARIES_LIFETIME`] old. A call
/// routed by a slot reaches whichever node serves that slot now, so a stale list misses
/// at most a primary added since.
#[derive(Default)]
pub(super) struct Primaries(Mutex<Option<(Instant, BTreeMap<String, u16>)>>);

impl Primaries {
    async fn get(&self, conn: &mut ClusterConnection) -> RedisResult<BTreeMap<String, u16>> {
        if let Some((at, primaries)) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
            && at.elapsed() < PRIMARIES_LIFETIME
        {
            return Ok(primaries.clone());
        }
        let slots = conn
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
            )
            .await?;
        let primaries = primaries(slots)?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), primaries.clone()));
        Ok(primaries)
    }

    pub(super) fn forget(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// One slot of each primary in a `CLUSTER SLOTS` reply, by the primary's `host:port`.
fn primaries(slots: Value) -> RedisResult<BTreeMap<String, u16>> {
    let ranges: Vec<Vec<Value>> = FromRedisValue::from_redis_value(slots)?;
    let mut primaries = BTreeMap::new();
    for range in ranges {
        let mut fields = range.into_iter();
        let (Some(first), Some(_last), Some(primary)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let slot: u16 = FromRedisValue::from_redis_value(first)?;
        let node: Vec<Value> = FromRedisValue::from_redis_value(primary)?;
        let mut node = node.into_iter();
        let (Some(host), Some(port)) = (node.next(), node.next()) else {
            continue;
        };
        let host: String = FromRedisValue::from_redis_value(host)?;
        let port: u16 = FromRedisValue::from_redis_value(port)?;
        primaries.entry(format!("{host}:{port}")).or_insert(slot);
    }
    Ok(primaries)
}

/// The Cluster's health: `ping` (the ping script) succeeds on every primary, and every
/// primary says `cluster_state:ok`. The ping script alone is not enough: it touches no
/// key, and a node answers a keyless script even while its Cluster refuses every key
/// (`CLUSTERDOWN`: a slot unserved, or no majority).
pub(super) async fn ping(
    handle: &mut Handle,
    primaries: &Primaries,
    ping: Cmd,
) -> Result<(), StoreError> {
    let checked = check(handle, primaries, ping).await;
    if checked.is_err() {
        primaries.forget();
    }
    checked
}

async fn check(handle: &mut Handle, primaries: &Primaries, ping: Cmd) -> Result<(), StoreError> {
    let Conn::Cluster(conn) = &mut handle.conn else {
        return Err(StoreError::Failed("not a Cluster connection".into()));
    };
    let mut state = redis::cmd("CLUSTER");
    state.arg("INFO");
    let mut other = conn.clone();
    let (pinged, states) = tokio::join!(
        on_each_primary(conn, primaries, &ping),
        on_each_primary(&mut other, primaries, &state)
    );
    let (pinged, states) = match (pinged, states) {
        (Ok(pinged), Ok(states)) => (pinged, states),
        (Err(e), _) | (_, Err(e)) => return Err(handle.failed(e)),
    };
    if pinged.is_empty() {
        return Err(StoreError::Failed(
            "no Cluster primary serves a slot".into(),
        ));
    }
    for (node, reply) in pinged {
        if let Err(e) = reply {
            return Err(StoreError::Failed(format!("Cluster primary {node}: {e}")));
        }
    }
    for (node, reply) in states {
        let ok = reply
            .and_then(|text| Ok(String::from_redis_value(text)?))
            .is_ok_and(|text| text.lines().any(|line| line.trim() == "cluster_state:ok"));
        if !ok {
            return Err(StoreError::Failed(format!(
                "Cluster primary {node} does not say cluster_state:ok"
            )));
        }
    }
    Ok(())
}
