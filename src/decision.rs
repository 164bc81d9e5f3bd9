//! The one decision behind Validate, Envoy's `Check` and `/auth` (SPEC §9, §11): does
//! the cache, or else the identity provider, vouch for this token?
//!
//! The cache answers first; a miss asks the negative cache (a token the provider
//! refused a moment ago), then the provider through [`Validator`] (single flight, the
//! revocation rule, bounded provider load). The three callers differ only in how they
//! find the token and how they shape the answer; they share the store, the flights
//! and the provider slots, so a burst of edge checks and Validates of one token makes
//! one provider call.
//!
//! Every decision is counted in `session_cache_decisions_total{via, source, decision}`:
//! a family of its own rather than a label on the per-RPC families, because `/auth` is
//! no gRPC call, and because an operator asks of it what the RPC families cannot say:
//! how many checks of each path the cache answered without the provider.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tracing::debug;

use crate::{
    entry::Session,
    health::StoreStatus,
    keys::{TokenHash, TokenHasher},
    metrics,
    store::{Lookup, Store},
    validate::{Departure, Validator, Verdict},
};

/// Longest token accepted, in bytes (SPEC §5).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// What the cache and the provider say about a token.
#[derive(Debug)]
pub enum Decision {
    /// A session the cache or the provider vouches for.
    Valid(Session),
    /// The provider refused the token (now, or a moment ago: the negative cache).
    Invalid,
    /// Nobody could decide (the provider failing, slow, shed); the label is for logs.
    Unavailable(&'static str),
}

/// Why no decision was even attempted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("token: must not be empty")]
    EmptyToken,
    #[error("token: longer than {MAX_TOKEN_BYTES} bytes")]
    LongToken,
    #[error(
        "--idp: no identity provider is configured, so the service cannot validate tokens \
         it has not cached; start it with --idp"
    )]
    NoProvider,
}

/// Which path asked, for `session_cache_decisions_total{via}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `SessionCache/Validate`.
    Validate,
    /// `envoy.service.auth.v3.Authorization/Check`.
    Check,
    /// `/auth` on the HTTP listener.
    Auth,
}

impl Via {
    pub const ALL: [Via; 3] = [Via::Validate, Via::Check, Via::Auth];

    /// The `via` label; also the `rpc` label of `session_cache_store_errors_total`.
    pub fn label(self) -> &'static str {
        match self {
            Via::Validate => "Validate",
            Via::Check => "Check",
            Via::Auth => "/auth",
        }
    }
}

/// Where a decision came from, for `session_cache_decisions_total{source}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Cache,
    NegativeCache,
    Provider,
}

/// The `(source, decision)` label pairs a decision can have.
pub(crate) const OUTCOMES: [(&str, &str); 5] = [
    ("cache", "valid"),
    ("negative_cache", "invalid"),
    ("provider", "valid"),
    ("provider", "invalid"),
    ("provider", "unavailable"),
];

/// The store, the provider and the settings a decision needs. Cheap to clone: each
/// path holds its own, and all share the store and the flights.
pub struct Decider<S> {
    store: Arc<S>,
    enabled: bool,
    status: Arc<StoreStatus>,
    hasher: TokenHasher,
    validator: Option<Arc<Validator>>,
    request_timeout: Duration,
}

impl<S> Clone for Decider<S> {
    fn clone(&self) -> Self {
        Decider {
            store: self.store.clone(),
            enabled: self.enabled,
            status: self.status.clone(),
            hasher: self.hasher.clone(),
            validator: self.validator.clone(),
            request_timeout: self.request_timeout,
        }
    }
}

