//! A search gateway: the project's main job, end to end on loopback.
//!
//! ```sh
//! cargo run --release --example fanout
//! cargo run --release --example fanout -- --shards 8 --sources 16 --frames 5000 --size 512
//! RUST_LOG=chanserv=debug cargo run --release --example fanout
//! ```
//!
//! Each shard is a `Server` on its own `Node`, bound to `shard-<i>`. The gateway, on a
//! node joined to every shard, serves `search`: it posts the query to every shard at
//! once and forwards the shards' sources to its caller as they arrive, untouched (a
//! received `Source` is a valid answer). The client posts one query to `search`,
//! reads every source concurrently, prints progress while frames flow, then a summary,
//! and checks every count: the exit code is 0 only when nothing was lost.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chanserv::{Client, Error, Node, Server, Source};
use futures::{stream, StreamExt};

struct Opts {
    shards: u32,
    sources: u32,
    frames: u32,
    size: usize,
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        shards: 4,
        sources: 8,
        frames: 40_000,
        size: 1024,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v: u64 = it.next().and_then(|v| v.parse().ok()).ok_or_else(|| {
            format!("{flag} needs a number (flags: --shards --sources --frames --size)")
        })?;
        match flag.as_str() {
            "--shards" => o.shards = v as u32,
            "--sources" => o.sources = v as u32,
            "--frames" => o.frames = v as u32,
            "--size" => o.size = v as usize,
            _ => {
                return Err(format!(
                    "unknown flag {flag} (flags: --shards --sources --frames --size)"
                ))
            }
        }
    }
    if o.shards == 0 {
        return Err("--shards must be at least 1".into());
    }
    Ok(o)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // yamux warns when both ends of a link close at once (as every node
                // does at exit) and its goodbye meets a closed socket: expected here.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,yamux=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(o).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fanout failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(o: Opts) -> Result<bool, Error> {
    // Shards: one node and one service each.
    let gateway = Node::new();
    let mut shard_services = Vec::new();
    let mut shard_nodes = Vec::new();
    for i in 0..o.shards {
        let node = Node::new();
        let addr = node.listen("127.0.0.1:0").await?;
        let (sources, frames, size) = (o.sources, o.frames, o.size);
        let service =
            Server::new(node.clone()).listen_and_serve(&format!("shard-{i}"), move |req| {
                let query = String::from_utf8_lossy(&req.body).into_owned();
                tracing::info!(shard = i, %query, "query");
                // Each "document" is a source; its frames are result chunks.
                stream::iter(0..sources).map(move |doc| {
                    let chunk = Bytes::from(vec![b'a' + (doc % 26) as u8; size]);
                    Source::new(
                        format!("shard-{i}/doc-{doc}"),
                        stream::iter(0..frames).map(move |_| chunk.clone()),
                    )
                })
            })?;
        gateway.join(addr).await?.detach();
        shard_services.push(service);
        shard_nodes.push(node);
    }
    for i in 0..o.shards {
        gateway
            .wait_for_name(&format!("shard-{i}"), Duration::from_secs(10))
            .await?;
    }

    // The gateway: fan the query out, forward every shard's sources as they come.
    let gw_addr = gateway.listen("127.0.0.1:0").await?;
    let to_shards = Client::new(gateway.clone())?;
    let shards = o.shards;
    let _gw_service = Server::new(gateway.clone()).listen_and_serve("search", move |req| {
        let client = to_shards.clone();
        stream::once(async move {
            let posts = (0..shards).map(|i| {
                let (client, body) = (client.clone(), req.body.clone());
                async move {
                    client
                        .lookup_and_post(&format!("shard-{i}"), body, &[])
                        .await
                }
            });
            let answers = futures::future::join_all(posts).await;
            let mut all = Vec::new();
            for a in answers {
                all.push(a?.boxed());
            }
            Ok::<_, Error>(stream::select_all(all))
        })
        .flat_map(|r| match r {
            Ok(merged) => merged.left_stream(),
            Err(e) => stream::iter([Err(e)]).right_stream(),
        })
    })?;

    // The client.
    let client_node = Node::new();
    client_node.join(gw_addr).await?.detach();
    client_node
        .wait_for_name("search", Duration::from_secs(10))
        .await?;
    let client = Client::new(client_node.clone())?;

    let frames_seen = Arc::new(AtomicU64::new(0));
    let bytes_seen = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = {
        let (f, b) = (frames_seen.clone(), bytes_seen.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.tick().await;
            loop {
                tick.tick().await;
                let mib = b.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
                eprintln!(
                    "  … {:>9} frames  {:>9.1} MiB  {:>6.2} s",
                    f.load(Ordering::Relaxed),
                    mib,
                    started.elapsed().as_secs_f64()
                );
            }
        })
    };

    println!(
        "query \"rust channels\" → gateway → {} shards × {} sources × {} frames × {} B",
        o.shards, o.sources, o.frames, o.size
    );
    let mut sources = client
        .lookup_and_post("search", "rust channels", &[])
        .await?;
    let mut readers = Vec::new();
    while let Some(source) = sources.next().await {
        let mut source = source?;
        let header = String::from_utf8_lossy(source.header()).into_owned();
        let (f, b) = (frames_seen.clone(), bytes_seen.clone());
        readers.push(tokio::spawn(async move {
            let (mut frames, mut bytes) = (0u64, 0u64);
            while let Some(frame) = source.next().await {
                let frame = frame?;
                frames += 1;
                bytes += frame.len() as u64;
                f.fetch_add(1, Ordering::Relaxed);
                b.fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
            Ok::<_, Error>((header, frames, bytes))
        }));
    }
    let mut per_shard: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let (mut total_sources, mut total_frames, mut total_bytes, mut bad) = (0u64, 0u64, 0u64, 0u64);
    for r in readers {
        let (header, frames, bytes) = r.await.expect("reader task")?;
        let shard = header.split('/').next().unwrap_or("?").to_owned();
        let e = per_shard.entry(shard).or_default();
        e.0 += 1;
        e.1 += frames;
        e.2 += bytes;
        total_sources += 1;
        total_frames += frames;
        total_bytes += bytes;
        if frames != u64::from(o.frames) || bytes != u64::from(o.frames) * o.size as u64 {
            bad += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    progress.abort();

    let mib = total_bytes as f64 / (1 << 20) as f64;
    println!("\nper shard:");
    for (shard, (s, f, b)) in &per_shard {
        println!(
            "  {shard:<10} {s:>4} sources {f:>9} frames {:>9.1} MiB",
            *b as f64 / (1 << 20) as f64
        );
    }
    println!(
        "\ntotal: {total_sources} sources, {total_frames} frames, {mib:.1} MiB in {elapsed:.2} s ({:.0} MiB/s, {:.0} frames/s)",
        mib / elapsed,
        total_frames as f64 / elapsed
    );
    let want_sources = u64::from(o.shards) * u64::from(o.sources);
    let want_frames = want_sources * u64::from(o.frames);
    let ok = bad == 0
        && total_sources == want_sources
        && total_frames == want_frames
        && total_bytes == want_frames * o.size as u64
        && per_shard.len() == o.shards as usize;
    if ok {
        println!("verified: every source complete, nothing lost");
    } else {
        println!("MISMATCH: expected {want_sources} sources and {want_frames} frames; {bad} sources incomplete");
    }
    drop(shard_services);
    Ok(ok)
}
