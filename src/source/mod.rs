//! `Source`, the one type both sides use for a header plus a stream of frames, and the
//! small value types around it (`Meta`, `Request`, `RequestTag`).
//!
//! A source's frames come from one of three places: a user's stream (server side), a
//! child stream being read (client side), or frames that arrived inline on the master
//! stream. The reader for child streams lives here because it *is* the source's
//! `poll_next`: no task and no channel sit between the network and the consumer.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::stream::{FusedStream, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::error::{BoxError, Error, Result};
use crate::mux::Addr;

mod remote;

pub(crate) use remote::{poll_ahead, Ahead, ChildStream, ReadAhead, RemoteFrames};

/// A tag sent with a request (Go's `RequestTag`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RequestTag {
    /// Free-form metadata for the serving side (Go's `TagMeta`); it shows up in
    /// [`Request::tags`] and [`Meta::tags`].
    Meta(String),
    /// Picks the serving node by consistent hashing among the nodes that bind the
    /// service: the same bucket goes to the same node while it is up (Go's `TagBucket`).
    Bucket(String),
}

/// What is known about where a source or request came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub(crate) remote_addr: Option<Addr>,
    pub(crate) tags: Vec<RequestTag>,
}

impl Meta {
    /// The other side's address: for a received source, the serving node; for a
    /// request, the calling node. `None` for a source made locally.
    pub fn remote_addr(&self) -> Option<&Addr> {
        self.remote_addr.as_ref()
    }
    /// The request's tags.
    pub fn tags(&self) -> &[RequestTag] {
        &self.tags
    }
}

/// A request as the source function sees it.
///
/// Clones share the request's upload (see [`upload`](Request::upload)).
#[derive(Debug, Clone)]
pub struct Request {
    /// The body the client posted.
    pub body: Bytes,
    /// The caller's address and tags.
    pub meta: Meta,
    /// The upload that came after the body, until the service takes it.
    pub(crate) upload: crate::upload::UploadSlot,
}

impl Request {
    /// The request's tags.
    pub fn tags(&self) -> &[RequestTag] {
        &self.meta.tags
    }

    /// The frames the client sent after the body
    /// ([`Client::lookup_and_upload`](crate::Client::lookup_and_upload)), handed out
    /// once: `None` when the request came without an upload or it was taken already
    /// (by this request or a clone).
    ///
    /// An upload nobody takes is stopped (the client is told) when the last clone of
    /// the request is dropped; until then it holds the client's upload back.
    pub fn upload(&self) -> Option<crate::upload::Upload> {
        self.upload.take()
    }

    /// True when the client sent an upload with the request, whether it was taken
    /// already or not.
    pub fn has_upload(&self) -> bool {
        self.upload.exists()
    }
}

type BoxFrames = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;
/// A child stream as the client holds it: it reads frames and writes credit.
pub(crate) type BoxIo = Box<dyn Io>;

/// A byte stream both ways: master and child streams, boxed.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A header and a stream of frames. The same type on both sides: a client can answer
/// its own requests with sources it received.
///
/// Its frames are a `Stream<Item = Result<Bytes, Error>>` ([`recv`](Source::recv) too):
/// a source whose producer finished ends with `None`; one cut by a dead link, a
/// timeout, a reset or a server-side failure yields one `Err` and then `None`. Frames
/// arrive in order, each once.
///
/// Dropping a received `Source` resets its child stream; the server then drops the
/// producer. Dropping a local source drops its producer.
#[must_use = "a source does nothing unless its frames are read; dropping it cancels it"]
pub struct Source {
    header: Bytes,
    meta: Meta,
    frames: Frames,
}

enum Frames {
    Local(BoxFrames),
    Inline(VecDeque<Bytes>),
    Remote(Box<RemoteFrames>),
    Done,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("header_len", &self.header.len())
            .field("meta", &self.meta)
            .finish()
    }
}

