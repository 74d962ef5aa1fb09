//! A service's counters after known workloads, and slow-consumer attribution.

use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, Server, Source};
use futures::{stream, StreamExt};
use tokio::time::timeout;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::pair;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn counters_add_up_after_a_known_workload() {
    timeout(T, async {
        let (a, b) = pair().await;
        let svc = Server::new(a)
            .listen_and_serve("svc", |_| {
                let big = (0..100).map(|_| Bytes::from(vec![7u8; 1024]));
                let failing = [Ok(Bytes::from("x")), Err("disk on fire")];
                stream::iter([
                    // Small and complete at once: inline on the master.
                    Source::new(
                        "inline",
                        stream::iter([Bytes::from("ab"), Bytes::from("c")]),
                    ),
                    Source::new("big", stream::iter(big)),
                    Source::try_new("failing", stream::iter(failing)),
                ])
            })
            .unwrap();
        b.wait_for_name("svc", T).await.unwrap();
        let client = Client::new(b).unwrap();
        for _ in 0..2 {
            let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
            while let Some(s) = sources.next().await {
                let mut s = s.unwrap();
                while let Some(f) = s.next().await {
                    if f.is_err() {
                        break;
                    }
                }
            }
        }
        let live = svc.stats();
        assert_eq!(live.requests_total, 2);
        // Shutting down waits for every request and source to end: final figures.
        let st = svc.shutdown(T).await;
        assert_eq!(
            (st.requests_total, st.requests_active, st.requests_failed),
            (2, 0, 0)
        );
        assert_eq!((st.sources_total, st.sources_active), (6, 0));
        assert_eq!(
            (st.sources_completed, st.sources_failed, st.sources_cut),
            (4, 2, 0)
        );
        assert_eq!(st.frames_sent, 2 * (2 + 100 + 1));
        assert_eq!(st.bytes_sent, 2 * (3 + 100 * 1024 + 1));
        assert!(st.blocked.is_empty());
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_slow_consumer_is_named_while_it_holds_a_source_back() {
    timeout(T, async {
        let (a, b) = pair().await;
        let svc = Server::new(a)
            .listen_and_serve("svc", |_| {
                let endless = stream::repeat(Bytes::from(vec![1u8; 16 * 1024]));
                stream::iter([Source::new("endless", endless)])
            })
            .unwrap();
        b.wait_for_name("svc", T).await.unwrap();
        let client = Client::new(b.clone()).unwrap();
        let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
        let mut s = sources.next().await.unwrap().unwrap();
        s.next().await.unwrap().unwrap();
        // The consumer stops reading: its credit runs out and the pump waits on it.
        // Nothing signals that moment, so look until it shows (bounded by T).
        let blocked = loop {
            let st = svc.stats();
            if let Some(b) = st.blocked.first() {
                assert_eq!(st.sources_active, 1);
                break b.clone();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(
            blocked.client.node(),
            b.id(),
            "the consumer's node is named"
        );
        assert_eq!(blocked.source, 0);
        assert!(
            svc.stats().blocked[0].waiting >= blocked.waiting,
            "the wait grows"
        );
        drop((s, sources));
        let st = svc.shutdown(T).await;
        assert_eq!((st.sources_cut, st.sources_completed), (1, 0));
        assert!(st.blocked.is_empty(), "a cut source is no longer blocked");
        assert!(st.backpressure_wait > Duration::ZERO);
        // The first 16 KiB frame fills the source's initial credit on its own.
        assert!(st.frames_sent >= 1);
    })
    .await
    .expect("hung");
}
