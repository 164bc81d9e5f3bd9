//! Envoy's external authorization (SPEC §11) end to end: the real server on port 0 over
//! a real store, the Appwrite stand-in behind it (`support::idp`), and `Check` called
//! the way Envoy's ext_authz filter calls it, with Envoy's own protos.

mod support;

use std::collections::HashMap;

use session_cache::{
    edge::envoy_pb::envoy::{
        config::core::v3::{HeaderMap, HeaderValue},
        service::auth::v3::{
            AttributeContext, CheckRequest, CheckResponse,
            authorization_client::AuthorizationClient, check_response::HttpResponse,
        },
    },
    pb,
};
use sha2::{Digest, Sha256};
use support::{
    Backend, Harness,
    envoy::envoy_request,
    idp::{AppwriteStandIn, Mode, idp_user, in_a_day},
    pki::Dir,
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

const HEALTH_NAME: &str = "envoy.service.auth.v3.Authorization";

async fn check_client(h: &Harness) -> AuthorizationClient<Channel> {
    AuthorizationClient::new(h.server.channel().await)
}

async fn check(
    client: &mut AuthorizationClient<Channel>,
    request: CheckRequest,
) -> Result<CheckResponse, tonic::Status> {
    client.check(request).await.map(tonic::Response::into_inner)
}

/// What an answer tells Envoy to do to the upstream request.
#[derive(Debug)]
enum Verdict {
    Allowed {
        set: HashMap<String, String>,
        removed: Vec<String>,
    },
    Denied {
        http_status: i32,
        www_authenticate: Option<String>,
    },
}

fn verdict(response: CheckResponse) -> Verdict {
    let code = response.status.as_ref().map_or(0, |s| s.code);
    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            assert_eq!(code, 0, "an OK answer with status {code}");
            let mut set = HashMap::new();
            for option in ok.headers {
                let header = option.header.unwrap();
                #[allow(deprecated)]
                let append = option.append;
                assert_eq!(
                    append,
                    Some(false),
                    "{}: not set with overwrite",
                    header.key
                );
                assert!(
                    set.insert(header.key.clone(), header.value).is_none(),
                    "{} set twice",
                    header.key
                );
            }
            for removed in &ok.headers_to_remove {
                assert!(
                    !set.contains_key(removed),
                    "{removed} both set and removed: Envoy removes after it sets"
                );
            }
            Verdict::Allowed {
                set,
                removed: ok.headers_to_remove,
            }
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            assert_ne!(code, 0, "a denial with status OK");
            Verdict::Denied {
                http_status: denied.status.map_or(0, |s| s.code),
                www_authenticate: denied
                    .headers
                    .iter()
                    .filter_map(|h| h.header.as_ref())
                    .find(|h| h.key == "www-authenticate")
                    .map(|h| h.value.clone()),
            }
        }
        other => panic!("an answer with no OK or denied response: {other:?}"),
    }
}

fn assert_denied_401(verdict: Verdict, case: &str) {
    match verdict {
        Verdict::Denied {
            http_status,
            www_authenticate,
        } => {
            assert_eq!(http_status, 401, "{case}");
            assert_eq!(www_authenticate.as_deref(), Some("Bearer"), "{case}");
        }
        allowed => panic!("{case}: allowed: {allowed:?}"),
    }
}

async fn service(backend: Backend, appwrite: &AppwriteStandIn, extra: &[&str]) -> Harness {
    let mut args: Vec<String> = appwrite.flags();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Harness::start(backend, &args).await
}

