//! Assembles the gRPC server: the `SessionCache` service over the configured store,
//! `grpc.health.v1`, server reflection (v1 and v1alpha), limits, and a bounded drain.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::{
    config::Config,
    health::{SERVICE_NAME, StoreStatus, watch_store},
    pb::{self, session_cache_server::SessionCacheServer},
    service::SessionCacheService,
    store::{MemoryStore, RedisStore, Store, redis::RedisConfig},
};

/// Largest request message accepted, in bytes; larger ones are refused by the transport
/// before a handler runs. A Set with a 4 KiB token and a generous user fits many times.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot use the Redis URL: {0}")]
    Redis(String),
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves on `listener` until `shutdown` completes, then drains calls in flight for at
/// most `--shutdown-grace-seconds`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    match &config.redis_url {
        Some(url) => {
            let store = RedisStore::new(&RedisConfig {
                url: url.clone(),
                timeout: config.store_timeout(),
                connections: config.redis_connections,
                limits: config.limits(),
            })
            // redis-rs errors about a URL do not repeat the URL.
            .map_err(|e| Error::Redis(e.to_string()))?;
            serve(Arc::new(store), &config, listener, shutdown).await
        }
        None => {
            warn!(
                "no --redis-url: sessions are cached in this process only; other replicas \
                 do not see them, and a restart forgets them and every invalidation"
            );
            let store = MemoryStore::new(config.limits(), config.memory_max_entries);
            serve(Arc::new(store), &config, listener, shutdown).await
        }
    }
}

/// Accepted connections, with TCP_NODELAY: a unary reply is one small write that must
/// not wait for the client's ACK of the previous one.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn serve<S: Store>(
    store: Arc<S>,
    config: &Config,
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
    let service = SessionCacheServer::new(SessionCacheService::new(store, config.enabled, status))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);

    let local = listener.local_addr().ok();
    let (drain, drained) = oneshot::channel::<()>();
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming(listener), async {
            let _ = drained.await;
        });
    tokio::pin!(server);
    info!(
        listen = ?local,
        store = kind,
        enabled = config.enabled,
        ttl_seconds = config.ttl_seconds,
        store_timeout_ms = config.store_timeout_ms,
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
