//! `chanserv serve NAME`: a service from the command line, on a node of its own that
//! joins the mesh (and may listen). What it answers is one of: the files of a
//! directory (`--dir`), the output of a command run per request (`--exec`, in
//! `exec`), or the request body (`--echo`). It answers the admin service too.
//!
//! Lines on stdout: `node <id>`, `identity <name>` (with TLS), `listen <addr>`,
//! `joined <addr> <peer>`, `spawned child:<pid> <peer>`, `serving <name>`, `metrics
//! <addr>` (with `--metrics`), `ready`, link events, `shutdown <signal>`, `stopped`;
//! none with `--stdio`, where stdout is the link.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use chanserv::{BoxError, Bytes, ServeHandle, Server, Source};
use futures::stream::{self, StreamExt};
use tokio::io::AsyncReadExt;

use crate::admin::{self, is_reserved, AdminInfo};
use crate::mesh::{self, describe, IdentArgs, JoinArgs, ListenArgs, Plan, Signals};
use crate::prom::{self, MetricsArgs};
use crate::tls::TlsArgs;
use crate::units::{parse_duration, parse_size};
use crate::Fail;

/// The largest `--chunk`: a frame well under the library's 100 MiB frame limit.
const MAX_CHUNK: usize = 16 << 20;

const EXAMPLES: &str = "\
Examples:
  chanserv serve files --dir ./public --join 127.0.0.1:7000
  chanserv serve files --dir ./public --chunk 1MiB --listen 127.0.0.1:7001
  chanserv serve upper --join 127.0.0.1:7000 --exec tr a-z A-Z
  chanserv serve sh --join 127.0.0.1:7000 --exec sh -c 'wc -c; date'
  chanserv serve ping --join 127.0.0.1:7000 --echo --metrics 127.0.0.1:9101
  chanserv post ping hello --spawn 'chanserv serve ping --echo --stdio'   # a child node

--dir: each regular file of PATH (not its subdirectories) is a source, its file name the
header, its contents the frames, --chunk bytes each; the request body is ignored.
--exec: each request runs CMD with the body on stdin; its stdout is the frames of one source
(header `stdout`), a frame per read. A non-zero exit or a signal fails that source with the
last 1 KiB of stderr; a command that cannot start fails the request. A client that drops the
request kills the command and every process it started (its process group). --exec takes
the rest of the line: put it last.
--echo: one source (header `echo`) whose one frame is the body.";

/// `chanserv serve` flags.
#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["dir", "exec", "echo"])))]
pub struct Args {
    /// The service name to bind.
    #[arg(value_name = "NAME")]
    service: String,
    /// Serve the files of this directory.
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
    /// Run this command per request (the rest of the line).
    #[arg(long, value_name = "CMD", num_args = 1.., allow_hyphen_values = true)]
    exec: Option<Vec<String>>,
    /// Answer each request with its body.
    #[arg(long)]
    echo: bool,
    /// Frame size for --dir, and most bytes of one frame for --exec.
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = parse_size)]
    chunk: usize,
    #[command(flatten)]
    listen: ListenArgs,
    #[command(flatten)]
    join: JoinArgs,
    #[command(flatten)]
    ident: IdentArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    /// On SIGINT/SIGTERM, how long requests in flight may take to finish.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    grace: Duration,
}

