//! The client-side reader of one source's child stream: it *is* the source's
//! `poll_next`, so no task and no channel sit between the network and the consumer.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use super::grant::Grant;
use super::BoxIo;
use crate::error::{Error, Result, Timeout};
use crate::frame::{FrameCodec, Item};
use crate::mux::poll_read_frames;
use crate::tally::{SourceEnd, Tally};

/// Where a remote source's child stream is: still on its way, being read (and
/// written: credit), or let go of once the consumer took its end (after DONE) or
/// its failure.
pub(crate) enum ChildStream {
    Waiting(oneshot::Receiver<BoxIo>),
    Reading(BoxIo),
    Done,
}

/// The client-side reader of one source's child stream.
pub(crate) struct RemoteFrames {
    pub(crate) stream: ChildStream,
    pub(crate) codec: FrameCodec,
    pub(crate) buf: BytesMut,
    /// Frames decoded ahead of the consumer, at most `max_ahead`.
    pub(crate) ahead: VecDeque<Bytes>,
    pub(crate) max_ahead: usize,
    /// Set once the stream's end (or failure) was decoded; drained after `ahead`.
    pub(crate) end: Option<Option<Error>>,
    pub(crate) read_timeout: Option<Duration>,
    /// Longest wait for the child stream itself.
    pub(crate) accept_timeout: Duration,
    pub(crate) timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Keeps the request's routing entry alive until the child stream arrived.
    pub(crate) _guard: Option<Arc<dyn Send + Sync>>,
    /// Frames and bytes decoded, published once per read and at the end (never an
    /// atomic per frame), and how the source ended.
    pub(crate) tally: Tally,
    /// The credit this reader grants the server.
    pub(crate) grant: Grant,
}

/// A framed reader that decodes items ahead of its consumer: the client's `Sources`
/// (announcements) and a remote source's frames. [`poll_ahead`] is the loop both run.
pub(crate) trait ReadAhead {
    /// What the consumer gets.
    type Item;
    /// Items decoded and not yet handed out, and how the stream ended (once known;
    /// handed out after the items).
    fn queue(&mut self) -> (&mut VecDeque<Self::Item>, &mut Option<Option<Error>>);
    /// Decodes what was read into the queue, up to the reader's read-ahead.
    fn decode_ahead(&mut self) -> Result<()>;
    /// Reads more of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>>;
}

/// What [`poll_ahead`] found.
pub(crate) enum Ahead<T> {
    Item(T),
    /// The stream's end: `None` when it completed.
    End(Option<Error>),
    /// Nothing decoded and nothing to read yet.
    Pending,
}

/// Hands out the next decoded item, else the end, else decodes what was read, else
/// reads: a failure to decode or read becomes the end.
pub(crate) fn poll_ahead<R: ReadAhead>(r: &mut R, cx: &mut Context<'_>) -> Ahead<R::Item> {
    loop {
        let (items, end) = r.queue();
        if let Some(item) = items.pop_front() {
            return Ahead::Item(item);
        }
        if let Some(end) = end.take() {
            return Ahead::End(end);
        }
        let failed = match r.decode_ahead() {
            Err(e) => Some(e),
            Ok(()) if !r.queue().0.is_empty() || r.queue().1.is_some() => continue,
            Ok(()) => match r.poll_read(cx) {
                Poll::Ready(Ok(())) => None,
                Poll::Ready(Err(e)) => Some(e),
                Poll::Pending => return Ahead::Pending,
            },
        };
        if let Some(e) = failed {
            *r.queue().1 = Some(Some(e));
        }
    }
}

