//! The LZ4 block format (`PROTOCOL.md`, "Frames"; the format is LZ4's own
//! `lz4_Block_format.md`), both ways, in safe Rust.
//!
//! Two codecs behind one policy. `lz4_flex` is fast where matches are short (text,
//! JSON), and slow where they are long: its safe decoder copies a match longer than
//! its offset (a repeating run) a byte at a time, and both of its directions want a
//! zeroed output buffer as large as the frame. The long-run codec here copies such a
//! match in doubling memcpys (the run is periodic), fills a decoded frame by
//! appending, appends a compressed one to the caller's buffer and gives up as soon
//! as it cannot come out smaller, and extends a match 32 bytes at a time. A block
//! whose output is at least [`LONG_RUNS`] times its size is made of long matches:
//! the long-run codec decodes it; a sender uses it while its frames compress that
//! well. Every block is a standard LZ4 block either way.

use bytes::BytesMut;

const MIN_MATCH: usize = 4;
/// The last bytes of a block are always literals.
const LAST_LITERALS: usize = 5;
/// A match starts at least this far from the end of the block.
const MF_LIMIT: usize = 12;
const MAX_OFFSET: usize = 65_535;
/// Literals and matches this short are copied as this many bytes (when the room is
/// there) and cut back: one fixed-size copy instead of a call to `memcpy`.
const WILD: usize = 16;
/// Output bytes per block byte from which a block counts as long runs.
pub(crate) const LONG_RUNS: usize = 16;

/// Why a block does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("LZ4 block ends inside a sequence")]
    Truncated,
    #[error("LZ4 match offset {offset} points before the start of the output ({len} bytes)")]
    BadOffset { offset: usize, len: usize },
    #[error("LZ4 block holds more than the {0} bytes its header says")]
    TooLong(usize),
    #[error("LZ4 block holds {got} bytes, its header says {want}")]
    TooShort { got: usize, want: usize },
    #[error("corrupt LZ4 block: {0}")]
    Other(String),
}

/// Decodes a block that must hold exactly `ulen` bytes (checked by the caller against
/// its limit). The output never grows past `ulen`, whatever the block says.
pub(crate) fn decompress(block: &[u8], ulen: usize) -> Result<Vec<u8>, DecodeError> {
    if ulen / LONG_RUNS < block.len() {
        return decompress_flex(block, ulen);
    }
    decompress_runs(block, ulen)
}

/// [`decompress`] with `lz4_flex`, into a zeroed buffer of `ulen` bytes.
fn decompress_flex(block: &[u8], ulen: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![0; ulen];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(n) if n == ulen => Ok(out),
        Ok(n) => Err(DecodeError::TooShort { got: n, want: ulen }),
        Err(e) => Err(DecodeError::Other(e.to_string())),
    }
}

/// [`decompress`] for a block of long matches.
fn decompress_runs(block: &[u8], ulen: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(ulen);
    let mut ip = 0;
    loop {
        let token = *block.get(ip).ok_or(DecodeError::Truncated)?;
        ip += 1;
        let mut lits = usize::from(token >> 4);
        if lits == 15 {
            lits += read_len(block, &mut ip, ulen)?;
        }
        if lits <= 2 * WILD && ip + 2 * WILD <= block.len() && out.len() + 2 * WILD <= ulen {
            // Short literals, per sequence: fixed-size copies, cut back.
            let end = out.len() + lits;
            out.extend_from_slice(&block[ip..ip + WILD]);
            if lits > WILD {
                out.extend_from_slice(&block[ip + WILD..ip + 2 * WILD]);
            }
            out.truncate(end);
        } else {
            let lit = block.get(ip..ip + lits).ok_or(DecodeError::Truncated)?;
            if lits > ulen - out.len() {
                return Err(DecodeError::TooLong(ulen));
            }
            out.extend_from_slice(lit);
        }
        ip += lits;
        if ip == block.len() {
            break;
        }
        let off = block.get(ip..ip + 2).ok_or(DecodeError::Truncated)?;
        let offset = usize::from(u16::from_le_bytes([off[0], off[1]]));
        ip += 2;
        if offset == 0 || offset > out.len() {
            return Err(DecodeError::BadOffset {
                offset,
                len: out.len(),
            });
        }
        let mut len = usize::from(token & 15) + MIN_MATCH;
        if token & 15 == 15 {
            len += read_len(block, &mut ip, ulen)?;
        }
        if len <= 4 * WILD && offset >= WILD && out.len() + 4 * WILD <= ulen {
            // Short matches: fixed-size copies, each from before where it goes.
            let (mut from, end) = (out.len() - offset, out.len() + len);
            while out.len() < end {
                out.extend_from_within(from..from + WILD);
                from += WILD;
            }
            out.truncate(end);
        } else if len <= ulen - out.len() {
            copy_match(&mut out, offset, len);
        } else {
            return Err(DecodeError::TooLong(ulen));
        }
    }
    if out.len() != ulen {
        return Err(DecodeError::TooShort {
            got: out.len(),
            want: ulen,
        });
    }
    Ok(out)
}