/// A valid token is allowed with the user's headers, each set with overwrite; a client
/// that sends identity headers of its own gets them overwritten (the six) or removed
/// (the rest under the prefix), and nothing it set is also removed.
#[tokio::test]
async fn a_valid_token_is_allowed_with_the_users_headers_and_spoofs_are_dropped() {
    for backend in [Backend::Redis, Backend::Memory] {
        let appwrite = AppwriteStandIn::start().await;
        let expire = in_a_day();
        appwrite.add_session("secret-ok", &idp_user("u-ok"), expire);
        let mut h = service(backend, &appwrite, &[]).await;
        let mut client = check_client(&h).await;
        let request = envoy_request(&[
            ("authorization", "Bearer secret-ok"),
            ("x-auth-request-user", "admin"),
            ("x-auth-request-email", "root@example.com"),
            ("x-auth-request-groups", "admins"),
            ("x-auth-request-access-token", "forged"),
            ("accept", "*/*"),
        ]);
        let Verdict::Allowed { set, removed } =
            verdict(check(&mut client, request.clone()).await.unwrap())
        else {
            panic!("{backend:?}: a valid token was denied");
        };
        assert_eq!(set["x-auth-request-user"], "u-ok");
        assert_eq!(set["x-auth-request-email"], "u-ok@example.com");
        assert_eq!(set["x-auth-request-name"], "Ada Lovelace");
        assert_eq!(set["x-auth-request-email-verified"], "true");
        assert_eq!(set["x-auth-request-tier"], "pro");
        assert_eq!(
            set["x-auth-request-session-expire"],
            expire.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        );
        assert_eq!(set.len(), 6, "{set:?}");
        assert_eq!(
            removed,
            ["x-auth-request-access-token", "x-auth-request-groups"],
            "{backend:?}"
        );
        // Cached: the second Check makes no provider call, and Validate agrees.
        verdict(check(&mut client, request).await.unwrap());
        assert_eq!(appwrite.calls().account, 1, "{backend:?}");
        assert_eq!(
            support::get_outcome(&h.get("secret-ok").await),
            pb::GetOutcome::Hit
        );
    }
}

/// No token, an unknown token, and tokens revoked by InvalidateToken and by
/// InvalidateUser are denied with 401 and `www-authenticate: Bearer`.
#[tokio::test]
async fn no_unknown_and_revoked_tokens_are_denied() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("secret-logout", &idp_user("u-a"), in_a_day());
    appwrite.add_session("secret-password", &idp_user("u-b"), in_a_day());
    let mut h = service(Backend::Redis, &appwrite, &[]).await;
    let mut client = check_client(&h).await;
    let bearer = |token: &str| envoy_request(&[("authorization", &format!("Bearer {token}"))]);

    for token in ["secret-logout", "secret-password"] {
        assert!(matches!(
            verdict(check(&mut client, bearer(token)).await.unwrap()),
            Verdict::Allowed { .. }
        ));
    }
    assert_denied_401(
        verdict(check(&mut client, envoy_request(&[])).await.unwrap()),
        "no token",
    );
    assert_denied_401(
        verdict(check(&mut client, bearer("no-such")).await.unwrap()),
        "unknown",
    );

    appwrite.revoke("secret-logout");
    h.invalidate_token("secret-logout").await.unwrap();
    assert_denied_401(
        verdict(check(&mut client, bearer("secret-logout")).await.unwrap()),
        "InvalidateToken",
    );

    appwrite.revoke("secret-password");
    h.invalidate_user("u-b").await.unwrap();
    assert_denied_401(
        verdict(check(&mut client, bearer("secret-password")).await.unwrap()),
        "InvalidateUser",
    );
}

/// The provider down (and not cached) is gRPC UNAVAILABLE, so that Envoy's own setting
/// decides; never an allow, never a denial that looks like a verdict.
#[tokio::test]
async fn the_provider_down_is_unavailable() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("secret-down", &idp_user("u-d"), in_a_day());
    appwrite.set_mode(Mode::Status(503));
    let h = service(Backend::Memory, &appwrite, &[]).await;
    let mut client = check_client(&h).await;
    let status = check(
        &mut client,
        envoy_request(&[("authorization", "Bearer secret-down")]),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("secret-down"));
}

