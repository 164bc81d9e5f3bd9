//! Appwrite: the account and the current session of a session secret, through
//! Appwrite's REST API (SPEC §9).
//!
//! Two calls, at once: `GET <endpoint>/account` (the User model) and
//! `GET <endpoint>/account/sessions/current` (the Session model, for `expire`), each with
//! the headers Appwrite's REST docs ask for and the server SDKs send:
//! `X-Appwrite-Project`, `X-Appwrite-Session` (the token), `Content-Type:
//! application/json` and `X-Appwrite-Response-Format`.
//!
//! Sources, read for this mapping:
//! - REST headers: appwrite.io/docs/apis/rest ("Headers").
//! - The SDK's headers and error body: appwrite/sdk-for-node `src/client.ts` (v26.0.0
//!   sends `X-Appwrite-Response-Format: 1.8.0`; `AppwriteException` carries `message`,
//!   `code` and `type` from the JSON body).
//! - The models: appwrite/appwrite `src/Appwrite/Utopia/Response/Model/User.php`
//!   (`$id`, `$createdAt`, `$updatedAt`, `name`, `email`, `emailVerification`, `prefs`
//!   as an object, `{}` when empty) and `.../Model/Session.php` (`userId`, `expire`,
//!   ISO 8601 such as `2020-10-15T06:38:00.000+00:00`).
//! - The error body `{"message","code","type","version"}`: appwrite/appwrite
//!   `app/controllers/general.php` (the error handler); types and statuses:
//!   `app/config/errors.php`.
//! - How a bad session is refused: appwrite/appwrite `app/controllers/shared/api.php`
//!   and `src/Appwrite/Utopia/Database/Documents/User.php` (`sessionVerify`). A
//!   secret that matches no session, or a session whose `expire` has passed, leaves
//!   the request a guest's; `/account` needs the `account` scope, which guests lack,
//!   so Appwrite answers 401 `general_unauthorized_scope` ("User (role: guests)
//!   missing scopes"). That 401 is therefore the per-user refusal, not a
//!   misconfiguration.
//!
//! | Appwrite answers (either call)                                  | Meaning            |
//! |-----------------------------------------------------------------|--------------------|
//! | 200 and 200, session `expire` in the future                     | `Valid`            |
//! | 200 and 200, `expire` already past (Appwrite's clock behind)    | `Invalid`          |
//! | 401 (`general_unauthorized_scope`, `user_*`, or no JSON type)   | `Invalid`          |
//! | 403 `user_blocked`, 412 `user_password_reset_required`          | `Invalid`          |
//! | 404 `user_session_not_found` (signed out between the two calls) | `Invalid`          |
//! | 401 `general_access_forbidden` or `project_*` (project-wide)    | `Unexpected`       |
//! | 404 `project_not_found` (wrong `--appwrite-project`), other 404 | `Unexpected`       |
//! | other 403 (`general_unknown_origin`, `general_api_disabled`...) | `Unexpected`       |
//! | 429 `general_rate_limit_exceeded`                               | `RateLimited`      |
//! | 5xx                                                             | `ServerError`      |
//! | 3xx (not followed), a body that does not parse, other statuses | `Unexpected`       |
//!
//! A refusal by either call wins over the other's failure: Appwrite has spoken about
//! the token. The two answers must name one user (`$id` = `userId`), else `Unexpected`.
//!
//! # Appwrite JWTs
//! A token shaped as a JWT (three base64url parts, a JSON header with `alg`) is one of
//! Appwrite's JWTs (`account.createJWT`, `users.createJWT`): HS256 over
//! `{"userId", "sessionId", "exp"}` with a key only Appwrite holds (appwrite/appwrite
//! `app/controllers/api/account.php`, `POST /v1/account/jwts`). It goes as
//! `X-Appwrite-JWT`, which `app/init/resources/request.php` verifies, loading the user
//! only while the JWT's session is active. Its session is asked for by ID,
//! `GET /account/sessions/<sessionId>`: `current` is resolved from a session secret,
//! which a JWT request has none of, and answers 404 `user_session_not_found` to every
//! JWT. A JWT without a session ID (a server's `users.createJWT` for a user with none)
//! asks `/account` alone. Appwrite answers a JWT it cannot verify or that has expired
//! 401 `user_jwt_invalid`, one whose session ended as a guest (401, as above).
//!
//! The entry of a JWT expires no later than its `exp`, read without verifying (only
//! Appwrite holds the key, and it has just vouched for the token): Appwrite refuses it
//! from then on whatever its session's expiry. A JWT whose `exp` has passed is refused
//! without a call; one without `exp` is cached as if it expired
//! [`super::introspection::MISSING_EXP_LIFETIME`] after it was validated.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL};
use chrono::{DateTime, Utc};
use reqwest::{StatusCode, header::HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    Answer, IdpError, Provider, Reply, Validation, common_failure, parse_instant, scrub, send,
};
use crate::entry::{Session, User};

