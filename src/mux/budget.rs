//! The per-link send budget ([`SendBudget`]) and the link's socket wrapper
//! ([`LinkIo`]) that feeds it. Knows nothing of streams beyond their wakers.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::stats::Traffic;

/// Bytes handed to yamux by this link's streams and not yet written to the socket.
///
/// yamux queues each stream's writes (up to its 256 KiB window) until its connection
/// task writes them out; with many streams that is hundreds of MiB. Streams wait
/// instead while the link's queue is above `limit`, and are woken when it falls to half.
pub(super) struct SendBudget {
    limit: u64,
    handed: AtomicU64,
    written: AtomicU64,
    /// Bumped whenever waiters are woken, so a stream registers once per round.
    round: AtomicU64,
    waiters: Mutex<Vec<std::task::Waker>>,
}

impl SendBudget {
    pub(super) fn new(limit: usize) -> Self {
        SendBudget {
            limit: limit as u64,
            handed: AtomicU64::new(0),
            written: AtomicU64::new(0),
            round: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn queued(&self) -> u64 {
        let written = self.written.load(Ordering::Acquire);
        self.handed.load(Ordering::Acquire).saturating_sub(written)
    }

    /// Ready when there is room; else registers the task (once per `registered` round).
    /// A waker registered in a round stays in the list until that round is woken, so a
    /// stream that got room and then waits again in the same round is not added twice.
    pub(super) fn poll_room(
        &self,
        cx: &mut Context<'_>,
        registered: &mut Option<(u64, std::task::Waker)>,
    ) -> Poll<()> {
        if self.queued() < self.limit {
            return Poll::Ready(());
        }
        let mut w = self.waiters.lock().unwrap();
        let round = self.round.load(Ordering::Acquire);
        let known = registered
            .as_ref()
            .is_some_and(|(r, waker)| *r == round && waker.will_wake(cx.waker()));
        if !known {
            w.push(cx.waker().clone());
            *registered = Some((round, cx.waker().clone()));
        }
        drop(w);
        // The writer may have drained in between: check again after registering.
        if self.queued() < self.limit {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    pub(super) fn handed(&self, n: usize) {
        self.handed.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// The socket took `n` bytes (yamux headers included, so clamp at what was handed).
    pub(super) fn written(&self, n: usize) {
        let handed = self.handed.load(Ordering::Acquire);
        // The closure always returns Some: the update cannot fail.
        let _ = self
            .written
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some((w + n as u64).min(handed.max(w)))
            });
        if self.queued() <= self.limit / 2 {
            self.wake_all();
        }
    }

    pub(super) fn wake_all(&self) {
        let waiters = {
            let mut w = self.waiters.lock().unwrap();
            if w.is_empty() {
                return;
            }
            self.round.fetch_add(1, Ordering::AcqRel);
            std::mem::take(&mut *w)
        };
        for w in waiters {
            w.wake();
        }
    }
}

/// The link's (buffered) socket as yamux sees it: counts what yamux writes for the
/// [`SendBudget`], counts the link's bytes in and out ([`Traffic`]: one relaxed add
/// per read or write call, which moves a whole frame or buffer), and defers yamux's
/// flushes.
///
/// yamux flushes the socket after every frame, which costs a `send` per frame (a
/// request, its answer and the stream's FIN would be three). Flushes are deferred
/// until yamux waits to read, i.e. has nothing more to send right now, or 16 were
/// deferred, so frames queued together leave in one `send`.
pub(super) struct LinkIo<T> {
    pub(super) io: T,
    pub(super) budget: std::sync::Arc<SendBudget>,
    pub(super) traffic: std::sync::Arc<Traffic>,
    /// Flushes yamux asked for and that were not done yet.
    pub(super) deferred: u32,
}

const MAX_DEFERRED_FLUSHES: u32 = 16;

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for LinkIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.traffic.read(buf.filled().len() - before);
        }
        if r.is_pending() && self.deferred > 0 {
            if let Poll::Ready(f) = Pin::new(&mut self.io).poll_flush(cx) {
                f?;
                self.deferred = 0;
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for LinkIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.budget.written(n);
        self.traffic.wrote(n);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.deferred += 1;
        if self.deferred < MAX_DEFERRED_FLUSHES {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.deferred = 0;
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mux::lifeline::CountWakes;

    #[test]
    fn send_budget_holds_writers_until_the_socket_drains() {
        let b = SendBudget::new(64 * 1024);
        let (wakes, waker) = CountWakes::new();
        let mut cx = Context::from_waker(&waker);
        let mut reg = None;
        assert!(b.poll_room(&mut cx, &mut reg).is_ready());
        b.handed(64 * 1024);
        // Full: the writer waits, registered once however often it is polled.
        assert!(b.poll_room(&mut cx, &mut reg).is_pending());
        assert!(b.poll_room(&mut cx, &mut reg).is_pending());
        assert_eq!(b.waiters.lock().unwrap().len(), 1);
        // Draining to above half the limit wakes nobody; to half wakes the writer.
        b.written(16 * 1024);
        assert_eq!(wakes.count(), 0);
        assert!(b.poll_room(&mut cx, &mut reg).is_ready());
        b.handed(16 * 1024);
        assert!(b.poll_room(&mut cx, &mut reg).is_pending());
        b.written(32 * 1024);
        assert_eq!(wakes.count(), 1);
        assert!(b.poll_room(&mut cx, &mut reg).is_ready());
        // Socket bytes beyond what was handed (yamux headers) never make room
        // that was not taken.
        b.written(10 * 1024 * 1024);
        assert_eq!(b.queued(), 0);
        b.handed(64 * 1024);
        assert!(b.poll_room(&mut cx, &mut reg).is_pending());
    }
}
