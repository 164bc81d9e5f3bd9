//! What a shutdown does, in order: stop the health pinger so that nothing reports
//! SERVING again, tell probes NOT_SERVING, stop accepting (gRPC and HTTP) and let calls
//! in flight finish within `--shutdown-grace-seconds`, and only then let the metrics
//! endpoint, the reload watcher and the sweep end (when the caller drops
//! [`Background`]).

use std::time::Duration;

use tokio::sync::oneshot;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

use super::{Serving, background::Background};
use crate::{error::SetupError, rpc};

/// Drains `server` (which stops accepting when `drain` fires) for at most `grace`.
pub(super) async fn drain(
    background: &mut Background,
    reporter: &HealthReporter,
    drain: oneshot::Sender<()>,
    mut server: Serving<'_>,
    grace: Duration,
) -> Result<(), SetupError> {
    background.stop_pinger().await;
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    for service in rpc::STORE_BACKED {
        reporter
            .set_service_status(*service, ServingStatus::NotServing)
            .await;
    }
    info!(
        ?grace,
        "shutting down: no new calls; draining calls in flight"
    );
    let _ = drain.send(());
    background.stop_http();
    // Open streams (a health Watch) never end on their own: the drain is bounded.
    match tokio::time::timeout(grace, &mut server).await {
        Ok(()) => {}
        Err(_) => warn!(?grace, "drain did not finish in time; closing what is left"),
    }
    background.http_drained().await;
    info!("stopped");
    Ok(())
}
