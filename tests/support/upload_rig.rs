//! The rig of tests/upload.rs: frames whose every byte can be checked, services linked
//! to a client in memory or on one node, and the bounded waits the tests use.

#![allow(dead_code)] // a test binary may use only part of it

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use chanserv::{Client, Error, Node, Request, ServeHandle, Server, Source, Sources, Upload};
use futures::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::mesh;

/// Virtual time one awaited event may take (tests with time paused).
pub const BOUND: Duration = Duration::from_secs(10);
/// Virtual time a whole test may take.
pub const TEST_LIMIT: Duration = Duration::from_secs(60);
pub const FRAME: usize = 64 * 1024;

/// Frame contents: frame `i` is `i` (8 bytes LE), then `PATTERNS[i % 251]`, xorshift
/// bytes. A prime count, so a frame lost, repeated or moved shows in its bytes, not
/// only its index.
pub static PATTERNS: LazyLock<Vec<Bytes>> = LazyLock::new(|| {
    (0..251u64)
        .map(|p| {
            let mut x = p.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..FRAME - 8)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
                .into()
        })
        .collect()
});

pub fn frame(i: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(FRAME);
    b.put_u64_le(i);
    b.put_slice(&PATTERNS[(i % 251) as usize]);
    b.freeze()
}

/// Panics unless `f` is frame `i`, byte for byte.
pub fn check(i: u64, f: &[u8]) {
    assert_eq!(f.len(), FRAME, "frame {i}: length");
    let got = u64::from_le_bytes(f[..8].try_into().unwrap());
    assert_eq!(got, i, "frames in order, each once");
    assert!(
        f[8..] == PATTERNS[(i % 251) as usize][..],
        "frame {i}: a byte differs"
    );
}

/// `n` frames, made as they are taken, counting in `polled` how many were.
pub fn frames(n: u64, polled: Arc<AtomicU64>) -> impl Stream<Item = Result<Bytes, Error>> + Send {
    stream::iter(0..n).map(move |i| {
        polled.fetch_add(1, Ordering::Relaxed);
        Ok(frame(i))
    })
}

/// The process's peak resident set so far, in KiB (0 where /proc is not there).
pub fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub async fn bounded(body: impl Future<Output = ()>) {
    let limit = timeout(TEST_LIMIT, body).await;
    limit.expect("the test hung past its time limit");
}

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
}

/// Waits until `polled` stops moving, and returns it. With time paused the clock moves
/// only when every task waits: a count that stays the same across a virtual sleep is
/// one that nothing is about to change.
pub async fn quiet(polled: &AtomicU64) -> u64 {
    let mut last = u64::MAX;
    while polled.load(Ordering::Relaxed) != last {
        last = polled.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// How the client reaches the service.
#[derive(Debug, Clone, Copy)]
pub enum Via {
    /// Two nodes over an in-memory link (yamux streams).
    Link,
    /// One node (in-memory pipes, no yamux).
    SameNode,
}

/// The service, its client and the nodes that carry them.
pub struct Rig {
    pub client: Client<Node>,
    pub service: ServeHandle,
    /// The server's node, then the client's (the same node twice for `SameNode`).
    pub nodes: Vec<Node>,
}

/// `service` served as "svc" over an in-memory link.
pub async fn rig<F, S>(service: F) -> Rig
where
    F: Fn(Request) -> S + Send + Sync + 'static,
    S: Stream<Item = Source> + Send + 'static,
{
    rig_via(Via::Link, service).await
}

pub async fn rig_via<F, S>(via: Via, service: F) -> Rig
where
    F: Fn(Request) -> S + Send + Sync + 'static,
    S: Stream<Item = Source> + Send + 'static,
{
    let server = Node::new();
    let client = match via {
        Via::Link => {
            let client = Node::new();
            mesh::link(&client, &server).await;
            client
        }
        Via::SameNode => server.clone(),
    };
    let service = Server::new(server.clone())
        .listen_and_serve("svc", service)
        .unwrap();
    client
        .wait_for_name("svc", Duration::from_secs(10))
        .await
        .unwrap();
    Rig {
        client: Client::new(client.clone()).unwrap(),
        service,
        nodes: vec![server, client],
    }
}

/// The sources' headers, to the end; panics on an error.
pub async fn headers(mut sources: Sources) -> Vec<Bytes> {
    let mut got = Vec::new();
    while let Some(s) = within("the next source", sources.next()).await {
        got.push(s.unwrap().header().clone());
    }
    got
}

/// What a service saw of an upload: frames, bytes, then how it ended.
#[derive(Debug)]
pub enum Seen {
    Frame,
    End(usize, Option<Error>),
}

/// Reads `up` to its end in a task of its own (so the end is seen whatever happens to
/// the request), telling `tx` of every frame and of the end.
pub fn sink(mut up: Upload, tx: mpsc::UnboundedSender<Seen>) {
    tokio::spawn(async move {
        let mut n = 0;
        let end = loop {
            match up.next().await {
                Some(Ok(_)) => {
                    n += 1;
                    // Err: the test is over.
                    let _ = tx.send(Seen::Frame);
                }
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        assert!(up.next().await.is_none(), "the end is the last item");
        // Err: the test is over.
        let _ = tx.send(Seen::End(n, end));
    });
}

/// The next upload end a [`sink`] saw: its frame count and error.
pub async fn end_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> (usize, Option<Error>) {
    loop {
        match within("the service's upload", rx.recv()).await.unwrap() {
            Seen::Frame => {}
            Seen::End(n, e) => return (n, e),
        }
    }
}

/// How many [`Counted`] guards were dropped, as a watch (so a test awaits a drop).
pub type Drops = Arc<tokio::sync::watch::Sender<usize>>;

pub fn drops() -> Drops {
    Arc::new(tokio::sync::watch::Sender::new(0))
}

/// Counts its drop in [`Drops`]: a guard a producer holds, to see it dropped.
pub struct Counted(pub Drops);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n += 1);
    }
}

/// Waits until more than `before` guards were dropped.
pub async fn dropped_past(what: &str, drops: &Drops, before: usize) {
    let mut rx = drops.subscribe();
    within(what, rx.wait_for(|n| *n > before))
        .await
        .expect("the sender is kept");
}

/// Sends frames on `feed` until it fails: how many went, and why it stopped.
pub fn feed_forever(feed: chanserv::SourceSender) -> tokio::task::JoinHandle<(u64, Error)> {
    tokio::spawn(async move {
        let mut sent = 0u64;
        loop {
            if let Err(e) = feed.send(frame(sent)).await {
                return (sent, e);
            }
            sent += 1;
        }
    })
}