/// A length's extra bytes: each 255 says more follow. More than `cap` is an error
/// before it could overflow.
#[inline]
fn read_len(block: &[u8], ip: &mut usize, cap: usize) -> Result<usize, DecodeError> {
    let mut n = 0usize;
    loop {
        let b = *block.get(*ip).ok_or(DecodeError::Truncated)?;
        *ip += 1;
        n += usize::from(b);
        if n > cap {
            return Err(DecodeError::TooLong(cap));
        }
        if b != 255 {
            return Ok(n);
        }
    }
}

/// Appends `len` bytes copied from `offset` back (checked by the caller: `0 <
/// offset <= out.len()`). When the match overlaps its own output, what is copied so
/// far repeats with period `offset`, so each copy can take all of it: log(len) copies.
#[inline]
fn copy_match(out: &mut Vec<u8>, offset: usize, mut len: usize) {
    let start = out.len() - offset;
    while len > 0 {
        let n = len.min(out.len() - start);
        out.extend_from_within(start..start + n);
        len -= n;
    }
}

/// Appends `input` compressed as one block to `dst`, with the long-run codec when
/// `long_runs` (the sender's last frames compressed [`LONG_RUNS`] times or better);
/// `None` (and `dst` as it was) when the block would exceed `max` bytes.
pub(crate) fn compress(
    input: &[u8],
    dst: &mut BytesMut,
    max: usize,
    long_runs: bool,
) -> Option<usize> {
    let start = dst.len();
    let fits = if !long_runs {
        compress_flex(input, dst, start + max)
    } else if input.len() <= 16 * 1024 {
        compress_runs::<1024>(input, dst, start + max)
    } else {
        compress_runs::<4096>(input, dst, start + max)
    };
    if fits {
        Some(dst.len() - start)
    } else {
        dst.truncate(start);
        None
    }
}

/// Appends `input` compressed by `lz4_flex`; false when `dst` then exceeds `limit`.
fn compress_flex(input: &[u8], dst: &mut BytesMut, limit: usize) -> bool {
    let start = dst.len();
    dst.resize(
        start + lz4_flex::block::get_maximum_output_size(input.len()),
        0,
    );
    match lz4_flex::block::compress_into(input, &mut dst[start..]) {
        Ok(n) => {
            dst.truncate(start + n);
            dst.len() <= limit
        }
        Err(_) => false,
    }
}

/// The long-run compressor: greedy, single pass, with a hash table of `N` positions
/// (a power of two), as LZ4's fast mode (it skips ahead faster the longer it finds no
/// match). False as soon as `dst` exceeds `limit`.
fn compress_runs<const N: usize>(input: &[u8], dst: &mut BytesMut, limit: usize) -> bool {
    let n = input.len();
    let mut anchor = 0;
    if n > MF_LIMIT {
        let mut table = [0u32; N];
        let search_end = n - MF_LIMIT;
        let match_end = n - LAST_LITERALS;
        let mut i = 1;
        while i < search_end {
            let seq = read_u32(input, i);
            let h = hash::<N>(seq);
            let cand = table[h] as usize;
            table[h] = i as u32;
            if i - cand > MAX_OFFSET || read_u32(input, cand) != seq {
                i += 1 + ((i - anchor) >> 6);
                continue;
            }
            let (mut at, mut from) = (i, cand);
            while at > anchor && from > 0 && input[at - 1] == input[from - 1] {
                at -= 1;
                from -= 1;
            }
            let len = i - at + MIN_MATCH + same(input, cand + MIN_MATCH, i + MIN_MATCH, match_end);
            emit(dst, input, anchor..at, at - from, len);
            if dst.len() > limit {
                return false;
            }
            i = at + len;
            anchor = i;
            if i < search_end {
                table[hash::<N>(read_u32(input, i - 2))] = (i - 2) as u32;
            }
        }
    }
    emit_last(dst, &input[anchor..]);
    dst.len() <= limit
}

