//! Runs the server: the store the configuration names, the gRPC services behind the
//! call layer and the transport's bounds, the background tasks, and a bounded drain.
//!
//! - [`router`]: the hosted services.
//! - [`background`]: the tasks beside the server.
//! - [`drain`]: what a shutdown does, in order.
//! - [`metrics_endpoint`]: `GET /metrics`.

mod background;
mod drain;
mod metrics_endpoint;
mod router;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::{net::TcpListener, sync::oneshot};
use tonic_health::ServingStatus;
use tower_layer::Layer;
use tracing::{error, warn};

use crate::{
    auth, call,
    config::Config,
    error::SetupError,
    health::StoreStatus,
    prepare::{Prepared, prepare},
    reload::Reloadable,
    rpc,
    service::SessionCacheService,
    store::{MemoryStore, RedisStore, Store, traced::Traced},
    transport::{self, Bounds, CallLimits, Connections, Grpc, Track, peers},
    validate::Validator,
};
use background::{Background, Tasks};
use metrics_endpoint::MetricsEndpoint;

/// Binds `--listen`.
pub async fn listen(addr: std::net::SocketAddr) -> Result<TcpListener, SetupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| SetupError::bind("--listen", addr, &e))
}

/// Checks the configuration's files, then serves on `listener` until `shutdown`
/// completes (see [`serve`]).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SetupError> {
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
) -> Result<(), SetupError> {
    match &prepared.redis {
        Some(redis) => {
            // redis-rs errors about a URL do not repeat the URL.
            let store = RedisStore::new(redis).map_err(SetupError::Redis)?;
            // A Redis that is up at start-up and unfit stops the start; one that is down
            // is checked by the health loop when it comes up.
            if let Some(problem) = store.readiness_problem().await {
                error!(problem, "refusing to start");
                return Err(SetupError::Store(problem));
            }
            serve_store(Arc::new(store), prepared, listener, shutdown).await
        }
        None => {
            warn!(
                "no --redis-url, --redis-sentinels or --redis-cluster-nodes: sessions are \
                 cached in this process only; other replicas do not see them, and a restart \
                 forgets them and every invalidation"
            );
            let config = &prepared.config;
            let store = MemoryStore::new(config.limits(), config.memory_bounds());
            serve_store(Arc::new(store), prepared, listener, shutdown).await
        }
    }
}

/// The bounds on what connections hold, from the flags.
fn bounds(config: &Config) -> Bounds {
    Bounds {
        connections: peers::Limits {
            max_connections: config.max_connections as usize,
            per_peer: config.connections_per_peer() as usize,
            reserved: config.reserved_connections as usize,
        },
        idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
        stall_timeout: Duration::from_secs(config.stall_timeout_seconds),
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        calls: CallLimits {
            max: config.max_open_calls as usize,
            reserved: config.reserved_open_calls as usize,
            per_peer: config.open_calls_per_peer() as usize,
            per_connection: config.open_calls_per_connection() as usize,
        },
        max_stream_resets: config.max_stream_resets,
    }
}

