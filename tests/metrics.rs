//! Prometheus metrics on their own port: calls by RPC and outcome, latency histograms,
//! store errors, store health and the Redis pool, in Prometheus' text format.

mod support;

use std::time::Duration;

use support::{Harness, Redis, free_port, in_an_hour, user};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

async fn scrape(port: u16) -> String {
    let deadline = Instant::now() + support::PATIENCE;
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).await.unwrap();
            return text;
        }
        assert!(Instant::now() < deadline, "the metrics port never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    let mut h = Harness::over(
        Some(redis),
        &["--metrics-listen", &format!("127.0.0.1:{port}")],
    )
    .await;
    let miss = h.get("tok").await;
    h.set("tok", user("u1"), in_an_hour(), &miss.fence).await;
    h.get("tok").await;
    h.get("tok").await;
    let _ = h.invalidate_user("").await; // INVALID_ARGUMENT
    // Let the health loop record the store and the pool.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let text = scrape(port).await;
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
