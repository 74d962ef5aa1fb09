//! Receive counters, below both the reader that adds to them (`source::remote`, the
//! reader of a child stream) and the stats that read them (`client::stats`), so
//! neither imports the other.
//!
//! The hot path pays no atomic per frame: a reader counts its frames in plain fields
//! ([`Tally`]) and publishes them once per read from its child stream and at its end.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Counters of received sources and frames: a request's, whose `parent` is its
/// client's, so one call counts at both levels.
#[derive(Debug, Default)]
pub(crate) struct RecvCounters {
    pub(crate) announced: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) frames: AtomicU64,
    pub(crate) bytes: AtomicU64,
    parent: Option<Arc<RecvCounters>>,
}

/// How a received source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceEnd {
    /// Its END arrived.
    Completed,
    /// Its ABORT arrived, or it was cut (reset, dead link, timeout, bad frame).
    Failed,
    /// Its consumer dropped it before its end arrived.
    Dropped,
}

impl RecvCounters {
    /// Counters that also add to `parent`'s.
    pub(crate) fn child_of(parent: Arc<RecvCounters>) -> Self {
        RecvCounters {
            parent: Some(parent),
            ..Default::default()
        }
    }

    fn each(&self, f: impl Fn(&RecvCounters)) {
        f(self);
        if let Some(p) = &self.parent {
            p.each(f);
        }
    }

    /// A source was announced.
    pub(crate) fn announced(&self) {
        self.each(|c| {
            c.announced.fetch_add(1, Relaxed);
        });
    }

    /// A source announced with its frames inline: complete at once.
    pub(crate) fn inline(&self, frames: u64, bytes: u64) {
        self.announced();
        self.received(frames, bytes);
        self.ended(SourceEnd::Completed);
    }

    pub(crate) fn received(&self, frames: u64, bytes: u64) {
        if frames > 0 {
            self.each(|c| {
                c.frames.fetch_add(frames, Relaxed);
                c.bytes.fetch_add(bytes, Relaxed);
            });
        }
    }

    pub(crate) fn ended(&self, end: SourceEnd) {
        self.each(|c| {
            let n = match end {
                SourceEnd::Completed => &c.completed,
                SourceEnd::Failed => &c.failed,
                SourceEnd::Dropped => &c.dropped,
            };
            n.fetch_add(1, Relaxed);
        });
    }

    /// Sources announced and not ended yet.
    pub(crate) fn open(&self) -> u64 {
        let ended =
            self.completed.load(Relaxed) + self.failed.load(Relaxed) + self.dropped.load(Relaxed);
        // Loads of distinct atomics may see an end before its announcement.
        self.announced.load(Relaxed).saturating_sub(ended)
    }
}

/// One remote source's counts not yet published to its [`RecvCounters`], and how it
/// ended. Dropped before an end was counted, it counts the source as dropped.
pub(crate) struct Tally {
    counters: Arc<RecvCounters>,
    frames: u64,
    bytes: u64,
    ended: bool,
    /// Keeps the source's request counted as active until the source ends.
    live: Option<Arc<dyn Send + Sync>>,
}

impl Tally {
    /// The tally of a source just announced (counted as such by the caller).
    pub(crate) fn new(counters: Arc<RecvCounters>, live: Option<Arc<dyn Send + Sync>>) -> Self {
        Tally {
            counters,
            frames: 0,
            bytes: 0,
            ended: false,
            live,
        }
    }

    /// A frame was decoded: plain adds, published by [`flush`](Self::flush).
    #[inline]
    pub(crate) fn frame(&mut self, len: usize) {
        self.frames += 1;
        self.bytes += len as u64;
    }

    /// Publishes the frames counted since the last flush.
    pub(crate) fn flush(&mut self) {
        if self.frames > 0 {
            self.counters.received(self.frames, self.bytes);
            (self.frames, self.bytes) = (0, 0);
        }
    }

    /// The source ended: publishes its counts and its end, once (later calls do
    /// nothing), and lets its request go.
    pub(crate) fn end(&mut self, end: SourceEnd) {
        if !self.ended {
            self.ended = true;
            self.flush();
            self.counters.ended(end);
            self.live = None;
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.end(SourceEnd::Dropped);
    }
}
