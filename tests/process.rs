//! Faults across processes: the serving node runs in a child process (this test binary
//! re-executed, see `child_server`), and the parent freezes it with SIGSTOP, kills it
//! with SIGKILL and restarts it mid-stream. Every test is bounded in time, so a hang
//! fails instead of stalling CI.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chanserv::{Client, Error, LinkEvent, Node, NodeConfig, Server, Source};
use futures::stream::{self, BoxStream, Stream, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Set in the child's environment; `child_server` does nothing without it.
const CHILD_ENV: &str = "CHANSERV_TEST_CHILD";
/// The TCP port the child listens on (0 or unset: any).
const PORT_ENV: &str = "CHANSERV_TEST_PORT";
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(200);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Scheduling noise on a shared 2-core machine.
const SLACK: Duration = Duration::from_secs(2);
/// How long a test waits for a source to end after a fault before calling it hung.
const HANG: Duration = Duration::from_secs(10);
/// Bound on a whole test.
const TEST_BOUND: Duration = Duration::from_secs(30);
const BUSY: usize = 3;
const IDLE: usize = 2;
const FINITE_SOURCES: u8 = 4;
const FINITE_FRAMES: u32 = 2_000;
const FRAME_LEN: usize = 100;

/// `Node::join`'s handle stops reconnecting when dropped, so tests hold it for their
/// whole lifetime.
use chanserv::Joined;

async fn join(node: &Node, addr: SocketAddr) -> Joined {
    node.join(addr).await.expect("join the child")
}

fn node_config() -> NodeConfig {
    NodeConfig::default()
        .keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .close_timeout(CLOSE_TIMEOUT)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
}

/// Frame `i` of source `s`: its index, then bytes that depend on both.
fn frame(s: u8, i: u32) -> Bytes {
    let mut v = i.to_le_bytes().to_vec();
    v.extend((4..FRAME_LEN).map(|k| (k as u8) ^ s ^ (i as u8)));
    Bytes::from(v)
}

/// The child's service. Body `stream`: `BUSY` sources producing a frame every 5 ms
/// forever, `IDLE` sources that never yield, and a source stream that never ends.
/// Body `finite`: `FINITE_SOURCES` sources of `FINITE_FRAMES` frames each.
fn serve(body: &[u8]) -> BoxStream<'static, Source> {
    let mut sources = Vec::new();
    if body == b"finite" {
        for s in 0..FINITE_SOURCES {
            let frames = stream::iter(0..FINITE_FRAMES).map(move |i| frame(s, i));
            sources.push(Source::new(format!("finite-{s}"), frames));
        }
        return stream::iter(sources).boxed();
    }
    for s in 0..BUSY {
        let frames = stream::unfold(0u32, move |i| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Some((frame(s as u8, i), i + 1))
        });
        sources.push(Source::new(format!("busy-{s}"), frames));
    }
    for s in 0..IDLE {
        sources.push(Source::new(format!("idle-{s}"), stream::pending::<Bytes>()));
    }
    stream::iter(sources).chain(stream::pending()).boxed()
}

/// The child process: runs only when re-executed by a parent test with `CHILD_ENV` set.
#[test]
#[ignore = "runs only as a child process of the other tests"]
fn child_server() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // Never outlive the parent: its end of our stdin closes when it dies, however.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let port: u16 = std::env::var(PORT_ENV).map_or(0, |p| p.parse().expect(PORT_ENV));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let node = Node::with_config(node_config());
        let addr = node.listen(("127.0.0.1", port)).await.expect("listen");
        let _svc = Server::new(node.clone())
            .listen_and_serve("svc", |req| serve(&req.body))
            .unwrap();
        // A line of its own, whatever the test harness printed before it.
        println!("\nREADY {addr}");
        std::future::pending::<()>().await;
    });
}

/// A running child; killed (SIGKILL) when dropped, on panic too.
struct Child {
    proc: tokio::process::Child,
    pid: String,
    addr: SocketAddr,
}

