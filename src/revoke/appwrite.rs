//! `POST /webhooks/appwrite`: Appwrite's webhooks, as its webhooks worker sends them
//! (appwrite/appwrite `src/Appwrite/Platform/Workers/Webhooks.php`, read for this):
//!
//! - The body is `json_encode` of the event's payload (the model the API answered: a
//!   User, a Session, a Token).
//! - `X-Appwrite-Webhook-Signature` is `base64_encode(hash_hmac('sha1', $url . $body,
//!   $signatureKey, true))`: HMAC-SHA1 keyed by the webhook's signature key, over the
//!   webhook's URL exactly as configured followed by the raw body. No timestamp: a
//!   captured delivery can be sent again, and here that only forces a re-validation.
//! - `X-Appwrite-Webhook-Events` is `implode(',', $events)`: the event with every form
//!   Appwrite generates from its pattern (`Event::generateEvents`): the concrete name
//!   (`users.u1.sessions.s1.delete`), each placeholder replaced by `*`
//!   (`users.*.sessions.*.delete`, `users.u1.sessions.*.delete`...), and the shorter
//!   forms of the resource (`users.u1.sessions.s1`, `users.u1`).
//! - `X-Appwrite-Webhook-User-Id` is the user who *acted* (an admin, or nobody for an
//!   API key), not the one affected: never read here.
//!
//! The signature is checked, in constant time, before the body is parsed. The users to
//! revoke come from the event names: the concrete names that no other concrete name
//! extends (`users.u1.delete` is also sent for `users.u1.delete.mfa`, an authenticator
//! removed, and is not a user deleted then), read against the six families below.
//! Appwrite IDs may hold dots, so a name could read two ways; the wildcard forms, which
//! Appwrite sends for the pattern it fired, and the `users.<id>` form settle it.
//!
//! | Event                                          | When                                  |
//! |------------------------------------------------|---------------------------------------|
//! | `users.<id>.sessions.<sessionId>.delete`       | a sign-out, or an admin ending one    |
//! | `users.<id>.sessions.delete`                   | an admin ending every session         |
//! | `users.<id>.update.password`                   | a password change                     |
//! | `users.<id>.recovery.<tokenId>.update`         | a password reset by e-mail            |
//! | `users.<id>.update.status` (payload `status` false) | the user blocked                 |
//! | `users.<id>.delete`                            | the user deleted                      |

