//! The tower layer that counts each gRPC stream on its connection's activity, and
//! refuses a call past `--max-open-calls`.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use tonic::{
    Status,
    body::Body as GrpcBody,
    codegen::{Service, http},
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use super::conn::{Activity, Connections};
use crate::rpc::Rpc;

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

/// One stream's place in its connection's counts, released on drop.
struct InFlight {
    activity: Arc<Activity>,
    connections: Arc<Connections>,
    call: Option<(u64, u64)>,
}

impl InFlight {
    /// Counts a stream from `peer`; `Err` when it is a call and `--max-open-calls` are
    /// open.
    fn start(
        connections: &Arc<Connections>,
        peer: Option<SocketAddr>,
        call: bool,
    ) -> Result<Option<InFlight>, Status> {
        if call {
            let open = connections.open_calls.fetch_add(1, Ordering::Relaxed);
            if open >= connections.bounds.max_open_calls {
                connections.open_calls.fetch_sub(1, Ordering::Relaxed);
                return Err(Status::resource_exhausted(
                    "overloaded: too many answers not yet delivered; retry with backoff",
                ));
            }
        }
        let Some(activity) = peer.and_then(|peer| connections.activity(peer)) else {
            if call {
                connections.open_calls.fetch_sub(1, Ordering::Relaxed);
            }
            return Ok(None);
        };
        let now = connections.now_ms();
        {
            let mut streams = activity.streams.lock().unwrap();
            *streams = (streams.0 + 1, now);
        }
        let call = call.then(|| {
            let key = (now, activity.next_call.fetch_add(1, Ordering::Relaxed));
            activity.calls.lock().unwrap().insert(key);
            key
        });
        Ok(Some(InFlight {
            activity,
            connections: connections.clone(),
            call,
        }))
    }
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
            self.connections.open_calls.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn peer_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
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
        // The call layer in front has named the method; a long-lived stream (health Watch,
        // reflection) may rightly stay open and is not a call.
        let call = !request
            .extensions()
            .get::<Rpc>()
            .is_some_and(|rpc| rpc.long_lived());
        let in_flight = match InFlight::start(&self.connections, peer_of(&request), call) {
            Ok(in_flight) => in_flight,
            Err(refused) => {
                let response = refused.into_http().map(|body| Tracked {
                    body,
                    _in_flight: None,
                });
                return Box::pin(std::future::ready(Ok(response)));
            }
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// An answer's body that keeps its stream counted until HTTP/2 drops it.
#[derive(Default)]
pub(crate) struct Tracked<B> {
    body: B,
    _in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
