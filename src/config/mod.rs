//! The service's configuration: one struct, from flags or `SESSION_CACHE_*` variables,
//! checked before anything binds.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Parser};

mod redis;

pub use redis::{HostPort, RedisFlags, RedisLookup, Topology};

use crate::{
    clock::Micros,
    error::SetupError,
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

    /// Where the store lives: one Redis, Sentinels or a Cluster (SPEC §8); the
    /// embedded store without any of them.
    #[command(flatten)]
    pub redis: RedisFlags,

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

    /// Most connections one client address (an IPv4 address, an IPv6 /64) may hold;
    /// past it its new connections are closed at accept, so that one peer cannot take
    /// every place. Default: a quarter of --max-connections, at least 4.
    #[arg(long, env = "SESSION_CACHE_MAX_CONNECTIONS_PER_PEER",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_peer: Option<u32>,

    /// Of --max-connections, how many only authenticated callers (an API key or a
    /// client certificate) may keep: a connection past the rest takes one on
    /// probation, and is closed unless a call on it authenticates within
    /// --request-timeout-ms. Default 0 (none kept).
    #[arg(long, env = "SESSION_CACHE_RESERVED_CONNECTIONS", default_value_t = 0)]
    pub reserved_connections: u32,

    /// Most calls whose answer is not yet delivered that one client address may hold;
    /// past it its calls are refused with RESOURCE_EXHAUSTED, except on a connection
    /// that holds none (each connection may always have one call open, so that one
    /// connection misbehaving does not lock out the others of its address). Default: a
    /// quarter of --max-open-calls, at least 4.
    #[arg(long, env = "SESSION_CACHE_MAX_OPEN_CALLS_PER_PEER",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_open_calls_per_peer: Option<u32>,

    /// Most calls whose answer is not yet delivered on one connection; past it its
    /// calls are refused with RESOURCE_EXHAUSTED. Default: a quarter of
    /// --max-open-calls-per-peer, at least 4.
    #[arg(long, env = "SESSION_CACHE_MAX_OPEN_CALLS_PER_CONNECTION",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_open_calls_per_connection: Option<u32>,

    /// Of --max-open-calls, how many only authenticated calls may take. Default 0.
    #[arg(long, env = "SESSION_CACHE_RESERVED_OPEN_CALLS", default_value_t = 0)]
    pub reserved_open_calls: u32,

    /// Most streams one connection may reset in 10 s (the client resetting streams the
    /// server accepted, or the server resetting them on an error) while they are also
    /// most of its streams in that time; past it the connection gets GOAWAY
    /// ENHANCE_YOUR_CALM and is closed. Bounds the CPU that opening and resetting
    /// streams in a loop can burn.
    #[arg(long, env = "SESSION_CACHE_MAX_STREAM_RESETS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_stream_resets: u32,

    /// Every connection to --listen and --http-listen starts with a PROXY protocol v2
    /// header (HAProxy, Envoy, AWS NLB, ...), and the client address it carries is the
    /// peer that per-peer shares count; a connection without a valid header within 5 s
    /// is closed. Off: nothing is read, and a header is refused as an invalid request.
    /// Only behind such a proxy: anyone who can reach the port could name any address.
    /// --metrics-listen never reads one.
    #[arg(long, env = "SESSION_CACHE_PROXY_PROTOCOL", action = ArgAction::SetTrue)]
    pub proxy_protocol: bool,

    /// Address to serve Prometheus metrics on (GET /metrics); off when not given. An
    /// address that cannot be bound exits 69, like --listen.
    #[arg(long, env = "SESSION_CACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format: text for people, json for log pipelines. RUST_LOG filters (default
    /// info).
    #[arg(long, env = "SESSION_CACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// OpenTelemetry collector to send traces to over OTLP/gRPC (http://host:4317); off
    /// when not given. Spans leave in batches off the request path, within about 5 s;
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

    /// File holding a secret (16 bytes or more): entry keys become HMAC-SHA256 of the
    /// token under it instead of plain SHA-256. The Python service cannot read them.
    #[arg(long, env = "SESSION_CACHE_TOKEN_HMAC_SECRET_FILE")]
    pub token_hmac_secret_file: Option<PathBuf>,

    /// The identity provider that Validate asks (SPEC §9).
    #[command(flatten)]
    pub idp: crate::idp::IdpFlags,

    /// Validation at the edge: Envoy's Check and /auth (SPEC §11).
    #[command(flatten)]
    pub edge: crate::edge::EdgeFlags,

    /// The HTTP listener (SPEC §11, §12).
    #[command(flatten)]
    pub http: crate::http::HttpFlags,

    /// Revocations pushed by the identity provider (SPEC §12).
    #[command(flatten)]
    pub revoke: crate::revoke::RevokeFlags,
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

/// The fewest places a share gives by default, whatever the pool: a peer, or a
/// connection, always gets a few.
pub const FEWEST_SHARE: u32 = 4;

/// A share of `pool`: `flag` when given, else a quarter of the pool, never fewer than
/// [`FEWEST_SHARE`]; never more than the pool.
pub fn share(flag: Option<u32>, pool: u32) -> u32 {
    flag.unwrap_or((pool / 4).max(FEWEST_SHARE)).min(pool)
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Reads flags and environment, then checks the whole; `Err` covers `--help` and
    /// `--version` too (see [`SetupError::exit_code`]).
    pub fn load() -> Result<Config, SetupError> {
        Config::load_from(std::env::args_os())
    }

    /// [`Config::load`] from these arguments (the first is the program name) and the
    /// environment.
    pub fn load_from<I, T>(args: I) -> Result<Config, SetupError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config = Config::try_parse_from(args).map_err(SetupError::Parse)?;
        config.validate().map_err(SetupError::Flags)?;
        Ok(config)
    }

    /// Checks what clap's per-flag parsers cannot see.
    pub fn validate(&self) -> Result<(), String> {
        if self.marker_ttl_seconds < self.ttl_seconds {
            return Err(format!(
                "--marker-ttl-seconds ({}) must be at least --ttl-seconds ({}): a password \
                 change must be remembered as long as an entry it hides can live",
                self.marker_ttl_seconds, self.ttl_seconds
            ));
        }
        if self.reserved_connections >= self.max_connections {
            return Err(format!(
                "--reserved-connections ({}) must be less than --max-connections ({}): \
                 unauthenticated callers (probes among them) need a place",
                self.reserved_connections, self.max_connections
            ));
        }
        if self.reserved_open_calls >= self.max_open_calls {
            return Err(format!(
                "--reserved-open-calls ({}) must be less than --max-open-calls ({}): \
                 unauthenticated calls (health checks among them) need room",
                self.reserved_open_calls, self.max_open_calls
            ));
        }
        self.redis.validate()?;
        self.idp.validate()?;
        self.revoke.validate(self.http.http_listen.is_some())?;
        if let Some(endpoint) = &self.otlp_endpoint
            && !otlp_endpoint_ok(endpoint)
        {
            return Err(
                "--otlp-endpoint is not a valid http:// URL of an OTLP/gRPC \
                 collector (http://host:4317)"
                    .into(),
            );
        }
        if self.otlp_service_name.trim().is_empty() {
            return Err("--otlp-service-name must not be empty".into());
        }
        if !self.listen.ip().is_loopback()
            && self.api_keys_file.is_none()
            && !self.allow_unauthenticated
        {
            return Err(format!(
                "--listen {} is not a loopback address and no caller authentication is \
                 configured: anyone who can reach it could write sessions. Give \
                 --api-keys-file, listen on 127.0.0.1, or pass --allow-unauthenticated if \
                 a network policy guards the port",
                self.listen
            ));
        }
        // /auth (SPEC §11) answers who a token belongs to: off loopback its callers
        // authenticate like the gRPC listener's, or the operator opts out.
        if let Some(addr) = self.http.http_listen
            && !addr.ip().is_loopback()
            && self.api_keys_file.is_none()
            && !self.allow_unauthenticated
        {
            return Err(format!(
                "--http-listen {addr} is not a loopback address and no caller authentication \
                 is configured: anyone who can reach it could ask /auth whose a token is. Give \
                 --api-keys-file (the proxy sends its key in --edge-api-key-header), listen \
                 on 127.0.0.1, or pass --allow-unauthenticated if a network policy guards \
                 the port"
            ));
        }
        Ok(())
    }

    /// Logs the effective configuration, one line with no secret in it.
    pub fn log_effective(&self, listen: Option<SocketAddr>, store: &str, authenticated: bool) {
        let redis = &self.redis;
        tracing::info!(
            listen = ?listen,
            store,
            redis_url = redis.redis_url_redacted(),
            redis_sentinels = ?redis.redis_sentinels.iter().map(ToString::to_string).collect::<Vec<_>>(),
            redis_sentinel_master = redis.redis_sentinel_master,
            redis_cluster_nodes = ?redis.redis_cluster_nodes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            revocation_replicas = self.revocation_replicas(),
            clock_skew_ms = self.clock_skew().as_millis() as u64,
            enabled = self.enabled,
            ttl_seconds = self.ttl_seconds,
            marker_ttl_seconds = self.marker_ttl_seconds,
            store_timeout_ms = self.store_timeout_ms,
            redis_connections = redis.redis_connections,
            max_in_flight = self.max_in_flight,
            tls = self.tls_cert.is_some(),
            mutual_tls = self.tls_client_ca.is_some(),
            authenticated,
            keyed_token_hashing = self.token_hmac_secret_file.is_some(),
            metrics_listen = ?self.metrics_listen,
            http_listen = ?self.http.http_listen,
            max_connections = self.max_connections,
            idle_timeout_seconds = self.idle_timeout_seconds,
            request_timeout_ms = self.request_timeout_ms,
            stall_timeout_seconds = self.stall_timeout_seconds,
            max_open_calls = self.max_open_calls,
            max_connections_per_peer = self.connections_per_peer(),
            reserved_connections = self.reserved_connections,
            max_open_calls_per_peer = self.open_calls_per_peer(),
            max_open_calls_per_connection = self.open_calls_per_connection(),
            reserved_open_calls = self.reserved_open_calls,
            max_stream_resets = self.max_stream_resets,
            proxy_protocol = self.proxy_protocol,
            idp = ?self.idp.idp,
            idp_timeout_ms = self.idp.idp_timeout_ms,
            idp_max_in_flight = self.idp.idp_max_in_flight,
            negative_ttl_seconds = self.idp.negative_ttl_seconds,
            "serving"
        );
    }

    /// `--max-connections-per-peer`, or its default.
    pub fn connections_per_peer(&self) -> u32 {
        share(self.max_connections_per_peer, self.max_connections)
    }

    /// `--max-open-calls-per-peer`, or its default.
    pub fn open_calls_per_peer(&self) -> u32 {
        share(self.max_open_calls_per_peer, self.max_open_calls)
    }

    /// `--max-open-calls-per-connection`, or its default.
    pub fn open_calls_per_connection(&self) -> u32 {
        share(
            self.max_open_calls_per_connection,
            self.open_calls_per_peer(),
        )
    }

    /// Which store the flags name.
    pub fn topology(&self) -> Topology {
        self.redis.topology()
    }

    /// `--revocation-replicas`, or its default for the topology (SPEC §8).
    pub fn revocation_replicas(&self) -> u32 {
        self.redis.revocation_replicas()
    }

    /// `--clock-skew-ms`, or its default for the topology (SPEC §8).
    pub fn clock_skew(&self) -> Duration {
        self.redis.clock_skew()
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
        assert!(config.redis.redis_url.is_none());
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
            config.redis.redis_sentinels,
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
        assert_eq!(config.redis.redis_cluster_nodes.len(), 2);
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
            config.redis.redis_url_redacted().unwrap(),
            "redis://cache:***@redis:6379/2"
        );
        let config = parse(&["--redis-url", "redis://redis:6379"]).unwrap();
        assert_eq!(
            config.redis.redis_url_redacted().unwrap(),
            "redis://redis:6379"
        );
        // A user and no password: nothing to hide, and nothing to claim was hidden.
        let config = parse(&["--redis-url", "redis://cache@redis:6379"]).unwrap();
        assert_eq!(
            config.redis.redis_url_redacted().unwrap(),
            "redis://cache@redis:6379"
        );
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
            (&["--http-listen", "0.0.0.0:8081"], "--http-listen"),
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
