//! `Client`: posts requests and turns the answer into `Sources`.
//!
//! Owns the client half of the chanserv flow (`PROTOCOL.md`, "chanserv"): one listener
//! per client that receives every source's child stream and routes it by (request id,
//! source id) to its `Source`; the master stream of each request is read by `Sources`
//! itself when polled. It does not own the frame reader (see `source.rs`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::stream::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{BoxError, Error, Result, Timeout};
use crate::frame::FrameCodec;
use crate::mux::{from_io, DialOptions, Listener, Multiplexer, NodeId};
use crate::proto::chanserv::RequestMsg;
use crate::source::{BoxIo, RequestTag};
use accept::accept_children;

mod accept;
mod config;
mod scatter;
mod sources;
mod stats;
mod upload;

pub use config::ClientConfig;
pub use scatter::Scatter;
pub use sources::Sources;
use sources::{MasterIn, MasterIo};
use stats::ClientCounters;
pub use stats::{ClientStats, RequestStats};
use upload::BoxUpload;

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
    stats: Arc<ClientCounters>,
}

#[derive(Default)]
struct Routes {
    live: HashSet<u64>,
    slots: HashMap<(u64, u32), Slot>,
}

enum Slot {
    Waiting(oneshot::Sender<BoxIo>),
    Arrived(BoxIo),
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
                cfg: cfg.with_own_budget(),
                reply,
                routes,
                next_req: AtomicU64::new(1),
                finished: Arc::new(Mutex::new(Vec::new())),
                listening: Arc::new(stop.drop_guard()),
                stats: Arc::default(),
            }),
        })
    }

    /// Posts `body` to the service at `vaddr` and returns its sources as they are
    /// announced (Go's `LookupAndPost`). The request is written with the stream open,
    /// so a one-frame answer costs one round trip. A [`RequestTag::Bucket`] picks the
    /// serving node by consistent hashing among the providers.
    pub async fn lookup_and_post(
        &self,
        vaddr: &str,
        body: impl Into<Bytes>,
        tags: &[RequestTag],
    ) -> Result<Sources> {
        self.post_on(vaddr, body.into(), tags, None).await
    }

    /// Like [`lookup_and_post`](Self::lookup_and_post), served by the node `node`
    /// ([`DialOptions::on_node`]): [`Error::NoSuchAddress`] if it does not provide
    /// `name`.
    pub async fn post_to(
        &self,
        node: NodeId,
        name: &str,
        body: impl Into<Bytes>,
        tags: &[RequestTag],
    ) -> Result<Sources> {
        self.post_on(name, body.into(), tags, Some(node)).await
    }

    /// Like [`lookup_and_post`](Self::lookup_and_post), with an upload: the frames of
    /// `upload` follow the request on its master stream, and the service reads them
    /// with [`Request::upload`](crate::Request::upload) while it answers (an echo can
    /// stream them back as they come: both directions flow at once). Any
    /// `Stream<Item = Result<Bytes, E>>` will do: a received [`Source`](crate::Source)
    /// (a gateway forwards it as it came), or the source of
    /// [`Source::channel`](crate::Source::channel) to push frames from elsewhere.
    ///
    /// - **Backpressure.** A task of the request writes the upload as fast as the
    ///   service takes it, no faster: the service's queue (16 frames) and the master's
    ///   window hold it back, so `upload` is polled only a bounded way ahead of the
    ///   service, however slow the service or the client's reading of what it answers.
    /// - **Completion is not failure.** When `upload` ends, the service's upload ends
    ///   with `None`. An `Err` item fails it instead: the service gets
    ///   [`Error::SourceFailed`] with the error's message (a chanserv error, such as a
    ///   forwarded source's, as it was), and the request goes on.
    /// - **Cancellation, service side.** A service that drops its upload before its
    ///   end, or never takes it, stops it: `upload` is dropped at once (a channel's
    ///   `send` fails with [`Error::Closed`]), whether or not the returned [`Sources`]
    ///   is being polled; the request goes on.
    /// - **Cancellation, client side.** Dropping the returned [`Sources`] cancels the
    ///   request and drops `upload` unfinished: the service's upload fails with
    ///   [`Error::Reset`], even while it holds it unread. A link that dies fails both
    ///   sides: [`Sources`] yields the error, the service's upload too.
    ///
    /// `upload` is dropped once its end was sent, when it is stopped or cancelled as
    /// above, or when the request ends (an ERROR from the service, say); the
    /// [`Sources`] ends (`None`) only after the upload did. A channel's
    /// [`flush`](crate::SourceSender::flush) and
    /// [`finish`](crate::SourceSender::finish) report what the request's task took
    /// from it, not what the service has read.
    pub async fn lookup_and_upload<S, E>(
        &self,
        vaddr: &str,
        body: impl Into<Bytes>,
        tags: &[RequestTag],
        upload: S,
    ) -> Result<Sources>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let upload = box_upload(upload);
        self.post_with(vaddr, body.into(), tags, None, Some(upload))
            .await
    }

    /// Like [`lookup_and_upload`](Self::lookup_and_upload), served by the node `node`
    /// (as [`post_to`](Self::post_to)).
    pub async fn upload_to<S, E>(
        &self,
        node: NodeId,
        name: &str,
        body: impl Into<Bytes>,
        tags: &[RequestTag],
        upload: S,
    ) -> Result<Sources>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let upload = box_upload(upload);
        self.post_with(name, body.into(), tags, Some(node), Some(upload))
            .await
    }

    /// A snapshot of the client's counters, summed over every request it made
    /// (through any clone). Cheap: a few atomic loads.
    pub fn stats(&self) -> ClientStats {
        self.inner.stats.snapshot()
    }

    async fn post_on(
        &self,
        vaddr: &str,
        body: Bytes,
        tags: &[RequestTag],
        node: Option<NodeId>,
    ) -> Result<Sources> {
        self.post_with(vaddr, body, tags, node, None).await
    }

    async fn post_with(
        &self,
        vaddr: &str,
        body: Bytes,
        tags: &[RequestTag],
        node: Option<NodeId>,
        upload: Option<BoxUpload>,
    ) -> Result<Sources> {
        let c = &self.inner;
        let id = c.next_req.fetch_add(1, Ordering::Relaxed);
        let mut tally = c.stats.request(id, vaddr);
        c.routes.lock().unwrap().live.insert(id);
        let guard = Arc::new(RequestGuard {
            id,
            routes: c.routes.clone(),
            _listening: c.listening.clone(),
        });
        let msg = RequestMsg {
            id,
            reply: c.reply.clone(),
            tags: tags.to_vec(),
            upload: upload.is_some(),
            body,
        };
        let codec = FrameCodec::new().with_limit(c.cfg.frame_size_limit);
        let mut buf = BytesMut::new();
        let master = match self
            .write_request(vaddr, node, &msg, &codec, &mut buf)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tally.ended(true);
                return Err(e);
            }
        };
        buf.clear();
        // Close the masters of requests that finished since the last post, now that
        // this request's bytes are queued: the closes go out in the same packet.
        drop(std::mem::take(&mut *c.finished.lock().unwrap()));
        let (master, upload) = match upload {
            None => (MasterIn::Stream(Box::new(master)), None),
            Some(up) => {
                // The upload's task drives the master; `Sources` reads what it relays.
                let t = c.cfg.master_write_timeout;
                let f = c.finished.clone();
                let (handle, rx) = upload::spawn(Box::new(master), up, codec, t, f);
                (MasterIn::Relayed(rx), Some(handle))
            }
        };
        Ok(Sources::new(master, buf, codec, guard, tally, tags, c).with_upload(upload))
    }

    /// Opens the request's master stream and writes the request on it.
    async fn write_request(
        &self,
        vaddr: &str,
        node: Option<NodeId>,
        msg: &RequestMsg,
        codec: &FrameCodec,
        buf: &mut BytesMut,
    ) -> Result<M::Stream> {
        let c = &self.inner;
        let mut opts = DialOptions::new(c.cfg.dial_timeout);
        if let Some(b) = msg.tags.iter().find_map(|t| match t {
            RequestTag::Bucket(b) => Some(b),
            _ => None,
        }) {
            opts = opts.bucket(b.clone());
        }
        if let Some(n) = node {
            opts = opts.on_node(n);
        }
        let mut master = c.mux.dial(vaddr, opts).await?;
        // (reply, request) names this request in the server's logs too.
        tracing::debug!(request = msg.id, reply = %c.reply, vaddr, "posting");
        msg.encode(codec.limit(), buf)?;
        let write = async {
            master.write_all(buf).await?;
            master.flush().await
        };
        match c.cfg.master_write_timeout {
            None => write.await.map_err(from_io)?,
            Some(t) => tokio::time::timeout(t, write)
                .await
                .map_err(|_| Error::Timeout(Timeout::MasterWrite))?
                .map_err(from_io)?,
        }
        Ok(master)
    }
}

/// The user's upload stream, its errors made the crate's (a chanserv error, such as a
/// forwarded source's, stays what it is).
fn box_upload<S, E>(upload: S) -> BoxUpload
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<BoxError>,
{
    Box::pin(upload.map(|r| r.map_err(Error::from_producer)))
}
