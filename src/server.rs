//! Assembles the gRPC server: the `SessionCache` service over the configured store,
//! `grpc.health.v1`, server reflection (v1 and v1alpha), limits, and a bounded drain.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::{
    auth::{Authenticator, Gate},
    config::{Config, Topology},
    health::{SERVICE_NAME, StoreStatus, watch_store},
    keys::TokenHasher,
    pb::{self, session_cache_server::SessionCacheServer},
    service::SessionCacheService,
    store::{
        MemoryStore, RedisStore, Store,
        redis::{Credentials, RedisConfig, RedisTopology, SentinelConfig},
    },
    transport::{self, Bounds, Connections, Track},
};

/// Largest request message accepted, in bytes; larger ones are refused by the transport
/// before a handler runs. A Set with a 4 KiB token and a generous user fits many times.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the configuration names is missing or wrong, or the store is unfit.
    #[error("{0}")]
    Config(String),
    #[error("cannot use the Redis URL: {0}")]
    Redis(String),
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl Error {
    /// The process exit status for this error: 64 (EX_USAGE) for configuration.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Redis(_) => 64,
            _ => 1,
        }
    }
}

/// What the configuration's files hold, read and checked before anything is served.
struct Prepared {
    auth: Authenticator,
    hasher: TokenHasher,
    tls: Option<ServerTlsConfig>,
}

fn read(path: &std::path::Path, flag: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Config(format!("{flag} {}: {e}", path.display())))
}

fn prepare(config: &Config) -> Result<Prepared, Error> {
    let auth = match &config.api_keys_file {
        Some(path) => Authenticator::from_file(path)
            .map_err(|e| Error::Config(format!("--api-keys-file {e}")))?,
        None => Authenticator::open(),
    };
    if auth.has_certificates() && config.tls_client_ca.is_none() {
        return Err(Error::Config(
            "--api-keys-file maps [[certificates]] but no --tls-client-ca verifies them".into(),
        ));
    }
    let hasher = match &config.token_hmac_secret_file {
        Some(path) => {
            let secret = read(path, "--token-hmac-secret-file")?;
            let secret = secret.trim_ascii_end();
            if secret.len() < 16 {
                return Err(Error::Config(
                    "--token-hmac-secret-file: the secret must be at least 16 bytes".into(),
                ));
            }
            TokenHasher::hmac(secret)
        }
        None => TokenHasher::Sha256,
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let identity = Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?);
            let mut tls = ServerTlsConfig::new().identity(identity);
            if let Some(ca) = &config.tls_client_ca {
                // Optional, so that probes and API-key callers without a certificate
                // still connect; a certificate that is presented must verify.
                tls = tls
                    .client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?))
                    .client_auth_optional(true);
            }
            Some(tls)
        }
        _ => None,
    };
    Ok(Prepared { auth, hasher, tls })
}

/// Serves on `listener` until `shutdown` completes, then drains calls in flight for at
/// most `--shutdown-grace-seconds`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let prepared = prepare(&config)?;
    match redis_config(&config)? {
        Some(redis) => {
            let store = RedisStore::new(&redis)
                // redis-rs errors about a URL do not repeat the URL.
                .map_err(|e| Error::Redis(e.to_string()))?;
            // A Redis that is up at start-up and unfit stops the start; one that is down
            // is checked by the health loop when it comes up.
            if let Some(problem) = store.readiness_problem().await {
                error!(problem, "refusing to start");
                return Err(Error::Config(problem));
            }
            serve(Arc::new(store), &config, prepared, listener, shutdown).await
        }
        None => {
            warn!(
                "no --redis-url, --redis-sentinels or --redis-cluster-nodes: sessions are cached in this process \
                 only; other replicas do not see them, and a restart forgets them and every \
                 invalidation"
            );
            let store = MemoryStore::new(config.limits(), config.memory_bounds());
            serve(Arc::new(store), &config, prepared, listener, shutdown).await
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
        Some(path) => Some(read(path, "--redis-ca-file")?),
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
    }))
}

/// A password from a file, without its trailing newline; never echoed.
fn read_secret(path: Option<&std::path::Path>, flag: &str) -> Result<Option<String>, Error> {
    let Some(path) = path else {
        return Ok(None);
    };
    let bytes = read(path, flag)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::Config(format!("{flag} {}: not UTF-8 text", path.display())))?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(Error::Config(format!("{flag} {}: empty", path.display())));
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

async fn serve<S: Store>(
    store: Arc<S>,
    config: &Config,
    prepared: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    // Disabled, the service serves (pass-through) without a store; enabled, it serves
    // once the first ping has reached the store.
    let status = Arc::new(StoreStatus::new(!config.enabled));
    let initial = if config.enabled {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    };
    reporter.set_service_status(SERVICE_NAME, initial).await;

    let stop = CancellationToken::new();
    transport::raise_open_files_limit();
    let connections = Connections::new(bounds(config));
    if let Some(addr) = config.metrics_listen {
        let (handle, exporter) = crate::metrics::install(addr).map_err(Error::Config)?;
        let stopped = stop.clone();
        tokio::spawn(async move {
            let mut upkeep = tokio::time::interval(crate::metrics::UPKEEP_EVERY);
            tokio::pin!(exporter);
            loop {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    result = &mut exporter => {
                        if let Err(e) = result {
                            error!(error = ?e, "the metrics endpoint stopped");
                        }
                        return;
                    }
                    _ = upkeep.tick() => handle.run_upkeep(),
                }
            }
        });
    }
    let pinger = config.enabled.then(|| {
        tokio::spawn(watch_store(
            store.clone(),
            status.clone(),
            reporter.clone(),
            Duration::from_millis(config.health_interval_ms),
            stop.clone(),
        ))
    });

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let kind = store.kind();
    let authenticated = prepared.auth.is_enabled();
    let auth = Arc::new(prepared.auth);
    let service = SessionCacheService::new(store, config.enabled, status)
        .with_auth(auth.clone())
        .with_hasher(prepared.hasher)
        .with_max_in_flight(config.max_in_flight as usize);
    // Callers are checked from their headers before their message is read.
    let service = Gate::new(
        SessionCacheServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES),
        auth,
    );

    let local = listener.local_addr().ok();
    let (drain, drained) = oneshot::channel::<()>();
    let tls = prepared.tls.is_some();
    let mut builder = Server::builder()
        // Cuts requests whose message arrives slowly or never, with CANCELLED.
        .timeout(Duration::from_millis(config.request_timeout_ms))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT));
    if let Some(tls) = prepared.tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(Track::layer(connections.clone()))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(service)
        .serve_with_incoming_shutdown(
            // Accepted connections, with TCP_NODELAY: a unary reply is one small write
            // that must not wait for the client's ACK of the previous one.
            transport::incoming(listener, connections.clone(), TCP_KEEPALIVE),
            async {
                let _ = drained.await;
            },
        );
    tokio::pin!(server);
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
        tls,
        mutual_tls = config.tls_client_ca.is_some(),
        authenticated,
        keyed_token_hashing = config.token_hmac_secret_file.is_some(),
        metrics_listen = ?config.metrics_listen,
        max_connections = config.max_connections,
        idle_timeout_seconds = config.idle_timeout_seconds,
        request_timeout_ms = config.request_timeout_ms,
        stall_timeout_seconds = config.stall_timeout_seconds,
        max_open_calls = config.max_open_calls,
        "serving"
    );

    tokio::select! {
        result = &mut server => {
            stop.cancel();
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
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
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
