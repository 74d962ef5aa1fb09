//! Links over stdio: a child process (`examples/stdio_child.rs`) serves a service to its
//! parent over its stdin and stdout (`Node::spawn_child` here, `Node::serve_stdio`
//! there); a killed child fails the parent's streams; the handle kills the child when
//! dropped; a child that is no node gives a clear error, never a hang.
//!
//! The child is the example's binary, which `cargo test` builds: to run this file
//! alone, `cargo build --example stdio_child` first. (A test binary cannot be the
//! child: libtest writes on its stdout before the test runs.)

#![cfg(unix)]

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use chanserv::{ChildNode, Client, Error, LinkEvent, Node, NodeConfig, Sources, Timeout};
use futures::StreamExt;
use tokio::process::Command;
use tokio::time::Instant;

const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(500);
const CLOSE_TIMEOUT: Duration = Duration::from_millis(200);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(300);
/// Scheduling noise on a shared 2-core machine.
const SLACK: Duration = Duration::from_secs(1);
/// Bound on a whole test: a hang fails instead of stalling CI.
const BOUND: Duration = Duration::from_secs(10);

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(BOUND, test)
        .await
        .expect("the test hung");
}

fn config() -> NodeConfig {
    NodeConfig::default()
        .keepalive(Duration::from_millis(100), KEEPALIVE_TIMEOUT)
        .close_timeout(CLOSE_TIMEOUT)
        .handshake_timeout(HANDSHAKE_TIMEOUT)
}

