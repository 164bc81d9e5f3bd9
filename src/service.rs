//! The `SessionCache` handlers: check the request, ask the store, shape the answer.
//!
//! This is the one place where store results and errors become gRPC: reads degrade to
//! an UNAVAILABLE outcome with status OK (the caller validates with the identity
//! provider instead), revocations that the store did not acknowledge fail with gRPC
//! UNAVAILABLE (the caller retries), and bad input fails with INVALID_ARGUMENT naming
//! the field, before anything is written.

use std::sync::Arc;

use chrono::{DateTime, Datelike, Utc};
use prost_types::Timestamp;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::{
    call::CallerName,
    clock::Micros,
    decision::{Decider, Decision, Refused, Via},
    entry::{Session, User},
    health::StoreStatus,
    keys::{TokenHash, TokenHasher},
    metrics,
    pb::{self, GetOutcome, SetOutcome, ValidateOutcome, session_cache_server::SessionCache},
    rpc::{self, OK, Outcome},
    store::{Fence, Lookup, Store, Stored},
    validate::Validator,
};

/// Longest token accepted, in bytes (SPEC §5).
pub use crate::decision::MAX_TOKEN_BYTES;
/// Longest user id accepted, in bytes (SPEC §5).
pub const MAX_USER_ID_BYTES: usize = 256;

/// The `SessionCache` service over a store.
///
/// Callers, admission, spans and metrics are the call layer's (`crate::call`), in front
/// of every method of every service: a handler here only answers, and says with what
/// outcome.
pub struct SessionCacheService<S> {
    store: Arc<S>,
    enabled: bool,
    status: Arc<StoreStatus>,
    hasher: TokenHasher,
    /// Validate's decision, shared with the edge checks (`crate::decision`).
    decider: Decider<S>,
}

impl<S: Store> SessionCacheService<S> {
    /// Serves `store`; `status` is kept by the health loop (see `health::watch_store`).
    /// With `enabled` false the store is never touched.
    pub fn new(store: Arc<S>, enabled: bool, status: Arc<StoreStatus>) -> Self {
        SessionCacheService {
            decider: Decider::new(store.clone(), enabled, status.clone()),
            store,
            enabled,
            status,
            hasher: TokenHasher::Sha256,
        }
    }

    /// Answers Validate through `validator` (by default Validate answers
    /// FAILED_PRECONDITION).
    pub fn with_validator(mut self, validator: Validator) -> Self {
        self.decider = self.decider.with_validator(Arc::new(validator));
        self
    }

    /// Hashes tokens with `hasher` (by default plain SHA-256).
    pub fn with_hasher(mut self, hasher: TokenHasher) -> Self {
        self.decider = self.decider.with_hasher(hasher.clone());
        self.hasher = hasher;
        self
    }

    /// Gives Validate's callers at most `timeout` (`--request-timeout-ms`), or their
    /// own `grpc-timeout` when shorter, for a provider slot and call.
    pub fn with_request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.decider = self.decider.with_request_timeout(timeout);
        self
    }

    /// Validate's decision, for the edge checks to share (same store, hasher and
    /// provider flights).
    pub fn decider(&self) -> Decider<S> {
        self.decider.clone()
    }

    fn check_token(&self, token: &str) -> Result<TokenHash, Status> {
        check_token_size(token)?;
        Ok(self.hasher.hash(token))
    }
}

/// What an answer says for the `outcome` metric label and span attribute; the labels
/// themselves are the RPC table's.
trait Labelled {
    fn label(&self) -> &'static str;
}

impl Labelled for pb::GetResponse {
    fn label(&self) -> &'static str {
        rpc::get_label(self.outcome())
    }
}

impl Labelled for pb::SetResponse {
    fn label(&self) -> &'static str {
        rpc::set_label(self.outcome())
    }
}

impl Labelled for pb::ValidateResponse {
    fn label(&self) -> &'static str {
        rpc::validate_label(self.outcome())
    }
}

macro_rules! labelled_ok {
    ($($response:ty),*) => {
        $(impl Labelled for $response {
            fn label(&self) -> &'static str {
                OK
            }
        })*
    };
}
labelled_ok!(
    pb::InvalidateTokenResponse,
    pb::InvalidateUserResponse,
    pb::HealthResponse
);

/// A handler's result as the call layer reads it: the answer, with its outcome.
fn answer<R: Labelled>(result: Result<R, Status>) -> Result<Response<R>, Status> {
    let reply = result?;
    let outcome = Outcome(reply.label());
    let mut response = Response::new(reply);
    response.extensions_mut().insert(outcome);
    Ok(response)
}

/// The caller's name, from the call layer, for the logs.
fn caller<T>(request: &Request<T>) -> Option<String> {
    request
        .extensions()
        .get::<CallerName>()
        .and_then(|CallerName(name)| name.clone())
}

