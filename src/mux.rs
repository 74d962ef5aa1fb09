//! The multiplexer: the [`Multiplexer`] trait the server and client are written
//! against, and [`Node`], its yamux-based implementation (links, virtual addresses,
//! service discovery, keep-alive, stream limits).
//!
//! This file owns everything below a stream: link handshake, the yamux driver task,
//! stream-open headers and statuses, address routing. It knows nothing of sources or
//! frames beyond using the frame codec for its control messages. Byte layouts are in
//! `PROTOCOL.md` ("Links", "Stream open", "Control stream").

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::poll_fn;
use futures::{AsyncRead as FAsyncRead, AsyncWrite as FAsyncWrite};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream, ReadBuf};
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result, Timeout};
use crate::frame::FrameCodec;
use crate::RequestTag;

/// A node id: random, 64 bits, printed as 16 hex digits.
pub type NodeId = u64;

/// What a multiplexer offers chanserv: bind a virtual address, dial one. The server and
/// client use nothing else, so another multiplexer can be plugged in.
pub trait Multiplexer: Clone + Send + Sync + 'static {
    /// A bidirectional byte stream.
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// What [`bind`](Self::bind) returns.
    type Listener: Listener<Stream = Self::Stream>;

    /// Binds a virtual address (see [`Node`] for the forms). Dropping the listener
    /// unbinds it.
    fn bind(&self, vaddr: &str) -> Result<Self::Listener>;

    /// Opens a stream to a virtual address. Bytes may be written at once; an acceptor's
    /// refusal surfaces on the first read at the latest. `tags` may steer the choice of
    /// the serving node ([`RequestTag::Bucket`]).
    fn dial(
        &self,
        vaddr: &str,
        timeout: Duration,
        tags: &[RequestTag],
    ) -> impl Future<Output = Result<Self::Stream>> + Send;
}

/// A bound virtual address.
pub trait Listener: Send + 'static {
    /// The stream type.
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// The next stream dialed to this address, with the dialer's address.
    fn accept(&mut self) -> impl Future<Output = Result<(Self::Stream, Addr)>> + Send;
    /// The bound address, qualified by this node's id.
    fn local_addr(&self) -> &Addr;
}

/// A node-qualified virtual address: `<node-id>:<port>` or `<node-id>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Addr {
    node: NodeId,
    name: String,
}

impl Addr {
    pub(crate) fn new(node: NodeId, name: impl Into<String>) -> Self {
        Addr {
            node,
            name: name.into(),
        }
    }
    /// The node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }
    /// The address on that node: a service name, or `:port`.
    pub fn vaddr(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name.strip_prefix(':') {
            Some(port) => write!(f, "{:016x}:{port}", self.node),
            None => write!(f, "{:016x}/{}", self.node, self.name),
        }
    }
}

/// A parsed virtual address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum VAddr {
    /// A service name (`"chanserv"`, `"search:7"`), announced to peers.
    Name(String),
    /// `":port"` on this node; 0 means "pick a free one" (bind only).
    Port(u32),
    /// `"<node-id>:<port>"`.
    Node(NodeId, u32),
}

impl VAddr {
    fn parse(s: &str) -> Result<VAddr> {
        let bad = |why| Error::InvalidAddress(s.to_owned(), why);
        if s.is_empty() || s.len() > 255 {
            return Err(bad("must be 1 to 255 bytes"));
        }
        if s.contains('/') || s.chars().any(char::is_whitespace) {
            return Err(bad("must not contain '/' or white space"));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Ok(VAddr::Name(s.to_owned()));
        };
        let port_num = port.parse::<u32>();
        if host.is_empty() {
            return port_num
                .map(VAddr::Port)
                .map_err(|_| bad("port is not a number"));
        }
        if host.len() == 16 && host.bytes().all(|b| b.is_ascii_hexdigit()) {
            let node = u64::from_str_radix(host, 16).map_err(|_| bad("bad node id"))?;
            let port = port_num.map_err(|_| bad("port is not a number"))?;
            return Ok(VAddr::Node(node, port));
        }
        Ok(VAddr::Name(s.to_owned()))
    }
}

/// A link went up or down.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// The first link to this peer is up (Go circuit's `OnJoin`).
    Up(NodeId),
    /// The last link to this peer is down; its names are withdrawn (`OnLeave`).
    Down(NodeId),
}

/// [`Node`] settings. `Default`:
///
/// | setting | default |
/// |---|---|
/// | `max_streams` | 4096 outbound streams per link |
/// | `keepalive_interval` | 5 s |
/// | `keepalive_timeout` | 20 s |
/// | `handshake_timeout` | 10 s |
/// | `accept_backlog` | 1024 streams per listener |
/// | `rotate_after` | 2^31 − 2^20 streams opened per link |
/// | `reconnect_backoff` | 100 ms doubling to 5 s |
/// | `split_send_size` | 256 KiB |
/// | `close_timeout` | 2 s |
/// | `send_queue` | 4 MiB per link |
#[derive(Debug, Clone)]
pub struct NodeConfig {
    max_streams: usize,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    handshake_timeout: Duration,
    accept_backlog: usize,
    rotate_after: u64,
    reconnect_min: Duration,
    reconnect_max: Duration,
    split_send_size: usize,
    close_timeout: Duration,
    send_queue: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            max_streams: 4096,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            accept_backlog: 1024,
            rotate_after: (1 << 31) - (1 << 20),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            split_send_size: 256 * 1024,
            close_timeout: Duration::from_secs(2),
            send_queue: 4 * 1024 * 1024,
        }
    }
}

impl NodeConfig {
    /// Most streams this node opens on one link at once; more opens wait (up to their
    /// dial timeout). The two ends of a link use the smaller of their values, and yamux
    /// is configured for twice that plus slack, so its hard limit (which kills the whole
    /// connection) is never reached.
    ///
    /// # Panics
    /// If `n` is 0 or above 1,000,000.
    pub fn max_streams(&mut self, n: usize) -> &mut Self {
        assert!((1..=1_000_000).contains(&n), "max_streams must be 1..=1e6");
        self.max_streams = n;
        self
    }
    /// How often an idle link is pinged, and how long it may stay silent before it is
    /// declared dead (its streams fail, its names are withdrawn).
    ///
    /// # Panics
    /// If `interval` is zero or not shorter than `timeout`.
    pub fn keepalive(&mut self, interval: Duration, timeout: Duration) -> &mut Self {
        assert!(
            !interval.is_zero() && interval < timeout,
            "need 0 < interval < timeout"
        );
        self.keepalive_interval = interval;
        self.keepalive_timeout = timeout;
        self
    }
    /// How long a link handshake may take.
    pub fn handshake_timeout(&mut self, t: Duration) -> &mut Self {
        self.handshake_timeout = t;
        self
    }
    /// Streams queued per listener before the acceptor waits (backpressure).
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn accept_backlog(&mut self, n: usize) -> &mut Self {
        assert!(n > 0, "accept_backlog must be positive");
        self.accept_backlog = n;
        self
    }
    /// After this many streams opened on one link, this node moves new streams to a
    /// fresh link (yamux never reuses a stream id; there are about 2^31 per side).
    /// Streams in flight on the old link finish there.
    ///
    /// # Panics
    /// If `n` is 0 or above 2^31 − 2^16.
    pub fn rotate_after(&mut self, n: u64) -> &mut Self {
        assert!(
            (1..=(1 << 31) - (1 << 16)).contains(&n),
            "rotate_after out of range"
        );
        self.rotate_after = n;
        self
    }
    /// Backoff of `join`'s reconnection: doubles from `min` to `max`.
    pub fn reconnect_backoff(&mut self, min: Duration, max: Duration) -> &mut Self {
        assert!(!min.is_zero() && min <= max, "need 0 < min <= max");
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }
    /// Largest yamux data frame. Larger writes are split. 256 KiB measured best for
    /// 1 MiB frames on loopback (yamux's own default is 16 KiB).
    pub fn split_send_size(&mut self, n: usize) -> &mut Self {
        assert!(n >= 1024, "split_send_size must be at least 1 KiB");
        self.split_send_size = n;
        self
    }

