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
    /// The serving side reported a failure (its message is kept).
    #[error("remote error: {0}")]
    Remote(String),
    /// The local source function failed or panicked.
    #[error("source function failed: {0}")]
    SourceFunc(String),
    /// The API was used in a way it cannot serve (for example outside a tokio
    /// runtime); the message says how.
    #[error("misuse: {0}")]
    Misuse(&'static str),
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

    /// True when the error came from malformed input rather than from the transport.
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

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
