//! A link: one byte stream running one yamux session after a handshake, from up to
//! closed. It owns its yamux driver task, its control task, its stream slots and its
//! lifeline; who asked for it (a listener, `attach`, a join's reconnect loop) owns
//! only the decision to cancel it.
//!
//! Life of a link: `establish` (handshake, register, spawn) → active → draining (after
//! a rotation: no new streams, retires when idle and a newer link is up) → closing
//! (cancelled, dead by keep-alive, or the socket failed: leaves the routing table at
//! once, then yamux delivers what streams queued, within the close timeout) → closed
//! (the lifeline ends: every stream still parked on it fails, `closed` is cancelled).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::poll_fn;
use futures::{AsyncRead as FAsyncRead, AsyncWrite as FAsyncWrite};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::timeout;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use super::budget::{LinkIo, SendBudget};
use super::join::LinkOwner;
use super::lifeline::Lifeline;
use super::node::Inner;
use super::stats::{Rtt, Traffic};
use super::stream::{Io, MuxStream, OpenReader};
use super::{Addr, LinkEvent, NodeConfig, NodeId};
use crate::error::{Error, Result, Timeout};
use crate::proto::link::{Control, Handshake, Open, Status, HANDSHAKE_LEN};

pub(super) type OpenReq = oneshot::Sender<yamux::Result<yamux::Stream>>;

/// One link to a peer, shared by the streams it carries.
pub(crate) struct Link {
    pub(super) id: u64,
    pub(super) peer: NodeId,
    open_tx: mpsc::Sender<OpenReq>,
    /// This side's outbound stream slots: below yamux's limit, which kills the link.
    pub(super) permits: Arc<Semaphore>,
    /// Streams opened by dials from here (what rotation counts).
    opened: AtomicU64,
    /// Streams the peer opened that were delivered to a listener here.
    pub(super) accepted: AtomicU64,
    /// Streams on this link that are still held (dialed or accepted here).
    pub(super) active: AtomicUsize,
    draining: AtomicBool,
    /// Woken when a draining link may retire: its last stream went, or a newer link
    /// to its peer came up.
    pub(super) idle: tokio::sync::Notify,
    ctl_tx: mpsc::UnboundedSender<Bytes>,
    /// Cancelled to close the link (it is a child of its owner's token).
    pub(super) cancel: CancellationToken,
    /// Ends once the link is closed: every stream still parked on it fails.
    pub(super) life: Arc<Lifeline>,
    pub(super) budget: Arc<SendBudget>,
    owner: Option<LinkOwner>,
    /// The peer's identity from its TLS certificate; `None` on a plaintext link.
    pub(super) identity: Option<String>,
    /// Where the link goes, as [`LinkStats::addr`](super::LinkStats::addr) prints it.
    pub(super) addr: String,
    /// This side opened the link.
    pub(super) dialed: bool,
    /// When the link came up.
    pub(super) since: tokio::time::Instant,
    /// Bytes through the link's socket wrapper.
    pub(super) traffic: Arc<Traffic>,
    /// The last keep-alive round trip.
    pub(super) rtt: Rtt,
}

impl Link {
    /// The span of this link's tasks (its driver and control loop): the peer's id, the
    /// address and this node's number for the link, on every line they log.
    fn span(&self) -> tracing::Span {
        tracing::debug_span!("link", peer = %hex(self.peer), addr = %self.addr, link = self.id)
    }

    pub(super) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Queues a control message (a whole frame, see [`control_frame`]). A link whose
    /// control loop has ended is closing: the message has nobody left to reach.
    pub(super) fn send_control(&self, msg: Bytes) {
        if self.ctl_tx.send(msg).is_err() {
            tracing::trace!(peer = %hex(self.peer), "control message after close");
        }
    }

    /// Marks the link draining (once) and gets a fresh one to the same peer: from this
    /// link's join when this side dialed it, else by asking the peer to redial.
    pub(super) fn rotate(&self) {
        if self.draining.swap(true, Ordering::Relaxed) {
            return;
        }
        self.idle.notify_one();
        tracing::debug!(peer = %hex(self.peer), "rotating link");
        match &self.owner {
            Some(owner) => owner.rotate.notify_one(),
            None => self.send_control(control_frame(&Control::Rotate)),
        }
    }

    /// Opens a yamux stream on this link (the driver task owns the connection).
    pub(super) async fn open(&self) -> Result<yamux::Stream> {
        let (tx, rx) = oneshot::channel();
        self.open_tx.send(tx).await.map_err(|_| Error::LinkClosed)?;
        rx.await.map_err(|_| Error::LinkClosed)?.map_err(yamux_err)
    }