    /// How long closing a link (node shutdown or drop, rotation, a dead peer) may spend
    /// delivering what streams already wrote, their end-of-stream included, before the
    /// socket is dropped.
    pub fn close_timeout(&mut self, t: Duration) -> &mut Self {
        self.close_timeout = t;
        self
    }

    /// Most bytes a link's streams may have handed to yamux that it has not written to
    /// the socket yet; writers wait beyond it. yamux itself would queue up to each
    /// stream's 256 KiB window, which for thousands of streams is hundreds of MiB.
    ///
    /// # Panics
    /// If `n` is below 64 KiB.
    pub fn send_queue(&mut self, n: usize) -> &mut Self {
        assert!(n >= 64 * 1024, "send_queue must be at least 64 KiB");
        self.send_queue = n;
        self
    }

    fn yamux(&self, max_streams: usize) -> yamux::Config {
        let mut c = yamux::Config::default();
        // Memory is bounded by what peers actually send within their windows; the
        // connection-wide cap must allow every stream its initial 256 KiB.
        c.set_max_connection_receive_window(None);
        c.set_max_num_streams(2 * max_streams + 512);
        c.set_split_send_size(self.split_send_size);
        c
    }
}

// ------------------------------------------------------------------ wire constants

const MAGIC: &[u8; 8] = b"CHANSERV";
/// Version of the link protocol (handshake, stream open, control stream, chanserv).
pub const PROTOCOL_VERSION: u16 = 1;
const HANDSHAKE_LEN: usize = 8 + 2 + 8 + 4;

const OPEN_DIAL: u8 = 0;
const OPEN_CONTROL: u8 = 1;

const STATUS_ACCEPTED: u8 = 0;
const STATUS_NO_SUCH_ADDRESS: u8 = 1;
const STATUS_REFUSED: u8 = 2;

const CTL_NAMES: u8 = 1;
const CTL_PING: u8 = 2;
const CTL_PONG: u8 = 3;
const CTL_ROTATE: u8 = 4;

// ------------------------------------------------------------------ node

/// A node of the mesh: binds virtual addresses, links to other nodes, dials.
///
/// Cheap to clone: clones share one node. Dropping the last clone (or calling
/// [`shutdown`](Node::shutdown)) closes every link and listener of the node and stops
/// its tasks. What streams already wrote, their shutdown included, is still delivered
/// (for up to [`NodeConfig::close_timeout`]); streams still open then fail with
/// [`Error::Reset`]-like errors.
///
/// Virtual addresses:
/// - a service name, `"chanserv"` or `"search:7"`: announced to linked peers;
/// - `":port"`: local to this node; `":0"` binds a free port chosen by the node;
/// - `"<node-id>:<port>"` (16 hex digits): a port on a given node, directly linked.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &format_args!("{:016x}", self.inner.id))
            .finish()
    }
}

struct Inner {
    id: NodeId,
    cfg: NodeConfig,
    state: Mutex<State>,
    events: broadcast::Sender<LinkEvent>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    next_id: AtomicU64,
    rr: AtomicUsize,
    /// Links established so far (rotations included).
    links_up: AtomicU64,
    /// Woken whenever a peer's names change.
    names_changed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    binds: HashMap<String, Binding>,
    next_port: u32,
    /// Links per peer, oldest first; dials use the newest that is not draining.
    links: HashMap<NodeId, Vec<Arc<Link>>>,
    /// Names each peer binds, as it last told us.
    peer_names: HashMap<NodeId, BTreeSet<String>>,
}

struct Binding {
    id: u64,
    tx: mpsc::Sender<(MuxStream, Addr)>,
}

type OpenReq = oneshot::Sender<yamux::Result<yamux::Stream>>;

struct Link {
    id: u64,
    peer: NodeId,
    open_tx: mpsc::Sender<OpenReq>,
    permits: Arc<Semaphore>,
    opened: AtomicU64,
    active: AtomicUsize,
    draining: AtomicBool,
    ctl_tx: mpsc::UnboundedSender<Bytes>,
    cancel: CancellationToken,
    rejoin: Option<Rejoin>,
    budget: Arc<SendBudget>,
}

/// Bytes handed to yamux by this link's streams and not yet written to the socket.
///
/// yamux queues each stream's writes (up to its 256 KiB window) until its connection
/// task writes them out; with many streams that is hundreds of MiB. Streams wait
/// instead while the link's queue is above `limit`, and are woken when it falls to half.
struct SendBudget {
    limit: u64,
    handed: AtomicU64,
    written: AtomicU64,
    /// Bumped whenever waiters are woken, so a stream registers once per round.
    round: AtomicU64,
    waiters: Mutex<Vec<std::task::Waker>>,
}

impl SendBudget {
    fn new(limit: usize) -> Self {
        SendBudget {
            limit: limit as u64,
            handed: AtomicU64::new(0),
            written: AtomicU64::new(0),
            round: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
        }
    }

    fn queued(&self) -> u64 {
        let written = self.written.load(Ordering::Acquire);
        self.handed.load(Ordering::Acquire).saturating_sub(written)
    }

