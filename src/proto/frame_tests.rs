//! Unit tests of `frame.rs`.

use super::*;
use proptest::prelude::*;

fn encode_all(codec: &FrameCodec, payloads: &[Vec<u8>]) -> BytesMut {
    let mut buf = BytesMut::new();
    for p in payloads {
        codec.encode(p, &mut buf).unwrap();
    }
    buf
}

fn header(word: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32_le(word);
    b
}

fn payload_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..2048),
        // Compressible: runs of a few symbols.
        2 => (1usize..300_000, any::<u8>()).prop_map(|(n, b)| {
            (0..n).map(|i| b.wrapping_add((i / 97 % 3) as u8)).collect()
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..(3 << 20)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn round_trips_in_any_split(
        payloads in proptest::collection::vec(payload_strategy(), 0..8),
        compress: bool,
        splits in proptest::collection::vec(1usize..70_000, 1..64),
    ) {
        let codec = FrameCodec::new().with_compression(compress);
        let wire = encode_all(&codec, &payloads).freeze();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let (mut at, mut i) = (0, 0);
        while at < wire.len() {
            let step = splits[i % splits.len()].min(wire.len() - at);
            i += 1;
            buf.extend_from_slice(&wire[at..at + step]);
            at += step;
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f.to_vec());
            }
        }
        codec.check_eof(&buf).unwrap();
        prop_assert_eq!(out, payloads);
    }

    #[test]
    fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let codec = FrameCodec::new().with_limit(1 << 20);
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = codec.decode_item(&mut buf) {}
    }
}

#[test]
fn payload_starting_with_go_magic_round_trips() {
    for compress in [false, true] {
        let codec = FrameCodec::new().with_compression(compress);
        let mut p = b"lz4!".to_vec();
        p.extend_from_slice(&[b'x'; 4096]);
        let mut buf = encode_all(&codec, &[p.clone(), b"lz4!".to_vec()]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), p);
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"lz4!");
    }
}

#[test]
fn compression_only_when_smaller() {
    let codec = FrameCodec::new().with_compression(true);
    let zeros = vec![0u8; 64 * 1024];
    let buf = encode_all(&codec, &[zeros]);
    assert!(buf.len() < 1024, "compressible frame was not compressed");
    assert_ne!(buf[3] & 0x80, 0);
    // Incompressible data is sent plain, so it costs exactly the 4-byte header.
    let noise = super::super::adaptive::noise(64 * 1024, 0x9E37_79B9_7F4A_7C15);
    let buf = encode_all(&codec, std::slice::from_ref(&noise));
    assert_eq!(buf.len(), noise.len() + 4);
    assert_eq!(buf[3] & 0x80, 0);
    // Small frames are never compressed.
    let buf = encode_all(&codec, &[vec![0u8; COMPRESSION_THRESHOLD - 1]]);
    assert_eq!(buf[3] & 0x80, 0);
}

#[test]
fn encode_split_hands_back_large_plain_payloads() {
    let codec = FrameCodec::new();
    let big = Bytes::from(vec![7u8; SPLIT_PAYLOAD_SIZE]);
    let mut dst = BytesMut::new();
    let rest = codec.encode_split(big.clone(), &mut dst).unwrap().unwrap();
    assert_eq!(dst.len(), 4);
    assert_eq!(rest.as_ptr(), big.as_ptr(), "payload was copied");
    dst.extend_from_slice(&rest);
    assert_eq!(codec.decode(&mut dst).unwrap().unwrap(), big);
    let small = Bytes::from_static(b"abc");
    assert!(codec.encode_split(small, &mut dst).unwrap().is_none());
}

#[test]
fn over_limit_length_is_rejected_before_allocation() {
    let codec = FrameCodec::new().with_limit(1024);
    let mut buf = header(1025);
    buf.extend_from_slice(&[0; 16]);
    let cap = buf.capacity();
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            Error::FrameTooLarge {
                size: 1025,
                limit: 1024
            }
        ),
        "{err}"
    );
    assert_eq!(buf.capacity(), cap);
    assert!(codec.encode(&[0; 1025], &mut BytesMut::new()).is_err());
}

