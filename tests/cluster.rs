//! SPEC §8 on Redis Cluster, with real processes: three primaries, each with a replica,
//! that the tests start on free ports (see `support::cluster`). The service spreads its
//! keys over every primary with each tombstone in its entry's slot, follows the slots
//! that a reshard moves and the replica promoted in place of a killed primary, never
//! serves a revoked session, and never acknowledges a revocation that a reshard or the
//! loss of a primary could undo. Each test prints its figures.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use bb8_redis::redis::{self, aio::MultiplexedConnection};
use session_cache::{
    clock::Micros,
    keys::{TokenHash, marker_key},
    pb::{self, GetOutcome, SetOutcome},
};
use support::{
    Harness, PATIENCE, Server,
    cluster::{Cluster, ClusterTopology},
    eventually,
    failover::{
        FailoverLoad, Revocation, TASKS, check_failover, check_promises, check_resumed, slowest,
        tally,
    },
    in_an_hour, user,
};
use tokio::{task::JoinHandle, time::Instant};
use tokio_stream::StreamExt;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

const SERVICE: &str = "sessioncache.v1.SessionCache";
/// Three primaries, each with a replica: the default `--revocation-replicas 1` is every
/// replica a primary has, so an acknowledged revocation survives its primary.
const REPLICATED: Cluster = Cluster {
    primaries: 3,
    replicas_per_primary: 1,
};
/// Slots each reshard moves. `redis-cli` takes the source's lowest slots, so the three
/// rounds A -> B, B -> C, C -> A move slots 0-2999 each time, and the load's keys there
/// with them.
const RESHARD_SLOTS: u32 = 3000;

/// Through the service: 60 sessions of 30 users, 20 of them logged out and 15 users
/// invalidated. Read on each primary directly, entries, markers and tombstones are found
/// on all three; each tombstone is `session_revoked:{session_cache:<hash>}`, in its
/// entry's slot and on its entry's primary; and the primaries hold exactly these keys:
/// no tombstone under its old name `session_revoked:<hash>`, which only a Redis outside
/// Cluster still gets (SPEC §8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_every_primary() {
    let topology = ClusterTopology::start(REPLICATED).await;
    // Where keys go, not how fast: a store timeout that a machine busy with the other
    // tests' Clusters cannot pass (a revocation waits for its replica within it).
    let mut h = Harness::over_cluster(&topology, &["--store-timeout-ms", "2000"]).await;
    let tokens: Vec<String> = (0..60).map(|i| format!("spread-{i}")).collect();
    let user_of = |i: usize| format!("spread-user-{}", i % 30);
    for (i, token) in tokens.iter().enumerate() {
        let set = h.set(token, user(&user_of(i)), in_an_hour(), "").await;
        assert_eq!(set.outcome(), SetOutcome::Stored, "{token}");
    }
    let logged_out: Vec<&String> = tokens.iter().step_by(3).collect();
    for token in &logged_out {
        let logout = h.invalidate_token(token).await.expect("InvalidateToken");
        assert!(logout.deleted, "{token}");
    }
    let revoked: Vec<String> = (0..15).map(user_of).collect();
    for user_id in &revoked {
        h.invalidate_user(user_id).await.expect("InvalidateUser");
    }

    let entries: Vec<String> = tokens
        .iter()
        .filter(|t| !logged_out.contains(t))
        .map(|t| TokenHash::of(t).entry_key())
        .collect();
    let tombstones: Vec<String> = logged_out
        .iter()
        .map(|t| TokenHash::of(t).tombstone_key())
        .collect();
    let markers: Vec<String> = revoked.iter().map(|u| marker_key(u)).collect();
    let keys_by_primary = keys_by_primary(&topology).await;
    let where_found = |key: &String| -> Vec<u16> {
        keys_by_primary
            .iter()
            .filter(|(_, keys)| keys.contains(key))
            .map(|(port, _)| *port)
            .collect()
    };
    let mut spread: BTreeMap<&str, BTreeMap<u16, usize>> = BTreeMap::new();
    for (family, keys) in [
        ("entries", &entries),
        ("tombstones", &tombstones),
        ("markers", &markers),
    ] {
        let owners = topology.primaries_for_keys(keys).await;
        for (key, owner) in keys.iter().zip(owners) {
            assert_eq!(
                where_found(key),
                [owner],
                "{key} is on its slot's primary only"
            );
            *spread.entry(family).or_default().entry(owner).or_default() += 1;
        }
    }
    eprintln!(
        "keys per primary: {spread:?}; every key on the primaries: {:?}",
        keys_by_primary
            .iter()
            .map(|(port, keys)| (port, keys.len()))
            .collect::<Vec<_>>()
    );
    for (family, per_primary) in &spread {
        assert_eq!(
            per_primary.len(),
            3,
            "{family} on every primary: {spread:?}"
        );
    }

    let entry_keys: Vec<String> = logged_out
        .iter()
        .map(|t| TokenHash::of(t).entry_key())
        .collect();
    let entry_slots = topology.key_slots(&entry_keys).await;
    let tombstone_slots = topology.key_slots(&tombstones).await;
    assert_eq!(
        tombstone_slots, entry_slots,
        "each tombstone in its entry's slot"
    );

    let expected: BTreeSet<&String> = entries.iter().chain(&tombstones).chain(&markers).collect();
    let found: BTreeSet<&String> = keys_by_primary.values().flatten().collect();
    let legacy: Vec<String> = logged_out
        .iter()
        .map(|t| TokenHash::of(t).legacy_tombstone_key())
        .filter(|key| found.contains(key))
        .collect();
    assert!(
        legacy.is_empty(),
        "tombstones under the old name: {legacy:?}"
    );
    assert_eq!(
        found, expected,
        "the primaries hold exactly the service's keys"
    );
}