    /// Ready when there is room; else registers the task (once per `registered` round).
    /// A waker registered in a round stays in the list until that round is woken, so a
    /// stream that got room and then waits again in the same round is not added twice.
    fn poll_room(
        &self,
        cx: &mut Context<'_>,
        registered: &mut Option<(u64, std::task::Waker)>,
    ) -> Poll<()> {
        if self.queued() < self.limit {
            return Poll::Ready(());
        }
        let mut w = self.waiters.lock().unwrap();
        let round = self.round.load(Ordering::Acquire);
        let known = registered
            .as_ref()
            .is_some_and(|(r, waker)| *r == round && waker.will_wake(cx.waker()));
        if !known {
            w.push(cx.waker().clone());
            *registered = Some((round, cx.waker().clone()));
        }
        drop(w);
        // The writer may have drained in between: check again after registering.
        if self.queued() < self.limit {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    fn handed(&self, n: usize) {
        self.handed.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// The socket took `n` bytes (yamux headers included, so clamp at what was handed).
    fn written(&self, n: usize) {
        let handed = self.handed.load(Ordering::Acquire);
        let _ = self
            .written
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some((w + n as u64).min(handed.max(w)))
            });
        if self.queued() <= self.limit / 2 {
            self.wake_all();
        }
    }

    fn wake_all(&self) {
        let waiters = {
            let mut w = self.waiters.lock().unwrap();
            if w.is_empty() {
                return;
            }
            self.round.fetch_add(1, Ordering::AcqRel);
            std::mem::take(&mut *w)
        };
        for w in waiters {
            w.wake();
        }
    }
}

/// The link's (buffered) socket as yamux sees it: counts what yamux writes for the
/// [`SendBudget`], and defers yamux's flushes.
///
/// yamux flushes the socket after every frame, which costs a `send` per frame (a
/// request, its answer and the stream's FIN would be three). Flushes are deferred
/// until yamux waits to read, i.e. has nothing more to send right now, or 16 were
/// deferred, so frames queued together leave in one `send`.
struct LinkIo<T> {
    io: T,
    budget: Arc<SendBudget>,
    /// Flushes yamux asked for and that were not done yet.
    deferred: u32,
}

const MAX_DEFERRED_FLUSHES: u32 = 16;

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for LinkIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_pending() && self.deferred > 0 {
            if let Poll::Ready(f) = Pin::new(&mut self.io).poll_flush(cx) {
                f?;
                self.deferred = 0;
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for LinkIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.budget.written(n);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.deferred += 1;
        if self.deferred < MAX_DEFERRED_FLUSHES {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.deferred = 0;
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How to make a fresh link to the same peer (only the side that dialed knows).
#[derive(Clone)]
enum Rejoin {
    Tcp(SocketAddr),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Node {
    /// A node with a random id and [`NodeConfig::default`]. Must be created inside a
    /// tokio runtime's context only when links are made (binding needs none).
    pub fn new() -> Self {
        Self::with_config(NodeConfig::default())
    }

    /// A node with a random id and the given settings.
    pub fn with_config(cfg: NodeConfig) -> Self {
        let cancel = CancellationToken::new();
        let inner = Arc::new(Inner {
            id: random_u64(),
            cfg,
            state: Mutex::new(State {
                next_port: 1024,
                ..State::default()
            }),
            events: broadcast::channel(256).0,
            cancel: cancel.clone(),
            tasks: TaskTracker::new(),
            next_id: AtomicU64::new(1),
            rr: AtomicUsize::new(0),
            names_changed: tokio::sync::Notify::new(),
            links_up: AtomicU64::new(0),
        });
        Node {
            inner,
            _guard: Arc::new(cancel.drop_guard()),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Link up/down events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LinkEvent> {
        self.inner.events.subscribe()
    }

    /// Ids of the peers this node has a link to.
    pub fn peers(&self) -> Vec<NodeId> {
        let st = self.inner.state.lock().unwrap();
        st.links.keys().copied().collect()
    }

    /// How many links (including draining ones) this node has to `peer`.
    pub fn link_count(&self, peer: NodeId) -> usize {
        let st = self.inner.state.lock().unwrap();
        st.links.get(&peer).map_or(0, Vec::len)
    }

    /// How many links this node has established since it started, replacements after
    /// a reconnect or a rotation included.
    pub fn links_established(&self) -> u64 {
        self.inner.links_up.load(Ordering::Relaxed)
    }

    /// Accepts links on a TCP address until the node shuts down. Returns the bound
    /// socket address (useful with port 0).
    pub async fn listen(&self, addr: impl tokio::net::ToSocketAddrs) -> Result<SocketAddr> {
        let l = tokio::net::TcpListener::bind(addr).await?;
        let local = l.local_addr()?;
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            loop {
                let sock = tokio::select! {
                    _ = inner.cancel.cancelled() => return,
                    r = l.accept() => r,
                };
                match sock {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        let inner2 = inner.clone();
                        inner.tasks.spawn(async move {
                            let _ = inner2.clone().run_link(s, false, None, None).await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(local)
    }

    /// Links to a node listening on a TCP address; returns its id once the link is up.
    /// The link is kept: when it dies, the node reconnects with backoff until it shuts
    /// down.
    pub async fn join(&self, addr: SocketAddr) -> Result<NodeId> {
        self.join_with(Rejoin::Tcp(addr)).await
    }

    /// Accepts links on a Unix-domain socket path.
    #[cfg(unix)]
    pub async fn listen_unix(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let l = tokio::net::UnixListener::bind(path)?;
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            loop {
                let sock = tokio::select! {
                    _ = inner.cancel.cancelled() => return,
                    r = l.accept() => r,
                };
                if let Ok((s, _)) = sock {
                    let inner2 = inner.clone();
                    inner.tasks.spawn(async move {
                        let _ = inner2.clone().run_link(s, false, None, None).await;
                    });
                }
            }
        });
        Ok(())
    }

    /// Links to a node listening on a Unix-domain socket, reconnecting like [`join`](Self::join).
    #[cfg(unix)]
    pub async fn join_unix(&self, path: impl AsRef<std::path::Path>) -> Result<NodeId> {
        self.join_with(Rejoin::Unix(path.as_ref().to_owned())).await
    }

    /// Runs a link over any byte stream (an in-memory duplex, stdio, TLS). `initiator`
    /// must be true on exactly one side. Returns the peer's id once the handshake is
    /// done; the link lives until the stream fails or the node shuts down. No
    /// reconnection: the node cannot make a new `io`.
    pub async fn attach<IO>(&self, io: IO, initiator: bool) -> Result<NodeId>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            let _ = inner.clone().run_link(io, initiator, None, Some(tx)).await;
        });
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn join_with(&self, how: Rejoin) -> Result<NodeId> {
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        self.inner.tasks.spawn(inner.supervise(how, tx));
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Closes every link and listener and waits for the node's tasks to end.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Waits until a dial to the service `name` can be routed (bound here, or announced
    /// by a linked peer), up to `within`. Returns false on timeout.
    pub async fn wait_for_name(&self, name: &str, within: Duration) -> bool {
        let Ok(v) = VAddr::parse(name) else {
            return false;
        };
        self.wait_until(within, || self.inner.route(&v, None).is_ok())
            .await
    }

    /// The nodes a dial to the service `name` may reach: this node if it binds the
    /// name, and every linked peer that announced it. Sorted by node id.
    pub fn providers(&self, name: &str) -> Vec<NodeId> {
        let st = self.inner.state.lock().unwrap();
        let mut v = peers_binding(&st, name);
        if st.binds.contains_key(name) {
            v.push(self.inner.id);
        }
        v.sort_unstable();
        v
    }

    /// Waits until at least `count` nodes provide the service `name` (see
    /// [`providers`](Node::providers)), up to `within`. Returns false on timeout.
    pub async fn wait_for_providers(&self, name: &str, count: usize, within: Duration) -> bool {
        self.wait_until(within, || self.providers(name).len() >= count)
            .await
    }

    async fn wait_until(&self, within: Duration, mut ready: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + within;
        loop {
            let changed = self.inner.names_changed.notified();
            if ready() {
                return true;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return false;
            }
        }
    }

    fn resolve_local(&self, v: &VAddr) -> Option<String> {
        match v {
            VAddr::Name(n) => Some(n.clone()),
            VAddr::Port(p) => Some(format!(":{p}")),
            VAddr::Node(id, p) if *id == self.inner.id => Some(format!(":{p}")),
            VAddr::Node(..) => None,
        }
    }
}

impl Multiplexer for Node {
    type Stream = MuxStream;
    type Listener = NodeListener;

    fn bind(&self, vaddr: &str) -> Result<NodeListener> {
        let v = VAddr::parse(vaddr)?;
        let inner = &self.inner;
        let mut st = inner.state.lock().unwrap();
        let key = match v {
            VAddr::Port(0) => loop {
                st.next_port = st.next_port.wrapping_add(1).max(1024);
                let k = format!(":{}", st.next_port);
                if !st.binds.contains_key(&k) {
                    break k;
                }
            },
            ref v => self
                .resolve_local(v)
                .ok_or_else(|| Error::InvalidAddress(vaddr.into(), "bound on another node"))?,
        };
        if st.binds.contains_key(&key) {
            return Err(Error::AddrInUse(key));
        }
        let (tx, rx) = mpsc::channel(inner.cfg.accept_backlog);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        st.binds.insert(key.clone(), Binding { id, tx });
        let is_name = !key.starts_with(':');
        if is_name {
            inner.announce_names(&st);
        }
        drop(st);
        inner.names_changed.notify_waiters();
        Ok(NodeListener {
            rx,
            addr: Addr::new(inner.id, key),
            bind_id: id,
            node: inner.clone(),
        })
    }

    fn dial(
        &self,
        vaddr: &str,
        dial_timeout: Duration,
        tags: &[RequestTag],
    ) -> impl Future<Output = Result<MuxStream>> + Send {
        let inner = self.inner.clone();
        let bucket = tags.iter().find_map(|t| match t {
            RequestTag::Bucket(b) => Some(b.clone()),
            _ => None,
        });
        let parsed = VAddr::parse(vaddr);
        let vaddr = vaddr.to_owned();
        async move {
            let v = parsed?;
            match timeout(dial_timeout, inner.dial(v, &vaddr, bucket.as_deref())).await {
                Ok(r) => r,
                Err(_) => Err(Error::Timeout(Timeout::Dial)),
            }
        }
    }
}

impl Inner {
    fn announce_names(&self, st: &State) {
        let msg = names_message(st);
        for links in st.links.values() {
            for l in links {
                let _ = l.ctl_tx.send(msg.clone());
            }
        }
    }

    fn newest_link(st: &State, peer: NodeId) -> Option<Arc<Link>> {
        let links = st.links.get(&peer)?;
        links
            .iter()
            .rev()
            .find(|l| !l.draining.load(Ordering::Relaxed))
            .or_else(|| links.last())
            .cloned()
    }

    /// Picks where a dial goes: a local binding or a link and the address to ask for.
    fn route(&self, v: &VAddr, bucket: Option<&str>) -> Result<Route> {
        let st = self.state.lock().unwrap();
        let local = |key: &str| {
            st.binds
                .get(key)
                .map(|b| Route::Local(b.tx.clone(), key.to_owned()))
        };
        let none = |s: String| Error::NoSuchAddress(s);
        match v {
            VAddr::Port(p) => local(&format!(":{p}")).ok_or_else(|| none(format!(":{p}"))),
            VAddr::Node(id, p) if *id == self.id => {
                local(&format!(":{p}")).ok_or_else(|| none(format!(":{p}")))
            }
            VAddr::Node(id, p) => Inner::newest_link(&st, *id)
                .map(|l| Route::Remote(l, format!(":{p}")))
                .ok_or_else(|| none(format!("{id:016x}:{p} (no link to that node)"))),
            VAddr::Name(name) => {
                let mut candidates = peers_binding(&st, name);
                let here = st.binds.contains_key(name);
                if here && bucket.is_none() {
                    return Ok(local(name).expect("checked"));
                }
                if here {
                    candidates.push(self.id);
                }
                let pick = match bucket {
                    Some(b) => candidates.iter().copied().max_by_key(|n| hrw(*n, b)),
                    None if candidates.is_empty() => None,
                    None => {
                        candidates.sort_unstable();
                        let i = self.rr.fetch_add(1, Ordering::Relaxed) % candidates.len();
                        Some(candidates[i])
                    }
                };
                match pick {
                    None => Err(none(name.clone())),
                    Some(n) if n == self.id => Ok(local(name).expect("checked")),
                    Some(n) => Ok(Route::Remote(
                        Inner::newest_link(&st, n).expect("candidate has a link"),
                        name.clone(),
                    )),
                }
            }
        }
    }

    async fn dial(
        self: Arc<Self>,
        v: VAddr,
        vaddr: &str,
        bucket: Option<&str>,
    ) -> Result<MuxStream> {
        let _ = vaddr;
        match self.route(&v, bucket)? {
            Route::Local(tx, key) => {
                let (a, b) = tokio::io::duplex(256 * 1024);
                let here = Addr::new(self.id, key);
                let far = MuxStream::new(Io::Local(b), None, None, None);
                tx.send((far, here))
                    .await
                    .map_err(|_| Error::NoSuchAddress(vaddr.into()))?;
                Ok(MuxStream::new(Io::Local(a), None, None, None))
            }
            Route::Remote(link, target) => {
                let permit = link
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::LinkClosed)?;
                let (tx, rx) = oneshot::channel();
                link.open_tx.send(tx).await.map_err(|_| Error::LinkClosed)?;
                let s = rx
                    .await
                    .map_err(|_| Error::LinkClosed)?
                    .map_err(yamux_err)?;
                let n = link.opened.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= self.cfg.rotate_after && !link.draining.swap(true, Ordering::Relaxed) {
                    self.rotate(&link);
                }
                let mut header = BytesMut::with_capacity(3 + target.len());
                header.put_u8(OPEN_DIAL);
                header.put_u8(target.len() as u8);
                header.put_slice(target.as_bytes());
                link.active.fetch_add(1, Ordering::Relaxed);
                Ok(MuxStream::new(
                    Io::Yamux(s.compat_stream()),
                    Some(header),
                    Some(permit),
                    Some(link),
                ))
            }
        }
    }

    /// A link has used up its quota of stream ids: get a fresh one to the same peer.
    fn rotate(self: &Arc<Self>, link: &Arc<Link>) {
        tracing::debug!(peer = format_args!("{:016x}", link.peer), "rotating link");
        match &link.rejoin {
            Some(how) => {
                let inner = self.clone();
                let how = how.clone();
                self.tasks.spawn(async move {
                    let (tx, _rx) = oneshot::channel();
                    inner.supervise(how, tx).await
                });
            }
            None => {
                let mut m = BytesMut::new();
                m.put_u8(CTL_ROTATE);
                let _ = link.ctl_tx.send(m.freeze());
            }
        }
    }

    /// Keeps a joined link up: connects, runs it, reconnects with backoff.
    async fn supervise(self: Arc<Self>, how: Rejoin, first: oneshot::Sender<Result<NodeId>>) {
        let mut first = Some(first);
        let mut backoff = self.cfg.reconnect_min;
        loop {
            let r = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = self.clone().connect_once(&how, first.take()) => r,
            };
            if r.up {
                backoff = self.cfg.reconnect_min;
            }
            if self.cancel.is_cancelled() || r.retired {
                return;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
    }

    async fn connect_once(
        self: Arc<Self>,
        how: &Rejoin,
        first: Option<oneshot::Sender<Result<NodeId>>>,
    ) -> LinkEnd {
        let (tx, rx) = oneshot::channel();
        let how2 = how.clone();
        let run = async {
            match how {
                Rejoin::Tcp(a) => match tokio::net::TcpStream::connect(a).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        self.clone().run_link(s, true, Some(how2), Some(tx)).await
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        LinkEnd::default()
                    }
                },
                #[cfg(unix)]
                Rejoin::Unix(p) => match tokio::net::UnixStream::connect(p).await {
                    Ok(s) => self.clone().run_link(s, true, Some(how2), Some(tx)).await,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        LinkEnd::default()
                    }
                },
            }
        };
        let report = async {
            if let Ok(r) = rx.await {
                if let Some(f) = first {
                    let _ = f.send(r);
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = run => r,
            _ = report => unreachable!(),
        }
    }

    /// Handshake, yamux, control stream, until the link dies.
    async fn run_link<IO>(
        self: Arc<Self>,
        io: IO,
        initiator: bool,
        rejoin: Option<Rejoin>,
        up: Option<oneshot::Sender<Result<NodeId>>>,
    ) -> LinkEnd
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut io = BufStream::with_capacity(64 * 1024, 64 * 1024, io);
        let hs = timeout(
            self.cfg.handshake_timeout,
            handshake(&mut io, self.id, &self.cfg),
        )
        .await;
        let (peer, max_streams) = match hs {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!("link handshake failed: {e}");
                if let Some(up) = up {
                    let _ = up.send(Err(e));
                }
                return LinkEnd::default();
            }
            Err(_) => {
                if let Some(up) = up {
                    let _ = up.send(Err(Error::Timeout(Timeout::Handshake)));
                }
                return LinkEnd::default();
            }
        };
        let mode = if initiator {
            yamux::Mode::Client
        } else {
            yamux::Mode::Server
        };
        let budget = Arc::new(SendBudget::new(self.cfg.send_queue));
        let io = LinkIo {
            io,
            budget: budget.clone(),
            deferred: 0,
        };
        let conn = yamux::Connection::new(io.compat(), self.cfg.yamux(max_streams), mode);
        let (open_tx, open_rx) = mpsc::channel(64);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (ctl_in_tx, ctl_in_rx) = oneshot::channel();
        let link = Arc::new(Link {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            open_tx,
            permits: Arc::new(Semaphore::new(max_streams)),
            opened: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            ctl_tx,
            cancel: self.cancel.child_token(),
            rejoin,
            budget,
        });
        let driver = {
            let inner = self.clone();
            let link = link.clone();
            let close_timeout = self.cfg.close_timeout;
            self.tasks.spawn(async move {
                let mut conn = conn;
                let ctl_in = Arc::new(Mutex::new(Some(ctl_in_tx)));
                tokio::select! {
                    r = drive(&mut conn, open_rx, |s| inner.clone().on_inbound(s, link.clone(), ctl_in.clone())) => {
                        if let Err(e) = r {
                            tracing::debug!("link {:016x}: {e}", link.peer);
                        }
                        link.cancel.cancel();
                        return;
                    }
                    _ = link.cancel.cancelled() => {}
                }
                // Closed from this side: deliver what streams already queued (their
                // data and FIN), then a yamux GoAway, within a bound.
                let _ = timeout(close_timeout, poll_fn(|cx| conn.poll_close(cx))).await;
            })
        };
        {
            let mut st = self.state.lock().unwrap();
            self.links_up.fetch_add(1, Ordering::Relaxed);
            let links = st.links.entry(peer).or_default();
            links.push(link.clone());
            let first = links.len() == 1;
            let _ = link.ctl_tx.send(names_message(&st));
            drop(st);
            if first {
                let _ = self.events.send(LinkEvent::Up(peer));
            }
        }
        if let Some(up) = up {
            let _ = up.send(Ok(peer));
        }
        let retired = self.clone().control(&link, ctl_rx, ctl_in_rx).await;
        link.cancel.cancel();
        link.permits.close();
        let _ = driver.await;
        let last = {
            let mut st = self.state.lock().unwrap();
            let mut last = false;
            if let Some(links) = st.links.get_mut(&peer) {
                links.retain(|l| l.id != link.id);
                if links.is_empty() {
                    st.links.remove(&peer);
                    st.peer_names.remove(&peer);
                    last = true;
                }
            }
            last
        };
        if last {
            let _ = self.events.send(LinkEvent::Down(peer));
        }
        LinkEnd { up: true, retired }
    }

    /// The link's control loop: names, pings, rotation. Returns true when the link was
    /// retired after a rotation (so `join` must not reconnect it).
    async fn control(
        self: Arc<Self>,
        link: &Arc<Link>,
        mut out: mpsc::UnboundedReceiver<Bytes>,
        inbound: oneshot::Receiver<MuxStream>,
    ) -> bool {
        let codec = FrameCodec::new().with_limit(1 << 20);
        let mut writer = match self.clone().open_control(link).await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::debug!("control stream: {e}");
                return false;
            }
        };
        let mut reader: Option<MuxStream> = None;
        let mut inbound = Some(inbound);
        let mut rbuf = BytesMut::new();
        let mut wbuf = BytesMut::new();
        let mut ping = tokio::time::interval(self.cfg.keepalive_interval);
        let mut deadline = Instant::now() + self.cfg.keepalive_timeout;
        let mut idle_check =
            tokio::time::interval(Duration::from_millis(100).min(self.cfg.keepalive_interval));
        loop {
            tokio::select! {
                _ = link.cancel.cancelled() => return link.draining.load(Ordering::Relaxed),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("link {:016x}: keep-alive timeout", link.peer);
                    return false;
                }
                _ = ping.tick() => {
                    let mut m = BytesMut::new();
                    m.put_u8(CTL_PING);
                    let _ = codec.encode(&m, &mut wbuf);
                }
                _ = idle_check.tick(), if link.draining.load(Ordering::Relaxed) => {
                    if link.active.load(Ordering::Relaxed) == 0 && self.has_newer_link(link) {
                        return true;
                    }
                    continue;
                }
                m = out.recv() => match m {
                    Some(m) => { let _ = codec.encode(&m, &mut wbuf); }
                    None => return false,
                },
                s = async { inbound.as_mut().expect("guarded").await }, if inbound.is_some() => {
                    inbound = None;
                    match s {
                        Ok(s) => reader = Some(s),
                        Err(_) => return false,
                    }
                    continue;
                }
                n = async { reader.as_mut().expect("guarded").read_buf(&mut rbuf).await }, if reader.is_some() => {
                    match n {
                        Ok(0) | Err(_) => return link.draining.load(Ordering::Relaxed),
                        Ok(_) => {}
                    }
                    deadline = Instant::now() + self.cfg.keepalive_timeout;
                    loop {
                        match codec.decode(&mut rbuf) {
                            Ok(Some(msg)) => self.on_control(link, msg, &codec, &mut wbuf),
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!("link {:016x}: bad control message: {e}", link.peer);
                                return false;
                            }
                        }
                    }
                }
            }
            if !wbuf.is_empty() {
                if let Some(w) = writer.as_mut() {
                    let send = async {
                        w.write_all(&wbuf).await?;
                        w.flush().await
                    };
                    if timeout(self.cfg.keepalive_timeout, send)
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        return false;
                    }
                }
                wbuf.clear();
            }
        }
    }

