//! The benchmark workloads of `WORKLOADS.md` (`connect`, `heavy`, `flood`) on chanserv,
//! printed in the format of the peers harness so the lines sit side by side.
//!
//! ```sh
//! cargo run --release --example bench -- all
//! cargo run --release --example bench -- flood --rt split
//! cargo run --release --example bench -- heavy --lz4            # compressible payload
//! cargo run --release --example bench -- heavy --lz4 --random   # incompressible payload
//! cargo run --release --example bench -- heavy --tls            # mutual TLS 1.3 links
//! cargo run --release --example bench -- flood --sources 100000 --frames 50
//! cargo run --release --example bench -- mux-heavy                 # raw Node streams
//! cargo run --release --example bench -- mux-flood
//! cargo run --release --example bench -- heavy --relay   # through a third node
//! cargo run --release --example bench -- mux-heavy --sources 1 --frames 5000
//! ```
//!
//! Client and server are two `Node`s joined over loopback TCP in one process. Every
//! frame is produced on the server per frame (a slice of one shared 1 MiB buffer) and
//! received as its own item; the client checks every source's frame count and byte
//! total, and the run fails if any is off. `all` runs each workload in a fresh process,
//! so `rss_mib` (peak RSS, `VmHWM`) is per workload. `--tls` links the two nodes over
//! mutual TLS 1.3 with certificates made at start (rcgen; not timed).
//!
//! `--relay` links client and server only through a third node (this program run as
//! `bench relay-node`, a process of its own): the client reaches the service and the
//! server dials its child streams back through it. The line adds `relay_cpu_util`, the
//! relay process's CPU over the measured request (as `cpu_util` is this process's),
//! `relay_rss_mib`, its peak RSS, and `relay_cpu_s`, the CPU seconds it used in all,
//! the warm-up request included.
//!
//! `mux-heavy` and `mux-flood` measure the multiplexer alone (`peer=node`): the same
//! shapes as `heavy`/`flood`, one `Node` stream per source, with the application code of
//! the peers harness's `yamux` peer (a `u32` source id, then length-delimited frames
//! through tokio-util's `FramedWrite`/`FramedRead`), so the ratio to `peers yamux
//! heavy|flood` is the cost of `Node` over raw yamux.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chanserv::{Client, ClientConfig, Node, NodeConfig, Server, ServerConfig, Source};
use futures::{stream, StreamExt};

const MIB: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug)]
struct Shape {
    sources: u32,
    frames: u32,
    size: usize,
}

#[derive(Debug, Clone)]
struct Args {
    workload: String,
    rt: String,
    lz4: bool,
    random: bool,
    tls: bool,
    relay: bool,
    shape: Option<Shape>,
    n: usize,
}

