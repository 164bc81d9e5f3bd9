//! `grpc.health.v1` as probes use it, server reflection as grpcurl uses it, and the
//! shutdown that flips health before draining.

mod support;

use std::time::Duration;

use session_cache::pb::GetOutcome;
use support::{Backend, Harness, PATIENCE, Redis, Server};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_reflection::pb::{v1, v1alpha};

const SERVICE: &str = "sessioncache.v1.SessionCache";

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

/// "" is the process, the service name is the store; unknown names are NOT_FOUND.
#[tokio::test]
async fn check_answers_for_process_and_store() {
    let h = Harness::start(Backend::Redis, &[]).await;
    let mut health = h.server.health().await;
    let process = health.check(check("")).await.unwrap().into_inner();
    assert_eq!(process.status(), ServingStatus::Serving);
    let store = health.check(check(SERVICE)).await.unwrap().into_inner();
    assert_eq!(store.status(), ServingStatus::Serving);
    let unknown = health.check(check("nope")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

/// Watch streams every change of the store's health: down when Redis dies, up when it
/// is back, with no restart of the service.
#[tokio::test]
async fn watch_follows_the_store() {
    let mut h = Harness::start(Backend::Redis, &[]).await;
    let mut health = h.server.health().await;
    let mut watch = health.watch(check(SERVICE)).await.unwrap().into_inner();
    let mut next = async || {
        tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("a health change within the patience")
            .expect("the stream stays open")
            .unwrap()
            .status()
    };
    assert_eq!(next().await, ServingStatus::Serving);
    h.redis().kill();
    assert_eq!(next().await, ServingStatus::NotServing);
    h.redis().restart().await;
    assert_eq!(next().await, ServingStatus::Serving);
}

/// Before the first successful ping the store is NOT_SERVING while the process serves;
/// once Redis appears the store turns SERVING.
#[tokio::test]
async fn store_health_waits_for_the_first_ping() {
    let mut redis = Redis::not_started();
    let server = Server::start(&["--redis-url", &redis.url()]).await;
    server.wait_health("", ServingStatus::Serving).await;
    let mut health = server.health().await;
    let store = health.check(check(SERVICE)).await.unwrap().into_inner();
    assert_eq!(store.status(), ServingStatus::NotServing);
    redis.restart().await;
    server.wait_health(SERVICE, ServingStatus::Serving).await;
}

/// Sends one command to the test's Redis directly, as an operator would.
async fn redis_command(redis: &Redis, args: &[&str]) {
    let mut conn = redis.conn().await;
    let _: () = bb8_redis::redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A Redis made a replica is not ready (SPEC §8): health turns NOT_SERVING, Get and Set
/// answer UNAVAILABLE instead of reading from the replica, and a revocation fails with
/// gRPC UNAVAILABLE; once it is a primary again, all is served again.
#[tokio::test]
async fn a_redis_made_replica_is_not_ready() {
    let mut h = Harness::start(Backend::Redis, &[]).await;
    h.set("tok", support::user("u1"), support::in_an_hour(), "")
        .await;
    let other = Redis::start().await;
    let port = other.url().rsplit(':').next().unwrap().to_owned();
    redis_command(h.redis(), &["REPLICAOF", "127.0.0.1", &port]).await;
    h.server
        .wait_health(SERVICE, ServingStatus::NotServing)
        .await;
    let got = h.get("tok").await;
    assert_eq!(got.outcome(), GetOutcome::Unavailable, "{got:?}");
    let status = h.invalidate_user("u1").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    redis_command(h.redis(), &["REPLICAOF", "NO", "ONE"]).await;
    h.server.wait_health(SERVICE, ServingStatus::Serving).await;
    h.invalidate_user("u1").await.unwrap();
}

/// A primary that refuses writes for want of replicas (`min-replicas-to-write`) is not
/// ready either: its lookups could miss revocations written to a newer primary.
#[tokio::test]
async fn a_primary_short_of_replicas_is_not_ready() {
    let mut h = Harness::start(Backend::Redis, &[]).await;
    redis_command(h.redis(), &["CONFIG", "SET", "min-replicas-to-write", "1"]).await;
    h.server
        .wait_health(SERVICE, ServingStatus::NotServing)
        .await;
    assert_eq!(h.get("tok").await.outcome(), GetOutcome::Unavailable);
    redis_command(h.redis(), &["CONFIG", "SET", "min-replicas-to-write", "0"]).await;
    h.server.wait_health(SERVICE, ServingStatus::Serving).await;
}

/// Reflection v1 and v1alpha both list the cache and health services, and describe
/// the cache's messages (what `grpcurl list` and `describe` need).
#[tokio::test]
async fn reflection_lists_both_services() {
    let h = Harness::start(Backend::Memory, &[]).await;
    let channel = h.server.channel().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("not a service list: {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&SERVICE.to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "sessioncache.v1.GetResponse".into(),
            ),
        ),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    assert!(
        matches!(reply.message_response, Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{reply:?}"
    );

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("not a service list: {reply:?}");
    };
    assert!(list.service.iter().any(|s| s.name == SERVICE));
}

/// On shutdown both health names turn NOT_SERVING for the watchers, and the server
/// stops within the grace period even though a Watch stream is still open.
#[tokio::test]
async fn shutdown_flips_health_and_ends_despite_open_watch() {
    let h = Harness::start(Backend::Memory, &["--shutdown-grace-seconds", "1"]).await;
    let mut health = h.server.health().await;
    let mut process = health.watch(check("")).await.unwrap().into_inner();
    let mut store = health.watch(check(SERVICE)).await.unwrap().into_inner();
    assert_eq!(
        process.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    assert_eq!(
        store.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let stopping = tokio::spawn(h.server.stop());
    let status = |s: Option<Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>| {
        s.unwrap().unwrap().status()
    };
    assert_eq!(status(process.next().await), ServingStatus::NotServing);
    assert_eq!(status(store.next().await), ServingStatus::NotServing);
    let stopped = tokio::time::timeout(Duration::from_secs(5), stopping).await;
    stopped
        .expect("the drain is bounded")
        .unwrap()
        .expect("run returns Ok");
}

/// A call in flight when shutdown begins completes with its answer; the process then
/// stops within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_calls_in_flight_finish() {
    // A frozen Redis and a long store timeout hold the Get in flight for ~1 s; the
    // health loop checks rarely, so the Get really waits on Redis.
    let mut h = Harness::start(
        Backend::Redis,
        &[
            "--store-timeout-ms",
            "1000",
            "--health-interval-ms",
            "60000",
            "--shutdown-grace-seconds",
            "5",
        ],
    )
    .await;
    h.redis().freeze();
    let mut client = h.client.clone();
    let in_flight = tokio::spawn(async move {
        client
            .get(session_cache::pb::GetRequest {
                token: "tok".into(),
            })
            .await
    });
    // Let the call reach the server before shutdown starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    let Harness { server, redis, .. } = h;
    server.stop().await.expect("run returns Ok");
    let reply = in_flight
        .await
        .unwrap()
        .expect("the call in flight finished with OK");
    assert_eq!(
        reply.into_inner().outcome(),
        session_cache::pb::GetOutcome::Unavailable
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    redis.unwrap().thaw();
}

/// A Cluster with a slot that no primary serves refuses every key (CLUSTERDOWN), though
/// each node still answers a keyless script: the store is NOT_SERVING until the slot is
/// served again, and lookups answer UNAVAILABLE meanwhile.
#[tokio::test]
async fn cluster_with_a_slot_unserved_is_not_serving() {
    let topology =
        support::cluster::ClusterTopology::start(support::cluster::Cluster::default()).await;
    let h = Harness::over_cluster(
        &topology,
        &["--revocation-replicas", "0", "--health-interval-ms", "100"],
    )
    .await;
    let slot = topology.slot_map().await[0].first;
    let owner = topology.primary_for_slot(slot).await;
    let mut conn = topology.conn(owner).await;
    let _: () = bb8_redis::redis::cmd("CLUSTER")
        .arg("DELSLOTS")
        .arg(slot)
        .query_async(&mut conn)
        .await
        .unwrap();
    h.server
        .wait_health(SERVICE, ServingStatus::NotServing)
        .await;

    let _: () = bb8_redis::redis::cmd("CLUSTER")
        .arg("ADDSLOTS")
        .arg(slot)
        .query_async(&mut conn)
        .await
        .unwrap();
    h.server.wait_health(SERVICE, ServingStatus::Serving).await;
    let mut client = h.client.clone();
    let got = client
        .get(session_cache::pb::GetRequest {
            token: "tok".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.outcome(), GetOutcome::Miss);
}
