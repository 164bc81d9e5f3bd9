//! A connection's task polled behind the tasks already runnable on its worker when the
//! server is busy, so that it reads the requests that have come and writes the answers
//! that are ready in one go.
//!
//! Each call on an HTTP/2 connection is a task of its own (hyper spawns one per stream);
//! a call that finishes wakes its connection's task to write the answer. Tokio runs a
//! task woken from a running task next, before the tasks queued (its LIFO slot), so a
//! connection wrote each answer on its own, one `writev` and one pass through h2 per
//! call, while the other calls that the same batch of Redis replies (or the same read of
//! requests) had finished waited in the queue behind it. Polled behind them, the
//! connection finds all of their answers and writes them together, and on its next read
//! finds more requests waiting (BENCHMARKS.md, "Connections polled behind their calls").
//!
//! A connection's task, woken, first yields once ([`Behind`]) when the server is busy
//! ([`Busy`]): more than one of its own streams is being answered ([`Answering`]), or
//! more than one stream has started on the server since the connection last looked.
//! Woken by itself while it runs, a tokio task goes to the back of its worker's queue,
//! not to the LIFO slot. On a quiet server there is nothing to gather, and the yield would
//! only cost a trip through the scheduler and the wake-up of another worker: yielding on
//! every wake cost a Get hit at one call in flight 1.5-2x its CPU.

use std::{
    cell::Cell,
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use super::conn::{Activity, Connections};

pin_project_lite::pin_project! {
    /// `F`, polled only after it has yielded once since it was last woken, when `busy`
    /// says so when it is woken.
    pub(crate) struct Behind<F, B> {
        #[pin]
        inner: F,
        busy: B,
        yielded: bool,
    }
}

impl<F: Future, B: Fn() -> bool> Behind<F, B> {
    pub(crate) fn new(inner: F, busy: B) -> Self {
        Behind {
            inner,
            busy,
            yielded: false,
        }
    }
}

impl<F: Future, B: Fn() -> bool> Future for Behind<F, B> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if !*this.yielded && (this.busy)() {
            *this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        *this.yielded = false;
        this.inner.poll(cx)
    }
}

/// Whether a connection's task, woken, should first yield (see the module's
/// documentation).
pub(crate) struct Busy {
    activity: Arc<Activity>,
    connections: Arc<Connections>,
    /// Streams started on the server when the connection last looked.
    seen: Cell<u64>,
}

impl Busy {
    pub(crate) fn new(activity: Arc<Activity>, connections: Arc<Connections>) -> Self {
        let seen = Cell::new(connections.started.load(Ordering::Relaxed));
        Busy {
            activity,
            connections,
            seen,
        }
    }

    /// More than one of the connection's streams being answered, or more than one
    /// stream started on the server since it last looked.
    pub(crate) fn now(&self) -> bool {
        let started = self.connections.started.load(Ordering::Relaxed);
        let since = started.wrapping_sub(self.seen.replace(started));
        since > 1 || self.activity.answering.load(Ordering::Relaxed) > 1
    }
}

pin_project_lite::pin_project! {
    /// A stream's answer being made: counted on its connection from the moment hyper
    /// hands the request to the service until the answer is ready (or the stream is
    /// dropped), so that the connection knows whether answers of its own may be about
    /// to be ready, to be written together ([`Behind`]).
    pub(crate) struct Answering<F> {
        #[pin]
        inner: F,
        counted: Counted,
    }
}

impl<F> Answering<F> {
    pub(crate) fn new(inner: F, activity: Arc<Activity>) -> Self {
        activity.answering.fetch_add(1, Ordering::Relaxed);
        Answering {
            inner,
            counted: Counted(activity),
        }
    }
}

impl<F: Future> Future for Answering<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// One stream counted as being answered, until dropped.
struct Counted(Arc<Activity>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::Cell,
        rc::Rc,
        sync::atomic::AtomicUsize,
        task::{Wake, Waker},
    };

    use super::*;

    /// Counts the wakes it is given.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A waker that counts its wakes, and the count.
    fn counting_waker() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes::default());
        (wakes.clone(), Waker::from(wakes))
    }

    /// A future that counts its polls and is never ready.
    fn polls_counted() -> (Rc<Cell<u32>>, impl Future<Output = ()>) {
        let polls = Rc::new(Cell::new(0));
        let counted = polls.clone();
        let future = std::future::poll_fn(move |_| {
            counted.set(counted.get() + 1);
            Poll::<()>::Pending
        });
        (polls, future)
    }

    #[test]
    fn a_busy_connection_yields_once_per_wake_before_it_is_polled() {
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let (polls, inner) = polls_counted();
        let mut behind = std::pin::pin!(Behind::new(inner, || true));
        // Woken: it yields (wakes itself, not polled), then is polled.
        assert!(behind.as_mut().poll(&mut cx).is_pending());
        assert_eq!((polls.get(), wakes.0.load(Ordering::Relaxed)), (0, 1));
        assert!(behind.as_mut().poll(&mut cx).is_pending());
        assert_eq!((polls.get(), wakes.0.load(Ordering::Relaxed)), (1, 1));
        // Woken again: the same.
        assert!(behind.as_mut().poll(&mut cx).is_pending());
        assert!(behind.as_mut().poll(&mut cx).is_pending());
        assert_eq!((polls.get(), wakes.0.load(Ordering::Relaxed)), (2, 2));
    }

    #[test]
    fn a_quiet_connection_is_polled_at_once() {
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let (polls, inner) = polls_counted();
        let mut behind = std::pin::pin!(Behind::new(inner, || false));
        for _ in 0..3 {
            assert!(behind.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!((polls.get(), wakes.0.load(Ordering::Relaxed)), (3, 0));
    }
}
