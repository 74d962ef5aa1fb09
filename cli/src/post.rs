//! `chanserv post NAME [BODY]`: joins the mesh, waits for the service, posts one
//! request and reads its sources (one after the other for `text`, `hex` and `raw`
//! output, so it reads in order; up to [`PARALLEL`] at once for `json` and `--out`).
//! The exit status tells how it went (see [`crate::Fail`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanserv::{Bytes, Client, RequestTag, Source, Sources};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mesh::{describe, IdentArgs, JoinArgs, Plan};
use crate::output::{Mode, Printer, Saver, Stats};
use crate::progress::Progress;
use crate::tls::TlsArgs;
use crate::units::parse_duration;
use crate::{Fail, SOURCE_FAILED};

/// Sources read at once when their output need not be in order.
const PARALLEL: usize = 16;

const EXAMPLES: &str = "\
Examples:
  chanserv post ping hello --join 127.0.0.1:7000
  chanserv post files --join 127.0.0.1:7000 --out ./got
  echo hello | chanserv post upper - --join 127.0.0.1:7000 --output raw
  chanserv post files --join 127.0.0.1:7000 --output json --timeout 2s
  chanserv post ping hello --spawn 'chanserv serve ping --echo --stdio'

Output (--output): text: `source <i> \"<header>\"`, the frames as text, `end <i> ...` or
`error <i> ...: <message>`; hex: a `frame <i> <len> <hex>` line per frame; raw: only the
frames' bytes; json: one object per line, event source|frame|end|error|request_error|done.
--out DIR saves each source to DIR/<header> (no path separators; duplicates get .1, .2).
Progress goes to stderr: a live line on a terminal, a line per source otherwise (-q: none).

Exit status: 0 every source completed; 1 usage, connection error, or no such service within
--timeout; 2 the request failed (the service failed it, or the link died); 3 the request
completed but at least one source failed.";

/// `chanserv post` flags.
#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The service to post to.
    #[arg(value_name = "NAME")]
    service: String,
    /// The request body; `-` reads it from stdin [default: empty].
    #[arg(value_name = "BODY")]
    body: Option<String>,
    /// Read the request body from a file.
    #[arg(long, value_name = "PATH", conflicts_with = "body")]
    body_file: Option<PathBuf>,
    /// How to print what arrives.
    #[arg(long, short, value_enum, default_value = "text")]
    output: Mode,
    /// Save each source to a file in this directory (created if missing).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Longest wait for the service's name to reach this node.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Send a free-form tag with the request (repeatable).
    #[arg(long, value_name = "TEXT")]
    tag: Vec<String>,
    /// Pick the serving node by consistent hashing on this key.
    #[arg(long, value_name = "KEY")]
    bucket: Option<String>,
    /// No progress on stderr.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    join: JoinArgs,
    #[command(flatten)]
    ident: IdentArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Posts, prints, and says how it went.
pub async fn run(args: Args) -> Result<u8, Fail> {
    let plan = Plan::client("post", &args.ident, &args.join, &args.tls)?;
    let body = read_body(args.body.as_deref(), args.body_file.as_deref()).await?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| Fail::usage(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mesh = plan.start().await?;
    let r = post(&mesh.node, &args, body).await;
    mesh.shutdown(Duration::from_secs(1)).await;
    r
}

pub async fn read_body(arg: Option<&str>, file: Option<&Path>) -> Result<Bytes, Fail> {
    if let Some(path) = file {
        return tokio::fs::read(path)
            .await
            .map(Bytes::from)
            .map_err(|e| Fail::usage(format!("cannot read {}: {e}", path.display())));
    }
    match arg {
        None => Ok(Bytes::new()),
        Some("-") => {
            let mut buf = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut buf)
                .await
                .map_err(|e| Fail::usage(format!("cannot read stdin: {e}")))?;
            Ok(buf.into())
        }
        Some(s) => Ok(Bytes::from(s.to_owned())),
    }
}

/// Waits up to `within` (`--timeout`) for `name` to reach `node`, then makes a client
/// on it. A name that does not show up is a usage error: nothing was posted.
pub async fn client_for(
    node: &chanserv::Node,
    name: &str,
    within: Duration,
) -> Result<Client, Fail> {
    node.wait_for_name(name, within)
        .await
        .map_err(|e| match e {
            chanserv::Error::NoSuchAddress(_) => Fail::usage(format!(
                "no service named {name:?} within {within:?} (--timeout)"
            )),
            other => Fail::usage(describe(&other)),
        })?;
    Client::new(node.clone()).map_err(|e| Fail::usage(describe(&e)))
}

