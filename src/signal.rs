//! The shutdown signal: SIGTERM (what Kubernetes and most supervisors send) or SIGINT.
//! SIGHUP never stops the process: it reloads the keys file (see `reload`).

use std::future::Future;

/// Installs the handlers at once (a signal that arrives during start-up is not lost,
/// nor does it kill the process) and returns a future that completes on the first
/// SIGTERM or SIGINT. Must be called inside the runtime.
pub fn shutdown() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
        // Once handled, SIGHUP no longer kills the process, whether or not a keys file
        // is reloaded on it.
        let hangup = signal(SignalKind::hangup()).expect("SIGHUP handler installs");
        async move {
            let _hangup = hangup;
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("interrupt received");
        }
    }
}
