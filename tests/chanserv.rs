//! Server and client together: the semantics users rely on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, ClientConfig, Error, Node, Server, ServerConfig, Source, Timeout};
use futures::{stream, StreamExt};

#[path = "support/counted.rs"]
mod counted;
use counted::{stalled_and_flowing, Counted};

async fn pair() -> (Node, Node) {
    let a = Node::new();
    let b = Node::new();
    let addr = a.listen("127.0.0.1:0").await.unwrap();
    b.join(addr).await.unwrap().detach();
    (a, b)
}

async fn client_for(node: &Node, name: &str) -> Client<Node> {
    node.wait_for_name(name, Duration::from_secs(10))
        .await
        .unwrap();
    Client::new(node.clone()).unwrap()
}

async fn drain(s: &mut Source) -> (Vec<Bytes>, Option<Error>) {
    let mut frames = Vec::new();
    while let Some(f) = s.next().await {
        match f {
            Ok(f) => frames.push(f),
            Err(e) => {
                assert!(s.next().await.is_none(), "an error is the last item");
                return (frames, Some(e));
            }
        }
    }
    (frames, None)
}

fn numbered(n: u32, size: usize) -> impl futures::Stream<Item = Bytes> + Send {
    stream::iter(0..n).map(move |i| {
        let mut v = i.to_le_bytes().to_vec();
        v.resize(size.max(4), b'x');
        Bytes::from(v)
    })
}

#[tokio::test]
async fn completion_failure_order_and_exactly_once() {
    let (a, b) = pair().await;
    let _svc = Server::new(a)
        .listen_and_serve("svc", |_| {
            let (tx, failing) = Source::channel("fails", 4);
            tokio::spawn(async move {
                tx.send("one").await.unwrap();
                tx.abort("disk on fire").await;
            });
            stream::iter(vec![
                Source::new("big", numbered(20_000, 100)),
                Source::new("small", numbered(3, 4)),
                failing,
            ])
        })
        .unwrap();
    let client = client_for(&b, "svc").await;
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut got = Vec::new();
    while let Some(s) = sources.next().await {
        let mut s = s.unwrap();
        assert_eq!(s.meta().remote_addr().unwrap().vaddr(), "svc");
        let header = s.header().clone();
        got.push((header, drain(&mut s).await));
    }
    assert_eq!(got.len(), 3, "sources arrive in announcement order");
    assert_eq!(got[0].0, "big");
    let (frames, err) = &got[0].1;
    assert!(err.is_none());
    assert_eq!(frames.len(), 20_000);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            u32::from_le_bytes(f[..4].try_into().unwrap()),
            i as u32,
            "in order, each once"
        );
    }
    assert_eq!(got[1].1 .0.len(), 3);
    assert!(got[1].1 .1.is_none());
    assert_eq!(got[2].1 .0, vec![Bytes::from("one")]);
    assert!(matches!(&got[2].1 .1, Some(Error::SourceFailed(m)) if m == "disk on fire"));
}

#[tokio::test]
async fn dead_link_is_a_failure_not_a_completion() {
    let (a, b) = pair().await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = std::sync::Mutex::new(Some(started_tx));
    let _svc = Server::new(a.clone())
        .listen_and_serve("svc", move |_| {
            let (tx, src) = Source::channel("endless", 8);
            let started = started_tx.lock().unwrap().take();
            tokio::spawn(async move {
                tx.send(vec![1u8; 100_000]).await.unwrap();
                if let Some(s) = started {
                    let _ = s.send(());
                }
                std::future::pending::<()>().await;
                drop(tx);
            });
            stream::iter([src])
        })
        .unwrap();
    let client = client_for(&b, "svc").await;
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    assert_eq!(s.next().await.unwrap().unwrap().len(), 100_000);
    started_rx.await.unwrap();
    a.shutdown().await;
    let (_, err) = drain(&mut s).await;
    assert!(err.is_some(), "a cut source must end with an error");
}

