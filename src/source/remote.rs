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

use super::BoxRead;
use crate::error::{Error, Result, Timeout};
use crate::frame::{FrameCodec, Item};
use crate::mux::poll_read_frames;

/// Where a remote source's child stream is: still on its way, being read, or let go
/// of once its end was read (so its slot on the link frees while the consumer still
/// takes the frames decoded ahead).
pub(crate) enum ChildStream {
    Waiting(oneshot::Receiver<BoxRead>),
    Reading(BoxRead),
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
}

impl RemoteFrames {
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        loop {
            if let Some(f) = self.ahead.pop_front() {
                self.timer = None;
                return Poll::Ready(Some(Ok(f)));
            }
            if let Some(end) = self.end.take() {
                self.end = Some(None);
                return Poll::Ready(end.map(Err));
            }
            if let Err(e) = self.decode_ahead() {
                self.end = Some(Some(e));
                continue;
            }
            if !self.ahead.is_empty() || self.end.is_some() {
                continue;
            }
            match self.poll_read(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => {
                    self.end = Some(Some(e));
                    continue;
                }
                Poll::Pending => return self.poll_timer(cx),
            }
        }
    }

    fn decode_ahead(&mut self) -> Result<()> {
        while self.ahead.len() < self.max_ahead {
            match self.codec.decode_item(&mut self.buf)? {
                Some(Item::Frame(f)) => self.ahead.push_back(f),
                Some(Item::End) => {
                    self.end = Some(None);
                    self.stream = ChildStream::Done;
                    return Ok(());
                }
                Some(Item::Abort(reason)) => {
                    self.end = Some(Some(Error::SourceFailed(reason)));
                    self.stream = ChildStream::Done;
                    return Ok(());
                }
                None => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
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
        Poll::Ready(Some(Err(Error::Timeout(kind))))
    }
}
