//! OAuth 2.0 token introspection (RFC 7662) as an identity provider (SPEC §9).
//!
//! One `POST <--introspection-url>` with the form body
//! `token=<token>&token_type_hint=access_token` (RFC 7662 §2.1),
//! `Authorization: Basic` with the client credentials, each form-urlencoded before
//! base64 (RFC 6749 §2.3.1), and `Accept: application/json`. Redirects are not
//! followed: the form holds the token.
//!
//! Answers (RFC 7662 §2.2, §2.3):
//! - 200 with `"active": false`: `Invalid` (unknown, expired, revoked, or not for us).
//! - 200 with `"active": true`: `Valid`, with the claims below; `sub` missing:
//!   `Unexpected`.
//! - 200 without a boolean `active`, or not a JSON object: `Unexpected`.
//! - 401 (or 403): the endpoint refused *our* client credentials, not the token:
//!   `Unexpected`, so that nothing is cached as INVALID.
//! - 429: `RateLimited`; 5xx: `ServerError`; 3xx and anything else: `Unexpected`.
//!
//! Claims to the cached user (README-ready):
//!
//! | Field            | Claim                                                        | When absent                    |
//! |------------------|--------------------------------------------------------------|--------------------------------|
//! | `id`             | `sub`                                                        | `Unexpected` (not cached)      |
//! | `email`          | `email`                                                      | empty                          |
//! | `name`           | `name`, else `preferred_username`, else `username`           | empty                          |
//! | `email_verified` | `email_verified` (boolean, or the string `"true"`)           | false                          |
//! | `tier`           | `--introspection-tier-claim` (default `tier`; a string, or a number or boolean as text) | empty |
//! | `session_expire` | `exp` (NumericDate)                                          | now + 5 minutes (see below)    |
//! | `created_at`     | `iat` (NumericDate)                                          | now                            |
//! | `updated_at`     | `updated_at` (OIDC, NumericDate)                             | `created_at`                   |
//!
//! The `sid` claim (Keycloak sends it), when present, is handed on with the answer
//! ([`Provider::validate_with_session_id`]): the session id's user is recorded for
//! back-channel logout tokens that name only the session (SPEC §12).
//!
//! A token without `exp` is cached as if it expired [`MISSING_EXP_LIFETIME`] after it
//! was introspected: the provider is asked again at least that often, whatever
//! `--ttl-seconds` says, so a revocation the provider knows of is seen within it. An
//! active token whose `exp` is already past by our clock is `Invalid`.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use chrono::{DateTime, Utc};
use reqwest::{
    StatusCode,
    header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue},
};
use serde_json::{Map, Value};

use super::{
    Answer, IdpError, Provider, Secret, SessionValidation, Validation, common_failure,
    parse_instant, scrub, send,
};
use crate::entry::{Session, User};

/// How long a token without `exp` is taken to live after it was introspected.
pub const MISSING_EXP_LIFETIME: Duration = Duration::from_secs(300);

/// The credentials this service introspects with.
#[derive(Clone, Debug)]
pub struct Client {
    pub id: String,
    pub secret: Secret,
}

/// An RFC 7662 introspection endpoint as an identity provider.
pub struct Introspection {
    http: reqwest::Client,
    url: String,
    authorization: HeaderValue,
    secret: Secret,
    tier_claim: String,
}

impl Introspection {
    /// A provider that posts to `url` as `client`; the user's tier is read from the
    /// claim `tier_claim`.
    pub fn new(http: reqwest::Client, url: &str, client: Client, tier_claim: String) -> Self {
        Introspection {
            http,
            url: url.to_owned(),
            authorization: basic_authorization(&client.id, &client.secret.0),
            secret: client.secret,
            tier_claim,
        }
    }