    fn has_newer_link(&self, link: &Link) -> bool {
        let st = self.state.lock().unwrap();
        st.links.get(&link.peer).is_some_and(|ls| {
            ls.iter()
                .any(|l| l.id > link.id && !l.draining.load(Ordering::Relaxed))
        })
    }

    fn on_control(
        self: &Arc<Self>,
        link: &Arc<Link>,
        mut msg: Bytes,
        codec: &FrameCodec,
        wbuf: &mut BytesMut,
    ) {
        if msg.is_empty() {
            return;
        }
        match msg.get_u8() {
            CTL_PING => {
                let _ = codec.encode(&[CTL_PONG], wbuf);
            }
            CTL_PONG => {}
            CTL_NAMES => {
                let names = parse_names(msg);
                tracing::debug!(
                    peer = format_args!("{:016x}", link.peer),
                    ?names,
                    "peer names"
                );
                self.state
                    .lock()
                    .unwrap()
                    .peer_names
                    .insert(link.peer, names);
                self.names_changed.notify_waiters();
            }
            CTL_ROTATE => {
                if !link.draining.swap(true, Ordering::Relaxed) {
                    self.rotate(link);
                }
            }
            other => tracing::debug!("unknown control message {other}"),
        }
    }

    async fn open_control(self: Arc<Self>, link: &Arc<Link>) -> Result<MuxStream> {
        let (tx, rx) = oneshot::channel();
        link.open_tx.send(tx).await.map_err(|_| Error::LinkClosed)?;
        let s = rx
            .await
            .map_err(|_| Error::LinkClosed)?
            .map_err(yamux_err)?;
        let mut s = MuxStream::new(Io::Yamux(s.compat_stream()), None, None, None);
        s.write_all(&[OPEN_CONTROL]).await?;
        s.flush().await?;
        Ok(s)
    }

