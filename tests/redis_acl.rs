//! The Redis ACL users of `docs/OPERATIONS.md`, read from that document
//! (`support::acl`), on the topology each is for: the service serves as that user and
//! its revocations are acknowledged by a replica, and each right the document gives for
//! a reason is needed: without `WAIT` on Sentinel or Cluster every revocation fails,
//! without `ROLE` the Sentinel dial never finds the primary. `tests/conformance.rs` runs
//! its whole suite as the same users.

mod support;

use bb8_redis::redis;
use session_cache::pb::{GetOutcome, SetOutcome};
use support::{Backend, Harness, acl, in_an_hour, pki::Dir, user};
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICE: &str = "sessioncache.v1.SessionCache";

/// Sets `rule` on the documented user `name` on each node of `ports`, on top of what it
/// has (`ACL SETUSER name rule`).
async fn amend(ports: &[u16], name: &str, rule: &str) {
    for port in ports {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(name)
            .arg(rule)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("ACL SETUSER {name} {rule} on {port}: {e}"));
    }
}

/// A session stored and hit, then logged out (acknowledged; with a replica, once the
/// replica has it) and a late Set refused; another stored and hit, then its user's
/// password changed (acknowledged likewise) and the session hidden.
async fn serve_and_revoke(h: &mut Harness, token: &str, user_id: &str) {
    let stored = async |h: &mut Harness, token: &str| {
        let miss = h.get(token).await;
        assert_eq!(miss.outcome(), GetOutcome::Miss, "{token}");
        let set = h.set(token, user(user_id), in_an_hour(), &miss.fence).await;
        assert_eq!(set.outcome(), SetOutcome::Stored, "{token}");
        assert_eq!(h.get(token).await.outcome(), GetOutcome::Hit, "{token}");
        miss.fence
    };
    let fence = stored(h, token).await;
    h.invalidate_token(token)
        .await
        .expect("InvalidateToken is acknowledged as the documented user");
    let set = h.set(token, user(user_id), in_an_hour(), &fence).await;
    assert_eq!(set.outcome(), SetOutcome::Revoked, "a Set after the logout");

    let other = format!("{token}-2");
    stored(h, &other).await;
    h.invalidate_user(user_id)
        .await
        .expect("InvalidateUser is acknowledged as the documented user");
    assert_eq!(h.get(&other).await.outcome(), GetOutcome::Invalidated);
}

/// Without `WAIT` the revocations of a replicated topology fail (gRPC UNAVAILABLE: the
/// write may have happened, its replication cannot be known); with it back, they are
/// acknowledged again.
async fn wait_is_needed(h: &mut Harness, ports: &[u16], name: &str) {
    amend(ports, name, "-wait").await;
    let refused = h
        .invalidate_user("acl-probe")
        .await
        .expect_err("a revocation cannot be acknowledged without WAIT");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    amend(ports, name, "+wait").await;
    h.invalidate_user("acl-probe")
        .await
        .expect("acknowledged again once WAIT is allowed");
}

/// One Redis, as the documented user: everything works, and the user can touch no key
/// outside the service's families.
#[tokio::test]
async fn one_redis_as_the_documented_user() {
    let mut h = acl::harness(Backend::Redis, &[]).await;
    serve_and_revoke(&mut h, "acl-redis", "acl-user").await;
    let documented = acl::documented("redis");
    let url = h.redis().url().replace(
        "redis://",
        &format!("redis://{}:{}@", documented.name, acl::PASSWORD),
    );
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let denied: redis::RedisResult<()> = redis::cmd("SET")
        .arg("other:key")
        .arg("x")
        .query_async(&mut conn)
        .await;
    let denied = denied.expect_err("the documented user writes no other key");
    assert!(
        denied.to_string().to_uppercase().contains("NOPERM"),
        "{denied}"
    );
}

/// Sentinel, as the documented users on the data nodes and on the Sentinels: the service
/// finds the primary, serves, and has its revocations acknowledged by the replica; without
/// `WAIT` they fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_as_the_documented_users() {
    let mut h = acl::harness(Backend::Sentinel, &["--store-timeout-ms", "1000"]).await;
    serve_and_revoke(&mut h, "acl-sentinel", "acl-user").await;
    let ports = h.sentinel.as_ref().unwrap().data_ports();
    let name = acl::documented("sentinel-data").name;
    wait_is_needed(&mut h, &ports, &name).await;
}

/// Sentinel without `ROLE` on the data nodes: every dial asks the node the Sentinels name
/// whether it is the primary, so the service never turns SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_without_role_never_serves() {
    let topology = support::sentinel::SentinelTopology::start(Default::default()).await;
    let data = acl::documented("sentinel-data");
    let sentinel = acl::documented("sentinel");
    for port in topology.data_ports() {
        data.set_on(port).await;
    }
    amend(&topology.data_ports(), &data.name, "-role").await;
    for port in topology.sentinel_ports() {
        sentinel.set_on(port).await;
    }
    let dir = Dir::new();
    let (data_file, sentinel_file) = (data.password_file(&dir), sentinel.password_file(&dir));
    let sentinels = topology.sentinels();
    let server = support::Server::start(&[
        "--redis-sentinels",
        &sentinels,
        "--redis-sentinel-master",
        topology.master_name(),
        "--redis-username",
        &data.name,
        "--redis-password-file",
        &data_file,
        "--redis-sentinel-username",
        &sentinel.name,
        "--redis-sentinel-password-file",
        &sentinel_file,
    ])
    .await;
    // The same flags with ROLE allowed serve (below); without it, a bounded watch of a
    // few health pings stays NOT_SERVING.
    let mut health = server.health().await;
    let until = Instant::now() + std::time::Duration::from_millis(1500);
    while Instant::now() < until {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: SERVICE.into(),
            })
            .await
            .map(|r| r.into_inner().status());
        assert!(
            !matches!(status, Ok(ServingStatus::Serving)),
            "SERVING without ROLE"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    amend(&topology.data_ports(), &data.name, "+role").await;
    server.wait_health(SERVICE, ServingStatus::Serving).await;
}

/// Cluster (three primaries, each with a replica), as the documented user on every
/// node: the slot map, the health check, lookups and revocations acknowledged by the
/// primary's replica; without `WAIT` they fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_as_the_documented_user() {
    let mut h = acl::harness(Backend::Cluster, &["--store-timeout-ms", "1000"]).await;
    serve_and_revoke(&mut h, "acl-cluster", "acl-user").await;
    let ports = h.cluster.as_ref().unwrap().ports();
    let name = acl::documented("cluster").name;
    wait_is_needed(&mut h, &ports, &name).await;
}