/// Every key of every primary, by port (the test's cluster holds a few dozen).
async fn keys_by_primary(topology: &ClusterTopology) -> BTreeMap<u16, BTreeSet<String>> {
    let mut found = BTreeMap::new();
    for port in topology.primaries().await {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut topology.conn(port).await)
            .await
            .unwrap_or_else(|e| panic!("KEYS on {port}: {e}"));
        found.insert(port, keys.into_iter().collect());
    }
    found
}

/// Three reshards under load from 16 tasks (Get, fenced Set, InvalidateUser,
/// InvalidateToken): 3000 slots A -> B, then B -> C, then C -> A, carrying keys of the
/// load each time. Every call answers OK or UNAVAILABLE, no revoked session is served,
/// every acknowledged marker and tombstone is on the primary that serves its slot
/// afterwards, health ends SERVING (the Cluster serves every slot throughout), and hits
/// and STORED go on after the last reshard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_load() {
    let topology = ClusterTopology::start(REPLICATED).await;
    let h = Harness::over_cluster(&topology, &[]).await;
    let load_keys: Vec<String> = (0..TASKS)
        .flat_map(|task| {
            [
                TokenHash::of(&FailoverLoad::first_token(task)).entry_key(),
                marker_key(&FailoverLoad::user_of(task)),
            ]
        })
        .collect();
    let health = HealthLog::watch(&h.server).await;
    let load = FailoverLoad::with_logouts(&h.client);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let a = topology.primary_for_slot(0).await;
    let others: Vec<u16> = topology
        .primaries()
        .await
        .into_iter()
        .filter(|p| *p != a)
        .collect();
    let (b, c) = (others[0], others[1]);
    let began = Instant::now();
    let mut rounds = Vec::new();
    for (from, to) in [(a, b), (b, c), (c, a)] {
        let before = topology.primaries_for_keys(&load_keys).await;
        let took = topology
            .reshard(from, to, RESHARD_SLOTS)
            .await
            .finish(&topology)
            .await;
        let after = topology.primaries_for_keys(&load_keys).await;
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(was, is)| (**was, **is) == (from, to))
            .count();
        assert!(
            moved > 0,
            "the reshard {from} -> {to} moved none of the load's {} keys",
            load_keys.len()
        );
        rounds.push(format!(
            "{from} -> {to} in {took:?}, {moved} load keys moved"
        ));
    }
    let resharded = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = load.stop().await;
    let changes = health.stop(began);

    let during = || {
        seen.calls
            .iter()
            .filter(move |c| c.ended >= began && c.started <= resharded)
    };
    let after = || seen.calls.iter().filter(move |c| c.started > resharded);
    let missing = missing_revocations(&topology, &seen.revocations).await;
    eprintln!(
        "resharding under load: {} calls, {} revived, {} UNAVAILABLE, slowest {:?}; \
         reshards: {rounds:?}; during them ({} calls, slowest {:?}): {:?}; after them: {:?}; \
         {} acknowledged revocations, {missing} missing; health changes {changes:?}",
        seen.calls.len(),
        seen.revived,
        seen.calls.iter().filter(|c| c.unavailable()).count(),
        slowest(seen.calls.iter()),
        during().count(),
        slowest(during()),
        tally(during()),
        tally(after()),
        seen.revocations.len(),
    );
    check_promises("resharding", &seen);
    assert!(
        seen.revocations
            .iter()
            .any(|r| matches!(r, Revocation::Token(_))),
        "the load logged sessions out"
    );
    assert_eq!(missing, 0, "an acknowledged revocation was lost");
    // Moving slots takes no primary away, so health ends SERVING. A ping that times out
    // on a machine loaded by the load, three reshards and six nodes may turn it
    // NOT_SERVING for one health interval: printed above, not a broken promise.
    assert!(
        changes
            .last()
            .is_none_or(|(_, status)| *status == ServingStatus::Serving),
        "health SERVING after the resharding: {changes:?}"
    );
    check_resumed("resharding", &seen, resharded);
}