/// What the server SDKs send (sdk-for-node 26.0.0); Appwrite shapes its models for it.
pub const RESPONSE_FORMAT: &str = "1.8.0";

/// Appwrite as an identity provider.
pub struct Appwrite {
    http: reqwest::Client,
    account_url: String,
    session_url: String,
    /// `<endpoint>/account/sessions/`, for a JWT's session by ID.
    sessions_url: String,
    project: HeaderValue,
    tier_pref: String,
}

impl Appwrite {
    /// A provider for `endpoint` (`https://cloud.appwrite.io/v1`) and `project`; the
    /// user's tier is read from `prefs[tier_pref]`.
    pub fn new(http: reqwest::Client, endpoint: &str, project: String, tier_pref: String) -> Self {
        let endpoint = endpoint.trim_end_matches('/');
        Appwrite {
            http,
            account_url: format!("{endpoint}/account"),
            session_url: format!("{endpoint}/account/sessions/current"),
            sessions_url: format!("{endpoint}/account/sessions/"),
            // The flags' validation admits only ID characters, all valid in a header.
            project: HeaderValue::from_str(&project).unwrap_or(HeaderValue::from_static("")),
            tier_pref,
        }
    }

    /// A `GET` with the token in `credential` (`X-Appwrite-Session` or `X-Appwrite-JWT`).
    async fn get(
        &self,
        url: &str,
        credential: &'static str,
        token: &HeaderValue,
    ) -> Result<Reply, IdpError> {
        send(
            self.http
                .get(url)
                .header("X-Appwrite-Project", self.project.clone())
                .header(credential, token.clone())
                .header("Content-Type", "application/json")
                .header("X-Appwrite-Response-Format", RESPONSE_FORMAT),
        )
        .await
    }

    /// The session from the bodies: the account's, and its session's (none for a JWT
    /// without a session); `cap` is the JWT's `exp`, when the token is one.
    fn session(
        &self,
        account: &[u8],
        current: Option<&[u8]>,
        cap: Option<DateTime<Utc>>,
        token: &str,
    ) -> Result<Answer, IdpError> {
        let account: Account = serde_json::from_slice(account).map_err(|e| {
            IdpError::Unexpected(format!("/account is not Appwrite's User model: {e}"))
        })?;
        let instant = |field: &str, text: &str| {
            parse_instant(text).ok_or_else(|| {
                IdpError::Unexpected(format!(
                    "{field} {:?} is not an ISO 8601 instant",
                    scrub(text, &[token])
                ))
            })
        };
        let session_expire = match current {
            Some(current) => {
                let current: CurrentSession = serde_json::from_slice(current).map_err(|e| {
                    IdpError::Unexpected(format!(
                        "the session is not Appwrite's Session model: {e}"
                    ))
                })?;
                if account.id.is_empty() || account.id != current.user_id {
                    return Err(IdpError::Unexpected(
                        "/account and the session name different users".into(),
                    ));
                }
                let expire = instant("session expire", &current.expire)?;
                cap.map_or(expire, |cap| expire.min(cap))
            }
            None => cap.unwrap_or_else(|| {
                Utc::now()
                    + chrono::Duration::from_std(super::introspection::MISSING_EXP_LIFETIME)
                        .unwrap_or_default()
            }),
        };
        if session_expire <= Utc::now() {
            return Ok(Answer::Invalid);
        }
        let tier = match account.prefs.get(&self.tier_pref) {
            Some(Value::String(tier)) => tier.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            _ => String::new(),
        };
        Ok(Answer::Valid(Session {
            user: User {
                created_at: instant("$createdAt", &account.created_at)?,
                updated_at: instant("$updatedAt", &account.updated_at)?,
                id: account.id,
                email: account.email.unwrap_or_default(),
                name: account.name.unwrap_or_default(),
                email_verified: account.email_verification,
                tier,
            },
            session_expire,
        }))
    }
}

