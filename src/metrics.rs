//! Prometheus metrics on their own HTTP port (`--metrics-listen`), through the
//! `metrics` facade: without the flag no recorder is installed and every recording
//! below costs next to nothing.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `session_cache_calls_total` | counter | `rpc`, `outcome` (an outcome, or a gRPC code) |
//! | `session_cache_call_duration_seconds` | histogram | `rpc` |
//! | `session_cache_store_errors_total` | counter | `rpc` |
//! | `session_cache_store_up` | gauge | |
//! | `session_cache_store_ping_seconds` | gauge | |
//! | `session_cache_redis_connections` | gauge | `state` (`open`, `idle`) |
//! | `session_cache_redis_primary_moves_total` | counter | |
//! | `session_cache_connections_open` | gauge | |
//! | `session_cache_connections_refused_total` | counter | |
//! | `session_cache_connections_closed_total` | counter | `reason` (`idle`, `stalled`) |

use std::{net::SocketAddr, time::Duration};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{ExporterFuture, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::time::Instant;
use tonic::{Code, Status};

/// Latency buckets, in seconds: a call takes well under a millisecond when healthy
/// and at most the store timeout when not.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// How often histograms are compacted.
pub(crate) const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide recorder and returns the exporter to run (it serves
/// `GET /metrics` on `addr`) and the handle whose upkeep must run periodically.
pub(crate) fn install(addr: SocketAddr) -> Result<(PrometheusHandle, ExporterFuture), String> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .and_then(|b| b.build())
        .map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| "a metrics recorder is already installed in this process".to_string())?;
    describe_counter!(
        "session_cache_calls_total",
        "SessionCache calls by RPC and outcome"
    );
    describe_histogram!(
        "session_cache_call_duration_seconds",
        Unit::Seconds,
        "Time to answer a SessionCache call"
    );
    describe_counter!(
        "session_cache_store_errors_total",
        "Calls whose store operation failed or timed out"
    );
    describe_gauge!(
        "session_cache_store_up",
        "1 when the last ping reached the store"
    );
    describe_gauge!(
        "session_cache_store_ping_seconds",
        Unit::Seconds,
        "Round trip of the last successful store ping"
    );
    describe_gauge!(
        "session_cache_redis_connections",
        "Redis connections in the pool"
    );
    describe_counter!(
        "session_cache_redis_primary_moves_total",
        "Times the Redis primary was found moved (a failover) and connections replaced"
    );
    describe_gauge!(
        "session_cache_connections_open",
        "Client connections open (at most --max-connections)"
    );
    describe_counter!(
        "session_cache_connections_refused_total",
        "Connections closed at accept because --max-connections were open"
    );
    describe_counter!(
        "session_cache_connections_closed_total",
        "Connections closed by the server: idle past --idle-timeout-seconds, or stalled \
         (an answer unread past --stall-timeout-seconds)"
    );
    // Exported from the start, so that an alert on its rate has a series to read.
    counter!("session_cache_redis_primary_moves_total").absolute(0);
    counter!("session_cache_connections_refused_total").absolute(0);
    for reason in ["idle", "stalled"] {
        counter!("session_cache_connections_closed_total", "reason" => reason).absolute(0);
    }
    Ok((handle, exporter))
}

/// Records one answered call.
pub(crate) fn call(rpc: &'static str, started: Instant, outcome: &'static str) {
    counter!("session_cache_calls_total", "rpc" => rpc, "outcome" => outcome).increment(1);
    histogram!("session_cache_call_duration_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
}

/// Records a store failure behind a call.
pub(crate) fn store_error(rpc: &'static str) {
    counter!("session_cache_store_errors_total", "rpc" => rpc).increment(1);
}

/// Records the store's state after a ping.
pub(crate) fn store_state(up: bool, ping: Option<Duration>) {
    gauge!("session_cache_store_up").set(if up { 1.0 } else { 0.0 });
    if let Some(ping) = ping {
        gauge!("session_cache_store_ping_seconds").set(ping.as_secs_f64());
    }
}

/// Records the Redis pool's connections.
pub(crate) fn redis_connections(open: u32, idle: u32) {
    gauge!("session_cache_redis_connections", "state" => "open").set(f64::from(open));
    gauge!("session_cache_redis_connections", "state" => "idle").set(f64::from(idle));
}

/// Records that the Redis primary moved and connections are being replaced.
pub(crate) fn redis_primary_moved() {
    counter!("session_cache_redis_primary_moves_total").increment(1);
}

/// Records how many client connections are open.
pub(crate) fn connections_open(open: usize) {
    gauge!("session_cache_connections_open").set(open as f64);
}

/// Records a connection closed at accept, past the cap.
pub(crate) fn connection_refused() {
    counter!("session_cache_connections_refused_total").increment(1);
}

/// Records a connection the server closed, and why (`idle` or `stalled`).
pub(crate) fn connection_closed(reason: &'static str) {
    counter!("session_cache_connections_closed_total", "reason" => reason).increment(1);
}

/// The `outcome` label of a failed call: its gRPC code.
pub(crate) fn code_label(status: &Status) -> &'static str {
    match status.code() {
        Code::InvalidArgument => "invalid_argument",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unavailable => "unavailable_status",
        _ => "other_error",
    }
}
