//! [`ClientConfig`]: Go's `ClientOption`s, their defaults and invariants. No behaviour.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorFn};
use crate::frame::{FrameCodec, FRAME_SIZE_LIMIT};
use crate::source::ReceiveBudget;

/// [`Client`](super::Client) settings, Go's `ClientOption`s with the same defaults:
///
/// | setting | default |
/// |---|---|
/// | `on_error` | log with `tracing` |
/// | `source_buffer_size` | 128 |
/// | `frame_buffer_size` | 1024 |
/// | `dial_timeout` | 10 s |
/// | `master_read_timeout` | none |
/// | `master_write_timeout` | none |
/// | `frame_read_timeout` | none |
/// | `chan_accept_timeout` | 60 s |
/// | `frame_size_limit` | 100 MiB |
/// | `max_source_window` | 16 MiB |
/// | `receive_budget` | 16 MiB |
///
/// # Memory
///
/// What a client holds for its sources is bounded in bytes as well as in frames.
/// Each source starts with 64 KiB of credit (the protocol's initial window): the
/// server sends no more than that ahead of the consumer, except one frame at a time
/// when a frame is larger. A window grows (doubling) only while the consumer is
/// faster than the link, up to `max_source_window`, and all growth of all the
/// client's sources comes out of one `receive_budget`. So with `S` sources open
/// (at most the links' `max_streams` each) and `F` the largest frame, the frames a
/// client holds for its sources, in flight and decoded ahead, cost at most
///
/// ```text
/// S × max(64 KiB, F + 4) + receive_budget
/// ```
///
/// (a frame costs its length plus 4), plus the buffers and state of each open
/// source: tens of KiB (`tests/memory.rs` allows 64 KiB per source, with both ends in
/// one process), and up to `F` more per source while a frame is partly read (its
/// reader reserves the whole frame once its header arrived, and its tail may still
/// wait in yamux: with 64 KiB frames half the sources of `tests/memory.rs` were seen
/// so). The server holds a source's frames that do not fit the credit in
/// its producer (a channel's `capacity`), not in buffers. A chanserv server also
/// bounds what one request's sources have in flight together
/// ([`ServerConfig::max_request_in_flight`](crate::ServerConfig::max_request_in_flight)),
/// so a request of many sources puts at most `max_request_in_flight +
/// S × max(8 KiB, F + 4)` on the way to the client, whatever their windows.
#[derive(Clone)]
pub struct ClientConfig {
    pub(super) on_error: Option<ErrorFn>,
    pub(super) source_buffer_size: usize,
    pub(super) frame_buffer_size: usize,
    pub(super) dial_timeout: Duration,
    pub(super) master_read_timeout: Option<Duration>,
    pub(super) master_write_timeout: Option<Duration>,
    pub(super) frame_read_timeout: Option<Duration>,
    pub(super) chan_accept_timeout: Duration,
    pub(super) frame_size_limit: usize,
    pub(super) max_source_window: usize,
    pub(super) receive_budget: usize,
    /// The budget itself: each client makes its own ([`Self::with_own_budget`]).
    pub(super) budget: Arc<ReceiveBudget>,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("source_buffer_size", &self.source_buffer_size)
            .field("frame_buffer_size", &self.frame_buffer_size)
            .field("dial_timeout", &self.dial_timeout)
            .field("master_read_timeout", &self.master_read_timeout)
            .field("master_write_timeout", &self.master_write_timeout)
            .field("frame_read_timeout", &self.frame_read_timeout)
            .field("chan_accept_timeout", &self.chan_accept_timeout)
            .field("max_source_window", &self.max_source_window)
            .field("receive_budget", &self.receive_budget)
            .finish_non_exhaustive()
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            on_error: None,
            source_buffer_size: 128,
            frame_buffer_size: 1024,
            dial_timeout: Duration::from_secs(10),
            master_read_timeout: None,
            master_write_timeout: None,
            frame_read_timeout: None,
            chan_accept_timeout: Duration::from_secs(60),
            frame_size_limit: FRAME_SIZE_LIMIT,
            max_source_window: 16 << 20,
            receive_budget: 16 << 20,
            budget: Arc::new(ReceiveBudget::new(0)),
        }
    }
}

