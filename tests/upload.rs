//! Uploads (issue 13): a request carries a stream of frames after its body, which the
//! service reads with `Request::upload()`, with backpressure and cancellation both ways
//! and completion distinct from failure.
//!
//! The big echo runs over loopback TCP; its size is `CHANSERV_UPLOAD_BYTES` (1 GiB by
//! default: about 2 s in the test profile); `cargo test --release --test upload echo_of
//! -- --nocapture` prints its time, what was in flight and peak RSS. The other tests run over an
//! in-memory link (or within one node) with time paused, so a hang fails at once on
//! the virtual clock.

#[allow(dead_code)] // freezes and delays are other tests'
#[path = "support/faulty.rs"]
mod faulty;
#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/upload_rig.rs"]
mod upload_rig;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use chanserv::{Client, Error, Node, NodeConfig, Request, RequestTag, Server, Source};
use futures::stream::{self, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use upload_rig::*;

/// 1 GiB (`CHANSERV_UPLOAD_BYTES` to change it) uploaded to a service that echoes it back as a source
/// while it arrives, over loopback TCP: every byte checked, in order, and what is in
/// flight at any time (taken from the upload stream, not yet echoed back) stays
/// bounded, whatever the size. From 512 MiB on, peak RSS is checked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_of_a_big_upload_every_byte_checked_memory_bounded() {
    let bytes: u64 = std::env::var("CHANSERV_UPLOAD_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
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
    // Credit, queues and windows on both sides, each a few MiB at most: a bound that
    // does not grow with the upload.
    assert!(
        most_in_flight * (FRAME as u64) <= 32 << 20,
        "{most_in_flight} frames in flight"
    );
    // The whole test process (its frame patterns, 16 MiB, included) stays far below
    // what went through it.
    if bytes >= 512 << 20 && hwm > 0 {
        assert!(hwm << 10 < 128 << 20, "peak RSS {hwm} KiB");
    }
}

/// A service that reads the whole upload before it answers, over loopback TCP, while
/// the client waits on its `Sources`: the master is read and written at once.
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
        let rig = rig(move |req| {
            sink(req.upload().expect("an upload"), tx.clone());
            stream::iter([Source::empty("ok")])
        })
        .await;
        let client = &rig.client;

        // (To the service's node by id: `upload_to` is `lookup_and_upload` otherwise.)
        let up = stream::iter((0..3u64).map(|i| Ok::<_, Error>(frame(i))));
        let server = rig.nodes[0].id();
        let sources = client.upload_to(server, "svc", "", &[], up).await.unwrap();
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
            let got = within("a frame", seen.recv()).await;
            assert!(matches!(got, Some(Seen::Frame)));
        }
        let _ok = within("the source", sources.next()).await.unwrap().unwrap();
        drop(sources);
        let (n, end) = end_seen(&mut seen).await;
        assert_eq!(n, 2);
        assert!(
            matches!(&end, Some(Error::Reset)),
            "a client that left is a failure: {end:?}"
        );
        let (_, e) = within("the upload's end", feed_forever(feed))
            .await
            .unwrap();
        assert!(
            matches!(e, Error::Closed),
            "the producer sees its consumer gone: {e}"
        );
    })
    .await;
}

/// A service that reads a little of the upload and drops it, and one that never takes
/// it: the client's upload stops (a channel's `send` fails with `Closed`) and the
/// request still completes.
#[tokio::test(start_paused = true)]
async fn an_upload_the_service_lets_go_of_stops_and_the_request_completes() {
    bounded(async {
        let rig = rig(|req: Request| match req.tags().is_empty() {
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
        })
        .await;
        for (tags, header) in [
            (vec![], "dropped"),
            (vec![RequestTag::Meta("x".into())], "untouched"),
        ] {
            let (feed, up) = Source::channel("", 4);
            let sources = rig
                .client
                .lookup_and_upload("svc", "", &tags, up)
                .await
                .unwrap();
            let sender = feed_forever(feed);
            assert_eq!(headers(sources).await, [header], "the request completes");
            let (sent, e) = within("the upload stopping", sender).await.unwrap();
            assert!(matches!(e, Error::Closed), "{header}: {e}");
            eprintln!("{header}: {sent} frames sent before the stop");
        }
    })
    .await;
}