/// SIGKILL of the primary that serves the first task's session, under load from 16
/// tasks: its replica is promoted; every call answers OK or UNAVAILABLE, no revoked
/// session is served, hits and STORED resume by themselves (a Set of a token of the
/// killed primary's slots is stored on the promoted replica), and no acknowledged
/// revocation is lost. Health turns NOT_SERVING during the failover (once the Cluster
/// marks the primary failed, its slots are unserved and every node refuses every key)
/// and SERVING again after the promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_under_load() {
    let mut topology = ClusterTopology::start(REPLICATED).await;
    let mut h = Harness::over_cluster(&topology, &[]).await;
    let victim = topology
        .primary_for_key(&TokenHash::of(&FailoverLoad::first_token(0)).entry_key())
        .await;
    let probes = tokens_served_by(&topology, victim, "probe-", 2).await;
    let health = HealthLog::watch(&h.server).await;
    let load = FailoverLoad::with_logouts(&h.client);
    topology.first_stored(&mut h, &probes[0]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fault = Instant::now();
    topology.kill(victim);
    topology.wait_for_failover(victim).await;
    let promoted = Instant::now();
    let stored = topology.first_stored(&mut h, &probes[1]).await;
    h.server.wait_health(SERVICE, ServingStatus::Serving).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = load.stop().await;
    let changes = health.stop(fault);
    let missing = missing_revocations(&topology, &seen.revocations).await;
    eprintln!(
        "SIGKILL of a Cluster primary: health after the fault {changes:?}; {} acknowledged \
         revocations, {missing} missing",
        seen.revocations.len()
    );
    check_failover(
        "SIGKILL of a Cluster primary",
        &seen,
        fault,
        promoted,
        stored,
    );
    assert_eq!(missing, 0, "an acknowledged revocation was lost");
    assert!(
        changes
            .iter()
            .any(|(_, status)| *status == ServingStatus::NotServing),
        "NOT_SERVING during the failover: {changes:?}"
    );
    assert_eq!(
        changes.last().map(|(_, status)| *status),
        Some(ServingStatus::Serving),
        "SERVING after the failover: {changes:?}"
    );
}

