//! A Redis Cluster of real processes on loopback ports: three primaries (or as many as
//! asked), each with zero or one replica, joined by `redis-cli --cluster create`, that a
//! test can kill a node of, wait for the failover of, and reshard while it runs load, and
//! whose slot map tells which primary serves a key.
//!
//! Every node also listens on its cluster bus port, its own port plus 10000, so the ports
//! are chosen below 55536 with both free. Fast by design: `cluster-node-timeout` 1000, so
//! that a primary is marked failed and its replica promoted within a few seconds, and
//! diskless full syncs that start at once, so that a replica links up without delay.
//!
//! [`ClusterTopology::start`] returns a settled cluster: every node says
//! `cluster_state:ok`, every node tells the same slot map, and every replica's link is
//! up. Waits are bounded polls of a real condition, never fixed sleeps.

use std::{
    collections::{HashMap, HashSet},
    net::TcpListener,
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::Duration,
};

use bb8_redis::redis::{self, aio::MultiplexedConnection};
use tokio::{task::JoinHandle, time::Instant};

use super::{
    Harness,
    nodes::{Nodes, addresses},
    pki::Dir,
    poll::PATIENCE,
    redis_server::{Options, Redis, Role, info_field},
    stored_on_primary,
};

/// The longest a failover may take, from the kill to a settled cluster without the
/// killed primary.
pub const FAILOVER_PATIENCE: Duration = Duration::from_secs(20);
/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

const NODE_TIMEOUT_MS: u64 = 1000;
/// The cluster bus listens on the node's port plus this.
const BUS_OFFSET: u16 = 10000;

/// What to start; `Cluster::default()` is three primaries without replicas.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Primaries: at least 3 (Redis Cluster needs a majority of primaries to fail over).
    pub primaries: usize,
    /// Replicas of each primary: 0 or 1.
    pub replicas_per_primary: usize,
}

impl Default for Cluster {
    fn default() -> Cluster {
        Cluster {
            primaries: 3,
            replicas_per_primary: 0,
        }
    }
}

/// One range of slots, `first..=last`, and the port of the primary that serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub primary: u16,
}

/// The running cluster; dropping it kills and reaps every node and removes its directory.
pub struct ClusterTopology {
    nodes: Nodes,
    dir: Dir,
    /// The slot map and each replica's primary (ports) when the cluster last settled.
    settled: Mutex<(Vec<SlotRange>, HashMap<u16, u16>)>,
}

/// A `redis-cli --cluster reshard` running in the background; [`Reshard::finish`] waits
/// for it.
pub struct Reshard {
    task: JoinHandle<(Output, Duration)>,
    slots: u32,
    from: u16,
    to: u16,
}

impl Reshard {
    /// Waits until `redis-cli` exits (panicking with its output if it failed), then until
    /// the cluster is settled; returns how long `redis-cli` ran.
    pub async fn finish(self, topology: &ClusterTopology) -> Duration {
        let (output, took) = self.task.await.expect("the redis-cli task");
        assert!(
            output.status.success(),
            "redis-cli --cluster reshard {} slots {} -> {} failed ({}):\n{}",
            self.slots,
            self.from,
            self.to,
            output.status,
            tail_text(&output, 20)
        );
        topology.wait_until_settled(PATIENCE, None).await;
        eprintln!(
            "cluster topology: resharded {} slots {} -> {} in {took:?}",
            self.slots, self.from, self.to
        );
        took
    }
}

