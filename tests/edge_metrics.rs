//! Check's and the decisions' metrics from a live scrape, alone in their test binary:
//! the metrics recorder is the process's, and other tests' calls would count in it.

mod support;

use session_cache::{
    edge::envoy_pb::envoy::service::auth::v3::authorization_client::AuthorizationClient, pb,
};
use support::{
    Backend, Harness,
    envoy::envoy_request,
    idp::{AppwriteStandIn, idp_user, in_a_day},
};

async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).await.unwrap();
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the metrics port never opened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of `session_cache_calls_total{rpc, outcome}`.
fn calls(text: &str, rpc: &str, outcome: &str) -> u64 {
    let labels = [format!("rpc=\"{rpc}\""), format!("outcome=\"{outcome}\"")];
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("session_cache_calls_total")
                && labels.iter().all(|label| l.contains(label.as_str()))
        })
        .unwrap_or_else(|| panic!("no calls series {labels:?} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The value of the one decisions series with these labels.
fn decisions(text: &str, via: &str, source: &str, decision: &str) -> u64 {
    let labels = [
        format!("via=\"{via}\""),
        format!("source=\"{source}\""),
        format!("decision=\"{decision}\""),
    ];
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("session_cache_decisions_total")
                && labels.iter().all(|label| l.contains(label.as_str()))
        })
        .unwrap_or_else(|| panic!("no decisions series {labels:?} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `session_cache_decisions_total` tells Check apart from Validate: every series is
/// there at 0 from start-up (so are the queue gauge and Check's call outcomes), a
/// Check's provider call and its later cache hit count under `via="Check"`, a
/// Validate's under `via="Validate"`; the call layer counts Checks allowed and denied.
#[tokio::test]
async fn decisions_are_counted_by_path() {
    let appwrite = AppwriteStandIn::start().await;
    appwrite.add_session("secret-m", &idp_user("u-m"), in_a_day());
    let port = support::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut args = appwrite.flags();
    args.extend(["--metrics-listen".to_string(), metrics]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut h = Harness::start(Backend::Memory, &args).await;
    let text = scrape(port).await;
    for via in ["Validate", "Check", "/auth"] {
        for (source, decision) in [
            ("cache", "valid"),
            ("negative_cache", "invalid"),
            ("provider", "valid"),
            ("provider", "invalid"),
            ("provider", "unavailable"),
        ] {
            assert_eq!(decisions(&text, via, source, decision), 0, "{via} {source}");
        }
    }
    assert!(text.contains("session_cache_idp_waiting 0"), "{text}");
    for outcome in ["allowed", "denied", "unavailable_status", "unauthenticated"] {
        assert_eq!(calls(&text, "Check", outcome), 0, "{outcome}");
    }

    let mut client = AuthorizationClient::new(h.server.channel().await);
    let request = envoy_request(&[("authorization", "Bearer secret-m")]);
    for _ in 0..2 {
        client.check(request.clone()).await.unwrap();
    }
    h.client
        .validate(pb::ValidateRequest {
            token: "secret-m".into(),
        })
        .await
        .unwrap();
    client.check(envoy_request(&[])).await.unwrap();
    let text = scrape(port).await;
    // The call layer counts Check like every call, by the outcome it answered.
    assert_eq!(calls(&text, "Check", "allowed"), 2);
    assert_eq!(calls(&text, "Check", "denied"), 1);
    assert_eq!(decisions(&text, "Check", "provider", "valid"), 1);
    assert_eq!(decisions(&text, "Check", "cache", "valid"), 1);
    assert_eq!(decisions(&text, "Validate", "cache", "valid"), 1);
    assert_eq!(decisions(&text, "Validate", "provider", "valid"), 0);
}