    /// Streams opened by dials from here so far.
    pub(super) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Counts an opened stream; past the node's quota of stream ids, rotates.
    pub(super) fn count_open(&self, rotate_after: u64) {
        if self.opened.fetch_add(1, Ordering::Relaxed) + 1 >= rotate_after {
            self.rotate();
        }
    }
}

/// One stream's count in its link's `active`. Taken while routing, under the node's
/// lock, so a draining link never retires between a dial's route and its stream.
pub(crate) struct Active(Arc<Link>);

impl Active {
    pub(super) fn new(link: Arc<Link>) -> Self {
        link.active.fetch_add(1, Ordering::AcqRel);
        Active(link)
    }

    pub(super) fn link(&self) -> &Arc<Link> {
        &self.0
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.is_draining() {
            self.0.idle.notify_one();
        }
    }
}

/// A link that came up: the link, and a token cancelled once it has closed.
pub(super) struct Established {
    pub(super) link: Arc<Link>,
    pub(super) closed: CancellationToken,
}

/// Ends the lifeline when dropped, so a driver that panics still fails its streams.
struct EndOnDrop(Arc<Lifeline>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl Inner {
    /// Runs the handshake on `io`, registers the link and spawns its tasks. Returns once
    /// the link is up; it then lives until its socket fails, it misses its keep-alive,
    /// it retires after a rotation, or `owner`'s token (else the node's) is cancelled.
    /// `addr` says where `io` goes, for stats and events.
    pub(super) async fn establish<IO>(
        self: &Arc<Self>,
        io: IO,
        initiator: bool,
        owner: Option<LinkOwner>,
        identity: Option<String>,
        addr: String,
    ) -> Result<Established>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // Writes are coalesced (`LinkIo`: yamux writes each frame's header apart from
        // its body) and reads are buffered on a bare socket, saving a syscall per frame
        // header. A TLS stream (a link with an identity) buffers both ways already
        // (`tls_io`), so a second buffer there would only copy every byte once more.
        // (tokio's `BufReader` refuses 0; with 1, every read bypasses it.)
        let buffer = if identity.is_some() { 1 } else { 64 * 1024 };
        let mut io = BufReader::with_capacity(buffer, io);
        let (peer, max_streams) = timeout(
            self.cfg.handshake_timeout,
            handshake(&mut io, self.id, &self.cfg),
        )
        .await
        .map_err(|_| Error::Timeout(Timeout::Handshake))??;
        let mode = if initiator {
            yamux::Mode::Client
        } else {
            yamux::Mode::Server
        };
        let budget = Arc::new(SendBudget::new(self.cfg.send_queue));
        let traffic = Arc::new(Traffic::default());
        let out_cap = if buffer > 1 { buffer } else { 0 };
        let io = LinkIo::new(io, out_cap, budget.clone(), traffic.clone());
        let conn = yamux::Connection::new(io.compat(), self.cfg.yamux(max_streams), mode);
        let (open_tx, open_rx) = mpsc::channel(64);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let cancel = match &owner {
            Some(o) => o.cancel.child_token(),
            None => self.cancel.child_token(),
        };
        let link = Arc::new(Link {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            open_tx,
            permits: Arc::new(Semaphore::new(max_streams)),
            opened: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
            ctl_tx,
            cancel,
            life: Arc::new(Lifeline::default()),
            budget,
            owner,
            identity,
            addr,
            dialed: initiator,
            since: tokio::time::Instant::now(),
            traffic,
            rtt: Rtt::default(),
        });
        let (ctl_in_tx, ctl_in_rx) = oneshot::channel();
        let driver = self.spawn_driver(&link, conn, open_rx, ctl_in_tx);
        if let Err(e) = self.register(&link) {
            link.cancel.cancel();
            return Err(e);
        }
        let closed = CancellationToken::new();
        let inner = self.clone();
        let (link2, closed2) = (link.clone(), closed.clone());
        let span = link.span();
        let control = async move {
            let retired = inner.clone().control(&link2, ctl_rx, ctl_in_rx).await;
            inner.close_link(&link2, driver, retired).await;
            closed2.cancel();
        };
        self.spawn_for(
            link.owner.as_ref(),
            tracing::Instrument::instrument(control, span),
        );
        Ok(Established { link, closed })
    }

    /// Adds an established link to the routing table and tells the peer our names.
    /// Fails when the node is shutting down, or another identity holds the peer's id.
    fn register(&self, link: &Arc<Link>) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return Err(Error::Closed);
        }
        super::authz::check_identity(&st, link)?;
        self.links_up.fetch_add(1, Ordering::Relaxed);
        let links = st.links.entry(link.peer).or_default();
        for older in links.iter().filter(|l| l.is_draining()) {
            older.idle.notify_one();
        }
        links.push(link.clone());
        if links.len() == 1 {
            // Under the lock, so events come in the order the table changed.
            self.emit(LinkEvent::Up(link.info()));
        }
        // The peer learns this node's environment (a ROUTES of itself alone), then its
        // names, then the routes beyond it: so its names come before those it relays.
        link.send_control(st.hello_message(self.id));
        link.send_control(st.names_message());
        self.refresh(&mut st);
        st.advertise(self.id, Some(link.peer));
        Ok(())
    }

    /// The link's last steps: out of the routing table at once, then yamux's close
    /// (bounded), then its lifeline ends.
    async fn close_link(
        &self,
        link: &Arc<Link>,
        driver: tokio::task::JoinHandle<()>,
        retired: bool,
    ) {
        link.life.begin_close();
        link.cancel.cancel();
        link.permits.close();
        let last = {
            let mut st = self.state.lock().unwrap();
            let mut last = false;
            if let Some(links) = st.links.get_mut(&link.peer) {
                links.retain(|l| l.id != link.id);
                if links.is_empty() {
                    st.links.remove(&link.peer);
                    st.peer_names.remove(&link.peer);
                    st.routing.forget(link.peer);
                    // Under the lock, so events come in the order the table changed:
                    // the names it took away, then its `Down`.
                    self.refresh(&mut st);
                    self.emit(LinkEvent::Down(link.info()));
                    last = true;
                }
            }
            last
        };
        if last {
            self.names_changed.notify_waiters();
        }
        if let Err(e) = driver.await {
            if e.is_panic() {
                tracing::error!(peer = %hex(link.peer), "link driver panicked: {e}");
            }
        }
        link.life.end();
        tracing::debug!(peer = %hex(link.peer), retired, "link closed");
    }

    /// The task that owns the yamux connection until the link closes.
    fn spawn_driver<T>(
        self: &Arc<Self>,
        link: &Arc<Link>,
        mut conn: yamux::Connection<T>,
        open_rx: mpsc::Receiver<OpenReq>,
        ctl_in: oneshot::Sender<MuxStream>,
    ) -> tokio::task::JoinHandle<()>
    where
        T: FAsyncRead + FAsyncWrite + Unpin + Send + 'static,
    {
        let inner = self.clone();
        let span = link.span();
        let link = link.clone();
        let close_timeout = self.cfg.close_timeout;
        let mut ctl_in = Some(ctl_in);
        let task = async move {
            let _end = EndOnDrop(link.life.clone());
            tokio::select! {
                r = drive(&mut conn, open_rx, |s| inner.on_inbound(s, &link, &mut ctl_in)) => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %hex(link.peer), "link failed: {e}");
                    }
                    link.life.begin_close();
                    link.cancel.cancel();
                    return;
                }
                _ = link.cancel.cancelled() => link.life.begin_close(),
            }
            // Closed from this side: deliver what streams already queued (their data
            // and FIN), then a yamux GoAway, within a bound. A peer that does not take
            // it (dead, frozen) costs the close timeout; its failure is logged only, as
            // the link is going away either way.
            match timeout(close_timeout, poll_fn(|cx| conn.poll_close(cx))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(peer = %hex(link.peer), "link close: {e}"),
                Err(_) => tracing::debug!(peer = %hex(link.peer), "link close timed out"),
            }
        };
        tokio::spawn(
            self.tasks
                .track_future(tracing::Instrument::instrument(task, span)),
        )
    }

    /// An inbound yamux stream: read its open header off the driver task, then hand it
    /// to the listener it names (or to the control loop).
    fn on_inbound(
        self: &Arc<Self>,
        s: yamux::Stream,
        link: &Arc<Link>,
        ctl_in: &mut Option<oneshot::Sender<MuxStream>>,
    ) {
        let mut s = MuxStream::new(Io::yamux(s), link.life.watch(), None);
        let mut open = OpenReader::default();
        // The open header nearly always came in the stream's first frame: deliver it
        // from here, without a task, when it is complete and its listener has room.
        let waker = futures::task::noop_waker();
        let first = open.poll(&mut s, &mut Context::from_waker(&waker));
        let (inner, link) = (self.clone(), link.clone());
        match first {
            Poll::Ready(Ok(Open::Dial(target))) => {
                if let Some(s) = self.deliver_now(s, &target, &link) {
                    self.tasks
                        .spawn(async move { inner.deliver(s, target, link).await });
                }
            }
            Poll::Ready(Ok(Open::Relay { ttl, node, target })) => {
                let task = inner.open_relayed(s, ttl, node, target, link);
                self.tasks.spawn(task);
            }
            Poll::Ready(Ok(Open::Control)) => match ctl_in.take() {
                // The control loop may have ended already: the link is closing.
                Some(tx) => drop(tx.send(s)),
                None => tracing::debug!(peer = %hex(link.peer), "second control stream refused"),
            },
            Poll::Ready(Err(e)) => tracing::debug!(peer = %hex(link.peer), "bad stream open: {e}"),
            Poll::Pending => {
                let ctl_in = ctl_in.take();
                self.tasks.spawn(async move {
                    let r = timeout(
                        inner.cfg.handshake_timeout,
                        poll_fn(|cx| open.poll(&mut s, cx)),
                    )
                    .await;
                    match r {
                        Ok(Ok(Open::Dial(target))) => inner.deliver(s, target, link).await,
                        Ok(Ok(Open::Relay { ttl, node, target })) => {
                            inner.open_relayed(s, ttl, node, target, link).await
                        }
                        Ok(Ok(Open::Control)) => match ctl_in {
                            Some(tx) => drop(tx.send(s)),
                            None => tracing::debug!("second control stream refused"),
                        },
                        Ok(Err(e)) => tracing::debug!("bad stream open: {e}"),
                        Err(_) => tracing::debug!("stream open header timed out"),
                    }
                });
            }
        }
    }

    /// The stream as its listener gets it: counted on its link, owing the accepted
    /// status. That status goes out with the acceptor's first write, or as soon as it
    /// waits to read: either ACKs the yamux stream (yamux stalls after 256 unacked
    /// opens). A refusal goes out at once instead.
    fn accepted(&self, mut s: MuxStream, link: &Arc<Link>) -> (MuxStream, Addr) {
        s.header = Some(BytesMut::from(&[Status::Accepted.encode()][..]));
        link.accepted.fetch_add(1, Ordering::Relaxed);
        (
            s.on_link(Active::new(link.clone()), None),
            Addr::new(link.peer, String::new()),
        )
    }

    /// Delivers without waiting when the listener exists and has room; otherwise gives
    /// the stream back for [`deliver`](Self::deliver).
    fn deliver_now(&self, s: MuxStream, target: &str, link: &Arc<Link>) -> Option<MuxStream> {
        let tx = self.state.lock().unwrap().listener_for(target, self.id);
        match tx.and_then(|tx| tx.try_reserve_owned().ok()) {
            Some(permit) => {
                permit.send(self.accepted(s, link));
                None
            }
            None => Some(s),
        }
    }

    pub(super) async fn deliver(&self, mut s: MuxStream, target: String, link: Arc<Link>) {
        let tx = self.state.lock().unwrap().listener_for(&target, self.id);
        let status = match tx {
            None => Status::NoSuchAddress,
            Some(tx) => match tx.reserve_owned().await {
                Ok(permit) => {
                    permit.send(self.accepted(s, &link));
                    return;
                }
                Err(_) => Status::Refused,
            },
        };
        super::relay::refuse(&mut s, status, &target).await;
    }

    /// Opens this side's control stream on `link`.
    pub(super) async fn open_control(&self, link: &Arc<Link>) -> Result<MuxStream> {
        let s = link.open().await?;
        let mut s = MuxStream::new(Io::yamux(s), link.life.watch(), None);
        let mut header = BytesMut::new();
        Open::Control.encode(&mut header)?;
        s.write_all(&header).await?;
        s.flush().await?;
        Ok(s)
    }
}

