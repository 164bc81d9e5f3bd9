//! Live reload of the keys file (`--api-keys-file`): on SIGHUP, and when its content
//! changes on disk (Kubernetes replaces a mounted Secret by swapping a `..data` symlink,
//! which no inotify watch on the file would see). A file that fails its checks leaves
//! the keys in force, is logged and counted, and is tried again when it changes.

use std::{path::PathBuf, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{auth::Keys, server::load_keys};

/// How often the file's content is compared with what was last loaded.
pub(crate) const POLL_EVERY: Duration = Duration::from_secs(2);

/// Reloads the keys file at `path` into `keys` until `stop` is cancelled. `client_ca`
/// is whether client certificates are verified, as for the first load.
pub(crate) async fn watch_keys(
    path: PathBuf,
    client_ca: bool,
    keys: Keys,
    stop: CancellationToken,
) {
    let mut hangup = hangups();
    // The content last tried, loaded or not: a bad file is reported once, not at
    // every poll.
    let mut seen = std::fs::read(&path).ok();
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let signalled = tokio::select! {
            () = stop.cancelled() => return,
            () = hangup.recv() => true,
            _ = poll.tick() => false,
        };
        let content = std::fs::read(&path).ok();
        if !signalled && content == seen {
            continue;
        }
        seen = content;
        match load_keys(&path, client_ca) {
            Ok(auth) => {
                keys.store(std::sync::Arc::new(auth));
                crate::metrics::config_reload(true);
                info!(path = %path.display(), signalled, "keys file reloaded");
            }
            Err(e) => {
                crate::metrics::config_reload(false);
                warn!(error = %e, signalled, "keys file not reloaded; the keys in force stay");
            }
        }
    }
}

/// SIGHUP, as a stream of wake-ups; never wakes where there is no SIGHUP.
struct Hangups(Option<tokio::signal::unix::Signal>);

impl Hangups {
    async fn recv(&mut self) {
        match &mut self.0 {
            Some(signal) => {
                if signal.recv().await.is_none() {
                    self.0 = None;
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

fn hangups() -> Hangups {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(signal) => Hangups(Some(signal)),
        Err(e) => {
            warn!(error = %e, "no SIGHUP handler: the keys file is reloaded when it changes only");
            Hangups(None)
        }
    }
}
