//! Validate (SPEC §9) end to end: the real server on port 0 over a real store, in front
//! of stand-in identity providers that speak Appwrite's REST API and RFC 7662 over real
//! HTTP (`support::idp`). Provider calls are counted by the stand-ins.

mod support;

use std::{sync::Arc, time::Duration};

use session_cache::pb::{
    self, GetOutcome, ValidateOutcome, session_cache_client::SessionCacheClient,
};
use support::{
    Backend, Harness, PATIENCE, eventually,
    idp::{AppwriteStandIn, IntrospectionStandIn, Mode, idp_user, in_a_day, not_listening_url},
    race::{self, Revoke, Sessions},
};
use tokio::time::Instant;
use tonic::{Code, transport::Channel};

async fn validate(
    client: &mut SessionCacheClient<Channel>,
    token: &str,
) -> Result<pb::ValidateResponse, tonic::Status> {
    client
        .validate(pb::ValidateRequest {
            token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn outcome(client: &mut SessionCacheClient<Channel>, token: &str) -> ValidateOutcome {
    validate(client, token).await.unwrap().outcome()
}

/// The service in front of `flags`' provider, on `backend`.
async fn service(backend: Backend, flags: &[String], extra: &[&str]) -> Harness {
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(extra);
    Harness::start(backend, &args).await
}

const STORES: [Backend; 2] = [Backend::Redis, Backend::Memory];

/// VALID with every field the provider gave, then from the cache without a call; the
/// entry is the one Get and Set share. INVALID for a refused token, remembered.
#[tokio::test]
async fn valid_then_cached_and_invalid_then_remembered() {
    for backend in STORES {
        let appwrite = AppwriteStandIn::start().await;
        let user = idp_user("u-valid");
        let expire = in_a_day();
        appwrite.add_session("secret-1", &user, expire);
        let mut h = service(backend, &appwrite.flags(), &[]).await;

        let reply = validate(&mut h.client, "secret-1").await.unwrap();
        assert_eq!(reply.outcome(), ValidateOutcome::Valid, "{backend:?}");
        let got = reply.user.unwrap();
        assert_eq!(
            (got.id.as_str(), got.email.as_str(), got.name.as_str()),
            ("u-valid", "u-valid@example.com", "Ada Lovelace")
        );
        assert!(got.email_verified);
        assert_eq!(got.tier, "pro");
        assert_eq!(got.created_at.unwrap().seconds, user.created_at.timestamp());
        assert_eq!(got.updated_at.unwrap().seconds, user.updated_at.timestamp());
        assert_eq!(reply.session_expire.unwrap().seconds, expire.timestamp());
        assert_eq!(appwrite.calls().account, 1);

        // From the cache: no call, and Get sees the same entry.
        for _ in 0..5 {
            assert_eq!(
                outcome(&mut h.client, "secret-1").await,
                ValidateOutcome::Valid
            );
        }
        assert_eq!(
            appwrite.calls().account,
            1,
            "{backend:?}: a hit called the provider"
        );
        assert_eq!(
            support::get_outcome(&h.get("secret-1").await),
            GetOutcome::Hit
        );

        // Refused, then remembered for the negative TTL.
        for _ in 0..5 {
            assert_eq!(
                outcome(&mut h.client, "no-such").await,
                ValidateOutcome::Invalid
            );
        }
        assert_eq!(
            appwrite.calls().account,
            2,
            "{backend:?}: a refusal was asked again"
        );
        assert_eq!(
            support::get_outcome(&h.get("no-such").await),
            GetOutcome::Miss
        );
    }
}

/// Each way the provider can fail answers UNAVAILABLE (never INVALID), caches nothing
/// either way, and the next Validate asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_failures_are_unavailable_and_cache_nothing() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("secret-f", &idp_user("u-f"), in_a_day());
    let mut h = service(
        Backend::Redis,
        &appwrite.flags(),
        &["--idp-timeout-ms", "300"],
    )
    .await;
    let modes = [
        Mode::Status(500),
        Mode::Status(503),
        Mode::Status(429),
        Mode::Slow(Duration::from_millis(900)),
        Mode::Hang,
        Mode::Reset,
        Mode::Garbage,
        Mode::Error(404, "project_not_found"),
    ];
    for (i, mode) in modes.into_iter().enumerate() {
        // An answer between failures keeps the circuit closed, so each mode is asked.
        appwrite.set_mode(Mode::Normal);
        let healthy = format!("healthy-{i}");
        appwrite.add_session(&healthy, &idp_user("u-h"), in_a_day());
        assert_eq!(
            outcome(&mut h.client, &healthy).await,
            ValidateOutcome::Valid
        );
        appwrite.set_mode(mode.clone());
        let before = appwrite.calls().account;
        let started = Instant::now();
        let got = outcome(&mut h.client, "secret-f").await;
        assert_eq!(got, ValidateOutcome::Unavailable, "{mode:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{mode:?}: not bounded by --idp-timeout-ms"
        );
        assert_eq!(
            support::get_outcome(&h.get("secret-f").await),
            GetOutcome::Miss,
            "{mode:?} cached something"
        );
        assert!(appwrite.calls().account > before, "{mode:?}: never asked");
    }
    // Past five failures in a row the circuit opens: answered at once, no call.
    appwrite.set_mode(Mode::Status(500));
    for _ in 0..5 {
        outcome(&mut h.client, "secret-f").await;
    }
    let before = appwrite.calls().account;
    assert_eq!(
        outcome(&mut h.client, "secret-f").await,
        ValidateOutcome::Unavailable
    );
    assert_eq!(
        appwrite.calls().account,
        before,
        "the open circuit let a call through"
    );
    // Healthy again: after the pause one probe goes through and closes it.
    appwrite.set_mode(Mode::Normal);
    eventually(PATIENCE, "the circuit to close", async || {
        match outcome(&mut h.client, "secret-f").await {
            ValidateOutcome::Valid => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

/// A provider that is not listening at all: UNAVAILABLE.
#[tokio::test]
async fn a_provider_not_listening_is_unavailable() {
    let endpoint = not_listening_url("/v1");
    let flags = [
        "--idp",
        "appwrite",
        "--appwrite-endpoint",
        &endpoint,
        "--appwrite-project",
        "p",
    ]
    .map(String::from);
    let mut h = service(Backend::Memory, &flags, &[]).await;
    assert_eq!(
        outcome(&mut h.client, "anything").await,
        ValidateOutcome::Unavailable
    );
}

/// Without --idp, Validate fails with FAILED_PRECONDITION naming the flag; bad input is
/// refused naming the field, before any provider call.
#[tokio::test]
async fn without_a_provider_or_with_bad_input_validate_refuses() {
    let mut h = Harness::start(Backend::Memory, &[]).await;
    let status = validate(&mut h.client, "t").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("--idp"), "{}", status.message());

    let appwrite = AppwriteStandIn::start().await;
    let mut h = service(Backend::Memory, &appwrite.flags(), &[]).await;
    for (token, field) in [("".to_owned(), "token:"), ("x".repeat(4097), "token:")] {
        let status = validate(&mut h.client, &token).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{}", status.message());
    }
    assert_eq!(appwrite.calls().account, 0);
}

/// 200 concurrent Validates of one uncached token make exactly one provider call, on
/// both stores; and the cached answer serves the next 1,000 without a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_validates_of_one_token_share_one_call() {
    for backend in STORES {
        let appwrite = AppwriteStandIn::start().await;
        appwrite.add_session("popular", &idp_user("u-pop"), in_a_day());
        // Slow enough that every Validate arrives while the call is under way.
        appwrite.set_mode(Mode::Slow(Duration::from_millis(300)));
        let h = service(backend, &appwrite.flags(), &[]).await;
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let mut client = h.client.clone();
                tokio::spawn(async move { outcome(&mut client, "popular").await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), ValidateOutcome::Valid, "{backend:?}");
        }
        let first = appwrite.calls().account;
        let mut client = h.client.clone();
        for _ in 0..1_000 {
            assert_eq!(
                outcome(&mut client, "popular").await,
                ValidateOutcome::Valid
            );
        }
        eprintln!(
            "{backend:?}: 200 concurrent Validates, {first} provider call(s); 1,000 more, {} call(s)",
            appwrite.calls().account - first
        );
        assert_eq!(first, 1, "{backend:?}: 200 Validates made {first} calls");
        assert_eq!(
            appwrite.calls().account,
            1,
            "{backend:?}: a cached token was asked again"
        );
    }
}

/// A refused token asked 100 times within the negative TTL makes one call (RFC 7662
/// provider); after the TTL it is asked again.
#[tokio::test]
async fn a_refused_token_is_asked_once_per_negative_ttl() {
    for backend in STORES {
        let idp = IntrospectionStandIn::start().await;
        let mut h = service(backend, &idp.flags(), &["--negative-ttl-seconds", "1"]).await;
        for _ in 0..100 {
            assert_eq!(
                outcome(&mut h.client, "refused").await,
                ValidateOutcome::Invalid
            );
        }
        eprintln!(
            "{backend:?}: 100 Validates of a refused token, {} call(s)",
            idp.calls()
        );
        assert_eq!(idp.calls(), 1, "{backend:?}");
        let what = format!("{backend:?}: the refusal to expire and the token to be asked again");
        eventually(PATIENCE, what, async || {
            assert_eq!(
                outcome(&mut h.client, "refused").await,
                ValidateOutcome::Invalid
            );
            match idp.calls() {
                2.. => Ok(()),
                calls => Err(format!("{calls} call(s)")),
            }
        })
        .await;
    }
}

/// Validate with its own deadline (gRPC's `grpc-timeout`): the outcome, or the status
/// it failed with.
async fn outcome_within(
    client: &mut SessionCacheClient<Channel>,
    token: &str,
    timeout: Duration,
) -> Result<ValidateOutcome, Code> {
    let mut request = tonic::Request::new(pb::ValidateRequest {
        token: token.into(),
    });
    request.set_timeout(timeout);
    client
        .validate(request)
        .await
        .map(|r| r.into_inner().outcome())
        .map_err(|status| status.code())
}

/// 200 concurrent Validates of different tokens against a provider that hangs, each
/// with a deadline (900 ms) that leaves no time for a call of --idp-timeout-ms
/// (1,000 ms) after waiting: never more than --idp-max-in-flight calls at once, the rest
/// answered UNAVAILABLE at once. Without a deadline of their own (the request timeout,
/// 5 s, leaves time) they wait for a slot, until the circuit opens and sheds the queue
/// at once. Against a provider failing fast, the circuit opens and spares it most calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_struggling_provider_gets_at_most_max_in_flight_calls() {
    for (mode, deadline) in [
        (Mode::Hang, Some(Duration::from_millis(900))),
        (Mode::Hang, None),
        (Mode::Status(500), None),
    ] {
        let appwrite = AppwriteStandIn::start().await;
        appwrite.set_mode(mode.clone());
        let h = service(
            Backend::Memory,
            &appwrite.flags(),
            &["--idp-max-in-flight", "4", "--idp-timeout-ms", "1000"],
        )
        .await;
        let started = Instant::now();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let mut client = h.client.clone();
                tokio::spawn(async move {
                    let began = Instant::now();
                    let token = format!("token-{i}");
                    let got = match deadline {
                        Some(deadline) => outcome_within(&mut client, &token, deadline).await,
                        None => Ok(outcome(&mut client, &token).await),
                    };
                    (got, began.elapsed())
                })
            })
            .collect();
        let (mut at_once, mut slowest, mut cut) = (0, Duration::ZERO, 0);
        for task in tasks {
            let (got, took) = task.await.unwrap();
            match got {
                Ok(got) => assert_eq!(got, ValidateOutcome::Unavailable, "{mode:?}"),
                // A call under way when its own deadline passed: the client's or the
                // server's cut, whichever came first; never VALID or INVALID.
                Err(code) => {
                    assert!(deadline.is_some(), "{mode:?}: {code:?}");
                    cut += 1;
                }
            }
            if took < Duration::from_millis(500) {
                at_once += 1;
            }
            slowest = slowest.max(took);
        }
        let (calls, peak) = (appwrite.calls().account, appwrite.peak_in_flight());
        eprintln!(
            "{mode:?}, deadline {deadline:?}: 200 Validates in {:?}: {calls} provider calls, at \
             most {peak} requests at once, {at_once} answered within 500 ms, {cut} cut by \
             their deadline, slowest {slowest:?}",
            started.elapsed()
        );
        // Each call asks both Appwrite endpoints at once: 2 requests per call. When a
        // hung call times out and a waiting one takes its slot, the stand-in still
        // counts the hung requests until it sees their connections close: a margin of
        // one call's requests then.
        let margin = if deadline.is_none() && mode == Mode::Hang {
            2
        } else {
            0
        };
        assert!(peak <= 2 * 4 + margin, "{mode:?}: {peak} requests at once");
        assert!(calls < 200, "{mode:?}: every Validate reached the provider");
        match (&mode, deadline) {
            (Mode::Hang, Some(_)) => {
                assert_eq!(calls, 4, "the first four calls hang; nothing else may go");
                assert_eq!(at_once, 196, "Validates that could not wait waited");
            }
            (Mode::Hang, None) => {
                // Two rounds of four failed calls open the circuit (five failures in a
                // row); the queue is then shed at once, long before the 5 s deadline.
                assert!(calls <= 2 * 4, "{calls} calls to a hanging provider");
                assert!(
                    slowest < Duration::from_millis(4000),
                    "the queue was not shed"
                );
            }
            _ => {}
        }
    }
}

