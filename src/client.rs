//! `Client`: posts requests and turns the answer into `Sources`.
//!
//! Owns the client half of the chanserv flow (`PROTOCOL.md`, "chanserv"): one listener
//! per client that receives every source's child stream and routes it by (request id,
//! source id) to its `Source`; the master stream of each request is read by `Sources`
//! itself when polled. It does not own the frame reader (see `source.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{FusedStream, FuturesUnordered, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{Error, Result, Timeout};
use crate::frame::{FrameCodec, FRAME_SIZE_LIMIT};
use crate::mux::{from_io, poll_read_frames, Addr, DialOptions, Listener, Multiplexer};
use crate::proto::chanserv::{ChildPrefix, MasterMsg, RequestMsg};
use crate::source::{BoxRead, ChildStream, Meta, RemoteFrames, RequestTag, Source};

use crate::error::ErrorFn;

/// [`Client`] settings, Go's `ClientOption`s with the same defaults:
///
/// | setting | default |
/// |---|---|
/// | `on_error` | log with `tracing` |
/// | `source_buffer_size` | 128 |
/// | `frame_buffer_size` | 1024 |
/// | `dial_timeout` | 10 s |
/// | `master_read_timeout` | none |
/// | `master_write_timeout` | none |
/// | `frame_read_timeout` | none |
/// | `chan_accept_timeout` | 60 s |
/// | `frame_size_limit` | 100 MiB |
#[derive(Clone)]
pub struct ClientConfig {
    on_error: Option<ErrorFn>,
    source_buffer_size: usize,
    frame_buffer_size: usize,
    dial_timeout: Duration,
    master_read_timeout: Option<Duration>,
    master_write_timeout: Option<Duration>,
    frame_read_timeout: Option<Duration>,
    chan_accept_timeout: Duration,
    frame_size_limit: usize,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("source_buffer_size", &self.source_buffer_size)
            .field("frame_buffer_size", &self.frame_buffer_size)
            .field("dial_timeout", &self.dial_timeout)
            .field("master_read_timeout", &self.master_read_timeout)
            .field("master_write_timeout", &self.master_write_timeout)
            .field("frame_read_timeout", &self.frame_read_timeout)
            .field("chan_accept_timeout", &self.chan_accept_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            on_error: None,
            source_buffer_size: 128,
            frame_buffer_size: 1024,
            dial_timeout: Duration::from_secs(10),
            master_read_timeout: None,
            master_write_timeout: None,
            frame_read_timeout: None,
            chan_accept_timeout: Duration::from_secs(60),
            frame_size_limit: FRAME_SIZE_LIMIT,
        }
    }
}

impl ClientConfig {
    /// Called for errors that reach no `Source`: a child stream that could not be
    /// routed, a malformed one.
    #[must_use]
    pub fn on_error(mut self, f: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(f));
        self
    }
    /// Most announcements `Sources` decodes ahead of its consumer.
    ///
    /// # Panics
    /// If `n` is 0.
    #[must_use]
    pub fn source_buffer_size(mut self, n: usize) -> Self {
        assert!(n > 0, "source_buffer_size must be positive");
        self.source_buffer_size = n;
        self
    }
    /// Most frames a `Source` decodes ahead of its consumer; beyond them, bytes wait in
    /// the multiplexer's window, and then the server stops producing.
    ///
    /// # Panics
    /// If `n` is 0.
    #[must_use]
    pub fn frame_buffer_size(mut self, n: usize) -> Self {
        assert!(n > 0, "frame_buffer_size must be positive");
        self.frame_buffer_size = n;
        self
    }
    /// How long to wait for a stream to the service.
    #[must_use]
    pub fn dial_timeout(mut self, t: Duration) -> Self {
        self.dial_timeout = t;
        self
    }
    /// Longest wait for the next message on the master stream (announcement or end).
    #[must_use]
    pub fn master_read_timeout(mut self, t: Option<Duration>) -> Self {
        self.master_read_timeout = t;
        self
    }
    /// Longest wait to write the request.
    #[must_use]
    pub fn master_write_timeout(mut self, t: Option<Duration>) -> Self {
        self.master_write_timeout = t;
        self
    }
    /// Longest wait for the next frame of a source.
    #[must_use]
    pub fn frame_read_timeout(mut self, t: Option<Duration>) -> Self {
        self.frame_read_timeout = t;
        self
    }
    /// Longest wait for an announced source's child stream. The server dials it back
    /// within its own chan accept timeout (30 s by default); if it never comes (the
    /// server could not reach this client), the source fails with
    /// [`Timeout::ChanAccept`] instead of waiting forever.
    #[must_use]
    pub fn chan_accept_timeout(mut self, t: Duration) -> Self {
        self.chan_accept_timeout = t;
        self
    }
    /// Largest frame accepted (see [`FrameCodec::with_limit`]).
    #[must_use]
    pub fn frame_size_limit(mut self, n: usize) -> Self {
        self.frame_size_limit = FrameCodec::new().with_limit(n).limit();
        self
    }
}

