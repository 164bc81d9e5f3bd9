//! The one call layer in front of every gRPC method: every method the server hosts has
//! a row in the RPC table (so none can fall back to a default role), a method with no
//! row is refused, and a call is counted however it ends: answered, cancelled by the
//! client, or cut by the request timeout.

mod support;

use std::{collections::BTreeSet, time::Duration};

use chrono::Utc;
use futures_util::StreamExt;
use prost::Message;
use prost_types::FileDescriptorProto;
use session_cache::{pb, rpc::Rpc};
use support::{
    Harness, PATIENCE, eventually, free_port,
    idp::{AppwriteStandIn, Mode},
    scrape::{scrape, series},
};
use tokio::time::Instant;
use tonic_reflection::pb::{v1, v1alpha};

/// The services a reflection v1 client sees, with each one's methods.
async fn served_v1(h: &Harness) -> BTreeSet<String> {
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(h.server.channel().await);
    let ask = |request: MessageRequest| {
        futures_util::stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }])
    };
    let mut answers = client
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("ListServices answered something else");
    };
    let mut paths = BTreeSet::new();
    for service in list.service {
        let mut answers = client
            .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
                service.name.clone(),
            )))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            answers.next().await.unwrap().unwrap().message_response
        else {
            panic!("no file defines {}", service.name);
        };
        for bytes in files.file_descriptor_proto {
            let file = FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            for defined in &file.service {
                let name = format!("{}.{}", file.package(), defined.name());
                if name != service.name {
                    continue;
                }
                for method in &defined.method {
                    paths.insert(format!("/{name}/{}", method.name()));
                }
            }
        }
    }
    paths
}

/// Every method of every service the server hosts, as reflection lists them, has its
/// row in the RPC table; reflection v1alpha's own method too. A method added to a
/// hosted service without a row would fail here before anyone could call it.
#[tokio::test]
async fn every_hosted_method_has_a_row() {
    let h = Harness::start(support::Backend::Memory, &[]).await;
    let mut served = served_v1(&h).await;
    // v1 lists the services registered with it; v1alpha is served beside it.
    served.insert("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".into());
    for expected in [
        "/sessioncache.v1.SessionCache/Get",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ] {
        assert!(served.contains(expected), "{expected} not in {served:?}");
    }
    for path in &served {
        assert!(
            Rpc::from_path(path).is_some(),
            "{path} is served but has no row in the RPC table"
        );
    }
    let rows: BTreeSet<String> = Rpc::ALL
        .iter()
        .map(|rpc| format!("/{}", rpc.path()))
        .collect();
    assert_eq!(rows, served, "rows of methods that are not served");
    // The descriptor sets the server registers agree with what it serves.
    for set in [
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        v1::FILE_DESCRIPTOR_SET,
        v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(set).unwrap();
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    assert!(Rpc::from_path(&path).is_some(), "{path} has no row");
                }
            }
        }
    }
}

/// The value of the `session_cache_calls_total` series of `rpc` and `outcome`.
fn calls(text: &str, rpc: &str, outcome: &str) -> f64 {
    let labels = [format!("rpc=\"{rpc}\""), format!("outcome=\"{outcome}\"")];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    series(text, "session_cache_calls_total", &labels)
        .unwrap_or_else(|| panic!("no calls_total {labels:?} in\n{text}"))
}

/// Waits until the `calls_total` series of `rpc` and `outcome` reads `want`.
async fn counted(port: u16, rpc: &str, outcome: &str, want: f64) {
    eventually(
        PATIENCE,
        format_args!("calls_total{{rpc={rpc},outcome={outcome}}} = {want}"),
        async || match calls(&scrape(port).await, rpc, outcome) {
            seen if seen == want => Ok(()),
            seen => Err(seen),
        },
    )
    .await;
}

/// A method with no row is refused UNIMPLEMENTED and counted; a call the client gives
/// up on is counted `cancelled`, and one the request timeout cuts is counted `timeout`,
/// though neither ever reached the end of its handler.
#[tokio::test]
async fn calls_are_counted_however_they_end() {
    let port = free_port();
    let appwrite = AppwriteStandIn::start().await;
    let expire = Utc::now() + chrono::Duration::days(1);
    appwrite.add_session("slow-1", &idp_user("u1"), expire);
    appwrite.add_session("slow-2", &idp_user("u2"), expire);
    appwrite.set_mode(Mode::Hang);
    let metrics = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--metrics-listen",
        &metrics,
        "--request-timeout-ms",
        "400",
        "--idp-timeout-ms",
        "5000",
    ];
    let idp = appwrite.flags();
    args.extend(idp.iter().map(String::as_str));
    let h = Harness::start(support::Backend::Memory, &args).await;
    let text = scrape(port).await;
    for outcome in ["cancelled", "timeout"] {
        assert_eq!(calls(&text, "Validate", outcome), 0.0, "exported at 0");
    }
    assert_eq!(calls(&text, "unknown", "unimplemented"), 0.0);

    // No such method: refused before any service sees it.
    let mut client = tonic::client::Grpc::new(h.server.channel().await);
    client.ready().await.unwrap();
    let refused = client
        .unary::<pb::GetRequest, pb::GetResponse, _>(
            tonic::Request::new(pb::GetRequest { token: "t".into() }),
            "/sessioncache.v1.SessionCache/Forget".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    counted(port, "unknown", "unimplemented", 1.0).await;

    // The client gives up after 100 ms; the provider never answers.
    let mut validate = h.client.clone();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        validate.validate(pb::ValidateRequest {
            token: "slow-1".into(),
        }),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the hanging provider answered: {gave_up:?}"
    );
    counted(port, "Validate", "cancelled", 1.0).await;
    counted(port, "Validate", "timeout", 0.0).await;

    // The client waits; the request timeout (400 ms) cuts the call.
    let started = Instant::now();
    let cut = validate
        .validate(pb::ValidateRequest {
            token: "slow-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(cut.code(), tonic::Code::Cancelled, "{cut:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    counted(port, "Validate", "timeout", 1.0).await;
    counted(port, "Validate", "cancelled", 1.0).await;
}

fn idp_user(id: &str) -> session_cache::entry::User {
    session_cache::entry::User {
        id: id.into(),
        email: format!("{id}@example.com"),
        name: id.into(),
        email_verified: true,
        tier: String::new(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    }
}
