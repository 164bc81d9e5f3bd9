//! A [`Store`] that wraps each call in a `store` span, so that a trace shows how much of
//! an RPC the store took (OpenTelemetry's database conventions: `db.system`,
//! `db.operation`).
//!
//! The service's store is wrapped, not the health loop's: a ping every second would
//! otherwise start a trace of its own. With no OpenTelemetry layer (no
//! `--otlp-endpoint`) and logs at info, the spans are disabled at their call site and
//! cost a branch.

use std::{future::Future, sync::Arc, time::Duration};

use tracing::Instrument;

use super::{Fence, Lookup, Store, StoreError, Stored};
use crate::{clock::Micros, entry::Session, keys::TokenHash};

/// A store, with a span around each call; it shares the store with the health loop.
pub struct Traced<S>(pub Arc<S>);

impl<S: Store> Traced<S> {
    /// The span of one store call. Never a token or a user id in it: the operation
    /// name says what was done, the RPC span says to what outcome.
    fn span(&self, name: &'static str, operation: &'static str) -> tracing::Span {
        tracing::debug_span!(
            "store",
            otel.name = name,
            otel.kind = "client",
            db.system = db_system(self.0.kind()),
            db.operation = operation,
        )
    }
}

/// OpenTelemetry's `db.system` for a store kind: `redis` for every Redis topology (the
/// kind says `redis-sentinel` or `redis-cluster`), `memory` for the embedded store.
fn db_system(kind: &'static str) -> &'static str {
    if kind.starts_with("redis") {
        "redis"
    } else {
        kind
    }
}

impl<S: Store> Store for Traced<S> {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn get(&self, token: &TokenHash) -> impl Future<Output = Result<Lookup, StoreError>> + Send {
        self.0.get(token).instrument(self.span("store.get", "get"))
    }

    fn set(
        &self,
        token: &TokenHash,
        session: &Session,
        fence: Option<Fence>,
    ) -> impl Future<Output = Result<Stored, StoreError>> + Send {
        self.0
            .set(token, session, fence)
            .instrument(self.span("store.set", "set"))
    }

    fn invalidate_token(
        &self,
        token: &TokenHash,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.0
            .invalidate_token(token)
            .instrument(self.span("store.invalidate_token", "invalidate_token"))
    }

    fn invalidate_user(
        &self,
        user_id: &str,
    ) -> impl Future<Output = Result<Micros, StoreError>> + Send {
        self.0
            .invalidate_user(user_id)
            .instrument(self.span("store.invalidate_user", "invalidate_user"))
    }

    fn refused(&self, token: &TokenHash) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.0
            .refused(token)
            .instrument(self.span("store.refused", "refused"))
    }

    fn refuse(&self, token: &TokenHash) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0
            .refuse(token)
            .instrument(self.span("store.refuse", "refuse"))
    }

    fn remember_session(
        &self,
        sid: &TokenHash,
        user_id: &str,
        session_expire: chrono::DateTime<chrono::Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0
            .remember_session(sid, user_id, session_expire)
            .instrument(self.span("store.remember_session", "remember_session"))
    }

    fn session_user(
        &self,
        sid: &TokenHash,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send {
        self.0
            .session_user(sid)
            .instrument(self.span("store.session_user", "session_user"))
    }

    fn ping(&self) -> impl Future<Output = Result<Duration, StoreError>> + Send {
        self.0.ping().instrument(self.span("store.ping", "ping"))
    }

    fn upkeep(&self) {
        self.0.upkeep();
    }

    fn readiness_problem(&self) -> impl Future<Output = Option<String>> + Send {
        self.0.readiness_problem()
    }
}
