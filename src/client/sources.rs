//! [`Sources`]: the master stream of one request, read when polled. Each
//! announcement becomes a [`Source`] whose child stream the accept loop routes to it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use futures::stream::{FusedStream, Stream, StreamExt};
use tokio::sync::oneshot;

use super::stats::{RequestStats, RequestTally};
use super::{ClientConfig, ClientInner, RequestGuard, Routes, Slot};
use crate::error::{Error, Result, Timeout};
use crate::frame::FrameCodec;
use crate::mux::{poll_read_frames, Addr};
use crate::proto::chanserv::MasterMsg;
use crate::source::{
    poll_ahead, Ahead, ChildStream, Grant, Meta, ReadAhead, RemoteFrames, RequestTag, Source,
};
use crate::tally::Tally;

/// Finished masters kept for the next request at most; beyond, they close at once.
const MAX_FINISHED: usize = 16;

pub(super) use crate::source::Io as MasterIo;

/// The sources of one request, in the order the server announced them: a
/// `Stream<Item = Result<Source, Error>>` ending with `None` once the server said it
/// announced them all, or with one `Err` if the request failed.
///
/// Dropping it stops the request: the master stream is reset, and sources not yet
/// handed out are dropped (their producers with them). Sources already handed out
/// keep flowing.
///
/// Once the server's end arrived, the master stream's close is held (up to 16 per
/// client) and sent with the client's next request or when the client is dropped, so
/// a sequence of requests costs one packet each way per request.
#[must_use = "dropping the sources cancels the request"]
pub struct Sources {
    master: Option<Box<dyn MasterIo>>,
    finished: Arc<Mutex<Vec<Box<dyn MasterIo>>>>,
    buf: BytesMut,
    codec: FrameCodec,
    ahead: VecDeque<Source>,
    end: Option<Option<Error>>,
    guard: Arc<RequestGuard>,
    server: Option<u64>,
    /// The request's counters (and its service's name).
    tally: RequestTally,
    tags: Vec<RequestTag>,
    cfg: ClientConfig,
    routes: Arc<Mutex<Routes>>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("request", &self.guard.id)
            .field("vaddr", &self.tally.service)
            .finish()
    }
}

impl Sources {
    pub(super) fn new<M>(
        master: Box<dyn MasterIo>,
        buf: BytesMut,
        codec: FrameCodec,
        guard: Arc<RequestGuard>,
        tally: RequestTally,
        tags: &[RequestTag],
        client: &ClientInner<M>,
    ) -> Self {
        Sources {
            finished: client.finished.clone(),
            master: Some(master),
            buf,
            codec,
            ahead: VecDeque::new(),
            end: None,
            guard,
            server: None,
            tally,
            tags: tags.to_vec(),
            cfg: client.cfg.clone(),
            routes: client.routes.clone(),
            timer: None,
            done: false,
        }
    }

    /// The next source: `None` once all were announced.
    pub async fn recv(&mut self) -> Option<Result<Source>> {
        self.next().await
    }

    /// A snapshot of this request's counters: its sources, frames and bytes so far.
    /// Cheap: a few atomic loads. How fresh the numbers are: see [`RequestStats`].
    pub fn stats(&self) -> RequestStats {
        self.tally.snapshot()
    }

    fn meta(&self) -> Meta {
        Meta {
            remote_addr: self
                .server
                .map(|n| Addr::new(n, self.tally.service.clone())),
            tags: self.tags.clone(),
        }
    }

    fn on_message(&mut self, msg: MasterMsg) -> Result<()> {
        match msg {
            MasterMsg::Accept { node } => self.server = Some(node),
            MasterMsg::Announce { id, header } => {
                let stream = {
                    let mut r = self.routes.lock().unwrap();
                    match r.slots.remove(&(self.guard.id, id)) {
                        Some(Slot::Arrived(s)) => ChildStream::Reading(s),
                        Some(Slot::Waiting(_)) => {
                            return Err(Error::Protocol(format!("source {id} announced twice")))
                        }
                        None => {
                            let (tx, rx) = oneshot::channel();
                            r.slots.insert((self.guard.id, id), Slot::Waiting(tx));
                            ChildStream::Waiting(rx)
                        }
                    }
                };
                let waiting = matches!(stream, ChildStream::Waiting(_));
                self.tally.recv.announced();
                let frames = RemoteFrames {
                    stream,
                    codec: self.codec,
                    buf: BytesMut::new(),
                    ahead: VecDeque::new(),
                    max_ahead: self.cfg.frame_buffer_size,
                    end: None,
                    read_timeout: self.cfg.frame_read_timeout,
                    accept_timeout: self.cfg.chan_accept_timeout,
                    timer: None,
                    _guard: waiting.then(|| self.guard.clone() as Arc<dyn Send + Sync>),
                    tally: Tally::new(self.tally.recv.clone(), self.tally.live()),
                    grant: Grant::new(self.cfg.budget.clone(), self.cfg.max_source_window as u32),
                };
                self.ahead
                    .push_back(Source::remote(header, self.meta(), frames));
            }
            MasterMsg::Inline { header, frames, .. } => {
                let bytes = frames.iter().map(|f| f.len() as u64).sum();
                self.tally.recv.inline(frames.len() as u64, bytes);
                self.ahead
                    .push_back(Source::inline(header, self.meta(), frames.into()));
            }
            MasterMsg::End => self.end = Some(None),
            MasterMsg::Error(m) => self.end = Some(Some(Error::RequestFailed(m))),
        }
        Ok(())
    }
}

impl ReadAhead for Sources {
    type Item = Source;

    fn queue(&mut self) -> (&mut VecDeque<Source>, &mut Option<Option<Error>>) {
        (&mut self.ahead, &mut self.end)
    }

    fn decode_ahead(&mut self) -> Result<()> {
        while self.ahead.len() < self.cfg.source_buffer_size && self.end.is_none() {
            match self.codec.decode(&mut self.buf)? {
                Some(m) => self.on_message(MasterMsg::decode(m)?)?,
                None => break,
            }
        }
        Ok(())
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(master) = self.master.as_mut() else {
            return Poll::Ready(Err(Error::Reset));
        };
        match ready!(poll_read_frames(master, cx, &self.codec, &mut self.buf)) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(0) => Poll::Ready(Err(Error::Reset)),
            Ok(_) => Poll::Ready(Ok(())),
        }
    }
}

impl Stream for Sources {
    type Item = Result<Source>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Source>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match poll_ahead(this, cx) {
                Ahead::Item(s) => {
                    this.timer = None;
                    return Poll::Ready(Some(Ok(s)));
                }
                Ahead::End(end) => {
                    this.done = true;
                    this.tally.ended(end.is_some());
                    // The server closes the master after its last message; we are done
                    // too. Its close waits for the client's next request (one packet
                    // for both), unless many are waiting already.
                    if let Some(m) = this.master.take() {
                        let mut f = this.finished.lock().unwrap();
                        if f.len() < MAX_FINISHED && end.is_none() {
                            f.push(m);
                        }
                    }
                    return Poll::Ready(end.map(Err));
                }
                Ahead::Pending => {}
            }
            let Some(t) = this.cfg.master_read_timeout else {
                return Poll::Pending;
            };
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
            ready!(timer.as_mut().poll(cx));
            this.end = Some(Some(Error::Timeout(Timeout::MasterRead)));
        }
    }
}

impl FusedStream for Sources {
    fn is_terminated(&self) -> bool {
        self.done
    }
}
