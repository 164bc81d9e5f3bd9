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
use tracing::{debug, info};

use super::{Found, check::EdgeSettings};
use crate::{
    auth::Current as Keys,
    decision::{Decider, Decision, Refused, Via},
    entry::Session,
    http::{HttpRequest, HttpResponse, Route},
    rpc::Role,
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
        // The key-checking code reads `authorization: Bearer <key>`.
        let mut headers = http::HeaderMap::new();
        if let Some(key) = request.head.headers.get(&self.api_key_header)
            && let Ok(bearer) = format!("Bearer {}", key.to_str().unwrap_or_default()).parse()
        {
            headers.insert(header::AUTHORIZATION, bearer);
        }
        let certs = request.peer_certs.as_deref().map(Vec::as_slice);
        match keys.authorize(&headers, certs, Role::Reader) {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::{
        auth::Authenticator,
        edge::{EdgeFlags, Extractor, Identity},
        health::StoreStatus,
        idp::{Answer, IdpError, Provider, Validation},
        store::MemoryStore,
        validate::Validator,
    };

    /// A provider answering from a table, or failing every call.
    struct Table {
        sessions: HashMap<&'static str, Session>,
        failing: bool,
    }

    impl Provider for Table {
        fn name(&self) -> &'static str {
            "table"
        }

        fn validate<'a>(&'a self, token: &'a str) -> Validation<'a> {
            Box::pin(async move {
                if self.failing {
                    return Err(IdpError::ServerError(503));
                }
                Ok(self
                    .sessions
                    .get(token)
                    .cloned()
                    .map_or(Answer::Invalid, Answer::Valid))
            })
        }
    }

    fn session(id: &str) -> Session {
        let now = chrono::Utc::now();
        Session {
            user: crate::entry::User {
                id: id.into(),
                email: format!("{id}@example.com"),
                name: "Ada".into(),
                email_verified: false,
                tier: "free".into(),
                created_at: now,
                updated_at: now,
            },
            session_expire: now + chrono::Duration::hours(1),
        }
    }

    fn route(failing: bool, keys: Authenticator) -> AuthRoute<MemoryStore> {
        let config = crate::Config::load_from(["session-cache"]).unwrap();
        let store = Arc::new(MemoryStore::new(config.limits(), config.memory_bounds()));
        let provider = Table {
            sessions: HashMap::from([("tok-1", session("u-1"))]),
            failing,
        };
        let decider = Decider::new(store, true, Arc::new(StoreStatus::new(true)))
            .with_validator(Arc::new(Validator::new(Arc::new(provider), 4)));
        let flags: EdgeFlags = config.edge.clone();
        let settings = Arc::new(EdgeSettings {
            extractor: Extractor::new(&flags, Some("proj")),
            identity: Identity::new(&flags.edge_header_prefix),
            strip_credentials: false,
        });
        AuthRoute::new(
            decider,
            settings,
            crate::auth::current(keys),
            &flags.edge_api_key_header,
        )
    }

    fn request(headers: &[(&str, &str)]) -> HttpRequest {
        let mut builder = http::Request::builder().uri("/auth");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (head, ()) = builder.body(()).unwrap().into_parts();
        HttpRequest {
            head,
            body: Bytes::new(),
            peer: "127.0.0.1:40000".parse().unwrap(),
            peer_certs: None,
        }
    }

    fn header<'a>(response: &'a HttpResponse, name: &str) -> Option<&'a str> {
        response.headers().get(name).and_then(|v| v.to_str().ok())
    }

    /// 200 with the user's headers for a valid token (Bearer or the Appwrite cookie);
    /// 401 with `www-authenticate: Bearer` and every identity header present but empty
    /// for no token, an unknown one and a malformed one.
    #[tokio::test]
    async fn answers_with_every_identity_header() {
        let route = route(false, Authenticator::open());
        for headers in [
            &[("authorization", "Bearer tok-1")][..],
            &[("cookie", "a=b; a_session_proj=tok-1")],
        ] {
            let ok = route.answer(&request(headers)).await;
            assert_eq!(ok.status(), 200, "{headers:?}");
            assert_eq!(header(&ok, "x-auth-request-user"), Some("u-1"));
            assert_eq!(header(&ok, "x-auth-request-email-verified"), Some("false"));
            assert_eq!(header(&ok, "cache-control"), Some("no-store"));
        }
        for headers in [
            &[][..],
            &[("authorization", "Bearer nobody")],
            &[("authorization", "Bearer")],
        ] {
            let denied = route.answer(&request(headers)).await;
            assert_eq!(denied.status(), 401, "{headers:?}");
            assert_eq!(header(&denied, "www-authenticate"), Some("Bearer"));
            for name in route.settings.identity.names() {
                assert_eq!(header(&denied, name), Some(""), "{name} on a 401");
            }
        }
    }

    /// The provider failing is 503, never 200 or 401.
    #[tokio::test]
    async fn undecided_is_503() {
        let route = route(true, Authenticator::open());
        let answer = route
            .answer(&request(&[("authorization", "Bearer tok-1")]))
            .await;
        assert_eq!(answer.status(), 503);
        assert_eq!(header(&answer, "x-auth-request-user"), Some(""));
    }

    /// With --api-keys-file, the proxy's key comes in x-session-cache-key: without it,
    /// or with an unknown one, 403 (whatever the user's token); with it, the decision.
    #[tokio::test]
    async fn the_proxy_needs_a_readers_key() {
        let sha: String = Sha256::digest(b"proxy-key")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let keys = Authenticator::from_toml(&format!(
            "[[keys]]\nname = \"nginx\"\nsha256 = \"{sha}\"\nroles = [\"reader\"]\n"
        ))
        .unwrap();
        let route = route(false, keys);
        for key in [None, Some("guess")] {
            let mut headers = vec![("authorization", "Bearer tok-1")];
            headers.extend(key.map(|k| ("x-session-cache-key", k)));
            let answer = route.answer(&request(&headers)).await;
            assert_eq!(answer.status(), 403, "{key:?}");
            assert_eq!(header(&answer, "x-auth-request-user"), Some(""));
        }
        let answer = route
            .answer(&request(&[
                ("authorization", "Bearer tok-1"),
                ("x-session-cache-key", "proxy-key"),
            ]))
            .await;
        assert_eq!(answer.status(), 200);
        assert_eq!(route.path(), "/auth");
        assert!(route.statuses().contains(&answer.status().as_u16()));
    }
}
