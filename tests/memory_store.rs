//! What only the embedded store has to prove: its bounds drop sessions but never
//! revocations (markers and tombstones past their budget collapse into floors that
//! refuse more, never less, even under the race of `tests/revocation.rs`), floods of
//! large sessions, password changes or logouts leave its memory bounded at the default
//! flags, and it reclaims expired items with no caller touching them.

mod support;

use std::{future::Future, process::Command, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use session_cache::{
    Config,
    clock::Micros,
    entry::{Session, User},
    health::StoreStatus,
    keys::TokenHash,
    pb::{self, GetOutcome, SetOutcome, session_cache_server::SessionCache},
    service::SessionCacheService,
    store::{Fence, Limits, Lookup, MemoryStore, Store, StoreError, Stored, memory::MemoryBounds},
};
use support::{in_an_hour, user};
use tonic::Request;

fn service(store: Arc<MemoryStore>) -> SessionCacheService<MemoryStore> {
    SessionCacheService::new(store, true, Arc::new(StoreStatus::new(true)))
}

async fn get(svc: &SessionCacheService<MemoryStore>, token: &str) -> pb::GetResponse {
    svc.get(Request::new(pb::GetRequest {
        token: token.into(),
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn set(
    svc: &SessionCacheService<MemoryStore>,
    token: &str,
    user_id: &str,
    fence: &str,
) -> SetOutcome {
    svc.set(Request::new(pb::SetRequest {
        token: token.into(),
        user: Some(user(user_id)),
        session_expire: Some(in_an_hour()),
        fence: fence.into(),
    }))
    .await
    .unwrap()
    .into_inner()
    .outcome()
}

fn limits(ttl_seconds: u32, marker_ttl_seconds: u32) -> Limits {
    Limits {
        ttl_seconds,
        marker_ttl_seconds,
        clock_skew: Micros(0),
        negative_ttl_seconds: 10,
    }
}

/// Room for `entries` sessions and plenty of everything else.
fn bounds(entries: u64) -> MemoryBounds {
    MemoryBounds {
        entries,
        bytes: 1 << 30,
        markers: 1_000,
        tombstones: 1_000,
    }
}

/// The flags' defaults, as the service runs without any.
fn defaults() -> Config {
    Config::load_from(["session-cache"]).expect("the defaults are valid")
}

/// A session of `user_id`, named `name`, that outlives the test.
fn session(user_id: &str, name: &str) -> Session {
    let at = DateTime::<Utc>::from_timestamp(1_705_314_600, 0).unwrap();
    Session {
        user: User {
            id: user_id.into(),
            email: format!("{user_id}@example.com"),
            name: name.into(),
            email_verified: true,
            tier: "pro".into(),
            created_at: at,
            updated_at: at,
        },
        session_expire: Utc::now() + chrono::Duration::hours(1),
    }
}

fn fence_of(lookup: Lookup) -> Fence {
    match lookup {
        Lookup::Miss(fence)
        | Lookup::Expired(fence)
        | Lookup::Invalidated(fence)
        | Lookup::Corrupt(fence) => fence,
        Lookup::Hit(_) => panic!("a hit carries no fence"),
    }
}

/// The answer of a memory store call, which never waits.
fn answer<T>(call: impl Future<Output = Result<T, StoreError>>) -> T {
    call.now_or_never()
        .expect("the memory store answers at once")
        .expect("the memory store does not fail")
}

/// A Get's fence, taken a moment after every instant the store handed out so far.
fn fresh_fence(store: &MemoryStore, token: &TokenHash) -> Fence {
    std::thread::sleep(Duration::from_millis(2));
    fence_of(answer(store.get(token)))
}

fn stored(outcome: Stored) -> bool {
    matches!(outcome, Stored::Stored { .. })
}

/// A flood of Sets past --memory-max-entries keeps the store near its bound, and the
/// user markers and logout tombstones written before the flood all survive it.
#[tokio::test]
async fn memory_bounds_drop_sessions_never_revocations() {
    let store = Arc::new(MemoryStore::new(limits(300, 3600), bounds(100)));
    let svc = service(store.clone());

    let mut fences = Vec::new();
    for i in 0..20 {
        let miss = get(&svc, &format!("revoked-{i}")).await;
        fences.push(miss.fence);
        svc.invalidate_user(Request::new(pb::InvalidateUserRequest {
            user_id: format!("victim-{i}"),
        }))
        .await
        .unwrap();
        svc.invalidate_token(Request::new(pb::InvalidateTokenRequest {
            token: format!("logged-out-{i}"),
        }))
        .await
        .unwrap();
    }
    for i in 0..5_000 {
        assert_eq!(
            set(&svc, &format!("flood-{i}"), "flooder", "").await,
            SetOutcome::Stored
        );
    }
    let held = store.len();
    assert!(held <= 110, "the bound holds: {held} entries");
    for (i, fence) in fences.iter().enumerate() {
        let stale = set(&svc, &format!("revoked-{i}"), &format!("victim-{i}"), fence).await;
        assert_eq!(stale, SetOutcome::Stale, "marker {i} survived the flood");
        let revoked = set(&svc, &format!("logged-out-{i}"), "someone", "").await;
        assert_eq!(
            revoked,
            SetOutcome::Revoked,
            "tombstone {i} survived the flood"
        );
    }
}

/// Sessions are weighed by what they hold: with room for 1,000 sessions but only 1 MiB,
/// sessions of 60 KB stay within the megabyte while small ones fill the count.
#[test]
fn sessions_are_bounded_by_their_bytes_in_memory() {
    let bounds = MemoryBounds {
        entries: 1_000,
        bytes: 1 << 20,
        markers: 1_000,
        tombstones: 1_000,
    };
    let store = MemoryStore::new(limits(300, 3600), bounds);
    let large = session("large", &"n".repeat(60 * 1024));
    for i in 0..200 {
        let token = TokenHash::of(&format!("large-{i}"));
        assert!(stored(answer(store.set(&token, &large, None))));
    }
    let (held, weight) = (store.len(), store.weight());
    assert!(weight <= 1 << 20, "{weight} bytes held");
    assert!(
        (1..=17).contains(&held),
        "{held} sessions of 60 KB in 1 MiB"
    );

    let store = MemoryStore::new(limits(300, 3600), bounds);
    let small = session("small", "Ada");
    for i in 0..2_000 {
        let token = TokenHash::of(&format!("small-{i}"));
        assert!(stored(answer(store.set(&token, &small, None))));
    }
    let held = store.len();
    assert!((500..=1_000).contains(&held), "{held} small sessions");
}

/// Expired entries are reclaimed by the store's upkeep, with no Get for them.
#[tokio::test]
async fn expired_items_leave_memory_without_callers() {
    let store = Arc::new(MemoryStore::new(limits(1, 1), bounds(1_000)));
    let svc = service(store.clone());
    for i in 0..50 {
        assert_eq!(
            set(&svc, &format!("t-{i}"), "u", "").await,
            SetOutcome::Stored
        );
    }
    assert_eq!(store.len(), 50);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    store.upkeep();
    assert!(store.is_empty(), "{} entries left", store.len());
    assert_eq!(get(&svc, "t-0").await.outcome(), GetOutcome::Miss);
}

/// SPEC §5: a user's marker collapsed into the floor still invalidates the session
/// cached before it and refuses a Set fenced before it; the floor does so for every
/// user, and refuses nothing fenced after it.
#[test]
fn markers_collapsed_in_memory_still_invalidate_and_refuse_stale_sets() {
    let store = MemoryStore::new(
        limits(300, 3600),
        MemoryBounds {
            markers: 2,
            ..bounds(1_000)
        },
    );
    let (alice, bob) = (session("alice", "Alice"), session("bob", "Bob"));
    let (cached, validating) = (TokenHash::of("cached"), TokenHash::of("validating"));
    assert!(stored(answer(store.set(&cached, &alice, None))));
    let fence = fresh_fence(&store, &validating);
    std::thread::sleep(Duration::from_millis(2));
    answer(store.invalidate_user("alice"));
    // Two more users: alice's marker is the oldest of three, past the budget of two.
    answer(store.invalidate_user("x1"));
    answer(store.invalidate_user("x2"));
    assert_eq!(store.revocations().0, 2);

    assert!(matches!(answer(store.get(&cached)), Lookup::Invalidated(_)));
    let late = answer(store.set(&validating, &alice, Some(fence)));
    assert_eq!(late, Stored::Stale);
    // bob was never invalidated: only the floor can refuse his old fence.
    let late = answer(store.set(&validating, &bob, Some(fence)));
    assert_eq!(late, Stored::Stale, "the floor judges every user");

    let after = TokenHash::of("after");
    let fence = fresh_fence(&store, &after);
    assert!(stored(answer(store.set(&after, &alice, Some(fence)))));
    assert!(matches!(answer(store.get(&after)), Lookup::Hit(_)));
}

/// SPEC §4 and §5: a logout whose tombstone collapsed into the floor still refuses the
/// late Set, with the fence of a validation begun before it or with none; the floor
/// refuses such Sets for every token for --ttl-seconds, and nothing fenced after it.
#[test]
fn a_logout_collapsed_in_memory_still_refuses_the_late_set() {
    let store = MemoryStore::new(
        limits(1, 3600),
        MemoryBounds {
            tombstones: 2,
            ..bounds(1_000)
        },
    );
    let alice = session("alice", "Alice");
    let token = TokenHash::of("logged-out");
    let fence = fresh_fence(&store, &token);
    answer(store.invalidate_token(&token));
    answer(store.invalidate_token(&TokenHash::of("o1")));
    answer(store.invalidate_token(&TokenHash::of("o2")));
    assert_eq!(store.revocations().1, 2);

    let late = answer(store.set(&token, &alice, Some(fence)));
    assert_eq!(late, Stored::Revoked);
    let late = answer(store.set(&token, &alice, None));
    assert_eq!(late, Stored::Revoked);
    // Never logged out: only the floor can refuse it.
    let other = TokenHash::of("other");
    let unfenced = answer(store.set(&other, &alice, None));
    assert_eq!(
        unfenced,
        Stored::Revoked,
        "the floor refuses Sets without a fence"
    );
    let fence = fresh_fence(&store, &other);
    assert!(stored(answer(store.set(&other, &alice, Some(fence)))));

    // A tombstone lives --ttl-seconds (1 here); so does the floor.
    std::thread::sleep(Duration::from_millis(1_100));
    let later = TokenHash::of("later");
    assert!(stored(answer(store.set(&later, &alice, None))));
}

/// The process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("a VmRSS line");
    kib * 1024
}

const MIB: u64 = 1 << 20;

/// The variable that tells this test binary, started again by [`alone`], which test to
/// run for real.
const ALONE: &str = "SESSION_CACHE_TEST_ALONE";

/// Runs `flood` in a process of its own (this test binary again, running only `test`),
/// so that no other test's allocations, nor memory an earlier one freed, blur the RSS;
/// asserts that the RSS grew by less than `bound` over it, with what `flood` returns (the
/// store) still held.
fn alone<T>(test: &str, bound: u64, flood: impl FnOnce() -> T) {
    if std::env::var(ALONE).as_deref() == Ok(test) {
        let before = rss();
        let held = flood();
        let after = rss();
        drop(held);
        let growth = after.saturating_sub(before);
        eprintln!(
            "{test}: RSS {} MiB before, {} MiB after: grew by {} MiB (bound {} MiB)",
            before / MIB,
            after / MIB,
            growth / MIB,
            bound / MIB
        );
        assert!(growth < bound, "RSS grew by {} MiB", growth / MIB);
        return;
    }
    let out = Command::new(std::env::current_exe().expect("the test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(ALONE, test)
        .output()
        .expect("the test binary starts");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprint!("{stderr}");
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test}, alone:\n{stdout}\n{stderr}"
    );
}

/// 20,000 Sets of sessions with a 60 KB name (1.2 GB offered) grow the RSS by less
/// than 512 MiB at the default flags: --memory-max-bytes bounds them.
#[test]
fn large_sessions_grow_memory_by_less_than_512_mib() {
    alone(
        "large_sessions_grow_memory_by_less_than_512_mib",
        512 * MIB,
        || {
            let config = defaults();
            let store = MemoryStore::new(config.limits(), config.memory_bounds());
            let large = session("large", &"n".repeat(60 * 1024));
            for i in 0..20_000 {
                let token = TokenHash::of(&format!("large-{i}"));
                assert!(stored(answer(store.set(&token, &large, None))));
            }
            let weight = store.weight();
            eprintln!(
                "{} sessions held, {} MiB by weight",
                store.len(),
                weight / MIB
            );
            assert!(weight <= config.memory_max_bytes);
            store
        },
    );
}

/// A million distinct InvalidateUser, of user ids as long as the service takes (256
/// bytes), grow the RSS by less than 256 MiB at the default flags; at most
/// --memory-max-markers are kept one by one, and the first user's marker, long
/// collapsed, still refuses the Set fenced before it and invalidates the session cached
/// before it.
#[test]
fn a_million_markers_grow_memory_by_less_than_256_mib() {
    alone(
        "a_million_markers_grow_memory_by_less_than_256_mib",
        256 * MIB,
        || {
            let config = defaults();
            let store = MemoryStore::new(config.limits(), config.memory_bounds());
            let (cached, validating) = (TokenHash::of("cached"), TokenHash::of("validating"));
            let victim = session("victim", "Victim");
            answer(store.set(&cached, &victim, None));
            let fence = fresh_fence(&store, &validating);
            std::thread::sleep(Duration::from_millis(2));
            answer(store.invalidate_user("victim"));
            for i in 0..1_000_000 {
                answer(store.invalidate_user(&format!("{i:0256}")));
            }
            store.upkeep();
            let (markers, _) = store.revocations();
            assert!(
                markers <= config.memory_bounds().markers,
                "{markers} markers"
            );
            let late = answer(store.set(&validating, &victim, Some(fence)));
            assert_eq!(late, Stored::Stale);
            assert!(matches!(answer(store.get(&cached)), Lookup::Invalidated(_)));
            store
        },
    );
}

/// A million distinct InvalidateToken grow the RSS by less than 256 MiB at the default
/// flags; at most --memory-max-tombstones are kept one by one, and the first logout,
/// long collapsed, still refuses the late Set.
#[test]
fn a_million_tombstones_grow_memory_by_less_than_256_mib() {
    alone(
        "a_million_tombstones_grow_memory_by_less_than_256_mib",
        256 * MIB,
        || {
            let config = defaults();
            let store = MemoryStore::new(config.limits(), config.memory_bounds());
            let token = TokenHash::of("logged-out");
            let fence = fresh_fence(&store, &token);
            answer(store.invalidate_token(&token));
            // Two threads, to hash the tokens on both cores.
            std::thread::scope(|threads| {
                for half in 0..2 {
                    let store = &store;
                    threads.spawn(move || {
                        for i in (half..1_000_000).step_by(2) {
                            let other = TokenHash::of(&format!("token-{i:012}"));
                            answer(store.invalidate_token(&other));
                        }
                    });
                }
            });
            store.upkeep();
            let (_, tombstones) = store.revocations();
            assert!(
                tombstones <= config.memory_bounds().tombstones,
                "{tombstones} tombstones"
            );
            let victim = session("victim", "Victim");
            assert_eq!(
                answer(store.set(&token, &victim, Some(fence))),
                Stored::Revoked
            );
            assert_eq!(answer(store.set(&token, &victim, None)), Stored::Revoked);
            store
        },
    );
}