#[tokio::test]
async fn backpressure_bounds_a_stalled_source_and_others_flow() {
    let (a, b) = pair().await;
    let polled = Arc::new(AtomicU64::new(0));
    let p2 = polled.clone();
    let _svc = Server::new(a)
        .listen_and_serve("svc", move |_| {
            stalled_and_flowing(&p2, numbered(50_000, 1024))
        })
        .unwrap();
    let cfg = ClientConfig::default().frame_buffer_size(16);
    b.wait_for_name("svc", Duration::from_secs(10))
        .await
        .unwrap();
    let client = Client::with_config(b.clone(), cfg).unwrap();
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut stalled = sources.next().await.unwrap().unwrap();
    let mut flowing = sources.next().await.unwrap().unwrap();
    // Take one frame of the stalled source so its stream is open, then stop reading it.
    assert_eq!(stalled.next().await.unwrap().unwrap().len(), 1024);
    let (frames, err) = drain(&mut flowing).await;
    assert!(err.is_none());
    assert_eq!(frames.len(), 50_000, "the other source flowed to the end");
    // 50 MiB went by on the other source; the stalled producer was polled only for
    // what its buffers hold: the client's read-ahead, the yamux window (256 KiB, or
    // what auto-tuning grew it to, bounded by 16 MiB here) and one write batch.
    let n = polled.load(Ordering::Relaxed);
    assert!(
        n < 16 * 1024,
        "stalled producer polled {n} times (unbounded)"
    );
    // Still bounded a moment later.
    tokio::task::yield_now().await;
    let m = polled.load(Ordering::Relaxed);
    assert!(m < 16 * 1024, "{m}");
}

#[tokio::test]
async fn dropping_a_source_cancels_its_producer() {
    let (a, b) = pair().await;
    let (drop_tx, drop_rx) = tokio::sync::oneshot::channel();
    let drop_tx = std::sync::Mutex::new(Some(drop_tx));
    let polled = Arc::new(AtomicU64::new(0));
    let p2 = polled.clone();
    let _svc = Server::new(a)
        .listen_and_serve("svc", move |_| {
            let s = Counted {
                polled: p2.clone(),
                dropped: drop_tx.lock().unwrap().take(),
                size: 4096,
            };
            stream::iter([Source::new("infinite", s)])
        })
        .unwrap();
    let client = client_for(&b, "svc").await;
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    for _ in 0..10 {
        s.next().await.unwrap().unwrap();
    }
    drop(s);
    drop(sources);
    tokio::time::timeout(Duration::from_secs(10), drop_rx)
        .await
        .expect("producer dropped after the client dropped its source")
        .unwrap();
}

