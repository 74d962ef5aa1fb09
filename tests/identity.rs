//! Stable node identity: bucket ownership follows node ids, so a server that restarts
//! with the same id gets exactly its buckets back; one with a fresh random id does not.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, LinkEvent, Node, NodeConfig, RequestTag, ServeHandle, Server, Source};
use futures::{stream, StreamExt};
use tokio::time::timeout;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::link;

const T: Duration = Duration::from_secs(20);
const BUCKETS: usize = 48;

/// A server node answering every request with one source whose header is its id.
fn server(cfg: NodeConfig) -> (Node, ServeHandle) {
    let node = Node::with_config(cfg);
    let id = node.id();
    let svc = Server::new(node.clone())
        .listen_and_serve("kv", move |_| {
            stream::iter([Source::new(
                Bytes::from(id.to_le_bytes().to_vec()),
                stream::empty(),
            )])
        })
        .unwrap();
    (node, svc)
}

/// Which server owns each bucket, as the client sees it.
async fn owners(client: &Client) -> BTreeMap<usize, u64> {
    let mut owners = BTreeMap::new();
    for b in 0..BUCKETS {
        let tags = [RequestTag::Bucket(format!("bucket-{b}"))];
        let mut sources = client.lookup_and_post("kv", "", &tags).await.unwrap();
        let s = sources.next().await.unwrap().unwrap();
        let id = u64::from_le_bytes(s.header()[..].try_into().unwrap());
        owners.insert(b, id);
    }
    owners
}

/// Restarts the second server (with `restarted`'s config) and returns the bucket
/// owners before and after.
async fn restart(
    cfgs: [NodeConfig; 3],
    restarted: NodeConfig,
) -> (Vec<u64>, [BTreeMap<usize, u64>; 2]) {
    let client_node = Node::new();
    let mut servers: Vec<_> = cfgs.into_iter().map(server).collect();
    for (n, _) in &servers {
        link(&client_node, n).await;
    }
    client_node.wait_for_providers("kv", 3, T).await.unwrap();
    let client = Client::new(client_node.clone()).unwrap();
    let before = owners(&client).await;

    let mut events = client_node.subscribe();
    let (old, svc) = servers.remove(1);
    let old_id = old.id();
    drop(svc);
    old.shutdown().await;
    drop(old);
    while !matches!(events.next().await, Some(LinkEvent::Down(p)) if p.node == old_id) {}
    let (new, svc) = server(restarted);
    link(&client_node, &new).await;
    client_node.wait_for_providers("kv", 3, T).await.unwrap();
    let after = owners(&client).await;
    let ids = vec![servers[0].0.id(), new.id(), servers[1].0.id()];
    drop(svc);
    (ids, [before, after])
}

#[tokio::test]
async fn a_server_restarted_with_its_id_gets_exactly_its_buckets_back() {
    timeout(T, async {
        let named = |n: &str| NodeConfig::default().node_name(n);
        let (ids, [before, after]) =
            restart([named("kv-0"), named("kv-1"), named("kv-2")], named("kv-1")).await;
        assert_eq!(ids[1], Node::with_config(named("kv-1")).id(), "the same id");
        // Every server owns some buckets, and the restart moved none of them.
        for id in &ids {
            assert!(before.values().any(|o| o == id), "{id:016x} owns no bucket");
        }
        assert_eq!(before, after);
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_server_restarted_with_a_random_id_moves_buckets() {
    timeout(T, async {
        let named = |n: &str| NodeConfig::default().node_name(n);
        let (_, [before, after]) = restart(
            [named("kv-0"), named("kv-1"), named("kv-2")],
            NodeConfig::default(),
        )
        .await;
        // The control for the test above: ownership does depend on the id (the odds
        // that a fresh random id wins exactly the same 48 buckets are about 1e-13).
        assert_ne!(before, after);
    })
    .await
    .expect("hung");
}

/// A node that answers every stream to `name` with its id.
fn answering(name: &str) -> Node {
    use chanserv::{Listener, Multiplexer};
    use tokio::io::AsyncWriteExt;
    let node = Node::new();
    let mut l = node.bind(name).unwrap();
    let id = node.id();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            // A dialer that left early is no concern of this test.
            drop(s.write_all(&id.to_le_bytes()).await);
            drop(s.shutdown().await);
        }
    });
    node
}

#[tokio::test]
async fn a_name_is_dialed_on_the_node_chosen() {
    use chanserv::{DialOptions, Error, Multiplexer};
    use tokio::io::AsyncReadExt;
    timeout(T, async {
        let client = answering("kv");
        let servers = [answering("kv"), answering("kv"), answering("other")];
        for s in &servers {
            link(&client, s).await;
        }
        client.wait_for_providers("kv", 3, T).await.unwrap();
        client.wait_for_name("other", T).await.unwrap();
        // The registry as the client sees it: every name, every provider, sorted.
        let services = client.services();
        assert_eq!(services.keys().collect::<Vec<_>>(), ["kv", "other"]);
        let nodes = |name: &str| services[name].iter().map(|p| p.node).collect::<Vec<_>>();
        assert_eq!(nodes("kv"), client.providers("kv"));
        assert_eq!(nodes("kv").len(), 3);
        assert_eq!(nodes("other"), [servers[2].id()]);
        assert!(services["kv"]
            .iter()
            .all(|p| p.hops == usize::from(p.node != client.id())));
        // Each provider, this node included, several times: always the one chosen.
        for target in client.providers("kv").into_iter().cycle().take(12) {
            let opts = DialOptions::new(T).on_node(target).bucket("ignored");
            let mut s = client.dial("kv", opts).await.unwrap();
            let mut id = [0u8; 8];
            s.read_exact(&mut id).await.unwrap();
            assert_eq!(u64::from_le_bytes(id), target);
        }
        // A node that does not provide the name, linked or not, is no route.
        for target in [servers[2].id(), 42] {
            let r = client.dial("kv", DialOptions::new(T).on_node(target)).await;
            assert!(matches!(r, Err(Error::NoSuchAddress(_))), "{r:?}");
        }
    })
    .await
    .expect("hung");
}
