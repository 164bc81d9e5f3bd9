//! Validate's read-through (SPEC §9): on a miss, the service asks the identity provider
//! itself, once per token however many ask, and caches what it answers.
//!
//! **Single flight.** The first Validate of an uncached token starts a *flight*: a task
//! of its own that calls the provider and then, when the provider vouched for the
//! session, Sets it with the fence of that Validate's lookup (§4). Validates of the same
//! token that arrive meanwhile join the flight instead of calling. The task is spawned,
//! so a caller that gives up does not cancel the answer the others wait for.
//!
//! **The revocation rule.** A Validate that begins after a revocation returned must not
//! be answered VALID from a provider call that began before it. A joiner that arrived
//! after its flight took off is therefore served its answer only when the flight's Set
//! began after the joiner did and came back STORED: that Set found no marker at or
//! after the fence and no tombstone, so no revocation had returned before the joiner
//! began. Otherwise (STALE, REVOKED, the store down, caching disabled) the joiner is
//! served by a new flight, which necessarily takes off after it began. A Set that comes
//! back REVOKED makes the answer INVALID for everyone: the token was logged out.
//!
//! **Bounded provider load.** At most `--idp-max-in-flight` flights at once; past it, and
//! while the provider keeps failing (a circuit breaker: open after
//! [`TRIP_AFTER`] failures in a row, one probe call per [`OPEN_FOR`]), Validate answers
//! UNAVAILABLE at once instead of queueing onto a struggling provider.
//!
//! **Negative cache.** A token the provider refused is recorded in the store for
//! `--negative-ttl-seconds` and answered INVALID without a call meanwhile.

use std::{
    collections::{HashMap, hash_map},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    time::Instant,
};
use tracing::{Instrument, debug, warn};

use crate::{
    entry::Session,
    idp::{Answer, Provider},
    keys::{TokenHash, TokenHasher},
    metrics,
    store::{Fence, Store, Stored},
};

/// Provider failures in a row that open the circuit.
pub const TRIP_AFTER: u32 = 5;
/// How long an open circuit answers UNAVAILABLE before one probe call may go through.
pub const OPEN_FOR: Duration = Duration::from_secs(1);
/// Flights one Validate may wait for: the second always took off after it began, so
/// its answer is always one it may be served; the third is a safety net.
const MAX_FLIGHTS: usize = 3;

/// What Validate answers.
#[derive(Debug)]
pub enum Verdict {
    Valid(Session),
    Invalid,
    /// Nothing is known; the label says why, for the logs.
    Unavailable(&'static str),
}

/// The identity provider behind the cache, with the flights in progress.
pub struct Validator {
    provider: Arc<dyn Provider>,
    flights: Arc<Mutex<HashMap<TokenHash, Arc<Flight>>>>,
    calls: Arc<Semaphore>,
    breaker: Arc<Breaker>,
    /// How the provider's session ids are hashed, when they are recorded.
    session_ids: Option<TokenHasher>,
}

/// One provider call and the Set after it, shared by every Validate of one token.
struct Flight {
    /// When the provider call began.
    took_off: Instant,
    landed: watch::Receiver<Option<Landed>>,
}

/// What a flight came to.
#[derive(Clone, Debug)]
enum Landed {
    /// The provider vouched for the session. `stored_from`: when the Set that cached
    /// it began, if it came back STORED.
    Valid {
        session: Session,
        stored_from: Option<Instant>,
    },
    Invalid,
    Unavailable(&'static str),
}

/// What a flight needs from the Validate that starts it.
pub struct Departure<S> {
    pub store: Arc<S>,
    /// Whether the answer is cached (`--enabled` and the store up at the lookup).
    pub caching: bool,
    /// The fence of the starting Validate's lookup; `None` when the store could not
    /// answer it, and then nothing is cached.
    pub fence: Option<Fence>,
}

impl Validator {
    /// Calls `provider` at most `max_in_flight` times at once.
    pub fn new(provider: Arc<dyn Provider>, max_in_flight: usize) -> Validator {
        Validator {
            provider,
            flights: Arc::default(),
            calls: Arc::new(Semaphore::new(max_in_flight.max(1))),
            breaker: Arc::default(),
            session_ids: None,
        }
    }

