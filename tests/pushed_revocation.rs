//! Revocations pushed by the identity provider (SPEC §12), end to end: the real server
//! on port 0 with its HTTP listener on a free port, over the memory store, one Redis,
//! Sentinels and a Cluster; a stand-in Appwrite whose webhooks are built as Appwrite's
//! worker builds them (`support::webhooks`), a stand-in OpenID provider that signs
//! logout tokens and serves its key set (`support::oidc`), and an RFC 7662 stand-in
//! whose answers carry `sid`.

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bb8_redis::redis;
use chrono::Utc;
use serde_json::{Value, json};
use session_cache::{
    keys::TokenHash,
    pb::{self, GetOutcome, ValidateOutcome, session_cache_client::SessionCacheClient},
};
use support::{
    Backend, Harness, Redis, free_port,
    http::{self, Reply},
    idp::{AppwriteStandIn, IntrospectionStandIn, Mode, idp_user, in_a_day},
    oidc::{self, OidcStandIn},
    race::{self, Revoke, Sessions, validate},
    webhooks::{self, AppwriteWebhooks},
};
use tokio::time::Instant;
use tonic::transport::Channel;

async fn get(h: &mut Harness, token: &str) -> GetOutcome {
    support::get_outcome(&h.get(token).await)
}

/// A free loopback address for the HTTP listener.
fn http_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Revocations wait for a replica behind Sentinels and on a Cluster: on a loaded machine
/// the default 100 ms store timeout would turn some into 503s that the tests do not
/// expect (the 503 itself is tested on its own).
const SLACK: &[&str] = &["--store-timeout-ms", "2000"];

/// A store that outlives the servers a test starts over it.
enum Store {
    Memory,
    Redis(Redis),
    Sentinel(support::sentinel::SentinelTopology),
    Cluster(support::cluster::ClusterTopology),
}

impl Store {
    async fn start(backend: Backend) -> Store {
        match backend {
            Backend::Memory => Store::Memory,
            Backend::Redis => Store::Redis(Redis::start().await),
            Backend::Sentinel => Store::Sentinel(
                support::sentinel::SentinelTopology::start(Default::default()).await,
            ),
            Backend::Cluster => Store::Cluster(
                support::cluster::ClusterTopology::start(support::cluster::Cluster {
                    primaries: 3,
                    replicas_per_primary: 1,
                })
                .await,
            ),
        }
    }

    /// A server over this store with `args`, serving.
    async fn serve(&self, args: &[String]) -> Harness {
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        match self {
            Store::Memory => Harness::over(None, &args).await,
            Store::Redis(redis) => {
                let url = redis.url();
                args.extend(["--redis-url", &url]);
                Harness::over(None, &args).await
            }
            Store::Sentinel(topology) => {
                args.extend(SLACK);
                Harness::over_sentinels(topology, &args).await
            }
            Store::Cluster(topology) => {
                args.extend(SLACK);
                Harness::over_cluster(topology, &args).await
            }
        }
    }
}

/// The service over `store` with its HTTP listener on `addr` and these flags.
async fn serve(store: &Store, addr: SocketAddr, flags: &[Vec<String>]) -> Harness {
    let mut args = strings(&["--http-listen", &addr.to_string()]);
    for set in flags {
        args.extend(set.iter().cloned());
    }
    store.serve(&args).await
}

fn assert_revoked(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 200, "{what}: {}", reply.text());
    assert_eq!(reply.json()["status"], "revoked", "{what}");
}

/// Caches a session of `user` under `token` through Validate (one provider call) and
/// checks that Get now hits it.
async fn cache(h: &mut Harness, appwrite: &AppwriteStandIn, token: &str, user: &str) {
    appwrite.add_session(token, &idp_user(user), in_a_day());
    assert_eq!(validate(&mut h.client, token).await, ValidateOutcome::Valid);
    assert_eq!(get(h, token).await, GetOutcome::Hit, "{token} not cached");
}

/// After a pushed revocation of `token`'s user: the next Get misses, and the next
/// Validate asks the provider again (which now refuses the token).
async fn assert_gone(h: &mut Harness, appwrite: &AppwriteStandIn, token: &str, what: &str) {
    assert_ne!(get(h, token).await, GetOutcome::Hit, "{what}: still cached");
    let before = appwrite.calls().account;
    assert_eq!(
        validate(&mut h.client, token).await,
        ValidateOutcome::Invalid,
        "{what}"
    );
    assert_eq!(
        appwrite.calls().account,
        before + 1,
        "{what}: Validate did not ask the provider again"
    );
}

