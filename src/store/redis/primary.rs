//! Where the Redis primary is, as far as the pool knows: the epoch that every pooled
//! connection must match (moved when the primary may have moved, so that bb8 replaces
//! every older connection), the address of the last dial, and the address the
//! Sentinels last announced.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use tracing::{info, warn};

/// What the pool knows of the primary: the epoch that connections must match, the
/// address of the last dial (for the Sentinel watchers' comparison and the logs), and
/// the address the Sentinels last announced in a `+switch-master`.
#[derive(Debug, Default)]
pub(crate) struct Primary {
    epoch: AtomicU64,
    address: Mutex<Option<String>>,
    announced: Mutex<Option<String>>,
}

impl Primary {
    /// The primary may have moved since `seen` (the epoch of the connection that
    /// noticed): every connection of that epoch or older is replaced. Noticed by many
    /// calls at once, it moves the epoch once.
    pub(crate) fn moved(&self, seen: u64, why: &str) {
        if self
            .epoch
            .compare_exchange(seen, seen + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            warn!(
                why,
                primary = self.address().as_deref(),
                "the Redis primary may have moved: replacing connections"
            );
            crate::metrics::redis_primary_moved();
        }
    }

    /// A Sentinel names `address` as the primary: connections to anywhere else are
    /// replaced.
    pub(crate) fn named(&self, address: &str) {
        let current = self.address();
        if current.as_deref() != Some(address) {
            let seen = self.epoch();
            self.moved(seen, "a Sentinel names another primary");
        }
    }

    /// A Sentinel announced a failover to `address` (`+switch-master`): the next dials
    /// try it first. Right after a failover the Sentinels disagree, and one that has
    /// not switched yet may even report the new epoch with the old address; the
    /// announcement is the one thing that names the new primary for sure.
    pub(crate) fn switched(&self, address: &str) {
        // Every Sentinel announces the same failover: the first one moves the epoch.
        let previous = self
            .announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(address.to_owned());
        if previous.as_deref() != Some(address) {
            self.named(address);
        }
    }

    /// The address of the last `+switch-master`, if any.
    pub(crate) fn announced(&self) -> Option<String> {
        self.announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The address of the last dial, `host:port`.
    pub(crate) fn address(&self) -> Option<String> {
        self.address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn dialled(&self, address: String) {
        let mut current = self.address.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_deref() != Some(address.as_str()) {
            info!(primary = %address, "connected to the Redis primary");
            *current = Some(address);
        }
    }
}
