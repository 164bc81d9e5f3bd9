//! SPEC §4 under concurrency: once an InvalidateUser has returned, no later Get returns a
//! session whose validation began before it. The same schedule run against a model of
//! the Python service's algorithm shows the race that algorithm loses.

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use session_cache::pb::{self, GetOutcome, session_cache_client::SessionCacheClient};
use support::{Backend, Harness, in_an_hour, user};
use tonic::transport::Channel;

const USERS: u64 = 3;
const TASKS: u64 = 8;
const STEPS: u64 = 40;

/// One step of the schedule, drawn from a seeded generator so that the service and the
/// model run the same one.
#[derive(Clone, Copy)]
struct Step {
    user: u64,
    /// The password changes while this caller is validating (between its miss and Set).
    invalidate_while_validating: bool,
    /// Another password change, after the Set.
    invalidate_after: bool,
}

fn schedule(task: u64) -> Vec<Step> {
    let mut state = task.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..STEPS)
        .map(|_| Step {
            user: next() % USERS,
            invalidate_while_validating: next() % 10 < 3,
            invalidate_after: next() % 10 < 2,
        })
        .collect()
}

/// Invalidations that have returned, per user, by the instant each recorded.
#[derive(Default)]
struct Returned(Mutex<HashMap<u64, u64>>);

impl Returned {
    fn record(&self, user: u64, at: u64) {
        let mut latest = self.0.lock().unwrap();
        let entry = latest.entry(user).or_default();
        *entry = (*entry).max(at);
    }

    fn latest(&self, user: u64) -> u64 {
        self.0.lock().unwrap().get(&user).copied().unwrap_or(0)
    }
}

/// Adds up the (hits, violations) of every task.
async fn sum(tasks: Vec<tokio::task::JoinHandle<(usize, usize)>>) -> (usize, usize) {
    let mut totals = (0, 0);
    for task in tasks {
        let (hits, violations) = task.await.unwrap();
        totals.0 += hits;
        totals.1 += violations;
    }
    totals
}

