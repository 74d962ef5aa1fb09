//! `Source`, the one type both sides use for a header plus a stream of frames, and the
//! small value types around it (`Meta`, `Request`, `RequestTag`).
//!
//! A source's frames come from one of three places: a user's stream (server side), a
//! child stream being read (client side), or frames that arrived inline on the master
//! stream. The reader for child streams lives here because it *is* the source's
//! `poll_next`: no task and no channel sit between the network and the consumer.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::stream::{FusedStream, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::error::{BoxError, Error, Result};
use crate::mux::Addr;

mod channel;
mod grant;
mod remote;

use channel::ChannelFrames;
pub use channel::{SourceSender, TrySendError};
pub(crate) use grant::{Grant, ReceiveBudget};
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
    /// A request with `body`, and no tags, caller or upload: for calling a source
    /// function directly (a test, a caller in the same process).
    pub fn new(body: impl Into<Bytes>) -> Self {
        Request {
            body: body.into(),
            meta: Meta::default(),
            upload: Default::default(),
        }
    }

    /// The request's tags.
    pub fn tags(&self) -> &[RequestTag] {
        &self.meta.tags
    }

    /// The frames the client sent after the body
    /// ([`Client::lookup_and_upload`](crate::Client::lookup_and_upload)), handed out
    /// once: `None` when the request came without an upload or it was taken already
    /// (by this request or a clone). [`Upload`](crate::Upload) says how it ends and
    /// what dropping it does.
    ///
    /// An upload nobody takes is stopped (the client is told, and stops sending) when
    /// the last clone of the request is dropped; until then it holds the client's
    /// upload back, and the request does not end (END waits for the upload's end).
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
///
/// The producer can learn what became of its source: [`with_outcome`](Self::with_outcome)
/// (or [`SourceSender::finish`]) reports whether the consumer took every frame and the
/// end, let go of it first, or was told it failed.
#[must_use = "a source does nothing unless its frames are read; dropping it cancels it"]
pub struct Source {
    header: Bytes,
    meta: Meta,
    frames: Frames,
    /// Told the source's outcome, if someone asked.
    watch: Option<oneshot::Sender<Outcome>>,
}

/// What became of a source, as its producer learns it ([`Source::with_outcome`],
/// [`SourceSender::finish`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The consumer took every frame and the end (over the network: the client's
    /// consumer got `None` from the `Source`, and said so).
    Delivered,
    /// The consumer let go of the source before its end: it dropped the source or
    /// its request, or the link to it was lost.
    ConsumerGone,
    /// The source failed (its producer's error, abort or panic, or a frame over the
    /// limit) and the consumer was told this reason.
    Failed(String),
}

/// Resolves to a source's [`Outcome`] once it is known: when the source ended and
/// the consumer said whether it took everything, or when the source was dropped.
#[derive(Debug)]
#[must_use = "a future does nothing unless awaited"]
pub struct OutcomeFuture {
    rx: oneshot::Receiver<Outcome>,
}

impl Future for OutcomeFuture {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        // The watcher went without a word: the source was dropped unconsumed (a
        // cancelled request, say).
        Poll::Ready(ready!(Pin::new(&mut self.rx).poll(cx)).unwrap_or(Outcome::ConsumerGone))
    }
}

/// One step of a source as the server's pump sees it.
pub(crate) enum Event {
    Frame(Bytes),
    /// The source failed: its last event.
    Failed(Error),
    /// The producer waits until the consumer took every frame before this.
    Sync(oneshot::Sender<()>),
}

