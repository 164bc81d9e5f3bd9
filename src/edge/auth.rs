//! `/auth` on the HTTP listener (SPEC §11): forward authentication for nginx
//! `auth_request`, Traefik `ForwardAuth`, Caddy `forward_auth` and Envoy's HTTP
//! ext_authz, answered with Validate's decision.
//!
//! | the decision | the answer |
//! |---|---|
//! | VALID | 200 with the identity headers |
//! | no token, INVALID, a malformed token | 401, `www-authenticate: Bearer` |
//! | UNAVAILABLE, no `--idp` | 503 (the proxies answer their error; never an allow) |
//! | the proxy's own credentials missing or unknown (with `--api-keys-file`) | 403 |
//!
//! Every answer carries every identity header, empty when there is no session: the
//! proxies copy them onto the upstream request, and a header the answer lacked would
//! leave the client's own value in place (or, in Caddy 2.6, a literal placeholder).
//! The proxy's own API key comes in `--edge-api-key-header`, since `authorization`
//! carries the user's token; a client certificate mapped in the keys file also serves.

use std::{future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tracing::{debug, info};

use super::{Found, check::EdgeSettings};
use crate::{
    auth::{Keys, Role},
    decision::{Decider, Decision, Refused, Via},
    entry::Session,
    http::{HttpRequest, HttpResponse, Route},
    store::Store,
};

/// The `/auth` route over Validate's decision.
pub(crate) struct AuthRoute<S> {
    decider: Decider<S>,
    settings: Arc<EdgeSettings>,
    keys: Keys,
    api_key_header: http::HeaderName,
}

impl<S: Store> AuthRoute<S> {
    /// Checks the proxy's key (`api_key_header`) against `keys` when any are
    /// configured.
    pub(crate) fn new(
        decider: Decider<S>,
        settings: Arc<EdgeSettings>,
        keys: Keys,
        api_key_header: &str,
    ) -> Self {
        AuthRoute {
            decider,
            settings,
            keys,
            api_key_header: http::HeaderName::from_bytes(api_key_header.as_bytes())
                .unwrap_or(http::HeaderName::from_static("x-session-cache-key")),
        }
    }

    /// The whole answer to one request.
    pub(crate) async fn answer(&self, request: &HttpRequest) -> HttpResponse {
        let began = Instant::now();
        if let Err(why) = self.caller(request) {
            return self.reply(StatusCode::FORBIDDEN, None, why);
        }
        let (token, _) = match self.settings.extractor.find(&request.head.headers) {
            Found::Token { token, carrier } => (token, carrier),
            Found::Nothing => {
                return self.reply(StatusCode::UNAUTHORIZED, None, "no session token");
            }
            Found::Malformed(why) => {
                debug!(why, "/auth: denied a malformed request");
                return self.reply(StatusCode::UNAUTHORIZED, None, why);
            }
        };
        let deadline = self.decider.deadline(began, None);
        match self
            .decider
            .decide(&token, Via::Auth, began, deadline)
            .await
        {
            Ok(Decision::Valid(session)) => self.reply(StatusCode::OK, Some(&session), ""),
            Ok(Decision::Invalid) => {
                self.reply(StatusCode::UNAUTHORIZED, None, "the session is not valid")
            }
            Ok(Decision::Unavailable(_)) => self.reply(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the identity provider or the store cannot decide now; retry",
            ),
            Err(Refused::NoProvider) => self.reply(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "--idp: no identity provider is configured",
            ),
            Err(Refused::EmptyToken) => {
                self.reply(StatusCode::UNAUTHORIZED, None, "no session token")
            }
            Err(Refused::LongToken) => self.reply(
                StatusCode::UNAUTHORIZED,
                None,
                "the token is longer than 4096 bytes",
            ),
        }
    }

    /// The proxy, when callers must authenticate: its key in `api_key_header`, or a
    /// mapped client certificate; it needs the reader role.
    fn caller(&self, request: &HttpRequest) -> Result<(), &'static str> {
        let keys = self.keys.load();
        if !keys.is_enabled() {
            return Ok(());
        }
        let mut metadata = MetadataMap::new();
        if let Some(key) = request.head.headers.get(&self.api_key_header)
            && let Ok(bearer) = format!("Bearer {}", key.to_str().unwrap_or_default()).parse()
        {
            metadata.insert("authorization", bearer);
        }
        let certs = request.peer_certs.as_deref().map(Vec::as_slice);
        match keys.authorize(&metadata, certs, Role::Reader) {
            Ok(_) => Ok(()),
            Err(denied) => {
                info!(peer = %request.peer, reason = %denied, "/auth refused the proxy's credentials");
                Err("the proxy's credentials are missing or unknown, or lack the reader role")
            }
        }
    }

    /// An answer with every identity header (empty without a session).
    fn reply(&self, status: StatusCode, session: Option<&Session>, reason: &str) -> HttpResponse {
        let body = if reason.is_empty() {
            Bytes::new()
        } else {
            Bytes::from(format!("{reason}\n"))
        };
        let mut response = http::Response::new(Full::new(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        for (name, value) in self.settings.identity.headers(session) {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl<S: Store> Route for AuthRoute<S> {
    fn path(&self) -> &'static str {
        "/auth"
    }

    fn statuses(&self) -> &'static [u16] {
        &[200, 401, 403, 503]
    }

    fn handle(
        &self,
        request: HttpRequest,
    ) -> Pin<Box<dyn Future<Output = HttpResponse> + Send + '_>> {
        Box::pin(async move { self.answer(&request).await })
    }
}
