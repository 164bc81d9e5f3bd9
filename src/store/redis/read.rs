//! How a lookup reads Redis: one read path for one Redis (or behind Sentinels) and for a
//! Cluster.
//!
//! # Commands, in two rounds
//! The store's clock (`TIME`) and the entries first; then the markers of the entries that
//! decode as live, judged here with the rules of `store::judge_cached`. The marker is read
//! after the entry, which is the safe order (SPEC §8: a marker only moves forward).
//! Each round is one pipeline per node:
//! - on one Redis, the only one, with one `MGET` per round (which costs Redis less than a
//!   `GET` per key, BENCHMARKS.md); where the ACL refuses it (`NOPERM`, an ACL written
//!   before lookups used it) the reads go key by key, from that batch on;
//! - in a Cluster, one per primary that serves keys of the round, by the cluster client's
//!   slot map (`slots`), with a `GET` per key (an `MGET` cannot span slots); a key is
//!   judged by the clock of the node that holds its entry.
//!
//! Plain GETs are answered by a replica too, which the scripts' shebang refuses (SPEC §8:
//! lookups go to a writable primary only); so each pipeline ends with [`PRIMARY_CHECK`]
//! (in Cluster, in the slot of the pipeline's first key: `slots::check_key`), a write that
//! a replica refuses (`READONLY`) and a primary short of replicas too (`NOREPLICAS`), and
//! the pipeline's lookups fail when it is refused. It comes after the reads: a node that
//! took it was a primary when it read them, unless it was promoted in between, and then
//! what it read is what it holds as the primary.
//!
//! # The script, on one Redis
//! A lone lookup there (no other in progress) takes `scripts/get.lua` instead: TIME, the
//! entry and its user's marker in one `EVALSHA`, one round trip where the commands take
//! two, at 6-8 us of Redis's CPU. `Mixed` (the default) takes each where it wins; the
//! hidden `--redis-lookup` forces one, to measure them side by side (BENCHMARKS.md). In a
//! Cluster the script cannot read the marker (another slot), so every lookup takes the
//! commands.
//!
//! # Redirections, in a Cluster
//! A Cluster pipeline goes on the store's own connection to the primary (`nodes`), and
//! each key gets its own reply. A key that the slot map placed wrongly (its slot moved,
//! or is moving: MOVED, ASK) is read again alone, each read a command of its own (the Get
//! script, on the entry, then on the marker), which the cluster client routes and
//! redirects by itself, within the caller's deadline; the other keys' replies stand.
//! Never a judgement from a partial read: a lookup is judged from its entry and, when
//! live, a marker read after it, wherever each was read.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bb8_redis::redis::{self, FromRedisValue, Pipeline, Script, ServerErrorKind, Value};
use futures_util::future::join_all;
use tracing::warn;

use super::{
    connection::Handle,
    nodes::{self, Nodes, Place},
    scripts::READ_MARKER,
    settings::LookupMode,
    slots::{self, PRIMARY_CHECK},
};
use crate::{
    clock::Micros,
    entry::{self, CachedSession},
    keys::marker_key,
    store::{Judgement, Lookup, StoreError, judge, judge_cached, read_marker},
};

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
    /// `scripts/get.lua`: the lone lookup on one Redis, and a redirected read in Cluster.
    pub script: Script,
    /// The clock-skew margin of `judge` (SPEC §8).
    pub margin: Micros,
    /// Whether lookups on one Redis read with `MGET` (one command a round, which costs
    /// Redis less than a `GET` per key); turned off for good when the ACL refuses it.
    pub mget: AtomicBool,
    /// In a Cluster, the primaries, to which each round goes as a pipeline each.
    pub cluster: Option<Arc<Nodes>>,
}

/// What one lookup came to.
pub(super) type Reading = Result<Looked, StoreError>;

/// What a round read for one key.
enum Got {
    /// Its value, and the clock of the node that read it (the entries' round only).
    Value(Value, Micros),
    /// Its pipeline was redirected (see the module's documentation): read it alone.
    Redirected,
    Failed(StoreError),
}

/// An entry read, before its marker.
enum Found {
    /// Judged without the marker: corrupt, or expired.
    Judged(Judgement),
    /// Live: the marker decides.
    Live(CachedSession),
}

