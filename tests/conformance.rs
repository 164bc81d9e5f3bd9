//! The contract of SPEC §3-§5, written once and run against each store, both through
//! the real server on port 0 and by calling the handlers directly with no network.
//!
//! Every case is a function of the store and the path; the macro at the bottom runs
//! each against Redis and the embedded memory store, by each path (the transport's own
//! limits only through the network), and through the network against a Redis Sentinel
//! topology (a primary, a replica, three Sentinels) and a Redis Cluster (three primaries,
//! each with a replica).

mod support;

use std::time::Duration;

use session_cache::pb::{self, GetOutcome, SetOutcome};
use support::{
    Backend, in_an_hour, in_millis,
    subject::{Path, Subject},
    user,
};
use tonic::Code;

/// Miss, Set with the fence, hit: the caller flow of SPEC §1, and the hit carries
/// exactly what was stored.
async fn miss_set_hit(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    let miss = h.get("tok-1").await;
    assert_eq!(miss.outcome(), GetOutcome::Miss);
    assert!(!miss.fence.is_empty(), "a miss carries a fence");
    assert!(miss.user.is_none());

    let expire = in_an_hour();
    let set = h.set("tok-1", user("u1"), expire, &miss.fence).await;
    assert_eq!(set.outcome(), SetOutcome::Stored);
    assert_eq!(set.ttl_seconds, 300);

    let hit = h.get("tok-1").await;
    assert_eq!(hit.outcome(), GetOutcome::Hit);
    assert_eq!(hit.user, Some(user("u1")));
    let got = hit.session_expire.unwrap();
    assert_eq!(got.seconds, expire.seconds);
    // Stored to the microsecond, as Python's isoformat() keeps it.
    assert_eq!(got.nanos / 1000, expire.nanos / 1000);
    assert!(hit.fence.is_empty(), "a hit carries no fence");
}

/// TTL = min(ttl_seconds, remaining whole seconds), at least 1 (SPEC §3).
async fn ttl_arithmetic(backend: Backend, path: Path) {
    let mut h = Subject::start(
        backend,
        path,
        &["--ttl-seconds", "60", "--marker-ttl-seconds", "60"],
    )
    .await;
    let cases = [(3_600_000, 60), (30_900, 30), (500, 1)];
    for (i, (millis, want)) in cases.into_iter().enumerate() {
        let token = format!("ttl-{i}");
        let set = h.set(&token, user("u"), in_millis(millis), "").await;
        assert_eq!(set.outcome(), SetOutcome::Stored, "{millis} ms");
        assert!(
            set.ttl_seconds == want || (want > 1 && set.ttl_seconds == want - 1),
            "{millis} ms: ttl {} wanted {want}",
            set.ttl_seconds
        );
    }
}

/// A session that has already expired is not stored (SPEC §3, NEW).
async fn expired_session_is_not_stored(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    let set = h.set("tok", user("u1"), in_millis(-1000), "").await;
    assert_eq!(set.outcome(), SetOutcome::Expired);
    assert_eq!(set.ttl_seconds, 0);
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Miss);
}

/// An entry whose session expired answers EXPIRED once, with a fence, and is removed.
async fn expired_entry(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    // Stored for 1 s (the minimum), but the session ends after 300 ms.
    let set = h.set("tok", user("u1"), in_millis(300), "").await;
    assert_eq!(set.outcome(), SetOutcome::Stored);
    assert_eq!(set.ttl_seconds, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expired = h.get("tok").await;
    assert_eq!(expired.outcome(), GetOutcome::Expired);
    assert!(!expired.fence.is_empty());
    assert!(
        expired.user.is_none(),
        "nothing of an expired session is served"
    );
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Miss);
}

