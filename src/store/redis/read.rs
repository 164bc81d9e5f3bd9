//! How a lookup reads Redis: on one Redis (or behind Sentinels) and in a Cluster, side
//! by side.
//!
//! # One Redis
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
//!
//! A lone lookup (no other in progress) reads at once; concurrent ones go through the
//! coalescer (`coalesce`), which reads each batch the same way.
//!
//! # Cluster
//! The Get script on the entry's node, then the marker of a live entry, read after it
//! (SPEC §8): the entry and the marker live in different slots.

use std::sync::atomic::{AtomicBool, Ordering};

use bb8_redis::redis::{self, FromRedisValue, Pipeline, Script, ServerErrorKind, Value};
use tokio::time::Instant;
use tracing::warn;

use super::{RedisStore, connection::Handle, scripts::READ_MARKER, settings::LookupMode};
use crate::{
    clock::Micros,
    entry,
    keys::marker_key,
    store::{Judgement, Lookup, StoreError, judge, judge_cached, read_marker},
};

/// A write that a replica, or a primary short of `min-replicas-to-write`, refuses, and
/// that changes nothing anywhere else: the key is never written (entry keys end in 32
/// hex digits), and deleting a missing key is neither replicated nor denied for want
/// of memory. It is in the service's key family, so the documented ACL allows it.
pub(super) const PRIMARY_CHECK: &str = "session_cache:primary-check";

/// What a lookup found: the raw entry (for the removal of a dead one), the store's
/// clock, and the judgement.
pub(super) struct Looked {
    pub raw: Option<Vec<u8>>,
    pub now: Micros,
    pub judgement: Judgement,
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

/// What one lookup came to.
pub(super) type Reading = Result<Looked, StoreError>;

impl Reader {
    /// Looks up `keys` over one connection; one outcome per key, in order. `lone`: a
    /// lookup with no other in progress, not batched.
    pub(super) async fn read(
        &self,
        handle: &mut Handle,
        keys: &[&str],
        lone: bool,
    ) -> Vec<Reading> {
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

    async fn by_script(&self, handle: &mut Handle, keys: &[&str]) -> Vec<Reading> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in keys {
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(1)
                .arg(key)
                .arg(READ_MARKER);
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
                    .arg(READ_MARKER)
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
                let judgement = judge(raw.as_deref(), marker.as_deref(), now, self.margin);
                Looked {
                    raw,
                    now,
                    judgement,
                }
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
    ) -> Result<Vec<Reading>, Failure> {
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
        let mut outcomes: Vec<Reading> = Vec::with_capacity(keys.len());
        // The live entries, whose markers are read next: (index, entry).
        let mut live = Vec::new();
        for value in entries {
            let looked = |raw, judgement| {
                Ok(Looked {
                    raw,
                    now,
                    judgement,
                })
            };
            match value {
                Value::Nil => outcomes.push(looked(None, Judgement::Miss)),
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
                            Judgement::Remove(crate::store::Lookup::Corrupt),
                        )),
                        Ok(cached)
                            if Micros::from_datetime(cached.session.session_expire) < now =>
                        {
                            let judgement = judge_cached(cached, None, now, self.margin);
                            outcomes.push(looked(Some(raw), judgement));
                        }
                        Ok(cached) => {
                            live.push((outcomes.len(), cached));
                            // A placeholder, judged once the marker is in.
                            outcomes.push(looked(Some(raw), Judgement::Miss));
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
                looked.judgement = judge_cached(cached, marker, now, self.margin);
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
    /// The Redis user may not run `MGET`: read again key by key.
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

impl RedisStore {
    /// Looks `key` up in Cluster: the Get script on the entry's node, then the marker
    /// of a live entry (see `judge_in_cluster`).
    pub(super) async fn lookup_in_cluster(
        &self,
        deadline: Instant,
        key: &str,
    ) -> Result<Looked, StoreError> {
        let (raw, _, now): (Option<Vec<u8>>, Option<Vec<u8>>, i64) =
            self.run(deadline, &self.scripts.get.key(key)).await?;
        let now = Micros(now);
        let judgement = match &raw {
            Some(value) => self.judge_in_cluster(deadline, value, now).await?,
            None => Judgement::Miss,
        };
        Ok(Looked {
            raw,
            now,
            judgement,
        })
    }

    /// Judges an entry that a Cluster lookup found, reading its user's marker after it
    /// (SPEC §8: a marker only moves forward, so the later read is the safe one). A
    /// marker that cannot be read fails the lookup: never a hit without the check.
    async fn judge_in_cluster(
        &self,
        deadline: Instant,
        raw: &[u8],
        now: Micros,
    ) -> Result<Judgement, StoreError> {
        let Ok(cached) = entry::decode(raw) else {
            return Ok(Judgement::Remove(Lookup::Corrupt));
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
}
