//! OpenTelemetry traces over OTLP/gRPC (`--otlp-endpoint`, SPEC §10): the `rpc` span of
//! every call, with its `store` and `idp` children, leave in batches from a thread of
//! their own; a collector that is slow or down costs callers nothing.
//!
//! **Off the request path.** A finished span goes into a bounded queue
//! ([`MAX_QUEUE_SIZE`]) and the call moves on; the batch processor's thread exports every
//! [`EXPORT_EVERY`] (or as soon as a batch is full). While the collector does not answer,
//! each export gives up after [`EXPORT_TIMEOUT`], and spans that find the queue full are
//! dropped: memory stays bounded and no call ever waits for the collector.
//!
//! **Nothing when off.** Without `--otlp-endpoint` no layer is installed at all, and the
//! `rpc`/`store`/`idp` spans, at debug level, are disabled at their call sites when logs
//! are at info.
//!
//! **Propagation.** [`parent_from`] reads W3C `traceparent`/`tracestate` from a call's
//! headers, so that the server span joins the caller's trace.

use std::time::Duration;

use http::HeaderMap;
use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider},
};
use tracing::{Level, Subscriber};
use tracing_subscriber::{Layer, filter::filter_fn, registry::LookupSpan};

use crate::error::SetupError;

/// Most finished spans waiting for export; past it new spans are dropped. A call makes
/// two or three spans of a few hundred bytes, so this holds about 2 MiB, some seconds
/// of a busy replica's calls.
pub const MAX_QUEUE_SIZE: usize = 8192;
/// Most spans in one export request.
pub const MAX_EXPORT_BATCH_SIZE: usize = 512;
/// How often the queue is exported when no batch fills up: SPEC §10 wants spans out
/// within 10 s, and an export may take up to [`EXPORT_TIMEOUT`] after this.
pub const EXPORT_EVERY: Duration = Duration::from_secs(5);
/// The longest one export may take, retries included; past it the batch is dropped.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest shutdown waits for the last export.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(4);
/// The instrumentation scope the spans are reported under.
const SCOPE: &str = "session-cache";

/// The span exporter, running until [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Starts exporting to `endpoint` (`http://host:4317`) as `service_name`. Must be
    /// called within a Tokio runtime, which the exporter's connection lives on: keep it
    /// running until [`Telemetry::shutdown`] returns. Connects lazily: a collector that
    /// is down at start-up is not an error.
    pub fn start(endpoint: &str, service_name: &str) -> Result<Telemetry, SetupError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| SetupError::Telemetry(e.to_string()))?;
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUE_SIZE)
            .with_max_export_batch_size(MAX_EXPORT_BATCH_SIZE)
            .with_scheduled_delay(EXPORT_EVERY)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batches)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            // OTEL_RESOURCE_ATTRIBUTES (k8s.pod.name=..., from the downward API) and the
            // SDK's own attributes, with service.name from the flag.
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_owned())
                    .build(),
            )
            .build();
        Ok(Telemetry { provider })
    }

    /// The layer that turns the service's spans into OpenTelemetry spans. Its own
    /// filter passes the `rpc`, `store` and `idp` spans at debug level whatever
    /// `RUST_LOG` says for the logs, and no events: log lines stay in the logs, and
    /// none of their fields reaches the collector.
    pub fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        let tracer = self.provider.tracer(SCOPE);
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            // Nothing here reads OpenTelemetry's current context, and busy/idle times
            // are not worth their bookkeeping on every poll of every call: both off.
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_filter(filter_fn(|meta| {
                meta.is_span()
                    && *meta.level() <= Level::DEBUG
                    && meta.target().starts_with("session_cache")
                    && matches!(meta.name(), "rpc" | "store" | "idp")
            }))
    }

    /// Exports what is queued and stops, waiting at most [`SHUTDOWN_TIMEOUT`]. Blocks
    /// the calling thread: call it outside the runtime's tasks, before the runtime
    /// is dropped.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(error = %e, "the last spans may not have been exported");
        }
    }
}

/// Whether a server span that answered `code` failed, by OpenTelemetry's gRPC
/// conventions: the server's faults are; a caller's mistake (`INVALID_ARGUMENT`,
/// `UNAUTHENTICATED`, `RESOURCE_EXHAUSTED`...) leaves the status unset.
pub fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

/// The caller's trace context from its W3C `traceparent` and `tracestate` headers; an
/// empty context when it sent none or a malformed one.
pub fn parent_from(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// A call's headers, as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    use super::*;

    /// Only the server's own faults mark a server span as failed.
    #[test]
    fn server_errors() {
        assert!(is_server_error(tonic::Code::Unavailable));
        assert!(is_server_error(tonic::Code::Internal));
        assert!(!is_server_error(tonic::Code::Ok));
        assert!(!is_server_error(tonic::Code::InvalidArgument));
        assert!(!is_server_error(tonic::Code::ResourceExhausted));
        assert!(!is_server_error(tonic::Code::PermissionDenied));
    }

    /// A W3C `traceparent` header becomes the parent; a malformed one is ignored.
    #[test]
    fn reads_traceparent() {
        let mut metadata = HeaderMap::new();
        metadata.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = parent_from(&metadata);
        let span = cx.span();
        let parent = span.span_context();
        assert!(parent.is_remote() && parent.is_sampled());
        assert_eq!(
            parent.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parent.span_id().to_string(), "00f067aa0ba902b7");

        metadata.insert("traceparent", "00-nonsense-01".parse().unwrap());
        assert!(!parent_from(&metadata).span().span_context().is_valid());
        assert!(
            !parent_from(&HeaderMap::new())
                .span()
                .span_context()
                .is_valid()
        );
    }
}