/// The service: a hit is a violation when its session's fence is at or before an
/// invalidation of its user that had returned before the Get was sent.
async fn run_service(client: SessionCacheClient<Channel>) -> (usize, usize) {
    let returned = Arc::new(Returned::default());
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let mut client = client.clone();
        let returned = returned.clone();
        tasks.push(tokio::spawn(async move {
            let (mut hits, mut violations) = (0, 0);
            let invalidate = async |client: &mut SessionCacheClient<Channel>, user: u64| {
                let reply = client
                    .invalidate_user(pb::InvalidateUserRequest {
                        user_id: format!("u{user}"),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let at = reply.invalidated_at.unwrap();
                returned.record(user, at.seconds as u64 * 1_000_000 + at.nanos as u64 / 1000);
            };
            for (i, step) in schedule(task).into_iter().enumerate() {
                let token = format!("t{task}-{i}");
                let miss = client
                    .get(pb::GetRequest {
                        token: token.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let fence: u64 = miss
                    .fence
                    .parse()
                    .unwrap_or_else(|e| panic!("{e}: the Get answered {:?}", miss.outcome()));
                if step.invalidate_while_validating {
                    invalidate(&mut client, step.user).await;
                }
                client
                    .set(pb::SetRequest {
                        token: token.clone(),
                        user: Some(user(&format!("u{}", step.user))),
                        session_expire: Some(in_an_hour()),
                        fence: miss.fence.clone(),
                    })
                    .await
                    .unwrap();
                if step.invalidate_after {
                    invalidate(&mut client, step.user).await;
                }
                let before = returned.latest(step.user);
                let got = client
                    .get(pb::GetRequest { token })
                    .await
                    .unwrap()
                    .into_inner();
                if got.outcome() == GetOutcome::Hit {
                    hits += 1;
                    if fence <= before {
                        violations += 1;
                    }
                }
            }
            (hits, violations)
        }));
    }
    sum(tasks).await
}

/// The Python service's algorithm, in memory: Set stamps `cached_at` with the time of
/// the Set; Get rejects an entry when the user's marker is later than `cached_at`.
#[derive(Default)]
struct PythonModel {
    clock: AtomicU64,
    entries: Mutex<HashMap<String, (u64, u64)>>, // token -> (user, cached_at)
    markers: Mutex<HashMap<u64, u64>>,
}

impl PythonModel {
    fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn get(&self, token: &str) -> bool {
        let Some((user, cached_at)) = self.entries.lock().unwrap().get(token).copied() else {
            return false;
        };
        let marker = self
            .markers
            .lock()
            .unwrap()
            .get(&user)
            .copied()
            .unwrap_or(0);
        marker <= cached_at
    }

    fn set(&self, token: &str, user: u64) {
        let cached_at = self.now();
        self.entries
            .lock()
            .unwrap()
            .insert(token.into(), (user, cached_at));
    }

    fn invalidate_user(&self, user: u64) -> u64 {
        let at = self.now();
        self.markers.lock().unwrap().insert(user, at);
        at
    }
}

/// The same schedule against the model, with the model's clock as the fence.
async fn run_model(model: Arc<PythonModel>) -> (usize, usize) {
    let returned = Arc::new(Returned::default());
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let model = model.clone();
        let returned = returned.clone();
        tasks.push(tokio::spawn(async move {
            let (mut hits, mut violations) = (0, 0);
            for (i, step) in schedule(task).into_iter().enumerate() {
                let token = format!("t{task}-{i}");
                assert!(!model.get(&token));
                let fence = model.now(); // when validation began
                if step.invalidate_while_validating {
                    returned.record(step.user, model.invalidate_user(step.user));
                }
                tokio::task::yield_now().await;
                model.set(&token, step.user);
                if step.invalidate_after {
                    returned.record(step.user, model.invalidate_user(step.user));
                }
                let before = returned.latest(step.user);
                if model.get(&token) {
                    hits += 1;
                    if fence <= before {
                        violations += 1;
                    }
                }
            }
            (hits, violations)
        }));
    }
    sum(tasks).await
}

async fn check(backend: Backend, args: &[&str]) {
    let h = Harness::start(backend, args).await;
    let (hits, violations) = run_service(h.client.clone()).await;
    let (model_hits, model_violations) = run_model(Arc::new(PythonModel::default())).await;
    eprintln!(
        "{backend:?} {args:?}: {} steps; service {hits} hits, {violations} revived; Python model {model_hits} hits, {model_violations} revived",
        TASKS * STEPS
    );
    assert_eq!(violations, 0, "a revoked session was served");
    assert!(hits > 0, "the schedule produces hits");
    assert!(
        model_violations > 0,
        "the model of the Python algorithm loses the race"
    );
}

/// The race is about order, not time: a loaded machine (or one where revocations wait
/// for a replica) must not turn a call UNAVAILABLE within the default 100 ms.
const SLACK: &[&str] = &["--store-timeout-ms", "2000"];

/// On Redis: no revoked session is served; the Python algorithm would serve some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_is_never_undone_on_redis() {
    check(Backend::Redis, SLACK).await;
}

/// Behind Sentinels (a primary, a replica, three Sentinels): the same, with the default
/// clock-skew margin and without one (the nodes share this machine's clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_is_never_undone_behind_sentinels() {
    check(Backend::Sentinel, SLACK).await;
    check(
        Backend::Sentinel,
        &[SLACK[0], SLACK[1], "--clock-skew-ms", "0"],
    )
    .await;
}

/// On a Redis Cluster of three primaries, where the marker and the entry live on
/// different nodes, a Get reads them in two steps and a Set checks its fence before it
/// writes: the same, with the default clock-skew margin and without one. The nodes
/// share this machine's clock, so no margin is needed; without it the schedule serves
/// far more hits, and the two-step order alone must keep revocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_is_never_undone_on_a_cluster() {
    check(Backend::Cluster, SLACK).await;
    check(
        Backend::Cluster,
        &[SLACK[0], SLACK[1], "--clock-skew-ms", "0"],
    )
    .await;
}

/// On the memory store with a marker budget of 2 for 3 users, so that markers collapse
/// into the store-wide floor all the time (SPEC §5): the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_is_never_undone_in_memory_while_markers_collapse() {
    check(Backend::Memory, &["--memory-max-markers", "2"]).await;
}

/// On the memory store: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_is_never_undone_in_memory() {
    check(Backend::Memory, &[]).await;
}
