//! Appwrite's webhooks worker, for the Appwrite stand-in: deliveries built as
//! appwrite/appwrite `src/Appwrite/Platform/Workers/Webhooks.php` builds them, onto the
//! service's HTTP listener.
//!
//! - The body is PHP's `json_encode` of the payload with its default flags: `/` written
//!   `\/`, every character past ASCII as `\uXXXX` ([`php_json_encode`]).
//! - The events header is `implode(',', $events)` of `Event::generateEvents` (ported in
//!   [`generate_events`]): the concrete name, the wildcard forms, the shorter forms.
//! - The signature is `base64_encode(hash_hmac('sha1', $url . $payload, $key, true))`
//!   ([`signature`]), over the URL as configured in Appwrite, which need not be the
//!   address the delivery reaches (a proxy in between).
//! - The other headers are the worker's: `X-Appwrite-Webhook-Id`, `-Name`, `-User-Id`
//!   (the actor), `-Project-Id`, `Content-Type: application/json`, `User-Agent`.
//!
//! The user actions (sign out, password change...) change the stand-in's table first and
//! then deliver their event, as Appwrite does.

use std::net::SocketAddr;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;

use super::{
    http::{self, Reply},
    idp::{APPWRITE_PROJECT, AppwriteStandIn},
    pki::Dir,
};

/// The path the service serves webhooks on.
pub const PATH: &str = "/webhooks/appwrite";