/// A cold cache is not an overload (SPEC §9): 300 concurrent Validates of 300 distinct
/// valid sessions, the provider healthy at 100 ms a call, the default
/// --idp-max-in-flight (64): every one answers VALID, waiting its turn, and the
/// provider never has more than 64 calls at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_burst_of_distinct_sessions_is_answered_not_shed() {
    for backend in STORES {
        let appwrite = AppwriteStandIn::start().await;
        let expire = in_a_day();
        for i in 0..300 {
            appwrite.add_session(&format!("cold-{i}"), &idp_user(&format!("u-{i}")), expire);
        }
        appwrite.set_mode(Mode::Slow(Duration::from_millis(100)));
        let h = service(backend, &appwrite.flags(), &[]).await;
        let started = Instant::now();
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let mut client = h.client.clone();
                tokio::spawn(async move { outcome(&mut client, &format!("cold-{i}")).await })
            })
            .collect();
        let mut valid = 0;
        for task in tasks {
            if task.await.unwrap() == ValidateOutcome::Valid {
                valid += 1;
            }
        }
        let took = started.elapsed();
        let (calls, peak) = (appwrite.calls().account, appwrite.peak_in_flight());
        eprintln!(
            "{backend:?}: 300 distinct sessions at once, provider at 100 ms: {valid} VALID in \
             {took:?}, {calls} provider calls, at most {peak} requests at once"
        );
        assert_eq!(valid, 300, "{backend:?}: a cold burst was shed");
        assert_eq!(calls, 300, "{backend:?}: one call per session");
        assert!(peak <= 2 * 64, "{backend:?}: {peak} requests at once");
    }
}

