//! [`Source::channel`](crate::Source::channel)'s two halves: the [`SourceSender`] a producer holds, and the
//! frames end the source reads. Besides frames, the channel carries the sender's
//! requests for a report: a flush (`SYNC` on the wire) and the wish to learn the
//! source's [`Outcome`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Event, Outcome, OutcomeFuture};
use crate::error::{Error, Result};

/// What travels from a [`SourceSender`] to its source.
pub(super) enum Msg {
    Frame(Result<Bytes>),
    /// Report once the consumer took every frame sent before this.
    Sync(oneshot::Sender<()>),
    /// Report the source's outcome.
    Watch(oneshot::Sender<Outcome>),
}

/// The receiving end of the channel, inside the `Source`.
pub(super) struct ChannelFrames {
    rx: mpsc::Receiver<Msg>,
    /// Set when the sender goes without a panic (or aborted): the end is a completion.
    completed: Arc<AtomicBool>,
    failed_once: bool,
}

impl ChannelFrames {
    /// The next event: `Watch` messages are handed to `watch`, never returned.
    pub(super) fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        watch: &mut Option<oneshot::Sender<Outcome>>,
    ) -> Poll<Option<Event>> {
        loop {
            return Poll::Ready(Some(match ready!(self.rx.poll_recv(cx)) {
                Some(Msg::Frame(Ok(f))) => Event::Frame(f),
                Some(Msg::Frame(Err(e))) => Event::Failed(e),
                Some(Msg::Sync(tx)) => Event::Sync(tx),
                Some(Msg::Watch(tx)) => {
                    *watch = Some(tx);
                    continue;
                }
                // The sender is gone: it completed the source only if it said so on
                // its way out (a sender dropped by a panic did not).
                None if !self.completed.load(Ordering::Acquire) && !self.failed_once => {
                    self.failed_once = true;
                    Event::Failed(Error::SourceFailed("producer panicked".into()))
                }
                None => return Poll::Ready(None),
            }));
        }
    }
}

/// Makes both halves (see `Source::channel`).
pub(super) fn channel(capacity: usize) -> (SourceSender, ChannelFrames) {
    let (tx, rx) = mpsc::channel(capacity);
    let completed = Arc::new(AtomicBool::new(false));
    let frames = ChannelFrames {
        rx,
        completed: completed.clone(),
        failed_once: false,
    };
    let tx = SourceSender {
        tx: Some(tx),
        completed,
    };
    (tx, frames)
}

/// The sending half of [`Source::channel`](crate::Source::channel).
///
/// Dropping it completes the source, unless the thread is panicking: then the source
/// fails, so a crashed producer is never mistaken for a finished one, whatever its
/// buffer holds.
#[derive(Debug)]
pub struct SourceSender {
    tx: Option<mpsc::Sender<Msg>>,
    completed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Frame(_) => "Frame",
            Msg::Sync(_) => "Sync",
            Msg::Watch(_) => "Watch",
        })
    }
}

impl SourceSender {
    /// Sends a frame, waiting while the buffer is full. `Err(Error::Closed)` when the
    /// source is gone (its consumer dropped it or the request was cancelled).
    pub async fn send(&self, frame: impl Into<Bytes>) -> Result<()> {
        self.put(Msg::Frame(Ok(frame.into()))).await
    }

    async fn put(&self, msg: Msg) -> Result<()> {
        match &self.tx {
            Some(tx) => tx.send(msg).await.map_err(|_| Error::Closed),
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
        tx.try_send(Msg::Frame(Ok(frame))).map_err(|e| match e {
            mpsc::error::TrySendError::Full(f) => TrySendError::Full(ok_frame(f)),
            mpsc::error::TrySendError::Closed(f) => TrySendError::Closed(ok_frame(f)),
        })
    }

    /// Waits until the consumer has *taken* every frame sent before this call (Go
    /// netchan's `Sync`): over the network, the client's consumer got them from its
    /// `Source`, not merely the client's buffer. `Err(Error::Closed)` when the source
    /// is gone first (consumer dropped it, request cancelled, link lost).
    ///
    /// Frames sent after the flush may be consumed before it resolves; it says
    /// nothing about them.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.put(Msg::Sync(tx)).await?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Completes the source (as dropping the sender does) and waits for its
    /// [`Outcome`]: [`Outcome::Delivered`] once the consumer took every frame and
    /// the end, [`Outcome::ConsumerGone`] if it let go of the source first.
    pub async fn finish(mut self) -> Outcome {
        let (tx, rx) = oneshot::channel();
        let watch = OutcomeFuture { rx };
        if self.put(Msg::Watch(tx)).await.is_err() {
            return Outcome::ConsumerGone;
        }
        self.completed.store(true, Ordering::Release);
        drop(self.tx.take());
        watch.await
    }

    /// Fails the source with `reason`; the consumer gets [`Error::SourceFailed`].
    pub async fn abort(mut self, reason: impl Into<String>) {
        if let Some(tx) = self.tx.take() {
            // The abort is what ends the source, not a panic.
            self.completed.store(true, Ordering::Release);
            // Err: the consumer is gone, and nobody is left to tell.
            drop(
                tx.send(Msg::Frame(Err(Error::SourceFailed(reason.into()))))
                    .await,
            );
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

/// The frame `try_send` put in, handed back: it always sends a frame.
fn ok_frame(msg: Msg) -> Bytes {
    match msg {
        Msg::Frame(Ok(f)) => f,
        _ => Bytes::new(),
    }
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
    use crate::Source;

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