/// InvalidateUser hides every cached session of the user, and only theirs.
async fn invalidate_user_hides_sessions(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    for token in ["a1", "a2"] {
        assert_eq!(
            h.set(token, user("alice"), in_an_hour(), "")
                .await
                .outcome(),
            SetOutcome::Stored
        );
    }
    assert_eq!(
        h.set("b1", user("bob"), in_an_hour(), "").await.outcome(),
        SetOutcome::Stored
    );

    let at = h
        .invalidate_user("alice")
        .await
        .unwrap()
        .invalidated_at
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(
        (at.seconds - now).abs() < 60,
        "invalidated_at {at:?} is now"
    );

    for token in ["a1", "a2"] {
        let got = h.get(token).await;
        assert_eq!(got.outcome(), GetOutcome::Invalidated, "{token}");
        assert!(!got.fence.is_empty());
        assert_eq!(
            h.get(token).await.outcome(),
            GetOutcome::Miss,
            "{token} was removed"
        );
    }
    assert_eq!(h.get("b1").await.outcome(), GetOutcome::Hit);

    // A session validated after the password change is cached again; with a clock-skew
    // margin (SPEC §8) only once the margin has passed, and STALE before.
    let margin = h.backend.clock_skew();
    if !margin.is_zero() {
        let miss = h.get("a3").await;
        assert_eq!(
            h.set("a3", user("alice"), in_an_hour(), &miss.fence)
                .await
                .outcome(),
            SetOutcome::Stale,
            "validated within the margin after the invalidation"
        );
        tokio::time::sleep(margin).await;
    }
    let miss = h.get("a3").await;
    assert_eq!(
        h.set("a3", user("alice"), in_an_hour(), &miss.fence)
            .await
            .outcome(),
        SetOutcome::Stored
    );
    assert_eq!(h.get("a3").await.outcome(), GetOutcome::Hit);
}

/// SPEC §4.1: a Set whose validation began before a password change is refused.
async fn stale_set_is_refused(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    let miss = h.get("tok").await; // t0: the caller starts validating
    h.invalidate_user("u1").await.unwrap(); // t1: the password changes
    let set = h.set("tok", user("u1"), in_an_hour(), &miss.fence).await; // t2
    assert_eq!(set.outcome(), SetOutcome::Stale);
    assert_eq!(
        h.get("tok").await.outcome(),
        GetOutcome::Miss,
        "nothing was stored"
    );

    // Another user's Set with the same old fence is not affected.
    assert_eq!(
        h.set("tok2", user("u2"), in_an_hour(), &miss.fence)
            .await
            .outcome(),
        SetOutcome::Stored
    );
}

/// SPEC §4.2: after a logout, a late Set for the token is refused while the tombstone
/// lives; other tokens are not affected.
async fn logout_then_late_set_is_refused(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    let miss = h.get("tok").await;
    let logout = h.invalidate_token("tok").await.unwrap();
    assert!(!logout.deleted, "nothing was cached yet");
    let set = h.set("tok", user("u1"), in_an_hour(), &miss.fence).await;
    assert_eq!(set.outcome(), SetOutcome::Revoked);
    let set = h.set("tok", user("u1"), in_an_hour(), "").await;
    assert_eq!(set.outcome(), SetOutcome::Revoked, "without a fence too");
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Miss);
    assert_eq!(
        h.set("other", user("u1"), in_an_hour(), "").await.outcome(),
        SetOutcome::Stored
    );
}

/// InvalidateToken deletes the entry and says so.
async fn invalidate_token_deletes(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    h.set("tok", user("u1"), in_an_hour(), "").await;
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Hit);
    assert!(h.invalidate_token("tok").await.unwrap().deleted);
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Miss);
    assert!(!h.invalidate_token("tok").await.unwrap().deleted);
}

/// A user's marker never moves back: a second invalidation records a later instant.
async fn marker_moves_forward(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    let first = h
        .invalidate_user("u1")
        .await
        .unwrap()
        .invalidated_at
        .unwrap();
    let second = h
        .invalidate_user("u1")
        .await
        .unwrap()
        .invalidated_at
        .unwrap();
    assert!((second.seconds, second.nanos) >= (first.seconds, first.nanos));
}

/// Disabled: Get and Set pass through, the invalidations succeed as no-ops (SPEC §3).
async fn disabled_passes_through(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &["--enabled", "false"]).await;
    let got = h.get("tok").await;
    assert_eq!(got.outcome(), GetOutcome::Disabled);
    assert!(got.fence.is_empty(), "DISABLED carries no fence");
    let set = h.set("tok", user("u1"), in_an_hour(), "").await;
    assert_eq!(set.outcome(), SetOutcome::Disabled);
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Disabled);
    assert!(!h.invalidate_token("tok").await.unwrap().deleted);
    assert!(
        h.invalidate_user("u1")
            .await
            .unwrap()
            .invalidated_at
            .is_some()
    );
    let health = h.caller.health(pb::HealthRequest {}).await.unwrap();
    assert!(!health.enabled);
    assert!(health.serving);
}

