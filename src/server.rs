//! `Server`: binds a service, calls the user's source function per request, announces
//! the sources on the master stream and pumps each source's frames on a child stream.
//!
//! Owns the server half of the chanserv flow (`PROTOCOL.md`, "chanserv"), its timeouts
//! and its error accounting. Small sources whose frames are all ready at once travel
//! inline on the master stream: the `connect` answer costs no child stream at all.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::{Stream, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::ErrorFn;
use crate::error::{Error, Result, Timeout};
use crate::frame::{FrameCodec, FRAME_SIZE_LIMIT, HEADER_LEN};
use crate::mux::{from_io, Addr, Listener, Multiplexer};
use crate::source::{Meta, Request, Source};
use crate::wire::{RequestMsg, MSG_ACCEPT, MSG_ANNOUNCE, MSG_END, MSG_ERROR, MSG_INLINE};

/// What to do when errors pile up (Go's `OnMaxErrorMass`).
pub type MaxErrorMassFn =
    Arc<dyn Fn(usize) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Frames of a source that are ready at once are sent inline with its announcement
/// while they fit in this many bytes (and the source is complete).
const INLINE_BUDGET: usize = 16 * 1024;
/// Child-stream writes are batched up to this many bytes. Small batches keep what
/// thousands of streams hold in yamux's queues and windows small; 8 KiB measured best
/// for `flood` (64 KiB: 1.4x the memory and 15 % fewer frames/s).
const WRITE_BATCH: usize = 8 * 1024;

/// [`Server`] settings, Go's `ServerOption`s with the same defaults:
///
/// | setting | default |
/// |---|---|
/// | `on_error` | log with `tracing` |
/// | `on_chan_error` | log with `tracing` |
/// | `max_error_mass` | 10 |
/// | `on_max_error_mass` | back off 30 s before accepting again (async, no thread blocked) |
/// | `serving_timeout` | none |
/// | `sourcing_timeout` | none |
/// | `chan_accept_timeout` | 30 s |
/// | `master_read_timeout` | none |
/// | `master_write_timeout` | none |
/// | `frame_write_timeout` | none |
/// | `use_compression` | off |
/// | `frame_size_limit` | 100 MiB |
#[derive(Clone)]
pub struct ServerConfig {
    on_error: Option<ErrorFn>,
    on_chan_error: Option<ErrorFn>,
    max_error_mass: usize,
    on_max_error_mass: Option<MaxErrorMassFn>,
    serving_timeout: Option<Duration>,
    sourcing_timeout: Option<Duration>,
    chan_accept_timeout: Duration,
    master_read_timeout: Option<Duration>,
    master_write_timeout: Option<Duration>,
    frame_write_timeout: Option<Duration>,
    compression: bool,
    frame_size_limit: usize,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("max_error_mass", &self.max_error_mass)
            .field("serving_timeout", &self.serving_timeout)
            .field("sourcing_timeout", &self.sourcing_timeout)
            .field("chan_accept_timeout", &self.chan_accept_timeout)
            .field("master_read_timeout", &self.master_read_timeout)
            .field("master_write_timeout", &self.master_write_timeout)
            .field("frame_write_timeout", &self.frame_write_timeout)
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            on_error: None,
            on_chan_error: None,
            max_error_mass: 10,
            on_max_error_mass: None,
            serving_timeout: None,
            sourcing_timeout: None,
            chan_accept_timeout: Duration::from_secs(30),
            master_read_timeout: None,
            master_write_timeout: None,
            frame_write_timeout: None,
            compression: false,
            frame_size_limit: FRAME_SIZE_LIMIT,
        }
    }
}