    /// An inbound yamux stream: read its open header off the driver task, then hand it
    /// to the listener it names (or to the control loop).
    fn on_inbound(
        self: Arc<Self>,
        s: yamux::Stream,
        link: Arc<Link>,
        ctl_in: Arc<Mutex<Option<oneshot::Sender<MuxStream>>>>,
    ) {
        let mut s = MuxStream::new(Io::Yamux(s.compat_stream()), None, None, None);
        let mut open = OpenReader::default();
        // The open header nearly always came in the stream's first frame: deliver it
        // from here, without a task, when it is complete and its listener has room.
        let waker = futures::task::noop_waker();
        if let Poll::Ready(Ok(Some(target))) = open.poll(&mut s, &mut Context::from_waker(&waker)) {
            let Some(s) = self.deliver_now(s, &target, &link) else {
                return;
            };
            let inner = self.clone();
            self.tasks
                .spawn(async move { inner.deliver(s, target, link).await });
            return;
        }
        let inner = self.clone();
        self.tasks.spawn(async move {
            let r = timeout(
                inner.cfg.handshake_timeout,
                poll_fn(|cx| open.poll(&mut s, cx)),
            )
            .await;
            match r {
                Ok(Ok(None)) => match ctl_in.lock().unwrap().take() {
                    Some(tx) => {
                        let _ = tx.send(s);
                    }
                    None => tracing::debug!("second control stream refused"),
                },
                Ok(Ok(Some(target))) => inner.deliver(s, target, link).await,
                Ok(Err(e)) => tracing::debug!("bad stream open: {e}"),
                Err(_) => tracing::debug!("stream open header timed out"),
            }
        });
    }