use std::{future::Future, pin::Pin};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, Mac};
use http::{HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use sha1::Sha1;
use tracing::debug;

use super::{
    Revoker,
    metrics::{self, Outcome},
    user_id_ok,
};
use crate::{
    http::{HttpRequest, HttpResponse, Route, respond_json},
    store::Store,
};

/// The metrics `source` label.
const SOURCE: &str = "appwrite";
/// Longest event name read, in bytes: Appwrite's are well under it.
const MAX_EVENT_BYTES: usize = 512;

/// The webhook's key and URL, from the flags.
pub(super) struct Settings {
    mac: Hmac<Sha1>,
    url: String,
}

impl Settings {
    pub(super) fn new(key: &[u8], url: String) -> Settings {
        Settings {
            mac: Hmac::new_from_slice(key).expect("HMAC takes keys of any length"),
            url,
        }
    }

    /// Whether `signature` (the header's base64) is the body's, compared in constant
    /// time.
    fn verifies(&self, signature: &[u8], body: &[u8]) -> bool {
        let Ok(signature) = BASE64.decode(signature.trim_ascii()) else {
            return false;
        };
        let mut mac = self.mac.clone();
        mac.update(self.url.as_bytes());
        mac.update(body);
        mac.verify_slice(&signature).is_ok()
    }
}

/// The route.
pub(super) struct Webhook<S> {
    settings: Settings,
    revoker: Revoker<S>,
}

impl<S: Store> Webhook<S> {
    pub(super) fn new(settings: Settings, revoker: Revoker<S>) -> Self {
        Webhook { settings, revoker }
    }

    async fn answer(&self, request: HttpRequest) -> (HttpResponse, Outcome) {
        let refused = |status: StatusCode, message: String| {
            debug!(%status, message, "an Appwrite webhook was refused");
            (
                respond_json(status, &json!({ "error": message })),
                Outcome::Refused,
            )
        };
        if request.head.method != Method::POST {
            let (mut response, outcome) =
                refused(StatusCode::METHOD_NOT_ALLOWED, "method: POST only".into());
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return (response, outcome);
        }
        let headers = &request.head.headers;
        let Some(signature) = headers.get("x-appwrite-webhook-signature") else {
            return refused(
                StatusCode::UNAUTHORIZED,
                "X-Appwrite-Webhook-Signature: missing".into(),
            );
        };
        if !self.settings.verifies(signature.as_bytes(), &request.body) {
            return refused(
                StatusCode::UNAUTHORIZED,
                "X-Appwrite-Webhook-Signature: not this webhook's signature of the body \
                 (check --appwrite-webhook-key-file and that --appwrite-webhook-url is the \
                 URL exactly as entered in Appwrite)"
                    .into(),
            );
        }
        // Signed by Appwrite from here on.
        let payload: Value = match serde_json::from_slice(&request.body) {
            Ok(Value::Object(payload)) => Value::Object(payload),
            Ok(_) => return refused(StatusCode::BAD_REQUEST, "body: not a JSON object".into()),
            Err(e) => return refused(StatusCode::BAD_REQUEST, format!("body: not JSON: {e}")),
        };
        let Some(events) = headers
            .get("x-appwrite-webhook-events")
            .and_then(|v| v.to_str().ok())
        else {
            return refused(
                StatusCode::BAD_REQUEST,
                "X-Appwrite-Webhook-Events: missing".into(),
            );
        };
        let users = match users_to_revoke(events, &payload) {
            Ok(users) => users,
            Err(problem) => {
                return refused(
                    StatusCode::BAD_REQUEST,
                    format!("X-Appwrite-Webhook-Events: {problem}"),
                );
            }
        };
        if users.is_empty() {
            debug!(events, "an Appwrite event that revokes nobody");
            return (
                respond_json(StatusCode::OK, &json!({ "status": "ignored" })),
                Outcome::Ignored,
            );
        }
        for user in &users {
            if self.revoker.revoke(user, SOURCE).await.is_err() {
                return (
                    respond_json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({ "error": "the store did not acknowledge the revocation; \
                                           deliver it again" }),
                    ),
                    Outcome::Unavailable,
                );
            }
        }
        (
            respond_json(StatusCode::OK, &json!({ "status": "revoked" })),
            Outcome::Revoked,
        )
    }
}

impl<S: Store> Route for Webhook<S> {
    fn path(&self) -> &'static str {
        "/webhooks/appwrite"
    }

    fn statuses(&self) -> &'static [u16] {
        &[200, 400, 401, 405, 503]
    }

    fn handle(
        &self,
        request: HttpRequest,
    ) -> Pin<Box<dyn Future<Output = HttpResponse> + Send + '_>> {
        Box::pin(async move {
            let (response, outcome) = self.answer(request).await;
            metrics::delivery(SOURCE, outcome);
            response
        })
    }
}

/// The user events that revoke their user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    SessionDelete,
    SessionsDelete,
    Password,
    Recovery,
    Status,
    UserDelete,
}

/// One piece of a family's pattern: a word, or an ID (one or more dot-separated parts).
#[derive(Clone, Copy)]
enum Part {
    Word(&'static str),
    User,
    Other,
}

impl Family {
    const ALL: [Family; 6] = [
        Family::SessionDelete,
        Family::SessionsDelete,
        Family::Password,
        Family::Recovery,
        Family::Status,
        Family::UserDelete,
    ];

    fn pattern(self) -> &'static [Part] {
        use Part::{Other, User, Word};
        match self {
            Family::SessionDelete => {
                &[Word("users"), User, Word("sessions"), Other, Word("delete")]
            }
            Family::SessionsDelete => &[Word("users"), User, Word("sessions"), Word("delete")],
            Family::Password => &[Word("users"), User, Word("update"), Word("password")],
            Family::Recovery => &[Word("users"), User, Word("recovery"), Other, Word("update")],
            Family::Status => &[Word("users"), User, Word("update"), Word("status")],
            Family::UserDelete => &[Word("users"), User, Word("delete")],
        }
    }