impl Args {
    /// The workload as the output line names it: `heavy-lz4-random-tls` and so on.
    fn label(&self) -> String {
        let lz4 = match (self.lz4, self.random) {
            (true, true) => "-lz4-random",
            (true, false) => "-lz4",
            _ => "",
        };
        let tls = if self.tls { "-tls" } else { "" };
        let relay = if self.relay { "-relay" } else { "" };
        format!("{}{lz4}{tls}{relay}", self.workload)
    }
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        workload: String::new(),
        rt: "shared".into(),
        lz4: false,
        random: false,
        tls: false,
        relay: false,
        shape: None,
        n: 20_000,
    };
    let mut sources = None;
    let mut frames = None;
    let mut size = None;
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match x.as_str() {
            "--rt" => a.rt = it.next().ok_or("--rt needs shared|split|single")?,
            "--lz4" => a.lz4 = true,
            "--random" => a.random = true,
            "--tls" => a.tls = true,
            "--relay" => a.relay = true,
            "--sources" => sources = Some(num("--sources")? as u32),
            "--frames" => frames = Some(num("--frames")? as u32),
            "--size" => size = Some(num("--size")?),
            "--requests" => a.n = num("--requests")?,
            w if !w.starts_with('-') && a.workload.is_empty() => a.workload = w.into(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !["shared", "split", "single"].contains(&a.rt.as_str()) {
        return Err(format!("unknown runtime {}", a.rt));
    }
    let base = match a.workload.as_str() {
        "connect" => Shape { sources: 1, frames: 1, size: 0 },
        "heavy" => Shape { sources: 10, frames: 500, size: MIB },
        "flood" | "mux-flood" => Shape { sources: 1000, frames: 5000, size: 64 },
        "mux-heavy" => Shape { sources: 10, frames: 500, size: MIB },
        "all" | "relay-node" => return Ok(a),
        w => return Err(format!("usage: bench <connect|heavy|flood|mux-heavy|mux-flood|all> [--lz4 [--random]] [--tls] [--relay] [--rt shared|split|single]; unknown workload {w:?}")),
    };
    if sources.is_some() || frames.is_some() || size.is_some() {
        a.shape = Some(Shape {
            sources: sources.unwrap_or(base.sources),
            frames: frames.unwrap_or(base.frames),
            size: size.unwrap_or(base.size),
        });
    }
    a.shape.get_or_insert(base);
    Ok(a)
}

#[path = "../benches/common/payload.rs"]
mod common;

#[path = "../tests/support/certs.rs"]
mod certs;

#[path = "support/relay.rs"]
mod relay;

/// The server's and the client's node settings: plaintext, or TLS with a fresh CA.
fn node_configs(tls: bool) -> (NodeConfig, NodeConfig) {
    if !tls {
        return (NodeConfig::default(), NodeConfig::default());
    }
    let ca = certs::Ca::new("bench CA");
    (
        NodeConfig::default().tls(ca.node("server.bench")),
        NodeConfig::default().tls(ca.node("client.bench")),
    )
}

fn payload(random: bool) -> Bytes {
    common::payload(MIB, !random)
}

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn cpu_secs() -> f64 {
    proc_cpu_secs("self")
}

/// CPU seconds (user and system) used so far by the process `pid` (or "self").
fn proc_cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.workload == "all" {
        return run_all();
    }
    if args.workload == "relay-node" {
        return match relay::serve(&runtime(2), vm_hwm_mib, cpu_secs) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay-node: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let r = if args.workload.starts_with("mux-") {
        run_mux(&args)
    } else {
        run(&args)
    };
    match r {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "peer=chanserv workload={} rt={} error={e:?}",
                args.workload, args.rt
            );
            ExitCode::FAILURE
        }
    }
}

