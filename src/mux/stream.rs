//! [`MuxStream`], the byte stream a [`Node`](super::Node) hands out, and the reader of
//! a stream's open header, and [`poll_read_frames`], the one read of every framed
//! stream of the crate (it sits next to [`from_io`], whose errors it returns, so the
//! control loop, the client and the server share it). A stream owns its yamux stream (or in-memory pipe), its
//! slot on the link, what it still owes the peer (open header or accepted status),
//! and its watch on the link's lifeline: when the link dies, a parked read or write
//! fails with [`Error::LinkClosed`] instead of waiting forever.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use futures::future::poll_fn;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use super::lifeline::{Half, Watch};
use super::link::Active;
use crate::error::{Error, Result};
use crate::proto::frame::FrameCodec;
use crate::proto::link::{Open, Partial, Status};

pub(super) type YamuxIo = tokio_util::compat::Compat<yamux::Stream>;

pub(super) enum Io {
    Yamux(YamuxIo),
    Local(tokio::io::DuplexStream, LocalEnd),
}

impl Io {
    pub(super) fn yamux(s: yamux::Stream) -> Io {
        Io::Yamux(tokio_util::compat::FuturesAsyncReadCompatExt::compat(s))
    }

    /// The two ends of a stream within a node: an in-memory pipe of `capacity` bytes.
    pub(super) fn local_pair(capacity: usize) -> (Io, Io) {
        let (a, b) = tokio::io::duplex(capacity);
        let (da, db) = (Arc::new(Dropped::default()), Arc::new(Dropped::default()));
        let ea = LocalEnd {
            mine: da.clone(),
            peer: db.clone(),
        };
        let eb = LocalEnd { mine: db, peer: da };
        (Io::Local(a, ea), Io::Local(b, eb))
    }
}

/// Set when one end of a local pipe is dropped. The pipe's reader learns that only
/// after reading all that is buffered; [`MuxStream::poll_peer_gone`] must not read.
#[derive(Default)]
struct Dropped {
    flag: AtomicBool,
    waker: AtomicWaker,
}

/// What one end of a local pipe knows of the ends' lives.
pub(super) struct LocalEnd {
    mine: Arc<Dropped>,
    peer: Arc<Dropped>,
}

impl LocalEnd {
    fn poll_peer_dropped(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.peer.waker.register(cx.waker());
        match self.peer.flag.load(Ordering::Acquire) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }
}

impl Drop for LocalEnd {
    fn drop(&mut self) {
        self.mine.flag.store(true, Ordering::Release);
        self.mine.waker.wake();
    }
}

/// A stream of a [`Node`](super::Node): tokio `AsyncRead + AsyncWrite`.
///
/// Dropping it without [`shutdown`](AsyncWriteExt::shutdown) resets the stream (the
/// peer's reads end early); `shutdown` closes the write half cleanly (FIN). When the
/// link under it dies (or its node shuts down), reads and writes that would wait fail
/// with [`Error::LinkClosed`] (inside the `io::Error`; see [`Error`]'s docs); data that
/// had already arrived is still read first.
pub struct MuxStream {
    io: Io,
    /// Open header not yet written: it goes out with the first write.
    pub(super) header: Option<BytesMut>,
    /// The acceptor's status byte has not been read yet (dialer side).
    status_pending: bool,
    _permit: Option<OwnedSemaphorePermit>,
    /// The link that carries the stream, counting it in its `active` streams.
    pub(super) link: Option<Active>,
    /// The send-budget round this stream is registered for, with the waker it gave.
    budget_wait: Option<(u64, std::task::Waker)>,
    /// The rest of a yamux frame's body a read had no room for: the next read (or
    /// chunk) starts with it.
    rest: Option<(yamux::Packet, usize)>,
    watch: Watch,
}

impl fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxStream")
            .field("local", &matches!(self.io, Io::Local(..)))
            .finish()
    }
}

impl MuxStream {
    /// A stream watching `watch`'s lifeline. A dialer's stream carries its open header
    /// (and then expects a status); an accepted one is given its owed status later.
    pub(super) fn new(io: Io, watch: Watch, header: Option<BytesMut>) -> Self {
        let status_pending = header.is_some();
        MuxStream {
            io,
            header,
            status_pending,
            _permit: None,
            link: None,
            budget_wait: None,
            rest: None,
            watch,
        }
    }

