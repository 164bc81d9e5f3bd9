//! Get lookups outside Cluster: how one reads Redis, and how concurrent ones are
//! coalesced into pipelines.
//!
//! # Reading
//! Two ways, and by default each where it wins (`Mixed`): the script for a lone lookup,
//! where a round trip is what counts, commands for a batch, where Redis's CPU is. The
//! hidden `--redis-lookup` forces one, to measure them side by side (BENCHMARKS.md):
//! - `Script`: one `EVALSHA` of `scripts/get.lua` per lookup (TIME, GET the entry, GET
//!   its user's marker): one round trip, but Redis spends 6-8 us on the Lua call.
//! - `Commands`: `TIME` and `MGET` of the entries in one pipeline, then `MGET` of the
//!   markers of the entries that decode as live, judged here with the same rules
//!   (`judge_cached`). One `MGET` costs Redis less than a `GET` per key (13-20% of its CPU
//!   per hit, BENCHMARKS.md); where the ACL refuses it (`NOPERM`, an ACL written before
//!   lookups used it) the reads go key by key, from that batch on. The
//!   marker is read after the entry, which is the safe order (SPEC §8: a marker only
//!   moves forward); Cluster lookups take this shape anyway. Plain GETs are answered by
//!   a replica too, which the scripts' shebang refuses (SPEC §8: lookups go to a
//!   writable primary only); so each pipeline ends with [`PRIMARY_CHECK`], a write that
//!   a replica refuses (`READONLY`) and a primary short of replicas too (`NOREPLICAS`),
//!   and the pipeline's lookups fail when it is refused. It comes after the reads: a
//!   node that took it was a primary when it read them, unless it was promoted in
//!   between, and then what it read is what it holds as the primary.
//!
//! # Coalescing
//! Sent one by one, each lookup costs its own socket write on the service and its own
//! read and write on Redis, and a wake-up of the connection's driver for each; on 2
//! cores with 500 calls in flight those system calls and context switches were most of
//! what a Redis lookup added over a constant reply. Here the lookups that are ready at
//! the same moment go out as one pipeline: the batcher takes the first, yields once so
//! that every handler already scheduled can add its own, and sends what has gathered.
//! Under load that is dozens per write. A lookup that starts while no other is in
//! progress does not come here at all (see `RedisStore::lookup`): with nothing to
//! coalesce, the batcher's extra hop would only add latency.
//!
//! Callers keep their own deadline: a caller that gave up is skipped if its lookup has
//! not been sent, and ignored when its reply arrives.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bb8::Pool;
use bb8_redis::redis::{
    self, Cmd, ErrorKind, FromRedisValue, Pipeline, Script, ServerErrorKind, Value,
};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{
    Lua, checkout,
    connection::{Handle, Manager},
};
use crate::{
    clock::Micros,
    entry,
    keys::marker_key,
    store::{StoreError, Verdict, judge, judge_cached, read_marker},
};

/// How lookups read Redis (see above).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LookupMode {
    /// One Lua script per lookup.
    Script,
    /// Plain commands: the entry and the clock, then the marker of a live entry.
    Commands,
    /// The script for a lone lookup (one round trip), commands for a batch.
    #[default]
    Mixed,
}

/// A write that a replica, or a primary short of `min-replicas-to-write`, refuses, and
/// that changes nothing anywhere else: the key is never written (entry keys end in 32
/// hex digits), and deleting a missing key is neither replicated nor denied for want
/// of memory. It is in the service's key family, so the documented ACL allows it.
pub(super) const PRIMARY_CHECK: &str = "session_cache:primary-check";

/// What a lookup found: the raw entry (for the removal of a dead one), the store's
/// clock, and the verdict.
pub(super) struct Looked {
    pub raw: Option<Vec<u8>>,
    pub now: Micros,
    pub verdict: Verdict,
}