#[tonic::async_trait]
impl<S: Store> SessionCache for SessionCacheService<S> {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        answer(self.handle_get(request.into_inner()).await)
    }

    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let caller = caller(&request);
        answer(self.handle_set(request.into_inner(), caller).await)
    }

    async fn invalidate_token(
        &self,
        request: Request<pb::InvalidateTokenRequest>,
    ) -> Result<Response<pb::InvalidateTokenResponse>, Status> {
        let caller = caller(&request);
        answer(
            self.handle_invalidate_token(request.into_inner(), caller)
                .await,
        )
    }

    async fn invalidate_user(
        &self,
        request: Request<pb::InvalidateUserRequest>,
    ) -> Result<Response<pb::InvalidateUserResponse>, Status> {
        let caller = caller(&request);
        answer(
            self.handle_invalidate_user(request.into_inner(), caller)
                .await,
        )
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        answer(self.handle_health().await)
    }

    async fn validate(
        &self,
        request: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let began = Instant::now();
        let deadline = self
            .decider
            .deadline(began, crate::rpc::grpc_timeout(request.metadata().as_ref()));
        answer(
            self.handle_validate(request.into_inner(), began, deadline)
                .await,
        )
    }
}

/// The handlers proper.
impl<S: Store> SessionCacheService<S> {
    async fn handle_get(&self, request: pb::GetRequest) -> Result<pb::GetResponse, Status> {
        let token = self.check_token(&request.token)?;
        let reply = if !self.enabled {
            outcome_only(GetOutcome::Disabled)
        } else if !self.status.is_up() {
            outcome_only(GetOutcome::Unavailable)
        } else {
            match self.store.get(&token).await {
                Ok(lookup) => get_response(lookup),
                Err(e) => {
                    metrics::store_error("Get");
                    debug!(token = token.short(), error = %e, "get: store failed");
                    outcome_only(GetOutcome::Unavailable)
                }
            }
        };
        Ok(reply)
    }

    async fn handle_set(
        &self,
        request: pb::SetRequest,
        caller: Option<String>,
    ) -> Result<pb::SetResponse, Status> {
        let token = self.check_token(&request.token)?;
        let session = check_session(request.user, request.session_expire)?;
        let fence =
            match request.fence.as_str() {
                "" => None,
                text => Some(text.parse::<Fence>().map_err(|_| {
                    Status::invalid_argument("fence: not a fence that Get returned")
                })?),
            };
        let outcome = if !self.enabled {
            Err(SetOutcome::Disabled)
        } else if !self.status.is_up() {
            Err(SetOutcome::Unavailable)
        } else {
            match self.store.set(&token, &session, fence).await {
                Ok(stored) => Ok(stored),
                Err(e) => {
                    metrics::store_error("Set");
                    debug!(token = token.short(), error = %e, "set: store failed");
                    Err(SetOutcome::Unavailable)
                }
            }
        };
        let (outcome, ttl_seconds) = match outcome {
            Ok(Stored::Stored { ttl_seconds }) => (SetOutcome::Stored, ttl_seconds),
            Ok(Stored::Expired) => (SetOutcome::Expired, 0),
            Ok(Stored::Stale) => (SetOutcome::Stale, 0),
            Ok(Stored::Revoked) => (SetOutcome::Revoked, 0),
            Ok(Stored::FenceOutOfRange) => {
                return Err(Status::invalid_argument(
                    "fence: not a fence that Get returned: later than the store's clock, or \
                     older than --marker-ttl-seconds (get a new one with Get)",
                ));
            }
            Err(outcome) => (outcome, 0),
        };
        debug!(token = token.short(), caller, ?outcome, ttl_seconds, "set");
        Ok(pb::SetResponse {
            outcome: outcome.into(),
            ttl_seconds,
        })
    }

    async fn handle_invalidate_token(
        &self,
        request: pb::InvalidateTokenRequest,
        caller: Option<String>,
    ) -> Result<pb::InvalidateTokenResponse, Status> {
        let token = self.check_token(&request.token)?;
        let deleted = if self.enabled {
            self.store
                .invalidate_token(&token)
                .await
                .map_err(|e| unacknowledged("InvalidateToken", &e))?
        } else {
            false
        };
        info!(token = token.short(), caller, deleted, "token invalidated");
        Ok(pb::InvalidateTokenResponse { deleted })
    }

    async fn handle_invalidate_user(
        &self,
        request: pb::InvalidateUserRequest,
        caller: Option<String>,
    ) -> Result<pb::InvalidateUserResponse, Status> {
        let user_id = &request.user_id;
        check_user_id("user_id", user_id)?;
        let at = if self.enabled {
            self.store
                .invalidate_user(user_id)
                .await
                .map_err(|e| unacknowledged("InvalidateUser", &e))?
        } else {
            Micros::from_datetime(Utc::now())
        };
        info!(user_id = %user_id, caller, "user invalidated");
        Ok(pb::InvalidateUserResponse {
            invalidated_at: at.to_datetime().map(timestamp),
        })
    }

