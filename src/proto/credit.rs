//! Credit on a child stream (`PROTOCOL.md`, "Credit"): what the client writes back to
//! the server on a source's child stream. Pure encoding and decoding.
//!
//! Every amount counts *cost*: a frame costs its payload's (uncompressed) length plus
//! its 4-byte header, whatever the wire carried. Both sides count the same way, so the
//! client's grants bound what it holds for a source however the frames were encoded.

use bytes::{Buf, BufMut, BytesMut};

use super::frame::HEADER_LEN;
use crate::error::{Error, Result};

/// The credit a server may use on a child stream before the client's first CREDIT:
/// every source starts with it.
pub(crate) const INITIAL_WINDOW: u32 = 16 * 1024;

const MSG_CREDIT: u8 = 1;
const MSG_DONE: u8 = 2;
/// Body of a CREDIT: kind, consumed u64, window u32.
const CREDIT_LEN: usize = 1 + 8 + 4;
/// Body of a DONE: kind, consumed u64.
const DONE_LEN: usize = 1 + 8;

/// What a frame of `len` payload bytes costs against a window.
pub(crate) fn cost(len: usize) -> u64 {
    len as u64 + HEADER_LEN as u64
}

/// A message from the client on a child stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildMsg {
    /// The consumer has taken frames costing `consumed` in all; the server may send
    /// while what it sent costs at most `consumed + window` (and always one frame
    /// when the consumer has taken everything sent).
    Credit { consumed: u64, window: u32 },
    /// The consumer took every frame and the end: the source was delivered.
    Done { consumed: u64 },
}

impl ChildMsg {
    /// Appends the message as one frame.
    pub(crate) fn encode(&self, dst: &mut BytesMut) {
        match *self {
            ChildMsg::Credit { consumed, window } => {
                dst.put_u32_le(CREDIT_LEN as u32);
                dst.put_u8(MSG_CREDIT);
                dst.put_u64_le(consumed);
                dst.put_u32_le(window);
            }
            ChildMsg::Done { consumed } => {
                dst.put_u32_le(DONE_LEN as u32);
                dst.put_u8(MSG_DONE);
                dst.put_u64_le(consumed);
            }
        }
    }

    /// Takes one message off the front of `src`: `None` until a whole one arrived.
    /// A length other than a known message's, or an unknown kind, is a protocol
    /// error (and nothing is taken), so a hostile client cannot make the server
    /// buffer more than one message.
    pub(crate) fn decode(src: &mut BytesMut) -> Result<Option<ChildMsg>> {
        let Some(head) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
        if len != CREDIT_LEN && len != DONE_LEN {
            return Err(Error::Protocol(format!(
                "a {len}-byte message on a child stream (credit is {CREDIT_LEN}, done {DONE_LEN})"
            )));
        }
        if src.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let kind = src[HEADER_LEN];
        let msg = match (kind, len) {
            (MSG_CREDIT, CREDIT_LEN) => {
                let mut b = &src[HEADER_LEN + 1..HEADER_LEN + len];
                ChildMsg::Credit {
                    consumed: b.get_u64_le(),
                    window: b.get_u32_le(),
                }
            }
            (MSG_DONE, DONE_LEN) => {
                let mut b = &src[HEADER_LEN + 1..HEADER_LEN + len];
                ChildMsg::Done {
                    consumed: b.get_u64_le(),
                }
            }
            _ => {
                return Err(Error::Protocol(format!(
                    "child stream message of kind {kind} and {len} bytes"
                )))
            }
        };
        src.advance(HEADER_LEN + len);
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layouts_byte_for_byte() {
        let mut b = BytesMut::new();
        ChildMsg::Credit {
            consumed: 0x0102,
            window: 0x10000,
        }
        .encode(&mut b);
        assert_eq!(
            &b[..],
            &[13, 0, 0, 0, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0][..]
        );
        b.clear();
        ChildMsg::Done { consumed: 7 }.encode(&mut b);
        assert_eq!(&b[..], &[9, 0, 0, 0, 2, 7, 0, 0, 0, 0, 0, 0, 0][..]);
    }

    #[test]
    fn partial_messages_wait_and_bad_ones_fail_without_consuming() {
        let mut b = BytesMut::new();
        ChildMsg::Done { consumed: 1 }.encode(&mut b);
        let mut part = BytesMut::from(&b[..5]);
        assert_eq!(ChildMsg::decode(&mut part).unwrap(), None);
        assert_eq!(part.len(), 5);
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0x7f, 1][..]);
        assert!(matches!(
            ChildMsg::decode(&mut huge),
            Err(Error::Protocol(_))
        ));
        assert_eq!(huge.len(), 5);
        // A DONE's length with a CREDIT's kind.
        let mut mixed = BytesMut::from(&[9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert!(ChildMsg::decode(&mut mixed).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(consumed: u64, window: u32, done: bool) {
            let m = if done { ChildMsg::Done { consumed } } else { ChildMsg::Credit { consumed, window } };
            let mut b = BytesMut::new();
            m.encode(&mut b);
            m.encode(&mut b);
            prop_assert_eq!(ChildMsg::decode(&mut b).unwrap(), Some(m));
            prop_assert_eq!(ChildMsg::decode(&mut b).unwrap(), Some(m));
            prop_assert!(b.is_empty());
        }

        #[test]
        fn never_panics(data: Vec<u8>) {
            let mut b = BytesMut::from(&data[..]);
            // Only a panic fails this: any result is fine for arbitrary bytes.
            drop(ChildMsg::decode(&mut b));
        }
    }
}
