//! Benchmark payloads, shared by `benches/` and `examples/bench.rs` (included with
//! `#[path]`): text-like and compressible, or xorshift noise that LZ4 cannot shrink.

use bytes::Bytes;

/// `size` bytes: repeated words when `compressible`, else pseudo-random.
pub fn payload(size: usize, compressible: bool) -> Bytes {
    if compressible {
        b"chanserv nested channels over a stream multiplexer sources frames "
            .iter()
            .copied()
            .cycle()
            .take(size)
            .collect::<Vec<u8>>()
            .into()
    } else {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect::<Vec<u8>>()
            .into()
    }
}
