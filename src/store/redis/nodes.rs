//! The store's own connection to each primary of a Cluster, for the pipelines of a batch
//! (`read`, `coalesce`): one pipelined connection per primary, beside the cluster
//! client's.
//!
//! Why not the cluster client's: it sends a pipeline whose replies hold a redirection
//! again whole, to the node the first one names, asks for a new slot map each time, and
//! answers an error once its retries are spent. While slots move, a pipeline of keys of
//! several slots meets a redirection on every node it is sent to, and its lookups went
//! back and forth until they timed out. Sent on a connection to the primary itself, a
//! pipeline comes back with each key's own reply: a MOVED or ASK answers for that key
//! alone, which is then sent through the cluster client command by command (it follows
//! each), and the other keys' replies stand. A batch also skips the client's routing task
//! (a channel hop and a wake-up per pipeline).
//!
//! A connection is dialled on first use with the cluster client's settings (credentials,
//! TLS, the store timeout as its response timeout, TCP_NODELAY), and forgotten when it
//! fails, for the next batch to dial again; the slot map is the client's (`slots`).

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bb8_redis::redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisConnectionInfo, RedisError, RedisResult, ServerErrorKind, TlsCertificates, Value,
    aio::MultiplexedConnection, cluster::NodeAddress, io::tcp::TcpSettings,
};
use tracing::warn;

use super::{
    settings::CONNECT_TIMEOUT,
    slots::{Group, SlotMap},
};
use crate::store::StoreError;

/// Where a pipeline of a batch goes.
pub(super) enum Place {
    /// The pooled connection: one Redis, or the primary the Sentinels name.
    Pooled,
    /// A Cluster primary, on the store's own connection to it; the slot is the one its
    /// primary check goes to (`slots::check_key`).
    Primary(NodeAddress, u16),
}

/// How to dial a Cluster node.
pub(super) struct Dial {
    /// The credentials.
    pub redis: RedisConnectionInfo,
    /// `Some` for TLS, with the CA to trust besides the system's roots, if any.
    pub tls: Option<Option<TlsCertificates>>,
    pub config: AsyncConnectionConfig,
}

/// The connections to the primaries, and the slot map that says which serves a key.
pub(crate) struct Nodes {
    slots: SlotMap,
    dial: Dial,
    /// Each open connection, with the number it was dialled under (see [`Nodes::forget`]).
    open: Mutex<HashMap<NodeAddress, (u64, MultiplexedConnection)>>,
    dialled: AtomicU64,
}

impl Nodes {
    pub(super) fn new(slots: SlotMap, dial: Dial) -> Self {
        Nodes {
            slots,
            dial,
            open: Mutex::default(),
            dialled: AtomicU64::new(0),
        }
    }

    /// Splits a batch by the primary that serves each slot (see `SlotMap::split`).
    pub(super) fn split(&self, slots: impl Iterator<Item = u16>) -> Vec<Group> {
        self.slots.split(slots)
    }

    /// Sends `pipe` (which ignores errors) to `primary`: every command's reply, a refusal
    /// as a `Value::ServerError`.
    pub(super) async fn send(
        &self,
        primary: &NodeAddress,
        pipe: &Pipeline,
    ) -> RedisResult<Vec<Value>> {
        let (number, mut conn) = self.connection(primary).await?;
        let sent = pipe.query_async(&mut conn).await;
        if let Err(e) = &sent
            && (e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error())
        {
            self.forget(primary, number, e);
        }
        sent
    }

    /// The open connection to `primary`, else a new one.
    async fn connection(&self, primary: &NodeAddress) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(open) = self.lock().get(primary) {
            return Ok(open.clone());
        }
        let address = match &self.dial.tls {
            Some(_) => ConnectionAddr::TcpTls {
                host: primary.host().to_owned(),
                port: primary.port(),
                insecure: false,
                tls_params: None,
            },
            None => ConnectionAddr::Tcp(primary.host().to_owned(), primary.port()),
        };
        let info = address
            .into_connection_info()?
            .set_redis_settings(self.dial.redis.clone())
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let client = match &self.dial.tls {
            Some(Some(certificates)) => Client::build_with_tls(info, certificates.clone())?,
            _ => Client::open(info)?,
        };
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            client.get_multiplexed_async_connection_with_config(&self.dial.config),
        )
        .await
        .map_err(|_| {
            RedisError::from((ErrorKind::Io, "a Cluster primary did not answer in time"))
        })??;
        let number = self.dialled.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(primary.clone(), (number, conn.clone()));
        Ok((number, conn))
    }

    /// Drops the connection dialled as `number` to `primary`, unless it has been
    /// replaced already.
    fn forget(&self, primary: &NodeAddress, number: u64, e: &RedisError) {
        let mut open = self.lock();
        if open.get(primary).is_some_and(|(n, _)| *n == number) {
            open.remove(primary);
            warn!(primary = %primary, error = %e, "connection to a Cluster primary lost; it will be dialled again");
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<NodeAddress, (u64, MultiplexedConnection)>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a reply sends its key elsewhere: the slot has moved (MOVED) or is moving and
/// the key is gone from here (ASK). The cluster client follows either for a command sent
/// on its own.
pub(super) fn is_redirection(value: &Value) -> bool {
    matches!(value, Value::ServerError(e)
        if matches!(e.kind(), Some(ServerErrorKind::Moved | ServerErrorKind::Ask)))
}

/// Whether a send failed for want of the connection (refused, dropped, broken), not of
/// time: the primary may be gone (a failover), and the cluster client, which learns of it
/// when a command of its own fails, finds the new one.
pub(super) fn unreachable(e: &RedisError) -> bool {
    !e.is_timeout()
        && (e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error())
}

/// A failed send to a primary, as the store reports it.
pub(super) fn failed(e: RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else {
        StoreError::Failed(e.to_string())
    }
}
