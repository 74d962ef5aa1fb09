//! What a node tells about its links: [`Node::stats`] (bytes, streams, round trip,
//! address, identity) and the link events (`Up`/`Down` with the peer's address and
//! identity, `Names` when a node's names change).

#[path = "support/mesh.rs"]
mod mesh;

#[path = "support/certs.rs"]
mod certs;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use certs::Ca;
use chanserv::{
    LinkEvent, LinkEvents, LinkState, LinkStats, Listener, Multiplexer, Node, NodeConfig, NodeId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(5);

async fn bounded<F: Future>(f: F) -> F::Output {
    timeout(T, f).await.expect("the test finishes in time")
}

/// Nodes whose keep-alive says nothing during a test: their links are quiet once
/// their streams are done.
fn quiet() -> NodeConfig {
    NodeConfig::default().keepalive(Duration::from_secs(60), Duration::from_secs(120))
}

/// The one link of `node` to `peer`.
fn link_to(node: &Node, peer: NodeId) -> LinkStats {
    let stats = node.stats();
    assert_eq!(stats.node, node.id());
    let links: Vec<_> = stats.links_to(peer).cloned().collect();
    assert_eq!(links.len(), 1, "{stats:?}");
    links.into_iter().next().unwrap()
}

/// Polls `ready` until it holds, every few milliseconds: for counters that change
/// with no event to wait on (the test's timeout bounds it).
async fn eventually(mut ready: impl FnMut() -> bool) {
    while !ready() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn bytes_out_of_one_side_are_bytes_in_of_the_other() {
    bounded(async {
        const PAYLOAD: usize = 1 << 20;
        let (server, client) = (Node::with_config(quiet()), Node::with_config(quiet()));
        mesh::link(&client, &server).await;
        let mut l = server.bind("sink").unwrap();
        client.wait_for_name("sink", T).await.unwrap();
        let send = async {
            let mut s = client.dial("sink", T).await.unwrap();
            s.write_all(&vec![7u8; PAYLOAD]).await.unwrap();
            s.shutdown().await.unwrap();
            assert_eq!(s.read(&mut [0u8; 1]).await.unwrap(), 0, "the server's FIN");
        };
        let receive = async {
            let (mut r, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            assert_eq!(got.len(), PAYLOAD);
            r.shutdown().await.unwrap();
        };
        tokio::join!(send, receive);
        let (c, sv) = (server.id(), client.id());
        // The streams' last frames (window updates, FIN) may still be on their way.
        eventually(|| {
            let (out, inn) = (link_to(&client, c), link_to(&server, sv));
            out.bytes_out == inn.bytes_in && out.bytes_in == inn.bytes_out
        })
        .await;
        let (out, inn) = (link_to(&client, c), link_to(&server, sv));
        assert!(out.bytes_out >= PAYLOAD as u64, "{out:?}");
        // yamux frame headers, window updates and the control stream: little.
        assert!(out.bytes_out < PAYLOAD as u64 + 16 * 1024, "{out:?}");
        assert!(inn.bytes_out < 16 * 1024, "{inn:?}");
        assert!(out.bytes_in > 0 && inn.bytes_out > 0, "names, status, FIN");
        assert_eq!((out.rtt, inn.rtt), (None, None), "no PING yet");
        assert_eq!((out.dialed, inn.dialed), (true, false));
        assert_eq!(out.state, LinkState::Active);
        assert_eq!(
            (out.addr.as_str(), out.identity.as_deref()),
            ("attached", None)
        );
        assert_eq!(client.stats().links_established, 1);
    })
    .await;
}

#[tokio::test]
async fn open_streams_are_counted_both_ways_until_dropped() {
    bounded(async {
        let (server, client) = (Node::with_config(quiet()), Node::with_config(quiet()));
        mesh::link(&client, &server).await;
        let (mut hold, mut back) = (server.bind("hold").unwrap(), client.bind("back").unwrap());
        client.wait_for_name("hold", T).await.unwrap();
        server.wait_for_name("back", T).await.unwrap();
        let open = |n: &Node, peer| {
            let l = link_to(n, peer);
            (l.streams_open, l.streams_total)
        };
        let (c, sv) = (server.id(), client.id());
        let mut dialed = Vec::new();
        let mut accepted = Vec::new();
        for i in 1..=3u64 {
            let mut s = client.dial("hold", T).await.unwrap();
            s.write_all(b"x").await.unwrap(); // the open header goes with it
            dialed.push(s);
            accepted.push(hold.accept().await.unwrap().0);
            assert_eq!(open(&client, c), (i, i));
            assert_eq!(open(&server, sv), (i, i));
        }
        let mut s = server.dial("back", T).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let (r, _) = back.accept().await.unwrap();
        assert_eq!(open(&client, c), (4, 4), "one accepted, three dialed");
        assert_eq!(open(&server, sv), (4, 4), "one dialed, three accepted");
        drop((s, r));
        dialed.truncate(1);
        assert_eq!(open(&client, c), (1, 4));
        assert_eq!(
            open(&server, sv),
            (3, 4),
            "the server still holds its three"
        );
        drop((dialed, accepted));
        assert_eq!(open(&client, c), (0, 4));
        assert_eq!(open(&server, sv), (0, 4));
    })
    .await;
}

#[tokio::test]
async fn keepalive_measures_the_round_trip() {
    bounded(async {
        let fast = || NodeConfig::default().keepalive(Duration::from_millis(20), T);
        let (server, client) = (Node::with_config(fast()), Node::with_config(fast()));
        mesh::link(&client, &server).await;
        let rtt = |n: &Node, peer| link_to(n, peer).rtt;
        eventually(|| rtt(&client, server.id()).is_some()).await;
        eventually(|| rtt(&server, client.id()).is_some()).await;
        let measured = rtt(&client, server.id()).unwrap();
        assert!(measured > Duration::ZERO && measured < T, "{measured:?}");
    })
    .await;
}

/// The next event that is not about names.
async fn next_link_event(events: &mut LinkEvents) -> LinkEvent {
    loop {
        match events.recv().await.expect("the node is alive") {
            LinkEvent::Names { .. } => {}
            e => return e,
        }
    }
}

#[tokio::test]
async fn a_tls_link_comes_up_with_the_peer_identity_and_address() {
    bounded(async {
        let ca = Ca::new("observe CA");
        let server = Node::with_config(NodeConfig::default().tls(ca.node("server.test")));
        let client = Node::with_config(NodeConfig::default().tls(ca.node("client.test")));
        let addr = server.listen("127.0.0.1:0").await.unwrap();
        let (mut on_server, mut on_client) = (server.subscribe(), client.subscribe());
        let _joined = client.join(addr).await.unwrap();
        let LinkEvent::Up(p) = next_link_event(&mut on_client).await else {
            panic!("expected the link up")
        };
        assert_eq!(p.node, server.id());
        assert_eq!(p.addr, addr.to_string(), "the address joined");
        assert_eq!(p.identity.as_deref(), Some("server.test"));
        let LinkEvent::Up(p) = next_link_event(&mut on_server).await else {
            panic!("expected the link up")
        };
        assert_eq!(p.node, client.id());
        assert_eq!(p.identity.as_deref(), Some("client.test"));
        let from: SocketAddr = p.addr.parse().expect("the client's socket address");
        assert_eq!(from.ip(), addr.ip());
        assert_ne!(from.port(), addr.port(), "the client's port, not ours");
        let (c, s) = (link_to(&client, server.id()), link_to(&server, client.id()));
        assert_eq!((c.dialed, s.dialed), (true, false));
        assert_eq!(c.identity.as_deref(), Some("server.test"));
        assert_eq!((c.addr, s.addr), (addr.to_string(), p.addr));
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_unix_link_names_its_socket_path_on_both_sides() {
    bounded(async {
        let dir = std::env::temp_dir().join(format!("chanserv-observe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("link");
        let _ = std::fs::remove_file(&path); // a leftover of an earlier run, if any
        let (server, client) = (Node::new(), Node::new());
        server.listen_unix(&path).await.unwrap();
        let mut on_server = server.subscribe();
        let _joined = client.join_unix(&path).await.unwrap();
        let want = format!("unix:{}", path.display());
        assert_eq!(link_to(&client, server.id()).addr, want);
        let LinkEvent::Up(p) = next_link_event(&mut on_server).await else {
            panic!("expected the link up")
        };
        assert_eq!((p.addr.as_str(), p.identity), (want.as_str(), None));
        assert_eq!(link_to(&server, client.id()).addr, want);
    })
    .await;
}

/// The next event, which must be about names: `(node, added, removed)`.
async fn names(events: &mut LinkEvents) -> (NodeId, Vec<String>, Vec<String>) {
    match events.recv().await.expect("the node is alive") {
        LinkEvent::Names {
            node,
            added,
            removed,
            ..
        } => (node, added, removed),
        other => panic!("expected names, got {other:?}"),
    }
}

#[tokio::test]
async fn names_events_follow_a_peers_binds_and_its_leaving() {
    bounded(async {
        let (server, client) = (Node::new(), Node::new());
        mesh::link(&client, &server).await;
        let (mut remote, mut local) = (client.subscribe(), server.subscribe());
        let id = server.id();
        let svc = server.bind("svc").unwrap();
        assert_eq!(names(&mut local).await, (id, vec!["svc".into()], vec![]));
        assert_eq!(names(&mut remote).await, (id, vec!["svc".into()], vec![]));
        let _port = server.bind(":0").unwrap(); // a port is not a name: no event
        let other = server.bind("other").unwrap();
        assert_eq!(names(&mut remote).await, (id, vec!["other".into()], vec![]));
        drop(svc);
        assert_eq!(names(&mut remote).await, (id, vec![], vec!["svc".into()]));
        assert_eq!(names(&mut local).await.1, ["other"]);
        assert_eq!(names(&mut local).await.2, ["svc"]);
        // A peer that goes withdraws what it had, then goes down.
        server.shutdown().await;
        assert_eq!(names(&mut remote).await, (id, vec![], vec!["other".into()]));
        let down = remote.recv().await;
        assert!(
            matches!(&down, Some(LinkEvent::Down(p)) if p.node == id),
            "{down:?}"
        );
        drop(other);
    })
    .await;
}