/// Bad input is refused with INVALID_ARGUMENT naming the field, and nothing is written.
async fn bad_input_is_refused(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    let long_token = "t".repeat(4097);
    let long_id = "u".repeat(257);
    let good = || pb::SetRequest {
        token: "tok".into(),
        user: Some(user("u1")),
        session_expire: Some(in_an_hour()),
        fence: String::new(),
    };
    let bad_sets = [
        (
            pb::SetRequest {
                token: String::new(),
                ..good()
            },
            "token",
        ),
        (
            pb::SetRequest {
                token: long_token.clone(),
                ..good()
            },
            "token",
        ),
        (
            pb::SetRequest {
                user: None,
                ..good()
            },
            "user",
        ),
        (
            pb::SetRequest {
                user: Some(pb::User {
                    id: String::new(),
                    ..user("u1")
                }),
                ..good()
            },
            "user.id",
        ),
        (
            pb::SetRequest {
                user: Some(pb::User {
                    id: long_id.clone(),
                    ..user("u1")
                }),
                ..good()
            },
            "user.id",
        ),
        (
            pb::SetRequest {
                user: Some(pb::User {
                    created_at: None,
                    ..user("u1")
                }),
                ..good()
            },
            "user.created_at",
        ),
        (
            pb::SetRequest {
                session_expire: None,
                ..good()
            },
            "session_expire",
        ),
        (
            pb::SetRequest {
                session_expire: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..good()
            },
            "session_expire",
        ),
        (
            // Protobuf's nanos stop at 999,999,999; a second ending in :59 plus 1.5e9
            // nanos would be written as :60.5, which Python cannot read.
            pb::SetRequest {
                session_expire: Some(prost_types::Timestamp {
                    seconds: in_an_hour().seconds,
                    nanos: 1_500_000_000,
                }),
                ..good()
            },
            "session_expire",
        ),
        (
            pb::SetRequest {
                user: Some(pb::User {
                    updated_at: Some(prost_types::Timestamp {
                        seconds: 253_402_300_800, // 10000-01-01
                        nanos: 0,
                    }),
                    ..user("u1")
                }),
                ..good()
            },
            "user.updated_at",
        ),
        (
            pb::SetRequest {
                fence: "not-a-fence".into(),
                ..good()
            },
            "fence",
        ),
        (
            // No Get hands out a fence from before the store could check revocations...
            pb::SetRequest {
                fence: "0".into(),
                ..good()
            },
            "fence",
        ),
        (
            // ...nor one from the future: it would pass the stale check after any
            // InvalidateUser.
            pb::SetRequest {
                fence: future_fence(),
                ..good()
            },
            "fence",
        ),
    ];
    for (request, field) in bad_sets {
        let status = h.caller.set(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            status.message()
        );
        assert!(!status.message().contains(&long_token));
    }
    assert_eq!(
        h.get("tok").await.outcome(),
        GetOutcome::Miss,
        "no refused Set wrote"
    );

    for token in [String::new(), long_token.clone()] {
        let status = h
            .caller
            .get(pb::GetRequest {
                token: token.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("token:"));
        let status = h.invalidate_token(&token).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    for user_id in ["", long_id.as_str()] {
        let status = h.invalidate_user(user_id).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("user_id:"),
            "{}",
            status.message()
        );
    }
    // The refused InvalidateUser wrote no marker: a fence from before it still works.
    let miss = h.get("tok").await;
    assert_eq!(
        h.set("tok", user("u1"), in_an_hour(), &miss.fence)
            .await
            .outcome(),
        SetOutcome::Stored
    );
}

/// A fence a minute ahead of now (every topology's clock-skew margin is smaller).
fn future_fence() -> String {
    let ahead = std::time::SystemTime::now() + Duration::from_secs(60);
    let micros = ahead
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    micros.to_string()
}

/// A request over 64 KiB is refused by the transport before any handler runs.
async fn oversized_message_is_refused(backend: Backend, path: Path) {
    let mut h = Subject::start(backend, path, &[]).await;
    let request = pb::SetRequest {
        token: "tok".into(),
        user: Some(pb::User {
            name: "n".repeat(70 * 1024),
            ..user("u1")
        }),
        session_expire: Some(in_an_hour()),
        fence: String::new(),
    };
    let status = h.caller.set(request).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Miss);
}

