//! One source over a real TCP address, beside raw TCP on the same path: what
//! `scripts/wan.sh` runs across network namespaces with a delaying proxy in between.
//!
//! ```sh
//! wan serve --listen 10.0.0.1:7000 [--raw-listen 10.0.0.1:7001]
//! wan client --connect 127.0.0.1:7100 --bytes 536870912 --frame 1048576
//! wan client --connect 127.0.0.1:7101 --raw --bytes 536870912
//! wan rtt --connect 127.0.0.1:7101 [--count 10]
//! ```
//!
//! `serve` runs a chanserv `Node` listening on `--listen` with a `Server` for the
//! service `wan`: a request's body is two little-endian `u64`s, a byte count N and a
//! frame size F, and the answer is ONE source streaming N bytes in frames of F bytes
//! (the last one shorter), each a slice of one shared incompressible buffer. With
//! `--raw-listen` it also accepts plain TCP connections there: each reads a `u64` N and
//! gets N bytes, then the server closes its side. It prints `ready` lines on stdout.
//!
//! `--window` sets the client's `max_source_window` and `receive_budget` (default 16
//! MiB each): one source's throughput over a path is at most about its window per
//! round trip.
//!
//! `client` connects (a chanserv link, or with `--raw` a TCP connection), then times
//! from the request to the last byte, checks the byte count and prints one line for
//! people and one for scripts (`wan mode=... mib_per_s=...`). The chanserv client first
//! runs a one-frame request, so the link is up and its round-trip time known (as on a
//! long-lived link); the timed source still opens a fresh stream, as every source does.
//!
//! `RUST_LOG=yamux=debug` shows yamux's window auto-tuning (`new window_max`) and its
//! round-trip estimate (`estimated round-trip-time`).
//!
//! `rtt` times `--count` raw requests of one byte on fresh connections: connect plus
//! one round trip, through whatever lies on the path (the delaying proxy, which cannot
//! be pinged).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chanserv::{BoxError, Client, ClientConfig, Node, Server, ServerConfig, Source};
use futures::{stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: f64 = 1024.0 * 1024.0;
/// The largest frame `serve` makes (the frame size limit is 100 MiB; this is plenty).
const MAX_FRAME: u64 = 16 << 20;
const SERVICE: &str = "wan";
const USAGE: &str = "usage: wan serve --listen ADDR [--raw-listen ADDR]
       wan client --connect ADDR [--raw] --bytes N [--frame F (1 MiB)] [--window BYTES]
       wan rtt --connect ADDR [--count N (10)]";

#[path = "../benches/common/payload.rs"]
mod common;

#[derive(Debug, Default)]
struct Opts {
    cmd: String,
    listen: Option<String>,
    raw_listen: Option<String>,
    connect: Option<String>,
    raw: bool,
    bytes: u64,
    frame: u64,
    count: usize,
    /// The client's `max_source_window` and `receive_budget` (default: the library's).
    window: Option<usize>,
}

fn parse_args() -> Result<Opts, String> {
    let mut it = std::env::args().skip(1);
    let mut o = Opts {
        cmd: it.next().unwrap_or_default(),
        bytes: 512 << 20,
        frame: 1 << 20,
        count: 10,
        ..Opts::default()
    };
    while let Some(flag) = it.next() {
        if flag == "--raw" {
            o.raw = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--listen" => o.listen = Some(v),
            "--raw-listen" => o.raw_listen = Some(v),
            "--connect" => o.connect = Some(v),
            "--bytes" => o.bytes = num(&v)?,
            "--frame" => o.frame = num(&v)?,
            "--count" => o.count = num(&v)?.max(1) as usize,
            "--window" => o.window = Some(num(&v)? as usize),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if o.frame == 0 || o.frame > MAX_FRAME {
        return Err(format!("--frame must be 1..={MAX_FRAME}"));
    }
    let ok = match o.cmd.as_str() {
        "serve" => o.listen.is_some(),
        "client" | "rtt" => o.connect.is_some(),
        _ => false,
    };
    if ok {
        Ok(o)
    } else {
        Err("missing command or address".into())
    }
}

/// Logs on stderr: `RUST_LOG`, else warnings but only yamux's errors (yamux warns when
/// both ends of a link close at once, as they do at exit here).
fn init_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,yamux=error".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr);
    logs.with_env_filter(filter).with_ansi(ansi).init();
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logs();
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let r = match o.cmd.as_str() {
        "serve" => serve(&o).await,
        "rtt" => rtt(&o).await,
        _ if o.raw => raw_client(&o).await,
        _ => chanserv_client(&o).await,
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wan {}: {e}", o.cmd);
            println!("wan mode={} error={e:?}", mode(&o));
            ExitCode::FAILURE
        }
    }
}

fn mode(o: &Opts) -> &'static str {
    match (o.cmd.as_str(), o.raw) {
        ("rtt", _) => "rtt",
        (_, true) => "raw",
        _ => "chanserv",
    }
}

