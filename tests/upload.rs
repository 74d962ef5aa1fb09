//! Uploads (issue 13): a request carries a stream of frames after its body, which the
//! service reads with `Request::upload()`, with backpressure and cancellation both ways
//! and completion distinct from failure.
//!
//! The big echo runs over loopback TCP; its size is `CHANSERV_UPLOAD_BYTES` (64 MiB by
//! default): `CHANSERV_UPLOAD_BYTES=1073741824 cargo test --release --test upload echo
//! -- --nocapture` prints the time and peak RSS of 1 GiB. The other tests run over an
//! in-memory link with time paused, so a hang fails at once on the virtual clock.

#[path = "support/mesh.rs"]
mod mesh;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use chanserv::{Client, Error, Node, Request, ServeHandle, Server, Source, Sources, Upload};
use futures::stream::{self, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

/// Virtual time one awaited event may take (tests with time paused).
const BOUND: Duration = Duration::from_secs(10);
/// Virtual time a whole test may take.
const TEST_LIMIT: Duration = Duration::from_secs(60);
const FRAME: usize = 64 * 1024;
/// Frame contents: frame `i` is `i` (8 bytes LE), then `PATTERNS[i % 251]`. A prime
/// count, so a frame lost, repeated or moved shows in its bytes, not only its index.
static PATTERNS: LazyLock<Vec<Bytes>> = LazyLock::new(|| {
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

fn frame(i: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(FRAME);
    b.put_u64_le(i);
    b.put_slice(&PATTERNS[(i % 251) as usize]);
    b.freeze()
}

fn check(i: u64, f: &[u8]) {
    assert_eq!(f.len(), FRAME, "frame {i}: length");
    let got = u64::from_le_bytes(f[..8].try_into().unwrap());
    assert_eq!(got, i, "frames in order, each once");
    assert!(
        f[8..] == PATTERNS[(i % 251) as usize][..],
        "frame {i}: a byte differs"
    );
}

/// `n` frames, counting in `polled` how many were taken.
fn frames(n: u64, polled: Arc<AtomicU64>) -> impl Stream<Item = Result<Bytes, Error>> + Send {
    stream::iter(0..n).map(move |i| {
        polled.fetch_add(1, Ordering::Relaxed);
        Ok(frame(i))
    })
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn bounded(body: impl Future<Output = ()>) {
    let limit = timeout(TEST_LIMIT, body).await;
    limit.expect("the test hung past its time limit");
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
}

/// Two nodes over an in-memory link serving `service` as "svc", and a client.
async fn rig<F, S>(service: F) -> (ServeHandle, Client<Node>, Node)
where
    F: Fn(Request) -> S + Send + Sync + 'static,
    S: Stream<Item = Source> + Send + 'static,
{
    let (server, client) = (Node::new(), Node::new());
    mesh::link(&client, &server).await;
    let handle = Server::new(server.clone())
        .listen_and_serve("svc", service)
        .unwrap();
    client
        .wait_for_name("svc", Duration::from_secs(10))
        .await
        .unwrap();
    (handle, Client::new(client).unwrap(), server)
}

/// The sources' headers, to the end; panics on an error.
async fn headers(mut sources: Sources) -> Vec<Bytes> {
    let mut got = Vec::new();
    while let Some(s) = within("the next source", sources.next()).await {
        got.push(s.unwrap().header().clone());
    }
    got
}

/// What a service saw of an upload: frames, bytes, then how it ended.
#[derive(Debug)]
enum Seen {
    Frame,
    End(usize, Option<Error>),
}

/// Reads `up` to its end in a task of its own (so the end is seen whatever happens to
/// the request), telling `tx` of every frame and of the end.
fn sink(mut up: Upload, tx: mpsc::UnboundedSender<Seen>) {
    tokio::spawn(async move {
        let mut n = 0;
        let end = loop {
            match up.next().await {
                Some(Ok(_)) => {
                    n += 1;
                    drop(tx.send(Seen::Frame));
                }
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        assert!(up.next().await.is_none(), "the end is the last item");
        drop(tx.send(Seen::End(n, end)));
    });
}

async fn end_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> (usize, Option<Error>) {
    loop {
        match within("the service's upload", rx.recv()).await.unwrap() {
            Seen::Frame => {}
            Seen::End(n, e) => return (n, e),
        }
    }
}

/// 1 GiB (by default 64 MiB) uploaded to a service that echoes it back as a source
/// while it arrives, over loopback TCP: every byte checked, in order, and what is in
/// flight at any time (taken from the upload stream, not yet echoed back) stays
/// bounded, whatever the size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_of_a_big_upload_every_byte_checked_memory_bounded() {
    let bytes: u64 = std::env::var("CHANSERV_UPLOAD_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 20);
    let n = bytes.div_ceil(FRAME as u64);
    LazyLock::force(&PATTERNS);
    let (a, b) = mesh::pair().await;
    let _svc = Server::new(a)
        .listen_and_serve("echo", |req: Request| {
            let up = req.upload().expect("an upload");
            stream::iter([Source::try_new("echo", up)])
        })
        .unwrap();
    b.wait_for_name("echo", Duration::from_secs(10))
        .await
        .unwrap();
    let client = Client::new(b).unwrap();
    let hwm_before = vm_hwm_kib();
    let started = Instant::now();
    let polled = Arc::new(AtomicU64::new(0));
    let run = async {
        let up = frames(n, polled.clone());
        let mut sources = client.lookup_and_upload("echo", "", &[], up).await.unwrap();
        let mut echo = sources.next().await.unwrap().unwrap();
        let (mut i, mut most_in_flight) = (0u64, 0u64);
        while let Some(f) = echo.next().await {
            check(i, &f.unwrap());
            i += 1;
            most_in_flight = most_in_flight.max(polled.load(Ordering::Relaxed) - i);
        }
        assert_eq!(i, n, "the echo completed with every frame");
        assert!(sources.next().await.is_none(), "and so did the request");
        most_in_flight
    };
    let most_in_flight = timeout(Duration::from_secs(600), run)
        .await
        .expect("the echo hung");
    let (secs, hwm) = (started.elapsed().as_secs_f64(), vm_hwm_kib());
    eprintln!(
        "echo of {} MiB: {secs:.2} s, {:.0} MiB/s each way; at most {} frames ({} MiB) in flight; \
         VmHWM {} MiB (+{} MiB)",
        bytes >> 20,
        bytes as f64 / (1 << 20) as f64 / secs,
        most_in_flight,
        (most_in_flight * FRAME as u64) >> 20,
        hwm >> 10,
        hwm.saturating_sub(hwm_before) >> 10,
    );
    // Windows, queues and read-ahead on both sides, each a few MiB at most: a bound
    // that does not grow with the upload.
    assert!(
        most_in_flight * (FRAME as u64) <= 32 << 20,
        "{most_in_flight} frames in flight"
    );
    if bytes >= 512 << 20 {
        let grew = hwm.saturating_sub(hwm_before) << 10;
        assert!(grew < bytes / 4, "peak RSS grew by {grew} bytes");
    }
}

/// A service that reads the whole upload before it answers, over loopback TCP, while
/// the client waits on its `Sources`: the master is read and written by two tasks at
/// once. (With `tokio::io::split` under them, a read could take the write's wake-up
/// from yamux, and the upload stalled for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_read_before_the_answer_while_the_client_waits_for_it() {
    let (a, b) = mesh::pair().await;
    let _svc = Server::new(a)
        .listen_and_serve("sink", |req: Request| {
            let mut up = req.upload().expect("an upload");
            stream::once(async move {
                let mut i = 0;
                while let Some(f) = up.next().await {
                    check(i, &f.unwrap());
                    i += 1;
                }
                Source::empty(i.to_string())
            })
        })
        .unwrap();
    b.wait_for_name("sink", Duration::from_secs(10))
        .await
        .unwrap();
    let client = Client::new(b).unwrap();
    let n = 1024; // 64 MiB
    let run = async {
        let up = frames(n, Arc::default());
        let sources = client.lookup_and_upload("sink", "", &[], up).await.unwrap();
        assert_eq!(headers(sources).await, [n.to_string()]);
    };
    timeout(Duration::from_secs(60), run)
        .await
        .expect("the upload stalled");
}

/// An upload that completes, one that the client fails, and one whose client leaves
/// midway: the service sees `None`, `SourceFailed` with the reason, and `Reset`
/// (never `None`). The first two requests complete; the third's upload stream is
/// dropped with its `Sources`.
#[tokio::test(start_paused = true)]
async fn completion_abort_and_a_client_that_leaves_are_three_ends() {
    bounded(async {
        let (tx, mut seen) = mpsc::unbounded_channel();
        let (_svc, client, _server) = rig(move |req| {
            sink(req.upload().expect("an upload"), tx.clone());
            stream::iter([Source::empty("ok")])
        })
        .await;

        let up = stream::iter((0..3u64).map(|i| Ok::<_, Error>(frame(i))));
        let sources = client.lookup_and_upload("svc", "", &[], up).await.unwrap();
        assert_eq!(headers(sources).await, ["ok"]);
        let (n, end) = end_seen(&mut seen).await;
        assert!(n == 3 && end.is_none(), "completed: {n} {end:?}");

        let up = stream::iter([Ok(frame(0)), Ok(frame(1)), Err("disk on fire")]);
        let sources = client.lookup_and_upload("svc", "", &[], up).await.unwrap();
        assert_eq!(
            headers(sources).await,
            ["ok"],
            "a failed upload fails no request"
        );
        let (n, end) = end_seen(&mut seen).await;
        assert_eq!(n, 2);
        assert!(
            matches!(&end, Some(Error::SourceFailed(m)) if m == "disk on fire"),
            "{end:?}"
        );

        let (feed, up) = Source::channel("", 4);
        let mut sources = client.lookup_and_upload("svc", "", &[], up).await.unwrap();
        feed.send(frame(0)).await.unwrap();
        feed.send(frame(1)).await.unwrap();
        for _ in 0..2 {
            assert!(matches!(
                within("a frame", seen.recv()).await,
                Some(Seen::Frame)
            ));
        }
        let _ok = within("the source", sources.next()).await.unwrap().unwrap();
        drop(sources);
        let (n, end) = end_seen(&mut seen).await;
        assert_eq!(n, 2);
        assert!(
            matches!(&end, Some(e) if e.is_closed()),
            "a client that left is a failure: {end:?}"
        );
        let sent = within("the upload's end", async {
            loop {
                if let Err(e) = feed.send("more").await {
                    return e;
                }
            }
        })
        .await;
        assert!(matches!(sent, Error::Closed), "{sent}");
    })
    .await;
}

/// A service that reads a little of the upload and drops it, and one that never takes
/// it: the client's upload stops (a channel's `send` fails with `Closed`) and the
/// request still completes.
#[tokio::test(start_paused = true)]
async fn an_upload_the_service_lets_go_of_stops_and_the_request_completes() {
    bounded(async {
        let (_svc, client, _server) = rig(|req: Request| {
            let stream = match req.tags().is_empty() {
                // Reads one frame, then drops the upload.
                true => {
                    let mut up = req.upload().expect("an upload");
                    stream::once(async move {
                        let first = up.next().await.unwrap().unwrap();
                        drop(up);
                        Source::new("dropped", stream::iter([first]))
                    })
                    .left_stream()
                }
                // Never takes it: the request goes with it.
                false => stream::iter([Source::empty("untouched")]).right_stream(),
            };
            stream
        })
        .await;
        for (tags, header) in [
            (vec![], "dropped"),
            (vec![chanserv::RequestTag::Meta("x".into())], "untouched"),
        ] {
            let (feed, up) = Source::channel("", 4);
            let sources = client
                .lookup_and_upload("svc", "", &tags, up)
                .await
                .unwrap();
            let sender = tokio::spawn(async move {
                let mut sent = 0u64;
                loop {
                    if let Err(e) = feed.send(frame(sent)).await {
                        return (sent, e);
                    }
                    sent += 1;
                }
            });
            assert_eq!(headers(sources).await, [header], "the request completes");
            let (sent, e) = within("the upload stopping", sender).await.unwrap();
            assert!(matches!(e, Error::Closed), "{header}: {e}");
            eprintln!("{header}: {sent} frames sent before the stop");
        }
    })
    .await;
}

/// Cancellation still reaches the service after the upload: a source function that
/// read the upload to its end, and one that never took it, both then waiting forever,
/// are dropped when the client drops its `Sources`.
#[tokio::test(start_paused = true)]
async fn dropping_sources_cancels_the_request_after_its_upload() {
    bounded(async {
        let dropped = Arc::new(AtomicUsize::new(0));
        let d = dropped.clone();
        let (svc, client, _server) = rig(move |req: Request| {
            let guard = Counted(d.clone());
            let up = if req.tags().is_empty() {
                req.upload()
            } else {
                None
            };
            stream::once(async move {
                if let Some(mut up) = up {
                    while let Some(f) = up.next().await {
                        f.unwrap();
                    }
                }
                std::future::pending::<Source>().await
            })
            .map(move |s| {
                let _ = &guard;
                s
            })
        })
        .await;
        for tags in [vec![], vec![chanserv::RequestTag::Meta("x".into())]] {
            let before = dropped.load(Ordering::Relaxed);
            let up = stream::iter((0..3u64).map(|i| Ok::<_, Error>(frame(i))));
            let mut sources = client
                .lookup_and_upload("svc", "", &tags, up)
                .await
                .unwrap();
            // Nothing comes: give the service every chance to read the upload.
            assert!(timeout(Duration::from_secs(1), sources.next())
                .await
                .is_err());
            assert_eq!(
                dropped.load(Ordering::Relaxed),
                before,
                "alive while wanted"
            );
            drop(sources);
            within("the cancellation", async {
                while dropped.load(Ordering::Relaxed) == before {
                    tokio::task::yield_now().await;
                }
            })
            .await;
        }
        drop(svc);
    })
    .await;
}

struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A service that holds the upload without reading it: the client's upload stream is
/// polled only a bounded way ahead (the master's window and the server's read-ahead),
/// not to its end; once the service reads, all of it arrives.
#[tokio::test(start_paused = true)]
async fn a_service_that_does_not_read_holds_the_upload_back() {
    bounded(async {
        let (go_tx, go_rx) = mpsc::unbounded_channel::<oneshot::Sender<usize>>();
        let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
        let (_svc, client, _server) = rig(move |req: Request| {
            let mut up = req.upload().expect("an upload");
            let go = go_rx.clone();
            tokio::spawn(async move {
                // Reads nothing until told to, then everything.
                let done = go.lock().await.recv().await.unwrap();
                let mut n = 0;
                while let Some(f) = up.next().await {
                    f.unwrap();
                    n += 1;
                }
                // Err: the test gave up waiting, and will say so.
                let _ = done.send(n);
            });
            stream::iter([Source::empty("ok")])
        })
        .await;
        let polled = Arc::new(AtomicU64::new(0));
        let n = 1024; // 64 MiB
        let sources = client
            .lookup_and_upload("svc", "", &[], frames(n, polled.clone()))
            .await
            .unwrap();
        // The virtual clock moves only when every task waits: then nobody polls.
        let mut last = u64::MAX;
        while polled.load(Ordering::Relaxed) != last {
            last = polled.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("stalled after {last} frames");
        assert!(last * (FRAME as u64) <= 4 << 20, "{last} frames taken");
        let (done_tx, done_rx) = oneshot::channel();
        go_tx.send(done_tx).unwrap();
        assert_eq!(headers(sources).await, ["ok"]);
        assert_eq!(within("the rest", done_rx).await.unwrap(), n as usize);
    })
    .await;
}
