//! Scatter-gather: one request to every provider of a name, merged, with a deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, Error, Node, ServeHandle, Server, Source};
use futures::{stream, StreamExt};
use tokio::time::{timeout, Instant};

#[path = "support/mesh.rs"]
mod mesh;
use mesh::link;

const T: Duration = Duration::from_secs(20);

#[derive(Clone, Copy)]
enum Kind {
    /// Two sources, each with the node's id as header.
    Good,
    /// The source function fails.
    Failing,
    /// Never says a word.
    Silent,
}

fn provider(kind: Kind) -> (Node, ServeHandle) {
    let node = Node::new();
    let id = node.id();
    let svc = Server::new(node.clone())
        .listen_and_serve_async("kv", move |_| async move {
            match kind {
                Kind::Good => Ok(stream::iter((0..2).map(move |_| {
                    let header = Bytes::from(id.to_le_bytes().to_vec());
                    Source::new(header, stream::iter([Bytes::from("v")]))
                }))),
                Kind::Failing => Err("shard offline".into()),
                Kind::Silent => std::future::pending().await,
            }
        })
        .unwrap();
    (node, svc)
}

/// What a scatter over providers of these kinds yields: per provider, the headers of
/// its sources or its error; and how long it took.
async fn scatter(
    kinds: &[Kind],
    within: Duration,
) -> (Vec<u64>, BTreeMap<u64, Vec<String>>, Duration) {
    let client_node = Node::new();
    let providers: Vec<_> = kinds.iter().map(|k| provider(*k)).collect();
    for (n, _) in &providers {
        link(&client_node, n).await;
    }
    client_node
        .wait_for_providers("kv", kinds.len(), T)
        .await
        .unwrap();
    let client = Client::new(client_node).unwrap();
    let start = Instant::now();
    let mut all = client.scatter("kv", "q", &[], within);
    let mut got: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    while let Some((node, r)) = all.next().await {
        let entry = got.entry(node).or_default();
        match r {
            Ok(mut s) => {
                assert_eq!(
                    s.header()[..],
                    node.to_le_bytes(),
                    "labelled by its provider"
                );
                assert_eq!(s.next().await.unwrap().unwrap(), "v");
                entry.push("source".into());
            }
            Err(Error::RequestFailed(m)) => entry.push(format!("failed: {m}")),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(all.next().await.is_none(), "stays ended");
    let ids = providers.iter().map(|(n, _)| n.id()).collect();
    (ids, got, start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn every_provider_answers_and_a_failed_one_spares_the_others() {
    timeout(T, async {
        let within = Duration::from_secs(5);
        let (ids, got, took) = scatter(&[Kind::Good, Kind::Failing, Kind::Good], within).await;
        assert_eq!(got[&ids[0]], ["source", "source"]);
        assert_eq!(
            got[&ids[1]],
            ["failed: source function failed: shard offline"]
        );
        assert_eq!(got[&ids[2]], ["source", "source"]);
        assert!(
            took < within,
            "everyone answered: no wait for the deadline ({took:?})"
        );
    })
    .await
    .expect("hung");
}

#[tokio::test(start_paused = true)]
async fn the_deadline_returns_what_has_arrived() {
    timeout(T, async {
        let within = Duration::from_secs(3);
        let (ids, got, took) = scatter(&[Kind::Good, Kind::Silent], within).await;
        assert_eq!(got[&ids[0]], ["source", "source"]);
        assert!(
            !got.contains_key(&ids[1]),
            "the silent provider sent nothing"
        );
        assert!(took >= within, "ended by the deadline ({took:?})");
    })
    .await
    .expect("hung");
}
