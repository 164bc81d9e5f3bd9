//! `GET /metrics` on `--metrics-listen`: the Prometheus text exposition of every metric
//! (any path answers the same), over HTTP/1.1, with the bounds of every listener
//! (`crate::transport`): the accept loop that backs off when out of descriptors, a cap
//! on connections and each peer's share of it ([`MAX_CONNECTIONS`]), a bounded request
//! head ([`MAX_HEAD_BYTES`]) that must arrive within `--idle-timeout-seconds` (which
//! also closes a connection idle between scrapes), and answers that must be read within
//! `--stall-timeout-seconds`.

use std::{sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::UPKEEP_EVERY,
    transport::{
        METRICS,
        accept::{accept, enter, identify},
        peers::{Limits, Peers},
        stall::Stall,
    },
};

/// Connections the metrics listener keeps open at once: a few Prometheus servers and
/// the odd person with curl need a handful; one peer may hold a quarter of them.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Largest request head (request line and headers) read; a larger one is answered 431.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The bound port, the recorder's handle, and the bounds, ready to serve.
pub(crate) struct MetricsEndpoint {
    pub(crate) listener: TcpListener,
    pub(crate) handle: PrometheusHandle,
    pub(crate) idle_timeout: Duration,
    pub(crate) stall_timeout: Duration,
}

impl MetricsEndpoint {
    /// Serves `GET /metrics` and compacts histograms until `stop` is cancelled; the
    /// connections it serves end with it.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let MetricsEndpoint {
            listener,
            handle,
            idle_timeout,
            stall_timeout,
        } = self;
        let peers = Peers::new(Limits {
            max_connections: MAX_CONNECTIONS,
            per_peer: crate::config::share(None, MAX_CONNECTIONS as u32) as usize,
            reserved: 0,
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(idle_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        let builder = Arc::new(builder);
        let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
        let mut connections = JoinSet::new();
        let mut last_logged = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = upkeep.tick() => handle.run_upkeep(),
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                (mut tcp, addr) = accept(&listener, &mut last_logged) => {
                    let Some(entered) = enter(&peers, METRICS) else {
                        continue;
                    };
                    let (handle, builder, peers) = (handle.clone(), builder.clone(), peers.clone());
                    connections.spawn(async move {
                        let Some((_, place)) = identify(&mut tcp, addr, entered, false, METRICS).await else {
                            return;
                        };
                        crate::metrics::connections_open(METRICS, peers.open());
                        let service = service_fn(move |_: Request<Incoming>| {
                            let handle = handle.clone();
                            async move { Ok::<_, std::convert::Infallible>(render(&handle)) }
                        });
                        let io = TokioIo::new(Stall::new(tcp, stall_timeout));
                        if let Err(e) = builder.serve_connection(io, service).await {
                            tracing::debug!(error = %e, "a metrics connection failed");
                        }
                        drop(place);
                        crate::metrics::connections_open(METRICS, peers.open());
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
