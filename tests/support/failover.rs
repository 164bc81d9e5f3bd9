//! Load through a failover or a reshard, and what every such fault promises of it: 16
//! tasks calling Get, fenced Set and the revocations, each call recorded with its status,
//! outcome and times, and every hit checked against the revocations acknowledged before
//! it. The Sentinel and Cluster tests share it.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prost_types::Timestamp;
use session_cache::pb::{self, GetOutcome, SetOutcome, session_cache_client::SessionCacheClient};
use tokio::{task::JoinHandle, time::Instant};
use tonic::{Code, transport::Channel};

use super::{in_an_hour, user};

/// Hard bounds of a load, whatever the test does.
pub const MAX_CALLS_PER_TASK: usize = 20_000;
pub const MAX_LOAD: Duration = Duration::from_secs(60);
/// Tasks of a load.
pub const TASKS: usize = 16;
/// How often each task revokes.
const REVOCATION_EVERY: Duration = Duration::from_secs(1);

/// One call of the load.
#[derive(Clone, Debug)]
pub struct Call {
    pub started: Instant,
    pub ended: Instant,
    pub rpc: &'static str,
    pub code: Code,
    /// The outcome's enum number; 0 when the call failed or has none.
    pub outcome: i32,
}

impl Call {
    /// Whether the caller got no answer from the store: gRPC UNAVAILABLE, or a Get or
    /// Set whose outcome says UNAVAILABLE.
    pub fn unavailable(&self) -> bool {
        self.code == Code::Unavailable
            || (self.rpc == "Get" && self.outcome == GetOutcome::Unavailable as i32)
            || (self.rpc == "Set" && self.outcome == SetOutcome::Unavailable as i32)
    }
}

/// A revocation the service acknowledged (answered OK).
#[derive(Clone, Debug)]
pub enum Revocation {
    /// InvalidateUser, and the instant it answered.
    User { id: String, at: Timestamp },
    /// InvalidateToken.
    Token(String),
}

/// What the load saw: every call, the hits that served a session revoked before, and
/// the revocations acknowledged.
#[derive(Debug, Default)]
pub struct Seen {
    pub calls: Vec<Call>,
    pub revived: usize,
    pub revocations: Vec<Revocation>,
}

/// `TASKS` tasks, each with a token and a user of its own, calling Get, fenced Set (the
/// user's name carries the number of the Get whose fence it used) and, about once a
/// second, InvalidateUser (not retried: a caller would, but the checks need only the
/// ones acknowledged). A hit is revived when its session's fence was handed out before
/// an InvalidateUser of the task's user that had been acknowledged.
///
/// With logouts, every other revocation round logs the task's session out
/// (InvalidateToken) instead, and once that is acknowledged, tries to bring it back as a
/// late caller would: Get, fenced Set and Get of the logged-out token, where a hit is
/// revived too (the fence comes a second after the last InvalidateUser, so the Set meets
/// the tombstone, not the marker). The task then goes on with a new token, as after a
/// new login.
pub struct FailoverLoad {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Seen>>,
}

impl FailoverLoad {
    /// Get, fenced Set and InvalidateUser.
    pub fn start(client: &SessionCacheClient<Channel>) -> FailoverLoad {
        FailoverLoad::spawn(client, false)
    }

    /// Get, fenced Set, InvalidateUser and InvalidateToken.
    pub fn with_logouts(client: &SessionCacheClient<Channel>) -> FailoverLoad {
        FailoverLoad::spawn(client, true)
    }

    /// The token task `task` starts with; [`FailoverLoad::with_logouts`] moves on to
    /// others.
    pub fn first_token(task: usize) -> String {
        format!("fo-{task}")
    }

    /// The user of task `task`.
    pub fn user_of(task: usize) -> String {
        format!("fo-user-{task}")
    }

    fn spawn(client: &SessionCacheClient<Channel>, logouts: bool) -> FailoverLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..TASKS)
            .map(|task| {
                let client = client.clone();
                let stop = stop.clone();
                tokio::spawn(run_task(client, task, logouts, stop))
            })
            .collect();
        FailoverLoad { stop, tasks }
    }

    /// Ends the load; every call, in start order, and every acknowledged revocation.
    pub async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Seen::default();
        for task in self.tasks {
            let seen = task.await.expect("a load task panicked");
            all.calls.extend(seen.calls);
            all.revived += seen.revived;
            all.revocations.extend(seen.revocations);
        }
        all.calls.sort_by_key(|c| c.started);
        all
    }
}

