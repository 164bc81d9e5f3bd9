//! The one layer every gRPC call goes through, whatever service it is for: it derives
//! the method from the path once (`crate::rpc`), refuses a method the table does not
//! know, sheds past `--max-in-flight`, authenticates the caller and checks its role
//! before the message is read, opens the call's span, cuts the call at its deadline
//! (`--request-timeout-ms`, or the client's shorter `grpc-timeout`) with CANCELLED, and
//! counts the call however it ends: answered, refused here or further in (the open-call
//! bounds, a message too large), cancelled by the client, or cut by the request timeout.
//! The count is a drop guard, so a call whose future is dropped is counted as surely as
//! one that returns.
//!
//! Admission (`--max-in-flight`) happens once the request's message has arrived, in
//! [`Admission`], the second half of this layer, which the server puts behind the
//! transport's own accounting (`crate::transport::Track`): a request whose message is
//! slow to arrive holds an open call, as it should, but no slot of the calls being
//! served. Handlers below it only answer: they find the caller's name in the request's
//! extensions ([`CallerName`]) and put their answer's outcome in the response's
//! ([`Outcome`]).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::{BodyExt, Full, Limited};
use tokio::{sync::Semaphore, time::Instant};
use tonic::{
    Code, Status,
    body::Body,
    codegen::{Service, http},
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tracing::{Instrument, Span, debug};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    auth,
    rpc::{self, Access, CANCELLED, OK, Outcome, Rpc, TIMED_OUT, UNKNOWN, code_label},
};

/// The authenticated caller of a call, for the handlers' logs; absent (or `None`) when
/// the service authenticates no one.
#[derive(Clone, Debug)]
pub struct CallerName(pub Option<String>);

/// When the request timeout cuts the call, for the layers behind this one: a stream
/// dropped before it was cut by the timeout, not reset by its client.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(pub Instant);

/// On an answer: the request's message broke off before it was whole (the client reset
/// the stream, or the connection ended), so the answer will reach no one. The transport
/// counts such a stream as reset.
#[derive(Clone, Copy, Debug)]
pub struct MessageBroken;

/// Largest request message accepted, in bytes; a larger one is refused with
/// OUT_OF_RANGE before any handler runs. A Set with a 4 KiB token and a generous user
/// fits many times.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// A gRPC message's frame header: a compression flag and a 4-byte length.
const FRAME_HEADER_BYTES: usize = 5;

/// What the layer needs, shared by every connection.
struct Shared {
    auth: auth::Current,
    request_timeout: Duration,
}

/// The layer of [`Call`]: checks callers against `auth`, and cuts calls at
/// `request_timeout`.
pub(crate) fn layer<S>(
    auth: auth::Current,
    request_timeout: Duration,
) -> impl tower_layer::Layer<S, Service = Call<S>> + Clone {
    let shared = Arc::new(Shared {
        auth,
        request_timeout,
    });
    tower_layer::layer_fn(move |inner| Call {
        inner,
        shared: shared.clone(),
    })
}

/// See the module's documentation.
#[derive(Clone)]
pub(crate) struct Call<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, R> Service<http::Request<B>> for Call<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let Some(rpc) = Rpc::from_path(request.uri().path()) else {
            debug!(path = request.uri().path(), "call refused: unknown method");
            crate::metrics::call(UNKNOWN, started, code_label(Code::Unimplemented));
            return refuse(Status::unimplemented("no such method on this server"));
        };
        let span = span(rpc, &request);
        let deadline = deadline(started, self.shared.request_timeout, request.headers());
        let record = Record {
            rpc,
            started,
            span: span.clone(),
            ended: false,
        };
        let caller = match rpc.access() {
            Access::Open => None,
            Access::Role(role) => {
                let certs = request
                    .extensions()
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(TlsConnectInfo::peer_certs);
                match self.shared.auth.load().authorize(
                    request.headers(),
                    certs.as_deref().map(Vec::as_slice),
                    role,
                ) {
                    Ok(caller) => caller.map(|c| c.name),
                    Err(denied) => return record.refuse(denied.status()),
                }
            }
        };
        // Only a caller with a name: a handler reads a missing one as none, and a
        // service that authenticates no one is spared an insertion per call.
        if caller.is_some() {
            request.extensions_mut().insert(CallerName(caller));
        }
        request.extensions_mut().insert(rpc);
        request.extensions_mut().insert(Deadline(deadline));
        let answer = self.inner.call(request).instrument(span);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(response) => {
                    let response = response?;
                    record.answered(&response);
                    Ok(response)
                }
                // Cut by the request timeout: what tonic's own timeout answers.
                Err(_) => {
                    let mut record = record;
                    record.end(TIMED_OUT, Code::Cancelled);
                    Ok(Status::cancelled("Timeout expired").into_http())
                }
            }
        })
    }
}

