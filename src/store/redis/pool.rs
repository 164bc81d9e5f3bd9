//! The pools of connections: bb8 decides which connections exist, dials them and
//! replaces broken ones, and a call checks one out only to clone its pipelined handle
//! (see the module's documentation in `mod.rs`).

use std::time::Duration;

use bb8::{Pool, RunError};
use bb8_redis::redis::RedisError;

use super::connection::{DialErrors, Handle, Manager};
use crate::store::StoreError;

/// Connections held by revocations that wait for replicas. `WAIT` blocks the
/// connection it is sent on, so each such revocation holds one connection of this pool
/// to itself, apart from the pipelined connections that lookups share: a lookup never
/// queues behind a `WAIT`.
pub(super) const DURABLE_CONNECTIONS: u32 = 8;

/// A pool's settings, shared by both pools.
pub(super) fn pool(
    size: u32,
    timeout: Duration,
    dial_errors: &DialErrors,
) -> bb8::Builder<Manager> {
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

pub(super) fn pool_error(e: RunError<RedisError>) -> StoreError {
    match e {
        RunError::User(e) => StoreError::Failed(e.to_string()),
        RunError::TimedOut => StoreError::Timeout,
    }
}

/// A handle on a pipelined connection; the pool slot is given back at once.
pub(super) async fn checkout(pool: &Pool<Manager>) -> Result<Handle, StoreError> {
    let pooled = pool.get().await.map_err(pool_error)?;
    Ok(Handle::of(&pooled))
}
