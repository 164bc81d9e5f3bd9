//! The identity providers (SPEC §9) against stand-ins that speak their APIs over real
//! HTTP: every mapping from an answer to `Valid`, `Invalid` or an `IdpError`, the
//! timeout, the requests' headers and credentials, and that no error ever shows the
//! token or the client secret.

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde_json::json;
use session_cache::{
    Config,
    entry::{Session, User},
    idp::{self, Answer, IdpError, Provider},
};
use support::idp::{
    AppwriteStandIn, CLIENT_ID, CLIENT_SECRET, IntrospectionStandIn, Mode, basic_credentials,
    not_listening_url,
};

/// The provider call timeout in the tests that wait for it.
const TIMEOUT_MS: u64 = 300;

fn config(args: &[String]) -> Result<Config, String> {
    Config::load_from(std::iter::once("session-cache".to_owned()).chain(args.iter().cloned()))
        .map_err(|e| e.to_string())
}

/// The provider these flags configure, built as the service builds it.
fn provider(args: &[String]) -> Arc<dyn Provider> {
    let config = config(args).expect("the test's flags are valid");
    idp::from_config(&config.idp)
        .expect("the provider's files are good")
        .expect("--idp names a provider")
}

fn with(mut flags: Vec<String>, extra: &[&str]) -> Vec<String> {
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

fn instant(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

/// A user whose instants survive both providers' precision (whole seconds).
fn user(id: &str, tier: &str) -> User {
    User {
        id: id.into(),
        email: format!("{id}@example.com"),
        name: format!("User {id}"),
        email_verified: true,
        tier: tier.into(),
        created_at: instant("2024-01-15T10:30:00Z"),
        updated_at: instant("2024-06-01T08:00:00Z"),
    }
}

/// An instant `seconds` from now, whole seconds.
fn in_seconds(seconds: i64) -> DateTime<Utc> {
    let t = Utc::now() + chrono::Duration::seconds(seconds);
    DateTime::from_timestamp(t.timestamp(), 0).unwrap()
}

async fn expect_error(provider: &dyn Provider, token: &str) -> IdpError {
    match provider.validate(token).await {
        Err(e) => e,
        Ok(answer) => panic!("expected an error, got {answer:?}"),
    }
}

// ---------------------------------------------------------------------------------
// Appwrite
// ---------------------------------------------------------------------------------

/// A live session maps to the user of Appwrite's User model (tier from the
/// --appwrite-tier-pref key of prefs) and the Session model's expire, asked with the
/// headers of Appwrite's REST docs, each endpoint once.
#[tokio::test]
async fn appwrite_valid_session_maps_every_field() {
    let appwrite = AppwriteStandIn::start().await;
    let expire = in_seconds(3600);
    let mut ann = user("ann", "ignored");
    ann.updated_at = instant("2024-06-01T08:00:00.123Z");
    appwrite.add_session_with_prefs(
        "secret-ann",
        &ann,
        json!({ "plan": "gold", "tier": "not this one", "theme": "dark" }),
        expire,
    );
    let provider = provider(&with(appwrite.flags(), &["--appwrite-tier-pref", "plan"]));
    assert_eq!(provider.name(), "appwrite");

    let answer = provider.validate("secret-ann").await.unwrap();

    let want = User {
        tier: "gold".into(),
        ..ann
    };
    assert_eq!(
        answer,
        Answer::Valid(Session {
            user: want,
            session_expire: expire
        })
    );
    let calls = appwrite.calls();
    assert_eq!((calls.account, calls.session), (1, 1));
    for request in appwrite.requests() {
        assert_eq!(request.method, "GET");
        assert_eq!(request.header("x-appwrite-project"), appwrite.project());
        assert_eq!(request.header("x-appwrite-session"), "secret-ann");
        assert_eq!(request.header("content-type"), "application/json");
        assert_eq!(request.header("x-appwrite-response-format"), "1.8.0");
    }
}

/// The default tier preference is `tier`; a user without it, or with prefs `{}`, gets
/// an empty tier; an unverified email maps to false.
#[tokio::test]
async fn appwrite_tier_pref_default_and_absent() {
    let appwrite = AppwriteStandIn::start().await;
    let expire = in_seconds(600);
    appwrite.add_session("with-tier", &user("bob", "pro"), expire);
    let mut carl = user("carl", "");
    carl.email_verified = false;
    appwrite.add_session_with_prefs("no-prefs", &carl, json!({}), expire);
    let provider = provider(&appwrite.flags());

    let Answer::Valid(bob) = provider.validate("with-tier").await.unwrap() else {
        panic!("bob's session is live");
    };
    assert_eq!(bob.user.tier, "pro");
    let Answer::Valid(carl) = provider.validate("no-prefs").await.unwrap() else {
        panic!("carl's session is live");
    };
    assert_eq!(
        (carl.user.tier.as_str(), carl.user.email_verified),
        ("", false)
    );
}

/// An unknown secret, and one whose session was deleted (sign-out), are answered 401
/// general_unauthorized_scope by Appwrite (the caller is a guest): Invalid.
#[tokio::test]
async fn appwrite_unknown_and_revoked_sessions_are_invalid() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("live", &user("dan", "free"), in_seconds(600));
    let provider = provider(&appwrite.flags());

    assert_eq!(
        provider.validate("never-issued").await.unwrap(),
        Answer::Invalid
    );
    assert!(matches!(
        provider.validate("live").await.unwrap(),
        Answer::Valid(_)
    ));
    appwrite.revoke("live");
    assert_eq!(provider.validate("live").await.unwrap(), Answer::Invalid);
    appwrite.set_mode(Mode::Refuse);
    appwrite.add_session("again", &user("dan", "free"), in_seconds(600));
    assert_eq!(provider.validate("again").await.unwrap(), Answer::Invalid);
}

/// A session whose expire has passed is Invalid: Appwrite refuses it (401), and when
/// Appwrite's clock lags and it still answers 200, the past expire refuses it here.
#[tokio::test]
async fn appwrite_expired_session_is_invalid() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("expired", &user("eve", "free"), in_seconds(-60));
    let provider = provider(&appwrite.flags());

    assert_eq!(provider.validate("expired").await.unwrap(), Answer::Invalid);
    appwrite.set_clock_behind(Duration::from_secs(3600));
    let before = appwrite.calls();
    assert_eq!(provider.validate("expired").await.unwrap(), Answer::Invalid);
    let after = appwrite.calls();
    assert_eq!(after.session, before.session + 1);
    assert!(
        appwrite
            .requests()
            .iter()
            .all(|r| r.header("x-appwrite-session") == "expired")
    );
}

