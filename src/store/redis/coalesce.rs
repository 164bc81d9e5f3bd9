//! The coalescer: concurrent lookups, Sets and revocations sent as pipelines.
//!
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
//! One batch is on its way at a time: the next gathers while it is, and goes when it
//! is answered, or after [`HOLD`] if it is slow. Under load that makes the batches as
//! large as the load is deep (about a hundred lookups at 500 in flight, against about
//! thirty when each batch went as soon as it had gathered), which halves the pipelines
//! Redis reads and answers per call and the service's system calls and wake-ups with
//! them (BENCHMARKS.md, "One batch on its way at a time"). The bound on the wait keeps a
//! slow node (a Cluster primary failing over, a stalled connection) from holding back
//! the lookups bound elsewhere for longer than [`HOLD`], and lets a Redis far away (a
//! round trip near a millisecond) have several batches on their way, as it needs to.
//!
//! The batch keeps its callers' deadlines, so that a caller waits on its reply without
//! a timer of its own (a timer per call cost a Redis lookup about 2% of its CPU): a
//! batch is given up at the earliest deadline among its calls, and each call it has not
//! answered then is answered that the store did not answer in time ([`Reply`]). Calls
//! gathered together arrived within moments of each other, so none is given up much
//! before its own deadline. A caller that gave up is skipped if its call has not been
//! sent, and ignored when its reply arrives.

use std::{future::Future, sync::Arc, time::Duration};

use bb8::Pool;
use bb8_redis::redis::{self, Cmd, Pipeline, RedisError, ServerErrorKind, Value};
use futures_util::future::join_all;
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::{Instant, sleep, timeout_at},
};

use super::{
    connection::{Handle, Manager},
    nodes::{self, Nodes, Place},
    pool::checkout,
    read::{Looked, Reader},
    scripts::{self, Lua},
};
use crate::store::StoreError;

/// Where a call's answer goes: answered once, and when dropped unanswered (its batch
/// was given up at the deadline, or the batcher has stopped) it answers that the store
/// did not answer in time, so that a caller waiting on it needs no timer.
pub(super) struct Reply<T>(Option<oneshot::Sender<Result<T, StoreError>>>);

impl<T> Reply<T> {
    /// A reply, and the receiver its caller waits on.
    pub(super) fn new() -> (Self, oneshot::Receiver<Result<T, StoreError>>) {
        let (reply, replied) = oneshot::channel();
        (Reply(Some(reply)), replied)
    }

    pub(super) fn send(mut self, outcome: Result<T, StoreError>) {
        if let Some(reply) = self.0.take() {
            let _ = reply.send(outcome);
        }
    }

    /// The caller has given up.
    fn is_closed(&self) -> bool {
        self.0.as_ref().is_none_or(oneshot::Sender::is_closed)
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(reply) = self.0.take() {
            let _ = reply.send(Err(StoreError::Timeout));
        }
    }
}

/// One lookup waiting for its batch.
pub(super) struct Job {
    pub key: String,
    /// When its caller stops waiting.
    pub deadline: Instant,
    pub reply: Reply<Looked>,
}

/// One script call waiting for its batch: its `EVALSHA`, the script, for a Redis that
/// has lost it, and the Cluster slot of its keys.
pub(super) struct ScriptCall {
    pub cmd: Cmd,
    pub script: Arc<Lua>,
    pub slot: u16,
    pub deadline: Instant,
    pub reply: Reply<Value>,
}

/// What waits in a batcher's queue.
pub(super) trait Waiting: Send + 'static {
    /// The caller has given up.
    fn gone(&self) -> bool;
    fn deadline(&self) -> Instant;
    fn fail(self, e: StoreError);
}

