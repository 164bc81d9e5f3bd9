//! The Redis store's settings, from the flags and the files they name: where the
//! primary is (one Redis, Sentinels, a Cluster), credentials, TLS, the bounds on every
//! call, and how lookups read.

use std::time::Duration;

use crate::store::Limits;

/// A user name and password for Redis or the Sentinels; the password never prints.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The Sentinels, the name they monitor the primary under, and how to reach both them
/// and the data nodes.
#[derive(Clone, Debug)]
pub struct SentinelConfig {
    pub sentinels: Vec<HostPort>,
    pub master: String,
    /// The Sentinels' own credentials.
    pub credentials: Credentials,
}

/// Where the Redis primary is (SPEC §8).
#[derive(Clone)]
pub enum RedisTopology {
    /// One Redis: a `redis://` or `rediss://` URL, with credentials and database if any.
    Url(String),
    /// The primary that these Sentinels name.
    Sentinel(SentinelConfig),
    /// A Redis Cluster, found from these seed nodes.
    Cluster(Vec<HostPort>),
}

/// Never shows the URL, which may carry a password.
impl std::fmt::Debug for RedisTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTopology::Url(_) => f.write_str("Url(..)"),
            RedisTopology::Sentinel(sentinels) => {
                f.debug_tuple("Sentinel").field(sentinels).finish()
            }
            RedisTopology::Cluster(nodes) => f.debug_tuple("Cluster").field(nodes).finish(),
        }
    }
}

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub topology: RedisTopology,
    /// Credentials for the data nodes, besides (never as well as) those in a URL.
    pub credentials: Credentials,
    /// TLS to the Sentinels and the data nodes they name, or to the Cluster's nodes (a
    /// URL says so itself).
    pub tls: bool,
    /// The bound on every call: checkout, command and reply together.
    pub timeout: Duration,
    /// How many pipelined connections to keep open.
    pub connections: u32,
    /// Entry, tombstone and marker lifetimes, and the clock-skew margin.
    pub limits: Limits,
    /// A PEM CA to trust for TLS besides the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Whether to serve from a Redis that may evict any key.
    pub allow_evicting: bool,
    /// Replicas that must have a revocation before it is acknowledged (Redis `WAIT`).
    pub revocation_replicas: u32,
    /// How a lookup reads Redis outside Cluster (see `read`).
    pub lookup: LookupMode,
}

/// How a lookup reads Redis outside Cluster (see `read`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LookupMode {
    /// One Lua script per lookup.
    Script,
    /// Plain commands: the entry and the clock, then the marker of a live entry.
    Commands,
    /// The script for a lone lookup (one round trip), commands for a batch.
    #[default]
    Mixed,
}

/// How long dialling Redis may take. A dial to a healthy Redis takes milliseconds; this
/// bounds a dial to one that accepts TCP but never answers (a frozen process), so that
/// dials cannot pile up. It runs off the request path: bb8 dials in the background, and
/// every call is bounded by the store timeout whatever the dial does.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A `host:port` pair, as the Sentinel flags take them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}
