//! [`Upload`]: the frames a client sent after its request, as the service reads them
//! (`PROTOCOL.md`, "chanserv", "Uploads").
//!
//! Owns the consumer's end of an upload and how it ends; it does not read the master
//! stream (the server's request task does, `server/upload.rs`, only as far as this
//! consumer has room) and it does not send uploads (the client does,
//! `client/upload.rs`).

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::stream::{FusedStream, Stream, StreamExt};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// Frames the server reads ahead of an upload's consumer, at most. With the read
/// buffer (`server/upload.rs`), this bounds what an upload holds on the server; beyond
/// it, the master's window holds the client back.
pub(crate) const UPLOAD_AHEAD: usize = 16;

/// How an upload ended, as far as the master's reader knows: `Ok` for END, the error
/// for ABORT or a cut master. Set before the reader lets go of its sender.
type EndSlot = Arc<Mutex<Option<Result<()>>>>;

/// The frames a client sent after its request, taken with
/// [`Request::upload`](crate::Request::upload): a `Stream<Item = Result<Bytes, Error>>`
/// ([`recv`](Upload::recv) too).
///
/// It ends with `None` once the client said the upload is complete. It yields one
/// `Err` and then `None` otherwise: [`Error::SourceFailed`] with the client's reason
/// when the client failed it (its upload stream yielded an error), [`Error::Reset`]
/// or [`Error::LinkClosed`] when the client went away (dropped its `Sources`, lost
/// the link) before the end, [`Error::Closed`] when the request was stopped on this
/// side (the service shut down, the request failed). Frames arrive in order, each once.
///
/// The server reads the upload only as fast as it is consumed (16 frames ahead), so a
/// slow consumer slows the client's upload down through the multiplexer's window. A
/// client that leaves is seen all the same, at once (on a [`Node`](crate::Node)), and
/// cancels the request: an upload held unread then fails with [`Error::Reset`] after
/// the frames that had arrived. An `Upload` may be kept beyond the source function: a
/// source's producer can read it (an echo is `Source::try_new(header, upload)`).
///
/// Dropping it before its end stops the upload: the client is told (its upload stream
/// is dropped: a [`SourceSender`](crate::SourceSender) feeding it gets
/// [`Error::Closed`]), and what is still on its way is discarded. The request goes on.
#[must_use = "an upload that is not read holds the client back; dropping it stops the upload"]
pub struct Upload {
    rx: mpsc::Receiver<Bytes>,
    end: EndSlot,
    done: bool,
}

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upload")
            .field("queued", &self.queued())
            .field("done", &self.done)
            .finish()
    }
}

impl Upload {
    /// An upload and the reader's end that feeds it.
    pub(crate) fn channel() -> (Feed, Upload) {
        let (tx, rx) = mpsc::channel(UPLOAD_AHEAD);
        let end = EndSlot::default();
        let feed = Feed {
            tx,
            end: end.clone(),
        };
        let upload = Upload {
            rx,
            end,
            done: false,
        };
        (feed, upload)
    }

    /// Frames read ahead and not taken yet.
    pub(crate) fn queued(&self) -> usize {
        self.rx.len()
    }

    /// The next frame: `None` once the upload completed.
    pub async fn recv(&mut self) -> Option<Result<Bytes>> {
        self.next().await
    }
}

impl Stream for Upload {
    type Item = Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(f) = ready!(this.rx.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(f)));
        }
        this.done = true;
        let end = this.end.lock().unwrap().take();
        Poll::Ready(match end {
            Some(Ok(())) => None,
            Some(Err(e)) => Some(Err(e)),
            // The reader went without saying how the upload ended: the request was
            // stopped here (shutdown, request failure), not by the client.
            None => Some(Err(Error::Closed)),
        })
    }
}

impl FusedStream for Upload {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

/// The reader's end of an [`Upload`]: frames go in as the consumer makes room, and
/// [`finish`](Feed::finish) says how the upload ended.
pub(crate) struct Feed {
    pub(crate) tx: mpsc::Sender<Bytes>,
    end: EndSlot,
}

impl Feed {
    /// Says how the upload ended; the consumer sees it after the frames sent so far.
    pub(crate) fn finish(&self, end: Result<()>) {
        *self.end.lock().unwrap() = Some(end);
    }
}

/// Where a [`Request`](crate::Request) keeps its upload until the service takes it.
/// Shared by the request's clones: the first `take` gets it. When the last clone goes
/// with the upload untaken, the upload is dropped, which stops it.
#[derive(Clone, Default)]
pub(crate) struct UploadSlot(Option<Arc<Mutex<Option<Upload>>>>);

impl UploadSlot {
    pub(crate) fn new(upload: Upload) -> Self {
        UploadSlot(Some(Arc::new(Mutex::new(Some(upload)))))
    }

    pub(crate) fn take(&self) -> Option<Upload> {
        self.0.as_ref()?.lock().unwrap().take()
    }

    /// The request came with an upload (taken or not).
    pub(crate) fn exists(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for UploadSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("none"),
            Some(u) if u.lock().unwrap().is_some() => f.write_str("waiting"),
            Some(_) => f.write_str("taken"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn completion_failure_and_a_silent_reader_are_three_ends() {
        let ends = async {
            let (feed, mut up) = Upload::channel();
            feed.tx.send("a".into()).await.unwrap();
            feed.finish(Ok(()));
            drop(feed);
            assert_eq!(up.recv().await.unwrap().unwrap(), "a");
            assert!(up.recv().await.is_none());
            assert!(up.is_terminated());

            let (feed, mut up) = Upload::channel();
            feed.finish(Err(Error::SourceFailed("why".into())));
            drop(feed);
            assert!(matches!(up.recv().await, Some(Err(Error::SourceFailed(m))) if m == "why"));
            assert!(up.recv().await.is_none(), "an error is the last item");

            let (feed, mut up) = Upload::channel();
            drop(feed);
            assert!(matches!(up.recv().await, Some(Err(Error::Closed))));
            assert!(up.recv().await.is_none());
        };
        let bounded = tokio::time::timeout(std::time::Duration::from_secs(10), ends).await;
        bounded.expect("hung");
    }

    #[test]
    fn the_slot_hands_the_upload_out_once_to_any_clone() {
        let (_feed, up) = Upload::channel();
        let slot = UploadSlot::new(up);
        let twin = slot.clone();
        assert!(twin.take().is_some());
        assert!(slot.take().is_none() && slot.exists());
        assert!(!UploadSlot::default().exists());
    }
}
