//! What the test topologies share about their nodes: the connections they keep for
//! their own polls and checks (one per node, every command bounded, dropped after any
//! error so that the next command dials anew: the node may have died or been replaced
//! meanwhile), and how a node's process is ended.

use std::{collections::HashMap, process::Child, sync::Mutex, time::Duration};

use bb8_redis::redis::{self, aio::MultiplexedConnection};

/// The longest one command to a node may take.
pub const ANSWER: Duration = Duration::from_secs(1);

/// Kept connections, by port.
#[derive(Default)]
pub struct Links(Mutex<HashMap<u16, MultiplexedConnection>>);

impl Links {
    /// One command to the node on `port`, reached at `url` when there is no connection
    /// to it yet, bounded by [`ANSWER`].
    pub async fn ask<T: redis::FromRedisValue>(
        &self,
        port: u16,
        url: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, String> {
        let kept = self.0.lock().unwrap().get(&port).cloned();
        let exchange = async {
            let mut conn = match kept {
                Some(conn) => conn,
                None => {
                    let conn = redis::Client::open(url)?
                        .get_multiplexed_async_connection()
                        .await?;
                    self.0.lock().unwrap().insert(port, conn.clone());
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

    /// Drops the connection to `port`, if any (its node was killed or restarted).
    pub fn forget(&self, port: u16) {
        self.0.lock().unwrap().remove(&port);
    }
}

/// SIGKILL and reap a node's process, if it still runs, so that nothing is left behind.
pub fn kill_and_reap(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
