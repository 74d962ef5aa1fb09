//! `chanserv`, the command line of the chanserv library: run a mesh node, serve a
//! service from a directory or a command, post to a service, ask a node what it sees.
//!
//! ```sh
//! cargo run -p chanserv-cli -- node --listen 127.0.0.1:7000
//! cargo run -p chanserv-cli -- serve files --dir . --join 127.0.0.1:7000
//! cargo run -p chanserv-cli -- post files --join 127.0.0.1:7000 --out /tmp/got
//! ```
//!
//! ## Layout
//! - `main` (this file): the command line (clap), dispatch, exit statuses, and the one
//!   place errors are printed (one line on stderr, never a backtrace).
//! - `mesh`: a node from flags (identity, keep-alive, listen, join), link events,
//!   signals. Every subcommand starts its node there. `tls`: the TLS flags and the
//!   `TlsConfig` loaded from them. `stdio`: `--spawn CMD` (a node in a child process,
//!   linked over its stdin and stdout) and `--stdio` (this node served on its own).
//! - `config`: `chanserv node --config FILE` (TOML) merged with the flags.
//! - `node`: `chanserv node`. `relay`: how a node forwards the services of the nodes
//!   joined to it (the library routes a name over one link only).
//! - `admin`: the reserved `chanserv.admin` service every CLI node answers, and its
//!   replies. `query`: `chanserv names` / `peers` / `routes` / `stats`, its clients; `stats`:
//!   the `stats` answer (links, services, blocked sources) and how it is printed.
//! - `prom`: `--metrics ADDR`, the library's metrics in the Prometheus text format.
//! - `serve`: `chanserv serve` (`--dir`, `--echo`); `exec`: `--exec`, one process per
//!   request.
//! - `post`: `chanserv post`; `output`: how its sources are printed or saved, and
//!   the progress display. `ping`: `chanserv ping`, requests timed one by one.
//! - `units`: durations (`5s`) and sizes (`64KiB`) on the command line.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// One event line on stdout (`println!`), unless stdout carries a link: see
/// [`stdio::say`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::stdio::say(format_args!($($arg)*))
    };
}

mod admin;
mod config;
mod exec;
mod mesh;
mod node;
mod output;
mod ping;
mod post;
mod progress;
mod prom;
mod query;
mod relay;
mod serve;
mod stats;
mod stdio;
mod tls;
mod units;

const EXAMPLES: &str = "\
Examples (three terminals):
  chanserv node --listen 127.0.0.1:7000
  chanserv serve files --dir ./public --join 127.0.0.1:7000
  chanserv post files --join 127.0.0.1:7000 --out ./got
  chanserv names --join 127.0.0.1:7000
  chanserv stats --join 127.0.0.1:7000

Exit status: 0 done; 1 usage, connection or lookup error; 2 the request failed;
3 the request completed but a source failed (chanserv post).
Logs: --log FILTER or RUST_LOG (e.g. --log chanserv=debug), on stderr.";

/// Run chanserv mesh nodes and services, and post to them, from a shell.
#[derive(Parser, Debug)]
#[command(name = "chanserv", version, after_help = EXAMPLES)]
struct Cli {
    /// Log filter for messages of the library, on stderr (as RUST_LOG:
    /// `warn`, `chanserv=debug`). Default: warnings for node and serve, none for the
    /// others.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a mesh node: listen, join, relay the services of nodes joined to it.
    Node(node::Args),
    /// Serve a service (a directory, a command, or an echo) from a node of its own.
    Serve(serve::Args),
    /// Post a request to a service and print or save its sources.
    Post(post::Args),
    /// List the services a node sees, with their providers.
    Names(query::NamesArgs),
    /// List the peers a node is linked to.
    Peers(query::Args),
    /// List the nodes a node reaches through the mesh, with the path to each.
    Routes(query::Args),
    /// Post small requests to a service, one after another, and time each.
    Ping(ping::Args),
    /// Show a node's links and the counters of the services it knows, with the
    /// sources a slow consumer holds back.
    Stats(query::Args),
}

