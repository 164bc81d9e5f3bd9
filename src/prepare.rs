//! Every file the configuration names, read and checked before any port is bound: the
//! keys file, the token secret, the server's TLS, Redis's CA and passwords, the identity
//! provider's, and the keys of the revocations the provider pushes. A bad one stops the start with an error that names the flag and the
//! file (exit 64), and nothing has been bound or started.

use std::sync::Arc;

use crate::{
    auth::{self, Authenticator},
    config::{Config, RedisLookup, Topology},
    error::SetupError,
    files::{read, read_certificates, read_secret},
    idp::Provider,
    keys::TokenHasher,
    store::redis::{Credentials, LookupMode, RedisConfig, RedisTopology, SentinelConfig},
};

/// The configuration with every file it names read and checked: what [`prepare`]
/// returns, before any port is bound.
pub struct Prepared {
    pub(crate) config: Config,
    pub(crate) auth: Authenticator,
    pub(crate) hasher: TokenHasher,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) redis: Option<RedisConfig>,
    pub(crate) idp: Option<Arc<dyn Provider>>,
    pub(crate) revoke: crate::revoke::Prepared,
}

impl Prepared {
    /// The configuration the files were read for.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// Reads and checks every file the configuration names. Binds nothing and starts
/// nothing.
pub fn prepare(config: Config) -> Result<Prepared, SetupError> {
    let auth = match &config.api_keys_file {
        Some(path) => auth::load(path, config.tls_client_ca.is_some())?,
        None => Authenticator::open(),
    };
    let hasher = match &config.token_hmac_secret_file {
        Some(path) => {
            let flag = "--token-hmac-secret-file";
            let secret = read(path, flag)?;
            let secret = secret.trim_ascii_end();
            if secret.len() < 16 {
                return Err(SetupError::file(
                    flag,
                    path,
                    format!(
                        "the secret is {} bytes; it must be at least 16",
                        secret.len()
                    ),
                ));
            }
            TokenHasher::hmac(secret)
        }
        None => TokenHasher::Sha256,
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_config(&crate::tls::Files {
            cert,
            key,
            client_ca: config.tls_client_ca.as_deref(),
        })?),
        _ => None,
    };
    let redis = redis_config(&config)?;
    let idp = crate::idp::from_config(&config.idp)?;
    let revoke = crate::revoke::prepare(&config.revoke, &config.idp, config.clock_skew())?;
    Ok(Prepared {
        config,
        auth,
        hasher,
        tls,
        redis,
        idp,
        revoke,
    })
}

/// The Redis store's settings, files read; `None` for the memory store.
pub fn redis_config(config: &Config) -> Result<Option<RedisConfig>, SetupError> {
    let redis = &config.redis;
    let topology = match config.topology() {
        Topology::Memory => return Ok(None),
        Topology::Redis => RedisTopology::Url(redis.redis_url.clone().unwrap_or_default()),
        Topology::Cluster => RedisTopology::Cluster(redis.redis_cluster_nodes.clone()),
        Topology::Sentinel => RedisTopology::Sentinel(SentinelConfig {
            sentinels: redis.redis_sentinels.clone(),
            master: redis.redis_sentinel_master.clone().unwrap_or_default(),
            credentials: Credentials {
                username: redis.redis_sentinel_username.clone(),
                password: redis
                    .redis_sentinel_password_file
                    .as_deref()
                    .map(|path| read_secret(path, "--redis-sentinel-password-file"))
                    .transpose()?,
            },
        }),
    };
    let ca_pem = match &redis.redis_ca_file {
        Some(path) => Some(read_certificates(path, "--redis-ca-file")?.0),
        None => None,
    };
    Ok(Some(RedisConfig {
        topology,
        credentials: Credentials {
            username: redis.redis_username.clone(),
            password: redis
                .redis_password_file
                .as_deref()
                .map(|path| read_secret(path, "--redis-password-file"))
                .transpose()?,
        },
        tls: redis.redis_tls,
        timeout: config.store_timeout(),
        connections: redis.redis_connections,
        limits: config.limits(),
        ca_pem,
        allow_evicting: redis.allow_evicting_redis,
        revocation_replicas: config.revocation_replicas(),
        lookup: match redis.redis_lookup {
            RedisLookup::Commands => LookupMode::Commands,
            RedisLookup::Script => LookupMode::Script,
            RedisLookup::Mixed => LookupMode::Mixed,
        },
    }))
}
