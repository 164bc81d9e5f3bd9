//! Where sessions live: the [`Store`] trait that the gRPC layer holds, its outcomes, and
//! the rules both stores share.
//!
//! A store answers in the terms of SPEC §3-§4 and knows nothing of gRPC. Every check
//! that must not race (the tombstone and fence of a Set, the never-moving-back marker
//! of an InvalidateUser) happens inside the store in one atomic step: a Lua script in
//! Redis, one lock in memory.

use std::{fmt, future::Future, str::FromStr, time::Duration};

use crate::{
    clock::Micros,
    entry::{self, CachedSession, Session},
    keys::TokenHash,
};

pub mod memory;
pub mod redis;
pub mod traced;

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// The store's clock at a miss, handed to the caller and back in Set. A Set whose fence
/// is at or before the user's invalidation marker validated a session that was revoked
/// meanwhile, and is refused.
///
/// Its text form is opaque to callers; today it is the instant's decimal microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fence(pub Micros);

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.0)
    }
}

/// The text was not a fence that a Get handed out.
#[derive(Debug, PartialEq, Eq)]
pub struct BadFence;

impl FromStr for Fence {
    type Err = BadFence;

    fn from_str(text: &str) -> Result<Self, BadFence> {
        if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadFence);
        }
        text.parse().map(|m| Fence(Micros(m))).map_err(|_| BadFence)
    }
}

/// What a store knows of a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A session that is neither expired nor invalidated.
    Hit(Session),
    /// Nothing stored.
    Miss(Fence),
    /// The stored session had expired; it was removed.
    Expired(Fence),
    /// The user was invalidated after the session was cached; it was removed.
    Invalidated(Fence),
    /// The stored value was not a session; it was removed.
    Corrupt(Fence),
}

/// What became of a Set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Stored with this time to live.
    Stored { ttl_seconds: u32 },
    /// The session had expired by the store's clock.
    Expired,
    /// The user's marker is at or after the fence.
    Stale,
    /// The token has a live logout tombstone.
    Revoked,
    /// The fence is not one a Get could have handed out: later than the store's clock
    /// (beyond the clock-skew margin), or older than a marker lives, so that the
    /// revocations since could no longer be checked. Nothing is stored.
    FenceOutOfRange,
}

/// The store could not answer. Reads treat it as a miss; revocations report it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store did not answer in time")]
    Timeout,
    #[error("the store failed: {0}")]
    Failed(String),
    /// The write happened on the primary but reached fewer replicas than required
    /// (SPEC §8); a failover now could lose it.
    #[error("the write reached {reached} of the {wanted} replicas required")]
    NotReplicated { reached: u32, wanted: u32 },
}

/// The time limits every store call keeps, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time to live of an entry, and of a logout tombstone.
    pub ttl_seconds: u32,
    /// Time to live of a user's invalidation marker.
    pub marker_ttl_seconds: u32,
    /// The margin by which instants that may come from different clocks are compared
    /// against the session (SPEC §8, `--clock-skew-ms`).
    pub clock_skew: Micros,
    /// Time to live of a token the identity provider refused (`--negative-ttl-seconds`).
    pub negative_ttl_seconds: u32,
}

/// SPEC §4 and §8, the one rule both stores (and the Lua scripts) keep: a user's marker
/// revokes a session cached at `cached_at` when it is after `cached_at - margin`.
pub(crate) fn marker_revokes_entry(marker: Micros, cached_at: Micros, margin: Micros) -> bool {
    marker.0 > cached_at.0.saturating_sub(margin.0)
}

/// The same rule for a Set: a validation that began at `fence` is stale when the user's
/// marker is at or after `fence - margin`.
pub(crate) fn marker_revokes_fence(marker: Micros, fence: Fence, margin: Micros) -> bool {
    marker.0 >= fence.0.0.saturating_sub(margin.0)
}

/// Whether `fence` could have come from a Get of this store at `now`: not later than
/// now beyond the clock-skew margin, and not older than a marker lives (the revocations
/// since it could no longer all be checked). Kept by both stores and the Set script.
pub(crate) fn fence_in_range(fence: Fence, now: Micros, limits: &Limits) -> bool {
    let oldest = now
        .0
        .saturating_sub(i64::from(limits.marker_ttl_seconds) * 1_000_000);
    (oldest..=now.0.saturating_add(limits.clock_skew.0)).contains(&fence.0.0)
}