pub(super) fn hex(id: NodeId) -> String {
    format!("{id:016x}")
}

/// A whole control frame, for [`Link::send_control`].
pub(super) fn control_frame(msg: &Control) -> Bytes {
    let mut b = BytesMut::new();
    if let Err(e) = msg.encode(&mut b) {
        // Only NAMES can fail, and its names were checked when they were bound.
        tracing::error!("control message not sent: {e}");
    }
    b.freeze()
}

async fn handshake<IO>(io: &mut IO, id: NodeId, cfg: &NodeConfig) -> Result<(NodeId, usize)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // `max_streams` is at most 1,000,000 (checked where it is set): it fits a u32.
    let ours = Handshake::new(id, cfg.max_streams as u32);
    io.write_all(&ours.encode()).await?;
    io.flush().await?;
    let mut inb = [0u8; HANDSHAKE_LEN];
    io.read_exact(&mut inb).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Protocol("link closed during handshake".into()),
        _ => e.into(),
    })?;
    let theirs = Handshake::decode(&inb)?;
    if theirs.node == id {
        return Err(Error::Protocol("link to self".into()));
    }
    let their_max = theirs.max_streams as usize;
    Ok((theirs.node, cfg.max_streams.min(their_max.max(1))))
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
                // A dialer that gave up (timed out) dropped its receiver; the stream
                // is dropped with the unsent result, which resets it.
                Poll::Ready(r) => drop(tx.send(r)),
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
