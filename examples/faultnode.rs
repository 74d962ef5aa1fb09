//! One node of the multi-host fault script (`scripts/faults.sh`): a paced server, or a
//! client that posts requests, verifies every byte and reports every source's fate as
//! one machine-readable line.
//!
//! ```sh
//! faultnode serve --listen 10.77.0.11:7000 --name paced [--sources 4 --frames 400 --size 4096]
//!                 [--interval-ms 20] [--keepalive-ms 500,2000]
//! faultnode post  --join 10.77.0.11:7000,10.77.0.12:7000 --name paced [--requests 0]
//!                 [--parallel 6] [--buckets] [--hang-ms 6000] [--keepalive-ms 500,2000]
//! ```
//!
//! Every line is `word fields… key=value…`; `t=` is Unix time in milliseconds, so lines
//! of processes in different network namespaces compare directly.
//!
//! serve prints `ready <node-id> <addr> t=`, then `dropped <count> req= idx= sent=a/b t=`
//! for each producer dropped before its last frame (the server noticed its consumer is
//! gone), `error …`/`error_mass …` for what the server reports, and `link up|down`.
//!
//! post prints `link up|down <peer>`, `req <r> node=<peer>` when a request's first
//! source arrives, one line per source when it ends:
//! `source <req> <idx> ok <frames> <bytes> <elapsed_ms>`,
//! `source <req> <idx> err <kind> <ms since start>` or
//! `source <req> <idx> hung <ms since start>` (no frame for `--hang-ms`; the source is
//! then dropped; `repoll=` says what one more poll gave), each followed by
//! `node= start= last= end= frames= bytes=` (`last`: time of its last frame); then
//! `req <r> end ok|err <kind>|hung`, and at the end (`--requests` posted, or SIGTERM:
//! stop posting, let requests in flight end) a `summary` line. Requests run in
//! `--parallel` lanes; a lane whose request failed posts the next one, which goes to a
//! live server.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chanserv::{
    Client, Error, LinkEvent, Node, NodeConfig, NodeId, RequestTag, Server, ServerConfig, Source,
};
use futures::{stream, FutureExt, Stream, StreamExt};

// ------------------------------------------------------------------ options

struct Opts {
    role: String,
    listen: Option<SocketAddr>,
    join: Vec<SocketAddr>,
    name: String,
    sources: u32,
    frames: u64,
    size: usize,
    interval: Duration,
    keepalive: Option<(Duration, Duration)>,
    requests: u64,
    parallel: u32,
    buckets: bool,
    hang: Duration,
}

const USAGE: &str = "usage: faultnode serve --listen IP:PORT --name NAME [--sources N --frames N \
--size N --interval-ms N] [--keepalive-ms I,T]\n       faultnode post --join IP:PORT[,IP:PORT…] \
--name NAME [--requests N (0: until SIGTERM)] [--parallel N] [--buckets] [--hang-ms N] \
[--keepalive-ms I,T]";

