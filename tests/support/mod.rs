//! What every integration test stands on: real `redis-server` processes on free ports
//! (`redis_server`: that the test can kill, freeze and restart; `sentinel` and `cluster`
//! topologies of them), the real server on port 0, and real clients.
//!
//! Waits are bounded polls of a real condition, never fixed sleeps (`poll`).

#![allow(dead_code)] // each test binary uses a different part of it

pub mod acl;
pub mod cluster;
pub mod envoy;
pub mod failover;
pub mod hostile;
pub mod http;
pub mod idp;
pub mod load;
pub mod nodes;
pub mod oidc;
pub mod pki;
pub mod poll;
pub mod process;
pub mod race;
pub mod redis_server;
pub mod scrape;
pub mod sentinel;
pub mod subject;
pub mod webhooks;

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    time::Duration,
};

use prost_types::Timestamp;
use session_cache::{
    Config,
    keys::TokenHash,
    pb::{self, session_cache_client::SessionCacheClient},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle, time::Instant};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub use poll::{PATIENCE, eventually};
pub use redis_server::Redis;

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Which store a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Redis,
    Memory,
    /// A primary, a replica and three Sentinels (`sentinel::SentinelTopology`).
    Sentinel,
    /// A Redis Cluster of three primaries, each with a replica (`cluster::ClusterTopology`).
    Cluster,
}

impl Backend {
    /// What `HealthResponse.store` says for this backend.
    pub fn store_name(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Memory => "memory",
            Backend::Sentinel => "redis-sentinel",
            Backend::Cluster => "redis-cluster",
        }
    }

    /// The default `--clock-skew-ms` margin of this backend's topology (SPEC §8).
    pub fn clock_skew(self) -> Duration {
        match self {
            Backend::Sentinel | Backend::Cluster => Duration::from_millis(500),
            Backend::Redis | Backend::Memory => Duration::ZERO,
        }
    }
}

/// The real server on port 0, started through the library's `run`.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), session_cache::error::SetupError>>>,
}

impl Server {
    /// Starts the server with these flags (as on the command line).
    pub async fn start(args: &[&str]) -> Server {
        // Tests ping the store often, so that health follows it quickly.
        let interval: &[&str] = if args.contains(&"--health-interval-ms") {
            &[]
        } else {
            &["--health-interval-ms", "100"]
        };
        let argv = ["session-cache", "--listen", "127.0.0.1:0"]
            .into_iter()
            .chain(interval.iter().copied())
            .chain(args.iter().copied());
        let config = Config::load_from(argv).expect("test flags are valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(session_cache::run(config, listener, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the test server")
    }

    /// A `SessionCache` client.
    pub async fn client(&self) -> SessionCacheClient<Channel> {
        SessionCacheClient::new(self.channel().await)
    }

    /// A `grpc.health.v1` client.
    pub async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// Waits until health says `service` has `want`.
    pub async fn wait_health(&self, service: &str, want: ServingStatus) {
        wait_health(self.health().await, service, want).await;
    }

