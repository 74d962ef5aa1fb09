//! [`ServerConfig`]: Go's `ServerOption`s, their defaults and invariants. No behaviour.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use crate::error::{Error, ErrorFn};
use crate::frame::{FrameCodec, FRAME_SIZE_LIMIT};

/// What to do when errors pile up (Go's `OnMaxErrorMass`).
pub type MaxErrorMassFn =
    Arc<dyn Fn(usize) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// [`Server`](super::Server) settings, Go's `ServerOption`s with the same defaults:
///
/// | setting | default |
/// |---|---|
/// | `on_error` | log with `tracing` |
/// | `on_chan_error` | log with `tracing` |
/// | `max_error_mass` | 10 |
/// | `on_max_error_mass` | back off 30 s before accepting again (async, no thread blocked) |
/// | `serving_timeout` | none |
/// | `sourcing_timeout` | none |
/// | `chan_accept_timeout` | 30 s |
/// | `master_read_timeout` | none |
/// | `master_write_timeout` | none |
/// | `frame_write_timeout` | none |
/// | `use_compression` | off |
/// | `frame_size_limit` | 100 MiB |
/// | `max_request_in_flight` | 16 MiB |
///
/// # Memory
///
/// A server holds no frame its client has not made room for. Per source being
/// served it holds at most 64 frames taken from the producer before the source is
/// announced, then an 8 KiB write batch only while it has frames to write (none
/// while it waits for its producer or for the client's credit), plus the source's
/// task state (a few KiB); a frame larger than the batch is written from the
/// producer's own buffer, not copied. Frames beyond the client's credit stay in the
/// producer (a [`SourceSender`](crate::SourceSender)'s `capacity`). What the streams
/// of one link queue in yamux beyond what the socket took is bounded by
/// [`NodeConfig::send_queue`](crate::NodeConfig::send_queue) (4 MiB). So with `S`
/// sources being served and `L` links, the server holds at most
///
/// ```text
/// S × (8 KiB + 64 frames + task state) + L × send_queue
/// ```
///
/// beyond what its producers keep. What a request's sources have sent and their
/// client has not consumed yet (held by the links and the client) is at most
/// `max_request_in_flight + S × max(8 KiB, F + 4)` for frames of at most `F` bytes.
#[derive(Clone)]
pub struct ServerConfig {
    pub(super) on_error: Option<ErrorFn>,
    pub(super) on_chan_error: Option<ErrorFn>,
    pub(super) max_error_mass: usize,
    pub(super) on_max_error_mass: Option<MaxErrorMassFn>,
    pub(super) serving_timeout: Option<Duration>,
    pub(super) sourcing_timeout: Option<Duration>,
    pub(super) chan_accept_timeout: Duration,
    pub(super) master_read_timeout: Option<Duration>,
    pub(super) master_write_timeout: Option<Duration>,
    pub(super) frame_write_timeout: Option<Duration>,
    pub(super) compression: bool,
    pub(super) frame_size_limit: usize,
    pub(super) max_request_in_flight: usize,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("max_error_mass", &self.max_error_mass)
            .field("serving_timeout", &self.serving_timeout)
            .field("sourcing_timeout", &self.sourcing_timeout)
            .field("chan_accept_timeout", &self.chan_accept_timeout)
            .field("master_read_timeout", &self.master_read_timeout)
            .field("master_write_timeout", &self.master_write_timeout)
            .field("frame_write_timeout", &self.frame_write_timeout)
            .field("compression", &self.compression)
            .field("max_request_in_flight", &self.max_request_in_flight)
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            on_error: None,
            on_chan_error: None,
            max_error_mass: 10,
            on_max_error_mass: None,
            serving_timeout: None,
            sourcing_timeout: None,
            chan_accept_timeout: Duration::from_secs(30),
            master_read_timeout: None,
            master_write_timeout: None,
            frame_write_timeout: None,
            compression: false,
            frame_size_limit: FRAME_SIZE_LIMIT,
            max_request_in_flight: 16 << 20,
        }
    }
}

