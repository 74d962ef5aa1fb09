//! The ROUTES control message (`PROTOCOL.md`, "Routing"): the path-vector entries a
//! node advertises to each linked peer. Pure encoding and decoding; the routing table
//! that makes and reads them is `mux/routing.rs`.

use std::collections::BTreeSet;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::put_frame_header;
use crate::error::Result;
use crate::proto::link::{CONTROL_LIMIT, MAX_NAME_LEN};

/// One advertised route: how the sender reaches a node, and what it knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RouteAd {
    /// The node ids along the way, the sender first and the destination last (a
    /// sender's entry for itself is just its own id). At most 255 ids.
    pub(crate) path: Vec<u64>,
    /// The destination's environment (`""` by default); at most 255 bytes.
    pub(crate) env: String,
    /// The service names the destination binds; each at most 255 bytes.
    pub(crate) names: BTreeSet<String>,
}

/// Appends a whole ROUTES frame (kind byte `kind`). Entries that cannot be expressed
/// (an empty path or one over 255 ids, an environment or a name over 255 bytes) are
/// left out: nodes never make them. A message over the control limit writes nothing
/// and is [`Error::FrameTooLarge`](crate::Error::FrameTooLarge).
pub(crate) fn encode_routes(ads: &[RouteAd], kind: u8, dst: &mut BytesMut) -> Result<()> {
    let fits = |ad: &&RouteAd| {
        (1..=255).contains(&ad.path.len())
            && ad.env.len() <= MAX_NAME_LEN
            && ad.names.len() <= usize::from(u16::MAX)
            && ad.names.iter().all(|n| n.len() <= MAX_NAME_LEN)
    };
    let ads: Vec<&RouteAd> = ads
        .iter()
        .filter(fits)
        .take(usize::from(u16::MAX))
        .collect();
    let mut len = 1 + 2;
    for ad in &ads {
        len += 1 + 8 * ad.path.len() + 1 + ad.env.len() + 2;
        len += ad.names.iter().map(|n| 1 + n.len()).sum::<usize>();
    }
    put_frame_header(dst, len, CONTROL_LIMIT)?;
    dst.put_u8(kind);
    dst.put_u16_le(ads.len() as u16); // at most u16::MAX, taken above
    for ad in ads {
        dst.put_u8(ad.path.len() as u8); // checked by `fits`
        for id in &ad.path {
            dst.put_u64_le(*id);
        }
        dst.put_u8(ad.env.len() as u8);
        dst.put_slice(ad.env.as_bytes());
        dst.put_u16_le(ad.names.len() as u16);
        for name in &ad.names {
            dst.put_u8(name.len() as u8);
            dst.put_slice(name.as_bytes());
        }
    }
    Ok(())
}

/// Decodes a ROUTES body (after its kind byte). A truncated tail is ignored (the
/// entries before it are kept), strings are read as lossy UTF-8, and nothing is
/// allocated beyond what the bytes hold.
pub(crate) fn decode_routes(mut b: Bytes) -> Vec<RouteAd> {
    let mut ads = Vec::new();
    if b.remaining() < 2 {
        return ads;
    }
    let count = b.get_u16_le();
    for _ in 0..count {
        match decode_one(&mut b) {
            Some(ad) => ads.push(ad),
            None => break,
        }
    }
    ads
}

fn decode_one(b: &mut Bytes) -> Option<RouteAd> {
    let hops = usize::from(take_u8(b)?);
    if hops == 0 || b.remaining() < 8 * hops {
        return None;
    }
    let path = (0..hops).map(|_| b.get_u64_le()).collect();
    let env = take_str(b)?;
    if b.remaining() < 2 {
        return None;
    }
    let count = b.get_u16_le();
    let mut names = BTreeSet::new();
    for _ in 0..count {
        names.insert(take_str(b)?);
    }
    Some(RouteAd { path, env, names })
}

fn take_u8(b: &mut Bytes) -> Option<u8> {
    b.has_remaining().then(|| b.get_u8())
}

fn take_str(b: &mut Bytes) -> Option<String> {
    let n = usize::from(take_u8(b)?);
    if b.remaining() < n {
        return None;
    }
    Some(String::from_utf8_lossy(&b.split_to(n)).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::FrameCodec;
    use proptest::prelude::*;

    fn ad() -> impl Strategy<Value = RouteAd> {
        (
            proptest::collection::vec(any::<u64>(), 1..6),
            "[a-z]{0,8}",
            proptest::collection::btree_set("[a-z0-9:]{1,20}", 0..5),
        )
            .prop_map(|(path, env, names)| RouteAd { path, env, names })
    }

    fn body(ads: &[RouteAd]) -> Bytes {
        let mut out = BytesMut::new();
        encode_routes(ads, 6, &mut out).unwrap();
        let mut body = FrameCodec::new()
            .with_limit(CONTROL_LIMIT)
            .decode(&mut out)
            .unwrap()
            .unwrap();
        assert_eq!(body.get_u8(), 6);
        body
    }

    proptest! {
        #[test]
        fn routes_round_trip(ads in proptest::collection::vec(ad(), 0..6)) {
            prop_assert_eq!(decode_routes(body(&ads)), ads);
        }

        #[test]
        fn a_truncated_tail_keeps_the_entries_before_it(
            ads in proptest::collection::vec(ad(), 1..6),
            cut in 1usize..40,
        ) {
            let b = body(&ads);
            let short = b.slice(..b.len().saturating_sub(cut));
            let got = decode_routes(short);
            prop_assert!(got.len() < ads.len());
            prop_assert_eq!(&ads[..got.len()], &got[..]);
        }

        #[test]
        fn the_decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let ads = decode_routes(Bytes::from(data));
            prop_assert!(ads.iter().all(|a| !a.path.is_empty()));
        }
    }

    /// The layout of PROTOCOL.md, byte for byte.
    #[test]
    fn layout() {
        let ad = RouteAd {
            path: vec![1, 2],
            env: "e".into(),
            names: ["ab".to_string()].into_iter().collect(),
        };
        #[rustfmt::skip]
        let want = [
            6, 1, 0,                    // kind ROUTES, one entry
            2,                          // two hops
            1, 0, 0, 0, 0, 0, 0, 0,
            2, 0, 0, 0, 0, 0, 0, 0,
            1, b'e',                    // environment
            1, 0, 2, b'a', b'b',        // one name
        ];
        let mut out = BytesMut::new();
        encode_routes(&[ad], 6, &mut out).unwrap();
        assert_eq!(&out[4..], &want);
        assert_eq!(&out[..4], &(want.len() as u32).to_le_bytes());
    }
}
