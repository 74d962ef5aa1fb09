//! The client's side of an upload (`PROTOCOL.md`, "chanserv", "Uploads"): one task per
//! request writes the user's upload stream on the master after the request, batched,
//! as fast as the master's window lets it, then END (or ABORT with the stream's error).
//!
//! The task owns the master's write half and nothing else: `Sources` reads the master
//! (and tells the task when the server stops the upload), so the server's answers are
//! read while the upload is still being written, and neither side waits on the other.

use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{Stream, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{Error, Result, Timeout};
use crate::frame::FrameCodec;
use crate::mux::from_io;

/// Writes are batched up to this many bytes (big frames go out from their own
/// `Bytes`, not copied), as the server's child streams are.
const WRITE_BATCH: usize = 8 * 1024;

/// A user's upload stream, its errors already the crate's.
pub(super) type BoxUpload = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// What a request's `Sources` holds of its upload task.
pub(super) struct UploadHandle {
    /// Cancelled when the server stopped the upload (UPLOAD_STOP) or the request
    /// ended: the task says END and lets go of the user's stream.
    stop: CancellationToken,
    /// Dropped with the `Sources`: the task ends at once, its END unsaid (the master
    /// is reset anyway), and drops the user's stream.
    _cancel: DropGuard,
}

impl UploadHandle {
    /// Ends the upload early: what was written so far, then END.
    pub(super) fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts the task that writes `upload` on `w`, the master's write half.
pub(super) fn spawn<W: AsyncWrite + Send + Unpin + 'static>(
    w: W,
    upload: BoxUpload,
    codec: FrameCodec,
    timeout: Option<Duration>,
) -> UploadHandle {
    let (stop, cancel) = (CancellationToken::new(), CancellationToken::new());
    let out = Out {
        w,
        wbuf: BytesMut::with_capacity(WRITE_BATCH + 1024),
        timeout,
    };
    let send = send(out, upload, codec, stop.clone());
    let cancelled = cancel.clone();
    let task = async move {
        tokio::select! {
            biased;
            _ = cancelled.cancelled() => {}
            r = send => if let Err(e) = r {
                // The master failed: `Sources` sees it too and reports it.
                tracing::debug!("upload not sent: {e}");
            },
        }
    };
    tokio::spawn(tracing::Instrument::in_current_span(task));
    UploadHandle {
        stop,
        _cancel: cancel.drop_guard(),
    }
}

/// Writes the upload's frames until it ends, fails or is stopped, then its END or
/// ABORT. `Err` when the master failed.
async fn send<W: AsyncWrite + Unpin>(
    mut out: Out<W>,
    mut upload: BoxUpload,
    codec: FrameCodec,
    stop: CancellationToken,
) -> Result<()> {
    let end = loop {
        if stop.is_cancelled() {
            break Ok(());
        }
        let item = match upload.next().now_or_never() {
            Some(item) => item,
            None => {
                // Nothing more is ready: what was staged goes out, then we wait.
                out.write(None).await?;
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break Ok(()),
                    item = upload.next() => item,
                }
            }
        };
        match item {
            Some(Ok(f)) => match codec.encode_split(f, &mut out.wbuf) {
                Ok(big) if big.is_some() || out.wbuf.len() >= WRITE_BATCH => {
                    out.write(big).await?;
                    // A stream that is always ready must not hold the worker.
                    tokio::task::consume_budget().await;
                }
                Ok(_) => {}
                // A frame over the limit fails the upload, and says why.
                Err(e) => break Err(e),
            },
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    // The upload is over for its producer: a channel's sender sees it at once.
    drop(upload);
    match end {
        Ok(()) => FrameCodec::encode_end(&mut out.wbuf),
        Err(Error::SourceFailed(reason)) => FrameCodec::encode_abort(&reason, &mut out.wbuf),
        Err(e) => FrameCodec::encode_abort(&e.to_string(), &mut out.wbuf),
    }
    out.write(None).await
}

/// The master's write half and the batch staged for it.
struct Out<W> {
    w: W,
    wbuf: BytesMut,
    timeout: Option<Duration>,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    /// Writes the batch, then `big` (a payload that was not copied into it).
    async fn write(&mut self, big: Option<Bytes>) -> Result<()> {
        if self.wbuf.is_empty() && big.is_none() {
            return Ok(());
        }
        let (w, wbuf) = (&mut self.w, &self.wbuf);
        let write = async {
            w.write_all(wbuf).await?;
            if let Some(b) = big {
                w.write_all(&b).await?;
            }
            w.flush().await
        };
        match self.timeout {
            None => write.await.map_err(from_io)?,
            Some(t) => tokio::time::timeout(t, write)
                .await
                .map_err(|_| Error::Timeout(Timeout::MasterWrite))?
                .map_err(from_io)?,
        }
        self.wbuf.clear();
        Ok(())
    }
}