impl ServerConfig {
    /// Called with each request-level error (bad request, failed source function,
    /// master stream timeouts).
    pub fn on_error(&mut self, f: impl Fn(&Error) + Send + Sync + 'static) -> &mut Self {
        self.on_error = Some(Arc::new(f));
        self
    }
    /// Called with each source-level error (child stream failed or timed out).
    pub fn on_chan_error(&mut self, f: impl Fn(&Error) + Send + Sync + 'static) -> &mut Self {
        self.on_chan_error = Some(Arc::new(f));
        self
    }
    /// Consecutive errors after which `on_max_error_mass` runs before the server
    /// accepts again.
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn max_error_mass(&mut self, n: usize) -> &mut Self {
        assert!(n > 0, "max_error_mass must be positive");
        self.max_error_mass = n;
        self
    }
    /// Runs (and is awaited, so accepting pauses) when the error mass is reached; the
    /// count then starts again. Default: wait 30 s.
    pub fn on_max_error_mass<F, Fut>(&mut self, f: F) -> &mut Self
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_max_error_mass = Some(Arc::new(move |n| f(n).boxed()));
        self
    }
    /// Longest time from a request's arrival to its last announcement.
    pub fn serving_timeout(&mut self, t: Option<Duration>) -> &mut Self {
        self.serving_timeout = t;
        self
    }
    /// Longest wait for the source function's next source.
    pub fn sourcing_timeout(&mut self, t: Option<Duration>) -> &mut Self {
        self.sourcing_timeout = t;
        self
    }
    /// Longest wait to open a source's child stream to the client.
    pub fn chan_accept_timeout(&mut self, t: Duration) -> &mut Self {
        self.chan_accept_timeout = t;
        self
    }
    /// Longest wait for the request on a new master stream.
    pub fn master_read_timeout(&mut self, t: Option<Duration>) -> &mut Self {
        self.master_read_timeout = t;
        self
    }
    /// Longest wait for one write on the master stream.
    pub fn master_write_timeout(&mut self, t: Option<Duration>) -> &mut Self {
        self.master_write_timeout = t;
        self
    }
    /// Longest wait for one write of frames on a child stream (a consumer that stops
    /// reading for longer fails its source).
    pub fn frame_write_timeout(&mut self, t: Option<Duration>) -> &mut Self {
        self.frame_write_timeout = t;
        self
    }
    /// Compress frames with LZ4 where that makes them smaller.
    pub fn use_compression(&mut self, on: bool) -> &mut Self {
        self.compression = on;
        self
    }
    /// Largest frame sent or accepted (see [`FrameCodec::with_limit`]).
    pub fn frame_size_limit(&mut self, n: usize) -> &mut Self {
        self.frame_size_limit = FrameCodec::new().with_limit(n).limit();
        self
    }
}

/// Item type a source function's stream may yield: a [`Source`], or a `Result` whose
/// error fails the request (the client's `Sources` yields [`Error::Remote`]).
pub trait SourceItem: Send + 'static {
    /// Into a result.
    fn into_source(self) -> Result<Source, String>;
}

impl SourceItem for Source {
    fn into_source(self) -> Result<Source, String> {
        Ok(self)
    }
}

impl<E: fmt::Display + Send + 'static> SourceItem for Result<Source, E> {
    fn into_source(self) -> Result<Source, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Serves services on a multiplexer.
#[derive(Clone)]
pub struct Server<M: Multiplexer> {
    mux: M,
    cfg: ServerConfig,
}

impl<M: Multiplexer> fmt::Debug for Server<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server").field("cfg", &self.cfg).finish()
    }
}

impl<M: Multiplexer> Server<M> {
    /// A server with default settings.
    pub fn new(mux: M) -> Self {
        Self::with_config(mux, ServerConfig::default())
    }

    /// A server with the given settings.
    pub fn with_config(mux: M, cfg: ServerConfig) -> Self {
        Server { mux, cfg }
    }

    /// Binds `vaddr` and serves every request with `source_fn` (Go's
    /// `ListenAndServe`): it gets the [`Request`] and returns a stream of sources,
    /// announced to the client in order. Must run inside a tokio runtime.
    ///
    /// A source function that panics or yields an error fails that request only.
    pub fn listen_and_serve<F, S>(&self, vaddr: &str, source_fn: F) -> Result<ServeHandle>
    where
        F: Fn(Request) -> S + Send + Sync + 'static,
        S: Stream + Send + 'static,
        S::Item: SourceItem,
    {
        let listener = self.mux.bind(vaddr)?;
        let addr = listener.local_addr().clone();
        let stop_accept = CancellationToken::new();
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let ctx = Arc::new(Ctx {
            mux: self.mux.clone(),
            cfg: self.cfg.clone(),
            node: addr.node(),
            source_fn: Box::new(move |r| source_fn(r).map(SourceItem::into_source).boxed()),
            tasks: tasks.clone(),
            cancel: cancel.clone(),
        });
        tasks.spawn(accept_loop(ctx, listener, stop_accept.clone()));
        Ok(ServeHandle {
            addr,
            stop_accept,
            cancel,
            tasks,
        })
    }
}