    async fn handle_health(&self) -> Result<pb::HealthResponse, Status> {
        let (serving, store_latency) = if self.enabled {
            match self.store.ping().await {
                Ok(latency) => (true, prost_types::Duration::try_from(latency).ok()),
                Err(_) => (false, None),
            }
        } else {
            (true, None)
        };
        Ok(pb::HealthResponse {
            serving,
            store: self.store.kind().into(),
            enabled: self.enabled,
            store_latency,
        })
    }

    /// SPEC §9, decided by [`Decider::decide`], which the edge checks share.
    async fn handle_validate(
        &self,
        request: pb::ValidateRequest,
        began: Instant,
        deadline: Instant,
    ) -> Result<pb::ValidateResponse, Status> {
        let decision = self
            .decider
            .decide(&request.token, Via::Validate, began, deadline)
            .await;
        Ok(match decision {
            Ok(Decision::Valid(session)) => valid(session),
            Ok(Decision::Invalid) => validate_outcome(ValidateOutcome::Invalid),
            Ok(Decision::Unavailable(_)) => validate_outcome(ValidateOutcome::Unavailable),
            Err(refused @ Refused::NoProvider) => {
                return Err(Status::failed_precondition(format!(
                    "{refused}; or use Get and Set"
                )));
            }
            Err(refused) => return Err(Status::invalid_argument(refused.to_string())),
        })
    }
}

fn outcome_only(outcome: GetOutcome) -> pb::GetResponse {
    pb::GetResponse {
        outcome: outcome.into(),
        ..Default::default()
    }
}

fn user_message(user: User) -> pb::User {
    pb::User {
        id: user.id,
        email: user.email,
        name: user.name,
        email_verified: user.email_verified,
        tier: user.tier,
        created_at: Some(timestamp(user.created_at)),
        updated_at: Some(timestamp(user.updated_at)),
    }
}

fn valid(session: Session) -> pb::ValidateResponse {
    pb::ValidateResponse {
        outcome: ValidateOutcome::Valid.into(),
        user: Some(user_message(session.user)),
        session_expire: Some(timestamp(session.session_expire)),
    }
}

fn validate_outcome(outcome: ValidateOutcome) -> pb::ValidateResponse {
    pb::ValidateResponse {
        outcome: outcome.into(),
        ..Default::default()
    }
}

fn get_response(lookup: Lookup) -> pb::GetResponse {
    let (outcome, fence) = match lookup {
        Lookup::Hit(session) => {
            return pb::GetResponse {
                outcome: GetOutcome::Hit.into(),
                user: Some(user_message(session.user)),
                session_expire: Some(timestamp(session.session_expire)),
                fence: String::new(),
            };
        }
        Lookup::Miss(fence) => (GetOutcome::Miss, fence),
        Lookup::Expired(fence) => (GetOutcome::Expired, fence),
        Lookup::Invalidated(fence) => (GetOutcome::Invalidated, fence),
        Lookup::Corrupt(fence) => (GetOutcome::Corrupt, fence),
    };
    pb::GetResponse {
        outcome: outcome.into(),
        fence: fence.to_string(),
        ..Default::default()
    }
}

/// A revocation the store did not acknowledge: the caller must retry.
fn unacknowledged(call: &'static str, e: &crate::store::StoreError) -> Status {
    metrics::store_error(call);
    warn!(call, error = %e, "revocation not acknowledged by the store");
    Status::unavailable("the store did not acknowledge the invalidation; retry it")
}

fn check_token_size(token: &str) -> Result<(), Status> {
    if token.is_empty() {
        return Err(Status::invalid_argument("token: must not be empty"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Status::invalid_argument(format!(
            "token: longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    Ok(())
}

fn check_user_id(field: &str, user_id: &str) -> Result<(), Status> {
    if user_id.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field}: must not be empty"
        )));
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field}: longer than {MAX_USER_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

fn check_session(
    user: Option<pb::User>,
    session_expire: Option<Timestamp>,
) -> Result<Session, Status> {
    let user = user.ok_or_else(|| Status::invalid_argument("user: required"))?;
    check_user_id("user.id", &user.id)?;
    Ok(Session {
        user: User {
            created_at: instant("user.created_at", user.created_at)?,
            updated_at: instant("user.updated_at", user.updated_at)?,
            id: user.id,
            email: user.email,
            name: user.name,
            email_verified: user.email_verified,
            tier: user.tier,
        },
        session_expire: instant("session_expire", session_expire)?,
    })
}

/// A required timestamp that Python's `datetime` can also hold (years 1 to 9999).
fn instant(field: &str, t: Option<Timestamp>) -> Result<DateTime<Utc>, Status> {
    let t = t.ok_or_else(|| Status::invalid_argument(format!("{field}: required")))?;
    // Protobuf's range for nanos; chrono would also take 1e9.. as a leap second, which
    // Python cannot read back.
    if !(0..=999_999_999).contains(&t.nanos) {
        return Err(Status::invalid_argument(format!(
            "{field}: nanos must be from 0 to 999999999"
        )));
    }
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .filter(|d| (1..=9999).contains(&d.year()))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{field}: not a valid timestamp between years 1 and 9999"
            ))
        })
}

fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}