/// Refusals Appwrite's sources show to be about the user (blocked, more factors
/// required, password reset required, session gone) are Invalid.
#[tokio::test]
async fn appwrite_per_user_refusals_are_invalid() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("tok", &user("fay", "free"), in_seconds(600));
    let provider = provider(&appwrite.flags());
    for (status, kind) in [
        (403, "user_blocked"),
        (401, "user_more_factors_required"),
        (401, "user_unauthorized"),
        (412, "user_password_reset_required"),
        (404, "user_session_not_found"),
    ] {
        appwrite.set_mode(Mode::Error(status, kind));
        assert_eq!(
            provider.validate("tok").await.unwrap(),
            Answer::Invalid,
            "{status} {kind}"
        );
    }
}

/// Answers that say the service is misconfigured (a wrong project, a project-wide 401,
/// an unknown origin, a wrong endpoint path) are Unexpected, never Invalid: nothing is
/// cached as refused because of our own mistake.
#[tokio::test]
async fn appwrite_misconfiguration_is_unexpected() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("tok", &user("gus", "free"), in_seconds(600));

    let wrong_project = provider(&[
        "--idp".into(),
        "appwrite".into(),
        "--appwrite-endpoint".into(),
        appwrite.endpoint(),
        "--appwrite-project".into(),
        "someone-elses".into(),
    ]);
    let e = expect_error(&*wrong_project, "tok").await;
    assert!(
        matches!(&e, IdpError::Unexpected(m) if m.contains("project_not_found")),
        "{e}"
    );

    let no_version = provider(&[
        "--idp".into(),
        "appwrite".into(),
        "--appwrite-endpoint".into(),
        appwrite.endpoint().trim_end_matches("/v1").to_owned(),
        "--appwrite-project".into(),
        appwrite.project().into(),
    ]);
    let e = expect_error(&*no_version, "tok").await;
    assert!(
        matches!(&e, IdpError::Unexpected(m) if m.contains("general_route_not_found")),
        "{e}"
    );

    let provider = provider(&appwrite.flags());
    for mode in [
        Mode::Error(401, "general_access_forbidden"),
        Mode::Error(401, "project_key_expired"),
        Mode::Status(403),
        Mode::Error(403, "general_api_disabled"),
        Mode::Status(404),
        Mode::Status(400),
    ] {
        appwrite.set_mode(mode.clone());
        let e = expect_error(&*provider, "tok").await;
        assert!(matches!(e, IdpError::Unexpected(_)), "{mode:?}: {e:?}");
        assert_eq!(e.result_label(), "unexpected");
    }
}

