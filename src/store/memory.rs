//! The embedded store: the same rules as Redis, in this process only.
//!
//! It serves a single replica, or a first try without Redis. Its contents are not shared
//! between replicas and vanish on restart, so a revocation reaches only this process.
//!
//! Everything it holds is bounded ([`MemoryBounds`]). Sessions live in a `moka` cache,
//! bounded by count and by weight in bytes: under pressure moka drops sessions.
//! Markers and tombstones are never dropped: past their budget the oldest collapse into
//! a store-wide floor, an instant that refuses everything the collapsed ones refused,
//! and more (SPEC §5). Pressure costs misses, never a revoked session.
//!
//! Every write (Set, the invalidations, the removal of a dead entry) takes one mutex, so
//! that a check and the write it guards are one atomic step, as a Lua script is in Redis.
//! A `std::sync::Mutex` suits: it is never held across an `.await`, and Gets never take it.

use std::{
    collections::{HashMap, VecDeque, hash_map},
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use moka::{Expiry, sync::Cache};
use tracing::warn;

use super::{
    Fence, Judgement, Limits, Lookup, Store, StoreError, Stored, fence_in_range, judge_cached,
    marker_revokes_fence, session_id_ttl, ttl_for,
};
use crate::{
    clock::Micros,
    entry::{CachedSession, Session, User},
    keys::TokenHash,
};

/// How much the embedded store holds: the `--memory-max-*` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBounds {
    /// Most sessions cached.
    pub entries: u64,
    /// Most bytes the cached sessions weigh: their strings plus [`ENTRY_OVERHEAD`] each.
    pub bytes: u64,
    /// Most users' invalidation markers kept one by one; past it the oldest collapse
    /// into the marker floor.
    pub markers: usize,
    /// Most logout tombstones kept one by one; past it the oldest collapse into the
    /// tombstone floor.
    pub tombstones: usize,
}

/// What a cached session takes beyond its strings, in bytes: the key, the entry and its
/// `Arc`, moka's bookkeeping (its hash table, queues and timer) and the allocator's
/// share. Measured: 200,000 sessions of about 50 bytes of strings grew the RSS by
/// 600 to 750 bytes each (the release build with mimalloc over gRPC, and the test build).
pub const ENTRY_OVERHEAD: u32 = 640;

/// Most refused tokens remembered: about 100 bytes each.
pub const MAX_REFUSED: u64 = 100_000;

/// Most identity-provider session ids remembered: about 150 bytes each.
pub const MAX_SESSION_IDS: u64 = 100_000;

/// A cached session, the time to live its Set gave it, and its weight in bytes.
struct Entry {
    cached: CachedSession,
    ttl: Duration,
    weight: u32,
}

/// What an entry holding `session` weighs.
fn weigh(session: &Session) -> u32 {
    let user = &session.user;
    let strings = [&user.id, &user.email, &user.name, &user.tier]
        .iter()
        .map(|s| s.capacity())
        .sum::<usize>();
    u32::try_from(strings)
        .unwrap_or(u32::MAX)
        .saturating_add(ENTRY_OVERHEAD)
}

/// Sessions in this process.
pub struct MemoryStore {
    entries: Cache<TokenHash, Arc<Entry>>,
    /// Tokens the identity provider refused, for the negative TTL; at most
    /// [`MAX_REFUSED`], the least used dropped first (a dropped one costs a provider
    /// call, never a wrong answer).
    refused: Cache<TokenHash, ()>,
    /// The user of each identity-provider session id seen (hashed), with when it may be
    /// forgotten; at most [`MAX_SESSION_IDS`], the least used dropped first (a dropped
    /// one turns a logout that names only its session into a 400, as an unknown one).
    session_ids: Cache<TokenHash, (Arc<str>, Instant)>,
    /// Each invalidated user's marker; Gets read it without the writes lock.
    markers: RwLock<HashMap<Arc<str>, Micros>>,
    /// The newest instant of a collapsed marker (0: none), which judges every user's
    /// sessions as a marker of theirs would. Gets read it after the marker.
    marker_floor: AtomicI64,
    writes: Mutex<Revocations>,
    /// The latest instant handed out: the clock never runs backwards, even when the
    /// system clock does.
    last_now: AtomicI64,
    limits: Limits,
    bounds: MemoryBounds,
}