#[tokio::test]
async fn failing_source_function_fails_only_its_request() {
    let (a, b) = pair().await;
    let errors = Arc::new(AtomicU64::new(0));
    let e2 = errors.clone();
    let cfg = ServerConfig::default().on_error(move |_| {
        e2.fetch_add(1, Ordering::Relaxed);
    });
    let _svc = Server::with_config(a, cfg)
        .listen_and_serve("svc", |req| match &req.body[..] {
            b"panic" => panic!("source function exploded"),
            b"error" => stream::iter(vec![Err::<Source, String>("no such index".into())]).boxed(),
            b"late-panic" => stream::iter(0..2)
                .map(|i| {
                    if i == 1 {
                        panic!("second source exploded");
                    }
                    Ok::<_, String>(Source::empty("first"))
                })
                .boxed(),
            _ => stream::iter(vec![Ok::<_, String>(Source::new("ok", numbered(2, 8)))]).boxed(),
        })
        .unwrap();
    let client = client_for(&b, "svc").await;
    for body in ["panic", "error", "late-panic"] {
        let mut sources = client.lookup_and_post("svc", body, &[]).await.unwrap();
        let mut last = None;
        while let Some(s) = sources.next().await {
            last = Some(s.map(|_| ()));
        }
        let err = last.unwrap().unwrap_err();
        assert!(
            matches!(&err, Error::RequestFailed(m) if m.contains("source function failed")),
            "{body}: {err}"
        );
    }
    assert_eq!(errors.load(Ordering::Relaxed), 3);
    let mut sources = client.lookup_and_post("svc", "fine", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    assert_eq!(drain(&mut s).await.0.len(), 2, "the server still serves");
}

#[tokio::test]
async fn edge_shapes() {
    let (a, b) = pair().await;
    let big_header = Bytes::from(vec![b'h'; 1 << 20]);
    let bh = big_header.clone();
    let _svc = Server::new(a)
        .listen_and_serve("svc", move |req| match &req.body[..] {
            b"zero" => stream::iter(Vec::<Source>::new()).boxed(),
            b"empty" => stream::iter(vec![
                Source::new(Bytes::new(), stream::iter(vec![Bytes::new(), Bytes::new()])),
                Source::new(bh.clone(), numbered(1, 4)),
                Source::empty("no frames"),
            ])
            .boxed(),
            b"huge" => stream::iter(vec![Source::new(
                "100MiB",
                stream::iter([Bytes::from(vec![9u8; 100 << 20])]),
            )])
            .boxed(),
            _ => stream::iter(vec![Source::new(
                "over",
                stream::iter([Bytes::from(vec![0u8; (100 << 20) + 1])]),
            )])
            .boxed(),
        })
        .unwrap();
    let client = client_for(&b, "svc").await;

    let mut sources = client.lookup_and_post("svc", "zero", &[]).await.unwrap();
    assert!(
        sources.next().await.is_none(),
        "zero sources complete cleanly"
    );

    let mut sources = client.lookup_and_post("svc", "empty", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    assert!(s.header().is_empty());
    assert_eq!(drain(&mut s).await.0, vec![Bytes::new(), Bytes::new()]);
    let mut s = sources.next().await.unwrap().unwrap();
    assert_eq!(s.header(), &big_header);
    assert_eq!(drain(&mut s).await.0.len(), 1);
    let mut s = sources.next().await.unwrap().unwrap();
    let (frames, err) = drain(&mut s).await;
    assert!(frames.is_empty() && err.is_none());
    assert!(sources.next().await.is_none());

    let mut sources = client.lookup_and_post("svc", "huge", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    let (frames, err) = drain(&mut s).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].len(), 100 << 20);

    let mut sources = client.lookup_and_post("svc", "over", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    let (frames, err) = drain(&mut s).await;
    assert!(frames.is_empty());
    assert!(
        matches!(&err, Some(Error::SourceFailed(m)) if m.contains("exceeds the limit")),
        "{err:?}"
    );
}

#[tokio::test]
async fn unknown_service_is_an_immediate_error() {
    let (_a, b) = pair().await;
    let client = Client::new(b).unwrap();
    let err = client.lookup_and_post("nobody", "", &[]).await.unwrap_err();
    assert!(matches!(err, Error::NoSuchAddress(_)), "{err}");
}

/// The Go package's own test, ported: 10 sources each send "wait for me!", wait
/// 100 ms × i, then send 180 KiB of `B`, with compression on.
#[tokio::test]
async fn go_chanserv_scenario_with_compression() {
    let (a, b) = pair().await;
    let cfg = ServerConfig::default().use_compression(true);
    let _svc = Server::with_config(a, cfg)
        .listen_and_serve("chanserv", |_| {
            stream::iter(0..10u64).map(|i| {
                let (tx, src) = Source::channel(format!("source {i}"), 2);
                tokio::spawn(async move {
                    tx.send("wait for me!").await.unwrap();
                    tokio::time::sleep(Duration::from_millis(100 * i)).await;
                    tx.send(vec![b'B'; 180 * 1024]).await.unwrap();
                });
                src
            })
        })
        .unwrap();
    let client = client_for(&b, "chanserv").await;
    let mut sources = client
        .lookup_and_post("chanserv", "hello", &[])
        .await
        .unwrap();
    let mut readers = Vec::new();
    while let Some(s) = sources.next().await {
        let mut s = s.unwrap();
        readers.push(tokio::spawn(async move { drain(&mut s).await }));
    }
    let mut frames = 0;
    for r in readers {
        let (got, err) = r.await.unwrap();
        assert!(err.is_none(), "every source completes");
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0][..], b"wait for me!");
        assert!(got[1].iter().all(|&c| c == b'B') && got[1].len() == 180 * 1024);
        frames += got.len();
    }
    assert_eq!(frames, 20);
}

