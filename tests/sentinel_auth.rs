//! SPEC §8, credentials in the Sentinel topology, with real processes: data nodes that
//! require a password (and replicate with it) and three Sentinels that require one of
//! their own (see `support::sentinel`). Given both password files, the service finds the
//! primary through the Sentinels, serves, has revocations acknowledged by the replica and
//! follows a planned failover to the new primary. Given a wrong password for the data
//! nodes or for the Sentinels, it never turns SERVING, answers UNAVAILABLE, and the
//! password shows nowhere: not in a reply, not in a gRPC status, not in its own logs
//! (captured here at debug level).

mod support;

use std::{
    io::Write,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use bb8_redis::redis;
use session_cache::pb::{self, GetOutcome, SetOutcome};
use support::{
    Harness, Server, eventually, in_an_hour,
    pki::Dir,
    sentinel::{FAILOVER_PATIENCE, SentinelTopology, Topology},
    user,
};
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

const SERVICE: &str = "sessioncache.v1.SessionCache";
const DATA_PASSWORD: &str = "data-nodes-pass-7f3a9c";
const SENTINEL_PASSWORD: &str = "sentinels-pass-91c2e4";
/// A password that neither the data nodes nor the Sentinels accept.
const WRONG_PASSWORD: &str = "wrong-pass-e5d0b8";
/// How long a service with a wrong password is watched staying NOT_SERVING.
const WATCH: Duration = Duration::from_millis(1500);

/// Every log line of the service, from every test of this binary (the subscriber is
/// process-wide); `session_cache` at debug level.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts capturing the service's logs (once per process); the guard prints them if
/// the test panics, so that a failure shows what the service said.
fn capture_logs() -> ShowLogsOnPanic {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("session_cache=debug"))
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
    });
    ShowLogsOnPanic
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

struct ShowLogsOnPanic;

impl Drop for ShowLogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("-- the service's logs --\n{}", logs());
        }
    }
}

/// Asserts that no password of this file appears in `text`, which `what` names.
fn assert_no_password(what: &str, text: &str) {
    for password in [DATA_PASSWORD, SENTINEL_PASSWORD, WRONG_PASSWORD] {
        assert!(!text.contains(password), "{what} shows a password: {text}");
    }
}

/// Data nodes and Sentinels that both require a password.
fn protected() -> Topology {
    Topology {
        data_password: Some(DATA_PASSWORD),
        sentinel_password: Some(SENTINEL_PASSWORD),
        ..Topology::default()
    }
}

/// The topology's nodes refuse a client without the password: what the tests prove is
/// not that of an open topology.
async fn assert_refuses_without_password(topology: &SentinelTopology) {
    let ports = topology
        .data_ports()
        .into_iter()
        .chain(topology.sentinel_ports());
    for port in ports {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("{port} accepts a connection: {e}"));
        let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
        let refused = pong.expect_err("a node answers PING without the password");
        assert!(
            refused.to_string().contains("NOAUTH"),
            "{port} refuses with NOAUTH: {refused}"
        );
    }
}

/// The service's flags over `topology`, with password files for the data nodes and the
/// Sentinels written into `dir`.
fn argv(topology: &SentinelTopology, dir: &Dir, data: &str, sentinel: &str) -> Vec<String> {
    vec![
        "--redis-sentinels".into(),
        topology.sentinels(),
        "--redis-sentinel-master".into(),
        topology.master_name().into(),
        "--redis-password-file".into(),
        dir.write("data-password", format!("{data}\n")),
        "--redis-sentinel-password-file".into(),
        dir.write("sentinel-password", format!("{sentinel}\n")),
    ]
}

/// Data nodes and Sentinels both password-protected, the service given both files: it
/// turns SERVING, Set then Get hits, InvalidateUser is acknowledged (by the replica too)
/// and hides the session, and after `SENTINEL FAILOVER` Sets land on the new primary,
/// Gets hit there and revocations are acknowledged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_for_data_nodes_and_sentinels_serve_through_a_failover() {
    let _logs = capture_logs();
    let began = Instant::now();
    let topology = SentinelTopology::start(protected()).await;
    assert_refuses_without_password(&topology).await;
    let dir = Dir::new();
    let argv = argv(&topology, &dir, DATA_PASSWORD, SENTINEL_PASSWORD);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut h = Harness::over(None, &argv).await;
    let serving = started.elapsed();

    let miss = h.get("auth-token").await;
    assert_eq!(miss.outcome(), GetOutcome::Miss);
    let set = h
        .set("auth-token", user("auth-user"), in_an_hour(), &miss.fence)
        .await;
    assert_eq!(set.outcome(), SetOutcome::Stored);
    let hit = h.get("auth-token").await;
    assert_eq!(hit.outcome(), GetOutcome::Hit);
    assert_eq!(hit.user.unwrap().id, "auth-user");
    h.invalidate_user("auth-user")
        .await
        .expect("InvalidateUser is acknowledged by the primary and its replica");
    assert_eq!(h.get("auth-token").await.outcome(), GetOutcome::Invalidated);

    let switch = Instant::now();
    let new = topology.failover().await;
    assert_eq!(topology.primary_port().await, new);
    topology.first_stored(&mut h, "auth-after-failover").await;
    let stored = switch.elapsed();
    let hit = h.get("auth-after-failover").await;
    assert_eq!(hit.outcome(), GetOutcome::Hit, "a hit on the new primary");
    // Acknowledged once the old primary has rejoined as a replica of the new one, which
    // it does with the data nodes' password (masterauth).
    let mut refused = 0;
    eventually(
        FAILOVER_PATIENCE,
        "InvalidateUser to be acknowledged after the failover",
        async || {
            let status = h.invalidate_user("probe-user").await.err();
            if let Some(status) = &status {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert_no_password("an InvalidateUser status", &format!("{status:?}"));
                refused += 1;
            }
            status.map_or(Ok(()), Err)
        },
    )
    .await;
    let acknowledged = switch.elapsed();
    assert_eq!(
        h.get("auth-after-failover").await.outcome(),
        GetOutcome::Invalidated
    );
    assert_no_password("the service's logs", &logs());
    eprintln!(
        "with passwords: SERVING {serving:?} after the start; after SENTINEL FAILOVER, \
         first STORED on the new primary in {stored:?}, InvalidateUser acknowledged again \
         in {acknowledged:?} ({refused} refused before); whole test {:?}",
        began.elapsed()
    );
}

