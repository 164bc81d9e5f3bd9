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
//! | `session_cache_config_reloads_total` | counter | `config` (`api_keys`, `tls`), `result` (`ok`, `failed`) |
//! | `session_cache_tls_handshake_failures_total` | counter | `reason` (`failed`, `timeout`) |
//! | `session_cache_idp_calls_total` | counter | `provider`, `result` ([`crate::idp::RESULT_LABELS`]) |
//! | `session_cache_idp_call_duration_seconds` | histogram | `provider` |
//! | `session_cache_idp_shed_total` | counter | `provider`, `reason` (`max_in_flight`, `circuit_open`) |
//! | `session_cache_idp_waiting` | gauge | |
//! | `session_cache_validate_joins_total` | counter | |
//! | `session_cache_decisions_total` | counter | `via` (`Validate`, `Check`, `/auth`), `source` (`cache`, `negative_cache`, `provider`), `decision` (`valid`, `invalid`, `unavailable`) |
//! | `session_cache_validate_negative_hits_total` | counter | |

use std::{net::SocketAddr, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::rpc::Rpc;

/// Latency buckets, in seconds: a call takes well under a millisecond when healthy
/// and at most the store timeout when not.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// How often histograms are compacted.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The `GET /metrics` endpoint: its bound port and the recorder's handle.
pub(crate) struct Exporter {
    listener: TcpListener,
    handle: PrometheusHandle,
}

/// Binds `addr` and installs the process-wide recorder; starts nothing ([`Exporter::run`]
/// serves). The port is bound first, so that a taken port leaves no recorder behind.
pub(crate) fn install(addr: SocketAddr) -> Result<Exporter, crate::server::Error> {
    let bind_error = |e: std::io::Error| crate::server::Error::Bind {
        flag: "--metrics-listen",
        addr,
        problem: e.to_string(),
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let listener = TcpListener::from_std(listener).map_err(bind_error)?;
    // The crate's own listener (`PrometheusBuilder::build`) starts an upkeep task that
    // never ends; this one serves from a task that ends with the server.
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(|_| crate::server::Error::Recorder)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| crate::server::Error::Recorder)?;
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
        for outcome in rpc.outcomes().iter().chain(&crate::rpc::REFUSALS) {
            counter!("session_cache_calls_total", "rpc" => rpc.name(), "outcome" => *outcome)
                .absolute(0);
        }
        counter!("session_cache_store_errors_total", "rpc" => rpc.name()).absolute(0);
        // Registered, so that its buckets are exported at 0 before the first call.
        let _ = histogram!("session_cache_call_duration_seconds", "rpc" => rpc.name());
    }
    gauge!("session_cache_connections_open").set(0.0);
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
    describe_gauge!(
        "session_cache_idp_waiting",
        "Provider calls waiting for one of the --idp-max-in-flight slots (at most \
         --idp-max-waiting)"
    );
    gauge!("session_cache_idp_waiting").set(0.0);
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
    decisions_exported();
    Ok(Exporter { listener, handle })
}

impl Exporter {
    /// Serves `GET /metrics` (any path answers the same) and compacts histograms until
    /// `stop` is cancelled; the connections it serves end with it.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let Exporter { listener, handle } = self;
        let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = upkeep.tick() => handle.run_upkeep(),
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            tracing::warn!(error = %e, "the metrics endpoint could not accept");
                            continue;
                        }
                    };
                    let handle = handle.clone();
                    let service = service_fn(move |_: Request<Incoming>| {
                        let handle = handle.clone();
                        async move { Ok::<_, std::convert::Infallible>(render(&handle)) }
                    });
                    connections.spawn(async move {
                        if let Err(e) = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(error = %e, "a metrics connection failed");
                        }
                    });
                }
            }
        }
    }
}

/// The Prometheus text exposition of every metric.
fn render(handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(handle.render())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// A reload of the configuration's files, applied (`ok`) or refused (`failed`).
pub(crate) fn config_reload(config: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!("session_cache_config_reloads_total", "config" => config, "result" => result)
        .increment(1);
}

pub(crate) fn tls_handshake_failed(reason: &'static str) {
    counter!("session_cache_tls_handshake_failures_total", "reason" => reason).increment(1);
}

/// Records one answered call.
pub(crate) fn call(rpc: &'static str, started: Instant, outcome: &'static str) {
    counter!("session_cache_calls_total", "rpc" => rpc, "outcome" => outcome).increment(1);
    histogram!("session_cache_call_duration_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
}

/// Exports the identity provider's series at 0, once it is known.
pub(crate) fn idp_exported(provider: &'static str) {
    for result in crate::idp::RESULT_LABELS {
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

/// Records how many provider calls wait for a slot.
pub(crate) fn idp_waiting(waiting: usize) {
    gauge!("session_cache_idp_waiting").set(waiting as f64);
}

/// Exports the decisions' series at 0 (`crate::decision`), for each path that decides.
pub(crate) fn decisions_exported() {
    describe_counter!(
        "session_cache_decisions_total",
        "Tokens decided by Validate, Envoy's Check and /auth (via): from the cache, the \
         negative cache or the identity provider (source), and what was decided"
    );
    for via in crate::decision::Via::ALL {
        for (source, decision) in crate::decision::OUTCOMES {
            counter!("session_cache_decisions_total", "via" => via.label(), "source" => source, "decision" => decision)
                .absolute(0);
        }
    }
    counter!("session_cache_store_errors_total", "rpc" => crate::decision::Via::Auth.label())
        .absolute(0);
}

/// Records one decision.
pub(crate) fn decision(via: &'static str, source: crate::decision::Source, decision: &'static str) {
    counter!("session_cache_decisions_total", "via" => via, "source" => source.label(), "decision" => decision)
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
        Code::FailedPrecondition => "failed_precondition",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unavailable => "unavailable_status",
        _ => "other_error",
    }
}