    /// The form Appwrite sends with every ID replaced by `*`.
    fn wildcard(self) -> String {
        self.pattern()
            .iter()
            .map(|part| match part {
                Part::Word(word) => word,
                Part::User | Part::Other => "*",
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Every user ID `segments` can be read as naming in this family.
    fn users(self, segments: &[&str]) -> Vec<String> {
        let mut found = Vec::new();
        read(self.pattern(), segments, None, &mut found);
        found
    }
}

/// Reads `segments` against `pattern`, each ID taking one or more segments; pushes the
/// user ID of every reading that matches whole.
fn read(pattern: &[Part], segments: &[&str], user: Option<String>, found: &mut Vec<String>) {
    match pattern.split_first() {
        None => {
            if segments.is_empty()
                && let Some(user) = user
            {
                found.push(user);
            }
        }
        Some((Part::Word(word), rest)) => {
            if segments.first() == Some(word) {
                read(rest, &segments[1..], user, found);
            }
        }
        Some((id, rest)) => {
            for take in 1..=segments.len() {
                let user = match id {
                    Part::User => Some(segments[..take].join(".")),
                    _ => user.clone(),
                };
                read(rest, &segments[take..], user, found);
            }
        }
    }
}

/// The users a delivery revokes, from its events header and its payload; `Err` says
/// why the header is not Appwrite's.
fn users_to_revoke(header: &str, payload: &Value) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for name in header.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let well_formed = name.len() <= MAX_EVENT_BYTES
            && name.split('.').all(|segment| {
                !segment.is_empty()
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'*'))
            });
        if !well_formed {
            return Err(format!(
                "{:?} is not an Appwrite event name",
                name.chars().take(80).collect::<String>()
            ));
        }
        names.push(name);
    }
    if names.is_empty() {
        return Err("no event name".into());
    }
    let concrete: Vec<&str> = names.iter().copied().filter(|n| !n.contains('*')).collect();
    // The event itself: a concrete name that no other concrete name extends.
    let events = concrete.iter().filter(|name| {
        !concrete.iter().any(|other| {
            other.len() > name.len()
                && other.starts_with(*name)
                && other.as_bytes()[name.len()] == b'.'
        })
    });
    let mut readings: Vec<(Family, String)> = Vec::new();
    for event in events {
        let segments: Vec<&str> = event.split('.').collect();
        for family in Family::ALL {
            readings.extend(family.users(&segments).into_iter().map(|u| (family, u)));
        }
    }
    // The families Appwrite announced by their wildcard forms settle a name that reads
    // two ways; without them, every reading counts.
    if readings
        .iter()
        .any(|(family, _)| names.contains(&family.wildcard().as_str()))
    {
        readings.retain(|(family, _)| names.contains(&family.wildcard().as_str()));
    }
    // A blocked user is revoked; an unblocked one is not.
    if readings.iter().any(|(family, _)| *family == Family::Status) {
        match payload.get("status") {
            Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => readings.retain(|(family, _)| *family != Family::Status),
            _ => return Err("update.status with no boolean \"status\" in the body".into()),
        }
    }
    let mut users: Vec<String> = Vec::new();
    for (_, user) in readings {
        if !users.contains(&user) {
            users.push(user);
        }
    }
    if users.len() > 1 {
        let named: Vec<String> = users
            .iter()
            .filter(|user| names.contains(&format!("users.{user}").as_str()))
            .cloned()
            .collect();
        if !named.is_empty() {
            users = named;
        }
    }
    if let Some(user) = users.iter().find(|user| !user_id_ok(user)) {
        return Err(format!(
            "a user ID of {} bytes (at most {})",
            user.len(),
            crate::service::MAX_USER_ID_BYTES
        ));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Appwrite's `Event::generateEvents` sends for a pattern and its parameters,
    /// written out from its source for the cases below (concrete, each placeholder as
    /// `*`, one at a time, and the shorter forms of the resource).
    const SESSION_DELETE: &str = "users.u1.sessions.s1.delete,users.*.sessions.*.delete,\
        users.*.sessions.s1.delete,users.u1.sessions.*.delete,users.u1.sessions.s1,\
        users.*.sessions.*,users.*.sessions.s1,users.u1.sessions.*,users.u1,users.*";
    const MFA_DELETE: &str = "users.u1.delete,users.*.delete,users.u1.delete.mfa,\
        users.*.delete.mfa,users.u1,users.*";
    const NAME_UPDATE: &str = "users.u1.update,users.*.update,users.u1.update.name,\
        users.*.update.name,users.u1,users.*";

    fn users(header: &str, payload: Value) -> Result<Vec<String>, String> {
        users_to_revoke(header, &payload)
    }

    /// Each family revokes the user named in the event, in any order of the header.
    #[test]
    fn the_six_families_revoke_their_user() {
        let cases = [
            SESSION_DELETE.to_owned(),
            "users.u1.sessions,users.*.sessions,users.u1.sessions.delete,users.*.sessions.delete,users.u1,users.*".into(),
            "users.u1.update,users.*.update,users.u1.update.password,users.*.update.password,users.u1,users.*".into(),
            "users.u1.recovery.t9.update,users.*.recovery.*.update,users.*.recovery.t9.update,users.u1.recovery.*.update,users.u1.recovery.t9,users.*.recovery.*,users.*.recovery.t9,users.u1.recovery.*,users.u1,users.*".into(),
            "users.u1.update,users.*.update,users.u1.update.status,users.*.update.status,users.u1,users.*".into(),
            "users.u1.delete,users.*.delete,users.u1,users.*".into(),
        ];
        for header in cases {
            assert_eq!(
                users(&header, json!({"status": false})).unwrap(),
                ["u1"],
                "{header}"
            );
            let mut reversed: Vec<&str> = header.split(',').collect();
            reversed.reverse();
            assert_eq!(
                users(&reversed.join(","), json!({"status": false})).unwrap(),
                ["u1"]
            );
        }
    }

    /// Events that end no session revoke nobody: an authenticator removed (whose header
    /// holds `users.u1.delete` too), a name changed, a user unblocked, a session created.
    #[test]
    fn other_events_revoke_nobody() {
        assert!(users(MFA_DELETE, json!({})).unwrap().is_empty());
        assert!(users(NAME_UPDATE, json!({})).unwrap().is_empty());
        let unblocked = "users.u1.update.status,users.*.update.status,users.u1,users.*";
        assert!(
            users(unblocked, json!({"status": true}))
                .unwrap()
                .is_empty()
        );
        let created = SESSION_DELETE.replace("delete", "create");
        assert!(users(&created, json!({})).unwrap().is_empty());
        assert!(
            users(
                "databases.d1.collections.c1.documents.x.delete,databases.*",
                json!({})
            )
            .unwrap()
            .is_empty()
        );
    }

    /// User IDs with dots (allowed in Appwrite custom IDs) are read whole, the wildcard
    /// forms settling a name that reads two ways.
    #[test]
    fn dotted_ids_are_read_whole() {
        let header = SESSION_DELETE.replace("u1", "ada.lovelace");
        assert_eq!(users(&header, json!({})).unwrap(), ["ada.lovelace"]);
        // users.a.sessions.delete could be user "a.sessions" deleted: the wildcard says
        // it is every session of "a".
        let header = "users.a.sessions,users.*.sessions,users.a.sessions.delete,users.*.sessions.delete,users.a,users.*";
        assert_eq!(users(header, json!({})).unwrap(), ["a"]);
        let header = "users.a.sessions.delete,users.*.delete,users.a.sessions,users.*";
        assert_eq!(users(header, json!({})).unwrap(), ["a.sessions"]);
    }

    /// A header that is not Appwrite's is refused, naming what is wrong.
    #[test]
    fn malformed_headers_are_refused() {
        for header in [
            "",
            " , ",
            "users..delete",
            "users.u1.delete;drop",
            "users.ü.delete",
        ] {
            assert!(users(header, json!({})).is_err(), "{header:?}");
        }
        let long = format!("users.{}.delete", "a".repeat(300));
        assert!(users(&long, json!({})).is_err());
        let header = "users.u1.update.status,users.*.update.status";
        assert!(users(header, json!({})).unwrap_err().contains("status"));
    }

    /// The signature is Appwrite's formula: base64(HMAC-SHA1(key, url . body)); the
    /// vector was computed with PHP's `base64_encode(hash_hmac('sha1', $url . $body,
    /// $key, true))` semantics by `openssl dgst -sha1 -hmac`.
    #[test]
    fn signature_is_appwrites() {
        let settings = Settings::new(b"key", "https://cache.example.com/webhooks/appwrite".into());
        let body = br#"{"$id":"u1"}"#;
        let expected = {
            let mut mac = Hmac::<Sha1>::new_from_slice(b"key").unwrap();
            mac.update(b"https://cache.example.com/webhooks/appwrite{\"$id\":\"u1\"}");
            BASE64.encode(mac.finalize().into_bytes())
        };
        assert_eq!(expected, "iNGjwTxs4+VhpIF9SPoBOrMEDMU=");
        assert!(settings.verifies(expected.as_bytes(), body));
        assert!(!settings.verifies(expected.as_bytes(), br#"{"$id":"u2"}"#));
        assert!(!settings.verifies(b"not base64!", body));
        assert!(!settings.verifies(b"", body));
    }
}
