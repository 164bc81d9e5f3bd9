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

use chrono::Utc;
use reqwest::{StatusCode, header::HeaderValue};
use serde::Deserialize;
use serde_json::Value;

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
            // The flags' validation admits only ID characters, all valid in a header.
            project: HeaderValue::from_str(&project).unwrap_or(HeaderValue::from_static("")),
            tier_pref,
        }
    }

    async fn get(&self, url: &str, session: &HeaderValue) -> Result<Reply, IdpError> {
        send(
            self.http
                .get(url)
                .header("X-Appwrite-Project", self.project.clone())
                .header("X-Appwrite-Session", session.clone())
                .header("Content-Type", "application/json")
                .header("X-Appwrite-Response-Format", RESPONSE_FORMAT),
        )
        .await
    }

    /// The session from the two bodies.
    fn session(&self, account: &[u8], current: &[u8], token: &str) -> Result<Answer, IdpError> {
        let account: Account = serde_json::from_slice(account).map_err(|e| {
            IdpError::Unexpected(format!("/account is not Appwrite's User model: {e}"))
        })?;
        let current: CurrentSession = serde_json::from_slice(current).map_err(|e| {
            IdpError::Unexpected(format!(
                "/account/sessions/current is not Appwrite's Session model: {e}"
            ))
        })?;
        if account.id.is_empty() || account.id != current.user_id {
            return Err(IdpError::Unexpected(
                "/account and /account/sessions/current name different users".into(),
            ));
        }
        let instant = |field: &str, text: &str| {
            parse_instant(text).ok_or_else(|| {
                IdpError::Unexpected(format!(
                    "{field} {:?} is not an ISO 8601 instant",
                    scrub(text, &[token])
                ))
            })
        };
        let session_expire = instant("session expire", &current.expire)?;
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
            let Ok(mut session) = HeaderValue::from_str(token) else {
                return Ok(Answer::Invalid);
            };
            session.set_sensitive(true);
            let (account, current) = tokio::join!(
                self.get(&self.account_url, &session),
                self.get(&self.session_url, &session)
            );
            let account = account.and_then(|r| judge(r, token));
            let current = current.and_then(|r| judge(r, token));
            match (account, current) {
                (Ok(Step::Refused), _) | (_, Ok(Step::Refused)) => Ok(Answer::Invalid),
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(Step::Body(account)), Ok(Step::Body(current))) => {
                    self.session(&account, &current, token)
                }
            }
        })
    }
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