    /// The answer of a 200, with the session's `sid` when an active token carries one.
    fn session(&self, body: &[u8], token: &str) -> Result<(Answer, Option<String>), IdpError> {
        let unexpected =
            |what: String| IdpError::Unexpected(scrub(&what, &[token, &self.secret.0]));
        let claims: Map<String, Value> = match serde_json::from_slice(body) {
            Ok(Value::Object(claims)) => claims,
            Ok(_) => return Err(unexpected("the answer is not a JSON object".into())),
            Err(e) => return Err(unexpected(format!("the answer is not JSON: {e}"))),
        };
        match claims.get("active") {
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => return Ok((Answer::Invalid, None)),
            _ => {
                return Err(unexpected(
                    "no boolean \"active\" member (RFC 7662 §2.2)".into(),
                ));
            }
        }
        let id = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(unexpected("an active token without \"sub\"".into())),
        };
        let instant = |claim: &str| -> Result<Option<DateTime<Utc>>, IdpError> {
            match claims.get(claim) {
                None | Some(Value::Null) => Ok(None),
                Some(value) => numeric_date(value)
                    .map(Some)
                    .ok_or_else(|| unexpected(format!("claim {claim} is not a NumericDate"))),
            }
        };
        let now = Utc::now();
        let session_expire = instant("exp")?.unwrap_or_else(|| {
            now + chrono::Duration::from_std(MISSING_EXP_LIFETIME).unwrap_or_default()
        });
        if session_expire <= now {
            return Ok((Answer::Invalid, None));
        }
        let created_at = instant("iat")?.unwrap_or(now);
        let updated_at = instant("updated_at")?.unwrap_or(created_at);
        let text = |claim: &str| match claims.get(claim) {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let name = ["name", "preferred_username", "username"]
            .into_iter()
            .map(text)
            .find(|name| !name.is_empty())
            .unwrap_or_default();
        let email_verified = match claims.get("email_verified") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        };
        let tier = match claims.get(&self.tier_claim) {
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            _ => String::new(),
        };
        let sid = Some(text("sid")).filter(|sid| !sid.is_empty());
        let answer = Answer::Valid(Session {
            user: User {
                id,
                email: text("email"),
                name,
                email_verified,
                tier,
                created_at,
                updated_at,
            },
            session_expire,
        });
        Ok((answer, sid))
    }

    /// One introspection call: the answer, and the session's `sid` if it has one.
    async fn ask(&self, token: &str) -> Result<(Answer, Option<String>), IdpError> {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("token_type_hint", "access_token")
            .finish();
        let reply = send(
            self.http
                .post(&self.url)
                .header(AUTHORIZATION, self.authorization.clone())
                .header(ACCEPT, "application/json")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form),
        )
        .await?;
        if reply.status == StatusCode::OK {
            return self.session(&reply.body, token);
        }
        if let Some(e) = common_failure(&reply) {
            return Err(e);
        }
        let status = reply.status.as_u16();
        if matches!(status, 401 | 403) {
            return Err(IdpError::Unexpected(format!(
                "HTTP {status}: the introspection endpoint refused this service's client \
                 credentials; check --introspection-client-id and the client secret"
            )));
        }
        let body = String::from_utf8_lossy(&reply.body);
        Err(IdpError::Unexpected(format!(
            "HTTP {status}: {}",
            scrub(&body, &[token, &self.secret.0])
        )))
    }
}

impl Provider for Introspection {
    fn name(&self) -> &'static str {
        "introspection"
    }

    fn validate<'a>(&'a self, token: &'a str) -> Validation<'a> {
        Box::pin(async move { self.ask(token).await.map(|(answer, _)| answer) })
    }

    fn validate_with_session_id<'a>(&'a self, token: &'a str) -> SessionValidation<'a> {
        Box::pin(async move {
            match self.ask(token).await {
                Ok((answer, sid)) => (Ok(answer), sid),
                Err(e) => (Err(e), None),
            }
        })
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`, RFC 6749 §2.3.1.
fn basic_authorization(id: &str, secret: &str) -> HeaderValue {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let credentials = BASE64.encode(format!("{}:{}", encode(id), encode(secret)));
    let mut value = HeaderValue::from_str(&format!("Basic {credentials}"))
        .expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

/// A NumericDate (RFC 7519 §2: seconds since the epoch, possibly fractional); an
/// RFC 3339 string is accepted too.
fn numeric_date(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::Number(n) => match n.as_i64() {
            Some(seconds) => DateTime::from_timestamp(seconds, 0),
            None => {
                let seconds = n.as_f64()?;
                if !seconds.is_finite() {
                    return None;
                }
                DateTime::from_timestamp_micros((seconds * 1e6).round() as i64)
            }
        },
        Value::String(text) => parse_instant(text),
        _ => None,
    }
}
