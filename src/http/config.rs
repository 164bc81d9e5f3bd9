//! The HTTP listener's flags, flattened into [`crate::Config`].

use std::net::SocketAddr;

use clap::Args;

/// Where and how much the HTTP listener serves (SPEC §11, §12).
#[derive(Clone, Debug, Args)]
pub struct HttpFlags {
    /// Address to serve HTTP/1.1 on, beside gRPC: the identity provider's pushed
    /// revocations (POST /webhooks/appwrite, POST /backchannel-logout) and the paths
    /// of other features; any other path answers 404. Off when not given. Served over
    /// TLS with --tls-cert when that is given. Requests are bounded: 16 KiB of headers
    /// (431), 64 KiB of body (413), --request-timeout-ms from the head to the answer
    /// (408 while the body is arriving). An address that cannot be bound exits 69.
    #[arg(long, env = "SESSION_CACHE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// Most connections open at once on --http-listen; one more is closed as soon as it
    /// is accepted, and so is one past a client address's share
    /// (--http-max-connections-per-peer). A connection with no request for
    /// --idle-timeout-seconds is closed, and so is one that leaves an answer unread for
    /// --stall-timeout-seconds.
    #[arg(long, env = "SESSION_CACHE_HTTP_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_max_connections: u32,

    /// Most connections one client address (an IPv4 address, an IPv6 /64) may hold on
    /// --http-listen; past it its new connections are closed at accept. A proxy asking
    /// /auth is one address, and HTTP/1.1 holds a connection per request in flight:
    /// give it at least the proxy's auth requests at once. Default: a quarter of
    /// --http-max-connections, at least 4.
    #[arg(long, env = "SESSION_CACHE_HTTP_MAX_CONNECTIONS_PER_PEER",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_max_connections_per_peer: Option<u32>,
}