    /// Records in the store, hashed with `hasher`, the user of each session id a
    /// provider answer names (before the answer is cached, so that a logout naming only
    /// the session finds it from then on; SPEC §12).
    pub fn with_session_ids(mut self, hasher: TokenHasher) -> Validator {
        self.session_ids = Some(hasher);
        self
    }

    /// Asks the provider about `token` (hashed as `hash`), through the flight in
    /// progress for it if there is one. `began` is when the Validate began; `departure`
    /// says how to cache the answer if this Validate starts the flight.
    pub async fn ask<S: Store>(
        &self,
        token: &str,
        hash: &TokenHash,
        began: Instant,
        departure: impl Fn() -> Departure<S>,
    ) -> Verdict {
        for _ in 0..MAX_FLIGHTS {
            let flight = match self.board(token, hash, &departure) {
                Ok(flight) => flight,
                Err(shed) => return Verdict::Unavailable(shed),
            };
            let mut landed = flight.landed.clone();
            let landed = match landed.wait_for(Option::is_some).await {
                Ok(landed) => landed.clone().expect("waited for Some"),
                Err(_) => Landed::Unavailable("the provider call was dropped"),
            };
            match landed {
                Landed::Invalid => return Verdict::Invalid,
                Landed::Unavailable(why) => return Verdict::Unavailable(why),
                Landed::Valid {
                    session,
                    stored_from,
                } => {
                    // SPEC §9: an answer from a call that began before this Validate
                    // only if a Set that began after it proved no revocation came
                    // between.
                    if began <= flight.took_off || stored_from.is_some_and(|at| at >= began) {
                        return Verdict::Valid(session);
                    }
                    debug!(
                        token = hash.short(),
                        "a shared answer predates this call and was not cached; asking again"
                    );
                }
            }
        }
        Verdict::Unavailable("no provider answer this call may be served")
    }