/// Every Appwrite event family and a back-channel logout (by `sub`, and by `sid`
/// alone) take a VALID cached session out: the next Get misses and the next Validate
/// asks the provider again.
async fn every_revocation_reaches(backend: Backend) {
    let store = Store::start(backend).await;
    let appwrite = AppwriteStandIn::start().await;
    let oidc = OidcStandIn::start().await;
    let addr = http_addr();
    let hooks = AppwriteWebhooks::direct(addr);
    let mut h = serve(
        &store,
        addr,
        &[appwrite.flags(), hooks.flags(), oidc.flags()],
    )
    .await;
    let families = [
        "sign-out",
        "sessions deleted",
        "password changed",
        "password reset",
        "blocked",
        "user deleted",
    ];
    for (i, family) in families.into_iter().enumerate() {
        let (token, user) = (format!("{backend:?}-tok-{i}"), format!("{backend:?}-u{i}"));
        cache(&mut h, &appwrite, &token, &user).await;
        let reply = match family {
            "sign-out" => hooks.sign_out(&appwrite, &token).await.unwrap(),
            "sessions deleted" => hooks.delete_sessions(&appwrite, &user).await,
            "password changed" => hooks.change_password(&appwrite, &user).await,
            "password reset" => hooks.reset_password(&appwrite, &user).await,
            "blocked" => hooks.set_status(&appwrite, &user, false).await,
            _ => hooks.delete_user(&appwrite, &user).await,
        };
        assert_revoked(&reply, family);
        assert_gone(&mut h, &appwrite, &token, family).await;
    }

    // Back-channel logout naming the user.
    let (token, user) = (format!("{backend:?}-tok-bc"), format!("{backend:?}-u-bc"));
    cache(&mut h, &appwrite, &token, &user).await;
    appwrite.revoke_user(&user);
    let reply = oidc::post_logout(addr, &oidc.logout_token(Some(&user), Some("sid-x"))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_gone(&mut h, &appwrite, &token, "back-channel logout").await;
    drop(h);

    // Back-channel logout naming only the session: its user is the one an
    // introspection answer carrying that sid named.
    let keycloak = IntrospectionStandIn::start().await;
    let addr = http_addr();
    let mut h = serve(&store, addr, &[keycloak.flags(), oidc.flags()]).await;
    let (token, user, sid) = (
        format!("{backend:?}-tok-sid"),
        format!("{backend:?}-u-sid"),
        format!("{backend:?}-sid-1f0e"),
    );
    keycloak.add_claims(
        &token,
        json!({ "sub": user, "sid": sid, "exp": in_a_day().timestamp() }),
    );
    assert_eq!(
        validate(&mut h.client, &token).await,
        ValidateOutcome::Valid
    );
    assert_eq!(get(&mut h, &token).await, GetOutcome::Hit);
    if let Store::Redis(redis) = &store {
        // One key per session id, its id hashed, never in clear; as long as an entry.
        let mut conn = redis.conn().await;
        let key = TokenHash::of(&sid).session_id_key();
        let stored: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(stored.as_deref(), Some(user.as_str()));
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!((1..=301).contains(&ttl), "TTL {ttl}");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(keys.iter().all(|k| !k.contains(&sid)), "{keys:?}");
    }
    let unknown = oidc::post_logout(addr, &oidc.logout_token(None, Some("never-seen"))).await;
    assert_eq!(unknown.status, 400, "{}", unknown.text());
    assert_eq!(
        get(&mut h, &token).await,
        GetOutcome::Hit,
        "an unknown sid revoked"
    );
    keycloak.revoke(&token);
    let reply = oidc::post_logout(addr, &oidc.logout_token(None, Some(&sid))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_ne!(get(&mut h, &token).await, GetOutcome::Hit);
    let before = keycloak.calls();
    assert_eq!(
        validate(&mut h.client, &token).await,
        ValidateOutcome::Invalid
    );
    assert_eq!(keycloak.calls(), before + 1, "Validate did not ask again");
}

/// On the memory store.
#[tokio::test]
async fn every_revocation_reaches_the_memory_store() {
    every_revocation_reaches(Backend::Memory).await;
}

/// On one Redis.
#[tokio::test]
async fn every_revocation_reaches_redis() {
    every_revocation_reaches(Backend::Redis).await;
}

/// Behind Sentinels (a primary, a replica, three Sentinels; revocations wait for the
/// replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_revocation_reaches_redis_behind_sentinels() {
    every_revocation_reaches(Backend::Sentinel).await;
}

/// On a Redis Cluster of three primaries with a replica each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_revocation_reaches_a_redis_cluster() {
    every_revocation_reaches(Backend::Cluster).await;
}

