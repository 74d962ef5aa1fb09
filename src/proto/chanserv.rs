//! The chanserv messages of the master and child streams (`PROTOCOL.md`, "chanserv"):
//! the request, the server's messages on the master, the prefix of a child stream.
//! Pure encoding and decoding; both sides use it, neither owns it. A child stream's
//! frames and its END/ABORT words, like an upload's, are the frame codec's
//! ([`super::frame`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::put_frame_header;
use crate::error::{Error, Result};
use crate::source::RequestTag;

const MSG_ACCEPT: u8 = 1;
const MSG_ANNOUNCE: u8 = 2;
const MSG_INLINE: u8 = 3;
const MSG_END: u8 = 4;
const MSG_ERROR: u8 = 5;
const MSG_UPLOAD_STOP: u8 = 6;

const TAG_META: u8 = 0;
const TAG_BUCKET: u8 = 1;
/// An upload follows the request on the master; its value is empty.
const TAG_UPLOAD: u8 = 2;

/// Master messages have no limit of their own on the sending side: the most a frame
/// header can say. (The client applies its frame size limit when it reads them.)
const NO_LIMIT: usize = usize::MAX;

fn short<T>(what: &str) -> Result<T> {
    Err(Error::Protocol(format!("truncated {what}")))
}

fn get_str(b: &mut Bytes, len: usize, what: &str) -> Result<String> {
    if b.remaining() < len {
        return short(what);
    }
    String::from_utf8(b.split_to(len).to_vec())
        .map_err(|_| Error::Protocol(format!("{what} is not UTF-8")))
}

// ------------------------------------------------------------------ request

/// The request, as sent on the master stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestMsg {
    pub id: u64,
    pub reply: String,
    pub tags: Vec<RequestTag>,
    /// An upload follows the request frame (sent as an UPLOAD tag, after `tags`).
    pub upload: bool,
    pub body: Bytes,
}

impl RequestMsg {
    /// Appends the request as one plain frame. A reply address over 255 bytes, more
    /// than 65,535 tags or a tag over 64 KiB is [`Error::Misuse`], a request over
    /// `limit` (the sender's frame size limit) [`Error::FrameTooLarge`]; either way
    /// nothing is written.
    pub fn encode(&self, limit: usize, dst: &mut BytesMut) -> Result<()> {
        let reply_len = u8::try_from(self.reply.len())
            .map_err(|_| Error::Misuse("reply address over 255 bytes"))?;
        let ntags = u16::try_from(self.tags.len() + usize::from(self.upload))
            .map_err(|_| Error::Misuse("more than 65,535 tags"))?;
        let mut len = 8 + 1 + self.reply.len() + 2 + self.body.len() + 3 * usize::from(self.upload);
        for t in &self.tags {
            let v = tag_value(t);
            u16::try_from(v.len()).map_err(|_| Error::Misuse("a tag over 64 KiB"))?;
            len += 3 + v.len();
        }
        put_frame_header(dst, len, limit)?;
        dst.put_u64_le(self.id);
        dst.put_u8(reply_len);
        dst.put_slice(self.reply.as_bytes());
        dst.put_u16_le(ntags);
        for t in &self.tags {
            let kind = match t {
                RequestTag::Meta(_) => TAG_META,
                RequestTag::Bucket(_) => TAG_BUCKET,
            };
            let v = tag_value(t);
            dst.put_u8(kind);
            dst.put_u16_le(v.len() as u16); // checked above
            dst.put_slice(v.as_bytes());
        }
        if self.upload {
            dst.put_u8(TAG_UPLOAD);
            dst.put_u16_le(0);
        }
        dst.put_slice(&self.body);
        Ok(())
    }

