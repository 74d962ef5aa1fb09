//! [`Node`], the facade: its shared state (`Inner`), binding and dialing, listening
//! for links with one accept loop, joining, shutdown. The rooms beside it do the work.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::join::{Joined, Rejoin};
use super::lifeline::Lifeline;
use super::link::Active;
use super::registry::{random_u64, Binding, Route, State};
use super::stream::{Io, MuxStream};
use super::{
    Addr, DialOptions, LinkEvent, LinkEvents, Listener, Multiplexer, NodeConfig, NodeId, VAddr,
};
use crate::error::{Error, Result, Timeout};
use crate::proto::link::Open;

/// A node of the mesh: binds virtual addresses, links to other nodes, dials.
///
/// Cheap to clone: clones share one node. Dropping the last clone (or calling
/// [`shutdown`](Node::shutdown)) closes every link, listener and join of the node and
/// stops its tasks. What streams already wrote, their shutdown included, is still
/// delivered (for up to [`NodeConfig::close_timeout`]); reads and writes still waiting
/// then fail with [`Error::LinkClosed`], and bound listeners return [`Error::Closed`].
///
/// Virtual addresses:
/// - a service name, `"chanserv"` or `"search:7"`: announced to linked peers;
/// - `":port"`: local to this node; `":0"` binds a free port chosen by the node;
/// - `"<node-id>:<port>"` (16 hex digits): a port on a given node, linked or reached
///   through the mesh.
///
/// Nodes reach each other through the mesh: names and routes propagate hop by hop
/// (`PROTOCOL.md`, "Routing"), and a stream to a node that is not linked is relayed
/// by the nodes between, end to end ([`Node::routes`]).
#[derive(Clone)]
pub struct Node {
    pub(super) inner: Arc<Inner>,
    _stop: Arc<Stop>,
}

/// Stops the node when the last `Node` clone goes (tasks hold `Inner`, not this).
struct Stop(Arc<Inner>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &format_args!("{:016x}", self.inner.id))
            .finish()
    }
}