impl Reader {
    /// Looks up `keys` over one connection; one outcome per key, in order. `lone`: a
    /// lookup with no other in progress, not batched.
    pub(super) async fn read(&self, handle: &Handle, keys: &[&str], lone: bool) -> Vec<Reading> {
        let script = match self.mode {
            LookupMode::Script => true,
            LookupMode::Mixed => lone,
            LookupMode::Commands => false,
        };
        if script && self.cluster.is_none() {
            return self.by_script(handle, keys).await;
        }
        let mut mget = self.cluster.is_none() && self.mget.load(Ordering::Relaxed);
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
                Err(Failure::Redirected) => {
                    let e = StoreError::Failed("a lookup was redirected".into());
                    return keys.iter().map(|_| Err(e.clone())).collect();
                }
                Err(Failure::Store(e)) => {
                    return keys.iter().map(|_| Err(e.clone())).collect();
                }
            }
        }
    }

    async fn by_script(&self, handle: &Handle, keys: &[&str]) -> Vec<Reading> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in keys {
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(1)
                .arg(key)
                .arg(READ_MARKER);
        }
        let values = match handle.send(&pipe).await {
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
                Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript) => {
                    let mut conn = handle.conn.clone();
                    self.script
                        .key(*key)
                        .arg(READ_MARKER)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| handle.failed(e))
                }
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

    /// The two rounds of commands (see the module's documentation). `mget`: each round
    /// reads its keys with one `MGET`, else a `GET` per key.
    async fn by_commands(
        &self,
        handle: &Handle,
        keys: &[&str],
        mget: bool,
    ) -> Result<Vec<Reading>, Failure> {
        let entries = self.round(handle, keys, true, mget).await?;
        let mut outcomes: Vec<Reading> = Vec::with_capacity(keys.len());
        // The live entries, whose markers are read next: (index, entry).
        let mut live = Vec::new();
        // The lookups read again alone (a redirected pipeline).
        let mut alone = Vec::new();
        for (index, got) in entries.into_iter().enumerate() {
            let (value, now) = match got {
                Got::Value(value, now) => (value, now),
                Got::Redirected => {
                    alone.push(index);
                    outcomes.push(Err(StoreError::Failed("read alone".into())));
                    continue;
                }
                Got::Failed(e) => {
                    outcomes.push(Err(e));
                    continue;
                }
            };
            let raw = match entry_value(value) {
                Ok(Some(raw)) => raw,
                Ok(None) => {
                    outcomes.push(Ok(Looked {
                        raw: None,
                        now,
                        judgement: Judgement::Miss,
                    }));
                    continue;
                }
                Err(e) => {
                    outcomes.push(Err(e));
                    continue;
                }
            };
            let judgement = match self.found(&raw, now) {
                Found::Judged(judgement) => judgement,
                Found::Live(cached) => {
                    live.push((index, cached));
                    // A placeholder, judged once the marker is in.
                    Judgement::Miss
                }
            };
            outcomes.push(Ok(Looked {
                raw: Some(raw),
                now,
                judgement,
            }));
        }
        if !live.is_empty() {
            let marker_keys: Vec<String> = live
                .iter()
                .map(|(_, cached)| marker_key(&cached.session.user.id))
                .collect();
            let refs: Vec<&str> = marker_keys.iter().map(String::as_str).collect();
            let markers = match self.round(handle, &refs, false, mget).await {
                Ok(markers) => markers,
                Err(Failure::MgetDenied) => return Err(Failure::MgetDenied),
                Err(Failure::Redirected) => refs.iter().map(|_| Got::Redirected).collect(),
                // Never a hit without the marker's check.
                Err(Failure::Store(e)) => refs.iter().map(|_| Got::Failed(e.clone())).collect(),
            };
            let mut again = Vec::new();
            for ((index, cached), (got, key)) in live.into_iter().zip(markers.into_iter().zip(refs))
            {
                let marker = match got {
                    Got::Value(value, _) => marker_value(value),
                    Got::Redirected => {
                        again.push((index, cached, key));
                        continue;
                    }
                    Got::Failed(e) => Err(e),
                };
                self.judge_marker(&mut outcomes[index], cached, marker);
            }
            let read = join_all(again.iter().map(|(_, _, key)| self.alone(handle, key))).await;
            for ((index, cached, _), marker) in again.into_iter().zip(read) {
                let marker = marker.map(|(raw, _)| raw.map(|raw| read_marker(&raw)));
                self.judge_marker(&mut outcomes[index], cached, marker);
            }
        }
        if !alone.is_empty() {
            let read = join_all(
                alone
                    .iter()
                    .map(|&index| self.lookup_alone(handle, keys[index])),
            )
            .await;
            for (index, reading) in alone.into_iter().zip(read) {
                outcomes[index] = reading;
            }
        }
        Ok(outcomes)
    }

    /// Judges a live entry by its marker's read (`None` when there is no marker,
    /// `Some(None)` when it does not read as an instant); a failed read fails the lookup.
    fn judge_marker(
        &self,
        outcome: &mut Reading,
        cached: CachedSession,
        marker: Result<Option<Option<Micros>>, StoreError>,
    ) {
        match (marker, &mut *outcome) {
            (Ok(marker), Ok(looked)) => {
                looked.judgement = judge_cached(cached, marker, looked.now, self.margin);
            }
            (Err(e), _) => *outcome = Err(e),
            (Ok(_), Err(_)) => {}
        }
    }

    /// An entry's judgement where the marker cannot change it, else the live session.
    fn found(&self, raw: &[u8], now: Micros) -> Found {
        match entry::decode(raw) {
            Err(_) => Found::Judged(Judgement::Remove(Lookup::Corrupt)),
            Ok(cached) if Micros::from_datetime(cached.session.session_expire) < now => {
                Found::Judged(judge_cached(cached, None, now, self.margin))
            }
            Ok(cached) => Found::Live(cached),
        }
    }

    /// One round: `keys` read in one pipeline per node, after `TIME` when `clock`; what
    /// each key got, in order.
    async fn round(
        &self,
        handle: &Handle,
        keys: &[&str],
        clock: bool,
        mget: bool,
    ) -> Result<Vec<Got>, Failure> {
        let Some(nodes) = &self.cluster else {
            let (now, values) = self.part(handle, Place::Pooled, keys, clock, mget).await?;
            return Ok(values.into_iter().map(|v| Got::Value(v, now)).collect());
        };
        let groups = nodes.split(keys.iter().map(|key| slots::slot(key.as_bytes())));
        let sent = join_all(groups.iter().map(|group| async move {
            // A slot the map names no primary for: the cluster client finds it, or fails.
            let Some(primary) = &group.primary else {
                return Err(Failure::Redirected);
            };
            let keys: Vec<&str> = group.members.iter().map(|&i| keys[i]).collect();
            let place = Place::Primary(primary.clone(), group.slot);
            self.part(handle, place, &keys, clock, mget).await
        }))
        .await;
        let mut got: Vec<Option<Got>> = keys.iter().map(|_| None).collect();
        for (group, sent) in groups.into_iter().zip(sent) {
            match sent {
                Ok((now, values)) => {
                    for (index, value) in group.members.into_iter().zip(values) {
                        got[index] = Some(match nodes::is_redirection(&value) {
                            true => Got::Redirected,
                            false => Got::Value(value, now),
                        });
                    }
                }
                Err(Failure::MgetDenied) => return Err(Failure::MgetDenied),
                Err(Failure::Redirected) => {
                    for index in group.members {
                        got[index] = Some(Got::Redirected);
                    }
                }
                Err(Failure::Store(e)) => {
                    for index in group.members {
                        got[index] = Some(Got::Failed(e.clone()));
                    }
                }
            }
        }
        Ok(got
            .into_iter()
            .map(|got| {
                got.unwrap_or_else(|| {
                    Got::Failed(StoreError::Failed("a read had no answer".into()))
                })
            })
            .collect())
    }

    /// Reads `keys` on one node: `TIME` when `clock` (else the clock is 0), the reads,
    /// and [`PRIMARY_CHECK`] behind them; one value per key, or the check's refusal.
    async fn part(
        &self,
        handle: &Handle,
        place: Place,
        keys: &[&str],
        clock: bool,
        mget: bool,
    ) -> Result<(Micros, Vec<Value>), Failure> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if clock {
            pipe.cmd("TIME");
        }
        read_keys(&mut pipe, keys.iter().copied(), mget);
        let sent = match (&place, &self.cluster) {
            (Place::Primary(primary, slot), Some(nodes)) => {
                pipe.cmd("DEL").arg(slots::check_key(*slot));
                match nodes.send(primary, &pipe).await {
                    Ok(values) => Ok(values),
                    // Read alone, through the cluster client (see `nodes::unreachable`).
                    Err(e) if nodes::unreachable(&e) => return Err(Failure::Redirected),
                    Err(e) => Err(nodes::failed(e)),
                }
            }
            _ => {
                pipe.cmd("DEL").arg(PRIMARY_CHECK);
                handle.send(&pipe).await.map_err(|e| handle.failed(e))
            }
        };
        let mut values = sent?;
        match values.pop() {
            // The check's slot has moved: read this part's lookups alone.
            Some(check) if nodes::is_redirection(&check) => return Err(Failure::Redirected),
            Some(Value::ServerError(e)) => {
                handle.refused(e.code());
                return Err(StoreError::Failed(format!("Redis refused the lookup: {e}")).into());
            }
            Some(_) => {}
            None => return Err(StoreError::Failed("the lookup was not answered".into()).into()),
        }
        let mut values = values.into_iter();
        let now = if clock {
            values
                .next()
                .ok_or_else(|| StoreError::Failed("TIME was not answered".into()))
                .and_then(|time| match time {
                    Value::ServerError(e) => Err(StoreError::Failed(format!("TIME failed: {e}"))),
                    time => <(i64, i64)>::from_redis_value(time)
                        .map(|(seconds, micros)| Micros(seconds * 1_000_000 + micros))
                        .map_err(|e| StoreError::Failed(format!("TIME answered {e}"))),
                })?
        } else {
            Micros(0)
        };
        Ok((now, replies(values, keys.len(), mget)?))
    }

    /// A whole lookup read alone (its pipeline was redirected): the entry, then the
    /// marker of a live one, each a command of its own.
    async fn lookup_alone(&self, handle: &Handle, key: &str) -> Reading {
        let (raw, now) = self.alone(handle, key).await?;
        let Some(raw) = raw else {
            return Ok(Looked {
                raw: None,
                now,
                judgement: Judgement::Miss,
            });
        };
        let judgement = match self.found(&raw, now) {
            Found::Judged(judgement) => judgement,
            Found::Live(cached) => {
                let (marker, _) = self
                    .alone(handle, &marker_key(&cached.session.user.id))
                    .await?;
                judge_cached(
                    cached,
                    marker.map(|raw| read_marker(&raw)),
                    now,
                    self.margin,
                )
            }
        };
        Ok(Looked {
            raw: Some(raw),
            now,
            judgement,
        })
    }

    /// One key read by the Get script (without the marker): its value and the clock of
    /// the node that holds it. One command, which the cluster client routes by the key
    /// and redirects by itself; the script's shebang is its primary check.
    async fn alone(
        &self,
        handle: &Handle,
        key: &str,
    ) -> Result<(Option<Vec<u8>>, Micros), StoreError> {
        let mut conn = handle.conn.clone();
        let (value, _, now): (Option<Vec<u8>>, Option<Vec<u8>>, i64) = self
            .script
            .key(key)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| handle.failed(e))?;
        Ok((value, Micros(now)))
    }
}

/// Why a round gave no values.
enum Failure {
    /// The Redis user may not run `MGET`: read again key by key.
    MgetDenied,
    /// A Cluster pipeline's primary check was redirected, its primary could not be
    /// reached, or no primary is known for its slot: read its lookups one by one.
    Redirected,
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

/// An entry's reply: its bytes, or `None` when there is none.
fn entry_value(value: Value) -> Result<Option<Vec<u8>>, StoreError> {
    match value {
        Value::Nil => Ok(None),
        Value::ServerError(e) => Err(StoreError::Failed(format!("GET failed: {e}"))),
        value => Vec::<u8>::from_redis_value(value)
            .map(Some)
            .map_err(|e| StoreError::Failed(format!("GET answered {e}"))),
    }
}

/// A marker's reply: `None` when there is none, `Some(None)` when it is not an instant's
/// text (which counts as a revocation).
fn marker_value(value: Value) -> Result<Option<Option<Micros>>, StoreError> {
    match value {
        Value::Nil => Ok(None),
        Value::ServerError(e) => Err(StoreError::Failed(format!("GET failed: {e}"))),
        marker => Ok(Some(
            Vec::<u8>::from_redis_value(marker)
                .ok()
                .and_then(|raw| read_marker(&raw)),
        )),
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
