//! Live reload of the files that hold credentials: the keys file (`--api-keys-file`)
//! and the server's TLS (`--tls-cert`, `--tls-key`, `--tls-client-ca`). Each is reloaded
//! on SIGHUP and when the content of one of its files changes on disk (Kubernetes
//! replaces a mounted Secret by swapping a `..data` symlink, which no inotify watch on
//! the file would see). A set of files that fails its checks (half-written, a key that
//! is not the certificate's yet) leaves the configuration in force, is logged and
//! counted, and is tried again when its files change.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{auth, error::SetupError, tls};

/// How often the files' content is compared with what was last loaded.
pub(crate) const POLL_EVERY: Duration = Duration::from_secs(2);

/// One part of the configuration that can be reloaded, and the files it reads.
pub(crate) struct Reloadable {
    /// The `config` label of `session_cache_config_reloads_total`.
    config: &'static str,
    files: Vec<PathBuf>,
    /// Reads the files, checks them, and swaps the result in; on `Err` nothing changes.
    reload: Box<dyn Fn() -> Result<(), SetupError> + Send + Sync>,
}

impl Reloadable {
    /// The keys file at `path`; `client_ca` is whether client certificates are
    /// verified, as for the first load.
    pub(crate) fn keys(path: PathBuf, client_ca: bool, current: auth::Current) -> Reloadable {
        let file = path.clone();
        Reloadable {
            config: "api_keys",
            files: vec![path],
            reload: Box::new(move || {
                current.store(Arc::new(auth::load(&file, client_ca)?));
                Ok(())
            }),
        }
    }

    /// The server's certificate, key and client CA, swapped into `current` together:
    /// new handshakes get them, connections already up keep theirs.
    pub(crate) fn tls(
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
        current: tls::Current,
    ) -> Reloadable {
        let mut files = vec![cert.clone(), key.clone()];
        files.extend(client_ca.clone());
        Reloadable {
            config: "tls",
            files,
            reload: Box::new(move || {
                let config = tls::server_config(&tls::Files {
                    cert: &cert,
                    key: &key,
                    client_ca: client_ca.as_deref(),
                })?;
                current.store(config);
                Ok(())
            }),
        }
    }

    /// The content of the files now; a file that cannot be read counts as `None`.
    fn content(&self) -> Vec<Option<Vec<u8>>> {
        self.files.iter().map(|f| std::fs::read(f).ok()).collect()
    }
}

/// Reloads each of `parts` on SIGHUP and when its files change, until `stop` is
/// cancelled.
pub(crate) async fn watch(parts: Vec<Reloadable>, stop: CancellationToken) {
    // Installed even with nothing to reload: SIGHUP must not end the process.
    let mut hangup = hangups();
    // The content last tried, loaded or not: a bad file is reported once, not at
    // every poll.
    let mut seen: Vec<_> = parts.iter().map(Reloadable::content).collect();
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let signalled = tokio::select! {
            () = stop.cancelled() => return,
            () = hangup.recv() => true,
            _ = poll.tick() => false,
        };
        for (part, seen) in parts.iter().zip(seen.iter_mut()) {
            let content = part.content();
            if !signalled && content == *seen {
                continue;
            }
            *seen = content;
            let config = part.config;
            match (part.reload)() {
                Ok(()) => {
                    crate::metrics::config_reload(config, true);
                    info!(config, signalled, "reloaded");
                }
                Err(e) => {
                    crate::metrics::config_reload(config, false);
                    warn!(error = %e, config, signalled, "not reloaded; the configuration in force stays");
                }
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
            warn!(error = %e, "no SIGHUP handler: files are reloaded when they change only");
            Hangups(None)
        }
    }
}