    /// Counts the stream on `link` (for retirement) and holds its slot until dropped.
    pub(super) fn on_link(mut self, link: Active, permit: Option<OwnedSemaphorePermit>) -> Self {
        self.link = Some(link);
        self._permit = permit;
        self
    }

    /// A dialer's stream whose acceptor's status byte is read as data: a relay passes
    /// the far end's status back to the stream it relays for.
    pub(super) fn pass_status(mut self) -> Self {
        self.status_pending = false;
        self
    }

    /// True when the peer reset the stream, as opposed to closing its half (a read
    /// that returned 0 cannot tell): yamux marks a reset stream closed both ways,
    /// which a FIN does only once this side has shut its half (`shut`).
    pub(super) fn was_reset(&self, shut: bool) -> bool {
        match &self.io {
            Io::Yamux(s) => !shut && s.get_ref().is_closed(),
            Io::Local(..) => false,
        }
    }

    /// The next piece of data as it arrived (a yamux frame's body, not copied), for
    /// the relay; `None` at the end of the stream. Like a read, it sends what this
    /// side owes (its open header) when it would wait, and fails when the link dies.
    pub(super) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Chunk>>> {
        if let Some((p, at)) = self.rest.take() {
            // What a read (of a status byte) left of a frame.
            return Poll::Ready(Ok(Some(Chunk::Yamux(p, at))));
        }
        let r = match &mut self.io {
            Io::Yamux(s) => {
                use futures::Stream;
                match Pin::new(s.get_mut()).poll_next(cx) {
                    Poll::Ready(Some(Ok(p))) => Poll::Ready(Ok(Some(Chunk::Yamux(p, 0)))),
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Err(e)),
                    Poll::Ready(None) => Poll::Ready(Ok(None)),
                    Poll::Pending => Poll::Pending,
                }
            }
            Io::Local(s, _) => {
                let mut b = vec![0u8; 16 * 1024];
                let mut rb = ReadBuf::new(&mut b);
                match Pin::new(s).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Ok(None)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        b.truncate(n);
                        Poll::Ready(Ok(Some(Chunk::Local(b))))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
        };
        if r.is_pending() && self.header.is_some() {
            ready!(self.poll_header(cx, &[]))?;
        }
        self.unless_dead(Half::Read, cx, r)
    }

    /// Waits for the acceptor's answer (dialer side): `Ok` once the address accepted
    /// the stream, its error otherwise. Reads do this by themselves.
    pub async fn accepted(&mut self) -> Result<()> {
        self.flush().await?;
        poll_fn(|cx| {
            let r = self.poll_status(cx);
            self.unless_dead(Half::Read, cx, r)
        })
        .await
        .map_err(from_io)
    }

    /// An operation that would wait fails instead when the link is gone, and an error
    /// of the transport while the link closes is the link's.
    fn unless_dead<T>(
        &self,
        half: Half,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let lost = match &r {
            Poll::Pending => self.watch.parked_on_dead(half, cx),
            Poll::Ready(Err(e)) => !carries_error(e) && self.watch.is_closing(),
            Poll::Ready(Ok(_)) => false,
        };
        if lost {
            return Poll::Ready(Err(io::Error::other(Error::LinkClosed)));
        }
        r
    }