    /// Decodes a request frame's body.
    pub fn decode(mut b: Bytes) -> Result<Self> {
        if b.remaining() < 9 {
            return short("request");
        }
        let id = b.get_u64_le();
        let n = b.get_u8() as usize;
        let reply = get_str(&mut b, n, "reply address")?;
        if b.remaining() < 2 {
            return short("request tags");
        }
        let ntags = b.get_u16_le();
        let mut tags = Vec::with_capacity(usize::from(ntags).min(b.remaining() / 3));
        let mut upload = false;
        for _ in 0..ntags {
            if b.remaining() < 3 {
                return short("request tag");
            }
            let kind = b.get_u8();
            let len = b.get_u16_le() as usize;
            let v = get_str(&mut b, len, "tag")?;
            tags.push(match kind {
                TAG_META => RequestTag::Meta(v),
                TAG_BUCKET => RequestTag::Bucket(v),
                // Its value says nothing (empty when we send it).
                TAG_UPLOAD => {
                    upload = true;
                    continue;
                }
                k => return Err(Error::Protocol(format!("unknown tag kind {k}"))),
            });
        }
        Ok(RequestMsg {
            id,
            reply,
            tags,
            upload,
            body: b,
        })
    }
}

fn tag_value(t: &RequestTag) -> &str {
    match t {
        RequestTag::Meta(v) | RequestTag::Bucket(v) => v,
    }
}

// ------------------------------------------------------------------ master

/// A message from the server on the master stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MasterMsg {
    Accept {
        node: u64,
    },
    Announce {
        id: u32,
        header: Bytes,
    },
    Inline {
        id: u32,
        header: Bytes,
        frames: Vec<Bytes>,
    },
    End,
    Error(String),
    UploadStop,
}

/// The encoders take borrowed parts, so the server writes a source's header and
/// frames straight into its write buffer; [`MasterMsg::encode`] is built on them.
/// Each appends one complete plain frame (length header, kind, body); one whose body
/// would not fit a frame header is [`Error::FrameTooLarge`] and writes nothing.
impl MasterMsg {
    /// Appends the message as one plain frame.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<()> {
        match self {
            MasterMsg::Accept { node } => {
                Self::encode_accept(*node, dst);
                Ok(())
            }
            MasterMsg::Announce { id, header } => Self::encode_announce(*id, header, dst),
            MasterMsg::Inline { id, header, frames } => {
                Self::encode_inline(*id, header, frames, dst)
            }
            MasterMsg::End => {
                Self::encode_end(dst);
                Ok(())
            }
            MasterMsg::Error(reason) => Self::encode_error(reason, dst),
            MasterMsg::UploadStop => {
                Self::encode_upload_stop(dst);
                Ok(())
            }
        }
    }

    /// ACCEPT: the server's node id.
    pub fn encode_accept(node: u64, dst: &mut BytesMut) {
        put_frame_header(dst, 1 + 8, NO_LIMIT).expect("9 bytes fit");
        dst.put_u8(MSG_ACCEPT);
        dst.put_u64_le(node);
    }

    /// ANNOUNCE: a source whose frames come on a child stream.
    pub fn encode_announce(id: u32, header: &[u8], dst: &mut BytesMut) -> Result<()> {
        put_frame_header(dst, 1 + 4 + header.len(), NO_LIMIT)?;
        dst.put_u8(MSG_ANNOUNCE);
        dst.put_u32_le(id);
        dst.put_slice(header);
        Ok(())
    }

    /// INLINE: a complete source, its header and every frame.
    pub fn encode_inline<I>(id: u32, header: &[u8], frames: I, dst: &mut BytesMut) -> Result<()>
    where
        I: IntoIterator + Clone,
        I::Item: AsRef<[u8]>,
    {
        let mut len = 1 + 4 + 4 + header.len();
        for f in frames.clone() {
            len = len.saturating_add(4 + f.as_ref().len());
        }
        put_frame_header(dst, len, NO_LIMIT)?;
        dst.put_u8(MSG_INLINE);
        dst.put_u32_le(id);
        dst.put_u32_le(header.len() as u32); // fits: the whole body does
        dst.put_slice(header);
        for f in frames {
            let f = f.as_ref();
            dst.put_u32_le(f.len() as u32);
            dst.put_slice(f);
        }
        Ok(())
    }

    /// END: every source was announced.
    pub fn encode_end(dst: &mut BytesMut) {
        put_frame_header(dst, 1, NO_LIMIT).expect("1 byte fits");
        dst.put_u8(MSG_END);
    }

    /// ERROR: the request failed, and why.
    pub fn encode_error(reason: &str, dst: &mut BytesMut) -> Result<()> {
        put_frame_header(dst, 1 + reason.len(), NO_LIMIT)?;
        dst.put_u8(MSG_ERROR);
        dst.put_slice(reason.as_bytes());
        Ok(())
    }

    /// UPLOAD_STOP: the service does not read the request's upload (any more); the
    /// server discards what comes until the upload's END or ABORT.
    pub fn encode_upload_stop(dst: &mut BytesMut) {
        put_frame_header(dst, 1, NO_LIMIT).expect("1 byte fits");
        dst.put_u8(MSG_UPLOAD_STOP);
    }

    /// Decodes a master frame's body. An ERROR's reason is read as lossy UTF-8.
    pub fn decode(mut b: Bytes) -> Result<Self> {
        if b.is_empty() {
            return short("master message");
        }
        match b.get_u8() {
            MSG_ACCEPT if b.remaining() >= 8 => Ok(MasterMsg::Accept {
                node: b.get_u64_le(),
            }),
            MSG_ANNOUNCE if b.remaining() >= 4 => Ok(MasterMsg::Announce {
                id: b.get_u32_le(),
                header: b,
            }),
            MSG_INLINE if b.remaining() >= 8 => {
                let id = b.get_u32_le();
                let hlen = b.get_u32_le() as usize;
                if b.remaining() < hlen {
                    return short("inline header");
                }
                let header = b.split_to(hlen);
                let mut frames = Vec::new();
                while b.has_remaining() {
                    if b.remaining() < 4 {
                        return short("inline frame");
                    }
                    let n = b.get_u32_le() as usize;
                    if b.remaining() < n {
                        return short("inline frame");
                    }
                    frames.push(b.split_to(n));
                }
                Ok(MasterMsg::Inline { id, header, frames })
            }
            MSG_END => Ok(MasterMsg::End),
            MSG_ERROR => Ok(MasterMsg::Error(String::from_utf8_lossy(&b).into_owned())),
            MSG_UPLOAD_STOP => Ok(MasterMsg::UploadStop),
            k @ (MSG_ACCEPT | MSG_ANNOUNCE | MSG_INLINE) => short(&format!("master message {k}")),
            k => Err(Error::Protocol(format!("unknown master message {k}"))),
        }
    }
}