    /// The flight in progress for `hash`, joined; or a new one, started; or why none
    /// may start.
    fn board<S: Store>(
        &self,
        token: &str,
        hash: &TokenHash,
        departure: &impl Fn() -> Departure<S>,
    ) -> Result<Arc<Flight>, &'static str> {
        let mut flights = self.flights.lock().unwrap();
        let vacant = match flights.entry(hash.clone()) {
            hash_map::Entry::Occupied(flight) => {
                metrics::validate_joined();
                return Ok(flight.get().clone());
            }
            hash_map::Entry::Vacant(vacant) => vacant,
        };
        if !self.breaker.admits() {
            metrics::idp_shed(self.provider.name(), "circuit_open");
            return Err("the identity provider keeps failing; not asking it for now");
        }
        let Ok(permit) = self.calls.clone().try_acquire_owned() else {
            metrics::idp_shed(self.provider.name(), "max_in_flight");
            return Err("--idp-max-in-flight calls to the identity provider are in progress");
        };
        let (land, landed) = watch::channel(None);
        let flight = Arc::new(Flight {
            took_off: Instant::now(),
            landed,
        });
        vacant.insert(flight.clone());
        drop(flights);
        let trip = Trip {
            provider: self.provider.clone(),
            breaker: self.breaker.clone(),
            token: token.to_owned(),
            hash: hash.clone(),
            departure: departure(),
            session_ids: self.session_ids.clone(),
            _permit: permit,
        };
        let flights = self.flights.clone();
        let started = flight.clone();
        // The flight's spans belong to the trace of the Validate that started it; the
        // handle is let go when the flight lands, before anyone hears the answer.
        let parent = tracing::Span::current();
        tokio::spawn(async move {
            let hash = trip.hash.clone();
            let landed = trip.fly().instrument(parent).await;
            // Off the board before anyone hears the answer: whoever comes next starts
            // a flight that took off after the answer was given.
            {
                let mut flights = flights.lock().unwrap();
                if flights
                    .get(&hash)
                    .is_some_and(|current| Arc::ptr_eq(current, &started))
                {
                    flights.remove(&hash);
                }
            }
            let _ = land.send(Some(landed));
        });
        Ok(flight)
    }
}

/// One flight's provider call and Set.
struct Trip<S> {
    provider: Arc<dyn Provider>,
    breaker: Arc<Breaker>,
    token: String,
    hash: TokenHash,
    departure: Departure<S>,
    session_ids: Option<TokenHasher>,
    _permit: OwnedSemaphorePermit,
}

impl<S: Store> Trip<S> {
    async fn fly(self) -> Landed {
        let name = self.provider.name();
        let started = Instant::now();
        // The provider's name and what it answered; never the token.
        let span = tracing::debug_span!(
            "idp",
            otel.kind = "client",
            idp.provider = name,
            idp.result = tracing::field::Empty,
        );
        let (answer, session_id) = self
            .provider
            .validate_with_session_id(&self.token)
            .instrument(span.clone())
            .await;
        let result = match &answer {
            Ok(Answer::Valid(_)) => "valid",
            Ok(Answer::Invalid) => "invalid",
            Err(e) => e.result_label(),
        };
        span.record("idp.result", result);
        // Ends the span here: the Set that caches the answer is the store's span.
        drop(span);
        metrics::idp_call(name, result, started.elapsed());
        self.breaker.record(answer.is_ok());
        let Departure {
            store,
            caching,
            fence,
        } = self.departure;
        match answer {
            Err(e) => {
                warn!(token = self.hash.short(), provider = name, error = %e, "the identity provider did not answer");
                Landed::Unavailable(result)
            }
            Ok(Answer::Invalid) => {
                if caching && let Err(e) = store.refuse(&self.hash).await {
                    debug!(token = self.hash.short(), error = %e, "a refused token was not recorded");
                }
                Landed::Invalid
            }
            Ok(Answer::Valid(session)) => {
                let Some(fence) = fence.filter(|_| caching) else {
                    return Landed::Valid {
                        session,
                        stored_from: None,
                    };
                };
                if let (Some(hasher), Some(sid)) = (&self.session_ids, &session_id) {
                    // Before the Set: a logout naming the session that arrives once the
                    // entry can be served finds whose it is.
                    let sid = hasher.hash(sid);
                    if let Err(e) = store
                        .remember_session(&sid, &session.user.id, session.session_expire)
                        .await
                    {
                        debug!(token = self.hash.short(), error = %e, "a session id's user was not recorded");
                    }
                }
                let set_began = Instant::now();
                let stored_from = match store.set(&self.hash, &session, Some(fence)).await {
                    Ok(Stored::Stored { .. }) => Some(set_began),
                    // Logged out since: the token is no longer a session.
                    Ok(Stored::Revoked) => return Landed::Invalid,
                    // The provider vouched for a session that has already ended.
                    Ok(Stored::Expired) => return Landed::Invalid,
                    Ok(Stored::Stale | Stored::FenceOutOfRange) => None,
                    Err(e) => {
                        debug!(token = self.hash.short(), error = %e, "a validated session was not cached");
                        None
                    }
                };
                Landed::Valid {
                    session,
                    stored_from,
                }
            }
        }
    }
}

/// A circuit breaker over the provider: open after [`TRIP_AFTER`] failures in a row;
/// after [`OPEN_FOR`], one call probes, and its result closes or reopens it.
#[derive(Default)]
struct Breaker {
    state: Mutex<BreakerState>,
}

#[derive(Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    /// Whether a call may go to the provider now.
    fn admits(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        match state.open_until {
            None => true,
            Some(until) if Instant::now() < until || state.probing => false,
            Some(_) => {
                state.probing = true;
                true
            }
        }
    }

    /// Records how a call went: answered (valid or invalid), or failed.
    fn record(&self, answered: bool) {
        let mut state = self.state.lock().unwrap();
        if answered {
            *state = BreakerState::default();
            return;
        }
        state.failures = state.failures.saturating_add(1);
        if state.probing || state.failures >= TRIP_AFTER {
            state.open_until = Some(Instant::now() + OPEN_FOR);
            state.probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_probes_and_closes() {
        let breaker = Breaker::default();
        for _ in 0..TRIP_AFTER - 1 {
            assert!(breaker.admits());
            breaker.record(false);
        }
        assert!(breaker.admits(), "open before {TRIP_AFTER} failures");
        breaker.record(false);
        assert!(
            !breaker.admits(),
            "still closed after {TRIP_AFTER} failures"
        );
        tokio::time::advance(OPEN_FOR).await;
        assert!(breaker.admits(), "no probe after the pause");
        assert!(!breaker.admits(), "two probes at once");
        breaker.record(false);
        assert!(!breaker.admits(), "a failed probe did not reopen");
        tokio::time::advance(OPEN_FOR).await;
        assert!(breaker.admits());
        breaker.record(true);
        assert!(
            breaker.admits() && breaker.admits(),
            "a good probe did not close"
        );
    }
}