#[tokio::test(start_paused = true)]
async fn timeouts_say_which_one_fired() {
    // One node: dials stay in memory, so paused time is deterministic.
    let n = Node::new();
    let scfg = ServerConfig::default().sourcing_timeout(Some(Duration::from_secs(5)));
    let _svc = Server::with_config(n.clone(), scfg)
        .listen_and_serve("slow", |req| match &req.body[..] {
            b"sources" => stream::pending::<Source>().boxed(),
            _ => {
                let (tx, src) = Source::channel("stuck", 1);
                tokio::spawn(async move {
                    tx.send("first").await.unwrap();
                    std::future::pending::<()>().await;
                    drop(tx);
                });
                stream::iter([src]).boxed()
            }
        })
        .unwrap();
    let ccfg = ClientConfig::default().frame_read_timeout(Some(Duration::from_secs(2)));
    let client = Client::with_config(n.clone(), ccfg).unwrap();

    let mut sources = client
        .lookup_and_post("slow", "sources", &[])
        .await
        .unwrap();
    let err = sources.next().await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::RequestFailed(m) if m.contains("sourcing timeout")),
        "{err}"
    );

    let mut sources = client.lookup_and_post("slow", "frames", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), "first");
    let err = s.next().await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout(Timeout::FrameRead)), "{err}");
}

#[tokio::test]
async fn forwarded_sources_pass_through_a_gateway() {
    let (shard, gw) = pair().await;
    let _svc = Server::new(shard)
        .listen_and_serve("shard", |_| {
            stream::iter((0..3).map(|i| Source::new(format!("s{i}"), numbered(1000, 64))))
        })
        .unwrap();
    let upstream = client_for(&gw, "shard").await;
    let _gw = Server::new(gw.clone())
        .listen_and_serve("gw", move |_| {
            let up = upstream.clone();
            stream::once(async move { up.lookup_and_post("shard", "", &[]).await.unwrap() })
                .flatten()
        })
        .unwrap();
    let client = Client::new(gw).unwrap();
    let mut sources = client.lookup_and_post("gw", "", &[]).await.unwrap();
    let mut n = 0;
    while let Some(s) = sources.next().await {
        let mut s = s.unwrap();
        assert_eq!(s.header(), &format!("s{n}"));
        let (frames, err) = drain(&mut s).await;
        assert!(err.is_none());
        assert_eq!(frames.len(), 1000);
        n += 1;
    }
    assert_eq!(n, 3);
}