/// The call's server span, a child of the caller's trace when it sent one. Disabled
/// unless something records it (`--otlp-endpoint`, or debug logs), and then the
/// headers are not even looked at.
fn span<B>(rpc: Rpc, request: &http::Request<B>) -> Span {
    let span = tracing::debug_span!(
        "rpc",
        otel.name = rpc.path(),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = rpc.service(),
        rpc.method = rpc.method(),
        rpc.grpc.status_code = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let _ = span.set_parent(crate::telemetry::parent_from(request.headers()));
    }
    span
}

/// When the request timeout cuts the call: `--request-timeout-ms` after it began, or
/// the client's own `grpc-timeout` when shorter.
fn deadline(started: Instant, timeout: Duration, headers: &http::HeaderMap) -> Instant {
    let client = rpc::grpc_timeout(headers);
    started + client.map_or(timeout, |client| client.min(timeout))
}

/// One call's span and metrics, recorded once: when it is answered, refused or cut by
/// the request timeout, or, if none of these happens, when it is dropped.
struct Record {
    rpc: Rpc,
    started: Instant,
    span: Span,
    ended: bool,
}

impl Record {
    /// Refuses the call with `status` before it reaches its service.
    fn refuse<R: Default + Send + 'static, E: Send + 'static>(
        mut self,
        status: Status,
    ) -> Refused<R, E> {
        self.end(code_label(status.code()), status.code());
        refuse(status)
    }

    /// Records the answer: the outcome its handler gave, else its gRPC error, else
    /// [`OK`] (health, reflection).
    fn answered<R>(mut self, response: &http::Response<R>) {
        let extensions = response.extensions();
        let (label, code) = match (extensions.get::<Outcome>(), extensions.get::<Status>()) {
            (Some(Outcome(label)), _) => (*label, Code::Ok),
            (None, Some(status)) => (code_label(status.code()), status.code()),
            (None, None) => (OK, Code::Ok),
        };
        self.end(label, code);
    }

    fn end(&mut self, label: &'static str, code: Code) {
        self.ended = true;
        self.span.record("outcome", label);
        self.span.record("rpc.grpc.status_code", code as i32);
        if crate::telemetry::is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        crate::metrics::call(self.rpc.name(), self.started, label);
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Dropped unanswered: the client went away.
        self.end(CANCELLED, Code::Cancelled);
    }
}

/// The answer of a call refused before it reached its service.
type Refused<R, E> = Pin<Box<dyn Future<Output = Result<http::Response<R>, E>> + Send>>;

fn refuse<R: Default + Send + 'static, E: Send + 'static>(status: Status) -> Refused<R, E> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}

/// The layer of [`Admission`]: serves at most `max_in_flight` of the service's own calls
/// at once.
pub(crate) fn admission<S>(
    max_in_flight: usize,
) -> impl tower_layer::Layer<S, Service = Admission<S>> + Clone {
    let slots = Arc::new(Semaphore::new(max_in_flight));
    tower_layer::layer_fn(move |inner| Admission {
        inner,
        slots: slots.clone(),
    })
}

/// The second half of the call layer: for a call that takes a `--max-in-flight` slot
/// (the service's own unary methods, as the [`Rpc`] that [`Call`] named says), reads its
/// message whole (at most [`MAX_MESSAGE_BYTES`]), then takes a slot or refuses it with
/// RESOURCE_EXHAUSTED at once: queueing past the bound would only add latency to every
/// call behind it. The slot is held until the handler has answered.
#[derive(Clone)]
pub(crate) struct Admission<S> {
    inner: S,
    slots: Arc<Semaphore>,
}

impl<S, R> Service<http::Request<Body>> for Admission<S>
where
    S: Service<http::Request<Body>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let admitted = request
            .extensions()
            .get::<Rpc>()
            .is_some_and(|rpc| rpc.admitted());
        if !admitted {
            return Box::pin(self.inner.call(request));
        }
        // The service that was made ready serves this call; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let slots = self.slots.clone();
        Box::pin(async move {
            let (head, body) = request.into_parts();
            let message = match Limited::new(body, MAX_MESSAGE_BYTES + FRAME_HEADER_BYTES)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(Status::out_of_range(format!(
                        "message: larger than {MAX_MESSAGE_BYTES} bytes"
                    ))
                    .into_http());
                }
                Err(e) => {
                    let mut answer =
                        Status::cancelled(format!("the message did not arrive: {e}")).into_http();
                    answer.extensions_mut().insert(MessageBroken);
                    return Ok(answer);
                }
            };
            let Ok(_slot) = slots.try_acquire_owned() else {
                debug!("call shed: too many calls in flight");
                crate::metrics::call_refused("in_flight");
                return Ok(Status::resource_exhausted(
                    "overloaded: too many calls in flight; retry with backoff",
                )
                .into_http());
            };
            let request = http::Request::from_parts(head, Body::new(Full::new(message)));
            inner.call(request).await
        })
    }
}
