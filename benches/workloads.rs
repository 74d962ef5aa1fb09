//! The `WORKLOADS.md` workloads under criterion: `connect`, `heavy`, `flood`, plain and
//! with LZ4 (compressible and incompressible payloads). Each iteration is one verified
//! request over loopback TCP between two `Node`s; the runtime and nodes are built once,
//! outside the measured closure.
//!
//! `cargo bench --bench workloads` (heavy and flood take a few minutes; the `bench`
//! example gives the peers-format lines).

use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, Node, ServeHandle, Server, ServerConfig, Source};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::{stream, StreamExt};

#[path = "common/payload.rs"]
mod common;

const MIB: usize = 1 << 20;

struct Setup {
    rt: tokio::runtime::Runtime,
    client: Client<Node>,
    _nodes: (Node, Node),
    _handle: ServeHandle,
}

fn setup(sources: u32, frames: u32, size: usize, lz4: bool, random: bool) -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payload = common::payload(MIB, !random);
    let (client, nodes, handle) = rt.block_on(async move {
        let (a, b) = (Node::new(), Node::new());
        let addr = a.listen("127.0.0.1:0").await.unwrap();
        let cfg = ServerConfig::default().use_compression(lz4);
        let handle = Server::with_config(a.clone(), cfg)
            .listen_and_serve("w", move |_| {
                let p = payload.clone();
                stream::iter(0..sources).map(move |_| {
                    let p = p.clone();
                    Source::new(
                        Bytes::new(),
                        stream::iter(0..frames).map(move |_| p.slice(0..size)),
                    )
                })
            })
            .unwrap();
        b.join(addr).await.unwrap().detach();
        b.wait_for_name("w", Duration::from_secs(10)).await.unwrap();
        (Client::new(b.clone()).unwrap(), (a, b), handle)
    });
    Setup {
        rt,
        client,
        _nodes: nodes,
        _handle: handle,
    }
}

async fn request(client: &Client<Node>, sources: u32, frames: u32, size: usize) {
    let mut ss = client.lookup_and_post("w", "", &[]).await.unwrap();
    let mut tasks = Vec::new();
    while let Some(s) = ss.next().await {
        let mut s = s.unwrap();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut b) = (0u32, 0usize);
            while let Some(f) = s.next().await {
                n += 1;
                b += f.unwrap().len();
            }
            (n, b)
        }));
    }
    assert_eq!(tasks.len(), sources as usize);
    for t in tasks {
        assert_eq!(t.await.unwrap(), (frames, frames as usize * size));
    }
}

fn workloads(c: &mut Criterion) {
    let mut g = c.benchmark_group("workloads");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    let cases: [(&str, u32, u32, usize, bool, bool); 6] = [
        ("connect", 1, 1, 0, false, false),
        ("flood", 1000, 5000, 64, false, false),
        ("heavy", 10, 500, MIB, false, false),
        ("heavy-lz4", 10, 500, MIB, true, false),
        ("heavy-lz4-random", 10, 500, MIB, true, true),
        ("flood-lz4", 1000, 5000, 64, true, false),
    ];
    for (name, sources, frames, size, lz4, random) in cases {
        let s = setup(sources, frames, size, lz4, random);
        if size == 0 {
            g.throughput(Throughput::Elements(1));
        } else if size >= MIB {
            g.throughput(Throughput::Bytes(u64::from(sources * frames) * size as u64));
        } else {
            g.throughput(Throughput::Elements(u64::from(sources * frames)));
        }
        let id = BenchmarkId::new(name, format!("{sources}/{frames}/{size}"));
        g.bench_function(id, |b| {
            // The request runs as a task on the runtime's workers, as in the peers
            // harness; criterion's own future only waits for it (on the main thread).
            b.to_async(&s.rt).iter(|| {
                let client = s.client.clone();
                let task =
                    s.rt.spawn(async move { request(&client, sources, frames, size).await });
                async move { task.await.unwrap() }
            });
        });
    }
    g.finish();
}

criterion_group!(benches, workloads);
criterion_main!(benches);