/// The service lets go of the upload while the client reads the source it answered
/// with and leaves its `Sources` alone: the upload stops all the same, at once (the
/// upload's task reads the master, not the user).
#[tokio::test(start_paused = true)]
async fn the_upload_stops_while_the_client_reads_only_a_source() {
    bounded(async {
        let rig = rig(|req: Request| {
            let mut up = req.upload().expect("an upload");
            stream::once(async move {
                let first = up.next().await.unwrap().unwrap();
                drop(up);
                let rest = stream::pending();
                Source::new("first", stream::iter([first]).chain(rest))
            })
        })
        .await;
        let (feed, up) = Source::channel("", 4);
        let mut sources = rig
            .client
            .lookup_and_upload("svc", "", &[], up)
            .await
            .unwrap();
        let sender = feed_forever(feed);
        let mut first = within("the source", sources.next()).await.unwrap().unwrap();
        check(
            0,
            &within("its frame", first.next()).await.unwrap().unwrap(),
        );
        // `sources` is not polled again until the upload stopped.
        let (sent, e) = within("the upload stopping", sender).await.unwrap();
        assert!(matches!(e, Error::Closed), "{e}");
        assert!(sent < 64, "{sent} frames sent: stopped promptly");
        drop(sources);
    })
    .await;
}

/// A client that reads a few frames of the echo and then stops: the echo waits (its
/// credit), so the service stops reading the upload, so the client's upload stream is
/// polled no further than a bounded way ahead. Once the client reads again, every
/// frame arrives.
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_holds_the_echo_and_its_upload_back() {
    bounded(async {
        let rig = rig(|req: Request| {
            stream::iter([Source::try_new("echo", req.upload().expect("an upload"))])
        })
        .await;
        let polled = Arc::new(AtomicU64::new(0));
        let n = 1024; // 64 MiB
        let up = frames(n, polled.clone());
        let mut sources = rig
            .client
            .lookup_and_upload("svc", "", &[], up)
            .await
            .unwrap();
        let mut echo = within("the echo", sources.next()).await.unwrap().unwrap();
        for i in 0..4 {
            check(i, &within("a frame", echo.next()).await.unwrap().unwrap());
        }
        let stalled = quiet(&polled).await;
        eprintln!("stalled after {stalled} frames");
        assert!(
            stalled * (FRAME as u64) <= 8 << 20,
            "{stalled} frames taken"
        );
        let mut i = 4;
        while let Some(f) = within("the echo", echo.next()).await {
            check(i, &f.unwrap());
            i += 1;
        }
        assert_eq!(i, n);
        assert!(within("the end", sources.next()).await.is_none());
    })
    .await;
}