/// Posts requests to services and receives their sources.
///
/// Cheap to clone. It binds one address on its multiplexer for the child streams of
/// all its requests; dropping the last clone unbinds it, and sources still waiting for
/// their stream then fail with [`Error::Reset`].
pub struct Client<M: Multiplexer = crate::Node> {
    inner: Arc<ClientInner<M>>,
}

impl<M: Multiplexer> Clone for Client<M> {
    fn clone(&self) -> Self {
        Client {
            inner: self.inner.clone(),
        }
    }
}

impl<M: Multiplexer> fmt::Debug for Client<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("reply", &self.inner.reply)
            .finish()
    }
}

struct ClientInner<M> {
    mux: M,
    cfg: ClientConfig,
    reply: String,
    routes: Arc<Mutex<Routes>>,
    next_req: AtomicU64,
    /// Master streams of finished requests, closed with the next request's write so
    /// both leave in one packet (see `Sources`).
    finished: Arc<Mutex<Vec<Box<dyn MasterIo>>>>,
    listening: Arc<DropGuard>,
}

/// Finished masters kept for the next request at most; beyond, they close at once.
const MAX_FINISHED: usize = 16;

#[derive(Default)]
struct Routes {
    live: HashSet<u64>,
    slots: HashMap<(u64, u32), Slot>,
}

enum Slot {
    Waiting(oneshot::Sender<BoxRead>),
    Arrived(BoxRead),
}

/// Removes a request's routes when the last of its `Sources`/pending `Source`s is gone,
/// and keeps the client's reply listener until then.
struct RequestGuard {
    id: u64,
    routes: Arc<Mutex<Routes>>,
    _listening: Arc<DropGuard>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut r = self.routes.lock().unwrap();
        r.live.remove(&self.id);
        r.slots.retain(|(req, _), _| *req != self.id);
    }
}

impl<M: Multiplexer> Client<M> {
    /// A client with default settings. Must run inside a tokio runtime.
    pub fn new(mux: M) -> Result<Self> {
        Self::with_config(mux, ClientConfig::default())
    }

    /// A client with the given settings. Must run inside a tokio runtime
    /// ([`Error::Misuse`] otherwise).
    pub fn with_config(mux: M, cfg: ClientConfig) -> Result<Self> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Misuse("a Client must be made inside a tokio runtime"))?;
        let listener = mux.bind(":0")?;
        let reply = listener.local_addr().to_string();
        let routes = Arc::new(Mutex::new(Routes::default()));
        let stop = CancellationToken::new();
        // The reply listener's task: it ends when the client and every request it
        // made are gone (the last `listening` guard cancels it).
        rt.spawn(accept_children(
            listener,
            routes.clone(),
            stop.clone(),
            cfg.on_error.clone(),
        ));
        Ok(Client {
            inner: Arc::new(ClientInner {
                mux,
                cfg,
                reply,
                routes,
                next_req: AtomicU64::new(1),
                finished: Arc::new(Mutex::new(Vec::new())),
                listening: Arc::new(stop.drop_guard()),
            }),
        })
    }

    /// Posts `body` to the service at `vaddr` and returns its sources as they are
    /// announced (Go's `LookupAndPost`). The request is written with the stream open,
    /// so a one-frame answer costs one round trip.
    pub async fn lookup_and_post(
        &self,
        vaddr: &str,
        body: impl Into<Bytes>,
        tags: &[RequestTag],
    ) -> Result<Sources> {
        let c = &self.inner;
        let id = c.next_req.fetch_add(1, Ordering::Relaxed);
        c.routes.lock().unwrap().live.insert(id);
        let guard = Arc::new(RequestGuard {
            id,
            routes: c.routes.clone(),
            _listening: c.listening.clone(),
        });
        let mut opts = DialOptions::new(c.cfg.dial_timeout);
        if let Some(b) = tags.iter().find_map(|t| match t {
            RequestTag::Bucket(b) => Some(b),
            _ => None,
        }) {
            opts = opts.bucket(b.clone());
        }
        let mut master = c.mux.dial(vaddr, opts).await?;
        let msg = RequestMsg {
            id,
            reply: c.reply.clone(),
            tags: tags.to_vec(),
            body: body.into(),
        };
        let codec = FrameCodec::new().with_limit(c.cfg.frame_size_limit);
        let mut buf = BytesMut::new();
        msg.encode(codec.limit(), &mut buf)?;
        let write = async {
            master.write_all(&buf).await?;
            master.flush().await
        };
        match c.cfg.master_write_timeout {
            None => write.await.map_err(from_io)?,
            Some(t) => tokio::time::timeout(t, write)
                .await
                .map_err(|_| Error::Timeout(Timeout::MasterWrite))?
                .map_err(from_io)?,
        }
        buf.clear();
        // Close the masters of requests that finished since the last post, now that
        // this request's bytes are queued: the closes go out in the same packet.
        drop(std::mem::take(&mut *c.finished.lock().unwrap()));
        Ok(Sources {
            finished: c.finished.clone(),
            master: Some(Box::new(master)),
            buf,
            codec,
            ahead: VecDeque::new(),
            end: None,
            guard,
            server: None,
            vaddr: vaddr.to_owned(),
            tags: tags.to_vec(),
            cfg: c.cfg.clone(),
            routes: c.routes.clone(),
            timer: None,
            done: false,
        })
    }
}

