//! The link's messages (`PROTOCOL.md`, "Links", "Stream open", "Control stream"): the
//! handshake, a stream's open header, the acceptor's status byte and the control
//! messages. Pure encoding and decoding; `mux/` does the reading and writing.

use std::collections::BTreeSet;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::put_frame_header;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"CHANSERV";
/// Version of the link protocol (handshake, stream open, control stream, chanserv).
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes of a handshake: magic, version, node id, max streams.
pub(crate) const HANDSHAKE_LEN: usize = 8 + 2 + 8 + 4;

/// Longest target address of an open header, and longest service name in NAMES: the
/// length is one byte. Binding refuses longer addresses (`VAddr::parse`), so no
/// name or target a node uses is ever cut.
pub(crate) const MAX_NAME_LEN: usize = 255;

const OPEN_DIAL: u8 = 0;
const OPEN_CONTROL: u8 = 1;

const STATUS_ACCEPTED: u8 = 0;
const STATUS_NO_SUCH_ADDRESS: u8 = 1;
const STATUS_REFUSED: u8 = 2;

const CTL_NAMES: u8 = 1;
const CTL_PING: u8 = 2;
const CTL_PONG: u8 = 3;
const CTL_ROTATE: u8 = 4;
const CTL_REFUSED: u8 = 5;

/// Largest control message: a NAMES message of thousands of names fits.
pub(crate) const CONTROL_LIMIT: usize = 16 << 20;

// ------------------------------------------------------------------ handshake

/// The handshake each side writes, then reads, before yamux starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Handshake {
    /// [`PROTOCOL_VERSION`] when sent; a decoded handshake always has it (any other
    /// is [`Error::VersionMismatch`]).
    pub(crate) version: u16,
    /// The sender's node id.
    pub(crate) node: u64,
    /// The most outbound streams the sender allows per link.
    pub(crate) max_streams: u32,
}

impl Handshake {
    /// This node's handshake, at [`PROTOCOL_VERSION`].
    pub(crate) fn new(node: u64, max_streams: u32) -> Self {
        Handshake {
            version: PROTOCOL_VERSION,
            node,
            max_streams,
        }
    }

    pub(crate) fn encode(&self) -> [u8; HANDSHAKE_LEN] {
        let mut out = [0u8; HANDSHAKE_LEN];
        let mut w = &mut out[..];
        w.put_slice(MAGIC);
        w.put_u16_le(self.version);
        w.put_u64_le(self.node);
        w.put_u32_le(self.max_streams);
        out
    }

    /// Decodes the first [`HANDSHAKE_LEN`] bytes of `src`: a wrong magic is
    /// [`Error::Protocol`], another version [`Error::VersionMismatch`].
    pub(crate) fn decode(src: &[u8]) -> Result<Self> {
        let Some(mut b) = src.get(..HANDSHAKE_LEN) else {
            return Err(Error::Protocol("truncated handshake".into()));
        };
        if &b[..MAGIC.len()] != MAGIC {
            return Err(Error::Protocol(
                "bad magic: the peer is not a chanserv node".into(),
            ));
        }
        b.advance(MAGIC.len());
        let version = b.get_u16_le();
        if version != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        Ok(Handshake {
            version,
            node: b.get_u64_le(),
            max_streams: b.get_u32_le(),
        })
    }
}

// ------------------------------------------------------------------ stream open

/// The header that begins every yamux stream, from the side that opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Open {
    /// A stream to this target address (service name, `:port`, `<node>:<port>`).
    Dial(String),
    /// The link's control stream.
    Control,
}

/// What an incremental decoder made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Partial<T> {
    /// Decoded, from this many bytes at the front of the input.
    Done(T, usize),
    /// At least this many more bytes are needed (never 0); reading no more than that
    /// never takes bytes that follow the message.
    Need(usize),
}