/// How lookups read Redis, shared by the batcher and the lone lookup.
pub(super) struct Reader {
    pub mode: LookupMode,
    /// `scripts/get.lua`, for `LookupMode::Script`.
    pub script: Script,
    /// The clock-skew margin of `judge` (SPEC §8).
    pub margin: Micros,
    /// Whether batched lookups read with `MGET` (one command a round, which costs Redis
    /// less than a `GET` per key); turned off for good when the ACL refuses it.
    pub mget: AtomicBool,
}

type Outcome = Result<Looked, StoreError>;

impl Reader {
    /// Looks up `keys` over one connection; one outcome per key, in order. `lone`: a
    /// lookup with no other in progress, not batched.
    pub(super) async fn read(
        &self,
        handle: &mut Handle,
        keys: &[&str],
        lone: bool,
    ) -> Vec<Outcome> {
        match (self.mode, lone) {
            (LookupMode::Script, _) | (LookupMode::Mixed, true) => {
                self.by_script(handle, keys).await
            }
            (LookupMode::Commands, _) | (LookupMode::Mixed, false) => {
                let mut mget = self.mget.load(Ordering::Relaxed);
                loop {
                    match self.by_commands(handle, keys, mget).await {
                        Ok(outcomes) => return outcomes,
                        Err(Failure::MgetDenied) if mget => {
                            if self.mget.swap(false, Ordering::Relaxed) {
                                warn!(
                                    "the Redis user may not run MGET: lookups read key by key \
                                     (add +mget to its ACL)"
                                );
                            }
                            mget = false;
                        }
                        Err(Failure::MgetDenied) => {
                            let e = StoreError::Failed("Redis refused MGET".into());
                            return keys.iter().map(|_| Err(e.clone())).collect();
                        }
                        Err(Failure::Store(e)) => {
                            return keys.iter().map(|_| Err(e.clone())).collect();
                        }
                    }
                }
            }
        }
    }

    async fn by_script(&self, handle: &mut Handle, keys: &[&str]) -> Vec<Outcome> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in keys {
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(1)
                .arg(key)
                .arg(super::READ_MARKER);
        }
        let values: Vec<Value> = match pipe.query_async(&mut handle.conn).await {
            Ok(values) => values,
            Err(e) => {
                let e = handle.failed(e);
                return keys.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let mut outcomes = Vec::with_capacity(keys.len());
        for (key, value) in keys.iter().zip(values) {
            let reply = match value {
                // Redis lost its script cache (a restart, SCRIPT FLUSH): load it again
                // through the plain path, which retries with the script itself.
                Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript) => self
                    .script
                    .key(*key)
                    .arg(super::READ_MARKER)
                    .invoke_async(&mut handle.conn)
                    .await
                    .map_err(|e| handle.failed(e)),
                Value::ServerError(e) => {
                    handle.refused(e.code());
                    Err(StoreError::Failed(format!("the get script failed: {e}")))
                }
                value => <(Option<Vec<u8>>, Option<Vec<u8>>, i64)>::from_redis_value(value)
                    .map_err(|e| StoreError::Failed(format!("the get script answered {e}"))),
            };
            outcomes.push(reply.map(|(raw, marker, now)| {
                let now = Micros(now);
                let verdict = judge(raw.as_deref(), marker.as_deref(), now, self.margin);
                Looked { raw, now, verdict }
            }));
        }
        outcomes
    }