    /// Ready once the peer is gone from the stream, without reading: it reset the
    /// stream or closed its half (a stream within a node: dropped its end), or the link
    /// died. Data it sent before may still wait unread. See
    /// [`Multiplexer::poll_peer_gone`](super::Multiplexer::poll_peer_gone).
    pub(crate) fn poll_peer_gone(&mut self, cx: &mut Context<'_>) -> Poll<Error> {
        let r = match &mut self.io {
            // An empty read: yamux answers at once when the stream can be read no more
            // (whatever is buffered), else it parks the task for the stream's next news.
            Io::Yamux(s) => Pin::new(s).poll_read(cx, &mut ReadBuf::new(&mut [])),
            // A pipe answers an empty read at once: it cannot tell.
            Io::Local(_, end) => end.poll_peer_dropped(cx).map(Ok),
        };
        match self.unless_dead(Half::Read, cx, r) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Error::Reset),
            Poll::Ready(Err(e)) => Poll::Ready(from_io(e)),
        }
    }

    fn poll_status(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.status_pending {
            return Poll::Ready(Ok(()));
        }
        let mut b = [0u8; 1];
        let mut rb = ReadBuf::new(&mut b);
        ready!(self.poll_io_read(cx, &mut rb))?;
        self.status_pending = false;
        let err = match rb.filled().first().map(|b| Status::decode(*b)) {
            Some(Ok(Status::Accepted)) => return Poll::Ready(Ok(())),
            Some(Ok(Status::NoSuchAddress)) => Error::NoSuchAddress("at the remote node".into()),
            Some(Ok(Status::Refused)) => Error::Refused("the remote listener".into()),
            Some(Err(e)) => e,
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
            Io::Yamux(s) => poll_read_packets(s.get_mut(), &mut self.rest, cx, buf),
            Io::Local(s, _) => Pin::new(s).poll_read(cx, buf),
        }
    }

    fn poll_io_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Yamux(s) => match self.link.as_ref().map(Active::link) {
                Some(l) => {
                    ready!(l.budget.poll_room(cx, &mut self.budget_wait));
                    let n = ready!(Pin::new(s).poll_write(cx, buf))?;
                    l.budget.handed(n);
                    Poll::Ready(Ok(n))
                }
                None => Pin::new(s).poll_write(cx, buf),
            },
            Io::Local(s, _) => Pin::new(s).poll_write(cx, buf),
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
            Io::Local(s, _) => Pin::new(s).poll_write(cx, h),
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

    fn poll_read_inner(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = match self.poll_status(cx) {
            Poll::Ready(Ok(())) => self.poll_io_read(cx, buf),
            other => other,
        };
        if r.is_pending() && self.header.is_some() {
            // Nothing to read yet: send what this side owes (the open header, or the
            // accepted status) so the peer can answer. Data already here was read
            // without it, so a request and its reply each cost one yamux frame.
            ready!(self.poll_header(cx, &[]))?;
        }
        r
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.header.is_some() {
            let n = ready!(self.poll_header(cx, buf))?;
            if n > 0 || buf.is_empty() {
                return Poll::Ready(Ok(n));
            }
        }
        self.poll_io_write(cx, buf)
    }

    fn poll_close_inner(&mut self, cx: &mut Context<'_>, shutdown: bool) -> Poll<io::Result<()>> {
        if self.header.is_some() {
            ready!(self.poll_header(cx, &[]))?;
        }
        match (&mut self.io, shutdown) {
            (Io::Yamux(s), false) => Pin::new(s).poll_flush(cx),
            (Io::Yamux(s), true) => Pin::new(s).poll_shutdown(cx),
            (Io::Local(s, _), false) => Pin::new(s).poll_flush(cx),
            (Io::Local(s, _), true) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Reads a yamux stream frame by frame (its `Stream` of packets) into `buf`, as much
/// as has arrived and fits; what does not fit waits in `rest`. Unlike its
/// `AsyncRead` behind `tokio_util::compat`, this never zeroes `buf`'s room first, so
/// a big frame's buffer is written once, by the copy.
fn poll_read_packets(
    s: &mut yamux::Stream,
    rest: &mut Option<(yamux::Packet, usize)>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    use futures::Stream;
    let start = buf.filled().len();
    while buf.remaining() > 0 {
        let (p, at) = match rest.take() {
            Some(r) => r,
            None => match Pin::new(&mut *s).poll_next(cx) {
                Poll::Ready(Some(Ok(p))) => (p, 0),
                Poll::Ready(Some(Err(e))) if buf.filled().len() == start => {
                    return Poll::Ready(Err(e))
                }
                // What was read goes first; the error (or the end) comes again.
                Poll::Ready(Some(Err(_)) | None) => break,
                Poll::Pending if buf.filled().len() > start => break,
                Poll::Pending => return Poll::Pending,
            },
        };
        let data = &p.as_ref()[at..];
        let k = data.len().min(buf.remaining());
        buf.put_slice(&data[..k]);
        if k < data.len() {
            *rest = Some((p, at + k));
        }
    }
    Poll::Ready(Ok(()))
}

/// A piece of data as a stream received it ([`MuxStream::poll_chunk`]).
pub(super) enum Chunk {
    /// A yamux frame's body, from this offset on (a read may have taken its start).
    Yamux(yamux::Packet, usize),
    Local(Vec<u8>),
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        match self {
            Chunk::Yamux(p, at) => &p.as_ref()[*at..],
            Chunk::Local(v) => v,
        }
    }
}

/// True when the `io::Error` carries a chanserv [`Error`].
fn carries_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<Error>())
}

