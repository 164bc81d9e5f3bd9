//! The pushed revocations' series (besides the HTTP listener's per path and status).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `session_cache_pushed_revocations_total` | counter | `source` (`appwrite`, `backchannel`), `outcome` (`revoked`, `ignored`, `refused`, `unavailable`) |
//! | `session_cache_oidc_jwks_fetches_total` | counter | `result` (`ok`, `failed`) |

use metrics::{counter, describe_counter};

/// What became of one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The user was revoked, acknowledged by the store.
    Revoked,
    /// An event that revokes nobody (Appwrite's other events).
    Ignored,
    /// Refused: a bad signature, body or token; nothing changed.
    Refused,
    /// The store or the provider's keys could not be had; nothing is claimed.
    Unavailable,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Revoked => "revoked",
            Outcome::Ignored => "ignored",
            Outcome::Refused => "refused",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// Describes the families; called by `crate::metrics::install`.
pub(crate) fn describe() {
    describe_counter!(
        "session_cache_pushed_revocations_total",
        "Revocations pushed by the identity provider (Appwrite webhooks, back-channel \
         logout tokens), by what became of them"
    );
    describe_counter!(
        "session_cache_oidc_jwks_fetches_total",
        "Fetches of the OpenID provider's key set (--oidc-jwks-url), by result"
    );
}

/// Exports the series of the sources in use at 0.
pub(crate) fn export(appwrite: bool, backchannel: bool) {
    if appwrite {
        for outcome in [
            Outcome::Revoked,
            Outcome::Ignored,
            Outcome::Refused,
            Outcome::Unavailable,
        ] {
            counter!("session_cache_pushed_revocations_total", "source" => "appwrite", "outcome" => outcome.label())
                .absolute(0);
        }
    }
    if backchannel {
        for outcome in [Outcome::Revoked, Outcome::Refused, Outcome::Unavailable] {
            counter!("session_cache_pushed_revocations_total", "source" => "backchannel", "outcome" => outcome.label())
                .absolute(0);
        }
        for result in ["ok", "failed"] {
            counter!("session_cache_oidc_jwks_fetches_total", "result" => result).absolute(0);
        }
    }
}

/// Records one delivery.
pub(crate) fn delivery(source: &'static str, outcome: Outcome) {
    counter!("session_cache_pushed_revocations_total", "source" => source, "outcome" => outcome.label())
        .increment(1);
}

/// Records one fetch of the key set.
pub(crate) fn jwks_fetch(ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!("session_cache_oidc_jwks_fetches_total", "result" => result).increment(1);
}