    /// `mget`: each round reads its keys with one `MGET`, else a `GET` per key.
    async fn by_commands(
        &self,
        handle: &mut Handle,
        keys: &[&str],
        mget: bool,
    ) -> Result<Vec<Outcome>, Failure> {
        // The store's clock, the entries, the check.
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        read_keys(&mut pipe, keys.iter().copied(), mget);
        let mut values = self.query(handle, pipe).await?.into_iter();
        let now = values
            .next()
            .ok_or_else(|| StoreError::Failed("TIME was not answered".into()))
            .and_then(|time| match time {
                Value::ServerError(e) => Err(StoreError::Failed(format!("TIME failed: {e}"))),
                time => <(i64, i64)>::from_redis_value(time)
                    .map(|(seconds, micros)| Micros(seconds * 1_000_000 + micros))
                    .map_err(|e| StoreError::Failed(format!("TIME answered {e}"))),
            })?;
        let entries = replies(values, keys.len(), mget)?;
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(keys.len());
        // The live entries, whose markers are read next: (index, entry).
        let mut live = Vec::new();
        for value in entries {
            let looked = |raw, verdict| Ok(Looked { raw, now, verdict });
            match value {
                Value::Nil => outcomes.push(looked(None, Verdict::Miss)),
                Value::ServerError(e) => {
                    outcomes.push(Err(StoreError::Failed(format!("GET failed: {e}"))));
                }
                value => {
                    let raw = match Vec::<u8>::from_redis_value(value) {
                        Ok(raw) => raw,
                        Err(e) => {
                            outcomes.push(Err(StoreError::Failed(format!("GET answered {e}"))));
                            continue;
                        }
                    };
                    match entry::decode(&raw) {
                        Err(_) => outcomes.push(looked(
                            Some(raw),
                            Verdict::Remove(crate::store::Lookup::Corrupt),
                        )),
                        Ok(cached)
                            if Micros::from_datetime(cached.session.session_expire) < now =>
                        {
                            let verdict = judge_cached(cached, None, now, self.margin);
                            outcomes.push(looked(Some(raw), verdict));
                        }
                        Ok(cached) => {
                            live.push((outcomes.len(), cached));
                            // A placeholder, judged once the marker is in.
                            outcomes.push(looked(Some(raw), Verdict::Miss));
                        }
                    }
                }
            }
        }
        if live.is_empty() {
            return Ok(outcomes);
        }
        let marker_keys: Vec<String> = live
            .iter()
            .map(|(_, cached)| marker_key(&cached.session.user.id))
            .collect();
        let mut pipe = redis::pipe();
        read_keys(&mut pipe, marker_keys.iter().map(String::as_str), mget);
        let markers = match self
            .query(handle, pipe)
            .await
            .and_then(|markers| replies(markers.into_iter(), live.len(), mget))
        {
            Ok(markers) => markers,
            Err(Failure::MgetDenied) => return Err(Failure::MgetDenied),
            Err(Failure::Store(e)) => {
                // Never a hit without the marker's check.
                for (index, _) in live {
                    outcomes[index] = Err(e.clone());
                }
                return Ok(outcomes);
            }
        };
        for ((index, cached), marker) in live.into_iter().zip(markers) {
            let marker = match marker {
                Value::Nil => None,
                Value::ServerError(e) => {
                    outcomes[index] = Err(StoreError::Failed(format!("GET failed: {e}")));
                    continue;
                }
                // Anything that is not an instant's text counts as a revocation.
                marker => Some(
                    Vec::<u8>::from_redis_value(marker)
                        .ok()
                        .and_then(|raw| read_marker(&raw)),
                ),
            };
            if let Ok(looked) = &mut outcomes[index] {
                looked.verdict = judge_cached(cached, marker, now, self.margin);
            }
        }
        Ok(outcomes)
    }

    /// Sends `pipe` with [`PRIMARY_CHECK`] behind it; the replies of `pipe`'s commands,
    /// or the check's refusal.
    async fn query(&self, handle: &mut Handle, mut pipe: Pipeline) -> Result<Vec<Value>, Failure> {
        pipe.cmd("DEL").arg(PRIMARY_CHECK);
        pipe.ignore_errors();
        let mut values: Vec<Value> = pipe
            .query_async(&mut handle.conn)
            .await
            .map_err(|e| handle.failed(e))?;
        match values.pop() {
            Some(Value::ServerError(e)) => {
                handle.refused(e.code());
                Err(StoreError::Failed(format!("Redis refused the lookup: {e}")).into())
            }
            Some(_) => Ok(values),
            None => Err(StoreError::Failed("the lookup was not answered".into()).into()),
        }
    }
}

