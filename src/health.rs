//! The background ping that drives `grpc.health.v1` for the store, and the flag that
//! lets Get and Set answer UNAVAILABLE at once while the store is known to be down.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{error, info, warn};

use crate::store::Store;

/// Whether the last ping reached the store.
#[derive(Debug, Default)]
pub struct StoreStatus {
    up: AtomicBool,
}

impl StoreStatus {
    /// A status that starts up or down.
    pub fn new(up: bool) -> Self {
        StoreStatus {
            up: AtomicBool::new(up),
        }
    }

    /// Whether the last ping reached the store.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }
}

/// Pings the store every `every` until `stop`, and reports each change of its state to
/// [`StoreStatus`] and, under each of `services`' names, to the health service (SPEC §5,
/// §11). Also runs the store's upkeep.
pub(crate) async fn watch_store<S: Store>(
    store: Arc<S>,
    status: Arc<StoreStatus>,
    reporter: HealthReporter,
    services: &'static [&'static str],
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut was_up = None;
    let mut last_problem = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        store.upkeep();
        let ping = store.ping().await;
        // A store that answers may still be unfit to serve (see readiness_problem);
        // it is checked whenever the store comes (back) up.
        let problem = match &ping {
            Ok(_) if was_up != Some(true) => store.readiness_problem().await,
            _ => None,
        };
        if problem.is_some() && problem != last_problem {
            error!(
                problem = problem.as_deref(),
                "refusing to serve from this store"
            );
        }
        let up = ping.is_ok() && problem.is_none();
        crate::metrics::store_state(up, ping.as_ref().ok().copied());
        last_problem = problem;
        status.set(up);
        if was_up == Some(up) {
            continue;
        }
        match &ping {
            Ok(latency) if up => {
                info!(
                    store = store.kind(),
                    ?latency,
                    "store is reachable: serving"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(
                store = store.kind(),
                error = %e,
                "store is unreachable: Get and Set answer UNAVAILABLE"
            ),
        }
        let serving = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in services {
            reporter.set_service_status(*service, serving).await;
        }
        was_up = Some(up);
    }
}