impl Open {
    /// Appends the header. A target over [`MAX_NAME_LEN`] bytes cannot be expressed:
    /// [`Error::InvalidAddress`], nothing written.
    pub(crate) fn encode(&self, dst: &mut BytesMut) -> Result<()> {
        match self {
            Open::Control => dst.put_u8(OPEN_CONTROL),
            Open::Dial(target) => {
                let n = name_len(target)?;
                dst.reserve(2 + target.len());
                dst.put_u8(OPEN_DIAL);
                dst.put_u8(n);
                dst.put_slice(target.as_bytes());
            }
        }
        Ok(())
    }

    /// Decodes the header at the front of `src`, which may be incomplete.
    pub(crate) fn decode(src: &[u8]) -> Result<Partial<Open>> {
        match src {
            [] | [OPEN_DIAL] => Ok(Partial::Need(1)),
            [OPEN_CONTROL, ..] => Ok(Partial::Done(Open::Control, 1)),
            [OPEN_DIAL, n, rest @ ..] => {
                let n = usize::from(*n);
                if rest.len() < n {
                    return Ok(Partial::Need(n - rest.len()));
                }
                let target = std::str::from_utf8(&rest[..n])
                    .map_err(|_| Error::Protocol("address is not UTF-8".into()))?;
                Ok(Partial::Done(Open::Dial(target.to_owned()), 2 + n))
            }
            [k, ..] => Err(Error::Protocol(format!("unknown stream kind {k}"))),
        }
    }
}

fn name_len(name: &str) -> Result<u8> {
    u8::try_from(name.len())
        .map_err(|_| Error::InvalidAddress(name.to_owned(), "must be at most 255 bytes"))
}

/// The acceptor's answer to a dial: one byte before any data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// A listener took the stream.
    Accepted,
    /// Nothing is bound to the target on the acceptor.
    NoSuchAddress,
    /// The listener is gone (unbound while the stream waited for it).
    Refused,
}

impl Status {
    pub(crate) fn encode(self) -> u8 {
        match self {
            Status::Accepted => STATUS_ACCEPTED,
            Status::NoSuchAddress => STATUS_NO_SUCH_ADDRESS,
            Status::Refused => STATUS_REFUSED,
        }
    }

    /// An unknown value is [`Error::Protocol`].
    pub(crate) fn decode(b: u8) -> Result<Status> {
        match b {
            STATUS_ACCEPTED => Ok(Status::Accepted),
            STATUS_NO_SUCH_ADDRESS => Ok(Status::NoSuchAddress),
            STATUS_REFUSED => Ok(Status::Refused),
            other => Err(Error::Protocol(format!("unknown open status {other}"))),
        }
    }
}

// ------------------------------------------------------------------ control stream

/// A message of the control stream: a frame whose body starts with a kind byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    /// Answer with PONG.
    Ping,
    /// The answer to a PING.
    Pong,
    /// Every service name the sender binds.
    Names(BTreeSet<String>),
    /// The sender used up its stream ids on this link: redial.
    Rotate,
    /// Names of the receiver's NAMES that the sender does not route to it (its
    /// identity may not announce them; see `mux/authz.rs`).
    Refused(BTreeSet<String>),
    /// A kind this version does not know (a newer peer's); ignored.
    Unknown(u8),
}

impl Control {
    /// Appends the message as one plain frame (control streams never compress). A
    /// name over [`MAX_NAME_LEN`] bytes ([`Error::InvalidAddress`]) or a message over
    /// [`CONTROL_LIMIT`] ([`Error::FrameTooLarge`]) writes nothing.
    pub(crate) fn encode(&self, dst: &mut BytesMut) -> Result<()> {
        let kind = match self {
            Control::Ping => CTL_PING,
            Control::Pong => CTL_PONG,
            Control::Rotate => CTL_ROTATE,
            Control::Unknown(k) => *k,
            Control::Names(names) | Control::Refused(names) => {
                let kind = match self {
                    Control::Names(_) => CTL_NAMES,
                    _ => CTL_REFUSED,
                };
                let mut len = 1;
                for name in names {
                    name_len(name)?;
                    len += 1 + name.len();
                }
                put_frame_header(dst, len, CONTROL_LIMIT)?;
                dst.put_u8(kind);
                for name in names {
                    dst.put_u8(name.len() as u8); // checked above
                    dst.put_slice(name.as_bytes());
                }
                return Ok(());
            }
        };
        put_frame_header(dst, 1, CONTROL_LIMIT)?;
        dst.put_u8(kind);
        Ok(())
    }