/// The node's shared state: what its tasks and streams hold.
pub(crate) struct Inner {
    pub(super) id: NodeId,
    pub(super) cfg: NodeConfig,
    pub(super) state: Mutex<State>,
    events: broadcast::Sender<LinkEvent>,
    pub(super) cancel: CancellationToken,
    pub(super) tasks: TaskTracker,
    pub(super) next_id: AtomicU64,
    rr: AtomicUsize,
    /// Links established so far (rotations included).
    pub(super) links_up: AtomicU64,
    /// Woken whenever a peer's names change.
    pub(super) names_changed: tokio::sync::Notify,
    /// The node's own life: local (in-process) streams fail when it ends.
    life: Arc<Lifeline>,
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Node {
    /// A node with a random id and [`NodeConfig::default`]. Links, listens and joins
    /// need a tokio runtime; binding and dialing local addresses do not.
    pub fn new() -> Self {
        Self::with_config(NodeConfig::default())
    }

    /// A node with the given settings (a random id unless they set one:
    /// [`NodeConfig::node_id`]).
    pub fn with_config(cfg: NodeConfig) -> Self {
        let env = cfg.environment.clone();
        let inner = Arc::new(Inner {
            id: cfg.node_id.unwrap_or_else(random_u64),
            cfg,
            state: Mutex::new(State {
                next_port: 1024,
                env,
                ..State::default()
            }),
            events: broadcast::channel(256).0,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            next_id: AtomicU64::new(1),
            rr: AtomicUsize::new(0),
            names_changed: tokio::sync::Notify::new(),
            links_up: AtomicU64::new(0),
            life: Arc::new(Lifeline::default()),
        });
        Node {
            _stop: Arc::new(Stop(inner.clone())),
            inner,
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Link up/down and name events from now on, as a stream (see [`LinkEvents`]).
    pub fn subscribe(&self) -> LinkEvents {
        LinkEvents::new(self.inner.events.subscribe())
    }

    /// Accepts links on a TCP address until the node shuts down. Returns the bound
    /// socket address (useful with port 0).
    pub async fn listen(&self, addr: impl tokio::net::ToSocketAddrs) -> Result<SocketAddr> {
        let l = tokio::net::TcpListener::bind(addr).await?;
        let local = l.local_addr()?;
        self.inner.tasks.spawn(self.inner.clone().accept_links(l));
        Ok(local)
    }

    /// Accepts links on a Unix-domain socket path until the node shuts down.
    #[cfg(unix)]
    pub async fn listen_unix(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let l = tokio::net::UnixListener::bind(path)?;
        self.inner.tasks.spawn(self.inner.clone().accept_links(l));
        Ok(())
    }

    /// Links to a node listening on a TCP address and keeps the link: returns once the
    /// first link is up, with the handle that owns the reconnect loop (see [`Joined`]:
    /// dropping it leaves). A first connect that fails returns its error and leaves
    /// nothing running; joining an address already joined shares its loop.
    pub async fn join(&self, addr: SocketAddr) -> Result<Joined> {
        self.inner.join(Rejoin::Tcp(addr)).await
    }

    /// Links to a node listening on a Unix-domain socket, like [`join`](Self::join).
    #[cfg(unix)]
    pub async fn join_unix(&self, path: impl AsRef<std::path::Path>) -> Result<Joined> {
        self.inner
            .join(Rejoin::Unix(path.as_ref().to_owned()))
            .await
    }

    /// Runs a link over any byte stream (an in-memory duplex, stdio, TLS). `initiator`
    /// must be true on exactly one side. Returns the peer's id once the handshake is
    /// done; the link lives until the stream fails, misses its keep-alive, or the node
    /// shuts down. No reconnection: the node cannot make a new `io`. The stream is
    /// used as it is, even on a node with [`NodeConfig::tls`]: the link has no peer
    /// identity and its names are not checked (a failure that a rustls stream reports
    /// is still [`Error::Tls`]). A child process's stdio and this process's own have
    /// their own methods: [`spawn_child`](Self::spawn_child),
    /// [`serve_stdio`](Self::serve_stdio).
    pub async fn attach<IO>(&self, io: IO, initiator: bool) -> Result<NodeId>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let r = self
            .inner
            .establish(io, initiator, None, None, "attached".into())
            .await;
        Ok(r.map_err(super::tls::classify)?.link.peer)
    }

    /// Closes every link, listener and join and waits for the node's tasks to end.
    pub async fn shutdown(&self) {
        self.inner.close();
        self.inner.tasks.wait().await;
    }
}

impl Inner {
    /// Stops everything: links close (gracefully, bounded), joins stop, listeners
    /// return `Closed`, local streams fail.
    fn close(&self) {
        self.cancel.cancel();
        self.tasks.close();
        let (binds, detached) = {
            let mut st = self.state.lock().unwrap();
            st.closed = true;
            (
                std::mem::take(&mut st.binds),
                std::mem::take(&mut st.detached),
            )
        };
        // Dropped outside the lock: a join's drop takes it.
        drop((binds, detached));
        self.life.end();
        self.names_changed.notify_waiters();
    }

    /// Publishes a link event; nobody listening is fine.
    pub(super) fn emit(&self, e: LinkEvent) {
        if self.events.send(e).is_err() {
            tracing::trace!("link event with no subscriber");
        }
    }

    /// Computes the routes again after a change under `st` and publishes the names
    /// that appeared or disappeared anywhere (under the lock, so events come in the
    /// order the table changed); wakes who waits for names.
    pub(super) fn refresh(&self, st: &mut State) {
        for (node, added, removed) in st.refresh(self.id) {
            if let Some(e) = LinkEvent::names(node, added, removed) {
                self.emit(e);
            }
        }
        self.names_changed.notify_waiters();
    }

    /// Publishes a change of this node's own names (under the state lock, so events
    /// come in the order binds changed).
    fn emit_names(&self, added: Vec<String>, removed: Vec<String>) {
        if let Some(e) = LinkEvent::names(self.id, added, removed) {
            self.emit(e);
        }
    }

    pub(super) fn route(&self, v: &VAddr, opts: &DialOptions) -> Result<Route> {
        let rr = self.rr.fetch_add(1, Ordering::Relaxed);
        self.state.lock().unwrap().route(self.id, v, opts, rr)
    }

    /// One accept loop for every kind of listener: each accepted socket becomes a
    /// link in its own task; errors (EMFILE, ...) back off exponentially.
    async fn accept_links<L: LinkListener>(self: Arc<Self>, mut l: L) {
        const MIN: Duration = Duration::from_millis(5);
        const MAX: Duration = Duration::from_secs(1);
        let mut backoff = MIN;
        loop {
            let r = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = l.accept_io() => r,
            };
            match r {
                Ok((io, from)) => {
                    backoff = MIN;
                    let inner = self.clone();
                    self.tasks.spawn(async move {
                        let r = inner.establish_socket(io, false, None, from.clone()).await;
                        if let Err(e) = r {
                            tracing::warn!("inbound link from {from}: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accepting links: {e}; retrying in {backoff:?}");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX);
                }
            }
        }
    }

    async fn dial(
        self: Arc<Self>,
        v: VAddr,
        vaddr: String,
        opts: DialOptions,
    ) -> Result<MuxStream> {
        let deadline = Instant::now() + opts.timeout;
        // A draining link may retire between the route and the open: route again once.
        let mut retry = true;
        loop {
            let (link, open) = match self.route_by(&v, &opts, deadline).await? {
                Route::Local(tx, key) => return self.dial_local(tx, key, &vaddr, deadline).await,
                Route::Remote(link, open) => (link, open),
            };
            let draining = link.link().is_draining();
            match self.dial_link(link, &open, &opts, deadline).await {
                Err(Error::LinkClosed) if draining && retry => retry = false,
                r => return r,
            }
        }
    }

    /// [`route`](Self::route); with [`DialOptions::wait_for_route`], a `<node>:<port>`
    /// whose node the mesh does not reach yet waits for a route until `deadline`.
    async fn route_by(&self, v: &VAddr, opts: &DialOptions, deadline: Instant) -> Result<Route> {
        let waits = opts.wait_for_route && matches!(v, VAddr::Node(id, _) if *id != self.id);
        loop {
            // Taken before the look, so a change right after it is not missed.
            let changed = self.names_changed.notified();
            match self.route(v, opts) {
                Err(Error::NoSuchAddress(_)) if waits => {
                    if timeout_at(deadline, changed).await.is_err() {
                        return self.route(v, opts);
                    }
                }
                r => return r,
            }
        }
    }

    async fn dial_local(
        &self,
        tx: mpsc::Sender<(MuxStream, Addr)>,
        key: String,
        vaddr: &str,
        deadline: Instant,
    ) -> Result<MuxStream> {
        let (a, b) = Io::local_pair(256 * 1024);
        let here = Addr::new(self.id, key);
        let far = MuxStream::new(b, self.life.watch(), None);
        let send = async {
            tx.send((far, here))
                .await
                .map_err(|_| Error::NoSuchAddress(vaddr.to_owned()))
        };
        until(deadline, send).await?;
        Ok(MuxStream::new(a, self.life.watch(), None))
    }

    async fn dial_link(
        &self,
        link: Active,
        open: &Open,
        opts: &DialOptions,
        deadline: Instant,
    ) -> Result<MuxStream> {
        let acquire = async {
            link.link()
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::LinkClosed)
        };
        let (permit, deadline) = if opts.wait_for_slot {
            // The timeout counts from when a slot was free.
            (acquire.await?, Instant::now() + opts.timeout)
        } else {
            (until(deadline, acquire).await?, deadline)
        };
        until(deadline, self.open_stream(link, open, permit)).await
    }
}

/// `f`, failing with [`Timeout::Dial`] at `deadline`.
async fn until<T>(deadline: Instant, f: impl Future<Output = Result<T>>) -> Result<T> {
    timeout_at(deadline, f)
        .await
        .map_err(|_| Error::Timeout(Timeout::Dial))?
}

/// A socket listener the accept loop can take links from: a socket, and where it
/// came from (for logs).
trait LinkListener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    fn accept_io(&mut self) -> impl Future<Output = std::io::Result<(Self::Io, String)>> + Send;
}

impl LinkListener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&mut self) -> std::io::Result<(Self::Io, String)> {
        let (s, from) = self.accept().await?;
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
        Ok((s, from.to_string()))
    }
}