/// The stand-in's deliveries are Appwrite's: its signature matches a vector computed
/// with openssl from the worker's formula, its body is PHP's json_encode, and its events
/// header lists what Appwrite's generateEvents lists. So the service is checked against
/// Appwrite, not against a stand-in that could drift along with it.
#[test]
fn the_stand_in_signs_and_names_events_as_appwrite_does() {
    // printf '%s' 'https://cache.example.com/webhooks/appwrite{"$id":"u1","name":"Zo\u00eb","url":"https:\/\/a.example\/b"}' \
    //   | openssl dgst -sha1 -hmac 'webhook-signature-key' -binary | base64
    let body = webhooks::php_json_encode(
        &json!({ "$id": "u1", "name": "Zoë", "url": "https://a.example/b" }),
    );
    assert_eq!(
        body,
        r#"{"$id":"u1","name":"Zo\u00eb","url":"https:\/\/a.example\/b"}"#
    );
    assert_eq!(
        webhooks::signature(
            "https://cache.example.com/webhooks/appwrite",
            "webhook-signature-key",
            &body
        ),
        "QRnzNq6Et3t5I9fp5bHVPOuTN0c="
    );
    // Written out from Event::generateEvents for this pattern and these parameters.
    assert_eq!(
        webhooks::generate_events(
            "users.[userId].sessions.[sessionId].delete",
            &[("userId", "u1"), ("sessionId", "s1")]
        ),
        [
            "users.u1.sessions.s1.delete",
            "users.*.sessions.*.delete",
            "users.u1.sessions.*.delete",
            "users.*.sessions.s1.delete",
            "users.u1.sessions.s1",
            "users.*.sessions.*",
            "users.u1.sessions.*",
            "users.*.sessions.s1",
            "users.u1",
            "users.*",
        ]
    );
    assert_eq!(
        webhooks::generate_events("users.[userId].update.password", &[("userId", "u1")]),
        [
            "users.u1.update",
            "users.*.update",
            "users.u1.update.password",
            "users.*.update.password",
            "users.u1",
            "users.*",
        ]
    );
}

/// A request's headers, by name and value.
type Headers = Vec<(String, String)>;
/// An HTTP status.
type Status = u16;

