//! The gRPC services the server hosts, each behind its own name: `sessioncache.v1`
//! over the store, Envoy's `envoy.service.auth.v3.Authorization` over Validate's
//! decision, `grpc.health.v1`, and server reflection (v1 and v1alpha). The layers
//! every call goes through (`crate::call`, `crate::transport::Track`) wrap them where the
//! server is built.

use std::sync::Arc;

use tonic::service::Routes;
use tonic_health::server::HealthReporter;

use crate::{
    call::MAX_MESSAGE_BYTES,
    edge::{
        CheckService, envoy_pb,
        envoy_pb::envoy::service::auth::v3::authorization_server::AuthorizationServer,
    },
    error::SetupError,
    pb::{self, session_cache_server::SessionCacheServer},
    service::SessionCacheService,
    store::Store,
};

/// The hosted services, and the reporter that sets their health statuses.
pub(super) fn routes<S: Store>(
    service: SessionCacheService<S>,
    check: AuthorizationServer<CheckService<S>>,
) -> Result<(Routes, HealthReporter), SetupError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(envoy_pb::FILE_DESCRIPTOR_SET)
    };
    let session_cache = SessionCacheServer::from_arc(Arc::new(service))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let routes = Routes::new(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(session_cache)
        .add_service(check.max_decoding_message_size(MAX_MESSAGE_BYTES));
    Ok((routes, reporter))
}