/// Each failure maps to its kind: 5xx ServerError, 429 RateLimited, a reset or a
/// closed port Unreachable, a body that is not JSON or a redirect (not followed)
/// Unexpected.
#[tokio::test]
async fn appwrite_failures_map_to_their_kind() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("tok", &user("hal", "free"), in_seconds(600));
    let provider = provider(&appwrite.flags());
    let cases = [
        (Mode::Status(500), IdpError::ServerError(500)),
        (Mode::Status(503), IdpError::ServerError(503)),
        (Mode::Status(429), IdpError::RateLimited),
    ];
    for (mode, want) in cases {
        appwrite.set_mode(mode.clone());
        assert_eq!(expect_error(&*provider, "tok").await, want, "{mode:?}");
    }
    let labels = [
        (Mode::Reset, "unreachable"),
        (Mode::Garbage, "unexpected"),
        (Mode::Redirect, "unexpected"),
    ];
    for (mode, label) in labels {
        appwrite.set_mode(mode.clone());
        let e = expect_error(&*provider, "tok").await;
        assert_eq!(e.result_label(), label, "{mode:?}: {e}");
    }
    appwrite.set_mode(Mode::Redirect);
    let e = expect_error(&*provider, "tok").await;
    assert!(e.to_string().contains("not followed"), "{e}");

    let nobody = provider_for_endpoint(&not_listening_url("/v1"));
    let e = expect_error(&*nobody, "tok").await;
    assert!(matches!(e, IdpError::Unreachable(_)), "{e:?}");
}

fn provider_for_endpoint(endpoint: &str) -> Arc<dyn Provider> {
    provider(&[
        "--idp".into(),
        "appwrite".into(),
        "--appwrite-endpoint".into(),
        endpoint.into(),
        "--appwrite-project".into(),
        "p".into(),
    ])
}

/// The two Appwrite calls go out at once (one round trip per validation), and
/// concurrent validations are concurrent calls, each counted by the stand-in.
#[tokio::test]
async fn appwrite_asks_both_endpoints_at_once() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("tok", &user("sam", "free"), in_seconds(600));
    let provider = provider(&appwrite.flags());
    appwrite.set_mode(Mode::Slow(Duration::from_millis(500)));

    assert!(matches!(
        provider.validate("tok").await.unwrap(),
        Answer::Valid(_)
    ));
    assert_eq!(appwrite.peak_in_flight(), 2);

    let validations = (0..3).map(|_| provider.validate("tok"));
    for answer in futures_util::future::join_all(validations).await {
        assert!(matches!(answer.unwrap(), Answer::Valid(_)));
    }
    assert_eq!(appwrite.peak_in_flight(), 6);
    assert_eq!(
        appwrite.calls(),
        support::idp::AppwriteCalls {
            account: 4,
            session: 4
        }
    );
    assert_eq!(appwrite.in_flight(), 0);
}

