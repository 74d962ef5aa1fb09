//! One request, server side: read it, run the source function, announce its
//! sources on the master (inline when small and complete), and drive the pumps of the
//! others in the same task. The master's read side (the upload, the client leaving)
//! is `upload.rs`'s.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::stream::{Stream, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use super::credit::InFlight;
use super::halves::{self, WriteHalf};
use super::pump::Pump;
use super::upload::{read_master, Phase};
use super::{
    panic_message, with_timeout, write_buf, Caught, Ctx, INLINE_BUDGET, INLINE_FRAMES, WRITE_BATCH,
};
use crate::error::{Error, Result, Timeout};
use crate::frame::{FrameCodec, HEADER_LEN};
use crate::mux::{read_frames, Addr, Multiplexer};
use crate::proto::chanserv::{MasterMsg, RequestMsg};
use crate::source::{Event, Meta, Request, Source};
use crate::upload::{Upload, UploadSlot};

type PumpFuture = futures::future::BoxFuture<'static, Result<()>>;

/// Serves one request: announces its sources on the master stream and, in the same
/// task, pumps the frames of every source that is not inline to its child stream.
///
/// One task drives all the sources of a request (each source still independent: a
/// stalled one waits alone). Frames of a request are then produced on one worker at a
/// time, so producers that share buffers do not bounce their reference counts between
/// cores, and thousands of sources cost no task each.
pub(super) async fn serve_request<M: Multiplexer>(
    ctx: &Arc<Ctx<M>>,
    master: M::Stream,
    from: Addr,
) -> Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PumpFuture>();
    let announcing = announce_sources(ctx, master, from, tx);
    let pumping = async {
        let mut pumps = futures::stream::FuturesUnordered::new();
        let mut more = true; // pumps may still come from the announcer
        loop {
            tokio::select! {
                f = rx.recv(), if more => match f {
                    Some(f) => pumps.push(f),
                    None => more = false,
                },
                Some(r) = pumps.next(), if !pumps.is_empty() => {
                    if let Err(e) = r {
                        ctx.report_chan(&e);
                    }
                }
                else => break,
            }
        }
    };
    let (r, ()) = tokio::join!(announcing, pumping);
    r
}

/// Reads the request, runs the source function and announces its sources; the pumps
/// of announced sources go to `pumps`. All along, the master's read side is read too:
/// the request's upload, then a watch for the client leaving, which cancels the request.
async fn announce_sources<M: Multiplexer>(
    ctx: &Arc<Ctx<M>>,
    mut master: M::Stream,
    from: Addr,
    pumps: tokio::sync::mpsc::UnboundedSender<PumpFuture>,
) -> Result<()> {
    let codec = ctx.codec();
    let (req, rest) = with_timeout(ctx.cfg.master_read_timeout, Timeout::MasterRead, async {
        read_request(&mut master, &codec)
            .await
            .map_err(std::io::Error::other)
    })
    .await?;
    // The request's span says which request this is on the client's side too:
    // (reply address, request id) names it on both hosts.
    tracing::Span::current()
        .record("request", req.id)
        .record("reply", tracing::field::display(&req.reply));
    tracing::debug!(
        body_len = req.body.len(),
        upload = req.upload,
        "request read"
    );
    let (feed, upload) = match req.upload {
        true => {
            let (feed, upload) = Upload::channel();
            (Some(feed), UploadSlot::new(upload))
        }
        false => (None, UploadSlot::default()),
    };
    let (phase, upload_phase) = watch::channel(match feed {
        Some(_) => Phase::Running,
        None => Phase::Ended,
    });
    let request = Request {
        body: req.body.clone(),
        meta: Meta {
            remote_addr: Some(from),
            tags: req.tags.clone(),
        },
        upload,
    };
    let (rd, wr) = halves::split(master, M::poll_peer_gone);
    let master = Master {
        ctx,
        s: wr,
        wbuf: BytesMut::new(),
        upload: upload_phase,
        stop_said: false,
    };
    // The announcer first: it writes before it first waits, so the stream's accepted
    // status leaves with ACCEPT (one yamux frame), not alone when the reader waits.
    tokio::select! {
        biased;
        r = announce_all(ctx, master, request, &req, pumps) => r,
        e = read_master(rd, rest, codec, feed, phase) => Err(e),
    }
}

