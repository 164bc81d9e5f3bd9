//! Assembles the gRPC server: the `SessionCache` service over the configured store,
//! `grpc.health.v1`, server reflection (v1 and v1alpha), limits, and a bounded drain.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{net::TcpListener, sync::oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::{
    auth::{Authenticator, Gate},
    config::{Config, Topology},
    health::{FOLLOWING_THE_STORE, StoreStatus, watch_store},
    keys::TokenHasher,
    pb::{self, session_cache_server::SessionCacheServer},
    reload::Reloadable,
    service::SessionCacheService,
    store::{
        MemoryStore, RedisStore, Store,
        redis::{Credentials, LookupMode, RedisConfig, RedisTopology, SentinelConfig},
        traced::Traced,
    },
    transport::{self, Bounds, Connections, Track},
    validate::Validator,
};

/// Largest request message accepted, in bytes; larger ones are refused by the transport
/// before a handler runs. A Set with a 4 KiB token and a generous user fits many times.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Exit status for a configuration that cannot be served: a flag, or a file a flag
/// names (EX_USAGE in sysexits.h).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status for a port that cannot be bound, `--listen` or `--metrics-listen`
/// (EX_UNAVAILABLE in sysexits.h).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Why the server could not start or stopped on a failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file a flag names is missing, unreadable, or does not hold what it should.
    /// `problem` never quotes the file's content.
    #[error("{flag} {}: {problem}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// The Redis settings are refused by the client (a malformed URL, say).
    #[error("cannot use the Redis URL: {0}")]
    Redis(#[source] bb8_redis::redis::RedisError),
    /// The store answered, and is unfit to keep revocations.
    #[error("refusing the store: {0}")]
    Store(String),
    /// A port the configuration names cannot be bound.
    #[error("{flag} {addr}: cannot listen: {problem}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        problem: String,
    },
    /// The identity provider's flags or files are unusable.
    #[error(transparent)]
    Idp(#[from] crate::idp::SetupError),
    /// A metrics recorder was installed earlier in this process.
    #[error("--metrics-listen: a metrics recorder is already installed in this process")]
    Recorder,
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl Error {
    /// The process exit status: [`EXIT_CONFIG`] for the configuration and its files,
    /// [`EXIT_UNAVAILABLE`] for a port that cannot be bound, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::File { .. } | Error::Redis(_) | Error::Store(_) | Error::Idp(_) => EXIT_CONFIG,
            Error::Bind { .. } => EXIT_UNAVAILABLE,
            Error::Recorder | Error::Reflection(_) | Error::Serve(_) => 1,
        }
    }

    pub(crate) fn file(flag: &'static str, path: &Path, problem: impl Into<String>) -> Error {
        Error::File {
            flag,
            path: path.to_owned(),
            problem: problem.into(),
        }
    }
}

/// The configuration with every file it names read and checked: what [`prepare`]
/// returns, before any port is bound.
pub struct Prepared {
    config: Config,
    auth: Authenticator,
    hasher: TokenHasher,
    tls: Option<Arc<rustls::ServerConfig>>,
    redis: Option<RedisConfig>,
    idp: Option<Arc<dyn crate::idp::Provider>>,
}

impl Prepared {
    /// The configuration the files were read for.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

fn read(path: &Path, flag: &'static str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::file(flag, path, format!("cannot read: {e}")))
}

/// Reads and checks every file the configuration names: the keys file, the token
/// secret, the TLS certificate, key and client CA, Redis's CA and passwords. Binds
/// nothing and starts nothing.
pub fn prepare(config: Config) -> Result<Prepared, Error> {
    let auth = match &config.api_keys_file {
        Some(path) => load_keys(path, config.tls_client_ca.is_some())?,
        None => Authenticator::open(),
    };
    let hasher = match &config.token_hmac_secret_file {
        Some(path) => {
            let secret = read(path, "--token-hmac-secret-file")?;
            let secret = secret.trim_ascii_end();
            if secret.len() < 16 {
                return Err(Error::file(
                    "--token-hmac-secret-file",
                    path,
                    format!(
                        "the secret is {} bytes; it must be at least 16",
                        secret.len()
                    ),
                ));
            }
            TokenHasher::hmac(secret)
        }
        None => TokenHasher::Sha256,
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_config(&crate::tls::Files {
            cert,
            key,
            client_ca: config.tls_client_ca.as_deref(),
        })?),
        _ => None,
    };
    let redis = redis_config(&config)?;
    let idp = crate::idp::from_config(&config.idp)?;
    Ok(Prepared {
        config,
        auth,
        hasher,
        tls,
        redis,
        idp,
    })
}