// ------------------------------------------------------------------ server

async fn serve(o: &Opts) -> Result<(), BoxError> {
    let payload = common::payload(MAX_FRAME as usize, false);
    let node = Node::new();
    let addr = node.listen(o.listen.as_deref().unwrap_or_default()).await?;
    let p = payload.clone();
    // The client's window (`--window`) is what is measured: the server does not bound
    // the request's bytes in flight below it.
    let _service = Server::with_config(
        node.clone(),
        ServerConfig::default().max_request_in_flight(usize::MAX),
    )
    .listen_and_serve_async(SERVICE, move |req| {
        let p = p.clone();
        async move {
            let (n, f) = decode(&req.body).ok_or("body: want N and F, two LE u64s")?;
            if f == 0 || f > MAX_FRAME {
                return Err(format!("frame size {f} not in 1..={MAX_FRAME}").into());
            }
            Ok::<_, BoxError>(stream::iter([Source::new("wan", frames(p, n, f))]))
        }
    })?;
    println!("ready chanserv {addr}");
    if let Some(raw) = &o.raw_listen {
        let listener = TcpListener::bind(raw).await?;
        println!("ready raw {}", listener.local_addr()?);
        loop {
            let (sock, peer) = listener.accept().await?;
            let p = payload.clone();
            tokio::spawn(async move {
                if let Err(e) = raw_serve(sock, p).await {
                    eprintln!("wan serve: raw {peer}: {e}");
                }
            });
        }
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// N bytes as frames of F bytes (the last one shorter), slices of `p`.
fn frames(p: Bytes, n: u64, f: u64) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    let count = n.div_ceil(f);
    stream::iter(0..count).map(move |i| {
        let len = f.min(n - i * f) as usize;
        p.slice(0..len)
    })
}

fn encode(n: u64, f: u64) -> Bytes {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(&f.to_le_bytes());
    b.into()
}

fn decode(body: &[u8]) -> Option<(u64, u64)> {
    let n = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let f = u64::from_le_bytes(body.get(8..16)?.try_into().ok()?);
    Some((n, f))
}

/// One raw connection: read N, write N bytes, close.
async fn raw_serve(mut sock: TcpStream, p: Bytes) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut n = sock.read_u64_le().await?;
    while n > 0 {
        let len = n.min(p.len() as u64) as usize;
        sock.write_all(&p[..len]).await?;
        n -= len as u64;
    }
    sock.shutdown().await
}

// ------------------------------------------------------------------ clients

async fn chanserv_client(o: &Opts) -> Result<(), BoxError> {
    let addr = resolve(o).await?;
    let node = Node::new();
    node.join(addr).await?.detach();
    node.wait_for_name(SERVICE, Duration::from_secs(10)).await?;
    let client = match o.window {
        Some(w) => Client::with_config(
            node.clone(),
            ClientConfig::default()
                .max_source_window(w)
                .receive_budget(w),
        )?,
        None => Client::new(node.clone())?,
    };
    fetch(&client, o.frame, o.frame).await?; // warm-up: the link is up, its RTT known
    let t0 = Instant::now();
    let ttfb = fetch(&client, o.bytes, o.frame).await?;
    let secs = t0.elapsed().as_secs_f64();
    let rtt = node
        .stats()
        .links
        .iter()
        .find_map(|l| l.rtt)
        .map_or("-".to_string(), |r| format!("{:.1}", r.as_secs_f64() * 1e3));
    report(o, secs, ttfb, &format!(" link_rtt_ms={rtt}"));
    Ok(())
}