impl RemoteFrames {
    /// The next frame; per frame, one decoded ahead is handed out inline.
    #[inline]
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        match self.ahead.pop_front() {
            Some(f) => Poll::Ready(Some(Ok(self.took(f, cx)))),
            None => self.poll_more(cx),
        }
    }

    /// The consumer takes `f`: its credit is counted, and written when due.
    #[inline]
    fn took(&mut self, f: Bytes, cx: &mut Context<'_>) -> Bytes {
        if self.timer.is_some() {
            self.timer = None;
        }
        self.grant.consumed(f.len());
        if self.grant.has_output() {
            // Credit that cannot go yet goes with a later poll.
            let _ = self.poll_grant(cx);
        }
        f
    }

    #[inline(never)]
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        match poll_ahead(self, cx) {
            Ahead::Item(f) => Poll::Ready(Some(Ok(self.took(f, cx)))),
            Ahead::End(None) => {
                // The consumer takes the end: the server learns the source was
                // delivered before the stream is let go of.
                self.grant.done();
                if self.poll_grant(cx).is_pending() {
                    self.end = Some(None);
                    return Poll::Pending;
                }
                self.stream = ChildStream::Done;
                self.end = Some(None);
                Poll::Ready(None)
            }
            Ahead::End(Some(e)) => {
                self.grant.clear();
                self.stream = ChildStream::Done;
                self.end = Some(None);
                // An ABORT was counted when decoded (this does nothing then); a
                // failed read or decode is counted here.
                self.tally.end(SourceEnd::Failed);
                Poll::Ready(Some(Err(e)))
            }
            Ahead::Pending => {
                if self.buf.is_empty() && !self.buf.try_reclaim(MIN_KEEP) {
                    // The frames cut from the buffer's allocation are still held (by
                    // the consumer, or ahead): a waiting reader must not keep it alive
                    // after them. Once they are gone, it is the next frame's buffer,
                    // reused without a new allocation.
                    self.buf = BytesMut::new();
                }
                self.grant.starving();
                // Pending: it goes with a later poll.
                let _ = self.poll_grant(cx);
                self.poll_timer(cx)
            }
        }
    }

    /// Writes the credit due, if the stream is there to take it.
    fn poll_grant(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.stream {
            ChildStream::Reading(s) => self.grant.poll_write(s, cx),
            ChildStream::Waiting(_) => Poll::Ready(()),
            ChildStream::Done => {
                self.grant.clear();
                Poll::Ready(())
            }
        }
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        let (t, kind) = match (&self.stream, self.read_timeout) {
            (ChildStream::Waiting(_), Some(r)) if r < self.accept_timeout => {
                (r, Timeout::FrameRead)
            }
            (ChildStream::Waiting(_), _) => (self.accept_timeout, Timeout::ChanAccept),
            (ChildStream::Reading(_) | ChildStream::Done, Some(r)) => (r, Timeout::FrameRead),
            (ChildStream::Reading(_) | ChildStream::Done, None) => return Poll::Pending,
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
        ready!(timer.as_mut().poll(cx));
        self.end = Some(None);
        self.tally.end(SourceEnd::Failed);
        Poll::Ready(Some(Err(Error::Timeout(kind))))
    }
}

impl ReadAhead for RemoteFrames {
    type Item = Bytes;

    fn queue(&mut self) -> (&mut VecDeque<Bytes>, &mut Option<Option<Error>>) {
        (&mut self.ahead, &mut self.end)
    }

    fn decode_ahead(&mut self) -> Result<()> {
        self.decode_items()
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.poll_read_stream(cx)
    }
}

/// An empty read buffer kept while its reader waits has room for at least this much.
const MIN_KEEP: usize = 1;

impl RemoteFrames {
    fn decode_items(&mut self) -> Result<()> {
        while self.ahead.len() < self.max_ahead {
            match self.codec.decode_item(&mut self.buf)? {
                Some(Item::Frame(f)) => {
                    self.tally.frame(f.len());
                    self.grant.decoded_frame(f.len());
                    self.ahead.push_back(f);
                }
                Some(Item::Sync) => self.grant.decoded_sync(),
                Some(Item::Blocked) => self.grant.decoded_blocked(),
                Some(Item::End) => {
                    // The stream stays until the consumer takes the end (DONE).
                    self.tally.end(SourceEnd::Completed);
                    self.end = Some(None);
                    return Ok(());
                }
                Some(Item::Abort(reason)) => {
                    self.tally.end(SourceEnd::Failed);
                    self.end = Some(Some(Error::SourceFailed(reason)));
                    self.stream = ChildStream::Done;
                    return Ok(());
                }
                None => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_read_stream(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        // What was decoded since the last read is published before the next: one
        // batch of atomics per read, and the stats lag by at most one read.
        self.tally.flush();
        let stream = loop {
            match &mut self.stream {
                ChildStream::Reading(s) => break s,
                ChildStream::Waiting(rx) => match ready!(Pin::new(rx).poll(cx)) {
                    Ok(s) => {
                        self.stream = ChildStream::Reading(s);
                        self._guard = None;
                        self.timer = None;
                    }
                    Err(_) => return Poll::Ready(Err(Error::Reset)),
                },
                ChildStream::Done => return Poll::Ready(Err(Error::Reset)),
            }
        };
        match ready!(poll_read_frames(stream, cx, &self.codec, &mut self.buf)) {
            Err(e) => Poll::Ready(Err(e)),
            // The stream ended without its END (mid-frame or not): it was cut.
            Ok(0) => Poll::Ready(Err(Error::Reset)),
            Ok(_) => Poll::Ready(Ok(())),
        }
    }
}
