//! Redis Sentinel: the client that names the primary at every dial, and the watchers
//! that hear of a failover the moment the Sentinels announce it.
//!
//! A failover reaches the service three ways, whichever comes first: a watcher hears
//! `+switch-master`, a call gets `READONLY` or `NOREPLICAS` from the old primary, or the
//! old primary's connections drop. The watchers matter most in the window that lost
//! revocations before: after a promotion the old primary may stay writable for seconds
//! (until the Sentinels reconfigure it), and only the announcement says that it is no
//! longer the primary.

use std::{sync::Arc, time::Duration};

use bb8_redis::redis::{
    self, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisResult,
    TlsCertificates, TlsMode,
    io::tcp::TcpSettings,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{CONNECT_TIMEOUT, Credentials, connection::Primary};
use crate::config::HostPort;

/// How long a watcher waits before dialling a Sentinel that it lost again.
const REDIAL_PAUSE: Duration = Duration::from_secs(1);

/// The Sentinels, the name they monitor the primary under, and how to reach both them
/// and the data nodes.
#[derive(Clone, Debug)]
pub struct SentinelConfig {
    pub sentinels: Vec<HostPort>,
    pub master: String,
    /// The Sentinels' own credentials.
    pub credentials: Credentials,
}

/// TLS to the Sentinels and the data nodes, with a private CA or the system's roots.
pub(crate) struct Tls {
    pub(crate) certificates: Option<TlsCertificates>,
}

/// A client that resolves the primary through the Sentinels.
pub(crate) fn client(
    sentinel: &SentinelConfig,
    data: &Credentials,
    tls: Option<&Tls>,
) -> RedisResult<SentinelClient> {
    let addresses = sentinel.sentinels.iter().map(|s| address(s, tls.is_some()));
    let mut builder =
        SentinelClientBuilder::new(addresses, &sentinel.master, SentinelServerType::Master)?
            .set_client_to_redis_tcp_settings(TcpSettings::default().set_nodelay(true));
    if let Some(user) = &data.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = &data.password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(user) = &sentinel.credentials.username {
        builder = builder.set_client_to_sentinel_username(user);
    }
    if let Some(password) = &sentinel.credentials.password {
        builder = builder.set_client_to_sentinel_password(password);
    }
    if let Some(tls) = tls {
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(certificates) = &tls.certificates {
            builder = builder
                .set_client_to_redis_certificates(certificates.clone())
                .set_client_to_sentinel_certificates(certificates.clone());
        }
    }
    builder.build()
}

fn address(sentinel: &HostPort, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: sentinel.host.clone(),
            port: sentinel.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(sentinel.host.clone(), sentinel.port)
    }
}

/// A plain client for one Sentinel, for its announcements.
fn sentinel_client(
    sentinel: &HostPort,
    config: &SentinelConfig,
    tls: Option<&Tls>,
) -> RedisResult<Client> {
    let mut redis = RedisConnectionInfo::default();
    if let Some(user) = &config.credentials.username {
        redis = redis.set_username(user);
    }
    if let Some(password) = &config.credentials.password {
        redis = redis.set_password(password);
    }
    let info = address(sentinel, tls.is_some())
        .into_connection_info()?
        .set_redis_settings(redis);
    match tls.and_then(|tls| tls.certificates.as_ref()) {
        Some(certificates) => Client::build_with_tls(info, certificates.clone()),
        None => Client::open(info),
    }
}

/// Starts one watcher per Sentinel; they end with `stop`.
pub(crate) fn watch(
    config: &SentinelConfig,
    tls: Option<&Tls>,
    primary: Arc<Primary>,
    stop: CancellationToken,
) -> RedisResult<()> {
    for sentinel in &config.sentinels {
        let client = sentinel_client(sentinel, config, tls)?;
        tokio::spawn(watch_one(
            client,
            sentinel.to_string(),
            config.master.clone(),
            primary.clone(),
            stop.clone(),
        ));
    }
    Ok(())
}

/// Listens to one Sentinel for `+switch-master` until `stop`, dialling it again
/// whenever the subscription is lost. On every (re)subscription it also asks which
/// node is the primary, so that an announcement missed while away still counts.
async fn watch_one(
    client: Client,
    name: String,
    master: String,
    primary: Arc<Primary>,
    stop: CancellationToken,
) {
    loop {
        let listened = async {
            let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| e.to_string())?;
            pubsub
                .subscribe("+switch-master")
                .await
                .map_err(|e| e.to_string())?;
            if let Ok(Some(address)) = master_address(&client, &master).await {
                if primary.address().is_some() {
                    primary.announced(&address);
                }
            }
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let Ok(text) = message.get_payload::<String>() else {
                    continue;
                };
                // "<master name> <old ip> <old port> <new ip> <new port>"
                let fields: Vec<&str> = text.split_whitespace().collect();
                if let [name, _, _, ip, port] = fields[..] {
                    if name == master {
                        primary.announced(&format!("{ip}:{port}"));
                    }
                }
            }
            Err::<(), _>("the subscription ended".to_string())
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = listened => {
                if let Err(error) = result {
                    debug!(sentinel = %name, error, "not listening to this Sentinel; dialling it again");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(REDIAL_PAUSE) => {}
        }
    }
}

/// The primary's address as this Sentinel names it, `ip:port`.
async fn master_address(client: &Client, master: &str) -> RedisResult<Option<String>> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let reply: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(master)
        .query_async(&mut conn)
        .await?;
    if reply.is_none() {
        warn!(master, "a Sentinel does not know this master name");
    }
    Ok(reply.map(|(ip, port)| format!("{ip}:{port}")))
}