#[test]
fn max_claimed_length_reserves_nothing() {
    // A peer claims 2^31-1 bytes with the default limit... rejected; with a limit that
    // allows it, the decoder waits without reserving.
    let codec = FrameCodec::new().with_limit(MAX_FRAME_SIZE_LIMIT);
    let mut buf = header(LEN_MASK);
    buf.extend_from_slice(b"only a few bytes");
    let cap = buf.capacity();
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert_eq!(buf.capacity(), cap);
    assert!(matches!(
        codec.check_eof(&buf),
        Err(Error::Truncated { .. })
    ));
}

#[test]
fn uncompressed_length_over_limit() {
    let codec = FrameCodec::new().with_limit(1 << 20);
    let mut buf = header(FLAG_LZ4 | 8);
    buf.put_u32_le((1 << 20) + 1);
    buf.put_u32_le(0);
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(err, Error::WrongUncompressedSize(_)), "{err}");
}

#[test]
fn lying_uncompressed_length_allocates_nothing_large() {
    let codec = FrameCodec::new();
    // 10 bytes of block cannot expand to 50 MiB: refused before allocating.
    let mut buf = header(FLAG_LZ4 | 14);
    buf.put_u32_le(50 << 20);
    buf.extend_from_slice(&[0x1f; 10]);
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(err, Error::WrongUncompressedSize(_)), "{err}");
    // A plausible but wrong length: the block decompresses to fewer bytes.
    let real = lz4_flex::block::compress(&[5u8; 1000]);
    let mut buf = header(FLAG_LZ4 | (real.len() as u32 + 4));
    buf.put_u32_le(1001);
    buf.extend_from_slice(&real);
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, Error::WrongUncompressedSize(_) | Error::Corrupt(_)),
        "{err}"
    );
}

#[test]
fn corrupt_block() {
    let codec = FrameCodec::new();
    let mut buf = header(FLAG_LZ4 | 12);
    buf.put_u32_le(100);
    buf.extend_from_slice(&[0xff; 8]);
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
}

#[test]
fn truncated_at_eof() {
    let mut codec = FrameCodec::new();
    let mut buf = encode_all(&codec, &[vec![1; 100]]);
    buf.truncate(60);
    assert!(Decoder::decode(&mut codec, &mut buf).unwrap().is_none());
    let err = codec.decode_eof(&mut buf).unwrap_err();
    assert!(matches!(err, Error::Truncated { missing: 44 }), "{err}");
    let mut half_header = BytesMut::from(&[1u8, 0][..]);
    assert!(matches!(
        codec.decode_eof(&mut half_header),
        Err(Error::Truncated { missing: 2 })
    ));
}

#[test]
fn stream_markers() {
    let codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    codec.encode(b"x", &mut buf).unwrap();
    FrameCodec::encode_abort("boom", &mut buf);
    FrameCodec::encode_end(&mut buf);
    assert_eq!(
        codec.decode_item(&mut buf).unwrap(),
        Some(Item::Frame(Bytes::from_static(b"x")))
    );
    assert_eq!(
        codec.decode_item(&mut buf).unwrap(),
        Some(Item::Abort("boom".into()))
    );
    assert_eq!(codec.decode_item(&mut buf).unwrap(), Some(Item::End));
    let mut buf = BytesMut::new();
    FrameCodec::encode_end(&mut buf);
    assert!(matches!(codec.decode(&mut buf), Err(Error::Protocol(_))));
    // Compressed headers too short for their uncompressed length are errors.
    let mut buf = header(FLAG_LZ4 | 3);
    assert!(matches!(codec.decode(&mut buf), Err(Error::Protocol(_))));
}

#[test]
#[should_panic(expected = "above the wire format")]
fn limit_above_31_bits_is_rejected() {
    let _ = FrameCodec::new().with_limit(MAX_FRAME_SIZE_LIMIT + 1);
}
