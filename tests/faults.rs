//! Redis faults under concurrent load: the service answers fast and honestly, never
//! hangs, never hands one token's session to another, never acknowledges a revocation
//! the store did not take, and recovers by itself. Each test prints its figures.

mod support;

use std::time::Duration;

use session_cache::pb::{self, GetOutcome, SetOutcome};
use support::{
    Backend, Harness, PATIENCE, eventually, in_an_hour,
    load::{Load, Sample, quantile},
    user,
};
use tokio::time::Instant;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICE: &str = "sessioncache.v1.SessionCache";
const TIMEOUT_MS: u64 = 100;
/// A call answers within the store timeout plus this much scheduling slack (the test
/// machine runs other tests at the same time).
const SLACK: Duration = Duration::from_millis(400);

async fn start() -> Harness {
    Harness::start(
        Backend::Redis,
        &["--store-timeout-ms", &TIMEOUT_MS.to_string()],
    )
    .await
}

fn bound() -> Duration {
    Duration::from_millis(TIMEOUT_MS) + SLACK
}

/// Checks what every fault promises of the samples and prints the figures.
fn check_samples(name: &str, samples: &[Sample], fault: Instant, recovered: Instant) {
    let failed: Vec<_> = samples.iter().filter(|s| s.code != Code::Ok).collect();
    assert!(
        failed.is_empty(),
        "{name}: Get/Set calls failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    let outage: Vec<_> = samples
        .iter()
        .filter(|s| s.rpc == "Get" && s.started >= fault && s.started < recovered)
        .collect();
    assert!(
        !outage.is_empty(),
        "{name}: the load ran through the outage"
    );
    let slowest = outage.iter().map(|s| s.latency).max().unwrap();
    assert!(
        slowest < bound(),
        "{name}: a Get waited {slowest:?} during the outage"
    );
    let unavailable = outage
        .iter()
        .filter(|s| s.outcome == GetOutcome::Unavailable as i32)
        .count();
    assert!(unavailable > 0, "{name}: the outage was seen");
    let hits_after = samples
        .iter()
        .filter(|s| s.started >= recovered && s.rpc == "Get" && s.outcome == GetOutcome::Hit as i32)
        .count();
    assert!(hits_after > 0, "{name}: hits resumed");
    eprintln!(
        "{name}: {} calls, 0 failed; during the outage {} Gets ({} UNAVAILABLE), p50 {:?} p99 {:?} max {:?}; {} hits after recovery",
        samples.len(),
        outage.len(),
        unavailable,
        quantile(&outage, 0.5),
        quantile(&outage, 0.99),
        slowest,
        hits_after
    );
}

/// Waits until the load has seen hits since `since` (bounded), by watching a probe
/// token of the test's own.
async fn wait_for_hits(h: &mut Harness) {
    eventually(PATIENCE, "a hit of the probe token", async || {
        let got = h.get("probe").await;
        match got.outcome() {
            GetOutcome::Hit => return Ok(()),
            GetOutcome::Unavailable => {}
            _ => {
                h.set("probe", user("probe-user"), in_an_hour(), &got.fence)
                    .await;
            }
        }
        Err(got.outcome())
    })
    .await;
}

/// Redis killed (SIGKILL) and restarted under load: no Get or Set fails, Gets during the
/// outage answer within the timeout, health turns NOT_SERVING within 3 s and SERVING
/// within 5 s of the restart, revocations fail with UNAVAILABLE, hits resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load() {
    let mut h = start().await;
    let load = Load::start(&h.client, 16, Duration::from_millis(2));
    wait_for_hits(&mut h).await;

    let killed = Instant::now();
    h.redis().kill();
    h.server
        .wait_health(SERVICE, ServingStatus::NotServing)
        .await;
    let down_after = killed.elapsed();
    assert!(
        down_after < Duration::from_secs(3),
        "NOT_SERVING after {down_after:?}"
    );
    assert_eq!(
        h.invalidate_user("u1").await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(
        h.invalidate_token("tok").await.unwrap_err().code(),
        Code::Unavailable
    );
    h.server.wait_health("", ServingStatus::Serving).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the outage, under load

    let restarted = Instant::now();
    h.redis().restart().await;
    h.server.wait_health(SERVICE, ServingStatus::Serving).await;
    let up_after = restarted.elapsed();
    assert!(
        up_after < Duration::from_secs(5),
        "SERVING after {up_after:?}"
    );
    wait_for_hits(&mut h).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the load sees hits too
    assert!(h.invalidate_user("u1").await.is_ok());

    let samples = load.stop().await;
    check_samples("kill", &samples, killed, restarted);
    eprintln!("kill: NOT_SERVING after {down_after:?}, SERVING {up_after:?} after the restart");
}

/// Redis frozen (SIGSTOP) then thawed under load: the same promises; no call waits
/// longer than the timeout while Redis holds its connections without answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_then_thawed_under_load() {
    let mut h = start().await;
    let load = Load::start(&h.client, 16, Duration::from_millis(2));
    wait_for_hits(&mut h).await;

    let frozen = Instant::now();
    h.redis().freeze();
    h.server
        .wait_health(SERVICE, ServingStatus::NotServing)
        .await;
    let down_after = frozen.elapsed();
    assert!(
        down_after < Duration::from_secs(3),
        "NOT_SERVING after {down_after:?}"
    );
    let started = Instant::now();
    assert_eq!(
        h.invalidate_user("u1").await.unwrap_err().code(),
        Code::Unavailable
    );
    assert!(
        started.elapsed() < bound(),
        "a revocation waited {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let thawed = Instant::now();
    h.redis().thaw();
    h.server.wait_health(SERVICE, ServingStatus::Serving).await;
    let up_after = thawed.elapsed();
    assert!(
        up_after < Duration::from_secs(5),
        "SERVING after {up_after:?}"
    );
    wait_for_hits(&mut h).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let samples = load.stop().await;
    check_samples("freeze", &samples, frozen, thawed);
    eprintln!("freeze: NOT_SERVING after {down_after:?}, SERVING {up_after:?} after SIGCONT");
}

/// Redis full under `noeviction`: Set answers UNAVAILABLE, Gets of what is stored still
/// hit, a revocation is refused honestly, and nothing breaks.
#[tokio::test]
async fn redis_out_of_memory() {
    let redis =
        support::Redis::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"])
            .await;
    let mut h = Harness::over(Some(redis), &[]).await;
    assert_eq!(
        h.set("kept", user("u1"), in_an_hour(), "").await.outcome(),
        SetOutcome::Stored
    );
    // Fill Redis behind the service's back, then hold it over its limit: lowering
    // maxmemory below what it uses keeps it full however its buffers shrink (filling up
    // to the limit alone leaves Redis hovering at it, taking a write now and then).
    let mut conn = h.redis().conn().await;
    let filler = "x".repeat(1024);
    for i in 0..500 {
        let _: () = bb8_redis::redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(&filler)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = bb8_redis::redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1mb")
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused: Result<(), _> = bb8_redis::redis::cmd("SET")
        .arg("filler:last")
        .arg(&filler)
        .query_async(&mut conn)
        .await;
    assert!(
        refused.is_err(),
        "Redis is over maxmemory and refuses writes"
    );
    assert_eq!(
        h.set("new", user("u2"), in_an_hour(), "").await.outcome(),
        SetOutcome::Unavailable
    );
    assert_eq!(h.get("kept").await.outcome(), GetOutcome::Hit);
    assert_eq!(h.get("new").await.outcome(), GetOutcome::Miss);
    assert_eq!(
        h.invalidate_user("u1").await.unwrap_err().code(),
        Code::Unavailable
    );
}

/// Thousands of Gets with 1-5 ms deadlines (cancelled mid-flight on the shared Redis
/// connection) mixed with ordinary Gets: every hit is the user stored for that token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_never_cross_tokens() {
    let mut h = start().await;
    const TOKENS: usize = 40;
    for i in 0..TOKENS {
        let set = h
            .set(
                &format!("tok-{i}"),
                user(&format!("user-{i}")),
                in_an_hour(),
                "",
            )
            .await;
        assert_eq!(set.outcome(), SetOutcome::Stored);
    }
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let mut client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut hits, mut cut) = (0, 0);
            let mut state = task * 7919 + 1;
            for call in 0..400u64 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (state >> 33) as usize % TOKENS;
                let mut request = Request::new(pb::GetRequest {
                    token: format!("tok-{i}"),
                });
                if call % 2 == 0 {
                    request.set_timeout(Duration::from_millis(1 + (state >> 40) % 5));
                }
                match client.get(request).await {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        if reply.outcome() == GetOutcome::Hit {
                            assert_eq!(reply.user.unwrap().id, format!("user-{i}"), "tok-{i}");
                            hits += 1;
                        }
                    }
                    Err(status) => {
                        // Cut by the deadline, on the client's side or the server's.
                        assert!(
                            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                            "{status:?}"
                        );
                        cut += 1;
                    }
                }
            }
            (hits, cut)
        }));
    }
    let (mut hits, mut cut) = (0, 0);
    for task in tasks {
        let (h, c) = task.await.unwrap();
        hits += h;
        cut += c;
    }
    assert!(hits > 1000, "{hits} hits");
    eprintln!(
        "integrity: 3200 Gets, {hits} hits all for their own token, {cut} cut by their deadline"
    );
}