#[cfg(unix)]
impl LinkListener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&mut self) -> std::io::Result<(Self::Io, String)> {
        let s = self.accept().await?.0;
        // A Unix peer has no address of its own: name the path it came in on.
        let here = self.local_addr()?;
        let path = here.as_pathname().map(|p| p.display().to_string());
        Ok((s, format!("unix:{}", path.unwrap_or_default())))
    }
}

impl Multiplexer for Node {
    type Stream = MuxStream;
    type Listener = NodeListener;

    fn bind(&self, vaddr: &str) -> Result<NodeListener> {
        let v = VAddr::parse(vaddr)?;
        let inner = &self.inner;
        let mut st = inner.state.lock().unwrap();
        if st.closed {
            return Err(Error::Closed);
        }
        let key = match v {
            VAddr::Port(0) => loop {
                st.next_port = st.next_port.wrapping_add(1).max(1024);
                let k = format!(":{}", st.next_port);
                if !st.binds.contains_key(&k) {
                    break k;
                }
            },
            ref v => State::local_key(v, inner.id)
                .ok_or_else(|| Error::InvalidAddress(vaddr.into(), "bound on another node"))?,
        };
        if st.binds.contains_key(&key) {
            return Err(Error::AddrInUse(key));
        }
        let (tx, rx) = mpsc::channel(inner.cfg.accept_backlog);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        st.binds.insert(key.clone(), Binding { id, tx });
        if !key.starts_with(':') {
            st.announce_names();
            inner.emit_names(vec![key.clone()], vec![]);
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
        opts: impl Into<DialOptions>,
    ) -> impl Future<Output = Result<MuxStream>> + Send {
        let inner = self.inner.clone();
        let parsed = VAddr::parse(vaddr);
        let vaddr = vaddr.to_owned();
        let opts = opts.into();
        async move { inner.dial(parsed?, vaddr, opts).await }
    }

    fn poll_peer_gone(stream: &mut MuxStream, cx: &mut Context<'_>) -> Poll<Error> {
        stream.poll_peer_gone(cx)
    }
}

/// A bound address of a [`Node`]. Dropping it unbinds the address (peers are told for
/// names); streams queued but not yet accepted are reset. Once the node shuts down,
/// `accept` returns [`Error::Closed`].
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
                st.announce_names();
                let name = self.addr.vaddr().to_owned();
                self.node.emit_names(vec![], vec![name]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails its first `fails` accepts (as EMFILE would), telling when each came.
    struct Failing {
        fails: u32,
        calls: mpsc::UnboundedSender<Instant>,
    }

    impl LinkListener for Failing {
        type Io = tokio::io::DuplexStream;
        async fn accept_io(&mut self) -> std::io::Result<(Self::Io, String)> {
            // The test reads every call; it is gone only once it has failed.
            let _ = self.calls.send(Instant::now());
            if self.fails == 0 {
                return std::future::pending().await;
            }
            self.fails -= 1;
            Err(std::io::Error::other("too many open files"))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_accept_loop_backs_off_exponentially_on_errors() {
        let node = Node::new();
        let (tx, mut calls) = mpsc::unbounded_channel();
        let task = tokio::spawn(node.inner.clone().accept_links(Failing {
            fails: 9,
            calls: tx,
        }));
        let mut at = Vec::new();
        while at.len() < 10 {
            at.push(calls.recv().await.expect("the loop runs"));
        }
        let gaps: Vec<u128> = at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        // 5 ms doubling, capped at 1 s: no spinning, no fixed pause.
        assert_eq!(gaps, [5, 10, 20, 40, 80, 160, 320, 640, 1000]);
        node.shutdown().await;
        task.await.unwrap();
    }
}
