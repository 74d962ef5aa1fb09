//! What a service has done and what holds it now: counters kept by its requests and
//! pumps, and the sources waiting on a slow consumer (slow-consumer attribution).
//!
//! The hot path pays one relaxed atomic add per write batch (frames and bytes are
//! counted per batch, not per frame); a clock is read only when a write has to wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::mux::Addr;

/// A snapshot of a service's counters ([`ServeHandle::stats`](super::ServeHandle::stats)).
/// Counters only grow; `*_active` and `blocked` are the present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceStats {
    /// Requests being served now (reading, sourcing, announcing or pumping).
    pub requests_active: u64,
    /// Requests accepted so far.
    pub requests_total: u64,
    /// Requests that ended with an error (any: the service's own faults, clients that
    /// left, malformed requests).
    pub requests_failed: u64,
    /// Sources whose frames are being sent now.
    pub sources_active: u64,
    /// Sources announced so far (inline ones included).
    pub sources_total: u64,
    /// Sources that completed (END sent).
    pub sources_completed: u64,
    /// Sources their producer failed (ABORT sent: an error item, a panic, a frame
    /// over the limit).
    pub sources_failed: u64,
    /// Sources cut before their end: the client dropped them or left, the link was
    /// lost, or a frame write timed out.
    pub sources_cut: u64,
    /// Frames written to clients.
    pub frames_sent: u64,
    /// Frame payload bytes written to clients (before compression).
    pub bytes_sent: u64,
    /// Total time sources spent waiting for a consumer to make room (backpressure).
    pub backpressure_wait: Duration,
    /// The sources waiting on backpressure now, longest wait first: which consumer
    /// holds the service back.
    pub blocked: Vec<BlockedSource>,
}

/// A source whose frames wait for its consumer to read ([`ServiceStats::blocked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockedSource {
    /// The request's id (as the client numbered it).
    pub request: u64,
    /// The source's id within the request.
    pub source: u32,
    /// The client's reply address (its node is [`Addr::node`]).
    pub client: Addr,
    /// How long it has been waiting.
    pub waiting: Duration,
}

/// The live counters behind [`ServiceStats`], shared by a service's tasks.
#[derive(Default)]
pub(super) struct Counters {
    requests_active: AtomicU64,
    requests_total: AtomicU64,
    requests_failed: AtomicU64,
    sources_active: AtomicU64,
    sources_total: AtomicU64,
    sources_completed: AtomicU64,
    sources_failed: AtomicU64,
    sources_cut: AtomicU64,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    backpressure_nanos: AtomicU64,
    blocked: Mutex<HashMap<(u64, u32), (Addr, Instant)>>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

/// How a source ended, for the counters.
pub(super) enum SourceEnd {
    Completed,
    Failed,
    Cut,
}

impl Counters {
    pub(super) fn snapshot(&self) -> ServiceStats {
        let now = Instant::now();
        let mut blocked: Vec<_> = self
            .blocked
            .lock()
            .unwrap()
            .iter()
            .map(|(&(request, source), (client, since))| BlockedSource {
                request,
                source,
                client: client.clone(),
                waiting: now.saturating_duration_since(*since),
            })
            .collect();
        blocked.sort_by_key(|b| std::cmp::Reverse(b.waiting));
        ServiceStats {
            requests_active: self.requests_active.load(Relaxed),
            requests_total: self.requests_total.load(Relaxed),
            requests_failed: self.requests_failed.load(Relaxed),
            sources_active: self.sources_active.load(Relaxed),
            sources_total: self.sources_total.load(Relaxed),
            sources_completed: self.sources_completed.load(Relaxed),
            sources_failed: self.sources_failed.load(Relaxed),
            sources_cut: self.sources_cut.load(Relaxed),
            frames_sent: self.frames_sent.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            backpressure_wait: Duration::from_nanos(self.backpressure_nanos.load(Relaxed)),
            blocked,
        }
    }

    /// A request starts; the guard counts its end.
    pub(super) fn request(&self) -> Active<'_> {
        self.requests_total.fetch_add(1, Relaxed);
        self.requests_active.fetch_add(1, Relaxed);
        Active(&self.requests_active)
    }

    pub(super) fn request_failed(&self) {
        self.requests_failed.fetch_add(1, Relaxed);
    }

    /// A source with a child stream starts; the guard counts its end.
    pub(super) fn source(&self) -> Active<'_> {
        self.sources_total.fetch_add(1, Relaxed);
        self.sources_active.fetch_add(1, Relaxed);
        Active(&self.sources_active)
    }

    /// A source sent inline with its announcement: complete at once.
    pub(super) fn inline_source(&self, frames: u64, bytes: u64) {
        self.sources_total.fetch_add(1, Relaxed);
        self.sent(frames, bytes);
        self.source_ended(SourceEnd::Completed);
    }

    pub(super) fn source_ended(&self, end: SourceEnd) {
        let c = match end {
            SourceEnd::Completed => &self.sources_completed,
            SourceEnd::Failed => &self.sources_failed,
            SourceEnd::Cut => &self.sources_cut,
        };
        c.fetch_add(1, Relaxed);
    }

    pub(super) fn sent(&self, frames: u64, bytes: u64) {
        if frames > 0 {
            self.frames_sent.fetch_add(frames, Relaxed);
            self.bytes_sent.fetch_add(bytes, Relaxed);
        }
    }

    /// A source starts waiting on its consumer; the guard ends the wait.
    pub(super) fn blocked(&self, key: (u64, u32), client: &Addr) -> Blocked<'_> {
        let since = Instant::now();
        self.blocked
            .lock()
            .unwrap()
            .insert(key, (client.clone(), since));
        Blocked {
            counters: self,
            key,
            since,
        }
    }
}

/// Counts one request or source as active while it lives.
pub(super) struct Active<'a>(&'a AtomicU64);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A source waiting on its consumer, listed in [`ServiceStats::blocked`] while it lives.
pub(super) struct Blocked<'a> {
    counters: &'a Counters,
    key: (u64, u32),
    since: Instant,
}

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        self.counters.blocked.lock().unwrap().remove(&self.key);
        let waited = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.counters.backpressure_nanos.fetch_add(waited, Relaxed);
    }
}
