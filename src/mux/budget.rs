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

/// The link's socket as yamux sees it: coalesces yamux's writes, counts what yamux
/// writes for the [`SendBudget`], counts the link's bytes in and out ([`Traffic`]: one
/// relaxed add per read or write call, which moves a whole frame or buffer), and
/// defers yamux's flushes.
///
/// yamux writes each frame's 12-byte header apart from its body. Small writes wait in
/// `out` (up to `out_cap`); a write that does not fit leaves together with what waits
/// in one vectored write, so a data frame's header never costs a `send` of its own
/// (nor the peer a wake-up for it), and a big body is not copied into a buffer.
///
/// yamux flushes the socket after every frame, which costs a `send` per frame (a
/// request, its answer and the stream's FIN would be three). Flushes are deferred
/// until yamux waits to read, i.e. has nothing more to send right now, or 16 were
/// deferred, so frames queued together leave in one `send`.
pub(super) struct LinkIo<T> {
    io: T,
    /// Bytes accepted from yamux and not yet handed to `io`.
    out: Vec<u8>,
    /// The most `out` holds; 0 hands every write to `io` as it comes.
    out_cap: usize,
    budget: std::sync::Arc<SendBudget>,
    traffic: std::sync::Arc<Traffic>,
    /// Flushes yamux asked for and that were not done yet.
    deferred: u32,
}

const MAX_DEFERRED_FLUSHES: u32 = 16;

impl<T: AsyncWrite + Unpin> LinkIo<T> {
    pub(super) fn new(
        io: T,
        out_cap: usize,
        budget: std::sync::Arc<SendBudget>,
        traffic: std::sync::Arc<Traffic>,
    ) -> Self {
        LinkIo {
            io,
            out: Vec::with_capacity(out_cap),
            out_cap,
            budget,
            traffic,
            deferred: 0,
        }
    }

    /// Hands all of `out` to `io`.
    fn poll_send_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Sends what waits and flushes `io`.
    fn poll_flush_now(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_out(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.deferred = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` (or its start): into `out` when it fits, else to `io` after (in one
    /// vectored write with) what waits in `out`.
    fn poll_write_coalesced(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.out.len() + buf.len() <= self.out_cap {
                self.out.extend_from_slice(buf);
                return Poll::Ready(Ok(buf.len()));
            }
            if self.out.is_empty() {
                return Pin::new(&mut self.io).poll_write(cx, buf);
            }
            let both = [io::IoSlice::new(&self.out), io::IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &both))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let waiting = self.out.len();
            if n > waiting {
                self.out.clear();
                return Poll::Ready(Ok(n - waiting));
            }
            // Only (part of) what waited left: the rest of it goes first, next round.
            self.out.drain(..n);
        }
    }
}

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
            // A flush that cannot finish now goes on at the next write, flush or read.
            if let Poll::Ready(f) = self.poll_flush_now(cx) {
                f?;
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
        let n = ready!(self.poll_write_coalesced(cx, buf))?;
        self.budget.written(n);
        self.traffic.wrote(n);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.deferred += 1;
        if self.deferred < MAX_DEFERRED_FLUSHES {
            return Poll::Ready(Ok(()));
        }
        self.poll_flush_now(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_out(cx))?;
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

    /// A socket that takes at most `limit` bytes per call and notes each call's size.
    #[derive(Default)]
    struct Calls {
        limit: usize,
        calls: Vec<usize>,
        got: Vec<u8>,
    }

    impl AsyncWrite for Calls {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.limit - n);
                self.got.extend_from_slice(&b[..k]);
                n += k;
            }
            self.calls.push(n);
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn link_io(limit: usize) -> LinkIo<Calls> {
        let budget = std::sync::Arc::new(SendBudget::new(1 << 20));
        let calls = Calls {
            limit,
            ..Calls::default()
        };
        LinkIo::new(calls, 1024, budget, Default::default())
    }

    #[tokio::test]
    async fn a_frame_header_leaves_with_its_body_in_one_write() {
        use tokio::io::AsyncWriteExt;
        let mut io = link_io(usize::MAX);
        let body: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        io.write_all(b"header").await.unwrap();
        assert!(io.io.calls.is_empty(), "a small write waits");
        io.write_all(&body).await.unwrap();
        assert_eq!(io.io.calls, [6 + 4096], "header and body in one call");
        // Small writes wait for a flush that is not deferred (the 16th).
        io.write_all(b"wu").await.unwrap();
        for _ in 0..MAX_DEFERRED_FLUSHES {
            io.flush().await.unwrap();
        }
        assert_eq!(io.io.calls, [6 + 4096, 2]);
        let sent = [&b"header"[..], &body, b"wu"].concat();
        assert_eq!(io.io.got, sent);
    }

    #[tokio::test]
    async fn a_socket_that_takes_little_gets_every_byte_in_order() {
        use tokio::io::AsyncWriteExt;
        let mut io = link_io(100);
        let mut sent = Vec::new();
        for i in 0..20u32 {
            let chunk: Vec<u8> = (0..(i * 97) % 3000).map(|j| (i + j) as u8).collect();
            io.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
        }
        io.shutdown().await.unwrap();
        assert_eq!(io.io.got, sent);
        assert!(io.io.calls.iter().all(|&n| n <= 100));
    }
}
