//! Revocations pushed by the identity provider (SPEC §12): routes of the HTTP listener
//! through which the provider tells the cache itself that sessions ended, for the
//! revocations that never pass through a backend (a browser signing out through the
//! provider's SDK, an admin blocking a user, a password reset by e-mail).
//!
//! - [`appwrite`]: `POST /webhooks/appwrite`, Appwrite's signed webhooks.
//! - [`backchannel`]: `POST /backchannel-logout`, OpenID Connect Back-Channel Logout 1.0,
//!   with the provider's keys from [`jwks`].
//!
//! Both revoke a user exactly as InvalidateUser does (the user's marker, which refuses
//! the Set of any validation that began before it, and `--revocation-replicas`), and
//! answer only once the store acknowledged it; otherwise 503 and nothing is claimed, so
//! that the provider's retry (or an operator's) is safe.

mod appwrite;
mod backchannel;
mod config;
mod jwks;
pub(crate) mod metrics;

pub use config::RevokeFlags;

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    error::SetupError,
    files::{read_certificates, read_secret},
    http::Route,
    idp::IdpFlags,
    keys::TokenHasher,
    store::{Store, StoreError},
};

/// The pushed revocations the flags turn on, their files read and checked.
pub(crate) struct Prepared {
    appwrite: Option<appwrite::Settings>,
    backchannel: Option<backchannel::Settings>,
}

/// Reads and checks what the flags name (the webhook's key, the JWKS client), before
/// anything binds; `clock_skew` is `--clock-skew-ms`, by which a logout token's times
/// may be off.
pub(crate) fn prepare(
    flags: &RevokeFlags,
    idp: &IdpFlags,
    clock_skew: Duration,
) -> Result<Prepared, SetupError> {
    let appwrite = match (
        &flags.appwrite_webhook_key_file,
        &flags.appwrite_webhook_url,
    ) {
        (Some(path), Some(url)) => {
            let key = read_secret(path, "--appwrite-webhook-key-file")?.into_bytes();
            Some(appwrite::Settings::new(&key, url.clone()))
        }
        _ => None,
    };
    let backchannel = match (
        &flags.oidc_issuer,
        &flags.oidc_audience,
        &flags.oidc_jwks_url,
    ) {
        (Some(issuer), Some(audience), Some(url)) => {
            let roots = match &idp.idp_ca_file {
                Some(path) => read_certificates(path, "--idp-ca-file")?.1,
                None => Vec::new(),
            };
            let client = crate::idp::http_client(idp.timeout(), 4, url, roots)?;
            Some(backchannel::Settings::new(
                issuer.clone(),
                audience.clone(),
                jwks::Jwks::new(client, url.clone()),
                clock_skew,
            ))
        }
        _ => None,
    };
    Ok(Prepared {
        appwrite,
        backchannel,
    })
}

impl Prepared {
    /// Whether Validate should record the provider's session ids, for logout tokens
    /// that name only the session.
    pub(crate) fn records_session_ids(&self) -> bool {
        self.backchannel.is_some()
    }

    /// The routes, revoking in `store`: session ids are hashed with `hasher`; with
    /// `enabled` false (`--enabled false`) a revocation succeeds without the store, as
    /// InvalidateUser does.
    pub(crate) fn routes<S: Store>(
        self,
        store: Arc<S>,
        hasher: TokenHasher,
        enabled: bool,
    ) -> Vec<Arc<dyn Route>> {
        metrics::export(self.appwrite.is_some(), self.backchannel.is_some());
        let revoker = Revoker { store, enabled };
        let mut routes: Vec<Arc<dyn Route>> = Vec::new();
        if let Some(settings) = self.appwrite {
            routes.push(Arc::new(appwrite::Webhook::new(settings, revoker.clone())));
        }
        if let Some(settings) = self.backchannel {
            routes.push(Arc::new(backchannel::Backchannel::new(
                settings,
                revoker.clone(),
                hasher,
            )));
        }
        routes
    }
}

/// Revokes users in the store, as InvalidateUser does.
struct Revoker<S> {
    store: Arc<S>,
    enabled: bool,
}

impl<S> Clone for Revoker<S> {
    fn clone(&self) -> Self {
        Revoker {
            store: self.store.clone(),
            enabled: self.enabled,
        }
    }
}

impl<S: Store> Revoker<S> {
    /// Moves `user_id`'s marker to now, waiting for `--revocation-replicas`; `Err` when
    /// the store did not acknowledge it (the write may have happened; a retry is safe).
    async fn revoke(&self, user_id: &str, source: &'static str) -> Result<(), StoreError> {
        if self.enabled
            && let Err(e) = self.store.invalidate_user(user_id).await
        {
            warn!(source, error = %e, "a pushed revocation was not acknowledged by the store");
            return Err(e);
        }
        info!(user_id = %user_id, source, "user revoked by the identity provider");
        Ok(())
    }
}

/// Whether `user_id` is one InvalidateUser would take: not empty, at most
/// [`crate::service::MAX_USER_ID_BYTES`].
fn user_id_ok(user_id: &str) -> bool {
    !user_id.is_empty() && user_id.len() <= crate::service::MAX_USER_ID_BYTES
}
