//! The multiplexer: the [`Multiplexer`] trait the server and client are written
//! against, and [`Node`], its yamux-based implementation (links, virtual addresses,
//! service discovery, keep-alive, stream limits). It knows nothing of chanserv.
//!
//! Rooms: `config` (settings), `node` (the facade, listeners, accept loops), `names`
//! (the names, providers and routes a node's users ask for),
//! `registry` (binds, peer names, routing, rendezvous hashing), `link` (handshake,
//! the yamux driver, inbound streams, a link's life from up to closed), `control`
//! (keep-alive and names on the control stream), `join` (a joined address's one
//! reconnect loop), `stream` ([`MuxStream`]), `budget` (the per-link send budget),
//! `lifeline` (how a dead link fails its streams), `tls` ([`TlsConfig`]: TLS 1.3 under
//! a link, peer identities), `authz` (what an authenticated peer may announce),
//! `stats` ([`NodeStats`]: a snapshot per link, and the counters behind it), `stdio`
//! ([`ChildNode`]: links over a child process's stdin and stdout, or this process's),
//! `routing` (the path-vector table: nodes and names beyond the linked peers),
//! `relay` (streams for nodes beyond: opened onward and spliced).
//! Byte layouts are in `PROTOCOL.md` ("Links", "Stream open", "Control stream",
//! "Routing", "Security") and `proto/link.rs`, `proto/route.rs`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;
use tokio_util::sync::ReusableBoxFuture;

use crate::error::{Error, Result};
use crate::proto::link::MAX_NAME_LEN;

mod authz;
mod budget;
mod config;
mod control;
mod join;
mod lifeline;
mod link;
mod names;
mod node;
mod registry;
mod relay;
mod routing;
mod stats;
mod stdio;
mod stream;
mod tls;
mod tls_handshake;
mod tls_io;
mod tls_record;

/// The read side of a TLS link fed arbitrary records, for `chanserv::fuzzing`.
#[cfg(fuzzing)]
pub use tls_io::fuzzing::records as tls_records;

pub use crate::proto::link::PROTOCOL_VERSION;
pub use config::NodeConfig;
pub use join::Joined;
pub use node::{Node, NodeListener};
pub use stats::{LinkState, LinkStats, NodeStats};
pub use stdio::ChildNode;
pub use stream::MuxStream;
pub(crate) use stream::{from_io, poll_read_frames, read_frames};
pub use tls::TlsConfig;

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
    /// refusal surfaces on the first read at the latest. `opts` bounds the wait and may
    /// steer the choice of the serving node (a [`DialOptions::bucket`]); a plain
    /// [`Duration`] is a timeout with default options.
    fn dial(
        &self,
        vaddr: &str,
        opts: impl Into<DialOptions>,
    ) -> impl Future<Output = Result<Self::Stream>> + Send;

    /// Resolves once the peer is gone from `stream`, without reading from it: the peer
    /// reset the stream or closed its half ([`Error::Reset`]), or the link under it
    /// died ([`Error::LinkClosed`]), even while data it sent waits unread. Pending
    /// otherwise, the task woken when that may have changed.
    ///
    /// chanserv's server polls it to see a client leave while the service holds the
    /// client's upload unread ([`Request::upload`](crate::Request::upload)). The
    /// default is always pending: such a client is then seen only once the service
    /// reads what the client sent before it left.
    fn poll_peer_gone(_stream: &mut Self::Stream, _cx: &mut Context<'_>) -> Poll<Error> {
        Poll::Pending
    }
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

/// Parses what [`Display`](fmt::Display) prints: `<16 hex digits>:<port>` or
/// `<16 hex digits>/<name>` ([`Error::InvalidAddress`] otherwise).
impl std::str::FromStr for Addr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Addr> {
        let bad = |why| Error::InvalidAddress(s.to_owned(), why);
        let shape = "expected <16 hex digits>:<port> or <16 hex digits>/<name>";
        let (Some(node), Some(sep), Some(rest)) = (s.get(..16), s.get(16..17), s.get(17..)) else {
            return Err(bad(shape));
        };
        if !node.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(shape));
        }
        let node = u64::from_str_radix(node, 16).map_err(|_| bad(shape))?;
        match sep {
            ":" => match rest.parse::<u32>() {
                Ok(port) => Ok(Addr::new(node, format!(":{port}"))),
                Err(_) => Err(bad("port is not a number")),
            },
            "/" if rest.len() <= 255 => Ok(Addr::new(node, rest)),
            "/" => Err(bad("name longer than 255 bytes")),
            _ => Err(bad(shape)),
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
        // The open header and NAMES carry an address in at most 255 bytes.
        if s.is_empty() || s.len() > MAX_NAME_LEN {
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

/// A node that provides a service name, as [`Node::services`] tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct Provider {
    /// The node's id.
    pub node: NodeId,
    /// How far it is: 0 for this node, 1 for a linked peer, more through the mesh.
    pub hops: usize,
}

/// A node the mesh routes to, as [`Node::routes`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteInfo {
    /// The node's id.
    pub node: NodeId,
    /// The nodes a stream to it passes: the linked peer it goes to first, `node`
    /// last. Its length is the distance in hops.
    pub path: Vec<NodeId>,
    /// The node's environment ([`NodeConfig::environment`]).
    pub environment: String,
    /// The service names it provides, sorted; none when it is of another
    /// environment than this node.
    pub names: Vec<String>,
}