/// A provider slower than --idp-timeout-ms, or one that never answers, is a Timeout
/// reached within the timeout plus a small margin, not later.
#[tokio::test]
async fn appwrite_timeout_is_honoured() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("tok", &user("ida", "free"), in_seconds(600));
    let provider = provider(&with(
        appwrite.flags(),
        &["--idp-timeout-ms", &TIMEOUT_MS.to_string()],
    ));
    // Warm: a pooled connection, so that the bound below measures the timeout.
    assert!(matches!(
        provider.validate("tok").await.unwrap(),
        Answer::Valid(_)
    ));
    for mode in [Mode::Slow(Duration::from_secs(5)), Mode::Hang] {
        appwrite.set_mode(mode.clone());
        let started = Instant::now();
        let e = expect_error(&*provider, "tok").await;
        let took = started.elapsed();
        assert_eq!(e, IdpError::Timeout, "{mode:?}");
        assert!(
            took >= Duration::from_millis(TIMEOUT_MS)
                && took < Duration::from_millis(TIMEOUT_MS + 1500),
            "{mode:?} took {took:?}"
        );
    }
    appwrite.set_mode(Mode::Slow(Duration::from_millis(50)));
    assert!(matches!(
        provider.validate("tok").await.unwrap(),
        Answer::Valid(_)
    ));
}

/// No error shows the token, even when the server quotes it back.
#[tokio::test]
async fn appwrite_errors_never_show_the_token() {
    let token = "tok-0123456789-very-secret-session";
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session(token, &user("jo", "free"), in_seconds(600));
    let provider = provider(&with(
        appwrite.flags(),
        &["--idp-timeout-ms", &TIMEOUT_MS.to_string()],
    ));
    let modes = [
        Mode::EchoToken(400),
        Mode::EchoToken(404),
        Mode::Status(500),
        Mode::Status(429),
        Mode::Error(403, "general_unknown_origin"),
        Mode::Garbage,
        Mode::Redirect,
        Mode::Reset,
        Mode::Hang,
    ];
    for mode in modes {
        appwrite.set_mode(mode.clone());
        let e = expect_error(&*provider, token).await;
        assert!(!e.to_string().contains(token), "{mode:?}: {e}");
        assert!(!format!("{e:?}").contains(token), "{mode:?}: {e:?}");
    }
    appwrite.set_mode(Mode::EchoToken(400));
    let e = expect_error(&*provider, token).await;
    assert!(e.to_string().contains("<redacted>"), "{e}");
}

// ---------------------------------------------------------------------------------
// RFC 7662 introspection
// ---------------------------------------------------------------------------------

/// An active token maps sub, email, name, email_verified, tier, iat, updated_at and
/// exp to the session; the request is a form POST with the token and its hint, Basic
/// client credentials form-encoded before base64 (RFC 6749 §2.3.1), Accept JSON.
#[tokio::test]
async fn introspection_active_token_maps_claims() {
    let introspection = IntrospectionStandIn::start().await;
    let expire = in_seconds(900);
    let token = "a+b/c=d&e f%20g";
    introspection.add_session(token, &user("kim", "pro"), expire);
    let provider = provider(&introspection.flags());
    assert_eq!(provider.name(), "introspection");

    let answer = provider.validate(token).await.unwrap();

    assert_eq!(
        answer,
        Answer::Valid(Session {
            user: user("kim", "pro"),
            session_expire: expire
        })
    );
    let requests = introspection.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("POST", "/oauth2/introspect")
    );
    assert_eq!(
        request.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    assert_eq!(request.header("accept"), "application/json");
    let form: Vec<(String, String)> = form_urlencoded::parse(&request.body).into_owned().collect();
    assert_eq!(
        form,
        [
            ("token".to_owned(), token.to_owned()),
            ("token_type_hint".to_owned(), "access_token".to_owned())
        ]
    );
    assert_eq!(
        basic_credentials(&request.header("authorization")),
        Some((CLIENT_ID.to_owned(), CLIENT_SECRET.to_owned()))
    );
    // RFC 6749 §2.3.1 exactly: form-urlencoded (space as +), then base64.
    use base64::Engine;
    let want = base64::engine::general_purpose::STANDARD
        .encode("session-cache:s3cret%3A+with%2Bplus%2Fslash%26amp+%C3%A9");
    assert_eq!(request.header("authorization"), format!("Basic {want}"));
}

