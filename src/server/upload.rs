//! The read side of a master stream once its request was read (`PROTOCOL.md`,
//! "chanserv", "Uploads"): the request's upload, if any, fed to its consumer only as
//! far as the consumer has room (beyond, the master's window holds the client back,
//! and the stream is only watched for the client leaving); then a watch for the client
//! leaving.
//!
//! It owns nothing of the write side: when the service lets go of an upload before
//! its end, it says so ([`Phase::StopWanted`]) and the announcer, the master's one
//! writer, tells the client (UPLOAD_STOP).

use std::future::poll_fn;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::frame::{FrameCodec, Item};
use crate::mux::{from_io, poll_read_frames};
use crate::upload::Feed;

/// The master's read side as the upload's reader needs it.
pub(super) trait MasterRead: AsyncRead + Unpin {
    /// Ready once the client is gone (it reset the master, or the link died), without
    /// reading: what it sent before may wait unread behind its reset. See
    /// [`Multiplexer::poll_peer_gone`](crate::Multiplexer::poll_peer_gone).
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<Error>;
}

/// Where a request's upload is, as the announcer needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// The service reads it (or has yet to take it).
    Running,
    /// The service let go of it before its end: the client must be told, and what it
    /// sends until its END or ABORT is discarded.
    StopWanted,
    /// The client's END or ABORT was read (or the request had no upload): the master
    /// carries nothing more from the client.
    Ended,
}

/// Reads the master after the request: the upload (when `feed` is given), then waits
/// for the client to leave. Returns only then, with why: the request is cancelled.
pub(super) async fn read_master<R: MasterRead>(
    mut rd: R,
    mut buf: BytesMut,
    codec: FrameCodec,
    feed: Option<Feed>,
    phase: watch::Sender<Phase>,
) -> Error {
    if let Some(feed) = feed {
        match upload(&mut rd, &mut buf, &codec, feed).await {
            Ok(true) => {}
            Ok(false) => {
                phase.send_replace(Phase::StopWanted);
                if let Err(e) = discard(&mut rd, &mut buf, &codec).await {
                    return e;
                }
            }
            Err(e) => return e,
        }
        phase.send_replace(Phase::Ended);
    }
    gone(&mut rd, &buf).await
}

/// Feeds the upload's frames to its consumer. `Ok(true)` at the upload's END or ABORT,
/// `Ok(false)` when the consumer dropped the upload first, `Err` when the client left
/// or broke the protocol; the consumer is told every end but its own.
async fn upload<R: MasterRead>(
    rd: &mut R,
    buf: &mut BytesMut,
    codec: &FrameCodec,
    feed: Feed,
) -> Result<bool> {
    loop {
        // Hand over what was read, while the consumer has room.
        let room = loop {
            let permit = match feed.tx.try_reserve() {
                Ok(p) => p,
                Err(TrySendError::Full(())) => break false,
                Err(TrySendError::Closed(())) => return Ok(false),
            };
            match codec.decode_item(buf) {
                Ok(Some(Item::Frame(f))) => permit.send(f),
                Ok(Some(Item::End)) => {
                    feed.finish(Ok(()));
                    return Ok(true);
                }
                Ok(Some(Item::Abort(reason))) => {
                    feed.finish(Err(Error::SourceFailed(reason)));
                    return Ok(true);
                }
                Ok(None) => break true,
                Ok(Some(Item::Sync | Item::Blocked)) => {
                    feed.finish(Err(marker()));
                    return Err(marker());
                }
                Err(e) => {
                    feed.finish(Err(Error::Protocol(format!("upload: {e}"))));
                    return Err(e);
                }
            }
        };
        // Read only what the consumer has room for; while it has none, only watch for
        // the client leaving (its reset waits behind what it sent, unread).
        let e = tokio::select! {
            r = poll_fn(|cx| poll_more(rd, cx, codec, buf, room)) => match r {
                Ok(()) => continue,
                Err(e) => e,
            },
            // Room again (the permit goes back at once: the loop above takes it).
            r = feed.tx.reserve(), if !room => match r {
                Ok(_) => continue,
                Err(_) => return Ok(false),
            },
            _ = feed.tx.closed() => return Ok(false),
        };
        // The master ended (or failed) before the upload did: the client left.
        feed.finish(Err(match e {
            Error::LinkClosed => Error::LinkClosed,
            _ => Error::Reset,
        }));
        return Err(e);
    }
}

/// Credit's markers (SYNC, BLOCKED) belong to child streams: on the master they break
/// the protocol.
fn marker() -> Error {
    Error::Protocol("upload: a credit marker on the master".into())
}

