//! What a peer can hold of the process, bounded below the gRPC layer, on every
//! listener: connections (a cap per listener, closed at accept past it, and each peer's
//! share of it); on the gRPC listener also connections with nothing in flight
//! (`--idle-timeout-seconds`), connections whose answers are not being read
//! (`--stall-timeout-seconds`), connections that reset their streams as fast as they
//! open them, and calls whose answer is not yet delivered (`--max-open-calls`, with a
//! share per peer and per connection, refused with RESOURCE_EXHAUSTED past them). Slow
//! requests are cut by the call layer's request timeout (`--request-timeout-ms`).
//!
//! - [`accept`]: accepting, the same on every listener (backoff on EMFILE and the like,
//!   the place under the cap and in the peer's share).
//! - [`peers`]: one listener's connections by peer, the piece each listener takes.
//! - [`proxy`]: the PROXY protocol v2 header that names the peer behind a proxy.
//! - [`serve`]: the gRPC listener, each connection served by hyper's HTTP/2.
//! - [`behind`]: a connection's task polled behind the calls already runnable, so that
//!   it writes their answers together.
//! - [`conn`]: the gRPC listener's open connections, each one's activity, and the sweep
//!   that closes the idle and the stalled.
//! - [`track`]: the tower layer that counts each stream on its connection and admits
//!   each call under the open-call bounds.
//! - [`frames`]: a connection's HTTP/2 frames followed, so that it can be cut with
//!   GOAWAY ENHANCE_YOUR_CALM.
//! - [`stall`]: the write bound of the HTTP/1.1 listeners.
//!
//! Activity is counted in HTTP/2 streams, not bytes: keepalive PINGs and window
//! updates keep no connection open.

pub(crate) mod accept;
pub(crate) mod behind;
pub(crate) mod conn;
pub(crate) mod frames;
pub(crate) mod peers;
pub(crate) mod proxy;
pub(crate) mod serve;
pub(crate) mod stall;
pub(crate) mod track;

pub(crate) use accept::raise_open_files_limit;
pub(crate) use conn::{Bounds, CallLimits, Connections};
pub(crate) use serve::{Grpc, serve};
pub(crate) use track::Track;

/// The `listener` label of the gRPC listener's connection metrics.
pub(crate) const GRPC: &str = "grpc";
/// The `listener` label of the HTTP listener's (`--http-listen`).
pub(crate) const HTTP: &str = "http";
/// The `listener` label of the metrics listener's.
pub(crate) const METRICS: &str = "metrics";