/// A service that holds the upload without reading it: the client's upload stream is
/// polled only a bounded way ahead (the master's window and the service's queue), not
/// to its end; once the service reads, all of it arrives.
#[tokio::test(start_paused = true)]
async fn a_service_that_does_not_read_holds_the_upload_back() {
    bounded(async {
        let (go_tx, go_rx) = mpsc::unbounded_channel::<oneshot::Sender<usize>>();
        let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
        let rig = rig(move |req: Request| {
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
        let up = frames(n, polled.clone());
        let sources = rig
            .client
            .lookup_and_upload("svc", "", &[], up)
            .await
            .unwrap();
        let stalled = quiet(&polled).await;
        eprintln!("stalled after {stalled} frames");
        assert!(
            stalled * (FRAME as u64) <= 4 << 20,
            "{stalled} frames taken"
        );
        let (done_tx, done_rx) = oneshot::channel();
        go_tx.send(done_tx).unwrap();
        assert_eq!(headers(sources).await, ["ok"]);
        assert_eq!(within("the rest", done_rx).await.unwrap(), n as usize);
    })
    .await;
}

/// Cancellation reaches the service after the upload: a source function that read the
/// upload to its end, and one that never took it, both then waiting forever, are
/// dropped when the client drops its `Sources`.
#[tokio::test(start_paused = true)]
async fn dropping_sources_cancels_the_request_after_its_upload() {
    bounded(async {
        let dropped = drops();
        let d = dropped.clone();
        let rig = rig(move |req: Request| {
            let guard = Counted(d.clone());
            let up = req.tags().is_empty().then(|| req.upload()).flatten();
            stream::once(async move {
                let _guard = guard;
                if let Some(mut up) = up {
                    while let Some(f) = up.next().await {
                        f.unwrap();
                    }
                }
                std::future::pending::<Source>().await
            })
        })
        .await;
        for tags in [vec![], vec![RequestTag::Meta("x".into())]] {
            let before = *dropped.borrow();
            let up = stream::iter((0..3u64).map(|i| Ok::<_, Error>(frame(i))));
            let mut sources = rig
                .client
                .lookup_and_upload("svc", "", &tags, up)
                .await
                .unwrap();
            // Nothing comes: give the service every chance to read the upload.
            let nothing = timeout(Duration::from_secs(1), sources.next()).await;
            assert!(nothing.is_err());
            assert_eq!(*dropped.borrow(), before, "alive while wanted");
            drop(sources);
            dropped_past("the cancellation", &dropped, before).await;
        }
    })
    .await;
}

/// A client that leaves while the service holds its upload unread, with megabytes of
/// it waiting behind the master's reset: the request is cancelled at once all the same
/// (over a link and within one node), and the upload, read later, fails with `Reset`
/// after what had arrived.
#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_cancels_a_request_that_holds_its_upload_unread() {
    bounded(async {
        for via in [Via::Link, Via::SameNode] {
            let dropped = drops();
            let (d, (up_tx, mut up_rx)) = (dropped.clone(), mpsc::unbounded_channel());
            let rig = rig_via(via, move |req: Request| {
                up_tx.send(req.upload().expect("an upload")).unwrap();
                let guard = Counted(d.clone());
                stream::once(async move {
                    let _guard = guard;
                    std::future::pending::<Source>().await
                })
            })
            .await;
            let polled = Arc::new(AtomicU64::new(0));
            let up = frames(1024, polled.clone());
            let sources = rig
                .client
                .lookup_and_upload("svc", "", &[], up)
                .await
                .unwrap();
            let mut up = within("the upload", up_rx.recv()).await.unwrap();
            // 16 frames wait queued for the service, the rest unread in the master's
            // window (or pipe): behind them comes the client's leaving.
            let sent = quiet(&polled).await;
            eprintln!("{via:?}: {sent} frames sent");
            assert!(sent >= 20, "{via:?}: {sent} frames sent, unread");
            drop(sources);
            dropped_past("the cancellation", &dropped, 0).await;
            let mut n = 0;
            let end = loop {
                match within("the upload", up.next()).await {
                    Some(Ok(f)) => {
                        check(n, &f);
                        n += 1;
                    }
                    Some(Err(e)) => break e,
                    None => panic!("{via:?}: a client that left is no completion"),
                }
            };
            assert!(matches!(end, Error::Reset), "{via:?}: {end}");
        }
    })
    .await;
}

/// A link that dies midway fails the upload on both sides: the service's upload ends
/// with an error (never `None`), the client's `Sources` fails, and the client's upload
/// stream is let go of.
#[tokio::test(start_paused = true)]
async fn a_link_that_dies_fails_the_upload_on_both_sides() {
    bounded(async {
        let (io_a, io_b, faults) = faulty::faulty_pair();
        let cfg =
            || NodeConfig::default().keepalive(Duration::from_secs(1), Duration::from_secs(4));
        let (server, client) = (Node::with_config(cfg()), Node::with_config(cfg()));
        let (s, c) = tokio::join!(server.attach(io_a, true), client.attach(io_b, false));
        assert_eq!((s.unwrap(), c.unwrap()), (client.id(), server.id()));
        let (tx, mut seen) = mpsc::unbounded_channel();
        let _svc = Server::new(server.clone())
            .listen_and_serve("svc", move |req: Request| {
                sink(req.upload().expect("an upload"), tx.clone());
                stream::once(std::future::pending::<Source>())
            })
            .unwrap();
        client.wait_for_name("svc", BOUND).await.unwrap();
        let client = Client::new(client).unwrap();
        let (feed, up) = Source::channel("", 4);
        let mut sources = client.lookup_and_upload("svc", "", &[], up).await.unwrap();
        feed.send(frame(0)).await.unwrap();
        let got = within("a frame", seen.recv()).await;
        assert!(matches!(got, Some(Seen::Frame)));
        faults.cut();
        let (n, end) = end_seen(&mut seen).await;
        assert_eq!(n, 1);
        assert!(matches!(&end, Some(e) if e.is_closed()), "{end:?}");
        let failed = within("the request", sources.next()).await;
        assert!(
            matches!(&failed, Some(Err(e)) if e.is_closed()),
            "{failed:?}"
        );
        let (_, e) = within("the upload's end", feed_forever(feed))
            .await
            .unwrap();
        assert!(matches!(e, Error::Closed), "{e}");
    })
    .await;
}
