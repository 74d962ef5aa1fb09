//! When to compress: LZ4 per frame only while it pays, for one stream of frames.
//!
//! A compressed frame and a plain one are told apart by their header alone (`PROTOCOL.md`,
//! "Frames"), so a sender may choose per frame and the receiver never knows: this file
//! owns that choice for one source and nothing else (the bytes are [`FrameCodec`]'s).
//!
//! Failing to compress costs nearly as much as compressing, so a source of
//! incompressible frames (already compressed, encrypted, random) would pay a whole LZ4
//! pass per frame for nothing. [`AdaptiveEncoder`] stops trying after a frame that does
//! not shrink by a tenth and sends the next [`MIN_WAIT`] bytes plain; each further
//! failure doubles the wait (up to [`MAX_WAIT`]), each success halves it. A large frame
//! tried after a failure is judged first by compressing its first [`SAMPLE_LEN`] bytes,
//! so a probe costs a fraction of the frame. No clocks: the waits count payload bytes.

use bytes::{Bytes, BytesMut};

use super::frame::{FrameCodec, COMPRESSION_THRESHOLD, HEADER_LEN};
use super::lz4;
use crate::error::Result;

/// Bytes at the start of a large frame compressed to decide whether the rest is worth it.
pub(crate) const SAMPLE_LEN: usize = 64 * 1024;

/// Payload bytes sent plain after the first frame that did not pay.
pub(crate) const MIN_WAIT: u64 = 256 * 1024;

/// Most payload bytes sent plain between two tries.
pub(crate) const MAX_WAIT: u64 = 16 * 1024 * 1024;

/// A frame encoder for one stream that compresses only while compression pays.
///
/// With compression off in its codec it is that codec's
/// [`encode_split`](FrameCodec::encode_split), unchanged.
#[derive(Debug, Clone)]
pub(crate) struct AdaptiveEncoder {
    codec: FrameCodec,
    /// Payload bytes still to send plain before the next try; a frame is tried (sampled
    /// or compressed whole) exactly when this is 0.
    skip: u64,
    /// What `skip` becomes at the next failure.
    wait: u64,
    /// The last try paid: compress the next frame whole, with no sample first.
    trusted: bool,
    /// The last frame compressed [`lz4::LONG_RUNS`] times or better: the next one
    /// goes through the long-run codec.
    long_runs: bool,
}

impl AdaptiveEncoder {
    /// An encoder with no history: its first large frame is sampled.
    pub(crate) fn new(codec: FrameCodec) -> Self {
        AdaptiveEncoder {
            codec,
            skip: 0,
            wait: MIN_WAIT,
            trusted: false,
            long_runs: false,
        }
    }

    /// Appends one frame to `dst` like [`FrameCodec::encode_split`]: `Some(payload)` is
    /// a large plain payload to write right after `dst`, not copied.
    pub(crate) fn encode_split(
        &mut self,
        payload: Bytes,
        dst: &mut BytesMut,
    ) -> Result<Option<Bytes>> {
        let len = payload.len();
        if !self.codec.compression() || len < COMPRESSION_THRESHOLD {
            return self.codec.encode_plain(payload, dst);
        }
        self.codec.check_len(len)?;
        if self.skip > 0 {
            self.skip = self.skip.saturating_sub(len as u64);
            return self.codec.encode_plain(payload, dst);
        }
        if !self.trusted && len >= 2 * SAMPLE_LEN {
            // Compressed no further than it would still pay.
            let mut sample = BytesMut::new();
            let bound = SAMPLE_LEN / 10 * 9;
            let sampled = lz4::compress(&payload[..SAMPLE_LEN], &mut sample, bound, false);
            if sampled.is_none() {
                self.failed();
                return self.codec.encode_plain(payload, dst);
            }
        }
        let start = dst.len();
        if self.codec.try_compress(&payload, dst, self.long_runs) {
            // The wire body: the uncompressed length and the block.
            let body = dst.len() - start - HEADER_LEN;
            self.long_runs = len / lz4::LONG_RUNS >= body;
            self.judge(pays(len, body));
            return Ok(None);
        }
        self.failed();
        self.codec.encode_plain(payload, dst)
    }

    fn judge(&mut self, paid: bool) {
        if paid {
            self.trusted = true;
            self.wait = (self.wait / 2).max(MIN_WAIT);
        } else {
            self.failed();
        }
    }

    fn failed(&mut self) {
        self.trusted = false;
        self.long_runs = false;
        self.skip = self.wait;
        self.wait = (self.wait * 2).min(MAX_WAIT);
    }
}

/// Whether `len` bytes that compress to `compressed` save at least a tenth.
fn pays(len: usize, compressed: usize) -> bool {
    compressed.saturating_mul(10) <= len.saturating_mul(9)
}

