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
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use bb8_redis::redis::{self, aio::MultiplexedConnection};
use tokio::time::Instant;

use super::{
    Harness, free_port,
    nodes::{ANSWER, Nodes, addresses},
    pki::Dir,
    poll::PATIENCE,
    redis_server::{Options, Redis, Role, info_field},
    stored_on_primary,
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

/// The running topology; dropping it kills every process and removes its directory.
pub struct SentinelTopology {
    nodes: Nodes,
    data_args: &'static [&'static str],
    data_password: Option<&'static str>,
    sentinel_password: Option<&'static str>,
    dir: Dir,
}

impl SentinelTopology {
    /// Waits (at most [`FAILOVER_PATIENCE`]) until a Set of the test's own `probe` token
    /// through `h` answers STORED and the entry is on the node the Sentinels name as
    /// primary; returns when the Set answered.
    pub async fn first_stored(&self, h: &mut Harness, probe: &str) -> Instant {
        stored_on_primary(h, probe, FAILOVER_PATIENCE, async |key| {
            let primary = self.primary_port().await;
            self.nodes.ask(primary, redis::cmd("EXISTS").arg(key)).await
        })
        .await
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
            nodes: Nodes::default(),
            data_args: options.data_args,
            data_password: options.data_password,
            sentinel_password: options.sentinel_password,
            dir: Dir::new(),
        };
        let primary = free_port();
        topology
            .start_data_node(primary, Role::Plain, options.primary_clock_offset_ms)
            .await;
        for index in 0..options.replicas {
            let offset = options
                .replica_clock_offset_ms
                .filter(|(i, _)| *i == index)
                .map(|(_, ms)| ms);
            topology
                .start_data_node(free_port(), Role::Replica { of: primary }, offset)
                .await;
        }
        for replica in topology.data_ports().into_iter().skip(1) {
            topology
                .nodes
                .wait_for("the replica's link to be up", PATIENCE, async || {
                    let info = topology.info_replication(replica).await;
                    match info
                        .as_deref()
                        .and_then(|i| info_field(i, "master_link_status"))
                    {
                        Some("up") => Ok(()),
                        other => Err(format!("master_link_status {other:?}")),
                    }
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
        let mut in_a_row = 0;
        topology
            .nodes
            .wait_for(
                "every replica to acknowledge writes",
                PATIENCE,
                async || {
                    let mut write = redis::cmd("SET");
                    write.arg("session-cache-test:ready").arg(in_a_row);
                    topology.nodes.ask::<()>(primary, &write).await?;
                    let mut wait = redis::cmd("WAIT");
                    wait.arg(replicas).arg(50);
                    let acked: usize = topology.nodes.ask(primary, &wait).await?;
                    in_a_row = if acked >= replicas { in_a_row + 1 } else { 0 };
                    if in_a_row >= 5 {
                        Ok(())
                    } else {
                        Err(format!(
                            "{acked} of {replicas} acknowledged, {in_a_row} in a row"
                        ))
                    }
                },
            )
            .await;
        let _: Result<(), _> = topology
            .nodes
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
        addresses(&self.sentinel_ports())
    }

    /// The Sentinels' ports.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.nodes.ports_of_sentinels(true)
    }

    /// The service's `--redis-sentinel-master` value.
    pub fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// Every data node's port, running or not: the initial primary first, then the
    /// replicas in order.
    pub fn data_ports(&self) -> Vec<u16> {
        self.nodes.ports_of_sentinels(false)
    }

    /// The primary a majority of the Sentinels name (waits, bounded, while they
    /// disagree).
    pub async fn primary_port(&self) -> u16 {
        self.nodes
            .wait_for(
                "a majority of Sentinels to name one primary",
                PATIENCE,
                async || {
                    let views = self.sentinel_views().await;
                    majority(&views).ok_or(views)
                },
            )
            .await
    }

    /// A direct connection to the data node on `port`, to look at or plant keys
    /// (authenticated when the data nodes require a password).
    pub async fn conn(&self, port: u16) -> MultiplexedConnection {
        self.nodes.get(port).conn().await
    }

    /// The first element of `ROLE` on `port`: `master`, `slave` or `sentinel`; `None`
    /// when nothing answers there.
    pub async fn role(&self, port: u16) -> Option<String> {
        self.nodes.role(port).await
    }

    /// `INFO replication` of `port` as text (read fields with [`info_field`]); `None`
    /// when nothing answers there.
    pub async fn info_replication(&self, port: u16) -> Option<String> {
        self.nodes.info(port, "replication").await
    }

    /// `SENTINEL FAILOVER` (retried while a Sentinel refuses, as right after an earlier
    /// failover), then waits until a majority of Sentinels name another primary that
    /// answers ROLE as master. Returns its port; prints how long it took.
    pub async fn failover(&self) -> u16 {
        let started = Instant::now();
        let mut attempt = 0;
        let old = self
            .nodes
            .wait_for(
                "a Sentinel to accept SENTINEL FAILOVER",
                FAILOVER_PATIENCE,
                async || {
                    let old = self.primary_port().await;
                    let sentinel = self.sentinel_ports()[attempt % SENTINELS];
                    attempt += 1;
                    let answer: Result<String, String> = self
                        .nodes
                        .ask(
                            sentinel,
                            redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME),
                        )
                        .await;
                    answer.map(|_| old)
                },
            )
            .await;
        self.new_primary_since(old, started, "SENTINEL FAILOVER")
            .await
    }

