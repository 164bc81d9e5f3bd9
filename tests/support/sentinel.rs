//! A Redis Sentinel topology of real processes on free loopback ports: a primary, one or
//! two replicas and three Sentinels (quorum 2) monitoring it as [`MASTER_NAME`], that a
//! test can fail over, kill a node of and restart.
//!
//! Fast by design: `down-after-milliseconds` 1000, `failover-timeout` 3000, and the
//! Sentinels' own periods (INFO, PING, hello) shortened to 500 ms with `SENTINEL DEBUG`,
//! so that a failover takes a few seconds and a live old primary is turned into a replica
//! about two seconds after the switch instead of about ten.
//!
//! A data node's wall clock can run ahead of or behind the host's: libfaketime cannot do
//! it (Debian's redis-server uses jemalloc, which calls `clock_gettime` while libfaketime
//! initialises, and the server hangs), so this module compiles a small `LD_PRELOAD` shim
//! with `cc` that shifts `CLOCK_REALTIME`, `gettimeofday` and `time` and leaves the
//! monotonic clock alone.
//!
//! With [`Topology::data_password`] the data nodes require a password (and use it to
//! replicate), and the Sentinels are given it; with [`Topology::sentinel_password`] the
//! Sentinels require one of their own (and use it between themselves). Every connection
//! this module opens authenticates as the node it reaches requires.
//!
//! Waits are bounded polls of a real condition, never fixed sleeps.

use std::{
    collections::HashMap,
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use bb8_redis::redis::{self, aio::MultiplexedConnection};
use tokio::time::Instant;

use session_cache::{keys::TokenHash, pb::SetOutcome};

use super::{
    Harness, PATIENCE, free_port, in_an_hour,
    links::{ANSWER, Links, kill_and_reap},
    pki::Dir,
    user,
};

/// The name the Sentinels monitor the primary under.
pub const MASTER_NAME: &str = "mymaster";
/// The longest a failover may take, from the request or the fault to a primary that
/// answers as one.
pub const FAILOVER_PATIENCE: Duration = Duration::from_secs(20);

const SENTINELS: usize = 3;
const QUORUM: usize = 2;
const DOWN_AFTER_MS: u64 = 1000;
const FAILOVER_TIMEOUT_MS: u64 = 3000;
/// The Sentinels' periods, in ms (defaults 10000, 1000, 1000, 2000). An old primary that
/// is alive after a switch is made a replica once it has reported itself master for four
/// publish periods.
const SENTINEL_DEBUG: &[(&str, &str)] = &[
    ("info-period", "500"),
    ("ping-period", "500"),
    ("ask-period", "500"),
    ("publish-period", "500"),
];
/// The pause between two looks at a condition.
const POLL: Duration = Duration::from_millis(20);
/// The environment variable the clock shim reads.
const SKEW_VAR: &str = "SESSION_CACHE_TEST_CLOCK_SKEW_MS";

/// What to start; `Topology::default()` is a primary and one replica, no clock offset,
/// no passwords.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Replicas of the initial primary: 1 or 2.
    pub replicas: usize,
    /// How far the initial primary's wall clock runs ahead of the host's (negative:
    /// behind), in milliseconds.
    pub primary_clock_offset_ms: Option<i64>,
    /// The same for one replica: (index among the replicas, offset in ms).
    pub replica_clock_offset_ms: Option<(usize, i64)>,
    /// Extra `redis-server` arguments for every data node, such as
    /// `&["--min-replicas-to-write", "1"]`.
    pub data_args: &'static [&'static str],
    /// The data nodes' password: `--requirepass` and `--masterauth` of every data node,
    /// and `sentinel auth-pass` of every Sentinel. No whitespace or quotes.
    pub data_password: Option<&'static str>,
    /// The Sentinels' own password: `requirepass` and `sentinel sentinel-pass` of every
    /// Sentinel. No whitespace or quotes.
    pub sentinel_password: Option<&'static str>,
}

impl Default for Topology {
    fn default() -> Topology {
        Topology {
            replicas: 1,
            primary_clock_offset_ms: None,
            replica_clock_offset_ms: None,
            data_args: &[],
            data_password: None,
            sentinel_password: None,
        }
    }
}

/// A `redis-server`, data node or Sentinel, that this module started.
struct Node {
    port: u16,
    child: Option<Child>,
    /// For a data node: its clock offset, kept for a restart.
    clock_offset_ms: Option<i64>,
}