    /// Decodes a control frame's body. A NAMES body is `len u8, name` repeated; a
    /// truncated tail is ignored and names are read as lossy UTF-8. An empty body is
    /// [`Error::Protocol`].
    pub(crate) fn decode(mut body: Bytes) -> Result<Control> {
        if body.is_empty() {
            return Err(Error::Protocol("empty control message".into()));
        }
        Ok(match body.get_u8() {
            CTL_PING => Control::Ping,
            CTL_PONG => Control::Pong,
            CTL_ROTATE => Control::Rotate,
            CTL_NAMES => Control::Names(decode_names(body)),
            CTL_REFUSED => Control::Refused(decode_names(body)),
            other => Control::Unknown(other),
        })
    }
}

fn decode_names(mut b: Bytes) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    while b.has_remaining() {
        let n = usize::from(b.get_u8());
        if b.remaining() < n {
            break;
        }
        let name = b.split_to(n);
        names.insert(String::from_utf8_lossy(&name).into_owned());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::FrameCodec;
    use proptest::prelude::*;

    fn control_body(c: &Control) -> Bytes {
        let mut out = BytesMut::new();
        c.encode(&mut out).unwrap();
        // The frame is what the control stream's codec reads.
        let codec = FrameCodec::new().with_limit(CONTROL_LIMIT);
        let body = codec.decode(&mut out).unwrap().unwrap();
        assert!(out.is_empty());
        body
    }

    fn control() -> impl Strategy<Value = Control> {
        prop_oneof![
            Just(Control::Ping),
            Just(Control::Pong),
            Just(Control::Rotate),
            (6u8..).prop_map(Control::Unknown),
            proptest::collection::btree_set("[a-z0-9:]{0,40}|.{0,80}", 0..8)
                .prop_map(Control::Names),
            proptest::collection::btree_set("[a-z0-9:]{0,40}", 0..4).prop_map(Control::Refused),
        ]
    }

    proptest! {
        #[test]
        fn handshake_round_trips(node: u64, max_streams: u32) {
            let h = Handshake::new(node, max_streams);
            prop_assert_eq!(Handshake::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn handshake_of_another_version_is_a_mismatch(version: u16, node: u64) {
            prop_assume!(version != PROTOCOL_VERSION);
            let h = Handshake { version, node, max_streams: 1 };
            let err = Handshake::decode(&h.encode()).unwrap_err();
            let mismatch = matches!(
                err,
                Error::VersionMismatch { ours: PROTOCOL_VERSION, theirs } if theirs == version
            );
            prop_assert!(mismatch, "{}", err);
        }

        #[test]
        fn open_round_trips_in_any_split(target in ".{0,60}", control: bool, extra: Vec<u8>) {
            let open = if control || target.len() > MAX_NAME_LEN {
                Open::Control
            } else {
                Open::Dial(target)
            };
            let mut wire = BytesMut::new();
            open.encode(&mut wire).unwrap();
            let len = wire.len();
            wire.extend_from_slice(&extra);
            prop_assert_eq!(Open::decode(&wire).unwrap(), Partial::Done(open.clone(), len));
            // Read as `OpenReader` does: no more than it is asked for.
            let mut got = Vec::new();
            loop {
                match Open::decode(&got).unwrap() {
                    Partial::Need(n) => got.extend_from_slice(&wire[got.len()..got.len() + n]),
                    Partial::Done(o, n) => {
                        prop_assert_eq!((o, n), (open, len));
                        break;
                    }
                }
            }
            prop_assert_eq!(got.len(), len);
        }

        #[test]
        fn status_round_trips(b: u8) {
            match Status::decode(b) {
                Ok(s) => prop_assert_eq!(s.encode(), b),
                Err(e) => {
                    prop_assert!(b > 2);
                    prop_assert!(matches!(e, Error::Protocol(_)));
                }
            }
        }

        #[test]
        fn control_round_trips(c in control()) {
            prop_assert_eq!(Control::decode(control_body(&c)).unwrap(), c);
        }

        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            // Any result will do: only a panic fails.
            drop(Handshake::decode(&data));
            drop(Open::decode(&data));
            drop(Status::decode(data.first().copied().unwrap_or(0)));
            if let Ok(Control::Names(names)) = Control::decode(Bytes::from(data)) {
                // Lossy UTF-8: at most 3 bytes per byte received.
                prop_assert!(names.iter().all(|n| n.len() <= 3 * MAX_NAME_LEN));
            }
        }
    }

    /// The layouts of PROTOCOL.md, byte for byte.
    #[test]
    fn layouts() {
        let h = Handshake::new(0x0102_0304_0506_0708, 4096).encode();
        assert_eq!(&h[..8], b"CHANSERV");
        assert_eq!(&h[8..], &[2, 0, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0x10, 0, 0]);
        let mut b = BytesMut::new();
        Open::Dial("ab".into()).encode(&mut b).unwrap();
        Open::Control.encode(&mut b).unwrap();
        assert_eq!(&b[..], &[0, 2, b'a', b'b', 1]);
        let statuses = [Status::Accepted, Status::NoSuchAddress, Status::Refused];
        assert_eq!(statuses.map(Status::encode), [0, 1, 2]);
        let mut b = BytesMut::new();
        for c in [Control::Ping, Control::Pong, Control::Rotate] {
            c.encode(&mut b).unwrap();
        }
        let names = ["a", "bc"].map(String::from).into_iter().collect();
        Control::Names(names).encode(&mut b).unwrap();
        #[rustfmt::skip]
        let want = [
            1, 0, 0, 0, 2,
            1, 0, 0, 0, 3,
            1, 0, 0, 0, 4,
            6, 0, 0, 0, 1, 1, b'a', 2, b'b', b'c',
        ];
        assert_eq!(&b[..], &want);
    }

    #[test]
    fn bad_handshakes() {
        let mut h = Handshake::new(1, 1).encode();
        assert!(matches!(
            Handshake::decode(&h[..HANDSHAKE_LEN - 1]),
            Err(Error::Protocol(_))
        ));
        h[0] = b'X';
        let err = Handshake::decode(&h).unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ref m) if m.contains("magic")),
            "{err}"
        );
    }

    #[test]
    fn names_and_targets_over_255_bytes_are_refused_not_cut() {
        let long = "n".repeat(MAX_NAME_LEN + 1);
        let ok = "n".repeat(MAX_NAME_LEN);
        let mut b = BytesMut::new();
        let names = Control::Names([ok.clone(), long.clone()].into_iter().collect());
        assert!(matches!(
            names.encode(&mut b),
            Err(Error::InvalidAddress(..))
        ));
        assert!(Open::Dial(long).encode(&mut b).is_err());
        assert!(b.is_empty(), "nothing written on error");
        let names = Control::Names([ok.clone()].into_iter().collect());
        assert_eq!(Control::decode(control_body(&names)).unwrap(), names);
        Open::Dial(ok.clone()).encode(&mut b).unwrap();
        assert_eq!(
            Open::decode(&b).unwrap(),
            Partial::Done(Open::Dial(ok), 257)
        );
    }

    #[test]
    fn names_truncated_tail_is_ignored() {
        let names: BTreeSet<String> = ["a", "search:7"].map(String::from).into();
        let body = control_body(&Control::Names(names));
        let cut = body.slice(..body.len() - 1);
        let Control::Names(got) = Control::decode(cut).unwrap() else {
            panic!("not NAMES");
        };
        assert_eq!(got.into_iter().collect::<Vec<_>>(), ["a"]);
        assert!(Control::decode(Bytes::new()).is_err());
        assert_eq!(
            Control::decode(Bytes::from_static(&[9, 1])).unwrap(),
            Control::Unknown(9)
        );
    }
}
