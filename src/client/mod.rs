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
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{Error, Result, Timeout};
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

pub use config::ClientConfig;
pub use scatter::Scatter;
use sources::MasterIo;
pub use sources::Sources;
use stats::ClientCounters;
pub use stats::{ClientStats, RequestStats};

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
        Ok(Sources::new(master, buf, codec, guard, tally, tags, c))
    }

    /// Opens the request's master stream and writes the request on it.
    async fn write_request(
        &self,
        vaddr: &str,
        node: Option<NodeId>,
        msg: &RequestMsg,
        codec: &FrameCodec,
        buf: &mut BytesMut,
    ) -> Result<Box<dyn MasterIo>> {
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
        Ok(Box::new(master))
    }
}