/// Claims that are absent fall back as documented: name from preferred_username, then
/// username; email_verified from the string "true", else false; a numeric tier as
/// text, from --introspection-tier-claim; no exp: now + 5 minutes; no iat: now; no
/// updated_at: created_at.
#[tokio::test]
async fn introspection_claims_fall_back() {
    let introspection = IntrospectionStandIn::start().await;
    introspection.add_claims(
        "minimal",
        json!({ "sub": "lee", "preferred_username": "lee.p", "username": "lee.u",
                "email_verified": "true", "plan": 3 }),
    );
    introspection.add_claims(
        "username-only",
        json!({ "sub": "max", "username": "max.u", "iat": 1_700_000_000,
                "exp": in_seconds(60).timestamp(), "email_verified": "yes" }),
    );
    let provider = provider(&with(
        introspection.flags(),
        &["--introspection-tier-claim", "plan"],
    ));

    let before = Utc::now();
    let Answer::Valid(lee) = provider.validate("minimal").await.unwrap() else {
        panic!("lee's token is active");
    };
    let after = Utc::now();
    assert_eq!(lee.user.id, "lee");
    assert_eq!(lee.user.name, "lee.p");
    assert_eq!(lee.user.email, "");
    assert!(lee.user.email_verified);
    assert_eq!(lee.user.tier, "3");
    assert!(lee.user.created_at >= before && lee.user.created_at <= after);
    assert_eq!(lee.user.updated_at, lee.user.created_at);
    let lifetime = lee.session_expire - lee.user.created_at;
    assert_eq!(lifetime, chrono::Duration::seconds(300));

    let Answer::Valid(max) = provider.validate("username-only").await.unwrap() else {
        panic!("max's token is active");
    };
    assert_eq!(max.user.name, "max.u");
    assert!(!max.user.email_verified);
    assert_eq!(max.user.tier, "");
    assert_eq!(max.user.created_at.timestamp(), 1_700_000_000);
    assert_eq!(max.user.updated_at, max.user.created_at);
}

/// `"active": false` is Invalid: for an unknown token, a revoked one, and one the
/// server considers expired; an active token whose exp is past by our clock too.
#[tokio::test]
async fn introspection_inactive_tokens_are_invalid() {
    let introspection = IntrospectionStandIn::start().await;
    introspection.add_session("live", &user("ned", "free"), in_seconds(600));
    introspection.add_session("expired", &user("ned", "free"), in_seconds(-5));
    let provider = provider(&introspection.flags());

    assert_eq!(provider.validate("unknown").await.unwrap(), Answer::Invalid);
    assert_eq!(provider.validate("expired").await.unwrap(), Answer::Invalid);
    assert!(matches!(
        provider.validate("live").await.unwrap(),
        Answer::Valid(_)
    ));
    introspection.revoke("live");
    assert_eq!(provider.validate("live").await.unwrap(), Answer::Invalid);
    // A server whose clock lags still calls it active; its exp is behind us.
    introspection.set_clock_behind(Duration::from_secs(3600));
    introspection.add_session("stale", &user("ned", "free"), in_seconds(-5));
    assert_eq!(provider.validate("stale").await.unwrap(), Answer::Invalid);
    introspection.set_mode(Mode::Refuse);
    introspection.add_session("again", &user("ned", "free"), in_seconds(600));
    assert_eq!(provider.validate("again").await.unwrap(), Answer::Invalid);
}

/// An active answer without sub, an answer without a boolean active, a NumericDate
/// that is not one, and a body that is not JSON are Unexpected, never Valid or Invalid.
#[tokio::test]
async fn introspection_malformed_answers_are_unexpected() {
    let introspection = IntrospectionStandIn::start().await;
    introspection.add_claims("no-sub", json!({ "email": "x@example.com" }));
    introspection.add_claims("odd-active", json!({ "sub": "x", "active": "yes" }));
    introspection.add_claims("bad-exp", json!({ "sub": "x", "exp": "soon" }));
    let provider = provider(&introspection.flags());
    for token in ["no-sub", "odd-active", "bad-exp"] {
        let e = expect_error(&*provider, token).await;
        assert!(matches!(e, IdpError::Unexpected(_)), "{token}: {e:?}");
    }
    introspection.set_mode(Mode::Garbage);
    let e = expect_error(&*provider, "no-sub").await;
    assert!(matches!(e, IdpError::Unexpected(_)), "{e:?}");
}