/// The value of one series in a scrape.
fn series(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .find(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with(['{', ' '])
                && labels.iter().all(|label| l.contains(label))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
}

/// Every refusal leaves the cache as it was: a webhook unsigned, signed with another
/// key, over another URL or body, not JSON, without or with malformed event names, not
/// a POST, too large; events that end no session (an unblock, a name change, an
/// authenticator removed); a webhook whose actor is the cached user but whose event
/// names another. Logout tokens: not a form, missing or twice, a broken header,
/// `alg: none`, HMAC, a key of the wrong type, an unknown key, another issuer or
/// audience, `iat` too old or ahead, `exp` past, a nonce, no logout event, neither sub
/// nor sid, no jti, encrypted, tampered, 1 MB long, not a POST. Each is counted.
#[tokio::test]
async fn refusals_leave_the_cache_as_it_was() {
    let store = Store::start(Backend::Redis).await;
    let appwrite = AppwriteStandIn::start().await;
    let oidc = OidcStandIn::start().await;
    let addr = http_addr();
    // Configured in Appwrite as the address of a proxy in front of the service: the
    // signature covers that URL, not the one the request reaches.
    let hooks = AppwriteWebhooks::new(addr, "https://cache.example.com/hooks/appwrite");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut h = serve(
        &store,
        addr,
        &[
            appwrite.flags(),
            hooks.flags(),
            oidc.flags(),
            strings(&["--metrics-listen", &metrics]),
            // A token with an unknown kid right after a fetch waits out the 5 s between
            // fetches: more than the default request timeout on a loaded machine.
            strings(&["--request-timeout-ms", "15000"]),
        ],
    )
    .await;
    let scrape = async || {
        http::send(
            metrics.parse().unwrap(),
            &http::request("GET", "/metrics", &[], b""),
        )
        .await
        .unwrap()
        .text()
    };
    let before = scrape().await;
    for (path, status) in [
        ("/webhooks/appwrite", "503"),
        ("/backchannel-logout", "503"),
    ] {
        let labels = [
            &format!("path=\"{path}\"")[..],
            &format!("status=\"{status}\""),
        ];
        assert_eq!(
            series(&before, "session_cache_http_requests_total", &labels),
            0.0
        );
    }
    cache(&mut h, &appwrite, "victim-token", "victim").await;
    let calls = appwrite.calls().account;

    // Webhooks.
    let sign_out = |hooks: &AppwriteWebhooks| {
        hooks.delivery(
            "users.[userId].sessions.[sessionId].delete",
            &[("userId", "victim"), ("sessionId", "session1")],
            &webhooks::session_model("victim", "session1"),
        )
    };
    let (headers, body) = sign_out(&hooks);
    let without = |name: &str| -> Vec<(String, String)> {
        headers
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(name))
            .cloned()
            .collect()
    };
    let with = |name: &str, value: &str| -> Vec<(String, String)> {
        let mut headers = without(name);
        headers.push((name.into(), value.into()));
        headers
    };
    let resigned = |body: &str| {
        let mut headers = without("X-Appwrite-Webhook-Signature");
        headers.push((
            "X-Appwrite-Webhook-Signature".into(),
            webhooks::signature(hooks.url(), hooks.key(), body),
        ));
        headers
    };
    let signature = "X-Appwrite-Webhook-Signature";
    let events = "X-Appwrite-Webhook-Events";
    let cases: Vec<(&str, Headers, String, u16)> = vec![
        ("no signature", without(signature), body.clone(), 401),
        (
            "another key",
            with(
                signature,
                &webhooks::signature(hooks.url(), "another key", &body),
            ),
            body.clone(),
            401,
        ),
        (
            "signed over the address reached, not the URL configured",
            with(
                signature,
                &webhooks::signature(
                    &format!("http://{addr}/webhooks/appwrite"),
                    hooks.key(),
                    &body,
                ),
            ),
            body.clone(),
            401,
        ),
        (
            "a body changed after signing",
            headers.clone(),
            body.replace("victim", "victin"),
            401,
        ),
        (
            "a signature that is not base64",
            with(signature, "%%%"),
            body.clone(),
            401,
        ),
        ("not JSON", resigned("not json"), "not json".into(), 400),
        ("a JSON array", resigned("[1,2]"), "[1,2]".into(), 400),
        (
            "no events header",
            resigned(&body)
                .into_iter()
                .filter(|(n, _)| n != events)
                .collect(),
            body.clone(),
            400,
        ),
        (
            "malformed event names",
            {
                let mut h = resigned(&body);
                h.retain(|(n, _)| n != events);
                h.push((events.into(), "users..delete,users.*".into()));
                h
            },
            body.clone(),
            400,
        ),
        (
            "a body over 64 KiB",
            resigned(&"x".repeat(70_000)),
            "x".repeat(70_000),
            413,
        ),
    ];
    for (what, headers, body, status) in cases {
        let reply = hooks.send(&headers, &body).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert_eq!(get(&mut h, "victim-token").await, GetOutcome::Hit, "{what}");
    }
    let reply = http::send(addr, &http::request("GET", "/webhooks/appwrite", &[], b""))
        .await
        .unwrap();
    assert_eq!((reply.status, reply.header("allow")), (405, "POST"));
    // Events that end no session: 200, ignored.
    for (pattern, payload) in [
        (
            "users.[userId].update.status",
            webhooks::user_model("victim", true),
        ),
        (
            "users.[userId].update.name",
            webhooks::user_model("victim", true),
        ),
        (
            "users.[userId].delete.mfa",
            webhooks::user_model("victim", true),
        ),
        (
            "users.[userId].sessions.[sessionId].create",
            webhooks::session_model("victim", "s9"),
        ),
    ] {
        let params: Vec<(&str, &str)> = if pattern.contains("sessionId") {
            vec![("userId", "victim"), ("sessionId", "s9")]
        } else {
            vec![("userId", "victim")]
        };
        let reply = hooks.deliver(pattern, &params, &payload).await;
        assert_eq!(reply.status, 200, "{pattern}: {}", reply.text());
        assert_eq!(reply.json()["status"], "ignored", "{pattern}");
        assert_eq!(
            get(&mut h, "victim-token").await,
            GetOutcome::Hit,
            "{pattern}"
        );
    }
    // The actor header names the cached user; the event names someone else: the one
    // revoked is the one in the event.
    let (mut headers, body) = hooks.delivery(
        "users.[userId].delete",
        &[("userId", "someone-else")],
        &webhooks::user_model("someone-else", true),
    );
    headers.retain(|(n, _)| n != "X-Appwrite-Webhook-User-Id");
    headers.push(("X-Appwrite-Webhook-User-Id".into(), "victim".into()));
    assert_revoked(&hooks.send(&headers, &body).await, "the event's user");
    assert_eq!(
        get(&mut h, "victim-token").await,
        GetOutcome::Hit,
        "the actor was revoked"
    );

    // Logout tokens.
    let rsa = oidc.current();
    let claims = || oidc.claims(Some("victim"), None);
    let with_claims = |change: &dyn Fn(&mut Value)| {
        let mut claims = claims();
        change(&mut claims);
        rsa.sign(&claims, None)
    };
    let rogue = oidc::Key::generate("rogue", jsonwebtoken::Algorithm::RS256);
    let valid = oidc.logout_token(Some("victim"), None);
    let (head, rest) = valid.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let other_claims = rsa.sign(&oidc.claims(Some("someone"), None), None);
    let tampered = format!(
        "{head}.{}.{signature}",
        other_claims.split('.').nth(1).unwrap()
    );
    let now = Utc::now().timestamp();
    let tokens: Vec<(&str, String, &str)> = vec![
        ("a broken header", "!!!.e30.c2ln".into(), "header"),
        (
            "alg none",
            oidc::unsigned(&json!({ "alg": "none" }), &claims()),
            "none",
        ),
        (
            "HMAC",
            oidc::unsigned(&json!({ "alg": "HS256", "kid": "rsa-1" }), &claims()),
            "HMAC",
        ),
        (
            "signed by the RSA key under the EC key's kid",
            rsa.sign(&claims(), Some(Some("ec-1"))),
            "key",
        ),
        ("an unknown key", rogue.sign(&claims(), None), "kid"),
        (
            "another issuer",
            with_claims(&|c| c["iss"] = json!("https://elsewhere")),
            "iss",
        ),
        (
            "another audience",
            with_claims(&|c| c["aud"] = json!(["someone-else"])),
            "aud",
        ),
        (
            "iat an hour ago",
            with_claims(&|c| c["iat"] = json!(now - 3600)),
            "iat",
        ),
        (
            "iat an hour ahead",
            with_claims(&|c| c["iat"] = json!(now + 3600)),
            "iat",
        ),
        (
            "exp past",
            with_claims(&|c| c["exp"] = json!(now - 3600)),
            "exp",
        ),
        (
            "a nonce",
            with_claims(&|c| c["nonce"] = json!("n-0S6_WzA2Mj")),
            "nonce",
        ),
        (
            "no events",
            with_claims(&|c| {
                c.as_object_mut().unwrap().remove("events");
            }),
            "events",
        ),
        (
            "events without the logout event",
            with_claims(&|c| c["events"] = json!({ "http://schemas.openid.net/event/other": {} })),
            "events",
        ),
        (
            "neither sub nor sid",
            with_claims(&|c| {
                c.as_object_mut().unwrap().remove("sub");
            }),
            "sub or sid",
        ),
        (
            "no jti",
            with_claims(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
            "jti",
        ),
        ("encrypted", "a.b.c.d.e".into(), "encrypted"),
        ("tampered claims", tampered, "signature"),
        ("not a JWT", "hello".into(), "JWT"),
    ];
    for (what, token, mentions) in tokens {
        let reply = oidc::post_logout(addr, &token).await;
        assert_eq!(reply.status, 400, "{what}: {}", reply.text());
        assert_eq!(reply.header("cache-control"), "no-store", "{what}");
        let error = reply.json();
        assert_eq!(error["error"], "invalid_request", "{what}");
        let description = error["error_description"].as_str().unwrap();
        assert!(description.contains(mentions), "{what}: {description}");
        assert!(!description.contains(&token[..token.len().min(40)]) || token.len() < 20);
        assert_eq!(get(&mut h, "victim-token").await, GetOutcome::Hit, "{what}");
    }
    let valid_body = format!("logout_token={valid}");
    let form = "application/x-www-form-urlencoded";
    let forms: Vec<(&str, &str, String, Status)> = vec![
        (
            "a JSON body",
            "application/json",
            format!(r#"{{"logout_token":"{valid}"}}"#),
            400,
        ),
        ("no logout_token", form, "state=x".into(), 400),
        (
            "logout_token twice",
            form,
            format!("{valid_body}&{valid_body}"),
            400,
        ),
        (
            "a token 1 MB long",
            form,
            format!("logout_token={}", "a".repeat(1 << 20)),
            413,
        ),
    ];
    for (what, content_type, body, status) in forms {
        let headers = [("Content-Type", content_type)];
        let reply = http::post(addr, "/backchannel-logout", &headers, body.as_bytes()).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert_eq!(get(&mut h, "victim-token").await, GetOutcome::Hit, "{what}");
    }
    let reply = http::send(addr, &http::request("GET", "/backchannel-logout", &[], b""))
        .await
        .unwrap();
    assert_eq!(reply.status, 405);
    assert_eq!(
        appwrite.calls().account,
        calls,
        "a refusal reached the provider"
    );

    let after = scrape().await;
    let count = |path: &str, status: &str| {
        series(
            &after,
            "session_cache_http_requests_total",
            &[&format!("path=\"{path}\""), &format!("status=\"{status}\"")],
        )
    };
    assert_eq!(count("/webhooks/appwrite", "401"), 5.0);
    assert!(count("/backchannel-logout", "400") >= 20.0);
    assert_eq!(
        series(
            &after,
            "session_cache_pushed_revocations_total",
            &["source=\"appwrite\"", "outcome=\"ignored\""]
        ),
        4.0
    );
}

/// A key set that cannot be had (refused, 5xx, slower than --idp-timeout-ms, hanging,
/// garbage, a reset connection) answers 503, revokes nothing, and the same token is
/// carried out once the set can be had again.
#[tokio::test]
async fn an_unavailable_key_set_gives_503() {
    let store = Store::start(Backend::Memory).await;
    let appwrite = AppwriteStandIn::start().await;
    for mode in [
        Mode::Status(500),
        Mode::Status(404),
        Mode::Slow(Duration::from_millis(1500)),
        Mode::Hang,
        Mode::Garbage,
        Mode::Reset,
    ] {
        let oidc = OidcStandIn::start().await;
        oidc.set_mode(mode.clone());
        let addr = http_addr();
        let mut h = serve(
            &store,
            addr,
            &[
                appwrite.flags(),
                oidc.flags(),
                strings(&["--idp-timeout-ms", "300"]),
            ],
        )
        .await;
        cache(&mut h, &appwrite, "kept", "keeper").await;
        let token = oidc.logout_token(Some("keeper"), None);
        let reply = oidc::post_logout(addr, &token).await;
        assert_eq!(reply.status, 503, "{mode:?}: {}", reply.text());
        assert_eq!(reply.json()["error"], "temporarily_unavailable");
        assert_eq!(get(&mut h, "kept").await, GetOutcome::Hit, "{mode:?}");
        // The set comes back; after the refetch interval the same token is accepted.
        oidc.set_mode(Mode::Normal);
        let deadline = Instant::now() + support::PATIENCE;
        loop {
            let reply = oidc::post_logout(addr, &token).await;
            if reply.status == 200 {
                break;
            }
            assert_eq!(reply.status, 503, "{mode:?}: {}", reply.text());
            assert!(Instant::now() < deadline, "{mode:?}: never accepted");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_ne!(get(&mut h, "kept").await, GetOutcome::Hit, "{mode:?}");
    }
    // A set at an address where nothing listens.
    let oidc = OidcStandIn::start().await;
    let mut flags = oidc.flags();
    flags[5] = support::idp::not_listening_url("/certs");
    let addr = http_addr();
    let _h = serve(&store, addr, &[appwrite.flags(), flags]).await;
    let reply = oidc::post_logout(addr, &oidc.logout_token(Some("keeper"), None)).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
}

/// A logout token delivered twice is carried out once and refused the second time
/// (its jti was seen); another token for the same user is carried out.
#[tokio::test]
async fn a_replayed_logout_token_is_refused() {
    let store = Store::start(Backend::Memory).await;
    let appwrite = AppwriteStandIn::start().await;
    let oidc = OidcStandIn::start().await;
    let addr = http_addr();
    let mut h = serve(&store, addr, &[appwrite.flags(), oidc.flags()]).await;
    cache(&mut h, &appwrite, "t1", "replayed").await;
    let token = oidc.logout_token(Some("replayed"), None);
    assert_eq!(oidc::post_logout(addr, &token).await.status, 200);
    assert_ne!(get(&mut h, "t1").await, GetOutcome::Hit);
    cache(&mut h, &appwrite, "t2", "replayed").await;
    let replay = oidc::post_logout(addr, &token).await;
    assert_eq!(replay.status, 400, "{}", replay.text());
    assert!(replay.text().contains("jti"), "{}", replay.text());
    assert_eq!(
        get(&mut h, "t2").await,
        GetOutcome::Hit,
        "the replay revoked"
    );
    let fresh = oidc.logout_token(Some("replayed"), None);
    assert_eq!(oidc::post_logout(addr, &fresh).await.status, 200);
    assert_ne!(get(&mut h, "t2").await, GetOutcome::Hit);
}

/// The provider rotates its key: the first token with the new kid fetches the set
/// again, without a restart. RSA and EC keys both verify. Tokens with unknown kids,
/// many at once, cost the provider at most one fetch per 5 s, and are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_is_followed_and_unknown_kids_cannot_flood_the_provider() {
    let store = Store::start(Backend::Memory).await;
    let appwrite = AppwriteStandIn::start().await;
    let oidc = OidcStandIn::start().await;
    let addr = http_addr();
    // Tokens wait out the 5 s between fetches: more than the default request timeout on
    // a loaded machine.
    let slow = strings(&["--request-timeout-ms", "15000"]);
    let _h = serve(&store, addr, &[appwrite.flags(), oidc.flags(), slow]).await;
    let ok = |reply: Reply| assert_eq!(reply.status, 200, "{}", reply.text());
    ok(oidc::post_logout(addr, &oidc.logout_token(Some("a"), None)).await);
    assert_eq!(oidc.jwks_requests(), 1);
    let ec = oidc.key("ec-1");
    ok(oidc::post_logout(addr, &ec.sign(&oidc.claims(Some("a"), None), None)).await);
    assert_eq!(oidc.jwks_requests(), 1, "a known key was fetched again");
    // Rotated right after the last fetch: the token waits for the 5 s to pass, and the
    // set fetched then has its key.
    let old = oidc.current();
    let kid = oidc.rotate();
    let started = Instant::now();
    ok(oidc::post_logout(addr, &oidc.logout_token(Some("a"), None)).await);
    eprintln!(
        "rotated to {kid}: answered after {:?}, {} key set requests",
        started.elapsed(),
        oidc.jwks_requests()
    );
    assert_eq!(oidc.jwks_requests(), 2, "the rotation was not followed");
    // The old key left the set: refused once a fetch shows it is gone.
    let reply = oidc::post_logout(addr, &old.sign(&oidc.claims(Some("a"), None), None)).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(oidc.jwks_requests(), 3);
    let rogue = oidc::Key::generate("rogue", jsonwebtoken::Algorithm::ES256);
    let started = Instant::now();
    let flood: Vec<_> = (0..100)
        .map(|i| {
            let token = rogue.sign(
                &oidc.claims(Some("a"), None),
                Some(Some(&format!("kid-{i}"))),
            );
            tokio::spawn(async move { oidc::post_logout(addr, &token).await.status })
        })
        .collect();
    for reply in flood {
        assert_eq!(reply.await.unwrap(), 400);
    }
    let requests = oidc.jwks_requests();
    eprintln!(
        "100 unknown kids in {:?}: {} key set requests in all",
        started.elapsed(),
        requests
    );
    assert!(requests <= 4, "{requests} key set requests");
}

/// With the store not answering, a webhook and a logout token get 503 and nothing is
/// claimed; delivered again once it answers, they are carried out. A revocation that
/// --revocation-replicas cannot get onto a replica is a 503 too.
#[tokio::test]
async fn the_store_down_gives_503_and_nothing_claimed() {
    let store = Store::start(Backend::Redis).await;
    let appwrite = AppwriteStandIn::start().await;
    let oidc = OidcStandIn::start().await;
    let addr = http_addr();
    let hooks = AppwriteWebhooks::direct(addr);
    let mut h = serve(
        &store,
        addr,
        &[appwrite.flags(), hooks.flags(), oidc.flags()],
    )
    .await;
    cache(&mut h, &appwrite, "d1", "down-1").await;
    let (headers, body) = hooks.delivery(
        "users.[userId].sessions.delete",
        &[("userId", "down-1")],
        &webhooks::user_model("down-1", true),
    );
    let token = oidc.logout_token(Some("down-1"), None);
    let Store::Redis(redis) = &store else {
        unreachable!()
    };
    redis.freeze();
    let webhook = hooks.send(&headers, &body).await;
    let logout = oidc::post_logout(addr, &token).await;
    redis.thaw();
    assert_eq!(webhook.status, 503, "{}", webhook.text());
    assert_eq!(logout.status, 503, "{}", logout.text());
    assert!(
        webhook.json()["error"]
            .as_str()
            .unwrap()
            .contains("deliver it again")
    );
    // Appwrite's queue-retry sends the same delivery again.
    assert_revoked(&hooks.send(&headers, &body).await, "delivered again");
    assert_ne!(get(&mut h, "d1").await, GetOutcome::Hit);
    assert_eq!(oidc::post_logout(addr, &token).await.status, 200);
    drop(h);

    // One Redis with no replica: WAIT cannot be satisfied.
    let addr = http_addr();
    let hooks = AppwriteWebhooks::direct(addr);
    let mut flags = hooks.flags();
    flags.extend(strings(&["--revocation-replicas", "1"]));
    let mut h = serve(&store, addr, &[appwrite.flags(), flags]).await;
    cache(&mut h, &appwrite, "d2", "down-2").await;
    let reply = hooks.change_password(&appwrite, "down-2").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
}

/// Appwrite JWTs (account.createJWT) go to Appwrite as X-Appwrite-JWT, their session
/// asked by ID; their entry expires with the JWT's exp, not the session's; an expired
/// JWT is refused without a call, and a JWT whose session was signed out is refused by
/// Appwrite.
#[tokio::test]
async fn appwrite_jwts_are_validated_and_expire_with_exp() {
    let store = Store::start(Backend::Redis).await;
    let appwrite = AppwriteStandIn::start().await;
    let addr = http_addr();
    let mut h = serve(&store, addr, &[appwrite.flags()]).await;
    appwrite.add_session("secret-j", &idp_user("u-jwt"), in_a_day());
    let jwt = appwrite.create_jwt("secret-j", Duration::from_secs(60));
    let exp = Utc::now().timestamp() + 60;
    let reply = h
        .client
        .validate(pb::ValidateRequest { token: jwt.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.outcome(), ValidateOutcome::Valid);
    let expire = reply.session_expire.unwrap().seconds;
    assert!(
        (exp - 1..=exp).contains(&expire),
        "session_expire {expire}, exp {exp}"
    );
    let requests = appwrite.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.header("x-appwrite-jwt"), jwt);
        assert_eq!(request.header("x-appwrite-session"), "");
    }
    let mut paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/v1/account", "/v1/account/sessions/session1"]);
    let Store::Redis(redis) = &store else {
        unreachable!()
    };
    let ttl: i64 = redis::cmd("TTL")
        .arg(TokenHash::of(&jwt).entry_key())
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "the JWT's entry lives {ttl} s");

    // Expired: refused without asking.
    let expired = appwrite.sign_jwt(&json!({
        "userId": "u-jwt", "sessionId": "session1", "exp": Utc::now().timestamp() - 10
    }));
    assert_eq!(
        validate(&mut h.client, &expired).await,
        ValidateOutcome::Invalid
    );
    assert_eq!(
        appwrite.requests().len(),
        2,
        "an expired JWT was asked about"
    );
    // Forged (another key): Appwrite answers 401 user_jwt_invalid.
    let forged = format!("{}x", &jwt[..jwt.len() - 1]);
    assert_eq!(
        validate(&mut h.client, &forged).await,
        ValidateOutcome::Invalid
    );
    // Signed out: the JWT's session is gone, Appwrite answers as to a guest.
    let later = appwrite.create_jwt("secret-j", Duration::from_secs(600));
    appwrite.revoke("secret-j");
    assert_eq!(
        validate(&mut h.client, &later).await,
        ValidateOutcome::Invalid
    );
}