/// A batch on its way to a frozen primary (SIGSTOP: it holds its connections and
/// answers nothing) holds back no later batch: lookups that start while it waits for
/// the store timeout are sent on, and every one of sessions on the running primaries
/// hits before the frozen primary is thawed. The batcher sends its next batch when the
/// one on its way has been answered or has been on its way for a millisecond; waiting
/// for the frozen primary would hold them all until the thaw. The store timeout is long
/// here (the frozen batch waits for it), the freeze shorter than the Cluster's node
/// timeout, and the health ping runs once a minute: a failed ping answers every Get
/// UNAVAILABLE at once (SPEC §5), which is not what this test is about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_to_a_frozen_primary_holds_back_no_later_one() {
    const BEFORE: Duration = Duration::from_millis(100);
    const LOAD: Duration = Duration::from_millis(300);
    let topology = ClusterTopology::start(Cluster {
        primaries: 3,
        replicas_per_primary: 0,
    })
    .await;
    let args = [
        "--health-interval-ms",
        "60000",
        "--store-timeout-ms",
        "1500",
    ];
    let mut h = Harness::over_cluster(&topology, &args).await;
    let primaries = topology.primaries().await;
    let (frozen, running) = (primaries[0], [primaries[1], primaries[2]]);
    // Sessions on each running primary, their users' markers on the other one.
    let mut served = Vec::new();
    for (i, (port, marker_port)) in [(running[0], running[1]), (running[1], running[0])]
        .into_iter()
        .enumerate()
    {
        let tokens = tokens_served_by(&topology, port, &format!("held-{i}-"), 4).await;
        let prefix = format!("held-user-{i}-");
        let users = names_served_by(&topology, marker_port, &prefix, marker_key, 4).await;
        served.extend(tokens.into_iter().zip(users));
    }
    let stalled = tokens_served_by(&topology, frozen, "stalled-", 2).await;
    for (token, user_id) in served
        .iter()
        .map(|(t, u)| (t.as_str(), u.as_str()))
        .chain(stalled.iter().map(|t| (t.as_str(), "stalled-user")))
    {
        let set = h.set(token, user(user_id), in_an_hour(), "").await;
        assert_eq!(set.outcome(), SetOutcome::Stored, "{token}");
    }

    topology.freeze(frozen);
    let get = |token: String| {
        let caller = h.caller();
        async move {
            let answer = caller.get(pb::GetRequest { token }).await;
            answer.map(|got| got.outcome()).map_err(|e| e.code())
        }
    };
    // Two at once: the first is read on its own, the second goes in a batch.
    let waiting: Vec<_> = stalled
        .iter()
        .map(|t| tokio::spawn(get(t.clone())))
        .collect();
    tokio::time::sleep(BEFORE).await;
    let started = Instant::now();
    let load: Vec<_> = served
        .chunks(2)
        .map(|pairs| {
            let calls: Vec<_> = pairs
                .iter()
                .cycle()
                .take(100)
                .map(|(t, _)| get(t.clone()))
                .collect();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for call in calls {
                    if started.elapsed() >= LOAD {
                        break;
                    }
                    answers.push(call.await);
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in load {
        answers.extend(task.await.expect("a load task"));
    }
    let answered = started.elapsed();
    let still_waiting = waiting.iter().filter(|task| !task.is_finished()).count();
    topology.thaw(frozen);
    let mut on_frozen = Vec::new();
    for task in waiting {
        on_frozen.push(task.await.expect("a Get of the frozen primary"));
    }

    let misses = answers
        .iter()
        .filter(|answer| **answer != Ok(GetOutcome::Hit))
        .count();
    eprintln!(
        "a frozen primary: {} Gets of sessions on running primaries in {answered:?}, {misses} \
         not a hit; {still_waiting} of the frozen primary's Gets still waiting then, answered \
         {on_frozen:?} after the thaw",
        answers.len(),
    );
    assert_eq!(
        still_waiting, 2,
        "the frozen primary's Gets did not wait for it"
    );
    assert!(answers.len() >= 8, "too few Gets to judge: {answers:?}");
    assert_eq!(
        misses, 0,
        "Gets of running primaries held back: {answers:?}"
    );
}

/// With no calls at all, the primary killed and its replica promoted: once the Cluster
/// serves every slot again, the store's health turns SERVING within PATIENCE and stays
/// SERVING (two seconds without a NOT_SERVING), so that a probe that took the service
/// out of rotation puts it back, and Get asks the store again instead of answering
/// UNAVAILABLE at once (SPEC §5: health follows the ping; §8: a Cluster connection heals
/// itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_again_after_an_idle_failover() {
    let mut topology = ClusterTopology::start(REPLICATED).await;
    let h = Harness::over_cluster(&topology, &[]).await;
    let victim = topology.primaries().await[0];
    let health = HealthLog::watch(&h.server).await;
    let fault = Instant::now();
    topology.kill(victim);
    topology.wait_for_failover(victim).await;
    let promoted = Instant::now();
    let steady = health
        .steady(ServingStatus::Serving, Duration::from_secs(2), PATIENCE)
        .await;
    let changes = health.stop(fault);
    eprintln!(
        "idle failover: promotion {:?} after the kill; health after the kill ({} changes): \
         {changes:?}; SERVING for good {:?} after the promotion",
        promoted - fault,
        changes.len(),
        steady.saturating_duration_since(promoted),
    );
}

/// SPEC §8: with the default --revocation-replicas 1 (every replica a primary has), no
/// acknowledged revocation is lost when its primary dies right after acknowledging it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_revocations_survive_a_killed_primary() {
    let (acknowledged, missing) = revocations_then_kill(&[]).await;
    assert_eq!(acknowledged, 50, "every round was acknowledged");
    assert_eq!(missing, 0, "an acknowledged revocation was lost");
    revocations_then_kill(&["--revocation-replicas", "0"]).await;
}

