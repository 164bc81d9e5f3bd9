//! `GET /metrics` on `--metrics-listen`: the Prometheus text exposition of every metric
//! (any path answers the same), over HTTP/1.1, accepting through the loop every listener
//! shares, so that running out of descriptors backs off instead of spinning.

use http_body_util::Full;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{metrics::UPKEEP_EVERY, transport::accept::accept};

/// The bound port and the recorder's handle, ready to serve.
pub(crate) struct MetricsEndpoint {
    pub(crate) listener: TcpListener,
    pub(crate) handle: PrometheusHandle,
}

impl MetricsEndpoint {
    /// Serves `GET /metrics` and compacts histograms until `stop` is cancelled; the
    /// connections it serves end with it.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let MetricsEndpoint { listener, handle } = self;
        let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
        let mut connections = JoinSet::new();
        let mut last_logged = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = upkeep.tick() => handle.run_upkeep(),
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                (stream, _) = accept(&listener, &mut last_logged) => {
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