/// Unwraps a chanserv [`Error`] carried inside an `io::Error` by [`MuxStream`].
pub(crate) fn from_io(e: io::Error) -> Error {
    if carries_error(&e) {
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
        let r = this.poll_read_inner(cx, buf);
        this.unless_dead(Half::Read, cx, r)
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.poll_write_inner(cx, buf);
        this.unless_dead(Half::Write, cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = this.poll_close_inner(cx, false);
        this.unless_dead(Half::Write, cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = this.poll_close_inner(cx, true);
        this.unless_dead(Half::Write, cx, r)
    }
}

/// Reads a stream's open header (`PROTOCOL.md`, stream open) without losing bytes when
/// it arrives in pieces, and without reading past it.
#[derive(Default)]
pub(super) struct OpenReader {
    got: Vec<u8>,
}

impl OpenReader {
    pub(super) fn poll(&mut self, s: &mut MuxStream, cx: &mut Context<'_>) -> Poll<Result<Open>> {
        loop {
            let need = match Open::decode(&self.got)? {
                Partial::Done(open, _) => return Poll::Ready(Ok(open)),
                Partial::Need(n) => n,
            };
            let mut b = [0u8; 256];
            let mut rb = ReadBuf::new(&mut b[..need]);
            ready!(Pin::new(&mut *s).poll_read(cx, &mut rb)).map_err(from_io)?;
            if rb.filled().is_empty() {
                return Poll::Ready(Err(Error::Reset));
            }
            self.got.extend_from_slice(rb.filled());
        }
    }
}

/// The least room a read of a framed stream gets when no big frame is expected: a
/// small floor keeps the memory of thousands of idle streams small.
const MIN_READ: usize = 8 * 1024;

/// The most room one read is given: what one read moves before the decoder (and the
/// credit, and the stats) see it. A yamux stream's reads zero nothing
/// ([`MuxStream`] reads its frames, not through `tokio_util::compat`, which zeroes
/// all the room it is given on every read); other readers may, and without a cap a
/// big frame's room would be zeroed again on each read.
const MAX_READ: usize = 256 * 1024;

/// Reads once from a framed stream into `buf`, after what it holds, for `codec` to
/// decode: how many bytes came, 0 at the end of the stream (for a chanserv stream
/// that has not said END or ABORT, that is a cut: [`Error::Reset`]; see
/// [`FrameCodec::check_eof`] to tell a truncated frame), or the stream's error.
///
/// When the next frame is big, room for all of it (`codec.bytes_needed`, never above
/// the codec's limit) is reserved first, so it arrives without regrowth copies;
/// otherwise at least [`MIN_READ`] bytes. Each read then goes straight into `buf`'s
/// spare capacity (`tokio_util::io::poll_read_buf`, at most [`MAX_READ`] of it): no
/// scratch buffer, no copy, and neither a [`MuxStream`] nor a tokio-native reader
/// (TCP, an in-memory pipe) zeroes it.
///
/// Once `buf` holds more than [`MIN_READ`] of a frame, only what that frame still
/// needs is reserved: asking for the floor near its end would make `BytesMut` move
/// (or reallocate and copy) the whole partial frame, up to the codec's limit, for a
/// few bytes of room.
pub(crate) fn poll_read_frames<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    cx: &mut Context<'_>,
    codec: &FrameCodec,
    buf: &mut BytesMut,
) -> Poll<Result<usize>> {
    let needed = codec.bytes_needed(buf);
    let floor = if buf.len() > MIN_READ { 1 } else { MIN_READ };
    buf.reserve(needed.max(floor));
    let mut room = buf.limit(needed.clamp(floor, MAX_READ));
    tokio_util::io::poll_read_buf(Pin::new(r), cx, &mut room).map_err(from_io)
}

/// [`poll_read_frames`] as a future.
pub(crate) async fn read_frames<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    codec: &FrameCodec,
    buf: &mut BytesMut,
) -> Result<usize> {
    poll_fn(|cx| poll_read_frames(r, cx, codec, buf)).await
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
