//! A cached session as the Python service stores it: one JSON object per entry.
//!
//! ```json
//! {"user_id": "u1", "email": "a@example.com", "name": "A", "email_verified": true,
//!  "tier": "free", "created_at": "2024-01-15T10:30:00+00:00",
//!  "updated_at": "2024-01-15T10:30:00+00:00",
//!  "session_expire": "2024-02-14T10:30:00+00:00", "cached_at": 1732780000.123456}
//! ```
//!
//! `cached_at` is written last, by the store, from the store's clock: the service encodes
//! everything before it and the store appends the instant and the closing brace.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::{Micros, format_iso, parse_iso};

/// The user a session belongs to, as the identity provider described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub email_verified: bool,
    pub tier: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A validated session: who, and until when the identity provider honours it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user: User,
    pub session_expire: DateTime<Utc>,
}

/// A session as read back from the store, with the instant it was cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedSession {
    pub session: Session,
    pub cached_at: Micros,
}

/// Why a stored value is not a session.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not the JSON layout of a cached session: {0}")]
    Json(#[from] serde_json::Error),
    #[error("field {0} is not an ISO 8601 instant")]
    Instant(&'static str),
    #[error("field cached_at is not a number of seconds")]
    CachedAt,
}

/// The stored form, field for field. Optional strings are read as empty, since the
/// Python service accepts them too.
#[derive(Deserialize)]
struct Stored {
    user_id: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
    email_verified: bool,
    #[serde(default)]
    tier: Option<String>,
    created_at: String,
    updated_at: String,
    session_expire: String,
    /// The Python service reads a missing `cached_at` as 0.
    #[serde(default)]
    cached_at: f64,
}

/// The written form, in the Python service's key order; `cached_at` follows.
#[derive(Serialize)]
struct Written<'a> {
    user_id: &'a str,
    email: &'a str,
    name: &'a str,
    email_verified: bool,
    tier: &'a str,
    created_at: String,
    updated_at: String,
    session_expire: String,
}

/// Reads a stored value.
pub fn decode(raw: &[u8]) -> Result<CachedSession, DecodeError> {
    let stored: Stored = serde_json::from_slice(raw)?;
    let instant = |text: &str, field| parse_iso(text).ok_or(DecodeError::Instant(field));
    Ok(CachedSession {
        session: Session {
            user: User {
                id: stored.user_id,
                email: stored.email.unwrap_or_default(),
                name: stored.name.unwrap_or_default(),
                email_verified: stored.email_verified,
                tier: stored.tier.unwrap_or_default(),
                created_at: instant(&stored.created_at, "created_at")?,
                updated_at: instant(&stored.updated_at, "updated_at")?,
            },
            session_expire: instant(&stored.session_expire, "session_expire")?,
        },
        cached_at: Micros::from_seconds_f64(stored.cached_at).ok_or(DecodeError::CachedAt)?,
    })
}

/// Writes a session up to and including `"cached_at":`; the store appends the instant
/// (see [`finish`]) so that it comes from the store's clock.
pub fn encode_head(session: &Session) -> String {
    let user = &session.user;
    let written = Written {
        user_id: &user.id,
        email: &user.email,
        name: &user.name,
        email_verified: user.email_verified,
        tier: &user.tier,
        created_at: format_iso(user.created_at),
        updated_at: format_iso(user.updated_at),
        session_expire: format_iso(session.session_expire),
    };
    let mut json = serde_json::to_string(&written).expect("plain strings always serialize");
    json.pop(); // the closing brace
    json.push_str(",\"cached_at\":");
    json
}

/// Completes [`encode_head`] with the instant of caching (the Lua scripts do the same).
pub fn finish(head: &str, cached_at: Micros) -> String {
    format!("{head}{}}}", cached_at.seconds())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        let t = parse_iso("2024-01-15T10:30:00.5+00:00").unwrap();
        Session {
            user: User {
                id: "u1".into(),
                email: "a@example.com".into(),
                name: "Ann \"A\" Lee".into(),
                email_verified: true,
                tier: "pro".into(),
                created_at: t,
                updated_at: t,
            },
            session_expire: parse_iso("2030-01-01T00:00:00Z").unwrap(),
        }
    }

    /// What the service writes reads back to the same session and instant.
    #[test]
    fn round_trip() {
        let head = encode_head(&session());
        let raw = finish(&head, Micros(1_732_780_000_123_456));
        assert!(raw.starts_with("{\"user_id\":\"u1\""), "{raw}");
        assert!(raw.ends_with(",\"cached_at\":1732780000.123456}"), "{raw}");
        let back = decode(raw.as_bytes()).unwrap();
        assert_eq!(back.session, session());
        assert_eq!(back.cached_at, Micros(1_732_780_000_123_456));
    }

    /// Values that are not sessions are errors, never a partial session.
    #[test]
    fn rejects_garbage() {
        assert!(decode(b"not json").is_err());
        assert!(decode(b"{}").is_err());
        assert!(decode(br#"{"user_id":"u","email_verified":true,"created_at":"x","updated_at":"x","session_expire":"x"}"#).is_err());
    }
}