fn opts() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let role = args.next().unwrap_or_default();
    if role != "serve" && role != "post" {
        return Err(USAGE.into());
    }
    let mut o = Opts {
        role,
        listen: None,
        join: Vec::new(),
        name: "paced".into(),
        sources: 4,
        frames: 400,
        size: 4096,
        interval: Duration::from_millis(20),
        keepalive: None,
        requests: 0,
        parallel: 6,
        buckets: false,
        hang: Duration::from_millis(6000),
    };
    while let Some(flag) = args.next() {
        if flag == "--buckets" {
            o.buckets = true;
            continue;
        }
        let v = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |what: &str| format!("{flag} {v}: expected {what}\n{USAGE}");
        let num = |v: &str| v.parse::<u64>().map_err(|_| bad("a number"));
        match flag.as_str() {
            "--listen" => o.listen = Some(v.parse().map_err(|_| bad("IP:PORT"))?),
            "--join" => {
                o.join = v
                    .split(',')
                    .map(|a| a.parse().map_err(|_| bad("IP:PORT[,IP:PORT…]")))
                    .collect::<Result<_, _>>()?
            }
            "--name" => o.name = v.clone(),
            "--sources" => o.sources = num(&v)? as u32,
            "--frames" => o.frames = num(&v)?,
            "--size" => o.size = num(&v)? as usize,
            "--interval-ms" => o.interval = Duration::from_millis(num(&v)?),
            "--requests" => o.requests = num(&v)?,
            "--parallel" => o.parallel = (num(&v)? as u32).max(1),
            "--hang-ms" => o.hang = Duration::from_millis(num(&v)?),
            "--keepalive-ms" => {
                let (i, t) = v.split_once(',').ok_or_else(|| bad("I,T"))?;
                let (i, t) = (num(i)?, num(t)?);
                if i == 0 || i >= t {
                    return Err(bad("0 < I < T"));
                }
                o.keepalive = Some((Duration::from_millis(i), Duration::from_millis(t)));
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    match o.role.as_str() {
        "serve" if o.listen.is_none() => Err(format!("serve needs --listen\n{USAGE}")),
        "post" if o.join.is_empty() => Err(format!("post needs --join\n{USAGE}")),
        _ => Ok(o),
    }
}

/// Unix time in milliseconds: the clock every process of the script shares.
fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn node(o: &Opts) -> Node {
    let mut cfg = NodeConfig::default();
    if let Some((interval, timeout)) = o.keepalive {
        cfg = cfg.keepalive(interval, timeout);
    }
    Node::with_config(cfg)
}

/// Frame `frame` of source `idx` of request `req`: a 16-byte label (req, idx, frame),
/// then a pattern that depends on all three. The client rebuilds it to compare.
fn frame_bytes(req: u64, idx: u32, frame: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    let mut label = [0u8; 16];
    label[..4].copy_from_slice(&(req as u32).to_le_bytes());
    label[4..8].copy_from_slice(&idx.to_le_bytes());
    label[8..].copy_from_slice(&frame.to_le_bytes());
    let seed = req.wrapping_mul(131) ^ u64::from(idx).wrapping_mul(31) ^ frame.wrapping_mul(7);
    out.extend((0..size).map(|k| match label.get(k) {
        Some(b) => *b,
        None => (seed.wrapping_add(k as u64 * 13) >> 1) as u8,
    }));
}

/// Prints `link up|down <peer> t=` for the node's link events.
fn log_links(node: &Node) {
    let mut events = node.subscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Some(LinkEvent::Up(p)) => println!("link up {:016x} t={}", p.node, now_ms()),
                Some(LinkEvent::Down(p)) => println!("link down {:016x} t={}", p.node, now_ms()),
                Some(LinkEvent::Missed(n)) => println!("link events_lagged {n} t={}", now_ms()),
                Some(_) => {}
                None => return,
            }
        }
    });
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
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
    let r = if o.role == "serve" {
        serve(o).await
    } else {
        post(o).await
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("faultnode: {e}");
            ExitCode::FAILURE
        }
    }
}

// ------------------------------------------------------------------ serve

/// One source's frames, one per tick. Dropping it before its last frame is the
/// server noticing that nobody reads the source any more: it says so on stdout.
struct Paced {
    req: u64,
    idx: u32,
    sent: u64,
    frames: u64,
    size: usize,
    tick: tokio::time::Interval,
    dropped: Arc<AtomicU64>,
}

impl Stream for Paced {
    type Item = Bytes;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.sent == self.frames {
            return Poll::Ready(None);
        }
        ready!(self.tick.poll_tick(cx));
        let mut buf = Vec::with_capacity(self.size);
        frame_bytes(self.req, self.idx, self.sent, self.size, &mut buf);
        self.sent += 1;
        Poll::Ready(Some(Bytes::from(buf)))
    }
}

impl Drop for Paced {
    fn drop(&mut self) {
        if self.sent < self.frames {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            println!(
                "dropped {n} req={} idx={} sent={}/{} t={}",
                self.req,
                self.idx,
                self.sent,
                self.frames,
                now_ms()
            );
        }
    }
}

