//! `envoy.service.auth.v3.Authorization/Check` (SPEC §11): Envoy's and Istio's external
//! authorization, answered with Validate's decision. Like every gRPC method it is served
//! behind the call layer (`crate::call`: the caller's `reader` role, admission, span,
//! metrics); the handler only answers, and says whether it allowed.
//!
//! | the decision | the answer |
//! |---|---|
//! | VALID | OK, with the identity headers set (overwriting) and the client's other headers under the prefix removed |
//! | no token, INVALID | denied: HTTP 401, `www-authenticate: Bearer` |
//! | UNAVAILABLE | gRPC UNAVAILABLE: Envoy's `failure_mode_allow` / `status_on_error` decide (deny, as deployed) |
//! | no `attributes.request.http` | gRPC INVALID_ARGUMENT naming the field |
//!
//! Envoy applies `headers_to_remove` after it sets `headers`, so a header the answer
//! sets is never also in `headers_to_remove`. Each header is set with `append: false`,
//! which every Envoy version reads as "overwrite" (newer ones read an unset `append` as
//! `append_action`'s default, APPEND_IF_EXISTS_OR_ADD, which would keep a client's
//! spoofed value beside ours).

use std::{future::Future, pin::Pin, sync::Arc};

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::{
    Carrier, Extractor, Found, Headers, Identity,
    envoy_pb::{
        envoy::{
            config::core::v3::{HeaderValue, HeaderValueOption},
            service::auth::v3::{
                AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
                attribute_context::HttpRequest, authorization_server::Authorization,
                check_response::HttpResponse,
            },
            r#type::v3::{HttpStatus, StatusCode},
        },
        google::rpc,
    },
};
use crate::{
    decision::{Decider, Decision, Refused, Via},
    entry::Session,
    rpc::{CHECK_OUTCOMES, Outcome},
    store::Store,
};

/// gRPC's UNAUTHENTICATED, the status of a denial (google.rpc.Code).
const UNAUTHENTICATED: i32 = 16;

/// What Check needs besides the decision: where tokens are, which headers to set.
#[derive(Clone, Debug)]
pub struct EdgeSettings {
    pub extractor: Extractor,
    pub identity: Identity,
    pub strip_credentials: bool,
}

/// The `Authorization` service over Validate's decision.
pub struct CheckService<S> {
    decider: Decider<S>,
    settings: Arc<EdgeSettings>,
}

impl<S: Store> CheckService<S> {
    pub fn new(decider: Decider<S>, settings: Arc<EdgeSettings>) -> Self {
        CheckService { decider, settings }
    }
}

// Written out rather than with `async_trait`: the request (Envoy's message, large) is
// read before the future is made, so the boxed future holds only the token and the
// changes, and is not copied with the request inside it.
impl<S: Store> Authorization for CheckService<S> {
    fn check<'life0, 'async_trait>(
        &'life0 self,
        request: Request<CheckRequest>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<CheckResponse>, Status>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let began = Instant::now();
        let deadline = self
            .decider
            .deadline(began, crate::rpc::grpc_timeout(request.metadata().as_ref()));
        let read = self.read(request.get_ref());
        drop(request);
        Box::pin(async move {
            let answer = match read? {
                Ok((token, changes)) => self.decide(token, changes, began, deadline).await?,
                Err(denial) => denial,
            };
            // The call layer (`crate::call`) counts and traces the call with this
            // outcome.
            let outcome = Outcome(outcome_label(&answer));
            let mut response = Response::new(answer);
            response.extensions_mut().insert(outcome);
            Ok(response)
        })
    }
}

/// What an allowed answer changes besides the identity headers, read from the request
/// before the decision, so that the request (Envoy's large message) is not held while
/// the decision is awaited.
struct Changes {
    /// The client's headers under the prefix, and the token's when stripped.
    remove: Vec<String>,
    /// The `cookie` header without the session cookie, when it is stripped and
    /// others are left.
    cookie: Option<String>,
}

impl<S: Store> CheckService<S> {
    /// The decision about `token`, as Check's answer.
    async fn decide(
        &self,
        token: String,
        changes: Changes,
        began: Instant,
        deadline: Instant,
    ) -> Result<CheckResponse, Status> {
        match self
            .decider
            .decide(&token, Via::Check, began, deadline)
            .await
        {
            Ok(Decision::Valid(session)) => Ok(self.allowed(&session, changes)),
            Ok(Decision::Invalid) => Ok(denied("the session is not valid")),
            Ok(Decision::Unavailable(_)) => Err(Status::unavailable(
                "the identity provider or the store cannot decide now; retry",
            )),
            Err(Refused::NoProvider) => {
                Err(Status::failed_precondition(Refused::NoProvider.to_string()))
            }
            // A token no session can have (over 4 KiB): Validate would refuse it.
            Err(refused) => Ok(denied(refused_reason(&refused))),
        }
    }