fn run_all() -> ExitCode {
    let exe = std::env::current_exe().expect("own path");
    let rest: Vec<String> = std::env::args().skip(2).collect();
    let mut ok = true;
    for w in ["connect", "heavy", "flood"] {
        let st = std::process::Command::new(&exe).arg(w).args(&rest).status();
        ok &= st.is_ok_and(|s| s.success());
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut b = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().expect("runtime")
}

/// The server's runtime, and the client's if it has its own (`split`).
fn runtimes(rt: &str) -> (tokio::runtime::Runtime, Option<tokio::runtime::Runtime>) {
    match rt {
        "shared" => (runtime(2), None),
        "split" => (runtime(1), Some(runtime(1))),
        _ => (runtime(0), None),
    }
}

fn run(a: &Args) -> Result<String, String> {
    let shape = a.shape.expect("set by parse_args");
    let (srv_rt, cli_rt) = runtimes(&a.rt);
    let cli = cli_rt.as_ref().unwrap_or(&srv_rt);
    let payload = payload(a.random);
    let lz4 = a.lz4;
    let (srv_cfg, cli_cfg) = node_configs(a.tls);
    if a.relay && a.tls {
        return Err("--relay runs plaintext links only".into());
    }
    let relay_node = a.relay.then(relay::Relay::start).transpose()?;
    let (server_node, _handle) = srv_rt.block_on(async {
        let node = Node::with_config(srv_cfg);
        let addr = match &relay_node {
            Some(r) => {
                node.join(r.addr).await.map_err(|e| e.to_string())?.detach();
                r.addr
            }
            None => node
                .listen("127.0.0.1:0")
                .await
                .map_err(|e| e.to_string())?,
        };
        let cfg = ServerConfig::default().use_compression(lz4);
        let p = payload.clone();
        let handle = Server::with_config(node.clone(), cfg)
            .listen_and_serve(&a.workload, move |_req| {
                let p = p.clone();
                stream::iter(0..shape.sources).map(move |_| {
                    let p = p.clone();
                    Source::new(
                        Bytes::new(),
                        stream::iter(0..shape.frames).map(move |_| p.slice(0..shape.size)),
                    )
                })
            })
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(((node, addr), handle))
    })?;
    let (server_node, addr) = server_node;
    let client = cli.block_on(async {
        let node = Node::with_config(cli_cfg);
        node.join(addr).await.map_err(|e| e.to_string())?.detach();
        node.wait_for_name(&a.workload, Duration::from_secs(10))
            .await
            .map_err(|e| format!("service never announced: {e}"))?;
        let cfg = ClientConfig::default().frame_size_limit(chanserv::frame::FRAME_SIZE_LIMIT);
        Client::with_config(node, cfg).map_err(|e| e.to_string())
    })?;
    let body: &'static [u8] = if a.workload == "connect" {
        b"hello"
    } else {
        b""
    };
    let work = a.workload.clone();
    let line = if a.workload == "connect" {
        let n = a.n;
        // The client's driving future runs on the runtime's workers (spawned), as in
        // the peers harness, not on the main thread.
        let (mut lat, secs, cpu) = on_runtime(cli, async move {
            for _ in 0..2000 {
                request(&client, &work, body, shape).await?;
            }
            let mut lat = Vec::with_capacity(n);
            let (c0, t0) = (cpu_secs(), Instant::now());
            for _ in 0..n {
                let t = Instant::now();
                request(&client, &work, body, shape).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok::<_, String>((lat, t0.elapsed().as_secs_f64(), cpu_secs() - c0))
        })?;
        lat.sort_by(f64::total_cmp);
        let median = lat[lat.len() / 2];
        let p99 = lat[lat.len() * 99 / 100];
        let mean = lat.iter().sum::<f64>() / lat.len() as f64;
        format!(
            "peer=chanserv workload={} rt={} n={n} median_us={median:.1} p99_us={p99:.1} mean_us={mean:.1} req_per_s={:.0} cpu_util={:.2} rss_mib={:.1}",
            a.label(),
            a.rt,
            n as f64 / secs,
            cpu / secs,
            vm_hwm_mib()
        )
    } else {
        let relay_pid = relay_node.as_ref().map(|r| r.pid().to_string());
        let relay_cpu = move || relay_pid.as_deref().map_or(0.0, proc_cpu_secs);
        let (secs, cpu, rcpu) = on_runtime(cli, async move {
            request(&client, &work, body, shape).await?; // warm-up
            let (c0, r0, t0) = (cpu_secs(), relay_cpu(), Instant::now());
            request(&client, &work, body, shape).await?;
            let secs = t0.elapsed().as_secs_f64();
            Ok::<_, String>((secs, cpu_secs() - c0, relay_cpu() - r0))
        })?;
        let line = throughput_line("chanserv", &a.label(), &a.rt, shape, secs, cpu);
        match a.relay {
            // The relay's CPU over the measured request, as `cpu_util` is ours.
            true => format!("{line} relay_cpu_util={:.2}", rcpu / secs),
            false => line,
        }
    };
    drop(server_node);
    match relay_node {
        Some(r) => Ok(format!("{line} {}", r.finish()?)),
        None => Ok(line),
    }
}

/// Runs `f` as a task of `rt` (on its workers) and waits for it.
fn on_runtime<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
) -> Result<T, String> {
    rt.block_on(rt.spawn(f)).map_err(|e| e.to_string())?
}

fn throughput_line(
    peer: &str,
    workload: &str,
    rt: &str,
    shape: Shape,
    secs: f64,
    cpu: f64,
) -> String {
    let frames = u64::from(shape.sources) * u64::from(shape.frames);
    let bytes = frames * shape.size as u64;
    format!(
        "peer={peer} workload={workload} rt={rt} secs={secs:.3} frames={frames} bytes={bytes} frames_per_s={:.3e} mib_per_s={:.1} cpu_util={:.2} rss_mib={:.1}",
        frames as f64 / secs,
        bytes as f64 / MIB as f64 / secs,
        cpu / secs,
        vm_hwm_mib()
    )
}