impl Waiting for Job {
    fn gone(&self) -> bool {
        self.reply.is_closed()
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn fail(self, e: StoreError) {
        self.reply.send(Err(e));
    }
}

impl Waiting for ScriptCall {
    fn gone(&self) -> bool {
        self.reply.is_closed()
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn fail(self, e: StoreError) {
        self.reply.send(Err(e));
    }
}

/// Most calls in one pipeline; more wait for the next.
const MAX_BATCH: usize = 256;

/// How long a batch on its way holds the next one back (see the module's
/// documentation): several round trips on loopback or within a zone, where batches are
/// answered well within it.
const HOLD: Duration = Duration::from_millis(1);

/// Starts the lookups' batcher; it ends when the returned sender is dropped. The
/// channel needs no bound of its own: `--max-in-flight` bounds the calls that can be
/// waiting in it.
pub(super) fn lookups(pool: Pool<Manager>, reader: Arc<Reader>) -> mpsc::UnboundedSender<Job> {
    spawn(pool, move |handle, batch: Vec<Job>| {
        let reader = reader.clone();
        async move {
            let keys: Vec<&str> = batch.iter().map(|job| job.key.as_str()).collect();
            let outcomes = reader.read(&handle, &keys, false).await;
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                job.reply.send(outcome);
            }
        }
    })
}

/// Starts the script calls' batcher (Sets and revocations that wait for no replica);
/// it ends when the returned sender is dropped. In a Cluster (`cluster`), each batch goes
/// to the primaries as a pipeline each.
pub(super) fn calls(
    pool: Pool<Manager>,
    cluster: Option<Arc<Nodes>>,
) -> mpsc::UnboundedSender<ScriptCall> {
    spawn(pool, move |handle, batch| {
        run_calls(handle, batch, cluster.clone())
    })
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
    // The batch on its way (see the module's documentation).
    let way = Arc::new(Semaphore::new(1));
    while let Some(first) = queue.recv().await {
        let Ok(on_its_way) = way.clone().acquire_owned().await else {
            return;
        };
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
        let Some(deadline) = batch.iter().map(Waiting::deadline).min() else {
            continue;
        };
        match timeout_at(deadline, checkout(&pool)).await {
            // Sent from a task of its own, so that gathering goes on while this batch
            // waits for its reply; given up at the deadline, its calls unanswered then
            // answer that the store did not answer in time (see `Reply`).
            Ok(Ok(handle)) => {
                let sent = timeout_at(deadline, send(handle, batch));
                tokio::spawn(async move {
                    tokio::pin!(sent);
                    tokio::select! {
                        _ = &mut sent => return,
                        () = sleep(HOLD) => {}
                    }
                    drop(on_its_way);
                    let _ = sent.await;
                });
            }
            Ok(Err(e)) => {
                for job in batch {
                    job.fail(e.clone());
                }
            }
            Err(_) => {
                for job in batch {
                    job.fail(StoreError::Timeout);
                }
            }
        }
    }
}

/// Sends a batch of script calls: as one pipeline, or in a Cluster as one pipeline per
/// primary, by the slot of each call's keys (each script's keys share one slot).
async fn run_calls(handle: Handle, batch: Vec<ScriptCall>, cluster: Option<Arc<Nodes>>) {
    let Some(nodes) = cluster else {
        return send_calls(&handle, None, Place::Pooled, batch).await;
    };
    let groups = nodes.split(batch.iter().map(|call| call.slot));
    let mut batch: Vec<Option<ScriptCall>> = batch.into_iter().map(Some).collect();
    let parts: Vec<_> = groups
        .into_iter()
        .map(|group| {
            let calls: Vec<ScriptCall> = group
                .members
                .into_iter()
                .filter_map(|i| batch[i].take())
                .collect();
            let nodes = &nodes;
            let handle = &handle;
            async move {
                match group.primary {
                    Some(primary) => {
                        let place = Place::Primary(primary, group.slot);
                        send_calls(handle, Some(nodes), place, calls).await;
                    }
                    // A slot the map names no primary for: the cluster client finds it.
                    None => {
                        let calls = calls.into_iter().map(|c| (c.cmd, c.script, c.reply));
                        alone(handle, calls.collect()).await;
                    }
                }
            }
        })
        .collect();
    join_all(parts).await;
}

/// Sends each call (its `EVALSHA`, script and reply) on its own through the pooled
/// connection; in a Cluster, the cluster client routes each and follows its
/// redirections.
async fn alone(handle: &Handle, calls: Vec<(Cmd, Arc<Lua>, Reply<Value>)>) {
    join_all(calls.into_iter().map(|(cmd, script, reply)| async move {
        reply.send(scripts::evalsha(handle, &script, &cmd).await);
    }))
    .await;
}

/// Sends script calls to one node as one pipeline. The calls whose script Redis has lost
/// (a restart, a failover, SCRIPT FLUSH) are sent again in a second pipeline, behind a
/// `SCRIPT LOAD` of each script they need: two round trips for the batch, however many
/// calls were refused. A call that a Cluster primary redirects (its slot has moved, or is
/// moving) is sent again on its own (see [`alone`]).
async fn send_calls(handle: &Handle, nodes: Option<&Nodes>, place: Place, batch: Vec<ScriptCall>) {
    let send = async |pipe: &Pipeline| match (&place, nodes) {
        (Place::Primary(primary, _), Some(nodes)) => nodes.send(primary, pipe).await,
        _ => handle.send(pipe).await,
    };
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut scripts = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for call in batch {
        pipe.add_command(call.cmd);
        scripts.push(call.script);
        replies.push(call.reply);
    }
    let values: Vec<Value> = match send(&pipe).await {
        Ok(values) => values,
        // Sent again one by one, through the cluster client (see `nodes::unreachable`).
        Err(e) if nodes.is_some() && nodes::unreachable(&e) => {
            let calls = pipe.cmd_iter().zip(scripts).zip(replies);
            let calls = calls.map(|((cmd, script), reply)| (cmd.clone(), script, reply));
            return alone(handle, calls.collect()).await;
        }
        Err(e) => {
            let e = failed(handle, nodes, e);
            for reply in replies {
                reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let mut again = redis::pipe();
    again.ignore_errors();
    // Which commands of `again` are a `SCRIPT LOAD`, whose replies answer no call.
    let mut loads = Vec::new();
    let mut loaded: Vec<&str> = Vec::new();
    let mut refused = Vec::new();
    let mut redirected = Vec::new();
    let calls = pipe.cmd_iter().zip(&scripts).zip(replies).zip(values);
    for (((cmd, script), reply), value) in calls {
        let outcome = match value {
            Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript) => {
                let hash = script.script.get_hash();
                if !loaded.contains(&hash) {
                    loaded.push(hash);
                    again.cmd("SCRIPT").arg("LOAD").arg(&script.code);
                    loads.push(true);
                }
                again.add_command(cmd.clone());
                loads.push(false);
                refused.push(reply);
                continue;
            }
            value if nodes::is_redirection(&value) => {
                redirected.push((cmd.clone(), script.clone(), reply));
                continue;
            }
            Value::ServerError(e) => Err(handle.failed(e.into())),
            value => Ok(value),
        };
        reply.send(outcome);
    }
    let resent = alone(handle, redirected);
    let reloaded = async {
        if refused.is_empty() {
            return;
        }
        let outcomes: Vec<Result<Value, StoreError>> = match send(&again).await {
            Ok(values) => values
                .into_iter()
                .zip(loads)
                .filter(|(_, load)| !load)
                .map(|(value, _)| match value {
                    Value::ServerError(e) => Err(handle.failed(e.into())),
                    value => Ok(value),
                })
                .collect(),
            Err(e) => {
                let e = failed(handle, nodes, e);
                refused.iter().map(|_| Err(e.clone())).collect()
            }
        };
        for (reply, outcome) in refused.into_iter().zip(outcomes) {
            reply.send(outcome);
        }
    };
    tokio::join!(resent, reloaded);
}

/// A failed send, as the store reports it: on the pooled connection, or to a primary.
fn failed(handle: &Handle, nodes: Option<&Nodes>, e: RedisError) -> StoreError {
    match nodes {
        Some(_) => nodes::failed(e),
        None => handle.failed(e),
    }
}