    /// The listener bound to `target`, if any.
    fn listener_for(&self, target: &str) -> Option<mpsc::Sender<(MuxStream, Addr)>> {
        let st = self.state.lock().unwrap();
        let key = match VAddr::parse(target).ok()? {
            VAddr::Name(n) => n,
            VAddr::Port(p) => format!(":{p}"),
            VAddr::Node(id, p) if id == self.id => format!(":{p}"),
            VAddr::Node(..) => return None,
        };
        st.binds.get(&key).map(|b| b.tx.clone())
    }

    /// The stream as its listener gets it: counted on its link, owing the accepted
    /// status. That status goes out with the acceptor's first write, or as soon as it
    /// waits to read: either ACKs the yamux stream (yamux stalls after 256 unacked
    /// opens). A refusal goes out at once instead.
    fn accepted(&self, mut s: MuxStream, link: &Arc<Link>) -> (MuxStream, Addr) {
        s.header = Some(BytesMut::from(&[STATUS_ACCEPTED][..]));
        link.active.fetch_add(1, Ordering::Relaxed);
        s.link = Some(link.clone());
        (s, Addr::new(link.peer, String::new()))
    }

    /// Delivers without waiting when the listener exists and has room; otherwise gives
    /// the stream back for [`deliver`](Self::deliver).
    fn deliver_now(&self, s: MuxStream, target: &str, link: &Arc<Link>) -> Option<MuxStream> {
        match self
            .listener_for(target)
            .and_then(|tx| tx.try_reserve_owned().ok())
        {
            Some(permit) => {
                permit.send(self.accepted(s, link));
                None
            }
            None => Some(s),
        }
    }

    async fn deliver(&self, mut s: MuxStream, target: String, link: Arc<Link>) {
        let Some(tx) = self.listener_for(&target) else {
            let _ = s.write_all(&[STATUS_NO_SUCH_ADDRESS]).await;
            let _ = s.shutdown().await;
            return;
        };
        match tx.reserve_owned().await {
            Ok(permit) => {
                permit.send(self.accepted(s, &link));
            }
            Err(_) => {
                let _ = s.write_all(&[STATUS_REFUSED]).await;
                let _ = s.shutdown().await;
            }
        }
    }
}

