//! Redis Sentinel: finding the primary at every dial, and watchers that hear of a
//! failover the moment the Sentinels announce it.
//!
//! # Which Sentinel to believe
//! During a failover the Sentinels disagree for a second or two: the leader has promoted
//! a replica and announced it, the others still name the old primary, which may itself
//! still answer `ROLE` as a primary (it stays writable until the Sentinels reconfigure
//! it, seconds later). redis-rs's `SentinelClient` believes the first Sentinel that
//! answers, and so can lead straight back to the old primary. Here every Sentinel is
//! asked at once and the answer with the newest `config-epoch` wins (each failover
//! raises it), from a Sentinel that does not judge that node down; the node's own
//! `ROLE`, asked on the connection that will be used, has the last word.
//!
//! A failover reaches the service three ways, whichever comes first: a watcher hears
//! `+switch-master`, a call gets `READONLY` or `NOREPLICAS` from the old primary, or the
//! old primary's connections drop.

use std::{sync::Arc, time::Duration};

use bb8_redis::redis::{
    self, AsyncConnectionConfig, Client, ConnectionAddr, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, RedisResult, Role, TlsCertificates,
    aio::MultiplexedConnection, io::tcp::TcpSettings,
};
use futures_util::{StreamExt, future::join_all};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    primary::Primary,
    settings::{CONNECT_TIMEOUT, Credentials, SentinelConfig},
};

/// How long a watcher waits before dialling a Sentinel that it lost again.
const REDIAL_PAUSE: Duration = Duration::from_secs(1);

/// TLS to the Sentinels and the data nodes, with a private CA or the system's roots.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) certificates: Option<TlsCertificates>,
}

/// Finds and dials the primary through the Sentinels.
pub(crate) struct Resolver {
    sentinels: Vec<Client>,
    master: String,
    /// Credentials for the data nodes.
    data: RedisConnectionInfo,
    tls: Option<Tls>,
}

/// One Sentinel's view of the primary.
struct View {
    address: (String, u16),
    config_epoch: u64,
}

impl Resolver {
    pub(crate) fn new(
        config: &SentinelConfig,
        data: &Credentials,
        tls: Option<Tls>,
    ) -> RedisResult<Self> {
        let sentinels = config
            .sentinels
            .iter()
            .map(|s| client(&s.host, s.port, settings(&config.credentials), tls.as_ref()))
            .collect::<RedisResult<_>>()?;
        Ok(Resolver {
            sentinels,
            master: config.master.clone(),
            data: settings(data),
            tls,
        })
    }

    /// A connection to the primary, and its `host:port`: the node the Sentinels last
    /// announced in a `+switch-master` (`announced`), else the node named by the newest
    /// view among the Sentinels that answer; either way, provided it says it is a
    /// primary.
    pub(crate) async fn connect(
        &self,
        config: &AsyncConnectionConfig,
        announced: Option<&str>,
    ) -> RedisResult<(MultiplexedConnection, String)> {
        if let Some((host, port)) = announced.and_then(|a| a.rsplit_once(':'))
            && let Ok(port) = port.parse()
        {
            match self.dial(host, port, config).await {
                Ok(conn) => return Ok((conn, format!("{host}:{port}"))),
                Err(e) => debug!(error = %e, "the announced primary is not one (any more)"),
            }
        }
        let views = join_all(self.sentinels.iter().map(|s| self.view(s, config))).await;
        let mut first_error = None;
        let mut newest: Option<View> = None;
        for view in views {
            match view {
                Ok(Some(view))
                    if newest
                        .as_ref()
                        .is_none_or(|n| view.config_epoch > n.config_epoch) =>
                {
                    newest = Some(view);
                }
                Ok(_) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let newest = newest.ok_or_else(|| match first_error {
            // Nobody answered: say why the first did not (a wrong password, a refusal).
            Some(e) => RedisError::from((ErrorKind::Io, "no Sentinel answered", e.to_string())),
            None => RedisError::from((ErrorKind::Io, "no Sentinel names a primary that is up")),
        })?;
        let (host, port) = newest.address;
        debug!(
            primary = %format!("{host}:{port}"),
            config_epoch = newest.config_epoch,
            "the Sentinels' newest view of the primary"
        );
        let conn = self.dial(&host, port, config).await?;
        Ok((conn, format!("{host}:{port}")))
    }

    /// A connection to the data node at `host:port`, if it says it is a primary.
    async fn dial(
        &self,
        host: &str,
        port: u16,
        config: &AsyncConnectionConfig,
    ) -> RedisResult<MultiplexedConnection> {
        let node = client(host, port, self.data.clone(), self.tls.as_ref())?;
        let mut conn = node
            .get_multiplexed_async_connection_with_config(config)
            .await?;
        let role: Role = redis::cmd("ROLE").query_async(&mut conn).await?;
        if !matches!(role, Role::Primary { .. }) {
            return Err(RedisError::from((
                ErrorKind::Io,
                "the node the Sentinels name is not a primary (yet)",
            )));
        }
        Ok(conn)
    }

    /// What one Sentinel says of the primary: `None` when it does not know the name or
    /// judges the primary down; an error when it does not answer.
    async fn view(
        &self,
        sentinel: &Client,
        config: &AsyncConnectionConfig,
    ) -> RedisResult<Option<View>> {
        let mut conn = sentinel
            .get_multiplexed_async_connection_with_config(config)
            .await?;
        let fields: Vec<String> = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(&self.master)
            .query_async(&mut conn)
            .await?;
        let get = |name: &str| {
            fields
                .chunks(2)
                .find(|pair| pair[0] == name)
                .and_then(|pair| pair.get(1))
        };
        let Some(flags) = get("flags") else {
            return Ok(None);
        };
        // A Sentinel in the middle of a failover may report the new epoch with the old
        // address: its view is not yet one to follow.
        if ["s_down", "o_down", "failover_in_progress"]
            .iter()
            .any(|flag| flags.contains(flag))
        {
            return Ok(None);
        }
        Ok((|| {
            Some(View {
                address: (get("ip")?.clone(), get("port")?.parse().ok()?),
                config_epoch: get("config-epoch")?.parse().ok()?,
            })
        })())
    }
}

fn settings(credentials: &Credentials) -> RedisConnectionInfo {
    let mut redis = RedisConnectionInfo::default();
    if let Some(user) = &credentials.username {
        redis = redis.set_username(user);
    }
    if let Some(password) = &credentials.password {
        redis = redis.set_password(password);
    }
    redis
}

/// A client for one node (a Sentinel or a data node), with TCP_NODELAY.
fn client(
    host: &str,
    port: u16,
    redis: RedisConnectionInfo,
    tls: Option<&Tls>,
) -> RedisResult<Client> {
    let address = match tls {
        Some(_) => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        },
        None => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    let info = address
        .into_connection_info()?
        .set_redis_settings(redis)
        .set_tcp_settings(TcpSettings::default().set_nodelay(true));
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
        let client = client(
            &sentinel.host,
            sentinel.port,
            settings(&config.credentials),
            tls,
        )?;
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
            if let Ok(Some(address)) = master_address(&client, &master).await
                && primary.address().is_some()
            {
                primary.named(&address);
            }
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let Ok(text) = message.get_payload::<String>() else {
                    continue;
                };
                // "<master name> <old ip> <old port> <new ip> <new port>"
                let fields: Vec<&str> = text.split_whitespace().collect();
                if let [name, _, _, ip, port] = fields[..]
                    && name == master
                {
                    primary.switched(&format!("{ip}:{port}"));
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