/// 50 rounds of InvalidateUser and InvalidateToken answered OK, every marker and
/// tombstone on one primary, then that primary SIGKILLed at once and its replica
/// promoted; prints the figures and returns (rounds acknowledged, revocations missing
/// on the promoted replica).
async fn revocations_then_kill(args: &[&str]) -> (usize, usize) {
    let mut topology = ClusterTopology::start(REPLICATED).await;
    let mut h = Harness::over_cluster(&topology, args).await;
    let victim = topology.primaries().await[0];
    let users = names_served_by(&topology, victim, "durable-", marker_key, 50).await;
    let tokens = tokens_served_by(&topology, victim, "durable-token-", 50).await;
    let mut acknowledged = Vec::new();
    let started = Instant::now();
    for (user_id, token) in users.iter().zip(&tokens) {
        let revoked = h.invalidate_user(user_id).await;
        let logout = h.invalidate_token(token).await;
        if let (Ok(revoked), Ok(_)) = (revoked, logout) {
            acknowledged.push(Revocation::User {
                id: user_id.clone(),
                at: revoked.invalidated_at.unwrap_or_default(),
            });
            acknowledged.push(Revocation::Token(token.clone()));
        }
    }
    let revoking = started.elapsed();
    let killed = Instant::now();
    topology.kill(victim);
    let new = topology.wait_for_failover(victim).await;
    let promotion = killed.elapsed();
    let missing = missing_revocations(&topology, &acknowledged).await;
    let rounds = acknowledged.len() / 2;
    eprintln!(
        "flags {args:?}: {rounds} of 50 rounds acknowledged in {revoking:?}, primary {victim} \
         killed, {new} promoted after {promotion:?}, {missing} revocations missing"
    );
    (rounds, missing)
}

/// The first `count` of `{prefix}0`, `{prefix}1`, … (at most 2,000) whose key
/// (`key_of`) the primary on `port` serves.
async fn names_served_by(
    topology: &ClusterTopology,
    port: u16,
    prefix: &str,
    key_of: impl Fn(&str) -> String,
    count: usize,
) -> Vec<String> {
    let names: Vec<String> = (0..2000).map(|i| format!("{prefix}{i}")).collect();
    let keys: Vec<String> = names.iter().map(|n| key_of(n)).collect();
    let owners = topology.primaries_for_keys(&keys).await;
    let served: Vec<String> = names
        .into_iter()
        .zip(owners)
        .filter(|(_, owner)| *owner == port)
        .map(|(name, _)| name)
        .take(count)
        .collect();
    assert_eq!(served.len(), count, "{count} names {prefix}<n> on {port}");
    served
}