// The server's node is dropped the moment `shutdown` returns (the handle held its last
// clone): the source's END, already written, must still reach the client.
#[tokio::test]
async fn graceful_shutdown_lets_sources_finish() {
    let (a, b) = pair().await;
    let handle = Server::new(a)
        .listen_and_serve("svc", |_| {
            let (tx, src) = Source::channel("slow", 1);
            tokio::spawn(async move {
                for i in 0..5u8 {
                    if tx.send(vec![i]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            stream::iter([src])
        })
        .unwrap();
    let client = client_for(&b, "svc").await;
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    let reader = tokio::spawn(async move { drain(&mut s).await });
    handle.shutdown(Duration::from_secs(10)).await;
    let (frames, err) = reader.await.unwrap();
    assert!(err.is_none(), "{err:?} after {} frames", frames.len());
    assert_eq!(frames.len(), 5);
    let err = client.lookup_and_post("svc", "", &[]).await;
    assert!(err.is_err(), "no longer served");
}

/// Sends `drop_tx` when dropped: proves a producer was dropped.
struct DropSignal(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A producer that sends one frame and then idles forever (never polled to an end).
fn idle_after_one(signal: DropSignal) -> Source {
    let frames = stream::once(async { Bytes::from_static(b"one") })
        .chain(stream::pending())
        .map(move |f| {
            let _ = &signal;
            f
        });
    Source::new("idle", frames)
}

/// Asserts that a producer is dropped after the client left, and that the service is
/// back to its accept loop alone once the other tasks of this (current-thread) runtime
/// have run.
async fn dropped_and_settled(
    dropped: tokio::sync::oneshot::Receiver<()>,
    handle: &chanserv::ServeHandle,
    what: &str,
) {
    tokio::time::timeout(Duration::from_secs(10), dropped)
        .await
        .unwrap_or_else(|_| panic!("{what}: producer not dropped after the client left"))
        .unwrap();
    for _ in 0..10_000 {
        if handle.active_tasks() == 1 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{what}: {} tasks left", handle.active_tasks());
}

#[tokio::test]
async fn no_task_outlives_its_request() {
    let (a, b) = pair().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = Server::new(a)
        .listen_and_serve("svc", move |req| {
            if &req.body[..] == b"hang" {
                // A source function that never answers: only the client's leaving
                // can end this request.
                let (dtx, drx) = tokio::sync::oneshot::channel();
                tx.send(drx).unwrap();
                let signal = DropSignal(Some(dtx));
                return stream::pending::<Source>()
                    .map(move |s| {
                        let _ = &signal;
                        s
                    })
                    .boxed();
            }
            let sources: Vec<Source> = (0..3)
                .map(|_| {
                    let (dtx, drx) = tokio::sync::oneshot::channel();
                    tx.send(drx).unwrap();
                    idle_after_one(DropSignal(Some(dtx)))
                })
                .collect();
            stream::iter(sources).boxed()
        })
        .unwrap();
    let client = client_for(&b, "svc").await;
    assert_eq!(handle.active_tasks(), 1, "only the accept loop at rest");

    // Three idle sources: one pump each while the client holds them.
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut held = Vec::new();
    while let Some(s) = sources.next().await {
        let mut s = s.unwrap();
        assert_eq!(s.next().await.unwrap().unwrap(), "one");
        held.push(s);
    }
    assert_eq!(
        handle.active_tasks(),
        1 + 1,
        "one task drives the request's sources"
    );
    drop(held);
    for _ in 0..3 {
        let dropped = rx.recv().await.unwrap();
        dropped_and_settled(dropped, &handle, "an idle source").await;
    }

    // A request still waiting for its sources: dropping `Sources` ends it.
    let sources = client.lookup_and_post("svc", "hang", &[]).await.unwrap();
    let dropped = rx.recv().await.unwrap();
    assert_eq!(handle.active_tasks(), 2);
    drop(sources);
    dropped_and_settled(dropped, &handle, "a waiting request").await;
    handle.shutdown(Duration::ZERO).await;
}

/// A multiplexer whose dials to anything but services hang: the server can reach the
/// service's clients' requests but never dial their reply addresses back.
#[derive(Clone)]
struct NoDialBack(Node);

impl chanserv::Multiplexer for NoDialBack {
    type Stream = chanserv::MuxStream;
    type Listener = chanserv::NodeListener;

    fn bind(&self, vaddr: &str) -> chanserv::Result<Self::Listener> {
        self.0.bind(vaddr)
    }

    fn dial(
        &self,
        vaddr: &str,
        opts: impl Into<chanserv::DialOptions>,
    ) -> impl std::future::Future<Output = chanserv::Result<Self::Stream>> + Send {
        let back = vaddr.contains(':');
        let dial = self.0.dial(vaddr, opts);
        async move {
            if back {
                std::future::pending::<()>().await;
            }
            dial.await
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_whose_stream_never_comes_fails_with_chan_accept() {
    let n = Node::new();
    let _svc = Server::new(NoDialBack(n.clone()))
        .listen_and_serve("svc", |_| {
            stream::iter([Source::new("never", stream::pending::<Bytes>())])
        })
        .unwrap();
    let ccfg = ClientConfig::default().chan_accept_timeout(Duration::from_secs(3));
    let client = Client::with_config(n.clone(), ccfg).unwrap();
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    assert_eq!(s.header(), "never");
    let err = s.next().await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout(Timeout::ChanAccept)), "{err}");
    assert!(s.next().await.is_none());
}

#[tokio::test]
async fn error_mass_runs_its_action_after_consecutive_failures() {
    let (a, b) = pair().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cfg = ServerConfig::default()
        .max_error_mass(3)
        .on_max_error_mass(move |n| {
            tx.send(n).unwrap();
            async {}
        });
    let _svc = Server::with_config(a, cfg)
        .listen_and_serve("svc", |req| match &req.body[..] {
            b"error" => stream::iter(vec![Err::<Source, String>("broken".into())]).boxed(),
            _ => stream::iter(vec![Ok::<_, String>(Source::empty("ok"))]).boxed(),
        })
        .unwrap();
    let client = client_for(&b, "svc").await;
    let post = |body: &'static str| {
        let client = client.clone();
        async move {
            let mut sources = client.lookup_and_post("svc", body, &[]).await.unwrap();
            let mut failed = false;
            while let Some(s) = sources.next().await {
                failed |= s.is_err();
            }
            failed
        }
    };
    // Two failures, a success (resets the count), then three failures in a row.
    for body in ["error", "error", "fine", "error", "error"] {
        assert_eq!(post(body).await, body == "error");
    }
    assert!(
        rx.try_recv().is_err(),
        "no action before the mass is reached"
    );
    assert!(post("error").await);
    let n = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the action ran")
        .unwrap();
    assert_eq!(n, 3);
    assert!(!post("fine").await, "serving again after the action");
}
