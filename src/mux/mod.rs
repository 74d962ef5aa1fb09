//! The multiplexer: the [`Multiplexer`] trait the server and client are written
//! against, and [`Node`], its yamux-based implementation (links, virtual addresses,
//! service discovery, keep-alive, stream limits). It knows nothing of chanserv.
//!
//! Rooms: `config` (settings), `node` (the facade, listeners, accept loops),
//! `registry` (binds, peer names, routing, rendezvous hashing), `link` (handshake,
//! the yamux driver, inbound streams, a link's life from up to closed), `control`
//! (keep-alive and names on the control stream), `join` (a joined address's one
//! reconnect loop), `stream` ([`MuxStream`]), `budget` (the per-link send budget),
//! `lifeline` (how a dead link fails its streams). Byte layouts are in `PROTOCOL.md`
//! ("Links", "Stream open", "Control stream") and `proto/link.rs`.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};
use crate::proto::link::MAX_NAME_LEN;

mod budget;
mod config;
mod control;
mod join;
mod lifeline;
mod link;
mod node;
mod registry;
mod stream;

pub use crate::proto::link::PROTOCOL_VERSION;
pub use config::NodeConfig;
pub use join::Joined;
pub use node::{Node, NodeListener};
pub use stream::MuxStream;
pub(crate) use stream::{from_io, poll_read_frames, read_frames};

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

/// A link went up or down.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// The first link to this peer is up (Go circuit's `OnJoin`).
    Up(NodeId),
    /// The last link to this peer is down; its names are withdrawn (`OnLeave`).
    Down(NodeId),
}

/// How a [`Multiplexer::dial`] goes: its timeout, and optionally a bucket that picks
/// the serving node by consistent hashing. `From<Duration>` gives the defaults with
/// that timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialOptions {
    pub(crate) timeout: Duration,
    pub(crate) bucket: Option<String>,
    pub(crate) wait_for_slot: bool,
}

impl DialOptions {
    /// A dial that fails with [`Timeout::Dial`](crate::Timeout::Dial) after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        DialOptions {
            timeout,
            bucket: None,
            wait_for_slot: false,
        }
    }

    /// Among the nodes that bind the service name, the one with the highest
    /// rendezvous score for `bucket` serves it: the same bucket goes to the same node
    /// while it is up, and only its buckets move when a node leaves.
    pub fn bucket(mut self, bucket: impl Into<String>) -> Self {
        self.bucket = Some(bucket.into());
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
}

impl From<Duration> for DialOptions {
    fn from(timeout: Duration) -> Self {
        DialOptions::new(timeout)
    }
}