/// Who is at the other end of a link, as a [`LinkEvent`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's node id.
    pub node: NodeId,
    /// Where the link goes, printed as [`LinkStats::addr`] says: `127.0.0.1:7000`,
    /// `unix:/path`, `child:<pid>`, `stdio`, or `attached`.
    pub addr: String,
    /// The peer's TLS identity ([`Node::peer_identity`]); `None` on a plaintext or
    /// [`attach`](Node::attach)ed link.
    pub identity: Option<String>,
}

/// A link went up or down, or the service names a node provides changed.
///
/// Events of one node come in the order its state changed: a peer's `Up` before
/// its first `Names`, its last `Names` before its `Down`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// The first link to this peer is up (Go circuit's `OnJoin`); the info is that
    /// link's.
    Up(PeerInfo),
    /// The last link to this peer is down; its names are withdrawn (`OnLeave`). The
    /// info is that last link's.
    Down(PeerInfo),
    /// The service names `node` provides changed, as this node sees them: a node
    /// anywhere in the mesh (a linked peer, or one reached through others) bound or
    /// dropped names, became reachable (its names appear) or unreachable (they
    /// disappear: for a linked peer with no other path, just before its `Down`), or
    /// this node (`node` is [`Node::id`]) bound a name or dropped the listener of one.
    /// Only nodes of this node's environment ([`NodeConfig::environment`]) have
    /// names here. Names a TLS peer may not announce ([`TlsConfig::allow_names`])
    /// never appear. Nothing fires when nothing changed (a rotated link announcing
    /// the same names, a route that moved to another path), nor for `":port"`
    /// addresses, nor for the node's own names when it shuts down.
    #[non_exhaustive]
    Names {
        /// The node whose names changed.
        node: NodeId,
        /// Names it provides now and did not before, sorted.
        added: Vec<String>,
        /// Names it provided before and no longer does, sorted.
        removed: Vec<String>,
    },
    /// This subscriber fell behind and missed this many events (the node keeps the
    /// last 256); [`Node::peers`] and [`Node::services`] tell where things stand now.
    Missed(u64),
}

impl LinkEvent {
    /// A `Names` event, or `None` when nothing changed.
    pub(crate) fn names(node: NodeId, added: Vec<String>, removed: Vec<String>) -> Option<Self> {
        if added.is_empty() && removed.is_empty() {
            return None;
        }
        Some(LinkEvent::Names {
            node,
            added,
            removed,
        })
    }
}

/// The link events of a node ([`Node::subscribe`]): a `Stream` of [`LinkEvent`] that
/// ends once the node and all its tasks are gone. A subscriber that falls more than
/// 256 events behind gets [`LinkEvent::Missed`] instead of the oldest ones. Dropping
/// it unsubscribes.
#[must_use = "a subscription does nothing unless polled"]
pub struct LinkEvents {
    /// `None` once the node is gone.
    next: Option<ReusableBoxFuture<'static, RecvNext>>,
}

type RecvNext = (
    std::result::Result<LinkEvent, broadcast::error::RecvError>,
    broadcast::Receiver<LinkEvent>,
);

async fn recv_next(mut rx: broadcast::Receiver<LinkEvent>) -> RecvNext {
    (rx.recv().await, rx)
}

impl LinkEvents {
    pub(crate) fn new(rx: broadcast::Receiver<LinkEvent>) -> Self {
        LinkEvents {
            next: Some(ReusableBoxFuture::new(recv_next(rx))),
        }
    }

    /// The next event; `None` once the node is gone.
    pub async fn recv(&mut self) -> Option<LinkEvent> {
        futures::StreamExt::next(self).await
    }
}