    /// The token and what an allowed answer changes; or a denial; or bad input.
    fn read(
        &self,
        request: &CheckRequest,
    ) -> Result<Result<(String, Changes), CheckResponse>, Status> {
        let http = http_request(request)?;
        let headers = EnvoyHeaders::of(http);
        let (token, carrier) = match self.settings.extractor.find(&headers) {
            Found::Token { token, carrier } => (token.into_owned(), carrier),
            Found::Nothing => return Ok(Err(denied("no session token"))),
            Found::Malformed(why) => {
                debug!(why, "check: denied a malformed request");
                return Ok(Err(denied(why)));
            }
        };
        let identity = &self.settings.identity;
        let prefix = identity.prefix();
        // The client's headers under the prefix that the answer does not set.
        let mut remove: Vec<String> = headers
            .names()
            // Only names under the prefix are copied (and lowercased).
            .filter(|name| {
                name.len() >= prefix.len()
                    && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
            })
            .map(str::to_ascii_lowercase)
            .filter(|name| !identity.names().iter().any(|own| own == name))
            .collect();
        let mut cookie = None;
        if self.settings.strip_credentials {
            match &carrier {
                Carrier::Bearer => remove.push("authorization".into()),
                Carrier::Header(name) => remove.push(name.clone()),
                Carrier::Cookie(name) => match without_cookie(&headers, name) {
                    // Set, so never also removed (Envoy removes after it sets).
                    Some(rest) => cookie = Some(rest),
                    None => remove.push("cookie".into()),
                },
            }
        }
        remove.sort();
        remove.dedup();
        Ok(Ok((token, Changes { remove, cookie })))
    }

    /// OK, with the identity headers set and the client's own removed.
    fn allowed(&self, session: &Session, changes: Changes) -> CheckResponse {
        let mut set: Vec<HeaderValueOption> = self
            .settings
            .identity
            .headers(Some(session))
            .into_iter()
            .map(|(name, value)| overwrite(name, value))
            .collect();
        set.extend(changes.cookie.map(|rest| overwrite("cookie", rest)));
        CheckResponse {
            status: Some(rpc::Status {
                code: 0,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: set,
                headers_to_remove: changes.remove,
                ..Default::default()
            })),
            ..Default::default()
        }
    }
}

/// The `outcome` label of an answered Check (`rpc::CHECK_OUTCOMES`), for the call's
/// metrics and span.
pub fn outcome_label(response: &CheckResponse) -> &'static str {
    let [allowed, denied] = CHECK_OUTCOMES;
    match &response.http_response {
        Some(HttpResponse::OkResponse(_)) => allowed,
        _ => denied,
    }
}

fn http_request(request: &CheckRequest) -> Result<&HttpRequest, Status> {
    let attributes: &AttributeContext = request
        .attributes
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("attributes: required"))?;
    attributes
        .request
        .as_ref()
        .and_then(|r| r.http.as_ref())
        .ok_or_else(|| Status::invalid_argument("attributes.request.http: required"))
}

fn refused_reason(refused: &Refused) -> &'static str {
    match refused {
        Refused::EmptyToken => "no session token",
        Refused::LongToken => "the token is longer than 4096 bytes",
        Refused::NoProvider => "no identity provider",
    }
}

/// A denial: HTTP 401 with `www-authenticate: Bearer`; the upstream is not called.
fn denied(reason: &'static str) -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status {
            code: UNAUTHENTICATED,
            message: reason.into(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: StatusCode::Unauthorized as i32,
            }),
            headers: vec![overwrite("www-authenticate", "Bearer".into())],
            body: format!("{reason}\n"),
        })),
        ..Default::default()
    }
}

// `append` is deprecated in favour of `append_action`, but only `append: false` means
// "overwrite" to every Envoy version (see the note atop this file).
#[allow(deprecated)]
fn overwrite(name: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value,
            ..Default::default()
        }),
        // Overwrite in every Envoy version (see the note atop this file).
        append: Some(false),
        // An empty identity header must still replace a client's value.
        keep_empty_value: true,
        ..Default::default()
    }
}

/// The request's cookies without `name`, as one `cookie` header; `None` when nothing
/// else is left.
fn without_cookie(headers: &EnvoyHeaders<'_>, name: &str) -> Option<String> {
    let mut kept = Vec::new();
    for header in headers.values("cookie") {
        for pair in header.split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            let own = pair
                .split(|&b| b == b'=')
                .next()
                .is_some_and(|n| n == name.as_bytes());
            if !pair.is_empty() && !own {
                kept.push(String::from_utf8_lossy(pair).into_owned());
            }
        }
    }
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// Envoy's view of the request's headers: its map (names lowercase, repeated headers
/// merged), or the raw list when the filter sets `encode_raw_headers`.
struct EnvoyHeaders<'a> {
    http: &'a HttpRequest,
}

impl<'a> EnvoyHeaders<'a> {
    fn of(http: &'a HttpRequest) -> Self {
        EnvoyHeaders { http }
    }

    fn raw(&self) -> Option<&'a [HeaderValue]> {
        self.http
            .header_map
            .as_ref()
            .map(|m| m.headers.as_slice())
            .filter(|h| !h.is_empty())
    }

    /// Every header name, lowercase.
    fn names(&self) -> Box<dyn Iterator<Item = &'a str> + 'a> {
        match self.raw() {
            Some(raw) => Box::new(raw.iter().map(|h| h.key.as_str())),
            None => Box::new(self.http.headers.keys().map(String::as_str)),
        }
    }
}

impl Headers for EnvoyHeaders<'_> {
    fn values(&self, name: &str) -> Vec<&[u8]> {
        match self.raw() {
            Some(raw) => raw
                .iter()
                .filter(|h| h.key.eq_ignore_ascii_case(name))
                .map(|h| {
                    if h.raw_value.is_empty() {
                        h.value.as_bytes()
                    } else {
                        h.raw_value.as_slice()
                    }
                })
                .collect(),
            None => self
                .http
                .headers
                .get(name)
                .map(|v| v.as_bytes())
                .into_iter()
                .collect(),
        }
    }
}