/// Tokens whose entry (and so tombstone) the primary on `port` serves.
async fn tokens_served_by(
    topology: &ClusterTopology,
    port: u16,
    prefix: &str,
    count: usize,
) -> Vec<String> {
    names_served_by(
        topology,
        port,
        prefix,
        |t| TokenHash::of(t).entry_key(),
        count,
    )
    .await
}

/// Reads, on the primary that serves each key now, the marker of every acknowledged
/// InvalidateUser (it must be at least as late as the instant acknowledged) and the
/// tombstone of every acknowledged InvalidateToken; returns how many are missing.
async fn missing_revocations(topology: &ClusterTopology, acknowledged: &[Revocation]) -> usize {
    let keys: Vec<String> = acknowledged
        .iter()
        .map(|r| match r {
            Revocation::User { id, .. } => marker_key(id),
            Revocation::Token(token) => TokenHash::of(token).tombstone_key(),
        })
        .collect();
    let owners = topology.primaries_for_keys(&keys).await;
    let mut conns: HashMap<u16, MultiplexedConnection> = HashMap::new();
    for port in owners.iter().copied().collect::<BTreeSet<u16>>() {
        conns.insert(port, topology.conn(port).await);
    }
    let mut missing = 0;
    for ((revocation, key), port) in acknowledged.iter().zip(&keys).zip(owners) {
        let conn = conns.get_mut(&port).unwrap();
        let value: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(conn)
            .await
            .unwrap_or_else(|e| panic!("GET {key} on {port}: {e}"));
        let kept = match (revocation, value) {
            (_, None) => false,
            (Revocation::User { at, .. }, Some(marker)) => {
                let acknowledged = at.seconds * 1_000_000 + i64::from(at.nanos / 1000);
                Micros::parse_seconds(&marker).is_some_and(|m| m.0 >= acknowledged)
            }
            (Revocation::Token(_), Some(_)) => true,
        };
        missing += usize::from(!kept);
    }
    missing
}

/// The store's health as a `grpc.health.v1` Watch streams it, every change with the
/// instant it arrived.
struct HealthLog {
    changes: Arc<Mutex<Vec<(Instant, ServingStatus)>>>,
    task: JoinHandle<()>,
}

impl HealthLog {
    /// Starts watching; returns once the first status (the current one) has arrived.
    async fn watch(server: &Server) -> HealthLog {
        let mut stream = server
            .health()
            .await
            .watch(HealthCheckRequest {
                service: SERVICE.into(),
            })
            .await
            .expect("Watch")
            .into_inner();
        let first = stream
            .next()
            .await
            .expect("a first status")
            .expect("a status");
        let changes = Arc::new(Mutex::new(vec![(Instant::now(), first.status())]));
        let log = changes.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(change)) = stream.next().await {
                log.lock().unwrap().push((Instant::now(), change.status()));
            }
        });
        HealthLog { changes, task }
    }

    /// Waits (at most `patience`) until the last status is `want` and has lasted
    /// `lasting`; returns when it began.
    async fn steady(&self, want: ServingStatus, lasting: Duration, patience: Duration) -> Instant {
        let what = format!("health to stay {want:?} for {lasting:?}");
        eventually(patience, what, async || {
            let changes = self.changes.lock().unwrap().clone();
            match changes.last() {
                Some(&(at, status)) if status == want && at.elapsed() >= lasting => Ok(at),
                _ => Err(changes),
            }
        })
        .await
    }

    /// Stops watching; the changes after `since`, each with how long after it came.
    fn stop(self, since: Instant) -> Vec<(Duration, ServingStatus)> {
        self.task.abort();
        self.changes
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(at, status)| (*at - since, *status))
            .collect()
    }
}
