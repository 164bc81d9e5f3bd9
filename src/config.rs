//! The service's configuration: one struct, from flags or `SESSION_CACHE_*` variables,
//! checked before anything binds.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Parser};

use crate::store::Limits;

/// A gRPC cache of validated sessions, in front of an identity provider.
///
/// Every flag can also be set by the environment variable named in its help.
#[derive(Clone, Debug, Parser)]
#[command(name = "session-cache", version, about, long_about = None)]
pub struct Config {
    /// Address to serve gRPC on. Without caller authentication only a loopback address
    /// is accepted, unless --allow-unauthenticated is given.
    #[arg(long, env = "SESSION_CACHE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Redis to cache sessions in (redis://[user:password@]host:port[/db]). Without it
    /// the embedded in-memory store serves: one process only, forgotten on restart.
    #[arg(long, env = "SESSION_CACHE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

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

    /// Most sessions the in-memory store holds; past it the least useful are dropped.
    /// Invalidations and logouts are never dropped.
    #[arg(long, env = "SESSION_CACHE_MEMORY_MAX_ENTRIES", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_max_entries: u64,

    /// Most SessionCache calls served at once; past it calls are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing, so admitted calls keep their latency.
    #[arg(long, env = "SESSION_CACHE_MAX_IN_FLIGHT", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight: u32,

    /// Address to serve Prometheus metrics on (GET /metrics); off when not given.
    #[arg(long, env = "SESSION_CACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format: text for people, json for log pipelines. RUST_LOG filters (default
    /// info).
    #[arg(long, env = "SESSION_CACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

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
    #[arg(long, env = "SESSION_CACHE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// PEM certificate chain to serve TLS with (needs --tls-key).
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
        if let Some(url) = &self.redis_url {
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
        if self.redis_ca_file.is_some()
            && !self
                .redis_url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
        {
            return Err(ConfigError(
                "--redis-ca-file needs a rediss:// --redis-url".into(),
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

    /// The store timeout.
    pub fn store_timeout(&self) -> Duration {
        Duration::from_millis(self.store_timeout_ms)
    }

    /// The lifetimes every store keeps.
    pub fn limits(&self) -> Limits {
        Limits {
            ttl_seconds: self.ttl_seconds,
            marker_ttl_seconds: self.marker_ttl_seconds,
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
    }
}