impl ClusterTopology {
    /// Starts every node, joins them with `redis-cli --cluster create` and waits until
    /// the cluster is settled with `options.primaries` primaries, each with
    /// `options.replicas_per_primary` replicas linked.
    pub async fn start(options: Cluster) -> ClusterTopology {
        assert!(options.primaries >= 3, "a cluster has 3 primaries or more");
        assert!(
            options.replicas_per_primary <= 1,
            "a cluster has 0 or 1 replica per primary"
        );
        let started = Instant::now();
        let count = options.primaries * (1 + options.replicas_per_primary);
        let mut topology = ClusterTopology {
            nodes: Nodes::default(),
            dir: Dir::new(),
            settled: Mutex::default(),
        };
        for port in cluster_ports(count) {
            let mut options = Options::new(Role::ClusterNode {
                node_timeout_ms: NODE_TIMEOUT_MS,
            });
            options.port = port;
            options.parent = Some(topology.dir.path().to_path_buf());
            // Every node starts at once; then each is waited for.
            topology.nodes.push(Redis::spawn(options));
        }
        for node in topology.nodes.iter_mut() {
            node.wait_until_answers().await;
        }
        let nodes: Vec<String> = topology
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let create = format!(
            "create {} --cluster-replicas {}",
            nodes.join(" "),
            options.replicas_per_primary
        );
        let (output, _) = redis_cli(create).await.expect("the redis-cli task");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed ({}):\n{}",
            output.status,
            tail_text(&output, 20)
        );
        let want = (options.primaries, options.replicas_per_primary);
        topology.wait_until_settled(PATIENCE, Some(want)).await;
        eprintln!(
            "cluster topology: primaries {:?}, {} nodes, ready in {:?}",
            topology.primaries().await,
            count,
            started.elapsed()
        );
        topology
    }

    /// The service's `--redis-cluster-nodes` value: every node as started,
    /// `127.0.0.1:p1,127.0.0.1:p2,…`.
    pub fn seeds(&self) -> String {
        addresses(&self.ports())
    }

    /// Every node's port, running or not, in the order they were started.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.ports()
    }

    /// The ports of the primaries that serve slots now (as a running node tells), sorted.
    pub async fn primaries(&self) -> Vec<u16> {
        let mut primaries: Vec<u16> = self.slot_map().await.iter().map(|r| r.primary).collect();
        primaries.sort_unstable();
        primaries.dedup();
        primaries
    }

    /// `CLUSTER SLOTS` of a running node: which primary serves which slots, sorted.
    pub async fn slot_map(&self) -> Vec<SlotRange> {
        let port = self.any_running();
        self.ask_slot_map(port)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER SLOTS on {port}: {e}"))
    }

    /// The port of the primary that serves `key`'s slot (`CLUSTER KEYSLOT`, then
    /// `CLUSTER SLOTS`, on a running node).
    pub async fn primary_for_key(&self, key: &str) -> u16 {
        let port = self.any_running();
        let slot: u16 = self
            .nodes
            .ask(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT on {port}: {e}"));
        self.primary_for_slot(slot).await
    }

    /// `CLUSTER KEYSLOT` of each key, in one pipeline to a running node.
    pub async fn key_slots(&self, keys: &[String]) -> Vec<u16> {
        let port = self.any_running();
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("CLUSTER").arg("KEYSLOT").arg(key);
        }
        pipe.query_async(&mut self.conn(port).await)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT on {port}: {e}"))
    }

    /// The port of the primary that serves each key now, in order.
    pub async fn primaries_for_keys(&self, keys: &[String]) -> Vec<u16> {
        let map = self.slot_map().await;
        self.key_slots(keys)
            .await
            .into_iter()
            .map(|slot| serving(&map, slot))
            .collect()
    }

    /// Waits (at most [`FAILOVER_PATIENCE`]) until a Set of the test's own `probe` token
    /// through `h` answers STORED and the entry is on the primary that serves its slot
    /// now; returns when the Set answered.
    pub async fn first_stored(&self, h: &mut Harness, probe: &str) -> Instant {
        stored_on_primary(h, probe, FAILOVER_PATIENCE, async |key| {
            let port = self.primary_for_key(key).await;
            self.nodes.ask(port, redis::cmd("EXISTS").arg(key)).await
        })
        .await
    }

    /// The port of the primary that serves `slot`, as a running node tells.
    pub async fn primary_for_slot(&self, slot: u16) -> u16 {
        serving(&self.slot_map().await, slot)
    }

    /// A direct connection to the node on `port`, to look at or plant keys (it follows
    /// no redirection).
    pub async fn conn(&self, port: u16) -> MultiplexedConnection {
        self.nodes.get(port).conn().await
    }

    /// `CLUSTER INFO` of `port` as text (read fields with [`info_field`]); `None` when
    /// nothing answers there.
    pub async fn cluster_info(&self, port: u16) -> Option<String> {
        self.nodes
            .ask(port, redis::cmd("CLUSTER").arg("INFO"))
            .await
            .ok()
    }

    /// SIGKILL of the node on `port`, reaped (a no-op if it is not running).
    /// Synchronous, so that the fault happens exactly where the test calls it.
    pub fn kill(&mut self, port: u16) {
        self.nodes.kill(port);
    }

    /// SIGSTOP of the node on `port`: it keeps its connections and answers nothing.
    pub fn freeze(&self, port: u16) {
        self.nodes.get(port).freeze();
    }

    /// SIGCONT of a node that [`ClusterTopology::freeze`] stopped.
    pub fn thaw(&self, port: u16) {
        self.nodes.get(port).thaw();
    }

    /// Waits (at most [`FAILOVER_PATIENCE`]) until a replica of the killed primary `old`
    /// (as the cluster last settled) answers ROLE as master and serves every slot `old`
    /// served, and the cluster is settled on every running node; returns its port and
    /// prints how long it took.
    pub async fn wait_for_failover(&self, old: u16) -> u16 {
        let started = Instant::now();
        let (old_map, replica_of) = self.settled.lock().unwrap().clone();
        let old_ranges: Vec<SlotRange> = old_map.into_iter().filter(|r| r.primary == old).collect();
        assert!(
            !old_ranges.is_empty(),
            "{old} served no slots when the cluster last settled"
        );
        let replicas: Vec<u16> = replica_of
            .iter()
            .filter(|(_, primary)| **primary == old)
            .map(|(replica, _)| *replica)
            .collect();
        assert!(
            !replicas.is_empty(),
            "{old} had no replica when the cluster last settled"
        );
        let new = self
            .nodes
            .wait_for(
                &format!("a replica of {old} ({replicas:?}) to take over its slots"),
                FAILOVER_PATIENCE,
                async || {
                    let mut seen = Vec::new();
                    for &replica in &replicas {
                        let map = match self.ask_slot_map(replica).await {
                            Ok(map) => map,
                            Err(e) => {
                                seen.push(format!("{replica}: {e}"));
                                continue;
                            }
                        };
                        let serves = old_ranges.iter().all(|old| {
                            map.iter().any(|r| {
                                r.primary == replica && r.first <= old.first && old.last <= r.last
                            })
                        });
                        let role = self.role(replica).await;
                        if serves && role.as_deref() == Some("master") {
                            return Ok(replica);
                        }
                        seen.push(format!("{replica}: ROLE {role:?}, serves them: {serves}"));
                    }
                    Err(seen)
                },
            )
            .await;
        let patience = FAILOVER_PATIENCE.saturating_sub(started.elapsed());
        self.wait_until_settled(patience, None).await;
        eprintln!(
            "cluster topology: primary {old} -> {new} after waiting {:?}",
            started.elapsed()
        );
        new
    }

    /// The first element of `ROLE` on `port`: `master` or `slave`; `None` when nothing
    /// answers there.
    pub async fn role(&self, port: u16) -> Option<String> {
        self.nodes.role(port).await
    }

    /// Starts `redis-cli --cluster reshard` moving `slots` slots from the primary on
    /// `from` to the primary on `to` (node ids from `CLUSTER MYID`), in the background,
    /// so that the test can run load meanwhile; [`Reshard::finish`] waits for it.
    pub async fn reshard(&self, from: u16, to: u16, slots: u32) -> Reshard {
        let from_id = self.my_id(from).await;
        let to_id = self.my_id(to).await;
        let task = redis_cli(format!(
            "reshard 127.0.0.1:{from} --cluster-from {from_id} --cluster-to {to_id} \
             --cluster-slots {slots}"
        ));
        Reshard {
            task,
            slots,
            from,
            to,
        }
    }

    /// `CLUSTER MYID` of the node on `port`.
    async fn my_id(&self, port: u16) -> String {
        self.nodes
            .ask(port, redis::cmd("CLUSTER").arg("MYID"))
            .await
            .unwrap_or_else(|e| panic!("CLUSTER MYID on {port}: {e}"))
    }

    /// Waits until every running node says `cluster_state:ok` and tells the same slot
    /// map, covering every slot, and every running replica's link is up; with
    /// `shape = Some((primaries, replicas))`, also that the map names that many primaries,
    /// each with that many replicas.
    pub async fn wait_until_settled(&self, patience: Duration, shape: Option<(usize, usize)>) {
        self.nodes
            .wait_for("the cluster to settle", patience, async || {
                let mut maps = Vec::new();
                for port in self.nodes.running() {
                    let info = self
                        .cluster_info(port)
                        .await
                        .ok_or(format!("{port}: no answer"))?;
                    let state = info_field(&info, "cluster_state");
                    if state != Some("ok") {
                        return Err(format!("{port}: cluster_state {state:?}"));
                    }
                    let replication: String = self
                        .nodes
                        .ask(port, redis::cmd("INFO").arg("replication"))
                        .await?;
                    let link = info_field(&replication, "master_link_status");
                    if info_field(&replication, "role") == Some("slave") && link != Some("up") {
                        return Err(format!("{port}: master_link_status {link:?}"));
                    }
                    maps.push(self.ask_slot_map(port).await?);
                }
                let first = maps.first().ok_or("no node runs")?;
                let covered: usize = first
                    .iter()
                    .map(|r| usize::from(r.last - r.first) + 1)
                    .sum();
                if covered != usize::from(SLOTS) || maps.iter().any(|m| m != first) {
                    return Err(format!("{covered} slots covered; slot maps {maps:?}"));
                }
                let nodes: String = self
                    .nodes
                    .ask(self.nodes.running()[0], redis::cmd("CLUSTER").arg("NODES"))
                    .await?;
                let replica_of = replica_of(&nodes).ok_or(format!("CLUSTER NODES: {nodes}"))?;
                if let Some((primaries, replicas)) = shape {
                    let per_primary = |p: &u16| replica_of.values().filter(|q| *q == p).count();
                    let distinct: HashSet<u16> = first.iter().map(|r| r.primary).collect();
                    if distinct.len() != primaries
                        || distinct.iter().any(|p| per_primary(p) != replicas)
                    {
                        return Err(format!(
                            "primaries {distinct:?}, replicas of each {replica_of:?}"
                        ));
                    }
                }
                *self.settled.lock().unwrap() = (first.clone(), replica_of);
                Ok(())
            })
            .await;
    }

    /// `CLUSTER SLOTS` of `port`, as sorted ranges.
    async fn ask_slot_map(&self, port: u16) -> Result<Vec<SlotRange>, String> {
        let reply: Vec<Vec<redis::Value>> = self
            .nodes
            .ask(port, redis::cmd("CLUSTER").arg("SLOTS"))
            .await?;
        let mut map = Vec::new();
        for entry in reply {
            let mut items = entry.into_iter();
            let (Some(first), Some(last), Some(primary)) =
                (items.next(), items.next(), items.next())
            else {
                return Err(format!("odd CLUSTER SLOTS entry on {port}"));
            };
            let primary: Vec<redis::Value> =
                redis::from_redis_value(primary).map_err(|e| e.to_string())?;
            let primary = primary
                .into_iter()
                .nth(1)
                .ok_or("no port in CLUSTER SLOTS")?;
            map.push(SlotRange {
                first: redis::from_redis_value(first).map_err(|e| e.to_string())?,
                last: redis::from_redis_value(last).map_err(|e| e.to_string())?,
                primary: redis::from_redis_value(primary).map_err(|e| e.to_string())?,
            });
        }
        map.sort_unstable();
        Ok(map)
    }

    fn any_running(&self) -> u16 {
        *self
            .nodes
            .running()
            .first()
            .expect("a cluster node is running")
    }
}

