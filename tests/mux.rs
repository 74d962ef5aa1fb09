//! The multiplexer alone: links, addresses, discovery, keep-alive, limits.

use std::time::Duration;

use chanserv::{Error, LinkEvent, Listener, Multiplexer, Node, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

async fn echo_server(node: &Node, vaddr: &str) -> tokio::task::JoinHandle<()> {
    let mut l = node.bind(vaddr).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _from)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    })
}

async fn roundtrip(node: &Node, vaddr: &str, msg: &[u8]) -> Result<Vec<u8>, Error> {
    let mut s = node.dial(vaddr, T).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(chanserv_err)?;
    Ok(out)
}

fn chanserv_err(e: std::io::Error) -> Error {
    match e.into_inner().map(|i| i.downcast::<Error>()) {
        Some(Ok(e)) => *e,
        Some(Err(other)) => Error::Io(std::io::Error::other(other)),
        None => Error::Reset,
    }
}

async fn pair() -> (Node, Node) {
    let a = Node::new();
    let b = Node::new();
    let addr = a.listen("127.0.0.1:0").await.unwrap();
    let joined = b.join(addr).await.unwrap();
    let id = joined.peer();
    joined.detach();
    assert_eq!(id, a.id());
    (a, b)
}

/// Waits until `node` can route `name` (names travel by the control stream).
async fn until_known(node: &Node, name: &str) {
    if let Err(e) = node.wait_for_name(name, T).await {
        panic!("{name} never became known: {e}");
    }
}

#[tokio::test]
async fn dial_by_name_over_tcp() {
    let (a, b) = pair().await;
    let _srv = echo_server(&a, "echo").await;
    until_known(&b, "echo").await;
    assert_eq!(roundtrip(&b, "echo", b"hello").await.unwrap(), b"hello");
    // Local dial needs no link.
    assert_eq!(roundtrip(&a, "echo", b"local").await.unwrap(), b"local");
}

#[tokio::test]
async fn bind_conflict_and_unbind_on_drop() {
    let n = Node::new();
    let l = n.bind("svc").unwrap();
    assert!(matches!(n.bind("svc"), Err(Error::AddrInUse(_))));
    let p = n.bind(":0").unwrap();
    assert!(p.local_addr().vaddr().starts_with(':'));
    assert!(matches!(
        n.bind(p.local_addr().vaddr()),
        Err(Error::AddrInUse(_))
    ));
    drop(l);
    let _again = n.bind("svc").unwrap();
    assert!(matches!(n.bind("a/b"), Err(Error::InvalidAddress(..))));
    assert!(matches!(n.bind(""), Err(Error::InvalidAddress(..))));
}

#[tokio::test]
async fn dropping_a_node_still_delivers_what_was_written() {
    let (a, b) = pair().await;
    let mut l = b.bind("sink").unwrap();
    until_known(&a, "sink").await;
    assert_eq!(a.providers("sink"), vec![b.id()]);
    let reader = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got).await;
        (got, r.map_err(chanserv_err))
    });
    let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    let mut s = a.dial("sink", T).await.unwrap();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    drop(s);
    drop(a); // the last handle: the link closes now
    let (got, r) = reader.await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(got.len(), data.len());
    assert!(got == data);
}

