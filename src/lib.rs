//! session-cache: a gRPC cache of validated sessions in front of an identity provider.
//!
//! Data flows one way: [`server`] (transport) → [`service`] (checks and gRPC mapping)
//! → [`store`] (Redis or memory). Nothing below the service knows gRPC; nothing above
//! the store knows Redis. See `README.md` for running it and `docs/SPEC.md` for the contract
//! (sections are cited as SPEC §N throughout).

#![forbid(unsafe_code)]

pub mod auth;
pub mod clock;
pub mod config;
pub mod decision;
pub mod edge;
pub mod entry;
pub mod health;
// The routes of --http-listen; nothing serves them until the listener is built.
#[allow(dead_code)]
mod http;
pub mod idp;
pub mod keys;
mod metrics;
mod reload;
pub mod rpc;
pub mod server;
pub mod service;
pub mod signal;
pub mod store;
pub mod telemetry;
mod tls;
mod transport;
pub mod validate;

/// The generated protobuf types and gRPC stubs of `sessioncache.v1`.
pub mod pb {
    tonic::include_proto!("sessioncache.v1");

    /// The encoded descriptors of `proto/`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/session_cache_descriptor.bin"));
}

pub use config::Config;
pub use server::run;