/// What the writes lock guards: the tombstones and their floor, and the markers and
/// tombstones in the order they were written. That is the order of their instants (the
/// clock never runs back and writes hold the lock) and, each kind having one time to
/// live, the order they expire in: the front of each queue expires first, and past the
/// budget collapses first.
///
/// Not moka, as for entries: it would pick what to drop by use rather than age, and it
/// unlinks an item before its eviction listener runs, so a Get in between would find
/// neither the marker nor a raised floor. Here the floor rises first. The queues also
/// make moka's own expiry redundant, at half its memory per item.
struct Revocations {
    markers: VecDeque<Written<Arc<str>>>,
    tombstones: HashMap<TokenHash, Micros>,
    tombstone_order: VecDeque<Written<TokenHash>>,
    tombstone_floor: Option<TombstoneFloor>,
}

/// A marker or tombstone as written: whose, its instant, and when (for its time to live).
struct Written<K> {
    key: K,
    at: Micros,
    when: Instant,
}

/// Why the oldest marker or tombstone leaves.
#[derive(PartialEq, Eq)]
enum Leaving {
    /// Its time to live is over: it refuses nothing any more.
    Expired,
    /// Past the budget: it collapses into the floor.
    Collapsed,
}

/// The front of `queue` if it must leave: expired, or past `budget`.
fn leaving<K>(
    queue: &mut VecDeque<Written<K>>,
    budget: usize,
    ttl: Duration,
    now: Instant,
) -> Option<(Written<K>, Leaving)> {
    let why = if queue
        .front()
        .is_some_and(|oldest| now.saturating_duration_since(oldest.when) >= ttl)
    {
        Leaving::Expired
    } else if queue.len() > budget {
        Leaving::Collapsed
    } else {
        return None;
    };
    queue.pop_front().map(|oldest| (oldest, why))
}

/// The newest collapsed logout: its instant, and when it was written, for it refuses
/// Sets as long as its tombstone would have.
struct TombstoneFloor {
    at: Micros,
    when: Instant,
}

impl TombstoneFloor {
    /// Whether a Set could be late for one of the collapsed logouts: one without a fence
    /// could, and so could one whose validation began at or before the floor (by the
    /// marker rule, with the clock-skew margin). A fence after the floor means the
    /// identity provider answered after every collapsed logout.
    fn refuses(&self, fence: Option<Fence>, limits: &Limits) -> bool {
        self.when.elapsed() < Duration::from_secs(limits.ttl_seconds.into())
            && fence.is_none_or(|fence| marker_revokes_fence(self.at, fence, limits.clock_skew))
    }
}

/// Gives each entry the time to live its Set computed.
struct EntryTtl;