#[tokio::test(start_paused = true)]
async fn unknown_address_fails_at_once() {
    let (a, b) = pair().await;
    // Unknown names fail locally, without waiting for any timeout (time is paused and
    // nothing advances it).
    let t0 = tokio::time::Instant::now();
    assert!(matches!(
        b.dial("nope", T).await,
        Err(Error::NoSuchAddress(_))
    ));
    assert!(matches!(
        b.dial(":77", T).await,
        Err(Error::NoSuchAddress(_))
    ));
    // An unbound port on a linked node: the remote answers at once.
    let mut s = b.dial(&format!("{:016x}:4242", a.id()), T).await.unwrap();
    let err = s.accepted().await.unwrap_err();
    assert!(matches!(err, Error::NoSuchAddress(_)), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn unix_socket_and_in_memory_links() {
    let dir = std::env::temp_dir().join(format!("chanserv-test-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let a = Node::new();
    let b = Node::new();
    a.listen_unix(&dir).await.unwrap();
    let joined = b.join_unix(&dir).await.unwrap();
    assert_eq!(joined.peer(), a.id());
    joined.detach();
    let _srv = echo_server(&a, "echo").await;
    until_known(&b, "echo").await;
    assert_eq!(roundtrip(&b, "echo", b"unix").await.unwrap(), b"unix");
    let _ = std::fs::remove_file(&dir);

    let c = Node::new();
    let d = Node::new();
    let (x, y) = tokio::io::duplex(64 * 1024);
    let (rc, rd) = tokio::join!(c.attach(x, true), d.attach(y, false));
    assert_eq!((rc.unwrap(), rd.unwrap()), (d.id(), c.id()));
    let _srv2 = echo_server(&c, "echo").await;
    until_known(&d, "echo").await;
    assert_eq!(roundtrip(&d, "echo", b"duplex").await.unwrap(), b"duplex");
}

#[tokio::test]
async fn wrong_handshake_is_a_clear_error() {
    let n = Node::new();
    let (x, mut y) = tokio::io::duplex(1024);
    let peer = tokio::spawn(async move {
        y.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut sink = vec![0u8; 64];
        let _ = y.read(&mut sink).await;
        y
    });
    assert!(matches!(n.attach(x, true).await, Err(Error::Protocol(_))));
    drop(peer.await);

    let (x, mut y) = tokio::io::duplex(1024);
    tokio::spawn(async move {
        let mut h = b"CHANSERV".to_vec();
        // A version 1 peer (it never writes credit): refused, saying both versions.
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&7u64.to_le_bytes());
        h.extend_from_slice(&16u32.to_le_bytes());
        y.write_all(&h).await.unwrap();
        let mut sink = vec![0u8; 64];
        let _ = y.read(&mut sink).await;
    });
    let err = n.attach(x, true).await.unwrap_err();
    assert!(
        matches!(err, Error::VersionMismatch { ours: 2, theirs: 1 }),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn keepalive_detects_a_silent_link() {
    let n = Node::new();
    let mut events = n.subscribe();
    let (x, mut y) = tokio::io::duplex(1 << 20);
    // A peer that completes the handshake and then never says another word.
    let silent = tokio::spawn(async move {
        let mut h = b"CHANSERV".to_vec();
        h.extend_from_slice(&chanserv::PROTOCOL_VERSION.to_le_bytes());
        h.extend_from_slice(&7u64.to_le_bytes());
        h.extend_from_slice(&16u32.to_le_bytes());
        y.write_all(&h).await.unwrap();
        let mut theirs = [0u8; 22];
        y.read_exact(&mut theirs).await.unwrap();
        y // held open, never read again
    });
    assert_eq!(n.attach(x, true).await.unwrap(), 7);
    let _held = silent.await.unwrap();
    let up = events.recv().await.unwrap();
    assert!(matches!(&up, LinkEvent::Up(p) if p.node == 7), "{up:?}");
    let t0 = tokio::time::Instant::now();
    let down = events.recv().await.unwrap();
    assert!(
        matches!(&down, LinkEvent::Down(p) if p.node == 7),
        "{down:?}"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(19) && waited <= Duration::from_secs(21),
        "{waited:?}"
    );
    assert!(n.peers().is_empty());
}

/// A service that answers every stream with its node's id.
fn whoami(node: &Node, vaddr: &str) -> tokio::task::JoinHandle<()> {
    let mut l = node.bind(vaddr).unwrap();
    let id = node.id();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(&id.to_le_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    })
}

async fn owner(node: &Node, bucket: &str) -> u64 {
    let mut s = node
        .dial("kv", chanserv::DialOptions::new(T).bucket(bucket))
        .await
        .unwrap();
    let mut id = [0u8; 8];
    s.read_exact(&mut id).await.map_err(chanserv_err).unwrap();
    u64::from_le_bytes(id)
}

#[tokio::test]
async fn leaving_node_withdraws_names_and_buckets_are_stable() {
    let hub = Node::new();
    let addr = hub.listen("127.0.0.1:0").await.unwrap();
    let mut events = hub.subscribe();
    let servers: Vec<Node> = (0..3).map(|_| Node::new()).collect();
    let mut services = Vec::new();
    for s in &servers {
        services.push(whoami(s, "kv"));
        s.join(addr).await.unwrap().detach();
    }
    let mut ups = 0;
    while ups < 3 {
        match events.recv().await.unwrap() {
            LinkEvent::Up(_) => ups += 1,
            LinkEvent::Names { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    // Names arrive by the control stream: wait until the hub knows all three.
    hub.wait_for_providers("kv", 3, T).await.unwrap();
    let buckets: Vec<String> = (0..90).map(|i| format!("user-{i}")).collect();
    let mut before = Vec::new();
    for b in &buckets {
        before.push(owner(&hub, b).await);
    }
    let distinct: std::collections::HashSet<_> = before.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "buckets spread over all three nodes");
    // Stable: the same bucket goes to the same node.
    for (b, o) in buckets.iter().zip(&before) {
        assert_eq!(owner(&hub, b).await, *o, "bucket {b}: {before:x?}");
    }
    // One node leaves: only its buckets move.
    let gone = servers[1].id();
    servers[1].shutdown().await;
    loop {
        match events.recv().await.unwrap() {
            LinkEvent::Down(p) if p.node == gone => break,
            LinkEvent::Names { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    for (b, o) in buckets.iter().zip(&before) {
        let now = owner(&hub, b).await;
        if *o == gone {
            assert_ne!(now, gone);
        } else {
            assert_eq!(now, *o, "bucket {b} moved although its node stayed");
        }
    }
    // Without a bucket, dial by name reaches only the remaining nodes.
    for _ in 0..10 {
        let mut s = hub.dial("kv", T).await.unwrap();
        let mut id = [0u8; 8];
        s.read_exact(&mut id).await.unwrap();
        assert_ne!(u64::from_le_bytes(id), gone);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_streams_on_one_link() {
    let (a, b) = pair().await;
    let _srv = echo_server(&a, "echo").await;
    until_known(&b, "echo").await;
    let mut tasks = Vec::new();
    for i in 0..10_000u32 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let msg = i.to_le_bytes();
            roundtrip(&b, "echo", &msg).await.map(|r| r == msg)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().unwrap() {
            ok += 1;
        }
    }
    assert_eq!(ok, 10_000);
    assert_eq!(b.link_count(a.id()), 1, "the link survived");
}

#[tokio::test]
async fn links_rotate_before_stream_ids_run_out() {
    let a = Node::new();
    let cfg = NodeConfig::default().rotate_after(10);
    let b = Node::with_config(cfg);
    let addr = a.listen("127.0.0.1:0").await.unwrap();
    b.join(addr).await.unwrap().detach();
    let _srv = echo_server(&a, "echo").await;
    until_known(&b, "echo").await;
    // A stream held open across rotations keeps working on its old link.
    let mut held = b.dial("echo", T).await.unwrap();
    for i in 0..45u32 {
        let msg = i.to_le_bytes();
        assert_eq!(roundtrip(&b, "echo", &msg).await.unwrap(), msg);
    }
    held.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    assert!(
        b.links_established() >= 4,
        "links: {}",
        b.links_established()
    );
    assert_eq!(b.peers(), vec![a.id()]);
}

#[tokio::test]
async fn reads_of_any_size_see_every_byte_in_order() {
    // A stream's reads take yamux's frames (60 KiB each by default) in whatever
    // pieces the reader's room allows: what does not fit waits for the next read.
    let (a, b) = pair().await;
    let mut l = a.bind("bytes").unwrap();
    until_known(&b, "bytes").await;
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        // Writes of odd sizes, split again by yamux.
        for piece in sent.chunks(100_003) {
            s.write_all(piece).await.unwrap();
        }
        s.shutdown().await.unwrap();
    });
    let mut s = b.dial("bytes", T).await.unwrap();
    let mut got = Vec::new();
    let sizes = [1usize, 7, 4096, 65_537, 300_000];
    let mut buf = vec![0u8; 300_000];
    for i in 0.. {
        let n = tokio::time::timeout(T, s.read(&mut buf[..sizes[i % sizes.len()]]))
            .await
            .expect("a read hung")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes out of order or changed");
    writer.await.unwrap();
}
