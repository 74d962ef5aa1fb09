//! `join` has one owner: the handle it returns owns the address's one reconnect loop.

use std::path::PathBuf;
use std::time::Duration;

use chanserv::{LinkEvent, Listener, Multiplexer, Node, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

fn fast() -> NodeConfig {
    NodeConfig::default().reconnect_backoff(Duration::from_millis(5), Duration::from_millis(10))
}

fn sock(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chanserv-join-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p); // a leftover of an earlier run, if any
    p
}

/// The next link going up or down (name changes skipped): `(up, peer)`.
async fn next_event(rx: &mut chanserv::LinkEvents) -> (bool, u64) {
    loop {
        let e = tokio::time::timeout(T, rx.recv())
            .await
            .expect("a link event")
            .expect("events");
        match e {
            LinkEvent::Up(p) => return (true, p.node),
            LinkEvent::Down(p) => return (false, p.node),
            LinkEvent::Names { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_failed_first_join_leaves_nothing_running() {
    let path = sock("failed-first");
    let client = Node::with_config(fast());
    assert!(
        client.join_unix(&path).await.is_err(),
        "nothing listens yet"
    );
    // Let the (old) background loop's backoff pass many times over: 5-10 ms.
    let server = Node::new();
    server.listen_unix(&path).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.links_established(), 0, "nobody owned a loop");
    assert!(server.peers().is_empty());
    // The natural reaction, joining again, makes exactly one link.
    let j = client.join_unix(&path).await.unwrap();
    assert_eq!(j.peer(), server.id());
    assert_eq!(client.links_established(), 1);
}

#[tokio::test]
async fn joining_twice_shares_one_loop_and_the_last_handle_leaves() {
    let path = sock("twice");
    let (client, server) = (Node::with_config(fast()), Node::new());
    server.listen_unix(&path).await.unwrap();
    let mut events = client.subscribe();
    let first = client.join_unix(&path).await.unwrap();
    let second = client.join_unix(&path).await.unwrap();
    assert_eq!(first.peer(), second.peer());
    assert_eq!(next_event(&mut events).await, (true, server.id()));
    assert_eq!(client.links_established(), 1, "one loop, one link");
    drop(first);
    // Still joined: a stream works.
    let mut l = server.bind("echo").unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut b = [0u8; 2];
            if s.read_exact(&mut b).await.is_ok() {
                let _ = s.write_all(&b).await; // the test checks what arrives
            }
        }
    });
    client.wait_for_name("echo", T).await.unwrap();
    let mut s = client.dial("echo", T).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"hi");
    drop(s);
    drop(second);
    assert_eq!(next_event(&mut events).await, (false, server.id()));
    assert_eq!(client.link_count(server.id()), 0);
}

#[tokio::test]
async fn leave_closes_the_link_and_a_restarted_peer_is_not_rejoined() {
    let path = sock("leave");
    let client = Node::with_config(fast());
    let server = Node::new();
    server.listen_unix(&path).await.unwrap();
    let j = client.join_unix(&path).await.unwrap();
    tokio::time::timeout(T, j.leave())
        .await
        .expect("leave ends");
    assert!(client.peers().is_empty());
    server.shutdown().await;
    let server = Node::new();
    let _ = std::fs::remove_file(&path); // the old socket file
    server.listen_unix(&path).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        client.links_established(),
        1,
        "nothing rejoined after leave"
    );
}

#[tokio::test]
async fn a_detached_join_reconnects_until_the_node_shuts_down() {
    let path = sock("detached");
    let client = Node::with_config(fast());
    let server = Node::new();
    server.listen_unix(&path).await.unwrap();
    let mut events = client.subscribe();
    client.join_unix(&path).await.unwrap().detach();
    assert_eq!(next_event(&mut events).await, (true, server.id()));
    server.shutdown().await;
    assert_eq!(next_event(&mut events).await, (false, server.id()));
    let server = Node::new();
    let _ = std::fs::remove_file(&path); // the old socket file
    server.listen_unix(&path).await.unwrap();
    assert_eq!(next_event(&mut events).await, (true, server.id()));
    assert_eq!(client.links_established(), 2);
    tokio::time::timeout(T, client.shutdown())
        .await
        .expect("shutdown ends the loop");
    assert!(client.peers().is_empty());
}

/// After rotations the join keeps one active link (plus one draining at most), and
/// dropping the handle closes all of them: no supervisor survives its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_keep_one_loop_and_its_handle_closes_every_link() {
    let cfg = fast().rotate_after(20);
    let (client, server) = (Node::with_config(cfg), Node::new());
    let addr = server.listen("127.0.0.1:0").await.unwrap();
    let mut l = server.bind("sink").unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut v = Vec::new();
                let _ = s.read_to_end(&mut v).await; // the client checks the echo
                let _ = s.write_all(&v).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let j = client.join(addr).await.unwrap();
    client.wait_for_name("sink", T).await.unwrap();
    for i in 0..200u32 {
        let mut s = client.dial("sink", T).await.unwrap();
        s.write_all(&i.to_le_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        assert_eq!(v, i.to_le_bytes());
        let n = client.link_count(server.id());
        assert!(
            n <= 2,
            "one active, one draining: {n} at {i}, {} made",
            client.links_established()
        );
    }
    assert!(client.links_established() >= 5, "it rotated");
    let mut events = client.subscribe();
    drop(j);
    assert_eq!(next_event(&mut events).await, (false, server.id()));
    assert_eq!(client.link_count(server.id()), 0);
    let before = client.links_established();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client.links_established(), before, "no loop left");
}
