//! The chanserv messages of the master and child streams (`PROTOCOL.md`, "chanserv").
//! Pure encoding and decoding; both sides use it, neither owns it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::source::RequestTag;

pub(crate) const MSG_ACCEPT: u8 = 1;
pub(crate) const MSG_ANNOUNCE: u8 = 2;
pub(crate) const MSG_INLINE: u8 = 3;
pub(crate) const MSG_END: u8 = 4;
pub(crate) const MSG_ERROR: u8 = 5;

/// Bytes that open a child stream: request id and source id.
pub(crate) const CHILD_PREFIX_LEN: usize = 12;

const TAG_META: u8 = 0;
const TAG_BUCKET: u8 = 1;

/// The request, as sent on the master stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestMsg {
    pub id: u64,
    pub reply: String,
    pub tags: Vec<RequestTag>,
    pub body: Bytes,
}

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

impl RequestMsg {
    pub fn encode(&self) -> Result<BytesMut> {
        let mut m = BytesMut::with_capacity(32 + self.reply.len() + self.body.len());
        m.put_u64_le(self.id);
        let reply_len = u8::try_from(self.reply.len())
            .map_err(|_| Error::Protocol("reply address too long".into()))?;
        m.put_u8(reply_len);
        m.put_slice(self.reply.as_bytes());
        let ntags = u16::try_from(self.tags.len())
            .map_err(|_| Error::Protocol("more than 65535 tags".into()))?;
        m.put_u16_le(ntags);
        for t in &self.tags {
            let (kind, v) = match t {
                RequestTag::Meta(v) => (TAG_META, v),
                RequestTag::Bucket(v) => (TAG_BUCKET, v),
            };
            let len = u16::try_from(v.len())
                .map_err(|_| Error::Protocol("tag longer than 64 KiB".into()))?;
            m.put_u8(kind);
            m.put_u16_le(len);
            m.put_slice(v.as_bytes());
        }
        m.put_slice(&self.body);
        Ok(m)
    }

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
                k => return Err(Error::Protocol(format!("unknown tag kind {k}"))),
            });
        }
        Ok(RequestMsg {
            id,
            reply,
            tags,
            body: b,
        })
    }
}

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
}

impl MasterMsg {
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
            k @ (MSG_ACCEPT | MSG_ANNOUNCE | MSG_INLINE) => short(&format!("master message {k}")),
            k => Err(Error::Protocol(format!("unknown master message {k}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_round_trips(id: u64, reply in "[a-f0-9:]{0,40}", metas in proptest::collection::vec(".{0,20}", 0..4), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut tags: Vec<RequestTag> = metas.into_iter().map(RequestTag::Meta).collect();
            tags.push(RequestTag::Bucket("b".into()));
            let m = RequestMsg { id, reply, tags, body: body.into() };
            prop_assert_eq!(RequestMsg::decode(m.encode().unwrap().freeze()).unwrap(), m);
        }

        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = RequestMsg::decode(Bytes::from(data.clone()));
            let _ = MasterMsg::decode(Bytes::from(data));
        }
    }
}
