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
//! **Bounded provider load.** At most `--idp-max-in-flight` provider calls at once. Past
//! it a new flight waits for a slot, in a queue bounded by `--idp-max-waiting` flights,
//! as long as the deadline of the Validate that starts it still leaves
//! `--idp-timeout-ms` for the call: a cold cache after a restart, a flush or a new
//! replica is a burst of distinct tokens that the provider answers in a few rounds, not
//! an overload to shed. A flight whose deadline leaves no time is answered UNAVAILABLE
//! at once, and so is every new flight while the provider keeps failing (a circuit
//! breaker: open after [`TRIP_AFTER`] failures in a row, one probe call per
//! [`OPEN_FOR`]); when the circuit opens, the flights waiting in the queue are answered
//! UNAVAILABLE at once too, instead of piling onto a struggling provider.
//!
//! **Negative cache.** A token the provider refused is recorded in the store for
//! `--negative-ttl-seconds` and answered INVALID without a call meanwhile.

use std::{
    collections::{HashMap, hash_map},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, watch},
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
    /// `--idp-timeout-ms`: the time a call needs, which a waiting flight must still have.
    call_timeout: Duration,
    /// Flights waiting for a slot, and how many may.
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    max_waiting: usize,
    /// How the provider's session ids are hashed, when they are recorded.
    session_ids: Option<TokenHasher>,
}

/// One provider call and the Set after it, shared by every Validate of one token.
struct Flight {
    landed: watch::Receiver<Option<Landed>>,
}

