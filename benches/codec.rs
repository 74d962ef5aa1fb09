//! Frame codec throughput: encode + decode of 64 B and 1 MiB frames, plain and LZ4.
//!
//! `cargo bench --bench codec`

use bytes::{Bytes, BytesMut};
use chanserv::frame::FrameCodec;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn payload(size: usize, compressible: bool) -> Bytes {
    if compressible {
        b"chanserv nested channels over a stream multiplexer "
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

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for (size, batch) in [(64usize, 1024usize), (1 << 20, 1)] {
        for (name, lz4, compressible) in [
            ("plain", false, false),
            ("lz4", true, true),
            ("lz4-random", true, false),
        ] {
            let codec = FrameCodec::new().with_compression(lz4);
            let p = payload(size, compressible);
            g.throughput(Throughput::Bytes((size * batch) as u64));
            g.bench_with_input(BenchmarkId::new(name, size), &p, |b, p| {
                let mut buf = BytesMut::with_capacity(size * batch + 64);
                b.iter(|| {
                    for _ in 0..batch {
                        codec.encode(p, &mut buf).unwrap();
                    }
                    for _ in 0..batch {
                        let f = codec.decode(&mut buf).unwrap().unwrap();
                        assert_eq!(f.len(), size);
                    }
                });
            });
        }
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