async fn serve(o: Opts) -> Result<bool, Error> {
    let node = node(&o);
    log_links(&node);
    let addr = node.listen(o.listen.expect("checked")).await?;
    let cfg = ServerConfig::default()
        .on_error(|e| println!("error {} t={}", e.to_string().replace(' ', "_"), now_ms()))
        // Same as the default (pause 30 s), but visible.
        .on_max_error_mass(|n| async move {
            println!("error_mass {n} pausing_30s t={}", now_ms());
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
    let dropped = Arc::new(AtomicU64::new(0));
    let (sources, frames, size, interval) = (o.sources, o.frames, o.size, o.interval);
    let _service =
        Server::with_config(node.clone(), cfg).listen_and_serve(&o.name, move |req| {
            let r: u64 = String::from_utf8_lossy(&req.body).parse().unwrap_or(0);
            let dropped = dropped.clone();
            stream::iter(0..sources).map(move |idx| {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let paced = Paced {
                    req: r,
                    idx,
                    sent: 0,
                    frames,
                    size,
                    tick,
                    dropped: dropped.clone(),
                };
                Source::new(format!("{r} {idx} {frames} {size}"), paced)
            })
        })?;
    println!("ready {:016x} {addr} t={}", node.id(), now_ms());
    // Serve until killed.
    std::future::pending::<()>().await;
    Ok(true)
}

// ------------------------------------------------------------------ post

/// What `join_server` hands back for the client to keep while it runs: the handle that
/// owns the server's reconnect loop (dropping it would leave).
type JoinKeep = chanserv::Joined;

/// The one place that joins a server.
async fn join_server(node: &Node, addr: SocketAddr) -> chanserv::Result<(NodeId, JoinKeep)> {
    node.join(addr).await.map(|j| (j.peer(), j))
}

/// A short name for an error, one word for the script.
fn kind(e: &Error) -> String {
    match e {
        Error::Timeout(t) => format!("timeout:{}", t.to_string().replace(' ', "_")),
        Error::Reset => "reset".into(),
        Error::LinkClosed => "link_closed".into(),
        Error::Closed => "closed".into(),
        Error::SourceFailed(_) | Error::RequestFailed(_) => "remote".into(),
        Error::Io(io) => format!("io:{:?}", io.kind()),
        Error::NoSuchAddress(_) => "no_such_address".into(),
        Error::Refused(_) => "refused".into(),
        e if e.is_protocol() => "protocol".into(),
        _ => "other".into(),
    }
}

#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    requests_failed: AtomicU64,
    ok: AtomicU64,
    err: AtomicU64,
    hung: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
}

struct Ctx {
    client: Client<Node>,
    name: String,
    buckets: bool,
    hang: Duration,
    requests: u64,
    next: AtomicU64,
    stop: AtomicBool,
    started: Instant,
    totals: Totals,
}

async fn post(o: Opts) -> Result<bool, Error> {
    let node = node(&o);
    println!("clock start={} node={:016x}", now_ms(), node.id());
    log_links(&node);
    let mut keep = Vec::new();
    for addr in &o.join {
        match join_server(&node, *addr).await {
            Ok((peer, k)) => {
                println!("joined {addr} {peer:016x} t={}", now_ms());
                keep.push(k);
            }
            Err(e) => println!("join {addr} err {} t={}", kind(&e), now_ms()),
        }
    }
    let want = o.join.len();
    if node
        .wait_for_providers(&o.name, want, Duration::from_secs(10))
        .await
        .is_err()
    {
        println!(
            "providers {} of {want} t={}",
            node.providers(&o.name).len(),
            now_ms()
        );
    }
    let ctx = Arc::new(Ctx {
        client: Client::new(node.clone())?,
        name: o.name.clone(),
        buckets: o.buckets,
        hang: o.hang,
        requests: o.requests,
        next: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        started: Instant::now(),
        totals: Totals::default(),
    });
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            println!("stopping t={}", now_ms());
            ctx.stop.store(true, Ordering::Relaxed);
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            std::process::exit(130);
        });
    }
    let lanes: Vec<_> = (0..o.parallel)
        .map(|_| tokio::spawn(lane(ctx.clone())))
        .collect();
    for l in lanes {
        l.await.expect("lane task");
    }
    let t = &ctx.totals;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "summary requests={} requests_failed={} sources_ok={} sources_err={} sources_hung={} \
frames_verified={} bytes_verified={} elapsed_ms={}",
        get(&t.requests),
        get(&t.requests_failed),
        get(&t.ok),
        get(&t.err),
        get(&t.hung),
        get(&t.frames),
        get(&t.bytes),
        ctx.started.elapsed().as_millis()
    );
    drop(keep);
    Ok(get(&t.hung) == 0)
}