    /// SIGKILL of the primary the Sentinels name; returns its port for
    /// [`SentinelTopology::wait_for_new_primary`]. (Synchronous, so that the fault
    /// happens exactly where the test calls it.)
    pub fn kill_primary(&mut self) -> u16 {
        let views: Vec<Option<u16>> = self
            .sentinel_ports()
            .into_iter()
            .map(|port| sentinel_view_blocking(&self.nodes.get(port).url()))
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
        self.new_primary_since(old, Instant::now(), "a wait").await
    }

    /// Waits (bounded) until the primary the Sentinels name answers ROLE as master and
    /// has at least `n` replicas online.
    pub async fn wait_until_replica_count(&self, n: usize) {
        self.nodes
            .wait_for(
                &format!("the primary to have {n} replicas online"),
                FAILOVER_PATIENCE,
                async || {
                    let views = self.sentinel_views().await;
                    let primary = majority(&views).ok_or(format!("Sentinels name {views:?}"))?;
                    let info = self
                        .info_replication(primary)
                        .await
                        .ok_or(format!("no INFO from {primary}"))?;
                    let online = info
                        .lines()
                        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                        .count();
                    let role = info_field(&info, "role");
                    if role == Some("master") && online >= n {
                        Ok(())
                    } else {
                        Err(format!("{primary}: role {role:?}, {online} online"))
                    }
                },
            )
            .await;
    }

    /// SIGKILL of the data node on `port` (a no-op if it is not running).
    pub fn kill(&mut self, port: u16) {
        self.assert_data_node(port);
        self.nodes.kill(port);
    }

    /// Starts the data node on `port` again (killing it first if it runs), empty and as a
    /// primary of nothing, with its clock offset and the data arguments; the Sentinels
    /// make it a replica of the primary they name within seconds. Restarted before they
    /// have replaced it, a killed primary stays primary, and its replicas copy its empty
    /// dataset.
    pub async fn restart(&mut self, port: u16) {
        self.assert_data_node(port);
        self.nodes.restart_as(port, Role::Plain).await;
    }

    fn assert_data_node(&self, port: u16) {
        assert!(
            self.data_ports().contains(&port),
            "{port} is not a data node of this topology"
        );
    }

    async fn start_data_node(&mut self, port: u16, role: Role, clock_offset_ms: Option<i64>) {
        let mut options = Options::new(role).args(self.data_args);
        options.port = port;
        options.parent = Some(self.dir.path().to_path_buf());
        if let Some(password) = self.data_password {
            options = options.args(&["--requirepass", password, "--masterauth", password]);
            options.auth = Some((None, password.to_string()));
        }
        if let Some(ms) = clock_offset_ms {
            options.env = vec![
                ("LD_PRELOAD".into(), clock_shim().display().to_string()),
                (SKEW_VAR.into(), ms.to_string()),
            ];
        }
        self.nodes.push(Redis::start_as(options).await);
    }