/// Reads more of the upload when its consumer has room, else only watches for the
/// client leaving. `Err` once the master ended or failed.
fn poll_more<R: MasterRead>(
    rd: &mut R,
    cx: &mut Context<'_>,
    codec: &FrameCodec,
    buf: &mut BytesMut,
    room: bool,
) -> Poll<Result<()>> {
    if !room {
        return rd.poll_gone(cx).map(Err);
    }
    match ready!(poll_read_frames(rd, cx, codec, buf)) {
        Ok(0) => Poll::Ready(Err(Error::Reset)),
        Ok(_) => Poll::Ready(Ok(())),
        Err(e) => Poll::Ready(Err(e)),
    }
}

/// Drops what the client still sends of an upload the service let go of, up to its
/// END or ABORT.
async fn discard<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    codec: &FrameCodec,
) -> Result<()> {
    loop {
        match codec.decode_item(buf)? {
            Some(Item::Frame(_)) => {}
            Some(Item::End | Item::Abort(_)) => return Ok(()),
            Some(Item::Sync | Item::Blocked) => return Err(marker()),
            None => {
                if poll_fn(|cx| poll_read_frames(rd, cx, codec, buf)).await? == 0 {
                    return Err(Error::Reset);
                }
            }
        }
    }
}

/// Resolves when the client is gone. After its request (and its upload's end) it
/// never writes nor closes its half, so a read that returns says so.
async fn gone<R: AsyncRead + Unpin>(rd: &mut R, buf: &BytesMut) -> Error {
    let wrote = || Error::Protocol("the client wrote after its request".into());
    if !buf.is_empty() {
        return wrote();
    }
    let mut probe = [0u8; 1];
    match rd.read(&mut probe).await {
        Ok(0) => Error::Reset,
        Ok(_) => wrote(),
        Err(e) => from_io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upload::{Upload, UPLOAD_AHEAD};
    use futures::task::AtomicWaker;
    use futures::StreamExt;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncWriteExt, DuplexStream, ReadBuf};
    use tokio::task::JoinHandle;

    fn frames(payloads: &[&[u8]], end: Option<&str>) -> Vec<u8> {
        let mut b = BytesMut::new();
        for p in payloads {
            FrameCodec::new().encode(p, &mut b).unwrap();
        }
        match end {
            None => FrameCodec::encode_end(&mut b),
            Some(r) => FrameCodec::encode_abort(r, &mut b),
        }
        b.to_vec()
    }

    /// A master's read side being read for an upload: the consumer's end, the phases
    /// the announcer would see, and the reader's task (its result: why it stopped).
    struct Reading {
        up: Upload,
        phase: watch::Receiver<Phase>,
        task: JoinHandle<Error>,
    }

    /// Reads `server` (after `buf`, what the request's read left) for an upload.
    fn reading<R: AsyncRead + Unpin + Send + 'static>(server: R, buf: &[u8]) -> Reading {
        reading_probed(Probed::new(server), buf)
    }

    fn reading_probed<R>(server: Probed<R>, buf: &[u8]) -> Reading
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (feed, up) = Upload::channel();
        let (tx, phase) = watch::channel(Phase::Running);
        let buf = BytesMut::from(buf);
        let task = tokio::spawn(read_master(server, buf, FrameCodec::new(), Some(feed), tx));
        Reading { up, phase, task }
    }

    /// What a test master shares with the test: the client's leaving (as a
    /// multiplexer's probe would see it), the bytes read and the reads.
    #[derive(Default)]
    struct Shared {
        gone: AtomicBool,
        waker: AtomicWaker,
        read: AtomicUsize,
        reads: AtomicUsize,
    }

    impl Shared {
        fn leave(&self) {
            self.gone.store(true, Ordering::SeqCst);
            self.waker.wake();
        }
    }

    /// A master's read side over `R`, probed through `Shared`.
    struct Probed<R>(R, Arc<Shared>);

    impl<R> Probed<R> {
        fn new(r: R) -> Self {
            Probed(r, Arc::default())
        }
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Probed<R> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.0).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            self.1.read.fetch_add(n, Ordering::Relaxed);
            self.1.reads.fetch_add(1, Ordering::Relaxed);
            r
        }
    }

    impl<R: AsyncRead + Unpin> MasterRead for Probed<R> {
        fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<Error> {
            self.1.waker.register(cx.waker());
            match self.1.gone.load(Ordering::SeqCst) {
                true => Poll::Ready(Error::Reset),
                false => Poll::Pending,
            }
        }
    }

    fn pipe() -> (DuplexStream, DuplexStream) {
        tokio::io::duplex(1 << 16)
    }

    /// Runs a test on the paused clock, failing it if it waits 10 s (virtual) at once.
    async fn bounded(test: impl std::future::Future<Output = ()>) {
        let limit = std::time::Duration::from_secs(10);
        tokio::time::timeout(limit, test).await.expect("hung");
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_then_a_watch_for_the_client() {
        bounded(async {
            let (mut client, server) = pipe();
            // The request's read left the first bytes of the upload in its buffer.
            let wire = frames(&[b"ab", b"cd"], None);
            let mut r = reading(server, &wire[..3]);
            client.write_all(&wire[3..]).await.unwrap();
            assert_eq!(r.up.next().await.unwrap().unwrap(), "ab");
            assert_eq!(r.up.next().await.unwrap().unwrap(), "cd");
            assert!(r.up.next().await.is_none(), "END completes the upload");
            r.phase.wait_for(|p| *p == Phase::Ended).await.unwrap();
            assert!(!r.task.is_finished());
            drop(client);
            assert!(matches!(r.task.await.unwrap(), Error::Reset));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn abort_fails_the_upload_and_a_cut_master_too() {
        bounded(async {
            let (mut client, server) = pipe();
            let mut r = reading(server, &[]);
            let wire = frames(&[b"x"], Some("disk on fire"));
            client.write_all(&wire).await.unwrap();
            assert_eq!(r.up.next().await.unwrap().unwrap(), "x");
            let e = r.up.next().await.unwrap().unwrap_err();
            assert!(
                matches!(&e, Error::SourceFailed(m) if m == "disk on fire"),
                "{e}"
            );

            let (mut client, server) = pipe();
            let mut r = reading(server, &[]);
            client.write_all(&frames(&[b"x"], None)[..5]).await.unwrap();
            assert_eq!(r.up.next().await.unwrap().unwrap(), "x");
            drop(client);
            assert!(matches!(r.up.next().await, Some(Err(Error::Reset))));
            assert!(r.up.next().await.is_none());
            assert!(r.task.await.unwrap().is_closed());
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_upload_is_discarded_to_its_end() {
        bounded(async {
            let (mut client, server) = pipe();
            let Reading {
                up,
                mut phase,
                task,
            } = reading(server, &[]);
            drop(up);
            phase.wait_for(|p| *p == Phase::StopWanted).await.unwrap();
            let wire = frames(&[b"late", b"later"], None);
            client.write_all(&wire).await.unwrap();
            phase.wait_for(|p| *p == Phase::Ended).await.unwrap();
            client.write_all(b"!").await.unwrap();
            let e = task.await.unwrap();
            assert!(e.is_protocol(), "nothing may follow the upload: {e}");
        })
        .await;
    }

    /// 2 MiB of 1 KiB frames, then END.
    fn two_mib() -> Vec<u8> {
        let frame = vec![7u8; 1024];
        frames(&vec![&frame[..]; 2048], None)
    }

    /// A reader of 2 MiB of upload, run until it waits for its consumer, and then some;
    /// and the client's end, kept open.
    async fn full_reader() -> (Reading, Arc<Shared>, DuplexStream) {
        let (mut client, server) = tokio::io::duplex(4 << 20);
        client.write_all(&two_mib()).await.unwrap();
        let server = Probed::new(server);
        let shared = server.1.clone();
        let r = reading_probed(server, &[]);
        while r.up.queued() < UPLOAD_AHEAD {
            tokio::task::yield_now().await;
        }
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        (r, shared, client)
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_that_takes_nothing_holds_the_reading_back() {
        bounded(async {
            let (mut r, shared, _client) = full_reader().await;
            // It took the frames queued for the consumer and at most one read more (a
            // read gets at most 256 KiB of room), in chunks.
            let bound = UPLOAD_AHEAD * 1028 + 256 * 1024;
            let took = shared.read.load(Ordering::Relaxed);
            assert!(took <= bound, "read {took} bytes ahead, bound {bound}");
            assert!(
                shared.reads.load(Ordering::Relaxed) < 64,
                "not byte by byte"
            );
            let mut n = 0;
            while let Some(f) = r.up.next().await {
                assert_eq!(f.unwrap().len(), 1024);
                n += 1;
            }
            assert_eq!(n, 2048, "and the rest once the consumer reads");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_is_seen_while_the_consumer_takes_nothing() {
        bounded(async {
            let (mut r, shared, _client) = full_reader().await;
            // Megabytes wait unread behind the client's reset: the probe sees it.
            shared.leave();
            let e = r.task.await.unwrap();
            assert!(matches!(e, Error::Reset), "{e}");
            let mut n = 0;
            let end = loop {
                match r.up.next().await {
                    Some(Ok(_)) => n += 1,
                    Some(Err(e)) => break e,
                    None => panic!("a client that left is no completion"),
                }
            };
            assert_eq!(n, UPLOAD_AHEAD, "what was queued, then the failure");
            assert!(matches!(end, Error::Reset), "{end}");
        })
        .await;
    }
}
