//! The service's configuration: one struct, from flags or `SESSION_CACHE_*` variables,
//! checked before anything binds.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Parser};

use crate::{
    clock::Micros,
    store::{Limits, memory::MemoryBounds},
};

/// A gRPC cache of validated sessions, in front of an identity provider.
///
/// Every flag can also be set by the environment variable named in its help.
#[derive(Clone, Debug, Parser)]
#[command(name = "session-cache", version, about, long_about = None)]
pub struct Config {
    /// Address to serve gRPC on. Without caller authentication only a loopback address
    /// is accepted, unless --allow-unauthenticated is given. An address that cannot be
    /// bound exits 69; a bad flag, or a bad file a flag names, exits 64 before binding.
    #[arg(long, env = "SESSION_CACHE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Redis to cache sessions in (redis://[user:password@]host:port[/db]). Without it
    /// the embedded in-memory store serves: one process only, forgotten on restart.
    #[arg(long, env = "SESSION_CACHE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Redis Sentinels to ask for the primary (host:port[,host:port...]), instead of
    /// --redis-url; needs --redis-sentinel-master. The service follows failovers.
    #[arg(long, env = "SESSION_CACHE_REDIS_SENTINELS", value_delimiter = ',',
          value_parser = parse_host_port, requires = "redis_sentinel_master")]
    pub redis_sentinels: Vec<HostPort>,

    /// The name the Sentinels monitor the primary under (`sentinel monitor NAME ...`).
    #[arg(
        long,
        env = "SESSION_CACHE_REDIS_SENTINEL_MASTER",
        requires = "redis_sentinels"
    )]
    pub redis_sentinel_master: Option<String>,

    /// Redis Cluster nodes to learn the slot map from (host:port[,host:port...]), instead
    /// of --redis-url; a few are enough, the rest are discovered. The service follows
    /// MOVED/ASK redirections and failovers.
    #[arg(long, env = "SESSION_CACHE_REDIS_CLUSTER_NODES", value_delimiter = ',',
          value_parser = parse_host_port)]
    pub redis_cluster_nodes: Vec<HostPort>,

    /// Redis ACL user for the data nodes. With --redis-url the URL may carry it instead.
    #[arg(long, env = "SESSION_CACHE_REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// File holding the data nodes' Redis password (trailing newline ignored). With
    /// --redis-url the URL may carry it instead, not both.
    #[arg(long, env = "SESSION_CACHE_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// Redis ACL user for the Sentinels, when they require one.
    #[arg(long, env = "SESSION_CACHE_REDIS_SENTINEL_USERNAME")]
    pub redis_sentinel_username: Option<String>,

    /// File holding the Sentinels' password (`requirepass` of the Sentinels).
    #[arg(long, env = "SESSION_CACHE_REDIS_SENTINEL_PASSWORD_FILE")]
    pub redis_sentinel_password_file: Option<PathBuf>,

    /// Speak TLS to the Sentinels and the data nodes they name, or to the Cluster's
    /// nodes (with --redis-url, use a rediss:// URL instead). --redis-ca-file adds a private CA.
    #[arg(long, env = "SESSION_CACHE_REDIS_TLS", action = ArgAction::SetTrue)]
    pub redis_tls: bool,

    /// InvalidateToken and InvalidateUser answer OK only once their write reached this
    /// many replicas (Redis WAIT, within --store-timeout-ms); otherwise gRPC
    /// UNAVAILABLE, and a retry is safe. Set it to the replica count so that an
    /// acknowledged revocation survives the loss of the primary. Default: 0 with
    /// --redis-url, 1 with Sentinels or Cluster.
    #[arg(long, env = "SESSION_CACHE_REVOCATION_REPLICAS",
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub revocation_replicas: Option<u32>,

    /// Margin for instants that may come from different clocks (another Redis node
    /// after a failover, or a marker written by the Python service with its host's
    /// clock), in milliseconds: a Set is STALE when the user's marker is at or after
    /// fence - margin, a Get INVALIDATED when the marker is after cached_at - margin.
    /// Costs one more validation for sessions validated within the margin after a
    /// revocation. Default: 0 with --redis-url and in memory, 500 with Sentinels or
    /// Cluster.
    #[arg(long, env = "SESSION_CACHE_CLOCK_SKEW_MS",
          value_parser = clap::value_parser!(u32).range(0..=60_000))]
    pub clock_skew_ms: Option<u32>,

    /// Longest time a session stays cached, in seconds; a session that expires sooner
    /// is cached until it expires. Also how long a logout refuses late Sets.
    #[arg(long, env = "SESSION_CACHE_TTL_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ttl_seconds: u32,

    /// How long a user's invalidation (password change) is remembered, in seconds. At
    /// least --ttl-seconds, or an invalidated entry could outlive it.
    #[arg(long, env = "SESSION_CACHE_MARKER_TTL_SECONDS", default_value_t = 2_592_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub marker_ttl_seconds: u32,

    /// Whether to cache at all. With false, Get and Set answer DISABLED and the
    /// invalidations succeed without touching a store.
    #[arg(long, env = "SESSION_CACHE_ENABLED", default_value_t = true, action = ArgAction::Set)]
    pub enabled: bool,

    /// The longest a call waits for the store, in milliseconds; past it Get and Set
    /// answer UNAVAILABLE and the invalidations fail with gRPC UNAVAILABLE.
    #[arg(long, env = "SESSION_CACHE_STORE_TIMEOUT_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub store_timeout_ms: u64,

    /// Pipelined Redis connections to keep open. Each carries any number of calls at
    /// once; more than one or two rarely helps on a small machine.
    #[arg(long, env = "SESSION_CACHE_REDIS_CONNECTIONS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub redis_connections: u32,

    /// How a lookup reads Redis outside Cluster: `commands` (GET and TIME, then the
    /// marker of a live entry), `script` (one Lua call), or `mixed` (the script for a
    /// lone lookup, commands for a batch). Hidden: kept only to measure the ways side
    /// by side (BENCHMARKS.md).
    #[arg(long, env = "SESSION_CACHE_REDIS_LOOKUP", value_enum, default_value_t = RedisLookup::Mixed,
          hide = true)]
    pub redis_lookup: RedisLookup,

    /// Most sessions the in-memory store holds; past it the least useful are dropped.
    /// Invalidations and logouts are never dropped (see --memory-max-markers).
    #[arg(long, env = "SESSION_CACHE_MEMORY_MAX_ENTRIES", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_max_entries: u64,

    /// Most bytes the in-memory store's sessions weigh (their strings plus 640 bytes
    /// each, about what each takes in memory); past it the least useful are dropped.
    /// Each session counts at least its share (this / --memory-max-entries). Default
    /// 256 MiB.
    #[arg(long, env = "SESSION_CACHE_MEMORY_MAX_BYTES", default_value_t = 268_435_456,
          value_parser = clap::value_parser!(u64).range(1_048_576..))]
    pub memory_max_bytes: u64,

    /// Most password changes (InvalidateUser) the in-memory store keeps user by user.
    /// Past it the oldest collapse into one floor: every session cached before it is
    /// INVALIDATED and every Set fenced before it STALE, whoever the user. Costs
    /// misses, never a revoked session.
    #[arg(long, env = "SESSION_CACHE_MEMORY_MAX_MARKERS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_max_markers: u64,

    /// Most logouts (InvalidateToken) the in-memory store keeps token by token. Past it
    /// the oldest collapse into one floor that, for --ttl-seconds, answers REVOKED to
    /// every Set without a fence and every Set fenced before it, whatever the token.
    /// Costs misses, never a revoked session.
    #[arg(long, env = "SESSION_CACHE_MEMORY_MAX_TOMBSTONES", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_max_tombstones: u64,

    /// Most SessionCache calls served at once; past it calls are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing, so admitted calls keep their latency.
    #[arg(long, env = "SESSION_CACHE_MAX_IN_FLIGHT", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight: u32,

    /// Most client connections open at once; one more is closed as soon as it is
    /// accepted. An idle connection costs about 32 KiB, so the default bounds idle
    /// connections to about 128 MiB.
    #[arg(long, env = "SESSION_CACHE_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// A connection with no request in flight for this long, in seconds, is closed
    /// (keepalive pings do not count as activity); clients reconnect when they next call.
    #[arg(long, env = "SESSION_CACHE_IDLE_TIMEOUT_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout_seconds: u64,

    /// The longest a call may take from its headers to its answer, body included, in
    /// milliseconds; past it the call is answered CANCELLED. Bounds requests whose
    /// message arrives slowly or never.
    #[arg(long, env = "SESSION_CACHE_REQUEST_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: u64,

    /// A connection with an answer its peer has not read for this long, in seconds,
    /// is closed with all its streams: a peer that stops reading cannot pin answers.
    #[arg(long, env = "SESSION_CACHE_STALL_TIMEOUT_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stall_timeout_seconds: u64,

    /// Most calls, over all connections, whose answer is not yet delivered (being
    /// served, or waiting for a peer that reads slowly); past it calls are refused at
    /// once with RESOURCE_EXHAUSTED. Each such call holds about 10 to 17 KiB, so the
    /// default bounds them to about 70 MiB.
    #[arg(long, env = "SESSION_CACHE_MAX_OPEN_CALLS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_open_calls: u32,

    /// Address to serve Prometheus metrics on (GET /metrics); off when not given. An
    /// address that cannot be bound exits 69, like --listen.
    #[arg(long, env = "SESSION_CACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format: text for people, json for log pipelines. RUST_LOG filters (default
    /// info).
    #[arg(long, env = "SESSION_CACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// OpenTelemetry collector to send traces to over OTLP/gRPC (http://host:4317); off
    /// when not given. Spans leave in batches off the request path, within about 10 s;
    /// while the collector is down they are dropped, and calls do not wait for it.
    #[arg(long, env = "SESSION_CACHE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The service.name the traces are reported under.
    #[arg(
        long,
        env = "SESSION_CACHE_OTLP_SERVICE_NAME",
        default_value = "session-cache"
    )]
    pub otlp_service_name: String,

    /// How often the store is pinged to drive health, in milliseconds.
    #[arg(long, env = "SESSION_CACHE_HEALTH_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub health_interval_ms: u64,

    /// On SIGTERM or SIGINT, how long calls in flight may take to finish, in seconds.
    #[arg(long, env = "SESSION_CACHE_SHUTDOWN_GRACE_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace_seconds: u64,

    /// Serve a non-loopback address without caller authentication: anyone who can
    /// reach the port can then write sessions.
    #[arg(long, env = "SESSION_CACHE_ALLOW_UNAUTHENTICATED", action = ArgAction::SetTrue)]
    pub allow_unauthenticated: bool,

    /// TOML file of the callers: [[keys]] (name, sha256 of the API key, roles) and
    /// [[certificates]] (name, subject DNS name, roles). With it, every SessionCache
    /// call needs `authorization: Bearer <key>` or a mapped client certificate.
    /// Reloaded on SIGHUP and when its content changes; a bad file keeps the keys in
    /// force.
    #[arg(long, env = "SESSION_CACHE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// PEM certificate chain to serve TLS with (needs --tls-key). It, its key and the
    /// client CA are reloaded on SIGHUP and when one of them changes on disk: new
    /// handshakes get the new certificate; a bad set keeps the one in force.
    #[arg(long, env = "SESSION_CACHE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SESSION_CACHE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA that client certificates must chain to (mutual TLS). A verified
    /// certificate whose DNS name is in the keys file's [[certificates]] authenticates
    /// its caller; clients without a certificate may still use an API key.
    #[arg(long, env = "SESSION_CACHE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// PEM CA to trust for rediss:// besides the system's roots (a private CA).
    #[arg(long, env = "SESSION_CACHE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// File holding a secret (16 bytes or more): entry keys become HMAC-SHA256 of the
    /// token under it instead of plain SHA-256. The Python service cannot read them.
    #[arg(long, env = "SESSION_CACHE_TOKEN_HMAC_SECRET_FILE")]
    pub token_hmac_secret_file: Option<PathBuf>,

    /// Start even though Redis may evict any key (an allkeys-* maxmemory-policy), which
    /// can drop invalidation markers and tombstones and so revive revoked sessions.
    #[arg(long, env = "SESSION_CACHE_ALLOW_EVICTING_REDIS", action = ArgAction::SetTrue)]
    pub allow_evicting_redis: bool,

    /// The identity provider that Validate asks (SPEC §9).
    #[command(flatten)]
    pub idp: crate::idp::IdpFlags,

    /// Validation at the edge: Envoy's Check and /auth (SPEC §11).
    #[command(flatten)]
    pub edge: crate::edge::EdgeFlags,
}

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