/// What a flight came to.
#[derive(Clone, Debug)]
enum Landed {
    /// The provider vouched for the session. `asked_at`: when the provider call began;
    /// `stored_from`: when the Set that cached it began, if it came back STORED.
    Valid {
        session: Session,
        asked_at: Instant,
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
    /// Calls `provider` at most `max_in_flight` times at once. Without
    /// [`Validator::with_waiting`], a flight that finds every slot taken is shed at once.
    pub fn new(provider: Arc<dyn Provider>, max_in_flight: usize) -> Validator {
        Validator {
            provider,
            flights: Arc::default(),
            calls: Arc::new(Semaphore::new(max_in_flight.max(1))),
            breaker: Arc::default(),
            call_timeout: Duration::ZERO,
            waiting: Arc::default(),
            max_waiting: 0,
            session_ids: None,
        }
    }

    /// Lets at most `max_waiting` flights wait for a slot, each while its deadline
    /// still leaves `call_timeout` (`--idp-timeout-ms`) for the call.
    pub fn with_waiting(mut self, call_timeout: Duration, max_waiting: usize) -> Validator {
        self.call_timeout = call_timeout;
        self.max_waiting = max_waiting;
        self
    }

    /// Records in the store, hashed with `hasher`, the user of each session id a
    /// provider answer names (before the answer is cached, so that a logout naming only
    /// the session finds it from then on; SPEC §12).
    pub fn with_session_ids(mut self, hasher: TokenHasher) -> Validator {
        self.session_ids = Some(hasher);
        self
    }

    /// [`Validator::ask_by`] with no deadline: a flight that finds no free slot is shed.
    pub async fn ask<S: Store>(
        &self,
        token: &str,
        hash: &TokenHash,
        began: Instant,
        departure: impl Fn() -> Departure<S>,
    ) -> Verdict {
        self.ask_by(token, hash, began, None, departure).await
    }

    /// Asks the provider about `token` (hashed as `hash`), through the flight in
    /// progress for it if there is one. `began` is when the Validate began, `deadline`
    /// when its caller stops waiting for the answer (a flight it starts may wait for a
    /// provider slot until the deadline leaves just `--idp-timeout-ms`); `departure`
    /// says how to cache the answer if this Validate starts the flight.
    pub async fn ask_by<S: Store>(
        &self,
        token: &str,
        hash: &TokenHash,
        began: Instant,
        deadline: Option<Instant>,
        departure: impl Fn() -> Departure<S>,
    ) -> Verdict {
        let start_by = deadline.and_then(|d| d.checked_sub(self.call_timeout));
        for _ in 0..MAX_FLIGHTS {
            let flight = match self.board(token, hash, start_by, &departure) {
                Ok(flight) => flight,
                Err(shed) => return Verdict::Unavailable(shed),
            };
            // The deadline bounds only the wait for a slot: a call under way is cut by
            // the caller's own request timeout (gRPC's, the HTTP listener's), which
            // counts it as cut.
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
                    asked_at,
                    stored_from,
                } => {
                    // SPEC §9: an answer from a call that began before this Validate
                    // only if a Set that began after it proved no revocation came
                    // between.
                    if began <= asked_at || stored_from.is_some_and(|at| at >= began) {
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

    /// The flight in progress for `hash`, joined; or a new one, started (at once, or
    /// waiting for a slot until `start_by`); or why none may start.
    fn board<S: Store>(
        &self,
        token: &str,
        hash: &TokenHash,
        start_by: Option<Instant>,
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
        let name = self.provider.name();
        let Some(admission) = self.breaker.admits() else {
            metrics::idp_shed(name, "circuit_open");
            return Err(CIRCUIT_OPEN);
        };
        let slot = match self.calls.clone().try_acquire_owned() {
            Ok(permit) => Slot::Now(permit),
            Err(_) => {
                let in_time = start_by.filter(|&at| at > Instant::now());
                let Some(start_by) = in_time else {
                    metrics::idp_shed(name, "max_in_flight");
                    return Err("--idp-max-in-flight calls to the identity provider are in \
                                progress, and the deadline leaves no time to wait for one");
                };
                let Some(place) = Place::take(&self.waiting, self.max_waiting) else {
                    metrics::idp_shed(name, "max_in_flight");
                    return Err("--idp-max-in-flight calls to the identity provider are in \
                                progress and --idp-max-waiting calls wait for one");
                };
                Slot::Queued {
                    calls: self.calls.clone(),
                    breaker: self.breaker.clone(),
                    start_by,
                    _place: place,
                }
            }
        };
        let (land, landed) = watch::channel(None);
        let flight = Arc::new(Flight { landed });
        vacant.insert(flight.clone());
        drop(flights);
        let trip = Trip {
            provider: self.provider.clone(),
            breaker: self.breaker.clone(),
            token: token.to_owned(),
            hash: hash.clone(),
            departure: departure(),
            admission,
            slot,
            session_ids: self.session_ids.clone(),
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

const CIRCUIT_OPEN: &str = "the identity provider keeps failing; not asking it for now";

/// How a flight gets its provider slot.
enum Slot {
    /// A slot was free.
    Now(OwnedSemaphorePermit),
    /// It waits for one until `start_by`, unless the circuit opens meanwhile.
    Queued {
        calls: Arc<Semaphore>,
        breaker: Arc<Breaker>,
        start_by: Instant,
        _place: Place,
    },
}

impl Slot {
    /// The slot, or why the flight must land without a call.
    async fn wait(
        self,
        admission: Admission,
        provider: &'static str,
    ) -> Result<OwnedSemaphorePermit, &'static str> {
        let (calls, breaker, start_by, place) = match self {
            Slot::Now(permit) => return Ok(permit),
            Slot::Queued {
                calls,
                breaker,
                start_by,
                _place,
            } => (calls, breaker, start_by, _place),
        };
        let tripped = breaker.tripped.notified();
        tokio::pin!(tripped);
        // Registered before the state is read, so that a trip in between still wakes it.
        tripped.as_mut().enable();
        let shed = |reason, why| {
            metrics::idp_shed(provider, reason);
            Err(why)
        };
        if admission == Admission::Closed && breaker.is_open() {
            return shed("circuit_open", CIRCUIT_OPEN);
        }
        let result = tokio::select! {
            permit = calls.acquire_owned() => match permit {
                Ok(permit) => Ok(permit),
                Err(_) => Err("the provider slots are closed"),
            },
            () = &mut tripped, if admission == Admission::Closed => shed("circuit_open", CIRCUIT_OPEN),
            () = tokio::time::sleep_until(start_by) => shed(
                "max_in_flight",
                "no identity provider slot came free while the deadline left time for the call",
            ),
        };
        drop(place);
        // The circuit may have opened while the flight waited; a probe goes regardless.
        match result {
            Ok(_) if admission == Admission::Closed && breaker.is_open() => {
                shed("circuit_open", CIRCUIT_OPEN)
            }
            result => result,
        }
    }
}

/// A flight's place in the queue of those waiting for a slot, given back on drop.
struct Place {
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl Place {
    /// A place, unless `max` flights already wait.
    fn take(waiting: &Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Place> {
        use std::sync::atomic::Ordering;
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        metrics::idp_waiting(waiting.load(Ordering::Acquire));
        Some(Place {
            waiting: waiting.clone(),
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let left = self.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::idp_waiting(left);
    }
}

/// One flight's provider call and Set.
struct Trip<S> {
    provider: Arc<dyn Provider>,
    breaker: Arc<Breaker>,
    token: String,
    hash: TokenHash,
    departure: Departure<S>,
    admission: Admission,
    slot: Slot,
    session_ids: Option<TokenHasher>,
}

impl<S: Store> Trip<S> {
    async fn fly(self) -> Landed {
        let name = self.provider.name();
        let _permit = match self.slot.wait(self.admission, name).await {
            Ok(permit) => permit,
            Err(why) => {
                // A probe that never flew must not leave the circuit half-open forever.
                if self.admission == Admission::Probe {
                    self.breaker.abandon_probe();
                }
                return Landed::Unavailable(why);
            }
        };
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
                        asked_at: started,
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
                    asked_at: started,
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
    /// Woken when the circuit opens, for the flights waiting for a slot.
    tripped: Notify,
}

/// How the breaker let a flight go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    /// The circuit is closed.
    Closed,
    /// The one call that probes a circuit that was open.
    Probe,
}

#[derive(Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    /// Whether a call may go to the provider now, and as what.
    fn admits(&self) -> Option<Admission> {
        let mut state = self.state.lock().unwrap();
        match state.open_until {
            None => Some(Admission::Closed),
            Some(until) if Instant::now() < until || state.probing => None,
            Some(_) => {
                state.probing = true;
                Some(Admission::Probe)
            }
        }
    }

    /// Lets another call probe: this one never reached the provider.
    fn abandon_probe(&self) {
        self.state.lock().unwrap().probing = false;
    }

    /// Whether the circuit is open (or half-open with its probe under way).
    fn is_open(&self) -> bool {
        self.state.lock().unwrap().open_until.is_some()
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
            drop(state);
            self.tripped.notify_waiters();
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
            assert!(breaker.admits().is_some());
            breaker.record(false);
        }
        assert!(
            breaker.admits().is_some(),
            "open before {TRIP_AFTER} failures"
        );
        breaker.record(false);
        assert!(
            breaker.admits().is_none(),
            "still closed after {TRIP_AFTER} failures"
        );
        tokio::time::advance(OPEN_FOR).await;
        assert_eq!(
            breaker.admits(),
            Some(Admission::Probe),
            "no probe after the pause"
        );
        assert!(breaker.admits().is_none(), "two probes at once");
        breaker.record(false);
        assert!(breaker.admits().is_none(), "a failed probe did not reopen");
        tokio::time::advance(OPEN_FOR).await;
        assert_eq!(breaker.admits(), Some(Admission::Probe));
        breaker.record(true);
        assert!(
            breaker.admits() == Some(Admission::Closed) && !breaker.is_open(),
            "a good probe did not close"
        );
    }
}