trait MasterIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> MasterIo for T {}

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
    vaddr: String,
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
            .field("vaddr", &self.vaddr)
            .finish()
    }
}

impl Sources {
    /// The next source: `None` once all were announced.
    pub async fn recv(&mut self) -> Option<Result<Source>> {
        self.next().await
    }

    fn meta(&self) -> Meta {
        Meta {
            remote_addr: self.server.map(|n| Addr::new(n, self.vaddr.clone())),
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
                };
                self.ahead
                    .push_back(Source::remote(header, self.meta(), frames));
            }
            MasterMsg::Inline { header, frames, .. } => {
                self.ahead
                    .push_back(Source::inline(header, self.meta(), frames.into()));
            }
            MasterMsg::End => self.end = Some(None),
            MasterMsg::Error(m) => self.end = Some(Some(Error::RequestFailed(m))),
        }
        Ok(())
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
            if let Some(s) = this.ahead.pop_front() {
                this.timer = None;
                return Poll::Ready(Some(Ok(s)));
            }
            if let Some(end) = this.end.take() {
                this.done = true;
                // The server closes the master after its last message; we are done too.
                // Its close waits for the client's next request (one packet for both),
                // unless many are waiting already.
                if let Some(m) = this.master.take() {
                    let mut f = this.finished.lock().unwrap();
                    if f.len() < MAX_FINISHED && end.is_none() {
                        f.push(m);
                    }
                }
                return Poll::Ready(end.map(Err));
            }
            if let Err(e) = this.decode_ahead() {
                this.end = Some(Some(e));
                continue;
            }
            if !this.ahead.is_empty() || this.end.is_some() {
                continue;
            }
            match this.poll_read(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => {
                    this.end = Some(Some(e));
                    continue;
                }
                Poll::Pending => {}
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

use std::future::Future;

/// The client's one accept loop: reads each child stream's (request, source) prefix
/// and hands the stream to its `Source`, or drops it (reset) when nobody waits for it.
async fn accept_children<L: Listener>(
    mut listener: L,
    routes: Arc<Mutex<Routes>>,
    stop: CancellationToken,
    on_error: Option<ErrorFn>,
) {
    let report = |e: &Error| match &on_error {
        Some(f) => f(e),
        None => tracing::debug!("chanserv client: {e}"),
    };
    let mut prefixes = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((mut s, _)) => prefixes.push(async move {
                    let mut p = [0u8; ChildPrefix::LEN];
                    let r = tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut p)).await;
                    match r {
                        Ok(Ok(_)) => ChildPrefix::decode(&p).map(|p| (p, s)),
                        Ok(Err(e)) => Err(from_io(e)),
                        Err(_) => Err(Error::Timeout(Timeout::ChanAccept)),
                    }
                }),
                Err(_) => return,
            },
            Some(r) = prefixes.next(), if !prefixes.is_empty() => match r {
                Ok((p, s)) => {
                    let key = (p.request, p.source);
                    let s: BoxRead = Box::new(s);
                    let mut r = routes.lock().unwrap();
                    if !r.live.contains(&key.0) {
                        continue; // dropped: the request is gone, reset the stream
                    }
                    match r.slots.remove(&key) {
                        // A Source dropped while waiting: its stream is dropped
                        // (reset) with the unsent value, which is what we want.
                        Some(Slot::Waiting(tx)) => drop(tx.send(s)),
                        Some(Slot::Arrived(_)) => {
                            drop(r);
                            report(&Error::Protocol(format!("source {} of request {} opened twice", key.1, key.0)));
                        }
                        None => { r.slots.insert(key, Slot::Arrived(s)); }
                    }
                }
                Err(e) => report(&e),
            },
        }
    }
}
