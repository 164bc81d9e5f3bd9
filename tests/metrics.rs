//! Prometheus metrics on their own port: calls by RPC and outcome, latency histograms,
//! store errors, store health, the Redis pool and the identity provider behind
//! Validate, in Prometheus' text format.

mod support;

use std::time::Duration;

use chrono::Utc;
use session_cache::pb;
use support::{
    Harness, PATIENCE, Redis, eventually, free_port,
    idp::{AppwriteStandIn, Mode},
    in_an_hour,
    scrape::scrape,
    user,
};

fn line<'a>(text: &'a str, name: &str, labels: &[&str]) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
}

/// Every kind of metric the README lists is exported, with the right counts.
#[tokio::test]
async fn exports_calls_latency_store_and_pool() {
    let port = free_port();
    let redis = Redis::start().await;
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session(
        "popular",
        &idp_user(),
        Utc::now() + chrono::Duration::days(1),
    );
    let metrics = format!("127.0.0.1:{port}");
    let mut args = vec!["--metrics-listen", &metrics];
    let idp = appwrite.flags();
    args.extend(idp.iter().map(String::as_str));
    let mut h = Harness::over(Some(redis), &args).await;
    // Before any call, every series is there at 0 (SPEC §10).
    let text = scrape(port).await;
    for (name, labels) in [
        (
            "session_cache_calls_total",
            &["rpc=\"Validate\"", "outcome=\"valid\""][..],
        ),
        (
            "session_cache_idp_calls_total",
            &["provider=\"appwrite\"", "result=\"timeout\""],
        ),
        ("session_cache_idp_shed_total", &["reason=\"circuit_open\""]),
        ("session_cache_validate_joins_total", &[]),
        ("session_cache_validate_negative_hits_total", &[]),
        (
            "session_cache_call_duration_seconds_count",
            &["rpc=\"Validate\""],
        ),
    ] {
        assert!(
            line(&text, name, labels).ends_with(" 0"),
            "{name} {labels:?}"
        );
    }

    // Validate: 20 at once of one token (one provider call, the rest join), then a
    // refused token three times (one call, then the negative cache).
    appwrite.set_mode(Mode::Slow(Duration::from_millis(200)));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut client = h.client.clone();
            tokio::spawn(async move {
                client
                    .validate(pb::ValidateRequest {
                        token: "popular".into(),
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    appwrite.set_mode(Mode::Normal);
    for _ in 0..3 {
        h.client
            .validate(pb::ValidateRequest {
                token: "refused".into(),
            })
            .await
            .unwrap();
    }
    let miss = h.get("tok").await;
    h.set("tok", user("u1"), in_an_hour(), &miss.fence).await;
    h.get("tok").await;
    h.get("tok").await;
    let _ = h.invalidate_user("").await; // INVALID_ARGUMENT
    // The health loop records the store's ping and the pool at its next tick.
    let text = eventually(
        PATIENCE,
        "the health loop to record the store's ping and the pool",
        async || {
            let text = scrape(port).await;
            let recorded = [
                "session_cache_store_ping_seconds",
                "session_cache_redis_connections{",
            ]
            .iter()
            .all(|name| text.lines().any(|l| l.starts_with(name)));
            if recorded { Ok(text) } else { Err(text) }
        },
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let hits = line(
        &text,
        "session_cache_calls_total",
        &["rpc=\"Get\"", "outcome=\"hit\""],
    );
    assert!(hits.ends_with(" 2"), "{hits}");
    let misses = line(
        &text,
        "session_cache_calls_total",
        &["rpc=\"Get\"", "outcome=\"miss\""],
    );
    assert!(misses.ends_with(" 1"), "{misses}");
    line(
        &text,
        "session_cache_calls_total",
        &["rpc=\"Set\"", "outcome=\"stored\""],
    );
    line(
        &text,
        "session_cache_calls_total",
        &["rpc=\"InvalidateUser\"", "outcome=\"invalid_argument\""],
    );
    let count = line(
        &text,
        "session_cache_call_duration_seconds_count",
        &["rpc=\"Get\""],
    );
    assert!(count.ends_with(" 3"), "{count}");
    line(
        &text,
        "session_cache_call_duration_seconds_bucket",
        &["rpc=\"Get\"", "le=\"0.001\""],
    );
    assert!(line(&text, "session_cache_store_up", &[]).ends_with(" 1"));
    line(&text, "session_cache_store_ping_seconds", &[]);
    line(
        &text,
        "session_cache_redis_connections",
        &["state=\"open\""],
    );
    assert!(text.contains("# TYPE session_cache_calls_total counter"));
    for (name, labels, value) in [
        (
            "session_cache_calls_total",
            &["rpc=\"Validate\"", "outcome=\"valid\""][..],
            20,
        ),
        (
            "session_cache_calls_total",
            &["rpc=\"Validate\"", "outcome=\"invalid\""],
            3,
        ),
        (
            "session_cache_idp_calls_total",
            &["provider=\"appwrite\"", "result=\"valid\""],
            1,
        ),
        (
            "session_cache_idp_calls_total",
            &["provider=\"appwrite\"", "result=\"invalid\""],
            1,
        ),
        (
            "session_cache_idp_call_duration_seconds_count",
            &["provider=\"appwrite\""],
            2,
        ),
        ("session_cache_validate_joins_total", &[], 19),
        ("session_cache_validate_negative_hits_total", &[], 2),
    ] {
        let got = line(&text, name, labels);
        assert!(got.ends_with(&format!(" {value}")), "{got}, want {value}");
    }
    // Exported before the first failover, so that an alert on its rate has a series.
    assert!(line(&text, "session_cache_redis_primary_moves_total", &[]).ends_with(" 0"));

    h.redis().kill();
    h.server
        .wait_health(
            "sessioncache.v1.SessionCache",
            tonic_health::pb::health_check_response::ServingStatus::NotServing,
        )
        .await;
    let _ = h.invalidate_token("tok").await;
    let text = scrape(port).await;
    assert!(line(&text, "session_cache_store_up", &[]).ends_with(" 0"));
    line(
        &text,
        "session_cache_store_errors_total",
        &["rpc=\"InvalidateToken\""],
    );
    assert!(!text.contains("tok\""), "no token in a label");
}

fn idp_user() -> session_cache::entry::User {
    session_cache::entry::User {
        id: "u-metrics".into(),
        email: "m@example.com".into(),
        name: "M".into(),
        email_verified: true,
        tier: "pro".into(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    }
}