impl Expiry<TokenHash, Arc<Entry>> for EntryTtl {
    fn expire_after_create(
        &self,
        _: &TokenHash,
        entry: &Arc<Entry>,
        _: Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &TokenHash,
        entry: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

impl MemoryStore {
    /// A store that holds no more than `bounds` says.
    pub fn new(limits: Limits, bounds: MemoryBounds) -> Self {
        // Every entry weighs at least its share of the bytes, so that moka's one weight
        // bound keeps both: at most `bounds.entries` sessions, at most `bounds.bytes`.
        let share = u32::try_from(bounds.bytes.div_ceil(bounds.entries.max(1))).unwrap_or(u32::MAX);
        MemoryStore {
            entries: Cache::builder()
                .max_capacity(bounds.bytes)
                .weigher(move |_, entry: &Arc<Entry>| entry.weight.max(share))
                .expire_after(EntryTtl)
                .build(),
            refused: Cache::builder()
                .max_capacity(MAX_REFUSED)
                .time_to_live(Duration::from_secs(
                    limits.negative_ttl_seconds.max(1).into(),
                ))
                .build(),
            session_ids: Cache::builder()
                .max_capacity(MAX_SESSION_IDS)
                .time_to_live(Duration::from_secs(u64::from(limits.ttl_seconds) + 1))
                .build(),
            markers: RwLock::default(),
            marker_floor: AtomicI64::new(0),
            writes: Mutex::new(Revocations {
                markers: VecDeque::new(),
                tombstones: HashMap::new(),
                tombstone_order: VecDeque::new(),
                tombstone_floor: None,
            }),
            last_now: AtomicI64::new(0),
            limits,
            bounds,
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

    fn lock(&self) -> MutexGuard<'_, Revocations> {
        // A panic elsewhere can at worst leave a marker or tombstone out of its queue:
        // kept for good, and no longer counted.
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instant that judges `user`'s sessions: their marker or the marker floor,
    /// whichever is later. The marker is read first: a collapse raises the floor before
    /// it removes the marker, so a read that misses the marker finds the floor raised.
    fn marker_for(&self, user: &User) -> Option<Micros> {
        let marker = self
            .markers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user.id.as_str())
            .copied();
        let floor = self.marker_floor.load(Ordering::SeqCst);
        marker.max((floor > 0).then_some(Micros(floor)))
    }

    /// Lets the oldest markers go: expired ones, and those past the budget into the
    /// marker floor.
    fn trim_markers(&self, revocations: &mut Revocations) {
        let ttl = Duration::from_secs(self.limits.marker_ttl_seconds.into());
        let now = Instant::now();
        while let Some((oldest, why)) =
            leaving(&mut revocations.markers, self.bounds.markers, ttl, now)
        {
            let mut markers = self.markers.write().unwrap_or_else(|e| e.into_inner());
            // A marker moved on since is not this record's to remove.
            let hash_map::Entry::Occupied(marker) = markers.entry(oldest.key) else {
                continue;
            };
            if *marker.get() != oldest.at {
                continue;
            }
            if why == Leaving::Collapsed
                && self.marker_floor.fetch_max(oldest.at.0, Ordering::SeqCst) == 0
            {
                warn!(
                    max = self.bounds.markers,
                    "more invalidated users than --memory-max-markers: the oldest collapse \
                     into a floor that invalidates every session cached before it"
                );
            }
            marker.remove();
        }
    }

    /// Lets the oldest tombstones go: expired ones, and those past the budget into the
    /// tombstone floor.
    fn trim_tombstones(&self, revocations: &mut Revocations) {
        let ttl = Duration::from_secs(self.limits.ttl_seconds.into());
        let now = Instant::now();
        while let Some((oldest, why)) = leaving(
            &mut revocations.tombstone_order,
            self.bounds.tombstones,
            ttl,
            now,
        ) {
            let hash_map::Entry::Occupied(tombstone) = revocations.tombstones.entry(oldest.key)
            else {
                continue;
            };
            if *tombstone.get() != oldest.at {
                continue;
            }
            tombstone.remove();
            if why == Leaving::Collapsed {
                if revocations.tombstone_floor.is_none() {
                    warn!(
                        max = self.bounds.tombstones,
                        "more logouts than --memory-max-tombstones: the oldest collapse into \
                         a floor that refuses Sets without a fence, or with an older one"
                    );
                }
                // Collapsed in the order written: this one is the newest yet.
                revocations.tombstone_floor = Some(TombstoneFloor {
                    at: oldest.at,
                    when: oldest.when,
                });
            }
        }
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

    /// What the cached sessions weigh against [`MemoryBounds::bytes`] (after pending
    /// evictions ran).
    pub fn weight(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    /// How many markers and tombstones are kept one by one, the rest having expired or
    /// collapsed.
    pub fn revocations(&self) -> (usize, usize) {
        let revocations = self.lock();
        (revocations.markers.len(), revocations.tombstone_order.len())
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn refused(&self, token: &TokenHash) -> Result<bool, StoreError> {
        Ok(self.refused.contains_key(token))
    }

    async fn refuse(&self, token: &TokenHash) -> Result<(), StoreError> {
        if self.limits.negative_ttl_seconds > 0 {
            self.refused.insert(token.clone(), ());
        }
        Ok(())
    }

    async fn get(&self, token: &TokenHash) -> Result<Lookup, StoreError> {
        let now = self.now();
        let fence = Fence(now);
        let Some(entry) = self.entries.get(token) else {
            return Ok(Lookup::Miss(fence));
        };
        let marker = self.marker_for(&entry.cached.session.user);
        match judge_cached(
            entry.cached.clone(),
            marker.map(Some),
            now,
            self.limits.clock_skew,
        ) {
            Judgement::Hit(session) => Ok(Lookup::Hit(session)),
            Judgement::Miss => Ok(Lookup::Miss(fence)),
            Judgement::Remove(outcome) => {
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
        let mut revocations = self.lock();
        let now = self.now();
        if fence.is_some_and(|fence| !fence_in_range(fence, now, &self.limits)) {
            return Ok(Stored::FenceOutOfRange);
        }
        self.trim_tombstones(&mut revocations);
        if revocations.tombstones.contains_key(token)
            || revocations
                .tombstone_floor
                .as_ref()
                .is_some_and(|floor| floor.refuses(fence, &self.limits))
        {
            return Ok(Stored::Revoked);
        }
        if let Some(fence) = fence
            && self
                .marker_for(&session.user)
                .is_some_and(|at| marker_revokes_fence(at, fence, self.limits.clock_skew))
        {
            return Ok(Stored::Stale);
        }
        let expire = Micros::from_datetime(session.session_expire);
        let Some(ttl_seconds) = ttl_for(expire, now, self.limits.ttl_seconds) else {
            return Ok(Stored::Expired);
        };
        // The session is no fresher than the validation that began at the fence.
        let cached_at = fence.map_or(now, |f| f.0.min(now));
        let session = session.clone();
        let entry = Entry {
            weight: weigh(&session),
            cached: CachedSession { session, cached_at },
            ttl: Duration::from_secs(ttl_seconds.into()),
        };
        self.entries.insert(token.clone(), Arc::new(entry));
        Ok(Stored::Stored { ttl_seconds })
    }

    async fn invalidate_token(&self, token: &TokenHash) -> Result<bool, StoreError> {
        let mut revocations = self.lock();
        let at = self.now();
        revocations.tombstones.insert(token.clone(), at);
        revocations.tombstone_order.push_back(Written {
            key: token.clone(),
            at,
            when: Instant::now(),
        });
        self.trim_tombstones(&mut revocations);
        Ok(self.entries.remove(token).is_some())
    }

    async fn invalidate_user(&self, user_id: &str) -> Result<Micros, StoreError> {
        let mut revocations = self.lock();
        let now = self.now();
        let (user, at) = match self
            .markers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(Arc::from(user_id))
        {
            // A marker never moves back.
            hash_map::Entry::Occupied(mut marker) => {
                let at = (*marker.get()).max(now);
                marker.insert(at);
                (marker.key().clone(), at)
            }
            hash_map::Entry::Vacant(marker) => {
                let user = marker.key().clone();
                marker.insert(now);
                (user, now)
            }
        };
        revocations.markers.push_back(Written {
            key: user,
            at,
            when: Instant::now(),
        });
        self.trim_markers(&mut revocations);
        Ok(at)
    }

    async fn remember_session(
        &self,
        sid: &TokenHash,
        user_id: &str,
        session_expire: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StoreError> {
        let expire = Micros::from_datetime(session_expire);
        if let Some(ttl) = session_id_ttl(expire, self.now(), self.limits.ttl_seconds) {
            let until = Instant::now() + Duration::from_secs(ttl.into());
            self.session_ids
                .insert(sid.clone(), (Arc::from(user_id), until));
        }
        Ok(())
    }

    async fn session_user(&self, sid: &TokenHash) -> Result<Option<String>, StoreError> {
        Ok(self
            .session_ids
            .get(sid)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(user, _)| user.to_string()))
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        Ok(Duration::ZERO)
    }

    fn upkeep(&self) {
        // Expired items go as a side effect of traffic; this lets them go when there is
        // none.
        self.entries.run_pending_tasks();
        let mut revocations = self.lock();
        self.trim_markers(&mut revocations);
        self.trim_tombstones(&mut revocations);
    }
}