/// A 401 from the introspection endpoint means our client credentials are wrong:
/// Unexpected, naming the flag, never Invalid.
#[tokio::test]
async fn introspection_refused_credentials_are_unexpected() {
    let introspection = IntrospectionStandIn::start_with("session-cache", "right").await;
    introspection.add_session("tok", &user("oz", "free"), in_seconds(600));
    let files = support::pki::Dir::new();
    let wrong = files.write("secret", "wrong\n");
    let provider = provider(&[
        "--idp".into(),
        "introspection".into(),
        "--introspection-url".into(),
        introspection.url(),
        "--introspection-client-id".into(),
        "session-cache".into(),
        "--introspection-client-secret-file".into(),
        wrong,
    ]);
    let e = expect_error(&*provider, "tok").await;
    assert!(
        matches!(&e, IdpError::Unexpected(m) if m.contains("--introspection-client-id")),
        "{e}"
    );
    assert!(!e.to_string().contains("wrong"), "{e}");
}

/// Each failure maps to its kind: 5xx ServerError, 429 RateLimited, reset or closed
/// port Unreachable, a redirect Unexpected (not followed: the form holds the token).
#[tokio::test]
async fn introspection_failures_map_to_their_kind() {
    let introspection = IntrospectionStandIn::start().await;
    introspection.add_session("tok", &user("pat", "free"), in_seconds(600));
    let provider = provider(&introspection.flags());
    for (mode, want) in [
        (Mode::Status(500), "server_error"),
        (Mode::Status(502), "server_error"),
        (Mode::Status(429), "rate_limited"),
        (Mode::Status(400), "unexpected"),
        (Mode::Reset, "unreachable"),
        (Mode::Redirect, "unexpected"),
    ] {
        introspection.set_mode(mode.clone());
        let e = expect_error(&*provider, "tok").await;
        assert_eq!(e.result_label(), want, "{mode:?}: {e}");
    }
    introspection.set_mode(Mode::Status(503));
    assert_eq!(
        expect_error(&*provider, "tok").await,
        IdpError::ServerError(503)
    );

    let files = support::pki::Dir::new();
    let secret = files.write("secret", "x");
    let nobody = provider_with_url(&not_listening_url("/introspect"), &secret);
    let e = expect_error(&*nobody, "tok").await;
    assert!(matches!(e, IdpError::Unreachable(_)), "{e:?}");
}

fn provider_with_url(url: &str, secret: &str) -> Arc<dyn Provider> {
    provider(&[
        "--idp".into(),
        "introspection".into(),
        "--introspection-url".into(),
        url.into(),
        "--introspection-client-id".into(),
        "c".into(),
        "--introspection-client-secret-file".into(),
        secret.into(),
    ])
}

/// Slow and hanging introspection ends in Timeout within the timeout and a margin.
#[tokio::test]
async fn introspection_timeout_is_honoured() {
    let introspection = IntrospectionStandIn::start().await;
    introspection.add_session("tok", &user("quin", "free"), in_seconds(600));
    let provider = provider(&with(
        introspection.flags(),
        &["--idp-timeout-ms", &TIMEOUT_MS.to_string()],
    ));
    assert!(matches!(
        provider.validate("tok").await.unwrap(),
        Answer::Valid(_)
    ));
    for mode in [Mode::Slow(Duration::from_secs(5)), Mode::Hang] {
        introspection.set_mode(mode.clone());
        let started = Instant::now();
        let e = expect_error(&*provider, "tok").await;
        let took = started.elapsed();
        assert_eq!(e, IdpError::Timeout, "{mode:?}");
        assert!(
            took >= Duration::from_millis(TIMEOUT_MS)
                && took < Duration::from_millis(TIMEOUT_MS + 1500),
            "{mode:?} took {took:?}"
        );
    }
}