/// Why a commands lookup gave no outcomes.
enum Failure {
    /// The Redis user may not run `MGET` (an ACL from before lookups used it): read again
    /// key by key.
    MgetDenied,
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

/// Adds the reads of `keys` to `pipe`: one `MGET`, or a `GET` each.
fn read_keys<'a>(pipe: &mut Pipeline, keys: impl Iterator<Item = &'a str>, mget: bool) {
    if mget {
        let cmd = pipe.cmd("MGET");
        for key in keys {
            cmd.arg(key);
        }
    } else {
        for key in keys {
            pipe.cmd("GET").arg(key);
        }
    }
}

/// The values of `count` keys read by [`read_keys`], from the replies that follow.
fn replies(
    mut values: impl Iterator<Item = Value>,
    count: usize,
    mget: bool,
) -> Result<Vec<Value>, Failure> {
    if !mget {
        let values: Vec<Value> = values.take(count).collect();
        return match values.len() == count {
            true => Ok(values),
            false => Err(StoreError::Failed("a GET was not answered".into()).into()),
        };
    }
    match values.next() {
        Some(Value::Array(values)) if values.len() == count => Ok(values),
        Some(Value::ServerError(e)) if e.code() == "NOPERM" => Err(Failure::MgetDenied),
        Some(Value::ServerError(e)) => Err(StoreError::Failed(format!("MGET failed: {e}")).into()),
        Some(_) => Err(StoreError::Failed("MGET answered another shape".into()).into()),
        None => Err(StoreError::Failed("MGET was not answered".into()).into()),
    }
}

/// One lookup waiting for its batch.
pub(super) struct Job {
    pub key: String,
    pub reply: oneshot::Sender<Outcome>,
}

/// One script call waiting for its batch: its `EVALSHA`, and the script, for a Redis
/// that has lost it.
pub(super) struct Call {
    pub cmd: Cmd,
    pub script: Arc<Lua>,
    pub reply: oneshot::Sender<Result<Value, StoreError>>,
}

/// What waits in a batcher's queue.
pub(super) trait Waiting: Send + 'static {
    /// The caller has given up.
    fn gone(&self) -> bool;
    fn fail(self, e: StoreError);
}

impl Waiting for Job {
    fn gone(&self) -> bool {
        self.reply.is_closed()
    }

    fn fail(self, e: StoreError) {
        let _ = self.reply.send(Err(e));
    }
}

impl Waiting for Call {
    fn gone(&self) -> bool {
        self.reply.is_closed()
    }

    fn fail(self, e: StoreError) {
        let _ = self.reply.send(Err(e));
    }
}

/// Most calls in one pipeline; more wait for the next.
const MAX_BATCH: usize = 256;

/// Starts the lookups' batcher; it ends when the returned sender is dropped. The
/// channel needs no bound of its own: `--max-in-flight` bounds the calls that can be
/// waiting in it.
pub(super) fn lookups(pool: Pool<Manager>, reader: Arc<Reader>) -> mpsc::UnboundedSender<Job> {
    spawn(pool, move |mut handle, batch: Vec<Job>| {
        let reader = reader.clone();
        async move {
            let keys: Vec<&str> = batch.iter().map(|job| job.key.as_str()).collect();
            let outcomes = reader.read(&mut handle, &keys, false).await;
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                let _ = job.reply.send(outcome);
            }
        }
    })
}

/// Starts the script calls' batcher (Sets and revocations that wait for no replica);
/// it ends when the returned sender is dropped.
pub(super) fn calls(pool: Pool<Manager>) -> mpsc::UnboundedSender<Call> {
    spawn(pool, run_calls)
}

fn spawn<J, F, Fut>(pool: Pool<Manager>, send: F) -> mpsc::UnboundedSender<J>
where
    J: Waiting,
    F: Fn(Handle, Vec<J>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (jobs, queue) = mpsc::unbounded_channel();
    tokio::spawn(gather(queue, pool, send));
    jobs
}