async fn post(node: &chanserv::Node, args: &Args, body: Bytes) -> Result<u8, Fail> {
    let name = &args.service;
    let client = client_for(node, name, args.timeout).await?;
    let mut tags: Vec<RequestTag> = args.tag.iter().cloned().map(RequestTag::Meta).collect();
    tags.extend(args.bucket.clone().map(RequestTag::Bucket));
    let sources = client
        .lookup_and_post(name, body, &tags)
        .await
        .map_err(|e| Fail::request(format!("posting to {name}: {}", describe(&e))))?;
    let sink = Sink {
        printer: Printer::new(args.output),
        progress: Progress::new(args.quiet),
        io_error: None,
        sources: 0,
        failed: 0,
    };
    let ctx = Ctx {
        sink: Mutex::new(sink),
        saver: args.out.clone().map(Saver::new),
    };
    let request_error = consume(&ctx, sources, args.output, args.out.is_some()).await;
    let mut sink = ctx.sink.into_inner().unwrap();
    let (count, failed) = (sink.sources, sink.failed);
    sink.print(|p| p.done(count, failed, request_error.as_deref()));
    sink.progress.finish(count, failed, request_error.is_some());
    match sink.io_error {
        // The reader left (`| head`): what it read was what it wanted.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Some(e) => return Err(Fail::usage(format!("cannot write the output: {e}"))),
        None => {}
    }
    match request_error {
        Some(e) => Err(Fail::request(e)),
        None if failed > 0 => Ok(SOURCE_FAILED),
        None => Ok(0),
    }
}

/// What every source task shares: output, progress, counts.
struct Sink {
    printer: Printer,
    progress: Progress,
    /// The first failed write to stdout; printing stops there.
    io_error: Option<std::io::Error>,
    sources: usize,
    failed: usize,
}

impl Sink {
    /// Prints, unless the output failed before (then nothing is printed any more).
    fn print(&mut self, f: impl FnOnce(&mut Printer) -> std::io::Result<()>) {
        if self.io_error.is_none() {
            let Sink {
                printer, progress, ..
            } = self;
            // Flushed at once: output shows as it arrives (a frame is one write).
            if let Err(e) = progress.around(|| f(printer).and_then(|()| printer.flush())) {
                self.io_error = Some(e);
            }
        }
    }

    /// True once stdout failed: reading on is pointless.
    fn closed(&self) -> bool {
        self.io_error.is_some()
    }
}

struct Ctx {
    sink: Mutex<Sink>,
    saver: Option<Saver>,
}

/// Reads every source; returns the request's error, if it failed.
async fn consume(ctx: &Ctx, sources: Sources, mode: Mode, saving: bool) -> Option<String> {
    let parallel = if saving || mode == Mode::Json {
        PARALLEL
    } else {
        1
    };
    let request_error = Arc::new(Mutex::new(None));
    sources
        .take_while(|_| std::future::ready(!ctx.sink.lock().unwrap().closed()))
        .enumerate()
        .for_each_concurrent(parallel, |(i, r)| {
            let request_error = request_error.clone();
            async move {
                match r {
                    Ok(source) => read_source(ctx, i, source).await,
                    Err(e) => *request_error.lock().unwrap() = Some(e.to_string()),
                }
            }
        })
        .await;
    let e = request_error.lock().unwrap().take();
    e
}

async fn read_source(ctx: &Ctx, i: usize, mut source: Source) {
    let header = source.header().clone();
    {
        let mut sink = ctx.sink.lock().unwrap();
        sink.sources += 1;
        sink.progress.source_started();
        sink.print(|p| p.source(i, &header));
    }
    let mut stats = Stats::default();
    let r = match &ctx.saver {
        Some(saver) => save(ctx, saver, i, &mut source, &mut stats).await.map(Some),
        None => print_frames(ctx, i, &mut source, &mut stats)
            .await
            .map(|()| None),
    };
    let mut sink = ctx.sink.lock().unwrap();
    match r {
        Ok(file) => {
            sink.progress.source_ended(i, &header, stats, None);
            sink.print(|p| p.end(i, &header, stats, file.as_deref()));
        }
        Err(e) => {
            sink.failed += 1;
            sink.progress.source_ended(i, &header, stats, Some(&e));
            sink.print(|p| p.error(i, &header, stats, &e));
        }
    }
}

async fn print_frames(
    ctx: &Ctx,
    i: usize,
    source: &mut Source,
    stats: &mut Stats,
) -> Result<(), String> {
    while let Some(frame) = source.next().await {
        let frame = frame.map_err(|e| e.to_string())?;
        stats.frames += 1;
        stats.bytes += frame.len() as u64;
        let mut sink = ctx.sink.lock().unwrap();
        sink.progress.frame(frame.len());
        sink.print(|p| p.frame(i, &frame));
        if sink.closed() {
            // Nobody reads on: dropping the source cancels it.
            break;
        }
    }
    Ok(())
}

async fn save(
    ctx: &Ctx,
    saver: &Saver,
    i: usize,
    source: &mut Source,
    stats: &mut Stats,
) -> Result<PathBuf, String> {
    let (path, mut file) = saver
        .create(i, source.header())
        .await
        .map_err(|e| format!("cannot save: {e}"))?;
    let write_err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    while let Some(frame) = source.next().await {
        let frame = frame.map_err(|e| e.to_string())?;
        file.write_all(&frame).await.map_err(write_err)?;
        stats.frames += 1;
        stats.bytes += frame.len() as u64;
        ctx.sink.lock().unwrap().progress.frame(frame.len());
    }
    file.flush().await.map_err(write_err)?;
    Ok(path)
}