#[derive(Default)]
struct LinkEnd {
    up: bool,
    retired: bool,
}

enum Route {
    Local(mpsc::Sender<(MuxStream, Addr)>, String),
    Remote(Arc<Link>, String),
}

fn names_message(st: &State) -> Bytes {
    let mut m = BytesMut::new();
    m.put_u8(CTL_NAMES);
    for name in st.binds.keys().filter(|k| !k.starts_with(':')) {
        m.put_u8(name.len() as u8);
        m.put_slice(name.as_bytes());
    }
    m.freeze()
}

async fn handshake<IO>(io: &mut IO, id: NodeId, cfg: &NodeConfig) -> Result<(NodeId, usize)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(HANDSHAKE_LEN);
    out.put_slice(MAGIC);
    out.put_u16_le(PROTOCOL_VERSION);
    out.put_u64_le(id);
    out.put_u32_le(cfg.max_streams as u32);
    io.write_all(&out).await?;
    io.flush().await?;
    let mut inb = [0u8; HANDSHAKE_LEN];
    io.read_exact(&mut inb).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Protocol("link closed during handshake".into()),
        _ => e.into(),
    })?;
    let mut b = &inb[..];
    if &b[..8] != MAGIC {
        return Err(Error::Protocol(
            "bad magic: the peer is not a chanserv node".into(),
        ));
    }
    b.advance(8);
    let theirs = b.get_u16_le();
    if theirs != PROTOCOL_VERSION {
        return Err(Error::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    let peer = b.get_u64_le();
    if peer == id {
        return Err(Error::Protocol("link to self".into()));
    }
    let their_max = b.get_u32_le() as usize;
    Ok((peer, cfg.max_streams.min(their_max.max(1))))
}

/// Reads an open header: `Some(target)` for a dial, `None` for the control stream.
/// Reads a stream's open header (`PROTOCOL.md`, stream open) without losing bytes when
/// it arrives in pieces: `Some(address)` for a dial, `None` for the control stream.
#[derive(Default)]
struct OpenReader {
    got: Vec<u8>,
}

impl OpenReader {
    fn poll(&mut self, s: &mut MuxStream, cx: &mut Context<'_>) -> Poll<Result<Option<String>>> {
        loop {
            let need = match self.got.as_slice() {
                [] => 1,
                [OPEN_CONTROL] => return Poll::Ready(Ok(None)),
                [OPEN_DIAL] => 2,
                [OPEN_DIAL, n, name @ ..] if name.len() == usize::from(*n) => {
                    return Poll::Ready(
                        String::from_utf8(name.to_vec())
                            .map(Some)
                            .map_err(|_| Error::Protocol("address is not UTF-8".into())),
                    );
                }
                [OPEN_DIAL, n, ..] => 2 + usize::from(*n),
                [k, ..] => {
                    return Poll::Ready(Err(Error::Protocol(format!("unknown stream kind {k}"))))
                }
            };
            let mut b = [0u8; 257];
            let want = need - self.got.len();
            let mut rb = ReadBuf::new(&mut b[..want]);
            ready!(Pin::new(&mut *s).poll_read(cx, &mut rb)).map_err(from_io)?;
            if rb.filled().is_empty() {
                return Poll::Ready(Err(Error::Reset));
            }
            self.got.extend_from_slice(rb.filled());
        }
    }
}

/// The one task that owns a yamux connection: serves open requests and keeps
/// `poll_next_inbound` polled (it drives all of the connection's I/O).
async fn drive<T, F>(
    conn: &mut yamux::Connection<T>,
    mut open_rx: mpsc::Receiver<OpenReq>,
    mut on_inbound: F,
) -> yamux::Result<()>
where
    T: FAsyncRead + FAsyncWrite + Unpin,
    F: FnMut(yamux::Stream),
{
    let mut pending: Option<OpenReq> = None;
    let mut open_closed = false;
    poll_fn(|cx| {
        loop {
            if pending.is_none() {
                if open_closed {
                    break;
                }
                match open_rx.poll_recv(cx) {
                    Poll::Ready(Some(tx)) => pending = Some(tx),
                    Poll::Ready(None) => {
                        open_closed = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            let tx = pending.take().expect("set above");
            if tx.is_closed() {
                continue;
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(r) => {
                    let _ = tx.send(r);
                }
                Poll::Pending => {
                    pending = Some(tx);
                    break;
                }
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => on_inbound(s),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

fn yamux_err(e: yamux::ConnectionError) -> Error {
    match e {
        yamux::ConnectionError::Io(e) => Error::Io(e),
        yamux::ConnectionError::Closed => Error::LinkClosed,
        other => Error::Protocol(other.to_string()),
    }
}

/// A NAMES control message's body: `len u8, name` repeated; a truncated tail is
/// ignored.
pub(crate) fn parse_names(mut msg: Bytes) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    while msg.remaining() >= 1 {
        let n = msg.get_u8() as usize;
        if msg.remaining() < n {
            break;
        }
        let name = msg.split_to(n);
        names.insert(String::from_utf8_lossy(&name).into_owned());
    }
    names
}

/// The linked peers that announced `name`.
fn peers_binding(st: &State, name: &str) -> Vec<NodeId> {
    st.peer_names
        .iter()
        .filter(|(peer, names)| names.contains(name) && st.links.contains_key(peer))
        .map(|(peer, _)| *peer)
        .collect()
}

/// Highest-random-weight (rendezvous) score: the node with the highest score for a
/// bucket serves it, so when a node leaves only its buckets move.
fn hrw(node: NodeId, bucket: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.to_le_bytes().iter().chain(bucket.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix(h)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_usize(&h as *const _ as usize);
    splitmix(h.finish())
}

// ------------------------------------------------------------------ listener

/// A bound address of a [`Node`]. Dropping it unbinds the address (peers are told for
/// names); streams queued but not yet accepted are reset.
pub struct NodeListener {
    rx: mpsc::Receiver<(MuxStream, Addr)>,
    addr: Addr,
    bind_id: u64,
    node: Arc<Inner>,
}

impl fmt::Debug for NodeListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeListener")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Listener for NodeListener {
    type Stream = MuxStream;

    async fn accept(&mut self) -> Result<(MuxStream, Addr)> {
        self.rx.recv().await.ok_or(Error::Closed)
    }

    fn local_addr(&self) -> &Addr {
        &self.addr
    }
}

impl Drop for NodeListener {
    fn drop(&mut self) {
        let mut st = self.node.state.lock().unwrap();
        if st
            .binds
            .get(self.addr.vaddr())
            .is_some_and(|b| b.id == self.bind_id)
        {
            st.binds.remove(self.addr.vaddr());
            if !self.addr.vaddr().starts_with(':') {
                self.node.announce_names(&st);
            }
        }
    }
}

// ------------------------------------------------------------------ stream

enum Io {
    Yamux(tokio_util::compat::Compat<yamux::Stream>),
    Local(tokio::io::DuplexStream),
}

/// A stream of a [`Node`]: tokio `AsyncRead + AsyncWrite`.
///
/// Dropping it without [`shutdown`](AsyncWriteExt::shutdown) resets the stream (the
/// peer's reads end early); `shutdown` closes the write half cleanly (FIN).
pub struct MuxStream {
    io: Io,
    /// Open header not yet written: it goes out with the first write.
    header: Option<BytesMut>,
    /// The acceptor's status byte has not been read yet (dialer side).
    status_pending: bool,
    _permit: Option<OwnedSemaphorePermit>,
    link: Option<Arc<Link>>,
    /// The send-budget round this stream is registered for, with the waker it gave.
    budget_wait: Option<(u64, std::task::Waker)>,
}

impl fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxStream")
            .field("local", &matches!(self.io, Io::Local(_)))
            .finish()
    }
}

trait CompatStream {
    fn compat_stream(self) -> tokio_util::compat::Compat<yamux::Stream>;
}
impl CompatStream for yamux::Stream {
    fn compat_stream(self) -> tokio_util::compat::Compat<yamux::Stream> {
        tokio_util::compat::FuturesAsyncReadCompatExt::compat(self)
    }
}

impl MuxStream {
    fn new(
        io: Io,
        header: Option<BytesMut>,
        permit: Option<OwnedSemaphorePermit>,
        link: Option<Arc<Link>>,
    ) -> Self {
        let status_pending = header.is_some();
        MuxStream {
            io,
            header,
            status_pending,
            _permit: permit,
            link,
            budget_wait: None,
        }
    }

    /// Waits for the acceptor's answer (dialer side): `Ok` once the address accepted
    /// the stream, its error otherwise. Reads do this by themselves.
    pub async fn accepted(&mut self) -> Result<()> {
        self.flush().await?;
        poll_fn(|cx| self.poll_status(cx)).await.map_err(from_io)
    }

    fn poll_status(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.status_pending {
            return Poll::Ready(Ok(()));
        }
        let mut b = [0u8; 1];
        let mut rb = ReadBuf::new(&mut b);
        ready!(self.poll_io_read(cx, &mut rb))?;
        self.status_pending = false;
        let err = match rb.filled().first() {
            Some(&STATUS_ACCEPTED) => return Poll::Ready(Ok(())),
            Some(&STATUS_NO_SUCH_ADDRESS) => Error::NoSuchAddress("at the remote node".into()),
            Some(&STATUS_REFUSED) => Error::Refused("the remote listener".into()),
            Some(other) => Error::Protocol(format!("unknown open status {other}")),
            None => Error::Reset,
        };
        Poll::Ready(Err(io::Error::other(err)))
    }

    fn poll_io_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Yamux(s) => Pin::new(s).poll_read(cx, buf),
            Io::Local(s) => Pin::new(s).poll_read(cx, buf),
        }
    }

    fn poll_io_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Yamux(s) => match &self.link {
                Some(l) => {
                    ready!(l.budget.poll_room(cx, &mut self.budget_wait));
                    let n = ready!(Pin::new(s).poll_write(cx, buf))?;
                    l.budget.handed(n);
                    Poll::Ready(Ok(n))
                }
                None => Pin::new(s).poll_write(cx, buf),
            },
            Io::Local(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_header(&mut self, cx: &mut Context<'_>, first: &[u8]) -> Poll<io::Result<usize>> {
        // Header and the first bytes of data in one yamux frame: one packet for a
        // request that fits.
        let Some(h) = self.header.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        let hlen = h.len();
        let take = first.len().min(16 * 1024);
        h.extend_from_slice(&first[..take]);
        let r = match &mut self.io {
            Io::Yamux(s) => Pin::new(s).poll_write(cx, h),
            Io::Local(s) => Pin::new(s).poll_write(cx, h),
        };
        h.truncate(hlen);
        let n = ready!(r)?;
        if n >= hlen {
            self.header = None;
            Poll::Ready(Ok(n - hlen))
        } else {
            h.advance(n);
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        if let Some(l) = &self.link {
            l.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Unwraps a chanserv [`Error`] carried inside an `io::Error` by [`MuxStream`].
pub(crate) fn from_io(e: io::Error) -> Error {
    if e.get_ref().is_some_and(|i| i.is::<Error>()) {
        return *e
            .into_inner()
            .expect("checked")
            .downcast::<Error>()
            .expect("checked");
    }
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::WriteZero => {
            Error::Reset
        }
        _ => Error::Io(e),
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = match this.poll_status(cx) {
            Poll::Ready(Ok(())) => this.poll_io_read(cx, buf),
            other => other,
        };
        if r.is_pending() && this.header.is_some() {
            // Nothing to read yet: send what this side owes (the open header, or the
            // accepted status) so the peer can answer. Data already here was read
            // without it, so a request and its reply each cost one yamux frame.
            ready!(this.poll_header(cx, &[]))?;
        }
        r
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.header.is_some() {
            let n = ready!(this.poll_header(cx, buf))?;
            if n > 0 || buf.is_empty() {
                return Poll::Ready(Ok(n));
            }
        }
        this.poll_io_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.header.is_some() {
            ready!(this.poll_header(cx, &[]))?;
        }
        match &mut this.io {
            Io::Yamux(s) => Pin::new(s).poll_flush(cx),
            Io::Local(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.header.is_some() {
            ready!(this.poll_header(cx, &[]))?;
        }
        match &mut this.io {
            Io::Yamux(s) => Pin::new(s).poll_shutdown(cx),
            Io::Local(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn send_budget_holds_writers_until_the_socket_drains() {
        let b = SendBudget::new(64 * 1024);
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut reg = None;
        assert!(b.poll_room(&mut cx, &mut reg).is_ready());
        b.handed(64 * 1024);
        // Full: the writer waits, registered once however often it is polled.
        assert!(b.poll_room(&mut cx, &mut reg).is_pending());
        assert!(b.poll_room(&mut cx, &mut reg).is_pending());
        assert_eq!(b.waiters.lock().unwrap().len(), 1);
        // Draining to above half the limit wakes nobody; to half wakes the writer.
        b.written(16 * 1024);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        assert!(b.poll_room(&mut cx, &mut reg).is_ready());
        b.handed(16 * 1024);
        assert!(b.poll_room(&mut cx, &mut reg).is_pending());
        b.written(32 * 1024);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(b.poll_room(&mut cx, &mut reg).is_ready());
        // Socket bytes beyond what was handed (yamux headers) never make room
        // that was not taken.
        b.written(10 * 1024 * 1024);
        assert_eq!(b.queued(), 0);
        b.handed(64 * 1024);
        assert!(b.poll_room(&mut cx, &mut reg).is_pending());
    }
}
