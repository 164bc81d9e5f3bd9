//! Prometheus metrics through the `metrics` facade: every metric's description and
//! start-up series, and one function per recording. With `--metrics-listen` the server
//! installs the recorder and serves `GET /metrics` (`server::metrics_endpoint`); without
//! it no recorder is installed and every recording below costs next to nothing. A leaf:
//! it knows the RPC table and nothing else of the service.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `session_cache_calls_total` | counter | `rpc` (`crate::rpc`), `outcome` (an answer's outcome, or `crate::rpc::ENDINGS`) |
//! | `session_cache_call_duration_seconds` | histogram | `rpc` |
//! | `session_cache_store_errors_total` | counter | `rpc` |
//! | `session_cache_store_up` | gauge | |
//! | `session_cache_store_ping_seconds` | gauge | |
//! | `session_cache_redis_connections` | gauge | `state` (`open`, `idle`) |
//! | `session_cache_redis_primary_moves_total` | counter | |
//! | `session_cache_connections_open` | gauge | `listener` (`LISTENERS`) |
//! | `session_cache_connections_refused_total` | counter | `listener`, `reason` (`CONNECTION_REFUSALS`) |
//! | `session_cache_connections_closed_total` | counter | `reason` (`CONNECTION_CLOSES`) |
//! | `session_cache_calls_refused_total` | counter | `reason` (`CALL_REFUSALS`) |
//! | `session_cache_config_reloads_total` | counter | `config` (`api_keys`, `tls`), `result` (`ok`, `failed`) |
//! | `session_cache_tls_handshake_failures_total` | counter | `reason` (`failed`, `timeout`) |
//! | `session_cache_idp_calls_total` | counter | `provider`, `result` (`crate::idp::RESULT_LABELS`) |
//! | `session_cache_idp_call_duration_seconds` | histogram | `provider` |
//! | `session_cache_idp_shed_total` | counter | `provider`, `reason` (`max_in_flight`, `circuit_open`) |
//! | `session_cache_idp_waiting` | gauge | |
//! | `session_cache_validate_joins_total` | counter | |
//! | `session_cache_decisions_total` | counter | `via` (`Validate`, `Check`, `/auth`), `source` (`cache`, `negative_cache`, `provider`), `decision` (`valid`, `invalid`, `unavailable`) |
//! | `session_cache_validate_negative_hits_total` | counter | |

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::time::Instant;

use crate::rpc::{ENDINGS, Rpc, UNKNOWN};

/// The listeners whose connections are counted.
pub(crate) const LISTENERS: [&str; 3] = ["grpc", "http", "metrics"];
/// Why a listener closes a connection at accept.
pub(crate) const CONNECTION_REFUSALS: [&str; 3] = ["full", "peer", "proxy"];
/// Why the server closes a gRPC connection.
pub(crate) const CONNECTION_CLOSES: [&str; 4] = ["idle", "stalled", "unauthenticated", "resets"];
/// Why a call is refused RESOURCE_EXHAUSTED.
pub(crate) const CALL_REFUSALS: [&str; 5] =
    ["in_flight", "server", "reserved", "peer", "connection"];

/// Latency buckets, in seconds: a call takes well under a millisecond when healthy
/// and at most the store timeout when not.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A process-wide recorder is installed already.
#[derive(Debug)]
pub(crate) struct AlreadyInstalled;

