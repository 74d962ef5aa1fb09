//! The one error type of the crate. It owns the list of causes a caller can act on;
//! it does not decide which layer produces which (each layer says so in its docs).

use std::fmt;
use std::io;

/// Which timeout fired. Every timeout of the crate is named, so an error says which
/// setting to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Timeout {
    /// [`ClientConfig::dial_timeout`](crate::ClientConfig::dial_timeout) or the
    /// timeout given to [`Multiplexer::dial`](crate::Multiplexer::dial).
    Dial,
    /// The link handshake did not complete in time.
    Handshake,
    /// A link missed its keep-alive deadline.
    KeepAlive,
    /// Reading from the master stream took too long.
    MasterRead,
    /// Writing to the master stream took too long.
    MasterWrite,
    /// The client waited too long for the next frame of a source.
    FrameRead,
    /// The server waited too long to write a frame of a source.
    FrameWrite,
    /// The server's whole answer to a request took too long.
    Serving,
    /// The source function took too long to produce the next source.
    Sourcing,
    /// The server waited too long for the client to accept a source's stream.
    ChanAccept,
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Timeout::Dial => "dial timeout",
            Timeout::Handshake => "link handshake timeout",
            Timeout::KeepAlive => "keep-alive timeout",
            Timeout::MasterRead => "master read timeout",
            Timeout::MasterWrite => "master write timeout",
            Timeout::FrameRead => "frame read timeout",
            Timeout::FrameWrite => "frame write timeout",
            Timeout::Serving => "serving timeout",
            Timeout::Sourcing => "sourcing timeout",
            Timeout::ChanAccept => "chan accept timeout",
        })
    }
}

/// Everything that can go wrong in chanserv, one variant per cause a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame is longer than the codec's limit (Go's `ErrWrongSize`). Nothing was
    /// allocated for it.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The length the frame has or claims.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A compressed frame's uncompressed length is over the limit, impossible for its
    /// compressed size, or not what decompression produced (Go's
    /// `ErrWrongUncompressedSize`).
    #[error("wrong uncompressed size: {0}")]
    WrongUncompressedSize(String),
    /// A compressed frame's LZ4 block is corrupt.
    #[error("corrupt compressed frame: {0}")]
    Corrupt(String),
    /// The byte stream ended in the middle of a frame.
    #[error("truncated frame: stream ended {missing} bytes short")]
    Truncated {
        /// How many more bytes the frame needed (at least).
        missing: usize,
    },
    /// The peer broke the protocol (bad magic, malformed message, unknown kind).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// No reachable node binds the address.
    #[error("no such address: {0}")]
    NoSuchAddress(String),
    /// The address is not a valid virtual address.
    #[error("invalid address {0:?}: {1}")]
    InvalidAddress(String, &'static str),
    /// The address is already bound on this node.
    #[error("address in use: {0}")]
    AddrInUse(String),
    /// The acceptor refused the stream (its listener is full or going away).
    #[error("refused by {0}")]
    Refused(String),
    /// A named timeout fired.
    #[error("{0}")]
    Timeout(Timeout),
    /// The stream or link was cut before the other side said it was done: the data
    /// received so far is all there is. This is a failure, never a completion.
    #[error("stream reset before completion")]
    Reset,
    /// The link carrying the stream went down.
    #[error("link closed")]
    LinkClosed,
    /// The node, server or listener was shut down.
    #[error("closed")]
    Closed,
    /// The source's producer failed it: its stream yielded an error, it panicked, it
    /// made a frame over the limit, or [`SourceSender::abort`](crate::SourceSender::abort)
    /// was called. The producer's message is kept (for a remote source it crossed the
    /// wire). The request and the other sources go on.
    #[error("source failed: {0}")]
    SourceFailed(String),
    /// The service failed the whole request: its source function failed or panicked,
    /// or it timed out serving. The service's message is kept. Sources already handed
    /// out go on.
    #[error("request failed: {0}")]
    RequestFailed(String),
    /// This service's source function failed or panicked (server side: what
    /// [`ServerConfig::on_error`](crate::ServerConfig::on_error) sees; the client gets
    /// [`Error::RequestFailed`]).
    #[error("source function failed: {0}")]
    SourceFunc(String),
    /// The API was used in a way it cannot serve (outside a tokio runtime, a reply
    /// address or tag too long for the wire); the message says how. Never caused by
    /// the peer.
    #[error("misuse: {0}")]
    Misuse(&'static str),
    /// A TLS link could not be made or was refused (see
    /// [`TlsConfig`](crate::TlsConfig)): the TLS handshake failed or timed out, the
    /// peer presented no certificate, one not issued by the configured CA, an expired
    /// one, or one whose identity may not link here; or the peer refused ours (the
    /// message names the alert it sent); or the peer's identity conflicts with another
    /// link to the same node id. Also a `TlsConfig` that cannot be loaded (bad PEM, a
    /// key that does not match the certificate). Retrying with the same certificates
    /// will not help.
    #[error("tls: {0}")]
    Tls(String),
    /// A typed frame (the `serde` feature, module `typed`) could not be converted:
    /// a received frame does not decode as the consumer's type, or a value could not
    /// be encoded for sending. The message names the frame's index and length (or the
    /// value's type) and postcard's reason. On a typed source it concerns that one
    /// frame: the transport is fine and later frames still come. Not a protocol
    /// error: producer and consumer disagree on the type.
    #[error("serde: {0}")]
    Serde(String),
    /// An I/O error of the underlying transport.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// True when the error is a timeout (of any kind).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout(_))
    }

    /// True when the stream, link or node is gone: retrying on the same one is pointless.
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Reset | Error::LinkClosed | Error::Closed)
    }

    /// True when the other side failed the source or the request on purpose
    /// ([`Error::SourceFailed`], [`Error::RequestFailed`]): the link and the stream
    /// were fine.
    pub fn is_remote(&self) -> bool {
        matches!(self, Error::SourceFailed(_) | Error::RequestFailed(_))
    }

    /// True when a typed frame could not be encoded or decoded ([`Error::Serde`]):
    /// that one frame is lost, the source goes on.
    pub fn is_serde(&self) -> bool {
        matches!(self, Error::Serde(_))
    }

    /// True when the error came from malformed input rather than from the transport.
    /// (A typed frame that does not decode is [`is_serde`](Self::is_serde) instead: the
    /// wire carried it intact.)
    pub fn is_protocol(&self) -> bool {
        matches!(
            self,
            Error::FrameTooLarge { .. }
                | Error::WrongUncompressedSize(_)
                | Error::Corrupt(_)
                | Error::Truncated { .. }
                | Error::Protocol(_)
                | Error::VersionMismatch { .. }
        )
    }
}

/// Any error a producer may fail with: [`Source::try_new`](crate::Source::try_new)
/// items, a source function's `Err` items. `String`, `&str`, `std::io::Error`,
/// `anyhow::Error` and every `std::error::Error` convert into it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Error {
    /// A producer's error as this crate's: an [`Error`] stays what it is (so a source
    /// forwarded as it was received keeps its cause); anything else becomes
    /// [`Error::SourceFailed`] with its message.
    pub(crate) fn from_producer(e: impl Into<BoxError>) -> Error {
        match e.into().downcast::<Error>() {
            Ok(e) => *e,
            Err(other) => Error::SourceFailed(other.to_string()),
        }
    }
}

/// A callback for errors nobody else sees (Go's `OnError` options), shared by the
/// client's and the server's settings.
pub type ErrorFn = std::sync::Arc<dyn Fn(&Error) + Send + Sync>;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