impl fmt::Debug for LinkEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkEvents").finish_non_exhaustive()
    }
}

impl futures::Stream for LinkEvents {
    type Item = LinkEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LinkEvent>> {
        use broadcast::error::RecvError;
        let Some(next) = self.next.as_mut() else {
            return Poll::Ready(None);
        };
        let (r, rx) = ready!(next.poll(cx));
        let event = match r {
            Ok(e) => e,
            Err(RecvError::Lagged(n)) => LinkEvent::Missed(n),
            Err(RecvError::Closed) => {
                self.next = None;
                return Poll::Ready(None);
            }
        };
        next.set(recv_next(rx));
        Poll::Ready(Some(event))
    }
}

/// How a [`Multiplexer::dial`] goes: its timeout, and optionally a bucket that picks
/// the serving node by consistent hashing. `From<Duration>` gives the defaults with
/// that timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialOptions {
    pub(crate) timeout: Duration,
    pub(crate) bucket: Option<String>,
    pub(crate) node: Option<NodeId>,
    pub(crate) wait_for_slot: bool,
    pub(crate) wait_for_route: bool,
}

impl DialOptions {
    /// A dial that fails with [`Timeout::Dial`](crate::Timeout::Dial) after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        DialOptions {
            timeout,
            bucket: None,
            node: None,
            wait_for_slot: false,
            wait_for_route: false,
        }
    }

    /// Among the nodes that bind the service name (however far), the one with the highest
    /// rendezvous score for `bucket` serves it: the same bucket goes to the same node
    /// while it is up, and only its buckets move when a node leaves.
    pub fn bucket(mut self, bucket: impl Into<String>) -> Self {
        self.bucket = Some(bucket.into());
        self
    }

    /// Dial a service name on this node only (this node itself, or any node of the
    /// mesh that provides the name, however far): [`Error::NoSuchAddress`] if it does
    /// not provide it. With
    /// [`Node::providers`] it reaches every provider of a name in turn; it overrides
    /// [`bucket`](Self::bucket). Ignored for `":port"` and `"<node>:<port>"` addresses.
    pub fn on_node(mut self, node: NodeId) -> Self {
        self.node = Some(node);
        self
    }

    /// When every stream slot of the link is taken ([`NodeConfig::max_streams`]),
    /// wait for one without counting that wait against the timeout. For streams whose
    /// flow control *is* the slot (chanserv's child streams: a slot frees when the
    /// consumer is done with an earlier source). The link's death still ends the wait.
    pub fn wait_for_slot(mut self, on: bool) -> Self {
        self.wait_for_slot = on;
        self
    }

    /// A dial of `"<node>:<port>"` whose node the mesh does not route to yet waits,
    /// within the timeout, for a route to appear, instead of failing at once with
    /// [`Error::NoSuchAddress`] (which it still does when the time is up). For a node
    /// known to exist whose route may still be on its way: chanserv's server dialing
    /// a client's reply address, since a request that crossed the mesh can outrun the
    /// routes that name the client's node. Ignored for other addresses.
    pub fn wait_for_route(mut self, on: bool) -> Self {
        self.wait_for_route = on;
        self
    }
}

impl From<Duration> for DialOptions {
    fn from(timeout: Duration) -> Self {
        DialOptions::new(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn addresses_print_and_parse_back() {
        for a in [
            Addr::new(0xdead_beef, ":7"),
            Addr::new(u64::MAX, "search"),
            Addr::new(1, "search:7"),
            Addr::new(0, ""),
        ] {
            assert_eq!(a.to_string().parse::<Addr>().unwrap(), a, "{a}");
        }
        for bad in [
            "",
            "12",
            "00000000000000zz:1",
            "0000000000000001:x",
            "0000000000000001-a",
        ] {
            assert!(
                matches!(bad.parse::<Addr>(), Err(Error::InvalidAddress(..))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_how_much_it_missed() {
        let (tx, rx) = broadcast::channel(2);
        let mut events = LinkEvents::new(rx);
        let up = |node| {
            LinkEvent::Up(PeerInfo {
                node,
                addr: "attached".into(),
                identity: None,
            })
        };
        for peer in 1..=5 {
            tx.send(up(peer)).unwrap();
        }
        assert_eq!(events.next().await, Some(LinkEvent::Missed(3)));
        assert_eq!(events.next().await, Some(up(4)));
        assert_eq!(events.next().await, Some(up(5)));
        drop(tx);
        assert_eq!(events.next().await, None);
        assert_eq!(events.next().await, None);
    }
}
