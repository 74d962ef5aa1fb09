//! # chanserv — nested channels over a stream multiplexer
//!
//! A client posts a request to a named service; the service answers with a stream of
//! [`Source`]s; each source has a header and its own stream of frames ([`Bytes`]).
//! Sources are announced on one *master* stream and each source's frames travel on a
//! *child* stream of a yamux session, so thousands of sources share one TCP link and a
//! slow one never blocks the others. It is the Rust heir of the Go package `chanserv`
//! and its multiplexer `astranet`.
//!
//! ```
//! use chanserv::{Client, Multiplexer, Node, Server, Source};
//! use futures::{stream, StreamExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), chanserv::Error> {
//! // Two nodes joined over loopback TCP.
//! let (server_node, client_node) = (Node::new(), Node::new());
//! let addr = server_node.listen("127.0.0.1:0").await?;
//! // The handle owns the reconnect loop; `detach` hands it to the node.
//! client_node.join(addr).await?.detach();
//!
//! // A service: each request gets 3 sources of 2 frames.
//! let _service = Server::new(server_node).listen_and_serve("greeter", |req| {
//!     let name = String::from_utf8_lossy(&req.body).into_owned();
//!     stream::iter((0..3).map(move |i| {
//!         let frames = vec![format!("hello {name}").into(), format!("#{i}").into()];
//!         Source::new(format!("source {i}"), stream::iter(frames))
//!     }))
//! })?;
//! client_node.wait_for_name("greeter", std::time::Duration::from_secs(10)).await?;
//!
//! let client = Client::new(client_node)?;
//! let mut sources = client.lookup_and_post("greeter", "world", &[]).await?;
//! let mut frames = 0;
//! while let Some(source) = sources.next().await {
//!     let mut source = source?;
//!     while let Some(frame) = source.next().await {
//!         let _frame: bytes::Bytes = frame?;
//!         frames += 1;
//!     }
//!     // `None` after the last frame: the producer finished (an error would have
//!     // come as `Some(Err(..))` first).
//! }
//! assert_eq!(frames, 6);
//! # Ok(()) }
//! ```
//!
//! ## Layout
//! - `proto/` — every byte layout, no I/O and no clocks; one file per section of
//!   `PROTOCOL.md`, each message's `encode` and `decode` side by side: [`frame`] (the
//!   frame codec: length prefix, LZ4 flag, END/ABORT, limits), `link` (handshake,
//!   stream open header and status, control messages), `chanserv` (request, master
//!   messages, child-stream prefix).
//! - `mux/` — the [`Multiplexer`] trait and [`Node`], the yamux-based mesh. Its rooms:
//!   `node` (the facade, one accept loop for TCP and Unix), `config` ([`NodeConfig`]),
//!   `registry` (binds, peer names, routing, rendezvous buckets), `link` (handshake,
//!   the yamux driver, a link from up to closed), `control` (keep-alive as a state
//!   machine, names, rotation), `join` ([`Joined`]: one reconnect loop per address),
//!   `stream` ([`MuxStream`], and the one read of every framed stream), `budget`
//!   (the per-link send budget), `lifeline` (how a dead link fails every stream on
//!   it), `tls` ([`TlsConfig`]: mutual TLS 1.3 under a link, peer identities),
//!   `authz` (which names an authenticated peer may announce, one identity per node
//!   id), `stats` ([`NodeStats`]: the links, their RTT, bytes and streams), `stdio`
//!   ([`ChildNode`]: a link to a child process over its stdin and stdout, and
//!   [`Node::serve_stdio`], a node served on its own), `routing` (the path-vector
//!   table: nodes and names beyond the linked peers, [`Node::routes`]), `relay`
//!   (streams for nodes beyond, opened onward and spliced), `names` ([`Node::services`],
//!   providers and waiting for them).
//! - `server/` — [`Server`]: `config`, `request` (reads a request, runs your source
//!   function, announces the sources), `pump` (one source's child stream, batched,
//!   watched for the client leaving), `stats` ([`ServiceStats`]: counters and the
//!   sources a slow consumer holds back).
//! - `client/` — [`Client`] ([`Client::lookup_and_post`], [`Client::post_to`],
//!   [`Client::lookup_and_upload`]): `config` ([`ClientConfig`]), `sources`
//!   ([`Sources`]: the master stream, read when polled, or relayed by the request's
//!   upload task), `accept` (the one accept loop that routes child streams to their
//!   sources), `scatter` ([`Client::scatter`]: every provider of a name, merged),
//!   `stats` ([`ClientStats`], [`RequestStats`]: what a client and a request
//!   received).
//! - `tally` — the receive counters a source's reader adds to and the client's stats
//!   read, below both.
//! - `source/` — [`Source`], [`SourceSender`], [`Meta`], [`Request`], [`RequestTag`]:
//!   shared by both sides; `remote` (the reader of a child stream, which *is* the
//!   source's `poll_next`).
//! - `upload` — [`Upload`]: frames a client sends after its request
//!   ([`Client::lookup_and_upload`]), read by the service with [`Request::upload`];
//!   `server/upload` reads them off the master as the service consumes them (and
//!   `server/halves` shares the master between it and the announcer),
//!   `client/upload` is the task that writes them and relays the server's answers to
//!   [`Sources`].
//! - `error` — [`Error`], one variant per cause a caller can act on.
//! - `typed` — with the `serde` feature: typed frames, each one value encoded with
//!   postcard (`TypedSource`, `TypedSender`, `Source::typed`, `Source::from_typed`).
//!
//! `server` and `client` are siblings: neither imports the other; what both need
//! (`proto`, `mux`, `source`, `error`) lies below them, and `mux` knows nothing of
//! chanserv (a dial takes [`DialOptions`], not request tags).
//!
//! ## Semantics
//! - **Completion is not failure.** A finished source ends with `None`; a source cut
//!   by a dead link, a timeout, a reset or a server-side failure yields `Some(Err)`
//!   first. The wire carries an explicit end marker, so this holds on any multiplexer.
//! - **Order and exactly-once** within a source.
//! - **Backpressure end to end, in bytes.** A consumer that stops reading a source
//!   stops its producer once the source's credit is used: 64 KiB to start, grown only
//!   while the consumer waits on the link, within [`ClientConfig::receive_budget`]
//!   (the bound is in [`ClientConfig`]'s "Memory"), and all the sources of one
//!   request within [`ServerConfig::max_request_in_flight`]; other sources keep
//!   flowing.
//! - **Delivery confirmation.** [`SourceSender::flush`] resolves once the consumer
//!   took every frame sent before it; [`Source::with_outcome`] and
//!   [`SourceSender::finish`] report the source's [`Outcome`].
//! - **Cancellation.** Dropping a [`Source`] or [`Sources`] resets its stream(s); the
//!   server drops the producer.
//! - **Bad input** is an [`Error`], never a panic or an allocation a peer can inflate.
//!
//! ## Uploads
//! A request may carry a stream of frames after its body
//! ([`Client::lookup_and_upload`]); the service takes it once with
//! [`Request::upload`], an [`Upload`]: a `Stream` of `Result<Bytes>`, read while it
//! answers, so an echo streams it back as it arrives.
//! - **Backpressure both ways.** A service that does not read holds the client's
//!   upload stream back (16 frames queued, then the master's window); a client that
//!   stops reading an echo holds the echo back, and through it the upload.
//! - **Completion is not failure.** The upload ends with `None` when the client's
//!   stream ended, with `Some(Err)` when it yielded an error ([`Error::SourceFailed`])
//!   or the client left or its link died ([`Error::Reset`], [`Error::LinkClosed`]).
//! - **Cancellation both ways.** Dropping the [`Upload`] (or never taking it) stops the
//!   client's upload stream at once; the request goes on. Dropping [`Sources`] drops
//!   the upload stream and cancels the request, even one whose service holds the
//!   upload unread.
//!
//! ```
//! use chanserv::{Client, Node, Request, Server, Source};
//! use futures::{stream, StreamExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), chanserv::Error> {
//! let node = Node::new();
//! // An echo: the upload, streamed back as one source while it arrives.
//! let _echo = Server::new(node.clone()).listen_and_serve("echo", |req: Request| {
//!     let upload = req.upload().expect("sent with an upload");
//!     stream::iter([Source::try_new("echo", upload)])
//! })?;
//! let client = Client::new(node)?;
//! let frames = stream::iter(["a", "b", "c"].map(|f| Ok::<_, chanserv::Error>(f.into())));
//! let mut sources = client.lookup_and_upload("echo", "", &[], frames).await?;
//! let mut echo = sources.next().await.expect("one source")?;
//! let mut back = Vec::new();
//! while let Some(frame) = echo.next().await {
//!     back.push(frame?);
//! }
//! assert_eq!(back, ["a", "b", "c"]);
//! assert!(sources.next().await.is_none(), "the request completed");
//! # Ok(()) }
//! ```
//!
//! ## Under faults
//! - **A dead link ends every stream on it**, however it died (socket error,
//!   keep-alive timeout on a silent or frozen peer, shutdown, retirement, a driver
//!   panic): a read or write waiting on it fails within the keep-alive timeout plus
//!   [`NodeConfig::close_timeout`]. [`Source`] and [`Sources`] yield `Some(Err(e))`
//!   with `e.is_closed()` ([`Error::LinkClosed`] when this side declared the link
//!   dead, [`Error::Reset`] when the peer cut it), and the server drops the producers
//!   that were writing to it.
//! - **Every drop reaches its producers.** Dropping a [`Client`], [`Sources`] or
//!   [`Source`], in any order, drops every server producer it started, busy or idle.
//!   A `Client` handle alone does not cancel requests whose `Sources` are alive.
//! - **One source's failure never touches its siblings.** A producer that panics ends
//!   its own source with [`Error::SourceFailed`] (`producer panicked: …`), never with `None`.
//! - **The link never dies of a limit of yamux**: a request's sources hold at most the
//!   link's stream slots ([`NodeConfig::max_streams`]) until the consumer is done with
//!   them; later ones wait for a slot.
//! - **One reconnect loop per joined address**, owned by the [`Joined`] handle.
//! - **One client cannot pause a service**: only the service's own faults count
//!   toward [`ServerConfig::max_error_mass`].
//!
//! ## Security
//! Links are plaintext unless a node is given [`NodeConfig::tls`]: then every link it
//! listens for or joins runs over mutually authenticated TLS 1.3, a peer's identity
//! is its certificate's first DNS name ([`Node::peer_identity`]), and
//! [`TlsConfig::allow_names`] says which service names each identity may announce.
//! Loopback and tests use plaintext. `PROTOCOL.md`, "Security", has the threat model.
//!
//! ## Cargo features
//! - `metrics` (off by default): the `metrics` module publishes
//!   [`ServiceStats`] and [`ClientStats`] snapshots through the `metrics` facade crate,
//!   for any recorder or exporter (Prometheus, StatsD, …). Its docs list every metric.
//! - `serde` (off by default): the public module `typed`, frames as values of any
//!   `serde` type, encoded with `postcard`. A frame that does not decode is an
//!   [`Error::Serde`] for that frame alone; the source goes on.
//!
//! The wire protocol is specified in `PROTOCOL.md` in the repository.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod client;
mod error;
#[cfg(feature = "metrics")]
pub mod metrics;
mod mux;
mod proto;
mod server;
mod source;
mod tally;
#[cfg(feature = "serde")]
pub mod typed;
mod upload;

pub use proto::frame;

/// The crate's private decoders, for the fuzz targets in `fuzz/` (built with
/// `--cfg fuzzing` by cargo-fuzz). Not part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub use proto::fuzzing;

pub use bytes::Bytes;
pub use client::{Client, ClientConfig, ClientStats, RequestStats, Scatter, Sources};
pub use error::{BoxError, Error, ErrorFn, Result, Timeout};
pub use mux::{
    Addr, ChildNode, DialOptions, Joined, LinkEvent, LinkEvents, LinkState, LinkStats, Listener,
    Multiplexer, MuxStream, Node, NodeConfig, NodeId, NodeListener, NodeStats, PeerInfo, Provider,
    RouteInfo, TlsConfig, PROTOCOL_VERSION,
};
pub use server::{
    BlockedSource, MaxErrorMassFn, ServeHandle, Server, ServerConfig, ServiceStats, SourceItem,
};
pub use source::{
    Meta, Outcome, OutcomeFuture, Request, RequestTag, Source, SourceSender, TrySendError,
};
pub use upload::Upload;