/// Health reports the store, whether it serves, and how fast it answered.
async fn health_reports_the_store(backend: Backend, path: Path) {
    let h = Subject::start(backend, path, &[]).await;
    let health = h.caller.health(pb::HealthRequest {}).await.unwrap();
    assert!(health.serving);
    assert!(health.enabled);
    assert_eq!(health.store, backend.store_name());
    assert!(health.store_latency.is_some());
}

/// Many tasks share the store; every hit returns the user stored for that very token.
async fn concurrent_calls_keep_tokens_apart(backend: Backend, path: Path) {
    let h = Subject::start(backend, path, &[]).await;
    let mut tasks = Vec::new();
    for task in 0..16 {
        let client = h.caller.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let token = format!("tok-{task}-{i}");
                let id = format!("user-{task}-{i}");
                client
                    .set(pb::SetRequest {
                        token: token.clone(),
                        user: Some(user(&id)),
                        session_expire: Some(in_an_hour()),
                        fence: String::new(),
                    })
                    .await
                    .unwrap();
                let got = client.get(pb::GetRequest { token }).await.unwrap();
                assert_eq!(got.outcome(), GetOutcome::Hit);
                assert_eq!(got.user.unwrap().id, id);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Sets, Gets and InvalidateUser race from many tasks; once an InvalidateUser has
/// returned, no Get serves a session whose fence predates it.
async fn concurrent_invalidation_is_never_undone(backend: Backend, path: Path) {
    let h = Subject::start(backend, path, &[]).await;
    let mut tasks = Vec::new();
    for task in 0..8 {
        let client = h.caller.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..30 {
                let token = format!("tok-{task}-{i}");
                let id = format!("user-{}", i % 3);
                let miss = client
                    .get(pb::GetRequest {
                        token: token.clone(),
                    })
                    .await
                    .unwrap();
                let invalidated = client
                    .invalidate_user(pb::InvalidateUserRequest {
                        user_id: id.clone(),
                    })
                    .await
                    .unwrap();
                // The validation began before the invalidation returned: refused.
                let set = client
                    .set(pb::SetRequest {
                        token: token.clone(),
                        user: Some(user(&id)),
                        session_expire: Some(in_an_hour()),
                        fence: miss.fence.clone(),
                    })
                    .await
                    .unwrap();
                assert_eq!(set.outcome(), SetOutcome::Stale, "{token}: {invalidated:?}");
                let got = client.get(pb::GetRequest { token }).await.unwrap();
                assert_ne!(got.outcome(), GetOutcome::Hit);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

macro_rules! conformance {
    (
        every path: [$($case:ident),* $(,)?],
        network only: [$($network_case:ident),* $(,)?] $(,)?
    ) => {
        mod redis_network {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(Backend::Redis, Path::Network).await; })*
            $(#[tokio::test] async fn $network_case() { super::$network_case(Backend::Redis, Path::Network).await; })*
        }
        mod memory_network {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(Backend::Memory, Path::Network).await; })*
            $(#[tokio::test] async fn $network_case() { super::$network_case(Backend::Memory, Path::Network).await; })*
        }
        mod sentinel_network {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(Backend::Sentinel, Path::Network).await; })*
            $(#[tokio::test] async fn $network_case() { super::$network_case(Backend::Sentinel, Path::Network).await; })*
        }
        mod cluster_network {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(Backend::Cluster, Path::Network).await; })*
            $(#[tokio::test] async fn $network_case() { super::$network_case(Backend::Cluster, Path::Network).await; })*
        }
        mod redis_direct {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(Backend::Redis, Path::Direct).await; })*
        }
        mod memory_direct {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(Backend::Memory, Path::Direct).await; })*
        }
    };
}

conformance!(
    every path: [
        miss_set_hit,
        ttl_arithmetic,
        expired_session_is_not_stored,
        expired_entry,
        invalidate_user_hides_sessions,
        stale_set_is_refused,
        logout_then_late_set_is_refused,
        invalidate_token_deletes,
        marker_moves_forward,
        disabled_passes_through,
        bad_input_is_refused,
        health_reports_the_store,
        concurrent_calls_keep_tokens_apart,
        concurrent_invalidation_is_never_undone,
    ],
    network only: [oversized_message_is_refused],
);