impl Source {
    /// A source whose frames are the items of `frames`; it completes when the stream
    /// ends.
    pub fn new<S>(header: impl Into<Bytes>, frames: S) -> Self
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        Self::boxed(header.into(), Box::pin(frames.map(Ok)))
    }

    /// A source from a fallible stream: an `Err` item fails the source and ends it.
    /// The consumer sees [`Error::SourceFailed`] with the error's message, or the
    /// error itself when it is a [`chanserv::Error`](Error) (a source forwarded as it
    /// was received keeps its cause locally). Any error type converts: `String`,
    /// `&str`, `std::io::Error`, `anyhow::Error`, every `std::error::Error`.
    pub fn try_new<S, E>(header: impl Into<Bytes>, frames: S) -> Self
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Self::boxed(
            header.into(),
            Box::pin(frames.map(|r| r.map_err(Error::from_producer))),
        )
    }

    fn boxed(header: Bytes, frames: BoxFrames) -> Self {
        Source {
            header,
            meta: Meta::default(),
            frames: Frames::Local(frames),
        }
    }

    /// A source with no frames.
    pub fn empty(header: impl Into<Bytes>) -> Self {
        Source {
            header: header.into(),
            meta: Meta::default(),
            frames: Frames::Inline(VecDeque::new()),
        }
    }

    /// A source fed through a bounded channel (Go's `Out` channel): send frames with
    /// the [`SourceSender`]; dropping it completes the source, [`SourceSender::abort`]
    /// fails it. `capacity` frames are buffered before `send` waits.
    ///
    /// # Panics
    /// If `capacity` is 0.
    pub fn channel(header: impl Into<Bytes>, capacity: usize) -> (SourceSender, Source) {
        let (tx, mut rx) = mpsc::channel(capacity);
        let completed = Arc::new(AtomicBool::new(false));
        let done = completed.clone();
        let frames = futures::stream::poll_fn(move |cx| match ready!(rx.poll_recv(cx)) {
            // The sender is gone: it completed the source only if it said so on its
            // way out (a sender dropped by a panic did not).
            None if !done.load(Ordering::Acquire) => {
                done.store(true, Ordering::Release);
                Poll::Ready(Some(Err(Error::SourceFailed("producer panicked".into()))))
            }
            other => Poll::Ready(other),
        });
        (
            SourceSender {
                tx: Some(tx),
                completed,
            },
            Source::boxed(header.into(), Box::pin(frames)),
        )
    }

    pub(crate) fn inline(header: Bytes, meta: Meta, frames: VecDeque<Bytes>) -> Self {
        Source {
            header,
            meta,
            frames: Frames::Inline(frames),
        }
    }

    pub(crate) fn remote(header: Bytes, meta: Meta, r: RemoteFrames) -> Self {
        Source {
            header,
            meta,
            frames: Frames::Remote(Box::new(r)),
        }
    }

    /// The source's header.
    pub fn header(&self) -> &Bytes {
        &self.header
    }

    /// Where the source came from.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The next frame: `None` once the source completed.
    pub async fn recv(&mut self) -> Option<Result<Bytes>> {
        self.next().await
    }

    /// Frames already received and not yet taken, without waiting (inline sources
    /// and read-ahead). Used by the server to inline small sources.
    pub(crate) fn poll_ready_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        self.poll_next_unpin(cx)
    }
}

impl Stream for Source {
    type Item = Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        let this = self.get_mut();
        let r = match &mut this.frames {
            Frames::Local(s) => ready!(s.as_mut().poll_next(cx)),
            Frames::Inline(q) => q.pop_front().map(Ok),
            Frames::Remote(r) => ready!(r.poll_frame(cx)),
            Frames::Done => None,
        };
        if !matches!(r, Some(Ok(_))) {
            // An error is the last item; after it (or the end) the source is done.
            this.frames = match r {
                Some(Err(_)) => Frames::Inline(VecDeque::new()),
                _ => Frames::Done,
            };
        }
        Poll::Ready(r)
    }
}

impl FusedStream for Source {
    fn is_terminated(&self) -> bool {
        matches!(self.frames, Frames::Done)
    }
}

/// The sending half of [`Source::channel`].
///
/// Dropping it completes the source, unless the thread is panicking: then the source
/// fails, so a crashed producer is never mistaken for a finished one, whatever its
/// buffer holds.
#[derive(Debug)]
pub struct SourceSender {
    tx: Option<mpsc::Sender<Result<Bytes>>>,
    /// Set when the sender goes without a panic (or aborted): the end is a completion.
    completed: Arc<AtomicBool>,
}

impl SourceSender {
    /// Sends a frame, waiting while the buffer is full. `Err(Error::Closed)` when the
    /// source is gone (its consumer dropped it or the request was cancelled).
    pub async fn send(&self, frame: impl Into<Bytes>) -> Result<()> {
        match &self.tx {
            Some(tx) => tx.send(Ok(frame.into())).await.map_err(|_| Error::Closed),
            None => Err(Error::Closed),
        }
    }