enum Frames {
    Local(BoxFrames),
    Channel(Box<ChannelFrames>),
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
            watch: None,
        }
    }

    /// A source with no frames.
    pub fn empty(header: impl Into<Bytes>) -> Self {
        Source {
            header: header.into(),
            meta: Meta::default(),
            frames: Frames::Inline(VecDeque::new()),
            watch: None,
        }
    }

    /// A source fed through a bounded channel (Go's `Out` channel): send frames with
    /// the [`SourceSender`]; dropping it completes the source, [`SourceSender::abort`]
    /// fails it. `capacity` frames are buffered before `send` waits.
    ///
    /// # Panics
    /// If `capacity` is 0.
    pub fn channel(header: impl Into<Bytes>, capacity: usize) -> (SourceSender, Source) {
        let (tx, frames) = channel::channel(capacity);
        let source = Source {
            header: header.into(),
            meta: Meta::default(),
            frames: Frames::Channel(Box::new(frames)),
            watch: None,
        };
        (tx, source)
    }

    /// This source, and a future of its [`Outcome`]: for a producer that must know
    /// whether its frames reached the consumer (an at-least-once queue acknowledging
    /// upstream, say). A watched source is never sent inline with its announcement,
    /// so the client can confirm it; asking again replaces the earlier future, which
    /// then resolves to [`Outcome::ConsumerGone`].
    pub fn with_outcome(mut self) -> (Source, OutcomeFuture) {
        let (tx, rx) = oneshot::channel();
        self.watch = Some(tx);
        (self, OutcomeFuture { rx })
    }

    /// Takes the outcome's watcher: the caller reports the outcome from now on.
    pub(crate) fn take_watch(&mut self) -> Option<oneshot::Sender<Outcome>> {
        self.watch.take()
    }

    /// True when the producer waits for the outcome.
    pub(crate) fn is_watched(&self) -> bool {
        self.watch.is_some()
    }

    pub(crate) fn inline(header: Bytes, meta: Meta, frames: VecDeque<Bytes>) -> Self {
        Source {
            header,
            meta,
            frames: Frames::Inline(frames),
            watch: None,
        }
    }

    pub(crate) fn remote(header: Bytes, meta: Meta, r: RemoteFrames) -> Self {
        Source {
            header,
            meta,
            frames: Frames::Remote(Box::new(r)),
            watch: None,
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

    /// The next event of the source: a frame, its failure, a producer's flush, or
    /// `None` at its end. Used by the server's pump, which reports flushes and the
    /// outcome itself; [`poll_next`](Stream::poll_next) is this for a local consumer.
    #[inline]
    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let r = match &mut self.frames {
            Frames::Local(s) => ready!(s.as_mut().poll_next(cx)).map(Event::from),
            Frames::Channel(c) => ready!(c.poll_event(cx, &mut self.watch)),
            Frames::Inline(q) => q.pop_front().map(Event::Frame),
            Frames::Remote(r) => ready!(r.poll_frame(cx)).map(Event::from),
            Frames::Done => None,
        };
        if !matches!(r, Some(Event::Frame(_) | Event::Sync(_))) {
            self.ended(r.is_some());
        }
        Poll::Ready(r)
    }

    /// The source's last item was taken: a failure (`failed`) or the end. After it
    /// the source is done.
    #[cold]
    fn ended(&mut self, failed: bool) {
        self.frames = if failed {
            Frames::Inline(VecDeque::new())
        } else {
            Frames::Done
        };
    }

    /// Tells the watcher, if any, how the source ended.
    pub(crate) fn report(&mut self, outcome: Outcome) {
        if let Some(w) = self.watch.take() {
            // Err: nobody waits for the outcome any more.
            drop(w.send(outcome));
        }
    }
}

impl From<Result<Bytes>> for Event {
    fn from(r: Result<Bytes>) -> Event {
        match r {
            Ok(f) => Event::Frame(f),
            Err(e) => Event::Failed(e),
        }
    }
}

impl Stream for Source {
    type Item = Result<Bytes>;

    /// A local consumer: a flush resolves as it is reached (every frame before it
    /// was taken), and the end or a failure is the outcome.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        let this = self.get_mut();
        // A received source, per frame: straight from its reader, which handles the
        // server's flushes itself.
        if let Frames::Remote(r) = &mut this.frames {
            return match ready!(r.poll_frame(cx)) {
                Some(Ok(f)) => Poll::Ready(Some(Ok(f))),
                Some(Err(e)) => Poll::Ready(this.failed(e)),
                None => {
                    this.ended(false);
                    this.report(Outcome::Delivered);
                    Poll::Ready(None)
                }
            };
        }
        loop {
            return Poll::Ready(match ready!(this.poll_event(cx)) {
                Some(Event::Frame(f)) => Some(Ok(f)),
                Some(Event::Sync(tx)) => {
                    // Err: the producer stopped waiting for its flush.
                    let _ = tx.send(());
                    continue;
                }
                Some(Event::Failed(e)) => this.failed(e),
                None => {
                    this.report(Outcome::Delivered);
                    None
                }
            });
        }
    }
}

impl Source {
    /// The source's failure, its last item, as the consumer gets it.
    #[cold]
    fn failed(&mut self, e: Error) -> Option<Result<Bytes>> {
        self.ended(true);
        self.report(Outcome::Failed(failure_reason(&e)));
        Some(Err(e))
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.report(Outcome::ConsumerGone);
    }
}

/// What a consumer is told of a failure: an ABORT's reason.
pub(crate) fn failure_reason(e: &Error) -> String {
    match e {
        Error::SourceFailed(m) => m.clone(),
        other => other.to_string(),
    }
}

impl FusedStream for Source {
    fn is_terminated(&self) -> bool {
        matches!(self.frames, Frames::Done)
    }
}