async fn lane(ctx: Arc<Ctx>) {
    while !ctx.stop.load(Ordering::Relaxed) {
        let req = ctx.next.fetch_add(1, Ordering::Relaxed);
        if ctx.requests > 0 && req > ctx.requests {
            return;
        }
        ctx.totals.requests.fetch_add(1, Ordering::Relaxed);
        let outcome = request(&ctx, req).await;
        println!("req {req} end {outcome} t={}", now_ms());
        if outcome != "ok" {
            ctx.totals.requests_failed.fetch_add(1, Ordering::Relaxed);
            // No live server, or one that just failed: do not spin.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Awaits `fut` unless `hang` passes first, checking the deadline first: a future that
/// became ready without waking its task (a lost wakeup) counts as hung, as it would for
/// any consumer parked in `.await`. (`tokio::time::timeout` polls the future once more
/// when its deadline fires, which would hide exactly that.)
async fn within<F: Future>(hang: Duration, fut: F) -> Option<F::Output> {
    let deadline = tokio::time::sleep(hang);
    tokio::pin!(deadline, fut);
    tokio::select! {
        biased;
        _ = &mut deadline => None,
        r = &mut fut => Some(r),
    }
}

/// Posts request `req`, reads every source concurrently; "ok", "err <kind>" or "hung".
async fn request(ctx: &Arc<Ctx>, req: u64) -> String {
    println!("post {req} t={}", now_ms());
    let tags = match ctx.buckets {
        true => vec![RequestTag::Bucket(format!("b{req}"))],
        false => vec![],
    };
    let post = ctx
        .client
        .lookup_and_post(&ctx.name, req.to_string(), &tags);
    let mut sources = match within(ctx.hang, post).await {
        None => return "hung post".into(),
        Some(Err(e)) => return format!("err {}", kind(&e)),
        Some(Ok(s)) => s,
    };
    let mut readers = Vec::new();
    let mut outcome = String::from("ok");
    loop {
        match within(ctx.hang, sources.next()).await {
            None => {
                outcome = "hung sources".into();
                break;
            }
            Some(None) => break,
            Some(Some(Err(e))) => {
                outcome = format!("err {}", kind(&e));
                break;
            }
            Some(Some(Ok(source))) => {
                let node = source.meta().remote_addr().map_or(0, |a| a.node());
                if readers.is_empty() {
                    println!("req {req} node={node:016x} t={}", now_ms());
                }
                readers.push(tokio::spawn(read_source(ctx.clone(), source, node, req)));
            }
        }
    }
    drop(sources);
    for r in readers {
        let verdict = r.await.expect("reader task");
        if outcome == "ok" && verdict != "ok" {
            outcome = verdict.into();
        }
    }
    outcome
}

/// Reads one source of request `req` to its end, checking every byte against what the
/// server must have made (header `<req> <idx> <frames> <size>`); prints its `source`
/// line.
async fn read_source(ctx: Arc<Ctx>, mut source: Source, node: NodeId, req: u64) -> &'static str {
    let start = now_ms();
    let t0 = Instant::now();
    let header = String::from_utf8_lossy(source.header()).into_owned();
    let h: Vec<u64> = header.split(' ').filter_map(|f| f.parse().ok()).collect();
    let (header_ok, idx, want_frames, size) = match h[..] {
        [r, i, f, s] if r == req => (true, i as u32, f, s as usize),
        _ => (false, u32::MAX, 0, 0),
    };
    let (mut frames, mut bytes, mut last) = (0u64, 0u64, start);
    let mut expect = Vec::with_capacity(size);
    let (verdict, what) = loop {
        if !header_ok {
            break ("err", "header".into());
        }
        match within(ctx.hang, source.next()).await {
            None => {
                // Was it parked for good, or ready without having woken its task?
                let repoll = match source.next().now_or_never() {
                    None => "pending".into(),
                    Some(None) => "end".into(),
                    Some(Some(Ok(_))) => "frame".into(),
                    Some(Some(Err(e))) => kind(&e),
                };
                break ("hung", format!(" repoll={repoll}"));
            }
            Some(Some(Ok(frame))) => {
                frame_bytes(req, idx, frames, size, &mut expect);
                if frame[..] != expect[..] {
                    break ("err", "corrupt".into());
                }
                frames += 1;
                bytes += frame.len() as u64;
                last = now_ms();
                ctx.totals.frames.fetch_add(1, Ordering::Relaxed);
                ctx.totals
                    .bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
            Some(Some(Err(e))) => break ("err", kind(&e)),
            Some(None) if frames == want_frames => break ("ok", String::new()),
            Some(None) => break ("err", "short".into()),
        }
    };
    drop(source);
    let since = ctx.started.elapsed().as_millis();
    let tail = format!(
        "node={node:016x} start={start} last={last} end={} frames={frames} bytes={bytes}",
        now_ms()
    );
    match verdict {
        "ok" => {
            ctx.totals.ok.fetch_add(1, Ordering::Relaxed);
            let took = t0.elapsed().as_millis();
            println!("source {req} {idx} ok {frames} {bytes} {took} {tail}");
        }
        "hung" => {
            ctx.totals.hung.fetch_add(1, Ordering::Relaxed);
            println!("source {req} {idx} hung {since} {tail}{what}");
        }
        _ => {
            ctx.totals.err.fetch_add(1, Ordering::Relaxed);
            println!("source {req} {idx} err {what} {since} {tail}");
        }
    }
    verdict
}