impl ServerConfig {
    /// Called with each request-level error (bad request, failed source function,
    /// master stream timeouts).
    #[must_use]
    pub fn on_error(mut self, f: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(f));
        self
    }
    /// Called with each source-level error (child stream failed or timed out).
    #[must_use]
    pub fn on_chan_error(mut self, f: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_chan_error = Some(Arc::new(f));
        self
    }
    /// Consecutive errors of the service's own (its source function failed or
    /// panicked, a serving or sourcing timeout) after which `on_max_error_mass` runs
    /// before the server accepts again. A request that succeeds resets the count;
    /// client cancellations and malformed requests are reported but neither count nor
    /// reset it, so one client cannot pause the service for the others.
    ///
    /// # Panics
    /// If `n` is 0.
    #[must_use]
    pub fn max_error_mass(mut self, n: usize) -> Self {
        assert!(n > 0, "max_error_mass must be positive");
        self.max_error_mass = n;
        self
    }
    /// Runs (and is awaited, so accepting pauses) when the error mass is reached; the
    /// count then starts again. Default: wait 30 s.
    #[must_use]
    pub fn on_max_error_mass<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_max_error_mass = Some(Arc::new(move |n| f(n).boxed()));
        self
    }
    /// Longest time from a request's arrival to its last announcement.
    #[must_use]
    pub fn serving_timeout(mut self, t: Option<Duration>) -> Self {
        self.serving_timeout = t;
        self
    }
    /// Longest wait for the source function's next source.
    #[must_use]
    pub fn sourcing_timeout(mut self, t: Option<Duration>) -> Self {
        self.sourcing_timeout = t;
        self
    }
    /// Longest wait to open a source's child stream to the client.
    #[must_use]
    pub fn chan_accept_timeout(mut self, t: Duration) -> Self {
        self.chan_accept_timeout = t;
        self
    }
    /// Longest wait for the request on a new master stream.
    #[must_use]
    pub fn master_read_timeout(mut self, t: Option<Duration>) -> Self {
        self.master_read_timeout = t;
        self
    }
    /// Longest wait for one write on the master stream.
    #[must_use]
    pub fn master_write_timeout(mut self, t: Option<Duration>) -> Self {
        self.master_write_timeout = t;
        self
    }
    /// Longest wait for one write of frames on a child stream (a consumer that stops
    /// reading for longer fails its source).
    #[must_use]
    pub fn frame_write_timeout(mut self, t: Option<Duration>) -> Self {
        self.frame_write_timeout = t;
        self
    }
    /// Compress frames with LZ4 where that makes them smaller. Each source adapts:
    /// after a frame that does not shrink by a tenth, its next frames are sent plain
    /// for a while (longer after each failure), then tried again, so incompressible
    /// payloads cost little more than compression off.
    #[must_use]
    pub fn use_compression(mut self, on: bool) -> Self {
        self.compression = on;
        self
    }
    /// The most bytes (frames' cost, as credit counts them) all the sources of one
    /// request may have sent and not yet seen consumed by the client. Each source is
    /// also held to its own credit; this bounds their sum, so a request of a thousand
    /// sources does not put a thousand initial windows (64 KiB each) in flight at
    /// once. A source always has 8 KiB of its own beyond this, so one its consumer
    /// waits on moves a batch per round trip even when the others hold the rest.
    /// A single source over a long link needs this above its window
    /// ([`ClientConfig::max_source_window`](crate::ClientConfig::max_source_window)).
    #[must_use]
    pub fn max_request_in_flight(mut self, bytes: usize) -> Self {
        self.max_request_in_flight = bytes;
        self
    }
    /// Largest frame sent or accepted (see [`FrameCodec::with_limit`]).
    #[must_use]
    pub fn frame_size_limit(mut self, n: usize) -> Self {
        self.frame_size_limit = FrameCodec::new().with_limit(n).limit();
        self
    }
}