/// Raw `Node` streams: the server's node dials one stream per source to the client's
/// `sink` and writes the source's frames on it; the client reads each on its own task.
fn run_mux(a: &Args) -> Result<String, String> {
    use chanserv::{Listener, Multiplexer};
    use futures::SinkExt;
    use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

    let shape = a.shape.expect("set by parse_args");
    let (srv_rt, cli_rt) = runtimes(&a.rt);
    let cli = cli_rt.as_ref().unwrap_or(&srv_rt);
    let payload = payload(a.random);
    let codec = || {
        LengthDelimitedCodec::builder()
            .max_frame_length(2 * MIB)
            .new_codec()
    };
    let (srv_cfg, cli_cfg) = node_configs(a.tls);
    let (server, addr) = srv_rt.block_on(async {
        let node = Node::with_config(srv_cfg);
        let addr = node
            .listen("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((node, addr))
    })?;
    let (client, mut done) = cli.block_on(async {
        let node = Node::with_config(cli_cfg);
        node.join(addr).await.map_err(|e| e.to_string())?.detach();
        let mut sink = node.bind("sink").map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = sink.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut r = FramedRead::new(s, codec());
                    let counted = async {
                        let first = r
                            .next()
                            .await
                            .ok_or("empty stream")?
                            .map_err(|e| e.to_string())?;
                        let id = u32::from_be_bytes(first[..].try_into().map_err(|_| "bad id")?);
                        let (mut frames, mut bytes) = (0u64, 0u64);
                        while let Some(f) = r.next().await {
                            let f = f.map_err(|e| e.to_string())?;
                            frames += 1;
                            bytes += f.len() as u64;
                        }
                        Ok::<_, String>((id, frames, bytes))
                    };
                    let _ = tx.send(counted.await);
                });
            }
        });
        Ok::<_, String>((node, rx))
    })?;
    srv_rt
        .block_on(server.wait_for_name("sink", Duration::from_secs(10)))
        .map_err(|e| format!("sink never announced: {e}"))?;
    let round = |srv: &tokio::runtime::Runtime| {
        for id in 0..shape.sources {
            let (node, p) = (server.clone(), payload.clone());
            srv.spawn(async move {
                let s = node.dial("sink", Duration::from_secs(10)).await?;
                let mut w = FramedWrite::new(s, codec());
                w.feed(Bytes::copy_from_slice(&id.to_be_bytes())).await?;
                for _ in 0..shape.frames {
                    w.feed(p.slice(0..shape.size)).await?; // generated per frame
                }
                SinkExt::<Bytes>::close(&mut w).await?; // flush + FIN
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            });
        }
    };
    let mut measure = || {
        let (c0, t0) = (cpu_secs(), Instant::now());
        round(&srv_rt);
        let mut seen = std::collections::HashSet::new();
        cli.block_on(async {
            // Only collects the readers' results; the readers are tasks.
            for _ in 0..shape.sources {
                let (id, frames, bytes) = done.recv().await.ok_or("acceptor gone")??;
                if frames != u64::from(shape.frames)
                    || bytes != u64::from(shape.frames) * shape.size as u64
                    || !seen.insert(id)
                {
                    return Err(format!("stream {id}: {frames} frames / {bytes} bytes"));
                }
            }
            Ok::<_, String>(())
        })?;
        Ok::<_, String>((t0.elapsed().as_secs_f64(), cpu_secs() - c0))
    };
    measure()?; // warm-up
    let (secs, cpu) = measure()?;
    drop(client);
    Ok(throughput_line("node", &a.label(), &a.rt, shape, secs, cpu))
}

/// One request: every source read on its own task, every count and byte checked.
async fn request(
    client: &Client<Node>,
    service: &str,
    body: &'static [u8],
    shape: Shape,
) -> Result<(), String> {
    let mut sources = client
        .lookup_and_post(service, body, &[])
        .await
        .map_err(|e| e.to_string())?;
    let mut readers = Vec::with_capacity(shape.sources as usize);
    let mut counted = Vec::new();
    while let Some(s) = sources.next().await {
        let mut s = s.map_err(|e| e.to_string())?;
        if !s.header().is_empty() {
            return Err("non-empty header".into());
        }
        if shape.sources == 1 {
            // connect: read in place, as a caller waiting for one answer would.
            counted.push(count(&mut s).await?);
        } else {
            readers.push(tokio::spawn(async move { count(&mut s).await }));
        }
    }
    for r in readers {
        counted.push(r.await.map_err(|e| e.to_string())??);
    }
    if counted.len() != shape.sources as usize {
        return Err(format!(
            "{} sources, expected {}",
            counted.len(),
            shape.sources
        ));
    }
    for (frames, bytes) in counted {
        if frames != u64::from(shape.frames) || bytes != u64::from(shape.frames) * shape.size as u64
        {
            return Err(format!("source got {frames} frames / {bytes} bytes"));
        }
    }
    Ok(())
}

async fn count(s: &mut Source) -> Result<(u64, u64), String> {
    let (mut frames, mut bytes) = (0u64, 0u64);
    while let Some(f) = s.next().await {
        let f = f.map_err(|e| e.to_string())?;
        frames += 1;
        bytes += f.len() as u64;
    }
    Ok((frames, bytes))
}