// ------------------------------------------------------------------ child stream

/// What opens a child stream, before its frames: which request and which of its
/// sources the stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ChildPrefix {
    pub request: u64,
    pub source: u32,
}

impl ChildPrefix {
    /// Bytes of the prefix.
    pub const LEN: usize = 12;

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(Self::LEN);
        dst.put_u64_le(self.request);
        dst.put_u32_le(self.source);
    }

    /// Decodes the first [`LEN`](Self::LEN) bytes of `src`.
    pub fn decode(src: &[u8]) -> Result<Self> {
        let Some(mut b) = src.get(..Self::LEN) else {
            return short("child stream prefix");
        };
        Ok(ChildPrefix {
            request: b.get_u64_le(),
            source: b.get_u32_le(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::FrameCodec;
    use proptest::prelude::*;

    /// The frame's body, read back with the codec the receiver uses.
    fn frame_body(mut wire: BytesMut) -> Bytes {
        let body = FrameCodec::new().decode(&mut wire).unwrap().unwrap();
        assert!(wire.is_empty(), "one frame");
        body
    }

    fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn master() -> impl Strategy<Value = MasterMsg> {
        prop_oneof![
            any::<u64>().prop_map(|node| MasterMsg::Accept { node }),
            (any::<u32>(), bytes(64)).prop_map(|(id, header)| MasterMsg::Announce { id, header }),
            (
                any::<u32>(),
                bytes(64),
                proptest::collection::vec(bytes(64), 0..6)
            )
                .prop_map(|(id, header, frames)| MasterMsg::Inline {
                    id,
                    header,
                    frames
                }),
            Just(MasterMsg::End),
            ".{0,40}".prop_map(MasterMsg::Error),
            Just(MasterMsg::UploadStop),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trips(
            id: u64,
            reply in "[a-f0-9:]{0,40}",
            metas in proptest::collection::vec(".{0,20}", 0..4),
            upload: bool,
            body in bytes(256),
        ) {
            let mut tags: Vec<RequestTag> = metas.into_iter().map(RequestTag::Meta).collect();
            tags.push(RequestTag::Bucket("b".into()));
            let m = RequestMsg { id, reply, tags, upload, body };
            let mut wire = BytesMut::new();
            m.encode(NO_LIMIT, &mut wire).unwrap();
            prop_assert_eq!(RequestMsg::decode(frame_body(wire)).unwrap(), m);
        }

        #[test]
        fn master_round_trips(m in master()) {
            let mut wire = BytesMut::new();
            m.encode(&mut wire).unwrap();
            prop_assert_eq!(MasterMsg::decode(frame_body(wire)).unwrap(), m);
        }

        #[test]
        fn child_prefix_round_trips(request: u64, source: u32, extra in bytes(8)) {
            let p = ChildPrefix { request, source };
            let mut wire = BytesMut::new();
            p.encode(&mut wire);
            prop_assert_eq!(wire.len(), ChildPrefix::LEN);
            wire.extend_from_slice(&extra);
            prop_assert_eq!(ChildPrefix::decode(&wire).unwrap(), p);
        }

        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            // Any result will do: only a panic fails.
            drop(RequestMsg::decode(Bytes::from(data.clone())));
            drop(MasterMsg::decode(Bytes::from(data.clone())));
            drop(ChildPrefix::decode(&data));
        }
    }

    /// The layouts of PROTOCOL.md, byte for byte (what the server wrote by hand
    /// before these encoders existed).
    #[test]
    fn layouts() {
        let mut b = BytesMut::new();
        MasterMsg::encode_accept(0x0807_0605_0403_0201, &mut b);
        MasterMsg::encode_announce(7, b"hd", &mut b).unwrap();
        MasterMsg::encode_inline(9, b"h", [&b""[..], b"xy"], &mut b).unwrap();
        MasterMsg::encode_end(&mut b);
        MasterMsg::encode_error("no", &mut b).unwrap();
        MasterMsg::encode_upload_stop(&mut b);
        ChildPrefix {
            request: 5,
            source: 6,
        }
        .encode(&mut b);
        #[rustfmt::skip]
        let want: &[u8] = &[
            9, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8,
            7, 0, 0, 0, 2, 7, 0, 0, 0, b'h', b'd',
            20, 0, 0, 0, 3, 9, 0, 0, 0, 1, 0, 0, 0, b'h', 0, 0, 0, 0, 2, 0, 0, 0, b'x', b'y',
            1, 0, 0, 0, 4,
            3, 0, 0, 0, 5, b'n', b'o',
            1, 0, 0, 0, 6,
            5, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0,
        ];
        assert_eq!(&b[..], want);
        let req = RequestMsg {
            id: 1,
            reply: "r".into(),
            tags: vec![RequestTag::Bucket("k".into())],
            upload: false,
            body: Bytes::from_static(b"B"),
        };
        let mut b = BytesMut::new();
        req.encode(NO_LIMIT, &mut b).unwrap();
        #[rustfmt::skip]
        let want: &[u8] = &[
            17, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0, 1, b'r', 1, 0, 1, 1, 0, b'k', b'B',
        ];
        assert_eq!(&b[..], want);
        // With an upload: one more tag, kind 2, empty, after the others.
        let mut b = BytesMut::new();
        RequestMsg {
            upload: true,
            ..req
        }
        .encode(NO_LIMIT, &mut b)
        .unwrap();
        #[rustfmt::skip]
        let want: &[u8] = &[
            20, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0, 1, b'r', 2, 0, 1, 1, 0, b'k', 2, 0, 0, b'B',
        ];
        assert_eq!(&b[..], want);
    }

    #[test]
    fn request_over_the_limit_writes_nothing() {
        let req = RequestMsg {
            id: 1,
            reply: String::new(),
            tags: vec![],
            upload: false,
            body: Bytes::from(vec![0; 100]),
        };
        let mut b = BytesMut::new();
        let err = req.encode(100, &mut b).unwrap_err();
        assert!(
            matches!(
                err,
                Error::FrameTooLarge {
                    size: 111,
                    limit: 100
                }
            ),
            "{err}"
        );
        let long = RequestMsg {
            reply: "r".repeat(256),
            ..req
        };
        assert!(matches!(
            long.encode(NO_LIMIT, &mut b),
            Err(Error::Misuse(_))
        ));
        assert!(b.is_empty());
    }
}
