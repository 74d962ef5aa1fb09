//! The frame codec: length prefix, compression flag, LZ4 block, size limits.
//!
//! Owns the byte layout of one frame (see `PROTOCOL.md`, "Frames") and nothing else:
//! no I/O, no buffering policy. [`FrameCodec::encode`] appends to a caller's buffer,
//! [`FrameCodec::decode`] takes whole frames off the front of one, and the
//! `tokio_util::codec` traits sit on top for use with `FramedRead`/`FramedWrite`.
//!
//! ```text
//! plain:       [u32 LE: 0 | len (31 bits)] [len bytes of payload]
//! compressed:  [u32 LE: 1 | len (31 bits)] [u32 LE: uncompressed len] [LZ4 block: len - 4 bytes]
//! ```
//!
//! Bad input never allocates more than a small bound: a header is checked against the
//! limit before anything is reserved, the decoder never reserves room for a length a
//! peer claims (the caller's buffer grows with bytes that actually arrived), and an
//! uncompressed length is checked against the limit *and* against the largest output
//! LZ4 can produce from the bytes received before the output is allocated.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::lz4;
use crate::error::{Error, Result};

/// Default largest frame, compressed or not, in bytes: 100 MiB, as in Go's chanserv.
pub const FRAME_SIZE_LIMIT: usize = 100 * 1024 * 1024;

/// Largest limit the wire format can express: the length field has 31 bits.
pub const MAX_FRAME_SIZE_LIMIT: usize = 0x7FFF_FFFF;

/// Frames shorter than this are never compressed: LZ4 cannot win enough on them to pay
/// for the 4-byte uncompressed length and the time spent.
pub const COMPRESSION_THRESHOLD: usize = 512;

/// Plain payloads of at least this size are returned by [`FrameCodec::encode_split`]
/// for the caller to write after the header, instead of being copied into the buffer.
pub const SPLIT_PAYLOAD_SIZE: usize = 32 * 1024;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 4;

const FLAG_LZ4: u32 = 0x8000_0000;
const LEN_MASK: u32 = 0x7FFF_FFFF;

/// Header word that ends a chanserv stream cleanly. It is never a valid frame header
/// (a compressed frame carries at least its 4-byte uncompressed length).
pub(crate) const WORD_END: u32 = FLAG_LZ4;
/// Header word that aborts a chanserv stream; a plain frame with the reason follows.
pub(crate) const WORD_ABORT: u32 = FLAG_LZ4 | 1;
/// Header word that asks the receiver to report (with credit) once its consumer took
/// every frame before it; nothing follows it.
pub(crate) const WORD_SYNC: u32 = FLAG_LZ4 | 2;
/// Header word that says the sender waits for credit; nothing follows it.
pub(crate) const WORD_BLOCKED: u32 = FLAG_LZ4 | 3;

/// LZ4 emits at most 255 output bytes per input byte (a run-length byte of 255); the
/// slack covers the last literals. An uncompressed length above this bound is a lie.
fn lz4_max_output(compressed: usize) -> usize {
    compressed.saturating_mul(255).saturating_add(64)
}

/// One item of a chanserv stream as seen by [`FrameCodec::decode_item`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A frame's payload.
    Frame(Bytes),
    /// The sender finished the stream cleanly.
    End,
    /// The sender gave up on the stream, with its reason.
    Abort(String),
    /// The sender waits to hear that every frame before this one was consumed
    /// (`SourceSender::flush`); it carries no data.
    Sync,
    /// The sender waits for credit before its next frame; it carries no data.
    Blocked,
}

/// Frame encoder and decoder with a size limit and optional LZ4 compression.
///
/// `Default` is [`FRAME_SIZE_LIMIT`], compression off. Cheap to clone; holds no buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    limit: usize,
    compress: bool,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec {
            limit: FRAME_SIZE_LIMIT,
            compress: false,
        }
    }
}

impl FrameCodec {
    /// A codec with the default limit and compression off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the largest frame (both its wire length and its uncompressed length).
    ///
    /// # Panics
    /// If `limit` is above [`MAX_FRAME_SIZE_LIMIT`] (2^31 − 1), which the header cannot
    /// express.
    pub fn with_limit(mut self, limit: usize) -> Self {
        assert!(
            limit <= MAX_FRAME_SIZE_LIMIT,
            "frame size limit {limit} is above the wire format's 2^31-1"
        );
        self.limit = limit;
        self
    }