/// The revocation rule (SPEC §9) under concurrency, with the race of
/// `tests/revocation.rs` run through Validate: tasks validate a small pool of tokens and,
/// while a Validate of a token is under way, sign it out (InvalidateToken) or change its
/// user's password (InvalidateUser), each first at the provider, which then refuses the
/// token; then they validate it again. The provider is slow, so calls are shared and
/// revocations land while they are under way. A Validate that began after a revocation
/// of its token had returned must never answer VALID.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocations_hold_through_validate() {
    for backend in STORES {
        race(backend).await.assert_held(backend);
    }
}

/// Revocations through the API: a sign-out is InvalidateToken, a password change
/// InvalidateUser, each first at the provider, which then refuses the session.
struct ThroughTheApi;

impl Revoke for ThroughTheApi {
    async fn sign_out(
        &self,
        sessions: &Sessions,
        client: &mut SessionCacheClient<Channel>,
        user: usize,
        slot: usize,
    ) {
        let current = sessions.current(user, slot);
        sessions.appwrite.revoke(&current);
        client
            .invalidate_token(pb::InvalidateTokenRequest {
                token: current.clone(),
            })
            .await
            .unwrap();
        sessions.revoked(user, [slot], &[current]);
    }

    async fn end_all(
        &self,
        sessions: &Sessions,
        client: &mut SessionCacheClient<Channel>,
        user: usize,
    ) {
        let tokens = sessions.of_user(user);
        for token in &tokens {
            sessions.appwrite.revoke(token);
        }
        client
            .invalidate_user(pb::InvalidateUserRequest {
                user_id: race::user_id(user),
            })
            .await
            .unwrap();
        sessions.revoked(user, 0..race::SESSIONS_PER_USER, &tokens);
    }
}

async fn race(backend: Backend) -> race::Tally {
    let appwrite = Arc::new(AppwriteStandIn::start().await);
    appwrite.set_mode(Mode::Late(Duration::from_millis(30)));
    let sessions = Sessions::start(appwrite.clone());
    let h = service(backend, &appwrite.flags(), &[]).await;
    race::race(&h.client, sessions, Arc::new(ThroughTheApi), 1).await
}

/// With the store down, Validate still answers from the provider (and caches nothing):
/// a store failure never becomes a hit, nor an INVALID.
#[tokio::test]
async fn with_the_store_down_the_provider_still_answers() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("secret-d", &idp_user("u-d"), in_a_day());
    let mut h = service(Backend::Redis, &appwrite.flags(), &[]).await;
    h.redis().kill();
    for expected in [1, 2] {
        assert_eq!(
            outcome(&mut h.client, "secret-d").await,
            ValidateOutcome::Valid
        );
        assert_eq!(appwrite.calls().account, expected, "nothing can be cached");
    }
    assert_eq!(
        outcome(&mut h.client, "refused-d").await,
        ValidateOutcome::Invalid
    );
}
