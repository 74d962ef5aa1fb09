//! A client's and its requests' counters (`Client::stats`, `Sources::stats`) after
//! known workloads: exact once every source has ended, a dropped request ended, the
//! requests of one client adding up to the client's.

use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, ClientStats, Node, RequestStats, ServeHandle, Server, Source, Sources};
use futures::{stream, StreamExt};
use tokio::time::timeout;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::pair;

const T: Duration = Duration::from_secs(20);
/// Frames the failing source sends before it fails.
const BAD: u64 = 3;

/// `n` sources of `m` frames of `k` bytes, then one that fails after `BAD` frames.
#[derive(Clone, Copy)]
struct Shape {
    n: u64,
    m: u64,
    k: u64,
}

impl Shape {
    fn body(self) -> String {
        format!("{} {} {}", self.n, self.m, self.k)
    }
    fn frames(self) -> u64 {
        self.n * self.m + BAD
    }
    fn bytes(self) -> u64 {
        self.frames() * self.k
    }
}

/// Serves "shape": the sources of the [`Shape`] in the request's body.
fn serve_shapes(node: Node) -> ServeHandle {
    Server::new(node)
        .listen_and_serve("shape", |req| {
            let v: Vec<usize> = String::from_utf8_lossy(&req.body)
                .split(' ')
                .map(|x| x.parse().unwrap())
                .collect();
            let (n, m, k) = (v[0], v[1], v[2]);
            let good = (0..n).map(move |i| {
                let frames = (0..m).map(move |_| Bytes::from(vec![i as u8; k]));
                Source::new(format!("good {i}"), stream::iter(frames))
            });
            let failing = (0..BAD)
                .map(move |_| Ok(Bytes::from(vec![9; k])))
                .chain([Err("disk on fire")]);
            let bad = Source::try_new("bad", stream::iter(failing));
            stream::iter(good.chain([bad]))
        })
        .unwrap()
}

/// Reads every source of `sources` to its end: (frames, bytes, failed sources).
async fn drain(sources: &mut Sources) -> (u64, u64, u64) {
    let (mut frames, mut bytes, mut failed) = (0, 0, 0);
    while let Some(s) = sources.next().await {
        let mut s = s.unwrap();
        while let Some(f) = s.next().await {
            match f {
                Ok(f) => (frames, bytes) = (frames + 1, bytes + f.len() as u64),
                Err(_) => failed += 1,
            }
        }
    }
    (frames, bytes, failed)
}

fn assert_request(st: &RequestStats, shape: Shape) {
    assert_eq!(st.service, "shape");
    assert!(!st.announcing, "the server announced all: {st:?}");
    assert_eq!(
        (
            st.sources_announced,
            st.sources_completed,
            st.sources_failed
        ),
        (shape.n + 1, shape.n, 1),
        "{st:?}"
    );
    assert_eq!((st.sources_dropped, st.sources_open), (0, 0), "{st:?}");
    assert_eq!(
        (st.frames_received, st.bytes_received),
        (shape.frames(), shape.bytes())
    );
}