    /// Asks the server to stop and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), session_cache::error::SetupError> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.expect("server task")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits until `health` says `service` has `want`.
pub async fn wait_health(mut health: HealthClient<Channel>, service: &str, want: ServingStatus) {
    let what = format!("health of {service:?} to be {want:?}");
    eventually(PATIENCE, what, async || {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map(|r| r.into_inner().status());
        match status {
            Ok(status) if status == want => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

/// Waits (at most `patience`) until a Set of the test's own `probe` token through `h`
/// answers STORED and `on_primary` says the entry (by its key) is on the primary that
/// should hold it; returns when the Set answered. What the failover tests measure a
/// topology's recovery by.
pub async fn stored_on_primary(
    h: &mut Harness,
    probe: &str,
    patience: Duration,
    on_primary: impl AsyncFn(&str) -> Result<bool, String>,
) -> Instant {
    let key = TokenHash::of(probe).entry_key();
    eventually(
        patience,
        format!("a STORED of {probe} on its primary"),
        async || {
            let got = h.get(probe).await;
            if got.fence.is_empty() {
                return Err(format!("Get answered {:?} without a fence", got.outcome()));
            }
            let set = h
                .set(probe, user("probe-user"), in_an_hour(), &got.fence)
                .await;
            if set.outcome() != pb::SetOutcome::Stored {
                return Err(format!("Set answered {:?}", set.outcome()));
            }
            let stored = Instant::now();
            match on_primary(&key).await {
                Ok(true) => Ok(stored),
                Ok(false) => Err("STORED, but not on the primary".to_string()),
                Err(e) => Err(e),
            }
        },
    )
    .await
}

/// A test's whole set-up: a store (Redis, Sentinels or memory) and the server over it,
/// serving.
pub struct Harness {
    pub redis: Option<Redis>,
    pub sentinel: Option<sentinel::SentinelTopology>,
    pub cluster: Option<cluster::ClusterTopology>,
    pub server: Server,
    pub client: SessionCacheClient<Channel>,
}

impl Harness {
    /// Starts the store and the server with these extra flags, and waits until serving.
    pub async fn start(backend: Backend, args: &[&str]) -> Harness {
        match backend {
            Backend::Redis => Harness::over(Some(Redis::start().await), args).await,
            Backend::Memory => Harness::over(None, args).await,
            Backend::Sentinel => {
                let topology =
                    sentinel::SentinelTopology::start(sentinel::Topology::default()).await;
                let mut harness = Harness::over_sentinels(&topology, args).await;
                harness.sentinel = Some(topology);
                harness
            }
            Backend::Cluster => {
                let topology = cluster::ClusterTopology::start(cluster::Cluster {
                    primaries: 3,
                    replicas_per_primary: 1,
                })
                .await;
                let mut harness = Harness::over_cluster(&topology, args).await;
                harness.cluster = Some(topology);
                harness
            }
        }
    }

    /// Starts the server over a Cluster that the caller keeps, and waits until serving.
    pub async fn over_cluster(topology: &cluster::ClusterTopology, args: &[&str]) -> Harness {
        let seeds = topology.seeds();
        let mut argv = vec!["--redis-cluster-nodes", &seeds];
        argv.extend(args);
        Harness::over(None, &argv).await
    }

    /// Starts the server over a Sentinel topology that the caller keeps, and waits until
    /// serving.
    pub async fn over_sentinels(topology: &sentinel::SentinelTopology, args: &[&str]) -> Harness {
        let sentinels = topology.sentinels();
        let mut argv = vec![
            "--redis-sentinels",
            &sentinels,
            "--redis-sentinel-master",
            topology.master_name(),
        ];
        argv.extend(args);
        Harness::over(None, &argv).await
    }

    /// Starts the server over an already running Redis (or memory when `None`).
    pub async fn over(redis: Option<Redis>, args: &[&str]) -> Harness {
        let url = redis.as_ref().map(Redis::url);
        let mut argv: Vec<&str> = args.to_vec();
        if let Some(url) = &url {
            argv.extend(["--redis-url", url]);
        }
        let server = Server::start(&argv).await;
        server
            .wait_health("sessioncache.v1.SessionCache", ServingStatus::Serving)
            .await;
        let client = server.client().await;
        Harness {
            redis,
            sentinel: None,
            cluster: None,
            server,
            client,
        }
    }

    /// The test Redis; panics on the memory backend.
    pub fn redis(&mut self) -> &mut Redis {
        self.redis
            .as_mut()
            .expect("this test needs the Redis backend")
    }

    /// The same service, as a [`subject::Caller`] (whose shorthands the methods below use).
    pub fn caller(&self) -> subject::Caller {
        subject::Caller::Network(self.client.clone())
    }

    pub async fn get(&mut self, token: &str) -> pb::GetResponse {
        self.caller().get_token(token).await
    }

    pub async fn set(
        &mut self,
        token: &str,
        user: pb::User,
        expire: Timestamp,
        fence: &str,
    ) -> pb::SetResponse {
        self.caller().set_session(token, user, expire, fence).await
    }

    pub async fn invalidate_user(
        &mut self,
        user_id: &str,
    ) -> Result<pb::InvalidateUserResponse, tonic::Status> {
        self.caller().invalidate_user_id(user_id).await
    }

    pub async fn invalidate_token(
        &mut self,
        token: &str,
    ) -> Result<pb::InvalidateTokenResponse, tonic::Status> {
        self.caller().invalidate_token_of(token).await
    }
}

/// A user as an identity provider would describe it.
pub fn user(id: &str) -> pb::User {
    pb::User {
        id: id.into(),
        email: format!("{id}@example.com"),
        name: format!("User {id}"),
        email_verified: true,
        tier: "pro".into(),
        created_at: Some(Timestamp {
            seconds: 1_705_314_600,
            nanos: 0,
        }),
        updated_at: Some(Timestamp {
            seconds: 1_705_314_600,
            nanos: 123_456_000,
        }),
    }
}

/// The instant `millis` milliseconds from now (negative for the past).
pub fn in_millis(millis: i64) -> Timestamp {
    let t = chrono::Utc::now() + chrono::Duration::milliseconds(millis);
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// An hour from now: a session that outlives any test.
pub fn in_an_hour() -> Timestamp {
    in_millis(3_600_000)
}

/// Outcome helpers, so that assertions read as the enums do.
pub fn get_outcome(r: &pb::GetResponse) -> pb::GetOutcome {
    r.outcome()
}

pub fn set_outcome(r: &pb::SetResponse) -> pb::SetOutcome {
    r.outcome()
}