/// `examples/stdio_child` with `args`.
fn child(args: &[&str]) -> Command {
    // This binary is target/<profile>/deps/stdio-<hash>; the example sits in
    // target/<profile>/examples.
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path: PathBuf = dir
        .join("examples")
        .join(format!("stdio_child{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds it, or `cargo build --example stdio_child`",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.args(args);
    cmd
}

/// A parent node and its child node serving `echo`, its name known to the parent.
async fn parent_and_child() -> (Node, ChildNode) {
    let node = Node::with_config(config());
    let child = node.spawn_child(child(&[])).await.expect("spawn the child");
    node.wait_for_name("echo", BOUND).await.unwrap();
    assert_eq!(node.providers("echo"), [child.peer()]);
    (node, child)
}

/// Bytes that differ from body to body and along each.
fn pattern(len: usize, seed: u32) -> Bytes {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    v.into()
}

/// Posts `body` to `echo` and returns the one source's frames, joined.
async fn echo(client: &Client<Node>, body: Bytes) -> Vec<u8> {
    let mut sources = client.lookup_and_post("echo", body, &[]).await.unwrap();
    let mut source = sources.next().await.expect("one source").unwrap();
    assert_eq!(source.header(), "echo");
    let mut got = Vec::new();
    while let Some(frame) = source.next().await {
        let frame = frame.expect("the source completes");
        assert!(frame.len() <= 4096, "a frame of {} bytes", frame.len());
        got.extend_from_slice(&frame);
    }
    assert!(sources.next().await.is_none(), "one source only");
    got
}

/// Posts `hold` and returns the request, its source having delivered its one frame:
/// a stream open on the link, waiting.
async fn hold(client: &Client<Node>) -> (Sources, chanserv::Source) {
    let mut sources = client.lookup_and_post("echo", "hold", &[]).await.unwrap();
    let mut source = sources.next().await.expect("one source").unwrap();
    assert_eq!(source.next().await.unwrap().unwrap(), "held");
    (sources, source)
}

/// The source's next item is an error saying the link is gone.
async fn fails_closed(source: &mut chanserv::Source) {
    let e = source.next().await.expect("an error, not the end");
    let e = e.unwrap_err();
    assert!(e.is_closed(), "{e}");
}

#[tokio::test]
async fn a_child_node_serves_a_service_to_its_parent() {
    bounded(async {
        let (node, mut child) = parent_and_child().await;
        let client = Client::new(node.clone()).unwrap();
        for (seed, len) in [0, 1, 4096, 300_001].into_iter().enumerate() {
            let body = pattern(len, seed as u32);
            let got = echo(&client, body.clone()).await;
            assert!(got == body, "{len} bytes sent, {} came back", got.len());
        }
        let stats = node.stats();
        let link = stats.links_to(child.peer()).next().expect("a link");
        assert_eq!(link.addr, format!("child:{}", child.pid()));
        assert!(link.dialed);
        // The parent goes: the child's stdin closes, its `serve_stdio` returns and
        // it exits by itself.
        node.shutdown().await;
        let status = child.wait().await.unwrap();
        assert!(status.success(), "the child ended with {status}");
        child.closed().await;
    })
    .await;
}

#[tokio::test]
async fn killing_the_child_fails_the_parents_open_streams() {
    bounded(async {
        let (node, mut child) = parent_and_child().await;
        let client = Client::new(node).unwrap();
        let (_sources, mut source) = hold(&client).await;
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &child.pid().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let t0 = Instant::now();
        fails_closed(&mut source).await;
        let within = KEEPALIVE_TIMEOUT + CLOSE_TIMEOUT + SLACK;
        assert!(t0.elapsed() < within, "failed after {:?}", t0.elapsed());
        child.closed().await;
        assert_eq!(child.wait().await.unwrap().signal(), Some(9));
    })
    .await;
}

#[tokio::test]
async fn dropping_the_handle_kills_the_child_and_ends_the_link() {
    bounded(async {
        let node = Node::with_config(config());
        let mut events = node.subscribe();
        // A child that stays when the link ends: only the kill can end it.
        let child = node.spawn_child(child(&["linger"])).await.unwrap();
        let (pid, peer) = (child.pid(), child.peer());
        node.wait_for_name("echo", BOUND).await.unwrap();
        let client = Client::new(node.clone()).unwrap();
        let (_sources, mut source) = hold(&client).await;
        drop(child);
        fails_closed(&mut source).await;
        loop {
            match events.recv().await.expect("the node is alive") {
                LinkEvent::Down(p) if p.node == peer => break,
                _ => {}
            }
        }
        wait_until_dead(pid).await;
    })
    .await;
}

/// Waits until process `pid` is dead: gone, or a zombie (tokio reaps a dropped child
/// in the background). Nothing tells when another process's state changes: polled.
async fn wait_until_dead(pid: u32) {
    if !cfg!(target_os = "linux") {
        return;
    }
    let stat = format!("/proc/{pid}/stat");
    loop {
        let state = std::fs::read_to_string(&stat)
            .ok()
            .and_then(|s| s.rsplit_once(") ")?.1.chars().next());
        if matches!(state, None | Some('Z' | 'X')) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_child_that_writes_something_else_is_a_clear_error_within_the_handshake_timeout() {
    bounded(async {
        let node = Node::with_config(config());
        // At once, not at the timeout: a protocol error.
        let e = node.spawn_child(child(&["garbage"])).await.unwrap_err();
        let Error::Protocol(msg) = &e else {
            panic!("not a protocol error: {e}")
        };
        assert!(msg.contains("bad magic"), "{msg}");
        assert!(msg.contains("stdout of child"), "{msg}");
        // Too little to be a handshake, and then silence: the handshake timeout.
        let t0 = Instant::now();
        let e = node.spawn_child(child(&["short"])).await.unwrap_err();
        assert!(matches!(e, Error::Timeout(Timeout::Handshake)), "{e}");
        let took = t0.elapsed();
        assert!(
            took >= HANDSHAKE_TIMEOUT && took < HANDSHAKE_TIMEOUT + SLACK,
            "{took:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_child_that_exits_before_the_handshake_says_how_it_exited() {
    bounded(async {
        let node = Node::with_config(config());
        let e = node.spawn_child(child(&["exit", "3"])).await.unwrap_err();
        let Error::Io(io) = &e else {
            panic!("not an i/o error: {e}")
        };
        assert_eq!(io.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("exited before the link handshake"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    })
    .await;
}

#[tokio::test]
async fn a_command_that_does_not_exist_is_a_clear_error() {
    bounded(async {
        let node = Node::with_config(config());
        let missing = "/nonexistent/chanserv-stdio-child";
        let e = node.spawn_child(Command::new(missing)).await.unwrap_err();
        let Error::Io(io) = &e else {
            panic!("not an i/o error: {e}")
        };
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains(missing), "{e}");
        // A std command converts.
        let e = node
            .spawn_child(std::process::Command::new(missing))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot spawn"), "{e}");
    })
    .await;
}