/// Bad keys and flags stop the start before anything binds: a missing or empty key
/// file exits 64 naming the flag and the file (never its content); a pushed
/// revocation without --http-listen is refused naming the flag.
#[tokio::test]
async fn keys_are_read_before_binding() {
    let dir = support::pki::Dir::new();
    let empty = dir.write("empty", "\n");
    let missing = dir.path().join("missing").to_string_lossy().into_owned();
    for (file, problem) in [(&empty, "empty"), (&missing, "cannot read")] {
        let config = session_cache::Config::load_from([
            "session-cache",
            "--http-listen",
            "127.0.0.1:0",
            "--appwrite-webhook-key-file",
            file,
            "--appwrite-webhook-url",
            "https://cache.example.com/webhooks/appwrite",
        ])
        .unwrap();
        let error = session_cache::prepare::prepare(config).err().unwrap();
        assert_eq!(error.exit_code(), 64);
        let text = error.to_string();
        assert!(
            text.contains("--appwrite-webhook-key-file") && text.contains(file.as_str()),
            "{text}"
        );
        assert!(text.contains(problem), "{text}");
    }
    let error = session_cache::Config::load_from([
        "session-cache",
        "--oidc-issuer",
        "https://idp",
        "--oidc-audience",
        "a",
        "--oidc-jwks-url",
        "https://idp/certs",
    ])
    .unwrap_err();
    assert!(error.to_string().contains("--http-listen"), "{error}");
}

