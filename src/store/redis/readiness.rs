//! Whether a Redis that answers is fit to keep revocations: not a Cluster node given as
//! one Redis (it would refuse the keys of other slots), and not free to evict any key
//! (`allkeys-*`, which could drop markers and tombstones and revive revoked sessions)
//! unless `--allow-evicting-redis` says so.

use bb8_redis::redis::{self, FromRedisValue};
use tokio::time::timeout_at;
use tracing::warn;

use super::{RedisStore, cluster, connection::Conn};
use crate::store::StoreError;

impl RedisStore {
    /// Why this Redis must not serve even though it answers (see
    /// `Store::readiness_problem`).
    pub(super) async fn readiness_problem_now(&self) -> Option<String> {
        if !self.cluster && timeout_at(self.deadline(), self.is_cluster_node()).await == Ok(true) {
            return Some(
                "this Redis is a node of a Redis Cluster, which refuses keys of slots it does \
                 not serve: give the Cluster's nodes with --redis-cluster-nodes"
                    .into(),
            );
        }
        if self.allow_evicting {
            return None;
        }
        let policy = timeout_at(self.deadline(), self.eviction_policy()).await;
        match policy {
            Ok(Ok(Some(policy))) if policy.starts_with("allkeys") => Some(format!(
                "Redis maxmemory-policy is {policy}: it may evict invalidation markers and \
                 tombstones, which would revive revoked sessions. Set noeviction or a \
                 volatile-* policy, or pass --allow-evicting-redis"
            )),
            Ok(Ok(None)) => {
                warn!("cannot read Redis maxmemory-policy (CONFIG and INFO refused): not checked");
                None
            }
            _ => None,
        }
    }

    /// Redis's `maxmemory-policy`, from CONFIG GET or, where an ACL forbids that, from
    /// INFO; `None` when neither is allowed. In Cluster, the first `allkeys-*` policy of
    /// any primary, else the first primary's.
    pub async fn eviction_policy(&self) -> Result<Option<String>, StoreError> {
        let mut handle = self.connection().await?;
        let mut config = redis::cmd("CONFIG");
        config.arg("GET").arg("maxmemory-policy");
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        let (config, info) = match &mut handle.conn {
            Conn::Node(conn) => (
                config.query_async::<Vec<String>>(conn).await,
                info.query_async::<String>(conn).await,
            ),
            Conn::Cluster(conn) => {
                // Every primary's answer, or the first refusal.
                let everywhere = async |conn: &mut _, cmd| {
                    let replies = cluster::on_each_primary(conn, &self.primaries, &cmd).await?;
                    replies
                        .into_iter()
                        .map(|(_, reply)| reply)
                        .collect::<Result<Vec<_>, _>>()
                };
                let config = everywhere(conn, config).await.and_then(|replies| {
                    let mut pairs = Vec::new();
                    for reply in replies {
                        pairs.extend(Vec::<String>::from_redis_value(reply)?);
                    }
                    Ok(pairs)
                });
                let info = everywhere(conn, info).await.and_then(|replies| {
                    let mut texts = Vec::new();
                    for reply in replies {
                        texts.push(String::from_redis_value(reply)?);
                    }
                    Ok(texts.join("\n"))
                });
                (config, info)
            }
        };
        let policies: Vec<String> = match (config, info) {
            (Ok(pairs), _) => pairs.into_iter().skip(1).step_by(2).collect(),
            (Err(_), Ok(text)) => text
                .lines()
                .filter_map(|line| line.strip_prefix("maxmemory_policy:"))
                .map(|policy| policy.trim().to_owned())
                .collect(),
            (Err(_), Err(_)) => Vec::new(),
        };
        let evicting = policies.iter().find(|p| p.starts_with("allkeys")).cloned();
        Ok(evicting.or_else(|| policies.into_iter().next()))
    }

    /// Whether the node behind a one-node topology has cluster mode on (`INFO cluster`);
    /// `false` when it cannot tell.
    async fn is_cluster_node(&self) -> bool {
        let Ok(mut handle) = self.connection().await else {
            return false;
        };
        let info: Result<String, _> = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut handle.conn)
            .await;
        info.is_ok_and(|text| text.lines().any(|line| line.trim() == "cluster_enabled:1"))
    }
}