/// `len` bytes of SplitMix64 noise, which LZ4 cannot shrink.
#[cfg(test)]
pub(super) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::SPLIT_PAYLOAD_SIZE;
    use proptest::prelude::*;

    const FRAME: usize = 256 * 1024;

    /// Text-like bytes that LZ4 shrinks several times.
    fn text(len: usize, seed: u64) -> Vec<u8> {
        let words: [&[u8]; 4] = [b"chanserv ", b"frames ", b"sources ", b"nested "];
        let mut i = seed as usize;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            i = i.wrapping_mul(31).wrapping_add(7);
            out.extend_from_slice(words[i % 4]);
        }
        out.truncate(len);
        out
    }

    fn encoder() -> AdaptiveEncoder {
        AdaptiveEncoder::new(FrameCodec::new().with_compression(true))
    }

    /// Encodes one frame onto `wire`; (whether it was tried, whether it went compressed).
    fn step(enc: &mut AdaptiveEncoder, payload: &[u8], wire: &mut BytesMut) -> (bool, bool) {
        let tried = enc.skip == 0;
        let start = wire.len();
        let big = enc.encode_split(Bytes::copy_from_slice(payload), wire);
        let compressed = wire[start + 3] & 0x80 != 0;
        if let Some(big) = big.unwrap() {
            wire.extend_from_slice(&big);
        }
        (tried, compressed)
    }

    fn decode_all(wire: &mut BytesMut) -> Vec<Vec<u8>> {
        let codec = FrameCodec::new();
        let mut out = Vec::new();
        while let Some(f) = codec.decode(wire).unwrap() {
            out.push(f.to_vec());
        }
        assert!(wire.is_empty(), "{} bytes left over", wire.len());
        out
    }

    #[test]
    fn incompressible_stops_after_first_failure_and_is_probed_again() {
        let mut enc = encoder();
        let mut wire = BytesMut::new();
        let frame = noise(FRAME, 1);
        let tried: Vec<bool> = (0..200)
            .map(|_| step(&mut enc, &frame, &mut wire))
            .map(|(tried, compressed)| {
                assert!(!compressed);
                tried
            })
            .collect();
        let at: Vec<usize> = (0..tried.len()).filter(|&i| tried[i]).collect();
        // Frame 0 was tried (sampled) and failed: frame 1 is not tried.
        assert_eq!(at[..2], [0, 2], "tried at {at:?}");
        // It is tried again, less and less often, and never more rarely than the cap.
        let gaps: Vec<usize> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[0] <= g[1]), "gaps {gaps:?}");
        let cap = MAX_WAIT as usize / FRAME + 1;
        assert!(gaps.iter().all(|&g| g <= cap), "gaps {gaps:?}");
        assert!(
            at.len() >= 7 && *gaps.last().unwrap() == cap,
            "tried at {at:?}"
        );
        assert_eq!(decode_all(&mut wire).len(), 200);
    }

    #[test]
    fn compressible_is_always_compressed() {
        let mut enc = encoder();
        let mut wire = BytesMut::new();
        let sizes = [COMPRESSION_THRESHOLD, 4096, 2 * SAMPLE_LEN, FRAME, 1 << 20];
        for (i, &len) in sizes.iter().cycle().take(40).enumerate() {
            assert_eq!(
                step(&mut enc, &text(len, i as u64), &mut wire),
                (true, true)
            );
        }
    }

    #[test]
    fn mixed_input_adapts_back() {
        let mut enc = encoder();
        let mut wire = BytesMut::new();
        for i in 0..100 {
            step(&mut enc, &noise(FRAME, i), &mut wire);
        }
        assert_eq!(enc.wait, MAX_WAIT);
        // Compressible again: found within the longest wait, then compressed throughout.
        let runs: Vec<bool> = (0..100)
            .map(|i| step(&mut enc, &text(FRAME, i), &mut wire).1)
            .collect();
        let first = runs
            .iter()
            .position(|&c| c)
            .expect("never compressed again");
        assert!(
            first <= MAX_WAIT as usize / FRAME,
            "compressed from frame {first}"
        );
        assert!(runs[first..].iter().all(|&c| c));
        assert_eq!(enc.wait, MIN_WAIT);
        // Noise again: one whole failed try, then plain without trying.
        assert_eq!(step(&mut enc, &noise(FRAME, 7), &mut wire), (true, false));
        assert_eq!(step(&mut enc, &noise(FRAME, 8), &mut wire), (false, false));
        assert_eq!(decode_all(&mut wire).len(), 202);
    }

    #[test]
    fn plain_large_frames_are_not_copied_and_limits_hold() {
        let mut enc = encoder();
        let big = Bytes::from(noise(FRAME, 3));
        let mut dst = BytesMut::new();
        let back = enc.encode_split(big.clone(), &mut dst).unwrap().unwrap();
        assert_eq!((back.as_ptr(), dst.len()), (big.as_ptr(), HEADER_LEN));
        // A frame over the limit is refused whether skipped, sampled or trusted.
        let mut enc = AdaptiveEncoder::new(FrameCodec::new().with_limit(FRAME - 1));
        for skip in [0, 1] {
            enc.skip = skip;
            let r = enc.encode_split(big.clone(), &mut dst);
            assert!(matches!(r, Err(crate::Error::FrameTooLarge { .. })));
        }
        assert_eq!(dst.len(), HEADER_LEN);
    }

    /// A payload of a kind: noise, text, half of each either way round.
    fn payload(kind: u8, len: usize, seed: u64) -> Vec<u8> {
        let half = len / 2;
        match kind % 4 {
            0 => noise(len, seed),
            1 => text(len, seed),
            2 => [text(half, seed), noise(len - half, seed)].concat(),
            _ => [noise(half, seed), text(len - half, seed)].concat(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn every_frame_decodes_to_its_payload(
            frames in proptest::collection::vec(
                (any::<u8>(), prop_oneof![0usize..SPLIT_PAYLOAD_SIZE, 0usize..400_000], any::<u64>()),
                0..12,
            ),
        ) {
            let mut enc = encoder();
            let mut wire = BytesMut::new();
            let payloads: Vec<Vec<u8>> =
                frames.iter().map(|&(k, len, seed)| payload(k, len, seed)).collect();
            for p in &payloads {
                step(&mut enc, p, &mut wire);
            }
            prop_assert_eq!(decode_all(&mut wire), payloads);
        }
    }
}
