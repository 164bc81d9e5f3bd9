//! The tower layer that counts each gRPC stream on its connection's [`Activity`], and
//! admits each call under the open-call bounds: its connection's share, its peer's
//! share, and the pool over all connections (part of which may be kept for
//! authenticated calls). A refused call is answered RESOURCE_EXHAUSTED at once, and its
//! reason counted.
//!
//! A connection with no open call is admitted even once its peer's other connections
//! have taken the peer's whole share: a caller is served on its own connection, a call
//! at a time, while other connections from its address misbehave. So a peer holds at
//! most its share plus one call per connection.
//!
//! A stream that ends before its answer was delivered, and before its deadline, was
//! reset (by the client, or by the server on an error): its connection counts it
//! ([`Activity::stream_ended`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;
use tonic::{
    Status,
    body::Body as GrpcBody,
    codegen::{Service, http},
};

use super::conn::{Activity, Connections};
use crate::{
    call::{CallerName, Deadline, MessageBroken},
    rpc::Rpc,
};

/// Counts each stream on its connection's [`Activity`] from its headers until its
/// answer's last frame is handed to HTTP/2 (or the stream is reset).
#[derive(Clone)]
pub(crate) struct Track<S> {
    inner: S,
    connections: Arc<Connections>,
}

impl<S> Track<S> {
    pub(crate) fn layer(
        connections: Arc<Connections>,
    ) -> impl tower_layer::Layer<S, Service = Track<S>> + Clone {
        tower_layer::layer_fn(move |inner| Track {
            inner,
            connections: connections.clone(),
        })
    }
}

/// Why a call was refused; the label of its count.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// Its connection holds its share.
    Connection,
    /// Its peer holds its share, and its connection a call already.
    Peer,
    /// What is left of the pool is kept for authenticated calls, or the connection
    /// holds a place kept for them.
    Reserved,
    /// The pool over all connections.
    Server,
}

impl Refusal {
    fn status(self) -> Status {
        crate::metrics::call_refused(match self {
            Refusal::Connection => "connection",
            Refusal::Peer => "peer",
            Refusal::Reserved => "reserved",
            Refusal::Server => "server",
        });
        Status::resource_exhausted(match self {
            Refusal::Connection => {
                "overloaded: this connection has too many answers not yet delivered \
                 (--max-open-calls-per-connection); retry with backoff"
            }
            Refusal::Peer => {
                "overloaded: this client address has too many answers not yet delivered \
                 (--max-open-calls-per-peer); retry with backoff"
            }
            Refusal::Reserved => {
                "overloaded: what is left is reserved for authenticated callers; retry \
                 with backoff"
            }
            Refusal::Server => "overloaded: too many answers not yet delivered; retry with backoff",
        })
    }
}

/// One stream's place in its connection's counts, released on drop.
struct InFlight {
    activity: Arc<Activity>,
    connections: Arc<Connections>,
    call: Option<(u64, u64)>,
    deadline: Option<Instant>,
    /// Its answer was handed to HTTP/2 whole.
    delivered: AtomicBool,
}

impl InFlight {
    /// Counts a stream on `activity`; `Err` when it is a call that the bounds refuse.
    fn start(
        connections: &Arc<Connections>,
        activity: Arc<Activity>,
        call: bool,
        authenticated: bool,
        deadline: Option<Instant>,
    ) -> Result<InFlight, Refusal> {
        let now = connections.now_ms();
        let call = if call {
            Some(admit(connections, &activity, authenticated, now)?)
        } else {
            None
        };
        {
            let mut streams = activity.streams.lock().unwrap();
            *streams = (streams.0 + 1, now);
        }
        connections.started.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight {
            activity,
            connections: connections.clone(),
            call,
            deadline,
            delivered: AtomicBool::new(false),
        })
    }
}

