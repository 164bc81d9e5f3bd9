//! How a test waits: [`eventually`] looks at a real condition every [`POLL`] until it
//! holds or the deadline passes, and then fails naming what it waited for and what it
//! saw last. No test sleeps a fixed time to let something happen.

use std::{
    fmt::{Debug, Display},
    time::Duration,
};

use tokio::time::Instant;

/// The longest any test waits for a condition to come true, unless it says otherwise.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The pause between two looks at a condition.
pub const POLL: Duration = Duration::from_millis(20);

/// Calls `check` until it answers `Ok`, pausing [`POLL`] between looks, for at most
/// `deadline` from now; returns what the `Ok` held. A look that answers `Err(seen)` has
/// not seen the condition yet; after the deadline the panic names `what` and the last
/// `seen`. One look may take at most `deadline` itself, so that a look that hangs ends
/// the wait too: the whole wait is bounded by twice the deadline.
pub async fn eventually<T, E: Debug>(
    deadline: Duration,
    what: impl Display,
    mut check: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let started = Instant::now();
    let mut looks = 0u32;
    loop {
        looks += 1;
        let seen = match tokio::time::timeout(deadline, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(seen)) => seen,
            Err(_) => panic!(
                "waited {deadline:?} for {what}: look {looks} did not finish within the deadline"
            ),
        };
        if started.elapsed() >= deadline {
            panic!("waited {deadline:?} for {what} ({looks} looks); last saw {seen:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}
