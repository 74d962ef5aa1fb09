//! Links over stdio on the command line: `--spawn CMD` runs a node as a child process
//! and links to it over its stdin and stdout; `--stdio` serves this process's node on
//! its own. It also owns the one switch that keeps event lines off a stdout that
//! carries a link ([`say`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chanserv::{ChildNode, Node};

use crate::mesh::{bounded, describe};
use crate::Fail;

/// Set under `--stdio`: stdout carries the link, so no event line goes there.
static STDOUT_IS_A_LINK: AtomicBool = AtomicBool::new(false);

/// Prints one event line on stdout, unless stdout carries a link (`--stdio`): then
/// nothing is printed (logs and errors go to stderr as always).
pub fn say(line: std::fmt::Arguments<'_>) {
    if !STDOUT_IS_A_LINK.load(Ordering::Relaxed) {
        println!("{line}");
    }
}

/// Runs `cmd` with `sh -c` and links to the node it serves on its stdio, within
/// `within`. Its stderr is ours.
pub async fn spawn(node: &Node, cmd: &str, within: Duration) -> Result<ChildNode, Fail> {
    let mut sh = tokio::process::Command::new("sh");
    sh.arg("-c").arg(cmd);
    bounded(within, "spawn", &format!("{cmd:?}"), node.spawn_child(sh)).await
}

/// The task serving a node on stdin and stdout.
pub type StdioLink = tokio::task::JoinHandle<chanserv::Result<()>>;

/// Starts serving `node` on stdio in a task; from now on no event line is printed.
pub fn start(node: &Node) -> StdioLink {
    STDOUT_IS_A_LINK.store(true, Ordering::Relaxed);
    let node = node.clone();
    tokio::spawn(async move { node.serve_stdio().await })
}

/// Resolves once the link has ended (a failed handshake is said on stderr); pending
/// forever after that, and when there is no such link.
pub async fn ended(link: &mut Option<StdioLink>) {
    let Some(task) = link.as_mut() else {
        return std::future::pending().await;
    };
    let r = task.await;
    *link = None;
    match r {
        Ok(Ok(())) => tracing::info!("the stdio link ended"),
        Ok(Err(e)) => eprintln!("chanserv: stdio link: {}", describe(&e)),
        Err(e) => eprintln!("chanserv: stdio link: {e}"),
    }
}
