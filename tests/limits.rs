//! Scale limits: nothing a consumer does pushes a link past a limit of the layer under
//! it. A request's sources, read strictly one after another, hold at most the link's
//! stream slots at once, however many there are.

use std::time::{Duration, Instant};

use bytes::Bytes;
use chanserv::{Client, Node, NodeConfig, Server, Source};
use futures::{stream, StreamExt};

/// A source that is not complete when it is announced (so it gets a child stream, not
/// an inline slot), with one frame that says which source it is.
fn late_source(i: u32) -> Source {
    let frame = Bytes::from(i.to_le_bytes().to_vec());
    Source::new(
        format!("s{i}"),
        stream::once(async move {
            tokio::task::yield_now().await;
            frame
        }),
    )
}

async fn read_one_after_another(cfg: NodeConfig, sources: u32) {
    let a = Node::with_config(cfg.clone());
    let b = Node::with_config(cfg);
    let addr = a.listen("127.0.0.1:0").await.unwrap();
    b.join(addr).await.unwrap().detach();
    let _svc = Server::new(a.clone())
        .listen_and_serve("many", move |_| stream::iter(0..sources).map(late_source))
        .unwrap();
    b.wait_for_name("many", Duration::from_secs(10))
        .await
        .unwrap();
    let client = Client::new(b.clone()).unwrap();
    let started = Instant::now();
    let mut all = client.lookup_and_post("many", "", &[]).await.unwrap();
    let mut n = 0u32;
    while let Some(s) = all.next().await {
        let mut s = s.unwrap_or_else(|e| panic!("source {n}: {e}"));
        assert_eq!(s.header(), &format!("s{n}"));
        let f = s.next().await.unwrap().unwrap();
        assert_eq!(f, Bytes::from(n.to_le_bytes().to_vec()), "source {n}");
        assert!(s.next().await.is_none(), "source {n} completes");
        n += 1;
    }
    assert_eq!(n, sources, "every source arrived");
    eprintln!(
        "{sources} sources one after another: {:?}",
        started.elapsed()
    );
    // The link survived: it still carries requests.
    assert_eq!(b.link_count(a.id()), 1);
    let mut again = client.lookup_and_post("many", "", &[]).await.unwrap();
    assert!(again.next().await.unwrap().is_ok());
}

/// With a small slot count the slots recycle thousands of times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_read_in_order_recycle_a_few_stream_slots() {
    let cfg = NodeConfig::default().max_streams(16);
    tokio::time::timeout(Duration::from_secs(120), read_one_after_another(cfg, 5_000))
        .await
        .expect("no hang");
}

/// Issue 9's case with default settings: 20,000 and more sources read one after
/// another used to pass yamux's stream limit and kill the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_sources_read_one_after_another() {
    tokio::time::timeout(
        Duration::from_secs(300),
        read_one_after_another(NodeConfig::default(), 100_000),
    )
    .await
    .expect("no hang");
}