/// Reads and checks the keys file of `--api-keys-file`; `client_ca` tells whether
/// client certificates are verified (`--tls-client-ca`), as a file that maps them needs.
pub(crate) fn load_keys(path: &Path, client_ca: bool) -> Result<Authenticator, Error> {
    let flag = "--api-keys-file";
    let text = String::from_utf8(read(path, flag)?)
        .map_err(|_| Error::file(flag, path, "not UTF-8 text"))?;
    let auth = Authenticator::from_toml(&text).map_err(|e| Error::file(flag, path, e))?;
    if auth.has_certificates() && !client_ca {
        return Err(Error::file(
            flag,
            path,
            "maps [[certificates]] but no --tls-client-ca verifies them",
        ));
    }
    Ok(auth)
}

/// Binds `--listen`.
pub async fn listen(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|e| Error::Bind {
        flag: "--listen",
        addr,
        problem: e.to_string(),
    })
}

/// Checks the configuration's files, then serves on `listener` until `shutdown`
/// completes (see [`serve`]).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    serve(prepare(config)?, listener, shutdown).await
}

/// Serves on `listener` until `shutdown` completes, then drains calls in flight for at
/// most `--shutdown-grace-seconds`. Every step that can fail (the store's checks, the
/// metrics port) comes before the first background task starts; those tasks end when
/// this returns, whichever way.
pub async fn serve(
    prepared: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    match &prepared.redis {
        Some(redis) => {
            // redis-rs errors about a URL do not repeat the URL.
            let store = RedisStore::new(redis).map_err(Error::Redis)?;
            // A Redis that is up at start-up and unfit stops the start; one that is down
            // is checked by the health loop when it comes up.
            if let Some(problem) = store.readiness_problem().await {
                error!(problem, "refusing to start");
                return Err(Error::Store(problem));
            }
            serve_with(Arc::new(store), prepared, listener, shutdown).await
        }
        None => {
            warn!(
                "no --redis-url, --redis-sentinels or --redis-cluster-nodes: sessions are cached in this process \
                 only; other replicas do not see them, and a restart forgets them and every \
                 invalidation"
            );
            let config = &prepared.config;
            let store = MemoryStore::new(config.limits(), config.memory_bounds());
            serve_with(Arc::new(store), prepared, listener, shutdown).await
        }
    }
}

/// The Redis store's settings, files read; `None` for the memory store.
pub fn redis_config(config: &Config) -> Result<Option<RedisConfig>, Error> {
    let topology = match config.topology() {
        Topology::Memory => return Ok(None),
        Topology::Redis => RedisTopology::Url(config.redis_url.clone().unwrap_or_default()),
        Topology::Cluster => RedisTopology::Cluster(config.redis_cluster_nodes.clone()),
        Topology::Sentinel => RedisTopology::Sentinel(SentinelConfig {
            sentinels: config.redis_sentinels.clone(),
            master: config.redis_sentinel_master.clone().unwrap_or_default(),
            credentials: Credentials {
                username: config.redis_sentinel_username.clone(),
                password: read_secret(
                    config.redis_sentinel_password_file.as_deref(),
                    "--redis-sentinel-password-file",
                )?,
            },
        }),
    };
    let ca_pem = match &config.redis_ca_file {
        Some(path) => Some(crate::tls::read_certificates(path, "--redis-ca-file")?.0),
        None => None,
    };
    Ok(Some(RedisConfig {
        topology,
        credentials: Credentials {
            username: config.redis_username.clone(),
            password: read_secret(
                config.redis_password_file.as_deref(),
                "--redis-password-file",
            )?,
        },
        tls: config.redis_tls,
        timeout: config.store_timeout(),
        connections: config.redis_connections,
        limits: config.limits(),
        ca_pem,
        allow_evicting: config.allow_evicting_redis,
        revocation_replicas: config.revocation_replicas(),
        lookup: match config.redis_lookup {
            crate::config::RedisLookup::Commands => LookupMode::Commands,
            crate::config::RedisLookup::Script => LookupMode::Script,
            crate::config::RedisLookup::Mixed => LookupMode::Mixed,
        },
    }))
}