impl ClientConfig {
    /// These settings with a receive budget of their own, for one client.
    pub(super) fn with_own_budget(mut self) -> Self {
        self.budget = Arc::new(ReceiveBudget::new(self.receive_budget));
        self
    }

    /// Called for errors that reach no `Source`: a child stream that could not be
    /// routed, a malformed one.
    #[must_use]
    pub fn on_error(mut self, f: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(f));
        self
    }
    /// Most announcements `Sources` decodes ahead of its consumer.
    ///
    /// # Panics
    /// If `n` is 0.
    #[must_use]
    pub fn source_buffer_size(mut self, n: usize) -> Self {
        assert!(n > 0, "source_buffer_size must be positive");
        self.source_buffer_size = n;
        self
    }
    /// Most frames a `Source` decodes ahead of its consumer. What one source holds on
    /// the client is at most these frames plus one read (up to 256 KiB) or the frame
    /// being assembled (up to [`frame_size_limit`](Self::frame_size_limit)): the
    /// reader reads only when nothing decoded is waiting. Beyond that, bytes wait in
    /// the multiplexer's per-stream receive window (yamux: 256 KiB to start, grown for
    /// a stream whose consumer keeps up), and then the server stops producing: a
    /// stalled consumer stalls its producer (`backpressure_bounds_a_stalled_source`
    /// in `tests/chanserv.rs`). Small frames rarely reach this count; it bounds
    /// bursts of tiny frames.
    ///
    /// # Panics
    /// If `n` is 0.
    #[must_use]
    pub fn frame_buffer_size(mut self, n: usize) -> Self {
        assert!(n > 0, "frame_buffer_size must be positive");
        self.frame_buffer_size = n;
        self
    }
    /// How long to wait for a stream to the service.
    #[must_use]
    pub fn dial_timeout(mut self, t: Duration) -> Self {
        self.dial_timeout = t;
        self
    }
    /// Longest wait for the next message on the master stream (announcement or end).
    #[must_use]
    pub fn master_read_timeout(mut self, t: Option<Duration>) -> Self {
        self.master_read_timeout = t;
        self
    }
    /// Longest wait to write the request.
    #[must_use]
    pub fn master_write_timeout(mut self, t: Option<Duration>) -> Self {
        self.master_write_timeout = t;
        self
    }
    /// Longest wait for the next frame of a source.
    #[must_use]
    pub fn frame_read_timeout(mut self, t: Option<Duration>) -> Self {
        self.frame_read_timeout = t;
        self
    }
    /// Longest wait for an announced source's child stream. The server dials it back
    /// within its own chan accept timeout (30 s by default); if it never comes (the
    /// server could not reach this client), the source fails with
    /// [`Timeout::ChanAccept`](crate::Timeout::ChanAccept) instead of waiting forever.
    #[must_use]
    pub fn chan_accept_timeout(mut self, t: Duration) -> Self {
        self.chan_accept_timeout = t;
        self
    }
    /// Largest frame accepted (see [`FrameCodec::with_limit`]).
    #[must_use]
    pub fn frame_size_limit(mut self, n: usize) -> Self {
        self.frame_size_limit = FrameCodec::new().with_limit(n).limit();
        self
    }

    /// The most credit one source may grow to: how far its producer may run ahead
    /// of its consumer, in bytes. Windows start at 64 KiB and grow only while the
    /// consumer waits on the link, so this caps one source's throughput over a long
    /// link at about `max_source_window / RTT` (16 MiB over a 20 ms round trip:
    /// 430-500 MiB/s measured by `scripts/wan.sh`, 610-700 with 64 MiB). A faster
    /// long link needs this and [`receive_budget`](Self::receive_budget) raised
    /// together. Values are capped at 4 GiB − 1 (the wire's u32).
    #[must_use]
    pub fn max_source_window(mut self, bytes: usize) -> Self {
        self.max_source_window = bytes.min(u32::MAX as usize);
        self
    }

    /// The bytes all of this client's sources together may grow their windows by,
    /// beyond the 64 KiB each starts with (see "Memory" above). 0 keeps every
    /// source at 64 KiB.
    #[must_use]
    pub fn receive_budget(mut self, bytes: usize) -> Self {
        self.receive_budget = bytes;
        self
    }
}