#[tokio::test]
async fn counters_are_exact_after_a_known_workload() {
    timeout(T, async {
        let (a, b) = pair().await;
        let _svc = serve_shapes(a);
        b.wait_for_name("shape", T).await.unwrap();
        let client = Client::new(b).unwrap();
        assert_eq!(client.stats(), ClientStats::default());
        let shape = Shape {
            n: 4,
            m: 50,
            k: 1000,
        };
        let mut sources = client
            .lookup_and_post("shape", shape.body(), &[])
            .await
            .unwrap();
        let st = sources.stats();
        assert!(st.announcing);
        assert_eq!((st.sources_announced, st.frames_received), (0, 0));
        assert_eq!(client.stats().requests_active, 1);

        let read = drain(&mut sources).await;
        assert_eq!(read, (shape.frames(), shape.bytes(), 1));
        let st = sources.stats();
        assert_request(&st, shape);
        assert!(st.request > 0 && st.elapsed > Duration::ZERO, "{st:?}");

        let c = client.stats();
        assert_eq!(
            (c.requests_active, c.requests_total, c.requests_failed),
            (0, 1, 0)
        );
        assert_eq!(
            (c.sources_announced, c.sources_completed, c.sources_failed),
            (shape.n + 1, shape.n, 1)
        );
        assert_eq!((c.sources_dropped, c.sources_open), (0, 0));
        assert_eq!(
            (c.frames_received, c.bytes_received),
            (shape.frames(), shape.bytes())
        );
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_dropped_request_counts_as_ended() {
    timeout(T, async {
        let (a, b) = pair().await;
        let _svc = Server::new(a)
            .listen_and_serve("endless", |_| {
                let endless = stream::repeat(Bytes::from(vec![1u8; 1024]));
                stream::iter([Source::new("endless", endless)])
            })
            .unwrap();
        b.wait_for_name("endless", T).await.unwrap();
        let client = Client::new(b).unwrap();
        let mut sources = client.lookup_and_post("endless", "", &[]).await.unwrap();
        let mut s = sources.next().await.unwrap().unwrap();
        for _ in 0..2000 {
            s.next().await.unwrap().unwrap();
        }
        // Published once per read from the stream (at most 256 KiB here): the
        // numbers of a source in progress lag by no more than that.
        let st = sources.stats();
        assert!(st.frames_received >= 2000 - 256, "{st:?}");
        assert_eq!((st.sources_announced, st.sources_open), (1, 1));
        drop(sources);
        // A source handed out keeps flowing, and keeps its request in progress.
        let c = client.stats();
        assert_eq!((c.requests_active, c.sources_open), (1, 1), "{c:?}");
        drop(s);
        let c = client.stats();
        assert_eq!(
            (c.requests_active, c.requests_total, c.requests_failed),
            (0, 1, 0),
            "dropping is not failing: {c:?}"
        );
        assert_eq!(
            (c.sources_announced, c.sources_dropped, c.sources_open),
            (1, 1, 0)
        );
        assert_eq!((c.sources_completed, c.sources_failed), (0, 0));
        // A dropped source publishes what it took off its stream.
        assert!(c.frames_received >= 2000, "{c:?}");
        assert_eq!(c.bytes_received, c.frames_received * 1024);

        // Dropped before anything was read: ended at once.
        let sources = client.lookup_and_post("endless", "", &[]).await.unwrap();
        assert_eq!(client.stats().requests_active, 1);
        drop(sources);
        let c = client.stats();
        assert_eq!((c.requests_active, c.requests_total), (0, 2), "{c:?}");
        assert_eq!((c.requests_failed, c.sources_open), (0, 0), "{c:?}");
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn the_requests_of_one_client_add_up() {
    timeout(T, async {
        let (a, b) = pair().await;
        let _svc = serve_shapes(a);
        b.wait_for_name("shape", T).await.unwrap();
        let client = Client::new(b).unwrap();
        // Two shapes at once, through two clones; the small one's sources are sent
        // inline with their announcement and counted the same.
        let (big, small) = (
            Shape {
                n: 3,
                m: 40,
                k: 512,
            },
            Shape { n: 5, m: 2, k: 7 },
        );
        let (c1, c2) = (client.clone(), client.clone());
        let mut s1 = c1.lookup_and_post("shape", big.body(), &[]).await.unwrap();
        let mut s2 = c2
            .lookup_and_post("shape", small.body(), &[])
            .await
            .unwrap();
        assert_eq!(client.stats().requests_active, 2);
        let (r1, r2) = tokio::join!(drain(&mut s1), drain(&mut s2));
        assert_eq!((r1.0, r2.0), (big.frames(), small.frames()));
        let (st1, st2) = (s1.stats(), s2.stats());
        assert_request(&st1, big);
        assert_request(&st2, small);
        assert_ne!(st1.request, st2.request);

        let c = client.stats();
        let sum = |f: fn(&RequestStats) -> u64| f(&st1) + f(&st2);
        assert_eq!(c.sources_announced, sum(|s| s.sources_announced));
        assert_eq!(c.sources_completed, sum(|s| s.sources_completed));
        assert_eq!(c.sources_failed, sum(|s| s.sources_failed));
        assert_eq!(c.frames_received, sum(|s| s.frames_received));
        assert_eq!(c.bytes_received, sum(|s| s.bytes_received));
        assert_eq!(c.bytes_received, big.bytes() + small.bytes());
        assert_eq!(
            (c.requests_active, c.requests_total, c.requests_failed),
            (0, 2, 0)
        );
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn failed_requests_are_counted() {
    timeout(T, async {
        let (a, b) = pair().await;
        let _svc = Server::new(a)
            .listen_and_serve("half", |_| {
                // Over the inline budget: sent on a child stream of its own.
                let frames = (0..20).map(|_| Bytes::from(vec![5u8; 1024]));
                let one = Source::new("one", stream::iter(frames));
                stream::iter([Ok(one), Err("no more")])
            })
            .unwrap();
        b.wait_for_name("half", T).await.unwrap();
        let client = Client::new(b).unwrap();
        let mut sources = client.lookup_and_post("half", "", &[]).await.unwrap();
        let mut one = sources.next().await.unwrap().unwrap();
        assert!(sources.next().await.unwrap().is_err());
        assert!(!sources.stats().announcing);
        let c = client.stats();
        assert_eq!((c.requests_failed, c.requests_active), (1, 1), "{c:?}");
        // Its one source still flows, and holds the request in progress.
        assert_eq!(one.by_ref().count().await, 20);
        let c = client.stats();
        assert_eq!((c.requests_failed, c.requests_active), (1, 0), "{c:?}");
        assert_eq!((c.sources_completed, c.frames_received), (1, 20));

        // A post that fails is a failed request too.
        assert!(client.lookup_and_post("nobody", "", &[]).await.is_err());
        let c = client.stats();
        assert_eq!(
            (c.requests_total, c.requests_failed, c.requests_active),
            (2, 2, 0)
        );
    })
    .await
    .expect("hung");
}