/// The default of `--request-timeout-ms`.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl<S: Store> Decider<S> {
    /// Decides from `store` (untouched when `enabled` is false; asked only while
    /// `status` says it is up), without a provider until [`Decider::with_validator`].
    pub fn new(store: Arc<S>, enabled: bool, status: Arc<StoreStatus>) -> Self {
        Decider {
            store,
            enabled,
            status,
            hasher: TokenHasher::Sha256,
            validator: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Asks the provider through `validator` on a miss.
    pub fn with_validator(mut self, validator: Arc<Validator>) -> Self {
        self.validator = Some(validator);
        self
    }

    /// Hashes tokens with `hasher`.
    pub fn with_hasher(mut self, hasher: TokenHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// A call's deadline is at most `timeout` after it began (`--request-timeout-ms`).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// When a call that began at `began` is given up: its own timeout (gRPC's
    /// `grpc-timeout`) if it sent one, and never later than `--request-timeout-ms`.
    pub fn deadline(&self, began: Instant, own: Option<Duration>) -> Instant {
        began + own.map_or(self.request_timeout, |own| own.min(self.request_timeout))
    }

    /// The hash a token is stored under.
    pub fn hash(&self, token: &str) -> TokenHash {
        self.hasher.hash(token)
    }

    /// SPEC §9: the cache, else the negative cache, else the identity provider. `began`
    /// is when the call began (the revocation rule compares it with provider calls);
    /// `deadline` bounds any wait for a provider slot.
    pub async fn decide(
        &self,
        token: &str,
        via: Via,
        began: Instant,
        deadline: Instant,
    ) -> Result<Decision, Refused> {
        if token.is_empty() {
            return Err(Refused::EmptyToken);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refused::LongToken);
        }
        let validator = self.validator.as_ref().ok_or(Refused::NoProvider)?;
        let hash = self.hasher.hash(token);
        let (source, decision) = self
            .lookup_then_ask(validator, token, &hash, via, began, deadline)
            .await;
        let label = match &decision {
            Decision::Valid(_) => "valid",
            Decision::Invalid => "invalid",
            Decision::Unavailable(why) => {
                debug!(token = hash.short(), via = via.label(), why, "undecided");
                "unavailable"
            }
        };
        metrics::decision(via.label(), source.label(), label);
        Ok(decision)
    }

    async fn lookup_then_ask(
        &self,
        validator: &Validator,
        token: &str,
        hash: &TokenHash,
        via: Via,
        began: Instant,
        deadline: Instant,
    ) -> (Source, Decision) {
        // The lookup: a hit answers; a miss gives the fence the answer is cached with.
        let mut fence = None;
        let caching = self.enabled && self.status.is_up();
        if caching {
            match self.store.get(hash).await {
                Ok(Lookup::Hit(session)) => return (Source::Cache, Decision::Valid(session)),
                Ok(
                    Lookup::Miss(f)
                    | Lookup::Expired(f)
                    | Lookup::Invalidated(f)
                    | Lookup::Corrupt(f),
                ) => fence = Some(f),
                Err(e) => {
                    metrics::store_error(via.label());
                    debug!(token = hash.short(), error = %e, "decision: lookup failed");
                }
            }
            if fence.is_some() {
                match self.store.refused(hash).await {
                    Ok(true) => {
                        metrics::validate_negative_hit();
                        return (Source::NegativeCache, Decision::Invalid);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        debug!(token = hash.short(), error = %e, "decision: negative lookup failed");
                    }
                }
            }
        }
        let verdict = validator
            .ask_by(token, hash, began, Some(deadline), || Departure {
                store: self.store.clone(),
                caching: caching && fence.is_some(),
                fence,
            })
            .await;
        let decision = match verdict {
            Verdict::Valid(session) => Decision::Valid(session),
            Verdict::Invalid => Decision::Invalid,
            Verdict::Unavailable(why) => Decision::Unavailable(why),
        };
        (Source::Provider, decision)
    }
}

/// Exports every decision series at 0 (SPEC §10), once the metrics are installed.
pub(crate) fn export_metrics() {
    metrics::decisions_exported(&Via::ALL.map(Via::label), &OUTCOMES);
}

impl Source {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::NegativeCache => "negative_cache",
            Source::Provider => "provider",
        }
    }
}
