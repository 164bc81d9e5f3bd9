//! The store's flags (SPEC §6, §8): which topology (one Redis, Sentinels, a Cluster, or
//! the embedded store without any), its credentials and TLS, and how revocations and
//! clocks are handled across nodes. Flattened into [`crate::Config`].

use std::{path::PathBuf, time::Duration};

use clap::{ArgAction, Args};

pub use crate::store::redis::HostPort;

/// Where the store lives, and how to reach it.
#[derive(Clone, Debug, Args)]
pub struct RedisFlags {
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

    /// PEM CA to trust for rediss:// besides the system's roots (a private CA).
    #[arg(long, env = "SESSION_CACHE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Start even though Redis may evict any key (an allkeys-* maxmemory-policy), which
    /// can drop invalidation markers and tombstones and so revive revoked sessions.
    #[arg(long, env = "SESSION_CACHE_ALLOW_EVICTING_REDIS", action = ArgAction::SetTrue)]
    pub allow_evicting_redis: bool,
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

impl RedisFlags {
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

    /// The Redis URL without its password, for logs.
    pub fn redis_url_redacted(&self) -> Option<String> {
        let url = self.redis_url.as_deref()?;
        let (scheme, rest) = url.split_once("://")?;
        Some(match rest.rsplit_once('@') {
            Some((user_info, host)) => match user_info.split_once(':') {
                Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
                None => url.to_owned(),
            },
            None => url.to_owned(),
        })
    }

    /// Checks what clap's per-flag parsers cannot see; the message names the flags.
    pub fn validate(&self) -> Result<(), String> {
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
            return Err(format!(
                "{first} and {second} name two topologies: give one"
            ));
        }
        if self
            .redis_sentinel_master
            .as_deref()
            .is_some_and(|name| name.trim().is_empty())
        {
            return Err(
                "--redis-sentinel-master must name the master the Sentinels monitor".into(),
            );
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
                return Err(format!(
                    "{flag} needs a Redis: give --redis-url, --redis-sentinels or \
                     --redis-cluster-nodes"
                ));
            }
        }
        if self.topology() != Topology::Sentinel
            && (self.redis_sentinel_username.is_some()
                || self.redis_sentinel_password_file.is_some())
        {
            return Err(
                "--redis-sentinel-username and --redis-sentinel-password-file need \
                 --redis-sentinels"
                    .into(),
            );
        }
        if let Some(url) = &self.redis_url {
            if self.redis_tls {
                return Err(
                    "--redis-tls is for --redis-sentinels and --redis-cluster-nodes; with \
                     --redis-url use a rediss:// URL"
                        .into(),
                );
            }
            let has_password = url
                .split_once("://")
                .and_then(|(_, rest)| rest.rsplit_once('@'))
                .is_some_and(|(user_info, _)| user_info.contains(':'));
            if has_password && self.redis_password_file.is_some() {
                return Err(
                    "--redis-url carries a password and --redis-password-file gives another: \
                     give one"
                        .into(),
                );
            }
            // The URL may hold a password: never echo it.
            let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
            if !scheme_ok || bb8_redis::redis::Client::open(url.as_str()).is_err() {
                return Err("--redis-url is not a valid redis:// or rediss:// URL \
                     (redis://[user:password@]host:port[/db])"
                    .into());
            }
        }
        let tls = self.redis_tls
            || self
                .redis_url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"));
        if self.redis_ca_file.is_some() && !tls {
            return Err(
                "--redis-ca-file needs TLS to Redis: a rediss:// --redis-url, or --redis-tls \
                 with --redis-sentinels or --redis-cluster-nodes"
                    .into(),
            );
        }
        Ok(())
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

/// `--redis-lookup` (see `store::redis::LookupMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisLookup {
    Commands,
    Script,
    Mixed,
}
