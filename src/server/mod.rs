//! `Server`: binds a service, calls the user's source function per request, announces
//! the sources on the master stream and pumps each source's frames on a child stream.
//!
//! Owns the server half of the chanserv flow (`PROTOCOL.md`, "chanserv"), its timeouts
//! and its error accounting. Small sources whose frames are all ready at once travel
//! inline on the master stream: the `connect` answer costs no child stream at all.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::stream::{Stream, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{BoxError, Error, Result, Timeout};
use crate::frame::FrameCodec;
use crate::mux::{from_io, Addr, Listener, Multiplexer};
use crate::source::{Request, Source};

mod config;
mod credit;
mod pump;
mod request;
mod stats;

pub use config::{MaxErrorMassFn, ServerConfig};
use request::serve_request;
use stats::Counters;
pub use stats::{BlockedSource, ServiceStats};

/// Frames of a source that are ready at once are sent inline with its announcement
/// while they fit in this many bytes (and the source is complete).
const INLINE_BUDGET: usize = 16 * 1024;
/// Child-stream writes are batched up to this many bytes. Small batches keep what
/// thousands of streams hold in yamux's queues and windows small; 8 KiB measured best
/// for `flood` (64 KiB: 1.4x the memory and 15 % fewer frames/s).
const WRITE_BATCH: usize = 8 * 1024;

/// Item type a source function's stream may yield: a [`Source`], or a `Result` whose
/// error fails the request (the client's `Sources` yields [`Error::RequestFailed`]
/// with its message; any error converts, as in [`Source::try_new`]).
pub trait SourceItem: Send + 'static {
    /// Into a result.
    fn into_source(self) -> Result<Source, String>;
}

impl SourceItem for Source {
    fn into_source(self) -> Result<Source, String> {
        Ok(self)
    }
}

impl<E: Into<BoxError> + Send + 'static> SourceItem for Result<Source, E> {
    fn into_source(self) -> Result<Source, String> {
        self.map_err(|e| e.into().to_string())
    }
}

/// Serves services on a multiplexer ([`Node`](crate::Node) unless you bring your own).
#[derive(Clone)]
pub struct Server<M: Multiplexer = crate::Node> {
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
    /// A source function that panics or yields an error fails that request only (the
    /// client gets [`Error::RequestFailed`]). The service runs while the returned
    /// handle lives.
    pub fn listen_and_serve<F, S>(&self, vaddr: &str, source_fn: F) -> Result<ServeHandle>
    where
        F: Fn(Request) -> S + Send + Sync + 'static,
        S: Stream + Send + 'static,
        S::Item: SourceItem,
    {
        self.serve(
            vaddr,
            Box::new(move |r| source_fn(r).map(SourceItem::into_source).boxed()),
        )
    }

    /// Like [`listen_and_serve`](Self::listen_and_serve), for a source function that
    /// needs to wait before it knows its sources (a database query, a dial):
    /// `|req| async move { let rows = query(&req.body).await?; Ok(stream) }`. An
    /// `Err` (any error converts, so `?` works) fails the request like an `Err` item;
    /// [`ServerConfig::sourcing_timeout`] bounds the wait for the first source,
    /// future included.
    pub fn listen_and_serve_async<F, Fut, S>(
        &self,
        vaddr: &str,
        source_fn: F,
    ) -> Result<ServeHandle>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, BoxError>> + Send + 'static,
        S: Stream + Send + 'static,
        S::Item: SourceItem,
    {
        self.serve(
            vaddr,
            Box::new(move |r| {
                futures::stream::once(source_fn(r))
                    .flat_map(|sources| match sources {
                        Ok(s) => s.map(SourceItem::into_source).left_stream(),
                        Err(e) => futures::stream::iter([Err(e.to_string())]).right_stream(),
                    })
                    .boxed()
            }),
        )
    }

    fn serve(&self, vaddr: &str, source_fn: BoxSourceFn) -> Result<ServeHandle> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Misuse("a service must be started inside a tokio runtime"))?;
        let listener = self.mux.bind(vaddr)?;
        let addr = listener.local_addr().clone();
        let stop_accept = CancellationToken::new();
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let stats = Arc::new(Counters::default());
        let ctx = Arc::new(Ctx {
            mux: self.mux.clone(),
            cfg: self.cfg.clone(),
            node: addr.node(),
            source_fn,
            tasks: tasks.clone(),
            cancel: cancel.clone(),
            stats: stats.clone(),
        });
        rt.spawn(tasks.track_future(accept_loop(ctx, listener, stop_accept.clone())));
        Ok(ServeHandle {
            addr,
            stop_accept,
            cancel,
            tasks,
            stats,
            detached: false,
        })
    }
}

