//! The crate's private decoders, for the fuzz targets in `fuzz/` (built with
//! `--cfg fuzzing` by cargo-fuzz), re-exported as `chanserv::fuzzing`. Not part of
//! the API.

use bytes::{Bytes, BytesMut};

use super::chanserv::{ChildPrefix, MasterMsg, RequestMsg};
use super::credit::ChildMsg;
use super::frame::{FrameCodec, HEADER_LEN};
use super::link::{Control, Handshake, Open, Partial, Status, HANDSHAKE_LEN};

/// The read side of a TLS link (its buffer and record decoder) fed the records that
/// `data` describes: how many it opened before it failed or ran out. It must never
/// panic; see `src/mux/tls_fuzzing.rs`.
pub use crate::mux::tls_records;

/// How many decoders [`decode_all`] feeds.
pub const DECODERS: usize = 10;

/// Feeds `data` to every decoder of the protocol: a request (its UPLOAD tag included),
/// a master message (UPLOAD_STOP included), a child-stream prefix, a handshake, an
/// open header (whole and byte by byte, as it is read), a status byte, a control
/// message, the items of a chanserv stream (a child stream's, or an upload's), and
/// the credit messages a client writes on a child stream, and an LZ4 block.
/// Whatever decodes must encode back to what was decoded. Returns how many decoded
/// (at most [`DECODERS`]); a decoder that panics fails the fuzz target.
pub fn decode_all(data: &[u8]) -> usize {
    let b = Bytes::copy_from_slice(data);
    [
        request(b.clone()),
        master(b.clone()),
        child_prefix(data),
        handshake(data),
        open_header(data),
        status(data),
        control(b),
        chanserv_stream(data),
        child_msgs(data),
        super::lz4::fuzz_block(data),
    ]
    .into_iter()
    .filter(|ok| *ok)
    .count()
}

/// A frame's body, after an encoder wrote the frame.
fn body(mut frame: BytesMut) -> Bytes {
    frame.split_off(HEADER_LEN).freeze()
}

fn request(b: Bytes) -> bool {
    let Ok(m) = RequestMsg::decode(b) else {
        return false;
    };
    let mut out = BytesMut::new();
    m.encode(usize::MAX, &mut out)
        .expect("a decoded request re-encodes");
    assert_eq!(RequestMsg::decode(body(out)).ok(), Some(m));
    true
}

fn master(b: Bytes) -> bool {
    let Ok(m) = MasterMsg::decode(b) else {
        return false;
    };
    let mut out = BytesMut::new();
    m.encode(&mut out).expect("a decoded message re-encodes");
    assert_eq!(MasterMsg::decode(body(out)).ok(), Some(m));
    true
}

fn child_prefix(data: &[u8]) -> bool {
    let Ok(p) = ChildPrefix::decode(data) else {
        return false;
    };
    let mut out = BytesMut::new();
    p.encode(&mut out);
    assert_eq!(&out[..], &data[..ChildPrefix::LEN]);
    true
}

fn handshake(data: &[u8]) -> bool {
    let Ok(h) = Handshake::decode(data) else {
        return false;
    };
    assert_eq!(&h.encode()[..], &data[..HANDSHAKE_LEN]);
    true
}

/// The open header, whole and as `OpenReader` reads it: never more than asked for.
fn open_header(data: &[u8]) -> bool {
    let whole = Open::decode(data);
    let mut got = 0;
    loop {
        match Open::decode(&data[..got]) {
            Ok(Partial::Need(n)) if got + n <= data.len() => got += n,
            Ok(Partial::Need(_)) => {
                assert!(matches!(whole, Ok(Partial::Need(_))));
                return false;
            }
            Ok(Partial::Done(open, len)) => {
                assert_eq!(len, got);
                assert_eq!(whole.ok(), Some(Partial::Done(open.clone(), len)));
                let mut out = BytesMut::new();
                open.encode(&mut out).expect("a decoded target re-encodes");
                assert_eq!(&out[..], &data[..len]);
                return true;
            }
            Err(_) => {
                assert!(whole.is_err());
                return false;
            }
        }
    }
}

fn status(data: &[u8]) -> bool {
    let Some(Ok(s)) = data.first().map(|b| Status::decode(*b)) else {
        return false;
    };
    assert_eq!(s.encode(), data[0]);
    true
}

fn control(b: Bytes) -> bool {
    let Ok(c) = Control::decode(b) else {
        return false;
    };
    let mut out = BytesMut::new();
    // Names are read as lossy UTF-8: one may grow past what NAMES can carry (a ROUTES
    // entry that no longer fits is left out when encoding, so those are not compared).
    if !matches!(c, Control::Routes(_)) && c.encode(&mut out).is_ok() {
        assert_eq!(Control::decode(body(out)).ok(), Some(c));
    }
    true
}

/// The items of a chanserv stream (frames, END, ABORT, markers), as a child stream or
/// an upload is read.
fn chanserv_stream(data: &[u8]) -> bool {
    let codec = FrameCodec::new().with_limit(1 << 20);
    let mut buf = BytesMut::from(data);
    loop {
        match codec.decode_item(&mut buf) {
            Ok(Some(_)) => {}
            Ok(None) => return codec.check_eof(&buf).is_ok(),
            Err(_) => return false,
        }
    }
}

fn child_msgs(data: &[u8]) -> bool {
    let mut buf = BytesMut::from(data);
    loop {
        match ChildMsg::decode(&mut buf) {
            Ok(Some(m)) => {
                let mut out = BytesMut::new();
                m.encode(&mut out);
                assert_eq!(ChildMsg::decode(&mut out).ok(), Some(Some(m)));
            }
            Ok(None) => return buf.is_empty(),
            Err(_) => return false,
        }
    }
}
