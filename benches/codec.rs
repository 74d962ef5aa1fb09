//! Frame codec throughput: encode + decode of 64 B and 1 MiB frames, plain and LZ4.
//!
//! `cargo bench --bench codec`

use bytes::BytesMut;
use chanserv::frame::FrameCodec;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[path = "common/payload.rs"]
mod common;
use common::payload;

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