/// `redis-cli --cluster <args> --cluster-yes` (`args` split at spaces) on a blocking
/// thread: its output and how long it ran.
fn redis_cli(args: String) -> JoinHandle<(Output, Duration)> {
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .args(args.split_whitespace())
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed (Debian package redis-tools)");
        (output, started.elapsed())
    })
}

/// The port of the primary that serves `slot` in `map`.
pub fn serving(map: &[SlotRange], slot: u16) -> u16 {
    map.iter()
        .find(|r| (r.first..=r.last).contains(&slot))
        .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
        .primary
}

/// `count` distinct ports below 65536 - [`BUS_OFFSET`] whose bus ports are free too:
/// every port and bus port is held bound until all are chosen, so none repeats.
pub fn cluster_ports(count: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..1000 {
        if ports.len() == count {
            return ports;
        }
        let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let port = listener.local_addr().unwrap().port();
        if port >= u16::MAX - BUS_OFFSET {
            continue;
        }
        if let Ok(bus) = TcpListener::bind(("127.0.0.1", port + BUS_OFFSET)) {
            held.extend([listener, bus]);
            ports.push(port);
        }
    }
    panic!(
        "found only {} of {count} ports with a free bus port",
        ports.len()
    );
}

/// Each running replica's primary (ports), from `CLUSTER NODES` text (`id ip:port@bus
/// flags master-id …` lines); `None` if a line does not parse.
fn replica_of(nodes: &str) -> Option<HashMap<u16, u16>> {
    let mut ports = HashMap::new();
    let mut replicas = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [id, address, flags, master, ..] = fields[..] else {
            return None;
        };
        let port: u16 = address
            .split(['@', ','])
            .next()?
            .rsplit(':')
            .next()?
            .parse()
            .ok()?;
        ports.insert(id, port);
        if flags.contains("slave") && !flags.contains("fail") {
            replicas.push((port, master));
        }
    }
    replicas
        .into_iter()
        .map(|(port, master)| Some((port, *ports.get(master)?)))
        .collect()
}

/// The last `lines` lines of a command's stdout and stderr, for a failure message.
fn tail_text(output: &Output, lines: usize) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
