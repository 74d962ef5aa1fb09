//! What a client and each of its requests received: [`ClientStats`] and
//! [`RequestStats`], snapshots of counters kept by `Sources` and the source readers.
//!
//! Requests and sources are counted as they are posted, announced and end (a few
//! relaxed atomic adds each). Frames and bytes are counted in plain fields by each
//! source's reader and published once per read from its child stream and at its end,
//! never with an atomic per frame.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::tally::RecvCounters;

/// A snapshot of one request's counters ([`Sources::stats`](super::Sources::stats)).
///
/// Sources are counted when announced and when they end. Frames and bytes are
/// counted as each source's reader takes them off its child stream, and published
/// once per read from that stream (at most 256 KiB) and at the source's end: a
/// snapshot misses only the frames decoded since a source's last read. Once every
/// source has ended, the numbers are exact.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestStats {
    /// The request's id (as this client numbered it; the server's logs and
    /// [`BlockedSource::request`](crate::BlockedSource::request) use it too).
    pub request: u64,
    /// The service the request was posted to.
    pub service: String,
    /// True until the server said it announced all its sources (or the request
    /// failed).
    pub announcing: bool,
    /// Sources announced so far (inline ones included).
    pub sources_announced: u64,
    /// Sources whose end arrived: their producer finished.
    pub sources_completed: u64,
    /// Sources that failed: their producer failed, or they were cut (reset, dead
    /// link, timeout, bad frame).
    pub sources_failed: u64,
    /// Sources dropped before their end arrived: by the consumer, or with the
    /// `Sources` before they were handed out.
    pub sources_dropped: u64,
    /// Sources announced that have not ended yet.
    pub sources_open: u64,
    /// Frames received (decoded off the child streams, or inline).
    pub frames_received: u64,
    /// Frame payload bytes received (after decompression).
    pub bytes_received: u64,
    /// Time since the request was posted.
    pub elapsed: Duration,
}

/// A snapshot of a client's counters ([`Client::stats`](super::Client::stats)), summed
/// over all its requests since it was made. Counters only grow; `*_active` and
/// `*_open` are the present. Frames and bytes are as fresh as in [`RequestStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Requests in progress: still posting, still announcing, or with a source that
    /// has not ended. A request whose `Sources` and sources are dropped has ended.
    pub requests_active: u64,
    /// Requests posted so far.
    pub requests_total: u64,
    /// Requests that failed: the post failed (no such service, a dial or write
    /// error) or the `Sources` ended with an error. Failed sources do not count.
    pub requests_failed: u64,
    /// Sources announced to this client (inline ones included).
    pub sources_announced: u64,
    /// Sources whose end arrived.
    pub sources_completed: u64,
    /// Sources that failed or were cut.
    pub sources_failed: u64,
    /// Sources dropped before their end arrived.
    pub sources_dropped: u64,
    /// Sources announced that have not ended yet.
    pub sources_open: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Frame payload bytes received (after decompression).
    pub bytes_received: u64,
}

/// The live counters behind [`ClientStats`], shared by a client's requests.
#[derive(Debug, Default)]
pub(super) struct ClientCounters {
    requests_active: AtomicU64,
    requests_total: AtomicU64,
    requests_failed: AtomicU64,
    recv: Arc<RecvCounters>,
}

impl ClientCounters {
    pub(super) fn snapshot(&self) -> ClientStats {
        let r = &self.recv;
        ClientStats {
            requests_active: self.requests_active.load(Relaxed),
            requests_total: self.requests_total.load(Relaxed),
            requests_failed: self.requests_failed.load(Relaxed),
            sources_announced: r.announced.load(Relaxed),
            sources_completed: r.completed.load(Relaxed),
            sources_failed: r.failed.load(Relaxed),
            sources_dropped: r.dropped.load(Relaxed),
            sources_open: r.open(),
            frames_received: r.frames.load(Relaxed),
            bytes_received: r.bytes.load(Relaxed),
        }
    }

    /// A request is posted: its counters, counted as active until the last of its
    /// `Sources` and sources ends.
    pub(super) fn request(self: &Arc<Self>, id: u64, service: &str) -> RequestTally {
        self.requests_total.fetch_add(1, Relaxed);
        self.requests_active.fetch_add(1, Relaxed);
        RequestTally {
            id,
            service: service.to_owned(),
            posted: Instant::now(),
            recv: Arc::new(RecvCounters::child_of(self.recv.clone())),
            live: Some(Arc::new(RequestLive(self.clone()))),
        }
    }
}

/// Counts its request as active while it lives: held by the `Sources` until its end
/// and by each source until the source's end.
#[derive(Debug)]
pub(super) struct RequestLive(Arc<ClientCounters>);

impl Drop for RequestLive {
    fn drop(&mut self) {
        self.0.requests_active.fetch_sub(1, Relaxed);
    }
}

/// One request's counters, kept by its `Sources`.
#[derive(Debug)]
pub(super) struct RequestTally {
    id: u64,
    pub(super) service: String,
    posted: Instant,
    /// Its sources' counters, which add to the client's.
    pub(super) recv: Arc<RecvCounters>,
    /// `None` once the `Sources` ended (its sources may still hold the request).
    live: Option<Arc<RequestLive>>,
}

impl RequestTally {
    /// The request's part in keeping it active, for a source just announced; `None`
    /// once the request ended (never, while sources are being announced).
    pub(super) fn live(&self) -> Option<Arc<dyn Send + Sync>> {
        self.live.clone().map(|l| l as Arc<dyn Send + Sync>)
    }

    /// The `Sources` ended (`failed`: with an error): only its open sources still
    /// hold the request.
    pub(super) fn ended(&mut self, failed: bool) {
        if let Some(live) = self.live.take() {
            if failed {
                live.0.requests_failed.fetch_add(1, Relaxed);
            }
        }
    }

    pub(super) fn snapshot(&self) -> RequestStats {
        let r = &self.recv;
        RequestStats {
            request: self.id,
            service: self.service.clone(),
            announcing: self.live.is_some(),
            sources_announced: r.announced.load(Relaxed),
            sources_completed: r.completed.load(Relaxed),
            sources_failed: r.failed.load(Relaxed),
            sources_dropped: r.dropped.load(Relaxed),
            sources_open: r.open(),
            frames_received: r.frames.load(Relaxed),
            bytes_received: r.bytes.load(Relaxed),
            elapsed: self.posted.elapsed(),
        }
    }
}

impl Drop for RequestTally {
    fn drop(&mut self) {
        // Dropped before its end (the `Sources` was dropped, or the post failed or
        // was given up): the request is cancelled, not failed.
        self.ended(false);
    }
}
