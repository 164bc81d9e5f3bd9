//! The Redis Cluster topology the cluster tests will stand on (`support::cluster`): it
//! starts settled with three primaries (and a replica each when asked), spreads keys over
//! every primary, moves slots with a reshard, and fails over to a replica when a primary
//! is killed. Each test prints its figures.

mod support;

use std::collections::HashMap;

use bb8_redis::redis;
use support::{
    cluster::{Cluster, ClusterTopology, SLOTS, SlotRange},
    redis_server::info_field,
};
use tokio::time::Instant;

/// The port of the primary serving each slot, from a slot map.
fn owners(map: &[SlotRange]) -> Vec<u16> {
    let mut owners = vec![0; usize::from(SLOTS)];
    for range in map {
        for slot in range.first..=range.last {
            owners[usize::from(slot)] = range.primary;
        }
    }
    owners
}

/// Writes `key` = `key` on the primary that serves it, directly; returns that port.
async fn plant(topology: &ClusterTopology, key: &str) -> u16 {
    let port = topology.primary_for_key(key).await;
    let mut conn = topology.conn(port).await;
    let () = redis::cmd("SET")
        .arg(key)
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("SET {key} on {port}: {e}"));
    port
}

/// `GET key` on `port`, directly (a MOVED reply is an error).
async fn get(
    topology: &ClusterTopology,
    port: u16,
    key: &str,
) -> redis::RedisResult<Option<String>> {
    let mut conn = topology.conn(port).await;
    redis::cmd("GET").arg(key).query_async(&mut conn).await
}

/// Three primaries without replicas start settled: each says `cluster_state:ok` and
/// `cluster_known_nodes:3`, each serves slots, and the seeds name all three.
#[tokio::test]
async fn starts_with_three_primaries() {
    let started = Instant::now();
    let topology = ClusterTopology::start(Cluster::default()).await;
    eprintln!("three primaries started in {:?}", started.elapsed());
    let primaries = topology.primaries().await;
    assert_eq!(primaries.len(), 3);
    let mut ports = topology.ports();
    ports.sort_unstable();
    assert_eq!(primaries, ports);
    for port in &primaries {
        let info = topology.cluster_info(*port).await.expect("node answers");
        assert_eq!(info_field(&info, "cluster_state"), Some("ok"), "{info}");
        assert_eq!(
            info_field(&info, "cluster_known_nodes"),
            Some("3"),
            "{info}"
        );
        assert!(*port < 55536, "{port} leaves room for its bus port");
    }
    let seeds = topology.seeds();
    assert_eq!(seeds.split(',').count(), 3, "{seeds}");
    assert!(
        seeds.split(',').all(|s| s.starts_with("127.0.0.1:")),
        "{seeds}"
    );
}

/// With a replica per primary: three primaries and three replicas, each replica linked
/// to a different primary, and a key written on its primary served by its replica.
#[tokio::test]
async fn starts_with_a_replica_per_primary() {
    let started = Instant::now();
    let topology = ClusterTopology::start(Cluster {
        primaries: 3,
        replicas_per_primary: 1,
    })
    .await;
    eprintln!(
        "three primaries and three replicas started in {:?}",
        started.elapsed()
    );
    let primaries = topology.primaries().await;
    assert_eq!(primaries.len(), 3);
    let mut masters_of_replicas = Vec::new();
    for port in topology.ports() {
        let info = topology.cluster_info(port).await.expect("node answers");
        assert_eq!(info_field(&info, "cluster_state"), Some("ok"), "{info}");
        if primaries.contains(&port) {
            continue;
        }
        assert_eq!(topology.role(port).await.as_deref(), Some("slave"));
        let mut conn = topology.conn(port).await;
        let replication: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(info_field(&replication, "master_link_status"), Some("up"));
        masters_of_replicas.push(info_field(&replication, "master_port").unwrap().to_string());
    }
    masters_of_replicas.sort();
    let mut want: Vec<String> = primaries.iter().map(u16::to_string).collect();
    want.sort();
    assert_eq!(masters_of_replicas, want);
}