/// A password from a file, without its trailing newline; never echoed.
fn read_secret(path: Option<&Path>, flag: &'static str) -> Result<Option<String>, Error> {
    let Some(path) = path else {
        return Ok(None);
    };
    let bytes = read(path, flag)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::file(flag, path, "not UTF-8 text"))?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(Error::file(flag, path, "empty"));
    }
    Ok(Some(secret.to_owned()))
}

/// Streams one connection may have open at once; with `--max-in-flight` this bounds
/// what a few greedy clients can queue inside the process.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// An idle HTTP/2 connection is pinged this often, and dropped when the ping is not
/// answered within the timeout: dead peers (a crashed pod, a cut network) do not hold
/// connections and their memory forever.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive, for peers that vanish without closing (also below HTTP/2's pings).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The bounds on what connections hold, from the flags.
fn bounds(config: &Config) -> Bounds {
    Bounds {
        max_connections: config.max_connections as usize,
        idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
        stall_timeout: Duration::from_secs(config.stall_timeout_seconds),
        max_open_calls: config.max_open_calls as usize,
    }
}

/// Serves with `store`: first every step that can fail (TLS, reflection, the metrics
/// port), then the background tasks, which a drop guard ends on every way out.
async fn serve_with<S: Store>(
    store: Arc<S>,
    prepared: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let Prepared {
        config,
        auth,
        hasher,
        tls,
        redis: _,
        idp,
    } = prepared;
    let config = &config;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Disabled, the service serves (pass-through) without a store; enabled, it serves
    // once the first ping has reached the store.
    let status = Arc::new(StoreStatus::new(!config.enabled));
    let connections = Connections::new(bounds(config));

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(crate::edge::envoy_pb::FILE_DESCRIPTOR_SET)
    };
    let kind = store.kind();
    let authenticated = auth.is_enabled();
    let auth = crate::auth::keys(auth);
    // The service's calls are traced; the health loop's pings are not (see store::traced).
    let traced = Arc::new(Traced(store.clone()));
    let service = SessionCacheService::new(traced, config.enabled, status.clone())
        .with_auth(auth.clone())
        .with_hasher(hasher)
        .with_max_in_flight(config.max_in_flight as usize)
        .with_request_timeout(Duration::from_millis(config.request_timeout_ms));
    let service = match &idp {
        Some(provider) => service.with_validator(
            Validator::new(provider.clone(), config.idp.idp_max_in_flight as usize)
                .with_waiting(config.idp.timeout(), config.idp.idp_max_waiting as usize),
        ),
        None => service,
    };
    // --- Validation at the edge (SPEC §11): Envoy's Check on this listener, and the
    // /auth route for --http-listen, both over Validate's decision.
    let edge = crate::edge::Edge::new(config, service.decider(), auth.clone());
    let check = Gate::new(
        edge.check_server()
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        auth.clone(),
    );
    let _routes: Vec<Arc<dyn crate::http::Route>> = vec![edge.auth_route()];
    // --- end of validation at the edge.
    // Callers are checked from their headers before their message is read.
    let service = Gate::new(
        SessionCacheServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES),
        auth.clone(),
    );

    let local = listener.local_addr().ok();
    let (drain, drained) = oneshot::channel::<()>();
    let tls_on = tls.is_some();
    let tls = tls.map(|config| Arc::new(ArcSwap::new(config)));
    let builder = Server::builder()
        // Cuts requests whose message arrives slowly or never, with CANCELLED.
        .timeout(Duration::from_millis(config.request_timeout_ms))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT));
    let router = builder
        .layer(Track::layer(connections.clone()))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(service)
        .add_service(check);
    // The last step that can fail: binding the metrics port.
    let metrics = match config.metrics_listen {
        Some(addr) => Some(crate::metrics::install(addr)?),
        None => None,
    };
    if let Some(provider) = &idp {
        crate::metrics::idp_exported(provider.name());
    }

    // From here on nothing fails before serving; every task below ends when `stop` is
    // cancelled, at the latest when this function returns or is dropped.
    let stop = CancellationToken::new();
    let _tasks = stop.clone().drop_guard();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let initial = if config.enabled {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    };
    for name in FOLLOWING_THE_STORE {
        reporter.set_service_status(name, initial).await;
    }
    transport::raise_open_files_limit();
    if let Some(exporter) = metrics {
        tokio::spawn(exporter.run(stop.clone()));
    }
    let mut reloadable = Vec::new();
    if let Some(path) = &config.api_keys_file {
        reloadable.push(Reloadable::keys(
            path.clone(),
            config.tls_client_ca.is_some(),
            auth,
        ));
    }
    if let (Some(current), Some(cert), Some(key)) = (&tls, &config.tls_cert, &config.tls_key) {
        reloadable.push(Reloadable::tls(
            cert.clone(),
            key.clone(),
            config.tls_client_ca.clone(),
            current.clone(),
        ));
    }
    tokio::spawn(crate::reload::watch(reloadable, stop.clone()));
    let pinger = config.enabled.then(|| {
        tokio::spawn(watch_store(
            store,
            status,
            reporter.clone(),
            Duration::from_millis(config.health_interval_ms),
            stop.clone(),
        ))
    });
    // Accepted connections, with TCP_NODELAY: a unary reply is one small write that
    // must not wait for the client's ACK of the previous one.
    let accepted = transport::incoming(listener, connections.clone(), TCP_KEEPALIVE);
    let drained = async {
        let _ = drained.await;
    };
    let mut server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match tls {
            Some(current) => Box::pin(
                router
                    .serve_with_incoming_shutdown(crate::tls::incoming(accepted, current), drained),
            ),
            None => Box::pin(router.serve_with_incoming_shutdown(accepted, drained)),
        };
    tokio::spawn(connections.sweep(stop.clone()));
    // The effective configuration, one line, with no secret in it.
    info!(
        listen = ?local,
        store = kind,
        redis_url = config.redis_url_redacted(),
        redis_sentinels = ?config.redis_sentinels.iter().map(ToString::to_string).collect::<Vec<_>>(),
        redis_sentinel_master = config.redis_sentinel_master,
        redis_cluster_nodes = ?config.redis_cluster_nodes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        revocation_replicas = config.revocation_replicas(),
        clock_skew_ms = config.clock_skew().as_millis() as u64,
        enabled = config.enabled,
        ttl_seconds = config.ttl_seconds,
        marker_ttl_seconds = config.marker_ttl_seconds,
        store_timeout_ms = config.store_timeout_ms,
        redis_connections = config.redis_connections,
        max_in_flight = config.max_in_flight,
        tls = tls_on,
        mutual_tls = config.tls_client_ca.is_some(),
        authenticated,
        keyed_token_hashing = config.token_hmac_secret_file.is_some(),
        metrics_listen = ?config.metrics_listen,
        max_connections = config.max_connections,
        idle_timeout_seconds = config.idle_timeout_seconds,
        request_timeout_ms = config.request_timeout_ms,
        stall_timeout_seconds = config.stall_timeout_seconds,
        max_open_calls = config.max_open_calls,
        idp = ?config.idp.idp,
        idp_timeout_ms = config.idp.idp_timeout_ms,
        idp_max_in_flight = config.idp.idp_max_in_flight,
        negative_ttl_seconds = config.idp.negative_ttl_seconds,
        "serving"
    );

    tokio::select! {
        result = &mut server => {
            return result.map_err(Error::from);
        }
        () = shutdown => {}
    }

    // Stop the pinger first so that it cannot report SERVING again, then tell probes.
    stop.cancel();
    if let Some(pinger) = pinger {
        let _ = pinger.await;
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    for name in FOLLOWING_THE_STORE {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    info!(
        ?grace,
        "shutting down: no new calls; draining calls in flight"
    );
    let _ = drain.send(());
    // Open streams (a health Watch) never end on their own: the drain is bounded.
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => result?,
        Err(_) => warn!(?grace, "drain did not finish in time; closing what is left"),
    }
    info!("stopped");
    Ok(())
}