/// A place to cache sessions. Both implementations keep SPEC §3-§5 to the letter; the
/// conformance suite in `tests/` runs against each.
pub trait Store: Send + Sync + 'static {
    /// `"redis"` or `"memory"`, as `HealthResponse.store` reports it.
    fn kind(&self) -> &'static str;

    /// Reads a token's session, removing it when it is expired, invalidated or corrupt.
    fn get(&self, token: &TokenHash) -> impl Future<Output = Result<Lookup, StoreError>> + Send;

    /// Caches a session unless the token is revoked, the fence is stale or the session
    /// has expired; one atomic step.
    fn set(
        &self,
        token: &TokenHash,
        session: &Session,
        fence: Option<Fence>,
    ) -> impl Future<Output = Result<Stored, StoreError>> + Send;

    /// Deletes a token's entry and leaves a tombstone; says whether an entry existed.
    fn invalidate_token(
        &self,
        token: &TokenHash,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Moves the user's marker to now (never back); returns the instant recorded.
    fn invalidate_user(
        &self,
        user_id: &str,
    ) -> impl Future<Output = Result<Micros, StoreError>> + Send;

    /// Whether the identity provider refused this token within the negative TTL
    /// (Validate's negative cache, SPEC §9).
    fn refused(&self, token: &TokenHash) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Records that the identity provider refused this token, for
    /// [`Limits::negative_ttl_seconds`] (nothing when that is 0).
    fn refuse(&self, token: &TokenHash) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records that the identity provider's session whose id hashes to `sid` belongs to
    /// `user_id`, for as long as an entry of that session could be cached (at most
    /// `--ttl-seconds`, cut to `session_expire`), so that a logout naming only the
    /// session can revoke its user (SPEC §12).
    fn remember_session(
        &self,
        sid: &TokenHash,
        user_id: &str,
        session_expire: chrono::DateTime<chrono::Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The user recorded for the session whose id hashes to `sid`, if still recorded.
    fn session_user(
        &self,
        sid: &TokenHash,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Checks that the store answers; returns the round-trip time.
    fn ping(&self) -> impl Future<Output = Result<Duration, StoreError>> + Send;

    /// Periodic housekeeping and metrics, run by the health loop; nothing by default.
    fn upkeep(&self) {}

    /// Why the store must not serve even though it answers (a Redis that may evict
    /// revocations); checked at start-up and each time the store comes back.
    fn readiness_problem(&self) -> impl Future<Output = Option<String>> + Send {
        async { None }
    }
}

/// How a read turns out, before any clean-up.
#[derive(Debug)]
pub(crate) enum Judgement {
    Hit(Session),
    Miss,
    /// The entry must go (expired, invalidated or corrupt); `Lookup` says which.
    Remove(fn(Fence) -> Lookup),
}

/// SPEC §3's rules for a stored value, in Python's order: expiry first, then the
/// user's marker (by [`marker_revokes_entry`] with `margin`). `marker` is the raw marker
/// text; one that does not read as an instant counts as "invalidated" (fail closed).
pub(crate) fn judge(
    raw: Option<&[u8]>,
    marker: Option<&[u8]>,
    now: Micros,
    margin: Micros,
) -> Judgement {
    let Some(raw) = raw else {
        return Judgement::Miss;
    };
    let Ok(cached) = entry::decode(raw) else {
        return Judgement::Remove(Lookup::Corrupt);
    };
    judge_cached(cached, marker.map(read_marker), now, margin)
}

/// [`judge`] for a session already decoded; `marker` is `Some(None)` when unreadable.
pub(crate) fn judge_cached(
    cached: CachedSession,
    marker: Option<Option<Micros>>,
    now: Micros,
    margin: Micros,
) -> Judgement {
    if Micros::from_datetime(cached.session.session_expire) < now {
        return Judgement::Remove(Lookup::Expired);
    }
    match marker {
        Some(Some(at)) if !marker_revokes_entry(at, cached.cached_at, margin) => {}
        None => {}
        Some(_) => return Judgement::Remove(Lookup::Invalidated),
    }
    Judgement::Hit(cached.session)
}

/// A marker's instant; `None` when it does not read as seconds.
pub(crate) fn read_marker(raw: &[u8]) -> Option<Micros> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(Micros::parse_seconds)
}

/// How long a session id's user is kept: as long as an entry of the session could be
/// cached from now, and a second more, since the entry is written after it; `None`
/// when the session has already expired.
pub(crate) fn session_id_ttl(session_expire: Micros, now: Micros, ttl_seconds: u32) -> Option<u32> {
    ttl_for(session_expire, now, ttl_seconds).map(|ttl| ttl.saturating_add(1))
}

/// SPEC §3's time to live: the configured one, cut to the session's remaining whole
/// seconds (at least one); `None` when the session has already expired.
pub(crate) fn ttl_for(session_expire: Micros, now: Micros, ttl_seconds: u32) -> Option<u32> {
    let remaining = session_expire.0.checked_sub(now.0)?;
    if remaining <= 0 {
        return None;
    }
    let whole = (remaining / 1_000_000).max(1);
    Some(u32::try_from(whole).unwrap_or(u32::MAX).min(ttl_seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fences survive their text form, and nothing else passes for one.
    #[test]
    fn fence_text() {
        let fence = Fence(Micros(1_732_780_000_123_456));
        assert_eq!(fence.to_string().parse(), Ok(fence));
        for bad in ["", "-1", "12a", "1.5", "99999999999999999999"] {
            assert_eq!(bad.parse::<Fence>(), Err(BadFence), "{bad:?}");
        }
    }

    /// A fence from the future (beyond the margin), or older than a marker lives, is not
    /// one a Get handed out.
    #[test]
    fn fence_range() {
        let now = Micros(1_800_000_000_000_000);
        let limits = Limits {
            ttl_seconds: 300,
            marker_ttl_seconds: 3600,
            clock_skew: Micros(500_000),
            negative_ttl_seconds: 10,
        };
        let at = |offset: i64| Fence(Micros(now.0 + offset));
        assert!(fence_in_range(at(0), now, &limits));
        assert!(fence_in_range(at(500_000), now, &limits));
        assert!(!fence_in_range(at(500_001), now, &limits));
        assert!(fence_in_range(at(-3_600_000_000), now, &limits));
        assert!(!fence_in_range(at(-3_600_000_001), now, &limits));
        assert!(!fence_in_range(Fence(Micros(0)), now, &limits));
    }

    /// TTL arithmetic of SPEC §3: min(ttl, remaining), at least 1 s, none when expired.
    #[test]
    fn ttl_arithmetic() {
        let now = Micros(1_000_000_000_000_000);
        let later = |us: i64| Micros(now.0 + us);
        assert_eq!(ttl_for(later(3_600_000_000), now, 300), Some(300));
        assert_eq!(ttl_for(later(120_900_000), now, 300), Some(120));
        assert_eq!(ttl_for(later(500_000), now, 300), Some(1));
        assert_eq!(ttl_for(now, now, 300), None);
        assert_eq!(ttl_for(later(-1), now, 300), None);
    }

    /// SPEC §8's margin: without it a marker revokes what it postdates; with it, also
    /// what it predates by less than the margin.
    #[test]
    fn margin_rules() {
        let at = Micros(1_000_000_000);
        let margin = Micros(500_000);
        let none = Micros(0);
        assert!(!marker_revokes_entry(at, at, none));
        assert!(marker_revokes_entry(Micros(at.0 + 1), at, none));
        assert!(marker_revokes_entry(Micros(at.0 - 499_999), at, margin));
        assert!(!marker_revokes_entry(Micros(at.0 - 500_000), at, margin));
        assert!(marker_revokes_fence(at, Fence(at), none));
        assert!(!marker_revokes_fence(Micros(at.0 - 1), Fence(at), none));
        assert!(marker_revokes_fence(
            Micros(at.0 - 500_000),
            Fence(at),
            margin
        ));
        assert!(!marker_revokes_fence(
            Micros(at.0 - 500_001),
            Fence(at),
            margin
        ));
    }
}
