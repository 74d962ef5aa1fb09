//! Joining an address: one reconnect loop per address, owned by the [`Joined`]
//! handles `join` returns. The loop keeps one active link to the address: it
//! reconnects with backoff when the link dies, and dials a fresh link when the current
//! one must rotate (the old one drains and retires by itself, unsupervised).

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::link::{hex, Established};
use super::node::Inner;
use super::NodeId;
use crate::error::{Error, Result};

/// How to make a fresh link to the same peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Rejoin {
    Tcp(SocketAddr),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

impl fmt::Display for Rejoin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejoin::Tcp(a) => write!(f, "{a}"),
            #[cfg(unix)]
            Rejoin::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What a link knows of the join that made it: the token that closes it, and where
/// to ask for a fresh link when it must rotate.
#[derive(Clone)]
pub(super) struct LinkOwner {
    pub(super) cancel: CancellationToken,
    pub(super) rotate: Arc<Notify>,
    pub(super) tasks: TaskTracker,
}

/// One joined address: its loop runs while an entry is alive.
pub(super) struct JoinEntry {
    how: Rejoin,
    owner: LinkOwner,
    /// The peer's id while a link is up.
    up: watch::Receiver<Option<NodeId>>,
    node: Weak<Inner>,
}

impl Drop for JoinEntry {
    fn drop(&mut self) {
        self.owner.cancel.cancel();
        if let Some(node) = self.node.upgrade() {
            let mut st = node.state.lock().unwrap();
            if st
                .joins
                .get(&self.how)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), self))
            {
                st.joins.remove(&self.how);
            }
        }
    }
}

/// The owner of a joined address's reconnect loop, returned by
/// [`Node::join`](super::Node::join).
///
/// While a handle is alive the node keeps one active link to the address, reconnecting
/// with backoff when it dies. Joining an address that is joined already returns
/// another handle to the same loop. Dropping the last handle stops the loop and closes
/// its links (streams on them fail with [`Error::LinkClosed`] once what they wrote is
/// delivered, within [`NodeConfig::close_timeout`](super::NodeConfig::close_timeout));
/// [`detach`](Joined::detach) hands the loop to the node instead, until it shuts down.
#[must_use = "dropping the handle leaves the address at once; see `detach`"]
#[derive(Clone)]
pub struct Joined {
    entry: Arc<JoinEntry>,
    peer: NodeId,
}

impl fmt::Debug for Joined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Joined")
            .field("addr", &format_args!("{}", self.entry.how))
            .field("peer", &format_args!("{}", hex(self.peer)))
            .finish()
    }
}

impl Joined {
    /// The id of the peer at the address, as of the first link (a restarted peer may
    /// come back with another id: see [`current_peer`](Joined::current_peer)).
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The id of the peer while a link to it is up, `None` while reconnecting.
    pub fn current_peer(&self) -> Option<NodeId> {
        *self.entry.up.borrow()
    }

    /// Keeps the loop running until the node shuts down, without a handle.
    pub fn detach(self) {
        if let Some(node) = self.entry.node.upgrade() {
            let mut st = node.state.lock().unwrap();
            if !st.closed {
                st.detached.push(self.entry.clone());
            }
        }
    }

    /// Stops the loop, closes its links and waits until they are closed. Other
    /// handles to the same loop see it stopped.
    pub async fn leave(self) {
        self.entry.owner.cancel.cancel();
        self.entry.owner.tasks.close();
        self.entry.owner.tasks.wait().await;
    }
}

