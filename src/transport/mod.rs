//! What one peer can hold of the process, bounded below the gRPC layer: accepted
//! connections (`--max-connections`, closed at accept past the cap), connections with
//! nothing in flight (`--idle-timeout-seconds`), and connections whose answers are not
//! being read (`--stall-timeout-seconds`); calls whose answer is not yet delivered,
//! over all connections (`--max-open-calls`, refused with RESOURCE_EXHAUSTED past it).
//! Slow requests are cut by tonic's request timeout (`--request-timeout-ms`, set where
//! the server is assembled).
//!
//! - [`accept`]: the accept loop every listener shares (backoff on EMFILE and the like).
//! - [`conn`]: the open connections, each one's activity, and the sweep that closes the
//!   idle and the stalled.
//! - [`track`]: the tower layer that counts each stream on its connection.
//!
//! Activity is counted in HTTP/2 streams, not bytes: keepalive PINGs and window
//! updates keep no connection open.

pub(crate) mod accept;
pub(crate) mod conn;
pub(crate) mod track;

pub(crate) use accept::{incoming, raise_open_files_limit};
pub(crate) use conn::{Bounds, Connections};
pub(crate) use track::Track;