impl Node {
    /// SIGKILL and reap, so that nothing is left behind.
    fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// The running topology; dropping it kills every process and removes its directory.
pub struct SentinelTopology {
    data: Vec<Node>,
    sentinels: Vec<Node>,
    data_args: &'static [&'static str],
    data_password: Option<&'static str>,
    sentinel_password: Option<&'static str>,
    dir: Dir,
    /// Connections the polls reuse (they poll every 20 ms), dropped on any error.
    links: Links,
}

impl SentinelTopology {
    /// Waits (bounded) until a Set of the test's own `probe` token through `h` answers
    /// STORED and the entry is on the node the Sentinels name as primary; returns when
    /// the Set answered.
    pub async fn first_stored(&self, h: &mut Harness, probe: &str) -> Instant {
        let deadline = Instant::now() + FAILOVER_PATIENCE;
        let key = TokenHash::of(probe).entry_key();
        loop {
            let got = h.get(probe).await;
            if !got.fence.is_empty() {
                let set = h
                    .set(probe, user("probe-user"), in_an_hour(), &got.fence)
                    .await;
                if set.outcome() == SetOutcome::Stored {
                    let stored = Instant::now();
                    let mut primary = self.conn(self.primary_port().await).await;
                    let there: bool = redis::cmd("EXISTS")
                        .arg(&key)
                        .query_async(&mut primary)
                        .await
                        .unwrap_or(false);
                    if there {
                        return stored;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no STORED on the primary within {FAILOVER_PATIENCE:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts the primary and the replicas, waits until every replica's link is up, then
    /// starts the Sentinels and waits until each knows every replica and both other
    /// Sentinels, so that a failover can proceed at once.
    pub async fn start(options: Topology) -> SentinelTopology {
        assert!(
            (1..=2).contains(&options.replicas),
            "a topology has 1 or 2 replicas"
        );
        for password in [options.data_password, options.sentinel_password]
            .into_iter()
            .flatten()
        {
            assert!(
                !password.is_empty()
                    && !password
                        .chars()
                        .any(|c| c.is_whitespace() || c == '"' || c == '\''),
                "a topology's password is one word without quotes"
            );
        }
        let started = Instant::now();
        let mut topology = SentinelTopology {
            data: Vec::new(),
            sentinels: Vec::new(),
            data_args: options.data_args,
            data_password: options.data_password,
            sentinel_password: options.sentinel_password,
            dir: Dir::new(),
            links: Links::default(),
        };
        let primary = free_port();
        topology
            .start_data_node(primary, None, options.primary_clock_offset_ms)
            .await;
        for index in 0..options.replicas {
            let offset = options
                .replica_clock_offset_ms
                .filter(|(i, _)| *i == index)
                .map(|(_, ms)| ms);
            topology
                .start_data_node(free_port(), Some(primary), offset)
                .await;
        }
        for replica in topology.data_ports().into_iter().skip(1) {
            topology
                .wait_for("the replica's link to be up", PATIENCE, async |t| {
                    let info = t.info_replication(replica).await?;
                    (info_field(&info, "master_link_status") == Some("up")).then_some(())
                })
                .await;
        }
        for _ in 0..SENTINELS {
            topology.start_sentinel(primary).await;
        }
        topology.wait_until_sentinels_ready(primary).await;
        // For a few hundred milliseconds after the Sentinels' first contact the replicas
        // are slow to acknowledge (a WAIT then times out): ready means that writes are
        // acknowledged by every replica several times in a row.
        let replicas = options.replicas;
        let in_a_row = std::cell::Cell::new(0);
        topology
            .wait_for("every replica to acknowledge writes", PATIENCE, async |t| {
                let mut write = redis::cmd("SET");
                write.arg("session-cache-test:ready").arg(in_a_row.get());
                t.ask::<()>(primary, &write).await.ok()?;
                let mut wait = redis::cmd("WAIT");
                wait.arg(replicas).arg(50);
                let acked: usize = t.ask(primary, &wait).await.ok()?;
                in_a_row.set(if acked >= replicas {
                    in_a_row.get() + 1
                } else {
                    0
                });
                (in_a_row.get() >= 5).then_some(())
            })
            .await;
        let _: Result<(), _> = topology
            .ask(primary, redis::cmd("DEL").arg("session-cache-test:ready"))
            .await;
        eprintln!(
            "sentinel topology: primary {primary}, replicas {:?}, sentinels {} ready in {:?}",
            &topology.data_ports()[1..],
            topology.sentinels(),
            started.elapsed()
        );
        topology
    }

    /// The service's `--redis-sentinels` value: `127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`.
    pub fn sentinels(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The Sentinels' ports.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The service's `--redis-sentinel-master` value.
    pub fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// Every data node's port, running or not: the initial primary first, then the
    /// replicas in order.
    pub fn data_ports(&self) -> Vec<u16> {
        self.data.iter().map(|n| n.port).collect()
    }

    /// The primary a majority of the Sentinels name (waits, bounded, while they
    /// disagree).
    pub async fn primary_port(&self) -> u16 {
        self.wait_for(
            "a majority of Sentinels to name one primary",
            PATIENCE,
            async |t| majority(&t.sentinel_views().await),
        )
        .await
    }

    /// A direct connection to the data node on `port`, to look at or plant keys
    /// (authenticated when the data nodes require a password).
    pub async fn conn(&self, port: u16) -> MultiplexedConnection {
        redis::Client::open(self.url(port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("data node {port} answers: {e}"))
    }

    /// The first element of `ROLE` on `port`: `master`, `slave` or `sentinel`; `None`
    /// when nothing answers there.
    pub async fn role(&self, port: u16) -> Option<String> {
        let mut role: Vec<redis::Value> = self.ask(port, &redis::cmd("ROLE")).await.ok()?;
        if role.is_empty() {
            return None;
        }
        redis::from_redis_value(role.swap_remove(0)).ok()
    }

    /// `INFO replication` of `port` as text (read fields with [`info_field`]); `None`
    /// when nothing answers there.
    pub async fn info_replication(&self, port: u16) -> Option<String> {
        self.ask(port, redis::cmd("INFO").arg("replication"))
            .await
            .ok()
    }

    /// `SENTINEL FAILOVER` (retried while a Sentinel refuses, as right after an earlier
    /// failover), then waits until a majority of Sentinels name another primary that
    /// answers ROLE as master. Returns its port; prints how long it took.
    pub async fn failover(&self) -> u16 {
        let started = Instant::now();
        let deadline = started + FAILOVER_PATIENCE;
        let mut attempt = 0;
        let old = loop {
            let old = self.primary_port().await;
            let sentinel = self.sentinels[attempt % SENTINELS].port;
            let answer: Result<String, String> = self
                .ask(
                    sentinel,
                    redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME),
                )
                .await;
            match answer {
                Ok(_) => break old,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "SENTINEL FAILOVER refused for {FAILOVER_PATIENCE:?}: {e}{}",
                    self.log_tails()
                ),
            }
            attempt += 1;
            tokio::time::sleep(POLL * 10).await;
        };
        let new = self.wait_for_primary_other_than(old, deadline).await;
        eprintln!(
            "sentinel topology: SENTINEL FAILOVER moved the primary {old} -> {new} in {:?}",
            started.elapsed()
        );
        new
    }

    /// SIGKILL of the primary the Sentinels name; returns its port for
    /// [`SentinelTopology::wait_for_new_primary`]. (Synchronous, so that the fault
    /// happens exactly where the test calls it.)
    pub fn kill_primary(&mut self) -> u16 {
        let views: Vec<Option<u16>> = self
            .sentinel_ports()
            .into_iter()
            .map(|port| sentinel_view_blocking(&self.url(port)))
            .collect();
        let primary = majority(&views)
            .unwrap_or_else(|| panic!("no majority of Sentinels names a primary: {views:?}"));
        self.kill(primary);
        primary
    }

    /// Waits (at most [`FAILOVER_PATIENCE`]) until a majority of Sentinels name a
    /// primary other than `old` that answers ROLE as master; returns its port and prints
    /// how long it took.
    pub async fn wait_for_new_primary(&self, old: u16) -> u16 {
        let started = Instant::now();
        let new = self
            .wait_for_primary_other_than(old, started + FAILOVER_PATIENCE)
            .await;
        eprintln!(
            "sentinel topology: primary {old} -> {new} after waiting {:?}",
            started.elapsed()
        );
        new
    }

    /// Waits (bounded) until the primary the Sentinels name answers ROLE as master and
    /// has at least `n` replicas online.
    pub async fn wait_until_replica_count(&self, n: usize) {
        self.wait_for(
            &format!("the primary to have {n} replicas online"),
            FAILOVER_PATIENCE,
            async |t| {
                let primary = majority(&t.sentinel_views().await)?;
                let info = t.info_replication(primary).await?;
                let online = info
                    .lines()
                    .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                    .count();
                (info_field(&info, "role") == Some("master") && online >= n).then_some(())
            },
        )
        .await;
    }

    /// SIGKILL of the data node on `port` (a no-op if it is not running).
    pub fn kill(&mut self, port: u16) {
        self.data
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("{port} is not a data node of this topology"))
            .kill();
    }

    /// Starts the data node on `port` again (killing it first if it runs), empty and as a
    /// primary of nothing, with its clock offset and the data arguments; the Sentinels
    /// make it a replica of the primary they name within seconds. Restarted before they
    /// have replaced it, a killed primary stays primary, and its replicas copy its empty
    /// dataset.
    pub async fn restart(&mut self, port: u16) {
        let offset = {
            let node = self
                .data
                .iter_mut()
                .find(|n| n.port == port)
                .unwrap_or_else(|| panic!("{port} is not a data node of this topology"));
            node.kill();
            node.clock_offset_ms
        };
        let child = self.spawn_data_node(port, None, offset);
        self.data.iter_mut().find(|n| n.port == port).unwrap().child = Some(child);
        self.wait_until_answers(port).await;
    }

    async fn start_data_node(&mut self, port: u16, replica_of: Option<u16>, offset: Option<i64>) {
        let child = self.spawn_data_node(port, replica_of, offset);
        self.data.push(Node {
            port,
            child: Some(child),
            clock_offset_ms: offset,
        });
        self.wait_until_answers(port).await;
    }

    fn spawn_data_node(&self, port: u16, replica_of: Option<u16>, offset: Option<i64>) -> Child {
        let dir = self.dir.path().join(format!("node-{port}"));
        fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(self.log_path(port))
            // Diskless full syncs start at once instead of after 5 s.
            .args(["--repl-diskless-sync-delay", "0"]);
        if let Some(primary) = replica_of {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        if let Some(password) = self.data_password {
            command
                .args(["--requirepass", password])
                .args(["--masterauth", password]);
        }
        command.args(self.data_args);
        if let Some(ms) = offset {
            command
                .env("LD_PRELOAD", clock_shim())
                .env(SKEW_VAR, ms.to_string());
        }
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (Debian package redis-server)")
    }

    async fn start_sentinel(&mut self, primary: u16) {
        let port = free_port();
        let dir = self.dir.path().join(format!("sentinel-{port}"));
        fs::create_dir_all(&dir).unwrap();
        // The Sentinel rewrites this file as it learns the topology.
        let config = dir.join("sentinel.conf");
        let mut auth = String::new();
        if let Some(password) = self.data_password {
            auth += &format!("sentinel auth-pass {MASTER_NAME} {password}\n");
        }
        if let Some(password) = self.sentinel_password {
            // The other Sentinels require it too: without sentinel-pass they cannot ask
            // each other whether the primary is down, and no failover starts.
            auth += &format!("requirepass {password}\nsentinel sentinel-pass {password}\n");
        }
        fs::write(
            &config,
            format!(
                "port {port}\n\
                 bind 127.0.0.1\n\
                 daemonize no\n\
                 dir {dir}\n\
                 logfile {log}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} {QUORUM}\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n\
                 {auth}",
                dir = dir.display(),
                log = self.log_path(port).display(),
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&config)
            .args(["--sentinel", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (Debian package redis-server)");
        self.sentinels.push(Node {
            port,
            child: Some(child),
            clock_offset_ms: None,
        });
        self.wait_until_answers(port).await;
        let mut debug = redis::cmd("SENTINEL");
        debug.arg("DEBUG");
        for (name, value) in SENTINEL_DEBUG {
            debug.arg(*name).arg(*value);
        }
        let _: String = self
            .ask(port, &debug)
            .await
            .unwrap_or_else(|e| panic!("SENTINEL DEBUG on {port}: {e}"));
    }

    /// Waits until the process on `port` answers PING and is the one this topology
    /// started there (not another test's on a port that was free a moment ago).
    async fn wait_until_answers(&mut self, port: u16) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let node = self
                .data
                .iter_mut()
                .chain(self.sentinels.iter_mut())
                .find(|n| n.port == port)
                .unwrap();
            let child = node.child.as_mut().unwrap();
            let pid = child.id().to_string();
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                panic!(
                    "redis-server on {port} exited with {status}:\n{}",
                    tail(&self.log_path(port), 10)
                );
            }
            let info: Result<String, String> =
                self.ask(port, redis::cmd("INFO").arg("server")).await;
            if info
                .as_deref()
                .is_ok_and(|i| info_field(i, "process_id") == Some(pid.as_str()))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {port}: {info:?}\n{}",
                tail(&self.log_path(port), 10)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_until_sentinels_ready(&self, primary: u16) {
        let replicas = self.data.len() - 1;
        for sentinel in self.sentinel_ports() {
            self.wait_for(
                &format!("Sentinel {sentinel} to know {replicas} replicas and 2 Sentinels"),
                PATIENCE,
                async |t| {
                    let master: Vec<String> = t
                        .ask(
                            sentinel,
                            redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME),
                        )
                        .await
                        .ok()?;
                    let master = pairs(master);
                    let known: Vec<Vec<String>> = t
                        .ask(
                            sentinel,
                            redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME),
                        )
                        .await
                        .ok()?;
                    let linked = known
                        .into_iter()
                        .map(pairs)
                        .filter(|r| {
                            field(r, "flags") == "slave"
                                && field(r, "master-link-status") == "ok"
                                && field(r, "master-port") == primary.to_string()
                        })
                        .count();
                    (field(&master, "flags") == "master"
                        && field(&master, "port") == primary.to_string()
                        && field(&master, "num-other-sentinels") == (SENTINELS - 1).to_string()
                        && linked == replicas)
                        .then_some(())
                },
            )
            .await;
        }
    }

    async fn wait_for_primary_other_than(&self, old: u16, deadline: Instant) -> u16 {
        let patience = deadline.saturating_duration_since(Instant::now());
        self.wait_for(
            &format!("a majority of Sentinels to name a primary other than {old}"),
            patience,
            async |t| {
                let new = majority(&t.sentinel_views().await).filter(|p| *p != old)?;
                (t.role(new).await.as_deref() == Some("master")).then_some(new)
            },
        )
        .await
    }

    /// Each Sentinel's answer to GET-MASTER-ADDR-BY-NAME (`None`: no answer).
    async fn sentinel_views(&self) -> Vec<Option<u16>> {
        let mut views = Vec::new();
        for port in self.sentinel_ports() {
            let addr: Result<Option<(String, String)>, String> = self
                .ask(
                    port,
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(MASTER_NAME),
                )
                .await;
            views.push(addr.ok().flatten().and_then(|(_, p)| p.parse().ok()));
        }
        views
    }

    /// Polls `check` every [`POLL`] until it gives a value, at most `patience`; the panic
    /// names `what` and shows the end of each Sentinel's log.
    async fn wait_for<T>(
        &self,
        what: &str,
        patience: Duration,
        check: impl AsyncFn(&SentinelTopology) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(value) = check(self).await {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "waited {patience:?} for {what}{}",
                self.log_tails()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// One command to `port`, on the connection kept for it (see [`Links::ask`]).
    async fn ask<T: redis::FromRedisValue>(
        &self,
        port: u16,
        cmd: &redis::Cmd,
    ) -> Result<T, String> {
        self.links.ask(port, &self.url(port), cmd).await
    }

    /// The URL of the node on `port`, with the password it requires (a Sentinel's own,
    /// or the data nodes').
    fn url(&self, port: u16) -> String {
        let password = if self.sentinels.iter().any(|s| s.port == port) {
            self.sentinel_password
        } else {
            self.data_password
        };
        match password {
            Some(password) => format!("redis://:{}@127.0.0.1:{port}", percent_encoded(password)),
            None => format!("redis://127.0.0.1:{port}"),
        }
    }

    fn log_path(&self, port: u16) -> PathBuf {
        self.dir.path().join(format!("redis-{port}.log"))
    }

    fn log_tails(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| {
                format!(
                    "\n-- Sentinel {} --\n{}",
                    s.port,
                    tail(&self.log_path(s.port), 12)
                )
            })
            .collect()
    }
}

impl Drop for SentinelTopology {
    fn drop(&mut self) {
        // Sentinels first, so that none reconfigures a data node on its way down.
        for node in self.sentinels.iter_mut().chain(self.data.iter_mut()) {
            node.kill();
        }
    }
}

/// The value of `field` in INFO text (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim_end)
    })
}

/// `text` as a URL's userinfo may carry it: everything but unreserved characters
/// percent-encoded.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A Sentinel's primary, asked without async (for the synchronous kill) at `url` (see
/// [`SentinelTopology::url`]).
fn sentinel_view_blocking(url: &str) -> Option<u16> {
    let mut conn = redis::Client::open(url)
        .ok()?
        .get_connection_with_timeout(ANSWER)
        .ok()?;
    conn.set_read_timeout(Some(ANSWER)).ok()?;
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(MASTER_NAME)
        .query(&mut conn)
        .ok()?;
    addr?.1.parse().ok()
}

/// The port more than half of `views` name.
fn majority(views: &[Option<u16>]) -> Option<u16> {
    views
        .iter()
        .flatten()
        .copied()
        .find(|p| views.iter().filter(|v| **v == Some(*p)).count() * 2 > views.len())
}

/// A Sentinel reply's flat `[key, value, key, value, …]` as a map.
fn pairs(flat: Vec<String>) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let mut items = flat.into_iter();
    while let (Some(key), Some(value)) = (items.next(), items.next()) {
        map.insert(key, value);
    }
    map
}

fn field<'a>(map: &'a HashMap<String, String>, key: &str) -> &'a str {
    map.get(key).map(String::as_str).unwrap_or("")
}

/// The last `lines` lines of a log, for a failure message.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Shifts the wall clock by `SESSION_CACHE_TEST_CLOCK_SKEW_MS` milliseconds. Calls the
/// kernel directly rather than the next `clock_gettime`: looking that up with `dlsym`
/// allocates, and jemalloc's first allocation reads the clock, which is how libfaketime
/// deadlocks redis-server.
const CLOCK_SHIM: &str = r#"
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long skew_ns;

__attribute__((constructor)) static void skew_init(void) {
    const char *ms = getenv("SESSION_CACHE_TEST_CLOCK_SKEW_MS");
    skew_ns = ms ? atoll(ms) * 1000000LL : 0;
}

int skewed_clock_gettime(clockid_t clock, struct timespec *ts) __asm__("clock_gettime");
int skewed_clock_gettime(clockid_t clock, struct timespec *ts) {
    long r = syscall(SYS_clock_gettime, clock, ts);
    if (r == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) {
        long long ns = (long long)ts->tv_nsec + skew_ns;
        long long sec = ns / 1000000000LL;
        ns %= 1000000000LL;
        if (ns < 0) {
            ns += 1000000000LL;
            sec -= 1;
        }
        ts->tv_sec += sec;
        ts->tv_nsec = ns;
    }
    return (int)r;
}

int skewed_gettimeofday(struct timeval *tv, void *tz) __asm__("gettimeofday");
int skewed_gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (skewed_clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    if (tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return 0;
}

time_t skewed_time(time_t *t) __asm__("time");
time_t skewed_time(time_t *t) {
    struct timespec ts;
    if (skewed_clock_gettime(CLOCK_REALTIME, &ts) != 0) return (time_t)-1;
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}
"#;

/// The clock shim, compiled with `cc` into Cargo's temporary directory for integration
/// tests once (named by a hash of its source), and reused by later runs.
fn clock_shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        CLOCK_SHIM.hash(&mut hasher);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let shim = dir.join(format!("clock-skew-{:016x}.so", hasher.finish()));
        if shim.exists() {
            return shim;
        }
        // Built under a name of this process's own, then renamed: other test binaries
        // may be building it at the same time.
        let pid = std::process::id();
        let source = dir.join(format!("clock-skew-{pid}.c"));
        let built = dir.join(format!("clock-skew-{pid}.so.tmp"));
        fs::write(&source, CLOCK_SHIM).unwrap();
        let output = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
            .arg(&built)
            .arg(&source)
            .output()
            .expect("a C compiler (cc) builds the clock shim");
        let _ = fs::remove_file(&source);
        assert!(
            output.status.success(),
            "cc failed on the clock shim: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        fs::rename(&built, &shim).unwrap();
        shim
    })
}