/// Past --max-in-flight calls are shed at once with RESOURCE_EXHAUSTED while admitted
/// calls carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_not_queued() {
    // A slow store (frozen Redis, 1 s timeout, health checked rarely) keeps admitted
    // calls in flight.
    let mut h = Harness::start(
        Backend::Redis,
        &[
            "--max-in-flight",
            "4",
            "--store-timeout-ms",
            "1000",
            "--health-interval-ms",
            "60000",
        ],
    )
    .await;
    h.redis().freeze();
    let mut calls = Vec::new();
    for i in 0..40 {
        let mut client = h.client.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = client
                .get(pb::GetRequest {
                    token: format!("t{i}"),
                })
                .await;
            (
                result
                    .map(|r| r.into_inner().outcome())
                    .map_err(|s| s.code()),
                started.elapsed(),
            )
        }));
    }
    let (mut shed, mut admitted) = (0, 0);
    for call in calls {
        let (result, took) = call.await.unwrap();
        match result {
            Err(Code::ResourceExhausted) => {
                shed += 1;
                assert!(
                    took < Duration::from_millis(900),
                    "a shed call waited {took:?}"
                );
            }
            Ok(GetOutcome::Unavailable) => admitted += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    h.redis().thaw();
    assert!((1..=8).contains(&admitted), "{admitted} admitted");
    assert!(shed >= 32, "{shed} shed");
    eprintln!("overload: 40 concurrent calls, limit 4: {admitted} admitted, {shed} shed at once");
}

/// Redis forgets its scripts (SCRIPT FLUSH, or a restart): lookups and writes load
/// them again and go on.
#[tokio::test]
async fn flushed_scripts_are_loaded_again() {
    let mut h = start().await;
    assert_eq!(
        h.set("tok", user("u1"), in_an_hour(), "").await.outcome(),
        SetOutcome::Stored
    );
    let mut conn = h.redis().conn().await;
    let _: () = bb8_redis::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Hit);
    let _: () = bb8_redis::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        h.set("tok2", user("u1"), in_an_hour(), "").await.outcome(),
        SetOutcome::Stored
    );
    assert!(h.invalidate_user("u1").await.is_ok());

    // Concurrent writes go out batched in pipelines: each call answered NOSCRIPT
    // inside one is sent again with its script loaded.
    let _: () = bb8_redis::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let calls = (0..64).map(|i| {
        let mut client = h.client.clone();
        async move {
            let set = client
                .set(pb::SetRequest {
                    token: format!("flushed-{i}"),
                    user: Some(user(&format!("user-{i}"))),
                    session_expire: Some(in_an_hour()),
                    fence: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            let invalidated = client
                .invalidate_user(pb::InvalidateUserRequest {
                    user_id: format!("other-{i}"),
                })
                .await;
            (set.outcome(), invalidated.is_ok())
        }
    });
    for (i, (set, invalidated)) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(set, SetOutcome::Stored, "Set {i}");
        assert!(invalidated, "InvalidateUser {i}");
    }
}