impl Inner {
    /// Joins `how`: starts its loop, or shares the one that runs, and waits for the
    /// first link. A first connect that fails stops the loop and returns its error.
    pub(super) async fn join(self: &Arc<Self>, how: Rejoin) -> Result<Joined> {
        let (entry, first) = {
            let mut st = self.state.lock().unwrap();
            if st.closed {
                return Err(Error::Closed);
            }
            match st.joins.get(&how).and_then(Weak::upgrade) {
                Some(e) => (e, None),
                None => {
                    let tasks = TaskTracker::new();
                    let owner = LinkOwner {
                        cancel: self.cancel.child_token(),
                        rotate: Arc::new(Notify::new()),
                        tasks,
                    };
                    let (up_tx, up) = watch::channel(None);
                    let (first_tx, first_rx) = oneshot::channel();
                    let entry = Arc::new(JoinEntry {
                        how: how.clone(),
                        owner: owner.clone(),
                        up,
                        node: Arc::downgrade(self),
                    });
                    st.joins.insert(how.clone(), Arc::downgrade(&entry));
                    let sup = self.clone().supervise(how, owner.clone(), first_tx, up_tx);
                    self.spawn_for(Some(&owner), sup);
                    (entry, Some(first_rx))
                }
            }
        };
        let peer = match first {
            Some(rx) => rx.await.map_err(|_| Error::Closed)??,
            None => {
                let mut up = entry.up.clone();
                let id = *up
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| Error::Closed)?;
                id.expect("waited for it")
            }
        };
        Ok(Joined { entry, peer })
    }

    /// Spawns `fut` on the node's tasks and, for a join's work, on that join's too.
    pub(super) fn spawn_for<F>(&self, owner: Option<&LinkOwner>, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match owner {
            Some(o) => drop(self.tasks.spawn(o.tasks.track_future(fut))),
            None => drop(self.tasks.spawn(fut)),
        }
    }

    /// The reconnect loop of one joined address.
    async fn supervise(
        self: Arc<Self>,
        how: Rejoin,
        owner: LinkOwner,
        first: oneshot::Sender<Result<NodeId>>,
        up: watch::Sender<Option<NodeId>>,
    ) {
        let mut first = Some(first);
        let mut backoff = self.cfg.reconnect_min;
        loop {
            let r = tokio::select! {
                _ = owner.cancel.cancelled() => return,
                r = self.connect(&how, &owner) => r,
            };
            match r {
                Ok(Established { link, closed }) => {
                    backoff = self.cfg.reconnect_min;
                    up.send_replace(Some(link.peer));
                    if let Some(f) = first.take() {
                        // The caller may have stopped waiting; the link stays either way.
                        drop(f.send(Ok(link.peer)));
                    }
                    tokio::select! {
                        _ = owner.cancel.cancelled() => return,
                        _ = closed.cancelled() => up.send_replace(None),
                        // A fresh link at once; the old one drains and retires alone.
                        _ = owner.rotate.notified() => continue,
                    };
                    tracing::info!(addr = %how, "link lost, reconnecting");
                }
                Err(e) => {
                    if let Some(f) = first.take() {
                        // Nobody owns the loop until the first link is up: stop.
                        drop(f.send(Err(e)));
                        return;
                    }
                    tracing::debug!(addr = %how, "reconnect failed: {e}");
                }
            }
            tokio::select! {
                _ = owner.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
    }

    async fn connect(self: &Arc<Self>, how: &Rejoin, owner: &LinkOwner) -> Result<Established> {
        // A blackholed address would otherwise hold a connect for the OS's minutes.
        let t = self.cfg.handshake_timeout;
        let timed_out = |_| Error::Timeout(crate::Timeout::Handshake);
        match how {
            Rejoin::Tcp(a) => {
                let s = tokio::time::timeout(t, tokio::net::TcpStream::connect(a))
                    .await
                    .map_err(timed_out)??;
                if let Err(e) = s.set_nodelay(true) {
                    tracing::debug!("TCP_NODELAY: {e}");
                }
                let addr = how.to_string();
                self.establish_socket(s, true, Some(owner.clone()), addr)
                    .await
            }
            #[cfg(unix)]
            Rejoin::Unix(p) => {
                let s = tokio::time::timeout(t, tokio::net::UnixStream::connect(p))
                    .await
                    .map_err(timed_out)??;
                let addr = how.to_string();
                self.establish_socket(s, true, Some(owner.clone()), addr)
                    .await
            }
        }
    }
}
