//! One source's child stream (`PROTOCOL.md`, "chanserv"): dial it back to the client,
//! write the source's frames in batches, end it with END or ABORT, then hold it until
//! the client is done with it.
//!
//! The client never writes on a child stream, so whenever the pump would wait (for
//! the producer, for window, for the link) it also watches the stream's read side: a
//! read that returns means the client dropped the source, refused the stream or lost
//! the link, and the producer is dropped at once, busy or idle. Holding the stream
//! after END keeps its slot on the link taken until the client let go of it, so what a
//! client holds for sources it has not reached yet is bounded by the link's slots.

use std::collections::VecDeque;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::poll_fn;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::stats::{Counters, SourceEnd};
use super::{panic_message, with_timeout, Caught, Ctx, WRITE_BATCH};
use crate::error::{Error, Result, Timeout};
use crate::frame::FrameCodec;
use crate::mux::{from_io, Addr, DialOptions, Multiplexer};
use crate::proto::adaptive::AdaptiveEncoder;
use crate::proto::chanserv::ChildPrefix;
use crate::source::Source;

/// A source announced on the master, whose frames go on a child stream.
pub(super) struct Pump<M> {
    pub(super) ctx: Arc<Ctx<M>>,
    pub(super) source: Caught<Source>,
    /// Frames taken from the source while it was announced, not written yet.
    pub(super) ready: VecDeque<Bytes>,
    /// How the source ended while it was announced, if it did.
    pub(super) ended: Option<Result<()>>,
    pub(super) reply: String,
    pub(super) req_id: u64,
    pub(super) id: u32,
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
        let opts = DialOptions::new(self.ctx.cfg.chan_accept_timeout).wait_for_slot(true);
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
            wbuf: BytesMut::with_capacity(WRITE_BATCH + 1024),
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
        let outcome = match self.frames(&mut child).await {
            Ok(()) => {
                FrameCodec::encode_end(&mut child.wbuf);
                Ok(())
            }
            Err(Stop::Failed(e)) => {
                let reason = match &e {
                    Error::SourceFailed(m) => m.clone(),
                    other => other.to_string(),
                };
                FrameCodec::encode_abort(&reason, &mut child.wbuf);
                Err(Stop::Failed(e))
            }
            Err(gone) => return Err(gone),
        };
        // The producer is done: drop it now, not when the client lets go.
        drop(self);
        child.write(None).await.map_err(Stop::Gone)?;
        child.finish().await.map_err(Stop::Gone)?;
        outcome
    }

    /// Writes frames until the source ends (`Ok`) or fails, or the stream fails.
    async fn frames(&mut self, child: &mut Child<M::Stream>) -> Result<(), Stop> {
        while let Some(f) = self.ready.pop_front() {
            if let Some(big) = child.stage(f)? {
                child.write_batch(big).await?;
            }
        }
        if let Some(ended) = self.ended.take() {
            return ended.map_err(Stop::Failed);
        }
        loop {
            let item = match next_frame(&mut self.source).now_or_never() {
                Some(item) => item,
                None => {
                    child.write(None).await.map_err(Stop::Gone)?;
                    tokio::select! {
                        item = next_frame(&mut self.source) => item,
                        e = child.gone() => return Err(Stop::Gone(e)),
                    }
                }
            };
            match item.map_err(Stop::Failed)? {
                // Most frames only join the batch: no write future is built for them.
                Some(f) => {
                    if let Some(big) = child.stage(f)? {
                        child.write_batch(big).await?;
                    }
                }
                None => return Ok(()),
            }
        }
    }
}

/// The source's next frame; a producer that panics fails its own source only.
async fn next_frame(source: &mut Source) -> Result<Option<Bytes>> {
    match AssertUnwindSafe(source.next()).catch_unwind().await {
        Ok(Some(Ok(f))) => Ok(Some(f)),
        Ok(Some(Err(e))) => Err(e),
        Ok(None) => Ok(None),
        Err(p) => Err(Error::SourceFailed(format!(
            "producer {}",
            panic_message(&p)
        ))),
    }
}

/// A child stream and its write batch.
struct Child<S> {
    s: S,
    /// The source's encoder: it learns whether the source's frames compress.
    enc: AdaptiveEncoder,
    wbuf: BytesMut,
    timeout: Option<std::time::Duration>,
    stats: Arc<Counters>,
    /// (request, source), for the list of blocked sources.
    key: (u64, u32),
    client: Addr,
    /// Frames and bytes encoded since the last write, counted when it completes.
    unsent: (u64, u64),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Child<S> {
    /// Encodes one frame into the batch. `Some(big)` when the batch must be written
    /// now: it is full, or the frame is big (`big` then holds its payload, not copied).
    ///
    /// Synchronous on purpose: an `async` step per frame would build (and move into
    /// the pump's state) a whole write future for every frame, not every batch.
    fn stage(&mut self, f: Bytes) -> Result<Option<Option<Bytes>>, Stop> {
        let len = f.len() as u64;
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
        let (s, wbuf) = (&mut self.s, &mut self.wbuf);
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
                    Poll::Pending => return poll_gone(&mut *s, cx).map(Err),
                }
            }
            match Pin::new(&mut *s).poll_flush(cx) {
                Poll::Pending => poll_gone(&mut *s, cx).map(Err),
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

    /// Resolves when the client is gone (see [`poll_gone`]).
    async fn gone(&mut self) -> Error {
        from_io(poll_fn(|cx| poll_gone(&mut self.s, cx)).await)
    }

    /// Closes this side (FIN), then holds the stream until the client let go of it.
    async fn finish(&mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        with_timeout(self.timeout, Timeout::FrameWrite, self.s.shutdown()).await?;
        // The client read the end (or dropped the source): either way its side
        // closes, and what it says about it no longer matters.
        drop(self.gone().await);
        Ok(())
    }
}

/// Ready when the client is gone: it never writes on a child stream, so a read that
/// returns (end of stream, reset, a refusal status, a dead link) says so.
fn poll_gone<S: AsyncRead + Unpin>(s: &mut S, cx: &mut Context<'_>) -> Poll<io::Error> {
    let mut b = [0u8; 1];
    let mut rb = ReadBuf::new(&mut b);
    match Pin::new(s).poll_read(cx, &mut rb) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "the client closed the source",
        )),
        Poll::Ready(Ok(())) => Poll::Ready(io::Error::other(Error::Protocol(
            "the client wrote on a child stream".into(),
        ))),
        Poll::Ready(Err(e)) => Poll::Ready(e),
    }
}
