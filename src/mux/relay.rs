//! Relaying (`PROTOCOL.md`, "Routing"): a stream opened with RELAY for a node that is
//! not this one is opened onward, one hop nearer, and the two streams are spliced.
//! The relay holds at most one received chunk per direction: it reads the next only
//! once the last is written, so yamux's windows on both links carry backpressure end
//! to end. A FIN is passed on as a FIN, a reset (or either link's death) as a reset
//! of both streams; the far end's status byte travels back as data, so the dialer
//! learns the outcome from the node that served it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use futures::future::poll_fn;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use super::link::{hex, Active, Link};
use super::node::Inner;
use super::registry::Route;
use super::stream::{from_io, Chunk, Io, MuxStream};
use crate::error::{Error, Result};
use crate::proto::link::{Open, Status};

impl Inner {
    /// A stream `link`'s peer opened with RELAY for `target` on `node`: delivered here
    /// when `node` is this node, else relayed one hop on, or refused (no route, hop
    /// limit, no stream slot).
    pub(super) async fn open_relayed(
        self: Arc<Self>,
        s: MuxStream,
        ttl: u8,
        node: u64,
        target: String,
        link: Arc<Link>,
    ) {
        if node == self.id {
            return self.deliver(s, target, link).await;
        }
        let mut s = s.on_link(Active::new(link.clone()), None);
        let onward = match self.onward(ttl, node, &target).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(from = %hex(link.peer), to = %hex(node), "not relayed: {e}");
                refuse(&mut s, Status::NoSuchAddress, &target).await;
                return;
            }
        };
        if let Err(e) = splice(s, onward).await {
            tracing::debug!(from = %hex(link.peer), to = %hex(node), "relayed stream cut: {e}");
        }
    }

    /// The onward stream, on the next hop's link, within the keep-alive timeout.
    async fn onward(&self, ttl: u8, node: u64, target: &str) -> Result<MuxStream> {
        let route = self
            .state
            .lock()
            .unwrap()
            .hop(node, target, ttl.saturating_sub(1));
        let Some(Route::Remote(active, open)) = route else {
            return Err(Error::NoSuchAddress(format!("{node:016x}/{target}")));
        };
        let open_it = async {
            let permit = active.link().permits.clone().acquire_owned().await;
            let permit = permit.map_err(|_| Error::LinkClosed)?;
            self.open_stream(active, &open, permit).await
        };
        let s = timeout(self.cfg.keepalive_timeout, open_it)
            .await
            .map_err(|_| Error::Timeout(crate::error::Timeout::Dial))??;
        Ok(s.pass_status())
    }
}

/// Answers a stream with a refusal status and closes it; if that cannot be sent the
/// dialer is gone or the link is dying, and either way learns of it by itself.
pub(super) async fn refuse(s: &mut MuxStream, status: Status, target: &str) {
    let r = async {
        s.write_all(&[status.encode()]).await?;
        s.shutdown().await
    };
    if let Err(e) = r.await {
        tracing::debug!("refusing a stream to {target}: {e}");
    }
}

/// One direction of a splice: the chunk read and not yet written, and how far.
#[derive(Default)]
struct Pipe {
    chunk: Option<(Chunk, usize)>,
    /// The source ended cleanly: shut the sink's half.
    eof: bool,
    /// The sink's half is shut.
    shut: bool,
}

impl Pipe {
    /// Moves data from `from` to `to` until `from` ends (then shuts `to`'s half) or
    /// either fails. `from_shut`: `from`'s own half was shut (by the other pipe).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut MuxStream,
        to: &mut MuxStream,
        from_shut: bool,
    ) -> Poll<Result<()>> {
        loop {
            if let Some((chunk, at)) = &mut self.chunk {
                let data = &chunk.as_ref()[*at..];
                if data.is_empty() {
                    self.chunk = None;
                    continue;
                }
                let n = ready!(Pin::new(&mut *to).poll_write(cx, data)).map_err(from_io)?;
                if n == 0 {
                    return Poll::Ready(Err(Error::Reset));
                }
                *at += n;
                continue;
            }
            if self.shut {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                ready!(Pin::new(&mut *to).poll_shutdown(cx)).map_err(from_io)?;
                self.shut = true;
                continue;
            }
            match ready!(from.poll_chunk(cx)).map_err(from_io)? {
                Some(c) => self.chunk = Some((c, 0)),
                None if from.was_reset(from_shut) => return Poll::Ready(Err(Error::Reset)),
                None => self.eof = true,
            }
        }
    }
}

/// Splices two streams until both directions ended cleanly (`Ok`) or one failed: then
/// both are dropped, which resets what is still open of them.
async fn splice(mut a: MuxStream, mut b: MuxStream) -> Result<()> {
    let (mut ab, mut ba) = (Pipe::default(), Pipe::default());
    poll_fn(|cx| {
        let (ab_shut, ba_shut) = (ab.shut, ba.shut);
        let r1 = ab.poll(cx, &mut a, &mut b, ba_shut);
        if let Poll::Ready(Err(e)) = r1 {
            return Poll::Ready(Err(e));
        }
        let r2 = ba.poll(cx, &mut b, &mut a, ab_shut);
        match (r1, r2) {
            (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
}

impl Inner {
    /// A dialer's stream on `active`'s link with `open` as its header (sent with its
    /// first write), holding `permit`.
    pub(super) async fn open_stream(
        &self,
        active: Active,
        open: &Open,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<MuxStream> {
        let link = active.link();
        let mut header = BytesMut::new();
        open.encode(&mut header)?;
        let s = link.open().await?;
        link.count_open(self.cfg.rotate_after);
        let s = MuxStream::new(Io::yamux(s), link.life.watch(), Some(header));
        Ok(s.on_link(active, Some(permit)))
    }
}
