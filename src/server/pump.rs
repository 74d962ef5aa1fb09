//! One source's child stream (`PROTOCOL.md`, "chanserv"): dial it back to the client,
//! write the source's frames in batches, end it with END or ABORT, then hold it until
//! the client is done with it.
//!
//! The client writes only credit on a child stream (see `credit`), so whenever the
//! pump would wait (for the producer, for credit, for window, for the link) it also
//! reads the stream: credit is applied, and a read that ends means the client dropped
//! the source, refused the stream or lost the link, and the producer is dropped at
//! once, busy or idle. Holding the stream after END keeps its slot on the link taken
//! until the client let go of it, so what a client holds for sources it has not
//! reached yet is bounded by the link's slots.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::poll_fn;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::credit::{Back, InFlight};
use super::stats::{Counters, SourceEnd};
use super::{panic_message, with_timeout, Caught, Ctx, WRITE_BATCH};
use crate::error::{Error, Result, Timeout};
use crate::frame::FrameCodec;
use crate::mux::{from_io, Addr, DialOptions, Multiplexer};
use crate::proto::adaptive::AdaptiveEncoder;
use crate::proto::chanserv::ChildPrefix;
use crate::proto::credit::cost;
use crate::source::{failure_reason, Event, Outcome, Source};

/// Room for a frame's header (and an END or ABORT) beyond a full batch.
const HEADER_ROOM: usize = 1024;

/// A source announced on the master, whose frames go on a child stream.
pub(super) struct Pump<M> {
    pub(super) ctx: Arc<Ctx<M>>,
    pub(super) source: Caught<Source>,
    /// Frames (and flushes) taken from the source while it was announced, not
    /// written yet.
    pub(super) ready: VecDeque<Event>,
    /// How the source ended while it was announced, if it did.
    pub(super) ended: Option<Result<()>>,
    pub(super) reply: String,
    pub(super) req_id: u64,
    pub(super) id: u32,
    /// What the request's sources have in flight together.
    pub(super) inflight: Arc<InFlight>,
}

/// Why a source's frames stopped before it completed.
enum Stop {
    /// The producer failed (or panicked, or made a frame over the limit): ABORT.
    Failed(Error),
    /// The stream failed (client gone, link lost, write timeout): nothing more to say.
    Gone(Error),
}

impl Stop {
    fn into_error(self) -> Error {
        match self {
            Stop::Failed(e) | Stop::Gone(e) => e,
        }
    }
}

impl<M: Multiplexer> Pump<M> {
    /// Runs the source to its end; `Err` when it did not complete.
    pub(super) async fn run(self) -> Result<()> {
        let stats = self.ctx.stats.clone();
        let _active = stats.source();
        let r = self.pump().await;
        stats.source_ended(match &r {
            Ok(()) => SourceEnd::Completed,
            Err(Stop::Failed(_)) => SourceEnd::Failed,
            Err(Stop::Gone(_)) => SourceEnd::Cut,
        });
        r.map_err(Stop::into_error)
    }

    async fn pump(mut self) -> Result<(), Stop> {
        // The request may have outrun the routes to the client's node: wait for one.
        let opts = DialOptions::new(self.ctx.cfg.chan_accept_timeout)
            .wait_for_slot(true)
            .wait_for_route(true);
        let s = self
            .ctx
            .mux
            .dial(&self.reply, opts)
            .await
            .map_err(Stop::Gone)?;
        let client = self.reply.parse().map_err(Stop::Gone)?;
        let mut child = Child {
            s,
            enc: AdaptiveEncoder::new(self.ctx.codec()),
            wbuf: BytesMut::new(),
            back: Back::new(self.inflight.clone()),
            timeout: self.ctx.cfg.frame_write_timeout,
            stats: self.ctx.stats.clone(),
            key: (self.req_id, self.id),
            client,
            unsent: (0, 0),
        };
        let prefix = ChildPrefix {
            request: self.req_id,
            source: self.id,
        };
        prefix.encode(&mut child.wbuf);
        // A failure here drops the source, which tells its watcher the consumer is
        // gone: the stream is.
        let outcome = match self.frames(&mut child).await {
            Ok(()) => {
                FrameCodec::encode_end(&mut child.wbuf);
                Ok(())
            }
            Err(Stop::Failed(e)) => {
                FrameCodec::encode_abort(&failure_reason(&e), &mut child.wbuf);
                Err(Stop::Failed(e))
            }
            Err(gone) => return Err(gone),
        };
        let mut watch = Watch(self.source.take_watch());
        // The producer is done: drop it now, not when the client lets go.
        drop(self);
        child.write(None).await.map_err(Stop::Gone)?;
        let delivered = child.finish().await.map_err(Stop::Gone)?;
        match outcome {
            Err(Stop::Failed(e)) => {
                watch.say(Outcome::Failed(failure_reason(&e)));
                Err(Stop::Failed(e))
            }
            _ if delivered => {
                watch.say(Outcome::Delivered);
                Ok(())
            }
            // The consumer let go before it took the end.
            _ => Ok(()),
        }
    }