/// Why a subcommand failed: a one-line message and the exit status that says so.
#[derive(Debug)]
pub struct Fail {
    code: u8,
    msg: String,
}

impl Fail {
    /// Usage, connection or lookup error: nothing was posted (exit status 1).
    pub fn usage(msg: impl Into<String>) -> Self {
        Fail {
            code: 1,
            msg: msg.into(),
        }
    }
    /// The request failed (exit status 2).
    pub fn request(msg: impl Into<String>) -> Self {
        Fail {
            code: 2,
            msg: msg.into(),
        }
    }
}

/// The status of a run that did not fail: 0, or 3 when some source failed.
pub const SOURCE_FAILED: u8 = 3;

fn main() -> ExitCode {
    // A bug must not print a backtrace either: one line, status 101 as Rust's.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        eprintln!("chanserv: internal error{at}: {}", one_line(&msg));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_failure(e),
    };
    let long_running = matches!(cli.cmd, Command::Node(_) | Command::Serve(_));
    if let Err(e) = init_logging(cli.log.as_deref(), long_running) {
        return report(Fail::usage(e));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(Fail::usage(format!("cannot start the runtime: {e}"))),
    };
    let r = rt.block_on(dispatch(cli.cmd));
    // A blocking read of stdin may still be running: do not wait for it.
    rt.shutdown_timeout(Duration::from_millis(100));
    match r {
        Ok(code) => ExitCode::from(code),
        Err(f) => report(f),
    }
}

async fn dispatch(cmd: Command) -> Result<u8, Fail> {
    match cmd {
        Command::Node(a) => node::run(a).await,
        Command::Serve(a) => serve::run(a).await,
        Command::Post(a) => post::run(a).await,
        Command::Names(a) => query::names(a).await,
        Command::Peers(a) => query::peers(a).await,
        Command::Routes(a) => query::routes(a).await,
        Command::Ping(a) => ping::run(a).await,
        Command::Stats(a) => stats::run(a).await,
    }
}

fn report(f: Fail) -> ExitCode {
    eprintln!("chanserv: {}", one_line(&f.msg));
    ExitCode::from(f.code)
}

/// Messages of the library and the OS may span lines; ours never do.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Help and version go to stdout as clap prints them; a usage error becomes one line
/// on stderr and status 1 (clap's own is several lines and status 2, which `post`
/// uses for a failed request).
fn clap_failure(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Nothing to do if stdout is closed.
            drop(e.print());
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => report(Fail::usage(
            "a subcommand is needed: node, serve, post, ping, names, peers, routes or stats (see --help)",
        )),
        _ => {
            // The message is the first paragraph (tips and usage follow a blank line).
            let text = e.render().to_string();
            let first = one_line(text.split("\n\n").next().unwrap_or_default());
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            report(Fail::usage(format!("{first} (see --help)")))
        }
    }
}

/// Logs of the library on stderr. A filter is `level` or `target=level` items, comma
/// separated (as RUST_LOG's simple form): a target filter without regular
/// expressions keeps `regex` out of the binary.
fn init_logging(filter: Option<&str>, long_running: bool) -> Result<(), String> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = if long_running {
        // yamux warns when both ends of a link close at once (as nodes do at exit),
        // and the library's control loop when a names update meets a link that is
        // closing (as services unbinding at shutdown do): the link events we print
        // already say what happened to links.
        "warn,yamux=error,chanserv::mux::control=error"
    } else {
        "off"
    };
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default.to_owned());
    let targets: Targets = filter
        .parse()
        .map_err(|e| format!("bad log filter {filter:?}: {e}"))?;
    tracing_subscriber::fmt()
        // The builder's own default stops at INFO: let `targets` decide alone.
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .finish()
        .with(targets)
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(super::one_line("a\n  b\tc\n"), "a b c");
    }
}
