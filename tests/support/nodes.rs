//! The `redis-server` processes of a topology (Sentinel or Cluster), by port, and the
//! connections the topology keeps to them for its own polls and checks: one per node,
//! every command bounded by [`ANSWER`], dropped after any error so that the next
//! command dials anew (the node may have died or been replaced meanwhile).

use std::{collections::HashMap, fmt, sync::Mutex, time::Duration};

use bb8_redis::redis::{self, aio::MultiplexedConnection};

use super::{
    poll::eventually,
    redis_server::{Redis, Role, role_name},
};

/// The longest one command to a node may take.
pub const ANSWER: Duration = Duration::from_secs(1);

/// `127.0.0.1:p1,127.0.0.1:p2,…`: how the service is given several nodes.
pub fn addresses(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A topology's processes, in the order they were started.
#[derive(Default)]
pub struct Nodes {
    all: Vec<Redis>,
    /// Kept connections, by port.
    links: Mutex<HashMap<u16, MultiplexedConnection>>,
}

impl Nodes {
    pub fn push(&mut self, node: Redis) {
        self.all.push(node);
    }

    /// Every node's port, running or not, in the order they were started.
    pub fn ports(&self) -> Vec<u16> {
        self.all.iter().map(Redis::port).collect()
    }

    /// The ports of the Sentinels (`true`) or of the data nodes (`false`).
    pub fn ports_of_sentinels(&self, sentinels: bool) -> Vec<u16> {
        self.all
            .iter()
            .filter(|n| matches!(n.role(), Role::Sentinel { .. }) == sentinels)
            .map(Redis::port)
            .collect()
    }

    /// The ports of the nodes that run (not killed).
    pub fn running(&self) -> Vec<u16> {
        self.all
            .iter()
            .filter(|n| n.is_running())
            .map(Redis::port)
            .collect()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Redis> {
        self.all.iter_mut()
    }

    /// The node on `port`.
    pub fn get(&self, port: u16) -> &Redis {
        self.all
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("{port} is not a node of this topology"))
    }

    fn get_mut(&mut self, port: u16) -> &mut Redis {
        self.all
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("{port} is not a node of this topology"))
    }

    /// SIGKILL of the node on `port`, reaped (a no-op if it is not running).
    pub fn kill(&mut self, port: u16) {
        self.get_mut(port).kill();
        self.forget(port);
    }

    /// The node on `port` started again, empty, as `role`, once it answers.
    pub async fn restart_as(&mut self, port: u16, role: Role) {
        self.get_mut(port).restart_as(role).await;
        self.forget(port);
    }

    /// One command to the node on `port`, on the connection kept for it (dialled when
    /// there is none), bounded by [`ANSWER`].
    pub async fn ask<T: redis::FromRedisValue>(
        &self,
        port: u16,
        cmd: &redis::Cmd,
    ) -> Result<T, String> {
        let kept = self.links.lock().unwrap().get(&port).cloned();
        let exchange = async {
            let mut conn = match kept {
                Some(conn) => conn,
                None => {
                    let conn = self
                        .get(port)
                        .client()
                        .get_multiplexed_async_connection()
                        .await?;
                    self.links.lock().unwrap().insert(port, conn.clone());
                    conn
                }
            };
            cmd.query_async::<T>(&mut conn).await
        };
        let answer = match tokio::time::timeout(ANSWER, exchange).await {
            Ok(answer) => answer.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer from {port} within {ANSWER:?}")),
        };
        if answer.is_err() {
            self.forget(port);
        }
        answer
    }

    /// The first element of `ROLE` on `port`: `master`, `slave` or `sentinel`; `None`
    /// when nothing answers there.
    pub async fn role(&self, port: u16) -> Option<String> {
        role_name(self.ask(port, &redis::cmd("ROLE")).await.ok()?)
    }

    /// `INFO section` of `port` as text (read fields with
    /// [`super::redis_server::info_field`]); `None` when nothing answers there.
    pub async fn info(&self, port: u16, section: &str) -> Option<String> {
        self.ask(port, redis::cmd("INFO").arg(section)).await.ok()
    }

    /// [`eventually`], whose failure also shows the end of each running node's log.
    pub async fn wait_for<T, E: fmt::Debug>(
        &self,
        what: &str,
        patience: Duration,
        check: impl AsyncFnMut() -> Result<T, E>,
    ) -> T {
        let what = WithLogs { what, nodes: self };
        eventually(patience, what, check).await
    }

    /// Drops the connection to `port`, if any (its node was killed or restarted).
    fn forget(&self, port: u16) {
        self.links.lock().unwrap().remove(&port);
    }
}

/// What a wait is for, and, when it fails, the end of each running node's log.
struct WithLogs<'a> {
    what: &'a str,
    nodes: &'a Nodes,
}

impl fmt::Display for WithLogs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.what)?;
        for node in self.nodes.all.iter().filter(|n| n.is_running()) {
            write!(
                f,
                "\n-- {} on {} --\n{}",
                node.role(),
                node.port(),
                node.log_tail(10)
            )?;
        }
        Ok(())
    }
}