    /// Writes frames until the source ends (`Ok`) or fails, or the stream fails.
    async fn frames(&mut self, child: &mut Child<M::Stream>) -> Result<(), Stop> {
        while let Some(ev) = self.ready.pop_front() {
            child.step(ev).await?;
        }
        // Drained: its room goes too, not held for the source's life.
        self.ready = VecDeque::new();
        if let Some(ended) = self.ended.take() {
            return ended.map_err(Stop::Failed);
        }
        loop {
            // Most frames only join the batch, in one synchronous loop: no future is
            // built and nothing is awaited for them.
            match fill(child, &mut self.source)? {
                Fill::Write(big) => child.write_batch(big).await?,
                Fill::Slow(ev) => child.put(ev).await?,
                Fill::End => return Ok(()),
                Fill::Pending => {
                    child.write(None).await.map_err(Stop::Gone)?;
                    child.idle();
                    let ev = tokio::select! {
                        ev = next_event(&mut self.source) => ev,
                        e = child.gone() => return Err(Stop::Gone(e)),
                    };
                    match ev {
                        Some(ev) => child.step(ev).await?,
                        None => return Ok(()),
                    }
                }
            }
        }
    }
}

/// Where [`fill`] stopped.
enum Fill {
    /// The batch must be written now (with `big`, a large payload not copied).
    Write(Option<Bytes>),
    /// Not a frame the credit allows: [`Child::put`] waits for what it needs.
    Slow(Event),
    /// The producer has nothing ready.
    Pending,
    /// The source completed.
    End,
}

/// Stages the frames the producer has ready and the credit allows, until the batch
/// must be written or something must be awaited. A producer that panics fails its
/// own source only: what it made before the panic stays staged, then its ABORT.
fn fill<S: AsyncRead + AsyncWrite + Unpin>(
    child: &mut Child<S>,
    source: &mut Source,
) -> Result<Fill, Stop> {
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    let mut staged = || loop {
        match source.poll_event(&mut cx) {
            Poll::Pending => return Ok(Fill::Pending),
            Poll::Ready(None) => return Ok(Fill::End),
            Poll::Ready(Some(Event::Frame(f))) if child.back.allows(cost(f.len())) => {
                if let Some(big) = child.stage(f)? {
                    return Ok(Fill::Write(big));
                }
            }
            Poll::Ready(Some(ev)) => return Ok(Fill::Slow(ev)),
        }
    };
    // Only the producer can panic here (`stage` does not): the frames staged
    // before its panic stay staged.
    std::panic::catch_unwind(AssertUnwindSafe(&mut staged))
        .unwrap_or_else(|p| Err(Stop::Failed(producer_panicked(&p))))
}

fn producer_panicked(p: &Box<dyn std::any::Any + Send>) -> Error {
    Error::SourceFailed(format!("producer {}", panic_message(p)))
}

/// What [`Child::stage_now`] did with an event.
enum Step {
    /// The frame joined the batch.
    Staged,
    /// The frame joined the batch, which must be written now (with `big`).
    Write(Option<Bytes>),
    /// Not a frame the credit allows: [`Child::put`] waits for what it needs.
    Slow(Event),
}

/// The producer's wish to learn the outcome; told `ConsumerGone` unless told else.
struct Watch(Option<oneshot::Sender<Outcome>>);