    /// Sends a frame if the buffer has room, without waiting: for a producer that
    /// must not block (an event loop, a synchronous callback) and would rather drop,
    /// coalesce or retry later. The frame comes back in the error:
    /// [`TrySendError::Full`] when `capacity` frames are waiting,
    /// [`TrySendError::Closed`] when the source is gone (as [`send`](Self::send)'s
    /// `Error::Closed`).
    ///
    /// ```
    /// use chanserv::{Source, TrySendError};
    ///
    /// let (tx, _source) = Source::channel("header", 1);
    /// tx.try_send("first").unwrap();
    /// match tx.try_send("second") {
    ///     Err(TrySendError::Full(frame)) => assert_eq!(frame, "second"),
    ///     other => panic!("{other:?}"),
    /// }
    /// ```
    pub fn try_send(&self, frame: impl Into<Bytes>) -> Result<(), TrySendError> {
        let frame = frame.into();
        let Some(tx) = &self.tx else {
            return Err(TrySendError::Closed(frame));
        };
        tx.try_send(Ok(frame)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(f) => TrySendError::Full(ok_frame(f)),
            mpsc::error::TrySendError::Closed(f) => TrySendError::Closed(ok_frame(f)),
        })
    }

    /// Fails the source with `reason`; the consumer gets [`Error::SourceFailed`].
    pub async fn abort(mut self, reason: impl Into<String>) {
        if let Some(tx) = self.tx.take() {
            // The abort is what ends the source, not a panic.
            self.completed.store(true, Ordering::Release);
            // Err: the consumer is gone, and nobody is left to tell.
            drop(tx.send(Err(Error::SourceFailed(reason.into()))).await);
        }
    }

    /// True once the source was dropped by its consumer.
    pub fn is_closed(&self) -> bool {
        self.tx.as_ref().is_none_or(|t| t.is_closed())
    }
}

impl Drop for SourceSender {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.completed.store(true, Ordering::Release);
        }
    }
}

/// The frame `try_send` put in, handed back: it always sends `Ok`.
fn ok_frame(item: Result<Bytes>) -> Bytes {
    item.unwrap_or_default()
}

/// Why [`SourceSender::try_send`] did not send; the frame is handed back either way.
///
/// Not `#[non_exhaustive]`: a bounded channel is either full or closed, and callers
/// match both arms to decide between retrying and giving up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError {
    /// The source's buffer is full: retry later, or [`send`](SourceSender::send) to
    /// wait for room.
    #[error("source buffer full")]
    Full(Bytes),
    /// The source is gone (its consumer dropped it or the request was cancelled):
    /// every later send fails too.
    #[error("source closed")]
    Closed(Bytes),
}

impl TrySendError {
    /// The frame that was not sent.
    pub fn into_frame(self) -> Bytes {
        match self {
            TrySendError::Full(f) | TrySendError::Closed(f) => f,
        }
    }

    /// True when the buffer was full (the source is still alive).
    pub fn is_full(&self) -> bool {
        matches!(self, TrySendError::Full(_))
    }

    /// True when the source is gone.
    pub fn is_closed(&self) -> bool {
        matches!(self, TrySendError::Closed(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn try_send_succeeds_while_there_is_room() {
        let (tx, mut source) = Source::channel("h", 2);
        tx.try_send("a").unwrap();
        tx.try_send("b").unwrap();
        drop(tx);
        assert_eq!(source.recv().await.unwrap().unwrap(), "a");
        assert_eq!(source.recv().await.unwrap().unwrap(), "b");
        assert!(
            source.recv().await.is_none(),
            "dropping the sender completes"
        );
    }

    #[tokio::test]
    async fn try_send_gives_the_frame_back_when_full_and_sends_once_there_is_room() {
        let (tx, mut source) = Source::channel("h", 1);
        tx.try_send("a").unwrap();
        let e = tx.try_send("b").unwrap_err();
        assert!(e.is_full() && !e.is_closed());
        assert_eq!(e.into_frame(), "b");
        assert!(!tx.is_closed(), "a full source is alive");
        assert_eq!(source.recv().await.unwrap().unwrap(), "a");
        tx.try_send("c").unwrap();
        assert_eq!(source.recv().await.unwrap().unwrap(), "c");
    }

    #[test]
    fn try_send_gives_the_frame_back_once_the_consumer_dropped_the_source() {
        let (tx, source) = Source::channel("h", 4);
        drop(source);
        assert_eq!(tx.try_send("a"), Err(TrySendError::Closed("a".into())));
        assert!(tx.is_closed());
    }
}
