//! [`split`]: a master stream's read and write halves for two tasks at once (`Sources`
//! reads, the upload's task writes), where every poll wakes both.
//!
//! `tokio::io::split` is not enough here: a yamux stream keeps one waker for some
//! waits whichever half polls (its command channel is shared by writes and by reads,
//! which send window updates), so a read parked there takes the write's wake-up and an
//! upload stalls until something else wakes its task (200 ms at a time, measured).
//! So each half registers its task's waker here, and the stream is polled with one
//! waker that wakes both: a spurious wake-up at worst, never a lost one.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Splits `io` into a read half and a write half that may be polled by two tasks.
pub(super) fn split<T>(io: T) -> (ReadHalf<T>, WriteHalf<T>) {
    let wakers = Arc::new(Wakers::default());
    let shared = Arc::new(Shared {
        io: Mutex::new(io),
        waker: Waker::from(wakers.clone()),
        wakers,
    });
    (ReadHalf(shared.clone()), WriteHalf(shared))
}

struct Shared<T> {
    io: Mutex<T>,
    wakers: Arc<Wakers>,
    /// Wakes both halves' tasks: the only waker the stream ever sees.
    waker: Waker,
}

/// The last task of each half that polled.
#[derive(Default)]
struct Wakers {
    read: Mutex<Option<Waker>>,
    write: Mutex<Option<Waker>>,
}

impl Wake for Wakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        for half in [&self.read, &self.write] {
            if let Some(w) = half.lock().unwrap().take() {
                w.wake();
            }
        }
    }
}

impl<T: Unpin> Shared<T> {
    /// Polls the stream for one half, with the waker of both.
    fn poll<R>(
        &self,
        half: &Mutex<Option<Waker>>,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        {
            let mut mine = half.lock().unwrap();
            if !mine.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *mine = Some(cx.waker().clone());
            }
        }
        let mut both = Context::from_waker(&self.waker);
        let mut io = self.io.lock().unwrap();
        f(Pin::new(&mut *io), &mut both)
    }
}

/// The read half of [`split`].
pub(super) struct ReadHalf<T>(Arc<Shared<T>>);

/// The write half of [`split`].
pub(super) struct WriteHalf<T>(Arc<Shared<T>>);

impl<T: AsyncRead + Unpin> AsyncRead for ReadHalf<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = &self.0;
        s.poll(&s.wakers.read, cx, |io, cx| io.poll_read(cx, buf))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteHalf<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let s = &self.0;
        s.poll(&s.wakers.write, cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let s = &self.0;
        s.poll(&s.wakers.write, cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let s = &self.0;
        s.poll(&s.wakers.write, cx, |io, cx| io.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream with one waker slot for both directions, as yamux's command channel.
    #[derive(Default)]
    struct OneSlot {
        readable: bool,
        writable: bool,
        waker: Option<Waker>,
    }

    type Shared1 = Arc<Mutex<OneSlot>>;

    struct Io(Shared1);

    impl AsyncRead for Io {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut s = self.0.lock().unwrap();
            if s.readable {
                buf.put_slice(b"r");
                return Poll::Ready(Ok(()));
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    impl AsyncWrite for Io {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut s = self.0.lock().unwrap();
            if s.writable {
                return Poll::Ready(Ok(buf.len()));
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn set(s: &Shared1, f: impl FnOnce(&mut OneSlot)) {
        let mut s = s.lock().unwrap();
        f(&mut s);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_meant_for_one_half_reaches_both_tasks() {
        let slot = Shared1::default();
        let (mut r, mut w) = split(Io(slot.clone()));
        let reader = tokio::spawn(async move { r.read_u8().await.unwrap() });
        let writer = tokio::spawn(async move { w.write_all(b"w").await.unwrap() });
        // Both wait; the slot holds whichever registered last.
        while slot.lock().unwrap().waker.is_none() {
            tokio::task::yield_now().await;
        }
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        set(&slot, |s| s.writable = true);
        let wrote = tokio::time::timeout(Duration::from_secs(10), writer).await;
        assert!(wrote.is_ok(), "the writer was woken");
        set(&slot, |s| s.readable = true);
        let read = tokio::time::timeout(Duration::from_secs(10), reader).await;
        assert_eq!(read.expect("the reader was woken").unwrap(), b'r');
    }
}