/// Installs the process-wide recorder, describes every metric and exports each series
/// whose labels are known at start-up at 0 (SPEC §10). Returns the handle that renders
/// them; serving it is the caller's (`GET /metrics`).
pub(crate) fn install() -> Result<PrometheusHandle, AlreadyInstalled> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(|_| AlreadyInstalled)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| AlreadyInstalled)?;
    RECORDING.store(true, Ordering::Relaxed);
    describe_counter!(
        "session_cache_calls_total",
        "gRPC calls by method (rpc) and how each ended (outcome): an answer, a refusal by \
         its gRPC code, cancelled by the client, or cut by the request timeout"
    );
    describe_histogram!(
        "session_cache_call_duration_seconds",
        Unit::Seconds,
        "Time from a call's headers to its answer (or to its end, cut short)"
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
        "Client connections open, by listener (grpc: at most --max-connections)"
    );
    describe_counter!(
        "session_cache_connections_refused_total",
        "Connections closed at accept, by listener and reason: full (the listener's cap), \
         peer (the client address holds its share), proxy (no valid PROXY header)"
    );
    describe_counter!(
        "session_cache_connections_closed_total",
        "gRPC connections closed by the server: idle past --idle-timeout-seconds, stalled \
         (an answer unread past --stall-timeout-seconds), unauthenticated (on a place \
         reserved for authenticated callers), resets (cut for resetting its streams)"
    );
    describe_counter!(
        "session_cache_calls_refused_total",
        "Calls refused RESOURCE_EXHAUSTED, by the bound that refused them: in_flight \
         (--max-in-flight), server (--max-open-calls), reserved (what is left is kept \
         for authenticated callers), peer (the client address's share), connection (the \
         connection's share)"
    );
    // Exported from the start, so that an alert on its rate has a series to read.
    counter!("session_cache_redis_primary_moves_total").absolute(0);
    for listener in LISTENERS {
        gauge!("session_cache_connections_open", "listener" => listener).set(0.0);
        for reason in CONNECTION_REFUSALS {
            counter!("session_cache_connections_refused_total", "listener" => listener, "reason" => reason)
                .absolute(0);
        }
    }
    for reason in CONNECTION_CLOSES {
        counter!("session_cache_connections_closed_total", "reason" => reason).absolute(0);
    }
    for reason in CALL_REFUSALS {
        counter!("session_cache_calls_refused_total", "reason" => reason).absolute(0);
    }
    describe_counter!(
        "session_cache_config_reloads_total",
        "Reloads of --api-keys-file (config api_keys) or of --tls-cert, --tls-key and \
         --tls-client-ca (config tls), on SIGHUP or a change on disk, applied or refused"
    );
    for config in ["api_keys", "tls"] {
        for result in ["ok", "failed"] {
            counter!("session_cache_config_reloads_total", "config" => config, "result" => result)
                .absolute(0);
        }
    }
    describe_counter!(
        "session_cache_tls_handshake_failures_total",
        "TLS handshakes that failed (a client that does not trust the certificate, say) \
         or did not finish in time"
    );
    for reason in ["failed", "timeout"] {
        counter!("session_cache_tls_handshake_failures_total", "reason" => reason).absolute(0);
    }
    for rpc in Rpc::ALL {
        for outcome in rpc.outcomes().into_iter().chain(ENDINGS) {
            counter!("session_cache_calls_total", "rpc" => rpc.name(), "outcome" => outcome)
                .absolute(0);
        }
        counter!("session_cache_store_errors_total", "rpc" => rpc.name()).absolute(0);
        // Registered, so that its buckets are exported at 0 before the first call.
        let _ = histogram!("session_cache_call_duration_seconds", "rpc" => rpc.name());
    }
    describe_counter!(
        "session_cache_idp_calls_total",
        "Calls to the identity provider by result: valid, invalid, or why it did not answer"
    );
    describe_histogram!(
        "session_cache_idp_call_duration_seconds",
        Unit::Seconds,
        "Time the identity provider took to answer (or to fail)"
    );
    describe_counter!(
        "session_cache_idp_shed_total",
        "Validates answered UNAVAILABLE without asking the identity provider: \
         --idp-max-in-flight calls in progress, or the provider failing (circuit open)"
    );
    describe_counter!(
        "session_cache_validate_joins_total",
        "Validates that shared a provider call already in progress for their token"
    );
    describe_counter!(
        "session_cache_validate_negative_hits_total",
        "Validates answered INVALID from the negative cache, without a provider call"
    );
    counter!("session_cache_validate_joins_total").absolute(0);
    counter!("session_cache_validate_negative_hits_total").absolute(0);
    describe_gauge!(
        "session_cache_idp_waiting",
        "Provider calls waiting for one of the --idp-max-in-flight slots (at most \
         --idp-max-waiting)"
    );
    gauge!("session_cache_idp_waiting").set(0.0);
    describe_counter!(
        "session_cache_decisions_total",
        "Tokens decided by Validate, Envoy's Check and /auth (via): from the cache, the \
         negative cache or the identity provider (source), and what was decided"
    );
    counter!("session_cache_calls_total", "rpc" => UNKNOWN, "outcome" => "unimplemented")
        .absolute(0);
    Ok(handle)
}