/// PHP's `json_encode($value)` with its default flags: as JSON, with `/` escaped and
/// every character past ASCII written as UTF-16 `\uXXXX` escapes.
pub fn php_json_encode(value: &Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        match c {
            '/' => out.push_str("\\/"),
            c if c.is_ascii() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out
}

/// The worker's signature: base64 of HMAC-SHA1 keyed by `key` over `url` then `body`.
pub fn signature(url: &str, key: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(url.as_bytes());
    mac.update(body.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Appwrite's `Event::generateEvents($pattern, $params)` (`src/Appwrite/Event/Event.php`)
/// for the patterns without database projections: every event name a delivery lists,
/// in Appwrite's order. `params` in the order the API sets them.
pub fn generate_events(pattern: &str, params: &[(&str, &str)]) -> Vec<String> {
    let parts: Vec<&str> = pattern.split('.').collect();
    let count = parts.len();
    let bracketed = |i: usize| parts.get(i).is_some_and(|p| p.starts_with('['));
    let has_sub = count > 3 && bracketed(3);
    let has_sub_sub = count > 5 && bracketed(5) && has_sub;
    let (kind, resource) = (parts[0], parts.get(1).copied());
    let (mut sub_type, mut sub_resource) = (None, None);
    let (mut sub_sub_type, mut sub_sub_resource, mut attribute) = (None, None, None);
    if has_sub {
        sub_type = Some(parts[2]);
        sub_resource = Some(parts[3]);
    }
    if has_sub_sub {
        sub_sub_type = Some(parts[4]);
        sub_sub_resource = Some(parts[5]);
        if count == 8 {
            attribute = Some(parts[7]);
        }
    }
    if has_sub && !has_sub_sub && count == 6 {
        attribute = Some(parts[5]);
    }
    if !has_sub && count == 4 {
        attribute = Some(parts[3]);
    }
    let action = if !has_sub && count > 2 {
        Some(parts[2])
    } else if has_sub_sub {
        parts.get(6).copied()
    } else if has_sub && count > 4 {
        Some(parts[4])
    } else {
        None
    };
    let join = |items: &[Option<&str>]| -> String {
        items
            .iter()
            .map(|i| i.unwrap_or(""))
            .collect::<Vec<_>>()
            .join(".")
    };
    let (t, r) = (Some(kind), resource);
    let mut patterns: Vec<String> = Vec::new();
    if let Some(action) = action {
        let a = Some(action);
        if sub_sub_resource.is_some() {
            if attribute.is_some() {
                patterns.push(join(&[
                    t,
                    r,
                    sub_type,
                    sub_resource,
                    sub_sub_type,
                    sub_sub_resource,
                    a,
                    attribute,
                ]));
            }
            patterns.push(join(&[
                t,
                r,
                sub_type,
                sub_resource,
                sub_sub_type,
                sub_sub_resource,
                a,
            ]));
            patterns.push(join(&[
                t,
                r,
                sub_type,
                sub_resource,
                sub_sub_type,
                sub_sub_resource,
            ]));
        } else if sub_resource.is_some() {
            if attribute.is_some() {
                patterns.push(join(&[t, r, sub_type, sub_resource, a, attribute]));
            }
            patterns.push(join(&[t, r, sub_type, sub_resource, a]));
            patterns.push(join(&[t, r, sub_type, sub_resource]));
        } else {
            patterns.push(join(&[t, r, a]));
        }
        if attribute.is_some() {
            patterns.push(join(&[t, r, a, attribute]));
        }
    }
    if sub_sub_resource.is_some() {
        patterns.push(join(&[
            t,
            r,
            sub_type,
            sub_resource,
            sub_sub_type,
            sub_sub_resource,
        ]));
    }
    if sub_resource.is_some() {
        patterns.push(join(&[t, r, sub_type, sub_resource]));
    }
    patterns.push(join(&[t, r]));
    unique(&mut patterns);

    // PHP's str_replace with arrays: each key in turn, over the result of the last.
    let keys: Vec<&str> = params.iter().map(|(k, _)| *k).collect();
    let replace = |text: &str, which: &[&str], with: Option<&str>| -> String {
        let mut text = text.to_owned();
        for (key, value) in params {
            if which.contains(key) {
                text = text.replace(key, with.unwrap_or(value));
            }
        }
        text
    };
    let mut events = Vec::new();
    for pattern in &patterns {
        events.push(replace(pattern, &keys, None));
        events.push(replace(pattern, &keys, Some("*")));
        for key in &keys {
            for current in &keys {
                if sub_sub_resource.is_some() {
                    for sub_current in &keys {
                        if sub_current == current || sub_current == key {
                            continue;
                        }
                        let first = replace(pattern, &[sub_current], Some("*"));
                        events.push(replace(&first, &keys, None));
                        let both = replace(&first, &[current], Some("*"));
                        events.push(replace(&both, &keys, None));
                        let second = replace(pattern, &[current], Some("*"));
                        events.push(replace(&second, &keys, None));
                    }
                } else {
                    if current == key {
                        continue;
                    }
                    let one = replace(pattern, &[current], Some("*"));
                    events.push(replace(&one, &keys, None));
                }
            }
        }
    }
    let mut events: Vec<String> = events
        .into_iter()
        .map(|e| e.replace(['[', ']'], ""))
        .collect();
    unique(&mut events);
    events
}

/// PHP's `array_unique`: the first of each value, in order.
fn unique(items: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    items.retain(|item| seen.insert(item.clone()));
}

/// A webhook of an Appwrite project, delivering to the service.
pub struct AppwriteWebhooks {
    /// Where deliveries reach the service.
    target: SocketAddr,
    /// The URL as configured in Appwrite (signed with every body).
    url: String,
    key: String,
    files: Dir,
    /// The user whose action fires the events (`X-Appwrite-Webhook-User-Id`).
    actor: String,
}

impl AppwriteWebhooks {
    /// A webhook configured with `url`, delivering to `target`, with a key of its own.
    pub fn new(target: SocketAddr, url: &str) -> AppwriteWebhooks {
        let key: String = (0..128)
            .map(|i| char::from(b"0123456789abcdef"[(i * 7 + url.len()) % 16]))
            .collect();
        AppwriteWebhooks {
            target,
            url: url.to_owned(),
            key,
            files: Dir::new(),
            actor: "admin-1".into(),
        }
    }

    /// A webhook whose URL is the service's own address.
    pub fn direct(target: SocketAddr) -> AppwriteWebhooks {
        AppwriteWebhooks::new(target, &format!("http://{target}{PATH}"))
    }

    /// The service's flags for this webhook; the key goes in a file that lives as long
    /// as the webhook.
    pub fn flags(&self) -> Vec<String> {
        let key = self
            .files
            .write("appwrite-webhook-key", format!("{}\n", self.key));
        vec![
            "--appwrite-webhook-key-file".into(),
            key,
            "--appwrite-webhook-url".into(),
            self.url.clone(),
        ]
    }

    /// The signature key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The URL as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The headers and body of a delivery of `pattern`'s event, as the worker sends it.
    pub fn delivery(
        &self,
        pattern: &str,
        params: &[(&str, &str)],
        payload: &Value,
    ) -> (Vec<(String, String)>, String) {
        let body = php_json_encode(payload);
        let events = generate_events(pattern, params).join(",");
        let headers = vec![
            ("Content-Type".into(), "application/json".into()),
            (
                "User-Agent".into(),
                "AppwriteServer/1.8.0. Please report abuse at security@appwrite.io".into(),
            ),
            ("X-Appwrite-Webhook-Id".into(), "webhook-1".into()),
            ("X-Appwrite-Webhook-Events".into(), events),
            ("X-Appwrite-Webhook-Name".into(), "session-cache".into()),
            ("X-Appwrite-Webhook-User-Id".into(), self.actor.clone()),
            (
                "X-Appwrite-Webhook-Project-Id".into(),
                APPWRITE_PROJECT.into(),
            ),
            (
                "X-Appwrite-Webhook-Signature".into(),
                signature(&self.url, &self.key, &body),
            ),
        ];
        (headers, body)
    }

    /// Sends these headers and body to the service.
    pub async fn send(&self, headers: &[(String, String)], body: &str) -> Reply {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http::post(self.target, PATH, &headers, body.as_bytes()).await
    }

    /// Delivers `pattern`'s event with `params` and `payload`.
    pub async fn deliver(&self, pattern: &str, params: &[(&str, &str)], payload: &Value) -> Reply {
        let (headers, body) = self.delivery(pattern, params, payload);
        self.send(&headers, &body).await
    }

    /// A sign-out: the session deleted at Appwrite, then its event; `None` when the
    /// token has no session (already ended).
    pub async fn sign_out(&self, appwrite: &AppwriteStandIn, token: &str) -> Option<Reply> {
        let (session_id, user_id) = appwrite.session_of(token)?;
        appwrite.revoke(token);
        let reply = self
            .deliver(
                "users.[userId].sessions.[sessionId].delete",
                &[("userId", &user_id), ("sessionId", &session_id)],
                &session_model(&user_id, &session_id),
            )
            .await;
        Some(reply)
    }

    /// An admin ending every session of the user.
    pub async fn delete_sessions(&self, appwrite: &AppwriteStandIn, user_id: &str) -> Reply {
        appwrite.revoke_user(user_id);
        self.deliver(
            "users.[userId].sessions.delete",
            &[("userId", user_id)],
            &user_model(user_id, true),
        )
        .await
    }

    /// A password change (Appwrite 1.8+ deletes the other sessions without an event).
    pub async fn change_password(&self, appwrite: &AppwriteStandIn, user_id: &str) -> Reply {
        appwrite.revoke_user(user_id);
        self.deliver(
            "users.[userId].update.password",
            &[("userId", user_id)],
            &user_model(user_id, true),
        )
        .await
    }

    /// A password reset by e-mail (the recovery token used).
    pub async fn reset_password(&self, appwrite: &AppwriteStandIn, user_id: &str) -> Reply {
        appwrite.revoke_user(user_id);
        self.deliver(
            "users.[userId].recovery.[tokenId].update",
            &[("userId", user_id), ("tokenId", "recovery-7")],
            &json!({
                "$id": "recovery-7", "$createdAt": "2026-01-02T03:04:05.000+00:00",
                "userId": user_id, "secret": "", "expire": "2026-01-02T04:04:05.000+00:00",
                "phrase": "",
            }),
        )
        .await
    }

    /// An admin blocking the user (`status` false), or unblocking (true).
    pub async fn set_status(
        &self,
        appwrite: &AppwriteStandIn,
        user_id: &str,
        status: bool,
    ) -> Reply {
        if !status {
            appwrite.revoke_user(user_id);
        }
        self.deliver(
            "users.[userId].update.status",
            &[("userId", user_id)],
            &user_model(user_id, status),
        )
        .await
    }

    /// The user deleted.
    pub async fn delete_user(&self, appwrite: &AppwriteStandIn, user_id: &str) -> Reply {
        appwrite.revoke_user(user_id);
        self.deliver(
            "users.[userId].delete",
            &[("userId", user_id)],
            &user_model(user_id, true),
        )
        .await
    }
}

/// Appwrite's User model for `user_id`, with a name past ASCII and a URL in its prefs,
/// so that the body's escapes are the worker's.
pub fn user_model(user_id: &str, status: bool) -> Value {
    json!({
        "$id": user_id,
        "$createdAt": "2024-01-15T10:30:00.000+00:00",
        "$updatedAt": "2024-06-01T08:00:00.000+00:00",
        "name": "Zoë Ångström",
        "registration": "2024-01-15T10:30:00.000+00:00",
        "status": status,
        "labels": [],
        "passwordUpdate": "2024-06-01T08:00:00.000+00:00",
        "email": format!("{user_id}@example.com"),
        "phone": "",
        "emailVerification": true,
        "phoneVerification": false,
        "mfa": false,
        "prefs": { "tier": "pro", "avatar": "https://cdn.example.com/a/b.png" },
        "targets": [],
        "accessedAt": "2026-01-02T03:04:05.000+00:00",
    })
}

/// Appwrite's Session model, as a sign-out's payload.
pub fn session_model(user_id: &str, session_id: &str) -> Value {
    json!({
        "$id": session_id,
        "$createdAt": "2026-01-02T03:04:05.000+00:00",
        "$updatedAt": "2026-01-02T03:04:05.000+00:00",
        "userId": user_id,
        "expire": "2027-01-02T03:04:05.000+00:00",
        "provider": "email",
        "providerUid": format!("{user_id}@example.com"),
        "ip": "127.0.0.1",
        "osName": "Linux",
        "clientName": "Chrome",
        "deviceName": "desktop",
        "countryName": "Österreich",
        "current": false,
        "factors": ["password"],
        "secret": "",
    })
}