impl Watch {
    fn say(&mut self, outcome: Outcome) {
        if let Some(w) = self.0.take() {
            // Err: nobody waits for the outcome any more.
            drop(w.send(outcome));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.say(Outcome::ConsumerGone);
    }
}

/// The source's next event; a producer that panics fails its own source only.
async fn next_event(source: &mut Source) -> Option<Event> {
    let next = poll_fn(|cx| source.poll_event(cx));
    match AssertUnwindSafe(next).catch_unwind().await {
        Ok(ev) => ev,
        Err(p) => Some(Event::Failed(producer_panicked(&p))),
    }
}

/// A child stream and its write batch.
struct Child<S> {
    s: S,
    /// The source's encoder: it learns whether the source's frames compress.
    enc: AdaptiveEncoder,
    wbuf: BytesMut,
    /// The client's credit, read whenever the pump waits.
    back: Back,
    timeout: Option<std::time::Duration>,
    stats: Arc<Counters>,
    /// (request, source), for the list of blocked sources.
    key: (u64, u32),
    client: Addr,
    /// Frames and bytes encoded since the last write, counted when it completes.
    unsent: (u64, u64),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Child<S> {
    /// Stages a frame the credit allows without awaiting anything: the common case.
    ///
    /// Synchronous on purpose: an `async` step per frame would build (and move into
    /// the pump's state) a whole write future for every frame, not every batch.
    fn stage_now(&mut self, ev: Event) -> Result<Step, Stop> {
        match ev {
            Event::Frame(f) if self.back.allows(cost(f.len())) => Ok(match self.stage(f)? {
                Some(big) => Step::Write(big),
                None => Step::Staged,
            }),
            ev => Ok(Step::Slow(ev)),
        }
    }

    /// [`stage_now`](Self::stage_now), then whatever it takes.
    async fn step(&mut self, ev: Event) -> Result<(), Stop> {
        match self.stage_now(ev)? {
            Step::Staged => Ok(()),
            Step::Write(big) => self.write_batch(big).await,
            Step::Slow(ev) => self.put(ev).await,
        }
    }

    /// Stages a frame once the client's credit allows it, or asks the client to
    /// report when it consumed what was staged so far.
    async fn put(&mut self, ev: Event) -> Result<(), Stop> {
        match ev {
            Event::Frame(f) => {
                if !self.back.allows(cost(f.len())) {
                    // The client grows the window when it finds this word and then
                    // nothing to consume: the window was what held the source back.
                    FrameCodec::encode_blocked(&mut self.wbuf);
                    self.write(None).await.map_err(Stop::Gone)?;
                    self.idle();
                    self.wait_credit(cost(f.len())).await.map_err(Stop::Gone)?;
                }
                if let Some(big) = self.stage(f)? {
                    self.write_batch(big).await?;
                }
                Ok(())
            }
            Event::Sync(waiter) => {
                FrameCodec::encode_sync(&mut self.wbuf);
                self.back.sync(waiter);
                self.write(None).await.map_err(Stop::Gone)
            }
            Event::Failed(e) => Err(Stop::Failed(e)),
        }
    }

    /// Waits until the client's credit lets a frame of `cost` go. The consumer
    /// holds the source back meanwhile: bounded by the frame write timeout, and
    /// listed in the service's stats.
    async fn wait_credit(&mut self, cost: u64) -> Result<()> {
        let _blocked = self.stats.blocked(self.key, &self.client);
        let inflight = self.back.inflight().clone();
        let (s, back) = (&mut self.s, &mut self.back);
        let mut freed = std::pin::pin!(inflight.freed());
        let credit = poll_fn(|cx| loop {
            if let Poll::Ready(e) = back.poll_gone(s, cx) {
                return Poll::Ready(Err(e));
            }
            if back.allows(cost) {
                return Poll::Ready(Ok(()));
            }
            // Woken too when the request's other sources free bytes in flight.
            match freed.as_mut().poll(cx) {
                Poll::Ready(()) => freed.set(inflight.freed()),
                Poll::Pending => return Poll::Pending,
            }
        });
        with_timeout(self.timeout, Timeout::FrameWrite, credit).await
    }

    /// Lets go of the (written, empty) batch buffer while the pump waits for its
    /// producer or for credit: a service with many waiting sources holds no batch
    /// buffer for them. The next frame staged takes a new one.
    fn idle(&mut self) {
        debug_assert!(self.wbuf.is_empty(), "idle with a batch unwritten");
        self.wbuf = BytesMut::new();
    }

    /// Encodes one frame into the batch. `Some(big)` when the batch must be written
    /// now: it is full, or the frame is big (`big` then holds its payload, not copied).
    fn stage(&mut self, f: Bytes) -> Result<Option<Option<Bytes>>, Stop> {
        let len = f.len() as u64;
        if self.wbuf.capacity() < HEADER_ROOM {
            self.wbuf.reserve(WRITE_BATCH + HEADER_ROOM);
        }
        self.back.staged(cost(f.len()));
        // A frame the codec refuses (over the limit) fails the source: the client is
        // told why instead of waiting for frames that never come.
        let big = self
            .enc
            .encode_split(f, &mut self.wbuf)
            .map_err(Stop::Failed)?;
        self.unsent.0 += 1;
        self.unsent.1 += len;
        Ok((big.is_some() || self.wbuf.len() >= WRITE_BATCH).then_some(big))
    }

    /// Writes a full batch (and `big`), then lets the sibling sources of this task,
    /// and the worker, have their turn even when this producer and the link never
    /// make us wait.
    async fn write_batch(&mut self, big: Option<Bytes>) -> Result<(), Stop> {
        self.write(big).await.map_err(Stop::Gone)?;
        tokio::task::consume_budget().await;
        Ok(())
    }

    /// Writes the batch, then `big` (a large payload that is not copied), while
    /// watching the read side. Bounded by the frame write timeout, if any.
    async fn write(&mut self, big: Option<Bytes>) -> Result<()> {
        let (s, wbuf, back) = (&mut self.s, &mut self.wbuf, &mut self.back);
        let big = big.unwrap_or_default();
        let (mut done, mut big_done) = (0, 0);
        let write = poll_fn(|cx| {
            loop {
                let chunk = if done < wbuf.len() {
                    &wbuf[done..]
                } else if big_done < big.len() {
                    &big[big_done..]
                } else {
                    break;
                };
                match Pin::new(&mut *s).poll_write(cx, chunk) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) if done < wbuf.len() => done += n,
                    Poll::Ready(Ok(n)) => big_done += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return back.poll_gone(&mut *s, cx).map(Err),
                }
            }
            match Pin::new(&mut *s).poll_flush(cx) {
                Poll::Pending => back.poll_gone(&mut *s, cx).map(Err),
                r => r,
            }
        });
        {
            let mut write = std::pin::pin!(with_timeout(self.timeout, Timeout::FrameWrite, write));
            match futures::poll!(write.as_mut()) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // The consumer (or the link to it) holds this source back: listed
                    // in the service's stats while it does.
                    let _blocked = self.stats.blocked(self.key, &self.client);
                    write.await?
                }
            }
        }
        self.wbuf.clear();
        let (frames, bytes) = std::mem::take(&mut self.unsent);
        self.stats.sent(frames, bytes);
        Ok(())
    }

    /// Resolves when the client is gone (see [`Back::poll_gone`]), applying its
    /// credit meanwhile.
    async fn gone(&mut self) -> Error {
        let (s, back) = (&mut self.s, &mut self.back);
        from_io(poll_fn(|cx| back.poll_gone(s, cx)).await)
    }

    /// Closes this side (FIN), then holds the stream until the client let go of it.
    /// True when the client said its consumer took the end (DONE) before it did.
    async fn finish(&mut self) -> Result<bool> {
        use tokio::io::AsyncWriteExt;
        with_timeout(self.timeout, Timeout::FrameWrite, self.s.shutdown()).await?;
        let (s, back) = (&mut self.s, &mut self.back);
        // The client took the end (DONE) or dropped the source: either way it lets
        // go, and how its side ends no longer matters.
        drop(poll_fn(|cx| back.poll_gone(s, cx)).await);
        Ok(self.back.done)
    }
}