/// One task of a [`FailoverLoad`].
async fn run_task(
    mut client: SessionCacheClient<Channel>,
    task: usize,
    logouts: bool,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut token = FailoverLoad::first_token(task);
    let mut logins = 0;
    let user_id = FailoverLoad::user_of(task);
    let deadline = Instant::now() + MAX_LOAD;
    let mut seen = Seen::default();
    // Numbers of this task's calls: the last acknowledged revocation.
    let mut revoked_at_call = 0usize;
    let mut last_revocation = Instant::now();
    let mut rounds = 0usize;
    while !stop.load(Ordering::Relaxed)
        && seen.calls.len() < MAX_CALLS_PER_TASK
        && Instant::now() < deadline
    {
        let number = seen.calls.len();
        let got = get(&mut client, &token, &user_id, revoked_at_call, &mut seen).await;
        if let Some(fence) = got {
            set(&mut client, &token, &user_id, number, fence, &mut seen).await;
        }
        if last_revocation.elapsed() > REVOCATION_EVERY {
            rounds += 1;
            if logouts && rounds.is_multiple_of(2) {
                if log_out(&mut client, &token, &user_id, &mut seen).await {
                    logins += 1;
                    token = format!("fo-{task}.{logins}");
                }
            } else if let Some(number) = invalidate_user(&mut client, &user_id, &mut seen).await {
                revoked_at_call = number;
            }
            last_revocation = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen
}

/// InvalidateUser of `user_id`, recorded; when acknowledged, the number of its call.
async fn invalidate_user(
    client: &mut SessionCacheClient<Channel>,
    user_id: &str,
    seen: &mut Seen,
) -> Option<usize> {
    let number = seen.calls.len();
    let started = Instant::now();
    let revoked = client
        .invalidate_user(pb::InvalidateUserRequest {
            user_id: user_id.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner);
    seen.calls
        .push(call("InvalidateUser", started, &revoked, |_| 0));
    let revoked = revoked.ok()?;
    seen.revocations.push(Revocation::User {
        id: user_id.to_owned(),
        at: revoked.invalidated_at.unwrap_or_default(),
    });
    Some(number)
}

/// InvalidateToken of `token`, recorded; once acknowledged, a late caller's Get, fenced
/// Set and Get of it, where any hit is revived (the session is gone for good). Returns
/// whether the logout was acknowledged.
async fn log_out(
    client: &mut SessionCacheClient<Channel>,
    token: &str,
    user_id: &str,
    seen: &mut Seen,
) -> bool {
    let started = Instant::now();
    let logout = client
        .invalidate_token(pb::InvalidateTokenRequest {
            token: token.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner);
    seen.calls
        .push(call("InvalidateToken", started, &logout, |_| 0));
    if logout.is_err() {
        return false;
    }
    seen.revocations.push(Revocation::Token(token.to_owned()));
    let fenced_at = seen.calls.len();
    if let Some(fence) = get(client, token, user_id, usize::MAX, seen).await {
        set(client, token, user_id, fenced_at, fence, seen).await;
        get(client, token, user_id, usize::MAX, seen).await;
    }
    true
}

/// Get of `token`, recorded; a hit whose session was fenced at a call numbered below
/// `revoked_at_call` is counted revived (every hit, with `usize::MAX`). Returns the
/// fence of a non-hit the store answered.
async fn get(
    client: &mut SessionCacheClient<Channel>,
    token: &str,
    user_id: &str,
    revoked_at_call: usize,
    seen: &mut Seen,
) -> Option<String> {
    let started = Instant::now();
    let got = client
        .get(pb::GetRequest {
            token: token.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner);
    seen.calls.push(call("Get", started, &got, |r| r.outcome));
    let got = got.ok()?;
    if got.outcome() == GetOutcome::Hit {
        let stored = got.user.as_ref().unwrap();
        assert_eq!(stored.id, user_id, "a hit for another token");
        let fenced_at: usize = stored.name.parse().unwrap();
        if fenced_at < revoked_at_call {
            seen.revived += 1;
        }
    }
    (!got.fence.is_empty()).then_some(got.fence)
}

/// Set of `token` with `fence`, its user's name the number of the call that handed the
/// fence out; recorded.
async fn set(
    client: &mut SessionCacheClient<Channel>,
    token: &str,
    user_id: &str,
    fenced_at: usize,
    fence: String,
    seen: &mut Seen,
) {
    let started = Instant::now();
    let set = client
        .set(pb::SetRequest {
            token: token.to_owned(),
            user: Some(pb::User {
                name: fenced_at.to_string(),
                ..user(user_id)
            }),
            session_expire: Some(in_an_hour()),
            fence,
        })
        .await
        .map(tonic::Response::into_inner);
    seen.calls.push(call("Set", started, &set, |r| r.outcome));
}

/// A call as recorded, from its result.
pub fn call<T>(
    rpc: &'static str,
    started: Instant,
    result: &Result<T, tonic::Status>,
    outcome: impl Fn(&T) -> i32,
) -> Call {
    let (code, outcome) = match result {
        Ok(reply) => (Code::Ok, outcome(reply)),
        Err(status) => (status.code(), 0),
    };
    Call {
        started,
        ended: Instant::now(),
        rpc,
        code,
        outcome,
    }
}

/// The calls counted by RPC and outcome (or gRPC status), sorted.
pub fn tally<'a>(calls: impl Iterator<Item = &'a Call>) -> Vec<(String, usize)> {
    let mut by_outcome: HashMap<String, usize> = HashMap::new();
    for c in calls {
        let outcome = match (c.rpc, c.code) {
            (_, Code::Unavailable) => "UNAVAILABLE status".to_string(),
            ("Get", _) => format!("{:?}", GetOutcome::try_from(c.outcome).unwrap()),
            ("Set", _) => format!("{:?}", SetOutcome::try_from(c.outcome).unwrap()),
            _ => "OK".to_string(),
        };
        *by_outcome
            .entry(format!("{} {outcome}", c.rpc))
            .or_default() += 1;
    }
    let mut by_outcome: Vec<_> = by_outcome.into_iter().collect();
    by_outcome.sort();
    by_outcome
}

/// The longest of these calls.
pub fn slowest<'a>(calls: impl Iterator<Item = &'a Call>) -> Duration {
    calls.map(|c| c.ended - c.started).max().unwrap_or_default()
}

/// What a fault under load promises whenever it happens: every call answered OK or
/// UNAVAILABLE, and no revoked session served.
pub fn check_promises(name: &str, seen: &Seen) {
    let odd: Vec<_> = seen
        .calls
        .iter()
        .filter(|c| !matches!(c.code, Code::Ok | Code::Unavailable))
        .collect();
    assert!(
        odd.is_empty(),
        "{name}: calls answered neither OK nor UNAVAILABLE: {:?}",
        &odd[..odd.len().min(5)]
    );
    assert_eq!(seen.revived, 0, "{name}: a revoked session was served");
}

/// Hits and STORED among the calls that started after `since`: the service works again.
pub fn check_resumed(name: &str, seen: &Seen, since: Instant) {
    let count = |rpc: &str, outcome: i32| {
        seen.calls
            .iter()
            .filter(|c| c.started > since && c.rpc == rpc && c.outcome == outcome)
            .count()
    };
    assert!(
        count("Get", GetOutcome::Hit as i32) > 0,
        "{name}: hits resumed"
    );
    assert!(
        count("Set", SetOutcome::Stored as i32) > 0,
        "{name}: Sets resumed"
    );
}

/// What every failover promises of the load, and its figures printed: `fault` when the
/// primary was failed or killed, `promoted` when its replica served as the primary,
/// `stored` when the first Set was stored there.
pub fn check_failover(name: &str, seen: &Seen, fault: Instant, promoted: Instant, stored: Instant) {
    let during = || {
        seen.calls
            .iter()
            .filter(move |c| c.ended >= fault && c.started <= stored)
    };
    let after = || seen.calls.iter().filter(move |c| c.started > stored);
    eprintln!(
        "{name}: {} calls, {} revived; promotion {:?} after the fault, first STORED on the new \
         primary {:?} after the promotion; during the switch ({} calls, slowest {:?}): \
         {:?}; after it: {:?}",
        seen.calls.len(),
        seen.revived,
        promoted - fault,
        stored.saturating_duration_since(promoted),
        during().count(),
        slowest(during()),
        tally(during()),
        tally(after()),
    );
    check_promises(name, seen);
    check_resumed(name, seen, stored);
}