/// Runs the source function and announces its sources, then says END.
async fn announce_all<M: Multiplexer>(
    ctx: &Arc<Ctx<M>>,
    mut master: Master<'_, M>,
    request: Request,
    req: &RequestMsg,
    pumps: tokio::sync::mpsc::UnboundedSender<PumpFuture>,
) -> Result<()> {
    MasterMsg::encode_accept(ctx.node, &mut master.wbuf);
    let sources = std::panic::catch_unwind(AssertUnwindSafe(|| (ctx.source_fn)(request)));
    let mut sources = match sources {
        Ok(s) => Caught::new(AssertUnwindSafe(s).catch_unwind()),
        Err(p) => return master.fail(Error::SourceFunc(panic_message(&p))).await,
    };
    let serving_deadline = ctx.cfg.serving_timeout.map(|t| Instant::now() + t);
    let inflight = Arc::new(InFlight::new(ctx.cfg.max_request_in_flight));
    let mut next_id = 0u32;
    loop {
        let item = match sources.next().now_or_never() {
            Some(item) => item,
            None => master.next_source(&mut *sources, serving_deadline).await?,
        };
        let source = match item {
            None => break,
            Some(Ok(Ok(s))) => s,
            Some(Ok(Err(msg))) => return master.fail(Error::SourceFunc(msg)).await,
            Some(Err(p)) => return master.fail(Error::SourceFunc(panic_message(&p))).await,
        };
        let id = next_id;
        next_id = next_id
            .checked_add(1)
            .ok_or_else(|| Error::SourceFunc("more than 2^32 sources in one request".into()))?;
        if let Some(pump) = announce(ctx, source, id, req, &inflight, &mut master.wbuf)? {
            // The receiver lives as long as this request's task.
            drop(pumps.send(pump));
        }
        if master.wbuf.len() >= WRITE_BATCH {
            master.write().await?;
        }
    }
    // The source function is done: drop it (and the upload, if it holds it untaken)
    // before waiting for the upload's end.
    drop(sources);
    master.end(serving_deadline).await
}

/// The serving and sourcing deadlines, whichever comes first, and which one it is.
fn first_deadline(
    serving: Option<Instant>,
    sourcing: Option<Instant>,
) -> Option<(Instant, Timeout)> {
    match (serving, sourcing) {
        (Some(a), Some(b)) if a <= b => Some((a, Timeout::Serving)),
        (Some(_), Some(b)) => Some((b, Timeout::Sourcing)),
        (Some(a), None) => Some((a, Timeout::Serving)),
        (None, Some(b)) => Some((b, Timeout::Sourcing)),
        (None, None) => None,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The server's side of a master stream: its write half and write batch, and where
/// the request's upload is (the read half is `upload::read_master`'s).
struct Master<'a, M: Multiplexer> {
    ctx: &'a Ctx<M>,
    s: WriteHalf<M::Stream>,
    wbuf: BytesMut,
    upload: watch::Receiver<Phase>,
    /// UPLOAD_STOP went into the write batch.
    stop_said: bool,
}

impl<M: Multiplexer> Master<'_, M> {
    /// Writes the batch, with UPLOAD_STOP first if the service let go of the upload.
    async fn write(&mut self) -> Result<()> {
        if !self.stop_said && *self.upload.borrow() == Phase::StopWanted {
            MasterMsg::encode_upload_stop(&mut self.wbuf);
            self.stop_said = true;
        }
        let t = self.ctx.cfg.master_write_timeout;
        write_buf(&mut self.s, &mut self.wbuf, t, Timeout::MasterWrite).await
    }

    /// Waits for the source function's next item, once what was announced so far is
    /// written. Ends the request early when the service shuts down or the serving or
    /// sourcing timeout passes (that one is told to the client); a client that leaves
    /// ends it through `read_master`.
    async fn next_source<S: Stream + Unpin>(
        &mut self,
        sources: &mut S,
        serving_deadline: Option<Instant>,
    ) -> Result<Option<S::Item>> {
        self.write().await?;
        let sourcing = self.ctx.cfg.sourcing_timeout.map(|t| Instant::now() + t);
        let deadline = first_deadline(serving_deadline, sourcing);
        loop {
            tokio::select! {
                item = sources.next() => return Ok(item),
                _ = self.ctx.cancel.cancelled() => return Err(Error::Closed),
                _ = stop_wanted(&mut self.upload), if !self.stop_said => self.write().await?,
                _ = sleep_until(deadline.map(|d| d.0)) => {
                    return self.fail(Error::Timeout(deadline.expect("armed").1)).await
                }
            }
        }
    }

    /// Says END and closes the master, once the upload (if any) ended: END is the
    /// server's last word, so the client's `Sources` outlives its upload.
    async fn end(mut self, serving_deadline: Option<Instant>) -> Result<()> {
        loop {
            if *self.upload.borrow_and_update() == Phase::Ended {
                break;
            }
            self.write().await?;
            tokio::select! {
                r = self.upload.changed() => if r.is_err() {
                    // The reader is gone, and with it this request (see announce_sources).
                    std::future::pending::<()>().await;
                },
                _ = self.ctx.cancel.cancelled() => return Err(Error::Closed),
                _ = sleep_until(serving_deadline) => {
                    return self.fail(Error::Timeout(Timeout::Serving)).await
                }
            }
        }
        MasterMsg::encode_end(&mut self.wbuf);
        self.write().await?;
        // Everything was said; a client that is gone by now lost nothing.
        let t = self.ctx.cfg.master_write_timeout;
        if let Err(e) = with_timeout(t, Timeout::MasterWrite, self.s.shutdown()).await {
            tracing::debug!("closing a master: {e}");
        }
        Ok(())
    }

    /// Tells the client the request failed (ERROR, then close), and returns `e`.
    async fn fail<T>(&mut self, e: Error) -> Result<T> {
        if let Err(too_long) = MasterMsg::Error(e.to_string()).encode(&mut self.wbuf) {
            tracing::debug!("request failure not sent: {too_long}");
        } else if self.write().await.is_ok() {
            // The error was said; if the close fails the client is gone anyway.
            drop(self.s.shutdown().await);
        }
        Err(e)
    }
}

