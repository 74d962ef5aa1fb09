//! Feeds arbitrary bytes, in arbitrary splits, to the frame decoder: it must never
//! panic, never hand out more than the limit, and never grow the buffer it is given.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run decode -- -max_total_time=600` (see README).
#![no_main]

use bytes::BytesMut;
use chanserv::frame::{FrameCodec, Item};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let compress = split & 1 == 1;
    let codec = FrameCodec::new().with_limit(LIMIT).with_compression(compress);
    let step = usize::from(split).max(1);
    let mut buf = BytesMut::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        let cap = buf.capacity();
        loop {
            match codec.decode_item(&mut buf) {
                Ok(Some(Item::Frame(f))) => {
                    assert!(f.len() <= LIMIT);
                    // Whatever decodes must re-encode and decode to the same bytes.
                    let mut again = BytesMut::new();
                    codec.encode(&f, &mut again).unwrap();
                    assert_eq!(codec.decode(&mut again).unwrap().unwrap(), f);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= cap);
    }
    let _ = codec.check_eof(&buf);
});