/// How often the endpoint compacts histograms.
pub(crate) const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// A reload of the configuration's files, applied (`ok`) or refused (`failed`).
pub(crate) fn config_reload(config: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!("session_cache_config_reloads_total", "config" => config, "result" => result)
        .increment(1);
}

pub(crate) fn tls_handshake_failed(reason: &'static str) {
    counter!("session_cache_tls_handshake_failures_total", "reason" => reason).increment(1);
}

/// Whether a recorder is installed. Without one every recording is dropped, but the
/// `metrics` macros would still build each series' key (a label vector, allocated) on
/// every call: the per-call recording checks this first.
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Records one call, however it ended.
pub(crate) fn call(rpc: &'static str, started: Instant, outcome: &'static str) {
    if !RECORDING.load(Ordering::Relaxed) {
        return;
    }
    counter!("session_cache_calls_total", "rpc" => rpc, "outcome" => outcome).increment(1);
    histogram!("session_cache_call_duration_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
}

/// Exports the decisions' series at 0: one per `via` and (`source`, `decision`) pair;
/// each `via` also names the decisions' store errors (`crate::decision`).
pub(crate) fn decisions_exported(vias: &[&'static str], outcomes: &[(&'static str, &'static str)]) {
    for &via in vias {
        for &(source, decision) in outcomes {
            counter!("session_cache_decisions_total", "via" => via, "source" => source, "decision" => decision)
                .absolute(0);
        }
        counter!("session_cache_store_errors_total", "rpc" => via).absolute(0);
    }
}

/// Records one decision.
pub(crate) fn decision(via: &'static str, source: &'static str, decision: &'static str) {
    counter!("session_cache_decisions_total", "via" => via, "source" => source, "decision" => decision)
        .increment(1);
}

/// Records how many provider calls wait for a slot.
pub(crate) fn idp_waiting(waiting: usize) {
    gauge!("session_cache_idp_waiting").set(waiting as f64);
}

/// Exports the identity provider's series at 0, once it is known: one per `results`
/// label.
pub(crate) fn idp_exported(provider: &'static str, results: &[&'static str]) {
    for &result in results {
        counter!("session_cache_idp_calls_total", "provider" => provider, "result" => result)
            .absolute(0);
    }
    for reason in ["max_in_flight", "circuit_open"] {
        counter!("session_cache_idp_shed_total", "provider" => provider, "reason" => reason)
            .absolute(0);
    }
    // Registered, so that its buckets are exported at 0 before the first call.
    let _ = histogram!("session_cache_idp_call_duration_seconds", "provider" => provider);
}

/// Records one call to the identity provider.
pub(crate) fn idp_call(provider: &'static str, result: &'static str, took: Duration) {
    counter!("session_cache_idp_calls_total", "provider" => provider, "result" => result)
        .increment(1);
    histogram!("session_cache_idp_call_duration_seconds", "provider" => provider)
        .record(took.as_secs_f64());
}

/// Records a Validate answered UNAVAILABLE without asking the provider.
pub(crate) fn idp_shed(provider: &'static str, reason: &'static str) {
    counter!("session_cache_idp_shed_total", "provider" => provider, "reason" => reason)
        .increment(1);
}

/// Records a Validate that joined a provider call in progress.
pub(crate) fn validate_joined() {
    counter!("session_cache_validate_joins_total").increment(1);
}

/// Records a Validate answered from the negative cache.
pub(crate) fn validate_negative_hit() {
    counter!("session_cache_validate_negative_hits_total").increment(1);
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

/// Records how many client connections `listener` has open.
pub(crate) fn connections_open(listener: &'static str, open: usize) {
    gauge!("session_cache_connections_open", "listener" => listener).set(open as f64);
}

/// Records a connection `listener` closed at accept, and why (`CONNECTION_REFUSALS`).
pub(crate) fn connection_refused(listener: &'static str, reason: &'static str) {
    counter!("session_cache_connections_refused_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// Records a connection the server closed, and why (`CONNECTION_CLOSES`).
pub(crate) fn connection_closed(reason: &'static str) {
    counter!("session_cache_connections_closed_total", "reason" => reason).increment(1);
}

/// Records a call refused RESOURCE_EXHAUSTED, and by which bound (`CALL_REFUSALS`).
pub(crate) fn call_refused(reason: &'static str) {
    counter!("session_cache_calls_refused_total", "reason" => reason).increment(1);
}
