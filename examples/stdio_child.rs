//! A node served on its own stdin and stdout, with a service `echo`: the smallest
//! program a parent node drives with `Node::spawn_child`, and the child of
//! `tests/stdio.rs`.
//!
//! ```sh
//! cargo build --example stdio_child
//! # then, in the parent:
//! #   let child = node.spawn_child(Command::new("target/debug/examples/stdio_child")).await?;
//! ```
//!
//! `echo` answers a request with one source, `echo`, whose frames are the body in
//! pieces of 4 KiB; the body `hold` gets one frame, `held`, and then nothing until the
//! request goes. The process exits when the link ends (its parent went away). Nothing
//! but the link may go to stdout: errors go to stderr.
//!
//! For the tests: `stdio_child linger` serves the same, but stays 30 s when the link
//! ends (a kill ends it sooner); `stdio_child garbage` writes text where the handshake
//! belongs, `stdio_child short` writes too little of anything, `stdio_child exit N`
//! exits at once with status N.

use std::io::Write;
use std::process::ExitCode;

use bytes::Bytes;
use chanserv::{Node, Request, Server, Source};
use futures::stream::{self, BoxStream, StreamExt};

/// The largest frame `echo` sends.
const PIECE: usize = 4096;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => serve(),
        ["linger"] => {
            let served = serve();
            if served != ExitCode::SUCCESS {
                return served;
            }
            // Only a kill ends us now, or this time, which no test waits for: a failed
            // test leaves no process behind for long.
            std::thread::sleep(std::time::Duration::from_secs(30));
            ExitCode::SUCCESS
        }
        ["garbage"] => squat(b"this is not a chanserv node\n"),
        ["short"] => squat(b"hi\n"),
        ["exit", code] => ExitCode::from(code.parse::<u8>().unwrap_or(1)),
        ref other => {
            eprintln!("stdio_child: unknown arguments {other:?}");
            ExitCode::from(2)
        }
    }
}

fn serve() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stdio_child: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        let node = Node::new();
        // Bound before the link is up: the parent learns the name with the link.
        let _echo = Server::new(node.clone()).listen_and_serve("echo", echo)?;
        node.serve_stdio().await
    });
    // tokio's read of stdin may still block a thread: do not wait for it.
    rt.shutdown_background();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stdio_child: {e}");
            ExitCode::FAILURE
        }
    }
}

fn echo(req: Request) -> BoxStream<'static, Source> {
    let body = req.body;
    if body == "hold" {
        let frames = stream::iter([Bytes::from("held")]).chain(stream::pending());
        return stream::iter([Source::new("hold", frames)]).boxed();
    }
    let pieces = (0..body.len())
        .step_by(PIECE)
        .map(move |at| body.slice(at..(at + PIECE).min(body.len())));
    stream::iter([Source::new("echo", stream::iter(pieces))]).boxed()
}

/// Writes `text` on stdout where the handshake belongs, then waits until the parent
/// closes our stdin (or kills us).
fn squat(text: &[u8]) -> ExitCode {
    let mut out = std::io::stdout();
    if out.write_all(text).and_then(|()| out.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    match std::io::copy(&mut std::io::stdin(), &mut std::io::sink()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
