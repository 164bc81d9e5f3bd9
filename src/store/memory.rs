//! The embedded store: the same rules as Redis, in this process only.
//!
//! It serves a single replica, or a first try without Redis. Its contents are not shared
//! between replicas and vanish on restart, so a revocation reaches only this process.
//!
//! Entries, markers and tombstones live in three `moka` caches. Only entries count
//! against `max_entries`: under pressure moka drops cache entries, never the markers and
//! tombstones that keep revoked sessions dead. Every write (Set, the invalidations, the
//! removal of a dead entry) takes one mutex, so that a check and the write it guards are
//! one atomic step, as a Lua script is in Redis. A `std::sync::Mutex` suits: it is never
//! held across an `.await`, and Gets never take it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use moka::{Expiry, sync::Cache};

use super::{
    Fence, Limits, Lookup, Store, StoreError, Stored, Verdict, fence_in_range, judge_cached,
    marker_revokes_fence, ttl_for,
};
use crate::{
    clock::Micros,
    entry::{CachedSession, Session},
    keys::TokenHash,
};

/// A cached session and the time to live its Set gave it.
struct Entry {
    cached: CachedSession,
    ttl: Duration,
}

/// Sessions in this process.
pub struct MemoryStore {
    entries: Cache<TokenHash, Arc<Entry>>,
    markers: Cache<String, Micros>,
    tombstones: Cache<TokenHash, ()>,
    writes: Mutex<()>,
    /// The latest instant handed out: the clock never runs backwards, even when the
    /// system clock does.
    last_now: AtomicI64,
    limits: Limits,
}

/// Gives each entry the time to live its Set computed.
struct EntryTtl;

impl Expiry<TokenHash, Arc<Entry>> for EntryTtl {
    fn expire_after_create(
        &self,
        _: &TokenHash,
        entry: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &TokenHash,
        entry: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

impl MemoryStore {
    /// A store that holds at most `max_entries` sessions.
    pub fn new(limits: Limits, max_entries: u64) -> Self {
        MemoryStore {
            entries: Cache::builder()
                .max_capacity(max_entries)
                .expire_after(EntryTtl)
                .build(),
            markers: Cache::builder()
                .time_to_live(Duration::from_secs(limits.marker_ttl_seconds.into()))
                .build(),
            tombstones: Cache::builder()
                .time_to_live(Duration::from_secs(limits.ttl_seconds.into()))
                .build(),
            writes: Mutex::new(()),
            last_now: AtomicI64::new(0),
            limits,
        }
    }

    /// The store's clock: the system clock, never moving back.
    fn now(&self) -> Micros {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let previous = self.last_now.fetch_max(wall, Ordering::SeqCst);
        Micros(previous.max(wall))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is in the caches; a panic elsewhere cannot leave it torn.
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many sessions are cached (after pending evictions ran).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Whether no session is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, token: &TokenHash) -> Result<Lookup, StoreError> {
        let now = self.now();
        let fence = Fence(now);
        let Some(entry) = self.entries.get(token) else {
            return Ok(Lookup::Miss(fence));
        };
        let marker = self.markers.get(&entry.cached.session.user.id);
        match judge_cached(
            entry.cached.clone(),
            marker.map(Some),
            now,
            self.limits.clock_skew,
        ) {
            Verdict::Hit(session) => Ok(Lookup::Hit(session)),
            Verdict::Miss => Ok(Lookup::Miss(fence)),
            Verdict::Remove(outcome) => {
                let _writes = self.lock();
                // Only the entry judged, never one a concurrent Set wrote meanwhile.
                if self
                    .entries
                    .get(token)
                    .is_some_and(|current| Arc::ptr_eq(&current, &entry))
                {
                    self.entries.invalidate(token);
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
        let _writes = self.lock();
        let now = self.now();
        if fence.is_some_and(|fence| !fence_in_range(fence, now, &self.limits)) {
            return Ok(Stored::FenceOutOfRange);
        }
        if self.tombstones.contains_key(token) {
            return Ok(Stored::Revoked);
        }
        if let Some(fence) = fence {
            if self
                .markers
                .get(&session.user.id)
                .is_some_and(|at| marker_revokes_fence(at, fence, self.limits.clock_skew))
            {
                return Ok(Stored::Stale);
            }
        }
        let expire = Micros::from_datetime(session.session_expire);
        let Some(ttl_seconds) = ttl_for(expire, now, self.limits.ttl_seconds) else {
            return Ok(Stored::Expired);
        };
        // The session is no fresher than the validation that began at the fence.
        let cached_at = fence.map_or(now, |f| f.0.min(now));
        let entry = Entry {
            cached: CachedSession {
                session: session.clone(),
                cached_at,
            },
            ttl: Duration::from_secs(ttl_seconds.into()),
        };
        self.entries.insert(token.clone(), Arc::new(entry));
        Ok(Stored::Stored { ttl_seconds })
    }

    async fn invalidate_token(&self, token: &TokenHash) -> Result<bool, StoreError> {
        let _writes = self.lock();
        self.tombstones.insert(token.clone(), ());
        Ok(self.entries.remove(token).is_some())
    }

    async fn invalidate_user(&self, user_id: &str) -> Result<Micros, StoreError> {
        let _writes = self.lock();
        let now = self.now();
        let at = self
            .markers
            .get(user_id)
            .map_or(now, |current| current.max(now));
        self.markers.insert(user_id.to_owned(), at);
        Ok(at)
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        Ok(Duration::ZERO)
    }

    fn upkeep(&self) {
        // moka reclaims expired items as a side effect of traffic; this reclaims them
        // when there is none.
        self.entries.run_pending_tasks();
        self.markers.run_pending_tasks();
        self.tombstones.run_pending_tasks();
    }
}