    async fn start_sentinel(&mut self, primary: u16) {
        let mut auth = String::new();
        if let Some(password) = self.data_password {
            auth += &format!("sentinel auth-pass {MASTER_NAME} {password}\n");
        }
        if let Some(password) = self.sentinel_password {
            // The other Sentinels require it too: without sentinel-pass they cannot ask
            // each other whether the primary is down, and no failover starts.
            auth += &format!("requirepass {password}\nsentinel sentinel-pass {password}\n");
        }
        let config = format!(
            "sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} {QUORUM}\n\
             sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n\
             {auth}"
        );
        let mut options = Options::new(Role::Sentinel { config });
        options.parent = Some(self.dir.path().to_path_buf());
        options.auth = self.sentinel_password.map(|p| (None, p.to_string()));
        let sentinel = Redis::start_as(options).await;
        let port = sentinel.port();
        self.nodes.push(sentinel);
        let mut debug = redis::cmd("SENTINEL");
        debug.arg("DEBUG");
        for (name, value) in SENTINEL_DEBUG {
            debug.arg(*name).arg(*value);
        }
        let _: String = self
            .nodes
            .ask(port, &debug)
            .await
            .unwrap_or_else(|e| panic!("SENTINEL DEBUG on {port}: {e}"));
    }

    async fn wait_until_sentinels_ready(&self, primary: u16) {
        let replicas = self.data_ports().len() - 1;
        for sentinel in self.sentinel_ports() {
            self.nodes
                .wait_for(
                    &format!("Sentinel {sentinel} to know {replicas} replicas and 2 Sentinels"),
                    PATIENCE,
                    async || {
                        let master: Vec<String> = self
                            .nodes
                            .ask(
                                sentinel,
                                redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME),
                            )
                            .await?;
                        let master = pairs(master);
                        let known: Vec<Vec<String>> = self
                            .nodes
                            .ask(
                                sentinel,
                                redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME),
                            )
                            .await?;
                        let linked = known
                            .into_iter()
                            .map(pairs)
                            .filter(|r| {
                                field(r, "flags") == "slave"
                                    && field(r, "master-link-status") == "ok"
                                    && field(r, "master-port") == primary.to_string()
                            })
                            .count();
                        let ready = field(&master, "flags") == "master"
                            && field(&master, "port") == primary.to_string()
                            && field(&master, "num-other-sentinels") == (SENTINELS - 1).to_string()
                            && linked == replicas;
                        if ready {
                            Ok(())
                        } else {
                            Err(format!("{linked} replicas linked; master {master:?}"))
                        }
                    },
                )
                .await;
        }
    }

    /// Waits until a majority of Sentinels name a primary other than `old` that answers
    /// ROLE as master, at most [`FAILOVER_PATIENCE`] from `started`; returns its port and
    /// prints how long it took since then, and after what.
    async fn new_primary_since(&self, old: u16, started: Instant, after: &str) -> u16 {
        let patience = FAILOVER_PATIENCE.saturating_sub(started.elapsed());
        let new = self
            .nodes
            .wait_for(
                &format!("a majority of Sentinels to name a primary other than {old}"),
                patience,
                async || {
                    let views = self.sentinel_views().await;
                    let new = majority(&views)
                        .filter(|p| *p != old)
                        .ok_or(format!("Sentinels name {views:?}"))?;
                    match self.role(new).await.as_deref() {
                        Some("master") => Ok(new),
                        role => Err(format!("{new} answers ROLE {role:?}")),
                    }
                },
            )
            .await;
        eprintln!(
            "sentinel topology: primary {old} -> {new}, {:?} after {after} began",
            started.elapsed()
        );
        new
    }

    /// Each Sentinel's answer to GET-MASTER-ADDR-BY-NAME (`None`: no answer).
    async fn sentinel_views(&self) -> Vec<Option<u16>> {
        let mut views = Vec::new();
        for port in self.sentinel_ports() {
            let addr: Result<Option<(String, String)>, String> = self
                .nodes
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
}

impl Drop for SentinelTopology {
    fn drop(&mut self) {
        // Sentinels first, so that none reconfigures a data node on its way down.
        for port in self.sentinel_ports().into_iter().chain(self.data_ports()) {
            self.nodes.kill(port);
        }
    }
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
