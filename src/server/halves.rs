//! [`split`]: a master stream's read and write halves for the two halves of one
//! request's task (the announcer writes, `upload.rs` reads), with the stream at hand
//! for the multiplexer's [`poll_peer_gone`](crate::Multiplexer::poll_peer_gone), which
//! `tokio::io::split` would hide.
//!
//! Both halves must be polled by the same task (they are: `announce_sources` selects
//! over both): the stream keeps one waker for some waits whichever half polls, and
//! that waker then wakes the one task.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::upload::MasterRead;
use crate::error::Error;

/// How to see, without reading, that the peer is gone from a stream.
pub(super) type GoneProbe<T> = fn(&mut T, &mut Context<'_>) -> Poll<Error>;

/// Splits `io` into halves for one task; `gone` probes the stream for its peer.
pub(super) fn split<T>(io: T, gone: GoneProbe<T>) -> (ReadHalf<T>, WriteHalf<T>) {
    let io = Arc::new(Mutex::new(io));
    (
        ReadHalf {
            io: io.clone(),
            gone,
        },
        WriteHalf(io),
    )
}

/// The read half of [`split`].
pub(super) struct ReadHalf<T> {
    io: Arc<Mutex<T>>,
    gone: GoneProbe<T>,
}

/// The write half of [`split`].
pub(super) struct WriteHalf<T>(Arc<Mutex<T>>);

impl<T: AsyncRead + Unpin> AsyncRead for ReadHalf<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io.lock().unwrap()).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + Unpin> MasterRead for ReadHalf<T> {
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<Error> {
        (self.gone)(&mut self.io.lock().unwrap(), cx)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteHalf<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.lock().unwrap()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.lock().unwrap()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.lock().unwrap()).poll_shutdown(cx)
    }
}