fn parse_host_port(text: &str) -> Result<HostPort, String> {
    let (host, port) = text
        .trim()
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port
        .parse()
        .map_err(|_| format!("{text:?}: the port is not a number from 1 to 65535"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("{text:?} is not host:port"));
    }
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

/// Whether `text` is a URL the OTLP/gRPC exporter can dial: http://, a host, no path
/// beyond `/`. TLS to the collector is not offered (a node-local collector or agent is
/// the usual set-up), so https:// is refused rather than half-supported.
fn otlp_endpoint_ok(text: &str) -> bool {
    let Ok(uri) = text.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    uri.scheme_str() == Some("http")
        && uri.host().is_some_and(|host| !host.is_empty())
        && uri.path_and_query().is_none_or(|p| p.as_str() == "/")
}

/// Where the store lives, from the topology flags (SPEC §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// No Redis: the embedded store.
    Memory,
    /// One Redis at --redis-url.
    Redis,
    /// The primary the Sentinels name.
    Sentinel,
    /// The primaries of a Redis Cluster, by slot.
    Cluster,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration that parses but cannot be served; the message says how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// Reads flags and environment, then checks the whole; `Err` from clap covers
    /// `--help` and `--version` too (see `clap::Error::exit_code`).
    pub fn load() -> Result<Config, LoadError> {
        Config::load_from(std::env::args_os())
    }

    /// [`Config::load`] from these arguments (the first is the program name) and the
    /// environment.
    pub fn load_from<I, T>(args: I) -> Result<Config, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config = Config::try_parse_from(args).map_err(LoadError::Parse)?;
        config.validate().map_err(LoadError::Invalid)?;
        Ok(config)
    }

    /// Checks what clap's per-flag parsers cannot see.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.marker_ttl_seconds < self.ttl_seconds {
            return Err(ConfigError(format!(
                "--marker-ttl-seconds ({}) must be at least --ttl-seconds ({}): a password \
                 change must be remembered as long as an entry it hides can live",
                self.marker_ttl_seconds, self.ttl_seconds
            )));
        }
        let named = [
            (self.redis_url.is_some(), "--redis-url"),
            (!self.redis_sentinels.is_empty(), "--redis-sentinels"),
            (
                !self.redis_cluster_nodes.is_empty(),
                "--redis-cluster-nodes",
            ),
        ];
        let mut given = named
            .iter()
            .filter(|(given, _)| *given)
            .map(|(_, flag)| *flag);
        if let (Some(first), Some(second)) = (given.next(), given.next()) {
            return Err(ConfigError(format!(
                "{first} and {second} name two topologies: give one"
            )));
        }
        if self
            .redis_sentinel_master
            .as_deref()
            .is_some_and(|name| name.trim().is_empty())
        {
            return Err(ConfigError(
                "--redis-sentinel-master must name the master the Sentinels monitor".into(),
            ));
        }
        if self.topology() == Topology::Memory {
            let redis_only = [
                (self.redis_username.is_some(), "--redis-username"),
                (self.redis_password_file.is_some(), "--redis-password-file"),
                (self.redis_tls, "--redis-tls"),
                (
                    self.revocation_replicas.is_some_and(|n| n > 0),
                    "--revocation-replicas",
                ),
            ];
            if let Some((_, flag)) = redis_only.iter().find(|(given, _)| *given) {
                return Err(ConfigError(format!(
                    "{flag} needs a Redis: give --redis-url, --redis-sentinels or \
                     --redis-cluster-nodes"
                )));
            }
        }
        if self.topology() != Topology::Sentinel
            && (self.redis_sentinel_username.is_some()
                || self.redis_sentinel_password_file.is_some())
        {
            return Err(ConfigError(
                "--redis-sentinel-username and --redis-sentinel-password-file need \
                 --redis-sentinels"
                    .into(),
            ));
        }
        if let Some(url) = &self.redis_url {
            if self.redis_tls {
                return Err(ConfigError(
                    "--redis-tls is for --redis-sentinels and --redis-cluster-nodes; with \
                     --redis-url use a rediss:// URL"
                        .into(),
                ));
            }
            let has_password = url
                .split_once("://")
                .and_then(|(_, rest)| rest.rsplit_once('@'))
                .is_some_and(|(user_info, _)| user_info.contains(':'));
            if has_password && self.redis_password_file.is_some() {
                return Err(ConfigError(
                    "--redis-url carries a password and --redis-password-file gives another: \
                     give one"
                        .into(),
                ));
            }
            // The URL may hold a password: never echo it.
            let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
            if !scheme_ok || bb8_redis::redis::Client::open(url.as_str()).is_err() {
                return Err(ConfigError(
                    "--redis-url is not a valid redis:// or rediss:// URL \
                     (redis://[user:password@]host:port[/db])"
                        .into(),
                ));
            }
        }
        self.idp.validate().map_err(ConfigError)?;
        if let Some(endpoint) = &self.otlp_endpoint
            && !otlp_endpoint_ok(endpoint)
        {
            return Err(ConfigError(
                "--otlp-endpoint is not a valid http:// URL of an OTLP/gRPC collector \
                 (http://host:4317)"
                    .into(),
            ));
        }
        if self.otlp_service_name.trim().is_empty() {
            return Err(ConfigError("--otlp-service-name must not be empty".into()));
        }
        if !self.listen.ip().is_loopback()
            && self.api_keys_file.is_none()
            && !self.allow_unauthenticated
        {
            return Err(ConfigError(format!(
                "--listen {} is not a loopback address and no caller authentication is \
                 configured: anyone who can reach it could write sessions. Give \
                 --api-keys-file, listen on 127.0.0.1, or pass --allow-unauthenticated if \
                 a network policy guards the port",
                self.listen
            )));
        }
        let tls = self.redis_tls
            || self
                .redis_url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"));
        if self.redis_ca_file.is_some() && !tls {
            return Err(ConfigError(
                "--redis-ca-file needs TLS to Redis: a rediss:// --redis-url, or --redis-tls \
                 with --redis-sentinels or --redis-cluster-nodes"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The Redis URL without its password, for logs.
    pub fn redis_url_redacted(&self) -> Option<String> {
        let url = self.redis_url.as_deref()?;
        let (scheme, rest) = url.split_once("://")?;
        Some(match rest.rsplit_once('@') {
            Some((user_info, host)) => {
                let user = user_info.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_owned(),
        })
    }

    /// Which store the flags name.
    pub fn topology(&self) -> Topology {
        if !self.redis_sentinels.is_empty() {
            Topology::Sentinel
        } else if !self.redis_cluster_nodes.is_empty() {
            Topology::Cluster
        } else if self.redis_url.is_some() {
            Topology::Redis
        } else {
            Topology::Memory
        }
    }

    /// `--revocation-replicas`, or its default for the topology (SPEC §8).
    pub fn revocation_replicas(&self) -> u32 {
        self.revocation_replicas.unwrap_or(match self.topology() {
            Topology::Sentinel | Topology::Cluster => 1,
            Topology::Redis | Topology::Memory => 0,
        })
    }

    /// `--clock-skew-ms`, or its default for the topology (SPEC §8): one Redis has one
    /// clock; a failover brings another, and a Cluster has one per primary.
    pub fn clock_skew(&self) -> Duration {
        let millis = self.clock_skew_ms.unwrap_or(match self.topology() {
            Topology::Sentinel | Topology::Cluster => 500,
            Topology::Redis | Topology::Memory => 0,
        });
        Duration::from_millis(millis.into())
    }

    /// The store timeout.
    pub fn store_timeout(&self) -> Duration {
        Duration::from_millis(self.store_timeout_ms)
    }

    /// The lifetimes every store keeps.
    pub fn limits(&self) -> Limits {
        Limits {
            ttl_seconds: self.ttl_seconds,
            marker_ttl_seconds: self.marker_ttl_seconds,
            clock_skew: Micros::from_duration(self.clock_skew()),
            negative_ttl_seconds: self.idp.negative_ttl_seconds,
        }
    }

    /// What the in-memory store may hold.
    pub fn memory_bounds(&self) -> MemoryBounds {
        let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        MemoryBounds {
            entries: self.memory_max_entries,
            bytes: self.memory_max_bytes,
            markers: count(self.memory_max_markers),
            tombstones: count(self.memory_max_tombstones),
        }
    }
}

/// Why [`Config::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A flag or variable did not parse (or `--help`/`--version` was asked for).
    #[error(transparent)]
    Parse(clap::Error),
    /// The values parse but do not fit together.
    #[error(transparent)]
    Invalid(ConfigError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::load_from(std::iter::once("session-cache").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    /// The defaults are SPEC §6's.
    #[test]
    fn defaults() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.ttl_seconds, 300);
        assert_eq!(config.marker_ttl_seconds, 2_592_000);
        assert!(config.enabled);
        assert_eq!(config.store_timeout_ms, 100);
        assert!(config.redis_url.is_none());
    }

    /// SPEC §8's defaults follow the topology; a flag overrides them.
    #[test]
    fn topology_defaults() {
        let memory = parse(&[]).unwrap();
        assert_eq!(memory.topology(), Topology::Memory);
        assert_eq!(
            (memory.revocation_replicas(), memory.clock_skew()),
            (0, Duration::ZERO)
        );
        let url = parse(&["--redis-url", "redis://127.0.0.1:6379"]).unwrap();
        assert_eq!(url.topology(), Topology::Redis);
        assert_eq!(
            (url.revocation_replicas(), url.clock_skew()),
            (0, Duration::ZERO)
        );
        let sentinel = [
            "--redis-sentinels",
            "10.0.0.1:26379,[::1]:26380",
            "--redis-sentinel-master",
            "sessions",
        ];
        let config = parse(&sentinel).unwrap();
        assert_eq!(config.topology(), Topology::Sentinel);
        assert_eq!(
            config.redis_sentinels,
            [
                HostPort {
                    host: "10.0.0.1".into(),
                    port: 26379
                },
                HostPort {
                    host: "::1".into(),
                    port: 26380
                }
            ]
        );
        assert_eq!(
            (config.revocation_replicas(), config.clock_skew()),
            (1, Duration::from_millis(500))
        );
        let mut explicit = sentinel.to_vec();
        explicit.extend(["--revocation-replicas", "2", "--clock-skew-ms", "0"]);
        let config = parse(&explicit).unwrap();
        assert_eq!(
            (config.revocation_replicas(), config.clock_skew()),
            (2, Duration::ZERO)
        );
        let config = parse(&["--redis-cluster-nodes", "10.0.0.1:7000,10.0.0.2:7000"]).unwrap();
        assert_eq!(config.topology(), Topology::Cluster);
        assert_eq!(config.redis_cluster_nodes.len(), 2);
        assert_eq!(
            (config.revocation_replicas(), config.clock_skew()),
            (1, Duration::from_millis(500))
        );
    }

    /// Two topologies at once are refused, naming both flags.
    #[test]
    fn one_topology() {
        let both = parse(&[
            "--redis-sentinels",
            "10.0.0.1:26379",
            "--redis-sentinel-master",
            "sessions",
            "--redis-cluster-nodes",
            "10.0.0.1:7000",
        ])
        .unwrap_err();
        assert!(
            both.contains("--redis-sentinels and --redis-cluster-nodes"),
            "{both}"
        );
        let both = parse(&[
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-cluster-nodes",
            "10.0.0.1:7000",
        ])
        .unwrap_err();
        assert!(
            both.contains("--redis-url and --redis-cluster-nodes"),
            "{both}"
        );
    }

    /// The Redis password never reaches a log line.
    #[test]
    fn redacts_redis_password() {
        let config = parse(&["--redis-url", "redis://cache:hunter2@redis:6379/2"]).unwrap();
        assert_eq!(
            config.redis_url_redacted().unwrap(),
            "redis://cache:***@redis:6379/2"
        );
        let config = parse(&["--redis-url", "redis://redis:6379"]).unwrap();
        assert_eq!(config.redis_url_redacted().unwrap(), "redis://redis:6379");
    }

    /// Values that cannot work are refused with a message naming the flag.
    #[test]
    fn refuses_bad_values() {
        let cases: &[(&[&str], &str)] = &[
            (&["--ttl-seconds", "0"], "--ttl-seconds"),
            (&["--store-timeout-ms", "0"], "--store-timeout-ms"),
            (&["--enabled", "maybe"], "--enabled"),
            (&["--listen", "nowhere"], "--listen"),
            (
                &["--ttl-seconds", "600", "--marker-ttl-seconds", "60"],
                "--marker-ttl-seconds",
            ),
            (&["--redis-url", "http://secret@host"], "--redis-url"),
            (&["--listen", "0.0.0.0:50051"], "--allow-unauthenticated"),
            (&["--otlp-endpoint", "127.0.0.1:4317"], "--otlp-endpoint"),
            (&["--otlp-endpoint", "http://"], "--otlp-endpoint"),
            (
                &["--otlp-endpoint", "https://collector:4317"],
                "--otlp-endpoint",
            ),
            (
                &["--otlp-endpoint", "http://collector:4317/v1/traces"],
                "--otlp-endpoint",
            ),
            (&["--otlp-service-name", " "], "--otlp-service-name"),
        ];
        for (args, flag) in cases {
            let error = parse(args).expect_err(&format!("{args:?} should be refused"));
            assert!(error.contains(flag), "{args:?}: {error}");
            assert!(!error.contains("secret"), "{error}");
        }
        assert!(parse(&["--listen", "0.0.0.0:50051", "--allow-unauthenticated"]).is_ok());
        assert!(parse(&["--listen", "0.0.0.0:50051", "--api-keys-file", "keys.toml"]).is_ok());
        let error = parse(&["--tls-cert", "c.pem"]).unwrap_err();
        assert!(error.contains("--tls-key"), "{error}");
        assert!(!parse(&["--enabled", "false"]).unwrap().enabled);
        let traced = parse(&["--otlp-endpoint", "http://127.0.0.1:4317"]).unwrap();
        assert_eq!(
            traced.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(traced.otlp_service_name, "session-cache");
        assert!(parse(&["--otlp-endpoint", "http://otel-collector.monitoring:4317/"]).is_ok());
    }
}

/// `--redis-lookup` (see `store::redis::LookupMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisLookup {
    Commands,
    Script,
    Mixed,
}
