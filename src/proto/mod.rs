//! Every byte layout of chanserv, and nothing else: no I/O, no clocks, no tasks.
//!
//! Each file maps to one section of `PROTOCOL.md`, and each message in it has its
//! `encode` and `decode` side by side, with a round-trip property test and a test that
//! its decoder never panics on arbitrary bytes:
//!
//! - [`frame`] — "Frames": the length prefix, the LZ4 flag, the END and ABORT words,
//!   the limits. Public as `chanserv::frame`.
//! - `lz4` — the LZ4 block format both ways, without zeroed buffers.
//! - `adaptive` — when a sender compresses: LZ4 per frame only while it pays, per
//!   source; the server's pump encodes with it.
//! - `link` — "Links", "Stream open" and "Control stream": the handshake, a stream's
//!   open header and the acceptor's status byte, the control messages.
//! - `chanserv` — "chanserv": the request, the server's messages on the master stream,
//!   the prefix of a child stream.
//! - `credit` — "Credit": what a client writes back on a child stream.
//! - `route` — "Routing": the ROUTES control message, a path-vector table.
//! - `fuzzing` (only with `--cfg fuzzing`) — every decoder above behind one function,
//!   and the TLS record reader of `mux/`, for the fuzz targets in `fuzz/`; public as
//!   `chanserv::fuzzing`.
//!
//! Encoders append to a caller's `BytesMut`; decoders take bytes (a frame's body, or a
//! fixed-size prefix) and return an [`Error`](crate::Error) on bad input, never panic
//! and never allocate more than the input. Reading and writing, buffering and timeouts
//! belong to the callers (`mux/`, `server/`, `client`, `source`).

pub(crate) mod adaptive;
pub(crate) mod chanserv;
pub(crate) mod credit;
pub mod frame;
#[cfg(fuzzing)]
pub mod fuzzing;
pub(crate) mod link;
pub(crate) mod lz4;
pub(crate) mod route;

use bytes::{BufMut, BytesMut};

use crate::error::{Error, Result};

/// Appends the header of a plain frame whose body of `len` bytes the caller writes
/// next, with room reserved for it. A body over `limit` (or over the 31 bits a header
/// can say) is [`Error::FrameTooLarge`], and nothing is written.
fn put_frame_header(dst: &mut BytesMut, len: usize, limit: usize) -> Result<()> {
    let limit = limit.min(frame::MAX_FRAME_SIZE_LIMIT);
    if len > limit {
        return Err(Error::FrameTooLarge { size: len, limit });
    }
    dst.reserve(frame::HEADER_LEN + len);
    dst.put_u32_le(len as u32);
    Ok(())
}
