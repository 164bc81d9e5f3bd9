//! The OpenID provider's signing keys (`--oidc-jwks-url`), fetched with the identity
//! providers' HTTP client and kept by key ID.
//!
//! The set is fetched when a logout token first needs it, and again when a token names
//! a key ID the set lacks (the provider rotated its keys): at most once every
//! [`REFETCH_EVERY`], one fetch at a time, so that a flood of tokens with unknown key IDs
//! costs the provider one request per interval. A token that needs a fetch sooner waits
//! for the interval to pass (within its request's time), so that a rotation right after
//! a fetch is followed rather than refused; a key ID that a fetch begun after the token
//! arrived did not bring is unknown. Tokens signed with known keys never wait. A set
//! that cannot be had (the provider down, slow past `--idp-timeout-ms`, or answering
//! something that is not a key set) makes the token unverifiable for now, never
//! refused.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use tokio::{sync::Mutex, time::Instant};
use tracing::{info, warn};

use super::metrics;

/// Least time between two fetches of the set.
pub(super) const REFETCH_EVERY: Duration = Duration::from_secs(5);

/// Why no key was found.
#[derive(Debug)]
pub(super) enum KeyError {
    /// The set, fetched again (or within [`REFETCH_EVERY`]), has no key with that ID.
    Unknown,
    /// The set could not be had; the text says why (it holds no secret).
    Unavailable(String),
}

/// The provider's key set, as last fetched.
pub(super) struct Jwks {
    client: reqwest::Client,
    url: String,
    keys: RwLock<Option<Arc<JwkSet>>>,
    /// Held while fetching: when the last fetch began, and whether it failed.
    fetching: Mutex<Attempt>,
}

#[derive(Default)]
struct Attempt {
    at: Option<Instant>,
    failed: Option<String>,
}

impl Jwks {
    pub(super) fn new(client: reqwest::Client, url: String) -> Jwks {
        Jwks {
            client,
            url,
            keys: RwLock::new(None),
            fetching: Mutex::new(Attempt::default()),
        }
    }

    /// The keys that may have signed a token whose header names `kid` (every key of the
    /// set when it names none), fetching the set when it lacks them.
    pub(super) async fn candidates(&self, kid: Option<&str>) -> Result<Vec<Jwk>, KeyError> {
        if let Some(found) = self.lookup(kid) {
            return Ok(found);
        }
        let arrived = Instant::now();
        let mut attempt = self.fetching.lock().await;
        // Another request may have fetched it while this one waited.
        if let Some(found) = self.lookup(kid) {
            return Ok(found);
        }
        // A fetch begun since this token arrived did not bring its key.
        if attempt.at.is_some_and(|at| at >= arrived) {
            return Err(match &attempt.failed {
                Some(why) => KeyError::Unavailable(why.clone()),
                None => KeyError::Unknown,
            });
        }
        // The lock is held while waiting: whoever queues behind it is answered by this
        // fetch.
        if let Some(at) = attempt.at {
            tokio::time::sleep_until(at + REFETCH_EVERY).await;
        }
        attempt.at = Some(Instant::now());
        match self.fetch().await {
            Ok(set) => {
                metrics::jwks_fetch(true);
                info!(
                    keys = set.keys.len(),
                    "fetched the OpenID provider's key set"
                );
                attempt.failed = None;
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
                self.lookup(kid).ok_or(KeyError::Unknown)
            }
            Err(why) => {
                metrics::jwks_fetch(false);
                warn!(
                    error = why,
                    "cannot fetch the OpenID provider's key set (--oidc-jwks-url)"
                );
                attempt.failed = Some(why.clone());
                Err(KeyError::Unavailable(why))
            }
        }
    }

    /// The keys for `kid` in the set in hand; `None` when there is no set or no such
    /// key.
    fn lookup(&self, kid: Option<&str>) -> Option<Vec<Jwk>> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let found: Vec<Jwk> = match kid {
            Some(kid) => keys
                .keys
                .iter()
                .filter(|key| key.common.key_id.as_deref() == Some(kid))
                .cloned()
                .collect(),
            None => keys.keys.clone(),
        };
        (!found.is_empty()).then_some(found)
    }

    async fn fetch(&self) -> Result<JwkSet, String> {
        let reply = crate::idp::send(
            self.client
                .get(&self.url)
                .header("accept", "application/jwk-set+json, application/json"),
        )
        .await
        .map_err(|e| e.to_string())?;
        if reply.status != reqwest::StatusCode::OK {
            return Err(format!("HTTP {}", reply.status.as_u16()));
        }
        let set: JwkSet = serde_json::from_slice(&reply.body)
            .map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        if set.keys.is_empty() {
            return Err("the key set has no key".into());
        }
        Ok(set)
    }
}