/// A running service. [`shutdown`](ServeHandle::shutdown) stops it gracefully.
///
/// Dropping the handle stops the service at once: the address is unbound and every
/// request and source in flight is cancelled (clients see [`Error::Reset`]).
#[must_use = "dropping the handle stops the service"]
#[derive(Debug)]
pub struct ServeHandle {
    addr: Addr,
    stop_accept: CancellationToken,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl ServeHandle {
    /// The bound address.
    pub fn local_addr(&self) -> &Addr {
        &self.addr
    }

    /// Tasks the service runs now: its accept loop (until shutdown), and one per
    /// request whose sources are still being announced or sent (a request's sources
    /// share its task). Every one of them ends with its request, so a service at rest
    /// has exactly 1.
    pub fn active_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Stops accepting requests (the address is unbound at once), lets requests and
    /// sources in flight finish for up to `grace`, then cancels what is left and waits
    /// for it to end.
    pub async fn shutdown(self, grace: Duration) {
        self.stop_accept.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            self.cancel.cancel();
            self.tasks.wait().await;
        }
    }
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        self.stop_accept.cancel();
        self.cancel.cancel();
    }
}

type BoxSourceFn = Box<
    dyn Fn(Request) -> futures::stream::BoxStream<'static, Result<Source, String>> + Send + Sync,
>;

