//! SPEC §9's revocation rule, raced through Validate: racers validate a small pool of
//! sessions that an Appwrite stand-in answers for late (its answer already on its way)
//! and, while a Validate of a session is under way, revoke it (or all of its user's), then
//! validate it again. A Validate that began after a revocation of its session had been
//! acknowledged must never answer VALID. A test says how a session is revoked
//! ([`Revoke`]); the schedule, the pool and the tally are here.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use session_cache::pb::{self, ValidateOutcome, session_cache_client::SessionCacheClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::idp::{AppwriteStandIn, idp_user, in_a_day};

/// Users in the race, each with this many sessions at a time.
pub const USERS: usize = 3;
pub const SESSIONS_PER_USER: usize = 3;
const RACERS: usize = 8;
const STEPS: usize = 60;

/// The race's sessions at the provider: one live token per (user, slot), and when each
/// revoked one's revocation was acknowledged.
pub struct Sessions {
    pub appwrite: Arc<AppwriteStandIn>,
    generation: Mutex<HashMap<(usize, usize), usize>>,
    revoked: Mutex<HashMap<String, Instant>>,
}

/// The user ID of racer user `user`.
pub fn user_id(user: usize) -> String {
    format!("racer-{user}")
}

fn token(user: usize, slot: usize, generation: usize) -> String {
    format!("race-{user}-{slot}-{generation}")
}

impl Sessions {
    /// A first session in every slot, at `appwrite`.
    pub fn start(appwrite: Arc<AppwriteStandIn>) -> Arc<Sessions> {
        let sessions = Sessions {
            appwrite,
            generation: Mutex::default(),
            revoked: Mutex::default(),
        };
        for user in 0..USERS {
            for slot in 0..SESSIONS_PER_USER {
                sessions.renew(user, slot);
            }
        }
        Arc::new(sessions)
    }

    /// The live token of a slot.
    pub fn current(&self, user: usize, slot: usize) -> String {
        token(user, slot, self.generation.lock().unwrap()[&(user, slot)])
    }

    /// The live tokens of a user.
    pub fn of_user(&self, user: usize) -> Vec<String> {
        (0..SESSIONS_PER_USER)
            .map(|slot| self.current(user, slot))
            .collect()
    }

    /// `tokens` were revoked and the revocation acknowledged now; their slots get new
    /// sessions (a new sign-in).
    pub fn revoked(&self, user: usize, slots: impl IntoIterator<Item = usize>, tokens: &[String]) {
        let now = Instant::now();
        let mut revoked = self.revoked.lock().unwrap();
        for token in tokens {
            revoked.entry(token.clone()).or_insert(now);
        }
        drop(revoked);
        for slot in slots {
            self.renew(user, slot);
        }
    }

    fn renew(&self, user: usize, slot: usize) {
        let mut generation = self.generation.lock().unwrap();
        let next = generation.get(&(user, slot)).map_or(0, |g| g + 1);
        self.appwrite.add_session(
            &token(user, slot, next),
            &idp_user(&user_id(user)),
            in_a_day(),
        );
        generation.insert((user, slot), next);
    }

    fn revoked_at(&self, token: &str) -> Option<Instant> {
        self.revoked.lock().unwrap().get(token).copied()
    }
}

/// How a test revokes a session; each returns once the cache acknowledged the
/// revocation, and records it with [`Sessions::revoked`].
pub trait Revoke: Send + Sync + 'static {
    /// Signs the session in `user`'s `slot` out.
    fn sign_out(
        &self,
        sessions: &Sessions,
        client: &mut SessionCacheClient<Channel>,
        user: usize,
        slot: usize,
    ) -> impl Future<Output = ()> + Send;

    /// Ends every session of `user`.
    fn end_all(
        &self,
        sessions: &Sessions,
        client: &mut SessionCacheClient<Channel>,
        user: usize,
    ) -> impl Future<Output = ()> + Send;
}

/// What the race saw.
#[derive(Debug)]
pub struct Tally {
    /// Validates answered VALID.
    pub valid: usize,
    /// Validates that began after their session's revocation was acknowledged and
    /// still answered VALID: must be 0.
    pub revived: usize,
    pub validates: usize,
}

impl Tally {
    /// The race held on `backend`: no revoked session was served, and the schedule
    /// produced enough VALIDs for that to mean something.
    pub fn assert_held(&self, backend: impl std::fmt::Debug) {
        eprintln!("{backend:?}: {self:?}");
        assert_eq!(self.revived, 0, "{backend:?}: a revoked session was served");
        assert!(self.valid > 50, "{backend:?}: the schedule produces VALIDs");
    }
}

/// Validate of `token`, its outcome.
pub async fn validate(client: &mut SessionCacheClient<Channel>, token: &str) -> ValidateOutcome {
    client
        .validate(pb::ValidateRequest {
            token: token.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .outcome()
}

/// Runs the race against the service behind `client`; `seed` varies the schedule.
pub async fn race<R: Revoke>(
    client: &SessionCacheClient<Channel>,
    sessions: Arc<Sessions>,
    revoke: Arc<R>,
    seed: u64,
) -> Tally {
    let (valid, revived, validates) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let tasks: Vec<_> = (0..RACERS)
        .map(|racer| {
            let mut client = client.clone();
            let (sessions, revoke) = (sessions.clone(), revoke.clone());
            let (valid, revived, validates) = (valid.clone(), revived.clone(), validates.clone());
            tokio::spawn(async move {
                let mut state = (racer as u64 + seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut next = move || {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as usize
                };
                for _ in 0..STEPS {
                    let (user, slot) = (next() % USERS, next() % SESSIONS_PER_USER);
                    let current = sessions.current(user, slot);
                    // Most steps revoke while a Validate of the session is under way,
                    // then validate it again: the window the rule is about.
                    let during = if next() % 10 < 6 {
                        let (mut other, token) = (client.clone(), current.clone());
                        let during =
                            tokio::spawn(async move { validate(&mut other, &token).await });
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        if next() % 2 == 0 {
                            revoke.sign_out(&sessions, &mut client, user, slot).await;
                        } else {
                            revoke.end_all(&sessions, &mut client, user).await;
                        }
                        Some(during)
                    } else {
                        None
                    };
                    let began = Instant::now();
                    let got = validate(&mut client, &current).await;
                    validates.fetch_add(1, Ordering::SeqCst);
                    if got == ValidateOutcome::Valid {
                        valid.fetch_add(1, Ordering::SeqCst);
                        if sessions.revoked_at(&current).is_some_and(|at| at < began) {
                            revived.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    if let Some(during) = during {
                        // Began before the revocation: either answer is allowed.
                        validates.fetch_add(1, Ordering::SeqCst);
                        if during.await.unwrap() == ValidateOutcome::Valid {
                            valid.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    Tally {
        valid: valid.load(Ordering::SeqCst),
        revived: revived.load(Ordering::SeqCst),
        validates: validates.load(Ordering::SeqCst),
    }
}