/// Starts the service with `argv` and watches it for [`WATCH`]: health says NOT_SERVING
/// throughout, Get answers UNAVAILABLE (status OK, no fence) and InvalidateUser the
/// UNAVAILABLE status, and no password shows in any of it or in the logs.
async fn never_serves(argv: &[String], name: &str) {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let server = Server::start(&argv).await;
    let mut health = server.health().await;
    let mut client = server.client().await;
    let started = Instant::now();
    let mut checks = 0;
    while started.elapsed() < WATCH {
        let status = health
            .check(HealthCheckRequest {
                service: SERVICE.into(),
            })
            .await
            .map(|r| r.into_inner().status());
        assert!(
            matches!(status, Ok(ServingStatus::NotServing)),
            "{name}: health of {SERVICE} is {status:?} after {:?}",
            started.elapsed()
        );
        checks += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = client
        .get(pb::GetRequest {
            token: "auth-token".into(),
        })
        .await
        .expect("Get answers with status OK")
        .into_inner();
    assert_eq!(got.outcome(), GetOutcome::Unavailable, "{name}");
    assert!(got.fence.is_empty(), "{name}: no fence without a store");
    assert_no_password("a Get reply", &format!("{got:?}"));
    let refused = client
        .invalidate_user(pb::InvalidateUserRequest {
            user_id: "auth-user".into(),
        })
        .await
        .expect_err("InvalidateUser cannot be acknowledged");
    assert_eq!(refused.code(), Code::Unavailable, "{name}: {refused:?}");
    assert_no_password("an InvalidateUser status", &format!("{refused:?}"));
    let logs = logs();
    assert_no_password("the service's logs", &logs);
    // Why the store is down, each message once, without its timestamp (the lines of
    // every test of this binary: the subscriber is process-wide).
    let mut why: Vec<&str> = Vec::new();
    for line in logs.lines() {
        let message = line
            .split_once(' ')
            .map_or(line, |(_, rest)| rest.trim_start());
        if (message.contains("store is unreachable")
            || message.contains("did not answer")
            || message.contains("dialling the Redis primary failed"))
            && !why.contains(&message)
        {
            why.push(message);
        }
    }
    assert!(
        !why.is_empty(),
        "{name}: the service logs that the store is unreachable"
    );
    eprintln!(
        "{name}: NOT_SERVING at each of {checks} health checks over {WATCH:?}; Get {:?}; \
         InvalidateUser {:?} {:?}; the logs (of this binary so far) say:\n  {}",
        got.outcome(),
        refused.code(),
        refused.message(),
        why.join("\n  ")
    );
}

/// A wrong password for the data nodes (the Sentinels' is right): the service finds the
/// primary but cannot use it, so it never turns SERVING, Get answers UNAVAILABLE, the
/// logs say why, and the wrong password shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_data_password_never_serves() {
    let _logs = capture_logs();
    let topology = SentinelTopology::start(protected()).await;
    let dir = Dir::new();
    let argv = argv(&topology, &dir, WRONG_PASSWORD, SENTINEL_PASSWORD);
    never_serves(&argv, "wrong data password").await;
    assert!(
        logs()
            .lines()
            .any(|l| l.contains("dialling the Redis primary failed")
                && l.contains("authentication failed")
                && !l.contains("no Sentinel answered")),
        "the logs say that the data node refused the password"
    );
}

/// A wrong password for the Sentinels (the data nodes' is right): no Sentinel names the
/// primary to the service, so it never turns SERVING, Get answers UNAVAILABLE, the logs
/// say why, and the wrong password shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_sentinel_password_never_serves() {
    let _logs = capture_logs();
    let topology = SentinelTopology::start(protected()).await;
    let dir = Dir::new();
    let argv = argv(&topology, &dir, DATA_PASSWORD, WRONG_PASSWORD);
    never_serves(&argv, "wrong Sentinel password").await;
    assert!(
        logs()
            .lines()
            .any(|l| l.contains("no Sentinel answered") && l.contains("authentication failed")),
        "the logs say that the Sentinels refused the password"
    );
}
