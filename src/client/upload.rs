//! The client's side of an upload (`PROTOCOL.md`, "chanserv", "Uploads"): one task per
//! request with an upload drives its master stream. It writes the user's upload stream
//! after the request, batched, as fast as the master's window lets it, then END (or
//! ABORT with the stream's error); all along it reads the server's messages and relays
//! them to the request's `Sources`.
//!
//! So the task sees UPLOAD_STOP (and the request's end) whether or not the user polls
//! `Sources`: a user who reads a source and leaves `Sources` alone still has the upload
//! stopped at once when the service lets go of it. Both directions are polled by this
//! one task (`tokio::io::split`), so a wake-up that a stream keeps for either half
//! reaches it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::poll_fn;
use futures::stream::{Stream, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::sources::{MasterIo, MAX_FINISHED};
use crate::error::{Error, Result, Timeout};
use crate::frame::FrameCodec;
use crate::mux::{from_io, poll_read_frames};
use crate::proto::chanserv::MasterMsg;

/// Writes are batched up to this many bytes (big frames go out from their own
/// `Bytes`, not copied), as the server's child streams are.
const WRITE_BATCH: usize = 8 * 1024;

/// Server messages relayed ahead of `Sources`, at most. Beyond, the task stops reading
/// the master (the server's writes wait), and an UPLOAD_STOP behind them waits too.
const RELAY_AHEAD: usize = 16;

/// A user's upload stream, its errors already the crate's.
pub(super) type BoxUpload = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// The server's messages as the task relays them to `Sources`; an `Err` is the last.
pub(super) type Relayed = mpsc::Receiver<Result<MasterMsg>>;

/// Finished masters, closed with the client's next request (see `Sources`).
pub(super) type Finished = Arc<Mutex<Vec<Box<dyn MasterIo>>>>;

/// What a request's `Sources` holds of its upload task.
pub(super) struct UploadHandle {
    /// Cancelled when the request ended: the task says END (if it has not yet) and
    /// lets go of the user's stream.
    stop: CancellationToken,
    /// Dropped with the `Sources`: the task ends at once, its END unsaid, and drops
    /// the user's stream and the master (which resets it).
    _cancel: DropGuard,
}

impl UploadHandle {
    /// Ends the upload early: what was written so far, then END.
    pub(super) fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts the task that drives `master` for a request with an upload; `Sources` reads
/// the server's messages from the receiver it returns.
pub(super) fn spawn(
    master: Box<dyn MasterIo>,
    upload: BoxUpload,
    codec: FrameCodec,
    timeout: Option<Duration>,
    finished: Finished,
) -> (UploadHandle, Relayed) {
    let (stop, cancel) = (CancellationToken::new(), CancellationToken::new());
    let (tx, rx) = mpsc::channel(RELAY_AHEAD);
    let task = Task {
        codec,
        timeout,
        stop: stop.clone(),
        tx,
        finished,
    };
    let cancelled = cancel.clone();
    let run = async move {
        tokio::select! {
            biased;
            _ = cancelled.cancelled() => {}
            () = task.run(master, upload) => {}
        }
    };
    tokio::spawn(tracing::Instrument::in_current_span(run));
    let handle = UploadHandle {
        stop,
        _cancel: cancel.drop_guard(),
    };
    (handle, rx)
}

/// How the relay of the server's messages ended.
enum Relay {
    /// END was relayed: the master is clean, and may wait to be closed.
    End,
    /// ERROR or a broken master was relayed, or `Sources` is gone.
    Over,
}

struct Task {
    codec: FrameCodec,
    timeout: Option<Duration>,
    /// Stops the upload: the service let go of it (UPLOAD_STOP), or the request ended.
    stop: CancellationToken,
    tx: mpsc::Sender<Result<MasterMsg>>,
    finished: Finished,
}

impl Task {
    /// Sends the upload and relays the server's messages, both at once, until the
    /// server's last message (or an error, relayed too).
    async fn run(self, master: Box<dyn MasterIo>, upload: BoxUpload) {
        let (mut rd, w) = tokio::io::split(master);
        let mut out = Out {
            w,
            wbuf: BytesMut::with_capacity(WRITE_BATCH + 1024),
            timeout: self.timeout,
        };
        let mut sent = false;
        let relay = {
            let sending = send(&mut out, upload, self.codec, &self.stop);
            let relaying = self.relay(&mut rd);
            tokio::pin!(sending, relaying);
            loop {
                tokio::select! {
                    r = &mut sending, if !sent => match r {
                        Ok(()) => sent = true,
                        Err(e) => {
                            // The master failed under the upload: the request with it.
                            // Err: `Sources` is gone, and nobody needs to know.
                            let _ = self.tx.send(Err(e)).await;
                            return;
                        }
                    },
                    end = &mut relaying => break end,
                }
            }
        };
        // After END, the master waits to be closed with the client's next request, as
        // every master does; otherwise dropping it resets it.
        if let (true, Relay::End) = (sent, relay) {
            let mut f = self.finished.lock().unwrap();
            if f.len() < MAX_FINISHED {
                f.push(Box::new(rd.unsplit(out.w)));
            }
        }
    }

    /// Relays the server's messages to `Sources` until END or ERROR; UPLOAD_STOP stops
    /// the upload here. A broken master is relayed as an error.
    async fn relay<R: AsyncRead + Unpin>(&self, rd: &mut R) -> Relay {
        let mut buf = BytesMut::new();
        let failed = loop {
            let msg = match self.codec.decode(&mut buf) {
                Ok(Some(f)) => MasterMsg::decode(f),
                Ok(None) => {
                    match poll_fn(|cx| poll_read_frames(rd, cx, &self.codec, &mut buf)).await {
                        Ok(0) => break Error::Reset,
                        Ok(_) => continue,
                        Err(e) => break e,
                    }
                }
                Err(e) => Err(e),
            };
            let msg = match msg {
                Ok(MasterMsg::UploadStop) => {
                    self.stop.cancel();
                    continue;
                }
                Ok(m) => m,
                Err(e) => break e,
            };
            let last = match msg {
                MasterMsg::End => Some(Relay::End),
                MasterMsg::Error(_) => Some(Relay::Over),
                _ => None,
            };
            if self.tx.send(Ok(msg)).await.is_err() {
                return Relay::Over;
            }
            if let Some(end) = last {
                // The request is over: so is its upload (after END it was already).
                self.stop.cancel();
                return end;
            }
        };
        self.stop.cancel();
        // Err: `Sources` is gone, and nobody needs to know.
        let _ = self.tx.send(Err(failed)).await;
        Relay::Over
    }
}

/// Writes the upload's frames until it ends, fails or is stopped, then its END or
/// ABORT. `Err` when the master failed.
async fn send<W: AsyncWrite + Unpin>(
    out: &mut Out<W>,
    mut upload: BoxUpload,
    codec: FrameCodec,
    stop: &CancellationToken,
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
                    // Not cut short when stopped: a frame is never left half written.
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