// ---------------------------------------------------------------------------------
// SPEC §9's race with the revocation pushed by the provider
// ---------------------------------------------------------------------------------

/// Revocations pushed by the provider: a sign-out at Appwrite reaches the cache through
/// its webhook, the end of every session of a user through a back-channel logout token.
struct Pushed {
    hooks: AppwriteWebhooks,
    oidc: OidcStandIn,
    addr: SocketAddr,
}

impl Revoke for Pushed {
    /// Nothing when another racer ended the session first.
    async fn sign_out(
        &self,
        sessions: &Sessions,
        _: &mut SessionCacheClient<Channel>,
        user: usize,
        slot: usize,
    ) {
        let token = sessions.current(user, slot);
        let Some(reply) = self.hooks.sign_out(&sessions.appwrite, &token).await else {
            return;
        };
        assert_revoked(&reply, "sign-out");
        sessions.revoked(user, [slot], &[token]);
    }

    async fn end_all(&self, sessions: &Sessions, _: &mut SessionCacheClient<Channel>, user: usize) {
        let tokens = sessions.of_user(user);
        let id = race::user_id(user);
        sessions.appwrite.revoke_user(&id);
        let reply = oidc::post_logout(self.addr, &self.oidc.logout_token(Some(&id), None)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        sessions.revoked(user, 0..race::SESSIONS_PER_USER, &tokens);
    }
}

/// Racers validate a small pool of sessions; while a Validate of one is under way (the
/// provider's answer already on its way: computed at arrival, delivered 30 ms later)
/// they sign it out through an Appwrite webhook or end its user's sessions through a
/// back-channel logout token, then validate it again (`support::race`).
async fn race(backend: Backend) -> race::Tally {
    let store = Store::start(backend).await;
    let appwrite = Arc::new(AppwriteStandIn::start().await);
    appwrite.set_mode(Mode::Late(Duration::from_millis(30)));
    let oidc = OidcStandIn::start().await;
    let addr = http_addr();
    let hooks = AppwriteWebhooks::direct(addr);
    // The race is about order, not time: a loaded machine must not turn a revocation
    // into a 503 within the default 100 ms.
    let slack = strings(SLACK);
    let h = serve(
        &store,
        addr,
        &[appwrite.flags(), hooks.flags(), oidc.flags(), slack],
    )
    .await;
    let sessions = Sessions::start(appwrite);
    let pushed = Arc::new(Pushed { hooks, oidc, addr });
    race::race(&h.client, sessions, pushed, 11).await
}

/// SPEC §9's revocation rule with the revocation pushed by the provider: a Validate
/// that began after a webhook or a logout token was answered 200 never answers VALID
/// for a session it revoked, even from a provider answer already on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushed_revocations_hold_against_validates_in_flight() {
    for backend in [Backend::Memory, Backend::Redis] {
        race(backend).await.assert_held(backend);
    }
}

/// `--help` documents the listener's and the pushed revocations' flags, with their
/// environment variables.
#[test]
fn help_documents_the_flags() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-cache"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--http-listen",
        "--http-max-connections",
        "--appwrite-webhook-key-file",
        "--appwrite-webhook-url",
        "--oidc-issuer",
        "--oidc-audience",
        "--oidc-jwks-url",
        "SESSION_CACHE_HTTP_LISTEN",
        "SESSION_CACHE_APPWRITE_WEBHOOK_KEY_FILE",
        "SESSION_CACHE_OIDC_JWKS_URL",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}