async fn gather<J, F, Fut>(mut queue: mpsc::UnboundedReceiver<J>, pool: Pool<Manager>, send: F)
where
    J: Waiting,
    F: Fn(Handle, Vec<J>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    while let Some(first) = queue.recv().await {
        // Let the handlers that are already runnable enqueue their calls too.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batch.retain(|job| !job.gone());
        if batch.is_empty() {
            continue;
        }
        match checkout(&pool).await {
            // Sent from a task of its own, so that gathering goes on while this batch
            // waits for its reply.
            Ok(handle) => {
                tokio::spawn(send(handle, batch));
            }
            Err(e) => {
                for job in batch {
                    job.fail(e.clone());
                }
            }
        }
    }
}

/// Sends a batch of script calls as one pipeline. The calls whose script Redis has lost
/// (a restart, a failover, SCRIPT FLUSH) are sent again in a second pipeline, behind a
/// `SCRIPT LOAD` of each script they need: two round trips for the batch, however many
/// calls were refused.
async fn run_calls(mut handle: Handle, batch: Vec<Call>) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut scripts = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for call in batch {
        pipe.add_command(call.cmd);
        scripts.push(call.script);
        replies.push(call.reply);
    }
    let values: Vec<Value> = match pipe.query_async(&mut handle.conn).await {
        Ok(values) => values,
        Err(e) => {
            let e = handle.failed(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let mut again = redis::pipe();
    again.ignore_errors();
    let mut loaded: Vec<&str> = Vec::new();
    let mut refused = Vec::new();
    let calls = pipe.cmd_iter().zip(&scripts).zip(replies).zip(values);
    for (((cmd, script), reply), value) in calls {
        let outcome = match value {
            Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript) => {
                let hash = script.script.get_hash();
                if !loaded.contains(&hash) {
                    loaded.push(hash);
                    again.cmd("SCRIPT").arg("LOAD").arg(&script.code).ignore();
                }
                again.add_command(cmd.clone());
                refused.push(reply);
                continue;
            }
            Value::ServerError(e) => Err(handle.failed(e.into())),
            value => Ok(value),
        };
        let _ = reply.send(outcome);
    }
    if refused.is_empty() {
        return;
    }
    let outcomes: Vec<Result<Value, StoreError>> =
        match again.query_async::<Vec<Value>>(&mut handle.conn).await {
            Ok(values) => values
                .into_iter()
                .map(|value| match value {
                    Value::ServerError(e) => Err(handle.failed(e.into())),
                    value => Ok(value),
                })
                .collect(),
            Err(e) => {
                let e = handle.failed(e);
                refused.iter().map(|_| Err(e.clone())).collect()
            }
        };
    for (reply, outcome) in refused.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

/// Runs one script call (`cmd`, an `EVALSHA` of `script`) on `handle`.
pub(super) async fn evalsha(
    handle: &mut Handle,
    script: &Lua,
    cmd: &Cmd,
) -> Result<Value, StoreError> {
    match cmd.query_async::<Value>(&mut handle.conn).await {
        Ok(Value::ServerError(e)) if e.kind() == Some(ServerErrorKind::NoScript) => {
            reload(handle, script, cmd).await
        }
        Ok(Value::ServerError(e)) => Err(handle.failed(e.into())),
        Ok(value) => Ok(value),
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            reload(handle, script, cmd).await
        }
        Err(e) => Err(handle.failed(e)),
    }
}

/// Loads `script` and sends `cmd` again.
async fn reload(handle: &mut Handle, script: &Lua, cmd: &Cmd) -> Result<Value, StoreError> {
    script
        .script
        .load_async(&mut handle.conn)
        .await
        .map_err(|e| handle.failed(e))?;
    match cmd.query_async::<Value>(&mut handle.conn).await {
        Ok(Value::ServerError(e)) => Err(handle.failed(e.into())),
        Ok(value) => Ok(value),
        Err(e) => Err(handle.failed(e)),
    }
}