/// Runs the service until a signal.
pub async fn run(args: Args) -> Result<u8, Fail> {
    if is_reserved(&args.service) {
        return Err(Fail::usage(format!(
            "{:?}: names beginning with `chanserv.` are reserved",
            args.service
        )));
    }
    if !(1..=MAX_CHUNK).contains(&args.chunk) {
        return Err(Fail::usage("--chunk must be 1 byte to 16 MiB"));
    }
    let plan = Plan {
        ident: args.ident,
        listen: args.listen,
        join: args.join,
        tls: args.tls,
    };
    if plan.join.join.is_empty()
        && plan.join.join_unix.is_empty()
        && plan.join.spawn.is_empty()
        && plan.listen.listen.is_empty()
        && plan.listen.listen_unix.is_empty()
        && !plan.listen.stdio
    {
        let hint = match args.exec {
            Some(_) => " (--exec takes the rest of the line: put it last)",
            None => " (see --help)",
        };
        return Err(Fail::usage(format!(
            "serve needs --join, --listen or --stdio{hint}"
        )));
    }
    if let Some(dir) = &args.dir {
        if !dir.is_dir() {
            return Err(Fail::usage(format!("{} is not a directory", dir.display())));
        }
    }
    let mut signals = Signals::new()?;
    let mut mesh = plan.start().await?;
    let server = Server::new(mesh.node.clone());
    let (name, chunk) = (args.service.as_str(), args.chunk);
    let bound = match (args.dir, args.exec) {
        (Some(dir), _) => serve_dir(&server, name, Arc::new(dir), chunk),
        (None, Some(cmd)) => crate::exec::serve(&server, name, Arc::new(cmd), chunk),
        (None, None) => serve_echo(&server, name),
    };
    let service =
        bound.map_err(|e| Fail::usage(format!("cannot serve {name}: {}", describe(&e))))?;
    let info = AdminInfo {
        listen: mesh.listening.clone(),
        ..AdminInfo::default()
    };
    let served = info.served.clone();
    served.insert(name.to_owned(), service);
    let metrics = prom::start(&args.metrics, &mesh.node, &info).await?;
    let admin = admin::serve(&mesh.node, info)?;
    mesh.print_identity();
    say!("serving {name}");
    if let Some(m) = &metrics {
        say!("metrics {}", m.addr);
    }
    say!("ready");
    let sig = mesh::until_signal(&mut mesh, &mut signals).await;
    say!("shutdown {sig}");
    let deadline = tokio::time::Instant::now() + args.grace;
    let stop = async {
        let service =
            futures::future::join_all(served.take().into_iter().map(|h| h.shutdown(args.grace)));
        tokio::join!(service, admin.shutdown(args.grace));
        mesh.shutdown(crate::node::left(deadline)).await;
    };
    mesh::stop_or_second_signal(&mut signals, stop).await;
    say!("stopped");
    Ok(0)
}

fn serve_echo(server: &Server, name: &str) -> chanserv::Result<ServeHandle> {
    server.listen_and_serve(name, |req| {
        stream::iter([Source::new("echo", stream::iter([req.body]))])
    })
}

fn serve_dir(
    server: &Server,
    name: &str,
    dir: Arc<PathBuf>,
    chunk: usize,
) -> chanserv::Result<ServeHandle> {
    server.listen_and_serve_async(name, move |_req| {
        let dir = dir.clone();
        async move {
            let files = list_files(&dir).await?;
            Ok(stream::iter(files)
                .map(move |(header, path)| Source::try_new(header, file_frames(path, chunk))))
        }
    })
}

/// The regular files of `dir` (symbolic links followed), sorted by name, as (file
/// name, path). Read per request, so the service shows the directory as it is now.
async fn list_files(dir: &Path) -> Result<Vec<(Bytes, PathBuf)>, BoxError> {
    let mut rd = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    while let Some(entry) = rd.next_entry().await? {
        let path = entry.path();
        if tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            files.push((Bytes::from(name), path));
        }
    }
    files.sort();
    Ok(files)
}

/// A file's contents in frames of exactly `chunk` bytes (the last one shorter; none
/// for an empty file), read as the consumer takes them.
fn file_frames(
    path: PathBuf,
    chunk: usize,
) -> impl futures::Stream<Item = Result<Bytes, String>> + Send {
    stream::try_unfold((path, None), move |(path, file)| async move {
        let mut file = match file {
            Some(f) => f,
            None => tokio::fs::File::open(&path)
                .await
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
        };
        let mut buf = BytesMut::with_capacity(chunk);
        while buf.len() < chunk {
            let want = chunk - buf.len();
            let n = (&mut file)
                .take(want as u64)
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
        }
        if buf.is_empty() {
            return Ok(None);
        }
        Ok(Some((buf.freeze(), (path, Some(file)))))
    })
}
