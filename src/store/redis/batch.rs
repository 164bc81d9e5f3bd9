//! Coalesces concurrent Get lookups into Redis pipelines.
//!
//! Sent one by one, each Get's EVALSHA costs its own socket write on the service and
//! its own read and write on Redis, and a wake-up of the connection's driver for each;
//! on 2 cores with 500 calls in flight those system calls and context switches, not
//! the script, were most of what a Redis lookup added over a constant reply. Here the
//! lookups that are ready at the same moment go out as one pipeline: the batcher takes
//! the first, yields once so that every handler already scheduled can add its own, and
//! sends what has gathered. Under load that is dozens per write. A lookup that starts
//! while no other is in progress does not come here at all (see `RedisStore::lookup`):
//! with nothing to coalesce, the batcher's extra hop would only add latency.
//!
//! Callers keep their own deadline: a caller that gave up is skipped if its lookup has
//! not been sent, and ignored when its reply arrives.

use std::sync::Arc;

use bb8::Pool;
use bb8_redis::redis::{self, FromRedisValue, Script, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot};

use super::{checkout, connection::Manager};
use crate::store::StoreError;

/// What the Get script returns: the entry, the marker, and the store's clock.
pub(super) type Reply = (Option<Vec<u8>>, Option<Vec<u8>>, i64);

/// One lookup waiting for its batch.
pub(super) struct Job {
    pub key: String,
    pub reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// Most lookups in one pipeline; more wait for the next.
const MAX_BATCH: usize = 256;

/// Starts the batcher; it ends when the returned sender is dropped. The channel needs no
/// bound of its own: `--max-in-flight` bounds the calls that can be waiting in it.
pub(super) fn spawn(pool: Pool<Manager>, script: Script) -> mpsc::UnboundedSender<Job> {
    let (jobs, queue) = mpsc::unbounded_channel();
    tokio::spawn(gather(queue, pool, Arc::new(script)));
    jobs
}

async fn gather(mut queue: mpsc::UnboundedReceiver<Job>, pool: Pool<Manager>, script: Arc<Script>) {
    while let Some(first) = queue.recv().await {
        // Let the handlers that are already runnable enqueue their lookups too.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        match checkout(&pool).await {
            // Sent from a task of its own, so that gathering goes on while this batch
            // waits for its reply.
            Ok(handle) => {
                tokio::spawn(send(handle, script.clone(), batch));
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn send(mut handle: super::connection::Handle, script: Arc<Script>, batch: Vec<Job>) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for job in &batch {
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(&job.key)
            .arg(super::READ_MARKER);
    }
    let values: Vec<Value> = match pipe.query_async(&mut handle.conn).await {
        Ok(values) => values,
        Err(e) => {
            let e = handle.failed(e);
            for job in batch {
                let _ = job.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    for (job, value) in batch.into_iter().zip(values) {
        let result = match value {
            // Redis lost its script cache (a restart, SCRIPT FLUSH): load it again
            // through the plain path, which retries with the script itself.
            Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript) => script
                .key(&job.key)
                .arg(super::READ_MARKER)
                .invoke_async(&mut handle.conn)
                .await
                .map_err(|e| handle.failed(e)),
            Value::ServerError(e) => {
                handle.refused(e.code());
                Err(StoreError::Failed(format!("the get script failed: {e}")))
            }
            value => Reply::from_redis_value(value)
                .map_err(|e| StoreError::Failed(format!("the get script answered {e}"))),
        };
        let _ = job.reply.send(result);
    }
}