/// No error shows the token or the client secret, even when the server quotes them.
#[tokio::test]
async fn introspection_errors_never_show_token_or_secret() {
    let token = "tok-0123456789-very-secret-access";
    let introspection = IntrospectionStandIn::start().await;
    let provider = provider(&with(
        introspection.flags(),
        &["--idp-timeout-ms", &TIMEOUT_MS.to_string()],
    ));
    for mode in [
        Mode::EchoToken(400),
        Mode::EchoToken(422),
        Mode::Status(401),
        Mode::Status(500),
        Mode::Garbage,
        Mode::Reset,
        Mode::Hang,
    ] {
        introspection.set_mode(mode.clone());
        let e = expect_error(&*provider, token).await;
        for shown in [e.to_string(), format!("{e:?}")] {
            assert!(!shown.contains(token), "{mode:?}: {shown}");
            assert!(!shown.contains(CLIENT_SECRET), "{mode:?}: {shown}");
        }
    }
}

// ---------------------------------------------------------------------------------
// Flags and files
// ---------------------------------------------------------------------------------

/// Without --idp there is no provider; the flags' defaults are SPEC §9's.
#[tokio::test]
async fn flags_defaults() {
    let config = config(&[]).unwrap();
    assert!(config.idp.idp.is_none());
    assert_eq!(config.idp.idp_timeout_ms, 2000);
    assert_eq!(config.idp.idp_max_in_flight, 64);
    assert_eq!(config.idp.negative_ttl_seconds, 10);
    assert_eq!(config.idp.appwrite_tier_pref, "tier");
    assert_eq!(config.idp.introspection_tier_claim, "tier");
    assert!(idp::from_config(&config.idp).unwrap().is_none());
}