    /// Compresses frames with LZ4 when that makes them smaller (frames under
    /// [`COMPRESSION_THRESHOLD`] are always sent plain). Decoding accepts both always.
    pub fn with_compression(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether the encoder compresses.
    pub fn compression(&self) -> bool {
        self.compress
    }

    /// Appends one frame to `dst`.
    pub fn encode(&self, payload: &[u8], dst: &mut BytesMut) -> Result<()> {
        self.check_len(payload.len())?;
        if self.compress
            && payload.len() >= COMPRESSION_THRESHOLD
            && self.try_compress(payload, dst, false)
        {
            return Ok(());
        }
        super::put_frame_header(dst, payload.len(), self.limit)?;
        dst.put_slice(payload);
        Ok(())
    }

    /// Like [`encode`](Self::encode), but a large plain payload is not copied: its header
    /// goes into `dst` and the payload comes back, to be written right after `dst`.
    pub fn encode_split(&self, payload: Bytes, dst: &mut BytesMut) -> Result<Option<Bytes>> {
        if self.compress {
            self.encode(&payload, dst)?;
            return Ok(None);
        }
        self.encode_plain(payload, dst)
    }

    /// [`encode_split`](Self::encode_split) as a plain frame, whatever the setting.
    pub(crate) fn encode_plain(&self, payload: Bytes, dst: &mut BytesMut) -> Result<Option<Bytes>> {
        if payload.len() < SPLIT_PAYLOAD_SIZE {
            super::put_frame_header(dst, payload.len(), self.limit)?;
            dst.put_slice(&payload);
            return Ok(None);
        }
        self.check_len(payload.len())?;
        dst.put_u32_le(payload.len() as u32);
        Ok(Some(payload))
    }

    /// Appends the word that ends a stream cleanly.
    pub(crate) fn encode_end(dst: &mut BytesMut) {
        dst.put_u32_le(WORD_END);
    }

    /// Appends the word that asks for a report once what came before was consumed.
    pub(crate) fn encode_sync(dst: &mut BytesMut) {
        dst.put_u32_le(WORD_SYNC);
    }

    /// Appends the word that says the sender waits for credit.
    pub(crate) fn encode_blocked(dst: &mut BytesMut) {
        dst.put_u32_le(WORD_BLOCKED);
    }

    /// Appends the word that aborts a stream, and the reason (cut to 64 KiB).
    pub(crate) fn encode_abort(reason: &str, dst: &mut BytesMut) {
        let mut end = reason.len().min(64 * 1024);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        dst.put_u32_le(WORD_ABORT);
        dst.put_u32_le(end as u32);
        dst.put_slice(&reason.as_bytes()[..end]);
    }

    pub(super) fn check_len(&self, len: usize) -> Result<()> {
        if len > self.limit {
            return Err(Error::FrameTooLarge {
                size: len,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Compresses into `dst`; false (and `dst` unchanged) when it would not be smaller.
    /// `long_runs`: the sender's last frames compressed very well (see `lz4`).
    pub(super) fn try_compress(&self, payload: &[u8], dst: &mut BytesMut, long_runs: bool) -> bool {
        let start = dst.len();
        dst.extend_from_slice(&[0; 2 * HEADER_LEN]);
        // Smaller than the payload, with its uncompressed length.
        let max = payload.len().saturating_sub(HEADER_LEN + 1);
        match lz4::compress(payload, dst, max, long_runs) {
            Some(n) => {
                let wire = (n + HEADER_LEN) as u32;
                dst[start..start + 4].copy_from_slice(&(wire | FLAG_LZ4).to_le_bytes());
                dst[start + 4..start + 8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
                true
            }
            None => {
                dst.truncate(start);
                false
            }
        }
    }

    /// How many more bytes `src` needs before the next frame can be decoded (0 when it
    /// can be decoded now, or when its header is already known to be bad). A reader
    /// uses it to size its next read; it is a hint, never a reservation.
    pub fn bytes_needed(&self, src: &[u8]) -> usize {
        match peek_header(src) {
            None => HEADER_LEN - src.len(),
            Some(word) => {
                let len = (word & LEN_MASK) as usize;
                if word & FLAG_LZ4 != 0 && len < HEADER_LEN || len > self.limit {
                    return 0;
                }
                (HEADER_LEN + len).saturating_sub(src.len())
            }
        }
    }

    /// Takes one whole frame off the front of `src`. `Ok(None)` means more bytes are
    /// needed; nothing is reserved for them. The stream markers of chanserv streams are
    /// protocol errors here: use [`decode_item`](Self::decode_item) on those.
    pub fn decode(&self, src: &mut BytesMut) -> Result<Option<Bytes>> {
        match self.decode_item(src)? {
            None => Ok(None),
            Some(Item::Frame(b)) => Ok(Some(b)),
            Some(_) => Err(Error::Protocol(
                "stream marker in a plain frame stream".into(),
            )),
        }
    }

    /// Takes one frame or stream marker off the front of `src`.
    pub fn decode_item(&self, src: &mut BytesMut) -> Result<Option<Item>> {
        let Some(word) = peek_header(src) else {
            return Ok(None);
        };
        if word == WORD_END {
            src.advance(HEADER_LEN);
            return Ok(Some(Item::End));
        }
        if word == WORD_ABORT {
            return decode_abort(src);
        }
        if word == WORD_SYNC || word == WORD_BLOCKED {
            src.advance(HEADER_LEN);
            return Ok(Some(if word == WORD_SYNC {
                Item::Sync
            } else {
                Item::Blocked
            }));
        }
        let len = (word & LEN_MASK) as usize;
        self.check_len(len)?;
        let compressed = word & FLAG_LZ4 != 0;
        if compressed && len < HEADER_LEN {
            return Err(Error::Protocol(format!(
                "compressed frame of {len} bytes has no room for its uncompressed length"
            )));
        }
        if src.len() < HEADER_LEN + len {
            return Ok(None);
        }
        if !compressed {
            src.advance(HEADER_LEN);
            return Ok(Some(Item::Frame(src.split_to(len).freeze())));
        }
        // Validate the uncompressed length before consuming anything, so a bad frame
        // leaves `src` as it was.
        let ulen = u32::from_le_bytes(src[4..8].try_into().expect("4 bytes")) as usize;
        if ulen > self.limit {
            return Err(Error::WrongUncompressedSize(format!(
                "{ulen} bytes is over the limit of {}",
                self.limit
            )));
        }
        let block_len = len - HEADER_LEN;
        if ulen > lz4_max_output(block_len) {
            return Err(Error::WrongUncompressedSize(format!(
                "{ulen} bytes cannot come from a {block_len}-byte LZ4 block"
            )));
        }
        let block = &src[2 * HEADER_LEN..HEADER_LEN + len];
        let out = lz4::decompress(block, ulen).map_err(|e| match e {
            lz4::DecodeError::TooShort { .. } => Error::WrongUncompressedSize(e.to_string()),
            lz4::DecodeError::Other(m) => Error::Corrupt(m),
            _ => Error::Corrupt(e.to_string()),
        })?;
        src.advance(HEADER_LEN + len);
        Ok(Some(Item::Frame(Bytes::from(out))))
    }

    /// At the end of the byte stream: whatever is left in `src` is a truncated frame.
    pub fn check_eof(&self, src: &BytesMut) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let missing = self.bytes_needed(src).max(1);
        Err(Error::Truncated { missing })
    }
}

fn peek_header(src: &[u8]) -> Option<u32> {
    let head: [u8; 4] = src.get(..HEADER_LEN)?.try_into().ok()?;
    Some(u32::from_le_bytes(head))
}

fn decode_abort(src: &mut BytesMut) -> Result<Option<Item>> {
    let Some(len) = peek_header(&src[HEADER_LEN..]) else {
        return Ok(None);
    };
    let len = len as usize;
    if len > 64 * 1024 {
        return Err(Error::Protocol(format!("abort reason of {len} bytes")));
    }
    if src.len() < 2 * HEADER_LEN + len {
        return Ok(None);
    }
    src.advance(2 * HEADER_LEN);
    let reason = src.split_to(len);
    Ok(Some(Item::Abort(
        String::from_utf8_lossy(&reason).into_owned(),
    )))
}

impl Encoder<Bytes> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<()> {
        FrameCodec::encode(self, &item, dst)
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>> {
        FrameCodec::decode(self, src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>> {
        match FrameCodec::decode(self, src)? {
            Some(frame) => Ok(Some(frame)),
            None => self.check_eof(src).map(|()| None),
        }
    }
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;

#[cfg(test)]
mod protocol_examples {
    use super::*;

    /// The worked examples of PROTOCOL.md, byte for byte.
    #[test]
    fn worked_examples() {
        let mut buf = BytesMut::new();
        FrameCodec::new().encode(b"hello", &mut buf).unwrap();
        assert_eq!(&buf[..], &[5, 0, 0, 0, b'h', b'e', b'l', b'l', b'o']);
        let mut buf = BytesMut::new();
        FrameCodec::new()
            .with_compression(true)
            .encode(&[b'a'; 4096], &mut buf)
            .unwrap();
        assert_eq!(&buf[..8], &[0x1f, 0, 0, 0x80, 0, 0x10, 0, 0]);
        assert_eq!(buf.len(), 4 + 0x1f);
    }
}