/// Bad input: a CheckRequest with no attributes (INVALID_ARGUMENT naming the field);
/// an empty Bearer, thousands of cookies, non-UTF-8 header bytes, a token over 4 KiB
/// (each a denial). Never an allow, never a panic, and no provider call.
#[tokio::test]
async fn bad_input_is_refused_or_denied() {
    let appwrite = AppwriteStandIn::start().await;
    let h = service(Backend::Memory, &appwrite, &[]).await;
    let mut client = check_client(&h).await;

    let status = check(&mut client, CheckRequest { attributes: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("attributes:"), "{status:?}");
    let status = check(
        &mut client,
        CheckRequest {
            attributes: Some(AttributeContext::default()),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("attributes.request.http:"),
        "{status:?}"
    );

    let cookies = (0..5000)
        .map(|i| format!("c{i}=v{i}"))
        .collect::<Vec<_>>()
        .join("; ");
    let long = format!("Bearer {}", "t".repeat(4097));
    for (case, headers) in [
        ("empty Bearer", vec![("authorization", "Bearer")]),
        ("Bearer and spaces", vec![("authorization", "Bearer    ")]),
        ("5,000 cookies", vec![("cookie", cookies.as_str())]),
        ("a token over 4 KiB", vec![("authorization", long.as_str())]),
        // Envoy writes "!" for each byte that is not UTF-8 in this map.
        ("replaced bytes", vec![("authorization", "Bearer tok en")]),
    ] {
        assert_denied_401(
            verdict(check(&mut client, envoy_request(&headers)).await.unwrap()),
            case,
        );
    }
    // With encode_raw_headers, Envoy sends raw bytes: non-UTF-8 is denied.
    let mut raw = envoy_request(&[]);
    raw.attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap()
        .header_map = Some(HeaderMap {
        headers: vec![HeaderValue {
            key: "authorization".into(),
            raw_value: b"Bearer tok\xff\xfe".to_vec(),
            ..Default::default()
        }],
    });
    assert_denied_401(
        verdict(check(&mut client, raw).await.unwrap()),
        "raw non-UTF-8",
    );
    assert_eq!(
        appwrite.calls().account,
        0,
        "bad input reached the provider"
    );
}

/// --edge-strip-credentials: the Bearer header is removed; a session cookie is taken
/// out of the cookie header (set, with the other cookies, never also removed), and a
/// cookie header holding only it is removed.
#[tokio::test]
async fn strip_credentials_removes_the_token_from_the_upstream_request() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("secret-s", &idp_user("u-s"), in_a_day());
    let h = service(Backend::Memory, &appwrite, &["--edge-strip-credentials"]).await;
    let mut client = check_client(&h).await;
    let cookie = format!("a_session_{}", appwrite.project());

    let allowed = |response| match verdict(response) {
        Verdict::Allowed { set, removed } => (set, removed),
        denied => panic!("denied: {denied:?}"),
    };
    let (set, removed) = allowed(
        check(
            &mut client,
            envoy_request(&[("authorization", "Bearer secret-s")]),
        )
        .await
        .unwrap(),
    );
    assert_eq!(removed, ["authorization"]);
    assert!(!set.contains_key("authorization"));

    let (set, removed) = allowed(
        check(
            &mut client,
            envoy_request(&[("cookie", &format!("theme=dark; {cookie}=secret-s; lang=en"))]),
        )
        .await
        .unwrap(),
    );
    assert_eq!(set["cookie"], "theme=dark; lang=en");
    assert!(removed.is_empty(), "{removed:?}");

    let (set, removed) = allowed(
        check(
            &mut client,
            envoy_request(&[("cookie", &format!("{cookie}=secret-s"))]),
        )
        .await
        .unwrap(),
    );
    assert_eq!(removed, ["cookie"]);
    assert!(!set.contains_key("cookie"));
}

/// Check has its own grpc.health.v1 name, which follows the store like
/// `sessioncache.v1.SessionCache`: NOT_SERVING while Redis is down, SERVING again after.
#[tokio::test]
async fn check_health_follows_the_store() {
    let appwrite = AppwriteStandIn::start().await;
    let mut h = service(Backend::Redis, &appwrite, &[]).await;
    h.server
        .wait_health(HEALTH_NAME, ServingStatus::Serving)
        .await;
    h.redis().kill();
    h.server
        .wait_health(HEALTH_NAME, ServingStatus::NotServing)
        .await;
    h.redis().restart().await;
    h.server
        .wait_health(HEALTH_NAME, ServingStatus::Serving)
        .await;
}

/// Check is a reader's call: with --api-keys-file, no key is UNAUTHENTICATED and a
/// reader's key is answered (the proxy sends it in gRPC metadata, as Envoy's
/// `initial_metadata` does).
#[tokio::test]
async fn check_needs_a_readers_credentials() {
    const KEY: &str = "envoy-key-2b7e15";
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("secret-k", &idp_user("u-k"), in_a_day());
    let dir = Dir::new();
    let sha: String = Sha256::digest(KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keys = dir.write(
        "keys.toml",
        format!("[[keys]]\nname = \"envoy\"\nsha256 = \"{sha}\"\nroles = [\"reader\"]\n"),
    );
    let h = service(Backend::Memory, &appwrite, &["--api-keys-file", &keys]).await;
    let mut client = check_client(&h).await;
    let request = || envoy_request(&[("authorization", "Bearer secret-k")]);
    let status = check(&mut client, request()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut keyed = tonic::Request::new(request());
    keyed
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let answer = client.check(keyed).await.unwrap().into_inner();
    assert!(matches!(verdict(answer), Verdict::Allowed { .. }));
}