struct Ctx<M> {
    mux: M,
    cfg: ServerConfig,
    node: u64,
    source_fn: BoxSourceFn,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl<M> Ctx<M> {
    fn report(&self, e: &Error) {
        match &self.cfg.on_error {
            Some(f) => f(e),
            None => tracing::warn!("chanserv server: {e}"),
        }
    }
    fn report_chan(&self, e: &Error) {
        match &self.cfg.on_chan_error {
            Some(f) => f(e),
            None => tracing::debug!("chanserv server source: {e}"),
        }
    }
    fn codec(&self) -> FrameCodec {
        FrameCodec::new()
            .with_limit(self.cfg.frame_size_limit)
            .with_compression(self.cfg.compression)
    }
}

async fn accept_loop<M: Multiplexer>(
    ctx: Arc<Ctx<M>>,
    mut listener: M::Listener,
    stop: CancellationToken,
) {
    // Consecutive failed requests. Requests update it themselves and wake this loop
    // only when the mass is reached, so a successful request costs it no wake-up.
    let mass = Arc::new(AtomicUsize::new(0));
    let reached = Arc::new(tokio::sync::Notify::new());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ctx.cancel.cancelled() => return,
            _ = reached.notified() => {}
            r = listener.accept() => match r {
                Ok((s, from)) => {
                    let (ctx2, mass, reached) = (ctx.clone(), mass.clone(), reached.clone());
                    ctx.tasks.spawn(async move {
                        let r = tokio::select! {
                            r = serve_request(&ctx2, s, from) => r,
                            _ = ctx2.cancel.cancelled() => Err(Error::Closed),
                        };
                        match &r {
                            Ok(()) => mass.store(0, Ordering::Relaxed),
                            Err(e) => {
                                ctx2.report(e);
                                if mass.fetch_add(1, Ordering::Relaxed) + 1 >= ctx2.cfg.max_error_mass {
                                    reached.notify_one();
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    ctx.report(&e);
                    if matches!(e, Error::Closed) {
                        return;
                    }
                    mass.fetch_add(1, Ordering::Relaxed);
                }
            },
        }
        if mass.load(Ordering::Relaxed) >= ctx.cfg.max_error_mass {
            let n = mass.swap(0, Ordering::Relaxed);
            tracing::warn!("chanserv server: {n} errors in a row, backing off");
            let pause = match &ctx.cfg.on_max_error_mass {
                Some(f) => f(n),
                None => tokio::time::sleep(Duration::from_secs(30)).boxed(),
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = pause => {}
            }
        }
    }
}

async fn with_timeout<T>(
    t: Option<Duration>,
    kind: Timeout,
    f: impl Future<Output = std::io::Result<T>>,
) -> Result<T> {
    match t {
        None => f.await.map_err(from_io),
        Some(t) => tokio::time::timeout(t, f)
            .await
            .map_err(|_| Error::Timeout(kind))?
            .map_err(from_io),
    }
}

async fn write_buf<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    t: Option<Duration>,
    kind: Timeout,
) -> Result<()> {
    with_timeout(t, kind, async {
        w.write_all(buf).await?;
        w.flush().await
    })
    .await?;
    buf.clear();
    Ok(())
}

async fn read_request<R: AsyncRead + Unpin>(r: &mut R, codec: &FrameCodec) -> Result<RequestMsg> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(f) = codec.decode(&mut buf)? {
            return RequestMsg::decode(f);
        }
        if r.read_buf(&mut buf).await.map_err(from_io)? == 0 {
            codec.check_eof(&buf)?;
            return Err(Error::Reset);
        }
    }
}

type PumpFuture = futures::future::BoxFuture<'static, Result<()>>;

/// Serves one request: announces its sources on the master stream and, in the same
/// task, pumps the frames of every source that is not inline to its child stream.
///
/// One task drives all the sources of a request (each source still independent: a
/// stalled one waits alone). Frames of a request are then produced on one worker at a
/// time, so producers that share buffers do not bounce their reference counts between
/// cores, and thousands of sources cost no task each.
async fn serve_request<M: Multiplexer>(
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
/// of announced sources go to `pumps`.
async fn announce_sources<M: Multiplexer>(
    ctx: &Arc<Ctx<M>>,
    mut master: M::Stream,
    from: Addr,
    pumps: tokio::sync::mpsc::UnboundedSender<PumpFuture>,
) -> Result<()> {
    let codec = ctx.codec();
    let req = with_timeout(ctx.cfg.master_read_timeout, Timeout::MasterRead, async {
        read_request(&mut master, &codec)
            .await
            .map_err(std::io::Error::other)
    })
    .await?;
    let request = Request {
        body: req.body.clone(),
        meta: Meta {
            remote_addr: Some(from),
            tags: req.tags.clone(),
        },
    };
    let mut wbuf = BytesMut::new();
    put_msg(&mut wbuf, &[MSG_ACCEPT], &ctx.node.to_le_bytes());
    let sources = std::panic::catch_unwind(AssertUnwindSafe(|| (ctx.source_fn)(request)));
    let mut sources = match sources {
        Ok(s) => AssertUnwindSafe(s).catch_unwind(),
        Err(p) => {
            let e = Error::SourceFunc(panic_message(&p));
            fail_master(ctx, &mut master, &mut wbuf, &e).await;
            return Err(e);
        }
    };
    let serving_deadline = ctx.cfg.serving_timeout.map(|t| Instant::now() + t);
    let mut next_id = 0u32;
    // A read on the master returns only when the client is gone (it never writes or
    // closes its half): that cancels the request.
    let mut probe = [0u8; 1];
    loop {
        let item = match sources.next().now_or_never() {
            Some(item) => item,
            None => {
                write_buf(
                    &mut master,
                    &mut wbuf,
                    ctx.cfg.master_write_timeout,
                    Timeout::MasterWrite,
                )
                .await?;
                let sourcing = ctx.cfg.sourcing_timeout.map(|t| Instant::now() + t);
                let deadline = match (serving_deadline, sourcing) {
                    (Some(a), Some(b)) => Some((
                        a.min(b),
                        if a <= b {
                            Timeout::Serving
                        } else {
                            Timeout::Sourcing
                        },
                    )),
                    (Some(a), None) => Some((a, Timeout::Serving)),
                    (None, Some(b)) => Some((b, Timeout::Sourcing)),
                    (None, None) => None,
                };
                tokio::select! {
                    item = sources.next() => item,
                    _ = ctx.cancel.cancelled() => return Err(Error::Closed),
                    _ = master.read(&mut probe) => return Err(Error::Reset),
                    _ = sleep_until(deadline.map(|d| d.0)) => {
                        let e = Error::Timeout(deadline.expect("armed").1);
                        fail_master(ctx, &mut master, &mut wbuf, &e).await;
                        return Err(e);
                    }
                }
            }
        };
        let source = match item {
            None => break,
            Some(Ok(Ok(s))) => s,
            Some(Ok(Err(msg))) => {
                let e = Error::SourceFunc(msg);
                fail_master(ctx, &mut master, &mut wbuf, &e).await;
                return Err(e);
            }
            Some(Err(p)) => {
                let e = Error::SourceFunc(panic_message(&p));
                fail_master(ctx, &mut master, &mut wbuf, &e).await;
                return Err(e);
            }
        };
        let id = next_id;
        next_id = next_id
            .checked_add(1)
            .ok_or_else(|| Error::Protocol("more than 2^32 sources".into()))?;
        if let Some(pump) = announce(ctx, source, id, &req, &mut wbuf) {
            let _ = pumps.send(pump);
        }
        if wbuf.len() >= WRITE_BATCH {
            write_buf(
                &mut master,
                &mut wbuf,
                ctx.cfg.master_write_timeout,
                Timeout::MasterWrite,
            )
            .await?;
        }
    }
    put_msg(&mut wbuf, &[MSG_END], &[]);
    write_buf(
        &mut master,
        &mut wbuf,
        ctx.cfg.master_write_timeout,
        Timeout::MasterWrite,
    )
    .await?;
    let _ = with_timeout(
        ctx.cfg.master_write_timeout,
        Timeout::MasterWrite,
        master.shutdown(),
    )
    .await;
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {msg}")
}

/// Appends one master message (a codec frame of `kind ‖ body`).
fn put_msg(wbuf: &mut BytesMut, kind: &[u8], body: &[u8]) {
    wbuf.put_u32_le((kind.len() + body.len()) as u32);
    wbuf.put_slice(kind);
    wbuf.put_slice(body);
}

async fn fail_master<M: Multiplexer>(
    ctx: &Ctx<M>,
    master: &mut M::Stream,
    wbuf: &mut BytesMut,
    e: &Error,
) {
    let msg = e.to_string();
    put_msg(wbuf, &[MSG_ERROR], msg.as_bytes());
    if write_buf(
        master,
        wbuf,
        ctx.cfg.master_write_timeout,
        Timeout::MasterWrite,
    )
    .await
    .is_ok()
    {
        let _ = master.shutdown().await;
    }
}

/// Announces a source: inline when it is small and complete already, else on the
/// master, returning the pump for its child stream.
fn announce<M: Multiplexer>(
    ctx: &Arc<Ctx<M>>,
    mut source: Source,
    id: u32,
    req: &RequestMsg,
    wbuf: &mut BytesMut,
) -> Option<PumpFuture> {
    let mut ready = VecDeque::new();
    let mut size = source.header().len();
    let mut complete = false;
    let mut pending_err = None;
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    while size <= INLINE_BUDGET {
        match source.poll_ready_frame(&mut cx) {
            std::task::Poll::Ready(Some(Ok(f))) => {
                size += HEADER_LEN + f.len();
                ready.push_back(f);
            }
            std::task::Poll::Ready(Some(Err(e))) => {
                pending_err = Some(e);
                break;
            }
            std::task::Poll::Ready(None) => {
                complete = true;
                break;
            }
            std::task::Poll::Pending => break,
        }
    }
    if complete && size <= INLINE_BUDGET && !ctx.cfg.compression {
        let start = wbuf.len();
        wbuf.put_u32_le(0);
        wbuf.put_u8(MSG_INLINE);
        wbuf.put_u32_le(id);
        wbuf.put_u32_le(source.header().len() as u32);
        wbuf.put_slice(source.header());
        for f in &ready {
            wbuf.put_u32_le(f.len() as u32);
            wbuf.put_slice(f);
        }
        let len = (wbuf.len() - start - HEADER_LEN) as u32;
        wbuf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        return None;
    }
    let mut body = BytesMut::with_capacity(4 + source.header().len());
    body.put_u32_le(id);
    body.put_slice(source.header());
    put_msg(wbuf, &[MSG_ANNOUNCE], &body);
    let ctx2 = ctx.clone();
    let reply = req.reply.clone();
    let req_id = req.id;
    Some(Box::pin(async move {
        pump(
            &ctx2,
            source,
            ready,
            complete,
            pending_err,
            &reply,
            req_id,
            id,
        )
        .await
    }))
}

/// Writes one source's frames to its child stream, batching what is ready.
#[allow(clippy::too_many_arguments)]
async fn pump<M: Multiplexer>(
    ctx: &Ctx<M>,
    mut source: Source,
    ready: VecDeque<Bytes>,
    complete: bool,
    pending_err: Option<Error>,
    reply: &str,
    req_id: u64,
    id: u32,
) -> Result<()> {
    let mut s = ctx
        .mux
        .dial(reply, ctx.cfg.chan_accept_timeout, &[])
        .await?;
    let codec = ctx.codec();
    let wt = ctx.cfg.frame_write_timeout;
    let mut wbuf = BytesMut::with_capacity(WRITE_BATCH + 1024);
    wbuf.put_u64_le(req_id);
    wbuf.put_u32_le(id);
    let mut end = None;
    for f in ready {
        match codec.encode_split(f, &mut wbuf) {
            Ok(Some(big)) => {
                write_buf(&mut s, &mut wbuf, wt, Timeout::FrameWrite).await?;
                with_timeout(wt, Timeout::FrameWrite, s.write_all(&big)).await?;
            }
            Ok(None) => {}
            Err(e) => {
                end = Some(Err(e));
                break;
            }
        }
    }
    if end.is_none() {
        end = match (complete, pending_err) {
            (_, Some(e)) => Some(Err(e)),
            (true, None) => Some(Ok(())),
            (false, None) => None,
        };
    }
    while end.is_none() {
        let item = match source.next().now_or_never() {
            Some(item) => item,
            None => {
                if !wbuf.is_empty() {
                    write_buf(&mut s, &mut wbuf, wt, Timeout::FrameWrite).await?;
                }
                // The client never writes on a child stream: a read returns only when
                // it dropped the source (or the link died). An idle producer is then
                // dropped at once, not at its next frame.
                let mut probe = [0u8; 1];
                tokio::select! {
                    item = source.next() => item,
                    _ = s.read(&mut probe) => return Err(Error::Reset),
                }
            }
        };
        match item {
            // A frame the codec refuses (over the limit) fails the source: the client
            // is told why instead of waiting for frames that never come.
            Some(Ok(f)) => match codec.encode_split(f, &mut wbuf) {
                Ok(Some(big)) => {
                    write_buf(&mut s, &mut wbuf, wt, Timeout::FrameWrite).await?;
                    with_timeout(wt, Timeout::FrameWrite, s.write_all(&big)).await?;
                }
                Ok(None) if wbuf.len() >= WRITE_BATCH => {
                    write_buf(&mut s, &mut wbuf, wt, Timeout::FrameWrite).await?;
                    // The sibling sources of this task, and the worker, get their turn
                    // even when this producer and the link never make us wait.
                    tokio::task::consume_budget().await;
                }
                Ok(None) => {}
                Err(e) => end = Some(Err(e)),
            },
            Some(Err(e)) => end = Some(Err(e)),
            None => end = Some(Ok(())),
        }
    }
    let r = match end.expect("loop ends with it") {
        Ok(()) => {
            FrameCodec::encode_end(&mut wbuf);
            Ok(())
        }
        Err(e) => {
            let reason = match &e {
                Error::Remote(m) => m.clone(),
                other => other.to_string(),
            };
            FrameCodec::encode_abort(&reason, &mut wbuf);
            Err(e)
        }
    };
    write_buf(&mut s, &mut wbuf, wt, Timeout::FrameWrite).await?;
    with_timeout(wt, Timeout::FrameWrite, s.shutdown()).await?;
    r
}