/// Flags that cannot work are refused, naming the flag, before anything starts.
#[tokio::test]
async fn flags_that_do_not_fit_are_refused() {
    let cases: &[(&[&str], &str)] = &[
        (&["--appwrite-endpoint", "https://a.example/v1"], "--idp"),
        (&["--introspection-url", "https://i.example/i"], "--idp"),
        (&["--idp-ca-file", "ca.pem"], "--idp"),
        (&["--idp", "appwrite"], "--appwrite-endpoint"),
        (
            &[
                "--idp",
                "appwrite",
                "--appwrite-endpoint",
                "https://a.example/v1",
            ],
            "--appwrite-project",
        ),
        (
            &[
                "--idp",
                "appwrite",
                "--appwrite-endpoint",
                "cloud.appwrite.io",
                "--appwrite-project",
                "p",
            ],
            "--appwrite-endpoint",
        ),
        (
            &[
                "--idp",
                "appwrite",
                "--appwrite-endpoint",
                "https://u:hunter2@a.example/v1",
                "--appwrite-project",
                "p",
            ],
            "--appwrite-endpoint",
        ),
        (
            &[
                "--idp",
                "appwrite",
                "--appwrite-endpoint",
                "https://a.example/v1",
                "--appwrite-project",
                "p",
                "--introspection-url",
                "https://i.example/i",
            ],
            "--introspection-url",
        ),
        (
            &[
                "--idp",
                "appwrite",
                "--appwrite-endpoint",
                "https://a.example/v1",
                "--appwrite-project",
                "my project\n",
            ],
            "--appwrite-project",
        ),
        (&["--idp", "introspection"], "--introspection-url"),
        (
            &[
                "--idp",
                "introspection",
                "--introspection-url",
                "https://i.example/i",
            ],
            "--introspection-client-id",
        ),
        (
            &[
                "--idp",
                "introspection",
                "--introspection-url",
                "https://i.example/i",
                "--introspection-client-id",
                "c",
            ],
            "--introspection-client-secret-file",
        ),
        (
            &[
                "--idp",
                "introspection",
                "--introspection-url",
                "https://i.example/i",
                "--introspection-client-id",
                "c",
                "--introspection-client-secret-file",
                "s",
                "--appwrite-project",
                "p",
            ],
            "--appwrite-project",
        ),
        (&["--idp", "keycloak"], "--idp"),
        (&["--idp-timeout-ms", "0"], "--idp-timeout-ms"),
        (&["--idp-max-in-flight", "0"], "--idp-max-in-flight"),
    ];
    for (args, flag) in cases {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let error = config(&args).expect_err(&format!("{args:?} should be refused"));
        assert!(error.contains(flag), "{args:?}: {error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}

/// The secret and CA files are read when the provider is built (before the service
/// binds): a missing, empty or non-PEM file fails naming the flag and the file, and
/// never quotes the file's content.
#[tokio::test]
async fn files_are_checked_when_the_provider_is_built() {
    let base = |secret: &str| -> Vec<String> {
        [
            "--idp",
            "introspection",
            "--introspection-url",
            "http://127.0.0.1:1/i",
            "--introspection-client-id",
            "c",
            "--introspection-client-secret-file",
            secret,
        ]
        .map(String::from)
        .to_vec()
    };
    let build = |args: &[String]| {
        let config = config(args).unwrap();
        idp::from_config(&config.idp).map(|p| p.is_some())
    };
    let files = support::pki::Dir::new();
    let missing = files.path().join("no-such-secret");
    let e = build(&base(&missing.to_string_lossy()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--introspection-client-secret-file") && e.contains("no-such-secret"),
        "{e}"
    );
    let empty = files.write("empty-secret", "\n");
    let e = build(&base(&empty)).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");

    let secret = files.write("secret", "classified\n");
    let not_pem = files.write("bad-ca.pem", "classified-ca-bytes");
    let mut args = base(&secret);
    args.extend(["--idp-ca-file".into(), not_pem]);
    let e = build(&args).unwrap_err().to_string();
    assert!(
        e.contains("--idp-ca-file") && e.contains("bad-ca.pem"),
        "{e}"
    );
    assert!(!e.contains("classified"), "{e}");

    let ca = support::pki::Ca::new("idp test CA");
    let good = files.write("ca.pem", ca.pem());
    let mut args = base(&secret);
    args.extend(["--idp-ca-file".into(), good]);
    assert!(build(&args).unwrap());
}

/// Over HTTPS the provider's certificate is verified: a private CA given with
/// --idp-ca-file is trusted, and without it the handshake fails (Unreachable, never
/// Invalid).
#[tokio::test]
async fn appwrite_over_tls_trusts_the_idp_ca_file() {
    let ca = support::pki::Ca::new("idp test CA");
    let appwrite = AppwriteStandIn::start_tls(ca.server()).await;
    appwrite.add_session("tok", &user("ray", "pro"), in_seconds(600));
    assert!(appwrite.endpoint().starts_with("https://"));
    let files = support::pki::Dir::new();
    let ca_file = files.write("ca.pem", ca.pem());

    let trusting = provider(&with(appwrite.flags(), &["--idp-ca-file", &ca_file]));
    let Answer::Valid(session) = trusting.validate("tok").await.unwrap() else {
        panic!("the session is live");
    };
    assert_eq!(session.user, user("ray", "pro"));

    let other = support::pki::Ca::new("someone else's CA");
    let other_file = files.write("other.pem", other.pem());
    let distrusting = provider(&with(appwrite.flags(), &["--idp-ca-file", &other_file]));
    let e = expect_error(&*distrusting, "tok").await;
    assert!(matches!(e, IdpError::Unreachable(_)), "{e:?}");
}

/// The labels a provider call can end with are the ones exported from start-up.
#[tokio::test]
async fn result_labels_are_known_at_start() {
    let labels = [
        idp::result_label(&Ok(Answer::Invalid)),
        idp::result_label(&Err(IdpError::Timeout)),
        idp::result_label(&Err(IdpError::Unreachable(String::new()))),
        idp::result_label(&Err(IdpError::RateLimited)),
        idp::result_label(&Err(IdpError::ServerError(500))),
        idp::result_label(&Err(IdpError::Unexpected(String::new()))),
    ];
    for label in labels {
        assert!(idp::RESULT_LABELS.contains(&label), "{label}");
    }
    assert!(idp::RESULT_LABELS.contains(&"valid"));
}
