//! session-cache: a gRPC cache of validated sessions in front of an identity provider.
//!
//! Data flows one way: [`server`] (listeners, the call layer [`call`], the transport's
//! bounds) → [`service`] (checks and answers) → [`store`] (Redis or memory). Nothing
//! below the service knows gRPC; nothing above the store knows Redis. Setting up flows
//! the same way: [`config`] (flags) → [`prepare`] (the files they name) → [`server`];
//! every step fails with the one [`error::SetupError`]. See `README.md` for running it
//! and `docs/SPEC.md` for the contract (sections are cited as SPEC §N throughout).

#![forbid(unsafe_code)]

pub mod auth;
pub mod call;
pub mod clock;
pub mod codec;
pub mod config;
pub mod decision;
pub mod edge;
pub mod entry;
pub mod error;
mod files;
pub mod health;
pub mod http;
pub mod idp;
pub mod keys;
mod metrics;
pub mod pb;
pub mod prepare;
mod reload;
pub mod revoke;
pub mod rpc;
pub mod server;
pub mod service;
pub mod signal;
pub mod store;
pub mod telemetry;
mod tls;
mod transport;
pub mod validate;

pub use config::Config;
pub use server::run;