/// Keys written each on the primary `primary_for_key` names are accepted there (no
/// MOVED) and spread over all three primaries; a reshard of 100 slots then moves exactly
/// 100 slots from one primary to another (`redis-cli` takes the source's lowest slots,
/// here 0-99, where keys were planted too), and every key is still served by the primary
/// `primary_for_key` names.
#[tokio::test]
async fn spreads_keys_and_reshards() {
    let topology = ClusterTopology::start(Cluster::default()).await;
    let mut per_primary: HashMap<u16, usize> = HashMap::new();
    let keys: Vec<String> = (0..100)
        .map(|i| format!("session-cache-test:{i}"))
        .collect();
    for key in &keys {
        *per_primary.entry(plant(&topology, key).await).or_default() += 1;
    }
    eprintln!("100 keys per primary: {per_primary:?}");
    assert_eq!(per_primary.len(), 3, "{per_primary:?}");
    assert!(per_primary.values().all(|n| *n > 0));

    let from = topology.primary_for_slot(0).await;
    let to = topology
        .primaries()
        .await
        .into_iter()
        .find(|p| *p != from)
        .unwrap();
    let mut keyslots = redis::pipe();
    let candidates: Vec<String> = (0..4000)
        .map(|i| format!("session-cache-test:m{i}"))
        .collect();
    for key in &candidates {
        keyslots.cmd("CLUSTER").arg("KEYSLOT").arg(key);
    }
    let slots: Vec<u16> = keyslots
        .query_async(&mut topology.conn(from).await)
        .await
        .unwrap();
    let moving: Vec<&String> = candidates
        .iter()
        .zip(slots)
        .filter(|(_, s)| *s < 100)
        .map(|(k, _)| k)
        .collect();
    for key in &moving {
        assert_eq!(plant(&topology, key).await, from);
    }
    let before = owners(&topology.slot_map().await);
    let reshard = topology.reshard(from, to, 100).await;
    let took = reshard.finish(&topology).await;
    let after = owners(&topology.slot_map().await);
    let moved: Vec<usize> = (0..before.len())
        .filter(|s| before[*s] != after[*s])
        .collect();
    eprintln!(
        "100 slots ({:?}..={:?}, {} planted keys) moved {from} -> {to} in {took:?}",
        moved.first(),
        moved.last(),
        moving.len()
    );
    assert_eq!(moved, (0..100).collect::<Vec<_>>());
    assert!(moved.iter().all(|s| before[*s] == from && after[*s] == to));
    for key in &moving {
        assert_eq!(
            get(&topology, to, key).await.unwrap().as_deref(),
            Some(key.as_str())
        );
    }
    for key in &keys {
        let port = topology.primary_for_key(key).await;
        let value = get(&topology, port, key).await;
        assert_eq!(
            value.ok().flatten().as_deref(),
            Some(key.as_str()),
            "{key} on {port}"
        );
    }
}

/// With a replica per primary, SIGKILL of a primary: its replica takes over its slots,
/// every running node says `cluster_state:ok` again, and a key of those slots can be
/// written on the new primary.
#[tokio::test]
async fn fails_over_to_the_replica_of_a_killed_primary() {
    let mut topology = ClusterTopology::start(Cluster {
        primaries: 3,
        replicas_per_primary: 1,
    })
    .await;
    let old = topology.primary_for_key("session-cache-test:victim").await;
    let killed = Instant::now();
    topology.kill(old);
    let new = topology.wait_for_failover(old).await;
    eprintln!(
        "primary {old} killed, {new} took over in {:?}",
        killed.elapsed()
    );
    assert_ne!(new, old);
    assert_eq!(
        topology.primary_for_key("session-cache-test:victim").await,
        new
    );
    assert_eq!(plant(&topology, "session-cache-test:victim").await, new);
    let primaries = topology.primaries().await;
    assert_eq!(primaries.len(), 3);
    assert!(!primaries.contains(&old));
    for port in topology.ports().into_iter().filter(|p| *p != old) {
        let info = topology.cluster_info(port).await.expect("node answers");
        assert_eq!(
            info_field(&info, "cluster_state"),
            Some("ok"),
            "{port}: {info}"
        );
    }
}
