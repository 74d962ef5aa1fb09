//! Flow in bytes and delivery confirmation (protocol v2), through a real server and
//! client on two nodes: credit holds a producer back while its consumer does not
//! read, `SourceSender::flush` resolves only once the consumer took what came before
//! it, and the producer learns each source's outcome.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, Node, Outcome, OutcomeFuture, Request, ServeHandle, Server, Source};
use futures::{stream, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

#[path = "support/mesh.rs"]
mod mesh;

const T: Duration = Duration::from_secs(20);

async fn serve<F, S>(f: F) -> (ServeHandle, Client<Node>)
where
    F: Fn(Request) -> S + Send + Sync + 'static,
    S: Stream<Item = Source> + Send + 'static,
{
    let (server, client) = mesh::pair().await;
    let handle = Server::new(server).listen_and_serve("flow", f).unwrap();
    client.wait_for_name("flow", T).await.unwrap();
    (handle, Client::new(client).unwrap())
}

async fn one_source(client: &Client<Node>) -> Source {
    let mut sources = client.lookup_and_post("flow", "", &[]).await.unwrap();
    sources.next().await.unwrap().unwrap()
}

/// Waits until the service lists `n` sources held back by their consumers.
async fn until_blocked(svc: &ServeHandle, n: usize) {
    while svc.stats().blocked.len() < n {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn credit_holds_a_producer_back_while_its_consumer_does_not_read() {
    timeout(T, async {
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let (svc, client) = serve(move |_| {
            let m = m.clone();
            // Endless 64 KiB frames, counted as the server takes them.
            let frames = stream::repeat_with(move || {
                m.fetch_add(1, Ordering::SeqCst);
                Bytes::from(vec![7u8; 64 << 10])
            });
            stream::iter([Source::new("endless", frames)])
        })
        .await;
        let mut source = one_source(&client).await;
        let first = source.next().await.unwrap().unwrap();
        assert_eq!(first.len(), 64 << 10);
        until_blocked(&svc, 1).await;
        // Taken: the one read, one in flight alone (larger than the 16 KiB window),
        // one held by the pump while it waits for credit, one at most being made.
        let taken = made.load(Ordering::SeqCst);
        assert!(taken <= 4, "the producer ran {taken} frames ahead");
        drop(source);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn flush_resolves_once_the_consumer_took_every_frame_before_it() {
    timeout(T, async {
        let (flushed_tx, mut flushed) = mpsc::unbounded_channel();
        let slot = Arc::new(Mutex::new(Some(flushed_tx)));
        let (_svc, client) = serve(move |_| {
            let (tx, source) = Source::channel("flushed", 8);
            let done = slot.lock().unwrap().take().expect("one request");
            tokio::spawn(async move {
                for i in 0..3u8 {
                    tx.send(vec![i; 100]).await.unwrap();
                }
                let r = tx.flush().await;
                done.send(r.is_ok()).unwrap();
                tx.send("after").await.unwrap();
            });
            stream::iter([source])
        })
        .await;
        let mut source = one_source(&client).await;
        // Nothing taken yet: the flush must still wait.
        let early = timeout(Duration::from_millis(300), flushed.recv()).await;
        assert!(early.is_err(), "flush resolved before the consumer read");
        for i in 0..2u8 {
            assert_eq!(source.next().await.unwrap().unwrap(), vec![i; 100]);
        }
        let early = timeout(Duration::from_millis(200), flushed.recv()).await;
        assert!(early.is_err(), "flush resolved with a frame untaken");
        assert_eq!(source.next().await.unwrap().unwrap(), vec![2u8; 100]);
        assert_eq!(flushed.recv().await, Some(true));
        assert_eq!(source.next().await.unwrap().unwrap(), "after");
        assert!(source.next().await.is_none());
    })
    .await
    .unwrap();
}

/// A service answering one watched source per request, its outcome sent back.
async fn watched(
    make: impl Fn() -> Source + Send + Sync + 'static,
) -> (ServeHandle, Client<Node>, mpsc::UnboundedReceiver<Outcome>) {
    let (otx, orx) = mpsc::unbounded_channel();
    let (svc, client) = serve(move |_| {
        let (source, outcome): (Source, OutcomeFuture) = make().with_outcome();
        let otx = otx.clone();
        tokio::spawn(async move { otx.send(outcome.await).unwrap() });
        stream::iter([source])
    })
    .await;
    (svc, client, orx)
}

#[tokio::test]
async fn a_source_read_to_its_end_is_delivered_even_a_small_one() {
    timeout(T, async {
        // Small and complete: it would go inline, but a watched source is confirmed.
        let (_svc, client, mut outcomes) =
            watched(|| Source::new("small", stream::iter([Bytes::from("a")]))).await;
        let mut source = one_source(&client).await;
        assert_eq!(source.next().await.unwrap().unwrap(), "a");
        let early = timeout(Duration::from_millis(200), outcomes.recv()).await;
        assert!(early.is_err(), "delivered before the consumer took the end");
        assert!(source.next().await.is_none());
        assert_eq!(outcomes.recv().await, Some(Outcome::Delivered));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_source_dropped_midway_is_consumer_gone_and_a_failed_one_says_why() {
    timeout(T, async {
        let (_svc, client, mut outcomes) = watched(|| {
            Source::new(
                "many",
                stream::iter((0..100).map(|_| Bytes::from(vec![1u8; 1000]))),
            )
        })
        .await;
        let mut source = one_source(&client).await;
        source.next().await.unwrap().unwrap();
        drop(source);
        assert_eq!(outcomes.recv().await, Some(Outcome::ConsumerGone));

        let (_svc, client, mut outcomes) = watched(|| {
            let items = [Ok(Bytes::from("x")), Err("disk on fire")];
            Source::try_new("failing", stream::iter(items))
        })
        .await;
        let mut source = one_source(&client).await;
        assert_eq!(source.next().await.unwrap().unwrap(), "x");
        assert!(source.next().await.unwrap().is_err());
        assert_eq!(
            outcomes.recv().await,
            Some(Outcome::Failed("disk on fire".into()))
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn finish_reports_delivery_of_a_channel_source() {
    timeout(T, async {
        let (otx, mut outcomes) = mpsc::unbounded_channel();
        let (_svc, client) = serve(move |_| {
            let (tx, source) = Source::channel("ch", 4);
            let otx = otx.clone();
            tokio::spawn(async move {
                tx.send("one").await.unwrap();
                otx.send(tx.finish().await).unwrap();
            });
            stream::iter([source])
        })
        .await;
        let mut source = one_source(&client).await;
        assert_eq!(source.next().await.unwrap().unwrap(), "one");
        assert!(source.next().await.is_none());
        assert_eq!(outcomes.recv().await, Some(Outcome::Delivered));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn frames_far_larger_than_the_window_arrive_intact_and_in_order() {
    timeout(T, async {
        // 64 frames of 1 MiB: with the 16 KiB window alone each frame would wait
        // for the one before it; the window grows and all arrive intact.
        let (_svc, client) = serve(|_| {
            let frames = (0..64u8).map(|i| Bytes::from(vec![i; 1 << 20]));
            stream::iter([Source::new("big", stream::iter(frames))])
        })
        .await;
        let mut source = one_source(&client).await;
        for i in 0..64u8 {
            let f = source.next().await.unwrap().unwrap();
            assert!(f.len() == 1 << 20 && f.iter().all(|b| *b == i), "frame {i}");
        }
        assert!(source.next().await.is_none());
    })
    .await
    .unwrap();
}
