//! The tasks that run beside the server: the store's health pinger, the HTTP listener,
//! the metrics endpoint, the reload watcher and the connection sweep. Each ends with a
//! cancellation token that a drop guard cancels on every way out. The pinger has a token
//! of its own, cancelled first when a drain begins, so that it cannot report SERVING
//! again; the HTTP listener stops accepting with the gRPC port and drains beside it; the
//! others live until the drain ends, so that its last seconds stay observable.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic_health::server::HealthReporter;

use super::metrics_endpoint::MetricsEndpoint;
use crate::{
    health::{StoreStatus, watch_store},
    reload::{self, Reloadable},
    rpc,
    store::Store,
    transport::Connections,
};

/// The running tasks; dropping it ends them all.
pub(super) struct Background {
    pinger: Option<JoinHandle<()>>,
    pinger_stop: CancellationToken,
    _pinger_guard: DropGuard,
    http: Option<JoinHandle<()>>,
    http_stop: CancellationToken,
    _http_guard: DropGuard,
    _others: DropGuard,
}

/// What the tasks need.
pub(super) struct Tasks<S> {
    pub store: Arc<S>,
    /// The store's state as the pinger last saw it; `None` when caching is off and
    /// nothing is pinged.
    pub status: Option<Arc<StoreStatus>>,
    pub reporter: HealthReporter,
    pub health_interval: Duration,
    pub metrics: Option<MetricsEndpoint>,
    /// The HTTP listener, if `--http-listen` is given.
    pub http: Option<crate::http::Listener>,
    /// How long the HTTP listener's requests may take to finish in a drain.
    pub shutdown_grace: Duration,
    pub reloadable: Vec<Reloadable>,
    pub connections: Arc<Connections>,
}

impl Background {
    /// Starts every task.
    pub(super) fn start<S: Store>(tasks: Tasks<S>) -> Background {
        let others = CancellationToken::new();
        if let Some(endpoint) = tasks.metrics {
            tokio::spawn(endpoint.run(others.clone()));
        }
        tokio::spawn(reload::watch(tasks.reloadable, others.clone()));
        tokio::spawn(tasks.connections.sweep(others.clone()));
        let http_stop = CancellationToken::new();
        let http = tasks
            .http
            .map(|listener| tokio::spawn(listener.run(http_stop.clone(), tasks.shutdown_grace)));
        let pinger_stop = CancellationToken::new();
        let pinger = tasks.status.map(|status| {
            tokio::spawn(watch_store(
                tasks.store,
                status,
                tasks.reporter,
                rpc::STORE_BACKED,
                tasks.health_interval,
                pinger_stop.clone(),
            ))
        });
        Background {
            pinger,
            _pinger_guard: pinger_stop.clone().drop_guard(),
            pinger_stop,
            http,
            _http_guard: http_stop.clone().drop_guard(),
            http_stop,
            _others: others.drop_guard(),
        }
    }

    /// The HTTP listener stops accepting and lets its requests in flight finish within
    /// the grace it was given.
    pub(super) fn stop_http(&self) {
        self.http_stop.cancel();
    }

    /// Waits until the HTTP listener has drained (at most its grace).
    pub(super) async fn http_drained(&mut self) {
        if let Some(http) = self.http.take() {
            let _ = http.await;
        }
    }

    /// Stops the health pinger and waits until it has stopped: from here on nothing
    /// reports the store SERVING.
    pub(super) async fn stop_pinger(&mut self) {
        self.pinger_stop.cancel();
        if let Some(pinger) = self.pinger.take() {
            let _ = pinger.await;
        }
    }
}