/// Posts one request for `n` bytes in frames of `f`; checks it got one source of
/// exactly `n` bytes. Returns the time to the first frame.
async fn fetch(client: &Client<Node>, n: u64, f: u64) -> Result<Duration, BoxError> {
    let t0 = Instant::now();
    let mut ttfb = None;
    let mut sources = client.lookup_and_post(SERVICE, encode(n, f), &[]).await?;
    let (mut count, mut got) = (0, 0u64);
    while let Some(s) = sources.next().await {
        let mut s = s?;
        count += 1;
        while let Some(frame) = s.next().await {
            ttfb.get_or_insert_with(|| t0.elapsed());
            got += frame?.len() as u64;
        }
    }
    if count != 1 || got != n {
        return Err(format!("{count} sources and {got} bytes, expected 1 and {n}").into());
    }
    Ok(ttfb.unwrap_or_default())
}

async fn raw_client(o: &Opts) -> Result<(), BoxError> {
    let addr = resolve(o).await?;
    let mut sock = TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let t0 = Instant::now();
    let ttfb = raw_fetch(&mut sock, o.bytes, t0).await?;
    report(o, t0.elapsed().as_secs_f64(), ttfb, "");
    Ok(())
}

/// Asks for `n` bytes on `sock` and reads them to EOF; returns the time from `t0` to
/// the first byte.
async fn raw_fetch(sock: &mut TcpStream, n: u64, t0: Instant) -> Result<Duration, BoxError> {
    sock.write_u64_le(n).await?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut got, mut ttfb) = (0u64, None);
    loop {
        let k = sock.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        ttfb.get_or_insert_with(|| t0.elapsed());
        got += k as u64;
    }
    if got != n {
        return Err(format!("{got} bytes, expected {n}").into());
    }
    Ok(ttfb.unwrap_or_default())
}

async fn rtt(o: &Opts) -> Result<(), BoxError> {
    let addr = resolve(o).await?;
    let (mut connect, mut total) = (Vec::new(), Vec::new());
    for _ in 0..o.count {
        let t0 = Instant::now();
        let mut sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        connect.push(t0.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        raw_fetch(&mut sock, 1, t1).await?;
        total.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c, t) = (med(&mut connect), med(&mut total));
    println!(
        "connect {c:.2} ms, then 1-byte request and answer {t:.2} ms (medians of {})",
        o.count
    );
    println!(
        "wan mode=rtt count={} connect_ms={c:.2} rtt_ms={t:.2}",
        o.count
    );
    Ok(())
}

async fn resolve(o: &Opts) -> Result<std::net::SocketAddr, BoxError> {
    let a = o.connect.as_deref().unwrap_or_default();
    Ok(tokio::net::lookup_host(a)
        .await?
        .next()
        .ok_or_else(|| format!("{a}: no address"))?)
}

fn report(o: &Opts, secs: f64, ttfb: Duration, extra: &str) {
    let mib_s = o.bytes as f64 / MIB / secs;
    let ttfb = ttfb.as_secs_f64() * 1e3;
    let frame = if o.raw { 0 } else { o.frame };
    println!(
        "{}: {:.0} MiB in {secs:.3} s = {mib_s:.1} MiB/s (first byte after {ttfb:.1} ms)",
        mode(o),
        o.bytes as f64 / MIB
    );
    println!(
        "wan mode={} frame={frame} bytes={} secs={secs:.4} mib_per_s={mib_s:.1} ttfb_ms={ttfb:.2}{extra}",
        mode(o),
        o.bytes
    );
}