#[inline]
fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[inline]
fn hash<const N: usize>(seq: u32) -> usize {
    (seq.wrapping_mul(2_654_435_761) >> (32 - N.trailing_zeros())) as usize
}

/// How many bytes from `b` on equal those from `a` on (`a < b`), not reaching `end`.
#[inline(never)]
fn same(input: &[u8], a: usize, b: usize, end: usize) -> usize {
    let max = end.saturating_sub(b);
    let mut n = 0;
    while n + 32 <= max && input[a + n..a + n + 32] == input[b + n..b + n + 32] {
        n += 32;
    }
    while n + 8 <= max {
        let x = u64::from_le_bytes(input[a + n..a + n + 8].try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(input[b + n..b + n + 8].try_into().expect("8 bytes"));
        if x != y {
            return n + ((x ^ y).trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    while n < max && input[a + n] == input[b + n] {
        n += 1;
    }
    n
}

/// One sequence: literals, then a match of `len` bytes `offset` back.
#[inline]
fn emit(dst: &mut BytesMut, input: &[u8], lits: std::ops::Range<usize>, offset: usize, len: usize) {
    let ml = len - MIN_MATCH;
    let n = lits.len();
    dst.extend_from_slice(&[(nibble(n) << 4) | nibble(ml)]);
    put_len(dst, n);
    if n <= WILD && lits.start + WILD <= input.len() {
        // Short literals: a fixed-size copy, cut back.
        let end = dst.len() + n;
        dst.extend_from_slice(&input[lits.start..lits.start + WILD]);
        dst.truncate(end);
    } else {
        dst.extend_from_slice(&input[lits]);
    }
    dst.extend_from_slice(&(offset as u16).to_le_bytes());
    put_len(dst, ml);
}

/// The last sequence: literals only.
#[inline]
fn emit_last(dst: &mut BytesMut, lits: &[u8]) {
    dst.extend_from_slice(&[nibble(lits.len()) << 4]);
    put_len(dst, lits.len());
    dst.extend_from_slice(lits);
}

#[inline]
fn nibble(n: usize) -> u8 {
    n.min(15) as u8
}

/// A length's extra bytes, when its nibble says 15.
#[inline]
fn put_len(dst: &mut BytesMut, n: usize) {
    if n >= 15 {
        let rest = n - 15;
        dst.resize(dst.len() + rest / 255, 255);
        dst.extend_from_slice(&[(rest % 255) as u8]);
    }
}

/// For the fuzz targets and tests: `data` is a 3-byte length and a block. Both
/// decoders must agree on a block either accepts, and never panic; what decodes
/// must come back through both encoders. True when the block decoded.
#[cfg(any(test, fuzzing))]
pub(crate) fn fuzz_block(data: &[u8]) -> bool {
    let Some((len, block)) = data.split_first_chunk::<3>() else {
        return false;
    };
    let ulen = usize::from(len[0]) | usize::from(len[1]) << 8 | usize::from(len[2]) << 16;
    let ours = decompress_runs(block, ulen);
    let theirs = decompress_flex(block, ulen);
    if let (Ok(o), Ok(t)) = (&ours, &theirs) {
        assert_eq!(o, t, "the two decoders disagree");
    }
    let Ok(out) = ours else {
        return false;
    };
    for long_runs in [false, true] {
        let mut dst = BytesMut::new();
        let n = compress(&out, &mut dst, usize::MAX >> 1, long_runs).expect("no bound");
        assert_eq!(n, dst.len());
        assert_eq!(decompress(&dst, ulen).as_deref(), Ok(&out[..]));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::adaptive::noise;

    /// Both encoders; each block read by both decoders.
    fn roundtrip(input: &[u8]) -> Option<usize> {
        let mut sizes = [0; 2];
        for (long_runs, size) in [false, true].into_iter().zip(&mut sizes) {
            let mut dst = BytesMut::from(&b"kept"[..]);
            let n = compress(input, &mut dst, usize::MAX >> 1, long_runs).unwrap();
            assert_eq!(&dst[..4], b"kept", "appends");
            let block = &dst[4..];
            assert_eq!(block.len(), n);
            assert_eq!(decompress(block, input.len()).unwrap(), input);
            assert_eq!(decompress_runs(block, input.len()).unwrap(), input);
            let theirs = lz4_flex::block::decompress(block, input.len()).unwrap();
            assert_eq!(theirs, input, "a standard decoder reads our blocks");
            *size = n;
        }
        Some(sizes[1])
    }

    #[test]
    fn blocks_round_trip_and_interoperate_both_ways() {
        let text: Vec<u8> = b"nested channels over a stream multiplexer "
            .iter()
            .copied()
            .cycle()
            .take(1 << 20)
            .collect();
        let n = roundtrip(&text).unwrap();
        assert!(n < 8 * 1024, "a repeating MiB is {n} bytes");
        for len in [0, 1, 4, 12, 13, 17, 100, 1000, 70_000] {
            roundtrip(&noise(len, len as u64 + 1));
            roundtrip(&vec![7u8; len]);
            roundtrip(&text[..len.min(text.len())]);
        }
        let mut mixed = noise(40_000, 3);
        mixed.extend_from_slice(&text[..100_000]);
        mixed.extend(noise(300, 9));
        roundtrip(&mixed);
        // Matches further back than an offset can say are not used.
        let mut far = noise(70_000, 5);
        far.extend_from_within(..1000);
        roundtrip(&far);
        let theirs = lz4_flex::block::compress(&mixed);
        assert_eq!(decompress_runs(&theirs, mixed.len()).unwrap(), mixed);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_blocks_never_panic_and_both_decoders_agree(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        ) {
            fuzz_block(&data);
        }

        #[test]
        fn blocks_of_runs_and_noise_round_trip(
            parts in proptest::collection::vec((1usize..40, 0usize..3000, proptest::prelude::any::<u64>()), 1..8),
        ) {
            let mut input = Vec::new();
            for (period, len, seed) in parts {
                let unit = noise(period, seed);
                input.extend(unit.iter().copied().cycle().take(len));
            }
            roundtrip(&input);
        }
    }

    #[test]
    fn compression_gives_up_past_its_bound_and_leaves_the_buffer() {
        let mut dst = BytesMut::from(&b"head"[..]);
        let input = noise(4096, 11);
        for long_runs in [false, true] {
            assert_eq!(compress(&input, &mut dst, input.len() - 1, long_runs), None);
            assert_eq!(&dst[..], b"head");
        }
    }

    #[test]
    fn bad_blocks_are_errors_and_never_grow_past_the_length() {
        let mut dst = BytesMut::new();
        let input = vec![1u8; 10_000];
        compress(&input, &mut dst, usize::MAX >> 1, true).unwrap();
        assert!(matches!(
            decompress_runs(&dst, 9_999),
            Err(DecodeError::TooLong(9_999))
        ));
        assert!(matches!(
            decompress_runs(&dst, 10_001),
            Err(DecodeError::TooShort { .. })
        ));
        assert_eq!(
            decompress_runs(&dst[..dst.len() - 1], 10_000),
            Err(DecodeError::Truncated)
        );
        assert_eq!(decompress_runs(&[], 0), Err(DecodeError::Truncated));
        // A match before the start of the output.
        assert!(matches!(
            decompress_runs(&[0x10, b'a', 2, 0], 10),
            Err(DecodeError::BadOffset { offset: 2, len: 1 })
        ));
        assert!(matches!(
            decompress_runs(&[0x10, b'a', 0, 0], 10),
            Err(DecodeError::BadOffset { offset: 0, .. })
        ));
        // A length run that claims more than the output may hold.
        let mut long = vec![0xF0];
        long.extend(std::iter::repeat_n(255, 100));
        assert_eq!(
            decompress_runs(&long, 1000),
            Err(DecodeError::TooLong(1000))
        );
        assert_eq!(decompress_runs(&[0x00], 0), Ok(Vec::new()));
    }
}