/// A running service: the handle owns it. [`shutdown`](ServeHandle::shutdown) stops it
/// gracefully; [`detach`](ServeHandle::detach) hands it to the node.
///
/// Dropping the handle stops the service at once: the address is unbound and every
/// request and source in flight is cancelled (clients see [`Error::Reset`]). So
/// `let _ = server.listen_and_serve(..)` serves nothing: keep the handle, or detach it.
#[must_use = "dropping the handle stops the service at once: keep it, or call detach()"]
#[derive(Debug)]
pub struct ServeHandle {
    addr: Addr,
    stop_accept: CancellationToken,
    cancel: CancellationToken,
    tasks: TaskTracker,
    stats: Arc<Counters>,
    detached: bool,
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

    /// What the service has done so far and which consumers hold it back now
    /// (see [`ServiceStats`]).
    pub fn stats(&self) -> ServiceStats {
        self.stats.snapshot()
    }

    /// Lets the service run without a handle, until its node shuts down (then the
    /// address is gone, and requests in flight fail as their streams do).
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Stops accepting requests (the address is unbound at once), lets requests and
    /// sources in flight finish for up to `grace`, then cancels what is left and waits
    /// for it to end. Returns the service's final counters.
    pub async fn shutdown(self, grace: Duration) -> ServiceStats {
        self.stop_accept.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            self.cancel.cancel();
            self.tasks.wait().await;
        }
        self.stats.snapshot()
    }
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        if !self.detached {
            self.stop_accept.cancel();
            self.cancel.cancel();
        }
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
    stats: Arc<Counters>,
}

impl<M> Ctx<M> {
    fn report(&self, e: &Error) {
        match &self.cfg.on_error {
            Some(f) => f(e),
            None if is_own_fault(e) => tracing::warn!("chanserv server: {e}"),
            None => tracing::debug!("chanserv server: {e}"),
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
                    let span = tracing::debug_span!(
                        "request",
                        service = %listener.local_addr().vaddr(),
                        from = %from,
                        request = tracing::field::Empty,
                        reply = tracing::field::Empty,
                    );
                    ctx.tasks.spawn(tracing::Instrument::instrument(async move {
                        let _active = ctx2.stats.request();
                        let r = tokio::select! {
                            r = serve_request(&ctx2, s, from) => r,
                            _ = ctx2.cancel.cancelled() => Err(Error::Closed),
                        };
                        match &r {
                            Ok(()) => mass.store(0, Ordering::Relaxed),
                            Err(e) => {
                                ctx2.stats.request_failed();
                                ctx2.report(e);
                                let own = is_own_fault(e);
                                if own && mass.fetch_add(1, Ordering::Relaxed) + 1 >= ctx2.cfg.max_error_mass {
                                    reached.notify_one();
                                }
                            }
                        }
                    }, span));
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

/// Errors that are the service's own: only these count toward the error mass. A
/// client that leaves, sends garbage or reads slowly is reported, but never pauses the
/// service for the others.
fn is_own_fault(e: &Error) -> bool {
    matches!(
        e,
        Error::SourceFunc(_) | Error::Timeout(Timeout::Serving | Timeout::Sourcing)
    )
}

/// Owns a user's producer (a source's frames, a source function's stream) and drops
/// it under `catch_unwind`: a producer that panics when dropped must not take the
/// request's task, and with it the sibling sources, down.
struct Caught<T>(Option<T>);

impl<T> Caught<T> {
    fn new(t: T) -> Self {
        Caught(Some(t))
    }
}

impl<T> std::ops::Deref for Caught<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("taken only in drop")
    }
}

impl<T> std::ops::DerefMut for Caught<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.as_mut().expect("taken only in drop")
    }
}

impl<T> Drop for Caught<T> {
    fn drop(&mut self) {
        let t = self.0.take();
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(t))) {
            tracing::warn!(
                "chanserv server: a producer {} when dropped",
                panic_message(&p)
            );
        }
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