/// The boxed future of the serving gRPC listener.
type Serving<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Serves with `store`: first every step that can fail (reflection, the metrics port),
/// then the background tasks, which a drop guard ends on every way out.
async fn serve_store<S: Store>(
    store: Arc<S>,
    prepared: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SetupError> {
    let Prepared {
        config,
        auth,
        hasher,
        tls,
        redis: _,
        idp,
        revoke,
    } = prepared;
    let config = &config;
    // Disabled, the service serves (pass-through) without a store; enabled, it serves
    // once the first ping has reached the store.
    let status = Arc::new(StoreStatus::new(!config.enabled));
    let connections = Connections::new(bounds(config));
    let kind = store.kind();
    let authenticated = auth.is_enabled();
    let auth = auth::current(auth);
    // The service's calls are traced; the health loop's pings are not (see store::traced).
    let traced = Arc::new(Traced(store.clone()));
    let tls = tls.map(|config| Arc::new(ArcSwap::new(config)));
    let request_timeout = Duration::from_millis(config.request_timeout_ms);
    let mut service = SessionCacheService::new(traced.clone(), config.enabled, status.clone())
        .with_hasher(hasher.clone())
        .with_request_timeout(request_timeout);
    if let Some(provider) = &idp {
        let validator = Validator::new(provider.clone(), config.idp.idp_max_in_flight as usize)
            .with_waiting(config.idp.timeout(), config.idp.idp_max_waiting as usize);
        service = service.with_validator(if revoke.records_session_ids() {
            validator.with_session_ids(hasher.clone())
        } else {
            validator
        });
    }
    // Validation at the edge (SPEC §11): Envoy's Check on this listener, and /auth for
    // the HTTP listener, both over Validate's decision.
    let appwrite_project = match config.idp.idp {
        Some(crate::idp::IdpKind::Appwrite) => config.idp.appwrite_project.as_deref(),
        _ => None,
    };
    let edge = crate::edge::Edge::new(
        &config.edge,
        appwrite_project,
        service.decider(),
        auth.clone(),
    );
    let (routes, reporter) = router::routes(service, edge.check_server())?;
    // Every call: the call layer (which also cuts requests whose message arrives slowly
    // or never, with CANCELLED), the transport's accounting, admission, the services.
    let service = call::layer(auth.clone(), request_timeout).layer(
        Track::layer(connections.clone())
            .layer(call::admission(config.max_in_flight as usize).layer(routes.prepare())),
    );
    // The last step that can fail: the metrics port.
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| SetupError::bind("--metrics-listen", addr, &e))?;
            let handle = crate::metrics::install().map_err(|_| SetupError::Recorder)?;
            crate::http::metrics::describe();
            crate::revoke::metrics::describe();
            crate::decision::export_metrics();
            if let Some(provider) = &idp {
                crate::metrics::idp_exported(provider.name(), &crate::idp::RESULT_LABELS);
            }
            Some(MetricsEndpoint {
                listener,
                handle,
                idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
                stall_timeout: Duration::from_secs(config.stall_timeout_seconds),
            })
        }
        None => None,
    };
    // The HTTP listener (--http-listen, SPEC §11, §12), bound with the other ports.
    let http = match config.http.http_listen {
        Some(addr) => {
            // SPEC §11: forward authentication for nginx, Traefik, Caddy.
            let mut routes: Vec<Arc<dyn crate::http::Route>> = vec![edge.auth_route()];
            // SPEC §12: revocations pushed by the identity provider.
            routes.extend(revoke.routes(traced.clone(), hasher, config.enabled));
            Some(crate::http::Listener::new(
                crate::http::bind(addr).await?,
                routes,
                tls.clone(),
                crate::http::Bounds {
                    max_connections: config.http.http_max_connections,
                    per_peer: crate::config::share(
                        config.http.http_max_connections_per_peer,
                        config.http.http_max_connections,
                    ),
                    request_timeout,
                    idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
                    stall_timeout: Duration::from_secs(config.stall_timeout_seconds),
                    proxy_protocol: config.proxy_protocol,
                },
            ))
        }
        None => None,
    };

    // From here on nothing fails before serving.
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let initial = if config.enabled {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    };
    for service in rpc::STORE_BACKED {
        reporter.set_service_status(*service, initial).await;
    }
    transport::raise_open_files_limit();
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
    let mut background = Background::start(Tasks {
        store,
        status: config.enabled.then_some(status),
        reporter: reporter.clone(),
        health_interval: Duration::from_millis(config.health_interval_ms),
        metrics,
        http,
        shutdown_grace: Duration::from_secs(config.shutdown_grace_seconds),
        reloadable,
        connections: connections.clone(),
    });
    config.log_effective(listener.local_addr().ok(), kind, authenticated);
    let (drain, drained) = oneshot::channel::<()>();
    let drained = async {
        let _ = drained.await;
    };
    let grpc = Grpc {
        service,
        connections,
        tls,
        proxy_protocol: config.proxy_protocol,
    };
    let mut server: Serving<'_> = Box::pin(transport::serve(listener, grpc, drained));

    tokio::select! {
        () = &mut server => return Ok(()),
        () = shutdown => {}
    }
    drain::drain(
        &mut background,
        &reporter,
        drain,
        server,
        Duration::from_secs(config.shutdown_grace_seconds),
    )
    .await
}