/// Takes a call's place on its connection, its peer and the pool, or says which is
/// full; the key of the call on its connection.
fn admit(
    connections: &Connections,
    activity: &Activity,
    authenticated: bool,
    now: u64,
) -> Result<(u64, u64), Refusal> {
    let limits = &connections.bounds.calls;
    if activity.probation.load(Ordering::Relaxed) {
        if !authenticated {
            activity.close("unauthenticated");
            return Err(Refusal::Reserved);
        }
        activity.probation.store(false, Ordering::Relaxed);
    }
    let mut calls = activity.calls.lock().unwrap();
    let mine = calls.len();
    if mine >= limits.per_connection {
        return Err(Refusal::Connection);
    }
    let peer = &activity.peer;
    if peer.calls.fetch_add(1, Ordering::Relaxed) >= limits.per_peer && mine > 0 {
        peer.calls.fetch_sub(1, Ordering::Relaxed);
        return Err(Refusal::Peer);
    }
    let pool = if authenticated {
        limits.max
    } else {
        limits.max - limits.reserved
    };
    let open = connections.open_calls.fetch_add(1, Ordering::Relaxed);
    if open >= pool {
        connections.open_calls.fetch_sub(1, Ordering::Relaxed);
        peer.calls.fetch_sub(1, Ordering::Relaxed);
        return Err(if open < limits.max {
            Refusal::Reserved
        } else {
            Refusal::Server
        });
    }
    let key = (now, activity.next_call.fetch_add(1, Ordering::Relaxed));
    calls.insert(key);
    Ok(key)
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.connections.now_ms();
        {
            let mut streams = self.activity.streams.lock().unwrap();
            *streams = (streams.0.saturating_sub(1), now);
        }
        if let Some(key) = self.call {
            self.activity.calls.lock().unwrap().remove(&key);
            self.activity.peer.calls.fetch_sub(1, Ordering::Relaxed);
            self.connections.open_calls.fetch_sub(1, Ordering::Relaxed);
        }
        // Dropped at or past its deadline: cut by the request timeout, not reset.
        let reset = !self.delivered.load(Ordering::Relaxed)
            && self
                .deadline
                .is_none_or(|deadline| Instant::now() < deadline);
        self.activity.stream_ended(&self.connections, reset);
    }
}

impl<S, B> Service<http::Request<B>> for Track<S>
where
    S: Service<http::Request<B>, Response = http::Response<GrpcBody>>,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<GrpcBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let Some(activity) = extensions.get::<Arc<Activity>>().cloned() else {
            // Served by no listener of this module (a test's own server): not counted.
            let answer = self.inner.call(request);
            return Box::pin(async move { Ok(answer.await?.map(Tracked::untracked)) });
        };
        // The call layer in front has named the method and its caller; a long-lived
        // stream (health Watch, reflection) may rightly stay open and is not a call.
        let call = !extensions.get::<Rpc>().is_some_and(|rpc| rpc.long_lived());
        let authenticated = extensions
            .get::<CallerName>()
            .is_some_and(|caller| caller.0.is_some());
        let deadline = extensions.get::<Deadline>().map(|d| d.0);
        let in_flight =
            match InFlight::start(&self.connections, activity, call, authenticated, deadline) {
                Ok(in_flight) => in_flight,
                Err(refusal) => {
                    let response = refusal.status().into_http().map(Tracked::untracked);
                    return Box::pin(std::future::ready(Ok(response)));
                }
            };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            if response.extensions().get::<MessageBroken>().is_some() {
                // Reset while its message arrived: counted now, as a reset.
                drop(in_flight);
                return Ok(response.map(Tracked::untracked));
            }
            Ok(response.map(|body| Tracked {
                body,
                in_flight: Some(in_flight),
            }))
        })
    }
}

/// An answer's body that keeps its stream counted until HTTP/2 drops it, and notes
/// whether it was delivered whole.
#[derive(Default)]
pub(crate) struct Tracked<B> {
    body: B,
    in_flight: Option<InFlight>,
}

impl<B> Tracked<B> {
    fn untracked(body: B) -> Tracked<B> {
        Tracked {
            body,
            in_flight: None,
        }
    }

    fn delivered(&self) {
        if let Some(in_flight) = &self.in_flight {
            in_flight.delivered.store(true, Ordering::Relaxed);
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            // Trailers end a gRPC answer; HTTP/2 polls no further after them.
            Poll::Ready(None) => this.delivered(),
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => this.delivered(),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        let end = self.body.is_end_stream();
        if end {
            self.delivered();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
