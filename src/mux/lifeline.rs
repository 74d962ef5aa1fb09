//! The life of a link (or of a node, for its local streams), as its streams see it.
//!
//! yamux does not wake a stream parked in a read or a write when its connection is
//! closed gracefully (`poll_close` never drops the streams), and a link that dies of a
//! keep-alive timeout is closed that way. So every stream watches the lifeline of what
//! carries it: when the lifeline ends, each parked read and write is woken and fails
//! with [`Error::LinkClosed`](crate::Error::LinkClosed). Owns nothing but wakers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;

use futures::task::AtomicWaker;

/// One link's (or node's) life. [`end`](Lifeline::end) is idempotent.
#[derive(Default)]
pub(crate) struct Lifeline {
    /// Set when the link starts closing: a stream error from then on is the link's.
    closing: AtomicBool,
    dead: AtomicBool,
    next: AtomicU64,
    streams: Mutex<HashMap<u64, Arc<Wakers>>>,
}

/// The tasks parked on one stream: a read and a write may wait in different tasks.
#[derive(Default)]
struct Wakers {
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Lifeline {
    /// True once the link (or node) is gone.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// True once the link is closing (or gone).
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// The link is closing: errors its streams see now are the link's.
    pub(crate) fn begin_close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Ends the life: every watching stream's parked operations are woken and fail.
    pub(crate) fn end(&self) {
        self.begin_close();
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        let streams: Vec<_> = self.streams.lock().unwrap().values().cloned().collect();
        for w in streams {
            w.read.wake();
            w.write.wake();
        }
    }

    /// A watch for one stream; dropping it stops watching.
    pub(crate) fn watch(self: &Arc<Self>) -> Watch {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let wakers = Arc::new(Wakers::default());
        self.streams.lock().unwrap().insert(id, wakers.clone());
        Watch {
            line: self.clone(),
            id,
            wakers,
        }
    }
}

/// A stream's view of its lifeline.
pub(crate) struct Watch {
    line: Arc<Lifeline>,
    id: u64,
    wakers: Arc<Wakers>,
}

/// Which half of a stream is parked.
#[derive(Clone, Copy)]
pub(crate) enum Half {
    Read,
    Write,
}

impl Watch {
    /// Called when an operation on `half` is about to return `Pending`: registers the
    /// task to be woken when the lifeline ends, and says whether it already has (then
    /// the operation must fail instead of waiting).
    pub(crate) fn parked_on_dead(&self, half: Half, cx: &mut Context<'_>) -> bool {
        let w = match half {
            Half::Read => &self.wakers.read,
            Half::Write => &self.wakers.write,
        };
        w.register(cx.waker());
        // After registering: an `end` that raced with us has either set the flag we
        // read now, or will wake the waker we just registered.
        self.line.is_dead()
    }

    /// True once the link is closing.
    pub(crate) fn is_closing(&self) -> bool {
        self.line.is_closing()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.line.streams.lock().unwrap().remove(&self.id);
    }
}

/// A waker that counts its wakes, for the unit tests of the mux's wakers.
#[cfg(test)]
pub(super) struct CountWakes(std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl CountWakes {
    /// A counter and a context whose waker bumps it.
    pub(super) fn new() -> (Arc<Self>, std::task::Waker) {
        let count = Arc::new(CountWakes(Default::default()));
        (count.clone(), std::task::Waker::from(count))
    }
    pub(super) fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
impl std::task::Wake for CountWakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ending_wakes_both_halves_of_every_watching_stream_once() {
        let line = Arc::new(Lifeline::default());
        let (a, b) = (line.watch(), line.watch());
        let (count, waker) = CountWakes::new();
        let mut cx = Context::from_waker(&waker);
        assert!(!a.parked_on_dead(Half::Read, &mut cx));
        assert!(!a.parked_on_dead(Half::Write, &mut cx));
        assert!(!b.parked_on_dead(Half::Read, &mut cx));
        drop(b); // no longer watching: not woken
        line.end();
        line.end();
        assert_eq!(count.count(), 2);
        assert!(a.parked_on_dead(Half::Read, &mut cx));
        assert!(line.watch().parked_on_dead(Half::Write, &mut cx));
        drop(a);
        assert!(line.streams.lock().unwrap().is_empty());
    }
}