impl Provider for Appwrite {
    fn name(&self) -> &'static str {
        "appwrite"
    }

    fn validate<'a>(&'a self, token: &'a str) -> Validation<'a> {
        Box::pin(async move {
            // A token that cannot be a header value is no session secret.
            let Ok(mut value) = HeaderValue::from_str(token) else {
                return Ok(Answer::Invalid);
            };
            value.set_sensitive(true);
            let (credential, session_url, cap) = match Jwt::read(token) {
                None => ("X-Appwrite-Session", Some(self.session_url.clone()), None),
                Some(jwt) => {
                    if jwt.exp.is_some_and(|exp| exp <= Utc::now()) {
                        return Ok(Answer::Invalid);
                    }
                    let url = match jwt.session_id {
                        Some(id) if is_id(&id) => Some(format!("{}{id}", self.sessions_url)),
                        Some(_) => return Ok(Answer::Invalid),
                        None => None,
                    };
                    ("X-Appwrite-JWT", url, jwt.exp)
                }
            };
            let current = async {
                match &session_url {
                    Some(url) => Some(self.get(url, credential, &value).await),
                    None => None,
                }
            };
            let (account, current) =
                tokio::join!(self.get(&self.account_url, credential, &value), current);
            let account = account.and_then(|r| judge(r, token));
            let current = current.map(|reply| reply.and_then(|r| judge(r, token)));
            match (account, current) {
                (Ok(Step::Refused), _) | (_, Some(Ok(Step::Refused))) => Ok(Answer::Invalid),
                (Err(e), _) | (_, Some(Err(e))) => Err(e),
                (Ok(Step::Body(account)), Some(Ok(Step::Body(current)))) => {
                    self.session(&account, Some(&current), cap, token)
                }
                (Ok(Step::Body(account)), None) => self.session(&account, None, cap, token),
            }
        })
    }
}

/// What is read of an Appwrite JWT, unverified: only Appwrite holds its key.
struct Jwt {
    exp: Option<DateTime<Utc>>,
    session_id: Option<String>,
}

impl Jwt {
    /// The claims of a token shaped as a JWT (three base64url parts, a JSON header with
    /// `alg`, a JSON object for claims); `None` for any other token.
    fn read(token: &str) -> Option<Jwt> {
        let mut parts = token.split('.');
        let (header, claims, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || signature.is_empty() {
            return None;
        }
        let object = |part: &str| -> Option<Map<String, Value>> {
            let bytes = BASE64URL.decode(part.trim_end_matches('=')).ok()?;
            match serde_json::from_slice(&bytes).ok()? {
                Value::Object(object) => Some(object),
                _ => None,
            }
        };
        if !object(header)?.get("alg").is_some_and(Value::is_string) {
            return None;
        }
        let claims = object(claims)?;
        let exp = claims
            .get("exp")
            .and_then(Value::as_f64)
            .and_then(|exp| DateTime::from_timestamp_millis((exp * 1000.0) as i64));
        let session_id = claims
            .get("sessionId")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned);
        Some(Jwt { exp, session_id })
    }
}

/// Whether `id` can be an Appwrite ID (letters, digits, '.', '-', '_'; at most 36), and
/// so go into a URL path as it is.
fn is_id(id: &str) -> bool {
    id.len() <= 36
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// One call's answer, judged.
enum Step {
    /// HTTP 200, with the model.
    Body(Vec<u8>),
    /// Appwrite refused this session.
    Refused,
}

/// Maps one call's status and error type (see the table atop this file).
fn judge(reply: Reply, token: &str) -> Result<Step, IdpError> {
    if reply.status == StatusCode::OK {
        return Ok(Step::Body(reply.body));
    }
    if let Some(e) = common_failure(&reply) {
        return Err(e);
    }
    let error: ErrorBody = serde_json::from_slice(&reply.body).unwrap_or_default();
    let kind = error.kind.as_str();
    let refused = match reply.status.as_u16() {
        401 => !(kind == "general_access_forbidden" || kind.starts_with("project_")),
        403 => kind == "user_blocked",
        404 => kind == "user_session_not_found",
        412 => kind == "user_password_reset_required",
        _ => false,
    };
    if refused {
        return Ok(Step::Refused);
    }
    Err(IdpError::Unexpected(format!(
        "HTTP {} {}: {}",
        reply.status.as_u16(),
        if kind.is_empty() {
            "(no Appwrite error type)"
        } else {
            kind
        },
        scrub(&error.message, &[token])
    )))
}

/// The User model's fields that make a [`User`].
#[derive(Deserialize)]
struct Account {
    #[serde(rename = "$id")]
    id: String,
    #[serde(rename = "$createdAt")]
    created_at: String,
    #[serde(rename = "$updatedAt")]
    updated_at: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(rename = "emailVerification", default)]
    email_verification: bool,
    /// An object; Appwrite writes `{}` for none.
    #[serde(default)]
    prefs: Value,
}

/// The Session model's fields that matter here.
#[derive(Deserialize)]
struct CurrentSession {
    #[serde(rename = "userId")]
    user_id: String,
    expire: String,
}

/// Appwrite's error body: `{"message", "code", "type", "version"}`.
#[derive(Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(rename = "type", default)]
    kind: String,
}