impl Child {
    async fn spawn(port: u16) -> Child {
        let exe = std::env::current_exe().unwrap();
        let mut proc = tokio::process::Command::new(exe)
            .args(["child_server", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, "1")
            .env(PORT_ENV, port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the child");
        let pid = proc.id().unwrap().to_string();
        let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
        let mut child = Child {
            proc,
            pid,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        loop {
            let line = lines.next_line().await.unwrap();
            let line = line.expect("the child exited before it was ready");
            if let Some(a) = line.strip_prefix("READY ") {
                child.addr = a.trim().parse().unwrap();
                return child;
            }
        }
    }

    fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .args([&format!("-{sig}"), self.pid.as_str()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {}", self.pid);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.start_kill();
    }
}

/// Fails the test if `f` does not finish within `TEST_BOUND`.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no end within {TEST_BOUND:?} (hang)"))
}

async fn client_of(child: &Child) -> (Node, Joined, Client<Node>) {
    let node = Node::with_config(node_config());
    let joined = join(&node, child.addr).await;
    node.wait_for_name("svc", Duration::from_secs(10))
        .await
        .unwrap();
    let client = Client::new(node.clone()).unwrap();
    (node, joined, client)
}

/// Reads `s` to its end after a fault at `t0`: `Ok((time to the error, the error,
/// items read first))` if it ends with `Some(Err(e))`, `e.is_closed()`, then `None`.
async fn settle<S, T>(mut s: S, t0: Instant) -> Result<(Duration, Error, usize), String>
where
    S: Stream<Item = Result<T, Error>> + Unpin,
{
    let hang = tokio::time::sleep(HANG);
    tokio::pin!(hang);
    let mut read = 0;
    loop {
        // The deadline first: `timeout` would poll `s` once more when it fires, and a
        // reader that was never woken would then seem to fail on time.
        let item = tokio::select! {
            biased;
            _ = &mut hang => {
                let lost = match s.next().now_or_never() {
                    Some(Some(Err(e))) => format!("; polled now, it yields {e:?}: a lost wake-up"),
                    _ => String::new(),
                };
                return Err(format!("no end {HANG:?} after the fault ({read} items first{lost})"));
            }
            item = s.next() => item,
        };
        match item {
            Some(Ok(_)) => read += 1,
            Some(Err(e)) => {
                let after = t0.elapsed();
                if !e.is_closed() {
                    return Err(format!("ended with {e:?}, not a closed kind"));
                }
                return match s.next().now_or_never() {
                    Some(None) => Ok((after, e, read)),
                    Some(Some(_)) => Err(format!("an item after the error {e:?}")),
                    None => Err(format!("pending after the error {e:?}, not None")),
                };
            }
            None => return Err("ended with None: a fault read as completion".into()),
        }
    }
}

/// Posts a `stream` request, reads some frames, sends `sig` to the child, and checks
/// that every source and the `Sources` fail with a closed kind within the keep-alive
/// timeout plus the close timeout (plus slack). Returns the slowest failure.
async fn fault_mid_stream(sig: &str) -> Duration {
    let child = Child::spawn(0).await;
    let (node, _joined, client) = client_of(&child).await;
    let mut events = node.subscribe();
    let mut sources = client.lookup_and_post("svc", "stream", &[]).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..BUSY + IDLE {
        held.push(sources.next().await.unwrap().unwrap());
    }
    for (s, src) in held.iter_mut().take(BUSY).enumerate() {
        assert_eq!(src.header(), &format!("busy-{s}")[..]);
        for i in 0..5 {
            assert_eq!(src.next().await.unwrap().unwrap(), frame(s as u8, i));
        }
    }
    child.signal(sig);
    let t0 = Instant::now();
    let down = tokio::spawn(async move {
        while !matches!(events.recv().await, Some(LinkEvent::Down(_))) {}
        t0.elapsed()
    });
    let mut names: Vec<String> = held
        .iter()
        .map(|s| String::from_utf8_lossy(s.header()).into_owned())
        .collect();
    names.push("Sources".into());
    let mut waits: Vec<_> = held.into_iter().map(|s| settle(s, t0).boxed()).collect();
    waits.push(settle(sources, t0).boxed());
    let results = futures::future::join_all(waits).await;
    let bound = KEEPALIVE_TIMEOUT + CLOSE_TIMEOUT + SLACK;
    let mut report = format!("SIG{sig} mid-stream (bound {bound:?}):\n");
    match tokio::time::timeout(Duration::ZERO, down).await {
        Ok(after) => report += &format!("  link declared down after {:?}\n", after.unwrap()),
        Err(_) => report += "  link never declared down\n",
    }
    let mut slowest = Duration::ZERO;
    let mut ok = true;
    for (name, r) in names.iter().zip(&results) {
        match r {
            Ok((after, e, read)) => {
                report += &format!("  {name}: {e:?} after {after:?} ({read} items first)\n");
                slowest = slowest.max(*after);
                ok &= *after < bound;
            }
            Err(e) => {
                report += &format!("  {name}: {e}\n");
                ok = false;
            }
        }
    }
    println!("{report}");
    child.signal("KILL");
    assert!(ok, "{report}");
    slowest
}

#[tokio::test]
async fn sigkill_mid_stream_fails_every_source() {
    let slowest = bounded("SIGKILL", fault_mid_stream("KILL")).await;
    println!("SIGKILL: every source failed within {slowest:?}");
}

#[tokio::test]
async fn sigstop_mid_stream_fails_every_source_within_keepalive() {
    let slowest = bounded("SIGSTOP", fault_mid_stream("STOP")).await;
    println!("SIGSTOP: every source failed within {slowest:?}");
}

/// Posts a `finite` request and checks every byte, and that it completes (`None`).
async fn fetch_all(client: &Client<Node>) {
    let mut sources = client.lookup_and_post("svc", "finite", &[]).await.unwrap();
    let mut n = 0u8;
    while let Some(src) = sources.next().await {
        let mut src = src.unwrap();
        assert_eq!(src.header(), &format!("finite-{n}")[..]);
        for i in 0..FINITE_FRAMES {
            assert_eq!(src.next().await.unwrap().unwrap(), frame(n, i));
        }
        assert!(src.next().await.is_none(), "source {n} completes");
        n += 1;
    }
    assert_eq!(n, FINITE_SOURCES);
}

/// The next link going up or down (name changes skipped).
async fn next_event(events: &mut chanserv::LinkEvents) -> LinkEvent {
    loop {
        match events.recv().await.expect("link events") {
            LinkEvent::Names { .. } => {}
            e => return e,
        }
    }
}

#[tokio::test]
async fn reconnects_after_the_child_is_restarted() {
    bounded("restart", async {
        // A port that was free a moment ago; the child binds it with SO_REUSEADDR.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut first = Child::spawn(port).await;
        assert_eq!(first.addr.port(), port);
        let node = Node::with_config(node_config());
        let mut events = node.subscribe();
        let _joined = join(&node, first.addr).await;
        let LinkEvent::Up(chanserv::PeerInfo { node: old, .. }) = next_event(&mut events).await
        else {
            panic!("expected the link to come up")
        };
        node.wait_for_name("svc", Duration::from_secs(10))
            .await
            .unwrap();
        let client = Client::new(node.clone()).unwrap();
        fetch_all(&client).await;

        first.signal("KILL");
        let t0 = Instant::now();
        first.proc.wait().await.unwrap();
        let down = next_event(&mut events).await;
        assert!(
            matches!(&down, LinkEvent::Down(p) if p.node == old),
            "{down:?}"
        );
        let down = t0.elapsed();

        let t1 = Instant::now();
        let second = Child::spawn(port).await;
        let started = t1.elapsed();
        let LinkEvent::Up(chanserv::PeerInfo { node: new, .. }) = next_event(&mut events).await
        else {
            panic!("expected the link to come back up")
        };
        let up = t1.elapsed();
        assert_ne!(new, old, "a new process is a new node");
        node.wait_for_name("svc", Duration::from_secs(10))
            .await
            .unwrap();
        fetch_all(&client).await;
        assert_eq!(node.peers(), vec![new]);
        assert_eq!(node.links_established(), 2);
        println!(
            "restart: link down {down:?} after SIGKILL; child restarted in {started:?}, \
             link up again {up:?} after the restart began; every byte of a new request"
        );
        drop(second);
    })
    .await;
}