/// Resolves when the service let go of the upload before its end (never otherwise).
async fn stop_wanted(phase: &mut watch::Receiver<Phase>) {
    if phase.wait_for(|p| *p == Phase::StopWanted).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Announces a source: inline when it is small and complete already, else on the
/// master, returning the pump for its child stream. A header too large for a frame
/// fails the request.
fn announce<M: Multiplexer>(
    ctx: &Arc<Ctx<M>>,
    source: Source,
    id: u32,
    req: &RequestMsg,
    inflight: &Arc<InFlight>,
    wbuf: &mut BytesMut,
) -> Result<Option<PumpFuture>> {
    let mut source = Caught::new(source);
    let mut ready = VecDeque::new();
    let mut size = source.header().len();
    let mut ended = None;
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut inline = !source.is_watched();
    while size <= INLINE_BUDGET && ready.len() < INLINE_FRAMES {
        // A producer that panics here fails its own source only (it is not polled
        // again: the pump goes straight to its ABORT).
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| source.poll_event(&mut cx)));
        match polled {
            Ok(Poll::Ready(Some(Event::Frame(f)))) => {
                size += HEADER_LEN + f.len();
                ready.push_back(Event::Frame(f));
            }
            Ok(Poll::Ready(Some(Event::Sync(waiter)))) => {
                // The producer waits for the client's word: not inline.
                inline = false;
                ready.push_back(Event::Sync(waiter));
            }
            Ok(Poll::Ready(Some(Event::Failed(e)))) => ended = Some(Err(e)),
            Ok(Poll::Ready(None)) => ended = Some(Ok(())),
            Ok(Poll::Pending) => break,
            Err(p) => {
                ended = Some(Err(Error::SourceFailed(format!(
                    "producer {}",
                    panic_message(&p)
                ))))
            }
        }
        if ended.is_some() {
            break;
        }
    }
    // A channel's wish to learn the outcome may have come with its last frames.
    inline &= !source.is_watched();
    if inline && matches!(ended, Some(Ok(()))) && size <= INLINE_BUDGET && !ctx.cfg.compression {
        let frames: VecDeque<Bytes> = ready
            .into_iter()
            .filter_map(|ev| match ev {
                Event::Frame(f) => Some(f),
                _ => None,
            })
            .collect();
        MasterMsg::encode_inline(id, source.header(), &frames, wbuf)?;
        let bytes = frames.iter().map(|f| f.len() as u64).sum();
        ctx.stats.inline_source(frames.len() as u64, bytes);
        return Ok(None);
    }
    MasterMsg::encode_announce(id, source.header(), wbuf)?;
    let pump = Pump {
        ctx: ctx.clone(),
        source,
        ready,
        ended,
        reply: req.reply.clone(),
        req_id: req.id,
        id,
        inflight: inflight.clone(),
    };
    let span = tracing::debug_span!("source", source = id);
    Ok(Some(Box::pin(pump.run().instrument(span))))
}

/// Reads the request frame; what was read beyond it (the start of an upload) comes
/// back with it.
async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    codec: &FrameCodec,
) -> Result<(RequestMsg, BytesMut)> {
    let mut buf = BytesMut::new();
    loop {
        if let Some(f) = codec.decode(&mut buf)? {
            return Ok((RequestMsg::decode(f)?, buf));
        }
        if read_frames(r, codec, &mut buf).await? == 0 {
            codec.check_eof(&buf)?;
            return Err(Error::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earlier_deadline_wins_and_says_which_it_is() {
        let t0 = Instant::now();
        let (a, b) = (t0 + std::time::Duration::from_secs(1), t0);
        assert_eq!(first_deadline(None, None), None);
        assert_eq!(first_deadline(Some(a), None), Some((a, Timeout::Serving)));
        assert_eq!(first_deadline(None, Some(a)), Some((a, Timeout::Sourcing)));
        assert_eq!(
            first_deadline(Some(a), Some(b)),
            Some((b, Timeout::Sourcing))
        );
        assert_eq!(
            first_deadline(Some(b), Some(a)),
            Some((b, Timeout::Serving))
        );
        // A tie is the serving timeout: the request's own limit.
        assert_eq!(
            first_deadline(Some(a), Some(a)),
            Some((a, Timeout::Serving))
        );
    }
}
