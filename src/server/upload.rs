//! The read side of a master stream once its request was read (`PROTOCOL.md`,
//! "chanserv", "Uploads"): the request's upload, if any, fed to its consumer only as
//! far as the consumer has room; then a watch for the client leaving.
//!
//! It owns nothing of the write side: when the service lets go of an upload before
//! its end, it says so ([`Phase::StopWanted`]) and the announcer, the master's one
//! writer, tells the client (UPLOAD_STOP).

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::frame::{FrameCodec, Item};
use crate::mux::{from_io, poll_read_frames};
use crate::upload::Feed;

/// Bytes read ahead of an upload's consumer, beyond the frames queued for it, while it
/// takes none. Reading that much, and no more, keeps memory bounded (the master's
/// window holds the client back) while a client that leaves is still seen: what it
/// sent before it left is at most its initial window (256 KiB), read here, and then
/// the master's end.
const READ_AHEAD: usize = 256 * 1024;
/// Most bytes one read ahead of the consumer takes.
const READ_CHUNK: usize = 64 * 1024;

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
pub(super) async fn read_master<R: AsyncRead + Unpin>(
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
async fn upload<R: AsyncRead + Unpin>(
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
        // Read only what the consumer has room for, or a little ahead of it.
        let read_more = room || buf.len() < READ_AHEAD;
        tokio::select! {
            r = poll_fn(|cx| poll_read_upload(rd, cx, codec, buf, room)), if read_more => {
                let e = match r {
                    Ok(0) => Error::Reset,
                    Ok(_) => continue,
                    Err(e) => e,
                };
                // The master ended (or failed) before the upload did: the client left.
                feed.finish(Err(match e {
                    Error::LinkClosed => Error::LinkClosed,
                    _ => Error::Reset,
                }));
                return Err(e);
            }
            // Room again (the permit goes back at once: the loop above takes it).
            r = feed.tx.reserve(), if !room => {
                if r.is_err() {
                    return Ok(false);
                }
            }
            _ = feed.tx.closed() => return Ok(false),
        }
    }
}

/// Reads more of the upload: what the next frame lacks when the consumer has room
/// (every whole frame was handed over), else a chunk ahead of it. (`poll_read_frames`
/// reads only what the first frame lacks: behind a whole frame, one byte a read.)
fn poll_read_upload<R: AsyncRead + Unpin>(
    rd: &mut R,
    cx: &mut Context<'_>,
    codec: &FrameCodec,
    buf: &mut BytesMut,
    room: bool,
) -> Poll<Result<usize>> {
    if room {
        return poll_read_frames(rd, cx, codec, buf);
    }
    let n = READ_AHEAD.saturating_sub(buf.len()).clamp(1, READ_CHUNK);
    buf.reserve(n);
    tokio_util::io::poll_read_buf(Pin::new(rd), cx, &mut (&mut *buf).limit(n)).map_err(from_io)
}

/// Credit's markers (SYNC, BLOCKED) belong to child streams: on the master they break
/// the protocol.
fn marker() -> Error {
    Error::Protocol("upload: a credit marker on the master".into())
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
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
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
        let (feed, up) = Upload::channel();
        let (tx, phase) = watch::channel(Phase::Running);
        let buf = BytesMut::from(buf);
        let task = tokio::spawn(read_master(server, buf, FrameCodec::new(), Some(feed), tx));
        Reading { up, phase, task }
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

    /// A reader that counts the bytes it hands out, and its reads.
    struct Counted<R>(R, Arc<AtomicUsize>, Arc<AtomicUsize>);

    impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.0).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            self.1.fetch_add(n, Ordering::Relaxed);
            self.2.fetch_add(1, Ordering::Relaxed);
            r
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_that_takes_nothing_holds_the_reading_back() {
        bounded(async {
            let (mut client, server) = tokio::io::duplex(4 << 20);
            let (read, reads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let frame = vec![7u8; 1024];
            let many: Vec<&[u8]> = vec![&frame; 2048]; // 2 MiB
            client.write_all(&frames(&many, None)).await.unwrap();
            let mut r = reading(Counted(server, read.clone(), reads.clone()), &[]);
            // Let the reader run until it waits for the consumer, and then some.
            while r.up.queued() < UPLOAD_AHEAD {
                tokio::task::yield_now().await;
            }
            for _ in 0..64 {
                tokio::task::yield_now().await;
            }
            // It took the frames queued for the consumer, its read-ahead and one read more,
            // in chunks.
            let bound = UPLOAD_AHEAD * 1028 + READ_AHEAD + 256 * 1024;
            let took = read.load(Ordering::Relaxed);
            assert!(took <= bound, "read {took} bytes ahead, bound {bound}");
            assert!(reads.load(Ordering::Relaxed) < 64, "not byte by byte");
            let mut n = 0;
            while let Some(f) = r.up.next().await {
                assert_eq!(f.unwrap().len(), 1024);
                n += 1;
            }
            assert_eq!(n, 2048, "and the rest once the consumer reads");
        })
        .await;
    }
}
