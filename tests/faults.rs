//! Redis faults under the service: it answers fast and honestly, never hangs, never
//! acknowledges a revocation the store did not take, and recovers by itself.

mod support;

use std::time::Duration;

use session_cache::pb::{GetOutcome, SetOutcome};
use support::{Backend, Harness, PATIENCE, in_an_hour, user};
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICE: &str = "sessioncache.v1.SessionCache";
const TIMEOUT_MS: u64 = 100;

/// No hang: a call answers within the store timeout plus this much scheduling slack.
const SLACK: Duration = Duration::from_millis(400);

async fn start() -> Harness {
    Harness::start(
        Backend::Redis,
        &["--store-timeout-ms", &TIMEOUT_MS.to_string()],
    )
    .await
}

/// Gets until one answers `want`, each within the bound; returns how many it took.
async fn get_until(h: &mut Harness, token: &str, want: GetOutcome) -> usize {
    let deadline = Instant::now() + PATIENCE;
    for attempt in 1.. {
        let started = Instant::now();
        let got = h.get(token).await;
        assert!(
            started.elapsed() < Duration::from_millis(TIMEOUT_MS) + SLACK,
            "a Get took {:?}",
            started.elapsed()
        );
        if got.outcome() == want {
            return attempt;
        }
        assert!(
            got.user.is_none() || got.outcome() == GetOutcome::Hit,
            "no user without a hit"
        );
        assert!(
            Instant::now() < deadline,
            "Get never answered {want:?}; last {:?}",
            got.outcome()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    unreachable!()
}

/// Redis killed: Gets and Sets answer UNAVAILABLE with status OK and in bounded time,
/// revocations fail with gRPC UNAVAILABLE, health turns NOT_SERVING; after a restart
/// health turns SERVING and hits resume, with no restart of the service.
#[tokio::test]
async fn redis_killed_and_restarted() {
    let mut h = start().await;
    assert_eq!(
        h.set("tok", user("u1"), in_an_hour(), "").await.outcome(),
        SetOutcome::Stored
    );
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Hit);

    h.redis().kill();
    get_until(&mut h, "tok", GetOutcome::Unavailable).await;
    h.server
        .wait_health(SERVICE, ServingStatus::NotServing)
        .await;
    let started = Instant::now();
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Unavailable);
    assert!(
        started.elapsed() < SLACK,
        "a known-down store answers at once"
    );
    assert_eq!(
        h.set("tok", user("u1"), in_an_hour(), "").await.outcome(),
        SetOutcome::Unavailable
    );
    assert_eq!(
        h.invalidate_user("u1").await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(
        h.invalidate_token("tok").await.unwrap_err().code(),
        Code::Unavailable
    );
    // Health checks by the process name keep serving: the process is alive.
    h.server.wait_health("", ServingStatus::Serving).await;

    h.redis().restart().await;
    h.server.wait_health(SERVICE, ServingStatus::Serving).await;
    // The restarted Redis is empty; a Set lands once every pooled connection healed.
    let deadline = Instant::now() + PATIENCE;
    while h.set("tok", user("u1"), in_an_hour(), "").await.outcome() != SetOutcome::Stored {
        assert!(Instant::now() < deadline, "Set never recovered");
    }
    get_until(&mut h, "tok", GetOutcome::Hit).await;
    assert!(h.invalidate_user("u1").await.is_ok());
}

/// Redis frozen (SIGSTOP): calls answer within the timeout instead of waiting for it;
/// after SIGCONT it serves again.
#[tokio::test]
async fn redis_frozen_then_thawed() {
    let mut h = start().await;
    assert_eq!(
        h.set("tok", user("u1"), in_an_hour(), "").await.outcome(),
        SetOutcome::Stored
    );

    h.redis().freeze();
    get_until(&mut h, "tok", GetOutcome::Unavailable).await;
    let started = Instant::now();
    let status = h.invalidate_user("u1").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_millis(TIMEOUT_MS) + SLACK);
    h.server
        .wait_health(SERVICE, ServingStatus::NotServing)
        .await;

    h.redis().thaw();
    h.server.wait_health(SERVICE, ServingStatus::Serving).await;
    get_until(&mut h, "tok", GetOutcome::Hit).await;
}

/// Redis full under `noeviction`: Set answers UNAVAILABLE, Gets of what is stored
/// still hit, and nothing breaks.
#[tokio::test]
async fn redis_out_of_memory() {
    let redis =
        support::Redis::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"])
            .await;
    let mut h = Harness::over(Some(redis), &[]).await;
    assert_eq!(
        h.set("kept", user("u1"), in_an_hour(), "").await.outcome(),
        SetOutcome::Stored
    );
    // Fill Redis behind the service's back until it refuses writes.
    let mut conn = h.redis().conn().await;
    // Small values, so that the last accepted one leaves Redis over its limit.
    let filler = "x".repeat(1024);
    let mut full = false;
    for i in 0..20_000 {
        let refused: Result<(), _> = bb8_redis::redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(&filler)
            .query_async(&mut conn)
            .await;
        if refused.is_err() {
            full = true;
            break;
        }
    }
    assert!(full, "Redis reached maxmemory");
    assert_eq!(
        h.set("new", user("u2"), in_an_hour(), "").await.outcome(),
        SetOutcome::Unavailable
    );
    assert_eq!(h.get("kept").await.outcome(), GetOutcome::Hit);
    assert_eq!(h.get("new").await.outcome(), GetOutcome::Miss);
    // A full Redis cannot take a revocation either: the caller is told, never fooled.
    assert_eq!(
        h.invalidate_user("u1").await.unwrap_err().code(),
        Code::Unavailable
    );
}
