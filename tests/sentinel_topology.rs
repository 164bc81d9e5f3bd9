//! The Sentinel topology the failover tests stand on (`support::sentinel`): it starts
//! linked, fails over on request and by itself within seconds, and skews a node's wall
//! clock. Each test prints its figures.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use bb8_redis::redis;
use futures_util::StreamExt;
use support::{
    PATIENCE, eventually,
    redis_server::info_field,
    sentinel::{FAILOVER_PATIENCE, MASTER_NAME, SentinelTopology, Topology},
};
use tokio::time::Instant;

/// Waits until `port` is a replica of `primary` with its link up.
async fn wait_replica_of(topology: &SentinelTopology, port: u16, primary: u16) {
    let primary_port = primary.to_string();
    eventually(
        FAILOVER_PATIENCE,
        format!("{port} to replicate {primary} with its link up"),
        async || {
            let info = topology.info_replication(port).await.unwrap_or_default();
            let seen =
                ["role", "master_port", "master_link_status"].map(|field| info_field(&info, field));
            if seen == [Some("slave"), Some(primary_port.as_str()), Some("up")] {
                Ok(())
            } else {
                Err(seen.map(|f| f.map(str::to_string)))
            }
        },
    )
    .await;
}

/// Waits until `GET key` on `port` answers `value`.
async fn wait_value(topology: &SentinelTopology, port: u16, key: &str, value: &str) {
    let mut conn = topology.conn(port).await;
    eventually(
        PATIENCE,
        format!("{key} on {port} to be {value}"),
        async || {
            let got: Option<String> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap_or(None);
            match got {
                Some(got) if got == value => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
}

/// Two replicas start linked to the primary the Sentinels name, with the data nodes'
/// extra arguments, and what is written on the primary reaches both.
#[tokio::test]
async fn starts_with_every_replica_linked() {
    let topology = SentinelTopology::start(Topology {
        replicas: 2,
        data_args: &["--min-replicas-to-write", "1"],
        ..Topology::default()
    })
    .await;
    let ports = topology.data_ports();
    assert_eq!(ports.len(), 3);
    let primary = topology.primary_port().await;
    assert_eq!(primary, ports[0], "the Sentinels name the initial primary");
    assert_eq!(topology.role(primary).await.as_deref(), Some("master"));
    assert_eq!(topology.master_name(), MASTER_NAME);
    let sentinels = topology.sentinels();
    assert_eq!(sentinels.split(',').count(), 3, "{sentinels}");
    for port in topology.sentinel_ports() {
        assert!(sentinels.contains(&format!("127.0.0.1:{port}")));
        assert_eq!(topology.role(port).await.as_deref(), Some("sentinel"));
    }

    let mut conn = topology.conn(primary).await;
    let min: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("min-replicas-to-write")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(min, ["min-replicas-to-write", "1"]);
    let () = redis::cmd("SET")
        .arg("planted")
        .arg("here")
        .query_async(&mut conn)
        .await
        .unwrap();
    for &replica in &ports[1..] {
        assert_eq!(topology.role(replica).await.as_deref(), Some("slave"));
        wait_replica_of(&topology, replica, primary).await;
        wait_value(&topology, replica, "planted", "here").await;
    }
}

/// SENTINEL FAILOVER moves the primary to the replica within seconds, every Sentinel
/// publishes +switch-master, and the old primary comes back as a replica of the new one.
#[tokio::test]
async fn failover_moves_the_primary_and_demotes_the_old_one() {
    let topology = SentinelTopology::start(Topology::default()).await;
    let old = topology.primary_port().await;
    let mut switches = Vec::new();
    for port in topology.sentinel_ports() {
        let mut pubsub = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        pubsub.subscribe("+switch-master").await.unwrap();
        switches.push(pubsub);
    }

    let started = Instant::now();
    let new = topology.failover().await;
    let promoted = started.elapsed();
    let old_role = topology.role(old).await;
    assert_ne!(new, old);
    assert_eq!(
        new,
        topology.data_ports()[1],
        "the only replica is promoted"
    );
    assert_eq!(topology.role(new).await.as_deref(), Some("master"));

    let want = format!("{MASTER_NAME} 127.0.0.1 {old} 127.0.0.1 {new}");
    for pubsub in &mut switches {
        let message = tokio::time::timeout(PATIENCE, pubsub.on_message().next())
            .await
            .expect("every Sentinel publishes +switch-master")
            .expect("the subscription stays open");
        assert_eq!(message.get_payload::<String>().unwrap(), want);
    }
    let published = started.elapsed();

    wait_replica_of(&topology, old, new).await;
    topology.wait_until_replica_count(1).await;
    let demoted = started.elapsed();
    eprintln!(
        "SENTINEL FAILOVER: new primary answers as master after {promoted:?} (the old one's \
         ROLE then: {old_role:?}), +switch-master on all three Sentinels by {published:?}, \
         old primary a linked replica after {demoted:?}"
    );
}

/// SIGKILL of the primary of two replicas: the Sentinels promote one by themselves, with
/// the data it had, and the other follows it; restarted, the old primary comes back
/// empty, is made a replica and copies the data back.
#[tokio::test]
async fn killed_primary_is_replaced_by_a_replica() {
    let mut topology = SentinelTopology::start(Topology {
        replicas: 2,
        ..Topology::default()
    })
    .await;
    let primary = topology.primary_port().await;
    let mut conn = topology.conn(primary).await;
    let () = redis::cmd("SET")
        .arg("survivor")
        .arg("yes")
        .query_async(&mut conn)
        .await
        .unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(2)
        .arg(1000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, 2, "both replicas have the key before the kill");

    let killed_at = Instant::now();
    let old = topology.kill_primary();
    assert_eq!(old, primary);
    assert_eq!(
        topology.role(old).await,
        None,
        "nothing answers on a killed node"
    );
    let new = topology.wait_for_new_primary(old).await;
    let promoted = killed_at.elapsed();
    assert_ne!(new, old);
    assert_eq!(topology.primary_port().await, new);
    wait_value(&topology, new, "survivor", "yes").await;
    let other = topology
        .data_ports()
        .into_iter()
        .find(|p| *p != old && *p != new)
        .unwrap();
    wait_replica_of(&topology, other, new).await;
    let followed = killed_at.elapsed();

    let restarted_at = Instant::now();
    topology.restart(old).await;
    wait_replica_of(&topology, old, new).await;
    topology.wait_until_replica_count(2).await;
    let rejoined = restarted_at.elapsed();
    wait_value(&topology, old, "survivor", "yes").await;
    eprintln!(
        "SIGKILL of the primary: a replica promoted after {promoted:?}, the other following \
         it after {followed:?}; the old primary, restarted, a linked replica after \
         {rejoined:?}"
    );
}

/// TIME of `port` minus the host's clock at the middle of the exchange, in ms, from the
/// quickest of ten exchanges.
async fn clock_offset_ms(topology: &SentinelTopology, port: u16) -> i64 {
    let mut conn = topology.conn(port).await;
    let micros = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
    let mut best: Option<(i64, i64)> = None;
    for _ in 0..10 {
        let before = SystemTime::now();
        let (secs, us): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
        let after = SystemTime::now();
        let round_trip = micros(after) - micros(before);
        let offset = secs * 1_000_000 + us - (micros(before) + micros(after)) / 2;
        if best.is_none_or(|(rtt, _)| round_trip < rtt) {
            best = Some((round_trip, offset));
        }
    }
    best.unwrap().1 / 1000
}

/// A primary started 300 ms ahead and a replica 300 ms behind answer TIME that far from
/// the host's clock (within 100 ms), and replicate all the same.
#[tokio::test]
async fn clock_offsets_move_time() {
    let topology = SentinelTopology::start(Topology {
        primary_clock_offset_ms: Some(300),
        replica_clock_offset_ms: Some((0, -300)),
        ..Topology::default()
    })
    .await;
    let ports = topology.data_ports();
    let ahead = clock_offset_ms(&topology, ports[0]).await;
    let behind = clock_offset_ms(&topology, ports[1]).await;
    eprintln!("clock offsets: primary {ahead} ms, replica {behind} ms");
    assert!((200..=400).contains(&ahead), "primary {ahead} ms ahead");
    assert!(
        (-400..=-200).contains(&behind),
        "replica {behind} ms behind"
    );
    wait_replica_of(&topology, ports[1], ports[0]).await;
}
